"""``from_pretrained``: a checkpoint directory -> a seqpar-compiled model, each rank reading only its slices.

    config = AutoConfig.from_pretrained(dir)
    with accelerate.init_empty_weights():                 # no weights in memory
        model = AutoModelForCausalLM.from_config(config, dtype=...)
    stand_ins(model)                                      # traceable stand-ins (sp_compiler.checkpoint)
    load_buffers(model, dir)                              # persistent buffers the checkpoint holds
    model.compile(backend="seqpar", options={**options, "checkpoint": dir})

Nothing is read until the first call compiles: then each rank reads its pieces (``passes/annotate``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .checkpoint import load_buffers, stand_ins
from .config import Options

__all__ = ["from_pretrained", "empty_model"]


def empty_model(path: str, dtype: Optional[torch.dtype] = None, device="cpu") -> torch.nn.Module:
    """The model of checkpoint ``path`` with stand-in parameters, in eval mode. ``dtype`` None: the
    checkpoint's own (``config.dtype``, what ``from_pretrained`` picks by default), else float32."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    dtype = dtype or _dtype(getattr(config, "dtype", None)) or torch.float32
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return load_buffers(stand_ins(model, device), path).eval()


def from_pretrained(path: str, dtype: Optional[torch.dtype] = None, device="cpu", **options) -> torch.nn.Module:
    """``empty_model(path)`` compiled with seqpar ``options`` and ``checkpoint=path``: ready for
    ``model(...)`` and ``model.generate(...)`` in every rank, as ``AutoModelForCausalLM.from_pretrained(path)``
    would answer on one device."""
    options = {**options, "checkpoint": path}
    Options.from_dict(options)                          # a bad option fails here, not at the first call
    model = empty_model(path, dtype, device)
    model.compile(backend="seqpar", options=options)
    return model


def _dtype(d):
    if isinstance(d, str):
        return getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None
