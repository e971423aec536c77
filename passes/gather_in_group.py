"""gather_in_group: a two-level layout's outputs that tp left split by heads, gathered within the group.

A two-level layout (``options["tp_size"]``, ``sp_compiler.mesh``) runs the pipeline twice: ``tp``
inside each group of T ranks, then the strategy across the groups. The first run keeps its outputs
split by heads (a KV cache [B, Hkv/T, S, D]), so the second run sees them as plain tensors and makes
their rows whole across the groups. This pass, in the second run, then gathers the heads within the
group, where no dim is split across groups any more (no uneven rows inside a flattened tensor):

    output(k)            k: [B, Hkv/T, S, D] (whole S)   ->   output(all_gather(k, tp))   [B, Hkv, S, D]

One-level layouts (no ``ctx.inner``) pass through, and so do outputs="local" ones: their cache stays
split by heads within the group and by rows across the groups (``sp_compiler.kv``).
"""
from __future__ import annotations

import torch

from sp_compiler.collectives import Builder, all_gather
from sp_compiler.placements import fmt, is_shard

__all__ = ["gather_in_group"]


def gather_in_group(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    inner = ctx.inner
    if inner is None or ctx.options.outputs == "local":          # local: a cache stays split by heads
        return gm
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    leaves = torch.utils._pytree.tree_leaves(output.args[0])
    for x, (p, gshape) in zip(leaves, inner.outputs):
        if not is_shard(p) or not isinstance(x, torch.fx.Node):
            continue
        b = Builder(gm.graph, x, output, inner)
        (whole,) = all_gather(b, [(x, gshape, p)], _dtype(x), what=f"{x.name} {fmt(p)}->R in group")
        output.replace_input_with(x, whole)
    return gm


def _dtype(x: torch.fx.Node) -> torch.dtype:
    """The dtype of ``x``, read above the collectives inserted since the last shape propagation."""
    while "val" not in x.meta:
        x = x.all_input_nodes[0]
    return x.meta["val"].dtype
