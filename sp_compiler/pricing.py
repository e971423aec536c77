"""Pricing captured graphs: every strategy's pipeline on a copy of one ATen graph, then the cost model.

    price_strategies(captured, inputs, fqns, options, world, machine, num_layers=L, tp_sizes=(1, 8))
        -> [Prediction per layout]        (illegal ones carry the engine's reason in ``error``)
    best_layout(predictions, world)       -> the fastest legal one (``best_of``: its strategy)

A layout is a strategy, or with ``tp_size`` T > 1 a two-level one: tp inside groups of T ranks and a
strategy of ``ACROSS_GROUPS`` across them, priced with each collective on its link (``cost_model``:
NVLink within a node, the network across nodes). ``two_level_sizes`` says which T a machine makes
worth pricing.

``strategy="auto"`` (the backend) and ``seqpar plan`` (``plan.py``, which first traces a weightless
model) both choose from this, so they agree. It sits below the backend: it runs the passes and the
cost model, never a compile.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch

from passes import copy_graph, run_layout

from .config import ACROSS_GROUPS
from .cost_model import Prediction, get_profile, predict
from .mesh import Axis, Mesh
from .errors import PlanError, SeqparError
from .strategies import STRATEGIES
from .testing import error_line

__all__ = ["strategy_names", "ranks_to_price", "price_strategies", "best_of", "best_layout", "two_level_sizes"]


def strategy_names(names: Optional[Sequence[str]]) -> List[str]:
    """``names`` checked against STRATEGIES (all of them when empty)."""
    names = list(names) if names else list(STRATEGIES)
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise PlanError(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    return names


def ranks_to_price(strategy: str, world: int) -> tuple:
    """Ranks whose graphs can differ in cost: rows attention (vanilla_sp) gives the last contiguous
    chunk the most keys, so price rank 0 and rank N-1; every other strategy is symmetric."""
    if world > 1 and STRATEGIES[strategy].attention == "rows":
        return (0, world - 1)
    return (0,)


def two_level_sizes(world: int, machine) -> tuple:
    """tp_size values worth pricing: 1, and on a machine of several nodes (``gpus_per_node`` below the
    world) every T > 1 that divides both the node and the world, so that a group never leaves a node."""
    per_node = get_profile(machine).gpus_per_node
    if not per_node or world <= per_node:
        return (1,)
    return (1,) + tuple(T for T in range(2, per_node + 1) if per_node % T == 0 and world % T == 0)


def _mesh(world: int, rank: int, tp_size: int, group) -> Mesh:
    """Rank ``rank``'s mesh, for pricing: the sub-groups are named, never created (nothing runs)."""
    if tp_size == 1:
        return Mesh(Axis(world, rank, group))
    return Mesh(sp=Axis(world // tp_size, rank // tp_size, "seqpar-price-sp"),
                tp=Axis(tp_size, rank % tp_size, "seqpar-price-tp"))


def price_strategies(captured, example_inputs, fqns, options, world: int, machine, *, num_layers: int,
                     strategies: Optional[Sequence[str]] = None, group=None, real_len: bool = False,
                     fusion: bool = True, tp_sizes: Sequence[int] = (1,)) -> List[Prediction]:
    """One Prediction per layout (its slowest rank among ``ranks_to_price``): every strategy, then for
    each T > 1 of ``tp_sizes`` every strategy of ``ACROSS_GROUPS`` in two levels; each from the seqpar
    pipeline run on a copy of one captured ATen graph. Illegal layouts carry ``error`` (the engine's
    reason). ``strategy="auto"`` and ``seqpar plan`` both choose from this."""
    machine = get_profile(machine)
    names = strategy_names(strategies)
    out = []
    for T, name in [(1, n) for n in names] + [(T, n) for T in tp_sizes if T > 1 for n in names
                                               if n in ACROSS_GROUPS]:
        trial = dataclasses.replace(options, strategy=name, dump_dir=None, tp_size=T)
        try:
            preds = []
            for rank in ranks_to_price(name, world // T):
                local, ctx = run_layout(copy_graph(captured), example_inputs, fqns, trial,
                                        _mesh(world, rank * T, T, group), real_len=real_len)
                preds.append(predict(local, ctx, machine, num_layers, fusion))
            out.append(max(preds, key=lambda p: p.total_s))
        except SeqparError as e:
            batch, seq_len = _prompt_shape(example_inputs, fqns)
            out.append(Prediction(name, machine.name, world, batch, seq_len, num_layers, error=error_line(e),
                                  tp_size=T))
    return out


def _prompt_shape(example_inputs, fqns):
    ids = next((x for x, f in zip(example_inputs, fqns) if f is None and isinstance(x, torch.Tensor)
                and x.dim() == 2), None)
    return tuple(ids.shape) if ids is not None else (0, 0)


def best_layout(preds: Sequence[Prediction], world: int) -> Prediction:
    """The fastest legal layout; ties go to the earlier one (STRATEGIES order, one level first)."""
    legal = [p for p in preds if p.ok]
    if not legal:
        reasons = "; ".join(f"{p.layout}: {p.error}" for p in preds)
        raise PlanError(f"no strategy can run this model on {world} ranks: {reasons}")
    return min(legal, key=lambda p: p.total_s)


def best_of(preds: Sequence[Prediction], world: int) -> str:
    """The fastest legal layout's strategy."""
    return best_layout(preds, world).strategy
