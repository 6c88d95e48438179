"""``python -m bench balance`` on tiny batches and tiny generated ratings files (never
the real MovieLens data), its MovieLens length reader, and its argument checks; plus the
one argument check of the loss normalizer that needs no process group."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from bench import balance as bench
from fsc.runtime import BalanceError
from fsc.runtime.balance_dist import loss_normalizer

# user -> number of ratings; user 4 has too few (the loader keeps users with >= 3)
RATINGS = {7: 5, 2: 3, 4: 2, 11: 4}


def write_ratings(tmp_path: pathlib.Path, fmt: str) -> pathlib.Path:
    rows = [(u, 100 + i, 4, 1_000_000 + 10 * i) for u, k in RATINGS.items() for i in range(k)]
    if fmt == "csv":
        text = "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r}.0,{t}\n" for u, m, r, t in rows)
        path = tmp_path / "ratings.csv"
    elif fmt == "dat":
        text = "".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in rows)
        path = tmp_path / "ratings.dat"
    else:
        text = "".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in rows)
        path = tmp_path / "u.data"
    path.write_text(text)
    return path


@pytest.mark.parametrize("fmt", ["csv", "dat", "udata"])
def test_movielens_lengths_are_ratings_per_user_with_short_histories_dropped(tmp_path, fmt):
    path = write_ratings(tmp_path, fmt)
    expected = [3, 5, 4]  # users 2, 7, 11 in id order; user 4 dropped
    assert bench.movielens_lengths(path).tolist() == expected  # through the example's loader


def test_bench_writes_one_row_per_distribution_rank_count_and_method(tmp_path, capsys):
    ratings = write_ratings(tmp_path, "csv")
    out = tmp_path / "balance.json"
    argv = ["--lengths-from", str(ratings), "--ranks", "2", "4", "--per-rank", "6", "--trials", "2", "--max-len", "30",
            "--split-max-len", "0"]
    assert bench.run(argv, str(out)) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 3 * 2 * 4
    assert {tuple(sorted(r)) for r in rows} == {("distribution", "max_over_lb", "method", "ms", "per_rank", "ranks")}
    assert {r["distribution"] for r in rows} == {"lognormal", "zipf", "movielens"}
    assert {r["method"] for r in rows} == set(bench.METHODS)
    for r in rows:
        assert r["max_over_lb"] >= 1.0 - 1e-12 and r["ms"] >= 0.0
    ours = {(r["distribution"], r["ranks"]): r["max_over_lb"] for r in rows if r["method"] == "freescale"}
    theirs = {(r["distribution"], r["ranks"]): r["max_over_lb"] for r in rows if r["method"] == "kk-equal"}
    assert all(ours[k] <= theirs[k] + 1e-12 for k in ours)
    assert "freescale" in capsys.readouterr().out


SPLIT_KEYS = ("chunks", "distribution", "kv_tokens", "max_len", "max_over_lb", "max_over_mean", "method", "ms",
              "per_rank", "ranks", "split_samples")


def test_bench_adds_split_rows_where_whole_samples_are_stuck_at_the_heaviest(tmp_path, capsys):
    out = tmp_path / "balance.json"
    argv = ["--ranks", "8", "--per-rank", "16", "--trials", "2", "--repeats", "1", "--split-max-len", "20000"]
    assert bench.run(argv, str(out)) == 0
    rows = [r for r in json.loads(out.read_text()) if "max_len" in r]
    assert len(rows) == 2 * 1 * len(bench.SPLIT_METHODS)
    assert {tuple(sorted(r)) for r in rows} == {SPLIT_KEYS}
    by = {(r["distribution"], r["method"]): r for r in rows}
    # Zipf(1.5) lengths up to 20,000 on 8 ranks of 16: whole samples are far from total / R, splits are not
    assert by[("zipf", "whole-free")]["max_over_mean"] > 1.5
    assert by[("zipf", "split")]["max_over_mean"] <= 1.01 and by[("zipf", "split")]["split_samples"] >= 1
    assert by[("zipf", "split")]["kv_tokens"] > 0 and by[("zipf", "whole-free")]["kv_tokens"] == 0
    assert "whole-free" in capsys.readouterr().out


def test_split_rows_cap_lengths_at_their_own_max_len():
    rows = bench.split_rows(distributions=["movielens"], ranks=[2], per_rank=4, max_len=7, cost=bench.EXAMPLE_COST,
                            trials=1, seed=0, pool=np.array([3, 500]), repeats=1)
    assert [r["method"] for r in rows] == list(bench.SPLIT_METHODS) and all(r["max_len"] == 7 for r in rows)


def test_bench_caps_lengths_at_max_len_before_costing():
    seen = []

    def cost(lengths):  # the benchmark costs each batch once; keep what it was given
        seen.append(np.array(lengths))
        return np.asarray(lengths, dtype=np.float64)

    # movielens from a pool of one short and one long history: every draw is one or the other
    pool = np.array([bench.MIN_LENGTH, 500])
    rows = bench.rows(distributions=["zipf", "movielens"], ranks=[2], per_rank=500, max_len=50, cost=cost,
                      trials=1, seed=0, pool=pool, repeats=1)
    zipf, movielens = seen
    assert len(zipf) == len(movielens) == 1000
    # Zipf(1.5) puts about 14% of draws past 50: they arrive at the cap, none beyond it
    assert zipf.max() == 50 and (zipf == 50).sum() > 50 and zipf.min() == bench.MIN_LENGTH
    assert set(movielens.tolist()) == {bench.MIN_LENGTH, 50}
    assert [(r["distribution"], r["method"]) for r in rows] == [(d, m) for d in ("zipf", "movielens")
                                                                for m in bench.METHODS]


@pytest.mark.parametrize(
    "argv",
    [
        ["--cost", "1"],
        ["--cost", "a,b"],
        ["--cost", "-1,2"],
        ["--per-rank", "0"],
        ["--trials", "0"],
        ["--repeats", "0"],
        ["--ranks", "0"],
        ["--split-max-len", "-1"],
    ],
)
def test_bench_rejects_bad_arguments(tmp_path, argv):
    with pytest.raises(SystemExit):
        bench.run(argv, str(tmp_path / "x.json"))


def test_bench_rejects_an_unknown_distribution():
    with pytest.raises(ValueError, match="unknown distribution"):
        bench.draw_lengths("uniform", 3, np.random.default_rng(0))


def test_loss_normalizer_rejects_an_unknown_gradient_reduction():
    with pytest.raises(BalanceError, match="grad_reduction must be one of"):
        loss_normalizer(3, grad_reduction="avg")
