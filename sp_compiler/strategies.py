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
``whole``: every rank runs all of attention (a call too short to split: ``short_strategy``).
Whatever the strategy, attention whose keys come from a KV cache kept split by sequence
(``outputs="local"``) runs split-KV: each rank attends its own cached rows (``passes/kv_attention``).
``tp``: q/k/v and gate/up sliced by output rows (colwise), o/down by input columns (rowwise), as
named by ``TP_PLAN``; a mixture-of-experts layer's fused experts too (gate_up packed colwise, down
rowwise, as transformers' own tp_plan), and its shared experts as a dense MLP; the embedding and
lm_head by vocabulary wherever attention's weights are sliced.

Two-level layouts (``tp_size`` = T): ``TP_IN_GROUP`` inside each group of T ranks, then ``ulysses``,
``vanilla_sp`` or ``vanilla_sp_zigzag`` across the groups (``sp_compiler.mesh``, ``backend._within_groups``).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional, Tuple

from .placements import Placement, Replicate, Shard

__all__ = ["SEQ_DIM", "Strategy", "STRATEGIES", "TP_IN_GROUP", "short_strategy", "TPRole", "TP_PLAN", "tp_role",
           "param_role",
           "LayerPlan",
           "LAYER_RE", "layer_path"]

SEQ_DIM = 1  # the sequence dim of the residual stream [B, S, H]


@dataclass(frozen=True)
class Strategy:
    name: str
    residual: Placement          # placement of the residual stream [B, S, H]
    attention: str               # "heads" | "rows" | "whole"
    attn_weights: str = "full"   # "full" | "tp"
    mlp_weights: str = "full"    # "full" | "tp"
    zigzag: bool = False         # rows: rank r holds chunks r and 2N-1-r
    vocab_weights: Optional[str] = None   # None: as attn_weights

    def weights(self, block: str) -> str:
        """'tp' where this strategy slices the weights of ``block``: 'attn', 'mlp', or 'vocab' (the
        embedding and lm_head, vocab-parallel wherever attention's weights are sliced, unless
        ``vocab_weights`` says otherwise)."""
        if block == "vocab" and self.vocab_weights is not None:
            return self.vocab_weights
        return self.mlp_weights if block == "mlp" else self.attn_weights

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


#: ``tp`` inside the groups of a two-level layout (``tp_size``): the embedding and lm_head stay whole, so
#: the strategy across the groups sees the token ids and the logits as on one level.
TP_IN_GROUP = replace(STRATEGIES["tp"], vocab_weights="full")


def short_strategy(s: Strategy, outputs: str) -> Strategy:
    """What a layer of strategy ``s`` runs on a call with fewer tokens than sequence chunks (a decode
    step, a prompt of 1 to 2N-1 tokens): no rank may hold an empty shard, so the residual stream stays
    whole on every rank.

        weights sliced (tp, megatron_*) and outputs="local"   tensor parallel: the KV cache stays
                                                               split by heads, as the prefill left it
        otherwise                                              every rank computes the whole call
                                                               (no collective; a cache kept split by
                                                               sequence is read split-KV)
    """
    if outputs == "local" and s.attn_weights == "tp":
        return replace(s, name=f"{s.name}[short]", residual=Replicate(), attention="heads", zigzag=False)
    return replace(s, name=f"{s.name}[short]", residual=Replicate(), attention="whole", attn_weights="full",
                   mlp_weights="full", zigzag=False)


@dataclass(frozen=True)
class TPRole:
    """How tensor parallelism slices one projection.

    ``colwise`` splits the output features (heads), ``rowwise`` the input features; the
    matmul of a rowwise projection yields a Partial sum. ``vocab`` splits the rows of an embedding
    table [V, H] (also read as a tied lm_head): a lookup yields a Partial sum, the logits [.., V/N].
    ``blocks`` > 1 marks a fused projection whose output is [blk_0 | blk_1 | ...] (GPT-2 c_attn =
    [q | k | v], the experts' gate_up = [gate | up]: transformers' ``packed_colwise``): each block is
    split on its own, never the fused dim as a whole.
    """
    style: str    # "colwise" | "rowwise" | "vocab"
    block: str    # "attn" | "mlp" | "vocab": which strategy field decides whether to slice
    blocks: int = 1


# Module-path glob -> role (a parameter's path for HF's fused experts, whose weights are parameters of
# one module). Names follow HuggingFace's own base_model_tp_plan where a model has one.
TP_PLAN = {
    "*.self_attn.q_proj": TPRole("colwise", "attn"),
    "*.self_attn.k_proj": TPRole("colwise", "attn"),
    "*.self_attn.v_proj": TPRole("colwise", "attn"),
    "*.self_attn.o_proj": TPRole("rowwise", "attn"),
    "*.mlp.gate_proj": TPRole("colwise", "mlp"),
    "*.mlp.up_proj": TPRole("colwise", "mlp"),
    "*.mlp.down_proj": TPRole("rowwise", "mlp"),
    # fused [gate | up] of a dense MLP (Phi-3; transformers' packed_colwise)
    "*.mlp.gate_up_proj": TPRole("colwise", "mlp", blocks=2),
    # GPT-2 (Conv1D, weight stored [in, out])
    "*.attn.c_attn": TPRole("colwise", "attn", blocks=3),
    "*.attn.c_proj": TPRole("rowwise", "attn"),
    "*.mlp.c_fc": TPRole("colwise", "mlp"),
    "*.mlp.c_proj": TPRole("rowwise", "mlp"),
    # vocab-parallel embedding and lm_head (Megatron's VocabParallelEmbedding, transformers' embedding_rowwise)
    "*.embed_tokens": TPRole("vocab", "vocab"),
    "*.wte": TPRole("vocab", "vocab"),                                   # GPT-2
    "lm_head": TPRole("vocab", "vocab"),
    # mixture of experts: the fused experts [E, out, in] (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3) ...
    "*.mlp.experts.gate_up_proj": TPRole("colwise", "mlp", blocks=2),
    "*.mlp.experts.up_proj": TPRole("colwise", "mlp"),                 # experts without a gate
    "*.mlp.experts.down_proj": TPRole("rowwise", "mlp"),
    "*.mlp.experts.gate_up_proj_bias": TPRole("colwise", "mlp", blocks=2),   # gpt-oss: [E, 2I], with its weight
    # ... and the shared experts beside them (Qwen2-MoE: one, DeepSeek-V3: n_shared_experts fused in one)
    "*.mlp.shared_expert.gate_proj": TPRole("colwise", "mlp"),
    "*.mlp.shared_expert.up_proj": TPRole("colwise", "mlp"),
    "*.mlp.shared_expert.down_proj": TPRole("rowwise", "mlp"),
    "*.mlp.shared_experts.gate_proj": TPRole("colwise", "mlp"),
    "*.mlp.shared_experts.up_proj": TPRole("colwise", "mlp"),
    "*.mlp.shared_experts.down_proj": TPRole("rowwise", "mlp"),
}


def tp_role(module_fqn: str) -> Optional[TPRole]:
    for pattern, role in TP_PLAN.items():
        if fnmatch.fnmatchcase(module_fqn, pattern):
            return role
    return None


def param_role(fqn: str) -> Optional[TPRole]:
    """The role of parameter ``fqn``: a pattern naming the parameter itself (the fused experts'
    'mlp.experts.gate_up_proj'), or one naming its module, for the module's weight and bias."""
    role = tp_role(fqn)
    if role is not None:
        return role
    module, _, kind = fqn.rpartition(".")
    return tp_role(module) if kind in ("weight", "bias") else None


# 'model.layers.3' from 'model.layers.3.self_attn.q_proj' (also GPT-2's 'transformer.h.3').
LAYER_RE = re.compile(r"^(.*?\b(?:layers|h|blocks|layer)\.\d+)(?:\.|$)")
_RANGE = re.compile(r"^(.*?)(\d+)-(\d+)$")


def layer_path(module_path: str) -> Optional[str]:
    """The decoder layer a module belongs to, or None outside the layer stack."""
    m = LAYER_RE.match(module_path)
    return m.group(1) if m else None


@dataclass(frozen=True)
class LayerPlan:
    """Which strategy each decoder layer uses: ``default`` unless a ``layers`` pattern matches.

    Patterns: exact paths ('model.layers.30'), numeric ranges ('model.layers.0-7', inclusive)
    and globs ('model.layers.*'). The most specific match wins: exact, then the narrowest
    range, then the longest glob.
    """
    default: str
    overrides: Tuple[Tuple[str, str], ...] = field(default_factory=tuple)

    @staticmethod
    def _specificity(pattern: str, path: str):
        if pattern == path:
            return (3, 0)
        m = _RANGE.match(pattern)
        if m and path.startswith(m.group(1)) and path[len(m.group(1)):].isdigit():
            lo, hi, i = int(m.group(2)), int(m.group(3)), int(path[len(m.group(1)):])
            return (2, lo - hi) if lo <= i <= hi else None
        if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(path, pattern):
            return (1, len(pattern))
        return None

    def strategy_name(self, layer: Optional[str]) -> str:
        if layer is None or not self.overrides:
            return self.default
        best = max(((self._specificity(p, layer), name) for p, name in self.overrides
                    if self._specificity(p, layer) is not None), default=None)
        return best[1] if best else self.default

    def check(self, layers: Iterable[str]):
        """Every pattern must match a layer of the model."""
        from .errors import OptionsError

        layers = sorted(set(layers), key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])
        for pattern, _ in self.overrides:
            if not any(self._specificity(pattern, layer) for layer in layers):
                raise OptionsError(f"layers pattern {pattern!r} matches no layer of this model; its layers are "
                                   f"{layers[:4] + ['...'] + layers[-2:] if len(layers) > 8 else layers}")
