"""The schedule benchmark's pieces: HSTU graph capture on a fake 8-rank world, Inductor's
two peers run for real, the executed order put back onto the FX graph, and well-formed rows.

Small on purpose (a tiny HSTU, one zoo graph, one profile; Inductor's overlap scheduler on
the zoo graph only, its legacy reordering on both): each Inductor compile of the HSTU
graphs costs seconds, and the benchmark itself is not a unit test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx

from bench import inductor_peers, schedule
from bench.hstu_graphs import HSTUSpec, fake_world
from fsc.analysis.collectives import is_collective, is_wait

TINY = HSTUSpec(num_items=60, dim=16, heads=1, qk_dim=8, v_dim=8, layers=1, max_len=8, negatives=8, sequences=2,
                mean_length=6.0)
HSTU_SCHEDULERS = ("none", "freescale-moves", "inductor-legacy")


@pytest.fixture(scope="module")
def hstu() -> list[schedule.BenchGraph]:
    """The HSTU graphs as captured, with Inductor's legacy order for each."""
    with fake_world(TINY.world):
        return schedule.prepare(["hstu-forward", "hstu-backward"], schedulers=HSTU_SCHEDULERS, profiles=["h100"],
                                spec=TINY)


@pytest.fixture(scope="module")
def table(hstu) -> list[dict]:
    with fake_world(TINY.world):
        zoo = schedule.prepare(["comm-first"], profiles=["h100"], spec=TINY)
        return schedule.score(zoo, "h100") + schedule.score(hstu, "h100", HSTU_SCHEDULERS)


@pytest.mark.inductor
def test_hstu_capture_gives_post_grad_aten_graphs_with_functional_all_to_alls(hstu):
    graphs = {g.kind: g.gm for g in hstu}
    assert set(graphs) == {"forward", "backward"}
    forward = [n for n in graphs["forward"].graph.nodes if is_collective(n)]
    backward = [n for n in graphs["backward"].graph.nodes if is_collective(n)]
    # counts, ids out, rows back; the rows' gradient goes back to their owners
    assert len(forward) == 3 and len(backward) == 1
    for node in forward + backward:
        assert node.target is torch.ops._c10d_functional.all_to_all_single.default
        assert any(is_wait(u) for u in node.users)
        assert len(node.args[1]) == TINY.world  # split sizes for every rank
    # post-grad: Inductor's decompositions ran (no layer_norm/silu left as single ops)
    targets = {n.target for n in graphs["forward"].graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.native_layer_norm.default not in targets
    assert torch.ops.aten.silu.default not in targets


@pytest.mark.inductor
def test_rows_are_well_formed_and_every_scheduler_runs(table):
    expected = {("comm-first", s) for s in schedule.SCHEDULERS}
    expected |= {(g, s) for g in ("hstu-forward", "hstu-backward") for s in HSTU_SCHEDULERS}
    assert {(r["graph"], r["scheduler"]) for r in table} == expected
    for row in table:
        assert row["profile"] == "h100"
        assert "error" not in row, row  # both Inductor peers run on this torch, with the CPU workarounds
        assert math.isfinite(row["exposed_comm_ms"]) and row["exposed_comm_ms"] >= 0
        assert math.isfinite(row["makespan_ms"]) and row["makespan_ms"] > row["exposed_comm_ms"]
        # no order, ours or a peer's, beats what no order can avoid
        assert 0 <= row["exposed_lower_bound_ms"] <= row["exposed_comm_ms"] + 1e-9
    lines = schedule.check_targets(table)
    assert len(lines) == 1 and lines[0].split()[:2] == ["h100", "comm-first"]


@pytest.mark.inductor
def test_inductor_overlap_hides_the_exchange_that_program_order_exposes(table):
    by = {(r["graph"], r["scheduler"]): r for r in table}
    assert by["comm-first", "none"]["exposed_comm_ms"] > 0
    assert by["comm-first", "inductor-overlap"]["exposed_comm_ms"] == 0


def test_peer_that_fails_gets_an_error_row_not_numbers():
    with fake_world(TINY.world) as group:
        source = schedule._zoo_source("comm-first", group, TINY.world)

        def broken(patches):
            raise RuntimeError("no driver")

        source.compile = broken
        schedule._run_peers(source, ["inductor-legacy"], ["h100"])
        rows = schedule.score(source.graphs, "h100", ["none", "inductor-legacy"])
    assert rows[0]["exposed_comm_ms"] is not None and "error" not in rows[0]
    assert rows[1]["exposed_comm_ms"] is None and rows[1]["makespan_ms"] is None
    assert rows[1]["error"] == "RuntimeError: no driver"


def _chain() -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(torch.relu, (x,), name="a")
    b = graph.call_function(torch.neg, (x,), name="b")
    view = graph.call_function(torch.ops.aten.view.default, (a, [-1]), name="v")
    c = graph.call_function(torch.add, (view, b), name="c")
    graph.output(c)
    return fx.GraphModule(torch.nn.Module(), graph)


def test_apply_order_follows_kernels_and_places_unnamed_nodes_after_their_inputs():
    gm = _chain()
    unnamed = inductor_peers.apply_order(gm, [("b",), ("a",), ("c",)])
    assert [n.name for n in gm.graph.nodes] == ["x", "b", "a", "v", "c", "output"]
    assert [n.name for n in unnamed] == ["v"]
    assert gm(torch.ones(2)).tolist() == [0.0, 0.0]


def test_apply_order_never_breaks_data_dependencies():
    gm = _chain()
    inductor_peers.apply_order(gm, [("c",), ("b",), ("a",)])  # c cannot come first
    names = [n.name for n in gm.graph.nodes]
    assert names.index("c") > max(names.index("a"), names.index("b"), names.index("v"))


def test_unknown_peer_is_refused():
    from fsc.analysis.cost_model import DEVICE_PROFILES

    with pytest.raises(ValueError, match="unknown Inductor peer 'inductor-x'"):
        inductor_peers.peer_settings("inductor-x", DEVICE_PROFILES["h100"])


def test_unknown_graph_is_refused():
    with pytest.raises(ValueError, match="unknown graph"):
        schedule.prepare(["nope"])


def test_overlap_pass_alone_on_the_fx_graph_defers_the_wait_past_independent_matmuls():
    from fsc.analysis.cost_model import DEVICE_PROFILES

    with fake_world(TINY.world) as group:
        gm = schedule._zoo_source("comm-first", group, TINY.world).graphs[0].gm
        inductor_peers.overlap_schedule(gm, DEVICE_PROFILES["h100"])
    names = [n.name for n in gm.graph.nodes]
    assert names.index("wait_tensor") > names.index("mm_3")  # the last matmul of the independent chain
