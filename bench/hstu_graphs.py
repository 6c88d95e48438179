"""The HSTU example's forward and backward graphs, as the freescale backend sees them, on a
world of several ranks, captured in one process.

The model comes from the development package ``examples.hstu`` (importable from a
checkout set up with ``make setup``), not from the wheel.

Capture: a fake process group (``torch.testing._internal.distributed.fake_pg``; it
hallucinates collectives, so no peer is needed) of ``world`` ranks, this process being rank
0; the model is compiled with Dynamo and Inductor exactly as for training (token dimension
marked dynamic, ``capture_scalar_outputs`` for the exchange's data-dependent split sizes)
and the post-grad aten graphs are copied where Inductor runs ``post_grad_custom_post_pass``
(where the backend's passes run), forward and backward; each compile stops there. Nothing
is executed: the fake group's all-to-all would hand the exchange garbage split sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx


@contextlib.contextmanager
def fake_world(size: int) -> Iterator[str]:
    """A fake process group of ``size`` ranks (this process is rank 0) for the block, unless
    one is already initialised; yields the default group's name."""
    if dist.is_initialized():
        yield dist.group.WORLD.group_name
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HSTUSpec:
    """A realistic-but-small HSTU step: 8 sequences (346 tokens on rank 0 with the default
    seed), dim 128, 2 layers, 128 sampled negatives on the rank (16 per sequence), item table
    sharded over 8 ranks. The model's ``dense`` attention form: its graph has one size
    symbol, the rank's token count, which the simulator re-costs per sequence."""

    world: int = 8
    num_items: int = 5000
    dim: int = 128
    heads: int = 2
    qk_dim: int = 64
    v_dim: int = 64
    layers: int = 2
    max_len: int = 64
    negatives: int = 128
    """On the rank: ``negatives // sequences`` (at least 1) per sequence."""
    sequences: int = 8
    mean_length: float = 50.0
    seed: int = 0

    def describe(self) -> str:
        return (f"HSTU dim={self.dim} heads={self.heads} qk/v={self.qk_dim}/{self.v_dim} layers={self.layers} "
                f"max_len={self.max_len} negatives={self.negatives}, {self.sequences} sequences, "
                f"world={self.world}")


def hstu_step(spec: HSTUSpec) -> tuple[torch.nn.Module, list[Any]]:
    """The model and one rank's inputs (token dimension marked dynamic, as in training).
    Needs a process group of ``spec.world`` ranks."""
    from examples.hstu.data import synthetic_histories
    from examples.hstu.model import HSTU, HSTUConfig, model_inputs, read_batch, scale_tensor

    histories = synthetic_histories(num_users=max(4 * spec.sequences, 16), num_items=spec.num_items,
                                    seed=spec.seed, mean_length=spec.mean_length, max_length=4 * spec.max_len)
    cfg = HSTUConfig(num_items=spec.num_items, dim=spec.dim, heads=spec.heads, qk_dim=spec.qk_dim,
                     v_dim=spec.v_dim, layers=spec.layers, max_len=spec.max_len,
                     num_negatives=max(1, spec.negatives // spec.sequences), seed=spec.seed, attention="dense")
    batch = read_batch(histories, range(spec.sequences), cfg, seed=spec.seed, step=0)
    model = HSTU(cfg)
    trained = float((batch.targets > 0).sum()) * spec.world
    inputs = model_inputs(batch, scale_tensor(trained), cfg)
    for t in inputs[:6]:  # the token count only: the sequence count stays static
        torch._dynamo.mark_dynamic(t, 0)
    return model, inputs


def compile_hstu(spec: HSTUSpec, record: Callable[[Callable[..., Any], list[Any]], Any]) -> Any:
    """``record(model, inputs)`` on a fresh model and inputs (see
    :func:`bench.inductor_peers.compile_and_record`)."""
    model, inputs = hstu_step(spec)
    return record(model, inputs)


def capture_hstu_graphs(spec: HSTUSpec) -> dict[str, fx.GraphModule]:
    """The forward and backward graphs the freescale backend's passes would get.

    Compiled with Inductor's default config: the reorderings the backend switches off
    (``reorder_for_peak_memory``, ``reorder_for_compute_comm_overlap``, the aten overlap
    scheduler) all act after the point of capture, and Inductor's defaults keep the latter
    two off, so the post-grad graph is the same. Needs a process group of ``spec.world``.
    """
    from bench.inductor_peers import compile_and_record

    compiled = compile_hstu(spec, lambda fn, inputs: compile_and_record(fn, inputs, {}, stop="post_grad"))
    missing = {"forward", "backward"} - set(compiled.graphs)
    if missing:
        raise RuntimeError(f"HSTU capture did not see the {', '.join(sorted(missing))} graph")
    return {kind: compiled.graphs[kind] for kind in ("forward", "backward")}
