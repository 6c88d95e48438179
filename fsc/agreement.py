"""Cross-rank agreement on what each compiled graph communicates.

Ranks pair collectives by issue order on each process group. A graph whose collectives are
issued in a different order, split, transport or number on one rank than on its peers
does not fail: gloo pairs the wrong tensors of equal size and the step computes wrong
values. Every decision of the passes is meant to be a function of facts identical on every
rank, but the facts are not always identical (static shapes that differ per rank, one rank
recompiling alone after automatic dynamic shapes, one rank falling back, a cache serving
one rank, ranks given different options). So before a newly compiled aten graph first
runs, its ranks compare a **fingerprint**: per process group, its collectives in issue
order (identity, kind, transport, split structure, dtype).

**Protocol.** Out of band, through the default process group's store (never through the
collectives being checked). The graph's *slot* is its Dynamo frame and kind (``forward``,
``backward``, ``inference``); the *generation* counts this process's compiles of the slot.
Each rank publishes one payload per (slot, generation): the fingerprint of the graph as
rewritten, and as it was before the passes (so that ranks can still all fall back), the
reason it fell back or raised, its input shapes, its pipeline, and whether its code came
from a cache (then it cannot change). It then waits, polling, for the payload of the same
generation from every rank of the graph's groups, at most ``timeout_s``. A peer that has
not reached this generation but runs a graph of this slot with the same collectives (it
did not recompile when this rank did) is accepted after a short grace (``STALE_GRACE_S``):
the rank then *commits* to its rewritten form (a store key) and looks once more, and a peer
that compiles this generation later reads the commitment and must match it (or raise).

**Decision**, the same function of the payloads on every rank: if any rank raised
(``on_error="raise"``), all raise; if any rank fell back, all compile the graph
unrewritten; then the fingerprints every rank will run must be equal, or all raise
:class:`AgreementError` naming the graph, the first differing collective and the cause
(different input shapes, different pipelines, a fallback, a cache, a lone recompile).

**Cost.** One store write and one read per peer per compiled graph with collectives (no
collective, no agreement); nothing per step: the check runs at compile time, inside the
first call. :func:`agree` returns the seconds it waited, recorded in the graph's notes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from fsc.analysis.collectives import COLLECTIVE_ID, COLLECTIVE_KINDS, call_arg, opaque_collectives
from fsc.errors import AgreementError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
"""How long a rank waits for its peers' payloads by default (option ``agreement_timeout_s``):
long enough for a peer still compiling the same graph, short of gloo's 30 minutes."""

_PREFIX = "fsc-agree"
_POLL_S = (0.002, 0.05)  # first and longest sleep between store polls




def _fsc_all_to_all() -> Any:
    try:
        return torch.ops.fsc.all_to_all_single.default
    except (AttributeError, RuntimeError):  # runtime ops not registered in this process
        return None


def _split_structure(node: fx.Node) -> str:
    splits = call_arg(node, "output_split_sizes")
    if not isinstance(splits, (list, tuple)) or not splits:
        return "even splits"
    return f"{len(splits)} splits"


def _dtype(node: fx.Node) -> str:
    """The dtype of what the collective sends (its first input: a copy-engine start returns a handle)."""
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else node
    val = source.meta.get("val")
    return str(val.dtype).removeprefix("torch.") if isinstance(val, torch.Tensor) else "?"


def fingerprint(graph: fx.Graph) -> dict[str, list[str]]:
    """Per process group, one line per collective in issue order. Only what must be equal
    on every rank enters it: sizes may differ per rank, the order and kinds may not."""
    out: dict[str, list[str]] = {}
    copy_engine = _fsc_all_to_all()
    opaque = set(opaque_collectives(graph))
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        identity = node.meta.get(COLLECTIVE_ID, node.name)
        if node.target in COLLECTIVE_KINDS:
            kind = COLLECTIVE_KINDS[node.target]
            transport = "group collective"
        elif copy_engine is not None and node.target is copy_engine:
            kind, transport = "all_to_all_single", "copy-engine transport"
        elif node in opaque:
            out.setdefault("(opaque)", []).append(f"{identity}: {node.target} (opaque c10d call)")
            continue
        else:
            continue
        group = str(call_arg(node, "group_name"))
        detail = _split_structure(node) if kind == "all_to_all_single" else ""
        line = f"{identity}: {kind} via {transport}, {_dtype(node)}" + (f", {detail}" if detail else "")
        out.setdefault(group, []).append(line)
    return out


@dataclasses.dataclass(kw_only=True)
class Payload:
    """What one rank publishes for one compile of one graph."""

    rank: int
    rewritten: dict[str, list[str]] | None
    """Fingerprint of the rewritten graph; None when the passes failed here."""
    unrewritten: dict[str, list[str]] | None
    """Fingerprint before the passes (None when the code came from a cache: it is fixed)."""
    fallback: str | None = None
    raised: str | None = None
    shapes: list[str] = dataclasses.field(default_factory=list)
    pipeline: str = ""
    cached: bool = False
    host: str = ""

    def final(self, unrewritten: bool) -> dict[str, list[str]] | None:
        """What this rank will run: the unrewritten graph if its passes failed, the cached
        code if it came from a cache, else the form the decision picks."""
        if self.rewritten is None:
            return self.unrewritten
        return self.unrewritten if unrewritten and not self.cached else self.rewritten

    def dumps(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def loads(cls, text: bytes | str) -> Payload:
        return cls(**json.loads(text))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decision:
    fall_back: bool
    """Every rank compiles the graph unrewritten (some rank's passes failed)."""
    why: str = ""
    waited_s: float = 0.0
    alone: bool = False
    """This rank and some peer do not run this compile together (one recompiled alone and
    committed to it): anything that would run the graph's collectives outside a real step,
    such as ``verify``'s check, would pair them with the peer's step."""


def _groups_ranks(groups: Sequence[str]) -> list[int] | None:
    """Global ranks of the named process groups (None when one cannot be resolved)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    ranks: set[int] = set()
    for name in groups:
        try:
            ranks.update(dist.get_process_group_ranks(_resolve_process_group(name)))
        except Exception:  # noqa: BLE001 - a group this process cannot name: no agreement
            return None
    return sorted(ranks)


def needed(fp: dict[str, list[str]] | None) -> bool:
    """Whether a graph with this fingerprint needs agreeing on (it communicates, with peers)."""
    return bool(fp) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_generations: dict[str, int] = {}

STALE_GRACE_S = 1.0
"""How long a rank waits for a peer's compile of the same generation before accepting the
peer's earlier compile with the same collectives (at most a quarter of the timeout)."""

CHECKED_GRACE_S = 60.0
"""The grace when the graph will be checked by ``verify`` (at most a quarter of the
timeout): a peer that is merely compiling slower must not be taken for one that did not
recompile, since the check runs only when the ranks compiled together."""


def agree(
    slot: str,
    graph_name: str,
    payload: Payload,
    *,
    timeout_s: float,
    wait: bool = True,
    grace_s: float = STALE_GRACE_S,
) -> Decision:
    """Publish ``payload`` for ``slot`` and, with ``wait``, decide with every peer of the
    graph's groups (see the module docstring); ``grace_s`` bounds the wait before a peer's
    earlier compile is accepted. Raises :class:`AgreementError` on a mismatch or a timeout,
    on every rank that waits."""
    fps = payload.rewritten if payload.rewritten is not None else payload.unrewritten
    groups = sorted(g for g in (fps or {}) if g != "(opaque)")
    ranks = _groups_ranks(groups) or list(range(dist.get_world_size()))
    try:
        store = dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError) as exc:  # a process group without a store: nothing to agree through
        log.warning("freescale: %s: collectives not checked across ranks (no default store: %s)", graph_name, exc)
        return Decision(fall_back=payload.rewritten is None)
    gen = _generations.get(slot, 0)
    _generations[slot] = gen + 1
    me = payload.rank
    store.set(f"{_PREFIX}/{slot}/{me}/{gen}", payload.dumps())
    store.set(f"{_PREFIX}/{slot}/{me}/latest", str(gen))
    if payload.raised is not None or not wait:
        return Decision(fall_back=payload.rewritten is None)
    start = time.monotonic()
    grace = min(grace_s, timeout_s / 4)
    peers = [r for r in ranks if r != me]
    got: dict[int, Payload] = {me: payload}
    stale: dict[int, Payload] = {}
    committed: dict[int, dict[str, list[str]] | None] = {}
    sleep = _POLL_S[0]
    while True:
        for r in peers:
            if r not in got and _read(store, slot, r, gen, got, committed):
                stale.pop(r, None)
            elif r not in got:
                previous = _latest(store, slot, r, gen)
                if previous is not None:
                    stale[r] = previous
        raised = next((p for p in got.values() if p.raised is not None), None)
        if raised is not None:
            raise AgreementError(f"{graph_name}: rank {raised.rank} failed compiling it and every rank stops too: "
                                 f"{raised.raised}")
        if all(r in got for r in peers):
            break
        waited = time.monotonic() - start
        accepted = {r: p for r, p in stale.items() if _same(p.final(False), payload.final(False))}
        if waited >= grace and accepted and all(r in got or r in accepted for r in peers):
            # The late peers run an earlier compile of this graph with the same collectives: this rank
            # recompiled alone. Commit to running the rewritten form, then look once more: a peer that
            # published meanwhile reads the commitment (it writes, then reads; this rank writes, then reads).
            committed[me] = payload.final(False)
            store.set(f"{_PREFIX}/{slot}/{me}/{gen}/committed", json.dumps(committed[me]))
            for r in list(accepted):
                if _read(store, slot, r, gen, got, committed):
                    del accepted[r]
            break
        if waited > timeout_s:
            missing = [r for r in peers if r not in got and r not in accepted]
            raise AgreementError(_timeout_message(graph_name, slot, gen, missing, stale, payload, timeout_s))
        time.sleep(sleep)
        sleep = min(sleep * 2, _POLL_S[1])
    accepted = {r: p for r, p in stale.items() if r not in got}  # only what the commit path accepted is left
    decision = decide(graph_name, me, got, accepted, committed)
    alone = bool(accepted) or any(r != me for r in committed)
    return dataclasses.replace(decision, waited_s=time.monotonic() - start, alone=alone)


def decide(graph_name: str, me: int, got: dict[int, Payload], accepted: dict[int, Payload] | None = None,
           committed: dict[int, dict[str, list[str]] | None] | None = None) -> Decision:
    """The decision of rank ``me`` from every rank's payload of this generation (``got``),
    the late peers' earlier compiles it accepted, and the forms ranks committed to: the
    same function on every rank. Raises :class:`AgreementError` on any difference."""
    accepted, committed = accepted or {}, committed or {}
    payload = got[me]
    # a rank that committed runs what it committed to; the others fall back together if any rank must
    fall_back = any(p.rewritten is None for r, p in got.items() if r not in committed)
    finals = {r: committed[r] if r in committed else p.final(fall_back) for r, p in got.items()}
    finals.update({r: p.final(False) for r, p in accepted.items() if r not in got})
    everyone = {**accepted, **got}
    mine = finals[me]
    for r in sorted(finals):
        if not _same(finals[r], mine):
            raise AgreementError(_mismatch_message(graph_name, everyone, finals, me, r, fall_back))
    why = ""
    if fall_back and me not in committed and payload.rewritten is not None:
        culprit = next(p for p in got.values() if p.rewritten is None)
        why = (f"rank {culprit.rank} could not rewrite it ({culprit.fallback}); every rank of its process "
               "groups compiles it unrewritten")
    return Decision(fall_back=fall_back and me not in committed, why=why)


def _read(store: Any, slot: str, rank: int, gen: int, got: dict[int, Payload],
          committed: dict[int, dict[str, list[str]] | None]) -> bool:
    """Read ``rank``'s payload of generation ``gen`` into ``got`` (and what it committed to
    running, if it decided before it saw this rank's); False when it has not published it."""
    key = f"{_PREFIX}/{slot}/{rank}/{gen}"
    if not store.check([key]):
        return False
    got[rank] = Payload.loads(store.get(key))
    if store.check([f"{key}/committed"]):
        committed[rank] = json.loads(store.get(f"{key}/committed"))
    return True


def _latest(store: Any, slot: str, rank: int, gen: int) -> Payload | None:
    """The payload of ``rank``'s newest generation of ``slot`` below ``gen`` (None: none)."""
    key = f"{_PREFIX}/{slot}/{rank}/latest"
    if not store.check([key]):
        return None
    latest = int(store.get(key))
    if latest >= gen:
        return None
    return Payload.loads(store.get(f"{_PREFIX}/{slot}/{rank}/{latest}"))


def _same(a: dict[str, list[str]] | None, b: dict[str, list[str]] | None) -> bool:
    return (a or {}) == (b or {})


def first_difference(a: dict[str, list[str]] | None, b: dict[str, list[str]] | None) -> str:
    """Where two fingerprints first differ, in words."""
    a, b = a or {}, b or {}
    for group in sorted(set(a) | set(b)):
        left, right = a.get(group, []), b.get(group, [])
        for i in range(max(len(left), len(right))):
            x = left[i] if i < len(left) else "(nothing)"
            y = right[i] if i < len(right) else "(nothing)"
            if x != y:
                return f"collective #{i} on group {group!r}: {x} vs {y}"
    return "no difference"


def _cause(everyone: dict[int, Payload], me: int, other: int) -> str:
    a, b = everyone[me], everyone[other]
    causes = []
    if a.pipeline != b.pipeline:
        causes.append(f"the ranks' pipelines differ (rank {me}: {a.pipeline!r}; rank {other}: {b.pipeline!r})")
    if a.shapes and b.shapes and a.shapes != b.shapes:
        causes.append(f"the ranks compiled it for different input shapes ({_shape_difference(a, b)}); mark the "
                      "varying dimensions dynamic (torch._dynamo.mark_dynamic) or make them equal on every rank")
    for p in (a, b):
        if p.cached:
            causes.append(f"rank {p.rank} was served this graph's code from a cache")
        if p.rewritten is None and p.fallback:
            causes.append(f"rank {p.rank} fell back: {p.fallback}")
    return "; ".join(causes) or "unknown (same pipeline and input shapes)"


def _mismatch_message(graph_name: str, everyone: dict[int, Payload], finals: dict[int, Any], me: int, other: int,
                      fall_back: bool) -> str:
    where = first_difference(finals[me], finals[other])
    form = "unrewritten" if fall_back else "compiled"
    return (f"{graph_name}: rank {me} and rank {other} would issue different collectives ({form} form), so gloo/NCCL "
            f"would pair the wrong tensors; first difference: {where}. Cause: {_cause(everyone, me, other)}.")


def _timeout_message(graph_name: str, slot: str, gen: int, missing: list[int], stale: dict[int, Payload],
                     payload: Payload, timeout_s: float) -> str:
    parts = []
    for r in missing:
        if r in stale:
            where = first_difference(payload.final(False), stale[r].final(False))
            parts.append(f"rank {r} runs an earlier compile of this graph with other collectives ({where}): "
                         f"this rank recompiled it alone (its compile #{gen + 1}; "
                         f"{_shape_difference(payload, stale[r]) or 'same input shapes'})")
        else:
            parts.append(f"rank {r} has not compiled it (dead, stuck, far behind, or it has no collectives there)")
    return (f"{graph_name}: no agreement with rank(s) {missing} within {timeout_s:g} s (option "
            f"agreement_timeout_s): " + "; ".join(parts) + ".")


def _shape_difference(a: Payload, b: Payload, most: int = 3) -> str:
    diffs = [f"input {i}: {x} on rank {a.rank}, {y} on rank {b.rank}"
             for i, (x, y) in enumerate(zip(a.shapes, b.shapes)) if x != y]
    if len(a.shapes) != len(b.shapes):
        diffs.insert(0, f"{len(a.shapes)} inputs on rank {a.rank}, {len(b.shapes)} on rank {b.rank}")
    return "; ".join(diffs[:most]) + (f"; and {len(diffs) - most} more" if len(diffs) > most else "")


def input_shapes(graph: fx.Graph) -> list[str]:
    """Each input's shape as the graph was compiled for it (symbols for dynamic sizes)."""
    out = []
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            out.append("[" + ",".join(str(s) for s in val.shape) + "]")
        else:
            out.append(str(val) if isinstance(val, (int, torch.SymInt)) else type(val).__name__)
    return out
