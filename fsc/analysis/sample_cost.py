"""A training sample's cost as a function of its length, derived from the compiled graphs.

Compile the model on one sample with its length dimension dynamic (``mark_dynamic``):
the forward and backward graphs then have shapes in one size symbol, and summing the cost
model's per-node FLOPs, bytes and roofline seconds over both graphs gives the sample's
cost in that symbol, renamed ``L`` here. FLOPs and bytes are polynomials in L (attention
brings the L^2 term); seconds is a sum of per-node ``max(flops/peak, bytes/bandwidth) +
overhead`` terms, piecewise polynomial. The load balancer takes :meth:`SampleCost.evaluate`
as its per-sample cost. Nothing here is measured, so every rank derives the same cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import sympy

from fsc.analysis.cost_model import GraphCost

L = sympy.Symbol("L", positive=True, integer=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleCost:
    """Forward + backward cost of one sample of length ``L``."""

    flops: sympy.Expr
    nbytes: sympy.Expr
    seconds: sympy.Expr
    symbol: str
    """The graph's size symbol that became ``L``."""

    def flops_polynomial(self) -> sympy.Poly:
        return sympy.Poly(sympy.expand(self.flops), L)

    def bytes_polynomial(self) -> sympy.Poly:
        return sympy.Poly(sympy.expand(self.nbytes), L)

    def evaluate(self, lengths: Any) -> np.ndarray:
        """Estimated seconds for each length (array in, float64 array out)."""
        fn = sympy.lambdify(L, self.seconds, modules=[{"Max": np.maximum, "Min": np.minimum}, "numpy"])
        values = np.asarray(lengths, dtype=np.float64)
        return np.broadcast_to(np.asarray(fn(values), dtype=np.float64), values.shape).copy()

    def __call__(self, length: float) -> float:
        return float(self.evaluate([length])[0])

    def __str__(self) -> str:
        flops = sympy.Poly(sympy.expand(self.flops), L).as_expr()
        nbytes = sympy.Poly(sympy.expand(self.nbytes), L).as_expr()
        return (f"per-sample cost in L (from graph symbol {self.symbol}): FLOPs = {sympy.N(flops, 4)}; "
                f"bytes = {sympy.N(nbytes, 4)}")


def sample_cost(costs: Iterable[GraphCost], symbol: str | None = None) -> SampleCost:
    """Sum graph costs (a compile's forward and backward) and name their length symbol L.

    ``symbol``: the size symbol that is the sample length (e.g. ``"s0"``); needed only when
    the graphs have more than one. Raises ``ValueError`` naming the symbols otherwise.
    """
    costs = list(costs)
    if not costs:
        raise ValueError("sample_cost: no graph costs given (was anything compiled?)")
    flops = sum((c.flops for c in costs), sympy.Integer(0))
    nbytes = sum((c.nbytes for c in costs), sympy.Integer(0))
    seconds = sum((c.seconds for c in costs), sympy.Integer(0))
    free = sorted({str(s) for e in (flops, nbytes, seconds) for s in e.free_symbols})
    if symbol is None:
        if len(free) != 1:
            raise ValueError(
                f"sample_cost: the graphs have size symbols {free}; compile on one sample with only its "
                "length dynamic, or name the length symbol with symbol=...")
        symbol = free[0]
    elif symbol not in free:
        raise ValueError(f"sample_cost: symbol {symbol!r} is not among the graphs' size symbols {free}")
    others = [s for s in free if s != symbol]
    if others:
        raise ValueError(f"sample_cost: sizes {others} besides the length {symbol!r} are symbolic; make them static")
    sym = next(s for e in (flops, nbytes, seconds) for s in e.free_symbols if str(s) == symbol)
    rename = {sym: L}
    return SampleCost(flops=flops.xreplace(rename), nbytes=nbytes.xreplace(rename), seconds=seconds.xreplace(rename),
                      symbol=symbol)
