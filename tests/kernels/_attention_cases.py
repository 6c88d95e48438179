"""Attention test cases, run in the interpreter worker (see conftest.py). Everything here is
picklable plain data in and out; the assertions live in test_jagged_attention.py."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Optional

import torch

ja = importlib.import_module("fsc.kernels.jagged_attention")  # the package's attribute is the function


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    mode: str
    lengths: tuple[int, ...]
    heads: int = 2
    d: int = 16
    dv: int = 16
    dtype: str = "float32"
    causal: bool = True
    targets: Optional[tuple[int, ...]] = None
    contextual_len: int = 0
    max_attn_len: int = 0
    pos_p: int = 0
    """0: no position table; P: a [H, 2P-1] table."""
    time_buckets: int = 0
    """0: no time table; NB: a [H, NB] table with timestamps."""
    max_seq_len: Optional[int] = None
    blocks: Optional[tuple[int, int]] = None
    """None: the public entry point; (BLOCK_M, BLOCK_N): the launchers with these blocks."""
    seed: int = 0

    def __str__(self) -> str:
        parts = [self.mode, "L" + "-".join(map(str, self.lengths)), f"H{self.heads}D{self.d}V{self.dv}", self.dtype]
        for flag, text in ((not self.causal, "noncausal"), (self.targets, f"targets{self.targets}"),
                           (self.contextual_len, f"ctx{self.contextual_len}"), (self.max_attn_len, f"win{self.max_attn_len}"),
                           (self.pos_p, f"pos{self.pos_p}"), (self.time_buckets, f"time{self.time_buckets}"),
                           (self.blocks, f"blocks{self.blocks}")):
            if flag:
                parts.append(text)
        return "_".join(parts)


TENSORS = ("out", "dq", "dk", "dv", "d_position_bias", "d_time_bias")


def make_inputs(case: Case) -> dict:
    """float64 leaves and integer side inputs, the same for every dtype of one case."""
    g = torch.Generator().manual_seed(case.seed)
    lengths = torch.tensor(case.lengths, dtype=torch.int64)
    offsets = torch.zeros(len(case.lengths) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    t = int(offsets[-1])
    x: dict = {
        "q": torch.randn(t, case.heads, case.d, generator=g, dtype=torch.float64),
        "k": torch.randn(t, case.heads, case.d, generator=g, dtype=torch.float64),
        "v": torch.randn(t, case.heads, case.dv, generator=g, dtype=torch.float64),
        "offsets": offsets,
        "max_seq_len": case.max_seq_len or max(max(case.lengths, default=1), 1),
        "dout": torch.randn(t, case.heads, case.dv, generator=g, dtype=torch.float64),
    }
    options: dict = {"mode": case.mode, "causal": case.causal, "contextual_len": case.contextual_len,
                     "max_attn_len": case.max_attn_len}
    if case.targets is not None:
        options["num_targets"] = torch.tensor(case.targets, dtype=torch.int32)
    if case.pos_p:
        options["position_bias"] = torch.randn(case.heads, 2 * case.pos_p - 1, generator=g, dtype=torch.float64)
    if case.time_buckets:
        options["time_bias"] = torch.randn(case.heads, case.time_buckets, generator=g, dtype=torch.float64)
        # gaps of 0..40 time units: differences span several log2 buckets, and 0 occurs
        gaps = torch.randint(0, 41, (t,), generator=g)
        options["timestamps"] = gaps.cumsum(0)
    x["options"] = options
    return x


def _leaves(x: dict, dtype: torch.dtype) -> tuple[list[torch.Tensor], dict]:
    """Differentiable copies in ``dtype``: [q, k, v, tables...] and the options using them."""
    leaves = [x[n].to(dtype).requires_grad_() for n in ("q", "k", "v")]
    options = dict(x["options"])
    for name in ("position_bias", "time_bias"):
        if name in options:
            options[name] = options[name].to(dtype).requires_grad_()
            leaves.append(options[name])
    return leaves, options


def _grads(out: torch.Tensor, leaves: list[torch.Tensor], dout: torch.Tensor) -> list[torch.Tensor]:
    # also with T = 0: the backward still runs, on empty tensors
    return list(torch.autograd.grad(out, leaves, dout.to(out.dtype)))


def reference_results(x: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    leaves, options = _leaves(x, dtype)
    out = ja.jagged_attention_reference(*leaves[:3], x["offsets"], x["max_seq_len"], **options)
    return [out.detach(), *_grads(out, leaves, x["dout"])]


def kernel_results(case: Case, x: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    leaves, options = _leaves(x, dtype)
    if case.blocks is None:
        out = ja.jagged_attention(*leaves[:3], x["offsets"], x["max_seq_len"], impl="triton", **options)
        return [out.detach(), *_grads(out, leaves, x["dout"])]
    # the launchers directly, with non-default blocks
    q, k, v = (t.detach() for t in leaves[:3])
    softmax = case.mode == "softmax"
    scale = 1.0 / case.d ** 0.5
    args = (x["offsets"], options.get("num_targets"), options.get("timestamps"),
            _detach(options.get("position_bias")), _detach(options.get("time_bias")), x["max_seq_len"], softmax,
            scale, case.causal, case.contextual_len, case.max_attn_len)
    out, lse = ja._launch_forward(q, k, v, *args, blocks=case.blocks)
    grads = ja._launch_backward(x["dout"].to(dtype), q, k, v, out, lse, *args, blocks=case.blocks)
    return [out, *grads[:3], *(g for g in grads[3:] if g.numel())]


def _detach(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.detach() if t is not None else None


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def errors(case: Case) -> dict[str, tuple[float, Optional[float], float]]:
    """Per output: (kernel's max abs error vs the float64 reference, the same for the
    PyTorch reference run in the case's dtype (None for float32), max |float64 value|)."""
    dtype = getattr(torch, case.dtype)
    x = make_inputs(case)
    truth = reference_results(x, torch.float64)
    ours = kernel_results(case, x, dtype)
    baseline = reference_results(x, dtype) if dtype != torch.float32 else [None] * len(truth)
    names = [n for n in TENSORS if n[:2] != "d_" or n[2:] in x["options"]]
    result = {}
    for name, t, o, r in zip(names, truth, ours, baseline):
        assert o.shape == t.shape and o.dtype == dtype, (name, o.shape, t.shape, o.dtype)
        scale = float(t.abs().max()) if t.numel() else 0.0
        result[name] = (_max_abs(o, t), _max_abs(r, t) if r is not None else None, scale)
    return result


def opcheck(case: Case) -> None:
    """torch.library.opcheck on both ops with impl='triton' (the interpreter). The AOT-dispatch
    check is left out: it traces the op, and the interpreter cannot be traced (the parent
    process runs the full opcheck on the reference path)."""
    x = make_inputs(case)
    o = x["options"]
    q, k, v = (x[n].float().requires_grad_() for n in ("q", "k", "v"))
    tables = [o[n].float().requires_grad_() if n in o else None for n in ("position_bias", "time_bias")]
    params = (x["max_seq_len"], case.mode == "softmax", 0.25, case.causal, case.contextual_len, case.max_attn_len,
              "triton")
    fwd_args = (q, k, v, x["offsets"], o.get("num_targets"), o.get("timestamps"), *tables, *params)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fsc.jagged_attention_fwd.default, fwd_args, test_utils=utils)
    with torch.no_grad():
        out, lse = torch.ops.fsc.jagged_attention_fwd(*fwd_args)
    bwd_args = (x["dout"].float(), q.detach(), k.detach(), v.detach(), out, lse, x["offsets"], o.get("num_targets"),
                o.get("timestamps"), *(t.detach() if t is not None else None for t in tables), *params)
    torch.library.opcheck(torch.ops.fsc.jagged_attention_bwd.default, bwd_args, test_utils=utils)


def interpreted() -> bool:
    return ja._is_interpreted(ja._fwd_kernel)


# --- split sequences: each sequence cut in two chunks, run as two calls with separate key extents


def chunk_extents(case: Case, lengths: list[int], cuts: tuple[int, ...], chunk: int) -> list[tuple[int, int, int]]:
    """Per sequence, the chunk's (first query, end of queries, end of keys): queries [0, p) or
    [p, L) of a sequence cut at p, keys from 0 to as far as those queries see. Causal rows see
    keys up to themselves; prefix rows (and every row when causal=False) see to the end."""
    extents = []
    for n, p in zip(lengths, cuts):
        a, e = (0, p) if chunk == 0 else (p, n)
        sees_ahead = not case.causal or (case.contextual_len > a and e > a)
        extents.append((a, e, n if sees_ahead else e))
    return extents


def split_results(case: Case, x: dict, cuts: tuple[int, ...], dtype: torch.dtype, impl: str) -> list[torch.Tensor]:
    """[out, dq, dk, dv, table grads...] of the op run chunk by chunk with ``kv_offsets`` and
    ``q_start`` (impl ``"reference"``: the reference function; a case with blocks: the
    launchers), the outputs put back in the unsplit layout; autograd sums k's and v's
    gradients over the chunks that read them."""
    leaves, options = _leaves(x, dtype)
    q, k, v = leaves[:3]
    targets = options.pop("num_targets", None)
    timestamps = options.pop("timestamps", None)
    chunks = _chunks(case, x, cuts, targets, timestamps, options)
    if case.blocks is not None:
        return _split_through_launchers(case, x, leaves, options, chunks)
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=dtype)
    for chunk, (q_rows, kv_rows, q_offsets, kv_offsets, chunk_options) in enumerate(chunks):
        # the second chunk leaves q_start out where it is the default: its queries end with
        # its keys (unless a prefix row or causal=False made the keys reach further)
        if chunk == 1 and int(q_offsets[-1]) and bool(
                (chunk_options["q_start"] == (kv_offsets.diff() - q_offsets.diff())).all()):
            del chunk_options["q_start"]
        args = (q[q_rows], k[kv_rows], v[kv_rows], q_offsets, x["max_seq_len"])
        if impl == "reference":
            o = ja.jagged_attention_reference(*args, kv_offsets=kv_offsets, **chunk_options)
        else:
            o = ja.jagged_attention(*args, kv_offsets=kv_offsets, impl=impl, **chunk_options)
        out = out.index_put((q_rows,), o)
    return [out.detach(), *_grads(out, leaves, x["dout"])]


def _chunks(case: Case, x: dict, cuts: tuple[int, ...], targets: Optional[torch.Tensor],
            timestamps: Optional[torch.Tensor], options: dict) -> list[tuple]:
    """(query rows, key rows, offsets, kv_offsets, options) of both chunks, as split_results."""
    starts = x["offsets"][:-1].tolist()
    lengths = (x["offsets"][1:] - x["offsets"][:-1]).tolist()
    result = []
    for chunk in (0, 1):
        extents = chunk_extents(case, lengths, cuts, chunk)
        q_rows = torch.tensor([s + i for s, (a, e, _) in zip(starts, extents) for i in range(a, e)], dtype=torch.long)
        kv_rows = torch.tensor([s + j for s, (_, _, m) in zip(starts, extents) for j in range(m)], dtype=torch.long)
        chunk_options = dict(options, q_start=torch.tensor([a for a, _, _ in extents]))
        if targets is not None:
            chunk_options["num_targets"] = torch.tensor(
                [max(0, int(t) - (n - m)) for t, n, (_, _, m) in zip(targets, lengths, extents)], dtype=targets.dtype)
        if timestamps is not None:
            chunk_options["timestamps"] = timestamps[kv_rows]
        result.append((q_rows, kv_rows, torch.tensor([0] + [e - a for a, e, _ in extents]).cumsum(0),
                       torch.tensor([0] + [m for _, _, m in extents]).cumsum(0), chunk_options))
    return result


def _split_through_launchers(case: Case, x: dict, leaves: list[torch.Tensor], options: dict,
                             chunks: list[tuple]) -> list[torch.Tensor]:
    """split_results through the launchers with the case's blocks: gradients by hand, k's and
    v's (and the tables') summed over the chunks."""
    q, k, v = (t.detach() for t in leaves[:3])
    dout = x["dout"].to(q.dtype)
    tables = [_detach(options.get(n)) for n in ("position_bias", "time_bias")]
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dtables = [torch.zeros_like(t) if t is not None else None for t in tables]
    for q_rows, kv_rows, q_offsets, kv_offsets, o in chunks:
        args = (q_offsets, o.get("num_targets"), o.get("timestamps"), *tables, x["max_seq_len"],
                case.mode == "softmax", 1.0 / case.d ** 0.5, case.causal, case.contextual_len, case.max_attn_len)
        split = dict(blocks=case.blocks, kv_offsets=kv_offsets, q_start=o["q_start"])
        o_chunk, lse = ja._launch_forward(q[q_rows], k[kv_rows], v[kv_rows], *args, **split)
        grads = ja._launch_backward(dout[q_rows], q[q_rows], k[kv_rows], v[kv_rows], o_chunk, lse, *args, **split)
        out[q_rows] = o_chunk
        dq[q_rows] = grads[0]
        dk.index_add_(0, kv_rows, grads[1])
        dv.index_add_(0, kv_rows, grads[2])
        for acc, g in zip(dtables, grads[3:]):
            if acc is not None:
                acc += g
    return [out, dq, dk, dv, *(t for t in dtables if t is not None)]


def split_errors(case: Case, cuts: tuple[int, ...], impl: str) -> dict[str, tuple[float, Optional[float], float]]:
    """Per output: (max abs error of the split run in the case's dtype against the unsplit
    float64 reference, the unsplit PyTorch reference's own error in that dtype (None for
    float32 and float64), max |float64 value|)."""
    x = make_inputs(case)
    dtype = torch.float64 if impl == "reference" else getattr(torch, case.dtype)
    truth = reference_results(x, torch.float64)
    ours = split_results(case, x, cuts, dtype, impl)
    baseline = reference_results(x, dtype) if dtype in (torch.bfloat16, torch.float16) else [None] * len(truth)
    names = [n for n in TENSORS if n[:2] != "d_" or n[2:] in x["options"]]
    assert len(ours) == len(truth) == len(names)
    result = {}
    for name, t, o, r in zip(names, truth, ours, baseline):
        assert o.shape == t.shape and o.dtype == dtype, (name, o.shape, t.shape, o.dtype)
        result[name] = (_max_abs(o, t), _max_abs(r, t) if r is not None else None,
                        float(t.abs().max()) if t.numel() else 0.0)
    return result


# --- key padding: every query row of a padded layout over its sequence's valid keys


def padded_errors(runs: tuple[tuple[int, int], ...], n: int, causal: bool, impl: str,
                  dtype: str = "float32") -> dict[str, tuple[float, Optional[float], float]]:
    """Per output (out, dq, dk, dv): (max abs error of the op run through
    ``key_padding_extents`` in ``dtype`` (float64 for the reference) against dense float64
    attention over ``[B, N]`` rows whose valid keys are the runs ``(start, length)``, None,
    max |float64 value|). Dense: query i sees key j iff j is valid and, causal, j <= i; a
    row that sees no key is 0 (what SDPA gives)."""
    heads, d, rows = 2, 16, len(runs)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(rows, heads, n, d, generator=g, dtype=torch.float64) for _ in range(4))
    valid = torch.zeros(rows, n, dtype=torch.bool)
    for b, (s, length) in enumerate(runs):
        valid[b, s:s + length] = True
    visible = valid[:, None, None, :] & (torch.ones(n, n, dtype=torch.bool).tril() if causal else True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    s = (leaves[0] @ leaves[1].mT / d ** 0.5).masked_fill(~visible, float("-inf"))
    probs = torch.where(visible.any(-1, keepdim=True), s.softmax(-1), 0.0)
    truth = probs @ leaves[2]
    truth = [truth.detach(), *torch.autograd.grad(truth, leaves, dout)]

    work = torch.float64 if impl == "reference" else getattr(torch, dtype)
    jagged = [t.transpose(1, 2).reshape(rows * n, heads, d).to(work).requires_grad_() for t in (q, k, v)]
    offsets, kv_offsets, q_start, seen, contiguous = ja.key_padding_extents(valid, causal)
    assert bool(contiguous) and torch.equal(seen, visible.any(-1).expand(rows, heads, n)[:, 0])
    out, _ = torch.ops.fsc.jagged_attention_fwd(*jagged, offsets, None, None, None, None, n, True, d ** -0.5, causal,
                                                0, 0, impl, kv_offsets, q_start)
    jagged_dout = dout.transpose(1, 2).reshape(rows * n, heads, d).to(work)
    ours = [out.detach(), *torch.autograd.grad(out, jagged, jagged_dout)]
    result = {}
    for name, t, o in zip(TENSORS, truth, ours):
        o = o.reshape(rows, n, heads, d).transpose(1, 2)
        result[name] = (_max_abs(o, t), None, float(t.abs().max()))
    return result
