"""``python -m sim {ablation,sensitivity,scaling,validate,calibrate}``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

from bench.report import replace_section, write_json


def _lengths(args: argparse.Namespace):
    from sim.lengths import LengthDistribution

    if getattr(args, "lengths_from", None):
        return LengthDistribution.from_file(args.lengths_from)
    return LengthDistribution.parse(args.lengths)


def _scale(args: argparse.Namespace):
    from sim.hstu import HSTUScale

    return HSTUScale(layers=args.layers)


def _common(p: argparse.ArgumentParser, ranks: int = 256) -> None:
    p.add_argument("--ranks", type=int, default=ranks)
    p.add_argument("--device", default="h100", help="device profile: cpu, h100, h200")
    p.add_argument("--contention", type=float, default=None, help="SM contention factor (default 1.35)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--lengths", default="lognormal:300:1.0", help="lognormal[:MEDIAN[:SIGMA]], zipf[:MIN[:A]], file:PATH")
    p.add_argument("--lengths-from", default=None, metavar="RATINGS_FILE", help="users' history lengths of a ratings file")
    p.add_argument("--refetch-fraction", type=float, default=None, metavar="F",
                   help="pipelined configurations: share of a batch's rows fetched again because the previous batch "
                        "updated them (default: estimated from the batch, item ids uniform over the table: "
                        "sim.hstu.refetch_fraction)")
    p.add_argument("--prefetch-wait", choices=("forward", "step"), default="forward",
                   help="pipelined configurations: where the next batch's exchange is waited on (default forward: "
                        "the end of the forward graph, as the compiled step does; step: after the optimizer)")


def _setting(args: argparse.Namespace):
    from sim.ablation import DEFAULT_CONTENTION, Setting
    from sim.topology import Topology, TopologyError

    Topology.of(args.ranks, args.device)  # bad ranks or profile fail here, naming them
    refetch = getattr(args, "refetch_fraction", None)
    if refetch is not None and not 0.0 <= refetch <= 1.0:
        raise TopologyError(f"--refetch-fraction must be in [0, 1], got {refetch}")
    return Setting(ranks=args.ranks, device=args.device, steps=args.steps, seed=args.seed,
                   contention=DEFAULT_CONTENTION if args.contention is None else args.contention,
                   refetch=refetch, prefetch_wait=getattr(args, "prefetch_wait", "forward"))


def _table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def cmd_ablation(args: argparse.Namespace) -> int:
    from fsc.runtime.bubble_trace import plot_stacked_bars, write_chrome_trace
    from sim.ablation import ablation
    from sim.hstu import CONFIGS, HSTUStep

    setting, lengths = _setting(args), _lengths(args)
    started = time.perf_counter()
    step = HSTUStep.capture(_scale(args), plan_profile=args.device)
    capture_s = time.perf_counter() - started
    rows, bubbles, results = ablation(step, setting, lengths)
    keys = ["config", "ranks", "bubble_fraction", "reduction_vs_baseline", "step_ms", "compute_ms",
            "exposed_comm_ms", "idle_ms", "contention_ms", "split_samples", "kv_gb", "kv_exchange_ms", "pipelined",
            "refetch_fraction"]
    print(_table(rows, keys))
    if args.readme:
        command = f"python -m sim ablation --ranks {setting.ranks}"
        if args.refetch_fraction is not None:
            command += f" --refetch-fraction {args.refetch_fraction:g}"
        if args.prefetch_wait != "forward":
            command += f" --prefetch-wait {args.prefetch_wait}"
        if args.lengths_from:
            command += f" --lengths-from {args.lengths_from} --json {args.json} --png {args.png}"
        replace_section(args.readme, args.readme_section, (
            f"Simulated ({args.device} profile, {setting.ranks} ranks in nodes of 8, {step.scale.describe()}, lengths "
            f"{lengths.source}, SM contention {setting.contention}, {setting.steps} steps, seed {setting.seed}; "
            f"`{command}`; `{args.json}`, `{args.png}`; split rows: samples split per step and the keys/values they move per "
            "step, all layers, forward and backward; pipelined rows: fsc.TrainPipeline's step, refetching the "
            "given share of its rows; -sync rows: the same configuration unpipelined):\n\n"
            + _table(rows, keys[:8] + keys[9:11] + keys[12:])))
    doc = {"rows": rows, "model": step.scale.describe(), "setting": dataclasses.asdict(setting),
           "configs": {name: flags for name, flags in CONFIGS.items()},
           "lengths": lengths.source, "capture_seconds": capture_s, "passes": step.passes,
           "loadavg": os.getloadavg()}
    write_json(args.json, doc)
    if args.png:
        shown = sorted({0, setting.ranks // 2, setting.ranks - 1, *range(min(setting.ranks, 6))})
        plot_stacked_bars({c: [b for b in bubbles[c] if b.rank in shown] for c in ("baseline", "all")}, args.png)
        print(f"wrote {args.png}")
    if args.trace:
        iv = [i for c, off in (("baseline", 0.0),) for i in results[c][0].trace(0, ranks=range(min(16, setting.ranks)))]
        end = results["baseline"][0].step_s
        iv += results["all"][0].trace(1, offset_s=end, ranks=range(min(16, setting.ranks)))
        write_chrome_trace(iv, args.trace, label=f"sim baseline (step 0) then all (step 1), {setting.ranks} ranks")
        print(f"wrote {args.trace}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from sim.ablation import sensitivity
    from sim.hstu import HSTUStep

    setting, lengths = _setting(args), _lengths(args)
    step = HSTUStep.capture(_scale(args), plan_profile=args.device)
    rows = sensitivity(step, setting, lengths, tuple(args.files or ()))
    keys = ["parameter", "value", "baseline_bubble_fraction", "all_bubble_fraction", "reduction_vs_baseline"]
    print(_table(rows, keys))
    if args.readme:
        replace_section(args.readme, "sim-sensitivity", (
            f"Sensitivity of baseline vs all ({setting.ranks} ranks, one assumption changed at a time from the "
            f"ablation's; `python -m sim sensitivity --ranks {setting.ranks} --files RATINGS_FILE`; "
            "`results/sim-sensitivity.json`):\n\n" + _table(rows, keys)))
    write_json(args.json, {"rows": rows, "model": step.scale.describe(), "setting": dataclasses.asdict(setting),
                           "lengths": lengths.source, "loadavg": os.getloadavg()})
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from sim.ablation import Setting, run_config
    from sim.hstu import HSTUStep

    step = HSTUStep.capture(_scale(args), plan_profile=args.device)
    lengths = _lengths(args)
    rows = []
    for ranks in args.ranks_list:
        setting = Setting(ranks=ranks, device=args.device, steps=1, seed=args.seed)
        for config in ("baseline", "all"):
            started = time.perf_counter()
            bubbles, _ = run_config(step, setting, lengths, config)
            rows.append({"ranks": ranks, "config": config, "wall_seconds": time.perf_counter() - started,
                         "bubble_fraction": sum(b.bubble_fraction for b in bubbles) / len(bubbles),
                         "loadavg": os.getloadavg()[0]})
            print(rows[-1])
    write_json(args.json, rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ablation", help="baseline / lb / overlap / sm-free / all (and split, -sync rows) at --ranks")
    _common(p)
    p.add_argument("--json", default="results/sim-ablation.json")
    p.add_argument("--png", default="results/sim-ablation.png")
    p.add_argument("--trace", default=None, help="Chrome/Perfetto trace of ranks 0-15: baseline step, then all")
    p.add_argument("--readme", default=None, help="rewrite this README's <!-- bench:sim-ablation --> section")
    p.add_argument("--readme-section", default="sim-ablation", help="the README section's name (default sim-ablation)")
    p.set_defaults(fn=cmd_ablation)
    p = sub.add_parser("sensitivity", help="baseline vs all under each swept assumption")
    _common(p)
    p.add_argument("--files", nargs="*", help="ratings files whose lengths to sweep too")
    p.add_argument("--json", default="results/sim-sensitivity.json")
    p.add_argument("--readme", default=None, help="rewrite this README's <!-- bench:sim-sensitivity --> section")
    p.set_defaults(fn=cmd_sensitivity)
    p = sub.add_parser("scaling", help="simulator wall time from 8 to 4096 ranks")
    _common(p)
    p.add_argument("--ranks-list", type=int, nargs="+", default=[8, 64, 256, 1024, 4096])
    p.add_argument("--json", default="results/sim-scaling.json")
    p.set_defaults(fn=cmd_scaling)
    from sim import validate

    validate.add_commands(sub)
    args = parser.parse_args(argv)
    from sim.lengths import LengthsError
    from sim.topology import TopologyError

    try:
        return args.fn(args)
    except (LengthsError, TopologyError) as exc:
        parser.error(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
