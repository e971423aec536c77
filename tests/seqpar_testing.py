"""Small helpers shared by the seqpar test files (not tests themselves)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["cached_run", "init_fake_pg", "fake_process_group", "seqpar_error", "error_text", "compile_logits",
           "layer_names", "model_dims"]


_runs: dict = {}


def cached_run(key, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` once per ``key`` for the test session; a failure is cached and
    re-raised by every test that asks, so a broken group of ranks costs one run, not one per test."""
    if key not in _runs:
        try:
            _runs[key] = ("ok", fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - re-raised below
            _runs[key] = ("error", e)
    status, value = _runs[key]
    if status == "error":
        raise value
    return value


def init_fake_pg(world: int, rank: int = 0) -> None:
    """A fake process group: collectives are no-ops, so outputs are garbage, but the world size
    and rank the backend sees are real, and so is every graph transformation."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


@contextlib.contextmanager
def fake_process_group(world: int, rank: int = 0):
    init_fake_pg(world, rank)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def seqpar_error(exc: BaseException) -> Optional[BaseException]:
    """The seqpar error inside whatever Dynamo wrapped it in (``BackendCompilerFailed``):
    looks through ``inner_exception``, ``__cause__`` and ``__context__``; None if there is none."""
    from sp_compiler.errors import SeqparError

    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, SeqparError):
            return e
        todo += [getattr(e, "inner_exception", None), e.__cause__, e.__context__]
    return None


def error_text(exc: BaseException) -> str:
    """The seqpar error's message if one is in the chain, else the wrapper's."""
    inner = seqpar_error(exc)
    return str(inner if inner is not None else exc)


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
