"""Long prompts: no rank builds a tensor of S x S (or S/N x S) elements.

    structure   S = 16384 on a fake process group of 2, every strategy, causal / padded / packed
                documents: no node of rank 0's local graph has S^2/N elements or more (the
                graph runs on fake tensors: nothing is computed), and every attention reads K/V on
                the model's KV heads (``passes/grouped_kv``: no repeat_kv copy); a masked prompt's
                attention is cut in query blocks whose masks are built one after the other
                (``seqpar::after``: Inductor cannot build them all up front)
    numerics    masked attention cut into query blocks (``passes/mask_blocks``, forced on at a
                small S) matches one device on 2 gloo ranks, heads and rows strategies, and on
                4 ranks for a heads and a rows strategy
"""
from __future__ import annotations

import importlib

import pytest
import torch

from models import build_model, make_inputs, packed_position_ids
from seqpar_testing import fake_model, full_or
from sp_compiler import sdpa
from sp_compiler.strategies import STRATEGIES
from sp_compiler.testing import run_ranks

__all__ = []

pytestmark = pytest.mark.usefixtures("dynamo_reset")

LONG = 16384
HEADS, KV_HEADS = 4, 2


def _case_kwargs(case: str, B: int, S: int) -> dict:
    if case == "padded":                                   # row b starts with 7*b+7 pad tokens
        mask = torch.ones(B, S, dtype=torch.long)
        for b in range(B):
            mask[b, : 7 * (b + 1)] = 0
        return dict(attention_mask=mask)
    if case == "packed":
        return dict(position_ids=packed_position_ids(B, [S // 3, S // 3, S - 2 * (S // 3)]))
    return {}


def _ancestors(node) -> set:
    seen, todo = set(), [node]
    while todo:
        for x in todo.pop().all_input_nodes:
            if x not in seen:
                seen.add(x)
                todo.append(x)
    return seen


def _largest(gm):
    sizes = []
    for n in gm.graph.nodes:
        vals = n.meta.get("val")
        for v in vals if isinstance(vals, (tuple, list)) else [vals]:
            if isinstance(v, torch.Tensor):
                sizes.append((v.numel(), n.name, tuple(v.shape)))
    return max(sizes)


@pytest.mark.parametrize("case", ["causal", "padded", "packed"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_no_rank_builds_s_by_s(strategy, case):
    """Rank 0 of 2, on fake tensors: Dynamo traces the weightless model once per input case
    (``plan.transform``) and each strategy transforms that graph, as the backend does."""
    from sp_compiler.plan import transform

    world = 2
    fm = fake_model("llama", heads=HEADS, kv_heads=KV_HEADS, max_position_embeddings=LONG)
    gm, _ = transform(fm.config, strategy=strategy, world=world, seq_len=LONG, model=fm,
                      call=dict(logits_to_keep=1, **_case_kwargs(case, 1, LONG)))
    numel, name, shape = _largest(gm)
    assert numel < LONG * LONG // world, f"{name} {shape}: {numel} elements"
    attention = [n for n in gm.graph.nodes if sdpa.is_attention(n)]
    for n in attention:                                                 # K/V on the KV heads (grouped_kv)
        q, k, v = (sdpa.bind(n)[x].meta["val"].shape[1] for x in ("q", "k", "v"))
        assert k == v == q * KV_HEADS // HEADS, f"{n.name}: {q} query heads read {k} key, {v} value heads"
    masked = [n for n in attention if sdpa.bind(n).mask is not None]
    assert len(masked) > 2 * 2 or case == "causal", f"{len(masked)} masked attention calls: the mask was not cut"
    for before, after in zip(masked, masked[1:]):     # one block's mask at a time, whatever the lowering fuses
        assert before in _ancestors(sdpa.bind(after).mask), f"{after.name}'s mask does not wait for {before.name}"


def _blocked_body(strategies, cases, B, S):
    mask_blocks = importlib.import_module("passes.mask_blocks")   # the module (passes.mask_blocks is the pass)

    mask_blocks.MIN_MASK = 1                               # cut every mask into query blocks
    out = {}
    model = build_model("llama")
    for strategy in strategies:
        for case in cases:
            torch._dynamo.reset()
            fast = torch.compile(model, backend="seqpar", options={"strategy": strategy, "lower": "aot_eager"})
            with torch.no_grad():
                out[(strategy, case)] = fast(make_inputs("llama", B, S), use_cache=False,
                                             **_case_kwargs(case, B, S)).logits
    return out


#: CI's cut: a head and a sequence layout at 2 ranks (--full: tp, megatron_sp and vanilla_sp too, and
#: ulysses and zig-zag at 4)
BLOCKED = [(2, s, c) for s in full_or(("ulysses", "vanilla_sp_zigzag"),
                                      ("ulysses", "tp", "megatron_sp", "vanilla_sp", "vanilla_sp_zigzag"))
           for c in ("padded", "packed")]
BLOCKED += full_or([], [(4, s, c) for s in ("ulysses", "vanilla_sp_zigzag") for c in ("padded", "packed")])


@pytest.mark.parametrize("world,strategy,case", BLOCKED, ids=[f"w{w}-{s}-{c}" for w, s, c in BLOCKED])
def test_query_blocks_match_one_device(world, strategy, case):
    from seqpar_testing import cached_run

    B, S = 2, 61
    results = cached_run(("blocked", world), run_ranks, _blocked_body, world,
                         sorted({s for w, s, _ in BLOCKED if w == world}), ["padded", "packed"], B, S, timeout=900)
    kwargs = _case_kwargs(case, B, S)
    with torch.no_grad():
        ref = build_model("llama")(make_inputs("llama", B, S), use_cache=False, **kwargs).logits
    keep = kwargs.get("attention_mask", torch.ones(B, S)).bool()
    for rank, res in enumerate(results):
        torch.testing.assert_close(res[(strategy, case)][keep], ref[keep], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"rank {rank}: {m}")
