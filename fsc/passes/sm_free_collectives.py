"""``sm-free-collectives``: swap eligible all-to-alls and all-reduces for the copy-engine
ops of :mod:`fsc.runtime.ops`, so communication that overlaps compute takes no SMs (GPU) or
no gloo threads (CPU ranks on one host).

**Matches** ``_c10d_functional.all_to_all_single`` nodes whose every user is a
``_c10d_functional.wait_tensor`` or a size query (``sym_size``: it reads no data), on a device a copy-engine transport serves (asked of
:func:`fsc.runtime.transport.available`: CPU on Linux x86-64; CUDA with symmetric memory
and ``cuStreamWaitValue32``), and, unless ``swap_all=true``,
with compute between the collective and its first wait (something for the transfer to
overlap; without it NCCL/gloo is as good and needs no second transport).

**Changes** each match into ``fsc::all_to_all_single`` with the same arguments, and
each of its waits into ``fsc::wait_tensor(handle, <the same arguments>)`` (see
:mod:`fsc.runtime.ops` for why the wait restates them: among others, the input stays live
and unwritten until the wait). A size query on the result is computed from the arguments
instead (the sum of the output split sizes, or the input's size). Positions do not change; the collective keeps
its identity (``fsc_collective_id``).

**Safe because** the fsc ops compute the same values as the ones they replace
(same schema, same per-group issue order; the transport is FIFO per group), and the
decision reads only the graph, the device type and this torch build, which are the same
on every rank, so every rank swaps the same collectives (a rank that swapped while another
did not would pair different collectives and hang). Whether the copy-engine path is used
is settled at run time, once per group, by all ranks together: a group that spans hosts
runs the group's own collective inside the fsc op.

**All-reduces** (``_c10d_functional.all_reduce``, ``sum`` or ``avg``, of a tensor of static
size, on a group whose size is known at compile time) become two copy-engine all-to-alls
with a small reduction between them (``all_reduce=true``, the default): the input,
flattened and zero-padded to ``R`` equal shards, goes out one shard per rank (so rank ``r``
receives every rank's shard ``r``: a reduce-scatter's traffic), rank ``r`` sums its ``R``
rows in rank order, and the summed shard goes back to every rank (an all-gather's traffic).
The bytes on the wire are a ring all-reduce's, ``2 (R-1)/R`` of the tensor per rank; the
only SM work is the sum, one read of the tensor. Every rank ends with the same bits (each
shard is summed once, by its owner). The first all-to-all is issued where the all-reduce
was; its wait, the sum and the second all-to-all go halfway (in compute nodes) to the
all-reduce's first wait, or before that, just before a later collective on the same group
whose result is needed later than the all-reduce's (the group keeps its order, so the
second all-to-all would queue behind it); each wait on the all-reduce becomes a wait on the
second all-to-all. The sum's order over ranks differs from NCCL's or gloo's (the
results agree to rounding).

**Limits.** All-gather and reduce-scatter are not swapped: the transports implement
all-to-all only (each is declined with that reason). Run it last: the analyses of the
other passes know ``_c10d_functional`` collectives only. Opt-in: not part of the default
pipeline (``in_default_pipeline = False``).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.fx as fx

import fsc.runtime.ops  # noqa: F401  (registers the fsc ops that the rewritten graphs call)
from fsc.analysis.collectives import COLLECTIVE_ID, Collective, call_arg, find_collectives, is_collective, is_wait
from fsc.analysis.cost_model import is_view
from fsc.analysis.graph import positions
from fsc.passes.base import Pass, PassContext, PassResult
from fsc.rewriter import GraphRewriter
from fsc.runtime.transport import available

FSC_ALL_TO_ALL = torch.ops.fsc.all_to_all_single.default
ALL_REDUCE_OPS = ("sum", "avg")
FSC_WAIT = torch.ops.fsc.wait_tensor.default
SYM_SIZE = torch.ops.aten.sym_size.int


def _carried(meta: dict) -> dict:
    """The meta a replacement node inherits: not ``eager_input_vals``, which describes the
    old op's arguments (Inductor would constrain the new op's inputs to them)."""
    return {k: v for k, v in meta.items() if k != "eager_input_vals"}


def _size_from_arguments(rewriter: GraphRewriter, query: fx.Node, args: tuple) -> fx.Node:
    """A node computing ``sym_size(all_to_all_result, dim)`` from the all-to-all's
    arguments: the sum of the output split sizes for dim 0 (the input's rows when they
    are not given), the input's size for any other dim. A size query reads no data, so it
    needs neither the result nor the wait."""
    source, output_splits = args[0], args[1]
    dim = query.args[1]
    if dim < 0:
        dim += query.args[0].meta["val"].dim()
    if dim != 0 or not output_splits:
        return rewriter.insert_before(query, SYM_SIZE, (source, dim), meta={"val": query.meta.get("val")})
    def value(x: Any) -> Any:
        return x.meta.get("val") if isinstance(x, fx.Node) else x

    total = output_splits[0]
    for split in output_splits[1:]:
        total = rewriter.insert_before(query, operator.add, (total, split),
                                       meta={"val": value(total) + value(split)})
    if not isinstance(total, fx.Node):  # a single static split: still a node, for the query's users
        total = rewriter.insert_before(query, operator.add, (total, 0), meta={"val": total})
    return total


def _group_size(group_name: str) -> int | None:
    """Ranks in the process group ``group_name`` in this process, or None if there is none."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return int(_resolve_process_group(group_name).size())
    except Exception:  # no such group here (a graph traced without a process group)
        return None


def _all_reduce_unsupported(coll: Collective) -> str | None:
    node = coll.node
    reduce_op = call_arg(node, "reduce_op")
    if reduce_op not in ALL_REDUCE_OPS:
        return f"reduce_op {reduce_op!r}: only {' and '.join(ALL_REDUCE_OPS)} are swapped"
    val = call_arg(node, "input").meta.get("val")
    if not isinstance(val, torch.Tensor):
        return "its input has no tensor metadata (was the graph traced with fake tensors?)"
    if not isinstance(val.numel(), int):
        return "its size is not static (the shards are fixed at compile time)"
    if _group_size(call_arg(node, "group_name")) is None:
        return f"the size of group {call_arg(node, 'group_name')!r} is unknown here (no such process group)"
    return None


MIDDLE = "fsc_sm_free_middle"
"""Node meta of what a swapped all-reduce's middle inserts: the all-reduce's name."""


def _middle(graph: fx.Graph, coll: Collective, later: list[Collective]) -> fx.Node:
    """Where a swapped all-reduce's middle (wait, sum, second all-to-all) goes: before this
    node. Halfway (in compute nodes) to the all-reduce's first wait, but before the issue of
    a later collective on the group whose result is needed later (after more compute than
    this one's; an earlier swapped all-reduce's second all-to-all counts too): the group
    runs its collectives in issue order, so the second all-to-all would wait for that
    transfer. One needed as soon (the buckets' all-reduces waited together at the end of a
    backward) may go first: then a rank that reaches the middle before its peers have
    issued the all-reduce keeps computing instead of waiting."""
    order = positions(graph)

    def work(m: fx.Node) -> bool:  # the graph's own compute (not another all-reduce's middle)
        return _is_compute(m) and MIDDLE not in m.meta

    done = 0
    before: dict[fx.Node, int] = {}  # compute nodes ahead of each node
    for m in graph.nodes:
        before[m] = done
        done += work(m)

    def needed(waits: Sequence[fx.Node]) -> float:
        return before[min(waits, key=order.__getitem__)] if waits else float("inf")

    # the group's issues after this one: later collectives, and the second all-to-alls of
    # all-reduces swapped before it whose middles came after its issue
    group = call_arg(coll.node, "group_name")
    issues = [(c.node, needed(c.waits)) for c in later]
    issues += [(m, needed([u for u in m.users if u.target is FSC_WAIT])) for m in graph.nodes
               if m.target is FSC_ALL_TO_ALL and MIDDLE in m.meta and m.args[3] == group
               and order[m] > order[coll.node]]
    first_wait, mine = min(coll.waits, key=order.__getitem__), needed(coll.waits)
    between = [m for m in graph.nodes if order[coll.node] < order[m] < order[first_wait] and work(m)]
    middle = between[len(between) // 2] if between else first_wait
    blocking = [node for node, when in issues if order[node] < order[middle] and when > mine]
    return min(blocking, key=order.__getitem__) if blocking else middle


def _is_compute(node: fx.Node) -> bool:
    if node.op != "call_function" or is_collective(node) or is_wait(node) or is_view(node):
        return False
    if node.target in (FSC_ALL_TO_ALL, FSC_WAIT):
        return False
    val = node.meta.get("val")
    values = val if isinstance(val, (list, tuple)) else [val]
    return any(isinstance(v, torch.Tensor) for v in values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmFreeCollectives(Pass):
    name = "sm-free-collectives"
    rewrites_collectives = True
    in_default_pipeline: ClassVar[bool] = False

    swap_all: bool = False
    """Swap eligible collectives even when no compute overlaps them."""
    all_reduce: bool = True
    """Also swap all-reduces (two all-to-alls and a sum; module docstring)."""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        collectives = find_collectives(gm.graph)
        if not collectives:
            return PassResult(modified=False, reasons=("no functional collectives",))
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        nodes = list(gm.graph.nodes)
        rewriter = GraphRewriter(gm.graph)
        reasons: list[str] = []
        swapped = 0
        for index, coll in enumerate(collectives):
            reason = self._decline(coll, order, nodes)
            if reason is not None:
                reasons.append(f"{coll.kind} {coll.node.name!r} not swapped: {reason}")
                continue
            if coll.kind == "all_reduce":
                later = [c for c in collectives[index + 1:] if c.group_name == coll.group_name]
                self._swap_all_reduce(rewriter, coll, later)
            else:
                self._swap(rewriter, coll.node, coll.waits)
            swapped += 1
        return PassResult(
            modified=rewriter.modified,
            stats={**rewriter.stats(), "collectives": len(collectives), "swapped": swapped},
            reasons=tuple(reasons),
        )

    def _decline(self, coll: Collective, order: dict[fx.Node, int], nodes: list[fx.Node]) -> str | None:
        if coll.kind == "all_reduce":
            if not self.all_reduce:
                return "all_reduce=false"
            reason = _all_reduce_unsupported(coll)
            if reason is not None:
                return reason
        elif coll.kind != "all_to_all_single":
            return "the copy-engine transports implement all_to_all_single only (and all_reduce through it)"
        if not coll.waits:
            return "nothing waits on its result"
        others = [u for u in coll.node.users if u not in coll.waits]
        if coll.kind == "all_reduce" and others:
            return f"its result is read by {others[0].name} ({others[0].target}), not by wait_tensor"
        unsized = [u for u in others if u.target is not SYM_SIZE]
        if unsized:
            return (f"its result is read by {unsized[0].name} ({unsized[0].target}), not by wait_tensor "
                    "or a size query")
        val = coll.node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return "it has no tensor metadata (was the graph traced with fake tensors?)"
        # No group: this build's and platform's facts only, alike on every rank.
        unavailable = available(val.device)
        if unavailable is not None:
            return unavailable
        if not self.swap_all:
            first_wait = min(order[w] for w in coll.waits)
            if not any(_is_compute(n) for n in nodes[order[coll.node] + 1:first_wait]):
                return ("nothing computes while it is in flight (its wait follows at once); schedule it with "
                        "overlap-schedule first, or set swap_all=true")
        return None

    @staticmethod
    def _swap_all_reduce(rewriter: GraphRewriter, coll: Collective, later: list[Collective]) -> None:
        node = coll.node
        source = call_arg(node, "input")
        reduce_op, group = call_arg(node, "reduce_op"), call_arg(node, "group_name")
        val = source.meta["val"]
        world, n = _group_size(group), int(val.numel())
        chunk = -(-n // world)
        ones = [1] * world
        aten = torch.ops.aten

        def add(anchor: fx.Node, target: Any, *args: Any, **extra: Any) -> fx.Node:
            vals = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
            with val.fake_mode:
                out = target(*vals)
            return rewriter.insert_before(anchor, target, args, meta={**extra, "val": out})

        flat = source
        if not val.is_contiguous():
            flat = add(node, aten.clone.default, flat)  # a contiguous copy (clone keeps dense strides)
        flat = add(node, aten.view.default, flat, [n])
        if chunk * world != n:
            flat = add(node, aten.constant_pad_nd.default, flat, [0, chunk * world - n], 0.0)
        shards = add(node, aten.view.default, flat, [world, chunk])
        ident = node.meta.get(COLLECTIVE_ID, node.name)
        scatter = add(node, FSC_ALL_TO_ALL, shards, ones, ones, group, **{COLLECTIVE_ID: f"{ident}.scatter"})
        middle = _middle(rewriter.graph, coll, later)
        mark = {MIDDLE: ident}
        mine = add(middle, FSC_WAIT, scatter, shards, ones, ones, group, **mark)
        total = add(middle, aten.sum.dim_IntList, mine, [0], True, **mark)
        if reduce_op == "avg":
            total = add(middle, aten.div.Scalar, total, world, **mark)
        spread = add(middle, aten.expand.default, total, [world, chunk], **mark)
        copies = add(middle, aten.clone.default, spread, **mark)
        gather = add(middle, FSC_ALL_TO_ALL, copies, ones, ones, group, **{COLLECTIVE_ID: f"{ident}.gather"}, **mark)
        for wait in coll.waits:
            whole = add(wait, FSC_WAIT, gather, copies, ones, ones, group)
            whole = add(wait, aten.view.default, whole, [world * chunk])
            if chunk * world != n:
                whole = add(wait, aten.slice.Tensor, whole, 0, 0, n)
            whole = add(wait, aten.view.default, whole, list(val.shape))
            rewriter.replace(wait, whole)
        rewriter.erase(node)

    @staticmethod
    def _swap(rewriter: GraphRewriter, node: fx.Node, waits: tuple[fx.Node, ...]) -> None:
        args = tuple(call_arg(node, name) for name in ("input", "output_split_sizes", "input_split_sizes",
                                                          "group_name"))
        handle = node.meta["val"].new_empty((1,), dtype=torch.int64, device="cpu")  # the fake handle
        new = rewriter.insert_before(node, FSC_ALL_TO_ALL, args, meta={
            **_carried(node.meta), "val": handle, COLLECTIVE_ID: node.meta.get(COLLECTIVE_ID, node.name)})
        for wait in waits:
            # The wait restates the all-to-all: its input stays live (and unwritten) until here.
            new_wait = rewriter.insert_before(wait, FSC_WAIT, (new, *args), meta=_carried(wait.meta))
            rewriter.replace(wait, new_wait)
        for query in [u for u in node.users if u.target is SYM_SIZE]:
            rewriter.replace(query, _size_from_arguments(rewriter, query, args))
        rewriter.erase(node)
