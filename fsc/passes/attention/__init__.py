"""The attention forms ``lower-attention`` knows, one module per family.

Each module states its forms as the PyTorch a user writes and exposes a
:class:`~fsc.passes.attention.lowering.Family`: ``anchors(node)`` (is this node the last
node of an attention of this family?) and ``match(node, settings)`` (a
:class:`~fsc.passes.attention.lowering.Lowering`, or the reason it is not lowered). The
pass walks the graph, asks the families in this order, and records what each lowered, kept
or declined. A new family is its module plus one entry here.
"""

from fsc.passes.attention import hstu, mha, sdpa, softmax
from fsc.passes.attention.lowering import Family, Lowering, Settings

FAMILIES: tuple[Family, ...] = (sdpa.FAMILY, mha.FAMILY, softmax.FAMILY, hstu.FAMILY)

__all__ = ["FAMILIES", "Family", "Lowering", "Settings"]
