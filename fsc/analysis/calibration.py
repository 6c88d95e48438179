"""Calibration: measure a device profile's numbers on every rank, then make the ranks agree.

Rank-local timings differ (a noisy neighbour, thermal state, a slower socket), and a
schedule chosen from them could differ between ranks, which deadlocks a job (DESIGN.md
invariant 2). So :func:`calibrate` is a collective: each rank measures, the measurements
are all-gathered in a fixed key order, and every rank reduces them the same way, either
``"max"`` (the slowest rank's figure for every quantity: the pessimistic, straggler-aware
choice) or ``"median"``. The result is an ordinary :class:`DeviceProfile` to pass as
``options={"device_profile": profile}``; nothing here runs at compile time, where a hidden
collective could hang ranks that compile different graphs.

Measured: fp32 and half matmul throughput, copy bandwidth, per-op overhead (all on the
given device), and, when the group has two ranks or more, the group's all-to-all latency
and bandwidth (taken as the intra-node link: calibrate with a node-local group).

**Links** are measured one way, here, for the profile and for the benchmarks and the
simulator's link fit alike: :func:`time_collectives` times collectives as the ranks see
them together (each sample starts at a barrier; a sample's time is the slowest rank's; the
result is the median over samples), and :func:`fit_link` fits ``seconds = latency + bytes
/ bandwidth`` to such times at several sizes.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from fsc.analysis.cost_model import DEVICE_PROFILES, DeviceProfile
from fsc.errors import OptionError

REDUCTIONS = ("max", "median")
#: quantities where larger is better (the slowest rank has the smallest value)
_THROUGHPUTS = ("flops_fp32", "flops_half", "memory_bandwidth", "intra_node_bandwidth")
_TIMES = ("op_overhead", "intra_node_latency")


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_compute(device: torch.device | str = "cpu", *, repeats: int = 5, matmul: int = 1024,
                    copy_bytes: int = 64 * 2**20) -> dict[str, float]:
    """This rank's matmul throughput (fp32, bf16), copy bandwidth and per-op overhead."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(matmul, matmul, device=device)
    b = torch.randn(matmul, matmul, device=device)
    ah, bh = a.bfloat16(), b.bfloat16()
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    tiny = torch.ones(4, device=device)
    flops = 2 * matmul**3
    return {
        "flops_fp32": flops / median_seconds(lambda: a @ b, repeats, sync),
        "flops_half": flops / median_seconds(lambda: ah @ bh, repeats, sync),
        # a copy reads and writes every byte
        "memory_bandwidth": 2 * copy_bytes / median_seconds(lambda: dst.copy_(src), repeats, sync),
        "op_overhead": median_seconds(lambda: torch.add(tiny, 1), 20 * repeats, sync),
    }


def time_collectives(calls: Mapping[str, Callable[[], object]], *, group: dist.ProcessGroup | None = None,
                     samples: int = 5, per_sample: int = 1, warmup: int = 1,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Seconds per call of each collective in ``calls``, the same on every rank.

    Each sample starts at a barrier and times ``per_sample`` back-to-back calls (more than
    one for small messages, so that one late wake-up on a loaded host does not decide a
    sample, as nccl-tests times a loop); a sample's time is the slowest rank's, since a
    collective ends when its last rank does; the result is the median over ``samples``.
    Samples of the different calls alternate, so that load from elsewhere on the host hits
    each alike. Collective over ``group``: every rank passes the same names in the same
    order. Without an initialised process group, this rank's times.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    distributed = dist.is_available() and dist.is_initialized()
    for fn in calls.values():
        for _ in range(warmup):
            fn()
        sync()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(samples):
        for name, fn in calls.items():
            if distributed:
                dist.barrier(group)
            start = time.perf_counter()
            for _ in range(per_sample):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / per_sample)
    table = torch.tensor([times[name] for name in calls], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(table, op=dist.ReduceOp.MAX, group=group)
    return {name: statistics.median(row) for name, row in zip(calls, table.tolist())}


def fit_link(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(latency s, bandwidth bytes/s)`` of ``seconds = latency + bytes / bandwidth``,
    least squares over ``(bytes, seconds)`` points at two sizes or more; the latency is
    clamped at 0, and a slope at or below 0 (noise) gives an unbounded bandwidth."""
    sizes = sorted({b for b, _ in points})
    if len(sizes) < 2:
        raise ValueError(f"a link fit needs points at two sizes or more, not {sizes}")
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    slope = sum((b - mean_b) * (t - mean_t) for b, t in points) / sum((b - mean_b) ** 2 for b, _ in points)
    return max(mean_t - slope * mean_b, 0.0), 1.0 / max(slope, 1e-30)


def all_to_all_bytes_sent(nbytes: int, world: int) -> float:
    """What one rank sends the others in an even all-to-all of ``nbytes`` over ``world``
    ranks (it keeps ``1/world`` of its input)."""
    return nbytes * (world - 1) / world


def measure_all_to_all(group: dist.ProcessGroup | None = None, *, device: torch.device | str = "cpu",
                       repeats: int = 5, small: int = 1024, large: int = 16 * 2**20) -> dict[str, float]:
    """Latency and bandwidth of the group's all-to-all: :func:`fit_link` of a ``small``-
    and a ``large``-byte exchange, timed by :func:`time_collectives`. Collective: every rank
    of ``group`` must call it."""
    world = dist.get_world_size(group)
    device = torch.device(device)
    calls: dict[str, Callable[[], object]] = {}
    points: list[tuple[float, str]] = []
    for nbytes in (small, large):
        x = torch.randn(max(nbytes // 4 // world, 1) * world, device=device)
        y = torch.empty_like(x)
        calls[f"{nbytes} bytes"] = lambda x=x, y=y: dist.all_to_all_single(y, x, group=group)
        points.append((all_to_all_bytes_sent(x.numel() * x.element_size(), world), f"{nbytes} bytes"))
    times = time_collectives(calls, group=group, samples=repeats, device=device)
    latency, bandwidth = fit_link([(sent, times[name]) for sent, name in points])
    return {"intra_node_latency": latency, "intra_node_bandwidth": bandwidth}


def agree(measured: dict[str, float], *, group: dist.ProcessGroup | None = None, reduce: str = "max") -> dict[str, float]:
    """Every rank's ``measured`` combined into one dict that is identical on all ranks.

    ``reduce="max"`` takes the slowest rank's value of each quantity (the largest time,
    the smallest throughput); ``"median"`` the median. Collective over ``group``; without
    an initialised process group, ``measured`` is returned as is.
    """
    if reduce not in REDUCTIONS:
        raise OptionError(f"calibration reduce={reduce!r} is not one of {', '.join(REDUCTIONS)}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return dict(measured)
    keys = sorted(measured)
    mine = torch.tensor([float(measured[k]) for k in keys], dtype=torch.float64)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(lengths, torch.tensor([len(keys)]), group=group)
    if any(int(n) != len(keys) for n in lengths):
        raise RuntimeError(f"calibration: ranks measured different quantities ({[int(n) for n in lengths]} values)")
    gathered = [torch.empty_like(mine) for _ in lengths]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered)  # [ranks, keys], the same bytes on every rank
    out = {}
    for i, key in enumerate(keys):
        column = sorted(float(v) for v in table[:, i])
        if reduce == "median":
            out[key] = statistics.median(column)
        else:
            out[key] = column[0] if key in _THROUGHPUTS else column[-1]
    return out


def calibrate(base: str | DeviceProfile = "cpu", *, group: dist.ProcessGroup | None = None, reduce: str = "max",
              device: torch.device | str = "cpu", repeats: int = 5) -> DeviceProfile:
    """``base`` with its compute, memory and (for a group of two or more ranks) link
    numbers replaced by measurements that all ranks agree on. Collective over ``group``
    when a process group is initialised; call it on every rank, before compiling."""
    if isinstance(base, str):
        if base not in DEVICE_PROFILES:
            raise OptionError(f"calibrate: base profile {base!r} is not one of {', '.join(DEVICE_PROFILES)}")
        base = DEVICE_PROFILES[base]
    if reduce not in REDUCTIONS:
        raise OptionError(f"calibrate: reduce={reduce!r} is not one of {', '.join(REDUCTIONS)}")
    measured = measure_compute(device, repeats=repeats)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    if distributed:
        measured |= measure_all_to_all(group, device=device, repeats=repeats)
    agreed = agree(measured, group=group, reduce=reduce)
    return dataclasses.replace(base, name=f"{base.name}-calibrated-{reduce}", **agreed)


__all__ = ["REDUCTIONS", "agree", "all_to_all_bytes_sent", "calibrate", "fit_link", "measure_all_to_all",
           "measure_compute", "median_seconds", "time_collectives"]
