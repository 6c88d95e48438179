"""The TorchRec peer of ``python -m bench e2e``: the HSTU example's dense part on top of
TorchRec's sharded ``EmbeddingCollection`` (row-wise), trained by ``TrainPipelineSparseDist``.

What users would pick instead of a compiler for sharded embeddings. The model is the HSTU
example's (``examples/hstu/model.py``, in the attention form its config names) with one change: the item table is a TorchRec
``EmbeddingCollection`` sharded row-wise by ``DistributedModelParallel`` (rank r holds rows
``[r*P, (r+1)*P)``, ``P = ceil(rows/world)``, like ``RowShardedEmbedding``; every rank starts
from the same table values as the example's), and the dense part runs eagerly, data
parallel under the DDP that ``DistributedModelParallel`` wraps it in. The pipeline overlaps
the next batch's id all-to-all (``input_dist``) with this batch's forward and backward; the
row all-to-alls of the lookup itself are in the step (as in the example).

What differs, and why (TorchRec 1.8.0 / fbgemm-gpu-cpu 1.8.0 on torch 2.13 CPU):

* Row-wise sharding allows only the ``fused`` compute kernel (FBGEMM's table-batched
  embedding with the optimizer applied inside backward;
  ``EmbeddingComputeKernel.DENSE`` is offered for data-parallel tables only,
  ``torchrec/distributed/embedding_types.py``), and FBGEMM's CPU path implements
  ``EXACT_ADAGRAD``, ``EXACT_ROWWISE_ADAGRAD``, ``EXACT_SGD`` and
  ``EMAINPLACE_ROWWISE_ADAGRAD`` only (``AssertionError: Optimizer adam is not supported in
  CPU mode``, ``fbgemm_gpu/split_table_batched_embeddings_ops_training.py``). The table is
  therefore trained with fused ``EXACT_ADAGRAD`` (same learning rate) where the example uses
  Adam; it updates the rows a batch touched, where the example's Adam updates the whole
  shard every step (a dense gradient). The dense part keeps Adam.
* ``TrainPipelineSparseDist`` uses CUDA streams for the copy and the input all-to-all; on
  CPU it runs them on the default (only) stream, so the overlap it buys here is only
  that of issuing the next batch's id exchange before this batch's forward.
* The dense part is not compiled (TorchRec's ``TrainPipelineSparseDist`` runs the model as
  given; compiling is a separate choice, reported by the other rows).

TorchRec is an optional benchmark dependency (``make bench`` installs it); nothing in fsc
imports this module at run time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

#: what ``make bench`` installs (``pip install --no-deps``), for messages
REQUIREMENT = "torchrec==1.8.0 and fbgemm-gpu-cpu==1.8.0 (make bench installs them)"


def unavailable() -> str | None:
    """Why TorchRec cannot be used here, or None."""
    try:
        import torchrec  # noqa: F401
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist  # noqa: F401
    except Exception as e:  # ImportError, or fbgemm's ops failing to load against this torch
        return f"torchrec is not importable ({type(e).__name__}: {e}); needs {REQUIREMENT}"
    return None


def _batch_type() -> type:
    from torchrec.streamable import Pipelineable

    @dataclasses.dataclass
    class Batch(Pipelineable):
        """One rank's step input. ``ids`` (a KeyedJaggedTensor, key ``item``, one row holding
        ``cat([items, targets, negatives])``) is what the sharded collection reads; the
        pipeline finds it by tracing the model and runs its all-to-all one batch ahead.
        ``inputs``: the example's model inputs (:func:`examples.hstu.model.model_inputs`)."""

        ids: Any
        inputs: tuple[torch.Tensor, ...]

        def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
            return type(self)(self.ids.to(device=device, non_blocking=non_blocking),
                              tuple(v.to(device=device, non_blocking=non_blocking) for v in self.inputs))

        def record_stream(self, stream: Any) -> None:
            self.ids.record_stream(stream)
            for v in self.inputs:
                v.record_stream(stream)

        def pin_memory(self) -> "Batch":
            return type(self)(self.ids.pin_memory(), tuple(v.pin_memory() for v in self.inputs))

    return Batch


def make_batch(inputs: list[torch.Tensor]) -> Any:
    """The pipeline's batch for :func:`examples.hstu.model.model_inputs`' inputs."""
    from torchrec import KeyedJaggedTensor

    items, targets, negatives = inputs[0], inputs[5], inputs[6]
    values = torch.cat([items, targets, negatives.reshape(-1)])
    ids = KeyedJaggedTensor.from_lengths_sync(keys=["item"], values=values,
                                              lengths=torch.tensor([values.numel()], dtype=torch.int64))
    return _batch_type()(ids, tuple(inputs))


class DenseLoss(nn.Module):
    """The example's model after its item lookup (:meth:`examples.hstu.model.HSTU.loss`), as
    one module: the pipeline's tracer treats it as a leaf, so the attention form's Python
    (loops over length groups) runs as written."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, emb: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.model.loss(emb, *inputs)


class TorchRecHSTU(nn.Module):
    """HSTU with its item table as a TorchRec ``EmbeddingCollection`` (unsharded until
    ``DistributedModelParallel`` shards it); ``forward(batch) -> (loss, loss)`` as the
    train pipelines expect."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        from examples.hstu.model import HSTU

        dense = HSTU(dataclasses.replace(cfg, sharded=False))  # seeded: the example's dense weights
        del dense.item  # the table lives in the collection
        self.dense = DenseLoss(dense)
        self.rows = cfg.num_items + 1
        self.ec = EmbeddingCollection(
            tables=[EmbeddingConfig(name="item", embedding_dim=cfg.dim, num_embeddings=self.rows,
                                    feature_names=["item"])],
            device=torch.device("cpu"))

    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.ec(batch.ids)["item"].values()
        # the example's own loss after its lookup (HSTU.loss), so the maths cannot drift apart
        loss = self.dense(emb, batch.inputs)
        return loss, loss.detach()


def example_table(rows: int, dim: int, world: int, seed: int) -> torch.Tensor:
    """The example's item table (``RowShardedEmbedding``'s draw, padding rows included)."""
    per_rank = math.ceil(rows / world)
    full = torch.empty(per_rank * world, dim)
    full.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
    full[rows:] = 0.0
    return full


@dataclasses.dataclass(kw_only=True)
class TorchRecRun:
    """A sharded model, its pipeline, and the batches it reads (``batches(step)``, the same
    as every other backend's; the pipeline reads up to two steps ahead)."""

    model: nn.Module
    pipeline: Any
    batches: Callable[[int], Any]
    plan: str
    _next: int = 0

    def _iterator(self) -> Iterator[Any]:
        while True:
            yield self.batches(self._next)
            self._next += 1

    def __post_init__(self) -> None:
        self._it = self._iterator()

    def step(self) -> torch.Tensor:
        """One training step (forward, backward, fused table update, dense optimizer step)."""
        return self.pipeline.progress(self._it)


def build(cfg: Any, batches: Callable[[int], Any], *, lr: float, rank: int, world: int) -> TorchRecRun:
    """Shard ``TorchRecHSTU(cfg)`` row-wise over the default group and wrap it in
    ``TrainPipelineSparseDist``. ``batches(step)`` returns :func:`make_batch`'s batches."""
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.distributed.types import ShardingType
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    device = torch.device("cpu")
    model = TorchRecHSTU(cfg)
    sharders = [EmbeddingCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD,
                                                         "learning_rate": lr})]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        constraints={"item": ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value])})
    plan = planner.collective_plan(model, sharders, dist.group.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    _load_example_rows(dmp, cfg, world)
    optimizer = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                      lambda params: torch.optim.Adam(params, lr=lr))
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    return TorchRecRun(model=dmp, pipeline=pipeline, batches=batches, plan=str(plan))


def _load_example_rows(dmp: nn.Module, cfg: Any, world: int) -> None:
    """Put the example's initial table rows into this rank's row-wise shard."""
    state = dmp.state_dict()
    key = next(k for k in state if k.endswith("ec.embeddings.item.weight"))
    shards = state[key].local_shards()
    full = example_table(cfg.num_items + 1, cfg.dim, world, cfg.seed + 1)
    with torch.no_grad():
        for shard in shards:
            start, rows = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
            shard.tensor.copy_(full[start : start + rows])
