"""Token-local regions (``rules.token_local_rule``): which modules are mixture-of-experts blocks, and where
a view puts a rank's own tokens, checked by brute force.

A tensor of the rank's own tokens has one dim read as [sf, tokens, m]. ``_view_tokens`` says where that
factor lands after a view; here every element of a global tensor holds its token id, each rank keeps
its own tokens (rows of the sequence, uneven and zig-zag layouts included), views its piece to the
local destination shape (the token dim at sf*L*m, as ``localize`` writes it), and the ids along the
claimed dim must be that rank's tokens, each repeated m times, in every one of the sf blocks.
"""
from __future__ import annotations

import math

import pytest
import torch

from sp_compiler.placements import Layout, TokenLocal
from sp_compiler.rules import _view_tokens, token_blocks

__all__ = []


def test_token_blocks_are_the_modules_holding_experts():
    paths = {"model.layers.0.mlp.experts", "model.layers.0.mlp.gate", "model.layers.0.self_attn.q_proj",
             "model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.experts", "model.layers.2.mlp",
             "experts"}
    assert token_blocks(paths) == {"model.layers.0.mlp", "model.layers.1.mlp"}


def _local(x, dim, sf, seq, rows):
    """The rows ``rows`` of the sequence factor of ``x`` (dim ``dim`` read as [sf, seq, rest])."""
    shape = x.shape
    y = x.reshape(*shape[:dim], sf, seq, shape[dim] // (sf * seq), *shape[dim + 1:])
    y = y.index_select(dim + 1, torch.tensor(rows))
    return y.reshape(*shape[:dim], sf * len(rows) * (shape[dim] // (sf * seq)), *shape[dim + 1:])


def _views(B, S, k, H):
    """(src shape, its TokenLocal, dst shape) pairs of what MoE blocks do, plus a few that must fail."""
    return [
        ((B, S, H), TokenLocal(1, 1, 1), (B * S, H)),             # the block's entry
        ((B * S, k), TokenLocal(0, B, 1), (B * S * k,)),          # top-k ids flattened
        ((B * S * k, H), TokenLocal(0, B, k), (B * S, k, H)),     # routed copies back per token
        ((B * S, H), TokenLocal(0, B, 1), (B, S, H)),             # the block's exit
        ((B * S * k, H), TokenLocal(0, B, k), (B * S * k * H,)),
        ((B, S, H), TokenLocal(1, 1, 1), (B, S, 2, H // 2)),
        ((B, S, H), TokenLocal(1, 1, 1), (B * S * H,)),
    ]


@pytest.mark.parametrize("world,zigzag", [(2, False), (3, False), (2, True)])
@pytest.mark.parametrize("S", [6, 7])
def test_views_follow_each_ranks_tokens(S, world, zigzag):
    B, k, H = 2, 3, 4
    for src, t, dst in _views(B, S, k, H):
        out = _view_tokens(src, dst, t, S)
        assert out is not None, (src, t, dst)
        token = torch.arange(B)[:, None] * S + torch.arange(S)[None, :]                   # [B, S] token ids
        # a global tensor of shape src whose every element holds its token id
        ids = token.reshape(B, S, 1).expand(B, S, math.prod(src) // (B * S)).reshape(src)
        lay = Layout(S, world, zigzag)
        for r in range(world):
            rows = [s for start, n in lay.spans(r) for s in range(start, start + n)]
            mine = _local(ids, t.dim, t.sf, S, rows)
            local_dst = list(dst)
            local_dst[out.dim] = out.sf * len(rows) * out.m
            got = mine.reshape(local_dst).movedim(out.dim, 0).reshape(out.sf, len(rows), out.m, -1)
            for blk in range(out.sf):
                for i, s in enumerate(rows):
                    held = got[blk, i]
                    assert (held % S).unique().tolist() == [s], (src, dst, r, blk, i, held)
                    if out.sf == B:                                   # the blocks are the batch rows
                        assert (held // S).unique().tolist() == [blk], (src, dst, r, blk, i, held)


@pytest.mark.parametrize("src,t,dst", [
    ((2, 6, 4), TokenLocal(1, 1, 1), (2, 3, 8)),      # splits the tokens themselves
    ((2, 6, 4), TokenLocal(1, 1, 1), (12, 2, 2)),      # fine: [B*S, 2, 2]
])
def test_a_view_that_splits_the_tokens_is_refused(src, t, dst):
    out = _view_tokens(src, dst, t, 6)
    if dst == (2, 3, 8):
        assert out is None
    else:
        assert out == TokenLocal(0, 2, 1)
