"""Small helpers on FX graphs shared by the manager, the backend and passes."""

from __future__ import annotations

import torch.fx as fx


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a node-for-node copy of ``gm``'s graph (meta dicts copied,
    parameters and submodules shared)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def replace_graph_contents(dst: fx.Graph, src: fx.Graph) -> None:
    """Make ``dst`` a copy of ``src`` in place (for callers that hold ``dst``)."""
    nodes = list(dst.nodes)
    # Cut every use first: a failed pass may have left users before their producers.
    for node in nodes:
        node.args, node.kwargs = (), {}
    for node in reversed(nodes):
        dst.erase_node(node)
    # A fresh namespace lets the copies keep their original names (the old one still
    # holds the erased nodes' names and would suffix them).
    if hasattr(dst, "_graph_namespace"):
        dst._graph_namespace = type(dst._graph_namespace)()
    out = dst.graph_copy(src, {})
    dst.output(out)


def readable(gm: fx.GraphModule) -> str:
    """Python-like text of the graph, one node a line (for records and dumps)."""
    try:
        return gm.print_readable(print_output=False, include_stride=False, include_device=False)
    except Exception:  # graphs whose meta cannot be printed still get their code
        return gm.code
