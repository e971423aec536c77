"""Tier 1: the collectives each strategy inserts, on real HuggingFace graphs, in one process.

A fake process group (no communication) gives the backend a real world size and rank, so
the whole graph transformation runs; only the numbers it computes are garbage. What is
checked is ``sp_compiler.backend.last_report()``: per decoder layer, exactly the
collectives the strategy table in README.md promises, each with exactly the bytes that
follow from the model's dimensions (computed here from the config, never read back from
the engine), and outside the layers exactly one all_gather of the logits for the
sequence-parallel strategies and nothing for tp.

    B, S, N = batch, sequence, world;  E = hidden;  H, Hkv, D = heads, KV heads, head dim
    tp               2 x all_reduce       B*S*E*4 bytes each
    megatron_sp      2 x all_gather       B*S*E*4 each (gathered output)
                     2 x reduce_scatter   B*S*E*4 each (full input)
    megatron_sp_tp   1 x all_gather + 1 x reduce_scatter, B*S*E*4 each
    ulysses          1 x all_to_all of q|k|v   B*(S/N)*(H + 2*Hkv)*D*4   (KV heads, not H)
                     1 x all_to_all back       B*(S/N)*H*D*4
    logits           1 x all_gather B*S*V*4 (sequence-parallel strategies only)
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from models import FAMILIES, build_model, make_inputs
from seqpar_testing import compile_logits, fake_model, full_or, layer_names, model_dims

__all__ = []

STRATEGIES = ("tp", "ulysses", "megatron_sp", "megatron_sp_tp")
BATCH, SEQ, LAYERS, HIDDEN, VOCAB = 2, 16, 2, 128, 128
FP32 = 4

pytestmark = pytest.mark.usefixtures("dynamo_reset")

# world -> model shape; both divisible by the world for every strategy (TP splits heads).
SHAPES = {
    2: dict(heads=4, kv_heads=2, hidden=HIDDEN),     # head_dim 32
    4: dict(heads=8, kv_heads=4, hidden=HIDDEN),     # head_dim 16
}

_cache: dict = {}


def compile_report(family, strategy, world, rank=0, **shape):
    """``last_report()`` of ``strategy``'s graph for rank ``rank`` of a fake group of ``world``; memoised.

    Through ``plan.transform``: Dynamo traces each (family, shape) once, on a weightless model of the
    same config, and the seqpar backend runs on that graph for every strategy, world and rank (the
    graph Dynamo hands a backend does not depend on them; ``test_plan`` checks both paths give the
    same graph, and the last two tests here take ``torch.compile`` end to end)."""
    from sp_compiler.backend import last_report
    from sp_compiler.plan import transform

    key = (family, strategy, world, rank, tuple(sorted(shape.items())))
    if key not in _cache:
        fm = fake_model(family, layers=LAYERS, vocab=VOCAB, **shape)
        transform(fm.config, strategy=strategy, world=world, rank=rank, batch=BATCH, seq_len=SEQ, model=fm)
        _cache[key] = last_report()
    return _cache[key]


def expected_layer(strategy, family, world, heads, kv_heads, hidden, seq=SEQ):
    """Sorted (kind, bytes) of one decoder layer, from the model dims alone."""
    resid = BATCH * seq * hidden * FP32
    if strategy == "tp":
        return sorted([("all_reduce", resid)] * 2)
    if strategy == "megatron_sp":
        return sorted([("all_gather", resid)] * 2 + [("reduce_scatter", resid)] * 2)
    if strategy == "megatron_sp_tp":
        return sorted([("all_gather", resid), ("reduce_scatter", resid)])
    if strategy == "ulysses":
        d = model_dims(family, heads, kv_heads, hidden)
        local_rows = BATCH * (seq // world)
        qkv = local_rows * (d["H"] + 2 * d["Hkv"]) * d["head_dim"] * FP32
        back = local_rows * d["H"] * d["head_dim"] * FP32
        return sorted([("all_to_all", qkv), ("all_to_all", back)])
    raise AssertionError(strategy)


def by_layer(report):
    out = {}
    for row in report:
        out.setdefault(row["layer"], []).append((row["kind"], row["bytes"]))
    return {k: sorted(v) for k, v in out.items()}


#: CI's cut: Mistral and Qwen2 at world 2 only (--full: at 4 too)
CASES = [pytest.param(f, s, w, id=f"{f}-{s}-w{w}") for w in (2, 4) for s in STRATEGIES
         for f in (FAMILIES if w == 2 else full_or(("llama", "gpt2"), FAMILIES))]


@pytest.mark.parametrize("family,strategy,world", CASES)
def test_collectives_per_layer(family, strategy, world):
    shape = SHAPES[world]
    report = compile_report(family, strategy, world, **shape)
    got = by_layer(report)
    want = expected_layer(strategy, family, world, **shape)
    for layer in layer_names(family, LAYERS):
        assert got.get(layer) == want, (
            f"{layer}: got {got.get(layer)}, want {want}\nfull report:\n" + "\n".join(map(str, report)))


def expected_outside(strategy):
    """(kind, bytes) of the collectives outside the decoder layers, use_cache=False, outputs whole.

    Every strategy gathers the logits [B, S, V] (by rows under a sequence split, by vocabulary where
    the lm_head is vocab-parallel). A vocab-parallel embedding (the strategies that slice attention's
    weights) is a partial sum the first layer completes: all_reduce under tp, reduce_scatter into the
    sequence split under megatron_*; there the final norm's rows are gathered for the lm_head too."""
    logits = [("all_gather", BATCH * SEQ * VOCAB * FP32)]
    if strategy == "tp":
        return sorted(logits + [("all_reduce", BATCH * SEQ * HIDDEN * FP32)])
    if strategy.startswith("megatron"):
        return sorted(logits + [("reduce_scatter", BATCH * SEQ * HIDDEN * FP32),
                                ("all_gather", BATCH * SEQ * HIDDEN * FP32)])
    return logits


@pytest.mark.parametrize("family,strategy,world", CASES)
def test_collectives_outside_layers(family, strategy, world):
    shape = SHAPES[world]
    report = compile_report(family, strategy, world, **shape)
    layers = set(layer_names(family, LAYERS))
    outside = [r for r in report if r["layer"] not in layers]
    assert sorted((r["kind"], r["bytes"]) for r in outside) == expected_outside(strategy), outside
    assert ("lm_head", "all_gather") in {(r["layer"], r["kind"]) for r in outside}, outside     # the logits
    # and the totals: nothing hides under another layer name
    kinds = Counter(r["kind"] for r in report)
    per_layer = Counter(k for k, _ in expected_layer(strategy, family, world, **shape))
    want = Counter({k: n * LAYERS for k, n in per_layer.items()}) + Counter(k for k, _ in expected_outside(strategy))
    assert kinds == want, report


@pytest.mark.parametrize("family,strategy,world", CASES)
def test_report_rows_are_consistent(family, strategy, world):
    """Every row: fp32, bytes = prod(buffer shape) * 4; all_to_all buffers are [N, F]."""
    report = compile_report(family, strategy, world, **SHAPES[world])
    assert report, "no collectives reported"
    for row in report:
        assert set(row) >= {"layer", "kind", "dim", "shape", "dtype", "bytes", "what"}, row
        assert row["dtype"] == "float32", row
        assert row["bytes"] == math.prod(row["shape"]) * FP32, row
        if row["kind"] == "all_to_all":
            assert len(row["shape"]) == 2 and row["shape"][0] == world, row


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt2"])
def test_ulysses_moves_kv_heads_not_query_heads(family):
    """GQA with H=8, Hkv=2 at N=2: the packed q|k|v exchange pays for Hkv KV heads
    (before repeat_kv), not 3*H."""
    H, Hkv, E, N = 8, 2, HIDDEN, 2
    D = E // H
    report = compile_report(family, "ulysses", N, heads=H, kv_heads=Hkv, hidden=E)
    rows = BATCH * (SEQ // N)
    gqa_bytes = rows * (H + 2 * Hkv) * D * FP32
    mha_bytes = rows * 3 * H * D * FP32
    assert gqa_bytes != mha_bytes
    for layer in layer_names(family, LAYERS):
        a2a = sorted(r["bytes"] for r in report if r["layer"] == layer and r["kind"] == "all_to_all")
        assert a2a == sorted([gqa_bytes, rows * H * D * FP32]), (layer, a2a)
        assert mha_bytes not in a2a


@pytest.mark.parametrize("strategy", ["tp", "megatron_sp", "megatron_sp_tp"])
def test_tp_with_fewer_kv_heads_than_ranks(strategy):
    """llama H=8, Hkv=2 at world 4 (N % Hkv == 0): tensor parallelism still compiles, with the
    strategy's usual collectives and bytes (KV heads are shared, not exchanged)."""
    shape = dict(heads=8, kv_heads=2, hidden=HIDDEN)
    report = compile_report("llama", strategy, 4, **shape)
    got = by_layer(report)
    want = expected_layer(strategy, "llama", 4, **shape)
    for layer in layer_names("llama", LAYERS):
        assert got.get(layer) == want, (layer, got.get(layer), want)


def test_tp_slices_a_fused_gate_up_as_two_blocks():
    """Phi-3's MLP computes gate_up [2I, E] = [gate | up] in one projection: tp gives a rank its half of the
    gate's rows and its half of the up's (packed colwise, S(0, sf=2)), and down's matching columns; its fused
    qkv_proj ([q | k | v] of unequal sizes: fewer KV than query heads) stays whole (not built)."""
    from sp_compiler.placements import Shard, make_shard
    from sp_compiler.plan import transform

    fm = fake_model("phi3", layers=LAYERS, vocab=VOCAB, heads=4, kv_heads=2, hidden=64)
    _, ctx = transform(fm.config, strategy="tp", world=2, rank=1, batch=1, seq_len=16, model=fm)
    placed = {ctx.input_fqns[i]: (p, tuple(ctx.local_inputs[i].shape)) for i, p in ctx.sliced.items()}
    two_i = fm.config.intermediate_size * 2
    mlp = "model.layers.0.mlp."
    assert placed[mlp + "gate_up_proj.weight"] == (make_shard(0, 2), (two_i // 2, 64)), placed
    assert placed[mlp + "down_proj.weight"] == (Shard(1), (64, two_i // 4)), placed
    assert "model.layers.0.self_attn.qkv_proj.weight" not in placed, placed


def test_gpt2_ulysses_is_multi_head():
    """GPT-2 has no KV grouping: its packed exchange is exactly 3*H heads."""
    report = compile_report("gpt2", "ulysses", 2, **SHAPES[2])
    H, D = SHAPES[2]["heads"], HIDDEN // SHAPES[2]["heads"]
    qkv = BATCH * (SEQ // 2) * 3 * H * D * FP32
    assert sorted(r["bytes"] for r in report if r["layer"] == "transformer.h.0")[-1] == qkv


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_rank_builds_the_same_collectives(family, strategy):
    """Ranks that disagree on the sequence of collectives hang: rank 3 of 4 must build
    exactly what rank 0 builds (same order, kinds, shapes, bytes)."""
    keep = ("layer", "kind", "dim", "shape", "dtype", "bytes")
    r0 = [{k: r[k] for k in keep} for r in compile_report(family, strategy, 4, rank=0, **SHAPES[4])]
    r3 = [{k: r[k] for k in keep} for r in compile_report(family, strategy, 4, rank=3, **SHAPES[4])]
    assert r0 == r3


def test_report_is_of_the_last_compile_only(fake_pg):
    """``last_report`` describes the last graph compiled, not an accumulation."""
    from sp_compiler.backend import last_report

    fake_pg(2)
    ids = make_inputs("llama", BATCH, SEQ)
    compile_logits(build_model("llama", **SHAPES[2]), ids, {"strategy": "tp", "lower": "eager"})
    assert Counter(r["kind"] for r in last_report()) == {"all_reduce": 2 * LAYERS + 1, "all_gather": 1}
    torch._dynamo.reset()
    compile_logits(build_model("llama", **SHAPES[2]), ids, {"strategy": "megatron_sp_tp", "lower": "eager"})
    assert Counter(r["kind"] for r in last_report()) == {"all_gather": LAYERS + 2, "reduce_scatter": LAYERS + 1}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_prompt_length_compiles_once(fake_pg, strategy):
    """With dynamic=False every new prompt length recompiles, and the collectives scale with it."""
    from sp_compiler.backend import last_report

    fake_pg(2)
    model = build_model("llama", **SHAPES[2])
    fast = torch.compile(model, backend="seqpar", options={"strategy": strategy, "lower": "eager"}, dynamic=False)
    for seq in (16, 32, 8):
        with torch.no_grad():
            logits = fast(make_inputs("llama", BATCH, seq), use_cache=False).logits
        assert logits.shape == (BATCH, seq, VOCAB)
        got = by_layer(last_report())
        want = expected_layer(strategy, "llama", 2, seq=seq, **SHAPES[2])
        for layer in layer_names("llama", LAYERS):
            assert got.get(layer) == want, (seq, layer, got.get(layer), want)
