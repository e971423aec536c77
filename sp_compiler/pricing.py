"""Pricing captured graphs: every strategy's pipeline on a copy of one ATen graph, then the cost model.

    price_strategies(captured, inputs, fqns, options, world, machine, num_layers=L)
        -> [Prediction per strategy]      (illegal ones carry the engine's reason in ``error``)
    best_of(predictions, world)           -> the fastest legal strategy

``strategy="auto"`` (the backend) and ``seqpar plan`` (``plan.py``, which first traces a weightless
model) both choose from this, so they agree. It sits below the backend: it runs the passes and the
cost model, never a compile.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch

from passes import copy_graph, run_pipeline

from .context import PassContext
from .cost_model import Prediction, get_profile, predict
from .errors import PlanError, SeqparError
from .strategies import STRATEGIES
from .testing import error_line

__all__ = ["strategy_names", "ranks_to_price", "price_strategies", "best_of"]


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


def price_strategies(captured, example_inputs, fqns, options, world: int, machine, *, num_layers: int,
                     strategies: Optional[Sequence[str]] = None, group=None, real_len: bool = False,
                     fusion: bool = True) -> List[Prediction]:
    """One Prediction per strategy (its slowest rank among ``ranks_to_price``), in ``STRATEGIES`` order,
    each from the seqpar pipeline run on a copy of one captured ATen graph; illegal strategies carry
    ``error`` (the engine's reason). ``strategy="auto"`` and ``seqpar plan`` both choose from this."""
    machine = get_profile(machine)
    out = []
    for name in strategy_names(strategies):
        trial = dataclasses.replace(options, strategy=name, dump_dir=None)
        try:
            preds = []
            for rank in ranks_to_price(name, world):
                ctx = PassContext(trial, world, rank, group, list(example_inputs), list(fqns), real_len=real_len)
                local = run_pipeline(copy_graph(captured), ctx)
                preds.append(predict(local, ctx, machine, num_layers, fusion))
            out.append(max(preds, key=lambda p: p.total_s))
        except SeqparError as e:
            batch, seq_len = _prompt_shape(example_inputs, fqns)
            out.append(Prediction(name, machine.name, world, batch, seq_len, num_layers, error=error_line(e)))
    return out


def _prompt_shape(example_inputs, fqns):
    ids = next((x for x, f in zip(example_inputs, fqns) if f is None and isinstance(x, torch.Tensor)
                and x.dim() == 2), None)
    return tuple(ids.shape) if ids is not None else (0, 0)


def best_of(preds: Sequence[Prediction], world: int) -> str:
    """The fastest legal strategy; ties go to the earlier one in STRATEGIES."""
    legal = [p for p in preds if p.ok]
    if not legal:
        reasons = "; ".join(f"{p.strategy}: {p.error}" for p in preds)
        raise PlanError(f"no strategy can run this model on {world} ranks: {reasons}")
    return min(legal, key=lambda p: p.total_s).strategy
