"""Choosing and caching the transport behind ``freescale::all_to_all_single``.

Per process group and device type, the first collective runs a one-time setup (itself a
collective: every rank of the group reaches it at the same call, because collectives on a
group are issued in the same order everywhere):

1. ranks exchange a :class:`PeerInfo` (host identity, pid, a random token, the transport
   kind asked for) with the group's own ``all_gather_object``;
2. the copy-engine path (CUDA symmetric memory, or shared memory for CPU tensors) is used
   only when every rank of the group reports the same host identity; otherwise, and
   whenever setup of that path fails on any rank, every rank falls back to the group's own
   collective (NCCL, gloo), so multi-node jobs keep NCCL/gloo between nodes.

The decision is computed from the gathered infos, so it is the same on every rank.

**Cache.** Transports live in a per-process dict keyed by (group name, device type). An
entry is dropped and its transport closed when the group name resolves to a different
process group object (the group was destroyed and the name reused), when the group object
is garbage-collected, by :func:`close_all`, and at interpreter exit. Nothing here needs
resetting between tests: a new process group gets a new transport.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import os
import secrets
import socket
import sys
import threading
import weakref
from typing import Any, Protocol

import torch
import torch.distributed as dist

from fsc.errors import FscError

log = logging.getLogger(__name__)

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
    """Options of one group's transport; set with :func:`configure` on every rank before the
    group's first freescale collective."""

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
    machine: str


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


class Work(Protocol):
    """One collective in flight. ``wait`` returns the output once it is complete."""

    def wait(self) -> torch.Tensor: ...


class Transport(Protocol):
    name: str
    reason: str
    """Why this transport was chosen (shown by :func:`describe`)."""

    def start(self, inp: torch.Tensor, out: torch.Tensor, output_split_sizes: list[int],
              input_split_sizes: list[int]) -> Work: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------ group fallback


@dataclasses.dataclass(slots=True)
class _GroupWork:
    handle: Any
    out: torch.Tensor

    def wait(self) -> torch.Tensor:
        if self.handle is not None:
            self.handle.wait()
            self.handle = None
        return self.out


class GroupTransport:
    """The group's own all-to-all (NCCL, gloo), issued asynchronously."""

    name = "group"

    def __init__(self, group: dist.ProcessGroup, reason: str) -> None:
        self.group = group
        self.reason = reason

    def start(self, inp: torch.Tensor, out: torch.Tensor, output_split_sizes: list[int],
              input_split_sizes: list[int]) -> Work:
        handle = dist.all_to_all_single(out, inp, output_split_sizes, input_split_sizes, group=self.group,
                                        async_op=True)
        return _GroupWork(handle, out)

    def close(self) -> None:
        pass


class _LocalTransport:
    """A group of one: the all-to-all is a copy."""

    name = "local"
    reason = "group of one rank"

    def start(self, inp: torch.Tensor, out: torch.Tensor, output_split_sizes: list[int],
              input_split_sizes: list[int]) -> Work:
        out.copy_(inp)
        return _GroupWork(None, out)

    def close(self) -> None:
        pass


# -------------------------------------------------------------------------- cache


@dataclasses.dataclass(slots=True)
class _Entry:
    group: weakref.ref
    config: TransportConfig
    transports: dict[str, Transport] = dataclasses.field(default_factory=dict)

    def close(self) -> None:
        for transport in self.transports.values():
            try:
                transport.close()
            except Exception as exc:  # closing is best effort; the process may be exiting
                log.debug("freescale: closing transport %s failed: %s", transport.name, exc)
        self.transports.clear()


# The per-process transport cache (see the module docstring for its lifetime).
_ENTRIES: dict[str, _Entry] = {}
_LOCK = threading.RLock()  # re-entrant: a finalizer may drop an entry while the lock is held


def _resolve(group: dist.ProcessGroup | str | None) -> dist.ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group

    if group is None:
        return dist.group.WORLD
    if isinstance(group, str):
        return _resolve_process_group(group)
    return group


def _entry_for(pg: dist.ProcessGroup, config: TransportConfig | None) -> _Entry:
    name = pg.group_name
    entry = _ENTRIES.get(name)
    if entry is not None and entry.group() is not pg:
        entry.close()  # the group was destroyed and its name reused
        entry = None
    if entry is None:
        entry = _Entry(group=weakref.ref(pg), config=config or TransportConfig())
        _ENTRIES[name] = entry
        weakref.finalize(pg, _drop, name, entry)
    return entry


def _drop(name: str, entry: _Entry) -> None:
    entry.close()
    with _LOCK:
        if _ENTRIES.get(name) is entry:
            del _ENTRIES[name]


def configure(group: dist.ProcessGroup | str | None = None, **options: Any) -> TransportConfig:
    """Set the transport options of ``group`` (default: the world group) on this rank.

    Call it on every rank before the group's first freescale collective; changing the
    options of a group whose transport exists already raises.
    """
    config = TransportConfig(**options)
    pg = _resolve(group)
    with _LOCK:
        entry = _entry_for(pg, config)
        if entry.transports and entry.config != config:
            raise TransportConfigError(
                f"group {pg.group_name!r} already has a transport built with {entry.config}; "
                "configure it before its first freescale collective")
        entry.config = config
    return config


def transport_for(group: dist.ProcessGroup | str, device: torch.device) -> Transport:
    """The transport of ``group`` for tensors on ``device``, set up on first use (a
    collective: call it at the same point on every rank)."""
    pg = _resolve(group)
    with _LOCK:
        entry = _entry_for(pg, None)
        transport = entry.transports.get(device.type)
        if transport is None:
            transport = _setup(pg, device, entry.config)
            entry.transports[device.type] = transport
    return transport


def describe(group: dist.ProcessGroup | str | None = None) -> dict[str, tuple[str, str]]:
    """{device type: (transport name, why it was chosen)} for the transports built so far."""
    entry = _ENTRIES.get(_resolve(group).group_name)
    if entry is None:
        return {}
    return {dev: (t.name, t.reason) for dev, t in entry.transports.items()}


def close_all() -> None:
    """Close every transport of this process (also run at interpreter exit)."""
    with _LOCK:
        entries = list(_ENTRIES.values())
        _ENTRIES.clear()
    for entry in entries:
        entry.close()


atexit.register(close_all)


# -------------------------------------------------------------------------- setup


def _setup(pg: dist.ProcessGroup, device: torch.device, config: TransportConfig) -> Transport:
    world = dist.get_world_size(pg)
    if world == 1:
        return _LocalTransport()
    rank = dist.get_rank(pg)
    me = PeerInfo(
        rank=rank,
        host=config.host_identity or host_identity(),
        pid=os.getpid(),
        starttime=process_starttime(os.getpid()) or 0,
        token=secrets.token_hex(8),
        kind=config.kind,
        machine=f"{sys.platform}/{os.uname().machine}",
    )
    infos: list[Any] = [None] * world
    dist.all_gather_object(infos, me, group=pg)
    kinds = {info.kind for info in infos}
    if len(kinds) > 1:
        by_kind = ", ".join(f"rank {i.rank}: {i.kind}" for i in infos)
        raise TransportConfigError(f"ranks of group {pg.group_name!r} disagree on the transport kind ({by_kind})")
    reason = _ineligible(infos, device) if config.kind != "group" else "kind='group' was asked for"
    transport: Transport | None = None
    if reason is None:
        if device.type == "cpu":
            from fsc.runtime.shm_transport import ShmTransport

            transport, reason = ShmTransport.setup(pg, rank, infos, config)
        else:
            from fsc.runtime.cuda_transport import CudaTransport

            transport, reason = CudaTransport.setup(pg, rank, infos, config, device)
    if transport is not None:
        log.info("freescale: group %r (%s): %s transport for %d ranks", pg.group_name, device.type,
                 transport.name, world)
        return transport
    if config.kind == "copy-engine":
        raise TransportConfigError(f"group {pg.group_name!r}: the copy-engine transport is not available: {reason}")
    log.info("freescale: group %r (%s): using the group's own collective: %s", pg.group_name, device.type, reason)
    return GroupTransport(pg, reason)


def _ineligible(infos: list[PeerInfo], device: torch.device) -> str | None:
    """Why the copy-engine path cannot serve this group, or None."""
    hosts: dict[str, list[int]] = {}
    for info in infos:
        hosts.setdefault(info.host, []).append(info.rank)
    if len(hosts) > 1:
        spread = "; ".join(f"ranks {ranks}" for ranks in hosts.values())
        return f"ranks span {len(hosts)} hosts ({spread}); the copy-engine path needs one host"
    if device.type == "cpu":
        from fsc.runtime.shm_transport import unsupported_reason

        return unsupported_reason(infos)
    if device.type != "cuda":
        return f"no copy-engine transport for device type {device.type!r}"
    return None
