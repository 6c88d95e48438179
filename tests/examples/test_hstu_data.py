"""The HSTU example's data module: MovieLens parsing in its three formats, the synthetic
generator and the leave-one-out split. Every input is a tiny file written to tmp_path."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.hstu.data import (
    Histories,
    history_lengths,
    leave_one_out,
    load_movielens,
    synthetic_histories,
)

# (user, item, rating, timestamp), deliberately out of order: user 10 before user 2 (numeric,
# not string, order must win), timestamps shuffled, and equal timestamps (user 2 at 200, user
# 10 at 300) whose file order must survive the sort.
ROWS = [
    (10, 50, 4, 300),
    (2, 7, 3, 200),
    (10, 60, 1, 100),
    (2, 8, 5, 100),
    (2, 9, 1, 200),
    (10, 50, 2, 300),
    (3, 7, 4, 50),
    (3, 70, 3, 40),
    (3, 8, 2, 60),
]
# Sorted: user 2: 8@100, 7@200, 9@200 | user 3: 70@40, 7@50, 8@60 | user 10: 60@100, 50@300, 50@300.
# First appearance: 8->1, 7->2, 9->3, 70->4, 60->5, 50->6. Integer rating r -> bucket 2r-1.
EXPECTED_ITEMS = [[1, 2, 3], [4, 2, 1], [5, 6, 6]]
EXPECTED_RATINGS = [[9, 5, 1], [5, 7, 3], [1, 7, 3]]
EXPECTED_TIMESTAMPS = [[100, 200, 200], [40, 50, 60], [100, 300, 300]]


def _csv(rows) -> str:
    return "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{float(r)},{t}\n" for u, i, r, t in rows)


def _dat(rows) -> str:
    return "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows)


def _udata(rows) -> str:
    return "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)


WRITERS = {"csv": _csv, "dat": _dat, "udata": _udata}


def _write(tmp_path: pathlib.Path, text: str, name: str = "ratings.txt") -> pathlib.Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _as_lists(arrays: list[np.ndarray]) -> list[list[int]]:
    for a in arrays:
        assert a.dtype == np.int64
    return [a.tolist() for a in arrays]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_load_movielens_sorts_chronologically_keeps_tie_order_and_remaps_densely(tmp_path, fmt):
    # A neutral file name: the format must come from the content.
    h = load_movielens(_write(tmp_path, WRITERS[fmt](ROWS)))
    assert len(h) == 3
    assert _as_lists(h.items) == EXPECTED_ITEMS
    assert _as_lists(h.ratings) == EXPECTED_RATINGS
    assert _as_lists(h.timestamps) == EXPECTED_TIMESTAMPS
    assert h.num_items == 6
    assert h.num_ratings == 10
    assert h.lengths().tolist() == [3, 3, 3]
    assert h.lengths().dtype == np.int64


def test_load_movielens_detects_format_by_content_not_file_name(tmp_path):
    h = load_movielens(_write(tmp_path, _csv(ROWS), name="u.data"))
    assert _as_lists(h.items) == EXPECTED_ITEMS


def test_load_movielens_accepts_crlf_blank_lines_and_bom(tmp_path):
    text = "\ufeff" + _csv(ROWS).replace("\n", "\r\n") + "\r\n\r\n"
    p = tmp_path / "ratings.csv"
    p.write_bytes(text.encode("utf-8"))
    h = load_movielens(p)
    assert _as_lists(h.items) == EXPECTED_ITEMS
    assert _as_lists(h.timestamps) == EXPECTED_TIMESTAMPS


def test_load_movielens_buckets_half_stars_to_0_through_9(tmp_path):
    stars = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    rows = "".join(f"1,{i},{s},{i}\n" for i, s in enumerate(stars))
    h = load_movielens(_write(tmp_path, "userId,movieId,rating,timestamp\n" + rows))
    assert _as_lists(h.ratings) == [list(range(10))]
    assert _as_lists(h.items) == [list(range(1, 11))]


def test_load_movielens_min_length_drops_short_users_before_remapping(tmp_path):
    rows = ROWS + [(3, 99, 5, 70)]
    h = load_movielens(_write(tmp_path, _dat(rows)), min_length=4)
    # Only user 3 is left; its items are renumbered from 1 among the kept data alone.
    assert _as_lists(h.items) == [[1, 2, 3, 4]]
    assert _as_lists(h.timestamps) == [[40, 50, 60, 70]]
    assert h.num_items == 4
    assert history_lengths(_write(tmp_path, _dat(rows), name="b.dat")).tolist() == [3, 4, 3]
    assert history_lengths(_write(tmp_path, _dat(rows), name="c.dat"), min_length=4).tolist() == [4]


def _reference_load(rows, min_length):
    """Straightforward per-user Python version of the loader's contract."""
    by_user: dict[int, list[tuple[int, int, float, int]]] = {}
    for pos, (u, i, r, t) in enumerate(rows):
        by_user.setdefault(u, []).append((t, pos, i, r))
    kept = [sorted(v) for _, v in sorted(by_user.items()) if len(v) >= min_length]
    ids: dict[int, int] = {}
    items, ratings, stamps = [], [], []
    for seq in kept:
        items.append([ids.setdefault(i, len(ids) + 1) for _, _, i, _ in seq])
        ratings.append([min(max(round(r * 2) - 1, 0), 9) for _, _, _, r in seq])
        stamps.append([t for t, _, _, _ in seq])
    return items, ratings, stamps, len(ids)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.tuples(
            st.integers(1, 6),
            st.integers(1, 12),
            st.sampled_from([0.5, 1.0, 2.5, 3.0, 4.5, 5.0]),
            st.integers(0, 4),  # few distinct timestamps: many ties
        ),
        min_size=1,
        max_size=40,
    ),
    min_length=st.integers(2, 4),
)
def test_load_movielens_matches_a_per_user_reference(tmp_path, rows, min_length):
    path = _write(tmp_path, _csv(rows))
    want_items, want_ratings, want_ts, want_n = _reference_load(rows, min_length)
    if not want_items:
        with pytest.raises(ValueError, match="no user has at least"):
            load_movielens(path, min_length=min_length)
        return
    h = load_movielens(path, min_length=min_length)
    assert _as_lists(h.items) == want_items
    assert _as_lists(h.ratings) == want_ratings
    assert _as_lists(h.timestamps) == want_ts
    assert h.num_items == want_n


# --------------------------------------------------------------------------- loader errors


def test_load_movielens_rejects_min_length_below_2(tmp_path):
    with pytest.raises(ValueError, match="min_length must be >= 2"):
        load_movielens(_write(tmp_path, _csv(ROWS)), min_length=1)


def test_load_movielens_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "ratings.csv"
    with pytest.raises(FileNotFoundError, match="not found") as e:
        load_movielens(missing)
    assert str(missing) in str(e.value)


def test_load_movielens_directory_names_the_path(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory") as e:
        load_movielens(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_load_movielens_empty_file_raises(tmp_path, text):
    p = _write(tmp_path, text)
    with pytest.raises(ValueError, match="is empty") as e:
        load_movielens(p)
    assert str(p) in str(e.value)


def test_load_movielens_header_without_rows_raises(tmp_path):
    p = _write(tmp_path, "userId,movieId,rating,timestamp\n")
    with pytest.raises(ValueError, match="header but no rating lines") as e:
        load_movielens(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize(
    ("fmt", "bad_line", "lineno", "reason"),
    [
        ("csv", "1,5,abc,100", 3, "numeric rating"),  # header is line 1
        ("csv", "1,5,4.0", 3, "expected 4 fields"),
        ("csv", "1,5,nan,100", 3, "not a finite number"),
        ("dat", "1::5::4::1.5e9", 2, "integer user, item and timestamp"),
        ("udata", "1\t5\t4 100", 2, "expected 4 fields"),
    ],
)
def test_load_movielens_malformed_line_names_line_number_and_shows_line(tmp_path, fmt, bad_line, lineno, reason):
    good = WRITERS[fmt](ROWS).splitlines()
    first_data = 1 if fmt == "csv" else 0
    # The bad line goes right after the first data line; lines after it are fine.
    lines = good[: first_data + 1] + [bad_line] + good[first_data + 1 :]
    p = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=reason) as e:
        load_movielens(p)
    msg = str(e.value)
    assert f"line {lineno}:" in msg
    assert repr(bad_line) in msg
    assert str(p) in msg


def test_load_movielens_line_numbers_count_blank_lines(tmp_path):
    p = _write(tmp_path, "1::2::3::4\n\n\n1::x::3::4\n")
    with pytest.raises(ValueError, match="line 4:"):
        load_movielens(p)


@pytest.mark.parametrize(
    "first_line",
    [
        "hello world",
        "1,2,3.0,4",  # a csv without the MovieLens header
        "user;item;rating;timestamp",
    ],
)
def test_load_movielens_unknown_format_lists_supported_formats(tmp_path, first_line):
    p = _write(tmp_path, first_line + "\n1,2,3.0,4\n")
    with pytest.raises(ValueError, match="unknown ratings format") as e:
        load_movielens(p)
    msg = str(e.value)
    for name in ("ratings.csv", "ratings.dat", "u.data"):
        assert name in msg
    assert str(p) in msg


def test_load_movielens_no_user_left_after_min_length_raises(tmp_path):
    p = _write(tmp_path, _udata(ROWS))
    with pytest.raises(ValueError, match="no user has at least min_length=4") as e:
        load_movielens(p, min_length=4)
    assert str(p) in str(e.value)


# --------------------------------------------------------------------------- Histories


def test_histories_rejects_ragged_fields():
    a = np.array([1, 2], dtype=np.int64)
    with pytest.raises(ValueError, match="one items, ratings and timestamps array per user"):
        Histories(items=[a, a], ratings=[a], timestamps=[a, a], num_items=2, num_ratings=10)
    with pytest.raises(ValueError, match="user 1: items, ratings and timestamps differ in length"):
        Histories(items=[a, a], ratings=[a, a[:1]], timestamps=[a, a], num_items=2, num_ratings=10)


# --------------------------------------------------------------------------- synthetic


def _same(a: Histories, b: Histories) -> bool:
    return (
        a.num_items == b.num_items
        and a.num_ratings == b.num_ratings
        and len(a) == len(b)
        and all(
            np.array_equal(x, y)
            for f in ("items", "ratings", "timestamps")
            for x, y in zip(getattr(a, f), getattr(b, f))
        )
    )


@pytest.mark.parametrize("lengths", ["lognormal", "zipf"])
def test_synthetic_histories_is_deterministic_per_seed(lengths):
    kw = dict(num_users=50, num_items=300, lengths=lengths)
    assert _same(synthetic_histories(seed=7, **kw), synthetic_histories(seed=7, **kw))
    assert not _same(synthetic_histories(seed=7, **kw), synthetic_histories(seed=8, **kw))


@pytest.mark.parametrize(
    ("lengths", "num_users"),
    [("lognormal", 2000), ("zipf", 20000)],  # Zipf(1.5) sample means converge slowly: more users
)
def test_synthetic_histories_lengths_are_heavy_tailed_bounded_and_average_mean_length(lengths, num_users):
    h = synthetic_histories(
        num_users=num_users, num_items=1000, seed=0, lengths=lengths, mean_length=50.0, max_length=2000, min_length=3
    )
    lens = h.lengths()
    assert len(h) == num_users and lens.dtype == np.int64
    assert lens.min() >= 3 and lens.max() <= 2000
    assert lens.max() / np.median(lens) > 3
    assert abs(lens.mean() - 50.0) < 0.25 * 50.0


@pytest.mark.parametrize("lengths", ["lognormal", "zipf"])
def test_synthetic_histories_items_ratings_and_timestamps_are_valid(lengths):
    h = synthetic_histories(num_users=300, num_items=500, seed=3, lengths=lengths, num_ratings=5, max_length=400)
    items = np.concatenate(h.items)
    assert h.num_items == 500 and h.num_ratings == 5
    assert items.dtype == np.int64 and items.min() >= 1 and items.max() <= 500
    ratings = np.concatenate(h.ratings)
    assert ratings.min() >= 0 and ratings.max() <= 4
    for ts in h.timestamps:
        assert ts.dtype == np.int64
        assert (np.diff(ts) >= 0).all()
    # Zipf popularity: the most popular item is far above the uniform share.
    counts = np.bincount(items, minlength=501)[1:]
    assert counts.max() > 10 * len(items) / 500


def test_synthetic_histories_equal_bounds_give_fixed_length():
    h = synthetic_histories(num_users=20, num_items=10, seed=0, min_length=5, max_length=5)
    assert h.lengths().tolist() == [5] * 20


def test_synthetic_histories_warns_when_mean_length_is_out_of_bounds(caplog):
    with caplog.at_level("WARNING", logger="examples.hstu.data"):
        h = synthetic_histories(num_users=200, num_items=10, seed=0, mean_length=500.0, max_length=100)
    assert "mean_length=500.0 is outside" in caplog.text
    assert h.lengths().max() <= 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lengths="pareto"), "lengths must be one of 'lognormal', 'zipf'"),
        (dict(num_users=0), "num_users must be >= 1"),
        (dict(num_items=0), "num_items must be >= 1"),
        (dict(min_length=1), "min_length must be >= 2"),
        (dict(min_length=10, max_length=5), "max_length must be >= min_length=10"),
        (dict(mean_length=0.0), "mean_length must be > 0"),
        (dict(mean_length=float("nan")), "mean_length must be > 0"),
        (dict(num_ratings=0), "num_ratings must be >= 1"),
    ],
)
def test_synthetic_histories_rejects_bad_arguments(kwargs, message):
    args = dict(num_users=10, num_items=10, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        synthetic_histories(**args)


# --------------------------------------------------------------------------- leave-one-out


def test_leave_one_out_keeps_prefixes_and_returns_last_items(tmp_path):
    for h in (
        load_movielens(_write(tmp_path, _csv(ROWS))),
        synthetic_histories(num_users=40, num_items=100, seed=1, lengths="zipf"),
    ):
        train, targets = leave_one_out(h)
        assert targets.dtype == np.int64 and targets.shape == (len(h),)
        assert (train.lengths() == h.lengths() - 1).all()
        assert train.num_items == h.num_items and train.num_ratings == h.num_ratings
        for u in range(len(h)):
            n = len(h.items[u]) - 1
            assert np.array_equal(train.items[u], h.items[u][:n])
            assert np.array_equal(train.ratings[u], h.ratings[u][:n])
            assert np.array_equal(train.timestamps[u], h.timestamps[u][:n])
            assert targets[u] == h.items[u][-1]
    _, targets = leave_one_out(load_movielens(_write(tmp_path, _csv(ROWS))))
    assert targets.tolist() == [3, 1, 6]


def test_leave_one_out_rejects_users_with_fewer_than_two_interactions():
    one = np.array([1], dtype=np.int64)
    two = np.array([1, 2], dtype=np.int64)
    h = Histories(items=[two, one], ratings=[two, one], timestamps=[two, one], num_items=2, num_ratings=10)
    with pytest.raises(ValueError, match=r"needs at least 2 interactions per user; 1 user\(s\).*user 1 with 1"):
        leave_one_out(h)

