"""Small helpers shared by the seqpar test files (not tests themselves).

The gloo launcher, fake process groups and the error unwrapper are in ``sp_compiler.testing``
(the examples and the calibration use them too)."""

from __future__ import annotations

import os

import torch

__all__ = ["FULL", "cached_run", "compile_logits", "fake_model", "full_or", "layer_names", "model_dims",
           "padded_mask", "world_cases"]

#: ``pytest --full`` (or SEQPAR_FULL=1): every gloo matrix in full. Without it each gloo file runs
#: CI's cut, chosen so the suite stays under 15 minutes on 2 cores: every strategy still runs, on
#: fewer families, worlds and call forms; what is cut is listed beside each matrix.
FULL = os.environ.get("SEQPAR_FULL") == "1"


def full_or(ci, full):
    """``full`` under ``--full``, else ``ci``: one matrix, two sizes."""
    return full if FULL else ci


_runs: dict = {}


def cached_run(key, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` once per ``key`` for the test session; a failure is cached and
    re-raised by every test that asks, so a broken group of ranks costs one run, not one per test.
    A rank that crashes fails every test of its group: no rerun."""
    if key not in _runs:
        try:
            _runs[key] = ("ok", fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - re-raised below
            _runs[key] = ("error", e)
    status, value = _runs[key]
    if status == "error":
        raise value
    return value


_fake_models: dict = {}


def fake_model(family: str, **config_args):
    """A weightless ``family`` model (``plan.build_fake_model`` of ``models.build_config(family,
    **config_args)``), built once per arguments for the session. Dynamo's traces are kept on it, so
    every strategy, world and rank that ``plan.transform`` runs on it shares one trace per input case."""
    from models import build_config
    from sp_compiler.plan import build_fake_model

    key = (family, tuple(sorted(config_args.items())))
    if key not in _fake_models:
        config = build_config(family, **config_args)
        _fake_models[key] = build_fake_model(config, layers=config.num_hidden_layers)
    return _fake_models[key]


def world_cases(cases: dict) -> dict:
    """``{world: [case tuple]}`` -> parametrize arguments for ("world,case"): one test per case, ids
    such as ``w2-llama-tp-default``."""
    pairs = [(w, c) for w, cs in cases.items() for c in cs]
    return dict(argnames="world,case", argvalues=pairs,
                ids=[f"w{w}-" + "-".join(map(str, c)) for w, c in pairs])


def compile_logits(model, input_ids, options: dict, **call_kwargs) -> torch.Tensor:
    """Compile ``model`` with the seqpar backend and return the logits of one prefill call."""
    fast = torch.compile(model, backend="seqpar", options=options)
    with torch.no_grad():
        return fast(input_ids, use_cache=False, **call_kwargs).logits


def layer_names(family: str, layers: int) -> list:
    """Module paths of the decoder layers, as the collective report names them."""
    prefix = "transformer.h" if family == "gpt2" else "model.layers"
    return [f"{prefix}.{i}" for i in range(layers)]


def model_dims(family: str, heads: int, kv_heads: int, hidden: int) -> dict:
    """H, Hkv and head_dim from the builder's arguments (GPT-2 is multi-head: Hkv = H)."""
    hkv = heads if family == "gpt2" else kv_heads
    return {"H": heads, "Hkv": hkv, "head_dim": hidden // heads}


def padded_mask(batch: int, S: int) -> torch.Tensor:
    """A left-padded batch's attention_mask: row b starts with 3*b pad tokens."""
    mask = torch.ones(batch, S, dtype=torch.long)
    for b in range(batch):
        mask[b, : 3 * b] = 0
    return mask
