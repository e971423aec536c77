"""lower: check the local graph on fake tensors, then hand it to Inductor, AOT-eager or eager.

    transformed ATen graph + this rank's inputs (sliced weights in place of full ones)
      -> FakeTensorProp        (every node gets its local shape; a wrong size fails here, by node)
      -> compile_fx | aot_eager | GraphModule.__call__
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from sp_compiler.errors import SeqparError

__all__ = ["check_local_shapes", "lower", "local_example_inputs"]


def local_example_inputs(ctx) -> list:
    return [ctx.local_inputs.get(i, x) for i, x in enumerate(ctx.example_inputs)]


def check_local_shapes(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    """Re-run the graph on fake local inputs: refreshes meta['val'] to local shapes."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in local_example_inputs(ctx)]
    try:
        with torch.no_grad():
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    except Exception as e:  # noqa: BLE001 - rethrown with the node that failed
        raise SeqparError(f"the transformed graph is inconsistent: {e}") from e
    return gm


def lower(gm: torch.fx.GraphModule, ctx):
    """A callable taking Dynamo's flat inputs (full weights) and returning the graph's outputs."""
    inputs = local_example_inputs(ctx)
    how = ctx.options.lower
    with torch.no_grad():
        if how == "inductor":
            from torch._inductor.compile_fx import compile_fx
            compiled = compile_fx(gm, inputs)
        elif how == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager
            compiled = aot_eager(gm, inputs)
        else:
            compiled = gm
    swaps = sorted(ctx.local_inputs.items())

    def run(*args):
        args = list(args)
        for i, local in swaps:
            args[i] = local
        with torch.no_grad():
            return compiled(*args)

    return run
