"""Stress run: hundreds of calls and dozens of compiles in one pair of gloo ranks, checked call by call.

    python examples/stress.py [--world-size 2] [--lower aot_eager inductor] [--strategies ...] [--lengths 1 2 3 5 17 64]

For each lowering and each strategy, one process pair compiles the demo-sized Llama (2 layers) with
``buckets="exact"`` (one graph per prompt length) and calls it the way traffic does: HF's default
call (``use_cache=True``) at every length, a padded batch, ``logits_to_keep=1``, then
``model.generate`` (a prefill and decode steps on the cache it left, ``outputs="local"``). Every
logits tensor and every token is compared with the uncompiled model on the same rank; the run
fails on the first mismatch or crash. Rank 0 prints calls, seqpar compiles, the largest
difference and the seconds per lowering.

This is the kind of run that died with heap corruption (``malloc(): unaligned tcache chunk``,
SIGSEGV) while seqpar's graphs kept several gloo all_gathers in flight
(``docs/gloo_heap_corruption.md``); README, Tests, says how often it has passed in a row.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODEL = dict(layers=2, heads=4, kv_heads=2, hidden=64)


def _check(name, got, want, worst):
    diff = (got - want).abs().max().item()
    if not diff <= 1e-4:
        raise AssertionError(f"{name}: max |diff| {diff:.3g} against the uncompiled model")
    return max(worst, diff)


def _body(lowerings, strategies, lengths, new_tokens):
    from models import build_model, make_inputs
    from sp_compiler.backend import compile_count

    ref = build_model("llama", **MODEL)
    report = []
    for lower in lowerings:
        t0, calls, compiles0, worst = time.perf_counter(), 0, compile_count(), 0.0
        for strategy in strategies:
            torch._dynamo.reset()
            model = build_model("llama", **MODEL)
            fast = torch.compile(model, backend="seqpar",
                                 options={"strategy": strategy, "lower": lower, "buckets": "exact"})
            with torch.no_grad():
                for S in lengths:                                         # HF's default call
                    ids = make_inputs("llama", 1, S, seed=S)
                    worst = _check(f"{lower} {strategy} S={S}", fast(ids).logits, ref(ids).logits, worst)
                    calls += 1
                ids = make_inputs("llama", 2, lengths[-1], seed=5)        # a left-padded batch, one row kept
                mask = torch.ones_like(ids)
                mask[1, :3] = 0
                got = fast(ids, attention_mask=mask, logits_to_keep=1).logits
                worst = _check(f"{lower} {strategy} padded", got, ref(ids, attention_mask=mask,
                                                                          logits_to_keep=1).logits, worst)
                calls += 1
            torch._dynamo.reset()
            model.compile(backend="seqpar", options={"strategy": strategy, "lower": lower, "outputs": "local"})
            for S in (1, lengths[-1]):                                        # generate: prefill + decode steps
                ids = make_inputs("llama", 1, S, seed=100 + S)
                with torch.no_grad():
                    got = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                    want = ref.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                if not torch.equal(got, want):
                    raise AssertionError(f"{lower} {strategy} generate S={S}: {got.tolist()} != {want.tolist()}")
                calls += new_tokens
        report.append((lower, calls, compile_count() - compiles0, worst, time.perf_counter() - t0))
    return report


def main() -> None:
    from tabulate import tabulate

    from sp_compiler.strategies import STRATEGIES
    from sp_compiler.testing import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--lower", nargs="+", default=["aot_eager", "inductor"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--lengths", nargs="+", type=int, default=[1, 2, 3, 5, 17, 64])
    ap.add_argument("--new-tokens", type=int, default=6)
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = run_ranks(_body, args.world_size, args.lower, args.strategies, sorted(args.lengths), args.new_tokens,
                        timeout=3600)
    print(tabulate([list(r[:3]) + [f"{r[3]:.2g}", f"{r[4]:.0f}"] for r in results[0]],
                   headers=["lower", "calls", "seqpar compiles", "max |diff|", "seconds"], tablefmt="github"))
    print(f"{args.world_size} ranks, no crash, every call matched the uncompiled model "
          f"({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
