"""Calibration: measurements are real and positive, ranks agree on one profile even when
their own measurements differ, and the profile drives compilation."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from dist_harness import run_ranks

import fsc
from fsc.analysis import calibration
from fsc.analysis.calibration import agree, calibrate, fit_link, measure_compute, time_collectives


def test_measure_compute_returns_positive_finite_numbers():
    measured = measure_compute("cpu", repeats=1, matmul=128, copy_bytes=2**20)
    assert set(measured) == {"flops_fp32", "flops_half", "memory_bandwidth", "op_overhead"}
    assert all(math.isfinite(v) and v > 0 for v in measured.values())


def test_calibrate_without_process_group_replaces_compute_numbers_only(monkeypatch):
    # which numbers calibrate replaces does not depend on the measurement's size: a 128^2
    # matmul and a 1 MiB copy, not the defaults (1024^2 in bf16 and 64 MiB: ~7 s on 2 CPU cores)
    small = functools.partial(measure_compute, matmul=128, copy_bytes=2**20)
    monkeypatch.setattr(calibration, "measure_compute", small)
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


def test_fit_link_recovers_latency_and_bandwidth_from_three_sizes():
    latency, bandwidth = fit_link([(b, 2e-4 + b / 5e9) for b in (1024, 2**20, 16 * 2**20)])
    assert latency == pytest.approx(2e-4, rel=1e-6) and bandwidth == pytest.approx(5e9, rel=1e-6)


def test_fit_link_clamps_noise_and_needs_two_sizes():
    latency, bandwidth = fit_link([(0, 1e-3), (1000, 5e-4)])  # slower small message: no bandwidth to fit
    assert latency == 1e-3 and bandwidth > 1e29
    assert fit_link([(0, -1e-6), (1000, 1e-6)])[0] == 0.0
    with pytest.raises(ValueError, match="two sizes or more, not \\[1024\\]"):
        fit_link([(1024, 1e-3), (1024, 2e-3)])


def test_time_collectives_without_process_group_times_this_rank():
    times = time_collectives({"a": lambda: None, "b": lambda: sum(range(1000))}, samples=3, per_sample=2)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def _time_worker(rank: int, world: int) -> dict[str, float]:
    import time

    # rank 1 is 30 ms late in every sample of "late": the collective's time is its time
    return time_collectives({"late": lambda: time.sleep(0.03 if rank == 1 else 0.0), "prompt": lambda: None},
                            samples=3)


@pytest.mark.ranks
def test_time_collectives_gives_every_rank_the_slowest_ranks_time():
    first, second = run_ranks(_time_worker, 2)
    assert first == second
    assert first["late"] >= 0.03 > first["prompt"]
