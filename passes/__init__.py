"""The pass pipeline, in order. Each pass is ``pass(gm, ctx) -> gm``.

    capture (once per compile, ``capture_graph``)
      -> expert_parallel -> prompt_length -> causal_mask -> share_kv_heads -> annotate -> propagate
      -> insert_collectives -> localize -> grouped_kv -> kv_attention -> mask_blocks -> rows_attention
      -> gather_in_group -> one_in_flight -> check_local_shapes

``run_pipeline`` lints the graph after every pass and names the pass that failed. ``run_layout`` runs it
once per level of the layout: once, or (``tp_size`` > 1) tp within a group then the strategy across
groups (``passes/two_level``).
``lower`` (Inductor / aot_eager / eager) runs after, and returns a callable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from sp_compiler.context import PassContext
from sp_compiler.errors import SeqparError, ShapeConstraintError

from .annotate import annotate
from .capture import capture, copy_graph
from .gather_in_group import gather_in_group
from .grouped_kv import grouped_kv
from .causal_mask import causal_mask
from .expert_parallel import expert_parallel
from .insert import insert_collectives
from .kv_attention import kv_attention
from .localize import localize
from .mask_blocks import mask_blocks
from .one_in_flight import one_in_flight
from .lower import check_local_shapes, lower
from .prompt_length import prompt_length
from .propagate import propagate
from .rows_attention import rows_attention
from .share_kv_heads import share_kv_heads
from . import two_level

__all__ = ["PIPELINE", "run_pipeline", "run_layout", "capture_graph", "copy_graph", "lower"]

log = logging.getLogger("seqpar")

PIPELINE = [expert_parallel, prompt_length, causal_mask, share_kv_heads, annotate, propagate, insert_collectives,
            localize, grouped_kv, kv_attention, mask_blocks, rows_attention, gather_in_group,
            one_in_flight, check_local_shapes]


def capture_graph(gm: torch.fx.GraphModule, example_inputs, fakes=None) -> torch.fx.GraphModule:
    """Dynamo's graph -> the ATen graph every strategy's pipeline starts from (once per compile);
    ``fakes``: Dynamo's symbolic placeholder values, to keep a KV cache's length symbolic."""
    with _blame("capture"):
        return capture(gm, example_inputs, fakes)


@contextlib.contextmanager
def _blame(name):
    try:
        yield
    except SeqparError:
        raise
    except Exception as e:  # noqa: BLE001 - a bug in a pass: say which one
        raise SeqparError(f"seqpar pass '{name}' failed: {type(e).__name__}: {e}") from e


def run_pipeline(gm: torch.fx.GraphModule, ctx, passes=PIPELINE, on_pass=None) -> torch.fx.GraphModule:
    """The passes in order on ``gm`` (rewritten in place: hand a ``copy_graph`` to keep it). Passes edit
    ``gm.graph`` only; its Python code is generated once, at the end (0.25 s a time at 32 layers)."""
    for p in passes:
        with _blame(p.__name__):
            gm = p(gm, ctx)
            gm.graph.lint()
        log.debug("after %s: %d nodes", p.__name__, len(gm.graph.nodes))
        if on_pass is not None:
            on_pass(p.__name__, gm)
    gm.recompile()
    return gm


def run_layout(captured: torch.fx.GraphModule, example_inputs, fqns, opts, mesh, *, fakes=None, on_pass=None,
               **context):
    """(this rank's graph, its PassContext) for ``opts`` on ``mesh`` (``sp_compiler.mesh``): the pipeline
    across ``mesh.sp``, after a tp run within ``mesh.tp`` for a two-level layout. ``captured`` is
    rewritten in place; ``context``: further PassContext fields (the tp run shares ``two_level.INNER_KEYS``)."""
    inner, inputs = None, list(example_inputs)
    if mesh.tp is not None:
        inner = two_level.inner_context(opts, mesh.tp, example_inputs, fqns, fakes, context.get("kv"),
                                         **{k: v for k, v in context.items() if k in two_level.INNER_KEYS})
        try:
            run_pipeline(captured, inner, [p for p in PIPELINE if p.__name__ not in two_level.INNER_SKIPS])
        except ShapeConstraintError as e:
            raise ShapeConstraintError(f"tp inside each group of tp_size={mesh.tp.size} ranks (its world size): "
                                       f"{e}. With tp_size, the fix is a tp_size that divides these counts") from e
        two_level.drop_placements(captured)
        inputs, fakes = two_level.outer_inputs(inner, fakes)
        opts = dataclasses.replace(opts, checkpoint=None)            # the tp run read every stand-in
    ctx = PassContext(opts, mesh.sp.size, mesh.sp.rank, mesh.sp.group_name, inputs, list(fqns),
                      fakes=list(fakes) if fakes is not None else None, inner=inner, **context)
    gm = run_pipeline(captured, ctx, on_pass=on_pass)
    if inner is not None:
        two_level.merge(gm, ctx, example_inputs)
    return gm, ctx
