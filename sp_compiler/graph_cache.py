"""graph_cache: seqpar's transformed graph kept on disk, so a later process skips capture and the passes.

    miss:  Dynamo's graph -> capture -> passes -> (this rank's graph, PassContext) -> save
    hit:   load -> (the same graph, a PassContext rebuilt: this rank's weight slices cut again)
    then, either way: lower (Inductor's FX graph and AOTAutograd caches take the lowering)

A warm start repeats Dynamo's trace (torch.compile's own cost) and the lowering's cache lookups; seqpar's
capture and passes are what this takes away (a 32-layer Llama: seqpar's part of the warm start fell from
9.5 to 4.1 s, README "First call").

The key is a sha256 of everything the transformation reads:

    Dynamo's graph     its code, each node's module path and type, its constants' values
    the inputs         shapes, strides, dtypes, devices, which are parameters (their names)
    the call           the options, world size, rank, process group name and backend, short call or
                       not, a bucket (the real length an input) or not
    seqpar             its sources (``sp_compiler``, ``passes``), their module constants (``MIN_MASK``...),
                       the pipeline's passes
    the rest           torch's, transformers' and Python's versions

Cached: a graph compiled at static sizes (a first prompt length, or a bucket of lengths) that reads no
KV cache, on real weights, with one level of layout. Compiled as before: decode steps and follow-up
prefills (they read a KV cache), ``tp_size`` > 1, ``checkpoint``, ``expert_parallel`` (its lifted gates
live in a registry), ``dump_dir`` (a dump shows every pass, so it runs them) and ``strategy="auto"``
(it prices the captured graph first). A graph whose passes changed the inputs in a way this module does
not redo is not saved (logged at debug level).

The value is the graph (``torch.fx._graph_pickler.GraphPickler``: nodes with their local fake values,
module paths, placements), what the passes left in ``PassContext`` (collectives, slices, layouts), the
KV-cache outputs, and the warnings the passes logged, which a hit logs again.

Where: ``<Inductor's cache dir>/seqpar/`` (``TORCHINDUCTOR_CACHE_DIR``), one file per graph and rank, never
evicted, read with pickle: the trust Inductor's own caches ask of that directory. Off with
``SEQPAR_GRAPH_CACHE=0``, or with Inductor's caches (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import sys
import tempfile
from typing import Iterator, List, Optional

import torch

from .context import PassContext
from .strategies import STRATEGIES

__all__ = ["enabled", "cache_dir", "graph_key", "tensor_digest", "save", "load", "recorded", "hits", "META_KEYS",
           "CTX_FIELDS"]

log = logging.getLogger("seqpar")

#: node.meta kept with the graph: what lowering, dumps and ``last_graph()`` read after the passes
META_KEYS = ("val", "nn_module_stack", "stack_trace", "seqpar_placement", "seqpar_inserted")
#: PassContext fields the passes leave for what runs after them (the rest is rebuilt or pass-time only)
CTX_FIELDS = ("batch", "seq_len", "sliced", "widen", "collectives", "attention_work", "outputs", "whole_outputs",
              "real_len", "short", "extra_inputs", "one_in_flight", "token_blocks", "sliced_blocks", "reads_cache")
_VERSION = 1
_hits = [0]


def enabled() -> bool:
    """On unless ``SEQPAR_GRAPH_CACHE=0`` or Inductor's caches are forced off (``force_disable_caches``)."""
    from torch._inductor import config

    return os.environ.get("SEQPAR_GRAPH_CACHE", "1") != "0" and not config.force_disable_caches


def cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_dir

    return os.path.join(inductor_dir(), "seqpar")


def hits() -> int:
    """Graphs this process took from the cache."""
    return _hits[0]


# ----------------------------------------------------------------------------- the key

@functools.lru_cache(maxsize=None)
def _sources() -> str:
    """sha256 of seqpar's own sources: any edit makes every earlier entry unreachable."""
    h = hashlib.sha256()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for package in ("sp_compiler", "passes"):
        folder = os.path.join(root, package)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()


def _constants() -> List[tuple]:
    """Module constants of seqpar (``MIN_MASK``, block sizes): a test or a user may have changed one."""
    out = []
    for name, mod in sorted(sys.modules.items()):
        if mod is not None and name.split(".")[0] in ("sp_compiler", "passes"):
            out += [(name, k, v) for k, v in sorted(vars(mod).items())
                    if k.isupper() and isinstance(v, (bool, int, float, str))]
    return out


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"T{x.dtype}{tuple(x.shape)}{x.stride()}{x.device}{x.requires_grad}{type(x).__name__}"
    return f"{type(x).__name__}:{x!r}"


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's values (its bytes, in order): equal for equal values of one dtype and shape."""
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _constant_digest(t) -> str:
    if isinstance(t, torch.Tensor):
        if t.numel() * t.element_size() > 1 << 20 or t.device.type == "meta":
            return _describe(t)
        return f"{_describe(t)}:{tensor_digest(t)}"
    return repr(t)


def graph_key(gm: torch.fx.GraphModule, example_inputs, fqns, opts, world: int, rank: int, group_name,
              backend: str, short: bool, real_len: bool, pipeline: List[str]) -> str:
    """The cache key of compiling Dynamo's ``gm`` on these inputs with these options on this rank."""
    h = hashlib.sha256()
    for part in (_VERSION, torch.__version__, _transformers_version(), sys.version, _sources(), _constants(),
                 pipeline, repr(opts), world, rank, group_name, backend, short, real_len, list(fqns),
                 [_describe(x) for x in example_inputs], gm.code):
        h.update(repr(part).encode() + b"\0")
    for n in gm.graph.nodes:                                     # module paths: roles and layers come from them
        stack = n.meta.get("nn_module_stack") or {}
        h.update(repr([(path, getattr(t, "__qualname__", t)) for path, t in stack.values()]).encode())
        if n.op == "get_attr":
            h.update(_constant_digest(getattr(gm, n.target, None)).encode())
    return h.hexdigest()


def _transformers_version() -> str:
    mod = sys.modules.get("transformers")
    return getattr(mod, "__version__", "") if mod is not None else ""


def cacheable(example_inputs, opts, reads_cache: bool, symbolic: bool) -> Optional[str]:
    """None where this compile may use the cache, else why not."""
    if not enabled():
        return "off"
    for why, bad in (("symbolic sizes", symbolic), ("reads a KV cache", reads_cache),
                     ("tp_size", opts.tp_size != 1), ("checkpoint", opts.checkpoint is not None),
                     ("expert_parallel", opts.expert_parallel), ("dump_dir", opts.dump_dir is not None),
                     ("strategy auto", opts.strategy == "auto")):
        if bad:
            return why
    from torch._subclasses.fake_tensor import FakeTensor
    if any(isinstance(x, FakeTensor) or (isinstance(x, torch.Tensor) and x.device.type == "meta")
           for x in example_inputs):
        return "fake or meta inputs"
    return None


# ----------------------------------------------------------------------------- save / load

def _path(key: str) -> str:
    return os.path.join(cache_dir(), key[:2], key + ".pt")


def _not_redone(ctx: PassContext) -> Optional[str]:
    """Why a hit could not rebuild this context from CTX_FIELDS and the appended inputs, or None."""
    if ctx.pending or ctx.kv or ctx.inner is not None or ctx.fakes is not None or ctx.strategies is not STRATEGIES:
        return "pass state this cache does not keep"
    n = len(ctx.full_inputs)
    replaced = [i for i, (x, y) in enumerate(zip(ctx.example_inputs, ctx.full_inputs)) if x is not y]
    if len(ctx.example_inputs) < n or set(replaced) - set(ctx.widen):
        return "a pass replaced an input"
    if any(not isinstance(x, torch.Tensor) or x.numel() > 64 for x in ctx.example_inputs[n:]):
        return "a pass appended an input this cache does not keep"
    if set(ctx.local_inputs) != set(ctx.sliced):
        return "an input made local otherwise than by slicing"
    return None


def save(key: str, gm: torch.fx.GraphModule, ctx: PassContext, caches: dict, records: List[tuple]) -> None:
    """Write the entry (atomically: a file renamed into place). Nothing is written where the passes left
    state a hit could not rebuild; a failure to write is logged, never raised."""
    from torch.fx._graph_pickler import GraphPickler, Options

    why = _not_redone(ctx)
    if why is not None:
        log.debug("seqpar: graph not cached: %s", why)
        return
    try:
        graph = GraphPickler.dumps(gm, Options(ops_filter=None, node_metadata_key_filter=META_KEYS.__contains__))
        n = len(ctx.full_inputs)                          # inputs passes appended: a bucket's prompt length
        appended = list(zip(ctx.example_inputs[n:], ctx.input_fqns[n:]))
        state = pickle.dumps({"ctx": {f: getattr(ctx, f) for f in CTX_FIELDS}, "appended": appended,
                              "caches": caches, "records": records})
        path = _path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
            pickle.dump((graph, state), f)
        os.replace(f.name, path)
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written is only slower
        log.debug("seqpar: graph not cached: %s: %s", type(e).__name__, e)


def load(key: str, opts, world: int, rank: int, group_name, example_inputs, fqns) -> Optional[tuple]:
    """(graph, PassContext, caches) saved under ``key``, or None. The context gets this call's inputs:
    weights widened and sliced again as the passes did (``PassContext.piece``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler

    path = _path(key)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            graph, state = pickle.load(f)
        gm = GraphPickler.loads(graph, FakeTensorMode(allow_non_fake_inputs=True))
        gm.recompile()                                     # its forward: the code of the graph
        state = pickle.loads(state)
    except Exception as e:  # noqa: BLE001 - an unreadable entry is a miss
        log.warning("seqpar: ignoring the unreadable cache entry %s (%s: %s)", path, type(e).__name__, e)
        return None
    ctx = PassContext(opts, world, rank, group_name, list(example_inputs), list(fqns), **state["ctx"])
    for i, widen in ctx.widen.items():
        ctx.example_inputs[i] = widen(ctx.example_inputs[i])
    for x, fqn in state["appended"]:
        ctx.example_inputs.append(x)
        ctx.input_fqns.append(fqn)
    with torch.no_grad():
        ctx.local_inputs = {i: ctx.piece(i, ctx.full_inputs[i]) for i in ctx.sliced}
    for level, msg in state["records"]:
        log.log(level, "%s", msg)
    _hits[0] += 1
    log.info("seqpar: the transformed graph from %s (capture and passes skipped)", path)
    return gm, ctx, state["caches"]


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: List[tuple] = []

    def emit(self, record):
        self.records.append((record.levelno, record.getMessage()))


@contextlib.contextmanager
def recorded() -> Iterator[List[tuple]]:
    """The seqpar warnings logged inside the block, as (level, message): a hit logs them again."""
    handler = _Recorder()
    log.addHandler(handler)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
