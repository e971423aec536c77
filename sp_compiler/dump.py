"""``dump_dir``: the graph before and after, each node's placement inline, and the collectives.

    dump_dir/rank{R}/graph{K}/before.txt        ATen graph as captured, with propagated placements
    dump_dir/rank{R}/graph{K}/after.txt         transformed local graph, local shapes
    dump_dir/rank{R}/graph{K}/collectives.txt   one row per collective + a per-layer summary
    dump_dir/rank{R}/graph{K}/collectives.json
    dump_dir/rank{R}/graph{K}/attention_work.txt    vanilla SP: causal score entries per rank
    dump_dir/rank{R}/graph{K}/outputs.txt       where each output lives on this rank (``outputs="local"``)
    dump_dir/rank{R}/graph{K}/memory.txt        the largest tensors this rank's graph makes
"""
from __future__ import annotations

import itertools
import json
import os
from collections import Counter

import torch
from tabulate import tabulate

from .context import PLACEMENT
from .errors import module_path
from .placements import fmt, is_shard, size_hint, split_factor

__all__ = ["format_graph", "collective_table", "layer_summary", "attention_work_table", "layout_of", "layout_table",
           "largest_intermediates", "memory_table",
           "GraphDumper"]

_counter = itertools.count()


def _short(x):
    if isinstance(x, torch.fx.Node):
        return "%" + x.name
    if isinstance(x, (list, tuple)):
        inner = ", ".join(_short(a) for a in x)
        return f"[{inner}]"
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return repr(x)


def _val(n):
    v = n.meta.get("val")
    if isinstance(v, torch.Tensor):
        return f"{list(v.shape)} {str(v.dtype).replace('torch.', '')}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(str(list(t.shape)) for t in v if isinstance(t, torch.Tensor)) + ")"
    return ""


def format_graph(gm: torch.fx.GraphModule) -> str:
    """One line per node: ``%name = op(args)    # placement  shape  module``."""
    lines = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            code = f"%{n.name} = input"
        elif n.op == "output":
            code = f"return {_short(n.args[0])}"
        elif n.op == "get_attr":
            code = f"%{n.name} = self.{n.target}"
        else:
            args = [_short(a) for a in n.args] + [f"{k}={_short(v)}" for k, v in n.kwargs.items()]
            target = getattr(n.target, "__name__", str(n.target))
            if hasattr(n.target, "_schema"):
                target = str(n.target).replace("aten.", "").replace("_c10d_functional.", "c10d.")
            code = f"%{n.name} = {target}({', '.join(args)})"
        note = f"{fmt(n.meta.get(PLACEMENT)):<12} {_val(n):<28} {module_path(n) if n.op == 'call_function' else ''}"
        lines.append(f"{code:<90} # {note}".rstrip())
    return "\n".join(lines) + "\n"


def collective_table(rows) -> str:
    """One line per collective; a two-level layout's rows also say their mesh dimension (tp or sp)."""
    cols = ["layer", *(["mesh"] if any("mesh" in r for r in rows) else []), "kind", "dim", "shape", "dtype", "bytes",
            "what"]
    return tabulate([[r.get(c, "") for c in cols] for r in rows], headers=cols, intfmt=",") + "\n"


def layer_summary(rows) -> str:
    per_layer = {}
    for r in rows:
        per_layer.setdefault(r["layer"], Counter())[r["kind"]] += 1
    bytes_per_layer = Counter()
    for r in rows:
        bytes_per_layer[r["layer"]] += r["bytes"]
    table = [[layer, ", ".join(f"{n} {k}" for k, n in sorted(c.items())), bytes_per_layer[layer]]
             for layer, c in per_layer.items()]
    return tabulate(table, headers=["layer", "collectives", "bytes"], intfmt=",") + "\n"


def attention_work_table(work) -> str:
    """Per rank: unmasked causal score entries (per batch row and head), and the ratio to the mean."""
    per_rank = work.get("per_rank")
    if not per_rank:
        return f"attention: {work['kind']}: every rank computes its rows against all keys\n"
    mean = sum(per_rank) / len(per_rank)
    table = [[r, w, f"{w / mean:.3f}"] for r, w in enumerate(per_rank)]
    return (f"attention: {work['kind']}\n" + tabulate(table, headers=["rank", "score entries", "/ mean"], intfmt=",")
            + f"\nmax / mean = {max(per_rank) / mean:.3f}\n")


_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.t.default,
          torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.expand.default,
          torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims,
          torch.ops.aten.slice.Tensor, torch.ops.aten.alias.default, torch.ops.aten.select.int}


def largest_intermediates(gm: torch.fx.GraphModule, k: int = 5) -> list:
    """The ``k`` largest tensors this rank's local graph makes (weights and inputs left out):
    (node, shape, dtype, bytes, module), largest first. What grows with the prompt shows here."""
    rows = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target in _VIEWS:            # views share their input's memory
            continue
        vals = n.meta.get("val")
        for v in vals if isinstance(vals, (tuple, list)) else [vals]:
            if isinstance(v, torch.Tensor):
                rows.append((n.name, _sizes(v.shape), str(v.dtype).replace("torch.", ""),
                             size_hint(v.numel()) * v.element_size(), module_path(n)))
    return sorted(rows, key=lambda r: -r[3])[:k]


def memory_table(gm: torch.fx.GraphModule) -> str:
    return "largest intermediates on this rank:\n" + tabulate(
        largest_intermediates(gm), headers=["node", "shape", "dtype", "bytes", "module"], intfmt=",") + "\n"


def layout_of(ctx) -> list:
    """Per graph output: its placement on this rank and, when sharded, the global rows this rank holds
    (``[start, length]`` per chunk; two chunks, r and 2N-1-r, under zig-zag)."""
    rows = []
    for i, (p, gshape) in enumerate(ctx.outputs):
        if p is None:
            rows.append({"output": i, "placement": "-"})
            continue
        row = {"output": i, "placement": fmt(p), "global_shape": _sizes(gshape),
               "local_shape": _sizes(ctx.local_shape(gshape, p))}
        if is_shard(p):
            lay = ctx.layout(gshape[p.dim] // split_factor(p))
            row.update(dim=p.dim, layout="zig-zag" if lay.zigzag else "contiguous",
                       rows=[list(span) for span in lay.spans(ctx.rank)])
        rows.append(row)
    return rows


def _sizes(shape) -> list:
    """Sizes as ints, a symbolic one (a KV cache's length in a decode graph) as its expression ('s0 + 1')."""
    return [d if isinstance(d, int) else str(d) for d in shape]


def layout_table(layout) -> str:
    cols = ["output", "placement", "global_shape", "local_shape", "dim", "layout", "rows"]
    return tabulate([[r.get(c, "") for c in cols] for r in layout], headers=cols) + "\n"


class GraphDumper:
    """Writes one compiled graph's files; ``None`` dump_dir makes every call a no-op."""

    def __init__(self, dump_dir, rank: int):
        self.dir = None
        if dump_dir:
            self.dir = os.path.join(dump_dir, f"rank{rank}", f"graph{next(_counter)}")
            os.makedirs(self.dir, exist_ok=True)

    def write(self, name: str, text: str):
        if self.dir:
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(text)

    def on_pass(self, pass_name, gm):
        if not self.dir:
            return
        if pass_name == "propagate":
            self.write("before.txt", format_graph(gm))
        elif pass_name == "check_local_shapes":
            self.write("after.txt", format_graph(gm))
            self.write("memory.txt", memory_table(gm))

    def attention_work(self, work):
        if work is not None:
            self.write("attention_work.txt", attention_work_table(work))

    def collectives(self, rows, header=""):
        self.write("collectives.txt", header + collective_table(rows) + "\nper layer:\n" + layer_summary(rows))
        self.write("collectives.json", json.dumps(rows, indent=1, default=str))
