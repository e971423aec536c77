"""Regional lowering (passes/regions.py): one lowered graph per distinct decoder layer.

    depth          the graphs lowered do not grow with the layer count; the pieces do (one per layer)
    per-layer      two strategies alternating: one more kind of layer, still flat in depth
    same answer    every gloo test of the suite runs prefills regional and decode steps whole
    inspection     dumps and last_graph() still show every layer's collectives
    warm start     Inductor's FX graph and AOTAutograd caches take seqpar's graphs (no bypass)
"""
from __future__ import annotations

import functools
import json

import pytest
import torch

from models import build_model, make_inputs
from sp_compiler import backend
from sp_compiler.testing import fake_process_group

__all__ = []


@functools.lru_cache(maxsize=None)
def _compiled_regions(layers: int, options: str, family: str) -> dict:
    """Compiled once per (layers, options) in this process: several tests read the same counts."""
    torch._dynamo.reset()
    model = build_model(family, layers=layers)
    with torch.no_grad(), fake_process_group(2, 0):
        compiled = torch.compile(model, backend="seqpar", options={"lower": "aot_eager", **json.loads(options)})
        compiled(make_inputs(family, 1, 16))
    return backend.compiled_graphs()[-1]["regions"]


def _regions(layers: int, options: dict, family: str = "llama") -> dict:
    return dict(_compiled_regions(layers, json.dumps(options, sort_keys=True), family))


@pytest.mark.parametrize("strategy", ["ulysses", "megatron_sp"])    # megatron_sp: first and last layers differ
def test_lowered_graphs_do_not_grow_with_depth(strategy):
    shallow = _regions(2, {"strategy": strategy})
    deep = _regions(6, {"strategy": strategy})
    assert deep["pieces"] == shallow["pieces"] + 4                  # one piece per layer, plus what lies between
    assert deep["lowered"] == shallow["lowered"] < deep["pieces"]


def test_two_strategies_lower_one_more_kind_of_layer():
    alternating = {"strategy": "ulysses", "layers": {"model.layers.1": "tp", "model.layers.3": "tp",
                                                     "model.layers.5": "tp"}}
    one = _regions(6, {"strategy": "ulysses"})
    four = _regions(4, {**alternating, "layers": {"model.layers.1": "tp", "model.layers.3": "tp"}})
    six = _regions(6, alternating)
    assert six["lowered"] == four["lowered"] > one["lowered"]
    assert six["pieces"] == one["pieces"]


def test_whole_graph_lowering_is_one_graph():
    assert _regions(4, {"strategy": "ulysses", "regional": "none"}) == {}


def test_decode_steps_are_lowered_whole_unless_all():
    """A decode step pays about 0.2 ms per lowered piece per token: by default only prefills are cut."""
    for regional, decode_pieces in (("prefill", set()), ("all", {4})):
        torch._dynamo.reset()
        model = build_model("llama", layers=2)
        before = backend.compile_count()
        with torch.no_grad(), fake_process_group(2, 0):
            model.compile(backend="seqpar", options={"strategy": "ulysses", "lower": "aot_eager", "regional": regional})
            model.generate(make_inputs("llama", 1, 8), max_new_tokens=3, do_sample=False)
        graphs = backend.compiled_graphs()[-(backend.compile_count() - before):]
        assert graphs[0]["regions"] == {"pieces": 4, "lowered": 3}                # the prefill
        assert len(graphs) > 1 and {g["regions"].get("pieces") for g in graphs[1:]} == (decode_pieces or {None})


def test_dump_names_each_pieces_lowering(tmp_path):
    torch._dynamo.reset()
    with torch.no_grad(), fake_process_group(2, 0):
        torch.compile(build_model("llama", layers=3), backend="seqpar",
                      options={"strategy": "ulysses", "lower": "aot_eager", "dump_dir": str(tmp_path)})(
            make_inputs("llama", 1, 8))
    (text,) = [p.read_text() for p in tmp_path.rglob("regions.txt")]
    lines = text.splitlines()
    assert lines[0] == "piece 0: -, lowering 0" and lines[-1] == "piece 4: -, lowering 2"
    assert lines[1:4] == [f"piece {i + 1}: model.layers.{i}, lowering 1" for i in range(3)]


def test_last_graph_keeps_every_layer():
    _compiled_regions.cache_clear()
    _regions(4, {"strategy": "ulysses"})
    gm, ctx = backend.last_graph()
    layers = {r["layer"] for r in ctx.collectives if r.get("layer", "").startswith("model.layers.")}
    assert layers == {f"model.layers.{i}" for i in range(4)}
    assert sum(n.target is torch.ops._c10d_functional.all_to_all_single.default for n in gm.graph.nodes) == 4 * 2


def test_inductor_caches_take_seqpar_graphs(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_FORCE_DISABLE_CACHES", raising=False)
    counters.clear()
    for _ in range(2):                       # the second compile finds the first one's graphs on disk
        torch._dynamo.reset()
        model = build_model("llama", layers=2)
        with torch.no_grad(), fake_process_group(2, 0):
            torch.compile(model, backend="seqpar", options={"strategy": "ulysses", "regional": "none"})(
                make_inputs("llama", 1, 8))                     # one graph: the caches' verdict is per graph
    inductor = counters["inductor"]
    assert inductor["fxgraph_cache_bypass"] == 0 and counters["aot_autograd"]["autograd_cache_bypass"] == 0
    assert counters["aot_autograd"]["autograd_cache_hit"] == 1
