"""What every pass sees: the options, the world, the strategy, and what passes leave for later ones."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .config import Options
from .errors import ShapeConstraintError, module_path
from .placements import Layout, Replicate, is_shard, local_shape, make_shard, shard_tensor, split_factor
from .strategies import STRATEGIES, Strategy, layer_path, short_strategy

__all__ = ["PLACEMENT", "INSERTED", "Demand", "PassContext", "block_of", "layer_of"]

log = logging.getLogger("seqpar")

PLACEMENT = "seqpar_placement"     # node.meta key: the node's placement
INSERTED = "seqpar_inserted"       # node.meta key: node added by the insert pass (already local)


def block_of(node, blocks) -> Optional[str]:
    """The module path in ``blocks`` that ``node`` (a call) lies under, or None."""
    if not blocks or node.op != "call_function":
        return None
    path = module_path(node)
    return next((b for b in blocks if path == b or path.startswith(b + ".")), None)


def layer_of(node) -> str:
    """'model.layers.3' for a node inside a decoder layer, else its top-level module (or 'output')."""
    if node.op == "output":
        return "output"
    path = module_path(node)
    return layer_path(path) or path


@dataclass
class Demand:
    user: torch.fx.Node           # the node that wants ...
    src: torch.fx.Node            # ... this input ...
    want: object                  # ... with this placement
    group: Optional[torch.fx.Node] = None   # collectives sharing a group may be packed into one


@dataclass
class PassContext:
    options: Options
    world: int
    rank: int
    group_name: Optional[str]
    example_inputs: list                          # what Dynamo passes, in placeholder order
    input_fqns: List[Optional[str]]               # 'model.layers.0.mlp.up_proj.weight', None for user inputs
    batch: int = 1
    seq_len: int = 0
    local_inputs: Dict[int, torch.Tensor] = field(default_factory=dict)   # pre-sliced weights
    sliced: Dict[int, object] = field(default_factory=dict)               # their placements
    widen: Dict[int, Callable] = field(default_factory=dict)               # full weight -> the one sliced
    pending: Dict[tuple, Demand] = field(default_factory=dict)            # (user, src) -> Demand
    collectives: List[dict] = field(default_factory=list)                 # one row per inserted collective
    attention_work: Optional[dict] = None                                 # rows attention: work per rank
    outputs: List[tuple] = field(default_factory=list)                    # per graph output: (placement, global shape)
    whole_outputs: frozenset = frozenset()        # outputs returned whole even with outputs="local" (MLA's latent cache)
    latent_region: Dict[object, object] = field(default_factory=dict)    # MLA: node -> its attention (passes/latent)
    real_len: bool = False                                                # bucketed: the graph takes the prompt length
    short: bool = False                                                   # fewer tokens than chunks: short_strategy
    fakes: Optional[list] = None                  # per placeholder: its (symbolic) fake value, for symbolic graphs
    kv: Dict[int, object] = field(default_factory=dict)                   # placeholder -> KV cache stand-in info
    extra_inputs: List[str] = field(default_factory=list)                 # inputs passes appended (by name)
    one_in_flight: bool = False                   # gloo: wait each collective before the next (passes/one_in_flight)
    token_blocks: frozenset = frozenset()         # mixture-of-experts blocks run token-local, set by propagate
    sliced_blocks: frozenset = frozenset()        # ... and those whose experts a TP layout slices
    reads_cache: bool = False                     # a decode step or follow-up prefill: the graph reads a KV cache
    regions: dict = field(default_factory=dict)   # set by lower: graph pieces, how many lowered (passes/regions)
    strategies: Dict[str, Strategy] = field(default_factory=lambda: STRATEGIES)   # what the options' names mean
    inner: Optional["PassContext"] = None         # two-level layouts: the tp-in-group pipeline this one follows
    in_group: bool = False                        # ... and that pipeline's own context (collectives.all_gather)

    def __post_init__(self):
        self.full_inputs = list(self.example_inputs)          # as Dynamo passed them, before any pass

    @property
    def strategy(self) -> Strategy:
        """The default strategy (outside the layer stack, and for the global sequence layout)."""
        return self._variant(self.strategies[self.options.strategy])

    def _variant(self, s: Strategy) -> Strategy:
        return short_strategy(s, self.options.outputs) if self.short else s

    def strategy_for(self, node) -> Strategy:
        """The strategy of the decoder layer ``node`` belongs to."""
        return self.strategy_at(layer_path(module_path(node)))

    @property
    def zigzag(self) -> bool:
        """The sequence layout is global: zig-zag if any layer runs vanilla_sp_zigzag (never on a short call)."""
        return not self.short and any(self.strategies[n].zigzag
                                      for n in (self.options.strategy, *dict(self.options.layers).values()))

    def layout(self, size: int) -> Layout:
        """How a sharded dim of global ``size`` is cut over the ranks. Zig-zag applies to the
        sequence only: a dim of another size (heads of a 'tp' layer) is cut in rank order."""
        return Layout(size, self.world, self.zigzag and size == self.seq_len)

    def local_shape(self, shape, p) -> tuple:
        """This rank's shape of a tensor of global ``shape`` placed ``p``."""
        if not is_shard(p):
            return tuple(shape)
        sf = split_factor(p)
        return local_shape(shape, p, self.world, self.rank, self.zigzag and shape[p.dim] // sf == self.seq_len)

    def slices(self, i: int) -> bool:
        """Whether this rank holds a slice of input ``i`` (in either step of a two-level layout)."""
        return i in self.sliced or (self.inner is not None and self.inner.slices(i))

    def piece(self, i: int, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of input ``i``, cut from the whole tensor ``full`` (a two-level layout: the
        tp-in-group slice, cut again across the groups where that step slices it too)."""
        if self.inner is not None:
            full = self.inner.piece(i, full)
        if i not in self.sliced:
            return full
        return shard_tensor(self.widen.get(i, lambda w: w)(full), self.sliced[i], self.world, self.rank)

    def strategy_at(self, layer: Optional[str]) -> Strategy:
        return self._variant(self.strategies[self.options.plan.strategy_name(layer)])

    def in_token_block(self, node) -> bool:
        """Whether ``node`` belongs to a mixture-of-experts block run on each rank's own tokens
        (``rules.token_local_rule``)."""
        return block_of(node, self.token_blocks) is not None

    def local_rows(self) -> int:
        """How many rows of the sequence this rank holds."""
        return self.layout(self.seq_len).local_size(self.rank)

    def rows_placement(self, node):
        """Placement of a [B*S, K] (or [B, S, K]) activation sharded on the sequence like the residual."""
        shape = tuple(node.meta["val"].shape)
        if not self.strategy_for(node).seq_sharded:
            return Replicate()
        if shape[0] == self.batch * self.seq_len:
            return make_shard(0, self.batch)
        if len(shape) >= 2 and shape[1] == self.seq_len:
            return make_shard(1)
        return Replicate()

    def weight_bytes(self, num_layers: Optional[int] = None) -> Tuple[int, int]:
        """(bytes of parameters and buffers this rank holds, bytes of the whole model's), read from the
        inputs' pieces (sliced, read from a checkpoint, or whole). ``num_layers``: a graph traced on fewer
        decoder layers (``seqpar plan``) is extrapolated from its last one."""
        per_layer: Dict[str, List[int]] = {}
        for i, (fqn, full) in enumerate(zip(self.input_fqns, self.full_inputs)):
            if fqn is None or not isinstance(full, torch.Tensor) or i in self.kv:
                continue
            mine = self.local_inputs.get(i, full)
            row = per_layer.setdefault(layer_path(fqn) or "", [0, 0])
            row[0] += mine.numel() * mine.element_size()
            row[1] += full.numel() * full.element_size()
        layers = sorted((k for k in per_layer if k), key=lambda k: int(k.rsplit(".", 1)[1]))
        extra = max((num_layers or 0) - len(layers), 0)
        last = per_layer[layers[-1]] if layers else [0, 0]
        return tuple(sum(r[j] for r in per_layer.values()) + extra * last[j] for j in (0, 1))

    def check_divisible(self, node, size: int, what: str, hint: str):
        """Head counts must split evenly (a sequence length need not: ``placements.Layout``)."""
        if size % self.world:
            raise ShapeConstraintError(
                f"{what} ({size}) is not divisible by the world size ({self.world}) at node '{node.name}' "
                f"in module '{module_path(node)}'. Fix: {hint}")
