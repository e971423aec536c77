"""``rules.view_map`` by brute force: what each rank holds after a view, on arange tensors.

For every source shape of a few element counts (1 to 4 dims), every shard placement it takes
evenly (Shard(d), _StridedShard(d, sf)), every destination shape and world: shard the arange,
view each rank's piece to its local destination shape (what ``localize`` makes of the view)
and check that the placement ``view_map`` returns describes exactly what each rank then holds.
Where it returns None, no placement of the destination may describe it. Sharding here is done
by hand (torch.chunk per split-factor block, DTensor's semantics; even sizes only).
"""
from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch

from sp_compiler.placements import Partial, Replicate, Shard, _StridedShard, fmt, split_factor
from sp_compiler.rules import view_map

__all__ = ["shapes", "placements", "describes"]

NUMELS = (12, 16, 24)
WORLDS = (2, 3, 4)


@lru_cache(maxsize=None)
def shapes(numel: int, max_dims: int = 4) -> tuple:
    """Every shape of ``numel`` elements with 1..max_dims dims, at most one of them 1."""
    out = []

    def grow(prefix, left):
        if left == 1 and prefix:
            out.append(tuple(prefix))
        if len(prefix) == max_dims:
            return
        for f in range(1, left + 1):
            if left % f == 0 and (f > 1 or 1 not in prefix) and (f > 1 or left > 1):
                grow(prefix + [f], left // f)

    grow([], numel)
    return tuple(sorted(set(s for s in out if math.prod(s) == numel)))


def placements(shape, world: int) -> list:
    """Shard(d) and _StridedShard(d, sf) that cut ``shape`` evenly over ``world`` ranks."""
    out = []
    for d, size in enumerate(shape):
        for sf in range(1, size + 1):
            if size % sf == 0 and (size // sf) % world == 0:
                out.append(Shard(d) if sf == 1 else _StridedShard(d, split_factor=sf))
    return out


def _piece(t, p, world, rank):
    """Rank ``rank``'s piece of ``t`` under S(d[, sf]): each sf block of dim d chunked on its own."""
    d, sf = p.dim, split_factor(p)
    shape = list(t.shape)
    blocks = t.reshape(shape[:d] + [sf, shape[d] // sf] + shape[d + 1:])
    return blocks.chunk(world, dim=d + 1)[rank].reshape(shape[:d] + [-1] + shape[d + 1:])


def describes(src, dst, p, q, world) -> bool:
    """After viewing a ``p``-placed [src] tensor as [dst] rank by rank, does ``q`` say what each holds?"""
    full = torch.arange(math.prod(src)).reshape(src)
    local_dst = list(dst)
    local_dst[q.dim] //= world
    return all(torch.equal(_piece(full, p, world, r).reshape(local_dst), _piece(full.reshape(dst), q, world, r))
               for r in range(world))


@lru_cache(maxsize=None)
def _check(src, world):
    """(wrong, missed): placements view_map returns that do not hold, and Nones where one would."""
    wrong, missed = [], []
    for p in placements(src, world):
        for dst in shapes(math.prod(src)):
            q = view_map(src, dst, p, world)
            where = f"{src} {fmt(p)} -> {dst} on {world} ranks: view_map gave {fmt(q)}"
            if q is None:
                could = [fmt(c) for c in placements(dst, world) if describes(src, dst, p, c, world)]
                if could:
                    missed.append(f"{where}, but {', '.join(could)} would do")
            elif q not in placements(dst, world):
                wrong.append(f"{where}, which does not cut {dst} evenly")
            elif not describes(src, dst, p, q, world):
                wrong.append(f"{where}, which is not what the ranks hold")
    return wrong, missed


_CASES = [(world, src) for world in WORLDS for numel in NUMELS for src in shapes(numel) if placements(src, world)]


@pytest.mark.parametrize("world,src", _CASES, ids=[f"N{w}-{'x'.join(map(str, s))}" for w, s in _CASES])
def test_view_map_says_what_each_rank_holds(world, src):
    wrong, _ = _check(src, world)
    assert not wrong, f"{len(wrong)} wrong:\n" + "\n".join(wrong[:20])


@pytest.mark.parametrize("p", [Replicate(), Partial()], ids=["R", "P"])
def test_view_map_keeps_replicate_and_partial(p):
    assert view_map((4, 6), (24,), p, 2) == p


@pytest.mark.parametrize("src,dst,p,want", [
    ((2, 6, 4), (2, -1), Shard(1), Shard(1)),
    ((2, 6, 4), (-1, 4), Shard(1), _StridedShard(0, split_factor=2)),
    ((12, 4), (2, 6, -1), _StridedShard(0, split_factor=2), Shard(1)),
], ids=["-1 last", "-1 first", "-1 strided"])
def test_view_map_infers_minus_one(src, dst, p, want):
    assert view_map(src, dst, p, 2) == want
