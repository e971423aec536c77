"""Unsupported input fails at compile time with a message naming the node, the module and the fix."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sp_compiler.errors import ShapeConstraintError, UnsupportedOpError
from sp_compiler.testing import error_text, fake_process_group, seqpar_error

__all__ = []


class Flipper(nn.Module):
    """A model whose hidden states go through an op seqpar has no sharding rule for."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.mixer = nn.Linear(16, 16)

    def forward(self, ids):
        h = self.embed(ids)                                # [B, S, 16], sequence-sharded under ulysses
        return self.mixer(torch.flip(h, dims=[1]))         # flips the sequence: no rule, must not run


def _compile_error(model, ids, strategy):
    torch._dynamo.reset()
    with fake_process_group(2):
        fast = torch.compile(model, backend="seqpar", options={"strategy": strategy, "lower": "eager"})
        with pytest.raises(Exception) as info, torch.no_grad():
            fast(ids)
    torch._dynamo.reset()
    return info.value


def test_op_without_rule_on_sharded_path_names_op_module_and_placements():
    err = _compile_error(Flipper(), torch.randint(0, 32, (1, 8)), "ulysses")
    inner = seqpar_error(err)
    assert isinstance(inner, UnsupportedOpError)
    text = str(inner)
    assert "flip" in text and "S(1)" in text and "Fix:" in text


def test_op_without_rule_is_fine_when_replicated():
    """Under tp the residual stream is replicated: the same model compiles and runs."""
    torch._dynamo.reset()
    model = Flipper()
    ids = torch.randint(0, 32, (1, 8))
    with fake_process_group(2):
        fast = torch.compile(model, backend="seqpar", options={"strategy": "tp", "lower": "eager"})
        with torch.no_grad():
            out = fast(ids)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids))         # nothing sharded, nothing communicated


def test_kv_heads_neither_dividing_nor_divisible_names_both_numbers():
    from models import build_model, make_inputs

    model = build_model("llama", heads=6, kv_heads=3, hidden=96)
    err = _compile_error(model, make_inputs("llama", 1, 16), "megatron_sp")
    inner = seqpar_error(err)
    assert isinstance(inner, ShapeConstraintError), error_text(err)
    assert "3 KV heads" in str(inner) and "2 ranks" in str(inner)
