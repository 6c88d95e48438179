"""The bubble trace format, shared by the bubble meter (:mod:`fsc.runtime.bubbles`, real
runs) and the simulator (``sim``, simulated runs), so that a measured and a simulated
step read, print and plot the same way.

Two records:

* :class:`Interval`: one span on one rank's track. Tracks are ``"compute"`` (the rank is
  busy computing), ``"communication"`` (blocked in a collective's wait: exposed
  communication) and ``"idle"`` (waiting at a synchronisation point for slower ranks).
  Times are seconds from a common origin (the meter: the earliest step start over all
  ranks of one host's clock; the simulator: time zero).
* :class:`StepBubbles`: one rank's totals for one step, in milliseconds. ``step_ms`` is
  the step's wall time; ``compute_ms + exposed_comm_ms + idle_ms + unattributed_ms`` is
  at most ``step_ms`` (a simulator fills ``unattributed_ms`` with 0). The paper's metric:
  ``bubble_fraction = (step_ms - compute_ms) / step_ms``.

Outputs: :func:`write_chrome_trace` (Chrome/Perfetto JSON, loads in ui.perfetto.dev),
:func:`plot_stacked_bars` (PNG, matplotlib), :func:`save_steps` / :func:`load_steps`
(JSON), :func:`summarize` (per-rank medians and their mean over ranks).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

Track = Literal["compute", "communication", "idle"]
TRACKS: tuple[str, ...] = ("compute", "communication", "idle")
FORMAT = "fsc.bubbles/1"
# The quantities a StepBubbles holds, in the order they stack (bottom to top).
PARTS: tuple[str, ...] = ("compute_ms", "exposed_comm_ms", "idle_ms", "unattributed_ms")
# Parts may exceed the step by float round-off only.
_SUM_RTOL = 1e-6
_SUM_ATOL_MS = 1e-6


def _check_index(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}.{name} must be an integer >= 0, got {value!r}")


def _check_time(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{owner}.{name} must be >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class Interval:
    """One busy or blocked span ``[start_s, end_s)`` on one rank's ``track`` during ``step``."""

    rank: int
    step: int
    track: Track
    start_s: float
    end_s: float
    name: str = ""

    def __post_init__(self) -> None:
        _check_index("Interval", "rank", self.rank)
        _check_index("Interval", "step", self.step)
        if self.track not in TRACKS:
            raise ValueError(f"Interval.track must be one of {', '.join(TRACKS)}, got {self.track!r}")
        for name in ("start_s", "end_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Interval.{name} must be a finite number, got {value!r}")
        if self.end_s < self.start_s:
            raise ValueError(f"Interval.end_s ({self.end_s!r}) is before Interval.start_s ({self.start_s!r})")
        if not isinstance(self.name, str):
            raise ValueError(f"Interval.name must be a string, got {self.name!r}")

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, slots=True)
class StepBubbles:
    """One rank's step: wall time and where it went, in milliseconds.

    ``compute_ms``: busy computing. ``exposed_comm_ms``: blocked in communication waits.
    ``idle_ms``: waiting at a synchronisation point for slower ranks. ``unattributed_ms``:
    the rest that the producer could see but not attribute (host/Python time between
    operations, for the meter); the four parts sum to at most ``step_ms``.
    """

    rank: int
    step: int
    step_ms: float
    compute_ms: float
    exposed_comm_ms: float
    idle_ms: float
    unattributed_ms: float = 0.0

    def __post_init__(self) -> None:
        _check_index("StepBubbles", "rank", self.rank)
        _check_index("StepBubbles", "step", self.step)
        _check_time("StepBubbles", "step_ms", self.step_ms)
        for name in PARTS:
            _check_time("StepBubbles", name, getattr(self, name))
        parts = sum(getattr(self, name) for name in PARTS)
        if parts > self.step_ms * (1 + _SUM_RTOL) + _SUM_ATOL_MS:
            raise ValueError(
                f"StepBubbles.step_ms ({self.step_ms!r}) is less than compute_ms + exposed_comm_ms + idle_ms "
                f"+ unattributed_ms ({parts!r}) on rank {self.rank}, step {self.step}")

    @property
    def bubble_fraction(self) -> float:
        """``(step_ms - compute_ms) / step_ms``, as in the paper (0 for an empty step)."""
        if self.step_ms == 0:
            return 0.0
        return (self.step_ms - self.compute_ms) / self.step_ms


_NUMBERS: tuple[str, ...] = ("step_ms", *PARTS, "bubble_fraction")


def summarize(steps: Sequence[StepBubbles]) -> dict[str, Any]:
    """Per rank, the median over its steps of every quantity (``bubble_fraction`` is the
    median of the per-step fractions); overall, the mean over ranks of those medians.

    ``{"ranks": R, "steps": S (per rank, the most any rank has), "step_ms": ..., "compute_ms": ...,
    "exposed_comm_ms": ..., "idle_ms": ..., "unattributed_ms": ..., "bubble_fraction": ...,
    "per_rank": [{"rank": r, "steps": n, "step_ms": ..., ...}, ...]}``
    """
    steps = list(steps)
    if not steps:
        raise ValueError("summarize: steps is empty")
    for s in steps:
        if not isinstance(s, StepBubbles):
            raise ValueError(f"summarize: steps must hold StepBubbles, got {type(s).__name__}")
    by_rank: dict[int, list[StepBubbles]] = {}
    for s in steps:
        by_rank.setdefault(s.rank, []).append(s)
    per_rank = []
    for rank in sorted(by_rank):
        mine = by_rank[rank]
        row: dict[str, Any] = {"rank": rank, "steps": len(mine)}
        for name in _NUMBERS:
            row[name] = statistics.median(getattr(s, name) for s in mine)
        per_rank.append(row)
    out: dict[str, Any] = {"ranks": len(per_rank), "steps": max(r["steps"] for r in per_rank)}
    for name in _NUMBERS:
        out[name] = statistics.fmean(r[name] for r in per_rank)
    out["per_rank"] = per_rank
    return out


def _trace_events(intervals: Iterable[Interval], label: str) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    ranks: set[int] = set()
    for iv in intervals:
        if not isinstance(iv, Interval):
            raise ValueError(f"write_chrome_trace: intervals must hold Interval, got {type(iv).__name__}")
        ranks.add(iv.rank)
        events.append({
            "ph": "X", "name": iv.name or iv.track, "cat": iv.track, "pid": iv.rank,
            "tid": TRACKS.index(iv.track), "ts": iv.start_s * 1e6, "dur": (iv.end_s - iv.start_s) * 1e6,
            "args": {"step": iv.step},
        })
    meta: list[dict[str, Any]] = []
    for rank in sorted(ranks):
        meta.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        meta.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for tid, track in enumerate(TRACKS):
            meta.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": track}})
            meta.append({"ph": "M", "name": "thread_sort_index", "pid": rank, "tid": tid,
                         "args": {"sort_index": tid}})
    return {"traceEvents": meta + events, "displayTimeUnit": "ms", "otherData": {"format": FORMAT, "label": label}}


def write_chrome_trace(intervals: Iterable[Interval], path: str | Path, *, label: str = "") -> None:
    """Chrome/Perfetto JSON: one process per rank (``pid`` = rank, named ``rank N``), one
    thread per track (``tid`` 0 compute, 1 communication, 2 idle), one complete (``"X"``)
    event per interval, times in microseconds."""
    doc = _trace_events(intervals, label)
    Path(path).write_text(json.dumps(doc))


def read_chrome_trace(path: str | Path) -> list[Interval]:
    """The intervals of a trace :func:`write_chrome_trace` wrote (round trip to float precision)."""
    doc = json.loads(Path(path).read_text())
    out = []
    for e in doc.get("traceEvents", []):
        if e.get("ph") != "X":
            continue
        name = e["name"] if e["name"] != e["cat"] else ""
        start = e["ts"] / 1e6
        out.append(Interval(rank=e["pid"], step=e["args"]["step"], track=e["cat"], start_s=start,
                            end_s=start + e["dur"] / 1e6, name=name))
    return out


def save_steps(steps: Iterable[StepBubbles], path: str | Path, *, extra: Mapping[str, Any] | None = None) -> None:
    """JSON: ``{"format", "steps": [...], "summary": summarize(steps), **extra}``."""
    steps = list(steps)
    for s in steps:
        if not isinstance(s, StepBubbles):
            raise ValueError(f"save_steps: steps must hold StepBubbles, got {type(s).__name__}")
    doc: dict[str, Any] = {"format": FORMAT, "steps": [asdict(s) for s in steps],
                           "summary": summarize(steps) if steps else None}
    for key, value in (extra or {}).items():
        if key in doc:
            raise ValueError(f"save_steps: extra key {key!r} clashes with the format's own")
        doc[key] = value
    Path(path).write_text(json.dumps(doc, indent=1))


def load_steps(path: str | Path) -> list[StepBubbles]:
    """The steps of a file :func:`save_steps` wrote (extra keys are ignored)."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or "steps" not in doc:
        raise ValueError(f"load_steps: {path} is not a bubbles file (no 'steps' key)")
    known = {f.name for f in fields(StepBubbles)}
    out = []
    for i, row in enumerate(doc["steps"]):
        unknown = set(row) - known
        if unknown:
            raise ValueError(f"load_steps: {path} steps[{i}] has unknown field(s) {', '.join(sorted(unknown))}")
        out.append(StepBubbles(**row))
    return out


_COLORS = {"compute_ms": "#4c72b0", "exposed_comm_ms": "#dd8452", "idle_ms": "#c44e52", "unattributed_ms": "#bbbbbb"}
_LABELS = {"compute_ms": "compute", "exposed_comm_ms": "exposed comm", "idle_ms": "straggler idle",
           "unattributed_ms": "unattributed (host)"}


def plot_stacked_bars(runs: Mapping[str, Sequence[StepBubbles]], path: str | Path) -> None:
    """PNG: per rank, one stacked bar per run (label: ``"before"``, ``"after"``, ...) of the
    median compute / exposed comm / idle / unattributed ms per step, the rank's median
    bubble fraction written above each bar, and each run's mean over ranks in the legend."""
    if not runs:
        raise ValueError("plot_stacked_bars: runs is empty")
    summaries = {}
    for label, steps in runs.items():
        if not isinstance(label, str):
            raise ValueError(f"plot_stacked_bars: run labels must be strings, got {label!r}")
        if not steps:
            raise ValueError(f"plot_stacked_bars: run {label!r} has no steps")
        summaries[label] = summarize(steps)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_stacked_bars needs matplotlib: pip install 'fsc[plot]' (or matplotlib)") from e

    ranks = sorted({r["rank"] for s in summaries.values() for r in s["per_rank"]})
    labels = list(summaries)
    width = 0.8 / len(labels)
    fig = Figure(figsize=(max(4.0, 1.2 + 0.9 * len(ranks) * len(labels)), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    hatches = ["", "//", "..", "xx", "\\\\", "++"]
    top = 0.0
    for j, label in enumerate(labels):
        rows = {r["rank"]: r for r in summaries[label]["per_rank"]}
        for i, rank in enumerate(ranks):
            row = rows.get(rank)
            if row is None:
                continue
            x = i + (j - (len(labels) - 1) / 2) * width
            bottom = 0.0
            for part in PARTS:
                value = row[part]
                first = i == 0 and j == 0
                ax.bar(x, value, width * 0.95, bottom=bottom, color=_COLORS[part], hatch=hatches[j % len(hatches)],
                       edgecolor="black", linewidth=0.4, label=_LABELS[part] if first else None)
                bottom += value
            top = max(top, bottom)
            text = f"{label}\n{row['bubble_fraction']:.0%}" if len(labels) > 1 else f"{row['bubble_fraction']:.0%}"
            ax.text(x, bottom, text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(ranks)))
    ax.set_xticklabels([f"rank {r}" for r in ranks])
    ax.set_ylabel("median ms per step (each part's median)")
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    runs_text = "; ".join(f"{label}: {summaries[label]['bubble_fraction']:.1%}" for label in labels)
    ax.set_title(f"bubble fraction (mean over ranks) — {runs_text}", fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=110)
