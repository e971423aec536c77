"""Attention written out in eager ops (``passes/eager_attention``): gpt-oss's attention sinks, and any model
loaded with ``attn_implementation="eager"``.

    structure   fake process group of 2, 13 tokens: gpt-oss (sinks; sliding and full layers) and an eager
                Llama become one attention op per layer, split by heads (ulysses, tp) or query rows
                (zig-zag: causal chunks), no softmax over [S, S] scores is left, and the compile does not
                warn; gpt-oss's sink correction reads the op's logsumexp. At S = 16384 with a padded prompt
                no node of rank 0 holds S^2/N elements: the masked attention is cut in query blocks, each
                returning its logsumexp. GPT-2's eager attention (scores divided by a tensor) is not matched:
                it runs whole and the compile warns. (What the matcher takes and leaves, op by op:
                tests/unit/test_eager_match.py.)
    numerics    2 gloo ranks against one device: gpt-oss under ulysses and zig-zag on a left-padded batch
                with the mask cut in query blocks (``MIN_MASK`` forced to 1), zig-zag's causal chunks on a batch without
                padding, greedy generations on a cache
                kept split (``outputs="local"``: split-KV decode merges the sinks' logsumexp); --full: an
                eager Llama's generation, gpt-oss's under ulysses
"""
from __future__ import annotations

import importlib
import logging

import pytest
import torch

from models import build_model, make_inputs
from seqpar_testing import cached_run, fake_model, full_or, padded_mask
from sp_compiler import sdpa
from sp_compiler.testing import run_ranks

__all__ = []

pytestmark = pytest.mark.usefixtures("dynamo_reset")

aten = torch.ops.aten
B, S = 2, 13
EAGER = {"gpt_oss": {}, "llama": {"attn_implementation": "eager"}}
WARNING = "is not one seqpar recognises"


def _transform(family, strategy, seq_len=S, batch=B, call=None, **config):
    from sp_compiler.plan import transform

    fm = fake_model(family, **EAGER.get(family, {}), **config)
    return transform(fm.config, strategy=strategy, world=2, rank=0, batch=batch, seq_len=seq_len, model=fm,
                     call=call)


def _whole_scores(gm, seq_len):
    return [n for n in gm.graph.nodes if n.target == aten._softmax.default
            and tuple(n.meta["val"].shape[-2:]) == (seq_len, seq_len)]


@pytest.mark.parametrize("strategy", ["ulysses", "vanilla_sp_zigzag", "tp"])
@pytest.mark.parametrize("family", ["gpt_oss", "llama"])
def test_eager_attention_is_one_attention_op(family, strategy, caplog):
    """Zig-zag's causal attention (no mask at batch 2 without padding: ``passes/causal_mask``) is cut
    into its diagonal and earlier chunks, so it has more ops than layers."""
    with caplog.at_level(logging.WARNING, logger="seqpar"):
        gm, _ = _transform(family, strategy)
    attention = [n for n in gm.graph.nodes if sdpa.is_attention(n)]
    assert len(attention) >= 2 and not _whole_scores(gm, S), (len(attention), _whole_scores(gm, S))
    assert WARNING not in caplog.text
    sinks = [n for n in gm.graph.nodes if n.target == aten.sigmoid.default and n.args[0].target == aten.sub.Tensor]
    if family == "gpt_oss":                                         # out * sigmoid(lse - sink), one per layer
        assert len(sinks) == 2, sinks
        assert all(n.args[0].meta["val"].shape[-1] in (S, 7, 6) for n in sinks)   # [B, H', rows]: the lse


@pytest.mark.parametrize("strategy", ["ulysses", "vanilla_sp_zigzag"])
def test_sinks_on_a_long_padded_prompt_build_no_s_by_s(strategy):
    """S = 16384, a padded prompt: gpt-oss's sliding and full masks are cut in query blocks
    (``passes/mask_blocks``), each block's attention returning its logsumexp for the sink correction."""
    long = 16384
    mask = torch.ones(1, long, dtype=torch.long)
    mask[0, :7] = 0
    gm, _ = _transform("gpt_oss", strategy, seq_len=long, batch=1, max_position_embeddings=long,
                       call=dict(logits_to_keep=1, attention_mask=mask))
    largest = max((v.numel(), n.name) for n in gm.graph.nodes for v in [n.meta.get("val")]
                  if isinstance(v, torch.Tensor))
    assert largest[0] < long * long // 2, largest
    blocks = [n for n in gm.graph.nodes if sdpa.is_attention(n)]
    assert len(blocks) > 2 * 2, f"{len(blocks)} attention calls: the masks were not cut"
    assert all(sdpa.lse_of(n) is not None for n in blocks), "a block whose logsumexp the sink does not read"


def test_unrecognised_attention_runs_whole_and_says_so(caplog):
    """GPT-2's eager attention divides its scores by a tensor, which ``passes/eager_attention`` does not
    match: under a sequence layout every rank gathers q, k, v and computes all the scores. Exact, but not
    parallel, so the compile warns, naming the layers."""
    with caplog.at_level(logging.WARNING, logger="seqpar"):
        gm, _ = _transform("gpt2", "ulysses", attn_implementation="eager")
    assert _whole_scores(gm, S) and not [n for n in gm.graph.nodes if sdpa.is_attention(n)]
    warned = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert len(warned) == 1 and "transformer.h.0, transformer.h.1" in warned[0], caplog.text


# ----------------------------------------------------------------------------- gloo ranks

#: (family, strategy, call): "blocked" is a left-padded batch, logits, with every mask cut in query blocks;
#: "causal" a prompt without padding, logits (zig-zag: the full layer's causal chunks, passes/rows_attention)
CASES = [("gpt_oss", "ulysses", "blocked"), ("gpt_oss", "vanilla_sp_zigzag", "blocked"),
         ("gpt_oss", "vanilla_sp_zigzag", "causal"),
         ("gpt_oss", "vanilla_sp_zigzag", "generate")]
#: CI: one split-KV decode with sinks; an eager Llama's numerics in CI: tests/unit/test_eager_match.py
CASES += full_or([], [("gpt_oss", "ulysses", "generate"), ("llama", "vanilla_sp_zigzag", "generate")])


def _model(family):
    return build_model(family, **EAGER[family])


def _call(model, family, call):
    with torch.no_grad():
        if call == "generate":
            return model.generate(make_inputs(family, 1, S), max_new_tokens=4, do_sample=False)
        if call == "causal":
            return model(make_inputs(family, B, S)).logits
        return model(make_inputs(family, B, S), attention_mask=padded_mask(B, S)).logits


def _rank_body():
    importlib.import_module("passes.mask_blocks").MIN_MASK = 1
    out = {}
    for family, strategy, call in CASES:
        torch._dynamo.reset()
        model = _model(family)
        model.compile(backend="seqpar", options={"strategy": strategy, "lower": "eager",
                                                 "outputs": "local" if call == "generate" else "replicate"})
        out[(family, strategy, call)] = _call(model, family, call)
    return out


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_eager_attention_matches_one_device(case):
    family, _, call = case
    results = cached_run(("eager_attention",), run_ranks, _rank_body, 2, timeout=900)
    want = _call(_model(family), family, call)
    keep = padded_mask(B, S).bool() if call == "blocked" else slice(None)
    for rank, res in enumerate(results):
        if call == "generate":
            assert torch.equal(res[case], want), (rank, res[case], want)
        else:
            torch.testing.assert_close(res[case][keep], want[keep], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"rank {rank}: {m}")
