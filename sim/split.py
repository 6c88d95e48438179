"""Split samples in the simulated step: per-rank chunks and their key/value exchange.

With ``Balancer(split=True)`` (:mod:`fsc.runtime.balance_split`) a rank may run a chunk of
a sample, query positions ``[p, p + n)`` attending to keys ``[0, p + n)``. The chunk's
compute comes from :class:`sim.workload.Ranks` with its offsets; what this module adds is
the exchange: in every layer's forward, the keys and values of the earlier chunks reach the
chunk's rank, and in the backward their gradients go back, as many bytes.

Model.

* Bytes: per layer, ``tokens * kv_bytes`` from each earlier chunk's rank to the chunk's
  rank, ``kv_bytes = 4 * heads * (qk_dim + v_dim)`` (K and V in fp32, as the example
  trains).
* Who takes part: the exchange is one ``all_to_all_single`` per layer and direction on the
  world group (``fsc.runtime.routing.prefix_kv``), with split sizes that are zero for every
  pair of ranks that share no sample (and 2 padding rows each rank sends itself). NCCL
  posts sends and receives for non-zero counts only, so the ranks that share a split
  sample (a connected component of the src-dst pairs) exchange among themselves, and a
  rank holding no chunk of a split sample is not held by it. The simulator runs one
  collective per component and layer (:class:`Exchange`), with the component's ranks as
  its members, on the world group's per-rank queues (behind whatever each member issued
  before on that group: the embedding exchanges and gradient buckets).
* Time of one component's exchange: every member sends and receives at once over its
  node's link for peers in its node and its NIC for the others: ``latency + max over its
  ranks of max(intra bytes / intra bandwidth, inter bytes / inter bandwidth)``, counting
  for each rank the larger of what it sends and what it receives (the all-to-all's rule in
  :mod:`sim.topology`).
* Placement: the engine's programs have no layer structure, so each graph's compute ops
  are cut into ``layers`` stretches of equal op count; a layer's exchange is issued 40% into
  its stretch (K and V come from the layer's projections) and waited on 80% into it (the
  attention over the rank's own keys and whole samples overlaps the transfer). Without
  ``overlap``, it is waited on right after issue, as every collective of the baseline.
* SM use: as every all-to-all of the step: NCCL (SM-based, slowing the component's
  members only) unless ``sm_free``, then copy-engine transfers (``sm-free-collectives``
  swaps any all-to-all with compute in flight, and this one has the layer's attention over
  the rank's own keys; across nodes the copy-engine path is modelled, as for the embedding
  exchange: fsc's runtime runs the group's own collective across hosts).

Limits: a chunk receives each earlier chunk's keys and values whole in every layer (no
ring or pipelining across chunks); the cut of the programs into layers is by op count, not
by the graph's real layer boundaries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from fsc.runtime.balancer import Assignment
from sim.engine import Compute, Issue, Op, Wait
from sim.topology import Topology

ISSUE_AT, WAIT_AT = 0.4, 0.8
"""Where in a layer's stretch of ops its exchange is issued and waited on (module docstring)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Shares:
    """What each rank runs in one step: lengths and chunk offsets per rank, and the
    key/value transfers split samples need (tokens from ``src`` to ``dst`` per layer)."""

    lengths: tuple[np.ndarray, ...]
    offsets: tuple[np.ndarray, ...] | None
    src: np.ndarray
    dst: np.ndarray
    tokens: np.ndarray
    split_samples: int = 0

    @classmethod
    def whole(cls, lengths: list[np.ndarray]) -> Shares:
        empty = np.zeros(0, dtype=np.int64)
        return cls(lengths=tuple(lengths), offsets=None, src=empty, dst=empty, tokens=empty)

    @classmethod
    def from_assignment(cls, assignment: Assignment) -> Shares:
        plan = assignment.chunks
        bounds = np.concatenate(([0], np.cumsum(np.bincount(plan.rank, minlength=assignment.ranks))))
        n = plan.stop - plan.start
        lengths = tuple(n[bounds[r]:bounds[r + 1]] for r in range(assignment.ranks))
        offsets = tuple(plan.start[bounds[r]:bounds[r + 1]] for r in range(assignment.ranks))
        src, dst, tokens = [], [], []
        for r in np.unique(plan.rank[plan.start > 0]).tolist():
            for chunk in plan.chunks_of(r):
                for rank, start, stop in chunk.earlier:
                    src.append(rank)
                    dst.append(r)
                    tokens.append(stop - start)
        as_int = (np.asarray(v, dtype=np.int64) for v in (src, dst, tokens))
        return cls(lengths=lengths, offsets=offsets, **dict(zip(("src", "dst", "tokens"), as_int)),
                   split_samples=plan.split_samples)

    @property
    def kv_tokens(self) -> int:
        """Tokens of keys and values sent per layer and direction."""
        return int(self.tokens.sum())


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Exchange:
    """One layer's key/value exchange among the ranks sharing split samples."""

    members: tuple[int, ...]
    seconds: float
    crosses: bool
    """Some of its bytes leave a node."""


def exchanges(shares: Shares, topo: Topology, kv_bytes: float) -> list[Exchange]:
    """One layer's exchanges, one per connected component of the transfers (module docstring)."""
    if not len(shares.tokens):
        return []
    r = topo.ranks
    parent = np.arange(r)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for a, b in zip(shares.src.tolist(), shares.dst.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    component = np.array([root(int(x)) for x in shares.src])
    out = []
    for c in np.unique(component).tolist():
        pick = component == c
        src, dst, tokens = shares.src[pick], shares.dst[pick], shares.tokens[pick]
        seconds, crosses = _seconds(src, dst, tokens.astype(np.float64) * kv_bytes, topo)
        out.append(Exchange(members=tuple(np.unique(np.concatenate([src, dst])).tolist()), seconds=seconds,
                            crosses=crosses))
    return out


def _seconds(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, topo: Topology) -> tuple[float, bool]:
    dev, per_node, r = topo.device, topo.per_node, topo.ranks
    inside = (src // per_node) == (dst // per_node)
    worst = 0.0
    for same, bandwidth in ((True, dev.intra_node_bandwidth), (False, dev.inter_node_bandwidth)):
        mask = inside == same
        if mask.any():
            out = np.bincount(src[mask], weights=nbytes[mask], minlength=r)
            into = np.bincount(dst[mask], weights=nbytes[mask], minlength=r)
            worst = max(worst, float(np.maximum(out, into).max()) / bandwidth)
    crosses = bool((~inside).any())
    latency = dev.inter_node_latency if crosses else dev.intra_node_latency
    return latency + worst, crosses


def exchange_seconds(shares: Shares, topo: Topology, kv_bytes: float) -> tuple[float, bool]:
    """The longest of one layer's exchanges, and whether any of them leaves a node."""
    found = exchanges(shares, topo, kv_bytes)
    if not found:
        return 0.0, False
    return max(e.seconds for e in found), any(e.crosses for e in found)


def with_exchange(ops: list[Op], *, layers: int, exchange: Sequence[Exchange], sm_free: bool, blocking: bool,
                  prefix: str, group: str = "world") -> list[Op]:
    """``ops`` (one graph's) with the key/value exchanges of every layer (module docstring),
    issued on ``group``."""
    exchange = [e for e in exchange if e.seconds > 0.0]
    if not exchange or layers < 1:
        return ops
    where = [i for i, op in enumerate(ops) if isinstance(op, Compute)]
    if not where:
        return ops
    issue_before: dict[int, list[Issue]] = {}
    wait_before: dict[int, list[str]] = {}
    for layer in range(layers):
        lo = len(where) * layer // layers
        span = len(where) * (layer + 1) // layers - lo
        at = where[min(lo + int(ISSUE_AT * span), len(where) - 1)]
        until = at if blocking else where[min(lo + int(WAIT_AT * span), len(where) - 1)]
        for c, e in enumerate(exchange):
            name = f"{prefix}kv_exchange.{layer}" + (f".{c}" if len(exchange) > 1 else "")
            issue_before.setdefault(at, []).append(Issue(name=name, group=group, seconds=e.seconds, members=e.members,
                                                         sm_based=not sm_free))
            wait_before.setdefault(until, []).append(name)
    out: list[Op] = []
    for i, op in enumerate(ops):
        for issue in issue_before.get(i, ()):
            out.append(issue)
            if blocking:
                out.append(Wait(name=issue.name + ".wait", collective=issue.name))
        if not blocking:
            out += [Wait(name=name + ".wait", collective=name) for name in wait_before.get(i, ())]
        out.append(op)
    return out
