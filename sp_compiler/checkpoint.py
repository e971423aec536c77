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

Checkpoints that transformers converts when it loads (its ``conversion_mapping`` for the config's
``model_type``: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, ... store one tensor per expert, and the model
holds them fused) are read through that same mapping, never built whole:

    experts.{0..E-1}.w1.weight [I, H], .w3.weight [I, H]   MergeModulelist(0), Concatenate(1)
      -> mlp.experts.gate_up_proj [E, 2I, H]                (``_Fused``: a rank's piece is cut from each
                                                             expert's tensor it touches, S(1, sf=2): its
                                                             rows of w1 and of w3; S(0): its experts)
    block_sparse_moe.gate.weight -> mlp.gate.weight         (renamings)
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

__all__ = ["Checkpoint", "open_checkpoint", "stand_ins", "is_stand_in", "stand_in_names", "load_buffers", "from_checkpoint",
           "INDEX", "SINGLE"]

INDEX = "model.safetensors.index.json"      # shards and their weight_map, as save_pretrained writes them
SINGLE = "model.safetensors"
#: a tensor of one expert in a per-expert checkpoint layout ('...experts.3.w1.weight')
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")

#: stand-in -> every name the model gives it (tied weights have several)
_NAMES: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: buffers ``load_buffers`` filled from a checkpoint (real values the checkpoint holds too, by design)
_LOADED: WeakIdKeyDictionary = WeakIdKeyDictionary()


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


def load_buffers(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Fill the model's buffers that checkpoint ``path`` holds (persistent ones, e.g. DeepSeek-V3's
    ``e_score_correction_bias``) from it, in place, as transformers' loading does; they are small and
    read whole. The rest (RoPE's) keep the values the model made."""
    ck = open_checkpoint(path)
    for name, buf in model.named_buffers():
        if ck.holds(name):
            with torch.no_grad():
                buf.copy_(ck.read([name], buf))
            _LOADED[buf] = True
    return model


def from_checkpoint(t) -> bool:
    """Whether ``t`` is a buffer ``load_buffers`` filled from the checkpoint."""
    return isinstance(t, torch.Tensor) and t in _LOADED


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
        self.renamed, self.fused = _conversions(path, self.files)     # model name -> checkpoint name / _Fused
        self._pieces: Dict[tuple, torch.Tensor] = {}

    def holds(self, name: str) -> bool:
        """Whether the checkpoint holds model tensor ``name``: stored under it, under the name transformers
        renames to it, or in parts that it fuses."""
        return name in self.files or name in self.renamed or name in self.fused

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
        name = next((n for n in names if self.holds(n)), None)
        if name is None:
            converted = any(_PER_EXPERT.search(n) for n in self.files)
            raise CheckpointError(
                f"tensor {names[0]!r} is not in checkpoint {self.path!r} ({len(self.files)} tensors, e.g. "
                f"{sorted(self.files)[:3]}). " + (
                    "Its experts are stored one tensor per expert, and transformers' conversion mapping for "
                    "this model type (config.json) does not make it. Fix: load this model with "
                    "AutoModelForCausalLM.from_pretrained and compile it"
                    if converted else
                    "Fix: save the checkpoint from the same model class and config (model.save_pretrained)"))
        key = (name, fmt(placement) if is_shard(placement) else "R", world, rank, like.dtype, like.device,
               widen is not None)
        if key not in self._pieces:
            self._pieces[key] = self._read(name, like, placement, world, rank, widen)
        return self._pieces[key]

    def _read(self, name, like, placement, world, rank, widen):
        cut = is_shard(placement) or widen is not None
        if name in self.fused:
            sl, where = self.fused[name], f"tensor {name!r} (fused from {self.fused[name].count} tensors)"
        else:
            stored = self.renamed.get(name, name)
            file = self.files[stored]
            sl = (_open_once(file) if cut else self._open(file)).get_slice(stored)
            where = f"tensor {stored!r} in {file!r}"
        shape = tuple(sl.get_shape())
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


class _Fused:
    """A tensor the model holds fused and the checkpoint stores in parts: the stack over experts (dim 0)
    of each source's tensors, concatenated over the sources (``cat_dim``). Indexed like a safetensors
    slice (``get_shape``, ``get_dtype``, ``[slices]``): a piece reads only the rows it needs of the
    experts it holds."""

    def __init__(self, parts, cat_dim, files):
        self.parts, self.cat_dim, self.files = parts, cat_dim, files          # parts[source][expert]: a name
        self.count = sum(len(p) for p in parts)

    @functools.cached_property
    def _layout(self):
        """(shape, dtype, each source's size along the concatenated dim), from the first expert's headers:
        read when the tensor is first read, not when the checkpoint is opened."""
        first = [_open_once(self.files[p[0]]).get_slice(p[0]) for p in self.parts]
        one = list(first[0].get_shape())
        sizes = [sl.get_shape()[self.cat_dim - 1] for sl in first] if self.cat_dim else [None]
        if self.cat_dim:
            one[self.cat_dim - 1] = sum(sizes)
        return [len(self.parts[0])] + one, first[0].get_dtype(), sizes

    def get_shape(self):
        return self._layout[0]

    def get_dtype(self):
        return self._layout[1]

    def __getitem__(self, idx):
        shape, _, sizes = self._layout
        idx = idx if isinstance(idx, tuple) else (idx,)
        idx = list(idx) + [slice(None)] * (len(shape) - len(idx))
        experts = range(shape[0])[idx[0]]
        handles = {}                                         # one handle per file for this cut read

        def part(name, inner):
            file = self.files[name]
            if file not in handles:
                handles[file] = _open_once(file)
            return handles[file].get_slice(name)[inner]

        pieces, at = [], 0
        for names, size in zip(self.parts, sizes):
            inner = list(idx[1:])
            if self.cat_dim:                                 # this source's share of the concatenated dim
                start, stop, _ = idx[self.cat_dim].indices(shape[self.cat_dim])
                lo, hi = max(start, at) - at, min(stop, at + size) - at
                at += size
                if hi <= lo:
                    continue
                inner[self.cat_dim - 1] = slice(lo, hi)
            pieces.append(torch.stack([part(names[e], tuple(inner)) for e in experts]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.cat_dim)


def _conversions(path: str, files: Dict[str, str]):
    """(model name -> checkpoint name, model name -> _Fused) from transformers' conversion mapping of the
    checkpoint's model type (its config.json): the renamings, and the converters made of the operations
    seqpar reads in parts (MergeModulelist over experts, then Concatenate of the sources)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return {}, {}
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter, WeightRenaming,
                                                 rename_source_key)

    with open(config) as f:
        transforms = get_checkpoint_conversion_mapping(json.load(f).get("model_type")) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamed, parts = {}, {}
    for name in files:
        target, pattern = rename_source_key(name, renamings, converters)
        if pattern is None:
            if target != name:
                renamed[target] = name
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        expert = re.search(r"\.(\d+)\.", name[name.rfind(".experts."):] if ".experts." in name else name)
        parts.setdefault(target, (conv, {}))[1].setdefault(conv.source_patterns.index(pattern), {})[
            int(expert.group(1)) if expert else 0] = name
    fused = {}
    for target, (conv, by_source) in parts.items():
        ops = [type(op).__name__ + f"(dim={op.dim})" for op in conv.operations]
        merge = [op for op in conv.operations if isinstance(op, MergeModulelist)]
        cat = [op for op in conv.operations if isinstance(op, Concatenate)]
        if len(conv.operations) != len(merge) + len(cat) or [op.dim for op in merge] != [0] or len(cat) > 1:
            raise CheckpointError(f"tensor {target!r} is made on load by {', '.join(ops)}; seqpar reads a fused "
                                  f"tensor only as MergeModulelist(dim=0) then Concatenate. Fix: load this model "
                                  f"with AutoModelForCausalLM.from_pretrained and compile it")
        experts = [by_source[i] for i in sorted(by_source)]
        names = [[e[k] for k in sorted(e)] for e in experts]
        fused[target] = _Fused(names, cat[0].dim if cat else None, files)
    return renamed, fused


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
