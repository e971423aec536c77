"""``passes/one_in_flight``: on gloo each collective is waited for before the next one is issued.

A hand-built graph with two collectives in flight (what insert_collectives makes: issue early,
wait late) on a fake group; the pass moves each ``wait_tensor`` up to its collective and leaves the
graph's values alone. ``test_numerics_gloo`` checks the real graphs on gloo ranks.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx

from passes.one_in_flight import most_in_flight, one_in_flight
from sp_compiler.testing import fake_process_group

__all__ = []

c10d = torch.ops._c10d_functional
aten = torch.ops.aten
WORLD = 2


def _overlapping_graph(group: str) -> fx.GraphModule:
    """x -> c1 = all_gather(x), c2 = all_to_all(2x), y = x + 1, then both waits, then their uses."""
    g = fx.Graph()
    x = g.placeholder("x")
    c1 = g.call_function(c10d.all_gather_into_tensor.default, (x, WORLD, group))
    c2 = g.call_function(c10d.all_to_all_single.default,
                         (g.call_function(aten.mul.Tensor, (x, 2.0)), [2, 2], [2, 2], group))
    y = g.call_function(aten.add.Tensor, (x, 1.0))
    w1 = g.call_function(c10d.wait_tensor.default, (c1,))
    w2 = g.call_function(c10d.wait_tensor.default, (c2,))
    g.output((g.call_function(aten.sum.default, (w1,)), g.call_function(aten.sum.default, (w2,)), y))
    return fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("gloo", [True, False])
def test_waits_move_up_on_gloo_only(gloo):
    with fake_process_group(WORLD, 0):
        gm = _overlapping_graph(dist.group.WORLD.group_name)
        before = [n.name for n in gm.graph.nodes]
        assert most_in_flight(gm.graph) == 2
        gm = one_in_flight(gm, SimpleNamespace(one_in_flight=gloo))
        gm.graph.lint()
        order = [n.name for n in gm.graph.nodes]
        assert sorted(order) == sorted(before)                       # moved, never added or dropped
        if not gloo:
            assert order == before and most_in_flight(gm.graph) == 2
            return
        assert most_in_flight(gm.graph) == 1
        for n in gm.graph.nodes:
            if n.target is c10d.wait_tensor.default:
                assert n.prev is n.args[0], order                   # right after its own collective
        out = gm(torch.ones(4, 3))                                   # still runs; y is untouched
        assert torch.equal(out[2], torch.full((4, 3), 2.0))


def test_the_default_call_overlaps_off_gloo():
    """HF's default call (``use_cache=True``) on a fake group (as on NCCL): the KV cache's gathers are
    issued early and waited for at the output, so several collectives are in flight at once. That is
    the graph gloo crashed on; there the pass leaves one."""
    import copy

    from models import build_model, make_inputs
    from sp_compiler.backend import last_graph

    torch._dynamo.reset()
    try:
        with fake_process_group(WORLD, 0):
            model = build_model("llama", layers=2, vocab=128)
            with torch.no_grad():
                torch.compile(model, backend="seqpar", options={"strategy": "ulysses", "lower": "eager"})(
                    make_inputs("llama", 1, 16))
            gm, ctx = last_graph()
            assert not ctx.one_in_flight and most_in_flight(gm.graph) > 1
            gm = one_in_flight(copy.deepcopy(gm), SimpleNamespace(one_in_flight=True))
            assert most_in_flight(gm.graph) == 1
    finally:
        torch._dynamo.reset()
