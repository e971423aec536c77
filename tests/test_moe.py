"""Mixture-of-experts models: each rank routes its own tokens (a token-local region, ``rules.token_local_rule``).

    collectives      fake process group, every strategy: an MoE layer moves what its attention moves and
                     nothing more (no collective inside the block: router, top-k, sort, histogram and the
                     grouped expert matmuls run on the rank's own tokens, whole expert weights)
    where tokens go  rank 1's transformed graph: the router, the routed copies and the grouped matmuls
                     hold that rank's tokens only (L rows, never S), and arange of the routed copies is
                     made at the local count; the cost model prices the grouped matmuls on those rows,
                     and ``seqpar plan`` prices Qwen3-30B-A3B on 8 ranks
    numerics         2 gloo ranks, HF's default call (use_cache=True), 13 tokens (no world size divides
                     them) on a batch of 2, against the uncompiled model: Mixtral under every strategy;
                     Qwen3-MoE, Qwen2-MoE (a shared expert), OLMoE and DeepSeek-V3 (MLA attention, a dense
                     first layer, group-limited routing) under one to three (``CI_STRATEGIES``; --full:
                     every family under every strategy, and 4 ranks); a left-padded batch and a greedy
                     generation on Mixtral, a sampled one on Qwen3-MoE (every rank draws the same
                     tokens). The uneven and zig-zag token counts of 3 and 4 ranks are checked by brute
                     force in tests/unit/test_token_local.py
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from models import MOE_FAMILIES, build_model, make_inputs
from seqpar_testing import cached_run, fake_model, full_or, padded_mask, world_cases
from sp_compiler.strategies import STRATEGIES
from sp_compiler.testing import run_ranks

__all__ = []

ALL = tuple(STRATEGIES)
TOL = dict(atol=1e-5, rtol=1e-5)
B, S = 2, 13
#: one MoE layer is enough for what the block does; DeepSeek-V3's first layer is dense, its second MoE
LAYERS = {"deepseek_v3": 2}

pytestmark = pytest.mark.usefixtures("dynamo_reset")


def _model(family):
    return build_model(family, layers=LAYERS.get(family, 1))


# ----------------------------------------------------------------------------- one process

#: collectives per MoE layer with use_cache=False: the attention's, from the strategy table (README,
#: Strategies); the MLP of a dense layer adds its own under tp and megatron_sp, an MoE block none
PER_MOE_LAYER = {
    "tp": {"all_reduce": 1},
    "megatron_sp": {"all_gather": 1, "reduce_scatter": 1},
    "megatron_sp_tp": {"all_gather": 1, "reduce_scatter": 1},
    "ulysses": {"all_to_all": 2},
    "vanilla_sp": {"all_gather": 1},
    "vanilla_sp_zigzag": {"all_gather": 1},
}


def _transform(family, strategy, rank=0, world=2):
    from sp_compiler.backend import last_report
    from sp_compiler.plan import transform

    fm = fake_model(family, layers=2)
    gm, ctx = transform(fm.config, strategy=strategy, world=world, rank=rank, batch=B, seq_len=S, model=fm)
    return gm, ctx, last_report()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("strategy", ALL)
def test_an_moe_layer_moves_only_what_its_attention_moves(strategy, family):
    _, _, report = _transform(family, strategy)
    for layer in ("model.layers.0", "model.layers.1"):
        kinds = Counter(r["kind"] for r in report if r["layer"] == layer)
        assert kinds == PER_MOE_LAYER[strategy], (layer, kinds, report)


@pytest.mark.parametrize("strategy", [s for s in ALL if STRATEGIES[s].seq_sharded])
def test_the_block_holds_the_ranks_own_tokens(strategy):
    """Rank 1 of 2, 13 tokens of a batch of 2: the router logits, the k=2 routed copies and their
    positions (arange) hold B*L and B*L*k rows, L the rank's rows, never the global B*S."""
    from sp_compiler.errors import module_path
    from sp_compiler.placements import Layout

    gm, ctx, _ = _transform("mixtral", strategy, rank=1)
    L = Layout(S, 2, STRATEGIES[strategy].zigzag).local_size(1)
    block = [n for n in gm.graph.nodes if module_path(n).startswith("model.layers.0.mlp")]
    rows = {int(n.meta["val"].shape[0]) for n in block
            if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() >= 1}
    assert B * L in rows and B * L * 2 in rows, sorted(rows)
    assert not rows & {B * S, B * S * 2}, f"a tensor of the global token count in the block: {sorted(rows)}"
    aranges = [n for n in block if n.target == torch.ops.aten.arange.default]
    assert aranges and all(n.args[0] == B * L * 2 for n in aranges), [n.args for n in aranges]


def test_the_cost_model_prices_the_experts_matmuls():
    """Rank 0 of 2 holds 7 of the 13 rows: under ulysses its grouped expert matmuls see B*7*k routed
    rows, under tp all B*13*k (every rank runs the whole block), each row through H -> 2I -> H."""
    from sp_compiler.cost_model import node_flops

    H, I, k = 64, 128, 2                                   # tests/models.py: hidden 64, intermediate 2*hidden
    for strategy, rows in (("tp", S), ("ulysses", 7)):
        gm, _, _ = _transform("mixtral", strategy)
        grouped = [n for n in gm.graph.nodes if "grouped_mm" in str(n.target)]
        assert len(grouped) == 2 * 2, grouped                   # gate_up and down, 2 layers
        want = 2 * (2.0 * B * rows * k * H * 2 * I + 2.0 * B * rows * k * I * H)
        assert sum(node_flops(n) for n in grouped) == want, strategy


def test_plan_prices_qwen3_moe_on_8_ranks():
    """``seqpar plan`` for Qwen3-30B-A3B (48 MoE layers, 128 experts, 8 per token) on 8 H100s: every strategy
    runs, MoE layers move only the attention's collectives, and tp's compute per layer exceeds a sequence
    layout's: every tp rank routes all the tokens through the experts, a sequence-split rank 1/8 of them."""
    from sp_compiler.plan import _truncated, plan
    from sp_compiler.presets import load_config

    preds = {p.strategy: p for p in plan(load_config("qwen3-30b-a3b"), world=8, seq_len=4096)}
    assert all(p.ok for p in preds.values()), {k: p.error for k, p in preds.items()}
    assert preds["tp"].collectives == "1 all_reduce" and preds["ulysses"].collectives == "2 all_to_all"
    assert preds["tp"].compute_s_per_layer > preds["ulysses"].compute_s_per_layer   # (both read every expert)
    assert _truncated(load_config("deepseek-v3"), 2).first_k_dense_replace == 1   # the repeated layer is MoE


# ----------------------------------------------------------------------------- gloo ranks

#: family -> the strategies CI's cut runs it under (--full: every strategy): MLA under a heads, a rows and
#: the TP layout; the shared expert beside a TP attention; the others once, by heads or by rows
CI_STRATEGIES = {"qwen3_moe": ("vanilla_sp_zigzag",), "qwen2_moe": ("megatron_sp",), "olmoe": ("ulysses",),
                 "deepseek_v3": ("ulysses", "vanilla_sp", "tp")}

#: world -> [(family, strategy, call)]
CASES = {
    2: [("mixtral", s, "default") for s in ALL]
    + [(f, s, "default") for f in MOE_FAMILIES if f != "mixtral" for s in full_or(CI_STRATEGIES[f], ALL)]
    + [("mixtral", "megatron_sp_tp", "padded"), ("mixtral", "ulysses", "generate"),
       ("qwen3_moe", "vanilla_sp_zigzag", "sample")],
    4: full_or([], [("mixtral", "vanilla_sp_zigzag", "default"), ("deepseek_v3", "ulysses", "default")]),
}


GENERATE = ("generate", "sample")                     # greedy; sampled (top-k 20, one seed on every rank)


def _call(model, family, call):
    with torch.no_grad():
        if call in GENERATE:
            torch.manual_seed(7)                                  # the same seed on every rank
            return model.generate(make_inputs(family, 1, S), max_new_tokens=4, do_sample=call == "sample",
                                  top_k=20)
        if call == "padded":
            return model(make_inputs(family, B, S), attention_mask=padded_mask(B, S), logits_to_keep=1).logits
        return model(make_inputs(family, B, S)).logits


def _rank_body(world):
    out = {}
    for family, strategy, call in CASES[world]:
        torch._dynamo.reset()
        model = _model(family)
        opts = {"strategy": strategy, "lower": "aot_eager" if (family, call) == ("mixtral", "default") else "eager"}
        if call in GENERATE:                                    # model.compile, as a server would
            model.compile(backend="seqpar", options={**opts, "outputs": "local"})
            fast = model
        else:
            fast = torch.compile(model, backend="seqpar", options=opts)
        out[(family, strategy, call)] = _call(fast, family, call)
    return out


@pytest.mark.parametrize(**world_cases(CASES))
def test_moe_matches_one_device(world, case):
    family, strategy, call = case
    results = cached_run(("moe", world), run_ranks, _rank_body, world, world, timeout=1200)
    want = _call(_model(family), family, call)
    for rank, res in enumerate(results):
        got = res[case]
        if call in GENERATE:
            assert torch.equal(got, want), (rank, got, want)
        else:
            torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"rank {rank}: {m}")
