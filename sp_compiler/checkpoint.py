"""Weights read per rank from a HuggingFace safetensors checkpoint: only the slices this rank needs.

    with accelerate.init_empty_weights():               parameters on the meta device: no memory, but
        model = AutoModelForCausalLM.from_config(cfg)    Dynamo cannot trace HF's default call on them
    stand_ins(model)                                     each parameter -> a stand-in: its full shape, the
                                                         model's dtype, ONE element of storage (a NaN, expanded)
    model.compile(backend="seqpar", options={"checkpoint": dir, ...})
      annotate: parameter i gets placement p          -> Checkpoint(dir).read(name, p): the rows of p, read
                                                         with safe_open(file).get_slice(name)[rows], cast
                                                         to the stand-in's dtype; nothing else leaves the disk

The compiled graph is handed each rank's pieces in place of the stand-ins, on every call, as it is
handed the slices it cuts from real weights (``passes/annotate``). A stand-in is never computed on:
the uncompiled model would return NaN. Pieces are cached per checkpoint, so the prefill, the decode
graphs and every prompt-length bucket share one copy of each.

``sp_compiler.from_pretrained`` (``sp_compiler/loading.py``) does all three steps in one call.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Dict, Optional, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .errors import CheckpointError
from .placements import fmt, is_shard, shard_tensor

__all__ = ["Checkpoint", "open_checkpoint", "stand_ins", "is_stand_in", "stand_in_names", "INDEX", "SINGLE"]

INDEX = "model.safetensors.index.json"      # shards and their weight_map, as save_pretrained writes them
SINGLE = "model.safetensors"
#: a tensor of one expert in a per-expert checkpoint layout ('...experts.3.w1.weight')
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")

#: stand-in -> every name the model gives it (tied weights have several)
_NAMES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def stand_ins(model: torch.nn.Module, device: Optional[torch.device] = None) -> torch.nn.Module:
    """Every parameter on the meta device -> a stand-in (in place; returns ``model``). Tied parameters
    (HF's ``tie_weights``, called first) stay tied: one stand-in, known under all its names. Buffers are left as they are (RoPE's are real
    under ``init_empty_weights``); a meta buffer is refused, since no checkpoint holds it."""
    device = torch.device(device or "cpu")
    if hasattr(model, "tie_weights"):             # HF ties embeddings after loading; init_empty_weights did not
        model.tie_weights()
    made: Dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if id(p) not in made:
            if not p.is_meta:
                made[id(p)] = p
                continue
            t = torch.full((), float("nan") if p.dtype.is_floating_point else 0, dtype=p.dtype, device=device)
            made[id(p)] = torch.nn.Parameter(t.expand(p.shape), requires_grad=False)
            _NAMES[made[id(p)]] = ()
        new = made[id(p)]
        if new is not p:
            module._parameters[attr] = new
            _NAMES[new] = _NAMES[new] + (name,)
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if meta:
        raise CheckpointError(f"buffers {meta[:3]} are on the meta device, and a checkpoint holds no buffers. "
                              f"Fix: build the model under accelerate.init_empty_weights() (buffers stay real), "
                              f"not init_on_device('meta', include_buffers=True)")
    return model


def is_stand_in(t) -> bool:
    """Made by ``stand_ins``, or a tensor with less storage than elements (an expanded single value)."""
    return isinstance(t, torch.Tensor) and (t in _NAMES or t.untyped_storage().nbytes() < t.numel() * t.element_size())


def stand_in_names(t, fqn: str) -> tuple:
    """The names to look the stand-in up by: the one Dynamo gave it first, then its aliases."""
    return (fqn,) + tuple(n for n in _NAMES.get(t, ()) if n != fqn)


class Checkpoint:
    """A safetensors checkpoint directory: one ``model.safetensors``, or shards and their index."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.isfile(os.path.join(path, SINGLE)):
            single = os.path.join(path, SINGLE)
            self.files = {k: single for k in self._open(single).keys()}
        else:
            raise CheckpointError(f"checkpoint {path!r} holds neither {SINGLE} nor {INDEX}. Fix: point "
                                  f"options['checkpoint'] at a directory written by model.save_pretrained(dir)")
        self._pieces: Dict[tuple, torch.Tensor] = {}

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _open(file: str):
        """The shared handle of ``file``: whole tensors come from it without a copy."""
        return _open_once(file)

    def read(self, names: Sequence[str], like: torch.Tensor, placement=None, world: int = 1, rank: int = 0,
             widen=None) -> torch.Tensor:
        """This rank's piece of the first of ``names`` the checkpoint holds, as ``like`` (the stand-in: its
        shape is checked, its dtype and device are the piece's). ``placement`` None or Replicate: the whole
        tensor. ``widen``: a function the whole tensor goes through before it is cut (KV heads shared
        between ranks, ``passes/share_kv_heads``), so it is read whole."""
        name = next((n for n in names if n in self.files), None)
        if name is None:
            converted = any(_PER_EXPERT.search(n) for n in self.files)
            raise CheckpointError(
                f"tensor {names[0]!r} is not in checkpoint {self.path!r} ({len(self.files)} tensors, e.g. "
                f"{sorted(self.files)[:3]}). " + (
                    "Its experts are stored one tensor per expert, which transformers fuses when it loads "
                    "(its checkpoint conversion); seqpar reads tensors by name and does not convert yet. Fix: "
                    "load this model with AutoModelForCausalLM.from_pretrained and compile it"
                    if converted else
                    "Fix: save the checkpoint from the same model class and config (model.save_pretrained)"))
        key = (name, fmt(placement) if is_shard(placement) else "R", world, rank, like.dtype, like.device,
               widen is not None)
        if key not in self._pieces:
            self._pieces[key] = self._read(name, like, placement, world, rank, widen)
        return self._pieces[key]

    def _read(self, name, like, placement, world, rank, widen):
        file = self.files[name]
        cut = is_shard(placement) or widen is not None
        sl = (_open_once(file) if cut else self._open(file)).get_slice(name)
        shape, where = tuple(sl.get_shape()), f"tensor {name!r} in {file!r}"
        want = tuple(like.shape) if widen is None else None
        if want is not None and shape != want:
            raise CheckpointError(f"{where} has shape {list(shape)}, the model wants {list(want)}. Fix: build the "
                                  f"model from the checkpoint's own config (AutoConfig.from_pretrained(dir))")
        _check_cast(sl.get_dtype(), like.dtype, where)
        if widen is not None:                     # read whole, widened, then cut (small: K/V projections)
            whole = widen(sl[:].to(like.dtype))
            if tuple(whole.shape) != tuple(like.shape):
                raise CheckpointError(f"{where} has shape {list(shape)}: widened it is {list(whole.shape)}, "
                                      f"the model wants {list(like.shape)}")
            return shard_tensor(whole, placement, world, rank).to(device=like.device)
        piece = shard_tensor(sl, placement, world, rank) if is_shard(placement) else sl[:]
        return piece.to(dtype=like.dtype, device=like.device).contiguous()


def _open_once(file: str):
    """A handle of its own for one cut read: the pages a cut touches (a column slice reads a piece of
    every row) leave this process's mapping with it, instead of staying mapped, and counted in its RSS,
    for as long as the shared handle lives. Whole tensors keep the shared handle: they are the mapped
    pages themselves, shared with every rank on the host."""
    from safetensors import safe_open

    return safe_open(file, framework="pt", device="cpu")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _check_cast(stored: str, want: torch.dtype, where: str) -> None:
    have = _SAFETENSORS_DTYPES.get(stored)
    if have is None or have.is_floating_point != want.is_floating_point or (have == torch.bool) != (want == torch.bool):
        raise CheckpointError(f"{where} is stored as {stored}, which seqpar does not cast to {want}. Fix: build the "
                              f"model in a dtype of the same kind (from_config(cfg, dtype=...)), or re-save the "
                              f"checkpoint")


@functools.lru_cache(maxsize=None)
def _cached(path: str) -> Checkpoint:
    return Checkpoint(path)


def open_checkpoint(path: str) -> Checkpoint:
    """One ``Checkpoint`` per directory for the process: its pieces are shared by every compiled graph."""
    return _cached(os.path.realpath(path))
