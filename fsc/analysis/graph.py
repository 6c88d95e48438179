"""The FX graph as a networkx ``DiGraph`` (the schedule graph), and the structural
helpers the scheduling passes share."""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from fsc.analysis.cost_model import is_view


def schedule_graph(graph: fx.Graph) -> nx.DiGraph:
    """Data-dependence DAG of ``graph``: one vertex per FX node (keyed by the node), an
    edge producer -> consumer for every use. Vertex attribute ``position`` is the node's
    index in the current program order, ``op`` its FX opcode."""
    dag = nx.DiGraph()
    for position, node in enumerate(graph.nodes):
        dag.add_node(node, position=position, op=node.op)
        for src in node.all_input_nodes:  # FX keeps these unique, in first-use order
            dag.add_edge(src, node)
    return dag


def positions(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


_SIZE_OPS = {
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
    if is_view(node) or node.target in _SIZE_OPS:
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
