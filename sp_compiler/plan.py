"""Planning without hardware: run the real seqpar pipeline on a weightless model, then price it.

    transform(cfg, strategy="ulysses", world=8, seq_len=4096)   -> (local ATen graph, PassContext)
    plan(cfg, world=8, seq_len=4096, machine="h100-nvlink")     -> [Prediction per strategy]
    choose(cfg, 8, 4096, 1, "h100-nvlink")                      -> ("ulysses", {name: Prediction})
    dump(cfg, "ulysses", 8, 0, 4096, "out/")                    -> graph + collectives files

The model is built under a ``FakeTensorMode`` (parameters have shapes and dtypes, no storage;
a 70B preset costs a few hundred MB of RSS), truncated to ``layers`` decoder layers, and run
through the seqpar backend (``lower="eager"``) as rank ``rank`` of a fake process group of
``world`` ranks, on fake ``input_ids``: nothing is computed. Dynamo traces the model once per
(batch, seq_len); each strategy then calls the backend on that graph, exactly what
``torch.compile(model, backend="seqpar")`` would hand it (``transform(..., compile=True)`` takes
the full torch.compile path; a test checks both give the same graph).
(A ``meta``-device model would also carry no weights, but SDPA on ``meta`` decomposes into its
math ops, so the graph would not be the one a CPU or GPU rank compiles.)
"""
from __future__ import annotations

import contextlib
import copy
import os
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .cost_model import Prediction, get_profile, predict
from .errors import PlanError
from .pricing import best_of, price_strategies, ranks_to_price, strategy_names, two_level_sizes
from .strategies import STRATEGIES
from .testing import fake_process_group, seqpar_error

__all__ = ["PlanError", "FakeModel", "build_fake_model", "as_rank", "transform", "plan", "choose", "price_strategies",
           "best_of", "dump", "dynamo_graph", "ranks_to_price", "find_crossover"]


@dataclass
class FakeModel:
    """A weightless causal LM: its modules hold FakeTensors of ``mode``."""
    model: torch.nn.Module
    mode: object
    config: object
    layers: int
    dtype: torch.dtype
    traces: dict = field(default_factory=dict)     # (batch, seq_len, call) -> (Dynamo graph, example inputs)


def _truncated(config, layers: int):
    """A copy of ``config`` with ``layers`` decoder layers (per-layer lists cut to match; DeepSeek's dense
    first layers cut so that the last layer, the one the planner repeats, is a mixture-of-experts one)."""
    cfg = copy.deepcopy(config)
    n = min(layers, config.num_hidden_layers)
    cfg.num_hidden_layers = n
    if getattr(cfg, "first_k_dense_replace", 0) >= n > 1:
        cfg.first_k_dense_replace = n - 1
    for key in ("layer_types", "sliding_window_pattern"):
        value = getattr(cfg, key, None)
        if isinstance(value, list) and len(value) > n:
            setattr(cfg, key, value[:n])
    if cfg._attn_implementation is None:                         # what loading the model would choose
        cfg._attn_implementation = "sdpa" if _supports_sdpa(cfg) else "eager"   # gpt-oss: eager (its sinks)
    return cfg


def _supports_sdpa(config) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return getattr(cls, "_supports_sdpa", True) is not False


def build_fake_model(config, *, layers: int = 2, dtype: torch.dtype = torch.float32) -> FakeModel:
    """``AutoModelForCausalLM.from_config`` under a FakeTensorMode: shapes only, no weight storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    if layers < 1:
        raise PlanError(f"layers={layers}: the planner needs at least one decoder layer to price")
    cfg = _truncated(config, layers)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    except Exception as e:  # noqa: BLE001 - rethrown typed
        raise PlanError(f"cannot build {type(config).__name__} without weights: {type(e).__name__}: {e}") from e
    return FakeModel(model, mode, config, cfg.num_hidden_layers, dtype)


@contextlib.contextmanager
def as_rank(world: int, rank: int):
    """Be rank ``rank`` of ``world`` for the duration: a fake process group, created and destroyed
    here when none exists; an existing group is used as is when its world and rank match."""
    if not 0 <= rank < world:
        raise PlanError(f"rank {rank} is not in a world of {world} ranks (0..{world - 1})")
    if not dist.is_initialized():
        with fake_process_group(world, rank):
            yield
        return
    have = (dist.get_world_size(), dist.get_rank())
    if have != (world, rank):
        raise PlanError(f"a process group of {have[0]} ranks (this is rank {have[1]}) is already initialised; "
                        f"planning for world={world} rank={rank} needs a process without one, or "
                        f"world={have[0]} rank={have[1]}")
    yield


def _check_seq_len(config, seq_len: int, batch: int):
    if seq_len < 1 or batch < 1:
        raise PlanError(f"seq_len={seq_len} and batch={batch} must be positive")
    learned = getattr(config, "model_type", "") == "gpt2"          # a position table, not RoPE
    limit = getattr(config, "n_positions", None) if learned else None
    if limit is not None and seq_len > limit:
        raise PlanError(f"seq_len={seq_len} exceeds {type(config).__name__}'s {limit} learned positions; "
                        f"use seq_len <= {limit}")


def _trace_key(value):
    """A call argument as the trace sees it: a tensor by shape and dtype (Dynamo's static graph does
    not read its values), anything else by value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    return value


def dynamo_graph(fm: FakeModel, batch: int, seq_len: int, call: Optional[Mapping] = None):
    """(Dynamo FX graph, example inputs) of one forward on ``[batch, seq_len]`` input_ids, traced once
    per shape and call and kept on ``fm``: the graph does not depend on the strategy or the world size.

    ``call``: keyword arguments of the forward (default ``use_cache=False``, all logits), e.g.
    ``{"logits_to_keep": 1, "use_cache": True}`` for a generation's prefill.
    """
    kwargs = {"use_cache": False, **dict(call or {})}
    key = (batch, seq_len, tuple(sorted((k, _trace_key(v)) for k, v in kwargs.items())))
    if key not in fm.traces:
        captured = {}

        def record(gm, example_inputs):
            # Dynamo drops placeholders' 'grapharg' (their parameter names) once the backend
            # returns; keep them so every later backend call sees what a compiling backend sees.
            keep = {n: n.meta["grapharg"] for n in gm.graph.nodes if "grapharg" in n.meta}
            captured.update(gm=gm, inputs=list(example_inputs), meta=keep)
            return gm.forward

        torch._dynamo.reset()
        try:
            compiled = torch.compile(fm.model, backend=record, fullgraph=True, dynamic=False)
            with torch.no_grad(), fm.mode:
                compiled(torch.zeros(batch, seq_len, dtype=torch.long), **kwargs)
        except Exception as e:  # noqa: BLE001 - rethrown typed
            raise PlanError(f"Dynamo cannot trace {type(fm.config).__name__} as one graph: "
                            f"{type(e).__name__}: {' '.join(str(e).split())[:500]}") from e
        finally:
            torch._dynamo.reset()
        fm.traces[key] = (captured["gm"], captured["inputs"], captured["meta"])
    gm, inputs, meta = fm.traces[key]
    for node, grapharg in meta.items():
        node.meta["grapharg"] = grapharg
    return gm, inputs


def _compile_seqpar(fm: FakeModel, options: Mapping, batch: int, seq_len: int, call: Mapping) -> None:
    """The product path: torch.compile(backend="seqpar") and one forward."""
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fm.model, backend="seqpar", fullgraph=True, dynamic=False, options=dict(options))
        with torch.no_grad(), fm.mode:
            compiled(torch.zeros(batch, seq_len, dtype=torch.long), **{"use_cache": False, **call})
    finally:
        torch._dynamo.reset()


def transform(config, *, strategy: str, world: int, rank: int = 0, batch: int = 1, seq_len: int,
              layers: int = 2, dtype: torch.dtype = torch.float32, model: Optional[FakeModel] = None,
              compile: bool = False, call: Optional[Mapping] = None, options: Optional[Mapping] = None):
    """(gm, ctx): the transformed local ATen graph of rank ``rank`` and its PassContext.

    The model has ``layers`` decoder layers (scale per-layer numbers by ``config.num_hidden_layers``);
    pass ``model`` (from :func:`build_fake_model`) to reuse one build across strategies.
    By default Dynamo traces the model once per (batch, seq_len) and the seqpar backend is called
    on that graph for each strategy (the graph Dynamo hands a backend does not depend on it);
    ``compile=True`` runs ``torch.compile(backend="seqpar")`` end to end instead.
    ``call``: the forward's keyword arguments (as :func:`dynamo_graph`; tensors such as an attention
    mask count by shape); ``options``: seqpar options beside ``strategy`` (``lower`` is ``"eager"``
    unless given).
    Raises the engine's SeqparError when the strategy cannot run this model on ``world`` ranks.
    """
    from . import backend

    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    _check_seq_len(config, seq_len, batch)
    fm = model or build_fake_model(config, layers=layers, dtype=dtype)
    opts = {"lower": "eager", **dict(options or {}), "strategy": strategy}
    try:
        with as_rank(world, rank):
            if compile:
                _compile_seqpar(fm, opts, batch, seq_len, dict(call or {}))
            else:
                dgm, inputs = dynamo_graph(fm, batch, seq_len, call)
                with torch.no_grad():
                    backend.seqpar_backend(dgm, inputs, options=opts)
            gm, ctx = backend.last_graph()
    except Exception as e:
        cause = seqpar_error(e)
        if cause is None or cause is e:
            raise
        raise cause from e                                       # the engine's own typed error
    if gm is None or ctx.options.strategy != strategy or ctx.world * ctx.options.tp_size != world \
            or ctx.seq_len != seq_len:
        raise PlanError(f"the seqpar backend did not report a graph for strategy={strategy!r} world={world} "
                        f"seq_len={seq_len} (sp_compiler.backend.last_graph() is stale)")
    return gm, ctx


def plan(config, *, world: int, seq_len: int, batch: int = 1, machine="h100-nvlink",
         strategies: Optional[Sequence[str]] = None, layers: int = 2, fusion: bool = True,
         call: Optional[Mapping] = None, outputs: str = "replicate",
         expert_parallel: bool = False, gpus_per_node: Optional[int] = None) -> List[Prediction]:
    """One Prediction per strategy (its slowest rank), in ``STRATEGIES`` order; illegal ones carry
    ``error`` (the engine's reason). Dynamo traces the weightless model once and seqpar captures it
    once; every strategy's pipeline then runs on a copy (``price_strategies``).

    The model is built in the machine's dtype (bf16 for GPU profiles, fp32 for cpu-gloo), so the
    collective bytes are that dtype's. ``call`` prices another forward than ``model(ids, use_cache=False)``
    (e.g. ``{"logits_to_keep": 1, "use_cache": True}``; see :func:`dynamo_graph`); ``outputs`` is the
    backend option of that name (``"local"``: each rank keeps its rows of the outputs, e.g. the KV cache),
    and so is ``expert_parallel`` (each rank holds E/N of a mixture of experts' experts).
    ``gpus_per_node`` (else the profile's): a world of several nodes, whose collectives across nodes run
    on the profile's network link; two-level layouts (``tp_size``: tp inside a node) are priced too.
    """
    from passes import capture_graph

    from .backend import input_fqns
    from .config import Options

    machine = get_profile(machine)
    if gpus_per_node is not None:
        machine = dataclasses.replace(machine, gpus_per_node=gpus_per_node)
    names = strategy_names(strategies)
    _check_seq_len(config, seq_len, batch)
    fm = build_fake_model(config, layers=layers, dtype=machine.torch_dtype)
    with as_rank(world, 0):
        dgm, inputs = dynamo_graph(fm, batch, seq_len, call)
        fqns = input_fqns(dgm)
        with torch.no_grad():
            captured = capture_graph(dgm, inputs)
            options = Options.from_dict({"lower": "eager", "outputs": outputs, "expert_parallel": expert_parallel})
            return price_strategies(captured, inputs, fqns, options, world, machine,
                                    num_layers=config.num_hidden_layers, strategies=names,
                                    group=dist.group.WORLD.group_name, fusion=fusion,
                                    tp_sizes=two_level_sizes(world, machine))


def choose(config, world: int, seq_len: int, batch: int = 1, machine="h100-nvlink",
           strategies: Optional[Sequence[str]] = None, fusion: bool = True
           ) -> Tuple[str, Dict[str, Prediction]]:
    """(fastest legal strategy, {strategy: Prediction}); ties go to the earlier strategy in STRATEGIES."""
    preds = plan(config, world=world, seq_len=seq_len, batch=batch, machine=machine, strategies=strategies,
                 fusion=fusion)
    try:
        return best_of(preds, world), {p.strategy: p for p in preds}
    except PlanError as e:
        raise PlanError(f"{e} (seq_len={seq_len})") from None


def find_crossover(config, world: int, machine="h100-nvlink", *, lo: int = 256, hi: int = 16384,
                   step: int = 64, batch: int = 1) -> Tuple[int, str, str]:
    """Smallest multiple of ``step`` in (lo, hi] where choose() stops picking the strategy it picks at
    ``lo``, by bisection (assumes one switch in between). Returns (seq_len, choice at lo, choice there)."""
    if lo % step or hi % step:
        raise PlanError(f"lo={lo} and hi={hi} must be multiples of step={step}")
    first, _ = choose(config, world, lo, batch, machine)
    last, _ = choose(config, world, hi, batch, machine)
    if last == first:
        raise PlanError(f"choose() picks {first!r} at both seq_len={lo} and {hi}; no crossover in between")
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        pick, _ = choose(config, world, mid, batch, machine)
        lo, hi, last = (mid, hi, last) if pick == first else (lo, mid, pick)
    return hi, first, last


def dump(config, strategy: str, world: int, rank: int, seq_len: int, out_dir: str, batch: int = 1,
         layers: int = 2, machine="h100-nvlink") -> List[str]:
    """Write rank ``rank``'s transformed graph, its collectives and its predicted cost into ``out_dir``.

    Files: graph.txt (format_graph), collectives.txt (collective_table + layer_summary),
    collectives.json, cost.txt (the Prediction), memory.txt (the largest intermediates). Returns their paths.
    """
    import json

    from .dump import collective_table, format_graph, layer_summary, memory_table

    machine = get_profile(machine)
    gm, ctx = transform(config, strategy=strategy, world=world, rank=rank, batch=batch, seq_len=seq_len,
                        layers=layers, dtype=machine.torch_dtype)
    pred = predict(gm, ctx, machine, config.num_hidden_layers)
    os.makedirs(out_dir, exist_ok=True)
    header = (f"model={type(config).__name__} strategy={strategy} world={world} rank={rank} batch={batch} "
              f"seq_len={seq_len} dtype={machine.dtype} decoder layers traced={min(layers, config.num_hidden_layers)}"
              f" of {config.num_hidden_layers}\n\n")
    files = {
        "graph.txt": header + format_graph(gm),
        "collectives.txt": header + collective_table(ctx.collectives) + "\nper layer:\n"
        + layer_summary(ctx.collectives),
        "collectives.json": json.dumps(ctx.collectives, indent=1, default=str),
        "cost.txt": header + "\n".join(f"{k}: {v}" for k, v in pred.as_dict().items()) + "\n",
        "memory.txt": header + memory_table(gm),
    }
    paths = []
    for name, text in files.items():
        path = os.path.join(out_dir, name)
        with open(path, "w") as f:
            f.write(text)
        paths.append(path)
    return paths
