"""Validation: simulate the real CPU runs of ``examples/hstu/train.py`` and compare with
the bubble meter's measurements of the same runs.

``python -m sim calibrate --ranks 2 4`` measures gloo's all-to-all and all-reduce on this
host (``world`` processes on 127.0.0.1, at several sizes) and fits ``latency + bytes /
bandwidth`` per kind, the way calibration measures links (the slowest rank's time per
sample, median over samples: :func:`fsc.analysis.calibration.time_collectives`; the fit:
:func:`fsc.analysis.calibration.fit_link`); the fit is saved
(``results/sim-gloo-links.json``) and used as the simulated links. ``python -m sim
validate --ranks 2 --measured DIR/bubbles.json`` then rebuilds the run's exact batches
(the example's synthetic data and ``global_batch_users`` with the run's seed), captures
the example's graphs at the run's model size on a fake group of the run's world, schedules
them with the freescale pipeline (the run's backend), costs them on the ``cpu`` profile
with per-sequence attention (``jagged``: what the example's default padded and jagged
forms compute, and what the freescale backend makes of the dense form; ``--attention
dense`` for eager or inductor runs of ``train.py --attention dense``), stretches compute
by ranks / cores when the ranks time-share fewer cores than there are ranks (one thread
each), simulates every metered step and compares the medians.

``--pipelined`` simulates the runs as ``fsc.TrainPipeline`` trains them (:mod:`sim.hstu`'s
pipelined step: the refetch, the next batch's exchange inside the forward, the gradient
buckets inside the backward), for bubbles files of pipelined runs; ``--refetch-fraction``
gives the share of rows the runs fetched again (default: the uniform-ids estimate,
:func:`sim.hstu.refetch_fraction`, a lower bound for real item popularity). In a pipelined
run the gradient buckets are waited on inside the compiled backward, and the meter counts
such a wait as exposed communication even while the rank waits for a slower peer (it splits
idle from transfer only for ``sync_wait``), so each row also compares exposed + idle
(``wait_ms``), which does not depend on that split.

What the simulation leaves out: host Python (the meter's ``unattributed_ms``: collate, the
optimizer's Python, the step's glue); per-op costs of the CPU's real kernels beyond the
roofline; gloo's threads competing with compute for the cores (contention 1.0 here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

from bench.report import write_json
from fsc.analysis.calibration import all_to_all_bytes_sent, fit_link

SIZES = (1024, 16 * 1024, 256 * 1024, 2 * 2**20, 8 * 2**20)


def _measure(rank: int, world: int, init: str, out: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from fsc.analysis.calibration import time_collectives

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = []
    for nbytes in SIZES:
        x = torch.randn(max(nbytes // 4 // world, 1) * world)
        y = torch.empty_like(x)
        times = time_collectives({"all_to_all_s": lambda x=x, y=y: dist.all_to_all_single(y, x),
                                  "all_reduce_s": lambda x=x: dist.all_reduce(x)}, samples=repeats)
        rows.append({"bytes": x.numel() * 4, **times})
    if rank == 0:
        pathlib.Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def calibrate_links(world: int, repeats: int = 7) -> dict[str, Any]:
    """Measure and fit this host's gloo links for ``world`` ranks (spawns the processes)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "links.json")
        mp.start_processes(_measure, args=(world, f"file://{tmp}/store", out, repeats), nprocs=world,
                           start_method="spawn")
        rows = json.loads(pathlib.Path(out).read_text())
    # all-to-all: the bytes a rank sends the others; all-reduce: the tensor's bytes
    a2a = fit_link([(all_to_all_bytes_sent(r["bytes"], world), r["all_to_all_s"]) for r in rows])
    ar = fit_link([(r["bytes"], r["all_reduce_s"]) for r in rows])
    return {"world": world, "points": rows, "all_to_all": a2a, "all_reduce": ar, "loadavg": os.getloadavg()}


def run_lengths(world: int, steps: list[int], *, batch_size: int, seed: int, max_len: int, users: int = 2000,
                items: int = 5000, lengths: str = "lognormal") -> dict[int, list[np.ndarray]]:
    """Per metered step, each rank's sample token counts in the real run (train.py's data path)."""
    from examples.hstu.data import leave_one_out, synthetic_histories
    from examples.hstu.model import global_batch_users

    hist = synthetic_histories(num_users=users, num_items=items, seed=seed, lengths=lengths)
    train_h, _ = leave_one_out(hist)
    per = batch_size // world
    out = {}
    for step in steps:
        chosen = global_batch_users(len(train_h), batch_size, seed, step)
        out[step] = [np.array([max(min(len(train_h.items[u]), max_len + 1) - 1, 0)
                               for u in chosen[r * per:(r + 1) * per]], dtype=np.int64) for r in range(world)]
    return out


def validate(world: int, measured: str, links_file: str, *, batch_size: int, seed: int, dim: int, layers: int,
             heads: int, max_len: int, negatives: int, attention: str = "jagged",
             host_cores: int | None = None, pipelined: bool = False, refetch: float | None = None) -> dict[str, Any]:
    """One row of the comparison. ``attention``: what the run computed -- ``jagged`` for
    per-sequence attention (the example's padded and jagged forms; the dense form under
    ``--backend freescale``, whose default pipeline lowers it), ``dense`` for eager or
    inductor runs of the dense form. ``negatives``: per sample, as ``train.py --negatives``.
    ``host_cores``: the cores the run's ranks shared (default: this
    machine's); with more ranks than cores each rank's compute stretches by ranks / cores.
    ``pipelined``: the runs trained with ``fsc.TrainPipeline``; ``refetch``: the share of
    rows they fetched again (None: :func:`sim.hstu.refetch_fraction`'s estimate)."""
    from fsc.runtime.bubble_trace import load_steps, summarize
    from sim.engine import Compute, simulate
    from sim.hstu import HSTUScale, HSTUStep, refetch_fraction
    from sim.topology import LinkModel, Topology

    real = load_steps(measured)
    if not real:
        raise ValueError(f"--measured {measured}: no metered steps")
    if max(s.rank for s in real) + 1 != world:
        raise ValueError(f"--measured {measured} has {max(s.rank for s in real) + 1} ranks, not --ranks {world}")
    fits = json.loads(pathlib.Path(links_file).read_text())
    fit = next((f for f in fits if f["world"] == world), None)
    if fit is None:
        raise ValueError(f"{links_file} has no link fit for {world} ranks; run python -m sim calibrate --ranks {world}")
    links = LinkModel(all_to_all=tuple(fit["all_to_all"]), all_reduce=tuple(fit["all_reduce"]))
    topo = Topology.of(world, "cpu", links=links)
    # train.py leaves HSTUConfig's qk_dim and v_dim at their defaults (32)
    scale = HSTUScale(dim=dim, heads=heads, qk_dim=32, v_dim=32, layers=layers, max_len=max_len,
                      negatives=negatives * (batch_size // world), batch_per_rank=batch_size // world,
                      num_items=5000)
    step = HSTUStep.capture(scale, plan_profile="cpu", world=world)
    steps = sorted({s.step for s in real})
    per_step = run_lengths(world, steps, batch_size=batch_size, seed=seed, max_len=max_len)
    if host_cores is not None and host_cores < 1:
        raise ValueError(f"host_cores must be a positive number of cores, got {host_cores}")
    cores = host_cores or len(os.sched_getaffinity(0))
    stretch = max(1.0, world / cores)  # one thread per rank: ranks time-share the host's cores
    sim, fractions = [], []
    for s in steps:
        ranks = step.ranks(per_step[s], distinct=pipelined)
        fractions.append(refetch if refetch is not None else refetch_fraction(float(ranks.send.sum()), scale.num_items))
        ops = step.ops(ranks, topo, overlap=True, sm_free=False, attention=attention, pipelined=pipelined,
                       refetch=fractions[-1])
        if stretch > 1.0:
            ops = [dataclasses.replace(op, seconds=op.seconds * stretch) if isinstance(op, Compute) else op
                   for op in ops]
        sim += simulate(ops, world, contention=1.0, record=False).bubbles(step=s)
    got, want = summarize(sim), summarize(real)
    row: dict[str, Any] = {"ranks": world, "steps": steps, "model": scale.describe(), "attention": attention,
                           "host_cores": cores, "compute_stretch": stretch, "pipelined": pipelined,
                           "refetch_fraction": float(np.mean(fractions)) if pipelined else None}
    for key in ("step_ms", "compute_ms", "exposed_comm_ms", "idle_ms", "unattributed_ms", "bubble_fraction"):
        row[f"measured_{key}"], row[f"simulated_{key}"] = want[key], got[key]
    for key in ("step_ms", "bubble_fraction"):
        m, p = want[key], got[key]
        row[f"{key}_error"] = (p - m) / m if m else None
        row[f"{key}_within_25pct"] = bool(m) and abs(p - m) <= 0.25 * abs(m)
    # waiting, however the meter splits it between exposed communication and idle
    m, p = want["exposed_comm_ms"] + want["idle_ms"], got["exposed_comm_ms"] + got["idle_ms"]
    row["measured_wait_ms"], row["simulated_wait_ms"] = m, p
    row["wait_ms_error"] = (p - m) / m if m else None
    # the same comparison without host time, which the simulation does not model
    no_host = want["step_ms"] - want["unattributed_ms"]
    row["measured_step_ms_without_host"] = no_host
    row["step_ms_without_host_error"] = (got["step_ms"] - no_host) / no_host if no_host else None
    row["loadavg"] = os.getloadavg()
    return row


def cmd_calibrate(args: argparse.Namespace) -> int:
    fits = [calibrate_links(w, args.repeats) for w in args.ranks]
    for f in fits:
        print(f"{f['world']} ranks: all-to-all {f['all_to_all'][0] * 1e6:.0f} us + bytes / "
              f"{f['all_to_all'][1] / 1e9:.3f} GB/s; all-reduce {f['all_reduce'][0] * 1e6:.0f} us + bytes / "
              f"{f['all_reduce'][1] / 1e9:.3f} GB/s")
    write_json(args.json, fits)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    rows = []
    for world, measured in zip(args.ranks, args.measured):
        rows.append(validate(world, measured, args.links, batch_size=args.batch_size, seed=args.seed, dim=args.dim,
                             layers=args.layers, heads=args.heads, max_len=args.max_len, negatives=args.negatives,
                             attention=args.attention, host_cores=args.host_cores, pipelined=args.pipelined,
                             refetch=args.refetch_fraction))
        r = rows[-1]
        print(f"{world} ranks: step {r['measured_step_ms']:.1f} ms measured, {r['simulated_step_ms']:.1f} simulated "
              f"({100 * r['step_ms_error']:+.0f}%); bubble fraction {r['measured_bubble_fraction']:.3f} measured, "
              f"{r['simulated_bubble_fraction']:.3f} simulated ({100 * r['bubble_fraction_error']:+.0f}%)")
    write_json(args.json, rows)
    if args.readme:
        from bench.report import markdown_table, replace_section

        lines = ["Simulated vs measured (bubble meter) for real CPU runs of `examples/hstu/train.py --backend "
                 "freescale --bubbles DIR` (gloo links calibrated with `python -m sim calibrate`; `python -m "
                 "sim validate --ranks ... --measured ...`; `results/sim-validation.json`):", ""]
        lines += markdown_table(
            ["ranks", "step ms measured", "simulated", "error", "bubble fraction measured", "simulated", "error"],
            [[str(r["ranks"]), f"{r['measured_step_ms']:.1f}", f"{r['simulated_step_ms']:.1f}",
              f"{100 * r['step_ms_error']:+.0f}%", f"{r['measured_bubble_fraction']:.3f}",
              f"{r['simulated_bubble_fraction']:.3f}", f"{100 * r['bubble_fraction_error']:+.0f}%"] for r in rows],
            numeric=7)
        replace_section(args.readme, "sim-validation", "\n".join(lines))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="measure gloo all-to-all / all-reduce on this host, fit, save")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default="results/sim-gloo-links.json")
    p.set_defaults(fn=cmd_calibrate)
    p = sub.add_parser("validate", help="simulate real train.py runs and compare with their bubbles.json")
    p.add_argument("--ranks", type=int, nargs="+", required=True)
    p.add_argument("--measured", nargs="+", required=True, help="bubbles.json of each run, in --ranks order")
    p.add_argument("--links", default="results/sim-gloo-links.json")
    p.add_argument("--readme", default=None, help="rewrite this README's <!-- bench:sim-validation --> section")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--negatives", type=int, default=16, help="negatives per sample, as train.py's --negatives")
    p.add_argument("--attention", choices=("jagged", "dense"), default="jagged",
                   help="what the runs computed: jagged for per-sequence attention (train.py's default padded or "
                        "jagged form, or the dense form lowered by --backend freescale), dense otherwise")
    p.add_argument("--host-cores", type=int, default=None,
                   help="cores the runs' ranks shared (default: this machine's)")
    p.add_argument("--pipelined", action="store_true",
                   help="the runs trained with fsc.TrainPipeline: simulate the pipelined step (sim.hstu)")
    p.add_argument("--refetch-fraction", type=float, default=None, metavar="F",
                   help="with --pipelined: share of a batch's rows the runs fetched again (default: the estimate "
                        "for item ids uniform over the table, a lower bound)")
    p.add_argument("--json", default="results/sim-validation.json")
    p.set_defaults(fn=cmd_validate)
