"""capture: Dynamo's torch-level graph -> an ATen graph (inference, no autograd).

    Dynamo FX graph (torch functions, params as inputs)
      -> make_fx under Dynamo's fake mode, no_grad, addmm decomposed to mm + add
    ATen FX graph: aten.mm / aten.view / aten._scaled_dot_product_*_attention / ...

ATen is the IR because it is small and closed: a finite table of rules covers
every model, and sizes appear as plain ints in view/expand/arange arguments.
"""
from __future__ import annotations

import torch
import torch.fx.traceback as fx_traceback
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from sp_compiler.errors import SeqparError

__all__ = ["capture", "copy_graph"]

_DECOMPOSE = torch._decomp.get_decompositions([torch.ops.aten.addmm])


def capture(gm: torch.fx.GraphModule, example_inputs, fakes=None) -> torch.fx.GraphModule:
    """Once per compile, before the passes (``strategy="auto"`` prices every strategy on copies).
    ``fakes``: Dynamo's own (symbolic) values of the placeholders, for a graph whose KV cache length is
    symbolic; without them the graph is traced at the example inputs' concrete shapes."""
    if fakes is None:
        for x in example_inputs:
            if isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
                    isinstance(s, torch.SymInt) for s in x.shape)):
                raise SeqparError("capture needs concrete shapes; the backend compiles symbolic graphs per shape")
        fake_mode = detect_fake_mode(example_inputs) or torch._subclasses.FakeTensorMode()
        fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    else:
        fake_mode = next(f.fake_mode for f in fakes if isinstance(f, torch._subclasses.FakeTensor))
    # Running Dynamo's graph through an Interpreter under preserve_node_meta() stamps every
    # ATen node with the nn_module_stack of the torch-level node it came from.
    with torch.no_grad(), fake_mode, fx_traceback.preserve_node_meta():
        aten_gm = make_fx(torch.fx.Interpreter(gm).run, tracing_mode="real", decomposition_table=_DECOMPOSE)(*fakes)
    return aten_gm


def copy_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy the passes may rewrite: new nodes, each with a shallow copy of the original's meta."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)
