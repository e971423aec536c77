"""prompt_length: a graph compiled for a bucket of prompt lengths counts rows from the real end.

A symbolic Dynamo graph is compiled once per bucket (``backend._Bucketed``): the prompt is padded
on the right to the bucket's length S_b, and the real length S arrives as one more input. Rows
counted from the end of the sequence must count from S, not S_b:

    before:  h[:, -k:]                              slice(h, 1, -k, end)       h: [B, S_b, H]
    after:   h[:, S - k + arange(k)]                index(h, [None, idx])      idx: [k]

    before:  h[:, idx]   (idx may hold -1)          index(h, [None, idx])
    after:   h[:, where(idx < 0, idx + S, idx)]

Both appear in ``logits_to_keep`` (an int, or a 1-D tensor). A dim counts as the sequence when its
size is S_b. Graphs compiled for their exact length skip this pass.
"""
from __future__ import annotations

import torch
from sp_compiler.rules import kept_rows, shape_of

from .annotate import token_input
from .lower import refresh_vals

aten = torch.ops.aten

__all__ = ["prompt_length"]


def prompt_length(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    if not ctx.real_len:
        return gm
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    token = token_input(gm)
    if token is None:                                   # annotate names the missing input_ids
        return gm
    padded_len = token.meta["val"].shape[1]
    with graph.inserting_after(placeholders[-1]):
        real = graph.placeholder("prompt_len")                               # [] int64: S
    ctx.example_inputs.append(torch.tensor(padded_len))
    ctx.input_fqns.append(None)
    if ctx.fakes is not None:
        ctx.fakes.append(None)
    for node in list(graph.nodes):
        kept = kept_rows(node) if node.op == "call_function" else None
        if kept is None or shape_of(kept[1])[kept[0]] != padded_len:
            continue
        dim, x = kept
        with graph.inserting_before(node):
            if node.target == aten.slice.Tensor:
                start = node.args[2] if len(node.args) > 2 else None
                if start is None or start >= 0:
                    continue                                                  # counted from the start
                k = shape_of(node)[dim]
                idx = graph.call_function(aten.add.Tensor, (
                    graph.call_function(aten.arange.default, (k,), {"dtype": torch.int64}),
                    graph.call_function(aten.sub.Scalar, (real, k))))
            else:
                old = node.args[1][dim]
                idx = graph.call_function(aten.where.self, (
                    graph.call_function(aten.lt.Scalar, (old, 0)),
                    graph.call_function(aten.add.Tensor, (old, real)), old))
            new = graph.call_function(aten.index.Tensor, (x, [None] * dim + [idx]))
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    refresh_vals(gm, ctx)                                # meta['val'] for the nodes this pass made
    return gm
