"""latent: MLA's compressed K/V (DeepSeek-V2/V3), moved instead of the keys and values it expands to.

HF views the latent as one head, [B, 1, S, kv_lora_rank], beside the rope keys [B, 1, S, rope];
``kv_b_proj`` expands it into every head's keys and values. The nodes between the one-head tensors
and the attention's K and V form the layer's latent region; what enters it is gathered (576 values
a token on DeepSeek-V3) where that moves fewer bytes than the layout would move K and V:

    rows layouts (vanilla_sp, zig-zag): the region runs on the whole sequence, all heads, every rank
        latent: S(2) -> all_gather -> kv_b_proj, split, expand, [k_nope | k_rope], pad -> K, V: R
        (was: kv_b_proj on local rows -> K, V: S(2) -> all_gather of K | V)
    heads layouts (ulysses, megatron_*, tp): the region runs on the whole sequence, this rank's heads
        latent: S(2) -> all_gather -> kv_b_proj[rank's heads] -> K, V: S(1)
        (was: kv_b_proj on local rows, all heads -> all_to_all of K | V, rows -> heads; under tp the
         latent is whole already and nothing is gathered)

Under a heads layout ``kv_b_proj``'s weight is then sliced by output features, whole heads per rank
(``annotate``), so no rank computes more than before; under the rows layouts each rank expands the
whole sequence (S rows instead of S/N) and moves (N-1)/N of the latent instead of K and V.
"""
from __future__ import annotations

import math
from typing import Dict, Set

import torch
from torch.fx import Node

from sp_compiler import sdpa
from sp_compiler.context import layer_of
from sp_compiler.rules import kv_sources, shape_of

__all__ = ["latent_region", "latent_weights"]

aten = torch.ops.aten


def latent_region(gm: torch.fx.GraphModule, ctx) -> Dict[Node, Node]:
    """{node in a latent region: its attention}, for the attentions whose layout gathers the latent:
    what enters one attention's region is gathered in one packed call."""
    region = {}
    for attn in [n for n in gm.graph.nodes if sdpa.is_attention(n)]:
        kind = ctx.strategy_for(attn).attention
        if kind not in ("rows", "heads"):
            continue
        layer = layer_of(attn)
        feeds = kv_sources(gm.graph, attn, within=lambda n: n.op == "call_function" and layer_of(n) == layer)
        roots = [n for n in feeds if _one_head(n, ctx)]
        inside, todo = set(), [u for r in roots for u in r.users]
        while todo:                                               # what the latent flows into, up to K and V
            n = todo.pop()
            if n in feeds and n not in inside:
                inside.add(n)
                todo += list(n.users)
        entering = {x for n in inside for x in n.all_input_nodes if x not in inside and x.op == "call_function"
                    and ctx.seq_len in (shape_of(x) or ())}                # not the weights
        call = sdpa.bind(attn)
        size = lambda n: math.prod(shape_of(n))                  # noqa: E731
        kv = size(call.k) + size(call.v)                           # rows: gathered whole; heads: 1/N sent
        moved = kv if kind == "rows" else kv / ctx.world
        heads = shape_of(call.q)[1]
        if any(n.target == aten.mm.default for n in inside) and sum(size(x) for x in entering) < moved \
                and (kind == "rows" or heads % ctx.world == 0):
            region.update(dict.fromkeys(inside, attn))
    return region


def latent_weights(region: Dict[Node, Node], ctx) -> Set[Node]:
    """The placeholders of the weights a heads layout slices by output features (``kv_b_proj``): those
    a region's ``mm`` reads as its right operand, through one view (``annotate`` reads from that view
    which dim holds the output features)."""
    out = set()
    for n, attn in region.items():
        if n.target == aten.mm.default and ctx.strategy_for(attn).attention == "heads":
            w = n.args[1]
            if w.op == "call_function" and len(w.all_input_nodes) == 1 and w.all_input_nodes[0].op == "placeholder":
                out.add(w.all_input_nodes[0])
    return out


def _one_head(n, ctx) -> bool:
    s = shape_of(n)
    return s is not None and len(s) == 4 and s[0] == ctx.batch and s[1] == 1 and s[2] == ctx.seq_len
