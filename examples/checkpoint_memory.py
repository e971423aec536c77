"""Per-rank memory when each rank reads only its slices of a checkpoint (``sp_compiler.from_pretrained``).

    python examples/checkpoint_memory.py [--hidden 768 --layers 16 --vocab 32000] [--runs tp:2 tp:4 ulysses:2]

Saves a random Llama of about 150M parameters (float32) with ``save_pretrained``, then measures:

    one process     AutoModelForCausalLM.from_pretrained(dir), one forward       the whole model
    each run        sp_compiler.from_pretrained(dir, strategy=...) on N gloo ranks, one forward
                    (HF's default call, 64 tokens, aot_eager)

and prints per rank: the weights it holds (parameters and buffers, from the compile), and its peak
RSS (``ru_maxrss``) minus its RSS after importing torch and transformers, beside the one process.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TOKENS = 64


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ids(vocab):
    return torch.randint(0, vocab, (1, TOKENS), generator=torch.Generator().manual_seed(0))


def _one_process(path, vocab):
    import transformers  # noqa: F401 - counted in the baseline

    base = _rss_mib()
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model(_ids(vocab))
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return [(held, _peak_mib() - base)]


def _rank(path, strategy, vocab):
    import transformers  # noqa: F401

    import sp_compiler
    from sp_compiler.backend import last_graph

    torch.set_num_threads(1)
    base = _rss_mib()
    model = sp_compiler.from_pretrained(path, strategy=strategy, lower="aot_eager")
    with torch.no_grad():
        model(_ids(vocab))
    return last_graph()[1].weight_bytes()[0], _peak_mib() - base


def main() -> None:
    from tabulate import tabulate
    from transformers import LlamaConfig, LlamaForCausalLM

    from sp_compiler.testing import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--runs", nargs="+", default=["tp:2", "tp:4", "ulysses:2"], help="strategy:ranks")
    args = ap.parse_args()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64 // 3, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as path:
        model = LlamaForCausalLM(config)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(path)
        del model
        rows = []
        one = run_ranks(_one_process, 1, path, args.vocab, timeout=1800)[0][0]
        rows.append(["one process (from_pretrained)", 0, f"{one[0] / 2**20:,.0f}", f"{one[1]:,.0f}", "1.00"])
        for run in args.runs:
            strategy, world = run.split(":")
            for rank, (held, peak) in enumerate(run_ranks(_rank, int(world), path, strategy, args.vocab,
                                                          timeout=1800)):
                rows.append([f"{strategy}, {world} ranks", rank, f"{held / 2**20:,.0f}", f"{peak:,.0f}",
                             f"{peak / one[1]:.2f}"])
    print(f"Llama, {params / 1e6:.0f}M parameters (float32, {params * 4 / 2**20:,.0f} MiB), "
          f"one forward of {TOKENS} tokens\n")
    print(tabulate(rows, headers=["run", "rank", "weights held MiB", "peak RSS over imports MiB", "÷ one process"],
                   tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
