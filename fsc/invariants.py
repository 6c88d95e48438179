"""Static checks of DESIGN.md's invariants, run by the pass manager after every pass.

Checked here, on a graph that ``torch.fx.Graph.lint`` (topological order, well-formed
nodes) has already passed: every wait follows its collective and every collective that
had a wait still has one; on each process group the collectives keep their issue order
unless the pass declares that it reorders them, in which case the new order must be a
deterministic function of the graph (re-running the pass on the same input gives the
same order: what every rank computes); collectives appear or vanish only in passes that
declare it; the estimated peak memory does not rise above the configured budget
(symbolic sizes evaluated rank-invariantly, so every rank reaches the same verdict).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch.fx as fx

from fsc.analysis.collectives import COLLECTIVE_ID, find_collectives, group_order, is_collective, is_wait
from fsc.analysis.symbolic import invariant_value
from fsc.analysis.timeline import peak_memory
from fsc.errors import InvariantError
from fsc.graph_utils import clone_graph_module
from fsc.passes.base import Pass, PassContext


def stamp_collective_ids(graph: fx.Graph) -> None:
    """Give each collective a stable identity (kept when a pass copies its meta)."""
    for node in graph.nodes:
        if is_collective(node):
            node.meta.setdefault(COLLECTIVE_ID, node.name)


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """What the checks need from a graph before a pass: its per-group collective order,
    the collectives that had waits, its rank-invariant peak memory (only under a budget),
    and a copy of the graph only when something must run it again (a determinism re-run of
    a reordering pass, or verification)."""

    order: dict[str, list[str]]
    waited: frozenset[str]
    peak: float | None
    gm: fx.GraphModule | None


def snapshot(gm: fx.GraphModule, ctx: PassContext, *, keep_graph: bool) -> Snapshot:
    return Snapshot(
        order=group_order(gm.graph),
        waited=frozenset(c.identity for c in find_collectives(gm.graph) if c.waits),
        peak=None if ctx.memory_budget_bytes is None else peak_memory(gm.graph, invariant_value),
        gm=clone_graph_module(gm) if keep_graph else None,
    )


def check_waits(waited_before: frozenset[str], after: fx.Graph) -> None:
    for coll in find_collectives(after):
        if coll.identity in waited_before and not coll.waits:
            raise ValueError(f"collective {coll.node.name} lost its wait_tensor")
    for node in after.nodes:
        if is_wait(node) and not isinstance(node.args[0], fx.Node):
            raise ValueError(f"wait {node.name} waits on a non-node argument {node.args[0]!r}")


def check(before: Snapshot, after: fx.GraphModule, p: Pass, ctx: PassContext) -> None:
    """Raise :class:`InvariantError` naming ``p`` if ``after`` breaks an invariant."""
    try:
        check_waits(before.waited, after.graph)
    except ValueError as exc:
        raise InvariantError(p.name, str(exc)) from exc
    old, new = before.order, group_order(after.graph)
    if not p.rewrites_collectives:
        old_ids = set(itertools.chain.from_iterable(old.values()))
        new_ids = set(itertools.chain.from_iterable(new.values()))
        if old_ids != new_ids:
            raise InvariantError(
                p.name,
                f"added {sorted(new_ids - old_ids)} / removed {sorted(old_ids - new_ids)} collectives "
                "without declaring rewrites_collectives",
            )
    for group in sorted(set(old) | set(new)):
        kept = set(old.get(group, ())) & set(new.get(group, ()))
        old_seq = [c for c in old.get(group, ()) if c in kept]
        new_seq = [c for c in new.get(group, ()) if c in kept]
        if old_seq == new_seq:
            continue
        if not p.reorders_collectives:
            raise InvariantError(
                p.name,
                f"changed the issue order of collectives on group {group!r} from {old_seq} to {new_seq} "
                "without declaring reorders_collectives",
            )
        if before.gm is None:
            raise InvariantError(p.name, "reordered collectives but no copy of the graph was kept to re-run it")
        again = clone_graph_module(before.gm)
        p.run(again, ctx)
        if group_order(again.graph) != new:
            raise InvariantError(
                p.name,
                f"collective order on group {group!r} is not a deterministic function of the graph "
                "(a second run chose differently), so ranks could disagree and deadlock",
            )
    budget = ctx.memory_budget_bytes
    if budget is not None and before.peak is not None:
        peak_after = peak_memory(after.graph, invariant_value)
        if peak_after > max(before.peak, budget):
            raise InvariantError(
                p.name,
                f"raised estimated peak memory from {before.peak / 2**30:.3f} GB to "
                f"{peak_after / 2**30:.3f} GB, above the budget of {budget / 2**30:.3f} GB",
            )
