"""Prompts of 1 to 2N+1 tokens on 2 and 4 gloo ranks, against the uncompiled model.

Below N tokens (2N under zig-zag) a sequence split would leave ranks with no rows, and an attention
kernel fed an empty shard dies (SIGFPE on CPU). Such a call runs ``strategies.short_strategy``: the
residual stream stays whole; from N (2N) tokens on, every rank holds at least one row. Tested here,
with HF's default call at every length from 1 to 2N+1 (one compiled model per strategy,
``buckets="exact"``: each length its own graph):

    the logits and the KV cache equal one device's            every strategy on 2 ranks (CI: every one
                                                              that splits the sequence); on 4 ranks
                                                              zig-zag (--full: a heads, a rows and a
                                                              TP+SP layout)
    no attention node of the rank's local graph has an        every graph compiled above, every rank
    empty input
    a generation from a 1-token prompt (``outputs="local"``:  a heads, a rows and a TP layout on 2
    ranks start with no cached row)                           ranks; zig-zag on 4 (--full: ulysses too)
"""
from __future__ import annotations

import pytest
import torch

from models import build_model, make_inputs
from seqpar_testing import cached_run, full_or
from sp_compiler.strategies import STRATEGIES
from sp_compiler.testing import run_ranks

MODEL = dict(layers=1, heads=4, kv_heads=2, hidden=64)      # one layer: what a short call does is per layer
TOL = dict(atol=1e-5, rtol=1e-5)
#: world -> (strategies called at every length, strategies that also generate from 1 token)
#: (CI's cut: every strategy that splits the sequence on 2 ranks (tp never does: its 1-token call is the
#: generation below); generations from 1 token under zig-zag and tp (--full: ulysses too); 4 ranks for zig-zag,
#: the layout that splits a short prompt most finely (2N chunks), and one generation there; --full: ulysses and
#: megatron_sp_tp at 4 ranks too)
PLAN = {2: (full_or(tuple(s for s in STRATEGIES if STRATEGIES[s].seq_sharded), tuple(STRATEGIES)),
            full_or(("vanilla_sp_zigzag", "tp"), ("ulysses", "vanilla_sp_zigzag", "tp"))),
        4: (full_or(("vanilla_sp_zigzag",), ("ulysses", "vanilla_sp_zigzag", "megatron_sp_tp")),
            full_or(("vanilla_sp_zigzag",), ("ulysses", "vanilla_sp_zigzag")))}

pytestmark = pytest.mark.usefixtures("dynamo_reset")


def _lengths(world):
    return range(1, 2 * world + 2)


def _call(model, S):
    with torch.no_grad():
        out = model(make_inputs("llama", 1, S))
    return out.logits, [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]


def _generate(model, S):
    with torch.no_grad():
        return model.generate(make_inputs("llama", 1, S), max_new_tokens=4, do_sample=False)


def _empty_attention_inputs(gm) -> list:
    """'node input [shape]' for every empty input of an attention node of the local graph."""
    from sp_compiler import sdpa

    return [f"{n.name} {x.name} {tuple(x.meta['val'].shape)}" for n in gm.graph.nodes if sdpa.is_attention(n)
            for x in n.all_input_nodes if isinstance(x.meta.get("val"), torch.Tensor) and x.meta["val"].numel() == 0]


def _body(world):
    from sp_compiler.backend import last_graph

    every, generate = PLAN[world]
    out = {}
    for strategy in every:
        torch._dynamo.reset()
        model = build_model("llama", **MODEL)
        fast = torch.compile(model, backend="seqpar", options={"strategy": strategy, "lower": "eager",
                                                               "buckets": "exact"})
        for S in _lengths(world):
            out[(strategy, S)] = _call(fast, S) + (_empty_attention_inputs(last_graph()[0]),)
        if strategy in generate:
            torch._dynamo.reset()
            model.compile(backend="seqpar", options={"strategy": strategy, "lower": "eager", "outputs": "local"})
            out[(strategy, "generate")] = _generate(model, 1)
    return out


CASES = [(w, s) for w, (every, _) in PLAN.items() for s in every]


@pytest.mark.parametrize("world,strategy", CASES, ids=lambda v: f"w{v}" if isinstance(v, int) else v)
def test_every_length_from_one_token(world, strategy):
    results = cached_run(("short", world), run_ranks, _body, world, world, timeout=1200)
    model = build_model("llama", **MODEL)
    for S in _lengths(world):
        want_logits, want_kv = _call(model, S)
        for rank, res in enumerate(results):
            logits, kv, empty = res[(strategy, S)]
            assert not empty, f"S={S} rank {rank}: attention inputs with no rows: {empty}"
            torch.testing.assert_close(logits, want_logits, **TOL, msg=lambda m: f"S={S} rank {rank}: {m}")
            for a, b in zip(kv, want_kv):
                torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"S={S} rank {rank} cache: {m}")
    if strategy not in PLAN[world][1]:
        return
    want = _generate(model, 1)
    for rank, res in enumerate(results):
        assert torch.equal(res[(strategy, "generate")], want), f"rank {rank}: generation from one token"
