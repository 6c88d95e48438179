"""Split samples in the simulator, without compiling anything: chunk attention terms,
per-rank chunks and transfers from a split assignment, the key/value exchange's time on
the right links, its place in a graph's ops, and the quadratic fit the split balancer
uses."""

from __future__ import annotations

import numpy as np
import pytest

from fsc.runtime import Balancer, QuadraticCost
from sim.ablation import quadratic_fit, split_shares
from sim.engine import Compute, Issue, Wait, simulate
from sim.split import Exchange, Shares, exchange_seconds, exchanges, with_exchange
from sim.topology import Topology
from sim.workload import Ranks

COST = QuadraticCost(a=128.0, b=41088.0)


def test_chunk_attention_terms_are_keys_from_the_start_of_the_sample():
    whole = Ranks(lengths=(np.array([100]),), send=np.zeros(1), recv=np.zeros(1))
    cut = Ranks(lengths=(np.array([60]), np.array([40])), send=np.zeros(2), recv=np.zeros(2),
                offsets=(np.array([0]), np.array([60])))
    assert cut.power_sum(2).tolist() == [3600.0, 100.0**2 - 60.0**2]
    assert cut.power_sum(2).sum() == whole.power_sum(2)[0]  # chunks add up to the sample
    assert cut.tokens.tolist() == [60.0, 40.0]


def test_shares_list_each_rank_chunks_and_the_transfers_of_earlier_chunks():
    lengths = np.array([20_000] + [50] * 31)
    assignment = Balancer(ranks=4, counts="free", cost=COST, split=True).assign_lengths(lengths)
    shares = Shares.from_assignment(assignment)
    plan = assignment.chunks
    big = np.argsort(plan.start[plan.sample == 0])
    ranks, starts, stops = (x[plan.sample == 0][big] for x in (plan.rank, plan.start, plan.stop))
    expected = sorted((int(ranks[j]), int(ranks[i]), int(stops[j] - starts[j]))
                      for i in range(len(ranks)) for j in range(i))
    assert sorted(zip(shares.src.tolist(), shares.dst.tolist(), shares.tokens.tolist())) == expected
    assert shares.split_samples == 1 and shares.kv_tokens == sum(t for *_, t in expected)
    assert sum(x.sum() for x in shares.lengths) == lengths.sum()
    for r in range(4):
        assert len(shares.lengths[r]) == len(shares.offsets[r]) == len(assignment.chunks_of(r))


def test_exchange_inside_a_node_uses_its_link_and_across_nodes_the_nic():
    topo = Topology.of(16, "h100")
    dev = topo.device
    inside = Shares(lengths=(), offsets=None, src=np.array([0]), dst=np.array([1]), tokens=np.array([1000]))
    across = Shares(lengths=(), offsets=None, src=np.array([0]), dst=np.array([8]), tokens=np.array([1000]))
    t_in, leaves_in = exchange_seconds(inside, topo, 4096.0)
    t_out, leaves_out = exchange_seconds(across, topo, 4096.0)
    assert t_in == pytest.approx(dev.intra_node_latency + 1000 * 4096.0 / dev.intra_node_bandwidth)
    assert t_out == pytest.approx(dev.inter_node_latency + 1000 * 4096.0 / dev.inter_node_bandwidth)
    assert (leaves_in, leaves_out) == (False, True)


def test_a_rank_sending_to_several_later_chunks_counts_all_it_sends():
    topo = Topology.of(8, "h100")
    fan = Shares(lengths=(), offsets=None, src=np.array([0, 0, 0]), dst=np.array([1, 2, 3]),
                 tokens=np.array([100, 100, 100]))
    one = Shares(lengths=(), offsets=None, src=np.array([0]), dst=np.array([1]), tokens=np.array([300]))
    assert exchange_seconds(fan, topo, 8.0)[0] == pytest.approx(exchange_seconds(one, topo, 8.0)[0])


def test_no_split_means_no_exchange():
    shares = Shares.whole([np.array([3, 4]), np.array([5])])
    assert exchange_seconds(shares, Topology.of(2, "h100"), 4096.0) == (0.0, False)
    ops = [Compute(name="a", seconds=1.0)]
    assert exchanges(shares, Topology.of(2, "h100"), 4096.0) == []
    assert with_exchange(ops, layers=4, exchange=[], sm_free=False, blocking=False, prefix="") is ops


@pytest.mark.parametrize("blocking", [False, True])
def test_exchange_is_one_issue_and_wait_per_layer_inside_the_graph(blocking):
    ops = [Compute(name=f"c{i}", seconds=np.full(2, 1e-3)) for i in range(20)]
    both = [Exchange(members=(0, 1), seconds=5e-4, crosses=False)]
    out = with_exchange(ops, layers=4, exchange=both, sm_free=False, blocking=blocking, prefix="forward.", group="kv")
    issues = [i for i, op in enumerate(out) if isinstance(op, Issue)]
    waits = [i for i, op in enumerate(out) if isinstance(op, Wait)]
    assert len(issues) == len(waits) == 4
    assert all(out[i].group == "kv" and out[i].name.startswith("forward.kv_exchange.") for i in issues)
    assert all(out[i].members == (0, 1) and out[i].sm_based for i in issues)
    if blocking:
        assert all(out[i + 1].collective == out[i].name for i in issues)
    else:
        assert all(w > i + 1 for i, w in zip(issues, waits))  # compute runs while it is in flight
    assert [op for op in out if isinstance(op, Compute)] == ops
    overlapped = simulate(with_exchange(ops, layers=4, exchange=both, sm_free=True, blocking=False, prefix=""), 2)
    blocked = simulate(with_exchange(ops, layers=4, exchange=both, sm_free=True, blocking=True, prefix=""), 2)
    assert overlapped.step_s == pytest.approx(20e-3)  # hidden behind 3 ops of 1 ms
    assert blocked.step_s == pytest.approx(20e-3 + 4 * 5e-4)


def test_quadratic_fit_recovers_an_exact_quadratic():
    fit = quadratic_fit(QuadraticCost(a=3.0, b=700.0), 4096)
    assert fit.a == pytest.approx(3.0, rel=1e-9) and fit.b == pytest.approx(700.0, rel=1e-9)


def test_quadratic_fit_never_gives_negative_coefficients():
    fit = quadratic_fit(lambda x: 5.0 * np.asarray(x, dtype=np.float64) ** 0.5, 1000)
    assert fit.a >= 0.0 and fit.b >= 0.0


def test_split_shares_cover_the_batch_on_every_rank():
    lengths = np.array([30_000, 10, 20, 30, 40, 50, 60, 70])
    shares = split_shares(lengths, 4, cost=COST)
    assert len(shares.lengths) == 4 and sum(x.sum() for x in shares.lengths) == lengths.sum()
    assert shares.split_samples == 1 and shares.kv_tokens > 0


def test_exchanges_are_one_per_group_of_ranks_sharing_split_samples():
    # ranks 0 -> 1 -> 2 share one sample (a chain), 5 -> 9 another (across nodes of 8)
    shares = Shares(lengths=(), offsets=None, src=np.array([0, 1, 0, 5]), dst=np.array([1, 2, 2, 9]),
                    tokens=np.array([100, 50, 100, 400]))
    topo = Topology.of(16, "h100")
    found = exchanges(shares, topo, 8.0)
    assert [(e.members, e.crosses) for e in found] == [((0, 1, 2), False), ((5, 9), True)]
    dev = topo.device
    assert found[0].seconds == pytest.approx(dev.intra_node_latency + 200 * 8.0 / dev.intra_node_bandwidth)
    assert exchange_seconds(shares, topo, 8.0) == (max(e.seconds for e in found), True)


def test_a_rank_outside_every_exchange_is_not_held_by_it():
    # rank 2 holds no chunk: the exchange of ranks 0 and 1 (issued late by rank 1) holds them only
    ops = [Compute(name="a", seconds=np.array([1.0, 3.0, 1.0])),
           Issue(name="kv", group="kv", seconds=0.5, members=(0, 1)), Wait(name="w", collective="kv"),
           Compute(name="b", seconds=1.0)]
    res = simulate(ops, 3)
    np.testing.assert_allclose(res.idle_s, [2.0, 0.0, 2.5])  # rank 2 idles only at the step's end
    np.testing.assert_allclose(res.exposed_s, [0.5, 0.5, 0.0])
    assert res.step_s == pytest.approx(4.5)


def test_sm_free_all_reduce_is_two_copy_engine_halves_around_a_sum():
    from sim.workload import sm_free_all_reduces

    ops = [Issue(name="ar0", group="g", seconds=2.0), Compute(name="c1", seconds=1.0),
           Issue(name="ar1", group="g", seconds=2.0), Compute(name="c2", seconds=1.0), Compute(name="c3", seconds=1.0),
           Wait(name="w0", collective="ar0"), Wait(name="w1", collective="ar1")]
    out = sm_free_all_reduces(ops, {"ar0": 0.1, "ar1": 0.1})
    # both are needed at the end: each middle goes halfway (in the program's compute ops) to
    # its wait, ar1 issued before ar0's middle
    assert [op.name for op in out] == ["ar0.scatter", "c1", "ar1.scatter", "ar0.scatter.wait", "ar0.sum", "ar0",
                                       "c2", "ar1.scatter.wait", "ar1.sum", "ar1", "c3", "w0", "w1"]
    # ar1 needed later (after c4): ar0's middle goes before ar1's issue, or its second half
    # would queue behind ar1
    later = [*ops[:6], Compute(name="c4", seconds=1.0), ops[6]]
    assert [op.name for op in sm_free_all_reduces(later, {"ar0": 0.1, "ar1": 0.1})] == [
        "ar0.scatter", "c1", "ar0.scatter.wait", "ar0.sum", "ar0", "ar1.scatter", "c2", "ar1.scatter.wait", "ar1.sum",
        "ar1", "c3", "w0", "c4", "w1"]
    # ar1 needed first, issued before ar0's middle: ar0's second half counts as a later issue,
    # and ar1's middle goes before it
    nested = [Issue(name="ar0", group="g", seconds=2.0), *(Compute(name=f"a{i}", seconds=1.0) for i in range(5)),
              Issue(name="ar1", group="g", seconds=2.0), *(Compute(name=f"b{i}", seconds=1.0) for i in range(10)),
              Wait(name="w1", collective="ar1"), Compute(name="c", seconds=1.0), Wait(name="w0", collective="ar0")]
    names = [op.name for op in sm_free_all_reduces(nested, {"ar0": 0.1, "ar1": 0.1})]
    assert names[names.index("b2") + 1:names.index("b3")] == ["ar0.scatter.wait", "ar0.sum", "ar1.scatter.wait",
                                                               "ar1.sum", "ar1", "ar0"], names
    assert all(not op.sm_based and op.seconds == 1.0 for op in out if isinstance(op, Issue))
    res = simulate(out, 2, contention=2.0)
    assert res.contention_s.max() == pytest.approx(0.0, abs=1e-12)
