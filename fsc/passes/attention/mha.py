"""``nn.MultiheadAttention`` (and ``nn.TransformerEncoderLayer``'s slow path, which calls
it): Dynamo does not trace into the module; its forward becomes one
``F.multi_head_attention_forward`` call (in-projection, attention and out-projection in one
opaque node). Self-attention without extras is unpacked: the in-projection (packed, or
separate q/k/v weights) as ``F.linear``, the attention as the jagged kernel with uniform
offsets, the out-projection as ``F.linear``.

Lowered: ``query is key is value``; ``need_weights`` False, or True with the weights left
unused; ``attn_mask`` None (full attention), the causal mask proved from the graph
(:mod:`~fsc.passes.attention.masks`), or any mask given with the ``is_causal`` hint,
``need_weights=False`` and no ``key_padding_mask``, which is when PyTorch itself ignores the
mask tensor and runs causal SDPA (the hint is trusted exactly as PyTorch trusts it); a
``key_padding_mask [B, N]`` (boolean, True for padding, or additive with 0 / -inf, as
``nn.TransformerEncoderLayer`` passes its ``src_key_padding_mask``), alone or with the
causal mask, lowered over each sequence's valid keys with a run-time check that they are one
contiguous run (:func:`~fsc.passes.attention.lowering.attend`; rows that see no key are 0
without weights, as SDPA gives them, and NaN with ``need_weights=True``, as its explicit
softmax gives them); dropout 0 or ``training=False``. Declined, with the reason: other masks,
``bias_k``/``bias_v``, ``add_zero_attn``, static k/v, dropout, used weights,
cross-attention; and the encoder layer's fast path (``torch._transformer_encoder_layer_fwd``,
eval without grad), one fused op the pass does not unpack.
"""

from __future__ import annotations

import math
import operator
import torch
import torch.fx as fx
from torch.nn import functional as F

from fsc.kernels.limits import DTYPES
from fsc.passes.attention.graph import call, fmt, is_call, shape, val
from fsc.passes.attention.lowering import Emitter, Family, Lowering, Settings, attend, head_dim_problem, padded
from fsc.passes.attention.masks import is_causal, key_padding, mask_kind

_FUSED = (torch._transformer_encoder_layer_fwd, torch._native_multi_head_attention)


def anchors(node: fx.Node) -> bool:
    return is_call(node, F.multi_head_attention_forward, *_FUSED)


def match(node: fx.Node, settings: Settings) -> Lowering | str:
    c = call(node)
    if c.fn in _FUSED or c.args is None:
        name = getattr(c.fn, "__name__", str(c.fn))
        return (f"torch.{name} (nn.TransformerEncoderLayer / MultiheadAttention fast path: eval without grad) is "
                "one fused op; the pass does not unpack it")
    a = c.args
    what = "nn.MultiheadAttention (one F.multi_head_attention_forward call in Dynamo's graph)"
    x = a["query"]
    if not (x is a["key"] is a["value"]):
        return f"{what}: cross-attention (query, key and value differ); only self-attention is lowered"
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a.get(name) is not None:
            return f"{what}: {name} is given"
    if a["add_zero_attn"]:
        return f"{what}: add_zero_attn=True"
    if a["dropout_p"] != 0 and a["training"] is not False:
        return f"{what}: dropout_p={a['dropout_p']} in training: the kernel has no dropout"
    dims = shape(x)
    if dims is None or len(dims) != 3:
        return f"{what}: query of shape {dims}, not [N, B, E]"
    padding, kpm = None, a["key_padding_mask"]
    if kpm is not None:
        meaning = "masked" if val(kpm).dtype == torch.bool else "additive"
        padding = key_padding(kpm, (dims[1], dims[0]), meaning)
        if padding is None:
            return (f"{what}: key_padding_mask is {mask_kind(kpm, (dims[1], dims[0]))}, not one the pass can read as "
                    "key padding")
    mask = a["attn_mask"]
    causal = mask is not None
    hinted = a["is_causal"] is True and a["need_weights"] is False and padding is None
    meaning = "masked" if causal and val(mask).dtype == torch.bool else "additive"
    if causal and not hinted and not is_causal(mask, (dims[0], dims[0]), meaning):
        return (f"{what}: attn_mask {fmt(shape(mask) or ())} is not the causal mask the pass can prove, and no "
                "is_causal hint with need_weights=False")
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        return f"{what}: the attention weights (its second output) are used"
    out = next(iter(node.users), None)
    if out is None:
        return f"{what}: its output is unused"
    e_dim, heads = dims[2], a["num_heads"]
    if not isinstance(e_dim, int) or not isinstance(heads, int) or e_dim % heads:
        return f"{what}: embed dim {e_dim} with {heads} heads is not static and divisible"
    d = e_dim // heads
    if problem := head_dim_problem("q/k", d, settings):
        return f"{what}: {problem}"
    if val(x).dtype not in DTYPES:
        return f"{what}: dtype {val(x).dtype}: the kernel takes one of {list(DTYPES)}"
    packed = not a["use_separate_proj_weight"]
    weights = (a["in_proj_weight"],) if packed else (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
    bias, out_w, out_b = a["in_proj_bias"], a["out_proj_weight"], a["out_proj_bias"]

    def emit(e: Emitter) -> fx.Node:
        n, b = e.dim(x, 0), e.dim(x, 1)
        if packed:
            qkv = e(torch.split, e(F.linear, x, weights[0], bias), e_dim, -1)
            q, k, v = (e(operator.getitem, qkv, i) for i in range(3))
        else:
            biases = [None] * 3 if bias is None else [
                e(operator.getitem, bias, slice(i * e_dim, (i + 1) * e_dim)) for i in range(3)]
            q, k, v = (e(F.linear, x, w, bb) for w, bb in zip(weights, biases))

        def jagged(t: fx.Node) -> fx.Node:  # [N, B, E] -> [B*N, H, D]
            return e(torch.reshape, e(torch.transpose, t, 0, 1), (-1, heads, d))

        o = attend(e, lambda: (jagged(q), jagged(k), jagged(v)), b, n, d, val(x).device, causal, 1.0 / math.sqrt(d),
                   settings, padding=padding, empty=empty)
        o = e(torch.transpose, e(torch.reshape, o, (b, n, e_dim)), 0, 1)
        return e(F.linear, o, out_w, out_b)

    # rows that see no key: SDPA (need_weights=False) gives 0, the explicit softmax NaN
    empty = "nan" if a["need_weights"] is not False else "zero"
    how = "full" if not causal else "causal (is_causal hint)" if hinted else "causal (mask proved)"
    found = (f"{what} [N, B, E]={fmt(dims)}, {heads} heads, {how} softmax{padded(padding, empty)}, "
             f"scale={1.0 / math.sqrt(d):.4g}, {'packed' if packed else 'separate'} projections "
             f"(unpacked; {'jagged, valid keys per sequence' if padding else 'jagged, uniform offsets'})")
    return Lowering(out, found, emit, uniform=True, device=val(x).device)


FAMILY = Family("mha", anchors, match)
