"""overlap-schedule on hand-traced graphs: no process group needed (the functional
collective ops trace under fake tensors with a made-up group name)."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fsc
from fsc.analysis.cost_model import DEVICE_PROFILES, CostModel
from fsc.analysis.timeline import estimate_timeline, peak_memory
from fsc.passes import OverlapSchedule

c10d = torch.ops._c10d_functional


def moves(**options) -> OverlapSchedule:
    """The pass limited to its *moves* candidate (collectives up, waits down, compute fixed)."""
    return OverlapSchedule(reorder_compute=False, **options)


def ctx(budget: float | None = None) -> fsc.PassContext:
    return fsc.PassContext(
        graph_kind="forward", cost_model=CostModel(DEVICE_PROFILES["cpu"]), memory_budget_bytes=budget
    )


def trace(f, *shapes):
    return make_fx(f, tracing_mode="fake")(*(torch.randn(*s) for s in shapes))


def order(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function"]


def exchange_then_dense(x, w, v):
    y = c10d.wait_tensor(c10d.all_to_all_single(x, [2, 2], [2, 2], "g0"))
    z = torch.mm(w, v)
    return y.view(-1).sum() + z.sum()


def test_overlap_schedule_moves_wait_past_independent_matmul():
    gm = trace(exchange_then_dense, (4, 8), (64, 64), (64, 64))
    result = moves().run(gm, ctx())
    gm.graph.lint()
    assert result.modified is True
    assert result.stats["waits_sunk"] == 1
    # golden order: issue, independent compute, wait (with its view), consumers
    assert order(gm) == ["all_to_all_single", "mm", "wait_tensor", "view", "sum_1", "sum_2", "add"]
    assert result.stats["exposed_comm_ms_after"] < result.stats["exposed_comm_ms_before"]


def dense_then_exchange(x, w, v):
    h = torch.relu(x)  # the collective's input is ready here
    z = torch.mm(w, v)  # independent, traced before the collective
    y = c10d.wait_tensor(c10d.all_to_all_single(h, [2, 2], [2, 2], "g0"))
    return y.sum() + z.sum()


def test_overlap_schedule_issues_all_to_all_before_independent_matmul():
    gm = trace(dense_then_exchange, (4, 8), (64, 64), (64, 64))
    result = moves().run(gm, ctx())
    assert result.stats["collectives_raised"] == 1
    names = order(gm)
    assert names.index("relu") < names.index("all_to_all_single") < names.index("mm") < names.index("wait_tensor")


def test_overlap_schedule_only_moves_nodes():
    # Values are checked on real collectives in test_overlap_schedule_properties.py.
    gm = trace(dense_then_exchange, (4, 8), (64, 64), (64, 64))
    before = {n.name: (n.target, n.args) for n in gm.graph.nodes}
    result = OverlapSchedule().run(gm, ctx())
    assert result.modified is True and result.stats["inserted"] == result.stats["erased"] == 0
    assert {n.name: (n.target, n.args) for n in gm.graph.nodes} == before


def test_overlap_schedule_declines_graph_without_collectives():
    gm = trace(lambda a, b: torch.mm(a, b).relu(), (4, 4), (4, 4))
    code = gm.code
    result = OverlapSchedule().run(gm, ctx())
    assert result.modified is False
    assert result.reasons == ("no collectives in the graph",)
    assert gm.code == code


def test_overlap_schedule_leaves_already_optimal_graph_unmodified():
    gm = trace(exchange_then_dense, (4, 8), (64, 64), (64, 64))
    OverlapSchedule().run(gm, ctx())
    gm.recompile()
    again = OverlapSchedule().run(gm, ctx())
    assert again.modified is False
    assert again.stats["moved"] == 0


def test_overlap_schedule_declines_in_place_ops_on_what_a_collective_reads():
    # (in-place ops on other storage are allowed: tests/passes/test_mutation_safety.py)
    def f(x, w):
        y = c10d.wait_tensor(c10d.all_to_all_single(x, [2, 2], [2, 2], "g0"))
        x.add_(1)
        return y.sum() + w.sum()

    gm = make_fx(f, tracing_mode="fake")(torch.randn(4, 8), torch.randn(4, 4))
    code = gm.code
    result = OverlapSchedule().run(gm, ctx())
    assert result.modified is False
    assert "in-place op" in result.reasons[0] and "add_" in result.reasons[0]
    assert gm.code == code


def test_overlap_schedule_declines_opaque_collectives():
    def f(x):
        y = c10d.wait_tensor(c10d.all_to_all_single(x, [2, 2], [2, 2], "g0"))
        (b,) = c10d.all_gather_into_tensor_coalesced([x], 2, "g0")
        return y.sum() + c10d.wait_tensor(b).sum()

    gm = make_fx(f, tracing_mode="fake")(torch.randn(4, 8))
    result = OverlapSchedule().run(gm, ctx())
    assert result.modified is False
    assert "all_gather_into_tensor_coalesced" in result.reasons[0]


def test_overlap_schedule_keeps_per_group_issue_order():
    def f(a, b, w):
        # b's collective is ready first, but a's was issued first on the same group
        ha = torch.mm(w, w) @ a
        hb = torch.relu(b)
        ya = c10d.wait_tensor(c10d.all_to_all_single(ha, [32, 32], [32, 32], "g0"))
        yb = c10d.wait_tensor(c10d.all_to_all_single(hb, [32, 32], [32, 32], "g0"))
        return ya.sum() + yb.sum()

    gm = trace(f, (64, 64), (64, 64), (64, 64))
    OverlapSchedule().run(gm, ctx())
    names = order(gm)
    assert names.index("all_to_all_single") < names.index("all_to_all_single_1")


def big_buffers(x, w):
    big = torch.relu(x)  # 4 MiB, ready at once
    h = torch.mm(w, w)  # 4 MiB temporaries: live together with an early-issued result
    h = torch.mm(h, w)
    y = c10d.wait_tensor(c10d.all_to_all_single(big, [512, 512], [512, 512], "g0"))
    return y.sum() + h.sum()


def test_overlap_schedule_respects_memory_budget_with_reason():
    unlimited = trace(big_buffers, (1024, 1024), (1024, 1024))
    moves(sink_waits=False).run(unlimited, ctx())
    raised_peak = peak_memory(unlimited.graph)
    baseline = trace(big_buffers, (1024, 1024), (1024, 1024))
    base_peak = peak_memory(baseline.graph)
    assert raised_peak > base_peak  # issuing early holds the output buffer longer

    gm = trace(big_buffers, (1024, 1024), (1024, 1024))
    result = moves(sink_waits=False).run(gm, ctx(budget=base_peak))
    assert result.stats["collectives_raised"] == 0
    assert "over the budget" in result.reasons[0]
    assert peak_memory(gm.graph) <= base_peak
    assert result.modified is False


def test_overlap_schedule_pass_option_overrides_compile_budget():
    gm = trace(big_buffers, (1024, 1024), (1024, 1024))
    result = moves(memory_budget_gb=1e-9, sink_waits=False).run(gm, ctx(budget=None))
    assert result.stats["collectives_raised"] == 0
    assert result.reasons


def test_overlap_schedule_never_moves_above_placeholders():
    def f(x, w):
        y = c10d.wait_tensor(c10d.all_to_all_single(x, [2, 2], [2, 2], "g0"))
        return y.sum() + torch.mm(w, w).sum()

    gm = trace(f, (4, 8), (8, 8))
    OverlapSchedule().run(gm, ctx())
    kinds = [n.op for n in gm.graph.nodes]
    assert kinds[: kinds.count("placeholder")] == ["placeholder"] * kinds.count("placeholder")


@pytest.mark.parametrize("f", [exchange_then_dense, dense_then_exchange])
def test_overlap_schedule_never_increases_estimated_makespan(f):
    gm = trace(f, (4, 8), (64, 64), (64, 64))
    model = CostModel(DEVICE_PROFILES["h100"])
    before = estimate_timeline(gm.graph, model).makespan
    OverlapSchedule().run(gm, fsc.PassContext(graph_kind="forward", cost_model=model, memory_budget_bytes=None))
    assert estimate_timeline(gm.graph, model).makespan <= before


def test_overlap_schedule_raises_collective_through_its_input_views():
    def f(x, w):
        h = torch.relu(x)
        z = torch.mm(w, w)  # independent compute the collective can hide behind
        rows = h.view(8, 4)  # traced late, right before the collective, as AOT does
        y = c10d.wait_tensor(c10d.all_to_all_single(rows, [4, 4], [4, 4], "g0"))
        return y.sum() + z.sum()

    gm = trace(f, (4, 8), (64, 64))
    result = moves().run(gm, ctx())
    assert result.stats["collectives_raised"] == 1
    assert order(gm)[:4] == ["relu", "view", "all_to_all_single", "mm"]


def test_overlap_schedule_does_not_count_a_collective_already_issued_at_its_inputs():
    def f(x, w):
        z = torch.mm(w, w)
        h = torch.relu(x)  # produced right before the collective
        y = c10d.wait_tensor(c10d.all_to_all_single(h.view(8, 4), [4, 4], [4, 4], "g0"))
        return y.sum() + z.sum()

    gm = trace(f, (4, 8), (64, 64))
    result = moves(sink_waits=False).run(gm, ctx())
    assert result.stats["collectives_raised"] == 0
    assert result.modified is False


def test_overlap_schedule_budget_decision_is_the_same_whatever_the_size_hints():
    # Two "ranks" trace the same program with different first batches (hints): under a
    # memory budget they must still choose the same order.
    def f(x, x2, w):
        big = torch.relu(x)
        h = torch.mm(x2, w)  # temporaries as long as the batch: raising costs memory
        h = torch.mm(h, w)
        half = big.shape[0] // 2
        y = c10d.wait_tensor(c10d.all_to_all_single(big, [half, half], [half, half], "g0"))
        return y.sum() + h.sum()

    orders = []
    for rows in (16, 2048):  # with the hints, 16 rows would fit 1 MiB and 2048 would not
        gm = make_fx(f, tracing_mode="symbolic")(torch.randn(rows, 64), torch.randn(rows, 64), torch.randn(64, 64))
        moves(sink_waits=False).run(gm, ctx(budget=2**20))
        orders.append(order(gm))
    assert orders[0] == orders[1]


def dense_then_producer(x, w, v):
    z = torch.mm(w, v)  # independent dense work, traced first ("dense first")
    z = torch.mm(z, v)
    h = torch.relu(x)  # the collective's producer comes after it in program order
    y = c10d.wait_tensor(c10d.all_to_all_single(h, [2, 2], [2, 2], "g0"))
    return y.sum() + z.sum()


def test_list_schedule_moves_producers_earlier_to_overlap_dense_first_programs():
    gm = trace(dense_then_producer, (4, 8), (64, 64), (64, 64))
    fixed = trace(dense_then_producer, (4, 8), (64, 64), (64, 64))
    moves().run(fixed, ctx())
    result = OverlapSchedule().run(gm, ctx())
    assert result.stats["strategy"] == "list"
    names = order(gm)
    assert names.index("relu") < names.index("all_to_all_single") < names.index("mm") < names.index("wait_tensor")
    model = ctx().cost_model
    assert estimate_timeline(gm.graph, model).exposed_communication < estimate_timeline(fixed.graph, model).exposed_communication


def test_list_schedule_keeps_random_ops_in_program_order():
    def f(x, w):
        d1 = torch.rand_like(w)  # first draw: not needed by the collective
        h = x * torch.rand_like(x)  # second draw feeds the collective
        y = c10d.wait_tensor(c10d.all_to_all_single(h, [2, 2], [2, 2], "g0"))
        return y.sum() + torch.mm(d1, w).sum()

    gm = trace(f, (4, 8), (64, 64))
    OverlapSchedule().run(gm, ctx())
    names = order(gm)
    assert names.index("rand_like") < names.index("rand_like_1")
    assert names.index("all_to_all_single") < names.index("mm")


def test_list_schedule_is_declined_over_budget_with_reason():
    gm = trace(big_buffers, (1024, 1024), (1024, 1024))
    base_peak = peak_memory(gm.graph)
    result = OverlapSchedule().run(gm, ctx(budget=base_peak))
    assert peak_memory(gm.graph) <= base_peak
    assert any("over the budget" in r for r in result.reasons)


def exchange_beside_two_matmuls(x, w):
    y = c10d.wait_tensor(c10d.all_to_all_single(x, [2, 2], [2, 2], "g0"))
    a = torch.mm(w, w)
    b = torch.mm(a, w)
    return y.sum() + b.sum()


def test_list_schedule_defers_a_wait_no_collective_needs_past_independent_compute():
    from fsc.analysis.list_schedule import list_schedule

    gm = trace(exchange_beside_two_matmuls, (4, 8), (512, 512))
    model = ctx().cost_model
    comm = model.node_cost(next(n for n in gm.graph.nodes if n.name == "all_to_all_single")).seconds
    assert model.node_cost(next(n for n in gm.graph.nodes if n.name == "mm")).seconds > comm
    # By the estimate the exchange is over after the first matmul; the wait still goes
    # after every piece of independent work (the estimate may be wrong, waiting early never helps).
    names = [n.name for n in list_schedule(gm.graph, model) if n.op == "call_function"]
    assert names.index("all_to_all_single") < names.index("mm") < names.index("mm_1") < names.index("wait_tensor")


def chained_exchanges_beside_quadratic_work(x, pos):
    # an exchange whose result feeds a second one; independent work quadratic in the
    # (dynamic) token count, like HSTU's relative-position masks
    n = x.shape[0]
    a = c10d.wait_tensor(c10d.all_to_all_single(x, [n // 2, n // 2], [n // 2, n // 2], "g0"))
    b = c10d.wait_tensor(c10d.all_to_all_single(torch.relu(a), [n // 2, n // 2], [n // 2, n // 2], "g0"))
    mask = (pos.unsqueeze(0) - pos.unsqueeze(1)).abs().clamp(max=64).float().exp().log1p()
    return b.sum() + mask.sum()


@pytest.mark.parametrize("tokens", [64, 512, 4096])
def test_overlap_schedule_planning_over_sizes_gives_the_same_order_whatever_the_size_hints(tokens):
    # Every rank must pick the same order whatever its first batch (hint), although the
    # pass now plans and compares candidates at several sizes.
    gm = make_fx(chained_exchanges_beside_quadratic_work, tracing_mode="symbolic")(
        torch.randn(tokens, 64), torch.randn(tokens))
    result = OverlapSchedule().run(gm, ctx())
    assert result.modified is True
    reference = make_fx(chained_exchanges_beside_quadratic_work, tracing_mode="symbolic")(
        torch.randn(64, 64), torch.randn(64))
    OverlapSchedule().run(reference, ctx())
    assert order(gm) == order(reference)
    names = order(gm)
    # the chain's first window is filled with independent (quadratic) work
    first_window = names[names.index("all_to_all_single"):names.index("wait_tensor")]
    assert any(n.startswith(("sub", "abs", "clamp", "exp")) for n in first_window), names
