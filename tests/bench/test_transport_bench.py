"""``python -m bench transport``: its arguments, its table, and rows of the saved format
timed the way calibration times links (both transports, every size)."""

from __future__ import annotations

import pytest

from bench import transport as bench


def test_transport_bench_refuses_fewer_than_two_ranks_and_formats_ratios(tmp_path):
    with pytest.raises(SystemExit):
        bench.run(["--ranks", "1"], str(tmp_path / "t.json"))
    rows = [{"transport": "gloo", "ranks": 2, "bytes": 1 << 20, "median_ms": 2.0},
            {"transport": "shm", "ranks": 2, "bytes": 1 << 20, "median_ms": 0.5}]
    lines = bench._format(rows)
    assert lines[2].split()[-1] == "4.00" and lines[2].split()[2] == "shm"


@pytest.mark.ranks
def test_transport_bench_rows_time_each_transport_and_size_on_two_ranks():
    rows = bench.measure(2, [1024, 4096], ["gloo", "shm"], timeout=240)
    assert [(r["transport"], r["ranks"], r["bytes"]) for r in rows] == [
        ("gloo", 2, 1024), ("shm", 2, 1024), ("gloo", 2, 4096), ("shm", 2, 4096)]
    assert all(set(r) == {"transport", "ranks", "bytes", "median_ms"} and r["median_ms"] > 0 for r in rows)
