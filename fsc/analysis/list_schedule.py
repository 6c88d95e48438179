"""A list scheduler over the compute stream and one FIFO queue per process group.

Returns an order for a graph's nodes; it edits nothing. Used by ``overlap-schedule``.
Every decision reads graph structure and rank-invariant cost estimates only.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque

import torch
import torch.fx as fx

from fsc.analysis.collectives import describe, is_collective, is_wait
from fsc.analysis.cost_model import CostModel, invariant_seconds
from fsc.analysis.safety import memory_dependencies
from fsc.analysis.symbolic import UNBACKED_FALLBACK

_FIXED_HEAD = ("placeholder", "get_attr")


def keeps_order(node: fx.Node) -> bool:
    """Nodes whose relative order is part of the program's meaning: random-number ops
    (reordering them changes which numbers each draws) and side-effecting ops."""
    if node.op != "call_function" or is_collective(node) or is_wait(node):
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
        return True
    try:
        return node.is_impure()
    except Exception:  # an op FX cannot classify: assume it matters
        return True


def list_schedule(graph: fx.Graph, cost_model: CostModel, *, size: float = UNBACKED_FALLBACK) -> list[fx.Node]:
    """An order for every node of ``graph``: placeholders first, output last. Costs are
    estimated with every size symbol at ``size`` (the same on every rank).

    Among ready nodes the scheduler picks, in this order: a collective (issued at once);
    a wait on the way to a later collective whose collective has finished by the estimate;
    a producer of a collective not yet issued (earliest collective first); any other
    compute, in program order; and only then a wait: the one on the way to a later
    collective that finishes first, else the one that finishes first. Collectives of one
    group keep their order, and so do the nodes :func:`keeps_order` marks and every access
    to storage an in-place op writes (:func:`fsc.analysis.safety.memory_dependencies`).

    A wait that no later collective depends on is taken only when no compute is ready: it
    then sits just before the first consumer the order needs, with every piece of
    independent work ahead of it. Taking it earlier, even when the estimate says its
    collective has finished, gains nothing in the model and exposes communication
    whenever the real sizes differ from the rank-invariant ones the estimate uses.
    """
    position = {n: i for i, n in enumerate(graph.nodes)}
    head = [n for n in graph.nodes if n.op in _FIXED_HEAD]
    tail = [n for n in graph.nodes if n.op == "output"]
    body = [n for n in graph.nodes if n.op not in _FIXED_HEAD and n.op != "output"]
    members = set(body)
    preds: dict[fx.Node, set[fx.Node]] = {n: {i for i in n.all_input_nodes if i in members} for n in body}

    def chain(seq: list[fx.Node]) -> None:
        for a, b in itertools.pairwise(seq):
            preds[b].add(a)

    collectives = [n for n in body if is_collective(n)]
    groups: dict[str, list[fx.Node]] = {}
    for node in collectives:
        groups.setdefault(describe(node).group_name, []).append(node)
    for seq in groups.values():
        chain(seq)
    chain([n for n in body if keeps_order(n)])
    for before, after in memory_dependencies(graph):
        if before in members and after in members:
            preds[after].add(before)

    succs: dict[fx.Node, list[fx.Node]] = {n: [] for n in body}
    for node, sources in preds.items():
        for src in sorted(sources, key=position.__getitem__):
            succs[src].append(node)

    # feeds[n]: index of the earliest collective n is an ancestor of
    feeds: dict[fx.Node, int] = {}
    for index, coll in enumerate(collectives):
        todo = deque(preds[coll])
        while todo:
            node = todo.popleft()
            if node in feeds:
                continue  # reached before by an earlier (smaller-index) collective
            feeds[node] = index
            todo.extend(preds[node])

    remaining = {n: len(preds[n]) for n in body}
    ready_colls: list[tuple[int, fx.Node]] = []
    ready_work: list[tuple[int, int, int, fx.Node]] = []  # (class, key, position, node)
    ready_waits: list[fx.Node] = []
    group_of = {n: describe(n).group_name for n in collectives}
    now = 0.0
    queue_free: dict[str, float] = {}
    finish: dict[fx.Node, float] = {}

    def push(node: fx.Node) -> None:
        if is_collective(node):
            heapq.heappush(ready_colls, (position[node], node))
        elif is_wait(node):
            ready_waits.append(node)
        elif node in feeds:
            heapq.heappush(ready_work, (0, feeds[node], position[node], node))
        else:
            heapq.heappush(ready_work, (1, 0, position[node], node))

    def wait_end(wait: fx.Node) -> float:
        source = wait.args[0]
        return finish.get(source, 0.0) if isinstance(source, fx.Node) else 0.0

    for node in body:
        if remaining[node] == 0:
            push(node)
    order: list[fx.Node] = []
    while ready_colls or ready_work or ready_waits:
        if ready_colls:
            node = heapq.heappop(ready_colls)[1]
            group = group_of[node]
            start = max(now, queue_free.get(group, 0.0))
            finish[node] = queue_free[group] = start + invariant_seconds(cost_model.node_cost(node), size)
        else:
            done = [w for w in ready_waits if w in feeds and wait_end(w) <= now]
            if done:
                node = min(done, key=position.__getitem__)
                ready_waits.remove(node)
            elif ready_work:
                node = heapq.heappop(ready_work)[3]
                now += invariant_seconds(cost_model.node_cost(node), size)
            else:
                node = min(ready_waits, key=lambda w: (w not in feeds, wait_end(w), position[w]))
                ready_waits.remove(node)
                now = max(now, wait_end(node))
        order.append(node)
        for succ in succs[node]:
            remaining[succ] -= 1
            if remaining[succ] == 0:
                push(succ)
    if len(order) != len(body):
        stuck = sorted((n for n in body if remaining[n] > 0), key=position.__getitem__)[:3]
        raise ValueError(f"dependencies form a cycle around {[n.name for n in stuck]}")
    return head + order + tail

