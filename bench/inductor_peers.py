"""PyTorch Inductor's own compute/communication overlap, run for real, for the benchmarks.

Two peers, both Inductor's code, neither re-implemented here, each measured as the order
Inductor *executes*: the graph is compiled by Inductor with the peer switched on, the order
of its scheduler nodes is recorded right before code generation (after every reordering
pass; :func:`compile_and_record`), checked against the generated code's sequence of
collective and wait calls, and put back onto the FX graph by node name (:func:`apply_order`).
The compile stops once the wrapper code exists: its C++ kernels are not built, since nothing
runs them (the collectives are on a fake process group).

* ``inductor-overlap``: ``aten_distributed_optimizations.enable_overlap_scheduling=True``,
  Inductor's aten-level overlap scheduler (``torch._inductor.fx_passes.overlap_scheduling``),
  which Inductor runs in its post-grad passes (after ``post_grad_custom_post_pass``) with
  ``insert_overlap_deps=True`` so that its scheduler keeps the chosen order.
  :func:`overlap_schedule` runs the pass alone on an FX graph, for comparison: on the HSTU
  forward graph, what Inductor executes differs from the pass's own FX order.
* ``inductor-legacy``: ``config.reorder_for_compute_comm_overlap=True``, which reorders
  Inductor *scheduler* nodes (``torch._inductor.comms``). Its default pass list
  (``reorder_for_compute_comm_overlap_passes``) is empty in torch 2.13, so the flag alone
  changes nothing; we run the list that ``torch/_inductor/config.py`` recommends
  (:data:`LEGACY_PASSES`).

CPU workarounds (Inductor's overlap machinery assumes a GPU):

1. The overlap scheduler's roofline estimate asks Triton for the GPU's memory bandwidth and
   peak FLOP/s (``torch.utils._runtime_estimation.get_gpu_dram_gbps`` /
   ``get_device_tflops``); on a machine without a GPU Triton has no active driver and it
   raises. :func:`device_numbers` patches those two functions to return a
   :class:`~fsc.analysis.cost_model.DeviceProfile`'s numbers, so Inductor plans for the
   same device the shared evaluator scores on. Nothing else of Inductor is patched; its
   collective estimate is its own NCCL model (``comm_analysis``), which works with any
   process group.
2. Its default ``compute_estimator="benchmark"`` times every matmul with CUDA events
   (``benchmark_gpu``), which cannot run without CUDA; we set
   ``aten_distributed_optimizations.compute_estimator="analytical"`` (the roofline model,
   what Inductor itself uses under ``config.deterministic``).

The legacy passes need no workaround on CPU: the scheduler's runtime estimate returns 0
for non-GPU buffers, and the recommended passes with default ``config_comms`` decide on
data dependencies and peak memory, not on runtimes (``reorder_iterative_use_runtime_estimations``
and ``sink_iterative_use_runtime_estimations`` are False). Their order is therefore the
same for every device profile, but it is the order of Inductor's *C++* code generation:
on a GPU, Triton fusion can group kernels differently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from unittest import mock

import torch
import torch.fx as fx

from fsc.analysis.cost_model import DeviceProfile

#: The pass list ``torch/_inductor/config.py`` recommends for ``reorder_for_compute_comm_overlap``.
LEGACY_PASSES = (
    "reorder_communication_preserving_peak_memory",
    "sink_waits_iterative",
    "reorder_communication_preserving_peak_memory",
)


def legacy_config_patches() -> dict[str, Any]:
    return {
        "reorder_for_compute_comm_overlap": True,
        "reorder_for_compute_comm_overlap_passes": list(LEGACY_PASSES),
    }


def overlap_config_patches() -> dict[str, Any]:
    """Inductor config that turns its aten-level overlap scheduler on, with workaround 2."""
    return {
        "aten_distributed_optimizations.enable_overlap_scheduling": True,
        "aten_distributed_optimizations.compute_estimator": "analytical",
    }


@contextlib.contextmanager
def device_numbers(profile: DeviceProfile) -> Iterator[None]:
    """Workaround 1: Inductor's roofline asks Triton for GPU numbers; answer with ``profile``'s."""
    import torch.utils._runtime_estimation as runtime_estimation

    half = (torch.float16, torch.bfloat16)

    def tflops(dtype: torch.dtype) -> float:
        return (profile.flops_half if dtype in half else profile.flops_fp32) / 1e12

    with mock.patch.object(runtime_estimation, "get_gpu_dram_gbps", lambda: profile.memory_bandwidth / 1e9), \
            mock.patch.object(runtime_estimation, "get_device_tflops", tflops):
        yield


PEERS = ("inductor-overlap", "inductor-legacy")


def peer_settings(peer: str, profile: DeviceProfile) -> tuple[dict[str, Any], contextlib.AbstractContextManager]:
    """Inductor config patches for ``peer`` and the context to compile it in."""
    if peer == "inductor-overlap":
        return overlap_config_patches(), device_numbers(profile)
    if peer == "inductor-legacy":
        return legacy_config_patches(), contextlib.nullcontext()
    raise ValueError(f"unknown Inductor peer {peer!r}; choose from {', '.join(PEERS)}")


def overlap_schedule(gm: fx.GraphModule, profile: DeviceProfile) -> None:
    """Reorder ``gm`` in place with Inductor's aten-level overlap scheduler, configured as
    Inductor's defaults configure it, planning for ``profile``: the pass alone, on the FX
    graph. What Inductor then executes can differ (its scheduler fuses and orders kernels
    afterwards); :func:`executed_orders` measures that."""
    from torch._inductor import config as inductor_config
    from torch._inductor.fx_passes.overlap_scheduling import schedule_overlap_bucketing_from_inductor_configs

    patches = overlap_config_patches() | {"aten_distributed_optimizations.insert_overlap_deps": False}
    with device_numbers(profile), inductor_config.patch(patches):
        schedule_overlap_bucketing_from_inductor_configs(gm)
    gm.recompile()


# ----------------------------------------------------------------------- executed order


def graph_kind(placeholder_names: list[str]) -> str:
    """``forward``/``backward``/``inference`` from AOTAutograd's placeholder names."""
    if any(n.startswith("tangents") for n in placeholder_names):
        return "backward"
    return "forward" if any(n.startswith("primals") for n in placeholder_names) else "inference"


@dataclasses.dataclass(kw_only=True, slots=True)
class Compiled:
    """What one Inductor compile produced, per graph kind."""

    graphs: dict[str, fx.GraphModule] = dataclasses.field(default_factory=dict)
    """Post-grad graphs, copied where Inductor runs ``post_grad_custom_post_pass`` (where
    the freescale backend's passes run)."""
    orders: dict[str, list[tuple[str, ...]]] = dataclasses.field(default_factory=dict)
    """Scheduler nodes in the order Inductor generates code for them; each is the names of
    the FX nodes it computes."""
    code: dict[str, str] = dataclasses.field(default_factory=dict)


def _op(node: fx.Node) -> Any:
    """The op a node runs; for Inductor's ``control_deps`` wrapper (which the overlap
    scheduler puts around nodes to pin their order, keeping their names), the wrapped op."""
    target = node.target
    if getattr(target, "_name", None) == "control_deps" and len(node.args) > 1:
        subgraph = getattr(node.graph.owning_module, str(getattr(node.args[1], "target", "")), None)
        calls = [n for n in getattr(subgraph, "graph", fx.Graph()).nodes if n.op == "call_function"]
        if len(calls) == 1:
            return calls[0].target
    return target


def _is_c10d(node: fx.Node) -> bool:
    target = _op(node)
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "_c10d_functional"


def _snode_origins(snode: Any, index: dict[fx.Node, int]) -> tuple[str, ...]:
    """The FX nodes one scheduler node computes. A collective's or wait's FX node is also
    an origin of the kernels that prepare its input (they were made while lowering it);
    only the collective or wait kernel itself runs it."""
    from torch._inductor import ir

    origins: set[fx.Node] = set()
    comm = False
    for leaf in snode.get_nodes():
        node = getattr(leaf, "node", None)
        comm = comm or isinstance(node, (ir._CollectiveKernel, ir._WaitKernel))
        origins.update(o for o in getattr(node, "origins", ()) if isinstance(o, fx.Node))
    origins = {o for o in origins if _is_c10d(o) == comm}
    return tuple(o.name for o in sorted(origins, key=lambda o: index.get(o, math.inf)))


class _Stop(Exception):
    """Raised inside Inductor once what we record is recorded, so that it neither builds nor
    loads code that nothing will run."""


@dataclasses.dataclass(kw_only=True, slots=True)
class _Recorder:
    """Hooks into Inductor that fill a :class:`Compiled`.

    ``stop="post_grad"``: keep the post-grad graphs and stop each graph's compile there.
    ``stop="codegen"``: also keep the scheduler order and the generated wrapper code, and
    stop before the C++ kernels are built (the order is final by then).
    """

    out: Compiled
    stop: str
    current: str | None = None
    """The kind of the graph Inductor is compiling."""
    stopped: bool = False

    def capture(self, graph: fx.Graph) -> None:
        from fsc.graph_utils import clone_graph_module

        names = [n.name for n in graph.find_nodes(op="placeholder")]
        self.current = graph_kind(names)
        self.out.graphs[self.current] = clone_graph_module(graph.owning_module)
        if self.stop == "post_grad":
            self.stopped = True
            raise _Stop

    def record_order(self, scheduler: Any) -> None:
        from torch._inductor.virtualized import V

        index = {n: i for i, n in enumerate(V.graph.module.graph.nodes)}
        kind = graph_kind(list(V.graph.graph_input_names))
        self.out.orders[kind] = [_snode_origins(s, index) for s in scheduler.nodes]
        self.current = kind

    def save_code(self, code: str) -> None:
        self.out.code[self.current] = code
        self.stopped = True
        raise _Stop

    def inner_compile(self, gm: fx.GraphModule, example_inputs: Any, **kwargs: Any) -> Any:
        """Inductor's ``compile_fx_inner`` up to the stop, then a stand-in that must never run."""
        from torch._inductor.compile_fx import compile_fx_inner

        self.stopped = False
        try:
            return compile_fx_inner(gm, example_inputs, **kwargs)
        except Exception:
            if not self.stopped:  # a real failure, not our stop sign
                raise

        def never_run(*args: Any) -> Any:
            raise RuntimeError("bench recorded this graph's compile and built no code; it cannot run")

        never_run._boxed_call = True  # type: ignore[attr-defined]
        return never_run


@contextlib.contextmanager
def _hooks(recorder: _Recorder) -> Iterator[None]:
    from torch._inductor import config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass
    from torch._inductor.graph import GraphLowering
    from torch._inductor.scheduler import Scheduler

    class Capture(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            recorder.capture(graph)

        def uuid(self) -> None:
            return None  # never served from a cache: the capture must run

    original_codegen = Scheduler.codegen

    def codegen(scheduler: Scheduler) -> Any:
        recorder.record_order(scheduler)
        return original_codegen(scheduler)

    with mock.patch.object(Scheduler, "codegen", codegen), \
            mock.patch.object(GraphLowering, "save_output_code", recorder.save_code), \
            inductor_config.patch({"post_grad_custom_post_pass": Capture(), "fx_graph_cache": False}), \
            torch._functorch.config.patch(enable_autograd_cache=False, force_non_lazy_backward_lowering=True):
        yield


class _Compiled(Exception):
    """Raised by the capturing Dynamo backend once Inductor has compiled, so nothing runs."""


def compile_and_record(fn: Callable[..., Any], inputs: list[Any], patches: dict[str, Any], *,
                       stop: str = "codegen") -> Compiled:
    """Compile ``fn(*inputs)`` with Dynamo and Inductor under ``patches``, forward and
    backward (capture_scalar_outputs on, as the HSTU example needs), without running it
    (the collectives may be on a fake process group); see :class:`_Recorder` for ``stop``."""
    from torch._inductor.compile_fx import compile_fx

    recorder = _Recorder(out=Compiled(), stop=stop)
    done = []

    def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        compile_fx(gm, example_inputs, inner_compile=recorder.inner_compile, config_patches=patches)
        done.append(True)
        raise _Compiled

    torch._dynamo.reset()
    try:
        with _hooks(recorder), torch._dynamo.config.patch(capture_scalar_outputs=True):
            torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    except Exception:
        if not done:  # a real failure, not our stop sign
            raise
    finally:
        torch._dynamo.reset()
    return recorder.out


def compile_graph_and_record(gm: fx.GraphModule, inputs: list[torch.Tensor], patches: dict[str, Any], *,
                             stop: str = "codegen") -> Compiled:
    """Compile an aten graph (no Dynamo) with Inductor under ``patches``; see :class:`_Recorder`."""
    from torch._inductor.compile_fx import compile_fx

    from fsc.graph_utils import clone_graph_module

    recorder = _Recorder(out=Compiled(), stop=stop)
    with _hooks(recorder):
        compile_fx(clone_graph_module(gm), inputs, inner_compile=recorder.inner_compile, config_patches=patches)
    return recorder.out


def executed_orders(peer: str, profile: DeviceProfile, compile_: Callable[[dict[str, Any]], Compiled],
                    kinds: Iterable[str]) -> dict[str, list[tuple[str, ...]]]:
    """The order Inductor executes, with ``peer``'s reordering on, for each graph kind that
    ``compile_(config_patches)`` compiles. Raises if the recorded order and the generated
    code disagree on the sequence of collectives and waits."""
    patches, context = peer_settings(peer, profile)
    with context:
        compiled = compile_(patches)
    out = {}
    for kind in kinds:
        order, lowered = compiled.orders[kind], compiled.graphs[kind]
        in_code = collective_sequence_in_code(compiled.code[kind])
        in_order = collective_sequence_in_order(lowered, order)
        if in_code != in_order:
            raise RuntimeError(f"{kind}: recorded scheduler order {in_order} disagrees with the generated "
                               f"code {in_code}")
        out[kind] = order
    return out


_COLLECTIVE_CALL = re.compile(r"torch\.ops\._c10d_functional\.(\w+)\.default\(")


def collective_sequence_in_code(code: str) -> list[str]:
    """Functional collective ops in the order the generated code calls them."""
    return _COLLECTIVE_CALL.findall(code)


def collective_sequence_in_order(gm: fx.GraphModule, order: list[tuple[str, ...]]) -> list[str]:
    """The same, from a recorded scheduler order (one entry per scheduler node that
    computes a functional collective or wait)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    nodes = [by_name[name] for names in order for name in names if name in by_name]
    return [_op(n)._opname for n in nodes if _is_c10d(n)]


def apply_order(gm: fx.GraphModule, order: list[tuple[str, ...]]) -> list[fx.Node]:
    """Reorder ``gm`` in place to follow a recorded scheduler order.

    A node named in the order takes the position of the first scheduler node that computes
    it. A node named nowhere (views, size reads and runtime asserts, which Inductor's
    wrapper evaluates where their inputs become available, nodes it folded away) goes as
    early as its inputs allow. Data dependencies always win (the result is a topological
    order). Returns the call_function nodes named nowhere.
    """
    position: dict[str, int] = {}
    for i, names in enumerate(order):
        for name in names:
            position.setdefault(name, i)
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    key: dict[fx.Node, float] = {}
    unnamed = []
    for node in nodes:
        if node.name in position:
            key[node] = position[node.name]
        else:
            key[node] = max((key[p] for p in node.all_input_nodes), default=-1)
            if node.op == "call_function":
                unnamed.append(node)
    movable = [n for n in nodes if n.op not in ("placeholder", "output")]
    waiting = {n: sum(1 for p in set(n.all_input_nodes) if p.op != "placeholder") for n in movable}
    ready = [(key[n], index[n], n) for n in movable if waiting[n] == 0]
    heapq.heapify(ready)
    output = gm.graph.output_node()
    while ready:
        _, _, node = heapq.heappop(ready)
        output.prepend(node)
        for user in node.users:
            if user in waiting:
                waiting[user] -= 1
                if waiting[user] == 0:
                    heapq.heappush(ready, (key[user], index[user], user))
    gm.graph.lint()
    gm.recompile()
    return unnamed
