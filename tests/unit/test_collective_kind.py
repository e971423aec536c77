"""``collectives.collective_kind`` for every have -> want pair, and that ``redistribute`` does what it names.

The table below is the specification, one row per ``have``; a second test builds each pair's
nodes with ``redistribute`` (world 2, nothing runs) and checks that the collectives it records
are the ones the name promises: planning and the cost model price ``collective_kind``, the
ranks run what ``redistribute`` builds.
"""
from __future__ import annotations

import pytest
import torch

from sp_compiler.collectives import Builder, collective_kind, redistribute
from sp_compiler.config import Options
from sp_compiler.context import PassContext
from sp_compiler.placements import Partial, Replicate, Shard, _StridedShard

__all__ = ["PLACEMENTS", "KINDS"]

PLACEMENTS = {
    "R": Replicate(), "S0": Shard(0), "S1": Shard(1), "P": Partial(),
    "S0sf2": _StridedShard(0, split_factor=2), "S1sf3": _StridedShard(1, split_factor=3),
    "S1sf2": _StridedShard(1, split_factor=2),
}

#: KINDS[have][want]; columns in PLACEMENTS order.
_COLUMNS = list(PLACEMENTS)
_ROWS = {
    "R":     ["none", "slice", "slice", "partial", "slice", "slice", "slice"],
    "S0":    ["all_gather", "none", "all_to_all", "via_replicate", "via_replicate", "via_replicate", "via_replicate"],
    "S1":    ["all_gather", "all_to_all", "none", "via_replicate", "via_replicate", "via_replicate", "via_replicate"],
    "P":     ["all_reduce", "reduce_scatter", "reduce_scatter", "none", "via_replicate", "via_replicate",
              "via_replicate"],
    # the same dim re-cut (blocks -> one run of rows) goes through Replicate
    "S0sf2": ["all_gather", "via_replicate", "all_to_all", "via_replicate", "none", "via_replicate", "via_replicate"],
    "S1sf3": ["all_gather", "all_to_all", "via_replicate", "via_replicate", "via_replicate", "none", "via_replicate"],
    "S1sf2": ["all_gather", "all_to_all", "via_replicate", "via_replicate", "via_replicate", "via_replicate", "none"],
}
KINDS = {have: dict(zip(_COLUMNS, row)) for have, row in _ROWS.items()}

_PAIRS = [(h, w) for h in PLACEMENTS for w in PLACEMENTS]


@pytest.mark.parametrize("have,want", _PAIRS, ids=[f"{h}->{w}" for h, w in _PAIRS])
def test_collective_kind(have, want):
    assert collective_kind(PLACEMENTS[have], PLACEMENTS[want]) == KINDS[have][want]


def _recorded(have, want, world=2, gshape=(12, 12)):
    """The collective kinds ``redistribute`` records for have -> want, in order (graph built, not run)."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(gshape)
    out = g.output(x)
    ctx = PassContext(Options.from_dict({"strategy": "ulysses"}), world, 0, "unused", example_inputs=[],
                      input_fqns=[], seq_len=gshape[0])
    b = Builder(g, after=x, before=out, ctx=ctx)
    redistribute(b, x, gshape, have, want, torch.float32)
    return [row["kind"] for row in b.rows]


def _promised(have, want):
    """What the name promises: the one collective it names; none for local changes; via_replicate
    = have -> Replicate, then Replicate -> want (a local slice or a partial, no collective)."""
    kind = collective_kind(have, want)
    if kind in ("none", "slice", "partial"):
        return []
    if kind == "via_replicate":
        return _promised(have, Replicate()) + _promised(Replicate(), want)
    return [kind]


@pytest.mark.parametrize("have,want", _PAIRS, ids=[f"{h}->{w}" for h, w in _PAIRS])
def test_redistribute_builds_what_collective_kind_names(have, want):
    hp, wp = PLACEMENTS[have], PLACEMENTS[want]
    assert _recorded(hp, wp) == _promised(hp, wp)
