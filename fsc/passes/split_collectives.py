"""``split-collectives``: split an all-to-all into chunks along its rows, so that work on
the first chunk starts while the next one is still in flight.

**Matches** ``all_to_all_single`` + ``wait_tensor`` pairs with explicit split-size lists
(ints or data-dependent SymInts) whose result feeds *row-wise* work: nodes where output row
i depends only on row i of the exchanged rows. Row-wise here means pointwise ops (with
broadcast operands that have no row axis, or operands holding the same rows, which are
split alongside), ``embedding`` looked up with exchanged ids, ``mm``/``addmm`` with the
rows on the left, dtype conversions, and views that keep the row axis. The row-wise region
may end in

- the *reverse* all-to-all (same group, its input splits are this one's output splits:
  an embedding lookup's way back), which is split the same way and reassembled after its
  wait;
- ``embedding_dense_backward`` with the exchanged rows as gradient (a sharded table's
  backward), computed per chunk and summed;
- anything else, which gets the chunks concatenated back into the original row order.

**Changes** the all-to-all into ``chunks`` all-to-alls. Each peer's segment of s rows is
cut into parts of ``(s + k - 1 - c) // k`` rows (c = 0..k-1), computed in the graph when s
is data-dependent; chunk c sends part c of every segment. The row-wise region is copied
once per chunk, and its outputs are reassembled (``split_with_sizes`` + ``cat``) into the
original row order. ``overlap-schedule`` (after this pass in the default pipeline) then
overlaps chunk c's compute with chunk c+1's transfer.

**Safe because** every peer cuts its segments by the same formula from sizes both sides
know (sender's input split = receiver's output split), so chunk c on the sender matches
chunk c on the receiver; row-wise ops commute with splitting rows; reassembly puts every
row back where it was. The decision depends on graph structure and rank-invariant sizes
only, so every rank adds the same collectives in the same order. Values are bit-exact
except the per-chunk sum of ``embedding_dense_backward``, which reorders float additions
(the pass's declared tolerance covers that).

**Limits.** It declines, with the reason: all-to-alls without split-size lists ("split
sizes unknown"), results whose first consumer mixes rows (``index_select``, reductions,
matmuls with the rows on the right, attention) so nothing could start on the first chunk,
messages below ``min_bytes``, exchanges where the cost model estimates that the overlap
gained is smaller than the chunks' extra latency and copies (``force=true`` skips that),
and graphs with an in-place op on what a collective reads or returns or with collectives
fsc does not understand (:mod:`fsc.analysis.safety`). It splits along rows
(dim 0) only, and does not split all-gather, reduce-scatter or all-reduce.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fsc.analysis.collectives import COLLECTIVE_ID, call_arg, describe, find_collectives, is_collective, is_wait
from fsc.analysis.cost_model import CostModel, invariant_seconds
from fsc.analysis.graph import positions
from fsc.analysis.safety import reorder_blocker
from fsc.analysis.symbolic import invariant_value
from fsc.errors import OptionError
from fsc.passes.base import Pass, PassContext, PassResult
from fsc.rewriter import GraphRewriter

aten = torch.ops.aten
_C10D = torch.ops._c10d_functional
_A2A = _C10D.all_to_all_single.default

# Views that keep dim 0 as the row axis when their dim argument is >= 1.
_ROW_KEEPING_VIEWS = {aten.unsqueeze.default, aten.select.int, aten.slice.Tensor}
_CONVERSIONS = {aten._to_copy.default, aten.clone.default, aten.alias.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Scatter-adds of rows into a table (a sharded embedding's backward, as Inductor decomposes
# embedding_dense_backward): per chunk, each accumulating into the previous chunk's result.
_ACCUMULATES = {aten._unsafe_masked_index_put_accumulate.default, aten.index_put.default}


def _accumulate_args(node: fx.Node) -> tuple[Any, Any, list, Any]:
    """(base, mask or None, indices, values) of an accumulating index_put."""
    if node.target is aten._unsafe_masked_index_put_accumulate.default:
        base, mask, indices, values = node.args[:4]
        return base, mask, list(indices), values
    base, indices, values = node.args[:3]
    return base, None, list(indices), values


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def _same(a: Any, b: Any) -> bool:
    """Sizes or split entries that are provably equal (the same node, equal ints, or
    SymInts equal for every value of their symbols)."""
    if a is b:
        return True
    a, b = _val(a), _val(b)
    if isinstance(a, (int, torch.SymInt)) and isinstance(b, (int, torch.SymInt)):
        return statically_known_true(a == b)
    return False


def _same_splits(a: Any, b: Any) -> bool:
    return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and all(
        _same(x, y) for x, y in zip(a, b)
    )


def _mixing_reason(wait: fx.Node, order: dict[fx.Node, int]) -> str:
    """Why no row-wise work follows an exchange: its first consumer mixes rows. A flat
    exchange regrouped by reshapes (TorchRec's embedding exchanges send ``[rows * D]`` and
    view the result as ``[rows, D]``) is followed to the op after the reshapes, which is
    named as well."""
    first = min(wait.users, key=order.__getitem__, default=None)
    if first is None:
        return "its result is not used; nothing to overlap"
    what = f"{first.name} ({first.target})"
    node, shape = first, None
    while node.op == "call_function" and node.target in _RESHAPES and node.users:
        shape = _val(node).shape if isinstance(_val(node), torch.Tensor) else None
        node = min(node.users, key=order.__getitem__)
    if node is first or shape is None:
        return f"the first consumer of its rows, {what}, mixes rows; no work could start on the first chunk"
    dims = ", ".join(str(d) for d in shape)
    return (f"its rows are regrouped into [{dims}] by {what}, then {node.name} ({node.target}) mixes those rows; "
            "no work could start on the first chunk")


@dataclasses.dataclass(slots=True)
class _Plan:
    """What one split rewrites: the exchange, its row-wise region (program order), the
    side inputs split alongside, and how the region ends."""

    a2a: fx.Node
    wait: fx.Node
    region: list[fx.Node]
    side: set[fx.Node]
    reverses: dict[fx.Node, fx.Node]
    """reverse all-to-all -> its wait"""
    reductions: list[fx.Node]
    exits: dict[fx.Node, list[fx.Node]]
    """region node -> its users outside the region (they get the reassembled rows)"""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitCollectives(Pass):
    name = "split-collectives"
    rewrites_collectives = True
    # embedding_dense_backward summed per chunk reorders fp32 additions; nothing else changes.
    tolerance = (1e-5, 1e-6)

    chunks: int = 2
    """Chunks per split all-to-all (k)."""
    min_bytes: int = 1 << 20
    """Bytes moved (the exchange plus its reverse, rank-invariant estimate) below which an
    exchange is not split: each chunk pays the collective's latency again."""
    force: bool = False
    """Split every eligible exchange above ``min_bytes`` even when the cost model estimates
    that it does not pay (for measuring, and for tests)."""

    def __post_init__(self) -> None:
        if not isinstance(self.chunks, int) or isinstance(self.chunks, bool) or self.chunks < 2:
            raise OptionError(f"pass '{self.name}': option 'chunks' must be an int >= 2, got {self.chunks!r}")
        if not isinstance(self.min_bytes, int) or isinstance(self.min_bytes, bool) or self.min_bytes < 0:
            raise OptionError(f"pass '{self.name}': option 'min_bytes' must be an int >= 0, got {self.min_bytes!r}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        blocker = reorder_blocker(graph, "not split")
        if blocker is not None:
            return PassResult(modified=False, reasons=(blocker,))
        candidates = [c.node for c in find_collectives(graph) if c.kind == "all_to_all_single"]
        if not candidates:
            return PassResult(modified=False, reasons=("no all_to_all_single to split",))
        if detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]) is None:
            return PassResult(modified=False, reasons=("not split: the graph carries no fake tensor values to size chunks with",))
        rewriter = GraphRewriter(graph)
        reasons: list[str] = []
        taken: set[fx.Node] = set()
        split = 0
        for node in candidates:
            if node in taken:
                continue
            plan = self._plan(node, ctx.cost_model)
            if isinstance(plan, str):
                reasons.append(f"{node.name} not split: {plan}")
                continue
            taken.update(plan.reverses)
            _Splitter(rewriter, plan, self.chunks).apply()
            split += 1
        return PassResult(
            modified=rewriter.modified,
            stats={**rewriter.stats(), "all_to_alls": len(candidates), "split": split, "chunks": self.chunks},
            reasons=tuple(reasons),
        )

    # -- analysis ---------------------------------------------------------------------

    def _plan(self, a2a: fx.Node, cost_model: CostModel) -> _Plan | str:
        out_splits, in_splits = call_arg(a2a, "output_split_sizes"), call_arg(a2a, "input_split_sizes")
        if not (isinstance(out_splits, (list, tuple)) and out_splits and isinstance(in_splits, (list, tuple))
                and in_splits):
            return "split sizes unknown (no split-size lists in the graph)"
        waits = [u for u in a2a.users if is_wait(u)]
        if len(waits) != 1 or not _only_sizes_besides(a2a, waits[0]):
            return "its result is used other than through one wait_tensor"
        wait = waits[0]
        rows = _val(wait).shape[0] if isinstance(_val(wait), torch.Tensor) and _val(wait).dim() else None
        if rows is None:
            return "its result has no row axis"
        group = str(call_arg(a2a, "group_name"))
        order = positions(a2a.graph)
        region, members = [wait], {wait}
        side: set[fx.Node] = set()
        reverses: dict[fx.Node, fx.Node] = {}
        reductions: list[fx.Node] = []
        exits: dict[fx.Node, list[fx.Node]] = {}
        frontier = sorted(wait.users, key=order.__getitem__)
        seen: set[fx.Node] = set()
        while frontier:
            node = frontier.pop(0)
            if node in seen:
                continue
            seen.add(node)
            kind, extra = self._classify(node, members, rows, out_splits, group)
            if kind == "rowwise":
                region.append(node)
                members.add(node)
                side.update(extra)
                frontier = sorted(set(frontier) | set(node.users), key=order.__getitem__)
            elif kind == "reverse":
                region.append(node)
                members.add(node)
                reverses[node] = extra
            elif kind in ("reduce", "accumulate"):
                region.append(node)
                members.add(node)
                side.update(extra)
                reductions.append(node)
            else:
                for src in node.all_input_nodes:
                    if src in members and src not in reverses and src not in reductions:
                        exits.setdefault(src, []).append(node)
        if len(region) == 1:
            return _mixing_reason(wait, order)
        nbytes = invariant_value(describe(a2a).nbytes) + sum(invariant_value(describe(r).nbytes) for r in reverses)
        if nbytes < self.min_bytes:
            return f"moves about {int(nbytes)} bytes, below min_bytes={self.min_bytes}"
        region.sort(key=order.__getitem__)
        verdict = None if self.force else self._worth_it(a2a, region, reverses, cost_model)
        if verdict is not None:
            return verdict
        return _Plan(a2a=a2a, wait=wait, region=region, side=side, reverses=reverses, reductions=reductions,
                     exits=exits)

    def _worth_it(self, a2a: fx.Node, region: list[fx.Node], reverses: dict[fx.Node, fx.Node],
                  cost_model: CostModel) -> str | None:
        """None if splitting is estimated to pay, else why not. Gain: the row-wise compute
        that can overlap the transfer, (k-1)/k of the smaller of the two. Cost: a latency
        per extra chunk and exchange, the per-op overhead of the copied region, and cutting
        and reassembling the rows (read + write of the bytes moved). Rank-invariant sizes."""
        k, profile = self.chunks, cost_model.profile
        exchanges = [a2a, *reverses]
        transfer = sum(invariant_seconds(cost_model.node_cost(n)) for n in exchanges)
        compute_nodes = [n for n in region if cost_model.node_cost(n).lane == "compute"]
        compute = sum(invariant_seconds(cost_model.node_cost(n)) for n in compute_nodes)
        moved = sum(invariant_value(describe(n).input_nbytes) + invariant_value(describe(n).nbytes) for n in exchanges)
        _, latency = cost_model.link(describe(a2a).group_size)
        independent = sum(invariant_seconds(cost_model.node_cost(n)) for n in _unrelated(a2a)
                          if cost_model.node_cost(n).lane == "compute")
        if independent >= transfer:
            return (f"not needed on {profile.name}: {independent * 1e6:.1f} us of independent compute can hide "
                    f"the {transfer * 1e6:.1f} us transfer (overlap-schedule places it)")
        gain = min(compute, transfer - independent) * (k - 1) / k
        cost = ((k - 1) * (latency * len(exchanges) + len(compute_nodes) * profile.op_overhead)
                + 2 * moved / profile.memory_bandwidth)
        if gain <= cost:
            return (f"estimated not to pay on {profile.name}: overlaps {gain * 1e6:.1f} us of row-wise compute, "
                    f"costs {cost * 1e6:.1f} us (chunk latency, copied ops, cutting and reassembling rows)")
        return None

    def _classify(self, node: fx.Node, members: set[fx.Node], rows: Any, out_splits: Any,
                  group: str) -> tuple[str | None, Any]:
        """("rowwise" | "reverse" | "reduce", extra) or (None, None) when ``node`` ends the
        region. ``extra``: side inputs to split alongside, or a reverse's wait."""
        if node.op != "call_function":
            return None, None
        target = node.target
        args = node.all_input_nodes
        if is_collective(node):
            if target is not _A2A or call_arg(node, "input") not in members or str(call_arg(node, "group_name")) != group:
                return None, None
            if not _same_splits(call_arg(node, "input_split_sizes"), out_splits):
                return None, None
            waits = [u for u in node.users if is_wait(u)]
            if (len(waits) != 1 or not _only_sizes_besides(node, waits[0])
                    or not isinstance(call_arg(node, "output_split_sizes"), (list, tuple))):
                return None, None
            return "reverse", waits[0]
        if target is aten.embedding_dense_backward.default:
            grad, indices, scale_by_freq = node.args[0], node.args[1], node.args[4]
            # per-chunk word frequencies would differ from the whole batch's
            if grad in members and not scale_by_freq and self._row_aligned(indices, members, rows):
                return "reduce", {indices} - members
            return None, None
        if target in _ACCUMULATES:
            base, mask, indices, values = _accumulate_args(node)
            if target is aten.index_put.default and not (len(node.args) > 3 and node.args[3]):
                return None, None  # a plain index_put overwrites: chunks would race for duplicates
            row_args = [mask, *indices] if mask is not None else list(indices)
            if (values in members and base not in members and len(indices) == 1
                    and all(self._row_aligned(a, members, rows) for a in row_args if a is not None)):
                return "accumulate", {a for a in row_args if isinstance(a, fx.Node)} - members
            return None, None
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or not _same(out.shape[0], rows):
            return None, None
        if target is aten.embedding.default:
            weight, indices = node.args[0], node.args[1]
            if weight not in members and indices in members:
                return "rowwise", set()
            return None, None
        if target in (aten.mm.default, aten.addmm.default):
            left, right = (node.args[0], node.args[1]) if target is aten.mm.default else (node.args[1], node.args[2])
            bias = node.args[0] if target is aten.addmm.default else None
            if left in members and right not in members and (bias is None or _broadcast_only(bias, out)):
                return "rowwise", set()
            return None, None
        if target in _ROW_KEEPING_VIEWS or target is aten.squeeze.dim:
            dim = node.args[1] if len(node.args) > 1 else 0
            ndim = _val(node.args[0]).dim() + (target is aten.unsqueeze.default)
            return ("rowwise", set()) if isinstance(dim, int) and dim % max(ndim, 1) >= 1 else (None, None)
        if target in _RESHAPES:
            return ("rowwise", set()) if node.args[0] in members else (None, None)
        if target in _CONVERSIONS or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags):
            side = set()
            for src in args:
                if src in members:
                    continue
                if self._row_aligned(src, members, rows):
                    side.add(src)
                elif not _broadcast_only(src, out):
                    return None, None
            return "rowwise", side
        return None, None

    @staticmethod
    def _row_aligned(arg: Any, members: set[fx.Node], rows: Any) -> bool:
        if arg in members:
            return True
        val = _val(arg)
        return isinstance(val, torch.Tensor) and val.dim() >= 1 and _same(val.shape[0], rows) and not statically_known_true(rows == 1)


def _unrelated(node: fx.Node) -> list[fx.Node]:
    """Nodes that are neither ancestors nor descendants of ``node``: work a scheduler may
    run while ``node``'s transfer is in flight."""
    related = {node}
    for walk in (lambda n: n.all_input_nodes, lambda n: n.users):
        frontier = [node]
        while frontier:
            for nxt in walk(frontier.pop()):
                if nxt not in related:
                    related.add(nxt)
                    frontier.append(nxt)
    return [n for n in node.graph.nodes if n not in related]


def _only_sizes_besides(collective: fx.Node, wait: fx.Node) -> bool:
    """The collective's users are its wait and ``sym_size`` reads (AOTAutograd saves the
    received row count for the backward)."""
    return all(u is wait or u.target is aten.sym_size.int for u in collective.users)


def _broadcast_only(arg: Any, out: torch.Tensor) -> bool:
    """True when ``arg`` has no row axis to split: a scalar, fewer dims than the output
    (broadcast over trailing dims), or a row axis of size 1."""
    val = _val(arg)
    if not isinstance(val, torch.Tensor):
        return True
    return val.dim() < out.dim() or statically_known_true(val.shape[0] == 1)


class _Splitter:
    """Applies one :class:`_Plan`: chunk sizes, the chunked exchanges, the region copied
    per chunk, and the reassembly."""

    def __init__(self, rewriter: GraphRewriter, plan: _Plan, chunks: int) -> None:
        self.rw, self.plan, self.k = rewriter, plan, chunks
        self.graph = rewriter.graph
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"])
        self.sizes: dict[tuple[Any, int], Any] = {}

    # -- node construction with fake values ------------------------------------------

    def _call(self, anchor: fx.Node, target: Callable, args: tuple, kwargs: dict | None = None,
              meta_from: fx.Node | None = None) -> fx.Node:
        kwargs = kwargs or {}
        meta = {k: v for k, v in (meta_from.meta.items() if meta_from is not None else ()) if k not in ("val", "tensor_meta")}
        node = self.rw.insert_before(anchor, target, args, kwargs, meta=meta)
        fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), _val)
        if isinstance(target, torch._ops.OpOverload):
            with self.fake_mode:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
        else:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        return node

    def _chunk_size(self, size: Any, c: int, anchor: fx.Node) -> Any:
        """Rows of part c of a segment of ``size`` rows: (size + k - 1 - c) // k."""
        if isinstance(size, int):
            return (size + self.k - 1 - c) // self.k
        key = (size, c)
        if key not in self.sizes:
            total = self._call(anchor, operator.add, (size, self.k - 1 - c))
            self.sizes[key] = self._call(anchor, operator.floordiv, (total, self.k))
        return self.sizes[key]

    def _chunk_splits(self, splits: list, c: int, anchor: fx.Node) -> list:
        return [self._chunk_size(s, c, anchor) for s in splits]

    def _cut(self, tensor: fx.Node, splits: list, anchor: fx.Node) -> list[fx.Node]:
        """Rows of ``tensor`` (laid out as segments ``splits``) as k chunks: chunk c holds
        part c of every segment, segments in order."""
        sizes = [self._chunk_size(s, c, anchor) for s in splits for c in range(self.k)]
        parts_node = self._call(anchor, aten.split_with_sizes.default, (tensor, sizes))
        parts = [self._call(anchor, operator.getitem, (parts_node, i)) for i in range(len(sizes))]
        chunks = []
        for c in range(self.k):
            pieces = [parts[p * self.k + c] for p in range(len(splits))]
            chunks.append(pieces[0] if len(pieces) == 1 else self._call(anchor, aten.cat.default, (pieces,)))
        return chunks

    def _join(self, chunks: list[fx.Node], splits: list, anchor: fx.Node) -> fx.Node:
        """Inverse of :meth:`_cut`: segments back in order, each with its parts in order.
        Callers give the result the original node's fake value: the same rows, and a size
        expression (``u0``) that later ops can unify with, where the sum of the parts'
        sizes (``u0//2 + (u0+1)//2``) is one sympy does not simplify."""
        if len(splits) == 1:
            return self._call(anchor, aten.cat.default, (chunks,))
        per_chunk = []
        for c, chunk in enumerate(chunks):
            sizes = self._chunk_splits(splits, c, anchor)
            parts_node = self._call(anchor, aten.split_with_sizes.default, (chunk, sizes))
            per_chunk.append([self._call(anchor, operator.getitem, (parts_node, p)) for p in range(len(splits))])
        ordered = [per_chunk[c][p] for p in range(len(splits)) for c in range(self.k)]
        return self._call(anchor, aten.cat.default, (ordered,))

    # -- the rewrite ----------------------------------------------------------------

    def _replace_size_reads(self, a2a: fx.Node, chunks: list[fx.Node]) -> None:
        """``sym_size(a2a, d)`` readers: dim 0 becomes the sum of the output splits, other
        dims read chunk 0 (every chunk has the same trailing dims)."""
        for user in [u for u in a2a.users if u.target is aten.sym_size.int]:
            dim = user.args[1]
            if dim % _val(a2a).dim() == 0:
                sizes = list(call_arg(a2a, "output_split_sizes"))
                total: Any = sizes[0]
                for size in sizes[1:]:
                    total = (self._call(user, operator.add, (total, size))
                             if isinstance(total, fx.Node) or isinstance(size, fx.Node) else total + size)
                if isinstance(total, fx.Node):
                    user.replace_all_uses_with(total)
                else:  # a static size: put the int where the size was read
                    for reader in list(user.users):
                        reader.args, reader.kwargs = fx.node.map_arg(
                            (reader.args, reader.kwargs), lambda a: total if a is user else a)
            else:
                user.replace_all_uses_with(self._call(user, aten.sym_size.int, (chunks[0], dim)))
            self.rw.erase(user)

    def _exchange(self, a2a: fx.Node, inputs: list[fx.Node], anchor: fx.Node) -> list[fx.Node]:
        out_splits = list(call_arg(a2a, "output_split_sizes"))
        in_splits = list(call_arg(a2a, "input_split_sizes"))
        group = call_arg(a2a, "group_name")
        identity = a2a.meta.get(COLLECTIVE_ID, a2a.name)
        chunks = []
        for c, chunk_in in enumerate(inputs):
            args = (chunk_in, self._chunk_splits(out_splits, c, anchor), self._chunk_splits(in_splits, c, anchor), group)
            node = self._call(anchor, _A2A, args, meta_from=a2a)
            node.meta[COLLECTIVE_ID] = f"{identity}/chunk{c}"
            chunks.append(node)
        return chunks

    def apply(self) -> None:
        plan, k = self.plan, self.k
        a2a, wait = plan.a2a, plan.wait
        layout = list(call_arg(a2a, "output_split_sizes"))  # row layout of every region node
        env: list[dict[fx.Node, fx.Node]] = [{} for _ in range(k)]
        inputs = self._cut(call_arg(a2a, "input"), list(call_arg(a2a, "input_split_sizes")), a2a)
        issued = self._exchange(a2a, inputs, a2a)
        self._replace_size_reads(a2a, issued)
        for c in range(k):
            env[c][wait] = self._call(wait, _C10D.wait_tensor.default, (issued[c],), meta_from=wait)
        side_chunks: dict[fx.Node, list[fx.Node]] = {}
        dead = [a2a, wait]
        for node in plan.region[1:]:
            for src in node.all_input_nodes:
                if src in plan.side and src not in side_chunks:
                    side_chunks[src] = self._cut(src, layout, node)
            if node in plan.reverses:
                back_wait = plan.reverses[node]
                back = self._exchange(node, [env[c][node.args[0]] for c in range(k)], node)
                self._replace_size_reads(node, back)
                waited = [self._call(back_wait, _C10D.wait_tensor.default, (b,), meta_from=back_wait) for b in back]
                joined = self._join(waited, list(call_arg(node, "output_split_sizes")), back_wait)
                joined.meta["val"] = back_wait.meta["val"]
                back_wait.replace_all_uses_with(joined)
                dead += [node, back_wait]
                continue
            for c in range(k):
                mapping = {**{s: chunks[c] for s, chunks in side_chunks.items()}, **env[c]}
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: mapping.get(a, a))
                if node.target in _RESHAPES:  # the chunk has fewer rows than the shape names
                    args = (args[0], [-1, *args[1][1:]], *args[2:])
                if node.target in _ACCUMULATES and c > 0:  # accumulate into the previous chunk's table
                    args = (env[c - 1][node], *args[1:])
                env[c][node] = self._call(node, node.target, args, kwargs, meta_from=node)
            if node.target in _ACCUMULATES:
                node.replace_all_uses_with(env[k - 1][node])
            elif node in plan.reductions:
                total = env[0][node]
                for c in range(1, k):
                    total = self._call(node, aten.add.Tensor, (total, env[c][node]), meta_from=node)
                node.replace_all_uses_with(total)
            dead.append(node)
        for node, users in plan.exits.items():
            anchor = min(users, key=positions(self.graph).__getitem__)
            joined = self._join([env[c][node] for c in range(k)], layout, anchor)
            joined.meta["val"] = node.meta["val"]
            for user in users:
                user.replace_input_with(node, joined)
        left = list(reversed(dead))  # users before producers
        while left:
            kept = []
            for node in left:
                if node.users:
                    kept.append(node)
                else:
                    self.rw.erase(node)
            if len(kept) == len(left):
                raise RuntimeError(f"split-collectives left {[n.name for n in kept]} in use after the split")
            left = kept
