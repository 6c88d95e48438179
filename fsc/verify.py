"""``verify=True``: check on the first call's real inputs that no pass changed a graph's values.

While the passes run, the verifier keeps a copy of the graph before the first pass and after
every pass that modified it. Nothing runs at compile time: made-up inputs cannot satisfy the
layouts a lowering checks at run time, integer inputs made up as zeros hide a wrong index,
and a backward whose inputs have data-dependent sizes cannot be made up at all. Instead the
compiled graph is wrapped, and its first call runs the chain on copies of its real inputs:
the graph before the passes, then after each pass, each compared with the one before within
that pass's declared tolerance (exact for passes that only reorder). The first pass that
changes a value raises :class:`fsc.errors.VerificationError` naming it, before the compiled
code runs. Later calls go straight to the compiled code.

* aten graphs (forward, backward, inference): their first call's inputs (for the backward,
  the saved activations and the incoming gradients).
* the pre-grad (Dynamo) graph, when a pre-grad pass such as ``lower-attention`` rewrote it:
  outputs and the gradients of every input that requires one (for a random cotangent of
  fixed seed), so a lowering's backward is checked too.

The random-number state is the same for every run of the chain. Graphs with collectives
run them for real, once per run, on every rank alike (the ranks agreed on the graph; see
:mod:`fsc.agreement`). A graph that cannot be checked (the unrewritten graph itself raises on
the real inputs) raises :class:`fsc.errors.UnverifiedError`, or with ``verify="warn"`` logs
a warning, issues a Python warning and notes it in the record.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from fsc.errors import UnverifiedError, VerificationError
from fsc.graph_utils import clone_graph_module

log = logging.getLogger(__name__)

Tolerance = tuple[float, float]


def rng_devices() -> list[int]:
    """CUDA devices whose random state must be saved with the CPU's (none before CUDA is used)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def _copy(x: Any, *, grad: bool = False) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    out = x.detach().clone()
    return out.requires_grad_(grad and x.requires_grad)


def run_values(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[Any]:
    """Outputs of ``gm`` on copies of ``inputs``, then those copies (a graph may write
    into its inputs, and those writes are results too)."""
    cloned = [_copy(x) for x in inputs]
    with torch.random.fork_rng(devices=rng_devices()), torch.no_grad():
        torch.manual_seed(1234)
        out = gm(*cloned)
    flat, _ = tree_flatten(out)
    return flat + [x for x in cloned if isinstance(x, torch.Tensor)]


def run_values_and_grads(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[Any]:
    """Like :func:`run_values`, plus the gradient of every input that requires one for a
    fixed-seed random cotangent on every differentiable output (zeros where unused)."""
    cloned = [_copy(x, grad=True) for x in inputs]
    with torch.random.fork_rng(devices=rng_devices()), torch.enable_grad():
        torch.manual_seed(1234)
        out = gm(*cloned)
        flat, _ = tree_flatten(out)
        outputs = [o for o in flat if isinstance(o, torch.Tensor) and o.requires_grad]
        leaves = [x for x in cloned if isinstance(x, torch.Tensor) and x.requires_grad]
        grads: list[Any] = []
        if outputs and leaves:
            generator = torch.Generator().manual_seed(0)
            cotangents = [torch.randn(o.shape, generator=generator).to(o.dtype).to(o.device) for o in outputs]
            got = torch.autograd.grad(outputs, leaves, cotangents, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, got)]
    values = [o.detach() if isinstance(o, torch.Tensor) else o for o in flat]
    return values + [x.detach() for x in cloned if isinstance(x, torch.Tensor)] + grads


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
    """Called by the pass manager after every pass that modified the graph: keeps the
    chain of graphs, which :meth:`check` runs on the first call's inputs.

    ``notes`` is the list the outcome is written to (the graph's record), ``mode`` is
    ``True`` (a graph that cannot be checked raises) or ``"warn"``; ``with_grads`` checks
    the gradients of the inputs too (the pre-grad graph, whose backward is not a graph of
    its own yet)."""

    def __init__(self, graph_kind: str, notes: list[str], *, mode: bool | str = True, with_grads: bool = False) -> None:
        self.graph_kind = graph_kind
        self.notes = notes
        self.mode = mode
        self.with_grads = with_grads
        self.original: fx.GraphModule | None = None
        self.steps: list[tuple[str, Tolerance, fx.GraphModule]] = []

    def __call__(self, before: fx.GraphModule, after: fx.GraphModule, pass_name: str, tolerance: Tolerance = (0.0, 0.0)) -> None:
        if self.original is None:
            self.original = before  # the pass manager's own copy, taken before this pass
        self.steps.append((pass_name, tolerance, clone_graph_module(after)))

    @property
    def pending(self) -> bool:
        """True while there is a rewrite to check (not yet checked, not fallen back)."""
        return bool(self.steps)

    def discard(self, why: str) -> None:
        """The graph compiles unrewritten after all: nothing to check."""
        if self.steps:
            self.notes.append(f"verify: nothing to check, {why}")
        self.original, self.steps = None, []

    def check(self, inputs: Sequence[Any]) -> None:
        """Run the chain on copies of ``inputs``; raise at the first pass that changed a value."""
        original, steps = self.original, self.steps
        self.original, self.steps = None, []  # once: later calls go straight to the compiled code
        if original is None or not steps:
            return
        run = run_values_and_grads if self.with_grads else run_values
        what = f"the {self.graph_kind} graph" + (" (outputs and input gradients)" if self.with_grads else "")
        start = time.perf_counter()
        try:
            expected = run(original, inputs)
        except Exception as exc:  # noqa: BLE001 - the user's graph itself, not a pass
            self._unverified(f"{what} before the passes raised on the first call's inputs "
                             f"({type(exc).__name__}: {exc}); {', '.join(s[0] for s in steps)} unverified")
            return
        checked = []
        for pass_name, tolerance, gm in steps:
            try:
                got = run(gm, inputs)
            except Exception as exc:
                raise VerificationError(pass_name, f"made {what} raise on the first call's inputs, which the graph "
                                                   f"before it accepts: {type(exc).__name__}: {exc}") from exc
            problem = compare(expected, got, *tolerance)
            if problem is not None:
                raise VerificationError(pass_name, f"changed the values of {what} on the first call's inputs: {problem}")
            checked.append(pass_name)
            expected = got
        self.notes.append(f"verified on the first call's inputs ({len(expected)} values, "
                          f"{(time.perf_counter() - start) * 1e3:.0f} ms): {', '.join(checked)} kept {what}'s values")

    def unverifiable(self, message: str) -> None:
        """The rewrite cannot be checked: raise :class:`UnverifiedError` now (or warn), and
        keep nothing to check."""
        steps = ", ".join(s[0] for s in self.steps)
        self.original, self.steps = None, []
        if steps:
            self._unverified(f"{message}; {steps} unverified")

    def _unverified(self, message: str) -> None:
        if self.mode != "warn":
            raise UnverifiedError(message)
        self.notes.append(f"verify could not check: {message}")
        log.warning("freescale: verify could not check: %s", message)
        warnings.warn(f"freescale: verify could not check: {message}", RuntimeWarning, stacklevel=3)


class CheckedOnFirstCall:
    """Compiled code whose first call runs ``verifier.check`` on its inputs before the code.
    ``boxed``: an aten graph's code, called with one list of arguments (AOTAutograd's
    convention); otherwise the Dynamo-level callable, called with positional arguments.
    Other attributes are the compiled object's."""

    def __init__(self, compiled: Callable[..., Any], verifier: Verifier, *, boxed: bool) -> None:
        self._compiled = compiled
        self._verifier: Verifier | None = verifier
        if boxed:  # on the instance: wrappers (torch._dynamo.disable's functools.wraps) copy its __dict__
            self._boxed_call = True

    def __call__(self, *args: Any) -> Any:
        verifier, self._verifier = self._verifier, None
        if verifier is not None:  # before the compiled code, which may free boxed arguments
            verifier.check(args[0] if getattr(self, "_boxed_call", False) else args)
        return self._compiled(*args)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_compiled", "_verifier", "_boxed_call"):
            raise AttributeError(name)
        return getattr(self._compiled, name)
