"""Predicted vs measured: the cost model's cpu-gloo prefill times against real 2-rank runs.

For a small random-weight Llama and each sequence length, the planner predicts every
strategy's prefill on the ``cpu-gloo`` profile (calibrated on this machine, fp32; with and
without the fusion model), then two gloo ranks (one thread each,
``sp_compiler.testing.run_ranks``) compile the model with ``backend="seqpar",
lower="inductor"`` and time the forward (the slowest rank's wall and CPU time per run; the
fastest and the median of ``--iters`` runs). One process with one thread and no seqpar
(eager and plain Inductor) is timed against the world=1 prediction, which checks the compute
model without any communication. Prints a markdown table. On a shared
machine other processes steal the 2 cores: the fastest run is the one to compare with a
roofline prediction, the CPU time is what the work cost when it ran, and the load average is
printed with the table.

    python examples/validate_cost_model.py
    python examples/validate_cost_model.py --seq-lens 512,2048 --strategies tp,ulysses --iters 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

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


def _set_priority(nice: int) -> None:
    """Best effort: this process's scheduling niceness (negative needs root); ignored when not allowed."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except (OSError, AttributeError):
        pass


def _time_runs(fn, iters: int, *, sync: bool) -> dict:
    """{'wall': [ms], 'cpu': [ms]} per run; with ``sync`` both are the slowest rank's."""
    wall, cpu = [], []
    for _ in range(iters):
        if sync:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        dt = torch.tensor([time.perf_counter() - t0, time.process_time() - c0], dtype=torch.float64)
        if sync:
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        wall.append(dt[0].item() * 1e3)
        cpu.append(dt[1].item() * 1e3)
    return {"wall": wall, "cpu": cpu}


def _model_and_ids(seq_len: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(build_config(seq_len)).eval()
    ids = torch.randint(0, MODEL["vocab"], (1, seq_len), generator=torch.Generator().manual_seed(1))
    return model, ids


def _rank_body(seq_len: int, strategies, iters: int, nice: int = 0) -> dict:
    """In every rank: compile each strategy with Inductor and time it; {strategy: {'wall', 'cpu'} or 'error: ...'}."""
    model, ids = _model_and_ids(seq_len)
    out = {}
    for name in strategies:
        torch._dynamo.reset()
        try:
            fast = torch.compile(model, backend="seqpar", options={"strategy": name, "lower": "inductor"})
            with torch.no_grad():
                fast(ids, use_cache=False)                      # compiles
                fast(ids, use_cache=False)                      # warm
                _set_priority(nice)                             # only while timing
                out[name] = _time_runs(lambda: fast(ids, use_cache=False), iters, sync=True)
                _set_priority(0)
        except Exception as e:  # noqa: BLE001 - same on every rank; reported in the table
            out[name] = f"error: {type(e).__name__}: {' '.join(str(e).split())[:100]}"
        dist.barrier()
    return out


def _one_process_body(seq_len: int, iters: int) -> dict:
    """One process, one thread, no seqpar: {'eager' | 'inductor': {'wall', 'cpu'}}."""
    model, ids = _model_and_ids(seq_len)
    out = {}
    with torch.no_grad():
        for name, fn in (("eager", model), ("inductor", torch.compile(model))):
            fn(ids, use_cache=False)
            out[name] = _time_runs(lambda: fn(ids, use_cache=False), iters, sync=False)
    return out


def measure(seq_len: int, strategies, iters: int, nice: int = 0) -> dict:
    """Times per run per strategy over :data:`WORLD` gloo ranks, plus the one-process references."""
    from sp_compiler.testing import run_ranks

    out = run_ranks(_rank_body, WORLD, seq_len, list(strategies), iters, nice, timeout=1800)[0]
    out["one process"] = run_ranks(_one_process_body, 1, seq_len, iters, timeout=1800)[0]
    return out


def predict_all(seq_len: int, strategies, machine, world: int = WORLD) -> dict:
    """{strategy: (fused Prediction, unfused Prediction)} on ``machine``."""
    from sp_compiler.plan import plan

    cfg = build_config(seq_len)
    fused = plan(cfg, world=world, seq_len=seq_len, machine=machine, strategies=strategies, layers=2)
    unfused = plan(cfg, world=world, seq_len=seq_len, machine=machine, strategies=strategies, layers=2,
                   fusion=False)
    return {a.strategy: (a, b) for a, b in zip(fused, unfused)}


def _row(seq_len, name, collectives, fused, unfused, got) -> list:
    if not isinstance(got, dict):
        return [seq_len, name, collectives, f"{fused.total_s * 1e3:.1f}", f"{unfused.total_s * 1e3:.1f}",
                str(got)[:60], "", "", "", ""]
    wall, cpu = min(got["wall"]), min(got["cpu"])
    return [seq_len, name, collectives, f"{fused.total_s * 1e3:.1f}", f"{unfused.total_s * 1e3:.1f}",
            f"{wall:.1f}", f"{statistics.median(got['wall']):.1f}", f"{cpu:.1f}",
            f"{wall / (fused.total_s * 1e3):.2f}", f"{cpu / (fused.total_s * 1e3):.2f}"]


def main(argv=None) -> int:
    from tabulate import tabulate

    from sp_compiler.cost_model import get_profile
    from sp_compiler.strategies import STRATEGIES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="512,2048", help="comma-separated (default 512,2048)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default: all)")
    p.add_argument("--iters", type=int, default=10, help="timed runs per strategy (default 10)")
    p.add_argument("--nice", type=int, default=0,
                   help="scheduling niceness of the ranks while timing, e.g. -10 on a shared box (needs root)")
    p.add_argument("--save", help="write the measured times to this JSON file")
    p.add_argument("--measured", help="read measured times from this JSON file instead of running the ranks")
    args = p.parse_args(argv)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    strategies = [s for s in args.strategies.split(",") if s]

    machine = get_profile("cpu-gloo")
    saved = {}
    if args.measured:
        with open(args.measured) as f:
            saved = json.load(f)
    rows, load = [], (saved.get("load") if saved else None) or os.getloadavg()[0]
    saved["load"] = load
    for seq_len in seq_lens:
        preds = predict_all(seq_len, strategies, machine)
        if str(seq_len) not in saved:
            saved[str(seq_len)] = measure(seq_len, strategies, args.iters, args.nice)
        measured = saved[str(seq_len)]
        alone, alone_unfused = predict_all(seq_len, ["tp"], machine, world=1)["tp"]
        for ref in ("eager", "inductor"):
            rows.append(_row(seq_len, f"1 process, {ref}", "none", alone, alone_unfused,
                             measured["one process"][ref]))
        for name in strategies:
            fused, unfused = preds[name]
            if not fused.ok:
                rows.append([seq_len, name, "not available", "", "", str(measured.get(name))[:60], "", "", "", ""])
                continue
            rows.append(_row(seq_len, name, fused.collectives, fused, unfused, measured.get(name)))
    if args.save:
        with open(args.save, "w") as f:
            json.dump(saved, f, indent=1)
    m = MODEL
    print(f"Llama {m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads / {m['kv_heads']} kv, "
          f"MLP {m['intermediate']}, vocab {m['vocab']}, batch 1, fp32; {WORLD} gloo ranks x 1 thread, "
          f"lower=inductor, {args.iters} runs; profile {machine.name}: link {machine.link_bw / 1e9:.2f} GB/s, "
          f"latency {machine.link_latency_s * 1e6:.0f} us, {machine.peak_flops / 1e9:.1f} GFLOP/s, "
          f"mem {machine.mem_bw / 1e9:.1f} GB/s; load average {load:.1f} (1 min, before the runs)\n")
    print(tabulate(rows, headers=["seq", "run", "collectives / layer", "predicted ms (fused)",
                                  "predicted ms (unfused)", "wall ms (fastest)", "wall ms (median)",
                                  "CPU ms (fastest)", "wall / predicted", "CPU / predicted"],
                   tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
