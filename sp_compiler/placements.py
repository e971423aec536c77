"""Placement vocabulary: torch's own ``Replicate``, ``Shard``, ``Partial`` and ``_StridedShard``.

Every tensor node of the graph carries one placement over the (1-D) world of N ranks:

    Replicate()              every rank holds the whole tensor
    Shard(d)                 rank r holds chunk r of dim d (N equal, contiguous chunks)
    _StridedShard(d, sf=k)   dim d is read as [k, size/k]; rank r holds chunk r of the
                             second factor for every one of the k blocks. Arises from
                             merging [B, S] -> [B*S] with S sharded (k = B), and from fused
                             projections such as GPT-2's c_attn = [q | k | v] (k = 3)
    Partial("sum")           every rank holds a summand; the tensor is their sum
    RankLocal()              every rank holds its own part, in no layout a collective knows: the rows
                             of a KV cache kept split between the ranks (``sp_compiler.kv``), which
                             only split-KV attention reads (``passes/kv_attention``)
    TokenLocal(d, sf, m)     inside a token-local region (a mixture-of-experts block): every rank's
                             own tokens, each repeated m times along dim d ([sf, tokens, m] flattened:
                             the k routed copies of a token); d None: data about the rank's own
                             tokens with no token dim (how many it sends to each expert). Never
                             leaves the region (``sp_compiler.rules``, token-local regions)

Placements of multi-output nodes are tuples; non-tensor nodes have ``None``. A two-level layout
(``options["tp_size"]``, ``sp_compiler.mesh``) runs the pass pipeline twice, each run over a 1-D world:
tp within a group of ranks, then a sequence layout across the groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard, _StridedShard

__all__ = [
    "Partial", "Placement", "Replicate", "Shard", "_StridedShard", "RankLocal", "TokenLocal", "is_token_local",
    "shard_dim", "split_factor", "is_shard", "is_partial", "is_replicate", "is_rank_local",
    "make_shard", "with_dim", "local_shape", "fmt", "Layout", "size_hint", "shard_slices", "shard_tensor",
]


class RankLocal(Placement):
    """Each rank's own data, not a piece of a tensor laid out by a known rule (see the module docstring)."""

    def __eq__(self, other) -> bool:
        return isinstance(other, RankLocal)

    def __hash__(self) -> int:
        return hash("RankLocal")

    def __repr__(self) -> str:
        return "RankLocal()"

    def __reduce__(self):                   # Placement is a pybind11 class: no default pickling
        return RankLocal, ()


def is_rank_local(p) -> bool:
    return isinstance(p, RankLocal)


@dataclass(frozen=True)
class TokenLocal(Placement):
    """This rank's own tokens inside a token-local region (see the module docstring): dim ``dim`` is
    [sf, L, m] flattened, L the rank's rows of the sequence; ``dim`` None: no token dim."""
    dim: Optional[int] = None
    sf: int = 1
    m: int = 1

    def local_size(self, local_rows: int) -> int:
        return self.sf * local_rows * self.m

    def __reduce__(self):
        return TokenLocal, (self.dim, self.sf, self.m)


def is_token_local(p) -> bool:
    return isinstance(p, TokenLocal)


def is_shard(p) -> bool:
    return isinstance(p, (Shard, _StridedShard))


def is_partial(p) -> bool:
    return isinstance(p, Partial)


def is_replicate(p) -> bool:
    return isinstance(p, Replicate)


def shard_dim(p) -> Optional[int]:
    """The sharded dim of a Shard/_StridedShard, else None."""
    return p.dim if is_shard(p) else None


def split_factor(p) -> int:
    return p.split_factor if isinstance(p, _StridedShard) else 1


def make_shard(dim: int, sf: int = 1) -> Placement:
    """Shard(dim) when sf == 1, else _StridedShard(dim, sf)."""
    return Shard(dim) if sf == 1 else _StridedShard(dim, split_factor=sf)


def with_dim(p, dim: int) -> Placement:
    """The same kind of shard moved to another dim."""
    return make_shard(dim, split_factor(p))


@dataclass(frozen=True)
class Layout:
    """Which rows of a sharded dim of ``size`` each of ``world`` ranks holds.

    The dim is cut into ``world`` chunks (``2 * world`` with zig-zag, rank r holding chunks r
    and 2N-1-r) of balanced sizes, as ``numpy.array_split`` cuts them: the first ``size % n``
    chunks get one row more. A length that N does not divide is therefore fine: chunks differ
    by at most one row, and collectives pad every chunk to ``pad`` rows on the wire and drop
    the padding on arrival (``sp_compiler.collectives``)::

        size 10, world 4          chunks [0:3] [3:6] [6:8] [8:10]    pad 3
        size 10, world 2, zigzag  chunks [0:3] [3:6] [6:8] [8:10]    rank 0: 0, 3   rank 1: 1, 2
    """
    size: int
    world: int
    zigzag: bool = False

    @property
    def n_chunks(self) -> int:
        return 2 * self.world if self.zigzag else self.world

    @property
    def per_rank(self) -> int:
        return 2 if self.zigzag else 1

    @property
    def pad(self) -> int:
        """Rows of the largest chunk: every chunk travels padded to this."""
        return -(-self.size // self.n_chunks)

    @property
    def plain(self) -> bool:
        """Equal chunks in rank order: collectives need no padding and no reordering."""
        return not self.zigzag and self.size % self.world == 0

    def span(self, c: int) -> Tuple[int, int]:
        """(global start, length) of chunk ``c``."""
        base, rem = divmod(self.size, self.n_chunks)
        return c * base + min(c, rem), base + (c < rem)

    def chunk_ids(self, rank: int) -> Tuple[int, ...]:
        return (rank, 2 * self.world - 1 - rank) if self.zigzag else (rank,)

    def spans(self, rank: int) -> List[Tuple[int, int]]:
        """(global start, length) of each chunk ``rank`` holds, in local order."""
        return [self.span(c) for c in self.chunk_ids(rank)]

    def local_size(self, rank: int) -> int:
        return sum(n for _, n in self.spans(rank))

    def owner(self, c: int) -> Tuple[int, int]:
        """(rank, index among that rank's chunks) of chunk ``c``."""
        for r in range(self.world):
            if c in self.chunk_ids(r):
                return r, self.chunk_ids(r).index(c)
        raise ValueError(f"chunk {c} is not in a layout of {self.n_chunks} chunks")


def size_hint(n) -> int:
    """An int, or a symbolic size (a KV cache's length in a decode graph) at the value it has now,
    read without a guard: a heuristic or a dump never specialises a graph Dynamo made symbolic."""
    return n if isinstance(n, int) else int(n.node.hint)


def local_shape(shape: Sequence[int], p, world: int, rank: int = 0, zigzag: bool = False) -> tuple:
    """Shape of ``rank``'s piece of a tensor of global ``shape`` under ``p``. Under S(d, sf=k)
    each of the k blocks of dim d is split on its own."""
    shape = list(shape)
    if is_shard(p):
        sf = split_factor(p)
        shape[p.dim] = sf * Layout(shape[p.dim] // sf, world, zigzag).local_size(rank)
    return tuple(shape)


def shard_slices(shape: Sequence[int], p, world: int, rank: int) -> List[tuple]:
    """Index tuples that cut ``rank``'s piece of a tensor of ``shape`` under S(d[, sf]): one per block,
    to be concatenated along d. Any sliceable source takes them: a tensor, or a safetensors slice that
    reads only those bytes from disk (``sp_compiler.checkpoint``).

        S(0) of [8, 4], rank 1 of 2            [(slice(4, 8),)]
        S(0, sf=3) of [12, 4] (q|k|v), rank 1  [(slice(2, 4),), (slice(6, 8),), (slice(10, 12),)]
    """
    d, sf = p.dim, split_factor(p)
    block = shape[d] // sf
    n = -(-block // world)                      # torch.chunk's cut: ceil(block / N) rows, the last rank fewer
    lo, hi = min(rank * n, block), min((rank + 1) * n, block)
    lead = (slice(None),) * d
    return [lead + (slice(b * block + lo, b * block + hi),) for b in range(sf)]


def shard_tensor(t, p, world: int, rank: int):
    """This rank's piece of a full tensor (or a safetensors slice) under S(d[, sf]), as a new contiguous tensor."""
    shape = t.shape if isinstance(t, torch.Tensor) else t.get_shape()
    t = t.detach() if isinstance(t, torch.Tensor) else t
    return torch.cat([t[idx] for idx in shard_slices(shape, p, world, rank)], dim=p.dim).contiguous()


def fmt(p) -> str:
    """Short form used in dumps and errors: R, S(1), S(0,sf=2), P."""
    if p is None:
        return "-"
    if isinstance(p, tuple):
        return "(" + ", ".join(fmt(x) for x in p) + ")"
    if isinstance(p, _StridedShard):
        return f"S({p.dim},sf={p.split_factor})"
    if isinstance(p, Shard):
        return f"S({p.dim})"
    if isinstance(p, Partial):
        return "P"
    if isinstance(p, Replicate):
        return "R"
    if isinstance(p, RankLocal):
        return "L"
    if isinstance(p, TokenLocal):
        return "T" if p.dim is None else f"T({p.dim},sf={p.sf},m={p.m})"
    return str(p)
