"""vanilla_sp and vanilla_sp_zigzag: collectives, masks, load balance, permutation, numerics.

Notation: B batch, S sequence, N world, V vocab, H query heads, Hkv the model's own KV
heads, D = hidden / H; fp32 (4 bytes). Every expected number below is computed here from
the config, never read back from the engine.

    per decoder layer   1 all_gather of K|V packed, on Hkv heads (before repeat_kv):
                        gathered [N, F], F = 2*B*Hkv*(S/N)*D,  bytes = N*F*4
    after the layers    1 all_gather of the logits ('lm_head'): bytes = B*S*V*4
    nothing else

Zig-zag: 2N chunks of C = S/(2N) rows; rank r holds chunks r and 2N-1-r, in that order.

Tier 1 (fake process group, one process) checks the transformed local graph: counts,
bytes, that no [.., S, S] tensor exists (constant causal masks are folded to is_causal,
runtime masks are built on the local rows only), the per-rank attention work against a
brute-force count of causal score entries, and where the ids are sliced and the logits
gathered. Tier 2 (gloo ranks) compares logits with the uncompiled model for every family
x {causal, packed documents, left padding} x both layouts x N in {2, 4} (lower=aot_eager),
plus mistral with a sliding window (a constant mask that is not causal), plus one
inductor run per layout.
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections import Counter

import pytest
import torch
from torch.fx.node import map_arg

from models import FAMILIES, build_model, make_inputs, packed_position_ids
from seqpar_testing import FULL, cached_run, compile_logits, fake_model, full_or, layer_names, model_dims
from sp_compiler.testing import run_ranks

__all__ = []

VANILLA = ("vanilla_sp", "vanilla_sp_zigzag")
B, S, LAYERS, VOCAB = 2, 32, 2, 128
SHAPE = dict(heads=8, kv_heads=2, hidden=64)           # D = 8, H / Hkv = 4
FP32 = 4
DOCS = [5, 11, 8, 8]                                   # packed documents, sum = S
LEFT_PAD = (5, 3)                                      # padded positions at the start of each row
TOL = dict(atol=1e-5, rtol=1e-5)

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
COLLECTIVE_OPS = {
    c10d.all_gather_into_tensor.default: "all_gather",
    c10d.reduce_scatter_tensor.default: "reduce_scatter",
    c10d.all_reduce.default: "all_reduce",
    c10d.all_to_all_single.default: "all_to_all",
}


# ----------------------------------------------------------------------------- inputs and expectations

def left_pad_mask(batch=B, seq=S, pads=LEFT_PAD):
    m = torch.ones(batch, seq, dtype=torch.long)
    for b, p in enumerate(pads):
        m[b, :p] = 0
    return m


def case_kwargs(case: str, batch=B, seq=S) -> dict:
    """Extra forward kwargs: 'causal' (none), 'packed' (position_ids restart per doc), 'padded'."""
    if case == "causal":
        return {}
    if case == "packed":
        assert sum(DOCS) == seq
        return {"position_ids": packed_position_ids(batch, DOCS)}
    if case == "padded":
        return {"attention_mask": left_pad_mask(batch, seq)}
    raise ValueError(case)


def own_chunks(world, rank, zigzag):
    """(global chunk ids of this rank's rows in local order, number of chunks)."""
    return ((rank, 2 * world - 1 - rank), 2 * world) if zigzag else ((rank,), world)


def own_rows(seq, world, rank, zigzag):
    """Global sequence positions of a rank's local rows, in local order."""
    chunks, n = own_chunks(world, rank, zigzag)
    C = seq // n
    return [c * C + i for c in chunks for i in range(C)]


def causal_entries(rows) -> int:
    """Unmasked causal score entries for these query rows: row i sees keys 0..i (brute force)."""
    keep = torch.ones(max(rows) + 1, max(rows) + 1, dtype=torch.bool).tril()
    return int(sum(keep[i].sum() for i in rows))


def kv_gather_bytes(family, world, seq=S, batch=B, heads=SHAPE["heads"], kv_heads=SHAPE["kv_heads"],
                    hidden=SHAPE["hidden"], use_query_heads=False):
    d = model_dims(family, heads, kv_heads, hidden)
    h = d["H"] if use_query_heads else d["Hkv"]
    local_k = batch * h * (seq // world) * d["head_dim"]
    return world * 2 * local_k * FP32, (world, 2 * local_k)


# ----------------------------------------------------------------------------- tier 1 helpers

_cache: dict = {}


def compile_fake(family, strategy, world, rank, case="causal", seq=S, layers=LAYERS, dump_dir=None,
                 **shape):
    """The seqpar backend on rank ``rank`` of a fake group: (report, gm, ctx). Dynamo traces each
    weightless model once per input case (``plan.transform``); every strategy, world and rank
    transforms that graph. Memoised (no dump_dir)."""
    from sp_compiler.backend import last_report
    from sp_compiler.plan import transform

    shape = shape or SHAPE
    key = (family, strategy, world, rank, case, seq, layers, tuple(sorted(shape.items())))
    if dump_dir is None and key in _cache:
        return _cache[key]
    fm = fake_model(family, layers=layers, vocab=VOCAB, **shape)
    options = {} if dump_dir is None else {"dump_dir": str(dump_dir)}
    gm, ctx = transform(fm.config, strategy=strategy, world=world, rank=rank, batch=B, seq_len=seq, model=fm,
                        call=case_kwargs(case, B, seq), options=options)
    out = (last_report(), gm, ctx)
    assert ctx.world == world and ctx.rank == rank and ctx.seq_len == seq
    if dump_dir is None:
        _cache[key] = out
    return out


def vals(node):
    v = node.meta.get("val")
    return [t for t in (v if isinstance(v, (tuple, list)) else [v]) if isinstance(t, torch.Tensor)]


def graph_collectives(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in COLLECTIVE_OPS]


def attention_nodes(gm):
    from sp_compiler.rules import ATTENTION_OPS

    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION_OPS]


def fmt_report(report):
    return "\n".join(map(str, report))


# ----------------------------------------------------------------------------- 1. collectives

CASES_1 = [pytest.param(f, s, w, id=f"{f}-{s}-w{w}") for w in (2, 4) for s in VANILLA
           for f in ("llama", "qwen2", "gpt2")]


@pytest.mark.parametrize("family,strategy,world", CASES_1)
def test_one_kv_all_gather_per_layer(family, strategy, world):
    report, gm, _ = compile_fake(family, strategy, world, rank=world - 1)
    want_bytes, want_shape = kv_gather_bytes(family, world)
    for layer in layer_names(family, LAYERS):
        rows = [r for r in report if r["layer"] == layer]
        assert [(r["kind"], r["bytes"]) for r in rows] == [("all_gather", want_bytes)], (
            f"{layer}: want one all_gather of {want_bytes} bytes\n{fmt_report(report)}")
        assert tuple(rows[0]["shape"]) == want_shape and rows[0]["dtype"] == "float32", rows[0]


@pytest.mark.parametrize("family,strategy,world", CASES_1)
def test_logits_gathered_once_and_nothing_else(family, strategy, world):
    report, gm, _ = compile_fake(family, strategy, world, rank=world - 1)
    layers = set(layer_names(family, LAYERS))
    outside = [(r["layer"], r["kind"], r["bytes"]) for r in report if r["layer"] not in layers]
    assert outside == [("lm_head", "all_gather", B * S * VOCAB * FP32)], fmt_report(report)
    assert Counter(r["kind"] for r in report) == {"all_gather": LAYERS + 1}, fmt_report(report)

    # the graph itself, not only the report: LAYERS + 1 all_gathers, each waited on once
    nodes = graph_collectives(gm)
    assert Counter(COLLECTIVE_OPS[n.target] for n in nodes) == {"all_gather": LAYERS + 1}
    waits = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == c10d.wait_tensor.default]
    assert len(waits) == LAYERS + 1
    # local send buffer F and gathered output N*F match the formula (K|V layers, then logits)
    _, (_, F) = kv_gather_bytes(family, world)
    sizes = sorted((math.prod(vals(n.args[0])[0].shape), math.prod(vals(n)[0].shape)) for n in nodes)
    logits_F = B * (S // world) * VOCAB
    assert sizes == sorted([(F, world * F)] * LAYERS + [(logits_F, world * logits_F)]), sizes


@pytest.mark.parametrize("strategy", VANILLA)
@pytest.mark.parametrize("world", (2, 4))
def test_llama_gqa_pays_for_kv_heads_not_query_heads(strategy, world):
    """llama H=8, Hkv=2: the K|V gather moves Hkv heads (before repeat_kv), 4x less than H."""
    report, _, _ = compile_fake("llama", strategy, world, rank=0)
    gqa, _ = kv_gather_bytes("llama", world)
    mha, _ = kv_gather_bytes("llama", world, use_query_heads=True)
    assert mha == 4 * gqa
    got = [r["bytes"] for r in report if r["layer"] == "model.layers.0"]
    assert got == [gqa] and mha not in got, (got, gqa, mha)


@pytest.mark.parametrize("strategy", VANILLA)
def test_batch_one_bytes(fake_pg, strategy):
    """B = 1: B*S rows no longer tell batch and sequence apart; the formula still holds."""
    from sp_compiler.backend import last_report

    world = 2
    fake_pg(world, 1)
    logits = compile_logits(build_model("llama", layers=LAYERS, vocab=VOCAB, **SHAPE),
                            make_inputs("llama", 1, S, vocab=VOCAB), {"strategy": strategy, "lower": "eager"})
    assert tuple(logits.shape) == (1, S, VOCAB)
    kv, _ = kv_gather_bytes("llama", world, batch=1)
    want = [(layer, "all_gather", kv) for layer in layer_names("llama", LAYERS)]
    want.append(("lm_head", "all_gather", 1 * S * VOCAB * FP32))
    assert [(r["layer"], r["kind"], r["bytes"]) for r in last_report()] == want


@pytest.mark.parametrize("world,seq", [(2, 18), (4, 36)])
def test_zigzag_length_not_divisible_by_2n_is_balanced(world, seq):
    """2N does not divide S: the 2N chunks differ by at most one row, every rank holds two of them,
    and together the ranks hold every row once (exactness: tests/test_prefill_calls.py)."""
    from sp_compiler.placements import Layout

    lay = Layout(seq, world, zigzag=True)
    rows = sorted(p for r in range(world) for start, n in lay.spans(r) for p in range(start, start + n))
    assert rows == list(range(seq))
    assert {n for c in range(2 * world) for _, n in [lay.span(c)]} == {seq // (2 * world), seq // (2 * world) + 1}
    for r in range(world):
        assert lay.chunk_ids(r) == (r, 2 * world - 1 - r)


@pytest.mark.parametrize("strategy", VANILLA)
def test_every_rank_builds_the_same_collectives(strategy):
    keep = ("layer", "kind", "dim", "shape", "dtype", "bytes")
    rows = [[{k: r[k] for k in keep} for r in compile_fake("llama", strategy, 4, rank)[0]] for rank in range(4)]
    for rank in range(1, 4):
        assert rows[rank] == rows[0], f"rank {rank} differs from rank 0"


# ----------------------------------------------------------------------------- 2. no S x S tensor

def square_nodes(gm, seq):
    """Nodes with a tensor whose two trailing dims are both seq."""
    return [(n.name, tuple(t.shape)) for n in gm.graph.nodes for t in vals(n)
            if t.dim() >= 2 and t.shape[-1] == seq and t.shape[-2] == seq]


@pytest.mark.parametrize("case", ("causal", "packed", "padded"))
@pytest.mark.parametrize("strategy", VANILLA)
@pytest.mark.parametrize("family", ("llama", "gpt2"))
@pytest.mark.parametrize("world", full_or((2,), (2, 4)))
def test_no_global_mask_in_the_local_graph(family, strategy, world, case):
    # no feature dim of these models equals S, so a [.., S, S] tensor can only be a mask or scores
    E, D = SHAPE["hidden"], SHAPE["hidden"] // SHAPE["heads"]
    assert S not in {E, 2 * E, 3 * E, 4 * E, SHAPE["kv_heads"] * D, VOCAB}
    _, gm, ctx = compile_fake(family, strategy, world, rank=1, case=case)
    assert square_nodes(gm, S) == [], f"[.., S, S] tensors in the local graph: {square_nodes(gm, S)[:5]}"
    atts = attention_nodes(gm)
    assert atts, "no attention node in the transformed graph"
    from sp_compiler.rules import attention_inputs

    masks = [attention_inputs(n)[3] for n in atts]
    if case == "causal":
        assert masks == [None] * len(atts), "a constant causal mask was not folded to is_causal"
        assert ctx.attention_work["kind"] == "causal"
    else:
        # a runtime mask: one attention per layer, its mask built on the local rows only
        assert len(atts) == LAYERS
        for m in masks:
            assert m is not None, f"{case}: the input-dependent mask vanished"
            shape = tuple(vals(m)[0].shape)
            assert shape[-2:] == (S // world, S), f"{case}: mask {shape}, want [.., {S // world}, {S}]"
        assert ctx.attention_work["kind"] == "mask (runtime)"


@pytest.mark.parametrize("strategy", VANILLA)
@pytest.mark.parametrize("world", (2, 4))
def test_causal_split_attends_to_the_right_keys(strategy, world):
    """Default inputs, every rank: the attention calls of one layer cover exactly the causal
    score entries of the rank's rows (diagonal blocks is_causal, earlier keys without mask)."""
    from sp_compiler.rules import attention_inputs

    zigzag = strategy.endswith("zigzag")
    for rank in range(world):
        _, gm, _ = compile_fake("llama", strategy, world, rank)
        entries = 0
        for n in attention_nodes(gm):
            q, k, _, mask = attention_inputs(n)
            assert mask is None
            lq, lk = vals(q)[0].shape[-2], vals(k)[0].shape[-2]
            from passes.rows_attention import _is_causal

            entries += lq * (lq + 1) // 2 if _is_causal(n) else lq * lk
            if _is_causal(n):
                assert lq == lk
        want = causal_entries(own_rows(S, world, rank, zigzag))
        assert entries == LAYERS * want, (rank, entries, LAYERS * want)


# ----------------------------------------------------------------------------- 3. load balance

def _max_over_mean(xs):
    return max(xs) / (sum(xs) / len(xs))


@pytest.mark.parametrize("world", (2, 4, 8))
def test_load_balance(world, tmp_path):
    seq = 8 * 2 * world * 2                   # zig-zag chunks of 16 rows, contiguous of 32
    figures = {}
    for strategy in VANILLA:
        zigzag = strategy.endswith("zigzag")
        dump = tmp_path / strategy
        _, _, ctx = compile_fake("llama", strategy, world, 0, seq=seq, layers=1, dump_dir=dump)
        work = ctx.attention_work
        assert work["kind"] == "causal"
        want = [causal_entries(own_rows(seq, world, r, zigzag)) for r in range(world)]
        assert sum(want) == seq * (seq + 1) // 2          # every causal entry computed exactly once
        assert list(work["per_rank"]) == want, (strategy, work["per_rank"], want)
        ratio = _max_over_mean(want)
        text = (dump / "rank0" / os.listdir(dump / "rank0")[0] / "attention_work.txt").read_text()
        m = re.search(r"max / mean = ([0-9.]+)", text)
        assert m, text
        assert abs(float(m.group(1)) - ratio) < 1e-3, (m.group(1), ratio)
        figures[strategy] = (want, ratio)

    ideal = (2 * world - 1) / world
    contiguous, zz = figures["vanilla_sp"][1], figures["vanilla_sp_zigzag"][1]
    print(f"\n[load balance] N={world} S={seq}: contiguous max/mean = {contiguous:.4f} "
          f"(ideal (2N-1)/N = {ideal:.4f}), zig-zag max/mean = {zz:.4f}; "
          f"per rank contiguous {figures['vanilla_sp'][0]}, zig-zag {figures['vanilla_sp_zigzag'][0]}")
    assert abs(contiguous - ideal) / ideal < 0.03, (contiguous, ideal)
    assert zz <= 1.05, zz


# ----------------------------------------------------------------------------- 4. permutation

MOVEMENT = {aten.slice.Tensor, aten.cat.default, aten.view.default, aten.reshape.default,
            aten._unsafe_view.default, aten.permute.default, aten.clone.default, aten.alias.default,
            aten.split_with_sizes.default, aten.index_select.default, aten.index.Tensor,
            aten.transpose.int, aten.t.default, aten.squeeze.dim, aten.unsqueeze.default,
            operator.getitem, c10d.wait_tensor.default}


def _evaluate(gm, start: dict, until):
    """Run the nodes between ``start`` (node -> value) and ``until``; wait_tensor is identity."""
    env = dict(start)
    for n in gm.graph.nodes:
        if n in env or n.op != "call_function":
            if n is until:
                break
            continue
        ins = n.all_input_nodes
        if ins and all(i in env for i in ins):
            if n.target == c10d.wait_tensor.default:
                env[n] = env[n.args[0]]
            else:
                env[n] = n.target(*map_arg(n.args, env.__getitem__), **map_arg(n.kwargs, env.__getitem__))
        if n is until:
            break
    return env


@pytest.mark.parametrize("strategy", VANILLA)
@pytest.mark.parametrize("world,rank", full_or([(2, 1), (4, 3)], [(2, 0), (2, 1), (4, 1), (4, 3)]))
def test_ids_sliced_once_into_own_rows(strategy, world, rank):
    zigzag = strategy.endswith("zigzag")
    _, gm, ctx = compile_fake("llama", strategy, world, rank)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ids_nodes = [p for p in phs for t in vals(p) if t.dtype == torch.long and tuple(t.shape) == (B, S)]
    assert len(ids_nodes) == 1, [(p.name, [tuple(t.shape) for t in vals(p)]) for p in phs]
    (ids,) = ids_nodes
    users = list(ids.users)
    n_chunks = len(own_chunks(world, rank, zigzag)[0])
    assert all(u.target == aten.slice.Tensor for u in users), [(u.name, u.target) for u in users]
    assert len(users) == n_chunks, f"input_ids sliced {len(users)} times, want {n_chunks}"
    # every slice feeds the same single node: one slicing point, then the embedding
    consumers = {c for u in users for c in u.users}
    assert len(consumers) == 1, [c.name for c in consumers]
    (point,) = consumers
    if zigzag:
        assert point.target == aten.cat.default
        (embedding,) = point.users
    else:
        embedding = point
    assert embedding.target == aten.embedding.default, embedding.target
    # semantically: the embedding looks up exactly this rank's rows, in local order
    pos = torch.arange(S).expand(B, S).contiguous()
    got = _evaluate(gm, {ids: pos}, embedding)[embedding.args[1]]
    assert got.tolist() == [own_rows(S, world, rank, zigzag)] * B


@pytest.mark.parametrize("strategy", VANILLA)
@pytest.mark.parametrize("world,rank", [(2, 1), (4, 2)])
def test_logits_come_from_one_all_gather_in_sequence_order(strategy, world, rank):
    zigzag = strategy.endswith("zigzag")
    report, gm, _ = compile_fake("llama", strategy, world, rank)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    logits = out_node.args[0][0] if isinstance(out_node.args[0], (tuple, list)) else out_node.args[0]
    assert tuple(vals(logits)[0].shape) == (B, S, VOCAB)
    # walk back through data movement only: every path must end at one all_gather
    gathers, seen, todo = set(), set(), [logits]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.target == c10d.all_gather_into_tensor.default:
            gathers.add(n)
            continue
        assert n.op == "call_function" and n.target in MOVEMENT, (
            f"the logits are computed after the gather: {n.name} = {n.target}")
        todo.extend(n.all_input_nodes)
    assert len(gathers) == 1, [g.name for g in gathers]
    (ag,) = gathers
    assert [r["layer"] for r in report if r["kind"] == "all_gather"].count("lm_head") == 1

    # semantically: fill rank j's local logits [B, S/N, V] with their global positions, gathered
    # in rank order; what the graph returns must be in sequence order.
    L = S // world
    parts = []
    for j in range(world):
        rows = torch.tensor(own_rows(S, world, j, zigzag), dtype=torch.float32)
        local = (torch.arange(B, dtype=torch.float32)[:, None] * S + rows[None, :])[:, :, None].expand(B, L, VOCAB)
        parts.append(local.reshape(-1))
    gathered = torch.cat(parts)
    assert gathered.numel() == math.prod(vals(ag)[0].shape)
    got = _evaluate(gm, {ag: gathered.reshape(vals(ag)[0].shape)}, out_node)[logits]
    want = (torch.arange(B, dtype=torch.float32)[:, None] * S + torch.arange(S))[:, :, None].expand(B, S, VOCAB)
    assert torch.equal(got, want), got[0, :, 0].tolist()


# ----------------------------------------------------------------------------- 5. numerics on gloo

NUM_CASES = ("causal", "packed", "padded")


#: extra model variants, run on the 'causal' case only: name -> (family, build_model overrides).
#: Mistral with a sliding window of 8 < S: HF's constant mask is not causal, so it is not folded.
VARIANTS = {"mistral-sw8": ("mistral", {"sliding_window": 8})}


def _model_for(name):
    family, extra = VARIANTS.get(name, (name, {}))
    return family, build_model(family, layers=LAYERS, vocab=VOCAB, **SHAPE, **extra)


def _rank_body(strategy: str, lower: str, families, cases, skip=()) -> dict:
    """Rank body: {(family, case): logits} for every family x case but ``skip``; fresh model per compile."""
    out = {}
    for name in families:
        for case in cases if name not in VARIANTS else ("causal",):
            if (name, case) in skip:
                continue
            torch._dynamo.reset()
            family, model = _model_for(name)
            ids = make_inputs(family, B, S, vocab=VOCAB)
            out[(name, case)] = compile_logits(model, ids, {"strategy": strategy, "lower": lower},
                                                 **case_kwargs(case)).detach().clone()
    torch._dynamo.reset()
    return out


_refs: dict = {}


def group(strategy, world, lower="aot_eager", families=FAMILIES + tuple(VARIANTS), cases=NUM_CASES, skip=()):
    key = (strategy, world, lower, tuple(families), tuple(cases), tuple(skip))
    return cached_run(("vanilla",) + key, run_ranks, _rank_body, world, strategy, lower, list(families),
                      list(cases), list(skip), timeout=900)


def reference(family, case):
    if (family, case) not in _refs:
        base, model = _model_for(family)
        with torch.no_grad():
            _refs[(family, case)] = model(make_inputs(base, B, S, vocab=VOCAB), use_cache=False,
                                          **case_kwargs(case)).logits
    return _refs[(family, case)]


def check(results, family, case):
    ref = reference(family, case)
    keep = left_pad_mask().bool() if case == "padded" else torch.ones(B, S, dtype=torch.bool)
    assert torch.isfinite(ref[keep]).all()
    for rank, per_rank in enumerate(results):
        got = per_rank[(family, case)]
        assert got.shape == ref.shape and got.dtype == torch.float32, (rank, got.shape, got.dtype)
        torch.testing.assert_close(got[keep], ref[keep], **TOL,
                                   msg=lambda m, r=rank: f"rank {r} of {len(results)}, {family} {case}: {m}")


#: world 4 runs 4 processes on CI's 2 cores: it keeps packed documents on Llama (--full: causal too, and
#: GPT-2); padding, the other families (--full) and the sliding-window variant run at world 2. CI's cut
#: leaves out Llama's causal case at world 2: test_prefill_calls runs it under both layouts (HF's default call).
WORLD_CASES = {2: NUM_CASES, 4: full_or(("packed",), ("causal", "packed"))}
WORLD_FAMILIES = {2: full_or(("llama", "gpt2"), FAMILIES), 4: full_or(("llama",), ("llama", "gpt2"))}
RUNS = [(w, f, c) for w in WORLD_CASES for f in WORLD_FAMILIES[w] for c in WORLD_CASES[w]
        if FULL or (w, f, c) != (2, "llama", "causal")]


def group_for(strategy, world):
    families = WORLD_FAMILIES[world] + (tuple(VARIANTS) if world == 2 else ())
    return group(strategy, world, families=families, cases=WORLD_CASES[world],
                 skip=() if FULL else (("llama", "causal"),))


@pytest.mark.parametrize("world,family,case", RUNS, ids=[f"{f}-w{w}-{c}" for w, f, c in RUNS])
@pytest.mark.parametrize("strategy", VANILLA)
def test_matches_single_process(world, strategy, family, case):
    check(group_for(strategy, world), family, case)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("strategy", VANILLA)
def test_variant_matches_single_process(strategy, variant):
    check(group_for(strategy, 2), variant, "causal")


def test_packed_case_really_differs_from_causal():
    """Guard: the packed / padded inputs change the logits, so those cases test something."""
    for family in ("llama", "gpt2"):
        causal = reference(family, "causal")
        assert not torch.allclose(reference(family, "packed"), causal, atol=1e-3)
        keep = left_pad_mask().bool()
        assert not torch.allclose(reference(family, "padded")[keep], causal[keep], atol=1e-3)
    assert not torch.allclose(reference("mistral-sw8", "causal"), reference("mistral", "causal"), atol=1e-3)


@pytest.mark.parametrize("strategy", full_or([], ["vanilla_sp_zigzag"]))    # CI: test_generate's Inductor run
def test_inductor_llama_world2(strategy):
    results = group(strategy, 2, lower="inductor", families=("llama",), cases=("causal",))
    check(results, "llama", "causal")
