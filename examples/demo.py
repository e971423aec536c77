"""seqpar demo: one small Llama, split across CPU ranks, against one device.

Spawns ``--world-size`` gloo ranks on 127.0.0.1 with ``sp_compiler.testing.run_ranks``
(or runs in place under ``torchrun``). Every rank builds the same random-weight ``LlamaForCausalLM``;
rank 0 computes the uncompiled single-device logits and times them, then each
strategy in :data:`STRATEGIES` is compiled with
``torch.compile(model, backend="seqpar", options={"strategy": s, "lower": "inductor"})``
and run on the same full input on every rank. Rank 0 prints a table of the
largest difference from one device (over all ranks), the median time per
forward and the collectives per layer that the backend reports.

    python examples/demo.py
    python examples/demo.py --world-size 2 --seq-len 1024 --strategies tp,ulysses
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
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


def _time_ms(fn, iters: int, *, sync: bool) -> float:
    """Median wall time of ``fn()`` in ms; with ``sync`` the slowest rank's time per run."""
    times = []
    for _ in range(iters):
        if sync:
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        if sync:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item() * 1e3)
    return statistics.median(times)


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


def _last_report() -> list[dict] | None:
    """The backend's collective report for the last compile, or ``None`` if it has none."""
    try:
        from sp_compiler import backend
    except ImportError:
        return None
    fn = getattr(backend, "last_report", None)
    if fn is None:
        return None
    try:
        report = fn()
    except Exception:  # noqa: BLE001 - a demo reports what it can
        return None
    return list(report) if report is not None else None


def _rank_main(args: argparse.Namespace) -> bool:
    """What every rank runs once the process group is up; ``True`` if every strategy ran."""
    from sp_compiler.testing import error_line

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_demo_model(args.seq_len)
    input_ids = _input_ids(args.seq_len)

    # Reference: the uncompiled model on one device (rank 0), shared with every rank.
    reference = torch.empty(BATCH, args.seq_len, MODEL["vocab"])
    rows: list[list[Any]] = []
    all_ok = True
    if rank == 0:
        with torch.no_grad():
            reference = model(input_ids, use_cache=False).logits

            def eager():
                model(input_ids, use_cache=False)

            eager_ms = _time_ms(eager, args.iters, sync=False)
        rows.append(["one device (uncompiled, 1 process)", "0", f"{eager_ms:.1f}", "-"])
    dist.broadcast(reference, src=0)

    for strategy in args.strategies:
        torch._dynamo.reset()
        status = "ok"
        diff = median_ms = float("nan")
        collectives = "n/a"
        try:
            fast = torch.compile(
                model, backend="seqpar", options={"strategy": strategy, "lower": args.lower}
            )
            with torch.no_grad():
                logits = fast(input_ids, use_cache=False).logits  # warm-up: compiles
                err = torch.tensor([(logits - reference).abs().max().item()], dtype=torch.float64)
                dist.all_reduce(err, op=dist.ReduceOp.MAX)
                diff = err.item()
                collectives = summarize_collectives(_last_report())

                def step():
                    fast(input_ids, use_cache=False)

                median_ms = _time_ms(step, args.iters, sync=True)
        except Exception as exc:  # noqa: BLE001 - compile errors are the same on every rank
            status = f"failed: {error_line(exc)}"
            if args.verbose and rank == 0:
                traceback.print_exc()
        # Every rank must agree before the next strategy starts its collectives.
        failed = torch.tensor([0 if status == "ok" else 1])
        dist.all_reduce(failed)
        if status == "ok" and failed.item():
            status = "failed on another rank"
        all_ok = all_ok and not failed.item()
        if status == "ok":
            rows.append([strategy, f"{diff:.2e}", f"{median_ms:.1f}", collectives])
        else:
            rows.append([strategy, status[:120], "-", "-"])

    if rank == 0:
        from tabulate import tabulate

        print(
            f"\nLlamaForCausalLM {MODEL['layers']} layers, hidden {MODEL['hidden']}, "
            f"{MODEL['heads']} heads / {MODEL['kv_heads']} kv heads, vocab {MODEL['vocab']}, "
            f"batch {BATCH} x seq {args.seq_len}, fp32; {world} gloo ranks, 1 thread each, "
            f"lower={args.lower}, median of {args.iters} runs\n"
        )
        print(
            tabulate(
                rows,
                headers=["strategy", "max abs diff vs one device", "median ms", "collectives per layer"],
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
    p.add_argument("--seq-len", type=int, default=512, help="sequence length (default 512)")
    p.add_argument(
        "--strategies",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=list(STRATEGIES),
        help=f"comma-separated strategies (default {','.join(STRATEGIES)})",
    )
    p.add_argument("--lower", default="inductor", help="seqpar 'lower' option (default inductor)")
    p.add_argument("--iters", type=int, default=5, help="timed runs per strategy (default 5)")
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
