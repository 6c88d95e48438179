"""Discrete-event simulation of one training step on R ranks, vectorised over the ranks.

A step is a list of ops that every rank runs in the same program order (what a compiled
SPMD step is): :class:`Compute` (per-rank seconds on the rank's compute stream),
:class:`Issue` (a collective is put on its process group's FIFO queue; issuing costs
nothing) and :class:`Wait` (the compute stream blocks until the collective ends).

Model. A collective starts when every member has issued it and every member's queue for
its group is free (per-rank FIFO per group, as a communicator's collectives run in issue
order on each rank's stream); it lasts ``seconds`` on every member. Members are all R ranks
unless the issue names them (``members``): an all-to-all whose split sizes give a rank
nothing to send or receive (NCCL skips such peers: ``ncclSend``/``ncclRecv`` only for
non-zero counts) does not involve that rank: it waits for nobody, only for what it issued
before on the group (its stream's earlier collectives), and holds nobody.
While an SM-based collective (``sm_based``) is in flight, compute on its members progresses
``contention`` times slower; copy-engine transfers (``sm_based=False``) slow nothing. Because every rank runs the same program,
processing ops in program order for all ranks at once is exact: a rank's issue time depends
only on its own earlier ops and on earlier collectives, and a collective issued later in
program order starts after this rank's current op has ended, so it cannot overlap it.

Accounting per rank (milliseconds in :class:`fsc.runtime.bubble_trace.StepBubbles`):
``compute`` is the uncontended work (the sum of the ops' seconds); time blocked in a wait
is ``idle`` while the slowest member has not issued the collective yet (straggler idle) and
``communication`` after (exposed communication); a rank that finishes early idles until the
step ends (the step's time is the slowest rank's). What SM contention adds to compute is
reported as ``contention_s`` and left out of the parts (they then sum to less than the step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from fsc.runtime.bubble_trace import Interval, StepBubbles


class SimulationError(ValueError):
    """A step that cannot be simulated: names the op or argument at fault."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Compute:
    name: str
    seconds: np.ndarray | float
    """Per-rank seconds (shape ``[R]``) or one number for every rank."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Issue:
    name: str
    group: str
    seconds: float
    """Transfer time once started (the same on every member)."""
    sm_based: bool = True
    """False for copy-engine transfers: no compute slowdown while in flight."""
    members: tuple[int, ...] | None = None
    """The ranks that take part (None: every rank). The others skip the issue and its waits."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Wait:
    name: str
    collective: str
    """The ``Issue.name`` waited on."""


Op = Compute | Issue | Wait


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class CollectiveSpan:
    name: str
    group: str
    start: float
    end: float
    last_issue: float
    sm_based: bool
    members: np.ndarray | None = None
    """Boolean mask of the ranks that take part (None: every rank)."""
    rank_end: np.ndarray | None = None
    """Per rank, when a wait on it returns (partial collectives only): ``end`` on members,
    and on the others the end of what they issued before on the group (their stream)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class StepResult:
    """One simulated step. Arrays are per rank, seconds."""

    ranks: int
    step_s: float
    compute_s: np.ndarray
    busy_s: np.ndarray
    """Compute time as run, with SM contention."""
    exposed_s: np.ndarray
    idle_s: np.ndarray
    collectives: tuple[CollectiveSpan, ...]
    intervals: tuple[tuple[str, str, np.ndarray, np.ndarray, np.ndarray], ...]
    """(track, name, ranks, start, end) blocks, one per op that produced spans."""

    @property
    def contention_s(self) -> np.ndarray:
        return self.busy_s - self.compute_s

    @property
    def bubble_fraction(self) -> float:
        """Mean over ranks of (step - compute) / step."""
        if self.step_s <= 0:
            return 0.0
        return float(np.mean((self.step_s - self.compute_s) / self.step_s))

    def bubbles(self, step: int = 0) -> list[StepBubbles]:
        ms = 1e3
        return [StepBubbles(rank=r, step=step, step_ms=self.step_s * ms, compute_ms=float(self.compute_s[r]) * ms,
                            exposed_comm_ms=float(self.exposed_s[r]) * ms, idle_ms=float(self.idle_s[r]) * ms)
                for r in range(self.ranks)]

    def trace(self, step: int = 0, *, offset_s: float = 0.0, ranks: Sequence[int] | None = None) -> list[Interval]:
        """The step's spans as :class:`Interval` (only ``ranks`` when given)."""
        keep = None if ranks is None else set(ranks)
        out = []
        for track, name, who, start, end in self.intervals:
            for r, s, e in zip(who.tolist(), start.tolist(), end.tolist()):
                if e > s and (keep is None or r in keep):
                    out.append(Interval(rank=r, step=step, track=track, start_s=s + offset_s, end_s=e + offset_s,
                                        name=name))
        return out


def _progress(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Piecewise-linear map through (xp, fp), slope 1 outside (exact, no sentinels)."""
    y = np.interp(x, xp, fp)
    y = np.where(x < xp[0], fp[0] - (xp[0] - x), y)
    return np.where(x > xp[-1], fp[-1] + (x - xp[-1]), y)


def _contended_end(now: np.ndarray, work: np.ndarray, busy: list[tuple[float, float]], factor: float) -> np.ndarray:
    """When compute of ``work`` seconds started at ``now`` ends if it runs ``factor`` times
    slower inside the ``busy`` spans (disjoint, sorted)."""
    t = np.array([v for span in busy for v in span], dtype=np.float64)
    p = np.empty_like(t)
    p[0] = t[0]
    for i in range(1, len(t)):
        slope = 1.0 / factor if i % 2 == 1 else 1.0  # (start_k, end_k) busy; (end_k, start_k+1) free
        p[i] = p[i - 1] + (t[i] - t[i - 1]) * slope
    target = _progress(now, t, p) + work
    return _progress(target, p, t)


def _contended(now: np.ndarray, work: np.ndarray, sm_spans: list[tuple[float, float, np.ndarray | None]],
               factor: float) -> np.ndarray:
    """Per rank, when ``work`` started at ``now`` ends under the SM-based collectives in
    flight on that rank (``sm_spans``: start, end, members or None for every rank)."""
    end = now + work
    live = [span for span in sm_spans if span[1] > now.min()]
    if not live:
        return end
    masks = [m for _, _, m in live if m is not None]
    if not masks:
        return np.maximum(_contended_end(now, work, _union([(s, e) for s, e, _ in live]), factor), end)
    # ranks in classes by the partial collectives they take part in
    rows, inverse = np.unique(np.stack(masks, axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    for c, row in enumerate(rows):
        who = inverse == c
        picked, k = [], 0
        for s, e, m in live:
            if m is None:
                picked.append((s, e))
            else:
                if row[k]:
                    picked.append((s, e))
                k += 1
        busy = _union(picked)
        if busy:
            end[who] = np.maximum(_contended_end(now[who], work[who], busy, factor), end[who])
    return end


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for s, e in sorted(spans):
        if e <= s:
            continue
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def simulate(ops: Sequence[Op], ranks: int, *, contention: float = 1.0, record: bool = True) -> StepResult:
    """Run ``ops`` on ``ranks`` ranks from time 0; see the module docstring for the model.

    ``contention`` >= 1: compute slowdown while an SM-based collective is in flight.
    ``record=False`` skips the per-op spans (faster at thousands of ranks).
    """
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise SimulationError(f"ranks must be a positive int, got {ranks!r}")
    if not (np.isfinite(contention) and contention >= 1.0):
        raise SimulationError(f"contention must be a finite factor >= 1, got {contention!r}")
    everyone = np.arange(ranks)
    now = np.zeros(ranks)
    compute = np.zeros(ranks)
    busy_time = np.zeros(ranks)
    exposed = np.zeros(ranks)
    idle = np.zeros(ranks)
    seg_start = np.zeros(ranks)
    queue_free: dict[str, np.ndarray] = {}
    spans: dict[str, CollectiveSpan] = {}
    waited: set[str] = set()
    sm_spans: list[tuple[float, float, np.ndarray | None]] = []
    blocks: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]] = []

    def close_compute(mask: np.ndarray, label: str) -> None:
        if record and mask.any():
            blocks.append(("compute", label, everyone[mask], seg_start[mask].copy(), now[mask].copy()))

    for op in ops:
        if isinstance(op, Compute):
            work = np.asarray(op.seconds, dtype=np.float64)
            if work.ndim == 0:
                work = np.full(ranks, float(work))
            if work.shape != (ranks,) or not np.isfinite(work).all() or (work < 0).any():
                raise SimulationError(f"compute op {op.name!r}: seconds must be finite, >= 0, one per rank")
            end = now + work
            if contention > 1.0:
                end = np.maximum(_contended(now, work, sm_spans, contention), end)
            compute += work
            busy_time += end - now
            now = end
        elif isinstance(op, Issue):
            if op.name in spans:
                raise SimulationError(f"collective {op.name!r} is issued twice")
            if not (np.isfinite(op.seconds) and op.seconds >= 0):
                raise SimulationError(f"collective {op.name!r}: seconds must be finite and >= 0, got {op.seconds!r}")
            mask = None
            if op.members is not None:
                mask = np.zeros(ranks, dtype=bool)
                try:
                    mask[np.asarray(op.members, dtype=np.int64)] = True
                except IndexError:
                    raise SimulationError(f"collective {op.name!r}: members {op.members} outside 0..{ranks - 1}")
            queue = queue_free.setdefault(op.group, np.zeros(ranks))
            if mask is not None and not mask.any():  # nobody takes part: waits drain the ranks' queues
                spans[op.name] = CollectiveSpan(name=op.name, group=op.group, start=0.0, end=0.0, last_issue=0.0,
                                                sm_based=op.sm_based, members=mask, rank_end=queue.copy())
                continue
            last_issue = float(now.max() if mask is None else now[mask].max())
            start = max(last_issue, float(queue.max() if mask is None else queue[mask].max()))
            end = start + op.seconds
            rank_end = None if mask is None else np.where(mask, end, queue)
            if mask is None:
                queue[:] = end
            else:
                queue[mask] = end
            spans[op.name] = CollectiveSpan(name=op.name, group=op.group, start=start, end=end,
                                            last_issue=last_issue, sm_based=op.sm_based, members=mask,
                                            rank_end=rank_end)
            if op.sm_based and op.seconds > 0:
                sm_spans.append((start, end, mask))
        elif isinstance(op, Wait):
            span = spans.get(op.collective)
            if span is None:
                raise SimulationError(f"wait {op.name!r} is on {op.collective!r}, which was not issued before it")
            waited.add(op.collective)
            until = span.end if span.rank_end is None else span.rank_end
            blocked = np.maximum(until - now, 0.0)
            if not blocked.any():
                continue
            mask = blocked > 0
            close_compute(mask, "compute")
            straggle = np.minimum(np.maximum(span.last_issue - now, 0.0), blocked)
            if span.members is not None:  # the others wait for their own queue, not for peers
                straggle = np.where(span.members, straggle, 0.0)
            if record:
                who = everyone[mask]
                blocks.append(("idle", f"wait for peers: {span.name}", who, now[mask], (now + straggle)[mask]))
                blocks.append(("communication", span.name, who, (now + straggle)[mask], (now + blocked)[mask]))
            idle += straggle
            exposed += blocked - straggle
            now = now + blocked
            seg_start = np.where(mask, now, seg_start)
        else:
            raise SimulationError(f"unknown op {op!r}: expected Compute, Issue or Wait")
    unwaited = sorted(set(spans) - waited)
    if unwaited:
        raise SimulationError(f"collective(s) {', '.join(unwaited)} are never waited on")
    close_compute(now > seg_start, "compute")
    step = float(max(now.max(), max((s.end for s in spans.values()), default=0.0)))
    tail = step - now
    if record and (tail > 0).any():
        mask = tail > 0
        blocks.append(("idle", "wait for the slowest rank", everyone[mask], now[mask], np.full(int(mask.sum()), step)))
    idle += tail
    return StepResult(ranks=ranks, step_s=step, compute_s=compute, busy_s=busy_time, exposed_s=exposed, idle_s=idle,
                      collectives=tuple(spans.values()), intervals=tuple(blocks))
