"""Routing of samples and chunks of split samples (fsc.runtime.routing): on real gloo ranks
every token arrives exactly once, on the rank the assignment names, with its chunk's
metadata; the key/value prefix exchange gives each chunk its sample's earlier tokens and
sends their gradients back to their owners; one rank routes without a process group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_harness import run_ranks

from fsc.runtime.balancer import Balancer, QuadraticCost
from fsc.runtime.routing import PrefixExchange, Router, RoutingError, prefix_kv, prefix_tokens

# per rank, the lengths it reads: sample 1 (60 tokens) is longer than all others together;
# a zero-length sample on the last rank
LENGTHS = {2: [[4, 60, 3], [5, 0, 2]], 4: [[4, 60], [3, 5], [2, 6], [0, 1, 7]]}


def _balancer(world: int) -> Balancer:
    return Balancer(ranks=world, split=True, counts="free", cost=QuadraticCost(a=1.0, b=1.0))


def _columns(rank: int, world: int, lengths: list[int]):
    """Token columns naming each token (sample * 1000 + position), of several dtypes and
    shapes; sample columns naming each sample."""
    first = sum(len(x) for x in LENGTHS[world][:rank])
    ids = [first + i for i in range(len(lengths))]
    tag = torch.tensor([s * 1000 + p for s, n in zip(ids, lengths) for p in range(n)], dtype=torch.int64)
    tokens = {"tag": tag, "pos": torch.tensor([p for n in lengths for p in range(n)], dtype=torch.int64),
              "vec": torch.stack([tag.float(), -tag.float(), tag.float() / 7], dim=1),
              "even": tag % 2 == 0}
    samples = {"key": torch.tensor(ids, dtype=torch.int64) + 100,
               "neg": torch.tensor([[s, -s] for s in ids], dtype=torch.int32),
               "none": torch.zeros(len(ids), 0)}
    return tokens, samples


def _route_worker(rank: int, world: int):
    lengths = LENGTHS[world][rank]
    router = Router(_balancer(world))
    plan = router.plan_async(np.array(lengths)).result()
    tokens, samples = _columns(rank, world, lengths)
    routed = router.route(np.array(lengths), tokens, samples, plan)
    # the prefix exchange on a value that names each token: per piece its keys [0, stop)
    x = routed.tokens["tag"].double().requires_grad_(True)
    full = prefix_tokens(x, routed.exchange)
    k, v = prefix_kv(torch.stack([x, x], 1).unsqueeze(1).float(), x.view(-1, 1, 1).float(), routed.exchange)
    full.sum().backward()
    router.close()
    chunks = plan.assignment.chunks_of(rank)
    return {
        "tokens": {n: t.tolist() for n, t in routed.tokens.items()},
        "samples": {n: t.tolist() for n, t in routed.samples.items()},
        "none_shape": tuple(routed.samples["none"].shape),
        "offsets": routed.offsets.tolist(), "sample": routed.sample.tolist(), "q_start": routed.q_start.tolist(),
        "length": routed.length.tolist(), "earlier": routed.earlier, "global_tokens": routed.global_tokens,
        "split": routed.split, "split_samples": plan.assignment.split_samples,
        "chunks": [(c.sample, c.start, c.stop, c.length, tuple(r for r, _, _ in c.earlier)) for c in chunks],
        "keys": full.tolist(), "kv_offsets": routed.exchange.kv_offsets.tolist(),
        "k": k[:, 0, 1].tolist(), "v": v[:, 0, 0].tolist(), "grad": x.grad.tolist(),
    }


@pytest.mark.ranks
@pytest.mark.parametrize("world", [2, 4])
def test_every_token_arrives_once_where_the_assignment_puts_it_with_its_chunk(world):
    per_rank = run_ranks(_route_worker, world)
    lengths = [n for part in LENGTHS[world] for n in part]
    assert per_rank[0]["split_samples"] >= 1  # the long sample is split
    arrived = []
    for rank, got in enumerate(per_rank):
        assert got["global_tokens"] == sum(lengths)
        # this rank's pieces are the chunks the assignment names, in (sample, start) order
        pieces = [(s, q, q + b - a, n) for s, q, a, b, n in
                  zip(got["sample"], got["q_start"], got["offsets"][:-1], got["offsets"][1:], got["length"])]
        assert pieces == [c[:4] for c in got["chunks"]]
        assert list(got["earlier"]) == [c[4] for c in got["chunks"]]
        assert got["split"] == any(c[1] > 0 or c[2] < c[3] for c in got["chunks"])
        for (s, start, stop, _), a, b in zip(pieces, got["offsets"][:-1], got["offsets"][1:]):
            assert got["tokens"]["tag"][a:b] == [s * 1000 + p for p in range(start, stop)]
            assert got["tokens"]["pos"][a:b] == list(range(start, stop))
        tag = got["tokens"]["tag"]
        assert got["tokens"]["vec"] == [[float(t), -float(t), pytest.approx(t / 7)] for t in tag]
        assert got["tokens"]["even"] == [t % 2 == 0 for t in tag]
        # sample columns: one row per piece, every chunk of a split sample carries them
        assert got["samples"]["key"] == [s + 100 for s in got["sample"]]
        assert got["samples"]["neg"] == [[s, -s] for s in got["sample"]]
        assert got["none_shape"] == (len(pieces), 0)
        # the keys of each piece: its sample's tokens [0, stop), in order
        for (s, _, stop, _), a, b in zip(pieces, got["kv_offsets"][:-1], got["kv_offsets"][1:]):
            assert got["keys"][a:b] == [s * 1000 + p for p in range(stop)]
            assert got["k"][a:b] == got["keys"][a:b] and got["v"][a:b] == got["keys"][a:b]
        arrived += tag
    assert sorted(arrived) == sorted(s * 1000 + p for s, n in enumerate(lengths) for p in range(n))
    # gradients of the exchanged keys reach their owners: a token's gradient counts the
    # pieces that read it (its own, and its sample's later chunks)
    readers: dict[int, int] = {}
    for got in per_rank:
        for t in got["keys"]:
            readers[int(t)] = readers.get(int(t), 0) + 1
    for got in per_rank:
        assert got["grad"] == [float(readers[t]) for t in got["tokens"]["tag"]]
    assert max(readers.values()) > 1  # some keys moved


def test_one_rank_routes_without_a_process_group():
    router = Router(_balancer(1))
    lengths = np.array([3, 0, 2])
    plan = router.plan(lengths)
    tokens, samples = {"tag": torch.arange(5)}, {"key": torch.tensor([7, 8, 9])}
    routed = router.route(lengths, tokens, samples, plan)
    router.close()
    assert routed.tokens["tag"].tolist() == [0, 1, 2, 3, 4]
    assert routed.samples["key"].tolist() == [7, 8, 9]
    assert routed.offsets.tolist() == [0, 3, 3, 5] and not routed.split and routed.global_tokens == 5
    k = torch.randn(5, 2, 16, requires_grad=True)
    full_k, full_v = prefix_kv(k, k[:, :, :4], routed.exchange)
    assert torch.equal(full_k, k) and torch.equal(full_v, k[:, :, :4])
    assert routed.exchange.kv_offsets.tolist() == PrefixExchange.unsplit(routed.offsets).kv_offsets.tolist()


def test_router_refuses_what_does_not_match_its_plan():
    router = Router(_balancer(1))
    plan = router.plan(np.array([3, 2]))
    with pytest.raises(RoutingError, match="not the ones this plan was made for"):
        router.route(np.array([2, 3]), {"tag": torch.arange(5)}, {}, plan)
    with pytest.raises(RoutingError, match="token column 'tag' has 4 rows"):
        router.route(np.array([3, 2]), {"tag": torch.arange(4)}, {}, plan)
    with pytest.raises(RoutingError, match="sample column 'key' has 1 rows"):
        router.route(np.array([3, 2]), {}, {"key": torch.arange(1)}, plan)
    with pytest.raises(RoutingError, match="one row per token"):
        router.route(np.array([3, 2]), {"tag": torch.tensor(1)}, {}, plan)
    with pytest.raises(RoutingError, match="routing moves host tensors"):
        router.route(np.array([3, 2]), {"tag": torch.zeros(5, device="meta")}, {}, plan)
    router.close()
    with pytest.raises(RoutingError, match="plans for 2 ranks but the group has 1"):
        Router(_balancer(2))


def test_a_plan_refuses_counts_or_pieces_that_do_not_cover_the_batch():
    from fsc.runtime.routing import Plan

    assignment = _balancer(1).assign_lengths(np.array([3, 3]))
    with pytest.raises(RoutingError, match="do not cover 2 samples"):
        Plan.build(np.array([3, 3]), np.array([1]), assignment)
    with pytest.raises(RoutingError, match="do not tile"):
        Plan.build(np.array([3, 2]), np.array([2]), assignment)


def _wrong_world_worker(rank: int, world: int) -> str:
    from fsc.runtime.routing import Plan

    router = Router(_balancer(world))

    one = Plan.build(np.array([2]), np.array([1]), _balancer(1).assign_lengths(np.array([2])))
    try:
        router.route(np.array([2]), {}, {}, one)
    except RoutingError as exc:
        return str(exc)
    finally:
        router.close()
    return ""


@pytest.mark.ranks
def test_router_refuses_a_plan_for_another_world():
    assert all("the plan is for 1 ranks but the group has 2" in m for m in run_ranks(_wrong_world_worker, 2))


def _compiled_prefix_worker(rank: int, world: int):
    import fsc
    from torch._dynamo.utils import counters

    torch._dynamo.config.capture_scalar_outputs = True
    router = Router(_balancer(world))

    def attend(k: torch.Tensor, v: torch.Tensor, *exchange: torch.Tensor) -> torch.Tensor:
        keys, values = prefix_kv(k, v, PrefixExchange(*exchange))
        return (keys * 2.0).sum() + (values * values).sum()

    compiled = torch.compile(attend, backend="freescale", options={"inner": "eager"}, fullgraph=True)
    counters.clear()
    out = []
    for step, lengths in enumerate(([[4, 60, 3], [5, 0, 2]], [[30, 2], [3, 40, 1]])):
        mine = np.array(lengths[rank])
        plan = router.plan(mine)
        routed = router.route(mine, {"tag": torch.arange(int(mine.sum()))}, {}, plan)
        tokens = routed.offsets[-1].item()
        gen = torch.Generator().manual_seed(rank + 10 * step)
        k = torch.randn(tokens, 2, 16, generator=gen, requires_grad=True)
        v = torch.randn(tokens, 2, 16, generator=gen, requires_grad=True)
        ex = list(routed.exchange)
        if step == 0:
            for t in (k, v, ex[0], ex[3], ex[4], ex[5]):
                torch._dynamo.mark_dynamic(t, 0)
        compiled(k, v, *ex).backward()
        got = (k.grad.clone(), v.grad.clone())
        k.grad = v.grad = None
        attend(k, v, *ex).backward()
        out.append(max((got[0] - k.grad).abs().max().item(), (got[1] - v.grad).abs().max().item()))
    router.close()
    graphs = fsc.last_compile().graphs()
    collectives = {kind: [c.split(":")[0] for c in sum(g.collectives.values(), [])] for kind, g in graphs.items()}
    return out, collectives, counters["stats"]["unique_graphs"]


@pytest.mark.ranks
def test_prefix_kv_under_freescale_exchanges_in_the_graphs_and_new_plans_do_not_recompile():
    for worst, collectives, graphs in run_ranks(_compiled_prefix_worker, 2):
        assert max(worst) <= 1e-6  # gradients of keys and values reach their owners, as eagerly
        assert collectives == {"forward": ["all_to_all_single"], "backward": ["all_to_all_single_1"]}, collectives
        assert graphs == 1


def test_a_rank_without_tokens_still_sends_its_padding_rows():
    # the exchange pads two rows to itself; they come after the local rows, so an empty rank
    # (balancing can leave one) has them too
    x = torch.zeros(0, 3, requires_grad=True)
    exchange = PrefixExchange.unsplit(torch.zeros(1, dtype=torch.int64))
    out = prefix_tokens(x, exchange)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert x.grad.shape == (0, 3)
