"""The FX graph as a networkx ``DiGraph`` (the schedule graph)."""

from __future__ import annotations

import networkx as nx
import torch.fx as fx


def input_nodes(node: fx.Node) -> list[fx.Node]:
    """The nodes ``node`` reads, in first-use order, without duplicates."""
    return list(dict.fromkeys(node.all_input_nodes))


def schedule_graph(graph: fx.Graph) -> nx.DiGraph:
    """Data-dependence DAG of ``graph``: one vertex per FX node (keyed by the node), an
    edge producer -> consumer for every use. Vertex attribute ``position`` is the node's
    index in the current program order, ``op`` its FX opcode."""
    dag = nx.DiGraph()
    for position, node in enumerate(graph.nodes):
        dag.add_node(node, position=position, op=node.op)
        for src in input_nodes(node):
            dag.add_edge(src, node)
    return dag


def positions(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}
