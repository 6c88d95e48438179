"""``prioritize-collectives``: on each process group, issue the collective whose result
is needed soonest first.

**Matches** process groups with two or more functional collectives.

**Changes** the issue order of collectives within a group. Each collective's urgency is
the latest start time of its wait on the graph's critical path (an ALAP schedule of the
schedule graph with analytical costs): the smaller, the sooner its result is needed.
Collectives on one group complete in issue order (per-group FIFO), so a more urgent
collective is moved, with the views and size arithmetic it reads through, to just before
a less urgent one issued earlier, whenever its inputs are ready there. Ties keep program
order.

**Safe because** a collective only moves to a place where everything it reads is already
computed, and the values a collective moves do not depend on when it is issued. The new
order is a function of graph structure, shapes and rank-invariant costs only (symbolic
sizes at one fixed value), so every rank chooses the same order; the pass manager checks
that by running the pass twice.

**Limits.** Graphs with an in-place op on what a collective reads or returns, or with
collectives fsc does not understand, are left alone, with the reason (other in-place ops,
such as AOTAutograd's write-backs into inputs, are fine: :mod:`fsc.analysis.safety`). It does not move compute to make a collective's inputs ready sooner
(``overlap-schedule`` does), and does not reorder collectives that depend on each other
(e.g. the steps of an embedding exchange).
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from fsc.analysis.collectives import find_collectives, is_collective, is_wait
from fsc.analysis.cost_model import CostModel, invariant_seconds
from fsc.analysis.graph import free_input_chain, positions
from fsc.analysis.safety import reorder_blocker
from fsc.passes.base import Pass, PassContext, PassResult
from fsc.rewriter import GraphRewriter


def latest_starts(graph: fx.Graph, cost_model: CostModel) -> dict[fx.Node, float]:
    """ALAP latest start time of every node, relative to the end of the graph (<= 0)."""
    latest: dict[fx.Node, float] = {}
    for node in reversed(graph.nodes):
        end = min((latest[user] for user in node.users), default=0.0)
        duration = 0.0 if is_wait(node) or node.op in ("placeholder", "output") else invariant_seconds(
            cost_model.node_cost(node)
        )
        latest[node] = end - duration
    return latest


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrioritizeCollectives(Pass):
    name = "prioritize-collectives"
    reorders_collectives = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        blocker = reorder_blocker(graph, "not prioritized")
        if blocker is not None:
            return PassResult(modified=False, reasons=(blocker,))
        collectives = find_collectives(graph)
        groups: dict[str, list[fx.Node]] = {}
        for coll in collectives:
            groups.setdefault(coll.group_name, []).append(coll.node)
        if all(len(nodes) < 2 for nodes in groups.values()):
            return PassResult(modified=False, reasons=("no process group has two collectives to order",))
        latest = latest_starts(graph, ctx.cost_model)
        urgency = {
            c.node: min((latest[w] for w in c.waits), default=0.0) for c in collectives
        }
        rewriter = GraphRewriter(graph)
        reordered = 0
        reasons: list[str] = []
        for group, nodes in groups.items():
            if len(nodes) < 2:
                continue
            moved, held = self._order_group(rewriter, nodes, urgency)
            reordered += moved
            reasons.extend(f"group {group!r}: {later.name} is needed before {earlier.name} but stays after it: {why}"
                           for later, (earlier, why) in held.items())
            if not moved and not held:
                reasons.append(f"group {group!r}: its {len(nodes)} collectives are already issued most urgent first")
        return PassResult(
            modified=rewriter.modified,
            reasons=tuple(reasons),
            stats={**rewriter.stats(), "collectives": len(collectives), "reordered": reordered},
        )

    @staticmethod
    def _order_group(
        rewriter: GraphRewriter, nodes: list[fx.Node], urgency: dict[fx.Node, float]
    ) -> tuple[int, dict[fx.Node, tuple[fx.Node, str]]]:
        """Move urgent collectives ahead of less urgent earlier ones, one step at a time,
        until no move is possible (each move strictly improves the order, so it ends).
        Returns the moves and, for each urgent collective left behind a less urgent one,
        that one and why it could not move."""
        moved = 0
        changed = True
        held: dict[fx.Node, tuple[fx.Node, str]] = {}
        while changed:
            changed = False
            held.clear()
            order = positions(rewriter.graph)
            sequence = sorted(nodes, key=order.__getitem__)
            for earlier, later in zip(sequence, sequence[1:]):
                if round(urgency[later], 12) >= round(urgency[earlier], 12):
                    continue
                chain = free_input_chain(later)
                members = set(chain)
                inputs = [src for n in chain for src in n.all_input_nodes if src not in members]
                if any(order[src] >= order[earlier] for src in inputs):
                    held[later] = (earlier, _why_not_ready(earlier, inputs, order))
                    continue
                if any(is_collective(n) for n in chain[:-1]):
                    held[later] = (earlier, "another collective sits in the views it reads through")
                    continue
                anchor = earlier.prev
                rewriter.move_chain_after(chain, anchor)
                moved += 1
                changed = True
                break
        return moved, held


def _why_not_ready(earlier: fx.Node, inputs: list[fx.Node], order: dict[fx.Node, int]) -> str:
    """Why a collective's inputs are not ready before ``earlier``. (They never read
    ``earlier``'s result: its wait would then be needed sooner than this one's.)"""
    late = min((src for src in inputs if order[src] >= order[earlier]), key=order.__getitem__)
    return f"its input {late.name} is computed after {earlier.name} (overlap-schedule may move it)"
