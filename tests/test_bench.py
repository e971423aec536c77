"""``seqpar bench`` on a tiny Llama: 2 gloo ranks, S=64 and 96, tp and ulysses beside one-device eager.

Checks the JSON fields, exactness against one device, the bytes counted from the collectives that ran
(against the transformed graph's own collective list and against hand formulas from the config),
the markdown table and the collective counter on its own (a fake process group, no spawning).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from seqpar_testing import cached_run
from sp_compiler.bench import (BenchError, BenchSpec, CollectiveCounter, format_table, kendall_tau, missing_extras,
                               run_bench, write_outputs)
from sp_compiler.cost_model import MachineProfile
from sp_compiler.testing import fake_process_group

__all__ = []

B, L, H, HEADS, KV, V = 1, 2, 64, 4, 2, 256
D = H // HEADS
FP32 = 4
SEQ_LENS = (64, 96)
#: A fixed profile: predictions without calibrating this machine.
MACHINE = MachineProfile("test-cpu", link_bw=1e9, link_latency_s=5e-5, peak_flops=5e10, mem_bw=1e10, dtype="float32")


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=L,
                       num_attention_heads=HEADS, num_key_value_heads=KV, attn_implementation="sdpa")


def expected_bytes(strategy: str, S: int, N: int = 2) -> int:
    """Bytes per forward of ``model(ids, logits_to_keep=1, use_cache=True)`` with replicated outputs.

    tp: 2 all_reduce of B*S*H per layer; the KV cache (heads split) all-gathered: K and V of B*KV*S*D;
    the vocab-parallel embedding's all_reduce (B*S*H) and the kept row's logits gathered by vocabulary (B*V).
    ulysses: q|k|v all_to_all of this rank's rows (B*S/N*(H + 2*KV*D)) and the attention output's
    (B*S*H/N) per layer; K and V gathered as under tp; one all_reduce of the kept row (B*H) for lm_head.
    """
    kv_cache = 2 * B * KV * S * D
    if strategy == "tp":
        return (L * (2 * B * S * H + kv_cache) + B * S * H + B * V) * FP32
    if strategy == "ulysses":
        return (L * (B * S // N * (H + 2 * KV * D) + B * S * H // N + kv_cache) + B * H) * FP32
    raise ValueError(strategy)


@pytest.fixture(scope="module")
def result():
    spec = BenchSpec(model="tiny", config=tiny_config(), seq_lens=SEQ_LENS, world=2, strategies=("tp", "ulysses"),
                     references=("eager",), runs=2, warmup=1, lower="aot_eager", machine=MACHINE, timeout=300,
                     progress=False)
    return cached_run(("bench",), run_bench, spec)


def test_json_fields(result, tmp_path):
    meta = result["meta"]
    assert meta["world"] == 2 and meta["seq_lens"] == list(SEQ_LENS) and meta["backend"] == "gloo"
    assert meta["call"] == "model(input_ids, logits_to_keep=1, use_cache=True)"
    assert meta["machine"]["name"] == "test-cpu"
    names = [(r["seq_len"], r["name"]) for r in result["rows"]]
    assert names == [(S, n) for S in SEQ_LENS for n in ("eager", "tp", "ulysses")]
    for row in result["rows"]:
        assert row["ok"], row["error"]
        assert len(row["times_ms"]) == 2 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["first_call_s"] > 0 and len(row["peak_bytes_per_rank"]) == (2 if row["kind"] == "strategy" else 1)
        assert all(p > 0 for p in row["peak_bytes_per_rank"])
        if row["kind"] == "strategy":
            assert row["compile_s"] is not None and row["predicted_ms"] > 0
            assert row["measured_rank"] in (1, 2) and row["predicted_rank"] in (1, 2)
        else:
            assert row["compile_s"] is None and row["predicted_ms"] is None and row["bytes"] == 0
    for S in SEQ_LENS:
        r = result["rankings"][S]
        assert sorted(r["measured"]) == sorted(r["predicted"]) == ["tp", "ulysses"]
    path = write_outputs(result, str(tmp_path))[0]
    assert json.load(open(path))["rows"][0]["name"] == "eager"


def test_exact_against_one_device(result):
    for row in result["rows"]:
        assert row["max_abs_diff"] < 1e-4, row


def test_bytes_are_the_collectives_that_ran(result):
    for row in result["rows"]:
        if row["kind"] != "strategy":
            continue
        want = expected_bytes(row["name"], row["seq_len"])
        assert row["bytes"] == want, row
        assert row["bytes_per_rank"] == [want, want]
        assert row["graph_bytes"] == want                # the transformed graph's own collective list
        assert sum(c["bytes"] for c in row["collectives"].values()) == want
    tp = next(r for r in result["rows"] if r["name"] == "tp")
    assert tp["collectives"]["all_reduce"]["calls"] == 2 * L + 1 and tp["collectives"]["all_gather"]["calls"] == 2 * L + 1
    uly = next(r for r in result["rows"] if r["name"] == "ulysses")
    assert uly["collectives"]["all_to_all"]["calls"] == 2 * L


def test_markdown_has_a_row_per_run(result):
    text = format_table(result)
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]       # without the header
    assert len(rows) == len(SEQ_LENS) * 3
    for S in SEQ_LENS:
        for name in ("eager", "tp", "ulysses"):
            assert any(line.split("|")[1].strip() == str(S) and line.split("|")[2].strip() == name for line in rows)
    assert "measured" in text and "predicted" in text


def test_counter_sizes_on_a_fake_group():
    """One all_gather_into_tensor of 1000 floats on 2 ranks is 8000 bytes (what arrives); an all_reduce
    through torch.distributed (c10d) is its tensor's size; waits count nothing."""
    with fake_process_group(2):
        group = dist.group.WORLD.group_name
        x = torch.randn(1000)
        with CollectiveCounter() as c:
            y = torch.ops._c10d_functional.all_gather_into_tensor(x, 2, group)
            torch.ops._c10d_functional.wait_tensor(y)
            dist.all_reduce(torch.ones(10, 3))
    assert dict(c.calls) == {"all_gather": 1, "all_reduce": 1}
    assert dict(c.bytes) == {"all_gather": 8000, "all_reduce": 120}
    assert c.total_bytes == 8120 and c.describe() == "1 all_gather, 1 all_reduce"


def test_kendall_tau_and_errors():
    assert kendall_tau(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert kendall_tau(["a", "b", "c"], ["c", "b", "a"]) == -1.0
    assert kendall_tau(["a"], ["a"]) is None
    with pytest.raises(BenchError, match="unknown strategies"):
        BenchSpec(model="x", config=None, seq_lens=(8,), world=2, strategies=("fast",)).check()
    with pytest.raises(BenchError, match="references"):
        BenchSpec(model="x", config=None, seq_lens=(8,), world=2, references=("vllm",)).check()


def test_missing_extras_name_the_install_command(monkeypatch, capsys):
    import importlib.util

    from sp_compiler.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("matplotlib", "accelerate")
                        else real(name, *a))
    assert missing_extras(("eager",)) == ["matplotlib"]
    assert missing_extras(("eager", "hf_tp")) == ["matplotlib", "accelerate (for hf_tp)"]
    assert main(["bench", "--model", "bench-125m", "--layers", "1", "--seq-lens", "8"]) == 2
    assert "pip install -e '.[bench]'" in capsys.readouterr().err


def test_generate_mode_times_tokens_and_counts_decode_bytes():
    """--generate: one tiny generation per run; every rank's tokens equal eager's; under outputs="local" a
    generation's bytes are the prefill's plus, per decode step and layer, one all_gather of (out | lse)."""
    from sp_compiler.bench_report import format_generation_table

    K, S = 3, 64
    spec = BenchSpec(model="tiny", config=tiny_config(), seq_lens=(S,), world=2, strategies=("ulysses",),
                     references=("eager",), runs=1, warmup=0, lower="aot_eager", outputs="local", machine=None,
                     timeout=600, progress=False, generate=K)
    result = cached_run(("bench-generate",), run_bench, spec)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"eager", "ulysses"} and all(r["ok"] for r in rows.values()), result["rows"]
    u = rows["ulysses"]
    assert u["tokens_same"] and u["ttft_ms"] > 0 and u["tpot_ms"] > 0 and u["seqpar_graphs"] == 3
    prefill = (L * (B * S // 2 * (H + 2 * KV * D) + B * S * H // 2) + B * H) * FP32   # no cache gathered
    decode = (K - 1) * L * 2 * B * HEADS * (D + 1) * FP32
    assert u["bytes"] == prefill + decode, (u["bytes"], prefill, decode)
    assert "TTFT ms" in format_generation_table(result)
