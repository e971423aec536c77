"""The cost model: ring factors, roofline per node, fusion, layer extrapolation, profiles, calibration."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from models import build_config
from sp_compiler.cost_model import (
    PROFILES, MachineProfile, ProfileError, calibrate, collective_time, fit_latency_bw, fusion_groups,
    get_profile, is_decoder_layer, layer_costs, load_calibration, node_bytes, node_flops, node_layers, predict,
)
from sp_compiler.plan import build_fake_model, transform

__all__ = []

UNIT = MachineProfile("unit", link_bw=1e9, link_latency_s=0.0, peak_flops=1e12, mem_bw=1e11, dtype="float32")


def _calls(gm, name):
    return [n for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target)]


# ----------------------------------------------------------------------------- communication

def test_ring_factors():
    n, nbytes = 8, 1 << 20
    ag = collective_time("all_gather", nbytes, n, UNIT)
    assert ag == pytest.approx(nbytes * 7 / 8 / 1e9)
    assert collective_time("reduce_scatter", nbytes, n, UNIT) == pytest.approx(ag)
    assert collective_time("all_to_all", nbytes, n, UNIT) == pytest.approx(ag)
    assert collective_time("all_reduce", nbytes, n, UNIT) == pytest.approx(2 * ag)
    lat = MachineProfile("lat", 1e9, 15e-6, 1e12, 1e11)
    assert collective_time("all_reduce", 0, n, lat) == pytest.approx(15e-6)
    assert collective_time("all_reduce", nbytes, 1, lat) == 0.0
    with pytest.raises(ProfileError, match="all_reduce"):
        collective_time("broadcast", nbytes, n, UNIT)


def test_fit_recovers_latency_and_bandwidth():
    samples = [(x, 50e-6 + x / 2e9) for x in (1e3, 1e5, 1e6, 1e7, 1e8)]
    lat, bw = fit_latency_bw(samples)
    assert lat == pytest.approx(50e-6, rel=1e-6) and bw == pytest.approx(2e9, rel=1e-6)
    with pytest.raises(ProfileError):
        fit_latency_bw([(1.0, 1.0)])


# ----------------------------------------------------------------------------- compute per node

def test_mm_flops_and_bytes():
    gm = make_fx(lambda a, b: torch.mm(a, b), tracing_mode="fake")(torch.randn(8, 16), torch.randn(16, 32))
    (mm,) = _calls(gm, "mm")
    assert node_flops(mm) == 2 * 8 * 16 * 32
    assert node_bytes(mm) == (8 * 16 + 16 * 32 + 8 * 32) * 4
    assert node_bytes(mm, scale=0.5) == (8 * 16 + 16 * 32 + 8 * 32) * 2       # fp32 graph priced as bf16


def test_bmm_flops():
    gm = make_fx(lambda a, b: torch.bmm(a, b), tracing_mode="fake")(torch.randn(3, 8, 16), torch.randn(3, 16, 4))
    assert node_flops(_calls(gm, "bmm")[0]) == 2 * 3 * 8 * 16 * 4


@pytest.mark.parametrize("causal", [True, False])
def test_attention_flops(causal):
    B, H, S, D = 1, 4, 64, 16
    q = torch.randn(B, H, S, D)
    gm = make_fx(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                 tracing_mode="fake")(q, q, q)
    (att,) = [n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert node_flops(att) == 4 * B * H * S * S * D * (0.5 if causal else 1.0)


def test_views_are_free_and_gathers_read_rows():
    def f(w, idx, x):
        e = torch.embedding(w, idx)
        return e.view(-1), x.t() + 1

    gm = make_fx(f, tracing_mode="fake")(torch.randn(1000, 8), torch.zeros(4, dtype=torch.long), torch.randn(5, 6))
    assert node_bytes(_calls(gm, "view")[0]) == 0
    assert node_bytes(_calls(gm, "aten.t")[0]) == 0
    assert node_bytes(_calls(gm, "embedding")[0]) == 2 * 4 * 8 * 4 + 4 * 8        # rows in + out + indices
    assert node_bytes(_calls(gm, "add")[0]) == 2 * 5 * 6 * 4


def test_fusion_prices_a_pointwise_chain_once():
    gm = make_fx(lambda x, w: torch.mm(torch.exp(x * 2 + 1), w), tracing_mode="fake")(
        torch.randn(64, 64), torch.randn(64, 64))
    groups = fusion_groups(gm)
    assert len(groups) == 1
    t = 64 * 64 * 4
    assert groups[0][1] == 2 * t                                          # read x, write exp(...)
    unfused = sum(node_bytes(n) for n in gm.graph.nodes if n.op == "call_function" and "mm" not in str(n.target))
    assert unfused == 6 * t


# ----------------------------------------------------------------------------- whole graphs

@pytest.fixture(scope="module")
def tiny():
    """A 2-layer tiny llama and its fake model, shared by the graph tests."""
    cfg = build_config("llama", layers=2, heads=4, kv_heads=2, hidden=64)
    return cfg, build_fake_model(cfg, layers=2)


def test_every_node_lands_in_a_layer(tiny):
    cfg, fm = tiny
    gm, ctx = transform(cfg, strategy="ulysses", world=2, seq_len=64, model=fm)
    costs = layer_costs(gm, ctx, UNIT)
    assert "<top level>" not in costs
    assert sorted(c for c in costs if is_decoder_layer(c)) == ["model.layers.0", "model.layers.1"]
    assert costs["model.layers.1"].collectives == {"all_to_all": 2}


def test_prediction_extrapolates_the_steady_layer(tiny):
    cfg, fm = tiny
    gm, ctx = transform(cfg, strategy="megatron_sp_tp", world=2, seq_len=64, model=fm)
    p2, p12 = predict(gm, ctx, UNIT, 2), predict(gm, ctx, UNIT, 12)
    steady = p2.comm_s_per_layer + p2.compute_s_per_layer
    assert p12.total_s - p2.total_s == pytest.approx(10 * steady)
    assert p2.collectives == "1 all_gather, 1 reduce_scatter"


def test_bytes_follow_the_machine_dtype(tiny):
    cfg, fm = tiny
    gm, ctx = transform(cfg, strategy="tp", world=2, seq_len=64, model=fm)          # built in fp32
    bf16 = MachineProfile("bf16", 1e9, 0.0, 1e12, 1e11, dtype="bfloat16")
    rows = sum(r["bytes"] for r in ctx.collectives if r["layer"] == "model.layers.0")
    assert predict(gm, ctx, UNIT, 2).comm_bytes_per_layer == rows
    assert predict(gm, ctx, bf16, 2).comm_bytes_per_layer == rows / 2


def test_faster_memory_never_predicts_slower(tiny):
    cfg, fm = tiny
    gm, ctx = transform(cfg, strategy="ulysses", world=2, seq_len=64, model=fm)
    h100, h200 = predict(gm, ctx, "h100-nvlink", 32), predict(gm, ctx, "h200-nvlink", 32)
    assert h200.total_s < h100.total_s and h200.comm_s_per_layer == h100.comm_s_per_layer


@pytest.mark.parametrize("zigzag", [False, True])
def test_rows_attention_flops_match_the_engines_work(tiny, zigzag):
    """vanilla_sp: attention FLOPs per rank = 4 B H D x the causal score entries the engine reports
    (its diagonal blocks count C(C+1)/2, the model C^2/2)."""
    cfg, fm = tiny
    world, S, H, D = 2, 64, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    strategy = "vanilla_sp_zigzag" if zigzag else "vanilla_sp"
    for rank in range(world):
        gm, ctx = transform(cfg, strategy=strategy, world=world, rank=rank, seq_len=S, model=fm)
        layer = node_layers(gm)                          # the engine's chunked attention has no module
        flops = sum(node_flops(n, zigzag) for n, name in layer.items()
                    if "scaled_dot_product" in str(n.target) and name == "model.layers.0")
        work = ctx.attention_work["per_rank"][rank]
        assert flops == pytest.approx(4 * H * D * work, rel=0.1), (rank, flops, work)


# ----------------------------------------------------------------------------- profiles

def test_profiles():
    assert {"h100-nvlink", "h200-nvlink", "a100-nvlink"} <= set(PROFILES)
    h100 = get_profile("h100-nvlink")
    assert h100.peak_flops == pytest.approx(989e12) and h100.dtype == "bfloat16"
    assert get_profile("h200-nvlink").mem_bw > h100.mem_bw
    assert get_profile(h100) is h100
    with pytest.raises(ProfileError, match="h100-nvlink"):
        get_profile("tpu-v9")


def test_cpu_profile_loads_the_saved_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQPAR_CACHE", str(tmp_path))
    saved = dict(name="cpu-gloo", link_bw=1e9, link_latency_s=1e-4, peak_flops=5e10, mem_bw=2e10, dtype="float32",
                 samples=[[1, 2]])
    (tmp_path / "cpu-gloo.json").write_text(json.dumps(saved))
    prof = get_profile("cpu-gloo")
    assert prof.link_bw == 1e9 and prof.dtype == "float32"
    assert load_calibration(str(tmp_path / "missing.json")) is None


def test_calibrate_measures_this_machine(tmp_path):
    path = tmp_path / "cal.json"
    prof = calibrate(str(path), world=2, sizes=(1 << 12, 1 << 16, 1 << 18))
    assert prof.name == "cpu-gloo" and prof.dtype == "float32"
    assert prof.link_bw > 0 and math.isfinite(prof.link_latency_s)
    assert prof.peak_flops > 1e8 and prof.mem_bw > 1e8
    assert load_calibration(str(path)) == prof


def test_live_bytes_by_hand():
    """x = a @ w [100, 50] fp32, y = its view, z = sigmoid(y), z.sum(): x and z are alive at the sigmoid
    (the view shares x's storage and keeps it alive until then), z and the sum at the end; the inputs
    are never counted."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from sp_compiler.cost_model import live_bytes

    def f(a, w):
        return torch.sigmoid((a @ w).view(-1)).sum()

    args = (torch.randn(100, 10), torch.randn(10, 50))
    gm = make_fx(f)(*args)
    FakeTensorProp(gm).propagate(*args)
    live = dict(zip([n.target.__name__ if callable(n.target) else n.target for n in gm.graph.nodes],
                    live_bytes(gm)))
    x = 100 * 50 * 4
    assert live["mm.default"] == x and live["view.default"] == x
    assert live["sigmoid.default"] == 2 * x and live["sum.default"] == x + 4
    assert live_bytes(gm)[-1] == 4                                  # the output: only the sum
    assert max(live_bytes(gm, scale=0.5)) == x                      # priced in a dtype of half the bytes
