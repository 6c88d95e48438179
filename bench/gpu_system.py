"""gpu-check: the measured matmul peak, SM contention (section 4) and the copy-engine
all-to-all (section 5).

**Peak.** A bf16 ``[8192, 8192] @ [8192, 8192]`` matmul timed with Triton's ``do_bench``:
the limit every attention figure is a fraction of (the ``h100``/``h200`` cost-model
profiles' datasheet figure is recorded next to it).

**Contention.** The same matmul, back to back on the default stream, alone and while a
second stream copies an embedding exchange's worth of bytes (64 MiB per copy) over and
over, from before the first matmul to after the last: ``cudaMemcpyAsync`` device to device on the one GPU
(the driver decides whether that is a copy engine or a kernel), ``cudaMemcpyAsync`` into
pinned host memory (a copy engine), and a Triton copy kernel on 32 CTAs (an SM-based copy
like NCCL's channels). ``slowdown = matmul time under the copy / alone - 1``; each figure
is the median of three repetitions; ``overlapped`` says the copies outlasted the matmuls.

**All-to-all.** ``fsc.runtime.all_to_all`` on 2 and 4 processes sharing the one GPU (gloo
as the group's own collective; the runtime picks the copy-engine transport when it finds
it available, and the result names the transport that ran): every rank's output checked
element by element against the exchange computed on the host, then timed (the slowest
rank's mean per call) next to the Triton copy kernel moving the same bytes on one rank.
The dry run does the same on 2 CPU ranks (the shared-memory transport) with small messages.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from typing import Any

import torch
import triton
import triton.language as tl

from bench.gpu_common import Budget, Context, failure, gbps, slowdown, tflops, time_ms

MIB = 1 << 20
COPY_CTAS = 32  # NCCL runs its collectives on a few dozen channels (CTAs), not the whole GPU
COPY_BLOCK = 4096


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    # a persistent grid: each program strides over the buffer, as NCCL's channels do
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def kernel_copy(src: torch.Tensor, dst: torch.Tensor, ctas: int = COPY_CTAS) -> None:
    """Copy ``src`` into ``dst`` (same shape, contiguous, int32) with :func:`_copy_kernel`."""
    n = src.numel()
    grid = (max(1, min(ctas, triton.cdiv(n, COPY_BLOCK))),)
    _copy_kernel[grid](src, dst, n, BLOCK=COPY_BLOCK)


# ------------------------------------------------------------------------- peak


def peak(ctx: Context, budget: Budget) -> dict:
    from fsc.analysis.cost_model import DEVICE_PROFILES

    n = 8192 if ctx.cuda else 256
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    a, b = (torch.randn(n, n, device=ctx.device).to(dtype) for _ in range(2))
    c = torch.empty(n, n, device=ctx.device, dtype=dtype)
    ms = time_ms(lambda: torch.matmul(a, b, out=c), cuda=ctx.cuda)
    result = {"shape": [n, n, n], "dtype": str(dtype).removeprefix("torch."), "ms": ms,
              "tflops": tflops(2 * n**3, ms), "device": ctx.device}
    if ctx.cuda:
        name = torch.cuda.get_device_name().lower()
        profile = DEVICE_PROFILES["h200" if "h200" in name else "h100"]
        result["profile"] = profile.name
        result["profile_tflops"] = profile.flops_half / 1e12
        result["measured_over_profile"] = result["tflops"] / result["profile_tflops"]
    ctx.log(f"peak: {result['tflops']:.3g} TFLOP/s ({result['dtype']} {n}^3 matmul on {ctx.device})")
    return result


# ------------------------------------------------------------------------- contention


def _span_ms(enqueue: Any, stream: torch.cuda.Stream) -> float:
    """GPU milliseconds ``enqueue()`` takes on ``stream``, alone."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        start.record()
        enqueue()
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _contended(matmul: Any, iters: int, background: Any, per_matmul: int) -> tuple[float, bool]:
    """(ms per matmul while a second stream runs ``background`` over and over, whether the
    background outlasted the matmuls). The two queues are fed in step (``per_matmul``
    background calls, a little more than one matmul's time, before each matmul), so neither
    waits for the other's launches; a tail of background calls covers the last matmuls."""
    side = torch.cuda.Stream()
    bg_start, bg_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    mm_start, mm_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        bg_start.record()
    mm_start.record()
    for _ in range(iters):
        with torch.cuda.stream(side):
            for _ in range(per_matmul):
                background()
        matmul()
    mm_end.record()
    with torch.cuda.stream(side):
        for _ in range(2 * per_matmul):
            background()
        bg_end.record()
    torch.cuda.synchronize()
    matmul_ms = mm_start.elapsed_time(mm_end)
    # the two start events are recorded together on two streams: allow them 0.1 ms either way
    overlapped = bg_start.elapsed_time(mm_start) > -0.1 and mm_start.elapsed_time(bg_end) >= matmul_ms
    return matmul_ms / iters, overlapped


def contention(ctx: Context, budget: Budget) -> dict:
    cases = ("memcpy-d2d", "memcpy-d2h-pinned", "kernel-copy")
    if not ctx.cuda:
        # the copy kernel's logic is checked (under the Triton interpreter); nothing is timed
        src = torch.arange(3 * COPY_BLOCK + 5, dtype=torch.int32)
        dst = torch.zeros_like(src)
        kernel_copy(src, dst, ctas=2)
        reason = "CUDA only: copy engines and SM sharing do not exist on the CPU"
        rows = [contention_row("alone", None, None, skipped=reason)]
        rows += [contention_row(c, None, None, skipped=reason) for c in cases]
        return {"kernel_copy_checked": bool(torch.equal(src, dst)), "rows": rows}
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    nbytes = 64 * MIB
    src = torch.randint(0, 1 << 30, (nbytes // 4,), device="cuda", dtype=torch.int32)
    dst = torch.empty_like(src)
    host = torch.empty(src.shape, dtype=torch.int32, pin_memory=True)
    kernel_copy(src, dst)
    torch.cuda.synchronize()
    copy_ok = bool(torch.equal(src, dst))
    backgrounds = {"memcpy-d2d": lambda: dst.copy_(src),
                   "memcpy-d2h-pinned": lambda: host.copy_(src, non_blocking=True),
                   "kernel-copy": lambda: kernel_copy(src, dst)}

    def matmul() -> None:
        torch.matmul(a, b, out=c)

    side = torch.cuda.Stream()
    one = _span_ms(lambda: [matmul() for _ in range(10)], torch.cuda.current_stream()) / 10
    iters = max(10, math.ceil(150.0 / one))  # about 150 ms of matmuls per measurement
    alone = statistics.median(_span_ms(lambda: [matmul() for _ in range(iters)], torch.cuda.current_stream()) / iters
                              for _ in range(3))
    rows = [contention_row("alone", alone, alone, matmul_tflops=tflops(2 * n**3, alone))]
    for case in cases:
        if budget.expired():
            rows.append(contention_row(case, alone, None, skipped=budget.reason))
            continue
        ctx.log(f"contention: matmul with {case}")
        try:
            bg = backgrounds[case]
            copy_ms = _span_ms(lambda bg=bg: [bg() for _ in range(5)], side) / 5
            per_matmul = math.ceil(1.25 * alone / copy_ms)
            runs = [_contended(matmul, iters, bg, per_matmul) for _ in range(3)]
            with_ms = statistics.median(r[0] for r in runs)
            rows.append(contention_row(case, alone, with_ms, matmul_tflops=tflops(2 * n**3, with_ms),
                                       overlapped=all(r[1] for r in runs), bytes_per_copy=nbytes,
                                       copies_per_matmul=per_matmul,
                                       copy_gbps_alone=gbps(nbytes, copy_ms)))
        except Exception as exc:  # one case's failure is a row
            rows.append(contention_row(case, alone, None, error=failure(exc)))
    return {"matmul": [n, n, n], "kernel_copy_ctas": COPY_CTAS, "kernel_copy_checked": copy_ok,
            "target": "slowdown <= 0.02 under the copy engine", "rows": rows}


def contention_row(case: str, alone_ms: float | None, with_ms: float | None, **extra: Any) -> dict:
    return {"case": case, "matmul_ms_alone": alone_ms, "matmul_ms": with_ms, "slowdown": slowdown(alone_ms, with_ms),
            **extra}


# ------------------------------------------------------------------------- all-to-all


def exchange_rank(rank: int, world: int, device_type: str, sizes: list[int], iters: int) -> dict:
    """One rank (under :func:`bench.spawn.run_gloo_ranks`): check and time the all-to-all."""
    import torch.distributed as dist

    from fsc.runtime import all_to_all, describe

    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    rows = []
    for nbytes in sizes:
        n = nbytes // 4 // world * world
        chunk = n // world
        x = (torch.arange(n, dtype=torch.int32) + rank * n).to(device)
        splits = [chunk] * world
        out = all_to_all(x, splits, splits, group)
        expected = torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk, dtype=torch.int32) + s * n
                              for s in range(world)])
        ok = bool(torch.equal(out.cpu(), expected))
        _sync(device)
        dist.barrier(group)
        start = time.perf_counter()
        for _ in range(iters):
            all_to_all(x, splits, splits, group)
        _sync(device)
        per_call = (time.perf_counter() - start) / iters * 1e3
        copy_ms = None
        dist.barrier(group)
        if rank == 0:  # the others wait at the barrier: the copy has the GPU to itself
            dst = torch.empty_like(x)
            if device.type == "cuda":
                copy = functools.partial(kernel_copy, x, dst)
            else:  # the dry run's stand-in
                copy = functools.partial(dst.copy_, x)
            copy_ms = time_ms(copy, cuda=device.type == "cuda")
        dist.barrier(group)
        rows.append({"bytes_per_rank": n * 4, "ok": ok, "ms": per_call, "copy_ms": copy_ms})
    op = "fsc::all_to_all_single" if hasattr(torch.ops.fsc, "all_to_all_single") else "freescale::all_to_all_single"
    return {"rank": rank, "rows": rows, "op": op,
            "transport": {dev: list(v) for dev, v in describe(group).items()}}


def merge_ranks(world: int, per_rank: list[dict]) -> list[dict]:
    """One row per message size: correct on every rank, the slowest rank's time, bandwidths
    (``algbw = bytes per rank / time``, ``busbw = algbw * (W - 1) / W`` as nccl-tests
    report all-to-all), and the copy kernel's bandwidth on the same bytes."""
    rows = []
    for i, first in enumerate(per_rank[0]["rows"]):
        mine = [r["rows"][i] for r in per_rank]
        ms = max(r["ms"] for r in mine)
        algbw = gbps(first["bytes_per_rank"], ms)
        rows.append({"world": world, "bytes_per_rank": first["bytes_per_rank"], "ok": all(r["ok"] for r in mine),
                     "ms": ms, "algbw_gbps": algbw, "busbw_gbps": algbw * (world - 1) / world if algbw else None,
                     "copy_kernel_ms": first["copy_ms"], "copy_kernel_gbps": gbps(first["bytes_per_rank"],
                                                                                  first["copy_ms"])})
    return rows


def exchange(ctx: Context, budget: Budget) -> dict:
    from bench.spawn import run_gloo_ranks

    worlds, sizes, iters = ((2,), [64 << 10], 5) if ctx.dry_run else ((2, 4), [MIB, 16 * MIB, 64 * MIB], 20)
    result: dict[str, Any] = {"worlds": {}}
    for world in worlds:
        if budget.expired(needs_s=20):
            result["worlds"][str(world)] = {"skipped": budget.reason}
            continue
        ctx.log(f"all-to-all: {world} processes on one {ctx.device} device")
        try:
            per_rank = run_gloo_ranks(exchange_rank, world, ctx.device, sizes, iters,
                                      timeout=max(budget.remaining(), 30.0), label="gpu-check all-to-all")
            result["worlds"][str(world)] = {"transport": per_rank[0]["transport"], "op": per_rank[0]["op"],
                                            "rows": merge_ranks(world, per_rank)}
        except Exception as exc:  # the other world size still runs
            result["worlds"][str(world)] = {"error": failure(exc), "detail": str(exc)[-4000:]}
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
