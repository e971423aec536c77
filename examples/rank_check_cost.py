"""What the per-call rank check costs (``sp_compiler.agree``): the all_gather alone, and a whole call with
and without it (``options={"check_ranks": False}``).

    python examples/rank_check_cost.py [--world-size 2] [--iters 2000]

On ``--world-size`` gloo ranks (one thread each): the median of ``--iters`` calls of ``check_ranks`` with
the fingerprint a compiled graph sends, then the median time of a decode-sized call (1 token, a model with
replicated outputs: no other collective) and of a 512-token prefill, each compiled twice, with the check
on and off. Rank 0 prints the table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _median_us(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _body(iters: int):
    from models import build_model, make_inputs
    from sp_compiler.agree import FIELDS, Fingerprint, check_ranks

    fp = Fingerprint(strategy=1, options=2, layers=2, model=3, collectives=4, collectives_hash=5)
    values = fp.values(512, 1, 0, 7)
    assert len(values) == len(FIELDS)
    rows = [["check_ranks alone (all_gather of %d int64)" % len(FIELDS), _median_us(lambda: check_ranks(values, fp),
                                                                                    iters), ""]]
    model = build_model("llama", layers=2, heads=4, kv_heads=2, hidden=64)
    for name, S, strategy in (("1-token call (a decode step)", 1, "ulysses"), ("512-token prefill", 512, "ulysses")):
        per = {}
        for check in (True, False):
            torch._dynamo.reset()
            fast = torch.compile(model, backend="seqpar", options={"strategy": strategy, "lower": "aot_eager",
                                                                   "check_ranks": check})
            ids = make_inputs("llama", 1, S)
            with torch.no_grad():
                fast(ids, use_cache=False)
                per[check] = _median_us(lambda: fast(ids, use_cache=False), max(20, iters // 20))
        rows.append([name, per[True], per[False]])
    return rows


def main(argv=None) -> int:
    from tabulate import tabulate

    from sp_compiler.testing import run_ranks

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=2000)
    args = p.parse_args(argv)
    rows = run_ranks(_body, args.world_size, args.iters, timeout=1800)[0]
    table = [[name, f"{on:,.0f}", f"{off:,.0f}" if off != "" else "", f"{on - off:+,.0f}" if off != "" else ""]
             for name, on, off in rows]
    print(f"{args.world_size} gloo ranks, 1 thread each, median of the calls (each after a barrier), microseconds\n")
    print(tabulate(table, headers=["call", "check on (us)", "check off (us)", "difference (us)"], tablefmt="github",
                   disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
