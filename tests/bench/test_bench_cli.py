"""The benchmarks' command line: python -m bench."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.report import replace_section


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.ranks
def test_bench_help_names_benchmarks():
    out = run("-m", "bench", "--help")
    assert out.returncode == 0, out.stderr
    assert "compile-overhead" in out.stdout


@pytest.mark.ranks
def test_bench_rejects_unknown_name():
    out = run("-m", "bench", "nope")
    assert out.returncode != 0
    assert "invalid choice: 'nope'" in out.stderr


def test_readme_section_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("head\n<!-- bench:x -->\nold\n<!-- /bench:x -->\ntail\n")
    replace_section(readme, "x", "| new |")
    assert readme.read_text() == "head\n<!-- bench:x -->\n| new |\n<!-- /bench:x -->\ntail\n"
    with pytest.raises(ValueError, match="no <!-- bench:y -->"):
        replace_section(readme, "y", "z")


@pytest.mark.ranks
def test_schedule_bench_rows_and_freescale_never_worse_than_program_order(tmp_path):
    out = tmp_path / "schedule.json"
    done = run("-m", "bench", "schedule", "--profile", "h100", "--graphs", "comm-first,dense-first,dlrm-like",
               "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert {r["scheduler"] for r in rows} == {"none", "freescale-moves", "freescale", "inductor-overlap", "inductor-legacy"}
    by = {(r["graph"], r["scheduler"]): r for r in rows}
    for graph in {r["graph"] for r in rows}:
        assert by[graph, "freescale"]["makespan_ms"] <= by[graph, "none"]["makespan_ms"]
        assert by[graph, "freescale"]["exposed_comm_ms"] <= by[graph, "none"]["exposed_comm_ms"]
    # dense first: only moving the producer earlier (the list schedule) hides the exchange
    assert by["dense-first", "freescale-moves"]["exposed_comm_ms"] > 0
    assert by["dense-first", "freescale"]["exposed_comm_ms"] < by["dense-first", "freescale-moves"]["exposed_comm_ms"]


def test_every_registered_benchmark_resolves_to_a_run_function():
    import inspect

    from bench import BENCHMARKS

    for name, b in BENCHMARKS.items():
        assert name == b.name
        assert list(inspect.signature(b.main).parameters)[:2] == ["argv", "json_path"], name


@pytest.mark.ranks
def test_importing_a_bench_helper_does_not_import_the_benchmarks():
    out = run("-c", "import sys, bench.spawn; print(sorted(m for m in sys.modules if m.startswith('bench')))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['bench', 'bench.spawn']"
