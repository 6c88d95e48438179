"""HSTU SiLU attention on jagged q, k, v padded by fbgemm (generative-recommenders' PyTorch form).

q, k, v are jagged ``[L, H, D]`` with ``offsets [B+1]``; each is padded to ``[B, H, N, D]``::

    p = fbgemm.jagged_to_padded_dense(x.view(L, H * D), [offsets], [N], pad)
    p = p.view(B, N, H, D).transpose(1, 2)            # or .permute(0, 2, 1, 3)
    a = silu(alpha * einsum("bhxa,bhya->bhxy", pq, pk)) / N [* mask]   # or pq @ pk.transpose(-2, -1)
    o = einsum("bhxd,bhdv->bhxv", a, pv)               # or a @ pv
    out = fbgemm.dense_to_jagged(o.transpose(1, 2).flatten(2, 3), [offsets], L)[0]

(any einsum letters, or ``@``/``matmul``/``bmm`` with k transposed; ``view``/``reshape``/
``flatten`` for the reshapes). The mask, broadcast over batch and heads (``unsqueeze``,
``[None]``, ``expand``) and cast at will, is one of

- constant causal: ``tril(ones(N, N))`` (or ``~triu(ones(N, N), 1)``), or ``r[:, None] >=
  r[None, :]`` for an increasing ``r = arange(...)`` of N values;
- generative-recommenders' targets mask, proved from the graph: ``eye(N) | (dist > 0)``
  [``& (dist <= W)``] with ``dist = ids[:, :, None] - ids[:, None, :]``, ``ids =
  clamp(arange(N)[None, :], max=(lengths [- num_targets])[:, None])`` and ``lengths =
  offsets[1:] - offsets[:-1]`` (or ``diff(offsets)``) of the padding's offsets: the kernel's
  ids capped at E = length - num_targets (targets see the history and themselves), its
  window ``max_attn_len = W``;
- none: full (non-causal) attention, lowered only when k or v is padded with zeros (then
  the padded keys add silu(0) = 0 or zero values, as in the jagged op).

Lowered to hstu mode **without the padding round trip**: the jagged op takes the padded
op's inputs (x viewed back to ``[L, H, D]``), ``offsets``, ``max_seq_len = N`` (the divisor,
which must equal the padded length), alpha, causal, ``num_targets``, ``max_attn_len``; its
output replaces the ``dense_to_jagged`` values. Padded query rows, which ``dense_to_jagged``
drops, are never computed, and under the causal masks no real query sees a padded key, so
the pad value does not matter. ``jagged_to_padded_dense`` truncates a sequence longer than
N, the jagged op would not: with ``check_preconditions`` a run-time check asserts that the
offsets rise from 0 to L with every length at most N, and (targets) that 0 <= num_targets
<= length, the kernel's precondition.

Unlike the HSTU example's form, this one is kept off CUDA like dense attention (a
``uniform`` lowering; ``dense_on_cpu=true`` lowers it anyway): the padded graph's product is
already per sequence (N x N), so the jagged op saves only the padding, and its PyTorch
implementation took 2.1x Inductor's training step at B=16, N=100, 18% padding
(``python -m bench attention-cpu --family hstu-padded --lengths 100``,
results/attention-cpu-padding.json).

Declined, each with its reason: contextual-prefix masks and other masks built from the
offsets, other masks, a divisor other than the padded length, q, k, v padded with
different offsets or lengths, work between the padded op and the ``[B, H, N, D]`` layout,
an output used other than through ``dense_to_jagged``, ``dense_to_jagged`` without
``total_L``, non-int64 offsets.
"""

from __future__ import annotations

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
    function,
    is_call,
    same,
    same_shape,
    scalar,
    scale_of,
    shape,
    silu_weights,
    uncast,
    untransposed,
    val,
)
from fsc.passes.attention.lowering import OFF_SWITCH, Emitter, Family, Lowering, Settings, check_tensors
from fsc.passes.attention.masks import is_causal
from fsc.passes.attention.softmax import MATMUL, weights

_VIEWS = (torch.Tensor.view, torch.reshape, torch.Tensor.reshape, torch.flatten, torch.Tensor.flatten)
_SWAPS = (torch.transpose, torch.permute, torch.Tensor.permute)


def _fbgemm(node: Any, name: str) -> bool:
    """Whether ``node`` calls ``torch.ops.fbgemm.<name>`` (read without importing fbgemm)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = getattr(node.target, "overloadpacket", node.target)
    return getattr(target, "_qualified_op_name", None) == f"fbgemm::{name}"


def anchors(node: fx.Node) -> bool:
    """A product whose weights come from a SiLU and whose values come from
    ``jagged_to_padded_dense`` (through views and transposes)."""
    left = weights(node)
    if left is None or not attention_weights(left, F.silu):
        return False
    v = _values_operand(node)
    for _ in range(4):
        if _fbgemm(v, "jagged_to_padded_dense"):
            return True
        if function(v) not in (*_VIEWS, *_SWAPS, torch.Tensor.contiguous) or not v.args:
            return False
        v = v.args[0]
    return False


def match(node: fx.Node, settings: Settings) -> Lowering | str:
    attn, pv = weights(node), _values_operand(node)
    scores_of = _scores_layout(node)
    if isinstance(scores_of, str):
        return scores_of
    weighted = silu_weights(attn)
    if isinstance(weighted, str):
        return weighted
    inv_n, silu, masks = weighted
    if len(masks) > 1:
        return f"{len(masks)} tensor factors besides silu(scores); one mask is lowered"
    s = scale_of(factors(call(silu)["input"]))
    if s is None or len(s[1]) != 1:
        return "silu input is not alpha * (q k^T)"
    alpha, (scores,) = s
    qk = scores_of(scores)
    if isinstance(qk, str):
        return qk
    padded = [_padded(x, name) for x, name in ((qk[0], "q"), (qk[1], "k"), (pv, "v"))]
    if problem := next((p for p in padded if isinstance(p, str)), None):
        return problem
    (q, offsets, n, _), (k, k_offsets, kn, k_pad), (v, v_offsets, vn, v_pad) = padded
    if not (offsets is k_offsets is v_offsets):
        return "q, k and v are padded with different offsets"
    if not all(isinstance(x, int) for x in (n, kn, vn)):
        return f"jagged_to_padded_dense's max lengths {n}, {kn}, {vn} are not static ints; the kernel's max_seq_len is"
    if not n == kn == vn:
        return f"q, k and v are padded to different lengths ({n}, {kn}, {vn})"
    if not (same(shape(q)[0], shape(k)[0]) and same(shape(q)[0], shape(v)[0])):
        return f"q, k, v have different token counts {fmt(shape(q))}, {fmt(shape(k))}, {fmt(shape(v))}"
    n_float = 1.0 / inv_n if inv_n else 0.0
    if abs(n_float - n) > 1e-9 * n:
        return (f"silu(scores) is scaled by {inv_n:.6g}, not 1/N for jagged_to_padded_dense's max length N={n} "
                "(the jagged op divides by max_seq_len)")
    targets = lengths = None
    window = 0
    if masks:
        causal = _causal(masks[0], n)
        if causal is None and (found_targets := _targets(masks[0], n, offsets)) is not None:
            targets, lengths, window = found_targets
            mdims = shape(masks[0])
            # its [B, N, N] must meet the weights' batch dim, not their heads (a 3-D mask would)
            if len(mdims) != 4 or not same(mdims[0], shape(node)[0]) or not same(mdims[1], 1):
                return (f"the targets mask {fmt(mdims)} does not broadcast as [B, 1, N, N] over the [B, H, N, N] "
                        "weights")
            causal = ("ids capped at length - num_targets: targets see the history and themselves" if targets
                      else "ids capped at the length") + (f", window max_attn_len={window}" if window else "")
        if causal is None:
            return _mask_reason(masks[0], offsets)
        how = f"causal ({causal})"
    elif k_pad == 0.0 or v_pad == 0.0:
        causal, how = None, "full (no mask; padded keys add silu(0) = 0 or zero values)"
    else:
        return (f"no mask, and k and v are padded with {k_pad!r}, {v_pad!r}: padded keys would add to every "
                "row, which the jagged op does not compute")
    if problem := check_tensors(q, k, v, settings):
        return problem
    out = _jagged_output(node, offsets, q)
    if isinstance(out, str):
        return out
    if val(offsets).dtype != torch.int64:
        return f"offsets are {val(offsets).dtype}; the kernel takes int64"
    found = (f"HSTU SiLU attention padded by fbgemm, q [L, H, D]={fmt(shape(q))}, alpha={alpha:.4g}, /N={n}, {how} "
             "(jagged, no padding round trip)")
    check = settings.check_preconditions
    heads, dv = shape(v)[1], shape(v)[2]

    def emit(e: Emitter) -> fx.Node:
        if check:
            _check_offsets(e, offsets, q, n, targets, lengths)
        res = e(torch.ops.fsc.jagged_attention_fwd.default, q, k, v, offsets, targets, None, None, None, n, False,
                alpha, causal is not None, 0, window, "auto")
        return e(torch.reshape, e(operator.getitem, res, 0), (e.dim(q, 0), heads * dv))

    # the padded product is per sequence (B x N x N), so the op does about the graph's work: kept off
    # CUDA like dense attention (on CPU lowered it took 2.1x Inductor's step at N=100, 18% padding:
    # python -m bench attention-cpu --family hstu-padded --lengths 100)
    return Lowering(out, found, emit, uniform=True, device=val(q).device)


FAMILY = Family("hstu-padded", anchors, match)


def _values_operand(node: fx.Node) -> Any:
    if (parsed := einsum(node)) is not None:
        return parsed[3][1] if len(parsed[3]) == 2 else None
    c = call(node)
    return c.get("other" if c.fn is torch.matmul else "mat2")


def _scores_layout(final: fx.Node) -> Any:
    """A reader of the scores node into (padded q, padded k) for this product, or why the
    product is not ``[B, H, N, N] x [B, H, N, V]``."""
    if (parsed := einsum(final)) is not None:
        a_s, vs = parsed[1]
        if len(a_s) != 4 or len(vs) != 4 or len(set(a_s)) != 4 or len(set(vs)) != 4:
            return f"output einsum {parsed[0]} is not over [B, H, N, N] weights and [B, H, N, V] values"
        b, h, x, y = a_s
        if vs[:3] != b + h + y or vs[3] in a_s or parsed[2] != b + h + x + vs[3]:
            return f"output einsum {parsed[0]} is not 'bhxy,bhyv->bhxv' (any letters)"
    elif len(shape(final) or ()) != 4:
        return f"output product on {fmt(shape(final) or ())} is not over [B, H, N, *]"

    def scores(node: Any) -> tuple[Any, Any] | str:
        if (parsed := einsum(node)) is not None and len(parsed[3]) == 2:
            qs, ks = parsed[1]
            if len(qs) != 4 or len(set(qs)) != 4 or len(ks) != 4:
                return f"scores einsum {parsed[0]} is not over [B, H, N, D] q and k"
            b, h, x, d = qs
            if ks[:2] != b + h or ks[3] != d or ks[2] in qs or parsed[2] != b + h + x + ks[2]:
                return f"scores einsum {parsed[0]} is not 'bhxd,bhyd->bhxy' (any letters)"
            return parsed[3][0], parsed[3][1]
        if is_call(node, *MATMUL):
            c = call(node)
            k = untransposed(c.get("other" if c.fn is torch.matmul else "mat2"))
            if k is None:
                return "the scores' right operand is not k transposed in its last two dims"
            return c["input"], k
        return "silu input is not alpha * (q k^T) through einsum, matmul or bmm"

    return scores


def _padded(node: Any, name: str) -> tuple[fx.Node, fx.Node, Any, Any] | str:
    """(jagged x [L, H, D], offsets, N, pad value) for node = jagged_to_padded_dense(x.view(L,
    H * D), [offsets], [N], pad).view(B, N, H, D).transpose(1, 2)."""
    dims = shape(node)
    c = call(node)
    if dims is None or len(dims) != 4 or c is None:
        return f"{name} is not a [B, H, N, D] tensor"
    swapped = c.args is not None and (
        (c.fn is torch.transpose and {c["dim0"] % 4, c["dim1"] % 4} == {1, 2})
        or (c.fn in (torch.permute, torch.Tensor.permute) and tuple(d % 4 for d in c["dims"]) == (0, 2, 1, 3)))
    if not swapped:
        return f"padded {name} is not [B, N, H, D].transpose(1, 2) (or permute(0, 2, 1, 3))"
    split = c["input"]
    padded = split.args[0] if function(split) in _VIEWS and split.args else None
    if not _fbgemm(padded, "jagged_to_padded_dense"):
        return f"{name}'s [B, N, H, D] is not a view of fbgemm.jagged_to_padded_dense's output"
    b, n, h, d = shape(split)
    pshape = shape(padded)
    if len(pshape) != 3 or not (same(pshape[0], b) and same(pshape[1], n)) or pshape[2] != h * d:
        return f"{name}: {fmt(pshape)} is not viewed as [B, N, H, D]={fmt((b, n, h, d))}"
    p = call(padded)
    if p.args is None or len(p["offsets"]) != 1 or len(p["max_lengths"]) != 1:
        return f"{name} is padded over {len(p.get('offsets') or ())} jagged dims; one is lowered"
    values, offsets, length = p["values"], p["offsets"][0], p["max_lengths"][0]
    if not (isinstance(offsets, fx.Node) and same(length, n)):
        return f"{name} is padded to {length}, not to its [B, N, H, D] view's N={n}"
    jagged = values.args[0] if function(values) in _VIEWS and values.args else None
    if jagged is None or not same_shape(shape(jagged), (shape(values)[0], h, d)):
        return f"{name}'s jagged values {fmt(shape(values))} are not a view of a [L, H, D]=[L, {h}, {d}] tensor"
    return jagged, offsets, length, scalar(p["padding_value"])


def _jagged_output(final: fx.Node, offsets: fx.Node, q: fx.Node) -> fx.Node | str:
    """The values node of ``dense_to_jagged(final.transpose(1, 2).flatten(2, 3), [offsets],
    L)[0]``, the only use of ``final``."""
    chain = [final]
    for what in ("transposed to [B, N, H, V]", "flattened to [B, N, H*V]", "made jagged by fbgemm.dense_to_jagged"):
        users = list(chain[-1].users)
        if len(users) != 1 or users[0].op == "output":
            used = ", ".join("the graph's output" if u.op == "output" else u.name for u in users) or "nothing"
            return (f"the padded attention output is not only {what} ({chain[-1].name} is used by {used}): the "
                    "lowering replaces the jagged values alone")
        chain.append(users[0])
    _, swap, flat, jag = chain
    sc = call(swap)
    if not (sc is not None and sc.args is not None and ((sc.fn is torch.transpose and {sc["dim0"] % 4, sc["dim1"] % 4} == {1, 2}) or (
            sc.fn in (torch.permute, torch.Tensor.permute) and tuple(d % 4 for d in sc["dims"]) == (0, 2, 1, 3)))):
        return "the padded attention output is not transposed back to [B, N, H, V]"
    b, n, h, dv = shape(swap)
    fdims = shape(flat)
    if function(flat) not in _VIEWS or fdims is None or len(fdims) != 3 or fdims[2] != h * dv:
        return f"the [B, N, H, V] output is not flattened to [B, N, H*V] but {function(flat)} {fmt(fdims or ())}"
    if not _fbgemm(jag, "dense_to_jagged") or call(jag).args is None:
        return "the padded attention output does not go to fbgemm.dense_to_jagged"
    jc = call(jag)
    if jc["dense"] is not flat or list(jc["x_offsets"]) != [offsets]:
        return "dense_to_jagged takes other offsets than the padding did"
    if jc.get("total_L") is None:
        return "dense_to_jagged without total_L: its output length is data-dependent"
    outs = list(jag.users)
    if len(outs) != 1 or outs[0].target is not operator.getitem or outs[0].args[1] != 0:
        return "dense_to_jagged's offsets output is used (only its values are lowered)"
    if not same(shape(outs[0])[0], shape(q)[0]):
        return f"dense_to_jagged makes {shape(outs[0])[0]} rows, q has {shape(q)[0]}"
    return outs[0]


def _broadcast_source(node: Any) -> Any:
    """``node`` without dtype casts and leading broadcast dims over ``[..., N, N]``."""
    while True:
        node = uncast(node)[0]
        dims, c = shape(node), call(node)
        if c is None or dims is None or not node.args or not isinstance(node.args[0], fx.Node):
            return node
        src = node.args[0]
        sdims = shape(src)
        if sdims is None or len(sdims) < 2 or tuple(dims[-2:]) != tuple(sdims[-2:]):
            return node
        keeps = (
            c.fn in (torch.unsqueeze, torch.Tensor.expand, torch.Tensor.expand_as)
            or (c.fn in (*_VIEWS, operator.getitem) and len(sdims) == 2 and all(s == 1 for s in dims[:-2])))
        if not keeps:
            return node
        node = src


def _causal(mask: Any, n: int) -> str | None:
    """How the mask was proved causal over ``[N, N]`` (visible where key <= query); None: it was not."""
    m = _broadcast_source(mask)
    if is_causal(m, (n, n), "kept"):
        return "tril(ones(N, N))"
    return _index_comparison(m, n)


def _mask_reason(mask: Any, offsets: fx.Node) -> str:
    if _depends_on(mask, offsets):
        return ("mask built from the offsets (sequence lengths, num_targets, a window or a contextual prefix) not "
                "recognised: proved are eye(N) | (dist > 0) [& (dist <= W)], dist = ids[:, :, None] - ids[:, None, :] "
                "with ids = clamp(arange(N), max=lengths [- num_targets]) and lengths = offsets[1:] - offsets[:-1]; "
                "contextual prefixes and other masks are not")
    return (f"mask {fmt(shape(mask) or ())} not recognised: lowered are tril(ones(N, N)) and r[:, None] >= "
            "r[None, :] for r = arange of N increasing values, cast and broadcast over batch and heads")


def _index_comparison(m: Any, n: int) -> str | None:
    """Proof text when m = r_query >= r_key over a row and a column view of one arange."""
    c = call(m)
    if c is None or c.args is None or c.fn not in (torch.ge, torch.le):
        return None
    a, b = (c["input"], c["other"]) if c.fn is torch.ge else (c["other"], c["input"])
    rows, cols = _grid(a, n, 0), _grid(b, n, 1)
    if rows is None or cols is None or not (rows is cols or _same_arange(rows, cols)):
        return None
    return "arange(N)[:, None] >= arange(N)[None, :]"


def _grid(node: Any, n: int, axis: int) -> fx.Node | None:
    """The increasing ``arange`` of N values that ``node`` lays along ``axis`` (0: rows,
    ``[N, 1]``; 1: columns, ``[1, N]``), after leading size-1 dims."""
    dims = shape(node)
    if dims is None or len(dims) < 2 or any(s != 1 for s in dims[:-2]):
        return None
    want = (n, 1) if axis == 0 else (1, n)
    if tuple(dims[-2:]) != want or function(node) not in (torch.unsqueeze, *_VIEWS, operator.getitem):
        return None
    src = node.args[0]
    c = call(src)
    if shape(src) != (n,) or c is None or c.fn is not torch.arange or c.args is None:
        return None
    step = c.get("step", 1)
    return src if isinstance(step, (int, float)) and step > 0 else None


def _same_arange(a: fx.Node, b: fx.Node) -> bool:
    return dict(call(a).args) == dict(call(b).args)


def _depends_on(node: Any, source: fx.Node, hops: int = 40) -> bool:
    seen, stack = set(), [node]
    while stack and len(seen) < hops:
        x = stack.pop()
        if not isinstance(x, fx.Node) or x in seen:
            continue
        if x is source:
            return True
        seen.add(x)
        stack.extend(x.all_input_nodes)
    return False


def _check_offsets(e: Emitter, offsets: fx.Node, q: fx.Node, n: int, targets: fx.Node | None,
                   lengths: fx.Node | None) -> None:
    """Run-time check: offsets rise from 0 to L and every length is at most N (what the
    padding kept; jagged_to_padded_dense truncates a longer sequence, the jagged op would
    not); with targets, 0 <= num_targets <= length (the kernel's precondition; the mask's
    capped ids mean something else outside it)."""
    count = e.dim(offsets, 0)
    total = e.dim(q, 0)
    # each offset against the one before it, rolled rather than sliced (a slice of a
    # dynamic length makes Dynamo guard on it); entry 0 pairs the first with the last
    steps = e(operator.sub, offsets, e(torch.roll, offsets, 1))
    first = e(torch.eq, e(torch.arange, count, device=val(offsets).device), 0)
    minus_total = -total if isinstance(total, int) else e(operator.neg, total)
    each = e(torch.where, first, e(torch.eq, steps, minus_total),
             e(torch.logical_and, e(torch.ge, steps, 0), e(torch.le, steps, n)))
    ok = e(torch.logical_and, e(torch.all, each), e(torch.eq, e(torch.amin, offsets), 0))
    if targets is not None:
        in_range = e(torch.logical_and, e(torch.ge, targets, 0), e(torch.le, targets, lengths))
        e(torch._assert_async, e(torch.all, in_range),
          "lower-attention: the padded HSTU attention's targets mask was lowered to the jagged kernel's num_targets, "
          f"which is exact only while 0 <= num_targets[b] <= the length of sequence b; this batch breaks that. "
          f"{OFF_SWITCH}")
    e(torch._assert_async, ok,
      f"lower-attention: the padded HSTU attention was lowered to the jagged kernel, which is exact only while "
      f"every sequence length offsets[b+1] - offsets[b] is at most jagged_to_padded_dense's max length N={n} (it "
      f"truncates longer sequences, the kernel does not) and the offsets rise from 0 to L; this batch breaks "
      f"that. {OFF_SWITCH}")


def _targets(mask: Any, n: int, offsets: fx.Node) -> tuple[fx.Node | None, fx.Node, int] | None:
    """(num_targets or None, lengths, window or 0) when the mask is ``eye(N) | (dist > 0)
    [& (dist <= W)]``, ``dist = ids[:, :, None] - ids[:, None, :]``, with ``ids =
    clamp(arange(N)[None, :], max=(lengths [- num_targets])[:, None])`` and ``lengths =
    offsets[1:] - offsets[:-1]``: the kernel's mask ids capped at E = length - num_targets
    (padded keys get id E, which no real query sees past, so they stay hidden), its window
    ``max_attn_len = W``."""
    m, window, windowed = _broadcast_source(mask), 0, None
    if (both := binary(m, torch.bitwise_and, torch.logical_and)) is not None:
        for cmp, rest in (both, both[::-1]):
            if (le := binary(uncast(cmp)[0], torch.le)) is not None and isinstance(le[1], int) and le[1] > 0:
                windowed, window, m = le[0], le[1], _broadcast_source(rest)
                break
        else:
            return None
    ops = binary(m, torch.bitwise_or, torch.logical_or)
    if ops is None:
        return None
    eye, rest = ops if _is_eye(ops[0], n) else (ops[1], ops[0])
    if not _is_eye(eye, n):
        return None
    rest = uncast(rest)[0]
    if (gt := binary(rest, torch.gt)) is not None and scalar(gt[1]) == 0:
        dist = gt[0]
    elif (lt := binary(rest, torch.lt)) is not None and scalar(lt[0]) == 0:
        dist = lt[1]
    else:
        return None
    if (rc := binary(dist, torch.sub)) is None or windowed not in (None, dist):
        return None
    ids = _inserted(rc[0], -1)
    if ids is None or _inserted(rc[1], -2) is not ids or len(shape(ids) or ()) != 2:
        return None
    c = call(ids)
    if c is None or c.args is None:
        return None
    if c.fn in (torch.clamp, torch.clip) and c.get("min") is None:
        pos, cap = c["input"], c.get("max")
    elif c.fn is torch.clamp_max:
        pos, cap = c["input"], c.get("max")
    elif c.fn is torch.minimum:
        pos, cap = (c["input"], c["other"]) if _positions(c["input"], n) else (c["other"], c["input"])
    else:
        return None
    if not _positions(pos, n) or (cap := _inserted(cap, -1)) is None:
        return None
    targets = None
    if (diff := binary(cap, torch.sub)) is not None and _lengths(diff[0], offsets):
        cap, targets = diff
        tv = val(targets)
        if not isinstance(tv, torch.Tensor) or tv.dim() != 1 or tv.dtype not in (torch.int32, torch.int64):
            return None
    return (targets, cap, window) if _lengths(cap, offsets) else None


def _is_eye(node: Any, n: int) -> bool:
    m = _broadcast_source(node)
    return is_call(m, torch.eye) and shape(m) == (n, n)


def _positions(node: Any, n: int) -> bool:
    """Whether node is ``arange(N)`` (0, 1, ..., N-1), 1-D or as a row ``[1, N]``."""
    node = _inserted(node, -2) or node
    c = call(node)
    return (c is not None and c.fn is torch.arange and c.args is not None and shape(node) == (n,)
            and c.get("start", 0) == 0 and c.get("step", 1) == 1)


def _lengths(node: Any, offsets: fx.Node) -> bool:
    """Whether node is ``offsets[1:] - offsets[:-1]`` or ``torch.diff(offsets)``."""
    c = call(node)
    if c is not None and c.fn is torch.diff and c.args is not None:
        return c["input"] is offsets and c.get("n", 1) == 1 and c.get("dim", -1) in (0, -1)
    ops = binary(node, torch.sub)
    return ops is not None and _sliced(ops[0], offsets, slice(1, None)) and _sliced(ops[1], offsets, slice(None, -1))


def _sliced(node: Any, source: fx.Node, index: slice) -> bool:
    return (isinstance(node, fx.Node) and node.target is operator.getitem and node.args[0] is source
            and node.args[1] == index)


def _inserted(node: Any, at: int) -> fx.Node | None:
    """The source when ``node`` is it with one size-1 dim inserted at ``at`` (counted from
    the end; ``unsqueeze``, ``view``/``reshape``, ``[:, None]``): the same values."""
    if function(node) not in (torch.unsqueeze, torch.Tensor.view, torch.reshape, torch.Tensor.reshape,
                              operator.getitem) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if not all(i is None or i == slice(None) or i is Ellipsis for i in index):
            return None
    src = node.args[0]
    dims, sdims = shape(node), shape(src)
    if dims is None or sdims is None or len(dims) != len(sdims) + 1:
        return None
    p = at % len(dims)
    if same(dims[p], 1) and all(same(a, b) for a, b in zip(dims[:p] + dims[p + 1:], sdims)):
        return src
    return None
