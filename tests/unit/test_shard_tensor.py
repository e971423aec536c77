"""``passes/annotate.py::shard_tensor`` (how weights are cut once at compile time) against DTensor.

Oracle: ``distribute_tensor(t, mesh, [p], src_data_rank=None).to_local()`` on a fake process
group of the world size, as every rank; DTensor's _StridedShard(d, sf) cuts each of the sf
blocks of dim d on its own, the same semantics as the engine's, so no hand-built oracle is
needed. Lengths N does not divide are cut as torch.chunk cuts them, in both.
"""
from __future__ import annotations

import pytest
import torch

from passes.annotate import shard_tensor
from sp_compiler.placements import Shard, _StridedShard, fmt
from sp_compiler.testing import fake_process_group

__all__ = ["CASES"]

CASES = [
    # (global shape, placement)
    ((12, 4), Shard(0)),
    ((4, 12), Shard(1)),
    ((2, 6, 12), Shard(2)),
    ((24, 4), _StridedShard(0, split_factor=2)),              # [B*S] rows, B = 2
    ((8, 36), _StridedShard(1, split_factor=3)),              # Conv1D c_attn [in, q|k|v]
    ((36, 8), _StridedShard(0, split_factor=3)),              # Linear fused qkv [q|k|v, in]
    ((36,), _StridedShard(0, split_factor=3)),                # its bias
    ((4, 24, 8), _StridedShard(1, split_factor=2)),           # the experts' gate_up [E, gate|up, H]
    ((7, 4), Shard(0)),                                       # uneven
    ((4, 10), Shard(1)),                                      # uneven
    ((21, 4), _StridedShard(0, split_factor=3)),              # uneven blocks of 7
]
WORLDS = (2, 3, 4)


def _dtensor_pieces(world):
    """{case index: [each rank's piece]} by DTensor, as rank r of a fake group for every r."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    out = {i: [] for i in range(len(CASES))}
    for rank in range(world):
        with fake_process_group(world, rank):
            mesh = init_device_mesh("cpu", (world,))
            for i, (shape, p) in enumerate(CASES):
                full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
                out[i].append(distribute_tensor(full, mesh, [p], src_data_rank=None).to_local())
    return out


_pieces: dict = {}


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{'x'.join(map(str, s))}-{fmt(p)}" for s, p in CASES])
@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"N{w}")
def test_shard_tensor_matches_dtensor(world, i):
    if world not in _pieces:
        _pieces[world] = _dtensor_pieces(world)
    shape, p = CASES[i]
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    for rank, want in enumerate(_pieces[world][i]):
        got = shard_tensor(full, p, world, rank)
        assert got.is_contiguous()
        assert torch.equal(got, want), f"rank {rank}: {got.tolist()} != DTensor's {want.tolist()}"
