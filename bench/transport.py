"""``transport``: latency and bandwidth of one all-to-all, per transport, ranks and size.

Spawns R CPU ranks on this host (gloo on a file store) and times an even all-to-all of a
float32 message of B bytes per rank (B/R to each rank, own chunk included) through:

* ``gloo``: ``torch.distributed.all_to_all_single`` on the gloo group;
* ``shm``: ``fsc::all_to_all_single`` + ``wait_tensor`` (shared-memory transport).

Both allocate their output per call, as the functional collectives do (``shm`` draws large
outputs from its pool of released ones, see ``fsc.runtime.transport.shm.OutputPool``).
Timing is calibration's (:func:`fsc.analysis.calibration.time_collectives`): a sample is a
barrier and then 1 to 10 back-to-back calls (more for small messages), timed per call;
samples of the two transports alternate; a sample's time is the slowest rank's; a row is
the median over samples. ``shm`` rows are left out, with the reason, where
:func:`fsc.runtime.transport.available` says the shared-memory transport cannot run (they
would time the gloo fallback). ``nccl`` and ``copy-engine`` rows need a GPU machine and
are not produced by this CPU benchmark.

    python -m bench transport [--ranks R ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools

from bench.report import write_json
from bench.spawn import run_gloo_ranks
from fsc.runtime.transport import available

SIZES = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
TRANSPORTS = ("gloo", "shm")


def _plan(nbytes: int) -> tuple[int, int]:
    """(samples, calls per sample): a sample is several back-to-back calls for small
    messages (as nccl-tests times a loop), so that one late wake-up on a loaded host does
    not decide a sample; enough samples for a stable median within seconds on 2 cores."""
    if nbytes <= 64 << 10:
        return 25, 10
    if nbytes <= 1 << 20:
        return 15, 4
    if nbytes <= 4 << 20:
        return 11, 2
    return (7, 1) if nbytes <= 16 << 20 else (5, 1)


def _worker(rank: int, world: int, sizes: list[int], transports: list[str]) -> list[dict] | None:
    """One rank (under :func:`bench.spawn.run_gloo_ranks`); rank 0 returns the rows."""
    import torch
    import torch.distributed as dist

    import fsc.runtime.ops  # noqa: F401  (registers the ops)
    from fsc.analysis.calibration import time_collectives
    from fsc.runtime.transport import describe

    group = dist.group.WORLD
    rows = []
    for nbytes in sizes:
        x = torch.randn(nbytes // 4)
        splits = [x.numel() // world] * world

        def once(transport: str, x: torch.Tensor = x, splits: list[int] = splits) -> torch.Tensor:
            if transport == "gloo":  # a fresh output, as the functional collective allocates
                y = torch.empty_like(x)
                dist.all_to_all_single(y, x, splits, splits, group=group)
                return y
            handle = torch.ops.fsc.all_to_all_single(x, splits, splits, group.group_name)
            return torch.ops.fsc.wait_tensor(handle, x, splits, splits, group.group_name)

        samples, calls = _plan(nbytes)
        medians = time_collectives({t: functools.partial(once, t) for t in transports}, group=group,
                                   samples=samples, per_sample=calls, warmup=2)
        rows += [{"transport": t, "ranks": world, "bytes": nbytes, "median_ms": medians[t] * 1e3} for t in transports]
    if "shm" in transports:
        name, reason = describe(group)["cpu"]
        if name != "shm":  # the rows would time the fallback under the shared-memory transport's name
            raise RuntimeError(f"transport: the shared-memory transport fell back to {name!r}: {reason}")
    return rows if rank == 0 else None


def measure(world: int, sizes: list[int], transports: list[str], timeout: float = 1200.0) -> list[dict]:
    return run_gloo_ranks(_worker, world, sizes, transports, timeout=timeout, label="transport")[0]


def _format(rows: list[dict]) -> list[str]:
    by_key = {(r["transport"], r["ranks"], r["bytes"]): r["median_ms"] for r in rows}
    lines = [f"{'ranks':>5} {'bytes':>10} {'transport':<9} {'median ms':>10} {'MB/s':>9} {'gloo/this':>9}"]
    for r in rows:
        gloo = by_key.get(("gloo", r["ranks"], r["bytes"]))
        ratio = f"{gloo / r['median_ms']:9.2f}" if gloo else f"{'':9}"
        mbps = r["bytes"] / (r["median_ms"] * 1e-3) / 1e6
        lines.append(f"{r['ranks']:>5} {r['bytes']:>10} {r['transport']:<9} {r['median_ms']:>10.4f} {mbps:>9.1f} "
                     f"{ratio}")
    return lines


def run(argv: list[str], json_path: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench transport")
    parser.add_argument("--ranks", type=int, action="append", help="ranks per run (repeatable; default 2 and 4)")
    parser.add_argument("--max-bytes", type=int, default=SIZES[-1], help="largest message (default 64 MiB)")
    args = parser.parse_args(argv)
    if any(r < 2 for r in args.ranks or []):
        parser.error("--ranks must be at least 2")
    sizes = [s for s in SIZES if s <= args.max_bytes]
    transports = list(TRANSPORTS)
    unavailable = available("cpu")
    if unavailable is not None:
        print(f"shm: not measured: {unavailable}")
        transports.remove("shm")
    table: list[dict] = []
    for world in args.ranks or [2, 4]:
        table.extend(measure(world, sizes, transports))
    for line in _format(table):
        print(line)
    write_json(json_path, table)
    return 0


if __name__ == "__main__":  # also runnable alone: python -m bench.transport [--json PATH] ...
    import sys

    main_parser = argparse.ArgumentParser(add_help=False)
    main_parser.add_argument("--json", default="results/transport.json")
    known, rest = main_parser.parse_known_args(sys.argv[1:])
    sys.exit(run(rest, known.json))
