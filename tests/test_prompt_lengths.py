"""A compiled model called with several prompt lengths: Dynamo then hands seqpar a graph with
symbolic sizes, and seqpar compiles one static graph per length on first use."""
from __future__ import annotations

import torch

from models import build_model, make_inputs
from sp_compiler.testing import run_ranks

__all__ = []

LENGTHS = (16, 24, 32, 24)


def _rank_body():
    model = build_model("llama")
    fast = torch.compile(model, backend="seqpar", options={"strategy": "vanilla_sp_zigzag", "lower": "aot_eager"})
    with torch.no_grad():
        return [fast(make_inputs("llama", 2, s), use_cache=False).logits for s in LENGTHS]


def test_changing_prompt_length_stays_exact():
    results = run_ranks(_rank_body, 2, timeout=600)
    model = build_model("llama")
    for i, s in enumerate(LENGTHS):
        with torch.no_grad():
            ref = model(make_inputs("llama", 2, s), use_cache=False).logits
        for rank, res in enumerate(results):
            torch.testing.assert_close(res[i], ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"S={s} rank {rank}: {m}")
