"""The HSTU example's training step as the simulator runs it.

Two programs of one step, on every rank:

**Unpipelined** (the example's ``Trainer``, ``examples/hstu/train.py``): a tiny all-reduce of
the global token count (the first synchronisation), the compiled forward and backward graphs
with the embedding exchange inside them (at the start of the forward: the id counts, the ids
to their owners, the rows back; at the end of the backward: the rows' gradients back to the
owners), the dense gradients' bucketed all-reduce (``GradientBuckets``: under
``torch.compile`` the whole backward is one node, so every bucket is issued when the backward
ends and waited on before the optimizer), Adam over the dense parameters and the rank's
item-table shard (memory-bound: 28 bytes per fp32 parameter). The loss's all-reduce (for the
log) is left running into the next step (``train.py`` reads it there): not modelled.

**Pipelined** (``fsc.TrainPipeline``, :mod:`fsc.pipeline`): step i's compiled forward

1. refetches the rows of batch i that batch i-1 updated, first in line: the owners gather
   them, one all-to-all brings them back (``refetch``), waited where the scheduled forward
   waited its rows (the compute that does not need the rows runs meanwhile), and they are
   put in place. Its size is a fraction ``f`` of the rows the rank looks up (rows of ``4 *
   dim`` bytes; see :func:`refetch_fraction`);
2. runs batch i's forward on rows prefetched in step i-1 (the forward graph's own exchange
   is gone from its place);
3. issues batch i+1's exchange (the same three all-to-alls: counts, ids, rows) at the
   forward's start, behind the refetch on the same queue, with nothing of batch i waiting
   for it: it overlaps all of the forward's compute. ``prefetch_wait="forward"`` (the
   default) waits on it at the end of the forward graph, where the compiled step does (the
   prefetched rows are the forward graph's outputs, and a functional collective's result is
   waited on inside the graph that returns it); ``"step"`` at the end of the step (after
   the optimizer: the bound when nothing waits for it until the next step);

and its backward holds the rows' gradient all-to-all back to the owners and the dense
gradients' all-reduce, one per bucket (:func:`fsc.runtime.gradients.reduce_in_backward`:
parameters in reverse order of definition, a new bucket past ``bucket_mb``), each issued
once its last gradient exists and waited on at the end of the backward, before the
optimizer. Where exactly is the freescale passes' decision, so the simulator takes it from
them: :func:`capture_pipelined_graphs` captures the example's step in the shape
``TrainPipeline`` compiles it (rows first, then the dense parameters through
``reduce_in_backward``), and the pipelined step runs that graph pair as the passes schedule
it (at the ablation's scale they issue each layer's bucket once its weight gradients exist,
bucket 0 (the last layer) first, and the rows' gradient all-to-all after the last
bucket: one process group keeps its collectives in issue order). Every collective of the
pipelined step (refetch, exchanges, buckets) is on that one process group: one FIFO queue
(NCCL runs a communicator's collectives in issue order). With ``sm_free`` (``all``,
``all-split``) the buckets' all-reduces are what ``sm-free-collectives`` makes of them:
two copy-engine all-to-alls and a sum (:func:`sim.workload.sm_free_all_reduces`). The
split samples' key/value exchanges are on a group of their own (``Router.exchange_group``;
``kv_group="step"`` puts them on the step's group, behind its other collectives). The token count's all-reduce is
issued a step ahead (``train.py`` reads and routes one batch further ahead when pipelined)
and the loss's runs into the next step: neither is waited on in the step, neither is
modelled. The optimizer stays as in the unpipelined step (Adam over the dense
parameters and the table shard; ``TrainPipeline`` needs a row-sparse table optimizer, which
moves fewer bytes: not modelled, so that the pipelined rows differ from the ``-sync`` ones by
the schedule alone).

The pipelined lookup sends each distinct id once (:meth:`fsc.runtime.embedding.RowShardedEmbedding.prefetch`):
the rows it exchanges, refetches and sends gradients for are the rank's distinct ids
(``HSTUStep.ranks(..., distinct=True)``, what :func:`sim.ablation.run_config` passes for the
pipelined rows). Of the ``2T + K`` ids a rank looks up (its T items, their next items as
targets, K negatives), the targets repeat the items but for one per sample or chunk (a
user's history holds an item once, as MovieLens's does); items of different users are taken
as distinct (1M items drawn uniformly collide rarely; popular items would repeat more,
and the exchange would shrink further).

Limits of the pipelined model: batch i+1's exchange is costed with batch i's sizes (the same
distribution); its three all-to-alls run back to back on the queue, without the host reading
the counts (the ids' split sizes) or the owners gathering rows between them; the stale flag
the prefetched rows carry (one more column) is left out; the step's end-of-data agreement
(one tiny asynchronous all-reduce) is left out.

Configurations (the paper's ablation; ``CONFIGS[name]["pipelined"]`` says which program):

``baseline``        unpipelined: random assignment of the global batch
                    (``Balancer(method="random")``), the captured graphs in program order, every
                    collective waited on right after issue;
``lb``              unpipelined: + the balancer (``Balancer(method="freescale")``) on the
                    per-sample cost this same step model gives a sample of length L;
``overlap``         **pipelined**: + the freescale pipeline's schedule (prioritize, split,
                    overlap) and its waits;
``sm-free``         unpipelined: + all-to-alls as copy-engine transfers (no SM contention);
``all``             **pipelined**: the three together;
``lb-split``        unpipelined: ``lb`` with ``Balancer(split=True)``: samples heavier than a
                    rank's share are cut into chunks on several ranks, with their key/value
                    exchange per layer (:mod:`sim.split`);
``all-split``       **pipelined**: ``all`` with the same splits;
``overlap-sync``    ``overlap`` unpipelined (what ``overlap`` was before the pipelined step);
``all-sync``        ``all`` unpipelined;
``all-split-sync``  ``all-split`` unpipelined.

``baseline``, ``lb``, ``sm-free`` and ``lb-split`` keep the captured program order (no
freescale schedule, as the peers run it), so they stay unpipelined; the ``-sync`` rows
tell what the pipelined step alone changes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np
import sympy
import torch.fx as fx

from fsc.analysis.cost_model import DeviceProfile
from sim.engine import Compute, Issue, Op, Wait
from sim.split import Exchange, with_exchange
from sim.topology import Topology, profile
from sim.workload import GraphProgram, Ranks, T, programs_from_graphs

log = logging.getLogger(__name__)

CONFIGS: dict[str, dict[str, bool]] = {
    "baseline": {"balance": False, "overlap": False, "sm_free": False, "split": False, "pipelined": False},
    "lb": {"balance": True, "overlap": False, "sm_free": False, "split": False, "pipelined": False},
    "overlap": {"balance": False, "overlap": True, "sm_free": False, "split": False, "pipelined": True},
    "sm-free": {"balance": False, "overlap": False, "sm_free": True, "split": False, "pipelined": False},
    "all": {"balance": True, "overlap": True, "sm_free": True, "split": False, "pipelined": True},
    "lb-split": {"balance": True, "overlap": False, "sm_free": False, "split": True, "pipelined": False},
    "all-split": {"balance": True, "overlap": True, "sm_free": True, "split": True, "pipelined": True},
    "overlap-sync": {"balance": False, "overlap": True, "sm_free": False, "split": False, "pipelined": False},
    "all-sync": {"balance": True, "overlap": True, "sm_free": True, "split": False, "pipelined": False},
    "all-split-sync": {"balance": True, "overlap": True, "sm_free": True, "split": True, "pipelined": False},
}
KV_GROUPS = ("own", "step")
"""The key/value exchanges' process group (:meth:`HSTUStep.ops`)."""
PREFETCH_WAITS = ("forward", "step")
"""Where the pipelined step waits on the next batch's exchange (module docstring)."""


def refetch_fraction(lookups: float, num_items: int) -> float:
    """The share of a batch's row lookups that the previous batch also looked up (the rows
    the pipelined step fetches again), with item ids drawn uniformly from ``num_items``
    items, as the simulator's exchange assumes (every owner receives the mean of what ranks
    send): ``1 - (1 - 1/N)**n`` for ``n = lookups``, the previous batch's lookups over all
    ranks. A skewed popularity (popular items in every batch) only raises it: this is the
    least overlap a batch of ``n`` lookups can have."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    return float(-np.expm1(max(float(lookups), 0.0) * np.log1p(-1.0 / num_items))) if num_items > 1 else 1.0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HSTUScale:
    """An HSTU configuration (the example's model) and its batch per rank.

    The default is the production-like scale of the ablation: d=512, 4 heads of 128 (q/k and
    v), 8 layers, sequences up to 4096 tokens, 512 sampled negatives, 32 sequences per
    rank. Between generative-recommenders' public research configs (d=50..256, 2..8
    blocks, 200-token MovieLens histories) and the HSTU paper's industrial runs (sequences
    up to 8192, many more layers): large enough that attention (quadratic in a sequence's
    length) dominates a rank's compute, as in the paper's setting, and small enough that
    the graphs capture in about a minute on a CPU. fp32 as the example trains (TF32 peak).
    """

    dim: int = 512
    heads: int = 4
    qk_dim: int = 128
    v_dim: int = 128
    layers: int = 8
    max_len: int = 4096
    negatives: int = 512
    batch_per_rank: int = 32
    num_items: int = 1_000_000
    num_ratings: int = 10
    time_buckets: int = 32
    bucket_mb: float = 4.0

    def describe(self) -> str:
        return (f"HSTU d={self.dim} heads={self.heads} qk/v={self.qk_dim}/{self.v_dim} layers={self.layers} "
                f"max_len={self.max_len} negatives={self.negatives} batch/rank={self.batch_per_rank} "
                f"items={self.num_items}")

    def dense_parameters(self) -> int:
        """Dense (data-parallel) parameters of ``examples/hstu/model.py``'s HSTU."""
        d, h, qk, v = self.dim, self.heads, self.qk_dim, self.v_dim
        layer = (2 * d + d * h * (2 * v + 2 * qk) + h * (2 * v + 2 * qk) + self.max_len * h + self.time_buckets * h
                 + 2 * h * v + h * v * d + d)
        return self.layers * layer + self.num_ratings * d + self.max_len * d + 2 * d


def capture_pipelined_graphs(spec, bucket_mb: float) -> dict[str, fx.GraphModule]:
    """The example's forward and backward graphs in the shape ``fsc.TrainPipeline`` compiles
    them, for what the simulator takes from them: the item rows are looked up first (in the
    pipelined step the rows' autograd node, ``_RowsFromOwners``, is made before the
    buckets'), then the dense parameters go through :func:`fsc.runtime.gradients.reduce_in_backward`
    (buckets of ``bucket_mb``, as ``TrainPipeline`` makes them) and the model's loss runs on
    the rows (``examples/hstu/train.py``'s ``pipeline()``: ``model.loss(rows, *inputs)``).
    The backward then holds the rows' gradient all-to-all and one all-reduce per bucket in
    the order the freescale passes get them from ``TrainPipeline``. The forward's lookup is
    the synchronous one: the simulator replaces its exchange by the refetch and the next
    batch's exchange (module docstring). Needs a process group of ``spec.world`` ranks."""
    import torch
    import torch.distributed as dist

    from bench.hstu_graphs import hstu_step
    from bench.inductor_peers import compile_and_record
    from fsc.runtime.gradients import buckets_of, reduce_in_backward

    model, inputs = hstu_step(spec)
    dense = {name: p for name, p in model.named_parameters() if not name.startswith("item.")}
    names = list(dense)
    buckets = buckets_of(list(dense.values()), bucket_mb)

    class Loss(torch.nn.Module):  # as TrainPipeline's: the model and its loss on the rows, one module
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, rows, batch):
            return self.model.loss(rows, *batch)

    loss = Loss()

    def step(*batch):
        rows = model.item(torch.cat([batch[0], batch[5], batch[6].reshape(-1)]))
        reduced = reduce_in_backward([dense[n] for n in names], buckets, dist.group.WORLD)
        return torch.func.functional_call(loss, {f"model.{n}": t for n, t in zip(names, reduced)}, (rows, batch),
                                          strict=False)

    compiled = compile_and_record(step, inputs, {}, stop="post_grad")
    missing = {"forward", "backward"} - set(compiled.graphs)
    if missing:
        raise RuntimeError(f"pipelined HSTU capture did not see the {', '.join(sorted(missing))} graph")
    return {kind: compiled.graphs[kind] for kind in ("forward", "backward")}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class HSTUStep:
    scale: HSTUScale
    programs: dict[str, dict[str, GraphProgram]]
    """``{"program": {...}, "freescale": {...}, "pipelined": {...}}``: forward/backward as
    captured, scheduled by the freescale pipeline, and the pipelined step's graphs scheduled."""
    send_rows: sympy.Expr
    world: int
    planned_on: str
    passes: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def capture(cls, scale: HSTUScale = HSTUScale(), *, plan_profile: str | DeviceProfile = "h100",
                world: int = 8) -> HSTUStep:
        """Compile the example at ``scale`` on a fake group of ``world`` ranks and schedule
        it with the freescale pipeline planned on ``plan_profile``; the same for the
        pipelined step's graphs (:func:`capture_pipelined_graphs`) (a minute or two)."""
        from bench.hstu_graphs import HSTUSpec, capture_hstu_graphs, fake_world
        from fsc.analysis.cost_model import CostModel
        from fsc.graph_utils import clone_graph_module
        from fsc.pass_manager import PassManager, default_pipeline
        from fsc.passes.base import PassContext

        dev = profile(plan_profile)
        spec = HSTUSpec(world=world, num_items=min(scale.num_items, 50_000), dim=scale.dim, heads=scale.heads,
                        qk_dim=scale.qk_dim, v_dim=scale.v_dim, layers=scale.layers, max_len=scale.max_len,
                        negatives=scale.negatives, sequences=8, mean_length=50.0)
        passes: dict[str, list[str]] = {}

        def schedule(graphs: dict, label: str) -> dict:
            out = {}
            for kind, gm in graphs.items():
                copy = clone_graph_module(gm)
                ctx = PassContext(graph_kind=kind, cost_model=CostModel(dev), memory_budget_bytes=None)
                records = PassManager(default_pipeline()).run(copy, ctx)
                passes[label + kind] = [f"{r.name}: {r.stats} {list(r.reasons)}" for r in records]
                out[kind] = copy
            return out

        with fake_world(world):
            captured = capture_hstu_graphs(spec)
            scheduled = schedule(captured, "")
            pipelined = schedule(capture_pipelined_graphs(spec, scale.bucket_mb), "pipelined.")
        program, send = programs_from_graphs(captured, world, dev)
        freescale, _ = programs_from_graphs(scheduled, world, dev)
        pipe, _ = programs_from_graphs(pipelined, world, dev)
        return cls(scale=scale, programs={"program": program, "freescale": freescale, "pipelined": pipe},
                   send_rows=send, world=world, planned_on=dev.name, passes=passes)

    def _send(self, tokens: np.ndarray) -> np.ndarray:
        fn = sympy.lambdify(T, self.send_rows, "numpy")
        return np.broadcast_to(np.asarray(fn(tokens), dtype=np.float64), tokens.shape).copy()

    def ranks(self, lengths: Sequence[np.ndarray], offsets: Sequence[np.ndarray] | None = None, *,
              distinct: bool = False) -> Ranks:
        """Per-rank quantities; ``offsets``: each chunk's first position in its sample (split
        samples, see :class:`sim.workload.Ranks`); ``distinct``: the lookup sends each distinct
        id once (the pipelined one: the module docstring)."""
        tokens = np.array([float(np.sum(x)) for x in lengths])
        send = self._send(tokens)
        if distinct:  # the targets repeat the items, but for each sample's (or chunk's) last
            pieces = np.array([float(np.count_nonzero(x)) for x in lengths])
            send = send - tokens + pieces
        return Ranks(lengths=tuple(np.asarray(x) for x in lengths), send=send, recv=np.full_like(send, send.mean()),
                     offsets=None if offsets is None else tuple(np.asarray(p) for p in offsets))

    @property
    def kv_bytes(self) -> float:
        """Keys and values of one token in one layer, fp32 (what a split sends per token)."""
        return 4.0 * self.scale.heads * (self.scale.qk_dim + self.scale.v_dim)

    def compute_seconds(self, ranks: Ranks, topo: Topology, attention: str = "jagged") -> np.ndarray:
        """Per-rank forward + backward compute seconds (no communication)."""
        total = np.zeros(len(ranks.lengths))
        for prog in self.programs["program"].values():
            for op in prog.ops(ranks, topo, attention=attention):
                if isinstance(op, Compute):
                    total += op.seconds
        return total

    def sample_cost(self, topo: Topology, attention: str = "jagged"):
        """Lengths -> the seconds one sample adds to a rank's compute (for the balancer)."""

        def cost(lengths: np.ndarray) -> np.ndarray:
            lengths = np.asarray(lengths, dtype=np.int64)
            uniq, inverse = np.unique(lengths, return_inverse=True)
            with_one = self.ranks([np.array([v]) for v in uniq])
            empty = self.ranks([np.array([0])])
            recv = np.full(len(uniq), with_one.send.mean())
            with_one = Ranks(lengths=with_one.lengths, send=with_one.send, recv=recv)
            empty = Ranks(lengths=empty.lengths, send=empty.send, recv=recv[:1])
            marginal = self.compute_seconds(with_one, topo, attention) - self.compute_seconds(empty, topo, attention)[0]
            return np.maximum(marginal, 0.0)[inverse]

        return cost

    def ops(self, ranks: Ranks, topo: Topology, *, overlap: bool, sm_free: bool, attention: str = "jagged",
            optimizer: bool = True, exchange: Sequence[Exchange] = (), pipelined: bool = False,
            refetch: float | None = None, prefetch_wait: str = "forward", kv_group: str = "own") -> list[Op]:
        """The whole step's ops (see the module docstring). ``exchange``: one layer's key/value
        exchanges for split samples (:func:`sim.split.exchanges`); none without splits. ``pipelined``: the
        ``fsc.TrainPipeline`` step (needs ``overlap``: it is the scheduled program);
        ``refetch``: the share of rows fetched again (None: :func:`refetch_fraction` of these
        ranks' lookups); ``prefetch_wait``: where the next batch's exchange is waited on."""
        if pipelined and not overlap:
            raise ValueError("the pipelined step is the freescale-scheduled program: pipelined needs overlap")
        if prefetch_wait not in PREFETCH_WAITS:
            raise ValueError(f"prefetch_wait must be one of {', '.join(PREFETCH_WAITS)}, got {prefetch_wait!r}")
        if refetch is not None and not 0.0 <= refetch <= 1.0:
            raise ValueError(f"refetch must be a fraction in [0, 1], got {refetch!r}")
        dev = topo.device
        if pipelined and "pipelined" not in self.programs:
            raise ValueError("this step was captured without the pipelined step's graphs (HSTUStep.capture has them)")
        progs = self.programs["pipelined" if pipelined else "freescale" if overlap else "program"]
        tiny = topo.all_reduce_seconds(8.0)
        ops: list[Op] = [] if pipelined else [Issue(name="tokens_allreduce", group="world", seconds=tiny),
                                              Wait(name="tokens_allreduce.wait", collective="tokens_allreduce")]
        if kv_group not in KV_GROUPS:
            raise ValueError(f"kv_group must be one of {', '.join(KV_GROUPS)}, got {kv_group!r}")
        graphs: dict[str, list[Op]] = {}
        for kind in ("forward", "backward"):
            graph = progs[kind].ops(ranks, topo, attention=attention, blocking=not overlap, sm_free=sm_free,
                                    prefix=f"{kind}.")
            step_group = next((op.group for op in graph if isinstance(op, Issue)), "world")
            graphs[kind] = with_exchange(graph, layers=self.scale.layers, exchange=exchange, blocking=not overlap,
                                         sm_free=sm_free, prefix=f"{kind}.",
                                         group="kv" if kv_group == "own" else step_group)
        dense = self.scale.dense_parameters()
        after: list[Op] = []
        if not pipelined:
            ops += graphs["forward"] + graphs["backward"]
            bucket = self.scale.bucket_mb * 2**20
            total = 4.0 * dense
            buckets = max(1, math.ceil(total / bucket))
            for i in range(buckets):
                size = min(bucket, total - i * bucket)
                ops.append(Issue(name=f"grad_allreduce.{i}", group="world", seconds=topo.all_reduce_seconds(size)))
            ops += [Wait(name=f"grad_allreduce.{i}.wait", collective=f"grad_allreduce.{i}") for i in range(buckets)]
        else:
            fraction = refetch_fraction(float(np.sum(ranks.send)), self.scale.num_items) if refetch is None \
                else refetch
            forward, ahead = self._pipelined_forward(graphs["forward"], progs["forward"], ranks, topo,
                                                      fraction=fraction, sm_free=sm_free)
            ops += forward
            waits = [Wait(name=f"{op.name}.wait", collective=op.name) for op in ahead]
            if prefetch_wait == "forward":
                ops += waits
            else:
                after = waits
            ops += graphs["backward"]  # its buckets' all-reduces where the freescale passes put them
        if optimizer:
            shard = math.ceil((self.scale.num_items + 1) / topo.ranks) * self.scale.dim
            ops.append(Compute(name="adam", seconds=28.0 * (dense + shard) / dev.memory_bandwidth
                               + 10 * dev.op_overhead))
        ops += after
        return ops

    def _pipelined_forward(self, graph: list[Op], program: GraphProgram, ranks: Ranks, topo: Topology, *,
                           fraction: float, sm_free: bool) -> tuple[list[Op], list[Issue]]:
        """The forward graph's ops as the pipelined step runs them, and the next batch's
        exchange (issued at its start, not waited on in it)."""
        dev = topo.device
        exchange = {f"forward.{e[1]}" for e in program.entries if e[0] == "issue" and e[2] == "all_to_all_single"}
        issues = [op for op in graph if isinstance(op, Issue) and op.name in exchange]
        last = issues[-1].name if issues else None  # the rows' all-to-all: the refetch is waited where it was
        ahead = [dataclasses.replace(op, name="next." + op.name) for op in issues]
        row = 4.0 * self.scale.dim
        sent, received = fraction * ranks.recv * row, fraction * ranks.send * row
        group = issues[0].group if issues else "world"
        refetch = Issue(name="refetch", group=group, seconds=topo.all_to_all_seconds(sent, received),
                        sm_based=not sm_free)
        out: list[Op] = [Compute(name="refetch.gather", seconds=2.0 * sent / dev.memory_bandwidth + dev.op_overhead),
                         refetch, *ahead]
        rest: list[Op] = []
        for op in graph:
            if isinstance(op, Issue) and op.name in exchange:
                continue
            if isinstance(op, Wait) and op.collective in exchange:
                if op.collective == last and not any(isinstance(o, Wait) and o.collective == "refetch" for o in rest):
                    rest += [Wait(name="refetch.wait", collective="refetch"),
                             Compute(name="refetch.scatter",
                                     seconds=2.0 * received / dev.memory_bandwidth + dev.op_overhead)]
                continue
            rest.append(op)
        if last is None:
            rest = [Wait(name="refetch.wait", collective="refetch"), *rest]
        return out + rest, ahead
