"""Copy-engine all-to-all between the GPUs of one host: CUDA symmetric memory, plain
device-to-device copies into the peers' buffers on a dedicated stream, and flags written
and awaited by the stream itself.

**Status: written against the torch 2.13 API, importable on CPU, never run.** No GPU was
available while it was written; see "Unverified" below. :meth:`CudaTransport.available`
checks that every API it needs exists; the GPU tests (``tests/runtime/test_cuda_transport.py``)
skip without CUDA.

**Pieces.** Per process group: one symmetric buffer per rank
(``torch.distributed._symmetric_memory.empty`` + ``rendezvous`` over the group's store),
rendezvoused once and reused, re-rendezvoused larger when a collective needs more room
(all ranks decide alike, see below); a dedicated copy stream; and a CPU control channel,
the shared-memory transport of :mod:`fsc.runtime.transport.shm` on the same group, which
carries the split sizes and gives the host side its peer-death and timeout detection.

**One all-to-all, sequence number k** (the worker thread enqueues it; the caller only
records an event and returns):

1. host: every rank sends its byte counts to every rank over the control channel, so all
   ranks hold the full W x W matrix; a receiver whose ``output_split_sizes`` disagree with
   a sender's ``input_split_sizes`` raises :class:`SplitMismatchError` naming both. If the
   largest receiver's total exceeds the buffer, every rank (same matrix, same decision)
   drains its stream, meets the others on the control channel and rendezvous a larger one.
2. copy stream, waits for the caller's stream (event), then for each peer p: waits until
   p has consumed collective k-1 from its buffer (``cuStreamWaitValue32`` on p's ack flag
   in our signal pad, >= k-1), copies our chunk into p's buffer at our sender offset
   (``Tensor.copy_`` of contiguous uint8 views: ``cudaMemcpyAsync`` device to device, the
   destination a peer address, so a copy engine over NVLink/PCIe), and writes k into p's
   ready flag for us (``_SymmetricMemory.stream_write_value32`` = ``cuStreamWriteValue32``,
   which fences before the write). Our own chunk is one local ``cudaMemcpyAsync``.
3. copy stream, for each peer s: ``cuStreamWaitValue32`` on our ready flag for s (>= k),
   then copies s's region of our buffer into the output, then writes k into s's ack flag
   for us. An event marks the end.
4. ``wait``: the caller's stream waits on that event (``cudaStreamWaitEvent``); the host
   does not block.

**Kernels.** None in the data path: copies are ``cudaMemcpyAsync``, signals are stream
memory operations (``cuStreamWriteValue32``/``cuStreamWaitValue32``), ordering is events.
The pending tensor and the output are allocated, not filled. Whether the driver runs a
device-to-device ``cudaMemcpyAsync`` whose destination is a peer's memory on a copy engine
is the driver's choice; PyTorch's low-contention collectives rely on it too. Setup
(allocation, rendezvous) may run whatever torch's symmetric-memory backend runs.

**Faults.** The host side raises like the shared-memory transport (the control channel
sees dead peers and timeouts). A peer that dies after the sizes were exchanged leaves our
copy stream waiting on a flag; the worker thread watches in-flight collectives (event
query, peer liveness, ``timeout_s``), and on a failure writes the awaited flag values into
our own signal pad from the host (a host-to-device copy, no kernel) so the stream drains,
marks the transport broken and raises at the next ``start`` or ``wait`` on the group. The
outputs of a failed collective hold garbage.

**Unverified** (needs an H100/H200 host): that ``stream_write_value32`` accepts a peer's
signal pad; that ``cuStreamWaitValue32`` (``_v2``, flag GEQ) works on a symmetric signal
pad (``CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_WAIT_VALUE_NOR`` is not needed for GEQ); that
fresh signal pads read zero; the copy engine claim above; that ``rendezvous`` needs no
``enable_symm_mem_for_group`` in torch 2.11 (we call it if rendezvous asks for it); the
speed. Flag values are 32-bit: they wrap after 2**32 collectives on one group.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import logging
import math
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from fsc.runtime.transport.base import (
    CollectiveError,
    CollectiveTimeoutError,
    CopyEngineTransport,
    PeerDiedError,
    PeerInfo,
    SplitMismatchError,
    TransportBrokenError,
    TransportConfig,
    process_starttime,
)
from fsc.runtime.transport.shm import ShmTransport

log = logging.getLogger(__name__)

_CU_STREAM_WAIT_VALUE_GEQ = 0x0
_MIN_BUFFER = 16 << 20


@functools.cache
def _driver() -> Any:
    """libcuda's ``cuStreamWaitValue32`` (the ``_v2`` entry point where the driver has it)."""
    lib = ctypes.CDLL("libcuda.so.1")
    fn = getattr(lib, "cuStreamWaitValue32_v2", None) or lib.cuStreamWaitValue32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    return fn


def _wait_value(stream: torch.cuda.Stream, address: int, value: int) -> None:
    status = _driver()(ctypes.c_void_p(stream.cuda_stream), address, value & 0xFFFFFFFF, _CU_STREAM_WAIT_VALUE_GEQ)
    if status != 0:
        raise CollectiveError(f"cuStreamWaitValue32 failed with CUresult {status}")


class CudaWork:
    """One all-to-all in flight: ``enqueued`` is set by the worker thread once the copy
    stream holds its operations; ``done`` is the event recorded after them."""

    __slots__ = ("seq", "inp", "out", "in_splits", "out_splits", "ready", "enqueued", "done", "error", "transport",
                 "since")

    def __init__(self, transport: CudaTransport, seq: int, inp: torch.Tensor, out: torch.Tensor,
                 out_splits: Sequence[int], in_splits: Sequence[int]) -> None:
        self.transport, self.seq, self.inp, self.out = transport, seq, inp, out
        self.in_splits, self.out_splits = list(in_splits), list(out_splits)
        self.ready = torch.cuda.Event()
        self.ready.record(torch.cuda.current_stream(inp.device))
        self.enqueued = threading.Event()
        self.done = torch.cuda.Event()
        self.error: BaseException | None = None
        self.since = time.monotonic()

    def wait(self) -> torch.Tensor:
        t = self.transport
        while not self.enqueued.wait(t.config.liveness_interval_s):
            if not t.thread.is_alive():
                raise TransportBrokenError(f"group {t.group_name!r}: the copy-engine worker thread is gone")
        if self.error is not None:
            raise type(self.error)(str(self.error)) from self.error
        torch.cuda.current_stream(self.out.device).wait_event(self.done)
        return self.out


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExchangePlan:
    """Where the bytes of one all-to-all go, seen from one rank. Rank p's symmetric buffer
    holds what the other ranks send p, senders in rank order (a rank's own chunk is a local
    copy and never enters the buffer)."""

    send_at: list[int]
    """[p]: offset of this rank's chunk for p in p's buffer."""
    recv_at: list[int]
    """[s]: offset of s's chunk for this rank in this rank's buffer."""
    recv_bytes: list[int]
    """[s]: bytes s sends this rank."""
    capacity: int
    """The largest buffer any rank needs (every rank computes the same)."""


def plan_exchange(matrix: Sequence[Sequence[int]], me: int, out_splits: Sequence[int], row_bytes: int, *,
                  seq: int, group_name: str) -> ExchangePlan:
    """The plan of rank ``me`` from ``matrix[s][p]``, the bytes rank s sends rank p (the
    same matrix on every rank). Raises :class:`SplitMismatchError` where a sender's count
    differs from what ``me`` expects (``out_splits[s]`` rows of ``row_bytes``)."""
    world = len(matrix)
    for s in range(world):
        want = out_splits[s] * row_bytes
        if matrix[s][me] != want:
            raise SplitMismatchError(
                f"all_to_all #{seq} on group {group_name!r}: rank {s} sends rank {me} {matrix[s][me]} bytes, but rank "
                f"{me} expects {want} bytes ({out_splits[s]} rows of {row_bytes} bytes) from rank {s}")
    return ExchangePlan(
        send_at=[sum(matrix[s][p] for s in range(me) if s != p) for p in range(world)],
        recv_at=[sum(matrix[q][me] for q in range(s) if q != me) for s in range(world)],
        recv_bytes=[matrix[s][me] for s in range(world)],
        capacity=max(sum(matrix[s][p] for s in range(world) if s != p) for p in range(world)),
    )


class CudaTransport(CopyEngineTransport):
    name = "copy-engine"

    def __init__(self, *, pg: dist.ProcessGroup, rank: int, infos: Sequence[PeerInfo], config: TransportConfig,
                 device: torch.device, control: Any) -> None:
        self.group_name, self.rank, self.world = pg.group_name, rank, len(infos)
        self.config, self.device, self.control = config, device, control
        self.reason = f"all {self.world} ranks on one host; CUDA symmetric memory"
        self._pids = [info.pid for info in infos]
        self._starttimes = [info.starttime for info in infos]
        self.stream = torch.cuda.Stream(device)
        self._buffer: torch.Tensor | None = None
        self._handle: Any = None
        self._capacity = 0
        self._fresh = True  # no collective yet on the current buffer: nothing to ack
        self._issued = 0
        self._queue: collections.deque[CudaWork] = collections.deque()
        self._inflight: collections.deque[CudaWork] = collections.deque()
        self._cv = threading.Condition()
        self._broken: CollectiveError | None = None
        self._closing = False
        self._grow(max(config.ring_bytes, _MIN_BUFFER))
        self.thread = threading.Thread(target=self._run, name=f"fsc-ce-{self.group_name}", daemon=True)
        self.thread.start()

    @classmethod
    def available(cls, device: torch.device, group: dist.ProcessGroup | None = None) -> str | None:
        if device.type != "cuda":
            return f"the CUDA copy-engine transport serves CUDA tensors, not {device.type}"
        if not torch.cuda.is_available():
            return "CUDA is not available (torch.cuda.is_available() is False: no GPU, no driver, or a CPU build of torch)"
        try:
            from torch.distributed import _symmetric_memory as symm_mem
            from torch.distributed._symmetric_memory import _SymmetricMemory
        except ImportError as exc:
            return f"this torch build has no symmetric memory ({exc})"
        missing = [name for name in ("stream_write_value32", "rendezvous", "get_buffer", "get_signal_pad")
                   if not hasattr(_SymmetricMemory, name)]
        if missing or not hasattr(symm_mem, "empty"):
            return f"this torch build's symmetric memory lacks {missing or ['empty']}"
        try:
            _driver()
        except (OSError, AttributeError) as exc:
            return f"libcuda's cuStreamWaitValue32 is not reachable ({exc})"
        control = ShmTransport.available(torch.device("cpu"), group)
        if control is not None:
            return f"no host control channel: {control}"
        return None

    @classmethod
    def setup(cls, pg: dist.ProcessGroup, rank: int, infos: Sequence[PeerInfo], config: TransportConfig,
              device: torch.device) -> tuple[CudaTransport | None, str]:
        """Collective. Every rank reaches the same verdict (the control channel's setup
        gathers local problems)."""
        # The control channel carries W byte counts per collective: small rings, no pool.
        control_config = dataclasses.replace(config, ring_bytes=64 << 10, output_pool_bytes=0)
        control, reason = ShmTransport.setup(pg, rank, infos, control_config, torch.device("cpu"))
        if control is None:
            return None, f"no host control channel: {reason}"
        with torch.cuda.device(device):
            return cls(pg=pg, rank=rank, infos=infos, config=config, device=device, control=control), ""

    # ------------------------------------------------------------ caller side

    def all_to_all(self, inp: torch.Tensor, out: torch.Tensor, output_split_sizes: list[int],
                   input_split_sizes: list[int]) -> CudaWork:
        if self._broken is not None:
            raise TransportBrokenError(f"group {self.group_name!r}: an earlier collective failed: {self._broken}")
        if self._closing:
            raise TransportBrokenError(f"group {self.group_name!r}: the copy-engine transport is closed")
        work = CudaWork(self, self._issued + 1, inp, out, output_split_sizes, input_split_sizes)
        self._issued = work.seq
        with self._cv:
            self._queue.append(work)
            self._cv.notify()
        return work

    def abort(self, exc: Exception) -> None:
        self._broken = exc if isinstance(exc, CollectiveError) else CollectiveError(str(exc))
        self.control.abort(self._broken)

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=5.0)
        self.control.close()

    # ----------------------------------------------------------- worker thread

    def _run(self) -> None:
        with torch.cuda.device(self.device):
            while True:
                with self._cv:
                    while not self._closing and not self._queue:
                        self._cv.wait(self.config.liveness_interval_s)
                        self._watch()
                    if self._closing:
                        return
                    work = self._queue.popleft()
                try:
                    if self._broken is not None:
                        raise TransportBrokenError(f"an earlier collective failed: {self._broken}")
                    self._enqueue(work)
                    self._inflight.append(work)
                except CollectiveError as exc:
                    self._broken = self._broken or exc
                    work.error = exc
                except Exception as exc:  # a CUDA error: the message says which call
                    self._broken = self._broken or CollectiveError(f"rank {self.rank}: {exc!r}")
                    work.error = self._broken
                finally:
                    work.enqueued.set()

    def _enqueue(self, work: CudaWork) -> None:
        me, world = self.rank, self.world
        row = math.prod(work.inp.shape[1:]) * work.inp.element_size()
        sends = [s * row for s in work.in_splits]
        plan = plan_exchange(self._exchange(sends), me, work.out_splits, row, seq=work.seq,
                             group_name=self.group_name)
        if plan.capacity > self._capacity:
            self._drain_and_grow(plan.capacity)
        symm = torch.distributed._symmetric_memory._SymmetricMemory
        handle, k = self._handle, work.seq
        pad_words = handle.signal_pad_size // 4
        ready_base, ack_base = pad_words - 2 * world, pad_words - world
        own_pad = handle.signal_pad_ptrs[me]
        src = work.inp.reshape(-1).view(torch.uint8)
        dst = work.out.reshape(-1).view(torch.uint8)
        src_off = _prefix(sends)
        dst_off = _prefix([s * row for s in work.out_splits])
        stream = self.stream
        stream.wait_event(work.ready)
        work.inp.record_stream(stream)
        work.out.record_stream(stream)
        with torch.cuda.stream(stream):
            if sends[me]:
                dst[dst_off[me]:dst_off[me + 1]].copy_(src[src_off[me]:src_off[me + 1]])
            for step in range(1, world):
                p = (me + step) % world
                if not self._fresh:  # p has consumed collective k-1 from its buffer
                    _wait_value(stream, own_pad + 4 * (ack_base + p), k - 1)
                at = plan.send_at[p]
                if sends[p]:
                    peer = handle.get_buffer(p, (self._capacity,), torch.uint8)
                    peer[at:at + sends[p]].copy_(src[src_off[p]:src_off[p + 1]])
                peer_pad = handle.get_signal_pad(p, (pad_words,), torch.uint32)
                symm.stream_write_value32(peer_pad, ready_base + me, k)
            mine = handle.get_buffer(me, (self._capacity,), torch.uint8)
            for step in range(1, world):
                s = (me - step) % world
                _wait_value(stream, own_pad + 4 * (ready_base + s), k)
                at, n = plan.recv_at[s], plan.recv_bytes[s]
                if n:
                    dst[dst_off[s]:dst_off[s] + n].copy_(mine[at:at + n])
            for step in range(1, world):
                s = (me - step) % world
                symm.stream_write_value32(handle.get_signal_pad(s, (pad_words,), torch.uint32), ack_base + me, k)
            work.done.record(stream)
        self._fresh = False

    def _exchange(self, sends: list[int]) -> list[list[int]]:
        """Every rank's byte counts to every rank, over the host control channel."""
        row = torch.tensor(sends, dtype=torch.int64)
        table = row.repeat(self.world, 1)
        out = torch.empty_like(table)
        ones = [1] * self.world
        self.control.all_to_all(table, out, ones, ones).wait()
        return out.tolist()

    def _drain_and_grow(self, need: int) -> None:
        self.stream.synchronize()  # our receives are done: no peer writes into our buffer any more
        barrier = torch.zeros(self.world, 1)
        ones = [1] * self.world
        self.control.all_to_all(barrier, torch.empty_like(barrier), ones, ones).wait()  # every rank has drained
        self._grow(max(need, 2 * self._capacity))

    def _grow(self, size: int) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        size = -(-size // (1 << 20)) * (1 << 20)
        buffer = symm_mem.empty(size, dtype=torch.uint8, device=self.device)
        try:
            handle = symm_mem.rendezvous(buffer, self.group_name)
        except RuntimeError:  # torch versions that want the group registered first
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(self.group_name)
            handle = symm_mem.rendezvous(buffer, self.group_name)
        self._buffer, self._handle, self._capacity, self._fresh = buffer, handle, size, True
        log.info("freescale: group %r: copy-engine buffer of %d MiB per rank", self.group_name, size >> 20)

    def _watch(self) -> None:
        """Fail in-flight collectives whose peers died or that exceed the timeout."""
        while self._inflight and self._inflight[0].done.query():
            self._inflight.popleft()
        if not self._inflight or self._broken is not None:
            return
        head = self._inflight[0]
        dead = [p for p in range(self.world) if p != self.rank
                and process_starttime(self._pids[p]) != self._starttimes[p]]
        if dead:
            failure: CollectiveError = PeerDiedError(
                f"all_to_all #{head.seq} on group {self.group_name!r}: rank(s) {dead} died while its copies were in "
                "flight")
        elif time.monotonic() - head.since > self.config.timeout_s:
            failure = CollectiveTimeoutError(
                f"all_to_all #{head.seq} on group {self.group_name!r}: not complete after {self.config.timeout_s}s")
        else:
            return
        self._broken = failure
        self.control.abort(failure)
        self._release_stream(max(w.seq for w in self._inflight))

    def _release_stream(self, upto: int) -> None:
        """Write every flag our stream may wait on, from the host, so it drains."""
        handle = self._handle
        pad_words = handle.signal_pad_size // 4
        own = handle.get_signal_pad(self.rank, (pad_words,), torch.uint32)
        values = torch.full((2 * self.world,), upto, dtype=torch.uint32).pin_memory()
        with torch.cuda.stream(torch.cuda.Stream(self.device)):  # not the blocked copy stream
            own[pad_words - 2 * self.world:].copy_(values, non_blocking=True)


def _prefix(sizes: Sequence[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out
