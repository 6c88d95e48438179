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
* Time of one layer's exchange: every rank sends and receives at once over its node's link
  for peers in its node and its NIC for the others: ``latency + max over ranks of
  max(intra bytes / intra bandwidth, inter bytes / inter bandwidth)``, counting for each
  rank the larger of what it sends and what it receives (the all-to-all's rule in
  :mod:`sim.topology`). The engine's collectives span all ranks, so the exchange is one
  collective per layer and direction, on its own queue (``kv``), lasting as long as its
  slowest member; ranks that exchange nothing also wait for it (pessimistic).
* Placement: the engine's programs have no layer structure, so each graph's compute ops
  are cut into ``layers`` stretches of equal op count; a layer's exchange is issued 40% into
  its stretch (K and V come from the layer's projections) and waited on 80% into it (the
  attention over the rank's own keys and whole samples overlaps the transfer). Without
  ``overlap``, it is waited on right after issue, as every collective of the baseline.
* SM use: NCCL (SM-based) unless ``sm_free`` and every byte stays inside a node (then
  copy-engine transfers, as the SM-free all-to-all).

Limits: a chunk receives each earlier chunk's keys and values whole in every layer (no
ring or pipelining across chunks); the cut of the programs into layers is by op count, not
by the graph's real layer boundaries.
"""

from __future__ import annotations

import dataclasses

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


def exchange_seconds(shares: Shares, topo: Topology, kv_bytes: float) -> tuple[float, bool]:
    """One layer's exchange time and whether any of it leaves a node (module docstring)."""
    if not len(shares.tokens):
        return 0.0, False
    dev, per_node = topo.device, topo.per_node
    nbytes = shares.tokens.astype(np.float64) * kv_bytes
    inside = (shares.src // per_node) == (shares.dst // per_node)
    r = topo.ranks
    worst = 0.0
    for same, bandwidth in ((True, dev.intra_node_bandwidth), (False, dev.inter_node_bandwidth)):
        mask = inside == same
        if mask.any():
            out = np.bincount(shares.src[mask], weights=nbytes[mask], minlength=r)
            into = np.bincount(shares.dst[mask], weights=nbytes[mask], minlength=r)
            worst = max(worst, float(np.maximum(out, into).max()) / bandwidth)
    crosses = bool((~inside).any())
    latency = dev.inter_node_latency if crosses else dev.intra_node_latency
    return latency + worst, crosses


def with_exchange(ops: list[Op], *, layers: int, seconds: float, sm_based: bool, blocking: bool,
                  prefix: str) -> list[Op]:
    """``ops`` (one graph's) with a key/value exchange per layer (module docstring)."""
    if seconds <= 0.0 or layers < 1:
        return ops
    where = [i for i, op in enumerate(ops) if isinstance(op, Compute)]
    if not where:
        return ops
    issue_before, wait_before = {}, {}
    for layer in range(layers):
        lo = len(where) * layer // layers
        span = len(where) * (layer + 1) // layers - lo
        name = f"{prefix}kv_exchange.{layer}"
        at = where[min(lo + int(ISSUE_AT * span), len(where) - 1)]
        issue_before.setdefault(at, []).append(name)
        until = at if blocking else where[min(lo + int(WAIT_AT * span), len(where) - 1)]
        wait_before.setdefault(until, []).append(name)
    out: list[Op] = []
    for i, op in enumerate(ops):
        for name in issue_before.get(i, ()):
            out.append(Issue(name=name, group="kv", seconds=seconds, sm_based=sm_based))
            if blocking:
                out.append(Wait(name=name + ".wait", collective=name))
        if not blocking:
            out += [Wait(name=name + ".wait", collective=name) for name in wait_before.get(i, ())]
        out.append(op)
    return out
