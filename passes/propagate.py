"""propagate: every node gets a placement from the rule table (``sp_compiler.rules``).

Rules also say which inputs they want placed differently. Such a want is moved up
through layout-only ops (views, transposes, expand, clone) while they have a single
user, so the collective lands where the tensor is smallest and is shared by all users:

    k: [B,Hkv,S/N,D] -> unsqueeze -> expand -> clone -> view [B,H,S/N,D] -> attention(wants S(1))
    becomes all_to_all on k itself, on the model's Hkv heads (HuggingFace's repeat_kv runs after it).

The wants left are recorded in ``ctx.pending`` for ``insert``.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from sp_compiler.context import PLACEMENT, Demand
from sp_compiler.errors import module_path
from sp_compiler.strategies import layer_path
from sp_compiler.placements import Replicate, is_partial, is_rank_local, is_shard
from sp_compiler.rules import TRANSPARENT, map_through, rule_for, shape_of

__all__ = ["propagate", "placement_of"]


def placement_of(n):
    return n.meta.get(PLACEMENT) if isinstance(n, Node) else None


def propagate(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            node.meta[PLACEMENT] = Replicate()
        elif node.op == "call_function":
            val = node.meta.get("val")
            if not isinstance(val, (torch.Tensor, tuple, list)):
                node.meta[PLACEMENT] = None                       # sizes, scalars
                continue
            entry = _layer_entry(node, ctx)
            P = (lambda n: entry.get(n, placement_of(n))) if entry else placement_of
            decision = rule_for(node)(node, ctx, P)
            node.meta[PLACEMENT] = decision.out
            for src, want in {**entry, **decision.wants}.items():
                _want(ctx, node, src, want, decision.group)
        elif node.op == "output":
            ctx.outputs = []
            for out in torch.utils._pytree.tree_leaves(node.args[0]):
                if isinstance(out, Node) and shape_of(out) is not None:
                    want = _output_placement(placement_of(out), ctx)
                    _want(ctx, node, out, want, None)
                    ctx.outputs.append((want, shape_of(out)))
                else:
                    ctx.outputs.append((None, None))
    return gm


def _output_placement(p, ctx):
    """outputs='replicate': every rank returns the whole result. outputs='local': a sharded output
    stays where it was computed (``backend.output_layout`` says which rows each rank holds); only a
    partial sum is completed. A KV cache kept split by sequence stays so (passes/kv_attention returns
    its new rows instead)."""
    if (ctx.options.outputs == "local" and is_shard(p)) or is_rank_local(p):
        return p
    return Replicate()


def _layer_entry(node, ctx) -> dict:
    """With per-layer strategies: the residual stream [B, S, H] entering a layer from outside it
    is placed as that layer's strategy says (a slice, a gather, or nothing when they agree)."""
    if not ctx.options.layers:
        return {}
    layer = layer_path(module_path(node))
    if layer is None:
        return {}
    want = ctx.strategy_at(layer).residual
    entry = {}
    for x in node.all_input_nodes:
        s = shape_of(x)
        if s is not None and len(s) == 3 and s[:2] == (ctx.batch, ctx.seq_len) and x.op == "call_function" \
                and layer_path(module_path(x)) != layer and placement_of(x) != want:
            entry[x] = want
    return entry


def _want(ctx, user: Node, src: Node, want, group):
    while placement_of(src) != want and _hoistable(src):
        inner = map_through(src, want, forward=False, world=ctx.world)
        if inner is None:
            break
        ctx.pending.pop((src, src.args[0]), None)                    # superseded
        src.meta[PLACEMENT] = want
        user, src, want = src, src.args[0], inner
    ctx.pending.pop((user, src), None)
    if placement_of(src) != want:
        ctx.pending[(user, src)] = Demand(user, src, want, group)


def _hoistable(n: Node) -> bool:
    return (n.op == "call_function" and n.target in TRANSPARENT and len(n.users) == 1
            and not is_partial(placement_of(n.args[0])))
