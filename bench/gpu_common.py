"""What the sections of ``python -m bench gpu-check`` share: the run's clock and per-section
budgets, progress lines, timing, and the arithmetic every figure goes through (TFLOP/s,
fraction of the measured peak, slowdown). Pure where it can be, so tests check it on CPU."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


class Clock:
    """The run's wall clock and its global deadline (``--budget-s``)."""

    def __init__(self, budget_s: float, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self.start = now()
        self.budget_s = budget_s
        self.deadline = self.start + budget_s

    def elapsed(self) -> float:
        return self._now() - self.start

    def remaining(self) -> float:
        return self.deadline - self._now()

    def section(self, name: str, weight: float, weight_left: float) -> Budget:
        """The budget of a section about to start: its ``weight`` share of the time left, out
        of the ``weight_left`` of the sections not yet run (so time a section does not use
        passes to the later ones), never past the global deadline."""
        share = self.remaining() * weight / weight_left if weight_left > 0 else self.remaining()
        return Budget(name=name, deadline=self._now() + max(share, 0.0), global_deadline=self.deadline,
                      now=self._now)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """One section's time: sub-steps ask :meth:`expired` before they start and record
    :attr:`reason` for what they skip."""

    name: str
    deadline: float
    global_deadline: float
    now: Callable[[], float] = time.monotonic

    def remaining(self) -> float:
        return min(self.deadline, self.global_deadline) - self.now()

    def expired(self, needs_s: float = 0.0) -> bool:
        return self.remaining() <= needs_s

    @property
    def reason(self) -> str:
        if self.now() >= self.global_deadline:
            return "skipped: the run's --budget-s deadline passed"
        return f"skipped: not enough left of section {self.name!r}'s share of --budget-s"


class Progress:
    """Progress lines with a wall-clock time and the seconds since start, flushed at once,
    so a run that is killed still shows where it was."""

    def __init__(self, clock: Clock, stream: Any = None) -> None:
        self.clock, self.stream = clock, stream

    def __call__(self, message: str) -> None:
        stream = self.stream or sys.stdout
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp} +{self.clock.elapsed():6.1f}s] {message}", file=stream, flush=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
    """What every section gets."""

    dry_run: bool
    device: str
    """``"cuda"`` on a GPU, ``"cpu"`` in the dry run."""
    log: Callable[[str], None]
    results: dict
    """Results of the sections that ran before (the peak is read from here)."""
    seed: int = 0

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


# ------------------------------------------------------------------------- arithmetic


def tflops(flops: float | None, ms: float | None) -> float | None:
    """TFLOP/s of ``flops`` done in ``ms`` milliseconds (None when either is missing)."""
    if flops is None or ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def fraction_of_peak(value_tflops: float | None, peak_tflops: float | None) -> float | None:
    """``value / peak`` (None when either is missing or the peak is not positive)."""
    if value_tflops is None or peak_tflops is None or peak_tflops <= 0:
        return None
    return value_tflops / peak_tflops


def slowdown(alone_ms: float | None, contended_ms: float | None) -> float | None:
    """How much longer the same work took under contention, as a fraction: 0.02 is 2%
    slower, negative is faster (noise)."""
    if alone_ms is None or contended_ms is None or alone_ms <= 0:
        return None
    return contended_ms / alone_ms - 1.0


def gbps(nbytes: float, ms: float | None) -> float | None:
    if ms is None or ms <= 0:
        return None
    return nbytes / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------- timing


def time_ms(fn: Callable[[], Any], *, cuda: bool, reps: int = 3) -> float:
    """Median milliseconds of one call. On CUDA: Triton's ``do_bench`` (25 ms warm-up, 100 ms
    of repetitions, L2 flushed between calls, median). On CPU (the dry run's stand-ins):
    one warm-up call, then the median of ``reps`` calls."""
    if cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def failure(exc: BaseException) -> str:
    """One line naming an exception (rows keep it; the section's traceback is elsewhere)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
