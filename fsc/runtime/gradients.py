"""Data-parallel gradient reduction inside the compiled backward.

:func:`reduce_in_backward` returns the dense parameters, bucket by bucket, through an
identity (:class:`_SumGradients`) whose backward all-reduces the bucket's gradients (summed
over the ranks) as one flat functional collective. Autograd calls that backward when the
last gradient of the bucket has been accumulated, so under ``torch.compile`` each bucket's
all-reduce is a node of the backward graph, issued as soon as its inputs exist, and fsc's
scheduling passes order it with the embedding exchanges and overlap it with the rest of the
backward. A model run with these tensors in place of its parameters
(``torch.func.functional_call``) leaves the summed gradients in ``.grad``: what DDP and the
HSTU example's ``GradientBuckets`` (hooks outside the graphs) leave there.

Buckets follow DDP's rule: parameters in reverse order of definition (gradients arrive
roughly in that order), a new bucket once one holds ``bucket_mb`` MiB. The traced backward
issues them in that order: bucket 0 first (see :func:`reduce_in_backward`), so that the
scheduling passes, which keep a group's collectives in order, can issue each bucket as soon
as its gradients exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

c10d = torch.ops._c10d_functional


def waited(t: torch.Tensor) -> torch.Tensor:
    """One wait on a functional collective's result. (The ``funcol`` wrappers' results are
    waited on where they are used, so a ``funcol.wait_tensor`` on one adds a second wait
    node to a traced graph: backward functions call the ops and this instead.)"""
    return c10d.wait_tensor(t)

__all__ = ["buckets_of", "reduce_in_backward", "waited"]


def buckets_of(params: Sequence[nn.Parameter], bucket_mb: float) -> list[list[int]]:
    """Indices of ``params`` per bucket: reverse order, a new bucket past ``bucket_mb`` MiB."""
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index in reversed(range(len(params))):
        current.append(index)
        size += params[index].numel() * params[index].element_size()
        if size >= bucket_mb * 2**20:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


def reduce_in_backward(params: Sequence[torch.Tensor], buckets: list[list[int]],
                       group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """``params`` unchanged in value; their gradients are summed over ``group`` in the
    backward, one all-reduce per bucket. With no group (one rank) they are returned as is."""
    if group is None:
        return list(params)
    out: list[torch.Tensor] = list(params)
    # Made last-bucket-first: autograd runs ready nodes newest first, and a traced backward
    # keeps that order, so the first bucket's all-reduce comes first on the group (whose
    # collectives keep their order); made in bucket order, the last bucket, whose
    # gradients come last, would be first in line, holding every other bucket back.
    for bucket in reversed(buckets):
        for index, tensor in zip(bucket, _SumGradients.apply(group, *(params[i] for i in bucket))):
            out[index] = tensor
    return out


class _SumGradients(torch.autograd.Function):
    """Identity forward; backward: one all-reduce (sum) of the bucket's flattened gradients."""

    @staticmethod
    def forward(ctx, group, *params):
        ctx.group = group
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        # a parameter the loss did not reach still joins (its gradient as zeros): every
        # rank must reduce buckets of the same size
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = waited(c10d.all_reduce(flat, "sum", funcol._resolve_group_name(ctx.group)))
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return (None, *out)
