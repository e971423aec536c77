"""kv_attention: attention over a KV cache kept split by sequence (split-KV, as flash-decoding's combine).

With ``outputs="local"`` each rank keeps the cache rows it computed, in a fixed number C of slots
(``sp_compiler.kv``); the graph sees them as RankLocal inputs, and the rule table has left the
attention that reads them alone apart from asking for q and the mask whole (``rules._attention_rule``,
mode ``keys``). Here each such attention becomes two local ones and an exact merge:

    before (global; the cache stand-ins K_c, V_c are [B, Hkv, S1, D], the step's new rows [B, Hkv, Sq, D]):
        o = attention(q, repeat_kv(cat(K_c, k_new)), repeat_kv(cat(V_c, v_new)), attn_mask=m)   m: [B, 1, Sq, S1+Sq]
        outputs ... cat(K_c, k_new), cat(V_c, v_new) ...
    after (this rank):
        oA, lseA = attention(q, rep(K_slots), rep(V_slots), m[..., kv_pos] | -inf where kv_pos < 0)   cached rows
        oB, lseB = attention(q, rep(k_new),   rep(v_new),   m[..., this rank's new columns])          new rows
        o = merge(all_gather(oA | lseA)) then merge with B      (new rows on every rank: a decode step)
        o = merge(all_gather(merge(A, B)))                       (new rows split by sequence: a prefill
                                                                  that continues a cached one)
        outputs ... k_new, v_new ...     the backend writes them into free slots (one rank's, for a decode step)

    merge of partials (o_i, lse_i):  lse = logsumexp_i lse_i,  o = sum_i exp(lse_i - lse) * o_i   (fp32)

``kv_pos`` ([C] int64, a new graph input) holds each slot's global position, -1 for an empty slot; the
mask's columns are gathered at those positions, so HuggingFace's own mask (causal, padding) is applied
to the rows each rank holds. A query row with no visible key on a rank (all its rows padding, or no
rows at all) gets lse = -inf there and weighs nothing; no kernel ever sees an empty key set (the slots
are never zero, the new rows never empty). Per layer one all_gather of N x B*H*Sq*(D+1) values: a
decode step moves the same bytes whatever the context length.
"""
from __future__ import annotations

import torch

from sp_compiler import sdpa
from sp_compiler.collectives import Builder, all_gather_flat
from sp_compiler.context import PLACEMENT, layer_of
from sp_compiler.errors import ShardingError
from sp_compiler.placements import Replicate, is_rank_local, is_shard
from sp_compiler.rules import TRANSPARENT, kv_sources, shape_of

aten = torch.ops.aten

__all__ = ["kv_attention", "merge_partials", "cache_outputs", "whole_cache_outputs", "KV_POS"]

KV_POS = "kv_pos"            # name of the slot-position input this pass adds


def kv_attention(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    todo = [n for n in gm.graph.nodes if sdpa.is_attention(n) and is_rank_local(_placement(sdpa.bind(n).k))]
    if not todo:
        return gm
    kv_pos = _kv_pos_input(gm, ctx)
    rewired = {}
    for node in todo:
        call = sdpa.bind(node)
        (k_slots, k_new, k_cat), (v_slots, v_new, v_cat) = _cached(node, call.k), _cached(node, call.v)
        out, lse = _split_kv(gm, node, call, ctx, kv_pos, (k_slots, k_new), (v_slots, v_new))
        sdpa.replace(node, out, lse)
        rewired.update({k_cat: k_new, v_cat: v_new})
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    for old, new in rewired.items():                     # the cache outputs: this call's new rows
        output.replace_input_with(old, new)
    gm.graph.eliminate_dead_code()
    return gm


def _placement(n):
    return n.meta.get(PLACEMENT) if isinstance(n, torch.fx.Node) else None


def _kv_pos_input(gm, ctx):
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(KV_POS)
    node.meta[PLACEMENT] = Replicate()
    (positions,) = {info.positions for info in ctx.kv.values() if info.split == "seq"}
    ctx.example_inputs.append(positions)
    ctx.input_fqns.append(None)
    ctx.extra_inputs.append(KV_POS)
    if ctx.fakes is not None:
        ctx.fakes.append(None)
    return node


def _cached(attn, x):
    """(slots placeholder, new rows, the cat) behind attention's K or V: x = view chain(cat(slots, new)); the
    chain may repeat the KV heads (``share_kv_heads`` under Ulysses), which ``_repeat`` does again for both
    partial attentions."""
    chain = x
    while chain.op == "call_function" and (chain.target in TRANSPARENT or _repeats_heads(chain)):
        chain = chain.args[0]
    if chain.op != "call_function" or chain.target != aten.cat.default or len(chain.args[0]) != 2:
        raise ShardingError(attn, f"its keys/values come from a KV cache kept split by sequence through "
                                  f"'{chain.name}' ({chain.target}), not a concatenation of the cache with the "
                                  f"step's new rows", hint="use outputs='replicate' for this model")
    slots, new = chain.args[0]
    if slots.op != "placeholder" or not is_rank_local(_placement(slots)):
        raise ShardingError(attn, f"'{chain.name}' concatenates '{slots.name}', which is not a KV cache input")
    return slots, new, chain


def _repeats_heads(n) -> bool:
    return n.target == aten.repeat_interleave.self_int and len(n.args) > 2 and n.args[2] == 1


def _split_kv(gm, node, call, ctx, kv_pos, k, v):
    """The partial attentions over this rank's slots and the new rows, merged (module docstring): the
    output and its logsumexp (read by an attention-sink correction, ``passes/eager_attention``)."""
    b = Builder(gm.graph, after=node.prev, before=node, ctx=ctx)
    q, mask = call.q, call.mask
    B, H, Sq, D = node.meta["val"][sdpa.OUTPUT].shape             # q's shape: it arrives whole (an inserted gather)
    dtype = node.meta["val"][sdpa.OUTPUT].dtype
    (k_slots, k_new), (v_slots, v_new) = k, v
    new_sharded = is_shard(_placement(k_new))
    # cached rows: every slot, masked where empty
    valid = b(aten.ge.Scalar, kv_pos, 0)                                                     # [C]
    m_a = _columns(b, mask, valid, b(aten.clamp_min.default, kv_pos, 0), (B, 1, Sq), dtype)
    part_a = _attend(b, node, call, q, _repeat(b, k_slots, H), _repeat(b, v_slots, H), m_a)
    # the new rows: all of them (a decode step: every rank has them), or this rank's chunks of them
    cols = _new_columns(b, ctx, shape_of(k_new)[2] if not new_sharded else Sq, new_sharded)
    m_b = _columns(b, mask, None, cols, (B, 1, Sq), dtype)
    part_b = _attend(b, node, call, q, _repeat(b, k_new, H), _repeat(b, v_new, H), m_b)
    if new_sharded:
        out, lse = _across_ranks(b, merge_partials(b, [part_a, part_b]), (B, H, Sq, D), ctx)
    else:
        out, lse = merge_partials(b, [_across_ranks(b, part_a, (B, H, Sq, D), ctx), part_b])
    out = b(aten._to_copy.default, out, dtype=dtype)
    out.meta[PLACEMENT] = lse.meta[PLACEMENT] = Replicate()
    ctx.collectives += [{"layer": layer_of(node), **row} for row in b.rows]
    return out, lse                                     # [B, H, Sq, D], [B, H, Sq] fp32: over every key


def _repeat(b, x, heads):
    """[B, Hkv, L, D] -> [B, heads, L, D]: each KV head repeated for the query heads that share it."""
    hkv = x.meta["val"].shape[1] if "val" in x.meta else None
    if hkv is None or hkv == heads:
        return x
    return b(aten.repeat_interleave.self_int, x, heads // hkv, 1)


def _new_columns(b, ctx, n, sharded):
    """Columns of the new rows in the mask's last dim, counted from its end ([S1 + Sq] wide): all Sq of
    them, or the chunks of them this rank holds (``ctx.layout(Sq)``)."""
    if not sharded:
        return b(aten.arange.start, -n, 0, dtype=torch.int64)
    Sq = n
    spans = ctx.layout(Sq).spans(ctx.rank)
    parts = [b(aten.arange.start, start - Sq, start + m - Sq, dtype=torch.int64) for start, m in spans]
    return parts[0] if len(parts) == 1 else b(aten.cat.default, parts)


def _columns(b, mask, valid, cols, lead, qdtype):
    """The float mask [B, 1, Sq, len(cols)] of the keys at ``cols`` (negative: from the end), -inf where
    ``valid`` is False. HF's mask may be bool or additive; None means every key is visible."""
    if mask is None:
        m = b(aten.zeros.default, [*lead, 1], dtype=qdtype)
    else:
        last = b(aten.sym_size.int, mask, len(shape_of(mask)) - 1)
        m = b(aten.index_select.default, mask, -1, b(aten.remainder.Scalar, cols, last))
        if mask.meta["val"].dtype == torch.bool:
            m = b(aten.where.Scalar, m, 0.0, float("-inf"))
    if valid is not None:
        m = b(aten.where.ScalarOther, b(aten.view.default, valid, [1, 1, 1, -1]), m, float("-inf"))
    keys = b(aten.sym_size.int, cols, 0)
    return b(aten._to_copy.default, b(aten.expand.default, m, [*lead, keys]), dtype=qdtype)


def _attend(b, node, call, q, k, v, m):
    """(out [B, H, Sq, D], lse [B, H, Sq]) of the node's kernel; rows with no visible key: out 0, lse -inf."""
    out, lse = sdpa.call(b, node.target, q, k, v, False, scale=call.scale, mask=m)
    seen = b(aten.any.dim, b(aten.gt.Scalar, m, float("-inf")), -1)                            # [B, 1, Sq]
    lse = b(aten.where.ScalarOther, seen, lse, float("-inf"))
    out = b(aten.where.ScalarOther, b(aten.unsqueeze.default, seen, -1), out, 0.0)
    return b(aten._to_copy.default, out, dtype=torch.float32), b(aten._to_copy.default, lse, dtype=torch.float32)


def merge_partials(b, parts):
    """Exact merge of partial attentions [(o_i [.., D], lse_i [..])] over disjoint key sets (fp32)."""
    lse_all = b(aten.stack.default, [lse for _, lse in parts])                                   # [P, ...]
    return _merge(b, b(aten.stack.default, [o for o, _ in parts]), lse_all)


def _merge(b, o_all, lse_all):
    lse = b(aten.logsumexp.default, lse_all, [0])
    w = b(aten.exp.default, b(aten.sub.Tensor, lse_all, lse))
    w = b(aten.where.ScalarSelf, b(aten.isnan.default, w), 0.0, w)                  # no key anywhere: 0
    o = b(aten.sum.dim_IntList, b(aten.mul.Tensor, o_all, b(aten.unsqueeze.default, w, -1)), [0])
    return o, lse


def _across_ranks(b, part, shape, ctx):
    """Merge one partial per rank: all_gather of [o | lse] (N x B*H*Sq*(D+1) values), then ``_merge``."""
    o, lse = part
    B, H, Sq, D = shape
    packed = b(aten.cat.default, [b(aten.reshape.default, o, [-1]), b(aten.reshape.default, lse, [-1])])
    n_out = B * H * Sq * D
    every = all_gather_flat(b, packed, n_out + B * H * Sq, torch.float32,
                            what="split-KV partial attention (out | lse)")                    # [N, F]
    o_all = b(aten.view.default, b(aten.slice.Tensor, every, 1, 0, n_out), [ctx.world, B, H, Sq, D])
    lse_all = b(aten.view.default, b(aten.slice.Tensor, every, 1, n_out, n_out + B * H * Sq), [ctx.world, B, H, Sq])
    return _merge(b, o_all, lse_all)


def cache_outputs(gm: torch.fx.GraphModule) -> dict:
    """{graph output index: ('model.layers.3.k' | '...v', shape)}: the outputs that are a layer's KV cache,
    i.e. that reach an attention's K or V through layout-only ops (HF's cat of the cache with the new rows,
    then repeat_kv), with their shape as the model makes it. Read on the captured graph, before any pass."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    index = {leaf: i for i, leaf in enumerate(torch.utils._pytree.tree_leaves(output.args[0]))}
    found = {}
    for attn in [n for n in gm.graph.nodes if sdpa.is_attention(n)]:
        call = sdpa.bind(attn)
        for name, x in (("k", call.k), ("v", call.v)):
            while x not in index and x.op == "call_function" and x.target in TRANSPARENT:
                x = x.args[0]
            if x in index:
                found[index[x]] = (f"{layer_of(attn)}.{name}", tuple(shape_of(x)))
    return found


def whole_cache_outputs(gm: torch.fx.GraphModule, caches: dict) -> frozenset:
    """Graph outputs that are a cache the model reads back, but not as K or V, so seqpar returns them whole
    under ``outputs="local"`` too (a decode step reads them like any input): 4-D outputs that are, or
    slice, what an attention's K or V is computed from. ``caches``: what :func:`cache_outputs` found,
    left out here.

    - HF's MLA (DeepSeek-V2/V3) caches its compressed latent [B, 1, S, kv_lora_rank] and rope keys
      [B, 1, S, rope] and expands them into per-head K/V (``kv_b_proj``) after the cache: small
      (kv_lora_rank + rope values per token, against 2 x heads x head_dim for K/V).
    - A sliding-window layer (``DynamicSlidingWindowLayer``: Mistral, gpt-oss) keeps only the last
      window - 1 rows, ``k[:, :, -(w - 1):]``, a slice of what attention reads: bounded by the window.
    """
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    feeds = kv_sources(gm.graph)
    leaves = torch.utils._pytree.tree_leaves(output.args[0])
    return frozenset(i for i, leaf in enumerate(leaves)
                     if i not in caches and len(shape_of(leaf) or ()) == 4 and _sliced_base(leaf) in feeds)


def _sliced_base(x):
    """What ``x`` is a slice (or view) of: back through slices and layout-only ops."""
    while isinstance(x, torch.fx.Node) and x.op == "call_function" and (
            x.target in TRANSPARENT or x.target == aten.slice.Tensor):
        x = x.args[0]
    return x
