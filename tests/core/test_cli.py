"""The command lines: python -m fsc and python -m bench."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.report import replace_section
from fsc.__main__ import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_fsc_help_lists_commands_and_points_to_the_tools_beside_the_package():
    out = run("-m", "fsc", "--help")
    assert out.returncode == 0, out.stderr
    for word in ("passes", "options", "python -m bench --help", "python -m sim --help"):
        assert word in out.stdout
    assert run("-m", "fsc", "bench").returncode != 0  # benchmarks are not part of the installed package


def test_fsc_passes_lists_every_registered_pass_with_options(capsys):
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("lower-attention: replace SDPA, softmax and HSTU SiLU attention with the jagged kernel")
    assert "\nprioritize-collectives: on each process group" in text
    assert "\noverlap-schedule: issue each collective" in text
    assert "memory_budget_gb" in text and "sink_waits" in text


def test_fsc_options_lists_valid_values(capsys):
    assert main(["options"]) == 0
    text = capsys.readouterr().out
    assert "inductor, eager" in text and "cpu, h100, h200" in text


def test_bench_help_names_benchmarks():
    out = run("-m", "bench", "--help")
    assert out.returncode == 0, out.stderr
    assert "compile-overhead" in out.stdout


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


def test_schedule_bench_rows_and_freescale_never_worse_than_program_order(tmp_path):
    import json

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
