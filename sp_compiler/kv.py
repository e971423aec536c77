"""A KV cache that stays where the prefill left it: each rank holds its share, HuggingFace holds stand-ins.

With ``outputs="local"`` every rank keeps the K/V rows (or heads) it computed. HuggingFace's
``DynamicCache`` must still see tensors of the cache's *global* shape: its lengths drive the
attention mask, the query offset and the next step's position ids. So the cache holds
**stand-ins**, tensors of the global shape that own one element (a NaN, expanded), and each names
the ``KVState`` that holds this rank's real tensors:

    DynamicCache.layers[i].keys   stand-in [B, Hkv, S, D], stride 0       (what Dynamo traces)
        ._seqpar_kv -> (KVState, "3.k", S)
    KVState (one per cache, shared by every layer's stand-ins, the same tables on every rank)
        split "heads"  buffers["3.k"]: [B, Hkv/N, S, D]   every row of this rank's KV heads
        split "seq"    buffers["3.k"]: [B, Hkv, C, D]     this rank's rows in C slots
                       positions:      [C]                each slot's global position, -1 if empty
                       counts:         rows per rank      (the same list on every rank)
        two levels     buffers["3.k"]: [B, Hkv/T, C, D]   "seq" across the G groups (world G, rank: the
        (tp_size T)                                       group), this rank's KV heads within its group

The backend swaps each stand-in for its buffer when it runs a graph, and returns new stand-ins.
Under "seq" the slots grow in buckets (``capacity_for``): a decode step writes its new rows into
free slots of one rank (the one holding fewest rows: ``owner``), so no cache row ever moves and
no step copies the cache; the compiled graph takes the slots at a fixed capacity C with empty
slots masked, and a new graph is compiled only when a rank's slots run out.

A stand-in read outside seqpar gives NaN, never a silent wrong number; ``local_kv(cache)`` gives
the real shards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .errors import SeqparError

__all__ = ["KVState", "SeqSlots", "KVInput", "stand_in", "kv_of", "is_stand_in", "local_kv", "capacity_for",
           "row_spans", "KV_ATTR", "StaleCacheError"]

#: attribute of a stand-in: (KVState, key, global rows it stands for)
KV_ATTR = "_seqpar_kv"

#: free slots (at least) a sequence-split cache gets beyond its rows when it is made or grown
HEADROOM = 64


class StaleCacheError(SeqparError):
    """A stand-in from an earlier step of a cache that has grown since (the cache was branched or reused)."""


def capacity_for(rows: int) -> int:
    """Slots for ``rows`` cached rows: the smallest m * 2^k >= rows + HEADROOM with 8 <= m <= 15, so at
    most 1/8 of the slots are spare beyond the headroom (the same buckets as prompt lengths)."""
    n = rows + HEADROOM
    k = max(0, n.bit_length() - 4)
    return -(-n // (1 << k)) * (1 << k)


@dataclass(eq=False)
class SeqSlots:
    """Where the rows of a sequence-split cache live: this rank's slot table and every rank's count."""
    counts: List[int]                  # rows each rank holds (identical on every rank)
    positions: torch.Tensor            # [C] int64: global position of each of this rank's slots, -1 if empty

    @property
    def capacity(self) -> int:
        return self.positions.shape[0]

    def owner(self) -> int:
        """The rank that takes rows every rank computed (a decode step's token): fewest rows, lowest rank."""
        return min(range(len(self.counts)), key=lambda r: (self.counts[r], r))


@dataclass(eq=False)
class KVState:
    """This rank's share of one KV cache (see the module docstring)."""
    split: str                          # "seq" | "heads"
    world: int
    rank: int
    length: int                         # global rows cached
    buffers: Dict[str, torch.Tensor] = field(default_factory=dict)
    slots: Optional[SeqSlots] = None    # split "seq" only
    strategy: str = ""                  # the strategy that made it (every later call runs the same)
    tp_size: int = 1                    # > 1: a two-level layout's; "seq" across the groups (world, rank: G, g),
                                        # each buffer this rank's KV heads of its group (tp)

    # ------------------------------------------------------------------ sequence split

    @classmethod
    def from_rows(cls, world: int, rank: int, length: int, spans_by_rank: List[List[Tuple[int, int]]],
                  tensors: Dict[str, torch.Tensor], capacity: int, strategy: str = "",
                  tp_size: int = 1) -> "KVState":
        """A "seq" cache from the rows each rank computed: ``spans_by_rank[r]`` = [(global start, rows)]
        of rank r's rows in local order; ``tensors`` = this rank's [B, Hkv, rows, D] per key."""
        counts = [sum(n for _, n in spans) for spans in spans_by_rank]
        mine = counts[rank]
        capacity = max(capacity, capacity_for(mine))
        positions = torch.full((capacity,), -1, dtype=torch.int64)
        at = 0
        for start, n in spans_by_rank[rank]:
            positions[at:at + n] = torch.arange(start, start + n)
            at += n
        state = cls("seq", world, rank, length, slots=SeqSlots(counts, positions), strategy=strategy,
                    tp_size=tp_size)
        for key, t in tensors.items():
            state.buffers[key] = _slots_like(t, capacity, mine)
        return state

    def ensure_free(self, rows: int):
        """Grow every buffer (and the slot table) so that ``rows`` more rows fit on this rank."""
        s = self.slots
        used = s.counts[self.rank]
        if used + rows <= s.capacity:
            return
        capacity = capacity_for(used + rows)
        positions = torch.full((capacity,), -1, dtype=torch.int64)
        positions[:used] = s.positions[:used]
        s.positions = positions
        for key, t in self.buffers.items():
            self.buffers[key] = _slots_like(t[:, :, :used], capacity, used)

    def append_rows(self, new: Dict[str, torch.Tensor], positions: torch.Tensor, added_by_rank: List[int]):
        """Write this rank's new rows (``new[key]``: [B, Hkv, n, D]) into its free slots; every rank's
        count grows by ``added_by_rank[r]``; the cache grows by their sum."""
        s = self.slots
        used, n = s.counts[self.rank], added_by_rank[self.rank]
        if n:
            for key, rows in new.items():
                self.buffers[key][:, :, used:used + n] = rows
            s.positions[used:used + n] = positions
        s.counts = [c + a for c, a in zip(s.counts, added_by_rank)]
        self.length += sum(added_by_rank)

    # ------------------------------------------------------------------ stand-ins

    def stand_in(self, key: str, global_shape) -> torch.Tensor:
        t = self.buffers[key]
        return stand_in(t.dtype, t.device, global_shape, (self, key, self.length))

    def local(self, key: str) -> torch.Tensor:
        """This rank's real rows (seq: the used slots, in slot order) or heads of ``key``."""
        t = self.buffers[key]
        return t[:, :, :self.slots.counts[self.rank]] if self.split == "seq" else t

    def local_positions(self) -> Optional[torch.Tensor]:
        """Seq: the global position of each local row (as ``local`` orders them); heads: None."""
        return self.slots.positions[:self.slots.counts[self.rank]] if self.split == "seq" else None


@dataclass(frozen=True, eq=False)
class KVInput:
    """What a compile knows of one stand-in input: how the cache is split, its key, and the tensor this rank
    passes in its place (seq: the slots [B, Hkv, C, D]; heads: [B, Hkv/N, S, D]); seq: the slot table."""
    split: str
    key: str
    local: torch.Tensor
    positions: Optional[torch.Tensor] = None


def row_spans(positions: torch.Tensor) -> List[List[int]]:
    """[[start, length], ...] of consecutive global positions, in slot order: where a rank's rows are."""
    spans = []
    for p in positions.tolist():
        if spans and spans[-1][0] + spans[-1][1] == p:
            spans[-1][1] += 1
        else:
            spans.append([p, 1])
    return spans


def _slots_like(rows: torch.Tensor, capacity: int, used: int) -> torch.Tensor:
    """[B, H, capacity, D] zeros with ``rows`` (its first ``used`` rows) at the front."""
    out = rows.new_zeros(*rows.shape[:2], capacity, *rows.shape[3:])
    out[:, :, :used] = rows[:, :, :used]
    return out


def stand_in(dtype, device, global_shape, tag) -> torch.Tensor:
    """A tensor of ``global_shape`` that owns one NaN (stride 0 everywhere), tagged with ``tag``.
    A fresh scalar per stand-in: Dynamo treats aliased graph inputs specially."""
    t = torch.full((), float("nan"), dtype=dtype, device=device).expand(*global_shape)
    setattr(t, KV_ATTR, tag)
    return t


def is_stand_in(t) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(t, KV_ATTR)


def kv_of(t) -> Tuple[KVState, str]:
    """(state, key) of a stand-in; StaleCacheError if the cache has grown since it was made."""
    state, key, length = getattr(t, KV_ATTR)
    if length != state.length:
        raise StaleCacheError(
            f"this KV cache stand-in ({key}) stands for {length} rows, but the cache it belongs to has "
            f"{state.length} now: a cache kept by seqpar (outputs='local') grows in place, so an earlier "
            f"step's cache cannot be reused or branched (beam search, restarting from a saved cache). "
            f"Fix: use outputs='replicate' for that, or keep the cache returned by the latest call")
    return state, key


def local_kv(cache) -> List[dict]:
    """This rank's real share of a HuggingFace cache that seqpar keeps split (``outputs="local"``):
    per layer ``{"keys", "values", "positions", "split"}``; ``positions`` (global row of each local row)
    under a sequence split, None under a head split. A two-level layout's (``tp_size``) is split "seq"
    across the groups, and ``keys`` / ``values`` hold this rank's KV heads of its group's rows. Layers
    holding ordinary tensors are returned as they are (``split`` None)."""
    out = []
    for layer in cache.layers:
        entry = {}
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if is_stand_in(t):
                state, key = kv_of(t)
                entry.update({name: state.local(key), "positions": state.local_positions(), "split": state.split})
            else:
                entry.update({name: t, "positions": None, "split": None})
        out.append(entry)
    return out
