"""Cost-aware assignment of a global batch's samples to ranks (DESIGN.md, technique 1).

Every rank sees the same global batch (its samples' lengths all-gathered), calls
:meth:`Balancer.assign_lengths` (or :meth:`Balancer.assign` with per-sample costs), and
keeps ``assignment.samples_of(my_rank)``. The result is a pure function of the inputs, so
every rank computes the same assignment without talking: costs are quantized to integers
up front (all sums exact, no dependence on summation order), ties go to the lower sample
index, and nothing is random unless ``method="random"``, which is seeded.

Counts. By default every rank gets the same number of samples (``n // R`` or one more),
which keeps per-rank shapes and the loss normalization of a plain data-parallel loop.
``counts="free"`` lets counts differ (optionally at most ``max_per_rank``) for a better
balance; the loss must then be normalized by the global token count, not per rank (see
:func:`fsc.runtime.balance_dist.loss_normalizer`).

Methods (``Balancer.method``):

``freescale`` (default)
    A start: equal-count Karmarkar-Karp, or, when the heaviest samples are too heavy for
    its one-sample-per-row structure, each of them on a rank of its own with the smallest
    samples (both are tried, best first); with free counts, count-capped LPT. Then local
    refinement by one-for-one and two-for-two swaps (and moves, with free counts) until
    the largest load is within ``tolerance`` of the lower bound or a fixed number of
    rounds pass. Batches of at most ``exact_max_samples`` then go to branch and bound,
    which proves the result optimal or finds the optimum.
``kk-equal``
    Equal-count Karmarkar-Karp alone: NVIDIA recsys-examples' HSTU balancer's method.
``lpt``
    LPT with per-rank count limits alone.
``round-robin``
    Heaviest first, dealt to ranks 0, 1, ..., R-1, 0, 1, ...
``random``
    A seeded random permutation dealt round-robin: what an unbalanced loader does.

A sample heavier than the mean per-rank load (total / R) is a straggler no assignment can
fix: the rank holding it is the critical path whatever the others do. The assignment
counts such samples and their share of the total cost, and logs a warning, so a low
``max / LB`` is never mistaken for a balanced step.

Splits (``split=True``, with ``counts="free"`` and ``cost=QuadraticCost``; lengths through
:meth:`Balancer.assign_lengths`). Such a sample is cut into contiguous chunks on several
ranks (:mod:`fsc.runtime.balance_split`: wrap-around at multiples of the mean load, chunk
costs from the query and key ranges of a causal sequence), and the rest is balanced around
them; light samples are cut too when, whole, they leave a rank above the mean by more than
``split_tolerance``. ``assignment.chunks_of(rank)`` then lists the token ranges a rank
runs and, for each chunk, the ranks holding the sample's earlier chunks (whose keys and
values it needs; ``kv_bytes`` at ``kv_bytes_per_token``); ``samples_of`` refuses an
assignment with split samples, and their ``rank_of`` is -1. The bound is then ``total / R``
(:func:`~fsc.runtime.balance_bounds.split_lower_bound`). Permuted lengths give the same
multiset of rank loads and, when no two split samples have the same length, the same cuts
per sample (equal lengths may trade cuts); rank labels may differ. Speed: 8192 samples on
256 ranks in 6-11 ms (``python -m bench balance``, its split rows).

Speed (numpy, one core of a shared 2-core CPU; ``python -m bench balance``): 8192
samples on 256 ranks take about 2 ms with ``kk-equal`` and 3-4 ms with ``freescale``
(up to about 10 ms when many samples are stragglers). Every limit on the work is a count
(rounds, search nodes), never a clock, so ranks cannot stop at different points.

Limits: the cost of a rank is the sum of its samples' costs (no per-rank fixed cost, no
interaction between samples). The refinement exchanges at most two samples for two, so it
can stop short of the optimum when only longer chains would help; ``max / LB`` then shows
the gap or the bound's looseness, which cannot be told apart. Seen: few samples per rank
(4) with many at the length cap (MovieLens at 200: up to 1.06), and purely quadratic
costs with Zipf lengths (up to 1.08).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from fsc.errors import FscError
from fsc.runtime import balance_search, balance_split
from fsc.runtime.balance_bounds import LowerBound, lower_bound, split_lower_bound
from fsc.runtime.balance_split import SplitPlan

__all__ = [
    "COUNT_RULES",
    "METHODS",
    "Assignment",
    "BalanceError",
    "Balancer",
    "QuadraticCost",
    "balance",
]

logger = logging.getLogger(__name__)

COUNT_RULES = ("equal", "free")
METHODS = ("freescale", "kk-equal", "lpt", "round-robin", "random")


class BalanceError(FscError, ValueError):
    """A balancer argument is out of range, or the count rule cannot be met."""


@dataclass(frozen=True, kw_only=True, slots=True)
class QuadraticCost:
    """Cost of a sample of length L: ``a * L**2 + b * L`` (attention is quadratic in L,
    everything per token linear). Any callable from lengths to costs plugs in instead."""

    a: float
    b: float

    def __call__(self, lengths: np.ndarray) -> np.ndarray:
        length = np.asarray(lengths, dtype=np.float64)
        return self.a * length * length + self.b * length

    @classmethod
    def from_coefficients(cls, coefficients) -> QuadraticCost:
        """From a polynomial's coefficients, highest degree first (e.g.
        ``fsc.last_compile().sample_cost().flops_polynomial().all_coeffs()``). A constant
        term is dropped: it is the same for every sample and does not move the balance."""
        coeffs = [float(c) for c in coefficients]
        if len(coeffs) > 3:
            raise BalanceError(f"QuadraticCost takes a polynomial of degree <= 2, got {len(coeffs) - 1} "
                               f"({coeffs})")
        a, b = ([0.0] * (3 - len(coeffs)) + coeffs)[:2]
        if a < 0 or b < 0:
            raise BalanceError(f"QuadraticCost needs a >= 0 and b >= 0, got a={a}, b={b}")
        return cls(a=a, b=b)


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Assignment:
    """Which rank runs each sample, and how good that is. Arrays are read-only."""

    rank_of: np.ndarray  # int64 [n]: the rank of each sample of the global batch
    ranks: int
    loads: np.ndarray  # float64 [ranks]: summed cost per rank
    counts: np.ndarray  # int64 [ranks]: samples per rank
    bound: LowerBound  # no assignment with these counts has a smaller largest load
    method: str
    optimal: bool  # proven optimal: max load equals the bound, or the exact search finished
    stragglers: int  # samples heavier than the mean per-rank load
    straggler_share: float  # their share of the total cost (0..1)
    _order: np.ndarray = field(repr=False)  # samples grouped by rank, ascending within a rank
    _starts: np.ndarray = field(repr=False)
    # With Balancer(split=True): every rank's token ranges (a whole sample is one chunk).
    # rank_of is then -1 for a sample on several ranks, and counts count chunks.
    chunks: SplitPlan | None = None

    @property
    def max_load(self) -> float:
        return float(self.loads.max()) if self.ranks else 0.0

    @property
    def lower_bound(self) -> float:
        return self.bound.value

    @property
    def max_over_lb(self) -> float:
        """Largest load over the lower bound (1.0 when both are 0: nothing to balance)."""
        return self.max_load / self.bound.value if self.bound.value > 0 else 1.0

    @property
    def split_samples(self) -> int:
        """Samples cut across ranks (0 without ``split=True``)."""
        return 0 if self.chunks is None else self.chunks.split_samples

    def samples_of(self, rank: int) -> np.ndarray:
        """Indices into the global batch of the samples that ``rank`` runs, ascending. Refused
        when samples were split: a rank then runs token ranges (:meth:`chunks_of`)."""
        if not 0 <= rank < self.ranks:
            raise BalanceError(f"rank {rank} is out of range for {self.ranks} ranks")
        if self.split_samples:
            raise BalanceError(
                f"{self.split_samples} samples are split across ranks: samples_of cannot describe a rank's "
                f"share; use chunks_of(rank) (token ranges, with the ranks holding each earlier chunk)"
            )
        return self._order[self._starts[rank] : self._starts[rank + 1]]

    def chunks_of(self, rank: int) -> tuple[balance_split.Chunk, ...]:
        """The token ranges ``rank`` runs (``Balancer(split=True)`` only): per chunk its sample,
        ``[start, stop)``, and the (rank, start, stop) of the sample's earlier chunks, whose
        keys and values it needs."""
        if not 0 <= rank < self.ranks:
            raise BalanceError(f"rank {rank} is out of range for {self.ranks} ranks")
        if self.chunks is None:
            raise BalanceError("chunks_of needs an assignment made with Balancer(split=True); use samples_of")
        return self.chunks.chunks_of(rank)


@dataclass(frozen=True, kw_only=True, slots=True)
class Balancer:
    """Assigns a global batch's samples to ``ranks`` ranks (see the module docstring)."""

    ranks: int
    counts: str = "equal"  # "equal": n // R or one more per rank; "free": any, up to max_per_rank
    max_per_rank: int | None = None  # with counts="free" only
    method: str = "freescale"
    # lengths -> costs, for assign_lengths: the model's own (e.g. QuadraticCost(a, b), or
    # fsc.last_compile().sample_cost().evaluate for a model compiled on one sample); no default,
    # since no constant fits every model
    cost: Callable[[np.ndarray], np.ndarray] | None = None
    exact_max_samples: int = 12  # batches this small are solved exactly (branch and bound)
    search_nodes: int = 4_000  # the exact search's budget (~10 ms); a count, not a clock, keeps ranks in step
    refine_rounds: int = 12
    refine_patience: int = 4  # rounds without lowering the largest load before stopping
    # Refinement stops once max <= LB * (1 + tolerance). 5e-4 is far below any cost model's
    # accuracy; 1e-4 reaches 1.0001 on the benchmark at two to three times the time.
    tolerance: float = 5e-4
    seed: int = 0  # for method="random"
    # Cut samples heavier than the mean per-rank load into contiguous chunks on several ranks
    # (fsc.runtime.balance_split). Needs lengths (assign_lengths), cost=QuadraticCost and
    # counts="free" (chunks make per-rank shapes differ anyway; normalize the loss by the
    # global token count).
    split: bool = False
    max_span: int | None = None  # most ranks one sample may span (None: all ranks)
    kv_bytes_per_token: float = 0.0  # keys + values of one token, all layers: for the reported bytes
    # With split=True: when light samples balanced whole leave the largest load above
    # (total / R) * (1 + split_tolerance), light samples are cut too (inf: never).
    split_tolerance: float = 0.005
    # Set by from_compile: why the compiled model cannot run chunks (split was asked, refused)
    split_refused: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 1:
            raise BalanceError(f"ranks must be a positive int, got {self.ranks!r}")
        if self.counts not in COUNT_RULES:
            raise BalanceError(f"counts must be one of {COUNT_RULES}, got {self.counts!r}")
        if self.method not in METHODS:
            raise BalanceError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.max_per_rank is not None:
            if self.counts != "free":
                raise BalanceError(
                    f"max_per_rank={self.max_per_rank} needs counts='free'; with counts='equal' "
                    f"every rank holds n // ranks samples or one more"
                )
            if self.max_per_rank < 1:
                raise BalanceError(f"max_per_rank must be >= 1, got {self.max_per_rank}")
        for name in ("exact_max_samples", "search_nodes", "refine_rounds", "refine_patience", "tolerance"):
            if getattr(self, name) < 0:
                raise BalanceError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.split, bool):
            raise BalanceError(f"split must be True or False, got {self.split!r}")
        if not (isinstance(self.kv_bytes_per_token, (int, float)) and np.isfinite(self.kv_bytes_per_token)
                and self.kv_bytes_per_token >= 0):
            raise BalanceError(f"kv_bytes_per_token must be a finite number >= 0, got {self.kv_bytes_per_token!r}")
        if not (isinstance(self.split_tolerance, (int, float)) and self.split_tolerance >= 0):
            raise BalanceError(f"split_tolerance must be a number >= 0 (inf: never cut light samples), "
                               f"got {self.split_tolerance!r}")
        if self.max_span is not None and (isinstance(self.max_span, bool) or not isinstance(self.max_span, int)
                                          or self.max_span < 1):
            raise BalanceError(f"max_span must be a positive int or None, got {self.max_span!r}")
        if self.split:
            if self.counts != "free":
                raise BalanceError(
                    "split=True needs counts='free': a rank holding a long sample's chunk must hold fewer "
                    "samples, and the loss must then be normalized by the global token count"
                )
            if not isinstance(self.cost, QuadraticCost):
                raise BalanceError(
                    f"split=True needs cost=QuadraticCost(a=..., b=...) (chunk costs come from its coefficients), "
                    f"got cost={self.cost!r}; for a compiled model: QuadraticCost.from_coefficients("
                    f"fsc.last_compile().sample_cost().flops_polynomial().all_coeffs())"
                )
        elif self.max_span is not None:
            raise BalanceError(f"max_span={self.max_span} needs split=True")

    @classmethod
    def from_compile(cls, record, *, ranks: int, split: bool = False, symbol: str | None = None,
                     **options) -> Balancer:
        """A balancer for a model compiled on one sample with its length dynamic: the cost is
        the compile's per-sample FLOPs (``record.sample_cost(symbol)``, a quadratic), and
        ``split=True`` is granted only when the compiled graphs can run chunks
        (``record.split_refusal()``); otherwise it balances whole samples and logs why (the
        reason is kept in ``split_refused``). ``options``: the other fields."""
        cost = QuadraticCost.from_coefficients(record.sample_cost(symbol).flops_polynomial().all_coeffs())
        refused = record.split_refusal() if split else None
        if refused is not None:
            logger.warning("Balancer: %s; balancing whole samples", refused)
        if split:
            options.setdefault("counts", "free")
        return cls(ranks=ranks, cost=cost, split=split and refused is None, split_refused=refused, **options)

    # ------------------------------------------------------------------ entry points

    def assign_lengths(self, lengths: np.ndarray, *, home: np.ndarray | None = None) -> Assignment:
        """:meth:`assign` with ``costs = self.cost(lengths)``."""
        if self.cost is None:
            raise BalanceError(
                "assign_lengths needs a cost function: Balancer(cost=...), e.g. QuadraticCost(a=..., b=...) "
                "for attention quadratic in a sample's length, or fsc.last_compile().sample_cost().evaluate; "
                "or call assign() with per-sample costs"
            )
        length = np.asarray(lengths)
        if length.ndim != 1:
            raise BalanceError(f"lengths must be 1-D (one per sample), got shape {length.shape}")
        if not np.isfinite(length).all() or (length < 0).any():
            raise BalanceError("lengths must be finite and >= 0")
        costs = np.asarray(self.cost(length))
        if costs.shape != length.shape:
            raise BalanceError(f"the cost function returned shape {costs.shape} for lengths of shape {length.shape}")
        if self.split:
            if (length != np.rint(length)).any():
                raise BalanceError("split=True needs whole-token lengths (integers)")
            return self._assign_split(length.astype(np.int64), costs.astype(np.float64), home)
        return self.assign(costs, home=home)

    def assign(self, costs: np.ndarray, *, home: np.ndarray | None = None) -> Assignment:
        """Assign samples with these costs (1-D, finite, >= 0) to ranks.

        ``home`` (optional, int [n]): the rank each sample currently lives on. The ranks'
        labels are then permuted so that as many samples as possible stay where they are
        (greedily, largest overlap first); loads and counts are unchanged, only less data
        moves."""
        if self.split:
            raise BalanceError("split=True cuts samples by their token counts: call assign_lengths(lengths)")
        c = self._check_costs(costs)
        n, r = len(c), self.ranks
        lo, hi = self._count_range(n)
        home = self._check_home(home, n)
        q = _quantize(c, n)
        bound = lower_bound(c, r, min_count=lo)
        target = int(np.ceil(lower_bound(q, r, min_count=lo).value))  # loads are integers
        rank_of, proven = self._solve(q, lo, hi, target)
        if home is not None:
            rank_of = _keep_home(rank_of, home.astype(np.int64), r)
        return self._record(c, q, rank_of, bound, target, proven)

    # ------------------------------------------------------------------ internals

    def _check_costs(self, costs: np.ndarray) -> np.ndarray:
        c = np.asarray(costs, dtype=np.float64)
        if c.ndim != 1:
            raise BalanceError(f"costs must be 1-D (one per sample), got shape {c.shape}")
        if not np.isfinite(c).all() or (c < 0).any():
            raise BalanceError("costs must be finite and >= 0 (a cost function returned a negative or NaN)")
        return c

    def _check_home(self, home: np.ndarray | None, n: int) -> np.ndarray | None:
        if home is None:
            return None
        home = np.asarray(home)
        r = self.ranks
        if home.shape != (n,) or (n and (home.min() < 0 or home.max() >= r)):
            raise BalanceError(f"home must hold one rank in [0, {r}) per sample ({n}), got shape {home.shape}")
        return home.astype(np.int64)

    def _peak(self, sample: np.ndarray, start: np.ndarray, stop: np.ndarray, rank: np.ndarray, c: np.ndarray,
              length: np.ndarray) -> float:
        """Largest rank load of a chunk placement."""
        cost = c[sample].copy()
        chunked = (start > 0) | (stop < length[sample])
        cost[chunked] = balance_split.chunk_cost(self.cost.a, self.cost.b, start[chunked], stop[chunked])
        return float(np.bincount(rank, weights=cost, minlength=self.ranks).max())

    def _assign_split(self, length: np.ndarray, costs: np.ndarray, home: np.ndarray | None) -> Assignment:
        """Cut samples heavier than the mean per-rank load and balance the rest around them
        (fsc.runtime.balance_split)."""
        c = self._check_costs(costs)
        n, r = len(c), self.ranks
        home = self._check_home(home, n)
        span = r if self.max_span is None else min(self.max_span, r)
        cap = float(c.sum()) / r if r > 1 else 0.0  # one rank: nothing to cut
        heavy = c > cap if cap > 0.0 else np.zeros(n, dtype=bool)
        need = np.zeros(n)
        need[heavy] = np.ceil(c[heavy] / cap)
        # The wrap lays a sample of cost c over at most ceil(c / cap) + 1 ranks (fewer than all R);
        # a sample that might need more than max_span ranks, or than it has tokens, is capped.
        capped = heavy & (np.minimum(need + 1, r) > np.minimum(span, length))
        placed = self._wrap_heavy(length, c, heavy, capped, cap, span)
        if r > 1 and not capped.any() and self.split_tolerance < np.inf:
            peak = self._peak(*placed, c, length)
            if peak > cap * (1.0 + self.split_tolerance):
                cut_light = self._wrap_all(length, c, heavy, cap)
                fits = self.max_per_rank is None or np.bincount(cut_light[3], minlength=r).max() <= self.max_per_rank
                if fits and self._peak(*cut_light, c, length) < peak:
                    placed = cut_light
        sample, start, stop, rank = placed
        if home is not None:
            rank = _keep_home(rank, home[sample], r)
        return self._record_split(length, c, sample, start, stop, rank, capped, span)

    def _wrap_heavy(self, length: np.ndarray, c: np.ndarray, heavy: np.ndarray, capped: np.ndarray, cap: float,
                    span: int) -> tuple[np.ndarray, ...]:
        """Heavy samples wrapped onto the first ranks; light samples whole and capped ones in
        equal chunks balanced on the ranks left, the wrap's last, partly filled rank entering
        as one item of its load. Returns (sample, start, stop, rank) per chunk."""
        r, a, b = self.ranks, self.cost.a, self.cost.b
        wrapped = np.flatnonzero(heavy & ~capped)
        wrapped = wrapped[np.lexsort((wrapped, -c[wrapped]))]  # heaviest first, ties to the lower index
        w_sample, w_start, w_stop, w_rank, full = balance_split.wrap(length[wrapped], c[wrapped], a, b, cap=cap,
                                                                     ranks=r)
        w_sample = wrapped[w_sample]
        rest = np.flatnonzero(~heavy | capped)
        sample, start, stop, item = balance_split.pieces(length[rest], c[rest], a, b, cap=cap, span=span)
        sample = rest[sample]
        if len(wrapped):
            partly = w_rank == full
            item = np.append(item, balance_split.chunk_cost(a, b, w_start[partly], w_stop[partly]).sum())
        free = r - full
        # Two rounds of refinement at most: where the light samples do not balance whole by
        # then, more rounds rarely help (seen: Zipf(2) lengths, 1.018 after 12 rounds and 40 ms),
        # and cutting them too (_wrap_all) is exact.
        sub = replace(self, ranks=free, split=False, max_span=None, refine_rounds=min(self.refine_rounds, 2),
                      refine_patience=min(self.refine_patience, 1))
        k = len(item)
        lo, hi = sub._count_range(k)
        q = _quantize(item, k)
        target = int(np.ceil(lower_bound(q, free, min_count=lo).value))
        rank_of, _ = sub._solve(q, lo, hi, target)
        label = np.arange(full, r, dtype=np.int64)
        if len(wrapped):  # the rank that drew the partly filled rank's item becomes that rank
            label = np.insert(np.arange(full + 1, r, dtype=np.int64), int(rank_of[-1]), full)
            rank_of = rank_of[:-1]
        sample, start, stop, rank = balance_split.spread(sample, start, stop, label[rank_of])
        return tuple(np.concatenate(pair) for pair in
                     ((w_sample, sample), (w_start, start), (w_stop, stop), (w_rank, rank)))

    def _wrap_all(self, length: np.ndarray, c: np.ndarray, heavy: np.ndarray, cap: float) -> tuple[np.ndarray, ...]:
        """Every sample wrapped, heaviest first, a light one cut only where both sides of a
        boundary hold more than half the tolerance of it (each rank then ends within the
        tolerance of the mean). Returns (sample, start, stop, rank) per chunk."""
        every = np.lexsort((np.arange(len(c)), -c))
        snap = np.where(heavy[every], 0.0, 0.5 * self.split_tolerance * cap)
        sample, start, stop, rank, _ = balance_split.wrap(length[every], c[every], self.cost.a, self.cost.b,
                                                          cap=cap, ranks=self.ranks, snap=snap)
        return every[sample], start, stop, rank

    def _record_split(self, length: np.ndarray, c: np.ndarray, sample: np.ndarray, start: np.ndarray,
                      stop: np.ndarray, rank: np.ndarray, capped: np.ndarray, span: int) -> Assignment:
        n, r = len(c), self.ranks
        chunked = (start > 0) | (stop < length[sample])
        chunk_costs = c[sample].copy()  # a whole sample keeps its own cost, bit for bit
        chunk_costs[chunked] = balance_split.chunk_cost(self.cost.a, self.cost.b, start[chunked], stop[chunked])
        plan = SplitPlan.build(ranks=r, sample=sample, start=start, stop=stop, rank=rank, cost=chunk_costs,
                               lengths=length, kv_bytes_per_token=float(self.kv_bytes_per_token))
        whole_rank = np.full(n, -1, dtype=np.int64)
        whole = ~np.isin(np.arange(n), sample[chunked])
        whole_rank[sample[~chunked]] = rank[~chunked]
        loads = np.bincount(rank, weights=chunk_costs, minlength=r).astype(np.float64)
        counts = np.bincount(rank, minlength=r).astype(np.int64)
        held = np.flatnonzero(whole)
        order = held[np.argsort(whole_rank[held], kind="stable")]
        starts = np.concatenate(([0], np.cumsum(np.bincount(whole_rank[held], minlength=r)))).astype(np.int64)
        bound = split_lower_bound(c, r, lengths=length, span=span)
        total = float(c.sum())
        # Samples cut into fewer chunks than their cost needs (max_span, or too few tokens): one
        # of their chunks still outweighs the mean load.
        stragglers = int(capped.sum())
        share = float(c[capped].sum() / total) if stragglers else 0.0
        for x in (whole_rank, loads, counts, order, starts):
            x.setflags(write=False)
        result = Assignment(
            rank_of=whole_rank, ranks=r, loads=loads, counts=counts, bound=bound, method=self.method,
            optimal=bool(n == 0 or loads.max() <= bound.value), stragglers=stragglers, straggler_share=share,
            _order=order, _starts=starts, chunks=plan,
        )
        if stragglers:
            logger.warning(
                "balance: %d of %d samples stay heavier than the mean per-rank load after splitting "
                "(max_span=%s, or fewer tokens than ranks); the heaviest sets the step", stragglers, n, self.max_span,
            )
        logger.debug(
            "balance %s split: %d samples on %d ranks, %d split into %d chunks, max/LB %.4f (LB %s), "
            "%.3g bytes of keys/values moved", self.method, n, r, plan.split_samples, len(sample),
            result.max_over_lb, bound.name, plan.kv_bytes_total,
        )
        return result

    def _count_range(self, n: int) -> tuple[int, int]:
        r = self.ranks
        if self.counts == "equal":
            return n // r, -(-n // r)
        cap = n if self.max_per_rank is None else self.max_per_rank
        if cap * r < n:
            raise BalanceError(
                f"{n} samples do not fit on {r} ranks with max_per_rank={cap} "
                f"(needs max_per_rank >= {-(-n // r)})"
            )
        return max(0, n - (r - 1) * cap), cap

    def _solve(self, q: np.ndarray, lo: int, hi: int, target: int) -> tuple[np.ndarray, bool]:
        n, r, method = len(q), self.ranks, self.method
        if n == 0:
            return np.empty(0, dtype=np.int64), True
        if method == "random":
            deal = np.empty(n, dtype=np.int64)
            deal[np.random.default_rng(self.seed).permutation(n)] = np.arange(n) % r
            return deal, False
        if method == "round-robin":
            deal = np.empty(n, dtype=np.int64)
            deal[np.argsort(-q, kind="stable")] = np.arange(n) % r
            return deal, False
        if method == "kk-equal":
            return balance_search.kk_equal(q, r), False
        if method == "lpt":
            return balance_search.lpt(q, r, lo, hi), False
        if self.counts == "free":
            starts = [balance_search.lpt(q, r, lo, hi)]
        else:
            starts = [balance_search.kk_equal(q, r)]
            apart = balance_search.heavy_apart(q, r, lo)
            if apart is not None:
                starts.append(apart)
                starts.sort(key=lambda a: int(_loads(q, a, r).max()))  # stable: KK first on ties
        # Refine the most promising start; another is refined only when the first stops
        # short of the goal (local search from two starts lands in different optima).
        goal = int(target * (1.0 + self.tolerance))
        rank_of, best = None, None
        for start in starts:
            candidate = balance_search.refine(
                q, start, r, moves=self.counts == "free", hi=hi, rounds=self.refine_rounds,
                patience=self.refine_patience, target=target, tolerance=self.tolerance,
            )
            peak = int(_loads(q, candidate, r).max())
            if best is None or peak < best:
                rank_of, best = candidate, peak
            if best <= goal:
                break
        if n > self.exact_max_samples:
            return rank_of, False
        upper = int(_loads(q, rank_of, r).max())
        better, proven = balance_search.exact(q, r, lo, hi, upper=upper, target=target, nodes=self.search_nodes)
        return (rank_of if better is None else better), proven

    def _record(self, c: np.ndarray, q: np.ndarray, rank_of: np.ndarray, bound: LowerBound, target: int,
                proven: bool) -> Assignment:
        n, r = len(c), self.ranks
        loads = np.bincount(rank_of, weights=c, minlength=r).astype(np.float64)
        counts = np.bincount(rank_of, minlength=r).astype(np.int64)
        order = np.argsort(rank_of, kind="stable")  # ascending sample index within a rank
        starts = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        optimal = proven or (n == 0) or int(_loads(q, rank_of, r).max()) <= target
        total = float(loads.sum())
        heavy = c > total / r
        stragglers = int(heavy.sum())
        share = float(c[heavy].sum() / total) if stragglers else 0.0
        for a in (rank_of, loads, counts, order, starts):
            a.setflags(write=False)
        result = Assignment(
            rank_of=rank_of, ranks=r, loads=loads, counts=counts, bound=bound, method=self.method,
            optimal=optimal, stragglers=stragglers, straggler_share=share, _order=order, _starts=starts,
        )
        if stragglers:
            logger.warning(
                "balance: %d of %d samples are heavier than the mean per-rank load (%.1f%% of the "
                "batch's cost); no assignment fixes that, the heaviest alone sets the step",
                stragglers, n, 100.0 * share,
            )
        logger.debug(
            "balance %s: %d samples on %d ranks, max/LB %.4f (LB %s), counts %d..%d",
            self.method, n, r, result.max_over_lb, bound.name, counts.min(), counts.max(),
        )
        return result


def balance(costs: np.ndarray, ranks: int, **options) -> Assignment:
    """``Balancer(ranks=ranks, **options).assign(costs)``."""
    return Balancer(ranks=ranks, **options).assign(costs)


def _quantize(c: np.ndarray, n: int) -> np.ndarray:
    """Costs as int64 with the heaviest at 2**k: every sum of up to n of them stays below
    2**52, so it is exact in int64 and in float64 alike. The rounding (a relative 2**-k of
    the heaviest sample, k = 38 for 8192 samples) is far below any cost model's accuracy."""
    top = float(c.max()) if n else 0.0
    if top == 0.0:
        return np.zeros(n, dtype=np.int64)
    unit = float(2 ** min(40, 52 - n.bit_length()))
    return np.rint(c * (unit / top)).astype(np.int64)


def _loads(q: np.ndarray, rank_of: np.ndarray, ranks: int) -> np.ndarray:
    # Float sums of integers below 2**52 are exact (see _quantize).
    return np.bincount(rank_of, weights=q, minlength=ranks).astype(np.int64)


def _keep_home(rank_of: np.ndarray, home: np.ndarray, ranks: int) -> np.ndarray:
    """Relabel parts so that most samples keep their home rank: greedy on the overlap
    counts, largest first, ties to the lower part then the lower rank."""
    pair, overlap = np.unique(rank_of * ranks + home, return_counts=True)
    order = np.lexsort((pair % ranks, pair // ranks, -overlap))
    label = np.full(ranks, -1, dtype=np.int64)
    taken = np.zeros(ranks, dtype=bool)
    for p, h in zip((pair[order] // ranks).tolist(), (pair[order] % ranks).tolist()):
        if label[p] < 0 and not taken[h]:
            label[p], taken[h] = h, True
    label[label < 0] = np.flatnonzero(~taken)
    return label[rank_of]
