"""``passes.eager_attention.find_eager_attention`` on Dynamo's graphs of small attention functions: what it
takes (scale, mask, sinks) and what it leaves (weights read elsewhere, dropout in training, a tensor
scale), and that the op it traces instead computes what the eager ops do."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from passes.capture import capture
from passes.eager_attention import find_eager_attention
from sp_compiler import sdpa

__all__ = []

B, H, L, D = 2, 4, 5, 8


def _plain(q, k, v, mask):
    w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(w, p=0.1, training=False), v)


def _sinks(q, k, v, mask, sinks):                           # gpt-oss's eager_attention_forward
    w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
    s = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    c = torch.cat([w, s], dim=-1)
    c = c - c.max(dim=-1, keepdim=True).values
    p = F.softmax(c, dim=-1, dtype=c.dtype)[..., :-1]
    return torch.matmul(F.dropout(p, p=0.0, training=False).to(v.dtype), v)


def _mask_first(q, k, v, mask):
    w = mask + torch.matmul(q, k.transpose(-1, -2)) * 0.25
    return torch.matmul(F.softmax(w, dim=-1), v)


def _bool_mask(q, k, v, mask):                            # added to the scores: 0/1, not SDPA's keep/hide
    w = torch.matmul(q, k.transpose(2, 3)) + (mask == 0)
    return torch.matmul(F.softmax(w, dim=-1), v)


def _weights_too(q, k, v, mask):
    w = F.softmax(torch.matmul(q, k.transpose(2, 3)) / 2.0, dim=-1)
    return torch.matmul(w, v), w


def _training_dropout(q, k, v, mask):
    w = F.softmax(torch.matmul(q, k.transpose(2, 3)), dim=-1)
    return torch.matmul(F.dropout(w, p=0.1, training=True), v)


def _tensor_scale(q, k, v, mask):                         # GPT-2: divided by torch.full([], sqrt(d))
    w = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], D ** 0.5)
    return torch.matmul(F.softmax(w, dim=-1), v)


def _dynamo_graph(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    mask = torch.zeros(B, 1, L, L).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), torch.finfo().min)
    return q, k, v, mask, torch.randn(H, generator=g)


@pytest.mark.parametrize("fn, scale, sinks", [(_plain, 0.25, False), (_sinks, 0.25, True), (_mask_first, 0.25, False)])
def test_taken(fn, scale, sinks):
    q, k, v, mask, s = _inputs()
    args = (q, k, v, mask, s) if sinks else (q, k, v, mask)
    gm, example = _dynamo_graph(fn, *args)
    (m,) = find_eager_attention(gm.graph).values()
    assert m.scale == scale and m.mask is not None and (m.sinks is not None) == sinks
    aten_gm = capture(gm, example)
    assert [n for n in aten_gm.graph.nodes if sdpa.is_attention(n)]
    assert not [n for n in aten_gm.graph.nodes if n.target == torch.ops.aten._softmax.default]
    torch.testing.assert_close(aten_gm(*example)[0], fn(*args), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fn", [_weights_too, _training_dropout, _tensor_scale, _bool_mask])
def test_left(fn):
    q, k, v, mask, _ = _inputs()
    gm, _ = _dynamo_graph(fn, q, k, v, mask)
    assert find_eager_attention(gm.graph) == {}
