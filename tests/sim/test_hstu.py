"""The simulated HSTU step from the example's real compiled graphs (a tiny configuration)."""

from __future__ import annotations

import numpy as np
import pytest

from sim.ablation import Setting, ablation
from sim.engine import Compute, Issue, Wait, simulate
from sim.hstu import HSTUScale, HSTUStep
from sim.lengths import LengthDistribution
from sim.topology import Topology

# Every test here compiles the HSTU example through Inductor (the capture, up to its post-grad graphs).
pytestmark = pytest.mark.inductor

TINY = HSTUScale(dim=32, heads=1, qk_dim=16, v_dim=16, layers=1, max_len=128, negatives=16, batch_per_rank=4,
                 num_items=1000)


@pytest.fixture(scope="module")
def step() -> HSTUStep:
    return HSTUStep.capture(TINY, plan_profile="h100")


def test_attention_terms_become_per_sample_when_jagged(step):
    topo = Topology.of(2, "h100")
    one = step.ranks([np.array([100]), np.array([100])])
    two = step.ranks([np.array([50, 50]), np.array([50, 50])])
    jagged_one, dense_one = step.compute_seconds(one, topo, "jagged"), step.compute_seconds(one, topo, "dense")
    np.testing.assert_allclose(jagged_one, dense_one)  # one sample: sum(L^2) == T^2
    assert (step.compute_seconds(two, topo, "jagged") < step.compute_seconds(two, topo, "dense")).all()


def test_the_pipelined_lookup_sends_each_distinct_id_once(step):
    lengths = [np.array([10, 20]), np.array([30, 0, 5])]
    every, distinct = step.ranks(lengths), step.ranks(lengths, distinct=True)
    tokens = np.array([30.0, 35.0])
    np.testing.assert_allclose(every.send, 2 * tokens + TINY.negatives)  # items, targets, negatives
    # the targets repeat the items but each non-empty sample's last
    np.testing.assert_allclose(distinct.send, tokens + np.array([2, 2]) + TINY.negatives)
    np.testing.assert_allclose(distinct.recv, np.full(2, distinct.send.mean()))


def test_blocking_order_waits_right_after_every_issue(step):
    ranks = step.ranks([np.array([10, 20])] * 2)
    ops = step.ops(ranks, Topology.of(2, "h100"), overlap=False, sm_free=False)
    for i, op in enumerate(ops):
        if isinstance(op, Issue) and not op.name.startswith("grad_allreduce"):
            assert ops[i + 1].collective == op.name
    assert sum(isinstance(op, Issue) for op in ops) >= 6  # 4 exchanges, gradients, the token count


def test_ablation_is_deterministic_and_all_beats_baseline(step):
    setting = Setting(ranks=16, steps=2, seed=5)
    dist = LengthDistribution.lognormal(40, 1.0)
    rows, _, _ = ablation(step, setting, dist)
    again, _, _ = ablation(step, setting, dist)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("sim_seconds", "loadavg")} for r in rs]
    assert strip(rows) == strip(again)
    by = {r["config"]: r for r in rows}
    assert set(by) == {"baseline", "lb", "overlap", "sm-free", "all", "lb-split", "all-split", "overlap-sync",
                       "all-sync", "all-split-sync"}
    assert {c for c, r in by.items() if r["pipelined"]} == {"overlap", "all", "all-split"}
    assert all((by[c]["refetch_fraction"] > 0) == by[c]["pipelined"] for c in by)
    assert all(by[c]["split_samples"] == by[c]["kv_gb"] == 0 for c in ("baseline", "lb", "all"))
    assert by["all-split"]["split_samples"] == by["lb-split"]["split_samples"]
    assert (by["all-split"]["kv_gb"] > 0) == (by["all-split"]["split_samples"] > 0)
    assert by["all"]["bubble_fraction"] < by["baseline"]["bubble_fraction"]
    assert by["lb"]["idle_ms"] < by["baseline"]["idle_ms"]
    other, _, _ = ablation(step, Setting(ranks=16, steps=2, seed=6), dist, ("baseline",))
    assert other[0]["bubble_fraction"] != by["baseline"]["bubble_fraction"]


def _small(step, ranks: int = 16, seed: int = 3):
    """A fixed balanced workload: lognormal lengths, balanced over ``ranks``."""
    from sim.ablation import assign

    topo = Topology.of(ranks, "h100")
    lengths = LengthDistribution.lognormal(40, 1.0).draw(ranks * TINY.batch_per_rank, np.random.default_rng(seed),
                                                         TINY.max_len)
    per_rank = assign(lengths, ranks, balance=True, cost=step.sample_cost(topo), seed=seed)
    return step.ranks(per_rank), topo


def test_pipelined_all_exposes_less_communication_than_unpipelined(step):
    ranks, topo = _small(step)
    runs = {p: simulate(step.ops(ranks, topo, overlap=True, sm_free=True, pipelined=p), 16, contention=1.35)
            for p in (False, True)}
    assert runs[True].exposed_s.mean() < runs[False].exposed_s.mean()
    assert runs[True].step_s < runs[False].step_s
    assert runs[True].bubble_fraction < runs[False].bubble_fraction


def test_pipelined_step_refetches_first_and_hides_the_next_batch_exchange(step):
    ranks, topo = _small(step)
    ops = step.ops(ranks, topo, overlap=True, sm_free=False, pipelined=True)
    issues = [op.name for op in ops if isinstance(op, Issue)]
    # the refetch is the first collective (the token count's all-reduce was issued a step
    # ahead), then the next batch's exchange (counts, ids, rows), all at the forward's start,
    # before any forward compute
    assert issues[:4] == ["refetch", "next.forward.all_to_all_single",
                          "next.forward.all_to_all_single_1", "next.forward.all_to_all_single_2"]
    assert "tokens_allreduce" in [op.name for op in step.ops(ranks, topo, overlap=True, sm_free=False)
                                  if isinstance(op, Issue)]
    first_forward = next(i for i, op in enumerate(ops) if isinstance(op, Compute) and op.name.startswith("forward."))
    assert max(i for i, op in enumerate(ops) if isinstance(op, Issue) and op.name.startswith(("refetch", "next."))) \
        < first_forward
    # the forward graph's own exchange is gone; the backward keeps the rows' gradients
    assert not any(n.startswith("forward.") for n in issues)
    assert any(n.startswith("backward.all_to_all") for n in issues)
    # the next batch's exchange is waited on at the end of the forward, after all of its compute
    last_forward = max(i for i, op in enumerate(ops) if isinstance(op, Compute) and op.name.startswith("forward."))
    waits = [i for i, op in enumerate(ops) if isinstance(op, Wait) and op.collective.startswith("next.")]
    assert len(waits) == 3 and min(waits) > last_forward
    # in the timeline it overlaps compute and nobody waits for it
    res = simulate(ops, 16, contention=1.35)
    span = next(c for c in res.collectives if c.name == "next.forward.all_to_all_single_2")
    trace = res.trace()
    assert any(i.track == "compute" and i.start_s < span.end and i.end_s > span.start for i in trace if i.rank == 0)
    assert not any(i.track in ("communication", "idle") and "next." in i.name for i in trace)
    assert span.end < res.step_s


def test_pipelined_buckets_are_issued_inside_the_backward_and_waited_at_its_end(step):
    ranks, topo = _small(step)
    for pipelined in (False, True):
        ops = step.ops(ranks, topo, overlap=True, sm_free=False, pipelined=pipelined)
        backward = [i for i, op in enumerate(ops) if isinstance(op, Compute) and op.name.startswith("backward.")]
        grads = [i for i, op in enumerate(ops) if isinstance(op, Issue) and "all_reduce" in op.name
                 and op.group != "world"] if pipelined else \
            [i for i, op in enumerate(ops) if isinstance(op, Issue) and op.name.startswith("grad_allreduce")]
        assert grads
        if pipelined:  # on the exchange's process group, before the backward's last node
            assert max(grads) < backward[-1]
            adam = next(i for i, op in enumerate(ops) if isinstance(op, Compute) and op.name == "adam")
            bucket_waits = [i for i, op in enumerate(ops) if isinstance(op, Wait) and "all_reduce" in op.collective
                            and op.collective.startswith("backward.")]
            assert bucket_waits and max(bucket_waits) < adam
        else:  # GradientBuckets: after the whole backward
            assert min(grads) > backward[-1]


def test_a_gradient_bucket_costs_its_bytes_at_any_rank_count(step):
    for ranks in (16, 256):
        topo = Topology.of(ranks, "h100")
        ops = step.ops(step.ranks([np.array([20, 30])] * ranks), topo, overlap=True, sm_free=False, pipelined=True)
        (bucket,) = [op for op in ops if isinstance(op, Issue) and op.name.startswith("backward.all_reduce")]
        assert TINY.dense_parameters() * 4 < TINY.bucket_mb * 2**20  # one bucket holds them all
        assert bucket.seconds == pytest.approx(topo.all_reduce_seconds(4.0 * TINY.dense_parameters()), rel=1e-6)


def test_refetch_costs_its_share_of_the_row_exchange(step):
    ranks, topo = _small(step)
    rows = next(op for op in step.ops(ranks, topo, overlap=True, sm_free=False)
                if isinstance(op, Issue) and op.name == "forward.all_to_all_single_2")

    def refetch(fraction):
        ops = step.ops(ranks, topo, overlap=True, sm_free=False, pipelined=True, refetch=fraction)
        return next(op for op in ops if isinstance(op, Issue) and op.name == "refetch").seconds

    assert refetch(1.0) == pytest.approx(rows.seconds, rel=1e-3)  # every row again: the row exchange
    latency = topo.all_to_all_seconds(0.0)
    assert refetch(0.25) - latency == pytest.approx(0.25 * (refetch(1.0) - latency), rel=1e-9)
    assert refetch(0.0) == pytest.approx(latency)


def test_pipelined_step_options(step):
    ranks, topo = _small(step)
    with pytest.raises(ValueError, match="overlap"):
        step.ops(ranks, topo, overlap=False, sm_free=False, pipelined=True)
    with pytest.raises(ValueError, match="refetch"):
        step.ops(ranks, topo, overlap=True, sm_free=False, pipelined=True, refetch=2.0)
    with pytest.raises(ValueError, match="prefetch_wait"):
        step.ops(ranks, topo, overlap=True, sm_free=False, pipelined=True, prefetch_wait="never")
    late = step.ops(ranks, topo, overlap=True, sm_free=False, pipelined=True, prefetch_wait="step")
    adam = next(i for i, op in enumerate(late) if isinstance(op, Compute) and op.name == "adam")
    assert min(i for i, op in enumerate(late) if isinstance(op, Wait) and op.collective.startswith("next.")) > adam
    simulate(late, 16)


def _measured_file(tmp_path, world: int, steps=(3, 4)) -> str:
    import json

    rows = [dict(rank=r, step=s, step_ms=40.0, compute_ms=30.0, exposed_comm_ms=5.0, idle_ms=1.0, unattributed_ms=2.0)
            for s in steps for r in range(world)]
    path = tmp_path / f"bubbles{world}.json"
    path.write_text(json.dumps({"steps": rows}))
    return str(path)


def test_validation_stretches_compute_when_ranks_share_cores_and_costs_the_attention_run(tmp_path, monkeypatch):
    """validate() against a measured file: 4 ranks on 2 cores take twice the compute of 4
    ranks on 4 cores; the freescale run's lowered (jagged) attention costs less than dense."""
    import functools
    import json

    from sim import validate as v

    # one capture serves the three runs
    monkeypatch.setattr(HSTUStep, "capture", staticmethod(functools.cache(HSTUStep.capture)))
    links = tmp_path / "links.json"
    links.write_text(json.dumps([{"world": 4, "all_to_all": [3e-4, 1e9], "all_reduce": [3e-4, 1e9]}]))
    measured = _measured_file(tmp_path, 4)
    kw = dict(batch_size=8, seed=0, dim=32, layers=1, heads=1, max_len=16, negatives=8)
    four = v.validate(4, measured, str(links), host_cores=4, **kw)
    two = v.validate(4, measured, str(links), host_cores=2, **kw)
    dense = v.validate(4, measured, str(links), host_cores=4, attention="dense", **kw)
    assert (four["compute_stretch"], two["compute_stretch"]) == (1.0, 2.0)
    assert two["simulated_compute_ms"] == pytest.approx(2 * four["simulated_compute_ms"], rel=1e-9)
    assert four["simulated_compute_ms"] < dense["simulated_compute_ms"]
    assert four["measured_step_ms"] == 40.0 and four["steps"] == [3, 4]
    assert four["step_ms_error"] == pytest.approx((four["simulated_step_ms"] - 40.0) / 40.0)
    with pytest.raises(ValueError, match="not --ranks 2"):
        v.validate(2, measured, str(links), **kw)
    piped = v.validate(4, measured, str(links), host_cores=4, pipelined=True, refetch=0.5, **kw)
    assert (piped["pipelined"], piped["refetch_fraction"], four["pipelined"]) == (True, 0.5, False)
    assert piped["simulated_compute_ms"] != four["simulated_compute_ms"]  # the refetch's gather, the buckets' copies
    assert four["measured_wait_ms"] == 6.0  # exposed + idle, however the meter splits them
    assert four["simulated_wait_ms"] == pytest.approx(four["simulated_exposed_comm_ms"] + four["simulated_idle_ms"])
