"""Jagged attention on devices without the Triton kernels: sequences grouped by length.

The plain reference (:func:`fsc.kernels.jagged_attention_reference`) pads every sequence to
the longest one and builds each bias and mask as its own [B, N, N] tensor, twice per layer
(forward, and again in the backward). That is the oracle the tests compare with. This module
is what ``impl="auto"`` runs on CPU tensors, on real (not traced) tensors only, and does the
same maths with less work:

- **Grouping.** Sequences are sorted by length and cut into groups (a small dynamic
  program over length buckets that trades padded work against a fixed cost per group); each
  group is padded to its own longest sequence. With skewed lengths (a few long histories,
  many short ones) this does a fraction of the padded work.
- **One bias gather.** The position and time tables are added into one combined table
  ``[H, P * NB]`` and gathered once with a combined index; the backward scatters once into
  that table and sums it back into the two tables' gradients.
- **Layout.** Scores live as ``[H, G, n, n]``, contiguous, so the bias gather, the mask and
  the elementwise chain of the backward run on contiguous memory, mostly in place.
- **Time buckets** come from the exponent bits of the differences as float64, exact below
  2**53; larger differences take the shift-corrected path.

With separate key/value extents (a chunk of a split sequence, or queries over a padded
row's valid keys), sequences are grouped by their key extent's length; each group pads its
queries and its keys separately.

The semantics are the module docstring's of :mod:`fsc.kernels.jagged_attention`; the tests
hold this implementation to the reference in float64.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F

Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]

#: cost model of the grouping: seconds per score element per unit of head dim, and a fixed
#: cost per group (about 40 tensor ops); only the choice of groups depends on these
_SECONDS_PER_ELEMENT = 2.5e-10
_SECONDS_PER_GROUP = 4e-4


def time_bucket(dt: Tensor, n_buckets: int) -> Tensor:
    """``min(floor(log2(1 + |dt|)), n_buckets - 1)`` on integer differences, exactly."""
    x = dt.abs() + 1
    if x.numel() and int(x.max()) >= 1 << 53:  # float64 would round: correct with shifts
        b = torch.log2(x.double()).floor().long().clamp(0, 62)
        b = torch.where((x >> b) == 0, b - 1, b)
        b = torch.where((x >> (b + 1)) != 0, b + 1, b)
    else:  # exact in float64: floor(log2 x) is the biased exponent field minus 1023
        b = (x.double().view(torch.int64) >> 52) - 1023
    return b.clamp_max(n_buckets - 1)


def plan_groups(lengths: np.ndarray, heads: int, dim: int) -> list[np.ndarray]:
    """Sequence indices (non-empty ones only) in groups of similar length, longest first
    within a group. Lengths fall into buckets of ratio sqrt(2); a dynamic program joins
    neighbouring buckets when one group's fixed cost outweighs the extra padding."""
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] > 0]
    if order.size == 0:
        return []
    sorted_len = lengths[order].astype(np.float64)
    keys = np.ceil(2 * np.log2(sorted_len)).astype(np.int64)
    # bucket boundaries in the (descending) sorted order
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    edges = np.r_[starts, order.size]
    m = len(starts)
    per_element = _SECONDS_PER_ELEMENT * heads * max(dim, 1)

    def cost(i: int, j: int) -> float:  # one group of buckets i .. j - 1: padded to its longest
        lo, hi = edges[i], edges[j]
        return (hi - lo) * sorted_len[lo] ** 2 * per_element + _SECONDS_PER_GROUP

    best = [0.0] + [math.inf] * m
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        for i in range(j):
            c = best[i] + cost(i, j)
            if c < best[j]:
                best[j], cut[j] = c, i
    groups = []
    j = m
    while j > 0:
        i = cut[j]
        groups.append(order[edges[i] : edges[j]])
        j = i
    return groups[::-1]


class _Slots:
    """One side (queries or keys) of a group: each member's tokens padded to ``n`` slots."""

    def __init__(self, idx: Tensor, starts: Tensor, lengths: Tensor, t_len: int) -> None:
        lens = lengths[idx]
        self.size, self.n = len(idx), int(lens.max())
        p = torch.arange(self.n, device=idx.device)
        valid = p[None, :] < lens[:, None]  # [G, n]
        tok = (starts[idx][:, None] + p[None, :]).clamp_max(max(t_len - 1, 0))  # padding reads a real token
        self.valid = valid
        self.tok = tok.reshape(-1)
        self.valid_at = valid.reshape(-1).nonzero().squeeze(1)  # padded slots that hold tokens
        self.rows = self.tok[self.valid_at]  # the tokens they hold

    def pad(self, x: Tensor) -> Tensor:
        """``[T, H, E]`` -> ``[H, G, n, E]`` (padding slots hold some real token's values)."""
        heads, e = x.shape[1], x.shape[2]
        return x[self.tok].view(self.size, self.n, heads, e).permute(2, 0, 1, 3).contiguous()

    def unpad_into(self, dst: Tensor, xp: Tensor) -> None:
        """Write the token slots of ``xp [H, G, n, E]`` into the rows of ``dst [T, H, E]``."""
        heads, e = xp.shape[0], xp.shape[3]
        flat = xp.permute(1, 2, 0, 3).reshape(self.size * self.n, heads, e)
        dst.index_copy_(0, self.rows, flat[self.valid_at])


class _Group:
    """One group's padded index tensors, mask and bias index (built again by the backward).
    Scores are ``[nq, nk]`` per member: its queries (``self.q``) against its keys
    (``self.kv``); without separate key extents the two sides are one."""

    def __init__(self, members: np.ndarray, starts: Tensor, lengths: Tensor, t_len: int, *, causal: bool,
                 num_targets: OptTensor, contextual_len: int, max_attn_len: int, timestamps: OptTensor,
                 pos_cols: int, n_buckets: int, kv: Optional[tuple[Tensor, Tensor, int, Tensor]] = None) -> None:
        device = starts.device
        idx = torch.from_numpy(members).to(device)
        self.q = _Slots(idx, starts, lengths, t_len)
        self.kv = self.q if kv is None else _Slots(idx, kv[0], kv[1], kv[2])
        self.size, self.n = self.q.size, self.q.n
        pk = torch.arange(self.kv.n, device=device)
        pos_q = pk[None, :self.q.n] if kv is None else kv[3][idx][:, None] + torch.arange(self.q.n, device=device)

        c = contextual_len
        kv_lens = (lengths if kv is None else kv[1])[idx]
        e_max = kv_lens - (num_targets[idx].long() if num_targets is not None else 0) + (1 - c if c > 0 else 0)

        def mask_ids(p: Tensor) -> Tensor:
            ids = (p - c + 1).clamp_min(0) if c > 0 else p
            return torch.minimum(ids, e_max[:, None])  # [G, n]

        ids = mask_ids(pk[None, :])
        ids_q = ids if kv is None else mask_ids(pos_q)
        d = ids_q[:, :, None] - ids[:, None, :]
        if not causal:
            d = d.abs()
        if kv is None:
            visible = (d > 0) | torch.eye(self.n, dtype=torch.bool, device=device)
        else:
            visible = (d > 0) | (pos_q[:, :, None] == pk[None, None, :])
        if max_attn_len > 0:
            visible &= d <= max_attn_len
        if c > 0:
            visible |= (ids_q[:, :, None] == 0) & (ids[:, None, :] < e_max[:, None, None])
        visible &= self.q.valid[:, :, None] & self.kv.valid[:, None, :]
        self.visible = visible  # [G, nq, nk]

        index: OptTensor = None
        if pos_cols:
            half = (pos_cols - 1) // 2
            index = (ids[:, None, :] - ids_q[:, :, None]).clamp(-half, half) + half
        if timestamps is not None:
            # one timestamp per key token; a query's is the key token's at its position
            ts = timestamps.long()[self.kv.tok.view(self.size, -1)]
            if kv is None:
                ts_q = ts
            else:
                at = (kv[0][idx][:, None] + pos_q).clamp_max(max(kv[2] - 1, 0))
                ts_q = timestamps.long()[at]
            bucket = time_bucket(ts_q[:, :, None] - ts[:, None, :], n_buckets)
            index = bucket if index is None else index * n_buckets + bucket
        self.bias_index = None if index is None else index.reshape(-1)


def _bias_table(position_bias: OptTensor, time_bias: OptTensor, dtype: torch.dtype) -> OptTensor:
    """The tables as one ``[H, P * NB]`` table (or the one present), in ``dtype``."""
    if position_bias is None and time_bias is None:
        return None
    if time_bias is None:
        return position_bias.to(dtype).contiguous()
    if position_bias is None:
        return time_bias.to(dtype).contiguous()
    heads = position_bias.shape[0]
    return (position_bias.to(dtype)[:, :, None] + time_bias.to(dtype)[:, None, :]).reshape(heads, -1)


def _groups(q: Tensor, k: Tensor, offsets: Tensor, causal: bool, num_targets: OptTensor, contextual_len: int,
            max_attn_len: int, position_bias: OptTensor, timestamps: OptTensor, time_bias: OptTensor,
            kv_offsets: OptTensor, q_start: OptTensor) -> list[_Group]:
    starts = offsets[:-1].long()
    lengths = offsets[1:].long() - starts
    kv = None
    if kv_offsets is not None:
        kv_starts = kv_offsets[:-1].long()
        kv_lengths = kv_offsets[1:].long() - kv_starts
        first = q_start.long() if q_start is not None else kv_lengths - lengths
        kv = (kv_starts, kv_lengths, k.shape[0], first)
    # grouped by key extent; a sequence with keys but no queries computes nothing (and one
    # with queries but no keys leaves its rows 0): neither joins a group
    planned = lengths if kv is None else torch.where(lengths > 0, kv[1], 0)
    members = plan_groups(planned.cpu().numpy(), q.shape[1], q.shape[2])
    return [
        _Group(m, starts, lengths, q.shape[0], causal=causal, num_targets=num_targets, contextual_len=contextual_len,
               max_attn_len=max_attn_len, timestamps=timestamps,
               pos_cols=position_bias.shape[1] if position_bias is not None else 0,
               n_buckets=time_bias.shape[1] if time_bias is not None else 1, kv=kv)
        for m in members
    ]


def _scores(g: _Group, qp: Tensor, kp: Tensor, scale: float, table: OptTensor) -> Tensor:
    """``[H, G, nq, nk]`` scores with the relative bias added."""
    heads = qp.shape[0]
    s = torch.matmul(qp, kp.transpose(-1, -2)).mul_(scale)
    if table is not None:
        s.add_(table.index_select(1, g.bias_index).view(heads, g.size, g.q.n, g.kv.n))
    return s


def _softmax_probs(s: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the visible keys (rows that see nothing: zeros) and the row log-sum-exp."""
    any_visible = visible.any(-1, keepdim=True)
    fill = torch.where(any_visible, float("-inf"), 0.0).to(s.dtype)
    masked = torch.where(visible, s, fill)
    lse = torch.logsumexp(masked, dim=-1)
    return torch.softmax(masked, dim=-1).mul_(visible), lse


def grouped_forward(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, max_seq_len: int, *, softmax: bool,
                    scale: float, causal: bool, num_targets: OptTensor, contextual_len: int, max_attn_len: int,
                    position_bias: OptTensor, timestamps: OptTensor, time_bias: OptTensor,
                    kv_offsets: OptTensor = None, q_start: OptTensor = None) -> tuple[Tensor, Tensor]:
    """``(out [T, H, Dv], lse [T, H] in softmax mode, else empty)``."""
    t_len, heads, _ = q.shape
    out = q.new_zeros(t_len, heads, v.shape[2])
    lse_out = q.new_zeros(t_len, heads) if softmax else q.new_zeros(0)
    table = _bias_table(position_bias, time_bias, q.dtype)
    for g in _groups(q, k, offsets, causal, num_targets, contextual_len, max_attn_len, position_bias, timestamps,
                     time_bias, kv_offsets, q_start):
        s = _scores(g, g.q.pad(q), g.kv.pad(k), scale, table)
        if softmax:
            probs, lse = _softmax_probs(s, g.visible)
            g.q.unpad_into(lse_out.unsqueeze(2), lse.unsqueeze(3))
        else:
            probs = F.silu(s, inplace=True).mul_(g.visible.to(s.dtype).div_(max_seq_len))
        g.q.unpad_into(out, torch.matmul(probs, g.kv.pad(v)))
    return out, lse_out


def grouped_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, max_seq_len: int, *,
                     softmax: bool, scale: float, causal: bool, num_targets: OptTensor, contextual_len: int,
                     max_attn_len: int, position_bias: OptTensor, timestamps: OptTensor,
                     time_bias: OptTensor, kv_offsets: OptTensor = None,
                     q_start: OptTensor = None) -> tuple[Tensor, Tensor, Tensor, OptTensor, OptTensor]:
    """``(dq, dk, dv, d position_bias or None, d time_bias or None)``, recomputing the scores."""
    t_len, heads, _ = q.shape
    # contiguous, whatever the inputs' strides: the op's fake implementation says so
    dq, dk, dv = (torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    table = _bias_table(position_bias, time_bias, q.dtype)
    dtable = torch.zeros_like(table) if table is not None else None
    for g in _groups(q, k, offsets, causal, num_targets, contextual_len, max_attn_len, position_bias, timestamps,
                     time_bias, kv_offsets, q_start):
        qp, kp, vp, dop = g.q.pad(q), g.kv.pad(k), g.kv.pad(v), g.q.pad(dout)
        s = _scores(g, qp, kp, scale, table)
        dp = torch.matmul(dop, vp.transpose(-1, -2))
        if softmax:
            probs, _ = _softmax_probs(s, g.visible)
            ds = dp.sub_((probs * dp).sum(-1, keepdim=True)).mul_(probs)
        else:
            w = g.visible.to(s.dtype).div_(max_seq_len)
            sig = torch.sigmoid(s)
            probs = s * sig * w  # silu(s) / N on visible pairs
            # d silu(x)/dx = sig(x) (1 + x (1 - sig(x)))
            ds = torch.sub(1, sig).mul_(s).add_(1).mul_(sig).mul_(w).mul_(dp)
        g.kv.unpad_into(dv, torch.matmul(probs.transpose(-1, -2), dop))
        g.q.unpad_into(dq, torch.matmul(ds, kp).mul_(scale))
        g.kv.unpad_into(dk, torch.matmul(ds.transpose(-1, -2), qp).mul_(scale))
        if dtable is not None:
            dtable.index_add_(1, g.bias_index, ds.reshape(heads, -1))
    return (dq, dk, dv, *_split_table_grad(dtable, position_bias, time_bias))


def _split_table_grad(dtable: OptTensor, position_bias: OptTensor,
                      time_bias: OptTensor) -> tuple[OptTensor, OptTensor]:
    if dtable is None:
        return None, None
    if time_bias is None:
        return dtable, None
    if position_bias is None:
        return None, dtable
    heads, cols, buckets = position_bias.shape[0], position_bias.shape[1], time_bias.shape[1]
    combined = dtable.view(heads, cols, buckets)
    return combined.sum(2), combined.sum(1)


__all__: list[str] = ["grouped_backward", "grouped_forward", "plan_groups", "time_bucket"]
