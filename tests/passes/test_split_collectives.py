"""split-collectives on traced graphs. Structure is checked without a process group; values
run for real on a one-rank gloo group in this process (a one-rank all-to-all is a copy,
so chunking and reassembly are exercised end to end; several ranks: tests/examples)."""

from __future__ import annotations


import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fsc
from fsc.analysis.collectives import find_collectives
from fsc.analysis.cost_model import DEVICE_PROFILES, CostModel
from fsc.graph_utils import clone_graph_module
from fsc.passes import SplitCollectives

c10d = torch.ops._c10d_functional


@pytest.fixture(scope="module")
def group(one_rank_group):
    return one_rank_group


def ctx() -> fsc.PassContext:
    return fsc.PassContext(graph_kind="forward", cost_model=CostModel(DEVICE_PROFILES["cpu"]), memory_budget_bytes=None)


def split(gm, **options) -> fsc.PassResult:
    result = SplitCollectives(min_bytes=0, force=True, **options).run(gm, ctx())
    gm.graph.lint()
    gm.recompile()
    return result


def exchanges(gm) -> int:
    return len(find_collectives(gm.graph))


def lookup_round_trip(group):
    """A sharded lookup: ids out, rows looked up and projected per row, rows back; the
    split sizes come from the data (unbacked SymInts)."""

    def f(ids, counts, table, w):
        sizes = counts.tolist()
        for s in sizes:
            torch._check(s >= 0)
        wanted = c10d.wait_tensor(c10d.all_to_all_single(ids, sizes, sizes, group))
        rows = torch.relu(torch.nn.functional.embedding(wanted - 0, table) @ w)
        back = c10d.wait_tensor(c10d.all_to_all_single(rows, sizes, sizes, group))
        return back * 2.0, rows.sum()

    return f


def inputs(n: int = 11):
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, 20, (n,), generator=gen), torch.tensor([n]), torch.randn(20, 8, generator=gen),
            torch.randn(8, 8, generator=gen))


@pytest.mark.parametrize("chunks", [2, 3])
def test_split_collectives_chunks_a_lookup_round_trip_and_keeps_values(group, chunks):
    args = inputs()
    gm = make_fx(lookup_round_trip(group), tracing_mode="symbolic")(*args)
    original = clone_graph_module(gm)
    result = split(gm, chunks=chunks)
    assert result.modified is True
    assert result.stats["split"] == 1
    assert exchanges(gm) == 2 * chunks  # the exchange and its reverse, each in k chunks
    for got, want in zip(gm(*args), original(*args)):
        assert torch.equal(got, want)
    # other data: the chunk sizes are computed in the graph from the data-dependent sizes
    for n in (0, 1, 2, 7):
        other = inputs(n)
        for got, want in zip(gm(*other), original(*other)):
            assert torch.equal(got, want)


def test_split_collectives_copies_the_row_wise_region_once_per_chunk(group):
    gm = make_fx(lookup_round_trip(group), tracing_mode="symbolic")(*inputs())
    split(gm, chunks=2)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.embedding.default) == 2
    assert targets.count(torch.ops.aten.mm.default) == 2
    # rows.sum() mixes rows: it reads the chunks concatenated back, once
    assert targets.count(torch.ops.aten.cat.default) == 2


def test_split_collectives_is_deterministic(group):
    first = make_fx(lookup_round_trip(group), tracing_mode="symbolic")(*inputs())
    second = make_fx(lookup_round_trip(group), tracing_mode="symbolic")(*inputs())
    split(first)
    split(second)
    assert first.code == second.code


def test_split_collectives_declines_when_the_first_consumer_mixes_rows(group):
    def f(x, perm):
        y = c10d.wait_tensor(c10d.all_to_all_single(x, [8], [8], group))
        return y.index_select(0, perm).sum(0)

    gm = make_fx(f, tracing_mode="fake")(torch.randn(8, 4), torch.arange(8))
    code = gm.code
    result = split(gm)
    assert result.modified is False
    assert gm.code == code
    assert "index_select" in result.reasons[0] and "mixes rows" in result.reasons[0]


def test_split_collectives_names_the_op_after_a_flat_exchange_is_regrouped(group):
    # TorchRec's sequence embedding exchange: flat [rows * D] floats, viewed as [rows, D], then
    # put back in feature order by index_select
    def f(x, perm):
        y = c10d.wait_tensor(c10d.all_to_all_single(x, [32], [32], group))
        return y.view(-1, 4).index_select(0, perm)

    gm = make_fx(f, tracing_mode="fake")(torch.randn(32), torch.arange(8))
    result = split(gm)
    assert result.modified is False
    assert result.reasons == (
        "all_to_all_single not split: its rows are regrouped into [8, 4] by view (aten.view.default), then "
        "index_select (aten.index_select.default) mixes those rows; no work could start on the first chunk",)


def test_split_collectives_declines_when_split_sizes_are_implicit(group):
    def f(x):
        return c10d.wait_tensor(c10d.all_to_all_single(x, [], [], group)).relu()

    gm = make_fx(f, tracing_mode="fake")(torch.randn(8, 4))
    result = split(gm)
    assert result.modified is False
    assert "split sizes unknown" in result.reasons[0]


def test_split_collectives_declines_small_messages_by_default(group):
    def f(x):
        return c10d.wait_tensor(c10d.all_to_all_single(x, [64], [64], group)).relu()

    gm = make_fx(f, tracing_mode="fake")(torch.randn(64, 16))
    result = SplitCollectives().run(gm, ctx())
    assert result.modified is False
    assert "moves about 4096 bytes, below min_bytes=1048576" in result.reasons[0]


def test_split_collectives_declines_graph_without_all_to_all():
    gm = make_fx(lambda a: a.relu(), tracing_mode="fake")(torch.randn(4))
    result = split(gm)
    assert result.modified is False and result.reasons == ("no collectives in the graph",)


def test_split_collectives_splits_row_aligned_operands_alongside(group):
    def f(x, scale, w):
        y = c10d.wait_tensor(c10d.all_to_all_single(x, [6], [6], group))
        return (y * scale + w).relu()  # scale: one value per row; w: broadcast over rows

    args = (torch.randn(6, 4), torch.randn(6, 1), torch.randn(4))
    gm = make_fx(f, tracing_mode="fake")(*args)
    original = clone_graph_module(gm)
    result = split(gm)
    assert result.modified is True and exchanges(gm) == 2
    assert torch.equal(gm(*args), original(*args))


def test_split_collectives_accumulates_a_sharded_tables_gradient_per_chunk(group):
    """The backward of a sharded lookup: gradient rows arrive, are scattered into the table's
    gradient. Per chunk, each accumulating into the last: equal up to fp32 reassociation."""

    def f(grad_rows, ids):
        rows = c10d.wait_tensor(c10d.all_to_all_single(grad_rows, [9], [9], group))
        dense = torch.ops.aten.embedding_dense_backward(rows, ids, 20, -1, False)
        summed = torch.zeros(20, 4).index_put([ids], rows * 0.5, accumulate=True)
        return dense, summed

    gen = torch.Generator().manual_seed(1)
    args = (torch.randn(9, 4, generator=gen), torch.randint(0, 20, (9,), generator=gen))
    gm = make_fx(f, tracing_mode="fake")(*args)
    original = clone_graph_module(gm)
    result = split(gm)
    assert result.modified is True and exchanges(gm) == 2
    rtol, atol = SplitCollectives.tolerance
    for got, want in zip(gm(*args), original(*args)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_split_collectives_leaves_plain_index_put_alone(group):
    def f(rows, ids):
        y = c10d.wait_tensor(c10d.all_to_all_single(rows, [5], [5], group))
        return torch.zeros(20, 4).index_put([ids], y)  # overwrite: duplicates would race across chunks

    gm = make_fx(f, tracing_mode="fake")(torch.randn(5, 4), torch.arange(5))
    result = split(gm)
    assert result.modified is False and "mixes rows" in result.reasons[0]


@pytest.mark.parametrize("option,value", [("chunks", 1), ("chunks", 2.5), ("min_bytes", -1)])
def test_split_collectives_rejects_bad_options(option, value):
    with pytest.raises(fsc.OptionError, match=option):
        SplitCollectives(**{option: value})


def test_split_collectives_declines_when_the_estimate_says_it_does_not_pay(group):
    def f(x, w):  # little row-wise work behind a large exchange: chunking only adds latency
        return c10d.wait_tensor(c10d.all_to_all_single(x, [4096], [4096], group)).relu().sum()

    gm = make_fx(f, tracing_mode="fake")(torch.randn(4096, 256), torch.randn(4))
    result = SplitCollectives(min_bytes=0).run(gm, ctx())
    assert result.modified is False
    assert "estimated not to pay on cpu" in result.reasons[0]


def test_split_collectives_parses_from_a_pipeline_string():
    (p,) = fsc.parse_pipeline("split-collectives{chunks=4,min_bytes=0}")
    assert isinstance(p, SplitCollectives) and p.chunks == 4 and p.min_bytes == 0
