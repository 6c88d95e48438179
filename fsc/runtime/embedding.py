"""Row-wise sharded embedding tables, looked up in one step or one step ahead.

:class:`RowShardedEmbedding` is an ``nn.Embedding(num_embeddings, dim)`` whose rows are
spread over the ranks: rank r owns rows ``[r*P, (r+1)*P)`` (``P = ceil(num_embeddings /
ranks)``). Every collective is a functional collective, so under ``torch.compile`` the
exchanges are nodes of the compiled graphs, where fsc's scheduling passes see them.

**Synchronous lookup** (``module(ids)``): every id goes to its owner with an all-to-all
whose split sizes come from the batch (data-dependent; one more all-to-all of the counts),
the owner gathers the rows, and a second all-to-all brings them back
(``all_to_all_single_autograd``: gradients go back the same way, onto the owners' rows).

**Pipelined lookup** (what :class:`fsc.TrainPipeline` runs). The step that trains batch i
also prepares batch i+1 (:meth:`RowShardedEmbedding.prefetch`): it sends batch i+1's ids to
their owners and brings back their rows, while batch i's forward and backward run, so
neither exchange waits at the start of step i+1. Each distinct id is sent once (a batch of
next-item prediction looks up every item twice, as an input and as the previous token's
target), and its gradient is summed on the requester before it goes back. A row that batch
i looks up is updated by batch i's optimizer step *after* it was fetched; the owner marks
those rows (the ids of batch i+1 that are among the ids batch i sent it) and, at the start
of step i+1, :meth:`RowShardedEmbedding.pipelined` fetches just them again from the updated
table, first in line (TorchRec's TrainPipelinePEC splits the same way). Every other prefetched row is
exact because the table's optimizer moves only the rows a batch looked up (what
:func:`check_row_sparse` demands of it). The rows enter batch i+1's forward through
:class:`_RowsFromOwners`, whose backward sends the rows' gradients to their owners (one
all-to-all in the backward graph) and adds them onto the owners' rows.

A world of one rank (or no process group, or ``sharded=False``) is a plain lookup.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from fsc.errors import FscError
from fsc.runtime.gradients import c10d, waited

__all__ = ["Prefetched", "RowShardedEmbedding", "RowWiseAdagrad", "TrainPipelineError", "check_row_sparse"]


class TrainPipelineError(FscError, RuntimeError):
    """A model, optimizer or batch the pipelined training step cannot train exactly."""


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class Prefetched(NamedTuple):
    """One batch's lookup of one table, prepared by the previous step (all tensors; ``W`` ranks,
    ``N`` ids this rank looks up; with several ranks, ``U`` rows fetched: its distinct ids and
    2 padding ids, and ``M`` ids other ranks look up in this rank's rows, each rank's
    distinct; with one rank, ``U = M = N``)."""

    send_counts: torch.Tensor
    """[W] ids this rank sends to each owner."""
    recv_counts: torch.Tensor
    """[W] ids this rank receives from each rank (it owns their rows)."""
    inverse: torch.Tensor
    """[N] each id's row in ``rows`` (with several ranks, the rows are those of the distinct
    ids, owner-sorted: an id looked up twice is fetched once)."""
    # (with several ranks, ``rows``, ``stale`` and the counts include 2 padding ids per rank,
    # sent to itself: see ``prefetch``)
    wanted: torch.Tensor
    """[M] the received ids, as local rows of this rank's shard."""
    rows: torch.Tensor
    """[U, dim] the rows, owner-sorted; those marked stale are fetched again at step start."""
    stale: torch.Tensor
    """[U] bool: rows the previous batch updated (requester side)."""
    stale_owned: torch.Tensor
    """[M] bool: the same rows, owner side."""
    stale_send: torch.Tensor
    """[W] stale rows this rank sends to each requester."""
    stale_recv: torch.Tensor
    """[W] stale rows this rank receives from each owner."""


class RowShardedEmbedding(nn.Module):
    """An ``nn.Embedding(num_embeddings, dim)`` whose rows are spread over the ranks.

    Every rank draws the full table from ``seed`` (normal, ``std``) and keeps its rows, so a
    sharded table equals the unsharded one row for row (what the equivalence tests rely
    on). ``group``: the ranks sharing the table (default: the world).
    """

    def __init__(self, num_embeddings: int, dim: int, *, seed: int = 0, std: float = 0.02,
                 group: dist.ProcessGroup | None = None, sharded: bool = True) -> None:
        super().__init__()
        self.rank, self.world = _world(group) if sharded else (0, 1)
        self.group = group if group is not None else (dist.group.WORLD if self.world > 1 else None)
        self.num_embeddings = num_embeddings
        self.dim = dim
        self.rows_per_rank = math.ceil(num_embeddings / self.world)
        full = torch.empty(self.rows_per_rank * self.world, dim)
        full.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
        full[num_embeddings:] = 0.0  # padding rows past the table's end are never looked up
        start = self.rank * self.rows_per_rank
        self.weight = nn.Parameter(full[start : start + self.rows_per_rank].clone())
        self.in_pipeline: str | None = None
        """Set by :class:`fsc.TrainPipeline` while it runs a step: the table's name there."""

    # ------------------------------------------------------------------ synchronous

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.in_pipeline is not None:
            raise TrainPipelineError(
                f"table '{self.in_pipeline}' is looked up inside the pipelined step's loss: the pipeline fetches "
                f"each table's rows once per batch, for the ids `lookups(batch)` names, one step ahead; a second "
                f"lookup with other ids (or ids computed by the model) would read rows nobody prefetched. Name "
                f"all of the table's ids in `lookups` (concatenated) and read them from `rows['{self.in_pipeline}']`")
        if self.world == 1:
            return nn.functional.embedding(ids, self.weight)
        send, recv, _, _, order, wanted = self._send_ids(ids)
        rows = nn.functional.embedding(wanted, self.weight)
        back = funcol.all_to_all_single_autograd(rows, send, recv, self.group)
        return back.index_select(0, _inverse(order))

    def _send_ids(self, ids: torch.Tensor) -> tuple[list, list, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ids to their owners: split sizes (as lists: unbacked sizes when compiled, and as
        tensors), the owner-sorting permutation, and the received ids as local rows."""
        owner = torch.div(ids, self.rows_per_rank, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)
        # one-hot count instead of bincount: a fixed [world] shape, not data-dependent
        send_counts = (owner.unsqueeze(1) == torch.arange(self.world, device=ids.device)).sum(0)
        recv_counts = funcol.all_to_all_single(send_counts, None, None, self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        wanted = funcol.all_to_all_single(ids[order], recv, send, self.group)
        return send, recv, send_counts, recv_counts, order, wanted - self.rank * self.rows_per_rank

    def full_weight(self) -> torch.Tensor:
        """The whole table on every rank (evaluation; not differentiable)."""
        weight = self.weight.detach()
        if self.world > 1:
            shards = [torch.empty_like(weight) for _ in range(self.world)]
            dist.all_gather(shards, weight.contiguous(), group=self.group)
            weight = torch.cat(shards)
        return weight[: self.num_embeddings]

    # ------------------------------------------------------------------ one step ahead

    def prefetch(self, ids: torch.Tensor, updating: Prefetched | None) -> Prefetched:
        """Prepare the lookup of ``ids`` (the next batch's) while the batch of ``updating``
        (this step's lookup; None: nothing is being updated) trains: ids to owners, rows
        back, and the rows that batch updates marked stale. No gradient flows through it."""
        weight = self.weight.detach()
        world, device = self.world, ids.device
        if world == 1:
            owned = ids
            stale = _among(ids, updating.wanted) if updating is not None else torch.zeros_like(ids, dtype=torch.bool)
            counts = torch.tensor([ids.shape[0]], device=device)
            stale_counts = stale.sum().reshape(1)
            return Prefetched(counts, counts, torch.arange(ids.shape[0], device=device), owned,
                              nn.functional.embedding(ids, weight), stale, stale, stale_counts, stale_counts)
        # each distinct id once (a batch's next-item targets repeat its items); its gradient
        # is summed here, by the index_select that spreads the rows back, before it goes back
        distinct, first = torch.unique(ids, sorted=True, return_inverse=True)
        # two lookups of this rank's own first row ride along (sent to itself, never read):
        # no rank then receives 0 or 1 ids, sizes a compiler specialises (a recompile)
        padded = torch.cat([distinct, ids.new_full((_PAD,), self.rank * self.rows_per_rank)])
        send, recv, send_counts, recv_counts, order, wanted = self._send_ids(padded)
        stale_owned = (_among(wanted, updating.wanted) if updating is not None
                       else torch.zeros_like(wanted, dtype=torch.bool))
        # the rows and their stale flags in one exchange: the flag as one more column
        packed = torch.cat([nn.functional.embedding(wanted, weight), stale_owned.to(weight.dtype).unsqueeze(1)], 1)
        back = funcol.all_to_all_single(packed, send, recv, self.group)
        rows, stale = back[:, :-1], back[:, -1] > 0.5
        return Prefetched(send_counts, recv_counts, _inverse(order).index_select(0, first), wanted, rows, stale,
                          stale_owned, _segment_sums(stale_owned, recv_counts), _segment_sums(stale, send_counts))

    def pipelined(self, state: Prefetched) -> torch.Tensor:
        """The rows of a prefetched lookup, in the batch's id order: the stale ones fetched
        again from the table as it is now (after the previous step's update), and a gradient
        path to the owners' rows."""
        weight = self.weight
        if self.world == 1:
            rows = torch.where(state.stale.unsqueeze(1), nn.functional.embedding(state.wanted, weight.detach()),
                               state.rows)
            return _RowsFromOwners.apply(weight, state.wanted, rows, None, None, None)
        send, recv = state.stale_send.tolist(), state.stale_recv.tolist()
        fresh = nn.functional.embedding(state.wanted[state.stale_owned], weight.detach())
        fresh = funcol.all_to_all_single(fresh, recv, send, self.group)
        rows = state.rows.masked_scatter(state.stale.unsqueeze(1).expand_as(state.rows), fresh)
        rows = _RowsFromOwners.apply(weight, state.wanted, rows, state.send_counts.tolist(),
                                     state.recv_counts.tolist(), self.group)
        return rows.index_select(0, state.inverse)


class _RowsFromOwners(torch.autograd.Function):
    """Forward: the requested rows as they were fetched. Backward: their gradients to the
    owners (the reverse all-to-all) and onto the owners' rows of ``weight``."""

    @staticmethod
    def forward(ctx, weight, wanted, rows, send, recv, group):
        ctx.save_for_backward(wanted)
        ctx.shape, ctx.send, ctx.recv, ctx.group = weight.shape, send, recv, group
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad):
        (wanted,) = ctx.saved_tensors
        if ctx.group is not None:
            grad = waited(c10d.all_to_all_single(grad.contiguous(), ctx.recv, ctx.send,
                                                 funcol._resolve_group_name(ctx.group)))
        return grad.new_zeros(ctx.shape).index_add(0, wanted, grad), None, None, None, None, None


_PAD = 2


def _inverse(order: torch.Tensor) -> torch.Tensor:
    # undo a sort by gathering: the result's length is the (backed) length of ids
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _among(ids: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """``ids[k] in others`` for each k (bool), by sorting: no [len(ids), len(others)] table."""
    if others.numel() == 0:
        return torch.zeros_like(ids, dtype=torch.bool)
    ordered = torch.sort(others).values
    at = torch.searchsorted(ordered, ids).clamp(max=others.numel() - 1)
    return ordered[at] == ids


def _segment_sums(flags: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per segment (consecutive runs of ``counts[r]`` entries), how many ``flags`` are set."""
    ends = counts.cumsum(0)
    segment = torch.searchsorted(ends, torch.arange(flags.shape[0], device=flags.device), right=True)
    return torch.zeros_like(counts).index_add(0, segment, flags.to(counts.dtype))


# --------------------------------------------------------------------------- optimizers


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row (of a 2-D parameter): ``s_r += mean_j g_rj**2``,
    ``w_r -= lr * g_r / (sqrt(s_r) + eps)``; TorchRec's usual table optimizer
    (``EmbOptimType.EXACT_ROWWISE_ADAGRAD``). A row whose gradient is zero is left exactly
    as it is, so it is a row-sparse optimizer (:func:`check_row_sparse`)."""

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-8) -> None:
        if not lr > 0:
            raise ValueError(f"RowWiseAdagrad: lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.reshape(p.shape[0], -1)
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                state["sum"].add_(grad.pow(2).mean(1))
                p.reshape(p.shape[0], -1).addcdiv_(grad, (state["sum"].sqrt() + group["eps"]).unsqueeze(1),
                                                  value=-group["lr"])
        return loss


def check_row_sparse(optimizer: torch.optim.Optimizer, param: nn.Parameter, name: str) -> None:
    """Raise :class:`TrainPipelineError` unless ``optimizer`` leaves every row of ``param``
    whose gradient is zero exactly as it is (what prefetching a table's rows one step ahead
    needs): plain SGD (no momentum, no weight decay), Adagrad (no weight decay) and
    :class:`RowWiseAdagrad`. Adam, momentum and weight decay move rows a batch did not look
    up (their state or the decay keeps moving them), so a row prefetched before the update
    would be stale."""
    for group in optimizer.param_groups:
        if not any(p is param for p in group["params"]):
            continue
        kind = type(optimizer).__name__
        why = None
        if isinstance(optimizer, RowWiseAdagrad):
            pass
        elif type(optimizer) is torch.optim.SGD:
            if group.get("momentum", 0) or group.get("weight_decay", 0):
                why = (f"SGD with momentum={group.get('momentum', 0)}, weight_decay={group.get('weight_decay', 0)} "
                       f"moves rows the batch did not look up")
        elif type(optimizer) is torch.optim.Adagrad:
            if group.get("weight_decay", 0):
                why = f"Adagrad with weight_decay={group['weight_decay']} moves rows the batch did not look up"
        else:
            why = f"{kind} may move rows the batch did not look up (Adam's moments keep moving them)"
        if why is not None:
            raise TrainPipelineError(
                f"table '{name}': {why}, so a row prefetched one step ahead would be stale. Give the table a "
                f"row-sparse optimizer: torch.optim.SGD (momentum=0, weight_decay=0), torch.optim.Adagrad "
                f"(weight_decay=0) or fsc.RowWiseAdagrad (the dense parameters may keep {kind})")
