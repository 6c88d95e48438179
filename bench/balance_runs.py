"""``balance-runs``: the HSTU example trained on 2 and 4 gloo ranks with and without the
balancer, in the same run (``torchrun`` subprocesses, one thread per rank), from MovieLens
lengths by default.

Reported per run (medians over the steps after the first): step time, and per rank the
time spent in the gradient all-reduce's wait (``GradientBuckets.wait``). In this example
the sharded lookup's all-to-alls, forward and backward, are synchronization points too, so
most of a fast rank's waiting for a slow one happens there and shows in the step time,
not at the all-reduce; both are reported.

``--split`` compares whole-sample balancing with split samples instead (issue: long
histories): three runs per world size, all with the kernel attention form (the one that
takes chunks) and the quadratic cost, ``none``, ``freescale`` (whole samples) and
``freescale-split`` (``train.py --split``), with the bubble meter on, and reports per run
the median over metered steps of the slowest rank's compute time over the ranks' mean (the
straggling that balancing removes) beside the
step time and how many samples were split. Use a max length that keeps the long histories
(``--max-len 2000``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from bench.report import write_json

DEFAULT_DATA = "../shared/data/movielens-latest-small/ratings.csv"


def _train(world: int, balance: str, args: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               "--master_port", str(29400 + os.getpid() % 500 + world), "-m", "examples.hstu.train",
               "--backend", args.backend, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-len", str(args.max_len), "--balance", balance, "--quiet", "--out", out]
        if args.lengths_from:
            cmd += ["--data", args.lengths_from]
        else:
            cmd += ["--lengths", args.lengths]
        cmd += list(extra)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads((pathlib.Path(out) / "summary.json").read_text())


def run(argv: list[str], json_path: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench balance-runs")
    parser.add_argument("--lengths-from", default=DEFAULT_DATA if pathlib.Path(DEFAULT_DATA).exists() else None)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--backend", default="freescale")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--lengths", choices=("lognormal", "zipf"), default="lognormal",
                        help="synthetic lengths when --lengths-from is empty")
    parser.add_argument("--split", action="store_true", help="whole-sample balancing vs split samples (see above)")
    args = parser.parse_args(argv)
    if args.split:
        return _run_split(args, json_path)
    rows = []
    for world in args.ranks:
        for balance in ("none", "freescale"):
            s = _train(world, balance, args)
            rows.append({"ranks": world, "balance": balance, "backend": args.backend,
                         "median_step_ms": s["median_step_ms"], "allreduce_wait_ms": s["median_allreduce_wait_ms"],
                         "median_max_over_lb": s["median_max_over_lb"], "stragglers": s["stragglers"]})
            print(f"ranks {world} balance {balance:<10} step {s['median_step_ms']:8.1f} ms  all-reduce wait per rank "
                  f"{[round(w, 2) for w in s['median_allreduce_wait_ms']]} ms  max/LB {s['median_max_over_lb']}",
                  flush=True)
    for world in args.ranks:
        base, bal = (next(r for r in rows if r["ranks"] == world and r["balance"] == b) for b in ("none", "freescale"))
        print(f"ranks {world}: balanced / unbalanced step time = {bal['median_step_ms'] / base['median_step_ms']:.3f}")
    write_json(json_path, {"benchmark": "balance-runs", "data": args.lengths_from, "steps": args.steps,
                                "batch_size": args.batch_size, "max_len": args.max_len, "rows": rows})
    return 0


def _run_split(args: argparse.Namespace, json_path: str) -> int:
    rows = []
    for world in args.ranks:
        for name, balance, split in (("none", "none", ()), ("freescale", "freescale", ()),
                                     ("freescale-split", "freescale", ("--split",))):
            with tempfile.TemporaryDirectory() as bubbles:
                s = _train(world, balance, args, ("--attention", "kernel", "--balance-cost", "quadratic",
                                                   "--bubbles", bubbles, *split))
                steps = json.loads((pathlib.Path(bubbles) / "bubbles.json").read_text())["steps"]
            by_step: dict[int, list[float]] = {}
            for step in steps:
                by_step.setdefault(step["step"], []).append(step["compute_ms"])
            # per metered step: the slowest rank's compute over the ranks' mean (1.0: no straggler)
            spread = [max(c) / statistics.fmean(c) for c in by_step.values() if len(c) == world and sum(c) > 0]
            row = {"ranks": world, "config": name, "backend": args.backend, "median_step_ms": s["median_step_ms"],
                   "compute_max_over_mean": statistics.median(spread) if spread else None,
                   "compute_max_over_mean_per_step": spread,
                   "median_max_over_lb": s["median_max_over_lb"], "split_samples": s["split_samples"],
                   "bubble_fraction": s.get("bubble_fraction"), "recompiles": s["recompiles"],
                   "final_loss": s["final_loss"]}
            rows.append(row)
            print(f"ranks {world} {name:<16} step {row['median_step_ms']:8.1f} ms  compute max/mean "
                  f"{row['compute_max_over_mean']}  planned max/LB {row['median_max_over_lb']}  "
                  f"split samples {row['split_samples']}  recompiles {row['recompiles']}", flush=True)
    write_json(json_path, {"benchmark": "balance-runs --split", "data": args.lengths_from, "steps": args.steps,
                           "batch_size": args.batch_size, "max_len": args.max_len, "rows": rows})
    return 0
