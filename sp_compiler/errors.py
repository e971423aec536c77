"""Typed errors. Each names what failed, where (node and module path) and what to change."""
from __future__ import annotations

import re
from typing import Optional

__all__ = ["SeqparError", "OptionsError", "InputError", "CheckpointError", "PlanError", "ShardingError",
           "UnsupportedOpError", "ShapeConstraintError", "module_path", "short_reason"]


class SeqparError(RuntimeError):
    """Base class of every error seqpar raises at compile time."""


class OptionsError(SeqparError, ValueError):
    """An unknown option name or value; the message lists the valid ones."""


class InputError(SeqparError, ValueError):
    """A call's inputs do not fit together (lengths, devices); the message names the input."""


class CheckpointError(SeqparError, ValueError):
    """A checkpoint that cannot give a weight (missing, another shape, a dtype seqpar does not cast);
    the message names the tensor and the file."""


class PlanError(SeqparError):
    """The planner cannot build or compile the model as asked; the message says what to change."""


_WHERE = r"(?:at )?node '[^']*'(?: \([^)]*\))? in module '[^']*':? ?"


def short_reason(reason: str, width: int = 80) -> str:
    """'not available: <the engine's reason without node names and fix>', cut to ``width`` characters
    (a table cell of ``seqpar plan`` and ``seqpar bench``)."""
    text = re.sub(_WHERE, "", reason.split(". Fix:")[0]).strip()
    text = text if len(text) <= width else text[: width - 1] + "…"
    return f"not available: {text}"


def module_path(node) -> str:
    """Dotted path of the innermost nn.Module that produced ``node`` (from nn_module_stack)."""
    stack = getattr(node, "meta", {}).get("nn_module_stack") or {}
    if not stack:
        return "<top level>"
    path = list(stack.values())[-1][0]
    return _clean_fqn(path)


def _clean_fqn(path: str) -> str:
    # Dynamo writes L['self'].model.layers[0].self_attn or L['args'][0]._modules['model']...
    path = re.sub(r"^L\['\w+'\](\[\d+\])?\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]|_modules\['([^']+)'\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".") or "<top level>"


class ShardingError(SeqparError):
    """A node cannot be computed on the placements its inputs have."""

    def __init__(self, node, problem: str, *, placements=None, hint: Optional[str] = None):
        from .placements import fmt

        self.node = node
        where = f"node '{node.name}' ({node.target}) in module '{module_path(node)}'"
        msg = f"{where}: {problem}"
        if placements is not None:
            msg += f"; input placements: {fmt(tuple(placements))}"
        if hint:
            msg += f". Fix: {hint}"
        super().__init__(msg)


class UnsupportedOpError(ShardingError):
    """An op with no propagation rule sits on a sharded path."""


class ShapeConstraintError(SeqparError):
    """A size is not divisible by the world size (heads, sequence length, ...)."""
