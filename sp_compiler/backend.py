"""The ``seqpar`` torch.compile backend.

    torch.compile(model, backend="seqpar", options={"strategy": "ulysses"})

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so the
name works without importing this package. Every rank of the default process group
compiles the same graph with its own rank; the world size is the group's.

    static Dynamo graph (the first length)   -> one graph for that exact length (``_Graph``)
    symbolic prompt length (a second length) -> ``_Bucketed``: one graph per bucket of lengths,
                                                the prompt padded on the right, outputs cut back
    a graph that reads a KV cache            -> ``_Graph``, symbolic in the cache's length when Dynamo
      (a decode step, a follow-up prefill)      made it so: one graph for every step

``_compile``: capture once -> the pass pipeline (``passes.PIPELINE``) -> lower; a compile an earlier
process made takes its transformed graph from ``graph_cache`` instead of capture and the passes.

With ``outputs="local"`` the KV cache stays split between the ranks for the whole generation:
HuggingFace's cache holds stand-ins and each rank its share (``sp_compiler.kv``); ``_Graph`` swaps
them in and out around every call and decides which rank keeps a decode step's new rows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
from collections import OrderedDict
from typing import List, Optional

import torch
import torch.distributed as dist
from tabulate import tabulate

from passes import PIPELINE, capture_graph, lower, run_layout, two_level
from passes.kv_attention import cache_outputs, whole_cache_outputs

from . import graph_cache
from .agree import Fingerprint, RankMismatchError, check_ranks, stable_hash
from .config import STRATEGY_NAMES, Options
from .context import layer_of
from .dump import GraphDumper, layer_summary, layout_of, layout_table
from .errors import InputError
from .mesh import across_groups, mesh_of, world_info
from .kv import KVInput, KVState, capacity_for, is_stand_in, kv_of, row_spans
from .placements import Layout, is_rank_local, is_replicate, is_shard
from .pricing import best_layout, price_strategies, two_level_sizes
from .strategies import STRATEGIES, layer_path

__all__ = ["seqpar_backend", "last_report", "last_graph", "output_layout", "compile_count", "compiled_graphs",
           "input_fqns",
           "world_info", "bucket_length", "reads_kv_cache", "keep_kv_local", "Compiled", "KVStep"]

log = logging.getLogger("seqpar")
_last_report: List[dict] = []
_last: dict = {}
_compiles = [0]
_history: List[dict] = []

#: Compiled graphs ``compiled_graphs()`` remembers.
MAX_HISTORY = 64

#: Padded graphs kept per symbolic Dynamo graph; the least recently used one goes first.
MAX_GRAPHS = 8


def seqpar_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None):
    opts = Options.from_dict(options)
    fqns = input_fqns(gm)                       # Dynamo drops this metadata once the backend returns
    check_devices(example_inputs, fqns, gm)
    if any(_symbolic(x) for x in example_inputs) and not reads_kv_cache(gm, example_inputs):
        return _Bucketed(gm, example_inputs, opts, fqns)
    return _Graph(gm, list(example_inputs), opts, fqns)


class Compiled:
    """One lowered graph and what the caller needs to know of it."""

    def __init__(self, run, ctx, layout, caches, fingerprint):
        self.run, self.ctx, self.layout, self.fingerprint = run, ctx, layout, fingerprint
        self.caches = {i: key for i, (key, _) in caches.items()}      # output -> KV key ('model.layers.0.k')
        self.cache_shapes = {i: shape for i, (_, shape) in caches.items()}   # as the model makes them

    def __call__(self, *args):
        return self.run(*args)


def _compile(gm, example_inputs, opts, fqns, real_len=False, fakes=None, kv=None) -> Compiled:
    dumper = GraphDumper(opts.dump_dir, world_info()[1])
    reads_cache = reads_kv_cache(gm, example_inputs)
    key = _cache_key(gm, example_inputs, opts, fqns, reads_cache, real_len, symbolic=fakes is not None or bool(kv))
    hit = key is not None and graph_cache.load(key, opts, *world_info(), example_inputs, fqns)
    if hit:
        aten_gm, ctx, caches = hit
    else:
        with graph_cache.recorded() as warned:
            aten_gm, ctx, caches, opts = _transform(gm, example_inputs, opts, fqns, real_len, fakes, kv, dumper,
                                                    reads_cache)
        if key is not None:
            graph_cache.save(key, aten_gm, ctx, caches, warned)
    world, rank, short = ctx.world, ctx.rank, ctx.short
    _compiles[0] += 1
    level = f" tp_size={opts.tp_size} (tp rank {ctx.inner.rank}; world and rank across groups)" if ctx.inner else ""
    header = f"strategy={opts.strategy}{level} world={world} rank={rank} batch={ctx.batch} seq_len={ctx.seq_len}\n\n"
    dumper.collectives(ctx.collectives, header)
    dumper.attention_work(ctx.attention_work)
    layout = layout_of(ctx)
    dumper.write("outputs.txt", layout_table(layout))
    mine, whole = ctx.weight_bytes()
    dumper.write("weights.txt", f"rank {rank} holds {mine} bytes of parameters and buffers "
                                f"({mine / max(whole, 1):.1%} of the model's {whole})\n")
    _last_report[:] = ctx.collectives
    _last.update(gm=aten_gm, ctx=ctx, layout=layout)
    log.info("seqpar: %s%s on %d ranks, %.1f MiB of weights on this rank (%.0f%% of the model), collectives per "
             "layer:\n%s", opts.strategy, " (short call)" if short else "", world, mine / 2**20,
             100 * mine / max(whole, 1), layer_summary(ctx.collectives))
    run = lower(aten_gm, ctx)
    if ctx.regions:
        dumper.write("regions.txt", "".join(f"piece {i}: {layer}, lowering {k}\n"
                                            for i, (layer, k) in enumerate(ctx.regions["kinds"])))
    _history.append({"strategy": opts.strategy, "batch": ctx.batch, "tokens": ctx.seq_len, "short": short,
                     "kv": sorted({info.split for info in ctx.kv.values()}), "collectives": list(ctx.collectives),
                     "regions": {k: v for k, v in ctx.regions.items() if k != "kinds"}})
    del _history[:-MAX_HISTORY]
    return Compiled(run, ctx, layout, caches, fingerprint(ctx, opts))


def _cache_key(gm, example_inputs, opts, fqns, reads_cache, real_len, symbolic) -> Optional[str]:
    """``graph_cache``'s key of this compile, or None where it is not cached (``graph_cache.cacheable``)."""
    why = graph_cache.cacheable(example_inputs, opts, reads_cache, symbolic)
    if why is not None:
        log.debug("seqpar: graph cache not used: %s", why)
        return None
    world, rank, group = world_info()
    return graph_cache.graph_key(gm, example_inputs, fqns, opts, world, rank, group,
                                 dist.get_backend() if group is not None else None,
                                 _short_call(example_inputs, fqns, gm, opts, world), real_len,
                                 [p.__name__ for p in PIPELINE])


def _transform(gm, example_inputs, opts, fqns, real_len, fakes, kv, dumper, reads_cache):
    """capture -> (strategy="auto": choose) -> the passes: (this rank's graph, its PassContext, its KV cache
    outputs, the options it ran: "auto" chosen)."""
    captured = capture_graph(gm, example_inputs, fakes)
    caches = cache_outputs(captured)
    if opts.strategy == "auto":
        opts = _choose_strategy(captured, example_inputs, opts, fqns, real_len, dumper)
    # making a two-level mesh's sub-groups is collective: a rank given another tp_size would leave the others
    # waiting in it, so the ranks first compare their options (a rank with the mesh it needs, or none to
    # make, meets this check with the one before its call, and the values differ there too)
    mesh = mesh_of(opts.tp_size, before_groups=lambda: _check(opts, _options_fingerprint(opts), example_inputs,
                                                              _token_index(example_inputs, fqns), fqns))
    world, group = mesh.sp.size, mesh.sp.group_name
    short = _short_call(example_inputs, fqns, gm, opts, world)
    aten_gm, ctx = run_layout(captured, example_inputs, fqns, opts, mesh, fakes=fakes, on_pass=dumper.on_pass,
                              real_len=real_len, kv=dict(kv or {}), short=short,
                              one_in_flight=group is not None and dist.get_backend() == "gloo",
                              whole_outputs=whole_cache_outputs(captured, caches), reads_cache=reads_cache)
    if ctx.inner is not None and opts.outputs == "local":
        two_level.check_local_cache(ctx, caches)
    return aten_gm, ctx, caches, opts


def fingerprint(ctx, opts) -> Fingerprint:
    """What this rank compiled, for ``agree.check_ranks``: the same on every rank that runs the same thing."""
    params = [(fqn, tuple(x.shape), str(x.dtype)) for fqn, x in zip(ctx.input_fqns, ctx.full_inputs)
              if fqn is not None and isinstance(x, torch.Tensor)]
    # a tp row of a two-level layout has this group's own rows: groups differ where G does not divide S
    collectives = [(r["kind"], str(r["dim"]), tuple(r["shape"]) if r.get("mesh") != "tp" else len(r["shape"]),
                    r["dtype"]) for r in ctx.collectives]
    layers = {layer_path(fqn) for fqn, _, _ in params} - {None}
    given = _options_fingerprint(opts)
    return dataclasses.replace(given, layers=len(layers), model=stable_hash(repr(params)),
                               collectives=len(collectives), collectives_hash=stable_hash(repr(collectives)),
                               extra={**given.extra, "model": f"{len(params)} parameters",
                                      "collectives_hash": ", ".join(sorted({c[0] for c in collectives}))})


def _options_fingerprint(opts) -> Fingerprint:
    """The part of ``fingerprint`` known before compiling: the strategy and the options."""
    options = repr(dataclasses.replace(opts, dump_dir=None, checkpoint=opts.checkpoint and "<path>"))
    return Fingerprint(strategy=STRATEGY_NAMES.index(opts.strategy), options=stable_hash(options),
                       strategy_name=opts.strategy, extra={"options": options})


def _check(opts, fp, args, token, fqns, kv_length=0, error=0):
    """``agree.check_ranks`` for one call of a graph (``fp`` None: this rank failed to compile it). The
    inputs hash covers the user's inputs only: the parameters are in the compile-time ``model`` hash."""
    if not opts.check_ranks:
        return
    user = [(tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else a
            for a, fqn in zip(args, fqns) if fqn is None]
    batch, tokens = tuple(args[token].shape[:2]) if token is not None else (0, 0)
    values = (fp or Fingerprint()).values(tokens, batch, kv_length, stable_hash(repr(user)), error)
    check_ranks(values, fp, group=None)


@contextlib.contextmanager
def _joined_on_failure(opts, args, token, fqns):
    """A rank that fails to compile a call still joins that call's ``check_ranks`` (error set), so the
    ranks that compiled raise too instead of waiting in it; then it raises its own error. A check that
    failed during the compile (the options compared before a mesh's sub-groups are made) was this
    rank's part already."""
    try:
        yield
    except RankMismatchError:
        raise
    except Exception:
        try:
            _check(opts, None, args, token, fqns, error=1)
        except RankMismatchError:
            pass                                   # the others raise it; this rank raises its own error
        raise


def _short_call(example_inputs, fqns, gm, opts, world) -> bool:
    """Fewer tokens than sequence chunks (N, or 2N under zig-zag): a decode step or a tiny prompt runs
    ``strategies.short_strategy``, so no rank ever holds an empty shard."""
    token = _token_index(example_inputs, fqns, input_names(gm))
    if token is None or world == 1:
        return False
    S = example_inputs[token].shape[1]
    zigzag = any(STRATEGIES[n].zigzag for n in (opts.strategy, *dict(opts.layers).values()) if n in STRATEGIES)
    return S < Layout(S, world, zigzag).n_chunks


def reads_kv_cache(gm, example_inputs) -> bool:
    """Does Dynamo's graph read a KV cache: a stand-in, or a user input that a cat along the sequence
    (dim -2 of [B, H, S, D]) grows?"""
    if any(is_stand_in(x) for x in example_inputs):
        return True
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.cat:
            tensors, dim = n.args[0], n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
            if dim in (-2, 2) and any(isinstance(t, torch.fx.Node) and t.op == "placeholder" for t in tensors):
                return True
    return False


class _Graph:
    """Dynamo's graph compiled as it is: static, or symbolic only in the length of a KV cache it reads
    (then lowered on Dynamo's symbolic values: one graph for every decode step). With a KV cache kept
    split between the ranks, one compiled graph per slot capacity (``sp_compiler.kv``). A graph whose
    token count is symbolic too (follow-up prefills of several lengths) compiles per input shapes."""

    def __init__(self, gm, example_inputs, opts, fqns):
        self.gm, self.opts, self.fqns = gm, opts, fqns
        self.names = input_names(gm)
        self.token = _token_index(example_inputs, fqns, self.names)
        fakes = _dynamo_fakes(gm) if any(_symbolic(x) for x in example_inputs) else None
        self.exact = fakes is not None and (self.token is None or _symbolic(fakes[self.token]))
        self.fakes = None if self.exact else fakes
        self.kv = [i for i, x in enumerate(example_inputs) if is_stand_in(x)]
        self.compiled: "OrderedDict[object, Compiled]" = OrderedDict()
        if not self.exact:                               # exact: at the first call, which has concrete sizes
            with _joined_on_failure(opts, example_inputs, self.token, fqns):
                self._compiled_for(example_inputs, self._plan(example_inputs))

    def _plan(self, args):
        """The KV cache this call reads (None for a fresh one) and, split by sequence, where its new rows go."""
        if not self.kv:
            return None
        states = {kv_of(args[i])[0] for i in self.kv}
        if len(states) != 1:
            raise InputError("the KV cache stand-ins of one call come from different caches. Fix: pass the cache "
                             "returned by the previous call")
        (state,) = states
        return KVStep(state, args[self.token].shape[1], across_groups(state.tp_size)[0])

    def _compiled_for(self, args, step) -> Compiled:
        key = None if step is None else step.state.slots.capacity if step.state.split == "seq" else "heads"
        if self.exact:
            key = (key, *(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args))
        if key not in self.compiled:
            opts = self.opts if step is None else dataclasses.replace(self.opts, strategy=step.state.strategy,
                                                                      tp_size=step.state.tp_size)
            kv = {} if step is None else {i: step.input(kv_of(args[i])[1]) for i in self.kv}
            self.compiled[key] = _compile(self.gm, list(args), opts, self.fqns, fakes=self.fakes, kv=kv)
            if len(self.compiled) > MAX_GRAPHS:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(key)
        return self.compiled[key]

    def __call__(self, *args):
        with _joined_on_failure(self.opts, args, self.token, self.fqns):
            step = self._plan(args)
            graph = self._compiled_for(args, step)
        _check(self.opts, graph.fingerprint, args, self.token, self.fqns,
               step.state.length if step is not None else 0)
        local = list(args)
        for i in self.kv:
            local[i] = step.state.buffers[kv_of(args[i])[1]]
        extra = [step.state.slots.positions] if step is not None and step.state.split == "seq" else []
        outs = graph(*local, *extra)
        _last["layout"] = graph.layout
        if self.opts.outputs != "local":
            return outs
        return keep_kv_local(outs, graph, step, args[self.token].shape[1], self.opts)


def _dynamo_fakes(gm) -> list:
    """Dynamo's own values of the placeholders: fake tensors with its symbolic sizes, and SymInts."""
    return [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]


class KVStep:
    """One call's new rows of a KV cache split by sequence: which rank keeps them, and their positions.

        a decode step (fewer new rows than chunks): every rank computed them, the rank holding fewest
            rows keeps them (``SeqSlots.owner``)
        a follow-up prefill: each rank keeps the chunks of the new rows it computed (``Layout``)
    """

    def __init__(self, state: KVState, new: int, world: int):
        self.state, self.new = state, new
        if state.split != "seq":
            return
        zigzag = STRATEGIES[state.strategy].zigzag
        lay = Layout(new, world, zigzag)
        if new < lay.n_chunks:
            owner = state.slots.owner()
            self.added = [new if r == owner else 0 for r in range(world)]
            spans = [(0, new)] if owner == state.rank else []
        else:
            self.added = [lay.local_size(r) for r in range(world)]
            spans = lay.spans(state.rank)
        self.positions = torch.cat([torch.arange(state.length + a, state.length + a + n) for a, n in spans]) \
            if spans else torch.zeros(0, dtype=torch.int64)
        state.ensure_free(self.added[state.rank])

    def input(self, key) -> KVInput:
        s = self.state
        return KVInput(s.split, key, s.buffers[key], s.slots.positions if s.split == "seq" else None)


def keep_kv_local(outs, graph: Compiled, step, S: int, opts):
    """outputs="local": the KV cache outputs stay on this rank (a ``KVState``) and HuggingFace gets
    stand-ins. ``step`` None: a fresh cache from this call's outputs (each rank's rows or heads, as the
    graph left them; rows past the real length S of a bucketed prompt already cut)."""
    if not graph.caches:
        return outs
    outs = list(outs)
    world, rank = across_groups(graph.ctx.options.tp_size)         # a two-level cache: rows split G ways
    if step is None:
        state = _fresh_state(outs, graph, S, world, rank, opts)
    else:
        state = step.state
        news = {graph.caches[i]: outs[i] for i in graph.caches}
        if state.split == "seq":
            state.append_rows(news, step.positions, step.added)
        else:
            state.buffers.update({key: t.contiguous() for key, t in news.items()})
            state.length += step.new
    for i, key in graph.caches.items():
        gshape = graph.cache_shapes[i]
        outs[i] = state.stand_in(key, [*gshape[:2], state.length, *gshape[3:]])
    _last["layout"] = [_kv_row(r, graph, state) for r in _last.get("layout", graph.layout)]
    return outs


def _fresh_state(outs, graph, S, world, rank, opts) -> KVState:
    """The KV state of a cache this call made: split by heads (TP), or by sequence (each rank's rows)."""
    ctx = graph.ctx
    placements = {ctx.outputs[i][0] for i in graph.caches}
    strategy, tp_size = ctx.options.strategy, ctx.options.tp_size
    p = next(iter(placements))
    if len(placements) != 1 or is_rank_local(p):
        raise InputError(f"the KV cache outputs of this call are placed {sorted(map(str, placements))}; "
                         f"seqpar keeps a cache local only when every layer's is split the same way")
    if is_shard(p) and p.dim == 1:                                   # heads: [B, Hkv/N, S, D], contiguous
        return KVState("heads", world, rank, S, {graph.caches[i]: outs[i].contiguous() for i in graph.caches},
                       strategy=strategy)                            # (the graph compiles for that layout)
    if is_replicate(p):                                              # a short call: cut the rows here
        lay = Layout(S, world)
        spans = [lay.spans(r) for r in range(world)]
        start, n = spans[rank][0]
        tensors = {graph.caches[i]: outs[i][:, :, start:start + n] for i in graph.caches}
    else:                                                            # rows: [B, Hkv(/T), L_r, D]
        lay = ctx.layout(ctx.outputs[next(iter(graph.caches))][1][2])
        spans = [[(a, max(0, min(n, S - a))) for a, n in lay.spans(r)] for r in range(world)]
        tensors = {graph.caches[i]: outs[i] for i in graph.caches}
    capacity = capacity_for(-(-bucket_length(S, world, opts.buckets) // world))
    return KVState.from_rows(world, rank, S, spans, tensors, capacity, strategy=strategy, tp_size=tp_size)


def _kv_row(row, graph, state):
    """output_layout() row of a KV cache output kept local: where this rank's rows or heads are."""
    i = row.get("output")
    if i not in graph.caches:
        return row
    key, model_shape = graph.caches[i], graph.cache_shapes[i]
    local = list(state.local(key).shape)
    out = {**row, "kv": key, "split": state.split, "global_rows": state.length, "local_shape": local,
           "global_shape": [*model_shape[:2], state.length, *model_shape[3:]]}
    if state.tp_size > 1:
        out.update(tp_size=state.tp_size)                             # this rank's KV heads of its group
    if state.split == "seq":
        out.update(dim=2, layout="kv slots", rows=row_spans(state.local_positions()),
                   local_rows=state.slots.counts[state.rank], rows_per_rank=list(state.slots.counts),
                   capacity=state.slots.capacity)
    else:
        out.pop("rows", None)
        out.update(dim=1, layout="kv heads", heads=row["rows"])
    return out


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
        with _joined_on_failure(self.opts, args, self.token, self.fqns):
            self._check_lengths(args, S)
            padded_len = bucket_length(S, across_groups(self.opts.tp_size)[0], self.opts.buckets)  # split G ways
            if self.out_dims is None:
                padded_len = S                                 # outputs not recognised: exact length
            padded = [self._pad(i, a, S, padded_len) for i, a in enumerate(args)]
            graph = self._compiled_for(padded, S, padded_len)
        _check(self.opts, graph.fingerprint, args, self.token, self.fqns)
        outs = graph(*padded, torch.tensor(S))
        layout = [_real_rows(row, dims, S) for row, dims in zip(graph.layout, self.out_dims or [()] * len(outs))]
        _last["layout"] = layout
        if padded_len != S:
            outs = [_cut(o, dims, S, row) for o, dims, row in zip(outs, self.out_dims, layout)]
        if self.opts.outputs == "local":
            outs = keep_kv_local(outs, graph, None, S, self.opts)
        return outs

    def _compiled_for(self, padded, S, padded_len) -> Compiled:
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in padded)
        if key not in self.compiled:
            log.info("seqpar: compiling for prompt length %d (bucket %d)", S, padded_len)
            self.compiled[key] = _compile(self.gm, padded, self.opts, self.fqns, real_len=True)
            if len(self.compiled) > MAX_GRAPHS:
                old, _ = self.compiled.popitem(last=False)
                log.info("seqpar: dropped the graph for input shapes %s (more than %d kept)", old, MAX_GRAPHS)
        self.compiled.move_to_end(key)
        return self.compiled[key]

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
    (``pricing.price_strategies``, which ``seqpar plan`` uses too) and the fastest legal one wins.
    Every rank prices the same ranks' graphs, so all reach the same choice. The machine profile
    comes from $SEQPAR_MACHINE, else the CUDA device name, else this machine's cpu-gloo calibration.
    """
    world, _, group = world_info()
    machine = machine_profile()
    layers = {layer_path(layer_of(n)) for n in captured.graph.nodes if layer_path(layer_of(n))}
    preds = price_strategies(captured, example_inputs, fqns, opts, world, machine, num_layers=len(layers),
                             group=group, real_len=real_len, tp_sizes=two_level_sizes(world, machine))
    best = best_layout(preds, world)
    rows = [[p.layout, "*" if p is best else "", f"{p.total_s * 1e3:.3f}" if p.ok else p.error[:100]] for p in preds]
    text = f"auto on {machine if isinstance(machine, str) else machine.name}, world {world}: chose {best.layout}\n" + \
        tabulate(rows, headers=["layout", "chosen", "predicted ms"]) + "\n"
    dumper.write("auto.txt", text)
    log.info("seqpar: %s", text)
    return dataclasses.replace(opts, strategy=best.strategy, tp_size=best.tp_size)


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


def _compiled_generate(opt, *args, **kwargs):
    """``torch.compile(model, backend="seqpar").generate(...)``: ``generate`` lives on the original module
    and calls ``self(...)``, which the compiled wrapper never sees (pytorch issue 141473), so the prefill
    and every decode step would run uncompiled, silently. Run it with the original module's call
    compiled by the same backend and options, as ``model.compile(...)`` does."""
    model = opt._orig_mod
    saved = model._compiled_call_impl
    model._compiled_call_impl = opt.dynamo_ctx(model._call_impl)
    try:
        return model.generate(*args, **kwargs)
    finally:
        model._compiled_call_impl = saved


def _install_generate_hook():
    """Route ``generate`` of a seqpar-compiled ``OptimizedModule`` through ``_compiled_generate``."""
    from torch._dynamo.eval_frame import OptimizedModule, innermost_backend

    original = OptimizedModule.__getattr__
    if getattr(original, "_seqpar", False):
        return

    def __getattr__(self, name):
        attr = original(self, name)
        if name == "generate" and getattr(innermost_backend(self.dynamo_ctx.callback), "compiler_fn",
                                          None) is seqpar_backend:
            log.info("seqpar: generate() of a torch.compile'd module runs with the module's call compiled")
            return functools.partial(_compiled_generate, self)
        return attr

    __getattr__._seqpar = True
    OptimizedModule.__getattr__ = __getattr__


_install_generate_hook()


def last_report() -> List[dict]:
    """Collectives of the graph this process compiled last: dicts with layer, kind, dim, shape, bytes."""
    return list(_last_report)


def compiled_graphs() -> List[dict]:
    """The graphs this process compiled, oldest first (the last ``MAX_HISTORY``): strategy, batch, tokens
    per call, whether it ran ``short_strategy`` (a decode step), how the KV cache it read was split, and
    its collectives (as ``last_report``), and ``regions``: the pieces its graph was cut into and how many
    of them were lowered (``passes/regions``). A generation compiles a prefill graph and decode graphs."""
    return [dict(h) for h in _history]


def compile_count() -> int:
    """How many graphs seqpar has compiled in this process (one per seqpar pipeline run)."""
    return _compiles[0]


def output_layout() -> List[dict]:
    """Where the outputs of the graph compiled last live on this rank, one dict per output: placement,
    global and local shape, and for a sharded output the global rows this rank holds; for a KV cache kept
    local (outputs="local") its key, split, rows or heads, and ``tp_size`` where a two-level layout splits
    its heads within the group too."""
    return list(_last.get("layout", []))


def last_graph():
    """(transformed local ATen GraphModule, PassContext) of the last compile in this process.
    Nodes carry meta['val'] (local fake tensors) and meta['seqpar_placement']."""
    return _last.get("gm"), _last.get("ctx")


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
