"""The simulated step's work, from the HSTU example's real compiled graphs.

:func:`capture_programs` compiles the example on a fake process group (see
:mod:`bench.hstu_graphs`) and keeps the forward and backward graphs twice: as captured
(program order) and after the freescale pipeline (``prioritize-collectives``,
``split-collectives``, ``overlap-schedule``, chosen on the given device profile). Each graph
becomes a :class:`GraphProgram`: its nodes in order, and for every compute node its FLOPs
and bytes as polynomials in three per-rank quantities, so that one matrix product gives
every node's cost on every simulated rank:

* ``T``, the rank's token count (the graph's one backed size symbol);
* ``SEND``, the rows the rank sends in the embedding exchange (the first data-dependent
  all-to-all's input rows, ``2T + negatives`` in the example), spread evenly over the
  captured world's split-size symbols; ``RECV``, the rows it receives: with items owned
  uniformly at random, the mean of ``SEND`` over the ranks, spread the same way.

``T**2`` terms come from attention over the rank's tokens: with ``attention="jagged"`` (the
jagged kernel, what a production run uses) they become ``sum(L_i**2)`` over the rank's
samples, with ``"dense"`` (the example's eager attention, what the CPU runs execute) they
stay ``T**2``. Node seconds are the cost model's roofline, ``max(flops/peak,
bytes/bandwidth) + op_overhead``, with the peak chosen by the node's dtype as
:class:`fsc.analysis.cost_model.CostModel` does.

Limits: the captured world's split sizes are re-spread over R ranks as totals (the graph's
shape does not depend on R except through them); an all-to-all of constant size (the
split-count exchange) scales with R/world (an all-reduce of constant size, a gradient
bucket, does not); every process group spans all ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import sympy
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from fsc.analysis.collectives import call_arg, describe, is_collective, is_wait
from fsc.analysis.cost_model import CostModel, DeviceProfile
from fsc.analysis.symbolic import as_expr
from sim.engine import Compute, Issue, Op, Wait
from sim.topology import Topology

log = logging.getLogger(__name__)

T, SEND, RECV = sympy.symbols("T SEND RECV", positive=True)
ATTENTION = ("jagged", "dense")


class WorkloadError(ValueError):
    """A graph the simulator cannot cost; names the node or symbol."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Ranks:
    """Per-rank quantities (arrays of length R)."""

    lengths: tuple[np.ndarray, ...]
    """Each rank's sample lengths (tokens per sample), or per chunk of a split sample."""
    send: np.ndarray
    recv: np.ndarray
    offsets: tuple[np.ndarray, ...] | None = None
    """Per rank, each chunk's first query position in its sample (0 for a whole sample).
    A chunk of n queries from position p attends to keys [0, p + n): its ``L**k`` terms
    become ``(p + n)**k - p**k`` (for k = 2: twice its causal query-key pairs, less n, as the
    whole sample's ``L**2`` is)."""

    @property
    def tokens(self) -> np.ndarray:
        return np.array([float(x.sum()) for x in self.lengths])

    def power_sum(self, k: int) -> np.ndarray:
        if self.offsets is None:
            return np.array([float((x.astype(np.float64) ** k).sum()) for x in self.lengths])
        return np.array([float(((p + x) ** k - p**k).sum())
                         for x, p in zip((x.astype(np.float64) for x in self.lengths),
                                         (p.astype(np.float64) for p in self.offsets))])


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class GraphProgram:
    """One graph's node sequence with its costs as polynomials in (T, SEND, RECV)."""

    kind: str
    entries: tuple[tuple[Any, ...], ...]
    """("compute", name, row) | ("issue", name, kind, group, in_row, out_row, const) | ("wait", name, coll)."""
    monomials: tuple[tuple[int, int, int], ...]
    flops: np.ndarray
    """[rows, monomials]"""
    nbytes: np.ndarray
    half: np.ndarray
    """[rows] bool: the node runs at the half-precision peak."""
    world: int

    def features(self, ranks: Ranks, attention: str) -> np.ndarray:
        if attention not in ATTENTION:
            raise WorkloadError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        tokens = ranks.tokens
        out = np.empty((len(self.monomials), len(tokens)))
        for i, (a, b, c) in enumerate(self.monomials):
            t = (ranks.power_sum(a) if a >= 2 and attention == "jagged" else tokens**a)
            out[i] = t * ranks.send**b * ranks.recv**c
        return out

    def ops(self, ranks: Ranks, topo: Topology, *, attention: str = "jagged", blocking: bool = False,
            sm_free: bool = False, prefix: str = "") -> list[Op]:
        """The graph's ops on these ranks. ``blocking``: every collective waited on right
        after issue (its own waits dropped). ``sm_free``: what ``sm-free-collectives`` makes
        of the graph: all-to-alls are copy-engine transfers, and each all-reduce two of them
        (:func:`sm_free_all_reduces`)."""
        dev = topo.device
        feats = self.features(ranks, attention)
        flops, nbytes = self.flops @ feats, self.nbytes @ feats
        peak = np.where(self.half, dev.flops_half, dev.flops_fp32)[:, None]
        seconds = np.maximum(flops / peak, nbytes / dev.memory_bandwidth) + dev.op_overhead
        scale = topo.ranks / self.world
        out: list[Op] = []
        reduced: dict[str, float] = {}  # all-reduces: name -> bytes
        for entry in self.entries:
            if entry[0] == "compute":
                out.append(Compute(name=prefix + entry[1], seconds=seconds[entry[2]]))
            elif entry[0] == "issue":
                _, name, kind, group, in_row, out_row, const = entry
                sent, received = nbytes[in_row], nbytes[out_row]
                if const and kind == "all_to_all_single":  # an all-reduce's size does not grow with R
                    sent, received = sent * scale, received * scale
                if kind == "all_to_all_single":
                    secs = topo.all_to_all_seconds(sent, received)
                elif kind == "all_reduce":
                    secs = topo.all_reduce_seconds(float(np.max(sent)))
                    reduced[prefix + name] = float(np.max(sent))
                else:
                    raise WorkloadError(f"{name}: the simulator has no time model for {kind}")
                out.append(Issue(name=prefix + name, group=group, seconds=secs,
                                 sm_based=not (sm_free and kind == "all_to_all_single")))
                if blocking:
                    out.append(Wait(name=prefix + name + ".wait", collective=prefix + name))
            elif not blocking:
                out.append(Wait(name=prefix + entry[1], collective=prefix + entry[2]))
        if sm_free and reduced and not blocking:
            out = sm_free_all_reduces(out, {name: nbytes / dev.memory_bandwidth + dev.op_overhead
                                            for name, nbytes in reduced.items()})
        return out


def sm_free_all_reduces(ops: list[Op], sum_seconds: dict[str, float]) -> list[Op]:
    """``ops`` with each all-reduce named in ``sum_seconds`` as ``sm-free-collectives`` swaps
    it: a copy-engine all-to-all of the shards (half the all-reduce's time: a reduce-scatter's
    bytes) where it was issued; its wait, the sum of the received shards (``sum_seconds``:
    one read of the tensor) and the copy-engine all-to-all of the summed shard (the other
    half, keeping the all-reduce's name, so its waits stay) halfway (in compute ops) to its
    first wait, or before that, before the issue of a later collective on the same group
    whose first wait comes after more compute (the pass's rule)."""
    out = list(ops)
    sums: set[int] = set()  # the inserted sums (not the program's compute)
    for name, seconds in sum_seconds.items():
        at = next(i for i, op in enumerate(out) if isinstance(op, Issue) and op.name == name)
        issue = out[at]
        work = [isinstance(op, Compute) and id(op) not in sums for op in out]
        before = np.cumsum([0] + work)  # compute ops ahead of each index

        def first_wait(issued: int) -> int:  # len(out) if never waited
            wanted = out[issued].name
            return next((i for i in range(issued + 1, len(out)) if isinstance(out[i], Wait)
                         and out[i].collective == wanted), len(out))

        def needed(issued: int) -> float:  # compute ops ahead of its first wait (never waited: never needed)
            first = first_wait(issued)
            return float(before[first]) if first < len(out) else math.inf

        waited, mine = first_wait(at), needed(at)
        compute = [i for i in range(at + 1, waited) if work[i]]
        middle = compute[len(compute) // 2] if compute else waited
        blocking = [i for i in range(at + 1, middle) if isinstance(out[i], Issue) and out[i].group == issue.group
                    and needed(i) > mine]
        middle = blocking[0] if blocking else middle
        half = issue.seconds / 2
        scatter = dataclasses.replace(issue, name=f"{name}.scatter", seconds=half, sm_based=False)
        total = Compute(name=f"{name}.sum", seconds=seconds)
        sums.add(id(total))
        out[middle:middle] = [Wait(name=f"{name}.scatter.wait", collective=scatter.name), total,
                              dataclasses.replace(issue, seconds=half, sm_based=False)]
        out[at] = scatter
    return out


def _half(node: fx.Node) -> bool:
    flat, _ = tree_flatten(node.meta.get("val"))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    return bool(tensors) and tensors[0].dtype in (torch.bfloat16, torch.float16)


def _symbols(node: fx.Node, name: str) -> set[sympy.Symbol]:
    splits = call_arg(node, name)
    out: set[sympy.Symbol] = set()
    for s in splits if isinstance(splits, (list, tuple)) else ():
        val = s.meta.get("val") if isinstance(s, fx.Node) else s
        out |= as_expr(val).free_symbols
    return out


def _substitution(graphs: list[fx.Graph], world: int) -> dict[sympy.Symbol, sympy.Expr]:
    """Graph size symbols -> expressions in T, SEND, RECV (see the module docstring)."""
    free: set[sympy.Symbol] = set()
    first = None
    for graph in graphs:
        for node in graph.nodes:
            val = node.meta.get("val")
            flat, _ = tree_flatten(val)
            for v in flat:
                if isinstance(v, torch.Tensor):
                    for d in v.shape:
                        free |= as_expr(d).free_symbols
                elif isinstance(v, torch.SymInt):
                    free |= as_expr(v).free_symbols
            if first is None and is_collective(node) and describe(node).kind == "all_to_all_single":
                if any(str(s).startswith("u") for s in _symbols(node, "output_split_sizes")):
                    first = node
    backed = {s for s in free if not str(s).startswith("u")}
    if len(backed) != 1:
        raise WorkloadError(f"expected one backed size symbol (the token count), found {sorted(map(str, backed))}")
    (tok,) = backed
    subs: dict[sympy.Symbol, sympy.Expr] = {tok: T}
    if first is not None:
        recv, send = _symbols(first, "output_split_sizes"), _symbols(first, "input_split_sizes")
        subs |= {s: SEND / world for s in send} | {s: RECV / world for s in recv}
        inp = call_arg(first, "input").meta["val"]
        send_rows = as_expr(inp.shape[0]).xreplace({tok: T})
    else:
        send_rows = sympy.Integer(0)
    unknown = sorted(str(s) for s in free - set(subs))
    if unknown:
        raise WorkloadError(f"size symbol(s) {', '.join(unknown)} are neither the token count nor the embedding "
                            "exchange's split sizes; the simulator cannot size them")
    subs[sympy.Symbol("__send_rows__")] = send_rows
    return subs


def _poly(expr: Any, subs: dict, where: str) -> dict[tuple[int, int, int], float]:
    e = sympy.expand(as_expr(expr).xreplace(subs))
    try:
        poly = sympy.Poly(e, T, SEND, RECV)
    except sympy.PolynomialError as exc:
        raise WorkloadError(f"{where}: cost {e} is not a polynomial in the token count and exchange rows") from exc
    return {m: float(c) for m, c in poly.terms()}


def build_program(gm: fx.GraphModule, kind: str, subs: dict, world: int, cost_model: CostModel) -> GraphProgram:
    rows: list[tuple[dict, dict, bool]] = []
    entries: list[tuple[Any, ...]] = []

    def row(flops: dict, nbytes: dict, half: bool = False) -> int:
        rows.append((flops, nbytes, half))
        return len(rows) - 1

    for node in gm.graph.nodes:
        if is_collective(node):
            c = describe(node)
            const = not (as_expr(c.input_nbytes).free_symbols or as_expr(c.nbytes).free_symbols)
            entries.append(("issue", node.name, c.kind, c.group_name,
                            row({}, _poly(c.input_nbytes, subs, node.name)),
                            row({}, _poly(c.nbytes, subs, node.name)), const))
        elif is_wait(node):
            src = node.args[0]
            entries.append(("wait", node.name, src.name))
        else:
            cost = cost_model.node_cost(node)
            if cost.lane != "compute":
                continue
            entries.append(("compute", node.name, row(_poly(cost.flops_expr, subs, node.name),
                                                      _poly(cost.nbytes_expr, subs, node.name), _half(node))))
    monomials = sorted({m for f, b, _ in rows for m in (*f, *b)})
    index = {m: i for i, m in enumerate(monomials)}
    flops = np.zeros((len(rows), len(monomials)))
    nbytes = np.zeros_like(flops)
    for i, (f, b, _) in enumerate(rows):
        for m, v in f.items():
            flops[i, index[m]] = v
        for m, v in b.items():
            nbytes[i, index[m]] = v
    return GraphProgram(kind=kind, entries=tuple(entries), monomials=tuple(monomials), flops=flops, nbytes=nbytes,
                        half=np.array([h for _, _, h in rows], dtype=bool), world=world)


def send_rows_expr(subs: dict) -> sympy.Expr:
    return subs[sympy.Symbol("__send_rows__")]


def programs_from_graphs(graphs: dict[str, fx.GraphModule], world: int, profile: DeviceProfile
                         ) -> tuple[dict[str, GraphProgram], sympy.Expr]:
    """``{"forward": GraphProgram, "backward": ...}`` and SEND as an expression in T."""
    subs = _substitution([g.graph for g in graphs.values()], world)
    model = CostModel(profile)
    out = {k: build_program(gm, k, subs, world, model) for k, gm in graphs.items()}
    return out, send_rows_expr(subs)
