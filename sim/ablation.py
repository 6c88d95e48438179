"""The paper's ablation, simulated: bubble fraction of the HSTU step at R ranks for
``baseline``, ``lb``, ``overlap``, ``sm-free`` and ``all`` (and the split and unpipelined
``-sync`` rows; see :mod:`sim.hstu`: ``overlap``, ``all`` and ``all-split`` run the
pipelined step, ``fsc.TrainPipeline``'s), and its sensitivity to the assumptions (SM
contention factor, NVLink and IB bandwidth, length distribution).

Each configuration runs ``steps`` steps; step s draws a global batch of
``R * batch_per_rank`` lengths with ``numpy.random.default_rng([seed, s])`` (the same
batch for every configuration), assigns it to ranks (seeded random, or the balancer), and
simulates it. The row's ``bubble_fraction`` is :func:`fsc.runtime.bubble_trace.summarize`'s:
per rank the median over steps, then the mean over ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from fsc.runtime.balancer import Balancer, QuadraticCost
from fsc.runtime.bubble_trace import StepBubbles, summarize
from sim.engine import StepResult, simulate
from sim.hstu import CONFIGS, HSTUStep, refetch_fraction
from sim.lengths import LengthDistribution
from sim.split import Shares, exchanges
from sim.topology import Topology

log = logging.getLogger(__name__)

DEFAULT_CONTENTION = 1.35
"""Compute slowdown under an overlapping NCCL kernel: DESIGN.md's 30-40% for matmuls."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Setting:
    ranks: int = 256
    device: str = "h100"
    contention: float = DEFAULT_CONTENTION
    steps: int = 4
    seed: int = 0
    attention: str = "jagged"
    overrides: tuple[tuple[str, float], ...] = ()
    """DeviceProfile fields replaced (bandwidths)."""
    refetch: float | None = None
    """Pipelined steps: the share of rows fetched again (None: estimated from the batch,
    :func:`sim.hstu.refetch_fraction`)."""
    prefetch_wait: str = "forward"
    kv_group: str = "own"
    """Split samples: the key/value exchanges' process group (:data:`sim.hstu.KV_GROUPS`)."""
    """Pipelined steps: where the next batch's exchange is waited on (:data:`sim.hstu.PREFETCH_WAITS`)."""

    def topology(self) -> Topology:
        return Topology.of(self.ranks, self.device, **dict(self.overrides))


def assign(lengths: np.ndarray, ranks: int, *, balance: bool, cost, seed: int) -> list[np.ndarray]:
    balancer = Balancer(ranks=ranks, method="freescale" if balance else "random", cost=cost, seed=seed)
    assignment = balancer.assign_lengths(lengths)
    return [lengths[assignment.samples_of(r)] for r in range(ranks)]


def quadratic_fit(cost, max_len: int) -> QuadraticCost:
    """``a * L**2 + b * L`` fitted (least squares, relative error, on 64 lengths up to
    ``max_len``) to the step model's per-sample seconds, for the split balancer, which needs
    the polynomial to cost chunks. The model's seconds are a roofline per node (a max of
    compute and memory time, plus overhead), so the fit is close, not exact."""
    grid = np.unique(np.rint(np.geomspace(1, max(max_len, 1), 64))).astype(np.int64)
    y = np.asarray(cost(grid), dtype=np.float64)
    x = grid.astype(np.float64)
    weight = 1.0 / np.maximum(y, np.finfo(np.float64).tiny)
    (a, b), *_ = np.linalg.lstsq(np.stack([x * x, x], axis=1) * weight[:, None], y * weight, rcond=None)
    return QuadraticCost(a=max(float(a), 0.0), b=max(float(b), 0.0))


def split_shares(lengths: np.ndarray, ranks: int, *, cost: QuadraticCost) -> Shares:
    """Balance with splits (free counts) and describe each rank's chunks and transfers."""
    assignment = Balancer(ranks=ranks, counts="free", cost=cost, split=True).assign_lengths(lengths)
    return Shares.from_assignment(assignment)


def run_config(step: HSTUStep, setting: Setting, lengths: LengthDistribution, config: str,
               *, record: bool = False, stats: list[dict[str, Any]] | None = None
               ) -> tuple[list[StepBubbles], list[StepResult]]:
    """``stats``, if given, receives per step the split samples, the key/value tokens sent per
    layer and direction, one layer's exchange time and whether it leaves a node, and the
    share of rows a pipelined step fetches again (0 unpipelined)."""
    if config not in CONFIGS:
        raise ValueError(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")
    flags = CONFIGS[config]
    topo = setting.topology()
    cost = step.sample_cost(topo, setting.attention)
    fit = quadratic_fit(cost, step.scale.max_len) if flags["split"] else None
    bubbles, results = [], []
    for s in range(setting.steps):
        rng = np.random.default_rng([setting.seed, s])
        batch = lengths.draw(setting.ranks * step.scale.batch_per_rank, rng, step.scale.max_len)
        if flags["split"]:
            shares = split_shares(batch, setting.ranks, cost=fit)
        else:
            shares = Shares.whole(assign(batch, setting.ranks, balance=flags["balance"], cost=cost,
                                         seed=setting.seed + s))
        exchange = exchanges(shares, topo, step.kv_bytes)
        ranks = step.ranks(shares.lengths, shares.offsets, distinct=flags["pipelined"])
        refetch = (setting.refetch if setting.refetch is not None
                   else refetch_fraction(float(ranks.send.sum()), step.scale.num_items))
        ops = step.ops(ranks, topo, overlap=flags["overlap"], sm_free=flags["sm_free"], attention=setting.attention,
                       exchange=exchange, pipelined=flags["pipelined"], refetch=refetch,
                       prefetch_wait=setting.prefetch_wait, kv_group=setting.kv_group)
        result = simulate(ops, setting.ranks, contention=setting.contention, record=record)
        if stats is not None:
            stats.append({"split_samples": shares.split_samples, "kv_tokens": shares.kv_tokens,
                          "kv_exchange_ms": max((e.seconds for e in exchange), default=0.0) * 1e3,
                          "kv_leaves_node": any(e.crosses for e in exchange),
                          "kv_members": sum(len(e.members) for e in exchange),
                          "refetch_fraction": refetch if flags["pipelined"] else 0.0})
        bubbles += result.bubbles(step=s)
        results.append(result)
    return bubbles, results


def ablation(step: HSTUStep, setting: Setting, lengths: LengthDistribution,
             configs: tuple[str, ...] = tuple(CONFIGS)) -> tuple[list[dict[str, Any]], dict[str, list[StepBubbles]],
                                                                 dict[str, list[StepResult]]]:
    rows, all_bubbles, all_results = [], {}, {}
    for config in configs:
        started = time.perf_counter()
        stats: list[dict[str, Any]] = []
        bubbles, results = run_config(step, setting, lengths, config, record=config in ("baseline", "all"),
                                      stats=stats)
        summary = summarize(bubbles)
        all_bubbles[config], all_results[config] = bubbles, results
        contention = float(np.mean([r.contention_s.mean() for r in results])) * 1e3
        rows.append({"config": config, "pipelined": CONFIGS[config]["pipelined"], "ranks": setting.ranks,
                     "bubble_fraction": summary["bubble_fraction"],
                     "step_ms": summary["step_ms"], "compute_ms": summary["compute_ms"],
                     "exposed_comm_ms": summary["exposed_comm_ms"], "idle_ms": summary["idle_ms"],
                     "contention_ms": contention,
                     # per step, mean over steps: samples split, and the keys/values they move in
                     # all layers, forward and backward (GB)
                     "split_samples": float(np.mean([x["split_samples"] for x in stats])),
                     "kv_gb": float(np.mean([x["kv_tokens"] for x in stats])) * step.kv_bytes
                     * step.scale.layers * 2 / 1e9,
                     "kv_exchange_ms": float(np.mean([x["kv_exchange_ms"] for x in stats])),
                     "refetch_fraction": float(np.mean([x["refetch_fraction"] for x in stats])),
                     "sim_seconds": time.perf_counter() - started,
                     "loadavg": os.getloadavg()[0]})
    base = next((r["bubble_fraction"] for r in rows if r["config"] == "baseline"), None)
    for r in rows:
        r["reduction_vs_baseline"] = (1.0 - r["bubble_fraction"] / base) if base else None
    return rows, all_bubbles, all_results


SWEEPS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "contention": [(f"{f:g}", {"contention": f}) for f in (1.0, 1.15, 1.35, 1.6)],
    "nvlink_GBps": [(f"{b:g}", {"overrides": (("intra_node_bandwidth", b * 1e9),)}) for b in (150, 450, 900)],
    "ib_GBps": [(f"{b:g}", {"overrides": (("inter_node_bandwidth", b * 1e9),)}) for b in (12.5, 25, 50, 100)],
}
LENGTH_SWEEP = ("lognormal:300:1.0", "lognormal:300:0.5", "lognormal:300:1.5", "zipf:32:1.5", "zipf:64:2.0")


def sensitivity(step: HSTUStep, setting: Setting, lengths: LengthDistribution,
                files: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """baseline and all (and their reduction) under each swept assumption, others at default."""
    out = []
    cases: list[tuple[str, str, Setting, LengthDistribution]] = []
    for name, values in SWEEPS.items():
        for label, change in values:
            cases.append((name, label, dataclasses.replace(setting, **change), lengths))
    for text in (*LENGTH_SWEEP, *(f"file:{f}" for f in files)):
        cases.append(("lengths", text, setting, LengthDistribution.parse(text)))
    for name, label, s, dist in cases:
        rows, _, _ = ablation(step, s, dist, ("baseline", "all"))
        by = {r["config"]: r for r in rows}
        out.append({"parameter": name, "value": label, "ranks": s.ranks,
                    "baseline_bubble_fraction": by["baseline"]["bubble_fraction"],
                    "all_bubble_fraction": by["all"]["bubble_fraction"],
                    "reduction_vs_baseline": by["all"]["reduction_vs_baseline"]})
    return out
