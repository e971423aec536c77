"""First-call seconds of a compiled Llama: cold (Inductor's caches off) and warm (a second process).

Every cell is a fresh process with one thread: build a Llama (hidden 256) with random weights, compile
it, time its first call (Dynamo, seqpar's capture and passes, lowering, the run). seqpar runs as rank
0 of a fake process group of ``--world-size``; plain ``torch.compile`` runs in one process.

    python examples/cold_start.py --layers 4,32

Rows: plain torch.compile, cold and warm; seqpar with ``regional="none"`` (the whole graph lowered at
once); seqpar (one lowering per distinct decoder layer, passes/regions.py); seqpar warm: a second process
with the same model and options, after a first one filled an empty cache directory (Inductor's caches
and seqpar's graph cache, sp_compiler/graph_cache.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

__all__ = ["main", "first_call"]


def first_call(layers: int, mode: str, world: int, strategy: str) -> dict:
    """{"seconds": first call, "lower": seconds in seqpar's lowering, "lowered": graphs lowered} in this process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import sp_compiler.backend as backend
    from sp_compiler import graph_cache
    from sp_compiler.testing import fake_process_group

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=layers, vocab_size=1000)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 64))
    t0 = time.perf_counter()
    with torch.no_grad():
        if mode == "plain":
            model.compile()
            model(ids)
            return {"seconds": time.perf_counter() - t0}
        with fake_process_group(world, 0):
            model.compile(backend="seqpar", options={"strategy": strategy, "regional": "none" if mode == "whole" else "prefill"})
            model(ids)
    seconds = time.perf_counter() - t0
    regions = backend.compiled_graphs()[-1]["regions"]
    return {"seconds": seconds, "lowered": regions.get("lowered", 1), "cached": graph_cache.hits()}


def _cell(layers, mode, world, strategy, cache_dir=None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if cache_dir is None:
        env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    else:
        env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    cmd = [sys.executable, __file__, "--one", json.dumps([layers, mode, world, strategy])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="4,32")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--strategy", default="ulysses")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(first_call(*json.loads(args.one))))
        return 0

    from tabulate import tabulate

    depths = [int(x) for x in args.layers.split(",")]
    rows = {"plain torch.compile (one process)": [], "plain torch.compile warm (second process)": [],
            "seqpar, regional=none": [], "seqpar (regional)": [], "seqpar warm (second process)": []}
    for layers in depths:
        cell = lambda mode, cache=None: _cell(layers, mode, args.world_size, args.strategy, cache)  # noqa: E731
        rows["plain torch.compile (one process)"].append(f"{cell('plain')['seconds']:.1f}")
        with tempfile.TemporaryDirectory() as cache:
            filled, warm = cell("plain", cache), cell("plain", cache)
        rows["plain torch.compile warm (second process)"].append(
            f"{warm['seconds']:.1f} ({warm['seconds'] / filled['seconds']:.0%} of its cold {filled['seconds']:.1f})")
        rows["seqpar, regional=none"].append(f"{cell('whole')['seconds']:.1f}")
        cold = cell("regional")
        rows["seqpar (regional)"].append(f"{cold['seconds']:.1f} ({cold['lowered']} lowered)")
        with tempfile.TemporaryDirectory() as cache:
            filled = cell("regional", cache)
            warm = cell("regional", cache)
        assert warm["cached"] == 1, "the second process did not take seqpar's graph from its cache"
        rows["seqpar warm (second process)"].append(
            f"{warm['seconds']:.1f} ({warm['seconds'] / filled['seconds']:.0%} of its cold {filled['seconds']:.1f}, "
            f"{warm['seconds'] / cold['seconds']:.0%} of the caches-off one)")
        print(f"{layers} layers done", file=sys.stderr, flush=True)
    print(f"first call, seconds: Llama hidden 256, 64 tokens, {args.strategy} on rank 0 of a fake group of "
          f"{args.world_size}, one thread, Inductor\n")
    print(tabulate([[name, *cells] for name, cells in rows.items()],
                   headers=["", *(f"{n} layers" for n in depths)], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
