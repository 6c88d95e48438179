"""Sizes that may be symbolic: a sympy expression plus its value at the size hint."""

from __future__ import annotations

from typing import Any

import sympy
import torch


class NoHintError(ValueError):
    """A symbolic size has no hint, so no number can be put on it."""


def as_expr(value: Any) -> sympy.Expr:
    """Sympy form of an int, float, SymInt or SymFloat."""
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        return sympy.sympify(value.node.expr)
    return sympy.sympify(value)


def hint(value: Any) -> float:
    """The concrete value of ``value`` at its size hint; raises :class:`NoHintError`."""
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        node = value.node
        if node.has_hint():
            return float(node.hint)
        shape_env = getattr(node, "shape_env", None)
        if shape_env is not None:
            got = shape_env.size_hint(node.expr, allow_none=True)
            if got is not None:
                return float(got)
        raise NoHintError(f"symbolic size {node.expr} has no hint")
    return float(value)


def is_symbolic(value: Any) -> bool:
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        return not sympy.sympify(value.node.expr).is_number
    return False


def tensor_nbytes(t: torch.Tensor) -> Any:
    """Bytes of ``t``'s elements: an int, or a SymInt when its shape is symbolic."""
    numel = 1
    for size in t.shape:
        numel = numel * size
    return numel * t.element_size()
