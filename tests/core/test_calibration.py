"""Calibration: measurements are real and positive, ranks agree on one profile even when
their own measurements differ, and the profile drives compilation."""

from __future__ import annotations

import math

import pytest
import torch
from dist_harness import run_ranks

import fsc
from fsc.analysis.calibration import agree, calibrate, measure_compute


def test_measure_compute_returns_positive_finite_numbers():
    measured = measure_compute("cpu", repeats=1, matmul=128, copy_bytes=2**20)
    assert set(measured) == {"flops_fp32", "flops_half", "memory_bandwidth", "op_overhead"}
    assert all(math.isfinite(v) and v > 0 for v in measured.values())


def test_calibrate_without_process_group_replaces_compute_numbers_only():
    profile = calibrate("h100", repeats=1)
    base = fsc.DEVICE_PROFILES["h100"]
    assert profile.name == "h100-calibrated-max"
    assert profile.flops_fp32 != base.flops_fp32
    assert profile.intra_node_bandwidth == base.intra_node_bandwidth  # no group: links not measured


def _agree_worker(rank: int, world: int, reduce: str) -> dict[str, float]:
    # deliberately different per rank, as real timings are
    mine = {"flops_fp32": 100.0 + rank, "op_overhead": 1e-6 * (rank + 1), "intra_node_bandwidth": 5.0 - rank}
    return agree(mine, reduce=reduce)


@pytest.mark.ranks
def test_agree_max_gives_every_rank_the_slowest_ranks_numbers():
    results = run_ranks(_agree_worker, 3, "max")
    assert results[0] == results[1] == results[2]
    assert results[0] == {"flops_fp32": 100.0, "op_overhead": 3e-6, "intra_node_bandwidth": 3.0}


@pytest.mark.ranks
def test_agree_median_gives_every_rank_the_median():
    results = run_ranks(_agree_worker, 3, "median")
    assert results[0] == results[1] == results[2]
    assert results[0] == {"flops_fp32": 101.0, "op_overhead": 2e-6, "intra_node_bandwidth": 4.0}


def _calibrate_and_compile(rank: int, world: int):
    profile = calibrate("cpu", repeats=1)
    fn = torch.compile(lambda x: torch.relu(x) * 2, backend="freescale", options={"device_profile": profile, "inner": "eager"})
    x = torch.randn(8)
    assert torch.equal(fn(x), torch.relu(x) * 2)
    return profile


@pytest.mark.ranks
def test_calibrated_profile_is_identical_on_every_rank_and_compiles():
    first, second = run_ranks(_calibrate_and_compile, 2)
    assert first == second
    assert first.intra_node_latency > 0 and first.intra_node_bandwidth > 0


def test_agree_rejects_unknown_reduction():
    with pytest.raises(fsc.OptionError, match="reduce='mean'"):
        agree({"flops_fp32": 1.0}, reduce="mean")


def test_calibrate_rejects_unknown_base_profile():
    with pytest.raises(fsc.OptionError, match="'a100'"):
        calibrate("a100")
