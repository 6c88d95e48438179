"""``schedule``: a graph zoo scheduled by each scheduler, scored by one shared evaluator
(:func:`fsc.analysis.timeline.estimate_timeline` on a device profile).

Graphs. A zoo traced with fake tensors: ``comm-first`` (an exchange whose result is
consumed at once, dense work after it), ``dense-first`` (dense work traced before the
exchange's producer), ``dlrm-like`` (bottom MLP on dense features, two embedding exchanges
needed at different times, interaction, top MLP); and the HSTU example's graphs,
``hstu-forward`` and ``hstu-backward``: the post-grad aten graphs the backend's passes get
when the example (:class:`bench.hstu_graphs.HSTUSpec`: 8 sequences, 346 tokens, dim 128,
2 layers) is compiled on a fake process group of 8 ranks in this one process (see
:mod:`bench.hstu_graphs`; ``examples/`` is put on ``sys.path``, so run from a source
checkout). Every collective is an 8-rank all-to-all. The HSTU exchange's split sizes are
data-dependent (unbacked): the evaluator sizes them by
:func:`fsc.analysis.cost_model.exchange_size_estimates` (input splits share the input's
rows, a rank receives as many rows as it sends), derived from the forward graph and used
for the backward graph too (its exchange alone is not tied to the token count), so both
are sized at the batch's token count (346 on rank 0), not at a fallback of 8192 rows per
split.

Schedulers. ``none`` (program order), ``freescale-moves``
(``overlap-schedule{reorder_compute=false}``), ``freescale`` (the default pipeline), and
PyTorch Inductor's own, run for real (:mod:`bench.inductor_peers` says exactly how and
which CPU workarounds they need): ``inductor-overlap`` (``enable_overlap_scheduling``, its
aten-level overlap scheduler, planning with the profile's device numbers; one compile per
profile) and ``inductor-legacy`` (``reorder_for_compute_comm_overlap`` with the recommended
pass list; one compile serves every profile, its passes do not use runtime estimates). For
both, the graph is compiled by Inductor with the peer on, the order Inductor's scheduler
hands to code generation is recorded, checked against the generated code's collective
calls, and put back onto the FX graph by node name: the row is what Inductor would
execute. A row whose scheduler fails says so in ``error``, with null numbers. ``note`` says
how many FX nodes Inductor ran no kernel for (size reads, runtime asserts; placed right
after their inputs) and what the evaluator charges for them.

Every order is scored by the same evaluator on the same graph. Targets (issue 4): freescale
at least as good as every other scheduler on every graph, and on the HSTU graphs exposed
communication at most 10% of program order's; they are checked and printed, not enforced.
Every row also carries ``exposed_lower_bound_ms``
(:func:`fsc.analysis.timeline.exposed_lower_bound`): the exposed communication that no
order of that graph can avoid on that profile. Where it is above 10% of program order's,
the 10% target cannot be met by any scheduler, and the check says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from bench import inductor_peers
from bench.hstu_graphs import HSTUSpec, capture_hstu_graphs, compile_hstu, fake_world
from bench.report import replace_section, write_json
from fsc.analysis.cost_model import DEVICE_PROFILES, CostModel, exchange_size_estimates
from fsc.analysis.timeline import estimate_timeline, exposed_lower_bound
from fsc.graph_utils import clone_graph_module
from fsc.pass_manager import PassManager, default_pipeline, parse_pipeline
from fsc.passes.base import PassContext

log = logging.getLogger(__name__)

c10d = torch.ops._c10d_functional


def _exchange(t: torch.Tensor, group: str, ranks: int) -> torch.Tensor:
    split = [t.shape[0] // ranks] * ranks
    return c10d.wait_tensor(c10d.all_to_all_single(t, split, split, group))


def comm_first(ids_emb, w, x, *, group: str = "g0", ranks: int = 8):
    rows = _exchange(torch.relu(ids_emb), group, ranks)
    h = x
    for _ in range(4):
        h = torch.relu(h @ w)
    return (rows @ w).sum() + h.sum()


def dense_first(ids_emb, w, x, *, group: str = "g0", ranks: int = 8):
    h = x
    for _ in range(4):
        h = torch.relu(h @ w)
    rows = _exchange(torch.relu(ids_emb), group, ranks)
    return (rows @ w).sum() + h.sum()


def dlrm_like(sparse_a, sparse_b, dense, w, *, group: str = "g0", ranks: int = 8):
    bottom = dense
    for _ in range(3):
        bottom = torch.relu(bottom @ w)
    late = _exchange(sparse_a, group, ranks)  # needed only by the top MLP
    soon = _exchange(sparse_b, group, ranks)  # needed by the interaction right away
    inter = torch.relu(soon * bottom) @ w
    for _ in range(3):
        inter = torch.relu(inter @ w)
    return (inter + late).sum()


ZOO: dict[str, tuple[Callable, list[tuple[int, ...]]]] = {
    "comm-first": (comm_first, [(4096, 1024), (1024, 1024), (4096, 1024)]),
    "dense-first": (dense_first, [(4096, 1024), (1024, 1024), (4096, 1024)]),
    "dlrm-like": (dlrm_like, [(4096, 1024), (4096, 1024), (4096, 1024), (1024, 1024)]),
}
HSTU_GRAPHS = {"hstu-forward": "forward", "hstu-backward": "backward"}
GRAPHS = (*ZOO, *HSTU_GRAPHS)

FREESCALE = {
    "none": lambda: (),
    "freescale-moves": lambda: parse_pipeline("overlap-schedule{reorder_compute=false}"),
    "freescale": default_pipeline,
}
SCHEDULERS = ("none", "freescale-moves", "freescale", "inductor-overlap", "inductor-legacy")
PEERS = ("none", "inductor-overlap", "inductor-legacy")
"""What freescale is held to (issue 4's targets)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class BenchGraph:
    """One graph of the table, and the orders Inductor executed for it."""

    name: str
    kind: str
    gm: fx.GraphModule
    world: int
    """Ranks of the (fake) process group the graph's collectives name."""
    executed: dict[tuple[str, str], list[tuple[str, ...]] | str] = dataclasses.field(default_factory=dict)
    """(Inductor peer, profile) -> the order Inductor executed, or why there is none."""
    size_estimates: dict = dataclasses.field(default_factory=dict)
    """Estimates of data-dependent sizes from the graphs compiled with this one (the
    forward's exchange sizes the backward's); the evaluator's, for every scheduler."""

    def evaluator(self, profile: str) -> CostModel:
        """The shared evaluator's cost model for this graph."""
        return CostModel(DEVICE_PROFILES[profile], size_estimates=self.size_estimates)


@dataclasses.dataclass(kw_only=True, slots=True)
class _Source:
    """Graphs that one Inductor compile produces together (HSTU: forward and backward)."""

    graphs: list[BenchGraph]
    kinds: dict[str, str]
    """Graph name -> the kind Inductor compiles it as."""
    compile: Callable[[dict[str, Any]], inductor_peers.Compiled]


class _PeerFailed(RuntimeError):
    """A peer that could not be compiled; the message is already the row's error."""


def _error(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, _PeerFailed) else f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _zoo_source(name: str, group: str, world: int) -> _Source:
    fn, shapes = ZOO[name]
    gm = make_fx(functools.partial(fn, group=group, ranks=world), tracing_mode="fake")(
        *(torch.randn(*s) for s in shapes))
    graph = BenchGraph(name=name, kind="forward", gm=gm, world=world)

    def compile_(patches: dict[str, Any]) -> inductor_peers.Compiled:
        # Inductor compiles a lone aten graph without gradients as an inference graph and
        # reorders inference graphs for locality first; the zoo graphs stand for forward
        # graphs of training (which it does not reorder so), and every scheduler here
        # starts from the same program order.
        inputs = [torch.randn(*s) for s in shapes]
        return inductor_peers.compile_graph_and_record(gm, inputs, patches | {"reorder_for_locality": False})

    return _Source(graphs=[graph], kinds={name: "inference"}, compile=compile_)


def _hstu_source(names: list[str], spec: HSTUSpec) -> _Source:
    captured = capture_hstu_graphs(spec)
    estimates = {**exchange_size_estimates(captured["backward"].graph),
                 **exchange_size_estimates(captured["forward"].graph)}
    graphs = [BenchGraph(name=n, kind=HSTU_GRAPHS[n], gm=captured[HSTU_GRAPHS[n]], world=spec.world,
                         size_estimates=estimates) for n in names]

    def compile_(patches: dict[str, Any]) -> inductor_peers.Compiled:
        return compile_hstu(spec, lambda fn, inputs: inductor_peers.compile_and_record(fn, inputs, patches))

    return _Source(graphs=graphs, kinds={n: HSTU_GRAPHS[n] for n in names}, compile=compile_)


def _run_peers(source: _Source, peers: list[str], profiles: list[str]) -> None:
    for peer in peers:
        # The legacy passes decide without runtime estimates: one compile serves every profile.
        plans = profiles[:1] if peer == "inductor-legacy" else profiles
        for profile in plans:
            try:
                orders = inductor_peers.executed_orders(peer, DEVICE_PROFILES[profile], source.compile,
                                                        set(source.kinds.values()))
            except Exception as exc:  # a peer that cannot run gets an error row, not numbers
                log.warning("%s on %s (%s) failed", peer, ", ".join(source.kinds), profile, exc_info=True)
                results: dict[str, Any] = {name: _error(exc) for name in source.kinds}
            else:
                results = {name: orders[kind] for name, kind in source.kinds.items()}
            for graph in source.graphs:
                for target in (profiles if peer == "inductor-legacy" else [profile]):
                    graph.executed[peer, target] = results[graph.name]


def prepare(names: Iterable[str] = GRAPHS, *, schedulers: Iterable[str] = SCHEDULERS,
            profiles: Iterable[str] = ("h100", "cpu"), spec: HSTUSpec | None = None) -> list[BenchGraph]:
    """Trace or capture the named graphs and compile each with every Inductor peer among
    ``schedulers`` (per profile where the peer plans with device numbers). Sets up a fake
    process group of ``spec.world`` ranks for the duration unless one exists."""
    spec = spec or HSTUSpec()
    names, profiles = list(names), list(profiles)
    unknown = [n for n in names if n not in GRAPHS]
    if unknown:
        raise ValueError(f"unknown graph(s) {', '.join(unknown)}; choose from {', '.join(GRAPHS)}")
    peers = [s for s in schedulers if s in inductor_peers.PEERS]
    out = []
    with fake_world(spec.world) as group:
        sources = [_zoo_source(n, group, spec.world) for n in names if n in ZOO]
        hstu = [n for n in names if n in HSTU_GRAPHS]
        if hstu:
            sources.append(_hstu_source(hstu, spec))
        for source in sources:
            _run_peers(source, peers, profiles)
            out.extend(source.graphs)
    order = {n: i for i, n in enumerate(names)}
    return sorted(out, key=lambda g: order[g.name])


def _note(placed: list[fx.Node], model: CostModel) -> str | None:
    charged = [n for n in placed if model.node_cost(n).seconds > 0]
    if not charged:
        return None
    ms = sum(model.node_cost(n).seconds for n in charged) * 1e3
    return (f"{len(charged)} FX node(s) Inductor ran no kernel for (e.g. {', '.join(n.name for n in charged[:3])}) "
            f"placed right after their inputs; the evaluator charges them {ms:.4f} ms")


def _schedule(graph: BenchGraph, scheduler: str, profile: str, model: CostModel) -> tuple[fx.GraphModule, str | None]:
    gm = clone_graph_module(graph.gm)
    if scheduler in FREESCALE:
        # The cost model the backend would give the passes: its own, not the evaluator's.
        ctx = PassContext(graph_kind=graph.kind, cost_model=CostModel(DEVICE_PROFILES[profile]),
                          memory_budget_bytes=None)
        PassManager(FREESCALE[scheduler]()).run(gm, ctx)
        return gm, None
    if scheduler in inductor_peers.PEERS:
        executed = graph.executed.get((scheduler, profile))
        if executed is None:
            raise RuntimeError(f"{scheduler} was not compiled for this graph on profile {profile}")
        if isinstance(executed, str):
            raise _PeerFailed(executed)
        placed = inductor_peers.apply_order(gm, executed)
        return gm, _note(placed, model)
    raise ValueError(f"unknown scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")


def score(graphs: list[BenchGraph], profile: str, schedulers: Iterable[str] = SCHEDULERS) -> list[dict[str, Any]]:
    """One row per graph and scheduler, scored on ``profile``."""
    out = []
    for graph in graphs:
        bound = exposed_lower_bound(graph.gm.graph, graph.evaluator(profile)) * 1e3
        for scheduler in schedulers:
            model = graph.evaluator(profile)
            row: dict[str, Any] = {"graph": graph.name, "scheduler": scheduler, "profile": profile,
                                   "exposed_lower_bound_ms": bound}
            try:
                gm, note = _schedule(graph, scheduler, profile, model)
                timeline = estimate_timeline(gm.graph, model)
            except Exception as exc:
                if scheduler in FREESCALE:
                    raise  # our own schedulers must not fail quietly
                log.warning("%s on %s (%s) failed", scheduler, graph.name, profile, exc_info=True)
                row.update(exposed_comm_ms=None, makespan_ms=None, error=_error(exc))
            else:
                row.update(exposed_comm_ms=timeline.exposed_communication * 1e3, makespan_ms=timeline.makespan * 1e3)
                if note:
                    row["note"] = note
            out.append(row)
    return out


def rows(profile: str) -> list[dict[str, Any]]:
    """Every graph and scheduler on ``profile``."""
    return score(prepare(profiles=[profile]), profile)


def check_targets(table: list[dict[str, Any]]) -> list[str]:
    """Lines saying, per profile and graph, whether freescale is at least as good as every
    peer (exposed and makespan) and, on the HSTU graphs, exposed freescale / exposed none."""
    tolerance = 1e-9  # ms: float noise between orders the evaluator scores alike
    by = {(r["graph"], r["scheduler"], r["profile"]): r for r in table}
    lines = []
    for profile in dict.fromkeys(r["profile"] for r in table):
        for graph in dict.fromkeys(r["graph"] for r in table if r["profile"] == profile):
            ours = by.get((graph, "freescale", profile))
            if ours is None:
                continue
            worse = []
            for peer in PEERS:
                theirs = by.get((graph, peer, profile))
                if theirs is None or theirs.get("error"):
                    continue
                for metric in ("exposed_comm_ms", "makespan_ms"):
                    if ours[metric] > theirs[metric] + tolerance:
                        worse.append(f"{metric} {ours[metric]:.4f} > {peer} {theirs[metric]:.4f} "
                                     f"(+{ours[metric] - theirs[metric]:.4f})")
            verdict = "ok: at least as good as every peer" if not worse else "WORSE: " + "; ".join(worse)
            line = f"{profile:<6}{graph:<15}{verdict}"
            none = by.get((graph, "none", profile))
            if graph in HSTU_GRAPHS and none is not None:
                if none["exposed_comm_ms"] > 0:
                    ratio = ours["exposed_comm_ms"] / none["exposed_comm_ms"]
                    met = "ok" if ratio <= 0.10 else "MISSES"
                    line += f"; exposed freescale/none = {100 * ratio:.1f}% ({met} <= 10%)"
                    bound = ours.get("exposed_lower_bound_ms")
                    if ratio > 0.10 and bound is not None and bound > 0.10 * none["exposed_comm_ms"] + tolerance:
                        floor = bound / none["exposed_comm_ms"]
                        line += (f"; no order can: lower bound {bound:.4f} ms = {100 * floor:.1f}% of none; "
                                 f"freescale is {ours['exposed_comm_ms'] - bound:.4f} ms above it")
                else:
                    line += "; nothing exposed in program order"
            lines.append(line)
    return lines


def _names(text: str | None, allowed: Iterable[str], what: str) -> list[str]:
    allowed = list(allowed)
    if text is None:
        return allowed
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return names


def run(argv: list[str], json_path: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench schedule")
    parser.add_argument("--profile", choices=sorted(DEVICE_PROFILES), action="append")
    parser.add_argument("--graphs", default=None, help=f"comma-separated subset of {','.join(GRAPHS)}")
    parser.add_argument("--schedulers", default=None, help=f"comma-separated subset of {','.join(SCHEDULERS)}")
    parser.add_argument("--readme", default=None, help="rewrite this README's <!-- bench:schedule --> section")
    args = parser.parse_args(argv)
    graph_names = _names(args.graphs, GRAPHS, "graph(s)")
    schedulers = _names(args.schedulers, SCHEDULERS, "scheduler(s)")
    spec = HSTUSpec()
    with fake_world(spec.world):  # one group for tracing, compiling and scheduling
        profiles = args.profile or ["h100", "cpu"]
        graphs = prepare(graph_names, schedulers=schedulers, profiles=profiles, spec=spec)
        table = [row for profile in profiles for row in score(graphs, profile, schedulers)]
    print(f"{'graph':<15}{'scheduler':<18}{'profile':<8}{'exposed ms':>12}{'makespan ms':>13}  note")
    for row in table:
        if row.get("error"):
            print(f"{row['graph']:<15}{row['scheduler']:<18}{row['profile']:<8}{'-':>12}{'-':>13}"
                  f"  error: {row['error']}")
            continue
        print(f"{row['graph']:<15}{row['scheduler']:<18}{row['profile']:<8}"
              f"{row['exposed_comm_ms']:>12.4f}{row['makespan_ms']:>13.4f}  {row.get('note', '')}")
    print("\ntargets (freescale vs " + ", ".join(PEERS) + "):")
    targets = check_targets(table)
    for line in targets:
        print("  " + line)
    write_json(json_path, table)
    if args.readme:
        replace_section(args.readme, "schedule", readme_table(table, targets))
    return 0


def readme_table(table: list[dict], targets: list[str]) -> str:
    """Exposed communication / makespan (ms) per graph, profile and scheduler, as estimated
    by the one shared evaluator, and the target check."""
    schedulers = [s for s in SCHEDULERS if any(r["scheduler"] == s for r in table)]
    keys = sorted({(r["graph"], r["profile"]) for r in table}, key=lambda k: (k[1], list(GRAPHS).index(k[0])))
    cells = {(r["graph"], r["profile"], r["scheduler"]): r for r in table}
    lines = ["Estimated exposed communication / makespan, ms, per graph (`python -m bench schedule --readme "
             "README.md`; one shared evaluator scores every order; `results/schedule.json`):", "",
             "| graph | profile | " + " | ".join(schedulers) + " |", "|---|---|" + "---:|" * len(schedulers)]
    for graph, profile in keys:
        row = []
        for s in schedulers:
            r = cells.get((graph, profile, s))
            row.append("-" if r is None or r.get("error") else f"{r['exposed_comm_ms']:.4g} / {r['makespan_ms']:.4g}")
        lines.append(f"| {graph} | {profile} | " + " | ".join(row) + " |")
    lines += ["", "Targets:", ""] + [f"- {line}" for line in targets]
    return "\n".join(lines)
