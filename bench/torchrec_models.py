"""TorchRec models on gloo ranks: the same ``DistributedModelParallel`` model trained eagerly,
compiled by Inductor with TorchRec's PT2 recipe, and compiled by fsc
(:func:`fsc.integrations.torchrec.compile`, inner Inductor), steps interleaved.

Models (also used by ``tests/integrations/test_torchrec.py``):

* ``pooled``: DLRM-like. An ``EmbeddingBagCollection`` of 4 tables (2 sharded table-wise, 2
  column-wise), pooled embeddings concatenated into an MLP.
* ``sequence``: an ``EmbeddingCollection`` of 4 tables (2 row-wise, 2 table-wise; all
  row-wise beyond 2 ranks, see :func:`sharding`); each
  feature's jagged rows padded to a fixed length and summed per position, one causal
  ``TransformerEncoderLayer``.

Both train their tables with FBGEMM's fused EXACT_SGD (the optimizer runs inside the
backward; the CPU kernels have it and EXACT_ROWWISE_ADAGRAD, which the tests also use, but
no Adam) and their dense part with SGD, each rank on its own
batch (``init_data_parallel=False``: no gradient all-reduce, the same in every variant).

The peers are as their users write them: eager is TorchRec's own ``DistributedModelParallel``
forward (with synchronous collectives, as the recipe sets); ``inductor`` is
``torch.compile(dmp, backend="inductor", fullgraph=True)`` after the same recipe and
compatibility fixes (without them Inductor cannot compile these models either; see
:mod:`fsc.integrations.torchrec`). Per step every variant runs one forward and backward and
its dense optimizer step, after a barrier, in an order that rotates every step, and the
step's time is the slowest rank's. Each
row gives the median step time and the median of per-step ratios to Inductor (so machine
noise that hits one step hits both), and, for fsc, the exposed communication its cost
model estimates before and after its passes (an estimate, not a measurement).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch

from bench.report import markdown_table, replace_section, write_json
from bench.spawn import run_gloo_ranks

FEATURES = 4


def _tables(config_type: Any, dim: int, rows: int) -> list[Any]:
    return [config_type(name=f"t{i}", embedding_dim=dim, num_embeddings=rows, feature_names=[f"f{i}"])
            for i in range(FEATURES)]


class PooledModel(torch.nn.Module):
    """DLRM-like: pooled embeddings of 4 features, concatenated, through an MLP."""

    def __init__(self, dim: int = 8, rows: int = 60) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

        self.ebc = EmbeddingBagCollection(tables=_tables(EmbeddingBagConfig, dim, rows), device=torch.device("meta"))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(FEATURES * dim, 2 * dim), torch.nn.ReLU(),
                                       torch.nn.Linear(2 * dim, 1))

    def forward(self, kjt: Any, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.ebc(kjt).values()
        return (self.mlp(pooled).squeeze(-1) - dense).square().mean()


class SequenceModel(torch.nn.Module):
    """Sequence embeddings of 4 features (their jagged rows summed per position, padded to
    ``length``), a causal transformer layer, a regression loss."""

    def __init__(self, dim: int = 8, rows: int = 60, length: int = 6) -> None:
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        self.length = length
        self.ec = EmbeddingCollection(tables=_tables(EmbeddingConfig, dim, rows), device=torch.device("meta"))
        self.block = torch.nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)

    def forward(self, kjt: Any, dense: torch.Tensor) -> torch.Tensor:
        jagged = self.ec(kjt)
        total = None
        for key in [f"f{i}" for i in range(FEATURES)]:
            padded = jagged[key].to_padded_dense(desired_length=self.length)
            total = padded if total is None else total + padded
        mask = torch.nn.Transformer.generate_square_subsequent_mask(self.length)
        hidden = self.block(total, src_mask=mask, is_causal=True)
        return (hidden.sum(dim=(1, 2)) / hidden.shape[-1] - dense).square().mean()


MODELS = {"pooled": PooledModel, "sequence": SequenceModel}
SHARDING = {
    "pooled": {"t0": "table_wise", "t1": "table_wise", "t2": "column_wise", "t3": "column_wise"},
    "sequence": {"t0": "row_wise", "t1": "row_wise", "t2": "table_wise", "t3": "table_wise"},
}


def make_batch(step: int, rank: int, batch: int, *, rows: int = 60, max_ids: int = 6) -> tuple[Any, torch.Tensor]:
    """A KeyedJaggedTensor of 4 features x ``batch`` samples with 0 to ``max_ids - 1`` ids
    each, and a dense target per sample; seeded by step and rank."""
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(0, max_ids, (FEATURES * batch,), generator=g)
    values = torch.randint(0, rows, (int(lengths.sum()),), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f{i}" for i in range(FEATURES)], values=values, lengths=lengths)
    return kjt, torch.randn(batch, generator=g)


OPTIMIZERS = ("sgd", "rowwise_adagrad")
"""The fused table optimizers FBGEMM's CPU kernels have (EXACT_SGD, EXACT_ROWWISE_ADAGRAD)."""


def shard(model: torch.nn.Module, sharding: dict[str, str], world: int, *, lr: float = 0.1,
          optimizer: str = "sgd") -> torch.nn.Module:
    """``model`` sharded over the default group by DistributedModelParallel with the given
    sharding type per table and fused table optimizer (one of :data:`OPTIMIZERS`); table
    values seeded by parameter index (the same in every copy)."""
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints

    sharder_type = EmbeddingBagCollectionSharder if isinstance(model, PooledModel) else EmbeddingCollectionSharder
    kind = {"sgd": EmbOptimType.EXACT_SGD, "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}[optimizer]
    sharders = [sharder_type(fused_params={"optimizer": kind, "learning_rate": lr})]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        constraints={t: ParameterConstraints(sharding_types=[kind]) for t, kind in sharding.items()})
    plan = planner.collective_plan(model, sharders, dist.group.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders,
                                   init_data_parallel=False)
    for index, (name, param) in enumerate(dmp.named_parameters()):
        if "embedding" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(index)))
    return dmp


def sharding(model_name: str, world: int) -> dict[str, str]:
    """The sharding type per table. The sequence model's two table-wise tables leave ranks
    without a table-wise feature beyond 2 ranks, and TorchRec 1.8.0's synchronous sequence
    all-to-all (``all2all_sequence_sync``, which the PT2 recipe selects) fails on such a rank
    even in eager mode (a ``split_with_sizes`` mismatch in ``construct_jagged_tensors``;
    the asynchronous path works): there every table is row-wise."""
    if model_name == "sequence" and world > 2:
        return {t: "row_wise" for t in SHARDING[model_name]}
    return SHARDING[model_name]


def build(model_name: str, world: int, *, optimizer: str = "sgd", **sizes: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return shard(MODELS[model_name](**sizes), sharding(model_name, world), world, optimizer=optimizer)


# ----------------------------------------------------------------------- benchmark


def _worker(rank: int, world: int, model_name: str, args: dict) -> dict:
    import torch.distributed as dist

    import fsc
    import fsc.integrations.torchrec as fsc_torchrec

    sizes = {"dim": args["dim"], "rows": args["rows"]} | ({"length": args["max_ids"]} if model_name == "sequence" else {})

    def batch(step: int) -> tuple[Any, torch.Tensor]:
        return make_batch(step, rank, args["batch"] + step % 3, rows=args["rows"], max_ids=args["max_ids"])

    fsc_torchrec.prepare()
    variants: dict[str, Any] = {}
    models = {name: build(model_name, world, **sizes) for name in ("eager", "inductor", "freescale")}
    with torch.no_grad():  # TorchRec's lazy initialisation, in every variant
        models["eager"](*batch(0))
        models["inductor"](*batch(0))
    variants["eager"] = models["eager"]
    compiled_inductor = torch.compile(models["inductor"], backend="inductor", fullgraph=True)
    variants["inductor"] = fsc_torchrec.Compiled(models["inductor"], compiled_inductor)
    variants["freescale"] = fsc_torchrec.compile(models["freescale"], batch(0), options={"inner": "inductor"})
    optimizers = {name: torch.optim.SGD([p for n, p in m.named_parameters() if "embedding" not in n], lr=0.01)
                  for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, float] = {}
    names = list(variants)
    for step in range(1, args["warmup"] + args["steps"] + 1):
        inputs = batch(step)
        # the order rotates every step (the same on every rank): no variant always runs first or last
        for name in names[step % len(names):] + names[:step % len(names)]:
            fn = variants[name]
            dist.barrier()
            start = time.perf_counter()
            loss = fn(*inputs)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step > args["warmup"]:
                times[name].append(elapsed.item())
            if step == 1:
                losses[name] = loss.item()
    record = fsc.last_compile()
    graphs = record.graphs()
    estimates = {kind: (g.estimate_before or {}, g.estimate_after or {}) for kind, g in graphs.items()
                 if kind in ("forward", "backward")}
    return {
        "times": times,
        "first_losses": losses,
        "fixes": fsc_torchrec.applied_fixes(),
        "modified": {kind: [p.name for p in g.passes if p.modified] for kind, g in graphs.items()},
        "exposed_comm_ms": {kind: (before.get("exposed_comm_ms"), after.get("exposed_comm_ms"))
                            for kind, (before, after) in estimates.items()},
        "subgraphs": len(record.subgraphs),
    }


def measure(model_name: str, world: int, args: dict) -> list[dict]:
    result = run_gloo_ranks(_worker, world, model_name, args, timeout=args["timeout"],
                            label=f"torchrec-models {model_name} {world} ranks")[0]
    times = result["times"]
    rows = []
    for name, series in times.items():
        ratios = sorted(t / i for t, i in zip(series, times["inductor"]))
        row = {
            "model": model_name, "ranks": world, "variant": name,
            "step_ms_median": statistics.median(series) * 1e3,
            "ratio_to_inductor": statistics.median(ratios),
            "ratio_p10": ratios[len(ratios) // 10], "ratio_p90": ratios[(len(ratios) * 9) // 10],
            "first_loss": result["first_losses"][name],
            "steps": len(series),
        }
        if name == "freescale":
            row |= {"passes_modified": result["modified"], "est_exposed_comm_ms": result["exposed_comm_ms"],
                    "fixes": result["fixes"], "compiled_graphs": result["subgraphs"]}
        rows.append(row)
    return rows


_SHORT = {"forward": "fwd", "backward": "bwd"}


def _fmt_estimate(row: dict) -> str:
    parts = []
    for kind in ("forward", "backward"):
        before, after = row.get("est_exposed_comm_ms", {}).get(kind, (None, None))
        if before is not None and after is not None:
            parts.append(f"{_SHORT[kind]} {before:.2f} -> {after:.2f}")
    return ", ".join(parts) or "-"


def run(argv: list[str], json_path: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench torchrec-models", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), action="append", help="default: both")
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=128, help="samples per rank (plus step %% 3, so sizes vary)")
    parser.add_argument("--max-ids", type=int, default=20, help="ids per feature and sample: 0 to max_ids - 1")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--readme", default=None, help="rewrite this README's bench:torchrec-models section")
    args = parser.parse_args(argv)
    config = vars(args) | {"model": args.model or sorted(MODELS)}
    rows = [row for model in config["model"] for world in map(int, args.ranks.split(","))
            for row in measure(model, world, config)]
    body = [[r["model"], str(r["ranks"]), r["variant"], f"{r['step_ms_median']:.1f}",
             f"{r['ratio_to_inductor']:.2f} ({r['ratio_p10']:.2f}-{r['ratio_p90']:.2f})", _fmt_estimate(r)]
            for r in rows]
    table = markdown_table(["model", "ranks", "variant", "step ms (median)", "vs inductor (p10-p90)",
                            "fsc est. exposed comm ms, before -> after"], body, numeric=3)
    print("\n".join(table))
    write_json(json_path, {"config": config, "rows": rows, "torch": torch.__version__,
                           "machine": platform.machine(), "measured": True})
    if args.readme:
        command = "python -m bench torchrec-models" + (" " + " ".join(argv) if argv else "")
        replace_section(args.readme, "torchrec-models", "\n".join([
            f"`{command}` (results/torchrec-models.json): {args.steps} timed steps after {args.warmup}, "
            f"{args.batch}+ samples per rank, {args.rows} rows x {args.dim} per table, ids per feature 0-"
            f"{args.max_ids - 1}; each step's time is the slowest rank's.", "", *table]))
    return 0
