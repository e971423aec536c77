"""The ``seqpar`` torch.compile backend.

    torch.compile(model, backend="seqpar", options={"strategy": "ulysses"})

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so the
name works without importing this package. Every rank of the default process group
compiles the same graph with its own rank; the world size is the group's.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import List, Optional

import torch
import torch.distributed as dist

from passes import lower, run_pipeline

from .config import Options
from .context import PassContext, layer_of
from .strategies import layer_path
from tabulate import tabulate
from .dump import GraphDumper, layer_summary

__all__ = ["seqpar_backend", "last_report", "last_graph", "input_fqns", "world_info"]

log = logging.getLogger("seqpar")
_last_report: List[dict] = []
_last: dict = {}


def seqpar_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None):
    opts = Options.from_dict(options)
    fqns = input_fqns(gm)                       # Dynamo drops this metadata once the backend returns
    if any(_symbolic(x) for x in example_inputs):
        return _PerShape(gm, opts, fqns)
    return _compile(gm, list(example_inputs), opts, fqns)


def _compile(gm, example_inputs, opts, fqns):
    world, rank, group = world_info()
    dumper = GraphDumper(opts.dump_dir, rank)
    if opts.strategy == "auto":
        opts = _choose_strategy(gm, example_inputs, opts, world, group, dumper, fqns)
    ctx = PassContext(opts, world, rank, group, list(example_inputs), fqns)
    aten_gm = run_pipeline(gm, ctx, on_pass=dumper.on_pass)
    header = f"strategy={opts.strategy} world={world} rank={rank} batch={ctx.batch} seq_len={ctx.seq_len}\n\n"
    dumper.collectives(ctx.collectives, header)
    dumper.attention_work(ctx.attention_work)
    _last_report[:] = ctx.collectives
    _last.update(gm=aten_gm, ctx=ctx)
    log.info("seqpar: %s on %d ranks, collectives per layer:\n%s", opts.strategy, world, layer_summary(ctx.collectives))
    return lower(aten_gm, ctx)


def _symbolic(x) -> bool:
    return isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
        isinstance(s, torch.SymInt) for s in x.shape))


class _PerShape:
    """Dynamo made sizes dynamic (the model saw a second prompt length): seqpar's graphs are
    static, so compile one per distinct input shape, on first use, and keep them all.
    Every rank sees the same shapes, so every rank compiles the same sequence of graphs."""

    def __init__(self, gm, opts, fqns):
        self.gm, self.opts, self.fqns = gm, opts, fqns
        self.compiled = {}

    def __call__(self, *args):
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in self.compiled:
            log.info("seqpar: compiling for input shapes %s", key)
            self.compiled[key] = _compile(self.gm, list(args), self.opts, self.fqns)
        return self.compiled[key](*args)


def _choose_strategy(gm, example_inputs, opts, world, group, dumper, fqns) -> Options:
    """``strategy="auto"``: price every legal strategy with the cost model and keep the fastest.

    Every rank prices the graph of rank N-1 (the busiest under contiguous vanilla SP), so all
    ranks reach the same choice. The machine profile comes from $SEQPAR_MACHINE, else the
    CUDA device name, else this machine's cpu-gloo calibration (``seqpar calibrate``).
    """
    from .cost_model import predict
    from .errors import SeqparError
    from .strategies import IMPLEMENTED

    machine = machine_profile()
    preds = {}
    for name in IMPLEMENTED:
        trial = dataclasses.replace(opts, strategy=name, dump_dir=None)
        ctx = PassContext(trial, world, world - 1, group, list(example_inputs), fqns)
        try:
            local = run_pipeline(gm, ctx)
        except SeqparError as e:
            preds[name] = str(e).splitlines()[0]
            continue
        layers = {layer_of(n) for n in local.graph.nodes if layer_path(layer_of(n))}
        preds[name] = predict(local, ctx, machine, num_layers=len(layers))
    legal = {k: p for k, p in preds.items() if not isinstance(p, str)}
    if not legal:
        raise SeqparError(f"strategy='auto': no strategy can run this model on {world} ranks: {preds}")
    best = min(legal, key=lambda k: legal[k].total_s)
    rows = [[k, "*" if k == best else "", f"{p.total_s * 1e3:.3f}" if not isinstance(p, str) else p[:100]]
            for k, p in preds.items()]
    text = f"auto on {machine if isinstance(machine, str) else machine.name}, world {world}: chose {best}\n" + \
        tabulate(rows, headers=["strategy", "chosen", "predicted ms"]) + "\n"
    dumper.write("auto.txt", text)
    log.info("seqpar: %s", text)
    return dataclasses.replace(opts, strategy=best)


def machine_profile():
    """The cost-model profile ``auto`` uses on this machine."""
    import os

    from .cost_model import MachineProfile, load_calibration

    name = os.environ.get("SEQPAR_MACHINE")
    if name:
        return name
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
        return "h200-nvlink" if "H200" in dev else "a100-nvlink" if "A100" in dev else "h100-nvlink"
    prof = load_calibration()
    if prof is not None:
        return prof
    log.warning("seqpar: no cpu-gloo calibration (run `seqpar calibrate`); auto uses rough CPU defaults")
    return MachineProfile("cpu-gloo-default", link_bw=1e9, link_latency_s=5e-5, peak_flops=5e10, mem_bw=1e10,
                          dtype="float32")


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
