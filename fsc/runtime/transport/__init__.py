"""The transports behind ``fsc::all_to_all_single``, chosen per process group and device type.

**The table.** :data:`TRANSPORTS` maps a device type to its copy-engine transport
(:class:`~fsc.runtime.transport.base.CopyEngineTransport`): shared memory for CPU ranks
(:mod:`fsc.runtime.transport.shm`), CUDA symmetric memory and copy engines for GPU ranks
(:mod:`fsc.runtime.transport.cuda`). A new device type is one module and one line here.
:func:`available` is the one answer to "can a copy-engine transport serve this device": the
sm-free-collectives pass asks it at compile time, setup at run time.

**Setup.** Per process group and device type, the first collective runs a one-time setup
(itself a collective: every rank of the group reaches it at the same call, because
collectives on a group are issued in the same order everywhere):

1. ranks exchange a :class:`PeerInfo` (host identity, pid, a random token, the transport
   kind asked for, and the rank's own answer to :func:`available`) with the group's own
   ``all_gather_object``;
2. the copy-engine transport is used only when every rank of the group reports the same
   host identity and finds it available; otherwise, and whenever its setup fails on any
   rank, every rank falls back to the group's own collective (NCCL, gloo), so multi-node
   jobs keep NCCL/gloo between nodes.

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
import logging
import os
import secrets
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from fsc.runtime.transport.base import (
    KINDS,
    CollectiveError,
    CollectiveTimeoutError,
    CopyEngineTransport,
    GroupTransport,
    LocalTransport,
    PeerDiedError,
    PeerInfo,
    SplitMismatchError,
    Transport,
    TransportBrokenError,
    TransportConfig,
    TransportConfigError,
    Work,
    agree,
    host_identity,
    process_starttime,
)
from fsc.runtime.transport.cuda import CudaTransport
from fsc.runtime.transport.shm import ShmTransport

log = logging.getLogger(__name__)

TRANSPORTS: Mapping[str, type[CopyEngineTransport]] = {
    "cpu": ShmTransport,
    "cuda": CudaTransport,
}
"""The copy-engine transport of each device type."""


def available(device: torch.device | str, group: dist.ProcessGroup | None = None) -> str | None:
    """None if a copy-engine transport can serve tensors on ``device`` in this process,
    else why not (see :meth:`CopyEngineTransport.available` for what ``group`` adds)."""
    device = torch.device(device)
    transport = TRANSPORTS.get(device.type)
    if transport is None:
        return f"no copy-engine transport for device type {device.type!r}"
    return transport.available(device, group)


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
        return LocalTransport()
    rank = dist.get_rank(pg)
    me = PeerInfo(
        rank=rank,
        host=config.host_identity or host_identity(),
        pid=os.getpid(),
        starttime=process_starttime(os.getpid()) or 0,
        token=secrets.token_hex(8),
        kind=config.kind,
        unavailable=None if config.kind == "group" else available(device, pg),
    )
    infos: list[Any] = [None] * world
    dist.all_gather_object(infos, me, group=pg)
    kinds = {info.kind for info in infos}
    if len(kinds) > 1:
        by_kind = ", ".join(f"rank {i.rank}: {i.kind}" for i in infos)
        raise TransportConfigError(f"ranks of group {pg.group_name!r} disagree on the transport kind ({by_kind})")
    reason = ineligible(infos) if config.kind != "group" else "kind='group' was asked for"
    transport: Transport | None = None
    if reason is None:
        transport, reason = TRANSPORTS[device.type].setup(pg, rank, infos, config, device)
    if transport is not None:
        log.info("freescale: group %r (%s): %s transport for %d ranks", pg.group_name, device.type,
                 transport.name, world)
        return transport
    if config.kind == "copy-engine":
        raise TransportConfigError(f"group {pg.group_name!r}: the copy-engine transport is not available: {reason}")
    log.info("freescale: group %r (%s): using the group's own collective: %s", pg.group_name, device.type, reason)
    return GroupTransport(pg, reason)


def ineligible(infos: Sequence[PeerInfo]) -> str | None:
    """Why the copy-engine transport cannot serve the ranks with these infos, or None: they
    span hosts, or a rank found it unavailable (the first such rank is named)."""
    hosts: dict[str, list[int]] = {}
    for info in infos:
        hosts.setdefault(info.host, []).append(info.rank)
    if len(hosts) > 1:
        spread = "; ".join(f"ranks {ranks}" for ranks in hosts.values())
        return f"ranks span {len(hosts)} hosts ({spread}); the copy-engine path needs one host"
    return next((f"rank {i.rank}: {i.unavailable}" for i in infos if i.unavailable is not None), None)


__all__ = [
    "KINDS",
    "TRANSPORTS",
    "CollectiveError",
    "CollectiveTimeoutError",
    "CopyEngineTransport",
    "CudaTransport",
    "GroupTransport",
    "LocalTransport",
    "PeerDiedError",
    "PeerInfo",
    "ShmTransport",
    "SplitMismatchError",
    "Transport",
    "TransportBrokenError",
    "TransportConfig",
    "TransportConfigError",
    "Work",
    "agree",
    "available",
    "close_all",
    "configure",
    "describe",
    "host_identity",
    "ineligible",
    "process_starttime",
    "transport_for",
]
