"""gpu-check sections 1 and 2: the jagged attention kernels' correctness against the float64
reference, and their speed next to the peers a user would otherwise run.

**Correctness.** HSTU and softmax modes; a plain causal case and one with targets, a
contextual prefix, a window and both relative-bias tables; lengths from 1 to 4,096; fp32
and bf16; forward and every gradient. Tolerances (per output, against the reference in
float64 on the same inputs): fp32 ``max|err| <= max(1e-5 * max|truth|, 2 * err of the
PyTorch reference in fp32)``; bf16 ``max|err| <= 2 * err of the PyTorch reference in bf16``
(the house rule of ``tests/kernels``). The bf16 causal cases go through the public entry
(autotuned, the kernels the speed section times); the others through the launchers with
fixed blocks, which saves the autotuner's compiles.

**Speed.** bf16, 4 heads, head dim 128, jagged batches of 65,536 tokens whose lengths are
uniform in [1, N] (one sequence exactly N), for N = 4096, 2048, 1024, 512. TFLOP/s count
only the unmasked work, the same count for every implementation: ``2 * pairs * H * (D +
Dv)`` forward and ``2 * pairs * H * (3 D + 2 Dv)`` backward (score recomputation included,
FlashAttention's convention and ``fsc.kernels``' FLOP formulas), with ``pairs`` the causal
(query, key) pairs, ``sum L (L + 1) / 2``. Work a peer spends on padding or masked blocks
is not counted, so its TFLOP/s say how fast it delivers the same result. Peers: PyTorch
SDPA on the batch padded to N (``is_causal``; right padding, so valid rows never see
padding keys; padding done outside the timing), FlexAttention with a jagged causal block
mask over the packed tokens (softmax mode; mask built outside the timing, from
``bench.attention``), and padded PyTorch HSTU attention compiled by Inductor (HSTU mode).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from bench.gpu_common import Budget, Context, failure, fraction_of_peak, tflops, time_ms

# ------------------------------------------------------------------------- batches and FLOPs


def jagged_lengths(total_tokens: int, max_len: int, seed: int = 0) -> list[int]:
    """Sequence lengths summing to exactly ``total_tokens``: the first is ``max_len`` (so the
    batch reaches its maximum), the rest uniform in [1, max_len], the last cut to fit."""
    if total_tokens < 1 or max_len < 1:
        raise ValueError(f"total_tokens and max_len must be >= 1, got {total_tokens} and {max_len}")
    rng = np.random.default_rng([seed, max_len, total_tokens])
    lengths = [min(max_len, total_tokens)]
    left = total_tokens - lengths[0]
    while left > 0:
        n = min(int(rng.integers(1, max_len + 1)), left)
        lengths.append(n)
        left -= n
    return lengths


def visible_pairs(lengths: Sequence[int], causal: bool = True) -> int:
    """(query, key) pairs that attention computes with no mask but causality."""
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


def attention_flops(lengths: Sequence[int], heads: int, d: int, dv: int, direction: str,
                    causal: bool = True) -> int:
    """Useful FLOPs of ``direction`` (``fwd``, ``bwd`` or ``fwd+bwd``) over these lengths."""
    pairs = visible_pairs(lengths, causal)
    fwd = 2 * pairs * heads * (d + dv)
    bwd = 2 * pairs * heads * (3 * d + 2 * dv)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def offsets_of(lengths: Sequence[int]) -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0)
    return offsets


def pad_index(lengths: Sequence[int], max_len: int) -> torch.Tensor:
    """``[B, N]``: the packed token at each padded slot, -1 past a sequence's end."""
    index = torch.full((len(lengths), max_len), -1, dtype=torch.int64)
    start = 0
    for b, n in enumerate(lengths):
        index[b, :n] = torch.arange(start, start + n)
        start += n
    return index


def to_padded(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Packed ``[T, H, D]`` to padded ``[B, H, N, D]``, zeros in the padding."""
    out = x[index.clamp(min=0)] * (index >= 0)[..., None, None].to(x.dtype)
    return out.permute(0, 2, 1, 3).contiguous()


# ------------------------------------------------------------------------- correctness


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    mode: str
    dtype: str
    lengths: tuple[int, ...]
    heads: int = 2
    d: int = 64
    dv: int = 64
    targets: tuple[int, ...] | None = None
    contextual_len: int = 0
    max_attn_len: int = 0
    pos_p: int = 0
    time_buckets: int = 0
    blocks: tuple[int, int] | None = None
    """None: the public entry point (autotuned on CUDA); else the launchers with these blocks."""


def correctness_cases(dry_run: bool) -> list[Case]:
    if dry_run:  # the interpreter: tiny, its smallest blocks
        plain = {"lengths": (1, 7, 33), "heads": 1, "d": 16, "dv": 16}
        masked = {"lengths": (1, 9, 30), "heads": 1, "d": 16, "dv": 16, "targets": (1, 2, 3), "contextual_len": 3,
                  "max_attn_len": 5, "pos_p": 6, "time_buckets": 8}
        fixed = (16, 16)
    else:
        plain = {"lengths": (1, 7, 129, 1000, 4096), "heads": 2, "d": 128, "dv": 128}
        masked = {"lengths": (1, 33, 700, 4096), "heads": 2, "d": 64, "dv": 64, "targets": (1, 3, 10, 16),
                  "contextual_len": 6, "max_attn_len": 256, "pos_p": 4096, "time_buckets": 32}
        fixed = (64, 64)  # bf16; fp32 gets (32, 32) below: 64 x 128 fp32 tiles in 3 stages overflow shared memory
    cases = []
    for dtype in ("float32", "bfloat16"):
        for mode in ("hstu", "softmax"):
            blocks = fixed if dry_run or dtype == "bfloat16" else (32, 32)
            cases.append(Case(name="causal", mode=mode, dtype=dtype, blocks=None if dtype == "bfloat16" else blocks,
                              **plain))
            cases.append(Case(name="targets+prefix+window+bias", mode=mode, dtype=dtype, blocks=blocks, **masked))
    if dry_run:  # half of them: still both modes, dtypes, entries and mask sets (tests/kernels run them all)
        cases = [cases[i] for i in (0, 3, 5, 6)]
    return cases


def _case_inputs(case: Case, device: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_of(case.lengths)
    t = int(offsets[-1])
    x: dict[str, Any] = {n: torch.randn(t, case.heads, dim, generator=g, dtype=torch.float64)
                         for n, dim in (("q", case.d), ("k", case.d), ("v", case.dv), ("dout", case.dv))}
    options: dict[str, Any] = {"mode": case.mode, "contextual_len": case.contextual_len,
                               "max_attn_len": case.max_attn_len}
    if case.targets is not None:
        options["num_targets"] = torch.tensor(case.targets, dtype=torch.int32)
    if case.pos_p:
        options["position_bias"] = torch.randn(case.heads, 2 * case.pos_p - 1, generator=g, dtype=torch.float64)
    if case.time_buckets:
        options["time_bias"] = torch.randn(case.heads, case.time_buckets, generator=g, dtype=torch.float64)
        options["timestamps"] = torch.randint(0, 41, (t,), generator=g).cumsum(0)
    x = {n: v.to(device) for n, v in x.items()}
    x["options"] = {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in options.items()}
    x["offsets"], x["max_seq_len"] = offsets.to(device), max(case.lengths)
    return x


def _leaves(x: dict, dtype: torch.dtype) -> tuple[list[torch.Tensor], dict]:
    leaves = [x[n].to(dtype).requires_grad_() for n in ("q", "k", "v")]
    options = dict(x["options"])
    for name in ("position_bias", "time_bias"):
        if name in options:
            options[name] = options[name].to(dtype).requires_grad_()
            leaves.append(options[name])
    return leaves, options


def _results(fn: Callable[..., torch.Tensor], x: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    """[out, grads of q, k, v and the tables] of ``fn(q, k, v, offsets, max_seq_len, **options)``."""
    leaves, options = _leaves(x, dtype)
    out = fn(*leaves[:3], x["offsets"], x["max_seq_len"], **options)
    return [out.detach(), *torch.autograd.grad(out, leaves, x["dout"].to(out.dtype))]


def _launchers(case: Case, x: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    ja = importlib.import_module("fsc.kernels.jagged_attention")
    leaves, options = _leaves(x, dtype)
    q, k, v = (t.detach() for t in leaves[:3])
    tables = [options[n].detach() if n in options else None for n in ("position_bias", "time_bias")]
    args = (x["offsets"], options.get("num_targets"), options.get("timestamps"), *tables, x["max_seq_len"],
            case.mode == "softmax", 1.0 / math.sqrt(case.d), True, case.contextual_len, case.max_attn_len)
    out, lse = ja._launch_forward(q, k, v, *args, blocks=case.blocks)
    grads = ja._launch_backward(x["dout"].to(dtype), q, k, v, out, lse, *args, blocks=case.blocks)
    return [out, *grads[:3], *(g for g in grads[3:] if g.numel())]


def within_tolerance(dtype: str, err: float, ref_err: float, scale: float) -> tuple[bool, float]:
    """(passes, the bound) for a kernel error ``err`` given the PyTorch reference's own error
    in that dtype and ``max|truth|`` (see the module docstring)."""
    bound = 2 * ref_err if dtype != "float32" else max(1e-5 * scale, 2 * ref_err)
    return err <= bound, bound


def run_case(case: Case, device: str, seed: int = 0) -> dict:
    from fsc.kernels import jagged_attention, jagged_attention_reference

    dtype = getattr(torch, case.dtype)
    x = _case_inputs(case, device, seed)
    truth = _results(jagged_attention_reference, x, torch.float64)
    baseline = _results(jagged_attention_reference, x, dtype)
    if case.blocks is None:
        ours = _results(lambda *a, **o: jagged_attention(*a, impl="triton", **o), x, dtype)
    else:
        ours = _launchers(case, x, dtype)
    names = ["out", "dq", "dk", "dv"] + [f"d_{n}" for n in ("position_bias", "time_bias") if n in x["options"]]
    outputs = {}
    for name, t, o, r in zip(names, truth, ours, baseline):
        err = float((o.double() - t).abs().max()) if t.numel() else 0.0
        ref_err = float((r.double() - t).abs().max()) if t.numel() else 0.0
        scale = float(t.abs().max()) if t.numel() else 0.0
        ok, bound = within_tolerance(case.dtype, err, ref_err, scale)
        outputs[name] = {"max_abs_err": err, "reference_err": ref_err, "bound": bound, "max_abs_truth": scale,
                         "ok": ok}
    return {**dataclasses.asdict(case), "entry": "public (autotuned)" if case.blocks is None else "launchers",
            "ok": all(o["ok"] for o in outputs.values()), "outputs": outputs}


def correctness(ctx: Context, budget: Budget) -> dict:
    rows = []
    for case in correctness_cases(ctx.dry_run):
        label = f"{case.mode}/{case.name}/{case.dtype} L<={max(case.lengths)}"
        if budget.expired():
            rows.append({**dataclasses.asdict(case), "ok": None, "skipped": budget.reason})
            continue
        ctx.log(f"correctness: {label}")
        try:
            row = run_case(case, ctx.device, ctx.seed)
        except Exception as exc:  # one case's failure is a row; the other cases still run
            row = {**dataclasses.asdict(case), "ok": False, "error": failure(exc)}
            _free(ctx)
        ctx.log(f"correctness: {label}: {'ok' if row['ok'] else 'FAILED'}")
        rows.append(row)
    ran = [r for r in rows if r["ok"] is not None]
    return {"tolerance": "fp32: max(1e-5 * max|truth|, 2 x fp32 reference error); bf16: 2 x bf16 reference error; "
                         "truth: the reference in float64",
            "all_ok": bool(ran) and all(r["ok"] for r in ran), "cases": rows}


# ------------------------------------------------------------------------- speed

SPEED_LENGTHS = (4096, 2048, 1024, 512)  # the targets' length first, in case time runs out
SPEED_TOKENS, SPEED_HEADS, SPEED_DIM = 65536, 4, 128
FLOP_COUNT = "useful work only: 2*pairs*H*(D+Dv) fwd, 2*pairs*H*(3D+2Dv) bwd, pairs = sum L(L+1)/2"
DRY_SPEED = {"lengths": (32,), "tokens": 64, "heads": 1, "dim": 16}


def padded_hstu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_seq_len: int, alpha: float) -> torch.Tensor:
    """HSTU attention on ``[B, H, N, D]`` padded on the right: SiLU of the scaled scores over
    N, causal (padding keys sit after every valid query, so causality hides them)."""
    n = q.shape[2]
    scores = torch.matmul(q, k.transpose(-2, -1)) * alpha
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    attn = torch.where(causal, F.silu(scores) / max_seq_len, 0.0)
    return torch.matmul(attn.to(v.dtype), v)


def _speed_inputs(lengths: list[int], heads: int, dim: int, device: str, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    t = sum(lengths)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = {n: torch.randn(t, heads, dim, generator=g, device=device).to(dtype) for n in ("q", "k", "v", "dout")}
    x["offsets"] = offsets_of(lengths).to(device)
    return x


IMPLS = {"hstu": ("fsc-triton", "sdpa-padded", "hstu-padded-inductor"),
         "softmax": ("fsc-triton", "sdpa-padded", "flex-attention")}
NEEDS_S = {"fsc-triton": 5.0, "sdpa-padded": 3.0, "flex-attention": 30.0, "hstu-padded-inductor": 30.0}
"""Seconds an implementation's row may take on a GPU (the peers compile): a row starts only
with that much of the section's time left, so the run ends near its deadline."""


def _builders(mode: str, x: dict, lengths: list[int], max_len: int, ctx: Context
              ) -> dict[str, Callable[[], tuple[Callable[..., torch.Tensor], list, Any, str]]]:
    """Per implementation of :data:`IMPLS`, a builder returning (fn, its inputs, the dout it
    takes, a note), or raising :class:`_Skip` with the reason it does not run here."""
    from fsc.kernels import jagged_attention

    def ours():
        def fn(q, k, v):
            return jagged_attention(q, k, v, x["offsets"], max_len, mode=mode, impl="triton")
        return fn, [x["q"], x["k"], x["v"]], x["dout"], ""

    def padded() -> tuple[list, torch.Tensor]:
        index = pad_index(lengths, max_len).to(x["q"].device)
        return [to_padded(x[n], index) for n in ("q", "k", "v")], to_padded(x["dout"], index)

    def sdpa():
        inputs, dout = padded()
        note = f"padded to [{len(lengths)}, H, {max_len}, D] outside the timing"
        if mode == "hstu":
            note += "; softmax attention, an anchor for HSTU mode (not the same function)"
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)), inputs, dout, note

    def flex():
        if not ctx.cuda:
            raise _Skip("dry run: FlexAttention is timed compiled by Inductor, on CUDA only")
        from bench.attention import _flex

        fn, note = _flex("softmax", "causal", {"options": {}, "offsets": x["offsets"], "q": x["q"]})
        return fn, [x["q"], x["k"], x["v"]], x["dout"], note

    def hstu_inductor():
        inputs, dout = padded()
        alpha = 1.0 / math.sqrt(x["q"].shape[2])

        def eager(q, k, v):
            return padded_hstu(q, k, v, max_len, alpha)
        if not ctx.cuda:  # Inductor's CPU compile would take most of the dry run's time
            return eager, inputs, dout, "dry run: not compiled"
        return torch.compile(eager, dynamic=False), inputs, dout, "torch.compile (Inductor, default mode)"

    return {"fsc-triton": ours, "sdpa-padded": sdpa, "flex-attention": flex, "hstu-padded-inductor": hstu_inductor}


class _Skip(Exception):
    """A peer that does not run here, for a stated reason (not a failure)."""


def _speed_row(base: dict, impl: str, direction: str, flops: int, ms: float | None, peak: float | None,
               **extra: Any) -> dict:
    value = tflops(flops, ms)
    return {**base, "impl": impl, "direction": direction, "useful_gflop": flops / 1e9, "ms": ms, "tflops": value,
            "fraction_of_peak": fraction_of_peak(value, peak), **extra}


def _time_impl(fn: Callable[..., torch.Tensor], inputs: list, dout: torch.Tensor, cuda: bool) -> tuple[float, float]:
    reps = 3 if cuda else 1  # CPU: the dry run's stand-ins (interpreted kernels take a second a call)
    with torch.no_grad():
        fwd = time_ms(lambda: fn(*inputs), cuda=cuda, reps=reps)
    leaves = [t.detach().requires_grad_() for t in inputs]
    both = time_ms(lambda: torch.autograd.grad(fn(*leaves), leaves, dout), cuda=cuda, reps=reps)
    return fwd, both


def _measure(ctx: Context, budget: Budget, label: str, build: Callable | None, needs_s: float = 0.0
             ) -> tuple[dict, dict]:
    """(status fields, {direction: ms}) of one implementation: timed, skipped or failed."""
    times: dict[str, float | None] = {"fwd": None, "fwd+bwd": None}
    if build is None or budget.expired(needs_s=needs_s if ctx.cuda else 0.0):
        return {"skipped": budget.reason}, times
    ctx.log(f"speed: {label}")
    try:
        fn, inputs, dout, note = build()
        times["fwd"], times["fwd+bwd"] = _time_impl(fn, inputs, dout, ctx.cuda)
        return {"note": note}, times
    except _Skip as exc:
        return {"skipped": str(exc)}, times
    except Exception as exc:  # a peer that fails is a row, not a failed section
        ctx.log(f"speed: {label} failed: {failure(exc)}")
        _free(ctx)
        return {"error": failure(exc)}, times


def speed(ctx: Context, budget: Budget) -> dict:
    peak_section = ctx.results.get("peak", {}).get("result") or {}
    peak = peak_section.get("tflops")
    sizes = DRY_SPEED if ctx.dry_run else {"lengths": SPEED_LENGTHS, "tokens": SPEED_TOKENS, "heads": SPEED_HEADS,
                                                "dim": SPEED_DIM}
    heads, dim = sizes["heads"], sizes["dim"]
    rows = []
    for max_len in sizes["lengths"]:
        lengths = jagged_lengths(sizes["tokens"], max_len, ctx.seed)
        base = {"max_len": max_len, "tokens": sum(lengths), "sequences": len(lengths), "heads": heads,
                "head_dim": dim, "dtype": "bfloat16" if ctx.cuda else "float32", "device": ctx.device}
        x = _speed_inputs(lengths, heads, dim, ctx.device, ctx.seed) if not budget.expired() else None
        for mode in ("hstu", "softmax"):
            flops = {d: attention_flops(lengths, heads, dim, dim, d) for d in ("fwd", "fwd+bwd")}
            builders = _builders(mode, x, lengths, max_len, ctx) if x is not None else {}
            for impl in IMPLS[mode]:
                status, times = _measure(ctx, budget, f"{mode} N={max_len} {impl}", builders.get(impl),
                                         NEEDS_S[impl])
                for direction in ("fwd", "fwd+bwd"):
                    rows.append(_speed_row({**base, "mode": mode}, impl, direction, flops[direction],
                                           times[direction], peak, **status))
        del x
        _free(ctx)
    return {"peak_tflops": peak, "flop_count": FLOP_COUNT, "rows": rows,
            "targets": speed_targets(rows, evaluate=not ctx.dry_run)}


def speed_targets(rows: list[dict], evaluate: bool = True) -> list[dict]:
    """The issue's targets at the longest length, as measured (None where a figure is missing;
    ``evaluate=False``: the dry run's stand-ins, never judged against GPU targets)."""
    def find(mode: str, impl: str, direction: str) -> dict | None:
        longest = max((r["max_len"] for r in rows), default=None)
        return next((r for r in rows if (r["mode"], r["impl"], r["direction"], r["max_len"])
                     == (mode, impl, direction, longest)), None)

    hstu = find("hstu", "fsc-triton", "fwd")
    frac = hstu["fraction_of_peak"] if hstu else None
    targets = [{"target": "HSTU forward >= 50% of the measured bf16 matmul peak", "max_len": hstu and hstu["max_len"],
                "value": frac, "met": None if frac is None else frac >= 0.5}]
    for direction in ("fwd", "fwd+bwd"):
        ours, flex = find("softmax", "fsc-triton", direction), find("softmax", "flex-attention", direction)
        ratio = (ours["tflops"] / flex["tflops"]) if ours and flex and ours["tflops"] and flex["tflops"] else None
        targets.append({"target": f"softmax {direction} at least as fast as FlexAttention (ours / flex)",
                        "max_len": ours and ours["max_len"], "value": ratio,
                        "met": None if ratio is None else ratio >= 1.0})
    if not evaluate:
        for t in targets:
            t.update(met=None, note="not judged: dry-run stand-ins on CPU")
    return targets


def _free(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.empty_cache()
