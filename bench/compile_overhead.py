"""``compile-overhead``: compile time of ``backend="freescale"`` (inner Inductor) against
plain ``backend="inductor"`` on :class:`examples.tinyrec.TinyRec` with a one-rank gloo group
(so the graphs hold real all-to-alls), forward plus backward, FX graph cache off for both.
Alternates which backend compiles first in each round, discards a warm-up round, reports
medians and the median of per-round ratios."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import torch

from bench.report import replace_section, write_json


def _compile_once(backend: Any, options: dict | None, batch: int, length: int) -> tuple[float, float, float]:
    """(compile seconds, steady step seconds, seconds spent in fsc's pipeline)."""
    import torch._dynamo
    from torch._inductor import config as inductor_config

    from examples.tinyrec import TinyRec

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
    pipeline = 0.0
    if backend == "freescale":
        import fsc

        pipeline = sum(g.seconds for g in fsc.last_compile().graphs().values())
    return first - step, step, pipeline


def run(argv: list[str], json_path: str) -> int:
    import torch.distributed as dist

    parser = argparse.ArgumentParser(prog="python -m bench compile-overhead")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--readme", default=None, help="README whose compile-overhead table to rewrite")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/pg", rank=0, world_size=1)
        try:
            _compile_once("inductor", None, args.batch, args.length)  # warm-up: C++ toolchain, imports
            _compile_once("freescale", {"inner": "inductor"}, args.batch, args.length)
            rows: dict[str, list[float]] = {"inductor": [], "freescale": []}
            pipeline: list[float] = []
            runs = {"inductor": ("inductor", None), "freescale": ("freescale", {"inner": "inductor"})}
            for round_ in range(args.repeats):
                # Alternate which backend goes first: the first compile of a round is slower.
                for label in sorted(runs, reverse=round_ % 2 == 1):
                    compile_s, _, pipeline_s = _compile_once(*runs[label], args.batch, args.length)
                    rows[label].append(compile_s)
                    if label == "freescale":
                        pipeline.append(pipeline_s)
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
        "median_fsc_pipeline_s": statistics.median(pipeline),
    }
    print(f"{'backend':<12}{'median compile s':>18}")
    for k, v in med.items():
        print(f"{k:<12}{v:>18.3f}")
    print(f"freescale / inductor (median of per-round ratios): {result['median_ratio_freescale_over_inductor']:.3f}")
    print(f"time inside fsc's pipeline (forward + backward): {result['median_fsc_pipeline_s'] * 1e3:.1f} ms")
    write_json(json_path, result)
    if args.readme:
        replace_section(args.readme, "compile-overhead", table(result, json_path))
        print(f"updated {args.readme}")
    return 0


def table(result: dict[str, Any], json_path: str) -> str:
    med = result["median_compile_s"]
    return "\n".join(
        [
            f"Compile time, {result['model']}; {result['machine']}; median of {result['repeats']} "
            f"(`python -m bench compile-overhead`, raw numbers in `{json_path}`):",
            "",
            "| backend | median compile s | ratio to inductor |",
            "|---|---:|---:|",
            f"| inductor | {med['inductor']:.2f} | 1.00 |",
            f"| freescale (inner inductor) | {med['freescale']:.2f} | {result['median_ratio_freescale_over_inductor']:.2f} |",
            "",
            f"Time inside fsc's own pipeline (passes, invariant checks, estimates, records), forward + backward: "
            f"{result['median_fsc_pipeline_s'] * 1e3:.0f} ms "
            f"({100 * result['median_fsc_pipeline_s'] / med['inductor']:.0f}% of inductor's median compile).",
        ]
    )

