"""The HSTU example's attention forms (padded per sequence, length-grouped jagged, dense over
the rank's tokens) compute the same function: same losses and gradients on batches with
varying lengths, length 1 included; the host-side layout indexes every token exactly once;
the jagged form's groups are the cheapest split; compiled, the per-sequence forms train
without recompiling as batches change."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from examples.hstu.model import (
    ATTENTION_FORMS,
    EXAMPLE_COST,
    HSTU,
    HSTUConfig,
    attention_layout,
    collate,
    mark_dynamic,
    model_inputs,
    plan_groups,
    sample_cost,
    sample_negatives,
    scale_tensor,
)

NUM_ITEMS = 61


def config(**kw) -> HSTUConfig:
    base = dict(num_items=NUM_ITEMS, dim=16, heads=2, qk_dim=8, v_dim=8, layers=2, max_len=16, num_negatives=4,
                seed=3, sharded=False, attention_groups=3)
    return HSTUConfig(**(base | kw))


def batch_of(lengths: list[int], seed: int, max_len: int = 16):
    """A batch whose sequences have these token counts (0 allowed), timestamps spread wide
    enough to fill many time buckets."""
    rng = np.random.default_rng(seed)
    n = [k + 1 for k in lengths]  # one more item than tokens: the last is only a target
    keys = list(range(100, 100 + len(lengths)))
    return collate([rng.integers(1, NUM_ITEMS + 1, k) for k in n], [rng.integers(0, 10, k) for k in n],
                   [np.cumsum(rng.integers(0, 10**7, k)) for k in n], max_len, keys=keys,
                   negatives=sample_negatives(NUM_ITEMS, 4, 0, seed, keys))


def loss_and_grads(form: str, batch) -> tuple[float, dict[str, torch.Tensor]]:
    cfg = config(attention=form)
    model = HSTU(cfg).double()
    with torch.no_grad():  # the bias tables start at zero: make them matter
        for layer in model.layers:
            layer.position_bias.weight.normal_(generator=torch.Generator().manual_seed(1))
            layer.time_bias.weight.normal_(generator=torch.Generator().manual_seed(2))
    loss = model(*model_inputs(batch, scale_tensor(7.0), cfg))
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("lengths", [[1], [1, 1], [5, 1, 16, 2, 9, 1, 13], [3, 0, 7, 7, 7, 2, 1, 16, 11, 4]])
def test_every_attention_form_gives_the_same_loss_and_gradients(lengths):
    batch = batch_of(lengths, seed=len(lengths))
    # the kernel form runs fsc's op (no float64, head dims >= 16): test_hstu_split compares it
    results = {form: loss_and_grads(form, batch) for form in ATTENTION_FORMS if form != "kernel"}
    ref_loss, ref_grads = results["dense"]
    for form in ("padded", "jagged"):
        loss, grads = results[form]
        assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-12), form
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-12, msg=f"{form}: {name}")
    # the bias tables are trained in every form (tokens that attend to earlier ones exist)
    if max(lengths) > 1:
        assert ref_grads["layers.0.time_bias.weight"].abs().sum() > 0


@pytest.mark.parametrize("form", ["padded", "jagged"])
def test_layout_indexes_every_token_exactly_once_in_groups_of_at_least_two_by_two(form):
    lengths = [4, 0, 1, 9, 2, 2, 16]
    batch = batch_of(lengths, seed=3)
    token_index, *pads = attention_layout(batch.offsets, config(attention=form))
    assert len(pads) == (1 if form == "padded" else 3)
    assert all(p.shape[0] >= 2 and p.shape[1] >= 2 for p in pads)
    flat = torch.cat([p.reshape(-1) for p in pads])
    assert sorted(flat[flat >= 0].tolist()) == list(range(sum(lengths)))
    assert torch.equal(flat[token_index], torch.arange(sum(lengths)))  # token_index inverts the gather
    if form == "padded":
        assert pads[0].shape == (6, 16)  # the non-empty sequences, padded to the longest


def test_dense_form_needs_no_layout():
    assert attention_layout(batch_of([3, 2], seed=0).offsets, config(attention="dense")) == ()


def brute_force_groups(lengths: np.ndarray, groups: int) -> float:
    """The cheapest split of the length-sorted non-empty sequences into ``groups`` runs."""
    size = np.sort(lengths[lengths > 0])
    best = float("inf")
    for cuts in itertools.combinations_with_replacement(range(len(size) + 1), groups - 1):
        edges = [0, *cuts, len(size)]
        cost = sum(max(2, j - i) * max(2, int(size[j - 1]) if j > i else 2) ** 2 for i, j in zip(edges, edges[1:]))
        best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_length_groups_are_the_cheapest_split(seed):
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(2.5, 1.0, 9).astype(np.int64), 200)
    got = plan_groups(lengths, 3)
    assert sorted(np.concatenate(got).tolist()) == np.flatnonzero(lengths > 0).tolist()
    cost = sum(max(2, len(g)) * max(2, int(lengths[g].max()) if len(g) else 2) ** 2 for g in got)
    assert cost == brute_force_groups(lengths, 3)


@pytest.mark.slow  # a dynamic-shape Dynamo trace of the whole example: 12-23 s on 2 cores
@pytest.mark.parametrize("form", ["padded", "jagged"])
def test_per_sequence_forms_compile_once_and_match_eager_as_batches_change(form):
    torch._dynamo.config.capture_scalar_outputs = True
    cfg = config(attention=form, layers=1)
    eager = HSTU(cfg)
    model = HSTU(cfg)
    compiled = torch.compile(model, backend="freescale", options={"inner": "eager"}, fullgraph=True)
    from torch._dynamo.utils import counters

    counters.clear()
    rng = np.random.default_rng(0)
    for step in range(4):
        batch = batch_of(rng.integers(0, 17, int(rng.integers(3, 9))).tolist(), seed=step)
        inputs = model_inputs(batch, scale_tensor(10.0), cfg)
        if step == 0:
            mark_dynamic(inputs)
        torch.testing.assert_close(compiled(*inputs), eager(*inputs), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def test_sample_cost_is_the_example_constant_at_the_defaults():
    assert sample_cost(HSTUConfig(num_items=10)) == EXAMPLE_COST
    assert sample_cost(HSTUConfig(num_items=10, heads=4)).a == 256.0


@pytest.mark.parametrize("options, message", [
    ({"attention": "flash"}, "attention must be one of padded, jagged, kernel, dense"),
    ({"attention_groups": 0}, "attention_groups must be >= 1"),
    ({"num_negatives": 0}, "num_negatives must be >= 1"),
])
def test_bad_config_is_rejected_naming_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        HSTUConfig(num_items=10, **options)


def test_collate_rejects_keys_or_negatives_that_do_not_match_the_sequences():
    seqs = ([np.array([1, 2, 3]), np.array([4, 5])], [np.zeros(3, np.int64), np.zeros(2, np.int64)],
            [np.arange(3), np.arange(2)])
    with pytest.raises(ValueError, match="2 sequences but keys of shape"):
        collate(*seqs, 8, keys=[1, 2, 3])
    with pytest.raises(ValueError, match=r"negatives must be \[2, K\]"):
        collate(*seqs, 8, negatives=torch.zeros(3, 4, dtype=torch.int64))
    batch = collate(*seqs, 8)
    assert batch.keys.tolist() == [0, 1] and batch.negatives.shape == (2, 0)


def test_negatives_are_keyed_by_the_sample_not_its_position_in_the_batch():
    a = sample_negatives(NUM_ITEMS, 5, 0, 3, [7, 9, 11])
    b = sample_negatives(NUM_ITEMS, 5, 0, 3, [11, 7])
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], sample_negatives(NUM_ITEMS, 5, 0, 4, [7])[0])  # another step, another draw
    assert int(a.min()) >= 1 and int(a.max()) <= NUM_ITEMS
