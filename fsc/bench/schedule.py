"""``schedule``: a graph zoo scheduled by each scheduler, scored by one shared evaluator
(:func:`fsc.analysis.timeline.estimate_timeline` on a device profile).

Graphs (traced with fake tensors; no process group): ``comm-first`` (an exchange whose
result is consumed at once, dense work after it), ``dense-first`` (dense work traced
before the exchange's producer), ``dlrm-like`` (bottom MLP on dense features, two
embedding exchanges needed at different times, interaction, top MLP). Schedulers: ``none``
(program order), ``freescale-moves`` (``overlap-schedule{reorder_compute=false}``) and
``freescale`` (the default pipeline). PyTorch Inductor's schedulers are not in this
table yet.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fsc.analysis.cost_model import DEVICE_PROFILES, CostModel
from fsc.analysis.timeline import estimate_timeline
from fsc.pass_manager import PassContext, PassManager, default_pipeline, parse_pipeline

c10d = torch.ops._c10d_functional


def _exchange(t: torch.Tensor, ranks: int = 8) -> torch.Tensor:
    split = [t.shape[0] // ranks] * ranks
    return c10d.wait_tensor(c10d.all_to_all_single(t, split, split, "g0"))


def comm_first(ids_emb, w, x):
    rows = _exchange(torch.relu(ids_emb))
    h = x
    for _ in range(4):
        h = torch.relu(h @ w)
    return (rows @ w).sum() + h.sum()


def dense_first(ids_emb, w, x):
    h = x
    for _ in range(4):
        h = torch.relu(h @ w)
    rows = _exchange(torch.relu(ids_emb))
    return (rows @ w).sum() + h.sum()


def dlrm_like(sparse_a, sparse_b, dense, w):
    bottom = dense
    for _ in range(3):
        bottom = torch.relu(bottom @ w)
    late = _exchange(sparse_a)  # needed only by the top MLP
    soon = _exchange(sparse_b)  # needed by the interaction right away
    inter = torch.relu(soon * bottom) @ w
    for _ in range(3):
        inter = torch.relu(inter @ w)
    return (inter + late).sum()


ZOO: dict[str, tuple[Callable, list[tuple[int, ...]]]] = {
    "comm-first": (comm_first, [(4096, 1024), (1024, 1024), (4096, 1024)]),
    "dense-first": (dense_first, [(4096, 1024), (1024, 1024), (4096, 1024)]),
    "dlrm-like": (dlrm_like, [(4096, 1024), (4096, 1024), (4096, 1024), (1024, 1024)]),
}

SCHEDULERS = {
    "none": lambda: (),
    "freescale-moves": lambda: parse_pipeline("overlap-schedule{reorder_compute=false}"),
    "freescale": default_pipeline,
}


def rows(profile: str) -> list[dict]:
    out = []
    for graph_name, (fn, shapes) in ZOO.items():
        for scheduler, passes in SCHEDULERS.items():
            gm = make_fx(fn, tracing_mode="fake")(*(torch.randn(*s) for s in shapes))
            model = CostModel(DEVICE_PROFILES[profile])
            PassManager(passes()).run(gm, PassContext(graph_kind="forward", cost_model=model, memory_budget_bytes=None))
            timeline = estimate_timeline(gm.graph, model)
            out.append({
                "graph": graph_name,
                "scheduler": scheduler,
                "profile": profile,
                "exposed_comm_ms": timeline.exposed_communication * 1e3,
                "makespan_ms": timeline.makespan * 1e3,
            })
    return out


def run(argv: list[str], json_path: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsc.bench schedule")
    parser.add_argument("--profile", choices=sorted(DEVICE_PROFILES), action="append")
    args = parser.parse_args(argv)
    table = [row for profile in (args.profile or ["h100", "cpu"]) for row in rows(profile)]
    print(f"{'graph':<13}{'scheduler':<17}{'profile':<8}{'exposed ms':>12}{'makespan ms':>13}")
    for row in table:
        print(f"{row['graph']:<13}{row['scheduler']:<17}{row['profile']:<8}"
              f"{row['exposed_comm_ms']:>12.4f}{row['makespan_ms']:>13.4f}")
    path = pathlib.Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2))
    print(f"wrote {path}")
    return 0
