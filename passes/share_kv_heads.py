"""share_kv_heads: fewer KV heads than ranks (N % Hkv == 0), for tensor parallelism and Ulysses.

Also where head counts that cannot be split are refused, naming them, before any pass
fails on a view deep inside attention.

Each KV head then serves the N/Hkv ranks whose query heads use it. The graph is widened
before sharding, so every later pass sees an ordinary head split:

    k = (x @ Wk.T).view(B, S, Hkv, D) ... expand(B, Hkv, H/Hkv, S, D) -> [B, H, S, D]
    becomes
    k = (x @ Wk'.T).view(B, S, N, D)  ... expand(B, N,   H/N,   S, D) -> [B, H, S, D]

with Wk' = Wk with each head repeated N/Hkv times (rows, and the bias). Rank r then gets
exactly KV head r // (N/Hkv): one head's weights, no duplicated work on any rank. Only
layers whose strategy slices attention weights (tp, megatron_sp, megatron_sp_tp) change.

A KV cache read by the graph is widened the same way: a whole one (an input) by repeating its
heads before the concatenation with the new rows, one kept split by heads (``outputs="local"``:
rank r holds the one KV head it uses) by seeing its input as the widened [B, N, S, D]. The
cache a graph returns goes back to the model's Hkv heads (``k[:, ::N/Hkv]``), unless it stays
split (``outputs="local"``): then each rank keeps its KV head.
"""
from __future__ import annotations

import functools

import torch

from sp_compiler.errors import ShapeConstraintError, module_path
from sp_compiler.rules import ATTENTION_OPS, attention_inputs, shape_of
from sp_compiler.strategies import layer_path, tp_role

from .lower import refresh_vals

aten = torch.ops.aten

__all__ = ["share_kv_heads", "repeat_kv_heads"]


def share_kv_heads(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    N = ctx.world
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    changed = False
    for attn in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION_OPS]:
        strategy = ctx.strategy_for(attn)
        if strategy.attention == "heads" and strategy.attn_weights != "tp":
            changed |= _repeat_grouped_kv(gm, attn, ctx)
            continue
        if strategy.attn_weights != "tp":
            continue
        q, k, _, _ = attention_inputs(attn)
        H, D = shape_of(q)[1], shape_of(q)[3]
        layer = layer_path(module_path(attn))
        if H % N:
            raise ShapeConstraintError(
                f"tensor-parallel attention in '{layer}' has {H} query heads, not divisible by the world size "
                f"({N}). Fix: use a world size that divides {H}, or 'vanilla_sp' for this layer")
        hkv = _kv_heads(gm, attn, placeholders, ctx, D)
        if hkv is None or hkv % N == 0:
            continue
        if ctx.in_group:                        # two levels: the widened heads would meet the split across groups
            raise ShapeConstraintError(
                f"tensor-parallel attention in '{layer}' has {hkv} KV heads for {N} ranks: a two-level layout "
                f"does not share a KV head between the ranks of a group")
        if N % hkv:
            raise ShapeConstraintError(
                f"tensor-parallel attention in '{layer}' has {hkv} KV heads for {N} ranks: the KV heads must be "
                f"divisible by the world size, or divide it (then ranks share a KV head). Fix: use a world size "
                f"that divides {hkv} or is a multiple of it, or 'ulysses' / 'vanilla_sp' for this layer")
        _widen(gm, attn, placeholders, ctx, hkv, H, D)
        changed = True
    if changed:
        refresh_vals(gm, ctx)
    return gm


def _repeat_grouped_kv(gm, attn, ctx) -> bool:
    """Ulysses on a kernel that takes grouped K/V heads (no repeat_kv in the graph) with fewer KV heads
    than ranks: repeat each KV head N/Hkv times right before attention, so rank r receives KV head
    r // (N/Hkv), the one its H/N query heads use. The cache keeps the model's Hkv heads.

        attention(q [B,H,S,D], k [B,Hkv,S,D], v)  ->  attention(q, repeat_interleave(k, N/Hkv, 1), ..)
    """
    N = ctx.world
    q, k, v, _ = attention_inputs(attn)
    H, hkv = shape_of(q)[1], shape_of(k)[1]
    if hkv % N == 0 or N % hkv or H % N or H == hkv:
        return False
    for x in (k, v):
        with gm.graph.inserting_before(attn):
            wide = gm.graph.call_function(aten.repeat_interleave.self_int, (x, N // hkv, 1))
        wide.meta.update({key: val for key, val in x.meta.items() if key != "val"})
        attn.replace_input_with(x, wide)
    return True


def _cache_keeps_model_heads(gm, attn, placeholders, ctx, rep):
    """The KV cache (a graph output on the widened path) goes back to the model's Hkv heads:

        out = k [B, N, S, D]   ->   out = k[:, ::N/Hkv]  [B, Hkv, S, D]
    """
    path = set(_kv_path(gm, attn, placeholders, ctx))
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    for o in [a for a in output.all_input_nodes if a in path]:
        with gm.graph.inserting_before(output):
            cut = gm.graph.call_function(aten.slice.Tensor, (o, 1, 0, 9223372036854775807, rep))
        cut.meta.update({k: v for k, v in o.meta.items() if k != "val"})
        output.replace_input_with(o, cut)


def _widen_cache(gm, cat, cache, i, ctx, rep):
    """A KV cache input [B, Hkv, S, D] meeting the widened new rows: a whole one gets each head repeated
    (repeat_interleave, before the cat); one kept split by heads is the widened cache already (rank r holds
    the KV head it uses), so only its global shape changes to [B, N, S, D]."""
    if i in ctx.kv:
        x = ctx.example_inputs[i]
        shape = [x.shape[0], x.shape[1] * rep, *x.shape[2:]]
        ctx.example_inputs[i] = x.as_strided(shape, [0] * len(shape)) if x.stride(1) == 0 \
            else x.repeat_interleave(rep, 1)                         # a stand-in stays one element
        if ctx.fakes is not None and ctx.fakes[i] is not None:
            fake = ctx.fakes[i]
            with fake.fake_mode:
                ctx.fakes[i] = torch.empty([fake.shape[0], fake.shape[1] * rep, *fake.shape[2:]], dtype=fake.dtype,
                                           device=fake.device)
        return
    with gm.graph.inserting_before(cat):
        wide = gm.graph.call_function(aten.repeat_interleave.self_int, (cache, rep, 1))
    wide.meta.update({key: val for key, val in cache.meta.items() if key != "val"})
    cat.replace_input_with(cache, wide)


def _kv_projections(gm, attn, placeholders, ctx):
    """(placeholder index, role) of the k/v projection weights and biases feeding this layer."""
    layer = layer_path(module_path(attn))
    out = []
    for i, n in enumerate(placeholders):
        fqn = ctx.input_fqns[i]
        if fqn is None:
            continue
        module = fqn.rpartition(".")[0]
        if layer_path(module) == layer and module.rpartition(".")[2] in ("k_proj", "v_proj") and tp_role(module):
            out.append(i)
    return out


def _kv_path(gm, attn, placeholders, ctx):
    """Nodes downstream of the k/v projection weights, up to (not including) attention."""
    seen, stack = set(), [placeholders[i] for i in _kv_projections(gm, attn, placeholders, ctx)]
    while stack:
        for u in stack.pop().users:
            if u is not attn and u not in seen and u.op == "call_function":
                seen.add(u)
                stack.append(u)
    return [n for n in gm.graph.nodes if n in seen]


def _kv_heads(gm, attn, placeholders, ctx, D):
    idx = _kv_projections(gm, attn, placeholders, ctx)
    if not idx:
        return None
    return shape_of(placeholders[idx[0]])[0] // D


def repeat_kv_heads(w: torch.Tensor, hkv: int, D: int, rep: int) -> torch.Tensor:
    """A k/v projection's weight (or bias) [Hkv*D, ...] -> [Hkv*rep*D, ...]: each KV head repeated ``rep`` times."""
    return w.detach().reshape(hkv, D, *w.shape[1:]).repeat_interleave(rep, dim=0).reshape(hkv * rep * D, *w.shape[1:])


def _widen(gm, attn, placeholders, ctx, hkv, H, D):
    N, rep = ctx.world, ctx.world // hkv
    widen = functools.partial(repeat_kv_heads, hkv=hkv, D=D, rep=rep)   # a partial: graph_cache pickles it

    for i in _kv_projections(gm, attn, placeholders, ctx):
        ctx.example_inputs[i] = widen(ctx.example_inputs[i])
        ctx.widen[i] = widen
        if ctx.fakes is not None:
            ctx.fakes[i] = None                                      # faked from the widened weight
    for cat in [n for n in _kv_path(gm, attn, placeholders, ctx) if n.target == aten.cat.default]:
        for cache in [x for x in cat.args[0] if x.op == "placeholder"]:
            _widen_cache(gm, cat, cache, placeholders.index(cache), ctx, rep)
    if ctx.options.outputs != "local":
        _cache_keeps_model_heads(gm, attn, placeholders, ctx, rep)
    for n in _kv_path(gm, attn, placeholders, ctx):                  # sizes between projection and attention
        if n.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default) \
                and len(n.args[1]) <= 3 and n.args[1][-1] == hkv * D:      # [.., Hkv*D], not [B, S, Hkv, D]
            n.args = (n.args[0], [*n.args[1][:-1], N * D], *n.args[2:])
        elif n.target == aten.expand.default and len(n.args[1]) == 5 and list(n.args[1][1:3]) == [hkv, H // hkv]:
            size = list(n.args[1])
            size[1:3] = [N, H // N]
            n.args = (n.args[0], size)
            for u in [u for u in n.users if u.target == aten.view.default]:
                u.target = aten.reshape.default      # Hkv = 1 expanded [B, 1, H] views as [B*H]; [B, N, H/N] copies
