"""Counting the collectives that run: calls and bytes per kind, as NCCL-tests sizes them.

    with CollectiveCounter() as c:
        compiled(input_ids)
    c.calls, c.bytes        # Counter({'all_gather': 4, ...}), bytes per kind

What ``seqpar bench`` reports per forward, and what tests check the transformed graphs against.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .agree import in_check

__all__ = ["CollectiveCounter", "collective_size"]

# op name (in torch.ops._c10d_functional or torch.ops.c10d) -> (kind, where its NCCL-tests size is):
# "arg0"/"arg1" the tensors of that argument, "out" the tensors the op returns. All-gathers count
# what arrives (N x the input), the others what is sent: the sizes ``seqpar plan`` and dumps report.
_SIZES = {
    # functional collectives: compiled graphs (seqpar, Inductor) and DTensor
    "all_reduce": ("all_reduce", "arg0"), "all_reduce_": ("all_reduce", "arg0"),
    "all_reduce_coalesced": ("all_reduce", "arg0"), "all_reduce_coalesced_": ("all_reduce", "arg0"),
    "all_gather_into_tensor": ("all_gather", "out"), "all_gather_into_tensor_out": ("all_gather", "out"),
    "all_gather_into_tensor_coalesced": ("all_gather", "out"),
    "reduce_scatter_tensor": ("reduce_scatter", "arg0"), "reduce_scatter_tensor_coalesced": ("reduce_scatter", "arg0"),
    "all_to_all_single": ("all_to_all", "arg0"),
    "broadcast": ("broadcast", "arg0"), "broadcast_": ("broadcast", "arg0"),
    # c10d ops: torch.distributed's own calls (dist.all_reduce, ...), e.g. transformers' rowwise layers
    "allreduce_": ("all_reduce", "arg0"), "allreduce_coalesced_": ("all_reduce", "arg0"),
    "allgather_": ("all_gather", "arg0"), "_allgather_base_": ("all_gather", "arg0"),
    "allgather_coalesced_": ("all_gather", "arg0"), "allgather_into_tensor_coalesced_": ("all_gather", "arg0"),
    "reduce_scatter_": ("reduce_scatter", "arg1"), "_reduce_scatter_base_": ("reduce_scatter", "arg1"),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "arg1"),
    "alltoall_": ("all_to_all", "arg1"), "alltoall_base_": ("all_to_all", "arg1"),
}
_NOT_COMMUNICATION = {"wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier_"}
_NAMESPACES = ("_c10d_functional", "c10d")
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _tensor_bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(t) for t in x)
    return 0


def collective_size(func, args, out) -> Optional[tuple]:
    """(kind, bytes) of one dispatched collective op, None for an op that moves nothing (waits, other
    namespaces); ("unknown:<name>", 0) for a communication op this table does not know."""
    if func.namespace not in _NAMESPACES:
        return None
    name = func._schema.name.split("::")[-1]
    if name in _NOT_COMMUNICATION:
        return None
    if name not in _SIZES:
        return (f"unknown:{name}", 0)
    kind, where = _SIZES[name]
    source = out if where == "out" else args[int(where[-1])]
    return kind, _tensor_bytes(source)


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives that run while it is active: calls and bytes per kind.

        with CollectiveCounter() as c:
            compiled(input_ids)
        c.total_bytes, c.calls   # e.g. 98304, Counter({'all_reduce': 4, 'all_gather': 4})

    It sees every op of ``torch.ops._c10d_functional`` (what seqpar's and Inductor's graphs and DTensor
    call) and ``torch.ops.c10d`` (``torch.distributed``'s own calls). Compiled code runs under it
    unchanged (``ignore_compile_internals``: Dynamo neither skips nor recompiles); a tensor subclass
    (DTensor) handles its own ops with the counter still active, so the collectives of its implicit
    redistributions count too. ``total_bytes`` is None when an op it does not know ran (``unknown``).
    Collectives issued from C++ without the dispatcher (a custom kernel's own NCCL calls) are not seen.
    seqpar's rank check before each call (``agree.check_ranks``) is counted apart, in ``checks``
    (calls, bytes): it is not the model's communication.
    """

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self.checks = [0, 0]
        self.unknown: set = set()

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t not in _PLAIN for t in types):
            return NotImplemented            # the subclass runs the op; its collectives come back here
        out = func(*args, **(kwargs or {}))
        size = collective_size(func, args, out)
        if size is not None:
            kind, nbytes = size
            if in_check():
                self.checks[0] += 1
                self.checks[1] += nbytes
            elif kind.startswith("unknown:"):
                self.unknown.add(kind.split(":", 1)[1])
            else:
                self.calls[kind] += 1
                self.bytes[kind] += nbytes
        return out

    @property
    def total_bytes(self) -> Optional[int]:
        return None if self.unknown else sum(self.bytes.values())

    def describe(self) -> str:
        """'4 all_gather, 1 all_reduce' (or 'none'), then the rank checks if any ran."""
        text = ", ".join(f"{n} {k}" for k, n in sorted(self.calls.items())) or "none"
        return text + (f" (+ {self.checks[0]} rank check, {self.checks[1]} B)" if self.checks[0] else "")
