"""Explicit softmax attention: ``softmax(c * (q @ kᵀ) [masks], -1) [dropout] @ v``.

q, k, v are ``[B, H, N, D]`` or ``[B*H, N, D]``; the products are ``matmul``, ``@`` or
``bmm``; kᵀ is ``transpose(-2, -1)`` or ``mT``; c comes from scalar ``*`` and ``/``. The
masks, one or two, in any order: ``masked_fill(mask, fill)`` with fill -inf or a finite fill
<= -1e4 (see ``attend``), and additive ``scores + mask``; each mask the causal one
(``~tril(ones(N, N))``, ``triu(ones(N, N), 1)``, additive ``triu(full((N, N), -inf), 1)``),
a key-padding mask (``pad[:, None, None, :] == 0``, as BERT4Rec writes it: one row per
sequence; additive: built with 0 / -inf), or the two combined (``causal | pad``, ``causal +
pad``), see :mod:`~fsc.passes.attention.masks`. With a key-padding mask, rows that see no key
get eager's value: NaN with -inf fills, the mean of v when every mask has one finite fill;
other mixes of fills are declined. Dropout on the probabilities is stripped where it is the
identity (p = 0, or ``training=False``) and declined otherwise: the kernel has no dropout.
"""

from __future__ import annotations

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
    is_call,
    same,
    scalar,
    scale_of,
    shape,
    uncast,
    untransposed,
    upstream,
    val,
)
from fsc.passes.attention.lowering import Family, Lowering, Settings, dense_lowering
from fsc.passes.attention.masks import KeyPadding, causal_and_padding, mask_kind

SOFTMAX = (torch.softmax, F.softmax)
MATMUL = (torch.matmul, torch.bmm)
DROPOUT = (F.dropout, torch.dropout)
# Finite fills the causal mask may use (-1e4 is the usual fp16-safe one, -1e9 and
# finfo.min the others): scores would have to come within 104 of them for the masked
# weights not to be exact zeros, which the lowering checks at run time.
MAX_FILL = -1e4


def without_dropout(node: Any) -> tuple[Any, str | None]:
    """(what a dropout call drops out, None) where the dropout is the identity; (node, why
    not) where it is not; (node, None) where ``node`` is no dropout."""
    c = call(node)
    if c is None or c.fn not in DROPOUT or c.args is None:
        return node, None
    p, training = c.get("p", 0.5), c.get("train", c.get("training", True))
    if p == 0 or training is False:
        return c.args["input"], None
    return node, f"dropout(p={p}) on the attention probabilities: the kernel has no dropout"


def anchors(node: fx.Node) -> bool:
    """A product whose left operand comes from a softmax (through elementwise work)."""
    left = weights(node)
    return left is not None and attention_weights(left, *SOFTMAX)


def weights(node: fx.Node) -> Any:
    """The attention-weights operand of a matmul, bmm or two-operand einsum."""
    if is_call(node, *MATMUL):
        return call(node).get("input")
    if (parsed := einsum(node)) is not None and len(parsed[3]) == 2:
        return parsed[3][0]
    return None


def match(node: fx.Node, settings: Settings) -> Lowering | str:
    c = call(node)
    if c.fn is torch.einsum:
        return "softmax attention through einsum: only matmul, @ and bmm products are lowered"
    p, v = c.args["input"], c.args["other" if c.fn is torch.matmul else "mat2"]
    p, why = without_dropout(uncast(p)[0])
    if why:
        return why
    sm = call(uncast(p)[0])
    if sm.fn not in SOFTMAX:
        between = ", ".join(_name(n) for n in _after_softmax(p))
        return f"softmax(...) @ v with work between the softmax and the product ({between}) the kernel does not do"
    args = sm.args or {}
    x = args.get("input")
    rank = len(shape(x) or ())
    if args.get("dim") not in (-1, rank - 1) or args.get("dtype") is not None:
        return "softmax not over the last dim"
    masks = _masks(x)
    if isinstance(masks, str):
        return masks
    x, causal, padding, fills = masks
    finite = [f for f in fills if f != float("-inf")]
    empty = "nan" if not finite else "mean"
    if padding is not None and finite and (len(finite) != len(fills) or len(set(finite)) > 1):
        return (f"masks filled with {sorted(set(fills))}: with a key-padding mask the fills must be one value (on "
                "rows that see no key, eager's softmax then averages v; with several, what it gives depends on "
                "which mask hides which key)")
    scaled = scale_of(factors(x))
    if scaled is None or len(scaled[1]) != 1 or not is_call(scaled[1][0], *MATMUL):
        return "softmax input is not c * (q @ k^T)"
    scale, (scores,) = scaled
    sc = call(scores)
    q, kt = sc["input"], sc["other" if sc.fn is torch.matmul else "mat2"]
    k = untransposed(kt)
    if k is None:
        return "the scores' right operand is not k transposed in its last two dims"
    return dense_lowering(node, q, k, v, causal, scale, "softmax(q @ k^T) @ v", settings,
                          fill=max(finite) if finite else None, padding=padding, empty=empty)


def _masks(x: Any) -> tuple[Any, bool, KeyPadding | None, list[float]] | str:
    """Peel the masks off the softmax input ``x``: ``masked_fill(mask, fill)`` and ``scores +
    mask`` in any order, each the causal mask, a key-padding mask or the two combined. Returns
    (the scores under them, causal?, the key padding, the fills: -inf for additive masks), or
    why not."""
    causal, padding, fills = False, None, []
    while True:
        dims = shape(x)
        c = call(x)
        if c is not None and c.fn is torch.masked_fill:
            value, mask = scalar(c.get("value")), c.get("mask")
            parts = causal_and_padding(mask, dims, "masked")
            if parts is None:
                return (f"masked_fill with {mask_kind(mask, dims)}, which the pass can read as neither causal nor key "
                        "padding")
            if value is None or value > MAX_FILL:
                return (f"masked_fill with {c.get('value')!r}: lowered are -inf and finite fills <= {MAX_FILL:g} "
                        "(which softmax turns into exact zeros while the scores stay above fill + 104)")
            x = c["input"]
        elif (ops := binary(x, torch.add)) is not None and all(isinstance(val(o), torch.Tensor) for o in ops):
            mask = next((o for o in ops if not any(is_call(n, *MATMUL) for n in upstream(o))), ops[1])
            value = float("-inf")
            parts = causal_and_padding(mask, dims, "additive")
            if parts is None:
                return f"softmax input is the scores plus {mask_kind(mask, dims)} (an additive mask or bias)"
            x = ops[1] if mask is ops[0] else ops[0]
        else:
            return x, causal, padding, fills
        if (parts[0] and causal) or (parts[1] is not None and padding is not None):
            return "two causal or two key-padding masks on one softmax"
        causal, padding = causal or parts[0], padding or parts[1]
        fills.append(value)


def _after_softmax(p: fx.Node) -> list[fx.Node]:
    """The calls between a softmax and the product's weights operand ``p``."""
    feeding = upstream(p)
    out, stack = [], [p]
    while stack:
        n = stack.pop()
        if n not in feeding or n in out or is_call(n, *SOFTMAX):
            continue
        out.append(n)
        stack.extend(n.all_input_nodes)
    return out


def _name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(call(node).fn, "__name__", str(node.target))


FAMILY = Family("softmax", anchors, match)
