"""The attention forms ``lower-attention`` knows, one module per family.

Each module states its forms as the PyTorch a user writes and exposes a
:class:`~fsc.passes.attention.lowering.Family`: ``anchors(node)`` (is this node the last
node of an attention of this family?) and ``match(node, settings)`` (a
:class:`~fsc.passes.attention.lowering.Lowering`, or the reason it is not lowered). The
pass walks the graph, asks the families in this order, and records what each lowered, kept
or declined. A new family is its module plus one entry here.

Why not Inductor's ``pattern_matcher``: it does run on Dynamo's torch-IR graphs (Inductor's
own pre-grad passes use ``CallFunctionVarArgs``/``CallMethodVarArgs``), but a pattern either
matches or not, and this pass must say why a form that looks like attention was not lowered
(its ``FailedMatch`` texts are debugging aids about the pattern's own nodes, not reasons a
user can act on); and ``register_replacement`` traces one search function per spelling, so
``x.softmax(-1)``/``F.softmax``, ``@``/``bmm``, ``transpose``/``mT``, any einsum letters and
the HSTU mask's subgraphs would each need their own patterns. The modules here read calls
through :func:`~fsc.passes.attention.graph.call` (``normalize_function``, which is what
``Node.normalized_arguments`` calls, extended to methods and Python operators) and walk the
graph from the product backwards, so one check serves every spelling and each failure has
its reason.
"""

from fsc.passes.attention import hstu, hstu_groups, hstu_padded, mha, sdpa, softmax
from fsc.passes.attention.lowering import Family, Lowering, Settings

# hstu_padded before hstu: both anchor on a product of SiLU weights; the padded form is the
# one whose values come from fbgemm's jagged_to_padded_dense
# hstu_groups before softmax and hstu: its groups' products are SiLU (or softmax) weights times
# values gathered by a 2-D index, which it lowers (or declines) as one per-sequence form
FAMILIES: tuple[Family, ...] = (sdpa.FAMILY, mha.FAMILY, hstu_groups.FAMILY, softmax.FAMILY, hstu_padded.FAMILY,
                                hstu.FAMILY)

__all__ = ["FAMILIES", "Family", "Lowering", "Settings"]
