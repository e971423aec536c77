"""Strategies as data.

A strategy never names a collective. It says, per transformer layer, where the residual
stream lives, how attention is split and whether weights are sliced; the collectives fall
out of placement mismatches during propagation (see ``sp_compiler/rules.py``):

    strategy         residual   attention   attn weights  mlp weights  per layer
    tp               R          heads       tp            tp           2 all_reduce
    megatron_sp      S(seq)     heads       tp            tp           2 AG + 2 RS
    megatron_sp_tp   S(seq)     heads       tp            full         1 AG + 1 RS
    ulysses          S(seq)     heads       full          full         2 all_to_all
    vanilla_sp       S(seq)     rows        full          full         1 all_gather (K|V)

``heads``: every rank runs attention over the whole sequence for H/N heads.
``rows``: every rank keeps its own query rows and sees all keys.
``tp``: q/k/v and gate/up sliced by output rows (colwise), o/down by input columns (rowwise),
as named by ``TP_PLAN``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Optional

from .placements import Placement, Replicate, Shard

__all__ = ["SEQ_DIM", "Strategy", "STRATEGIES", "IMPLEMENTED", "TPRole", "TP_PLAN", "tp_role"]

SEQ_DIM = 1  # the sequence dim of the residual stream [B, S, H]


@dataclass(frozen=True)
class Strategy:
    name: str
    residual: Placement          # placement of the residual stream [B, S, H]
    attention: str               # "heads" | "rows"
    attn_weights: str = "full"   # "full" | "tp"
    mlp_weights: str = "full"    # "full" | "tp"
    zigzag: bool = False         # rows: rank r holds chunks r and 2N-1-r

    def weights(self, block: str) -> str:
        return self.attn_weights if block == "attn" else self.mlp_weights

    @property
    def seq_sharded(self) -> bool:
        return isinstance(self.residual, Shard)


STRATEGIES = {
    s.name: s
    for s in (
        Strategy("tp", Replicate(), "heads", attn_weights="tp", mlp_weights="tp"),
        Strategy("megatron_sp", Shard(SEQ_DIM), "heads", attn_weights="tp", mlp_weights="tp"),
        Strategy("megatron_sp_tp", Shard(SEQ_DIM), "heads", attn_weights="tp"),
        Strategy("ulysses", Shard(SEQ_DIM), "heads"),
        Strategy("vanilla_sp", Shard(SEQ_DIM), "rows"),
        Strategy("vanilla_sp_zigzag", Shard(SEQ_DIM), "rows", zigzag=True),
    )
}

# What this build can compile; the rest are accepted names that raise a clear error.
IMPLEMENTED = ("tp", "ulysses", "megatron_sp", "megatron_sp_tp", "vanilla_sp", "vanilla_sp_zigzag")


@dataclass(frozen=True)
class TPRole:
    """How tensor parallelism slices one projection.

    ``colwise`` splits the output features (heads), ``rowwise`` the input features; the
    matmul of a rowwise projection yields a Partial sum. ``blocks`` > 1 marks a fused
    projection whose output is [blk_0 | blk_1 | ...] (GPT-2 c_attn = [q | k | v]): each
    block is split on its own, never the fused dim as a whole.
    """
    style: str    # "colwise" | "rowwise"
    block: str    # "attn" | "mlp": which strategy field decides whether to slice
    blocks: int = 1


# Module-path glob -> role. Names follow HuggingFace's own base_model_tp_plan where a model has one.
TP_PLAN = {
    "*.self_attn.q_proj": TPRole("colwise", "attn"),
    "*.self_attn.k_proj": TPRole("colwise", "attn"),
    "*.self_attn.v_proj": TPRole("colwise", "attn"),
    "*.self_attn.o_proj": TPRole("rowwise", "attn"),
    "*.mlp.gate_proj": TPRole("colwise", "mlp"),
    "*.mlp.up_proj": TPRole("colwise", "mlp"),
    "*.mlp.down_proj": TPRole("rowwise", "mlp"),
    # GPT-2 (Conv1D, weight stored [in, out])
    "*.attn.c_attn": TPRole("colwise", "attn", blocks=3),
    "*.attn.c_proj": TPRole("rowwise", "attn"),
    "*.mlp.c_fc": TPRole("colwise", "mlp"),
    "*.mlp.c_proj": TPRole("rowwise", "mlp"),
}


def tp_role(module_fqn: str) -> Optional[TPRole]:
    for pattern, role in TP_PLAN.items():
        if fnmatch.fnmatchcase(module_fqn, pattern):
            return role
    return None
