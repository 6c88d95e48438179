"""The README section of ``gpu-check``, generated from its JSON (:func:`render`)."""

from __future__ import annotations

from typing import Any

from bench.report import markdown_table


def _num(value: Any, fmt: str | None = None) -> str:
    """A figure for a table: ``fmt`` if given, else 3 significant digits (1 decimal from 100)."""
    if value is None:
        return "-"
    if fmt is not None:
        return fmt.format(value)
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _status(record: dict) -> str:
    if record.get("status") == "ok":
        return f"ok ({record.get('seconds', 0):.0f} s)"
    if record.get("status") == "error":
        return f"**error**: {record.get('error', '').splitlines()[0][:160]}"
    return record.get("reason", "skipped")


def render(data: dict, json_name: str = "results/gpu.json") -> str:
    env, sections = data.get("environment", {}), data.get("sections", {})
    lines = []
    if data.get("dry_run"):
        lines.append("**DRY RUN on CPU**: stand-ins at tiny sizes to test the command; these are not GPU results.")
    machine = env.get("cpu")
    if env.get("gpu"):
        machine = (f"{env['gpu']} ({env.get('sms')} SMs, {env.get('gpu_memory_gib')} GiB), CUDA {env.get('cuda')}, "
                   f"{env.get('cpu')}")
    lines.append(f"`python -m bench gpu-check` (`make gpu-check`; raw numbers in `{json_name}`). Machine: {machine}; "
                 f"torch {env.get('torch')}, Triton {env.get('triton')}, Python {env.get('python')}; "
                 f"run {env.get('date')}, {data.get('elapsed_s', 0):.0f} s of a {data.get('budget_s', 0):.0f} s budget"
                 f"{'' if data.get('complete') else ' (INCOMPLETE: the run stopped early)'}.")
    lines.append("")
    lines.append("Sections: " + "; ".join(f"{name} {_status(rec)}" for name, rec in sections.items()) + ".")
    for name, renderer in (("peak", _peak), ("correctness", _correctness), ("speed", _speed),
                           ("backend", _backend), ("contention", _contention), ("all-to-all", _exchange)):
        record = sections.get(name)
        if record and record.get("status") == "ok":
            lines += ["", *renderer(record["result"])]
    return "\n".join(lines)


def _peak(r: dict) -> list[str]:
    text = f"**Peak**: {r['dtype']} {'x'.join(map(str, r['shape']))} matmul {_num(r['tflops'])} TFLOP/s"
    if "profile_tflops" in r:
        text += f" ({_pct(r['measured_over_profile'])} of the {r['profile']} profile's {r['profile_tflops']:.0f})"
    return [text + "."]


def _correctness(r: dict) -> list[str]:
    rows = []
    for c in r["cases"]:
        worst = max((o["max_abs_err"] / o["bound"] for o in c.get("outputs", {}).values() if o["bound"] > 0),
                    default=None)
        verdict = c.get("skipped") or c.get("error") or ("ok" if c["ok"] else "**FAILED**")
        rows.append([c["mode"], c["name"], c["dtype"], str(max(c["lengths"])), c.get("entry", "-"), verdict,
                     _num(worst, "{:.2f}")])
    return [f"**Correctness** ({r['tolerance']}): {'all within tolerance' if r['all_ok'] else 'NOT all within'}.", "",
            *markdown_table(["mode", "case", "dtype", "max L", "entry", "result", "worst err / bound"], rows)]


def _speed(r: dict) -> list[str]:
    by_key: dict[tuple, dict] = {}
    for row in r["rows"]:
        by_key.setdefault((row["mode"], row["max_len"], row["impl"]), {})[row["direction"]] = row
    rows = []
    for (mode, max_len, impl), d in by_key.items():
        fwd, both = d.get("fwd", {}), d.get("fwd+bwd", {})
        note = fwd.get("skipped") or fwd.get("error") or fwd.get("note") or ""
        rows.append([mode, str(max_len), impl, _num(fwd.get("tflops")), _pct(fwd.get("fraction_of_peak")),
                     _num(both.get("tflops")), _pct(both.get("fraction_of_peak")), note])
    first = r["rows"][0] if r["rows"] else {}
    lines = [(f"**Kernel speed** ({first.get('dtype')}, {first.get('heads')} heads, head dim {first.get('head_dim')}, "
             f"{first.get('tokens')} tokens per batch; TFLOP/s of useful work ({r['flop_count']}); % of the measured "
             f"peak {_num(r.get('peak_tflops'))} TFLOP/s):"), "",
             *markdown_table(["mode", "max L", "impl", "fwd TFLOP/s", "fwd % peak", "fwd+bwd TFLOP/s",
                              "fwd+bwd % peak", "note"], rows, numeric=0)]
    for t in r.get("targets", []):
        met = t.get("note") or {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"Target: {t['target']} at L={t['max_len']}: {_num(t['value'], '{:.2f}')} ({met}).")
    return lines


def _backend(r: dict) -> list[str]:
    lines = [(f"**Backend** (HSTU example, {r['spec']['steps']} steps, inner={r['spec']['inner']}; loss tolerance "
             "relative 1e-4 vs eager):")]
    for world in ("world_1", "world_2"):
        w = r.get(world, {})
        if "skipped" in w or "error" in w:
            lines.append(f"- {world.replace('_', ' size ')}: {w.get('skipped') or w.get('error')}")
            continue
        for rank in w.get("ranks", [w]):
            parts = [f"{name}: max rel diff {_num(b['max_rel_diff_vs_eager'], '{:.1e}')}, step "
                     f"{_num(b['median_step_ms'])} ms (first {_num(b['first_step_ms'], '{:.0f}')} ms)"
                     for name, b in rank["backends"].items()]
            code = rank["generated_code"]
            found = ", ".join(code.get("found", [])) or "none"
            kernels = code.get("skipped") or f"Triton kernels in the generated code: {found}"
            low = rank["lower_attention"]
            lowered = low.get("error") or (f"lowered {low.get('lowered')} of {low.get('attention_found')} attentions"
                                           + (f", FELL BACK: {low['fallback']}" if low.get("fallback") else ""))
            lines.append(f"- world size {rank['world']}, rank {rank['rank']}: {'; '.join(parts)}. {kernels}. "
                         f"lower-attention: {lowered}. Transport: {rank['transport']}.")
    return lines


def _contention(r: dict) -> list[str]:
    rows = [[c["case"], _num(c.get("matmul_ms"), "{:.3f}"), _pct(c.get("slowdown")) if c.get("slowdown") is not None
             else "-", str(c.get("overlapped", "-")), _num(c.get("copy_gbps_alone")),
             c.get("skipped") or c.get("error") or ""] for c in r["rows"]]
    shape = "x".join(map(str, r["matmul"])) if "matmul" in r else "-"
    target = f"; target {r['target']}" if "target" in r else ""
    return [f"**SM contention** (bf16 matmul {shape}, with copies on a second stream{target}):", "",
            *markdown_table(["case", "matmul ms", "slowdown", "copies outlasted matmuls", "copy GB/s alone", "note"],
                            rows, numeric=0)]


def _exchange(r: dict) -> list[str]:
    rows = []
    for world, w in r["worlds"].items():
        if "rows" not in w:
            rows.append([world, "-", "-", "-", "-", "-", "-", w.get("skipped") or w.get("error", "")])
            continue
        transport = "; ".join(f"{dev}: {name}" for dev, (name, _) in w["transport"].items())
        for row in w["rows"]:
            rows.append([world, transport, str(row["bytes_per_rank"]), "ok" if row["ok"] else "**WRONG**",
                         _num(row["ms"], "{:.3f}"), _num(row["algbw_gbps"]), _num(row["copy_kernel_gbps"]), ""])
    return ["**All-to-all** (`fsc.runtime.all_to_all`, processes sharing one device; algbw = bytes per rank / time):",
            "", *markdown_table(["ranks", "transport", "bytes/rank", "exact", "ms", "algbw GB/s", "copy kernel GB/s",
                                 "note"], rows, numeric=0)]
