"""``python -m bench e2e``: a quick 2-rank run of a few backends (schema, finite numbers,
same first loss with and without balancing, README section, plot), the per-step shuffled
order, ratios and verdicts over repeats, option errors, and the TorchRec peer's model
equivalence."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from bench import e2e, e2e_report, e2e_torchrec

ROW_KEYS = {"backend", "ranks", "attention", "median_step_ms", "samples_per_s", "bubble_fraction", "exposed_comm_ms",
            "recompiles", "peak_mem_mb", "compile_s"}
README = "# x\n\nbefore\n\n<!-- bench:e2e -->\nold table\n<!-- /bench:e2e -->\n\nafter\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    readme = tmp / "README.md"
    readme.write_text(README)
    backends = ["eager", "fs-all"] + (["torchrec"] if e2e_torchrec.unavailable() is None else [])
    # freescale's inner compiler eager: the passes run, Inductor's C++ build (minutes on 2 cores) does not
    argv = ["--quick", "--backends", ",".join(backends), "--fs-inner", "eager", "--readme", str(readme),
            "--timeout", "240", "--twin", "eager"]
    assert e2e.run(argv, str(tmp / "e2e.json")) == 0
    return json.loads((tmp / "e2e.json").read_text()), readme.read_text(), tmp, backends


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.ranks
def test_quick_run_writes_one_row_per_backend_with_the_issue_schema(quick):
    result, _, _, backends = quick
    assert [r["backend"] for r in result["rows"]] == [*backends, "eager-twin"]
    for row in result["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["ranks"] == 2
        for key in ("median_step_ms", "samples_per_s", "peak_mem_mb"):
            assert _finite(row[key]) and row[key] > 0, (row["backend"], key, row[key])
        assert _finite(row["compile_s"]) and row["compile_s"] >= 0
        assert _finite(row["exposed_comm_ms"]) and row["exposed_comm_ms"] >= 0
        assert 0 <= row["bubble_fraction"] <= 1
        assert row["recompiles"] == 0  # the token dimension is marked dynamic at the first step
        assert row["samples_per_s"] == pytest.approx(8 / (row["median_step_ms"] / 1e3))
        assert row["timed_steps"] == 4 and row["metered_steps"] == 2
        assert row["attention"] == (e2e.PEER_FORMS.get(row["backend"].removesuffix("-twin")) or e2e.PEER_FORMS["inductor"])


@pytest.mark.ranks
def test_freescale_all_compiles_with_every_technique(quick):
    result, _, _, _ = quick
    rows = {r["backend"]: r for r in result["rows"]}
    fs = rows["fs-all"]
    assert fs["graphs_compiled"] >= 1
    forward = fs["passes"]["forward"]
    assert forward["fallback"] is None
    assert {"overlap-schedule", "sm-free-collectives"} <= set(forward["passes"])
    assert rows["eager"]["graphs_compiled"] == 0
    assert any("inner compiler 'eager'" in note for note in result["notes"])
    assert fs["attention_lowering"].startswith(("lowered", "not lowered"))


@pytest.mark.ranks
def test_balanced_rows_start_from_the_same_loss_as_the_others(quick):
    """Negatives travel with their sample: balancing moves samples, not the maths."""
    result, _, _, _ = quick
    rows = {r["backend"]: r for r in result["rows"]}
    assert rows["fs-all"]["first_loss"] == pytest.approx(rows["eager"]["first_loss"], rel=1e-5)


@pytest.mark.ranks
def test_the_twin_runs_and_reports_its_ratio_to_the_original(quick):
    result, _, _, _ = quick
    twin = next(r for r in result["rows"] if r["backend"] == "eager-twin")
    assert twin["twin_of"] == "eager" and len(twin["twin_ratio_per_repeat"]) == 1
    assert twin["first_loss"] == pytest.approx(next(r for r in result["rows"] if r["backend"] == "eager")["first_loss"])
    assert any(note.startswith("twin check, 2 ranks: eager-twin / eager") and "not checked: one repeat" in note
               for note in result["notes"])


@pytest.mark.ranks
def test_torchrec_peer_starts_from_the_same_model_and_batch_as_eager(quick):
    result, _, _, backends = quick
    if "torchrec" not in backends:
        pytest.skip(f"torchrec not installed: {e2e_torchrec.unavailable()}")
    rows = {r["backend"]: r for r in result["rows"]}
    assert rows["torchrec"]["first_loss"] == pytest.approx(rows["eager"]["first_loss"], rel=1e-5)
    assert rows["torchrec"]["exposed_comm_ms"] > 0  # its all-to-alls are seen by the meter


@pytest.mark.ranks
def test_readme_section_is_rewritten_between_the_markers_only(quick):
    result, readme, _, backends = quick
    assert readme.startswith("# x\n\nbefore\n\n<!-- bench:e2e -->\n")
    assert readme.endswith("<!-- /bench:e2e -->\n\nafter\n")
    assert "old table" not in readme
    assert "| backend | attention | step ms | samples/s |" in readme
    assert "| technique | row | step vs best peer (spread) |" in readme
    for name in backends:
        assert f"| {name} |" in readme
    assert "python -m bench e2e --json" in readme and "--quick" in readme and "load average" in readme
    assert "2 ranks: fs-all takes" in readme and "best fair peer" in readme
    assert "What these numbers do not show: there is no GPU here" in readme
    assert "- 2 ranks, repeat 1:" in readme


@pytest.mark.ranks
def test_plots_are_png_files(quick):
    result, _, tmp, _ = quick
    for key in ("plot", "bubbles_plot"):
        path = pathlib.Path(result[key])
        assert path.parent == tmp
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, option", [
    (["--backends", "eager,nope"], "--backends"),
    (["--backends", "eager,eager"], "--backends"),
    (["--ranks", "1"], "--ranks"),
    (["--ranks", "3", "--batch-size", "8"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--metered", "-1"], "--metered"),
    (["--data", "/nonexistent/ratings.csv"], "--data"),
    (["--backends", "eager@flash"], "--backends"),
    (["--twin", "inductor", "--backends", "eager"], "--twin"),
    (["--repeats", "0"], "--repeats"),
    (["--attention", "flash"], "--attention"),
    (["--readme", "/nonexistent/README.md"], "--readme"),
    (["--ablate-ranks", "4"], "--ablate-ranks"),
])
def test_bad_options_fail_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.parse(["--quick", *argv])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def test_metered_steps_are_spread_among_timed_ones():
    schedule = e2e._schedule(30, 15)
    assert len(schedule) == 45 and sum(schedule) == 15
    assert not any(a and b for a, b in zip(schedule, schedule[1:]))  # never two metered in a row
    assert e2e._schedule(4, 0) == [False] * 4


def test_table_prints_missing_numbers_as_dashes():
    row = {"backend": "x", "attention": "padded", "median_step_ms": 10.0, "samples_per_s": 3200.0,
           "step_vs_best_competitor": None, "bubble_fraction": None, "exposed_comm_ms": None, "recompiles": 0,
           "peak_mem_mb": 512.4, "compile_s": float("nan")}
    assert e2e_report.table([row]).splitlines()[-1] == "| x | padded | 10.0 | 3200.0 | - | - | - | - | 0 | 512 | - |"


def test_step_order_is_shuffled_per_step_the_same_on_every_rank():
    orders = [e2e.step_order(5, 0, 0, step) for step in range(40)]
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert orders == [e2e.step_order(5, 0, 0, step) for step in range(40)]  # a pure function: every rank agrees
    assert orders != [e2e.step_order(5, 0, 1, step) for step in range(40)]  # another repeat, another order
    # unlike a rotation, a configuration is preceded by different ones from step to step
    before = {tuple(o[o.index(2) - 1 : o.index(2)]) for o in orders}
    assert len(before) >= 4


def _fake_rank(times: dict[str, list[float]]) -> dict:
    names = list(times)
    return {"step_ms": times, "warmup_ms": {n: [100.0] for n in names}, "graphs": dict.fromkeys(names, 1),
            "recompiles": dict.fromkeys(names, 0), "first_loss": dict.fromkeys(names, 5.0),
            "final_loss": dict.fromkeys(names, 4.0), "peak_rss_mb": 100.0, "peak_rss_after_warmup": True,
            "bubbles": None, "passes": {}}


def test_ratios_against_the_best_fair_peer_carry_their_spread_and_verdict():
    args = e2e.parse(["--quick", "--backends", "eager,inductor,inductor@dense,fs-none,fs-all", "--twin", "inductor"])
    # per repeat (two ranks each): inductor 10 ms; inductor@dense is faster but not a fair peer;
    # fs-all 8-9 ms (faster in every repeat); fs-none straddles inductor; the twin matches it
    per_repeat = [{"eager": 20, "inductor": 10, "inductor@dense": 5, "fs-none": 9.5, "fs-all": 8, "inductor-twin": 10.2},
                  {"eager": 21, "inductor": 10, "inductor@dense": 5, "fs-none": 10.5, "fs-all": 9, "inductor-twin": 9.9},
                  {"eager": 19, "inductor": 11, "inductor@dense": 5, "fs-none": 11, "fs-all": 9, "inductor-twin": 11}]
    repeats = [[_fake_rank({n: [t, t, t] for n, t in rep.items()}) for _ in range(2)] for rep in per_repeat]
    rows = {r["backend"]: r for r in e2e_report.world_rows(2, args.rows, repeats, {}, args)}
    assert rows["inductor"]["verdict"] == "the reference" and rows["fs-all"]["best_competitor"] == "inductor"
    assert rows["inductor@dense"]["attention"] == "dense"
    assert rows["fs-all"]["ratio_spread"] == pytest.approx([0.8, 0.9]) and rows["fs-all"]["verdict"] == "faster"
    assert rows["fs-all"]["step_vs_best_competitor"] == pytest.approx(9 / 11)
    assert rows["fs-none"]["verdict"] == e2e_report.NO_DIFFERENCE
    assert rows["eager"]["verdict"] == "slower"
    assert rows["inductor-twin"]["twin_check"].startswith("ok")
    assert e2e_report.verdict([0.9]) == "one repeat: no spread"
    text = e2e_report.technique_table(list(rows.values()))
    assert "| all (balancer, every pass, SM-free transport) | fs-all | 0.82 (0.80-0.90) | faster |" in text
    assert e2e_report.repeat_figures(list(rows.values()))[0].startswith("inductor 10.0 ms; eager 2.00")


def test_a_twin_that_differs_from_its_original_fails_the_check():
    args = e2e.parse(["--quick", "--backends", "eager", "--twin", "eager"])
    repeats = [[_fake_rank({"eager": [10.0] * 3, "eager-twin": [t] * 3})] for t in (11.0, 11.5)]
    twin = e2e_report.world_rows(2, args.rows, repeats, {}, args)[1]
    assert twin["twin_check"].startswith("FAILED")


def test_a_full_run_twins_inductor_unless_told_not_to():
    assert [r.name for r in e2e.parse([]).rows][-1] == "inductor-twin"
    assert "inductor-twin" not in [r.name for r in e2e.parse(["--twin", "none"]).rows]
    assert "inductor-twin" not in [r.name for r in e2e.parse(["--quick"]).rows]


def test_peers_get_their_measured_forms_and_freescale_rows_the_inductor_peers():
    args = e2e.parse(["--quick", "--backends", "eager,torchrec,inductor@padded,fs-all"])
    forms = {r.name: r.attention for r in args.rows}
    assert forms == {"eager": e2e.PEER_FORMS["eager"], "torchrec": e2e.PEER_FORMS["torchrec"],
                     "inductor@padded": "padded", "fs-all": e2e.PEER_FORMS["inductor"]}
    assert set(e2e.PEER_FORMS.values()) <= {"padded", "jagged"}  # never the dense form
    assert {r.name: r.attention for r in e2e.parse(["--quick", "--attention", "dense"]).rows}["fs-all"] == "dense"


def test_torchrec_peer_loads_the_example_initial_table():
    """The peer's table starts from the example's draw (its loss is the example's HSTU.loss)."""
    from examples.hstu.model import HSTU, HSTUConfig

    cfg = HSTUConfig(num_items=50, dim=16, heads=2, qk_dim=8, v_dim=8, layers=1, max_len=12, num_negatives=5, seed=3)
    model = HSTU(cfg)
    torch.testing.assert_close(e2e_torchrec.example_table(51, 16, 1, cfg.seed + 1)[:51], model.item.weight.detach())


@pytest.mark.parametrize("name", [n for n, v in e2e.VARIANTS.items() if v.compiler == "freescale"])
def test_every_freescale_variant_builds_its_pipeline(name):
    """Each freescale row's options must be accepted by the backend's option parsing (the
    opt-in sm-free-collectives pass is named in the pipeline string like any other)."""
    import fsc
    from fsc.passes.sm_free_collectives import SmFreeCollectives

    options = e2e._freescale_options(e2e.VARIANTS[name], "eager")
    passes = fsc.Config.from_options(options).passes
    names = [p.name for p in passes]
    everything = ("fs-all", "fs-all-pipe")
    assert any(isinstance(p, SmFreeCollectives) for p in passes) == (
        "smfree" in name or name in everything or name == "fs-pipe"), names
    # fs-pipe: every scheduling pass and SM-free, attention lowering off (it cannot flatter the pipeline)
    assert ("lower-attention" in names) == (name in ("fs-attn", *everything)), names
    assert ("overlap-schedule" in names) == (name in ("fs-overlap", "fs-pipe", *everything)), names
    assert e2e.VARIANTS[name].pipeline == name.endswith("-pipe")


def test_larger_world_sizes_run_the_headline_only_unless_asked():
    args = e2e.parse(["--ranks", "2", "4"])
    full = [r.name for r in e2e.rows_at(args, args.rows, 2)]
    assert full == [r.name for r in args.rows] and "fs-lb" in full
    assert [r.name for r in e2e.rows_at(args, args.rows, 4)] == [
        "eager", "inductor", "inductor-overlap", "torchrec", "fs-all", "fs-pipe", "fs-all-pipe", "inductor-twin"]
    both = e2e.parse(["--ranks", "2", "4", "--ablate-ranks", "2", "4"])
    assert e2e.rows_at(both, both.rows, 4) == both.rows


def test_the_phase_timeout_grows_when_ranks_outnumber_cpus(monkeypatch):
    monkeypatch.setattr(e2e.os, "cpu_count", lambda: 2)
    args = e2e.parse(["--timeout", "100"])
    assert e2e.phase_timeout(args, 2) == 100 and e2e.phase_timeout(args, 4) == 200
