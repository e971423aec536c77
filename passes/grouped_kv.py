"""grouped_kv: attention reads K/V on the model's KV heads; HF's ``repeat_kv`` copy is dropped.

HF expands K and V to every query head before attention (``repeat_kv``), and under torch 2.13
Dynamo always traces that path, so every attention call holds an H / Hkv times larger copy of
K/V: of the all-gathered K/V under vanilla SP, of the rows after Ulysses' all-to-all. The CPU
flash kernel and CUDA's flash kernel take fewer KV heads than query heads themselves (query
head h reads KV head h // (H / Hkv), what ``repeat_kv`` builds), so the copy is not needed:

    before:  k5 = unsqueeze(k, 2)                            # [B, Hkv, 1, S, D]
             ke = expand(k5, [B, Hkv, r, S, D]); kc = clone(ke)
             kh = _unsafe_view(kc, [B, Hkv * r, S, D])       # [B, H, S, D]: a copy, r times k
             o  = attention(q, kh, vh, ...)
    after:   o  = attention(q, k, v, ...)                    # [B, Hkv, S, D] read in place

Runs on the local graph (after ``localize``: the sizes in the graph are this rank's) and before
the passes that cut attention into blocks or rows, which then slice the grouped K/V. Kernels that
need equal heads (CUDA's memory-efficient and cuDNN kernels, the ones that take a mask on CUDA)
keep the expansion, as do K/V whose repeat happened before a collective (Ulysses with fewer KV
heads than ranks moves the repeated heads).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

from sp_compiler import sdpa

aten = torch.ops.aten

__all__ = ["grouped_kv", "GQA_KERNELS", "repeat_source"]

#: attention kernels that read query head h against KV head h // (H / Hkv) themselves
GQA_KERNELS = frozenset({
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
})

_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def grouped_kv(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    for node in gm.graph.nodes:
        if not sdpa.is_attention(node) or node.target not in GQA_KERNELS:
            continue
        call = sdpa.bind(node)
        k, v = repeat_source(call.k), repeat_source(call.v)
        if k is None or v is None:
            continue
        args, kwargs = sdpa.to_args(call.replace(key=k, value=v))
        node.args, node.kwargs = args, kwargs
        for old in (call.k, call.v):
            _erase_unused(gm.graph, old, stop=(k, v))
    return gm


def _erase_unused(graph, node, stop):
    """Erase ``node`` and the chain above it up to ``stop`` once unused. Not a graph-wide dead-code pass:
    later passes read nodes that only metadata points to (``ROWS_OF``: the whole mask a rows slice came from)."""
    while isinstance(node, Node) and node not in stop and not node.users:
        up = node.args[0]
        graph.erase_node(node)
        node = up


def repeat_source(x) -> Optional[Node]:
    """``k`` if ``x`` is HF's ``repeat_kv(k)`` (view(clone?(expand(unsqueeze(k, 2), [B, Hkv, r, S, D])),
    [B, Hkv * r, S, D])), else None."""
    if not (isinstance(x, Node) and x.op == "call_function" and x.target in _VIEWS):
        return None
    heads = x.args[1][1] if len(x.args[1]) == 4 else None
    e = x.args[0]
    if isinstance(e, Node) and e.target == aten.clone.default:
        e = e.args[0]
    if not (isinstance(e, Node) and e.target == aten.expand.default and len(e.args[1]) == 5):
        return None
    B, Hkv, r, S, D = e.args[1]
    u = e.args[0]
    if not (isinstance(u, Node) and u.target == aten.unsqueeze.default and u.args[1] == 2):
        return None
    if not all(isinstance(n, int) for n in (heads, Hkv, r)) or heads != Hkv * r:
        return None
    if list(x.args[1]) != [B, heads, S, D]:
        return None
    return u.args[0]
