"""Predicted vs measured: the cost model's cpu-gloo prefill times against real 2-rank runs.

For a small random-weight Llama and each sequence length, the planner predicts every
strategy's prefill on the ``cpu-gloo`` profile (calibrated on this machine, fp32; with and
without the fusion model), then two gloo ranks (one thread each, ``tests/dist.py``) compile
the model with ``backend="seqpar", lower="inductor"`` and time the forward (median of
``--iters`` runs, the slowest rank's time per run). Prints a markdown table.

    python examples/validate_cost_model.py
    python examples/validate_cost_model.py --seq-lens 512,2048 --strategies tp,ulysses --iters 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

__all__ = ["MODEL", "build_config", "measure", "predict_all", "main"]

#: The validation model: small enough to compile and run on 2 CPU ranks in seconds.
MODEL = dict(layers=4, hidden=256, heads=8, kv_heads=4, intermediate=1024, vocab=2048)
WORLD = 2


def build_config(seq_len: int):
    """The LlamaConfig of :data:`MODEL` (fp32, sdpa)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=MODEL["vocab"], hidden_size=MODEL["hidden"],
                       intermediate_size=MODEL["intermediate"], num_hidden_layers=MODEL["layers"],
                       num_attention_heads=MODEL["heads"], num_key_value_heads=MODEL["kv_heads"],
                       max_position_embeddings=max(2048, seq_len), attn_implementation="sdpa",
                       tie_word_embeddings=False, dtype=torch.float32)


def _rank_body(seq_len: int, strategies, iters: int) -> dict:
    """In every rank: compile each strategy with Inductor and time it; {strategy: ms or 'error: ...'}."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(build_config(seq_len)).eval()
    ids = torch.randint(0, MODEL["vocab"], (1, seq_len), generator=torch.Generator().manual_seed(1))
    out = {}
    for name in strategies:
        torch._dynamo.reset()
        try:
            fast = torch.compile(model, backend="seqpar", options={"strategy": name, "lower": "inductor"})
            with torch.no_grad():
                fast(ids, use_cache=False)                      # compiles
                fast(ids, use_cache=False)                      # warm
                times = []
                for _ in range(iters):
                    dist.barrier()
                    t0 = time.perf_counter()
                    fast(ids, use_cache=False)
                    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                    times.append(dt.item() * 1e3)
            out[name] = statistics.median(times)
        except Exception as e:  # noqa: BLE001 - same on every rank; reported in the table
            out[name] = f"error: {type(e).__name__}: {' '.join(str(e).split())[:100]}"
        dist.barrier()
    return out


def measure(seq_len: int, strategies, iters: int) -> dict:
    """Median ms per strategy over :data:`WORLD` gloo ranks (rank 0's view of the slowest rank)."""
    from dist import run_ranks

    return run_ranks(_rank_body, WORLD, seq_len, list(strategies), iters, timeout=1800)[0]


def predict_all(seq_len: int, strategies, machine) -> dict:
    """{strategy: (fused Prediction, unfused Prediction)} on ``machine``."""
    from sp_compiler.plan import plan

    cfg = build_config(seq_len)
    fused = plan(cfg, world=WORLD, seq_len=seq_len, machine=machine, strategies=strategies, layers=2)
    unfused = plan(cfg, world=WORLD, seq_len=seq_len, machine=machine, strategies=strategies, layers=2,
                   fusion=False)
    return {a.strategy: (a, b) for a, b in zip(fused, unfused)}


def main(argv=None) -> int:
    from tabulate import tabulate

    from sp_compiler.cost_model import get_profile
    from sp_compiler.strategies import IMPLEMENTED

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="512,2048", help="comma-separated (default 512,2048)")
    p.add_argument("--strategies", default=",".join(IMPLEMENTED), help="comma-separated (default: implemented)")
    p.add_argument("--iters", type=int, default=5, help="timed runs per strategy (default 5)")
    args = p.parse_args(argv)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    strategies = [s for s in args.strategies.split(",") if s]

    machine = get_profile("cpu-gloo")
    rows = []
    for seq_len in seq_lens:
        preds = predict_all(seq_len, strategies, machine)
        measured = measure(seq_len, strategies, args.iters)
        for name in strategies:
            fused, unfused = preds[name]
            got = measured.get(name)
            if not fused.ok:
                rows.append([seq_len, name, "not available", "", "", str(got)[:60], ""])
                continue
            ratio = f"{got / (fused.total_s * 1e3):.2f}" if isinstance(got, float) else ""
            rows.append([seq_len, name, fused.collectives, f"{fused.total_s * 1e3:.1f}",
                         f"{unfused.total_s * 1e3:.1f}", f"{got:.1f}" if isinstance(got, float) else got, ratio])
    m = MODEL
    print(f"Llama {m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads / {m['kv_heads']} kv, "
          f"MLP {m['intermediate']}, vocab {m['vocab']}, batch 1, fp32; {WORLD} gloo ranks x 1 thread, "
          f"lower=inductor, median of {args.iters}; profile {machine.name}: link {machine.link_bw / 1e9:.2f} GB/s, "
          f"latency {machine.link_latency_s * 1e6:.0f} us, {machine.peak_flops / 1e9:.1f} GFLOP/s, "
          f"mem {machine.mem_bw / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f}\n")
    print(tabulate(rows, headers=["seq", "strategy", "collectives / layer", "predicted ms (fused)",
                                  "predicted ms (unfused)", "measured ms", "measured / predicted"],
                   tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
