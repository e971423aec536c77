"""Two-level layouts (``options["tp_size"]``): tp inside groups of T ranks, a sequence layout across them.

Fake process groups of 4 and 8: per decoder layer, the collectives on each mesh dimension, their bytes
computed here from the model's dimensions (never read back from the engine):

    B, S, E = batch, sequence, hidden;  T = tp_size, G = N / T, L = S / G;  H, Hkv, D = heads, KV heads, head dim
    tp (within a group)    2 x all_reduce            B*L*E*4 each (attention's and the MLP's partial sums)
    ulysses (across)       1 x all_to_all of q|k|v   B*L*(H + 2*Hkv)/T*D*4  (this group's heads)
                           1 x all_to_all back       B*L*H/T*D*4
    vanilla_sp (across)    1 x all_gather of K|V     B*S*2*Hkv/T*D*4
    outside the layers     1 x all_gather of the logits across groups, B*S*V*4; nothing within a group
    a decode step, outputs="local" (B = 1):  tp 2 x all_reduce of E*4; sp 1 x all_gather of G*H/T*(D+1)*4

On 4 gloo ranks (2 x 2), against one process: HF's default call (``use_cache=True``) on a padded batch
of a length G does not divide, with its KV cache, under ulysses and zig-zag across groups (``--full``:
vanilla_sp too), both levels' collectives one at a time; a greedy ``generate``; and ``from_pretrained``
reading each rank's slices from a checkpoint, with outputs="local": its cache shards (heads within the group,
rows across) and a generation that decodes on them.
"""
from __future__ import annotations

import importlib
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
        sp = [("sp", "all_to_all", B * L * (H + 2 * Hkv) // T * D * FP32),
              ("sp", "all_to_all", B * L * H // T * D * FP32)]
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


@pytest.mark.parametrize("strategy", full_or(("vanilla_sp_zigzag",), ("ulysses", "vanilla_sp_zigzag")))
def test_a_gather_inside_the_group_keeps_an_uneven_sequence_split(strategy):
    """OLMo-2 normalises q and k over all heads, so tp gathers them inside the group. Gathered with its dims
    kept ([T * B, S/G, ..]), the tensor keeps the sequence split across groups; a packed gather flattened the
    rows, which a length G does not divide (13 on 2 groups) could not follow (ShardingError)."""
    from sp_compiler.backend import last_report
    from sp_compiler.plan import transform

    fm = fake_model("olmo2", layers=LAYERS, vocab=V, **DIMS)
    transform(fm.config, strategy=strategy, world=4, rank=3, batch=B, seq_len=13, model=fm, options={"tp_size": 2})
    kinds = Counter((r["mesh"], r["kind"]) for r in last_report() if r["layer"] == "model.layers.1")
    assert kinds[("tp", "all_gather")] == 2, kinds                 # q and k, whole for their norms


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
    ({"strategy": "auto", "tp_size": 2}, "chooses tp_size itself"),
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


@pytest.mark.parametrize("strategy", full_or(("ulysses", "vanilla_sp_zigzag"), ACROSS))
def test_decode_step_on_a_local_cache_runs_tp_in_the_group(strategy):
    """outputs="local": the cache stays split by heads within a group and by rows across the groups, so a
    decode step runs tp in the group (2 all_reduce of B x E) and split-KV across the groups (one all_gather of
    G x B*H/T*(D+1): out | lse of this rank's heads), the same bytes at 40 and at 300 cached tokens."""
    from sp_compiler.backend import last_report
    from sp_compiler.testing import fake_process_group

    N, T, dims = 4, 2, dict(heads=4, kv_heads=2, hidden=64)
    H, E = dims["heads"], dims["hidden"]
    D = E // H
    rows = {}
    for prompt in (40, 300):
        torch._dynamo.reset()
        model = build_model("llama", **dims)
        model.compile(backend="seqpar", options={"strategy": strategy, "lower": "eager", "tp_size": T,
                                                 "outputs": "local"})
        with fake_process_group(N, N - 1), torch.no_grad():
            model.generate(torch.randint(0, 100, (1, prompt)), max_new_tokens=3, do_sample=False)
            rows[prompt] = sorted((r["layer"], r["mesh"], r["kind"], r["bytes"]) for r in last_report())
    want = sorted([(layer, "tp", "all_reduce", 1 * E * FP32) for layer in layer_names("llama", 2)] * 2
                  + [(layer, "sp", "all_gather", N // T * 1 * H // T * (D + 1) * FP32)
                     for layer in layer_names("llama", 2)])
    assert rows[40] == rows[300] == want, rows


def test_a_follow_up_prefill_reads_a_local_cache_under_ulysses():
    """A second turn on a cache kept local, under ulysses x tp2 with one KV head per rank: ulysses repeats it
    for the two groups (share_kv_heads), which split-KV attention reads through (it raised ShardingError,
    'not a concatenation of the cache with the step's new rows'). Exact on gloo by script (1.3e-7)."""
    from sp_compiler.backend import last_report
    from sp_compiler.testing import fake_process_group

    model = build_model("llama", heads=4, kv_heads=2)
    model.compile(backend="seqpar", options={"strategy": "ulysses", "lower": "eager", "tp_size": 2, "outputs": "local"})
    with fake_process_group(4, 2), torch.no_grad():
        out = model.generate(torch.randint(0, 100, (1, 13)), max_new_tokens=2, do_sample=False,
                             return_dict_in_generate=True)
        model(torch.randint(0, 100, (1, 6)), past_key_values=out.past_key_values, use_cache=True)
        kinds = Counter((r["mesh"], r["kind"], "split-KV" in r.get("what", "")) for r in last_report()
                        if r["layer"] == "model.layers.1")
    assert kinds[("sp", "all_gather", True)] == 1 and kinds[("tp", "all_reduce", False)] == 2, kinds


def test_local_cache_refused_where_tp_leaves_the_kv_heads_whole():
    """Phi-3's fused qkv_proj with fewer KV heads than query heads: tp leaves its K/V whole, so a cache kept
    local could not be split by heads within the group; outputs="local" is refused, naming the cache."""
    from sp_compiler.errors import OptionsError
    from sp_compiler.testing import fake_process_group, seqpar_error

    model = build_model("phi3")
    with fake_process_group(4, 1), pytest.raises(Exception) as info:
        model.compile(backend="seqpar", options={"lower": "eager", "strategy": "ulysses", "tp_size": 2,
                                                 "outputs": "local"})
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long))
    err = seqpar_error(info.value)
    assert isinstance(err, OptionsError) and "not split by heads" in str(err) and "layers.0" in str(err), err


@pytest.mark.parametrize("kv_heads,world,tp_size", [(2, 6, 3), (1, 4, 2)])
def test_heads_tp_size_does_not_divide_raise(kv_heads, world, tp_size):
    """T must divide the heads: 3 does not divide 4 query heads; 2 ranks of a group cannot share one KV head
    (one level widens it; two levels raised an internal error from share_kv_heads before)."""
    from sp_compiler.errors import ShapeConstraintError
    from sp_compiler.testing import fake_process_group, seqpar_error

    model = build_model("llama", heads=4, kv_heads=kv_heads)
    with fake_process_group(world, 0), pytest.raises(Exception) as info:
        model.compile(backend="seqpar", options={"lower": "eager", "strategy": "ulysses", "tp_size": tp_size})
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long))
    err = seqpar_error(info.value)
    assert isinstance(err, ShapeConstraintError) and "tp_size" in str(err), info.value


# ----------------------------------------------------------------------------- 4 gloo ranks, 2 x 2

PROMPT = 13                                        # G = 2 does not divide it
#: CI's cut: vanilla_sp (zig-zag covers the rows layout; the fake groups above check vanilla_sp's collectives).
#: Zig-zag's model is read from a checkpoint (``from_pretrained``), ulysses's also generates.
GLOO = full_or(("ulysses", "vanilla_sp_zigzag"), ACROSS)
#: CI runs the transformed graphs as they are (4 ranks share 2 cores; AOTAutograd's trace is about a third
#: of a compile); --full lowers them with aot_eager
LOWER = full_or("eager", "aot_eager")


def _inputs():
    ids = torch.randint(0, 100, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    return ids, padded_mask(2, PROMPT)


def _rank_body(checkpoint):
    """Per strategy across groups: HF's default call (zig-zag's model read from the checkpoint), then for
    ulysses a greedy generation on the same compiled model; Mixtral with its experts split across groups."""
    import torch._dynamo

    from passes.one_in_flight import most_in_flight
    from sp_compiler import from_pretrained, sdpa
    from sp_compiler.backend import last_graph, output_layout
    from sp_compiler.kv import local_kv

    mask_blocks = importlib.import_module("passes.mask_blocks")   # the module (passes.mask_blocks is the pass)
    ids, mask = _inputs()
    out = {}
    for strategy in GLOO:
        torch._dynamo.reset()
        local = strategy == "vanilla_sp_zigzag"
        if local:
            model = from_pretrained(checkpoint, strategy=strategy, tp_size=2, lower=LOWER, outputs="local")
        else:
            model = build_model("llama")
            model.compile(backend="seqpar", options={"strategy": strategy, "lower": LOWER, "tp_size": 2})
        saved, mask_blocks.MIN_MASK = mask_blocks.MIN_MASK, 1 if strategy == "ulysses" else mask_blocks.MIN_MASK
        try:                                       # ulysses: the padding mask cut into query blocks, as a long
            with torch.no_grad():                  # prompt's is (only the run across groups cuts them)
                r = model(ids, attention_mask=mask)
        finally:
            mask_blocks.MIN_MASK = saved
        with torch.no_grad():
            graph = last_graph()[0].graph
            kv = local_kv(r.past_key_values)
            rows = next(row for row in output_layout() if row["global_shape"] == [*ids.shape, r.logits.shape[-1]])
            out[strategy] = (r.logits, [layer["keys"] for layer in kv], [layer["values"] for layer in kv],
                             most_in_flight(graph), last_graph()[1].weight_bytes(),
                             sum(sdpa.is_attention(n) and sdpa.bind(n).mask is not None for n in graph.nodes),
                             rows.get("rows"), [layer["positions"] for layer in kv])
            if strategy == "ulysses":
                out["generate"] = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
            if local:                              # the decode steps read their slices and the local cache
                out["generate-local"] = (model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                                         last_graph()[1].weight_bytes())
    torch._dynamo.reset()
    model = build_model("mixtral")
    model.compile(backend="seqpar", options={"strategy": "ulysses", "lower": LOWER, "tp_size": 2,
                                             "expert_parallel": True})
    with torch.no_grad():
        out["mixtral-ep"] = model(ids, attention_mask=mask).logits
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny Llama of these tests, saved as HF saves it."""
    path = tmp_path_factory.mktemp("two-level") / "llama"
    build_model("llama").save_pretrained(path)
    return str(path)


def _gloo(checkpoint):
    from sp_compiler.testing import run_ranks

    return cached_run("two-level-gloo", run_ranks, _rank_body, 4, checkpoint, timeout=600)


def _reference():
    ids, mask = _inputs()
    model = build_model("llama")
    with torch.no_grad():
        r = model(ids, attention_mask=mask)
        gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
        padded = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    real = mask.bool()
    return r, (gen, padded), real


@pytest.mark.parametrize("strategy", GLOO)
def test_two_level_matches_one_device(strategy, checkpoint):
    """Whole outputs (ulysses), or (zig-zag, outputs="local") this group's rows of the logits and of the KV
    cache, with this rank's KV heads: rank r holds head r % T of each layer's 2 (T = 2)."""
    want, _, real = _reference()
    for rank, got in enumerate(_gloo(checkpoint)):
        logits, keys, values, in_flight, _, masked, rows, positions = got[strategy]
        assert in_flight == 1, (strategy, rank, in_flight)          # gloo: both levels' collectives, one at a time
        assert strategy != "ulysses" or masked > LAYERS, masked     # ulysses: its masks cut into query blocks
        mine = [i for start, n in rows for i in range(start, start + n)] if rows else list(range(PROMPT))
        assert (strategy == "vanilla_sp_zigzag") == (len(mine) < PROMPT), (strategy, rows)
        assert (logits - want.logits[:, mine])[real[:, mine]].abs().max() < 1e-5, (strategy, rank)
        for i, layer in enumerate(want.past_key_values.layers):
            k, v = layer.keys, layer.values
            if positions[i] is not None:                            # local: [B, Hkv/T, rows of this group, D]
                assert sorted(positions[i].tolist()) == mine, (rank, positions[i], rows)
                h = keys[i].shape[1]
                assert h == k.shape[1] // 2, keys[i].shape
                k, v = (t[:, rank % 2 * h:(rank % 2 + 1) * h, positions[i]] for t in (k, v))
            assert keys[i].shape == k.shape and (keys[i] - k).abs().max() < 1e-5, (strategy, rank, i)
            assert (values[i] - v).abs().max() < 1e-5, (strategy, rank, i)


def test_two_level_generate_matches_one_device(checkpoint):
    """Greedy generations: ulysses's decode runs whole on the gathered cache; zig-zag's (outputs="local",
    weights from the checkpoint) runs tp in the group on its cache heads, split-KV across the groups, and
    reads the same slices as its prefill."""
    _, (gen, padded), _ = _reference()
    for rank, got in enumerate(_gloo(checkpoint)):
        assert torch.equal(got["generate"], gen), (rank, got["generate"], gen)
        tokens, decode_bytes = got["generate-local"]
        assert torch.equal(tokens, padded), (rank, tokens, padded)
        assert decode_bytes == got["vanilla_sp_zigzag"][4], (rank, decode_bytes)


def test_experts_split_across_groups_and_sliced_within():
    """expert_parallel with tp_size: each group holds E/G experts (the run across groups splits them), each
    rank their columns / T (the tp run slices them); the tokens travel to their experts' group by
    all_to_all on sp, beside ulysses's two."""
    from sp_compiler.plan import transform

    fm = fake_model("mixtral", layers=LAYERS, vocab=V)
    _, ctx = transform(fm.config, strategy="ulysses", world=4, batch=B, seq_len=S, model=fm,
                       options={"tp_size": 2, "expert_parallel": True})
    i = next(i for i, f in enumerate(ctx.input_fqns) if f and f.endswith("layers.1.mlp.experts.gate_up_proj"))
    E, two_i, H = ctx.full_inputs[i].shape                      # [E, 2I, H]: gate | up
    assert tuple(ctx.local_inputs[i].shape) == (E // 2, two_i // 2, H)
    kinds = Counter((r["mesh"], r["kind"]) for r in ctx.collectives if r["layer"] == "model.layers.1")
    assert kinds == {("sp", "all_to_all"): 4, ("tp", "all_reduce"): 2}, kinds


def test_two_level_expert_parallel_matches_one_device(checkpoint):
    ids, mask = _inputs()
    with torch.no_grad():
        want = build_model("mixtral")(ids, attention_mask=mask).logits
    for rank, got in enumerate(_gloo(checkpoint)):
        assert (got["mixtral-ep"] - want)[mask.bool()].abs().max() < 1e-5, rank


def test_two_level_reads_its_slices_from_a_checkpoint(checkpoint):
    """``from_pretrained(path, tp_size=2)`` (zig-zag across groups, checked against one device above): the
    tp run reads each rank's slices from the safetensors files and the run across groups keeps them; a
    rank holds its half of every sliced weight beside the whole embedding, lm_head and norms."""
    sliced = sum(p.numel() * 4 for name, p in build_model("llama").named_parameters() if name.endswith("proj.weight"))
    for rank, got in enumerate(_gloo(checkpoint)):
        mine, whole = got["vanilla_sp_zigzag"][4]
        assert mine == whole - sliced // 2, (rank, mine, whole, sliced)


# ----------------------------------------------------------------------------- pricing two levels

def test_each_collective_is_priced_on_its_link():
    """Nodes of 2 ranks, 4 ranks in all, tp_size 2: the tp rows run inside a node (NVLink numbers), the
    sp rows across nodes (the network's); a layer's communication time is their sum, by the ring model."""
    from sp_compiler.cost_model import MachineProfile, RING_FACTORS, layer_costs
    from sp_compiler.plan import transform

    machine = MachineProfile("two-links", link_bw=100e9, link_latency_s=1e-6, peak_flops=1e12, mem_bw=1e11,
                             dtype="float32", gpus_per_node=2, node_link_bw=10e9, node_link_latency_s=5e-6)
    fm = fake_model("llama", layers=LAYERS, vocab=V, **DIMS)
    gm, ctx = transform(fm.config, strategy="ulysses", world=4, batch=B, seq_len=S, model=fm, options={"tp_size": 2})
    rows = [r for r in ctx.collectives if r["layer"] == "model.layers.1"]
    want = sum(1e-6 + r["bytes"] * RING_FACTORS[r["kind"]](2) / 100e9 if r["mesh"] == "tp"
               else 5e-6 + r["bytes"] * RING_FACTORS[r["kind"]](2) / 10e9 for r in rows)
    assert {r["mesh"] for r in rows} == {"tp", "sp"}
    assert layer_costs(gm, ctx, machine)["model.layers.1"].comm_s == pytest.approx(want)


def test_plan_lists_two_level_layouts_on_several_nodes():
    """``seqpar plan --gpus-per-node``: every T that divides the node and the world, for each strategy that
    runs across groups; one node lists none. The weights a rank holds shrink with T."""
    from sp_compiler.plan import plan

    config = fake_model("llama", layers=LAYERS, vocab=V, **DIMS).config
    preds = plan(config, world=8, seq_len=64, machine="h100-ib", gpus_per_node=4)
    two = {p.layout: p for p in preds if p.tp_size > 1}
    assert sorted(two) == sorted(f"{s} x tp{T}" for s in ACROSS for T in (2, 4)), sorted(two)
    assert all(p.ok and p.world == 8 for p in two.values()), [p.error for p in two.values()]
    assert two["ulysses x tp4"].weight_bytes < two["ulysses x tp2"].weight_bytes
    one = {p.layout: p for p in preds if p.tp_size == 1}      # a layer's activations: S/N rows beat S rows
    assert one["ulysses"].layer_activation_bytes < one["tp"].layer_activation_bytes
    assert not [p for p in plan(config, world=8, seq_len=64, machine="h100-ib", gpus_per_node=0) if p.tp_size > 1]


def test_auto_chooses_a_two_level_layout_when_the_network_is_slow(monkeypatch):
    """``strategy="auto"`` on 16 ranks in nodes of 8 prices the two-level layouts beside the others; with
    a network 1000x slower than NVLink the fewest bytes across nodes win: tp inside the whole node (T = 8),
    and the compile then runs on that mesh."""
    import dataclasses

    import sp_compiler.backend as backend
    from sp_compiler.cost_model import PROFILES
    from sp_compiler.testing import fake_process_group

    ib = PROFILES["h100-ib"]
    slow = dataclasses.replace(ib, name="slow-network", node_link_bw=ib.link_bw / 1000)
    monkeypatch.setattr(backend, "machine_profile", lambda: slow)
    model = build_model("llama", heads=16, kv_heads=16, hidden=256)
    with fake_process_group(16, 5), torch.no_grad():
        model.compile(backend="seqpar", options={"strategy": "auto", "lower": "eager"})
        model(torch.zeros(1, 64, dtype=torch.long), use_cache=False)
    _, ctx = backend.last_graph()
    assert ctx.options.tp_size == 8 and ctx.options.strategy in ACROSS, ctx.options
    assert (ctx.world, ctx.rank, ctx.inner.world, ctx.inner.rank) == (2, 0, 8, 5)


def test_a_weight_loaded_after_the_compile_is_cut_as_at_the_compile():
    """``PassContext.piece`` (what ``lower`` re-slices a weight loaded in place with) composes both levels:
    on rank 3 of 4 (t = 1, g = 1) it cuts from each whole weight exactly the piece the compile cut."""
    from sp_compiler.backend import last_graph
    from sp_compiler.testing import fake_process_group

    model = build_model("llama")
    with fake_process_group(4, 3), torch.no_grad():
        model.compile(backend="seqpar", options={"strategy": "ulysses", "tp_size": 2, "lower": "eager"})
        model(torch.zeros(1, 8, dtype=torch.long), use_cache=False)
    _, ctx = last_graph()
    assert ctx.inner.rank == 1 and ctx.inner.local_inputs
    for i, local in ctx.local_inputs.items():
        assert torch.equal(ctx.piece(i, ctx.full_inputs[i]), local), ctx.input_fqns[i]
        assert ctx.slices(i)


def test_plan_cli_prices_a_generation_prefill(capsys):
    """``seqpar plan --logits-to-keep 1`` prices ``model(ids, logits_to_keep=1)``: nothing vocabulary-sized
    is gathered, so the whole graph's peak activations are the in-layer ones; the table says whether each
    layout fits the device."""
    from sp_compiler.cli import main

    assert main(["plan", "--model", "llama-3-8b", "--world-size", "4", "--seq-len", "256", "--layers", "1",
                 "--strategies", "tp,ulysses", "--logits-to-keep", "1"]) == 0
    out = capsys.readouterr().out
    assert "logits_to_keep=1" in out and "fits 80 GB" in out, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["tp"], ["ulysses"])}
    whole, in_layers = rows["ulysses"].split("(")[0].split()[-1], rows["ulysses"].split("(")[1].split(")")[0]
    assert whole == in_layers and "yes" in rows["ulysses"], out
