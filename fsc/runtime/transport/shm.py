"""All-to-all between CPU ranks on one host through shared memory: the test double of the
copy-engine protocol and a speed-up over gloo for CPU ranks on one host.

**Segments.** Each rank creates one segment in /dev/shm, named
``fsc-<token>-<rank>-<pid>`` (the token is 64 random bits drawn by rank 0 of the group at
setup, so two jobs, or two groups of one job, never collide), mode 0600, its pages reserved
with ``posix_fallocate`` (a full /dev/shm fails here, cleanly, not later with SIGBUS).
Every rank maps every peer's segment; once all have (a gather over the group), each rank
unlinks its own name. From then on /dev/shm holds nothing of ours, whatever happens to the
processes: the kernel frees the memory when the last mapping goes. Setup that fails after
creating a segment unlinks its own name and, best effort, every peer's (a peer killed
during setup cannot). When every rank died during set-up, nobody could: the next set-up on
the host removes such segments (:func:`remove_stale_segments`: our names, this user's, owner
pid gone, older than ``STALE_AFTER_S``).

**Layout of rank r's segment.** A control block (magic, pid, status, error message, the
futex *doorbell* of rank r, and one counter per 64-byte line: ``head[p]``, bytes rank r has
written into its ring towards p; ``tail[p]``, bytes rank r has consumed from p's ring
towards r; ``want[p]``, set while r waits for room in its ring towards p), then one ring
of ``ring_bytes`` per peer p holding the messages r sends p. Every word has one writer: r
writes its own segment only, except peers' doorbells.

**Protocol (one all-to-all, sequence number k).** For every peer p, rank r writes a 64-byte
header (k, byte count, row size, dtype, sender) and then the payload into its ring towards
p, in pieces as ring space frees up, publishing ``head[p]`` after each piece and ringing
p's doorbell; it reads p's ring towards r the same way, checks the header against what r
expects from p (sequence number, bytes, row size, dtype: a mismatch raises
:class:`SplitMismatchError` naming both ranks and both sizes), copies the payload into the
output and publishes ``tail[p]`` (ringing p only if p asked for room). The own chunk is
one local copy. Copies are ``ctypes.memmove`` between addresses (no GIL held). The
collective is complete on r when r has posted everything and received everything; rings
are FIFO and every rank issues collectives in the same order, so successive collectives
queue without mixing. Who does the work is described on :class:`ShmTransport`.

**Signals.** A thread that waits sleeps on its rank's doorbell (a futex word in its own
segment); whoever publishes something it may wait for writes a fresh value into the word
and wakes it (values are (count << 6 | writer), unique per writer, so a racing second
writer cannot restore the value a sleeper compared against). No gloo in the data path.

**Faults.** While waiting, the engine checks peers' status words (an error a peer
published is raised here too, with the peer's message: so the sender of a mismatched
message raises at the latest at its next collective on the group) and, every
``liveness_interval_s``, whether the peers it waits on are alive (pid and start time from
/proc). A dead peer raises :class:`PeerDiedError`; no progress for ``timeout_s`` from a
live one raises :class:`CollectiveTimeoutError`. Any error is published to the peers and
breaks the transport for good: later collectives on the group raise.

**Memory order.** Data is copied, then the counter is stored; the reader loads the
counter, then the data. That needs stores seen in program order by other cores (x86-64's
TSO; large copies' non-temporal stores are fenced by memcpy itself), so the transport is
offered on Linux x86-64 only; elsewhere the group falls back to gloo. The one store-load
pair (want flag vs tail) is fenced explicitly.

**Outputs** of 1 MiB or more come from :class:`OutputPool`, which reuses the memory of
released outputs (fresh large CPU allocations page-fault in every page on every call).
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import logging
import math
import mmap
import os
import platform
import re
import struct
import threading
import time
import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist

from fsc.runtime import futex
from fsc.runtime.transport.base import (
    CollectiveError,
    CollectiveTimeoutError,
    CopyEngineTransport,
    PeerDiedError,
    PeerInfo,
    SplitMismatchError,
    TransportBrokenError,
    TransportConfig,
    agree,
    process_starttime,
)

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
NAME_PREFIX = "fsc-"
MAX_WORLD = 64  # writer ids in doorbell values take 6 bits

_MAGIC = 0x0031_4D48_5343_4653  # "FSCSHM1"
_LINE = 64
_MAGIC_OFF, _PID_OFF, _STATUS_OFF, _ERRSEQ_OFF, _RING_OFF, _WORLD_OFF = 0, 8, 16, 24, 32, 40
_DOORBELL_OFF = 64
_ERRLEN_OFF, _ERRMSG_OFF, _COUNTERS_OFF = 128, 136, 1024
_HEAD, _TAIL, _WANT = range(3)  # counter kinds; one 64-byte line per (kind, peer)
_ERRMSG_MAX = _COUNTERS_OFF - _ERRMSG_OFF
_OK, _CLOSED = 0, 1
_ERROR_KINDS = (CollectiveError, PeerDiedError, CollectiveTimeoutError, SplitMismatchError, TransportBrokenError)
_FAILED = 16  # status = _FAILED + index of the error's class in _ERROR_KINDS
_HEADER = struct.Struct("<qqqq24s")  # seq, nbytes, row_bytes, sender, dtype name
_HEADER_BYTES = 64
_MIN_RING = 64 << 10
_INLINE_BYTES = 256 << 10
_POOLED_BYTES = 1 << 20  # messages up to this are posted by the caller; measured on 2 cores, see bench


def _ctrl_bytes(world: int) -> int:
    return -(-(_COUNTERS_OFF + 3 * world * _LINE) // 4096) * 4096


def _pad(n: int) -> int:
    return -(-n // _HEADER_BYTES) * _HEADER_BYTES


def segment_names(token: str, infos: Sequence[PeerInfo]) -> list[str]:
    return [f"{NAME_PREFIX}{token}-{info.rank}-{info.pid}" for info in infos]


STALE_AFTER_S = 60.0
"""A segment whose owner is gone is removed at the next set-up once it is this old (a live
set-up unlinks its segment within seconds; the age also spares a set-up running in another
pid namespace that shares /dev/shm)."""

_SEGMENT_NAME = re.compile(rf"^{re.escape(NAME_PREFIX)}[0-9a-f]+-\d+-(\d+)$")


def remove_stale_segments(min_age_s: float | None = None) -> list[str]:
    """Unlink the segments whose owner died before unlinking them (every rank killed during
    set-up): only names of our pattern, owned by this user, holding our header (or none yet),
    whose owner pid is gone, older than ``min_age_s`` (default :data:`STALE_AFTER_S`).
    Returns the names removed. Best effort: what cannot be read is left alone."""
    min_age_s = STALE_AFTER_S if min_age_s is None else min_age_s
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    removed = []
    now = time.time()
    for name in names:
        match = _SEGMENT_NAME.match(name)
        if match is None or process_starttime(int(match.group(1))) is not None:
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            head = os.pread(fd, 8, 0)
        except OSError:
            continue
        finally:
            os.close(fd)
        ours = head in (b"", bytes(8)) or int.from_bytes(head.ljust(8, b"\0"), "little") == _MAGIC
        if st.st_uid != os.getuid() or not ours or now - st.st_mtime < min_age_s:
            continue
        _unlink(name)
        removed.append(name)
    if removed:
        log.info("freescale: removed %d stale shared-memory segment(s) of dead processes: %s", len(removed),
                 ", ".join(removed))
    return removed


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("freescale: could not unlink %s/%s: %s", SHM_DIR, name, exc)


def _create(name: str, size: int) -> mmap.mmap:
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exact, whatever the umask
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            _unlink(name)
            raise
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _attach(name: str) -> mmap.mmap:
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"{SHM_DIR}/{name} is not a private segment of this user (uid {st.st_uid}, "
                                  f"mode {oct(st.st_mode & 0o777)})")
        return mmap.mmap(fd, st.st_size)
    finally:
        os.close(fd)


def _i64(mm: mmap.mmap, offset: int) -> ctypes.c_int64:
    return ctypes.c_int64.from_buffer(mm, offset)


# --------------------------------------------------------------------------- work


_HEADER_PHASE, _PAYLOAD_PHASE, _DONE_PHASE = range(3)


class _Send:
    __slots__ = ("peer", "src", "nbytes", "total", "phase", "pos")

    def __init__(self, peer: int, src: int, nbytes: int) -> None:
        self.peer, self.src, self.nbytes = peer, src, nbytes  # src: address of the bytes
        self.total = _pad(nbytes)
        self.phase, self.pos = _HEADER_PHASE, 0


class _Recv:
    __slots__ = ("peer", "dst", "nbytes", "total", "phase", "pos")

    def __init__(self, peer: int, dst: int, nbytes: int) -> None:
        self.peer, self.dst, self.nbytes = peer, dst, nbytes  # dst: address in the output
        self.total = _pad(nbytes)
        self.phase, self.pos = _HEADER_PHASE, 0


class ShmWork:
    """One all-to-all in flight. Copies go by address (``ctypes.memmove``, which drops the
    GIL), so ``inp`` and ``out`` are held here until the work is complete."""

    __slots__ = ("seq", "inp", "out", "nbytes", "row_bytes", "dtype_name", "self_copy", "sends", "recvs", "event",
                 "error", "transport")

    def __init__(self, transport: ShmTransport, seq: int, inp: torch.Tensor, out: torch.Tensor,
                 output_split_sizes: Sequence[int], input_split_sizes: Sequence[int]) -> None:
        self.transport, self.seq, self.inp, self.out = transport, seq, inp, out
        self.nbytes = inp.numel() * inp.element_size()
        self.row_bytes = math.prod(inp.shape[1:]) * inp.element_size()
        self.dtype_name = str(inp.dtype).removeprefix("torch.").encode()[:24]
        me, world = transport.rank, transport.world
        src_off = _offsets(input_split_sizes, self.row_bytes)
        dst_off = _offsets(output_split_sizes, self.row_bytes)
        src, dst = inp.data_ptr(), out.data_ptr()
        self.self_copy: tuple[int, int, int] | None = (dst + dst_off[me], src + src_off[me],
                                                       src_off[me + 1] - src_off[me])
        peers = [(me + step) % world for step in range(1, world)]
        self.sends = [_Send(p, src + src_off[p], src_off[p + 1] - src_off[p]) for p in peers]
        self.recvs = [_Recv(p, dst + dst_off[p], dst_off[p + 1] - dst_off[p]) for p in peers]
        self.event = threading.Event()
        self.error: BaseException | None = None

    @property
    def posted(self) -> bool:
        return all(s.phase == _DONE_PHASE for s in self.sends)

    @property
    def complete(self) -> bool:
        return self.self_copy is None and self.posted and all(r.phase == _DONE_PHASE for r in self.recvs)

    def waiting_on(self) -> list[int]:
        return sorted({s.peer for s in self.sends if s.phase != _DONE_PHASE}
                      | {r.peer for r in self.recvs if r.phase != _DONE_PHASE})

    def wait(self) -> torch.Tensor:
        if not self.event.is_set():
            self.transport.drive(self)
        if self.error is not None:
            raise type(self.error)(str(self.error)) from self.error
        return self.out


class OutputPool:
    """Reuses the memory of released large outputs.

    A CPU tensor of many MiB comes from ``mmap`` and is returned to the kernel when freed,
    so each new one page-faults all its pages in again; on the VM this was measured on,
    faulting in 64 MiB took longer than moving it (180 ms). Outputs of at least
    ``_POOLED_BYTES`` are views of pooled buffers instead; when an output's storage dies,
    its buffer goes back to the pool (up to ``limit`` bytes held; beyond that it is freed).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free: list[bytearray] = []
        self._held = 0
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < _POOLED_BYTES or self.limit < nbytes:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            fits = [b for b in self._free if nbytes <= len(b) <= 2 * nbytes]
            buf = min(fits, key=len) if fits else None
            if buf is not None:
                self._free.remove(buf)
                self._held -= len(buf)
        if buf is None:
            buf = bytearray(-(-nbytes // 4096) * 4096)
        out = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)
        weakref.finalize(out.untyped_storage(), self._give, buf)
        return out

    def _give(self, buf: bytearray) -> None:
        with self._lock:
            if self._held + len(buf) <= self.limit:
                self._free.append(buf)
                self._held += len(buf)


def _offsets(splits: Sequence[int], row_bytes: int) -> list[int]:
    out = [0]
    for s in splits:
        out.append(out[-1] + int(s) * row_bytes)
    return out


def _fence(lock: threading.Lock = threading.Lock()) -> None:
    """A full memory barrier: CPython's lock acquire is a locked (atomic) instruction on
    x86-64. Needed where a store must be seen before a following load (Dekker pattern)."""
    lock.acquire()
    lock.release()


# ---------------------------------------------------------------------- transport


class ShmTransport(CopyEngineTransport):
    """Shared-memory all-to-all for the CPU ranks of one process group on one host.

    **Who moves the data.** One thread at a time is the *engine* (holds ``_engine``) and
    steps the queue of collectives in issue order: the caller for a message of at most
    ``_INLINE_BYTES`` when it starts it (posting it costs less than a thread hand-off), the
    copy thread in the background for larger messages (and for small ones whose post did
    not fit in the ring), and the caller again while it blocks in ``wait`` (it is idle
    anyway; the copy thread steps aside). Only the engine sleeps on the rank's doorbell, so
    a peer's ring wakes exactly the thread that can use it.
    """

    name = "shm"

    def __init__(self, *, group_name: str, rank: int, infos: Sequence[PeerInfo], own: mmap.mmap,
                 peers: dict[int, mmap.mmap], config: TransportConfig) -> None:
        self.group_name, self.rank, self.world, self.config = group_name, rank, len(infos), config
        self.reason = f"all {self.world} ranks on one host"
        self._pids = [info.pid for info in infos]
        self._starttimes = [info.starttime for info in infos]
        self._maps = {rank: own, **peers}
        me, world = rank, self.world
        self._ctrl = _ctrl_bytes(world)
        self._ring_bytes = {p: _i64(mm, _RING_OFF).value for p, mm in self._maps.items()}

        def line(mm: mmap.mmap, kind: int, peer: int) -> ctypes.c_int64:
            return _i64(mm, _COUNTERS_OFF + (kind * world + peer) * _LINE)

        self._status = {p: _i64(mm, _STATUS_OFF) for p, mm in self._maps.items()}
        self._doorbell = {p: ctypes.c_int32.from_buffer(mm, _DOORBELL_OFF) for p, mm in self._maps.items()}
        self._doorbell_addr = {p: ctypes.addressof(bell) for p, bell in self._doorbell.items()}
        # Counters written here: head (me -> p), tail (p -> me), want-space (me -> p).
        self._head = {p: line(own, _HEAD, p) for p in peers}
        self._tail = {p: line(own, _TAIL, p) for p in peers}
        self._want = {p: line(own, _WANT, p) for p in peers}
        # The same counters as the peers write them.
        self._peer_head = {p: line(mm, _HEAD, me) for p, mm in peers.items()}
        self._peer_tail = {p: line(mm, _TAIL, me) for p, mm in peers.items()}
        self._peer_want = {p: line(mm, _WANT, me) for p, mm in peers.items()}
        # Base addresses of the mappings; the ctypes objects pin them until _release.
        self._pins = {p: ctypes.c_char.from_buffer(mm) for p, mm in self._maps.items()}
        self._out_ring = {p: self._ring_address(me, p) for p in peers}
        self._in_ring = {p: self._ring_address(p, me) for p in peers}
        self._piece = max(_MIN_RING // 2, (self._ring_bytes[me] // 4) & ~63)
        self._bells = itertools.count(1)
        self._issued = 0  # sequence number of the last collective started
        self._queue: collections.deque[ShmWork] = collections.deque()
        self._broken: CollectiveError | None = None
        self._closing = False
        self._engine = threading.Lock()
        self._cv = threading.Condition()  # guards _queue appends, _background, _drivers
        self._background = False  # the copy thread should step the queue until it empties
        self._drivers = 0  # callers blocked in wait(); the copy thread steps aside for them
        self._current: ShmWork | None = None
        self._outputs = OutputPool(config.output_pool_bytes)
        self._last_progress = self._next_liveness = 0.0
        self.thread = threading.Thread(target=self._run, name=f"fsc-shm-{group_name}", daemon=True)
        self.thread.start()

    def _ring_address(self, owner: int, to: int) -> int:
        return ctypes.addressof(self._pins[owner]) + self._ctrl + _ring_index(owner, to) * self._ring_bytes[owner]

    # ----------------------------------------------------------------- setup

    @classmethod
    def available(cls, device: torch.device, group: dist.ProcessGroup | None = None) -> str | None:
        if device.type != "cpu":
            return f"the shared-memory transport serves CPU tensors, not {device.type}"
        system, machine = platform.system(), platform.machine()
        if system != "Linux" or machine != "x86_64" or not futex.supported():
            return f"the shared-memory transport needs Linux x86-64 (store order, futexes), not {system} {machine}"
        if group is None:
            return None
        if group.size() > MAX_WORLD:
            return f"the shared-memory transport serves at most {MAX_WORLD} ranks, not {group.size()}"
        if not os.access(SHM_DIR, os.W_OK):
            return f"{SHM_DIR} is not writable by this process (the segments live there)"
        return None

    @classmethod
    def setup(cls, pg: dist.ProcessGroup, rank: int, infos: Sequence[PeerInfo], config: TransportConfig,
              device: torch.device) -> tuple[ShmTransport | None, str]:
        """Create, exchange and unlink the segments (collective). Returns the transport, or
        None and the reason when any rank could not set up, in which case all agree."""
        world = len(infos)
        names = segment_names(infos[0].token, infos)
        remove_stale_segments()  # of earlier jobs whose ranks all died during set-up
        own: mmap.mmap | None = None
        peers: dict[int, mmap.mmap] = {}
        try:
            own, problem = _create_own(names[rank], rank, world, config)
            problem = agree(pg, problem)
            if problem is None:
                try:
                    peers = {p: _attach(names[p]) for p in range(world) if p != rank}
                    for p, mm in peers.items():
                        _check_peer(mm, p, infos[p], world)
                except (OSError, ValueError) as exc:
                    problem = f"rank {rank} could not map a peer's segment: {exc}"
                problem = agree(pg, problem)
        except Exception as exc:
            for name in names:  # a dead peer cannot unlink its own name: do it for it
                _unlink(name)
            raise CollectiveError(f"setting up the shared-memory transport of group {pg.group_name!r} failed on "
                                  f"rank {rank}: {exc}") from exc
        finally:
            _unlink(names[rank])
        if problem is not None:
            for mm in [own, *peers.values()]:
                if mm is not None:
                    mm.close()
            return None, problem
        return cls(group_name=pg.group_name, rank=rank, infos=infos, own=own, peers=peers, config=config), ""

    # ------------------------------------------------------------ caller side

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An output tensor; large ones come from the pool of released outputs."""
        return self._outputs.empty(shape, dtype)

    def all_to_all(self, inp: torch.Tensor, out: torch.Tensor, output_split_sizes: list[int],
                   input_split_sizes: list[int]) -> ShmWork:
        if self._closing:
            raise TransportBrokenError(f"group {self.group_name!r}: the shared-memory transport is closed")
        failure = self._peer_failure(None) if self._broken is None else None
        if failure is not None:  # a peer failed since our last collective: its error, here
            self.abort(failure)
            raise failure
        if self._broken is not None:
            raise TransportBrokenError(f"group {self.group_name!r}: an earlier collective failed, so the shared-memory "
                                       f"transport is unusable: {self._broken}")
        work = ShmWork(self, self._issued + 1, inp, out, output_split_sizes, input_split_sizes)
        self._issued = work.seq
        with self._cv:
            self._queue.append(work)
        if work.nbytes <= _INLINE_BYTES and self._engine.acquire(blocking=False):
            try:
                self._advance()
            finally:
                self._engine.release()
            if work.posted or work.event.is_set():
                return work  # the rest is receiving, done when the caller waits
        with self._cv:
            self._background = True
            self._cv.notify()
        return work

    def drive(self, work: ShmWork) -> None:
        """Step the queue in the caller's thread until ``work`` is complete or failed."""
        with self._cv:
            self._drivers += 1
            kick = self._background
        if kick:
            self._ring(self.rank)  # the copy thread, if it is the engine, steps aside
        bell = self._doorbell[self.rank]
        bell_addr = self._doorbell_addr[self.rank]
        try:
            with self._engine:
                # The stall clock starts at the latest when someone waits: time the caller
                # spent computing after all_to_all() is not a peer's delay.
                self._last_progress = max(self._last_progress, time.monotonic())
                while not work.event.is_set():
                    if self._closing:
                        self._fail(TransportBrokenError(f"group {self.group_name!r}: the transport was closed"))
                        break
                    seen = bell.value
                    self._advance()
                    if work.event.is_set():
                        break
                    futex.wait(bell_addr, seen, self.config.liveness_interval_s)
        finally:
            with self._cv:
                self._drivers -= 1
                if self._queue and self._background:
                    self._cv.notify()

    def abort(self, exc: Exception) -> None:
        """Fail this rank's transport from the caller's thread (a local error before a
        collective started) and tell the peers, so they raise instead of timing out."""
        with self._engine:
            self._fail(exc if isinstance(exc, CollectiveError) else CollectiveError(str(exc)))

    def close(self) -> None:
        if self._closing:
            return
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._ring(self.rank)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=5.0)
        if self.thread.is_alive() or not self._engine.acquire(timeout=5.0):
            return  # never unmap under a running copy; the process is likely exiting anyway
        try:
            if self._broken is None:
                self._status[self.rank].value = _CLOSED
            for p in list(self._doorbell):
                self._ring(p)
            self._release()
        finally:
            self._engine.release()

    def _release(self) -> None:
        for attr in ("_status", "_doorbell", "_head", "_tail", "_want", "_peer_head", "_peer_tail", "_peer_want",
                     "_out_ring", "_in_ring", "_pins"):
            getattr(self, attr).clear()
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                pass
        self._maps.clear()

    # ------------------------------------------------------------ copy thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug here must fail callers, never hang them
            log.exception("freescale: shared-memory copy thread of group %r crashed", self.group_name)
            self._fail(CollectiveError(f"copy thread of rank {self.rank} crashed: {exc!r}"))

    def _loop(self) -> None:
        bell = self._doorbell[self.rank]
        bell_addr = self._doorbell_addr[self.rank]
        while True:
            with self._cv:
                while not self._closing and not (self._background and self._queue and self._drivers == 0):
                    self._cv.wait()
                if self._closing:
                    return
            with self._engine:
                while not self._closing and self._drivers == 0:
                    seen = bell.value
                    if not self._advance():
                        break
                    futex.wait(bell_addr, seen, self.config.liveness_interval_s)
            with self._cv:
                if not self._queue:
                    self._background = False

    # ----------------------------------------------------------------- engine

    def _ring(self, peer: int) -> None:
        bell = self._doorbell.get(peer)
        if bell is None:
            return
        bell.value = ((next(self._bells) << 6) | self.rank) & 0x7FFFFFFF
        futex.wake(self._doorbell_addr[peer])

    def _advance(self) -> bool:
        """Move the queue as far as it goes without waiting (hold the engine lock). True if
        work remains. Failures are recorded on the works, never raised."""
        try:
            while self._queue:
                work = self._queue[0]
                if self._broken is not None:
                    raise TransportBrokenError(f"an earlier collective failed: {self._broken}")
                if work is not self._current:
                    self._current = work
                    self._last_progress = time.monotonic()
                    self._next_liveness = self._last_progress + self.config.liveness_interval_s
                if not self._step(work):
                    now = time.monotonic()
                    check_liveness = now >= self._next_liveness
                    failure = self._peer_failure(work)
                    if failure is not None:
                        raise failure
                    self._check_waiting(work, now - self._last_progress, check_liveness)
                    if check_liveness:
                        self._next_liveness = now + self.config.liveness_interval_s
                    return True
                self._last_progress = time.monotonic()
                if work.complete:
                    with self._cv:
                        self._queue.popleft()
                    work.event.set()
            return False
        except CollectiveError as exc:
            self._fail(exc)
            return False

    def _step(self, work: ShmWork) -> bool:
        """Move whatever can move without waiting; True if anything did."""
        progressed = False
        if work.self_copy is not None:
            ctypes.memmove(*work.self_copy)
            work.self_copy = None
            progressed = True
        for send in work.sends:
            if send.phase != _DONE_PHASE:
                progressed |= self._step_send(work, send)
        for recv in work.recvs:
            if recv.phase != _DONE_PHASE:
                progressed |= self._step_recv(work, recv)
        return progressed

    def _step_send(self, work: ShmWork, send: _Send) -> bool:
        p = send.peer
        size = self._ring_bytes[self.rank]
        head_word = self._head[p]
        head = start = head_word.value
        free = size - (head - self._peer_tail[p].value)
        if free < min(send.total - send.pos + (_HEADER_BYTES if send.phase == _HEADER_PHASE else 0), self._piece):
            # Not enough room to be worth a piece: ask p to ring when it frees space, then
            # look again (p may have consumed between our read and our flag).
            self._want[p].value = 1
            _fence()
            free = size - (head - self._peer_tail[p].value)
        if send.phase == _HEADER_PHASE:
            if free < _HEADER_BYTES:
                return False
            _HEADER.pack_into(self._maps[self.rank], self._ctrl + _ring_index(self.rank, p) * size + head % size,
                              work.seq, send.nbytes, work.row_bytes, self.rank, work.dtype_name)
            head += _HEADER_BYTES
            free -= _HEADER_BYTES
            send.phase = _PAYLOAD_PHASE
        n = min(send.total - send.pos, free, self._piece)
        if n > 0:
            data = min(n, send.nbytes - send.pos)
            if data > 0:
                _to_ring(self._out_ring[p], size, head, send.src + send.pos, data)
            send.pos += n
            head += n
        if send.pos == send.total:
            send.phase = _DONE_PHASE
        if head == start:
            return False
        self._want[p].value = 0
        head_word.value = head
        self._ring(p)
        return True

    def _step_recv(self, work: ShmWork, recv: _Recv) -> bool:
        p = recv.peer
        size = self._ring_bytes[p]
        tail_word = self._tail[p]
        tail = start = tail_word.value
        avail = self._peer_head[p].value - tail
        if recv.phase == _HEADER_PHASE:
            if avail < _HEADER_BYTES:
                return False
            offset = self._ctrl + _ring_index(p, self.rank) * size + tail % size
            seq, nbytes, row_bytes, sender, dtype = _HEADER.unpack_from(self._maps[p], offset)
            self._check_header(work, recv, seq, nbytes, row_bytes, sender, dtype.rstrip(b"\0"))
            tail += _HEADER_BYTES
            avail -= _HEADER_BYTES
            recv.phase = _PAYLOAD_PHASE
        n = min(recv.total - recv.pos, avail)
        if n > 0:
            data = min(n, recv.nbytes - recv.pos)
            if data > 0:
                _from_ring(self._in_ring[p], size, tail, recv.dst + recv.pos, data)
            recv.pos += n
            tail += n
        if recv.pos == recv.total:
            recv.phase = _DONE_PHASE
        if tail == start:
            return False
        tail_word.value = tail
        _fence()  # the tail store before the want-flag load (pairs with _step_send)
        if self._peer_want[p].value:
            self._ring(p)
        return True

    # ----------------------------------------------------------------- faults

    def _check_header(self, work: ShmWork, recv: _Recv, seq: int, nbytes: int, row_bytes: int, sender: int,
                      dtype: bytes) -> None:
        p, me, g = recv.peer, self.rank, self.group_name
        if sender != p or seq != work.seq:
            raise CollectiveError(f"group {g!r}: rank {me} is at all_to_all #{work.seq} but rank {p} sent "
                                  f"all_to_all #{seq} (sender field {sender}); the ranks issued different "
                                  "numbers of collectives on this group")
        if nbytes != recv.nbytes or row_bytes != work.row_bytes or dtype != work.dtype_name:
            raise SplitMismatchError(
                f"all_to_all #{seq} on group {g!r}: rank {p} sends rank {me} {_describe(nbytes, row_bytes, dtype)}, "
                f"but rank {me} expects {_describe(recv.nbytes, work.row_bytes, work.dtype_name)} from rank {p} "
                f"(output_split_sizes[{p}] on rank {me} must equal input_split_sizes[{me}] on rank {p})")

    def _peer_failure(self, work: ShmWork | None) -> CollectiveError | None:
        """The error a peer published, or, while ``work`` waits on it, the news that it
        closed its transport; None if neither. Reads shared words only (no lock)."""
        g, me = self.group_name, self.rank
        at = f"all_to_all #{work.seq if work is not None else self._issued + 1}"
        for p in range(self.world):
            status = self._status[p].value if p != me else _OK
            if status >= _FAILED:
                mm = self._maps[p]
                length = _i64(mm, _ERRLEN_OFF).value
                message = bytes(mm[_ERRMSG_OFF:_ERRMSG_OFF + min(length, _ERRMSG_MAX)]).decode(errors="replace")
                kind = _ERROR_KINDS[min(status - _FAILED, len(_ERROR_KINDS) - 1)]
                if kind is PeerDiedError:
                    kind = CollectiveError  # the dead rank is not p; p only reported it
                return kind(f"rank {p} failed, so rank {me} cannot run {at} on group {g!r}; rank {p} reported: "
                            f"{message}")
            if status == _CLOSED and work is not None and p in work.waiting_on():
                return PeerDiedError(f"{at} on group {g!r}: rank {p} closed its transport (process exiting or group "
                                     f"destroyed) while rank {me} waited for it")
        return None

    def _check_waiting(self, work: ShmWork, stalled_s: float, check_liveness: bool) -> None:
        waiting = work.waiting_on()
        g, me = self.group_name, self.rank
        if check_liveness:
            for p in waiting:
                if process_starttime(self._pids[p]) != self._starttimes[p]:
                    raise PeerDiedError(f"all_to_all #{work.seq} on group {g!r}: rank {p} (pid {self._pids[p]}) died "
                                        f"while rank {me} waited for it")
        if stalled_s > self.config.timeout_s:
            raise CollectiveTimeoutError(
                f"all_to_all #{work.seq} on group {g!r}: rank {me} made no progress with rank(s) {waiting} for "
                f"{stalled_s:.1f}s (timeout_s={self.config.timeout_s}); they are alive, so they are stuck before this "
                "collective or issued collectives on this group in a different order")

    def _fail(self, exc: CollectiveError) -> None:
        """Break the transport: the head work gets ``exc``, the queued ones a broken-transport
        error, and the peers are told."""
        with self._cv:
            failed = list(self._queue)
            self._queue.clear()
        head = failed[0] if failed else None
        if self._broken is None:
            self._broken = exc
            if self._maps:
                self._publish_error(exc, head.seq if head is not None else 0)
        for w in failed:
            w.error = exc if w is head else TransportBrokenError(f"an earlier collective failed: {exc}")
            w.event.set()

    def _publish_error(self, exc: CollectiveError, seq: int) -> None:
        mm = self._maps[self.rank]
        message = str(exc).encode()[:_ERRMSG_MAX]
        mm[_ERRMSG_OFF:_ERRMSG_OFF + len(message)] = message
        _i64(mm, _ERRLEN_OFF).value = len(message)
        _i64(mm, _ERRSEQ_OFF).value = seq
        kind = next(i for i, cls in reversed(list(enumerate(_ERROR_KINDS))) if isinstance(exc, cls))
        self._status[self.rank].value = _FAILED + kind
        for p in self._doorbell:
            if p != self.rank:
                self._ring(p)


def _ring_index(owner: int, to: int) -> int:
    return to if to < owner else to - 1


def _describe(nbytes: int, row_bytes: int, dtype: bytes) -> str:
    rows = f"{nbytes // row_bytes} rows of " if row_bytes and nbytes % row_bytes == 0 else ""
    return f"{nbytes} bytes ({rows}{row_bytes}-byte {dtype.decode(errors='replace')} rows)"


def _to_ring(ring: int, size: int, pos: int, src: int, n: int) -> None:
    at = pos % size
    first = min(n, size - at)
    ctypes.memmove(ring + at, src, first)
    if first < n:
        ctypes.memmove(ring, src + first, n - first)


def _from_ring(ring: int, size: int, pos: int, dst: int, n: int) -> None:
    at = pos % size
    first = min(n, size - at)
    ctypes.memmove(dst, ring + at, first)
    if first < n:
        ctypes.memmove(dst + first, ring, n - first)


# ------------------------------------------------------------------------- setup


def _create_own(name: str, rank: int, world: int, config: TransportConfig) -> tuple[mmap.mmap | None, str | None]:
    stat = os.statvfs(SHM_DIR)
    free = stat.f_bavail * stat.f_frsize
    # Leave half of /dev/shm to others; every rank of the group sizes itself alike.
    ring = min(config.ring_bytes, free // (2 * world * (world - 1))) & ~4095
    if ring < _MIN_RING:
        return None, (f"{SHM_DIR} has {free >> 20} MiB free, too little for {world - 1} rings of at least "
                      f"{_MIN_RING >> 10} KiB per rank")
    try:
        mm = _create(name, _ctrl_bytes(world) + (world - 1) * ring)
    except OSError as exc:
        return None, f"rank {rank} could not create {SHM_DIR}/{name}: {exc}"
    _i64(mm, _PID_OFF).value = os.getpid()
    _i64(mm, _RING_OFF).value = ring
    _i64(mm, _WORLD_OFF).value = world
    _i64(mm, _MAGIC_OFF).value = _MAGIC
    return mm, None


def _check_peer(mm: mmap.mmap, peer: int, info: PeerInfo, world: int) -> None:
    magic, pid, world_seen = _i64(mm, _MAGIC_OFF).value, _i64(mm, _PID_OFF).value, _i64(mm, _WORLD_OFF).value
    if magic != _MAGIC or pid != info.pid or world_seen != world:
        raise ValueError(f"segment of rank {peer} has magic {magic:#x}, pid {pid}, world {world_seen}; expected "
                         f"{_MAGIC:#x}, {info.pid}, {world}")

