"""Ranks that disagree fail fast and say why: one small all_gather before every call of a compiled graph.

A collective whose sizes differ between ranks hangs, aborts gloo (``gloo::EnforceNotMet``) or
corrupts its buffers, so before a graph issues its first collective every rank all_gathers a
handful of int64s describing what it is about to run:

    error        1 if this rank failed to compile this call (it joins the check, then raises)
    strategy     index of the strategy in config.STRATEGY_NAMES
    options      hash of every option but dump_dir
    layers       decoder layers in the graph
    model        hash of the parameters' names, shapes and dtypes
    tokens       the call's tokens per sequence (prompt length, or 1 for a decode step)
    batch        sequences in the call
    kv_length    rows of the KV cache the call continues (0 for a fresh prompt)
    collectives  how many collectives the graph issues, then a hash of their kinds, sizes and dtypes
    inputs       hash of the shapes and dtypes of every user input

The first field that differs is the one named (the order above: what a user set, then what
follows from it).

Any difference raises ``RankMismatchError`` on every rank, naming the first field that differs and
each rank's value, within the time of one small collective. A rank that fails to compile still joins
the check (with ``error`` set), so the others raise instead of waiting for it. The check costs one
all_gather of 11 int64s per call (``README``: measured per-call cost); ``options={"check_ranks":
False}`` turns it off.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .config import STRATEGY_NAMES
from .errors import SeqparError

__all__ = ["RankMismatchError", "FIELDS", "Fingerprint", "stable_hash", "check_ranks", "in_check"]

FIELDS = ("error", "strategy", "options", "layers", "model", "tokens", "batch", "kv_length", "collectives",
          "collectives_hash", "inputs")

#: what to tell the user per field
_FIX = {
    "error": "the message of the failing rank is in its own log",
    "strategy": "pass the same options={'strategy': ...} on every rank",
    "options": "pass the same options on every rank",
    "layers": "load the same model on every rank",
    "model": "load the same model (the same weights' shapes and dtypes) on every rank",
    "collectives": "compile the same model with the same options on every rank",
    "collectives_hash": "compile the same model with the same options on every rank",
    "tokens": "call the model with the same input_ids on every rank (the same prompt, padded the same way)",
    "batch": "call the model with the same batch on every rank",
    "kv_length": "continue the same KV cache on every rank",
    "inputs": "call the model with the same inputs (shapes and dtypes) on every rank",
}
_NAMES = {"tokens": "tokens per sequence", "kv_length": "KV cache length", "layers": "decoder layers",
          "collectives": "collectives per call"}
_READABLE = {"error", "layers", "collectives", "tokens", "batch", "kv_length"}


class RankMismatchError(SeqparError):
    """The ranks are not about to run the same computation; the message names what differs."""


def stable_hash(text: str) -> int:
    """An int64 hash that is the same in every process (Python's ``hash`` of a str is not)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


@dataclass
class Fingerprint:
    """What a compiled graph is (fixed at compile time) and, per call, what it is called with."""
    strategy: int = -1
    options: int = 0
    layers: int = 0
    model: int = 0
    collectives: int = 0
    collectives_hash: int = 0
    strategy_name: str = ""
    extra: Dict[str, str] = field(default_factory=dict)      # readable text of the hashed fields, this rank's

    def values(self, tokens: int, batch: int, kv_length: int, inputs: int, error: int = 0) -> List[int]:
        row = dict(self.__dict__, tokens=tokens, batch=batch, kv_length=kv_length, inputs=inputs, error=error)
        return [int(row[f]) for f in FIELDS]


_checking = False


def in_check() -> bool:
    """True while ``check_ranks`` communicates (a collective counter tells the check from the graph's)."""
    return _checking


def check_ranks(values: Sequence[int], fp: Optional[Fingerprint], group=None) -> None:
    """All-gather ``values`` (``Fingerprint.values``); raise RankMismatchError on every rank if they differ."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1 \
            or dist.get_backend(group) == "fake":                  # a fake group communicates nothing
        return
    world = dist.get_world_size(group)
    mine = torch.tensor(list(values), dtype=torch.int64)
    every = torch.empty(world * len(FIELDS), dtype=torch.int64)
    global _checking
    _checking = True
    try:
        dist.all_gather_single(every, mine, group=group)
    finally:
        _checking = False
    rows = every.view(world, len(FIELDS))
    differ = (rows != rows[0]).any(0)
    if not differ.any():
        return
    i = int(differ.nonzero()[0])
    name = FIELDS[i]
    per_rank = rows[:, i].tolist()
    if name == "error":
        failed = [r for r, v in enumerate(per_rank) if v]
        raise RankMismatchError(f"rank(s) {failed} failed to compile this call; the other ranks stop here instead "
                                f"of waiting for them. Fix: {_FIX[name]}")
    if name in _READABLE:
        seen = ", ".join(f"rank {r}: {v}" for r, v in enumerate(per_rank))
    elif name == "strategy":
        seen = ", ".join(f"rank {r}: {STRATEGY_NAMES[v] if 0 <= v < len(STRATEGY_NAMES) else v}"
                         for r, v in enumerate(per_rank))
    else:
        groups: Dict[int, List[int]] = {}
        for r, v in enumerate(per_rank):
            groups.setdefault(v, []).append(r)
        seen = " vs ".join(f"ranks {rs}" for rs in groups.values())
        if fp is not None and name in fp.extra:
            seen += f" (this rank: {fp.extra[name]})"
    raise RankMismatchError(f"the ranks disagree on the {_NAMES.get(name, name)} of this call: {seen}. "
                            f"Fix: {_FIX[name]}")
