"""The built-in passes, one module each, named like the pass.

``REGISTRY`` lists them in canonical pipeline order; it is built once here and never
mutated (tests that need an extra pass hand instances to ``options={"passes": [...]}``).
"""

from fsc.pass_manager import PassRegistry
from fsc.passes.lower_attention import LowerAttention
from fsc.passes.overlap_schedule import OverlapSchedule
from fsc.passes.prioritize_collectives import PrioritizeCollectives
from fsc.passes.split_collectives import SplitCollectives

REGISTRY = PassRegistry([LowerAttention, PrioritizeCollectives, SplitCollectives, OverlapSchedule])

__all__ = ["REGISTRY", "LowerAttention", "OverlapSchedule", "PrioritizeCollectives", "SplitCollectives"]
