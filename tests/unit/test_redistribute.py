"""``collectives.redistribute`` on 2 and 3 gloo ranks, every rank's output against DTensor.

Each case builds a tiny FX graph (one placeholder per tensor), inserts the engine's nodes
with ``Builder`` + ``redistribute`` (or the packed ``all_to_all`` / ``all_gather``), runs the
GraphModule on every rank and compares what it returns with the oracle:

    have, want Shard / _StridedShard / Replicate    DTensor: distribute_tensor(full, [p]).to_local()
    have Partial                                   full = DTensor.from_local(summand, [Partial()]).full_tensor()
    want Partial                                   the ranks' outputs must sum to the input: full_tensor()
    zig-zag (ctx.zigzag)                           by hand: rank r holds pieces r and 2N-1-r of 2N
    a length N does not divide (UNEVEN)            by hand: torch.tensor_split pieces

seqpar cuts a length N does not divide in balanced pieces (numpy.array_split, torch.tensor_split:
the first S % N pieces one row longer), not as DTensor's Shard does (torch.chunk: ceil(S/N) rows,
the last ranks fewer or none); where N divides S the two agree and DTensor is the oracle.

Every case of a world size runs in ONE ``run_ranks`` call (process start-up dominates);
pytest reports each case separately over the cached results. Before a case runs, the ranks
agree that every input is the shape the engine expects, so a disagreement fails that case
instead of leaving the ranks waiting in a collective.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from sp_compiler.placements import (
    Partial, Replicate, Shard, _StridedShard, is_partial, is_replicate, split_factor,
)
from sp_compiler.testing import RankError, run_ranks

__all__ = ["Case", "CASES", "UNEVEN", "WORLDS"]

aten = torch.ops.aten
R, P = Replicate(), Partial()


def S(d, sf=1):
    return Shard(d) if sf == 1 else _StridedShard(d, split_factor=sf)


@dataclass(frozen=True)
class Case:
    """``items`` = ((global shape, have, want), ...); one item goes through ``redistribute``,
    several through the packed ``op`` ("all_to_all" q|k|v or "all_gather" K|V)."""
    name: str
    items: tuple
    op: str = "redistribute"
    zigzag: bool = False
    computed: bool = False          # the input is an op's output (R -> S narrows where it is made)
    seq_len: int = 12               # the prompt length: zig-zag cuts the dims of this size


def _one(name, gshape, have, want, **kw):
    return Case(name, ((gshape, have, want),), **kw)


#: Sizes every world of WORLDS divides (uneven sizes are in UNEVEN).
B, SEQ, H, D = 2, 12, 6, 3
CASES = [
    # R -> S: a local slice, any dim
    _one("R->S0", (12, 3), R, S(0)),
    _one("R->S1", (B, SEQ, H), R, S(1)),
    _one("R->S2", (B, SEQ, H), R, S(2)),
    _one("R->S1 computed (narrow)", (B, SEQ, H), R, S(1), computed=True),
    # S -> R: all_gather
    _one("S0->R", (12, 3), S(0), R),
    _one("S1->R", (B, SEQ, H), S(1), R),
    _one("S2->R", (B, SEQ, H), S(2), R),
    # P -> R, P -> S: all_reduce, reduce_scatter
    _one("P->R", (B, SEQ, H), P, R),
    _one("P->S0", (12, 3), P, S(0)),
    _one("P->S1", (B, SEQ, H), P, S(1)),
    _one("P->S2", (B, SEQ, H), P, S(2)),
    # R -> P: a bias joining a partial sum
    _one("R->P", (B, SEQ, H), R, P),
    # S(s) -> S(t): all_to_all
    _one("S1->S2 a2a", (B, SEQ, H, D), S(1), S(2)),
    _one("S2->S1 a2a", (B, SEQ, H, D), S(2), S(1)),
    _one("S0->S1 a2a", (12, 6), S(0), S(1)),
    _one("S1->S0 a2a", (6, 12, 2), S(1), S(0)),
    # _StridedShard: [B*S] rows (sf=B) and fused [q|k|v] blocks (sf=3), both ways
    _one("R->S0sf2 rows", (B * SEQ, H), R, S(0, B)),
    _one("S0sf2->R rows", (B * SEQ, H), S(0, B), R),
    _one("R->S1sf3 qkv", (B * SEQ, 3 * H), R, S(1, 3)),
    _one("S1sf3->R qkv", (B * SEQ, 3 * H), S(1, 3), R),
    _one("S0sf2->S1 a2a", (B * SEQ, H), S(0, B), S(1)),
    _one("S0->S0sf2 via R", (B * SEQ, H), S(0), S(0, B)),
    _one("S0sf6->S0", (6 * SEQ, H), S(0, 6), S(0)),
    _one("S0sf2->S0", (B * SEQ, H), S(0, B), S(0)),
    _one("S1sf3->S0 a2a", (B * SEQ, 3 * H), S(1, 3), S(0)),
    _one("S0sf2->S0sf6 via R", (6 * SEQ, H), S(0, 2), S(0, 6)),
    _one("P->S0sf2 via R", (B * SEQ, H), P, S(0, B)),
    _one("S1->P via R", (B, SEQ, H), S(1), P),
    # packed: q|k|v in one all_to_all (Ulysses, fewer KV heads than query heads); K|V in one all_gather
    Case("a2a packed q|k|v", (((B, SEQ, 12, D), S(1), S(2)), ((B, SEQ, 6, D), S(1), S(2)),
                              ((B, SEQ, 6, D), S(1), S(2))), op="all_to_all"),
    Case("a2a packed back", (((B, SEQ, 12, D), S(2), S(1)),), op="all_to_all"),
    Case("gather packed K|V", (((B, 2, SEQ, D), S(2), R), ((B, 2, SEQ, D), S(2), R)), op="all_gather"),
    Case("gather packed rows sf=2 + S1", (((B * SEQ, H), S(0, B), R), ((B, SEQ, H), S(1), R)),
         op="all_gather"),
    # zig-zag: rank r holds chunks r and 2N-1-r of 2N
    _one("zigzag R->S1", (B, SEQ, H), R, S(1), zigzag=True),
    _one("zigzag R->S1 computed", (B, SEQ, H), R, S(1), zigzag=True, computed=True),
    _one("zigzag S1->R", (B, SEQ, H), S(1), R, zigzag=True),
    _one("zigzag R->S0sf2 rows", (B * SEQ, H), R, S(0, B), zigzag=True),
    _one("zigzag S0sf2->R rows", (B * SEQ, H), S(0, B), R, zigzag=True),
    Case("zigzag gather packed K|V", (((B, 2, SEQ, D), S(2), R), ((B, 2, SEQ, D), S(2), R)),
         op="all_gather", zigzag=True),
]

#: A length no world of WORLDS divides: balanced pieces (torch.tensor_split), see the docstring.
UNEVEN = [
    _one("uneven R->S1", (B, 7, H), R, S(1), seq_len=7),
    _one("uneven S1->R", (B, 7, H), S(1), R, seq_len=7),
    _one("uneven P->S1", (B, 7, H), P, S(1), seq_len=7),
    _one("uneven S1->S2 a2a", (B, 7, 12, D), S(1), S(2), seq_len=7),
    _one("uneven S2->S1 a2a", (B, 12, 5, D), S(2), S(1)),
    _one("uneven R->S0sf2 rows", (B * 7, H), R, S(0, B), seq_len=7),
    _one("uneven S0sf2->R rows", (B * 7, H), S(0, B), R, seq_len=7),
    Case("uneven a2a packed q|k|v", (((B, 7, 12, D), S(1), S(2)), ((B, 7, 6, D), S(1), S(2))), op="all_to_all",
         seq_len=7),
    _one("uneven zigzag R->S1", (B, 14, H), R, S(1), zigzag=True, seq_len=14),
    _one("uneven zigzag S1->R", (B, 14, H), S(1), R, zigzag=True, seq_len=14),
]

WORLDS = (2, 3)


# ----------------------------------------------------------------------------- in every rank

def _by_hand(full, p, world, rank, zigzag):
    """Rank ``rank``'s piece, by hand: each of the sf blocks of dim d cut with torch.tensor_split
    into N pieces (2N for zig-zag, rank r taking pieces r and 2N-1-r)."""
    d, sf = p.dim, split_factor(p)
    shape = list(full.shape)
    blocks = full.reshape(shape[:d] + [sf, shape[d] // sf] + shape[d + 1:])
    pieces = blocks.tensor_split(2 * world if zigzag else world, dim=d + 1)
    mine = (pieces[rank], pieces[2 * world - 1 - rank]) if zigzag else (pieces[rank],)
    return torch.cat(mine, dim=d + 1).reshape(shape[:d] + [-1] + shape[d + 1:]).contiguous()


def _local(full, p, mesh, zigzag, summand):
    """What a rank holds of ``full`` under ``p`` (its own summand for Partial): DTensor's own
    sharding, by hand for zig-zag and uneven lengths."""
    from torch.distributed.tensor import distribute_tensor

    if is_replicate(p):
        return full.clone()
    if is_partial(p):
        return summand
    world = dist.get_world_size()
    if zigzag or (full.shape[p.dim] // split_factor(p)) % world:
        return _by_hand(full, p, world, dist.get_rank(), zigzag)
    return distribute_tensor(full, mesh, [p], src_data_rank=None).to_local().contiguous()


def _full_of_partial(local, mesh):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, mesh, [Partial()], run_check=False).full_tensor()


def _context(case, group_name=None):
    """The engine's own PassContext for this rank; zig-zag comes from the strategy, as in a compile."""
    from sp_compiler.config import Options
    from sp_compiler.context import PassContext

    options = Options.from_dict({"strategy": "vanilla_sp_zigzag" if case.zigzag else "ulysses"})
    return PassContext(options, dist.get_world_size(), dist.get_rank(), group_name, example_inputs=[],
                       input_fqns=[], seq_len=case.seq_len)


def _build(case):
    """GraphModule: placeholders -> the engine's nodes for ``case`` -> outputs (one per item)."""
    from sp_compiler.collectives import Builder, all_gather, all_to_all, redistribute

    g = torch.fx.Graph()
    srcs = []
    for i, (gshape, _, _) in enumerate(case.items):
        n = g.placeholder(f"x{i}")
        n.meta["val"] = torch.empty(gshape)                  # global shapes, as propagate leaves them
        if case.computed:                                    # an op's output: narrow() slices its inputs
            n = g.call_function(aten.mul.Tensor, (n, 2.0))
            n.meta["val"] = torch.empty(gshape)
        srcs.append(n)
    out = g.output(tuple(srcs))
    ctx = _context(case, dist.group.WORLD.group_name)
    b = Builder(g, after=srcs[-1], before=out, ctx=ctx)
    if case.op == "redistribute":
        (gshape, have, want), = case.items
        results = [redistribute(b, srcs[0], gshape, have, want, torch.float32)]
    elif case.op == "all_to_all":
        results = all_to_all(b, [(s, *item) for s, item in zip(srcs, case.items)], torch.float32)
    else:
        results = all_gather(b, [(s, *item[:2]) for s, item in zip(srcs, case.items)], torch.float32)
    out.args = (tuple(results),)
    g.lint()
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _run_case(case, mesh):
    """(got, expected) per item, both as this rank's local tensors (for want Partial: the sums)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    xs, fulls = [], []
    for gshape, have, _ in case.items:
        summands = [torch.randn(gshape, generator=gen) for _ in range(world)]
        full = _full_of_partial(summands[rank], mesh) if is_partial(have) else summands[0]
        xs.append(_local(full, have, mesh, case.zigzag, summands[rank]))
        fulls.append(full * 2.0 if case.computed else full)
    _agree_on_input_shapes(case, xs)
    got = _build(case)(*[x.clone() for x in xs])
    pairs = []
    for (gshape, have, want), full, out in zip(case.items, fulls, got):
        if is_partial(want):
            pairs.append((_full_of_partial(out.contiguous(), mesh), full))
        else:
            pairs.append((out, _local(full, want, mesh, case.zigzag, None)))
    return pairs


def _agree_on_input_shapes(case, xs):
    """Raise on every rank (never on one only: the others would wait in a collective forever)
    when some rank's input is not the shape the engine expects for ``have`` there."""
    ctx = _context(case)
    bad = [f"item {i}: rank {ctx.rank} holds {tuple(x.shape)} under {have}, the engine expects "
           f"{tuple(ctx.local_shape(gshape, have))}"
           for i, ((gshape, have, _), x) in enumerate(zip(case.items, xs))
           if not is_partial(have) and tuple(x.shape) != tuple(ctx.local_shape(gshape, have))]
    flag = torch.tensor([len(bad)])
    dist.all_reduce(flag)
    if flag.item():
        raise AssertionError("; ".join(bad) or "another rank's input is not the shape the engine expects")


def _rank_cases(cases):
    """Every case in turn on this rank: {name: [(got, expected) per item] or 'ErrorType: message'}."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = {}
    for case in cases:
        try:
            out[case.name] = _run_case(case, mesh)
        except Exception as e:  # noqa: BLE001 - reported by the case's test; the same on every rank
            out[case.name] = f"{type(e).__name__}: {e}"
    return out


# ----------------------------------------------------------------------------- pytest

_runs: dict = {}


def _results(world):
    """Every case on ``world`` ranks, one run_ranks call, cached for the session (a failure too)."""
    if world not in _runs:
        try:
            _runs[world] = run_ranks(_rank_cases, world, CASES + UNEVEN, timeout=300)
        except RankError as e:
            _runs[world] = e
    if isinstance(_runs[world], Exception):
        raise _runs[world]
    return _runs[world]


def _check(results, case):
    for rank, per_rank in enumerate(results):
        res = per_rank[case.name]
        assert not isinstance(res, str), f"rank {rank}: {res}"
        for i, (got, want) in enumerate(res):
            assert tuple(got.shape) == tuple(want.shape), \
                f"rank {rank} item {i}: local shape {tuple(got.shape)}, expected {tuple(want.shape)}"
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"rank {rank} item {i}: {m}")


def _params(cases):
    return [pytest.param(world, case, id=f"N{world}-{case.name}") for world in WORLDS for case in cases]


@pytest.mark.parametrize("world,case", _params(CASES))
def test_redistribute_matches_dtensor(world, case):
    _check(_results(world), case)


@pytest.mark.parametrize("world,case", _params(UNEVEN))
def test_redistribute_uneven_matches_balanced_pieces(world, case):
    _check(_results(world), case)
