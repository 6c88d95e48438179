"""fsc.TrainPipeline on real gloo ranks with a small jagged model: the pipelined step (the next
batch's rows fetched during this step, stale ones refetched, dense gradients all-reduced
inside the compiled backward) trains exactly like the plain synchronous loop; the ranks stop
together; a checkpoint resumes; what it cannot train exactly is refused, naming the cause."""

from __future__ import annotations

import io
import re

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

import fsc
from fsc.runtime.embedding import RowShardedEmbedding, TrainPipelineError

ROWS, DIM = 61, 8  # 61: the last shard has padding rows at 2 and 4 ranks


class Pooled(nn.Module):
    """Per sample: the sum of its items' rows (jagged: ``segment`` says which sample each id
    belongs to) through an MLP, regressed on ``y``; two tables, one read twice per sample."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.item = RowShardedEmbedding(ROWS, DIM, seed=1, std=0.3)
        self.tag = RowShardedEmbedding(7, DIM, seed=2, std=0.3)
        self.mlp = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, 1))

    def loss(self, item_rows, tag_rows, ids, segment, tags, y):
        pooled = torch.zeros(y.shape[0], DIM, dtype=item_rows.dtype).index_add(0, segment, item_rows)
        return ((self.mlp(pooled + tag_rows).squeeze(1) - y) ** 2).sum()

    def forward(self, ids, segment, tags, y):
        return self.loss(self.item(ids), self.tag(tags), ids, segment, tags, y)


def lookups(inputs):
    return {"item": inputs[0], "tag": inputs[2]}


def loss(model, inputs, rows):
    return model.loss(rows["item"], rows["tag"], *inputs)


def batch(rank: int, step: int, samples: int = 3):
    """Jagged: 1..6 ids per sample (so the id count changes every step), ids drawn from a
    small table, so consecutive batches share rows (the stale-row path runs)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(1, 7, (samples,), generator=g)
    ids = torch.randint(0, ROWS, (int(lengths.sum()),), generator=g)
    return (ids, torch.repeat_interleave(torch.arange(samples), lengths), torch.randint(0, 7, (samples,), generator=g),
            torch.randn(samples, generator=g))


def optimizers(model: Pooled, table: str = "sgd"):
    tables = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.3), "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.3),
              "rowwise": lambda ps: fsc.RowWiseAdagrad(ps, lr=0.3)}
    return [torch.optim.Adam(model.mlp.parameters(), lr=1e-2), tables[table]([model.item.weight, model.tag.weight])]


def sync_losses(rank: int, steps: int, table: str) -> tuple[list[float], Pooled]:
    """The plain loop: forward (synchronous lookups), backward, all-reduce, step."""
    import torch.distributed as dist

    model = Pooled()
    opts = optimizers(model, table)
    losses = []
    for step in range(steps):
        out = model(*batch(rank, step))
        out.backward()
        for p in model.mlp.parameters():
            dist.all_reduce(p.grad)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        losses.append(out.item())
    return losses, model


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _equal_worker(rank: int, world: int, backend, table: str, sm_free: bool = False, bucket_mb: float = 4.0):
    from torch._dynamo.utils import counters

    steps = 7
    ref, ref_model = sync_losses(rank, steps, table)
    torch._dynamo.reset()
    counters.clear()
    model = Pooled()
    options = {"inner": "eager"} if backend == "freescale" else None
    if sm_free:  # the default passes, then the all-reduces and all-to-alls on the copy-engine transport
        options["passes"] = fsc.Config.from_options().pipeline + ",sm-free-collectives"
    pipe = fsc.TrainPipeline(model, optimizers(model, table), lookups=lookups, loss=loss, backend=backend,
                             options=options, bucket_mb=bucket_mb)
    batches = (batch(rank, step) for step in range(steps))
    losses, stale = [], 0
    while True:
        if pipe._state is not None:
            stale += sum(int(s.stale.sum()) for s in pipe._state.values())
        try:
            losses.append(pipe.progress(batches).item())
        except StopIteration:
            break
    out = {"ref": ref, "got": losses, "params": _max_diff(model, ref_model), "stale": stale,
           "graphs": counters["stats"]["unique_graphs"]}
    if backend == "freescale":
        record = fsc.last_compile()
        forward = record.graph("forward").graph_after
        issued = re.findall(r"(all_to_all_single\w*): .*_c10d_functional\.all_to_all_single\.default\(", forward)
        waited = dict(re.findall(r"(wait_tensor\w*): .*_c10d_functional\.wait_tensor\.default\((\w+)\)", forward))
        first = {v: k for k, v in waited.items()}.get(issued[0]) if issued else None
        # the first collective issued is a refetch: its rows go straight into this batch's rows
        out["first_issued_feeds_rows"] = bool(first) and bool(
            re.search(rf"masked_scatter\.default\([^)]*\b{first}\b", forward))
        text = record.graph("backward").graph_after
        out["backward_collectives"] = re.findall(r"_c10d_functional\.(all_reduce|all_to_all_single)\.default\(", text)
        out["backward_fsc"] = len(re.findall(r"fsc\.all_to_all_single\.default\(", text))
        out["buckets"] = len(pipe.buckets)
        out["reduced_sizes"] = [int(n) for n in re.findall(
            r"f32\[(\d+)\][^\n]*_c10d_functional\.all_reduce\.default\(", text)]
        dense = list(pipe.dense.values())
        out["bucket_sizes"] = [sum(dense[i].numel() for i in bucket) for bucket in pipe.buckets]
    return out


@pytest.mark.ranks
@pytest.mark.parametrize("world,backend,table,bucket_mb", [(2, None, "sgd", 4.0), (2, "freescale", "adagrad", 4.0),
                                                           (4, "freescale", "rowwise", 1e-6)])
def test_pipelined_step_equals_the_synchronous_loop(world, backend, table, bucket_mb):
    for rank, out in enumerate(run_ranks(_equal_worker, world, backend, table, False, bucket_mb)):
        assert len(out["got"]) == len(out["ref"]) == 7
        assert out["got"] == pytest.approx(out["ref"], rel=1e-5, abs=1e-6), rank
        assert out["params"] < 1e-5, rank
        assert out["stale"] > 0, "no prefetched row was stale: the refetch path did not run"
        if backend == "freescale":
            assert out["graphs"] == 1, f"recompiled: {out['graphs']} graphs"
            # the dense gradients' buckets are reduced inside the compiled backward, beside the
            # rows' gradients going back to their owners (one all-to-all per table)
            assert out["backward_collectives"].count("all_reduce") == out["buckets"] >= 1
            assert out["backward_collectives"].count("all_to_all_single") == 2
            # bucket 0 (the last parameters, whose gradients come first) is reduced first
            assert out["reduced_sizes"] == out["bucket_sizes"], out
            # what batch i waits on first goes first: the refetch of its stale rows, before the
            # next batch's exchange
            assert out["first_issued_feeds_rows"]


@pytest.mark.ranks
def test_pipelined_step_with_sm_free_all_reduces_equals_the_synchronous_loop():
    """sm-free-collectives turns each bucket's all-reduce into two copy-engine all-to-alls
    and a sum: the same training, within rounding."""
    for rank, out in enumerate(run_ranks(_equal_worker, 2, "freescale", "adagrad", True)):
        assert out["got"] == pytest.approx(out["ref"], rel=1e-5, abs=1e-6), rank
        assert out["params"] < 1e-5, rank
        assert out["graphs"] == 1
        assert "all_reduce" not in out["backward_collectives"], out["backward_collectives"]
        assert out["backward_fsc"] >= 2 * out["buckets"] >= 2


def _distinct_worker(rank: int, world: int):
    import torch.distributed as dist

    table = RowShardedEmbedding(ROWS, DIM, seed=3, std=0.3)
    full = table.full_weight()
    ids = torch.tensor([5, 1, 5, 5, 40, 1, 0, 5, 59, 40]) + rank  # repeats, on both ranks' shards
    state = table.prefetch(ids, None)
    rows = table.pipelined(state)
    weights = torch.randn(ids.shape[0], DIM, generator=torch.Generator().manual_seed(rank))
    (rows * weights).sum().backward()
    # what a plain lookup of the whole table gets, summed over the ranks, on this rank's shard
    expected = torch.zeros(table.rows_per_rank * world, DIM).index_add(0, ids, weights)
    dist.all_reduce(expected)
    mine = expected[rank * table.rows_per_rank : (rank + 1) * table.rows_per_rank]
    return {"sent": int(state.send_counts.sum()), "distinct": int(ids.unique().numel()),
            "rows": float((rows - full[ids]).abs().max()), "grad": float((table.weight.grad - mine).abs().max())}


@pytest.mark.ranks
def test_prefetch_sends_each_distinct_id_once_and_sums_its_gradient_before_it_goes_back():
    for rank, out in enumerate(run_ranks(_distinct_worker, 2)):
        assert out["sent"] == out["distinct"] + 2, (rank, out)  # + the 2 padding lookups
        assert out["rows"] == 0.0, rank
        assert out["grad"] < 1e-6, rank


def _uneven_worker(rank: int, world: int):
    """Rank 0 has 3 batches, rank 1 has 5, and rank 1's second batch is empty."""
    model = Pooled()
    pipe = fsc.TrainPipeline(model, optimizers(model), lookups=lookups, loss=loss, backend=None)
    count = 3 if rank == 0 else 5

    def batches():
        for step in range(count):
            yield batch(rank, step, samples=0 if (rank == 1 and step == 1) else 3)

    it, losses = batches(), []
    while True:
        try:
            losses.append(pipe.progress(it).item())
        except StopIteration:
            break
    with pytest.raises(StopIteration):  # and it stays stopped
        pipe.progress(it)
    return losses


@pytest.mark.ranks
def test_ranks_stop_together_when_one_runs_out():
    losses = run_ranks(_uneven_worker, 2, timeout=120)
    assert [len(x) for x in losses] == [3, 3]
    assert losses[1][1] == 0.0  # the empty batch trained (nothing) without hanging its peer


def _resume_worker(rank: int, world: int):
    steps, cut = 6, 3

    def fresh():
        model = Pooled()
        opts = optimizers(model, "adagrad")
        return model, opts, fsc.TrainPipeline(model, opts, lookups=lookups, loss=loss, backend=None)

    model, opts, pipe = fresh()
    it = (batch(rank, s) for s in range(steps))
    whole = [pipe.progress(it).item() for _ in range(steps)]

    model, opts, pipe = fresh()
    it = (batch(rank, s) for s in range(steps))
    first = [pipe.progress(it).item() for _ in range(cut)]  # pulled batch `cut` already
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opts": [o.state_dict() for o in opts], "pipe": pipe.state_dict()},
               buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model, opts, pipe = fresh()
    with torch.no_grad():  # scramble, so the restore has to do the work
        for p in model.parameters():
            p.add_(1.0)
    model.load_state_dict(saved["model"])
    for opt, state in zip(opts, saved["opts"]):
        opt.load_state_dict(state)
    pipe.load_state_dict(saved["pipe"])
    it = (batch(rank, s) for s in range(cut + 1, steps))  # the loader resumes after the pulled batch
    rest = [pipe.progress(it).item() for _ in range(steps - cut)]
    return whole, first + rest


@pytest.mark.ranks
def test_checkpoint_mid_pipeline_resumes_with_the_same_losses():
    for whole, resumed in run_ranks(_resume_worker, 2):
        assert resumed == pytest.approx(whole, rel=1e-6)


# ----------------------------------------------------------------------- refusals (one process)


@pytest.mark.parametrize("make,words", [
    (lambda ps: torch.optim.Adam(ps), "Adam"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "momentum=0.9"),
    (lambda ps: torch.optim.Adagrad(ps, weight_decay=0.1), "weight_decay=0.1"),
])
def test_an_optimizer_that_moves_untouched_rows_is_refused(make, words):
    model = Pooled()
    opts = [torch.optim.Adam(model.mlp.parameters()), make([model.item.weight, model.tag.weight])]
    with pytest.raises(TrainPipelineError, match=f"table 'item'.*{words}"):
        fsc.TrainPipeline(model, opts, lookups=lookups, loss=loss, backend=None)


def test_a_table_without_an_optimizer_is_refused():
    model = Pooled()
    with pytest.raises(TrainPipelineError, match="table 'item'.*none of the optimizers"):
        fsc.TrainPipeline(model, [torch.optim.Adam(model.mlp.parameters())], lookups=lookups, loss=loss, backend=None)


def test_a_second_lookup_inside_the_loss_names_the_table():
    model = Pooled()

    def twice(model, inputs, rows):  # reads the item table again, with ids the pipeline never saw
        return loss(model, inputs, rows) + model.item(inputs[0] + 1).sum()

    pipe = fsc.TrainPipeline(model, optimizers(model), lookups=lookups, loss=twice, backend=None)
    with pytest.raises(TrainPipelineError, match="table 'item' is looked up inside the pipelined step"):
        pipe.progress(iter([batch(0, 0), batch(0, 1)]))
    assert model.item.in_pipeline is None  # left usable outside the pipeline


def test_lookups_must_name_every_table():
    model = Pooled()
    pipe = fsc.TrainPipeline(model, optimizers(model), lookups=lambda inputs: {"item": inputs[0]}, loss=loss,
                             backend=None)
    with pytest.raises(TrainPipelineError, match=r"exactly the model's tables \['item', 'tag'\]"):
        pipe.progress(iter([batch(0, 0)]))


def test_one_process_trains_like_the_plain_loop():
    ref, ref_model = [], Pooled()
    opts = optimizers(ref_model)
    for step in range(4):
        out = ref_model(*batch(0, step))
        out.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        ref.append(out.item())
    model = Pooled()
    pipe = fsc.TrainPipeline(model, optimizers(model), lookups=lookups, loss=loss, backend=None)
    it = (batch(0, step) for step in range(4))
    assert [pipe.progress(it).item() for _ in range(4)] == pytest.approx(ref, rel=1e-6)
    assert _max_diff(model, ref_model) < 1e-6


def test_rowwise_adagrad_leaves_untouched_rows_exactly():
    w = nn.Parameter(torch.randn(5, 3))
    before = w.detach().clone()
    opt = fsc.RowWiseAdagrad([w], lr=0.5)
    w.grad = torch.zeros(5, 3)
    w.grad[2] = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    assert torch.equal(w[[0, 1, 3, 4]], before[[0, 1, 3, 4]])
    # s = mean(g^2) = 1.75; w -= 0.5 * g / sqrt(1.75)
    assert torch.allclose(w[2], before[2] - 0.5 * w.grad[2] / (1.75**0.5 + 1e-8))
