"""``model.generate`` through seqpar, on gloo ranks, against the uncompiled model on one process.

    every strategy x (greedy, sampling), outputs="local"; "replicate"   world 2, Llama; a 4-rank subset
    for two; GPT-2, an odd prompt length, a left-padded batch,          world 2
    Mistral with a sliding window (its cache: a slice of K, returned whole) under tp
    a follow-up prefill (a second turn on the cache of the first)       world 2
    the forms users write: model.compile, model.forward = torch.compile(...), torch.compile(model).generate
    one process (fake process group): a decode step's bytes at two prompt lengths, seqpar compiles per
    generation, where the rows of a cache kept local live

Every case of one world runs in ONE ``run_ranks`` call (process start-up and imports paid once), each
case its own test; references are computed in the test process. Sampling draws with the same seed on
every rank, and the scores each rank's sampler saw must be bitwise equal across ranks.
"""
from __future__ import annotations

import pytest
import torch

from models import build_model, make_inputs
from seqpar_testing import cached_run, full_or, padded_mask, world_cases
from sp_compiler.strategies import STRATEGIES
from sp_compiler.testing import run_ranks

MODEL = dict(layers=2, heads=4, kv_heads=2, hidden=64)
NEW = 5                      # new tokens per generation: a prefill and NEW - 1 decode steps
SEED = 7
#: CI runs the transformed graphs as they are (a generation is three compiles; AOTAutograd's trace of
#: each is a third of the time); --full lowers them with aot_eager. Both lowerings of a generation run in
#: CI all the same: aot_eager in test_checkpoint, Inductor below.
LOWER = full_or("eager", "aot_eager")

pytestmark = pytest.mark.usefixtures("dynamo_reset")


#: name -> (family, batch, prompt length, padded)
PROMPTS = {"llama-21": ("llama", 1, 21, False), "llama-19x2-padded": ("llama", 2, 19, True),
           "gpt2-21": ("gpt2", 1, 21, False), "mistral-window8-21": ("mistral", 1, 21, False)}
#: prompt -> config overrides: a sliding window of 8 (HF keeps the last 7 rows: a slice of K, not a cache
#: seqpar splits; it is returned whole, passes/kv_attention.whole_cache_outputs)
CONFIGS = {"mistral-window8-21": dict(sliding_window=8)}


def _model(prompt):
    return build_model(PROMPTS[prompt][0], **MODEL, **CONFIGS.get(prompt, {}))

#: world -> [(prompt, strategy, outputs)]; each case generates greedily, then samples (same compiled model).
#: Every strategy with outputs="local" (each layout's decode: split-KV or TP on head-split caches); "replicate"
#: decodes the same replicated way for every strategy, so two strategies cover it; padding, GPT-2 and 4 ranks
#: for the layouts where they change something (zig-zag's chunk pairs, TP's widened KV heads at Hkv < N).
#: CI's cut: every strategy once, zig-zag on the padded batch and megatron_sp on GPT-2 (a replicated cache's
#: generation runs in test_graph_cache's gloo test, after a prefill taken from the graph cache, and in the
#: follow-up test below; --full: every strategy on the Llama prompt, two replicate cases, two 4-rank cases).
_CI_PROMPT = {"vanilla_sp_zigzag": "llama-19x2-padded", "megatron_sp": "gpt2-21"}
CASES = {
    2: full_or([(_CI_PROMPT.get(s, "llama-21"), s, "local") for s in STRATEGIES]
               + [("mistral-window8-21", "tp", "local")],
               [("llama-21", s, "local") for s in STRATEGIES]
               + [("llama-21", s, "replicate") for s in ("ulysses", "tp")]
               + [("llama-19x2-padded", s, "local") for s in ("vanilla_sp_zigzag", "megatron_sp_tp")]
               + [("gpt2-21", "megatron_sp", "local")]
               + [("mistral-window8-21", s, "local") for s in ("tp", "vanilla_sp_zigzag")]),
    4: [("llama-19x2-padded", s, "local") for s in full_or((), ("vanilla_sp_zigzag", "tp"))],
}                 # CI: a 4-rank zig-zag generation runs in test_short_calls


def _generate(model, prompt, sample: bool):
    family, B, S, padded = PROMPTS[prompt]
    ids = make_inputs(family, B, S)
    kwargs = {"attention_mask": padded_mask(B, S)} if padded else {}
    torch.manual_seed(SEED)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=sample, top_k=0, pad_token_id=0,
                             return_dict_in_generate=True, output_scores=True, **kwargs)
    return out.sequences, torch.stack(out.scores)


def _rank_body(world):
    from sp_compiler.backend import compile_count

    out = {}
    for prompt, strategy, outputs in CASES[world]:
        torch._dynamo.reset()
        model = _model(prompt)
        model.compile(backend="seqpar", options={"strategy": strategy, "lower": LOWER, "outputs": outputs})
        before = compile_count()
        greedy = _generate(model, prompt, False)
        compiles = compile_count() - before
        out[(prompt, strategy, outputs)] = (greedy, _generate(model, prompt, True), compiles)
    return out


def _reference(prompt, sample):
    return _generate(_model(prompt), prompt, sample)


@pytest.mark.parametrize(**world_cases(CASES))
def test_generate_matches_one_device(world, case):
    """Greedy and sampled tokens equal one device's; every rank's sampler saw bitwise the same scores;
    a whole generation (prefill + NEW - 1 decode steps) went through seqpar in at most 3 graphs."""
    results = cached_run(("generate", world), run_ranks, _rank_body, world, world, timeout=1500)
    prompt = case[0]
    for sample in (False, True):
        ref_tokens, _ = _reference(prompt, sample)
        for rank, res in enumerate(results):
            tokens, scores = res[case][sample]
            assert torch.equal(tokens, ref_tokens), f"rank {rank} sample={sample}: {tokens} != {ref_tokens}"
            assert torch.equal(scores, results[0][case][sample][1]), f"rank {rank}: scores differ from rank 0's"
    for rank, res in enumerate(results):
        assert 2 <= res[case][2] <= 3, f"rank {rank}: {res[case][2]} seqpar compiles for one generation"


# ----------------------------------------------------------------------------- follow-up prefill

TURNS = (21, 9, 1, 3)        # a prompt, then a second turn of 9 tokens, one of 1, one of 3 (world 2)


def _turns(model):
    """Logits of a prompt and of follow-up calls that each continue the cache the previous call returned."""
    ids = make_inputs("llama", 1, sum(TURNS), seed=3)
    logits, cache, at = [], None, 0
    with torch.no_grad():
        for n in TURNS:
            out = model(ids[:, at:at + n], cache=cache, position_ids=torch.arange(at, at + n)[None],
                        logits_to_keep=1)
            logits.append(out.logits)
            cache, at = out.past_key_values, at + n
    return logits


def _turns_body(strategies):
    out = {}
    for strategy, outputs in strategies:
        torch._dynamo.reset()
        model = build_model("llama", **MODEL)
        model.compile(backend="seqpar", options={"strategy": strategy, "lower": LOWER, "outputs": outputs})
        out[(strategy, outputs)] = _turns(model)
    return out


FOLLOW_UP = [(s, "local") for s in ("vanilla_sp_zigzag", "tp")] + [("ulysses", "replicate")]
FOLLOW_UP = full_or(FOLLOW_UP[:1], FOLLOW_UP)       # CI: the split cache (the replicated one is the simple case)


@pytest.mark.parametrize("case", FOLLOW_UP, ids="-".join)
def test_follow_up_prefill_continues_the_cache(case):
    """A second turn (9 new tokens on 21 cached: sequence-parallel over the new tokens against the
    cache where it lies), then turns of 1 and 3 tokens: every call's last-token logits equal one device's."""
    results = cached_run(("turns",), run_ranks, _turns_body, 2, FOLLOW_UP, timeout=900)
    ref = _turns(build_model("llama", **MODEL))
    for rank, res in enumerate(results):
        for turn, (got, want) in enumerate(zip(res[case], ref)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"rank {rank} turn {turn}: {m}")


# ----------------------------------------------------------------------------- the forms users write

def _forms_body():
    from sp_compiler.backend import compile_count

    opts = {"strategy": "ulysses", "lower": LOWER, "outputs": "local"}
    ids = make_inputs("llama", 1, 21)
    out = {}
    for form in ("model.compile", "forward", "torch.compile"):
        torch._dynamo.reset()
        model = build_model("llama", **MODEL)
        before = compile_count()
        with torch.no_grad():
            if form == "model.compile":
                model.compile(backend="seqpar", options=opts)
                tokens = model.generate(ids, max_new_tokens=NEW, do_sample=False)
            elif form == "forward":
                model.forward = torch.compile(model.forward, backend="seqpar", options=opts)
                tokens = model.generate(ids, max_new_tokens=NEW, do_sample=False)
            else:
                tokens = torch.compile(model, backend="seqpar", options=opts).generate(ids, max_new_tokens=NEW,
                                                                                       do_sample=False)
        out[form] = (tokens, compile_count() - before)
    return out


@pytest.mark.parametrize("form", full_or(["forward", "torch.compile"], ["model.compile", "forward", "torch.compile"]))
def test_every_form_runs_through_seqpar(form):
    """``torch.compile(model).generate`` alone would run the uncompiled module (pytorch issue 141473):
    seqpar routes it through the backend, so every form compiles the prefill and the decode steps."""
    results = cached_run(("forms",), run_ranks, _forms_body, 2, timeout=900)
    want = build_model("llama", **MODEL).generate(make_inputs("llama", 1, 21), max_new_tokens=NEW, do_sample=False)
    for rank, res in enumerate(results):
        tokens, compiles = res[form]
        assert torch.equal(tokens, want), f"rank {rank}"
        assert compiles >= 2, f"rank {rank}: {compiles} seqpar compiles: the generation did not run through seqpar"


# ----------------------------------------------------------------------------- one process

def _decode_report(S, strategy="ulysses", frozen=False):
    from sp_compiler.backend import last_report

    model = build_model("llama", **MODEL).requires_grad_(not frozen)
    model.compile(backend="seqpar", options={"strategy": strategy, "lower": "eager", "outputs": "local"})
    with torch.no_grad():
        model.generate(make_inputs("llama", 1, S), max_new_tokens=4, do_sample=False)
    return last_report()


def test_decode_step_moves_the_same_bytes_at_any_context(fake_pg):
    """A decode step on a cache kept split by sequence moves one all_gather of (out | lse) per layer,
    N x B*H*(D+1) values, at 64 and at 512 cached tokens alike (the cache rows never move)."""
    fake_pg(2)
    H, D, L = MODEL["heads"], MODEL["hidden"] // MODEL["heads"], MODEL["layers"]
    rows = {}
    for S in (64, 512):
        torch._dynamo.reset()
        rows[S] = [(r["layer"], r["kind"], r["bytes"]) for r in _decode_report(S)]
    want = [(f"model.layers.{i}", "all_gather", 2 * 1 * H * 1 * (D + 1) * 4) for i in range(L)]
    assert rows[64] == want and rows[512] == want, rows


def test_decode_step_of_a_frozen_model_moves_no_weight(fake_pg):
    """A model whose weights require no grad (``requires_grad_(False)``, as inference code freezes it;
    checkpoint stand-ins) decodes under tp with its two all_reduce of B x E per layer and nothing else:
    ATen would trace its projections of a one-token step as bmm of an expanded weight, which no rule
    splits, and gathered o_proj's weight on every step."""
    fake_pg(2)
    E, L = MODEL["hidden"], MODEL["layers"]
    rows = [(r["layer"], r["kind"], r["bytes"]) for r in _decode_report(9, "tp", frozen=True)]
    layers = [r for r in rows if r[0].startswith("model.layers.")]
    assert layers == [(f"model.layers.{i}", "all_reduce", 1 * E * 4) for i in range(L) for _ in range(2)], rows


def test_generation_compiles_three_graphs_and_the_next_reuses_them(fake_pg):
    """One prefill graph and two decode graphs (Dynamo's first, static one and its symbolic one) for a
    whole generation; a later generation of another length in the same prompt bucket compiles at most
    the bucketed prefill, and a third one in that bucket nothing."""
    from sp_compiler.backend import compile_count

    fake_pg(2)
    model = build_model("llama", **MODEL)
    model.compile(backend="seqpar", options={"strategy": "ulysses", "lower": "eager", "outputs": "local"})
    counts = []
    for S in (40, 45, 50):
        before = compile_count()
        with torch.no_grad():
            model.generate(make_inputs("llama", 1, S), max_new_tokens=8, do_sample=False)
        counts.append(compile_count() - before)
    assert counts == [3, 1, 0], counts


def test_local_cache_holds_a_ranks_share_of_every_row(fake_pg):
    """After K new tokens on an S-token prompt each rank holds (S + K) / N rows per layer (within one
    row: a decode step's row goes to the rank holding fewest), no row twice; output_layout() says where."""
    from sp_compiler.backend import output_layout
    from sp_compiler.kv import local_kv

    fake_pg(2, rank=1)
    S, K = 21, 7
    model = build_model("llama", **MODEL)
    model.compile(backend="seqpar", options={"strategy": "vanilla_sp_zigzag", "lower": "eager", "outputs": "local"})
    with torch.no_grad():
        out = model.generate(make_inputs("llama", 1, S), max_new_tokens=K + 1, do_sample=False,
                             return_dict_in_generate=True)
    kv = local_kv(out.past_key_values)
    row = next(r for r in output_layout() if r.get("kv") == "model.layers.0.k")
    assert row["global_rows"] == S + K and sum(row["rows_per_rank"]) == S + K
    assert max(row["rows_per_rank"]) - min(row["rows_per_rank"]) <= 1
    assert kv[0]["keys"].shape[2] == row["rows_per_rank"][1] == len(kv[0]["positions"])
    assert row["rows"] and all(n > 0 for _, n in row["rows"])
    held = set(kv[0]["positions"].tolist())
    assert len(held) == row["rows_per_rank"][1] and all(0 <= p < S + K for p in held)
    assert torch.isnan(out.past_key_values.layers[0].keys).all(), "HF's cache holds stand-ins, not data"


def test_an_earlier_steps_cache_is_refused(fake_pg):
    """A cache kept local grows in place: a stand-in of an earlier step (a branched or restored cache)
    raises StaleCacheError naming the fix, never a silently wrong answer."""
    from sp_compiler.kv import StaleCacheError
    from sp_compiler.testing import seqpar_error

    fake_pg(2)
    model = build_model("llama", **MODEL)
    model.compile(backend="seqpar", options={"strategy": "ulysses", "lower": "eager", "outputs": "local"})
    ids = make_inputs("llama", 1, 22)
    with torch.no_grad():
        cache = model(ids[:, :21]).past_key_values
        earlier = [(layer.keys, layer.values) for layer in cache.layers]
        model(ids[:, 21:], cache=cache, position_ids=torch.tensor([[21]]))
        for layer, (k, v) in zip(cache.layers, earlier):
            layer.keys, layer.values = k, v
        with pytest.raises(Exception) as info:
            model(ids[:, 21:], cache=cache, position_ids=torch.tensor([[21]]))
    err = seqpar_error(info.value) or info.value
    assert isinstance(err, StaleCacheError) and "outputs='replicate'" in str(err), repr(info.value)


def _inductor_body(cases):
    out = {}
    for strategy, outputs in cases:
        torch._dynamo.reset()
        model = build_model("llama", **INDUCTOR_MODEL)
        model.compile(backend="seqpar", options={"strategy": strategy, "outputs": outputs})    # lower="inductor"
        out[(strategy, outputs)] = _generate(model, "llama-19x2-padded", False)[0]
    return out


#: 2 KV heads per rank: a head-split cache's strides matter; one layer: Inductor's build of the three graphs
#: is most of this test's time, and the layer count changes nothing here (test_regions cuts deeper models)
INDUCTOR_MODEL = dict(MODEL, kv_heads=4, layers=1)
INDUCTOR_CASES = full_or([("tp", "local")], [("tp", "local"), ("vanilla_sp_zigzag", "local")])


@pytest.mark.parametrize("case", INDUCTOR_CASES, ids="-".join)
def test_generate_with_inductor(case):
    """End to end with the default lowering: Inductor compiles the prefill and the symbolic decode graph."""
    results = cached_run(("generate-inductor",), run_ranks, _inductor_body, 2, INDUCTOR_CASES, timeout=1200)
    family, B, S, padded = PROMPTS["llama-19x2-padded"]
    ids = make_inputs(family, B, S)
    with torch.no_grad():
        want = build_model("llama", **INDUCTOR_MODEL).generate(ids, attention_mask=padded_mask(B, S),
                                                               max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    for rank, res in enumerate(results):
        assert torch.equal(res[case], want), f"rank {rank}"
