"""python -m bench balance-runs --split, tiny: three real torchrun runs of the HSTU example
(unbalanced, whole samples, split samples) from the same data and seed, so the same final
loss; each row carries the per-step compute spread the bubble meter measured."""

from __future__ import annotations

import json

import pytest

from bench import BENCHMARKS

pytestmark = [pytest.mark.ranks, pytest.mark.slow]


def test_split_run_compares_whole_and_split_balancing_from_the_same_start(tmp_path):
    out = tmp_path / "balance-runs-split.json"
    argv = ["--split", "--ranks", "2", "--steps", "4", "--batch-size", "8", "--max-len", "200",
            "--backend", "eager", "--lengths-from", "", "--lengths", "zipf"]
    assert BENCHMARKS["balance-runs"].main(argv, str(out)) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["none", "freescale", "freescale-split"]
    losses = [r["final_loss"] for r in rows]
    assert max(losses) - min(losses) <= 1e-4 * max(1.0, abs(losses[0])), losses  # placement changes no value
    for r in rows:
        assert r["compute_max_over_mean_per_step"], r  # the meter measured every rank on some step
        assert r["recompiles"] == 0, r
    assert rows[0]["median_max_over_lb"] is None and rows[0]["split_samples"] == rows[1]["split_samples"] == 0
    assert rows[2]["split_samples"] >= 1, rows[2]  # zipf lengths: some sample outweighs a rank's share
