"""rows_attention: causal attention on a rank's own query rows, with the right offset.

Under ``vanilla_sp`` every rank holds query rows of one chunk c of the sequence (two
chunks, r and 2N-1-r, with zig-zag) and the whole K, V in sequence order. SDPA's
``is_causal`` would align the local rows with keys 0.., which is wrong for c > 0:

    before:  o = attention(q_local, K, V, is_causal=True)
    after:   per local chunk i (global chunk c, C rows):
               o_d, lse_d = attention(q_i, K[c*C:(c+1)*C], V[..], is_causal=True)   # diagonal block
               o_p, lse_p = attention(q_i, K[:c*C],        V[..], is_causal=False)  # all earlier keys
               lse = logaddexp(lse_d, lse_p)
               o_i = o_d * exp(lse_d - lse) + o_p * exp(lse_p - lse)
             o = cat(o_i)

No mask is built, and each rank computes exactly the scores the causal mask keeps
(plus the upper half of its C x C diagonal blocks). Explicit masks (padding, packed
documents) need no rewrite: their rows were sliced like q by ``insert``.
Also records the attention work per rank (``ctx.attention_work``).
"""
from __future__ import annotations

import operator

import torch

from sp_compiler.collectives import Builder, zigzag_chunks
from sp_compiler.context import PLACEMENT
from sp_compiler.errors import ShardingError
from sp_compiler.rules import ATTENTION_OPS, attention_inputs

aten = torch.ops.aten

__all__ = ["rows_attention", "chunks_of", "attention_work"]


def chunks_of(world: int, rank: int, zigzag: bool):
    """Global chunk ids of this rank's rows, and how many chunks the sequence has."""
    return (zigzag_chunks(world, rank), 2 * world) if zigzag else ((rank,), world)


def attention_work(S: int, world: int, zigzag: bool):
    """Unmasked causal score entries per rank (per batch and head): what each rank computes."""
    rows = []
    for r in range(world):
        chunks, n = chunks_of(world, r, zigzag)
        C = S // n
        rows.append(sum(c * C * C + C * (C + 1) // 2 for c in chunks))
    return rows


def rows_attention(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in ATTENTION_OPS:
            continue
        strategy = ctx.strategy_for(node)
        if strategy.attention != "rows":
            continue
        q, k, v, mask = attention_inputs(node)
        causal = _is_causal(node)
        if mask is None and causal and ctx.world > 1:
            _split_causal(gm, node, ctx, strategy.zigzag)
        if causal or mask is None:
            S = ctx.seq_len
            ctx.attention_work = {"kind": "causal", "per_rank": attention_work(S, ctx.world, strategy.zigzag)}
        else:
            ctx.attention_work = {"kind": "mask (runtime)", "per_rank": None}
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


# position of ``is_causal`` in each attention op's arguments
_IS_CAUSAL_ARG = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: 4,
    aten._scaled_dot_product_flash_attention.default: 4,
    aten._scaled_dot_product_efficient_attention.default: 6,
    aten.scaled_dot_product_attention.default: 5,
}


def _is_causal(node) -> bool:
    i = _IS_CAUSAL_ARG.get(node.target)
    if i is None:
        return False
    return bool(node.args[i]) if len(node.args) > i else bool(node.kwargs.get("is_causal", False))


def _attend(b, node, q, k, v, causal):
    """(out, lse) of the node's own attention kernel on (q, k, v)."""
    t, scale = node.target, node.kwargs.get("scale")
    if t == aten._scaled_dot_product_flash_attention_for_cpu.default:
        r = b(t, q, k, v, 0.0, causal, scale=scale)
    elif t == aten._scaled_dot_product_flash_attention.default:
        r = b(t, q, k, v, 0.0, causal, False, scale=scale)
    elif t == aten._scaled_dot_product_efficient_attention.default:
        r = b(t, q, k, v, None, True, 0.0, causal, scale=scale)
    else:
        raise ShardingError(node, "causal attention on query rows needs a kernel that returns its logsumexp",
                            hint="use the sdpa attention implementation (flash or efficient), or 'ulysses'")
    return b(operator.getitem, r, 0), b(operator.getitem, r, 1)


def _split_causal(gm, node, ctx, zigzag):
    q, k, v, _ = attention_inputs(node)
    lse_users = [u for u in node.users if u.args[1] != 0 and u.users]
    if lse_users:
        raise ShardingError(node, "the attention's logsumexp output is used; rows attention rebuilds only the output")
    chunks, n = chunks_of(ctx.world, ctx.rank, zigzag)
    C = ctx.seq_len // n
    b = Builder(gm.graph, after=node.prev, before=node, ctx=ctx)
    outs = []
    for i, c in enumerate(chunks):
        q_i = b(aten.slice.Tensor, q, 2, i * C, (i + 1) * C)                              # [B, H, C, D]
        o_d, lse_d = _attend(b, node, q_i, b(aten.slice.Tensor, k, 2, c * C, (c + 1) * C),
                             b(aten.slice.Tensor, v, 2, c * C, (c + 1) * C), True)
        if c == 0:
            outs.append(o_d)
            continue
        o_p, lse_p = _attend(b, node, q_i, b(aten.slice.Tensor, k, 2, 0, c * C),
                             b(aten.slice.Tensor, v, 2, 0, c * C), False)
        lse = b(aten.logaddexp.default, lse_d, lse_p)                                     # [B, H, C]
        w_d = b(aten.unsqueeze.default, b(aten.exp.default, b(aten.sub.Tensor, lse_d, lse)), -1)
        w_p = b(aten.unsqueeze.default, b(aten.exp.default, b(aten.sub.Tensor, lse_p, lse)), -1)
        o = b(aten.add.Tensor, b(aten.mul.Tensor, o_d, w_d), b(aten.mul.Tensor, o_p, w_p))
        outs.append(b(aten._to_copy.default, o, dtype=node.meta["val"][0].dtype))
    out = outs[0] if len(outs) == 1 else b(aten.cat.default, outs, 2)
    out.meta[PLACEMENT] = node.meta[PLACEMENT][0]
    for u in list(node.users):
        if u.args[1] == 0:
            u.replace_all_uses_with(out)
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)
