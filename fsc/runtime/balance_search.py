"""The assignment algorithms behind :mod:`fsc.runtime.balancer`, on integer costs.

Costs arrive quantized to non-negative int64 (see ``balancer._quantize``): every sum is
exact, so no result depends on summation order and every rank computes the same bits.
Each function is a pure function of its arguments; ties go to the lower sample index, then
the lower rank.

``kk_equal``
    Karmarkar-Karp largest differencing with equal counts (the method of NVIDIA
    recsys-examples' HSTU batch balancer): the costs, sorted, are cut into rows of R; each
    row is a partial partition with one sample per rank; the two partial partitions with
    the largest spread (max - min) are merged by pairing the heaviest part of one with the
    lightest of the other, until one is left. Every rank gets one sample of every row.
``heavy_apart``
    The samples that Karmarkar-Karp's one-per-row structure cannot balance (stragglers
    and near-stragglers) each on a rank of its own with the smallest samples as fill,
    Karmarkar-Karp for the rest.
``lpt``
    Longest processing time first with per-rank count limits: samples, heaviest first, go
    to the least loaded rank that still has room; once the samples left are just enough to
    bring every rank up to its minimum count, only ranks below it take them.
``refine``
    Local improvement by pairwise exchanges (and, with free counts, moves): each round
    pairs the ranks above the goal, heaviest first, with the lightest ones and applies per
    pair the one-for-one swap that brings the two loads closest to their mean while
    lowering the heavier one; when that does not lower the largest load, the heaviest
    ranks try two-for-two swaps, whose differences are much finer (what is left once
    single swaps stall on batches with few distinct lengths), and then the heaviest rank
    tries every other rank as a partner. The largest load never rises. The work of a
    round is bounded (vectorized over the pairs), and so is the number of rounds.
``exact``
    Depth-first branch and bound for small batches, proving optimality or giving up after
    a fixed number of nodes (a count, not a clock, so every rank stops at the same node).
"""

from __future__ import annotations

import heapq

import numpy as np

__all__ = ["exact", "heavy_apart", "kk_equal", "lpt", "refine"]


def _heaviest_first(q: np.ndarray) -> np.ndarray:
    # Negating an int64 is exact; the stable sort keeps equal costs in index order.
    return np.argsort(-q, kind="stable")


def kk_equal(q: np.ndarray, ranks: int) -> np.ndarray:
    """Rank of each sample: equal-count Karmarkar-Karp. Counts differ by at most one; when
    ``ranks`` does not divide the batch, zero-cost placeholders fill the last (lightest)
    row, so no rank gets two of them."""
    n = len(q)
    rows = -(-n // ranks)
    order = _heaviest_first(q)
    ids = np.full(rows * ranks, -1, dtype=np.int64)
    ids[:n] = order
    vals = np.zeros(rows * ranks, dtype=np.int64)
    vals[:n] = q[order]
    ids, vals = ids.reshape(rows, ranks), vals.reshape(rows, ranks)
    # Each partial partition keeps its parts sorted heaviest first: sums [R], members [R, k].
    states: list[tuple[np.ndarray, np.ndarray] | None] = []
    heap: list[tuple[int, int, int]] = []
    for j in range(rows):
        states.append((vals[j], ids[j][:, None]))
        heapq.heappush(heap, (-int(vals[j][0] - vals[j][-1]), -int(vals[j][0]), j))
    while len(heap) > 1:
        a, b = heapq.heappop(heap)[2], heapq.heappop(heap)[2]
        (sa, ma), (sb, mb) = states[a], states[b]
        sums = sa + sb[::-1]
        members = np.concatenate([ma, mb[::-1]], axis=1)
        o = np.argsort(-sums, kind="stable")
        states[a] = states[b] = None
        states.append((sums[o], members[o]))
        heapq.heappush(heap, (-int(sums[o][0] - sums[o][-1]), -int(sums[o][0]), len(states) - 1))
    members = states[heap[0][2]][1] if heap else np.empty((ranks, 0), dtype=np.int64)
    rank_of = np.empty(n, dtype=np.int64)
    flat = members.ravel()
    real = flat >= 0
    rank_of[flat[real]] = np.repeat(np.arange(ranks, dtype=np.int64), members.shape[1])[real]
    return rank_of


def heavy_apart(q: np.ndarray, ranks: int, lo: int) -> np.ndarray | None:
    """Rank of each sample with equal counts, the heaviest samples each on a rank of its
    own filled with the smallest samples; None when no sample needs that or the counts do
    not allow it.

    Equal-count Karmarkar-Karp gives every rank one sample of every row of R, so the rank
    of the heaviest sample carries at least the smallest sample of each other row. When
    that already puts it above the mean load of the ranks still to fill, the sample is set
    apart: its rank takes the ``lo - 1`` smallest samples left (it sets the step, so its
    fill should be as light as possible: the ``heaviest`` lower bound's argument). This
    repeats down the sorted samples; stragglers (heavier than the mean per-rank load)
    always qualify. The set-apart ranks share their fill by :func:`lpt`; the rest is
    balanced by :func:`kk_equal` over the other ranks."""
    n = len(q)
    extra = n - ranks * lo  # ranks that hold lo + 1 samples
    if lo == 0 or ranks < 2:
        return None
    desc = _heaviest_first(q)
    rows = -(-n // ranks)
    padded = np.zeros(rows * ranks, dtype=np.int64)
    padded[:n] = q[desc]
    row_minimum_fill = int(padded[2 * ranks - 1 :: ranks].sum())  # smallest of rows 1, 2, ...
    lightest = np.concatenate(([0], np.cumsum(q[desc[::-1]]))).tolist()  # [k]: the k smallest
    total, left = int(q.sum()), ranks
    count = 0
    while count < ranks - max(extra, 1) and (count + 1) * lo <= n:
        mine = int(q[desc[count]])
        if (mine + row_minimum_fill) * left <= total:  # KK's structure can balance it
            break
        # Estimate of the load left for the other ranks: this rank takes the next lo - 1
        # smallest samples.
        total -= mine + lightest[(count + 1) * (lo - 1)] - lightest[count * (lo - 1)]
        left -= 1
        count += 1
    if count == 0:
        return None
    others = desc[count:][::-1]  # lightest first
    mine = np.concatenate([desc[:count], others[: count * (lo - 1)]])
    rest = others[count * (lo - 1) :]
    rank_of = np.empty(n, dtype=np.int64)
    # LPT with exactly lo samples per rank: the heavy samples open the ranks, and the
    # heaviest takes fill only once the lighter ones have caught up, so a lone straggler
    # ends with the very smallest samples while equal ones share the fill evenly.
    rank_of[mine] = lpt(q[mine], count, lo, lo)
    rank_of[rest] = count + kk_equal(q[rest], ranks - count)
    return rank_of


def lpt(q: np.ndarray, ranks: int, lo: int, hi: int) -> np.ndarray:
    """Rank of each sample: greedy heaviest-first with every rank holding ``lo..hi``
    samples (``lo * ranks <= n <= hi * ranks``)."""
    n = len(q)
    rank_of = np.empty(n, dtype=np.int64)
    loads = [0] * ranks
    counts = [0] * ranks
    heap = [(0, r) for r in range(ranks)]
    deficit = lo * ranks  # samples still owed to ranks below lo
    forced = False
    values = q.tolist()
    for left, i in zip(range(n, 0, -1), _heaviest_first(q).tolist()):
        if not forced and deficit and left == deficit:
            # From here on every sample must go to a rank below lo, or one would end short.
            forced = True
            heap = [(loads[r], r) for r in range(ranks) if counts[r] < lo]
            heapq.heapify(heap)
        load, r = heapq.heappop(heap)
        rank_of[i] = r
        loads[r] = load + values[i]
        if counts[r] < lo:
            deficit -= 1
        counts[r] += 1
        if counts[r] < (lo if forced else hi):
            heapq.heappush(heap, (loads[r], r))
    return rank_of


_NONE = np.iinfo(np.int64).max
_PAIR_SWAP_RANKS = 16  # two-for-two swaps are tried for this many of the heaviest ranks only


def _best_exchange(x: np.ndarray, y: np.ndarray, gap: np.ndarray, top: int) -> tuple[np.ndarray, ...]:
    """Per row p: the unit ``i`` of ``x[p]`` and ``j`` of ``y[p]`` with
    ``0 < x[p, i] - y[p, j] < gap[p]`` closest to ``gap[p] / 2``, and whether one exists.

    ``x`` entries of -1 and ``y`` entries of ``top + 1`` are unusable (no difference with
    them lands in range). Only the two neighbours of ``x - gap/2`` in sorted ``y`` can be
    closest, and if neither is in range none is. One searchsorted serves all rows: each
    row is offset by ``p * span`` so rows never interleave, values are doubled to stay
    integral, and the queries are sorted too (numpy's search is several times faster on
    sorted queries)."""
    # Sort (value, column) pairs packed in one int64: keys are unique, so any sort gives the
    # same order on every machine (numpy's default sort is not stable and its SIMD variants
    # differ by CPU), and np.sort is several times faster than a stable argsort.
    # Values are at most 2**42 (two-for-two sums), columns below 2**9: keys below 2**51.
    bits = max(1, (max(x.shape[1], y.shape[1]) - 1).bit_length())
    mask = (1 << bits) - 1
    kx = np.sort((x << bits) | np.arange(x.shape[1]), axis=1)
    ky = np.sort((y << bits) | np.arange(y.shape[1]), axis=1)
    xs, ox = kx >> bits, kx & mask
    ys, oy = ky >> bits, ky & mask
    rows, width_y = y.shape
    # Row offsets keep rows apart in one flat search: below rows * span < 2**63 for
    # rows < 2**20.
    span = 2 * top + 8
    row = np.arange(rows, dtype=np.int64)[:, None]
    keys = (2 * ys + row * span).ravel()
    g = gap[:, None]
    want = np.clip(2 * xs - g, -1, 2 * top + 3) + row * span
    base = row * width_y
    at = np.searchsorted(keys, want.ravel()).reshape(xs.shape)  # flat index into ys
    above = np.minimum(at, base + width_y - 1)
    below = np.maximum(at - 1, base)
    flat = ys.ravel()
    d0, d1 = xs - flat[below], xs - flat[above]
    s0, s1 = np.abs(2 * d0 - g), np.abs(2 * d1 - g)
    s0[(d0 <= 0) | (d0 >= g)] = _NONE
    s1[(d1 <= 0) | (d1 >= g)] = _NONE
    use_above = s1 < s0
    score = np.where(use_above, s1, s0)
    pick = np.where(use_above, above, below) - base
    # Among equal scores the first in sorted-x order wins: still a pure function of the input.
    i = np.argmin(score, axis=1)
    r = np.arange(rows)
    return ox[r, i], oy[r, pick[r, i]], score[r, i] < _NONE


class _Slots:
    """Ranks as rows of slots: ``ids[r, s]`` is the sample in slot s of rank r (-1: free),
    ``vals`` its cost, ``loads`` the row sums (exact integers)."""

    def __init__(self, q: np.ndarray, rank_of: np.ndarray, ranks: int, width: int) -> None:
        n = len(q)
        counts = np.bincount(rank_of, minlength=ranks)
        order = np.argsort(rank_of, kind="stable")
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        self.ids = np.full((ranks, width), -1, dtype=np.int64)
        self.ids[rank_of[order], np.arange(n) - np.repeat(starts, counts)] = order
        self.free = self.ids < 0
        self.vals = np.where(self.free, 0, q[np.maximum(self.ids, 0)])
        self.loads = self.vals.sum(axis=1)

    def widen(self) -> None:
        self.ids = np.pad(self.ids, ((0, 0), (0, 1)), constant_values=-1)
        self.vals = np.pad(self.vals, ((0, 0), (0, 1)))
        self.free = np.pad(self.free, ((0, 0), (0, 1)), constant_values=True)

    def swap(self, ra: np.ndarray, sa: np.ndarray, rb: np.ndarray, sb: np.ndarray) -> None:
        """Exchange slots ``sa[k, :]`` of rank ``ra[k]`` with ``sb[k, :]`` of ``rb[k]``
        (ranks distinct, so the exchanges are independent)."""
        d = self.vals[ra[:, None], sa].sum(axis=1) - self.vals[rb[:, None], sb].sum(axis=1)
        for col in range(sa.shape[1]):
            a, b = sa[:, col], sb[:, col]
            for arr in (self.ids, self.vals, self.free):
                arr[ra, a], arr[rb, b] = arr[rb, b], arr[ra, a].copy()
        self.loads[ra] -= d
        self.loads[rb] += d

    def rank_of(self) -> np.ndarray:
        used = ~self.free
        out = np.empty(int(used.sum()), dtype=np.int64)
        out[self.ids[used]] = np.nonzero(used)[0]
        return out


def _one_for_one(s: _Slots, heavy: np.ndarray, light: np.ndarray, top: int, moves: bool) -> None:
    gap = s.loads[heavy] - s.loads[light]
    x = np.where(s.free[heavy], -1, s.vals[heavy])  # a free slot never leaves a heavy rank
    y = s.vals[light]
    if not moves:
        # A free slot may cross only to a rank without one, so counts stay within one.
        y = np.where(s.free[light] & s.free[heavy].any(axis=1)[:, None], top + 1, y)
    i, j, found = _best_exchange(x, y, gap, top)
    p = np.flatnonzero(found)
    s.swap(heavy[p], i[p, None], light[p], j[p, None])


def _two_for_two(s: _Slots, heavy: np.ndarray, light: np.ndarray, top: int) -> None:
    # Two samples for two: differences of pair sums are much finer than single costs,
    # which is what is left when single swaps stall (few distinct lengths). Counts kept.
    iu, ju = np.triu_indices(s.ids.shape[1], 1)
    gap = s.loads[heavy] - s.loads[light]
    fa, fb = s.free[heavy], s.free[light]
    x = np.where(fa[:, iu] | fa[:, ju], -1, s.vals[heavy][:, iu] + s.vals[heavy][:, ju])
    y = np.where(fb[:, iu] | fb[:, ju], 2 * top + 1, s.vals[light][:, iu] + s.vals[light][:, ju])
    i, j, found = _best_exchange(x, y, gap, 2 * top)
    p = np.flatnonzero(found)
    s.swap(heavy[p], np.stack([iu[i[p]], ju[i[p]]], axis=1), light[p], np.stack([iu[j[p]], ju[j[p]]], axis=1))


def _heaviest_with_any(s: _Slots, top: int, moves: bool) -> None:
    """The best one-for-one swap (or move) between the heaviest rank and any other, when
    the round's fixed pairing found nothing: every rank is a candidate partner."""
    ranks = len(s.loads)
    a = int(np.argmax(s.loads))
    others = np.delete(np.arange(ranks), a)
    gap = s.loads[a] - s.loads[others]
    x = np.broadcast_to(np.where(s.free[a], -1, s.vals[a]), (len(others), s.vals.shape[1]))
    y = s.vals[others]
    if not moves and s.free[a].any():
        y = np.where(s.free[others], top + 1, y)
    i, j, found = _best_exchange(x, y, gap, top)
    if not found.any():
        return
    rows = np.arange(len(others))
    d = x[rows, i] - y[rows, j]
    peak = np.where(found, np.maximum(s.loads[a] - d, s.loads[others] + d), _NONE)
    p = int(np.argmin(peak))
    s.swap(np.array([a]), np.array([[i[p]]]), others[p : p + 1], np.array([[j[p]]]))


def refine(q: np.ndarray, rank_of: np.ndarray, ranks: int, *, moves: bool, hi: int, rounds: int,
           patience: int, target: int, tolerance: float) -> np.ndarray:
    """Improve ``rank_of`` by pairwise exchanges until no rank is above
    ``goal = target * (1 + tolerance)`` (``target`` is a lower bound), or ``patience``
    rounds pass without lowering the largest load, or ``rounds`` rounds pass.

    Each round pairs the ranks above the goal, heaviest first, with the lightest ranks
    (the partner shifts by one more each round that did not lower the largest load, so a
    stuck rank meets new partners) and applies per pair the one-for-one swap, or with
    ``moves`` the move of one sample to a rank with fewer than ``hi``, that brings the pair
    closest to its mean while lowering the heavier rank. When that leaves the largest load
    where it was, the heaviest ranks try two-for-two swaps, and then the heaviest rank
    tries one-for-one swaps with every other rank. Without ``moves`` counts are
    kept, except that a rank with a free slot (the batch does not divide evenly) may trade
    it for a sample of a rank without one."""
    n = len(q)
    half = ranks // 2
    if n == 0 or half == 0 or rounds <= 0:
        return rank_of
    top = int(q.max())
    goal = int(target * (1.0 + tolerance))
    widest = int(np.bincount(rank_of, minlength=ranks).max())
    s = _Slots(q, rank_of, ranks, widest + (1 if moves and widest < hi else 0))
    best_max = int(s.loads.max())
    stale = 0
    for _ in range(rounds):
        over = int((s.loads > goal).sum())
        if over == 0 or stale >= patience:
            break
        if moves and s.ids.shape[1] < hi and not s.free.any(axis=1).all():
            s.widen()  # a full rank could not receive a move
        pairs = min(over, half)
        by_load = np.argsort(s.loads, kind="stable")
        _one_for_one(s, by_load[::-1][:pairs], by_load[(np.arange(pairs) + stale) % half], top, moves)
        if int(s.loads.max()) >= best_max and s.ids.shape[1] >= 2:
            by_load = np.argsort(s.loads, kind="stable")
            k = min(pairs, _PAIR_SWAP_RANKS)
            _two_for_two(s, by_load[::-1][:k], by_load[(np.arange(k) + stale) % half], top)
        if int(s.loads.max()) >= best_max:
            _heaviest_with_any(s, top, moves)
        new_max = int(s.loads.max())
        if new_max < best_max:
            best_max, stale = new_max, 0
        else:
            stale += 1
    return s.rank_of()


class _SearchDone(Exception):
    """Unwinds the exact search: budget spent, or the lower bound reached."""


def exact(q: np.ndarray, ranks: int, lo: int, hi: int, *, upper: int, target: int,
          nodes: int) -> tuple[np.ndarray | None, bool]:
    """A minimum-makespan assignment with every rank holding ``lo..hi`` samples, if one
    beats ``upper``: ``(rank_of or None, proven)``. ``proven`` is True when the search
    finished (or reached ``target``, a lower bound) within ``nodes`` nodes, so that nothing
    better than the result (or than ``upper``) exists."""
    n = len(q)
    order = _heaviest_first(q).tolist()
    values = q[order].tolist()
    loads = [0] * ranks
    counts = [0] * ranks
    where = [0] * n
    best = upper
    found: list[int] | None = None
    visited = 0

    def place(i: int, deficit: int) -> None:
        nonlocal best, found, visited
        visited += 1
        if visited > nodes:
            raise _SearchDone
        if i == n:
            best, found = max(loads), list(where)
            if best <= target:
                raise _SearchDone
            return
        v = values[i]
        tried = set()
        # Least loaded first finds good solutions early; equal (load, count) ranks are
        # interchangeable, so only the first of them is tried.
        for r in sorted(range(ranks), key=lambda r: (loads[r], r)):
            key = (loads[r], counts[r])
            if counts[r] >= hi or loads[r] + v >= best or key in tried:
                continue
            owed = deficit - (1 if counts[r] < lo else 0)
            if n - i - 1 < owed:
                continue
            tried.add(key)
            loads[r] += v
            counts[r] += 1
            where[i] = r
            place(i + 1, owed)
            loads[r] -= v
            counts[r] -= 1

    try:
        place(0, lo * ranks)
        proven = True
    except _SearchDone:
        proven = visited <= nodes
    if found is None:
        return None, proven
    rank_of = np.empty(n, dtype=np.int64)
    rank_of[order] = found
    return rank_of, proven
