"""Per-rank peak memory of one long prefill beside one process running the uncompiled model,
and (``--exact``) max |diff| of the full logits against that process.

Each run is a fresh set of processes (``sp_compiler.testing.run_ranks``), so peak RSS
(``ru_maxrss``) covers the imports, the model, the compile and the prefill. The model is a
2-layer Llama (hidden 64, 4 heads / 2 KV heads, vocab 512, fp32). Cases:

    causal   one prompt of S tokens
    packed   one row of three documents (position ids restart at each)
    padded   two rows, left-padded by S/8 and S/4 tokens (2-D attention_mask)

Memory runs make a generation's prefill call (``use_cache=False, logits_to_keep=1``); exact runs
ask for every row's logits and compare the rows that are not padding.

    python examples/long_prompt_memory.py --seq-lens 8192,16384,32768,65536 --json mem.json
    python examples/long_prompt_memory.py --exact --seq-lens 16384 --cases causal,padded,packed

``--heads 32 --kv-heads 8`` gives the model Llama-3-8B's query/KV head ratio (head_dim 16), and
``--no-grouped-kv`` leaves HF's ``repeat_kv`` copy in the graph, to measure what ``passes/grouped_kv``
saves:

    python examples/long_prompt_memory.py --seq-lens 32768 --heads 32 --kv-heads 8 [--no-grouped-kv]

``--mmap-threshold 1048576`` fixes glibc's mmap threshold (it otherwise rises with each freed
large block, and the heap then fragments under masked attention's per-block temporaries).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

__all__ = ["main", "case_inputs"]

MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, attn_implementation="sdpa")
ALL = "ulysses,vanilla_sp,vanilla_sp_zigzag,tp,megatron_sp,megatron_sp_tp"


def case_inputs(case: str, S: int) -> dict:
    """``input_ids`` and the mask or positions of one case (the same on every rank)."""
    g = torch.Generator().manual_seed(1)
    if case == "padded":
        mask = torch.ones(2, S, dtype=torch.long)
        mask[0, : S // 8] = 0
        mask[1, : S // 4] = 0
        return dict(input_ids=torch.randint(0, MODEL["vocab_size"], (2, S), generator=g), attention_mask=mask)
    kwargs = dict(input_ids=torch.randint(0, MODEL["vocab_size"], (1, S), generator=g))
    if case == "packed":
        kwargs["position_ids"] = torch.cat([torch.arange(n) for n in (S // 3, S // 3, S - 2 * (S // 3))])[None]
    return kwargs


def _rank_body(strategy, S, case, lower, exact, model_args=None, grouped_kv=True, tp_size=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    if not grouped_kv:                           # the A/B of --no-grouped-kv: K/V expanded as HF does
        import passes

        passes.PIPELINE.remove(passes.grouped_kv)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=S, **(model_args or MODEL))).eval()
    fn = model if strategy == "one process" else torch.compile(
        model, backend="seqpar", options={"strategy": strategy, "lower": lower, "tp_size": tp_size})
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(**case_inputs(case, S), use_cache=False, logits_to_keep=0 if exact else 1)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20          # GiB (ru_maxrss is KiB)
    return dict(peak_gib=peak, seconds=seconds, logits=out.logits if exact else None)


def _max_diff(a, b, case, S):
    keep = case_inputs(case, S).get("attention_mask", torch.ones(a.shape[:2])).bool()
    return (a[keep] - b[keep]).abs().max().item()


def main(argv=None) -> int:
    from tabulate import tabulate

    from sp_compiler.testing import RankError, run_ranks

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="16384")
    p.add_argument("--strategies", default=ALL)
    p.add_argument("--cases", default="causal,packed")
    p.add_argument("--lower", default="aot_eager")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--tp-size", type=int, default=1, help="two-level layouts: tp inside groups of this many ranks")
    p.add_argument("--exact", action="store_true", help="full logits, max |diff| against one process")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--heads", type=int, default=MODEL["num_attention_heads"])
    p.add_argument("--kv-heads", type=int, default=MODEL["num_key_value_heads"])
    p.add_argument("--head-dim", type=int, default=MODEL["hidden_size"] // MODEL["num_attention_heads"])
    p.add_argument("--no-grouped-kv", action="store_true",
                   help="leave HF's repeat_kv copy of K/V in the graph (to measure what passes/grouped_kv saves)")
    p.add_argument("--mmap-threshold", type=int, default=None,
                   help="glibc MALLOC_MMAP_THRESHOLD_ (bytes) for every run, one process included")
    args = p.parse_args(argv)
    if args.mmap_threshold is not None:            # read by glibc when each spawned process starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    strategies = args.strategies.split(",")
    hidden = args.heads * args.head_dim
    model_args = dict(MODEL, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, hidden_size=hidden,
                      intermediate_size=2 * hidden)
    rows, records = [], []
    for S in map(int, args.seq_lens.split(",")):
        for case in args.cases.split(","):
            try:
                one = run_ranks(_rank_body, 1, "one process", S, case, args.lower, args.exact, model_args,
                                timeout=7200)[0]
            except RankError as e:            # e.g. killed for memory: the S x S mask of a long packed prompt
                print(f"one process, S={S}, {case}: {str(e).splitlines()[0]}", flush=True)
                one = dict(peak_gib=float("nan"), seconds=float("nan"), logits=None, failed=True)
            row = [S, case, "failed" if one.get("failed") else f"{one['peak_gib']:.2f}"]
            records.append(dict(S=S, case=case, strategy="one process", peak_gib=one["peak_gib"],
                                seconds=one["seconds"], failed=bool(one.get("failed"))))
            for strategy in strategies:
                res = run_ranks(_rank_body, args.world_size, strategy, S, case, args.lower, args.exact,
                                model_args, not args.no_grouped_kv, args.tp_size, timeout=7200)
                peak = max(r["peak_gib"] for r in res)
                rec = dict(S=S, case=case, strategy=strategy, lower=args.lower, world=args.world_size,
                           tp_size=args.tp_size,
                           heads=args.heads, kv_heads=args.kv_heads, grouped_kv=not args.no_grouped_kv,
                           peak_gib=peak, ratio=peak / one["peak_gib"], seconds=max(r["seconds"] for r in res))
                if args.exact and one["logits"] is not None:
                    rec["max_diff"] = max(_max_diff(r["logits"], one["logits"], case, S) for r in res)
                    row.append(f"{rec['max_diff']:.1e}")
                else:
                    row.append(f"{peak:.2f} ({rec['ratio']:.2f}x)")
                records.append(rec)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(records, f, indent=1)
            rows.append(row)
            what = "max |diff|" if args.exact else "max rank GiB"
            print(tabulate(rows, headers=["S", "case", "one process GiB"] + [f"{s}, {what}" for s in strategies],
                           disable_numparse=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
