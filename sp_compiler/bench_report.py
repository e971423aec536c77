"""``seqpar bench``'s output: rankings of the strategies, ``bench.md`` (a table), ``bench.png`` (a plot), ``bench.json``."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Sequence

from .errors import short_reason

__all__ = ["rankings", "kendall_tau", "format_table", "plot", "write_outputs", "format_generation_table",
           "OUTPUTS_NOTE", "load_text"]

log = logging.getLogger("seqpar")

OUTPUTS_NOTE = {"replicate": "every rank gets the whole KV cache; hf_tp keeps its cache split by heads",
                 "local": "each rank keeps its own rows or heads of the KV cache, as hf_tp does"}


def kendall_tau(a: Sequence[str], b: Sequence[str]) -> Optional[float]:
    """Kendall's tau between two orders of the same names: 1 same order, -1 reversed; None for < 2 names."""
    names = [n for n in a if n in b]
    if len(names) < 2:
        return None
    pos = {n: b.index(n) for n in names}
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    agree = sum(1 if pos[names[i]] < pos[names[j]] else -1 for i, j in pairs)
    return agree / len(pairs)


def rankings(result: dict) -> Dict[int, dict]:
    """Per sequence length: strategies fastest first as measured (median) and as predicted, over the
    strategies that both ran and were predicted; whether the fastest agrees; Kendall's tau."""
    out = {}
    for seq_len in result["meta"]["seq_lens"]:
        rows = [r for r in result["rows"] if r["seq_len"] == seq_len and r["kind"] == "strategy" and r["ok"]]
        both = [r for r in rows if r.get("predicted_ms") is not None]
        measured = [r["name"] for r in sorted(both, key=lambda r: r["median_ms"])]
        predicted = [r["name"] for r in sorted(both, key=lambda r: r["predicted_ms"])]
        out[seq_len] = {"measured": measured, "predicted": predicted,
                        "same_fastest": bool(measured) and measured[0] == predicted[0],
                        "kendall_tau": kendall_tau(measured, predicted)}
    return out


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.2f}"


def _cell(row: dict) -> list:
    """One table row, in :func:`format_table`'s column order."""

    pred = "" if row["kind"] != "strategy" else (
        f"{row['predicted_ms']:,.1f}" if row.get("predicted_ms") is not None
        else short_reason(row["predicted_error"], 40) if row.get("predicted_error") else "n/a")
    if not row["ok"]:
        return [row["seq_len"], row["name"], f"failed: {row['error'][:150]}", "", pred] + [""] * 6
    rank = "" if row.get("measured_rank") is None else f"{row['measured_rank']} / {row['predicted_rank']}"
    comm = _mib(row["bytes"]) if row["bytes"] is not None else "n/a (" + ", ".join(row["unknown_ops"]) + ")"
    compile_s = "" if row["compile_s"] is None else f"{row['compile_s']:.1f}"
    return [row["seq_len"], row["name"], f"{row['median_ms']:,.1f}", f"{row['min_ms']:,.1f}-{row['max_ms']:,.1f}",
            pred, rank, comm, row["collectives_text"], f"{row['max_abs_diff']:.1e}", compile_s,
            f"{max(row['peak_bytes_per_rank']) / 2**20:,.0f}"]


def load_text(meta: dict) -> str:
    load = meta.get("load_average")
    return "" if not load else (f"; 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after "
                                f"(on {meta.get('cpus')} CPUs)")


def format_table(result: dict) -> str:
    """bench.md: what was run, one markdown table row per (length, run), and the rankings per length."""
    from tabulate import tabulate

    if result["meta"].get("generate"):
        return format_generation_table(result)
    m, c = result["meta"], result["meta"]["config"]
    machine = m["machine"]
    pred = (f"predicted ms: the cost model on {machine['name']} ({machine['dtype']})" if machine
            else "predicted ms: none (--machine none)")
    mem = ("peak MiB / rank (max over ranks; allocated during the run)" if m["backend"] == "nccl"
           else "peak RSS MiB / rank (max over ranks; during the run)")
    head = (f"{c['model_type']}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
            f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads, vocab {c['vocab_size']}; "
            f"{m['dtype']}, batch {m['batch']}; {m['world']} ranks ({m['backend']}, {m['device']}, "
            f"{m['threads_per_rank']} thread(s) per rank); seqpar lower={m['lower']}, outputs={m['outputs']} "
            f"({OUTPUTS_NOTE[m['outputs']]}).\n"
            f"Timed: `{m['call']}`: median (and min-max) of {m['runs']} runs after the compiling call and "
            f"{m['warmup']} warm-up, each the slowest rank's time. eager, compile: one device (rank 0 alone). "
            f"compile s = first call - median call. MiB / forward: per rank, counted from the collectives that "
            f"ran. max abs diff: last-token logits against eager, over ranks. {pred}; rank: measured / predicted "
            f"among the strategies. The whole bench took {m['wall_s']:.0f} s{load_text(m)}.")
    headers = ["seq", "run", "median ms", "min-max ms", "predicted ms", "rank", "MiB / forward",
               "collectives / forward", "max abs diff", "compile s", mem]
    table = tabulate([_cell(r) for r in result["rows"]], headers=headers, tablefmt="github", disable_numparse=True)
    lines = [f"# seqpar bench: {m['model']}", "", head, "", table, ""]
    for seq_len, r in result["rankings"].items():
        tau = "" if r["kendall_tau"] is None else f", Kendall tau {r['kendall_tau']:+.2f}"
        lines.append(f"- S={seq_len}: measured {' < '.join(r['measured']) or 'n/a'}; predicted "
                     f"{' < '.join(r['predicted']) or 'n/a'}; same fastest: "
                     f"{'yes' if r['same_fastest'] else 'no'}{tau}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> str:
    """bench.png: median ms (bars: min-max) against sequence length, one line per run (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(r["name"] for r in result["rows"]))
    for name in names:
        rows = sorted((r for r in result["rows"] if r["name"] == name and r["ok"]), key=lambda r: r["seq_len"])
        if not rows:
            continue
        x = [r["seq_len"] for r in rows]
        y = [r["median_ms"] for r in rows]
        err = [[r["median_ms"] - r["min_ms"] for r in rows], [r["max_ms"] - r["median_ms"] for r in rows]]
        style = "--" if rows[0]["kind"] == "reference" else "-"
        ax.errorbar(x, y, yerr=err, fmt=style + "o", capsize=3, label=name)
    m = result["meta"]
    if len(m["seq_lens"]) > 1:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xticks(m["seq_lens"], [str(s) for s in m["seq_lens"]])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("time to first token, ms (median; bars min-max)" if m.get("generate")
                  else "prefill ms (median; bars min-max)")
    ax.set_title(f"{m['model']}, {m['config']['num_hidden_layers']} layers, {m['world']} ranks ({m['backend']}), "
                 f"{m['dtype']}, lower={m['lower']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: str) -> List[str]:
    """Write bench.json, bench.md and (when matplotlib is installed) bench.png into ``out_dir``; their paths."""
    import importlib.util

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.md")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths[1], "w") as f:
        f.write(format_table(result))
    if importlib.util.find_spec("matplotlib") is not None:
        paths.append(plot(result, os.path.join(out_dir, "bench.png")))
    else:
        log.warning("seqpar bench: matplotlib is not installed, no bench.png (pip install -e '.[bench]')")
    return paths


def _generation_cell(row: dict) -> list:
    if not row["ok"]:
        return [row["seq_len"], row["name"], f"failed: {row['error'][:150]}"] + [""] * 6
    mib = "n/a" if row["bytes"] is None else f"{row['bytes'] / 2**20:,.2f}"
    compile_s = "" if row["compile_s"] is None else f"{row['compile_s']:.1f}"
    return [row["seq_len"], row["name"], f"{row['ttft_ms']:,.1f} ({row['ttft_min_ms']:,.1f}-{row['ttft_max_ms']:,.1f})",
            f"{row['tpot_ms']:,.2f} ({row['tpot_min_ms']:,.2f}-{row['tpot_max_ms']:,.2f})",
            "yes" if row["tokens_same"] else "NO", mib, row["collectives_text"], compile_s,
            f"{max(row['peak_bytes_per_rank']) / 2**20:,.0f}"]


def format_generation_table(result: dict) -> str:
    """bench.md of ``--generate``: one markdown row per (length, run)."""
    from tabulate import tabulate

    m, c = result["meta"], result["meta"]["config"]
    mem = ("peak MiB / rank (allocated)" if m["backend"] == "nccl" else "peak RSS MiB / rank (during the run)")
    head = (f"{c['model_type']}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
            f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads, vocab {c['vocab_size']}; "
            f"{m['dtype']}, batch {m['batch']}; {m['world']} ranks ({m['backend']}, {m['device']}, "
            f"{m['threads_per_rank']} thread(s) per rank); seqpar lower={m['lower']}, outputs={m['outputs']} "
            f"({OUTPUTS_NOTE[m['outputs']]}).\n"
            f"Timed: `{m['call']}`: median (min-max) of {m['runs']} generations after the compiling one and "
            f"{m['warmup']} warm-up, each the slowest rank's. TTFT: prompt to first new token; ms / token: mean gap "
            f"between later tokens (the decode steps). eager, compile: one device (rank 0 alone). MiB / generation: "
            f"per rank, counted from the collectives that ran. The whole bench took {m['wall_s']:.0f} s"
            f"{load_text(m)}.")
    headers = ["seq", "run", "TTFT ms", "ms / token", "tokens = eager", "MiB / generation", "collectives / generation",
               "compile s", mem]
    table = tabulate([_generation_cell(r) for r in result["rows"]], headers=headers, tablefmt="github", disable_numparse=True)
    return "\n".join([f"# seqpar bench --generate {m['generate']}: {m['model']}", "", head, "", table, ""])
