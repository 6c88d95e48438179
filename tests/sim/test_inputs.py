"""Topology, lengths and the CLI: link times and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from sim.__main__ import main
from sim.hstu import refetch_fraction
from sim.lengths import LengthDistribution, LengthsError
from sim.topology import Topology, TopologyError


def test_all_to_all_across_nodes_is_limited_by_infiniband():
    topo = Topology.of(16, "h100")
    sent = 16e6
    inter = sent * 8 / 16 / topo.device.inter_node_bandwidth
    assert topo.all_to_all_seconds(np.full(16, sent)) == pytest.approx(topo.device.inter_node_latency + inter)
    one_node = Topology.of(8, "h100")
    intra = sent * 7 / 8 / one_node.device.intra_node_bandwidth
    assert one_node.all_to_all_seconds(np.full(8, sent)) == pytest.approx(one_node.device.intra_node_latency + intra)


def test_unknown_profile_and_bad_rank_counts_are_named():
    with pytest.raises(TopologyError, match="'tpu'"):
        Topology.of(8, "tpu")
    with pytest.raises(TopologyError, match="ranks=12"):
        Topology.of(12, "h100")
    with pytest.raises(TopologyError, match="bogus"):
        Topology.of(8, "h100", bogus=1.0)
    Topology.of(4, "cpu")  # fewer than a node is fine


def test_lengths_are_deterministic_with_a_seed_and_capped():
    dist = LengthDistribution.parse("zipf:32:1.5")
    a = dist.draw(1000, np.random.default_rng(3), 512)
    b = dist.draw(1000, np.random.default_rng(3), 512)
    np.testing.assert_array_equal(a, b)
    assert a.max() <= 512 and a.min() >= 1
    assert not np.array_equal(a, dist.draw(1000, np.random.default_rng(4), 512))


def test_lengths_from_a_ratings_file(tmp_path):
    path = tmp_path / "ratings.csv"
    rows = ["userId,movieId,rating,timestamp"]
    rows += [f"1,{i},4.0,{100 + i}" for i in range(1, 6)] + [f"2,{i},3.5,{200 + i}" for i in range(1, 4)]
    path.write_text("\n".join(rows) + "\n")
    dist = LengthDistribution.from_file(path)
    assert sorted(dist.values.tolist()) == [3, 5]


def test_bad_length_inputs_are_named(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(LengthsError, match="empty.csv"):
        LengthDistribution.from_file(empty)
    bad = tmp_path / "bad.csv"
    bad.write_text("userId,movieId,rating,timestamp\n1,x,y\n")
    with pytest.raises(LengthsError, match="bad.csv"):
        LengthDistribution.from_file(bad)
    with pytest.raises(LengthsError, match="missing.csv"):
        LengthDistribution.from_file(tmp_path / "missing.csv")
    with pytest.raises(LengthsError, match="gamma"):
        LengthDistribution.parse("gamma:2")
    with pytest.raises(LengthsError, match="numbers"):
        LengthDistribution.parse("lognormal:abc")
    with pytest.raises(LengthsError, match="no lengths"):
        LengthDistribution.from_lengths(np.array([]))


def test_cli_names_a_bad_profile_and_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["ablation", "--device", "tpu"])
    assert "'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ablation", "--lengths-from", str(tmp_path / "nope.csv")])
    assert "nope.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ablation", "--ranks", "100"])
    assert "ranks=100" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ablation", "--refetch-fraction", "1.5"])
    assert "--refetch-fraction" in capsys.readouterr().err


def test_refetch_fraction_is_the_chance_an_id_was_in_the_previous_batch():
    assert refetch_fraction(0, 1000) == 0.0
    assert refetch_fraction(1, 1000) == pytest.approx(1e-3)
    assert refetch_fraction(1000, 1000) == pytest.approx(1 - (1 - 1e-3) ** 1000)  # about 1 - 1/e
    assert refetch_fraction(1e9, 1000) == pytest.approx(1.0)
    assert refetch_fraction(5, 1) == 1.0
    # uniform ids: the share of a batch's draws that hit an id the previous batch drew
    rng = np.random.default_rng(0)
    previous, batch = rng.integers(0, 50_000, 30_000), rng.integers(0, 50_000, 30_000)
    assert np.isin(batch, previous).mean() == pytest.approx(refetch_fraction(30_000, 50_000), abs=0.01)
