"""Where a prefill's time goes under each lowering, on one CPU thread: torch.profiler by op.

Runs rank 0's local graph of a seqpar strategy (a fake process group: the collectives are no-ops,
so this is the compute one rank does) under ``lower="aot_eager"`` and ``lower="inductor"``, and
one process running the whole model eagerly and under ``torch.compile`` (Inductor). For each:
the first call (compile included), the best of two steady calls, and the ops that took the most
self time in one profiled call. docs/benchmarks.md reads the result.

    python examples/profile_lowering.py --seq-len 4096 --layers 12 --strategy ulysses
"""
from __future__ import annotations

import argparse
import time

import torch

__all__ = ["main"]


def _profile(fn, ids, rows: int):
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        t0 = time.perf_counter()
        fn(ids, logits_to_keep=1)
        first = time.perf_counter() - t0
        steady = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn(ids, logits_to_keep=1)
            steady.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(ids, logits_to_keep=1)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return first, min(steady), table


def main(argv=None) -> int:
    from transformers import LlamaForCausalLM

    from sp_compiler.presets import load_config
    from sp_compiler.testing import fake_process_group

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--strategy", default="ulysses")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--runs", default="aot_eager,inductor,eager,compile",
                   help="aot_eager / inductor: seqpar's rank 0; eager / compile: one process, whole model")
    p.add_argument("--rows", type=int, default=12, help="ops shown per profile")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = load_config("bench-125m")                   # the model of docs/benchmarks.md
    config.num_hidden_layers = args.layers
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len))
    for run in args.runs.split(","):
        torch._dynamo.reset()
        if run in ("aot_eager", "inductor"):
            with fake_process_group(args.world_size, 0):
                fn = torch.compile(model, backend="seqpar", options={"strategy": args.strategy, "lower": run})
                first, steady, table = _profile(fn, ids, args.rows)
            what = f"seqpar {args.strategy}, rank 0 of {args.world_size}, lower={run}"
        else:
            fn = torch.compile(model) if run == "compile" else model
            first, steady, table = _profile(fn, ids, args.rows)
            what = f"one process, {run}"
        print(f"=== {what}: first call {first:.2f} s, steady {steady:.3f} s\n{table}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
