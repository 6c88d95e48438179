"""The bubble meter: where each rank's training step goes, measured on a real run.

    meter = BubbleMeter(rank=rank, world=world, warmup_steps=1, control_every=4)
    for i in range(steps):
        with meter.step(i):
            loss = model(batch); loss.backward()
            with meter.sync_wait("grad all-reduce"):
                buckets.wait()
            opt.step()
    report = meter.finish()        # collective: every rank gets every rank's steps
    report.summary()["bubble_fraction"]
    report.write("runs/bubbles")   # bubbles.json, trace.json (Perfetto), bubbles.png with png=True

**How it measures.** A metered step runs under ``torch.profiler`` (CPU activity only, no
shapes, no stacks), marked with ``record_function``; every :meth:`BubbleMeter.sync_wait`
is marked too. The profiler records every operator call on the step's thread, inside
Inductor-compiled code as well (each compiled graph call is one event that spans its
kernels; its collectives' waits are events of their own). At :meth:`BubbleMeter.finish`
the events are read back and, per step, clipped to the step's span:

* ``step_ms``: the step marker's span (the step's wall time, on the profiler's clock; a
  ``perf_counter`` reading of the same step is kept as a cross-check, see ``overhead``).
* ``S``: the union of the step's sync-wait spans. ``W``: the union of the spans of the
  wait operators ``_c10d_functional::wait_tensor`` (functional collectives, compiled or
  eager) and ``fsc::wait_tensor`` (our SM-free ops), outside ``S``. ``C``: the union
  of all other operator spans (not user annotations such as ``record_function``), outside
  ``W`` and ``S``.
* **straggler idle** ``idle_ms`` and **exposed communication** ``exposed_comm_ms``: a sync
  wait lasts (transfer) + (waiting for the slowest rank to arrive). The rank that arrives
  last waits only for the transfer, so the transfer part of the ``j``-th sync wait of step
  ``k`` is taken as the *minimum over ranks* of that wait's duration (gathered at
  ``finish``); the rest of each rank's wait is idle. ``exposed_comm_ms = |W| + transfers``,
  ``idle_ms = |S| - transfers``. A wait in ``W`` (the embedding exchange) also contains
  waiting for a slower peer to reach the exchange; the meter does not split it and counts
  it all as exposed communication.
* **compute** ``compute_ms = |C|``: time inside operator calls that are not waits (for a
  compiled graph, the whole graph call minus its waits: kernels plus the glue between
  them). Measured from its own events, not as a remainder.
* ``unattributed_ms = step_ms - compute - exposed - idle = step_ms - |C ∪ W ∪ S|``: time in
  the step when no operator ran on the step's thread: Python between operator calls, the
  data pipeline's Python, the profiler's own bookkeeping. It is reported, not hidden in
  ``compute``; the paper's bubble fraction ``(step_ms - compute_ms) / step_ms`` counts it
  as bubble (the device would be idle then too).

Threads: the step's own thread, and any thread running autograd engine functions (on
CUDA, backward runs on the engine's device threads); other threads (a data loader, the
balancer's planner) are ignored.

**Overhead.** Off by default and free when off: a disabled meter's contexts only yield.
When on, the profiler costs a few µs per operator call. With ``control_every=N`` every
``N``-th step after warm-up runs with the profiler stopped (a control step, not metered);
``overhead["ratio"]`` is the median over control steps of (the metered step just before it)
/ (the control step), paired in time on the same run. Starting and stopping the profiler
around control steps happens outside the steps' timing, followed by a barrier over the
group (ranks take different times to start and stop; the skew would otherwise land in the
next step of the faster ranks), and is reported as ``overhead["profiler_start_stop_s"]``;
reading the events back as ``overhead["finish_s"]``.

The trace's compute intervals merge gaps shorter than ``trace_merge_us`` (default 50 µs) so
that a step is tens of events, not thousands; the numbers above use the exact unions.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsc.runtime.bubble_trace import (
    Interval,
    StepBubbles,
    load_steps,
    plot_stacked_bars,
    save_steps,
    summarize,
    write_chrome_trace,
)

log = logging.getLogger(__name__)

WAIT_OPS: tuple[str, ...] = ("_c10d_functional::wait_tensor", "fsc::wait_tensor")
STEP_MARK = "fsc.bubbles.step."
SYNC_MARK = "fsc.bubbles.sync."
_AUTOGRAD_ENGINE = "autograd::engine::evaluate_function"

Span = tuple[int, int]  # [start_ns, end_ns)


def _union(spans: list[Span]) -> list[Span]:
    out: list[Span] = []
    for s, e in sorted(spans):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _minus(spans: list[Span], cut: list[Span]) -> list[Span]:
    """``spans \\ cut``, both unions (sorted, disjoint)."""
    out: list[Span] = []
    j = 0
    for s, e in spans:
        while j < len(cut) and cut[j][1] <= s:
            j += 1
        k = j
        cur = s
        while k < len(cut) and cut[k][0] < e:
            if cut[k][0] > cur:
                out.append((cur, cut[k][0]))
            cur = max(cur, cut[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def _clip(spans: list[Span], lo: int, hi: int) -> list[Span]:
    return [(max(s, lo), min(e, hi)) for s, e in spans if e > lo and s < hi]


def _length(spans: list[Span]) -> int:
    return sum(e - s for s, e in spans)


def _merge_gaps(spans: list[Span], gap_ns: int) -> list[Span]:
    out: list[Span] = []
    for s, e in spans:
        if out and s - out[-1][1] < gap_ns:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


@dataclass(slots=True)
class _Metered:
    """One metered step as this rank saw it (profiler clock, ns)."""

    index: int
    span: Span
    wall_ms: float  # perf_counter
    syncs: list[tuple[str, Span]]
    compute: list[Span]
    waits: list[tuple[str, Span]]


@dataclass
class BubbleReport:
    """What :meth:`BubbleMeter.finish` returns. ``steps``: every rank's metered steps (on
    every rank). ``intervals``: every rank's on rank 0, this rank's elsewhere (times in
    seconds from the earliest metered step start over the ranks). ``overhead``: what the
    meter cost (see the module docstring), this rank's, plus ``per_rank_ratio``."""

    steps: list[StepBubbles] = field(default_factory=list)
    intervals: list[Interval] = field(default_factory=list)
    overhead: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world: int = 1

    def summary(self) -> dict[str, Any]:
        """:func:`fsc.runtime.bubble_trace.summarize` of the steps, plus ``overhead_ratio``;
        ``{}`` when nothing was metered (a disabled meter)."""
        if not self.steps:
            return {}
        out = summarize(self.steps)
        out["overhead_ratio"] = self.overhead.get("ratio")
        return out

    def write(self, out_dir: str | Path, *, png: bool = False, label: str = "") -> dict[str, Path]:
        """``out_dir/bubbles.json`` (steps, summary, overhead), ``out_dir/trace.json``
        (Chrome/Perfetto) and with ``png=True`` ``out_dir/bubbles.png``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"bubbles": out / "bubbles.json", "trace": out / "trace.json"}
        save_steps(self.steps, paths["bubbles"], extra={"overhead": self.overhead, "label": label,
                                                          "definitions": _DEFINITIONS})
        write_chrome_trace(self.intervals, paths["trace"], label=label)
        if png and self.steps:
            paths["png"] = out / "bubbles.png"
            plot_stacked_bars({label or "run": self.steps}, paths["png"])
        return paths


_DEFINITIONS = {
    "step_ms": "wall time of the step (profiler clock)",
    "compute_ms": "union of operator spans that are not waits or sync waits",
    "exposed_comm_ms": "union of collective wait spans (_c10d_functional/freescale wait_tensor) outside sync "
                       "waits, plus each sync wait's transfer part (its minimum duration over the ranks)",
    "idle_ms": "sync-wait time beyond the transfer part: waiting for slower ranks",
    "unattributed_ms": "step time when no operator ran (host Python between operators)",
    "bubble_fraction": "(step_ms - compute_ms) / step_ms",
}


class BubbleMeter:
    """Per-rank, per-step compute / exposed communication / straggler idle of a training
    loop (definitions in the module docstring).

    ``warmup_steps``: steps whose index is below it are not metered (compilation).
    ``control_every``: every that-many-th step after warm-up runs unmetered, to measure the
    overhead (0: never). ``group``: the process group :meth:`finish` gathers over (default:
    the world, when ``world > 1``). ``wait_ops``: operator names counted as communication
    waits. Not thread-safe: one training loop per meter.
    """

    def __init__(self, *, rank: int, world: int, group: Any = None, enabled: bool = True, warmup_steps: int = 0,
                 control_every: int = 0, wait_ops: Sequence[str] = WAIT_OPS, trace_merge_us: float = 50.0) -> None:
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"BubbleMeter: world must be an integer >= 1, got {world!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"BubbleMeter: rank must be an integer in [0, {world}), got {rank!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"BubbleMeter: warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if isinstance(control_every, bool) or not isinstance(control_every, int) or control_every == 1 \
                or control_every < 0:
            raise ValueError(f"BubbleMeter: control_every must be 0 (no control steps) or an integer >= 2, "
                             f"got {control_every!r}")
        if trace_merge_us < 0:
            raise ValueError(f"BubbleMeter: trace_merge_us must be >= 0, got {trace_merge_us!r}")
        self.rank, self.world, self.group, self.enabled = rank, world, group, enabled
        self.warmup_steps, self.control_every = warmup_steps, control_every
        self.wait_ops = frozenset(wait_ops)
        self.trace_merge_ns = int(trace_merge_us * 1e3)
        self._profiler: Any = None
        self._segments: list[Any] = []  # stopped profilers, read at finish
        self._seen: set[int] = set()
        self._in_step: str | None = None  # None, "metered", "control", "off"
        self._wall: dict[int, float] = {}  # metered step -> perf_counter ms
        self._control: list[tuple[int, float]] = []  # (step, ms) of control steps
        self._after_warmup = 0
        self._start_stop_s = 0.0
        self._finished = False
        self._thread: int | None = None

    # -- recording ---------------------------------------------------------------------------

    def _start(self) -> None:
        import torch

        t = time.perf_counter()
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profiler.start()
        # The first marker after a start pays one-time costs (~1 ms): not inside a step.
        with torch.profiler.record_function("fsc.bubbles.warmup"):
            pass
        self._start_stop_s += time.perf_counter() - t

    def _stop(self) -> None:
        if self._profiler is None:
            return
        t = time.perf_counter()
        self._profiler.stop()
        self._segments.append(self._profiler)
        self._profiler = None
        self._start_stop_s += time.perf_counter() - t

    def _align(self) -> None:
        """Starting or stopping the profiler takes a rank tens of ms, not the same on every
        rank; without a barrier the next step's first collective would charge the skew to
        the faster ranks' step. Every rank switches at the same step index, so this is safe."""
        if self.world == 1:
            return
        import torch.distributed as dist

        t = time.perf_counter()
        dist.barrier(group=self.group)
        self._start_stop_s += time.perf_counter() - t

    @contextmanager
    def step(self, index: int) -> Iterator[None]:
        """One training step (everything the step does, on this thread)."""
        if not self.enabled:
            yield
            return
        if self._finished:
            raise RuntimeError("BubbleMeter.step: the meter has finished")
        if self._in_step is not None:
            raise RuntimeError(f"BubbleMeter.step({index}): steps do not nest (a step is already running)")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"BubbleMeter.step: index must be an integer >= 0, got {index!r}")
        if index in self._seen:
            raise ValueError(f"BubbleMeter.step: step index {index} was already used")
        self._seen.add(index)
        if index < self.warmup_steps:
            kind = "off"
        else:
            self._after_warmup += 1
            control = self.control_every and self._after_warmup % self.control_every == 0
            kind = "control" if control else "metered"
        running = self._profiler is not None
        if kind == "metered" and not running:
            self._start()
        elif kind != "metered" and running:
            self._stop()
        if running != (kind == "metered"):
            self._align()
        self._in_step = kind
        try:
            if kind == "metered":
                import torch

                self._thread = threading.get_ident()
                with torch.profiler.record_function(f"{STEP_MARK}{index}"):
                    start = time.perf_counter()
                    yield
                    self._wall[index] = (time.perf_counter() - start) * 1e3
            else:
                start = time.perf_counter()
                yield
                if kind == "control":
                    self._control.append((index, (time.perf_counter() - start) * 1e3))
        finally:
            self._in_step = None

    @contextmanager
    def sync_wait(self, name: str) -> Iterator[None]:
        """A synchronisation point inside a step (the dense gradient all-reduce's wait, say):
        its time is split into transfer (exposed communication) and straggler idle."""
        if not self.enabled:
            yield
            return
        if not isinstance(name, str) or not name:
            raise ValueError(f"BubbleMeter.sync_wait: name must be a non-empty string, got {name!r}")
        if self._in_step is None:
            raise RuntimeError(f"BubbleMeter.sync_wait({name!r}) outside a step: enter meter.step(i) first")
        if self._in_step != "metered":
            yield
            return
        import torch

        with torch.profiler.record_function(f"{SYNC_MARK}{name}"):
            yield

    # -- reading back -----------------------------------------------------------------------

    def _read(self) -> tuple[list[_Metered], int]:
        steps: list[_Metered] = []
        n_events = 0
        for prof in self._segments:
            events = [e for e in prof.profiler.kineto_results.events() if e.device_type().name == "CPU"]
            n_events += len(events)
            marks = [(int(e.name()[len(STEP_MARK):]), (e.start_ns(), e.end_ns()), e.start_thread_id())
                     for e in events if e.name().startswith(STEP_MARK)]
            if not marks:
                continue
            threads = {t for _, _, t in marks}
            threads |= {e.start_thread_id() for e in events if e.name().startswith(_AUTOGRAD_ENGINE)}
            syncs: list[tuple[str, Span]] = []
            waits: list[tuple[str, Span]] = []
            ops: list[Span] = []
            for e in events:
                if e.start_thread_id() not in threads:
                    continue
                name = e.name()
                span = (e.start_ns(), e.end_ns())
                if name.startswith(SYNC_MARK):
                    syncs.append((name[len(SYNC_MARK):], span))
                elif name in self.wait_ops:
                    waits.append((name, span))
                elif not e.is_user_annotation():
                    ops.append(span)
            ops = _union(ops)
            syncs.sort(key=lambda x: x[1])
            for index, (lo, hi), _ in sorted(marks, key=lambda m: m[1]):
                steps.append(_Metered(
                    index=index, span=(lo, hi), wall_ms=self._wall.get(index, float("nan")),
                    syncs=[(n, (s[0], min(s[1], hi))) for n, s in syncs if lo <= s[0] < hi],
                    compute=_clip(ops, lo, hi),
                    waits=[(n, (max(s[0], lo), min(s[1], hi))) for n, s in waits if s[1] > lo and s[0] < hi]))
        return steps, n_events

    def finish(self) -> BubbleReport:
        """Stop, read the events, and (collective over the group when ``world > 1``) gather
        every rank's steps: every rank must call it, after the same steps."""
        if not self.enabled:
            return BubbleReport(rank=self.rank, world=self.world, overhead={"enabled": False})
        if self._finished:
            raise RuntimeError("BubbleMeter.finish: already finished")
        if self._in_step is not None:
            raise RuntimeError("BubbleMeter.finish inside a step")
        self._stop()
        self._finished = True
        t0 = time.perf_counter()
        metered, n_events = self._read()
        self._segments.clear()
        mine = {
            "rank": self.rank,
            "first_ns": min((m.span[0] for m in metered), default=None),
            "syncs": {m.index: [(n, s[1] - s[0]) for n, s in m.syncs] for m in metered},
        }
        everyone = self._gather_all(mine)
        origin = min((o["first_ns"] for o in everyone if o["first_ns"] is not None), default=0)
        # transfer part of each sync wait: its shortest duration over the ranks
        transfer: dict[tuple[int, int], int] = {}
        for m in metered:
            for j, (_, s) in enumerate(m.syncs):
                durations = [o["syncs"][m.index][j][1] for o in everyone
                             if m.index in o["syncs"] and j < len(o["syncs"][m.index])]
                transfer[(m.index, j)] = min(durations)
        steps: list[StepBubbles] = []
        intervals: list[Interval] = []
        mismatch: list[float] = []
        for m in metered:
            lo, hi = m.span
            sync_u = _union([s for _, s in m.syncs])
            wait_u = _minus(_union([s for _, s in m.waits]), sync_u)
            comp_u = _minus(_minus(m.compute, wait_u), sync_u)
            moved = sum(transfer[(m.index, j)] for j in range(len(m.syncs)))
            step_ns = hi - lo
            compute, waits, synced = _length(comp_u), _length(wait_u), _length(sync_u)
            moved = min(moved, synced)  # overlapping sync spans (nested sync_wait) count once
            exposed, idle = waits + moved, synced - moved
            rest = max(step_ns - compute - exposed - idle, 0)
            steps.append(StepBubbles(rank=self.rank, step=m.index, step_ms=step_ns / 1e6, compute_ms=compute / 1e6,
                                     exposed_comm_ms=exposed / 1e6, idle_ms=idle / 1e6, unattributed_ms=rest / 1e6))
            mismatch.append(step_ns / 1e6 - m.wall_ms)
            intervals += self._intervals(m, comp_u, transfer, origin)
        overhead = self._overhead(steps, n_events)
        # the step marker's span minus perf_counter's reading of the same step
        overhead["clock_mismatch_ms"] = mismatch
        overhead["clock_mismatch_ms_max"] = max((abs(x) for x in mismatch), default=0.0)
        overhead["finish_s"] = time.perf_counter() - t0
        gathered = self._gather_all({"steps": steps, "ratio": overhead.get("ratio")})
        all_steps = sorted((s for g in gathered for s in g["steps"]), key=lambda s: (s.rank, s.step))
        overhead["per_rank_ratio"] = [g["ratio"] for g in gathered]
        intervals = self._gather_intervals(intervals)
        overhead["finish_s"] = time.perf_counter() - t0
        return BubbleReport(steps=all_steps, intervals=intervals, overhead=overhead, rank=self.rank,
                            world=self.world)

    def _intervals(self, m: _Metered, comp_u: list[Span], transfer: dict[tuple[int, int], int],
                   origin: int) -> list[Interval]:
        def iv(track: str, s: int, e: int, name: str = "") -> Interval:
            return Interval(rank=self.rank, step=m.index, track=track, start_s=(s - origin) / 1e9,
                            end_s=(e - origin) / 1e9, name=name)

        out = [iv("compute", s, e) for s, e in _merge_gaps(comp_u, self.trace_merge_ns)]
        syncs = _union([s for _, s in m.syncs])
        for name, (s, e) in m.waits:
            for a, b in _minus([(s, e)], syncs):
                out.append(iv("communication", a, b, name))
        for j, (name, (s, e)) in enumerate(m.syncs):
            cut = max(e - transfer[(m.index, j)], s)  # the transfer ends the wait: the last rank just arrived
            if cut > s:
                out.append(iv("idle", s, cut, name))
            if e > cut:
                out.append(iv("communication", cut, e, name))
        return out

    def _overhead(self, steps: list[StepBubbles], n_events: int) -> dict[str, Any]:
        wall = self._wall
        ratios = []
        for index, ms in self._control:
            before = max((i for i in wall if i < index), default=None)
            if before is not None and ms > 0:
                ratios.append(wall[before] / ms)
        metered = [wall[s.step] for s in steps if s.step in wall]
        return {
            "enabled": True,
            "metered_steps": len(steps),
            "control_steps": len(self._control),
            "ratio": statistics.median(ratios) if ratios else None,
            "paired_ratios": ratios,
            "median_metered_step_ms": statistics.median(metered) if metered else None,
            "median_control_step_ms": statistics.median(ms for _, ms in self._control) if self._control else None,
            "profiler_events": n_events,
            "profiler_start_stop_s": self._start_stop_s,
        }

    def _gather_all(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _gather_intervals(self, intervals: list[Interval]) -> list[Interval]:
        if self.world == 1:
            return intervals
        import torch.distributed as dist

        dst = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(intervals, out, dst=dst, group=self.group)
        if out is None:
            return intervals
        return [iv for part in out for iv in part]


def wait_time_by_range(events: Iterable[tuple[str, float, float]], ranges: Sequence[tuple[float, float, Any]],
                       excluded: Sequence[tuple[float, float]] = (), *,
                       wait_ops: Sequence[str] = WAIT_OPS) -> dict[Any, tuple[float, float]]:
    """Time spent in wait operators, per labelled range, for callers that run their own
    profiler (``bench.waits``, which interleaves several backends in one profile).

    ``events``: ``(name, start, end)`` of profiler events; ``ranges``: ``(start, end, key)``;
    a wait belongs to the first range that contains its start. Returns per key ``(outside,
    inside)``: the summed durations of its waits that start outside / inside an
    ``excluded`` span (a sync point such as the gradient all-reduce's wait). Units are the
    inputs'. Every key of ``ranges`` is present, with zeros when it saw no wait."""
    ops = frozenset(wait_ops)
    out: dict[Any, list[float]] = {key: [0.0, 0.0] for _, _, key in ranges}
    for name, start, end in events:
        if name not in ops:
            continue
        key = next((k for lo, hi, k in ranges if lo <= start <= hi), None)
        if key is None:
            continue
        inside = any(lo <= start <= hi for lo, hi in excluded)
        out[key][1 if inside else 0] += end - start
    return {key: (v[0], v[1]) for key, v in out.items()}


def _plot(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsc.runtime.bubbles plot",
                                     description="stacked per-rank bars of bubbles.json files, before vs after")
    parser.add_argument("files", nargs="+", metavar="BUBBLES_JSON",
                        help="bubbles.json files, in order (before, after, ...); label: LABEL=PATH or the file name")
    parser.add_argument("--png", required=True, help="output PNG path")
    args = parser.parse_args(argv)
    runs: dict[str, list[StepBubbles]] = {}
    defaults = ["before", "after"] if len(args.files) == 2 else [f"run{i}" for i in range(len(args.files))]
    for default, spec in zip(defaults, args.files):
        label, _, path = spec.rpartition("=") if "=" in spec else (default, "", spec)
        if not Path(path).is_file():
            parser.error(f"no such file: {path}")
        runs[label] = load_steps(path)
    plot_stacked_bars(runs, args.png)
    for label, steps in runs.items():
        print(f"{label}: bubble fraction {summarize(steps)['bubble_fraction']:.3f}")
    print(f"wrote {args.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "plot":
        print("usage: python -m fsc.runtime.bubbles plot BEFORE.json AFTER.json --png OUT.png", file=sys.stderr)
        return 2
    return _plot(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
