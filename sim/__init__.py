"""``sim``: a discrete-event simulator of a distributed training step (per-rank compute
streams, per-group FIFO collectives, SM contention, the load balancer) driven by the HSTU
example's real compiled graphs; the paper's ablation at scale; validation against the
bubble meter. ``python -m sim --help``."""

from sim.engine import Compute, Issue, SimulationError, StepResult, Wait, simulate
from sim.lengths import LengthDistribution, LengthsError
from sim.topology import LinkModel, Topology, TopologyError

__all__ = ["Compute", "Issue", "LengthDistribution", "LengthsError", "LinkModel", "SimulationError", "StepResult",
           "Topology", "TopologyError", "Wait", "simulate"]
