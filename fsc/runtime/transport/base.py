"""What every transport shares: the interface, the errors, the options, what ranks exchange
at setup, the fallbacks (the group's own collective, a group of one) and :func:`agree`.

A transport moves one process group's all-to-alls for tensors of one device type. The
copy-engine transports (the table in :mod:`fsc.runtime.transport`, keyed by device type)
implement :class:`CopyEngineTransport`: ``available`` (can this process serve the device,
and why not), ``setup`` (a collective that builds it on every rank of a group, or declines
on all of them), ``all_to_all`` (start one exchange; its :class:`Work` waits for it).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import os
import socket
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist

from fsc.errors import FscError

KINDS = ("auto", "copy-engine", "group")
"""``auto``: copy-engine path when eligible, else the group's collective. ``copy-engine``:
the same, but an ineligible group raises instead of falling back. ``group``: always the
group's own collective."""


class CollectiveError(FscError, RuntimeError):
    """A freescale collective failed; the message names the group, the collective's
    sequence number and the ranks involved."""


class PeerDiedError(CollectiveError):
    """A peer process of the group died while this rank waited on it."""


class CollectiveTimeoutError(CollectiveError):
    """A peer stayed alive but sent nothing for longer than the configured timeout."""


class SplitMismatchError(CollectiveError):
    """Two ranks disagree on how much one sends the other (or on dtype or row size)."""


class TransportBrokenError(CollectiveError):
    """An earlier collective on this group failed; the transport does not recover."""


class TransportConfigError(FscError, ValueError):
    """A bad transport option, or ranks that disagree on one."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TransportConfig:
    """Options of one group's transport; set with :func:`fsc.runtime.configure` on every
    rank before the group's first freescale collective."""

    kind: str = "auto"
    timeout_s: float = 300.0
    """How long a rank waits without progress on a live peer before raising. A dead peer is
    detected within ``liveness_interval_s`` instead."""
    liveness_interval_s: float = 0.05
    ring_bytes: int = 8 << 20
    """Shared-memory ring per ordered pair of ranks (CPU path); shrunk to fit /dev/shm."""
    output_pool_bytes: int = 256 << 20
    """Released CPU outputs of 1 MiB or more kept for reuse (0: none)."""
    host_identity: str | None = None
    """Override of this rank's host identity (tests simulating several hosts; containers
    on one host that share /dev/shm but not a hostname)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TransportConfigError(f"transport kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.timeout_s > 0 or not self.liveness_interval_s > 0:
            raise TransportConfigError(
                f"timeout_s={self.timeout_s} and liveness_interval_s={self.liveness_interval_s} must be > 0")
        if self.ring_bytes < 64 << 10:
            raise TransportConfigError(f"ring_bytes={self.ring_bytes} is below the 64 KiB minimum")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PeerInfo:
    """What ranks exchange once per group and device type."""

    rank: int
    host: str
    pid: int
    starttime: int
    """Process start time (clock ticks since boot, /proc/PID/stat field 22): with the pid,
    it tells a live peer from a new process that reused a dead peer's pid."""
    token: str
    kind: str
    unavailable: str | None
    """This rank's answer to the device's ``available`` (None: it can serve the device)."""


def host_identity() -> str:
    """What makes two processes able to share /dev/shm, device memory handles and pids:
    hostname, boot id, and the IPC, PID and mount namespaces (a container on the same
    machine with its own /dev/shm differs)."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append("no-boot-id")
    for ns in ("ipc", "pid", "mnt"):
        try:
            parts.append(f"{ns}:{os.stat(f'/proc/self/ns/{ns}').st_ino}")
        except OSError:
            parts.append(f"{ns}:?")
    try:
        parts.append(f"shm:{os.stat('/dev/shm').st_dev}")
    except OSError:
        parts.append("shm:?")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def process_starttime(pid: int) -> int | None:
    """Start time of ``pid`` from /proc, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def agree(pg: dist.ProcessGroup, problem: str | None) -> str | None:
    """Gather every rank's problem (None if fine); all ranks return the first one, so a
    setup step that failed anywhere is declined everywhere. Collective over ``pg``."""
    problems: list[Any] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(problems, problem, group=pg)
    return next((p for p in problems if p is not None), None)


# ------------------------------------------------------------------- interface


class Work(Protocol):
    """One collective in flight. ``wait`` returns the output once it is complete."""

    def wait(self) -> torch.Tensor: ...


class Transport(abc.ABC):
    """The all-to-all of one process group for tensors of one device type."""

    name: ClassVar[str]
    reason: str
    """Why this transport was chosen (shown by :func:`fsc.runtime.describe`)."""

    @abc.abstractmethod
    def all_to_all(self, inp: torch.Tensor, out: torch.Tensor, output_split_sizes: list[int],
                   input_split_sizes: list[int]) -> Work:
        """Start the exchange of contiguous ``inp`` into ``out`` (row counts per rank, as
        ``torch.distributed.all_to_all_single``); ``wait`` on the result completes it."""

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An output tensor for :meth:`all_to_all` (a transport may hand out reused memory)."""
        return torch.empty(shape, dtype=dtype, device=device)

    def abort(self, exc: Exception) -> None:
        """Fail this rank's transport before a collective started (a local error), telling
        the peers where the transport can, so that they raise instead of timing out."""

    def close(self) -> None:
        """Release what the transport holds; later collectives on it raise."""


class CopyEngineTransport(Transport):
    """A transport of the table: the copy-engine path of one device type (no SMs on a GPU,
    no gloo threads on CPU ranks), between the ranks of a group on one host."""

    @classmethod
    @abc.abstractmethod
    def available(cls, device: torch.device, group: dist.ProcessGroup | None = None) -> str | None:
        """None if this process can serve tensors on ``device``, else why not, in words a
        user can act on. Never a collective. With no ``group`` (compile time), only facts
        of this torch build and platform, which every rank of a job shares; with one, also
        facts of this process and the group's size. Setup gathers every rank's answer."""

    @classmethod
    @abc.abstractmethod
    def setup(cls, pg: dist.ProcessGroup, rank: int, infos: Sequence[PeerInfo], config: TransportConfig,
              device: torch.device) -> tuple[CopyEngineTransport | None, str]:
        """Build the transport on every rank of ``pg`` (a collective; every rank found it
        available and all run on one host), or decline on all of them: ``(None, reason)``."""


# -------------------------------------------------------------------- fallbacks


@dataclasses.dataclass(slots=True)
class _GroupWork:
    handle: Any
    out: torch.Tensor

    def wait(self) -> torch.Tensor:
        if self.handle is not None:
            self.handle.wait()
            self.handle = None
        return self.out


class GroupTransport(Transport):
    """The group's own all-to-all (NCCL, gloo), issued asynchronously."""

    name = "group"

    def __init__(self, group: dist.ProcessGroup, reason: str) -> None:
        self.group = group
        self.reason = reason

    def all_to_all(self, inp: torch.Tensor, out: torch.Tensor, output_split_sizes: list[int],
                   input_split_sizes: list[int]) -> Work:
        handle = dist.all_to_all_single(out, inp, output_split_sizes, input_split_sizes, group=self.group,
                                        async_op=True)
        return _GroupWork(handle, out)


class LocalTransport(Transport):
    """A group of one: the all-to-all is a copy."""

    name = "local"
    reason = "group of one rank"

    def all_to_all(self, inp: torch.Tensor, out: torch.Tensor, output_split_sizes: list[int],
                   input_split_sizes: list[int]) -> Work:
        out.copy_(inp)
        return _GroupWork(None, out)
