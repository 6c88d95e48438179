"""``balance``: quality and speed of assigning a global batch's samples to ranks.

For each length distribution and rank count R, ``--trials`` global batches of
``R * --per-rank`` samples are drawn, lengths capped at ``--max-len``, costed with
``a * L**2 + b * L`` (``--cost A,B``; default :data:`examples.hstu.model.EXAMPLE_COST`,
the HSTU example's per-layer forward FLOPs), and assigned with equal counts by each method:

``random``       a seeded random deal (an unbalanced loader)
``round-robin``  heaviest first, dealt to ranks in turn
``kk-equal``     equal-count Karmarkar-Karp, NVIDIA recsys-examples' HSTU balancer's method
``freescale``    ours (:class:`fsc.runtime.Balancer` defaults)

A row reports the worst ``max / LB`` over the trials (LB: :func:`fsc.runtime.lower_bound`)
and the median over the trials of the wall-clock milliseconds per assignment (one call of
``Balancer.assign`` on costs, bounds and record included; the fastest of ``--repeats``
calls per batch, after one untimed warm-up call; lengths and costs are computed outside
the timer). The printed table also shows stragglers (samples heavier than
the mean per-rank load, which no assignment can fix); the JSON rows hold only
distribution, ranks, per_rank, method, max_over_lb and ms.

Distributions:

``lognormal``  ``exp(N(log 50 - 1/2, 1))`` rounded, at least 3: mean 50 before capping,
               sigma 1 as in the example's synthetic data
``zipf``       ``2 + Z``, ``Z ~ Zipf(1.5)``: most histories short, a tail to the cap
``movielens``  per-user history lengths of ``--lengths-from`` (users with at least 3
               ratings, as the example's loader keeps), users drawn with replacement;
               read by the example's loader (``examples.hstu.data``)

Split rows (``--split-max-len``, default 100,000: long histories kept). Here whole-sample
balancing is stuck at the heaviest sample, so two more methods run on the same batches
with lengths capped at ``--split-max-len`` instead:

``whole-free``   :class:`fsc.runtime.Balancer` with free counts, samples whole
``split``        the same with ``split=True``: samples heavier than the mean load cut
                 across ranks (:mod:`fsc.runtime.balance_split`)

Their rows add ``max_len``, ``max_over_mean`` (largest load over total / R, the bound
once samples may be cut; for ``split`` it equals ``max_over_lb``), ``split_samples`` and
``chunks`` (worst batch), and ``kv_tokens`` (keys and values of earlier chunks sent to
later chunks' ranks, in tokens, worst batch; times bytes per token for the traffic).
``--split-max-len 0`` leaves them out.

A history of n interactions is costed at length ``min(n, max_len)``; the example trains
on ``min(n - 2, max_len)`` tokens (leave-one-out, then next-item targets), a shift this
benchmark leaves out.

``--max-len`` defaults to 200, ``HSTUConfig.max_len`` in examples/hstu/model.py (the
example's train.py lowers it to 50 on its command line to train quickly on CPU).
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import statistics
import time

import numpy as np

from bench.report import write_json
from examples.hstu.data import history_lengths
from examples.hstu.model import EXAMPLE_COST
from fsc.runtime import Balancer, QuadraticCost

METHODS = ("random", "round-robin", "kk-equal", "freescale")
SPLIT_METHODS = ("whole-free", "split")
DEFAULT_SPLIT_MAX_LEN = 100_000
DEFAULT_MAX_LEN = 200  # HSTUConfig.max_len
MIN_LENGTH = 3  # the example's loader drops shorter histories
DISTRIBUTIONS = ("lognormal", "zipf", "movielens")
_LOGNORMAL_MEAN = 50.0
_ZIPF_A = 1.5


def movielens_lengths(path: str | pathlib.Path) -> np.ndarray:
    """Per-user history lengths of a MovieLens ratings file, through the example's loader."""
    return history_lengths(path, min_length=MIN_LENGTH)


def draw_lengths(distribution: str, n: int, rng: np.random.Generator, *, pool: np.ndarray | None = None) -> np.ndarray:
    """``n`` uncapped lengths from a distribution of the module docstring."""
    if distribution == "lognormal":
        raw = np.rint(rng.lognormal(np.log(_LOGNORMAL_MEAN) - 0.5, 1.0, size=n))
        return np.maximum(raw, MIN_LENGTH).astype(np.int64)
    if distribution == "zipf":
        return (MIN_LENGTH - 1 + rng.zipf(_ZIPF_A, size=n)).astype(np.int64)
    if distribution == "movielens":
        return pool[rng.integers(0, len(pool), size=n)]
    raise ValueError(f"unknown distribution {distribution!r}")


class _DropStragglerWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("balance: ")


def _parse_cost(text: str) -> QuadraticCost:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--cost wants A,B (two numbers), got {text!r}") from e
    if a < 0 or b < 0:
        raise argparse.ArgumentTypeError(f"--cost coefficients must be >= 0, got {text!r}")
    return QuadraticCost(a=a, b=b)


def rows(*, distributions: list[str], ranks: list[int], per_rank: int, max_len: int, cost: QuadraticCost,
         trials: int, seed: int, pool: np.ndarray | None = None,
         report: dict | None = None, repeats: int = 3) -> list[dict]:
    """The table's rows; ``report``, if given, receives the worst (straggler count,
    cost share) per (distribution, ranks, method)."""
    out = []
    for distribution in distributions:
        for r in ranks:
            n = r * per_rank
            batches = []
            for trial in range(trials):
                rng = np.random.default_rng([seed, DISTRIBUTIONS.index(distribution), r, trial])
                lengths = np.minimum(draw_lengths(distribution, n, rng, pool=pool), max_len)
                batches.append(cost(lengths))
            for method in METHODS:
                balancer = Balancer(ranks=r, method=method, seed=seed)
                balancer.assign(batches[0])  # warm-up: first-call allocations
                ratios, times, stragglers = [], [], []
                for costs in batches:
                    result, ms = _best_of(repeats, balancer.assign, costs)
                    times.append(ms)
                    ratios.append(result.max_over_lb)
                    stragglers.append((result.stragglers, result.straggler_share))
                if report is not None:
                    report[(distribution, r, method)] = max(stragglers)
                out.append({
                    "distribution": distribution,
                    "ranks": r,
                    "per_rank": per_rank,
                    "method": method,
                    "max_over_lb": max(ratios),
                    "ms": statistics.median(times),
                })
    return out


def _best_of(repeats: int, assign, batch):
    """``assign(batch)`` and its best time in ms over ``repeats`` calls: the result is the
    same each time, and the fastest call is the one least disturbed by other processes."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = assign(batch)
        best = min(best, time.perf_counter() - start)
    return result, best * 1e3


def split_rows(*, distributions: list[str], ranks: list[int], per_rank: int, max_len: int, cost: QuadraticCost,
               trials: int, seed: int, pool: np.ndarray | None = None, repeats: int = 3) -> list[dict]:
    """Rows for the split methods of the module docstring, on the batches :func:`rows` draws
    (same seeds), capped at ``max_len``. Timing as in :func:`rows`, on lengths (the split
    balancer cuts by tokens), the cost function included."""
    out = []
    for distribution in distributions:
        for r in ranks:
            n = r * per_rank
            batches = []
            for trial in range(trials):
                rng = np.random.default_rng([seed, DISTRIBUTIONS.index(distribution), r, trial])
                batches.append(np.minimum(draw_lengths(distribution, n, rng, pool=pool), max_len))
            for method in SPLIT_METHODS:
                balancer = Balancer(ranks=r, counts="free", cost=cost, split=method == "split")
                balancer.assign_lengths(batches[0])  # warm-up
                ratios, means, times, split, chunks, kv = [], [], [], [], [], []
                for lengths in batches:
                    result, ms = _best_of(repeats, balancer.assign_lengths, lengths)
                    times.append(ms)
                    ratios.append(result.max_over_lb)
                    means.append(result.max_load / (float(result.loads.sum()) / r))
                    plan = result.chunks
                    split.append(result.split_samples)
                    chunks.append(len(lengths) if plan is None else len(plan.sample))
                    kv.append(0 if plan is None else int(plan.start.sum()))
                out.append({
                    "distribution": distribution,
                    "ranks": r,
                    "per_rank": per_rank,
                    "method": method,
                    "max_len": max_len,
                    "max_over_lb": max(ratios),
                    "max_over_mean": max(means),
                    "ms": statistics.median(times),
                    "split_samples": max(split),
                    "chunks": max(chunks),
                    "kv_tokens": max(kv),
                })
    return out


def run(argv: list[str], json_path: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench balance")
    parser.add_argument("--lengths-from", default=None, metavar="RATINGS_FILE",
                        help="MovieLens ratings.csv, ratings.dat or u.data: adds the 'movielens' distribution")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--per-rank", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                        help="lengths are capped here (default: HSTUConfig.max_len, 200)")
    parser.add_argument("--cost", type=_parse_cost, default=EXAMPLE_COST, metavar="A,B",
                        help="per-sample cost a*L^2 + b*L (default: the HSTU example's per-layer FLOPs, 128,41088)")
    parser.add_argument("--trials", type=int, default=5, help="global batches per row: worst max/LB, median ms")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-max-len", type=int, default=DEFAULT_SPLIT_MAX_LEN,
                        help="lengths cap for the split rows (default 100000: long histories kept; 0: no split rows)")
    args = parser.parse_args(argv)
    if args.split_max_len < 0:
        parser.error("--split-max-len must be >= 0 (0: no split rows)")
    for name in ("per_rank", "max_len", "trials", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.ranks) < 1:
        parser.error("--ranks must be >= 1")
    distributions = ["lognormal", "zipf"]
    pool = None
    if args.lengths_from:
        pool = movielens_lengths(args.lengths_from)
        distributions.append("movielens")
    report: dict = {}
    # The balancer warns about stragglers on every call; here they go in the table instead.
    balancer_log = logging.getLogger("fsc.runtime.balancer")
    quiet = _DropStragglerWarnings()
    balancer_log.addFilter(quiet)
    try:
        table = rows(distributions=distributions, ranks=args.ranks, per_rank=args.per_rank, max_len=args.max_len,
                     cost=args.cost, trials=args.trials, seed=args.seed, pool=pool, report=report,
                     repeats=args.repeats)
        if args.split_max_len:
            splits = split_rows(distributions=distributions, ranks=args.ranks, per_rank=args.per_rank,
                                max_len=args.split_max_len, cost=args.cost, trials=args.trials, seed=args.seed,
                                pool=pool, repeats=args.repeats)
        else:
            splits = []
    finally:
        balancer_log.removeFilter(quiet)
    print(f"cost a*L^2 + b*L with a={args.cost.a:g}, b={args.cost.b:g}; lengths capped at {args.max_len}; "
          f"worst max/LB and median ms over {args.trials} batches; stragglers: samples heavier than the "
          f"mean per-rank load, worst batch (count, share of cost)")
    print(f"{'distribution':<14}{'ranks':>6}{'per_rank':>9}  {'method':<13}{'max/LB':>9}{'ms':>9}  stragglers")
    for row in table:
        count, share = report[(row["distribution"], row["ranks"], row["method"])]
        print(f"{row['distribution']:<14}{row['ranks']:>6}{row['per_rank']:>9}  {row['method']:<13}"
              f"{row['max_over_lb']:>9.4f}{row['ms']:>9.2f}  {count} ({100 * share:.1f}%)")
    if splits:
        print(f"\nlengths capped at {args.split_max_len}, free counts: samples whole vs split; worst max/LB and "
              f"max/mean (total / R), median ms; split samples, chunks and key/value tokens moved, worst batch")
        print(f"{'distribution':<14}{'ranks':>6}{'per_rank':>9}  {'method':<13}{'max/LB':>9}{'max/mean':>9}"
              f"{'ms':>9}{'split':>7}{'chunks':>8}{'kv_tokens':>11}")
        for row in splits:
            print(f"{row['distribution']:<14}{row['ranks']:>6}{row['per_rank']:>9}  {row['method']:<13}"
                  f"{row['max_over_lb']:>9.4f}{row['max_over_mean']:>9.4f}{row['ms']:>9.2f}{row['split_samples']:>7}"
                  f"{row['chunks']:>8}{row['kv_tokens']:>11}")
    write_json(json_path, table + splits)
    return 0
