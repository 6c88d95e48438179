"""Balance-aware routing of a global batch: each rank reads its share of the samples, every
rank computes the same assignment from the all-gathered lengths, and each sample's tokens
move to the rank that trains it with one small all-to-all.

Per step:

1. ``plan``: all-gather the local samples' token counts (a few int64s per rank), run the
   balancer; every rank computes the same :class:`fsc.runtime.balancer.Assignment` (it is a
   pure function of the lengths). ``plan_async`` does this on a background thread with
   its own process group, so the assignment of batch i+1 is ready while step i runs.
2. ``route``: each rank packs its local samples' token columns (item ids, ratings,
   timestamps, positions, targets: 5 int64 per token) and per-sample columns (the key and
   the sample's negatives: 1 + K int64 per sample), grouped by destination, into one flat
   int64 tensor and exchanges it with one ``all_to_all_single``. Split sizes need no extra
   exchange: every rank knows every sample's length and destination. A sample's negatives
   travel with it, so training it on another rank changes nothing in its loss.

The ids travel with the sample's other columns in that one exchange, then the model's
sharded lookup sends them to the table owners as usual. (Folding the routing into the
lookup itself, ids straight from the reader to the owners and rows from the owners to the
assigned rank, would save this small exchange; the data here is 5 int64 per token and
1 + K per sample.)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from examples.hstu.model import JaggedBatch
from fsc.runtime.balance_dist import gather_lengths
from fsc.runtime.balancer import Assignment, Balancer

_COLUMNS = ("items", "ratings", "timestamps", "positions", "targets")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """One step's routing: the global batch's lengths (rank-major: rank 0's samples first)
    and the assignment."""

    lengths: np.ndarray
    local_counts: np.ndarray
    """Samples each rank read."""
    assignment: Assignment


class Router:
    """Moves samples to the ranks a :class:`Balancer` assigns them to."""

    def __init__(self, balancer: Balancer, group: dist.ProcessGroup | None = None) -> None:
        self.balancer = balancer
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if balancer.ranks != self.world:
            raise ValueError(f"the balancer plans for {balancer.ranks} ranks but the group has {self.world}")
        # a group of its own for the background thread: its collectives never interleave
        # with the training step's on the default group
        self._planning_group = dist.new_group(backend="gloo")
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsc-balance")

    def plan(self, local_lengths: np.ndarray, group: dist.ProcessGroup | None = None) -> Plan:
        lengths = np.asarray(local_lengths, dtype=np.int64)
        counts = gather_lengths([len(lengths)], group if group is not None else self.group)
        everything = gather_lengths(lengths, group if group is not None else self.group)
        return Plan(lengths=everything, local_counts=counts, assignment=self.balancer.assign_lengths(everything))

    def plan_async(self, local_lengths: np.ndarray) -> concurrent.futures.Future[Plan]:
        """:meth:`plan` on the background thread (its own process group). Every rank must
        call it for the same steps in the same order."""
        return self._pool.submit(self.plan, np.array(local_lengths, copy=True), self._planning_group)

    def route(self, batch: JaggedBatch, plan: Plan) -> JaggedBatch:
        """The samples ``plan`` assigns to this rank, as a jagged batch (ordered by their
        index in the global batch), each with its key and negatives."""
        first = int(plan.local_counts[: self.rank].sum())
        mine = np.arange(first, first + int(plan.local_counts[self.rank]))
        local_lengths = (batch.offsets[1:] - batch.offsets[:-1]).numpy()
        if not np.array_equal(local_lengths, plan.lengths[mine]):
            raise ValueError("route: the batch's lengths are not the ones this plan was made for")
        dest = plan.assignment.rank_of[mine]
        tokens = torch.stack([getattr(batch, c) for c in _COLUMNS], dim=1)  # [T, 5]
        samples = torch.cat([batch.keys.unsqueeze(1), batch.negatives], dim=1)  # [B, 1 + K]
        width = samples.shape[1]
        starts = batch.offsets[:-1].numpy()
        # per destination: its tokens' rows, then its samples' (key, negatives) rows, flattened
        parts, send_sizes = [], []
        for r in range(self.world):
            chosen = np.flatnonzero(dest == r)  # ascending: sample order kept
            rows = (np.concatenate([np.arange(starts[i], starts[i] + local_lengths[i]) for i in chosen])
                    if len(chosen) else np.zeros(0, dtype=np.int64))
            index = torch.from_numpy(rows.astype(np.int64))
            parts += [tokens[index].reshape(-1), samples[torch.from_numpy(chosen.astype(np.int64))].reshape(-1)]
            send_sizes.append(len(rows) * len(_COLUMNS) + len(chosen) * width)
        # what arrives from each source: its samples assigned here, in its order
        source_of = np.repeat(np.arange(self.world), plan.local_counts)
        arriving = np.flatnonzero(plan.assignment.rank_of == self.rank)  # ascending global index
        from_source = [arriving[source_of[arriving] == s] for s in range(self.world)]
        recv_tokens = [int(plan.lengths[a].sum()) for a in from_source]
        recv_sizes = [t * len(_COLUMNS) + len(a) * width for t, a in zip(recv_tokens, from_source)]
        received = torch.empty(sum(recv_sizes), dtype=torch.int64)
        dist.all_to_all_single(received, torch.cat(parts), recv_sizes, send_sizes, group=self.group)
        # arrivals are grouped by source and, within a source, in global order: that is
        # global order overall, since sources hold consecutive global indices
        token_parts, sample_parts = [], []
        for chunk, t, a in zip(received.split(recv_sizes), recv_tokens, from_source):
            token_parts.append(chunk[: t * len(_COLUMNS)].view(t, len(_COLUMNS)))
            sample_parts.append(chunk[t * len(_COLUMNS) :].view(len(a), width))
        got, per_sample = torch.cat(token_parts), torch.cat(sample_parts)
        lengths = plan.lengths[arriving]
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.from_numpy(np.cumsum(lengths)) if len(lengths) else offsets[1:]
        seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.from_numpy(lengths))
        cols = {c: got[:, i].contiguous() for i, c in enumerate(_COLUMNS)}
        return JaggedBatch(offsets=offsets, seq_ids=seq_ids, keys=per_sample[:, 0].contiguous(),
                           negatives=per_sample[:, 1:].contiguous(), **cols)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        dist.destroy_process_group(self._planning_group)
