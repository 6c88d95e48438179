"""The HSTU example trained by :class:`fsc.TrainPipeline` (``examples.hstu.train.pipeline``)
on real gloo ranks: batch i+1's item rows prefetched during step i, stale ones refetched,
the dense gradients all-reduced inside the compiled backward, trains exactly like the plain
synchronous loop (:class:`examples.hstu.train.Trainer`: eager forward, backward, the
bucketed all-reduce, the optimizers) on the same jagged batches, with and without the
balancer routing each step's samples; and ``train.py --pipeline`` runs under torchrun."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from dist_harness import run_ranks
from test_hstu_model import NUM_ITEMS, config, step_batches

from examples.hstu.model import HSTU, model_inputs, sample_cost, scale_tensor

STEPS = 5
LR = 1e-3


def _batches(rank: int, world: int, cfg, steps: int, router=None, seen: list | None = None,
             moved: list | None = None):
    """Each step's model inputs on this rank, made when pulled (the pipeline pulls batch i+1
    before it trains batch i): the step's batch as the loader reads it, routed to the rank the
    balancer assigns each sample to (``router``), with the global trained-token count as
    ``train.py`` computes it (an all-reduce). ``seen`` collects copies of what was yielded,
    ``moved`` whether routing changed this rank's samples."""
    import torch.distributed as dist

    from examples.hstu.routing import route_batch

    pending = None
    for step in range(steps):
        batch = step_batches(step, world, cfg)[0][rank]
        if router is not None:
            if pending is None:
                pending = router.plan_async((batch.offsets[1:] - batch.offsets[:-1]).numpy())
            plan = pending.result()
            if step + 1 < steps:  # the next plan is made while this batch waits to be trained
                ahead = step_batches(step + 1, world, cfg)[0][rank]
                pending = router.plan_async((ahead.offsets[1:] - ahead.offsets[:-1]).numpy())
            routed = route_batch(router, batch, plan)
            if moved is not None:
                moved.append(not torch.equal(routed.keys, batch.keys))
            batch = routed
        trained = torch.tensor([float((batch.targets > 0).sum())])
        dist.all_reduce(trained)
        inputs = model_inputs(batch, scale_tensor(trained.item()), cfg)
        if seen is not None:
            seen.append([t.clone() for t in inputs])
        yield inputs


def _router(world: int, cfg, balance: bool):
    from examples.hstu.train import make_router

    return make_router("freescale", sample_cost(cfg), world) if balance else None


def _worker(rank: int, world: int, cfg_kw: dict, table: str, inner: str, balance: bool):
    from torch._dynamo.utils import counters

    from examples.hstu.train import Trainer, make_optimizers, pipeline

    cfg = config(**cfg_kw)
    # the reference: Trainer's synchronous step (eager), on the same batches, same optimizers
    trainer = Trainer.create(cfg, lr=LR, table_optimizer=table)
    router = _router(world, cfg, balance)
    ref_inputs: list = []
    ref = [trainer.step(inputs).item() for inputs in _batches(rank, world, cfg, STEPS, router, ref_inputs)]
    trainer.close()
    if router is not None:
        router.close()

    torch._dynamo.reset()
    counters.clear()
    model = HSTU(cfg)
    pipe = pipeline(model, make_optimizers(model, LR, table), backend="freescale", options={"inner": inner})
    router = _router(world, cfg, balance)
    got_inputs, moved = [], []
    batches = _batches(rank, world, cfg, STEPS, router, got_inputs, moved)
    got, stale, graphs = [], 0, []
    while True:
        if pipe._state is not None:
            stale += int(pipe._state["item"].stale.sum())
        try:
            got.append(pipe.progress(batches).item())
        except StopIteration:
            break
        graphs.append(counters["stats"]["unique_graphs"])
    if router is not None:
        router.close()
    same_batches = len(ref_inputs) == len(got_inputs) and all(
        len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(ref_inputs, got_inputs))
    ref_params = dict(trainer.model.named_parameters())
    params = {name: (p - ref_params[name]).abs().max().item() for name, p in model.named_parameters()}
    return {"ref": ref, "got": got, "params": params, "stale": stale, "graphs": graphs,
            "same_batches": same_batches, "moved": moved}


def _check(results, steps: int = STEPS):
    for rank, out in enumerate(results):
        assert out["same_batches"], f"rank {rank}: the pipeline trained other batches than the reference"
        assert len(out["got"]) == len(out["ref"]) == steps, rank
        assert out["got"] == pytest.approx(out["ref"], rel=1e-5, abs=1e-7), rank
        worst = max(out["params"].values())
        assert worst < 1e-5, (rank, {k: v for k, v in out["params"].items() if v >= 1e-5})
        assert out["stale"] > 0, "no prefetched row was stale: the refetch path did not run"


@pytest.mark.ranks
@pytest.mark.inductor
def test_pipeline_trains_hstu_like_the_synchronous_loop_inductor():
    """2 ranks, each training the samples it read; freescale over Inductor; row-wise Adagrad."""
    results = run_ranks(_worker, 2, {"attention": "padded"}, "rowwise-adagrad", "inductor", False, timeout=600)
    _check(results)
    for rank, out in enumerate(results):
        # one graph, compiled at the first step, for every later (differently shaped) batch
        assert out["graphs"] == [1] * STEPS, f"rank {rank} recompiled: unique graphs per step {out['graphs']}"


@pytest.mark.ranks
@pytest.mark.parametrize("world,mode", [(4, "hstu"), (2, "softmax")])
def test_pipeline_trains_balanced_hstu_like_the_synchronous_loop(world, mode):
    """Every step's samples routed by the balancer (lazily, as the pipeline pulls each batch
    one step ahead); freescale over eager; Adagrad on the table. (Softmax attention on 2
    ranks: the first compile on 4 ranks sharing 2 cores is most of the 4-rank case's ~45 s.)"""
    results = run_ranks(_worker, world, {"attention": "padded", "mode": mode}, "adagrad", "eager", True,
                        timeout=600)
    _check(results)
    # the balancer moved samples: some rank trained others than the ones it read
    assert any(any(out["moved"]) for out in results)
    for rank, out in enumerate(results):
        assert out["graphs"] == [1] * STEPS, f"rank {rank} recompiled: unique graphs per step {out['graphs']}"


# ----------------------------------------------------------------------- train.py --pipeline


def _train(tmp_path, *extra: str):
    import subprocess

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "examples.hstu.train", "--steps", "3", "--batch-size", "8", "--seed", "2",
        "--synthetic-users", "40", "--synthetic-items", str(NUM_ITEMS), "--dim", "16", "--max-len", "12",
        "--negatives", "4", "--quiet", *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.ranks
def test_train_script_with_pipeline_writes_the_summary(tmp_path):
    import json

    out = tmp_path / "run"
    done = _train(tmp_path, "--pipeline", "--backend", "freescale", "--inner", "eager", "--table-optimizer",
                  "rowwise-adagrad", "--balance", "freescale", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pipeline"] is True and summary["table_optimizer"] == "rowwise-adagrad"
    assert summary["world_size"] == 2 and len(summary["losses"]) == 3
    assert all(math.isfinite(x) for x in summary["losses"]) and summary["final_loss"] == summary["losses"][-1]
    assert summary["median_max_over_lb"] is not None  # the balancer ran
    assert summary["recompiles"] == 0 and summary["graphs"] == 1
    # the same losses as Trainer's eager step with the same optimizers (the path without --pipeline)
    plain = tmp_path / "plain"
    done = _train(tmp_path, "--backend", "eager", "--table-optimizer", "rowwise-adagrad", "--balance", "freescale",
                  "--out", str(plain))
    assert done.returncode == 0, done.stderr[-3000:]
    reference = json.loads((plain / "summary.json").read_text())
    assert reference["pipeline"] is False
    assert summary["losses"] == pytest.approx(reference["losses"], rel=1e-5)


def test_pipeline_flag_refuses_adam_on_the_table(capsys):
    from examples.hstu.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--pipeline"])
    assert "--table-optimizer" in capsys.readouterr().err
    assert parse_args(["--pipeline", "--table-optimizer", "sgd"]).pipeline


@pytest.mark.ranks
def test_train_script_with_pipeline_and_split_samples_trains_like_without(tmp_path):
    """``--pipeline --split``: chunks of long samples (kernel form, each chunk's earlier keys
    from their ranks) through the pipeline, the same losses as the unpipelined step."""
    import json

    common = ["--backend", "freescale", "--inner", "eager", "--table-optimizer", "adagrad", "--balance", "freescale",
              "--split", "--attention", "kernel", "--lengths", "zipf", "--max-len", "64", "--batch-size", "8",
              "--dim", "32", "--layers", "1"]
    runs = {}
    for name, extra in (("piped", ["--pipeline"]), ("plain", [])):
        out = tmp_path / name
        done = _train(tmp_path, *common, *extra, "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads((out / "summary.json").read_text())
    assert runs["piped"]["split_samples"] == runs["plain"]["split_samples"] > 0  # some sample was cut
    assert runs["piped"]["graphs"] == 1 and runs["piped"]["recompiles"] == 0
    assert runs["piped"]["losses"] == pytest.approx(runs["plain"]["losses"], rel=1e-5)
