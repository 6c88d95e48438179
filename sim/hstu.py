"""The HSTU example's training step as the simulator runs it.

One step, on every rank, in the order ``examples/hstu/train.py`` runs it: a tiny all-reduce
of the global token count (the first synchronisation), the compiled forward and backward
graphs (the embedding exchanges inside them), the dense gradients' bucketed all-reduce
(``GradientBuckets``: under ``torch.compile`` the whole backward is one node, so every
bucket is issued when the backward ends and waited on before the optimizer), Adam over the
dense parameters and the rank's item-table shard (memory-bound: 28 bytes per fp32
parameter), and a tiny all-reduce of the loss.

Configurations (the paper's ablation):

``baseline``  random assignment of the global batch (``Balancer(method="random")``), the
              captured graphs in program order, every collective waited on right after issue;
``lb``        + the balancer (``Balancer(method="freescale")``) on the per-sample cost this
              same step model gives a sample of length L;
``overlap``   + the freescale pipeline's schedule (prioritize, split, overlap) and its waits;
``sm-free``   + all-to-alls as copy-engine transfers (no SM contention);
``all``       the three together;
``lb-split``  ``lb`` with ``Balancer(split=True)``: samples heavier than a rank's share are
              cut into chunks on several ranks, with their key/value exchange per layer
              (:mod:`sim.split`);
``all-split`` ``all`` with the same splits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np
import sympy

from fsc.analysis.cost_model import DeviceProfile
from sim.engine import Compute, Issue, Op, Wait
from sim.split import with_exchange
from sim.topology import Topology, profile
from sim.workload import GraphProgram, Ranks, T, programs_from_graphs

log = logging.getLogger(__name__)

CONFIGS: dict[str, dict[str, bool]] = {
    "baseline": {"balance": False, "overlap": False, "sm_free": False, "split": False},
    "lb": {"balance": True, "overlap": False, "sm_free": False, "split": False},
    "overlap": {"balance": False, "overlap": True, "sm_free": False, "split": False},
    "sm-free": {"balance": False, "overlap": False, "sm_free": True, "split": False},
    "all": {"balance": True, "overlap": True, "sm_free": True, "split": False},
    "lb-split": {"balance": True, "overlap": False, "sm_free": False, "split": True},
    "all-split": {"balance": True, "overlap": True, "sm_free": True, "split": True},
}


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


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class HSTUStep:
    scale: HSTUScale
    programs: dict[str, dict[str, GraphProgram]]
    """``{"program": {...}, "freescale": {...}}``: forward/backward in each order."""
    send_rows: sympy.Expr
    world: int
    planned_on: str
    passes: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def capture(cls, scale: HSTUScale = HSTUScale(), *, plan_profile: str | DeviceProfile = "h100",
                world: int = 8) -> HSTUStep:
        """Compile the example at ``scale`` on a fake group of ``world`` ranks and schedule
        it with the freescale pipeline planned on ``plan_profile`` (about a minute)."""
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
        with fake_world(world):
            captured = capture_hstu_graphs(spec)
            scheduled = {}
            for kind, gm in captured.items():
                copy = clone_graph_module(gm)
                ctx = PassContext(graph_kind=kind, cost_model=CostModel(dev), memory_budget_bytes=None)
                records = PassManager(default_pipeline()).run(copy, ctx)
                passes[kind] = [f"{r.name}: {r.stats} {list(r.reasons)}" for r in records]
                scheduled[kind] = copy
        program, send = programs_from_graphs(captured, world, dev)
        freescale, _ = programs_from_graphs(scheduled, world, dev)
        return cls(scale=scale, programs={"program": program, "freescale": freescale}, send_rows=send, world=world,
                   planned_on=dev.name, passes=passes)

    def _send(self, tokens: np.ndarray) -> np.ndarray:
        fn = sympy.lambdify(T, self.send_rows, "numpy")
        return np.broadcast_to(np.asarray(fn(tokens), dtype=np.float64), tokens.shape).copy()

    def ranks(self, lengths: Sequence[np.ndarray], offsets: Sequence[np.ndarray] | None = None) -> Ranks:
        """Per-rank quantities; ``offsets``: each chunk's first position in its sample (split
        samples, see :class:`sim.workload.Ranks`)."""
        tokens = np.array([float(np.sum(x)) for x in lengths])
        send = self._send(tokens)
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
            optimizer: bool = True, exchange: tuple[float, bool] = (0.0, False)) -> list[Op]:
        """The whole step's ops (see the module docstring). ``exchange``: one layer's key/value
        exchange time for split samples and whether it leaves a node
        (:func:`sim.split.exchange_seconds`); 0 without splits."""
        dev = topo.device
        progs = self.programs["freescale" if overlap else "program"]
        tiny = topo.all_reduce_seconds(8.0)
        ops: list[Op] = [Issue(name="tokens_allreduce", group="world", seconds=tiny),
                         Wait(name="tokens_allreduce.wait", collective="tokens_allreduce")]
        seconds, crosses = exchange
        for kind in ("forward", "backward"):
            graph = progs[kind].ops(ranks, topo, attention=attention, blocking=not overlap, sm_free=sm_free,
                                    prefix=f"{kind}.")
            ops += with_exchange(graph, layers=self.scale.layers, seconds=seconds, blocking=not overlap,
                                 sm_based=not (sm_free and not crosses), prefix=f"{kind}.")
        dense = self.scale.dense_parameters()
        bucket = self.scale.bucket_mb * 2**20
        total = 4.0 * dense
        buckets = max(1, math.ceil(total / bucket))
        for i in range(buckets):
            size = min(bucket, total - i * bucket)
            ops.append(Issue(name=f"grad_allreduce.{i}", group="world", seconds=topo.all_reduce_seconds(size)))
        ops += [Wait(name=f"grad_allreduce.{i}.wait", collective=f"grad_allreduce.{i}") for i in range(buckets)]
        if optimizer:
            shard = math.ceil((self.scale.num_items + 1) / topo.ranks) * self.scale.dim
            ops.append(Compute(name="adam", seconds=28.0 * (dense + shard) / dev.memory_bandwidth
                               + 10 * dev.op_overhead))
        ops += [Issue(name="loss_allreduce", group="world", seconds=tiny),
                Wait(name="loss_allreduce.wait", collective="loss_allreduce")]
        return ops
