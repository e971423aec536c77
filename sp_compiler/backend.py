"""The ``seqpar`` torch.compile backend.

    torch.compile(model, backend="seqpar", options={"strategy": "ulysses"})

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so the
name works without importing this package. Every rank of the default process group
compiles the same graph with its own rank; the world size is the group's.

    static Dynamo graph (the first length)   -> one graph for that exact length (``_compile``)
    symbolic Dynamo graph (a second length)  -> ``_Bucketed``: one graph per bucket of lengths,
                                                the prompt padded on the right, outputs cut back

``_compile``: capture once -> the pass pipeline (``passes.PIPELINE``) -> lower.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections import OrderedDict
from typing import List, Optional

import torch
import torch.distributed as dist
from tabulate import tabulate

from passes import capture_graph, lower, run_pipeline

from .config import Options
from .context import PassContext, layer_of
from .dump import GraphDumper, layer_summary, layout_of, layout_table
from .errors import InputError
from .strategies import layer_path

__all__ = ["seqpar_backend", "last_report", "last_graph", "output_layout", "compile_count", "input_fqns",
           "world_info", "bucket_length"]

log = logging.getLogger("seqpar")
_last_report: List[dict] = []
_last: dict = {}
_compiles = [0]

#: Padded graphs kept per symbolic Dynamo graph; the least recently used one goes first.
MAX_GRAPHS = 8


def seqpar_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None):
    opts = Options.from_dict(options)
    fqns = input_fqns(gm)                       # Dynamo drops this metadata once the backend returns
    check_devices(example_inputs, fqns, gm)
    if any(_symbolic(x) for x in example_inputs):
        return _Bucketed(gm, example_inputs, opts, fqns)
    return _compile(gm, list(example_inputs), opts, fqns)


def _compile(gm, example_inputs, opts, fqns, real_len=False):
    world, rank, group = world_info()
    dumper = GraphDumper(opts.dump_dir, rank)
    captured = capture_graph(gm, example_inputs)
    if opts.strategy == "auto":
        opts = _choose_strategy(captured, example_inputs, opts, fqns, real_len, dumper)
    ctx = PassContext(opts, world, rank, group, list(example_inputs), list(fqns), real_len=real_len)
    aten_gm = run_pipeline(captured, ctx, on_pass=dumper.on_pass)
    _compiles[0] += 1
    header = f"strategy={opts.strategy} world={world} rank={rank} batch={ctx.batch} seq_len={ctx.seq_len}\n\n"
    dumper.collectives(ctx.collectives, header)
    dumper.attention_work(ctx.attention_work)
    layout = layout_of(ctx)
    dumper.write("outputs.txt", layout_table(layout))
    _last_report[:] = ctx.collectives
    _last.update(gm=aten_gm, ctx=ctx, layout=layout)
    log.info("seqpar: %s on %d ranks, collectives per layer:\n%s", opts.strategy, world, layer_summary(ctx.collectives))
    return lower(aten_gm, ctx)


def _symbolic(x) -> bool:
    return isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
        isinstance(s, torch.SymInt) for s in x.shape))


def check_devices(example_inputs, fqns, gm):
    """Every input on one device: a prompt on another device than the weights is named."""
    tensors = [(i, x) for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor)]
    weights = {x.device for i, x in tensors if fqns[i] is not None}
    if len(weights) != 1:
        return
    (device,) = weights
    names = input_names(gm)
    token = _token_index(example_inputs, fqns, names)
    if token is not None and "input_ids" not in names[token]:
        names[token] = f"input_ids ({names[token]})"
    for i, x in tensors:
        if fqns[i] is None and x.device != device:
            raise InputError(f"input {names[i]} is on {x.device} but the model's weights are on {device}. "
                             f"Fix: move it with .to({str(device)!r}) before the call")


def bucket_length(S: int, world: int, buckets="auto") -> int:
    """The padded length a symbolic graph is compiled for: with ``"auto"`` the smallest m * 2^k >= S
    with 8 <= m <= 15 (at most 1/8 wasted), and at least 512; a list picks its first entry >= S;
    ``"exact"`` keeps S. Rounded up to a multiple of 2 * world so zig-zag chunks are equal."""
    if buckets == "exact":
        return S
    if buckets == "auto":
        k = max(0, S.bit_length() - 4)
        b = max(512, -(-S // (1 << k)) * (1 << k))
    else:
        b = next((x for x in sorted(buckets) if x >= S), S)
    return -(-b // (2 * world)) * (2 * world)


class _Bucketed:
    """Dynamo made sizes dynamic (the model saw a second prompt length): pad each prompt on the right
    to its bucket's length (``bucket_length``) and compile one static graph per bucket.

        call(input_ids [B, S], attention_mask [B, S], ...)
          -> pad every [B, S] input to [B, S_b]   (tokens and positions 0, mask 0)
          -> graph(padded inputs, S)              causal attention: no real token sees a padded one;
                                                  rows counted from the end (logits_to_keep) use S
          -> every output's sequence dim cut back to S

    Exact because a causal LM's token never attends to a later one, and the appended tokens come
    after every real one. Costs up to 1/8 more tokens per prefill (none for ``buckets="exact"``).
    At most ``MAX_GRAPHS`` graphs are kept; every rank sees the same lengths and so compiles the
    same graphs in the same order."""

    def __init__(self, gm, example_inputs, opts, fqns):
        self.gm, self.opts, self.fqns = gm, opts, fqns
        self.names = input_names(gm)
        self.token = _token_index(example_inputs, fqns, self.names)
        if self.token is None:
            raise InputError("seqpar needs input_ids (an integer [B, S] tensor); inputs_embeds is not supported. "
                             "Fix: call the model with input_ids")
        self.seq = _seq_symbols(gm, example_inputs, fqns, self.token)
        self.out_dims = _output_seq_dims(gm, self.seq)
        self.compiled: "OrderedDict[tuple, object]" = OrderedDict()

    def __call__(self, *args):
        S = args[self.token].shape[1]
        self._check_lengths(args, S)
        padded_len = bucket_length(S, world_info()[0], self.opts.buckets)
        if self.out_dims is None:
            padded_len = S                                     # outputs not recognised: exact length
        padded = [self._pad(i, a, S, padded_len) for i, a in enumerate(args)]
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in padded)
        if key not in self.compiled:
            log.info("seqpar: compiling for prompt length %d (bucket %d)", S, padded_len)
            self.compiled[key] = (_compile(self.gm, padded, self.opts, self.fqns, real_len=True), output_layout())
            if len(self.compiled) > MAX_GRAPHS:
                old, _ = self.compiled.popitem(last=False)
                log.info("seqpar: dropped the graph for input shapes %s (more than %d kept)", old, MAX_GRAPHS)
        self.compiled.move_to_end(key)
        run, layout = self.compiled[key]
        outs = run(*padded, torch.tensor(S))
        layout = [_real_rows(row, dims, S) for row, dims in zip(layout, self.out_dims or [()] * len(layout))]
        _last["layout"] = layout
        if padded_len == S:
            return outs
        return [_cut(o, dims, S, row) for o, dims, row in zip(outs, self.out_dims, layout)]

    def _check_lengths(self, args, S):
        for i in self.seq["inputs"]:
            a = args[i]
            if a.shape[1] != S:
                raise InputError(f"input {self.names[i]} has length {a.shape[1]} but input_ids has {S}. "
                                 f"Fix: pass one entry per token ({S})")

    def _pad(self, i, a, S, padded_len):
        if padded_len == S:
            return a
        if i in self.seq["ints"]:
            return padded_len
        dims = self.seq["inputs"].get(i)
        if not dims or not isinstance(a, torch.Tensor):
            return a
        pad = []
        for d in range(a.dim() - 1, -1, -1):
            pad += [0, padded_len - S if d in dims else 0]
        return torch.nn.functional.pad(a, pad, value=0)


def _real_rows(row, dims, S):
    """The layout of one output with the padding (global rows >= S) left out."""
    if "rows" not in row or row["dim"] not in dims:
        return row
    return {**row, "padded_rows": row["rows"], "rows": [[start, max(0, min(n, S - start))] for start, n in row["rows"]]}


def _cut(out, dims, S, row):
    """Drop the padding from one output: rows >= S of every sequence dim (of this rank's chunks
    when the output stays sharded)."""
    if not isinstance(out, torch.Tensor) or not dims:
        return out
    for d in dims:
        if "rows" in row and row["dim"] == d:
            at, pieces = 0, []
            for (_, n), (_, keep) in zip(row["padded_rows"], row["rows"]):
                pieces.append(out.narrow(d, at, keep))
                at += n
            out = torch.cat(pieces, d) if len(pieces) > 1 else pieces[0]
        else:
            out = out.narrow(d, 0, min(S, out.shape[d]))
    return out


def _seq_symbols(gm, example_inputs, fqns, token):
    """{'inputs': {placeholder index: dims of the prompt length}, 'ints': {placeholder index}} for a
    symbolic graph: the length is input_ids' dim 1; other user inputs of the same length (a mask,
    position ids) share it. None when the graph's inputs are not recognised."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("example_value") for n in phs]
    S = example_inputs[token].shape[1]
    inputs, ints, symbols = {}, set(), set()
    for i, (x, v) in enumerate(zip(example_inputs, vals)):
        if fqns[i] is not None or not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != S:
            continue
        inputs[i] = {1}
        if isinstance(v, torch.Tensor) and isinstance(v.shape[1], torch.SymInt):
            symbols.add(v.shape[1].node.expr)
    for i, v in enumerate(vals):
        if isinstance(v, torch.SymInt) and v.node.expr in symbols:
            ints.add(i)
    return {"inputs": inputs, "ints": ints, "symbols": symbols}


def _token_index(example_inputs, fqns, names=None):
    """The input_ids placeholder: by name when Dynamo kept it, else the first integer [B, S] user input."""
    ints = [i for i, x in enumerate(example_inputs) if fqns[i] is None and isinstance(x, torch.Tensor)
            and x.dim() == 2 and not x.is_floating_point() and x.dtype != torch.bool]
    named = [i for i in ints if names and "input_ids" in names[i]]
    return (named or ints or [None])[0]


def _output_seq_dims(gm, seq):
    """Per graph output, the dims whose size is the prompt length; None if some output's size depends
    on the length otherwise (then prompts are compiled at their exact length)."""
    if seq is None:
        return None
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    dims = []
    for a in torch.utils._pytree.tree_leaves(out.args[0]):
        v = a.meta.get("example_value") if isinstance(a, torch.fx.Node) else None
        if not isinstance(v, torch.Tensor):
            dims.append(())
            continue
        mine = []
        for d, size in enumerate(v.shape):
            if isinstance(size, torch.SymInt):
                if size.node.expr in seq["symbols"]:
                    mine.append(d)
                elif size.node.expr.free_symbols & seq["symbols"]:
                    return None
        dims.append(tuple(mine))
    return dims


def _choose_strategy(captured, example_inputs, opts, fqns, real_len, dumper) -> Options:
    """``strategy="auto"``: the planner prices every strategy on the graph captured for this compile
    (``plan.price_strategies``, the function ``seqpar plan`` uses) and the fastest legal one wins.
    Every rank prices the same ranks' graphs, so all reach the same choice. The machine profile
    comes from $SEQPAR_MACHINE, else the CUDA device name, else this machine's cpu-gloo calibration.
    """
    from .plan import best_of, price_strategies

    world, _, group = world_info()
    machine = machine_profile()
    layers = {layer_path(layer_of(n)) for n in captured.graph.nodes if layer_path(layer_of(n))}
    preds = price_strategies(captured, example_inputs, fqns, opts, world, machine, num_layers=len(layers),
                             group=group, real_len=real_len)
    best = best_of(preds, world)
    rows = [[p.strategy, "*" if p.strategy == best else "", f"{p.total_s * 1e3:.3f}" if p.ok else p.error[:100]]
            for p in preds]
    text = f"auto on {machine if isinstance(machine, str) else machine.name}, world {world}: chose {best}\n" + \
        tabulate(rows, headers=["strategy", "chosen", "predicted ms"]) + "\n"
    dumper.write("auto.txt", text)
    log.info("seqpar: %s", text)
    return dataclasses.replace(opts, strategy=best)


def machine_profile():
    """The cost-model profile ``auto`` uses on this machine."""
    import os

    from .cost_model import MachineProfile, cuda_profile_name, load_calibration

    name = os.environ.get("SEQPAR_MACHINE") or cuda_profile_name()
    if name:
        return name
    prof = load_calibration()
    if prof is not None:
        return prof
    log.warning("seqpar: no cpu-gloo calibration (run `seqpar calibrate`); auto uses rough CPU defaults")
    return MachineProfile("cpu-gloo-default", link_bw=1e9, link_latency_s=5e-5, peak_flops=5e10, mem_bw=1e10,
                          dtype="float32")


def last_report() -> List[dict]:
    """Collectives of the graph this process compiled last: dicts with layer, kind, dim, shape, bytes."""
    return list(_last_report)


def compile_count() -> int:
    """How many graphs seqpar has compiled in this process (one per seqpar pipeline run)."""
    return _compiles[0]


def output_layout() -> List[dict]:
    """Where the outputs of the graph compiled last live on this rank, one dict per output: placement,
    global and local shape, and for a sharded output the global rows this rank holds."""
    return list(_last.get("layout", []))


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


def input_names(gm: torch.fx.GraphModule) -> List[str]:
    """Per placeholder, the user's name for it: "L['kwargs']['attention_mask']" -> 'attention_mask'."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            arg = n.meta.get("grapharg")
            name = arg.source.name if arg is not None and arg.source is not None else n.name
            kw, pos = re.match(r"L\['kwargs'\]\['(\w+)'\]$", name), re.match(r"L\['args'\]\[(\d+)\]$", name)
            out.append(repr(kw.group(1)) if kw else f"positional argument {pos.group(1)}" if pos else name)
    return out


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
