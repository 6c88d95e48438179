"""``e2e``: the HSTU example trained end to end by fsc and by its peers, each peer written
as its users write it, in the same run: step time, throughput, bubble fraction, exposed
communication, recompiles, peak memory and compile time, on 2 and 4 CPU ranks; what each
of fsc's techniques earns on its own, against the best fair peer.

**One model source.** Every row trains ``examples/hstu/model.py`` with the example's own
training step (``examples.hstu.train.Trainer``; TorchRec: its pipeline around the example's
loss), the same data, seed, global batch and negatives (drawn per sample, keyed by the
sample, so balancing never changes the maths: every row starts from the same loss). The
attention form is a model option (``HSTUConfig.attention``): ``padded`` per sequence (what
generative-recommenders' PyTorch reference does), ``jagged`` (length-grouped), or
``dense`` over all of a rank's tokens (nobody's form; never a fair peer). Each peer runs
its fastest per-sequence form (:data:`PEER_FORMS`, measured); the freescale rows run the
same form as the inductor peer (their inner compiler), ``--attention`` to change it.
``NAME@FORM`` in ``--backends`` runs a row in another form (that is how the forms were
chosen).

Peers:

* ``eager``: the example uncompiled;
* ``inductor``: ``torch.compile(backend="inductor", fullgraph=True)``;
* ``inductor-overlap``: Inductor with its own overlap scheduling on
  (``aten_distributed_optimizations.enable_overlap_scheduling=True``) and the two CPU
  workarounds of :mod:`bench.inductor_peers` (``compute_estimator="analytical"``; the
  roofline's GPU numbers answered with the ``cpu`` device profile's);
* ``torchrec``: :mod:`bench.e2e_torchrec` (TorchRec's row-wise sharded
  ``EmbeddingCollection`` and ``TrainPipelineSparseDist``; its differences are listed
  there), when TorchRec is installed (``make bench`` installs it); otherwise the row is
  skipped with the reason.

fsc, one technique at a time (``backend="freescale"``, Inductor underneath):

* ``fs-none``: the empty pass pipeline, no balancing (the backend's own cost: a control);
* ``fs-lb``: the balancer only (``--balance freescale`` of the example, cost
  ``examples.hstu.model.sample_cost``: assignment one step ahead, samples routed by one
  small all-to-all inside the step), empty pipeline;
* ``fs-overlap``: the scheduling passes only (prioritize-collectives, split-collectives,
  overlap-schedule);
* ``fs-smfree``: only the opt-in ``sm-free-collectives{swap_all=true}`` pass (every
  all-to-all on the shared-memory transport; alone nothing overlaps the transfers, so the
  default ``swap_all=false`` would swap nothing);
* ``fs-attn``: only ``lower-attention`` (attention it recognises replaced by
  ``fsc::jagged_attention``, on CPU its length-grouped PyTorch implementation); the row's
  ``attention_lowering`` says whether it recognised the form this run used;
* ``fs-all``: balancing + the default pipeline + ``sm-free-collectives``;
* ``fs-pipe``: the whole step in the compiler, :class:`fsc.TrainPipeline`
  (``examples.hstu.train.pipeline``: the next batch's item exchange prefetched inside this
  step, the dense gradients' all-reduce in the compiled backward) with the balancer, the
  scheduling passes and ``sm-free-collectives``, and *without* ``lower-attention`` (so
  attention cannot flatter it);
* ``fs-all-pipe``: ``fs-all`` trained by :class:`fsc.TrainPipeline`.

Every row trains the item table with ``--table-optimizer`` (default ``adagrad``: what the
TorchRec peer's fused kernel runs; the pipeline needs a row-sparse one) and the dense part
with Adam, so every row trains the same maths.

**Measurement, without bias.** Per world size, ``--ranks`` processes on this machine,
gloo over 127.0.0.1, one compute thread each. Every configuration has its own copy of the
model (same initial weights) in the same ranks, and every step's batch is trained on by
every configuration in turn, in an order shuffled per step (seeded, the same on every
rank), so all see the same batches and the same machine load and none always follows the
same other one. ``--twin NAME`` adds a second copy of one configuration (``NAME-twin``;
by default of ``inductor``): its ratio to the original must come out as "no measurable
difference", or the harness favours one position. After
``--warmup`` steps, ``--steps`` *timed* steps (``perf_counter``; the step's time is the
slowest rank's) are interleaved with ``--metered`` *metered* steps under the bubble meter
(:mod:`fsc.runtime.bubbles`, a CPU ``torch.profiler``, whose per-operator overhead would
inflate eager more than compiled code, hence separate steps). The whole interleaved run
is repeated ``--repeats`` times (fresh rank processes each time, default 3).

Reported per row (:mod:`bench.e2e_report`): ``median_step_ms`` (median over repeats of
each repeat's median), ``samples_per_s``; ``step_vs_best_competitor``: median over repeats
of the ratio to the best fair peer (the fastest per-sequence peer row), ``ratio_spread``
(min..max over repeats) and ``verdict`` ("faster", "slower", or "no measurable
difference" when the spread contains 1); the bubble meter's ``bubble_fraction``,
``exposed_comm_ms``, ``idle_ms``, ``compute_ms``, ``unattributed_ms`` over every repeat's
metered steps; ``recompiles`` after warm-up; ``peak_mem_mb`` and ``compile_s`` with
``--isolate`` (each configuration alone in fresh rank processes with an empty Inductor
cache: warm-up time minus as many steady steps, the slowest rank's; the largest ``VmHWM``
after warm-up), else from the shared run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench import e2e_report
from bench.report import replace_section, write_json
from bench.spawn import run_gloo_ranks
from examples.hstu.model import ATTENTION_FORMS

BACKENDS = ("eager", "inductor", "inductor-overlap", "torchrec", "fs-none", "fs-lb", "fs-overlap", "fs-smfree",
            "fs-attn", "fs-all", "fs-pipe", "fs-all-pipe")
#: rows every world size runs (the others run at --ablate-ranks only)
HEADLINE = ("fs-all", "fs-pipe", "fs-all-pipe")
#: the scheduling passes and SM-free, without lower-attention (so attention cannot flatter us)
NO_ATTENTION = "prioritize-collectives,split-collectives,overlap-schedule,sm-free-collectives"
PEERS = ("eager", "inductor", "inductor-overlap", "torchrec")
#: Each peer's fastest per-sequence attention form, measured on the benchmark's data and model
#: (MovieLens latest-small, max_len 200, dim 64, 2 layers, global batch 32, 8 negatives per
#: sample) at 2 ranks on a shared 2-core x86 machine (load average about 2), interleaved:
#: ``python -m bench e2e --backends eager@padded,eager@jagged,inductor@padded,inductor@jagged,
#: inductor-overlap@padded,inductor-overlap@jagged,torchrec@padded,torchrec@jagged --ranks 2
#: --steps 12 --metered 0 --warmup 2 --repeats 2 --no-isolate``. Median step ms (repeats
#: 1 / 2), padded vs jagged: eager 355/343 vs 186/189, inductor 172/174 vs 103/101,
#: inductor-overlap 182/184 vs 102/100, torchrec 355/346 vs 191/190: length-grouped wins
#: for every peer (padding to the batch's longest of 200 wastes most of the work).
PEER_FORMS = {"eager": "jagged", "inductor": "jagged", "inductor-overlap": "jagged", "torchrec": "jagged"}
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
    pipeline: bool = False
    """trained by ``fsc.TrainPipeline`` (next batch's exchange and the gradient all-reduce in the step)"""

    def describe(self) -> str:
        if self.compiler == "freescale":
            pipe = "default pipeline" if self.passes is None else (self.passes or "empty pipeline")
            return (f"freescale ({pipe}){' + balancer' if self.balance else ''}"
                    f"{' + TrainPipeline' if self.pipeline else ''}")
        return self.compiler


VARIANTS = {v.name: v for v in (
    Variant(name="eager", compiler="eager"),
    Variant(name="inductor", compiler="inductor"),
    Variant(name="inductor-overlap", compiler="inductor-overlap"),
    Variant(name="torchrec", compiler="torchrec"),
    Variant(name="fs-none", compiler="freescale", passes=""),
    Variant(name="fs-lb", compiler="freescale", passes="", balance=True),
    Variant(name="fs-overlap", compiler="freescale", passes="prioritize-collectives,split-collectives,overlap-schedule"),
    Variant(name="fs-smfree", compiler="freescale", passes="sm-free-collectives{swap_all=true}"),
    Variant(name="fs-attn", compiler="freescale", passes="lower-attention"),
    Variant(name="fs-all", compiler="freescale", passes="+sm-free", balance=True),
    Variant(name="fs-pipe", compiler="freescale", passes=NO_ATTENTION, balance=True, pipeline=True),
    Variant(name="fs-all-pipe", compiler="freescale", passes="+sm-free", balance=True, pipeline=True),
)}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Row:
    """One configuration of a run: a variant, the attention form of its model source, and
    the row's name (``inductor``, ``inductor@padded``, ``fs-all``, ``inductor-twin``)."""

    name: str
    variant: Variant
    attention: str
    twin_of: str | None = None

    @property
    def peer(self) -> bool:
        return self.variant.compiler != "freescale"

    def describe(self) -> str:
        return f"{self.variant.describe()}, {self.attention} attention"


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
    """The example's batches for this rank, step by step (the same for every configuration)."""

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
                              num_negatives=args.negatives, seed=args.seed, attention=args.attention,
                              attention_groups=args.attention_groups)
        self.args, self.rank, self.world = args, rank, world
        self.per_rank = args.batch_size // world
        self._cache: dict[int, dict[str, Any]] = {}

    def users(self, step: int, rank: int | None = None) -> Any:
        from examples.hstu.model import global_batch_users

        r = self.rank if rank is None else rank
        everyone = global_batch_users(len(self.train_h), self.args.batch_size, self.args.seed, step)
        return everyone[r * self.per_rank : (r + 1) * self.per_rank]

    def lengths(self, step: int) -> Any:
        from examples.hstu.train import token_lengths

        return token_lengths(self.train_h, self.users(step), self.cfg.max_len)

    def get(self, step: int) -> dict[str, Any]:
        """``batch`` (JaggedBatch, each sample with its negatives), ``scale`` (the global
        trained-token count as a 0-d tensor: every rank computes it from the global batch's
        users, no collective)."""
        if step not in self._cache:
            from examples.hstu.model import read_batch, scale_tensor

            h, cfg = self.train_h, self.cfg
            batch = read_batch(h, self.users(step), cfg, seed=self.args.seed, step=step)
            trained = 0
            for r in range(self.world):
                for u in self.users(step, r):
                    trained += int((h.items[u][-(cfg.max_len + 1):][1:] > 0).sum())
            # torchrec's pipeline asks up to two steps ahead: keep a few behind the newest
            self._cache = {k: v for k, v in self._cache.items() if k >= step - 4}
            self._cache[step] = {"batch": batch, "scale": scale_tensor(float(trained))}
        return self._cache[step]


@dataclasses.dataclass(kw_only=True)
class _HstuRun:
    """A configuration training the example's model with the example's step (all but torchrec)."""

    row: Row
    cfg: Any
    trainer: Any

    def step(self, data: _Data, step: int, plan: Any, router: Any, sync: Callable[[], Any]) -> torch.Tensor:
        from examples.hstu.model import model_inputs
        from examples.hstu.routing import route_batch

        inputs = data.get(step)
        batch = inputs["batch"]
        if self.row.variant.balance:
            batch = route_batch(router, batch, plan)
        # the layout of the attention form is built here, inside the timed step, for every row
        return self.trainer.step(model_inputs(batch, inputs["scale"], self.cfg), sync=sync)


@dataclasses.dataclass(kw_only=True)
class _PipeRun:
    """A configuration trained by ``fsc.TrainPipeline`` (``examples.hstu.train.pipeline``): each
    step trains its batch and routes and prefetches the next one (the iterator below is pulled
    one batch ahead, inside the timed step, as a user's loader would be)."""

    row: Row
    pipeline: Any
    batches: Any

    def step(self, data: _Data, step: int, plan: Any, router: Any, sync: Callable[[], Any]) -> torch.Tensor:
        # the gradient all-reduce is waited on inside the compiled backward: the meter counts
        # a rank waiting there for a slower one as exposed communication, not as idle
        return self.pipeline.progress(self.batches)


def _pipe_batches(row: Row, cfg: Any, data: _Data, plans: Callable[[int], Any], router: Any, total: int) -> Any:
    """The run's ``total`` batches (routed by the step's plan when the row balances)."""
    from examples.hstu.model import model_inputs
    from examples.hstu.routing import route_batch

    for step in range(total):
        inputs = data.get(step)
        batch = route_batch(router, inputs["batch"], plans(step)) if row.variant.balance else inputs["batch"]
        yield model_inputs(batch, inputs["scale"], cfg)


@dataclasses.dataclass(kw_only=True)
class _TorchRecRun:
    run: Any

    def step(self, data: _Data, step: int, plan: Any, router: Any, sync: Callable[[], Any]) -> torch.Tensor:
        # the pipeline reads its batches itself (up to two ahead); DDP's gradient all-reduce
        # is waited on inside backward, where no sync_wait can mark it
        return self.run.step().detach()


def _make_run(row: Row, data: _Data, args: argparse.Namespace, rank: int, world: int,
              plans: Callable[[int], Any] = lambda step: None, router: Any = None, total: int = 0) -> Any:
    from examples.hstu.model import HSTU, model_inputs
    from examples.hstu.train import Trainer, make_optimizers, pipeline

    cfg = dataclasses.replace(data.cfg, attention=row.attention)
    if row.variant.compiler == "torchrec":
        from bench import e2e_torchrec

        def batch(step: int) -> Any:
            inputs = data.get(step)
            return e2e_torchrec.make_batch(model_inputs(inputs["batch"], inputs["scale"], cfg))

        return _TorchRecRun(run=e2e_torchrec.build(cfg, batch, lr=args.lr, rank=rank, world=world))
    if row.variant.pipeline:
        model = HSTU(cfg)  # seeded: the same initial weights as every other configuration
        pipe = pipeline(model, make_optimizers(model, args.lr, args.table_optimizer), backend="freescale",
                        options=_freescale_options(row.variant, args.fs_inner))
        return _PipeRun(row=row, pipeline=pipe, batches=_pipe_batches(row, cfg, data, plans, router, total))
    # seeded: every configuration starts from the same weights
    trainer = Trainer.create(cfg, lr=args.lr, compile=lambda model: _compile(model, row.variant, args.fs_inner),
                             table_optimizer=args.table_optimizer)
    return _HstuRun(row=row, cfg=cfg, trainer=trainer)


def _router(rows: list[Row], data: _Data, world: int) -> Any:
    """One router for every balanced row (one plan per step), costed for the freescale rows'
    form: per sequence, the model's a*L^2 + b*L; dense, the token count."""
    if not any(r.variant.balance for r in rows):
        return None
    from examples.hstu.model import sample_cost
    from examples.hstu.routing import Router
    from examples.hstu.train import token_cost
    from fsc.runtime.balancer import Balancer

    cost = token_cost if data.cfg.attention == "dense" else sample_cost(data.cfg)
    return Router(Balancer(ranks=world, method="freescale", cost=cost))


def _schedule(steps: int, metered: int) -> list[bool]:
    """After warm-up: which steps are metered (True) and which timed, spread evenly."""
    total = steps + metered
    return [(i + 1) * metered // total > i * metered // total for i in range(total)]


def step_order(count: int, seed: int, repeat: int, step: int) -> list[int]:
    """The order the configurations train a step's batch in: shuffled per step, seeded, so
    every rank runs the same order (their collectives must meet) and no configuration always
    follows the same other one."""
    return np.random.default_rng([seed, repeat, step, 0x0E2E]).permutation(count).tolist()


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


def _train(rank: int, world: int, rows: list[Row], args: argparse.Namespace, metered_on: bool,
           repeat: int) -> dict[str, Any]:
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    import fsc

    data = _Data(args, rank, world)
    names = [r.name for r in rows]
    router = _router(rows, data, world)
    # plans two steps ahead: a pipelined row routes batch i+1 while step i runs
    futures: dict[int, Any] = {}

    def plan_of(step: int) -> Any:
        return futures[step].result() if router is not None else None

    schedule = [False] * args.warmup + _schedule(args.steps, args.metered if metered_on else 0)
    total = len(schedule)
    runs = {r.name: _make_run(r, data, args, rank, world, plan_of, router, total) for r in rows}
    meter = None
    if metered_on and args.metered:
        from fsc.runtime.bubbles import WAIT_OPS, BubbleMeter

        meter = BubbleMeter(rank=rank, world=world, warmup_steps=_METERED_BASE, wait_ops=WAIT_OPS + EXTRA_WAITS)
    step_ms: dict[str, list[float]] = {n: [] for n in names}
    warm_ms: dict[str, list[float]] = {n: [] for n in names}
    graphs: dict[str, int] = {n: 0 for n in names}
    recompiles: dict[str, int] = {n: 0 for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    passes: dict[str, Any] = {}
    meter_index: dict[int, str] = {}
    if router is not None:
        for ahead in range(min(2, total)):
            futures[ahead] = router.plan_async(data.lengths(ahead))
    peak_reset = False
    for step in range(total):
        if step == args.warmup:
            peak_reset = _reset_peak_rss()
        plan = None
        if router is not None:
            plan = plan_of(step)
            if step + 2 < total:
                futures[step + 2] = router.plan_async(data.lengths(step + 2))
            futures.pop(step - 2, None)
        for ahead in range(3):  # batch making stays out of the timed steps (torchrec reads two ahead, fsc one)
            data.get(step + ahead)
        metered = schedule[step]
        for position in step_order(len(rows), args.seed, repeat, step):
            name = names[position]
            run = runs[name]
            before = counters["stats"]["unique_graphs"]
            if meter is not None and step >= args.warmup:
                index = step * len(names) + position
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
                print(f"e2e [{world} ranks, repeat {repeat + 1}] step {step}/{total} {name}: {ms:.0f} ms",
                      file=sys.stderr, flush=True)
            if step < args.warmup:
                warm_ms[name].append(ms)
                graphs[name] += compiled
                if compiled and isinstance(run, (_HstuRun, _PipeRun)) and run.row.variant.compiler == "freescale" \
                        and name not in passes:
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
            run.trainer.close()
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
                     "passes": {name: p["stats"] for name, p in summary["passes"].items()},
                     "declined": summary["declined"]}
    return out


def _rank(rank: int, world: int, rows: list[Row], args: argparse.Namespace, metered: bool, cache: str,
          repeat: int) -> dict[str, Any]:
    """One rank (under :func:`bench.spawn.run_gloo_ranks`): its own Inductor cache, then train."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.format(rank=rank)
    # several compiled copies of one model class: one cache entry each
    with torch._dynamo.config.patch(capture_scalar_outputs=True, recompile_limit=64, accumulated_recompile_limit=1024):
        return _train(rank, world, rows, args, metered, repeat)


def phase_timeout(args: argparse.Namespace, world: int) -> float:
    """``--timeout``, scaled by how many ranks share each cpu when there are more ranks than cpus."""
    return args.timeout * max(1.0, world / (os.cpu_count() or 1))


def rows_at(args: argparse.Namespace, rows: list[Row], world: int) -> list[Row]:
    """Every row at an ablation world size; elsewhere the headline: peers, fs-all, twins."""
    if world in args.ablate_ranks:
        return rows
    return [r for r in rows if r.variant.compiler != "freescale" or r.twin_of
            or r.name.partition("@")[0] in HEADLINE]


def _run_ranks(world: int, rows: list[Row], args: argparse.Namespace, metered: bool, cache: str,
               repeat: int = 0) -> list[dict[str, Any]]:
    """Train ``rows`` on ``world`` spawned ranks; ``cache``: the Inductor cache directory
    (``{rank}`` is replaced by the rank)."""
    return run_gloo_ranks(_rank, world, rows, args, metered, cache, repeat, timeout=phase_timeout(args, world),
                          label=f"e2e ({', '.join(r.name for r in rows)}; --timeout, scaled to "
                                f"{phase_timeout(args, world):.0f} s at {world} ranks)")


# ----------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma-separated subset of {','.join(BACKENDS)}; NAME@FORM runs a row in attention form "
                        f"FORM ({', '.join(ATTENTION_FORMS)})")
    p.add_argument("--attention", choices=ATTENTION_FORMS, default=PEER_FORMS["inductor"],
                   help="the freescale rows' attention form (default: the inductor peer's, "
                        f"{PEER_FORMS['inductor']})")
    p.add_argument("--attention-groups", type=int, default=4, help="groups of the jagged form")
    p.add_argument("--twin", default=None, metavar="NAME",
                   help="also run a second copy of this row (NAME-twin) and check their ratio (default: inductor "
                        "when it runs; quick: none; 'none': no twin)")
    p.add_argument("--repeats", type=int, default=None,
                   help="independent interleaved runs per world size (default 3; quick 1)")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="world sizes (default 2 4; --quick: 2)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: synthetic data, tiny model, few steps, one repeat, no isolation pass")
    p.add_argument("--data", default=None, metavar="RATINGS_FILE",
                   help=f"MovieLens ratings file, read in place (default {DEFAULT_DATA} when it exists, else "
                        "synthetic; 'synthetic' forces synthetic)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after warm-up (default 30; quick 4)")
    p.add_argument("--metered", type=int, default=None, help="metered steps, interleaved (default 10; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 3; quick 2)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="also run each row alone for compile time and peak memory (default on; quick off)")
    p.add_argument("--isolate-steps", type=int, default=4, help="steps after warm-up in the isolation pass")
    p.add_argument("--ablate-ranks", type=int, nargs="+", default=None,
                   help="world sizes that run every row; the others run the headline only: the peers, fs-all "
                        "and the twin (default: the first --ranks value; 'all' rows everywhere: repeat --ranks)")
    p.add_argument("--isolate-ranks", type=int, nargs="+", default=[2],
                   help="world sizes that get the isolation pass (default 2; others report the shared run's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch, sequences (default 32; quick 8)")
    p.add_argument("--max-len", type=int, default=None, help="default 200; quick 20")
    p.add_argument("--dim", type=int, default=None, help="default 64; quick 32")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="default 2; quick 1")
    p.add_argument("--negatives", type=int, default=None,
                   help="negatives per sample (default 8: 128 looked up per rank at 2 ranks, 64 at 4; quick 4)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--table-optimizer", choices=("adam", "sgd", "adagrad", "rowwise-adagrad"), default="adagrad",
                   help="the item table's optimizer in every row but torchrec's (the dense part: Adam); default "
                        "adagrad, what the torchrec row's fused kernel runs (EXACT_ADAGRAD); the TrainPipeline rows "
                        "need a row-sparse one (not adam)")
    p.add_argument("--fs-inner", choices=("inductor", "eager"), default="inductor",
                   help="freescale's inner compiler (eager: the passes' graphs run uncompiled; for smoke tests)")
    p.add_argument("--synthetic-users", type=int, default=None, help="default 2000; quick 200")
    p.add_argument("--synthetic-items", type=int, default=None, help="default 5000; quick 500")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1500.0,
                   help="seconds before one phase's ranks are killed, at a world size no larger than the cpu "
                        "count; scaled by world / cpus above it (ranks share cores, compiles take longer)")
    p.add_argument("--verbose", action="store_true", help="rank 0 prints every configuration's every step")
    p.add_argument("--readme", default=None, help="rewrite this README's <!-- bench:SECTION --> section")
    p.add_argument("--section", default="e2e",
                   help="the README section --readme rewrites (default e2e; another name for a run of other rows, "
                        "with --json and --plot elsewhere, so the headline table stays)")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --json, e2e.png)")
    return p


_DEFAULTS = {  # name: (full, quick)
    "ranks": ([2, 4], [2]), "steps": (30, 4), "metered": (10, 2), "warmup": (3, 2), "isolate": (True, False),
    "repeats": (3, 1), "batch_size": (32, 8), "max_len": (200, 20), "dim": (64, 32), "layers": (2, 1),
    "negatives": (8, 4), "synthetic_users": (2000, 200), "synthetic_items": (5000, 500),
}


def _rows(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Row]:
    rows = []
    for entry in (b.strip() for b in args.backends.split(",")):
        if not entry:
            continue
        name, _, form = entry.partition("@")
        if name not in VARIANTS:
            parser.error(f"--backends: unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        if form and form not in ATTENTION_FORMS:
            parser.error(f"--backends: {entry!r}: unknown attention form {form!r}; choose from "
                         f"{', '.join(ATTENTION_FORMS)}")
        variant = VARIANTS[name]
        default = PEER_FORMS[name] if variant.compiler != "freescale" else args.attention
        rows.append(Row(name=entry, variant=variant, attention=form or default))
    if not rows:
        parser.error("--backends: no backend given")
    if len({r.name for r in rows}) != len(rows):
        parser.error(f"--backends: {args.backends!r} names a backend twice (use --twin for a second copy)")
    if args.twin is None and not args.quick and any(r.name == "inductor" for r in rows):
        args.twin = "inductor"
    if args.twin not in (None, "none"):
        original = next((r for r in rows if r.name == args.twin), None)
        if original is None:
            parser.error(f"--twin: {args.twin!r} is not one of the rows ({', '.join(r.name for r in rows)})")
        rows.append(dataclasses.replace(original, name=f"{original.name}-twin", twin_of=original.name))
    return rows


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse and validate; bad options exit with a message naming the option."""
    parser = _parser()
    args = parser.parse_args(argv)
    for key, (full, quick) in _DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.rows = _rows(parser, args)
    for key in ("steps", "warmup", "batch_size", "max_len", "dim", "heads", "layers", "negatives",
                "synthetic_users", "synthetic_items", "isolate_steps", "repeats", "attention_groups"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.table_optimizer == "adam" and any(r.variant.pipeline for r in args.rows):
        parser.error("--table-optimizer adam: the TrainPipeline rows (fs-pipe, fs-all-pipe) prefetch table rows one "
                     "step ahead and need a row-sparse table optimizer (sgd, adagrad, rowwise-adagrad)")
    if args.metered < 0:
        parser.error(f"--metered must be >= 0, got {args.metered}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    if args.ablate_ranks is None:
        args.ablate_ranks = args.ranks[:1]
    elif not set(args.ablate_ranks) <= set(args.ranks):
        parser.error(f"--ablate-ranks {args.ablate_ranks} must be among --ranks {args.ranks}")
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


def _notes(args: argparse.Namespace, tables: dict[int, list[dict[str, Any]]]) -> list[str]:
    notes = [
        "attention forms: padded = per sequence, padded to the batch's longest (generative-recommenders' PyTorch "
        "reference); jagged = sequences grouped by length, each group padded to its longest "
        f"({args.attention_groups} groups); dense = one product over all of a rank's tokens (no fair peer runs it).",
        "negatives: drawn per sample for (seed, step, user) and carried with the sample, "
        f"{args.negatives} per sample; balanced rows start from the same loss as the others.",
        "inductor-overlap: Inductor's aten overlap scheduler with compute_estimator=analytical and the roofline's "
        "GPU numbers answered with the cpu device profile's (without both it raises on a machine without a GPU).",
        f"optimizers: Adam for the dense parameters, {args.table_optimizer} for the item table (every row). "
        "torchrec: row-wise sharding allows only FBGEMM's fused kernel, whose CPU path has no Adam: the table "
        "trains with fused EXACT_ADAGRAD (the dense part with Adam); CUDA streams absent on CPU, so "
        "TrainPipelineSparseDist only issues the next batch's id all-to-all early; the dense part runs eagerly; "
        "DDP's gradient all-reduce wait happens inside backward, so the meter cannot tell it from compute.",
    ]
    lowering = sorted({f"{row['backend']} ({row['attention']}): {row['attention_lowering']}"
                       for rows in tables.values() for row in rows if row.get("attention_lowering")})
    if lowering:
        notes.append("lower-attention (Triton's kernels need a GPU, absent here; on CPU a lowered attention runs "
                     "fsc::jagged_attention's length-grouped PyTorch implementation): " + "; ".join(lowering) + ".")
    for rows in tables.values():
        for row in rows:
            if row.get("twin_check"):
                ratios = ", ".join(f"{x:.3f}" for x in row["twin_ratio_per_repeat"])
                notes.append(f"twin check, {row['ranks']} ranks: {row['backend']} / {row['twin_of']} = {ratios} "
                             f"per repeat: {row['twin_check']}.")
    if args.fs_inner != "inductor":
        notes.append(f"freescale rows ran with inner compiler {args.fs_inner!r}, not Inductor.")
    return notes


def run(argv: list[str], json_path: str) -> int:
    args = parse(argv)
    from bench import e2e_torchrec

    rows, notes = list(args.rows), []
    if any(r.variant.compiler == "torchrec" for r in rows):
        why = e2e_torchrec.unavailable()
        if why is not None:
            rows = [r for r in rows if r.variant.compiler != "torchrec"]
            notes.append(f"torchrec skipped: {why}")
            print(f"e2e: {notes[-1]}", file=sys.stderr)
    if not rows:
        raise SystemExit("e2e: no backend left to run")
    started = time.perf_counter()
    load_before = os.getloadavg()
    tables: dict[int, list[dict[str, Any]]] = {}
    bubble_steps: dict[str, list[Any]] = {}
    phases = []
    caches = tempfile.TemporaryDirectory(prefix="fsc-e2e-cache-")
    shared = os.path.join(caches.name, "shared")
    failure: BaseException | None = None
    for world in args.ranks:
        here = rows_at(args, rows, world)
        try:
            tables[world] = _world(world, here, args, caches.name, shared, phases, bubble_steps)
        except (TimeoutError, RuntimeError) as e:  # keep what earlier world sizes measured
            failure = e
            notes.append(f"{world} ranks: not measured: {e}")
            print(f"e2e: {notes[-1]}", file=sys.stderr)
            if tables:
                _write(args, argv, json_path, tables, bubble_steps, phases, notes, started, load_before)
            break
        if world not in args.ablate_ranks:
            notes.append(f"{world} ranks: the headline only ({', '.join(r.name for r in here)}); the technique "
                         f"rows run at {' and '.join(map(str, args.ablate_ranks))} ranks (--ablate-ranks).")
        # written after every world size, so a later one that fails loses nothing measured before it
        _write(args, argv, json_path, tables, bubble_steps, phases, notes, started, load_before)
    caches.cleanup()
    if failure is not None:
        raise SystemExit(f"e2e: {failure}" + (f" (the world sizes before it are in {json_path})" if tables else ""))
    return 0


def _world(world: int, rows: list[Row], args: argparse.Namespace, caches: str, shared: str,
           phases: list[dict[str, Any]], bubble_steps: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The isolation pass (where asked) and the interleaved repeats at one world size; its rows."""
    isolated: dict[str, list[dict[str, Any]]] = {}
    if args.isolate and world in args.isolate_ranks:
        alone = argparse.Namespace(**{**vars(args), "steps": args.isolate_steps, "metered": 0})
        for row in rows:
            load, t0 = os.getloadavg(), time.perf_counter()
            own = os.path.join(caches, f"{world}-{row.name}")  # empty: a cold compile per rank
            isolated[row.name] = _run_ranks(world, [row], alone, metered=False, cache=os.path.join(own, "rank{rank}"))
            phases.append({"ranks": world, "phase": f"isolated {row.name}", "wall_s": time.perf_counter() - t0,
                           "load_before": load, "load_after": os.getloadavg()})
            for rank_dir in pathlib.Path(own).glob("rank*"):  # content-addressed: merging is safe
                shutil.copytree(rank_dir, shared, dirs_exist_ok=True)
    repeats = []
    for repeat in range(args.repeats):
        load, t0 = os.getloadavg(), time.perf_counter()
        # one cache for every rank and world size, as a torchrun job on one host has by default
        repeats.append(_run_ranks(world, rows, args, metered=True, cache=shared, repeat=repeat))
        phases.append({"ranks": world, "phase": f"interleaved, repeat {repeat + 1}",
                       "wall_s": time.perf_counter() - t0, "load_before": load, "load_after": os.getloadavg()})
    table = e2e_report.world_rows(world, rows, repeats, isolated, args)
    if not bubble_steps:
        for name in (r.name for r in rows):
            bubble_steps[name] = [b for ranks in repeats for b in (ranks[0]["bubbles"] or {}).get(name, [])]
    print(f"\n{world} ranks:\n{e2e_report.table(table)}", flush=True)
    for row in table:
        if row.get("twin_check"):
            print(f"twin: {row['backend']} / {row['twin_of']} = "
                  f"{', '.join(f'{x:.3f}' for x in row['twin_ratio_per_repeat'])}: {row['twin_check']}")
    return table


def _write(args: argparse.Namespace, argv: list[str], json_path: str, tables: dict[int, list[dict[str, Any]]],
           bubble_steps: dict[str, list[Any]], phases: list[dict[str, Any]], notes: list[str], started: float,
           load_before: tuple[float, float, float]) -> None:
    """results/e2e.json, the plots and the README section, from the world sizes measured so far."""
    data = f"MovieLens lengths ({args.data})" if args.data else (
        f"synthetic lognormal histories ({args.synthetic_users} users, {args.synthetic_items} items)")
    json_path = str(json_path)
    plot_path = args.plot or str(pathlib.Path(json_path).with_name("e2e.png"))
    for path in (json_path, plot_path):
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    notes = notes + _notes(args, tables)
    result: dict[str, Any] = {
        "benchmark": "e2e",
        "setup": (f"{data}, dim={args.dim} heads={args.heads} layers={args.layers} max_len={args.max_len} "
                  f"negatives={args.negatives} per sample, global batch={args.batch_size} sequences, seed "
                  f"{args.seed}; gloo ranks on 127.0.0.1, 1 thread each; warm-up {args.warmup}, {args.steps} timed + "
                  f"{args.metered} metered steps per configuration, interleaved in a shuffled order, "
                  f"{args.repeats} repeat{'s' if args.repeats != 1 else ''}"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.system()} {platform.release()}, "
                   f"torch {torch.__version__}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m bench e2e --json", json_path, *argv]),
        "json": json_path,
        "plot": None,
        "primary_ranks": args.ranks[0],
        "repeats": args.repeats,
        "peer_forms": {name: PEER_FORMS[name] for name in PEERS},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        "phases": phases,
        "peak_mem_note": ("each configuration alone in fresh rank processes, the largest rank's peak resident set "
                          f"(VmHWM) over the steps after warm-up (at {' and '.join(map(str, args.isolate_ranks))} "
                          "ranks; other world sizes: the shared run's process peak)" if args.isolate else
                          "the shared run's process peak RSS (all configurations in one process)"),
        "compile_note": ("each configuration alone in fresh processes with an empty Inductor cache: warm-up steps' "
                         "time minus as many steady steps, the slowest rank's (other world sizes: the same in the "
                         "first shared run, whose Inductor cache is warm)" if args.isolate else
                         "first shared run: warm-up steps' time minus as many steady steps (Inductor cache shared "
                         "between configurations)"),
        "notes": notes,
        "repeat_figures": {world: e2e_report.repeat_figures(rows_) for world, rows_ in tables.items()},
        "tables": tables,
        "rows": [row for rows_ in tables.values() for row in rows_],
    }
    try:
        e2e_report.plot(result, plot_path)
        result["plot"] = plot_path
        print(f"wrote {plot_path}")
    except ImportError as e:
        result["notes"].append(f"no plot: {e} (pip install 'fsc[bench]')")
    bubbles_path = pathlib.Path(plot_path).with_name(pathlib.Path(plot_path).stem + "-bubbles.png")
    runs = {name: steps for name, steps in bubble_steps.items() if steps}
    if runs:
        from fsc.runtime.bubble_trace import plot_stacked_bars

        try:
            plot_stacked_bars(runs, bubbles_path)
            result["bubbles_plot"] = str(bubbles_path)
            print(f"wrote {bubbles_path}")
        except ImportError as e:
            result["notes"].append(f"no bubbles plot: {e}")
    write_json(json_path, {k: v for k, v in result.items() if k != "tables"})
    if args.readme:
        replace_section(args.readme, args.section, e2e_report.readme_section(result))
        print(f"updated {args.readme}")
