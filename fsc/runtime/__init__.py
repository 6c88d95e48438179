"""fsc.runtime: what rewritten graphs and training loops call at run time.

Implemented:

- the balancer (:mod:`fsc.runtime.balancer`): assigns a global batch's samples to ranks
  so that the largest per-rank cost is near its lower bound; equal counts by default,
  unequal counts on request; deterministic, so every rank computes the same assignment.
  With ``split=True`` it cuts samples heavier than a rank's share into contiguous chunks
  on several ranks (:mod:`fsc.runtime.balance_split`).
  Lower bounds in :mod:`fsc.runtime.balance_bounds`, algorithms in
  :mod:`fsc.runtime.balance_search`, the collective helpers (gathering lengths, the
  global-token loss normalizer) in :mod:`fsc.runtime.balance_dist`.

- routing (:mod:`fsc.runtime.routing`): moves a global batch's samples, and chunks of split
  samples, to the ranks the balancer assigns them (any token and sample columns, one
  all-to-all per step), with each chunk's metadata and the global token count; and
  ``prefix_kv``, the autograd functional all-to-all that gives a chunk, inside an attention
  layer, the keys and values of its sample's earlier chunks (gradients back to their owners).

- sharded embedding tables (:mod:`fsc.runtime.embedding`): ``RowShardedEmbedding``, looked
  up in the step or one step ahead (what :class:`fsc.TrainPipeline` runs: the next batch's
  rows prefetched during this step, the rows this batch updates fetched again), and
  ``RowWiseAdagrad``; and the dense gradients' all-reduce inside the compiled backward,
  bucket by bucket (:mod:`fsc.runtime.gradients`).

- the SM-free all-to-all (:mod:`fsc.runtime.ops`): ``fsc::all_to_all_single`` and
  ``fsc::wait_tensor``, argument for argument like their ``_c10d_functional`` namesakes,
  with autograd and fake implementations. Behind them, per process group, a transport from
  the table keyed by device type (:mod:`fsc.runtime.transport`): CPU ranks on one host
  exchange through shared memory (:mod:`fsc.runtime.transport.shm`), GPU ranks on one host
  through CUDA symmetric memory and copy engines (:mod:`fsc.runtime.transport.cuda`, not
  yet run on a GPU), everything else through the group's own collective. Importing
  :mod:`fsc.runtime.ops` registers the ops.

- the bubble meter (:mod:`fsc.runtime.bubbles`): per rank and step, compute-busy time,
  exposed communication (time blocked in collective waits) and straggler idle (time at a
  synchronisation point waiting for slower ranks), from ``torch.profiler`` CPU events; off
  by default. Its records and the Chrome/Perfetto trace and PNG writers
  (:mod:`fsc.runtime.bubble_trace`) are shared with the simulator (:mod:`sim`).

The opt-in sm-free-collectives pass emits calls into :mod:`fsc.runtime.ops`; the balancer,
the router and the meter are called by training loops, ``prefix_kv`` by a model's attention
layers (the HSTU example: ``examples/hstu/routing.py``, ``examples/hstu/model.py``'s kernel
form, ``examples/hstu/train.py --balance ... --split --bubbles DIR``).
"""

import importlib

# Loaded on first use, so that importing one runtime module (say, a custom op) does not pull
# in the balancer's numpy code or torch.distributed.
_EXPORTS = {
    "COUNT_RULES": "fsc.runtime.balancer",
    "METHODS": "fsc.runtime.balancer",
    "Assignment": "fsc.runtime.balancer",
    "BalanceError": "fsc.runtime.balancer",
    "Balancer": "fsc.runtime.balancer",
    "QuadraticCost": "fsc.runtime.balancer",
    "balance": "fsc.runtime.balancer",
    "LowerBound": "fsc.runtime.balance_bounds",
    "lower_bound": "fsc.runtime.balance_bounds",
    "split_lower_bound": "fsc.runtime.balance_bounds",
    "Chunk": "fsc.runtime.balance_split",
    "SplitPlan": "fsc.runtime.balance_split",
    "gather_lengths": "fsc.runtime.balance_dist",
    "global_token_count": "fsc.runtime.balance_dist",
    "loss_normalizer": "fsc.runtime.balance_dist",
    "Plan": "fsc.runtime.routing",
    "PrefixExchange": "fsc.runtime.routing",
    "Routed": "fsc.runtime.routing",
    "Router": "fsc.runtime.routing",
    "RoutingError": "fsc.runtime.routing",
    "prefix_kv": "fsc.runtime.routing",
    "prefix_tokens": "fsc.runtime.routing",
    "Prefetched": "fsc.runtime.embedding",
    "RowShardedEmbedding": "fsc.runtime.embedding",
    "RowWiseAdagrad": "fsc.runtime.embedding",
    "TrainPipelineError": "fsc.runtime.embedding",
    "check_row_sparse": "fsc.runtime.embedding",
    "reduce_in_backward": "fsc.runtime.gradients",
    "all_to_all": "fsc.runtime.ops",
    "SplitSizeError": "fsc.runtime.ops",
    "configure": "fsc.runtime.transport",
    "describe": "fsc.runtime.transport",
    "close_all": "fsc.runtime.transport",
    "TransportConfig": "fsc.runtime.transport",
    "CollectiveError": "fsc.runtime.transport",
    "PeerDiedError": "fsc.runtime.transport",
    "CollectiveTimeoutError": "fsc.runtime.transport",
    "SplitMismatchError": "fsc.runtime.transport",
    "TransportBrokenError": "fsc.runtime.transport",
    "TransportConfigError": "fsc.runtime.transport",
    "BubbleMeter": "fsc.runtime.bubbles",
    "BubbleReport": "fsc.runtime.bubbles",
    "Interval": "fsc.runtime.bubble_trace",
    "StepBubbles": "fsc.runtime.bubble_trace",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fsc.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
