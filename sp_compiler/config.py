"""The ``options`` dict of ``torch.compile(..., backend="seqpar", options=...)``, validated."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

from .errors import OptionsError
from .strategies import STRATEGIES, LayerPlan

__all__ = ["Options", "STRATEGY_NAMES", "LOWERINGS", "OUTPUTS", "BUCKET_MODES", "REGIONAL", "ACROSS_GROUPS"]

STRATEGY_NAMES = tuple(STRATEGIES) + ("auto",)
LOWERINGS = ("inductor", "aot_eager", "eager")
OUTPUTS = ("replicate", "local")
BUCKET_MODES = ("auto", "exact")
REGIONAL = ("prefill", "all", "none")
#: the strategies that split the sequence across the groups of a two-level layout (``tp_size`` > 1)
ACROSS_GROUPS = ("ulysses", "vanilla_sp", "vanilla_sp_zigzag")


@dataclass(frozen=True)
class Options:
    strategy: str = "ulysses"
    layers: Mapping[str, str] = field(default_factory=dict)
    dump_dir: Optional[str] = None
    lower: str = "inductor"
    outputs: str = "replicate"          # every rank returns whole outputs | each its own shard
    buckets: object = "auto"            # lengths per compile, when Dynamo hands a symbolic graph
    check_ranks: bool = True            # one small all_gather per call: ranks that disagree raise (agree.py)
    checkpoint: Optional[str] = None    # safetensors directory: parameters are stand-ins, read per rank (checkpoint.py)
    expert_parallel: bool = False       # each rank holds E/N of every MoE layer's experts (experts.py)
    regional: str = "prefill"           # which graphs lower once per distinct decoder layer (passes/regions.py)
    tp_size: int = 1                    # > 1: groups of tp_size ranks run tp inside, the strategy across (mesh.py)

    @classmethod
    def from_dict(cls, options: Optional[Mapping]) -> "Options":
        options = dict(options or {})
        valid = [f for f in cls.__dataclass_fields__]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise OptionsError(f"unknown seqpar option(s) {unknown}; valid options are {valid}")
        opts = cls(**options)
        opts._check_strategy(opts.strategy, "strategy")
        for pattern, name in dict(opts.layers).items():
            opts._check_strategy(name, f"layers[{pattern!r}]")
        if opts.lower not in LOWERINGS:
            raise OptionsError(f"lower={opts.lower!r} is not valid; choose one of {list(LOWERINGS)}")
        if opts.outputs not in OUTPUTS:
            raise OptionsError(f"outputs={opts.outputs!r} is not valid; choose one of {list(OUTPUTS)}")
        if not (opts.buckets in BUCKET_MODES or (isinstance(opts.buckets, (list, tuple)) and opts.buckets
                                                 and all(isinstance(b, int) and b > 0 for b in opts.buckets))):
            raise OptionsError(f"buckets={opts.buckets!r} is not valid; choose one of {list(BUCKET_MODES)} or give "
                               f"a list of positive prompt lengths, e.g. [1024, 2048, 4096]")
        if not isinstance(opts.expert_parallel, bool):
            raise OptionsError(f"expert_parallel={opts.expert_parallel!r} is not valid; choose False (default) or True")
        if opts.regional not in REGIONAL:
            raise OptionsError(f"regional={opts.regional!r} is not valid; choose one of {list(REGIONAL)}: which "
                               f"graphs are lowered once per distinct decoder layer (prefill: those that read no "
                               f"KV cache; decode steps are lowered whole)")
        if not isinstance(opts.check_ranks, bool):
            raise OptionsError(f"check_ranks={opts.check_ranks!r} is not valid; choose True (default) or False")
        if opts.checkpoint is not None and not (isinstance(opts.checkpoint, (str, os.PathLike))
                                                and os.path.isdir(opts.checkpoint)):
            raise OptionsError(f"checkpoint={opts.checkpoint!r} is not a directory; give the directory "
                               f"model.save_pretrained(dir) wrote (model.safetensors, or shards and their index)")
        if not isinstance(opts.layers, Mapping):
            raise OptionsError(f"layers must be a dict of module-path pattern -> strategy, got {opts.layers!r}")
        if "auto" in dict(opts.layers).values():
            raise OptionsError("'auto' applies to the whole model: use strategy='auto', not in layers")
        names = {opts.strategy, *dict(opts.layers).values()}
        opts._check_tp_size(names)
        if "vanilla_sp_zigzag" in names and names & {"ulysses", "megatron_sp", "megatron_sp_tp", "vanilla_sp"}:
            raise OptionsError("vanilla_sp_zigzag permutes the sequence for the whole model; it mixes only with "
                               "'tp', not with other sequence-sharded strategies")
        return opts

    @property
    def plan(self) -> LayerPlan:
        return LayerPlan(self.strategy, tuple(dict(self.layers).items()))

    def _check_tp_size(self, names):
        """A two-level layout: tp inside groups of tp_size ranks, a sequence layout across them."""
        if not (isinstance(self.tp_size, int) and not isinstance(self.tp_size, bool) and self.tp_size >= 1):
            raise OptionsError(f"tp_size={self.tp_size!r} is not valid; give a positive int: the ranks of a group "
                               f"(1, the default: one level)")
        if self.tp_size == 1:
            return
        if "auto" in names:
            raise OptionsError(f"strategy='auto' chooses tp_size itself (two-level layouts on a machine profile "
                               f"of several nodes); drop tp_size={self.tp_size}, or name the strategy across "
                               f"groups: one of {list(ACROSS_GROUPS)}")
        if names - set(ACROSS_GROUPS):
            raise OptionsError(f"tp_size={self.tp_size} runs tp inside each group and splits the sequence across "
                               f"groups with one of {list(ACROSS_GROUPS)}; {sorted(names - set(ACROSS_GROUPS))} "
                               f"cannot run across groups. Fix: choose one of those, or tp_size=1")

    @staticmethod
    def _check_strategy(name, where):
        if name not in STRATEGY_NAMES:
            raise OptionsError(f"{where}={name!r} is not a strategy; choose one of {list(STRATEGY_NAMES)}")
