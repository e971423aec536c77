"""insert: turn every pending want (``ctx.pending``) into a local slice or a functional collective.

    before:  y = op(x)          x: S(2), op wants S(1)
    after:   c = all_to_all_single(prep(x)) ... w = wait_tensor(c); y = op(post(w))

A tensor written in place after it is made (``copy_`` into a view of it: HF's MLA fills its keys
so) is converted after the last write, not where it is made.

Wants on the same tensor with the same target share one conversion. The all-to-alls
or all-gathers one attention node demands (q, k, v for Ulysses; K, V for vanilla SP) are
packed into a single call.
Every collective gets a row in ``ctx.collectives`` (layer, kind, dim, shape, bytes).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from sp_compiler.collectives import Builder, all_gather, all_to_all, collective_kind, redistribute
from sp_compiler.context import PLACEMENT, layer_of
from sp_compiler.errors import module_path
from sp_compiler.strategies import layer_path
from sp_compiler.placements import fmt, is_partial
from sp_compiler.rules import ALIASES

__all__ = ["insert_collectives"]

aten = torch.ops.aten

_PACKABLE = {
    "all_to_all": all_to_all,                                                  # q | k | v (Ulysses)
    "all_gather": lambda b, items, dtype, what: all_gather(b, [i[:3] for i in items], dtype, what),  # K | V
}


def insert_collectives(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_target = defaultdict(list)                                  # (src, want) -> [demands]
    for d in ctx.pending.values():
        by_target[(d.src, d.want)].append(d)

    packs = defaultdict(list)                                      # attention node -> [(src, want)]
    for (src, want), demands in by_target.items():
        group = demands[0].group
        kind = collective_kind(src.meta[PLACEMENT], want)
        if group is not None and ctx.world > 1 and kind in _PACKABLE:
            packs[(group, kind)].append((src, want))

    packed = {key for keys in packs.values() for key in keys}
    for (group, kind), keys in packs.items():
        keys.sort(key=lambda k: order[_ready(k[0], order)])
        after = _ready(keys[-1][0], order)
        for k in keys:
            for d in by_target[k]:
                _sink_after(d.user, after, order)
        order = {n: i for i, n in enumerate(graph.nodes)}
        users = [d.user for k in keys for d in by_target[k]]
        b = Builder(graph, after=after, before=min(users, key=order.get), ctx=ctx)
        val = keys[0][0].meta["val"]
        items = [(src, tuple(src.meta["val"].shape), src.meta[PLACEMENT], want) for src, want in keys]
        what = ", ".join(f"{src.name} {fmt(src.meta[PLACEMENT])}->{fmt(want)}" for src, want in keys)
        outs = _PACKABLE[kind](b, items, val.dtype, what=what)
        for (src, want), out in zip(keys, outs):
            _rewire(by_target[(src, want)], src, out, want)
        _report(ctx, b, users)

    order = {n: i for i, n in enumerate(graph.nodes)}
    for (src, want), demands in by_target.items():
        if (src, want) in packed:
            continue
        users = [d.user for d in demands]
        b = Builder(graph, after=_ready(src, order), before=min(users, key=order.get), ctx=ctx)
        val = src.meta["val"]
        out = redistribute(b, src, tuple(val.shape), src.meta[PLACEMENT], want, val.dtype)
        for row in b.rows:
            row["what"] = f"{src.name} {fmt(src.meta[PLACEMENT])}->{fmt(want)}"
        _rewire(demands, src, out, want)
        _report(ctx, b, users, src)
    ctx.pending.clear()
    graph.lint()
    return gm


def _ready(src, order):
    """The node after which ``src`` holds its final value: itself, or the last in-place write
    (``copy_``) into a view of it."""
    last, todo = src, [src]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.op != "call_function":
                continue
            if u.target == aten.copy_.default and u.args[0] is n:
                last = max(last, u, key=order.get)
            elif u.target in ALIASES and u.args[0] is n:
                todo.append(u)
    return last


def _sink_after(user, after, order):
    """Move ``user``, and whatever below it runs before ``after``, past ``after``.

    A packed all_to_all waits for its last input (q after RoPE); a want hoisted higher
    up (v, straight after its projection) leaves a chain of views between there and
    attention, which can run after the exchange (they come below its output anyway). A
    node of the chain may have other users (a KV cache output): they move too, in order.
    """
    if order[user] > order[after]:
        return
    below, todo = {user}, [user]
    while todo:
        for u in todo.pop().users:
            if u not in below and order[u] <= order[after]:
                below.add(u)
                todo.append(u)
    for c in sorted(below, key=order.get, reverse=True):
        after.append(c)


def _rewire(demands, src, out, want):
    if out is src:
        return
    out.meta[PLACEMENT] = want
    for d in demands:
        d.user.replace_input_with(src, out)


def _report(ctx, b, users, src=None):
    """One row per collective, in the layer of its first user; a partial sum made outside the decoder
    layers and completed entering one (a vocab-parallel embedding's lookup) is the maker's."""
    layer = layer_of(min(users, key=lambda u: 0 if u.op != "output" else 1))
    if src is not None and src.op == "call_function" and is_partial(src.meta.get(PLACEMENT)) \
            and layer_path(module_path(src)) is None and layer_path(layer) is not None:
        layer = layer_of(src)
    for row in b.rows:
        ctx.collectives.append({"layer": layer, **row})
