"""GPU smoke test: skipped where CUDA is not available (CPU runs must pass without it)."""

from __future__ import annotations

import pytest
import torch

from models import build_model, make_inputs

__all__ = []

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.usefixtures("dynamo_reset"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_llama_ulysses_world1_inductor_cuda():
    """One CUDA device, no process group (world 1): Inductor compiles the graph and the
    logits equal the uncompiled model's."""
    model = build_model("llama", heads=8, kv_heads=4, hidden=128).cuda()
    ids = make_inputs("llama", 2, 16).cuda()
    fast = torch.compile(model, backend="seqpar", options={"strategy": "ulysses", "lower": "inductor"})
    with torch.no_grad():
        got = fast(ids, use_cache=False).logits
        want = model(ids, use_cache=False).logits
    assert got.is_cuda and got.shape == (2, 16, 128)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
