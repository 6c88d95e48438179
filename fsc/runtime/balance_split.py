"""Samples heavier than a rank's share, cut into contiguous chunks on several ranks.

What. With ``Balancer(split=True)`` a sample whose cost exceeds the mean per-rank load
(``cap = total / R``) cannot be balanced whole: the rank holding it sets the step whatever
the others do. :func:`wrap` lays these heavy samples end to end, heaviest first, and cuts
wherever the running cost crosses a multiple of ``cap`` (McNaughton's wrap-around rule for
preemptive scheduling), at a whole token (below or above each boundary, chosen together
so that the largest load is smallest): the first ranks are filled to ``cap``, each
heavy sample lies on consecutive, distinct ranks, and at most ``R - 1`` cuts are made. The
balancer's usual machinery (free counts) then assigns the light samples whole to the ranks
left, with the wrap's last, partly filled rank entering as one item of its load. Where
that leaves the largest load above ``cap * (1 + split_tolerance)`` (light samples that do
not pack whole: many at the length cap, each a sizeable share of a rank), every sample is
wrapped, heaviest first, and a boundary falling in a light sample is moved to its edge
when one side holds at most half the tolerance of it: each rank then ends within the
tolerance of ``cap``, and a light sample is cut only where that needs it. The result is a
:class:`SplitPlan`: per rank, which token ranges of which samples it runs, and where each
chunk's earlier keys and values live.

Why not equal chunks balanced as items. Cutting each heavy sample into ``ceil(cost / cap)``
equal chunks and balancing them with the rest was tried first: chunks of 0.86 x cap do not
pack (three giants holding 96% of a batch on 8 ranks made nine of them for eight ranks:
1.57x the mean). Wrap-around fills ranks exactly; only the cut points need whole tokens.

Chunk cost. In a causal sequence, the chunk holding query positions ``[p, p + n)``
attends to keys ``[0, p + n)``: later chunks cost more than earlier ones of the same
length. With the per-sample cost ``a * L**2 + b * L`` (:class:`~fsc.runtime.QuadraticCost`;
for a compiled model, ``QuadraticCost.from_coefficients`` of the FLOPs polynomial of
``fsc.last_compile().sample_cost()``), the first ``x`` tokens cost ``F(x) = a * x**2 + b * x``
and the chunk costs ``F(p + n) - F(p) = a * (2 * p * n + n**2) + b * n``. The chunk's
attention pairs number ``n * p + n * (n + 1) / 2``, so its quadratic part is ``2a`` per pair
less ``a`` per token: the same reading of ``a * L**2`` as for the whole sample
(``2a * L * (L + 1) / 2 - a * L``). Chunk costs therefore sum exactly to the sample's cost,
and cutting leaves the total, and the fractional bound ``total / R``, unchanged. A cut
solves ``F(x) = t`` as ``x = 2t / (b + sqrt(b**2 + 4 a t))``, the form without
cancellation, then rounded to a whole token.

Communication. A chunk starting at ``p`` needs the keys and values of tokens ``[0, p)``
from the ranks of the sample's earlier chunks: ``p * kv_bytes_per_token`` bytes in the
forward pass, and their gradients, as many bytes, back in the backward. The plan reports
these bytes per chunk; they are not added to the rank loads (the balance is of compute;
the exchange overlaps it, and the simulator models it on its links).

Capped samples. A sample that would need more ranks than ``max_span`` allows (or more
chunks than it has tokens) is cut by :func:`cut_points` into that many chunks of nearly
equal cost, balanced as items with the light samples; :func:`spread` then gives its chunks,
in token order, its ranks in ascending order and merges neighbours that share a rank (equal
costs make the relabelling nearly free). One of its chunks still outweighs the mean load:
it is counted as a straggler, and the bound says so (``spanned``).

Limits: the cost is the quadratic polynomial only (no per-sample constant; a cost function
that is not a :class:`~fsc.runtime.QuadraticCost` is refused); cut points are whole
tokens, so a filled rank is off ``cap`` by up to one token's cost (seen: Zipf(2) lengths
on 256 ranks of 32, where a rank's share is about 28 tokens of the longest sample: 1.016);
splitting is decided on compute alone, so a sample just above ``cap`` is split even when
moving its keys and values costs more than the imbalance it removes, and a cut may fall a
few tokens from a sample's end; the wrap ignores the node structure, so a sample may
straddle two nodes (its exchange then crosses the network); ``max_per_rank`` bounds the
ranks the balancer fills, while a rank the wrap fills holds up to two pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Chunk", "SplitPlan", "chunk_cost", "cut_points", "pieces", "spread", "wrap"]


def prefix_cost(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """Cost of a sample's first ``x`` tokens: ``a * x**2 + b * x``."""
    x = np.asarray(x, dtype=np.float64)
    return a * x * x + b * x


def chunk_cost(a: float, b: float, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Cost of the chunk of query positions ``[start, stop)`` attending to keys ``[0, stop)``:
    ``a * (2 * start * n + n**2) + b * n`` with ``n = stop - start`` (module docstring)."""
    p = np.asarray(start, dtype=np.float64)
    n = np.asarray(stop, dtype=np.float64) - p
    return a * (2.0 * p * n + n * n) + b * n


def cut_points(a: float, b: float, length: int, parts: int) -> np.ndarray:
    """Token boundaries ``0 = x_0 < x_1 < ... < x_parts = length`` (int64) with chunk costs
    as equal as whole tokens allow: ``x_j`` is the token nearest to ``F(x_j) = j * F(L) / parts``.
    ``1 <= parts <= length``."""
    share = np.arange(1, parts, dtype=np.float64) * (float(prefix_cost(a, b, length)) / parts)
    if a > 0.0:
        x = 2.0 * share / (b + np.sqrt(b * b + 4.0 * a * share))
    elif b > 0.0:
        x = share / b
    else:  # a cost of zero: equal token counts
        x = np.arange(1, parts, dtype=np.float64) * (length / parts)
    cut = np.rint(x).astype(np.int64)
    # Whole tokens: keep every chunk at least one token long (x_j in [j, length - parts + j]).
    j = np.arange(1, parts, dtype=np.int64)
    cut = np.clip(cut, j, length - parts + j)
    cut = np.maximum.accumulate(np.maximum(cut, j))
    for i in range(1, len(cut)):  # strictly increasing (rare: only for a few tokens per chunk)
        if cut[i] <= cut[i - 1]:
            cut[i] = cut[i - 1] + 1
    return np.concatenate(([0], cut, [length])).astype(np.int64)


def pieces(lengths: np.ndarray, costs: np.ndarray, a: float, b: float, *, cap: float,
           span: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The items to balance: every sample of cost at most ``cap`` whole, every heavier one cut
    into ``min(ceil(cost / cap), span, length)`` chunks. Returns ``(sample, start, stop, cost)``
    per item, int64 / float64, samples in index order and each sample's chunks in token order."""
    n = len(lengths)
    parts = np.ones(n, dtype=np.int64)
    if cap > 0.0:
        heavy = costs > cap
        parts[heavy] = np.minimum(np.minimum(np.ceil(costs[heavy] / cap).astype(np.int64), span),
                                  np.maximum(lengths[heavy], 1))
    sample = np.repeat(np.arange(n, dtype=np.int64), parts)
    start = np.zeros(len(sample), dtype=np.int64)
    stop = np.repeat(lengths.astype(np.int64), parts)
    first = np.concatenate(([0], np.cumsum(parts)[:-1])).astype(np.int64)
    for i in np.flatnonzero(parts > 1).tolist():
        cut = cut_points(a, b, int(lengths[i]), int(parts[i]))
        at = slice(first[i], first[i] + parts[i])
        start[at], stop[at] = cut[:-1], cut[1:]
    item_cost = costs[sample].astype(np.float64)  # whole samples keep their own cost, bit for bit
    chunked = parts[sample] > 1
    item_cost[chunked] = chunk_cost(a, b, start[chunked], stop[chunked])
    return sample, start, stop, item_cost


def wrap(lengths: np.ndarray, costs: np.ndarray, a: float, b: float, *, cap: float, ranks: int,
         snap: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """McNaughton's wrap-around (samples in the order given): lay the samples end to end and
    cut wherever the running cost crosses a multiple of ``cap``, at a whole token; the
    j-th stretch goes to rank j (at most ``ranks - 1`` cuts). ``snap`` (per sample, cost):
    a boundary that leaves at most this much of the sample on one side moves to the sample's
    edge instead, keeping it whole on the side holding the larger part (each rank then ends
    within ``snap`` of its boundaries; 0: always cut).

    Returns ``(sample, start, stop, rank)`` per piece (sample indexes the arguments; a
    zero-length sample is one empty piece) and ``full``, the number of boundaries placed:
    ranks below ``full`` end at a boundary, rank ``full`` holds what is left. A sample of
    cost at most ``ranks * cap`` lies on consecutive, distinct ranks."""
    n = len(costs)
    edge = np.concatenate(([0.0], np.cumsum(costs)))  # sequential sums: the same bits on every rank
    full = min(int(edge[-1] // cap), ranks - 1) if n else 0
    bound = np.arange(1, full + 1, dtype=np.float64) * cap
    owner = np.clip(np.searchsorted(edge, bound, side="right") - 1, 0, max(n - 1, 0))
    share = bound - edge[owner]
    if a > 0.0:
        x = 2.0 * share / (b + np.sqrt(b * b + 4.0 * a * share))
    else:
        x = share / b
    size = lengths[owner].astype(np.int64)
    below = np.clip(np.floor(x).astype(np.int64), 0, size)
    above = np.clip(below + 1, 0, size)
    if snap is not None and full:
        rest = costs[owner] - share
        small = np.minimum(share, rest) <= snap[owner]
        edge_cut = np.where(share < rest, 0, size)
        below, above = np.where(small, edge_cut, below), np.where(small, edge_cut, above)
    cut = _round_cuts(below, above, owner, share, a, b, cap, rest=float(edge[-1]) - full * cap)
    # Points in token order per sample: each sample's start, then the boundaries inside it. A
    # piece runs from one point to the next of its sample (or to its end); its rank is the
    # number of boundaries up to its first point.
    p_sample = np.concatenate((np.arange(n, dtype=np.int64), owner.astype(np.int64)))
    p_token = np.concatenate((np.zeros(n, dtype=np.int64), cut))
    p_bound = np.concatenate((np.zeros(n, dtype=np.int64), np.ones(full, dtype=np.int64)))
    order = np.lexsort((p_bound, p_token, p_sample))
    p_sample, p_token, p_bound = p_sample[order], p_token[order], p_bound[order]
    rank = np.cumsum(p_bound)
    last = np.ones(len(p_sample), dtype=bool)
    last[:-1] = p_sample[1:] != p_sample[:-1]
    stop = np.where(last, lengths[p_sample].astype(np.int64), np.roll(p_token, -1))
    zero = (p_bound == 0) & (lengths[p_sample] == 0)
    keep = (stop > p_token) | zero
    return p_sample[keep], p_token[keep], stop[keep], rank[keep].astype(np.int64), full


def _round_cuts(below: np.ndarray, above: np.ndarray, owner: np.ndarray, share: np.ndarray, a: float, b: float,
                cap: float, *, rest: float) -> np.ndarray:
    """Each boundary's token, ``below`` or ``above`` it, chosen so that the largest load of
    the ranks is smallest: rank j's load is ``cap + e_j - e_(j-1)``, ``e_j`` the cost that
    boundary j's rounding moves onto rank j, and the rank after the last boundary holds
    ``rest - e_last``. A dynamic program over
    the boundaries (two choices each; ties to ``below``); a token's cost can be a sizeable
    share of ``cap`` (a long sample's last tokens, few samples per rank), and rounding each
    boundary to the nearest token can then leave one rank a whole token over."""
    full = len(share)
    if full == 0:
        return below
    choice = np.stack((below, above))
    err = (a * choice * choice.astype(np.float64) + b * choice) - share  # [2, full]
    err_l, choice_l, owner_l = err.tolist(), choice.tolist(), owner.tolist()
    peak = [cap + err_l[0][0], cap + err_l[1][0]]
    back: list[tuple[int, int]] = []
    for j in range(1, full):
        step, came = [], []
        for s in (0, 1):
            best, arg = float("inf"), 0
            for t in (0, 1):
                if owner_l[j] == owner_l[j - 1] and choice_l[t][j - 1] > choice_l[s][j]:
                    continue  # cuts within one sample must not cross
                value = max(peak[t], cap + err_l[s][j] - err_l[t][j - 1])
                if value < best:
                    best, arg = value, t
            step.append(best)
            came.append(arg)
        peak = step
        back.append((came[0], came[1]))
    peak = [max(peak[0], rest - err_l[0][-1]), max(peak[1], rest - err_l[1][-1])]
    s = 0 if peak[0] <= peak[1] else 1
    picked = [s]
    for came in reversed(back):
        s = came[s]
        picked.append(s)
    picked.reverse()
    return choice[np.asarray(picked), np.arange(full)]


def spread(sample: np.ndarray, start: np.ndarray, stop: np.ndarray, rank: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Give each sample's chunks (in token order, ``sample`` grouped and ascending as
    :func:`pieces` returns it) its ranks in ascending order, and merge neighbours on one
    rank: every sample then spans distinct ranks. Returns ``(sample, start, stop, rank)``."""
    if len(sample) == 0:
        return sample, start, stop, rank
    order = np.lexsort((rank, sample))  # per sample, its ranks ascending
    rank = rank[order]  # chunk j of a sample (token order) takes the j-th smallest of its ranks
    keep = np.ones(len(sample), dtype=bool)
    keep[1:] = (sample[1:] != sample[:-1]) | (rank[1:] != rank[:-1])
    head = np.flatnonzero(keep)
    tail = np.concatenate((head[1:], [len(sample)])) - 1
    return sample[head], start[head], stop[tail], rank[head]


@dataclass(frozen=True, kw_only=True, slots=True)
class Chunk:
    """Query positions ``[start, stop)`` of ``sample`` on ``rank``; it attends to keys
    ``[0, stop)``, of which ``[0, start)`` come from ``earlier``."""

    sample: int
    start: int
    stop: int
    length: int  # the whole sample's
    rank: int
    earlier: tuple[tuple[int, int, int], ...]  # (rank, start, stop) of the sample's earlier chunks
    kv_bytes: float  # start * kv_bytes_per_token: keys and values this chunk receives (forward)

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.length


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class SplitPlan:
    """Every rank's token ranges. Chunk arrays are ordered by (rank, sample, start) and
    read-only; a whole sample is one chunk ``[0, length)``."""

    ranks: int
    sample: np.ndarray  # int64 [k]
    start: np.ndarray  # int64 [k]
    stop: np.ndarray  # int64 [k]
    length: np.ndarray  # int64 [k]: the whole sample's length
    rank: np.ndarray  # int64 [k]
    cost: np.ndarray  # float64 [k]
    kv_bytes: np.ndarray  # float64 [k]: start * kv_bytes_per_token
    split_samples: int  # samples on more than one rank
    _starts: np.ndarray = field(repr=False)  # chunks of rank r: [_starts[r], _starts[r + 1])
    _first: np.ndarray = field(repr=False)  # per chunk: index of its sample's first chunk, by token order
    _by_token: np.ndarray = field(repr=False)  # chunk indices grouped by sample, in token order

    @classmethod
    def build(cls, *, ranks: int, sample: np.ndarray, start: np.ndarray, stop: np.ndarray, rank: np.ndarray,
              cost: np.ndarray, lengths: np.ndarray, kv_bytes_per_token: float) -> SplitPlan:
        order = np.lexsort((start, sample, rank))
        sample, start, stop, rank, cost = (x[order] for x in (sample, start, stop, rank, cost))
        length = np.asarray(lengths, dtype=np.int64)[sample]
        kv = start.astype(np.float64) * kv_bytes_per_token
        starts = np.concatenate(([0], np.cumsum(np.bincount(rank, minlength=ranks)))).astype(np.int64)
        by_token = np.lexsort((start, sample))
        grouped = sample[by_token]
        head = np.ones(len(grouped), dtype=bool)
        head[1:] = grouped[1:] != grouped[:-1]
        first_of_group = np.maximum.accumulate(np.where(head, np.arange(len(grouped)), 0))
        first = np.empty(len(sample), dtype=np.int64)
        first[by_token] = first_of_group
        split = int(len(np.unique(sample[start > 0]))) if len(sample) else 0
        plan = cls(ranks=ranks, sample=sample, start=start, stop=stop, length=length, rank=rank, cost=cost, kv_bytes=kv,
                   split_samples=split, _starts=starts, _first=first, _by_token=by_token)
        for x in (sample, start, stop, length, rank, cost, kv, starts, first, by_token):
            x.setflags(write=False)
        return plan

    @property
    def kv_bytes_total(self) -> float:
        """Keys and values moved for all splits in the forward pass (as many again for the
        gradients in the backward)."""
        return float(self.kv_bytes.sum())

    def chunks_of(self, rank: int) -> tuple[Chunk, ...]:
        """The chunks ``rank`` runs, by sample then start, each with its earlier chunks."""
        out = []
        for i in range(self._starts[rank], self._starts[rank + 1]):
            earlier = ()
            if self.start[i] > 0:
                found = []
                for j in self._by_token[self._first[i]:].tolist():  # the sample's chunks, token order
                    if self.start[j] >= self.start[i]:
                        break
                    found.append((int(self.rank[j]), int(self.start[j]), int(self.stop[j])))
                earlier = tuple(found)
            out.append(Chunk(sample=int(self.sample[i]), start=int(self.start[i]), stop=int(self.stop[i]),
                             length=int(self.length[i]), rank=rank, earlier=earlier, kv_bytes=float(self.kv_bytes[i])))
        return tuple(out)
