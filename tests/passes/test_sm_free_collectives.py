"""sm-free-collectives on hand-traced graphs (no process group needed)."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fsc
from fsc.analysis.cost_model import DEVICE_PROFILES, CostModel
from fsc.passes import REGISTRY
from fsc.passes.sm_free_collectives import FSC_ALL_TO_ALL, FSC_WAIT, SmFreeCollectives

c10d = torch.ops._c10d_functional


def ctx() -> fsc.PassContext:
    return fsc.PassContext(graph_kind="forward", cost_model=CostModel(DEVICE_PROFILES["cpu"]), memory_budget_bytes=None)


def overlapped(x, w):
    pending = c10d.all_to_all_single(torch.relu(x), [48, 16], [32, 32], "g0")
    h = x @ w  # computes while the exchange is in flight
    return c10d.wait_tensor(pending).sum() + h.sum()


def back_to_back(x, w):
    rows = c10d.wait_tensor(c10d.all_to_all_single(torch.relu(x), [32, 32], [32, 32], "g0"))
    return (rows @ w).sum()


def trace(f, *shapes, device="cpu"):
    return make_fx(f, tracing_mode="fake")(*(torch.randn(*s, device=device) for s in shapes))


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def run(gm, **options):
    return fsc.PassManager([SmFreeCollectives(**options)]).run(gm, ctx())[0]


def test_sm_free_collectives_swaps_an_all_to_all_that_overlaps_compute():
    gm = trace(overlapped, (64, 64), (64, 64))
    record = run(gm)
    assert record.modified is True
    assert record.stats["swapped"] == 1 and record.stats["collectives"] == 1
    assert c10d.all_to_all_single.default not in targets(gm) and c10d.wait_tensor.default not in targets(gm)
    swapped = next(n for n in gm.graph.nodes if n.target is FSC_ALL_TO_ALL)
    assert swapped.args[1:] == ([48, 16], [32, 32], "g0")
    handle = swapped.meta["val"]
    assert (handle.shape, handle.dtype, handle.device.type) == ((1,), torch.int64, "cpu")
    assert swapped.meta["fsc_collective_id"] == "all_to_all_single"
    wait = next(n for n in gm.graph.nodes if n.target is FSC_WAIT)
    assert wait.args == (swapped, *swapped.args)  # the wait restates the all-to-all
    assert wait.meta["val"].shape == (64, 64)
    gm.graph.lint()
    code = gm.code
    assert "fsc.all_to_all_single.default(relu, [48, 16], [32, 32], 'g0')" in code
    assert "fsc.wait_tensor.default(all_to_all_single_default, relu, [48, 16], [32, 32], 'g0')" in code
    assert code.index("fsc.all_to_all_single") < code.index("aten.mm") < code.index("fsc.wait_tensor")


def test_sm_free_collectives_declines_a_wait_that_follows_at_once_unless_swap_all():
    gm = trace(back_to_back, (64, 64), (64, 64))
    record = run(gm)
    assert record.modified is False
    assert record.reasons == (
        "all_to_all_single 'all_to_all_single' not swapped: nothing computes while it is in flight (its wait "
        "follows at once); schedule it with overlap-schedule first, or set swap_all=true",
    )
    record = run(gm, swap_all=True)
    assert record.modified is True and record.stats["swapped"] == 1


def test_sm_free_collectives_declines_all_gather_and_reduce_scatter():
    def gather_scatter(x, w):
        g = c10d.all_gather_into_tensor(x, 2, "g0")
        s = c10d.reduce_scatter_tensor(x, "sum", 2, "g0")
        h = x @ w
        return c10d.wait_tensor(g).sum() + c10d.wait_tensor(s).sum() + h.sum()

    gm = trace(gather_scatter, (64, 64), (64, 64))
    record = run(gm, swap_all=True)
    assert record.modified is False
    assert [r.split(" not swapped: ")[1] for r in record.reasons] == [
        "the copy-engine transports implement all_to_all_single only (and all_reduce through it)"] * 2


def test_sm_free_collectives_swaps_an_all_reduce_for_two_all_to_alls_and_a_sum(monkeypatch):
    import fsc.passes.sm_free_collectives as module

    def reduced(x, w):
        first = c10d.all_reduce(torch.relu(x), "sum", "g0")
        second = c10d.all_reduce(x * 2, "avg", "g0")
        h = (x @ w) @ w
        return c10d.wait_tensor(first).sum() + c10d.wait_tensor(second).sum() + h.sum()

    gm = trace(reduced, (7, 5), (5, 5))
    record = run(gm)  # no process group 'g0' here: its size is unknown
    assert record.modified is False
    assert record.reasons[0].endswith("the size of group 'g0' is unknown here (no such process group)")
    monkeypatch.setattr(module, "_group_size", lambda name: 4)
    record = run(gm)
    assert record.stats["swapped"] == 2
    gm.graph.lint()
    assert c10d.all_reduce.default not in targets(gm) and c10d.wait_tensor.default not in targets(gm)
    calls = [n for n in gm.graph.nodes if n.target in (FSC_ALL_TO_ALL, FSC_WAIT, torch.ops.aten.sum.dim_IntList,
                                                         torch.ops.aten.div.Scalar, torch.ops.aten.mm.default)]
    names = [("a2a" if n.target is FSC_ALL_TO_ALL else "wait" if n.target is FSC_WAIT else n.target.__name__)
             for n in calls]
    # 35 values in 4 shards of 9 (one padding zero); the first's middle sits before the
    # second's issue (the second is needed later: its wait comes after the first's sum), the
    # second's halfway to its wait
    assert names == ["a2a", "wait", "sum.dim_IntList", "a2a", "a2a", "mm.default", "wait", "sum.dim_IntList",
                     "div.Scalar", "a2a", "mm.default", "wait", "wait"], names
    for n in calls:
        if n.target is FSC_ALL_TO_ALL:
            assert n.args[0].meta["val"].shape == (4, 9) and n.args[1:] == ([1] * 4, [1] * 4, "g0")
    assert [n.meta["fsc_collective_id"] for n in calls if n.target is FSC_ALL_TO_ALL] == [
        "all_reduce.scatter", "all_reduce.gather", "all_reduce_1.scatter", "all_reduce_1.gather"]
    assert [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.target is torch.ops.aten.view.default][-1] == (7, 5)


def _issues_waits_and_matmuls(gm) -> list[str]:
    """The rewritten graph's all-to-alls (by collective id), fsc waits and matmuls, in order."""
    return [n.meta["fsc_collective_id"] if n.target is FSC_ALL_TO_ALL else "wait" if n.target is FSC_WAIT else "mm"
            for n in gm.graph.nodes if n.target in (FSC_ALL_TO_ALL, FSC_WAIT, torch.ops.aten.mm.default)]


def test_sm_free_collectives_lets_an_all_reduce_needed_as_soon_be_issued_before_the_middle(monkeypatch):
    """Buckets waited together at the end (a backward's): the first's middle goes halfway to
    its wait, after the second's issue, so no rank stops to wait for it while it could compute."""
    import fsc.passes.sm_free_collectives as module

    def buckets(x, w):
        first = c10d.all_reduce(torch.relu(x), "sum", "g0")
        h = x @ w
        second = c10d.all_reduce(h, "sum", "g0")
        g = ((h @ w) @ w) @ w
        return c10d.wait_tensor(first), c10d.wait_tensor(second), g

    monkeypatch.setattr(module, "_group_size", lambda name: 4)
    gm = trace(buckets, (8, 5), (5, 5))
    assert run(gm).stats["swapped"] == 2
    gm.graph.lint()
    names = _issues_waits_and_matmuls(gm)
    # 4 matmuls after the first's issue, 3 after the second's: both middles before the third
    assert names == ["all_reduce.scatter", "mm", "all_reduce_1.scatter", "mm", "wait", "all_reduce.gather",
                     "wait", "all_reduce_1.gather", "mm", "mm", "wait", "wait"], names


def test_sm_free_collectives_keeps_a_middle_ahead_of_an_earlier_swap_needed_later(monkeypatch):
    """The second all-reduce is needed first; the first's middle went after its issue, so its
    second all-to-all counts as a later issue on the group: the second's middle goes before it."""
    import fsc.passes.sm_free_collectives as module

    def nested(x, w):
        first = c10d.all_reduce(x, "sum", "g0")
        h = x
        for _ in range(5):
            h = h @ w
        second = c10d.all_reduce(h, "sum", "g0")
        for _ in range(10):
            h = h @ w
        y = c10d.wait_tensor(second) @ w
        return c10d.wait_tensor(first), y, h

    monkeypatch.setattr(module, "_group_size", lambda name: 4)
    gm = trace(nested, (5, 5), (5, 5))
    assert run(gm).stats["swapped"] == 2
    gm.graph.lint()
    names = _issues_waits_and_matmuls(gm)
    # first's middle halfway (before the 9th of its 16 matmuls), after the second's issue;
    # the second's own halfway point (its 6th of 10) is after that, so it goes first
    assert names == ["all_reduce.scatter", *["mm"] * 5, "all_reduce_1.scatter", *["mm"] * 3, "wait", "wait",
                     "all_reduce_1.gather", "all_reduce.gather", *["mm"] * 7, "wait", "mm", "wait"], names


def test_sm_free_collectives_declines_an_all_reduce_it_cannot_shard(monkeypatch):
    import fsc.passes.sm_free_collectives as module

    monkeypatch.setattr(module, "_group_size", lambda name: 2)

    def maximum(x, w):
        out = c10d.all_reduce(x, "max", "g0")
        return c10d.wait_tensor(out).sum() + (x @ w).sum()

    record = run(trace(maximum, (8, 8), (8, 8)))
    assert record.reasons == ("all_reduce 'all_reduce' not swapped: reduce_op 'max': only sum and avg are swapped",)
    assert run(trace(maximum, (8, 8), (8, 8)), all_reduce=False).reasons[0].endswith("all_reduce=false")


def test_sm_free_collectives_declines_a_result_read_without_a_wait():
    def unwaited(x, w):
        out = c10d.all_to_all_single(x, [32, 32], [32, 32], "g0")
        return (out @ w).sum() + c10d.wait_tensor(out).sum()

    gm = trace(unwaited, (64, 64), (64, 64))
    record = run(gm, swap_all=True)
    assert record.modified is False
    assert record.reasons[0].endswith("its result is read by mm (aten.mm.default), not by wait_tensor or a size query")


def test_sm_free_collectives_declines_devices_without_a_transport():
    gm = trace(overlapped, (64, 64), (64, 64), device="meta")
    record = run(gm)
    assert record.modified is False
    assert record.reasons[0].endswith("no copy-engine transport for device type 'meta'")


def test_sm_free_collectives_leaves_graphs_without_collectives_alone():
    gm = trace(lambda x, w: (x @ w).relu(), (8, 8), (8, 8))
    record = run(gm)
    assert record.modified is False and record.reasons == ("no functional collectives",)


def test_sm_free_collectives_is_left_out_of_the_default_pipeline():
    assert "sm-free-collectives" in REGISTRY
    assert not any(isinstance(p, SmFreeCollectives) for p in fsc.Config.from_options().passes)


def test_sm_free_collectives_runs_where_a_pipeline_string_names_it():
    config = fsc.Config.from_options(
        {"passes": "prioritize-collectives,overlap-schedule,sm-free-collectives{swap_all=true}"}
    )
    assert [p.name for p in config.passes] == ["prioritize-collectives", "overlap-schedule", "sm-free-collectives"]
    assert config.passes[-1] == SmFreeCollectives(swap_all=True)
    assert config.pipeline == "prioritize-collectives,overlap-schedule,sm-free-collectives{swap_all=true}"
