"""Train the HSTU example: ``torchrun --nproc_per_node=N examples/hstu/train.py ...``.

    --backend {eager,inductor,freescale}  --steps S  --batch-size B (global, sequences)
    --seed K  [--attention {padded,jagged,dense}]  [--data RATINGS_FILE]  [--out DIR]  [--eval]
    [--bubbles DIR]  [--balance METHOD]  [--table-optimizer NAME]  [--pipeline]

CPU ranks use gloo, GPU ranks NCCL. Without torchrun it runs as a single process. Rank 0
writes ``DIR/summary.json`` (final_loss, losses, median_step_ms, recompiles, world_size,
backend, pipeline, table_optimizer, and hr@10/ndcg@10 with --eval) and, for freescale, the
compile record under ``DIR/compile_record/``. ``--bubbles DIR`` turns the bubble meter on
(``fsc.runtime.bubbles``): rank 0 writes ``DIR/bubbles.json``, ``DIR/trace.json`` (Perfetto)
and ``DIR/bubbles.png``, and the summary gains ``bubble_fraction``, ``exposed_comm_ms`` and
``idle_ms``.

The step itself (forward, backward, gradient all-reduce, optimizer) is :class:`Trainer`'s,
which the benchmarks drive too. Every sample brings its own negatives, drawn for (seed,
step, user), so ``--balance`` (which moves samples between ranks) trains the same maths.
``--pipeline`` drives the step by :func:`pipeline` (:class:`fsc.TrainPipeline`) instead:
batch i+1's item rows are fetched, and its samples routed with ``--balance``, while batch i
trains, and the dense gradients are all-reduced inside the compiled backward; the same
losses as without it (with the same ``--table-optimizer``, which must be row-sparse: not
``adam``). ``--bubbles`` meters each step as before; the step that trains batch i includes
reading and routing batch i+2 (one batch further ahead, so the global token count's
all-reduce has a step to finish), and there is no separate gradient all-reduce wait. The
logged loss (summed over the ranks) is read one step later, its all-reduce overlapping the
next step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from examples.hstu.data import Histories, leave_one_out, load_movielens, synthetic_histories
from examples.hstu.model import (
    ATTENTION_FORMS,
    HSTU,
    HSTUConfig,
    attention_layout,
    collate,
    global_batch_users,
    mark_dynamic,
    model_inputs,
    rank_metrics,
    read_batch,
    sample_cost,
    scale_tensor,
)
from examples.hstu.routing import route_batch
from examples.hstu.sharded import GradientBuckets
from fsc.pipeline import TrainPipeline
from fsc.runtime.embedding import RowWiseAdagrad


def token_lengths(histories: Histories, users: np.ndarray, max_len: int) -> np.ndarray:
    """Tokens each user's sample has after :func:`collate` (with targets): min(n, max_len+1) - 1."""
    return np.array([max(min(len(histories.items[u]), max_len + 1) - 1, 0) for u in users], dtype=np.int64)


def token_cost(lengths: np.ndarray) -> np.ndarray:
    """A sample's cost as its token count (for the dense form, whose attention grows with the
    rank's whole token count, not per sample)."""
    return np.asarray(lengths, dtype=np.float64)


def make_router(balance: str, cost: Callable[[np.ndarray], np.ndarray], world: int, *, split: bool = False):
    """A router whose balancer (``balance``: a :data:`fsc.runtime.balancer.METHODS` name, or
    ``none``) assigns samples by ``cost``; None for ``none``. ``split``: samples heavier than
    a rank's share are cut into chunks on several ranks (free counts)."""
    if balance == "none":
        return None
    from examples.hstu.routing import Router
    from fsc.runtime.balancer import Balancer

    if split:
        return Router(Balancer(ranks=world, method=balance, cost=cost, split=True, counts="free"))
    return Router(Balancer(ranks=world, method=balance, cost=cost))


@dataclasses.dataclass(kw_only=True)
class Trainer:
    """One copy of the model in training and the example's training step: forward, backward,
    the dense gradients' bucketed all-reduce, the optimizer. ``train`` below and the
    benchmarks (``bench.e2e``, ``bench.waits``) drive this same step; they differ only in
    what they measure around it."""

    model: HSTU
    step_fn: Callable[..., torch.Tensor]
    """The model, compiled or not."""
    buckets: GradientBuckets
    opts: list[torch.optim.Optimizer]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """Entered around every call of the step function (compiles happen at calls)."""
    marked: bool = False

    @classmethod
    def create(cls, cfg: HSTUConfig, *, lr: float, device: torch.device | None = None,
               compile: Callable[[HSTU], tuple[Callable[..., torch.Tensor],
                                              Callable[[], contextlib.AbstractContextManager]]] | None = None,
               table_optimizer: str = "adam") -> Trainer:
        """A fresh model (seeded: every trainer starts from the same weights) with
        :func:`make_optimizers`; ``compile(model) -> (step_fn, context)`` (default: eager)."""
        model = HSTU(cfg).to(device or torch.device("cpu"))
        step_fn, context = compile(model) if compile is not None else (model, contextlib.nullcontext)
        return cls(model=model, step_fn=step_fn, buckets=GradientBuckets(model.dense_parameters()),
                   opts=make_optimizers(model, lr, table_optimizer), context=context)

    def step(self, inputs: Sequence[torch.Tensor], *,
             sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
        """One step on :func:`examples.hstu.model.model_inputs`; returns this rank's loss
        (detached). ``sync()`` is entered around the gradient all-reduce's wait, where ranks
        that finished early wait for the slowest (a meter's or profiler's marker)."""
        if not self.marked:  # the token count changes every step: compile for any
            mark_dynamic(inputs, self.model.cfg)
            self.marked = True
        with self.context():
            loss = self.step_fn(*inputs)
            loss.backward()
            with sync():
                self.buckets.wait()
            for opt in self.opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return loss.detach()

    def close(self) -> None:
        self.buckets.remove()


TABLE_OPTIMIZERS = ("adam", "sgd", "adagrad", "rowwise-adagrad")


def make_optimizers(model: HSTU, lr: float, table_optimizer: str = "adam") -> list[torch.optim.Optimizer]:
    """Adam for the dense parameters; the item table's optimizer by name: ``adam`` (one Adam
    over everything), or a row-sparse one, which :class:`fsc.TrainPipeline` needs (a row no
    batch looked up stays put): ``sgd``, ``adagrad`` or ``rowwise-adagrad``
    (:class:`fsc.RowWiseAdagrad`, TorchRec's usual table optimizer), at the same ``lr``
    (what the TorchRec peer of ``bench e2e`` gives its fused table optimizer)."""
    if table_optimizer == "adam":
        return [torch.optim.Adam(model.parameters(), lr=lr)]
    tables = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rowwise-adagrad": RowWiseAdagrad}
    if table_optimizer not in tables:
        raise ValueError(f"table optimizer must be one of {', '.join(TABLE_OPTIMIZERS)}, got {table_optimizer!r}")
    return [torch.optim.Adam(model.dense_parameters(), lr=lr), tables[table_optimizer]([model.item.weight], lr=lr)]


def pipeline(model: HSTU, optimizers: list[torch.optim.Optimizer], *, backend: str | None = "freescale",
             options: dict | None = None) -> TrainPipeline:
    """The example's step as :class:`fsc.TrainPipeline` runs it: batch i+1's item exchange
    and the dense gradients' all-reduce inside the compiled step of batch i. Batches are
    :func:`examples.hstu.model.model_inputs`; one table, ``item``, read for the history, the
    targets and the negatives at once (what :meth:`HSTU.forward` looks up)."""
    cfg = model.cfg

    def lookups(inputs):
        items, targets, negatives = inputs[0], inputs[5], inputs[6]
        return {"item": torch.cat([items, targets, negatives.reshape(-1)])}

    def loss(model, inputs, rows):
        return model.loss(rows["item"], *inputs)

    return TrainPipeline(model, optimizers, lookups=lookups, loss=loss, backend=backend, options=options,
                         dynamic=lambda inputs: mark_dynamic(inputs, cfg))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the HSTU example.")
    p.add_argument("--backend", choices=("eager", "inductor", "freescale"), default="freescale")
    p.add_argument("--inner", choices=("inductor", "eager"), default="inductor", help="freescale's inner compiler")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32, help="global batch: sequences per step over all ranks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="MovieLens ratings file (ratings.csv, ratings.dat, u.data); default synthetic")
    p.add_argument("--synthetic-users", type=int, default=2000)
    p.add_argument("--synthetic-items", type=int, default=5000)
    p.add_argument("--lengths", choices=("lognormal", "zipf"), default="lognormal")
    p.add_argument("--out", default=None)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--negatives", type=int, default=16,
                   help="sampled negatives per sample (a rank looks up this many per sequence it trains)")
    p.add_argument("--attention", choices=ATTENTION_FORMS, default="padded",
                   help="attention form: padded per sequence (default), jagged (length-grouped), kernel (fsc's "
                        "jagged attention op; the form that runs --split chunks), or dense over all of a rank's "
                        "tokens (not a form users write; the one lower-attention recognises)")
    p.add_argument("--attention-groups", type=int, default=4, help="groups of the jagged form")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--table-optimizer", choices=TABLE_OPTIMIZERS, default="adam",
                   help="the item table's optimizer (make_optimizers; the dense parameters always use Adam): adam "
                        "(one Adam over everything), or a row-sparse one, which --pipeline needs")
    p.add_argument("--pipeline", action="store_true",
                   help="drive the step by fsc.TrainPipeline (examples.hstu.train.pipeline): the next batch's item "
                        "rows prefetched and its samples routed while this batch trains, the dense gradients "
                        "all-reduced inside the compiled backward; needs --table-optimizer sgd, adagrad or "
                        "rowwise-adagrad")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="HSTU uses 0.2 on MovieLens; compiled code draws different random numbers than eager")
    p.add_argument("--eval", action="store_true", help="HR@10 / NDCG@10, leave-one-out, after training")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-step lines")
    p.add_argument("--balance", choices=("none", "freescale", "kk-equal", "lpt", "round-robin", "random"), default="none",
                   help="assign the global batch's samples to ranks by cost (fsc.runtime.balancer); none: each "
                        "rank trains the samples it read")
    p.add_argument("--balance-cost", choices=("tokens", "quadratic"), default="quadratic",
                   help="per-sample cost: a*L^2+b*L from the model's config (per-sequence attention; "
                        "examples.hstu.model.sample_cost), or tokens (for --attention dense, whose cost grows "
                        "with the rank's whole token count)")
    p.add_argument("--split", action="store_true",
                   help="let the balancer cut samples heavier than a rank's share into chunks on several ranks "
                        "(context parallelism: each chunk's layers fetch the earlier chunks' keys and values); "
                        "needs --balance (not none), --balance-cost quadratic and --attention kernel")
    p.add_argument("--pg-timeout", type=float, default=600.0, metavar="S",
                   help="seconds any collective may wait for a peer before the process group raises "
                        "(default 600; gloo's and NCCL's own default is 30 minutes)")
    p.add_argument("--bubbles", default=None, metavar="DIR",
                   help="measure compute / exposed communication / straggler idle per rank and step "
                        "(fsc.runtime.bubbles; step 0 and every 4th step after it are not metered); rank 0 "
                        "writes DIR/bubbles.json, DIR/trace.json, DIR/bubbles.png")
    args = p.parse_args(argv)
    if not args.pg_timeout > 0:
        p.error(f"--pg-timeout must be > 0, got {args.pg_timeout}")
    if args.pipeline and args.table_optimizer == "adam":
        p.error("--pipeline needs a row-sparse --table-optimizer (sgd, adagrad or rowwise-adagrad), got "
                "--table-optimizer adam: the pipeline fetches table rows one step ahead, and Adam moves rows "
                "the batch did not look up, so a prefetched row would be stale")
    if args.split and (args.balance == "none" or args.balance_cost != "quadratic" or args.attention != "kernel"):
        p.error("--split needs --balance METHOD (not none), --balance-cost quadratic (chunk costs come from its "
                "coefficients) and --attention kernel (the form that runs chunks); got "
                f"--balance {args.balance} --balance-cost {args.balance_cost} --attention {args.attention}")
    return args


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """torchrun's environment when present; else one process. ``timeout_s`` bounds every
    wait of the process group (a frozen peer), instead of gloo's and NCCL's 30 minutes."""
    cuda = torch.cuda.is_available()
    # NCCL for the model's CUDA tensors, gloo for the small host-side counters
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        store = tempfile.mktemp(prefix="hstu_store_")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def load(args: argparse.Namespace) -> Histories:
    if args.data:
        return load_movielens(args.data)
    return synthetic_histories(num_users=args.synthetic_users, num_items=args.synthetic_items, seed=args.seed,
                               lengths=args.lengths)


def make_meter(args: argparse.Namespace, rank: int, world: int):
    """The bubble meter, on with ``--bubbles``: step 0 (compilation) is not metered, and every
    4th step after it runs unmetered as the control for the meter's overhead."""
    from fsc.runtime.bubbles import BubbleMeter

    return BubbleMeter(rank=rank, world=world, enabled=args.bubbles is not None, warmup_steps=1, control_every=4)


def compile_model(model: torch.nn.Module, args: argparse.Namespace):
    if args.backend == "eager":
        return model
    # the embedding exchange reads its split sizes from a tensor (.tolist())
    torch._dynamo.config.capture_scalar_outputs = True
    if args.backend == "inductor":
        return torch.compile(model, backend="inductor", fullgraph=True)
    options = {"inner": args.inner}
    return torch.compile(model, backend="freescale", options=options, fullgraph=True)


class Progress:
    """A one-line progress bar on stderr (rank 0 only)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.start = total, enabled, time.perf_counter()

    def update(self, done: int, text: str) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // max(self.total, 1)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {elapsed:5.1f}s {text}")
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def train(args: argparse.Namespace) -> dict:
    from torch._dynamo.utils import counters

    rank, world, device = init_distributed(args.pg_timeout)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the world size {world}")
    histories = load(args)
    train_h, held_out = leave_one_out(histories)
    cfg = HSTUConfig(num_items=histories.num_items, num_ratings=histories.num_ratings, dim=args.dim,
                     heads=args.heads, layers=args.layers, max_len=args.max_len, num_negatives=args.negatives,
                     dropout=args.dropout, seed=args.seed, attention=args.attention,
                     attention_groups=args.attention_groups)
    if args.pipeline:
        trainer = None
        model = HSTU(cfg).to(device)
        backend, options = {"eager": (None, None), "inductor": ("inductor", None),
                            "freescale": ("freescale", {"inner": args.inner})}[args.backend]
        pipe = pipeline(model, make_optimizers(model, args.lr, args.table_optimizer), backend=backend,
                        options=options)
    else:
        pipe = None
        trainer = Trainer.create(cfg, lr=args.lr, device=device, table_optimizer=args.table_optimizer,
                                 compile=lambda model: (compile_model(model, args), contextlib.nullcontext))
        model = trainer.model
    per_rank = args.batch_size // world
    router = make_router(args.balance, token_cost if args.balance_cost == "tokens" else sample_cost(cfg), world,
                         split=args.split)
    if router is not None:
        model.exchange_over(router.exchange_group)  # split samples' key/value exchange: a group of its own

    def my_users(step: int) -> np.ndarray:
        return global_batch_users(len(train_h), args.batch_size, args.seed, step)[rank * per_rank : (rank + 1) * per_rank]

    pending = router.plan_async(token_lengths(train_h, my_users(0), cfg.max_len)) if router else None
    losses: list[float] = []
    step_ms: list[float] = []
    wait_ms: list[float] = []
    balance_stats: list[tuple[float, int, int]] = []
    graphs_after_first = 0
    progress = Progress(args.steps, rank == 0 and not args.quiet)
    meter = make_meter(args, rank, world)

    @contextlib.contextmanager
    def gradient_sync():
        waited = time.perf_counter()
        with meter.sync_wait("dense grad all-reduce"):  # ranks that finished early wait for the slowest
            yield
        wait_ms.append((time.perf_counter() - waited) * 1e3)

    def step_inputs(step: int) -> Callable[[], list[torch.Tensor]]:
        """This rank's model inputs of one step: its batch as read, routed with --balance,
        and the global trained-token count as the loss scale (collectives: every rank calls
        it for the same steps in order). The count's all-reduce is left running: the
        returned function waits for it and gives the inputs."""
        nonlocal pending
        batch = read_batch(train_h, my_users(step), cfg, seed=args.seed, step=step)
        if router is not None:
            with meter.sync_wait("balance plan"):
                plan = pending.result()
            if step + 1 < args.steps:  # the next batch's assignment is made while this step runs
                pending = router.plan_async(token_lengths(train_h, my_users(step + 1), cfg.max_len))
            with meter.sync_wait("sample routing"):
                batch = route_batch(router, batch, plan)
            balance_stats.append((plan.assignment.max_over_lb, plan.assignment.stragglers,
                                  plan.assignment.split_samples))
        trained = torch.tensor([float((batch.targets > 0).sum())])
        work = dist.all_reduce(trained, async_op=True)

        def inputs() -> list[torch.Tensor]:
            with meter.sync_wait("token count all-reduce"):
                work.wait()
            return [t.to(device) for t in model_inputs(batch, scale_tensor(trained.item()), cfg)]

        return inputs

    def read_ahead():
        """The pipelined loop's batches. The pipeline pulls batch i+1 inside the step that
        trains batch i; batch i+2 is read and routed then too, and its token count's
        all-reduce runs until the next pull, so no step waits for it."""
        ready = step_inputs(0)
        for step in range(args.steps):
            following = step_inputs(step + 1) if step + 1 < args.steps else None
            yield ready()
            ready = following

    batches = read_ahead() if pipe is not None else None
    reported: tuple[torch.Tensor, Any] | None = None  # a step's loss while its sum over the ranks runs

    def report() -> None:
        """The previous step's loss, summed over the ranks during this step (for the log)."""
        nonlocal reported
        if reported is not None:
            total, work = reported
            work.wait()
            losses.append(total.item())
            reported = None
    for step in range(args.steps):
        with meter.step(step):
            start = time.perf_counter()
            if pipe is not None:
                loss = pipe.progress(batches)
            else:
                loss = trainer.step(step_inputs(step)(), sync=gradient_sync)
            report()
            total = loss.clone()
            reported = (total, dist.all_reduce(total, async_op=True))
            step_ms.append((time.perf_counter() - start) * 1e3)
        if step == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
        if rank == 0 and not args.quiet:
            shown = f"loss {losses[-1]:.4f} " if losses else ""  # the previous step's
            progress.update(step + 1, f"{shown}step {step_ms[-1]:.0f} ms")
    report()
    bubbles = meter.finish()  # collective (a no-op when --bubbles is off)
    # every rank compiles for itself: report the worst
    recompiles = torch.tensor([counters["stats"]["unique_graphs"] - graphs_after_first])
    dist.all_reduce(recompiles, op=dist.ReduceOp.MAX)
    my_wait = torch.tensor([statistics.median(wait_ms[1:] or wait_ms) if wait_ms else 0.0], dtype=torch.float64)
    waits = [torch.zeros_like(my_wait) for _ in range(world)]
    dist.all_gather(waits, my_wait)
    summary = {
        "backend": args.backend,
        "pipeline": args.pipeline,
        "table_optimizer": args.table_optimizer,
        "attention": cfg.attention,
        "world_size": world,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "median_step_ms": statistics.median(step_ms[1:] or step_ms) if step_ms else None,
        # per rank: time in the gradient all-reduce's wait, mostly waiting for the slowest rank
        # (None with --pipeline: the all-reduce runs inside the compiled backward, no separate wait)
        "median_allreduce_wait_ms": None if args.pipeline else [float(w) for w in waits],
        "balance": args.balance,
        "median_max_over_lb": statistics.median(b[0] for b in balance_stats) if balance_stats else None,
        "stragglers": sum(b[1] for b in balance_stats),
        "split": args.split,
        "split_samples": sum(b[2] for b in balance_stats),
        "recompiles": int(recompiles.item()),
        "graphs": counters["stats"]["unique_graphs"],
    }
    measured = bubbles.summary()  # {} when the meter is off or metered no step
    if measured:
        # means over ranks of each rank's median over its metered steps
        summary.update({key: measured[key] for key in ("bubble_fraction", "exposed_comm_ms", "idle_ms")})
        summary["bubbles"] = {"per_rank": measured["per_rank"], "compute_ms": measured["compute_ms"],
                              "unattributed_ms": measured["unattributed_ms"], "step_ms": measured["step_ms"],
                              "overhead_ratio": measured["overhead_ratio"], "dir": args.bubbles}
        if rank == 0:
            bubbles.write(args.bubbles, png=True, label=args.backend)
    if args.eval:
        summary.update(evaluate(model, train_h, held_out, cfg, args.eval_batch, rank, world, device))
    if rank == 0 and args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if args.backend == "freescale":
            import fsc

            fsc.last_compile().dump(out / "compile_record")
    if trainer is not None:
        trainer.close()
    if router is not None:
        router.close()
    dist.barrier()
    dist.destroy_process_group()
    return summary


@torch.no_grad()
def evaluate(model: HSTU, train_h: Histories, held_out: np.ndarray, cfg: HSTUConfig, batch_size: int,
             rank: int, world: int, device: torch.device) -> dict:
    """Leave-one-out HR@10 / NDCG@10: each user's history without its last item predicts
    that item, ranked against all items. Users are split over the ranks; every rank runs
    the same number of batches (the exchange is collective)."""
    model.eval()
    table = torch.nn.functional.normalize(model.item.full_weight(), dim=-1)
    mine = np.array_split(np.arange(len(train_h)), world)[rank]
    batches = int(np.ceil(max(len(part) for part in np.array_split(np.arange(len(train_h)), world)) / batch_size))
    sums = torch.zeros(3, dtype=torch.float64)
    for b in range(batches):
        users = mine[b * batch_size : (b + 1) * batch_size]
        real = len(users)
        if real == 0:
            users = np.array([0])  # a rank with nothing left still joins the exchange
        batch = collate([train_h.items[u] for u in users], [train_h.ratings[u] for u in users],
                        [train_h.timestamps[u] for u in users], cfg.max_len, with_targets=False)
        emb = model.item(batch.items.to(device))
        layout = [t.to(device) for t in attention_layout(batch.offsets, cfg)]
        hidden = model.encode(emb, batch.ratings.to(device), batch.timestamps.to(device),
                              batch.positions.to(device), batch.seq_ids.to(device), *layout)
        last = hidden[(batch.offsets[1:] - 1).to(device)]
        if real:
            hit, ndcg = rank_metrics(last @ table.t(), torch.from_numpy(held_out[users]).to(device))
            sums += torch.stack([hit.sum().cpu(), ndcg.sum().cpu(), torch.tensor(float(real), dtype=torch.float64)])
    dist.all_reduce(sums)
    model.train()
    return {"hr@10": (sums[0] / sums[2]).item(), "ndcg@10": (sums[1] / sums[2]).item(), "eval_users": int(sums[2])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = train(args)
    if int(os.environ.get("RANK", 0)) == 0:
        brief = {k: v for k, v in summary.items() if k != "losses"}
        print(json.dumps(brief))
    return 0


if __name__ == "__main__":
    sys.exit(main())
