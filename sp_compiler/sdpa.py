"""sdpa: the attention ops' arguments, read and written by name from the op's own schema.

Five ATen ops carry attention, each with its own argument order (``aten.<op>._schema``):

    _scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal, *, attn_mask, scale)
    _scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, return_debug_mask, *, scale)
    _scaled_dot_product_efficient_attention(query, key, value, attn_bias, compute_log_sumexp, dropout_p,
                                            is_causal, *, scale)
    _scaled_dot_product_cudnn_attention(query, key, value, attn_bias, compute_log_sumexp, dropout_p,
                                        is_causal, return_debug_mask, *, scale)
    scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, *, scale, enable_gqa)

No position is written here: ``bind`` pairs a node's args and kwargs with the schema's
arguments (defaults filled in; ``bind_args`` does it for any OpOverload), and ``to_args`` writes
a bound call back the way the schema wants it (positional arguments by position, keyword-only
ones by name, left out where they equal their default):

    n = flash_cpu(q, k, v, attn_mask=m, scale=s)
    c = bind(n)             SdpaCall(q, k, v, mask=m, is_causal=False, scale=s, dropout_p=0.0)
    rebuild(n, c.replace(mask=None, is_causal=True))
    n = flash_cpu(q, k, v, 0.0, True, scale=s)                       (what ``with_causal(n)`` does)

    out, lse = call(b, target, q, k, v, causal=True, scale=s, rows=C)
        r   = target(q, k, v, ..., is_causal=True, compute_log_sumexp=True where the op has it, scale=s)
        out = r[0]
        lse = r[i_logsumexp]  -> squeezed / sliced to [B, H, C] where the kernel returns another layout
              (cudnn: [B, H, C, 1]; efficient on CUDA: padded to a multiple of 32), found by running the
              op once on small fake tensors, not written down per op

    lse_of(n)               the node that holds n's logsumexp as [B, H, Sq] (the end of what ``call``
                            emits), None when nothing reads it
    replace(n, out, lse)    n's output users read ``out``, its logsumexp's read ``lse``; n is erased

``mask`` is the op's ``attn_mask`` or ``attn_bias`` (None for the CUDA flash kernel, which has none).
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch.fx import Node

aten = torch.ops.aten

__all__ = [
    "OPS", "OUTPUT", "SdpaCall", "bind", "bind_args", "default_call", "to_args", "rebuild", "with_causal", "call",
    "is_attention", "mask_arg", "lse_index", "lse_kernel", "lse_of", "pads_lse", "replace",
]

OPS = frozenset({
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten.scaled_dot_product_attention.default,
})

OUTPUT = 0                                  # every attention op returns its output first

_MASK_NAMES = ("attn_mask", "attn_bias")
_LSE_NAMES = ("logsumexp", "log_sumexp")
_ALIASES = {"q": "query", "k": "key", "v": "value"}


def lse_kernel(device: torch.device):
    """The attention op that takes a mask and returns its logsumexp on ``device``'s type (for a rewrite
    that needs the logsumexp: attention sinks)."""
    if device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu.default
    return aten._scaled_dot_product_efficient_attention.default


def is_attention(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in OPS


def _schema(target):
    if target not in OPS:
        raise ValueError(f"{target} is not an attention op ({sorted(map(str, OPS))})")
    return target._schema


def mask_arg(target) -> Optional[str]:
    """Name of ``target``'s mask argument (``attn_mask`` / ``attn_bias``), None if it takes none."""
    names = [a.name for a in _schema(target).arguments if a.name in _MASK_NAMES]
    return names[0] if names else None


def lse_index(target) -> Optional[int]:
    """Index of the logsumexp among ``target``'s outputs, None if it returns none."""
    for i, r in enumerate(_schema(target).returns):
        if r.name in _LSE_NAMES:
            return i
    return None


@dataclass(frozen=True)
class SdpaCall:
    """One attention call: its op and every schema argument by name (defaults filled in)."""

    target: object
    values: Tuple[Tuple[str, object], ...]

    def __getitem__(self, name):
        name = _ALIASES.get(name, name)
        for k, v in self.values:
            if k == name:
                return v
        raise KeyError(f"{self.target} has no argument {name!r}")

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    @property
    def q(self):
        return self["query"]

    @property
    def k(self):
        return self["key"]

    @property
    def v(self):
        return self["value"]

    @property
    def mask(self):
        name = mask_arg(self.target)
        return self[name] if name else None

    @property
    def is_causal(self) -> bool:
        return bool(self.get("is_causal", False))

    @property
    def scale(self):
        return self.get("scale")

    @property
    def dropout_p(self) -> float:
        return self.get("dropout_p", 0.0)

    def replace(self, **changes) -> "SdpaCall":
        """A copy with some arguments changed: schema names, or ``q``/``k``/``v``/``mask``."""
        names = {k for k, _ in self.values}
        renamed = {}
        for k, v in changes.items():
            if k == "mask":
                m = mask_arg(self.target)
                if m is None:
                    if v is not None:
                        raise TypeError(f"{self.target} takes no mask")
                    continue
                k = m
            k = _ALIASES.get(k, k)
            if k not in names:
                raise TypeError(f"{self.target} has no argument {k!r}")
            renamed[k] = v
        return SdpaCall(self.target, tuple((k, renamed.get(k, v)) for k, v in self.values))


_MISSING = object()


def _default(arg, fill_required: bool = False):
    """The schema default; with ``fill_required``, None for an optional argument without one and
    False for a flag without one (efficient/cudnn's ``attn_bias``, ``compute_log_sumexp``)."""
    if arg.has_default_value():
        return arg.default_value
    if fill_required and isinstance(arg.type, torch.OptionalType):
        return None
    if fill_required and isinstance(arg.type, torch.BoolType):
        return False
    return _MISSING


def bind_args(target, args, kwargs) -> Dict[str, object]:
    """Any OpOverload's arguments by schema name, defaults filled in; TypeError where they do not fit."""
    schema = target._schema
    args, kwargs = list(args), dict(kwargs)
    positional = [a for a in schema.arguments if not a.kwarg_only]
    if len(args) > len(positional):
        raise TypeError(f"{len(args)} positional arguments, {schema.name} takes {len(positional)}")
    values = {}
    for i, a in enumerate(schema.arguments):
        if not a.kwarg_only and i < len(args):
            if a.name in kwargs:
                raise TypeError(f"argument {a.name!r} of {schema.name} given twice")
            v = args[i]
        elif a.name in kwargs:
            v = kwargs.pop(a.name)
        else:
            v = _default(a)
            if v is _MISSING:
                raise TypeError(f"missing argument {a.name!r} of {schema.name}")
        values[a.name] = v
    if kwargs:
        raise TypeError(f"{schema.name} has no argument(s) {sorted(kwargs)}")
    return values


def bind(node: Node) -> SdpaCall:
    """The attention node's arguments by schema name; TypeError on arguments the schema does not have."""
    _schema(node.target)
    try:
        values = bind_args(node.target, node.args, node.kwargs)
    except TypeError as e:
        raise TypeError(f"{node.name}: {e}") from None
    return SdpaCall(node.target, tuple(values.items()))


def default_call(target, q, k, v) -> SdpaCall:
    """A call of ``target`` on (q, k, v) with every other argument at its default (None for optional
    tensors without one, False for flags without one)."""
    values = []
    for a in _schema(target).arguments:
        val = {"query": q, "key": k, "value": v}.get(a.name, _MISSING)
        if val is _MISSING:
            val = _default(a, fill_required=True)
            if val is _MISSING:
                raise TypeError(f"{target}: argument {a.name!r} has no default")
        values.append((a.name, val))
    return SdpaCall(target, tuple(values))


def to_args(c: SdpaCall) -> Tuple[tuple, Dict[str, object]]:
    """(args, kwargs) for a node: positional arguments in schema order, keyword-only ones by name
    (left out where they equal the schema default)."""
    args, kwargs = [], {}
    for a in _schema(c.target).arguments:
        v = c[a.name]
        if not a.kwarg_only:
            args.append(v)
        elif not (a.has_default_value() and _same(v, a.default_value)):
            kwargs[a.name] = v
    return tuple(args), kwargs


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def rebuild(node: Node, c: SdpaCall) -> Node:
    """Write ``c``'s arguments into ``node`` (same op)."""
    if c.target != node.target:
        raise ValueError(f"rebuild: {node.name} calls {node.target}, the bound call {c.target}")
    node.args, node.kwargs = to_args(c)
    return node


def with_causal(node: Node) -> Node:
    """``node`` without its mask and with ``is_causal=True``."""
    return rebuild(node, bind(node).replace(mask=None, is_causal=True))


@functools.lru_cache(maxsize=None)
def _lse_layout(target):
    """(squeeze the last dim, slice the query dim) to bring the kernel's logsumexp to [B, H, Sq],
    from one call of the op on fake tensors with Sq = 3 (outside any trace in progress)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    i = lse_index(target)
    with disable_proxy_modes_tracing(), FakeTensorMode():          # asked while make_fx traces: not traced
        x = torch.empty(1, 1, 3, 8)
        args, kwargs = to_args(_with_lse(default_call(target, x, x, x)))
        lse = target(*args, **kwargs)[i]
    squeeze = lse.dim() == 4 and lse.shape[-1] == 1
    rows = lse.shape[2]
    if lse.dim() - squeeze != 3:
        raise NotImplementedError(f"{target}: logsumexp of shape {tuple(lse.shape)} for query [1, 1, 3, 8]")
    return squeeze, rows != 3


def pads_lse(target) -> bool:
    """Whether ``target`` pads its logsumexp past the query rows (efficient attention on CUDA)."""
    return _lse_layout(target)[1]


def _with_lse(c: SdpaCall) -> SdpaCall:
    """Ask for the logsumexp where the op has a flag for it (efficient, cudnn)."""
    return c.replace(**{name: True for name, _ in c.values if name == "compute_log_sumexp"})


def call(b, target, q, k, v, causal: bool, scale=None, rows: Optional[int] = None, mask=None):
    """Emit ``target(q, k, v, is_causal=causal, scale=scale, <mask>=mask)`` through the builder ``b``
    (``b(op, *args, **kwargs) -> Node``) and return (out, lse), lse as [B, H, Sq].

    ``rows`` (Sq) is needed only for kernels that pad their logsumexp (efficient attention on CUDA);
    without it, q's ``meta['val']`` is used."""
    i = lse_index(target)
    if i is None:
        raise ValueError(f"{target} returns no logsumexp")
    c = _with_lse(default_call(target, q, k, v)).replace(is_causal=bool(causal), scale=scale)
    if mask is not None:
        c = c.replace(mask=mask)
    args, kwargs = to_args(c)
    r = b(target, *args, **kwargs)
    out, lse = b(operator.getitem, r, OUTPUT), b(operator.getitem, r, i)
    squeeze, padded = _lse_layout(target)
    if squeeze:
        lse = b(aten.squeeze.dim, lse, -1)
    if padded:
        if rows is None:
            val = q.meta.get("val") if isinstance(q, Node) else None
            if val is None:
                raise ValueError(f"{target} pads its logsumexp; pass rows= (the query length)")
            rows = val.shape[-2]
        lse = b(aten.slice.Tensor, lse, 2, 0, rows)
    return out, lse


def lse_of(node: Node) -> Optional[Node]:
    """The node that holds ``node``'s logsumexp as [B, H, Sq], the end of what ``call`` emits (the getitem,
    squeezed and sliced as the kernel needs), or None when nothing reads the logsumexp."""
    i = lse_index(node.target)
    items = [u for u in node.users if u.target is operator.getitem and u.args[1] == i and u.users] \
        if i is not None else []
    if not items:
        return None
    (n,) = items
    squeeze, padded = _lse_layout(node.target)
    for needed, op in ((squeeze, aten.squeeze.dim), (padded, aten.slice.Tensor)):
        if needed:
            if len(n.users) != 1 or next(iter(n.users)).target != op:
                raise ValueError(f"{node.name}: its logsumexp is read other than as [B, H, Sq] ({op} expected)")
            n = next(iter(n.users))
    return n


def replace(node: Node, out: Node, lse: Optional[Node] = None) -> None:
    """Point the readers of ``node``'s output at ``out`` and those of its logsumexp (``lse_of``) at ``lse``
    ([B, H, Sq]); erase ``node`` and its getitems. ValueError when the logsumexp is read and ``lse`` is
    None."""
    held = lse_of(node)
    if held is not None:
        if lse is None:
            raise ValueError(f"{node.name}: its logsumexp is read, and the rewrite makes none")
        held.replace_all_uses_with(lse)
        while held is not node:                   # back to the getitem: read by nothing now
            prev = held.args[0]
            node.graph.erase_node(held)
            held = prev
    for u in list(node.users):
        if u.args[1] == OUTPUT:
            u.replace_all_uses_with(out)
        node.graph.erase_node(u)
    node.graph.erase_node(node)
