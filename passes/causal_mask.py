"""causal_mask: a mask that is a compile-time constant equal to the causal pattern -> is_causal.

    m = where(index(arange(S)) <= index(arange(S)), 0, -inf)        # built by HuggingFace under compile
    attention(q, k, v, attn_mask=m)            ->  attention(q, k, v, is_causal=True)

HuggingFace builds a full [B, 1, S, S] mask from aranges whenever it cannot prove the
mask away under torch.compile. If nothing in the mask depends on a graph input, it is
evaluated here once; when it is causal, attention drops it: no rank materialises any mask,
and ``rows_attention`` can split causal attention by chunks instead of masking. Masks that
depend on inputs (padding, packed documents) stay as they are.
"""
from __future__ import annotations

import logging
import math

import torch
from torch.fx import Node
from torch.fx.node import map_arg

from sp_compiler.rules import ATTENTION_OPS, attention_inputs, shape_of

aten = torch.ops.aten
log = logging.getLogger("seqpar")

__all__ = ["causal_mask", "MAX_FOLDED_MASK"]

MAX_FOLDED_MASK = 1 << 26          # elements; larger masks are left alone rather than evaluated


def causal_mask(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    cache = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SET_CAUSAL:
            continue
        q, k, _, mask = attention_inputs(node)
        if mask is None or shape_of(q)[2] != shape_of(k)[2] or math.prod(shape_of(mask)) > MAX_FOLDED_MASK:
            continue
        if mask not in cache:
            value = _fold(gm, mask)
            cache[mask] = value is not None and _is_causal(value)
        if cache[mask]:
            _SET_CAUSAL[node.target](node)
            log.debug("seqpar: %s: constant causal mask %s dropped", node.name, mask.name)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _fold(gm, target: Node):
    """Value of ``target`` if it depends on no graph input, else None."""
    order, seen, stack = [], set(), [target]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return None
        order.append(n)
        stack.extend(n.all_input_nodes)
    env, index = {}, _index(gm)
    for n in sorted(order, key=index.__getitem__):
        if n.op == "get_attr":
            env[n] = getattr(gm, n.target)
        else:
            args = map_arg(n.args, env.__getitem__)
            kwargs = map_arg(n.kwargs, env.__getitem__)
            env[n] = n.target(*args, **kwargs)
    return env[target]


def _index(gm):
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _is_causal(m: torch.Tensor) -> bool:
    S = m.shape[-1]
    if m.shape[-2] != S:
        return False
    allowed = torch.ones(S, S, dtype=torch.bool).tril()
    keep = m if m.dtype == torch.bool else (m == 0)
    if m.dtype != torch.bool and not bool(torch.isinf(m[..., ~allowed]).all()):
        return False
    return bool((keep == allowed).all())


def _flash_cpu(node):              # (q, k, v, dropout_p, is_causal, *, attn_mask, scale)
    node.args = (*node.args[:3], node.args[3] if len(node.args) > 3 else 0.0, True)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}


def _efficient(node):              # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, *, scale)
    args = list(node.args) + [None] * (7 - len(node.args))
    args[3], args[6] = None, True
    args[4] = bool(args[4]) if args[4] is not None else False
    args[5] = args[5] if args[5] is not None else 0.0
    node.args = tuple(args)


def _sdpa(node):                   # (q, k, v, attn_mask, dropout_p, is_causal, *, scale, enable_gqa)
    node.args = node.args[:3]
    node.kwargs = {**{k: v for k, v in node.kwargs.items() if k not in ("attn_mask", "is_causal")}, "is_causal": True}


_SET_CAUSAL = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: _flash_cpu,
    aten._scaled_dot_product_efficient_attention.default: _efficient,
    aten.scaled_dot_product_attention.default: _sdpa,
}
assert set(_SET_CAUSAL) <= ATTENTION_OPS
