"""``python -m bench e2e``: a quick 2-rank run of a few backends (schema, finite numbers,
README section, plot), option errors, and the TorchRec peer's model equivalence."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from bench import e2e, e2e_torchrec

ROW_KEYS = {"backend", "ranks", "median_step_ms", "samples_per_s", "bubble_fraction", "exposed_comm_ms",
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
            "--timeout", "240"]
    assert e2e.run(argv, str(tmp / "e2e.json")) == 0
    return json.loads((tmp / "e2e.json").read_text()), readme.read_text(), tmp, backends


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.ranks
def test_quick_run_writes_one_row_per_backend_with_the_issue_schema(quick):
    result, _, _, backends = quick
    assert [r["backend"] for r in result["rows"]] == backends
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
    # (first losses differ from eager's: a rank draws its own negatives, and balancing moves samples)


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
    assert "| backend | step ms | samples/s |" in readme
    for name in backends:
        assert f"| {name} |" in readme
    assert "python -m bench e2e --json" in readme and "--quick" in readme and "load average" in readme


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
    (["--readme", "/nonexistent/README.md"], "--readme"),
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
    row = {"backend": "x", "median_step_ms": 10.0, "samples_per_s": 3200.0, "step_vs_best_competitor": None,
           "bubble_fraction": None, "exposed_comm_ms": None, "recompiles": 0, "peak_mem_mb": 512.4,
           "compile_s": float("nan")}
    assert e2e.table([row]).splitlines()[-1] == "| x | 10.0 | 3200.0 | - | - | - | 0 | 512 | - |"


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
    assert any(isinstance(p, SmFreeCollectives) for p in passes) == ("smfree" in name or name == "fs-all"), names
    assert ("lower-attention" in names) == (name in ("fs-attn", "fs-all")), names
    assert ("overlap-schedule" in names) == (name in ("fs-overlap", "fs-all")), names
