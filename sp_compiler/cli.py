"""The ``seqpar`` command: plan a prefill, dump one rank's graph, calibrate this machine.

    seqpar plan --model llama-3-8b --world-size 8 --seq-len 4096 [--batch 1] [--machine h100-nvlink]
                [--gpus-per-node 8]
    seqpar dump --model llama-3-8b --strategy ulysses --world-size 8 --rank 0 --seq-len 4096 --out DIR
                (also prints the rank's largest intermediates)
    seqpar calibrate [--world-size 2] [--out PATH]
    seqpar bench --model bench-125m --layers 2 --seq-lens 1024,4096 --world-size 2 --out DIR
                (or one process per rank: torchrun --nproc-per-node N -m sp_compiler.cli bench ...)

``plan`` prints one row per layout (a strategy, or a two-level ``strategy x tpT``): the collectives of
one (steady-state) layer, their bytes
(NCCL-tests sizes in the machine's dtype), predicted communication and compute per layer, the
non-layer parts and the whole prefill, the weights a rank holds, its peak activations (the graph run
eagerly, ``cost_model.peak_activation_bytes``) and whether both fit the device; ``*`` marks the
fastest. A strategy that cannot run the model on that many ranks shows the engine's reason instead.

``bench`` measures the prefill of every strategy beside one-device eager, one-device torch.compile and
transformers' ``tp_plan="auto"``, with the cost model's prediction beside each (``sp_compiler/bench.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import List, Optional

from tabulate import tabulate

from .errors import SeqparError, short_reason

__all__ = ["main", "build_parser", "format_plan", "short_reason"]


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def format_plan(preds, *, verbose: bool = False) -> str:
    """A tabulate table of Predictions, ``*`` on the fastest legal one; reasons in full when verbose."""
    legal = [p for p in preds if p.ok]
    best = min(legal, key=lambda p: p.total_s) if legal else None
    rows = []
    for p in preds:
        mark = "*" if p is best else ""
        if not p.ok:
            rows.append([p.layout, short_reason(p.error), "", "", "", "", "", "", "", "", ""])
            continue
        rows.append([p.layout, p.collectives, _mib(p.comm_bytes_per_layer), f"{p.comm_s_per_layer * 1e6:,.1f}",
                     f"{p.compute_s_per_layer * 1e6:,.1f}", f"{(p.other_comm_s + p.other_compute_s) * 1e3:,.2f}",
                     f"{p.total_s * 1e3:,.2f}", f"{p.weight_bytes / 2**30:,.2f}",
                     f"{p.activation_bytes / 2**30:,.2f} ({p.layer_activation_bytes / 2**30:,.2f})",
                     {True: "yes", False: "no", None: "?"}[p.fits], mark])
    memory = next((p.memory_bytes for p in preds if p.memory_bytes), 0)
    headers = ["layout", "collectives / layer", "MiB / layer", "comm us / layer", "compute us / layer",
               "non-layer ms", "prefill ms", "weights GiB / rank", "activations GiB / rank (in layers)",
               f"fits {memory / 1e9:.0f} GB" if memory else "fits", "fastest"]
    text = tabulate(rows, headers=headers, disable_numparse=True, colalign=("left", "left") + ("right",) * 9)
    if verbose:
        text += "\n" + "\n".join(f"\n{p.layout}: {p.error}" for p in preds if not p.ok)
    return text + "\n"


def _cmd_plan(args) -> int:
    from .cost_model import get_profile
    from .plan import plan
    from .presets import load_config

    config = load_config(args.model)
    machine = get_profile(args.machine)
    if args.gpus_per_node is not None:
        machine = dataclasses.replace(machine, gpus_per_node=args.gpus_per_node)
    t0 = time.perf_counter()
    preds = plan(config, world=args.world_size, seq_len=args.seq_len, batch=args.batch, machine=machine,
                 strategies=args.strategies, layers=args.layers, fusion=not args.no_fusion,
                 expert_parallel=args.expert_parallel, gpus_per_node=args.gpus_per_node,
                 call=None if args.logits_to_keep is None else {"logits_to_keep": args.logits_to_keep})
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps([p.as_dict() for p in preds], indent=1))
        return 0
    keep = "" if args.logits_to_keep is None else f", logits_to_keep={args.logits_to_keep}"
    nodes = (f" in nodes of {machine.gpus_per_node} (network across nodes: {machine.node_link_bw / 1e9:.0f} GB/s, "
             f"{machine.node_link_latency_s * 1e6:.0f} us)" if machine.gpus_per_node else "")
    print(f"{args.model}: {config.num_hidden_layers} layers, world {args.world_size}{nodes}, batch {args.batch} x seq "
          f"{args.seq_len}, {machine.name} ({machine.dtype}); per layer = one steady-state decoder layer, "
          f"prefill = {config.num_hidden_layers} layers + non-layer parts (embedding, masks, lm_head, logits "
          f"gather); call: model(ids{keep}, use_cache=False); planned in {elapsed:.1f} s\n")
    print(format_plan(preds, verbose=args.verbose), end="")
    return 0


def _cmd_dump(args) -> int:
    from .plan import dump
    from .presets import load_config

    paths = dump(load_config(args.model), args.strategy, args.world_size, args.rank, args.seq_len, args.out,
                 batch=args.batch, layers=args.layers, machine=args.machine)
    print("\n".join(paths))
    memory = next(p for p in paths if p.endswith("memory.txt"))
    with open(memory) as f:
        print("\n" + f.read().split("\n\n", 1)[-1], end="")          # the table, without the header line
    return 0


def _cmd_calibrate(args) -> int:
    from .cost_model import calibrate, calibration_path

    path = args.out or calibration_path()
    prof = calibrate(path, world=args.world_size)
    rows = [["link_bw", f"{prof.link_bw / 1e9:.3f} GB/s"], ["link_latency", f"{prof.link_latency_s * 1e6:.1f} us"],
            ["peak_flops", f"{prof.peak_flops / 1e9:.2f} GFLOP/s"], ["mem_bw", f"{prof.mem_bw / 1e9:.2f} GB/s"],
            ["dtype", prof.dtype]]
    print(f"{prof.name} written to {path}\n")
    print(tabulate(rows, headers=["field", "value"], disable_numparse=True))
    return 0


def _cmd_bench(args) -> int:
    from .bench import BenchError, BenchSpec, format_table, missing_extras, run_bench, truncated_config, write_outputs
    from .presets import load_config

    references = [] if args.references == ["none"] else args.references
    missing = missing_extras(references)
    if missing:
        raise BenchError(f"seqpar bench needs {', '.join(missing)}; install them with: pip install -e '.[bench]'")
    config = truncated_config(load_config(args.model), args.layers)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 2))
    spec = BenchSpec(model=args.model, config=config, seq_lens=tuple(args.seq_lens), world=world, batch=args.batch,
                     strategies=tuple(args.strategies or ()), references=tuple(references), runs=args.runs,
                     warmup=args.warmup, lower=args.lower, outputs=args.outputs, dtype=args.dtype,
                     machine="none" if args.generate else args.machine, timeout=args.timeout,
                     progress=not args.no_progress, generate=args.generate)
    result = run_bench(spec)
    if result is None:                       # a torchrun rank other than 0
        return 0
    print(format_table(result), end="")
    if args.out:
        print("\n" + "\n".join(write_outputs(result, args.out)))
    return 1 if any(not r["ok"] for r in result["rows"]) else 0          # a run failed: its row says why


def _int_list(text: str) -> List[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1024,4096") \
            from None


def _strategy_list(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand."""
    from .cost_model import profile_names
    from .bench import DTYPES
    from .config import LOWERINGS, OUTPUTS
    from .presets import preset_names
    from .strategies import STRATEGIES

    p = argparse.ArgumentParser(prog="seqpar", description="Plan, inspect, calibrate and benchmark seqpar prefill.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, *, machine_default="h100-nvlink"):
        sp.add_argument("--model", required=True, help=f"a preset ({', '.join(preset_names())}) or a config.json")
        sp.add_argument("--world-size", type=int, required=True, help="number of ranks")
        sp.add_argument("--seq-len", type=int, required=True, help="prompt length in tokens")
        sp.add_argument("--batch", type=int, default=1, help="prompts per forward (default 1)")
        sp.add_argument("--machine", default=machine_default,
                        help=f"machine profile: {', '.join(profile_names())} (default {machine_default})")
        sp.add_argument("--layers", type=int, default=2, help="decoder layers to trace (default 2)")

    sp = sub.add_parser("plan", help="predict every strategy's prefill time")
    common(sp)
    sp.add_argument("--strategies", type=_strategy_list, default=None,
                    help=f"comma-separated subset of {', '.join(STRATEGIES)}")
    sp.add_argument("--no-fusion", action="store_true", help="price every memory-bound op as its own kernel")
    sp.add_argument("--expert-parallel", action="store_true",
                    help="mixtures of experts: each rank holds E/N of the experts (options['expert_parallel'])")
    sp.add_argument("--gpus-per-node", type=int, default=None,
                    help="ranks per node (default: the machine profile's; 0: one node). Collectives across "
                         "nodes run on the network link, and two-level layouts (tp inside a node, tp_size) "
                         "are listed too")
    sp.add_argument("--logits-to-keep", type=int, default=None,
                    help="price the call a generation's prefill makes, model(ids, logits_to_keep=N) (default: "
                         "every position's logits, gathered whole at the end)")
    sp.add_argument("--json", action="store_true", help="print the predictions as JSON")
    sp.add_argument("--verbose", action="store_true", help="print the full reason of unavailable strategies")
    sp.set_defaults(func=_cmd_plan)

    sp = sub.add_parser("dump", help="write one rank's transformed graph, collectives and cost")
    common(sp)
    sp.add_argument("--strategy", required=True, choices=list(STRATEGIES))
    sp.add_argument("--rank", type=int, default=0, help="which rank's graph (default 0)")
    sp.add_argument("--out", required=True, help="output directory")
    sp.set_defaults(func=_cmd_dump)

    sp = sub.add_parser("calibrate", help="measure this machine as the cpu-gloo profile")
    sp.add_argument("--world-size", type=int, default=2, help="gloo processes (default 2)")
    sp.add_argument("--out", default=None, help="where to save the profile (default ~/.cache/seqpar/cpu-gloo.json)")
    sp.set_defaults(func=_cmd_calibrate)

    sp = sub.add_parser("bench", help="measure every strategy's prefill beside one-device and HF TP references")
    sp.add_argument("--model", required=True, help=f"a preset ({', '.join(preset_names())}) or a config.json")
    sp.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (default: all)")
    sp.add_argument("--seq-lens", type=_int_list, default=[1024, 4096], help="prompt lengths (default 1024,4096)")
    sp.add_argument("--world-size", type=int, default=None,
                    help="gloo ranks to spawn (default 2); under torchrun its WORLD_SIZE")
    sp.add_argument("--batch", type=int, default=1, help="prompts per forward (default 1)")
    sp.add_argument("--strategies", type=_strategy_list, default=None,
                    help=f"comma-separated subset of {', '.join(STRATEGIES)} (default: all)")
    sp.add_argument("--references", type=_strategy_list, default=["eager", "compile", "hf_tp"],
                    help="comma-separated subset of eager,compile,hf_tp, or none (default: all three)")
    sp.add_argument("--runs", type=int, default=5, help="timed runs per measurement (default 5)")
    sp.add_argument("--warmup", type=int, default=1, help="untimed calls after the compiling one (default 1)")
    sp.add_argument("--lower", default="inductor", choices=list(LOWERINGS),
                    help="seqpar's lowering, and the one-device compile reference's backend (default inductor)")
    sp.add_argument("--outputs", default="replicate", choices=list(OUTPUTS),
                    help="seqpar's outputs option: replicate gathers the KV cache to every rank, local keeps each "
                         "rank's share (as hf_tp does) (default replicate)")
    sp.add_argument("--dtype", default="float32", choices=list(DTYPES),
                    help="model dtype (default float32)")
    sp.add_argument("--machine", default="auto",
                    help=f"cost-model profile for the predictions: {', '.join(profile_names())}, auto (the GPU's, "
                         f"else cpu-gloo, calibrated now when ~/.cache/seqpar has none) or none (default auto)")
    sp.add_argument("--generate", type=int, default=0, metavar="K",
                    help="time model.generate of K new tokens instead of one prefill: time to first token and "
                         "time per output token of every run (no predictions)")
    sp.add_argument("--out", default=None, help="directory for bench.json, bench.md, bench.png")
    sp.add_argument("--timeout", type=float, default=3600, help="seconds before the ranks are given up (default 3600)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=_cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``seqpar`` console script; returns the exit code (2 on a SeqparError)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SeqparError as e:
        print(f"seqpar {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
