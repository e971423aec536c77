"""localize: global sizes written into the graph -> this rank's sizes.

    view(x, [B, S, H, D])        x: S(1)    ->  view(x, [B, L_r, H, D])     L_r: rank r's rows
                                                                              (S/N when N divides S)
    expand(k, [B, Hkv, r, S, D]) k: S(1)    ->  expand(k, [B, Hkv/N, r, S, D])
    split(qkv, H, 2)             qkv: S(2, sf=3) split into its 3 blocks -> split(qkv, H/N, 2)

Views become reshapes: a collective may hand a tensor on in another memory layout
than the op that produced it originally (attention kernels return [B, S, H, D]-strided
outputs), and reshape is a view wherever the layout allows one.

Rows kept from a sequence-sharded tensor (``logits_to_keep``) become this rank's share of
them, a Partial (``collectives.gather_rows``):

    slice(x, 1, -1, end)         x: S(1)    ->  where(owned, index_select(x, 1, local row), 0)

A vocab-parallel embedding (the table split by rows) looks every id up in this rank's rows:

    embedding(w, ids)            w: S(0)    ->  where(held, embedding(w, ids - lo), 0)   a Partial

Only ops whose output is sharded carry sizes to rewrite: tensors made from scratch
(arange, full, masks) stay whole (Replicate) and are sliced where a sharded tensor
meets them. Nodes added by ``insert`` are already local and are skipped.

Inside a mixture-of-experts block run on each rank's own tokens (``rules.token_local_rule``) a
token dim of global size sf*S*m becomes sf*L*m, and tensors the block makes at a token size are
made at the local one:

    view(w, [B*S, k, H])         w: TokenLocal(0, sf=B, m=k)  ->  reshape(w, [B*L, k, H])
    arange(B*S*k)                TokenLocal(0, sf=B, m=k)     ->  arange(B*L*k)
"""
from __future__ import annotations

import torch

from sp_compiler.context import INSERTED, PLACEMENT, layer_of
from sp_compiler.collectives import Builder, collective_row, gather_rows, vocab_lookup
from sp_compiler.experts import MOE_EXPERTS
from sp_compiler.errors import ShardingError
from sp_compiler.placements import is_partial, is_shard, is_token_local
from sp_compiler.rules import MADE, kept_rows

aten = torch.ops.aten

__all__ = ["localize"]

_SIZE_ARG = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default}


def localize(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    N = ctx.world
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.meta.get(INSERTED):
            continue
        p = node.meta.get(PLACEMENT)
        if is_partial(p) and kept_rows(node) is not None and is_shard(node.args[0].meta.get(PLACEMENT)):
            _keep_local_rows(gm, node, ctx)
            continue
        if is_partial(p) and node.target == aten.embedding.default:
            _vocab_local(gm, node, ctx)
            continue
        if node.target == aten.view.default:
            node.target = aten.reshape.default
        sized = is_shard(p) or (is_token_local(p) and p.dim is not None)
        if node.target in _SIZE_ARG and sized:
            size = list(node.args[1])
            if size[p.dim] != -1:
                size[p.dim] = _local_size(ctx, size, p)
            node.args = (node.args[0], size, *node.args[2:])
        elif node.target in MADE and sized:
            _make_local(node, p, ctx)
        elif node.target is MOE_EXPERTS and sized:
            _experts_local(node, ctx)
        elif node.target == aten.split.Tensor:
            src_p = node.args[0].meta.get(PLACEMENT)
            dim = node.args[2] if len(node.args) > 2 else 0
            dim = dim % node.meta["val"][0].dim()
            if is_shard(src_p) and src_p.dim == dim:
                node.args = (node.args[0], node.args[1] // N, *node.args[2:])
    return gm


def _local_size(ctx, shape, p) -> int:
    """This rank's size of the sharded (or token) dim of a tensor of global ``shape``."""
    return p.local_size(ctx.local_rows()) if is_token_local(p) else ctx.local_shape(shape, p)[p.dim]


def _make_local(node, p, ctx):
    """A tensor made from sizes inside a token-local block, at the rank's own token count."""
    shape = tuple(node.meta["val"].shape)
    n = _local_size(ctx, shape, p)
    args = list(node.args)
    if node.target == aten.arange.default:
        args[0] = n
    elif node.target in (aten.arange.start, aten.arange.start_step) and args[0] == 0 and \
            (len(args) < 3 or args[2] == 1):
        args[1] = n
    elif node.target in (aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.full.default):
        args[0] = [n if d == p.dim else s for d, s in enumerate(args[0])]
    elif node.target in (aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default,
                         aten.new_full.default):
        args[1] = [n if d == p.dim else s for d, s in enumerate(args[1])]
    else:
        raise ShardingError(node, f"cannot make this tensor at the rank's token count ({shape} -> dim {p.dim} "
                            f"of {n})", hint="report this model; choose 'tp' meanwhile")
    node.args = tuple(args)


def _experts_local(node, ctx):
    """Expert parallelism on each rank's own tokens: the routed rows travel to their experts' ranks and
    back inside ``seqpar::moe_experts``. Reported as two all_to_all of the routed rows [B*L*k, H] (L: the
    most rows a rank holds, so every rank reports the same), each row once each way."""
    node.args = (*node.args[:7], "local", *node.args[8:])
    val = node.meta["val"]
    rows = val.shape[0] // ctx.seq_len * max(ctx.layout(ctx.seq_len).local_size(r) for r in range(ctx.world))
    for what in ("experts: routed rows to their experts' ranks", "experts: their outputs back"):
        ctx.collectives.append({"layer": layer_of(node),
                                **collective_row("all_to_all", 0, (rows, val.shape[-1]), val.dtype, what)})


def _vocab_local(gm, node, ctx):
    """embedding(w, ids) of a vocab-parallel table -> this rank's ids looked up, zeros else (a Partial)."""
    weight, ids = node.args[:2]
    b = Builder(gm.graph, after=node.prev, before=node, ctx=ctx)
    out = vocab_lookup(b, weight, ids, weight.meta["val"].shape[0])
    out.meta[PLACEMENT] = node.meta[PLACEMENT]
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _keep_local_rows(gm, node, ctx):
    """x[:, a:b] / x[:, idx] of a sequence-sharded x -> this rank's share of those rows (a Partial)."""
    dim, x = kept_rows(node)
    shape = tuple(x.meta["val"].shape)
    k = node.meta["val"].shape[dim]
    b = Builder(gm.graph, after=node.prev, before=node, ctx=ctx)
    if node.target == aten.slice.Tensor:
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        start = max(0, start + shape[dim]) if start < 0 else min(start, shape[dim])
        idx = b(aten.arange.start_step, start, start + k * step, step, dtype=torch.int64)
    else:
        idx = node.args[1][dim]
    out = gather_rows(b, x, shape, dim, idx, k)
    out.meta[PLACEMENT] = node.meta[PLACEMENT]
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
