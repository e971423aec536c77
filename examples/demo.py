"""seqpar demo: one small Llama generating text, split across CPU ranks, against one device.

Spawns ``--world-size`` gloo ranks on 127.0.0.1 with ``sp_compiler.testing.run_ranks``
(or runs in place under ``torchrun``). Every rank builds the same random-weight ``LlamaForCausalLM``;
rank 0 runs ``model.generate`` uncompiled on one device, the reference. Then, for each strategy in
:data:`STRATEGIES`, every rank compiles the model with
``model.compile(backend="seqpar", options={"strategy": s, "outputs": "local"})`` and generates from
the same prompt: the prefill runs split by the strategy, and every decode step runs on the KV cache
where the prefill left it. Rank 0 prints, per strategy, the time to the first token, the time per
later token, the largest difference of the first token's logits from one device, whether every rank
generated one device's tokens, and the collectives per layer of the prefill and of a decode step.

    python examples/demo.py
    python examples/demo.py --world-size 2 --seq-len 1024 --new-tokens 16 --strategies tp,ulysses
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import traceback
from collections import Counter, defaultdict
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["STRATEGIES", "build_demo_model", "main", "summarize_collectives"]

#: Strategies the demo compares, in table order.
STRATEGIES = ["tp", "megatron_sp", "megatron_sp_tp", "ulysses", "vanilla_sp", "vanilla_sp_zigzag"]

#: The demo model: small enough for a laptop CPU, big enough to time.
MODEL = dict(layers=2, hidden=256, heads=8, kv_heads=2, vocab=1024, intermediate=512)
SEED = 0
BATCH = 1


def build_demo_model(seq_len: int) -> torch.nn.Module:
    """Return the demo ``LlamaForCausalLM``: random weights from :data:`SEED`, fp32, eval, SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=MODEL["vocab"],
        hidden_size=MODEL["hidden"],
        intermediate_size=MODEL["intermediate"],
        num_hidden_layers=MODEL["layers"],
        num_attention_heads=MODEL["heads"],
        num_key_value_heads=MODEL["kv_heads"],
        max_position_embeddings=max(2048, seq_len),
        attn_implementation="sdpa",
        dtype=torch.float32,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).to(torch.float32).eval()


def _input_ids(seq_len: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, MODEL["vocab"], (BATCH, seq_len), generator=gen)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def summarize_collectives(report: list[dict] | None) -> str:
    """One entry per distinct per-layer pattern, e.g. ``"2 all_reduce (256.0 KiB) x2 layers"``.

    ``report`` is what ``sp_compiler.backend.last_report()`` returns: dicts with
    keys ``layer``, ``kind``, ``dim``, ``shape``, ``bytes``. Entries outside any
    layer (``layer`` empty) are listed under ``outside layers``.
    """
    if report is None:
        return "n/a"
    if not report:
        return "none"
    per_layer: dict[Any, list[dict]] = defaultdict(list)
    for entry in report:
        per_layer[entry.get("layer")].append(entry)

    def signature(entries: list[dict]) -> str:
        kinds = Counter(str(e.get("kind")) for e in entries)
        total = sum(float(e.get("bytes") or 0) for e in entries)
        body = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        return f"{body} ({_fmt_bytes(total)})"

    patterns: dict[str, int] = Counter()
    lines = []
    for layer, entries in per_layer.items():
        if layer in (None, ""):
            lines.append(f"outside layers: {signature(entries)}")
        else:
            patterns[signature(entries)] += 1
    lines = [f"{sig} x{n} layer{'s' if n > 1 else ''}" for sig, n in patterns.items()] + lines
    return "; ".join(lines)


def _generate(model, input_ids, new_tokens: int):
    """(tokens, first-token logits, ttft ms, tpot ms) of one greedy generation."""
    from sp_compiler.bench_generate import TokenClock

    clock = TokenClock()
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock, return_dict_in_generate=True, output_logits=True)
    ttft, tpot = clock.ttft_tpot_s()
    return out.sequences, out.logits[0], ttft * 1e3, tpot * 1e3


def _median_generation(model, input_ids, new_tokens: int, iters: int, sync: bool):
    """Tokens and first-token logits of the first generation (it compiles), then the median ttft and
    tpot of ``iters`` more; with ``sync`` each run's time is the slowest rank's."""
    tokens, logits, _, _ = _generate(model, input_ids, new_tokens)
    runs = []
    for _ in range(iters):
        if sync:
            dist.barrier()
        _, _, ttft, tpot = _generate(model, input_ids, new_tokens)
        t = torch.tensor([ttft, tpot], dtype=torch.float64)
        if sync:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        runs.append(t.tolist())
    return tokens, logits, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _prefill_and_decode_collectives() -> tuple:
    """Per-layer collectives of the last generation's prefill graph and of its decode graph."""
    from sp_compiler.backend import compiled_graphs

    graphs = compiled_graphs()
    prefill = next((g for g in reversed(graphs) if not g["kv"] and not g["short"]), None)
    decode = next((g for g in reversed(graphs) if g["short"]), None)
    return tuple(summarize_collectives(g["collectives"]) if g else "n/a" for g in (prefill, decode))


def _rank_main(args: argparse.Namespace) -> bool:
    """What every rank runs once the process group is up; ``True`` if every strategy ran."""
    from sp_compiler.testing import error_line

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_demo_model(args.seq_len + args.new_tokens)
    input_ids = _input_ids(args.seq_len)

    # Reference: the uncompiled model on one device (rank 0), shared with every rank.
    ref_tokens = torch.zeros(BATCH, args.seq_len + args.new_tokens, dtype=torch.long)
    ref_logits = torch.zeros(BATCH, MODEL["vocab"])
    rows: list[list[Any]] = []
    all_ok = True
    if rank == 0:
        ref_tokens, ref_logits, ttft, tpot = _median_generation(model, input_ids, args.new_tokens, args.iters,
                                                                sync=False)
        rows.append(["one device (uncompiled, 1 process)", f"{ttft:.1f}", f"{tpot:.1f}", "0", "-", "-", "-"])
    dist.broadcast(ref_tokens, src=0)
    dist.broadcast(ref_logits, src=0)

    for strategy in args.strategies:
        torch._dynamo.reset()
        model._compiled_call_impl = None                       # undo the previous strategy's model.compile
        status = "ok"
        try:
            model.compile(backend="seqpar", options={"strategy": strategy, "lower": args.lower, "outputs": "local"})
            tokens, logits, ttft, tpot = _median_generation(model, input_ids, args.new_tokens, args.iters, sync=True)
            err = torch.tensor([(logits - ref_logits).abs().max().item(), float(not torch.equal(tokens, ref_tokens))],
                               dtype=torch.float64)
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            prefill, decode = _prefill_and_decode_collectives()
            same = "yes, every rank" if err[1].item() == 0 else "NO"
            row = [strategy, f"{ttft:.1f}", f"{tpot:.1f}", f"{err[0].item():.1e}", same, prefill, decode]
        except Exception as exc:  # noqa: BLE001 - compile errors are the same on every rank
            status = f"failed: {error_line(exc)}"
            if args.verbose and rank == 0:
                traceback.print_exc()
        # Every rank must agree before the next strategy starts its collectives.
        failed = torch.tensor([0 if status == "ok" else 1])
        dist.all_reduce(failed)
        if status == "ok" and failed.item():
            status = "failed on another rank"
        all_ok = all_ok and not failed.item() and row[4] != "NO"
        rows.append(row if status == "ok" else [strategy, status[:120], "-", "-", "-", "-", "-"])
    model._compiled_call_impl = None

    if rank == 0:
        from tabulate import tabulate

        print(
            f"\nLlamaForCausalLM {MODEL['layers']} layers, hidden {MODEL['hidden']}, "
            f"{MODEL['heads']} heads / {MODEL['kv_heads']} kv heads, vocab {MODEL['vocab']}, fp32; "
            f"generate(batch {BATCH} x {args.seq_len}-token prompt, {args.new_tokens} new tokens, greedy); "
            f"{world} gloo ranks, 1 thread each, lower={args.lower}, outputs=local, median of {args.iters} runs\n"
        )
        print(
            tabulate(
                rows,
                headers=["strategy", "first token ms", "ms per later token", "first-token logits max |diff|",
                         "tokens = one device", "prefill collectives per layer", "decode step collectives per layer"],
                tablefmt="github",
                disable_numparse=True,
            )
        )
        sys.stdout.flush()
    return all_ok


def _launch(args: argparse.Namespace) -> int:
    """Spawn the ranks, wait at most ``args.timeout`` seconds, return an exit code."""
    from sp_compiler.testing import RankError, run_ranks

    try:
        ok = run_ranks(_rank_main, args.world_size, args, timeout=args.timeout)
    except RankError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    if not all(ok):
        print("demo: some strategies failed (see the table)", file=sys.stderr)
        return 1
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2, help="number of gloo ranks (default 2)")
    p.add_argument("--seq-len", type=int, default=2048, help="prompt length (default 2048)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    p.add_argument(
        "--strategies",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=list(STRATEGIES),
        help=f"comma-separated strategies (default {','.join(STRATEGIES)})",
    )
    p.add_argument("--lower", default="inductor", help="seqpar 'lower' option (default inductor)")
    p.add_argument("--iters", type=int, default=3, help="timed generations per strategy (default 3)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before giving up (default 1800)")
    p.add_argument("--verbose", action="store_true", help="print full tracebacks of failed strategies")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    args = _parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # launched by torchrun: this process is one rank
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
        try:
            ok = _rank_main(args)
        finally:
            dist.destroy_process_group()
        return 0 if ok else 1
    return _launch(args)


if __name__ == "__main__":
    sys.exit(main())
