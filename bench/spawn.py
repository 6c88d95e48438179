"""Run a function on several gloo ranks (spawned processes on 127.0.0.1) and collect what
each returns: the benchmarks' multi-rank runs and the tests' harness
(``tests/dist_harness.py``) share it."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any


def _entry(fn: Callable[..., Any], rank: int, world: int, store: str, out: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if "GLOO_SOCKET_IFNAME" not in os.environ and "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            result = ("ok", fn(rank, world, *args))
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the parent, which raises
        result = ("error", traceback.format_exc())
    with open(out, "wb") as f:
        pickle.dump(result, f)


def run_gloo_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float, label: str = "") -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned processes, each with one compute
    thread and the default process group initialised (gloo, file store); returns the
    per-rank results (``fn`` must be picklable: a module-level function).

    A rank that raises makes this raise with that rank's traceback; a rank that dies without
    a result, or outlives ``timeout`` seconds (counted once for all ranks; every live rank is
    then killed), makes it raise too, so a caller never hangs. ``label`` prefixes messages."""
    prefix = f"{label}: " if label else ""
    hung, outcomes = spawn_ranks(_entry, fn, world, *args, timeout=timeout)
    if hung:
        raise TimeoutError(f"{prefix}ranks {hung} of {world} did not finish within {timeout}s")
    results = []
    for r, outcome in enumerate(outcomes):
        if outcome[0] == "died":
            raise RuntimeError(f"{prefix}rank {r} died without a result (exit code {outcome[1]})")
        if outcome[0] == "error":
            raise RuntimeError(f"{prefix}rank {r} of {world} failed:\n{outcome[1]}")
        results.append(outcome[1])
    return results


def spawn_ranks(entry: Callable[..., None], fn: Callable[..., Any], world: int, *args: Any,
                timeout: float) -> tuple[list[int], list[tuple]]:
    """The mechanism under :func:`run_gloo_ranks`, for callers that expect ranks to fail:
    ``entry(fn, rank, world, store, out, args)`` in ``world`` spawned processes (``store``:
    a file-store path; ``out``: where the entry pickles the rank's outcome tuple). Waits
    ``timeout`` seconds in all, kills every rank still alive, and returns ``(hung ranks,
    per-rank outcome)``, the outcome being what ``entry`` wrote or ``("died", exit code)``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fsc-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        outs = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world)]
        procs = [ctx.Process(target=entry, args=(fn, r, world, store, outs[r], args)) for r in range(world)]
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
        outcomes = []
        for r, path in enumerate(outs):
            if os.path.exists(path):
                with open(path, "rb") as f:
                    outcomes.append(pickle.load(f))
            else:
                outcomes.append(("died", procs[r].exitcode))
        return hung, outcomes
