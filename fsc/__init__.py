"""fsc: the FreeScale compiler, a ``torch.compile`` backend for distributed training of
sequential recommender models.

    model = torch.compile(model, backend="freescale", options={"inner": "inductor"})
    fsc.last_compile().summary()

    pipeline = fsc.TrainPipeline(model, optimizers, lookups=..., loss=...)   # the whole step
    loss = pipeline.progress(batches)
"""

from fsc.analysis.calibration import calibrate
from fsc.analysis.cost_model import DEVICE_PROFILES, DeviceProfile
from fsc.backend import freescale
from fsc.config import Config
from fsc.errors import AgreementError, FscError, InvariantError, OptionError, PassFailedError, PipelineError, UnverifiedError, VerificationError
from fsc.explain import explain
from fsc.inspect import CompileRecord, compile_records, last_compile
from fsc.pass_manager import PassManager, parse_pipeline
from fsc.pipeline import TrainPipeline
from fsc.runtime.embedding import RowShardedEmbedding, RowWiseAdagrad, TrainPipelineError
from fsc.passes.base import Pass, PassContext, PassResult

__version__ = "0.1.0"

__all__ = [
    "AgreementError",
    "CompileRecord",
    "Config",
    "DEVICE_PROFILES",
    "DeviceProfile",
    "FscError",
    "InvariantError",
    "OptionError",
    "Pass",
    "PassContext",
    "PassFailedError",
    "PassManager",
    "PassResult",
    "PipelineError",
    "RowShardedEmbedding",
    "RowWiseAdagrad",
    "TrainPipeline",
    "TrainPipelineError",
    "UnverifiedError",
    "VerificationError",
    "calibrate",
    "compile_records",
    "explain",
    "freescale",
    "last_compile",
    "parse_pipeline",
]
