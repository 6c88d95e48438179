"""Balance-aware routing in the HSTU example on real gloo ranks: every rank computes the same
assignment, samples arrive intact on their assigned rank, and training on the routed batch
gives the same gradients as training where the samples were read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_harness import run_ranks
from test_hstu_model import config, step_batches

from examples.hstu.model import HSTU, model_inputs, scale_tensor

pytestmark = pytest.mark.ranks


def _read(rank: int, world: int, step: int, cfg):
    return step_batches(step, world, cfg)[0][rank]


def _grads(model, batch, count):
    import torch.distributed as dist

    model.zero_grad()
    loss = model(*model_inputs(batch, scale_tensor(count), model.cfg))
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if not name.startswith("item."):  # dense: data parallel, summed over ranks
            dist.all_reduce(g)
        out[name] = g
    return total.item(), out


def _routing_worker(rank: int, world: int):
    import torch.distributed as dist

    from examples.hstu.routing import Router, route_batch
    from fsc.runtime.balancer import Balancer

    cfg = config()
    model = HSTU(cfg)
    router = Router(Balancer(ranks=world, cost=lambda n: np.asarray(n, dtype=np.float64) ** 2))
    results = []
    for step in range(2):
        batch = _read(rank, world, step, cfg)
        lengths = (batch.offsets[1:] - batch.offsets[:-1]).numpy()
        plan = router.plan_async(lengths).result()
        routed = route_batch(router, batch, plan)
        count = torch.tensor([float((batch.targets > 0).sum())])
        dist.all_reduce(count)
        loss_read, grads_read = _grads(model, batch, count.item())
        loss_routed, grads_routed = _grads(model, routed, count.item())
        worst = max((grads_read[n] - grads_routed[n]).abs().max().item() for n in grads_read)
        # every sample arrived: the routed batch's items sum to the assigned samples' lengths
        assigned = plan.assignment.samples_of(rank)
        results.append({
            "rank_of": plan.assignment.rank_of.tolist(),
            "tokens": int(routed.num_tokens), "expected_tokens": int(plan.lengths[assigned].sum()),
            "loss_gap": abs(loss_read - loss_routed), "worst_grad": worst,
            "items": sorted(routed.items.tolist()),
            # every sample arrives with its own key and negatives
            "samples": {k: n for k, n in zip(routed.keys.tolist(), routed.negatives.tolist())},
        })
    router.close()
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_routed_batches_give_the_same_gradients_as_unrouted_ones(world):
    per_rank = run_ranks(_routing_worker, world)
    for step in range(2):
        rows = [r[step] for r in per_rank]
        assert all(r["rank_of"] == rows[0]["rank_of"] for r in rows)  # one assignment everywhere
        assert all(r["tokens"] == r["expected_tokens"] for r in rows)
        assert all(r["loss_gap"] <= 1e-5 and r["worst_grad"] <= 1e-5 for r in rows), rows
        # the union of what ranks train is the global batch
        everything = sorted(i for r in rows for i in r["items"])
        read = [_read(r, world, step, config()) for r in range(world)]
        assert everything == sorted(i for b in read for i in b.items.tolist())
        arrived = {k: n for r in rows for k, n in r["samples"].items()}
        assert arrived == {k: n for b in read for k, n in zip(b.keys.tolist(), b.negatives.tolist())}


def _mismatch_worker(rank: int, world: int) -> str | None:
    from examples.hstu.routing import Router, route_batch
    from fsc.runtime.balancer import Balancer

    router = Router(Balancer(ranks=world, cost=lambda n: np.asarray(n, dtype=np.float64)))
    batch = _read(rank, world, 0, config())
    plan = router.plan((batch.offsets[1:] - batch.offsets[:-1]).numpy())
    try:
        route_batch(router, _read(rank, world, 1, config()), plan)
    except ValueError as exc:
        return str(exc)
    finally:
        router.close()
    return None


def test_router_rejects_a_batch_it_did_not_plan():
    assert all("not the ones this plan was made for" in (m or "") for m in run_ranks(_mismatch_worker, 2))
