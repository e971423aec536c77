"""one_in_flight: on a gloo process group, every collective is waited for before the next one starts.

    before:  c1 = all_gather_into_tensor(kv)      # issued early, to overlap with compute
             c2 = all_to_all_single(qkv)
             ...
             w1 = wait_tensor(c1)                 # waited late, right before the first use
             w2 = wait_tensor(c2)
    after:   c1 = all_gather_into_tensor(kv)
             w1 = wait_tensor(c1)
             c2 = all_to_all_single(qkv)
             w2 = wait_tensor(c2)
             ...

Gloo in torch 2.13 corrupts the heap when several functional ``all_gather_into_tensor`` calls
(``ProcessGroupGloo::allgather_into_tensor_coalesced``) are in flight on one process group, which
runs queued collectives on two worker threads: the ranks die with SIGSEGV or ``malloc(): unaligned
tcache chunk detected`` at a random later collective. ``examples/gloo_overlap_crash.py`` reproduces it
without seqpar (``docs/gloo_heap_corruption.md``: the measurements). With one collective in
flight it never happened. So on gloo each ``wait_tensor`` moves up to right after its collective;
what the collective feeds still runs where it did. The cost is the overlap of gloo's transfers
with compute, which only CPU runs had. NCCL graphs (and fake groups, which communicate nothing)
keep their overlap: the pass does nothing unless ``ctx.one_in_flight`` (the default group's backend
is exactly ``"gloo"``; a mixed ``"cpu:gloo,cuda:nccl"`` group is not recognised).
"""
from __future__ import annotations

import torch

__all__ = ["one_in_flight", "most_in_flight", "COLLECTIVES"]

c10d = torch.ops._c10d_functional

#: The functional collectives seqpar's graphs issue; each one's result goes through one ``wait_tensor``.
COLLECTIVES = frozenset({
    c10d.all_gather_into_tensor.default,
    c10d.all_reduce.default,
    c10d.reduce_scatter_tensor.default,
    c10d.all_to_all_single.default,
})


def one_in_flight(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    if not ctx.one_in_flight:
        return gm
    for node in list(gm.graph.nodes):
        if node.target is c10d.wait_tensor.default and getattr(node.args[0], "target", None) in COLLECTIVES:
            node.args[0].append(node)                    # wait_tensor(c) needs nothing but c
    return gm


def most_in_flight(graph: torch.fx.Graph) -> int:
    """The most collectives issued and not yet waited for at any point of ``graph``'s order."""
    live, most = set(), 0
    for node in graph.nodes:
        if node.target in COLLECTIVES:
            live.add(node)
            most = max(most, len(live))
        elif node.target is c10d.wait_tensor.default:
            live.discard(node.args[0])
    return most
