"""``waits``: time the HSTU example's training steps spend blocked in the embedding
exchange's waits, measured for real on CPU ranks, per backend.

Setup: ``--ranks`` (default 2) processes spawned on this machine, a gloo group over
127.0.0.1 (``GLOO_SOCKET_IFNAME=lo`` when the loopback interface is called ``lo``), one
compute thread each. Each trains the HSTU example with the example's own training step
(``examples.hstu.train.Trainer``: same model, batches, sharded item table, bucketed
gradient all-reduce, Adam; ``--balance none``; imported from ``examples/``, so run from a
source checkout) with a small config (default: dim 64, 2 heads, 2 layers, max_len 50,
padded per-sequence attention, 8 negatives per sample, global batch 32 sequences) on
synthetic histories (2000 users, 5000 items, lognormal lengths), or on the
histories of a MovieLens ratings file with ``--lengths-from`` (read in place, never
copied). Backends, each with its own copy of the model (same initial weights) in the same
ranks:

* ``freescale``: ``torch.compile(backend="freescale")`` with default options (inner
  Inductor, default pipeline, ``cpu`` device profile);
* ``inductor``: ``torch.compile(backend="inductor")``, Inductor's defaults;
* ``inductor-overlap``: ``torch.compile(backend="inductor", options=...)`` with Inductor's
  own overlap scheduling on (``aten_distributed_optimizations.enable_overlap_scheduling=True``,
  its default ``insert_overlap_deps``), plus the two CPU workarounds of
  :mod:`bench.inductor_peers`: ``compute_estimator="analytical"`` and the roofline's
  device numbers answered with the ``cpu`` profile's (Triton has no driver here). The
  JSON lists the counters Inductor's overlap scheduler bumps, as proof that it ran, and
  the number of graphs each rank compiled (one per backend).

Measurement: every step's batch is trained on by every backend in turn (the order rotates
from step to step), so all backends see the same batches and the same machine load; ranks
synchronise at each backend's step (the loop's all-reduces). After ``--warmup`` steps
(compiles and recompiles), ``--steps`` steps run under ``torch.profiler`` (CPU activity
only), each backend's step marked with ``record_function``. Per backend and step: the
summed duration of the ``_c10d_functional::wait_tensor`` events inside it, excluding those
of the gradient all-reduce's ``wait()`` (issued outside the compiled graphs, the same for
every backend; reported separately), and its wall time (``perf_counter``, profiler on for
every backend alike). Reported: medians over steps of the per-step mean over ranks (waits)
and of rank 0's step time, their ratios to ``inductor``, and the medians of the per-step
differences to ``inductor`` (paired: same batch, same moment). A wait also covers waiting
for the other rank to reach the exchange (ranks get different token counts). The load
average is recorded: on a shared machine other processes inflate both numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.report import markdown_table, replace_section, write_json
from bench.spawn import run_gloo_ranks

BACKENDS = ("freescale", "inductor", "inductor-overlap")
STEP = "bench.waits.step"
ALLREDUCE_WAIT = "bench.waits.gradient_allreduce_wait"
WAIT_OP = "_c10d_functional::wait_tensor"


def _compile(model: torch.nn.Module, backend: str) -> tuple[Any, Callable[[], contextlib.AbstractContextManager]]:
    """The compiled step function, and a factory of the context every call of it must run
    in (compiles happen at calls: the first, and any recompile)."""
    def context(*patches: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], contextlib.ExitStack]:
        def enter() -> contextlib.ExitStack:
            stack = contextlib.ExitStack()
            stack.enter_context(torch._dynamo.config.patch(capture_scalar_outputs=True))  # data-dependent splits
            for patch in patches:
                stack.enter_context(patch())
            return stack

        return enter

    if backend == "freescale":
        return torch.compile(model, backend="freescale", fullgraph=True), context()
    if backend == "inductor":
        return torch.compile(model, backend="inductor", fullgraph=True), context()
    if backend == "inductor-overlap":
        from bench.inductor_peers import device_numbers, overlap_config_patches
        from fsc.analysis.cost_model import DEVICE_PROFILES

        # As options, not a config patch around the calls: Dynamo tells cache entries apart
        # by backend, and a plain "inductor" entry would otherwise serve this model too.
        compiled = torch.compile(model, backend="inductor", fullgraph=True, options=overlap_config_patches())
        return compiled, context(lambda: device_numbers(DEVICE_PROFILES["cpu"]))
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def _per_step(prof: Any, backends: list[str], steps: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per backend: (graph waits, gradient all-reduce waits) in ms per measured step."""
    from fsc.runtime.bubbles import wait_time_by_range

    events = list(prof.events())
    ranges = []
    for e in events:
        if e.name.startswith(STEP + "."):
            backend, step = e.name[len(STEP) + 1 :].rsplit(".", 1)
            ranges.append((e.time_range.start, e.time_range.end, (backend, int(step))))
    excluded = [(e.time_range.start, e.time_range.end) for e in events if e.name == ALLREDUCE_WAIT]
    spans = ((e.name, e.time_range.start, e.time_range.end) for e in events)
    out = {b: ([0.0] * steps, [0.0] * steps) for b in backends}
    # FunctionEvent times are in microseconds
    for (backend, step), (graph_us, allreduce_us) in wait_time_by_range(spans, ranges, excluded,
                                                                         wait_ops=(WAIT_OP,)).items():
        out[backend][0][step] += graph_us / 1e3
        out[backend][1][step] += allreduce_us / 1e3
    return out


def _train(rank: int, world: int, backends: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from examples.hstu.data import leave_one_out, load_movielens, synthetic_histories
    from examples.hstu.model import HSTUConfig, global_batch_users, model_inputs, read_batch, scale_tensor
    from examples.hstu.train import Trainer

    if args.lengths_from:
        histories = load_movielens(args.lengths_from)
    else:
        histories = synthetic_histories(num_users=args.synthetic_users, num_items=args.synthetic_items,
                                        seed=args.seed)
    train_h, _ = leave_one_out(histories)
    cfg = HSTUConfig(num_items=histories.num_items, num_ratings=histories.num_ratings, dim=args.dim,
                     heads=args.heads, layers=args.layers, max_len=args.max_len, num_negatives=args.negatives,
                     seed=args.seed, attention=args.attention)
    # the example's training step, one trainer (same initial weights) per backend
    trainers = {b: Trainer.create(cfg, lr=1e-3, compile=lambda model, b=b: _compile(model, b)) for b in backends}
    per_rank = args.batch_size // world
    step_ms: dict[str, list[float]] = {b: [] for b in backends}
    losses: dict[str, float] = {}
    tokens: list[int] = []
    graphs_after_warmup = 0
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    for step in range(args.warmup + args.steps):
        measured = step - args.warmup
        if measured == 0:
            graphs_after_warmup = counters["stats"]["unique_graphs"]
            profiler.start()
        # as examples/hstu/train.py's loop
        users = global_batch_users(len(train_h), args.batch_size, args.seed, step)
        batch = read_batch(train_h, users[rank * per_rank : (rank + 1) * per_rank], cfg, seed=args.seed, step=step)
        trained = torch.tensor([float((batch.targets > 0).sum())])
        dist.all_reduce(trained)
        inputs = model_inputs(batch, scale_tensor(trained.item()), cfg)
        # Rotate who goes first, so no backend always runs right after the same other one.
        order = backends[step % len(backends) :] + backends[: step % len(backends)]
        for backend in order:
            marker = (torch.profiler.record_function(f"{STEP}.{backend}.{measured}") if measured >= 0
                      else contextlib.nullcontext())
            start = time.perf_counter()
            with marker:
                loss = trainers[backend].step(inputs, sync=lambda: torch.profiler.record_function(ALLREDUCE_WAIT))
                total = loss.clone()
                dist.all_reduce(total)
                losses[backend] = total.item()
            if measured >= 0:
                step_ms[backend].append((time.perf_counter() - start) * 1e3)
        if measured >= 0:
            tokens.append(batch.num_tokens)
    profiler.stop()
    waits = _per_step(profiler, backends, args.steps)
    for trainer in trainers.values():
        trainer.close()
    return {
        "backends": {
            b: {"wait_ms": waits[b][0], "allreduce_wait_ms": waits[b][1], "step_ms": step_ms[b],
                "final_loss": losses[b]}
            for b in backends
        },
        "tokens": tokens,
        "graphs_compiled": counters["stats"]["unique_graphs"],
        # counters Inductor's overlap scheduler bumps when it runs: proof that it did
        "overlap_scheduler_counters": sorted(k for k in counters["inductor"] if k.startswith("overlap_scheduling")),
        "recompiles_after_warmup": counters["stats"]["unique_graphs"] - graphs_after_warmup,
    }


def _run_ranks(backends: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    return run_gloo_ranks(_train, args.ranks, backends, args, timeout=args.timeout, label="waits (--timeout)")


def _row(backend: str, ranks: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    mine = [r["backends"][backend] for r in ranks]
    per_step_wait = [statistics.fmean(m["wait_ms"][k] for m in mine) for k in range(steps)]
    per_step_allreduce = [statistics.fmean(m["allreduce_wait_ms"][k] for m in mine) for k in range(steps)]
    return {
        "backend": backend,
        "ranks": len(ranks),
        "median_wait_ms": statistics.median(per_step_wait),
        "median_step_ms": statistics.median(mine[0]["step_ms"]),
        "steps": steps,
        "median_wait_ms_per_rank": [statistics.median(m["wait_ms"]) for m in mine],
        "median_allreduce_wait_ms": statistics.median(per_step_allreduce),
        "final_loss": mine[0]["final_loss"],
        "wait_ms": per_step_wait,
        "step_ms": mine[0]["step_ms"],
    }


def run(argv: list[str], json_path: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench waits")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma-separated subset of {','.join(BACKENDS)}")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="measured steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps before measuring (compiles, recompiles)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch: sequences per step over all ranks")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--negatives", type=int, default=8, help="sampled negatives per sample")
    parser.add_argument("--attention", choices=("padded", "jagged", "dense"), default="padded",
                        help="the example's attention form (dense: over all of a rank's tokens)")
    parser.add_argument("--synthetic-users", type=int, default=2000)
    parser.add_argument("--synthetic-items", type=int, default=5000)
    parser.add_argument("--lengths-from", default=None, metavar="RATINGS_FILE",
                        help="train on this MovieLens ratings file's histories (read in place), "
                             "not synthetic ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds before the ranks are killed")
    parser.add_argument("--readme", default=None, help="rewrite this README's <!-- bench:waits --> section")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if args.batch_size % args.ranks:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by --ranks {args.ranks}")
    load_before = os.getloadavg()
    started = time.perf_counter()
    ranks = _run_ranks(backends, args)
    rows = [_row(backend, ranks, args.steps) for backend in backends]
    base = next((r for r in rows if r["backend"] == "inductor"), None)
    for row in rows:
        if base is not None:
            row["wait_vs_inductor"] = row["median_wait_ms"] / base["median_wait_ms"] if base["median_wait_ms"] else None
            row["step_vs_inductor"] = row["median_step_ms"] / base["median_step_ms"]
            # Paired by step (same batch, same moment): steadier than a ratio of medians on a busy machine.
            row["median_paired_wait_diff_vs_inductor_ms"] = statistics.median(
                a - b for a, b in zip(row["wait_ms"], base["wait_ms"]))
            row["median_paired_step_diff_vs_inductor_ms"] = statistics.median(
                a - b for a, b in zip(row["step_ms"], base["step_ms"]))
    data = "synthetic" if not args.lengths_from else f"MovieLens histories from {args.lengths_from}"
    result = {
        "benchmark": "waits",
        "setup": (f"HSTU example ({args.attention} attention), {args.ranks} gloo ranks on 127.0.0.1, 1 thread each; "
                  f"dim={args.dim} heads={args.heads} layers={args.layers} max_len={args.max_len} "
                  f"negatives={args.negatives} per sample "
                  f"global batch={args.batch_size} sequences; {data}; backends interleaved step by step; "
                  f"warm-up {args.warmup} steps, {args.steps} measured under torch.profiler (CPU)"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        "median_tokens_per_rank": statistics.median(t for r in ranks for t in r["tokens"]),
        "graphs_compiled_per_rank": [r["graphs_compiled"] for r in ranks],
        "overlap_scheduler_counters": ranks[0]["overlap_scheduler_counters"],
        "recompiles_after_warmup": max(r["recompiles_after_warmup"] for r in ranks),
        "rows": rows,
    }
    def fmt(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"{'backend':<18}{'ranks':>6}{'median wait ms':>16}{'median step ms':>16}{'steps':>7}"
          f"{'wait/inductor':>15}{'step/inductor':>15}{'paired wait diff':>18}{'paired step diff':>18}"
          f"{'allreduce wait ms':>19}")
    for row in rows:
        print(f"{row['backend']:<18}{row['ranks']:>6}{row['median_wait_ms']:>16.3f}{row['median_step_ms']:>16.3f}"
              f"{row['steps']:>7}{fmt(row.get('wait_vs_inductor'), 3):>15}{fmt(row.get('step_vs_inductor'), 3):>15}"
              f"{fmt(row.get('median_paired_wait_diff_vs_inductor_ms'), 3):>18}"
              f"{fmt(row.get('median_paired_step_diff_vs_inductor_ms'), 3):>18}"
              f"{row['median_allreduce_wait_ms']:>19.3f}")
    print(f"load average before/after: {load_before} / {result['load_average_after']}; total {result['wall_s']:.0f} s")
    write_json(json_path, result)
    if args.readme:
        lines = [f"Real time blocked in the embedding exchange's waits, per step ({result['setup']}; "
                 f"{result['machine']}; load average before/after {load_before[0]:.2f} / "
                 f"{result['load_average_after'][0]:.2f}; `python -m bench waits --readme README.md`, "
                 "`results/waits.json`; medians over steps, ratios to inductor):", ""]
        lines += markdown_table(
            ["backend", "wait ms", "step ms", "wait / inductor", "step / inductor", "paired wait diff ms"],
            [[row["backend"], f"{row['median_wait_ms']:.2f}", f"{row['median_step_ms']:.1f}",
              fmt(row.get("wait_vs_inductor"), 3), fmt(row.get("step_vs_inductor"), 3),
              fmt(row.get("median_paired_wait_diff_vs_inductor_ms"), 2)] for row in rows], numeric=5)
        replace_section(args.readme, "waits", "\n".join(lines))
    return 0
