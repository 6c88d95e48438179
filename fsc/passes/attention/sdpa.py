"""``F.scaled_dot_product_attention(q, k, v, is_causal=..., scale=...)`` on ``[B, H, N, D]``
self-attention (q, k and v of one length), without dropout or GQA; an ``attn_mask`` only where
it is the causal mask (boolean ``tril(ones(N, N))`` or additive ``triu(full(-inf), 1)``), a
key-padding mask (boolean ``[B, 1, 1, N]``, True for a valid key, or additive with 0 / -inf),
or the two combined (``causal & pad``, ``causal + pad``), see
:mod:`~fsc.passes.attention.masks`. Rows that see no key (an all-padding sequence) are 0, as
SDPA gives them.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.nn import functional as F

from fsc.passes.attention.graph import call, is_call, scalar, shape, val
from fsc.passes.attention.lowering import Family, Lowering, Settings, dense_lowering
from fsc.passes.attention.masks import causal_and_padding, mask_kind


def anchors(node: fx.Node) -> bool:
    return is_call(node, F.scaled_dot_product_attention)


def match(node: fx.Node, settings: Settings) -> Lowering | str:
    args = call(node).args
    if args is None:
        return "arguments do not fit scaled_dot_product_attention's signature"
    causal, mask, padding = args["is_causal"], args["attn_mask"], None
    if mask is not None:
        q, k = shape(args["query"]), shape(args["key"])
        scores = None if q is None or k is None else (*q[:-1], k[-2])
        meaning = "kept" if isinstance(val(mask), torch.Tensor) and val(mask).dtype == torch.bool else "additive"
        parts = None if causal is not False else causal_and_padding(mask, scores, meaning)
        if parts is None:
            return (f"attn_mask is given ({mask_kind(mask, scores)}): the kernel takes only causal and key-padding "
                    "masks it can read from the graph")
        causal, padding = parts
    if args["dropout_p"] != 0.0:
        return f"dropout_p={args['dropout_p']}: the kernel has no dropout"
    if args["enable_gqa"] is not False:
        return "enable_gqa: the kernel needs as many k/v heads as q heads"
    if not isinstance(causal, bool):
        return f"is_causal={causal!r} is not a constant bool"
    scale = args["scale"]
    if scale is not None and scalar(scale) is None:
        return f"scale={scale!r} is not a constant"
    return dense_lowering(node, args["query"], args["key"], args["value"], causal,
                          None if scale is None else float(scale), "scaled_dot_product_attention", settings,
                          padding=padding)


FAMILY = Family("sdpa", anchors, match)
