"""eager_attention: attention written out in eager ops -> one attention op (at capture).

A model that runs HF's ``eager_attention_forward`` (gpt-oss always: its attention sinks have no SDPA path
in transformers; any model loaded with ``attn_implementation="eager"``) reaches seqpar as matmul, softmax,
matmul. No rule splits those by heads or query rows, so every rank would gather q, k and v and compute all
[S, S] scores. Found in Dynamo's graph, from the last matmul back, they are traced as one attention op:

    s = matmul(q, k.transpose(2, 3)) * scale  (+ mask)                          [B, H, L, S]
    p = softmax(s, -1)                                                           plain
    p = softmax(cat([s, sink.expand(B, H, L, 1)], -1) - max, -1)[..., :-1]       attention sinks (gpt-oss)
    o = matmul(dropout(p).to(v.dtype), v)                                        [B, H, L, D]
  ->
    o = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)                     plain
    o, lse = <the device's attention kernel>(q, k, v, mask, scale)                              sinks
    o = o * sigmoid(lse - sink[h])

A sink is one more logit per head whose value vector is zero: softmax over [s, sink] is softmax over s
times exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink), as transformers' flex-attention path
renormalises. The correction is elementwise over [B, H, L]: it follows the attention's split (heads or
query rows) and needs the logsumexp over all keys, which every pass that rebuilds attention (query
blocks, causal chunks, split-KV) returns beside the output.

Anything else in the chain (another user of the scores, dropout in training, a scale that is a tensor)
is left as it is: exact, whole on every rank, and ``passes/propagate`` warns.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

from sp_compiler import sdpa

__all__ = ["EagerAttention", "find_eager_attention", "attend"]


@dataclass(frozen=True)
class EagerAttention:
    """One attention found in eager ops: its inputs (Dynamo nodes) and the nodes it replaces."""

    q: Node
    k: Node
    v: Node
    mask: Optional[Node]
    scale: float
    sinks: Optional[Node]              # [H], one logit per head (gpt-oss), or None
    interior: frozenset                # every node from the scores to the output, the output included


def find_eager_attention(graph: torch.fx.Graph) -> Dict[Node, EagerAttention]:
    """The eager attentions of Dynamo's graph, by their output node (the last matmul)."""
    found = {}
    for n in graph.nodes:
        if _is_call(n, torch.matmul):
            m = _match(n)
            if m is not None:
                found[n] = m
    return found


def attend(m: EagerAttention, env, call_function):
    """Trace ``m`` as one attention op; ``env``: Dynamo node -> value, ``call_function``: the capture's
    own (it pads narrower values, as for any SDPA call)."""
    q, k, v = env[m.q], env[m.k], env[m.v]
    mask = env[m.mask] if m.mask is not None else None
    if m.sinks is None:
        return call_function(F.scaled_dot_product_attention, (q, k, v), {"attn_mask": mask, "scale": m.scale})
    out, lse = sdpa.call(_eager, sdpa.lse_kernel(q.device), q, k, v, False, scale=m.scale,
                         rows=q.shape[-2], mask=mask)                            # [B, H, L, D], [B, H, L]
    sink = env[m.sinks].float().view(1, -1, 1)                                  # [1, H, 1]
    kept = torch.sigmoid(lse.float() - sink).unsqueeze(-1)                      # [B, H, L, 1]
    return (out.float() * kept).to(v.dtype)


def _eager(op, *args, **kwargs):
    return op(*args, **kwargs)


# ----------------------------------------------------------------------------- matching

_LAST = (Ellipsis, slice(None, -1, None))          # probs[..., :-1]: the sink's column dropped


def _match(out: Node) -> Optional[EagerAttention]:
    """``out = matmul(p, v)`` -> the attention it ends, or None."""
    p, v = out.args[:2] if len(out.args) >= 2 else (None, None)
    seen = [out]
    p = _skip(p, seen)
    sinks = None
    if _is_call(p, operator.getitem) and p.args[1] == _LAST:
        seen.append(p)
        soft = p.args[0]
        if not _is_softmax(soft):
            return None
        seen.append(soft)
        x = soft.args[0]
        if _is_call(x, operator.sub) and _is_max_of(x.args[1], x.args[0]):
            seen += [x, x.args[1], x.args[1].args[0]]
            x = x.args[0]
        if not (_is_call(x, torch.cat) and _last_dim(x) and len(x.args[0]) == 2):
            return None
        seen.append(x)
        s, e = x.args[0]
        sinks = _one_per_head(e, seen)
        if sinks is None:
            return None
    elif _is_softmax(p):
        seen.append(p)
        s = p.args[0]
    else:
        return None
    mask = None
    if _is_call(s, operator.add) and all(isinstance(a, Node) for a in s.args):
        seen.append(s)
        s, mask = s.args if _is_scores(s.args[0]) else s.args[::-1]
    scale = 1.0
    if _is_call(s, operator.mul) or _is_call(s, operator.truediv):
        a, c = s.args
        if s.target is operator.mul and isinstance(a, (int, float)):
            a, c = c, a
        if not isinstance(c, (int, float)) or not isinstance(a, Node):
            return None
        seen.append(s)
        scale, s = (float(c) if s.target is operator.mul else 1.0 / float(c)), a
    if not (_is_call(s, torch.matmul) and _is_key_transpose(s.args[1])):
        return None
    seen += [s, s.args[1]]
    q, k = s.args[0], s.args[1].args[0]
    if not _shapes_fit(q, k, v, mask, sinks) or not math.isfinite(scale):
        return None
    interior = frozenset(seen)
    if any(u not in interior for n in seen if n is not out for u in n.users):
        return None                                       # the scores or weights are used elsewhere
    return EagerAttention(q, k, v, mask, scale, sinks, interior)


def _skip(p, seen):
    """Back over what eager attention does between the softmax and the last matmul: ``dropout`` in
    eval (or p=0) and dtype casts."""
    while isinstance(p, Node):
        if p.op == "call_method" and p.target in ("to", "type_as", "float"):
            pass
        elif _is_call(p, F.dropout) and not (_arg(p, 2, "training", True) and _arg(p, 1, "p", 0.5)):
            pass
        else:
            return p
        seen.append(p)
        p = p.args[0]
    return p


def _one_per_head(e, seen) -> Optional[Node]:
    """The [H] tensor that ``sink.reshape(1, -1, 1, 1).expand(B, -1, L, -1)`` broadcasts, or None."""
    chain = []
    while isinstance(e, Node) and e.op == "call_method" and e.target in ("reshape", "view", "expand", "to"):
        chain.append(e)
        e = e.args[0]
    val = _val(e)
    if val is None or val.dim() != 1:
        return None
    seen += chain
    return e


def _is_scores(n) -> bool:
    """``matmul(q, k^T)``, scaled or not: what a mask is added to."""
    return _is_call(n, torch.matmul) or _is_call(n, operator.mul) or _is_call(n, operator.truediv)


def _is_call(n, target) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target is target


def _is_softmax(n) -> bool:
    if _is_call(n, F.softmax) or _is_call(n, torch.softmax) or (
            isinstance(n, Node) and n.op == "call_method" and n.target == "softmax"):
        return _last_dim(n)
    return False


def _is_max_of(m, x) -> bool:
    """``m`` is ``x.max(dim=-1, keepdim=True)[0]`` (or ``.values``)."""
    if not (isinstance(m, Node) and (_is_call(m, operator.getitem) and m.args[1] == 0
                                     or m.op == "call_function" and m.target is getattr and m.args[1] == "values")):
        return False
    mx = m.args[0]
    return (isinstance(mx, Node) and mx.op == "call_method" and mx.target == "max" and mx.args[0] is x
            and _last_dim(mx) and _arg(mx, 2, "keepdim", False))


def _is_key_transpose(t) -> bool:
    if not (isinstance(t, Node) and t.op == "call_method" and t.target == "transpose"):
        return False
    val = _val(t)
    dims = {d % val.dim() for d in t.args[1:3]} if val is not None else set()
    return dims == {val.dim() - 2, val.dim() - 1} if val is not None else False


def _last_dim(n) -> bool:
    val = _val(n.args[0] if n.op != "call_function" or n.target is not torch.cat else n)
    dim = _arg(n, 1, "dim", None)
    return val is not None and isinstance(dim, int) and dim % val.dim() == val.dim() - 1


def _arg(n, i, name, default):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _val(n):
    v = n.meta.get("example_value") if isinstance(n, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _shapes_fit(q, k, v, mask, sinks) -> bool:
    """[B, H, L, D] queries against [B, H, S, D] keys and [B, H, S, Dv] values (K/V already repeated
    to H heads), a float mask broadcastable to [B, H, L, S], one sink per head (and Dv = D: the kernel
    that returns the logsumexp needs it)."""
    qv, kv, vv = _val(q), _val(k), _val(v)
    if any(x is None or x.dim() != 4 for x in (qv, kv, vv)):
        return False
    if qv.shape[:2] != kv.shape[:2] or kv.shape[:3] != vv.shape[:3] or qv.shape[-1] != kv.shape[-1]:
        return False
    if mask is not None and (_val(mask) is None or _val(mask).dim() != 4 or not _val(mask).dtype.is_floating_point):
        return False                                      # added to the scores: SDPA reads a bool mask otherwise
    if sinks is not None and (_val(sinks).shape[0] != qv.shape[1] or vv.shape[-1] != qv.shape[-1]):
        return False
    return True
