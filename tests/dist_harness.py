"""Run a function on several real gloo ranks (processes) on 127.0.0.1 and collect results.

A rank that raises makes the harness raise with that rank's traceback; a rank that hangs
past ``timeout`` is killed and the harness raises, so a test never hangs. The mechanism is
the benchmarks' (:func:`bench.spawn.run_gloo_ranks`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.spawn import run_gloo_ranks


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; returns the per-rank results."""
    return run_gloo_ranks(fn, world, *args, timeout=timeout)
