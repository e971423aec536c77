"""The transformed-graph cache (sp_compiler/graph_cache.py): a compile that an earlier one already made
takes its graph from disk, skipping capture and the passes.

    same graph      a hit's local graph, collectives, output layout and weight slices are the miss's,
                    under a TP layout (sliced weights; KV heads widened where Hkv < N), a rows layout
                    and gpt-oss (sinks, token-local experts); its warnings are logged again
    the key         another option, rank or world size, or a changed pass constant misses
    not cached      decode steps (they read a KV cache), dump_dir, expert_parallel, SEQPAR_GRAPH_CACHE=0;
                    an unreadable entry is a miss with a warning
    buckets         a second prompt length's bucket graph (its appended length input) is cached too
    numerics        2 gloo ranks: hit prefills (a first length, a bucket) and the generation that follows
                    them match one device, and lower the same pieces (aot_eager, cut by layer)

The rest of the suite runs with the cache off (conftest), so every other test runs the passes.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from models import build_model, make_inputs
from sp_compiler import backend, graph_cache
from sp_compiler.testing import fake_process_group, run_ranks

__all__ = []

pytestmark = pytest.mark.usefixtures("dynamo_reset")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache on, in an empty directory of its own."""
    monkeypatch.setenv("SEQPAR_GRAPH_CACHE", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_FORCE_DISABLE_CACHES", raising=False)
    return tmp_path


def _entries(root) -> int:
    return len(list((root / "seqpar").rglob("*.pt"))) if (root / "seqpar").exists() else 0


def _compile(family="llama", world=2, rank=0, layers=2, call=None, model_args=None, **options):
    """One compile and call on a fake process group: (hits before, hits after, last graph, context, layout)."""
    torch._dynamo.reset()
    model = build_model(family, layers=layers, **(model_args or {}))
    before = graph_cache.hits()
    with torch.no_grad(), fake_process_group(world, rank):
        fast = torch.compile(model, backend="seqpar", options={"lower": "eager", **options})
        (call or (lambda f: f(make_inputs(family, 2, 13))))(fast)
    gm, ctx = backend.last_graph()
    return before, graph_cache.hits(), gm, ctx, backend.output_layout()


def _same(a, b):
    """Two compiles made the same local graph and left the same context."""
    _, _, gm_a, ctx_a, layout_a = a
    _, _, gm_b, ctx_b, layout_b = b
    assert gm_a.code == gm_b.code
    vals = [[(tuple(n.meta["val"].shape), n.meta.get("seqpar_placement"), n.meta.get("nn_module_stack", {}).keys())
             for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)] for gm in (gm_a, gm_b)]
    assert vals[0] == vals[1]
    assert ctx_a.collectives == ctx_b.collectives and ctx_a.attention_work == ctx_b.attention_work
    assert ctx_a.outputs == ctx_b.outputs and layout_a == layout_b
    assert ctx_a.sliced == ctx_b.sliced and set(ctx_a.local_inputs) == set(ctx_b.local_inputs)
    for i, x in ctx_a.local_inputs.items():
        assert torch.equal(x, ctx_b.local_inputs[i]), ctx_a.input_fqns[i]
    assert ctx_a.weight_bytes() == ctx_b.weight_bytes()


@pytest.mark.parametrize("family, strategy, model_args", [
    ("llama", "tp", {}),                                   # sliced weights
    ("llama", "megatron_sp", {"kv_heads": 1}),             # one KV head for 2 ranks: k/v weights widened
    ("llama", "vanilla_sp_zigzag", {}),                    # rows attention: its work per rank
    ("gpt_oss", "ulysses", {}),                            # sinks, token-local experts
])
def test_a_hit_is_the_graph_the_passes_made(cache, family, strategy, model_args):
    miss = _compile(family, strategy=strategy, model_args=model_args)
    hit = _compile(family, strategy=strategy, model_args=model_args)
    assert miss[1] == miss[0] and hit[1] == hit[0] + 1 and _entries(cache) == 1
    _same(miss, hit)
    if model_args:
        assert miss[3].widen and hit[3].widen.keys() == miss[3].widen.keys()


def test_a_bucket_of_lengths_is_cached(cache):
    """A second prompt length makes Dynamo's graph symbolic: seqpar compiles a bucket of lengths, padded,
    with the real length as an input the passes append (passes/prompt_length.py); that graph is cached too."""
    def two_lengths(fast):
        fast(make_inputs("llama", 1, 13))
        fast(make_inputs("llama", 1, 10))

    miss = _compile(strategy="ulysses", call=two_lengths)
    hit = _compile(strategy="ulysses", call=two_lengths)
    assert hit[1] - hit[0] == 2 and _entries(cache) == 2
    _same(miss, hit)                                                 # the bucket's graph, compiled last
    assert hit[3].real_len and hit[3].input_fqns[-1] is None and len(hit[3].example_inputs) == \
        len(hit[3].full_inputs) + 1


def test_a_hit_logs_the_passes_warnings_again(cache, caplog):
    warnings = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="seqpar"):
            _compile("qwen3_next", strategy="ulysses")
        warnings.append([r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING])
    assert graph_cache.hits() >= 1 and warnings[0] == warnings[1] and "linear attention" in warnings[0][0]


def test_what_the_transformation_reads_is_in_the_key(cache, monkeypatch):
    """One compile, then four that each change one thing: an option, the rank, the world size, a pass
    constant; each misses and writes its own entry."""
    import importlib

    _compile(strategy="ulysses")
    for change in ("option", "rank", "world", "constant"):
        if change == "constant":
            monkeypatch.setattr(importlib.import_module("passes.mask_blocks"), "MIN_MASK", 1)
        other = _compile(strategy="ulysses", outputs="local" if change == "option" else "replicate",
                         rank=1 if change == "rank" else 0, world=4 if change == "world" else 2)
        assert other[1] == other[0], change
    assert _entries(cache) == 5


def test_what_is_not_cached(cache, tmp_path, monkeypatch):
    """dump_dir (a dump shows every pass), expert_parallel (its gates live in a registry), the switch off:
    nothing is read or written."""
    for what in ("dump_dir", "expert_parallel", "off"):
        if what == "off":
            monkeypatch.setenv("SEQPAR_GRAPH_CACHE", "0")
        before, after, *_ = _compile("mixtral" if what == "expert_parallel" else "llama", strategy="ulysses",
                                     expert_parallel=what == "expert_parallel",
                                     **({"dump_dir": str(tmp_path / "dump")} if what == "dump_dir" else {}))
        assert after == before and _entries(cache) == 0, what


def test_decode_steps_are_not_cached(cache):
    """A generation: the prefill is cached; its decode steps read a KV cache and are compiled as before."""
    def generate(fast):
        fast.generate(make_inputs("llama", 1, 8), max_new_tokens=3, do_sample=False)

    compiles = backend.compile_count()
    _compile(strategy="ulysses", call=generate)
    assert backend.compile_count() - compiles == 3 and _entries(cache) == 1


def test_an_unreadable_entry_is_a_miss(cache, caplog):
    _compile(strategy="tp")
    (entry,) = (cache / "seqpar").rglob("*.pt")
    entry.write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING, logger="seqpar"):
        again = _compile(strategy="tp")
    assert again[1] == again[0] and "unreadable cache entry" in caplog.text


# ----------------------------------------------------------------------------- gloo ranks

def _rank_body(cache_dir):
    os.environ.update(SEQPAR_GRAPH_CACHE="1", TORCHINDUCTOR_CACHE_DIR=cache_dir)   # restored by the pool
    out, start = [], graph_cache.hits()
    for _ in range(2):                           # a miss, then a hit
        torch._dynamo.reset()
        model = build_model("llama", layers=2)
        model.compile(backend="seqpar", options={"strategy": "vanilla_sp_zigzag", "lower": "aot_eager"})
        with torch.no_grad():
            logits = model(make_inputs("llama", 2, 13)).logits
            shorter = model(make_inputs("llama", 2, 10)).logits                 # a bucket of lengths
            tokens = model.generate(make_inputs("llama", 1, 13), max_new_tokens=4, do_sample=False)
        regions = [g["regions"] for g in backend.compiled_graphs()[-4:]]       # the pieces each graph lowered
        out.append((logits, shorter, tokens, graph_cache.hits() - start, regions))
    return out


def test_a_hit_matches_one_device_and_generates(tmp_path):
    results = run_ranks(_rank_body, 2, str(tmp_path), timeout=600)
    model = build_model("llama", layers=2)
    with torch.no_grad():
        logits = model(make_inputs("llama", 2, 13)).logits
        shorter = model(make_inputs("llama", 2, 10)).logits
        tokens = model.generate(make_inputs("llama", 1, 13), max_new_tokens=4, do_sample=False)
    for rank, runs in enumerate(results):
        assert [r[3] for r in runs] == [0, 3], rank                  # the second round: its 3 prefills hit
        assert runs[0][4] == runs[1][4] and {"pieces": 4, "lowered": 3} in runs[0][4], runs[0][4]
        for got_logits, got_shorter, got_tokens, *_ in runs:
            torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_shorter, shorter, atol=1e-5, rtol=1e-5)
            assert torch.equal(got_tokens, tokens), rank
