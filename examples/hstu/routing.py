"""Balance-aware routing of the HSTU example's batches, over :mod:`fsc.runtime.routing`:
each rank reads its share of the samples, every rank computes the same plan from the
all-gathered lengths, and each sample's tokens (or, with ``Balancer(split=True)``, each
chunk's) move to the rank that trains them with one all-to-all.

A :class:`~examples.hstu.model.JaggedBatch` is five token columns (items, ratings,
timestamps, positions, targets) and two sample columns (the key and the sample's
negatives, which travel with every chunk, so a token's loss is the same on any rank).
Positions stay absolute, so a chunk's position embeddings and relative bias are those of
the unsplit sample; the routed batch carries the chunks' :class:`PrefixExchange`, which
the model's ``kernel`` attention form uses to fetch earlier chunks' keys and values.
"""

from __future__ import annotations

import torch

from examples.hstu.model import JaggedBatch
from fsc.runtime.routing import Plan, PrefixExchange, Router

__all__ = ["Plan", "PrefixExchange", "Router", "route_batch"]

_TOKEN_COLUMNS = ("items", "ratings", "timestamps", "positions", "targets")


def route_batch(router: Router, batch: JaggedBatch, plan: Plan) -> JaggedBatch:
    """The pieces ``plan`` gives this rank, as a jagged batch in global order, each with its
    key and negatives; ``exchange``, ``global_tokens`` and ``split`` set."""
    lengths = (batch.offsets[1:] - batch.offsets[:-1]).numpy()
    routed = router.route(lengths, {c: getattr(batch, c) for c in _TOKEN_COLUMNS},
                          {"keys": batch.keys, "negatives": batch.negatives}, plan)
    pieces = routed.offsets.numel() - 1
    seq_ids = torch.repeat_interleave(torch.arange(pieces), routed.offsets[1:] - routed.offsets[:-1])
    return JaggedBatch(offsets=routed.offsets, seq_ids=seq_ids, **routed.tokens, **routed.samples,
                       exchange=routed.exchange, global_tokens=routed.global_tokens,
                       split=bool(plan.assignment.split_samples))
