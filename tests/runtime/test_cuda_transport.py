"""The CUDA copy-engine transport (fsc.runtime.transport.cuda).

On any machine: the table sends CUDA tensors to it and CPU tensors elsewhere, its
availability names the cause when it cannot serve (a CPU tensor, no CUDA), its offset
planning (pure Python) places every chunk and names both ranks on a size mismatch, and
ranks without CUDA agree to fall back (or raise, when the copy-engine path was demanded).

On a CUDA machine only (skipped elsewhere, never faked): two processes sharing one GPU
exchange through it, and the values equal a plain ``all_to_all_single``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from dist_harness import run_ranks

from fsc.runtime.transport import (
    TRANSPORTS,
    CopyEngineTransport,
    CudaTransport,
    ShmTransport,
    SplitMismatchError,
    available,
)
from fsc.runtime.transport.cuda import plan_exchange

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() "
                                "is False here)")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers; this machine has "
                                  "CUDA (the GPU tests below cover it)")


# ------------------------------------------------------------ table, availability


def test_the_table_serves_cuda_tensors_with_the_cuda_transport_and_cpu_tensors_with_shared_memory():
    assert TRANSPORTS["cuda"] is CudaTransport and TRANSPORTS["cpu"] is ShmTransport
    assert all(issubclass(t, CopyEngineTransport) for t in TRANSPORTS.values())
    assert available("cuda") == CudaTransport.available(torch.device("cuda"))
    assert available(torch.device("cpu")) == ShmTransport.available(torch.device("cpu"))
    assert available("meta") == "no copy-engine transport for device type 'meta'"


def test_cuda_transport_declines_cpu_tensors_naming_the_device():
    assert CudaTransport.available(torch.device("cpu")) == (
        "the CUDA copy-engine transport serves CUDA tensors, not cpu")


@without_cuda
def test_cuda_transport_without_cuda_says_cuda_is_not_available():
    reason = CudaTransport.available(torch.device("cuda"))
    assert reason.startswith("CUDA is not available") and "torch.cuda.is_available() is False" in reason
    assert available("cuda:0") == reason


# ------------------------------------------------------------------- planning


def _plans(matrix: list[list[int]], row_bytes: int = 1):
    world = len(matrix)
    return [plan_exchange(matrix, me, [matrix[s][me] // row_bytes for s in range(world)], row_bytes, seq=1,
                          group_name="g") for me in range(world)]


def test_plan_exchange_puts_each_senders_chunk_where_its_receiver_reads_it():
    # matrix[s][p]: bytes rank s sends rank p (zeros and the own chunk included)
    matrix = [[5, 0, 7, 1],
              [3, 9, 2, 0],
              [4, 6, 8, 5],
              [0, 2, 1, 3]]
    plans = _plans(matrix)
    for s, p in itertools.permutations(range(4), 2):
        assert plans[s].send_at[p] == plans[p].recv_at[s]
        assert plans[p].recv_bytes[s] == matrix[s][p]
    for p in range(4):  # in each receiver's buffer: senders in rank order, no gaps, no overlap
        regions = sorted((plans[p].recv_at[s], matrix[s][p]) for s in range(4) if s != p)
        assert [at for at, _ in regions] == list(itertools.accumulate([0] + [n for _, n in regions[:-1]]))
    received = [sum(matrix[s][p] for s in range(4) if s != p) for p in range(4)]  # 7, 8, 10, 6
    assert {plan.capacity for plan in plans} == {max(received)} == {10}
    assert plans[2].recv_at == [0, 7, 9, 9]  # rank 2 reads rank 0's 7 bytes, then rank 1's 2, then rank 3's 1


def test_plan_exchange_of_two_ranks_and_of_nothing():
    plans = _plans([[4, 6], [2, 8]], row_bytes=2)
    assert (plans[0].send_at[1], plans[1].recv_at[0], plans[0].recv_at[1]) == (0, 0, 0)
    assert plans[0].capacity == 6
    assert _plans([[0, 0], [0, 0]])[0].capacity == 0


def test_plan_exchange_names_both_ranks_and_sizes_on_a_mismatch():
    matrix = [[8, 24], [16, 16]]  # rank 0 sends rank 1 three 8-byte rows
    with pytest.raises(SplitMismatchError) as err:
        plan_exchange(matrix, 1, [4, 2], 8, seq=7, group_name="g")  # rank 1 expects four
    assert str(err.value) == ("all_to_all #7 on group 'g': rank 0 sends rank 1 24 bytes, but rank 1 expects 32 bytes "
                              "(4 rows of 8 bytes) from rank 0")


# ------------------------------------------------- ranks without CUDA (CPU only)


def _fallback_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from fsc.runtime import transport

    report = {}
    auto = dist.new_group()
    report["auto"] = (transport.transport_for(auto, torch.device("cuda")).name, transport.describe(auto)["cuda"][1])
    strict = dist.new_group()
    transport.configure(strict, kind="copy-engine")
    try:
        transport.transport_for(strict, torch.device("cuda"))
        report["strict"] = ("ok", "")
    except transport.TransportConfigError as exc:
        report["strict"] = (type(exc).__name__, str(exc))
    return report


@without_cuda
@pytest.mark.ranks
def test_ranks_without_cuda_agree_to_use_the_group_collective_or_raise_when_the_copy_engine_is_demanded():
    for report in run_ranks(_fallback_worker, 2, timeout=180):
        name, reason = report["auto"]
        assert name == "group" and reason.startswith("rank 0: CUDA is not available")
        kind, message = report["strict"]
        assert kind == "TransportConfigError"
        assert "the copy-engine transport is not available: rank 0: CUDA is not available" in message


# ------------------------------------------------------------ on a CUDA device


@needs_cuda
def test_cuda_transport_is_available_on_this_gpu():
    assert available("cuda") is None, available("cuda")


def _splits(world: int, seed: int) -> torch.Tensor:
    """splits[i, j]: rows rank i sends rank j; about a third are zero."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, (world, world), generator=g) * (torch.rand(world, world, generator=g) > 0.33)


def _gpu_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    import fsc.runtime.ops  # noqa: F401  (registers torch.ops.fsc)
    from fsc.runtime import transport

    torch.cuda.set_device(0)  # both ranks share the one GPU
    transport.configure(kind="copy-engine")  # raise rather than fall back, naming the cause
    name = dist.group.WORLD.group_name

    def ours(x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        return torch.ops.fsc.wait_tensor(torch.ops.fsc.all_to_all_single(x, out_splits, in_splits, name), x,
                                         out_splits, in_splits, name)

    def plain(x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        cpu = x.cpu()
        out = cpu.new_empty((sum(out_splits), *cpu.shape[1:]))
        dist.all_to_all_single(out, cpu, out_splits, in_splits)
        return out

    report: dict = {"mismatches": [], "cases": 0}
    for seed, dtype in itertools.product(range(3), (torch.float32, torch.bfloat16, torch.int64)):
        splits = _splits(world, seed)
        in_splits, out_splits = splits[rank].tolist(), splits[:, rank].tolist()
        g = torch.Generator().manual_seed(100 * seed + rank)
        x = torch.randint(-1000, 1000, (sum(in_splits), 5), generator=g).to(dtype).cuda()
        report["cases"] += 1
        if not torch.equal(ours(x, out_splits, in_splits).cpu(), plain(x, out_splits, in_splits)):
            report["mismatches"].append((seed, str(dtype)))
    # Several in flight before the first wait, waited in reverse order.
    pending = []
    for seed in range(3):
        splits = _splits(world, 10 + seed)
        in_splits, out_splits = splits[rank].tolist(), splits[:, rank].tolist()
        x = torch.randn(sum(in_splits), 3, generator=torch.Generator().manual_seed(seed + rank)).cuda()
        pending.append((torch.ops.fsc.all_to_all_single(x, out_splits, in_splits, name), x, out_splits, in_splits))
    got = [torch.ops.fsc.wait_tensor(h, x, o, i, name).cpu() for h, x, o, i in pending[::-1]][::-1]
    report["in_flight_equal"] = all(torch.equal(y, plain(x, o, i)) for y, (_, x, o, i) in zip(got, pending))
    # 20 MiB to the peer: more than the first 16 MiB buffer, so every rank grows it alike.
    rows = 5 << 18  # of 16 bytes
    x = torch.randn(2 * rows, 4, generator=torch.Generator().manual_seed(rank)).cuda()
    report["big_equal"] = torch.equal(ours(x, [rows, rows], [rows, rows]).cpu(), plain(x, [rows, rows], [rows, rows]))
    report["transport"] = transport.describe()["cuda"][0]
    torch.cuda.synchronize()
    return report


@needs_cuda
@pytest.mark.ranks
def test_two_ranks_sharing_one_gpu_through_the_copy_engine_match_a_plain_all_to_all_single():
    for report in run_ranks(_gpu_worker, 2, timeout=300):
        assert report["transport"] == "copy-engine"
        assert report["cases"] == 9 and report["mismatches"] == []
        assert report["in_flight_equal"]
        assert report["big_equal"]
