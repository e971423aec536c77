"""``passes.mask_blocks.block_rows``: how many query rows one block of masked attention takes.

The properties the pass promises, for prompt lengths from 4k to 1M tokens, batch 1 and 4,
2 and 8 ranks, heads strategies (all S query rows) and rows strategies (S/N of them):

    flat      while rows * S / BLOCK_MASK <= MAX_BLOCKS blocks, a block's mask has BLOCK_MASK
              elements, plus under one row: memory does not grow with the prompt
    few       never more than MAX_BLOCKS blocks (graph size bounded), unless 'small' needs more
    small     a block's mask never has more than S^2 / (2N) elements
"""
from __future__ import annotations

import math

import pytest

from passes.mask_blocks import BLOCK_MASK, MAX_BLOCKS, block_rows

__all__ = []

CASES = [(B, S, N, rows_of) for B in (1, 4) for S in (4096, 16384, 65536, 131072, 1 << 20) for N in (2, 8)
         for rows_of in ("heads", "rows")]


@pytest.mark.parametrize("B,S,N,rows_of", CASES)
def test_block_rows(B, S, N, rows_of):
    rows = S if rows_of == "heads" else S // N
    C = block_rows(B, rows, S, N)
    blocks = math.ceil(rows / C)
    assert 1 <= C <= rows
    assert B * C * S <= S * S / (2 * N)
    assert blocks <= max(MAX_BLOCKS, math.ceil(rows / (rows // (2 * N * B))))
    if math.ceil(rows / math.ceil(BLOCK_MASK / (B * S))) <= MAX_BLOCKS and C < rows // (2 * N * B):
        assert BLOCK_MASK <= B * C * S < BLOCK_MASK + B * S                  # the flat regime
