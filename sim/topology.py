"""Where ranks sit and what their links cost: nodes of ``ranks_per_node`` ranks, NVLink (or
shared memory) inside a node, InfiniBand between nodes, on a device profile of
:mod:`fsc.analysis.cost_model`.

Collective times (alpha-beta, per member; the collective lasts as long as its slowest
member's transfer):

* all-to-all, each rank sending ``b`` bytes spread evenly over the R ranks: the
  ``(k-1)/R`` share for its node's other ``k-1`` ranks goes over the intra-node link and
  the ``(R-k)/R`` share off the node over the rank's NIC, both at once, so its time is
  ``latency + max(b*(k-1)/R / intra_bw, b*(R-k)/R / inter_bw)`` (across nodes IB limits it);
* all-reduce of ``b`` bytes: a ring moves ``2*(R-1)/R*b`` per rank over the slowest link it
  crosses (IB once the group spans nodes), plus a tree's latency: one intra-node latency
  and ``ceil(log2 nodes)`` inter-node ones (NCCL's tree across nodes, chains inside them;
  the profile's latencies are per-collective small-message figures, not per hop).

A :class:`LinkModel` replaces the profile's numbers with measured ones (see
:mod:`sim.validate`: gloo on this host).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fsc.analysis.cost_model import DEVICE_PROFILES, DeviceProfile


class TopologyError(ValueError):
    """A bad rank count, node size, profile name or link figure; names the argument."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LinkModel:
    """Measured collective times: ``seconds = latency + bytes_per_rank / bandwidth`` per
    kind, for one group size (a fit; see :func:`sim.validate.calibrate_links`)."""

    all_to_all: tuple[float, float]
    """(latency s, bandwidth bytes/s), bytes = what one rank sends to the others."""
    all_reduce: tuple[float, float]
    """(latency s, bandwidth bytes/s), bytes = the reduced tensor's size."""


def profile(name: str | DeviceProfile) -> DeviceProfile:
    if isinstance(name, DeviceProfile):
        return name
    if name not in DEVICE_PROFILES:
        raise TopologyError(f"unknown device profile {name!r}; choose from {', '.join(DEVICE_PROFILES)}")
    return DEVICE_PROFILES[name]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Topology:
    ranks: int
    device: DeviceProfile
    ranks_per_node: int = 8
    links: LinkModel | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 1:
            raise TopologyError(f"ranks must be a positive int, got {self.ranks!r}")
        if not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1:
            raise TopologyError(f"ranks_per_node must be a positive int, got {self.ranks_per_node!r}")
        if self.ranks > self.ranks_per_node and self.ranks % self.ranks_per_node:
            raise TopologyError(f"ranks={self.ranks} spans nodes but is not a multiple of ranks_per_node="
                                f"{self.ranks_per_node} (nodes are full)")
        for field in ("intra_node_bandwidth", "inter_node_bandwidth"):
            if not getattr(self.device, field) > 0:
                raise TopologyError(f"device {self.device.name!r}: {field} must be > 0")

    @classmethod
    def of(cls, ranks: int, device: str | DeviceProfile = "h100", *, ranks_per_node: int = 8,
           links: LinkModel | None = None, **overrides: float) -> Topology:
        """``overrides``: DeviceProfile fields to replace (e.g. ``inter_node_bandwidth``)."""
        base = profile(device)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(DeviceProfile)})
        if unknown:
            raise TopologyError(f"unknown device profile field(s) {', '.join(unknown)}")
        if overrides:
            base = dataclasses.replace(base, **overrides)
        return cls(ranks=ranks, device=base, ranks_per_node=ranks_per_node, links=links)

    @property
    def per_node(self) -> int:
        return min(self.ranks, self.ranks_per_node)

    @property
    def spans_nodes(self) -> bool:
        return self.ranks > self.ranks_per_node

    def all_to_all_seconds(self, sent: np.ndarray | float, received: np.ndarray | float | None = None) -> float:
        """Time of an all-to-all where rank r sends ``sent[r]`` bytes (its whole input, 1/R
        of which it keeps) and receives ``received[r]``."""
        r = self.ranks
        if r == 1:
            return 0.0
        heaviest = float(np.max(np.maximum(sent, sent if received is None else received)))
        if self.links is not None:
            latency, bandwidth = self.links.all_to_all
            return latency + heaviest * (r - 1) / r / bandwidth
        dev, k = self.device, self.per_node
        intra = heaviest * (k - 1) / r / dev.intra_node_bandwidth
        if not self.spans_nodes:
            return dev.intra_node_latency + intra
        inter = heaviest * (r - k) / r / dev.inter_node_bandwidth
        return dev.inter_node_latency + max(intra, inter)

    def all_reduce_seconds(self, nbytes: float) -> float:
        r = self.ranks
        if r == 1:
            return 0.0
        if self.links is not None:
            latency, bandwidth = self.links.all_reduce
            return latency + nbytes / bandwidth
        dev = self.device
        bandwidth = dev.inter_node_bandwidth if self.spans_nodes else dev.intra_node_bandwidth
        latency = dev.intra_node_latency
        if self.spans_nodes:
            latency += math.ceil(math.log2(r // self.ranks_per_node)) * dev.inter_node_latency
        return latency + 2 * (r - 1) / r * nbytes / bandwidth
