"""Collective discovery in aten-level FX graphs.

Recognises the functional collectives of ``torch.distributed._functional_collectives``
as AOTAutograd and Inductor see them (``_c10d_functional.*`` plus ``wait_tensor``).
Anything else in a c10d namespace is an *opaque* collective: passes must not move work
across it and say so.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from fsc.analysis.symbolic import tensor_nbytes

_C10D = torch.ops._c10d_functional

#: functional collective overload -> short kind name used in stats and the cost model
COLLECTIVE_KINDS: dict[Any, str] = {
    _C10D.all_to_all_single.default: "all_to_all_single",
    _C10D.all_gather_into_tensor.default: "all_gather_into_tensor",
    _C10D.reduce_scatter_tensor.default: "reduce_scatter_tensor",
    _C10D.all_reduce.default: "all_reduce",
}
WAIT_TENSOR = _C10D.wait_tensor.default
_C10D_NAMESPACES = ("_c10d_functional", "c10d", "_c10d_functional_autograd", "c10d_functional", "_dtensor")

#: meta key under which the pass manager stamps a stable identity on each collective, so
#: that passes which replace a collective node can keep its identity (copy the meta).
COLLECTIVE_ID = "fsc_collective_id"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Collective:
    """One functional collective and the waits on its result."""

    node: fx.Node
    kind: str
    group_name: str
    waits: tuple[fx.Node, ...]
    nbytes: Any
    """Bytes of the result tensor (int, or SymInt for symbolic shapes)."""
    input_nbytes: Any
    group_size: int | None
    """Ranks in the group when the graph states it (split-size lists, ``group_size``)."""

    @property
    def identity(self) -> str:
        return str(self.node.meta.get(COLLECTIVE_ID, self.node.name))


def is_collective(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in COLLECTIVE_KINDS


def is_wait(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is WAIT_TENSOR


def _namespace(target: Any) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[0]
    return None


def opaque_collectives(graph: fx.Graph) -> list[fx.Node]:
    """Nodes that communicate but are not collectives fsc understands (coalesced or
    in-place c10d ops, broadcast, send/recv ...)."""
    return [
        node
        for node in graph.nodes
        if node.op == "call_function"
        and not is_collective(node)
        and not is_wait(node)
        and _namespace(node.target) in _C10D_NAMESPACES
    ]


def call_arg(node: fx.Node, name: str) -> Any:
    """Argument ``name`` of an OpOverload call, by schema, positional or keyword."""
    for index, argument in enumerate(node.target._schema.arguments):
        if argument.name == name:
            if index < len(node.args):
                return node.args[index]
            return node.kwargs.get(name, argument.default_value)
    raise KeyError(f"{node.target} has no argument {name!r}")


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def _group_size(node: fx.Node, kind: str) -> int | None:
    if kind == "all_to_all_single":
        for name in ("output_split_sizes", "input_split_sizes"):
            splits = call_arg(node, name)
            if isinstance(splits, (list, tuple)) and splits:
                return len(splits)
        return None
    if kind in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        size = _val(call_arg(node, "group_size"))
        return int(size) if isinstance(size, int) else None
    return None


def describe(node: fx.Node) -> Collective:
    """The :class:`Collective` for a collective node."""
    kind = COLLECTIVE_KINDS[node.target]
    out = node.meta.get("val")
    inp = _val(call_arg(node, "input"))
    return Collective(
        node=node,
        kind=kind,
        group_name=str(call_arg(node, "group_name")),
        waits=tuple(user for user in node.users if is_wait(user)),
        nbytes=tensor_nbytes(out) if isinstance(out, torch.Tensor) else 0,
        input_nbytes=tensor_nbytes(inp) if isinstance(inp, torch.Tensor) else 0,
        group_size=_group_size(node, kind),
    )


def find_collectives(graph: fx.Graph) -> list[Collective]:
    """Every functional collective of ``graph``, in program order."""
    return [describe(node) for node in graph.nodes if is_collective(node)]


def group_order(graph: fx.Graph) -> dict[str, list[str]]:
    """Per process group, the identities of its collectives in issue order."""
    order: dict[str, list[str]] = {}
    for coll in find_collectives(graph):
        order.setdefault(coll.group_name, []).append(coll.identity)
    return order
