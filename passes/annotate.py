"""annotate: give graph inputs their placements.

    user inputs (input_ids, position_ids, masks)     Replicate  (every rank gets the full prompt)
    KV cache stand-ins (outputs="local", ``sp_compiler.kv``)
        split by heads                               S(1): this rank's KV heads, swapped in per call
        split by sequence                            RankLocal: this rank's rows (passes/kv_attention)
    parameters and buffers                           Replicate, or, where the strategy runs a block
                                                     tensor-parallel, the TP plan's slice:
        colwise  Linear [out, in] -> S(0)   Conv1D [in, out] -> S(1)   bias -> S(0)
        rowwise  Linear [out, in] -> S(1)   Conv1D [in, out] -> S(0)   bias -> R
        fused [q | k | v] projections use S(d, sf=3): every block is split on its own

Sliced weights are cut once here, from the real tensors Dynamo hands the backend, and
passed in place of the full ones on every call (``ctx.local_inputs``). Parameters that are
stand-ins (``options["checkpoint"]``, ``sp_compiler.checkpoint``) are read from the checkpoint
instead: the slice where the placement slices them, the whole tensor where it does not.
"""
from __future__ import annotations

import torch

from sp_compiler.checkpoint import is_stand_in, open_checkpoint, stand_in_names
from sp_compiler.context import PLACEMENT
from sp_compiler.errors import InputError, ShapeConstraintError, module_path
from sp_compiler.placements import RankLocal, Replicate, Shard, is_shard, make_shard, shard_tensor
from sp_compiler.strategies import layer_path, tp_role

aten = torch.ops.aten

__all__ = ["annotate", "shard_tensor", "token_input"]


def annotate(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        if i in ctx.kv:
            node.meta[PLACEMENT] = RankLocal() if ctx.kv[i].split == "seq" else Shard(1)
            continue
        p = node.meta[PLACEMENT] = _placement(node, ctx.input_fqns[i], ctx)
        piece = _piece(ctx, i, p)
        if piece is not None:
            ctx.local_inputs[i] = piece
        if is_shard(p):
            ctx.sliced[i] = p
    ctx.options.plan.check(layer_path(module_path(n)) for n in gm.graph.nodes
                           if n.op == "call_function" and layer_path(module_path(n)))
    tokens = token_input(gm)
    if tokens is None:
        raise InputError("seqpar found no token input (an integer [B, S] tensor feeding an embedding); "
                         "inputs_embeds is not supported. Fix: call the model with input_ids")
    ctx.batch, ctx.seq_len = tokens.meta["val"].shape[:2]
    return gm


def _placement(node, fqn, ctx):
    if fqn is None or not isinstance(node.meta.get("val"), torch.Tensor):
        return Replicate()
    module, _, kind = fqn.rpartition(".")
    role = tp_role(module)
    if role is None or ctx.strategy_at(layer_path(module)).weights(role.block) != "tp" or kind not in ("weight", "bias"):
        return Replicate()
    shape = tuple(node.meta["val"].shape)
    linear = any(u.target == aten.t.default for u in node.users)      # nn.Linear stores [out, in]
    if len(shape) == 1:
        dim = 0 if role.style == "colwise" else None
    elif role.style == "colwise":
        dim = 0 if linear else 1
    else:
        dim = 1 if linear else 0
    if dim is None:
        return Replicate()
    blocks = role.blocks if role.style == "colwise" else 1
    if (shape[dim] // blocks) % ctx.world:
        raise ShapeConstraintError(
            f"{fqn}: {role.style} tensor parallelism splits dim {dim} of size {shape[dim] // blocks} "
            f"(per block) over {ctx.world} ranks, which does not divide it. Fix: use a world size that divides "
            f"the head and feature counts, or a sequence-parallel strategy ('ulysses')")
    return make_shard(dim, blocks)


def _piece(ctx, i, p):
    """What input ``i`` is on this rank, where it is not what Dynamo hands over; None where it is."""
    fqn, checkpoint = ctx.input_fqns[i], ctx.options.checkpoint
    full = ctx.full_inputs[i] if fqn is not None else None       # a parameter or buffer, as Dynamo handed it
    if fqn is not None and is_stand_in(full):
        if checkpoint is None:
            raise InputError(f"parameter {fqn!r} has no values: it is a stand-in (sp_compiler.stand_ins). Fix: pass "
                             f"options['checkpoint'] = the safetensors directory to read the weights from")
        return open_checkpoint(checkpoint).read(stand_in_names(full, fqn), ctx.example_inputs[i], p, ctx.world,
                                                ctx.rank, widen=ctx.widen.get(i))
    if checkpoint is not None and fqn is not None and fqn in open_checkpoint(checkpoint).files:
        raise InputError(f"parameter {fqn!r} holds real values and options['checkpoint'] = {checkpoint!r} holds it "
                         f"too: seqpar will not guess which wins. Fix: build the model with "
                         f"accelerate.init_empty_weights() and sp_compiler.stand_ins(model) (or call "
                         f"sp_compiler.from_pretrained), or drop the checkpoint option")
    return shard_tensor(ctx.example_inputs[i], p, ctx.world, ctx.rank) if is_shard(p) else None


def token_input(gm):
    """The input_ids placeholder: the [B, S] integer input that feeds the embedding; None if none."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == aten.embedding.default:
            idx = n.args[1]
            while idx.op == "call_function" and idx.target in (aten.view.default, aten._unsafe_view.default,
                                                                aten.reshape.default):
                idx = idx.args[0]                                   # GPT-2: input_ids.view(-1, S)
            if idx.op == "placeholder" and idx.meta["val"].dim() == 2:
                return idx
    return None
