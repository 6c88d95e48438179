"""``gpu-check``: one command that checks and times every CUDA path of fsc on a GPU machine
(``make gpu-check``, or ``python -m bench gpu-check``), in under 8 minutes, with nothing
downloaded and nothing outside the repository.

Sections (run in this order; the issue's numbering in brackets):

* ``peak``: the measured bf16 matmul peak, the limit for the figures below
  (:mod:`bench.gpu_system`);
* ``contention`` [4]: a big matmul alone and under concurrent copies (``slowdown``);
* ``all-to-all`` [5]: the copy-engine all-to-all on 2 and 4 processes of the one GPU;
* ``correctness`` [1]: the attention kernels against the float64 reference
  (:mod:`bench.gpu_attention`);
* ``speed`` [2]: the kernels' TFLOP/s (useful work) next to SDPA, FlexAttention and
  padded HSTU attention compiled by Inductor (``fraction_of_peak`` on every figure);
* ``backend`` [3]: the HSTU example under ``freescale`` vs eager and Inductor
  (:mod:`bench.gpu_backend`).

Each section runs under its own ``try``: an exception is recorded with its traceback and
the next section runs. ``--budget-s`` (default 450) is one deadline for the run; each
section gets a share of what is left and its sub-steps skip, with the reason recorded, once
the share is spent; a section that has not started by the deadline is skipped. Progress
lines carry the time; ``results/gpu.json`` and the README section (between
``<!-- bench:gpu -->`` markers, written by :mod:`bench.gpu_report`) are rewritten after
every section, so a run that is killed keeps what it measured. ``--only NAME`` reruns
some sections and keeps the others' results from the existing JSON; ``--render-only``
rewrites the README section from a JSON without measuring anything.

``--dry-run`` runs every section's logic on CPU at tiny sizes: the Triton kernels under
the interpreter (the command re-runs itself with ``TRITON_INTERPRET=1``, which must be set
before triton is imported), timing and reporting with CPU stand-ins, and CUDA-only
measurements skipped with the reason. Its JSON goes to a temporary file unless ``--json``
names one, and it touches a README only when ``--readme`` names one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from bench.gpu_common import Budget, Clock, Context, Progress

DEFAULT_JSON = "results/gpu.json"
DEFAULT_BUDGET_S = 450.0
SECTION_NAMES = ("peak", "contention", "all-to-all", "correctness", "speed", "backend")
"""The names of :func:`sections`, in order, known without importing torch."""
ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Context, Budget], dict]
    weight: float
    """Share of the run's time (see :meth:`bench.gpu_common.Clock.section`)."""


def sections() -> list[Section]:
    from bench import gpu_attention, gpu_backend, gpu_system

    return [
        Section("peak", gpu_system.peak, 5),
        Section("contention", gpu_system.contention, 20),
        Section("all-to-all", gpu_system.exchange, 45),
        Section("correctness", gpu_attention.correctness, 70),
        Section("speed", gpu_attention.speed, 190),
        Section("backend", gpu_backend.backend, 120),
    ]


def run_sections(todo: Sequence[Section], *, clock: Clock, make_context: Callable[[dict], Context],
                 log: Callable[[str], None], done: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Run ``todo`` in order, each under its own ``try``; returns ``{name: record}`` where a
    record has ``status`` (``ok``, ``error`` or ``skipped``), ``seconds`` and ``result``,
    ``error`` + ``traceback``, or ``reason``. ``done(records so far)`` runs after each."""
    records: dict[str, dict] = {}
    for i, section in enumerate(todo):
        if clock.remaining() <= 0:
            records[section.name] = {"status": "skipped", "seconds": 0.0,
                                     "reason": "skipped: the run's --budget-s deadline passed before it started"}
            log(f"{section.name}: skipped (deadline)")
        else:
            weight_left = sum(s.weight for s in todo[i:])
            budget = clock.section(section.name, section.weight, weight_left)
            log(f"{section.name}: start ({budget.remaining():.0f} s of {clock.remaining():.0f} s left)")
            start = clock.elapsed()
            try:
                result = section.run(make_context(records), budget)
                records[section.name] = {"status": "ok", "result": result}
            except Exception as exc:  # recorded with its traceback; the next section runs
                records[section.name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                                         "traceback": traceback.format_exc()}
                log(f"{section.name}: ERROR {type(exc).__name__}: {exc}")
            records[section.name]["seconds"] = clock.elapsed() - start
            log(f"{section.name}: {records[section.name]['status']} in {records[section.name]['seconds']:.1f} s")
        if done is not None:
            done(records)
    return records


def environment(cuda: bool) -> dict:
    import torch
    import triton

    env: dict[str, Any] = {"torch": torch.__version__, "triton": triton.__version__,
                           "python": platform.python_version(), "cpu": f"{platform.machine()} {os.cpu_count()} cpus",
                           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   sms=props.multi_processor_count, cuda=torch.version.cuda, gpus=torch.cuda.device_count())
    else:
        env["gpu"] = None
    return env


def _tune_dynamo() -> None:
    """Every length and grad mode of a compiled peer is a Dynamo cache entry; the default
    limit (8) would silently send the later ones to eager."""
    import torch

    config = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))


def _previous(json_path: pathlib.Path) -> dict:
    try:
        return json.loads(json_path.read_text())
    except (OSError, ValueError):
        return {}


def _reexec_interpreted(argv: list[str], json_path: str) -> int:
    """The dry run in a fresh process with ``TRITON_INTERPRET=1`` (triton reads it on import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "bench", "gpu-check", "--json", json_path, *argv]
    return subprocess.run(command, env=env, check=False).returncode


def run(argv: list[str], json_path: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreter (for tests)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="deadline for the whole run")
    parser.add_argument("--readme", default=None, help="README to update (default README.md; none in the dry run)")
    parser.add_argument("--only", action="append", choices=SECTION_NAMES,
                        help="run only these sections (repeatable); the others' results stay from the JSON")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: rewrite the README section from the JSON (e.g. one copied off the GPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.render_only:
        from bench.gpu_report import render
        from bench.report import replace_section

        replace_section(args.readme or "README.md", "gpu", render(json.loads(pathlib.Path(json_path).read_text()),
                                                                 json_name=json_path))
        return 0
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        if json_path == DEFAULT_JSON:  # never overwrite a GPU run's results with a dry run's
            json_path = str(pathlib.Path(tempfile.gettempdir()) / "fsc-gpu-check-dry.json")
        return _reexec_interpreted(argv, json_path)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing is measured or written (use --dry-run to test the command "
              "on CPU)", file=sys.stderr)
        return 1
    readme = args.readme if args.readme is not None else (None if args.dry_run else "README.md")
    clock = Clock(args.budget_s)
    log = Progress(clock)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda":
        _tune_dynamo()
    path = pathlib.Path(json_path)
    kept = {k: v for k, v in _previous(path).get("sections", {}).items()} if args.only else {}
    todo = [s for s in sections() if not args.only or s.name in args.only]
    data: dict[str, Any] = {"benchmark": "gpu-check", "dry_run": args.dry_run, "complete": False,
                            "budget_s": args.budget_s, "command": "python -m bench gpu-check " + " ".join(argv),
                            "environment": environment(device == "cuda"), "rerun": [s.name for s in todo] if args.only
                            else None, "sections": dict(kept)}
    log(f"gpu-check: {'DRY RUN on CPU' if args.dry_run else data['environment'].get('gpu')}; "
        f"torch {torch.__version__}; sections {', '.join(s.name for s in todo)}; budget {args.budget_s:.0f} s")

    def context(records: dict) -> Context:
        return Context(dry_run=args.dry_run, device=device, log=log, results={**kept, **records}, seed=args.seed)

    def save(records: dict) -> None:
        data["sections"] = {**kept, **records}
        data["elapsed_s"] = clock.elapsed()
        try:
            write(path, data, readme)
        except Exception as exc:  # a missing README marker must not stop the measurements
            log(f"gpu-check: could not write the results: {type(exc).__name__}: {exc}")

    records = run_sections(todo, clock=clock, make_context=context, log=log, done=save)
    data["complete"] = True
    save(records)
    failed = [n for n, r in records.items() if r["status"] == "error"]
    log(f"gpu-check: done in {clock.elapsed():.0f} s; sections with errors: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


def write(path: pathlib.Path, data: dict, readme: str | None) -> None:
    from bench.gpu_report import render
    from bench.report import replace_section

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)  # a run killed mid-write leaves the previous file whole
    if readme:
        replace_section(readme, "gpu", render(data, json_name=str(path)))


if __name__ == "__main__":  # python -m bench.gpu_check [--json PATH] ...
    main_parser = argparse.ArgumentParser(add_help=False)
    main_parser.add_argument("--json", default=DEFAULT_JSON)
    known, rest = main_parser.parse_known_args(sys.argv[1:])
    sys.exit(run(rest, known.json))
