"""propagate: every node gets a placement from the rule table (``sp_compiler.rules``).

Rules also say which inputs they want placed differently. Such a want is moved up
through layout-only ops (views, transposes, expand, clone) while they have a single
user, so the collective lands where the tensor is smallest and is shared by all users:

    k: [B,Hkv,S/N,D] -> unsqueeze -> expand -> clone -> view [B,H,S/N,D] -> attention(wants S(1))
    becomes all_to_all on k itself, on the model's Hkv heads (HuggingFace's repeat_kv runs after it).

The wants left are recorded in ``ctx.pending`` for ``insert``.

Inside a mixture-of-experts block entered on each rank's own tokens, ``rules.token_local_rule``
replaces the table (the block runs on local tokens, no collective); a tensor the block makes at a
token size is made at the local one instead of being sliced. A block whose experts the layer's
strategy slices (tp, megatron_sp) runs on all the tokens instead, as transformers' TP runs it:

    x: S(1) [B, S, H] -> all_gather -> router, top-k, experts [E, 2I/N, H] -> [E, H, I/N] -> P
                      -> reduce_scatter -> S(1)           (tp: x is whole already; one all_reduce)
"""
from __future__ import annotations

import logging

import torch
from torch.fx import Node

from sp_compiler.context import PLACEMENT, Demand, block_of
from sp_compiler.errors import ShardingError, module_path
from sp_compiler.strategies import layer_path
from sp_compiler.placements import Replicate, is_partial, is_rank_local, is_shard, is_token_local
from sp_compiler.rules import (MADE, TRANSPARENT, UNIFORM, map_through, rule_for, shape_of, token_blocks,
                               token_local_rule)

__all__ = ["propagate", "placement_of"]

aten = torch.ops.aten
log = logging.getLogger("seqpar")


def placement_of(n):
    return n.meta.get(PLACEMENT) if isinstance(n, Node) else None


def propagate(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    blocks = token_blocks({module_path(n) for n in gm.graph.nodes if n.op == "call_function"})
    ctx.sliced_blocks = frozenset(b for b in blocks if ctx.strategy_at(layer_path(b)).mlp_weights == "tp")
    ctx.token_blocks = blocks - ctx.sliced_blocks
    whole = ctx.sliced_blocks | _recurrent_blocks(gm, ctx)
    region = ctx.latent_region
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            node.meta[PLACEMENT] = Replicate()
        elif node.op == "call_function":
            val = node.meta.get("val")
            if not isinstance(val, (torch.Tensor, tuple, list)):
                node.meta[PLACEMENT] = None                       # sizes, scalars
                continue
            latent = _whole_entry(node, region.get)
            entry = {**_layer_entry(node, ctx), **_whole_entry(node, lambda n: block_of(n, whole)),
                     **latent}
            P = (lambda n: entry.get(n, placement_of(n))) if entry else placement_of
            in_block = ctx.in_token_block(node)
            if not in_block:
                _no_token_leak(node)
            decision = (token_local_rule if in_block else rule_for(node))(node, ctx, P)
            node.meta[PLACEMENT] = decision.out
            for src, want in {**entry, **decision.wants}.items():
                _want(ctx, node, src, want, region[node] if src in latent else decision.group)
        elif node.op == "output":
            _no_token_leak(node)
            ctx.outputs = []
            for i, out in enumerate(torch.utils._pytree.tree_leaves(node.args[0])):
                if isinstance(out, Node) and shape_of(out) is not None:
                    want = Replicate() if i in ctx.whole_outputs else _output_placement(placement_of(out), out, ctx)
                    _want(ctx, node, out, want, None)
                    ctx.outputs.append((want, shape_of(out)))
                else:
                    ctx.outputs.append((None, None))
    _warn_whole_scores(gm, ctx)
    return gm


def _warn_whole_scores(gm, ctx):
    """Attention seqpar does not recognise (eager ops ``passes/eager_attention`` cannot match: GPT-2's,
    which divides by a tensor) in a sequence layout gets q, k and v gathered and runs whole on every
    rank: correct, not parallel. Say so, once per compile:
    a softmax over keys, [.., S, >= S] scores, left whole in a layer whose strategy splits the sequence."""
    layers = sorted({layer_path(module_path(n)) for n in gm.graph.nodes
                     if n.op == "call_function" and n.target == aten._softmax.default
                     and ctx.seq_len > 1 and len(shape_of(n)) >= 3 and shape_of(n)[-2] == ctx.seq_len
                     and shape_of(n)[-1] >= ctx.seq_len and isinstance(placement_of(n), Replicate)
                     and ctx.strategy_for(n).seq_sharded} - {None})
    if layers:
        log.warning("seqpar: attention in %s is not one seqpar recognises (eager ops it cannot match); "
                    "every rank gathers q, k and v and computes all of its [S, S] scores: exact, not parallel. "
                    "Fix: load the model with attn_implementation='sdpa' if it supports it", ", ".join(layers))


def _output_placement(p, out, ctx):
    """outputs='replicate': every rank returns the whole result. outputs='local': a sharded output
    stays where it was computed (``backend.output_layout`` says which rows each rank holds); only a
    partial sum, and logits split by vocabulary (a vocab-parallel lm_head: a shard of the last dim),
    are completed. A KV cache kept split by sequence stays so (passes/kv_attention returns its new
    rows instead); a cache read back other than as K/V (``ctx.whole_outputs``: MLA's latent) is
    returned whole."""
    last = is_shard(p) and p.dim == len(shape_of(out)) - 1
    if (ctx.options.outputs == "local" and is_shard(p) and not last) or is_rank_local(p):
        return p
    return Replicate()


def _layer_entry(node, ctx) -> dict:
    """The residual stream [B, S, H] entering a layer from outside it is placed as that layer's strategy
    says (a slice, a gather, or nothing when they agree): with per-layer strategies, and for a partial
    sum (a vocab-parallel embedding's lookup: reduce_scatter into a sequence split, all_reduce else)."""
    layer = layer_path(module_path(node))
    if layer is None:
        return {}
    want = ctx.strategy_at(layer).residual
    entry = {}
    for x in node.all_input_nodes:
        s = shape_of(x)
        if s is not None and len(s) == 3 and s[:2] == (ctx.batch, ctx.seq_len) and x.op == "call_function" \
                and layer_path(module_path(x)) != layer and placement_of(x) != want \
                and (ctx.options.layers or is_partial(placement_of(x))):
            entry[x] = want
    return entry


def _recurrent_blocks(gm, ctx) -> frozenset:
    """Modules that convolve over the sequence (Qwen3-Next's linear attention: a causal conv, then a
    recurrence over every position) in a layer whose strategy splits the sequence: no rule follows a
    sequence split through them, so they run whole on every rank (exact, not parallel; the compile says
    so). Their projections too: the block is entered whole."""
    blocks = sorted({module_path(n) for n in gm.graph.find_nodes(op="call_function", target=aten.convolution.default)
                     if ctx.strategy_for(n).seq_sharded})
    if blocks:
        log.warning("seqpar: %s convolve over the sequence (linear attention); each runs whole on every rank: "
                    "exact, not parallel", ", ".join(blocks))
    return frozenset(blocks)


def _whole_entry(node, group) -> dict:
    """Nodes of a group that runs on the whole sequence (``group(node)`` is not None: an MoE block whose
    experts are sliced, MLA's latent region, a recurrent block) read what enters the group split by
    sequence whole; wants on one tensor share one collective."""
    g = group(node)
    if g is None:
        return {}
    return {x: Replicate() for x in node.all_input_nodes
            if x.op == "call_function" and group(x) != g and is_shard(placement_of(x)) and not _a_weight(x)}


def _a_weight(x) -> bool:
    """A view of a graph input (``t(kv_b_proj.weight)``): a weight the group reads as sliced, not a tensor
    that enters it split by sequence."""
    while x.op == "call_function" and len(x.all_input_nodes) == 1 and x.target in TRANSPARENT:
        x = x.all_input_nodes[0]
    return x.op == "placeholder"


def _no_token_leak(node):
    leaked = [x for x in node.all_input_nodes if is_token_local(placement_of(x))]
    if leaked:
        raise ShardingError(node, f"reads '{leaked[0].name}', data of a mixture-of-experts block's own tokens "
                            f"that only has a meaning inside the block ('{module_path(leaked[0])}')",
                            placements=[placement_of(x) for x in leaked],
                            hint="report this model; choose 'tp' meanwhile")


def _want(ctx, user: Node, src: Node, want, group):
    if src.op == "call_function" and src.target in MADE and ctx.in_token_block(src) and ctx.in_token_block(user):
        if len(src.users) > 1:                 # made once at the token count, read by several ops
            raise ShardingError(user, f"'{src.name}' is made at the token count and read by {len(src.users)} ops",
                                hint="report this model; choose 'tp' meanwhile")
        src.meta[PLACEMENT] = want             # made at the local size (localize), not sliced
        return
    written = user.op == "call_function" and user.target == aten.copy_.default
    while placement_of(src) != want and _hoistable(src):
        inner = map_through(src, want, forward=False, world=ctx.world)
        if inner is None:
            break
        ctx.pending.pop((src, src.args[0]), None)                    # superseded
        src.meta[PLACEMENT] = want
        user, src, want = src, src.args[0], inner
    if written and src.op == "call_function" and src.target in UNIFORM and is_shard(want) \
            and not is_shard(placement_of(src)):
        src.meta[PLACEMENT] = want             # an empty tensor written in place: made at the local shape
        return
    ctx.pending.pop((user, src), None)
    if placement_of(src) != want:
        ctx.pending[(user, src)] = Demand(user, src, want, group)


def _hoistable(n: Node) -> bool:
    return (n.op == "call_function" and n.target in TRANSPARENT and len(n.users) == 1
            and not is_partial(placement_of(n.args[0])))
