"""The simulated HSTU step from the example's real compiled graphs (a tiny configuration)."""

from __future__ import annotations

import numpy as np
import pytest

from sim.ablation import Setting, ablation
from sim.engine import Issue
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


def test_blocking_order_waits_right_after_every_issue(step):
    ranks = step.ranks([np.array([10, 20])] * 2)
    ops = step.ops(ranks, Topology.of(2, "h100"), overlap=False, sm_free=False)
    for i, op in enumerate(ops):
        if isinstance(op, Issue) and not op.name.startswith("grad_allreduce"):
            assert ops[i + 1].collective == op.name
    assert sum(isinstance(op, Issue) for op in ops) >= 6  # 4 exchanges, gradients, 2 tiny all-reduces


def test_ablation_is_deterministic_and_all_beats_baseline(step):
    setting = Setting(ranks=16, steps=2, seed=5)
    dist = LengthDistribution.lognormal(40, 1.0)
    rows, _, _ = ablation(step, setting, dist)
    again, _, _ = ablation(step, setting, dist)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("sim_seconds", "loadavg")} for r in rs]
    assert strip(rows) == strip(again)
    by = {r["config"]: r for r in rows}
    assert set(by) == {"baseline", "lb", "overlap", "sm-free", "all", "lb-split", "all-split"}
    assert all(by[c]["split_samples"] == by[c]["kv_gb"] == 0 for c in ("baseline", "lb", "all"))
    assert by["all-split"]["split_samples"] == by["lb-split"]["split_samples"]
    assert (by["all-split"]["kv_gb"] > 0) == (by["all-split"]["split_samples"] > 0)
    assert by["all"]["bubble_fraction"] < by["baseline"]["bubble_fraction"]
    assert by["lb"]["idle_ms"] < by["baseline"]["idle_ms"]
    other, _, _ = ablation(step, Setting(ranks=16, steps=2, seed=6), dist, ("baseline",))
    assert other[0]["bubble_fraction"] != by["baseline"]["bubble_fraction"]


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
