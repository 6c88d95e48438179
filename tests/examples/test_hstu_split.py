"""The HSTU example with a sample split across ranks (context parallelism): one sequence
longer than all the others together is cut into chunks on several gloo ranks, each chunk's
layers fetch the earlier chunks' keys and values (fsc.runtime.routing.prefix_kv), and the
loss and every parameter's gradient equal those of one process training the whole global
batch with the plain PyTorch attention (padded form), in HSTU and softmax modes, eager
and compiled by freescale.

Tolerance: float32, gradients compared per parameter as max |split - whole| over max |whole|
<= 1e-5. The two runs add the same terms in different orders (the op's kernels vs padded
einsums, chunk by chunk, summed over ranks): rounding of ~1e-7 relative per sum, seen up to
about 1e-6."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch
from dist_harness import run_ranks

from examples.hstu.model import (
    HSTU,
    HSTUConfig,
    JaggedBatch,
    mark_dynamic,
    model_inputs,
    read_batch,
    sample_cost,
    scale_tensor,
)

NUM_ITEMS = 97
TOLERANCE = 1e-5


def config(**kw) -> HSTUConfig:
    base = dict(num_items=NUM_ITEMS, dim=32, heads=2, qk_dim=16, v_dim=16, layers=2, max_len=48, num_negatives=5,
                seed=3, attention="kernel")
    return HSTUConfig(**(base | kw))


def histories(world: int, step: int):
    """8 users per step; one of them (on rank ``step % world``'s share) has 40 tokens, more
    than the 7 others together (at most 4 each; one has none)."""
    rng = np.random.default_rng([world, step])
    per = 8 // world
    items, ratings, stamps = [], [], []
    for u in range(8):
        n = 41 if u == (step % world) * per else 1 if u == 7 else int(rng.integers(2, 6))
        items.append(rng.integers(1, NUM_ITEMS + 1, n))
        ratings.append(rng.integers(0, 10, n))
        stamps.append(np.cumsum(rng.integers(1, 10**6, n)))
    return types.SimpleNamespace(items=items, ratings=ratings, timestamps=stamps)


def _random_bias(model: HSTU) -> None:
    """The tables start at zero; random ones check that both forms read the same entries."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in model.layers:
            layer.position_bias.weight.normal_(0.0, 0.5, generator=gen)
            layer.time_bias.weight.normal_(0.0, 0.5, generator=gen)


def _split_vs_whole(rank: int, world: int, modes: tuple[str, ...], backend: str, steps: int):
    import torch.distributed as dist

    import fsc
    from examples.hstu.routing import Router, route_batch
    from fsc.runtime.balancer import Balancer

    torch._dynamo.config.capture_scalar_outputs = True
    per = 8 // world
    out = []
    for mode in modes:
        torch._dynamo.reset()
        cfg = config(mode=mode)
        model = HSTU(cfg)
        whole = HSTU(dataclasses.replace(cfg, attention="padded", sharded=False))
        _random_bias(model)
        _random_bias(whole)
        run = model if backend == "eager" else torch.compile(model, backend="freescale", options={"inner": "eager"},
                                                             fullgraph=True)
        router = Router(Balancer(ranks=world, split=True, counts="free", cost=sample_cost(cfg)))
        model.exchange_over(router.exchange_group)
        from torch._dynamo.utils import counters

        counters.clear()
        for step in range(steps):
            data = histories(world, step)
            batch = read_batch(data, range(rank * per, (rank + 1) * per), cfg, seed=0, step=step)
            plan = router.plan((batch.offsets[1:] - batch.offsets[:-1]).numpy())
            routed = route_batch(router, batch, plan)
            inputs = model_inputs(routed, scale_tensor(routed.global_tokens), cfg)
            if step == 0:
                mark_dynamic(inputs, cfg)
            model.zero_grad()
            loss = run(*inputs)
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            everything = read_batch(data, range(8), whole.cfg, seed=0, step=step)
            count = float((everything.targets > 0).sum())
            whole.zero_grad()
            ref = whole(*model_inputs(everything, scale_tensor(count), whole.cfg))
            ref.backward()
            worst = {}
            for (name, p), q in zip(model.named_parameters(), whole.parameters()):
                g, want = p.grad.clone(), q.grad
                if name == "item.weight":  # sharded rows: this rank's slice of the whole table
                    start = rank * model.item.rows_per_rank
                    want = want[start : start + g.shape[0]]
                    g = g[: want.shape[0]]
                else:  # dense parameters: data parallel, summed over ranks
                    dist.all_reduce(g)
                worst[name] = ((g - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
            out.append({
                "mode": mode, "step": step, "loss": total.item(), "ref": ref.item(), "worst": worst,
                "global_tokens": routed.global_tokens, "count": count, "split": plan.assignment.split_samples,
                "chunks_here": int((routed.exchange.q_start > 0).sum()),
                "sizes": routed.exchange.recv_sizes.tolist() + routed.exchange.send_sizes.tolist(),
            })
        router.close()
        if backend != "eager":
            graphs = fsc.last_compile().graphs()
            out[-1]["a2a"] = {k: [c.split(":")[0] for c in sum(g.collectives.values(), [])]
                              for k, g in graphs.items()}
            out[-1]["groups"] = {k: len(g.collectives) for k, g in graphs.items()}
            out[-1]["unique_graphs"] = counters["stats"]["unique_graphs"]
    return out


def _check(per_rank: list[list[dict]], world: int) -> None:
    for rows in zip(*per_rank):
        first = rows[0]
        assert first["split"] >= 1, first  # the long sample is split in every step
        assert sum(r["chunks_here"] for r in rows) >= 1
        assert first["global_tokens"] == first["count"]
        assert first["loss"] == pytest.approx(first["ref"], rel=TOLERANCE), first
        for r in rows:
            assert max(r["worst"].values()) <= TOLERANCE, (r["mode"], r["step"], r["worst"])


@pytest.mark.ranks
@pytest.mark.parametrize("world", [2, 4])
def test_split_sample_trains_like_the_whole_batch_in_one_process_eager(world):
    _check(run_ranks(_split_vs_whole, world, ("hstu", "softmax"), "eager", 2), world)


@pytest.mark.ranks
@pytest.mark.parametrize("mode", ["hstu", "softmax"])
def test_split_sample_under_freescale_equals_the_whole_batch_and_exchanges_in_the_graph(mode):
    per_rank = run_ranks(_split_vs_whole, 2, (mode,), "freescale", 3)
    _check(per_rank, 2)
    for rows in per_rank:
        last = rows[-1]
        # forward: the embedding lookup's 3 exchanges, the keys' timestamps, one per layer for
        # keys and values; backward: the rows' gradients back, one per layer for the keys' and
        # values' gradients
        assert {k: len(v) for k, v in last["a2a"].items()} == {"forward": 6, "backward": 3}, last["a2a"]
        assert all(c.startswith("all_to_all_single") for v in last["a2a"].values() for c in v)
        # the key/value exchanges on the router's group of their own, beside the item exchange's
        assert last["groups"] == {"forward": 2, "backward": 2}, last
        assert last["unique_graphs"] == 1  # new plans every step, no recompile
    assert len({tuple(r["sizes"]) for rows in per_rank for r in rows}) > len(per_rank)  # the sizes changed


@pytest.mark.parametrize("mode", ["hstu", "softmax"])
def test_kernel_form_equals_the_padded_form_in_one_process(mode):
    cfg = config(mode=mode, sharded=False)
    kernel, padded = HSTU(cfg), HSTU(dataclasses.replace(cfg, attention="padded"))
    _random_bias(kernel)
    _random_bias(padded)
    batch = read_batch(histories(1, 0), range(8), cfg, seed=0, step=0)
    losses = []
    for model in (kernel, padded):
        loss = model(*model_inputs(batch, scale_tensor(batch.num_tokens), model.cfg))
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=TOLERANCE)
    for p, q in zip(kernel.parameters(), padded.parameters()):
        assert (p.grad - q.grad).abs().max() <= TOLERANCE * q.grad.abs().max()


def test_only_the_kernel_form_takes_chunks_and_softmax_needs_a_per_sequence_form():
    from fsc.runtime.routing import PrefixExchange

    batch = read_batch(histories(1, 0), range(2), config(), seed=0, step=0)
    # the step's plan split a sample somewhere: every rank refuses, even one holding only whole
    # samples (its own exchange is the unsplit one), so no rank goes on to wait for the others
    whole_here = dataclasses.replace(batch, exchange=PrefixExchange.unsplit(batch.offsets), split=True)
    assert isinstance(whole_here, JaggedBatch)
    with pytest.raises(ValueError, match="only HSTUConfig.attention='kernel' runs"):
        model_inputs(whole_here, scale_tensor(1), config(attention="padded"))
    assert len(model_inputs(dataclasses.replace(whole_here, split=False), scale_tensor(1), config(attention="padded")))
    with pytest.raises(ValueError, match="mode must be one of"):
        config(mode="relu")
    with pytest.raises(ValueError, match="not dense"):
        config(mode="softmax", attention="dense")


def _train(out, *extra: str) -> dict:
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "examples.hstu.train", "--steps", "2", "--batch-size", "8", "--seed", "2", "--synthetic-users", "40",
        "--synthetic-items", "300", "--dim", "16", "--max-len", "200", "--lengths", "zipf", "--negatives", "4",
        "--quiet", "--out", str(out), *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.ranks
def test_train_script_with_split_starts_from_the_loss_of_unbalanced_training(tmp_path):
    plain = _train(tmp_path / "plain", "--backend", "eager")
    split = _train(tmp_path / "split", "--backend", "eager", "--balance", "freescale", "--split",
                   "--attention", "kernel")
    assert split["split"] and split["split_samples"] >= 1
    assert split["losses"][0] == pytest.approx(plain["losses"][0], rel=TOLERANCE)


@pytest.mark.ranks
def test_train_script_with_split_under_freescale_does_not_recompile(tmp_path):
    summary = _train(tmp_path / "fs", "--backend", "freescale", "--inner", "eager", "--steps", "6", "--balance",
                     "freescale", "--split", "--attention", "kernel")
    assert summary["split_samples"] >= 2 and summary["recompiles"] == 0 and summary["graphs"] == 1


def test_train_script_refuses_split_without_its_prerequisites(capsys):
    from examples.hstu.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--split", "--balance", "freescale"])
    assert "--split needs --balance METHOD (not none), --balance-cost quadratic" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("form", ["kernel", "padded", "dense"])
def test_the_compiled_model_says_whether_it_can_run_chunks(form):
    """``fsc.last_compile().split_refusal()``, from the example compiled on one sample with
    its length dynamic: the kernel form (the op given each piece's q_start and key extents)
    can run chunks; the padded form's attention (bmm over the padded group) and the dense
    form lowered to the op without q_start cannot, and the reason names the node (and, for
    the padded form, the layer)."""
    import fsc

    cfg = config(attention=form, sharded=False)
    model = HSTU(cfg)
    rng = np.random.default_rng(0)
    h = types.SimpleNamespace(items=[rng.integers(1, NUM_ITEMS + 1, 12)], ratings=[rng.integers(0, 10, 12)],
                              timestamps=[np.cumsum(rng.integers(1, 100, 12))])
    inputs = model_inputs(read_batch(h, [0], cfg, seed=0, step=0), scale_tensor(11.0), cfg)
    mark_dynamic(inputs, cfg)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        torch.compile(model, backend="freescale", options={"inner": "eager"})(*inputs).backward()
    reason = fsc.last_compile().split_refusal()
    if form == "kernel":
        assert reason is None
    else:
        assert reason is not None and "refused" in reason
        assert ("bmm" in reason and "layers.0 (HSTULayer)" in reason) if form == "padded" else \
            "jagged_attention_fwd" in reason, reason
    torch._dynamo.reset()
