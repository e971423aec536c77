"""Graph builders for placement changes: ``redistribute(have -> want)`` as functional collectives.

    have -> want           nodes built (x is one rank's local piece)
    R    -> S(d)           slice(x, d, r*L, (r+1)*L)                     local, no communication
    R    -> P              x * (rank == 0)                               local (a bias joining a partial sum)
    S(d) -> R              all_gather_into_tensor(flat x) + wait_tensor, rank j's rows to chunk j
    P    -> R              all_reduce(x, "sum") + wait_tensor
    P    -> S(d)           reduce_scatter_tensor(x moved to dim 0) + wait_tensor
    S(s) -> S(t)           all_to_all_single: split t into N pieces, send piece j to rank j,
                           receive rank j's piece of s, concatenate along s
    S(d, sf=k)             viewed as [.., k, L/k, ..] sharded on the inner factor, then as above

Every collective is issued right after its input exists; its ``wait_tensor`` and whatever
follows are placed right before the first use, so Inductor can overlap the transfer.
``all_to_all`` and ``all_gather`` take several tensors and pack them into one call (q, k, v
for Ulysses; K and V for vanilla SP). With a zig-zag layout (``vanilla_sp_zigzag``) rank r
holds sequence chunks r and 2N-1-r of 2N: slices take those two, gathers put them back.
"""
from __future__ import annotations

import math
import operator
from typing import List, Sequence

import torch
from torch.fx import Graph, Node

from .context import INSERTED
from .narrow import narrow
from .placements import Shard, is_partial, is_replicate, is_shard, local_shape, split_factor

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

__all__ = ["Builder", "redistribute", "collective_kind", "local_slice", "all_gather", "all_reduce", "reduce_scatter",
           "all_to_all", "zigzag_chunks"]


class Builder:
    """Appends nodes at two cursors: ``early`` (right after the source) and ``late`` (before first use)."""

    def __init__(self, graph: Graph, after: Node, before: Node, ctx):
        self.graph, self.ctx = graph, ctx
        self._cursor = {"early": after, "late": before.prev}
        self.phase = "early"
        self.rows: List[dict] = []

    def __call__(self, target, *args, **kwargs) -> Node:
        with self.graph.inserting_after(self._cursor[self.phase]):
            n = self.graph.call_function(target, args, kwargs)
        n.meta[INSERTED] = True
        if self._cursor["late"] is self._cursor[self.phase] or self.phase == "late":
            self._cursor["late"] = n
        self._cursor[self.phase] = n
        return n

    def late(self):
        self.phase = "late"

    def record(self, kind, dim, shape, dtype, what=""):
        nbytes = math.prod(shape) * dtype.itemsize
        self.rows.append(dict(kind=kind, dim=dim, shape=tuple(shape), dtype=str(dtype).replace("torch.", ""),
                              bytes=nbytes, what=what))


def _perm_to_front(nd, d):
    return [d] + [i for i in range(nd) if i != d]


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _expand_strided(b: Builder, x, shape, p):
    """S(d, sf=k) on local [.., L, ..] -> view [.., k, L/k, ..] sharded on d+1. Returns (x, shape, dim)."""
    d, sf = p.dim, split_factor(p)
    if sf == 1:
        return x, list(shape), d
    shape = list(shape[:d]) + [sf, shape[d] // sf] + list(shape[d + 1:])
    return b(aten.reshape.default, x, shape), shape, d + 1


def _merge_strided(b, x, shape, p):
    d, sf = p.dim, split_factor(p)
    if sf == 1:
        return x
    merged = list(shape[:d]) + [shape[d] * shape[d + 1]] + list(shape[d + 2:])
    return b(aten.reshape.default, x, merged)


def _zigzag(b) -> bool:
    return b.ctx.zigzag


def zigzag_chunks(N: int, r: int):
    """Rank r's two chunks of 2N: r and 2N-1-r (equal attention work per rank)."""
    return (r, 2 * N - 1 - r)


def local_slice(b: Builder, x, gshape, want):
    """R -> S(d[, sf]): keep this rank's rows, no communication. A computed tensor is
    narrowed where it is made (``sp_compiler.narrow``), so no rank builds all of it."""
    if split_factor(want) == 1 and isinstance(x, Node) and x.op == "call_function":
        return narrow(b, x, want.dim, _slice_rows)
    return _slice_rows(b, x, want.dim, want, gshape)


def _slice_rows(b: Builder, x, dim, want=None, gshape=None):
    N, r = b.ctx.world, b.ctx.rank
    want = want or Shard(dim)
    x, shape, d = _expand_strided(b, x, gshape or x.meta["val"].shape, want)
    if _zigzag(b):
        C = shape[d] // (2 * N)
        y = b(aten.cat.default, [b(aten.slice.Tensor, x, d, c * C, (c + 1) * C) for c in zigzag_chunks(N, r)], d)
    else:
        L = shape[d] // N
        y = b(aten.slice.Tensor, x, d, r * L, (r + 1) * L)
    shape[d] //= N
    return _merge_strided(b, y, shape, want)


def _flatten_for_ranks(b, x, shape, t=None):
    """Local tensor -> [N, F]: row j is what goes to rank j (split along t), or all of it (t None)."""
    N = b.ctx.world
    if t is None:
        y = b(aten.clone.default, x, memory_format=torch.contiguous_format)
        return b(aten.view.default, y, [math.prod(shape)]), list(shape)
    split = shape[:t] + [N, shape[t] // N] + shape[t + 1:]             # [.., N, T/N, ..]
    y = b(aten.reshape.default, x, split)
    y = b(aten.permute.default, y, _perm_to_front(len(split), t))
    y = b(aten.clone.default, y, memory_format=torch.contiguous_format)
    recv_shape = shape[:t] + [shape[t] // N] + shape[t + 1:]
    return b(aten.view.default, y, [N, math.prod(recv_shape)]), recv_shape


def _merge_from_ranks(b, part, rshape, s, have):
    """[N, F] with row j = rank j's piece of dim s -> the tensor with s whole, in sequence order."""
    N = b.ctx.world
    y = b(aten.view.default, part, [N] + rshape)                         # [src rank, ..local dims..]
    nd = len(rshape)
    y = b(aten.permute.default, y, [1 + i for i in range(s)] + [0] + [1 + i for i in range(s, nd)])
    full = rshape[:s] + [N * rshape[s]] + rshape[s + 1:]
    y = b(aten.reshape.default, y, full)
    if _zigzag(b):                                                       # rank order -> sequence order
        C = full[s] // (2 * N)
        where = {}
        for rank in range(N):
            for k, c in enumerate(zigzag_chunks(N, rank)):
                where[c] = 2 * rank + k
        y = b(aten.cat.default, [b(aten.slice.Tensor, y, s, where[c] * C, (where[c] + 1) * C)
                                 for c in range(2 * N)], s)
    return _merge_strided(b, y, full, have)


def _split_packed(b, recv, sizes):
    if len(sizes) == 1:
        return [recv]
    pieces = b(aten.split_with_sizes.default, recv, sizes, 1)
    return [b(operator.getitem, pieces, i) for i in range(len(sizes))]


def all_gather(b: Builder, items: Sequence[tuple], dtype, what="") -> List[Node]:
    """Packed all_gather. ``items`` = [(x, global shape, have S(s[,sf]))]; returns the whole tensors.

    Per tensor flatten -> [F_i]; cat -> [sum F_i]; all_gather_into_tensor -> [N * sum F_i];
    view [N, sum F_i], split, and per tensor put rank j's rows at chunk j of dim s.
    """
    N, group = b.ctx.world, b.ctx.group_name
    flat, metas = [], []
    for x, gshape, have in items:
        x, shape, s = _expand_strided(b, x, local_shape(gshape, have, N), have)
        f, rshape = _flatten_for_ranks(b, x, shape)
        flat.append(f)
        metas.append((rshape, s, have))
    sizes = [math.prod(m[0]) for m in metas]
    packed = flat[0] if len(flat) == 1 else b(aten.cat.default, flat)
    g = b(c10d.all_gather_into_tensor.default, packed, N, group)
    b.record("all_gather", items[0][2].dim, (N, sum(sizes)), dtype, what)
    b.late()
    recv = b(aten.view.default, b(c10d.wait_tensor.default, g), [N, sum(sizes)])
    return [_merge_from_ranks(b, part, *meta) for part, meta in zip(_split_packed(b, recv, sizes), metas)]


def all_reduce(b: Builder, x, gshape, dtype):
    ar = b(c10d.all_reduce.default, x, "sum", b.ctx.group_name)
    b.record("all_reduce", None, gshape, dtype)
    b.late()
    return b(c10d.wait_tensor.default, ar)


def reduce_scatter(b: Builder, x, gshape, want, dtype):
    N = b.ctx.world
    d = want.dim
    if _zigzag(b):
        raise NotImplementedError("reduce_scatter onto a zig-zag sequence layout")
    perm = _perm_to_front(len(gshape), d)
    y = b(aten.clone.default, b(aten.permute.default, x, perm), memory_format=torch.contiguous_format)
    rs = b(c10d.reduce_scatter_tensor.default, y, "sum", N, b.ctx.group_name)
    b.record("reduce_scatter", d, gshape, dtype)
    b.late()
    return b(aten.permute.default, b(c10d.wait_tensor.default, rs), _inverse(perm))


def all_to_all(b: Builder, items: Sequence[tuple], dtype, what="") -> List[Node]:
    """Packed all_to_all. ``items`` = [(x, global shape, have S(s[,sf]), want S(t))].

    Per tensor (local [.., L_s, .., T, ..]):  split t as [N, T/N], move N to the front,
    flatten -> [N, F_i];  cat all -> [N, sum F_i];  all_to_all_single over dim 0;
    split back, and per tensor put source rank j's rows at chunk j of dim s.
    """
    N, group = b.ctx.world, b.ctx.group_name
    if _zigzag(b):
        raise NotImplementedError("all_to_all on a zig-zag sequence layout")
    flat, metas = [], []
    for x, gshape, have, want in items:
        x, shape, s = _expand_strided(b, x, local_shape(gshape, have, N), have)
        t = want.dim + (1 if split_factor(have) > 1 and want.dim > have.dim else 0)
        f, rshape = _flatten_for_ranks(b, x, shape, t)
        flat.append(f)
        metas.append((rshape, s, have))
    sizes = [math.prod(m[0]) for m in metas]
    packed = flat[0] if len(flat) == 1 else b(aten.cat.default, flat, 1)
    a2a = b(c10d.all_to_all_single.default, packed, [1] * N, [1] * N, group)
    b.record("all_to_all", f"{items[0][2].dim}->{items[0][3].dim}", (N, sum(sizes)), dtype, what)
    b.late()
    recv = b(c10d.wait_tensor.default, a2a)
    return [_merge_from_ranks(b, part, *meta) for part, meta in zip(_split_packed(b, recv, sizes), metas)]


def collective_kind(have, want) -> str:
    """Name of what ``redistribute`` does for have -> want (for planning and grouping)."""
    if have == want:
        return "none"
    if is_replicate(have) and is_shard(want):
        return "slice"
    if is_replicate(have) and is_partial(want):
        return "partial"
    if is_shard(have) and is_replicate(want):
        return "all_gather"
    if is_partial(have):
        return "all_reduce" if is_replicate(want) else "reduce_scatter"
    if is_shard(have) and is_shard(want) and split_factor(want) == 1:
        return "all_to_all"
    return "via_replicate"


def redistribute(b: Builder, x: Node, gshape, have, want, dtype) -> Node:
    """Nodes turning ``x`` (placed ``have``) into the same tensor placed ``want``."""
    kind = collective_kind(have, want)
    if kind == "none":
        return x
    if b.ctx.world == 1:
        return x
    if kind == "slice":
        return local_slice(b, x, gshape, want)
    if kind == "partial":                                            # rank 0 keeps it, the others add 0
        return b(aten.mul.Tensor, x, 1.0 if b.ctx.rank == 0 else 0.0)
    if kind == "all_gather":
        return all_gather(b, [(x, gshape, have)], dtype)[0]
    if kind == "all_reduce":
        return all_reduce(b, x, gshape, dtype)
    if kind == "reduce_scatter" and split_factor(want) == 1:
        return reduce_scatter(b, x, gshape, want, dtype)
    if kind == "all_to_all":
        return all_to_all(b, [(x, gshape, have, want)], dtype)[0]
    from .placements import Replicate
    mid = redistribute(b, x, gshape, have, Replicate(), dtype)
    b.phase = "late"
    return redistribute(b, mid, gshape, Replicate(), want, dtype)
