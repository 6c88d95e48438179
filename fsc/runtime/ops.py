"""``fsc::all_to_all_single`` and ``fsc::wait_tensor``: the copy-engine all-to-all as a
pair of functional custom ops (in the ``fsc`` namespace with the kernels' ops)::

    fsc::all_to_all_single(Tensor input, SymInt[] output_split_sizes,
                           SymInt[] input_split_sizes, str group_name) -> Tensor
    fsc::wait_tensor(Tensor handle, Tensor input, SymInt[] output_split_sizes,
                     SymInt[] input_split_sizes, str group_name) -> Tensor

The first takes exactly the arguments of ``_c10d_functional.all_to_all_single``, so a
pass swaps that node in place; the wait takes the handle plus the same arguments again.

**Why the wait repeats the arguments.** A custom op may not return an alias of an input
(functionalization rejects it; ``_c10d_functional.wait_tensor`` returns its input, a
privilege of built-in ops), so the wait must *return* the output, not pass it through.
Then the wait's value must be stated by its arguments: ``wait_tensor(h, x, out, in, g)``
*is* the all-to-all of ``x``. That gives (1) autograd on the wait: its gradient with
respect to ``x`` is the reverse all-to-all; (2) a graph in which ``x`` stays live up to
the wait, so no compiler reuses its buffer while the transport may still read it
(Inductor reuses a buffer after its last use in the graph and keeps inputs alive only for
the ``_c10d_functional`` collectives it knows); (3) a fake implementation that knows the
output shape.

**The handle** is a 1-element int64 CPU tensor (value 0: outputs must not depend on
bookkeeping). The collective in flight is attached to the handle's storage, which a
compiler passes along as it is (a dense CPU tensor; Inductor does materialize odd-strided
views, so nothing else would do) and which lives exactly as long as the handle does.
``all_to_all_single`` starts the transfer (a copy thread or copy stream moves the data)
and returns the handle at once; ``wait_tensor`` blocks until the output is complete and
returns it; waiting again returns the same output. A handle that carries no collective (a
copy of one: ``torch.library.opcheck`` deep-copies arguments) makes the wait run the
all-to-all itself, synchronously, since that is its value anyway.

**Validation.** Split lists must have one entry per rank, be non-negative and match the
input's first dimension on the calling rank (:class:`SplitSizeError`). Whether ranks agree
with each other is checked by the transport (:class:`SplitMismatchError` names both ranks
and both sizes). As with every collective, the input must not be written until the wait.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from fsc.errors import FscError
from fsc.runtime.transport import transport_for

_WORK_ATTR = "_fsc_work"


class SplitSizeError(FscError, ValueError):
    """Split sizes that cannot be right on this rank, whatever the other ranks do."""


def _check_splits(inp: torch.Tensor, output_split_sizes: Sequence[int], input_split_sizes: Sequence[int],
                  world: int, group_name: str) -> None:
    where = f"fsc::all_to_all_single on group {group_name!r}"
    if inp.dim() == 0:
        raise SplitSizeError(f"{where}: the input is a scalar; it needs a first dimension to split")
    for label, splits in (("output_split_sizes", output_split_sizes), ("input_split_sizes", input_split_sizes)):
        if len(splits) != world:
            raise SplitSizeError(f"{where}: {label} has {len(splits)} entries for a group of {world} ranks")
        if any(int(s) < 0 for s in splits):
            raise SplitSizeError(f"{where}: {label}={list(splits)} has a negative size")
    if sum(int(s) for s in input_split_sizes) != inp.shape[0]:
        raise SplitSizeError(f"{where}: input_split_sizes={list(input_split_sizes)} sum to "
                             f"{sum(int(s) for s in input_split_sizes)}, but the input has {inp.shape[0]} rows")


def _transport(group_name: str, device: torch.device):
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    return group, transport_for(group, device)


@torch.library.custom_op(
    "fsc::all_to_all_single",
    mutates_args=(),
    schema="(Tensor input, SymInt[] output_split_sizes, SymInt[] input_split_sizes, str group_name) -> Tensor",
)
def all_to_all_single(input: torch.Tensor, output_split_sizes: Sequence[int], input_split_sizes: Sequence[int],
                      group_name: str) -> torch.Tensor:
    group, transport = _transport(group_name, input.device)  # collective on first use: before any local raise
    out_splits, in_splits = [int(s) for s in output_split_sizes], [int(s) for s in input_split_sizes]
    try:
        _check_splits(input, out_splits, in_splits, dist.get_world_size(group), group_name)
    except SplitSizeError as exc:
        transport.abort(exc)  # tell the peers at once rather than let them time out
        raise
    out = transport.allocate((sum(out_splits), *input.shape[1:]), input.dtype, input.device)
    work = transport.all_to_all(input.contiguous(), out, out_splits, in_splits)
    handle = torch.zeros((1,), dtype=torch.int64)
    setattr(handle.untyped_storage(), _WORK_ATTR, work)  # lives exactly as long as the handle's storage
    return handle


@all_to_all_single.register_fake
def _all_to_all_single_fake(input: torch.Tensor, output_split_sizes: Sequence[int],
                            input_split_sizes: Sequence[int], group_name: str) -> torch.Tensor:
    return torch.empty((1,), dtype=torch.int64, device="cpu")


@torch.library.custom_op(
    "fsc::wait_tensor",
    mutates_args=(),
    schema="(Tensor handle, Tensor input, SymInt[] output_split_sizes, SymInt[] input_split_sizes, str group_name)"
           " -> Tensor",
)
def wait_tensor(handle: torch.Tensor, input: torch.Tensor, output_split_sizes: Sequence[int],
                input_split_sizes: Sequence[int], group_name: str) -> torch.Tensor:
    work = getattr(handle.untyped_storage(), _WORK_ATTR, None)
    if work is not None:
        return work.wait()
    # Not a collective in flight here (a copy of a handle, say): the wait's value is the
    # all-to-all of ``input`` all the same, so run it now, synchronously.
    out = all_to_all_single(input, output_split_sizes, input_split_sizes, group_name)
    return getattr(out.untyped_storage(), _WORK_ATTR).wait()


@wait_tensor.register_fake
def _wait_tensor_fake(handle: torch.Tensor, input: torch.Tensor, output_split_sizes: Sequence[int],
                      input_split_sizes: Sequence[int], group_name: str) -> torch.Tensor:
    for s in output_split_sizes:
        torch._check(s >= 0)
    return input.new_empty((sum(output_split_sizes), *input.shape[1:]))


def _wait_backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None, None, None]:
    # Rows that went from rank i to rank j come back from j to i: the split lists swap.
    grad = grad.contiguous()
    handle = all_to_all_single(grad, ctx.input_split_sizes, ctx.output_split_sizes, ctx.group_name)
    back = wait_tensor(handle, grad, ctx.input_split_sizes, ctx.output_split_sizes, ctx.group_name)
    return None, back, None, None, None


def _wait_setup_context(ctx, inputs, output) -> None:
    _, _, ctx.output_split_sizes, ctx.input_split_sizes, ctx.group_name = inputs


wait_tensor.register_autograd(_wait_backward, setup_context=_wait_setup_context)

# A wait whose result is unused must still run (as _c10d_functional.wait_tensor).
torch.fx.node.has_side_effect(torch.ops.fsc.wait_tensor.default)


def all_to_all(input: torch.Tensor, output_split_sizes: Sequence[int] | None = None,
               input_split_sizes: Sequence[int] | None = None,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Eager convenience: the all-to-all and its wait, on ``group`` (default: world).
    Without split sizes, the first dimension is split evenly."""
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    if output_split_sizes is None and input_split_sizes is None:
        if input.dim() == 0 or input.shape[0] % world:
            raise SplitSizeError(f"an input of shape {tuple(input.shape)} does not split evenly over {world} ranks; "
                                 "pass split sizes")
        output_split_sizes = input_split_sizes = [input.shape[0] // world] * world
    elif output_split_sizes is None or input_split_sizes is None:
        raise SplitSizeError("pass both output_split_sizes and input_split_sizes, or neither")
    args = (list(output_split_sizes), list(input_split_sizes), group.group_name)
    handle = torch.ops.fsc.all_to_all_single(input, *args)
    return torch.ops.fsc.wait_tensor(handle, input, *args)
