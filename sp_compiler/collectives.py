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

A dim that N does not divide is cut in balanced chunks (``placements.Layout``): every chunk
travels padded to the largest one, and the padding is dropped on arrival, so no rank ever
computes on a padded row.

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
from .placements import Replicate, Shard, is_partial, is_replicate, is_shard, split_factor

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

__all__ = ["Builder", "redistribute", "collective_kind", "local_slice", "all_gather", "all_gather_flat", "all_reduce", "vocab_lookup",
           "reduce_scatter", "all_to_all", "gather_rows", "ROWS_OF", "collective_row"]


def collective_row(kind, dim, shape, dtype: torch.dtype, what="") -> dict:
    """One row of the collective report (``ctx.collectives``): ``shape`` is the call's NCCL-tests size
    (the whole buffer, [N, F] for a packed gather or exchange), ``bytes`` that buffer's."""
    return dict(kind=kind, dim=dim, shape=tuple(shape), dtype=str(dtype).replace("torch.", ""),
                bytes=math.prod(shape) * dtype.itemsize, what=what)


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
        self.rows.append(collective_row(kind, dim, shape, dtype, what))


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


def _cat(b, pieces, d):
    return pieces[0] if len(pieces) == 1 else b(aten.cat.default, pieces, d)


def _pad_to(b, x, d, nd, n, rows):
    """Append zero rows to dim ``d`` (now ``n`` rows) until it has ``rows``."""
    if n == rows:
        return x
    return b(aten.constant_pad_nd.default, x, [0, 0] * (nd - 1 - d) + [0, rows - n], 0.0)


def _rank_major(b, x, d, nd, lay):
    """Whole tensor, dim d in sequence order -> [.., N * per_rank * pad, ..]: block j holds rank j's
    chunks, each padded to ``lay.pad`` rows. What a split into N equal pieces sends to each rank."""
    if lay.plain:
        return x
    pieces = [_pad_to(b, b(aten.slice.Tensor, x, d, s, s + n), d, nd, n, lay.pad)
              for j in range(lay.world) for s, n in lay.spans(j)]
    return _cat(b, pieces, d)


def _from_rank_major(b, y, d, lay):
    """Inverse of ``_rank_major``: drop the padding, put the chunks back in sequence order."""
    if lay.plain:
        return y
    pieces = []
    for c in range(lay.n_chunks):
        j, k = lay.owner(c)
        at = (j * lay.per_rank + k) * lay.pad
        pieces.append(b(aten.slice.Tensor, y, d, at, at + lay.span(c)[1]))
    return _cat(b, pieces, d)


def _pad_local(b, x, d, nd, lay, rank):
    """This rank's rows [.., local, ..] -> [.., per_rank * pad, ..]: each chunk padded."""
    if lay.plain:
        return x
    pieces, at = [], 0
    for _, n in lay.spans(rank):
        pieces.append(_pad_to(b, b(aten.slice.Tensor, x, d, at, at + n), d, nd, n, lay.pad))
        at += n
    return _cat(b, pieces, d)


def _unpad_local(b, x, d, lay, rank):
    """Inverse of ``_pad_local``."""
    if lay.plain:
        return x
    return _cat(b, [b(aten.slice.Tensor, x, d, k * lay.pad, k * lay.pad + n)
                    for k, (_, n) in enumerate(lay.spans(rank))], d)


#: node.meta key on a tensor narrowed to this rank's rows: the whole tensor it was narrowed from
ROWS_OF = "seqpar_rows_of"


def local_slice(b: Builder, x, gshape, want):
    """R -> S(d[, sf]): keep this rank's rows, no communication. A computed tensor is
    narrowed where it is made (``sp_compiler.narrow``), so no rank builds all of it."""
    if split_factor(want) == 1 and isinstance(x, Node) and x.op == "call_function" and not x.meta.get(INSERTED):
        out = narrow(b, x, want.dim, _slice_rows)
        out.meta[ROWS_OF] = x                      # passes/mask_blocks may cut these rows finer
        return out
    return _slice_rows(b, x, want.dim, want, gshape)


def _slice_rows(b: Builder, x, dim, want=None, gshape=None):
    want = want or Shard(dim)
    x, shape, d = _expand_strided(b, x, gshape or x.meta["val"].shape, want)
    lay = b.ctx.layout(shape[d])
    y = _cat(b, [b(aten.slice.Tensor, x, d, s, s + n) for s, n in lay.spans(b.ctx.rank)], d)
    shape[d] = lay.local_size(b.ctx.rank)
    return _merge_strided(b, y, shape, want)


def _flatten_for_ranks(b, x, shape, t=None):
    """Local tensor -> [N, F]: row j is what goes to rank j (split along t), or all of it (t None)."""
    N = b.ctx.world
    if t is None:
        y = b(aten.clone.default, x, memory_format=torch.contiguous_format)
        return b(aten.view.default, y, [math.prod(shape)]), list(shape)
    lay = b.ctx.layout(shape[t])
    x = _rank_major(b, x, t, len(shape), lay)
    T = N * lay.per_rank * lay.pad if not lay.plain else shape[t]
    split = shape[:t] + [N, T // N] + shape[t + 1:]                   # [.., N, T/N, ..]
    y = b(aten.reshape.default, x, split)
    y = b(aten.permute.default, y, _perm_to_front(len(split), t))
    y = b(aten.clone.default, y, memory_format=torch.contiguous_format)
    recv_shape = shape[:t] + [T // N] + shape[t + 1:]
    return b(aten.view.default, y, [N, math.prod(recv_shape)]), recv_shape


def _merge_from_ranks(b, part, rshape, s, have, gsize):
    """[N, F] with row j = rank j's (padded) piece of dim s -> the tensor with s whole (``gsize``
    rows), in sequence order."""
    N = b.ctx.world
    y = b(aten.view.default, part, [N] + rshape)                         # [src rank, ..local dims..]
    nd = len(rshape)
    y = b(aten.permute.default, y, [1 + i for i in range(s)] + [0] + [1 + i for i in range(s, nd)])
    full = rshape[:s] + [N * rshape[s]] + rshape[s + 1:]
    y = _from_rank_major(b, b(aten.reshape.default, y, full), s, b.ctx.layout(gsize))
    return _merge_strided(b, y, rshape[:s] + [gsize] + rshape[s + 1:], have)


def _split_packed(b, recv, sizes):
    if len(sizes) == 1:
        return [recv]
    pieces = b(aten.split_with_sizes.default, recv, sizes, 1)
    return [b(operator.getitem, pieces, i) for i in range(len(sizes))]


def _send_shape(b, x, gshape, have):
    """(x, local shape, dim, global rows of that dim) with S(d, sf) seen as [.., sf, rows, ..] and this
    rank's chunks padded for the wire."""
    x, shape, s = _expand_strided(b, x, b.ctx.local_shape(gshape, have), have)
    gsize = gshape[have.dim] // split_factor(have)
    lay = b.ctx.layout(gsize)
    x = _pad_local(b, x, s, len(shape), lay, b.ctx.rank)
    if not lay.plain:
        shape[s] = lay.per_rank * lay.pad
    return x, shape, s, gsize


def all_gather(b: Builder, items: Sequence[tuple], dtype, what="") -> List[Node]:
    """Packed all_gather. ``items`` = [(x, global shape, have S(s[,sf]))]; returns the whole tensors.

    Per tensor pad each local chunk, flatten -> [F_i]; cat -> [sum F_i]; all_gather_into_tensor
    -> [N * sum F_i]; view [N, sum F_i], split, and per tensor put rank j's rows at its chunks of
    dim s, padding dropped.
    """
    N = b.ctx.world
    if b.ctx.in_group:
        return [_all_gather_dims(b, item, dtype, what) for item in items]
    flat, metas = [], []
    for x, gshape, have in items:
        x, shape, s, gsize = _send_shape(b, x, gshape, have)
        f, rshape = _flatten_for_ranks(b, x, shape)
        flat.append(f)
        metas.append((rshape, s, have, gsize))
    sizes = [math.prod(m[0]) for m in metas]
    packed = flat[0] if len(flat) == 1 else b(aten.cat.default, flat)
    recv = b(aten.view.default, _gathered(b, packed, sum(sizes), items[0][2].dim, dtype, what), [N, sum(sizes)])
    return [_merge_from_ranks(b, part, *meta) for part, meta in zip(_split_packed(b, recv, sizes), metas)]


def _all_gather_dims(b: Builder, item, dtype, what="") -> Node:
    """One tensor gathered with its dims kept (the tp step of a two-level layout):

        x [d0, .., d_s / N, ..] -> all_gather_into_tensor -> [N * d0, ..] -> view [N, d0, ..] -> dim s whole

    The step across groups then reads a sequence split of x as the same split of the gathered tensor
    (``rules._in_group_rule``); a packed gather flattens the rows into one dim, which a length the groups
    do not divide cannot follow through the views that unpack it."""
    x, gshape, have = item
    x, shape, s, gsize = _send_shape(b, x, gshape, have)
    y = b(aten.clone.default, x, memory_format=torch.contiguous_format)
    return _merge_from_ranks(b, _gathered(b, y, math.prod(shape), have.dim, dtype, what), shape, s, have, gsize)


def all_gather_flat(b: Builder, x, numel: int, dtype, what="") -> Node:
    """Every rank's own 1-D ``x`` ([numel], contiguous) -> [N, numel], row j from rank j."""
    return b(aten.view.default, _gathered(b, x, numel, None, dtype, what), [b.ctx.world, numel])


def _gathered(b: Builder, x, numel: int, dim, dtype, what="") -> Node:
    """all_gather_into_tensor of contiguous ``x`` ([numel] values) on the group, recorded and waited:
    the ranks' pieces stacked on dim 0, [N * x.shape[0], ..]."""
    g = b(c10d.all_gather_into_tensor.default, x, b.ctx.world, b.ctx.group_name)
    b.record("all_gather", dim, (b.ctx.world, numel), dtype, what)
    b.late()
    return b(c10d.wait_tensor.default, g)


def all_reduce(b: Builder, x, gshape, dtype):
    ar = b(c10d.all_reduce.default, x, "sum", b.ctx.group_name)
    b.record("all_reduce", None, gshape, dtype)
    b.late()
    return b(c10d.wait_tensor.default, ar)


def reduce_scatter(b: Builder, x, gshape, want, dtype):
    """P -> S(d): chunks laid out rank-major (padded where N does not divide the rows), dim d moved
    to the front, reduce_scatter_tensor, back, padding dropped."""
    N, d, nd = b.ctx.world, want.dim, len(gshape)
    lay = b.ctx.layout(gshape[d])
    x = _rank_major(b, x, d, nd, lay)
    perm = _perm_to_front(nd, d)
    y = b(aten.clone.default, b(aten.permute.default, x, perm), memory_format=torch.contiguous_format)
    rs = b(c10d.reduce_scatter_tensor.default, y, "sum", N, b.ctx.group_name)
    b.record("reduce_scatter", d, gshape, dtype)
    b.late()
    y = b(aten.permute.default, b(c10d.wait_tensor.default, rs), _inverse(perm))
    return _unpad_local(b, y, d, lay, b.ctx.rank)


def all_to_all(b: Builder, items: Sequence[tuple], dtype, what="") -> List[Node]:
    """Packed all_to_all. ``items`` = [(x, global shape, have S(s[,sf]), want S(t))].

    Per tensor (local [.., L_s, .., T, ..]):  pad s's chunks, lay t out rank-major (padded where N
    does not divide it), split t as [N, T/N], move N to the front, flatten -> [N, F_i];  cat all ->
    [N, sum F_i];  all_to_all_single over dim 0;  split back, and per tensor put source rank j's
    rows at its chunks of dim s and drop t's padding.
    """
    N, group = b.ctx.world, b.ctx.group_name
    flat, metas = [], []
    for x, gshape, have, want in items:
        x, shape, s, gsize = _send_shape(b, x, gshape, have)
        t = want.dim + (1 if split_factor(have) > 1 and want.dim > have.dim else 0)
        f, rshape = _flatten_for_ranks(b, x, shape, t)
        flat.append(f)
        metas.append((rshape, s, have, gsize, t, b.ctx.layout(shape[t])))
    sizes = [math.prod(m[0]) for m in metas]
    packed = flat[0] if len(flat) == 1 else b(aten.cat.default, flat, 1)
    a2a = b(c10d.all_to_all_single.default, packed, [1] * N, [1] * N, group)
    b.record("all_to_all", f"{items[0][2].dim}->{items[0][3].dim}", (N, sum(sizes)), dtype, what)
    b.late()
    recv = b(c10d.wait_tensor.default, a2a)
    outs = []
    for part, (rshape, s, have, gsize, t, lay_t) in zip(_split_packed(b, recv, sizes), metas):
        y = _merge_from_ranks(b, part, rshape, s, have, gsize)
        outs.append(_unpad_local(b, y, t - (1 if split_factor(have) > 1 and t > s else 0), lay_t, b.ctx.rank))
    return outs


def gather_rows(b: Builder, x, shape, d: int, idx, k: int) -> Node:
    """Rows ``idx`` (``k`` of them) of dim ``d`` of a tensor of global ``shape`` this rank holds a
    Shard(d) of, as a Partial: each rank fills the rows it holds and leaves zeros elsewhere.

        x: [B, L_r, H] (rows of this rank), idx: [k] global rows, negative from the end
        li = local row of idx[i], or -1          (one where per local chunk, O(k))
        out = where(li >= 0, x[:, max(li, 0)], 0)  [B, k, H]
    """
    gsize, nd = shape[d], len(shape)
    lay = b.ctx.layout(gsize)
    if lay.local_size(b.ctx.rank) == 0:                        # this rank holds no row at all
        return b(aten.new_zeros.default, x, [*shape[:d], k, *shape[d + 1:]])
    idx = b(aten.remainder.Scalar, idx, gsize)
    local = b(aten.full_like.default, idx, -1)
    at = 0
    for start, n in lay.spans(b.ctx.rank):
        inside = b(aten.bitwise_and.Tensor, b(aten.ge.Scalar, idx, start), b(aten.lt.Scalar, idx, start + n))
        local = b(aten.where.self, inside, b(aten.sub.Scalar, idx, start - at), local)
        at += n
    rows = b(aten.index_select.default, x, d, b(aten.clamp_min.default, local, 0))
    valid = b(aten.view.default, b(aten.ge.Scalar, local, 0), [1] * d + [-1] + [1] * (nd - d - 1))
    return b(aten.where.ScalarOther, valid, rows, 0.0)


def vocab_lookup(b: Builder, weight, ids, vocab: int) -> Node:
    """``embedding(weight, ids)`` with ``weight`` this rank's rows lo:hi of a [V, H] table (vocab-parallel),
    as a Partial: the ids it holds looked up, zeros for the others (one rank holds each id).

        held = (ids >= lo) & (ids < hi)
        out  = where(held[..., None], embedding(weight, where(held, ids - lo, 0)), 0)
    """
    lo, hi = b.ctx.rank * vocab // b.ctx.world, (b.ctx.rank + 1) * vocab // b.ctx.world
    held = b(aten.bitwise_and.Tensor, b(aten.ge.Scalar, ids, lo), b(aten.lt.Scalar, ids, hi))
    rows = b(aten.embedding.default, weight, b(aten.where.ScalarOther, held, b(aten.sub.Scalar, ids, lo), 0))
    return b(aten.where.ScalarOther, b(aten.unsqueeze.default, held, -1), rows, 0.0)


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
    if is_partial(have) and is_replicate(want):
        return "all_reduce"
    if is_partial(have) and split_factor(want) == 1:
        return "reduce_scatter"
    if is_shard(have) and is_shard(want) and split_factor(want) == 1 and have.dim != want.dim:
        return "all_to_all"
    return "via_replicate"                                  # e.g. P -> S(d, sf), S(d, sf) -> S(d)


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
    if kind == "reduce_scatter":
        return reduce_scatter(b, x, gshape, want, dtype)
    if kind == "all_to_all":
        return all_to_all(b, [(x, gshape, have, want)], dtype)[0]
    mid = redistribute(b, x, gshape, have, Replicate(), dtype)
    b.phase = "late"
    return redistribute(b, mid, gshape, Replicate(), want, dtype)
