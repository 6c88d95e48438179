"""``python -m bench attention`` on a machine without a GPU: it says so and writes JSON
saying nothing was measured."""

import json

import torch

from bench import attention


def test_attention_bench_without_gpu_reports_not_measured(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "out" / "attention.json"
    assert attention.run(["--batch", "2", "--mode", "softmax"], str(path)) == 0
    assert "not measured" in capsys.readouterr().out
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "attention"
    assert payload["measured"] is False
    assert "rows" not in payload and "no CUDA device" in payload["reason"]
    assert payload["config"]["batch"] == 2
