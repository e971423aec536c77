"""Self-tests for the multi-process gloo harness ``sp_compiler.testing.run_ranks``."""

import pytest
import torch
import torch.distributed as dist

from sp_compiler.testing import RankError, run_ranks

__all__ = []


def _all_reduce_rank(scale: float, *, offset: float = 0.0) -> torch.Tensor:
    """Every rank contributes ``rank * scale + offset``; returns the all-reduced sum."""
    t = torch.tensor([dist.get_rank() * scale + offset])
    dist.all_reduce(t)
    return t


def _raise_on_rank1() -> int:
    """Rank 1 raises; rank 0 then blocks in a collective that never completes."""
    if dist.get_rank() == 1:
        raise ValueError("boom from rank one")
    dist.barrier()
    return dist.get_rank()


def test_all_reduce_two_ranks():
    results = run_ranks(_all_reduce_rank, 2, 1.0, offset=10.0, timeout=120)
    assert len(results) == 2
    for r in results:
        torch.testing.assert_close(r, torch.tensor([21.0]))  # (0+10) + (1+10)


def test_exception_in_rank1_surfaces():
    with pytest.raises(RankError) as info:
        run_ranks(_raise_on_rank1, 2, timeout=120)
    msg = str(info.value)
    assert "rank 1 raised" in msg
    assert "ValueError: boom from rank one" in msg
    assert "Traceback" in msg and "_raise_on_rank1" in msg
