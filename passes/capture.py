"""capture: Dynamo's torch-level graph -> an ATen graph (inference, no autograd).

    Dynamo FX graph (torch functions, params as inputs)
      -> make_fx under Dynamo's fake mode, no_grad, addmm decomposed to mm + add
    ATen FX graph: aten.mm / aten.view / aten._scaled_dot_product_*_attention / ...

ATen is the IR because it is small and closed: a finite table of rules covers
every model, and sizes appear as plain ints in view/expand/arange arguments.

Attention whose values have a smaller head dim than its queries and keys (MLA, DeepSeek-V2/V3: q/k
192, v 128) is traced on values zero-padded to the keys' head dim, its output sliced back:

    sdpa(q, k, v)   ->   sdpa(q, k, pad(v, [0, Dqk - Dv]))[..., :Dv]

The same numbers (the padded columns of the output are zeros, sliced away), and one fused attention
op that seqpar places (the CPU kernel, like flash attention, needs equal head dims; otherwise SDPA
decomposes into bmm / softmax, which no rule splits, and every rank would run attention whole).
"""
from __future__ import annotations

import torch
import torch.fx.traceback as fx_traceback
import torch.nn.functional as F
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from sp_compiler.errors import SeqparError

from .eager_attention import attend, find_eager_attention

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
        aten_gm = make_fx(_Capture(gm).run, tracing_mode="real", decomposition_table=_DECOMPOSE)(*fakes)
    return aten_gm


class _Capture(torch.fx.Interpreter):
    """Dynamo's graph, run for make_fx; attention with narrower values than keys on padded values, every
    projection of a [.., S, K] input as one mm (``_linear``), attention in eager ops as one attention op
    (``passes/eager_attention``: the nodes between its scores and its output are not run)."""

    def __init__(self, gm):
        super().__init__(gm, garbage_collect_values=False)       # q, k, v outlive the skipped score nodes
        self.eager = find_eager_attention(gm.graph)
        self.skipped = {n for m in self.eager.values() for n in m.interior} - set(self.eager)

    def run_node(self, n):
        if n in self.skipped:
            return None
        if n in self.eager:
            with self._set_current_node(n):
                return attend(self.eager[n], self.env, self.call_function)
        return super().run_node(n)

    def call_function(self, target, args, kwargs):
        if target is F.linear:
            return _linear(*args, **kwargs)
        if target is F.scaled_dot_product_attention:
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
            pad = k.shape[-1] - v.shape[-1]
            if pad > 0 and q.shape[-1] == k.shape[-1]:
                rest = {n: a for n, a in kwargs.items() if n not in ("query", "key", "value")}
                out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)), *args[3:], **rest)
                return out[..., :v.shape[-1]]
        return super().call_function(target, args, kwargs)


def _linear(input, weight, bias=None):                          # F.linear's own parameter names
    """``F.linear`` as ATen traces it for a weight that requires grad, whatever the weight's flag:

        x [.., K] -> view [M, K] -> mm(., t(weight)) [M, N] (+ bias) -> view [.., N]

    ATen folds the leading dims into one mm only for a weight that requires grad (or an input whose leading
    dims are contiguous); otherwise it expands the weight to [B, K, N] and calls bmm, where no rule sees a
    projection, so a frozen model (``requires_grad_(False)``, checkpoint stand-ins) had its rowwise weights
    gathered whole on every decode step. The same products, summed in the same order."""
    x = input
    if x.dim() < 3 or weight.dim() != 2:
        return F.linear(x, weight, bias)
    out = torch.mm(x.reshape(-1, x.shape[-1]), weight.t())
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def copy_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy the passes may rewrite: new nodes, each with a shallow copy of the original's meta."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)
