"""``attention``: the jagged attention kernels (:func:`fsc.kernels.jagged_attention`) on a
GPU, forward and forward+backward, against

- the PyTorch reference (``impl="reference"``, padded and dense);
- FlexAttention, in softmax mode only (it always normalizes over keys, so HSTU's SiLU
  attention is outside what it can express), with the jagged, target, prefix and window
  masks as a ``mask_mod`` over the packed tokens; relative-bias cases are left out;
- generative-recommenders' Triton HSTU kernel, HSTU mode without relative bias, when a
  checkout sits in ``peers/generative-recommenders`` (git-ignored; ``--gr-path`` to point
  elsewhere).

Each row also records the largest difference from the reference computed in fp32, so a
GPU run doubles as a correctness check of the kernels on real hardware. Without a CUDA
device it says so and writes JSON with ``"measured": false``: nothing is estimated.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import platform
from collections.abc import Callable
from typing import Any

import torch

from bench.report import write_json

SCENARIOS = ("causal", "ranking", "window", "bias")
"""causal: plain causal; ranking: targets and a contextual prefix; window: max_attn_len;
bias: relative position and time bias (ours and the reference only)."""


def _write(json_path: str, payload: dict) -> None:
    write_json(json_path, payload)


def _environment() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def run(argv: list[str], json_path: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench attention")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--mode", choices=("hstu", "softmax"), action="append")
    parser.add_argument("--scenario", choices=SCENARIOS, action="append")
    parser.add_argument("--gr-path", default="peers/generative-recommenders")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = {k: v for k, v in vars(args).items()}
    if not torch.cuda.is_available():
        reason = "no CUDA device available: this benchmark times GPU kernels and estimates nothing"
        print(f"attention: not measured ({reason})")
        _write(json_path, {"benchmark": "attention", "measured": False, "reason": reason, "config": config,
                           **_environment()})
        return 0
    rows = []
    for mode in args.mode or ["hstu", "softmax"]:
        for scenario in args.scenario or list(SCENARIOS):
            rows.extend(_measure(mode, scenario, args))
    _print(rows)
    _write(json_path, {"benchmark": "attention", "measured": True, "config": config, **_environment(),
                       "rows": rows})
    return 0


# ---------------------------------------------------------------------------------------
# GPU side
# ---------------------------------------------------------------------------------------

def _inputs(mode: str, scenario: str, args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    lengths = torch.randint(1, args.max_len + 1, (args.batch,), generator=g)
    offsets = torch.zeros(args.batch + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    t, h, d = int(offsets[-1]), args.heads, args.head_dim
    x: dict[str, Any] = {
        "q": torch.randn(t, h, d, generator=g), "k": torch.randn(t, h, d, generator=g),
        "v": torch.randn(t, h, d, generator=g), "offsets": offsets, "max_seq_len": args.max_len,
        "options": {"mode": mode},
    }
    o = x["options"]
    if scenario == "ranking":
        o["num_targets"] = torch.minimum(torch.randint(1, 17, (args.batch,), generator=g), lengths)
        o["contextual_len"] = 6
    elif scenario == "window":
        o["max_attn_len"] = 256
    elif scenario == "bias":
        o["position_bias"] = torch.randn(h, 2 * args.max_len - 1, generator=g) * 0.1
        o["time_bias"] = torch.randn(h, 32, generator=g) * 0.1
        o["timestamps"] = torch.randint(0, 3600, (t,), generator=g).cumsum(0)
    x["dout"] = torch.randn(t, h, d, generator=g)
    x = _to(x, "cuda")
    for name in ("q", "k", "v", "dout"):
        x[name] = x[name].to(dtype)
    for name in ("position_bias", "time_bias"):
        if name in o:
            o[name] = o[name].to(dtype)
    return x


def _to(x: Any, device: str) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _timed(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _measure(mode: str, scenario: str, args: argparse.Namespace) -> list[dict]:
    from fsc.kernels import jagged_attention

    x = _inputs(mode, scenario, args)
    q, k, v, dout, o = x["q"], x["k"], x["v"], x["dout"], x["options"]
    tables = [o[n] for n in ("position_bias", "time_bias") if n in o]
    base = {"mode": mode, "scenario": scenario, "tokens": int(q.shape[0])}

    def ours(impl: str) -> Callable[..., torch.Tensor]:
        def fn(q_, k_, v_, *tabs):
            opts = dict(o)
            for name, tab in zip([n for n in ("position_bias", "time_bias") if n in o], tabs):
                opts[name] = tab
            return jagged_attention(q_, k_, v_, x["offsets"], x["max_seq_len"], impl=impl, **opts)
        return fn

    # the yardstick: the reference in fp32
    with torch.no_grad():
        truth = ours("reference")(*(t.float() for t in (q, k, v, *tables)))
    candidates: list[tuple[str, Callable[..., torch.Tensor] | None, str]] = [
        ("fsc-triton", ours("triton"), ""), ("pytorch-reference", ours("reference"), "")]
    for name, build in (("flex-attention", lambda: _flex(mode, scenario, x)),
                        ("gr-triton", lambda: _generative_recommenders(mode, scenario, x, args.gr_path))):
        try:
            fn, note = build()
        except Exception as e:  # a competitor that cannot be set up is a row, not a failed benchmark
            fn, note = None, _failure(e)
        candidates.append((name, fn, note))

    rows = []
    for name, fn, note in candidates:
        row = base | {"impl": name}
        if fn is None:
            rows.append(row | {"note": note})
            continue
        leaves = [t.detach().requires_grad_() for t in (q, k, v, *(tables if name.startswith(("fsc", "pytorch")) else []))]
        try:
            with torch.no_grad():
                out = fn(*leaves)
            row["max_abs_err_vs_fp32_reference"] = float((out.float() - truth).abs().max())
            row["fwd_ms"] = _timed(lambda: fn(*leaves))
            row["fwd_bwd_ms"] = _timed(lambda: torch.autograd.grad(fn(*leaves), leaves, dout))
        except torch.cuda.OutOfMemoryError as e:
            row["note"] = f"out of memory: {e}".splitlines()[0]
            torch.cuda.empty_cache()
        except Exception as e:  # recorded in the row, and said out loud
            row["note"] = _failure(e)
            print(f"attention: {name} failed on {mode}/{scenario}: {row['note']}")
        rows.append(row)
    return rows


def _failure(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"failed: {type(e).__name__}: {text[0] if text else ''}"


def _flex(mode: str, scenario: str, x: dict) -> tuple[Callable[..., torch.Tensor] | None, str]:
    if mode != "softmax":
        return None, "not expressible: FlexAttention normalizes over keys (softmax); HSTU's SiLU attention does not"
    if scenario == "bias":
        return None, "not run: relative-bias tables are benchmarked for ours and the reference only"
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    o, offsets = x["options"], x["offsets"]
    t, device = x["q"].shape[0], x["q"].device
    lengths = offsets[1:] - offsets[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.shape[0], device=device), lengths, output_size=t)
    pos = torch.arange(t, device=device) - offsets[:-1][seq]
    c, window = o.get("contextual_len", 0), o.get("max_attn_len", 0)
    cap = lengths - (o["num_targets"] if "num_targets" in o else 0) + (1 - c if c > 0 else 0)
    ids = torch.minimum((pos - c + 1).clamp_min(0) if c > 0 else pos, cap[seq])
    cap_tok = cap[seq]

    def mask_mod(b, h, q_idx, kv_idx):
        d = ids[q_idx] - ids[kv_idx]
        visible = (q_idx == kv_idx) | (d > 0)
        if window > 0:
            visible = visible & (d <= window)
        if c > 0:
            visible = visible | ((ids[q_idx] == 0) & (ids[kv_idx] < cap_tok[q_idx]))
        return (seq[q_idx] == seq[kv_idx]) & visible

    # compiled, the block mask is computed block by block instead of from a dense T x T mask
    # (4G entries at 64k tokens); torch versions without the flag build it densely
    flags = {"_compile": True} if "_compile" in inspect.signature(create_block_mask).parameters else {}
    block_mask = create_block_mask(mask_mod, None, None, t, t, device=device, **flags)
    compiled = torch.compile(flex_attention)
    scale = 1.0 / math.sqrt(x["q"].shape[2])

    def fn(q, k, v):
        out = compiled(*(z.transpose(0, 1).unsqueeze(0) for z in (q, k, v)), block_mask=block_mask, scale=scale)
        return out.squeeze(0).transpose(0, 1)

    return fn, "block mask built once outside the timing"


def _generative_recommenders(mode: str, scenario: str, x: dict, gr_path: str
                             ) -> tuple[Callable[..., torch.Tensor] | None, str]:
    if mode != "hstu":
        return None, "not run: generative-recommenders' Triton kernel is HSTU attention only"
    if scenario == "bias":
        return None, "not run: its HSTU kernel takes no relative-bias tables"
    try:
        module = importlib.import_module("generative_recommenders.ops.triton.triton_hstu_attention")
    except ImportError as e:
        return None, (f"not importable ({e}): clone facebookresearch/generative-recommenders into {gr_path} "
                      f"(git-ignored) and run with PYTHONPATH={gr_path}")
    kernel = module.triton_hstu_mha
    o = x["options"]
    kwargs = {"N": x["max_seq_len"], "alpha": 1.0 / math.sqrt(x["q"].shape[2]), "seq_offsets": x["offsets"],
              "causal": True, "num_targets": o.get("num_targets"), "max_attn_len": o.get("max_attn_len", 0),
              "contextual_seq_len": o.get("contextual_len", 0)}
    accepted = inspect.signature(kernel).parameters
    kwargs = {k: val for k, val in kwargs.items() if k in accepted}

    def fn(q, k, v):
        return kernel(q=q, k=k, v=v, **kwargs)

    return fn, f"{module.__name__}.triton_hstu_mha"


def _print(rows: list[dict]) -> None:
    print(f"{'mode':<8}{'scenario':<9}{'impl':<19}{'fwd ms':>9}{'fwd+bwd ms':>12}{'max err':>10}  note")
    for r in rows:
        fwd = f"{r['fwd_ms']:.3f}" if "fwd_ms" in r else "-"
        both = f"{r['fwd_bwd_ms']:.3f}" if "fwd_bwd_ms" in r else "-"
        err = f"{r['max_abs_err_vs_fp32_reference']:.2e}" if "max_abs_err_vs_fp32_reference" in r else "-"
        print(f"{r['mode']:<8}{r['scenario']:<9}{r['impl']:<19}{fwd:>9}{both:>12}{err:>10}  {r.get('note', '')}")
