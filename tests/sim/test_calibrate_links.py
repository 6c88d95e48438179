"""``python -m sim calibrate``: gloo's links measured on real ranks, the way calibration
measures links, and saved in the format ``sim validate`` reads."""

from __future__ import annotations

import pytest

from sim import validate


@pytest.mark.ranks
def test_calibrate_links_fits_both_collectives_at_every_size():
    fit = validate.calibrate_links(2, repeats=1)
    assert set(fit) == {"world", "points", "all_to_all", "all_reduce", "loadavg"} and fit["world"] == 2
    assert [p["bytes"] for p in fit["points"]] == list(validate.SIZES)
    assert all(set(p) == {"bytes", "all_to_all_s", "all_reduce_s"} for p in fit["points"])
    assert all(t > 0 for p in fit["points"] for t in (p["all_to_all_s"], p["all_reduce_s"]))
    for latency, bandwidth in (fit["all_to_all"], fit["all_reduce"]):
        assert latency >= 0 and bandwidth > 0
