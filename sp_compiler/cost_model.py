"""A roofline cost model for one rank's transformed graph: communication + compute per layer.

    collective  t = link_latency_s + bytes * factor(kind, N) / link_bw
                factor: all_reduce 2(N-1)/N; all_gather, reduce_scatter, all_to_all (N-1)/N
                bytes:  the NCCL-tests "size" of the call (what ``ctx.collectives`` rows hold)
    mm / bmm    flops = 2*M*K*N                                  (per batch for bmm)
    grouped mm  flops = 2*M*K*N, each of the M rows through its expert's [K, N] (MoE experts:
                transformers' grouped_mm_fallback, aten._grouped_mm)
    moe_experts flops = 2*M'*(H*2I + I*H), M' the rows this rank's experts run with balanced routing:
                its M own rows (tokens="local": as many arrive as leave) or M*E_rank/E (tokens="all");
                bytes read: this rank's E/N experts (expert parallelism, ``sp_compiler/experts.py``)
    attention   flops = 4*B*H*Sq*Sk*D * causal fraction          (``sdpa.OPS``, arguments read by name)
    other ops   bytes = sum of input and output tensor bytes     (views, waits, getitem: 0)
    every node  t = max(flops / peak_flops, bytes / mem_bw)
    fusion      (default) a connected run of memory-bound ops is one kernel: it reads what
                comes from outside the run and writes what leaves it, t = bytes / mem_bw

Per layer (``layer_of``; nodes the engine inserted inherit the layer of their inputs):
comm + compute, no overlap. A prefill is the truncated graph's layers, plus the last
(steady-state) layer repeated up to the model's real layer count, plus the non-layer parts
(embedding, masks, RoPE tables, final norm, lm_head and its gather).

Numbers are lower bounds: peak FLOP/s and HBM bandwidth, no kernel launch cost, no overlap
of communication with compute. See docs/cost_model.md.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch

from . import sdpa
from .context import layer_of
from .errors import SeqparError

__all__ = [
    "MachineProfile", "PROFILES", "ProfileError", "Prediction", "LayerCost", "RING_FACTORS",
    "get_profile", "cuda_profile_name", "profile_names", "collective_time", "spans_nodes", "node_flops", "node_bytes",
    "node_time", "live_bytes", "peak_activation_bytes",
    "node_layers", "node_kind", "fusion_groups", "is_decoder_layer", "layer_costs", "predict",
    "calibration_path", "load_calibration", "calibrate", "fit_latency_bw", "model_dtype", "dtype_scale",
]

log = logging.getLogger("seqpar")


class ProfileError(SeqparError, ValueError):
    """An unknown machine profile, or a calibration that could not run."""


@dataclass(frozen=True)
class MachineProfile:
    """What one rank's hardware can do.

    link_bw: collective bus bandwidth per GPU in bytes/s (NCCL-tests ``busbw``);
    link_latency_s: fixed cost of one collective call; peak_flops: dense FLOP/s in ``dtype``;
    mem_bw: device memory bandwidth in bytes/s; dtype: the precision the plan builds the model in.
    Several nodes: ``gpus_per_node`` consecutive ranks share a node (``link_*``, NVLink); a collective
    whose ranks span nodes runs at ``node_link_bw`` / ``node_link_latency_s`` (the network). 0: one node.
    """
    name: str
    link_bw: float
    link_latency_s: float
    peak_flops: float
    mem_bw: float
    dtype: str = "bfloat16"
    source: str = ""
    gpus_per_node: int = 0
    node_link_bw: float = 45e9
    node_link_latency_s: float = 30e-6
    memory_bytes: float = 0.0          # device memory (0: unknown); a plan says whether a layout fits it

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# Published numbers (dense bf16, no sparsity) and achievable NCCL busbw; sources in docs/cost_model.md.
PROFILES: Dict[str, MachineProfile] = {
    "h100-nvlink": MachineProfile("h100-nvlink", link_bw=370e9, link_latency_s=15e-6, peak_flops=989e12,
                                  mem_bw=3.35e12, memory_bytes=80e9,
                                  source="H100 SXM5 datasheet; NVLink4 450 GB/s/dir, NCCL-tests busbw ~360-400 GB/s "
                                         "on 8 GPUs"),
    "h200-nvlink": MachineProfile("h200-nvlink", link_bw=370e9, link_latency_s=15e-6, peak_flops=989e12,
                                  mem_bw=4.8e12, memory_bytes=141e9,
                                  source="H200 SXM datasheet (same GH100 compute and NVLink4 as H100, HBM3e 4.8 TB/s)"),
    "a100-nvlink": MachineProfile("a100-nvlink", link_bw=240e9, link_latency_s=15e-6, peak_flops=312e12,
                                  mem_bw=2.0e12, memory_bytes=80e9,
                                  source="A100 SXM4 80GB datasheet; NVLink3 300 GB/s/dir, NCCL-tests busbw ~230-240 "
                                         "GB/s on 8 GPUs"),
}
PROFILES["h100-ib"] = replace(PROFILES["h100-nvlink"], name="h100-ib", gpus_per_node=8,
                              source="nodes of 8 H100 SXM5 on NVLink4, one 400 Gb/s InfiniBand NIC per GPU "
                                     "across nodes: 50 GB/s line rate, NCCL-tests busbw ~45 GB/s, ~30 us")

CPU_PROFILE = "cpu-gloo"

RING_FACTORS = {
    "all_reduce": lambda n: 2.0 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
}


def profile_names() -> List[str]:
    """Every profile name ``get_profile`` accepts."""
    return list(PROFILES) + [CPU_PROFILE]


def cuda_profile_name() -> Optional[str]:
    """The GPU profile closest to this machine's CUDA device (H200, A100, else H100); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    dev = torch.cuda.get_device_name()
    return "h200-nvlink" if "H200" in dev else "a100-nvlink" if "A100" in dev else "h100-nvlink"


def get_profile(machine) -> MachineProfile:
    """A profile by name (or a MachineProfile, returned as is). ``cpu-gloo`` loads, or runs, a calibration."""
    if isinstance(machine, MachineProfile):
        return machine
    if machine in PROFILES:
        return PROFILES[machine]
    if machine == CPU_PROFILE:
        prof = load_calibration()
        if prof is None:
            log.warning("seqpar: no %s calibration at %s; measuring this machine now", CPU_PROFILE,
                        calibration_path())
            prof = calibrate()
        return prof
    raise ProfileError(f"unknown machine profile {machine!r}; choose one of {profile_names()}")


# ----------------------------------------------------------------------------- communication

def collective_time(kind: str, nbytes: float, world: int, machine: MachineProfile,
                    across_nodes: bool = False) -> float:
    """Seconds for one collective of NCCL-tests size ``nbytes`` over ``world`` ranks (ring model), on
    the network where its ranks span nodes (a ring is as fast as its slowest hop)."""
    if kind not in RING_FACTORS:
        raise ProfileError(f"no bandwidth model for collective {kind!r}; known: {sorted(RING_FACTORS)}")
    if world <= 1:
        return 0.0
    latency, bw = ((machine.node_link_latency_s, machine.node_link_bw) if across_nodes
                   else (machine.link_latency_s, machine.link_bw))
    return latency + nbytes * RING_FACTORS[kind](world) / bw


def spans_nodes(row: dict, ctx, machine: MachineProfile) -> bool:
    """Whether the ranks of collective ``row`` sit on more than one node: a tp row of a two-level layout
    runs among T consecutive ranks; every other row among ranks spread over all N (``sp_compiler.mesh``)."""
    per_node = machine.gpus_per_node
    T = ctx.inner.world if ctx.inner is not None else 1
    return bool(per_node) and (T if row.get("mesh") == "tp" else ctx.world * T) > per_node


# ----------------------------------------------------------------------------- compute

_FREE = re.compile(r"^(view|_unsafe_view|reshape|t|transpose|permute|expand|slice|select|unsqueeze|squeeze|"
                   r"alias|detach|split|split_with_sizes|unbind|chunk|as_strided|lift_fresh_copy|"
                   r"wait_tensor|all_gather_into_tensor|reduce_scatter_tensor|all_reduce|all_to_all_single|"
                   r"sym_size|_assert\w*)$")
_GATHER = {"embedding", "index"}


def _op_name(node) -> str:
    """'mm' for aten.mm.default, 'getitem' for operator.getitem."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _tensors(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for a in x for t in _tensors(a)]
    return []


def _arg_vals(node) -> list:
    vals = []
    for a in node.all_input_nodes:
        vals += _tensors(a.meta.get("val"))
    return vals


def _nbytes(t: torch.Tensor, scale: float) -> float:
    n = t.numel() * t.dtype.itemsize
    return n * scale if t.dtype.is_floating_point else n


def _causal_fraction(sq: int, sk: int, zigzag: bool) -> float:
    """Share of the Sq x Sk score matrix a causal kernel computes, on the slowest rank.

    Sq == Sk (heads split, whole sequence): 1/2. Sq < Sk (query rows split): the last
    contiguous chunk sees almost all keys, 1 - Sq/(2 Sk); zigzag chunks balance it to 1/2.
    """
    if sq >= sk or zigzag:
        return 0.5
    return 1.0 - sq / (2.0 * sk)


_MATMUL = ("mm", "bmm", "addmm", "baddbmm")
_GROUPED = ("grouped_mm_fallback", "_grouped_mm")


def node_flops(node, zigzag: bool = False) -> float:
    """Floating-point operations of one call_function node (0 for non-matmul, non-attention ops)."""
    name = _op_name(node)
    if name in _GROUPED:                                   # x [M, K] through per-row experts -> [M, N]
        x, out = node.args[0].meta["val"], node.meta["val"]
        return 2.0 * out.shape[0] * x.shape[-1] * out.shape[-1]
    if name == "moe_experts":                              # x [M, H] -> [M, 2I] -> [M, H] on E/N experts
        x, offs, w_in, w_out = (a.meta["val"] for a in node.args[:4])
        rows = x.shape[0] if node.args[7] == "local" else x.shape[0] * w_in.shape[0] / offs.shape[0]
        return 2.0 * rows * (w_in.shape[1] * w_in.shape[2] + w_out.shape[1] * w_out.shape[2])
    if name in _MATMUL:
        a, b = [n.meta["val"] for n in node.args[-2:]] if name in ("addmm", "baddbmm") else \
            [n.meta["val"] for n in node.args[:2]]
        batch = a.shape[0] if a.dim() == 3 else 1
        return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
    if sdpa.is_attention(node):
        call = sdpa.bind(node)
        q, k = call.q.meta["val"], call.k.meta["val"]
        b, h, sq, d = q.shape[0], q.shape[1], q.shape[-2], q.shape[-1]
        sk = k.shape[-2]
        causal = call.is_causal or call.mask is not None
        frac = _causal_fraction(sq, sk, zigzag) if causal else 1.0
        return 4.0 * b * h * sq * sk * d * frac
    return 0.0


def node_bytes(node, scale: float = 1.0) -> float:
    """Bytes one call_function node reads and writes; 0 for views, waits and collectives.

    ``scale`` multiplies floating-point tensors (model dtype -> machine dtype).
    Gathers (embedding, index) read only the rows they return, not the whole table.
    """
    name = _op_name(node)
    copying_reshape = name == "reshape" and bool(node.args) and not _is_contiguous(node.args[0])
    if node.op != "call_function" or name == "getitem" or (_FREE.match(name) and not copying_reshape):
        return 0.0
    outs = _tensors(node.meta.get("val"))
    out_bytes = sum(_nbytes(t, scale) for t in outs)
    if name in _GATHER:
        idx = [t for t in _arg_vals(node) if not t.dtype.is_floating_point]
        return 2.0 * out_bytes + sum(_nbytes(t, scale) for t in idx)
    return out_bytes + sum(_nbytes(t, scale) for t in _arg_vals(node))


def _is_contiguous(arg) -> bool:
    v = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
    return not isinstance(v, torch.Tensor) or v.is_contiguous()


def node_time(node, machine: MachineProfile, scale: float = 1.0, zigzag: bool = False) -> float:
    """Roofline seconds of one node: max(compute time, memory time)."""
    return max(node_flops(node, zigzag) / machine.peak_flops, node_bytes(node, scale) / machine.mem_bw)


# ----------------------------------------------------------------------------- fusion

_COMM = re.compile(r"^(wait_tensor|all_gather_into_tensor|reduce_scatter_tensor|all_reduce|all_to_all_single)$")


def node_kind(node) -> str:
    """'compute' (matmul, attention), 'gather' (embedding, index), 'comm' (collectives and waits),
    'view' (no data movement), or 'fusible' (pointwise, reductions, copies, cat, ...)."""
    name = _op_name(node)
    if name in _MATMUL + _GROUPED + ("moe_experts",) or sdpa.is_attention(node):
        return "compute"
    if name in _GATHER:
        return "gather"
    if _COMM.match(name):
        return "comm"
    copying_reshape = name == "reshape" and bool(node.args) and not _is_contiguous(node.args[0])
    if name == "getitem" or (_FREE.match(name) and not copying_reshape):
        return "view"
    return "fusible"


def fusion_groups(gm: torch.fx.GraphModule, scale: float = 1.0) -> List[tuple]:
    """[(first fusible node, bytes)]: connected runs of fusible and view nodes, priced as one kernel
    each (as Inductor fuses them): bytes = tensors read from outside the run + tensors it hands out.
    Runs of views only move nothing and are left out."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and node_kind(n) in ("view", "fusible")]
    parent = {n: n for n in nodes}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in nodes:
        for a in n.all_input_nodes:
            if a in parent:
                parent[find(a)] = find(n)
    groups: Dict[torch.fx.Node, list] = {}
    for n in nodes:
        groups.setdefault(find(n), []).append(n)
    out = []
    for members in groups.values():
        fusible = [n for n in members if node_kind(n) == "fusible"]
        if not fusible:
            continue
        inside = set(members)
        reads, writes = {}, {}
        for n in members:
            for a in n.all_input_nodes:
                if a not in inside:
                    src = n if _op_name(n) == "getitem" else a          # one output of a tuple
                    reads[src] = sum(_nbytes(t, scale) for t in _tensors(src.meta.get("val")))
            if any(u not in inside for u in n.users):
                writes[n] = sum(_nbytes(t, scale) for t in _tensors(n.meta.get("val")))
        out.append((fusible[0], sum(reads.values()) + sum(writes.values())))
    return out


# ----------------------------------------------------------------------------- per layer

_DECODER = re.compile(r"\.\d+$")


def is_decoder_layer(layer: str) -> bool:
    """True for 'model.layers.3' / 'transformer.h.0', False for 'lm_head', 'model.norm', ..."""
    return bool(_DECODER.search(layer))


def live_bytes(gm: torch.fx.GraphModule, scale: float = 1.0) -> List[float]:
    """Per node, the bytes of intermediate tensors alive while it runs, the graph run in its node order
    (eager: no buffer reuse, no fusion). Every storage a node makes (once for all its views) lives from
    that node to the last user of any tensor on it; the graph's outputs to the end. Placeholders (weights,
    inputs, a KV cache read) are not counted. Read off ``meta["val"]`` (``check_local_shapes``' local fakes).

        x = mm(a, w)      + [S, I]         alive: x
        y = view(x, ..)   (x's storage)    alive: x
        z = silu(y)       + [S, I]         alive: x, z      -> x freed after its last user
    """
    from torch.multiprocessing.reductions import StorageWeakRef

    nodes = list(gm.graph.nodes)
    storages = {n: [(StorageWeakRef(t.untyped_storage()), t) for t in _tensors(n.meta.get("val"))] for n in nodes}
    inputs, born, size, last = set(), {}, {}, {}
    for i, node in enumerate(nodes):
        for ref, t in storages[node]:
            if node.op == "placeholder":
                inputs.add(ref)
            elif ref not in inputs and ref not in born:
                born[ref] = i
                size[ref] = t.untyped_storage().nbytes() * (scale if t.dtype.is_floating_point else 1.0)
        for src in node.all_input_nodes:
            for ref, _ in storages[src]:
                last[ref] = len(nodes) if node.op == "output" else i
    delta = [0.0] * (len(nodes) + 1)
    for ref, start in born.items():
        delta[start] += size[ref]
        delta[min(max(last.get(ref, start), start) + 1, len(nodes))] -= size[ref]
    live, out = 0.0, []
    for d in delta[:len(nodes)]:
        live += d
        out.append(live)
    return out


def peak_activation_bytes(gm: torch.fx.GraphModule, scale: float = 1.0) -> Tuple[float, float]:
    """(peak of ``live_bytes`` over the whole graph, its peak while a decoder layer runs): the second leaves
    out what only the ends need (the logits, gathered whole under outputs="replicate")."""
    live = live_bytes(gm, scale)
    layer = node_layers(gm)
    in_layers = [b for node, b in zip(gm.graph.nodes, live) if is_decoder_layer(layer.get(node, ""))]
    return max(live, default=0.0), max(in_layers, default=0.0)


def node_layers(gm: torch.fx.GraphModule) -> Dict[torch.fx.Node, str]:
    """Layer of every call_function node. Nodes without a module (inserted collectives and their
    reshapes) take the layer of their first input that has one, else of their first user."""
    out = {}
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    for n in nodes:
        layer = layer_of(n)
        if layer == "<top level>":
            layer = next((out[a] for a in n.all_input_nodes if out.get(a, "<top level>") != "<top level>"),
                         "<top level>")
        out[n] = layer
    for n in reversed(nodes):
        if out[n] == "<top level>":
            out[n] = next((out[u] for u in n.users if out.get(u, "<top level>") != "<top level>"),
                          "<top level>")
    return out


@dataclass
class LayerCost:
    """Cost of one layer (or non-layer module) of one rank's graph."""
    compute_s: float = 0.0
    flops: float = 0.0
    mem_bytes: float = 0.0
    comm_s: float = 0.0
    comm_bytes: float = 0.0
    collectives: Counter = field(default_factory=Counter)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s

    def describe(self) -> str:
        """'2 all_to_all' / '1 all_gather, 1 reduce_scatter' / 'none'."""
        return ", ".join(f"{n} {k}" for k, n in sorted(self.collectives.items())) or "none"


def model_dtype(gm: torch.fx.GraphModule) -> Optional[torch.dtype]:
    """The most common floating dtype of the graph's inputs (the parameters' dtype)."""
    dtypes = Counter(n.meta["val"].dtype for n in gm.graph.nodes
                     if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
                     and n.meta["val"].dtype.is_floating_point)
    return dtypes.most_common(1)[0][0] if dtypes else None


def dtype_scale(gm: torch.fx.GraphModule, machine: MachineProfile) -> float:
    """Machine itemsize / model itemsize: 1.0 when the graph was built in the machine's dtype."""
    dt = model_dtype(gm)
    return machine.torch_dtype.itemsize / dt.itemsize if dt is not None else 1.0


def layer_costs(gm: torch.fx.GraphModule, ctx, machine: MachineProfile, fusion: bool = True
                ) -> Dict[str, LayerCost]:
    """Layer name -> LayerCost for one rank's transformed graph and its pass context.

    ``fusion=True`` prices runs of memory-bound ops as one kernel each (:func:`fusion_groups`);
    ``fusion=False`` prices every op on its own (reads and writes all its tensors).
    """
    scale = dtype_scale(gm, machine)
    zigzag = bool(getattr(ctx.strategy, "zigzag", False))
    layer = node_layers(gm)
    costs: Dict[str, LayerCost] = {}
    for node, name in layer.items():
        if fusion and node_kind(node) in ("view", "fusible"):
            continue
        c = costs.setdefault(name, LayerCost())
        c.flops += node_flops(node, zigzag)
        c.mem_bytes += node_bytes(node, scale)
        c.compute_s += node_time(node, machine, scale, zigzag)
    if fusion:
        for first, nbytes in fusion_groups(gm, scale):
            c = costs.setdefault(layer[first], LayerCost())
            c.mem_bytes += nbytes
            c.compute_s += nbytes / machine.mem_bw
    for row in ctx.collectives:
        c = costs.setdefault(row["layer"], LayerCost())
        nbytes = row["bytes"] * (scale if _is_float_dtype(row.get("dtype")) else 1.0)
        c.comm_bytes += nbytes
        world = ctx.inner.world if row.get("mesh") == "tp" else ctx.world
        c.comm_s += collective_time(row["kind"], nbytes, world, machine, spans_nodes(row, ctx, machine))
        c.collectives[row["kind"]] += 1
    return costs


def _is_float_dtype(name) -> bool:
    dt = getattr(torch, str(name), None)
    return isinstance(dt, torch.dtype) and dt.is_floating_point


# ----------------------------------------------------------------------------- prediction

@dataclass
class Prediction:
    """Predicted prefill of one strategy on one machine; ``error`` says why a strategy cannot run."""
    strategy: str
    machine: str
    world: int
    batch: int
    seq_len: int
    num_layers: int
    rank: int = 0                          # the rank whose graph was priced (the slowest one in plan())
    collectives: str = ""                  # per (steady-state) layer: "2 all_to_all"
    comm_bytes_per_layer: float = 0.0      # NCCL-tests sizes, machine dtype
    comm_s_per_layer: float = 0.0
    compute_s_per_layer: float = 0.0
    other_comm_s: float = 0.0              # embedding, masks, final norm, lm_head, logits gather
    other_compute_s: float = 0.0
    weight_bytes: float = 0.0             # parameters this rank holds (the whole model's on every rank for SP)
    total_s: float = math.inf
    error: Optional[str] = None
    tp_size: int = 1                       # > 1: a two-level layout, tp inside groups of tp_size ranks
    activation_bytes: float = 0.0          # peak of the (truncated) graph's intermediates, run eagerly
    layer_activation_bytes: float = 0.0    # ... while a decoder layer runs (without the logits at the end)
    memory_bytes: float = 0.0              # the machine's device memory (0: unknown)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def fits(self) -> Optional[bool]:
        """Weights and peak activations within the device's memory (None where it is unknown)."""
        return self.weight_bytes + self.activation_bytes <= self.memory_bytes if self.memory_bytes else None

    @property
    def layout(self) -> str:
        """'ulysses', or 'ulysses x tp8' for a two-level layout."""
        return self.strategy if self.tp_size == 1 else f"{self.strategy} x tp{self.tp_size}"

    def as_dict(self) -> dict:
        return asdict(self)


def predict(gm: torch.fx.GraphModule, ctx, machine, num_layers: int, fusion: bool = True) -> Prediction:
    """Prefill time of a model with ``num_layers`` decoder layers from a (possibly truncated) graph.

    total = the graph's own layers + (num_layers - graph layers) x its last layer + non-layer parts.
    """
    machine = get_profile(machine)
    costs = layer_costs(gm, ctx, machine, fusion)
    layers = [name for name in costs if is_decoder_layer(name)]
    if not layers:
        raise ProfileError("the graph has no decoder layers (no node in a module path ending in '.<index>'); "
                           "the cost model needs nn_module_stack metadata on the graph's nodes")
    layers.sort(key=lambda s: int(s.rsplit(".", 1)[1]))
    steady = costs[layers[-1]]
    other = [c for name, c in costs.items() if not is_decoder_layer(name)]
    other_comm = sum(c.comm_s for c in other)
    other_compute = sum(c.compute_s for c in other)
    extra = max(num_layers - len(layers), 0)
    total = sum(costs[name].total_s for name in layers) + extra * steady.total_s + other_comm + other_compute
    T, peak = ctx.options.tp_size, peak_activation_bytes(gm, dtype_scale(gm, machine))
    return Prediction(strategy=ctx.options.strategy, machine=machine.name, world=ctx.world * T, batch=ctx.batch,
                      seq_len=ctx.seq_len, num_layers=num_layers, rank=ctx.rank, collectives=steady.describe(),
                      comm_bytes_per_layer=steady.comm_bytes, comm_s_per_layer=steady.comm_s,
                      compute_s_per_layer=steady.compute_s, other_comm_s=other_comm,
                      other_compute_s=other_compute, weight_bytes=ctx.weight_bytes(num_layers)[0], total_s=total,
                      tp_size=T, activation_bytes=peak[0], layer_activation_bytes=peak[1],
                      memory_bytes=machine.memory_bytes)


# ----------------------------------------------------------------------------- calibration

def calibration_path() -> str:
    """Where the cpu-gloo calibration lives: $SEQPAR_CACHE or ~/.cache/seqpar, file cpu-gloo.json."""
    root = os.environ.get("SEQPAR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "seqpar")
    return os.path.join(root, f"{CPU_PROFILE}.json")


def load_calibration(path: Optional[str] = None) -> Optional[MachineProfile]:
    """The saved cpu-gloo profile, or None when there is none (or it is unreadable)."""
    path = path or calibration_path()
    try:
        with open(path) as f:
            values = json.load(f)
        return MachineProfile(**{k: values[k] for k in MachineProfile.__dataclass_fields__ if k in values})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def fit_latency_bw(samples) -> tuple:
    """Fit t = latency + x / bw over (x = bytes * factor, t seconds) samples -> (latency, bw).

    Weighted least squares on relative error (weights 1/t^2), so the small, latency-bound
    calls count as much as the large, bandwidth-bound ones.
    """
    pts = [(float(x), float(t)) for x, t in samples if t > 0]
    if len(pts) < 2:
        raise ProfileError("need at least two (bytes, seconds) samples to fit latency and bandwidth")
    w = [1.0 / t ** 2 for _, t in pts]
    sw = sum(w)
    mx = sum(wi * x for wi, (x, _) in zip(w, pts)) / sw
    mt = sum(wi * t for wi, (_, t) in zip(w, pts)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, (x, _) in zip(w, pts))
    slope = sum(wi * (x - mx) * (t - mt) for wi, (x, t) in zip(w, pts)) / sxx if sxx else 0.0
    latency = max(mt - slope * mx, 0.0)
    bw = 1.0 / slope if slope > 0 else math.inf
    return latency, bw


def _median_time(fn, iters: int) -> float:
    import time

    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _compute_rates(threads: int = 1) -> dict:
    """This process's fp32 matmul FLOP/s and memory-bound bytes/s (one thread unless told)."""
    torch.set_num_threads(threads)
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    t_mm = _median_time(lambda: torch.mm(a, b), 5)
    x, y = torch.randn(8 << 20), torch.randn(8 << 20)             # 32 MiB each, past the caches
    out = torch.empty_like(x)
    t_add = _median_time(lambda: torch.add(x, y, out=out), 5)
    return {"peak_flops": 2.0 * n ** 3 / t_mm, "mem_bw": 3 * x.numel() * 4 / t_add}


_CAL_SIZES = (1 << 14, 1 << 17, 1 << 20, 1 << 22, 1 << 24)        # bytes per rank buffer


def _calibrate_rank(sizes=_CAL_SIZES) -> Optional[dict]:
    """One calibration rank (gloo is up): time gloo collectives; rank 0 also times compute and returns the
    profile (with the samples) as a dict, the others None."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    samples = []
    for nbytes in sizes:
        numel = nbytes // 4
        full = torch.randn(numel)
        part = torch.empty(numel // world)
        calls = {
            "all_reduce": lambda: dist.all_reduce(full),
            "all_gather": lambda: dist.all_gather_single(full, part),
            "all_to_all": lambda: dist.all_to_all_single(torch.empty_like(full), full),
        }
        reps = 20 if nbytes <= (1 << 20) else 4
        for kind, call in calls.items():
            def loop(call=call):                  # back to back: blocking calls pace each other
                dist.barrier()
                for _ in range(reps):
                    call()
            t = (_median_time(loop, 5) - _median_time(dist.barrier, 5)) / reps
            samples.append({"kind": kind, "bytes": nbytes, "seconds": max(t, 0.0)})
    dist.barrier()
    if rank != 0:
        return None
    latency, bw = fit_latency_bw([(r["bytes"] * RING_FACTORS[r["kind"]](world), r["seconds"]) for r in samples])
    rates = _compute_rates(1)
    prof = MachineProfile(CPU_PROFILE, link_bw=bw, link_latency_s=latency, peak_flops=rates["peak_flops"],
                          mem_bw=rates["mem_bw"], dtype="float32",
                          source=f"seqpar calibrate: {world} gloo ranks on 127.0.0.1, 1 thread each; "
                                 f"fp32 1024^3 matmul; 32 MiB add")
    return {**asdict(prof), "samples": samples}


def calibrate(path: Optional[str] = None, world: int = 2, sizes=_CAL_SIZES) -> MachineProfile:
    """Measure this machine as the ``cpu-gloo`` profile (``world`` gloo processes) and save it to ``path``.

    Times all_reduce, all_gather and all_to_all of ``sizes`` bytes per rank (median of 7, barrier
    cost removed), fits latency + bytes * factor / bw, and times a 1024^3 fp32 matmul and a 32 MiB
    add on one thread (the validation runs use one thread per rank).
    """
    from .testing import RankError, run_ranks

    path = path or calibration_path()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        values = run_ranks(_calibrate_rank, world, tuple(sizes), timeout=1800)[0]
    except RankError as e:
        raise ProfileError(f"calibration over {world} gloo processes failed: {e}. Fix: check that "
                           f"127.0.0.1 works for gloo (GLOO_SOCKET_IFNAME=lo)") from e
    with open(path, "w") as f:
        json.dump(values, f, indent=1)
    prof = load_calibration(path)
    if prof is None:
        raise ProfileError(f"calibration wrote {path} but it cannot be read back")
    return prof
