"""The prefill calls that real traffic makes, on gloo ranks, against the uncompiled model.

    default call       fast(input_ids): use_cache=True, logits and every layer's K/V cache
    logits_to_keep     =1 on a left-padded batch of 3; a 1-D tensor with a negative entry
    families           Llama, GPT-2, Mistral, Qwen2, and eight more built from their HF configs
    any length         61 and 67 tokens: no world size divides them
    many lengths       ten lengths through one compiled model: at most two seqpar compiles
    outputs="local"    each rank returns its own rows; output_layout() says which

Every case of one world runs in ONE ``run_ranks`` call (process start-up is paid once) and each
case is its own test. References are computed in the test process.
"""
from __future__ import annotations

import pytest
import torch

from models import MORE_FAMILIES, build_model, make_inputs
from seqpar_testing import FULL, cached_run, fake_model, full_or, padded_mask, world_cases
from sp_compiler.strategies import STRATEGIES
from sp_compiler.testing import run_ranks

TOL = dict(atol=1e-5, rtol=1e-5)
LAYERS = 2
ALL = tuple(STRATEGIES)
MODEL = dict(layers=LAYERS, heads=4, kv_heads=2, hidden=64)
TEN_LENGTHS = (64, 100, 137, 170, 211, 256, 300, 333, 401, 448)

pytestmark = pytest.mark.usefixtures("dynamo_reset")


#: name -> (batch, length, call kwargs)
CALLS = {
    "default": (1, 61, lambda B, S: {}),
    "keep1_padded": (3, 67, lambda B, S: dict(attention_mask=padded_mask(B, S), use_cache=False, logits_to_keep=1)),
    "keep_tensor": (2, 61, lambda B, S: dict(use_cache=False, logits_to_keep=torch.tensor([0, 30, -1]))),
}

#: world -> [(family, strategy, call)]. CI's cut: HF's default call on Llama under every strategy; the padded
#: logits_to_keep=1 prefill under a heads and a TP+SP layout (zig-zag's runs in test_generate's padded
#: generation, tp's at 4 ranks below); a tensor of rows to keep under a sequence and a TP layout; GPT-2 under
#: a heads and a rows layout (and its padded prefill under TP+SP); Mistral and Qwen2 under zig-zag, Qwen3, Gemma
#: and Phi-3; --full adds every strategy
#: for each call and for GPT-2, the other HF families and two more 4-rank layouts.
CASES = {
    2: [("llama", s, "default") for s in ALL]
    + [("llama", s, "keep1_padded") for s in full_or(("ulysses", "megatron_sp_tp"), ALL)]
    + [("llama", s, "keep_tensor") for s in full_or(("vanilla_sp_zigzag", "megatron_sp"), ALL)]
    + [("gpt2", s, "default") for s in full_or(("ulysses", "vanilla_sp_zigzag"), ALL)]
    + [("gpt2", s, "keep1_padded") for s in full_or(("megatron_sp_tp",), ("ulysses", "vanilla_sp_zigzag",
                                                                          "megatron_sp_tp"))]
    + [(f, s, "default") for f in ("mistral", "qwen2") for s in full_or(("vanilla_sp_zigzag",),
                                                                          ("ulysses", "vanilla_sp_zigzag"))]
    + [(f, "ulysses", "default") for f in full_or(("qwen3", "gemma"), MORE_FAMILIES)]
    + [(f, "vanilla_sp_zigzag", "keep1_padded") for f in full_or(("phi3",), ("phi3", "cohere"))]
    + [("phi3", "tp", "default")],
    4: full_or([("llama", "vanilla_sp_zigzag", "default"), ("llama", "tp", "keep1_padded")],
               [("llama", s, c) for s in ("ulysses", "vanilla_sp_zigzag", "megatron_sp", "tp")
                for c in ("default", "keep1_padded")]),
}


def _call(model, family, call):
    B, S, kwargs = CALLS[call]
    with torch.no_grad():
        return model(make_inputs(family, B, S), **kwargs(B, S))


def _result(out):
    """(logits, [K, V of every layer] or None)."""
    cache = out.past_key_values
    kv = None if cache is None else [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return out.logits, kv


def _model(family, call):
    """HF's default call on Llama crosses decoder layers (2); CI's cut builds one layer for the other
    calls and families: what they change happens inside a layer."""
    layers = LAYERS if FULL or (family, call) == ("llama", "default") else 1
    return build_model(family, **{**MODEL, "layers": layers})


#: CI runs the transformed graphs as they are (AOTAutograd's trace is about a third of a compile here);
#: --full lowers them with aot_eager. CI lowers every strategy with aot_eager in test_numerics_gloo and
#: test_vanilla_sp, and with Inductor in test_numerics_gloo and test_generate.
LOWER = full_or("eager", "aot_eager")


def _rank_body(world):
    out = {}
    for family, strategy, call in CASES[world]:
        torch._dynamo.reset()
        model = _model(family, call)
        fast = torch.compile(model, backend="seqpar", options={"strategy": strategy, "lower": LOWER})
        out[(family, strategy, call)] = _result(_call(fast, family, call))
    return out


@pytest.mark.parametrize(**world_cases(CASES))
def test_prefill_call_is_exact(world, case):
    family, strategy, call = case
    results = cached_run(("prefill", world), run_ranks, _rank_body, world, world, timeout=1200)
    ref_logits, ref_kv = _result(_call(_model(family, call), family, call))
    for rank, res in enumerate(results):
        logits, kv = res[case]
        torch.testing.assert_close(logits, ref_logits, **TOL, msg=lambda m: f"rank {rank} logits: {m}")
        assert (kv is None) == (ref_kv is None)
        for i, (a, b) in enumerate(zip(kv or [], ref_kv or [])):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"rank {rank} cache tensor {i}: {m}")


# ----------------------------------------------------------------------------- many lengths

def _lengths_body(strategy, lengths):
    from sp_compiler.backend import compile_count

    model = build_model("llama", **MODEL)
    fast = torch.compile(model, backend="seqpar", options={"strategy": strategy, "lower": "aot_eager"})
    before, outs = compile_count(), []
    for S in lengths:
        with torch.no_grad():
            outs.append(_result(fast(make_inputs("llama", 2, S), attention_mask=padded_mask(2, S),
                                     logits_to_keep=1)))
    return compile_count() - before, outs


@pytest.mark.parametrize("strategy", full_or(["vanilla_sp_zigzag"], ["ulysses", "vanilla_sp_zigzag"]))
def test_ten_lengths_compile_at_most_twice(strategy):
    """The first length compiles a static graph; Dynamo then hands a symbolic one, which seqpar
    compiles once for the bucket every later length pads to (512 tokens, README)."""
    results = run_ranks(_lengths_body, 2, strategy, TEN_LENGTHS, timeout=1200)
    model = build_model("llama", **MODEL)
    for rank, (compiles, outs) in enumerate(results):
        assert compiles <= 2, f"rank {rank}: {compiles} seqpar compiles for {len(TEN_LENGTHS)} lengths"
        for S, (logits, kv) in zip(TEN_LENGTHS, outs):
            with torch.no_grad():
                ref_logits, ref_kv = _result(model(make_inputs("llama", 2, S), attention_mask=padded_mask(2, S),
                                                   logits_to_keep=1))
            torch.testing.assert_close(logits, ref_logits, **TOL, msg=lambda m: f"S={S} rank {rank}: {m}")
            for a, b in zip(kv, ref_kv):
                torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"S={S} rank {rank} cache: {m}")


# ----------------------------------------------------------------------------- outputs="local"

def _local_body(strategy, lengths):
    from sp_compiler.backend import output_layout
    from sp_compiler.kv import local_kv

    model = build_model("llama", **MODEL)
    fast = torch.compile(model, backend="seqpar", options={"strategy": strategy, "lower": "aot_eager",
                                                           "outputs": "local"})
    res = []
    for S in lengths:
        with torch.no_grad():
            out = fast(make_inputs("llama", 2, S))
        res.append((out.logits, local_kv(out.past_key_values)[0], output_layout()))
    return res


def _rows(layout_row):
    return torch.cat([torch.arange(start, start + n) for start, n in layout_row["rows"]] + [torch.zeros(0, dtype=torch.long)])


@pytest.mark.parametrize("strategy", full_or(["vanilla_sp_zigzag"], ["ulysses", "vanilla_sp_zigzag", "megatron_sp"]))
def test_local_outputs_hold_each_ranks_rows(strategy):
    """37 tokens (a static graph) then 50 (a padded bucket): logits and caches stay on the rank
    that made them; the layout names the rows (of the logits, and of the KV cache, which
    ``sp_compiler.kv.local_kv`` hands back), and together the ranks hold every row once."""
    lengths = (37, 50)
    results = run_ranks(_local_body, 2, strategy, lengths, timeout=900)
    model = build_model("llama", **MODEL)
    for i, S in enumerate(lengths):
        ref_logits, ref_kv = _result(_call_plain(model, S))
        held, held_kv = [], []
        for rank, res in enumerate(results):
            logits, kv, layout = res[i]
            row = layout[-1]                                                          # the logits
            assert row["dim"] == 1 and row["layout"] == ("zig-zag" if "zigzag" in strategy else "contiguous")
            rows = _rows(row)
            held.append(rows)
            torch.testing.assert_close(logits, ref_logits.index_select(1, rows), **TOL)
            k_row = next(r for r in layout if r.get("kv") == "model.layers.0.k")
            if strategy == "megatron_sp":                                             # split by KV heads
                heads = torch.cat([torch.arange(a, a + n) for a, n in k_row["heads"]])
                torch.testing.assert_close(kv["keys"], ref_kv[0].index_select(1, heads), **TOL)
                continue
            assert torch.equal(kv["positions"], _rows(k_row))
            held_kv.append(kv["positions"])
            torch.testing.assert_close(kv["keys"], ref_kv[0].index_select(2, kv["positions"]), **TOL)
        assert torch.equal(torch.cat(held).sort().values, torch.arange(S)), f"S={S}: rows held {held}"
        if held_kv:
            assert torch.equal(torch.cat(held_kv).sort().values, torch.arange(S)), f"S={S}: KV rows {held_kv}"


def _call_plain(model, S):
    with torch.no_grad():
        return model(make_inputs("llama", 2, S))


# ----------------------------------------------------------------------------- one process

@pytest.mark.parametrize("strategy", [s for s in ALL if STRATEGIES[s].seq_sharded])
def test_keep_one_row_moves_one_row(strategy):
    """logits_to_keep=1 on a sequence-sharded strategy: after the decoder layers the only collectives are
    one all_reduce of the kept row's hidden state, B x 1 x H, never S rows, and where the lm_head is
    vocab-parallel (megatron_*) the gather of that row's logits by vocabulary, B x 1 x V; before them,
    a vocab-parallel embedding's reduce_scatter into the sequence split. (Rank 0 of 2 on fake tensors;
    one Dynamo trace, transformed by every strategy: ``plan.transform``.)"""
    from sp_compiler.backend import last_report
    from sp_compiler.plan import transform

    B, S, H = 3, 67, MODEL["hidden"]
    fm = fake_model("llama", **MODEL)
    transform(fm.config, strategy=strategy, world=2, batch=B, seq_len=S, model=fm, call=dict(logits_to_keep=1))
    outside = [r for r in last_report() if not r["layer"].startswith("model.layers.")]
    V = fm.config.vocab_size
    want = [("all_reduce", B * 1 * H * 4)]
    if STRATEGIES[strategy].attn_weights == "tp":
        want = [("reduce_scatter", B * S * H * 4)] + want + [("all_gather", B * 1 * V * 4)]
    assert [(r["kind"], r["bytes"]) for r in outside] == want, outside


def test_weights_loaded_in_place_are_sliced_again(fake_pg):
    """tp slices weights at compile time; a load_state_dict afterwards must reach the slices."""
    fake_pg(1)
    model = build_model("llama", **MODEL)
    fast = torch.compile(model, backend="seqpar", options={"strategy": "tp", "lower": "eager"})
    ids = make_inputs("llama", 1, 16)
    with torch.no_grad():
        fast(ids, use_cache=False)
        model.load_state_dict(build_model("llama", seed=7, **MODEL).state_dict())
        got = fast(ids, use_cache=False).logits
        want = build_model("llama", seed=7, **MODEL)(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, **TOL)


def test_prompt_on_another_device_is_named(fake_pg):
    from sp_compiler.errors import InputError
    from sp_compiler.testing import seqpar_error

    fake_pg(2)
    fast = torch.compile(build_model("llama", **MODEL), backend="seqpar", options={"lower": "eager"})
    with pytest.raises(Exception) as info, torch.no_grad():
        fast(make_inputs("llama", 1, 16).to("meta"), use_cache=False)
    err = seqpar_error(info.value)
    assert isinstance(err, InputError) and "input_ids" in str(err) and "meta" in str(err) and "cpu" in str(err)


def test_mask_of_another_length_fails_before_any_answer(fake_pg):
    """A mask one entry short fails in HuggingFace's own code while Dynamo traces it (seqpar never
    sees such a graph); the message carries both lengths. Never a silent answer."""
    fake_pg(2)
    fast = torch.compile(build_model("llama", **MODEL), backend="seqpar", options={"lower": "eager"})
    with torch.no_grad():
        for S in (16, 24):
            fast(make_inputs("llama", 1, S), attention_mask=torch.ones(1, S, dtype=torch.long), use_cache=False)
        with pytest.raises(Exception) as info:
            fast(make_inputs("llama", 1, 32), attention_mask=torch.ones(1, 31, dtype=torch.long), use_cache=False)
    assert "32" in str(info.value) and "31" in str(info.value)


def test_inputs_embeds_is_refused_by_name(fake_pg):
    from sp_compiler.testing import error_text

    fake_pg(2)
    fast = torch.compile(build_model("llama", **MODEL), backend="seqpar", options={"lower": "eager"})
    with pytest.raises(Exception) as info, torch.no_grad():
        fast(inputs_embeds=torch.randn(1, 16, MODEL["hidden"]), use_cache=False)
    assert "inputs_embeds" in error_text(info.value) and "input_ids" in error_text(info.value)
