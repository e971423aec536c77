"""Tiny real HuggingFace causal-LM models with random weights, for tests.

Every builder is deterministic (``torch.manual_seed``), returns an fp32 model in
eval mode that uses ``attn_implementation="sdpa"``, and downloads nothing.

Families:

* ``llama``   - ``LlamaForCausalLM``, grouped-query attention (``kv_heads < heads``)
* ``mistral`` - ``MistralForCausalLM``, GQA (sliding window off unless overridden)
* ``qwen2``   - ``Qwen2ForCausalLM``, GQA, q/k/v projections carry a bias
* ``gpt2``    - ``GPT2LMHeadModel``, multi-head attention (``kv_heads`` ignored)

``MORE_FAMILIES``: other dense HF families from their config classes; ``MOE_FAMILIES``: mixtures of
experts (Mixtral, Qwen3-MoE, Qwen2-MoE with a shared expert, OLMoE, DeepSeek-V3 with MLA attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "FAMILIES",
    "MORE_FAMILIES",
    "MOE_FAMILIES",
    "MAX_POSITIONS",
    "build_config",
    "build_model",
    "make_inputs",
    "packed_position_ids",
]

#: Model families the tests parametrise over.
FAMILIES = ("llama", "mistral", "qwen2", "gpt2")

#: Other HuggingFace causal-LM families built from their config class (Llama-style arguments):
#: q/k RMSNorm (qwen3), scaled embeddings and GeGLU (gemma), fused qkv and gate_up (phi3),
#: interleaved rotary with stack (cohere), LayerNorm and partial rotary (stablelm, phi).
MORE_FAMILIES = {"qwen3": "Qwen3Config", "gemma": "GemmaConfig", "phi3": "Phi3Config", "cohere": "CohereConfig",
                 "stablelm": "StableLmConfig", "phi": "PhiConfig", "olmo2": "Olmo2Config",
                 "starcoder2": "Starcoder2Config"}

#: Mixture-of-experts families: config class and the arguments that make a tiny MoE of 4 experts, 2 per
#: token (Qwen2-MoE adds a shared expert; DeepSeek-V3 has MLA attention and a dense first layer).
MOE_FAMILIES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=96, decoder_sparse_step=1,
                                         mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2)),
    # as the real one: as many KV heads as query heads, values narrower than keys (q/k 8 + 8, v 8)
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                             n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                                             kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)),
    # MLA with complex (view_as_complex) RoPE, greedy routing
    "deepseek_v2": ("DeepseekV2Config", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                             n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32,
                                             q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                             num_key_value_heads=4)),
    # linear attention (a causal conv and a gated delta-rule recurrence) in layer 0, full attention in layer 1
    "qwen3_next": ("Qwen3NextConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                           shared_expert_intermediate_size=64, linear_num_value_heads=4,
                                           linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                                           decoder_sparse_step=1, mlp_only_layers=[], full_attention_interval=2)),
    # attention sinks (eager attention only: transformers refuses SDPA for it), sliding and full layers,
    # experts with biases and an interleaved gate/up
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
                                     sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                     attn_implementation="eager")),
}

#: Maximum sequence length every tiny model supports.
MAX_POSITIONS = 1024


def build_config(
    family: str,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 64,
    vocab: int = 128,
    **overrides: Any,
):
    """Return the ``transformers`` config for a tiny model of ``family``.

    ``overrides`` are passed to the config constructor last, so a test can set
    e.g. ``sliding_window=16`` for mistral or ``tie_word_embeddings=True``.
    """
    import transformers

    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    common: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": torch.float32}

    if family == "gpt2":
        kwargs = dict(
            vocab_size=vocab,
            n_positions=MAX_POSITIONS,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            # n_inner=None -> GPT-2's own default of 4 * hidden
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
        )
        kwargs.update(common)
        kwargs.update(overrides)
        return transformers.GPT2Config(**kwargs)

    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not divisible by kv_heads={kv_heads}")
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
    )
    if family == "llama":
        cls = transformers.LlamaConfig
    elif family == "mistral":
        cls = transformers.MistralConfig
        kwargs["sliding_window"] = None
    elif family == "qwen2":
        cls = transformers.Qwen2Config
        kwargs["bos_token_id"] = 1
        kwargs["eos_token_id"] = 2
    elif family in MORE_FAMILIES:
        cls = getattr(transformers, MORE_FAMILIES[family])
        kwargs.update(head_dim=hidden // heads, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif family in MOE_FAMILIES:
        name, moe = MOE_FAMILIES[family]
        cls = getattr(transformers, name)
        kwargs.update(moe, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        common.update({k: moe[k] for k in ("attn_implementation",) if k in moe})
        if not family.startswith("deepseek"):
            kwargs["head_dim"] = hidden // heads
    else:
        raise ValueError(f"unknown model family {family!r}; known: {_KNOWN}")
    kwargs.update(common)
    kwargs.update(overrides)
    return cls(**kwargs)


_KNOWN = FAMILIES + tuple(MORE_FAMILIES) + tuple(MOE_FAMILIES)


def build_model(family: str, *, seed: int = 0, **config_args: Any) -> nn.Module:
    """Build a tiny ``family`` causal LM with random weights (fp32, eval mode, SDPA unless the config asks
    for another attention: gpt-oss, or ``attn_implementation="eager"``).

    ``config_args`` go to :func:`build_config` (``layers``, ``heads``, ``kv_heads``, ``hidden``,
    ``vocab`` and any config override). The same arguments always give bit-identical weights,
    in any process.
    """
    import transformers

    config = build_config(family, **config_args)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    if family == "gpt_oss":       # HF zeroes the experts' biases and draws small sinks: larger ones, so that
        with torch.no_grad():     # where (and whether) each is added shows in the logits
            for name, p in model.named_parameters():
                if name.endswith(("_bias", "sinks")):
                    p.normal_(0.0, 0.5)
    want = config_args.get("attn_implementation", MOE_FAMILIES.get(family, ("", {}))[1].get("attn_implementation", "sdpa"))
    if model.config._attn_implementation != want:  # pragma: no cover - guard against HF changes
        raise RuntimeError(f"{family}: expected {want} attention, got {model.config._attn_implementation!r}")
    return model


def make_inputs(family: str, batch: int, seq: int, seed: int = 1, *, vocab: int = 128) -> torch.Tensor:
    """Deterministic random ``input_ids`` of shape ``[batch, seq]`` (``torch.long``).

    ``family`` is checked and kept for symmetry with :func:`build_model`; all
    families share the token range ``[0, vocab)``.
    """
    if family not in _KNOWN:
        raise ValueError(f"unknown model family {family!r}; known: {_KNOWN}")
    if seq > MAX_POSITIONS:
        raise ValueError(f"seq={seq} exceeds the tiny models' {MAX_POSITIONS} positions")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen, dtype=torch.long)


def packed_position_ids(
    batch: int, doc_lengths: Sequence[int] | Sequence[Sequence[int]]
) -> torch.Tensor:
    """Position ids for packed sequences: they restart at 0 at every document start.

    ``doc_lengths`` is either one list of document lengths used for every row,
    or one list per row (all rows must sum to the same length). Returns a
    ``[batch, total]`` ``torch.long`` tensor, e.g. ``doc_lengths=[3, 2]`` gives
    ``[[0, 1, 2, 0, 1]] * batch``.
    """
    if len(doc_lengths) and isinstance(doc_lengths[0], (int,)):
        per_row = [list(doc_lengths)] * batch  # type: ignore[list-item]
    else:
        per_row = [list(r) for r in doc_lengths]  # type: ignore[union-attr]
        if len(per_row) != batch:
            raise ValueError(f"got {len(per_row)} rows of doc_lengths for batch={batch}")
    totals = {sum(r) for r in per_row}
    if len(totals) != 1:
        raise ValueError(f"rows have different total lengths: {sorted(totals)}")
    if any(n <= 0 for r in per_row for n in r):
        raise ValueError("document lengths must be positive")
    rows = [torch.cat([torch.arange(n, dtype=torch.long) for n in r]) for r in per_row]
    return torch.stack(rows)
