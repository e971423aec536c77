"""Placement vocabulary: torch's own ``Replicate``, ``Shard``, ``Partial`` and ``_StridedShard``.

Every tensor node of the graph carries one placement over the (1-D) world of N ranks:

    Replicate()              every rank holds the whole tensor
    Shard(d)                 rank r holds chunk r of dim d (N equal, contiguous chunks)
    _StridedShard(d, sf=k)   dim d is read as [k, size/k]; rank r holds chunk r of the
                             second factor for every one of the k blocks. Arises from
                             merging [B, S] -> [B*S] with S sharded (k = B), and from fused
                             projections such as GPT-2's c_attn = [q | k | v] (k = 3)
    Partial("sum")           every rank holds a summand; the tensor is their sum

Placements of multi-output nodes are tuples; non-tensor nodes have ``None``.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard, _StridedShard

__all__ = [
    "Partial", "Placement", "Replicate", "Shard", "_StridedShard",
    "shard_dim", "split_factor", "is_shard", "is_partial", "is_replicate",
    "make_shard", "with_dim", "local_shape", "fmt",
]


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


def local_shape(shape: Sequence[int], p, world: int) -> tuple:
    """Shape of one rank's piece of a tensor of global ``shape`` under ``p``."""
    shape = list(shape)
    if is_shard(p):
        shape[p.dim] //= world
    return tuple(shape)


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
    return str(p)
