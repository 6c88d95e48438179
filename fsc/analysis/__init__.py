"""Rank-invariant analyses of FX graphs: collectives, cost model, timeline, schedules.

Everything here is a pure function of graph structure, shapes, dtypes and the device
profile, so every rank computes the same answer (DESIGN.md invariant 2).
"""

from fsc.analysis.collectives import Collective, find_collectives, is_collective, is_wait, opaque_collectives
from fsc.analysis.cost_model import DEVICE_PROFILES, CostModel, DeviceProfile, NodeCost
from fsc.analysis.timeline import Timeline, estimate_timeline

__all__ = [
    "DEVICE_PROFILES",
    "Collective",
    "CostModel",
    "DeviceProfile",
    "NodeCost",
    "Timeline",
    "estimate_timeline",
    "find_collectives",
    "is_collective",
    "is_wait",
    "opaque_collectives",
]
