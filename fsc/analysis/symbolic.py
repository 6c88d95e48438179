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


#: Size assumed for a data-dependent (unbacked) symbol, e.g. a split size read from a
#: tensor, when estimating costs. The same on every rank; Inductor's
#: ``unbacked_symint_fallback`` uses the same value for the same purpose.
UNBACKED_FALLBACK = 8192


def _backed_values(shape_env: Any) -> dict:
    # torch 2.13 renamed var_to_val (now deprecated) to backed_var_to_val
    values = getattr(shape_env, "backed_var_to_val", None)
    return values if values is not None else shape_env.var_to_val


def has_hint(value: Any) -> bool:
    """False for a size that depends on data (an unbacked symbol) or has no shape env."""
    if not isinstance(value, (torch.SymInt, torch.SymFloat)):
        return True
    node = value.node
    if node.has_hint():
        return True
    shape_env = getattr(node, "shape_env", None)
    if shape_env is None:
        return False
    backed = _backed_values(shape_env)
    return all(sym in backed for sym in sympy.sympify(node.expr).free_symbols)


def hint(value: Any) -> float:
    """The concrete value of ``value`` at its size hint.

    Backed symbols take their hint; data-dependent (unbacked) symbols, which have none,
    take :data:`UNBACKED_FALLBACK`. Raises :class:`NoHintError` only for a symbol with no
    shape environment to ask.
    """
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        node = value.node
        if node.has_hint():
            return float(node.hint)
        shape_env = getattr(node, "shape_env", None)
        if shape_env is None:
            raise NoHintError(f"symbolic size {node.expr} has no hint")
        expr = sympy.sympify(node.expr)
        backed = _backed_values(shape_env)
        values = {sym: backed.get(sym, UNBACKED_FALLBACK) for sym in expr.free_symbols}
        return float(expr.xreplace(values))
    return float(value)


def invariant_value(value: Any) -> float:
    """``value`` with every symbol set to :data:`UNBACKED_FALLBACK`: the same number on
    every rank. Size hints are the first batch *this* rank saw, so a decision that moves
    collectives must use this instead (DESIGN.md invariant 2); reports may use :func:`hint`."""
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        expr = sympy.sympify(value.node.expr)
        return float(expr.xreplace({sym: UNBACKED_FALLBACK for sym in expr.free_symbols}))
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
