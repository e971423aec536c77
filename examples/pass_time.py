"""seqpar's own compile-time work (capture + every pass of the pipeline) at a short and a long prompt.

Dynamo's trace and the lowering are left out: this is the time seqpar adds, measured on rank 0 of
a fake process group (nothing is computed; tensors are fake), best of ``--repeat`` after a
warm-up. A pass whose cost grew with S would show here as a ratio far above 1.

    python examples/pass_time.py --model llama-3-8b --layers 32 --world-size 8 --seq-lens 4096,131072
"""
from __future__ import annotations

import argparse
import time

import torch

__all__ = ["main", "pass_seconds"]


def pass_seconds(fm, strategy: str, world: int, seq_len: int) -> dict:
    """{pass name: seconds} of one compile (``capture`` first), on rank 0 of ``world``."""
    from passes import capture_graph, run_pipeline
    from sp_compiler.backend import input_fqns
    from sp_compiler.config import Options
    from sp_compiler.context import PassContext
    from sp_compiler.plan import as_rank, dynamo_graph

    gm, inputs = dynamo_graph(fm, 1, seq_len)
    opts = Options.from_dict({"strategy": strategy, "lower": "eager"})
    times, last = {}, [0.0]

    def on_pass(name, _gm):
        now = time.perf_counter()
        times[name] = now - last[0]
        last[0] = now

    with as_rank(world, 0), torch.no_grad():          # as the backend runs: fake weights, real constants
        t0 = time.perf_counter()
        captured = capture_graph(gm, inputs)
        times["capture"] = time.perf_counter() - t0
        ctx = PassContext(opts, world, 0, None, list(inputs), list(input_fqns(gm)))
        last[0] = time.perf_counter()
        run_pipeline(captured, ctx, on_pass=on_pass)
    return times


def main(argv=None) -> int:
    from tabulate import tabulate

    from sp_compiler.plan import build_fake_model
    from sp_compiler.presets import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--seq-lens", default="4096,131072")
    p.add_argument("--strategies", default="ulysses,vanilla_sp_zigzag,megatron_sp_tp,tp")
    p.add_argument("--repeat", type=int, default=3, help="best of this many compiles per length")
    args = p.parse_args(argv)
    fm = build_fake_model(load_config(args.model), layers=args.layers)
    lens = [int(s) for s in args.seq_lens.split(",")]
    rows = []
    for strategy in args.strategies.split(","):
        pass_seconds(fm, strategy, args.world_size, lens[0])                   # warm-up: first-call costs
        totals = [min(sum(pass_seconds(fm, strategy, args.world_size, S).values()) for _ in range(args.repeat))
                  for S in lens]
        rows.append([strategy] + [f"{t:.2f}" for t in totals] + [f"{totals[-1] / totals[0]:.2f}"])
        print(tabulate(rows, headers=["strategy"] + [f"S={S} s" for S in lens] + ["ratio"],
                       disable_numparse=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
