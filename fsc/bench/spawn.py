"""Run a benchmark's ranks as spawned processes on this machine and collect their results."""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections.abc import Callable
from typing import Any


def run_spawned(target: Callable[..., None], world: int, args: tuple, *, timeout: float, label: str,
                prefix: str = "fsc-bench-") -> list[Any]:
    """Start ``target(rank, world, store, *args, out)`` on ``world`` spawned processes and
    return what each pickled into ``out`` as ``("ok", value)``; ``store`` is a file path for
    a ``FileStore`` rendezvous. A rank that reports ``("error", traceback)``, dies without a
    result, or outlives ``timeout`` seconds (counted once for all ranks; every live rank is
    then killed) raises, naming ``label`` and the rank."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        store = os.path.join(tmp, "store")
        outs = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world)]
        procs = [ctx.Process(target=target, args=(r, world, store, *args, outs[r])) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"{label}: ranks {hung} of {world} did not finish within {timeout}s")
        results = []
        for r, path in enumerate(outs):
            if not os.path.exists(path):
                raise RuntimeError(f"{label}: rank {r} died without a result (exit code {procs[r].exitcode})")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise RuntimeError(f"{label}: rank {r} of {world} failed:\n{value}")
            results.append(value)
        return results
