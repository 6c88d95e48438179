"""Compile records: what the backend did to every graph, reachable from Python.

``fsc.last_compile()`` is the record of the latest Dynamo graph the backend compiled;
``fsc.explain(model, *inputs, **options)`` (:mod:`fsc.explain`) compiles and returns one
record holding every subgraph. ``record.summary()`` is a plain dict; ``record.dump(dir)``
writes it all to files for a bug report.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import json
import pathlib
import pickle
from collections.abc import Iterator
from typing import Any

from fsc.analysis.sample_cost import sample_cost
from fsc.pass_manager import PassRecord

_KEEP = 32
CACHE_NOTE = "served from Inductor's cache: the passes ran when the entry was written"


@dataclasses.dataclass(kw_only=True, slots=True)
class GraphRecord:
    """One forward, backward or inference graph: before and after the pipeline."""

    kind: str
    graph_before: str
    graph_after: str = ""
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    estimate_before: dict[str, float] | None = None
    estimate_after: dict[str, float] | None = None
    timeline_after: Any = None
    """:class:`fsc.analysis.timeline.Timeline` of the rewritten graph (events per node)."""
    fallback: str | None = None
    """Why the graph was compiled unrewritten, when it was."""
    cost: Any = None
    """:class:`fsc.analysis.cost_model.GraphCost` of the rewritten graph (sympy in its size symbols)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    collectives: dict[str, list[str]] | None = None
    """What the compiled graph communicates, per process group (:func:`fsc.agreement.fingerprint`):
    what its ranks agreed on, kept so that a rank served this graph from a cache can agree too."""

    def pass_record(self, name: str) -> PassRecord:
        for record in self.passes:
            if record.name == name:
                return record
        raise KeyError(f"pass {name!r} did not run on the {self.kind} graph; ran: {[p.name for p in self.passes]}")

    def summary(self) -> dict[str, Any]:
        before = self.estimate_before or {}
        after = self.estimate_after or {}
        passes: dict[str, Any] = {}
        declined: dict[str, list[str]] = {}
        for record in self.passes:
            key = record.name if record.name not in passes else f"{record.name}#{len(passes)}"
            passes[key] = {"modified": record.modified, "stats": dict(record.stats), "seconds": record.seconds}
            if record.reasons:
                declined[key] = list(record.reasons)
            if record.error:
                passes[key]["error"] = record.error
        return {
            "exposed_comm_ms_before": before.get("exposed_comm_ms"),
            "exposed_comm_ms_after": after.get("exposed_comm_ms"),
            "makespan_ms_before": before.get("makespan_ms"),
            "makespan_ms_after": after.get("makespan_ms"),
            "peak_memory_mb_before": before.get("peak_memory_mb"),
            "peak_memory_mb_after": after.get("peak_memory_mb"),
            "passes": passes,
            "declined": declined,
            "fallback": self.fallback,
            "notes": list(self.notes),
        }


@dataclasses.dataclass(kw_only=True, slots=True)
class SubgraphRecord:
    """One call of the backend: one Dynamo graph and the AOT graphs made from it."""

    index: int
    config: Any
    dynamo_graph: str
    serial: int = 0
    """Process-wide number of this backend call (names its ``dump_dir`` folder)."""
    frame: str = ""
    """Dynamo's id of the frame this graph came from (identical on every rank that runs the
    same program): with the graph's kind, the key under which ranks agree on it."""
    agreed: set = dataclasses.field(default_factory=set)
    """Kinds of this subgraph's aten graphs whose collectives this process has agreed on."""
    graphs: dict[str, GraphRecord] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    cache_path: Any = None
    """Where the backend keeps this record for Inductor cache hits (None: not kept)."""
    from_cache: bool = False
    """True when Inductor served this subgraph's first aten graph from its cache and the
    graphs were read back from ``cache_path``."""
    served: set = dataclasses.field(default_factory=set)
    """Kinds (``forward``, ``inference``, ``backward``) that Inductor compiled or served
    from its cache for this subgraph in this process. Inductor compiles the backward at
    the first backward call and may serve it from its cache even when this process
    rewrote the forward itself (another rank, or an earlier run, wrote the entry); our
    pass then does not run, and the backward's record is read back from ``cache_path``."""
    cached_keys: set = dataclasses.field(default_factory=set)
    """Keys of :attr:`graphs` read back from ``cache_path`` rather than rewritten in this
    process (never written back: the file's copy is the writer's). A graph this process
    rewrites later replaces the cached one."""

    pending_checks: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    """``verify``: per graph kind, the :class:`fsc.verify.Verifier` of a rewrite made in this
    process, until the backend wraps that graph's compiled code to check it on its first call."""

    aten_path: Any = None
    """While Inductor compiles one aten graph of this subgraph: where that graph's own
    record goes (see ``fsc.backend._noting_served``); None otherwise."""
    cache_mtime: tuple | None = None
    """Identity of ``cache_path`` when last read (inode, modification time in ns, size):
    unchanged files are not re-read. The writer replaces the file atomically, so each write
    is a new inode; a modification time alone can repeat within the file system's clock tick
    (a rank reading the forward-only record would then never see the backward added)."""
    size_estimates: dict = dataclasses.field(default_factory=dict)
    """The forward graph's estimates of its data-dependent split sizes
    (:func:`fsc.analysis.cost_model.exchange_size_estimates`), handed to the backward
    graph's cost model: a backward exchange reuses them but cannot tie them to the token
    count by itself."""

    def refresh(self) -> None:
        """Read back from ``cache_path`` the graphs this subgraph lacks: all of them when
        Inductor served the subgraph from its cache, otherwise those of the kinds it served
        (a graph Inductor has not compiled yet is not shown)."""
        if self.cache_path is None or not (self.from_cache or self.served):
            return
        try:
            st = self.cache_path.stat()
            identity = (st.st_ino, st.st_mtime_ns, st.st_size, self.from_cache, frozenset(self.served))
            if identity == self.cache_mtime:
                return
            graphs = pickle.loads(self.cache_path.read_bytes())
        except Exception:  # the record is a convenience; a missing file leaves what we had
            return
        self.cache_mtime = identity
        for key, graph_record in graphs.items():
            if key not in self.graphs and (self.from_cache or graph_record.kind in self.served):
                graph_record.notes.append(CACHE_NOTE)
                self.graphs[key] = graph_record
                self.cached_keys.add(key)

    def add(self, record: GraphRecord) -> None:
        key, n = record.kind, 1
        if key in self.cached_keys:  # rewritten here after all: this one describes the code
            self.cached_keys.discard(key)
            self.graphs[key] = record
            return
        while key in self.graphs:
            n += 1
            key = f"{record.kind}#{n}"
        self.graphs[key] = record


@dataclasses.dataclass(kw_only=True, slots=True)
class CompileRecord:
    subgraphs: list[SubgraphRecord] = dataclasses.field(default_factory=list)

    def graphs(self) -> dict[str, GraphRecord]:
        """Every graph by summary key: ``forward``/``backward``/``inference`` (and ``pre-grad``
        where a pre-grad pass such as lower-attention rewrote or declined something), with
        ``_<index>`` appended when the record holds several subgraphs."""
        several = len(self.subgraphs) > 1
        out: dict[str, GraphRecord] = {}
        for sub in self.subgraphs:
            sub.refresh()
            for key, record in sub.graphs.items():
                out[f"{key}_{sub.index}" if several else key] = record
        return out

    def graph(self, key: str) -> GraphRecord:
        graphs = self.graphs()
        if key not in graphs:
            raise KeyError(
                f"no {key!r} graph in this record; it has {sorted(graphs)} "
                "(backward graphs are compiled at the first backward call)"
            )
        return graphs[key]

    def summary(self) -> dict[str, Any]:
        return {key: record.summary() for key, record in self.graphs().items()}

    def sample_cost(self, symbol: str | None = None) -> Any:
        """The compiled work (every forward and backward graph here) as a
        :class:`fsc.analysis.sample_cost.SampleCost` in the length symbol ``L``: compile on
        one sample with its length dynamic to get a per-sample training cost."""
        return sample_cost([g.cost for g in self.graphs().values() if g.cost is not None], symbol)

    def split_refusal(self) -> str | None:
        """Why a sample of this compile's model cannot be cut into chunks on several ranks
        (``Balancer(split=True)``), or None when it can: a node whose cost grows with the
        square of a size mixes a sample's tokens, and unless it is ``fsc::jagged_attention``
        (which takes a chunk's query and key extents apart) a chunk would compute it over its
        own tokens only, a wrong loss. Names the first such node and its layer."""
        found = [m for g in self.graphs().values() if g.cost is not None for m in getattr(g.cost, "mixing", ())]
        if not found:
            return None
        more = f" (and {len(found) - 1} more such node{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
        return (f"splitting samples across ranks is refused: {found[0]}{more} mixes a sample's tokens "
                f"(its cost grows with the square of the length), and only fsc::jagged_attention given each "
                f"piece's q_start and key extents (kv_offsets) runs a chunk with the keys of its earlier chunks")

    def __str__(self) -> str:
        lines = [f"subgraph {sub.index}: {note}" for sub in self.subgraphs for note in sub.notes]
        for key, record in self.graphs().items():
            s = record.summary()
            est = ""
            if s["makespan_ms_before"] is not None and s["makespan_ms_after"] is not None:
                est = (
                    f"  est. makespan {s['makespan_ms_before']:.3f} -> {s['makespan_ms_after']:.3f} ms, "
                    f"exposed comm {s['exposed_comm_ms_before']:.3f} -> {s['exposed_comm_ms_after']:.3f} ms"
                )
            lines.append(f"{key}:{est}")
            if record.fallback:
                lines.append(f"  FALLBACK (compiled unrewritten): {record.fallback}")
            for p in record.passes:
                stats = ", ".join(f"{k}={_short(v)}" for k, v in p.stats.items())
                lines.append(f"  {p.spec}: {'modified' if p.modified else 'unchanged'} ({p.seconds * 1e3:.1f} ms) {stats}")
                lines.extend(f"    declined: {r}" for r in p.reasons)
            lines.extend(f"  note: {n}" for n in record.notes)
        return "\n".join(lines) or "(no graphs compiled)"

    def dump(self, directory: str | pathlib.Path) -> list[pathlib.Path]:
        """Write the summary and every graph text under ``directory``; return the paths."""
        root = pathlib.Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        written = [root / "summary.json"]
        written[0].write_text(json.dumps(self.summary(), indent=2, default=str))
        for key, record in self.graphs().items():
            written.append(_write(root / f"{key}.0_before.py", record.graph_before))
            for i, p in enumerate(record.passes, start=1):
                if p.graph_after is not None:
                    written.append(_write(root / f"{key}.{i}_after_{p.name}.py", p.graph_after))
            written.append(_write(root / f"{key}.final.py", record.graph_after))
        return written


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class _Store:
    """The latest records (a bounded history) and the record an ``explain`` collects into."""

    def __init__(self) -> None:
        self.history: collections.deque[CompileRecord] = collections.deque(maxlen=_KEEP)
        self.collecting: contextvars.ContextVar[CompileRecord | None] = contextvars.ContextVar(
            "fsc_collecting", default=None
        )
        self.count = 0

    def new_subgraph(self, config: Any, dynamo_graph: str) -> SubgraphRecord:
        target = self.collecting.get()
        if target is None:
            target = CompileRecord()
            self.history.append(target)
        self.count += 1
        sub = SubgraphRecord(index=len(target.subgraphs), config=config, dynamo_graph=dynamo_graph, serial=self.count)
        target.subgraphs.append(sub)
        return sub

    @contextlib.contextmanager
    def collect(self) -> Iterator[CompileRecord]:
        record = CompileRecord()
        token = self.collecting.set(record)
        try:
            yield record
        finally:
            self.collecting.reset(token)
            self.history.append(record)


STORE = _Store()


def last_compile() -> CompileRecord:
    """The record of the latest graph compiled by the ``freescale`` backend."""
    if not STORE.history:
        raise LookupError("the freescale backend has compiled nothing in this process yet")
    return STORE.history[-1]


def compile_records() -> list[CompileRecord]:
    """The latest records, oldest first (at most 32)."""
    return list(STORE.history)
