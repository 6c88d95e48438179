"""The HSTU example's SiLU attention over all tokens of a batch (``examples/hstu/model.py``).

``einsum("thd,shd->hts", q, k)`` [+ ``permute(E_pos(rel_pos) + E_time(bucket), (2, 0,
1))``], ``silu``, divided by N, times a mask ``(seq_i == seq_j) & (pos_i - pos_j >= 0)``,
then ``einsum("hts,shd->thd", ·, v)``, with ``rel_pos = clamp(pos_i - pos_j, 0, C)`` and
``bucket = clamp(floor(log2(|t_i - t_j| as float + 1)), 0, NB - 1)``. The mask, rel_pos and
bucket subgraphs are recognised structurally (any equation letters, any spelling).

Lowered to hstu mode (alpha = the scores' scale or 1, causal, ``max_seq_len`` = the divisor
N) with offsets from the positions: ``starts = sort(where(pos == 0, arange(T), T))``,
``offsets = cat(starts, [T])`` (T + 1 entries; the trailing sequences are empty), and a
run-time check of the token layout that assumes. The bias tables are built in the graph
from the model's embedding tables: ``position_bias[:, C - d] = E_pos[d]`` for d = 0..C
(zeros on the unused key-after-query side), ``time_bias = E_timeᵀ``.

SiLU attention written as ``silu(q @ kᵀ) @ v`` on padded ``[B, H, N, D]`` is found and
declined, with that reason, unless q, k, v come from fbgemm's ``jagged_to_padded_dense``
(:mod:`~fsc.passes.attention.hstu_padded` lowers that form).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.nn import functional as F

from fsc.passes.attention.graph import (
    attention_weights,
    binary,
    call,
    einsum,
    factors,
    fmt,
    is_call,
    scalar,
    scale_of,
    shape,
    silu_weights,
    uncast,
    val,
)
from fsc.passes.attention.lowering import OFF_SWITCH, Emitter, Family, Lowering, Settings, check_tensors
from fsc.passes.attention.softmax import weights

# float log2 of an integer below 2^(k+1) is exact for these dtypes while k is at most this
_EXACT_LOG2_BELOW = {torch.float32: 20, torch.float64: 46}


def anchors(node: fx.Node) -> bool:
    """An einsum or matmul whose weights come from a SiLU (through elementwise work)."""
    left = weights(node)
    return left is not None and attention_weights(left, F.silu)


def match(node: fx.Node, settings: Settings) -> Lowering | str:
    parsed = einsum(node)
    if parsed is None:
        return ("SiLU attention through matmul (padded [B, H, N, D]): lowered are the HSTU example's einsum over a "
                "rank's tokens and padded attention whose q, k, v come from fbgemm.jagged_to_padded_dense")
    attn, v = parsed[3]
    weighted = silu_weights(attn)
    if isinstance(weighted, str):
        return weighted
    inv_n, silu, others = weighted
    if not others:
        return "no mask: attention over every token of the batch is not jagged"
    if len(others) != 1:
        return f"{len(others)} tensor factors besides silu(scores); one mask is lowered"
    mask = _mask(others[0])
    if isinstance(mask, str):
        return mask
    positions, seq_ids = mask
    n_float = 1.0 / inv_n if inv_n else 0.0
    n = round(n_float)
    if n < 1 or abs(n - n_float) > 1e-9 * n:
        return f"silu(scores) is scaled by {inv_n:.6g}, not 1/N for an integer N"
    # silu input: alpha * einsum(q, k) [+ rab]
    s, rab = call(silu)["input"], None
    if (ops := binary(s, torch.add)) is not None:
        s, rab = (ops[0], ops[1]) if _einsum_of(ops[0]) else (ops[1], ops[0])
    scaled = scale_of(factors(s))
    if scaled is None or len(scaled[1]) != 1 or not _einsum_of(scaled[1][0]):
        return "silu input is not alpha * einsum(q, k) [+ bias]"
    alpha, (scores,) = scaled
    layout = _layout(scores, node)
    if isinstance(layout, str):
        return layout
    q, k = layout
    if problem := check_tensors(q, k, v, settings):
        return problem
    bias = bias_tables(rab, positions) if rab is not None else ((), None, None)
    if isinstance(bias, str):
        return bias
    tables, timestamps, time_dtype = bias
    notes = time_bucket_notes(tables, time_dtype, settings)
    if isinstance(notes, str):
        return notes
    found = (f"HSTU SiLU attention q [T, H, D]={fmt(shape(q))}, alpha={alpha:.4g}, /N={n}, causal same-sequence "
             f"mask, bias: {', '.join(f'{kind}[{rows}]' for kind, _, rows in tables) or 'none'} "
             "(jagged, offsets from positions)")
    check = settings.check_preconditions

    def emit(e: Emitter) -> fx.Node:
        key = (positions, seq_ids, n)
        if key not in e.shared:
            e.shared[key] = _offsets(e, positions, seq_ids, n, check)
        offsets = e.shared[key]
        return emit_kernel(e, q, k, v, offsets, tables, timestamps, n, alpha)

    return Lowering(node, found, emit, notes, device=val(q).device)


FAMILY = Family("hstu", anchors, match)


def time_bucket_notes(tables: tuple, time_dtype: Any, settings: Settings) -> tuple[str, ...] | str:
    """The record's notes on the time bucketing (why the graph's float log2 may differ from
    the kernel's exact buckets), or the reason to decline where it may and the settings say so."""
    if time_dtype is None:
        return ()
    nb = next(rows for kind, _, rows in tables if kind == "time")
    exact_below = _EXACT_LOG2_BELOW.get(time_dtype, 20)
    if nb <= exact_below:
        return ()
    note = (f"time buckets: the graph buckets through {time_dtype} log2, the kernel exactly; with "
            f"{nb} buckets they can differ by one bucket for |dt| just below a power of two >= "
            f"2^{exact_below + 1}")
    if not settings.inexact_time_buckets:
        return note + " (set inexact_time_buckets=true to lower anyway)"
    return (note,)


def emit_kernel(e: Emitter, q: fx.Node, k: fx.Node, v: fx.Node, offsets: fx.Node, tables: tuple, timestamps: Any,
                n: int, alpha: float, softmax: bool = False) -> fx.Node:
    """The kernel's output ``[T, H, dv]``: causal hstu mode (``alpha`` scales q.k; softmax
    mode: ``alpha`` is the scale) over ``offsets`` with the bias tables built from the
    model's embedding tables (:func:`bias_tables`'s ``tables``)."""
    pos_table = time_table = None
    for kind, weight, rows in tables:
        if kind == "position":
            # the kernel reads column clip(id(key) - id(query)) + C: column C - d holds E_pos[d]
            used = e(torch.flip, e(operator.getitem, weight, slice(None, rows)), (0,))
            zeros = e(torch.zeros, (shape(weight)[1], rows - 1), dtype=val(weight).dtype,
                      device=val(weight).device)
            pos_table = e(torch.cat, (e(torch.transpose, used, 0, 1), zeros), dim=1)
        else:
            # the kernels index a table row with unit column stride
            time_table = e(torch.clone, e(torch.transpose, e(operator.getitem, weight, slice(None, rows)), 0, 1),
                           memory_format=torch.contiguous_format)
    out = e(torch.ops.fsc.jagged_attention_fwd.default, q, k, v, offsets, None,
            timestamps if time_table is not None else None, pos_table, time_table, n, softmax, alpha, True, 0,
            0, "auto")
    return e(operator.getitem, out, 0)


def _einsum_of(node: Any) -> bool:
    parsed = einsum(node)
    return parsed is not None and len(parsed[3]) == 2


def _layout(scores: fx.Node, final: fx.Node) -> tuple[fx.Node, fx.Node] | str:
    """(q, k) when scores = einsum("thd,shd->hts", q, k) and the final einsum is
    ("hts,shd->thd", attn, v), for any letters."""
    _, (qs, ks), out, (q, k) = einsum(scores)
    _, (a_s, vs), final_out, _ = einsum(final)
    if len(qs) != 3 or len(ks) != 3 or len(set(qs)) != 3 or len(set(ks)) != 3:
        return f"scores einsum {qs},{ks}->{out} is not over [T, H, D] q and k"
    t, h, d = qs
    s = ks[0]
    if ks[1:] != h + d or s in qs or out != h + t + s:
        return f"scores einsum {qs},{ks}->{out} is not 'thd,shd->hts' (any letters)"
    if len(a_s) != 3 or len(vs) != 3 or len(set(vs)) != 3:
        return f"output einsum {a_s},{vs}->{final_out} is not over [H, T, T] weights and [T, H, D] v"
    hh, tt, ss = a_s
    e = vs[2]
    if vs[:2] != ss + hh or final_out != tt + hh + e or e in a_s:
        return f"output einsum {a_s},{vs}->{final_out} is not 'hts,shd->thd' (any letters)"
    return q, k


@dataclasses.dataclass(frozen=True, slots=True)
class Pair:
    """``x_i (op) x_j`` over a pair of unsqueezed copies of one tensor; query_first: x_i is
    the one unsqueezed at its last dim (indexes the rows)."""

    source: fx.Node
    query_first: bool


def unsqueezed(node: Any) -> tuple[fx.Node, int] | None:
    """(source, dim) for ``source.unsqueeze(dim)``, dim normalised to ``[0, source.ndim]``."""
    c = call(node)
    if c is None or c.fn is not torch.unsqueeze or c.args is None or not isinstance(c["input"], fx.Node):
        return None
    dims, dim = shape(c["input"]), c["dim"]
    if dims is None or not isinstance(dim, int) or not -len(dims) - 1 <= dim <= len(dims):
        return None
    return c["input"], dim % (len(dims) + 1)


def pair_of(node: Any, fn: Any, rank: int = 1) -> Pair | None:
    """``x_i (op) x_j`` over an ``x`` of ``rank`` dims, unsqueezed at its last dim (x_i)
    and at the one before (x_j)."""
    if (ops := binary(node, fn)) is None:
        return None
    a, b = unsqueezed(ops[0]), unsqueezed(ops[1])
    if a is None or b is None or a[0] is not b[0] or {a[1], b[1]} != {rank - 1, rank}:
        return None
    dims = shape(a[0])
    if dims is None or len(dims) != rank:
        return None
    return Pair(a[0], query_first=a[1] == rank)


def clamp_of(node: Any) -> tuple[fx.Node, Any, Any] | None:
    c = call(node)
    if c is None or c.fn not in (torch.clamp, torch.clip) or c.args is None or not isinstance(c["input"], fx.Node):
        return None
    return c["input"], c.get("min"), c.get("max")


def _mask(node: Any) -> tuple[fx.Node, fx.Node] | str:
    """(positions, seq_ids) when node = ((seq_i == seq_j) & (pos_i - pos_j >= 0)), cast."""
    node = uncast(node)[0]
    reason = ("mask not recognised: the pass proves only (seq_i == seq_j) & (pos_i - pos_j >= 0) "
              "built from 1-D seq ids and positions")
    if (ops := binary(node, torch.bitwise_and, torch.logical_and)) is None:
        return reason
    same_seq = causal = None
    for op in ops:
        pair = pair_of(op, torch.eq)
        if pair is not None:
            same_seq = pair
            continue
        for fn in (torch.ge, torch.le):
            if (cmp := binary(op, fn)) is not None and cmp[1] == 0:
                pair = pair_of(cmp[0], torch.sub)
                # query minus key >= 0, or key minus query <= 0
                if pair is not None and pair.query_first == (fn is torch.ge):
                    causal = pair
    if same_seq is None or causal is None:
        return reason
    return causal.source, same_seq.source


def bias_tables(rab: Any, positions: fx.Node, order: tuple[int, ...] = (2, 0, 1),
          rank: int = 1) -> tuple[tuple, Any, Any] | str:
    """((kind, weight, rows used) per table, timestamps, dtype of the time log2) for
    rab = permute(E_pos(rel_pos) [+ E_time(bucket)], order) (heads, the tables' last dim,
    moved to where ``order`` says); the time bucket over timestamps of ``rank`` dims."""
    c = call(rab)
    if c is None or c.fn is not torch.permute or c.args is None:
        return f"bias is not permute(embedding lookups, {order})"
    dims = tuple(d % len(order) if isinstance(d, int) else d for d in c["dims"])
    if dims != order:
        return f"bias permuted by {tuple(c['dims'])}, not {order}"
    terms = []
    stack = [c["input"]]
    while stack:
        x = stack.pop()
        if (ops := binary(x, torch.add)) is not None:
            stack.extend(ops)
        else:
            terms.append(x)
    tables, timestamps, time_dtype = [], None, None
    kinds = set()
    for term in terms:
        lookup = call(term)
        if (lookup is None or lookup.fn is not F.embedding or lookup.args is None
                or lookup["max_norm"] is not None or not isinstance(lookup["weight"], fx.Node)):
            return "a bias term is not an embedding lookup"
        index, weight = lookup["input"], lookup["weight"]
        rows_total = shape(weight)[0]
        rel = _rel_pos(index, positions)
        if isinstance(rel, int):
            kind, rows = "position", rel + 1
        else:
            bucket = _time_bucket(index, rank)
            if isinstance(bucket, str):
                return f"bias lookup not recognised: {rel}; {bucket}"
            kind, (timestamps, rows, time_dtype) = "time", bucket
        if kind in kinds:
            return f"two {kind} bias tables"
        if not isinstance(rows_total, int) or rows > rows_total:
            return f"{kind} bias clamps to {rows} rows, the table has {rows_total}"
        kinds.add(kind)
        tables.append((kind, weight, rows))
    return tuple(tables), timestamps, time_dtype


def _rel_pos(node: Any, positions: fx.Node) -> int | str:
    """C when node = clamp(pos_i - pos_j, <=0, C) with the mask's positions."""
    clamp = clamp_of(node)
    if clamp is None:
        return "not clamp(pos_i - pos_j, 0, C)"
    x, lo, hi = clamp
    pair = pair_of(x, torch.sub)
    if pair is None or pair.source is not positions or not pair.query_first:
        return "position bias index is not clamp(pos_i - pos_j, 0, C) over the mask's positions"
    if not (lo is None or (isinstance(lo, int) and lo <= 0)) or not isinstance(hi, int) or hi < 0:
        return f"position bias clamp({lo}, {hi}) is not (0, C)"
    return hi


def _time_bucket(node: Any, rank: int = 1) -> tuple[fx.Node, int, torch.dtype] | str:
    """(timestamps, buckets, float dtype) for clamp(floor(log2(|t_i - t_j| as float + 1)), 0, NB-1)."""
    reason = "time bias index is not clamp(floor(log2(float(|t_i - t_j|) + 1)), 0, NB - 1)"
    clamp = clamp_of(node)
    if clamp is None:
        return reason
    x, lo, hi = clamp
    if not (lo is None or (isinstance(lo, int) and lo <= 0)) or not isinstance(hi, int) or hi < 0:
        return reason
    x, dtype = uncast(x)
    if dtype not in (torch.int64, torch.int32) or not is_call(x, torch.floor):
        return reason
    x = call(x)["input"]
    if not is_call(x, torch.log2):
        return reason
    if (ops := binary(call(x)["input"], torch.add)) is None:
        return reason
    dt = ops[0] if scalar(ops[1]) == 1.0 else ops[1] if scalar(ops[0]) == 1.0 else None
    dt, float_dtype = uncast(dt)
    if float_dtype not in (torch.float32, torch.float64) or not is_call(dt, torch.abs):
        return reason
    pair = pair_of(call(dt)["input"], torch.sub, rank)
    if pair is None:
        return reason
    value = val(pair.source)
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.int64, torch.int32):
        return "time bias on non-integer timestamps"
    return pair.source, hi + 1, float_dtype


def _offsets(e: Emitter, positions: fx.Node, seq_ids: fx.Node, n: int, check: bool) -> fx.Node:
    """offsets [T + 1] from positions, and (optionally) the runtime check that the tokens
    are laid out as the lowering assumes."""
    t = e.dim(positions, 0)
    device = val(positions).device
    idx = e(torch.arange, t, dtype=torch.int64, device=device)
    starts = e(torch.where, e(torch.eq, positions, 0), idx, t)
    starts = e(operator.getitem, e(torch.sort, starts), 0)
    offsets = e(torch.cat, (starts, e(torch.full, (1,), t, dtype=torch.int64, device=device)))
    if check:
        # Each token against the one before it, rolled rather than sliced: a [T - 1] slice
        # would make Dynamo guard on T >= 3 (a contiguity test on fewer than 2 elements)
        # and recompile for a batch of two tokens. Token 0 must start a sequence.
        pos_prev, seq_prev = e(torch.roll, positions, 1), e(torch.roll, seq_ids, 1)
        starts_seq = e(torch.eq, positions, 0)
        cont = e(torch.logical_and, e(torch.eq, positions, e(operator.add, pos_prev, 1)),
                 e(torch.eq, seq_ids, seq_prev))
        new = e(torch.logical_and, starts_seq, e(torch.gt, seq_ids, seq_prev))
        each = e(torch.where, e(torch.eq, idx, 0), starts_seq, e(torch.logical_or, cont, new))
        bounded = e(torch.all, e(torch.lt, positions, n))
        ok = e(torch.logical_and, e(torch.all, each), bounded)
        e(torch._assert_async, ok,
          "lower-attention: the HSTU attention was lowered to the jagged kernel assuming each sequence's "
          f"tokens are contiguous with positions 0, 1, 2, ... below N={n} and sequence ids rising from one "
          f"sequence to the next; this batch breaks that. {OFF_SWITCH}")
    return offsets
