"""Gloo corrupts the heap when several all_gathers are in flight on one process group (torch 2.13).

    python examples/gloo_overlap_crash.py --in-flight 4     # a rank dies: SIGSEGV, or SIGABRT with
                                                            # 'malloc(): unaligned tcache chunk detected'
    python examples/gloo_overlap_crash.py --in-flight 1     # every step passes

No seqpar, no model: two gloo ranks on 127.0.0.1, and each step issues ``--in-flight``
``torch.ops._c10d_functional.all_gather_into_tensor`` (what seqpar's graphs and Inductor's call)
before it waits for any of them, then checks what arrived. This is what a graph that overlaps
communication with compute does. ``--async-op`` issues ``dist.all_gather_into_tensor(...,
async_op=True)`` instead (the same ``ProcessGroupGloo::_allgather_base``).
docs/gloo_heap_corruption.md has the measurements and seqpar's workaround (``passes/one_in_flight``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sp_compiler.testing import free_port  # noqa: E402


def rank_body(rank: int, world: int, port: int, steps: int, in_flight: int, async_op: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD.group_name
    for step in range(steps):
        rows = 64 + 32 * (step % 7)
        xs = [torch.full((rows, 16), float(rank * 100 + k)) for k in range(in_flight)]
        if async_op:
            outs = [torch.empty(world * rows, 16) for _ in xs]
            works = [dist.all_gather_into_tensor(o, x, async_op=True) for o, x in zip(outs, xs)]
            for w in works:
                w.wait()
        else:
            c10d = torch.ops._c10d_functional
            outs = [c10d.all_gather_into_tensor(x, world, group) for x in xs]       # all in flight
            outs = [c10d.wait_tensor(o) for o in outs]
        for k, out in enumerate(outs):
            want = torch.arange(world).repeat_interleave(rows).float()[:, None] * 100 + k
            assert torch.equal(out, want.expand(-1, 16)), f"step {step}: all_gather {k} is wrong"
        if rank == 0 and step % 1000 == 0:
            print(f"step {step}", flush=True)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-flight", type=int, default=4, help="all_gathers issued before the first wait")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--async-op", action="store_true", help="dist.all_gather_into_tensor(async_op=True) instead")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=rank_body, args=(r, 2, port, args.steps, args.in_flight, args.async_op))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    print(f"in flight {args.in_flight}: exit codes {codes}"
          + ("" if codes == [0, 0] else "  (negative: killed by that signal; 1: a peer died)"))
    return 0 if codes == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
