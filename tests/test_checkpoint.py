"""Weights read per rank from a safetensors checkpoint (``options["checkpoint"]``, ``sp_compiler.from_pretrained``).

    fake process group   each rank's pieces put back together are the checkpoint's tensors; sliced
                         weights are 1/N of them; the model keeps its stand-ins; bad checkpoints and
                         mixed sources fail with the tensor and the file named
    gloo, 2 ranks        from_pretrained(dir) under every strategy: HF's default call equals
                         AutoModelForCausalLM.from_pretrained(dir) on one process, and so does a greedy
                         generation under megatron_sp_tp (--full: every strategy); a sharded checkpoint
                         (index + several files) for tp, with a sampled generation; Mixtral and
                         DeepSeek-V3 checkpoints as transformers writes them (one tensor per expert,
                         fused on load through transformers' conversion mapping)
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import build_model, make_inputs
from seqpar_testing import cached_run, full_or
from sp_compiler import CheckpointError, InputError, OptionsError, from_pretrained, stand_ins
from sp_compiler.testing import run_ranks, seqpar_error

__all__ = []

MODEL = dict(layers=2, heads=4, kv_heads=2, hidden=64)
SAMPLING_SEED = 7
STRATEGIES = full_or(("tp", "ulysses"), ("tp", "ulysses", "megatron_sp_tp", "vanilla_sp_zigzag"))
TOL = dict(atol=1e-5, rtol=1e-5)

pytestmark = pytest.mark.usefixtures("dynamo_reset")


def _save(path, family="llama", shard_size=None, **kw):
    model = build_model(family, **{**MODEL, **kw})
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    return model


def _compile_once(path, strategy, family="llama", **options):
    """from_pretrained on the fake group, one call; -> (model, the compile's context)."""
    import sp_compiler.backend as backend

    model = from_pretrained(str(path), strategy=strategy, lower="eager", check_ranks=False, **options)
    with torch.no_grad():
        model(make_inputs(family, 1, 9))
    return model, backend.last_graph()[1]


# ----------------------------------------------------------------------------- fake process group

@pytest.mark.parametrize("strategy", ["tp", "ulysses"])
def test_pieces_put_together_are_the_checkpoint(strategy, tmp_path, fake_pg):
    """Rank r's pieces, concatenated over r along the sliced dim, are the saved tensors; replicated ones
    are read whole; under tp each sliced weight is 1/N of its tensor; the model keeps its stand-ins."""
    saved = _save(tmp_path / "ck")
    want = load_file(str(tmp_path / "ck" / "model.safetensors"))
    pieces = {}
    for rank in range(2):
        fake_pg(2, rank)
        model, ctx = _compile_once(tmp_path / "ck", strategy)
        for i, x in ctx.local_inputs.items():
            pieces.setdefault(ctx.input_fqns[i], []).append((x.clone(), ctx.sliced.get(i)))
        torch.distributed.destroy_process_group()
        torch._dynamo.reset()
    assert set(pieces) == {n for n, _ in saved.named_parameters()}
    for name, ((a, p), (b, _)) in pieces.items():
        if p is None:
            assert torch.equal(a, want[name]) and torch.equal(b, want[name]), name
        else:
            assert a.numel() * 2 == want[name].numel(), (name, a.shape)
            assert torch.equal(torch.cat([a, b], dim=p.dim), want[name]), name
    assert any(p is not None for (_, p), _ in pieces.values()) == (strategy == "tp")
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.untyped_storage().nbytes() == w.element_size(), "the model holds a whole weight"


def test_sharded_checkpoint_with_index(tmp_path, fake_pg):
    _save(tmp_path / "ck", shard_size="40KB")
    files = sorted(os.listdir(tmp_path / "ck"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2, files
    fake_pg(2, 1)
    _, ctx = _compile_once(tmp_path / "ck", "tp")
    index = json.load(open(tmp_path / "ck" / "model.safetensors.index.json"))["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    i = ctx.input_fqns.index(name)
    full = load_file(str(tmp_path / "ck" / index[name]))[name]
    assert torch.equal(ctx.local_inputs[i], full[:, full.shape[1] // 2:]), "rank 1's rows of a row-parallel weight"


def _broken(tmp_path, edit):
    _save(tmp_path / "ck")
    file = str(tmp_path / "ck" / "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return tmp_path / "ck"


@pytest.mark.parametrize("case,words", [
    ("missing", ["'model.layers.1.mlp.up_proj.weight'", "is not in checkpoint"]),
    ("shape", ["'model.layers.0.self_attn.o_proj.weight'", "model.safetensors", "has shape [64, 16]", "[64, 64]"]),
    ("dtype", ["'model.norm.weight'", "model.safetensors", "stored as I64"]),
])
def test_a_bad_checkpoint_names_the_tensor_and_the_file(case, words, tmp_path, fake_pg):
    edits = {"missing": lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
             "shape": lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 16)}),
             "dtype": lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int64)})}
    path = _broken(tmp_path, edits[case])
    fake_pg(2, 0)
    with pytest.raises(Exception) as info:
        _compile_once(path, "tp")
    err = seqpar_error(info.value)
    assert isinstance(err, CheckpointError), repr(info.value)
    for w in words:
        assert w in str(err), (w, str(err))


@pytest.mark.parametrize("strategy, options", [("tp", {}), ("ulysses", {"expert_parallel": True})])
def test_a_checkpoint_transformers_converts_on_load_is_read_in_pieces(strategy, options, tmp_path, fake_pg):
    """Mixtral's checkpoint as transformers writes it keeps one tensor per expert (experts.3.w1.weight, ...)
    under the old module names (block_sparse_moe), which transformers renames and fuses when it loads
    (its conversion mapping). seqpar reads through the same mapping: rank r's pieces of the fused
    gate_up [E, 2I, H] (tp: its rows of every expert's w1 and w3; expert parallelism: its experts) and of
    down, put together, are the parameters AutoModelForCausalLM.from_pretrained makes."""
    from transformers import AutoModelForCausalLM

    from sp_compiler.placements import shard_tensor

    build_model("mixtral", layers=1).save_pretrained(tmp_path / "ck")
    stored = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in stored and not [
        k for k in stored if k.endswith("gate_up_proj")], sorted(stored)[:8]
    want = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "ck").named_parameters())
    pieces = {}
    for rank in range(2):
        fake_pg(2, rank)
        _, ctx = _compile_once(tmp_path / "ck", strategy, family="mixtral", **options)
        for i, x in ctx.local_inputs.items():
            pieces.setdefault(ctx.input_fqns[i], []).append((x.clone(), ctx.sliced.get(i)))
        torch.distributed.destroy_process_group()
        torch._dynamo.reset()
    assert set(pieces) == set(want)
    experts = [n for n in pieces if ".experts." in n]
    assert len(experts) == 2 and all(pieces[n][0][1] is not None for n in experts), experts
    for name, ranks in pieces.items():
        for rank, (piece, p) in enumerate(ranks):
            full = want[name].detach()
            assert torch.equal(piece, full if p is None else shard_tensor(full, p, 2, rank)), (name, rank)


def test_real_weights_and_a_checkpoint_are_refused(tmp_path, fake_pg):
    model = _save(tmp_path / "ck")
    fake_pg(2, 0)
    fast = torch.compile(model, backend="seqpar", options={"strategy": "tp", "lower": "eager",
                                                           "checkpoint": str(tmp_path / "ck")})
    with pytest.raises(Exception) as info, torch.no_grad():
        fast(make_inputs("llama", 1, 9))
    err = seqpar_error(info.value)
    assert isinstance(err, InputError) and "holds real values" in str(err) and "init_empty_weights" in str(err)


def test_stand_ins_without_a_checkpoint_are_refused(tmp_path, fake_pg):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    _save(tmp_path / "ck")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "ck"))
    stand_ins(model)
    fake_pg(2, 0)
    fast = torch.compile(model, backend="seqpar", options={"strategy": "tp", "lower": "eager"})
    with pytest.raises(Exception) as info, torch.no_grad():
        fast(make_inputs("llama", 1, 9))
    err = seqpar_error(info.value)
    assert isinstance(err, InputError) and "stand-in" in str(err) and "checkpoint" in str(err)


def _rss_file_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc/self/status")
def test_a_column_slice_leaves_no_pages_mapped(tmp_path):
    """A rowwise weight's slice reads a piece of every row of the memory-mapped file: those pages must
    not stay mapped (and counted in the rank's RSS) after the read, as they did while the read went
    through the shared handle (a tp rank peaked 500 MiB over its weights)."""
    from sp_compiler.checkpoint import Checkpoint
    from sp_compiler.placements import Shard

    rows = cols = 4096                                              # 64 MiB of float32
    save_file({"w": torch.randn(rows, cols)}, str(tmp_path / "model.safetensors"))
    like = torch.empty_strided((rows, cols), (0, 0))                # shape and dtype only
    before = _rss_file_mib()
    piece = Checkpoint(str(tmp_path)).read(["w"], like, Shard(1), world=2, rank=0)
    assert piece.shape == (rows, cols // 2)
    assert _rss_file_mib() - before < 16, "the file's pages stay mapped after a column slice"


def test_checkpoint_must_be_a_directory(tmp_path):
    with pytest.raises(OptionsError, match="not a directory"):
        from_pretrained(str(tmp_path / "nowhere"), strategy="tp")


def test_tied_embeddings_are_read_once(tmp_path, fake_pg):
    """GPT-2 ties lm_head to the embedding: the checkpoint holds one tensor, the stand-in stays tied."""
    _save(tmp_path / "ck", family="gpt2")
    fake_pg(2, 0)
    model = from_pretrained(str(tmp_path / "ck"), strategy="ulysses", lower="eager", check_ranks=False)
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        logits = model(make_inputs("gpt2", 1, 9)).logits
    assert logits.shape == (1, 9, model.config.vocab_size)


# ----------------------------------------------------------------------------- gloo ranks

#: the strategies that also generate (greedy) from the one-file checkpoint: a layout that slices the
#: weights by heads and one that slices them and splits the sequence; every strategy answers the prefill
GENERATE = full_or(("megatron_sp_tp",), tuple(STRATEGIES))


def _rank_body(path, sharded):
    out = {}
    for strategy in STRATEGIES:
        torch._dynamo.reset()
        model = from_pretrained(path, strategy=strategy, lower="aot_eager" if strategy in GENERATE else "eager")
        with torch.no_grad():
            logits = model(make_inputs("llama", 2, 13)).logits                          # HF's default call
            tokens = None
            if strategy in GENERATE:
                tokens = model.generate(make_inputs("llama", 1, 11), max_new_tokens=4, do_sample=False)
        out[strategy] = (logits, tokens)
    torch._dynamo.reset()
    model = from_pretrained(sharded, strategy="tp", lower="aot_eager")
    with torch.no_grad():
        logits = model(make_inputs("llama", 2, 13)).logits
        torch.manual_seed(SAMPLING_SEED)                               # the same seed on every rank
        sampled = model.generate(make_inputs("llama", 1, 11), max_new_tokens=4, do_sample=True, top_k=20)
    out["tp-sharded"] = (logits, sampled)
    return out


def test_from_pretrained_matches_one_device(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("ck")
    _save(root / "one")
    _save(root / "sharded", shard_size="40KB")
    results = cached_run(("checkpoint",), run_ranks, _rank_body, 2, str(root / "one"), str(root / "sharded"),
                         timeout=900)
    ref = AutoModelForCausalLM.from_pretrained(root / "one")
    with torch.no_grad():
        want_logits = ref(make_inputs("llama", 2, 13)).logits
        want_tokens = ref.generate(make_inputs("llama", 1, 11), max_new_tokens=4, do_sample=False)
        torch.manual_seed(SAMPLING_SEED)
        want_sampled = ref.generate(make_inputs("llama", 1, 11), max_new_tokens=4, do_sample=True, top_k=20)
    for rank, res in enumerate(results):
        for name, (logits, tokens) in res.items():
            torch.testing.assert_close(logits, want_logits, **TOL, msg=lambda m: f"rank {rank} {name}: {m}")
            want = want_sampled if name == "tp-sharded" else want_tokens      # sampling, or greedy
            assert (tokens is None) == (name not in GENERATE and name != "tp-sharded"), (rank, name)
            assert tokens is None or torch.equal(tokens, want), (rank, name, tokens, want)


#: mixture-of-experts checkpoints as transformers writes them (one tensor per expert, fused on load): the
#: sliced experts with a greedy generation; expert parallelism with DeepSeek-V3's persistent buffer
#: (e_score_correction_bias: the checkpoint's, read whole by load_buffers)
MOE_CASES = [("mixtral", "tp", {}), ("deepseek_v3", "ulysses", {"expert_parallel": True})]


def _moe_rank_body(root):
    out = {}
    for family, strategy, options in MOE_CASES:
        torch._dynamo.reset()
        model = from_pretrained(os.path.join(root, family), strategy=strategy, lower="eager", **options)
        with torch.no_grad():
            out[family] = (model(make_inputs(family, 2, 13)).logits,
                           model.generate(make_inputs(family, 1, 11), max_new_tokens=4, do_sample=False))
    return out


@pytest.mark.parametrize("family", [f for f, _, _ in MOE_CASES])
def test_moe_from_pretrained_matches_one_device(family, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.getbasetemp() / "ck-moe"
    if not root.exists():
        for f, _, _ in MOE_CASES:
            model = build_model(f, layers=2)
            if f == "deepseek_v3":                 # a bias that changes the routing, so reading it matters
                for layer in model.model.layers[1:]:
                    layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-1, 1, 4))
            model.save_pretrained(root / f)
    results = cached_run(("checkpoint-moe",), run_ranks, _moe_rank_body, 2, str(root), timeout=900)
    ref = AutoModelForCausalLM.from_pretrained(root / family)
    with torch.no_grad():
        want = (ref(make_inputs(family, 2, 13)).logits,
                ref.generate(make_inputs(family, 1, 11), max_new_tokens=4, do_sample=False))
    for rank, res in enumerate(results):
        logits, tokens = res[family]
        torch.testing.assert_close(logits, want[0], **TOL, msg=lambda m: f"rank {rank}: {m}")
        assert torch.equal(tokens, want[1]), (rank, tokens, want[1])


def _one_rank_broken(good, broken):
    """Rank 0 reads ``good``; rank 1 reads a copy that lacks a tensor. Every rank returns its error's type."""
    import torch.distributed as dist

    path = good if dist.get_rank() == 0 else broken
    try:
        model = from_pretrained(path, strategy="tp", lower="eager")
        with torch.no_grad():
            model(make_inputs("llama", 1, 9))
    except Exception as e:  # noqa: BLE001 - the test reads what each rank raised
        err = seqpar_error(e)
        return type(err if err is not None else e).__name__
    return "no error"


def test_a_rank_with_a_bad_checkpoint_stops_every_rank(tmp_path):
    """Ranks given different checkpoints (rank 1's lacks a tensor): rank 1 names the tensor
    (CheckpointError), rank 0 raises RankMismatchError at the call's rank check instead of waiting in
    a collective; neither hangs (run_ranks times out after 120 s)."""
    _save(tmp_path / "good")
    broken = _broken(tmp_path / "b", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    got = run_ranks(_one_rank_broken, 2, str(tmp_path / "good"), str(broken), timeout=120)
    assert got == ["RankMismatchError", "CheckpointError"], got
