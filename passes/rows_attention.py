"""rows_attention: causal attention on a rank's own query rows, with the right offset.

Under ``vanilla_sp`` every rank holds query rows of one chunk c of the sequence (two
chunks, r and 2N-1-r, with zig-zag) and the whole K, V in sequence order. SDPA's
``is_causal`` would align the local rows with keys 0.., which is wrong for c > 0:

    before:  o = attention(q_local, K, V, is_causal=True)
    after:   per local chunk i (C rows from global row s; ``placements.Layout``):
               o_d, lse_d = attention(q_i, K[s:s+C], V[..], is_causal=True)   # diagonal block
               o_p, lse_p = attention(q_i, K[:s],    V[..], is_causal=False)  # all earlier keys
               lse = logaddexp(lse_d, lse_p)
               o_i = o_d * exp(lse_d - lse) + o_p * exp(lse_p - lse)
             o = cat(o_i)

No mask is built, and each rank computes exactly the scores the causal mask keeps
(plus the upper half of its C x C diagonal blocks). Explicit masks (padding, packed
documents) need no rewrite: their rows were sliced like q by ``insert``.
Each new call is the node's own kernel, built by ``sdpa.call`` (arguments by schema name,
logsumexp brought to [B, H, C]); a kernel without a logsumexp output cannot be split.
Also records the attention work per rank (``ctx.attention_work``).
"""
from __future__ import annotations

import torch

from sp_compiler.collectives import Builder
from sp_compiler.placements import Layout
from sp_compiler.context import PLACEMENT
from sp_compiler.errors import ShardingError
from sp_compiler import sdpa

aten = torch.ops.aten

__all__ = ["rows_attention", "attention_work"]


def attention_work(S: int, world: int, zigzag: bool):
    """Unmasked causal score entries per rank (per batch and head): what each rank computes."""
    lay = Layout(S, world, zigzag)
    return [sum(n * start + n * (n + 1) // 2 for start, n in lay.spans(r)) for r in range(world)]


def rows_attention(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    for node in list(gm.graph.nodes):
        if not sdpa.is_attention(node):
            continue
        strategy = ctx.strategy_for(node)
        if strategy.attention != "rows":
            continue
        call = sdpa.bind(node)
        mask, causal = call.mask, call.is_causal
        if mask is None and causal and ctx.world > 1:
            _split_causal(gm, node, ctx, strategy.zigzag)
        if causal or mask is None:
            S = ctx.seq_len
            ctx.attention_work = {"kind": "causal", "per_rank": attention_work(S, ctx.world, strategy.zigzag)}
        else:
            ctx.attention_work = {"kind": "mask (runtime)", "per_rank": None}
    gm.graph.eliminate_dead_code()
    return gm


def _is_causal(node) -> bool:
    """The attention node's ``is_causal``, read by name."""
    return sdpa.is_attention(node) and sdpa.bind(node).is_causal


def _attend(b, node, q, k, v, causal, rows):
    """(out, lse [B, H, rows]) of the node's own attention kernel on (q, k, v), with the node's scale."""
    if sdpa.lse_index(node.target) is None:
        raise ShardingError(node, "causal attention on query rows needs a kernel that returns its logsumexp",
                            hint="use the sdpa attention implementation (flash or efficient), or 'ulysses'")
    return sdpa.call(b, node.target, q, k, v, causal, scale=sdpa.bind(node).scale, rows=rows)


def _split_causal(gm, node, ctx, zigzag):
    call = sdpa.bind(node)
    q, k, v = call.q, call.k, call.v
    b = Builder(gm.graph, after=node.prev, before=node, ctx=ctx)
    outs, lses, at = [], [], 0
    for start, C in Layout(ctx.seq_len, ctx.world, zigzag).spans(ctx.rank):
        q_i = b(aten.slice.Tensor, q, 2, at, at + C)                                      # [B, H, C, D]
        at += C
        o_d, lse_d = _attend(b, node, q_i, b(aten.slice.Tensor, k, 2, start, start + C),
                             b(aten.slice.Tensor, v, 2, start, start + C), True, C)
        if start == 0:
            outs.append(o_d)
            lses.append(lse_d)
            continue
        o_p, lse_p = _attend(b, node, q_i, b(aten.slice.Tensor, k, 2, 0, start),
                             b(aten.slice.Tensor, v, 2, 0, start), False, C)
        lse = b(aten.logaddexp.default, lse_d, lse_p)                                     # [B, H, C]
        w_d = b(aten.unsqueeze.default, b(aten.exp.default, b(aten.sub.Tensor, lse_d, lse)), -1)
        w_p = b(aten.unsqueeze.default, b(aten.exp.default, b(aten.sub.Tensor, lse_p, lse)), -1)
        o = b(aten.add.Tensor, b(aten.mul.Tensor, o_d, w_d), b(aten.mul.Tensor, o_p, w_p))
        outs.append(b(aten._to_copy.default, o, dtype=node.meta["val"][0].dtype))
        lses.append(lse)
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else (b(aten.cat.default, outs, 2), b(aten.cat.default, lses, 2))
    out.meta[PLACEMENT] = lse.meta[PLACEMENT] = node.meta[PLACEMENT][0]
    sdpa.replace(node, out, lse)                     # the logsumexp: read by an attention-sink correction
