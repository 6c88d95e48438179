"""``python -m bench gpu-check``: its dry run end to end on CPU (the Triton kernels under the
interpreter, CPU stand-ins for timing, CUDA-only measurements skipped with a reason), and
the pure parts: FLOP counting of unmasked work, the jagged batch generator, the fraction
and slowdown arithmetic, tolerances, targets, the section runner's error handling and
deadline, and --only keeping the other sections' results."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import subprocess
import sys

import pytest

# imported here, before any test sets TRITON_INTERPRET for an in-process run: a kernel module
# first imported with it set would be decorated for the interpreter in this process
from bench import gpu_check, gpu_system  # noqa: F401
from bench.gpu_attention import attention_flops, jagged_lengths, speed_targets, visible_pairs, within_tolerance
from bench.gpu_common import Clock, Context, fraction_of_peak, gbps, slowdown, tflops
from bench.gpu_report import render

ROOT = pathlib.Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------- the dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str, str]:
    """One dry run for the module's tests: (its JSON, the README it wrote, its output)."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    readme = tmp / "README.md"
    readme.write_text("# x\n<!-- bench:gpu -->\nold\n<!-- /bench:gpu -->\ntail\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # set before triton is imported, as the command's re-run does
    proc = subprocess.run([sys.executable, "-m", "bench", "gpu-check", "--dry-run", "--json", str(tmp / "gpu.json"),
                           "--readme", str(readme)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / "gpu.json").read_text()), readme.read_text(), proc.stdout


@pytest.mark.ranks
def test_dry_run_runs_every_section_and_writes_the_schema(dry_run):
    data, _, out = dry_run
    assert data["dry_run"] is True and data["complete"] is True
    assert list(data["sections"]) == list(gpu_check.SECTION_NAMES)
    assert {name: s["status"] for name, s in data["sections"].items()} == dict.fromkeys(gpu_check.SECTION_NAMES, "ok")
    sections = {name: s["result"] for name, s in data["sections"].items()}
    # every attention speed carries fraction_of_peak, every contention case slowdown
    speed = sections["speed"]["rows"]
    assert speed and all("fraction_of_peak" in r and "tflops" in r for r in speed)
    assert {r["impl"] for r in speed} == {"fsc-triton", "sdpa-padded", "flex-attention", "hstu-padded-inductor"}
    ours = [r for r in speed if r["impl"] == "fsc-triton"]
    assert all(r["ms"] > 0 and r["fraction_of_peak"] > 0 for r in ours)  # the interpreted kernels were timed
    assert all(t["met"] is None for t in sections["speed"]["targets"])  # stand-ins are never judged
    contention = sections["contention"]["rows"]
    assert contention and all("slowdown" in r for r in contention)
    # CUDA-only measurements: skipped with a reason, no number
    assert all(r["slowdown"] is None and "CUDA only" in r["skipped"] for r in contention)
    flex = [r for r in speed if r["impl"] == "flex-attention"]
    assert all(r["ms"] is None and r["skipped"] for r in flex)
    assert sections["contention"]["kernel_copy_checked"] is True
    # progress lines carry the time
    assert "] peak: start" in out and "gpu-check: done" in out


@pytest.mark.ranks
def test_dry_run_checks_kernels_backend_and_all_to_all(dry_run):
    data, _, _ = dry_run
    sections = {name: s["result"] for name, s in data["sections"].items()}
    correctness = sections["correctness"]
    assert correctness["all_ok"] is True
    assert {(c["mode"], c["dtype"]) for c in correctness["cases"]} == set(
        itertools.product(("hstu", "softmax"), ("float32", "bfloat16")))
    assert {c["entry"] for c in correctness["cases"]} == {"public (autotuned)", "launchers"}
    world_1 = sections["backend"]["world_1"]
    assert world_1["backends"]["freescale"]["loss_equal"] is True
    assert world_1["lower_attention"]["lowered"] >= 1 and world_1["lower_attention"]["fallback"] is None
    assert "skipped" in world_1["generated_code"] and "skipped" in sections["backend"]["world_2"]
    exchange = sections["all-to-all"]["worlds"]["2"]
    assert exchange["transport"]["cpu"][0] == "shm" and all(r["ok"] for r in exchange["rows"])


@pytest.mark.ranks
def test_dry_run_writes_its_readme_section_between_the_markers(dry_run):
    _, readme, _ = dry_run
    assert readme.startswith("# x\n<!-- bench:gpu -->\n**DRY RUN on CPU**") and readme.endswith(
        "<!-- /bench:gpu -->\ntail\n")
    for heading in ("**Peak**", "**Correctness**", "**Kernel speed**", "**Backend**", "**SM contention**",
                    "**All-to-all**"):
        assert heading in readme
    assert "MISSED" not in readme


def test_without_cuda_a_real_run_measures_and_writes_nothing(tmp_path, capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.run([], str(tmp_path / "gpu.json")) == 1
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()


def test_only_reruns_some_sections_and_keeps_the_others(tmp_path, monkeypatch):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"sections": {"speed": {"status": "ok", "result": {"kept": True}}}}))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # run in this process (only the CPU matmul runs, no kernel)
    assert gpu_check.run(["--dry-run", "--only", "peak"], str(path)) == 0
    data = json.loads(path.read_text())
    assert data["sections"]["speed"]["result"] == {"kept": True}
    assert data["sections"]["peak"]["status"] == "ok" and data["sections"]["peak"]["result"]["tflops"] > 0
    assert data["rerun"] == ["peak"]


def test_a_readme_without_the_markers_does_not_stop_the_run(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu_check.run(["--dry-run", "--only", "peak", "--readme", str(readme)], str(tmp_path / "gpu.json")) == 0
    assert "could not write the results: ValueError" in capsys.readouterr().out
    data = json.loads((tmp_path / "gpu.json").read_text())  # the JSON is written before the README
    assert data["complete"] and data["sections"]["peak"]["status"] == "ok"
    assert readme.read_text() == "# no markers\n"


def test_dry_run_reruns_itself_under_the_interpreter_and_never_over_the_gpu_results(monkeypatch):
    calls = []

    def fake_run(command, env, check):
        calls.append((command, env))
        return subprocess.CompletedProcess(command, 3)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    assert gpu_check.run(["--dry-run", "--budget-s", "60"], gpu_check.DEFAULT_JSON) == 3  # its exit status
    (command, env), = calls
    assert env["TRITON_INTERPRET"] == "1" and str(ROOT) in env["PYTHONPATH"].split(os.pathsep)
    json_path = command[command.index("--json") + 1]
    assert json_path != gpu_check.DEFAULT_JSON and json_path.endswith("fsc-gpu-check-dry.json")
    assert command[-3:] == ["--dry-run", "--budget-s", "60"]


def test_render_only_rewrites_the_readme_from_the_json_without_measuring(tmp_path, monkeypatch):
    path, readme = tmp_path / "gpu.json", tmp_path / "README.md"
    path.write_text(json.dumps({"dry_run": False, "complete": True, "elapsed_s": 400, "budget_s": 450,
                                "environment": {"gpu": "NVIDIA H200", "torch": "2.11.0"}, "sections": {}}))
    readme.write_text("<!-- bench:gpu -->\nold\n<!-- /bench:gpu -->\n")
    monkeypatch.setattr(gpu_check, "run_sections", None)  # measuring would fail
    assert gpu_check.run(["--render-only", "--readme", str(readme)], str(path)) == 0
    assert "NVIDIA H200" in readme.read_text() and "old" not in readme.read_text()
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no <!-- bench:gpu -->"):
        gpu_check.run(["--render-only", "--readme", str(readme)], str(path))


def test_section_names_are_the_sections_in_order():
    assert tuple(s.name for s in gpu_check.sections()) == gpu_check.SECTION_NAMES


# ------------------------------------------------------------------------- the section runner


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _context(records: dict) -> Context:
    return Context(dry_run=True, device="cpu", log=lambda _: None, results=records)


def test_an_exception_in_one_section_is_recorded_and_the_next_still_runs():
    now = FakeTime()

    def broken(ctx, budget):
        raise RuntimeError("kernel launch failed: out of resources")

    def fine(ctx, budget):
        now.t += 5
        return {"saw": sorted(ctx.results)}

    saved = []
    records = gpu_check.run_sections(
        [gpu_check.Section("a", broken, 1), gpu_check.Section("b", fine, 1)], clock=Clock(100, now=now),
        make_context=_context, log=lambda _: None, done=lambda r: saved.append(sorted(r)))
    assert records["a"]["status"] == "error"
    assert records["a"]["error"] == "RuntimeError: kernel launch failed: out of resources"
    assert "Traceback" in records["a"]["traceback"] and "in broken" in records["a"]["traceback"]
    assert records["b"] == {"status": "ok", "result": {"saw": ["a"]}, "seconds": 5.0}
    assert saved == [["a"], ["a", "b"]]  # written after every section


def test_sections_after_the_deadline_are_skipped_with_the_reason():
    now = FakeTime()

    def slow(ctx, budget):
        now.t += 60
        assert budget.expired() and budget.reason.startswith("skipped: the run's --budget-s deadline")
        return {}

    records = gpu_check.run_sections(
        [gpu_check.Section("slow", slow, 1), gpu_check.Section("late", slow, 1)], clock=Clock(50, now=now),
        make_context=_context, log=lambda _: None)
    assert records["slow"]["status"] == "ok"
    assert records["late"]["status"] == "skipped" and "deadline" in records["late"]["reason"]


def test_a_section_gets_its_share_of_what_is_left_and_unused_time_passes_on():
    now = FakeTime()
    clock = Clock(100, now=now)
    first = clock.section("a", 1, 4)
    assert first.remaining() == pytest.approx(25)
    now.t = 30  # past its share, not past the run's deadline
    assert first.expired() and "share of --budget-s" in first.reason
    now.t = 10
    second = clock.section("b", 1, 3)  # 90 s left for 3 weights' worth of sections
    assert second.remaining() == pytest.approx(30)
    assert not second.expired(needs_s=29) and second.expired(needs_s=30)


# ------------------------------------------------------------------------- the arithmetic


def test_visible_pairs_and_flops_match_a_brute_force_count():
    for lengths in ([1], [300], [1, 7, 0, 129, 3], jagged_lengths(1500, 129, seed=3)):
        causal = sum(1 for n in lengths for i in range(n) for j in range(n) if j <= i)
        assert visible_pairs(lengths) == causal
        assert visible_pairs(lengths, causal=False) == sum(1 for n in lengths for i in range(n) for j in range(n))
        heads, d, dv = 3, 64, 32
        fwd, bwd = attention_flops(lengths, heads, d, dv, "fwd"), attention_flops(lengths, heads, d, dv, "bwd")
        assert fwd == 2 * causal * heads * (d + dv)  # q.k and p.v per visible pair and head
        assert bwd == 2 * causal * heads * (3 * d + 2 * dv)  # scores recomputed, dP, dS.k, dS^T.q, P^T.dO
        assert attention_flops(lengths, heads, d, dv, "fwd+bwd") == fwd + bwd


@pytest.mark.parametrize("tokens,max_len", [(65536, 4096), (65536, 512), (1000, 4096), (1, 1), (7, 3)])
def test_jagged_batch_has_exactly_the_token_count_and_reaches_max_len(tokens, max_len):
    lengths = jagged_lengths(tokens, max_len, seed=1)
    assert sum(lengths) == tokens
    assert lengths[0] == min(max_len, tokens) and all(1 <= n <= max_len for n in lengths)
    assert jagged_lengths(tokens, max_len, seed=1) == lengths


def test_jagged_batch_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="total_tokens and max_len must be >= 1"):
        jagged_lengths(0, 512)


def test_tflops_fraction_and_slowdown_arithmetic():
    assert tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert tflops(5e11, 0.5) == pytest.approx(1000.0)
    assert fraction_of_peak(400.0, 800.0) == pytest.approx(0.5)
    assert slowdown(10.0, 10.2) == pytest.approx(0.02)
    assert slowdown(10.0, 9.9) == pytest.approx(-0.01)
    assert gbps(1e9, 1000.0) == pytest.approx(1.0)
    for value in (tflops(None, 1.0), tflops(1.0, None), tflops(1.0, 0.0), fraction_of_peak(None, 1.0),
                  fraction_of_peak(1.0, 0.0), slowdown(None, 1.0), slowdown(1.0, None), gbps(1.0, None)):
        assert value is None


def test_tolerances_per_dtype():
    # fp32: 1e-5 of the largest value, or twice the fp32 reference's own error if that is larger
    assert within_tolerance("float32", 0.9e-5, 0.0, 1.0) == (True, 1e-5)
    assert within_tolerance("float32", 3e-5, 2e-5, 1.0) == (True, 4e-5)
    assert not within_tolerance("float32", 2e-5, 0.0, 1.0)[0]
    # bf16: twice the bf16 reference's error
    assert within_tolerance("bfloat16", 0.02, 0.01, 1.0) == (True, 0.02)
    assert not within_tolerance("bfloat16", 0.021, 0.01, 1.0)[0]


def _row(mode, impl, direction, max_len, value, fraction=None):
    return {"mode": mode, "impl": impl, "direction": direction, "max_len": max_len, "tflops": value,
            "fraction_of_peak": fraction}


def test_speed_targets_read_the_longest_length():
    rows = [_row("hstu", "fsc-triton", "fwd", 4096, 450.0, 0.6), _row("hstu", "fsc-triton", "fwd", 512, 10.0, 0.01),
            _row("softmax", "fsc-triton", "fwd", 4096, 300.0), _row("softmax", "flex-attention", "fwd", 4096, 400.0),
            _row("softmax", "fsc-triton", "fwd+bwd", 4096, 200.0),
            _row("softmax", "flex-attention", "fwd+bwd", 4096, None)]
    hstu, softmax_fwd, softmax_both = speed_targets(rows)
    assert (hstu["max_len"], hstu["value"], hstu["met"]) == (4096, 0.6, True)
    assert softmax_fwd["value"] == pytest.approx(0.75) and softmax_fwd["met"] is False
    assert softmax_both["value"] is None and softmax_both["met"] is None
    assert all(t["met"] is None and "dry-run" in t["note"] for t in speed_targets(rows, evaluate=False))


def test_readme_names_errors_and_an_incomplete_run():
    data = {"dry_run": False, "complete": False, "elapsed_s": 130, "budget_s": 450,
            "environment": {"gpu": "NVIDIA H200", "sms": 132, "gpu_memory_gib": 139.8, "cuda": "12.8",
                            "cpu": "x86_64 16 cpus", "torch": "2.11.0", "triton": "3.6.0", "python": "3.12",
                            "date": "2026-12-05 10:00 UTC"},
            "sections": {"peak": {"status": "ok", "seconds": 3, "result": {
                "dtype": "bfloat16", "shape": [8192, 8192, 8192], "tflops": 760.0, "profile": "h200",
                "profile_tflops": 989.0, "measured_over_profile": 760 / 989}},
                "contention": {"status": "error", "seconds": 1, "error": "RuntimeError: CUDA error: boom",
                               "traceback": "..."}}}
    text = render(data)
    assert "NVIDIA H200 (132 SMs, 139.8 GiB), CUDA 12.8" in text and "torch 2.11.0, Triton 3.6.0" in text
    assert "INCOMPLETE" in text and "contention **error**: RuntimeError: CUDA error: boom" in text
    assert "matmul 760 TFLOP/s (77% of the h200 profile's 989)" in text
