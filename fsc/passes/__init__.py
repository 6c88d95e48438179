"""The built-in passes, one module each, named like the pass.

``REGISTRY`` holds every one of them, opt-in passes included, in canonical pipeline
order; the default pipeline is the registered passes whose ``in_default_pipeline`` is
true (``REGISTRY.default_pipeline()``). A new pass is its module plus one line here. The
registry is built once and never mutated (tests that need an extra pass hand instances to
``options={"passes": [...]}``).
"""

from fsc.passes.base import Pass, PassContext, PassRegistry, PassResult
from fsc.passes.lower_attention import LowerAttention
from fsc.passes.overlap_schedule import OverlapSchedule
from fsc.passes.prioritize_collectives import PrioritizeCollectives
from fsc.passes.sm_free_collectives import SmFreeCollectives
from fsc.passes.split_collectives import SplitCollectives

REGISTRY = PassRegistry([LowerAttention, PrioritizeCollectives, SplitCollectives, OverlapSchedule, SmFreeCollectives])

__all__ = [
    "REGISTRY",
    "LowerAttention",
    "OverlapSchedule",
    "Pass",
    "PassContext",
    "PassRegistry",
    "PassResult",
    "PrioritizeCollectives",
    "SmFreeCollectives",
    "SplitCollectives",
]
