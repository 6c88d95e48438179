"""Jagged generalized dot-product attention: HSTU's SiLU attention and softmax attention,
forward and backward, as one Triton kernel family parameterized by the score activation.

Inputs are jagged: ``q, k [T, H, D]``, ``v [T, H, Dv]``, and ``offsets [B+1]``; sequence b
holds tokens ``offsets[b] .. offsets[b+1] - 1``. ``N = max_seq_len`` bounds every length.
(Queries may also come with keys/values of their own extents: see "Split sequences".)

**Scores.** For a query i and a key j of one sequence and a head h,
``s_ij = c * <q_i, k_j> + rab_h(i, j)``: the dot product is scaled first (c is ``alpha`` in
HSTU mode, ``scale`` in softmax mode, both 1/sqrt(D) by default) and the relative bias is
added after scaling.

**Activation.**

- ``hstu``:    ``out_i = sum_j m_ij * silu(s_ij) / N * v_j``. Nothing is normalized over j:
  the fixed 1/N (N = max_seq_len, not the sequence's own length) is the only scaling.
- ``softmax``: ``out_i = sum_j softmax_j(s_ij restricted to m_ij = 1) * v_j`` (SASRec-style).

**Mask m_ij.** Every token gets a mask id from its position p in its sequence (length L):
with a contextual prefix of c > 0 tokens, the prefix shares id 0 and the rest count on from
1 (``id(p) = max(p - c + 1, 0)``), otherwise ``id(p) = p``. With n targets (the last n
tokens of the sequence), ids are capped at ``E = L - n (+ 1 - c with a prefix)``, so every
target carries the id of the first target. With ``d = id(i) - id(j)`` (``|d|`` when
``causal=False``), key j is visible to query i when

- i == j (a token always sees itself); or
- d > 0, and d <= max_attn_len when a window is set (max_attn_len > 0); or
- there is a prefix (c > 0), id(i) == 0 and id(j) < E.

In words: causal over ids; a target sees the prefix, the history and itself but no other
target; prefix rows see every non-target token, in both directions and regardless of the
window; the window keeps keys at most max_attn_len ids behind (history rows see the prefix
only while id(i) <= max_attn_len). These are the rules of the public HSTU reference
(generative-recommenders' ``pytorch_hstu_mha``: alpha multiplies q.k before the SiLU and
1/N is applied after it), restated here; our reference below is written from this text.

**Relative attention bias** (optional, computed inside the kernels from learned tables, with
gradients for the tables), after the HSTU paper's rab^{p,t}:

- position: ``position_bias [H, 2P-1]``; ``rab += position_bias[h, clip(id(j) - id(i),
  -(P-1), P-1) + P - 1]`` -- the signed distance between mask ids (so all targets sit at the
  first target's position), clipped to +-(P-1).
- time: ``time_bias [H, NB]`` with integer ``timestamps [T]``; ``rab += time_bias[h,
  min(floor(log2(1 + |t_i - t_j|)), NB - 1)]``. Divide the timestamps beforehand to change
  the unit. This is the bucketing of ``examples/hstu``; generative-recommenders' research
  bias differs (one table for all heads, the next item's timestamp for the query, a
  configurable log or sqrt bucketing).

**Split sequences** (separate key/value extents). A sequence too long for one rank is cut
into contiguous chunks; a chunk holds the queries at positions ``[p, p + n)`` of its sequence
and attends to the keys/values at ``[0, m)`` of it, ``m >= p + n``. Pass ``kv_offsets [B+1]``
(the key extents, jagged like ``offsets``: ``k [Tk, H, D]``, ``v [Tk, H, Dv]``) and
``q_start [B]`` (each chunk's p; left out, ``p = m - n``: the queries end where the keys do).
``offsets`` then delimits the queries only. Everything above is stated over positions in the
sequence, and those are absolute: a query's position is ``q_start[b]`` + its index in the
chunk, a key's is its index in the key extent (keys always start at position 0). So:

- the sequence's length L, wherever it enters the masks (the target cap E), is the key
  extent's, m; ``num_targets[b]`` counts the targets among the chunk's keys, i.e. the last
  ``num_targets[b]`` of them. For a sequence of length L with n_t targets cut so that its keys
  end at m, that is ``max(0, n_t - (L - m))``: then ``E = m - that = L - n_t`` whenever the
  keys reach a target, and when they do not, no id reaches the cap. No total length is
  needed;
- the position bias uses the ids of those absolute positions;
- ``timestamps [Tk]`` holds one timestamp per key token; a query's timestamp is that of
  the key token at its position (the key extent holds every query position).

A chunk's output rows equal the unsplit op's rows, and its gradients sum (over the chunks
that read a key) to the unsplit op's, exactly when its keys hold every key its queries see
in the whole sequence. Rule by rule: causal rows see keys at or before themselves (``m =
p + n`` suffices), targets see the prefix, the history and themselves, all at or before
them, a window only narrows what rows see, but prefix rows see every non-target and rows of
a non-causal attention see in both directions: a chunk with prefix rows, or any chunk when
``causal=False``, needs the whole sequence's keys (``m = L``). Given that, no merging across
chunks is needed in softmax mode either: each row's normalization runs over all the keys
the row sees, in one chunk. Key/value gradients of a chunk are those of its own queries;
summing them over the chunks that hold a key gives the key's gradient, and the bias tables'
gradients likewise sum over chunks. ``kv_offsets=None`` is the unsplit op (``q_start`` must
then be left out).

**Queries outside the key extent.** Query positions may also lie before 0 (``q_start < 0``)
or at or past m: the rules above apply to them unchanged (ids from the same formula, capped
at E), over the keys of the extent only. Causal, a query at position m or later sees every
key (without targets), one before 0 sees none. This is how
``lower-attention`` lowers key-padding masks: a padded row of N tokens whose valid keys are
the contiguous run ``[s, s + L)`` is a sequence of N queries from position ``-s`` over those
L keys, and the padding keys before and after the run are sequences with no queries. A query
that sees no key gets output 0 (its lse is unspecified, its gradients 0). Without a prefix,
a window or timestamps only: with any of them every query must lie inside its key extent
(the CPU check names the option).

**Dispatch** is explicit: ``impl="auto"`` runs the Triton kernels on CUDA tensors and,
elsewhere, the length-grouped PyTorch implementation of :mod:`fsc.kernels.attention_grouped`
(the reference's maths with sequences grouped by length and one bias gather; the reference
itself when traced), in fp32, cast back, for 16-bit inputs; ``impl="triton"`` always runs
the kernels -- on CPU tensors that needs the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is first imported), which is how the tests run them; ``impl="reference"``
always runs the reference.

**Preconditions** not checked on the GPU (checking would synchronize): every length is at
most max_seq_len and 0 <= num_targets[b] <= length; with key extents, query and key
lengths <= max_seq_len, num_targets[b] <= key length, and with a prefix, a window or
timestamps 0 <= q_start[b] and q_start[b] + (query length) <= (key length); otherwise
results are unspecified. They are checked when offsets live on the CPU
and we are not being traced.

fp32 inputs use exact fp32 dot products (no TF32), like ``torch.matmul``'s default.
"""

import logging
import math
from typing import Any, Optional

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from fsc.kernels.attention_grouped import grouped_backward, grouped_forward
from fsc.kernels.limits import DTYPES, MAX_HEAD_DIM, MIN_HEAD_DIM, MODES

log = logging.getLogger(__name__)

Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]

__all__ = ["jagged_attention", "jagged_attention_reference", "key_padding_extents"]

IMPLS = ("auto", "triton", "reference")


# ---------------------------------------------------------------------------------------
# Triton kernels. Tiles are [queries, keys] in the forward and dq kernels and [keys,
# queries] in the dk/dv kernel; the helpers take operands already broadcast to the tile
# (``x[:, None]`` / ``x[None, :]``), so one helper serves both orientations.
# ---------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    # "interpret-bf16" is for bfloat16 under the Triton interpreter only, whose tl.dot
    # multiplies bfloat16 bit patterns as integers (triton-lang/triton#11584). Widening to
    # fp32 is exact, so the products, accumulated in fp32, are those of the GPU's bf16 dot.
    if PRECISION == "interpret-bf16":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _narrow(x, dtype, PRECISION: tl.constexpr):
    # fp32 -> dtype. The GPU rounds to nearest even; the interpreter truncates to bfloat16, so
    # there (and only there) round the fp32 bits by hand first: the cast is then exact.
    if PRECISION == "interpret-bf16":
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _extents(OFFSETS, KV_OFFSETS, Q_START, b, SPLIT: tl.constexpr):
    # (first query row, query count, first key row, key count, first query position). Without
    # separate key extents the keys are the queries and positions start at 0.
    q_seq_start = tl.load(OFFSETS + b).to(tl.int64)
    q_len = (tl.load(OFFSETS + b + 1).to(tl.int64) - q_seq_start).to(tl.int32)
    if SPLIT:
        seq_start = tl.load(KV_OFFSETS + b).to(tl.int64)
        seq_len = (tl.load(KV_OFFSETS + b + 1).to(tl.int64) - seq_start).to(tl.int32)
        q0 = tl.load(Q_START + b).to(tl.int32)
    else:
        seq_start = q_seq_start
        seq_len = q_len
        q0 = q_len * 0
    return q_seq_start, q_len, seq_start, seq_len, q0


@triton.jit
def _id_cap(NUM_TARGETS, b, seq_len, contextual_len, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr):
    # E: the id of the first target (L - n), shifted like every id when there is a prefix
    e_max = seq_len
    if HAS_TARGETS:
        e_max = e_max - tl.load(NUM_TARGETS + b).to(tl.int32)
    if HAS_CONTEXT:
        e_max = e_max - contextual_len + 1
    return e_max


@triton.jit
def _mask_ids(pos, contextual_len, e_max, HAS_CONTEXT: tl.constexpr):
    # prefix positions share id 0, history counts on from 1, targets are capped at E
    if HAS_CONTEXT:
        ids = tl.maximum(pos - contextual_len + 1, 0)
    else:
        ids = pos
    return tl.minimum(ids, e_max)


@triton.jit
def _is_visible(pos_q, pos_k, ids_q, ids_k, e_max, in_bounds, max_attn_len,
                CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr):
    d = ids_q - ids_k
    if not CAUSAL:
        d = tl.abs(d)
    visible = (pos_q == pos_k) | (d > 0)
    if HAS_WINDOW:
        visible = visible & (d <= max_attn_len)
    if HAS_CONTEXT:
        visible = visible | ((ids_q == 0) & (ids_k < e_max))
    return visible & in_bounds


@triton.jit
def _position_index(ids_q, ids_k, pos_p):
    # column of the position table: signed key-minus-query id distance clipped to +-(P-1)
    return tl.minimum(tl.maximum(ids_k - ids_q, 1 - pos_p), pos_p - 1) + pos_p - 1


@triton.jit
def _time_bucket(t_q, t_k, n_buckets):
    # floor(log2(1 + |t_q - t_k|)) capped at NB - 1, exact on integers: the float log2 is a
    # guess that can be one off next to a power of two; the two shifts correct it.
    x = tl.abs(t_q - t_k) + 1
    b = tl.log2(x.to(tl.float32)).to(tl.int64)
    b = tl.minimum(tl.maximum(b, 0), 62)
    b = tl.where((x >> b) == 0, b - 1, b)
    b = tl.where((x >> (b + 1)) != 0, b + 1, b)
    return tl.minimum(b, n_buckets - 1)


@triton.jit
def _add_bias(s, ids_q, ids_k, t_q, t_k, visible, POS_W, TIME_W, h, stride_pw, stride_tw, pos_p, n_buckets,
              HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr):
    if HAS_POS:
        col = _position_index(ids_q, ids_k, pos_p)
        s += tl.load(POS_W + h * stride_pw + col, mask=visible, other=0.0).to(tl.float32)
    if HAS_TIME:
        col = _time_bucket(t_q, t_k, n_buckets)
        s += tl.load(TIME_W + h * stride_tw + col, mask=visible, other=0.0).to(tl.float32)
    return s


@triton.jit
def _key_range(start_m, seq_len, e_max, contextual_len, max_attn_len, CAUSAL: tl.constexpr,
               HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Keys that queries [start_m, start_m + BLOCK_M) may see, as [lo, hi) with lo a multiple of
    # BLOCK_N. A superset: the mask decides. Prefix keys below lo are visited by a second loop.
    lo = start_m * 0
    if HAS_WINDOW:
        # keys in view have id >= id(start_m) - W, and a non-prefix key at p has id <= p - (c - 1)
        lo = _mask_ids(start_m, contextual_len, e_max, HAS_CONTEXT) - max_attn_len
        if HAS_CONTEXT:
            lo = lo + contextual_len - 1
        lo = (tl.maximum(lo, 0) // BLOCK_N) * BLOCK_N
    hi = seq_len
    if CAUSAL:
        # visible keys sit at or before the query, except for prefix rows (all non-targets)
        hi = tl.minimum(seq_len, start_m + BLOCK_M)
        if HAS_CONTEXT:
            hi = tl.where(start_m < contextual_len, seq_len, hi)
    return lo, hi


@triton.jit
def _query_range(start_n, seq_len, e_max, contextual_len, max_attn_len, q0, q_end, CAUSAL: tl.constexpr,
                 HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Query positions that may see keys [start_n, start_n + BLOCK_N), as [lo, hi), a superset
    # within the chunk's queries [q0, q_end) (which may reach outside the key extent: before
    # 0 or past seq_len). Prefix rows below lo are visited by a second loop.
    lo = q0
    if CAUSAL:
        lo = tl.maximum((start_n // BLOCK_M) * BLOCK_M, q0)
    hi = q_end
    if HAS_WINDOW:
        last_id = _mask_ids(tl.minimum(start_n + BLOCK_N, seq_len) - 1, contextual_len, e_max, HAS_CONTEXT)
        # history rows in view have id <= last_id + W, i.e. position < reach
        reach = last_id + max_attn_len + 1
        if HAS_CONTEXT:
            reach = reach + contextual_len - 1
        # targets all share id E: either all of them may see the block or none does
        hi = tl.minimum(tl.where(e_max <= last_id + max_attn_len, seq_len, tl.minimum(reach, seq_len)), q_end)
    return lo, hi


@triton.jit
def _fwd_loop(acc, m_i, l_i, n_lo, n_hi, q, offs_m, ids_m, t_m, mask_m, seq_start, e_max, h,
              K, V, TIMESTAMPS, POS_W, TIME_W, stride_kt, stride_kh, stride_vt, stride_vh, stride_pw, stride_tw,
              D, DV, scale, inv_n, max_attn_len, contextual_len, pos_p, n_buckets,
              SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        rows_n = seq_start + offs_n
        kt = tl.load(K + rows_n[None, :] * stride_kt + h * stride_kh + offs_d[:, None],
                     mask=mask_n[None, :] & (offs_d[:, None] < D), other=0.0)
        v = tl.load(V + rows_n[:, None] * stride_vt + h * stride_vh + offs_dv[None, :],
                    mask=mask_n[:, None] & (offs_dv[None, :] < DV), other=0.0)
        ids_n = _mask_ids(offs_n, contextual_len, e_max, HAS_CONTEXT)
        visible = _is_visible(offs_m[:, None], offs_n[None, :], ids_m[:, None], ids_n[None, :], e_max,
                              mask_m[:, None] & mask_n[None, :], max_attn_len, CAUSAL, HAS_CONTEXT, HAS_WINDOW)
        if HAS_TIME:
            t_n = tl.load(TIMESTAMPS + rows_n, mask=mask_n, other=0).to(tl.int64)
        else:
            t_n = offs_n
        s = _dot(q, kt, PRECISION) * scale
        s = _add_bias(s, ids_m[:, None], ids_n[None, :], t_m[:, None], t_n[None, :], visible, POS_W, TIME_W, h,
                      stride_pw, stride_tw, pos_p, n_buckets, HAS_POS, HAS_TIME)
        if SOFTMAX:
            # online softmax; rows with nothing visible yet keep m = -inf and l = 0
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            correction = tl.exp(m_i - m_safe)
            l_i = l_i * correction + tl.sum(p, axis=1)
            acc = acc * correction[:, None]
            m_i = m_new
        else:
            # silu(s) / N = s * sigmoid(s) / N
            p = tl.where(visible, s * tl.sigmoid(s) * inv_n, 0.0)
        acc += _dot(_narrow(p, v.dtype, PRECISION), v, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, OFFSETS, KV_OFFSETS, Q_START, NUM_TARGETS, TIMESTAMPS, POS_W, TIME_W, OUT, LSE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_pw, stride_tw,
    H, D, DV, scale, inv_n, contextual_len, max_attn_len, pos_p, n_buckets, AUTOTUNE_N,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # grid: (query blocks of the longest sequence, B * H); one program = one query block of one
    # head. Positions (offs_m, offs_n) are absolute: a query block starts at q0 + a multiple of
    # BLOCK_M, so with q0 > 0 its rows are not aligned to the key blocks; _key_range does not
    # need them to be.
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_seq_start, q_len, seq_start, seq_len, q0 = _extents(OFFSETS, KV_OFFSETS, Q_START, b, SPLIT)
    if tl.program_id(0) * BLOCK_M >= q_len:
        return
    start_m = q0 + tl.program_id(0) * BLOCK_M
    e_max = _id_cap(NUM_TARGETS, b, seq_len, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    mask_m = offs_m < q0 + q_len
    rows_m = (q_seq_start - q0) + offs_m
    ids_m = _mask_ids(offs_m, contextual_len, e_max, HAS_CONTEXT)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + rows_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0)
    if HAS_TIME:
        # timestamps are per key token: a query's is the key's at its position
        t_m = tl.load(TIMESTAMPS + seq_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        t_m = offs_m
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, hi = _key_range(start_m, seq_len, e_max, contextual_len, max_attn_len, CAUSAL, HAS_CONTEXT, HAS_WINDOW,
                        BLOCK_M, BLOCK_N)
    if HAS_CONTEXT:
        if HAS_WINDOW:
            acc, m_i, l_i = _fwd_loop(
                acc, m_i, l_i, 0, tl.minimum(contextual_len, lo), q, offs_m, ids_m, t_m, mask_m, seq_start, e_max, h,
                K, V, TIMESTAMPS, POS_W, TIME_W, stride_kt, stride_kh, stride_vt, stride_vh, stride_pw, stride_tw,
                D, DV, scale, inv_n, max_attn_len, contextual_len, pos_p, n_buckets,
                SOFTMAX, CAUSAL, HAS_CONTEXT, HAS_WINDOW, HAS_POS, HAS_TIME, PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV)
    acc, m_i, l_i = _fwd_loop(
        acc, m_i, l_i, lo, hi, q, offs_m, ids_m, t_m, mask_m, seq_start, e_max, h,
        K, V, TIMESTAMPS, POS_W, TIME_W, stride_kt, stride_kh, stride_vt, stride_vh, stride_pw, stride_tw,
        D, DV, scale, inv_n, max_attn_len, contextual_len, pos_p, n_buckets,
        SOFTMAX, CAUSAL, HAS_CONTEXT, HAS_WINDOW, HAS_POS, HAS_TIME, PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV)
    if SOFTMAX:
        # rows that see no key (padding rows, queries outside their key extent with nothing
        # visible) keep l = 0: their output is 0, their lse -inf
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        acc = acc / l_safe[:, None]
        tl.store(LSE + rows_m * H + h, m_i + tl.log(l_safe), mask=mask_m)
    tl.store(OUT + rows_m[:, None] * stride_ot + h * stride_oh + offs_dv[None, :], _narrow(acc, OUT.dtype.element_ty, PRECISION),
             mask=mask_m[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_loop(dq, n_lo, n_hi, q, do, lse, delta, offs_m, ids_m, t_m, mask_m, seq_start, e_max, h,
             K, V, TIMESTAMPS, POS_W, TIME_W, stride_kt, stride_kh, stride_vt, stride_vh, stride_pw, stride_tw,
             D, DV, scale, inv_n, max_attn_len, contextual_len, pos_p, n_buckets,
             SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, PRECISION: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        rows_n = seq_start + offs_n
        k = tl.load(K + rows_n[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                    mask=mask_n[:, None] & (offs_d[None, :] < D), other=0.0)
        vt = tl.load(V + rows_n[None, :] * stride_vt + h * stride_vh + offs_dv[:, None],
                     mask=mask_n[None, :] & (offs_dv[:, None] < DV), other=0.0)
        ids_n = _mask_ids(offs_n, contextual_len, e_max, HAS_CONTEXT)
        visible = _is_visible(offs_m[:, None], offs_n[None, :], ids_m[:, None], ids_n[None, :], e_max,
                              mask_m[:, None] & mask_n[None, :], max_attn_len, CAUSAL, HAS_CONTEXT, HAS_WINDOW)
        if HAS_TIME:
            t_n = tl.load(TIMESTAMPS + rows_n, mask=mask_n, other=0).to(tl.int64)
        else:
            t_n = offs_n
        s = _dot(q, tl.trans(k), PRECISION) * scale
        s = _add_bias(s, ids_m[:, None], ids_n[None, :], t_m[:, None], t_n[None, :], visible, POS_W, TIME_W, h,
                      stride_pw, stride_tw, pos_p, n_buckets, HAS_POS, HAS_TIME)
        dp = _dot(do, vt, PRECISION)
        if SOFTMAX:
            # dS = P * (dP - rowsum(P * dP)), rowsum(P * dP) = rowsum(dO * O) = delta
            p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
        else:
            # d silu(x)/dx = s(x) * (1 + x * (1 - s(x)))
            sig = tl.sigmoid(s)
            ds = tl.where(visible, dp * sig * (1.0 + s * (1.0 - sig)) * inv_n, 0.0)
        dq += _dot(_narrow(ds, k.dtype, PRECISION), k, PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, OUT, DOUT, LSE, DELTA, DQ, OFFSETS, KV_OFFSETS, Q_START, NUM_TARGETS, TIMESTAMPS, POS_W, TIME_W,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_pw, stride_tw,
    H, D, DV, scale, inv_n, contextual_len, max_attn_len, pos_p, n_buckets, AUTOTUNE_N,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # dQ = c * dS K, one query block per program (same grid as the forward). In softmax mode it
    # also writes delta = rowsum(dO * O), which the dk/dv kernel (launched after) reads.
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_seq_start, q_len, seq_start, seq_len, q0 = _extents(OFFSETS, KV_OFFSETS, Q_START, b, SPLIT)
    if tl.program_id(0) * BLOCK_M >= q_len:
        return
    start_m = q0 + tl.program_id(0) * BLOCK_M
    e_max = _id_cap(NUM_TARGETS, b, seq_len, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    mask_m = offs_m < q0 + q_len
    rows_m = (q_seq_start - q0) + offs_m
    ids_m = _mask_ids(offs_m, contextual_len, e_max, HAS_CONTEXT)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + rows_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0)
    mask_mdv = mask_m[:, None] & (offs_dv[None, :] < DV)
    do = tl.load(DOUT + rows_m[:, None] * stride_dot + h * stride_doh + offs_dv[None, :], mask=mask_mdv, other=0.0)
    if SOFTMAX:
        o = tl.load(OUT + rows_m[:, None] * stride_ot + h * stride_oh + offs_dv[None, :], mask=mask_mdv, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + rows_m * H + h, delta, mask=mask_m)
        lse = tl.load(LSE + rows_m * H + h, mask=mask_m, other=0.0)
    else:
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
        lse = delta
    if HAS_TIME:
        t_m = tl.load(TIMESTAMPS + seq_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        t_m = offs_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, seq_len, e_max, contextual_len, max_attn_len, CAUSAL, HAS_CONTEXT, HAS_WINDOW,
                        BLOCK_M, BLOCK_N)
    if HAS_CONTEXT:
        if HAS_WINDOW:
            dq = _dq_loop(
                dq, 0, tl.minimum(contextual_len, lo), q, do, lse, delta, offs_m, ids_m, t_m, mask_m, seq_start,
                e_max, h, K, V, TIMESTAMPS, POS_W, TIME_W, stride_kt, stride_kh, stride_vt, stride_vh, stride_pw,
                stride_tw, D, DV, scale, inv_n, max_attn_len, contextual_len, pos_p, n_buckets,
                SOFTMAX, CAUSAL, HAS_CONTEXT, HAS_WINDOW, HAS_POS, HAS_TIME, PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV)
    dq = _dq_loop(
        dq, lo, hi, q, do, lse, delta, offs_m, ids_m, t_m, mask_m, seq_start,
        e_max, h, K, V, TIMESTAMPS, POS_W, TIME_W, stride_kt, stride_kh, stride_vt, stride_vh, stride_pw,
        stride_tw, D, DV, scale, inv_n, max_attn_len, contextual_len, pos_p, n_buckets,
        SOFTMAX, CAUSAL, HAS_CONTEXT, HAS_WINDOW, HAS_POS, HAS_TIME, PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV)
    dq = dq * scale
    tl.store(DQ + rows_m[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], _narrow(dq, DQ.dtype.element_ty, PRECISION),
             mask=mask_m[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_loop(dk, dv, m_lo, m_hi, k, v, offs_n, ids_n, t_n, mask_n, q_base, seq_start, e_max, h,
               Q, DOUT, LSE, DELTA, TIMESTAMPS, POS_W, TIME_W, DPOS, DTIME,
               stride_qt, stride_qh, stride_dot, stride_doh, stride_pw, stride_tw,
               H, D, DV, scale, inv_n, max_attn_len, contextual_len, pos_p, n_buckets,
               SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_hi
        rows_m = q_base + offs_m  # query rows; positions index the key extent
        q = tl.load(Q + rows_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(DOUT + rows_m[:, None] * stride_dot + h * stride_doh + offs_dv[None, :],
                     mask=mask_m[:, None] & (offs_dv[None, :] < DV), other=0.0)
        ids_m = _mask_ids(offs_m, contextual_len, e_max, HAS_CONTEXT)
        # tiles are transposed here: keys along axis 0, queries along axis 1
        visible = _is_visible(offs_m[None, :], offs_n[:, None], ids_m[None, :], ids_n[:, None], e_max,
                              mask_m[None, :] & mask_n[:, None], max_attn_len, CAUSAL, HAS_CONTEXT, HAS_WINDOW)
        if HAS_TIME:
            t_m = tl.load(TIMESTAMPS + seq_start + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            t_m = offs_m
        st = _dot(k, tl.trans(q), PRECISION) * scale
        st = _add_bias(st, ids_m[None, :], ids_n[:, None], t_m[None, :], t_n[:, None], visible, POS_W, TIME_W, h,
                       stride_pw, stride_tw, pos_p, n_buckets, HAS_POS, HAS_TIME)
        dpt = _dot(v, tl.trans(do), PRECISION)
        if SOFTMAX:
            lse = tl.load(LSE + rows_m * H + h, mask=mask_m, other=0.0)
            delta = tl.load(DELTA + rows_m * H + h, mask=mask_m, other=0.0)
            pt = tl.where(visible, tl.exp(st - lse[None, :]), 0.0)
            dst = pt * (dpt - delta[None, :])
        else:
            # d silu(x)/dx = s(x) * (1 + x * (1 - s(x)))
            sig = tl.sigmoid(st)
            pt = tl.where(visible, st * sig * inv_n, 0.0)
            dst = tl.where(visible, dpt * sig * (1.0 + st * (1.0 - sig)) * inv_n, 0.0)
        dv += _dot(_narrow(pt, do.dtype, PRECISION), do, PRECISION)
        dk += _dot(_narrow(dst, q.dtype, PRECISION), q, PRECISION)
        # the bias enters s with coefficient 1: its table gradient is dS summed per column
        if HAS_POS:
            tl.atomic_add(DPOS + h * stride_pw + _position_index(ids_m[None, :], ids_n[:, None], pos_p), dst,
                          mask=visible)
        if HAS_TIME:
            tl.atomic_add(DTIME + h * stride_tw + _time_bucket(t_m[None, :], t_n[:, None], n_buckets), dst,
                          mask=visible)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, DK, DV_OUT, DPOS, DTIME, OFFSETS, KV_OFFSETS, Q_START, NUM_TARGETS, TIMESTAMPS,
    POS_W, TIME_W,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_pw, stride_tw,
    H, D, DV, scale, inv_n, contextual_len, max_attn_len, pos_p, n_buckets, AUTOTUNE_N,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # dV = P^T dO and dK = c * dS^T Q, one key block per program; bias-table gradients are
    # accumulated with fp32 atomics (DPOS, DTIME must start at zero). The query ranges are
    # clipped to the chunk's queries [q0, q0 + q_len).
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_seq_start, q_len, seq_start, seq_len, q0 = _extents(OFFSETS, KV_OFFSETS, Q_START, b, SPLIT)
    q_base = q_seq_start - q0
    q_end = q0 + q_len
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= seq_len:
        return
    e_max = _id_cap(NUM_TARGETS, b, seq_len, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < seq_len
    rows_n = seq_start + offs_n
    ids_n = _mask_ids(offs_n, contextual_len, e_max, HAS_CONTEXT)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + rows_n[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                mask=mask_n[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + rows_n[:, None] * stride_vt + h * stride_vh + offs_dv[None, :],
                mask=mask_n[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if HAS_TIME:
        t_n = tl.load(TIMESTAMPS + rows_n, mask=mask_n, other=0).to(tl.int64)
    else:
        t_n = offs_n
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo, hi = _query_range(start_n, seq_len, e_max, contextual_len, max_attn_len, q0, q_end, CAUSAL, HAS_CONTEXT,
                          HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_CONTEXT:
        if CAUSAL:
            # prefix rows see every non-target key, wherever it sits
            dk, dv = _dkdv_loop(
                dk, dv, q0, tl.minimum(tl.minimum(contextual_len, lo), q_end), k, v, offs_n, ids_n, t_n, mask_n,
                q_base, seq_start, e_max, h,
                Q, DOUT, LSE, DELTA, TIMESTAMPS, POS_W, TIME_W, DPOS, DTIME,
                stride_qt, stride_qh, stride_dot, stride_doh, stride_pw, stride_tw,
                H, D, DV, scale, inv_n, max_attn_len, contextual_len, pos_p, n_buckets,
                SOFTMAX, CAUSAL, HAS_CONTEXT, HAS_WINDOW, HAS_POS, HAS_TIME, PRECISION, BLOCK_M, BLOCK_D, BLOCK_DV)
    dk, dv = _dkdv_loop(
        dk, dv, lo, hi, k, v, offs_n, ids_n, t_n, mask_n, q_base, seq_start,
        e_max, h,
        Q, DOUT, LSE, DELTA, TIMESTAMPS, POS_W, TIME_W, DPOS, DTIME,
        stride_qt, stride_qh, stride_dot, stride_doh, stride_pw, stride_tw,
        H, D, DV, scale, inv_n, max_attn_len, contextual_len, pos_p, n_buckets,
        SOFTMAX, CAUSAL, HAS_CONTEXT, HAS_WINDOW, HAS_POS, HAS_TIME, PRECISION, BLOCK_M, BLOCK_D, BLOCK_DV)
    dk = dk * scale
    tl.store(DK + rows_n[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :], _narrow(dk, DK.dtype.element_ty, PRECISION),
             mask=mask_n[:, None] & (offs_d[None, :] < D))
    tl.store(DV_OUT + rows_n[:, None] * stride_dvt + h * stride_dvh + offs_dv[None, :], _narrow(dv, DV_OUT.dtype.element_ty, PRECISION),
             mask=mask_n[:, None] & (offs_dv[None, :] < DV))


# ---------------------------------------------------------------------------------------
# Autotune configs. NOT tuned yet: no GPU was available when this was written. They are
# FlashAttention-2-style starting points for Hopper (H100/H200, 228 KB shared memory per
# SM) with head dims 64-128 in bf16; configs that do not fit (e.g. fp32 with D = 256) are
# dropped by the autotuner as out of resources. Retune with ``python -m bench attention``.
# ---------------------------------------------------------------------------------------

def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


_FWD_CONFIGS = _configs([(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)])
_DQ_CONFIGS = _configs([(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)])
_DKDV_CONFIGS = _configs([(64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (32, 32, 4, 2)])
_TUNE_KEY = ["AUTOTUNE_N", "BLOCK_D", "BLOCK_DV", "SOFTMAX", "HAS_POS", "HAS_TIME", "HAS_WINDOW", "SPLIT"]

_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)(_fwd_kernel)
_dq_tuned = triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY)(_bwd_dq_kernel)
# the autotuner re-runs the kernel while timing it: the atomically accumulated tables must be reset
_dkdv_tuned = triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY, reset_to_zero=["DPOS", "DTIME"])(_bwd_dkdv_kernel)

# Blocks for the interpreter (and for tests that fix them): the smallest tl.dot allows.
INTERPRETER_BLOCKS = (16, 16)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

def _is_interpreted(kernel: object) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def _is_traced(*tensors: Optional[torch.Tensor]) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)


def _pick(kernel: Any, tuned: Any, device: torch.device, blocks: Optional[tuple[int, int]]) -> tuple[Any, dict]:
    """The kernel to launch and the block sizes to pass (``{}`` when the autotuner picks)."""
    if device.type == "cuda":
        from torch.library import wrap_triton

        if blocks is None:
            return wrap_triton(tuned), {}
        return wrap_triton(kernel), {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]}
    if not _is_interpreted(kernel):
        raise RuntimeError(
            f"impl='triton' on {device.type} tensors runs the Triton interpreter, which needs TRITON_INTERPRET=1 "
            "set before triton is first imported; use impl='auto' to run the PyTorch reference instead")
    m, n = blocks or INTERPRETER_BLOCKS
    log.debug("%s on %s tensors: Triton interpreter, BLOCK_M=%d BLOCK_N=%d", kernel.__name__, device.type, m, n)
    return kernel, {"BLOCK_M": m, "BLOCK_N": n}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit stride on its last dim (the kernels take token and head strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _flags(softmax: bool, causal: bool, num_targets: OptTensor, contextual_len: int, max_attn_len: int,
           pos_w: OptTensor, time_w: OptTensor, dtype: torch.dtype, d: int, dv: int, split: bool) -> dict:
    # fp32: exact fp32 dots, not TF32; 16-bit: the precision argument does not apply
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if dtype == torch.bfloat16 and _is_interpreted(_fwd_kernel):
        precision = "interpret-bf16"
    return dict(
        SOFTMAX=softmax, CAUSAL=causal, HAS_TARGETS=num_targets is not None, HAS_CONTEXT=contextual_len > 0,
        HAS_WINDOW=max_attn_len > 0, HAS_POS=pos_w is not None, HAS_TIME=time_w is not None, SPLIT=split,
        PRECISION=precision,
        BLOCK_D=max(triton.next_power_of_2(d), MIN_HEAD_DIM), BLOCK_DV=max(triton.next_power_of_2(dv), MIN_HEAD_DIM),
    )


def _scalars(h: int, d: int, dv: int, scale: float, max_seq_len: int, contextual_len: int, max_attn_len: int,
             pos_w: OptTensor, time_w: OptTensor) -> tuple:
    pos_p = (pos_w.shape[1] + 1) // 2 if pos_w is not None else 1
    n_buckets = time_w.shape[1] if time_w is not None else 1
    return (h, d, dv, scale, 1.0 / max_seq_len, contextual_len, max_attn_len, pos_p, n_buckets,
            triton.next_power_of_2(max_seq_len))


def _launch_forward(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, num_targets: OptTensor, timestamps: OptTensor,
                    pos_w: OptTensor, time_w: OptTensor, max_seq_len: int, softmax: bool, scale: float, causal: bool,
                    contextual_len: int, max_attn_len: int, blocks: Optional[tuple[int, int]] = None,
                    kv_offsets: OptTensor = None, q_start: OptTensor = None) -> tuple[Tensor, Tensor]:
    """(out, lse); ``blocks`` fixes (BLOCK_M, BLOCK_N) instead of autotuning."""
    t, h, d = q.shape
    dv = v.shape[2]
    b = offsets.shape[0] - 1
    kv_offsets, q_start, split = _key_extents(offsets, kv_offsets, q_start)
    q, k, v = _rows(q), _rows(k), _rows(v)
    pos_w = pos_w.contiguous() if pos_w is not None else None
    time_w = time_w.contiguous() if time_w is not None else None
    out = q.new_zeros(t, h, dv)
    lse = q.new_zeros((t, h) if softmax else (0,), dtype=torch.float32)
    if t == 0 or b == 0:
        return out, lse
    kernel, block_args = _pick(_fwd_kernel, _fwd_tuned, q.device, blocks)

    def grid(meta):
        return (triton.cdiv(max_seq_len, meta["BLOCK_M"]), b * h)

    kernel[grid](
        q, k, v, offsets, kv_offsets, q_start, num_targets if num_targets is not None else offsets,
        timestamps if timestamps is not None else offsets,
        pos_w if pos_w is not None else q, time_w if time_w is not None else q, out, lse if softmax else out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        pos_w.stride(0) if pos_w is not None else 0, time_w.stride(0) if time_w is not None else 0,
        *_scalars(h, d, dv, scale, max_seq_len, contextual_len, max_attn_len, pos_w, time_w),
        **_flags(softmax, causal, num_targets, contextual_len, max_attn_len, pos_w, time_w, q.dtype, d, dv, split),
        **block_args,
    )
    return out, lse


def _launch_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, offsets: Tensor,
                     num_targets: OptTensor, timestamps: OptTensor, pos_w: OptTensor, time_w: OptTensor,
                     max_seq_len: int, softmax: bool, scale: float, causal: bool, contextual_len: int,
                     max_attn_len: int, blocks: Optional[tuple[int, int]] = None, kv_offsets: OptTensor = None,
                     q_start: OptTensor = None) -> tuple[Tensor, ...]:
    """(dq, dk, dv, d pos table, d time table): the dq kernel first (it writes delta), then dk/dv."""
    t, h, d = q.shape
    dv_dim = v.shape[2]
    b = offsets.shape[0] - 1
    kv_offsets, q_start, split = _key_extents(offsets, kv_offsets, q_start)
    q, k, v, out, dout = _rows(q), _rows(k), _rows(v), _rows(out), _rows(dout)
    pos_w = pos_w.contiguous() if pos_w is not None else None
    time_w = time_w.contiguous() if time_w is not None else None
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    f32 = dict(dtype=torch.float32, device=q.device)
    # fp32 accumulators for the atomics; a 1-element stand-in when a table is absent
    dpos = torch.zeros(pos_w.shape if pos_w is not None else (1,), **f32)
    dtime = torch.zeros(time_w.shape if time_w is not None else (1,), **f32)
    delta = torch.empty((t, h) if softmax else (1,), **f32)
    if t > 0 and b > 0:
        scalars = _scalars(h, d, dv_dim, scale, max_seq_len, contextual_len, max_attn_len, pos_w, time_w)
        flags = _flags(softmax, causal, num_targets, contextual_len, max_attn_len, pos_w, time_w, q.dtype, d, dv_dim,
                       split)
        targets = num_targets if num_targets is not None else offsets
        stamps = timestamps if timestamps is not None else offsets
        pw, tw = (pos_w if pos_w is not None else q), (time_w if time_w is not None else q)
        spw, stw = (pos_w.stride(0) if pos_w is not None else 0), (time_w.stride(0) if time_w is not None else 0)
        aux = lse if softmax else out

        kernel, block_args = _pick(_bwd_dq_kernel, _dq_tuned, q.device, blocks)

        def dq_grid(meta):
            return (triton.cdiv(max_seq_len, meta["BLOCK_M"]), b * h)

        kernel[dq_grid](
            q, k, v, out, dout, aux, delta, dq, offsets, kv_offsets, q_start, targets, stamps, pw, tw,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), spw, stw,
            *scalars, **flags, **block_args,
        )

        kernel, block_args = _pick(_bwd_dkdv_kernel, _dkdv_tuned, q.device, blocks)

        def dkdv_grid(meta):
            return (triton.cdiv(max_seq_len, meta["BLOCK_N"]), b * h)

        kernel[dkdv_grid](
            q, k, v, dout, aux, delta, dk, dv, dpos, dtime, offsets, kv_offsets, q_start, targets, stamps, pw, tw,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), spw, stw,
            *scalars, **flags, **block_args,
        )
    return dq, dk, dv, *_table_grads(q, pos_w, dpos, time_w, dtime)


def _key_extents(offsets: Tensor, kv_offsets: OptTensor, q_start: OptTensor) -> tuple[Tensor, Tensor, bool]:
    """(KV_OFFSETS, Q_START, SPLIT) for the kernels: without key extents, ``offsets`` for both
    (neither is read); else q_start, by default where the queries end with the keys."""
    if kv_offsets is None:
        return offsets, offsets, False
    if q_start is None:
        q_start = _query_starts(offsets, kv_offsets, None)
    return kv_offsets, q_start, True


def _table_grads(q: Tensor, pos_w: OptTensor, dpos: OptTensor, time_w: OptTensor,
                 dtime: OptTensor) -> tuple[Tensor, Tensor]:
    """Gradients of the bias tables in their own dtype; an empty tensor for an absent table
    (an op cannot return None)."""
    return (dpos.to(pos_w.dtype) if pos_w is not None else q.new_empty(0),
            dtime.to(time_w.dtype) if time_w is not None else q.new_empty(0))


# ---------------------------------------------------------------------------------------
# torch.library registration: triton_op (Inductor traces into the kernels on CUDA), fake
# implementations, autograd.
# ---------------------------------------------------------------------------------------

def _use_reference(q: torch.Tensor, impl: str) -> bool:
    """The PyTorch path (reference or grouped) rather than the Triton kernels."""
    return impl == "reference" or (impl == "auto" and q.device.type != "cuda")


def _use_grouped(q: torch.Tensor, impl: str, *index: OptTensor) -> bool:
    """``impl="auto"`` off CUDA on real tensors runs :mod:`fsc.kernels.attention_grouped`
    (length groups, data-dependent shapes); traced, it runs the reference."""
    return impl == "auto" and q.device.type != "cuda" and not _is_traced(q, *index)


def _check_launchable(q: torch.Tensor, *tensors: Optional[torch.Tensor]) -> None:
    if q.device.type != "cuda" and _is_traced(q, *tensors):
        raise RuntimeError(
            "impl='triton' on CPU tensors runs the Triton interpreter eagerly and cannot be traced "
            "(torch.compile, make_fx); use impl='auto', which traces the PyTorch reference on CPU")


def _upcast(t: OptTensor) -> OptTensor:
    return t.float() if t is not None and t.dtype in (torch.bfloat16, torch.float16) else t


@torch.library.triton_op("fsc::jagged_attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor], timestamps: Optional[torch.Tensor],
    position_bias: Optional[torch.Tensor], time_bias: Optional[torch.Tensor],
    max_seq_len: int, softmax: bool, scale: float, causal: bool, contextual_len: int, max_attn_len: int, impl: str,
    kv_offsets: Optional[torch.Tensor] = None, q_start: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [T, H, Dv], lse)``; lse is ``[T, H]`` fp32 in softmax mode (the row
    log-sum-exp the backward needs) and empty in HSTU mode. ``kv_offsets`` and ``q_start``
    come last, after ``impl``, so that callers without them keep their positional form."""
    if _use_grouped(q, impl, offsets, num_targets, kv_offsets, q_start):
        out, lse = grouped_forward(
            _upcast(q), _upcast(k), _upcast(v), offsets, max_seq_len, softmax=softmax, scale=scale, causal=causal,
            num_targets=num_targets, contextual_len=contextual_len, max_attn_len=max_attn_len,
            position_bias=_upcast(position_bias), timestamps=timestamps, time_bias=_upcast(time_bias),
            kv_offsets=kv_offsets, q_start=q_start)
        return out.to(q.dtype), lse.float() if softmax else lse.new_zeros(0, dtype=torch.float32)
    if _use_reference(q, impl):
        offsets, num_targets, kv_offsets, q_start = _drop_empty_sequences(offsets, num_targets, kv_offsets, q_start)
        out, lse = _reference_forward(
            _upcast(q), _upcast(k), _upcast(v), offsets, max_seq_len, softmax=softmax, scale=scale, causal=causal,
            num_targets=num_targets, contextual_len=contextual_len, max_attn_len=max_attn_len,
            position_bias=_upcast(position_bias), timestamps=timestamps, time_bias=_upcast(time_bias),
            kv_offsets=kv_offsets, q_start=q_start)
        return out.to(q.dtype), lse.float() if softmax else lse.new_zeros(0, dtype=torch.float32)
    _check_launchable(q, k, v, offsets)
    return _launch_forward(q, k, v, offsets, num_targets, timestamps, position_bias, time_bias, max_seq_len, softmax,
                           scale, causal, contextual_len, max_attn_len, kv_offsets=kv_offsets, q_start=q_start)


@_attention_fwd.register_fake
def _attention_fwd_fake(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, num_targets: OptTensor,
                        timestamps: OptTensor, position_bias: OptTensor, time_bias: OptTensor, max_seq_len: int,
                        softmax: bool, scale: float, causal: bool, contextual_len: int, max_attn_len: int,
                        impl: str, kv_offsets: OptTensor = None, q_start: OptTensor = None) -> tuple[Tensor, Tensor]:
    t, h, _ = q.shape
    return q.new_empty(t, h, v.shape[2]), q.new_empty((t, h) if softmax else (0,), dtype=torch.float32)


@torch.library.triton_op("fsc::jagged_attention_bwd", mutates_args=())
def _attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    offsets: torch.Tensor, num_targets: Optional[torch.Tensor], timestamps: Optional[torch.Tensor],
    position_bias: Optional[torch.Tensor], time_bias: Optional[torch.Tensor],
    max_seq_len: int, softmax: bool, scale: float, causal: bool, contextual_len: int, max_attn_len: int, impl: str,
    kv_offsets: Optional[torch.Tensor] = None, q_start: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, d position_bias, d time_bias)``; a table's gradient is empty
    when the table is absent."""
    if _use_grouped(q, impl, offsets, num_targets, kv_offsets, q_start):
        grads = grouped_backward(
            _upcast(dout), _upcast(q), _upcast(k), _upcast(v), offsets, max_seq_len, softmax=softmax, scale=scale,
            causal=causal, num_targets=num_targets, contextual_len=contextual_len, max_attn_len=max_attn_len,
            position_bias=_upcast(position_bias), timestamps=timestamps, time_bias=_upcast(time_bias),
            kv_offsets=kv_offsets, q_start=q_start)
    elif _use_reference(q, impl):
        offsets, num_targets, kv_offsets, q_start = _drop_empty_sequences(offsets, num_targets, kv_offsets, q_start)
        grads = _reference_backward(
            _upcast(dout), _upcast(q), _upcast(k), _upcast(v), offsets, max_seq_len, softmax=softmax, scale=scale,
            causal=causal, num_targets=num_targets, contextual_len=contextual_len, max_attn_len=max_attn_len,
            position_bias=_upcast(position_bias), timestamps=timestamps, time_bias=_upcast(time_bias),
            kv_offsets=kv_offsets, q_start=q_start)
    if _use_reference(q, impl):
        dq, dk, dv, dpos, dtime = grads
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                *_table_grads(q, position_bias, dpos, time_bias, dtime))
    _check_launchable(q, k, v, dout)
    return _launch_backward(dout, q, k, v, out, lse, offsets, num_targets, timestamps, position_bias, time_bias,
                            max_seq_len, softmax, scale, causal, contextual_len, max_attn_len, kv_offsets=kv_offsets,
                            q_start=q_start)


@_attention_bwd.register_fake
def _attention_bwd_fake(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, offsets: Tensor,
                        num_targets: OptTensor, timestamps: OptTensor, position_bias: OptTensor,
                        time_bias: OptTensor, max_seq_len: int, softmax: bool, scale: float, causal: bool,
                        contextual_len: int, max_attn_len: int, impl: str, kv_offsets: OptTensor = None,
                        q_start: OptTensor = None) -> tuple[Tensor, ...]:
    def table(w: OptTensor) -> Tensor:
        return w.new_empty(w.shape) if w is not None else q.new_empty(0)

    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), table(position_bias), table(time_bias)


def _drop_empty_sequences(offsets: Tensor, num_targets: OptTensor, kv_offsets: OptTensor = None,
                          q_start: OptTensor = None) -> tuple[Tensor, OptTensor, OptTensor, OptTensor]:
    """Offsets without their empty sequences (neither keys nor queries), when running on
    real tensors: the reference pads every sequence to max_seq_len, and callers such as
    ``lower-attention`` pass a static bound of T sequences of which most are empty. Traced,
    nothing changes (the shapes would be data-dependent)."""
    if _is_traced(offsets, num_targets, kv_offsets, q_start) or offsets.shape[0] < 2:
        return offsets, num_targets, kv_offsets, q_start
    keep = offsets[1:] > offsets[:-1]
    if kv_offsets is not None:
        keep = keep | (kv_offsets[1:] > kv_offsets[:-1])
    if bool(keep.all()):
        return offsets, num_targets, kv_offsets, q_start

    def drop(t: OptTensor) -> OptTensor:
        return t[keep] if t is not None else None

    def drop_offsets(t: OptTensor) -> OptTensor:
        return torch.cat([t[:1], t[1:][keep]]) if t is not None else None

    return drop_offsets(offsets), drop(num_targets), drop_offsets(kv_offsets), drop(q_start)


def _keep_reference_opaque(op: Any) -> None:
    """On the PyTorch paths (grouped or reference), keep ``op`` as one node under
    AOTAutograd instead of decomposing it (``triton_op`` decomposes into its body there,
    which is what Inductor needs to see the Triton kernels on CUDA). Opaque, the op runs on
    real tensors, where the grouped path picks its length groups (and the reference drops
    empty sequences), and aten graphs show ``fsc::jagged_attention_*``."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    decompose = op._torch_dispatch_fns[FunctionalTensorMode]

    def rule(mode: Any, func: Any, types: Any, args: tuple, kwargs: dict) -> Any:
        q = args[1] if func._schema.name.endswith("_bwd") else args[0]
        at = [a.name for a in func._schema.arguments].index("impl")
        if _use_reference(q, args[at] if len(args) > at else kwargs["impl"]):
            return mode.__torch_dispatch__(func, types, args, kwargs)
        return decompose(mode, func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, rule)


_keep_reference_opaque(_attention_fwd)
_keep_reference_opaque(_attention_bwd)


_PARAMS = 7  # max_seq_len .. impl, between the tables and kv_offsets


def _setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    (q, k, v, offsets, num_targets, timestamps, position_bias, time_bias, *rest) = inputs
    params, (kv_offsets, q_start) = rest[:_PARAMS], (rest[_PARAMS:] + [None, None])[:2]
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, offsets, num_targets, timestamps, position_bias, time_bias, kv_offsets,
                          q_start)
    ctx.params = params
    ctx.n_inputs = len(inputs)


def _backward(ctx: Any, dout: Tensor, _dlse: OptTensor) -> tuple[OptTensor, ...]:
    q, k, v, out, lse, offsets, num_targets, timestamps, position_bias, time_bias, kv_offsets, q_start = \
        ctx.saved_tensors
    split = () if kv_offsets is None else (kv_offsets, q_start)  # the fwd's form, so the bwd prints alike
    dq, dk, dv, dpos, dtime = torch.ops.fsc.jagged_attention_bwd(
        dout, q, k, v, out, lse, offsets, num_targets, timestamps, position_bias, time_bias, *ctx.params, *split)
    grads = (dq, dk, dv, None, None, None,
             dpos if position_bias is not None else None, dtime if time_bias is not None else None)
    return grads + (None,) * (ctx.n_inputs - len(grads))


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _pairs_times_two(q_shape: Any, k_shape: Any, causal: bool) -> Any:
    """Twice the query-key pairs an attention of ``Tq`` queries over ``Tk`` keys visits, from
    the token counts alone: causal, ``Tq (2 Tk - Tq)`` (the last Tq of Tk positions see
    their position + 1 keys: Tq Tk - Tq(Tq-1)/2 pairs, rounded), so T^2 when the queries are
    the keys (T(T+1)/2 pairs); ``2 Tq Tk`` otherwise. Exact for one sequence whose queries
    end with its keys; for several the true count is data-dependent and this is an upper
    bound, as every key extent holds its queries. Not a bound for the prefix rows of a
    chunk whose keys reach past its queries (they see every non-target key)."""
    tq, tk = q_shape[0], k_shape[0]
    return tq * (2 * tk - tq) if causal else 2 * tq * tk


def _forward_flops(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> Any:
    causal = kwargs["causal"] if "causal" in kwargs else args[8]
    _, h, d = q_shape
    return _pairs_times_two(q_shape, k_shape, causal) * h * (d + v_shape[2])  # 2 flops per pair: q.k, then p.v


def _backward_flops(dout_shape: Any, q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> Any:
    causal = kwargs["causal"] if "causal" in kwargs else args[10]
    _, h, d = q_shape
    # per pair, 2 flops each: scores recomputed (d), dP = dO.v (dv), dS.k (d), dS^T.q (d), P^T.dO (dv)
    return _pairs_times_two(q_shape, k_shape, causal) * h * (3 * d + 2 * v_shape[2])


def _register_flop_formulas() -> None:
    """FLOP counts for ``torch.utils.flop_counter`` (FlopCounterMode) and fsc's cost model,
    which would otherwise count the opaque ops as memory-bound."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    for packet, formula in ((torch.ops.fsc.jagged_attention_fwd, _forward_flops),
                            (torch.ops.fsc.jagged_attention_bwd, _backward_flops)):
        if packet not in flop_registry:
            register_flop_formula(packet)(formula)


_register_flop_formulas()


# ---------------------------------------------------------------------------------------
# Public entry and argument checks
# ---------------------------------------------------------------------------------------

def jagged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_seq_len: int,
    *,
    mode: str = "hstu",
    alpha: Optional[float] = None,
    scale: Optional[float] = None,
    causal: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    position_bias: Optional[torch.Tensor] = None,
    time_bias: Optional[torch.Tensor] = None,
    timestamps: Optional[torch.Tensor] = None,
    kv_offsets: Optional[torch.Tensor] = None,
    q_start: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Jagged attention ``[T, H, Dv]`` of ``q, k [T, H, D]`` and ``v [T, H, Dv]`` over the
    sequences that ``offsets [B+1]`` delimit; semantics in the module docstring.

    ``mode``: ``"hstu"`` (SiLU, /max_seq_len; ``alpha`` scales q.k) or ``"softmax"``
    (``scale`` scales q.k); both default to 1/sqrt(D). ``num_targets [B]``: targets at the
    end of each sequence. ``contextual_len``: prefix length (0: none). ``max_attn_len``:
    window in ids (0: none). ``position_bias [H, 2P-1]``, ``time_bias [H, NB]`` with
    ``timestamps [Tk]``: learned relative-bias tables (they get gradients). ``kv_offsets [B+1]``
    and ``q_start [B]``: separate key/value extents, for a chunk of a split sequence (``k, v``
    are then ``[Tk, H, *]``; see "Split sequences" in the module docstring). ``impl``:
    ``"auto"`` | ``"triton"`` | ``"reference"`` (see the module docstring).
    """
    softmax, factor = _check_arguments(
        q, k, v, offsets, max_seq_len, mode=mode, alpha=alpha, scale=scale, num_targets=num_targets,
        contextual_len=contextual_len, max_attn_len=max_attn_len, position_bias=position_bias, time_bias=time_bias,
        timestamps=timestamps, kv_offsets=kv_offsets, q_start=q_start, impl=impl, dtypes=DTYPES)
    if kv_offsets is None:
        # the op's schema as before: graphs that never split keep their printout
        out, _ = torch.ops.fsc.jagged_attention_fwd(
            q, k, v, offsets, num_targets, timestamps, position_bias, time_bias, max_seq_len, softmax, factor, causal,
            contextual_len, max_attn_len, impl)
        return out
    out, _ = torch.ops.fsc.jagged_attention_fwd(
        q, k, v, offsets, num_targets, timestamps, position_bias, time_bias, max_seq_len, softmax, factor, causal,
        contextual_len, max_attn_len, impl, kv_offsets, q_start)
    return out


def key_padding_extents(valid: Tensor, causal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The extents that turn attention over a padded layout into this op, for q, k, v as
    ``[B*N, H, *]`` (row b's tokens at ``b*N .. b*N + N - 1``) whose valid keys ``valid [B, N]``
    (bool) are one contiguous run per row, ``[s_b, s_b + L_b)`` (right-aligned: s_b = 0;
    left-aligned: s_b = N - L_b). The op then computes all N query rows over the valid keys
    only, with the padded layout's causal rule: query i sees key j iff j is valid and, causal,
    j <= i (what ``softmax(scores masked at the padding keys)`` computes, on every row).

    Row b becomes three sequences: the padding keys before the run (no queries), the N
    queries from position ``-s_b`` over the run's L_b keys (see "Queries outside the key
    extent"), the padding keys after it (no queries). Returns ``(offsets [3B+1], kv_offsets
    [3B+1], q_start [3B], seen [B, N], contiguous)``: ``seen`` marks the rows that see a key
    (the op gives the others 0: every row of an all-padding row, and causal, the rows before
    the run); ``contiguous`` (0-d bool) whether every row's valid keys are one run, which the
    extents assume and nothing here checks: the caller asserts it."""
    rows, n = valid.shape
    valid = valid.bool()
    lengths = valid.sum(-1)
    first = (valid.cumsum(-1) == 0).sum(-1)  # the padding before the run (N for a row without keys)
    pos = torch.arange(n, device=valid.device)
    contiguous = torch.all(valid == ((pos >= first[:, None]) & (pos < (first + lengths)[:, None])))
    row = torch.arange(rows, device=valid.device) * n
    kv_offsets = F.pad(torch.stack([row + first, row + first + lengths, row + n], -1).reshape(-1), (1, 0))
    offsets = F.pad(torch.stack([row, row + n, row + n], -1).reshape(-1), (1, 0))
    zero = torch.zeros_like(first)
    q_start = torch.stack([zero, -first, zero], -1).reshape(-1)
    seen = (lengths > 0)[:, None] & (pos >= first[:, None] if causal else True)
    return offsets, kv_offsets, q_start, seen.expand(rows, n), contiguous


def _check_arguments(q: Any, k: Any, v: Any, offsets: Any, max_seq_len: Any, *, mode: str, alpha: Any, scale: Any,
                     num_targets: Any, contextual_len: Any, max_attn_len: Any, position_bias: Any, time_bias: Any,
                     timestamps: Any, kv_offsets: Any = None, q_start: Any = None, impl: str,
                     dtypes: tuple[torch.dtype, ...]) -> tuple[bool, float]:
    """Raise naming the first bad argument; return (softmax?, the q.k scale factor)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [T, H, D], got {_describe(t)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have a dtype in {dtypes}, got {t.dtype}")
    t_len, heads, d = q.shape
    if heads < 1:
        raise ValueError(f"q must have at least one head, got shape {tuple(q.shape)}")
    if kv_offsets is None and k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if kv_offsets is not None and k.shape[1:] != q.shape[1:]:
        raise ValueError(f"k must be [Tk, H, D] with q's H and D {tuple(q.shape[1:])}, got {tuple(k.shape)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v must be [T, H, Dv] with k's T and H {tuple(k.shape[:2])}, got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, dim in (("q", d), ("v", v.shape[2])):
        if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name}'s head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {dim}")
    _check_index_tensor("offsets", offsets, q.device, None)
    if offsets.shape[0] < 1:
        raise ValueError("offsets must have B+1 >= 1 entries, got 0")
    batch = offsets.shape[0] - 1
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
    for name, value in (("contextual_len", contextual_len), ("max_attn_len", max_attn_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if num_targets is not None:
        _check_index_tensor("num_targets", num_targets, q.device, batch)
    if kv_offsets is not None:
        _check_index_tensor("kv_offsets", kv_offsets, q.device, batch + 1)
    if q_start is not None:
        if kv_offsets is None:
            raise ValueError("q_start needs kv_offsets: without separate key extents queries start at 0")
        _check_index_tensor("q_start", q_start, q.device, batch)
    if position_bias is not None:
        _check_table("position_bias", position_bias, q.device, heads)
        if position_bias.shape[1] % 2 == 0:
            raise ValueError(f"position_bias must be [H, 2P-1] (an odd number of columns), got "
                             f"{tuple(position_bias.shape)}")
    if (time_bias is None) != (timestamps is None):
        raise ValueError("time_bias and timestamps go together: pass both or neither")
    if time_bias is not None:
        _check_table("time_bias", time_bias, q.device, heads)
        _check_index_tensor("timestamps", timestamps, q.device, k.shape[0])
    if mode == "hstu" and scale is not None:
        raise ValueError("scale is the softmax-mode factor; in mode='hstu' pass alpha")
    if mode == "softmax" and alpha is not None:
        raise ValueError("alpha is the hstu-mode factor; in mode='softmax' pass scale")
    factor = alpha if mode == "hstu" else scale
    if factor is None:
        factor = 1.0 / math.sqrt(d)
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        raise TypeError(f"{'alpha' if mode == 'hstu' else 'scale'} must be a float, got {factor!r}")
    if offsets.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_offset_values(offsets, t_len, max_seq_len, num_targets if kv_offsets is None else None)
        if kv_offsets is not None:
            inside = " and ".join(name for name, on in (("contextual_len", contextual_len > 0), (
                "max_attn_len", max_attn_len > 0), ("timestamps", timestamps is not None)) if on)
            _check_kv_offset_values(offsets, kv_offsets, q_start, k.shape[0], max_seq_len, num_targets, inside)
    return mode == "softmax", float(factor)


def _describe(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_index_tensor(name: str, t: object, device: torch.device, length: Optional[int]) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got {_describe(t)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {t.shape[0]}")


def _check_table(name: str, t: object, device: torch.device, heads: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != heads or t.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D tensor [H={heads}, columns >= 1], got {_describe(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


def _check_offset_values(offsets: torch.Tensor, t_len: int, max_seq_len: int,
                         num_targets: Optional[torch.Tensor]) -> None:
    lengths = offsets[1:] - offsets[:-1]
    if int(offsets[0]) != 0 or int(offsets[-1]) != t_len or bool((lengths < 0).any()):
        raise ValueError(f"offsets must rise from 0 to T={t_len}, got {offsets.tolist()}")
    if lengths.numel() and int(lengths.max()) > max_seq_len:
        raise ValueError(f"offsets has a sequence of length {int(lengths.max())} > max_seq_len={max_seq_len}")
    if num_targets is not None and bool(((num_targets < 0) | (num_targets.to(lengths.device) > lengths)).any()):
        raise ValueError(f"num_targets must lie in [0, sequence length], got {num_targets.tolist()} "
                         f"for lengths {lengths.tolist()}")


def _check_kv_offset_values(offsets: Tensor, kv_offsets: Tensor, q_start: OptTensor, kv_tokens: int,
                            max_seq_len: int, num_targets: OptTensor, inside: str) -> None:
    """``inside``: the options that need every query inside its key extent, named for the
    error ("" when none is given)."""
    kv_lengths = kv_offsets[1:] - kv_offsets[:-1]
    if int(kv_offsets[0]) != 0 or int(kv_offsets[-1]) != kv_tokens or bool((kv_lengths < 0).any()):
        raise ValueError(f"kv_offsets must rise from 0 to Tk={kv_tokens} (k's tokens), got {kv_offsets.tolist()}")
    if kv_lengths.numel() and int(kv_lengths.max()) > max_seq_len:
        raise ValueError(f"kv_offsets has a key extent of length {int(kv_lengths.max())} > max_seq_len={max_seq_len}")
    q_lengths = (offsets[1:] - offsets[:-1]).to(kv_lengths.device)
    first = q_start.to(kv_lengths.device) if q_start is not None else kv_lengths - q_lengths
    if inside and bool(((first < 0) | (first + q_lengths > kv_lengths)).any()):
        what = "q_start + query length" if q_start is not None else "query length"
        raise ValueError(f"with {inside} the key extents must hold the queries' positions: 0 <= q_start and {what} "
                         f"<= key length, got queries {q_lengths.tolist()}"
                         + (f" from {q_start.tolist()}" if q_start is not None else "")
                         + f" for key lengths {kv_lengths.tolist()}")
    if num_targets is not None and bool(((num_targets < 0) | (num_targets.to(kv_lengths.device) > kv_lengths)).any()):
        raise ValueError(f"num_targets must lie in [0, key length] (the targets among the keys), got "
                         f"{num_targets.tolist()} for key lengths {kv_lengths.tolist()}")


# ---------------------------------------------------------------------------------------
# Plain PyTorch reference: pad to [B, N], build the [B, N, N] mask and the [B, H, N, N]
# scores, apply the activation, unpad. Quadratic in N and memory-hungry; it is the
# specification the kernels and the CPU implementation (attention_grouped) are tested
# against, and what impl="reference" runs.
# ---------------------------------------------------------------------------------------

def jagged_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, max_seq_len: int, *,
    mode: str = "hstu", alpha: Optional[float] = None, scale: Optional[float] = None, causal: bool = True,
    num_targets: Optional[torch.Tensor] = None, contextual_len: int = 0, max_attn_len: int = 0,
    position_bias: Optional[torch.Tensor] = None, time_bias: Optional[torch.Tensor] = None,
    timestamps: Optional[torch.Tensor] = None, kv_offsets: Optional[torch.Tensor] = None,
    q_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`jagged_attention` in plain, differentiable PyTorch, computed in the inputs'
    dtype (float64 allowed)."""
    softmax, factor = _check_arguments(
        q, k, v, offsets, max_seq_len, mode=mode, alpha=alpha, scale=scale, num_targets=num_targets,
        contextual_len=contextual_len, max_attn_len=max_attn_len, position_bias=position_bias, time_bias=time_bias,
        timestamps=timestamps, kv_offsets=kv_offsets, q_start=q_start, impl="reference",
        dtypes=DTYPES + (torch.float64,))
    out, _ = _reference_forward(
        q, k, v, offsets, max_seq_len, softmax=softmax, scale=factor, causal=causal, num_targets=num_targets,
        contextual_len=contextual_len, max_attn_len=max_attn_len, position_bias=position_bias,
        timestamps=timestamps, time_bias=time_bias, kv_offsets=kv_offsets, q_start=q_start)
    return out


def _reference_time_bucket(dt: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """min(floor(log2(1 + |dt|)), n_buckets - 1) on integers, exactly (see _time_bucket)."""
    x = dt.abs() + 1
    b = torch.log2(x.double()).floor().long().clamp(0, 62)
    b = torch.where((x >> b) == 0, b - 1, b)
    b = torch.where((x >> (b + 1)) != 0, b + 1, b)
    return b.clamp_max(n_buckets - 1)


def _query_starts(offsets: Tensor, kv_offsets: OptTensor, q_start: OptTensor) -> OptTensor:
    """Each sequence's first query position ``[B]`` (int64), or None without separate key
    extents: ``q_start`` when given, else where the queries end with the keys."""
    if kv_offsets is None:
        return None
    if q_start is not None:
        return q_start.long()
    return (kv_offsets[1:].long() - kv_offsets[:-1].long()) - (offsets[1:].long() - offsets[:-1].long())


def _reference_scores(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, max_seq_len: int, *, scale: float,
                      causal: bool, num_targets: OptTensor, contextual_len: int, max_attn_len: int,
                      position_bias: OptTensor, timestamps: OptTensor, time_bias: OptTensor,
                      kv_offsets: OptTensor = None, q_start: OptTensor = None) -> dict:
    """Scores [B, H, Nq, N] with bias, the mask [B, 1, Nq, N], padded inputs and the bias
    columns. Columns are key positions (a key's index in its key extent); rows are the
    queries' indices in their extent, at positions ``q_start`` + that index (without key
    extents the two coincide: Nq = N)."""
    t_len, heads, _ = q.shape
    batch, n, c = offsets.shape[0] - 1, max_seq_len, contextual_len
    device = q.device
    starts = offsets[:-1].long()
    lengths = offsets[1:].long() - starts
    first = _query_starts(offsets, kv_offsets, q_start)
    kv_starts = kv_offsets[:-1].long() if kv_offsets is not None else starts
    kv_lengths = kv_offsets[1:].long() - kv_starts if kv_offsets is not None else lengths
    nq = n
    if batch > 0 and not _is_traced(q, offsets, kv_offsets):
        # pad to the longest sequence present, not to max_seq_len: positions past a sequence's
        # end are invisible, and N enters the maths only as HSTU's 1/N (not through n)
        n = max(int(kv_lengths.max()), 1)
        nq = n if first is None else max(int(lengths.max()), 1)
    # token -> (sequence, index in its extent); output_size keeps the shape static for tracing
    seq = torch.repeat_interleave(torch.arange(batch, device=device), lengths, output_size=t_len)
    slot = torch.arange(t_len, device=device) - starts[seq]
    kv_seq, kv_pos = seq, slot
    p = torch.arange(n, device=device)
    pos_q = p[None, :]  # [1 or B, Nq]: the rows' positions
    if first is not None:
        kv_seq = torch.repeat_interleave(torch.arange(batch, device=device), kv_lengths, output_size=k.shape[0])
        kv_pos = torch.arange(k.shape[0], device=device) - kv_starts[kv_seq]
        pos_q = first[:, None] + torch.arange(nq, device=device)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((batch, nq) + tuple(x.shape[1:])).index_put((seq, slot), x)

    def pad_kv(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((batch, n) + tuple(x.shape[1:])).index_put((kv_seq, kv_pos), x)

    # mask ids: prefix -> 0, history from 1, capped at E (the first target's id); the
    # sequence's length is its key extent's
    e_max = kv_lengths - (num_targets.long() if num_targets is not None else 0) + (1 - c if c > 0 else 0)

    def mask_ids(pos: Tensor) -> Tensor:
        ids = (pos - c + 1).clamp_min(0) if c > 0 else pos
        return torch.minimum(ids, e_max[:, None])  # [B, N]

    ids, ids_q = mask_ids(p[None, :]), mask_ids(pos_q)
    d = ids_q[:, :, None] - ids[:, None, :]  # query i along dim 1, key j along dim 2
    if not causal:
        d = d.abs()
    visible = (pos_q[:, :, None] == p[None, None, :]) | (d > 0)
    if max_attn_len > 0:
        visible = visible & (d <= max_attn_len)
    if c > 0:
        visible = visible | ((ids_q[:, :, None] == 0) & (ids[:, None, :] < e_max[:, None, None]))
    in_seq = p[None, :] < kv_lengths[:, None]
    in_query = torch.arange(nq, device=device)[None, :] < lengths[:, None]
    visible = visible & in_query[:, :, None] & in_seq[:, None, :]  # [B, Nq, N]

    qp, kp, vp = pad(q), pad_kv(k), pad_kv(v)
    s = torch.einsum("bihd,bjhd->bhij", qp, kp) * scale
    parts = {"seq": seq, "pos": slot, "kv_seq": kv_seq, "kv_pos": kv_pos, "pad": pad, "visible": visible[:, None],
             "qp": qp, "kp": kp, "vp": vp}
    if position_bias is not None:
        half = (position_bias.shape[1] - 1) // 2
        col = (ids[:, None, :] - ids_q[:, :, None]).clamp(-half, half) + half  # [B, Nq, N]
        s = s + position_bias.to(s.dtype)[:, col].transpose(0, 1)
        parts["pos_col"] = col
    if time_bias is not None:
        # one timestamp per key token; a query's is the key token's at its position (queries
        # with a time bias lie inside their key extent)
        tp = pad_kv(timestamps.long())
        tq = tp.gather(1, pos_q.expand(batch, nq).clamp(0, n - 1))
        bucket = _reference_time_bucket(tq[:, :, None] - tp[:, None, :], time_bias.shape[1])
        s = s + time_bias.to(s.dtype)[:, bucket].transpose(0, 1)
        parts["time_col"] = bucket
    parts["s"] = s
    return parts


def _reference_probs(parts: dict, softmax: bool, max_seq_len: int) -> tuple[Tensor, Tensor]:
    """(attention weights [B, H, N, N], row log-sum-exp [B, H, N] or empty)."""
    s, visible = parts["s"], parts["visible"]
    if not softmax:
        return F.silu(s) / max_seq_len * visible, s.new_zeros(0)
    # padding rows see nothing: give them finite scores so no NaN reaches the gradients
    any_visible = visible.any(-1, keepdim=True)
    masked = torch.where(visible, s, torch.where(any_visible, float("-inf"), 0.0).to(s.dtype))
    return torch.softmax(masked, dim=-1) * visible, torch.logsumexp(masked, dim=-1)


def _reference_forward(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, max_seq_len: int, *, softmax: bool,
                       **options: Any) -> tuple[Tensor, Tensor]:
    parts = _reference_scores(q, k, v, offsets, max_seq_len, **options)
    probs, lse = _reference_probs(parts, softmax, max_seq_len)
    seq, pos = parts["seq"], parts["pos"]
    out = torch.einsum("bhij,bjhe->bihe", probs, parts["vp"])[seq, pos]
    return out.contiguous(), (lse.transpose(1, 2)[seq, pos].contiguous() if softmax else lse)


def _reference_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, max_seq_len: int, *,
                        softmax: bool, scale: float, **options: Any) -> tuple[OptTensor, ...]:
    """The maths of the backward kernels, written densely: (dq, dk, dv, d position_bias or
    None, d time_bias or None)."""
    parts = _reference_scores(q, k, v, offsets, max_seq_len, scale=scale, **options)
    probs, _ = _reference_probs(parts, softmax, max_seq_len)
    s, visible, seq, pos = parts["s"], parts["visible"], parts["seq"], parts["pos"]
    dop = parts["pad"](dout)
    dv = torch.einsum("bhij,bihe->bjhe", probs, dop)
    dp = torch.einsum("bihe,bjhe->bhij", dop, parts["vp"])
    if softmax:
        ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))
    else:
        sig = torch.sigmoid(s)
        ds = dp * sig * (1 + s * (1 - sig)) / max_seq_len * visible  # d silu(x)/dx = s(x)(1 + x(1 - s(x)))
    dq = torch.einsum("bhij,bjhd->bihd", ds, parts["kp"]) * scale
    dk = torch.einsum("bhij,bihd->bjhd", ds, parts["qp"]) * scale
    kv_seq, kv_pos = parts["kv_seq"], parts["kv_pos"]
    heads = q.shape[1]
    flat = ds.transpose(0, 1).reshape(heads, -1)

    def table_grad(table: OptTensor, col_key: str) -> OptTensor:
        if table is None:
            return None
        return flat.new_zeros(table.shape).index_add(1, parts[col_key].reshape(-1), flat)

    return (dq[seq, pos].contiguous(), dk[kv_seq, kv_pos].contiguous(), dv[kv_seq, kv_pos].contiguous(),
            table_grad(options["position_bias"], "pos_col"), table_grad(options["time_bias"], "time_col"))
