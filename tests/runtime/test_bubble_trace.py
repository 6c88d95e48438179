"""The bubble trace format: records, validation, JSON round trips, Chrome trace, PNG."""

from __future__ import annotations

import json

import pytest

from fsc.runtime.bubble_trace import (
    TRACKS,
    Interval,
    StepBubbles,
    load_steps,
    plot_stacked_bars,
    read_chrome_trace,
    save_steps,
    summarize,
    write_chrome_trace,
)


def _steps() -> list[StepBubbles]:
    return [
        StepBubbles(rank=0, step=0, step_ms=10.0, compute_ms=6.0, exposed_comm_ms=1.0, idle_ms=3.0),
        StepBubbles(rank=0, step=1, step_ms=12.0, compute_ms=6.0, exposed_comm_ms=2.0, idle_ms=3.0,
                    unattributed_ms=1.0),
        StepBubbles(rank=0, step=2, step_ms=20.0, compute_ms=10.0, exposed_comm_ms=4.0, idle_ms=6.0),
        StepBubbles(rank=1, step=0, step_ms=10.0, compute_ms=9.0, exposed_comm_ms=1.0, idle_ms=0.0),
        StepBubbles(rank=1, step=1, step_ms=10.0, compute_ms=8.0, exposed_comm_ms=1.0, idle_ms=1.0),
    ]


def test_bubble_fraction_is_non_compute_share_of_step():
    s = StepBubbles(rank=0, step=0, step_ms=8.0, compute_ms=6.0, exposed_comm_ms=1.5, idle_ms=0.5)
    assert s.bubble_fraction == pytest.approx(0.25)
    empty = StepBubbles(rank=0, step=0, step_ms=0.0, compute_ms=0.0, exposed_comm_ms=0.0, idle_ms=0.0)
    assert empty.bubble_fraction == 0.0


def test_summarize_takes_per_rank_medians_then_mean_over_ranks():
    out = summarize(_steps())
    r0, r1 = out["per_rank"]
    assert (r0["rank"], r0["steps"], r1["rank"], r1["steps"]) == (0, 3, 1, 2)
    assert r0["step_ms"] == 12.0 and r0["compute_ms"] == 6.0 and r0["idle_ms"] == 3.0
    # rank 0's per-step fractions: 0.4, 0.5, 0.5 -> median 0.5; rank 1's: 0.1, 0.2 -> 0.15
    assert r0["bubble_fraction"] == pytest.approx(0.5)
    assert r1["bubble_fraction"] == pytest.approx(0.15)
    assert out["bubble_fraction"] == pytest.approx((0.5 + 0.15) / 2)
    assert out["step_ms"] == pytest.approx((12.0 + 10.0) / 2)
    assert out["idle_ms"] == pytest.approx((3.0 + 0.5) / 2)
    assert (out["ranks"], out["steps"]) == (2, 3)


def test_summarize_rejects_empty_and_foreign_items():
    with pytest.raises(ValueError, match="steps is empty"):
        summarize([])
    with pytest.raises(ValueError, match="StepBubbles"):
        summarize([{"rank": 0}])


def test_steps_round_trip_through_json_with_summary_and_extra(tmp_path):
    path = tmp_path / "bubbles.json"
    save_steps(_steps(), path, extra={"overhead": {"ratio": 1.01}})
    assert load_steps(path) == _steps()
    doc = json.loads(path.read_text())
    assert doc["summary"]["bubble_fraction"] == pytest.approx(summarize(_steps())["bubble_fraction"])
    assert doc["overhead"] == {"ratio": 1.01}
    with pytest.raises(ValueError, match="extra key 'steps'"):
        save_steps(_steps(), path, extra={"steps": []})


def test_load_steps_rejects_files_of_another_kind(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no 'steps' key"):
        load_steps(path)
    path.write_text(json.dumps({"steps": [{"rank": 0, "step": 0, "step_ms": 1.0, "compute_ms": 1.0,
                                           "exposed_comm_ms": 0.0, "idle_ms": 0.0, "bogus": 1}]}))
    with pytest.raises(ValueError, match="bogus"):
        load_steps(path)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"step_ms": -1.0}, "step_ms"),
        ({"compute_ms": -0.1}, "compute_ms"),
        ({"exposed_comm_ms": float("nan")}, "exposed_comm_ms"),
        ({"idle_ms": "3"}, "idle_ms"),
        ({"unattributed_ms": -2.0}, "unattributed_ms"),
        ({"rank": -1}, "rank"),
        ({"step": 1.5}, "step"),
        ({"compute_ms": 9.0, "idle_ms": 2.0}, "step_ms"),  # parts exceed the step
    ],
)
def test_step_bubbles_rejects_bad_values_naming_the_field(kwargs, field):
    base = {"rank": 0, "step": 0, "step_ms": 10.0, "compute_ms": 5.0, "exposed_comm_ms": 1.0, "idle_ms": 1.0}
    with pytest.raises(ValueError, match=rf"StepBubbles\.{field}"):
        StepBubbles(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"track": "network"}, "track"),
        ({"start_s": 2.0, "end_s": 1.0}, "end_s"),
        ({"rank": -3}, "rank"),
        ({"start_s": float("inf")}, "start_s"),
        ({"name": 5}, "name"),
    ],
)
def test_interval_rejects_bad_values_naming_the_field(kwargs, field):
    base = {"rank": 0, "step": 0, "track": "compute", "start_s": 0.0, "end_s": 1.0}
    with pytest.raises(ValueError, match=rf"Interval\.{field}"):
        Interval(**{**base, **kwargs})


def _intervals() -> list[Interval]:
    return [
        Interval(rank=0, step=0, track="compute", start_s=0.0, end_s=0.004, name="forward"),
        Interval(rank=0, step=0, track="communication", start_s=0.004, end_s=0.0045),
        Interval(rank=0, step=0, track="idle", start_s=0.0045, end_s=0.006, name="allreduce"),
        Interval(rank=1, step=0, track="compute", start_s=0.0001, end_s=0.0059),
    ]


def test_chrome_trace_has_a_process_per_rank_a_thread_per_track_and_microsecond_events(tmp_path):
    path = tmp_path / "trace.json"
    write_chrome_trace(_intervals(), path, label="before")
    doc = json.loads(path.read_text())
    assert doc["otherData"]["label"] == "before"
    events = doc["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert procs == {0: "rank 0", 1: "rank 1"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"]
               for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert threads == {(p, t): TRACKS[t] for p in (0, 1) for t in range(3)}
    xs = [e for e in events if e["ph"] == "X"]
    assert len(xs) == 4
    idle = next(e for e in xs if e["cat"] == "idle")
    assert (idle["pid"], idle["tid"], idle["name"]) == (0, 2, "allreduce")
    assert idle["ts"] == pytest.approx(4500.0) and idle["dur"] == pytest.approx(1500.0)
    comm = next(e for e in xs if e["cat"] == "communication")
    assert (comm["tid"], comm["name"]) == (1, "communication")


def test_chrome_trace_round_trips(tmp_path):
    path = tmp_path / "trace.json"
    write_chrome_trace(_intervals(), path)
    back = read_chrome_trace(path)
    def key(i: Interval) -> tuple:
        return (i.rank, i.step, i.track, i.name)

    assert [key(i) for i in back] == [key(i) for i in _intervals()]
    for a, b in zip(back, _intervals()):
        assert a.start_s == pytest.approx(b.start_s, abs=1e-12) and a.end_s == pytest.approx(b.end_s, abs=1e-12)


def test_chrome_trace_rejects_foreign_items(tmp_path):
    with pytest.raises(ValueError, match="Interval"):
        write_chrome_trace([("compute", 0, 1)], tmp_path / "t.json")


def test_stacked_bars_png_is_written(tmp_path):
    path = tmp_path / "bubbles.png"
    after = [StepBubbles(rank=s.rank, step=s.step, step_ms=s.step_ms - s.idle_ms, compute_ms=s.compute_ms,
                         exposed_comm_ms=s.exposed_comm_ms, idle_ms=0.0, unattributed_ms=s.unattributed_ms)
             for s in _steps()]
    plot_stacked_bars({"before": _steps(), "after": after}, path)
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_stacked_bars_reject_empty_runs(tmp_path):
    with pytest.raises(ValueError, match="runs is empty"):
        plot_stacked_bars({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="run 'after' has no steps"):
        plot_stacked_bars({"before": _steps(), "after": []}, tmp_path / "x.png")


def test_stacked_bars_without_matplotlib_say_how_to_install(tmp_path, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match="needs matplotlib"):
        plot_stacked_bars({"before": _steps()}, tmp_path / "x.png")
