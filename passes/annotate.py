"""annotate: give graph inputs their placements.

    user inputs (input_ids, position_ids, masks)     Replicate  (every rank gets the full prompt)
    KV cache stand-ins (outputs="local", ``sp_compiler.kv``)
        split by heads                               S(1): this rank's KV heads, swapped in per call
        split by sequence                            RankLocal: this rank's rows (passes/kv_attention)
    parameters and buffers                           Replicate, or, where the strategy runs a block
                                                     tensor-parallel, the TP plan's slice:
        colwise  Linear [out, in] -> S(0)   Conv1D [in, out] -> S(1)   bias -> S(0)
        rowwise  Linear [out, in] -> S(1)   Conv1D [in, out] -> S(0)   bias -> R
        experts  gate_up [E, 2I, H] -> S(1, sf=2)   down [E, H, I] -> S(2)
                 (gpt-oss: [E, H, 2I] interleaved -> S(2), its bias [E, 2I] -> S(1); down [E, I, H] -> S(1))
        vocab    embedding, lm_head [V, H] -> S(0) (a vocabulary N does not divide stays whole)
        fused [q | k | v] and [gate | up] use S(d, sf): every block is split on its own
    expert_parallel: the experts [E, ...] -> S(0), whatever the strategy (passes/expert_parallel)
    MLA's kv_b_proj [H*(nope+v), r] under a heads layout, where the latent is moved: colwise, whole
                                                     heads per rank (passes/latent)

Sliced weights are cut once here, from the real tensors Dynamo hands the backend, and
passed in place of the full ones on every call (``ctx.local_inputs``). Parameters that are
stand-ins (``options["checkpoint"]``, ``sp_compiler.checkpoint``) are read from the checkpoint
instead: the slice where the placement slices them, the whole tensor where it does not.
"""
from __future__ import annotations

import fnmatch

import torch

from sp_compiler.checkpoint import from_checkpoint, is_stand_in, open_checkpoint, stand_in_names
from sp_compiler.context import PLACEMENT
from sp_compiler.errors import InputError, ShapeConstraintError, module_path
from sp_compiler.placements import RankLocal, Replicate, Shard, is_shard, make_shard, shard_tensor
from sp_compiler.strategies import TPRole, layer_path, param_role

from .latent import latent_region, latent_weights

aten = torch.ops.aten

#: the fused experts' weights (HF's Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3), split by expert under
#: ``options["expert_parallel"]``
EXPERTS = ("*.mlp.experts.*_proj", "*.mlp.experts.*_proj_bias")

#: how a heads layout slices MLA's kv_b_proj where the latent is moved (passes/latent): by output features
BY_HEADS = TPRole("colwise", "attn")

__all__ = ["annotate", "shard_tensor", "token_input"]


def annotate(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    tokens = token_input(gm)
    if tokens is None:
        raise InputError("seqpar found no token input (an integer [B, S] tensor feeding an embedding) in the "
                         "graph Dynamo handed it: the model was called with inputs_embeds, or Dynamo cut its "
                         "forward into several graphs (a graph break, e.g. at a data-dependent size: .item(), "
                         ".tolist(); TORCH_LOGS=graph_breaks shows where), and seqpar needs the forward as one "
                         "graph. Fix: call the model with input_ids; a model whose forward breaks (JetMoE) is "
                         "not supported")
    ctx.batch, ctx.seq_len = tokens.meta["val"].shape[:2]
    ctx.latent_region = latent_region(gm, ctx)
    by_heads = latent_weights(ctx.latent_region, ctx)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        if i in ctx.kv:
            node.meta[PLACEMENT] = RankLocal() if ctx.kv[i].split == "seq" else Shard(1)
            continue
        p = node.meta[PLACEMENT] = (Shard(_tp_dim(node, BY_HEADS)) if node in by_heads
                                    else _placement(node, ctx.input_fqns[i], ctx))
        piece = _piece(ctx, i, p)
        if piece is not None:
            ctx.local_inputs[i] = piece
        if is_shard(p):
            ctx.sliced[i] = p
    ctx.options.plan.check(layer_path(module_path(n)) for n in gm.graph.nodes
                           if n.op == "call_function" and layer_path(module_path(n)))
    return gm


def _placement(node, fqn, ctx):
    if fqn is None or not isinstance(node.meta.get("val"), torch.Tensor):
        return Replicate()
    if ctx.options.expert_parallel and any(fnmatch.fnmatchcase(fqn, e) for e in EXPERTS):
        return _by_expert(node, fqn, ctx)
    role = param_role(fqn)
    if role is None or ctx.strategy_at(layer_path(fqn)).weights(role.block) != "tp":
        return Replicate()
    shape = tuple(node.meta["val"].shape)
    dim = _tp_dim(node, role)
    if dim is None or (role.style == "vocab" and shape[0] % ctx.world):     # a vocabulary N does not divide
        return Replicate()                                                     # stays whole
    blocks = role.blocks if role.style == "colwise" and not _read_interleaved(node) else 1
    if (shape[dim] // blocks) % ctx.world:
        raise ShapeConstraintError(
            f"{fqn}: {role.style} tensor parallelism splits dim {dim} of size {shape[dim] // blocks} "
            f"(per block) over {ctx.world} ranks, which does not divide it. Fix: use a world size that divides "
            f"the head and feature counts, or a sequence-parallel strategy ('ulysses')")
    return make_shard(dim, blocks)


def _by_expert(node, fqn, ctx):
    """Expert parallelism: the fused experts [E, ...] split by expert, E/N per rank."""
    experts = node.meta["val"].shape[0]
    if experts % ctx.world:
        raise ShapeConstraintError(f"{fqn}: expert parallelism splits its {experts} experts over {ctx.world} ranks, "
                                   f"which does not divide them. Fix: use a world size that divides the expert "
                                   f"count, or drop options['expert_parallel']")
    return Shard(0)


def _tp_dim(node, role):
    """The dim of a parameter that ``role`` slices, from how the graph reads it:

        stored [..., out, in], read transposed     colwise: -2   rowwise: -1   (nn.Linear; HF's fused
                                                                               experts [E, out, in])
        stored [..., in, out]                      colwise: -1   rowwise: -2   (GPT-2's Conv1D)
        bias [out]                                 colwise:  0   rowwise: whole
        embedding / lm_head [V, H]                 vocab: 0
    """
    nd = node.meta["val"].dim()
    if role.style == "vocab":
        return 0 if nd == 2 else None
    if nd == 1:
        return 0 if role.style == "colwise" else None
    out_in = any(_swaps_last_two(u, nd) for u in node.users)
    return nd - 2 if (role.style == "colwise") == out_in else nd - 1


def _read_interleaved(node, depth: int = 4) -> bool:
    """Whether a fused [gate | up] projection is stored interleaved, [g0, u0, g1, u1, ...] (gpt-oss:
    ``gate_up[..., ::2]``, ``gate_up[..., 1::2]``): a slice with step 2 within ``depth`` ops of the
    parameter. Such a projection is split as one block, not two: a contiguous piece of the columns holds
    whole (gate, up) pairs, in the order of down's rows (the packed split would hold features that down's
    rows do not match, and reshuffle the activations between the matmuls).

        packed [g | u]:        S(d, sf=2)      each rank: g[its half] | u[its half]
        interleaved [g0 u0 ..]: S(d)            each rank: its half of the pairs
    """
    todo, seen = [(node, 0)], {node}
    while todo:
        n, d = todo.pop()
        if n.target == aten.slice.Tensor and len(n.args) > 4 and n.args[4] == 2:
            return True
        if d < depth:
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    todo.append((u, d + 1))
    return False


def _swaps_last_two(user, nd) -> bool:
    if user.target == aten.t.default:
        return True
    return user.target == aten.transpose.int and sorted(d % nd for d in user.args[1:3]) == [nd - 2, nd - 1]


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
    if checkpoint is not None and fqn is not None and open_checkpoint(checkpoint).holds(fqn) \
            and not from_checkpoint(full):
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
