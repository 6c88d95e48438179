"""python -m bench torchrec-models, tiny: one row per model, rank count and variant; every
variant starts from the same model and batch (the same first loss); fsc's row says what its
passes changed."""

from __future__ import annotations

import json

import pytest

from bench import BENCHMARKS

pytestmark = pytest.mark.ranks

pytest.importorskip("torchrec", reason="needs torchrec==1.8.0 and fbgemm-gpu-cpu==1.8.0 (make test installs them)")


def test_tiny_run_writes_one_row_per_variant_from_the_same_start(tmp_path):
    out = tmp_path / "torchrec-models.json"
    argv = ["--ranks", "2", "--dim", "8", "--rows", "200", "--batch", "8", "--max-ids", "4",
            "--warmup", "3", "--steps", "2"]
    assert BENCHMARKS["torchrec-models"].main(argv, str(out)) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["ranks"], r["variant"]) for r in rows] == [
        (m, 2, v) for m in ("pooled", "sequence") for v in ("eager", "inductor", "freescale")]
    for model in ("pooled", "sequence"):
        losses = [r["first_loss"] for r in rows if r["model"] == model]
        assert max(losses) - min(losses) <= 1e-5 * max(1.0, abs(losses[0])), (model, losses)
        fsc_row = next(r for r in rows if r["model"] == model and r["variant"] == "freescale")
        assert "overlap-schedule" in fsc_row["passes_modified"]["forward"], fsc_row
        assert all(r["steps"] == 2 and r["step_ms_median"] > 0 for r in rows if r["model"] == model)
