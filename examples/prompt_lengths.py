"""Ten prompt lengths through one compiled model: how many seqpar compiles, and what they cost.

Spawns ``--world-size`` gloo ranks (``sp_compiler.testing.run_ranks``). Every rank compiles the
demo model (``examples/demo.py``) once with ``torch.compile(backend="seqpar")`` and calls it
with each length in turn, as a generation's prefill does (``logits_to_keep=1``, the default
``use_cache=True``). Rank 0 prints, per call, the wall time, whether seqpar compiled, the
bucket the prompt was padded to, and the largest difference from the uncompiled model.

    python examples/prompt_lengths.py
    python examples/prompt_lengths.py --strategy vanilla_sp_zigzag --lower aot_eager
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo import MODEL, build_demo_model  # noqa: E402

__all__ = ["LENGTHS", "main"]

LENGTHS = (64, 100, 137, 170, 211, 256, 300, 333, 401, 448)


def _rank_body(strategy: str, lower: str, lengths, buckets="auto"):
    from sp_compiler.backend import bucket_length, compile_count, world_info

    model = build_demo_model(max(lengths))
    fast = torch.compile(model, backend="seqpar", options={"strategy": strategy, "lower": lower, "buckets": buckets})
    rows = []
    for S in lengths:
        ids = torch.randint(0, MODEL["vocab"], (1, S), generator=torch.Generator().manual_seed(S))
        before = compile_count()
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = fast(ids, logits_to_keep=1).logits
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            ref = model(ids, logits_to_keep=1).logits
        rows.append(dict(S=S, compiles=compile_count() - before, seconds=seconds,
                         bucket=bucket_length(S, world_info()[0], buckets) if S != lengths[0] else S,
                         max_diff=float((logits - ref).abs().max())))
    return rows


def main(argv=None) -> int:
    from tabulate import tabulate

    from sp_compiler.testing import run_ranks

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--strategy", default="ulysses")
    p.add_argument("--lower", default="inductor")
    p.add_argument("--buckets", default="auto", help="seqpar's buckets option: auto or exact")
    args = p.parse_args(argv)
    rows = run_ranks(_rank_body, args.world_size, args.strategy, args.lower, LENGTHS, args.buckets, timeout=3600)[0]
    print(f"{args.strategy}, {args.world_size} gloo ranks, lower={args.lower}, buckets={args.buckets}, "
          f"demo model {MODEL}")
    print(tabulate([[r["S"], r["bucket"], r["compiles"], f"{r['seconds']:.2f}", f"{r['max_diff']:.1e}"] for r in rows],
                   headers=["prompt length", "compiled for", "seqpar compiles", "call seconds (rank 0)",
                            "max |diff| vs one device"]))
    total = sum(r["compiles"] for r in rows)
    print(f"\n{len(rows)} lengths, {total} seqpar compiles, "
          f"{sum(r['seconds'] for r in rows if r['compiles']):.1f} s in the calls that compiled, "
          f"{sum(r['seconds'] for r in rows if not r['compiles']):.1f} s in the others")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
