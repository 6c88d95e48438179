"""``python -m bench attention-cpu``: a tiny run writes one row per family, length and
variant, with values equal to eager, the lowering each freescale variant recorded, and
ratios to inductor's step."""

import json

import pytest

from bench import attention_cpu


@pytest.mark.inductor
def test_tiny_run_keeps_dense_attention_by_default_and_lowers_it_when_asked(tmp_path, capsys):
    path = tmp_path / "attention-cpu.json"
    argv = ["--family", "sdpa", "--family", "mha", "--lengths", "8", "--batch", "2", "--warmup", "1",
            "--rounds", "2"]
    assert attention_cpu.run(argv, str(path)) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["family"], r["variant"]) for r in rows] == [
        (f, v) for f in ("sdpa", "mha") for v in attention_cpu.VARIANTS]
    lowering = {(r["family"], r["variant"]): r["lowering"] for r in rows}
    for family in ("sdpa", "mha"):
        assert lowering[family, "inductor"] == "-"
        assert lowering[family, "freescale"] == "kept"
        assert lowering[family, "freescale-lowered"] == "lowered"
    assert all(r["max_abs_err_vs_eager"] < 1e-4 and r["ratio_to_inductor"] > 0 for r in rows)
    assert all(r["ratio_to_inductor"] == 1.0 for r in rows if r["variant"] == "inductor")
    assert "| sdpa | 8 | freescale | kept |" in capsys.readouterr().out


def test_bad_family_fails_before_anything_is_written(tmp_path):
    path = tmp_path / "attention-cpu.json"
    with pytest.raises(SystemExit):
        attention_cpu.run(["--family", "flash"], str(path))
    assert not path.exists()
