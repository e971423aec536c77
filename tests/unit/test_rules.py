"""Every family of ``sp_compiler.rules.RULES`` against torch itself, by brute force, on simulated ranks.

The oracle. A case is one op on random *full* (global) inputs, each input with a placement.
The rule is called on a one-node FX graph whose placeholders carry the full tensors as
``meta["val"]`` and returns a ``Decision(out, wants)``. Then, for world N in (2, 3):

    1. every input gets the placement the rule wants for it (``wants``), else keeps its own;
    2. simulated rank r gets its local piece of every input:
           Shard(d)             torch.tensor_split piece r of dim d (numpy.array_split cuts: a length
                                N does not divide is fine, the first S % N pieces one row longer);
                                zig-zag (vanilla_sp_zigzag, the sequence dim only): pieces r and
                                2N-1-r of 2N
           _StridedShard(d, k)  the same, on each of the k blocks of dim d, blocks kept in order
           Replicate            the whole tensor
           Partial              a random summand; the N summands add up to the full tensor
    3. rank r runs the op on its local pieces, with *local* sizes where the op carries sizes the
       way ``passes/localize.py`` writes them (view/reshape/expand: the output's sharded dim
       becomes rank r's size of it; split of a dim sharded in its blocks: rank r's block size);
       rows kept from a sequence-sharded dim (keep-rows slice/index -> Partial) run
       ``collectives.gather_rows``, what ``localize`` turns them into;
    4. the ranks' outputs, read under ``Decision.out``, must equal the op on the full inputs:
           Shard                the pieces concatenated in rank order (per block for k > 1)
           Replicate            every rank's output equals the full output
           Partial              the ranks' outputs sum to the full output

So a rule passes when what it says each rank holds is what each rank computes (soundness).
Cases may also pin the decision they exercise (``out=``, ``wants=``: the wants that change
a placement), so that a family's interesting paths (a want of Replicate over a reduced dim,
Partial + bias -> Partial with the bias wanted Partial, ...) stay exercised.

Attention ops without a CPU kernel (flash/efficient/cudnn CUDA kernels) run on meta tensors:
every output's local shape is checked against the placement, and output 0 (attention itself)
is checked numerically with ``aten.scaled_dot_product_attention`` standing in for the kernel.
Rows-split causal attention is checked for its decision only: ``passes/rows_attention.py``
adds the per-chunk causal offset later.

``test_every_rule_has_a_case`` fails when an op of RULES has no case here (a new rule needs
one), except the ops in ``NOT_COVERED`` (empty today).

One process, no process group: about 240 cases in a few seconds.
"""
from __future__ import annotations

__all__ = []

import contextlib
import operator
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.moe  # noqa: F401 - registers transformers::grouped_mm_fallback
from torch.fx import Graph, GraphModule

from sp_compiler.collectives import Builder, gather_rows
from sp_compiler.config import Options
from sp_compiler.context import PassContext
from sp_compiler.errors import ShapeConstraintError, ShardingError, UnsupportedOpError
from sp_compiler.placements import (
    Partial, Replicate, Shard, _StridedShard, fmt, is_partial, is_shard, split_factor,
)
from sp_compiler.rules import RULES, RULES_BY_NAME, rule_for

aten = torch.ops.aten
R, P = Replicate(), Partial()
WORLDS = (2, 3)
#: SEQ = 7: neither world divides it (uneven pieces); H = 6: both worlds divide the heads.
B, SEQ, H, D = 2, 7, 6, 4
BIG = 2 ** 63 - 1                  # what Dynamo writes for an open slice end


def S(d, sf=1):
    return Shard(d) if sf == 1 else _StridedShard(d, split_factor=sf)


# ----------------------------------------------------------------------------- inputs

_gen = torch.Generator().manual_seed(0)


def rn(*shape):
    return torch.randn(*shape, generator=_gen, dtype=torch.float64)


def pos(*shape):
    return rn(*shape).abs() + 0.5


def small(*shape):
    """Small integers as floats: comparisons come out both ways."""
    return torch.randint(0, 3, shape, generator=_gen).double()


def ints(hi, *shape):
    return torch.randint(0, hi, shape, generator=_gen)


def bools(*shape):
    return torch.randint(0, 2, shape, generator=_gen).bool()


class T:
    """An input tensor (or a tuple of them, for getitem) with its placement. Compared by identity."""

    def __init__(self, val, p=R):
        self.val, self.p = val, p

    def __repr__(self):
        return f"T({tuple(self.val.shape) if isinstance(self.val, torch.Tensor) else '...'}, {fmt(self.p)})"


@dataclass(eq=False)
class Case:
    family: str
    name: str
    op: object
    args: tuple
    kwargs: dict = field(default_factory=dict)
    strategy: str = "ulysses"
    out: object = None                   # the Decision.out the case exercises (None: not pinned)
    wants: Optional[dict] = None         # {T: placement} that change a placement (None: not pinned)
    values: bool = True                  # False: compare shapes only (torch.empty & co)
    numeric: bool = True                 # False: check the decision only (rows causal attention)
    standin: Optional[Callable] = None   # CUDA-only attention: output 0 by this, shapes on meta
    raises: Optional[type] = None        # the rule must refuse with this error
    worlds: tuple = WORLDS

    @property
    def id(self):
        return f"{self.family}-{self.name}"


def _unpack(outs: tuple):
    return outs[0] if len(outs) == 1 else outs


def _on_meta(case, args, kwargs) -> tuple:
    """The op's outputs on meta tensors. A collective of a group is not run: the fake group would keep
    it in flight to the end of the process; its stand-in (of the same shapes) is."""
    op = case.standin if case.family == "in_group" else case.op
    return _as_tuple(op(*_to_meta(args), **_to_meta(kwargs)))


def _map(a, f):
    """``a`` with every T replaced by f(T), through lists, tuples and dicts."""
    if isinstance(a, T):
        return f(a)
    if isinstance(a, (list, tuple)):
        return type(a)(_map(x, f) for x in a)
    if isinstance(a, dict):
        return {k: _map(v, f) for k, v in a.items()}
    return a


def _ts(case):
    found = []
    _map((case.args, case.kwargs), lambda t: found.append(t) or t)
    return list(dict.fromkeys(found))


# ----------------------------------------------------------------------------- pieces, by hand

def _lens(size, world, zigzag=False):
    """Lengths of the tensor_split pieces of ``size`` (2N pieces with zig-zag)."""
    return [len(c) for c in torch.arange(size).tensor_split(2 * world if zigzag else world)]


def _chunks_of(world, rank, zigzag):
    return (rank, 2 * world - 1 - rank) if zigzag else (rank,)


def _local_len(size, world, rank, zigzag=False):
    lens = _lens(size, world, zigzag)
    return sum(lens[c] for c in _chunks_of(world, rank, zigzag))


def _local_size(size, p, world, rank, zig):
    """Rank ``rank``'s size of a dim of global ``size`` sharded ``p`` (k blocks cut on their own)."""
    sf = split_factor(p)
    return sf * _local_len(size // sf, world, rank, zig(size // sf))


def _piece(t, p, world, rank, zig):
    """Rank ``rank``'s piece of the full tensor ``t`` under the shard ``p``."""
    d, sf = p.dim, split_factor(p)
    shape = list(t.shape)
    blocks = t.reshape(shape[:d] + [sf, shape[d] // sf] + shape[d + 1:])
    z = zig(shape[d] // sf)
    pieces = blocks.tensor_split(2 * world if z else world, dim=d + 1)
    mine = torch.cat([pieces[c] for c in _chunks_of(world, rank, z)], dim=d + 1)
    return mine.reshape(shape[:d] + [-1 if mine.numel() else 0] + shape[d + 1:])


def _assemble(locs, p, gshape, world, zig):
    """The global tensor the ranks' pieces ``locs`` make under the shard ``p``."""
    d, sf = p.dim, split_factor(p)
    size = gshape[d] // sf
    z = zig(size)
    lens = _lens(size, world, z)
    chunks = {}
    for r, x in enumerate(locs):
        assert x.dim() == len(gshape) and all(x.shape[i] == gshape[i] for i in range(len(gshape)) if i != d), \
            f"rank {r}: local shape {tuple(x.shape)} does not fit global {tuple(gshape)} under {fmt(p)}"
        want = sf * sum(lens[c] for c in _chunks_of(world, r, z))
        assert x.shape[d] == want, f"rank {r}: {x.shape[d]} rows of dim {d}, {fmt(p)} says {want}"
        x = x.reshape(list(x.shape[:d]) + [sf, want // sf] + list(x.shape[d + 1:]))
        at = 0
        for c in _chunks_of(world, r, z):
            chunks[c] = x.narrow(d + 1, at, lens[c])
            at += lens[c]
    whole = torch.cat([chunks[c] for c in sorted(chunks)], dim=d + 1)
    return whole.reshape(gshape)


def _summands(t, world, gen):
    """``world`` random tensors that add up to ``t``."""
    parts = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for _ in range(world - 1)]
    return parts + [t - sum(parts)] if parts else [t]


def _local_input(val, p, world, rank, zig, summands):
    if isinstance(p, tuple):
        return tuple(_local_input(v, q, world, rank, zig, s) for v, q, s in zip(val, p, summands))
    if is_shard(p):
        return _piece(val, p, world, rank, zig)
    if is_partial(p):
        return summands[rank]
    return val


# ----------------------------------------------------------------------------- one case

def _context(strategy, world, rank):
    ctx = PassContext(Options.from_dict({"strategy": strategy}), world, rank, None, example_inputs=[],
                      input_fqns=[], seq_len=SEQ)
    ctx.batch = B
    return ctx


def _to_meta(args):
    def conv(a):
        if isinstance(a, torch.Tensor):
            return a.to("meta")
        if isinstance(a, (list, tuple)):
            return type(a)(conv(x) for x in a)
        if isinstance(a, dict):
            return {k: conv(v) for k, v in a.items()}
        return a
    return conv(args)


def _decide(case, world):
    """(node, decision, {T: placement the rule wants it in}) for ``case`` on ``world`` ranks."""
    g = Graph()
    nodes = {}

    def node_of(t):
        if t not in nodes:
            n = g.placeholder(f"in{len(nodes)}")
            n.meta["val"] = t.val
            nodes[t] = n
        return nodes[t]

    args, kwargs = _map(case.args, node_of), _map(case.kwargs, node_of)
    node = g.call_function(case.op, args, kwargs)
    full_args, full_kwargs = _map(case.args, lambda t: t.val), _map(case.kwargs, lambda t: t.val)
    if case.standin is not None:
        node.meta["val"] = _unpack(_on_meta(case, full_args, full_kwargs))
    else:
        node.meta["val"] = case.op(*full_args, **full_kwargs)
    g.output(node)
    by_node = {n: t for t, n in nodes.items()}
    decision = rule_for(node)(node, _context(case.strategy, world, 0), lambda n: by_node[n].p)
    wants = {}
    for n, w in decision.wants.items():
        assert n in by_node, f"the rule wants a placement for {n}, not an input of the node"
        wants[by_node[n]] = w
    return node, decision, wants


def _localized(case, node, decision, placed, world, rank, zig):
    """(args, kwargs) of rank ``rank``: local pieces, sizes localised as ``passes/localize.py`` does."""
    def local(t):
        return t.local[rank]

    args, kwargs = list(_map(case.args, local)), _map(case.kwargs, local)
    out = decision.out
    if case.op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default) \
            and is_shard(out):
        size = list(args[1])
        if size[out.dim] != -1:
            size[out.dim] = _local_size(size[out.dim], out, world, rank, zig)
        args[1] = size
    if case.op == aten.split.Tensor:
        src = placed[case.args[0]]
        dim = (args[2] if len(args) > 2 else 0) % case.args[0].val.dim()
        if is_shard(src) and src.dim == dim:
            args[1] = _local_len(args[1], world, rank, zig(args[1]))
    return args, kwargs


def _vocab_lookup_by_hand(case, world, rank, args):
    """A vocab-parallel lookup as ``localize`` writes it: the ids this rank's rows of the table hold, looked
    up, zeros for the rest."""
    table, ids = args[0], args[1]
    lo = sum(_lens(case.args[0].val.shape[0], world)[:rank])
    held = (ids >= lo) & (ids < lo + table.shape[0])
    return torch.where(held[..., None], table[(ids - lo).clamp(0, table.shape[0] - 1)], 0.0)


def _kept_rows_local(case, ctx, x_local, args):
    """Rank's share of rows kept from its sequence-sharded x: ``collectives.gather_rows``."""
    x = case.args[0]
    gshape = tuple(x.val.shape)
    if case.op == aten.slice.Tensor:
        dim = args[1] % len(gshape)
        start = args[2] if len(args) > 2 else None
        end = args[3] if len(args) > 3 else None
        step = args[4] if len(args) > 4 else 1
        idx = torch.arange(gshape[dim])[start:end:step]
    else:
        (dim,) = [i for i, t in enumerate(args[1]) if t is not None]
        idx = args[1][dim]
    k = len(idx)
    g = Graph()
    xn, ixn = g.placeholder("x"), g.placeholder("idx")
    xn.meta["val"], ixn.meta["val"] = x_local, idx
    out = g.output(None)
    b = Builder(g, after=ixn, before=out, ctx=ctx)
    out.args = (gather_rows(b, xn, gshape, dim, ixn, k),)
    return GraphModule(torch.nn.Module(), g)(x_local, idx)


def _check_output(full, locs, p, world, zig, what, values=True):
    if not isinstance(full, torch.Tensor) or full.numel() == 0:
        return                                      # sizes, None, empty outputs: no data to hold
    if p is None:
        raise AssertionError(f"{what}: a tensor output without a placement")
    close = torch.testing.assert_close if values else (lambda a, b, msg=None: _same_shape(a, b, msg))
    if is_shard(p):
        if not values:
            for r, x in enumerate(locs):
                want = list(full.shape)
                want[p.dim] = _local_size(want[p.dim], p, world, r, zig)
                assert tuple(x.shape) == tuple(want), f"{what}, rank {r}: shape {tuple(x.shape)}, want {want}"
            return
        close(_assemble(locs, p, tuple(full.shape), world, zig), full, msg=lambda m: f"{what} read as {fmt(p)}: {m}")
    elif is_partial(p):
        close(sum(locs[1:], locs[0]), full, msg=lambda m: f"{what} read as P (sum over ranks): {m}")
    else:
        for r, x in enumerate(locs):
            close(x, full, msg=lambda m, r=r: f"{what} read as R, rank {r}: {m}")


def _same_shape(a, b, msg):
    assert a.shape == b.shape and a.dtype == b.dtype, msg(f"{a.shape}/{a.dtype} vs {b.shape}/{b.dtype}")


def _as_tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def run_case(case, world):
    if case.raises is not None:
        with pytest.raises(case.raises):
            _decide(case, world)
        return
    node, decision, wants = _decide(case, world)
    ts = _ts(case)
    placed = {t: wants.get(t, t.p) for t in ts}

    # the decision: well formed, and the one the case pins
    val = node.meta["val"]
    if isinstance(val, (tuple, list)):
        assert isinstance(decision.out, tuple) and len(decision.out) == len(val), \
            f"{len(val)} outputs, out={fmt(decision.out)}"
    else:
        assert not isinstance(decision.out, tuple), f"one output, out={fmt(decision.out)}"
    if case.out is not None:
        assert decision.out == case.out, f"out {fmt(decision.out)}, the case expects {fmt(case.out)}"
    if case.wants is not None:
        changed = {t: w for t, w in wants.items() if w != t.p}
        assert changed == case.wants, (f"wants {[(t, fmt(w)) for t, w in changed.items()]}, the case expects "
                                       f"{[(t, fmt(w)) for t, w in case.wants.items()]}")
    if not case.numeric:
        return

    # simulated ranks
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()) + world)
    zig_on = _context(case.strategy, world, 0).zigzag

    def zig(size):                               # zig-zag cuts the sequence only (PassContext.layout)
        return zig_on and size == SEQ

    for t in ts:
        p = placed[t]
        summands = None
        if isinstance(p, tuple):
            summands = [_summands(v, world, gen) if is_partial(q) else None for v, q in zip(t.val, p)]
        elif is_partial(p):
            summands = _summands(t.val, world, gen)
        t.local = [_local_input(t.val, p, world, r, zig, summands) for r in range(world)]

    outs = []
    for r in range(world):
        ctx = _context(case.strategy, world, r)
        args, kwargs = _localized(case, node, decision, placed, world, r, zig)
        x0 = case.args[0] if case.args and isinstance(case.args[0], T) else None
        if is_partial(decision.out) and case.op in (aten.slice.Tensor, aten.index.Tensor) and is_shard(placed[x0]):
            outs.append(_kept_rows_local(case, ctx, args[0], args))
        elif is_partial(decision.out) and case.op == aten.embedding.default:
            outs.append(_vocab_lookup_by_hand(case, world, r, args))
        elif case.standin is not None:
            outs.append((_on_meta(case, args, kwargs), case.standin(*args[:3], **kwargs)))
        else:
            outs.append(case.op(*args, **kwargs))

    full_args, full_kwargs = _map(case.args, lambda t: t.val), _map(case.kwargs, lambda t: t.val)
    if case.standin is not None:                 # shapes of every output on meta, values of output 0
        for i, (full_i, p_i) in enumerate(zip(_as_tuple(val), _as_tuple(decision.out))):
            _check_output(full_i, [o[0][i] for o in outs], p_i, world, zig, f"output {i}", values=False)
        _check_output(case.standin(*full_args[:3], **full_kwargs), [o[1] for o in outs], _as_tuple(decision.out)[0],
                      world, zig, "output 0 (stand-in)")
        return
    full = case.op(*full_args, **full_kwargs)
    for i, (full_i, p_i) in enumerate(zip(_as_tuple(full), _as_tuple(decision.out))):
        _check_output(full_i, [_as_tuple(o)[i] for o in outs], p_i, world, zig, f"output {i}", case.values)


# ----------------------------------------------------------------------------- the cases

CASES = []


def case(family, name, op, *args, **kw):
    known = {f for f in Case.__dataclass_fields__ if f not in ("family", "name", "op", "args", "kwargs")}
    opts = {k: kw.pop(k) for k in list(kw) if k in known}
    CASES.append(Case(family, name, op, args, kw, **opts))


def X(p=R, *shape):
    return T(rn(*(shape or (B, SEQ, H))), p)


# --- pointwise: unary
for _name, _op, _make in [
    ("neg", aten.neg.default, rn), ("reciprocal", aten.reciprocal.default, pos), ("abs", aten.abs.default, rn),
    ("rsqrt", aten.rsqrt.default, pos), ("sqrt", aten.sqrt.default, pos), ("exp", aten.exp.default, rn),
    ("log", aten.log.default, pos), ("cos", aten.cos.default, rn), ("sin", aten.sin.default, rn),
    ("tanh", aten.tanh.default, rn), ("erf", aten.erf.default, rn), ("sigmoid", aten.sigmoid.default, rn),
    ("silu", aten.silu.default, rn), ("gelu", aten.gelu.default, rn), ("relu", aten.relu.default, rn),
    ("softplus", aten.softplus.default, rn),
    ("bitwise_not", aten.bitwise_not.default, bools), ("logical_not", aten.logical_not.default, bools),
]:
    case("pointwise", f"{_name}-S1", _op, T(_make(B, SEQ, H), S(1)), out=S(1), wants={})
case("pointwise", "gelu-tanh-S2", aten.gelu.default, X(S(2)), approximate="tanh", out=S(2), wants={})
case("pointwise", "_to_copy-S1", aten._to_copy.default, X(S(1)), dtype=torch.float32, out=S(1), wants={})
case("pointwise", "fill-S1", aten.fill.Scalar, X(S(1)), 1.5, out=S(1), wants={})
case("pointwise", "clamp-S1", aten.clamp.default, X(S(1)), -0.5, 0.5, out=S(1))
case("pointwise", "clamp_min-S1", aten.clamp_min.default, X(S(1)), 0.0, out=S(1))
case("pointwise", "clamp_max-S1", aten.clamp_max.default, X(S(1)), 0.0, out=S(1))
case("pointwise", "pow-Tensor_Scalar-S1", aten.pow.Tensor_Scalar, X(S(1)), 2, out=S(1))
case("pointwise", "relu-S0sf2", aten.relu.default, X(S(0, 2), B * SEQ, H), out=S(0, 2))
case("pointwise", "exp-R", aten.exp.default, X(R), out=R, wants={})

# --- pointwise: with a scalar
for _name, _op, _s in [("add", aten.add.Scalar, 1.5), ("sub", aten.sub.Scalar, 1.5), ("mul", aten.mul.Scalar, 3.0),
                       ("div", aten.div.Scalar, 3.0)]:
    case("pointwise", f"{_name}-Scalar-S1", _op, X(S(1)), _s, out=S(1), wants={})
for _name, _op in [("eq", aten.eq.Scalar), ("ne", aten.ne.Scalar), ("le", aten.le.Scalar), ("lt", aten.lt.Scalar),
                   ("ge", aten.ge.Scalar), ("gt", aten.gt.Scalar)]:
    case("pointwise", f"{_name}-Scalar-S1", _op, T(small(B, SEQ, H), S(1)), 1, out=S(1), wants={})

# --- pointwise: binary, with broadcasting
for _name, _op, _a, _b in [
    ("add", aten.add.Tensor, rn, rn), ("sub", aten.sub.Tensor, rn, rn), ("mul", aten.mul.Tensor, rn, rn),
    ("div", aten.div.Tensor, rn, pos), ("pow", aten.pow.Tensor_Tensor, pos, rn),
    ("maximum", aten.maximum.default, rn, rn), ("minimum", aten.minimum.default, rn, rn),
    ("eq", aten.eq.Tensor, small, small), ("ne", aten.ne.Tensor, small, small), ("le", aten.le.Tensor, small, small),
    ("lt", aten.lt.Tensor, small, small), ("ge", aten.ge.Tensor, small, small), ("gt", aten.gt.Tensor, small, small),
    ("bitwise_and", aten.bitwise_and.Tensor, bools, bools), ("bitwise_or", aten.bitwise_or.Tensor, bools, bools),
    ("logical_and", aten.logical_and.default, bools, bools), ("logical_or", aten.logical_or.default, bools, bools),
]:
    _y = T(_b(SEQ, H))                          # [S, H] against [B, S, H]: y wanted S(0)
    case("pointwise", f"{_name}-S1+R[S,H]", _op, T(_a(B, SEQ, H), S(1)), _y, out=S(1), wants={_y: S(0)})
case("pointwise", "add-S1+R[H]", aten.add.Tensor, X(S(1)), T(rn(H)), out=S(1), wants={})
case("pointwise", "mul-S1*R[B,1,H]", aten.mul.Tensor, X(S(1)), T(rn(B, 1, H)), out=S(1), wants={})
_x = T(rn(SEQ, H))
case("pointwise", "add-R[S,H]+S1", aten.add.Tensor, _x, X(S(1)), out=S(1), wants={_x: S(0)})
_y = X(S(2))
case("pointwise", "add-S1+S2", aten.add.Tensor, X(S(1)), _y, out=S(1), wants={_y: S(1)})
_y = T(rn(SEQ, H), S(1))
case("pointwise", "add-S1+S1[S,H]-resharded", aten.add.Tensor, X(S(1)), _y, out=S(1), wants={_y: S(0)})
_y = T(rn(B * SEQ, H))
case("pointwise", "add-S0sf2+R", aten.add.Tensor, X(S(0, 2), B * SEQ, H), _y, out=S(0, 2), wants={_y: S(0, 2)})
case("pointwise", "add-R+R", aten.add.Tensor, X(R), X(R), out=R, wants={})
_c = T(bools(SEQ, H))
case("pointwise", "where-S1", aten.where.self, _c, X(S(1)), T(rn(1)), out=S(1), wants={_c: S(0)})
_m = T(bools(SEQ, 1))
case("pointwise", "masked_fill-Scalar-S1", aten.masked_fill.Scalar, X(S(1)), _m, -1.0, out=S(1), wants={_m: S(0)})
case("pointwise", "masked_fill-Tensor-S1", aten.masked_fill.Tensor, X(S(1)), T(bools(B, 1, H)), T(rn(())),
     out=S(1), wants={})

# --- pointwise: partial sums
case("pointwise", "add-P+P", aten.add.Tensor, X(P), X(P), out=P, wants={})
case("pointwise", "add-P+P[H]-broadcast", aten.add.Tensor, X(P), T(rn(H), P), out=P, wants={})
case("pointwise", "sub-P-P", aten.sub.Tensor, X(P), X(P), out=P, wants={})
case("pointwise", "add-P+P-alpha", aten.add.Tensor, X(P), X(P), alpha=2.0, out=P, wants={})
case("pointwise", "mul-P*R", aten.mul.Tensor, X(P), X(R), out=P, wants={})
case("pointwise", "mul-R[H]*P", aten.mul.Tensor, T(rn(H)), X(P), out=P, wants={})
case("pointwise", "mul-P*2.0", aten.mul.Tensor, X(P), 2.0, out=P, wants={})
case("pointwise", "div-P/R", aten.div.Tensor, X(P), T(pos(H)), out=P, wants={})
_b = T(rn(H))
case("pointwise", "add-P+bias", aten.add.Tensor, X(P), _b, out=P, wants={_b: P})
_b = X(R)                                               # a bias picked per row: as large as the sum
case("add_", "add_-P+R", aten.add_.Tensor, X(P), _b, out=P, wants={_b: P})
case("add_", "add_-S1+S1", aten.add_.Tensor, X(S(1)), X(S(1)), out=S(1), wants={})
_b = X(R)
case("add_", "add_-S2+R", aten.add_.Tensor, X(S(2)), _b, out=S(2), wants={_b: S(2)})
_b = T(rn(1, SEQ, H))
case("pointwise", "add-bias[1,S,H]+P", aten.add.Tensor, _b, X(P), out=P, wants={_b: P})
case("pointwise", "neg-P", aten.neg.default, X(P), out=P, wants={})
_x, _y = X(P), X(P)
case("pointwise", "mul-P*P", aten.mul.Tensor, _x, _y, out=R, wants={_x: R, _y: R})
_x = X(P)
case("pointwise", "div-R/P", aten.div.Tensor, T(pos(B, SEQ, H)), _x, out=R, wants={_x: R})
_x = X(P)
case("pointwise", "add-P+R-same-shape", aten.add.Tensor, _x, X(R), out=R, wants={_x: R})
_x = X(P)
case("pointwise", "add-P+S1", aten.add.Tensor, _x, X(S(1)), out=S(1), wants={_x: S(1)})
_x = T(rn(SEQ, H), P)
case("pointwise", "add-P[S,H]+S1", aten.add.Tensor, _x, X(S(1)), out=S(1), wants={_x: S(0)})
_x = X(P)
case("pointwise", "add-P+1.0", aten.add.Tensor, _x, 1.0, out=R, wants={_x: R})
_x = X(P)
case("pointwise", "exp-P", aten.exp.default, _x, out=R, wants={_x: R})
_x = T(rn(B, SEQ, H).float(), P)
case("pointwise", "_to_copy-P-upcast", aten._to_copy.default, _x, dtype=torch.float64, out=R, wants={_x: R})
case("pointwise", "_to_copy-P-downcast", aten._to_copy.default, X(P), dtype=torch.float32, out=P, wants={})
_x = X(P)
case("pointwise", "mul-Scalar-P", aten.mul.Scalar, _x, 2.0, out=R, wants={_x: R})

# --- reductions
case("reduction", "sum-other-dim-S1", aten.sum.dim_IntList, X(S(1)), [2], out=S(1), wants={})
case("reduction", "sum-keepdim-S1", aten.sum.dim_IntList, X(S(1)), [-1], True, out=S(1), wants={})
case("reduction", "sum-batch-S1", aten.sum.dim_IntList, X(S(1)), [0], out=S(0), wants={})
_x = X(S(1))
case("reduction", "sum-sharded-dim-S1", aten.sum.dim_IntList, _x, [1], out=R, wants={_x: R})
_x = X(S(1))
case("reduction", "sum-all-S1", aten.sum.default, _x, out=R, wants={_x: R})
case("reduction", "sum-P", aten.sum.dim_IntList, X(P), [2], out=P, wants={})       # the experts' top-k sum
case("reduction", "mean-P", aten.mean.dim, X(P), [1], True, out=P, wants={})
_x = X(P)
case("reduction", "amax-P", aten.amax.default, _x, [2], out=R, wants={_x: R})
case("reduction", "sum-R", aten.sum.dim_IntList, X(R), [1], out=R, wants={})
case("reduction", "sum-other-dim-S1sf2", aten.sum.dim_IntList, X(S(1, 2), 3, B * SEQ, H), [0], out=S(0, 2))
case("reduction", "mean-other-dim-S1", aten.mean.dim, X(S(1)), [-1], True, out=S(1), wants={})
_x = X(S(1))
case("reduction", "mean-sharded-dim-S1", aten.mean.dim, _x, [1], True, out=R, wants={_x: R})
case("reduction", "amax-S1", aten.amax.default, X(S(1)), [2], out=S(1), wants={})
case("reduction", "amin-S2", aten.amin.default, X(S(2)), [1], True, out=S(2), wants={})
_x = X(S(2))
case("reduction", "amax-all-S2", aten.amax.default, _x, [], out=R, wants={_x: R})
case("reduction", "any-S1", aten.any.dim, T(bools(B, SEQ, H), S(1)), 2, out=S(1), wants={})
case("reduction", "argmax-S1", aten.argmax.default, X(S(1)), 2, out=S(1), wants={})
case("reduction", "argmax-keepdim-S1", aten.argmax.default, X(S(1)), -1, True, out=S(1), wants={})
_x = X(S(1))
case("reduction", "argmax-sharded-dim-S1", aten.argmax.default, _x, 1, out=R, wants={_x: R})
_x = X(S(1))
case("reduction", "argmax-all-S1", aten.argmax.default, _x, out=R, wants={_x: R})
case("reduction", "cumsum-S1", aten.cumsum.default, X(S(1)), 2, out=S(1), wants={})
_x = X(S(1))
case("reduction", "cumsum-sharded-dim-S1", aten.cumsum.default, _x, 1, out=R, wants={_x: R})
case("reduction", "softmax-S1", aten._softmax.default, X(S(1)), -1, False, out=S(1), wants={})
_x = X(S(2))
case("reduction", "softmax-sharded-dim-S2", aten._softmax.default, _x, 2, False, out=R, wants={_x: R})
case("reduction", "log_softmax-S2", aten._log_softmax.default, X(S(2)), 1, False, out=S(2), wants={})

# --- native_layer_norm
case("layer_norm", "S1", aten.native_layer_norm.default, X(S(1)), [H], T(rn(H)), T(rn(H)), 1e-5,
     out=(S(1),) * 3, wants={})
case("layer_norm", "no-affine-S0sf2", aten.native_layer_norm.default, X(S(0, 2), B * SEQ, H), [H], None, None, 1e-5,
     out=(S(0, 2),) * 3)
_x = X(S(2))
case("layer_norm", "normalized-dim-S2", aten.native_layer_norm.default, _x, [H], T(rn(H)), None, 1e-5,
     out=(R,) * 3, wants={_x: R})
_x = X(P)
case("layer_norm", "P", aten.native_layer_norm.default, _x, [H], None, None, 1e-5, out=(R,) * 3, wants={_x: R})
_w = T(rn(H), S(0))
case("layer_norm", "weight-S0", aten.native_layer_norm.default, X(S(1)), [H], _w, T(rn(H)), 1e-5,
     out=(S(1),) * 3, wants={_w: R})

# --- transparent / views
case("view", "view-split-hidden-S1", aten.view.default, X(S(1)), [B, SEQ, 2, 3], out=S(1), wants={})
case("view", "view-heads-S2", aten.view.default, X(S(2), B, SEQ, 12), [B, SEQ, 6, 2], out=S(2))
case("view", "view-merge-B-S-S1", aten.view.default, X(S(1)), [B * SEQ, H], out=S(0, B))
case("view", "view-inferred-S1", aten.view.default, X(S(1)), [B, -1, 3, 2], out=S(1))
case("view", "view-P", aten.view.default, X(P), [B * SEQ, H], out=P, wants={})
case("view", "_unsafe_view-S0sf2", aten._unsafe_view.default, X(S(0, 2), B * SEQ, H), [B, SEQ, H], out=S(1))
case("view", "reshape-S1", aten.reshape.default, X(S(1)), [B, SEQ, 3, 2], out=S(1))
case("view", "reshape-merge-S1sf3", aten.reshape.default, X(S(2, 3), B, SEQ, 3 * H), [B, SEQ, 3, H])
case("view", "view-not-representable", aten.view.default, X(S(0), 6, 2), [4, 3], raises=ShardingError)
case("view", "transpose-S1", aten.transpose.int, X(S(1), B, SEQ, H, D), 1, 2, out=S(2))
case("view", "transpose-neg-S2", aten.transpose.int, X(S(2), B, H, SEQ, D), -1, -2, out=S(3))
case("view", "transpose-P", aten.transpose.int, X(P, B, SEQ, H, D), 1, 2, out=P)
case("view", "t-S0", aten.t.default, X(S(0), SEQ, H), out=S(1))
case("view", "permute-S1", aten.permute.default, X(S(1), B, SEQ, H, D), [0, 2, 1, 3], out=S(2))
case("view", "permute-neg-S3", aten.permute.default, X(S(3), B, H, D, SEQ), [0, -1, 1, 2], out=S(1))
case("view", "unsqueeze-before-S1", aten.unsqueeze.default, X(S(1)), 1, out=S(2))
case("view", "unsqueeze-after-S1", aten.unsqueeze.default, X(S(1)), -1, out=S(1))
case("view", "squeeze-dim-S1", aten.squeeze.dim, X(S(1), B, SEQ, 1), 2, out=S(1))
case("view", "squeeze-dims-S2", aten.squeeze.dims, X(S(2), B, 1, SEQ, D), [1], out=S(1))
case("view", "expand-S2", aten.expand.default, X(S(2), B, 1, SEQ, D), [B, 3, SEQ, D], out=S(2))
case("view", "expand-leading-S0", aten.expand.default, X(S(0), SEQ, D), [B, SEQ, D], out=S(1))
case("view", "expand-P", aten.expand.default, X(P, B, 1, SEQ, D), [B, 3, SEQ, D], out=P)
case("view", "clone-S1", aten.clone.default, X(S(1)), out=S(1))
case("view", "clone-P", aten.clone.default, X(P), out=P)
case("view", "alias-S0sf2", aten.alias.default, X(S(0, 2), B * SEQ, H), out=S(0, 2))
case("view", "detach-S2", aten.detach.default, X(S(2)), out=S(2))
case("view", "slice-other-dim-S1", aten.slice.Tensor, X(S(1)), 2, 1, 4, out=S(1), wants={})
case("view", "slice-full-sharded-dim-S1", aten.slice.Tensor, X(S(1)), 1, 0, BIG, out=S(1), wants={})
_x = X(P)
case("view", "slice-P", aten.slice.Tensor, _x, 2, 0, 3, out=R, wants={_x: R})

# --- keep-rows: slice / index on the sequence-sharded dim -> Partial (collectives.gather_rows)
case("keep_rows", "slice-last-row-S1", aten.slice.Tensor, X(S(1)), 1, -1, BIG, out=P, wants={})
case("keep_rows", "slice-middle-S1", aten.slice.Tensor, X(S(1)), 1, 2, 6, out=P, wants={})
case("keep_rows", "slice-step-S1", aten.slice.Tensor, X(S(1)), 1, 1, BIG, 2, out=P, wants={})
case("keep_rows", "slice-last-rows-S1-zigzag", aten.slice.Tensor, X(S(1)), 1, -3, BIG, strategy="vanilla_sp_zigzag",
     out=P, wants={})
case("keep_rows", "index-S1", aten.index.Tensor, X(S(1)), [None, T(torch.tensor([6, 0, 3]))], out=P, wants={})
case("keep_rows", "index-negative-S1", aten.index.Tensor, X(S(1)), [None, T(torch.tensor([-1, 2]))], out=P, wants={})
_x = X(S(0, 2), B * SEQ, H)
case("keep_rows", "slice-S0sf2", aten.slice.Tensor, _x, 0, -1, BIG, out=R, wants={_x: R})
_x = X(S(1))
case("keep_rows", "index-other-dim-S1", aten.index.Tensor, _x, [None, None, T(torch.tensor([1, 4]))],
     out=S(1), wants={})
_x = X(S(1), 5, 12)                                     # a sliced expert bias [E, 2I], picked per routed row
case("keep_rows", "index-rows-of-S1", aten.index.Tensor, _x, [T(torch.tensor([3, 0, 3, 1]))], out=S(1), wants={})
# every 2nd column of a column split whose pieces are even (gpt-oss's interleaved [g0, u0, g1, u1, ...])
case("keep_rows", "slice-every-2nd-S2", aten.slice.Tensor, X(S(2), B, SEQ, 12), 2, 1, BIG, 2, out=S(2), wants={})
case("keep_rows", "slice-every-2nd-S2sf2", aten.slice.Tensor, X(S(2, 2), B, SEQ, 24), 2, 0, BIG, 2, out=S(2, 2),
     wants={})
case("keep_rows", "slice-every-2nd-S2-odd-pieces", aten.slice.Tensor, X(S(2), B, SEQ, 9), 2, 0, BIG, 2,
     worlds=(3,), out=P, wants={})                     # pieces of 3: as any other kept rows
case("keep_rows", "index-R", aten.index.Tensor, X(R), [None, T(torch.tensor([1, 4]))], out=R, wants={})
_i = T(torch.tensor([6, 0, 3, 1]), S(0))
case("keep_rows", "index-S1-by-sharded-index", aten.index.Tensor, X(S(1)), [None, _i])
case("keep_rows", "index-P-by-R", aten.index.Tensor, X(P, 5, H), [T(torch.tensor([4, 0, 0, 2]))], out=P,
     wants={})                                                      # the experts' rows back in token order

# --- grouped_mm: rows offs[e-1]:offs[e] of x through expert e (transformers' MoE experts)
_GMM = torch.ops.transformers.grouped_mm_fallback.default
_offs = T(torch.tensor([3, 3, 10, 14], dtype=torch.int32))           # 14 routed rows, 4 experts, one idle
case("grouped_mm", "R@R", _GMM, X(R, 14, H), T(rn(4, H, 5)), _offs, out=R, wants={})
case("grouped_mm", "colwise-R@S2", _GMM, X(R, 14, H), T(rn(4, H, 6), S(2)), _offs, out=S(1), wants={})
case("grouped_mm", "packed-colwise-R@S2sf2", _GMM, X(R, 14, H), T(rn(4, H, 12), S(2, 2)), _offs, out=S(1, 2),
     wants={})
case("grouped_mm", "rowwise-S1@S1", _GMM, X(S(1), 14, H), T(rn(4, H, 5), S(1)), _offs, out=P, wants={})
_x = X(R, 14, H)
case("grouped_mm", "rowwise-R@S1", _GMM, _x, T(rn(4, H, 5), S(1)), _offs, out=P, wants={_x: S(1)})
_x = X(S(0), 14, H)
case("grouped_mm", "rows-S0@R", _GMM, _x, T(rn(4, H, 5)), _offs, out=R, wants={_x: R})   # offs count all rows
_x = X(S(0), 14, H)
case("grouped_mm", "rows-S0@S2", _GMM, _x, T(rn(4, H, 6), S(2)), _offs, out=S(1), wants={_x: R})
# --- moe_experts (expert parallelism; it exchanges rows over a process group, so decisions only here:
# its numerics are tests/test_moe.py's gloo cases)
import sp_compiler.experts  # noqa: E402,F401 - registers seqpar::moe_experts
_MOE = torch.ops.seqpar.moe_experts.default
_ep = dict(numeric=False, standin=lambda *a, **k: None)
case("moe_experts", "all-R", _MOE, X(R, 14, H), _offs, T(rn(4, H, 12), S(0)), T(rn(4, 6, H), S(0)),
     "aten.silu.default", True, "", "all", out=P, wants={}, **_ep)
case("moe_experts", "local-tokens", _MOE, X(S(0, B * 2), B * SEQ * 2, H), _offs, T(rn(4, H, 12), S(0)),
     T(rn(4, 6, H), S(0)), "aten.silu.default", True, "", "all", out=S(0, B * 2), wants={}, **_ep)
_w = T(rn(4, H, 12))
case("moe_experts", "whole-weights-wanted-split", _MOE, X(R, 14, H), _offs, _w, T(rn(4, 6, H), S(0)),
     "aten.silu.default", True, "", "all", out=P, wants={_w: S(0)}, **_ep)
# aten._grouped_mm (the CUDA path; the same rule) runs on CPU in float32 with 16-byte strides only
case("grouped_mm", "aten-colwise-R@S2", aten._grouped_mm.default, T(rn(14, 8).float()), T(rn(4, 8, 8).float(), S(2)),
     _offs, out=S(1), wants={}, worlds=(2,))

# --- max / min over one dim: (values, indices)
case("reduction", "max.dim-S1-over-2", aten.max.dim, X(S(1)), 2, True, out=(S(1), S(1)), wants={})
case("reduction", "min.dim-S1-over-2", aten.min.dim, X(S(1)), -1, out=(S(1), S(1)), wants={})
_x = X(S(1))
case("reduction", "max.dim-S1-over-1", aten.max.dim, _x, 1, out=(R, R), wants={_x: R})
case("reduction", "max.dim-S2-drop-1", aten.max.dim, X(S(2)), 1, out=(S(1), S(1)), wants={})

# --- collectives of a two-level layout's tp-in-group step, seen by the strategy across groups. A stand-in
# computes what the group's T members give when each holds the same x: the placement across groups the
# rule says must hold for it (all_gather and reduce_scatter stack the members on dim 0: T times the blocks).
# (The rule reads the group size from the op's arguments; ``test_rule`` makes a fake group of T, "0".)
_c10d, _TG = torch.ops._c10d_functional, 2
case("in_group", "all_reduce-S1", _c10d.all_reduce.default, X(S(1)), "sum", "0", out=S(1), wants={},
     standin=lambda x, *_: x * _TG)
case("in_group", "wait_tensor-S1", _c10d.wait_tensor.default, X(S(1)), out=S(1), wants={}, standin=lambda x: x)
case("in_group", "all_gather-S0sf2", _c10d.all_gather_into_tensor.default, X(S(0, B), B * SEQ), _TG, "0",
     out=S(0, B * _TG), wants={}, standin=lambda x, n, *_: torch.cat([x] * n))
case("in_group", "all_gather-S1", _c10d.all_gather_into_tensor.default, X(S(1), 4, SEQ, H), _TG, "0",
     out=S(1), wants={}, standin=lambda x, n, *_: torch.cat([x] * n))
case("in_group", "reduce_scatter-S0sf4", _c10d.reduce_scatter_tensor.default, X(S(0, B * _TG), B * _TG * SEQ),
     "sum", _TG, "0", out=S(0, B), wants={}, standin=lambda x, *_: x.view(_TG, -1)[0] * _TG)
case("in_group", "all_reduce-P", _c10d.all_reduce.default, X(P), "sum", "0", raises=ShardingError,
     standin=lambda x, *_: x * _TG)
case("in_group", "reduce_scatter-S0", _c10d.reduce_scatter_tensor.default, X(S(0), B * SEQ), "sum", _TG, "0",
     raises=ShardingError, standin=lambda x, *_: x.view(_TG, -1)[0] * _TG)

# --- mm
case("mm", "rows-S0@R", aten.mm.default, X(S(0), B * SEQ, H), T(rn(H, 5)), out=S(0), wants={})
case("mm", "rows-S0sf2@R", aten.mm.default, X(S(0, B), B * SEQ, H), T(rn(H, 5)), out=S(0, B), wants={})
case("mm", "colwise-R@S1", aten.mm.default, X(R, B * SEQ, H), T(rn(H, 6), S(1)), out=S(1), wants={})
_x = X(S(0, B), B * SEQ, H)
case("mm", "colwise-S0sf2@S1", aten.mm.default, _x, T(rn(H, 6), S(1)), out=S(1), wants={_x: R})
case("mm", "rowwise-S1@S0", aten.mm.default, X(S(1), B * SEQ, H), T(rn(H, 5), S(0)), out=P, wants={})
_x = X(R, B * SEQ, H)
case("mm", "rowwise-R@S0", aten.mm.default, _x, T(rn(H, 5), S(0)), out=P, wants={_x: S(1)})
_x = X(S(1), B * SEQ, H)
case("mm", "K-sharded-S1@R-ulysses", aten.mm.default, _x, T(rn(H, 5)), out=S(0, B), wants={_x: S(0, B)})
_x = X(S(1), B * SEQ, H)
case("mm", "K-sharded-S1@R-tp", aten.mm.default, _x, T(rn(H, 5)), strategy="tp", out=R, wants={_x: R})
_x = X(P, B * SEQ, H)
case("mm", "P@R", aten.mm.default, _x, T(rn(H, 5)), out=R, wants={_x: R})
case("mm", "R@R", aten.mm.default, X(R, B * SEQ, H), T(rn(H, 5)), out=R, wants={})
_x = X(P, B * SEQ, H)
case("mm", "P@S1-colwise", aten.mm.default, _x, T(rn(H, 6), S(1)), out=S(1), wants={_x: R})   # kept rows -> lm_head
_x = X(P, B * SEQ, H)
case("mm", "P@S0-rowwise", aten.mm.default, _x, T(rn(H, 5), S(0)), out=P, wants={_x: S(1)})
case("mm", "R@P-refused", aten.mm.default, X(R, B * SEQ, H), T(rn(H, 5), P), raises=UnsupportedOpError)

# --- bmm
case("bmm", "S0@S0", aten.bmm.default, X(S(0), 6, SEQ, D), X(S(0), 6, D, SEQ), out=S(0), wants={})
_a = X(S(1), 6, SEQ, D)
case("bmm", "S1@R", aten.bmm.default, _a, X(R, 6, D, SEQ), out=R, wants={_a: R})
_b = X(R, 6, D, SEQ)
case("bmm", "S0@R", aten.bmm.default, X(S(0), 6, SEQ, D), _b, out=R)
_a = X(P, 6, SEQ, D)
case("bmm", "P@R", aten.bmm.default, _a, X(R, 6, D, SEQ), out=R, wants={_a: R})
case("bmm", "R@R", aten.bmm.default, X(R, 6, SEQ, D), X(R, 6, D, SEQ), out=R, wants={})

# --- embedding
_i = T(ints(11, B, SEQ))
case("embedding", "tokens-ulysses", aten.embedding.default, T(rn(11, H)), _i, out=S(1), wants={_i: S(1)})
_i = T(ints(11, B, SEQ))
case("embedding", "tokens-vanilla_sp_zigzag", aten.embedding.default, T(rn(11, H)), _i, strategy="vanilla_sp_zigzag",
     out=S(1), wants={_i: S(1)})
case("embedding", "tokens-tp", aten.embedding.default, T(rn(11, H)), T(ints(11, B, SEQ)), strategy="tp",
     out=R, wants={})
case("embedding", "tokens-already-S1", aten.embedding.default, T(rn(11, H)), T(ints(11, B, SEQ), S(1)),
     out=S(1), wants={})
case("embedding", "tokens-1d-ulysses", aten.embedding.default, T(rn(11, H)), T(ints(11, SEQ)), out=R, wants={})
# vocab-parallel: every rank looks every id up in its rows of the table (12 rows: 2 and 3 ranks divide them)
case("embedding", "vocab-S0-tp", aten.embedding.default, T(rn(12, H), S(0)), T(ints(12, B, SEQ)), strategy="tp",
     out=P, wants={})
case("embedding", "vocab-S0-megatron_sp", aten.embedding.default, T(rn(12, H), S(0)), T(ints(12, B, SEQ)),
     strategy="megatron_sp", out=P, wants={})
_i = T(ints(12, B, SEQ), S(1))
case("embedding", "vocab-S0-ids-S1", aten.embedding.default, T(rn(12, H), S(0)), _i, out=P, wants={_i: R})

# --- cat
case("cat", "empty-cache+S2", aten.cat.default, [T(torch.empty(B, H, 0, D, dtype=torch.float64)),
                                                  X(S(2), B, H, SEQ, D)], 2, out=S(2), wants={})
case("cat", "legacy-empty(0,)+S1", aten.cat.default, [T(torch.empty(0, dtype=torch.float64)), X(S(1), B, H, SEQ, D)],
     -2, out=S(1), wants={})
case("cat", "S1+S1-other-dim", aten.cat.default, [X(S(1)), X(S(1))], 2, out=S(1), wants={})
_y = X(R, B, SEQ, 3)
case("cat", "S1+R-other-dim", aten.cat.default, [X(S(1)), _y], -1, out=S(1), wants={_y: S(1)})
_y = X(R, B * SEQ, 3)
case("cat", "S0sf2+R", aten.cat.default, [X(S(0, 2), B * SEQ, H), _y], 1, out=S(0, 2), wants={_y: S(0, 2)})
_x, _y = X(S(1)), X(S(1), B, 3, H)
case("cat", "S1+S1-sharded-dim", aten.cat.default, [_x, _y], 1, out=R, wants={_x: R, _y: R})
_y = X(P)
case("cat", "R+P", aten.cat.default, [X(R), _y], 2, out=R, wants={_y: R})
case("cat", "R+R", aten.cat.default, [X(R), X(R)], 0, out=R, wants={})

# --- stack
case("stack", "S1+S1-last", aten.stack.default, [X(S(1)), X(S(1))], -1, out=S(1), wants={})
case("stack", "S1+S1-first", aten.stack.default, [X(S(1)), X(S(1))], 0, out=S(2), wants={})
_y = X(R)
case("stack", "S2+R", aten.stack.default, [X(S(2)), _y], 1, out=S(3), wants={_y: S(2)})
case("stack", "P+P", aten.stack.default, [X(P), X(P)], 0, out=P, wants={})
_y = X(P)
case("stack", "R+P", aten.stack.default, [X(R), _y], 0, out=R, wants={_y: R})

# --- split (+ getitem)
case("split", "qkv-S2sf3", aten.split.Tensor, X(S(2, 3), B, SEQ, 3 * H), H, 2, out=(S(2),) * 3, wants={})
case("split", "other-dim-S1", aten.split.Tensor, X(S(1)), 2, 2, out=(S(1),) * 3, wants={})
_x = X(S(2))
case("split", "sharded-dim-S2", aten.split.Tensor, _x, 2, -1, out=(R,) * 3, wants={_x: R})
_x = X(P)
case("split", "P", aten.split.Tensor, _x, 2, 2, out=(R,) * 3, wants={_x: R})
case("split", "R", aten.split.Tensor, X(R), 4, 1, out=(R,) * 2, wants={})
case("split", "unaligned-S2sf3", aten.split.Tensor, X(S(2, 3), B, SEQ, 3 * H), 7, 2)
case("split_with_sizes", "other-dim-S1", aten.split_with_sizes.default, X(S(1)), [2, 4], 2, out=(S(1),) * 2,
     wants={})
_x = X(S(2))
case("split_with_sizes", "sharded-dim-S2", aten.split_with_sizes.default, _x, [2, 4], -1, out=(R,) * 2,
     wants={_x: R})
_x = X(P)
case("split_with_sizes", "P", aten.split_with_sizes.default, _x, [1, 5], 2, out=(R,) * 2, wants={_x: R})

# --- view_as_complex / view_as_real (complex RoPE: Llama 4, DeepSeek-V2)
case("complex", "view_as_complex-S1", aten.view_as_complex.default, X(S(1), B, SEQ, 3, 2), out=S(1), wants={})
case("complex", "view_as_real-S1", aten.view_as_real.default, T(torch.randn(B, SEQ, 3, dtype=torch.complex128,
                                                                         generator=_gen), S(1)), out=S(1), wants={})
case("complex", "view_as_complex-P", aten.view_as_complex.default, X(P, B, SEQ, 3, 2), out=P, wants={})

# --- constant_pad_nd (MLA's values padded to the keys' head dim)
case("pad", "other-dim-S1", aten.constant_pad_nd.default, X(S(1)), [0, 3], out=S(1), wants={})
_x = X(S(2))
case("pad", "padded-dim-S2", aten.constant_pad_nd.default, _x, [0, 3], out=R, wants={_x: R})
case("pad", "two-dims-S0", aten.constant_pad_nd.default, X(S(0)), [1, 2, 0, 1], out=S(0), wants={})
case("pad", "P-zeros", aten.constant_pad_nd.default, X(P), [0, 3], out=P, wants={})
_x = X(P)
case("pad", "P-ones", aten.constant_pad_nd.default, _x, [0, 3], 1.0, out=R, wants={_x: R})

# --- copy_ (a view of an empty tensor filled in place: HF's MLA keys)
_d = X(R)
case("copy_", "R<-S1", aten.copy_.default, _d, X(S(1)), out=S(1), wants={_d: S(1)})
case("copy_", "S1<-S1", aten.copy_.default, X(S(1)), X(S(1)), out=S(1), wants={})
_s = X(P)
case("copy_", "R<-P", aten.copy_.default, X(R), _s, out=R, wants={_s: R})
_s = X(R)                                 # the second half written into a tensor the first made local
case("copy_", "S1<-R", aten.copy_.default, X(S(1)), _s, out=S(1), wants={_s: S(1)})

_blocks = tuple(rn(B, SEQ, H) for _ in range(3))
case("getitem", "S2-of-split", operator.getitem, T(_blocks, (S(2),) * 3), 1, out=S(2), wants={})
case("getitem", "layer_norm-mean", operator.getitem, T((rn(B, SEQ, H), rn(B, SEQ, 1), rn(B, SEQ, 1)), (S(1),) * 3),
     1, out=S(1), wants={})
case("getitem", "R", operator.getitem, T(_blocks, (R,) * 3), 2, out=R, wants={})

# --- select
case("select", "batch-S1", aten.select.int, X(S(1)), 0, 1, out=S(0), wants={})
case("select", "after-S1", aten.select.int, X(S(1)), -1, 3, out=S(1), wants={})
_x = X(S(1))
case("select", "sharded-dim-S1", aten.select.int, _x, 1, 3, out=R, wants={_x: R})
_x = X(P)
case("select", "P", aten.select.int, _x, 0, 1, out=R, wants={_x: R})
case("select", "R", aten.select.int, X(R), 2, 0, out=R, wants={})

# --- creation (-> Replicate)
case("creation", "arange", aten.arange.default, SEQ, out=R)
case("creation", "arange-start", aten.arange.start, 2, SEQ, out=R)
case("creation", "arange-start_step", aten.arange.start_step, 0, 10, 3, dtype=torch.int64, out=R)
case("creation", "full", aten.full.default, [B, SEQ], 1.5, out=R)
case("creation", "zeros", aten.zeros.default, [B, SEQ], dtype=torch.float64, out=R)
case("creation", "ones", aten.ones.default, [B, SEQ], out=R)
case("creation", "empty", aten.empty.memory_format, [B, SEQ], out=R, values=False)
case("creation", "scalar_tensor", aten.scalar_tensor.default, 2.5, out=R)
case("creation", "new_ones-of-S1", aten.new_ones.default, X(S(1)), [SEQ, SEQ], out=R, wants={})
case("creation", "new_zeros-of-S1", aten.new_zeros.default, X(S(1)), [SEQ], out=R, wants={})
case("creation", "new_empty-of-S1", aten.new_empty.default, X(S(1)), [SEQ, 2], out=R, values=False)
case("creation", "new_full-of-P", aten.new_full.default, X(P), [SEQ, 2], -1.0, out=R, wants={})
case("creation", "full_like-R", aten.full_like.default, X(R), 2.0, out=R)
case("creation", "zeros_like-P", aten.zeros_like.default, X(P), out=R)
case("creation", "ones_like-R", aten.ones_like.default, T(ints(5, B, SEQ)), out=R)
case("creation", "empty_like-of-S1", aten.empty_like.default, X(S(1)), out=S(1), values=False)
case("creation", "lift_fresh_copy-R", aten.lift_fresh_copy.default, T(torch.tensor([1.0, 2.0, 3.0])), out=R)
for _name, _op, _extra in [("full_like", aten.full_like.default, (2.0,)), ("zeros_like", aten.zeros_like.default, ()),
                           ("ones_like", aten.ones_like.default, ())]:
    case("creation", f"{_name}-of-S1", _op, X(S(1)), *_extra)

# --- replicated-only: index/gather/index_select/diff/tril/triu gather a sharded input
_x = X(S(1))
case("replicated_only", "gather-S1", aten.gather.default, _x, 2, T(ints(H, B, SEQ, 2)), out=R, wants={_x: R})
_x = X(S(1))
case("replicated_only", "index_select-S1", aten.index_select.default, _x, 1, T(torch.tensor([4, 1])), out=R,
     wants={_x: R})
_x = X(S(1))
case("replicated_only", "diff-S1", aten.diff.default, _x, 1, 1, out=R, wants={_x: R})
_x = X(S(0), SEQ, SEQ)
case("replicated_only", "tril-S0", aten.tril.default, _x, out=R, wants={_x: R})
_x = X(P, SEQ, SEQ)
case("replicated_only", "triu-P", aten.triu.default, _x, 1, out=R, wants={_x: R})
case("replicated_only", "triu-R", aten.triu.default, X(R, SEQ, SEQ), out=R, wants={})
_x = X(S(2), B, H, SEQ)                                 # a causal depthwise conv over the sequence (Qwen3-Next)
case("replicated_only", "convolution-S2", aten.convolution.default, _x, T(rn(H, 1, 3)), None, [1], [2], [1], False,
     [0], H, out=R, wants={_x: R})

# --- repeat_interleave
case("repeat_interleave", "other-dim-S2", aten.repeat_interleave.self_int, X(S(2), B, 3, SEQ, D), 2, 1,
     out=S(2), wants={})
_x = X(S(1), B, 3, SEQ, D)
case("repeat_interleave", "sharded-dim-S1", aten.repeat_interleave.self_int, _x, 2, 1, out=R, wants={_x: R})
case("repeat_interleave", "P", aten.repeat_interleave.self_int, X(P, B, 3, SEQ, D), 2, 1, out=P, wants={})
case("repeat_interleave", "output_size-S2", aten.repeat_interleave.self_int, X(S(2), B, 3, SEQ, D), 2, 1,
     output_size=6, out=S(2), wants={})
case("repeat_interleave", "flat-R", aten.repeat_interleave.self_int, X(R, 3, 2), 2, out=R)

# --- attention: heads (q/k/v -> S(1)) and rows (vanilla_sp: q S(2), k/v R)
FLASH_CPU = aten._scaled_dot_product_flash_attention_for_cpu.default


def qkv(p=R, heads=H):
    return tuple(T(rn(B, heads, SEQ, D), p) for _ in range(3))


_q, _k, _v = qkv(R)
case("attention", "heads-from-R", FLASH_CPU, _q, _k, _v, out=(S(1), S(1)), wants={_q: S(1), _k: S(1), _v: S(1)})
_q, _k, _v = qkv(S(2))
case("attention", "heads-from-S2-causal", FLASH_CPU, _q, _k, _v, 0.0, True, out=(S(1), S(1)),
     wants={_q: S(1), _k: S(1), _v: S(1)})
_q, _k, _v = qkv(S(1))
_m = T(rn(B, 1, SEQ, SEQ))
case("attention", "heads-mask[B,1,S,S]", FLASH_CPU, _q, _k, _v, attn_mask=_m, scale=0.3, out=(S(1), S(1)),
     wants={})
_q, _k, _v = qkv(S(1))
_m = T(rn(B, H, SEQ, SEQ))
case("attention", "heads-mask[B,H,S,S]", FLASH_CPU, _q, _k, _v, attn_mask=_m, out=(S(1), S(1)), wants={_m: S(1)})
case("attention", "heads-not-divisible", FLASH_CPU, *qkv(R, heads=5), raises=ShapeConstraintError)
_q, _k, _v = qkv(S(2))
case("attention", "rows-vanilla_sp", FLASH_CPU, _q, _k, _v, strategy="vanilla_sp", out=(S(2), S(2)),
     wants={_k: R, _v: R})
_q, _k, _v = qkv(R)
_m = T(rn(B, 1, SEQ, SEQ))
case("attention", "rows-vanilla_sp-mask", FLASH_CPU, _q, _k, _v, attn_mask=_m, strategy="vanilla_sp",
     out=(S(2), S(2)), wants={_q: S(2), _m: S(2)})
_q, _k, _v = qkv(S(2))
case("attention", "rows-vanilla_sp_zigzag", FLASH_CPU, _q, _k, _v, strategy="vanilla_sp_zigzag", out=(S(2), S(2)),
     wants={_k: R, _v: R})
_q, _k, _v = qkv(S(2))
case("attention", "rows-vanilla_sp-causal-decision", FLASH_CPU, _q, _k, _v, 0.0, True, strategy="vanilla_sp",
     out=(S(2), S(2)), wants={_k: R, _v: R}, numeric=False)


def _sdpa(q, k, v, *args, attn_mask=None, scale=None, **kw):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


_q, _k, _v = qkv(R)
case("attention", "sdpa-heads", aten.scaled_dot_product_attention.default, _q, _k, _v, out=S(1),
     wants={_q: S(1), _k: S(1), _v: S(1)})
# CUDA-only kernels: every output's local shape on meta tensors, output 0 by the math kernel
for _name, _op, _extra in [
    ("flash", aten._scaled_dot_product_flash_attention.default, ()),
    ("efficient", aten._scaled_dot_product_efficient_attention.default, (None, False)),
    ("efficient-lse", aten._scaled_dot_product_efficient_attention.default, (None, True)),   # lse [B, H, 32k]
    ("cudnn", aten._scaled_dot_product_cudnn_attention.default, (None, True)),
]:
    for _strategy, _split in (("ulysses", S(1)), ("vanilla_sp", S(2))):
        _q, _k, _v = qkv(R)
        _wants = {_q: S(1), _k: S(1), _v: S(1)} if _split == S(1) else {_q: S(2)}
        case("attention", f"{_name}-{'heads' if _split == S(1) else 'rows'}-meta", _op, _q, _k, _v, *_extra,
             strategy=_strategy, standin=_sdpa, wants=_wants)


# ----------------------------------------------------------------------------- tests

#: Ops of RULES without a case here, each with the reason (keep empty where possible).
NOT_COVERED: dict = {}


def _params():
    out = []
    for c in CASES:
        out.append(pytest.param(c, id=c.id))
    return out


def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", _params())
def test_rule(case):
    from sp_compiler.testing import fake_process_group

    with fake_process_group(_TG) if case.family == "in_group" else contextlib.nullcontext():
        _run_worlds(case)


def _run_worlds(case):
    for world in case.worlds:
        try:
            run_case(case, world)
        except AssertionError as e:
            raise AssertionError(f"world {world}: {e}") from None
        except Exception as e:              # a local op that does not run on the pieces, a rule that crashes
            raise AssertionError(f"world {world}: {type(e).__name__}: {e}") from e


def test_every_rule_has_a_case():
    covered = {c.op for c in CASES}
    missing = sorted(str(op) for op in RULES if op not in covered and op not in NOT_COVERED)
    missing += sorted(set(RULES_BY_NAME) - {op.name() for op in covered if isinstance(op, torch._ops.OpOverload)})
    assert not missing, f"ops of rules.RULES with no case in {__name__}: {missing}"
    stale = sorted(str(op) for op in NOT_COVERED if op in covered or op not in RULES)
    assert not stale, f"NOT_COVERED lists ops that are covered or not in RULES: {stale}"
