"""The ranks as a 2-D mesh for two-level layouts (``options["tp_size"]``), as a DeviceMesh lays them out.

N ranks form G = N/T groups of T consecutive ranks (the GPUs of a node). Rank r sits at (g, t) =
(r // T, r % T): tensor parallelism runs inside its group, along ``tp``; the sequence is split across
the groups, along ``sp``, between the ranks that share t::

    N = 8, T = 4              tp groups (within a node)      sp groups (across nodes)
    rank 5 = (g 1, t 1)       [0 1 2 3] [4 5 6 7]            [0 4] [1 5] [2 6] [3 7]

With T = 1 the mesh is one-dimensional: ``sp`` is the whole world and ``tp`` is absent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch.distributed as dist

from .errors import OptionsError

__all__ = ["Axis", "Mesh", "world_info", "across_groups", "mesh_of"]


@dataclass(frozen=True)
class Axis:
    """One dimension of the mesh as this rank sees it: its size, this rank's index along it and the
    process group of the ranks it shares the other index with (None: no process group)."""
    size: int
    rank: int
    group_name: Optional[str]


@dataclass(frozen=True)
class Mesh:
    sp: Axis                       # across groups: the sequence
    tp: Optional[Axis] = None      # within a group: heads and features (None: a 1-D mesh)

    @property
    def tp_size(self) -> int:
        return self.tp.size if self.tp is not None else 1


def world_info() -> Tuple[int, int, Optional[str]]:
    """(world size, rank, group name) of the default process group; (1, 0, None) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), dist.group.WORLD.group_name
    return 1, 0, None


def across_groups(tp_size: int = 1) -> Tuple[int, int]:
    """(G, g): the groups of ``tp_size`` ranks and this rank's one, the sequence split's world and rank;
    read from the default group without making sub-groups (``mesh_of`` makes them)."""
    world, rank, _ = world_info()
    return world // tp_size, rank // tp_size


# T -> (the default group it was made in, its mesh); the group object is kept, so a later default group
# (a new init_process_group) never matches a stale entry
_meshes: Dict[int, tuple] = {}


def mesh_of(tp_size: int = 1, before_groups: Optional[Callable[[], None]] = None) -> Mesh:
    """This rank's mesh for groups of ``tp_size``. The first call for a T creates its sub-groups, on
    every rank in the same order (``dist.new_subgroups_by_enumeration`` is collective), so every rank
    must make it: seqpar does, at the first compile, after ``before_groups()`` (the backend's check that
    every rank was given the same options: it raises where they differ)."""
    world, rank, name = world_info()
    if tp_size == 1:
        return Mesh(Axis(world, rank, name))
    if world % tp_size:
        raise OptionsError(f"tp_size={tp_size} does not divide the world size {world}: the ranks form groups of "
                           f"tp_size. Fix: use a tp_size that divides {world}")
    cached = _meshes.get(tp_size)
    if cached is not None and cached[0] is dist.group.WORLD:
        return cached[1]
    if before_groups is not None:
        before_groups()
    (G, group), T = across_groups(tp_size), tp_size
    tp, _ = dist.new_subgroups_by_enumeration([list(range(g * T, (g + 1) * T)) for g in range(G)])
    sp, _ = dist.new_subgroups_by_enumeration([list(range(t, world, T)) for t in range(T)])
    mesh = Mesh(sp=Axis(G, group, sp.group_name), tp=Axis(T, rank % T, tp.group_name))
    _meshes[tp_size] = (dist.group.WORLD, mesh)
    return mesh
