"""Routing a global batch's samples, and chunks of split samples, to the ranks a
:class:`~fsc.runtime.balancer.Balancer` assigns them to; and the key/value exchange that
gives a chunk the keys and values of its sample's earlier chunks.

Per step:

1. :meth:`Router.plan`: all-gather the local samples' token counts (a few int64s per
   rank) and run the balancer; every rank computes the same :class:`Plan` (the assignment
   is a pure function of the lengths). :meth:`Router.plan_async` does this on a background
   thread with its own process group, so the plan of batch i+1 is ready while step i runs.
   A plan lists *pieces*: a whole sample, or, with ``Balancer(split=True)``, a contiguous
   chunk ``[start, stop)`` of one (:mod:`fsc.runtime.balance_split`).
2. :meth:`Router.route`: the batch is columns, whatever the model reads: *token columns*
   (any number of tensors with one row per token, 1-D or more) and *sample columns* (one
   row per sample). Each piece's token rows go to its rank; every column is viewed as
   bytes and packed, destination by destination, into one ``uint8`` buffer, exchanged
   with one ``all_to_all_single`` per step (whatever the columns' dtypes). Split sizes need
   no extra exchange: every rank knows every piece's length and rank. Sample columns
   travel with *every* chunk of a split sample (one row per piece): a model whose every
   token reads its sample's rows (the HSTU example scores each token against its
   sample's negatives) needs them on each chunk's rank, and a split sample costs at most
   ``R - 1`` extra rows. Pieces arrive in global order (sample, then start).

A routed batch (:class:`Routed`) carries, per piece, the sample's index in the global
batch, ``q_start`` (the piece's first absolute position), the sample's full length, the
ranks holding its earlier chunks, and the global token count: dividing each rank's summed
per-token loss by it gives the gradient of the global mean, split or not (see
:func:`fsc.runtime.balance_dist.loss_normalizer`; here it needs no all-reduce, the plan
knows every length). It also carries a :class:`PrefixExchange`, the index tensors that
:func:`prefix_kv` needs inside each attention layer:

- ``send_index``: this rank's token rows that other ranks' later chunks read, grouped by
  destination; ``send_sizes`` / ``recv_sizes`` ``[W]`` their counts per rank (plus two
  padding rows each rank sends itself, so that no buffer is 0 or 1 rows long: sizes a
  compiler specialises, and a step that split after one that did not would recompile);
- ``kv_index``: per piece, its keys ``[0, stop)`` as rows of ``cat([own tokens, received])``
  (the earlier chunks' tokens in token order, then its own);
- ``kv_offsets`` and ``q_start``: the key extents and query starts that
  :func:`fsc.kernels.jagged_attention.jagged_attention` takes for chunks.

:func:`prefix_kv` moves keys and values with one autograd functional all-to-all per call
(``all_to_all_single_autograd``: the gradients of the received rows flow back to their
owners), so under ``torch.compile`` the exchange is in the forward and backward graphs where
fsc's scheduling passes see it. Its split sizes are tensors turned into sizes inside the
graph (``.tolist()``: unbacked SymInts, with ``torch._dynamo.config.capture_scalar_outputs``),
so a new plan does not recompile. A plan without splits gives exchanges of the padding
alone, so a model compiled for chunks keeps one graph whether a step splits or not.

A world of one rank (or no process group) routes locally, without collectives.

Limits: every rank must pass columns of the same names, dtypes and trailing shapes (the
receiver sizes its buffers from its own columns; nothing checks this across ranks); a
chunk's keys are the whole prefix ``[0, start)`` of its sample (causal attention without a
window or a contextual prefix; :mod:`fsc.kernels.jagged_attention`, "Split sequences");
the exchange moves every earlier key of a chunk, even those a window would hide.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from fsc.errors import FscError
from fsc.runtime.balance_dist import gather_lengths
from fsc.runtime.balancer import Assignment, Balancer

__all__ = ["Plan", "PrefixExchange", "Routed", "Router", "RoutingError", "prefix_kv", "prefix_tokens"]


class RoutingError(FscError, ValueError):
    """A batch does not match the plan it is routed with, or its columns are malformed."""


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Plan:
    """One step's routing: the global batch's lengths (rank-major: rank 0's samples first),
    the samples each rank read, the assignment, and its pieces ordered by (rank, sample,
    start). A whole sample is one piece ``[0, length)``. Arrays are read-only."""

    lengths: np.ndarray  # int64 [n]
    local_counts: np.ndarray  # int64 [W]: samples each rank read
    assignment: Assignment
    sample: np.ndarray  # int64 [k]: the piece's sample (index into lengths)
    start: np.ndarray  # int64 [k]
    stop: np.ndarray  # int64 [k]
    rank: np.ndarray  # int64 [k]
    _rank_starts: np.ndarray = field(repr=False)  # pieces of rank r: [_rank_starts[r], _rank_starts[r + 1])

    @classmethod
    def build(cls, lengths: np.ndarray, local_counts: np.ndarray, assignment: Assignment) -> Plan:
        lengths = np.asarray(lengths, dtype=np.int64)
        local_counts = np.asarray(local_counts, dtype=np.int64)
        world = assignment.ranks
        if len(local_counts) != world or int(local_counts.sum()) != len(lengths):
            raise RoutingError(f"the plan's local counts {local_counts.tolist()} do not cover {len(lengths)} samples "
                               f"on {world} ranks")
        if assignment.chunks is not None:
            c = assignment.chunks
            sample, start, stop, rank = (np.asarray(x, dtype=np.int64) for x in (c.sample, c.start, c.stop, c.rank))
        else:
            sample = np.lexsort((np.arange(len(lengths)), assignment.rank_of)).astype(np.int64)
            start = np.zeros(len(sample), dtype=np.int64)
            stop, rank = lengths[sample], np.asarray(assignment.rank_of, dtype=np.int64)[sample]
        covered = np.bincount(sample, weights=stop - start, minlength=len(lengths))
        missing = np.bincount(sample, minlength=len(lengths)) == 0
        if not np.array_equal(covered, lengths) or missing.any():
            raise RoutingError("the assignment's pieces do not tile the global batch's samples")
        rank_starts = np.concatenate(([0], np.cumsum(np.bincount(rank, minlength=world)))).astype(np.int64)
        plan = cls(lengths=lengths, local_counts=local_counts, assignment=assignment, sample=sample, start=start,
                   stop=stop, rank=rank, _rank_starts=rank_starts)
        for x in (lengths, local_counts, sample, start, stop, rank, rank_starts):
            x.setflags(write=False)
        return plan

    @property
    def ranks(self) -> int:
        return len(self.local_counts)

    @property
    def global_tokens(self) -> int:
        return int(self.lengths.sum())

    def pieces_of(self, rank: int) -> np.ndarray:
        """Indices of ``rank``'s pieces, by (sample, start): the order it holds them in."""
        return np.arange(self._rank_starts[rank], self._rank_starts[rank + 1])

    def first_sample(self, rank: int) -> int:
        """The global index of the first sample ``rank`` read."""
        return int(self.local_counts[:rank].sum())

    def earlier(self, piece: int) -> np.ndarray:
        """The pieces of ``piece``'s sample that come before it in token order."""
        same = np.flatnonzero((self.sample == self.sample[piece]) & (self.start < self.start[piece]))
        return same[np.argsort(self.start[same], kind="stable")]


class PrefixExchange(NamedTuple):
    """What :func:`prefix_kv` needs (module docstring), as tensors so that a compiled model
    takes them as inputs: a new plan is new data, not a new graph."""

    send_index: torch.Tensor  # int64 [S]: local token rows sent, grouped by destination
    send_sizes: torch.Tensor  # int64 [W]
    recv_sizes: torch.Tensor  # int64 [W]
    kv_index: torch.Tensor  # int64 [Tk]: key rows of cat([local tokens, received])
    kv_offsets: torch.Tensor  # int64 [P+1]: the pieces' key extents
    q_start: torch.Tensor  # int64 [P]: the pieces' first absolute positions

    @classmethod
    def unsplit(cls, offsets: torch.Tensor, world: int = 1, rank: int = 0) -> PrefixExchange:
        """The exchange of ``rank``'s batch of whole samples: each piece's keys are its own
        tokens, and only the padding rows move (to the rank itself)."""
        tokens = int(offsets[-1]) if offsets.numel() else 0
        sizes = torch.zeros(world, dtype=torch.int64)
        sizes[rank] = _PAD
        return cls(send_index=torch.arange(tokens, tokens + _PAD, dtype=torch.int64), send_sizes=sizes,
                   recv_sizes=sizes.clone(),
                   kv_index=torch.arange(tokens, dtype=torch.int64), kv_offsets=offsets.to(torch.int64),
                   q_start=torch.zeros(max(offsets.numel() - 1, 0), dtype=torch.int64))


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Routed:
    """The pieces a plan gives this rank, in global order (sample, then start)."""

    tokens: dict[str, torch.Tensor]  # [T, ...]: the pieces' token rows, piece after piece
    samples: dict[str, torch.Tensor]  # [P, ...]: one row per piece (its sample's row)
    offsets: torch.Tensor  # int64 [P+1]: each piece's token rows
    sample: torch.Tensor  # int64 [P]: the piece's sample, as an index into the global batch
    q_start: torch.Tensor  # int64 [P]: the piece's first absolute position in its sample
    length: torch.Tensor  # int64 [P]: the whole sample's length
    earlier: tuple[tuple[int, ...], ...]  # per piece: the ranks holding its sample's earlier chunks
    global_tokens: int  # tokens of the global batch: the loss normalizer of a per-token mean
    exchange: PrefixExchange

    @property
    def split(self) -> bool:
        """Whether any piece here is a chunk of a split sample."""
        return bool(((self.q_start > 0) | (self.offsets[1:] - self.offsets[:-1] < self.length)).any())


class Router:
    """Moves samples, or chunks of them, to the ranks a :class:`Balancer` assigns them to.
    ``group=None``: the default group; without a process group, a world of one rank."""

    def __init__(self, balancer: Balancer, group: dist.ProcessGroup | None = None) -> None:
        self.balancer = balancer
        self.group = group
        self.rank, self.world = _world(group)
        if balancer.ranks != self.world:
            raise RoutingError(f"the balancer plans for {balancer.ranks} ranks but the group has {self.world}")
        # A group of its own for the background thread: its collectives never interleave
        # with the training step's on the default group.
        # (over this router's ranks: a subgroup's router plans within the subgroup)
        ranks = dist.get_process_group_ranks(group) if group is not None and self.world > 1 else None
        self._planning_group = dist.new_group(ranks=ranks, backend="gloo") if self.world > 1 else None
        # With splits, another for the pieces' key/value exchange (prefix_kv): in the step's
        # group it would queue behind the step's other collectives (the embedding exchanges,
        # the gradient buckets) on every rank, and a layer's attention waits for it.
        split = bool(getattr(balancer, "split", False))
        self.exchange_group: dist.ProcessGroup | None = (dist.new_group(ranks=ranks) if split and self.world > 1
                                                         else None)
        """The process group for :func:`prefix_kv` and :func:`prefix_tokens` (with splits
        and more than one rank; else None: the default group)."""
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsc-balance")

    def plan(self, local_lengths: np.ndarray, group: dist.ProcessGroup | None = None) -> Plan:
        """Gather every rank's lengths and assign them (every rank must call it)."""
        lengths = np.asarray(local_lengths, dtype=np.int64).reshape(-1)
        if self.world == 1:
            counts, everything = np.array([len(lengths)], dtype=np.int64), lengths
        else:
            group = group if group is not None else self.group
            counts = gather_lengths([len(lengths)], group)
            everything = gather_lengths(lengths, group)
        return Plan.build(everything, counts, self.balancer.assign_lengths(everything))

    def plan_async(self, local_lengths: np.ndarray) -> concurrent.futures.Future[Plan]:
        """:meth:`plan` on the background thread (its own process group). Every rank must
        call it for the same steps in the same order."""
        return self._pool.submit(self.plan, np.array(local_lengths, copy=True), self._planning_group)

    def route(self, lengths: np.ndarray | torch.Tensor, tokens: Mapping[str, torch.Tensor],
              samples: Mapping[str, torch.Tensor], plan: Plan) -> Routed:
        """This rank's pieces under ``plan``. ``lengths``: the local samples' token counts (the
        ones planned for); ``tokens``: columns with ``sum(lengths)`` rows, samples one after
        another; ``samples``: columns with ``len(lengths)`` rows. One all-to-all."""
        rank, world = self.rank, self.world
        if plan.ranks != world:
            raise RoutingError(f"the plan is for {plan.ranks} ranks but the group has {world}")
        local = np.asarray(lengths.cpu() if isinstance(lengths, torch.Tensor) else lengths, dtype=np.int64)
        first = plan.first_sample(rank)
        if not np.array_equal(local, plan.lengths[first : first + int(plan.local_counts[rank])]):
            raise RoutingError("route: the batch's lengths are not the ones this plan was made for")
        columns = _check_columns(tokens, int(local.sum()), "token") + _check_columns(samples, len(local), "sample")
        n_tok = len(tokens)
        token_index, sample_index, send_tokens, send_pieces = _outgoing(plan, first, local)
        gathered = [_as_bytes(c.index_select(0, token_index if j < n_tok else sample_index))
                    for j, c in enumerate(columns)]
        row_bytes = [g.shape[1] for g in gathered]
        per_dest = [send_tokens if j < n_tok else send_pieces for j in range(len(columns))]
        split = [g.split(counts.tolist()) for g, counts in zip(gathered, per_dest)]
        parts = [split[j][d].reshape(-1) for d in range(world) for j in range(len(columns))]
        send_bytes = [sum(int(per_dest[j][d]) * row_bytes[j] for j in range(len(columns))) for d in range(world)]
        # what arrives: this rank's pieces, grouped by source (sources read consecutive samples)
        here = plan.pieces_of(rank)
        source_of = np.repeat(np.arange(world), plan.local_counts)
        src = source_of[plan.sample[here]]
        recv_tokens = np.bincount(src, weights=plan.stop[here] - plan.start[here], minlength=world).astype(np.int64)
        recv_pieces = np.bincount(src, minlength=world).astype(np.int64)
        recv_per = [recv_tokens if j < n_tok else recv_pieces for j in range(len(columns))]
        recv_bytes = [sum(int(recv_per[j][s]) * row_bytes[j] for j in range(len(columns))) for s in range(world)]
        buffer = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
        if world > 1:
            received = torch.empty(sum(recv_bytes), dtype=torch.uint8)
            dist.all_to_all_single(received, buffer, recv_bytes, send_bytes, group=self.group)
        else:
            received = buffer
        out = _unpack(received, recv_bytes, recv_per, row_bytes, columns)
        names = list(tokens) + list(samples)
        piece_len = plan.stop[here] - plan.start[here]
        offsets = torch.zeros(len(here) + 1, dtype=torch.int64)
        offsets[1:] = torch.from_numpy(np.cumsum(piece_len))
        return Routed(
            tokens=dict(zip(names[:n_tok], out[:n_tok])), samples=dict(zip(names[n_tok:], out[n_tok:])),
            offsets=offsets, sample=torch.from_numpy(plan.sample[here].copy()),
            q_start=torch.from_numpy(plan.start[here].copy()),
            length=torch.from_numpy(plan.lengths[plan.sample[here]].copy()),
            earlier=tuple(tuple(int(plan.rank[e]) for e in plan.earlier(i)) for i in here.tolist()),
            global_tokens=plan.global_tokens, exchange=exchange_of(plan, rank))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for group in (self._planning_group, self.exchange_group):
            if group is not None:
                dist.destroy_process_group(group)


_PAD = 2  # rows every rank sends itself (exchange_of)


def _outgoing(plan: Plan, first: int, local: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """What a rank holding samples ``first .. first + len(local) - 1`` sends: the token rows
    and sample rows of their pieces, grouped by destination (plan order), and per destination
    the number of tokens and of pieces."""
    world = plan.ranks
    starts = np.concatenate(([0], np.cumsum(local)))
    mine = np.flatnonzero((plan.sample >= first) & (plan.sample < first + len(local)))
    token_rows, sample_rows = [], []
    send_tokens, send_pieces = np.zeros(world, np.int64), np.zeros(world, np.int64)
    for i in mine.tolist():
        s = int(plan.sample[i]) - first
        token_rows.append(np.arange(starts[s] + plan.start[i], starts[s] + plan.stop[i]))
        sample_rows.append(s)
        send_tokens[plan.rank[i]] += plan.stop[i] - plan.start[i]
        send_pieces[plan.rank[i]] += 1
    token_index = torch.from_numpy(np.concatenate(token_rows).astype(np.int64) if token_rows
                                   else np.zeros(0, np.int64))
    return token_index, torch.tensor(sample_rows, dtype=torch.int64), send_tokens, send_pieces


def _unpack(received: torch.Tensor, recv_bytes: list[int], recv_rows: list[np.ndarray], row_bytes: list[int],
            columns: list[torch.Tensor]) -> list[torch.Tensor]:
    """The columns from the received bytes: per source, each column's rows in turn
    (``recv_rows[j][s]`` rows of column j from source s)."""
    parts: list[list[torch.Tensor]] = [[] for _ in columns]
    for s, segment in enumerate(received.split(recv_bytes)):
        sizes = [int(recv_rows[j][s]) * row_bytes[j] for j in range(len(columns))]
        for j, part in enumerate(segment.split(sizes)):
            parts[j].append(part)
    return [_from_bytes(torch.cat(p) if p else torch.zeros(0, dtype=torch.uint8), c, int(n.sum()))
            for p, c, n in zip(parts, columns, recv_rows)]


def exchange_of(plan: Plan, rank: int) -> PrefixExchange:
    """``rank``'s :class:`PrefixExchange` under ``plan`` (every rank computes its own, with
    no communication: the plan names every piece's rank)."""
    world = plan.ranks
    here = plan.pieces_of(rank)
    row = np.concatenate(([0], np.cumsum(plan.stop[here] - plan.start[here])))
    own_tokens = int(row[-1])
    local_start = {int(i): int(o) for i, o in zip(here, row[:-1])}  # piece -> its first local token row
    # sent: for every later chunk on any rank d (rank d's order), the rows of its earlier
    # chunks that this rank holds, in token order
    send_rows, send_sizes = [], np.zeros(world, np.int64)
    for d in range(world):
        for q in plan.pieces_of(d).tolist():
            if plan.start[q] == 0:
                continue
            for e in plan.earlier(q).tolist():
                if plan.rank[e] == rank:
                    send_rows.append(local_start[e] + np.arange(plan.stop[e] - plan.start[e]))
                    send_sizes[d] += plan.stop[e] - plan.start[e]
        if d == rank:
            # _PAD zero rows to itself (appended after the local rows by prefix_tokens, so a
            # rank without tokens has them too), never read (kv_index skips them): the
            # buffer's length is never 0 or 1, sizes the compiler would specialise for
            send_rows.append(np.arange(own_tokens, own_tokens + _PAD))
            send_sizes[d] += _PAD
    # received, by source: the same enumeration seen from here
    recv_sizes = np.zeros(world, np.int64)
    arrivals = []  # (piece, earlier piece, source, offset within that source's segment)
    for q in here.tolist():
        if plan.start[q] == 0:
            continue
        for e in plan.earlier(q).tolist():
            s = int(plan.rank[e])
            arrivals.append((q, e, s, int(recv_sizes[s])))
            recv_sizes[s] += plan.stop[e] - plan.start[e]
    recv_sizes[rank] += _PAD  # at the end of this rank's own segment: after every real row
    base = np.concatenate(([0], np.cumsum(recv_sizes)))
    rows, kv_len = [], []
    by_piece: dict[int, list[np.ndarray]] = {}
    for q, e, s, off in arrivals:
        first = own_tokens + base[s] + off
        by_piece.setdefault(q, []).append(np.arange(first, first + plan.stop[e] - plan.start[e]))
    for q in here.tolist():
        prefix = by_piece.get(q, [])
        n = int(plan.stop[q] - plan.start[q])
        rows += prefix + [local_start[q] + np.arange(n)]
        kv_len.append(sum(len(p) for p in prefix) + n)
    kv_offsets = torch.zeros(len(here) + 1, dtype=torch.int64)
    kv_offsets[1:] = torch.tensor(np.cumsum(kv_len), dtype=torch.int64) if kv_len else kv_offsets[1:]

    def cat(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64))

    return PrefixExchange(send_index=cat(send_rows), send_sizes=torch.from_numpy(send_sizes),
                          recv_sizes=torch.from_numpy(recv_sizes), kv_index=cat(rows), kv_offsets=kv_offsets,
                          q_start=torch.from_numpy(plan.start[here].copy()))


def prefix_tokens(x: torch.Tensor, exchange: PrefixExchange, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Per piece, the rows of its keys ``[0, stop)``: the earlier chunks' rows (from the ranks
    holding them) in token order, then its own. ``x [T, ...]`` has one row per local token;
    the result ``[Tk, ...]`` is laid out by ``exchange.kv_offsets``. Differentiable: the
    gradients of received rows go back to their owners (one all-to-all each way)."""
    _, world = _world(group)
    # the local rows, then _PAD zero rows for the padding sent to itself (exchange_of)
    send = torch.cat([x, x.new_zeros(_PAD, *x.shape[1:])]).index_select(0, exchange.send_index)
    if world > 1:
        group = group if group is not None else dist.group.WORLD
        # sizes from tensors, inside the graph: unbacked SymInts, so a new plan is no new graph
        send_sizes, recv_sizes = exchange.send_sizes.tolist(), exchange.recv_sizes.tolist()
        if x.requires_grad:
            received = funcol.all_to_all_single_autograd(send, recv_sizes, send_sizes, group)
        else:
            received = funcol.wait_tensor(funcol.all_to_all_single(send, recv_sizes, send_sizes, group))
    else:
        received = send  # one rank: every earlier chunk is its own
    return torch.cat([x, received]).index_select(0, exchange.kv_index)


def prefix_kv(k: torch.Tensor, v: torch.Tensor, exchange: PrefixExchange,
              group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``k [T, H, D]`` and values ``v [T, H, Dv]`` of this rank's tokens -> the pieces'
    key/value extents ``[Tk, H, *]`` (:func:`prefix_tokens`), for
    ``jagged_attention(q, k, v, offsets, ..., kv_offsets=exchange.kv_offsets,
    q_start=exchange.q_start)``. Keys and values travel together: one all-to-all."""
    width = math.prod(k.shape[1:])
    both = torch.cat([k.reshape(k.shape[0], width), v.reshape(v.shape[0], math.prod(v.shape[1:]))], dim=1)
    full = prefix_tokens(both, exchange, group)
    return full[:, :width].reshape(-1, *k.shape[1:]), full[:, width:].reshape(-1, *v.shape[1:])


def _check_columns(columns: Mapping[str, torch.Tensor], rows: int, kind: str) -> list[torch.Tensor]:
    out = []
    for name, c in columns.items():
        if not isinstance(c, torch.Tensor) or c.ndim < 1:
            raise RoutingError(f"{kind} column {name!r} must be a tensor with one row per {kind}, got "
                               f"{type(c).__name__ if not isinstance(c, torch.Tensor) else tuple(c.shape)}")
        if c.shape[0] != rows:
            raise RoutingError(f"{kind} column {name!r} has {c.shape[0]} rows, the batch has {rows} {kind}s")
        if c.device.type != "cpu":
            raise RoutingError(f"{kind} column {name!r} is on {c.device}: routing moves host tensors (gloo)")
        out.append(c)
    return out


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[rows, row bytes]`` uint8 view of a contiguous copy."""
    width = x.element_size() * math.prod(x.shape[1:])
    if x.numel() == 0:
        return torch.zeros(x.shape[0], width, dtype=torch.uint8)
    return x.contiguous().reshape(-1).view(torch.uint8).reshape(x.shape[0], width)


def _from_bytes(raw: torch.Tensor, like: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` rows of ``like``'s dtype and trailing shape from their bytes."""
    return raw.view(like.dtype).reshape(rows, *like.shape[1:])
