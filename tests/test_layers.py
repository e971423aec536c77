"""Per-layer strategies (``layers``), the layer-plan patterns, and ``strategy="auto"``.

    patterns       exact > narrowest range > longest glob; a pattern matching nothing is an error
    mixed models   against one device on 2 gloo ranks; collectives per layer as each layer's strategy says,
                   plus a resharding of the residual only where two neighbouring layers disagree
    auto           every rank makes the same choice; the choice is written to dump_dir/auto.txt
"""
from __future__ import annotations

import os

import pytest
import torch

from models import build_model, make_inputs
from sp_compiler.errors import OptionsError
from sp_compiler.strategies import LayerPlan
from sp_compiler.testing import error_text, fake_process_group, run_ranks

__all__ = []

LAYERS = 4
TOL = dict(atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- patterns

def test_most_specific_pattern_wins():
    plan = LayerPlan("ulysses", (("model.layers.*", "tp"), ("model.layers.0-7", "megatron_sp_tp"),
                                 ("model.layers.2-3", "vanilla_sp"), ("model.layers.3", "megatron_sp")))
    assert plan.strategy_name("model.layers.3") == "megatron_sp"        # exact
    assert plan.strategy_name("model.layers.2") == "vanilla_sp"         # narrowest range
    assert plan.strategy_name("model.layers.7") == "megatron_sp_tp"     # range beats glob
    assert plan.strategy_name("model.layers.8") == "tp"                 # glob
    assert plan.strategy_name("model.layers.10") == "tp"
    assert plan.strategy_name(None) == "ulysses"                        # outside the layer stack


def test_range_is_numeric_and_inclusive():
    plan = LayerPlan("ulysses", (("model.layers.2-10", "tp"),))
    assert [plan.strategy_name(f"model.layers.{i}") for i in (1, 2, 10, 11, 20)] == \
        ["ulysses", "tp", "tp", "ulysses", "ulysses"]


def test_pattern_matching_no_layer_lists_the_layers():
    plan = LayerPlan("ulysses", (("model.layer.0", "tp"),))
    with pytest.raises(OptionsError, match=r"matches no layer.*model\.layers\.0"):
        plan.check(["model.layers.0", "model.layers.1"])


def test_auto_inside_layers_is_refused():
    from sp_compiler.config import Options

    with pytest.raises(OptionsError, match="auto"):
        Options.from_dict({"layers": {"model.layers.0": "auto"}})
    with pytest.raises(OptionsError, match="zigzag"):
        Options.from_dict({"strategy": "ulysses", "layers": {"model.layers.0": "vanilla_sp_zigzag"}})


# ----------------------------------------------------------------------------- mixed models, one process

def _kinds_per_layer(report):
    out = {}
    for row in report:
        out.setdefault(row["layer"], []).append(row["kind"])
    return {k: sorted(v) for k, v in out.items()}


def test_mixed_layers_collectives_fake_pg():
    from sp_compiler.backend import last_report

    torch._dynamo.reset()
    layers = {"model.layers.0-1": "tp", "model.layers.2": "ulysses", "model.layers.3": "vanilla_sp"}
    with fake_process_group(2):
        model = build_model("llama", layers=LAYERS)
        fast = torch.compile(model, backend="seqpar",
                             options={"strategy": "ulysses", "layers": layers, "lower": "eager"})
        with torch.no_grad():
            fast(make_inputs("llama", 2, 16), use_cache=False)
        kinds = _kinds_per_layer(last_report())
    torch._dynamo.reset()
    # layer 0 (tp) after a sequence-sharded embedding (ulysses default): one gather to enter, 2 all_reduce
    assert kinds["model.layers.0"] == ["all_gather", "all_reduce", "all_reduce"]
    # layer 1 (tp) after tp: nothing to reshard
    assert kinds["model.layers.1"] == ["all_reduce", "all_reduce"]
    # layer 2 (ulysses) after tp: entering is a local slice, no collective
    assert kinds["model.layers.2"] == ["all_to_all", "all_to_all"]
    # layer 3 (vanilla) after ulysses: both Shard(seq), nothing in between
    assert kinds["model.layers.3"] == ["all_gather"]


def test_layers_pattern_error_names_the_model_layers():
    torch._dynamo.reset()
    with fake_process_group(2):
        fast = torch.compile(build_model("gpt2"), backend="seqpar",
                             options={"strategy": "tp", "layers": {"model.layers.0": "ulysses"}, "lower": "eager"})
        with pytest.raises(Exception) as info, torch.no_grad():
            fast(make_inputs("gpt2", 1, 16), use_cache=False)
    torch._dynamo.reset()
    assert "transformer.h.0" in error_text(info.value)


# ----------------------------------------------------------------------------- mixed models on gloo

MIXES = {
    "llama": ("ulysses", {"model.layers.0-1": "tp", "model.layers.2": "megatron_sp", "model.layers.3": "vanilla_sp"}),
    "qwen2": ("tp", {"model.layers.1-2": "megatron_sp_tp", "model.layers.3": "ulysses"}),
    "gpt2": ("tp", {"transformer.h.1-2": "vanilla_sp_zigzag"}),
}


def _mixed_rank(cases):
    out = {}
    for family, (strategy, layers) in cases.items():
        torch._dynamo.reset()
        model = build_model(family, layers=LAYERS)
        fast = torch.compile(model, backend="seqpar",
                             options={"strategy": strategy, "layers": layers, "lower": "aot_eager"})
        with torch.no_grad():
            out[family] = fast(make_inputs(family, 2, 16), use_cache=False).logits
    return out


def test_mixed_layers_match_one_device():
    results = run_ranks(_mixed_rank, 2, MIXES, timeout=600)
    for family in MIXES:
        model = build_model(family, layers=LAYERS)
        with torch.no_grad():
            ref = model(make_inputs(family, 2, 16), use_cache=False).logits
        for rank, res in enumerate(results):
            torch.testing.assert_close(res[family], ref, **TOL, msg=lambda m: f"{family} rank {rank}: {m}")


# ----------------------------------------------------------------------------- auto

def _auto_rank(dump_dir):
    os.environ["SEQPAR_MACHINE"] = "h100-nvlink"
    model = build_model("llama")
    fast = torch.compile(model, backend="seqpar", options={"strategy": "auto", "lower": "aot_eager",
                                                             "dump_dir": dump_dir})
    with torch.no_grad():
        logits = fast(make_inputs("llama", 2, 16), use_cache=False).logits
    from sp_compiler.backend import last_graph

    return logits, last_graph()[1].options.strategy


def test_auto_same_choice_on_every_rank_and_exact(tmp_path):
    results = run_ranks(_auto_rank, 2, str(tmp_path), timeout=600)
    model = build_model("llama")
    with torch.no_grad():
        ref = model(make_inputs("llama", 2, 16), use_cache=False).logits
    choices = {choice for _, choice in results}
    assert len(choices) == 1 and choices != {"auto"}
    for logits, _ in results:
        torch.testing.assert_close(logits, ref, **TOL)
    text = (tmp_path / "rank0" / "graph0" / "auto.txt").read_text()
    assert f"chose {choices.pop()}" in text and "predicted ms" in text
