"""localize: global sizes written into the graph -> this rank's sizes.

    view(x, [B, S, H, D])        x: S(1)    ->  view(x, [B, S/N, H, D])
    expand(k, [B, Hkv, r, S, D]) k: S(1)    ->  expand(k, [B, Hkv/N, r, S, D])
    split(qkv, H, 2)             qkv: S(2, sf=3) split into its 3 blocks -> split(qkv, H/N, 2)

Views become reshapes: a collective may hand a tensor on in another memory layout
than the op that produced it originally (attention kernels return [B, S, H, D]-strided
outputs), and reshape is a view wherever the layout allows one.

Only ops whose output is sharded carry sizes to rewrite: tensors made from scratch
(arange, full, masks) stay whole (Replicate) and are sliced where a sharded tensor
meets them. Nodes added by ``insert`` are already local and are skipped.
"""
from __future__ import annotations

import torch

from sp_compiler.context import INSERTED, PLACEMENT
from sp_compiler.placements import is_shard

aten = torch.ops.aten

__all__ = ["localize"]

_SIZE_ARG = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default}


def localize(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    N = ctx.world
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get(INSERTED):
            continue
        p = node.meta.get(PLACEMENT)
        if node.target == aten.view.default:
            node.target = aten.reshape.default
        if node.target in _SIZE_ARG and is_shard(p):
            size = list(node.args[1])
            if size[p.dim] != -1:
                size[p.dim] //= N
            node.args = (node.args[0], size, *node.args[2:])
        elif node.target == aten.split.Tensor:
            src_p = node.args[0].meta.get(PLACEMENT)
            dim = node.args[2] if len(node.args) > 2 else 0
            dim = dim % node.meta["val"][0].dim()
            if is_shard(src_p) and src_p.dim == dim:
                node.args = (node.args[0], node.args[1] // N, *node.args[2:])
    gm.recompile()
    return gm
