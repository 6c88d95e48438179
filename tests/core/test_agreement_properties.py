"""Property test of the agreement on random graphs: several independent all-to-alls whose
downstream work, and so the order prioritize-collectives and overlap-schedule choose, may
depend on per-rank static sizes. Each simulated rank traces the program with its own sizes
and runs the passes as the backend does; then each rank decides from every rank's payload.
Whatever the sizes, either the ranks' fingerprints are equal and every rank runs, or every
rank raises AgreementError naming the first differing collective: never a silent mismatch.
Traced for real on a one-rank gloo group in this process."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

import fsc
from fsc import agreement, invariants
from fsc.analysis.cost_model import DEVICE_PROFILES, CostModel
from fsc.passes import OverlapSchedule, PrioritizeCollectives

c10d = torch.ops._c10d_functional


@pytest.fixture(scope="module")
def group(one_rank_group):
    return one_rank_group


def program(group: str, depths: list[int]):
    """One exchange per entry of ``depths``: exchange k's result is scaled by a context
    tensor (whose length is a per-rank size) and then goes through ``depths[k]`` matmuls."""

    def f(w, *inputs):
        exchanges, contexts = inputs[:len(depths)], inputs[len(depths):]
        total = w.sum()
        for x, ctx, depth in zip(exchanges, contexts, depths):
            half = x.shape[0] // 2
            y = c10d.wait_tensor(c10d.all_to_all_single(x, [half, half], [half, half], group))
            h = ctx * y.sum(0)
            for _ in range(depth):
                h = torch.tanh(h @ w)
            total = total + h.sum()
        return total

    return f


def rank_payload(rank: int, group: str, depths: list[int], lengths: list[int]) -> agreement.Payload:
    inputs = [torch.randn(16, 16)] + [torch.randn(8, 16) for _ in depths] + [torch.randn(n, 16) for n in lengths]
    gm = make_fx(program(group, depths), tracing_mode="fake")(*inputs)
    invariants.stamp_collective_ids(gm.graph)
    before = agreement.fingerprint(gm.graph)
    ctx = fsc.PassContext(graph_kind="forward", cost_model=CostModel(DEVICE_PROFILES["h100"]), memory_budget_bytes=None)
    fsc.PassManager([PrioritizeCollectives(), OverlapSchedule()]).run(gm, ctx)
    return agreement.Payload(rank=rank, rewritten=agreement.fingerprint(gm.graph), unrewritten=before,
                             shapes=agreement.input_shapes(gm.graph), pipeline="prioritize-collectives,overlap-schedule")


@pytest.mark.slow  # 25 examples of 2-3 traced ranks, about 6 s on 2 cores; the next test is the fast case
@settings(max_examples=25, deadline=None)
@given(depths=st.lists(st.integers(0, 3), min_size=2, max_size=4),
       sizes=st.lists(st.lists(st.sampled_from([1, 2, 64, 4096, 65536]), min_size=4, max_size=4),
                      min_size=2, max_size=3))
def test_ranks_with_any_sizes_agree_on_equal_fingerprints_or_all_raise(group, depths, sizes):
    payloads = {r: rank_payload(r, group, depths, lengths[:len(depths)]) for r, lengths in enumerate(sizes)}
    fingerprints = [p.rewritten for p in payloads.values()]
    for p in payloads.values():  # the passes keep every collective, on every rank
        assert sorted(p.rewritten[group]) == sorted(p.unrewritten[group])
    outcomes = {}
    for me in payloads:
        try:
            agreement.decide("graph", me, payloads)
            outcomes[me] = None
        except fsc.AgreementError as exc:
            outcomes[me] = str(exc)
    if all(fp == fingerprints[0] for fp in fingerprints):
        assert all(o is None for o in outcomes.values()), outcomes
    else:
        assert all(o is not None and "first difference: collective #" in o for o in outcomes.values()), outcomes
        assert all("different input shapes" in o for o in outcomes.values()), outcomes


def test_per_rank_sizes_can_change_the_order_and_then_every_rank_raises(group):
    payloads = {0: rank_payload(0, group, [1, 1], [1, 65536]), 1: rank_payload(1, group, [1, 1], [65536, 1])}
    assert payloads[0].rewritten != payloads[1].rewritten  # the case the property test must cover
    for me in payloads:
        with pytest.raises(fsc.AgreementError, match="collective #0"):
            agreement.decide("graph", me, payloads)


def test_a_fallback_on_one_rank_makes_the_others_fall_back_and_a_commitment_binds_the_late_rank():
    rewritten = {"g": ["b: all_to_all_single via group collective, float32, 2 splits",
                       "a: all_to_all_single via group collective, float32, 2 splits"]}
    unrewritten = {"g": list(reversed(rewritten["g"]))}
    ok = agreement.Payload(rank=0, rewritten=rewritten, unrewritten=unrewritten)
    failed = agreement.Payload(rank=1, rewritten=None, unrewritten=unrewritten, fallback="pass 'x' failed")
    for me in (0, 1):  # the group falls back: rank 1 is unrewritten already, rank 0 joins it
        assert agreement.decide("graph", me, {0: ok, 1: failed}).fall_back
    assert "rank 1 could not rewrite it (pass 'x' failed)" in agreement.decide("graph", 0, {0: ok, 1: failed}).why
    # rank 0 had committed to its rewritten form (it accepted rank 1's earlier compile): rank 1's
    # fallback cannot match it, and both say so
    for me in (0, 1):
        with pytest.raises(fsc.AgreementError, match="rank 1 fell back"):
            agreement.decide("graph", me, {0: ok, 1: failed}, committed={0: rewritten})
    same = agreement.Payload(rank=1, rewritten=None, unrewritten=rewritten, fallback="pass 'x' failed")
    assert not agreement.decide("graph", 0, {0: ok, 1: same}, committed={0: rewritten}).fall_back
