"""``compile-overhead``: compile time of ``backend="freescale"`` (inner Inductor) against
plain ``backend="inductor"`` on :class:`fsc.bench.models.TinyRec` with a one-rank gloo group
(so the graphs hold real all-to-alls), forward plus backward, FX graph cache off for both.
Alternates the backends, discards a warm-up round, reports medians and their ratio."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    help: str
    main: Callable[[list[str], str], int]


def _compile_once(backend: Any, options: dict | None, batch: int, length: int) -> tuple[float, float]:
    import torch._dynamo
    from torch._inductor import config as inductor_config

    from fsc.bench.models import TinyRec

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyRec()
    ids = torch.randint(0, 512, (batch, length))
    compiled = torch.compile(model, backend=backend, options=options)
    with inductor_config.patch(fx_graph_cache=False):
        start = time.perf_counter()
        compiled(ids).backward()
        first = time.perf_counter() - start
        steps = []
        for _ in range(3):
            start = time.perf_counter()
            compiled(ids).backward()
            steps.append(time.perf_counter() - start)
    step = statistics.median(steps)
    return first - step, step


def run(argv: list[str], json_path: str) -> int:
    import torch.distributed as dist

    parser = argparse.ArgumentParser(prog="python -m fsc.bench compile-overhead")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/pg", rank=0, world_size=1)
        try:
            _compile_once("inductor", None, args.batch, args.length)  # warm-up: C++ toolchain, imports
            _compile_once("freescale", {"inner": "inductor"}, args.batch, args.length)
            rows: dict[str, list[float]] = {"inductor": [], "freescale": []}
            for _ in range(args.repeats):
                rows["inductor"].append(_compile_once("inductor", None, args.batch, args.length)[0])
                rows["freescale"].append(_compile_once("freescale", {"inner": "inductor"}, args.batch, args.length)[0])
        finally:
            dist.destroy_process_group()
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratios = [f / i for f, i in zip(rows["freescale"], rows["inductor"])]
    result = {
        "benchmark": "compile-overhead",
        "model": f"TinyRec(batch={args.batch}, length={args.length}), 1-rank gloo, forward+backward",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "repeats": args.repeats,
        "compile_s": rows,
        "median_compile_s": med,
        "median_ratio_freescale_over_inductor": statistics.median(ratios),
    }
    print(f"{'backend':<12}{'median compile s':>18}")
    for k, v in med.items():
        print(f"{k:<12}{v:>18.3f}")
    print(f"freescale / inductor (median of per-round ratios): {result['median_ratio_freescale_over_inductor']:.3f}")
    path = pathlib.Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


BENCH = Benchmark(name="compile-overhead", help="compile time of freescale vs inductor", main=run)
