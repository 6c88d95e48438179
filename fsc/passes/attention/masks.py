"""Causal and key-padding masks as users build them, read from the graph, and what other masks
look like (for reasons). Three meanings of a mask over ``[N, N]`` scores, N their last dim:

- ``"masked"``: True marks a hidden key (``masked_fill(mask, fill)``):
  ``triu(ones(N, N), 1)`` or ``~tril(ones(N, N))``;
- ``"kept"``: True marks a visible key (SDPA's boolean ``attn_mask``): ``tril(ones(N, N))``
  or ``~triu(ones(N, N), 1)``;
- ``"additive"``: added to the scores (a float ``attn_mask``, ``scores + mask``):
  ``triu(full((N, N), -inf), 1)``, what ``nn.Transformer.generate_square_subsequent_mask``
  builds.

A causal mask is proved from the graph. A **key-padding mask** is recognised by its shape:
one row of N per sequence, broadcast over heads and queries (``[B, 1, 1, N]`` on ``[B, H, N,
N]`` scores, ``[B*H, 1, N]`` on ``[B*H, N, N]``, ``[B, N]`` as ``nn.MultiheadAttention``'s
``key_padding_mask``); which keys it hides is known only at run time, so the lowering checks
there that each row's valid keys are one contiguous run (right- or left-aligned padding).
An additive one must be built from a boolean one as ``masked_fill(zeros, pad, -inf)`` (what
``nn.TransformerEncoderLayer`` makes of a boolean ``src_key_padding_mask``) or ``where(pad,
-inf, 0)``, then viewed, unsqueezed or cast, so that it holds only 0 and -inf (its valid keys
are its zeros). A mask may also combine the two: ``causal | pad`` (masked), ``causal & pad`` (kept), ``causal +
pad`` (additive).

dtype conversions are looked through everywhere.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from fsc.passes.attention.graph import binary, call, fmt, is_call, same, scalar, shape, uncast, val

MEANINGS = ("masked", "kept", "additive")
_VIEWS = ("unsqueeze", "view", "reshape", "expand")
_ZEROS = (torch.zeros, torch.zeros_like, torch.Tensor.new_zeros)
_COMBINED = {"masked": (torch.bitwise_or, torch.logical_or), "kept": (torch.bitwise_and, torch.logical_and),
             "additive": (torch.add,)}


@dataclasses.dataclass(frozen=True, slots=True)
class KeyPadding:
    """A key-padding mask: ``mask`` (a node) read as ``meaning`` (additive: one that holds
    only 0 and -inf), broadcast to one row of N keys per sequence of the scores."""

    mask: fx.Node
    meaning: str


def is_causal(mask: Any, dims: tuple[Any, ...] | None, meaning: str) -> bool:
    """Whether ``mask`` is the causal mask of scores of shape ``dims`` read as ``meaning``."""
    if dims is None or len(dims) < 2:
        return False
    if meaning == "additive" and (boolean := from_boolean(mask)) is not None:
        return is_causal(boolean[0], dims, boolean[1])
    mask = uncast(mask)[0]
    negate = is_call(mask, torch.bitwise_not, torch.logical_not)
    if negate:
        mask = uncast(call(mask)["input"])[0]
    c = call(mask)
    kind = None if c is None else "tril" if c.fn is torch.tril else "triu" if c.fn is torch.triu else None
    if kind is None or c.args is None or c["diagonal"] != (0 if kind == "tril" else 1):
        return False
    base = uncast(c["input"])[0]
    if meaning == "additive":
        full = call(base)
        if negate or kind != "triu" or full is None or full.fn is not torch.full or full.args is None:
            return False
        if scalar(full["fill_value"]) != float("-inf"):
            return False
    elif not is_call(base, torch.ones) or negate != ((kind == "tril") == (meaning == "masked")):
        return False
    size = shape(base)
    return size is not None and len(size) == 2 and same(size[0], dims[-2]) and same(size[1], dims[-1])


def is_key_padding(mask: Any, sdims: tuple[Any, ...] | None) -> bool:
    """Whether ``mask`` broadcasts to scores of shape ``sdims`` as one row of keys per
    sequence (the scores' first dim, or shared by all), the same for every head and query
    (``sdims`` ``[B, N]``: a mask of one row per sequence, as MultiheadAttention takes it)."""
    dims = shape(mask)
    if not isinstance(mask, fx.Node) or dims is None or sdims is None or len(sdims) < 2 or len(dims) > len(sdims):
        return False
    dims = (1,) * (len(sdims) - len(dims)) + tuple(dims)
    return ((same(dims[0], 1) or same(dims[0], sdims[0])) and all(same(x, 1) for x in dims[1:-1])
            and same(dims[-1], sdims[-1]))


def causal_and_padding(mask: Any, sdims: tuple[Any, ...] | None, meaning: str) -> tuple[bool, KeyPadding | None] | None:
    """(causal?, key padding or None) that ``mask`` on scores of shape ``sdims`` stands for:
    the causal mask, a key-padding mask, or the two combined (``|``, ``&`` or ``+`` as
    ``meaning`` combines masks); None: something else."""
    if is_causal(mask, sdims, meaning):
        return True, None
    if (pad := key_padding(mask, sdims, meaning)) is not None:
        return False, pad
    ops = binary(uncast(mask)[0], *_COMBINED[meaning])
    if ops is not None:
        for causal, other in (ops, ops[::-1]):
            if is_causal(causal, sdims, meaning) and (pad := key_padding(other, sdims, meaning)) is not None:
                return True, pad
    return None


def key_padding(mask: Any, sdims: tuple[Any, ...] | None, meaning: str) -> KeyPadding | None:
    """``mask`` as a key-padding mask on scores of shape ``sdims`` (None: it is not one, or,
    additive, not one built from a boolean mask with 0 and -inf)."""
    if not is_key_padding(mask, sdims):
        return None
    if meaning == "additive" and from_boolean(mask) is None:
        return None
    return KeyPadding(mask, meaning)


def from_boolean(mask: Any) -> tuple[fx.Node, str] | None:
    """(the boolean mask, its meaning) that an additive ``mask`` of 0 and -inf was built from:
    ``masked_fill(zeros, b, -inf)`` (b "masked"; what ``F._canonical_mask`` makes of a boolean
    mask in ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``), ``where(b, -inf,
    0)`` ("masked") or ``where(b, 0, -inf)`` ("kept"), through views; None: not built so."""
    source = call(_unviewed(mask))
    if source is None:
        return None
    inf = float("-inf")
    if source.fn in (torch.masked_fill, torch.Tensor.masked_fill_):
        # the in-place method has no schema to normalise with: (self, mask, value)
        raw = (*source.raw, *source.kwargs.values())
        zeros, hidden, value = ((source["input"], source["mask"], source["value"]) if source.args is not None
                                else (raw[0], raw[1], raw[-1]))
        zeros = call(uncast(zeros)[0])
        if zeros is not None and zeros.fn in _ZEROS and scalar(value) == inf and isinstance(hidden, fx.Node):
            return hidden, "masked"
    if source.fn is torch.where and source.args is not None:
        values = (scalar(source.get("input")), scalar(source.get("other")))
        if values in ((inf, 0.0), (0.0, inf)):
            return source["condition"], "masked" if values[0] == inf else "kept"
    return None


def _unviewed(node: Any) -> Any:
    """``node`` before the views, unsqueezes, ``[:, None]`` indexing and casts that only
    reshape it (not reorder it)."""
    while True:
        node = uncast(node)[0]
        if not isinstance(node, fx.Node) or not node.args:
            return node
        if (node.op == "call_function" and node.target in (torch.unsqueeze, torch.reshape)) or (
                node.op == "call_method" and node.target in _VIEWS) or _adds_dims(node):
            node = node.args[0]
        else:
            return node


def _adds_dims(node: fx.Node) -> bool:
    """``x[:, None, ...]``: indexing with full slices, None and Ellipsis only."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return all(i is None or i is Ellipsis or i == slice(None) for i in index)


def mask_kind(mask: Any, sdims: tuple[Any, ...] | None) -> str:
    """What a mask on scores of shape ``sdims`` that is neither causal nor key padding (nor
    the two combined) looks like, for a reason: its dtype and shape."""
    dims = shape(mask)
    if dims is None or sdims is None:
        return "a mask"
    if is_key_padding(mask, sdims) and val(mask).is_floating_point():
        return (f"a float key-padding mask {fmt(dims)} not built as masked_fill(zeros, pad, -inf) or where(pad, "
                "-inf, 0), so not known to hold only 0 and -inf")
    return f"a {val(mask).dtype} mask {fmt(dims)}"
