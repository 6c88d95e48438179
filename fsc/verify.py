"""``verify=True``: run a graph before and after each pass on the same inputs and compare.

Inputs are materialised from the example values AOTAutograd and Inductor attach to
placeholders: floating tensors are drawn from a fixed-seed normal, integer and boolean
tensors are zeros (valid indices and split sizes), symbolic sizes take their hints. The
random-number state is the same for both runs. Graphs that contain collectives run them
for real, once per run, on every rank alike (every rank compiles the same graph).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._pytree import tree_flatten

from fsc.analysis.symbolic import hint
from fsc.errors import VerificationError

log = logging.getLogger(__name__)


class MissingExampleError(ValueError):
    pass


def materialize(value: Any, generator: torch.Generator) -> Any:
    if isinstance(value, torch.Tensor):
        shape = [int(hint(s)) for s in value.shape]
        device = value.device if value.device.type != "meta" else torch.device("cpu")
        if value.dtype.is_floating_point or value.dtype.is_complex:
            out = torch.randn(shape, generator=generator, dtype=torch.float32).to(value.dtype)
        else:
            out = torch.zeros(shape, dtype=value.dtype)
        return out.to(device).requires_grad_(False)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return type(hint(value))(hint(value)) if not isinstance(value, torch.SymInt) else int(hint(value))
    return value


def example_inputs(gm: fx.GraphModule) -> list[Any]:
    generator = torch.Generator().manual_seed(0)
    inputs = []
    with unset_fake_temporarily():
        for node in gm.graph.find_nodes(op="placeholder"):
            if "val" not in node.meta:
                raise MissingExampleError(f"input {node.name} has no example value (meta['val'])")
            inputs.append(materialize(node.meta["val"], generator))
    return inputs


def _run(gm: fx.GraphModule, inputs: list[Any]) -> list[Any]:
    cloned = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1234)
        out = gm(*cloned)
    flat, _ = tree_flatten(out)
    return flat


def compare(before: list[Any], after: list[Any], rtol: float, atol: float) -> str | None:
    """None if equal within tolerance, else a sentence saying where they differ."""
    if len(before) != len(after):
        return f"{len(before)} outputs before, {len(after)} after"
    for i, (a, b) in enumerate(zip(before, after)):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return f"output {i} is {type(a).__name__} before and {type(b).__name__} after"
        if not isinstance(a, torch.Tensor):
            if a != b:
                return f"output {i} is {a!r} before and {b!r} after"
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i} is {a.dtype}{list(a.shape)} before and {b.dtype}{list(b.shape)} after"
        if rtol == 0 and atol == 0:
            if not torch.equal(a, b):
                diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
                return f"output {i} differs (max abs diff {diff:.3g}; this pass must not change values)"
        elif not torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            diff = (a.double() - b.double()).abs().max().item()
            return f"output {i} differs by up to {diff:.3g} (rtol={rtol}, atol={atol})"
    return None


class Verifier:
    """Called by the pass manager after every pass that modified the graph."""

    def __init__(self, gm: fx.GraphModule, graph_kind: str) -> None:
        self.graph_kind = graph_kind
        self.notes: list[str] = []
        try:
            self.inputs: list[Any] | None = example_inputs(gm)
        except MissingExampleError as exc:
            self.inputs = None
            self.notes.append(f"verify could not run on the {graph_kind} graph: {exc}")
            log.warning("freescale: %s", self.notes[-1])

    def __call__(self, before: fx.GraphModule, after: fx.GraphModule, pass_name: str, tolerance: tuple[float, float] = (0.0, 0.0)) -> None:
        if self.inputs is None:
            return
        # Inductor calls passes under its fake mode; verification needs real tensors.
        with unset_fake_temporarily():
            problem = compare(_run(before, self.inputs), _run(after, self.inputs), *tolerance)
        if problem is not None:
            raise VerificationError(pass_name, f"changed the values of the {self.graph_kind} graph: {problem}")
