"""Benchmarks: ``python -m bench NAME [--json PATH] ...``. Each prints a table and
writes JSON; none is a unit test."""

import dataclasses
import importlib
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    module: str
    """The module under ``bench`` whose ``run(argv, json_path) -> int`` runs it; imported only
    when the benchmark runs, so that importing one helper (``bench.spawn`` in every rank
    process a test or benchmark starts) does not import every benchmark."""
    help: str
    json: str | None = None
    """Where results go without --json (default results/NAME.json)."""

    @property
    def main(self) -> Callable[[list[str], str], int]:
        return importlib.import_module(f"bench.{self.module}").run


_B = Benchmark
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    _B("compile-overhead", "compile_overhead", "compile time of freescale vs inductor"),
    _B("cpu-profile", "cpu_profile", "measure the cpu device profile's numbers"),
    _B("schedule", "schedule", "graph zoo + HSTU graphs: estimated exposed comm and makespan, freescale vs "
       "Inductor's schedulers"),
    _B("waits", "waits", "HSTU on 2 gloo ranks: time blocked in exchange waits per step, freescale vs inductor vs "
       "inductor-overlap"),
    _B("sample-cost", "sample_cost", "graph-derived per-sample cost vs measured step times"),
    _B("attention", "attention", "jagged attention kernels vs PyTorch reference, FlexAttention, "
       "generative-recommenders (GPU only)"),
    _B("attention-cpu", "attention_cpu", "lower-attention on CPU: dense attention training steps (SDPA, softmax, "
       "bmm) under inductor, freescale (kept) and freescale with dense_on_cpu (lowered), interleaved"),
    _B("transport", "transport", "shared-memory all-to-all vs gloo over message sizes"),
    _B("balance", "balance", "balancer quality (max/LB) and speed per length distribution"),
    _B("e2e", "e2e", "HSTU end to end on 2 and 4 gloo ranks: eager, inductor, inductor-overlap, torchrec and "
       "freescale's techniques alone and together (make bench)"),
    _B("gpu-check", "gpu_check", "on a CUDA machine, check and time every CUDA path in under 8 minutes "
       "(make gpu-check; --dry-run: its logic on CPU)", json="results/gpu.json"),
    _B("torchrec-models", "torchrec_models", "TorchRec DMP models (EBC, EC) on 2 and 4 gloo ranks: eager, inductor "
       "and fsc (fsc.integrations.torchrec), interleaved"),
    _B("balance-runs", "balance_runs", "HSTU on 2 and 4 gloo ranks with and without balancing"),
]}

__all__ = ["BENCHMARKS", "Benchmark"]
