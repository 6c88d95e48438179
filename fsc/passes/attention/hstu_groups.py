"""The HSTU example's per-sequence attention (``examples/hstu/model.py``,
``attention="padded"`` and ``"jagged"``): sequences gathered into padded groups.

Per group of ``n`` sequences padded to ``N`` steps, with ``pad [n, N]`` its token indices
(-1 past a sequence's end), ``index = pad.clamp(min=0)``, ``valid = pad >= 0`` and
``steps = arange(N)``::

    scores = alpha * einsum("bihd,bjhd->bhij", q[index], k[index])
             [+ permute(E_pos(clamp(steps_i - steps_j, 0, C)) + E_time(bucket(stamps_i - stamps_j)), (0, 3, 1, 2))]
    attn = silu(scores) / max_len * (valid_i & valid_j & (steps_i - steps_j >= 0)).unsqueeze(1)
    out = einsum("bhij,bjhd->bihd", attn, v[index]).reshape(-1, H * dv)

or, in the example's softmax mode (``HSTUConfig.mode="softmax"``), with the same mask::

    attn = softmax(scores.masked_fill(~(mask.bool() | eye(N)).unsqueeze(1), -inf), -1) * mask.unsqueeze(1)

(padding rows see only their diagonal, so no row is all -inf, and are then zeroed; a valid
row's visible keys are exactly the mask's, its causal run of its sequence)

with ``stamps = timestamps[index]`` and the time bucket as in :mod:`~fsc.passes.attention.hstu`;
then ``cat`` of the groups' outputs (one group: none), indexed by ``token_index [T]``, the
tokens back in their order. Every piece is recognised structurally (any einsum letters,
any spelling), and every group must use the same q, k, v, scale, divisor and bias tables.

Lowered to one kernel call over the tokens in their order (causal; hstu mode: ``max_seq_len``
= the divisor N, alpha = the scores' scale; softmax mode: scale = the scores' scale,
``max_seq_len`` = the position bias's rows C + 1, a bound on the lengths the run-time check
asserts, and without a position bias declined), whose output replaces ``cat(...)[token_index]``.
Offsets come from the groups' rows: each non-empty row's first token, sorted, then T (empty
rows are empty sequences at the end). The bias tables are built from the model's embedding
tables as in the dense form. This is exact PROVIDED each row's valid entries come first and
are consecutive tokens ``pad[r, 0] + i``, at most N of them, every token is in exactly one
row, and ``token_index`` reads every token back from its own slot (``flat(pads)[token_index]
== arange(T)``, the groups flattened in ``cat`` order): then the rows are the sequences of
those offsets, step i of a row is a token's position in its sequence, and the gathered
timestamps are the tokens' own. The graph cannot prove that (it is data), so with
``check_preconditions`` the lowering asserts it at run time (``torch._assert_async``).

Kept off CUDA like dense attention (a ``uniform`` lowering; ``dense_on_cpu=true`` lowers it
anyway): each group's product is already per sequence, so the jagged op saves only the
padding, and on CPU its PyTorch implementation was slower than Inductor's code for the
graph: a training step (hstu mode, 1 layer, dim 64, 2 heads, q/k/v dims 32, 24 sequences of 5..119
tokens, inner="inductor", 2 cores shared with a test run, so rough) took 1.3x (padded) and
2.1x (jagged, 3 groups) the kept form's. On CUDA the op runs the Triton kernels.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.nn import functional as F

from fsc.passes.attention import hstu
from fsc.passes.attention.graph import (
    attention_weights,
    binary,
    call,
    einsum,
    factors,
    fmt,
    is_call,
    same,
    scale_of,
    shape,
    silu_weights,
    uncast,
    upstream,
    val,
)
from fsc.passes.attention.lowering import OFF_SWITCH, Emitter, Family, Lowering, Settings, check_tensors
from fsc.passes.attention.softmax import SOFTMAX

FORM = "the HSTU example's per-sequence form (gathered [n, N] groups)"


def anchors(node: fx.Node) -> bool:
    """The first group's output einsum (the form is one attention, however many groups):
    values gathered by a 2-D index, weights made by a SiLU, or by a softmax where the output
    is read back as this form's."""
    parsed = einsum(node)
    if parsed is None or len(parsed[3]) != 2 or _gathered(parsed[3][1]) is None:
        return False
    read = _read_back(node)
    if not isinstance(read, str) and read[2][0].args[0] is not node:
        return False
    weights = parsed[3][0]
    return attention_weights(weights, F.silu) or (attention_weights(weights, *SOFTMAX) and not isinstance(read, str))


def match(node: fx.Node, settings: Settings) -> Lowering | str:
    lowering = _match(node, settings)
    return f"{FORM}: not lowered because {lowering}" if isinstance(lowering, str) else lowering


def _match(node: fx.Node, settings: Settings) -> Lowering | str:
    found = _groups(node)
    if isinstance(found, str):
        return found
    out, token_index, groups = found
    first = groups[0]
    for g in groups[1:]:
        for what in ("q", "k", "v", "timestamps"):  # nodes: the same one
            if getattr(g, what) is not getattr(first, what):
                return f"its groups attend over different {what}"
        for what in ("alpha", "n", "tables"):
            if getattr(g, what) != getattr(first, what):
                return f"its groups differ in {what}"
    q, k, v, n, alpha = first.q, first.k, first.v, first.n, first.alpha
    if problem := check_tensors(q, k, v, settings):
        return problem
    dims = [shape(x) for x in (q, k, v)]
    if any(len(d) != 3 for d in dims) or not (same(dims[0][0], dims[1][0]) and same(dims[0][0], dims[2][0])):
        return f"q, k, v are {dims}, not [T, H, D] over one T"
    width = shape(out)[1]
    if not same(shape(token_index)[0], dims[0][0]) or width != dims[2][1] * dims[2][2]:
        return f"its output {fmt(shape(out))} is not [T, H * dv] over q's {fmt(dims[0])} tokens"
    notes = hstu.time_bucket_notes(first.tables, first.time_dtype, settings)
    if isinstance(notes, str):
        return notes
    softmax = n is None
    if softmax:  # the kernel needs a static bound on the lengths: the position bias's rows
        n = next((rows for kind, _, rows in first.tables if kind == "position"), None)
        if n is None:
            return "softmax mode without a position bias: no static bound on the sequence lengths for the kernel"
    pads = tuple(g.pad for g in groups)
    check = settings.check_preconditions
    weighting = f"softmax attention, scale={alpha:.4g}, lengths <= {n}" if softmax else \
        f"SiLU attention, alpha={alpha:.4g}, /N={n}"
    described = (f"{FORM}, {len(groups)} group{'s' if len(groups) > 1 else ''}: HSTU {weighting}, q [T, H, D]="
                 f"{fmt(dims[0])}, causal within rows, bias: "
                 f"{', '.join(f'{kind}[{rows}]' for kind, _, rows in first.tables) or 'none'} "
                 f"(jagged, offsets from the rows{', layout checked at run time' if check else ''})")

    def emit(e: Emitter) -> fx.Node:
        key = ("groups", pads, token_index, n)
        if key not in e.shared:
            e.shared[key] = _offsets(e, pads, token_index, q, n, check)
        result = hstu.emit_kernel(e, q, k, v, e.shared[key], first.tables, first.timestamps, n, alpha, softmax)
        return e(torch.reshape, result, (-1, width))

    return Lowering(out, described, emit, notes, uniform=True, device=val(q).device)


FAMILY = Family("hstu_groups", anchors, match)


@dataclasses.dataclass(frozen=True, slots=True)
class _Group:
    pad: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    alpha: float
    n: int
    tables: tuple
    timestamps: Any
    time_dtype: Any


def _gathered(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """(x, index) for ``x[index]`` with a 2-D integer index."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not operator.getitem:
        return None
    x, index = node.args
    value = val(index)
    if not isinstance(x, fx.Node) or not isinstance(value, torch.Tensor) or value.ndim != 2 or value.dtype not in (
            torch.int64, torch.int32):
        return None
    return x, index


def _groups(final: fx.Node) -> tuple[fx.Node, fx.Node, list[_Group]] | str:
    """(the ``cat(...)[token_index]`` node, token_index, the groups in ``cat`` order)."""
    read = _read_back(final)
    if isinstance(read, str):
        return read
    out, token_index, members = read
    groups = []
    for m in members:
        g = _group(m.args[0])
        if isinstance(g, str):
            return g
        groups.append(g)
    return out, token_index, groups


def _read_back(final: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | str:
    """(the ``cat(...)[token_index]`` node, token_index, the groups' reshaped outputs) for a
    group's output einsum."""
    users = list(final.users)
    if len(users) != 1 or not is_call(users[0], torch.reshape, torch.Tensor.view):
        return "a group's output is not reshaped (alone) to [n * N, H * dv]"
    padded = users[0]  # one group: its reshaped output
    members = [padded]
    users = list(padded.users)
    if len(users) == 1 and is_call(users[0], torch.cat):
        padded = users[0]
        c = call(padded)
        if c.args is None or c.get("dim", 0) not in (0, -2) or not isinstance(c["tensors"], (list, tuple)):
            return "the groups' outputs are not concatenated along dim 0"
        members = list(c["tensors"])
        users = list(padded.users)
    if (len(users) != 1 or users[0].op != "call_function" or users[0].target is not operator.getitem
            or users[0].args[0] is not padded):
        return "the groups' outputs are not read back by one token index (padded[token_index])"
    out = users[0]
    token_index = out.args[1]
    index_value = val(token_index)
    if (not isinstance(token_index, fx.Node) or not isinstance(index_value, torch.Tensor) or index_value.ndim != 1
            or index_value.dtype not in (torch.int64, torch.int32)):
        return "the groups' outputs are not read back by a 1-D integer token index"
    for m in members:
        if not isinstance(m, fx.Node) or not is_call(m, torch.reshape, torch.Tensor.view) or len(shape(m) or ()) != 2:
            return "a group's output is not reshaped to [n * N, H * dv]"
    return out, token_index, members


def _group(final: Any) -> _Group | str:
    parsed = einsum(final)
    if parsed is None or len(parsed[3]) != 2:
        return "a group's output is not einsum(weights, v[index])"
    _, (a_s, vs), out, (attn, gathered_v) = parsed
    if len(set(a_s)) != 4 or len(a_s) != 4 or len(vs) != 4 or len(out) != 4:
        return f"output einsum {a_s},{vs}->{out} is not 'bhij,bjhd->bihd' (any letters)"
    b, h, i, j = a_s
    d = vs[3]
    if vs[:3] != b + j + h or d in a_s or out != b + i + h + d:
        return f"output einsum {a_s},{vs}->{out} is not 'bhij,bjhd->bihd' (any letters)"
    if (gathered := _gathered(gathered_v)) is None:
        return "a group's values are not v[index] with a 2-D index"
    v, index = gathered
    pad = _pad(index)
    if pad is None:
        return "the gather index is not pad_index.clamp(min=0)"
    weights = _weights(attn, pad)
    if isinstance(weights, str):
        return weights
    s, mask, n = weights
    steps = _mask(mask, pad)
    if isinstance(steps, str):
        return steps
    rab = None
    if (ops := binary(s, torch.add)) is not None:
        # the scores' side: the one whose factors hold the einsum (the scale may sit on it)
        s, rab = (ops[0], ops[1]) if any(einsum(f) is not None for f, _ in factors(ops[0])) else (ops[1], ops[0])
    scaled = scale_of(factors(s))
    if scaled is None or len(scaled[1]) != 1 or einsum(scaled[1][0]) is None:
        return "the scores are not alpha * einsum(q[index], k[index]) [+ bias]"
    alpha, (scores,) = scaled
    _, subs, sout, operands = einsum(scores)
    if len(subs) != 2 or any(len(x) != 4 for x in subs) or len(set(subs[0])) != 4:
        return f"scores einsum {','.join(subs)}->{sout} is not 'bihd,bjhd->bhij' (any letters)"
    (bb, ii, hh, dd), ks = subs
    jj = ks[1]
    if ks != bb + jj + hh + dd or jj in subs[0] or sout != bb + hh + ii + jj:
        return f"scores einsum {','.join(subs)}->{sout} is not 'bihd,bjhd->bhij' (any letters)"
    q_gather, k_gather = (_gathered(x) for x in operands)
    if q_gather is None or k_gather is None or q_gather[1] is not index or k_gather[1] is not index:
        return "scores are not over q[index] and k[index] with the values' gather index"
    bias = hstu.bias_tables(rab, steps, order=(0, 3, 1, 2), rank=2) if rab is not None else ((), None, None)
    if isinstance(bias, str):
        return bias
    tables, stamps, time_dtype = bias
    timestamps = None
    if stamps is not None:
        gathered = _gathered(stamps)
        if gathered is None or gathered[1] is not index or len(shape(gathered[0]) or ()) != 1:
            return "the time bias's timestamps are not timestamps[index] with the values' gather index"
        timestamps = gathered[0]
    return _Group(pad, q_gather[0], k_gather[0], v, alpha, n, tables, timestamps, time_dtype)


def _weights(attn: Any, pad: fx.Node) -> tuple[Any, Any, int | None] | str:
    """(the scores with their bias, the mask factor, N of hstu mode's 1/N or None for softmax)
    for ``silu(x) / N * mask`` or ``softmax(x.masked_fill(~(mask.bool() | eye(N)).unsqueeze(1),
    -inf), -1) * mask`` (the example's softmax mode: padding rows see their diagonal, then
    are zeroed; a valid row's visible keys are exactly the mask's)."""
    weighted = silu_weights(attn)
    if not isinstance(weighted, str):
        inv_n, silu, others = weighted
        if len(others) != 1:
            return f"{len(others)} tensor factors besides silu(scores); one mask is lowered"
        n_float = 1.0 / inv_n if inv_n else 0.0
        n = round(n_float)
        if n < 1 or abs(n - n_float) > 1e-9 * n:
            return f"silu(scores) is scaled by {inv_n:.6g}, not 1/N for an integer N"
        return call(silu)["input"], others[0], n
    scaled = scale_of(factors(attn))
    probs = [t for t in (scaled[1] if scaled else ()) if is_call(t, *SOFTMAX)]
    if not probs:
        return weighted
    reason = ("softmax weights not recognised: this form's are softmax(x.masked_fill(~(mask.bool() | eye(N))"
              ".unsqueeze(1), -inf), -1) * mask.unsqueeze(1)")
    if scaled[0] != 1.0 or len(scaled[1]) != 2 or len(probs) != 1:
        return reason
    (sm,), mask = probs, next(t for t in scaled[1] if t is not probs[0])
    c = call(sm)
    if c.args is None or c.get("dim") not in (-1, 3) or c.get("dtype") is not None:
        return reason
    filled = call(c["input"])
    if filled is None or filled.fn is not torch.masked_fill or filled.args is None or filled["value"] != float("-inf"):
        return reason
    hidden = call(filled["mask"])
    if hidden is None or hidden.fn is not torch.bitwise_not or hidden.args is None:
        return reason
    unsqueezed = hstu.unsqueezed(hidden["input"])
    if unsqueezed is None or unsqueezed[1] != 1 or (ops := binary(unsqueezed[0], torch.bitwise_or)) is None:
        return reason
    mask_source = call(mask)
    if mask_source is None or mask_source.fn is not torch.unsqueeze or mask_source.args is None:
        return reason
    eye = [x for x in ops if is_call(x, torch.eye)]
    seen = [uncast(x)[0] for x in ops if x not in eye]
    if len(eye) != 1 or len(seen) != 1 or seen[0] is not uncast(mask_source["input"])[0] or not _is_eye(eye[0], pad):
        return reason
    return filled["input"], mask, None


def _is_eye(node: fx.Node, pad: fx.Node) -> bool:
    """eye(N) with N = pad.shape[1], boolean."""
    c = call(node)
    value = val(node)
    return (len(c.raw) == 1 and isinstance(value, torch.Tensor) and value.dtype == torch.bool
            and same(val(c.raw[0]), shape(pad)[1]))


def _pad(index: fx.Node) -> fx.Node | None:
    """pad when index = pad.clamp(min=0)."""
    clamp = hstu.clamp_of(index)
    if clamp is None or clamp[1] != 0 or clamp[2] is not None:
        return None
    return clamp[0]


def _mask(node: Any, pad: fx.Node) -> fx.Node | str:
    """steps when node = (valid_i & valid_j & (steps_i - steps_j >= 0)).unsqueeze(1), cast,
    with valid = pad >= 0 and steps = arange(pad.shape[1])."""
    reason = ("mask not recognised: this form's mask is (valid_i & valid_j & (steps_i - steps_j >= 0)), "
              "valid = pad_index >= 0, steps = arange(N), unsqueezed at dim 1")
    c = call(node)
    if c is None or c.fn is not torch.unsqueeze or c.args is None or c["dim"] != 1:
        return reason
    terms, stack = [], [uncast(c["input"])[0]]
    while stack:
        x = stack.pop()
        if (ops := binary(x, torch.bitwise_and, torch.logical_and)) is not None:
            stack.extend(ops)
        else:
            terms.append(x)
    if len(terms) != 3:
        return reason
    valid_dims, steps = set(), None
    for term in terms:
        if (unsqueezed := hstu.unsqueezed(term)) is not None:
            source, dim = unsqueezed
            if (cmp := binary(source, torch.ge)) is None or cmp[0] is not pad or cmp[1] != 0:
                return reason
            valid_dims.add(dim)
        elif (cmp := binary(term, torch.ge)) is not None and cmp[1] == 0:
            pair = hstu.pair_of(cmp[0], torch.sub)
            if pair is None or not pair.query_first:
                return reason
            steps = pair.source
    if valid_dims != {1, 2} or steps is None:
        return reason
    a = call(steps)
    if (a is None or a.fn is not torch.arange or len(a.raw) != 1 or set(a.kwargs) - {"device", "dtype"}
            or not same(val(a.raw[0]), shape(pad)[1])):
        return reason + f" (steps are not arange({shape(pad)[1]}))"
    return steps


def _offsets(e: Emitter, pads: tuple[fx.Node, ...], token_index: fx.Node, q: fx.Node, n: int,
             check: bool) -> fx.Node:
    """offsets [rows + 1] from the groups' rows, and (optionally) the run-time check of the
    layout that assumes (module docstring)."""
    t = e.dim(q, 0)
    device = val(q).device
    starts, flats, oks = [], [], []
    for pad in pads:
        valid = e(torch.ge, pad, 0)
        lengths = e(torch.sum, valid, 1)
        first = e(torch.select, pad, 1, 0)
        starts.append(e(torch.where, e(torch.gt, lengths, 0), first, t))
        if check:
            steps = e(torch.arange, e.dim(pad, 1), dtype=torch.int64, device=device)
            prefix = e(torch.eq, valid, e(torch.lt, e(torch.unsqueeze, steps, 0), e(torch.unsqueeze, lengths, 1)))
            run = e(torch.logical_or, e(torch.logical_not, valid),
                    e(torch.eq, e(torch.sub, pad, steps), e(torch.unsqueeze, first, 1)))
            oks += [e(torch.all, prefix), e(torch.all, run), e(torch.all, e(torch.le, lengths, n))]
            flats.append(e(torch.reshape, pad, (-1,)))
    start = e(torch.cat, tuple(starts)) if len(starts) > 1 else starts[0]
    start = e(operator.getitem, e(torch.sort, start), 0)
    offsets = e(torch.cat, (start, e(torch.full, (1,), t, dtype=torch.int64, device=device)))
    if check:
        flat = e(torch.cat, tuple(flats)) if len(flats) > 1 else flats[0]
        tokens = e(torch.arange, t, dtype=torch.int64, device=device)
        oks.append(e(torch.all, e(torch.eq, e(operator.getitem, flat, token_index), tokens)))
        oks.append(e(torch.eq, e(torch.sum, e(torch.ge, flat, 0)), t))
        ok = oks[0]
        for other in oks[1:]:
            ok = e(torch.logical_and, ok, other)
        e(torch._assert_async, ok,
          "lower-attention: the HSTU example's per-sequence attention (gathered [n, N] groups) was lowered to the "
          "jagged kernel assuming each group row holds one sequence's tokens, consecutive and in order, valid "
          f"entries first, at most N={n} of them, every token in exactly one row, and token_index reading every "
          f"token back from its own row and step; this batch breaks that. {OFF_SWITCH}")
    return offsets
