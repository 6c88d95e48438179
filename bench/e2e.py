"""``e2e``: the HSTU example trained end to end under every competitor in the same run:
step time, throughput, bubble fraction, exposed communication, recompiles, peak memory
and compile time, per backend, on 2 CPU ranks (and 4 as a secondary table).

Backends (same model, data, seed and global batch; ``--backends`` picks a subset):

* ``eager``: the example as ``examples/hstu/train.py`` runs it uncompiled;
* ``inductor``: ``torch.compile(backend="inductor", fullgraph=True)``;
* ``inductor-overlap``: Inductor with its own overlap scheduling on
  (``aten_distributed_optimizations.enable_overlap_scheduling=True``) and the two CPU
  workarounds of :mod:`bench.inductor_peers` (``compute_estimator="analytical"``; the
  roofline's GPU numbers answered with the ``cpu`` device profile's);
* ``torchrec``: :mod:`bench.e2e_torchrec` (TorchRec's row-wise sharded
  ``EmbeddingCollection`` and ``TrainPipelineSparseDist``; its differences are listed
  there), when TorchRec is installed (``make bench`` installs it); otherwise the row is
  skipped with the reason;
* ``fs-lb``: ``backend="freescale"`` with the empty pass pipeline (Inductor underneath)
  and the balancer on (``--balance freescale`` of the example: assignment one step ahead,
  samples routed by one small all-to-all inside the step);
* ``fs-overlap``: ``backend="freescale"`` with the scheduling passes only
  (prioritize-collectives, split-collectives, overlap-schedule), no balancing;
* ``fs-attn``: only ``lower-attention`` (the example's SiLU attention replaced by
  ``fsc::jagged_attention``; on CPU that op runs its length-grouped PyTorch
  implementation, not the Triton kernels, which need a GPU), no balancing;
* ``fs-smfree``: only the opt-in ``sm-free-collectives{swap_all=true}`` pass (every
  all-to-all on the shared-memory transport; alone nothing overlaps the transfers, so the
  default ``swap_all=false`` would swap nothing), no balancing;
* ``fs-all``: balancing + the default pipeline (lower-attention and the scheduling passes)
  + ``sm-free-collectives``.

The jagged Triton attention kernels themselves are not run: Triton needs a GPU (on CPU they
run only under the interpreter); the README note says which rows lowered the attention.

**Measurement.** Per world size, ``--ranks`` processes on this machine, gloo over
127.0.0.1, one compute thread each. Every backend has its own copy of the model (same
initial weights) in the same ranks, and every step's batch is trained on by every backend
in turn, the order rotating from step to step (as ``waits``), so all backends see the same
batches and the same machine load. After ``--warmup`` steps, ``--steps`` *timed* steps
(``perf_counter``, nothing else running; the step's time is the slowest rank's) are
interleaved with ``--metered`` *metered* steps that run under the bubble meter
(:mod:`fsc.runtime.bubbles`, a CPU ``torch.profiler``; its per-operator overhead would
inflate eager more than compiled code, hence the separate timed steps). Reported per backend:

* ``median_step_ms``: median over timed steps; ``samples_per_s`` = global batch / that;
  ``step_vs_best_competitor``: ratio to the fastest of eager, inductor, inductor-overlap,
  torchrec (a ratio of medians); ``median_paired_step_ratio_vs_best_competitor``: median
  over steps of the per-step ratio (same batch, same moment);
* ``bubble_fraction``, ``exposed_comm_ms``, ``idle_ms``, ``compute_ms``,
  ``unattributed_ms``: the meter's summary over the metered steps (per rank medians, mean
  over ranks); ``bubble_fraction = (step - compute) / step``;
* ``recompiles``: graphs Dynamo compiled during the backend's steps after warm-up (max over
  ranks); ``graphs_compiled``: during warm-up;
* ``peak_mem_mb`` and ``compile_s``: with ``--isolate`` (default; ``--quick`` turns it off),
  from a second pass in which each backend runs alone in fresh rank processes with an empty
  Inductor cache of its own: ``compile_s`` = (sum of the warm-up steps' times) - warm-up x
  (median of the following steps), the slowest rank's (cold compile of forward and
  backward, plus any first-step overhead); ``peak_mem_mb`` = the largest peak resident set
  (``VmHWM``, reset by ``/proc/self/clear_refs`` after warm-up, so compilation is excluded)
  over the ranks during ``--isolate-steps`` steps. Without isolation both come from the
  shared run (``*_source`` says which): there the backends share one process and its
  Inductor cache (a kernel one backend built is reused by the next).

The load average is recorded before and after each phase: on a shared machine other
processes inflate every number, which is why the ratios are of interleaved runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.report import replace_section, write_json
from bench.spawn import run_gloo_ranks

BACKENDS = ("eager", "inductor", "inductor-overlap", "torchrec", "fs-lb", "fs-overlap", "fs-attn", "fs-smfree", "fs-all")
COMPETITORS = ("eager", "inductor", "inductor-overlap", "torchrec")
DEFAULT_DATA = "../shared/data/movielens-latest-small/ratings.csv"
GRADIENT_SYNC = "gradient all-reduce"
#: Communication the meter counts besides the functional collectives' waits: blocking c10d
#: calls (the balancer's routing exchange; TorchRec's all-to-alls, which gloo runs inside the
#: call) and TorchRec's waits on its all-to-all requests (record_function names of
#: torchrec 1.8.0, found by profiling a step).
EXTRA_WAITS = ("c10d::alltoall_base_", "c10d::allreduce_", "All2All_Seq_Req_Wait", "All2All_Seq_Req_WaitBackward",
               "## Request wait() ##", "## SplitsAllToAllAwaitable wait() ##",
               "## KJTAllToAllTensorsAwaitable wait() ##")
#: metered step indices start here; below it the meter is off (see BubbleMeter.warmup_steps)
_METERED_BASE = 1 << 30


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Variant:
    """How one backend trains."""

    name: str
    compiler: str
    """eager, inductor, inductor-overlap, freescale or torchrec"""
    passes: str | None = None
    """freescale's pipeline (None: the default one); "+sm-free" appends sm-free-collectives"""
    balance: bool = False

    def describe(self) -> str:
        if self.compiler == "freescale":
            pipe = "default pipeline" if self.passes is None else (self.passes or "empty pipeline")
            return f"freescale ({pipe}){' + balancer' if self.balance else ''}"
        return self.compiler


VARIANTS = {v.name: v for v in (
    Variant(name="eager", compiler="eager"),
    Variant(name="inductor", compiler="inductor"),
    Variant(name="inductor-overlap", compiler="inductor-overlap"),
    Variant(name="torchrec", compiler="torchrec"),
    Variant(name="fs-lb", compiler="freescale", passes="", balance=True),
    Variant(name="fs-overlap", compiler="freescale", passes="prioritize-collectives,split-collectives,overlap-schedule"),
    Variant(name="fs-attn", compiler="freescale", passes="lower-attention"),
    Variant(name="fs-smfree", compiler="freescale", passes="sm-free-collectives{swap_all=true}"),
    Variant(name="fs-all", compiler="freescale", passes="+sm-free", balance=True),
)}


# ----------------------------------------------------------------------------- one rank


def _freescale_options(variant: Variant, inner: str) -> dict[str, Any]:
    options = {"inner": inner}
    if variant.passes is None:
        return options
    from fsc.pass_manager import default_pipeline, format_pipeline

    if variant.passes == "+sm-free":
        return options | {"passes": f"{format_pipeline(default_pipeline())},sm-free-collectives"}
    return options | {"passes": variant.passes}


def _compile(model: torch.nn.Module, variant: Variant,
             fs_inner: str) -> tuple[Any, Callable[[], contextlib.AbstractContextManager]]:
    """The step function and a factory of the context each call runs in (compiles happen at calls)."""
    if variant.compiler == "eager":
        return model, contextlib.nullcontext
    if variant.compiler == "inductor":
        return torch.compile(model, backend="inductor", fullgraph=True), contextlib.nullcontext
    if variant.compiler == "inductor-overlap":
        from bench.inductor_peers import device_numbers, overlap_config_patches
        from fsc.analysis.cost_model import DEVICE_PROFILES

        # options, not a config patch: Dynamo tells cache entries apart by backend
        compiled = torch.compile(model, backend="inductor", fullgraph=True, options=overlap_config_patches())
        return compiled, lambda: device_numbers(DEVICE_PROFILES["cpu"])
    if variant.compiler == "freescale":
        options = _freescale_options(variant, fs_inner)
        return torch.compile(model, backend="freescale", fullgraph=True, options=options), contextlib.nullcontext
    raise ValueError(f"no compiler {variant.compiler!r}")


class _Data:
    """The example's batches for this rank, step by step (the same for every backend)."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int) -> None:
        from examples.hstu.data import leave_one_out, load_movielens, synthetic_histories
        from examples.hstu.model import HSTUConfig

        if args.data:
            histories = load_movielens(args.data)
        else:
            histories = synthetic_histories(num_users=args.synthetic_users, num_items=args.synthetic_items,
                                            seed=args.seed)
        self.train_h, _ = leave_one_out(histories)
        self.cfg = HSTUConfig(num_items=histories.num_items, num_ratings=histories.num_ratings, dim=args.dim,
                              heads=args.heads, layers=args.layers, max_len=args.max_len,
                              num_negatives=args.negatives, seed=args.seed)
        self.args, self.rank, self.world = args, rank, world
        self.per_rank = args.batch_size // world
        self._cache: dict[int, dict[str, Any]] = {}

    def users(self, step: int, rank: int | None = None) -> Any:
        from examples.hstu.model import global_batch_users

        r = self.rank if rank is None else rank
        everyone = global_batch_users(len(self.train_h), self.args.batch_size, self.args.seed, step)
        return everyone[r * self.per_rank : (r + 1) * self.per_rank]

    def lengths(self, step: int) -> Any:
        import numpy as np

        keep = self.cfg.max_len + 1
        return np.array([max(min(len(self.train_h.items[u]), keep) - 1, 0) for u in self.users(step)], dtype=np.int64)

    def get(self, step: int) -> dict[str, Any]:
        """``batch`` (JaggedBatch), ``negatives``, ``scale`` (the global trained-token count as a
        0-d tensor: every rank computes it from the global batch's users, no collective)."""
        if step not in self._cache:
            from examples.hstu.model import collate, sample_negatives, scale_tensor

            h, cfg = self.train_h, self.cfg
            users = self.users(step)
            batch = collate([h.items[u] for u in users], [h.ratings[u] for u in users],
                            [h.timestamps[u] for u in users], cfg.max_len)
            trained = 0
            for r in range(self.world):
                for u in self.users(step, r):
                    trained += int((h.items[u][-(cfg.max_len + 1):][1:] > 0).sum())
            # torchrec's pipeline asks up to two steps ahead: keep a few behind the newest
            self._cache = {k: v for k, v in self._cache.items() if k >= step - 4}
            self._cache[step] = {
                "batch": batch,
                "negatives": sample_negatives(cfg.num_items, cfg.num_negatives, self.args.seed, step, self.rank),
                "scale": scale_tensor(float(trained)),
            }
        return self._cache[step]


@dataclasses.dataclass(kw_only=True)
class _HstuRun:
    """A backend training the example's model (everything but torchrec)."""

    variant: Variant
    step_fn: Any
    context: Callable[[], contextlib.AbstractContextManager]
    buckets: Any
    opt: torch.optim.Optimizer
    marked: bool = False

    def step(self, data: _Data, step: int, plan: Any, router: Any, sync: Callable[[], Any]) -> torch.Tensor:
        inputs = data.get(step)
        batch = inputs["batch"]
        if self.variant.balance:
            batch = router.route(batch, plan)
        tensors = list(batch.tensors())
        if not self.marked:  # the token count changes every step: compile for any
            for t in tensors:
                torch._dynamo.mark_dynamic(t, 0)
            self.marked = True
        with self.context():
            loss = self.step_fn(*tensors, inputs["negatives"], inputs["scale"])
            loss.backward()
            with sync():
                self.buckets.wait()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.detach()


@dataclasses.dataclass(kw_only=True)
class _TorchRecRun:
    run: Any

    def step(self, data: _Data, step: int, plan: Any, router: Any, sync: Callable[[], Any]) -> torch.Tensor:
        # the pipeline reads its batches itself (up to two ahead); DDP's gradient all-reduce
        # is waited on inside backward, where no sync_wait can mark it
        return self.run.step().detach()


def _make_run(variant: Variant, data: _Data, args: argparse.Namespace, rank: int, world: int) -> Any:
    from examples.hstu.model import HSTU
    from examples.hstu.sharded import GradientBuckets

    if variant.compiler == "torchrec":
        from bench import e2e_torchrec

        def batch(step: int) -> Any:
            inputs = data.get(step)
            b = inputs["batch"]
            return e2e_torchrec.make_batch(*b.tensors(), inputs["negatives"], inputs["scale"])

        return _TorchRecRun(run=e2e_torchrec.build(data.cfg, batch, lr=args.lr, rank=rank, world=world))
    model = HSTU(data.cfg)  # seeded: every backend starts from the same weights
    step_fn, context = _compile(model, variant, args.fs_inner)
    return _HstuRun(variant=variant, step_fn=step_fn, context=context,
                    buckets=GradientBuckets(model.dense_parameters()),
                    opt=torch.optim.Adam(model.parameters(), lr=args.lr))


def _schedule(steps: int, metered: int) -> list[bool]:
    """After warm-up: which steps are metered (True) and which timed, spread evenly."""
    total = steps + metered
    return [(i + 1) * metered // total > i * metered // total for i in range(total)]


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train(rank: int, world: int, names: list[str], args: argparse.Namespace, metered_on: bool) -> dict[str, Any]:
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    import fsc
    data = _Data(args, rank, world)
    variants = [VARIANTS[n] for n in names]
    runs = {v.name: _make_run(v, data, args, rank, world) for v in variants}
    router = None
    if any(v.balance for v in variants):
        from examples.hstu.routing import Router
        from fsc.runtime.balancer import Balancer

        router = Router(Balancer(ranks=world, method="freescale",
                                 cost=lambda lengths: __import__("numpy").asarray(lengths, dtype="float64")))
    meter = None
    if metered_on and args.metered:
        from fsc.runtime.bubbles import WAIT_OPS, BubbleMeter

        meter = BubbleMeter(rank=rank, world=world, warmup_steps=_METERED_BASE, wait_ops=WAIT_OPS + EXTRA_WAITS)
    schedule = [False] * args.warmup + _schedule(args.steps, args.metered if metered_on else 0)
    total = len(schedule)
    step_ms: dict[str, list[float]] = {n: [] for n in names}
    warm_ms: dict[str, list[float]] = {n: [] for n in names}
    graphs: dict[str, int] = {n: 0 for n in names}
    recompiles: dict[str, int] = {n: 0 for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    passes: dict[str, Any] = {}
    meter_index: dict[int, str] = {}
    pending = router.plan_async(data.lengths(0)) if router else None
    peak_reset = False
    for step in range(total):
        if step == args.warmup:
            peak_reset = _reset_peak_rss()
        plan = None
        if router is not None:
            plan = pending.result()
            if step + 1 < total:
                pending = router.plan_async(data.lengths(step + 1))
        for ahead in range(3):  # batch making stays out of the timed steps (torchrec reads two ahead)
            data.get(step + ahead)
        metered = schedule[step]
        order = names[step % len(names) :] + names[: step % len(names)]
        for name in order:
            run = runs[name]
            before = counters["stats"]["unique_graphs"]
            if meter is not None and step >= args.warmup:
                index = step * len(names) + names.index(name)
                if metered:
                    index += _METERED_BASE
                    meter_index[index] = name
                outer, sync = meter.step(index), lambda: meter.sync_wait(GRADIENT_SYNC)
            else:
                outer, sync = contextlib.nullcontext(), contextlib.nullcontext
            with outer:
                start = time.perf_counter()
                loss = run.step(data, step, plan, router, sync)
                ms = (time.perf_counter() - start) * 1e3
            total_loss = loss.clone()
            dist.all_reduce(total_loss)  # as the example: the global loss (also a step barrier)
            losses[name].append(total_loss.item())
            compiled = counters["stats"]["unique_graphs"] - before
            if rank == 0 and args.verbose:
                print(f"e2e [{world} ranks] step {step}/{total} {name}: {ms:.0f} ms", file=sys.stderr, flush=True)
            if step < args.warmup:
                warm_ms[name].append(ms)
                graphs[name] += compiled
                if compiled and VARIANTS[name].compiler == "freescale" and name not in passes:
                    passes[name] = _pass_stats(fsc.last_compile())
            else:
                recompiles[name] += compiled
                if not metered:
                    step_ms[name].append(ms)
    peak = _peak_rss_mb()
    report = meter.finish() if meter is not None else None
    bubbles: dict[str, list[Any]] = {n: [] for n in names}
    overhead = None
    if report is not None:
        for s in report.steps:
            bubbles[meter_index[s.step]].append(s)
        overhead = report.overhead.get("profiler_start_stop_s")
    if router is not None:
        router.close()
    for run in runs.values():
        if isinstance(run, _HstuRun):
            run.buckets.remove()
    return {
        "rank": rank,
        "step_ms": step_ms,
        "warmup_ms": warm_ms,
        "graphs": graphs,
        "recompiles": recompiles,
        "final_loss": {n: v[-1] for n, v in losses.items()},
        "first_loss": {n: v[0] for n, v in losses.items()},
        "peak_rss_mb": peak,
        "peak_rss_after_warmup": peak_reset,
        "bubbles": bubbles if rank == 0 else None,
        "passes": passes,
        "tokens": data.get(total - 1)["batch"].num_tokens,
        "meter_start_stop_s": overhead,
    }


def _pass_stats(record: Any) -> dict[str, Any]:
    out = {}
    try:
        summaries = record.summary()
    except Exception as e:  # a record read back from a cache entry another rank is writing
        return {"error": f"{type(e).__name__}: {e}"}
    for kind, summary in summaries.items():
        out[kind] = {"fallback": summary["fallback"],
                     "passes": {name: p["stats"] for name, p in summary["passes"].items()}}
    return out


def _rank(rank: int, world: int, names: list[str], args: argparse.Namespace, metered: bool,
          cache: str) -> dict[str, Any]:
    """One rank (under :func:`bench.spawn.run_gloo_ranks`): its own Inductor cache, then train."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.format(rank=rank)
    # several compiled copies of one model class: one cache entry each
    with torch._dynamo.config.patch(capture_scalar_outputs=True, recompile_limit=64, accumulated_recompile_limit=1024):
        return _train(rank, world, names, args, metered)


def _run_ranks(world: int, names: list[str], args: argparse.Namespace, metered: bool,
               cache: str) -> list[dict[str, Any]]:
    """Train ``names`` on ``world`` spawned ranks; ``cache``: the Inductor cache directory
    (``{rank}`` is replaced by the rank)."""
    return run_gloo_ranks(_rank, world, names, args, metered, cache, timeout=args.timeout,
                          label=f"e2e ({', '.join(names)}; --timeout)")


# ----------------------------------------------------------------------------- results


def _compile_s(ranks: list[dict[str, Any]], name: str) -> float | None:
    """Warm-up steps' time beyond steady steps, the slowest rank's."""
    per_rank = []
    for r in ranks:
        warm, steady = r["warmup_ms"][name], r["step_ms"][name]
        if not warm or not steady:
            return None
        per_rank.append(max(sum(warm) - len(warm) * statistics.median(steady), 0.0) / 1e3)
    return max(per_rank)


def _steps(ranks: list[dict[str, Any]], name: str) -> list[float]:
    """Per timed step, the slowest rank's time."""
    return [max(vals) for vals in zip(*(r["step_ms"][name] for r in ranks))]


def _rows(world: int, names: list[str], ranks: list[dict[str, Any]], isolated: dict[str, list[dict[str, Any]]],
          args: argparse.Namespace) -> list[dict[str, Any]]:
    from fsc.runtime.bubble_trace import summarize

    rows = []
    for name in names:
        steps = _steps(ranks, name)
        median = statistics.median(steps)
        bubbles = ranks[0]["bubbles"][name] if ranks[0]["bubbles"] else []
        summary = summarize(bubbles) if bubbles else {}
        alone = isolated.get(name)
        row = {
            "backend": name,
            "ranks": world,
            "median_step_ms": median,
            "samples_per_s": args.batch_size / (median / 1e3),
            "bubble_fraction": summary.get("bubble_fraction"),
            "exposed_comm_ms": summary.get("exposed_comm_ms"),
            "recompiles": max(r["recompiles"][name] for r in ranks),
            "peak_mem_mb": max(r["peak_rss_mb"] for r in (alone or ranks)),
            "compile_s": _compile_s(alone or ranks, name),
            "peak_mem_source": ("isolated: VmHWM over the measured steps" if alone and all(
                r["peak_rss_after_warmup"] for r in alone) else "isolated: process max RSS" if alone else
                "shared run: process max RSS (all backends)"),
            "compile_s_source": "isolated, cold Inductor cache" if alone else
                                "shared run (Inductor cache shared by the backends and warmed by earlier runs)",
            "description": VARIANTS[name].describe(),
            "timed_steps": len(steps),
            "metered_steps": summary.get("steps", 0),
            "idle_ms": summary.get("idle_ms"),
            "compute_ms": summary.get("compute_ms"),
            "unattributed_ms": summary.get("unattributed_ms"),
            "meter_step_ms": summary.get("step_ms"),
            "graphs_compiled": max(r["graphs"][name] for r in ranks),
            "first_loss": ranks[0]["first_loss"][name],
            "final_loss": ranks[0]["final_loss"][name],
            "step_ms": steps,
        }
        if name in ranks[0]["passes"]:
            row["passes"] = ranks[0]["passes"][name]
        rows.append(row)
    by_name = {r["backend"]: r for r in rows}
    competitors = [by_name[n] for n in COMPETITORS if n in by_name]
    best = min(competitors, key=lambda r: r["median_step_ms"]) if competitors else None
    eager = by_name.get("eager")
    for row in rows:
        row["best_competitor"] = best["backend"] if best else None
        row["step_vs_best_competitor"] = row["median_step_ms"] / best["median_step_ms"] if best else None
        row["median_paired_step_ratio_vs_best_competitor"] = statistics.median(
            a / b for a, b in zip(row["step_ms"], best["step_ms"])) if best else None
        if eager and eager["bubble_fraction"] and row["bubble_fraction"] is not None:
            row["bubble_reduction_vs_eager"] = 1 - row["bubble_fraction"] / eager["bubble_fraction"]
    return rows


def _targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets for fs-all on this world size, as measured."""
    by_name = {r["backend"]: r for r in rows}
    fs = by_name.get("fs-all")
    if fs is None:
        return {}
    out: dict[str, Any] = {"step_vs_best_competitor": fs["step_vs_best_competitor"], "step_target": 0.85}
    out["step_met"] = fs["step_vs_best_competitor"] is not None and fs["step_vs_best_competitor"] <= 0.85
    red = fs.get("bubble_reduction_vs_eager")
    out.update(bubble_reduction_vs_eager=red, bubble_target=0.90, bubble_met=red is not None and red >= 0.90)
    ind = by_name.get("inductor")
    if ind and ind["compile_s"] and fs["compile_s"] is not None:
        ratio = fs["compile_s"] / ind["compile_s"]
        out.update(compile_vs_inductor=ratio, compile_target=1.10, compile_met=ratio <= 1.10)
    return out


def _attention_note(tables: dict[int, list[dict[str, Any]]]) -> str:
    lowered = sorted({row["backend"] for rows in tables.values() for row in rows
                      for graph in (row.get("passes") or {}).values()
                      if isinstance(graph, dict) and (graph["passes"].get("lower-attention") or {}).get("lowered")})
    gpu = "Triton's jagged attention kernels need a GPU, absent here"
    if lowered:
        return (f"attention: {gpu}; in {', '.join(lowered)} the lower-attention pass replaced the example's "
                "attention with fsc::jagged_attention (its CPU implementation).")
    return f"attention: {gpu}; no freescale row lowered the example's attention."


def _fmt(value: Any, digits: int = 1, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}%}" if pct else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of one world size's rows."""
    lines = ["| backend | step ms | samples/s | vs best competitor | bubble | exposed comm ms | recompiles | "
             "peak MB | compile s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {_fmt(r['median_step_ms'])} | {_fmt(r['samples_per_s'])} | "
                     f"{_fmt(r['step_vs_best_competitor'], 2)} | {_fmt(r['bubble_fraction'], 0, pct=True)} | "
                     f"{_fmt(r['exposed_comm_ms'])} | {r['recompiles']} | {_fmt(r['peak_mem_mb'], 0)} | "
                     f"{_fmt(r['compile_s'])} |")
    return "\n".join(lines)


def readme_section(result: dict[str, Any]) -> str:
    """The README text between the ``bench:e2e`` markers."""
    out = [f"End to end, the HSTU example, {result['setup']}. Machine: {result['machine']}; run "
           f"{result['date']}; load average before/after: {_fmt(result['load_average_before'][0], 2)} / "
           f"{_fmt(result['load_average_after'][0], 2)}. Command: `{result['command']}` (raw numbers in "
           f"`{result['json']}`, plot `{result['plot'] or '-'}`)."]
    for world, rows in result["tables"].items():
        out += ["", f"**{world} ranks**{' (secondary)' if world != result['primary_ranks'] else ''}:", "",
                table(rows)]
        t = result["targets"].get(world)
        if t:
            parts = [f"fs-all step time {_fmt(t['step_vs_best_competitor'], 2)}x the best competitor "
                     f"(target <= 0.85: {'met' if t['step_met'] else 'missed'})"]
            if t.get("bubble_reduction_vs_eager") is not None:
                parts.append(f"bubble fraction {_fmt(t['bubble_reduction_vs_eager'], 0, pct=True)} below eager's "
                             f"(target >= 90%: {'met' if t['bubble_met'] else 'missed'})")
            if t.get("compile_vs_inductor") is not None:
                parts.append(f"compile time {_fmt(t['compile_vs_inductor'], 2)}x inductor's (target <= 1.10: "
                             f"{'met' if t['compile_met'] else 'missed'})")
            out += ["", "Targets, as measured: " + "; ".join(parts) + "."]
    out += ["", "Step time: median over timed steps of the slowest rank (backends interleaved step by step); bubble "
            "and exposed communication: the bubble meter over separate metered steps; peak MB: "
            f"{result['peak_mem_note']}; compile s: {result['compile_note']}."]
    out += [f"Notes: {note}" for note in result["notes"]]
    return "\n".join(out)


def plot(result: dict[str, Any], path: str | pathlib.Path) -> None:
    """Step time and bubble fraction per backend, one row per world size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    worlds = list(result["tables"])
    fig = Figure(figsize=(11, 3.4 * len(worlds)))
    FigureCanvasAgg(fig)
    for i, world in enumerate(worlds):
        rows = result["tables"][world]
        names = [r["backend"] for r in rows]
        colors = ["#4c72b0" if n.startswith("fs-") else "#999999" for n in names]
        ax = fig.add_subplot(len(worlds), 2, 2 * i + 1)
        ax.bar(names, [r["median_step_ms"] for r in rows], color=colors)
        ax.set_ylabel("median step ms")
        ax.set_title(f"{world} ranks: step time (lower is better)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=35, labelsize=7)
        ax = fig.add_subplot(len(worlds), 2, 2 * i + 2)
        ax.bar(names, [r["bubble_fraction"] or 0.0 for r in rows], color=colors)
        ax.set_ylabel("bubble fraction")
        ax.set_ylim(0, 1)
        ax.set_title(f"{world} ranks: bubble fraction (bubble meter)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=35, labelsize=7)
    fig.suptitle(f"fsc e2e: {result['setup']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=100)


# ----------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="world sizes (default 2 4; --quick: 2)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: synthetic data, tiny model, few steps, no isolation pass")
    p.add_argument("--data", default=None, metavar="RATINGS_FILE",
                   help=f"MovieLens ratings file, read in place (default {DEFAULT_DATA} when it exists, else "
                        "synthetic; 'synthetic' forces synthetic)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after warm-up (default 30; quick 4)")
    p.add_argument("--metered", type=int, default=None, help="metered steps, interleaved (default 10; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 3; quick 2)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="also run each backend alone for compile time and peak memory (default on; quick off)")
    p.add_argument("--isolate-steps", type=int, default=4, help="steps after warm-up in the isolation pass")
    p.add_argument("--isolate-ranks", type=int, nargs="+", default=[2],
                   help="world sizes that get the isolation pass (default 2; others report the shared run's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch, sequences (default 32; quick 8)")
    p.add_argument("--max-len", type=int, default=None, help="default 200; quick 20")
    p.add_argument("--dim", type=int, default=None, help="default 64; quick 32")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="default 2; quick 1")
    p.add_argument("--negatives", type=int, default=None, help="default 128; quick 16")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fs-inner", choices=("inductor", "eager"), default="inductor",
                   help="freescale's inner compiler (eager: the passes' graphs run uncompiled; for smoke tests)")
    p.add_argument("--synthetic-users", type=int, default=None, help="default 2000; quick 200")
    p.add_argument("--synthetic-items", type=int, default=None, help="default 5000; quick 500")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1500.0, help="seconds before one phase's ranks are killed")
    p.add_argument("--verbose", action="store_true", help="rank 0 prints every backend's every step")
    p.add_argument("--readme", default=None, help="rewrite this README's <!-- bench:e2e --> section")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --json, e2e.png)")
    return p


_DEFAULTS = {  # name: (full, quick)
    "ranks": ([2, 4], [2]), "steps": (30, 4), "metered": (10, 2), "warmup": (3, 2), "isolate": (True, False),
    "batch_size": (32, 8), "max_len": (200, 20), "dim": (64, 32), "layers": (2, 1), "negatives": (128, 16),
    "synthetic_users": (2000, 200), "synthetic_items": (5000, 500),
}


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse and validate; bad options exit with a message naming the option."""
    parser = _parser()
    args = parser.parse_args(argv)
    for key, (full, quick) in _DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in VARIANTS]
    if unknown or not names:
        parser.error(f"--backends: unknown backend(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(BACKENDS)}")
    if len(set(names)) != len(names):
        parser.error(f"--backends: {args.backends!r} names a backend twice")
    args.names = names
    for key in ("steps", "warmup", "batch_size", "max_len", "dim", "heads", "layers", "negatives",
                "synthetic_users", "synthetic_items", "isolate_steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.metered < 0:
        parser.error(f"--metered must be >= 0, got {args.metered}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    for world in args.ranks:
        if world < 2:
            parser.error(f"--ranks: world sizes must be >= 2 (a sharded table needs two ranks), got {world}")
        if args.batch_size % world:
            parser.error(f"--batch-size {args.batch_size} must be divisible by every --ranks value ({world})")
    if args.data == "synthetic" or (args.data is None and args.quick):
        args.data = None
    elif args.data is None:
        args.data = DEFAULT_DATA if pathlib.Path(DEFAULT_DATA).exists() else None
    elif not pathlib.Path(args.data).is_file():
        parser.error(f"--data: no such file {args.data!r}")
    if args.readme is not None and not pathlib.Path(args.readme).is_file():
        parser.error(f"--readme: no such file {args.readme!r}")
    return args


def run(argv: list[str], json_path: str) -> int:
    args = parse(argv)
    from bench import e2e_torchrec

    names, notes = list(args.names), []
    if "torchrec" in names:
        why = e2e_torchrec.unavailable()
        if why is not None:
            names.remove("torchrec")
            notes.append(f"torchrec skipped: {why}")
            print(f"e2e: {notes[-1]}", file=sys.stderr)
    if not names:
        raise SystemExit("e2e: no backend left to run")
    args.names = names
    started = time.perf_counter()
    load_before = os.getloadavg()
    tables: dict[int, list[dict[str, Any]]] = {}
    bubble_steps: dict[int, dict[str, list[Any]]] = {}
    phases = []
    caches = tempfile.TemporaryDirectory(prefix="fsc-e2e-cache-")
    shared = os.path.join(caches.name, "shared")
    for world in args.ranks:
        isolated: dict[str, list[dict[str, Any]]] = {}
        if args.isolate and world in args.isolate_ranks:
            alone = argparse.Namespace(**{**vars(args), "steps": args.isolate_steps, "metered": 0})
            for name in names:
                load, t0 = os.getloadavg(), time.perf_counter()
                own = os.path.join(caches.name, f"{world}-{name}")  # empty: a cold compile per rank
                isolated[name] = _run_ranks(world, [name], alone, metered=False,
                                            cache=os.path.join(own, "rank{rank}"))
                phases.append({"ranks": world, "phase": f"isolated {name}", "wall_s": time.perf_counter() - t0,
                               "load_before": load, "load_after": os.getloadavg()})
                for rank_dir in pathlib.Path(own).glob("rank*"):  # content-addressed: merging is safe
                    shutil.copytree(rank_dir, shared, dirs_exist_ok=True)
        load = os.getloadavg()
        t0 = time.perf_counter()
        # one cache for every rank and world size, as a torchrun job on one host has by default
        ranks = _run_ranks(world, names, args, metered=True, cache=shared)
        phases.append({"ranks": world, "phase": "interleaved", "wall_s": time.perf_counter() - t0,
                       "load_before": load, "load_after": os.getloadavg()})
        tables[world] = _rows(world, names, ranks, isolated, args)
        bubble_steps[world] = ranks[0]["bubbles"] or {}
        print(f"\n{world} ranks:\n{table(tables[world])}", flush=True)
    data = f"MovieLens lengths ({args.data})" if args.data else (
        f"synthetic lognormal histories ({args.synthetic_users} users, {args.synthetic_items} items)")
    json_path = str(json_path)
    plot_path = args.plot or str(pathlib.Path(json_path).with_name("e2e.png"))
    notes += [
        "inductor-overlap: Inductor's aten overlap scheduler with compute_estimator=analytical and the roofline's "
        "GPU numbers answered with the cpu device profile's (without both it raises on a machine without a GPU).",
        "torchrec: row-wise sharding allows only FBGEMM's fused kernel, whose CPU path has no Adam: the table "
        "trains with fused EXACT_ADAGRAD (the dense part with Adam); CUDA streams absent on CPU, so "
        "TrainPipelineSparseDist only issues the next batch's id all-to-all early; the dense part runs eagerly; "
        "DDP's gradient all-reduce wait happens inside backward, so the meter cannot tell it from compute.",
        _attention_note(tables),
    ]
    if args.fs_inner != "inductor":
        notes.append(f"freescale rows ran with inner compiler {args.fs_inner!r}, not Inductor.")
    result: dict[str, Any] = {
        "benchmark": "e2e",
        "setup": (f"{data}, dim={args.dim} heads={args.heads} layers={args.layers} max_len={args.max_len} "
                  f"negatives={args.negatives} global batch={args.batch_size} sequences, seed {args.seed}; gloo ranks "
                  f"on 127.0.0.1, 1 thread each; warm-up {args.warmup}, {args.steps} timed + {args.metered} "
                  f"metered steps per backend, interleaved"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.system()} {platform.release()}, "
                   f"torch {torch.__version__}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m bench e2e --json", json_path, *argv]),
        "json": json_path,
        "plot": None,
        "primary_ranks": args.ranks[0],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        "phases": phases,
        "peak_mem_note": ("each backend alone in fresh rank processes, the largest rank's peak resident set (VmHWM) "
                          f"over the steps after warm-up (at {' and '.join(map(str, args.isolate_ranks))} ranks; "
                          "other world sizes: the shared run's process peak)" if args.isolate else
                          "the shared run's process peak RSS (all backends in one process)"),
        "compile_note": ("each backend alone in fresh processes with an empty Inductor cache: warm-up steps' time "
                         "minus as many steady steps, the slowest rank's (other world sizes: the same in the shared "
                         "run, whose Inductor cache is warm)" if args.isolate else
                         "shared run: warm-up steps' time minus as many steady steps (Inductor cache shared "
                         "between backends)"),
        "notes": notes,
        "targets": {world: _targets(rows) for world, rows in tables.items()},
        "tables": tables,
        "rows": [row for rows in tables.values() for row in rows],
    }
    try:
        plot(result, plot_path)
        result["plot"] = plot_path
        print(f"wrote {plot_path}")
    except ImportError as e:
        result["notes"].append(f"no plot: {e} (pip install 'fsc[bench]')")
    bubbles_path = pathlib.Path(plot_path).with_name("e2e-bubbles.png")
    runs = {name: steps for name, steps in bubble_steps.get(args.ranks[0], {}).items() if steps}
    if runs:
        from fsc.runtime.bubble_trace import plot_stacked_bars

        try:
            plot_stacked_bars(runs, bubbles_path)
            result["bubbles_plot"] = str(bubbles_path)
            print(f"wrote {bubbles_path}")
        except ImportError as e:
            result["notes"].append(f"no bubbles plot: {e}")
    caches.cleanup()
    write_json(json_path, {k: v for k, v in result.items() if k != "tables"})
    if args.readme:
        replace_section(args.readme, "e2e", readme_section(result))
        print(f"updated {args.readme}")
    return 0
