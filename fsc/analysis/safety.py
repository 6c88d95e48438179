"""What makes a graph unsafe to reorder: shared by the passes that move collectives."""

from __future__ import annotations

import torch
import torch.fx as fx

from fsc.analysis.collectives import find_collectives, opaque_collectives


def mutating_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Call nodes whose schema writes one of its arguments."""
    out = []
    for node in graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            if any(a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments):
                out.append(node)
    return out


def reorder_blocker(graph: fx.Graph, action: str) -> str | None:
    """Why collectives in ``graph`` must not be moved (a reason naming ``action``, e.g.
    "not scheduled"), or None when they may."""
    if not find_collectives(graph):
        return "no collectives in the graph"
    opaque = opaque_collectives(graph)
    if opaque:
        return (f"{action}: communication op {opaque[0].target} is not a functional collective fsc "
                "understands; use torch.distributed._functional_collectives")
    mutations = mutating_nodes(graph)
    if mutations:
        return (f"{action}: in-place op {mutations[0].target} ({mutations[0].name}) may alias what a "
                "collective reads or writes")
    return None
