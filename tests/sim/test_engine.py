"""The simulator's engine on hand-computable steps."""

from __future__ import annotations

import numpy as np
import pytest

from sim.engine import Compute, Issue, SimulationError, Wait, simulate


def test_two_ranks_one_collective_exact_timeline():
    # rank 0 computes 1 s, rank 1 3 s; a 2 s collective starts when rank 1 issues it (t=3)
    ops = [Compute(name="a", seconds=np.array([1.0, 3.0])), Issue(name="c", group="g", seconds=2.0),
           Wait(name="w", collective="c"), Compute(name="b", seconds=1.0)]
    res = simulate(ops, 2)
    assert res.step_s == pytest.approx(6.0)
    np.testing.assert_allclose(res.compute_s, [2.0, 4.0])
    np.testing.assert_allclose(res.idle_s, [2.0, 0.0])
    np.testing.assert_allclose(res.exposed_s, [2.0, 2.0])
    assert res.bubble_fraction == pytest.approx(((6 - 2) / 6 + (6 - 4) / 6) / 2)
    spans = {(i.rank, i.track, round(i.start_s, 9), round(i.end_s, 9)) for i in res.trace()}
    assert spans == {(0, "compute", 0.0, 1.0), (0, "idle", 1.0, 3.0), (0, "communication", 3.0, 5.0),
                     (0, "compute", 5.0, 6.0), (1, "compute", 0.0, 3.0), (1, "communication", 3.0, 5.0),
                     (1, "compute", 5.0, 6.0)}
    for b in res.bubbles():
        assert b.compute_ms + b.exposed_comm_ms + b.idle_ms == pytest.approx(b.step_ms)


def test_collectives_on_one_group_serialize():
    ops = [Issue(name="a", group="g", seconds=2.0), Issue(name="b", group="g", seconds=3.0),
           Wait(name="wa", collective="a"), Wait(name="wb", collective="b")]
    res = simulate(ops, 2)
    ends = {c.name: c.end for c in res.collectives}
    assert ends == {"a": 2.0, "b": 5.0}
    assert res.step_s == 5.0


def test_collectives_on_two_groups_overlap():
    ops = [Issue(name="a", group="g", seconds=2.0), Issue(name="b", group="h", seconds=3.0),
           Wait(name="wa", collective="a"), Wait(name="wb", collective="b")]
    res = simulate(ops, 2)
    assert {c.name: c.end for c in res.collectives} == {"a": 2.0, "b": 3.0}
    assert res.step_s == 3.0


@pytest.mark.parametrize("sm_based, factor, end", [(True, 1.5, 2 + (3 - 2 / 1.5)), (False, 1.5, 3.0), (True, 1.0, 3.0)])
def test_contention_slows_compute_only_while_an_sm_collective_overlaps(sm_based, factor, end):
    # 3 s of work next to a 2 s collective: 2/1.5 s of work done by t=2, the rest at full speed
    ops = [Issue(name="c", group="g", seconds=2.0, sm_based=sm_based), Compute(name="x", seconds=3.0),
           Wait(name="w", collective="c"), Compute(name="y", seconds=1.0)]
    res = simulate(ops, 2, contention=factor)
    assert res.step_s == pytest.approx(end + 1.0)
    np.testing.assert_allclose(res.compute_s, [4.0, 4.0])
    np.testing.assert_allclose(res.contention_s, [end - 3.0] * 2, atol=1e-12)


def test_contention_spans_several_collectives_and_a_gap():
    # busy [0,1) then free [1,2) then busy [2,3): 2.5 s of work at factor 2
    ops = [Issue(name="a", group="g", seconds=1.0), Issue(name="gap", group="g", seconds=1.0, sm_based=False),
           Issue(name="b", group="g", seconds=1.0), Compute(name="x", seconds=2.5)]
    ops += [Wait(name=f"w{n}", collective=n) for n in ("a", "gap", "b")]
    res = simulate(ops, 1, contention=2.0)
    # work done: 0.5 by t=1, 1.5 by t=2, 2.0 by t=3, 2.5 at t=3.5
    assert res.step_s == pytest.approx(3.5)


def test_bad_steps_fail_naming_the_op():
    with pytest.raises(SimulationError, match="'missing'"):
        simulate([Wait(name="w", collective="missing")], 2)
    with pytest.raises(SimulationError, match="never waited"):
        simulate([Issue(name="c", group="g", seconds=1.0)], 2)
    with pytest.raises(SimulationError, match="issued twice"):
        simulate([Issue(name="c", group="g", seconds=1.0)] * 2, 2)
    with pytest.raises(SimulationError, match="'x'"):
        simulate([Compute(name="x", seconds=np.array([1.0, 2.0, 3.0]))], 2)
    with pytest.raises(SimulationError, match="contention"):
        simulate([], 2, contention=0.5)
    with pytest.raises(SimulationError, match="ranks"):
        simulate([], 0)


def test_a_rank_outside_a_collective_waits_only_for_its_own_queue():
    # "big" (every rank, 2 s) then "pair" (ranks 0 and 1, 1 s) on one group: rank 2's wait on
    # "pair" returns when its queue is free (t=2), the members' when the pair ends (t=3)
    ops = [Issue(name="big", group="g", seconds=2.0), Issue(name="pair", group="g", seconds=1.0, members=(0, 1)),
           Wait(name="w", collective="pair"), Wait(name="wb", collective="big")]
    res = simulate(ops, 3)
    np.testing.assert_allclose(res.exposed_s, [3.0, 3.0, 2.0])
    np.testing.assert_allclose(res.idle_s, [0.0, 0.0, 1.0])
    with pytest.raises(SimulationError, match="members"):
        simulate([Issue(name="c", group="g", seconds=1.0, members=(3,))], 3)


def test_contention_slows_only_the_members_of_a_partial_collective():
    ops = [Issue(name="c", group="g", seconds=2.0, members=(0,)), Compute(name="x", seconds=3.0),
           Wait(name="w", collective="c")]
    res = simulate(ops, 2, contention=2.0)
    np.testing.assert_allclose(res.contention_s, [1.0, 0.0])
