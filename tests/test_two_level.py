"""Two-level layouts (``options["tp_size"]``): tp inside groups of T ranks, a sequence layout across them.

Fake process groups of 4 and 8: per decoder layer, the collectives on each mesh dimension, their bytes
computed here from the model's dimensions (never read back from the engine):

    B, S, E = batch, sequence, hidden;  T = tp_size, G = N / T, L = S / G;  H, Hkv, D = heads, KV heads, head dim
    tp (within a group)    2 x all_reduce            B*L*E*4 each (attention's and the MLP's partial sums)
    ulysses (across)       1 x all_to_all of q|k|v   B*L*(H + 2*Hkv)/T*D*4  (this group's heads)
                           1 x all_to_all back       B*L*H/T*D*4
    vanilla_sp (across)    1 x all_gather of K|V     B*S*2*Hkv/T*D*4
    outside the layers     1 x all_gather of the logits across groups, B*S*V*4; nothing within a group

On 4 gloo ranks (2 x 2), against one process: HF's default call (``use_cache=True``) on a padded batch
of a length G does not divide, with its KV cache, under ulysses and zig-zag across groups (``--full``:
vanilla_sp too), both levels' collectives one at a time; and a greedy ``generate``.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from models import build_model
from seqpar_testing import cached_run, fake_model, full_or, layer_names, padded_mask

__all__ = []

pytestmark = pytest.mark.usefixtures("dynamo_reset")

ACROSS = ("ulysses", "vanilla_sp", "vanilla_sp_zigzag")
B, S, V, LAYERS, FP32 = 2, 16, 128, 2, 4
DIMS = dict(heads=8, kv_heads=8, hidden=128)            # H/T >= G KV heads for every mesh below: no widening


def _report(strategy, world, tp_size):
    from sp_compiler.backend import last_report
    from sp_compiler.plan import transform

    fm = fake_model("llama", layers=LAYERS, vocab=V, **DIMS)
    transform(fm.config, strategy=strategy, world=world, rank=world - 1, batch=B, seq_len=S, model=fm,
              options={"tp_size": tp_size})
    return last_report()


def _expected_layer(strategy, world, T):
    H, Hkv, E = DIMS["heads"], DIMS["kv_heads"], DIMS["hidden"]
    D, L = E // H, S // (world // T)
    tp = [("tp", "all_reduce", B * L * E * FP32)] * 2
    if strategy == "ulysses":
        sp = [("sp", "all_to_all", B * L * (H + 2 * Hkv) // T * D * FP32), ("sp", "all_to_all", B * L * H // T * D * FP32)]
    else:
        sp = [("sp", "all_gather", B * S * 2 * Hkv // T * D * FP32)]
    return sorted(tp + sp)


@pytest.mark.parametrize("strategy", ACROSS)
@pytest.mark.parametrize("world,tp_size", [(4, 2), (8, 2), (8, 4)])
def test_collectives_per_mesh_dim(strategy, world, tp_size):
    report = _report(strategy, world, tp_size)
    rows = {}
    for r in report:
        rows.setdefault(r["layer"], []).append((r["mesh"], r["kind"], r["bytes"]))
    for layer in layer_names("llama", LAYERS):
        assert sorted(rows.pop(layer)) == _expected_layer(strategy, world, tp_size), report
    assert sorted(sum(rows.values(), [])) == [("sp", "all_gather", B * S * V * FP32)], report


def test_per_layer_strategies_across_groups():
    """``layers`` picks the strategy across groups per layer; tp runs inside every group in each."""
    from sp_compiler.backend import last_report
    from sp_compiler.plan import transform

    fm = fake_model("llama", layers=LAYERS, vocab=V, **DIMS)
    transform(fm.config, strategy="ulysses", world=4, batch=B, seq_len=S, model=fm,
              options={"tp_size": 2, "layers": {"model.layers.1": "vanilla_sp"}})
    kinds = Counter((r["layer"], r["mesh"], r["kind"]) for r in last_report())
    assert kinds[("model.layers.0", "sp", "all_to_all")] == 2 and kinds[("model.layers.1", "sp", "all_gather")] == 1
    assert kinds[("model.layers.0", "tp", "all_reduce")] == kinds[("model.layers.1", "tp", "all_reduce")] == 2


@pytest.mark.parametrize("options,match", [
    ({"strategy": "ulysses", "tp_size": 3}, "does not divide the world size 4"),
    ({"strategy": "tp", "tp_size": 2}, "cannot run across groups"),
    ({"strategy": "megatron_sp", "tp_size": 2}, "cannot run across groups"),
    ({"strategy": "auto", "tp_size": 2}, "does not price two-level layouts"),
    ({"strategy": "ulysses", "tp_size": 2, "outputs": "local"}, "does not support outputs"),
    ({"strategy": "ulysses", "tp_size": 0}, "positive int"),
])
def test_bad_two_level_options_raise(options, match):
    from sp_compiler.errors import OptionsError
    from sp_compiler.testing import fake_process_group, seqpar_error

    model = build_model("llama")
    with fake_process_group(4, 1), pytest.raises(Exception) as info:
        model.compile(backend="seqpar", options={"lower": "eager", **options})
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long))
    err = seqpar_error(info.value)
    assert isinstance(err, OptionsError) and match in str(err), info.value


def test_heads_tp_size_does_not_divide_raise():
    from sp_compiler.errors import ShapeConstraintError
    from sp_compiler.testing import fake_process_group, seqpar_error

    model = build_model("llama", heads=4, kv_heads=2)
    with fake_process_group(6, 0), pytest.raises(Exception) as info:
        model.compile(backend="seqpar", options={"lower": "eager", "strategy": "ulysses", "tp_size": 3})
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long))
    err = seqpar_error(info.value)
    assert isinstance(err, ShapeConstraintError) and "tp_size" in str(err), info.value


# ----------------------------------------------------------------------------- 4 gloo ranks, 2 x 2

PROMPT = 13                                        # G = 2 does not divide it
#: CI's cut: vanilla_sp (zig-zag covers the rows layout; the fake groups above check vanilla_sp's collectives)
GLOO = full_or(("ulysses", "vanilla_sp_zigzag"), ACROSS)


def _inputs():
    ids = torch.randint(0, 100, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    return ids, padded_mask(2, PROMPT)


def _rank_body():
    import torch._dynamo

    from passes.one_in_flight import most_in_flight
    from sp_compiler.backend import last_graph

    ids, mask = _inputs()
    out = {}
    for strategy in GLOO:
        torch._dynamo.reset()
        model = build_model("llama")
        model.compile(backend="seqpar", options={"strategy": strategy, "lower": "aot_eager", "tp_size": 2})
        with torch.no_grad():
            r = model(ids, attention_mask=mask)
        out[strategy] = (r.logits, [layer.keys for layer in r.past_key_values.layers],
                         [layer.values for layer in r.past_key_values.layers],
                         most_in_flight(last_graph()[0].graph))
    torch._dynamo.reset()
    model = build_model("llama")
    model.compile(backend="seqpar", options={"strategy": "ulysses", "lower": "aot_eager", "tp_size": 2})
    with torch.no_grad():
        out["generate"] = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    return out


def _gloo():
    from sp_compiler.testing import run_ranks

    return cached_run("two-level-gloo", run_ranks, _rank_body, 4, timeout=600)


def _reference():
    ids, mask = _inputs()
    model = build_model("llama")
    with torch.no_grad():
        r = model(ids, attention_mask=mask)
        gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    real = mask.bool()
    return r, gen, real


@pytest.mark.parametrize("strategy", GLOO)
def test_two_level_matches_one_device(strategy):
    want, _, real = _reference()
    for rank, got in enumerate(_gloo()):
        logits, keys, values, in_flight = got[strategy]
        assert in_flight == 1, (strategy, rank, in_flight)          # gloo: both levels' collectives, one at a time
        assert (logits - want.logits)[real].abs().max() < 1e-5, (strategy, rank)
        for i, layer in enumerate(want.past_key_values.layers):
            assert keys[i].shape == layer.keys.shape and (keys[i] - layer.keys).abs().max() < 1e-5, (strategy, rank, i)
            assert (values[i] - layer.values).abs().max() < 1e-5, (strategy, rank, i)


def test_two_level_generate_matches_one_device():
    _, gen, _ = _reference()
    for rank, got in enumerate(_gloo()):
        assert torch.equal(got["generate"], gen), (rank, got["generate"], gen)
