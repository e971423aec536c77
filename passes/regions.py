"""regions: the transformed graph cut at decoder-layer boundaries, lowered once per distinct layer.

    transformed ATen graph, whole model (what the passes, dumps and ``last_graph()`` see)
      -> split_module:   prologue | model.layers.0 | model.layers.1 | ... | model.layers.L-1 | epilogue
      -> region_key:     each piece's code and its inputs' shapes, dtypes and strides
      -> lower_one:      once per distinct key (Inductor, AOT-eager); the others reuse that callable
    outer graph: calls piece 0, piece 1 (= compiled layer A), piece 2 (= the same callable), ...

The lowering is what grows with depth (Inductor: 66 of 80 s on a 32-layer Llama, against 6.3 s for
capture and every pass), so the passes keep running on the whole graph, where placements propagate
through the residual stream in one pass, and only the lowering is regional. A layer's weights are
inputs of its piece (Dynamo lifts them), so identical layers make identical pieces; layers that
differ (the first, which waits on the embedding's collective, the last, per-layer strategies, a
dense layer before MoE layers) get one lowering per kind.

A piece boundary sits where the module path of the node order changes layer; nodes the passes
inserted (collectives, their waits) have no module and stay with the nodes before them. A
collective issued in one piece and waited on in the next crosses the boundary as its functional
result, which ``wait_tensor`` finds in the functional collectives' registry, as in eager mode.
The cost: no Inductor fusion across a layer boundary (a residual add and the next layer's norm
are two kernels instead of one), as in ``torch.compile``'s own regional compilation, and about
0.2 ms per piece per call on CPU (the lowered callables' wrappers): ``lower`` cuts prefills only,
unless ``regional="all"``.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Callable, Dict, List

import torch
from torch.fx.node import map_arg
from torch.fx.passes.split_module import split_module

from sp_compiler.context import layer_of
from sp_compiler.graph_cache import tensor_digest
from sp_compiler.strategies import layer_path

__all__ = ["split_by_layer", "region_key", "lower_regions"]

log = logging.getLogger("seqpar")


def _piece_ids(gm: torch.fx.GraphModule) -> Dict[torch.fx.Node, int]:
    """Every non-placeholder node -> its piece: a new piece starts wherever the node order enters a
    different decoder layer, or leaves the layers; nodes with no module stay in the current piece."""
    ids, current, piece = {}, None, 0
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        here = layer_path(layer_of(n)) if n.meta.get("nn_module_stack") else current
        if here != current and ids:
            piece += 1
        current = here
        ids[n] = piece
    return ids


def split_by_layer(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` as an outer graph of ``submod_<i>`` pieces, one per decoder layer plus what lies between."""
    ids = _piece_ids(gm)
    return split_module(gm, None, lambda n: ids[n], keep_original_order=True, keep_original_node_name=True)


def _value(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{v.dtype}{list(v.shape)}{list(v.stride())}{v.device}"
    return repr(v)


def region_key(piece: torch.fx.GraphModule) -> str:
    """A digest equal for two pieces that compute the same thing on inputs of the same shapes: node
    ops, targets and arguments (nodes by position), and the inputs' shapes, strides and dtypes.
    Constants (``get_attr``) are compared by value."""
    index, lines = {}, []
    for i, n in enumerate(piece.graph.nodes):
        index[n] = i
        if n.op == "placeholder":
            lines.append(f"in {_value(n.meta.get('val'))}")
        elif n.op == "get_attr":
            t = getattr(piece, n.target)
            lines.append(f"const {_value(t)} {tensor_digest(t)}" if isinstance(t, torch.Tensor) else f"const {t!r}")
        else:
            args, kwargs = map_arg((n.args, n.kwargs), lambda a: f"%{index[a]}")
            lines.append(f"{n.op} {n.target} {args!r} {kwargs!r}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _with_tuple_output(piece: torch.fx.GraphModule, lower_one: Callable) -> Callable:
    """AOTAutograd lowers graphs that return a tuple: a piece with one output returns ``(x,)``, unwrapped."""
    out = piece.graph.output_node()
    if isinstance(out.args[0], (tuple, list)):
        return lower_one
    out.args = ((out.args[0],),)
    piece.recompile()

    def lower_unwrapped(gm, inputs):
        fn = lower_one(gm, inputs)
        return lambda *args: fn(*args)[0]

    return lower_unwrapped


def lower_regions(gm: torch.fx.GraphModule, lower_one: Callable) -> tuple:
    """(outer GraphModule calling lowered pieces, stats). ``lower_one(piece, example_inputs)`` returns a
    callable; it runs once per distinct ``region_key``, on the piece's local fake inputs. stats:
    {"pieces": how many, "lowered": how many lowerings, "kinds": per piece, its first layer and the
    index of the lowering it runs}."""
    outer = split_by_layer(gm)
    done: Dict[str, int] = {}
    lowered: List[Callable] = []
    kinds = []
    for name in [n.target for n in outer.graph.nodes if n.op == "call_module"]:
        piece = getattr(outer, name)
        key = region_key(piece)
        if key not in done:
            inputs = [n.meta["val"] for n in piece.graph.nodes if n.op == "placeholder"]
            done[key] = len(lowered)
            lowered.append(_with_tuple_output(piece, lower_one)(piece, inputs))
        kinds.append((_first_layer(piece), done[key]))
        delattr(outer, name)
        setattr(outer, name, lowered[done[key]])          # a plain callable: the outer code calls self.<name>
    log.info("seqpar: %d graph pieces, %d lowered", len(kinds), len(lowered))
    return outer, {"pieces": len(kinds), "lowered": len(lowered), "kinds": kinds}


def _first_layer(piece: torch.fx.GraphModule) -> str:
    """'model.layers.3' for a layer's piece, '-' for what lies between the layers."""
    for n in piece.graph.nodes:
        if n.op == "call_function" and n.meta.get("nn_module_stack"):
            return layer_path(layer_of(n)) or "-"
    return "-"
