"""``overlap-schedule``: issue each collective as early as its inputs allow, wait as late
as its consumers allow.

**Matches** every functional collective (``_c10d_functional.*``) and its ``wait_tensor``.

**Changes** the position of those nodes only: a collective (with the views and size
arithmetic it reads through) moves up to just after the last producer of its inputs (and never above the previous collective of its process
group); each wait moves down to just before the first node that reads its data (views of the
result move with it: they read nothing). Compute in between
now overlaps the transfer.

**Safe because** only collectives and waits move, each stays after everything it reads
and before everything that reads it, and the issue order on each process group is kept
(per-group FIFO, the same on every rank: the decision reads only graph structure). A
raise that would lift the estimated peak memory (buffers held longer) above the budget
is not made, and is recorded as a reason; with symbolic shapes that check evaluates every
size symbol at the same fixed value on every rank, so ranks cannot decide differently.

**Limits.** It does not move compute: a collective whose inputs are produced late stays
where they put it. Graphs with in-place ops or collectives fsc does not understand are
left alone, with the reason.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from fsc.analysis.collectives import WAIT_TENSOR, find_collectives, opaque_collectives
from fsc.analysis.cost_model import is_view
from fsc.analysis.graph import positions
from fsc.analysis.symbolic import invariant_value
from fsc.analysis.timeline import estimate_timeline, peak_memory
from fsc.config import check_memory_budget
from fsc.pass_manager import Pass, PassContext, PassResult
from fsc.rewriter import GraphRewriter


def mutating_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Call nodes whose schema writes one of its arguments."""
    out = []
    for node in graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            if any(a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments):
                out.append(node)
    return out


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


def view_inputs(node: fx.Node) -> list[fx.Node]:
    """``node`` preceded by the free nodes (views, size arithmetic) it reads through,
    transitively, in program order. Only nodes used by nothing but this chain are taken,
    so moving them up moves nothing else."""
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


def sink_wait(rewriter: GraphRewriter, wait: fx.Node) -> bool:
    """Move ``wait`` and the views of its result down to just before the first node that
    reads the data (a view reads nothing, so it does not force the wait)."""
    order = positions(rewriter.graph)
    group = [wait]
    frontier = [wait]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user not in group and user.op == "call_function" and is_view(user) and user.target is not WAIT_TENSOR:
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
    """Move collectives up to their inputs."""
    sink_waits: bool = True
    """Move waits down to their first consumer."""
    memory_budget_gb: float | None = None
    """GiB; overrides the compile option ``memory_budget_gb`` for this pass."""

    def __post_init__(self) -> None:
        check_memory_budget(f"pass '{self.name}': option 'memory_budget_gb'", self.memory_budget_gb)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        collectives = find_collectives(graph)
        if not collectives:
            return PassResult(modified=False, reasons=("no collectives in the graph",))
        opaque = opaque_collectives(graph)
        if opaque:
            return PassResult(
                modified=False,
                reasons=(f"not scheduled: communication op {opaque[0].target} is not a functional collective "
                         "fsc understands; use torch.distributed._functional_collectives",),
            )
        mutations = mutating_nodes(graph)
        if mutations:
            return PassResult(
                modified=False,
                reasons=(f"not scheduled: in-place op {mutations[0].target} ({mutations[0].name}) may alias "
                         "what a collective reads or writes",),
            )
        rewriter = GraphRewriter(graph)
        reasons: list[str] = []
        raised = sunk = 0
        exposed_before = estimate_timeline(graph, ctx.cost_model).exposed_communication
        if self.raise_collectives:
            budget = ctx.memory_budget_bytes if self.memory_budget_gb is None else self.memory_budget_gb * 2**30
            baseline_peak = peak_memory(graph, invariant_value)
            previous_in_group: dict[str, fx.Node] = {}
            # Placeholders stay first: Inductor and AOTAutograd expect inputs at the top.
            last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1:]
            for coll in collectives:
                node = coll.node
                order = positions(graph)
                # Views feeding the collective cost nothing: they move up with it.
                chain = view_inputs(node)
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
        exposed_after = estimate_timeline(graph, ctx.cost_model).exposed_communication
        stats = {
            **rewriter.stats(),
            "collectives": len(collectives),
            "collectives_raised": raised,
            "waits_sunk": sunk,
            "exposed_comm_ms_before": exposed_before * 1e3,
            "exposed_comm_ms_after": exposed_after * 1e3,
        }
        return PassResult(modified=rewriter.modified, stats=stats, reasons=tuple(reasons))

