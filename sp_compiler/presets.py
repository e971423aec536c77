"""Published model configurations, built offline (nothing is downloaded).

    PRESETS["llama-3-8b"]()          -> LlamaConfig with Meta-Llama-3-8B's config.json values
    load_config("llama-3-70b")       -> a preset by name
    load_config("bench-125m")        -> the small Llama ``seqpar bench`` times on CPU
    load_config("path/config.json")  -> any HuggingFace config.json (its ``model_type`` picks the class)

Every config comes back with ``attn_implementation="sdpa"``, the attention path the
seqpar engine understands. Values follow the models' published ``config.json`` files;
only the fields that change shapes (and so collectives and FLOPs) matter to the planner.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict

from .errors import SeqparError

__all__ = ["PRESETS", "PresetError", "load_config", "preset_names"]


class PresetError(SeqparError, ValueError):
    """An unknown preset name or an unreadable config.json; the message lists what is valid."""


def _llama(**values):
    from transformers import LlamaConfig

    return LlamaConfig(attn_implementation="sdpa", **values)


def llama_3_8b():
    """Meta-Llama-3-8B: 32 layers, hidden 4096, 32 heads / 8 KV heads (GQA), vocab 128256."""
    return _llama(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                  max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  bos_token_id=128000, eos_token_id=128001)


def llama_3_70b():
    """Meta-Llama-3-70B: 80 layers, hidden 8192, 64 heads / 8 KV heads, vocab 128256."""
    return _llama(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                  intermediate_size=28672, vocab_size=128256, rope_theta=500000.0,
                  max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  bos_token_id=128000, eos_token_id=128001)


def mistral_7b():
    """Mistral-7B (v0.2 values): 32 layers, hidden 4096, 32 heads / 8 KV heads, vocab 32000, no sliding window."""
    from transformers import MistralConfig

    return MistralConfig(attn_implementation="sdpa", hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                         vocab_size=32000, sliding_window=None, rope_theta=1000000.0,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False)


def qwen2_7b():
    """Qwen2-7B: 28 layers, hidden 3584, 28 heads / 4 KV heads, vocab 152064 (q/k/v carry a bias)."""
    from transformers import Qwen2Config

    return Qwen2Config(attn_implementation="sdpa", hidden_size=3584, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                       vocab_size=152064, rope_theta=1000000.0, max_position_embeddings=131072,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                       bos_token_id=151643, eos_token_id=151643)


def bench_125m():
    """A Llama-shaped ~125M model for ``seqpar bench``: 12 layers, hidden 768, 12 heads / 4 KV heads (GQA),
    MLP 2048, vocab 32000 (random weights; no published checkpoint)."""
    return _llama(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, vocab_size=32000, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)


def gpt2():
    """GPT-2 (124M): 12 layers, hidden 768, 12 heads, MLP 3072, vocab 50257, 1024 learned positions."""
    from transformers import GPT2Config

    return GPT2Config(attn_implementation="sdpa", n_embd=768, n_layer=12, n_head=12, n_inner=3072,
                      vocab_size=50257, n_positions=1024, n_ctx=1024,
                      bos_token_id=50256, eos_token_id=50256)


def mixtral_8x7b():
    """Mixtral-8x7B: 32 layers, hidden 4096, 32 heads / 8 KV heads, 8 experts of MLP 14336, 2 per token."""
    from transformers import MixtralConfig

    return MixtralConfig(attn_implementation="sdpa", hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                         num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, sliding_window=None,
                         rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-5,
                         tie_word_embeddings=False)


def qwen3_30b_a3b():
    """Qwen3-30B-A3B: 48 layers, hidden 2048, 32 heads / 4 KV heads of 128, 128 experts of MLP 768, 8 per token."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(attn_implementation="sdpa", hidden_size=2048, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, vocab_size=151936,
                          rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6,
                          tie_word_embeddings=False)


def deepseek_v3():
    """DeepSeek-V3 (671B): 61 layers (3 dense), hidden 7168, 128 heads of MLA (latent 512, rope 64), 256
    routed experts of MLP 2048 (8 per token, 8 groups, 4 kept) and one shared expert."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(attn_implementation="sdpa", hidden_size=7168, num_hidden_layers=61,
                            num_attention_heads=128, num_key_value_heads=128, intermediate_size=18432,
                            moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
                            num_experts_per_tok=8, first_k_dense_replace=3, n_group=8, topk_group=4,
                            kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
                            v_head_dim=128, vocab_size=129280, rope_theta=10000.0,
                            max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False)


PRESETS: Dict[str, Callable] = {
    "llama-3-8b": llama_3_8b,
    "llama-3-70b": llama_3_70b,
    "mistral-7b": mistral_7b,
    "qwen2-7b": qwen2_7b,
    "gpt2": gpt2,
    "bench-125m": bench_125m,
    "mixtral-8x7b": mixtral_8x7b,
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "deepseek-v3": deepseek_v3,
}


def preset_names() -> list:
    """The preset names, in table order."""
    return list(PRESETS)


def load_config(name_or_path: str):
    """A transformers config from a preset name or a HuggingFace ``config.json`` path (sdpa attention)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if not os.path.exists(name_or_path):
        raise PresetError(f"{name_or_path!r} is neither a preset nor an existing file; "
                          f"presets: {preset_names()}, or pass the path of a HuggingFace config.json")
    path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
    return config_from_json(path)


def config_from_json(path: str):
    """Build the config class named by the file's ``model_type`` from a config.json, offline."""
    from transformers import AutoConfig

    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PresetError(f"cannot read {path!r} as a config.json: {e}") from e
    if not isinstance(values, dict) or "model_type" not in values:
        raise PresetError(f"{path!r} has no 'model_type' key; a HuggingFace config.json names its model "
                          f"type (e.g. \"model_type\": \"llama\")")
    values = dict(values)
    model_type = values.pop("model_type")
    for key in ("attn_implementation", "_attn_implementation", "architectures", "transformers_version"):
        values.pop(key, None)
    try:
        config = AutoConfig.for_model(model_type, attn_implementation="sdpa", **values)
    except ValueError as e:
        raise PresetError(f"{path!r}: transformers does not know model_type {model_type!r}: {e}") from e
    return config
