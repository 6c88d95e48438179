"""The collective halves of balancing: gathering the global batch's lengths so that every
rank can run the same :class:`~fsc.runtime.balancer.Balancer`, and normalizing the loss
when ranks hold different numbers of tokens.

Loss normalization. With unequal counts (``counts="free"``) or jagged samples, a
per-rank mean (``loss.mean()`` on each rank, gradients averaged over ranks) weights a token
on a lightly filled rank more than one on a full rank, so the gradient is no longer that of
the global batch. The fix: each rank sums its per-token losses and divides by
:func:`loss_normalizer`, the global token count (all-reduced). Then

    sum over ranks of grad(sum_rank / N) = grad(sum_all / N),

the gradient of the global mean, whatever the split; with ``grad_reduction="mean"`` (DDP
averages gradients over the W ranks) the divisor is ``N / W``, and the average gives the
same. This holds for any split of the tokens, balanced or not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from fsc.runtime.balancer import BalanceError

__all__ = ["GRAD_REDUCTIONS", "gather_lengths", "global_token_count", "loss_normalizer"]

GRAD_REDUCTIONS = ("sum", "mean")


def _device(group: dist.ProcessGroup | None) -> torch.device:
    # NCCL moves CUDA tensors only; gloo (and "cpu:gloo,cuda:nccl" for CPU tensors) host ones.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_lengths(local: Sequence[int] | np.ndarray | torch.Tensor,
                   group: dist.ProcessGroup | None = None) -> np.ndarray:
    """Every rank's per-sample lengths, concatenated in rank order: the global batch, the
    same int64 array on every rank. Ranks may hold different numbers of samples."""
    device = _device(group)
    mine = torch.as_tensor(np.asarray(local, dtype=np.int64).reshape(-1), device=device)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([mine.numel()], dtype=torch.int64, device=device), group=group)
    counts = [int(s.item()) for s in sizes]
    # all_gather needs equal sizes: pad to the largest, trim after.
    width = max(counts)
    padded = torch.zeros(width, dtype=torch.int64, device=device)
    padded[: mine.numel()] = mine
    parts = [torch.empty(width, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return np.concatenate([p[:k].cpu().numpy() for p, k in zip(parts, counts)]).astype(np.int64)


def global_token_count(local_tokens: int | torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The number of tokens summed over the ranks, as a 0-d float64 tensor (on the
    group's device)."""
    count = torch.as_tensor(local_tokens, dtype=torch.float64).reshape(()).to(_device(group))
    dist.all_reduce(count, group=group)
    return count


def loss_normalizer(local_tokens: int | torch.Tensor, *, group: dist.ProcessGroup | None = None,
                    grad_reduction: str = "sum") -> torch.Tensor:
    """What each rank divides its *summed* per-token loss by so that the reduced gradient
    is the gradient of the mean over the global batch's tokens (module docstring).

    ``grad_reduction``: ``"sum"`` when gradients are summed over ranks (all_reduce SUM, the
    HSTU example's GradientBuckets), ``"mean"`` when averaged (DDP). The token count is
    taken as at least 1, so an empty global batch gives zero loss, not NaN."""
    if grad_reduction not in GRAD_REDUCTIONS:
        raise BalanceError(f"grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}")
    total = global_token_count(local_tokens, group).clamp(min=1.0)
    if grad_reduction == "mean":
        total = total / dist.get_world_size(group)
    return total
