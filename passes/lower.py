"""lower: check the local graph on fake tensors, then hand it to Inductor, AOT-eager or eager.

    transformed ATen graph + this rank's inputs (sliced weights in place of full ones)
      -> FakeTensorProp        (every node gets its local shape; a wrong size fails here, by node)
      -> compile_fx | aot_eager | GraphModule.__call__

``compile_fx`` traces the local graph once more (AOTAutograd) to apply Inductor's decompositions,
which Inductor requires (``compile_fx_inner`` on the graph as it is refuses ``aten.t``: "both a
fallback and a decomp"); that trace is under 0.5 s of a 16.5 s Inductor compile of the demo
model, measured with caches off, so seqpar does not replicate it.

Weights loaded in place after the compile (``load_state_dict``) are noticed by their version
counter on the next call, and this rank's slices are cut again.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from sp_compiler.errors import SeqparError

from .regions import lower_regions

log = logging.getLogger("seqpar")

__all__ = ["check_local_shapes", "lower", "local_example_inputs", "fake_inputs", "refresh_vals",
           "inductor_cpu_fixes"]


def local_example_inputs(ctx) -> list:
    """What this rank's graph takes: sliced weights and KV cache shards in place of the full tensors."""
    return [ctx.kv[i].local if i in ctx.kv else ctx.local_inputs.get(i, x) for i, x in enumerate(ctx.example_inputs)]


def fake_inputs(ctx, local: bool = True) -> list:
    """A fake of every graph input: this rank's (``local``) or the global ones. A symbolic graph (a KV
    cache of symbolic length) keeps Dynamo's symbols: a KV cache split by heads is [B, Hkv/N, S, D] with
    Dynamo's S. An input a pass replaced (``ctx.fakes[i]`` None) is faked from its concrete tensor."""
    symbolic = ctx.fakes is not None
    mode = _mode_of(ctx.fakes) if symbolic else FakeTensorMode(allow_non_fake_inputs=True)
    out = []
    for i, x in enumerate(local_example_inputs(ctx) if local else ctx.example_inputs):
        dynamo = ctx.fakes[i] if symbolic and i < len(ctx.fakes) else None
        mine = local and (i in ctx.kv or i in ctx.local_inputs)
        if mine and ctx.kv.get(i) is not None and ctx.kv[i].split == "heads" and isinstance(dynamo, torch.Tensor):
            with mode:
                out.append(torch.empty([x.shape[0], x.shape[1], dynamo.shape[2], *x.shape[3:]], dtype=x.dtype,
                                       device=x.device))
        elif dynamo is not None and not mine:
            out.append(dynamo)
        elif isinstance(x, torch.Tensor):
            out.append(mode.from_tensor(x, static_shapes=True))
        else:
            out.append(x)
    return out


def refresh_vals(gm: torch.fx.GraphModule, ctx, local: bool = False):
    """meta['val'] of every node from ``fake_inputs(ctx, local)`` (after a pass changed sizes or inputs)."""
    fakes = fake_inputs(ctx, local)
    with torch.no_grad():
        FakeTensorProp(gm, _mode_of(fakes)).propagate_dont_convert_inputs(*fakes)


def _mode_of(fakes):
    """The fake mode of these fakes (not ``detect_fake_mode``'s: that prefers Dynamo's ambient one)."""
    return next(f.fake_mode for f in fakes if isinstance(f, FakeTensor))


def check_local_shapes(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    """Re-run the graph on fake local inputs: refreshes meta['val'] to local shapes."""
    try:
        refresh_vals(gm, ctx, local=True)
    except Exception as e:  # noqa: BLE001 - rethrown with the node that failed
        raise SeqparError(f"the transformed graph is inconsistent: {e}") from e
    return gm


def lower(gm: torch.fx.GraphModule, ctx):
    """A callable taking Dynamo's flat inputs (full weights) and returning the graph's outputs.
    A symbolic graph is lowered on fakes, so it stays symbolic (Inductor: one kernel for every length).
    A prefill graph is lowered per distinct decoder layer (``passes/regions``); a graph that reads a KV
    cache (a decode step) whole, unless ``regional="all"``: each lowered piece costs about 0.2 ms a
    call on CPU, 2.3 ms a token on an 8-layer model, where the whole decode step takes 3.3 ms."""
    how = ctx.options.lower
    with torch.no_grad():
        if how == "eager":
            compiled = gm
        elif ctx.options.regional == "all" or (ctx.options.regional == "prefill" and not ctx.reads_cache):
            compiled, ctx.regions = lower_regions(gm, functools.partial(_lower_one, how))
        else:
            inputs = fake_inputs(ctx) if ctx.fakes is not None else local_example_inputs(ctx)
            compiled = _lower_one(how, gm, inputs)
    sliced = {i: (ctx.full_inputs[i], ctx.full_inputs[i]._version) for i in ctx.local_inputs}

    def run(*args):
        args = list(args)
        for i, (full, version) in sliced.items():
            if args[i] is not full or args[i]._version != version:     # weights loaded in place since
                _reslice(ctx, i, args[i])
                sliced[i] = (args[i], args[i]._version)
            args[i] = ctx.local_inputs[i]
        with torch.no_grad():
            return compiled(*args)

    return run


def _lower_one(how: str, gm: torch.fx.GraphModule, inputs):
    if how == "inductor":
        from torch._inductor.compile_fx import compile_fx
        with inductor_cpu_fixes():
            return compile_fx(gm, inputs)
    from torch._dynamo.backends.debugging import aot_eager
    return aot_eager(gm, inputs)


class _FixesKey(CustomGraphPass):
    """Puts ``inductor_cpu_fixes`` in the key of Inductor's FX graph cache (a no-op post-grad pass with a
    uuid, the cache's hook for custom passes), so code generated before the fix is never reused. It must
    be a ``CustomGraphPass``: the FX graph and AOTAutograd caches bypass any other custom pass."""

    def __call__(self, graph):
        return None

    def uuid(self):
        return "seqpar-inductor-cpu-fixes-1"


@contextlib.contextmanager
def inductor_cpu_fixes():
    """Workarounds for torch 2.13's Inductor CPU codegen, while seqpar's graphs compile.

    pytorch issue 196681 (fix: PR 196882, not in 2.13): a reduction tiled on two loop levels that are
    not adjacent stores its tail block's accumulator at full vector width, past the end of the output
    row: silently wrong values, or heap corruption (``malloc(): unaligned tcache chunk``, SIGSEGV) once
    it passes the buffer's end. docs/inductor_cpu_bug.md has the reproducer (max |diff| 20.2 here).
    Such kernels are tiled on their inner level only (1-D vectorization, as Inductor does when one
    level qualifies); every other kernel is generated as before.
    """
    from torch._inductor import config
    from torch._inductor.codegen.cpp import TilingSelect

    original = TilingSelect.select_tiling

    def select_tiling(self, fn_list, var_sizes_list):
        factors, indices, stats = original(self, fn_list, var_sizes_list)
        if len(indices) == 2 and indices[1] != indices[0] + 1:
            log.info("seqpar: a kernel tiled on loop levels %s is tiled on %s only (pytorch issue 196681)",
                     indices, indices[1:])
            return factors[1:], indices[1:], stats
        return factors, indices, stats

    TilingSelect.select_tiling = select_tiling
    try:
        key = {} if config.post_grad_custom_post_pass is not None else {"post_grad_custom_post_pass": _FixesKey()}
        with config.patch(**key):
            yield
    finally:
        TilingSelect.select_tiling = original


def _reslice(ctx, i, full):
    """A weight this rank holds a slice of changed after the compile: cut the slice again."""
    log.info("seqpar: %s changed since the compile; slicing it again", ctx.input_fqns[i])
    if not ctx.slices(i):                         # a stand-in read whole from the checkpoint, since replaced
        ctx.local_inputs[i] = full.detach()
        return
    ctx.local_inputs[i].copy_(ctx.piece(i, full))
