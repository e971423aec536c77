"""Expert parallelism at run time: ``seqpar::moe_experts``, the experts of one mixture-of-experts layer
with each rank holding E/N of them.

HF's experts run as two grouped matmuls over the routed rows sorted by expert (``offs``: cumulative rows
per expert), an activation between (and biases, gpt-oss):

    h = grouped_mm(x, w_in, offs) (+ b_in[expert])        x [M, H] -> [M, 2I]  (gate | up)
    y = grouped_mm(act(gate) * up, w_out, offs) (+ b_out[expert])   -> [M, H]

What sits between may be any row-wise function of h (gpt-oss's clamped GLU on interleaved columns):
``passes/expert_parallel`` lifts it out of the graph (``register_gate``) and the op applies it per block.

``passes/expert_parallel`` replaces that pair with one call of this op, whose weights are this rank's
experts only (``w_in`` [E/N, H, 2I], ``w_out`` [E/N, I, H]; rank r holds experts r*E/N .. (r+1)*E/N - 1).
How many rows go where depends on the router, so the exchange cannot be a static-shape collective in the
graph: the op is opaque to the compiler (a fixed-shape [M, H] -> [M, H] call) and exchanges inside.

    tokens="local"   each rank routed its own tokens (a sequence-split strategy's token-local block):
                     1. all_to_all of the counts: rows per (source rank, expert)
                     2. all_to_all of the rows, uneven splits: each row to its expert's rank
                     3. the rank's experts on what it received, sorted by expert
                     4. all_to_all back, the splits swapped: [M, H] in the rank's own row order
    tokens="all"     every rank holds every routed row (tp, or a block gathered whole): each rank runs
                     its experts' rows and leaves the others zero; the sum over ranks (the layer's
                     all_reduce / reduce_scatter, which a TP layout runs anyway) completes it

Exact: every row meets the same expert weights in the same matmul as on one device; only where it is
computed changes. A router that sends most tokens to one expert makes that rank's share large (no
capacity, no dropping), never wrong.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

__all__ = ["moe_experts", "MOE_EXPERTS", "expert_ffn", "op_by_name", "register_gate", "GATES", "TOKENS"]

#: what experts compute between their two matmuls when it is not act(gate) * up, lifted out of the graph by
#: ``passes/expert_parallel`` (gpt-oss: a clamped GLU on interleaved gate/up columns): row-wise functions
#: [rows, 2I] -> [rows, I], by a key made from their code (the same in every process: part of the graph)
GATES: Dict[str, Callable] = {}


def register_gate(gm: torch.fx.GraphModule) -> str:
    """Keep ``gm`` (one input, one output, row-wise) for ``moe_experts(..., gate=key)``; returns the key."""
    key = "gate-" + hashlib.sha1(gm.code.encode()).hexdigest()[:16]
    GATES.setdefault(key, gm)
    return key

#: where the routed rows are: each rank its own, or every row on every rank
TOKENS = ("local", "all")


def op_by_name(name: str):
    """'aten.silu.default' -> torch.ops.aten.silu.default (an activation, named so it can sit in a graph)."""
    ns, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, ns), op), overload)


def expert_ffn(x: torch.Tensor, counts: List[int], w_in: torch.Tensor, w_out: torch.Tensor, act: str,
               gated: bool, b_in: Optional[torch.Tensor] = None, b_out: Optional[torch.Tensor] = None,
               gate: str = "") -> torch.Tensor:
    """Rows of ``x`` sorted by expert, ``counts[e]`` of them for expert e of ``w_in`` / ``w_out`` (and their
    biases): each block through its expert, as HF's grouped matmul computes it (one mm per expert), the
    bias added after it. Between the matmuls: ``GATES[gate]``, or act(gate) * up (``gated``), or act."""
    f = GATES[gate] if gate else op_by_name(act)
    out = x.new_empty(x.shape[0], w_out.shape[-1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            h = x[start:start + n] @ w_in[e]
            if b_in is not None:
                h = h + b_in[e]
            if gated and not gate:
                g, up = h.chunk(2, dim=-1)
                h = f(g) * up
            else:
                h = f(h)
            y = h @ w_out[e]
            out[start:start + n] = y + b_out[e] if b_out is not None else y
            start += n
    return out


@torch.library.custom_op("seqpar::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, offs: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, act: str,
                gated: bool, group_name: str, tokens: str, b_in: Optional[torch.Tensor] = None,
                b_out: Optional[torch.Tensor] = None, gate: str = "") -> torch.Tensor:
    if tokens not in TOKENS:
        raise ValueError(f"seqpar::moe_experts: tokens={tokens!r}, not one of {TOKENS}")
    local = w_in.shape[0]                                               # experts on this rank
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())  # [E] rows per expert
    group = dist.distributed_c10d._resolve_process_group(group_name)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if tokens == "all":
        mine = counts[rank * local:(rank + 1) * local]                  # rows of this rank's experts
        lo, n = int(counts[:rank * local].sum()), int(mine.sum())
        out = x.new_zeros(x.shape[0], w_out.shape[-1])
        out[lo:lo + n] = expert_ffn(x[lo:lo + n], mine.tolist(), w_in, w_out, act, gated, b_in, b_out, gate)
        return out
    send = counts.view(world, local)                                    # [to rank, its expert]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)         # [from rank, my expert]
    send_rows, recv_rows = send.sum(1).tolist(), recv.sum(1).tolist()
    got = x.new_empty(sum(recv_rows), x.shape[1])
    dist.all_to_all_single(got, x.contiguous(), recv_rows, send_rows, group=group)
    expert = torch.arange(local, device=x.device).repeat(world).repeat_interleave(recv.flatten())   # of each row
    order = torch.argsort(expert, stable=True)
    y = x.new_empty(got.shape[0], w_out.shape[-1])
    y[order] = expert_ffn(got[order], recv.sum(0).tolist(), w_in, w_out, act, gated, b_in, b_out, gate)
    back = x.new_empty(x.shape[0], w_out.shape[-1])
    dist.all_to_all_single(back, y, send_rows, recv_rows, group=group)
    return back


@moe_experts.register_fake
def _(x, offs, w_in, w_out, act, gated, group_name, tokens, b_in=None, b_out=None, gate=""):
    return x.new_empty(x.shape[0], w_out.shape[-1])


#: the op as it sits in a graph
MOE_EXPERTS = torch.ops.seqpar.moe_experts.default
