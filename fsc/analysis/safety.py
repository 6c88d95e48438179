"""What makes a graph unsafe to reorder: shared by the passes that move collectives.

**In-place ops.** A functional collective reads its input while it is in flight and its
result is a fresh tensor, so moving it (or its wait) is safe unless something writes the
memory it reads or writes. An in-place op is therefore allowed when the storage it
writes (followed back through views and other aliasing ops, by their schemas) is neither
read by a collective nor a collective's result. That covers the writes AOTAutograd puts
at the end of a graph to update mutated inputs (``copy_(primals_3, new_value)``: a
counter of fbgemm's bounds check, the table a fused optimizer updates), which every
FBGEMM-backed TorchRec model has. Such a write still has an order with the other
accesses of the same storage that no data edge states: :func:`memory_dependencies`
gives it, and the list scheduler keeps it.

**Size queries** (``sym_size``, ``sym_numel``, ...) read a tensor's metadata, not its
data: they are never counted as reading the storage.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fsc.analysis.collectives import find_collectives, is_collective, is_wait, opaque_collectives
from fsc.analysis.graph import SIZE_OPS, positions


def mutating_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Call nodes whose schema writes one of its arguments."""
    out = []
    for node in graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            if any(a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments):
                out.append(node)
    return out


def _aliased_argument(node: fx.Node) -> fx.Node | None:
    """The argument whose storage ``node``'s result shares, per the op's schema, or None
    when the result is fresh. A wait's result is its collective's result."""
    if node.op != "call_function":
        return None
    if is_wait(node):
        source = node.args[0]
        return source if isinstance(source, fx.Node) else None
    target = node.target
    if target is operator.getitem:
        parent = node.args[0]
        return _aliased_argument(parent) if isinstance(parent, fx.Node) else None
    if not isinstance(target, torch._ops.OpOverload):
        return None
    returns = target._schema.returns
    if not returns or returns[0].alias_info is None:
        return None
    alias_set = returns[0].alias_info.before_set  # empty for a list of aliases (split, unbind)
    for index, argument in enumerate(target._schema.arguments):
        info = argument.alias_info
        if info is None or (alias_set and not (info.before_set & alias_set)):
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        return value if isinstance(value, fx.Node) else None
    return None


def storage_root(node: fx.Node) -> fx.Node:
    """The node that allocated the storage ``node``'s value lives in (a placeholder, a
    collective, or an op with a fresh result)."""
    while (source := _aliased_argument(node)) is not None:
        node = source
    return node


def written_roots(node: fx.Node) -> list[fx.Node]:
    """Storage roots of the arguments ``node``'s schema writes."""
    roots = []
    target = node.target
    if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
        for index, argument in enumerate(target._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            roots.extend(storage_root(v) for v in values if isinstance(v, fx.Node))
    return roots


def _accesses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """For each storage root, the nodes that read or write its data, in program order."""
    writers = set(mutating_nodes(graph))
    out: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target in SIZE_OPS:
            continue
        if _aliased_argument(node) is not None and node not in writers:
            continue  # a view: it reads nothing until something reads it
        roots = {storage_root(i) for i in node.all_input_nodes}
        for root in roots:
            out.setdefault(root, []).append(node)
    return out


def _collective_reads(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Storage root -> a collective that reads it (its data inputs, not its split sizes)."""
    read: dict[fx.Node, fx.Node] = {}
    for coll in find_collectives(graph):
        for source in coll.node.all_input_nodes:
            if isinstance(source.meta.get("val"), torch.Tensor):
                read.setdefault(storage_root(source), coll.node)
    return read


def unsafe_mutation(node: fx.Node, collective_reads: dict[fx.Node, fx.Node]) -> str | None:
    """Why the in-place op ``node`` forbids moving collectives, or None when it does not."""
    for root in written_roots(node):
        if is_collective(root):
            return f"writes the result of collective {root.name}"
        if root in collective_reads:
            return f"writes {root.name}, which collective {collective_reads[root].name} reads"
    return None


def reorder_blocker(graph: fx.Graph, action: str) -> str | None:
    """Why collectives in ``graph`` must not be moved (a reason naming ``action``, e.g.
    "not scheduled"), or None when they may."""
    if not find_collectives(graph):
        return "no collectives in the graph"
    opaque = opaque_collectives(graph)
    if opaque:
        return (f"{action}: communication op {opaque[0].target} is not a functional collective fsc "
                "understands; use torch.distributed._functional_collectives")
    reads = _collective_reads(graph)
    for node in mutating_nodes(graph):
        why = unsafe_mutation(node, reads)
        if why is not None:
            return f"{action}: in-place op {node.target} ({node.name}) {why}"
    return None


def memory_dependencies(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """``(before, after)`` pairs that a reordering must keep besides the data edges: every
    node that reads or writes the storage an in-place op writes stays on the same side of
    that op as in program order."""
    order = positions(graph)
    accesses = _accesses(graph)
    pairs = []
    for writer in mutating_nodes(graph):
        for root in written_roots(writer):
            for other in accesses.get(root, ()):
                if other is writer:
                    continue
                pairs.append((other, writer) if order[other] < order[writer] else (writer, other))
    return pairs
