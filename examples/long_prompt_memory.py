"""Per-rank peak memory of one long prefill, beside one process running the uncompiled model.

Each run is a fresh set of processes (``sp_compiler.testing.run_ranks``), so peak RSS
(``ru_maxrss``) covers the imports, the model, the compile and the prefill. The model is a
2-layer Llama (hidden 64, 4 heads / 2 KV heads, vocab 512, fp32), called with
``use_cache=False, logits_to_keep=1``; ``packed`` passes position ids of three documents.

    python examples/long_prompt_memory.py --seq-lens 16384 --strategies ulysses,vanilla_sp
"""
from __future__ import annotations

import argparse
import resource

import torch

__all__ = ["main"]

MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, attn_implementation="sdpa")


def _rank_body(strategy, S, case, lower):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=S, **MODEL)).eval()
    kwargs = dict(use_cache=False, logits_to_keep=1)
    if case == "packed":
        kwargs["position_ids"] = torch.cat([torch.arange(n) for n in (S // 3, S // 3, S - 2 * (S // 3))])[None]
    fn = model if strategy == "one process" else torch.compile(
        model, backend="seqpar", options={"strategy": strategy, "lower": lower})
    with torch.no_grad():
        fn(torch.zeros(1, S, dtype=torch.long), **kwargs)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20          # GiB (ru_maxrss is KiB)


def main(argv=None) -> int:
    from tabulate import tabulate

    from sp_compiler.testing import run_ranks

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="16384")
    p.add_argument("--strategies", default="ulysses,vanilla_sp")
    p.add_argument("--cases", default="causal,packed")
    p.add_argument("--lower", default="aot_eager")
    p.add_argument("--world-size", type=int, default=2)
    args = p.parse_args(argv)
    rows = []
    for S in map(int, args.seq_lens.split(",")):
        for case in args.cases.split(","):
            one = run_ranks(_rank_body, 1, "one process", S, case, args.lower, timeout=3600)[0]
            row = [S, case, f"{one:.2f}"]
            for strategy in args.strategies.split(","):
                peaks = run_ranks(_rank_body, args.world_size, strategy, S, case, args.lower, timeout=3600)
                row.append(f"{max(peaks):.2f} ({max(peaks) / one:.2f}x)")
            rows.append(row)
            print(tabulate(rows, headers=["S", "case", "one process GiB"] + [f"{s}, max rank GiB"
                                                                             for s in args.strategies.split(",")]),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
