"""The balancer with split=True on one process: chunk costs of a causal sequence, cut points,
coverage (every token of every sample on exactly one rank), distinct ranks per sample,
earlier chunks and key/value bytes, max / (total / R) on long-tailed lengths where whole
samples cannot balance, determinism and permutations, edges (empty, zero-length, one rank,
samples too heavy for every rank or too short to cut), and every argument check."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fsc.runtime import BalanceError, Balancer, QuadraticCost, split_lower_bound
from fsc.runtime.balance_split import chunk_cost, cut_points, prefix_cost, wrap

#: the HSTU example's per-layer forward FLOPs at its defaults (as in test_balancer.py)
COST = QuadraticCost(a=128.0, b=41088.0)


def splitter(ranks: int, **options) -> Balancer:
    return Balancer(ranks=ranks, counts="free", cost=COST, split=True, **options)


def long_tailed(n: int, seed: int, *, giants: int = 3) -> np.ndarray:
    """Lognormal lengths (median 300, sigma 1) with a few very long histories."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(np.rint(rng.lognormal(np.log(300.0), 1.0, n)), 1).astype(np.int64)
    lengths[rng.choice(n, giants, replace=False)] = rng.integers(20_000, 60_000, giants)
    return lengths


def covered_once(result, lengths: np.ndarray) -> bool:
    """Every token of every sample lies in exactly one chunk."""
    plan = result.chunks
    seen = np.zeros(int(lengths.sum()), dtype=np.int64)
    base = np.concatenate(([0], np.cumsum(lengths)))
    for s, a, b in zip(plan.sample.tolist(), plan.start.tolist(), plan.stop.tolist()):
        assert 0 <= a < b <= lengths[s] or (a == b == 0 == lengths[s])
        seen[base[s] + a : base[s] + b] += 1
    return bool((seen == 1).all()) and set(plan.sample.tolist()) == set(range(len(lengths)))


def test_chunk_cost_is_the_attention_of_its_queries_over_keys_from_the_start_plus_its_tokens():
    a, b, p, n = 3.0, 5.0, 40, 7
    pairs = n * (p + n) - n * (n - 1) / 2  # queries [p, p+n) against keys [0, query]
    assert chunk_cost(a, b, p, p + n) == pytest.approx(2 * a * pairs - a * n + b * n)
    assert chunk_cost(a, b, p, p + n) > chunk_cost(a, b, 0, n)  # later queries see more keys


def test_chunk_costs_of_a_cut_sample_sum_to_its_whole_cost():
    cut = cut_points(COST.a, COST.b, 10_001, 7)
    assert chunk_cost(COST.a, COST.b, cut[:-1], cut[1:]).sum() == pytest.approx(float(COST(10_001)), rel=1e-12)


def test_cut_points_give_chunks_equal_in_cost_to_within_one_token():
    length, parts = 50_000, 9
    cut = cut_points(COST.a, COST.b, length, parts)
    assert cut[0] == 0 and cut[-1] == length and (np.diff(cut) > 0).all()
    costs = chunk_cost(COST.a, COST.b, cut[:-1], cut[1:])
    one_token = float(prefix_cost(COST.a, COST.b, length) - prefix_cost(COST.a, COST.b, length - 1))
    assert np.ptp(costs) <= one_token
    assert (np.diff(cut) > 0).all() and np.diff(cut)[0] > np.diff(cut)[-1]  # later chunks are shorter


def test_wrap_rounds_each_cut_to_the_token_side_that_keeps_every_rank_lowest():
    # cost L**2, 9 tokens on 4 ranks (share 20.25): boundaries at 4.5, 6.36 and 7.79 tokens.
    # The nearest tokens (4, 6, 8) give loads 16, 20, 28, 17; cuts at 5, 7, 8 give 25, 24, 15, 17.
    sample, start, stop, rank, full = wrap(np.array([9]), np.array([81.0]), 1.0, 0.0, cap=20.25, ranks=4)
    assert full == 3 and stop.tolist() == [5, 7, 8, 9] and rank.tolist() == [0, 1, 2, 3]
    assert chunk_cost(1.0, 0.0, start, stop).max() == 25.0


def test_wrap_keeps_a_rank_within_one_token_of_its_share_on_long_samples():
    lengths = np.array([5000, 4000, 3000])
    costs = COST(lengths)
    cap = float(costs.sum()) / 7
    sample, start, stop, rank, full = wrap(lengths, costs, COST.a, COST.b, cap=cap, ranks=7)
    loads = np.bincount(rank, weights=chunk_cost(COST.a, COST.b, start, stop), minlength=7)
    token = 2 * COST.a * 5000 + COST.b
    assert full == 6 and loads.max() <= cap + token and loads.sum() == pytest.approx(costs.sum())
    for s in range(3):  # each sample on consecutive, distinct ranks, in token order
        mine = np.flatnonzero(sample == s)
        assert (np.diff(rank[mine]) == 1).all() and (start[mine][1:] == stop[mine][:-1]).all()


def test_cut_points_keep_every_chunk_at_least_one_token():
    cut = cut_points(1.0, 0.0, 5, 5)
    assert cut.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("ranks", [2, 8, 64])
def test_every_token_of_every_sample_is_on_exactly_one_rank(ranks):
    for seed in range(3):
        lengths = long_tailed(32 * ranks, seed)
        result = splitter(ranks).assign_lengths(lengths)
        assert covered_once(result, lengths)


def test_loads_are_the_sums_of_chunk_costs_and_add_up_to_the_batch_cost():
    lengths = long_tailed(256, 1)
    result = splitter(8).assign_lengths(lengths)
    plan = result.chunks
    expected = chunk_cost(COST.a, COST.b, plan.start, plan.stop)
    assert np.allclose(plan.cost, expected, rtol=1e-12)
    assert np.allclose(result.loads, np.bincount(plan.rank, weights=plan.cost, minlength=8), rtol=1e-12)
    assert result.loads.sum() == pytest.approx(float(COST(lengths).sum()), rel=1e-12)


@pytest.mark.parametrize("ranks", [8, 64])
def test_split_reaches_one_percent_of_total_over_ranks_where_whole_samples_cannot(ranks):
    for seed in range(3):
        lengths = long_tailed(32 * ranks, seed)
        mean = float(COST(lengths).sum()) / ranks
        whole = Balancer(ranks=ranks, counts="free", cost=COST).assign_lengths(lengths)
        assert whole.max_load / mean > 1.5  # stuck at the heaviest sample
        result = splitter(ranks).assign_lengths(lengths)
        assert result.bound.name == "mean" and result.lower_bound == pytest.approx(mean)
        assert result.max_over_lb <= 1.01
        assert result.split_samples == int((COST(lengths) > mean).sum()) >= 1 and result.stragglers == 0


def test_chunks_of_one_sample_sit_on_distinct_ranks_in_ascending_order():
    lengths = long_tailed(512, 2, giants=5)
    plan = splitter(16).assign_lengths(lengths).chunks
    for s in np.unique(plan.sample[plan.start > 0]).tolist():
        mine = np.flatnonzero(plan.sample == s)
        mine = mine[np.argsort(plan.start[mine])]
        assert len(set(plan.rank[mine].tolist())) == len(mine)
        assert (np.diff(plan.rank[mine]) > 0).all()


def test_chunks_of_name_the_earlier_chunks_and_the_bytes_they_send():
    lengths = np.array([40_000] + [100] * 63)
    result = splitter(4, kv_bytes_per_token=256.0).assign_lengths(lengths)
    everything = [c for r in range(4) for c in result.chunks_of(r)]
    big = sorted((c for c in everything if c.sample == 0), key=lambda c: c.start)
    assert len(big) >= 2 and big[0].start == 0 and big[-1].stop == 40_000
    for i, chunk in enumerate(big):
        assert chunk.earlier == tuple((c.rank, c.start, c.stop) for c in big[:i])
        assert chunk.kv_bytes == chunk.start * 256.0
        assert chunk.whole is False
    assert result.chunks.kv_bytes_total == sum(c.start for c in big) * 256.0
    assert all(c.whole and c.kv_bytes == 0.0 for c in everything if c.sample != 0)


def test_a_sample_heavier_than_all_others_together_spans_every_rank():
    lengths = np.array([3] * 20 + [100_000] + [5] * 11)
    result = splitter(4).assign_lengths(lengths)
    assert sorted(result.chunks.rank[result.chunks.sample == 20].tolist()) == [0, 1, 2, 3]
    assert result.max_over_lb <= 1.01 and result.rank_of[20] == -1


def test_light_samples_that_do_not_pack_whole_are_cut_too_within_the_tolerance():
    # 10 samples per rank at the length cap, each about a tenth of a rank's share: whole,
    # some rank must take 11 of them or the ranks stay uneven
    rng = np.random.default_rng(3)
    lengths = np.concatenate([np.full(84, 4096), rng.integers(1, 60, 200)])
    whole = splitter(8, split_tolerance=float("inf")).assign_lengths(lengths)
    assert whole.split_samples == 0 and whole.max_over_lb > 1.01
    cut = splitter(8).assign_lengths(lengths)
    assert cut.max_over_lb <= 1.005 + 1e-9 and 0 < cut.split_samples <= 7
    assert covered_once(cut, lengths)
    loose = splitter(8, split_tolerance=0.5).assign_lengths(lengths)
    assert loose.split_samples == 0  # whole samples are within 50% of the mean: nothing cut


def test_cutting_light_samples_never_breaks_max_per_rank():
    rng = np.random.default_rng(3)
    lengths = np.concatenate([np.full(84, 4096), rng.integers(1, 60, 200)])
    for cap in (36, 40, 60):
        result = splitter(8, max_per_rank=cap).assign_lengths(lengths)
        assert result.counts.max() <= cap and covered_once(result, lengths)


def test_split_is_a_pure_function_of_the_lengths():
    lengths = long_tailed(2048, 4)
    first, again = splitter(64).assign_lengths(lengths), splitter(64).assign_lengths(lengths.copy())
    for name in ("sample", "start", "stop", "rank", "cost", "kv_bytes"):
        assert np.array_equal(getattr(first.chunks, name), getattr(again.chunks, name))
    assert np.array_equal(first.loads, again.loads) and np.array_equal(first.rank_of, again.rank_of)


def test_permuting_the_samples_permutes_the_cuts_and_keeps_the_loads():
    """Documented: the same cut points per sample and the same multiset of rank loads
    (rank labels may differ)."""
    rng = np.random.default_rng(5)
    lengths = long_tailed(512, 5)
    perm = rng.permutation(len(lengths))
    a, b = splitter(16).assign_lengths(lengths), splitter(16).assign_lengths(lengths[perm])
    cuts_a = sorted(zip(a.chunks.sample.tolist(), a.chunks.start.tolist(), a.chunks.stop.tolist()))
    cuts_b = sorted(zip(perm[b.chunks.sample].tolist(), b.chunks.start.tolist(), b.chunks.stop.tolist()))
    assert cuts_a == cuts_b
    assert np.allclose(np.sort(a.loads), np.sort(b.loads), rtol=1e-12)


def test_permuting_equal_length_giants_keeps_the_loads():
    lengths = np.concatenate([[30_000, 30_000, 30_000], np.random.default_rng(6).integers(1, 900, 253)])
    perm = np.random.default_rng(7).permutation(len(lengths))
    a, b = splitter(8).assign_lengths(lengths), splitter(8).assign_lengths(lengths[perm])
    assert np.allclose(np.sort(a.loads), np.sort(b.loads), rtol=1e-12)
    assert a.split_samples == b.split_samples == 3


def test_split_with_nothing_heavy_gives_exactly_the_whole_sample_assignment():
    lengths = np.random.default_rng(0).integers(50, 400, 256)
    whole = Balancer(ranks=8, counts="free", cost=COST).assign_lengths(lengths)
    split = splitter(8).assign_lengths(lengths)
    assert split.split_samples == 0
    assert np.array_equal(whole.rank_of, split.rank_of) and np.array_equal(whole.loads, split.loads)
    for r in range(8):
        assert np.array_equal(whole.samples_of(r), split.samples_of(r))
        assert [c.sample for c in split.chunks_of(r)] == whole.samples_of(r).tolist()


def test_split_off_is_the_default_and_gives_no_chunks():
    result = Balancer(ranks=4, cost=COST).assign_lengths(np.array([10_000, 3, 3, 3]))
    assert result.chunks is None and result.split_samples == 0 and result.stragglers == 1
    with pytest.raises(BalanceError, match="split=True"):
        result.chunks_of(0)


def test_samples_of_refuses_an_assignment_with_split_samples():
    result = splitter(4).assign_lengths(np.array([10_000, 3, 3, 3]))
    with pytest.raises(BalanceError, match="chunks_of"):
        result.samples_of(0)


def test_one_rank_splits_nothing():
    lengths = np.array([100_000, 3, 0, 7])
    result = splitter(1).assign_lengths(lengths)
    assert result.split_samples == 0 and result.samples_of(0).tolist() == [0, 1, 2, 3]
    assert result.max_over_lb == pytest.approx(1.0)


def test_zero_length_samples_are_held_whole_and_cost_nothing():
    lengths = np.array([0, 30_000, 0, 5, 0, 8, 9, 0])
    result = splitter(4).assign_lengths(lengths)
    assert covered_once(result, lengths)
    zero = np.isin(result.chunks.sample, [0, 2, 4, 7])
    assert (result.chunks.cost[zero] == 0).all() and (result.chunks.stop[zero] == 0).all()


@pytest.mark.parametrize("lengths", [np.zeros(0, dtype=np.int64), np.zeros(5, dtype=np.int64)])
def test_empty_or_all_zero_batches_are_balanced_by_definition(lengths):
    result = splitter(3).assign_lengths(lengths)
    assert result.split_samples == 0 and result.max_over_lb == 1.0 and result.optimal


def test_max_span_caps_the_ranks_a_sample_spans_and_the_bound_says_so(caplog):
    lengths = np.array([100_000] + [50] * 63)
    with caplog.at_level(logging.WARNING, logger="fsc.runtime.balancer"):
        result = splitter(8, max_span=2).assign_lengths(lengths)
    assert (result.chunks.sample == 0).sum() == 2
    assert result.bound.name == "spanned" and result.bound.k == 2
    assert result.stragglers == 1 and "stay heavier" in caplog.text
    assert result.max_over_lb <= 1.01


@pytest.mark.parametrize("max_span", [2, 3, 5])
def test_no_sample_spans_more_ranks_than_max_span(max_span):
    for seed in range(4):
        lengths = long_tailed(256, seed, giants=4)
        plan = splitter(16, max_span=max_span).assign_lengths(lengths).chunks
        assert np.bincount(plan.sample).max() <= max_span
        assert covered_once(splitter(16, max_span=max_span).assign_lengths(lengths), lengths)


def test_a_sample_too_short_for_the_chunks_it_needs_is_cut_into_single_tokens():
    lengths = np.array([3] + [0] * 7)  # all cost in one 3-token sample, 8 ranks
    result = splitter(8).assign_lengths(lengths)
    mine = result.chunks.sample == 0
    assert sorted(result.chunks.stop[mine] - result.chunks.start[mine]) == [1, 1, 1]
    assert result.bound.name == "spanned" and result.bound.k == 3


def test_split_lower_bound_never_exceeds_the_split_max_load():
    rng = np.random.default_rng(11)
    for _ in range(20):
        ranks = int(rng.integers(1, 9))
        lengths = long_tailed(int(rng.integers(1, 80)), int(rng.integers(1000)), giants=1)
        result = splitter(ranks).assign_lengths(lengths)
        bound = split_lower_bound(COST(lengths), ranks, lengths=lengths, span=ranks)
        assert bound.value <= result.max_load * (1 + 1e-12)


def test_home_relabels_ranks_without_changing_the_split_loads():
    lengths = long_tailed(128, 3)
    home = np.arange(128) % 4
    plain, kept = splitter(4).assign_lengths(lengths), splitter(4).assign_lengths(lengths, home=home)
    assert np.allclose(np.sort(plain.loads), np.sort(kept.loads))
    assert covered_once(kept, lengths)


def test_quadratic_cost_from_polynomial_coefficients_drops_the_constant():
    assert QuadraticCost.from_coefficients([2.0, 3.0, 7.0]) == QuadraticCost(a=2.0, b=3.0)
    assert QuadraticCost.from_coefficients([5.0]) == QuadraticCost(a=0.0, b=0.0)
    assert QuadraticCost.from_coefficients([4.0, 0.0]) == QuadraticCost(a=0.0, b=4.0)


def test_quadratic_cost_takes_a_sample_cost_flops_polynomial():
    import sympy

    from fsc.analysis.sample_cost import L, SampleCost

    cost = SampleCost(flops=6 * L**2 + 4096 * L + 100, nbytes=8 * L, seconds=L * 1e-9, symbol="s0")
    assert QuadraticCost.from_coefficients(cost.flops_polynomial().all_coeffs()) == QuadraticCost(a=6.0, b=4096.0)
    assert isinstance(cost.flops_polynomial(), sympy.Poly)


@pytest.mark.parametrize("coefficients, message", [([1, 2, 3, 4], "degree <= 2"), ([-1, 2, 0], "a >= 0")])
def test_bad_polynomials_are_refused(coefficients, message):
    with pytest.raises(BalanceError, match=message):
        QuadraticCost.from_coefficients(coefficients)


@pytest.mark.parametrize("options, message", [
    ({"split": "yes", "counts": "free", "cost": COST}, "split must be True or False, got 'yes'"),
    ({"split": True, "cost": COST}, "split=True needs counts='free'"),
    ({"split": True, "counts": "free", "cost": np.square}, "split=True needs cost=QuadraticCost"),
    ({"split": True, "counts": "free"}, "split=True needs cost=QuadraticCost"),
    ({"max_span": 2, "counts": "free", "cost": COST}, "max_span=2 needs split=True"),
    ({"split": True, "counts": "free", "cost": COST, "max_span": 0}, "max_span must be a positive int"),
    ({"split": True, "counts": "free", "cost": COST, "kv_bytes_per_token": -1.0}, "kv_bytes_per_token must be"),
    ({"split": True, "counts": "free", "cost": COST, "kv_bytes_per_token": float("nan")}, "kv_bytes_per_token"),
    ({"split": True, "counts": "free", "cost": COST, "split_tolerance": -0.1}, "split_tolerance must be"),
])
def test_bad_split_options_are_rejected_naming_the_option(options, message):
    with pytest.raises(BalanceError, match=message.replace("(", r"\(").replace("'", "'")):
        Balancer(ranks=4, **options)


def test_split_needs_lengths_not_costs():
    with pytest.raises(BalanceError, match="assign_lengths"):
        splitter(4).assign(np.ones(8))


def test_split_needs_whole_token_lengths():
    with pytest.raises(BalanceError, match="whole-token"):
        splitter(4).assign_lengths(np.array([1.5, 2.0]))


def test_chunks_of_rejects_a_rank_out_of_range():
    result = splitter(2).assign_lengths(np.array([5, 6]))
    with pytest.raises(BalanceError, match="out of range"):
        result.chunks_of(2)
