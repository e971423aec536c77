"""Seconds per collective on 2 gloo ranks, for the sizes a 125M-parameter model moves per layer.

Each collective is the functional one seqpar's graphs call (``_c10d_functional``), timed after a
barrier; median of 5 after a warm-up. ``all_gather``'s size is each rank's input.

    python examples/gloo_collectives.py
"""
from __future__ import annotations

import time

import torch

__all__ = ["main"]


def _rank_body(sizes_mib):
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    g, out = dist.group.WORLD, {}
    for mib in sizes_mib:
        x = torch.randn(mib * 2**20 // 4)
        ops = {"all_gather": lambda: fc.all_gather_tensor(x, 0, g),
               "all_reduce": lambda: fc.all_reduce(x, "sum", g),
               "all_to_all_single": lambda: fc.all_to_all_single(x, None, None, g),
               "reduce_scatter": lambda: fc.reduce_scatter_tensor(x, "sum", 0, g)}
        for name, op in ops.items():
            fc.wait_tensor(op())
            times = []
            for _ in range(5):
                dist.barrier()
                t0 = time.perf_counter()
                fc.wait_tensor(op())
                times.append(time.perf_counter() - t0)
            out[(name, mib)] = sorted(times)[len(times) // 2]
    return out


def main(argv=None) -> int:
    import warnings

    from sp_compiler.testing import run_ranks

    warnings.filterwarnings("ignore", category=FutureWarning)
    for (name, mib), s in run_ranks(_rank_body, 2, (4, 8, 16))[0].items():
        print(f"{name:18s} {mib:3d} MiB  {s * 1e3:7.1f} ms  {mib / 1024 / s:5.2f} GiB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
