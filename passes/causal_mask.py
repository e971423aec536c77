"""causal_mask: a compile-time constant mask equal to the causal pattern -> is_causal.

    HuggingFace 5.x under torch.compile (no attention_mask, no position_ids given):
      pos  = arange(S)                                      [1, S]        (from cache_position)
      q_i  = index(pos, [.., arange(S)[:, None]])           [1, 1, S, 1]
      k_j  = index(pos, [.., arange(S)[None, :]])           [1, 1, 1, S]
      doc  = cumsum(diff(pos) != 1)                         [1, S]        (packed-sequence detection)
      m    = new_ones([]) & (k_j <= q_i) & (doc_i == doc_j)  [1, 1, S, S]  bool
      m    = where(expand(m), 0, -inf)                      [B, 1, S, S]  float
    attention(q, k, v, attn_mask=m)            ->  attention(q, k, v, is_causal=True)

Recognition never builds the S x S mask. The mask's producers are evaluated abstractly:

    Dense(t)       a real tensor of at most ~2·B·(Sq+Sk) elements, or a stride-0 broadcast view
                   of one (``expand``, ``new_ones(x, [])``: no memory). Elementwise ops on
                   broadcast views run on their compact form and are broadcast again.
    Rows(lo, hi)   a bool [.., Sq, Sk] tensor given per row as one interval of keys:
                   m[.., i, j] = lo[.., i] <= j < hi[.., i]            (lo, hi: [.., Sq] ints)
                   - a(j) <= b(i), <, >=, >, ==  with a monotone -> searchsorted, O(S log S)
                   - and: intersect;  or / not: only where the result is again one interval
                   - tril / triu of a bool: intersect with j <= i + d / j >= i + d
                   - expand / unsqueeze / slice / clone / bool casts: on lo, hi
    Rows, additive where(rows, 0, -inf), masked_fill(0, ~rows, -inf), sums of such masks (-inf or the
                   dtype's lowest value, which eager attention's masks use: see ``_masked``)
    unknown        anything else, and everything that reads a graph input (padding masks,
                   position_ids, packed documents): the mask stays as it is

Every step is exact or gives up, so a mask becomes ``is_causal`` only when it is proven to be,
for every batch row and query i, exactly the keys 0..i. Cost and memory are linear in S
(searchsorted: S log S); small masks (S² below the dense limit) are simply evaluated.
Attention drops a causal mask: no rank materialises any mask, and ``rows_attention`` can
split causal attention by chunks instead of masking. The rewrite goes through ``sdpa``:

    attention(q, k, v, <mask>=m, is_causal=False)   ->  sdpa.with_causal: mask None, is_causal True
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node
from torch.fx.node import map_arg

from sp_compiler import sdpa
from sp_compiler.rules import RULES, _pointwise_rule, shape_of

aten = torch.ops.aten
log = logging.getLogger("seqpar")

__all__ = ["causal_mask", "is_causal_mask", "mask_rows", "Rows", "Dense"]


def causal_mask(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    cache, env = {}, {}                 # env: abstract values shared by every layer's mask (HF: one per layer)
    for node in list(gm.graph.nodes):
        if not sdpa.is_attention(node):
            continue
        call = sdpa.bind(node)
        mask = call.mask
        if not isinstance(mask, Node) or call.is_causal:
            continue
        sq, sk = shape_of(call.q)[-2], shape_of(call.k)[-2]
        if sq != sk or shape_of(mask) is None or tuple(shape_of(mask)[-2:]) != (sq, sk):
            continue                                    # a broadcast row or column is never causal
        if mask not in cache:
            cache[mask] = is_causal_mask(gm, mask, env)
        if cache[mask]:
            sdpa.with_causal(node)
            log.debug("seqpar: %s: constant causal mask %s dropped", node.name, mask.name)
    gm.graph.eliminate_dead_code()
    return gm


def is_causal_mask(gm: torch.fx.GraphModule, mask: Node, env: Optional[dict] = None) -> bool:
    """True only if ``mask`` depends on no graph input and equals the causal pattern (bool: True on
    and below the diagonal, False above; float: 0 on and below, -inf above) for every batch row.
    ``env``: abstract values of nodes already evaluated (shared between masks of one graph)."""
    shape = shape_of(mask)
    if shape is None or len(shape) < 2 or shape[-1] != shape[-2]:
        return False
    value = mask_rows(gm, mask, env)
    if isinstance(value, Dense):
        m = value.t
        if not isinstance(m, torch.Tensor):
            return False
        m = _compact(m, len(shape))                     # repeated batch rows dropped: a view
        if m.numel() <= _limit(shape) and tuple(m.shape[-2:]) == tuple(shape[-2:]):
            return _dense_is_causal(m, m.shape)
        value = _as_rows(value, shape)                  # a broadcast constant, never materialised here
    if isinstance(value, Rows):
        S = shape[-1]
        rows = torch.arange(1, S + 1, device=value.hi.device)
        return tuple(value.shape) == tuple(shape) and bool((value.lo == 0).all()) and bool((value.hi == rows).all())
    return False


# ----------------------------------------------------------------------------- abstract values

@dataclass
class Dense:
    """A real value: a tensor (small, or a stride-0 broadcast view of a small one), or a Python value."""
    t: object


@dataclass
class Rows:
    """A [.., Sq, Sk] mask, one interval of keys per row: ``lo[.., i] <= j < hi[.., i]`` (empty: 0, 0).
    ``lo``/``hi`` are int64 of ``len(shape) - 1`` dims, each of the logical size or 1 (broadcast).
    ``additive``: a float mask, 0 inside the interval and -inf outside; else bool, True inside."""
    lo: torch.Tensor
    hi: torch.Tensor
    shape: tuple
    additive: bool = False
    dtype: torch.dtype = torch.bool


def mask_rows(gm: torch.fx.GraphModule, mask: Node, env: Optional[dict] = None):
    """Abstract value of ``mask``: Dense, Rows, or None (unknown / depends on a graph input).
    ``env`` (node -> abstract value) is read and filled: pass one dict to share work between masks."""
    shape = shape_of(mask)
    if shape is None or len(shape) < 2:
        return None
    limit = _limit(shape)
    env = {} if env is None else env
    order, seen, stack = [], set(), [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n in env:                    # evaluated for an earlier mask
            if env[n] is None:
                return None
            seen.add(n)
            continue
        seen.add(n)
        if n.op == "placeholder":
            return None
        order.append(n)
        stack.extend(n.all_input_nodes)
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted(order, key=index.__getitem__):
        try:
            env[n] = _eval(gm, n, env, limit)
        except Exception as e:  # noqa: BLE001 - an op we cannot evaluate: the mask stays
            log.debug("seqpar: causal_mask: %s not evaluated: %s: %s", n.name, type(e).__name__, e)
            env[n] = None
        if env[n] is None:
            return None
    return env[mask]


def _limit(shape) -> int:
    """Elements of the biggest tensor built while looking at a mask of ``shape`` [.., Sq, Sk]: linear in S."""
    return 2 * math.prod(shape[:-2]) * (shape[-2] + shape[-1]) + 16


def _eval(gm, n: Node, env, limit):
    if n.op == "get_attr":
        return Dense(getattr(gm, n.target))
    if n.op != "call_function":
        return None
    if any(env[a] is None for a in n.all_input_nodes):
        return None
    vals = [env[a] for a in n.all_input_nodes]
    fake = n.meta.get("val")
    if all(isinstance(v, Dense) for v in vals):
        if not _is_big(fake, limit):
            args, kwargs = map_arg((n.args, n.kwargs), lambda a: env[a].t)
            return Dense(n.target(*args, **kwargs))
        dense = _dense_big(n, env, fake, limit)
        if dense is not None:
            return dense
    if not isinstance(fake, torch.Tensor):
        return None
    handler = _HANDLERS.get(n.target)
    return handler(n, env, tuple(fake.shape), fake.dtype) if handler else None


def _is_big(fake, limit) -> bool:
    vals = fake if isinstance(fake, (tuple, list)) else [fake]
    return any(isinstance(v, torch.Tensor) and v.numel() > limit for v in vals)


# ----------------------------------------------------------------------------- big dense values

_ELEMENTWISE = {op for op, rule in RULES.items() if rule is _pointwise_rule} | {
    aten.clone.default, aten.alias.default, aten.detach.default, aten.full_like.default,
    aten.zeros_like.default, aten.ones_like.default}
_VIEWS = {aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.slice.Tensor,
          aten.select.int, aten.permute.default, aten.transpose.int, aten.t.default, aten.alias.default,
          aten.detach.default}
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_FILLED = {aten.full.default, aten.ones.default, aten.zeros.default, aten.new_ones.default,
           aten.new_zeros.default, aten.new_full.default}


def _dense_big(n, env, fake, limit) -> Optional[Dense]:
    """A big output of Dense inputs without materialising it: a view, a constant fill, or an
    elementwise op whose inputs' compact forms broadcast to something small. None otherwise."""
    if not isinstance(fake, torch.Tensor):
        return None
    args, kwargs = map_arg((n.args, n.kwargs), lambda a: env[a].t)
    t = n.target
    if t in _VIEWS:
        return Dense(t(*args, **kwargs))                          # shares its input's storage
    if t in _RESHAPES:
        return Dense(args[0].view(fake.shape))                    # raises where a copy would be needed
    if t in _FILLED:
        named = sdpa.bind_args(t, args, kwargs)
        named["size"] = []
        return Dense(t(**named).expand(fake.shape))
    if t in _ELEMENTWISE:
        nd = fake.dim()
        cargs, ckwargs = map_arg((n.args, n.kwargs), lambda a: _compact(env[a].t, nd))
        tensors = [x for x in (*cargs, *ckwargs.values()) if isinstance(x, torch.Tensor)]
        if math.prod(torch.broadcast_shapes(*(x.shape for x in tensors))) > limit:
            return None
        return Dense(t(*cargs, **ckwargs).expand(fake.shape))
    return None


def _compact(x, nd: int):
    """``x`` aligned to ``nd`` dims, with every broadcast (stride-0) dim cut to size 1: a view."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    x = x.reshape((1,) * (nd - x.dim()) + tuple(x.shape)) if x.dim() < nd else x
    for d in range(x.dim()):
        if x.stride(d) == 0 and x.shape[d] > 1:
            x = x.narrow(d, 0, 1)
    return x


# ----------------------------------------------------------------------------- rows algebra

def _norm_rows(lo, hi):
    empty = lo >= hi
    zero = torch.zeros((), dtype=lo.dtype, device=lo.device)
    return torch.where(empty, zero, lo), torch.where(empty, zero, hi)


def _align(x: torch.Tensor, nd: int) -> torch.Tensor:
    return x.reshape((1,) * (nd - x.dim()) + tuple(x.shape)) if x.dim() < nd else x


def _as_rows(v, shape) -> Optional[Rows]:
    """``v`` (Rows or a bool Dense) as a bool Rows broadcast to ``shape`` ([.., Sq, Sk]); None if it
    is not one interval per row."""
    nd, Sk = len(shape), shape[-1]
    if isinstance(v, Rows):
        if v.additive:
            return None
        lo, hi = _align(v.lo, nd - 1), _align(v.hi, nd - 1)
        if v.shape[-1] == 1 and Sk != 1:                               # True / False along the keys
            full = hi > lo
            lo, hi = torch.zeros_like(lo), torch.where(full, Sk, 0)
        return Rows(lo, hi, tuple(shape))
    t = v.t
    if isinstance(t, bool):
        t = torch.tensor(t)
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
        return None
    c = _compact(t, nd)
    c = c.reshape((1,) * (nd - c.dim()) + tuple(c.shape)) if c.dim() < nd else c
    if c.dim() < 2:
        c = c.reshape((1,) * (2 - c.dim()) + tuple(c.shape))
    if c.shape[-1] == 1:                                                # constant along the keys
        keep = c[..., 0]
        lo = torch.zeros(keep.shape, dtype=torch.long, device=keep.device)
        return Rows(lo, torch.where(keep, Sk, 0).long(), tuple(shape))
    if c.shape[-2] == 1:                                                # constant along the rows
        keys = c[..., 0, :]
        cnt = keys.sum(-1)
        first = keys.long().argmax(-1)
        last = keys.shape[-1] - 1 - keys.flip(-1).long().argmax(-1)
        if not bool(((cnt == 0) | (last - first + 1 == cnt)).all()):
            return None
        lo, hi = _norm_rows(first, torch.where(cnt > 0, last + 1, 0))
        return Rows(lo.unsqueeze(-1), hi.unsqueeze(-1), tuple(shape))
    return None


def _rows_of(n, env, i, shape):
    a = n.args[i]
    return _as_rows(env[a] if isinstance(a, Node) else Dense(a), shape)


def _and(n, env, shape, dtype):
    if dtype != torch.bool:
        return None
    a, b = _rows_of(n, env, 0, shape), _rows_of(n, env, 1, shape)
    if a is None or b is None:
        return None
    lo, hi = _norm_rows(torch.maximum(a.lo, b.lo), torch.minimum(a.hi, b.hi))
    return Rows(lo, hi, shape)


def _union(a: Rows, b: Rows) -> Optional[Rows]:
    ea, eb = a.lo >= a.hi, b.lo >= b.hi
    touch = torch.maximum(a.lo, b.lo) <= torch.minimum(a.hi, b.hi)
    if not bool((ea | eb | touch).all()):
        return None
    lo = torch.where(ea, b.lo, torch.where(eb, a.lo, torch.minimum(a.lo, b.lo)))
    hi = torch.where(ea, b.hi, torch.where(eb, a.hi, torch.maximum(a.hi, b.hi)))
    lo, hi = _norm_rows(lo, hi)
    return Rows(lo, hi, a.shape)


def _or(n, env, shape, dtype):
    if dtype != torch.bool:
        return None
    a, b = _rows_of(n, env, 0, shape), _rows_of(n, env, 1, shape)
    return _union(a, b) if a is not None and b is not None else None


def _complement(r: Rows) -> Optional[Rows]:
    Sk = r.shape[-1]
    empty = r.lo >= r.hi
    if not bool((empty | (r.lo == 0) | (r.hi == Sk)).all()):
        return None                                                      # a hole in the middle
    lo = torch.where(empty, 0, torch.where(r.lo == 0, r.hi, 0))
    hi = torch.where(empty, Sk, torch.where(r.lo == 0, Sk, r.lo))
    lo, hi = _norm_rows(lo, hi)
    return Rows(lo, hi, r.shape)


def _not(n, env, shape, dtype):
    if dtype != torch.bool:
        return None
    r = _rows_of(n, env, 0, shape)
    return _complement(r) if r is not None else None


def _scalar(v):
    """The single value of a Dense scalar (or a broadcast of one), else None."""
    if isinstance(v, Rows) or v is None:
        return None
    t = v.t if isinstance(v, Dense) else v
    if isinstance(t, (bool, int, float)):
        return t
    if isinstance(t, torch.Tensor):
        c = _compact(t, t.dim())
        if c.numel() == 1:
            return c.item()
    return None


def _arg_value(n, env, i):
    a = n.args[i] if i < len(n.args) else None
    return env[a] if isinstance(a, Node) else Dense(a)


def _masked(value, dtype) -> bool:
    """An additive mask's "hidden" value: -inf, or the dtype's lowest (HF's eager masks). The same for
    a causal mask: every query row sees its own key, so softmax gives the hidden keys weight 0 either way."""
    return value == -math.inf or (isinstance(value, float) and value == torch.finfo(dtype).min)


def _select_rows(cond: Rows, x, y, dtype, shape) -> Optional[Rows]:
    """where(cond, x, y) for scalar x, y: the same rows, their complement, or None."""
    if dtype == torch.bool and isinstance(x, bool) and isinstance(y, bool):
        return cond if (x, y) == (True, False) else _complement(cond) if (x, y) == (False, True) else None
    if dtype.is_floating_point and x is not None and y is not None and not isinstance(x, bool) \
            and not isinstance(y, bool):
        if x == 0 and _masked(y, dtype):
            return Rows(cond.lo, cond.hi, shape, additive=True, dtype=dtype)
        if _masked(x, dtype) and y == 0:
            c = _complement(cond)
            return Rows(c.lo, c.hi, shape, additive=True, dtype=dtype) if c is not None else None
    return None


def _where(n, env, shape, dtype):
    cond = _rows_of(n, env, 0, shape)
    if cond is None:
        return None
    return _select_rows(cond, _scalar(_arg_value(n, env, 1)), _scalar(_arg_value(n, env, 2)), dtype, shape)


def _masked_fill(n, env, shape, dtype):
    """masked_fill(x, m, value) = where(m, value, x)."""
    m = _rows_of(n, env, 1, shape)
    x, value = _arg_value(n, env, 0), _scalar(_arg_value(n, env, 2))
    if m is None:
        return None
    if isinstance(x, Rows):
        if x.additive and dtype.is_floating_point and _masked(value, dtype):       # additive & ~m
            keep = _complement(m)
            r = _as_rows(Rows(x.lo, x.hi, x.shape), shape)
            if keep is None or r is None:
                return None
            lo, hi = _norm_rows(torch.maximum(r.lo, keep.lo), torch.minimum(r.hi, keep.hi))
            return Rows(lo, hi, shape, additive=True, dtype=dtype)
        return None
    return _select_rows(m, value, _scalar(x), dtype, shape)


def _add(n, env, shape, dtype):
    """Sum of additive masks (and zeros): the intersection of their rows."""
    parts = [_arg_value(n, env, i) for i in (0, 1)]
    if not dtype.is_floating_point or len(n.args) > 2 or n.kwargs.get("alpha", 1) != 1:
        return None
    rows = []
    for p in parts:
        if isinstance(p, Rows) and p.additive:
            rows.append(_as_rows(Rows(p.lo, p.hi, p.shape), shape))
        elif _scalar(p) != 0 or isinstance(_scalar(p), bool):
            return None
    if not rows or any(r is None for r in rows):
        return None
    lo, hi = rows[0].lo, rows[0].hi
    for r in rows[1:]:
        lo, hi = _norm_rows(torch.maximum(lo, r.lo), torch.minimum(hi, r.hi))
    return Rows(lo, hi, shape, additive=True, dtype=dtype)


def _same(n, env, shape, dtype):
    """clone / alias / casts that keep the values: bool -> bool, float -> float (0 and -inf survive)."""
    r = env[n.args[0]]
    if not isinstance(r, Rows) or tuple(r.shape) != shape:
        return None
    if (r.additive and dtype.is_floating_point) or (not r.additive and dtype == torch.bool):
        return Rows(r.lo, r.hi, shape, r.additive, dtype)
    return None


def _broadcast(n, env, shape, dtype):
    """expand: new batch dims; a key dim of 1 grows to Sk (all or nothing per row)."""
    r = env[n.args[0]]
    if not isinstance(r, Rows) or r.shape[-2] not in (1, shape[-2]) or r.shape[-1] not in (1, shape[-1]):
        return None
    b = _as_rows(Rows(r.lo, r.hi, r.shape), shape)
    return Rows(b.lo, b.hi, shape, r.additive, dtype) if b is not None else None


def _unsqueeze(n, env, shape, dtype):
    r = env[n.args[0]]
    d = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
    d = d + len(shape) if d < 0 else d
    if not isinstance(r, Rows) or d >= len(shape) - 2:
        return None
    lo, hi = _align(r.lo, len(r.shape) - 1), _align(r.hi, len(r.shape) - 1)
    return Rows(lo.unsqueeze(d), hi.unsqueeze(d), shape, r.additive, dtype)


def _slice(n, env, shape, dtype):
    r = env[n.args[0]]
    if not isinstance(r, Rows):
        return None
    a = sdpa.bind_args(n.target, (None, *n.args[1:]), n.kwargs)
    nd = len(r.shape)
    dim = a["dim"] + nd if a["dim"] < 0 else a["dim"]
    picked = range(r.shape[dim])[slice(a["start"], a["end"], a["step"])]
    if len(picked) != shape[dim]:
        return None
    lo, hi = _align(r.lo, nd - 1), _align(r.hi, nd - 1)
    if dim == nd - 1:                                                    # keys: shift and clip
        if picked.step != 1:
            return None
        start, L = picked.start if len(picked) else 0, len(picked)
        lo, hi = _norm_rows((lo - start).clamp(0, L), (hi - start).clamp(0, L))
    elif lo.shape[dim] != 1 or hi.shape[dim] != 1:                       # rows or batch
        idx = torch.tensor(list(picked), dtype=torch.long, device=lo.device)
        lo = lo.index_select(dim, idx) if lo.shape[dim] != 1 else lo
        hi = hi.index_select(dim, idx) if hi.shape[dim] != 1 else hi
    return Rows(lo, hi, shape, r.additive, dtype)


def _band(upper: bool):
    def handler(n, env, shape, dtype):
        """tril(x, d): keys j <= i + d;  triu(x, d): keys j >= i + d;  of a bool x."""
        if dtype != torch.bool or len(shape) < 2:
            return None
        x = _rows_of(n, env, 0, shape)
        d = n.args[1] if len(n.args) > 1 else n.kwargs.get("diagonal", 0)
        if x is None:
            return None
        Sq, Sk = shape[-2:]
        i = torch.arange(Sq, device=x.lo.device)
        lo, hi = ((i + d).clamp(0, Sk), torch.full_like(i, Sk)) if upper else \
            (torch.zeros_like(i), (i + d + 1).clamp(0, Sk))
        lo, hi = _norm_rows(torch.maximum(x.lo, lo), torch.minimum(x.hi, hi))
        return Rows(lo, hi, shape)
    return handler


_FLIP = {"le": "ge", "ge": "le", "lt": "gt", "gt": "lt", "eq": "eq", "ne": "ne"}


def _compare(name):
    def handler(n, env, shape, dtype):
        """a(j) <op> b(i) over [.., Sq, Sk]: one interval per row when a is monotone in j."""
        x, y = _arg_value(n, env, 0), _arg_value(n, env, 1)
        if isinstance(x, Rows) or isinstance(y, Rows):
            return None                     # comparisons of masks with scalars are left to casts
        nd = len(shape)
        if nd < 2:
            return None
        cx, cy = (_compact(v.t, nd) if isinstance(v.t, torch.Tensor) else torch.tensor(v.t) for v in (x, y))
        cx, cy = _align(cx, nd), _align(cy, nd)
        op = name
        if _varies(cx) == "i" and _varies(cy) == "j":
            cx, cy, op = cy, cx, _FLIP[name]
        if _varies(cx) != "j" or _varies(cy) != "i":
            return None
        dt = torch.promote_types(cx.dtype, cy.dtype)
        wide = torch.float64 if dt.is_floating_point else torch.long
        if dt.is_complex or dt == torch.uint64:
            return None
        a, b = cx[..., 0, :].to(dt).to(wide), cy[..., :, 0].to(dt).to(wide)   # a: [.., Sk], b: [.., Sq]
        batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
        a = a.expand(*batch, a.shape[-1]).contiguous()
        b = b.expand(*batch, b.shape[-1]).contiguous()
        if wide.is_floating_point and bool(a.isnan().any() | b.isnan().any()):
            return None
        if not bool((a[..., 1:] >= a[..., :-1]).all()):
            if not bool((a[..., 1:] <= a[..., :-1]).all()):
                return None                                              # not monotone in j
            a, b, op = -a, -b, _FLIP[op]
        Sk = a.shape[-1]
        left = torch.searchsorted(a, b, right=False)                     # first j with a[j] >= b
        right = torch.searchsorted(a, b, right=True)                     # first j with a[j] >  b
        full = torch.full_like(left, Sk)
        lo, hi = {"le": (torch.zeros_like(left), right), "lt": (torch.zeros_like(left), left),
                  "ge": (left, full), "gt": (right, full), "eq": (left, right), "ne": (left, right)}[op]
        lo, hi = _norm_rows(lo, hi)
        rows = Rows(lo, hi, shape)
        return _complement(rows) if op == "ne" else rows
    return handler


def _varies(c: torch.Tensor) -> Optional[str]:
    """'i' if c changes only along the rows (dim -2), 'j' only along the keys (dim -1), else None."""
    if c.shape[-2] > 1 and c.shape[-1] == 1:
        return "i"
    if c.shape[-2] == 1 and c.shape[-1] > 1:
        return "j"
    return None


_HANDLERS = {
    aten.bitwise_and.Tensor: _and, aten.logical_and.default: _and, aten.bitwise_and.Scalar: _and,
    aten.bitwise_or.Tensor: _or, aten.logical_or.default: _or, aten.bitwise_or.Scalar: _or,
    aten.bitwise_not.default: _not, aten.logical_not.default: _not,
    aten.where.self: _where, aten.masked_fill.Scalar: _masked_fill, aten.masked_fill.Tensor: _masked_fill,
    aten.add.Tensor: _add,
    aten.clone.default: _same, aten.alias.default: _same, aten.detach.default: _same,
    aten._to_copy.default: _same, aten.expand.default: _broadcast, aten.unsqueeze.default: _unsqueeze,
    aten.slice.Tensor: _slice, aten.tril.default: _band(upper=False), aten.triu.default: _band(upper=True),
    **{getattr(aten, c).Tensor: _compare(c) for c in ("le", "lt", "ge", "gt", "eq", "ne")},
}


# ----------------------------------------------------------------------------- small masks

def _dense_is_causal(m, shape) -> bool:
    """A mask small enough to hold (at most the dense limit): compare it with the pattern."""
    if not isinstance(m, torch.Tensor) or m.dim() == 0:
        return False
    m = m.expand(shape)
    S = shape[-1]
    allowed = torch.ones(S, S, dtype=torch.bool, device=m.device).tril()
    if m.dtype == torch.bool:
        return bool((m == allowed).all())
    if not m.dtype.is_floating_point:
        return False
    return bool((m[..., allowed] == 0).all()) and bool((m[..., ~allowed] <= torch.finfo(m.dtype).min).all())
