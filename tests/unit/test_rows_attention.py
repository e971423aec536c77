"""The logsumexp merge behind ``passes/rows_attention.py``: two partial attentions = one causal SDPA.

A rank holding query rows [s, s+C) of a causal attention computes

    o_d, lse_d = attention(q_rows, K[s:s+C], V[s:s+C], is_causal=True)     the diagonal block
    o_p, lse_p = attention(q_rows, K[:s],    V[:s],    is_causal=False)    every earlier key
    lse = logaddexp(lse_d, lse_p);   o = o_d * exp(lse_d - lse) + o_p * exp(lse_p - lse)

``test_merge_math`` checks that formula with torch's own CPU kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``) on random q/k/v; ``test_rows_attention_pass``
runs the pass itself on a one-attention graph per rank (plain and zig-zag layouts) and compares
each rank's output with the rows of the full causal SDPA.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from sp_compiler.placements import Shard

__all__ = ["attend"]

aten = torch.ops.aten
FLASH_CPU = aten._scaled_dot_product_flash_attention_for_cpu.default
B, H, D = 2, 3, 8
TOL = dict(atol=1e-5, rtol=1e-5)


def _qkv(S, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=gen) for _ in range(3)]


def attend(q, k, v, causal):
    """(out, logsumexp [B, H, rows]) of torch's CPU flash kernel."""
    out, lse = FLASH_CPU(q, k, v, 0.0, causal)
    return out, lse


@pytest.mark.parametrize("S,start,C", [(16, 4, 4), (16, 12, 4), (16, 1, 7), (9, 3, 3), (16, 8, 8)],
                         ids=lambda x: str(x))
def test_merge_math(S, start, C):
    q, k, v = _qkv(S)
    rows = q[:, :, start:start + C]
    o_d, lse_d = attend(rows, k[:, :, start:start + C], v[:, :, start:start + C], True)
    o_p, lse_p = attend(rows, k[:, :, :start], v[:, :, :start], False)
    lse = torch.logaddexp(lse_d, lse_p)
    merged = o_d * torch.exp(lse_d - lse).unsqueeze(-1) + o_p * torch.exp(lse_p - lse).unsqueeze(-1)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, start:start + C]
    torch.testing.assert_close(merged, want, **TOL)
    full_lse = attend(q, k, v, True)[1][:, :, start:start + C]
    torch.testing.assert_close(lse, full_lse, **TOL)


def _rows(S, world, rank, zigzag):
    """Global query rows of ``rank``: torch.chunk pieces r (and 2N-1-r with zig-zag) of N (2N)."""
    n = 2 * world if zigzag else world
    pieces = torch.arange(S).chunk(n)
    return torch.cat([pieces[c] for c in ((rank, n - 1 - rank) if zigzag else (rank,))])


def _one_attention_graph(q_local, k, v):
    from sp_compiler.context import PLACEMENT

    g = torch.fx.Graph()
    q, kn, vn = g.placeholder("q"), g.placeholder("k"), g.placeholder("v")
    attn = g.call_function(FLASH_CPU, (q, kn, vn, 0.0, True))
    attn.meta["val"] = FLASH_CPU(q_local, k, v, 0.0, True)
    attn.meta[PLACEMENT] = (Shard(2), Shard(2))
    out = g.call_function(operator.getitem, (attn, 0))
    g.call_function(operator.getitem, (attn, 1))
    g.output(out)
    return torch.fx.GraphModule(torch.nn.Module(), g)


_PASS_CASES = [(S, world, zigzag) for world in (2, 3, 4) for zigzag in (False, True) for S in (24,)]


@pytest.mark.parametrize("S,world,zigzag", _PASS_CASES,
                         ids=[f"S{S}-N{w}{'-zigzag' if z else ''}" for S, w, z in _PASS_CASES])
def test_rows_attention_pass(S, world, zigzag):
    from passes.rows_attention import rows_attention
    from sp_compiler.config import Options
    from sp_compiler.context import PassContext

    q, k, v = _qkv(S, seed=world)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    options = Options.from_dict({"strategy": "vanilla_sp_zigzag" if zigzag else "vanilla_sp"})
    for rank in range(world):
        rows = _rows(S, world, rank, zigzag)
        q_local = q[:, :, rows]
        ctx = PassContext(options, world, rank, None, example_inputs=[], input_fqns=[], seq_len=S)
        gm = rows_attention(_one_attention_graph(q_local, k, v), ctx)
        gm.recompile()                       # passes edit the graph; run_pipeline generates its code once
        assert not any(n.target == FLASH_CPU and n.args[1].op == "placeholder" for n in gm.graph.nodes), \
            f"rank {rank}: an attention over all keys is still there"
        torch.testing.assert_close(gm(q_local, k, v), want[:, :, rows], **TOL,
                                   msg=lambda m: f"rank {rank} rows {rows.tolist()}: {m}")
