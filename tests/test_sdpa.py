"""sp_compiler.sdpa: attention arguments bound by name, checked against each op's own schema.

Expected values come from ``op._schema`` (which argument has which name, type and default) or
from calling the op, never from tables in the code under test. One process, no process group.
"""
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from sp_compiler import sdpa

aten = torch.ops.aten

ALL_OPS = sorted(sdpa.OPS, key=str)
B, H, S, D = 2, 3, 8, 4


def _tensor_args(op):
    return [a for a in op._schema.arguments if isinstance(a.type, torch.TensorType)]


def _optional_tensor_args(op):
    return [a for a in op._schema.arguments if isinstance(a.type, torch.OptionalType)
            and isinstance(a.type.getElementType(), torch.TensorType)]


def _sentinels(op, graph):
    """A distinct value per schema argument: placeholders for tensors, distinct scalars otherwise."""
    values = {}
    for i, a in enumerate(op._schema.arguments):
        if isinstance(a.type, torch.TensorType) or a in _optional_tensor_args(op):
            values[a.name] = graph.placeholder(a.name)
        elif isinstance(a.type, torch.BoolType):
            values[a.name] = bool(i % 2)
        else:                                               # float / float?
            values[a.name] = 0.125 * (i + 1)
    return values


def _node(op, values, n_positional):
    """A graph node calling ``op`` with its first ``n_positional`` positional arguments by position,
    the rest by keyword."""
    positional = [a.name for a in op._schema.arguments if not a.kwarg_only][:n_positional]
    args = tuple(values[n] for n in positional)
    kwargs = {n: v for n, v in values.items() if n not in positional}
    graph = next(v for v in values.values() if isinstance(v, torch.fx.Node)).graph
    return graph.call_function(op, args, kwargs)


@pytest.mark.parametrize("op", ALL_OPS, ids=str)
def test_bind_reads_every_argument_by_schema_name(op):
    graph = torch.fx.Graph()
    values = _sentinels(op, graph)
    n_pos = len([a for a in op._schema.arguments if not a.kwarg_only])
    for split in range(3, n_pos + 1):                        # q, k, v positional; the rest either way
        c = sdpa.bind(_node(op, values, split))
        for name, want in values.items():
            assert c[name] is want if isinstance(want, torch.fx.Node) else c[name] == want, (split, name)
        q, k, v = (values[a.name] for a in _tensor_args(op)[:3])
        assert (c.q, c.k, c.v) == (q, k, v)
        masks = _optional_tensor_args(op)
        assert c.mask is (values[masks[0].name] if masks else None)
        assert c.is_causal == values["is_causal"]
        assert c.scale == values["scale"]
        assert c.dropout_p == values["dropout_p"]


@pytest.mark.parametrize("op", ALL_OPS, ids=str)
def test_bind_fills_schema_defaults(op):
    graph = torch.fx.Graph()
    values = _sentinels(op, graph)
    required = [a for a in op._schema.arguments if not a.has_default_value()]
    node = graph.call_function(op, tuple(values[a.name] for a in required))
    c = sdpa.bind(node)
    for a in op._schema.arguments:
        if a.has_default_value():
            assert c[a.name] == a.default_value, a.name
    passed = [a for a in _optional_tensor_args(op) if a in required]
    assert c.mask is (values[passed[0].name] if passed else None)


@pytest.mark.parametrize("op", ALL_OPS, ids=str)
def test_bind_refuses_what_the_schema_does_not_take(op):
    graph = torch.fx.Graph()
    values = _sentinels(op, graph)
    n_pos = len([a for a in op._schema.arguments if not a.kwarg_only])
    node = _node(op, values, n_pos)
    node.kwargs = {**node.kwargs, "no_such_argument": 1}
    with pytest.raises(TypeError, match="no_such_argument"):
        sdpa.bind(node)
    node = _node(op, values, n_pos)
    node.args = (*node.args, *([0] * (1 + len(node.kwargs))))
    with pytest.raises(TypeError):
        sdpa.bind(node)


def _fake_inputs(mode, op):
    with mode:
        q = torch.empty(B, H, S, D)
        mask = torch.zeros(B, H, S, S)
    return q, mask


@pytest.mark.parametrize("op", ALL_OPS, ids=str)
def test_rebuilt_arguments_are_accepted_by_the_op(op):
    """with_causal / rebuild write args the op itself accepts (called on fake tensors), and bind
    reads back what was written."""
    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(n) for n in "qkv")
    masks = _optional_tensor_args(op)
    m = graph.placeholder("m") if masks else None
    call = sdpa.default_call(op, q, k, v).replace(scale=0.5)
    if m is not None:
        call = call.replace(mask=m)
    args, kwargs = sdpa.to_args(call)
    node = graph.call_function(op, args, kwargs)
    assert sdpa.bind(node) == call
    sdpa.with_causal(node)
    c = sdpa.bind(node)
    assert c.is_causal and c.mask is None and c.scale == 0.5 and (c.q, c.k, c.v) == (q, k, v)
    assert m not in node.all_input_nodes
    mode = FakeTensorMode()
    fq, _ = _fake_inputs(mode, op)
    env = {q: fq, k: fq, v: fq}
    with mode:
        out = op(*torch.fx.node.map_arg(node.args, env.__getitem__),
                 **torch.fx.node.map_arg(node.kwargs, env.__getitem__))
    first = out[0] if isinstance(out, (tuple, list)) else out
    assert tuple(first.shape) == (B, H, S, D)


def test_replace_refuses_unknown_names_and_a_mask_where_none_is_taken():
    graph = torch.fx.Graph()
    q = graph.placeholder("q")
    c = sdpa.default_call(aten._scaled_dot_product_flash_attention.default, q, q, q)
    assert _optional_tensor_args(aten._scaled_dot_product_flash_attention.default) == []
    assert c.replace(mask=None) == c
    with pytest.raises(TypeError):
        c.replace(mask=q)
    with pytest.raises(TypeError):
        c.replace(attn_mask=q)


def test_with_causal_keeps_the_result_of_a_causal_mask():
    """flash_cpu and the composite op, run for real: a causal float mask replaced by is_causal."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, B, H, S, D).unbind(0)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = torch.zeros(S, S).masked_fill(~causal, -math.inf)
    for op in (aten._scaled_dot_product_flash_attention_for_cpu.default, aten.scaled_dot_product_attention.default):
        graph = torch.fx.Graph()
        pq, pk, pv, pm = (graph.placeholder(n) for n in ("q", "k", "v", "m"))
        args, kwargs = sdpa.to_args(sdpa.default_call(op, pq, pk, pv).replace(mask=pm, scale=0.3))
        node = graph.call_function(op, args, kwargs)
        graph.output(node)
        masked = torch.fx.GraphModule({}, graph)(q, k, v, mask)
        sdpa.with_causal(node)
        plain = torch.fx.GraphModule({}, graph)(q, k, v, mask)
        first = (lambda r: r[0] if isinstance(r, (tuple, list)) else r)
        torch.testing.assert_close(first(plain), first(masked))
        torch.testing.assert_close(first(plain), F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3))


class _Builder:
    def __init__(self, graph):
        self.graph = graph

    def __call__(self, target, *args, **kwargs):
        return self.graph.call_function(target, args, kwargs)


def _returns_lse(op):
    """Whether calling the op (on fake tensors, with every flag asking for it) gives a float
    [B, H, S] (or [B, H, S, 1] / padded) second output: found by calling it, not by name."""
    mode = FakeTensorMode()
    with mode:
        x = torch.empty(B, H, S, D)
        kwargs = {a.name: True for a in op._schema.arguments if "sumexp" in a.name}
        req = [a for a in op._schema.arguments if not a.has_default_value() and a.name not in kwargs]
        args = [x if isinstance(a.type, torch.TensorType) else None for a in req]
        out = op(*args, **kwargs)
    return isinstance(out, (tuple, list)) and isinstance(out[1], torch.Tensor) and out[1].dim() >= 3 \
        and tuple(out[1].shape[:2]) == (B, H)


@pytest.mark.parametrize("op", ALL_OPS, ids=str)
@pytest.mark.parametrize("causal", (True, False))
def test_call_emits_a_kernel_with_lse_of_shape_b_h_rows(op, causal):
    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(n) for n in "qkv")
    b = _Builder(graph)
    rows = 5                                                  # not a multiple of 32: a padded lse shows
    if not _returns_lse(op):
        assert sdpa.lse_index(op) is None
        with pytest.raises(ValueError):
            sdpa.call(b, op, q, k, v, causal, scale=0.25, rows=rows)
        return
    out, lse = sdpa.call(b, op, q, k, v, causal, scale=0.25, rows=rows)
    graph.output((out, lse))
    gm = torch.fx.GraphModule({}, graph)
    mode = FakeTensorMode()
    with mode:
        fq = torch.empty(B, H, rows, D)
    FakeTensorProp(gm, mode).propagate(fq, fq, fq)
    assert tuple(out.meta["val"].shape) == (B, H, rows, D)
    assert tuple(lse.meta["val"].shape) == (B, H, rows)
    (kernel,) = [n for n in graph.nodes if n.target == op]
    c = sdpa.bind(kernel)
    assert c.is_causal == causal and c.scale == 0.25 and c.mask is None


@pytest.mark.parametrize("causal", (True, False))
def test_call_on_cpu_gives_the_attention_and_its_logsumexp(causal):
    op = aten._scaled_dot_product_flash_attention_for_cpu.default
    torch.manual_seed(1)
    q, k, v = torch.randn(3, B, H, S, D).unbind(0)
    graph = torch.fx.Graph()
    pq, pk, pv = (graph.placeholder(n) for n in "qkv")
    graph.output(sdpa.call(_Builder(graph), op, pq, pk, pv, causal, scale=0.3, rows=S))
    out, lse = torch.fx.GraphModule({}, graph)(q, k, v)
    scores = q @ k.transpose(-1, -2) * 0.3
    if causal:
        scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3))


def test_rule_tables_hold_op_overloads_once():
    from sp_compiler import rules

    families = [rules._POINTWISE, rules._REDUCTIONS, rules._CREATION, rules._REPLICATED_ONLY]
    for fam in families:
        assert all(isinstance(op, torch._ops.OpOverload) for op in fam)
        assert len(set(fam)) == len(fam)
    seen = [op for fam in families for op in fam]
    assert len(seen) == len(set(seen)), "an op in two families"
    assert all(isinstance(op, torch._ops.OpOverload) or op is operator.getitem for op in rules.RULES)
    assert rules.ATTENTION_OPS == sdpa.OPS and all(rules.RULES[op] is rules._attention_rule for op in sdpa.OPS)


@pytest.mark.parametrize("module", ["sp_compiler.sdpa", "sp_compiler.rules", "passes.causal_mask",
                                    "passes.rows_attention"])
def test_all_names_exist(module):
    import importlib

    mod = importlib.import_module(module)
    assert mod.__doc__ and all(hasattr(mod, name) for name in mod.__all__)
