"""Benchmarks: ``python -m bench NAME [--json PATH] ...``. Each prints a table and
writes JSON; none is a unit test."""

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    help: str
    main: Callable[[list[str], str], int]
    json: str | None = None
    """Where results go without --json (default results/NAME.json)."""


def _benchmarks() -> dict[str, Benchmark]:
    from bench import (
        attention,
        balance,
        balance_runs,
        compile_overhead,
        cpu_profile,
        e2e,
        gpu_check,
        sample_cost,
        schedule,
        transport,
        waits,
    )

    return {
        "compile-overhead": Benchmark("compile-overhead", "compile time of freescale vs inductor", compile_overhead.run),
        "cpu-profile": Benchmark("cpu-profile", "measure the cpu device profile's numbers", cpu_profile.run),
        "schedule": Benchmark("schedule", "graph zoo + HSTU graphs: estimated exposed comm and makespan, freescale vs "
                              "Inductor's schedulers", schedule.run),
        "waits": Benchmark("waits", "HSTU on 2 gloo ranks: time blocked in exchange waits per step, freescale vs "
                           "inductor vs inductor-overlap", waits.run),
        "sample-cost": Benchmark("sample-cost", "graph-derived per-sample cost vs measured step times", sample_cost.run),
        "attention": Benchmark("attention", "jagged attention kernels vs PyTorch reference, FlexAttention, "
                               "generative-recommenders (GPU only)", attention.run),
        "transport": Benchmark("transport", "shared-memory all-to-all vs gloo over message sizes (and CUDA paths "
                               "on a GPU)", transport.run),
        "balance": Benchmark("balance", "balancer quality (max/LB) and speed per length distribution", balance.run),
        "e2e": Benchmark("e2e", "HSTU end to end on 2 and 4 gloo ranks: eager, inductor, inductor-overlap, torchrec "
                         "and freescale's techniques alone and together (make bench)", e2e.run),
        "gpu-check": Benchmark("gpu-check", "on a CUDA machine, check and time every CUDA path in under 8 minutes "
                               "(make gpu-check; --dry-run: its logic on CPU)", gpu_check.run,
                               json=gpu_check.DEFAULT_JSON),
        "balance-runs": Benchmark("balance-runs", "HSTU on 2 and 4 gloo ranks with and without balancing",
                                  balance_runs.run),
    }


BENCHMARKS = _benchmarks()

__all__ = ["BENCHMARKS", "Benchmark"]
