"""``python -m bench attention``. Without a GPU: its arguments, the JSON it writes when there
is no CUDA device, the FlexAttention masks it builds (run eagerly on the CPU against the
kernel's reference), the competitors it declines and why, and its table. With a CUDA device:
a tiny measured run."""

import argparse
import importlib.util
import json

import pytest
import torch

from bench import attention
from fsc.kernels import jagged_attention

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device: the benchmark measures (see the CUDA test)")
def test_without_cuda_it_writes_json_saying_nothing_was_measured(tmp_path, capsys):
    path = tmp_path / "out" / "attention.json"
    assert attention.run(["--batch", "2", "--mode", "softmax"], str(path)) == 0
    assert "not measured" in capsys.readouterr().out
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "attention"
    assert payload["measured"] is False
    assert "rows" not in payload and "no CUDA device" in payload["reason"]
    assert payload["config"]["batch"] == 2 and payload["config"]["mode"] == ["softmax"]
    assert payload["device"] is None and payload["torch"] == torch.__version__


@pytest.mark.parametrize("argv", [["--mode", "relu"], ["--scenario", "sparse"], ["--dtype", "float64"]])
def test_bad_arguments_fail_before_anything_is_written(tmp_path, argv):
    path = tmp_path / "attention.json"
    with pytest.raises(SystemExit):
        attention.run(argv, str(path))
    assert not path.exists()


def _cpu_inputs(monkeypatch, scenario: str) -> dict:
    """The benchmark's own inputs for ``scenario`` in softmax mode, small, left on the CPU."""
    monkeypatch.setattr(attention, "_to", lambda x, device: x)
    args = argparse.Namespace(batch=3, max_len=40, heads=2, head_dim=16, dtype="float32", seed=0)
    x = attention._inputs("softmax", scenario, args)
    if scenario == "window":
        x["options"]["max_attn_len"] = 3  # the benchmark's window (256) would not bind at 40 tokens
    return x


@pytest.mark.filterwarnings("ignore::UserWarning")  # FlexAttention warns when run without compiling
@pytest.mark.parametrize("scenario", ["causal", "ranking", "window"])
def test_flex_attention_competitor_computes_the_reference_attention(monkeypatch, scenario):
    """FlexAttention gets the benchmark's mask_mod and layout; run eagerly on the CPU (compiling
    is for speed, and minutes of C++ builds on CPU), it must give the kernel's reference result
    for the same options, or the benchmark would time a different attention."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    x = _cpu_inputs(monkeypatch, scenario)
    fn, note = attention._flex("softmax", scenario, x)
    assert fn is not None, note
    q, k, v, offsets = x["q"], x["k"], x["v"], x["offsets"]
    got = fn(q, k, v)
    want = jagged_attention(q, k, v, offsets, x["max_seq_len"], impl="reference", **x["options"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if scenario != "causal":  # the case is one a mask without the scenario's options would fail
        plain = jagged_attention(q, k, v, offsets, x["max_seq_len"], impl="reference", mode="softmax")
        assert (got - plain).abs().max() > 1e-3


def test_competitors_that_cannot_run_a_case_say_why():
    x = {"options": {}}
    assert attention._flex("hstu", "causal", x) == (
        None, "not expressible: FlexAttention normalizes over keys (softmax); HSTU's SiLU attention does not")
    fn, note = attention._flex("softmax", "bias", x)
    assert fn is None and "relative-bias" in note
    fn, note = attention._generative_recommenders("softmax", "causal", x, "peers/gr")
    assert fn is None and "HSTU attention only" in note
    fn, note = attention._generative_recommenders("hstu", "bias", x, "peers/gr")
    assert fn is None and "no relative-bias tables" in note


@pytest.mark.skipif(importlib.util.find_spec("generative_recommenders") is not None,
                    reason="generative-recommenders is importable here: the benchmark runs it")
def test_missing_generative_recommenders_checkout_is_a_row_saying_where_to_put_it():
    fn, note = attention._generative_recommenders("hstu", "causal", {"options": {}}, "/elsewhere/gr")
    assert fn is None
    assert note.startswith("not importable") and "into /elsewhere/gr" in note and "PYTHONPATH=/elsewhere/gr" in note


def test_table_prints_dashes_for_numbers_a_row_does_not_have(capsys):
    attention._print([
        {"mode": "hstu", "scenario": "causal", "impl": "fsc-triton", "fwd_ms": 1.25, "fwd_bwd_ms": 3.5,
         "max_abs_err_vs_fp32_reference": 0.0123},
        {"mode": "hstu", "scenario": "causal", "impl": "flex-attention", "note": "not expressible"},
    ])
    header, ours, flex = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["mode", "scenario", "impl"]
    assert ours.split() == ["hstu", "causal", "fsc-triton", "1.250", "3.500", "1.23e-02"]
    assert flex.split() == ["hstu", "causal", "flex-attention", "-", "-", "-", "not", "expressible"]


@pytest.mark.skipif(not CUDA, reason="no CUDA device: the benchmark times GPU kernels")
def test_on_cuda_it_measures_ours_the_reference_and_flex_attention(tmp_path):
    path = tmp_path / "attention.json"
    argv = ["--batch", "2", "--max-len", "64", "--heads", "1", "--head-dim", "32", "--mode", "softmax",
            "--scenario", "causal"]
    assert attention.run(argv, str(path)) == 0
    payload = json.loads(path.read_text())
    assert payload["measured"] is True and payload["device"]
    rows = {row["impl"]: row for row in payload["rows"]}
    assert set(rows) == {"fsc-triton", "pytorch-reference", "flex-attention", "gr-triton"}
    for name in ("fsc-triton", "pytorch-reference", "flex-attention"):
        row = rows[name]
        assert "note" not in row, row
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
        # bf16 (the default dtype) against the fp32 reference: a few bf16 ulps of values near 1
        assert row["max_abs_err_vs_fp32_reference"] < 5e-2, row
    assert "HSTU attention only" in rows["gr-triton"]["note"]
