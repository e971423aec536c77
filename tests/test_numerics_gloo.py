"""Tier 2: compiled outputs on every gloo rank == the uncompiled model on one process.

For each (strategy, world) ONE ``run_ranks`` call compiles every model family in turn
(``torch._dynamo.reset()`` between) and hands back each rank's logits, so process start-up
and imports are paid once per group; results are cached for the module and each
(family, strategy, world) is its own test. References are computed in the test process.

    strategies  tp, ulysses, megatron_sp, megatron_sp_tp
    worlds      2; 4 for ulysses (--full: 4 for every strategy, and 1 for ulysses)
                (heads=8, kv_heads=4, hidden=128: every world divides)
    families    world 2: gpt2, and llama through its attention_mask case; world 4: llama
                (--full: llama and gpt2 everywhere, mistral and qwen2 too)
    lower       aot_eager (CI: eager at world 4); plus Inductor end to end for ulysses (--full: megatron_sp_tp too; llama, world 2)
    extras      attention_mask of ones (llama; --full: gpt2 too; world 2): HF then builds an input-dependent mask;
                fewer KV heads than ranks (llama Hkv=2, H=4; --full: and H=8; at world 4);
                --full: batch 1 (llama, world 2), which CI runs in test_prefill_calls under every strategy
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from models import FAMILIES, build_model, make_inputs
from seqpar_testing import FULL, cached_run, full_or
from sp_compiler.testing import run_ranks

__all__ = []

STRATEGIES = ("tp", "ulysses", "megatron_sp", "megatron_sp_tp")
WORLDS = (1, 2, 4)
BATCH, SEQ, LAYERS = 2, 16, 2
SHAPE = dict(heads=8, kv_heads=4, hidden=128)
MASKED_FAMILIES = full_or(("llama",), ("llama", "gpt2"))
#: fewer KV heads than ranks at world 4 (Hkv = 2 < 4): ulysses cannot split the KV heads 4 ways,
#: TP strategies share each KV head between 2 ranks
FEW_KV = {"llama-h4-kv2": dict(heads=4, kv_heads=2, hidden=128),
          **full_or({}, {"llama-h8-kv2": dict(heads=8, kv_heads=2, hidden=128)})}
#: one KV head (multi-query) at world 2 under the TP layouts: each rank's k/v weights are that head's (widened,
#: passes/share_kv_heads), and the views that split heads ([B, S, 1, D]) must keep D, not become N*D
MQA = dict(heads=8, kv_heads=1, hidden=128)
TP_LAYOUTS = ("tp", "megatron_sp", "megatron_sp_tp")
TOL = dict(atol=1e-5, rtol=1e-5)
TIMEOUT = 600

pytestmark = pytest.mark.usefixtures("dynamo_reset")

#: collectives per compiled graph of a 2-layer model (README, Strategies), for world > 1
#: per forward: the layers' collectives (README, Strategies), the logits' gather (by rows, or by vocabulary
#: from a vocab-parallel lm_head), and where the embedding is vocab-parallel its completion (all_reduce /
#: reduce_scatter) and, under megatron_*, the final norm's rows gathered for the lm_head
EXPECTED_KINDS = {
    "tp": {"all_reduce": 2 * LAYERS + 1, "all_gather": 1},
    "ulysses": {"all_to_all": 2 * LAYERS, "all_gather": 1},
    "megatron_sp": {"all_gather": 2 * LAYERS + 2, "reduce_scatter": 2 * LAYERS + 1},
    "megatron_sp_tp": {"all_gather": LAYERS + 2, "reduce_scatter": LAYERS + 1},
}


# ----------------------------------------------------------------------------- in the ranks

def _compile_cases(strategy: str, lower: str, cases: list) -> dict:
    """Rank body. ``cases`` = [(key, family, model kwargs, masked[, batch])] -> {key: (logits, kinds,
    the most collectives the graph has in flight at once)}."""
    from passes.one_in_flight import most_in_flight
    from sp_compiler.backend import last_graph, last_report

    out = {}
    for key, family, model_kw, masked, *batch in cases:
        torch._dynamo.reset()
        model = build_model(family, layers=LAYERS, **model_kw)
        ids = make_inputs(family, batch[0] if batch else BATCH, SEQ)
        call_kw = {"attention_mask": torch.ones_like(ids)} if masked else {}
        fast = torch.compile(model, backend="seqpar", options={"strategy": strategy, "lower": lower})
        with torch.no_grad():
            logits = fast(ids, use_cache=False, **call_kw).logits
        out[key] = (logits.detach().clone(), dict(Counter(r["kind"] for r in last_report())),
                    most_in_flight(last_graph()[0].graph))
    torch._dynamo.reset()
    return out


# ----------------------------------------------------------------------------- in the test process

_refs: dict = {}


def _cases_for(strategy, world):
    cases = [((family, False), family, SHAPE, False) for family in families_at(world)]
    if world == 2:
        cases += [((family, True), family, SHAPE, True) for family in MASKED_FAMILIES]
        cases += [(("llama-mqa", False), "llama", MQA, False)] if strategy in TP_LAYOUTS else []
        cases += [(("llama-b1", False), "llama", SHAPE, False, 1)] if FULL else []
    if world == 4:
        cases += [((name, False), "llama", kw, False) for name, kw in FEW_KV.items()]
    return cases


def group_results(strategy: str, world: int, lower: str = "", cases=None):
    """Per-rank {key: (logits, kinds, in flight)} of one run_ranks call; failures are cached too, so a
    broken group costs one run, not one per test. ``lower`` defaults to aot_eager (CI's cut: eager at
    world 4, where 4 ranks share 2 cores; the lowering does not depend on the world size)."""
    lower = lower or ("eager" if world == 4 and not FULL else "aot_eager")
    cases = cases if cases is not None else _cases_for(strategy, world)
    gkey = (strategy, world, lower, tuple(c[0] for c in cases))
    return cached_run(("numerics",) + gkey, run_ranks, _compile_cases, world, strategy, lower, cases,
                      timeout=TIMEOUT)


def reference(family: str, masked: bool = False, model_kw=None, batch: int = BATCH) -> torch.Tensor:
    model_kw = model_kw or SHAPE
    key = (family, masked, tuple(sorted(model_kw.items())), batch)
    if key not in _refs:
        model = build_model(family, layers=LAYERS, **model_kw)
        ids = make_inputs(family, batch, SEQ)
        call_kw = {"attention_mask": torch.ones_like(ids)} if masked else {}
        with torch.no_grad():
            _refs[key] = model(ids, use_cache=False, **call_kw).logits
    return _refs[key]


def check_every_rank(results, key, ref):
    assert len(results) >= 1
    for rank, per_rank in enumerate(results):
        got = per_rank[key][0]
        assert got.shape == ref.shape and got.dtype == torch.float32, (rank, got.shape, got.dtype)
        torch.testing.assert_close(got, ref, **TOL, msg=lambda m, r=rank: f"rank {r} of {len(results)}: {m}")


# ----------------------------------------------------------------------------- tests

#: world 1 (no collective at all) once; the collectives themselves are unit-tested (tests/unit).
#: CI's cut: every strategy at world 2; world 4 for ulysses (heads split 4 ways, and Hkv < N; tp at 4 ranks
#: runs in test_prefill_calls and test_checkpoint's fake group);
#: Llama and GPT-2 (Mistral and Qwen2 run in test_prefill_calls and test_vanilla_sp); world 1 in --full.
RUNS = full_or([(s, 2) for s in STRATEGIES] + [("ulysses", 4)],
               [(s, w) for s in STRATEGIES for w in WORLDS if w > 1 or s == "ulysses"])
RUN_FAMILIES = full_or(("llama", "gpt2"), FAMILIES)


def families_at(world):
    """The families compiled without a mask. CI's cut: GPT-2 at world 2 (Llama runs there with its
    attention_mask of ones, the same logits and collectives), Llama at world 4 (4 ranks share 2 cores)."""
    return RUN_FAMILIES if FULL else {2: ("gpt2",), 4: ("llama",)}.get(world, RUN_FAMILIES)


MATCH = [(f, s, w) for s, w in RUNS for f in families_at(w)]


@pytest.mark.parametrize("family,strategy,world", MATCH, ids=[f"{f}-{s}-w{w}" for f, s, w in MATCH])
def test_matches_single_process(family, strategy, world):
    results = group_results(strategy, world)
    assert len(results) == world
    check_every_rank(results, (family, False), reference(family))


@pytest.mark.parametrize("strategy,world", RUNS, ids=[f"{s}-w{w}" for s, w in RUNS])
def test_the_runs_really_communicated(strategy, world):
    """The numbers above came from a sharded run: every rank's graph had exactly the strategy's
    collectives (none at world 1), and on gloo never two in flight at once (``passes/one_in_flight``:
    gloo corrupts its heap otherwise)."""
    results = group_results(strategy, world)
    want = {} if world == 1 else EXPECTED_KINDS[strategy]
    for rank, per_rank in enumerate(results):
        for family in families_at(world):
            _, kinds, in_flight = per_rank[(family, False)]
            assert kinds == want, (rank, family, kinds)
            assert in_flight == (0 if world == 1 else 1), (rank, family, in_flight)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", MASKED_FAMILIES)
def test_attention_mask_of_ones(family, strategy):
    """An explicit all-ones attention_mask (HF builds an input-dependent mask) at world 2."""
    results = group_results(strategy, 2)
    check_every_rank(results, (family, True), reference(family, masked=True))
    # the mask changes nothing numerically, and the same collectives are used
    torch.testing.assert_close(reference(family, masked=True), reference(family))
    for per_rank in results:
        assert per_rank[(family, True)][1] == EXPECTED_KINDS[strategy]


@pytest.mark.parametrize("strategy", full_or([], STRATEGIES))
def test_batch_one(strategy):
    """llama, batch 1, world 2."""
    results = group_results(strategy, 2)
    check_every_rank(results, ("llama-b1", False), reference("llama", batch=1))
    for per_rank in results:
        assert per_rank[("llama-b1", False)][1] == EXPECTED_KINDS[strategy]


@pytest.mark.parametrize("name", sorted(FEW_KV))
@pytest.mark.parametrize("strategy", sorted({s for s, w in RUNS if w == 4}))
def test_fewer_kv_heads_than_ranks(strategy, name):
    """Hkv=2 KV heads on 4 ranks: still exact on every rank, with the usual collectives."""
    results = group_results(strategy, 4)
    check_every_rank(results, (name, False), reference("llama", model_kw=FEW_KV[name]))
    for per_rank in results:
        assert per_rank[(name, False)][1] == EXPECTED_KINDS[strategy]


@pytest.mark.parametrize("strategy", TP_LAYOUTS)
def test_one_kv_head_on_two_ranks(strategy):
    """Multi-query attention (Hkv = 1) under the TP layouts at world 2: exact, with the usual collectives."""
    results = group_results(strategy, 2)
    check_every_rank(results, ("llama-mqa", False), reference("llama", model_kw=MQA))
    for per_rank in results:
        assert per_rank[("llama-mqa", False)][1] == EXPECTED_KINDS[strategy]


@pytest.mark.parametrize("strategy", full_or(["ulysses"], ["ulysses", "megatron_sp_tp"]))
def test_inductor_llama_world2(strategy):
    cases = [(("llama", False), "llama", SHAPE, False)]
    results = group_results(strategy, 2, lower="inductor", cases=cases)
    check_every_rank(results, ("llama", False), reference("llama"))
    for per_rank in results:
        assert per_rank[("llama", False)][1] == EXPECTED_KINDS[strategy]
