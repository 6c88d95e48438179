"""Bucketed data-parallel gradient all-reduce from hooks, the example's synchronous step.

(The row-wise sharded table is the library's: :class:`fsc.runtime.embedding.RowShardedEmbedding`,
re-exported here. :class:`fsc.TrainPipeline` reduces the dense gradients inside the compiled
backward instead: :mod:`fsc.runtime.gradients`.)

``GradientBuckets``: dense parameters are data parallel; their gradients are flattened
into buckets and all-reduced as soon as a bucket's last gradient is accumulated, so the
reduction of late layers overlaps the backward of early ones (what DDP does), and
``wait()`` writes the sums back before the optimizer step. Limits: one backward per
``wait()``; under ``torch.compile`` the whole backward is one node, so the hooks fire
when it ends and the reductions overlap only the rest of the step, not the backward; and
these all-reduces are issued from hooks, outside the compiled graphs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from fsc.runtime.embedding import RowShardedEmbedding
from fsc.runtime.gradients import buckets_of

__all__ = ["GradientBuckets", "RowShardedEmbedding"]


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class GradientBuckets:
    """Sum dense gradients over the ranks, bucket by bucket, overlapped with backward."""

    def __init__(self, params: list[nn.Parameter], *, bucket_mb: float = 4.0,
                 group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.world = _world(group)
        self.group = group if group is not None else dist.group.WORLD
        # Gradients arrive roughly in reverse order of definition: bucket in that order
        # (the rule fsc.TrainPipeline's in-graph reduction uses too)
        params = [p for p in params if p.requires_grad]
        self.buckets: list[list[nn.Parameter]] = [[params[i] for i in bucket]
                                                  for bucket in buckets_of(params, bucket_mb)]
        self._bucket_of = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._ready: list[set[nn.Parameter]] = [set() for _ in self.buckets]
        self._pending: dict[int, torch.Tensor] = {}
        self._next = 0  # buckets launch strictly in index order: the same order on every rank
        self._hooks = []
        if self.world > 1:
            for p in params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _on_grad(self, p: nn.Parameter) -> None:
        index = self._bucket_of[p]
        if index < self._next or index in self._pending:
            raise RuntimeError(
                "GradientBuckets: a second backward reached a bucket already being reduced; "
                "call wait() after every backward (gradient accumulation is not supported)"
            )
        self._ready[index].add(p)
        while self._next < len(self.buckets) and len(self._ready[self._next]) == len(self.buckets[self._next]):
            self._launch(self._next)
            self._next += 1

    def _launch(self, index: int) -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in self.buckets[index]])
        self._pending[index] = funcol.all_reduce(flat, "sum", self.group)

    def wait(self) -> None:
        """Finish every bucket (launching any whose gradients never all arrived, e.g. a
        parameter unused this step) and write the sums into ``.grad``."""
        if self.world == 1:
            return
        for index in range(self._next, len(self.buckets)):
            for p in self.buckets[index]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self._launch(index)
        self._next = 0
        for index, bucket in enumerate(self.buckets):
            flat = funcol.wait_tensor(self._pending.pop(index))
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            self._ready[index].clear()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
