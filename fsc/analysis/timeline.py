"""Estimated execution of a graph in its current order: one compute stream plus one FIFO
queue per process group, and the liveness of every buffer.

This is the estimate behind ``exposed_comm_ms_*`` and ``makespan_ms_*`` in the compile
record and the memory check of the pass manager; :func:`exposed_lower_bound` says how
much of the communication no order can hide.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from fsc.analysis.collectives import describe, is_collective, is_wait
from fsc.analysis.cost_model import CostModel, invariant_seconds, is_view
from fsc.analysis.symbolic import UNBACKED_FALLBACK, hint, invariant_value, tensor_nbytes


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    node: str
    lane: str
    """``compute``, ``comm:<group>`` or ``wait``."""
    start: float
    end: float


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Timeline:
    """Seconds on the device profile; bytes for memory."""

    makespan: float
    compute: float
    communication: float
    exposed_communication: float
    peak_memory: float
    events: tuple[Event, ...]

    def summary(self) -> dict[str, float]:
        return {
            "makespan_ms": self.makespan * 1e3,
            "compute_ms": self.compute * 1e3,
            "comm_ms": self.communication * 1e3,
            "exposed_comm_ms": self.exposed_communication * 1e3,
            "peak_memory_mb": self.peak_memory / 2**20,
        }


def estimate_timeline(graph: fx.Graph, cost_model: CostModel, *, invariant: bool = False,
                      size: float = UNBACKED_FALLBACK, memory: bool = True) -> Timeline:
    """Simulate ``graph`` in program order.

    A collective is issued on the compute stream at its position and runs on its group's
    queue once every earlier collective of the group is done (per-group FIFO). A wait
    blocks the compute stream until its collective ends; that blocked time is the exposed
    communication. ``memory=False`` skips the peak-memory estimate (reported as 0).
    ``invariant=True`` evaluates symbolic sizes rank-invariantly (for
    decisions), every symbol at ``size``; the default uses the size hints (for reports).
    """
    return estimate_order(list(graph.nodes), cost_model, invariant=invariant, size=size, memory=memory)


def estimate_order(nodes: list[fx.Node], cost_model: CostModel, *, invariant: bool = False,
                   size: float = UNBACKED_FALLBACK, memory: bool = True) -> Timeline:
    """:func:`estimate_timeline` of a graph's nodes run in the order ``nodes`` (every node
    once, each after its inputs) without moving them: lets a scheduler compare candidate
    orders with the node costs it has already computed."""
    now = 0.0
    compute = comm = exposed = 0.0
    queue_free: dict[str, float] = {}
    done: dict[fx.Node, float] = {}
    events: list[Event] = []
    for node in nodes:
        cost = cost_model.node_cost(node)
        if invariant:
            cost = dataclasses.replace(cost, seconds=invariant_seconds(cost, size))
        if is_collective(node):
            group = describe(node).group_name
            start = max(now, queue_free.get(group, 0.0))
            end = start + cost.seconds
            queue_free[group] = end
            done[node] = end
            comm += cost.seconds
            events.append(Event(node=node.name, lane=f"comm:{group}", start=start, end=end))
        elif is_wait(node):
            source = node.args[0]
            end = done.get(source, now) if isinstance(source, fx.Node) else now
            if end > now:
                events.append(Event(node=node.name, lane="wait", start=now, end=end))
                exposed += end - now
                now = end
        elif cost.lane == "compute":
            events.append(Event(node=node.name, lane="compute", start=now, end=now + cost.seconds))
            now += cost.seconds
            compute += cost.seconds
    makespan = max([now, *queue_free.values()])
    return Timeline(
        makespan=makespan,
        compute=compute,
        communication=comm,
        exposed_communication=exposed,
        peak_memory=order_peak_memory(nodes, invariant_value if invariant else hint) if memory else 0.0,
        events=tuple(events),
    )


def _aliases(node: fx.Node) -> bool:
    """Views, getitem, and waits (a wait returns the collective's own buffer)."""
    return node.op == "call_function" and (is_view(node) or is_wait(node))


def output_nbytes(node: fx.Node, size: Callable[[Any], float] = hint) -> float:
    """Bytes ``node`` allocates (0 for views and aliases); ``size`` turns a possibly
    symbolic byte count into a number."""
    if _aliases(node):
        return 0.0
    flat, _ = tree_flatten(node.meta.get("val"))
    return sum(size(tensor_nbytes(t)) for t in flat if isinstance(t, torch.Tensor))


def _storage_root(node: fx.Node) -> fx.Node:
    """The node that owns the buffer ``node`` views (follows views and getitem)."""
    while _aliases(node) and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def peak_memory(graph: fx.Graph, size: Callable[[Any], float] = hint) -> float:
    """Peak bytes live when ``graph`` runs in its current order.

    Symbolic sizes are evaluated by ``size``: at their hints by default (for reports);
    decisions pass :func:`fsc.analysis.symbolic.invariant_value` so every rank agrees.

    Inputs stay live throughout; every other buffer lives from its producer to its last
    reader (a view extends the life of the buffer it views). A collective also holds its
    input until its wait, since the transport reads it while the collective is in flight.
    """
    return order_peak_memory(list(graph.nodes), size)


def order_peak_memory(nodes: list[fx.Node], size: Callable[[Any], float] = hint) -> float:
    """:func:`peak_memory` of a graph's nodes run in the order ``nodes``."""
    order = {node: i for i, node in enumerate(nodes)}
    roots: dict[fx.Node, fx.Node] = {}

    def root(node: fx.Node) -> fx.Node:
        if node not in roots:
            roots[node] = _storage_root(node)
        return roots[node]

    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        readers = [node]
        if is_wait(node) and isinstance(node.args[0], fx.Node):
            readers.append(node.args[0])
        for reader in readers:
            for src in reader.all_input_nodes:
                owner = root(src)
                last_use[owner] = max(last_use.get(owner, -1), order[node])
    frees: dict[int, float] = {}
    live = peak = 0.0
    for node in nodes:
        # The output node allocates nothing: what it returns was counted where it was made.
        nbytes = output_nbytes(node, size) if root(node) is node and node.op != "output" else 0.0
        live += nbytes
        if node.op != "placeholder":
            free_at = last_use.get(node, order[node])
            frees[free_at] = frees.get(free_at, 0.0) + nbytes
        peak = max(peak, live)
        live -= frees.pop(order[node], 0.0)
    return peak


def exposed_lower_bound(graph: fx.Graph, cost_model: CostModel) -> float:
    """Seconds of exposed communication that no order of ``graph``'s nodes can avoid, on
    the model of :func:`estimate_timeline` (sizes at their hints).

    The compute stream is serial, so a collective cannot finish before all compute it
    depends on has run, nor before each collective it depends on has finished and the
    compute between the two has run; this gives an earliest finish ``EF(c)`` (per-group
    FIFO can only delay it further). When a wait on ``c`` completes, the stream has done at
    most the compute that does not depend on the wait, so

        exposed >= max over waits w on c of  EF(c) - (compute total - compute after w).

    A lower bound, not a schedule: it is what independent compute could hide at best.
    """
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    seconds = {n: cost_model.node_cost(n).seconds if cost_model.node_cost(n).lane == "compute" else 0.0
               for n in body}
    total = sum(seconds.values())

    def closure(starts: list[fx.Node], step: Callable[[fx.Node], list[fx.Node]]) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        todo = list(starts)
        while todo:
            for nxt in step(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    collectives = [n for n in body if is_collective(n)]
    ancestors = {c: closure([c], lambda n: n.all_input_nodes) for c in collectives}
    earliest: dict[fx.Node, float] = {}
    bound = 0.0
    for coll in collectives:  # program order: a collective's collective ancestors come first
        start = sum(seconds.get(n, 0.0) for n in ancestors[coll])
        for prior in collectives:
            if prior in ancestors[coll] and prior in earliest:
                after = closure([w for w in prior.users if is_wait(w)], lambda n: list(n.users))
                between = sum(seconds.get(n, 0.0) for n in ancestors[coll] & after)
                start = max(start, earliest[prior] + between)
        earliest[coll] = start + cost_model.node_cost(coll).seconds
        for wait in (w for w in coll.users if is_wait(w)):
            after = closure([wait], lambda n: list(n.users))
            bound = max(bound, earliest[coll] - (total - sum(seconds.get(n, 0.0) for n in after)))
    return bound
