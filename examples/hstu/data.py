"""Interaction histories for the HSTU example: MovieLens loaders, a synthetic generator and
the leave-one-out split.

Every source ends in the same record, :class:`Histories`: one chronological sequence per
user, item ids remapped densely to ``1..num_items`` so that 0 stays free for padding, and
ratings bucketed to ``0..num_ratings-1`` so they can index an embedding table.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Histories",
    "history_lengths",
    "leave_one_out",
    "load_movielens",
    "synthetic_histories",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Histories:
    """Per-user chronological interaction sequences, item ids remapped to 1..num_items (0 is reserved for padding)."""

    items: list[np.ndarray]  # int64, one array per user, chronological
    ratings: list[np.ndarray]  # int64 rating bucket per interaction, in 0..num_ratings-1
    timestamps: list[np.ndarray]  # int64 unix seconds, non-decreasing per user
    num_items: int  # largest item id (ids are 1..num_items)
    num_ratings: int

    def __post_init__(self) -> None:
        # A ragged record would only fail later, inside a collate function, far from its cause.
        if not len(self.items) == len(self.ratings) == len(self.timestamps):
            raise ValueError(
                f"Histories needs one items, ratings and timestamps array per user; got "
                f"{len(self.items)} items, {len(self.ratings)} ratings, {len(self.timestamps)} timestamps arrays"
            )
        for user, (it, ra, ts) in enumerate(zip(self.items, self.ratings, self.timestamps)):
            if not len(it) == len(ra) == len(ts):
                raise ValueError(
                    f"Histories user {user}: items, ratings and timestamps differ in length "
                    f"({len(it)}, {len(ra)}, {len(ts)})"
                )

    def lengths(self) -> np.ndarray:
        """Interactions per user, int64 ``[num_users]``."""
        return np.fromiter((len(a) for a in self.items), dtype=np.int64, count=len(self.items))

    def __len__(self) -> int:
        return len(self.items)


# --------------------------------------------------------------------------- MovieLens

_NUM_RATING_BUCKETS = 10  # half stars 0.5..5.0
_CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]
_FORMATS_HELP = (
    "supported formats: ratings.csv (MovieLens latest/20m/25m, header 'userId,movieId,rating,timestamp'), "
    "ratings.dat (ml-1m, 'UserID::MovieID::Rating::Timestamp', no header), "
    "u.data (ml-100k, tab-separated 'user item rating timestamp', no header)"
)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Format:
    name: str
    sep: str
    has_header: bool


_CSV = _Format(name="ratings.csv", sep=",", has_header=True)
_DAT = _Format(name="ratings.dat", sep="::", has_header=False)
_UDATA = _Format(name="u.data", sep="\t", has_header=False)


def _detect_format(first_line: str, path: Path) -> _Format:
    # By content, not by name: copies get renamed (ml-100k's u.data is often saved as ratings.tsv).
    if "::" in first_line:
        return _DAT
    if "\t" in first_line:
        return _UDATA
    if [f.strip() for f in first_line.split(",")] == _CSV_HEADER:
        return _CSV
    raise ValueError(f"{path}: unknown ratings format, first line is {first_line!r}; {_FORMATS_HELP}")


def _parse_line(line: str, fmt: _Format, lineno: int, path: Path) -> tuple[int, int, float, int]:
    fields = line.split(fmt.sep)
    where = f"{path}, line {lineno}: malformed {fmt.name} line {line!r}"
    if len(fields) != 4:
        raise ValueError(f"{where}: expected 4 fields separated by {fmt.sep!r}, found {len(fields)}")
    try:
        user, item, rating, ts = int(fields[0]), int(fields[1]), float(fields[2]), int(fields[3])
    except ValueError as e:
        raise ValueError(f"{where}: expected integer user, item and timestamp and a numeric rating") from e
    if not math.isfinite(rating):
        raise ValueError(f"{where}: rating {fields[2].strip()!r} is not a finite number")
    return user, item, rating, ts


def _parse_rows(
    numbered: list[tuple[int, str]], fmt: _Format, path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Columns (user, item, rating, timestamp) of the data lines, in file order."""
    split = [line.split(fmt.sep) for _, line in numbered]
    if all(len(f) == 4 for f in split):
        try:
            # numpy's str->number casts follow int()/float(), so this fast path accepts exactly
            # what _parse_line accepts; it runs the per-field conversions in C.
            cols = list(zip(*split))
            users = np.array(cols[0]).astype(np.int64)
            items = np.array(cols[1]).astype(np.int64)
            ratings = np.array(cols[2]).astype(np.float64)
            ts = np.array(cols[3]).astype(np.int64)
        except (ValueError, OverflowError):
            pass
        else:
            if np.isfinite(ratings).all():
                return users, items, ratings, ts
    # Something is wrong somewhere: parse line by line so the error names the line.
    rows = [_parse_line(line, fmt, lineno, path) for lineno, line in numbered]
    users, items, ratings, ts = (np.array(c) for c in zip(*rows))
    return users.astype(np.int64), items.astype(np.int64), ratings.astype(np.float64), ts.astype(np.int64)


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise IsADirectoryError(
            f"MovieLens ratings path {path} is a directory; pass the ratings file inside it "
            f"(ratings.csv, ratings.dat or u.data)"
        )
    try:
        # The formats are ASCII; 'replace' turns stray bytes into a parse error with a line number
        # instead of a UnicodeDecodeError with a byte offset.
        return path.read_text(encoding="utf-8-sig", errors="replace")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"MovieLens ratings file {path} not found") from e


def load_movielens(path: str | os.PathLike, *, min_length: int = 3) -> Histories:
    """Load a MovieLens ratings file (``ratings.csv``, ``ratings.dat`` or ``u.data``; detected
    from the first line) into per-user chronological histories.

    Interactions are sorted by timestamp per user, ties kept in file order; users are ordered
    by their numeric id; users with fewer than ``min_length`` interactions are dropped; item
    ids are remapped to ``1..N`` in order of first appearance in that sorted, filtered data.
    Ratings become ``round(2 * rating) - 1`` clipped to ``0..9`` (half stars 0.5..5.0 map to
    0..9; integer 1..5 scales land on 1, 3, 5, 7, 9).
    """
    if min_length < 2:
        raise ValueError(f"min_length must be >= 2 (leave-one-out needs a target and a history), got {min_length}")
    p = Path(path)
    text = _read_text(p)
    numbered = [(i, line.rstrip("\r")) for i, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not numbered:
        raise ValueError(f"MovieLens ratings file {p} is empty")
    fmt = _detect_format(numbered[0][1], p)
    if fmt.has_header:
        numbered = numbered[1:]
        if not numbered:
            raise ValueError(f"MovieLens ratings file {p} has a header but no rating lines")
    users, items, ratings, ts = _parse_rows(numbered, fmt, p)

    # Two stable sorts = lexsort by (user, timestamp) with file order breaking ties.
    order = np.argsort(ts, kind="stable")
    order = order[np.argsort(users[order], kind="stable")]
    users, items, ratings, ts = users[order], items[order], ratings[order], ts[order]

    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    keep_user = counts >= min_length
    if not keep_user.any():
        raise ValueError(
            f"{p}: no user has at least min_length={min_length} ratings (longest history: {counts.max()})"
        )
    keep = np.repeat(keep_user, counts)
    items, ratings, ts = items[keep], ratings[keep], ts[keep]
    counts = counts[keep_user]

    # Dense ids by first appearance (not by raw id) so that the mapping does not depend on
    # how a dataset release numbered its items, only on the data the model sees.
    raw, first, inverse = np.unique(items, return_index=True, return_inverse=True)
    new_id = np.empty(len(raw), dtype=np.int64)
    new_id[np.argsort(first, kind="stable")] = np.arange(1, len(raw) + 1, dtype=np.int64)
    items = new_id[inverse.reshape(-1)]
    buckets = np.clip(np.rint(ratings * 2.0) - 1.0, 0, _NUM_RATING_BUCKETS - 1).astype(np.int64)

    cuts = np.cumsum(counts)[:-1]
    h = Histories(
        items=np.split(items, cuts),
        ratings=np.split(buckets, cuts),
        timestamps=np.split(ts, cuts),
        num_items=len(raw),
        num_ratings=_NUM_RATING_BUCKETS,
    )
    logger.info(
        "loaded %s (%s): %d users (%d dropped below min_length=%d), %d ratings, %d items",
        p, fmt.name, len(h), int((~keep_user).sum()), min_length, int(counts.sum()), h.num_items,
    )
    return h


def history_lengths(path: str | os.PathLike, *, min_length: int = 3) -> np.ndarray:
    """Per-user history lengths of a MovieLens ratings file (see :func:`load_movielens`)."""
    return load_movielens(path, min_length=min_length).lengths()


# --------------------------------------------------------------------------- synthetic

_LENGTH_DISTRIBUTIONS = ("lognormal", "zipf")
_LOGNORMAL_SIGMA = 1.0
_ZIPF_A = 1.5
_ZETA_1_5 = 2.612375348685488  # Riemann zeta(1.5): normaliser of the Zipf(a=1.5) pmf
_ZIPF_EXACT_TERMS = 4096  # beyond this the pmf sums are replaced by their integrals (error < 1e-9)
_ITEM_ZIPF_S = 1.0  # classic Zipf law for item popularity: a few items take much of the traffic
_DAY_S = 86_400.0
_EPOCH_RANGE = (946_684_800, 1_577_836_800)  # 2000-01-01 .. 2020-01-01 UTC


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _clipped_lognormal_mean(mu: float, lo: float, hi: float) -> float:
    # E[clip(X, lo, hi)] for X = exp(N(mu, s^2)): lo*P(X<lo) + hi*P(X>hi) + E[X; lo<X<hi].
    s = _LOGNORMAL_SIGMA
    a, b = (math.log(lo) - mu) / s, (math.log(hi) - mu) / s
    middle = math.exp(mu + s * s / 2) * (_normal_cdf(b - s) - _normal_cdf(a - s))
    return lo * _normal_cdf(a) + hi * (1.0 - _normal_cdf(b)) + middle


def _clipped_zipf_mean_excess(c: float, span: float, s0: np.ndarray, s1: np.ndarray) -> float:
    """E[min(c * (Z - 1), span)] for Z ~ Zipf(1.5); ``s0``/``s1`` are the exact prefix sums of
    P(Z = k) and (k - 1) * P(Z = k)."""
    if c <= 0.0:
        return 0.0
    big_k = math.floor(span / c) + 1.0  # last k not capped by span
    t = len(s0)
    if big_k <= t:
        k = int(big_k)
        return c * float(s1[k - 1]) + span * (1.0 - float(s0[k - 1]))
    # Midpoint-rule integrals of k^-1/2 and k^-3/2 over (t, big_k]; accurate for t in the thousands.
    ta, ka = math.sqrt(t + 0.5), math.sqrt(big_k + 0.5)
    partial = float(s1[-1]) + (2.0 * (ka - ta) - 2.0 * (1.0 / ta - 1.0 / ka)) / _ZETA_1_5
    tail = 2.0 / ka / _ZETA_1_5
    return c * partial + span * tail


def _bisect(f, target: float, lo: float, hi: float, iters: int = 200) -> float:
    """``x`` in ``[lo, hi]`` with ``f(x) ~= target`` for increasing ``f``."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _draw_lengths(
    rng: np.random.Generator, kind: str, num_users: int, mean_length: float, min_length: int, max_length: int
) -> np.ndarray:
    lo, hi = float(min_length), float(max_length)
    if mean_length < lo or mean_length > hi:
        logger.warning(
            "mean_length=%s is outside (min_length=%d, max_length=%d); lengths pile up at the nearer bound",
            mean_length, min_length, max_length,
        )
    if kind == "lognormal":
        # mu chosen so that the mean *after* clipping is mean_length; without clipping it would
        # be log(mean_length) - sigma^2 / 2.
        if lo == hi:
            mu = math.log(lo)
        else:
            target = min(max(mean_length, lo), hi)
            mu = _bisect(lambda m: _clipped_lognormal_mean(m, lo, hi), target, math.log(lo) - 20, math.log(hi) + 20)
        raw = rng.lognormal(mean=mu, sigma=_LOGNORMAL_SIGMA, size=num_users)
    else:
        # Zipf(1.5) has an infinite mean, so only its clipped version has one: the scale c in
        # min_length + c * (Z - 1) is solved for against that clipped mean.
        span = hi - lo
        k = np.arange(1, _ZIPF_EXACT_TERMS + 1, dtype=np.float64)
        pmf = k**-_ZIPF_A / _ZETA_1_5
        s0, s1 = np.cumsum(pmf), np.cumsum(pmf * (k - 1.0))
        target = min(max(mean_length - lo, 0.0), span)
        c = _bisect(lambda x: _clipped_zipf_mean_excess(x, span, s0, s1), target, 0.0, max(span, 1.0))
        raw = lo + c * (rng.zipf(_ZIPF_A, size=num_users).astype(np.float64) - 1.0)
    return np.clip(np.rint(raw), min_length, max_length).astype(np.int64)


def synthetic_histories(
    *,
    num_users: int,
    num_items: int,
    seed: int,
    lengths: str = "lognormal",
    mean_length: float = 50.0,
    max_length: int = 2000,
    min_length: int = 3,
    num_ratings: int = 10,
) -> Histories:
    """Seeded random histories with the shape of real ones: heavy-tailed lengths, Zipf item
    popularity, increasing timestamps.

    Lengths are ``"lognormal"`` (sigma 1) or ``"zipf"`` (``min_length + c * (Z - 1)``,
    ``Z ~ Zipf(1.5)``), with the location or scale chosen so that the mean after clipping to
    ``[min_length, max_length]`` is ``mean_length``. Items follow a Zipf(1) popularity law
    over ``1..num_items`` (popularity rank shuffled over ids, so id order carries no signal);
    timestamps start at a random epoch per user and advance by exponential gaps of mean one
    day; ratings are uniform in ``0..num_ratings-1``. Same arguments, same result.
    """
    if lengths not in _LENGTH_DISTRIBUTIONS:
        raise ValueError(f"lengths must be one of {', '.join(map(repr, _LENGTH_DISTRIBUTIONS))}, got {lengths!r}")
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users}")
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if min_length < 2:
        raise ValueError(f"min_length must be >= 2 (leave-one-out needs a target and a history), got {min_length}")
    if max_length < min_length:
        raise ValueError(f"max_length must be >= min_length={min_length}, got {max_length}")
    if not mean_length > 0:  # also rejects NaN
        raise ValueError(f"mean_length must be > 0, got {mean_length}")
    if num_ratings < 1:
        raise ValueError(f"num_ratings must be >= 1, got {num_ratings}")

    rng = np.random.default_rng(seed)
    lens = _draw_lengths(rng, lengths, num_users, mean_length, min_length, max_length)
    total = int(lens.sum())
    starts = np.r_[0, np.cumsum(lens)[:-1]]

    cdf = np.cumsum(np.arange(1, num_items + 1, dtype=np.float64) ** -_ITEM_ZIPF_S)
    rank = np.searchsorted(cdf, rng.random(total) * cdf[-1], side="right")
    rank_to_id = rng.permutation(num_items).astype(np.int64) + 1
    items = rank_to_id[np.minimum(rank, num_items - 1)]

    ratings = rng.integers(0, num_ratings, size=total, dtype=np.int64)

    epochs = rng.integers(*_EPOCH_RANGE, size=num_users, dtype=np.int64)
    gaps = rng.exponential(_DAY_S, size=total)
    gaps[starts] = 0.0  # each user's first interaction is at its epoch
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[starts], lens)
    ts = np.repeat(epochs, lens) + np.floor(elapsed).astype(np.int64)

    cuts = starts[1:]
    return Histories(
        items=np.split(items, cuts),
        ratings=np.split(ratings, cuts),
        timestamps=np.split(ts, cuts),
        num_items=num_items,
        num_ratings=num_ratings,
    )


# --------------------------------------------------------------------------- split


def leave_one_out(h: Histories) -> tuple[Histories, np.ndarray]:
    """Hold out each user's last interaction: returns the histories without it and the
    held-out item ids (int64 ``[num_users]``). ``num_items`` is unchanged, so targets that
    appear only as a last item still index the same embedding table."""
    lens = h.lengths()
    short = np.flatnonzero(lens < 2)
    if len(short):
        raise ValueError(
            f"leave_one_out needs at least 2 interactions per user; {len(short)} user(s) have fewer "
            f"(first: user {short[0]} with {lens[short[0]]}); load with min_length >= 2"
        )
    targets = np.fromiter((a[-1] for a in h.items), dtype=np.int64, count=len(h))
    train = Histories(
        items=[a[:-1] for a in h.items],
        ratings=[a[:-1] for a in h.ratings],
        timestamps=[a[:-1] for a in h.timestamps],
        num_items=h.num_items,
        num_ratings=h.num_ratings,
    )
    return train, targets
