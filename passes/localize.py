"""localize: global sizes written into the graph -> this rank's sizes.

    view(x, [B, S, H, D])        x: S(1)    ->  view(x, [B, L_r, H, D])     L_r: rank r's rows
                                                                              (S/N when N divides S)
    expand(k, [B, Hkv, r, S, D]) k: S(1)    ->  expand(k, [B, Hkv/N, r, S, D])
    split(qkv, H, 2)             qkv: S(2, sf=3) split into its 3 blocks -> split(qkv, H/N, 2)

Views become reshapes: a collective may hand a tensor on in another memory layout
than the op that produced it originally (attention kernels return [B, S, H, D]-strided
outputs), and reshape is a view wherever the layout allows one.

Rows kept from a sequence-sharded tensor (``logits_to_keep``) become this rank's share of
them, a Partial (``collectives.gather_rows``):

    slice(x, 1, -1, end)         x: S(1)    ->  where(owned, index_select(x, 1, local row), 0)

Only ops whose output is sharded carry sizes to rewrite: tensors made from scratch
(arange, full, masks) stay whole (Replicate) and are sliced where a sharded tensor
meets them. Nodes added by ``insert`` are already local and are skipped.
"""
from __future__ import annotations

import torch

from sp_compiler.context import INSERTED, PLACEMENT
from sp_compiler.collectives import Builder, gather_rows
from sp_compiler.placements import is_partial, is_shard
from sp_compiler.rules import kept_rows

aten = torch.ops.aten

__all__ = ["localize"]

_SIZE_ARG = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default}


def localize(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    N = ctx.world
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.meta.get(INSERTED):
            continue
        p = node.meta.get(PLACEMENT)
        if is_partial(p) and kept_rows(node) is not None and is_shard(node.args[0].meta.get(PLACEMENT)):
            _keep_local_rows(gm, node, ctx)
            continue
        if node.target == aten.view.default:
            node.target = aten.reshape.default
        if node.target in _SIZE_ARG and is_shard(p):
            size = list(node.args[1])
            if size[p.dim] != -1:
                size[p.dim] = ctx.local_shape(size, p)[p.dim]
            node.args = (node.args[0], size, *node.args[2:])
        elif node.target == aten.split.Tensor:
            src_p = node.args[0].meta.get(PLACEMENT)
            dim = node.args[2] if len(node.args) > 2 else 0
            dim = dim % node.meta["val"][0].dim()
            if is_shard(src_p) and src_p.dim == dim:
                node.args = (node.args[0], node.args[1] // N, *node.args[2:])
    gm.recompile()
    return gm


def _keep_local_rows(gm, node, ctx):
    """x[:, a:b] / x[:, idx] of a sequence-sharded x -> this rank's share of those rows (a Partial)."""
    dim, x = kept_rows(node)
    shape = tuple(x.meta["val"].shape)
    k = node.meta["val"].shape[dim]
    b = Builder(gm.graph, after=node.prev, before=node, ctx=ctx)
    if node.target == aten.slice.Tensor:
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        start = max(0, start + shape[dim]) if start < 0 else min(start, shape[dim])
        idx = b(aten.arange.start_step, start, start + k * step, step, dtype=torch.int64)
    else:
        idx = node.args[1][dim]
    out = gather_rows(b, x, shape, dim, idx, k)
    out.meta[PLACEMENT] = node.meta[PLACEMENT]
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
