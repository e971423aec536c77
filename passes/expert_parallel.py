"""expert_parallel: with ``options["expert_parallel"]``, each mixture-of-experts layer's experts become one
call of ``seqpar::moe_experts`` (``sp_compiler/experts.py``), whose weights ``annotate`` splits by expert.

    before:  h = grouped_mm(x, w_in, offs)             x [M, H] rows sorted by expert, w_in [E, H, 2I]
             gate, up = split(h, I, -1)
             y = grouped_mm(act(gate) * up, w_out, offs)                                 w_out [E, I, H]
    after:   y = moe_experts(x, offs, w_in, w_out, "aten.silu.default", gated=True, group, tokens="all")
                                                       w_in, w_out: S(0), E/N experts per rank

An expert layer without a gate (act(h), no split) is matched too. ``localize`` sets ``tokens="local"``
where the block runs on each rank's own tokens (the rows then travel to their experts' ranks and back).
Runs first, on the captured graph, so every later pass sees one node per layer's experts. Experts that
compute anything else between their matmuls (a bias, a clamp) raise an ``UnsupportedOpError`` naming them.
"""
from __future__ import annotations

import operator

import torch

from sp_compiler.errors import UnsupportedOpError
from sp_compiler.experts import MOE_EXPERTS

__all__ = ["expert_parallel", "GROUPED_MM", "is_grouped_mm"]

aten = torch.ops.aten

#: the grouped expert matmuls, by registered name (transformers' op is registered when transformers loads it)
GROUPED_MM = ("transformers::grouped_mm_fallback", "aten::_grouped_mm")


def is_grouped_mm(node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
        and node.target.name() in GROUPED_MM


def expert_parallel(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    if not ctx.options.expert_parallel:
        return gm
    done = set()
    for first in [n for n in gm.graph.nodes if is_grouped_mm(n)]:
        if first not in done:                                      # not the second matmul of a pair
            done.add(_fuse(gm.graph, first, ctx))
    return gm


def _only_user(n):
    return next(iter(n.users)) if len(n.users) == 1 else None


def _fuse(graph, first, ctx):
    x, w_in, offs = first.args[0], first.args[1], first.args[2] if len(first.args) > 2 else first.kwargs["offs"]
    gated, act, h, between = _between(first)
    last = _only_user(h) if h is not None else None
    if last is None or not is_grouped_mm(last) or last.args[0] is not h or last.args[2] is not offs:
        raise UnsupportedOpError(first, "expert_parallel runs an expert layer as grouped_mm -> [split, act, mul] "
                                 "-> grouped_mm over the same offsets; these experts compute something else "
                                 "between their matmuls", hint="drop options['expert_parallel'] for this model")
    with graph.inserting_before(last):
        fused = graph.call_function(MOE_EXPERTS, (x, offs, w_in, last.args[1], str(act.target), gated,
                                                  ctx.group_name or "", "all"))
    fused.meta = dict(last.meta)
    last.replace_all_uses_with(fused)
    for n in [last, *reversed(between), first]:
        graph.erase_node(n)
    return last


def _between(first):
    """(gated, the activation node, h, the nodes from first to h in order) for grouped_mm -> split ->
    act(gate) * up, or grouped_mm -> act; Nones for anything else."""
    user = _only_user(first)
    if user is not None and user.target == aten.split.Tensor and len(user.users) == 2 \
            and user.args[1] * 2 == first.meta["val"].shape[-1] and (len(user.args) > 2 and user.args[2] in (-1, 1)):
        gate, up = sorted(user.users, key=lambda g: g.args[1] if g.target is operator.getitem else -1)
        act = _only_user(gate)
        mul = _only_user(act) if act is not None else None
        if _unary(act) and mul is not None and mul.target == aten.mul.Tensor \
                and list(mul.args) in ([act, up], [up, act]) and _only_user(up) is mul:
            return True, act, mul, [user, gate, up, act, mul]
    elif _unary(user):
        return False, user, user, [user]
    return None, None, None, []


def _unary(n) -> bool:
    return n is not None and n.target in _ACTIVATIONS and len(n.args) == 1 and not n.kwargs


_ACTIVATIONS = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default}
