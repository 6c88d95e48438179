"""In-place ops and size queries in graphs with collectives (fsc/analysis/safety.py), on
hand-traced graphs: AOTAutograd's write-backs into graph inputs do not stop the
scheduling passes, writes into what a collective reads or returns do, the list scheduler
keeps every access to written storage on its side of the write, and a size query on an
all-to-all's result does not stop the SM-free swap (a data read still does:
tests/passes/test_sm_free_collectives.py). Values on real ranks:
tests/core/test_input_mutations.py."""

from __future__ import annotations

import operator

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fsc
from fsc.analysis.cost_model import DEVICE_PROFILES, CostModel
from fsc.analysis.list_schedule import list_schedule
from fsc.analysis.safety import memory_dependencies, reorder_blocker, storage_root
from fsc.passes import OverlapSchedule, PrioritizeCollectives, SplitCollectives
from fsc.passes.sm_free_collectives import FSC_ALL_TO_ALL, SmFreeCollectives

c10d = torch.ops._c10d_functional
aten = torch.ops.aten


def ctx() -> fsc.PassContext:
    return fsc.PassContext(graph_kind="forward", cost_model=CostModel(DEVICE_PROFILES["cpu"]), memory_budget_bytes=None)


def trace(f, *shapes):
    return make_fx(f, tracing_mode="fake")(*(torch.randn(*s) for s in shapes))


def node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def names(order) -> list[str]:
    return [n.name for n in order if n.op == "call_function"]


def counter_written_back(x, w, counter):
    """The shape of an FBGEMM-backed forward: the exchange, compute, and AOTAutograd's
    write-back of a mutated input (a bounds-check counter) at the end."""
    rows = c10d.wait_tensor(c10d.all_to_all_single(x, [2, 2], [2, 2], "g0"))
    dense = torch.mm(w, w)
    out = rows.sum() + dense.sum()
    counter.copy_(counter + 1)
    return out


def test_a_write_back_into_a_graph_input_does_not_block_reordering():
    gm = trace(counter_written_back, (4, 8), (64, 64), (1,))
    assert reorder_blocker(gm.graph, "not scheduled") is None
    result = OverlapSchedule(reorder_compute=False).run(gm, ctx())
    gm.graph.lint()
    assert result.modified is True and result.stats["waits_sunk"] == 1
    order = names(gm.graph.nodes)
    assert order.index("mm") < order.index("wait_tensor")  # the matmul now hides the exchange
    assert order[-1] == "copy_"  # the write-back is still the last access of the counter


def test_a_write_into_a_collective_input_blocks_reordering():
    def overwrite_input(x, w):
        pending = c10d.all_to_all_single(x, [2, 2], [2, 2], "g0")
        x.view(-1).add_(1)  # through a view: the same storage the exchange is reading
        return c10d.wait_tensor(pending).sum() + torch.mm(w, w).sum()

    gm = trace(overwrite_input, (4, 8), (64, 64))
    reason = reorder_blocker(gm.graph, "not scheduled")
    assert reason == ("not scheduled: in-place op aten.add_.Tensor (add_) writes x_1, which collective "
                      "all_to_all_single reads")
    result = OverlapSchedule().run(gm, ctx())
    assert result.modified is False and result.reasons == (reason,)


def test_a_write_into_a_collective_result_blocks_reordering():
    def overwrite_result(x, w):
        rows = c10d.wait_tensor(c10d.all_to_all_single(x, [2, 2], [2, 2], "g0"))
        rows.mul_(2)
        return rows.sum() + torch.mm(w, w).sum()

    gm = trace(overwrite_result, (4, 8), (64, 64))
    assert reorder_blocker(gm.graph, "not split") == (
        "not split: in-place op aten.mul_.Tensor (mul_) writes the result of collective all_to_all_single")
    assert storage_root(node(gm, "mul_")) is node(gm, "all_to_all_single")


def test_storage_roots_follow_views_splits_and_waits_but_not_fresh_results():
    def f(x):
        parts = torch.split(x.t(), 1)
        y = parts[1].relu()
        return c10d.wait_tensor(c10d.all_to_all_single(y, [1, 1], [1, 1], "g0")).view(-1)

    gm = trace(f, (8, 2))
    x = node(gm, "x_1")
    assert storage_root(node(gm, "getitem_1")) is x  # getitem of split of a transpose
    assert storage_root(node(gm, "relu")) is node(gm, "relu")
    assert storage_root(node(gm, "view")) is node(gm, "all_to_all_single")


def reader_waits_on_the_exchange(x, w, counter):
    """The counter is read by work that needs the exchange, and overwritten by work that
    does not: a scheduler that sees data edges only would run the write first."""
    rows = c10d.wait_tensor(c10d.all_to_all_single(x, [2, 2], [2, 2], "g0"))
    scaled = (rows * counter).sum()  # reads the counter's old value
    dense = torch.mm(w, w)
    counter.copy_(dense[0, :1])
    return scaled + dense.sum()


def test_memory_dependencies_order_every_access_around_the_write():
    gm = trace(reader_waits_on_the_exchange, (4, 8), (64, 64), (1,))
    pairs = {(a.name, b.name) for a, b in memory_dependencies(gm.graph)}
    assert pairs == {("mul", "copy_")}  # the reader of the old value; the slice is of dense, not counter


def test_list_schedule_keeps_a_read_before_the_write_that_follows_it(monkeypatch):
    gm = trace(reader_waits_on_the_exchange, (4, 8), (64, 64), (1,))
    order = names(list_schedule(gm.graph, CostModel(DEVICE_PROFILES["cpu"])))
    # the matmul overlaps the exchange, and the counter is read before it is overwritten
    assert order.index("all_to_all_single") < order.index("mm") < order.index("wait_tensor")
    assert order.index("mul") < order.index("copy_")
    # without the memory edges the scheduler runs the write first: the edge is what holds it
    monkeypatch.setattr("fsc.analysis.list_schedule.memory_dependencies", lambda graph: [])
    unconstrained = names(list_schedule(gm.graph, CostModel(DEVICE_PROFILES["cpu"])))
    assert unconstrained.index("copy_") < unconstrained.index("mul")


def test_every_reordering_pass_acts_on_a_graph_with_a_write_back():
    def two_exchanges(x, y, w, counter):
        a = c10d.all_to_all_single(x, [2, 2], [2, 2], "g0")
        b = c10d.all_to_all_single(y, [2, 2], [2, 2], "g0")
        first = (c10d.wait_tensor(b) @ w).sum()  # the second exchange is needed first
        dense = torch.mm(w, w)
        second = (c10d.wait_tensor(a) * counter).sum()  # reads the counter before it is overwritten
        counter.copy_(dense[0, :1])
        return first + second + dense.sum()

    for pass_ in (PrioritizeCollectives(), SplitCollectives(min_bytes=0, force=True), OverlapSchedule()):
        gm = trace(two_exchanges, (4, 64), (4, 64), (64, 64), (1,))
        kept = [(a.name, b.name) for a, b in memory_dependencies(gm.graph)]
        assert ("mul", "copy_") in kept
        result = pass_.run(gm, ctx())
        gm.graph.lint()
        assert not any("in-place" in r for r in result.reasons), (pass_.name, result.reasons)
        assert result.modified is True, (pass_.name, result.reasons)
        # every access to the counter (split-collectives copies the multiply per chunk) still
        # precedes the write: none follows it
        after = memory_dependencies(gm.graph)
        assert after and all(b.name == "copy_" for _, b in after), (pass_.name, names(gm.graph.nodes))


def exchange_with_size_query(x, w):
    pending = c10d.all_to_all_single(x, [3, 5], [4, 4], "g0")
    h = x @ w
    return c10d.wait_tensor(pending).sum() + h.sum()


def add_size_query(gm, dim: int):
    """A ``sym_size`` of the all-to-all's result, before its wait, feeding the output: what
    TorchRec's output exchanges carry in their graphs."""
    coll = next(n for n in gm.graph.nodes if n.target is c10d.all_to_all_single.default)
    with gm.graph.inserting_after(coll):
        query = gm.graph.call_function(aten.sym_size.int, (coll, dim))
    query.meta["val"] = coll.meta["val"].shape[dim]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0], query),)
    gm.recompile()
    return query


def test_sm_free_swap_computes_a_size_query_from_the_split_sizes():
    for dim, normalized, expected in ((0, 0, 8), (-1, 1, 16), (1, 1, 16)):
        gm = trace(exchange_with_size_query, (8, 16), (16, 16))
        add_size_query(gm, dim)
        result = SmFreeCollectives().run(gm, ctx())
        gm.graph.lint()
        assert result.modified is True, result.reasons
        assert FSC_ALL_TO_ALL in [n.target for n in gm.graph.nodes]
        assert c10d.all_to_all_single.default not in [n.target for n in gm.graph.nodes]
        size = next(n for n in gm.graph.nodes if n.op == "output").args[0][1]
        if dim == 0:  # 3 + 5 rows come back, whatever the input's 8 rows were
            assert size.target is operator.add and size.args == (3, 5)
        else:
            assert size.target is aten.sym_size.int and size.args == (node(gm, "x_1"), normalized)
        assert size.meta["val"] == expected
