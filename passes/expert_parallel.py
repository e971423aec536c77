"""expert_parallel: with ``options["expert_parallel"]``, each mixture-of-experts layer's experts become one
call of ``seqpar::moe_experts`` (``sp_compiler/experts.py``), whose weights ``annotate`` splits by expert.

    before:  h = grouped_mm(x, w_in, offs)             x [M, H] rows sorted by expert, w_in [E, H, 2I]
             gate, up = split(h, I, -1)
             y = grouped_mm(act(gate) * up, w_out, offs)                                 w_out [E, I, H]
    after:   y = moe_experts(x, offs, w_in, w_out, "aten.silu.default", gated=True, group, tokens="all")
                                                       w_in, w_out: S(0), E/N experts per rank

An expert layer without a gate (act(h), no split) is matched too; so are biases added to either matmul
(``add_(mm, b[expert_ids])``: the call reads b [E/N, ...] per expert) and any other row-wise function of h
between the matmuls (gpt-oss: a clamped GLU on interleaved gate/up columns), which is lifted out as a
GraphModule of its own (``experts.register_gate``) and applied per expert block:

    gpt-oss: y = moe_experts(x, offs, w_in, w_out, "", False, group, "all", b_in, b_out, "gate-<hash>")

``localize`` sets ``tokens="local"`` where the block runs on each rank's own tokens (the rows then travel
to their experts' ranks and back). Runs first, on the captured graph, so every later pass sees one node
per layer's experts. Anything else between the matmuls raises an ``UnsupportedOpError`` naming it.
"""
from __future__ import annotations

import operator

import torch

from sp_compiler.errors import UnsupportedOpError
from sp_compiler.experts import MOE_EXPERTS, register_gate

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
    h, b_in = _biased(first)
    gated, act, g, between = _between(h)
    gate = ""
    if act is None:                                            # anything else row-wise: lifted out
        g, between = _row_wise(graph, h, offs)
        gate = register_gate(_lift(h, g, between)) if g is not None else ""
    last = _only_user(g) if g is not None else None
    if last is None or not is_grouped_mm(last) or last.args[0] is not g or last.args[2] is not offs:
        raise UnsupportedOpError(first, "expert_parallel runs an expert layer as grouped_mm (+ bias) -> a row-wise "
                                 "gate -> grouped_mm (+ bias) over the same offsets; these experts compute "
                                 "something else between their matmuls",
                                 hint="drop options['expert_parallel'] for this model")
    out, b_out = _biased(last)
    with graph.inserting_before(last):
        fused = graph.call_function(MOE_EXPERTS, (x, offs, w_in, last.args[1], str(act.target) if act else "",
                                                  bool(gated), ctx.group_name or "", "all", *_tail(b_in, b_out, gate)))
    fused.meta = dict(out.meta)
    out.replace_all_uses_with(fused)
    dead = [n for n in (out, last) if n is not None] + list(reversed(between)) + [h, first]
    for n in dict.fromkeys(dead):                             # in order, once each (h is first without a bias)
        graph.erase_node(n)
    for n in (b_in, b_out):
        if n is not None and not n.users:                     # b[expert_ids]: read by the call instead
            graph.erase_node(n)
    return last


def _tail(b_in, b_out, gate):
    """The optional arguments of ``moe_experts``: the expert biases (``b[expert_ids]``: the call reads
    ``b`` per expert), the lifted gate."""
    if b_in is None and b_out is None and not gate:
        return ()
    return (b_in.args[0] if b_in is not None else None, b_out.args[0] if b_out is not None else None, gate)


def _biased(mm):
    """(``mm``'s value with its bias, the bias node ``b[expert_ids]``) for ``add_(mm, b[expert_ids])`` (HF's
    grouped experts with biases, gpt-oss); (mm, None) without one."""
    add = _only_user(mm)
    if add is not None and add.target in (aten.add_.Tensor, aten.add.Tensor) and add.args[0] is mm \
            and isinstance(add.args[1], torch.fx.Node) and add.args[1].target == aten.index.Tensor \
            and add.args[1].args[0].op == "placeholder" and len(add.args[1].args[0].meta["val"].shape) == 2:
        return add, add.args[1]
    return mm, None


#: ops that act on each row alone (the rows: dim 0, the routed copies)
_ROW_WISE = {aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.mul.Tensor, aten.add.Tensor,
             aten.sub.Tensor, aten.div.Tensor, aten.neg.default, aten.exp.default, aten._to_copy.default,
             aten.sigmoid.default, aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default,
             aten.slice.Tensor, aten.split.Tensor, operator.getitem}


def _row_wise(graph, h, offs):
    """(the value the second grouped matmul takes, the nodes from h to it in graph order) when everything
    between is a row-wise function of h alone; (None, []) otherwise."""
    region, todo, g = set(), [h], None
    while todo:
        for u in todo.pop().users:
            if is_grouped_mm(u) and u.args[2] is offs:
                g = u.args[0] if g is None or g is u.args[0] else False
            elif u not in region:
                region.add(u)
                todo.append(u)
    rows = h.meta["val"].shape[0]

    def ok(n):
        at = {aten.slice.Tensor: 1, aten.split.Tensor: 2}.get(n.target)          # the dim they cut
        dims = (n.args[at] if len(n.args) > at else 0) % len(n.args[0].meta["val"].shape) if at else None
        vals = n.meta["val"] if isinstance(n.meta.get("val"), (tuple, list)) else [n.meta.get("val")]
        return (n.target in _ROW_WISE and dims != 0 and all(x in region or x is h for x in n.all_input_nodes)
                and all(isinstance(v, torch.Tensor) and v.shape[0] == rows for v in vals))

    if not g or g not in region or not all(ok(n) for n in region):
        return None, []
    return g, [n for n in graph.nodes if n in region]


def _lift(h, g, between) -> torch.fx.GraphModule:
    """The nodes from h to g as a GraphModule of its own: h -> g."""
    graph = torch.fx.Graph()
    env = {h: graph.placeholder("h")}
    for n in between:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[g])
    return torch.fx.GraphModule(torch.nn.Module(), graph)


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
