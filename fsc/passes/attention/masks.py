"""Causal masks as users build them, proved from the graph, and what other masks look like
(for reasons). Three meanings of a mask over ``[N, N]`` scores, N their last dim:

- ``"masked"``: True marks a hidden key (``masked_fill(mask, fill)``):
  ``triu(ones(N, N), 1)`` or ``~tril(ones(N, N))``;
- ``"kept"``: True marks a visible key (SDPA's boolean ``attn_mask``): ``tril(ones(N, N))``
  or ``~triu(ones(N, N), 1)``;
- ``"additive"``: added to the scores (a float ``attn_mask``, ``scores + mask``):
  ``triu(full((N, N), -inf), 1)``, what ``nn.Transformer.generate_square_subsequent_mask``
  builds.

dtype conversions are looked through everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from fsc.passes.attention.graph import call, fmt, is_call, same, scalar, shape, uncast, val

MEANINGS = ("masked", "kept", "additive")
KEY_PADDING = ("per-sequence lengths: eager also computes the padded query rows, which a jagged kernel skips, so "
               "the values there would differ")


def is_causal(mask: Any, dims: tuple[Any, ...] | None, meaning: str) -> bool:
    """Whether ``mask`` is the causal mask of scores of shape ``dims`` read as ``meaning``."""
    if dims is None or len(dims) < 2:
        return False
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


def mask_kind(mask: Any, sdims: tuple[Any, ...] | None) -> str:
    """What a mask on scores of shape ``sdims`` that was not proved causal looks like, for a
    reason: a key-padding mask (one row per batch element, broadcast over heads and
    queries) says why it is not lowered; others get their shape."""
    dims = shape(mask)
    if dims is None or sdims is None:
        return "a mask"
    dims = (1,) * (len(sdims) - len(dims)) + tuple(dims)
    if (len(sdims) == 4 and len(dims) == 4 and same(dims[1], 1) and same(dims[2], 1) and same(dims[0], sdims[0])
            and same(dims[3], sdims[3])):
        return f"a key-padding mask {fmt(shape(mask))} ({KEY_PADDING})"
    return f"a {val(mask).dtype} mask {fmt(shape(mask))}"
