"""``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``'s fast path: found and
declined with what they are. Dynamo does not trace into either: the module's forward
becomes one ``F.multi_head_attention_forward`` call (projections, attention and output
projection in one opaque node), and the encoder layer's fast path (eval, no grad) one
``torch._transformer_encoder_layer_fwd``. Lowering them needs the call unpacked into
projections and attention first, which this module does not do yet."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.nn import functional as F

from fsc.passes.attention.graph import call, is_call
from fsc.passes.attention.lowering import Family, Lowering, Settings

_OPAQUE = (F.multi_head_attention_forward, torch._transformer_encoder_layer_fwd, torch._native_multi_head_attention)


def anchors(node: fx.Node) -> bool:
    return is_call(node, *_OPAQUE)


def match(node: fx.Node, settings: Settings) -> Lowering | str:
    c = call(node)
    if c.fn is F.multi_head_attention_forward:
        given = [name for name in ("attn_mask", "key_padding_mask") if c.get(name) is not None]
        flags = (f"masks: {', '.join(given) or 'none'}, is_causal={c.get('is_causal')}, "
                 f"need_weights={c.get('need_weights')}, dropout_p={c.get('dropout_p')}")
        return ("nn.MultiheadAttention is one opaque F.multi_head_attention_forward call in Dynamo's graph "
                f"({flags}); the pass does not unpack it into projections and attention, so its attention "
                "stays PyTorch's")
    name = getattr(c.fn, "__name__", str(c.fn))
    return (f"torch.{name} (nn.TransformerEncoderLayer / MultiheadAttention fast path: eval without grad) is one "
            "fused op; the pass does not unpack it")


FAMILY = Family("mha", anchors, match)
