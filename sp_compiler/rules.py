"""Placement propagation rules: one table, op -> rule, grouped by family.

A rule looks at a node and the placements its inputs have now, and returns a
``Decision``: the placement of the node's output, plus the placements it *wants* for
some inputs. A want that differs from what an input has becomes a collective (or a
local slice) in the ``insert`` pass, e.g.

    mm(x: S(0), w: S(1))      -> wants x: R              (all_gather, megatron)
    add(res: S(1), y: P)      -> wants y: S(1)           (reduce_scatter)
    attention(q: S(2), ...)   -> wants q, k, v: S(1)     (all_to_all, ulysses)

Strategy choices enter in three places only: the embedding (is the residual stream
sequence sharded?), attention (heads or query rows) and the weights' placements, which
``annotate`` sets from the strategy's TP plan.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch.fx import Node

from . import sdpa
from .errors import ShardingError, UnsupportedOpError
from .placements import (
    Partial, RankLocal, Replicate, Shard, TokenLocal, fmt, is_partial, is_rank_local, is_replicate, is_shard,
    is_token_local, make_shard, shard_dim, size_hint, split_factor, with_dim,
)

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

__all__ = [
    "Decision", "RULES", "RULES_BY_NAME", "TRANSPARENT", "ATTENTION_OPS", "MADE", "UNIFORM", "rule_for",
    "map_through", "view_map", "shape_of", "tensor_inputs", "attention_inputs", "kept_rows", "token_blocks",
    "token_local_rule", "ALIASES", "kv_sources",
]


@dataclass
class Decision:
    out: object                                         # placement, or tuple for multi-output ops
    wants: Dict[Node, object] = field(default_factory=dict)
    group: Optional[Node] = None                        # collectives demanded here may be packed together


# ----------------------------------------------------------------------------- helpers

def shape_of(n) -> Optional[tuple]:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def tensor_inputs(node: Node) -> list:
    """Tensor-valued input nodes, in argument order, without repeats."""
    seen = []
    for n in node.all_input_nodes:
        if shape_of(n) is not None and n not in seen:
            seen.append(n)
    return seen


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _infer(shape, numel) -> list:
    shape = list(shape)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = numel // known if known else 0
    return shape


def view_map(src: tuple, dst: tuple, p, world: int):
    """Placement of a view ``src -> dst`` of a tensor placed ``p``; None if not representable.

    Flatten the tensor as [P, M, Q]: P = prod(src[:d]) * sf, M = src[d] / sf is the sharded
    factor, Q the rest. A dst dim e (outer size A, size E) keeps the sharding when A | P and,
    with m = E / (P/A), either e holds all of M (M | m) or the outer part of M in N-aligned
    chunks (m | M and N | m). The new split factor is P / A.

    Sound but not complete: a None where some placement would fit (e.g. (6, 2) S(0) -> (4, 3),
    where each rank holds whole rows) only costs a gather (tests/unit/test_view_map.py checks
    that no answer is ever wrong).
    """
    if not is_shard(p):
        return p
    d, sf = p.dim, split_factor(p)
    dst = _infer(dst, math.prod(src))
    P, M = math.prod(src[:d]) * sf, src[d] // sf
    A = 1
    for e, E in enumerate(dst):
        if E > 1 and P % A == 0 and E % (P // A) == 0:
            m = E // (P // A)
            if m % M == 0 or (M % m == 0 and m % world == 0):
                return make_shard(e, P // A)
        A *= E
        if A > P:
            break
    return None


# Ops that take one tensor and lay its elements out differently; a want on their output
# can be moved to their input (``propagate`` hoists collectives through them).
def _map_view(node, p, forward, world):
    src, dst = shape_of(node.args[0]), shape_of(node)
    return view_map(src, dst, p, world) if forward else view_map(dst, src, p, world)


def _map_expand(node, p, forward, world):
    src, dst = shape_of(node.args[0]), shape_of(node)
    off = len(dst) - len(src)                                        # expand may add leading dims
    d_src = p.dim if forward else p.dim - off
    if d_src < 0 or src[d_src] != dst[d_src + off]:                 # never shard a broadcast dim
        return None
    return with_dim(p, d_src + off if forward else d_src)


def _map_perm(perm):
    def f(node, p, forward, world):
        return with_dim(p, perm(node).index(p.dim) if forward else perm(node)[p.dim])
    return f


def _transpose_perm(node):
    nd = len(shape_of(node))
    a, b = (_norm(node.args[1], nd), _norm(node.args[2], nd)) if node.target != aten.t.default else (0, 1)
    perm = list(range(nd))
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _map_unsqueeze(node, p, forward, world):
    u = _norm(node.args[1], len(shape_of(node)))
    if forward:
        return with_dim(p, p.dim + (p.dim >= u))
    return None if p.dim == u else with_dim(p, p.dim - (p.dim > u))


def _map_squeeze(node, p, forward, world):
    src, dst = shape_of(node.args[0]), shape_of(node)
    return view_map(src, dst, p, world) if forward else view_map(dst, src, p, world)


def _map_same(node, p, forward, world):
    return p


def _map_complex(node, p, forward, world):
    """view_as_complex [..., D/2, 2] -> [..., D/2] (view_as_real the reverse): complex RoPE (Llama 4,
    DeepSeek-V2). A shard keeps its dim; the pair dim is never sharded."""
    pairs = len(shape_of(node.args[0] if node.target == aten.view_as_complex.default else node)) - 1
    return None if p.dim >= pairs else p


def _map_pad(node, p, forward, world):
    nd, pad = len(shape_of(node)), node.args[1]
    padded = {nd - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}
    return None if p.dim in padded else p


def _map_slice(node, p, forward, world):
    nd = len(shape_of(node))
    return p if _norm(node.args[1], nd) != p.dim else None


TRANSPARENT: Dict[object, Callable] = {
    aten.view.default: _map_view,
    aten._unsafe_view.default: _map_view,
    aten.reshape.default: _map_view,
    aten.expand.default: _map_expand,
    aten.transpose.int: _map_perm(_transpose_perm),
    aten.t.default: _map_perm(_transpose_perm),
    aten.permute.default: _map_perm(lambda n: [_norm(d, len(shape_of(n))) for d in n.args[1]]),
    aten.unsqueeze.default: _map_unsqueeze,
    aten.squeeze.dim: _map_squeeze,
    aten.squeeze.dims: _map_squeeze,
    aten.clone.default: _map_same,
    aten.alias.default: _map_same,
    aten.detach.default: _map_same,
    aten._to_copy.default: _map_same,
    aten.slice.Tensor: _map_slice,
    aten.constant_pad_nd.default: _map_pad,
    aten.view_as_complex.default: _map_complex,
    aten.view_as_real.default: _map_complex,
}


def map_through(node: Node, p, forward: bool, world: int):
    """Placement of ``node``'s output from its input's (forward) or the reverse; None if none."""
    if not is_shard(p):
        return p
    return TRANSPARENT[node.target](node, p, forward, world)


# ----------------------------------------------------------------------------- families

# Layout-only ops that commute with a sum over ranks.
_PARTIAL_SAFE = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.clone.default,
                 aten.view_as_complex.default, aten.view_as_real.default,
                 aten.alias.default, aten.detach.default, aten.transpose.int, aten.t.default, aten.permute.default,
                 aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default}


def _transparent_rule(node, ctx, P):
    src = node.args[0]
    p = P(src)
    out = map_through(node, p, True, ctx.world)
    if out is None:
        if node.target == aten.slice.Tensor:
            s = shape_of(node.args[0])
            if shape_of(node) == s:                     # a full slice: nothing to do
                return Decision(p)
        raise ShardingError(node, f"cannot keep sharding {fmt(p)} of shape {shape_of(src)} through this op "
                            f"(output shape {shape_of(node)}) on {ctx.world} ranks: no output dim splits evenly "
                            f"into {ctx.world} (typically a head count not divisible by the world size)",
                            placements=[p],
                            hint="use a world size that divides the head counts, or a strategy that does not "
                                 "split heads here ('vanilla_sp')")
    if is_partial(p) and node.target not in _PARTIAL_SAFE:      # e.g. a dtype cast of a partial sum
        return Decision(Replicate(), {src: Replicate()})
    return Decision(out)


def kept_rows(node):
    """(dim, source) when ``node`` keeps some rows of a dim: ``x[:, a:b]`` (slice) or
    ``x[:, idx]`` (index with one 1-D index tensor), as ``logits_to_keep`` does; else None."""
    if node.target not in (aten.slice.Tensor, aten.index.Tensor) or shape_of(node.args[0]) is None:
        return None
    x = node.args[0]
    nd = len(shape_of(x))
    if node.target == aten.slice.Tensor:
        return _norm(node.args[1] if len(node.args) > 1 else 0, nd), x
    if node.target == aten.index.Tensor:
        idx = node.args[1]
        at = [i for i, t in enumerate(idx) if t is not None]
        if len(at) == 1 and isinstance(idx[at[0]], Node) and len(shape_of(idx[at[0]]) or ()) == 1:
            return at[0], x
    return None


def _every_kth(node, p, ctx) -> bool:
    """``x[..., j::k]`` (j < k) of a feature dim split in pieces whose sizes k divides: every piece starts
    at a multiple of k, so each rank's every k-th element is its piece of the result (gpt-oss's
    interleaved gate_up, ``[..., ::2]`` and ``[..., 1::2]``, on a column split). Not the sequence
    dim, whose pieces may be uneven or zig-zag."""
    if node.target != aten.slice.Tensor or len(node.args) < 5:
        return False
    size = shape_of(node.args[0])[p.dim]
    start, end, step = node.args[2:5]
    pieces = ctx.world * split_factor(p)
    if size == ctx.seq_len:
        return False
    return (isinstance(step, int) and step > 1 and isinstance(start, int) and 0 <= start < step
            and isinstance(end, int) and end >= size and size % pieces == 0 and (size // pieces) % step == 0)


def _keep_rows_rule(node, ctx, P):
    """Rows kept from a sequence-sharded tensor (``hidden[:, -1:]`` for ``logits_to_keep=1``):

        x: S(1) [B, S, H] -> x[:, idx]: P [B, k, H]     each rank fills the kept rows it holds, zeros
                                                      elsewhere (``collectives.gather_rows``)

    so only k rows are ever communicated (one all_reduce of [B, k, H] before the lm_head), never
    the whole sequence. Rows picked along a dim the tensor is not split on are picked locally:

        b: S(1) [E, 2I] -> b[expert_ids]: S(1) [T, 2I]          (gpt-oss's sliced expert biases)"""
    dim, x = kept_rows(node) or (None, node.args[0])
    p = P(x)
    if dim is not None and is_shard(p) and p.dim == dim and _every_kth(node, p, ctx):
        return Decision(p)
    if dim is not None and is_shard(p) and p.dim == dim and shape_of(node)[dim] != shape_of(x)[dim]:
        if split_factor(p) == 1:
            idx = node.args[1][dim] if node.target == aten.index.Tensor else None
            return Decision(Partial(), {idx: Replicate()} if idx is not None and not is_replicate(P(idx)) else {})
        return Decision(Replicate(), {x: Replicate()})
    if node.target == aten.slice.Tensor:
        return _transparent_rule(node, ctx, P)
    if dim is not None and is_shard(p) and p.dim != dim and is_replicate(P(node.args[1][dim])):
        return Decision(p)            # rows picked along another dim (a sliced expert bias[expert_ids]): local
    if node.target == aten.index.Tensor and is_partial(p) and all(
            i is None or is_replicate(P(i)) for i in node.args[1]):
        return Decision(Partial())                                # picking rows of a partial sum is linear
    return _replicated_only_rule(node, ctx, P)


_LINEAR_NARY = {aten.add.Tensor, aten.sub.Tensor}
_LINEAR_SCALE = {aten.mul.Tensor, aten.div.Tensor}
_LINEAR_UNARY = {aten.neg.default}


def _aligned(x, out_shape):
    """Map from x's dims to output dims under broadcasting; also which of x's dims broadcast."""
    s = shape_of(x)
    off = len(out_shape) - len(s)
    return off, [s[i] == 1 and out_shape[i + off] != 1 for i in range(len(s))]


def _first_shard(ins, pl, out_shape):
    """The first sharded input's placement, in output dims; None if no input is sharded."""
    for x in ins:
        if is_shard(pl[x]):
            off, _ = _aligned(x, out_shape)
            return with_dim(pl[x], pl[x].dim + off)
    return None


def _pointwise_rule(node, ctx, P):
    out_shape = shape_of(node)
    ins = tensor_inputs(node)
    wants = {}
    pl = {x: P(x) for x in ins}

    partials = [x for x in ins if is_partial(pl[x])]
    if partials:
        if _is_linear_in_partials(node, ins, pl):
            return Decision(Partial())
        bias = _partial_bias(node, ins, pl, out_shape)
        if bias is not None:                   # P + bias: rank 0 adds the bias, the sum stays pending
            return Decision(Partial(), {bias: Partial()})
        # A Partial meets something else: resolve it to where the others live.
        target = _first_shard(ins, pl, out_shape)
        for x in partials:
            off, _ = _aligned(x, out_shape)
            want = with_dim(target, target.dim - off) if target is not None and target.dim >= off else Replicate()
            wants[x] = want
            pl[x] = want

    chosen = _first_shard(ins, pl, out_shape)
    if chosen is None:
        return Decision(Replicate(), wants)
    for x in ins:
        off, bcast = _aligned(x, out_shape)
        local_dim = chosen.dim - off
        if local_dim < 0 or bcast[local_dim]:
            if is_shard(pl[x]):       # sharded along a dim the output does not shard
                wants[x] = Replicate()
            continue
        want = with_dim(chosen, local_dim)
        if pl[x] != want:
            wants[x] = want
    return Decision(chosen, wants)


def _add_in_place_rule(node, ctx, P):
    """``x.add_(b)`` on a tensor nothing else reads (HF's grouped experts add their bias so, to the
    matmul's fresh output): an add. On a pending sum, b joins it (rank 0 adds it), as a bias does (where
    others read x too, as any op without a rule: whole tensors only):

        add_(P, R) -> P  (b: R -> P)        otherwise as ``add``
    """
    x, b = node.args[:2]
    if len(x.users) != 1:                   # others read what it writes: fine on whole tensors only
        return _default_rule(node, ctx, P)
    if is_partial(P(x)) and isinstance(b, Node) and is_replicate(P(b)):
        return Decision(Partial(), {b: Partial()})
    return _pointwise_rule(node, ctx, P)


def _partial_bias(node, ins, pl, out_shape):
    """In add(P, b) with b a replicated, broadcast operand (a bias), b can join the partial sum."""
    if node.target != aten.add.Tensor or len(ins) != 2 or not all(isinstance(a, Node) for a in node.args[:2]):
        return None
    (b,) = [x for x in ins if not is_partial(pl[x])] or [None]
    if b is not None and is_replicate(pl[b]) and math.prod(shape_of(b)) < math.prod(out_shape):
        return b
    return None


def _is_linear_in_partials(node, ins, pl) -> bool:
    t = node.target
    n_partial = sum(is_partial(pl[x]) for x in ins)
    if t in _LINEAR_NARY:
        return n_partial == len(ins) and all(isinstance(a, Node) for a in node.args[:2])
    if t in _LINEAR_SCALE:
        others_ok = all(is_replicate(pl[x]) for x in ins if not is_partial(pl[x]))
        first_is_partial = isinstance(node.args[0], Node) and is_partial(pl[node.args[0]])
        return n_partial == 1 and others_ok and (t == aten.mul.Tensor or first_is_partial)
    if t in _LINEAR_UNARY:
        return True
    if t == aten._to_copy.default:                  # a float downcast: each rank rounds its part, and the sum
        src, out = node.args[0].meta["val"], node.meta["val"]        # travels in the narrower dtype, as TP's
        return src.dtype.is_floating_point and out.dtype.is_floating_point and \
            out.dtype.itemsize < src.dtype.itemsize                   # rowwise outputs do (MoE: fp32 -> bf16)
    return False


def _reduced_dims(node):
    nd = len(shape_of(node.args[0]))
    t = node.target
    if t == aten.argmax.default and (len(node.args) < 2 or node.args[1] is None):
        return list(range(nd)), False                                    # argmax over all elements
    if t in (aten._softmax.default, aten._log_softmax.default, aten.cumsum.default, aten.argmax.default):
        dims, keep = [node.args[1]], t != aten.argmax.default or (len(node.args) > 2 and node.args[2])
    else:
        dims = node.args[1] if len(node.args) > 1 else list(range(nd))
        dims = [dims] if isinstance(dims, int) else (dims or list(range(nd)))
        keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    return sorted(_norm(d, nd) for d in dims), keep


_LINEAR_REDUCTIONS = {aten.sum.dim_IntList, aten.sum.default, aten.mean.dim}


def _reduction_rule(node, ctx, P):
    x = node.args[0]
    p = P(x)
    if is_partial(p):                                    # a sum of partial sums stays pending (the experts'
        if node.target in _LINEAR_REDUCTIONS:            # outputs summed over top-k); a max does not
            return Decision(Partial())
        return Decision(Replicate(), {x: Replicate()})
    if not is_shard(p):
        return Decision(p)
    dims, keep = _reduced_dims(node)
    if p.dim in dims:
        return Decision(Replicate(), {x: Replicate()})
    return Decision(with_dim(p, p.dim - (0 if keep else sum(d < p.dim for d in dims))))


def _values_indices_rule(node, ctx, P):
    """max / min over one dim -> (values, indices), both placed as that reduction places its output
    (gpt-oss's attention takes the max of its scores and sinks)."""
    d = _reduction_rule(node, ctx, P)
    return Decision((d.out, d.out), d.wants)


def _layer_norm_rule(node, ctx, P):
    x, normalized = node.args[0], node.args[1]
    wants = {w: Replicate() for w in node.args[2:4] if isinstance(w, Node) and not is_replicate(P(w))}
    p = P(x)
    if is_partial(p) or (is_shard(p) and p.dim >= len(shape_of(x)) - len(normalized)):
        wants[x], p = Replicate(), Replicate()
    return Decision((p, p, p), wants)


def _mm_rule(node, ctx, P):
    """[M, K] @ [K, N]. Rows may be sharded (sequence), columns of the weight (colwise TP),
    or K on both sides (rowwise TP -> Partial). A partial x (rows kept from a sequence split) is
    completed as the weight needs it: whole for a whole or colwise weight, K-split for a rowwise one."""
    a, b = node.args[0], node.args[1]
    pa, pb = P(a), P(b)
    if is_partial(pb):
        return _fail(node, [pa, pb])
    if is_partial(pa):
        pa = with_dim(pb, 1) if shard_dim(pb) == 0 else Replicate()
        wants = {a: pa}
    else:
        wants = {}
    da, db = shard_dim(pa), shard_dim(pb)
    if db is None:                                                   # full weight
        if da == 1:                                                  # K sharded, weight whole
            want = ctx.rows_placement(a)
            return Decision(want, {a: want})
        return Decision(pa, wants)
    if db == 0:                                                      # rowwise weight: K sharded
        want_a = with_dim(pb, 1)
        return Decision(Partial(), {a: want_a} if pa != want_a else wants)
    if db == 1:                                                      # colwise weight
        return Decision(pb, {a: Replicate()} if not is_replicate(pa) else wants)
    return _fail(node, [pa, pb])


def _grouped_mm_rule(node, ctx, P):
    """The experts' grouped matmul: x [M, K] (rows sorted by expert) @ w [E, K, N], rows offs[e-1]:offs[e]
    through expert e (transformers' ``grouped_mm_fallback``, ``aten._grouped_mm``). Under a TP layout the
    experts are sliced as transformers' tp_plan slices them; every rank routes all the tokens:

        x R,       w S(2) (gate_up, packed: sf=2)   -> S(1) (sf=2)    colwise: each rank its features
        x S(1),    w S(1) (down, K split)           -> Partial        rowwise: each rank a partial sum
        x R,       w R                              -> R

    Rows split with whole weights (each rank its own tokens) are ``token_local_rule``'s, inside the block."""
    x, w, offs = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    px, pw = P(x), P(w)
    wants = {offs: Replicate()} if isinstance(offs, Node) and not is_replicate(P(offs)) else {}
    dw = shard_dim(pw)
    if dw == 1:                                                      # K split on both sides
        want = Shard(1)
        return Decision(Partial(), {**wants, **({x: want} if px != want else {})})
    if not is_replicate(px):
        wants[x] = Replicate()
    if dw == 2:
        return Decision(with_dim(pw, 1), wants)
    if dw is None and not is_partial(pw):
        return Decision(Replicate(), wants)
    return _fail(node, [px, pw])


def _moe_experts_rule(node, ctx, P):
    """Expert parallelism (``sp_compiler/experts.py``): the experts split by expert, S(0), E/N per rank.

        x: the rank's own tokens, w S(0)   -> x's placement    the rows travel to their experts and back
        x R,  w S(0)                       -> Partial          each rank its experts' rows, zeros elsewhere
    """
    x, offs, w_in, w_out = node.args[:4]
    biases = [b for b in node.args[8:10] if isinstance(b, Node)]                    # b_in, b_out [E, ...]
    wants = {w: Shard(0) for w in (w_in, w_out, *biases) if P(w) != Shard(0)}
    px = P(x)
    if is_replicate(px):
        return Decision(Partial(), {**wants, **({offs: Replicate()} if not is_replicate(P(offs)) else {})})
    if _as_tokens(x, px, ctx) is not None:
        return Decision(px, wants)
    return _fail(node, [px, P(w_in)])


def _in_group_rule(node, ctx, P):
    """A collective of the tp-in-group step of a two-level layout, seen from across the groups: it runs
    among the T ranks of one group, which hold the same rows, so the tensor keeps its placement across
    groups. all_gather and reduce_scatter stack (or unstack) the group's T pieces on dim 0: a dim 0
    split across groups becomes T (or 1/T as many) strided blocks.

        all_reduce(x: S(1), "sum", tp)            -> S(1)
        all_gather_into_tensor(x: S(0,sf=k), T)   -> S(0,sf=k*T)      [T * numel], each piece split alike
        reduce_scatter_tensor(x: S(0,sf=k*T), T)  -> S(0,sf=k)
    """
    p = P(node.args[0])
    if is_partial(p) or is_token_local(p) or is_rank_local(p):
        raise ShardingError(node, f"a collective inside a tp group meets a tensor placed {fmt(p)} across the "
                            f"groups", placements=[p], hint="use tp_size=1 for this model")
    if shard_dim(p) != 0 or node.target in (c10d.all_reduce.default, c10d.wait_tensor.default):
        return Decision(p)
    gather = node.target == c10d.all_gather_into_tensor.default
    T, sf = node.args[1 if gather else 2], split_factor(p)          # (x, T, group) / (x, op, T, group)
    if gather:
        return Decision(make_shard(0, sf * T))
    if sf % T:
        raise ShardingError(node, f"a reduce_scatter inside a tp group splits dim 0, which is placed {fmt(p)} "
                            f"across the groups", placements=[p], hint="use tp_size=1 for this model")
    return Decision(make_shard(0, sf // T))


def _fail(node, placements):
    raise UnsupportedOpError(node, "no rule for these input placements", placements=placements,
                             hint="report this model and strategy; choose another strategy meanwhile")


def _bmm_rule(node, ctx, P):
    a, b = node.args[0], node.args[1]
    pa, pb = P(a), P(b)
    if is_replicate(pa) and is_replicate(pb):
        return Decision(Replicate())
    if pa == pb and shard_dim(pa) == 0:
        return Decision(pa)
    return Decision(Replicate(), {x: Replicate() for x in (a, b) if not is_replicate(P(x))})


def _embedding_rule(node, ctx, P):
    """embedding(weight [V, H], ids):

        weight R      ids as they are, or S(1) under a sequence layout: each rank looks up its own rows
        weight S(0)   vocab-parallel: every rank looks up every id in its rows of the table, zero for ids
                      it does not hold -> Partial (``localize`` writes the masked lookup); the first
                      decoder layer completes it (all_reduce, or reduce_scatter into its sequence split)
    """
    weight, idx = node.args[0], node.args[1]
    p = P(idx)
    if shard_dim(P(weight)) == 0:
        return Decision(Partial(), {idx: Replicate()} if not is_replicate(p) else {})
    wants = {} if is_replicate(P(weight)) else {weight: Replicate()}
    strategy = ctx.strategy_for(node)
    if strategy.seq_sharded and is_replicate(p) and len(shape_of(idx)) >= 2:
        p = Shard(1)                    # any length: N need not divide it (placements.Layout)
        wants[idx] = p
    return Decision(p, wants)


def _repeat_rule(node, ctx, P):
    """repeat_interleave(x, r, dim): each slice of ``dim`` repeated r times; a shard elsewhere stays."""
    x, p = node.args[0], P(node.args[0])
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None:                                                   # repeats of the flattened tensor
        return Decision(Replicate(), {x: Replicate()} if is_shard(p) else {})
    if is_shard(p) and p.dim == _norm(dim, len(shape_of(node))):
        return Decision(Replicate(), {x: Replicate()})
    return Decision(p)


def _cat_rule(node, ctx, P):
    """cat(tensors, dim). Shards on ``dim`` itself are gathered; shards on another dim slice the
    replicated inputs, unless a replicated input outweighs every sharded one (a whole KV cache meeting
    a step's new rows): then the few new rows are gathered instead of the cache sliced and regathered.
    A KV cache kept split by sequence (RankLocal) grows by its new rows on each rank: passes/kv_attention
    takes that cat apart."""
    tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    nd = len(shape_of(node))
    dim = _norm(dim, nd)
    live = [t for t in tensors if 0 not in shape_of(t)]              # HF caches start as empty tensors
    if len(live) == 1:
        return Decision(P(live[0]))
    pl = [P(t) for t in live]
    if any(is_rank_local(p) for p in pl):
        return Decision(RankLocal())
    chosen = next((p for p in pl if is_shard(p)), None)
    if chosen is None:
        if any(is_partial(p) for p in pl):
            return Decision(Replicate(), {t: Replicate() for t in live if is_partial(P(t))})
        return Decision(Replicate())
    gather_all = {t: Replicate() for t in live if not is_replicate(P(t))}
    if chosen.dim == dim:
        return Decision(Replicate(), gather_all)
    numel = lambda t: math.prod(size_hint(d) for d in shape_of(t))         # noqa: E731 - no guard on a KV length
    whole = [numel(t) for t in live if is_replicate(P(t))]
    if whole and max(whole) > sum(numel(t) for t in gather_all):
        return Decision(Replicate(), gather_all)
    return Decision(chosen, {t: chosen for t in live if P(t) != chosen})


def _stack_rule(node, ctx, P):
    """stack(tensors, dim): a new dim at ``dim``; the inputs share one placement, which moves past it
    (Cohere's interleaved rotary stacks [-x2, x1] on the last dim)."""
    tensors = node.args[0]
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(shape_of(node)))
    pl = [P(t) for t in tensors]
    chosen = next((p for p in pl if is_shard(p)), None)
    if chosen is None:
        if all(is_partial(p) for p in pl):
            return Decision(Partial())                                  # stacking is linear
        return Decision(Replicate(), {t: Replicate() for t in tensors if is_partial(P(t))})
    wants = {t: chosen for t in tensors if P(t) != chosen}
    return Decision(with_dim(chosen, chosen.dim + (chosen.dim >= dim)), wants)


def _split_rule(node, ctx, P):
    x = node.args[0]
    p = P(x)
    nd = len(shape_of(x))
    dim = _norm(node.args[2] if len(node.args) > 2 else 0, nd)
    n_out = len(node.meta["val"])
    if not is_shard(p) or p.dim != dim:
        if is_partial(p):
            return Decision(tuple([Replicate()] * n_out), {x: Replicate()})
        return Decision(tuple([p] * n_out))
    sizes = [v.shape[dim] for v in node.meta["val"]]
    if split_factor(p) == n_out and sizes == [shape_of(x)[dim] // n_out] * n_out:    # [q | k | v] into its blocks
        return Decision(tuple([Shard(dim)] * n_out))
    return Decision(tuple([Replicate()] * n_out), {x: Replicate()})


def _split_sizes_rule(node, ctx, P):
    """split_with_sizes(x, sizes, dim): pieces of a dim that is not sharded keep x's placement (MLA's
    [nope | rope] head dims); pieces of the sharded dim need the whole x."""
    x = node.args[0]
    p = P(x)
    dim = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), len(shape_of(x)))
    n_out = len(node.meta["val"])
    if is_partial(p) or (is_shard(p) and p.dim == dim):
        return Decision(tuple([Replicate()] * n_out), {x: Replicate()})
    return Decision(tuple([p] * n_out))


def _pad_rule(node, ctx, P):
    """constant_pad_nd(x, pad, value) pads the last len(pad)/2 dims: a shard of a dim it does not pad
    stays (MLA's values padded to the keys' head dim, ``passes/capture``; a collective wanted after the
    pad moves before it, onto the narrower values); a padded sharded dim needs the whole x; a partial
    sum padded with zeros stays a partial sum."""
    x = node.args[0]
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    p = P(x)
    if (is_partial(p) and value != 0) or (is_shard(p) and _map_pad(node, p, True, ctx.world) is None):
        return Decision(Replicate(), {x: Replicate()})
    return Decision(p)


def _copy_rule(node, ctx, P):
    """copy_(dst, src) writes src into dst, a view of a tensor made empty (HF's MLA fills the [nope | rope]
    halves of its keys so): dst takes src's placement. The want travels up the view to the empty tensor,
    which ``propagate`` then makes at the local shape (a slice of it would take the write, not it). A
    destination already split (the second half written, after the first made the tensor local) takes a
    whole source as its piece: a local slice."""
    dst, src = node.args[0], node.args[1]
    p, d = P(src), P(dst)
    if is_partial(p) or (is_replicate(p) and is_shard(d)):
        return Decision(d, {src: d})
    return Decision(p, {dst: p} if d != p else {})


def _getitem_rule(node, ctx, P):
    src, i = node.args
    p = P(src)
    return Decision(p[i] if isinstance(p, tuple) else p)


def _creation_rule(node, ctx, P):
    """New tensors are whole on every rank; a ``*_like`` of a sharded tensor is made at its local shape,
    so it is sharded like it."""
    src = node.args[0] if node.args and isinstance(node.args[0], Node) else None
    if node.target in _LIKE and src is not None and is_shard(P(src)):
        return Decision(P(src))
    return Decision(Replicate())


def _select_rule(node, ctx, P):
    x = node.args[0]
    p = P(x)
    if not is_shard(p):
        return Decision(p if not is_partial(p) else Replicate(), {x: Replicate()} if is_partial(p) else {})
    dim = _norm(node.args[1], len(shape_of(x)))
    if dim == p.dim:
        return Decision(Replicate(), {x: Replicate()})
    return Decision(with_dim(p, p.dim - (dim < p.dim)))


def _replicated_only_rule(node, ctx, P):
    """Ops we only run on whole tensors (index, gather, ...): everything becomes Replicate.
    Only mask construction reaches them in the supported models; a sharded input is gathered."""
    ins = tensor_inputs(node)
    wants = {x: Replicate() for x in ins if not is_replicate(P(x))}
    v = node.meta.get("val")
    out = tuple(Replicate() for _ in v) if isinstance(v, (tuple, list)) else Replicate()
    return Decision(out, wants)


# ----------------------------------------------------------------------------- attention

ATTENTION_OPS = sdpa.OPS


#: ops whose output may be a view of their input: a ``copy_`` into it writes the input
ALIASES = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default,
                     aten.slice.Tensor, aten.select.int, aten.transpose.int, aten.permute.default,
                     aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default, aten.diagonal.default})


def _written_base(node):
    """The tensor a ``copy_`` into ``node`` (a view, through ``ALIASES``) writes."""
    while node.op == "call_function" and node.target in ALIASES:
        node = node.args[0]
    return node


def kv_sources(graph, attention=None, within=None) -> set:
    """Every node the K or V of ``attention`` (default: every attention node of ``graph``) is computed
    from, the in-place writes into a tensor included (HF's MLA fills its keys' halves with ``copy_``);
    ``within(node)``: the walk stays where it is true (one layer: otherwise every earlier layer feeds
    this one's K and V through the residual stream, and a walk per layer is quadratic in depth)."""
    writes = {}                                               # tensor -> the copy_ calls into views of it
    for n in graph.find_nodes(op="call_function", target=aten.copy_.default):
        writes.setdefault(_written_base(n.args[0]), []).append(n)
    attns = [attention] if attention is not None else [n for n in graph.nodes if sdpa.is_attention(n)]
    todo = [x for a in attns for x in attention_inputs(a)[1:3]]
    found = set()
    while todo:
        n = todo.pop()
        if isinstance(n, Node) and n not in found and (within is None or within(n)):
            found.add(n)
            todo += n.all_input_nodes + writes.get(n, [])
    return found


def attention_inputs(node):
    """(q, k, v, mask) of an attention node, read by name (``sdpa.bind``); mask may be None."""
    c = sdpa.bind(node)
    return c.q, c.k, c.v, c.mask


def _attention_rule(node, ctx, P):
    """Attention over [B, H, S, D] tensors, split by heads, by query rows, by cached keys, or not at all.

    heads:  q, k, v, out  S(1)         every rank: all positions, H/N heads (TP, Ulysses, Megatron)
    rows:   q, out S(2);  k, v  R      every rank: its query rows against all keys (vanilla SP);
            mask rows S(2)             ``passes/rows_attention`` adds the causal offset per chunk
    keys:   q, mask, out  R;  k, v L   K/V grown from a KV cache kept split by sequence (RankLocal):
                                       every rank attends its own cached rows, the partial outputs
                                       merge by log-sum-exp (``passes/kv_attention``)
    whole:  everything R               a call too short to split (``strategies.short_strategy``)
    """
    strategy = ctx.strategy_for(node)
    q, k, v, mask = attention_inputs(node)
    vals = node.meta["val"]
    many = isinstance(vals, (tuple, list))
    if is_rank_local(P(k)) or is_rank_local(P(v)) or strategy.attention == "whole":
        keep = (k, v) if is_rank_local(P(k)) or is_rank_local(P(v)) else ()
        wants = {x: Replicate() for x in (q, k, v, mask) if x is not None and x not in keep and not is_replicate(P(x))}
        return Decision(tuple(Replicate() for _ in vals) if many else Replicate(), wants, group=node)
    if strategy.attention == "heads":
        split = Shard(1)
        for x, what in ((q, "query heads"), (k, "key/value heads")):
            ctx.check_divisible(node, shape_of(x)[1], what,
                                "choose a world size that divides the KV head count, or 'vanilla_sp'")
        wants = {x: split for x in (q, k, v) if P(x) != split}
        mask_split = split if mask is not None and shape_of(mask)[1] != 1 else Replicate()
    else:
        if sdpa.pads_lse(node.target) and sdpa.lse_of(node) is not None:
            raise ShardingError(node, "its logsumexp is read (attention sinks), and this kernel pads it, which a "
                                      "split by query rows cannot follow", hint="use 'ulysses' or 'tp' for this model")
        split = Shard(2)
        wants = {x: want for x, want in ((q, split), (k, Replicate()), (v, Replicate())) if P(x) != want}
        mask_split = split if mask is not None and shape_of(mask)[2] != 1 else Replicate()
    if mask is not None and P(mask) != mask_split:
        wants[mask] = mask_split
    # outputs split like q: heads -> every output led by [B, H] (the logsumexp too, padded or not);
    # rows -> every output led by [B, H, S_q]
    lead = 2 if strategy.attention == "heads" else 3

    def placed(v):
        like_q = isinstance(v, torch.Tensor) and v.dim() >= lead and tuple(v.shape[:lead]) == shape_of(q)[:lead]
        return split if like_q else Replicate()

    out = tuple(placed(v) for v in vals) if many else placed(vals)
    return Decision(out, wants, group=node)


# ----------------------------------------------------------------------------- token-local regions

def token_blocks(module_paths) -> frozenset:
    """Module paths of the mixture-of-experts blocks: every module with a child named ``experts``
    (HF's Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3: ``model.layers.3.mlp``)."""
    blocks = set()
    for path in module_paths:
        parts = path.split(".")
        if "experts" in parts[1:]:
            blocks.add(".".join(parts[: parts.index("experts", 1)]))
    return frozenset(blocks)


def _as_tokens(x, p, ctx) -> Optional[TokenLocal]:
    """The rank's own tokens in ``x``: a TokenLocal, or a shard of the sequence (the same local data:
    S(d, sf) of [sf * S] is TokenLocal(d, sf, 1)); None for anything else."""
    if is_token_local(p):
        return p
    if is_shard(p) and shape_of(x)[p.dim] == split_factor(p) * ctx.seq_len:
        return TokenLocal(p.dim, split_factor(p), 1)
    return None


def _standard(t: TokenLocal):
    """TokenLocal(d, sf, 1) is an ordinary shard of the sequence: written so, it may leave the region."""
    return make_shard(t.dim, t.sf) if t.dim is not None and t.m == 1 else t


def _view_tokens(src: tuple, dst: tuple, t: TokenLocal, seq_len: int) -> Optional[TokenLocal]:
    """Where the token factor of ``src`` (dim t.dim read as [t.sf, S, t.m]) lands in the view ``dst``:
    the dim whose outer size divides what stands before the tokens and which holds all S of them.
    Unlike ``view_map`` no N-aligned chunks are needed: each rank views its own tokens."""
    before = math.prod(src[: t.dim]) * t.sf                      # elements groups before the token factor
    after = t.m * math.prod(src[t.dim + 1:])                     # ... and within one token
    outer = 1
    for e, E in enumerate(_infer(dst, math.prod(src))):
        if before % outer == 0 and E % (before // outer * seq_len) == 0:
            m = E // (before // outer * seq_len)
            return TokenLocal(e, before // outer, m) if after % m == 0 else None
        outer *= E
        if outer > before:
            break
    return None


def token_local_rule(node, ctx, P):
    """Ops inside a token-local region: a mixture-of-experts block entered on each rank's own tokens.

    A block whose output for a token depends on that token alone (router, top-k, the sort of the
    routed copies by expert, the per-expert histogram, grouped matmuls, the way back) is computed by
    every rank on its own tokens, whole expert weights, no collective:

        x: S(1) [B, S, H] -> view [B*S, H] -> router, topk -> sort, index, histc, grouped_mm, ...
                          -> view [B, S, H]: S(1)              every rank: its L rows, never S

    Inside, a tensor of the rank's tokens is TokenLocal: its sizes are the local ones (``localize``),
    its index values local positions. Views move the token dim by arithmetic, other ops keep it on
    the output dim of the same size; tensors made inside the block at a token size (``arange`` of
    the routed copies) are made at the local size. What no token reaches runs by the usual rules.
    """
    if RULES_BY_NAME.get(_name(node)) is _moe_experts_rule:
        return _moe_experts_rule(node, ctx, P)                   # its weights are split by expert, not whole
    ins = tensor_inputs(node)
    pl = {x: P(x) for x in ins}
    tokens = {x: t for x in ins if (t := _as_tokens(x, pl[x], ctx)) is not None}
    if not tokens:
        return rule_for(node)(node, ctx, P)                      # weights, constants: the usual rules
    other = [x for x in ins if x not in tokens and not is_replicate(pl[x])]
    if other:
        raise ShardingError(node, "a mixture-of-experts block computed on each rank's own tokens reads a tensor "
                            "that is neither those tokens nor whole", placements=[pl[x] for x in ins],
                            hint="choose 'tp' for this model, or report it")
    src = node.args[0] if node.args and isinstance(node.args[0], Node) else None
    if node.target in TRANSPARENT and src in tokens:
        t = tokens[src]
        if node.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
            out = _view_tokens(shape_of(src), shape_of(node), t, ctx.seq_len)
        else:
            dim = map_through(node, Shard(t.dim), True, ctx.world)
            out = None if dim is None else TokenLocal(dim.dim, t.sf, t.m)
        if out is None:
            raise ShardingError(node, f"cannot follow the tokens (dim {t.dim} of {shape_of(src)}) through this op "
                                f"(output {shape_of(node)})", placements=[pl[src]],
                                hint="choose 'tp' for this model, or report it")
        return Decision(_standard(out))
    sizes = {shape_of(x)[t.dim]: t for x, t in tokens.items() if t.dim is not None}

    def placed(shape):
        d = next((d for d, n in enumerate(shape) if n in sizes), None)
        return TokenLocal() if d is None else _standard(TokenLocal(d, sizes[shape[d]].sf, sizes[shape[d]].m))

    # made in the block at a token size (arange of the routed copies): wanted at the local size, which
    # ``propagate`` grants by making it there (local positions, as the rank's own index tensors hold)
    wants = {x: placed(shape_of(x)) for x in ins
             if x not in tokens and x.target in MADE and any(n in sizes for n in shape_of(x))}
    vals = node.meta["val"]
    if isinstance(vals, (tuple, list)):
        return Decision(tuple(placed(v.shape) if isinstance(v, torch.Tensor) else None for v in vals), wants)
    return Decision(placed(vals.shape), wants)


# ----------------------------------------------------------------------------- the table

# OpOverloads written out: an op renamed by a torch upgrade fails here, at import, instead of
# silently losing its rule.
_POINTWISE = (
    # arithmetic
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.reciprocal.default, aten.abs.default,
    aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.maximum.default, aten.minimum.default,
    aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    # transcendental and activations
    aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.log.default, aten.cos.default,
    aten.sin.default, aten.tanh.default, aten.erf.default, aten.sigmoid.default, aten.silu.default,
    aten.gelu.default, aten.relu.default, aten.softplus.default,
    # comparisons
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.le.Tensor, aten.le.Scalar,
    aten.lt.Tensor, aten.lt.Scalar, aten.ge.Tensor, aten.ge.Scalar, aten.gt.Tensor, aten.gt.Scalar,
    # logic and selection
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_not.default, aten.logical_and.default,
    aten.logical_or.default, aten.logical_not.default, aten.where.self, aten.masked_fill.Scalar,
    aten.masked_fill.Tensor, aten.fill.Scalar,
)
_REDUCTIONS = (
    aten.mean.dim, aten.sum.dim_IntList, aten.sum.default, aten.amax.default, aten.amin.default, aten.any.dim,
    aten.argmax.default, aten.cumsum.default, aten._softmax.default, aten._log_softmax.default,
)
_CREATION = (
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.full.default, aten.zeros.default,
    aten.ones.default, aten.empty.memory_format, aten.scalar_tensor.default, aten.new_ones.default,
    aten.new_zeros.default, aten.new_empty.default, aten.new_full.default, aten.full_like.default,
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.lift_fresh_copy.default,
)
_LIKE = (aten.full_like.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default)
#: tensors made from sizes alone (not like another tensor): inside a token-local region, made at local sizes
MADE = frozenset(_CREATION) - frozenset(_LIKE) - {aten.lift_fresh_copy.default}
#: ... of which those whose every element is the same: their local piece is the same tensor made at the
#: local shape, so one written in place (``copy_``) is made there instead of sliced
UNIFORM = frozenset({aten.empty.memory_format, aten.new_empty.default, aten.zeros.default, aten.new_zeros.default,
                     aten.ones.default, aten.new_ones.default, aten.full.default, aten.new_full.default})
_REPLICATED_ONLY = (
    aten.index.Tensor, aten.gather.default, aten.index_select.default, aten.diff.default, aten.tril.default,
    aten.triu.default,
    aten.convolution.default,       # a causal conv over the sequence (Qwen3-Next's linear attention): run whole
)


RULES: Dict[object, Callable] = {
    **dict.fromkeys(_POINTWISE, _pointwise_rule),
    **dict.fromkeys(_REDUCTIONS, _reduction_rule),
    **dict.fromkeys(_CREATION, _creation_rule),
    **dict.fromkeys(_REPLICATED_ONLY, _replicated_only_rule),
    **{op: _transparent_rule for op in TRANSPARENT},
    aten.slice.Tensor: _keep_rows_rule,
    aten.index.Tensor: _keep_rows_rule,
    **{op: _attention_rule for op in ATTENTION_OPS},
    aten._to_copy.default: _pointwise_rule,
    aten.add_.Tensor: _add_in_place_rule,
    aten.mm.default: _mm_rule,
    aten.bmm.default: _bmm_rule,
    aten._grouped_mm.default: _grouped_mm_rule,
    aten.embedding.default: _embedding_rule,
    aten.native_layer_norm.default: _layer_norm_rule,
    aten.cat.default: _cat_rule,
    aten.stack.default: _stack_rule,
    aten.repeat_interleave.self_int: _repeat_rule,
    aten.split.Tensor: _split_rule,
    aten.split_with_sizes.default: _split_sizes_rule,
    aten.max.dim: _values_indices_rule,
    aten.min.dim: _values_indices_rule,
    aten.copy_.default: _copy_rule,
    aten.constant_pad_nd.default: _pad_rule,
    aten.select.int: _select_rule,
    operator.getitem: _getitem_rule,
    **dict.fromkeys((c10d.all_reduce.default, c10d.wait_tensor.default, c10d.all_gather_into_tensor.default,
                     c10d.reduce_scatter_tensor.default), _in_group_rule),
}


#: ops of libraries seqpar does not import, by their registered name
RULES_BY_NAME: Dict[str, Callable] = {
    "transformers::grouped_mm_fallback": _grouped_mm_rule,
    "seqpar::moe_experts": _moe_experts_rule,
}


def _name(node) -> str:
    return node.target.name() if isinstance(node.target, torch._ops.OpOverload) else ""


def rule_for(node: Node) -> Callable:
    """The rule for ``node``; ops without one are fine on replicated inputs only."""
    return RULES.get(node.target) or RULES_BY_NAME.get(_name(node)) or _default_rule


def _default_rule(node, ctx, P):
    ins = tensor_inputs(node)
    pl = [P(x) for x in ins]
    if any(is_shard(p) for p in pl):
        other = ("run this layer under a strategy that keeps it replicated ('tp' splits only heads and features)"
                 if ctx.strategy_for(node).seq_sharded else "a strategy that does not split this op's input")
        raise UnsupportedOpError(node, "this op has no sharding rule and sits on a sharded path", placements=pl,
                                 hint=f"add a rule for it in sp_compiler/rules.py (RULES), or {other}")
    return _replicated_only_rule(node, ctx, P)
