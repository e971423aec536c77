"""The ``options`` dict, the backend's registration, the errors users see, and ``dump_dir``.

Options are validated when Dynamo hands the first graph to the backend, so errors that
come through ``torch.compile`` arrive wrapped in ``BackendCompilerFailed``; the tests
look for the seqpar error inside (``sp_compiler.testing.seqpar_error``) and in the message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import sp_compiler
from sp_compiler.config import LOWERINGS, STRATEGY_NAMES, Options
from sp_compiler.errors import OptionsError, SeqparError, ShapeConstraintError
from sp_compiler.strategies import STRATEGIES

from models import build_model, make_inputs
from seqpar_testing import compile_logits
from sp_compiler.testing import error_text, seqpar_error

__all__ = []

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

pytestmark = pytest.mark.usefixtures("dynamo_reset")

#: The option names and values users write (scripts and tests rely on them).
OPTION_KEYS = ("strategy", "layers", "dump_dir", "lower", "outputs", "buckets")
ALL_STRATEGIES = ("tp", "vanilla_sp", "vanilla_sp_zigzag", "megatron_sp", "megatron_sp_tp", "ulysses", "auto")
ALL_LOWERINGS = ("inductor", "aot_eager", "eager")


def _tiny_fn(x):
    return torch.sin(x) + 1


def _compile_tiny(options):
    """Compile and call a tiny function: options are checked before anything else."""
    fn = torch.compile(_tiny_fn, backend="seqpar", options=options)
    return fn(torch.randn(4))


def _assert_lists_all(msg, names):
    for name in names:
        assert repr(name) in msg or name in msg, f"{name!r} not listed in: {msg}"


# ----------------------------------------------------------------------------- valid names

def test_design_names_are_the_valid_ones():
    assert set(STRATEGY_NAMES) == set(ALL_STRATEGIES)
    assert set(LOWERINGS) == set(ALL_LOWERINGS)


def test_defaults():
    opts = Options.from_dict(None)
    assert (opts.strategy, opts.lower, opts.dump_dir, dict(opts.layers)) == ("ulysses", "inductor", None, {})
    assert (opts.outputs, opts.buckets) == ("replicate", "auto")
    assert Options.from_dict({}) == opts


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("lower", ALL_LOWERINGS)
def test_every_implemented_strategy_and_lowering_is_accepted(strategy, lower):
    opts = Options.from_dict({"strategy": strategy, "lower": lower})
    assert (opts.strategy, opts.lower) == (strategy, lower)


# ----------------------------------------------------------------------------- OptionsError

def test_unknown_option_key_lists_valid_keys():
    with pytest.raises(OptionsError) as info:
        Options.from_dict({"strategy": "tp", "stratgey": "tp"})
    msg = str(info.value)
    assert "stratgey" in msg
    _assert_lists_all(msg, OPTION_KEYS)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("key,bad,valid", [
    ("strategy", "ring", ALL_STRATEGIES),
    ("lower", "tensorrt", ALL_LOWERINGS),
], ids=["strategy", "lower"])
def test_unknown_value_lists_valid_values(key, bad, valid):
    with pytest.raises(OptionsError) as info:
        Options.from_dict({"strategy": "tp", key: bad})
    msg = str(info.value)
    assert bad in msg
    _assert_lists_all(msg, valid)


def test_unknown_strategy_in_layers_is_an_options_error():
    with pytest.raises(OptionsError) as info:
        Options.from_dict({"strategy": "tp", "layers": {"model.layers.0-1": "ring"}})
    assert "ring" in str(info.value)


@pytest.mark.parametrize("options,bad,valid", [
    ({"strategy": "ulysses", "bogus_key": 1}, "bogus_key", OPTION_KEYS),
    ({"strategy": "ring"}, "ring", ALL_STRATEGIES),
    ({"strategy": "ulysses", "lower": "tensorrt"}, "tensorrt", ALL_LOWERINGS),
], ids=["key", "strategy", "lower"])
def test_options_errors_through_torch_compile(options, bad, valid):
    with pytest.raises(Exception) as info:
        _compile_tiny(options)
    inner = seqpar_error(info.value)
    assert isinstance(inner, OptionsError), f"expected an OptionsError inside {info.value!r}"
    assert isinstance(inner, ValueError)
    msg = str(info.value)                       # Dynamo's wrapper carries the message too
    assert "OptionsError" in msg and bad in msg
    _assert_lists_all(msg, valid)


# ----------------------------------------------------------------------------- every valid name

@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_every_valid_strategy_is_accepted(strategy):
    assert Options.from_dict({"strategy": strategy}).strategy == strategy


@pytest.mark.parametrize("key,value", [("outputs", "local"), ("outputs", "replicate"), ("buckets", "exact"),
                                       ("buckets", [1024, 4096])])
def test_output_and_bucket_options_are_accepted(key, value):
    assert getattr(Options.from_dict({key: value}), key) == value


def test_layers_with_valid_strategies_is_accepted():
    opts = Options.from_dict({"strategy": "tp", "layers": {"model.layers.0-1": "megatron_sp_tp"}})
    assert dict(opts.layers) == {"model.layers.0-1": "megatron_sp_tp"}


# ----------------------------------------------------------------------------- registration

def _run_python(code: str, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = TESTS                       # models.py only; sp_compiler comes from the install
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=TESTS, env=env)


def test_backend_name_resolves_through_the_entry_point():
    """A fresh interpreter that never imports sp_compiler finds backend="seqpar", once."""
    proc = _run_python("""
        import sys, torch
        assert "sp_compiler" not in sys.modules
        fn = torch._dynamo.lookup_backend("seqpar")
        assert "sp_compiler" in sys.modules
        import sp_compiler.backend
        assert fn is sp_compiler.backend.seqpar_backend, fn
        names = torch._dynamo.list_backends(exclude_tags=())
        assert names.count("seqpar") == 1, names
        print("OK")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_compile_without_importing_the_package():
    """World 1 (no process group): the compiled model equals the model, and the user never imported seqpar."""
    proc = _run_python("""
        import sys, torch
        from models import build_model, make_inputs
        model = build_model("llama")
        ids = make_inputs("llama", 2, 16)
        fast = torch.compile(model, backend="seqpar", options={"strategy": "ulysses", "lower": "eager"})
        with torch.no_grad():
            got = fast(ids, use_cache=False).logits
            want = model(ids, use_cache=False).logits
        torch.testing.assert_close(got, want)
        from sp_compiler.backend import last_report
        assert last_report() == [], last_report()      # one rank: nothing to communicate
        print("OK")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- shape errors

def _compile_error(family, strategy, seq=16, **model_kw):
    model = build_model(family, **model_kw)
    with pytest.raises(Exception) as info:
        compile_logits(model, make_inputs(family, 2, seq), {"strategy": strategy, "lower": "eager"})
    return info.value


def _assert_names_heads_and_world(exc, count, world=4):
    """The error is seqpar's, says which head count does not divide, and says the world size."""
    inner = seqpar_error(exc)
    assert isinstance(inner, SeqparError), repr(exc)
    msg = str(inner)
    assert "head" in msg.lower() and re.search(rf"\b{count}\b", msg), f"head count {count} not named: {msg}"
    assert re.search(rf"world size\D{{0,3}}{world}\b|\b{world} ranks", msg), f"world size {world} not named: {msg}"
    return inner


HEAD_CASES = [
    # family, model kwargs, the head count that does not divide 4
    pytest.param("gpt2", dict(heads=2, hidden=64), 2, id="gpt2-H2"),
    pytest.param("llama", dict(heads=6, kv_heads=2, hidden=96), 6, id="llama-H6"),
]


@pytest.mark.parametrize("family,model_kw,count", HEAD_CASES)
def test_ulysses_heads_not_divisible_by_world(fake_pg, family, model_kw, count):
    """Ulysses at world 4 with H % 4 != 0: a ShapeConstraintError naming the heads and the world."""
    fake_pg(4)
    exc = _compile_error(family, "ulysses", **model_kw)
    assert isinstance(_assert_names_heads_and_world(exc, count), ShapeConstraintError)


TP_STRATEGIES = ["tp", "megatron_sp", "megatron_sp_tp"]


@pytest.mark.parametrize("strategy", TP_STRATEGIES)
def test_tp_mha_heads_not_divisible_by_world(fake_pg, strategy):
    fake_pg(4)
    exc = _compile_error("gpt2", strategy, heads=2, hidden=64)
    assert isinstance(_assert_names_heads_and_world(exc, 2), ShapeConstraintError)


@pytest.mark.parametrize("strategy", TP_STRATEGIES)
def test_tp_gqa_query_heads_not_divisible_by_world(fake_pg, strategy):
    """llama H=6, Hkv=2 at world 4: refused, naming the 6 query heads and the world size."""
    fake_pg(4)
    exc = _compile_error("llama", strategy, heads=6, kv_heads=2, hidden=96)
    assert isinstance(_assert_names_heads_and_world(exc, 6), ShapeConstraintError)


def test_tp_gqa_query_heads_error_blames_the_query_heads(fake_pg):
    fake_pg(4)
    msg = error_text(_compile_error("llama", "tp", heads=6, kv_heads=2, hidden=96))
    assert not re.search(r"KV heads must divide the world size", msg), msg
    assert re.search(r"query heads", msg) and re.search(r"\b6\b", msg), msg


@pytest.mark.parametrize("strategy", TP_STRATEGIES)
def test_tp_kv_heads_that_do_not_divide_the_world(fake_pg, strategy):
    """llama H=12, Hkv=3 at world 4: 3 KV heads neither divide 4 nor are divisible by it."""
    fake_pg(4)
    exc = _compile_error("llama", strategy, heads=12, kv_heads=3, hidden=96)
    assert isinstance(_assert_names_heads_and_world(exc, 3), ShapeConstraintError)


@pytest.mark.parametrize("strategy", TP_STRATEGIES)
def test_tp_heads_not_divisible_is_a_seqpar_error(fake_pg, strategy):
    """Whatever the message, a non-dividing head count is refused at compile time with a
    seqpar error (never a wrong answer or a crash inside a kernel)."""
    fake_pg(4)
    exc = _compile_error("gpt2", strategy, heads=2, hidden=64)
    assert isinstance(seqpar_error(exc), SeqparError), repr(exc)


def test_tp_does_not_need_a_divisible_sequence(fake_pg):
    """tp keeps the sequence whole: seq 15 at world 2 compiles (all_reduce only, but for the vocab-parallel
    lm_head's logits, gathered by vocabulary)."""
    from sp_compiler.backend import last_report

    fake_pg(2)
    logits = compile_logits(build_model("llama"), make_inputs("llama", 2, 15), {"strategy": "tp", "lower": "eager"})
    assert logits.shape == (2, 15, 128)
    assert {(r["kind"], r["layer"]) for r in last_report() if r["kind"] != "all_reduce"} == {("all_gather", "lm_head")}


# ----------------------------------------------------------------------------- dump_dir

def _graph_dirs(root, rank):
    base = os.path.join(root, f"rank{rank}")
    assert os.path.isdir(base), f"no {base}; dump_dir holds {os.listdir(root)}"
    dirs = sorted(d for d in os.listdir(base) if re.fullmatch(r"graph\d+", d))
    assert dirs, f"no graph{{K}} directory in {base}: {os.listdir(base)}"
    return [os.path.join(base, d) for d in dirs]


@pytest.mark.parametrize("rank", [0, 1])
def test_dump_dir_ulysses(fake_pg, tmp_path, rank):
    from sp_compiler.backend import last_report

    fake_pg(2, rank)
    dump = tmp_path / "dump"
    compile_logits(build_model("llama"), make_inputs("llama", 2, 16),
                   {"strategy": "ulysses", "lower": "eager", "dump_dir": str(dump)})
    dirs = _graph_dirs(str(dump), rank)
    assert len(dirs) == 1, dirs                                 # one graph: the whole forward
    assert not os.path.exists(dump / f"rank{1 - rank}")         # a rank writes only its own files
    g = dirs[0]
    for name in ("before.txt", "after.txt", "collectives.txt", "collectives.json"):
        path = os.path.join(g, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, path

    after = open(os.path.join(g, "after.txt")).read()
    before = open(os.path.join(g, "before.txt")).read()
    assert "all_to_all" in after
    assert "all_to_all" not in before                           # before: as captured, no collectives
    assert "S(1)" in before                                     # with placements

    table = open(os.path.join(g, "collectives.txt")).read()
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if re.search(r"\blayer\b.*\bkind\b.*\bbytes\b", line))
    assert re.fullmatch(r"[-\s]+", lines[header + 1]), "header is followed by a rule line"
    body = []
    for line in lines[header + 2:]:
        if not line.strip():
            break
        body.append(line)
    assert len(body) == len(last_report()) == 5, table         # 2 all_to_all x 2 layers + the logits
    assert sum("all_to_all" in line for line in body) == 4, table
    assert sum("all_gather" in line for line in body) == 1, table
    assert "model.layers.0" in table and "model.layers.1" in table

    rows_json = json.load(open(os.path.join(g, "collectives.json")))
    report = last_report()
    assert [(r["layer"], r["kind"], r["bytes"]) for r in rows_json] == \
           [(r["layer"], r["kind"], r["bytes"]) for r in report]


def test_no_dump_without_dump_dir(fake_pg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_pg(2)
    compile_logits(build_model("llama"), make_inputs("llama", 2, 16), {"strategy": "ulysses", "lower": "eager"})
    assert os.listdir(tmp_path) == []


def test_package_exports_errors():
    for name in ("SeqparError", "OptionsError", "InputError", "ShapeConstraintError", "ShardingError",
                 "UnsupportedOpError"):
        assert issubclass(getattr(sp_compiler, name), SeqparError)
    assert issubclass(OptionsError, ValueError)
