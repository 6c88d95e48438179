"""The ``freescale`` backend: ``torch.compile(model, backend="freescale", options={...})``.

Dynamo hands us a graph; the pipeline's pre-grad passes (``stage = "pre-grad"``, e.g.
``lower-attention``) rewrite it first, in both inner modes, so that replacements bring their
own autograd; AOTAutograd makes the forward and backward aten graphs; the other passes
rewrite each; the inner compiler turns them into code:

* ``inner="inductor"`` (default): the pipeline runs as Inductor's post-grad custom pass
  (a ``CustomGraphPass`` with a stable ``uuid()``, so Inductor's FX graph cache keeps
  working), and Inductor's own reordering passes (``reorder_for_peak_memory``,
  ``reorder_for_compute_comm_overlap``, the aten overlap scheduler) are switched off for
  the graphs we compile, so the order the passes chose is the order that runs.
* ``inner="eager"``: AOTAutograd with our own forward/backward compilers that run the
  rewritten graphs as plain PyTorch. Fast to compile; for tests and debugging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import logging
import os
import pathlib
import pickle
import time
from collections.abc import Iterator
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

import torch
import torch.fx as fx

from fsc import agreement, invariants
from fsc.analysis.cost_model import CostModel, exchange_size_estimates, graph_cost
from fsc.analysis.symbolic import NoHintError
from fsc.analysis.timeline import estimate_timeline
from fsc.config import Config
from fsc.errors import OptionError, PassFailedError
from fsc.graph_utils import clone_graph_module, readable, replace_graph_contents
from fsc.inspect import CACHE_NOTE, STORE, CompileRecord, GraphRecord, SubgraphRecord
from fsc.pass_manager import PassManager, passes_for_stage
from fsc.passes.base import PassContext
from fsc.verify import CheckedOnFirstCall, Verifier

log = logging.getLogger(__name__)

_INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def freescale(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Any:
    """Dynamo backend entry point.

    ``kwargs`` are what ``torch.compile`` passes: ``options`` (validated into
    :class:`fsc.Config`) and ``mode`` (forwarded to Inductor).
    """
    options = kwargs.pop("options", None)
    mode = kwargs.pop("mode", None)
    if kwargs:
        raise OptionError(f"unexpected backend argument(s) {sorted(kwargs)}; pass settings as options={{...}}")
    config = Config.from_options(options)
    if mode is not None and mode not in _INDUCTOR_MODES:
        raise OptionError(f"mode={mode!r} is not one of {', '.join(_INDUCTOR_MODES)}")
    if mode not in (None, "default") and config.inner != "inductor":
        raise OptionError(f"mode={mode!r} needs inner='inductor'; inner={config.inner!r} has no modes")
    record = STORE.new_subgraph(config, readable(gm))
    record.frame = _frame_id(record)
    if passes_for_stage(config.passes, "pre-grad"):
        rewrite_graph(gm, PRE_GRAD, config, record)
    if config.inner == "eager":
        compiled = _compile_eager(gm, example_inputs, config, record)
    else:
        compiled = _compile_inductor(gm, example_inputs, config, record, mode)
    verifier = record.pending_checks.pop(PRE_GRAD, None)
    return compiled if verifier is None else CheckedOnFirstCall(compiled, verifier, boxed=False)


PRE_GRAD = "pre-grad"
"""Kind of the Dynamo (torch IR) graph in records; the pre-grad passes run on it."""


def _frame_id(record: SubgraphRecord) -> str:
    """Dynamo's frame id of the graph being compiled (the same on every rank running the
    same program; a recompile keeps it), or the record's serial outside Dynamo."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    if compile_id is None or compile_id.frame_id is None:
        return f"call{record.serial}"
    extra = "" if compile_id.compiled_autograd_id is None else f"ca{compile_id.compiled_autograd_id}."
    return f"{extra}{compile_id.frame_id}"


def rewrite_graph(gm: fx.GraphModule, kind: str, config: Config, record: SubgraphRecord) -> GraphRecord:
    """Run the pipeline's passes for ``kind`` on one graph in place and record what happened:
    the pre-grad passes on the Dynamo graph (``kind="pre-grad"``), the others on an aten
    graph (``forward``, ``backward``, ``inference``).

    A pass that fails (raises, or breaks an invariant) makes the graph compile unrewritten
    with the reason logged and recorded, unless ``on_error="raise"``. With ``verify`` the
    chain of rewrites is kept in ``record.pending_checks`` for the caller to check on the
    graph's first call (:mod:`fsc.verify`). The pre-grad graph gets no timeline estimate,
    cost or memory budget (those read aten graphs), and is recorded only when a pre-grad
    pass changed it or declined something.
    """
    start = time.perf_counter()
    pre_grad = kind == PRE_GRAD
    passes = passes_for_stage(config.passes, PRE_GRAD if pre_grad else "aten")
    if kind == "forward" and not record.size_estimates:  # Inductor's path set them already (_noting_served)
        _note_size_estimates(record, gm)
    cost_model = CostModel(config.profile, size_estimates=record.size_estimates if kind == "backward" else None)
    budget = None if config.memory_budget_gb is None or pre_grad else config.memory_budget_gb * 2**30
    ctx = PassContext(graph_kind=kind, cost_model=cost_model, memory_budget_bytes=budget)
    graph_record = GraphRecord(kind=kind, graph_before=readable(gm))
    record.add(graph_record)
    if pre_grad:
        graph_record.notes.append("torch IR before AOTAutograd: no estimate or cost (those read the aten graphs)")
    else:
        graph_record.estimate_before, _ = _estimate(gm, cost_model, graph_record)
    if not pre_grad:
        invariants.stamp_collective_ids(gm.graph)  # before the copy: both forms name collectives alike
    saved = clone_graph_module(gm)
    verifier = Verifier(kind, graph_record.notes, mode=config.verify, with_grads=pre_grad) if config.verify else None
    try:
        PassManager(passes, verifier=verifier).run(gm, ctx, graph_record.passes)
    except PassFailedError as exc:
        if config.on_error == "raise":
            if not pre_grad:  # the peers must not wait for this rank, nor run without it
                _agree_on_graph(gm, saved, kind, config, record, graph_record, raised=str(exc))
            raise
        log.warning("freescale: %s; compiling the %s graph unrewritten", exc, kind)
        if pre_grad:
            _restore_keeping_inputs(gm.graph, saved.graph)
        else:
            replace_graph_contents(gm.graph, saved.graph)
        graph_record.fallback = str(exc)
    alone = _agree_on_graph(gm, saved, kind, config, record, graph_record) if not pre_grad else False
    if alone and config.verify:  # the Dynamo graph's check would run the same collectives alone too
        for pending in (verifier, record.pending_checks.pop(PRE_GRAD, None)):
            if pending is not None:
                pending.unverifiable(f"this rank compiled the {kind} graph again without its peers (they run an "
                                     "earlier compile with the same collectives): checking it would run its "
                                     "collectives without them. Mark the varying sizes dynamic so the ranks "
                                     "compile together")
    elif verifier is not None:
        if graph_record.fallback is not None:
            verifier.discard("the graph compiles unrewritten")
        elif verifier.pending:
            record.pending_checks[kind] = verifier
    gm.recompile()
    graph_record.graph_after = readable(gm)
    if pre_grad and graph_record.fallback is None and not any(p.modified or p.reasons for p in graph_record.passes):
        # nothing to lower and nothing declined: keep records of graphs without attention as they were
        del record.graphs[next(k for k, g in record.graphs.items() if g is graph_record)]
        return graph_record
    if not pre_grad:
        graph_record.estimate_after, graph_record.timeline_after = _estimate(gm, cost_model, graph_record)
        graph_record.cost = graph_cost(gm.graph, cost_model)
    graph_record.seconds = time.perf_counter() - start
    if record.cache_path is not None:
        _save_record(record)
    if record.aten_path is not None and not pre_grad:
        # before Inductor writes its entry: whoever is served that entry finds this record
        _write_atomically(record.aten_path, pickle.dumps(graph_record))
    if config.dump_dir is not None:
        _dump(config.dump_dir, record, kind)
    return graph_record


def _note_size_estimates(record: SubgraphRecord, gm: fx.GraphModule) -> None:
    try:  # a convenience for the backward's estimates: never a reason to fail a compile
        record.size_estimates = exchange_size_estimates(gm.graph)
    except Exception as exc:  # noqa: BLE001
        log.debug("freescale: no split-size estimates for the backward graph: %s", exc)


def _agree_on_graph(
    gm: fx.GraphModule | None,
    saved: fx.GraphModule | None,
    kind: str,
    config: Config,
    record: SubgraphRecord,
    graph_record: GraphRecord,
    *,
    raised: str | None = None,
    cached: bool = False,
    wait: bool = True,
) -> bool:
    """Agree with the peers of this graph's process groups on what it communicates
    (:mod:`fsc.agreement`) before it first runs: fall back with them when a peer's passes
    failed, raise with them on any difference. ``saved`` is the graph before the passes
    (None when the code came from a cache and cannot change). True when this rank runs the
    graph without its peers compiling it too (see :attr:`fsc.agreement.Decision.alone`)."""
    after = getattr(graph_record, "collectives", None) if cached else agreement.fingerprint(gm.graph)
    before = agreement.fingerprint(saved.graph) if saved is not None else None
    graph_record.collectives = after
    if kind in record.agreed or not agreement.needed(after or before):
        return False
    record.agreed.add(kind)
    name = f"the {kind} graph of Dynamo frame {record.frame} (subgraph {record.serial})"
    payload = agreement.Payload(
        rank=torch.distributed.get_rank(),
        rewritten=after if cached else None if graph_record.fallback is not None or raised is not None else after,
        unrewritten=before,
        fallback=graph_record.fallback,
        raised=raised,
        shapes=agreement.input_shapes((saved or gm).graph) if (saved or gm) is not None else [],
        pipeline=config.pipeline,
        cached=cached,
    )
    decision = agreement.agree(f"{record.frame}.{kind}", name, payload, timeout_s=config.agreement_timeout_s,
                               wait=wait, grace_s=agreement.CHECKED_GRACE_S if config.verify else agreement.STALE_GRACE_S)
    if decision.fall_back and graph_record.fallback is None and saved is not None:
        log.warning("freescale: %s: %s", name, decision.why)
        replace_graph_contents(gm.graph, saved.graph)
        gm.recompile()
        graph_record.fallback = decision.why
        graph_record.collectives = before
    graph_record.notes.append(f"collectives agreed across ranks in {decision.waited_s * 1e3:.1f} ms" if wait else
                              "collectives published for the peers to check (a cached backward does not wait)")
    return decision.alone


def _checked(compiled: Any, record: SubgraphRecord, kinds: tuple[str, ...]) -> Any:
    """``compiled`` (boxed), checked on its first call when ``verify`` kept a rewrite of it."""
    for kind in kinds:
        verifier = record.pending_checks.pop(kind, None)
        if verifier is not None:
            return CheckedOnFirstCall(compiled, verifier, boxed=True)
    return compiled


def _restore_keeping_inputs(dst: fx.Graph, src: fx.Graph) -> None:
    """Make ``dst`` a copy of ``src`` but keep ``dst``'s placeholder nodes themselves:
    Dynamo's graph carries facts on them (``_dynamo_source``) that AOTAutograd reads."""
    inputs = list(dst.find_nodes(op="placeholder"))
    originals = list(src.find_nodes(op="placeholder"))
    if [n.name for n in inputs] != [n.name for n in originals]:
        raise RuntimeError("a pre-grad pass changed the graph's inputs; cannot restore it")
    body = [n for n in dst.nodes if n.op != "placeholder"]
    for node in body:  # cut every use first: a failed pass may have left users before producers
        node.args, node.kwargs = (), {}
    for node in reversed(body):
        dst.erase_node(node)
    dst.output(dst.graph_copy(src, dict(zip(originals, inputs))))


def _estimate(gm: fx.GraphModule, cost_model: CostModel, graph_record: GraphRecord) -> tuple[Any, Any]:
    try:
        timeline = estimate_timeline(gm.graph, cost_model)
    except NoHintError as exc:
        graph_record.notes.append(f"no estimate: {exc}")
        return None, None
    return timeline.summary(), timeline


def _dump(dump_dir: str, record: SubgraphRecord, kind: str) -> None:
    root = pathlib.Path(dump_dir) / f"subgraph_{record.serial:03d}"
    CompileRecord(subgraphs=[record]).dump(root)
    log.info("freescale: wrote the %s graph record to %s", kind, root)


# ---------------------------------------------------------------------------- eager


def _compile_eager(gm: fx.GraphModule, example_inputs: list[Any], config: Config, record: SubgraphRecord) -> Any:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(kind: str) -> Any:
        def compile_graph(graph_module: fx.GraphModule, _inputs: list[Any]) -> Any:
            rewrite_graph(graph_module, kind, config, record)
            return _checked(make_boxed_func(graph_module.forward), record, (kind,))

        return compile_graph

    backend = aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        inference_compiler=compiler("inference"),
        keep_inference_input_mutations=True,
    )
    return backend(gm, example_inputs)


# ------------------------------------------------------------------------- inductor


@functools.cache
def _source_digest() -> str:
    """Hash of the installed package's source (front end, analysis, passes, and the runtime
    ops and kernels whose schemas the passes emit), so an edit to any of it invalidates
    Inductor's cache. Benchmarks, the simulator and the examples live outside the package
    and do not enter the key."""
    digest = hashlib.sha256()
    root = pathlib.Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _custom_pass_base() -> type:
    from torch._inductor import custom_graph_pass

    # Inference-aware passes are told whether a graph is an inference graph (torch 2.13);
    # older versions call a plain CustomGraphPass with the graph alone.
    return getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", custom_graph_pass.CustomGraphPass)


def _kind_from_inputs(gm: fx.GraphModule) -> str:
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    if any(n.startswith("tangents") for n in names):
        return "backward"
    return "forward" if any(n.startswith("primals") for n in names) else "inference"


def _as_list(passes: Any) -> list[Any]:
    if passes is None:
        return []
    return list(passes) if isinstance(passes, (list, tuple)) else [passes]


def _pass_identity(p: Any) -> str | None:
    """What a pass's code is, for cache keys: built-in passes are covered by fsc's source
    digest; anything else by its own source (None when that cannot be read)."""
    cls = type(p)
    if cls.__module__.startswith("fsc."):
        return f"{cls.__module__}.{cls.__qualname__}"
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return None
    return f"{cls.__module__}.{cls.__qualname__}:{hashlib.sha256(source.encode()).hexdigest()}"


class InductorPass(_custom_pass_base()):  # type: ignore[misc]
    """Our pipeline as Inductor's ``post_grad_custom_post_pass``, followed by whatever
    custom post pass the user had configured.

    ``uuid()`` depends only on the configuration, fsc's source and the source of any
    pass that is not fsc's, so Inductor's FX graph cache keys stay stable across runs and
    change when a pass does. On a cache hit the pass does not run; the backend then reads
    back the record written when the entry was made.
    """

    def __init__(self, config: Config, record: SubgraphRecord, chained: Any = None) -> None:
        self.config = config
        self.record = record
        self.chained = _as_list(chained)

    def __call__(self, graph: fx.Graph, is_inference: bool | None = None) -> None:
        gm = graph.owning_module
        if gm is None:
            raise RuntimeError("Inductor handed the freescale pass a graph without an owning module")
        kind = _kind_from_inputs(gm)
        if is_inference is not None:
            kind = "inference" if is_inference else ("backward" if kind == "backward" else "forward")
        rewrite_graph(gm, kind, self.config, self.record)
        for user_pass in self.chained:
            if _takes_inference_flag(user_pass):
                user_pass(graph, is_inference=bool(is_inference))
            else:
                user_pass(graph)

    def uuid(self) -> Any:
        c = self.config
        passes = [_pass_identity(p) for p in c.passes]
        if None in passes:
            return None  # a pass whose code we cannot identify: never serve it from cache
        key = repr((c.pipeline, passes, c.device_profile, c.memory_budget_gb, c.verify, c.on_error, _source_digest()))
        chained = [p.uuid() if hasattr(p, "uuid") else None for p in self.chained]
        if None in chained:
            return None  # an uncacheable user pass makes the whole thing uncacheable
        return hashlib.sha256((key + repr(chained)).encode()).hexdigest()


def _takes_inference_flag(p: Any) -> bool:
    from torch._inductor import custom_graph_pass

    base = getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", None)
    return base is not None and isinstance(p, base)


def inductor_config_patches(config: Config, record: SubgraphRecord, mode: str | None) -> dict[str, Any]:
    import torch._inductor as inductor
    from torch._inductor import config as inductor_config

    patches: dict[str, Any] = {}
    if mode not in (None, "default"):
        patches.update(inductor.list_mode_options(mode))
    patches.update(
        {
            "post_grad_custom_post_pass": InductorPass(config, record, inductor_config.post_grad_custom_post_pass),
            # Inductor's own reorderings would undo the schedule our passes chose.
            "reorder_for_peak_memory": False,
            "reorder_for_compute_comm_overlap": False,
        }
    )
    if hasattr(inductor_config, "aten_distributed_optimizations"):
        patches["aten_distributed_optimizations.enable_overlap_scheduling"] = False
    if config.verify or config.dump_dir is not None or STORE.collecting.get() is not None:
        # The pass must run to verify, dump or explain: a cache hit would skip it.
        patches["fx_graph_cache"] = False
    return patches


def _compile_inductor(
    gm: fx.GraphModule, example_inputs: list[Any], config: Config, record: SubgraphRecord, mode: str | None
) -> Any:
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    patches = inductor_config_patches(config, record, mode)
    uuid = patches["post_grad_custom_post_pass"].uuid()
    if patches.get("fx_graph_cache", inductor_config.fx_graph_cache):  # off: no entries, no records beside them
        record.cache_path = _record_cache_path(gm, example_inputs, uuid, mode)
    compiled = compile_fx(gm, example_inputs, inner_compile=_noting_served(record, uuid, mode), config_patches=patches)
    if record.cache_path is not None and all(g.kind == PRE_GRAD for g in record.graphs.values()):
        _load_record(record)  # Inductor served the aten graphs from its cache: our passes did not run
        # The backward runs after the forward: its peers may compile it only then, so publish it without waiting.
        _agree_on_cached(record, ("forward", "inference"))
        _agree_on_cached(record, ("backward",), wait=False)
    return compiled


def _agree_on_cached(record: SubgraphRecord, kinds: tuple[str, ...], gm: fx.GraphModule | None = None,
                     wait: bool = True) -> None:
    """Agree on graphs whose code a cache served (their collectives come from the record
    kept beside the entry; without one there is nothing to compare, and the record says so)."""
    for kind in kinds:
        graph_record = record.graphs.get(kind)
        if graph_record is None or kind in record.agreed:
            continue
        if getattr(graph_record, "collectives", None) is None:
            graph_record.notes.append("served from a cache without a record of its collectives: not agreed across ranks")
            continue
        _agree_on_graph(gm, None, kind, record.config, record, graph_record, cached=True, wait=wait)


def _noting_served(record: SubgraphRecord, uuid: Any, mode: str | None) -> Any:
    """Inductor's inner compile, one call per aten graph, hit or miss. It notes in
    ``record.served`` each kind of graph Inductor returns, and keeps each graph's record
    under that aten graph's own key: Inductor's FX graph cache is keyed by the aten graph,
    and two Dynamo graphs can share one (a backward, say), so a hit may come from an entry
    another Dynamo graph made. When our pass ran inside the call (a miss) its record is
    saved under the key (by the pass, before Inductor writes its entry); when it did not
    (a hit) the record is read back from it."""
    from torch._inductor.compile_fx import compile_fx_inner

    def inner(gm: fx.GraphModule, example_inputs: Any, **kwargs: Any) -> Any:
        backward = bool(kwargs.get("is_backward"))
        if not backward:
            # The backward's cost model needs them whether or not our pass runs on this forward:
            # a rank served the forward from the cache may still compile the backward, and must
            # plan it as the ranks that compiled both do (same estimates, same collective order).
            _note_size_estimates(record, gm)
        path = None
        if record.cache_path is not None:
            path = _keyed_path(("aten", uuid, mode, backward, gm.code, _input_facts(example_inputs)))
        before = {id(g) for g in record.graphs.values()}
        record.aten_path = path  # where our pass, if it runs, saves this graph's record
        try:
            out = compile_fx_inner(gm, example_inputs, **kwargs)
        finally:
            record.aten_path = None
        record.served.update(("backward",) if backward else ("forward", "inference"))
        made = any(id(g) not in before and g.kind != PRE_GRAD for g in record.graphs.values())
        if path is not None and not made and _adopt_cached_graph(record, path):
            _save_record(record)  # the Dynamo graph's record gains it too (for AOTAutograd cache hits)
        if not made:  # served from the cache: our pass did not agree for it, so agree here
            _agree_on_cached(record, ("backward",) if backward else ("forward", "inference"), gm)
        return _checked(out, record, ("backward",) if backward else ("forward", "inference"))

    return inner


def _adopt_cached_graph(record: SubgraphRecord, path: pathlib.Path) -> bool:
    try:
        graph_record = pickle.loads(path.read_bytes())
    except Exception:  # never written (made before fsc kept per-graph records), or unreadable
        return False
    if graph_record.kind in record.graphs:
        return False
    graph_record.notes.append(CACHE_NOTE)
    if graph_record.fallback:  # the cached code is the unrewritten graph: say so again
        log.warning("freescale: %s (recorded when Inductor cached it); compiling the %s graph unrewritten",
                    graph_record.fallback, graph_record.kind)
    record.graphs[graph_record.kind] = graph_record
    record.cached_keys.add(graph_record.kind)
    return True


def _without_cache_note(graph_record: GraphRecord) -> GraphRecord:
    if CACHE_NOTE not in graph_record.notes:
        return graph_record
    return dataclasses.replace(graph_record, notes=[n for n in graph_record.notes if n != CACHE_NOTE])


# Inductor's caches skip our pass on a hit, so the record written when the entry was made
# is kept beside them (same cache directory) and read back on a hit: one file per Dynamo
# graph (keyed by its code, input shapes and our uuid; AOTAutograd's cache serves whole
# Dynamo graphs) and one per aten graph (keyed like Inductor's FX graph cache).


def _input_facts(example_inputs: Any) -> list[Any]:
    return [
        (tuple(map(str, x.shape)), tuple(map(str, x.stride())), x.dtype, x.device.type, x.requires_grad)
        if isinstance(x, torch.Tensor)
        else type(x).__name__
        for x in example_inputs
    ]


def _keyed_path(facts: tuple) -> pathlib.Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    key = hashlib.sha256(repr((*facts, torch.__version__)).encode()).hexdigest()[:32]
    return pathlib.Path(cache_dir()) / "fsc_records" / f"{key}.pkl"


def _record_cache_path(
    gm: fx.GraphModule, example_inputs: list[Any], uuid: Any, mode: str | None
) -> pathlib.Path | None:
    if uuid is None:
        return None
    return _keyed_path((uuid, mode, gm.code, _input_facts(example_inputs), torch.is_grad_enabled()))


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # several ranks may write the same entry
    except Exception as exc:  # the record is a convenience; never fail a compile on it
        log.debug("freescale: could not save a compile record to %s: %s", path, exc)


def _save_record(record: SubgraphRecord) -> None:
    """Write the record beside Inductor's entry, merged with what is there: several ranks
    (or runs) write the same entry, one may have compiled only the forward so far, and a
    writer must never drop a graph another one added. The graphs this process rewrote win;
    those it read back are the file's when it has them. A lock file serialises the
    read-merge-write; the replace itself is atomic for readers, who take no lock."""
    path = record.cache_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_suffix(".lock")):
            graphs = {k: g for k, g in record.graphs.items() if k not in record.cached_keys}
            try:
                stored = pickle.loads(path.read_bytes())
            except Exception:  # missing, or unreadable (a crashed writer's leftovers): start afresh
                stored = {}
            for key, graph_record in stored.items():
                graphs.setdefault(key, graph_record)
            for key in record.cached_keys & record.graphs.keys():  # read back from a per-graph file
                graphs.setdefault(key, _without_cache_note(record.graphs[key]))
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(pickle.dumps(graphs))
            os.replace(tmp, path)
    except Exception as exc:  # the record is a convenience; never fail a compile on it
        log.debug("freescale: could not save the compile record to %s: %s", path, exc)


#: how long a writer waits for another one's lock before writing without it
_LOCK_WAIT_S = 10.0


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path) -> Iterator[None]:
    """An advisory lock on ``lock_path`` (kept afterwards: removing it would race), given
    up after ``_LOCK_WAIT_S`` (a stuck holder, a file system without locks): the write then
    goes ahead unlocked, and a concurrent writer may drop the other's graph."""
    if fcntl is None:  # not POSIX: unlocked
        yield
        return
    with open(lock_path, "a") as f:
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except OSError:
                if time.monotonic() > deadline:
                    log.debug("freescale: %s still locked after %.0f s; writing without it", lock_path, _LOCK_WAIT_S)
                    locked = False
                    break
                time.sleep(0.01)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


def _load_record(record: SubgraphRecord) -> None:
    record.from_cache = True
    record.refresh()
    aten = [g for g in record.graphs.values() if g.kind != PRE_GRAD]  # the pre-grad record is this run's
    for graph_record in aten:
        if graph_record.fallback:  # the cached code is the unrewritten graph: say so again
            log.warning("freescale: %s (recorded when Inductor cached it); compiling the %s graph unrewritten",
                        graph_record.fallback, graph_record.kind)
    if not aten:
        record.notes.append(CACHE_NOTE + "; that record is not available (fsc.explain recompiles to show it)")
