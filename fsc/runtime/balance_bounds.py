"""Lower bounds on the largest per-rank cost of any assignment of samples to ranks.

The balancer reports ``max / LB``; a ratio near 1 means the assignment is near optimal
whatever the optimum is, so every bound here must hold for *every* assignment that meets
the count rule. Costs are non-negative (the balancer checks). With costs sorted so that
``c[0] >= c[1] >= ... >= c[n-1]``, ``R`` ranks, and every rank holding at least ``f``
samples (``f = n // R`` with equal counts; ``max(0, n - (R - 1) * cap)`` with a per-rank
cap; 0 otherwise):

``mean``
    ``sum(c) / R``: the largest of R loads is at least their average.

``heaviest`` (``k`` heaviest samples, ``1 <= k <= R``)
    Either the ``k`` heaviest samples sit on ``k`` different ranks, or two of them share
    one. In the first case those ranks hold at least ``k * f`` samples, so besides the
    ``k`` heavy ones at least ``k * (f - 1)`` others, disjoint, weighing at least the
    ``k * (f - 1)`` smallest costs; the largest of the k loads is at least their average,
    ``(c[0] + ... + c[k-1] + those smallest) / k``. In the second, that rank holds at
    least ``c[k-2] + c[k-1]`` plus the ``f - 2`` smallest costs. The bound is the smaller
    of the two cases. ``k = 1`` has only the first case: ``c[0]`` plus the ``f - 1``
    smallest others, the rank holding the heaviest sample. Larger k matters when many
    samples share the top cost (lengths at the model's cap).

``pigeonhole`` (``k >= 1``, while ``k * R + 1 <= n``)
    Among the ``k * R + 1`` heaviest samples, some rank holds at least ``k + 1`` (R ranks
    of at most k each hold only ``k * R``). That rank's load is at least the sum of the
    ``k + 1`` lightest of those heavy samples, ``c[k*R - k] + ... + c[k*R]``, plus, when it
    must hold ``f > k + 1`` samples, the ``f - k - 1`` smallest costs outside the heavy
    set (every outside sample is no heavier than any heavy one, so these are the cheapest
    way to fill it; when fewer than ``f - k - 1`` are outside, only those are counted,
    which stays a bound because costs are non-negative). ``k = 1`` is the familiar
    ``c[R-1] + c[R]``: with more samples than ranks, two of the ``R + 1`` heaviest share
    a rank.

With splits (``Balancer(split=True)``, :func:`split_lower_bound`), a sample may be cut into
contiguous chunks whose costs add up to its own, so only two bounds hold:

``mean``
    ``sum(c) / R`` as above (cutting leaves the total unchanged); the target the split
    balancer aims at.

``spanned``
    ``c[i] / m_i`` for the sample maximizing it, where ``m_i = min(R, max_span, L_i)`` is
    the most chunks it may be cut into (at least one token each): one of its chunks costs at
    least the average. It beats ``mean`` only when ``max_span`` caps a very heavy sample.

The keys and values that a split sends to later chunks' ranks are not in these bounds:
they are communication, reported by the assignment and not added to the compute loads.

Not used: "the ``f`` smallest costs", the bound one might first write for equal counts,
because it never beats ``mean`` (``f <= n / R`` samples of at most average weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LowerBound", "lower_bound", "split_lower_bound"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LowerBound:
    """The best of the bounds above: its value and which one it was."""

    value: float
    name: str  # "mean", "heaviest" or "pigeonhole"; with splits "mean" or "spanned"
    k: int = 0  # "heaviest": over the k heaviest samples; "pigeonhole": k + 1 of the k * R + 1 heaviest share a rank


def lower_bound(costs: np.ndarray, ranks: int, *, min_count: int = 0) -> LowerBound:
    """The largest of the bounds in the module docstring for ``costs`` (1-D, non-negative)
    on ``ranks`` ranks where every rank must hold at least ``min_count`` samples.

    Ties go to the simplest bound (mean, then heaviest, then the smallest k), so that the
    reported name says why the ratio cannot be better with the fewest words."""
    c = np.sort(np.asarray(costs, dtype=np.float64))[::-1]
    n = len(c)
    if n == 0:
        return LowerBound(value=0.0, name="mean")
    # cum[i] = c[0] + ... + c[i-1]; low[i] = the i smallest. Sequential scans, so every rank
    # computes the same bits; the tail has its own scan so small fills are not lost to
    # cancellation against a large prefix.
    cum = np.concatenate(([0.0], np.cumsum(c)))
    low = np.concatenate(([0.0], np.cumsum(c[::-1])))
    best = LowerBound(value=float(cum[n]) / ranks, name="mean")
    f = min_count

    # heaviest-k, k = 1..min(R, n). k * f <= n, so the k * (f - 1) smallest lie outside the top k.
    k = np.arange(1, min(ranks, n) + 1)
    spread = (cum[k] + low[k * max(f - 1, 0)]) / k
    shared = np.full(len(k), np.inf)  # k = 1: no two of one sample can share a rank
    if len(k) > 1:
        shared[1:] = c[k[1:] - 2] + c[k[1:] - 1] + low[np.minimum(max(f - 2, 0), n - k[1:])]
    values = np.minimum(spread, shared)
    i = int(np.argmax(values))  # first maximum: the smallest k
    if values[i] > best.value:
        best = LowerBound(value=float(values[i]), name="heaviest", k=int(k[i]))

    # pigeonhole, k = 1, 2, ... while k * R + 1 <= n.
    k = np.arange(1, (n - 1) // ranks + 1)
    if len(k):
        top = k * ranks + 1  # size of the heavy set
        heavy_part = cum[top] - cum[top - k - 1]
        fill = np.minimum(np.maximum(f - k - 1, 0), n - top)
        values = heavy_part + low[fill]
        i = int(np.argmax(values))
        if values[i] > best.value:
            best = LowerBound(value=float(values[i]), name="pigeonhole", k=int(k[i]))
    return best


def split_lower_bound(costs: np.ndarray, ranks: int, *, lengths: np.ndarray, span: int) -> LowerBound:
    """The bound when samples may be cut (module docstring): ``mean``, or ``spanned`` when a
    sample capped at ``min(ranks, span, length)`` chunks still outweighs it."""
    c = np.asarray(costs, dtype=np.float64)
    best = LowerBound(value=float(np.sum(c)) / ranks if len(c) else 0.0, name="mean")
    if len(c):
        parts = np.maximum(np.minimum(np.minimum(ranks, span), np.asarray(lengths, dtype=np.int64)), 1)
        per = c / parts
        i = int(np.argmax(per))
        if per[i] > best.value:
            best = LowerBound(value=float(per[i]), name="spanned", k=int(parts[i]))
    return best
