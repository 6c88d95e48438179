"""prioritize-collectives on hand-traced graphs (no process group needed)."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fsc
from fsc.analysis.collectives import group_order
from fsc.analysis.cost_model import DEVICE_PROFILES, CostModel
from fsc.passes import PrioritizeCollectives

c10d = torch.ops._c10d_functional


def ctx() -> fsc.PassContext:
    return fsc.PassContext(graph_kind="forward", cost_model=CostModel(DEVICE_PROFILES["cpu"]), memory_budget_bytes=None)


def exchange(t, group="g0"):
    return c10d.wait_tensor(c10d.all_to_all_single(t, [32, 32], [32, 32], group))


def late_then_urgent(x, y, w):
    a = torch.relu(x)
    b = torch.relu(y)
    late = exchange(a)  # issued first, but only needed at the very end
    urgent = exchange(b)  # issued second, needed at once by a long chain
    h = urgent @ w
    for _ in range(4):
        h = h @ w
    return h.sum() + late.sum()


def trace(f, *shapes):
    return make_fx(f, tracing_mode="fake")(*(torch.randn(*s) for s in shapes))


def test_prioritize_collectives_issues_the_urgent_exchange_first():
    gm = trace(late_then_urgent, (64, 64), (64, 64), (64, 64))
    records = fsc.PassManager([PrioritizeCollectives()]).run(gm, ctx())  # checks determinism too
    assert records[0].modified is True
    assert records[0].stats["reordered"] == 1
    assert group_order(gm.graph) == {"g0": ["all_to_all_single_1", "all_to_all_single"]}


def test_prioritize_collectives_keeps_order_when_the_earlier_is_more_urgent():
    def urgent_then_late(x, y, w):
        a, b = torch.relu(x), torch.relu(y)
        urgent = exchange(a)
        late = exchange(b)
        h = urgent @ w
        for _ in range(4):
            h = h @ w
        return h.sum() + late.sum()

    gm = trace(urgent_then_late, (64, 64), (64, 64), (64, 64))
    result = PrioritizeCollectives().run(gm, ctx())
    assert result.modified is False
    assert result.stats["reordered"] == 0
    assert result.reasons == ("group 'g0': its 2 collectives are already issued most urgent first",)


def test_prioritize_collectives_never_moves_a_collective_above_what_it_reads():
    def dependent(x, w):
        first = exchange(torch.relu(x))  # needed late
        second = exchange(first * 2)  # reads the first's result: cannot go before it
        h = second @ w
        for _ in range(4):
            h = h @ w
        return h.sum() + first.sum()

    gm = trace(dependent, (64, 64), (64, 64))
    result = PrioritizeCollectives().run(gm, ctx())
    assert result.modified is False
    # the first is needed as soon as the second, which reads it: the steps of one exchange
    assert result.reasons == ("group 'g0': its 2 collectives are already issued most urgent first",)
    gm.graph.lint()


def test_prioritize_collectives_says_why_an_urgent_exchange_stays_behind():
    def computed_late(x, y, w):
        late = exchange(torch.relu(x))
        b = torch.relu(y)  # traced after the first exchange is issued
        urgent = exchange(b)
        h = urgent @ w
        for _ in range(4):
            h = h @ w
        return h.sum() + late.sum()

    gm = trace(computed_late, (64, 64), (64, 64), (64, 64))
    result = PrioritizeCollectives().run(gm, ctx())
    assert result.modified is False
    assert result.reasons == ("group 'g0': all_to_all_single_1 is needed before all_to_all_single but stays after "
                              "it: its input relu_1 is computed after all_to_all_single (overlap-schedule may move it)",)
    gm.graph.lint()


def test_prioritize_collectives_leaves_other_groups_alone():
    def two_groups(x, y, w):
        late = exchange(torch.relu(x), "g0")
        urgent = exchange(torch.relu(y), "g1")
        h = urgent @ w
        return h.sum() + late.sum()

    gm = trace(two_groups, (64, 64), (64, 64), (64, 64))
    result = PrioritizeCollectives().run(gm, ctx())
    assert result.modified is False
    assert result.reasons == ("no process group has two collectives to order",)


def test_prioritize_collectives_declines_graph_without_collectives():
    gm = trace(lambda a: a.relu(), (4, 4))
    result = PrioritizeCollectives().run(gm, ctx())
    assert result.modified is False and result.reasons == ("no collectives in the graph",)


def test_prioritize_collectives_declines_in_place_ops_with_reason():
    def mutating(x, y, w):
        a, b = torch.relu(x), torch.relu(y)
        late = exchange(a)
        b.add_(1)  # moving the urgent exchange above this would send the old values
        urgent = exchange(b)
        h = urgent @ w
        for _ in range(4):
            h = h @ w
        return h.sum() + late.sum()

    gm = trace(mutating, (64, 64), (64, 64), (64, 64))
    result = PrioritizeCollectives().run(gm, ctx())
    assert result.modified is False
    assert result.reasons[0].startswith("not prioritized: in-place op aten.add_.Tensor")
