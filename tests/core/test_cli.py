"""The command line: python -m fsc."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fsc.__main__ import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.ranks
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
