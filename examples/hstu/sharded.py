"""Row-wise sharded embedding table and bucketed data-parallel gradient all-reduce.

``RowShardedEmbedding``: rank r owns rows [r*P, (r+1)*P) of the table (P = rows per
rank). A lookup sends every id to its owner with an all-to-all whose split sizes come
from the batch (data-dependent), the owner looks the rows up, and a second all-to-all
brings them back; autograd runs the reverse all-to-all, so gradients land on the owners'
rows. All collectives are functional collectives, so they appear in compiled graphs.

``GradientBuckets``: dense parameters are data parallel; their gradients are flattened
into buckets and all-reduced as soon as a bucket's last gradient is accumulated, so the
reduction of late layers overlaps the backward of early ones (what DDP does), and
``wait()`` writes the sums back before the optimizer step. Limits: one backward per
``wait()``; under ``torch.compile`` the whole backward is one node, so the hooks fire
when it ends and the reductions overlap only the rest of the step, not the backward; and
these all-reduces are issued from hooks, outside the compiled graphs.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class RowShardedEmbedding(nn.Module):
    """An ``nn.Embedding(num_embeddings, dim)`` whose rows are spread over the ranks.

    Every rank draws the full table from ``seed`` and keeps its rows, so a sharded table
    equals the unsharded one row for row (what the equivalence tests rely on). With one
    rank (or no process group, or ``sharded=False``) it is a plain lookup.
    """

    def __init__(self, num_embeddings: int, dim: int, *, seed: int, std: float = 0.02,
                 group: dist.ProcessGroup | None = None, sharded: bool = True) -> None:
        super().__init__()
        self.rank, self.world = _world(group) if sharded else (0, 1)
        self.group = group if group is not None else (dist.group.WORLD if self.world > 1 else None)
        self.num_embeddings = num_embeddings
        self.rows_per_rank = math.ceil(num_embeddings / self.world)
        full = torch.empty(self.rows_per_rank * self.world, dim)
        full.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
        full[num_embeddings:] = 0.0  # padding rows past the table's end are never looked up
        start = self.rank * self.rows_per_rank
        self.weight = nn.Parameter(full[start : start + self.rows_per_rank].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return nn.functional.embedding(ids, self.weight)
        world, rank = self.world, self.rank
        owner = torch.div(ids, self.rows_per_rank, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)
        # one-hot count instead of bincount: a fixed [world] shape, not data-dependent
        send_counts = (owner.unsqueeze(1) == torch.arange(world, device=ids.device)).sum(0)
        recv_counts = funcol.all_to_all_single(send_counts, None, None, self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        wanted = funcol.all_to_all_single(ids[order], recv, send, self.group)
        rows = nn.functional.embedding(wanted - rank * self.rows_per_rank, self.weight)
        back = funcol.all_to_all_single_autograd(rows, send, recv, self.group)
        # undo the sort by gathering: the result's length is the (backed) length of ids
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=ids.device))
        return back.index_select(0, inverse)

    def full_weight(self) -> torch.Tensor:
        """The whole table on every rank (evaluation; not differentiable)."""
        weight = self.weight.detach()
        if self.world > 1:
            shards = [torch.empty_like(weight) for _ in range(self.world)]
            dist.all_gather(shards, weight.contiguous(), group=self.group)
            weight = torch.cat(shards)
        return weight[: self.num_embeddings]


class GradientBuckets:
    """Sum dense gradients over the ranks, bucket by bucket, overlapped with backward."""

    def __init__(self, params: list[nn.Parameter], *, bucket_mb: float = 4.0,
                 group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.world = _world(group)
        self.group = group if group is not None else dist.group.WORLD
        # Gradients arrive roughly in reverse order of definition: bucket in that order.
        params = [p for p in reversed(params) if p.requires_grad]
        self.buckets: list[list[nn.Parameter]] = []
        current: list[nn.Parameter] = []
        size = 0
        for p in params:
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_mb * 2**20:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
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
