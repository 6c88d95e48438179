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

from fsc.analysis.symbolic import NoHintError, has_hint, hint
from fsc.errors import VerificationError

log = logging.getLogger(__name__)


class MissingExampleError(ValueError):
    pass


def _concrete(size: Any, what: str) -> int:
    if not has_hint(size):
        raise MissingExampleError(f"{what} has a data-dependent size {size.node.expr}; verify needs concrete sizes")
    return int(hint(size))


def materialize(value: Any, generator: torch.Generator, what: str = "input") -> Any:
    if isinstance(value, torch.Tensor):
        shape = [_concrete(s, what) for s in value.shape]
        device = value.device if value.device.type != "meta" else torch.device("cpu")
        if value.dtype.is_floating_point or value.dtype.is_complex:
            out = torch.randn(shape, generator=generator, dtype=torch.float32).to(value.dtype)
        else:
            out = torch.zeros(shape, dtype=value.dtype)
        return out.to(device).requires_grad_(False)
    if isinstance(value, torch.SymInt):
        return _concrete(value, what)
    if isinstance(value, torch.SymFloat):
        return float(hint(value))
    if isinstance(value, torch.SymBool):
        return bool(value.node.hint)
    return value


def example_inputs(gm: fx.GraphModule) -> list[Any]:
    generator = torch.Generator().manual_seed(0)
    inputs = []
    with unset_fake_temporarily():
        for node in gm.graph.find_nodes(op="placeholder"):
            if "val" not in node.meta:
                raise MissingExampleError(f"input {node.name} has no example value (meta['val'])")
            inputs.append(materialize(node.meta["val"], generator, f"input {node.name}"))
    return inputs


def rng_devices() -> list[int]:
    """CUDA devices whose random state must be saved with the CPU's (none before CUDA is used)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def _run(gm: fx.GraphModule, inputs: list[Any]) -> list[Any]:
    """Outputs of ``gm`` on copies of ``inputs``, then those copies (a graph may write
    into its inputs, and those writes are results too)."""
    cloned = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.random.fork_rng(devices=rng_devices()), torch.no_grad():
        torch.manual_seed(1234)
        out = gm(*cloned)
    flat, _ = tree_flatten(out)
    return flat + [x for x in cloned if isinstance(x, torch.Tensor)]


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
        except (MissingExampleError, NoHintError) as exc:
            self.inputs = None
            self.notes.append(f"verify could not run on the {graph_kind} graph: {exc}")
            log.warning("freescale: %s", self.notes[-1])

    def __call__(self, before: fx.GraphModule, after: fx.GraphModule, pass_name: str, tolerance: tuple[float, float] = (0.0, 0.0)) -> None:
        if self.inputs is None:
            return
        # Inductor calls passes under its fake mode; verification needs real tensors.
        with unset_fake_temporarily():
            try:
                expected = _run(before, self.inputs)
            except Exception as exc:  # made-up inputs the graph cannot take: say so, don't guess
                self.inputs = None
                self.notes.append(
                    f"verify could not run the {self.graph_kind} graph on made-up inputs "
                    f"({type(exc).__name__}: {exc}); {pass_name} and later passes unverified"
                )
                log.warning("freescale: %s", self.notes[-1])
                return
            problem = compare(expected, _run(after, self.inputs), *tolerance)
        if problem is not None:
            raise VerificationError(pass_name, f"changed the values of the {self.graph_kind} graph: {problem}")
