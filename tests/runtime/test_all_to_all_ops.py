"""fsc::all_to_all_single + wait_tensor on real CPU ranks (shared-memory transport):
values identical to gloo's all_to_all_single for random variable splits (zeros included),
fp32/bf16/int64, empty and 64 MB messages; gradients; opcheck; torch.compile; local
split-size errors. One spawn per world size serves every check of that size."""

from __future__ import annotations

import os

import pytest
import torch
from dist_harness import run_ranks

DTYPES = (torch.float32, torch.bfloat16, torch.int64)
SHM_PREFIX = "fsc-"


def _shm_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX)}


def _splits(world: int, seed: int, high: int = 6) -> torch.Tensor:
    """splits[i, j]: rows rank i sends rank j; about a third are zero."""
    g = torch.Generator().manual_seed(seed)
    splits = torch.randint(0, high, (world, world), generator=g)
    return splits * (torch.rand(world, world, generator=g) > 0.33)


def _input(rank: int, rows: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100 + rank)
    if dtype.is_floating_point:
        return torch.randn(rows, width, generator=g).to(dtype)
    return torch.randint(-(2**62), 2**62, (rows, width), generator=g, dtype=dtype)


def _freescale(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group_name: str) -> torch.Tensor:
    handle = torch.ops.fsc.all_to_all_single(x, out_splits, in_splits, group_name)
    return torch.ops.fsc.wait_tensor(handle, x, out_splits, in_splits, group_name)


def _gloo(x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    import torch.distributed as dist

    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits)
    return out


def _values_worker(rank: int, world: int, big: bool) -> dict:
    import torch.distributed as dist

    import fsc.runtime.ops  # noqa: F401
    from fsc.runtime import transport

    group_name = dist.group.WORLD.group_name
    report: dict = {"mismatches": [], "cases": 0}
    for seed in range(4):
        splits = _splits(world, seed)
        in_splits, out_splits = splits[rank].tolist(), splits[:, rank].tolist()
        for dtype in DTYPES:
            for width in (1, 5):
                x = _input(rank, sum(in_splits), width, dtype, seed)
                got, want = _freescale(x, out_splits, in_splits, group_name), _gloo(x, out_splits, in_splits)
                report["cases"] += 1
                if not (got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)):
                    report["mismatches"].append((seed, str(dtype), width))
    # Empty: nothing to send anywhere, and a zero-row input.
    zeros = [0] * world
    empty = _freescale(torch.empty(0, 3), zeros, zeros, group_name)
    report["empty_shape"] = tuple(empty.shape)
    # Several in flight before the first wait, waited in reverse order.
    pendings, wants = [], []
    for seed in range(3):
        splits = _splits(world, 10 + seed)
        in_splits, out_splits = splits[rank].tolist(), splits[:, rank].tolist()
        x = _input(rank, sum(in_splits), 3, torch.float32, 10 + seed)
        pendings.append(torch.ops.fsc.all_to_all_single(x, out_splits, in_splits, group_name))
        wants.append((x, out_splits, in_splits))
    got = [torch.ops.fsc.wait_tensor(h, *w, group_name) for h, w in zip(pendings[::-1], wants[::-1])][::-1]
    report["in_flight_equal"] = all(torch.equal(g, _gloo(*w)) for g, w in zip(got, wants))
    if big:  # 64 MiB per rank, uneven
        rows = 16384  # of 4 KiB
        in_splits = [rows // 3, rows - rows // 3] if rank == 0 else [rows // 4, rows - rows // 4]
        out_splits = [rows // 3 if rank == 0 else rows - rows // 3, rows // 4 if rank == 0 else rows - rows // 4]
        x = _input(rank, rows, 1024, torch.float32, 99)
        report["big_bytes"] = x.numel() * x.element_size()
        report["big_equal"] = torch.equal(_freescale(x, out_splits, in_splits, group_name),
                                          _gloo(x, out_splits, in_splits))
    report["transport"] = transport.describe()["cpu"][0]
    return report


@pytest.fixture(scope="module")
def shm_before() -> set[str]:
    return _shm_names()


@pytest.fixture(scope="module")
def two_rank_values(shm_before):
    return run_ranks(_values_worker, 2, True, timeout=240)


@pytest.fixture(scope="module")
def four_rank_values(shm_before):
    return run_ranks(_values_worker, 4, False, timeout=240)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.ranks
def test_all_to_all_equals_gloo_for_random_splits_and_dtypes(world, two_rank_values, four_rank_values):
    reports = two_rank_values if world == 2 else four_rank_values
    for report in reports:
        assert report["transport"] == "shm"
        assert report["cases"] == 4 * len(DTYPES) * 2
        assert report["mismatches"] == []
        assert report["in_flight_equal"]
        assert report["empty_shape"] == (0, 3)


@pytest.mark.ranks
def test_all_to_all_of_64_mib_equals_gloo(two_rank_values):
    for report in two_rank_values:
        assert report["big_bytes"] == 64 << 20
        assert report["big_equal"]


@pytest.mark.ranks
def test_no_segment_is_left_in_dev_shm_after_normal_exit(shm_before, two_rank_values, four_rank_values):
    assert _shm_names() == shm_before


# ------------------------------------------------------------- autograd, opcheck


def _grad_compile_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    import fsc.runtime.ops  # noqa: F401

    group = dist.group.WORLD
    splits = _splits(world, 7)
    in_splits, out_splits = splits[rank].tolist(), splits[:, rank].tolist()
    base = _input(rank, sum(in_splits), 4, torch.float32, 7)
    weight = torch.arange(sum(out_splits) * 4, dtype=torch.float32).reshape(-1, 4)
    report: dict = {}

    x = base.clone().requires_grad_()
    (_freescale(x, out_splits, in_splits, group.group_name) * weight).sum().backward()
    ref = base.clone().requires_grad_()
    (funcol.all_to_all_single_autograd(ref, out_splits, in_splits, group) * weight).sum().backward()
    report["grad_equal"] = torch.equal(x.grad, ref.grad)

    # opcheck: schema, autograd registration, fake tensor and AOT dispatch of both ops.
    # An input that requires grad, so the autograd-registration check has something to see.
    x = base.clone().requires_grad_()
    args = (out_splits, in_splits, group.group_name)
    handle = torch.ops.fsc.all_to_all_single(x, *args)
    report["opcheck"] = {
        "all_to_all_single": torch.library.opcheck(torch.ops.fsc.all_to_all_single.default, (x, *args)),
        "wait_tensor": torch.library.opcheck(torch.ops.fsc.wait_tensor.default, (handle, x, *args)),
    }

    # A handle is a CPU tensor; waiting twice gives the same output; a copy of a handle
    # (no collective attached) makes the wait run the all-to-all itself.
    handle = torch.ops.fsc.all_to_all_single(base, *args)
    first = torch.ops.fsc.wait_tensor(handle, base, *args)
    again = torch.ops.fsc.wait_tensor(handle, base, *args)
    report["wait_idempotent"] = first is again
    report["handle"] = (tuple(handle.shape), str(handle.dtype), handle.device.type, handle.item())
    copied = torch.ops.fsc.wait_tensor(handle.clone(), base, *args)
    report["copied_handle"] = torch.equal(copied, first) and copied is not first

    # torch.compile of a function calling the ops: values and gradients equal eager.
    def f(t: torch.Tensor) -> torch.Tensor:
        y = _freescale(torch.tanh(t) * 2, out_splits, in_splits, group.group_name)
        return (y * weight).sum()

    compiled = {}
    for inner in ("eager",):  # Inductor runs the ops in the TinyRec check below
        torch._dynamo.reset()
        e, c = base.clone().requires_grad_(), base.clone().requires_grad_()
        f(e).backward()
        fn = torch.compile(f, backend="freescale", options={"inner": inner, "passes": ""}, fullgraph=True)
        loss = fn(c)
        loss.backward()
        compiled[inner] = (torch.allclose(loss, f(e.detach()), rtol=1e-6, atol=1e-5),
                           torch.allclose(c.grad, e.grad, rtol=1e-6, atol=1e-6))
    report["compiled"] = compiled

    # The sm-free-collectives pass under torch.compile: TinyRec's exchange (forward and
    # backward) runs through the freescale ops; values equal eager (gloo) step by step.
    import fsc
    from examples.tinyrec import TinyRec
    from fsc.passes.overlap_schedule import OverlapSchedule
    from fsc.passes.sm_free_collectives import SmFreeCollectives

    swaps = {}
    for inner in ("eager", "inductor"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        eager, model = TinyRec(num_items=64, dim=8, max_length=16), TinyRec(num_items=64, dim=8, max_length=16)
        model.load_state_dict(eager.state_dict())
        options = {"inner": inner, "passes": [OverlapSchedule(), SmFreeCollectives()]}
        compiled_model = torch.compile(model, backend="freescale", options=options, fullgraph=True)
        worst = 0.0
        for step in range(2):
            ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(10 * step + rank))
            ref, out = eager(ids), compiled_model(ids)
            ref.backward()
            out.backward()
            worst = max(worst, (out - ref).abs().item(), *((p.grad - q.grad).abs().max().item()
                                                          for p, q in zip(model.parameters(), eager.parameters())))
            for p, q in zip(model.parameters(), eager.parameters()):
                p.grad = q.grad = None
        summary = fsc.last_compile().summary()
        swaps[inner] = (worst, {kind: summary[kind]["passes"]["sm-free-collectives"]["stats"]["swapped"]
                                for kind in ("forward", "backward")})
    report["swaps"] = swaps
    return report


@pytest.fixture(scope="module")
def grad_compile():
    return run_ranks(_grad_compile_worker, 2, timeout=300)


@pytest.mark.ranks
def test_gradient_is_the_reverse_all_to_all_like_funcol(grad_compile):
    assert all(r["grad_equal"] for r in grad_compile)


@pytest.mark.ranks
def test_opcheck_passes_for_both_ops(grad_compile):
    for report in grad_compile:
        for name, result in report["opcheck"].items():
            assert set(result.values()) == {"SUCCESS"}, (name, result)


@pytest.mark.ranks
def test_handle_is_a_cpu_tensor_waited_twice_alike_and_a_copy_runs_the_collective(grad_compile):
    for report in grad_compile:
        assert report["handle"] == ((1,), "torch.int64", "cpu", 0)
        assert report["wait_idempotent"]
        assert report["copied_handle"]


@pytest.mark.ranks
def test_compiled_ops_match_eager_values_and_gradients(grad_compile):
    for report in grad_compile:
        assert report["compiled"] == {"eager": (True, True)}


@pytest.mark.ranks
def test_sm_free_collectives_swaps_the_exchange_under_compile_and_matches_eager(grad_compile):
    for report in grad_compile:
        for inner, (worst, swapped) in report["swaps"].items():
            assert swapped == {"forward": 1, "backward": 1}, inner  # the compile record shows the swap
            assert worst <= 1e-5, inner


# ----------------------------------------------------------------- local errors


def test_split_sizes_that_cannot_be_right_raise_before_any_transfer():
    import torch.distributed as dist

    from fsc.runtime.ops import SplitSizeError, _check_splits, all_to_all

    x = torch.zeros(4, 2)
    with pytest.raises(SplitSizeError, match="scalar"):
        _check_splits(torch.tensor(1.0), [0, 0], [0, 0], 2, "g")
    with pytest.raises(SplitSizeError, match="output_split_sizes has 3 entries for a group of 2"):
        _check_splits(x, [1, 1, 2], [2, 2], 2, "g")
    with pytest.raises(SplitSizeError, match="negative"):
        _check_splits(x, [2, 2], [5, -1], 2, "g")
    with pytest.raises(SplitSizeError, match="sum to 3, but the input has 4 rows"):
        _check_splits(x, [2, 2], [1, 2], 2, "g")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(SplitSizeError, match="both"):
            all_to_all(x, [4], None)
        with pytest.raises(SplitSizeError, match="does not split evenly"):
            all_to_all(torch.tensor(3.0))
        assert torch.equal(all_to_all(x), x)  # a group of one: a copy
    finally:
        dist.destroy_process_group()
