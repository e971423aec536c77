"""The ``seqpar`` torch.compile backend.

    torch.compile(model, backend="seqpar", options={"strategy": "ulysses"})

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so the
name works without importing this package. Every rank of the default process group
compiles the same graph with its own rank; the world size is the group's.
"""
from __future__ import annotations

import logging
import re
from typing import List, Optional

import torch
import torch.distributed as dist

from passes import lower, run_pipeline

from .config import Options
from .context import PassContext
from .dump import GraphDumper, layer_summary

__all__ = ["seqpar_backend", "last_report", "last_graph", "input_fqns", "world_info"]

log = logging.getLogger("seqpar")
_last_report: List[dict] = []
_last: dict = {}


def seqpar_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None):
    opts = Options.from_dict(options)
    world, rank, group = world_info()
    ctx = PassContext(opts, world, rank, group, list(example_inputs), input_fqns(gm))
    dumper = GraphDumper(opts.dump_dir, rank)
    aten_gm = run_pipeline(gm, ctx, on_pass=dumper.on_pass)
    header = f"strategy={opts.strategy} world={world} rank={rank} batch={ctx.batch} seq_len={ctx.seq_len}\n\n"
    dumper.collectives(ctx.collectives, header)
    dumper.attention_work(ctx.attention_work)
    _last_report[:] = ctx.collectives
    _last.update(gm=aten_gm, ctx=ctx)
    log.info("seqpar: %s on %d ranks, collectives per layer:\n%s", opts.strategy, world, layer_summary(ctx.collectives))
    return lower(aten_gm, ctx)


def last_report() -> List[dict]:
    """Collectives of the graph this process compiled last: dicts with layer, kind, dim, shape, bytes."""
    return list(_last_report)


def last_graph():
    """(transformed local ATen GraphModule, PassContext) of the last compile in this process.
    Nodes carry meta['val'] (local fake tensors) and meta['seqpar_placement']."""
    return _last.get("gm"), _last.get("ctx")


def world_info():
    """(world size, rank, group name) of the default process group; (1, 0, None) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), dist.group.WORLD.group_name
    return 1, 0, None


_PART = re.compile(r"_(?:modules|parameters|buffers)\['([^']+)'\]")


def input_fqns(gm: torch.fx.GraphModule) -> List[Optional[str]]:
    """Per placeholder: 'model.layers.0.self_attn.q_proj.weight' for parameters/buffers, None for user inputs."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        arg = n.meta.get("grapharg")
        name = arg.source.name if arg is not None and arg.source is not None else ""
        if "_parameters[" not in name and "_buffers[" not in name:
            out.append(None)
            continue
        out.append(".".join(_PART.findall(name)))
    return out
