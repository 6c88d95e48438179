"""The balancer on real gloo ranks: every rank computes the same assignment from the
all-gathered lengths, and with unequal counts the global-token loss normalizer gives the
gradients of a single process running the whole global batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_harness import run_ranks

pytestmark = pytest.mark.ranks

DIM = 3


def local_lengths(rank: int) -> np.ndarray:
    """What rank ``rank`` loaded: a different number of samples per rank, none on rank 0,
    and zero-length samples among them."""
    rng = np.random.default_rng(100 + rank)
    lengths = rng.integers(0, 60, size=3 * rank)
    lengths[::4] = 0
    return lengths


def global_batch(world: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Lengths and per-token features/targets of a global batch whose free-count balance
    is unequal: one long sample per rank but the last, many short ones, and an empty one."""
    lengths = np.array([40] * (world - 1) + [5] * (8 * world) + [0])
    gen = torch.Generator().manual_seed(0)
    tokens = int(lengths.sum())
    return lengths, torch.randn(tokens, DIM, generator=gen, dtype=torch.float64), torch.randn(
        tokens, 1, generator=gen, dtype=torch.float64
    )


def model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(DIM, 1, dtype=torch.float64)


def grads(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in m.parameters()]


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from fsc.runtime import Balancer, QuadraticCost
    from fsc.runtime.balance_dist import gather_lengths, loss_normalizer

    out: dict = {}
    # Identical assignments: each rank balances the all-gathered batch on its own.
    gathered = gather_lengths(local_lengths(rank))
    assignment = Balancer(ranks=world, cost=QuadraticCost(a=1.0, b=1.0)).assign_lengths(gathered)
    out["gathered"] = gathered
    out["rank_of"] = assignment.rank_of.copy()

    # Unequal counts, loss normalized by the global token count.
    lengths, x, y = global_batch(world)
    # Quadratic cost: balanced work, so unequal token counts (tokens alone would make the
    # per-rank mean right by accident).
    free = Balancer(ranks=world, counts="free", cost=QuadraticCost(a=1.0, b=0.0)).assign_lengths(lengths)
    out["counts"] = free.counts.tolist()
    starts = np.concatenate([[0], np.cumsum(lengths)])
    rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in free.samples_of(rank)] + [np.array([], int)])
    xs, ys = x[torch.from_numpy(rows)], y[torch.from_numpy(rows)]
    out["tokens"] = len(rows)

    def reduced_grads(loss_of, average: bool) -> list[torch.Tensor]:
        m = model()
        loss_of(m).backward()
        result = []
        for g in grads(m):
            dist.all_reduce(g)
            result.append(g / world if average else g)
        return result

    def summed(m):
        return ((m(xs) - ys) ** 2).sum()

    out["sum"] = reduced_grads(lambda m: summed(m) / loss_normalizer(len(rows)), average=False)
    out["mean"] = reduced_grads(lambda m: summed(m) / loss_normalizer(len(rows), grad_reduction="mean"), average=True)
    # What a plain data-parallel loop does: each rank's own mean, gradients averaged.
    out["per_rank_mean"] = reduced_grads(lambda m: summed(m) / max(len(rows), 1), average=True)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def ranks(request) -> tuple[int, list[dict]]:
    return request.param, run_ranks(_worker, request.param, timeout=120)


def test_every_rank_gathers_the_same_global_batch_in_rank_order(ranks):
    world, results = ranks
    expected = np.concatenate([local_lengths(r) for r in range(world)])
    for result in results:
        assert np.array_equal(result["gathered"], expected)


def test_every_rank_computes_the_same_assignment_from_gathered_lengths(ranks):
    world, results = ranks
    for result in results[1:]:
        assert np.array_equal(result["rank_of"], results[0]["rank_of"])
    counts = np.bincount(results[0]["rank_of"], minlength=world)
    assert counts.max() - counts.min() <= 1  # equal counts by default


def test_global_token_normalizer_gives_single_process_gradients_with_unequal_counts(ranks):
    world, results = ranks
    counts = results[0]["counts"]
    tokens = [r["tokens"] for r in results]
    assert min(counts) != max(counts) and min(tokens) != max(tokens)  # the split really is unequal
    lengths, x, y = global_batch(world)
    m = model()
    (((m(x) - y) ** 2).sum() / len(x)).backward()
    reference = grads(m)
    for result in results:
        for reduction in ("sum", "mean"):
            for got, want in zip(result[reduction], reference):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        # The per-rank mean is not the same gradient: the check above can fail.
        assert any(not torch.allclose(g, w, rtol=1e-3) for g, w in zip(result["per_rank_mean"], reference))
