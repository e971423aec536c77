"""Slice a replicated tensor where it is made, not after: each rank builds only its rows.

    before:  m = where(expand(le(index(pos, [b, arange(S)[:, None]]), ...)), 0, -inf)   # [B, 1, S, S]
             m_local = slice(m, 2, r*L, (r+1)*L)                                       # [B, 1, L, S]
    after:   the slice moves up through pointwise ops, expand, unsqueeze and advanced
             indexing to the tensors that carry dim 2 (here arange(S)), and the mask is
             computed on [B, 1, L, S] only.

Used by ``collectives.local_slice`` for R -> S(d) of any computed tensor. Inputs that are
broadcast along d are left whole; anything the walk does not know is sliced in place.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from .context import INSERTED, PLACEMENT
from .placements import Shard
from .rules import shape_of

aten = torch.ops.aten

__all__ = ["narrow"]

_POINTWISE = {
    aten.where.self, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_not.default,
    aten.logical_and.default, aten.logical_or.default, aten.logical_not.default, aten.eq.Tensor, aten.ne.Tensor,
    aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor, aten.eq.Scalar, aten.ne.Scalar, aten.le.Scalar,
    aten.lt.Scalar, aten.ge.Scalar, aten.gt.Scalar, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor,
    aten._to_copy.default, aten.masked_fill.Scalar,
}


def narrow(b, node: Node, dim: int, slice_fn, memo=None, rows=None) -> Node:
    """Nodes computing this rank's rows (dim ``dim``) of ``node``; ``slice_fn(b, x, dim)`` is the base case.
    ``rows(global size) -> rows kept`` when the rows are not this rank's (a block of query rows)."""
    memo = {} if memo is None else memo
    if rows is not None:
        memo["rows"] = rows
    key = (node, dim)
    if key not in memo:
        memo[key] = _narrow(b, node, dim, slice_fn, memo)
    return memo[key]


def _narrow(b, node, dim, slice_fn, memo):
    shape = shape_of(node)
    if shape[dim] == 1:
        return node
    if node.op != "call_function" or any(a.meta.get(INSERTED) for a in node.all_input_nodes):
        return slice_fn(b, node, dim)
    t = node.target
    if t in _POINTWISE:
        args = [_arg(b, a, len(shape), dim, slice_fn, memo) for a in node.args]
        return _copy(b, node, args, dim)
    if t == aten.expand.default:
        x, sizes = node.args[:2]
        off = len(shape) - len(shape_of(x))
        dx = dim - off
        if dx >= 0 and shape_of(x)[dx] != 1:
            x = narrow(b, x, dx, slice_fn, memo)
        sizes = list(sizes)
        sizes[dim] = -1 if dx >= 0 and shape_of(x) is not None else sizes[dim]
        return _copy(b, node, [x, _local_sizes(b, sizes, dim, shape, memo)], dim)
    if t == aten.unsqueeze.default:
        x, u = node.args
        u = u % len(shape)
        return _copy(b, node, [narrow(b, x, dim - (dim > u), slice_fn, memo), u], dim)
    if t == aten.index.Tensor and all(isinstance(i, Node) for i in node.args[1]) \
            and len(node.args[1]) == len(shape_of(node.args[0])):
        # out = x[i0, i1, ...]: the output's shape is the indices' broadcast shape
        idx = [_arg(b, i, len(shape), dim, slice_fn, memo) for i in node.args[1]]
        return _copy(b, node, [node.args[0], idx], dim)
    return slice_fn(b, node, dim)


def _arg(b, a, out_ndim, dim, slice_fn, memo):
    s = shape_of(a)
    if s is None:
        return a
    d = dim - (out_ndim - len(s))
    return a if d < 0 or s[d] == 1 else narrow(b, a, d, slice_fn, memo)


def _local_sizes(b, sizes, dim, shape, memo):
    rows = memo.get("rows") or (lambda size: b.ctx.layout(size).local_size(b.ctx.rank))
    sizes[dim] = rows(shape[dim])
    return sizes


def _copy(b, node, args, dim):
    n = b(node.target, *args, **node.kwargs)
    n.meta[PLACEMENT] = Shard(dim)
    return n
