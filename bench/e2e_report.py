"""What ``python -m bench e2e`` reports: per world size, the rows (one per configuration,
repeats combined), the per-technique ratios against the best fair peer with their spread
over repeats, the twin check, the markdown tables, the README section and the plot.

A ratio is a ratio of medians within one repeat (same batches, same machine load, the
configurations interleaved step by step); over repeats we report its median and its
spread (min..max). A ratio whose spread contains 1.0 is "no measurable difference".
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
from typing import Any

from bench.report import markdown_table

#: what each freescale row switches on, for the per-technique table
TECHNIQUES = {
    "fs-none": "the backend alone (empty pipeline; control)",
    "fs-lb": "balancer only",
    "fs-overlap": "scheduling passes only",
    "fs-smfree": "SM-free transport only",
    "fs-attn": "attention lowering only",
    "fs-all": "all (balancer, every pass, SM-free transport)",
    "fs-pipe": "TrainPipeline + balancer + scheduling passes + SM-free, no attention lowering",
    "fs-all-pipe": "TrainPipeline + all",
}
NO_DIFFERENCE = "no measurable difference"


def verdict(ratios: list[float]) -> str:
    """``faster``, ``slower`` or :data:`NO_DIFFERENCE` (the spread over repeats contains 1)."""
    if len(ratios) < 2:
        return "one repeat: no spread"
    lo, hi = min(ratios), max(ratios)
    if lo <= 1.0 <= hi:
        return NO_DIFFERENCE
    return "faster" if hi < 1.0 else "slower"


def _steps(ranks: list[dict[str, Any]], name: str) -> list[float]:
    """Per timed step, the slowest rank's time."""
    return [max(vals) for vals in zip(*(r["step_ms"][name] for r in ranks))]


def _compile_s(ranks: list[dict[str, Any]], name: str) -> float | None:
    """Warm-up steps' time beyond steady steps, the slowest rank's."""
    per_rank = []
    for r in ranks:
        warm, steady = r["warmup_ms"][name], r["step_ms"][name]
        if not warm or not steady:
            return None
        per_rank.append(max(sum(warm) - len(warm) * statistics.median(steady), 0.0) / 1e3)
    return max(per_rank)


def _lowering(passes: dict[str, Any] | None) -> str | None:
    """What lower-attention did in a freescale row's first compile, in words."""
    if not passes:
        return None
    for kind in passes.values():
        if not isinstance(kind, dict) or "lower-attention" not in kind.get("passes", {}):
            continue
        stats = kind["passes"]["lower-attention"]
        found, lowered = stats.get("attention_found", 0), stats.get("lowered", 0)
        if lowered:
            return f"lowered {lowered} of {found}"
        reasons = kind.get("declined", {}).get("lower-attention") or []
        why = reasons[0].split(": ", 1)[-1] if reasons else "no attention it recognises"
        return f"not lowered ({found} found): {why}"
    return "pass not run"


def world_rows(world: int, specs: list[Any], repeats: list[list[dict[str, Any]]],
               isolated: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per configuration at this world size. ``specs``: the e2e ``Row`` specs;
    ``repeats[k]``: the ranks' results of repeat k."""
    from fsc.runtime.bubble_trace import summarize

    rows = []
    for spec in specs:
        name = spec.name
        per_repeat = [_steps(ranks, name) for ranks in repeats]
        medians = [statistics.median(s) for s in per_repeat]
        median = statistics.median(medians)
        bubbles = [b for ranks in repeats for b in (ranks[0]["bubbles"] or {}).get(name, [])]
        summary = summarize(bubbles) if bubbles else {}
        alone = isolated.get(name)
        first = repeats[0]
        row = {
            "backend": name,
            "ranks": world,
            "attention": spec.attention,
            "median_step_ms": median,
            "samples_per_s": args.batch_size / (median / 1e3),
            "bubble_fraction": summary.get("bubble_fraction"),
            "exposed_comm_ms": summary.get("exposed_comm_ms"),
            "recompiles": max(r["recompiles"][name] for ranks in repeats for r in ranks),
            "peak_mem_mb": max(r["peak_rss_mb"] for r in (alone or [r for ranks in repeats for r in ranks])),
            "compile_s": _compile_s(alone or first, name),
            "peak_mem_source": ("isolated: VmHWM over the measured steps" if alone and all(
                r["peak_rss_after_warmup"] for r in alone) else "isolated: process max RSS" if alone else
                "shared run: process max RSS (all backends)"),
            "compile_s_source": "isolated, cold Inductor cache" if alone else
                                "shared run (Inductor cache shared by the backends and warmed by earlier runs)",
            "description": spec.describe(),
            "peer": spec.peer,
            "twin_of": spec.twin_of,
            "repeats": len(repeats),
            "timed_steps": sum(len(s) for s in per_repeat),
            "metered_steps": summary.get("steps", 0),
            "idle_ms": summary.get("idle_ms"),
            "compute_ms": summary.get("compute_ms"),
            "unattributed_ms": summary.get("unattributed_ms"),
            "meter_step_ms": summary.get("step_ms"),
            "graphs_compiled": max(r["graphs"][name] for r in first),
            "first_loss": first[0]["first_loss"][name],
            "final_loss": first[0]["final_loss"][name],
            "median_step_ms_per_repeat": medians,
            "step_ms": per_repeat,
        }
        passes = first[0]["passes"].get(name)
        if passes is not None:
            row["passes"] = passes
            row["attention_lowering"] = _lowering(passes)
        rows.append(row)
    _compare(rows)
    return rows


def _compare(rows: list[dict[str, Any]]) -> None:
    """Ratios to the best fair peer (the fastest peer row whose model is per sequence), per
    repeat, their median and spread; and each twin's ratio to its original."""
    by_name = {r["backend"]: r for r in rows}
    fair = [r for r in rows if r["peer"] and r["attention"] != "dense" and not r["twin_of"]]
    best = min(fair, key=lambda r: r["median_step_ms"]) if fair else None
    for row in rows:
        row["best_competitor"] = best["backend"] if best else None
        row["best_competitor_attention"] = best["attention"] if best else None
        if best is None:
            row.update(step_vs_best_competitor=None, ratio_spread=None, verdict=None,
                       median_paired_step_ratio_vs_best_competitor=None)
            continue
        ratios = [a / b for a, b in zip(row["median_step_ms_per_repeat"], best["median_step_ms_per_repeat"])]
        row["ratio_per_repeat"] = ratios
        row["step_vs_best_competitor"] = statistics.median(ratios)
        row["ratio_spread"] = [min(ratios), max(ratios)]
        row["verdict"] = verdict(ratios) if row is not best else "the reference"
        paired = [a / b for mine, theirs in zip(row["step_ms"], best["step_ms"]) for a, b in zip(mine, theirs)]
        row["median_paired_step_ratio_vs_best_competitor"] = statistics.median(paired)
    _bubble_ratios(rows, fair, best, by_name.get("eager"))
    for row in rows:
        original = by_name.get(row["twin_of"]) if row["twin_of"] else None
        if original is not None:
            ratios = [a / b for a, b in zip(row["median_step_ms_per_repeat"], original["median_step_ms_per_repeat"])]
            row["twin_ratio_per_repeat"] = ratios
            found = verdict(ratios)
            row["twin_check"] = (
                "ok: no measurable difference between the copies" if found == NO_DIFFERENCE else
                "not checked: one repeat has no spread" if len(ratios) < 2 else
                f"FAILED: the two copies differ ({min(ratios):.3f}..{max(ratios):.3f} over repeats); "
                "the harness favours one of them")


def fmt(value: Any, digits: int = 1, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}%}" if pct else f"{value:.{digits}f}"


def _ratio(row: dict[str, Any]) -> str:
    spread = row.get("ratio_spread")
    if row.get("step_vs_best_competitor") is None:
        return "-"
    if not spread or row.get("repeats", 1) < 2:
        return fmt(row["step_vs_best_competitor"], 2)
    return f"{row['step_vs_best_competitor']:.2f} ({spread[0]:.2f}-{spread[1]:.2f})"


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of one world size's rows."""
    lines = markdown_table(
        ["backend", "attention", "step ms", "samples/s", "vs best peer (spread)", "verdict", "bubble",
         "exposed comm ms", "recompiles", "peak MB", "compile s"],
        [[r["backend"], r.get("attention", "-"), fmt(r["median_step_ms"]), fmt(r["samples_per_s"]), _ratio(r),
          r.get("verdict") or "-", fmt(r["bubble_fraction"], 0, pct=True), fmt(r["exposed_comm_ms"]),
          str(r["recompiles"]), fmt(r["peak_mem_mb"], 0), fmt(r["compile_s"])] for r in rows],
        numeric=9)
    # the verdict is words, not a number: left-aligned
    lines[1] = "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    return "\n".join(lines)


def technique_table(rows: list[dict[str, Any]]) -> str:
    """The freescale rows as techniques: what each earns against the best fair peer."""
    body = []
    for r in rows:
        if r["backend"] not in TECHNIQUES:
            continue
        body.append([TECHNIQUES[r["backend"]], r["backend"], _ratio(r), r.get("verdict") or "-",
                     r.get("attention_lowering") or "-", fmt(r["exposed_comm_ms"])])
    if not body:
        return ""
    return "\n".join(markdown_table(["technique", "row", "step vs best peer (spread)", "verdict",
                                     "lower-attention", "exposed comm ms"], body, numeric=1))


def _bubble_ratios(rows: list[dict[str, Any]], fair: list[dict[str, Any]], best: dict[str, Any] | None,
                   eager: dict[str, Any] | None) -> None:
    """The bubble meter's figures against the peers': exposed communication and bubble
    fraction over the best fair peer's (the fastest) and over the lowest any fair peer has,
    and the bubble fraction's reduction against eager's (the paper's measure)."""
    def ratio(mine: float | None, theirs: float | None) -> float | None:
        return mine / theirs if mine is not None and theirs else None

    for key in ("exposed_comm_ms", "bubble_fraction"):
        lowest = min((r[key] for r in fair if r.get(key) is not None), default=None)
        for row in rows:
            row[f"{key}_vs_best_peer"] = ratio(row.get(key), best.get(key) if best else None)
            row[f"{key}_vs_lowest_peer"] = ratio(row.get(key), lowest)
    for row in rows:
        theirs = eager.get("bubble_fraction") if eager else None
        row["bubble_reduction_vs_eager"] = 1 - row["bubble_fraction"] / theirs \
            if row.get("bubble_fraction") is not None and theirs else None


def pipeline_table(rows: list[dict[str, Any]]) -> str:
    """The TrainPipeline rows against the peers (the issue's targets: exposed communication
    <= 0.25x and bubble fraction <= 0.5x the best peer's, step <= 0.85x; with every pass on,
    bubble fraction >= 90% below eager's)."""
    body = []
    for r in rows:
        if r["peer"] or r["twin_of"]:
            continue
        body.append([r["backend"], _ratio(r), fmt(r.get("exposed_comm_ms_vs_best_peer"), 2),
                     fmt(r.get("exposed_comm_ms_vs_lowest_peer"), 2), fmt(r.get("bubble_fraction_vs_best_peer"), 2),
                     fmt(r.get("bubble_fraction_vs_lowest_peer"), 2),
                     "-" if r.get("bubble_reduction_vs_eager") is None else f"{100 * r['bubble_reduction_vs_eager']:.0f}%"])
    if not body:
        return ""
    return "\n".join(markdown_table(["row", "step vs best peer (spread)", "exposed comm vs best peer",
                                     "vs lowest peer", "bubble vs best peer", "vs lowest peer",
                                     "bubble reduction vs eager"], body, numeric=1))


def headline(world: int, rows: list[dict[str, Any]]) -> str:
    by_name = {r["backend"]: r for r in rows}
    best = next((r for r in rows if r.get("verdict") == "the reference"), None)
    if best is None:
        return f"{world} ranks: no fair peer ran."
    peer = f"{best['backend']} ({best['attention']} attention, {best['median_step_ms']:.1f} ms)"
    said = [f"{name} takes {_ratio(by_name[name])}x the step time of the best fair peer, {peer}: "
            f"{by_name[name]['verdict']}" for name in ("fs-all", "fs-pipe") if name in by_name]
    if not said:
        return f"{world} ranks: best fair peer {peer}; neither fs-all nor fs-pipe ran."
    return f"{world} ranks: " + "; ".join(said) + "."


def readme_section(result: dict[str, Any]) -> str:
    """The README text between the ``bench:e2e`` markers."""
    out = ["Every configuration trains the same HSTU example source (`examples/hstu/model.py`), each peer in "
           "its fastest per-sequence attention form; the freescale rows run the same model source as the "
           "peers. " + " ".join(headline(w, rows) for w, rows in result["tables"].items())]
    for world, rows in result["tables"].items():
        out += ["", f"**What each technique earns, {world} ranks** (step time against the best fair peer; median "
                f"over {result['repeats']} repeats, spread min-max; a spread containing 1.00 is "
                f"\"{NO_DIFFERENCE}\"):", "", technique_table(rows)]
    for world, rows in result["tables"].items():
        out += ["", f"All rows, {world} ranks:", "", table(rows)]
    for world, rows in result["tables"].items():
        if any(r["backend"].endswith("-pipe") for r in rows):
            out += ["", f"The bubble meter against the peers, {world} ranks (best peer: the fastest fair peer; lowest "
                    "peer: the lowest figure any fair peer has):", "", pipeline_table(rows)]
    out += ["", "What these numbers do not show: there is no GPU here, so the Triton attention kernels, NCCL, "
            "copy-engine transfers and SM contention (what SM-free transport is for) are absent; the ranks are "
            "processes on one 2-core host talking gloo over loopback, one compute thread each (at 4 ranks two "
            "ranks share a core), so communication is cheap next to compute and the machine's other load moves "
            "every number (hence interleaved configurations, shuffled per step, and repeats)."]
    out += ["", f"Setup: HSTU example, {result['setup']}. Machine: {result['machine']}; run {result['date']}; load "
            f"average before/after: {fmt(result['load_average_before'][0], 2)} / "
            f"{fmt(result['load_average_after'][0], 2)}; {fmt(result['wall_s'] / 60, 0)} min. Step time: median over "
            "timed steps of the slowest rank; bubble and exposed communication: the bubble meter over separate "
            f"metered steps; peak MB: {result['peak_mem_note']}; compile s: {result['compile_note']}."]
    out += [f"Notes: {note}" for note in result["notes"]]
    out += ["", "Each repeat (fresh rank processes; median step ms of the best fair peer, then each row's ratio to "
            "it):"]
    for world, reps in result["repeat_figures"].items():
        for k, line in enumerate(reps):
            out.append(f"- {world} ranks, repeat {k + 1}: {line}")
    out += ["", f"Command: `{result['command']}` (raw numbers in `{result['json']}`, plot `{result['plot'] or '-'}`); "
            "each peer's attention form was chosen by `python -m bench e2e --backends "
            "eager@padded,eager@jagged,inductor@padded,inductor@jagged,...` (see `bench/e2e.py`, PEER_FORMS)."]
    return "\n".join(out)


def repeat_figures(rows: list[dict[str, Any]]) -> list[str]:
    """Per repeat, one line: the best fair peer's median step and every other row's ratio."""
    best = next((r for r in rows if r.get("verdict") == "the reference"), None)
    if best is None:
        return []
    lines = []
    for k, ms in enumerate(best["median_step_ms_per_repeat"]):
        ratios = ", ".join(f"{r['backend']} {r['ratio_per_repeat'][k]:.2f}" for r in rows
                           if r is not best and "ratio_per_repeat" in r)
        lines.append(f"{best['backend']} {ms:.1f} ms; {ratios}")
    return lines


def plot(result: dict[str, Any], path: str | pathlib.Path) -> None:
    """Step time and bubble fraction per backend, one row per world size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    worlds = list(result["tables"])
    fig = Figure(figsize=(11, 3.4 * len(worlds)))
    FigureCanvasAgg(fig)
    for i, world in enumerate(worlds):
        rows = result["tables"][world]
        names = [r["backend"] for r in rows]
        colors = ["#4c72b0" if n.startswith("fs-") else "#999999" for n in names]
        ax = fig.add_subplot(len(worlds), 2, 2 * i + 1)
        ax.bar(names, [r["median_step_ms"] for r in rows], color=colors)
        for x, r in enumerate(rows):  # the spread over repeats
            per = r["median_step_ms_per_repeat"]
            ax.plot([x, x], [min(per), max(per)], color="black", linewidth=1)
        ax.set_ylabel("median step ms")
        ax.set_title(f"{world} ranks: step time (lower is better; bars: spread over repeats)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=35, labelsize=7)
        ax = fig.add_subplot(len(worlds), 2, 2 * i + 2)
        ax.bar(names, [r["bubble_fraction"] or 0.0 for r in rows], color=colors)
        ax.set_ylabel("bubble fraction")
        ax.set_ylim(0, 1)
        ax.set_title(f"{world} ranks: bubble fraction (bubble meter)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=35, labelsize=7)
    fig.suptitle(f"fsc e2e: {result['setup']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=100)
