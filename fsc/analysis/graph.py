"""Structural helpers on FX graphs that the scheduling passes share: program positions
and the free (work-less) nodes that move with the node they feed."""

from __future__ import annotations

import torch
import torch.fx as fx

from fsc.analysis.cost_model import is_view


def positions(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


SIZE_OPS = {
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.sym_stride.int,
    torch.ops.aten.sym_storage_offset.default,
}


def is_free(node: fx.Node) -> bool:
    """Views, and arithmetic on sizes (``x.shape[0] // 2`` feeding split sizes): nodes
    that launch no work, so moving them costs nothing."""
    if node.op != "call_function":
        return False
    if is_view(node) or node.target in SIZE_OPS:
        return True
    return getattr(node.target, "__module__", None) == "_operator" and isinstance(
        node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)
    )


def free_input_chain(node: fx.Node) -> list[fx.Node]:
    """``node`` preceded by the free nodes (views, size arithmetic) it reads through,
    transitively, in program order. Only nodes used by nothing but this chain are taken,
    so moving the chain moves nothing else."""
    order = positions(node.graph)
    chain = {node}
    frontier = [node]
    while frontier:
        current = frontier.pop()
        for src in current.all_input_nodes:
            if is_free(src) and src not in chain and set(src.users) <= chain:
                chain.add(src)
                frontier.append(src)
    return sorted(chain, key=order.__getitem__)
