"""Two-level layouts (``options["tp_size"]``, ``sp_compiler.mesh``): what ``run_layout`` does around the
two runs of the pipeline.

    captured [B, S, E]  -- pipeline, tp with world T on the group --------->  [B, S, E], weights / T,
                                                                              all_reduce on tp
                        -- drop placements; inputs := this rank's tp slices
                        -- pipeline, strategy with world G across groups -->  [B, S/G, E], all_to_all or
                                                                              all_gather on sp
                        -- merge: one context, as Dynamo's inputs see it

The second run reads the first one's graph as a one-level graph whose weights are this rank's slices
(q/k/v, o, gate/up, down, the experts; the embedding and lm_head stay whole, ``TP_IN_GROUP``). The
first run's collectives are ops it propagates through (``rules._in_group_rule``); its KV cache outputs
stay split by heads until the second run made their rows whole (``passes/gather_in_group``).
"""
from __future__ import annotations

import dataclasses

import torch

from sp_compiler.collectives import collective_row
from sp_compiler.context import INSERTED, PLACEMENT, PassContext, layer_of
from sp_compiler.errors import OptionsError
from sp_compiler.kv import KVInput
from sp_compiler.mesh import Axis
from sp_compiler.placements import fmt, is_shard
from sp_compiler.strategies import TP_IN_GROUP

from .lower import fake_inputs, local_example_inputs

__all__ = ["INNER_KEYS", "INNER_SKIPS", "inner_context", "drop_placements", "outer_inputs", "merge",
           "check_local_cache"]

#: the PassContext fields the tp step shares with the step across groups
INNER_KEYS = ("short", "one_in_flight", "whole_outputs", "reads_cache")

#: passes the tp step leaves to the step across groups: query blocks of a masked attention are cut for the
#: final layout's rows (the tp step's blocks would reach the next run as ops on the whole sequence)
INNER_SKIPS = ("mask_blocks",)

c10d = torch.ops._c10d_functional
_GROUP_COLLECTIVES = {c10d.all_reduce.default: "all_reduce", c10d.all_gather_into_tensor.default: "all_gather",
                      c10d.reduce_scatter_tensor.default: "reduce_scatter"}


def inner_context(opts, tp: Axis, example_inputs, fqns, fakes=None, kv=None, **shared) -> PassContext:
    """The context of the tp step: ``tp`` among the T ranks of this rank's group, on their process group.
    Its K/V outputs stay split by heads (outputs="local"): ``gather_in_group`` gathers them after the step
    across groups, or (``opts.outputs="local"``) they stay so. A call too short to split runs whole, as the
    step across groups does, unless the cache stays local: then it runs tp on the cache's heads.

    ``kv``: the step across groups' cache inputs (split by rows across the groups, ``sp_compiler.kv``);
    the tp step reads each as split by heads, [B, Hkv/T, S, D], and hands that on as the next step's input
    (``check_local_cache`` made sure the prefill left them so)."""
    local = opts.outputs == "local" or not shared.get("short")
    inner_opts = dataclasses.replace(opts, strategy="tp", layers={}, tp_size=1, expert_parallel=False,
                                     outputs="local" if local else "replicate")
    heads = {i: KVInput("heads", info.key, _heads_of(example_inputs[i], info.local)) for i, info in (kv or {}).items()}
    return PassContext(inner_opts, tp.size, tp.rank, tp.group_name, list(example_inputs), list(fqns),
                       fakes=list(fakes) if fakes is not None else None, strategies={"tp": TP_IN_GROUP}, kv=heads,
                       in_group=True, **shared)


def _heads_of(stand_in: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """A cache stand-in [B, Hkv, S, D] as this rank's heads see it: [B, h, S, D], h the heads of its slots."""
    return stand_in[:, :slots.shape[1]]


def drop_placements(gm: torch.fx.GraphModule) -> None:
    """The tp step's annotations off every node: the next run places the graph afresh."""
    for node in gm.graph.nodes:
        node.meta.pop(PLACEMENT, None)
        node.meta.pop(INSERTED, None)


def outer_inputs(inner: PassContext, fakes=None):
    """(inputs, fakes) of the step across groups: the tp slices in place of the whole weights; a sliced
    input's Dynamo fake dropped, so it is faked from its slice; a cache input's fake is its heads' (with
    Dynamo's symbolic length)."""
    if fakes:
        heads = fake_inputs(inner, local=True) if inner.kv else None
        fakes = [heads[i] if i in inner.kv else None if i in inner.local_inputs else f for i, f in enumerate(fakes)]
    return local_example_inputs(inner), fakes


def merge(gm: torch.fx.GraphModule, ctx: PassContext, example_inputs) -> None:
    """Both steps in ``ctx``, as Dynamo's inputs see them: a weight's piece is its tp slice, cut again
    where the step across groups cuts it too; the collective rows are both steps', each with its
    ``mesh`` dimension, the tp ones read off the final graph (their sizes local across groups)."""
    inner = ctx.inner
    ctx.full_inputs = list(example_inputs)
    ctx.local_inputs = {**inner.local_inputs, **ctx.local_inputs}
    tp_rows = [_group_row(n, inner.world) for n in gm.graph.nodes
               if n.op == "call_function" and n.target in _GROUP_COLLECTIVES and inner.group_name in n.args]
    ctx.collectives = [dict(r, mesh="tp") for r in tp_rows] + [dict(r, mesh="sp") for r in ctx.collectives]


def _group_row(node, T: int) -> dict:
    """The row of a tp collective of the final graph: all_reduce by the tensor it sums, all_gather as
    [T, numel] (as ``collectives.Builder.record`` writes them), in the layer of what it reads."""
    x = node.args[0].meta["val"]
    kind = _GROUP_COLLECTIVES[node.target]
    maker = node.args[0]
    while "nn_module_stack" not in maker.meta and maker.all_input_nodes:     # above the collective's own packing
        maker = maker.all_input_nodes[0]
    return {"layer": layer_of(maker),
            **collective_row(kind, None, (T, x.numel()) if kind == "all_gather" else x.shape, x.dtype)}


def check_local_cache(ctx: PassContext, caches) -> None:
    """outputs="local": every KV cache output must leave the tp step split by heads (S(1)), so that each rank
    keeps its heads of its group's rows and a decode step runs tp on them. ``caches``: output -> (key, shape).
    A model whose K/V tp leaves whole (Phi-3's fused qkv_proj with fewer KV heads than query heads) is
    refused: its decode steps would need the cache's heads gathered whole in every group."""
    for i, (key, _) in caches.items():
        p = ctx.inner.outputs[i][0]
        if i in ctx.whole_outputs or (is_shard(p) and p.dim == 1):
            continue
        raise OptionsError(f"tp_size={ctx.inner.world} with outputs='local' keeps the KV cache split by heads within "
                           f"each group, but tp leaves {key} placed {fmt(p)} in this model, not split by heads. "
                           f"Fix: outputs='replicate' (the cache is gathered whole after the prefill), or tp_size=1")
