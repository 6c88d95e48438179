"""``overlap-schedule``: issue each collective as soon as its inputs can be ready, fill
the time it is in flight with independent compute, wait as late as possible.

**Matches** every functional collective (``_c10d_functional.*``) and its ``wait_tensor``,
and the compute around them.

**Changes** the program order. Two candidate orders are built and the one with the
smaller estimated makespan (then exposed communication) on the device profile is kept:

* *moves*: a collective (with the views and size arithmetic it reads through) moves up
  to just after the last producer of its inputs; each wait moves down to just before the
  first node that reads its data. Compute stays where it is.
* *list schedule* (``reorder_compute=True``): a list scheduler over the compute stream
  and one FIFO queue per process group. Among ready nodes it issues collectives first,
  then runs the producers of not-yet-issued collectives (moving them earlier: what
  PyTorch's own overlap scheduler never does), then takes a wait whose collective has
  (by the estimate) finished, then any other compute in program order, and only when
  nothing else is ready, blocks on the wait that finishes first.

**Safe because** every node stays after everything it reads; the issue order on each
process group is kept (per-group FIFO), random-number ops and other side-effecting ops
keep their relative order, every access to storage an in-place op writes stays on its side
of the write; and every decision reads only graph structure, shapes and
analytical costs with symbolic sizes set to one fixed value on every rank, so every
rank builds the same order. An order whose estimated peak memory exceeds the budget (and
the original peak) is not used, and the reason is recorded.

**Limits.** Graphs with an in-place op on what a collective reads or returns, or with
collectives fsc does not understand, are left alone, with the reason (other in-place ops,
such as AOTAutograd's write-backs into inputs, are fine: :mod:`fsc.analysis.safety`). It never reorders collectives of one group (that is
``prioritize-collectives``'s job) and never splits them.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from fsc.analysis.collectives import find_collectives
from fsc.analysis.cost_model import is_view
from fsc.analysis.graph import free_input_chain, positions
from fsc.analysis.list_schedule import list_schedule
from fsc.analysis.safety import reorder_blocker
from fsc.analysis.symbolic import UNBACKED_FALLBACK, invariant_value
from fsc.analysis.timeline import estimate_order, estimate_timeline, order_peak_memory, peak_memory
from fsc.graph_utils import clone_graph_module
from fsc.passes.base import Pass, PassContext, PassResult, check_memory_budget
from fsc.rewriter import GraphRewriter

#: Sizes every size symbol is set to when planning and comparing orders (the same on every
#: rank; hints are rank-local): dynamic shapes are unknown at compile time, so the order
#: kept is the one that loses least, relative to the best candidate, over this range (a
#: few dozen tokens per rank up to Inductor's unbacked fallback of 8192). The HSTU
#: forward graph needs the small end: at 8192 tokens its quadratic attention-mask work
#: dwarfs the exchange, at a few hundred it is just enough to hide it.
PLANNING_SIZES = (64, 128, 256, 512, 1024, 4096, UNBACKED_FALLBACK)


def sink_wait(rewriter: GraphRewriter, wait: fx.Node) -> bool:
    """Move ``wait`` and the views of its result down to just before the first node that
    reads the data (a view reads nothing, so it does not force the wait)."""
    order = positions(rewriter.graph)
    group = [wait]
    frontier = [wait]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user not in group and user.op == "call_function" and is_view(user):
                group.append(user)
                frontier.append(user)
    members = set(group)
    consumers = [u for n in group for u in n.users if u not in members]
    if not consumers:
        return False
    first = min(consumers, key=order.__getitem__)
    # Members that precede ``first`` end up contiguous, in their order, just before it.
    before_first = sorted((n for n in group if order[n] < order[first]), key=order.__getitem__)
    moved = False
    anchor = first
    for node in reversed(before_first):
        moved |= rewriter.move_before(node, anchor)
        anchor = node
    return moved


@dataclasses.dataclass(frozen=True, kw_only=True)
class OverlapSchedule(Pass):
    name = "overlap-schedule"

    raise_collectives: bool = True
    """Move collectives up to their inputs (the *moves* candidate)."""
    sink_waits: bool = True
    """Move waits down to their first consumer (the *moves* candidate)."""
    reorder_compute: bool = True
    """Also build the *list schedule* candidate, which moves compute."""
    memory_budget_gb: float | None = None
    """GiB; overrides the compile option ``memory_budget_gb`` for this pass."""

    def __post_init__(self) -> None:
        check_memory_budget(f"pass '{self.name}': option 'memory_budget_gb'", self.memory_budget_gb)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        blocker = reorder_blocker(graph, "not scheduled")
        if blocker is not None:
            return PassResult(modified=False, reasons=(blocker,))
        collectives = find_collectives(graph)
        budget = ctx.memory_budget_bytes if self.memory_budget_gb is None else self.memory_budget_gb * 2**30
        baseline_peak = peak_memory(graph, invariant_value)
        exposed_before = estimate_timeline(graph, ctx.cost_model).exposed_communication
        reasons: list[str] = []

        moves = clone_graph_module(gm)
        raised, sunk = self._moves(moves.graph, budget, baseline_peak, reasons)
        by_name = {n.name: n for n in graph.nodes}
        # Candidates are orders of this graph's own nodes, so their costs are computed once.
        candidates: list[tuple[str, list[fx.Node]]] = [("moves", [by_name[n.name] for n in moves.graph.nodes])]
        symbolic = any(ctx.cost_model.node_cost(n).expr is not None for n in graph.nodes)
        sizes = PLANNING_SIZES if symbolic else PLANNING_SIZES[-1:]
        if self.reorder_compute:
            seen: set[tuple[fx.Node, ...]] = set()
            for size in sizes:
                order = list_schedule(graph, ctx.cost_model, size=size)
                if tuple(order) in seen:
                    continue
                seen.add(tuple(order))
                peak = order_peak_memory(order, invariant_value)
                if budget is not None and peak > max(baseline_peak, budget):
                    reasons.append(
                        f"list schedule (planned at size {size:g}) not used: estimated peak memory "
                        f"{peak / 2**30:.3f} GiB, over the budget of {budget / 2**30:.3f} GiB"
                    )
                else:
                    candidates.append(("list", order))

        # Each candidate's makespan at every planning size, relative to the best candidate's
        # there; the one whose worst ratio is smallest is kept (ties: smaller total exposed
        # communication, then the earlier candidate, which moves less).
        spans = [[estimate_order(order, ctx.cost_model, invariant=True, size=size, memory=False)
                  for size in sizes] for _, order in candidates]
        best = [min(row[i].makespan for row in spans) for i in range(len(sizes))]

        def score(index: int) -> tuple[float, float]:
            ratio = max(t.makespan / b if b > 0 else 1.0 for t, b in zip(spans[index], best))
            return (round(ratio, 9), round(sum(t.exposed_communication for t in spans[index]), 12))

        strategy, chosen = candidates[min(range(len(candidates)), key=score)]
        rewriter = GraphRewriter(graph)
        apply_order(rewriter, [n.name for n in chosen])
        exposed_after = estimate_timeline(graph, ctx.cost_model).exposed_communication
        stats = {
            **rewriter.stats(),
            "strategy": strategy,
            "collectives": len(collectives),
            "collectives_raised": raised if strategy == "moves" else None,
            "waits_sunk": sunk if strategy == "moves" else None,
            "exposed_comm_ms_before": exposed_before * 1e3,
            "exposed_comm_ms_after": exposed_after * 1e3,
        }
        return PassResult(modified=rewriter.modified, stats=stats, reasons=tuple(reasons))

    def _moves(self, graph: fx.Graph, budget: float | None, baseline_peak: float, reasons: list[str]) -> tuple[int, int]:
        """The *moves* candidate, in place: (collectives raised, waits sunk)."""
        collectives = find_collectives(graph)
        rewriter = GraphRewriter(graph)
        raised = sunk = 0
        if self.raise_collectives:
            previous_in_group: dict[str, fx.Node] = {}
            # Placeholders stay first: Inductor and AOTAutograd expect inputs at the top.
            last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1:]
            for coll in collectives:
                node = coll.node
                order = positions(graph)
                # Views and size arithmetic feeding the collective cost nothing: they move with it.
                chain = free_input_chain(node)
                members = set(chain)
                anchors = [*last_placeholder, *(src for n in chain for src in n.all_input_nodes if src not in members)]
                prev = previous_in_group.get(coll.group_name)
                if prev is not None:
                    anchors.append(prev)
                previous_in_group[coll.group_name] = node
                anchor = max(anchors, key=order.__getitem__, default=None)
                if anchor is None:
                    continue
                # Issued earlier only if fewer other nodes would precede the collective.
                preceding_now = order[node] - (len(chain) - 1)
                preceding_then = order[anchor] + 1 - sum(order[n] <= order[anchor] for n in chain)
                if preceding_then >= preceding_now:
                    continue
                if budget is None:
                    rewriter.move_chain_after(chain, anchor)
                else:
                    peak = 0.0

                    def within_budget() -> bool:
                        nonlocal peak
                        peak = peak_memory(graph, invariant_value)
                        return peak <= max(baseline_peak, budget)

                    if not rewriter.try_move_chain_after(chain, anchor, within_budget):
                        reasons.append(
                            f"{node.name} not issued early: estimated peak memory would reach "
                            f"{peak / 2**30:.3f} GiB, over the budget of {budget / 2**30:.3f} GiB"
                        )
                        continue
                raised += 1
        if self.sink_waits:
            for coll in collectives:
                for wait in coll.waits:
                    if sink_wait(rewriter, wait):
                        sunk += 1
        return raised, sunk


def apply_order(rewriter: GraphRewriter, names: list[str]) -> None:
    """Reorder ``rewriter.graph`` to the node order ``names`` (moves counted)."""
    by_name = {n.name: n for n in rewriter.graph.nodes}
    nodes = [by_name[name] for name in names]
    anchor = next(n for n in rewriter.graph.nodes if n.op == "output")
    for node in reversed(nodes):
        if node.op in ("placeholder", "output"):
            continue
        rewriter.move_before(node, anchor)
        anchor = node
