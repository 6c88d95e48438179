"""The pipelined training step: ``fsc.TrainPipeline``.

    pipeline = fsc.TrainPipeline(model, [dense_opt, table_opt],
                                 lookups=lambda inputs: {"item": inputs[0]},
                                 loss=lambda model, inputs, rows: model.loss(rows["item"], *inputs))
    while True:
        try:
            loss = pipeline.progress(batches)   # batches: an iterator of tuples of tensors
        except StopIteration:
            break

One call of :meth:`TrainPipeline.progress` trains batch i and prepares batch i+1, in one
compiled function (``torch.compile(backend="freescale")`` by default) whose forward graph
holds

- the refetch of batch i's rows that batch i-1 updated (small; first in line),
- batch i's forward, with its prefetched rows,
- batch i+1's id exchange and the exchange of its rows (:meth:`RowShardedEmbedding.prefetch`),
  which nothing of batch i waits for, so the scheduling passes put it behind batch i's compute,

and whose backward graph holds the gradients of batch i's rows going back to their owners
and the dense parameters' gradients, summed over the ranks bucket by bucket
(:mod:`fsc.runtime.gradients`), each bucket issued as soon as its last gradient exists. The
optimizers then step eagerly. TorchRec's TrainPipelineSparseDist and TrainPipelinePEC do the
same overlap outside any compiler (and refuse Dynamo); here the compiler sees both batches'
exchanges and the gradient buckets in one schedule and orders them by when they are needed.

**Exact.** Losses and parameters equal the plain synchronous loop's (forward, backward,
all-reduce, step) within float tolerance, because rows are refetched where batch i updated
them and the tables' optimizers are checked to be row-sparse
(:func:`fsc.runtime.embedding.check_row_sparse`; Adam on a table is refused).

**The sparse stage is separate by construction.** ``lookups(inputs)`` names each table's ids
from the batch's tensors alone, before the step; ``loss(model, inputs, rows)`` gets the rows.
A table looked up again inside ``loss`` raises :class:`TrainPipelineError` naming it.

**End of data.** :meth:`progress` pulls batch i+1 before training batch i. The ranks agree
(one small all-reduce, overlapped with the step) to stop as soon as any rank's iterator
ends: every rank trains the same number of batches, and :meth:`progress` raises
``StopIteration`` on all of them together; batches other ranks still had are not trained.
A batch with no ids on one rank is fine (it exchanges nothing).

**Checkpoints.** :meth:`state_dict` holds the batch pulled but not yet trained; after
:meth:`load_state_dict` (with the model's and optimizers' own state) the next
:meth:`progress` fetches its rows again from the restored tables, so the run resumes with
the losses of an uninterrupted one.

Limits: every table is a :class:`~fsc.runtime.embedding.RowShardedEmbedding` (other
parameters are data parallel); the batch is a tuple of tensors; one optimizer step per
batch (no gradient accumulation); every dense parameter reaches the loss on every rank (a
bucket none of whose parameters is used is not reduced on that rank, and its peers would
wait for it: DDP's ``find_unused_parameters`` case, not handled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor

from fsc.runtime.embedding import Prefetched, RowShardedEmbedding, TrainPipelineError, check_row_sparse
from fsc.runtime.gradients import buckets_of, reduce_in_backward

__all__ = ["TrainPipeline", "TrainPipelineError"]

Inputs = Sequence[torch.Tensor]


def _waited(t: torch.Tensor) -> torch.Tensor:
    return t.wait() if isinstance(t, AsyncCollectiveTensor) else t


class _Loss(nn.Module):
    """The model and the user's loss as one module, so ``functional_call`` can hand the loss
    the reduced-gradient stand-ins of the model's dense parameters."""

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, inputs: Inputs, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(self.model, inputs, rows)


class TrainPipeline:
    """Train ``model`` one batch per :meth:`progress`, the next batch's embedding exchange
    and the dense gradients' all-reduce inside the compiled step (see the module docstring).

    ``optimizers``: one or several; every table's parameter must be in a row-sparse one.
    ``lookups(inputs) -> {table name: 1-D ids}`` names, for each table (its module name in
    ``model``), the ids a batch looks up; ``loss(model, inputs, rows) -> 0-d tensor`` gets
    ``rows[name]``, the rows of those ids in their order. The loss's gradients are summed over
    the ranks (divide by a global count inside ``loss`` for a global mean).
    ``backend``/``options``: ``torch.compile``'s, or ``backend=None`` to run eagerly.
    ``dynamic(inputs)`` marks the inputs' dynamic dimensions before the first compile
    (default: dim 0 of every input with more than one row).
    """

    def __init__(self, model: nn.Module, optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], *,
                 lookups: Callable[[Inputs], Mapping[str, torch.Tensor]],
                 loss: Callable[[nn.Module, Inputs, dict[str, torch.Tensor]], torch.Tensor],
                 backend: str | Callable | None = "freescale", options: dict[str, Any] | None = None,
                 bucket_mb: float = 4.0, group: dist.ProcessGroup | None = None,
                 dynamic: Callable[[Inputs], None] | None = None) -> None:
        self.model = model
        self.optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        self.lookups = lookups
        self.tables = {name: m for name, m in model.named_modules() if isinstance(m, RowShardedEmbedding)}
        if not self.tables:
            raise TrainPipelineError("TrainPipeline: the model has no RowShardedEmbedding table to prefetch")
        for name, table in self.tables.items():
            holders = [opt for opt in self.optimizers if any(p is table.weight for g in opt.param_groups
                                                              for p in g["params"])]
            if not holders:
                raise TrainPipelineError(f"table '{name}': its weight is in none of the optimizers given")
            for opt in holders:
                check_row_sparse(opt, table.weight, name)
        table_weights = {id(t.weight) for t in self.tables.values()}
        self.dense = {name: p for name, p in model.named_parameters()
                      if p.requires_grad and id(p) not in table_weights}
        self.group = group if group is not None else (dist.group.WORLD if dist.is_available()
                                                      and dist.is_initialized() and dist.get_world_size() > 1
                                                      else None)
        self.buckets = buckets_of(list(self.dense.values()), bucket_mb)
        self._loss = _Loss(model, loss)
        self._dynamic = dynamic
        self._marked = False
        self._step = self._run if backend is None else \
            torch.compile(self._run, backend=backend, options=options, fullgraph=True)
        # split sizes are read from tensors inside the graph; refetched rows are picked by mask
        self._config = contextlib.nullcontext if backend is None else lambda: torch._dynamo.config.patch(
            capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)
        self._inputs: Inputs | None = None      # the batch the next progress() trains
        self._state: dict[str, Prefetched] | None = None
        self._done = False
        self._agree: tuple[torch.Tensor, Any] | None = None

    # ------------------------------------------------------------------ the compiled step

    def _run(self, state: dict[str, Prefetched], next_ids: dict[str, torch.Tensor], inputs: Inputs):
        rows = {name: table.pipelined(state[name]) for name, table in self.tables.items()}
        names = list(self.dense)
        reduced = reduce_in_backward([self.dense[n] for n in names], self.buckets, self.group)
        loss = torch.func.functional_call(self._loss, {f"model.{n}": t for n, t in zip(names, reduced)},
                                          (inputs, rows), strict=False)
        ahead = {name: table.prefetch(next_ids[name], state[name]) for name, table in self.tables.items()}
        return loss, ahead

    # ------------------------------------------------------------------ driving it

    def progress(self, batches: Iterator[Inputs]) -> torch.Tensor:
        """Train the next batch (pulling one more from ``batches`` to prepare); return this
        rank's loss, detached. Raises ``StopIteration`` on every rank once any rank's
        ``batches`` has ended."""
        if self._done:
            raise StopIteration
        if self._inputs is None:  # the first batch (or the first after a restore)
            first = self._pull(batches)
            if self._settle(first is None):
                raise StopIteration
            self._inputs = first
        if self._state is None:
            self._state = self._prime(self._inputs)
        upcoming = self._pull(batches)
        self._start_agreement(upcoming is None)
        next_ids = self._ids(upcoming) if upcoming is not None else self._empty_ids()
        self._mark(self._inputs, self._state, next_ids)
        with self._tables_in_pipeline(), self._config():
            loss, ahead = self._step(self._state, next_ids, tuple(self._inputs))
        loss.backward()
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self._finish_agreement():
            self._done = True
            self._inputs, self._state = None, None
        else:
            self._inputs, self._state = upcoming, ahead
        return loss.detach()

    def _pull(self, batches: Iterator[Inputs]) -> Inputs | None:
        try:
            return tuple(next(batches))
        except StopIteration:
            return None

    def _ids(self, inputs: Inputs) -> dict[str, torch.Tensor]:
        ids = dict(self.lookups(inputs))
        if set(ids) != set(self.tables):
            raise TrainPipelineError(f"lookups(batch) must name exactly the model's tables {sorted(self.tables)}, "
                                     f"got {sorted(ids)}")
        for name, t in ids.items():
            if t.ndim != 1 or t.dtype not in (torch.int64, torch.int32):
                raise TrainPipelineError(f"lookups(batch)['{name}'] must be a 1-D integer tensor of ids, "
                                         f"got {t.dtype} of shape {tuple(t.shape)}")
        return {name: t.to(torch.int64) for name, t in ids.items()}

    def _empty_ids(self) -> dict[str, torch.Tensor]:
        """What a rank whose data ended prefetches in the last step: two lookups of row 0,
        never read (every rank stops after this step). Not empty: a compiler specialises a
        dimension of size 0 or 1, and the last step would recompile."""
        return {name: torch.zeros(2, dtype=torch.int64, device=t.weight.device) for name, t in self.tables.items()}

    @torch.no_grad()
    def _prime(self, inputs: Inputs) -> dict[str, Prefetched]:
        """The first batch's lookup (or the first after a restore), from the tables as they are."""
        ids = self._ids(inputs)
        # waited here: the compiled step's outputs (the later steps' states) are plain tensors
        return {name: Prefetched(*(_waited(t) for t in table.prefetch(ids[name], None)))
                for name, table in self.tables.items()}

    def _mark(self, inputs: Inputs, state: dict[str, Prefetched], next_ids: dict[str, torch.Tensor]) -> None:
        """Compile for any batch: the ids' and rows' counts are dynamic (the [world] counts are not)."""
        if not self._marked:  # the user's inputs once (a later size-1 dimension would not compile)
            if self._dynamic is not None:
                self._dynamic(inputs)
            else:
                for t in inputs:
                    if t.ndim and t.shape[0] > 1:
                        torch._dynamo.mark_dynamic(t, 0)
        jagged = [t for prefetched in state.values() for t in (prefetched.inverse, prefetched.wanted, prefetched.rows,
                                                               prefetched.stale, prefetched.stale_owned)]
        for t in [*jagged, *next_ids.values()]:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        self._marked = True

    @contextlib.contextmanager
    def _tables_in_pipeline(self):
        for name, table in self.tables.items():
            table.in_pipeline = name
        try:
            yield
        finally:
            for table in self.tables.values():
                table.in_pipeline = None

    # the ranks agree when to stop: MAX over "my iterator ended" (on the tables' device, so an
    # NCCL group takes it too)
    def _start_agreement(self, ended: bool) -> None:
        device = next(iter(self.tables.values())).weight.device
        flag = torch.tensor([int(ended)], device=device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True) \
            if self.group is not None else None
        self._agree = (flag, work)

    def _finish_agreement(self) -> bool:
        flag, work = self._agree
        if work is not None:
            work.wait()
        return bool(flag.item())

    def _settle(self, ended: bool) -> bool:
        self._start_agreement(ended)
        return self._finish_agreement()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The pipeline's own state: the batch pulled but not yet trained (save it with the
        model's and the optimizers' ``state_dict``)."""
        return {"inputs": None if self._inputs is None else [t.detach().clone() for t in self._inputs],
                "done": self._done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next :meth:`progress` trains the saved batch, its rows fetched from the
        tables as they are now (the restored ones)."""
        self._inputs = None if state["inputs"] is None else tuple(state["inputs"])
        self._done = bool(state["done"])
        self._state = None
