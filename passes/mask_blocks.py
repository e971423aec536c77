"""mask_blocks: attention over all query rows with an explicit mask, one block of rows at a time.

Under the heads strategies (tp, megatron_sp*, ulysses) every rank attends over all S positions;
a padding mask or packed documents leave HuggingFace's [B, 1, S, S] mask in the graph, which
would be built whole on every rank. Cut the queries into blocks and build each block's rows of
the mask from the positions (``sp_compiler.narrow`` pushes the row slice down to the aranges and
the 2-D mask), so no tensor of S x S, or of S/N x S, exists:

    before:  m = where(...)                               [B, 1, S, S]
             o = attention(q [B, h, S, D], k, v, attn_mask=m)
    after:   per block i of C rows:
               m_i = m's rows iC..(i+1)C, made from the positions   [B, 1, C, S]
               o_i = attention(q[:, :, iC:(i+1)C], k, v, attn_mask=m_i)
             o = cat(o_i, dim 2)

Block i's mask rows are made from positions passed through ``seqpar::after(rows, o_{i-1})``
(``sp_compiler/ordering.py``), chained across attention calls too, so a lowering that fuses or
schedules eagerly (Inductor) still builds one block's mask at a time.

Rows attention (vanilla SP) holds only its own query rows; their mask rows (already narrowed by
``insert``, S/N x S) are cut the same way, from the whole mask they were narrowed from.

Block size (``block_rows``): C keeps each block's mask near ``BLOCK_MASK`` elements, so the
memory it takes stays flat as S grows, unless that would take more than ``MAX_BLOCKS`` blocks
(each block is a kernel call and a few graph nodes); then C = rows / MAX_BLOCKS and a block's mask
grows as S^2 / MAX_BLOCKS, still 64 times less than one device's [S, S] mask. A block never has
more than S^2 / (2N) mask elements. Masks under ``MIN_MASK`` elements stay whole (one kernel call
is faster and they cost little); causal masks are gone before this pass (``causal_mask``).

The blocks are unrolled in the graph, not looped at run time: a loop would need a higher-order op
(``torch.while_loop``) around HF's mask subgraph with a row offset known only at run time, which
neither lowering here handles simply. On CPU, glibc's malloc can fragment under the blocks' short-
lived temporaries: a freed block raises its mmap threshold (up to 32 MiB), later blocks come from
the heap, and the heap grows (+1.1 GiB per rank at 32k with 16 Mi-element blocks). Blocks of 32 Mi
elements keep every temporary, even a bool one, at or above that 32 MiB, so each one is mapped and
given back whole (docs/long_prompts.md measures both).
"""
from __future__ import annotations

import functools
import math
import operator

import torch

from sp_compiler import ordering, sdpa  # noqa: F401 - ordering registers seqpar::after
from sp_compiler.collectives import ROWS_OF, Builder
from sp_compiler.context import INSERTED, PLACEMENT
from sp_compiler.narrow import narrow
from sp_compiler.rules import ATTENTION_OPS, shape_of

aten = torch.ops.aten

__all__ = ["mask_blocks", "block_rows", "MIN_MASK", "BLOCK_MASK", "MAX_BLOCKS"]

MIN_MASK = 1 << 22          # elements: smaller masks stay whole
BLOCK_MASK = 1 << 25        # elements of one block's mask: 32 MiB as bool, 128 MiB as float (see below)
MAX_BLOCKS = 64             # blocks per attention call at most


def mask_blocks(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    prev = None                                   # the last block's output: the next block's mask waits for it
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in ATTENTION_OPS:
            continue
        call = sdpa.bind(node)
        m = call.mask
        if m is None or m.op != "call_function" or any(u.target != operator.getitem for u in node.users):
            continue
        whole = m.meta.get(ROWS_OF, None if m.meta.get(INSERTED) else m)   # rows attention: this rank's rows
        if whole is None or shape_of(whole) is None:
            continue
        B, _, rows, keys = shape_of(whole)
        if rows != ctx.seq_len or B * rows * keys < MIN_MASK:
            continue
        block = block_rows(B, rows, keys, ctx.world)
        spans = ctx.layout(rows).spans(ctx.rank) if whole is not m else [(0, rows)]
        prev = _split(gm, node, call, whole, spans, ctx, block, prev)
    gm.graph.eliminate_dead_code()
    return gm


def block_rows(batch: int, rows: int, keys: int, world: int) -> int:
    """Query rows per block: B*C*S at least BLOCK_MASK (by under one row), at most MAX_BLOCKS
    blocks, and never over S^2 / (2N) mask elements (which wins over the other two)."""
    flat = math.ceil(BLOCK_MASK / (batch * keys))               # memory that does not grow with S
    few = math.ceil(rows / MAX_BLOCKS)                          # graph size that does not grow with S
    below = max(1, rows // (2 * world * batch))                 # B*C*S <= S^2 / (2N)
    return min(max(flat, few), below, math.ceil(rows / 2))


def _split(gm, node, call, whole, spans, ctx, block, prev):
    """``spans``: (global first row, rows) of the query rows this node holds, in local order;
    ``prev``: the output the first block's mask waits for (``ordering.after``). Returns the last block's."""
    b = Builder(gm.graph, after=node.prev, before=node, ctx=ctx)
    outs, lses, local = [], [], 0
    read_lse = sdpa.lse_of(node) is not None             # an attention-sink correction reads it
    for first, count in spans:
        for start in range(first, first + count, block):
            n = min(block, first + count - start)
            q_i = b(aten.slice.Tensor, call.q, 2, local, local + n)
            local += n
            m_i = narrow(b, whole, 2, functools.partial(_rows, start=start, n=n, dep=prev), rows=lambda size, n_=n: n_)
            if read_lse:
                prev, lse = sdpa.call(b, node.target, q_i, call.k, call.v, call.is_causal, scale=call.scale,
                                      rows=n, mask=m_i)
                lses.append(lse)
            else:
                args, kwargs = sdpa.to_args(call.replace(q=q_i, mask=m_i))
                prev = b(operator.getitem, b(node.target, *args, **kwargs), sdpa.OUTPUT)
            outs.append(prev)
    out = b(aten.cat.default, outs, 2)
    lse = b(aten.cat.default, lses, 2) if read_lse else None
    placed = node.meta[PLACEMENT][sdpa.OUTPUT] if isinstance(node.meta[PLACEMENT], tuple) else node.meta[PLACEMENT]
    for x in (out, lse):
        if x is not None:
            x.meta[PLACEMENT] = placed
    sdpa.replace(node, out, lse)
    return prev


def _rows(b, x, dim, *, start, n, dep):
    """Rows start..start+n of ``x`` (a leaf of the mask: positions, an arange), made after ``dep``."""
    rows = b(aten.slice.Tensor, x, dim, start, start + n)
    return rows if dep is None else b(torch.ops.seqpar.after.default, rows, dep)
