"""gpu-check section 3: the HSTU example compiled with the freescale backend on CUDA.

Per world size, three copies of the example's model from the same weights (bias tables
randomised so the relative bias matters) train on the same batches, step by step: eager,
``freescale`` (inner Inductor, the default pipeline, ``device_profile`` h100/h200 when the
GPU is one) and ``backend="inductor"``. Reported: every step's loss per backend and the
largest relative difference from eager's (tolerance 1e-4 over the steps: float summation
order differs, nothing else may), whether Inductor's generated code holds our Triton
attention kernels (the code of the first step, forward and backward, read with
``torch._inductor.utils.run_and_get_code`` with the FX graph cache off), what the
compile record says ``lower-attention`` did, and the median step time after the first.

Each backend trains through the example's own training step (``examples.hstu.train.Trainer``:
forward, backward, bucketed gradient all-reduce, Adam) on batches from the example's loader
functions; an example without ``Trainer`` gets the same step written here (``_DirectStep``).
Attention is the example's ``dense`` form where the model has forms, the one
``lower-attention`` recognises. World size 2 runs two processes on the one GPU over gloo
(which carries CUDA tensors; NCCL refuses two ranks on one device), with
``sm-free-collectives`` added so the embedding exchange takes the copy-engine transport
when ``fsc.runtime`` finds it available (the result says which transport ran); dense
gradients are summed with the example's ``GradientBuckets``; it compares freescale with
eager only, to save time. The dry run: world size 1 on CPU, tiny, inner compiler eager
(no generated code to read; Inductor's CPU compile would dominate the dry run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Any

import torch

from bench.gpu_common import Budget, Context, failure

KERNELS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")
LOSS_RTOL = 1e-4


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec:
    device: str
    inner: str
    with_inductor: bool
    steps: int = 10
    users: int = 2000
    items: int = 5000
    mean_length: float = 50.0
    batch: int = 32
    max_len: int = 200
    dim: int = 64
    heads: int = 2
    head_dim: int = 32
    layers: int = 2
    negatives: int = 16
    sm_free: bool = False
    read_code: bool = True


DRY_SPEC = {"steps": 3, "users": 32, "items": 100, "mean_length": 8.0, "batch": 4, "max_len": 16, "dim": 16,
            "heads": 1, "head_dim": 16, "layers": 1, "negatives": 8, "read_code": False}


def _config(spec: Spec, histories: Any) -> Any:
    from examples.hstu.model import HSTUConfig

    kwargs = {"num_items": histories.num_items, "num_ratings": histories.num_ratings, "dim": spec.dim,
              "heads": spec.heads, "qk_dim": spec.head_dim, "v_dim": spec.head_dim, "layers": spec.layers,
              "max_len": spec.max_len, "num_negatives": spec.negatives, "seed": 0}
    if "attention" in HSTUConfig.__dataclass_fields__:
        kwargs["attention"] = "dense"
    return HSTUConfig(**kwargs)


def _inputs(histories: Any, cfg: Any, spec: Spec, step: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's share of the step's global batch, as the model's positional inputs."""
    from examples.hstu import model as hm

    users = hm.global_batch_users(len(histories.items), spec.batch, 0, step)
    per = len(users) // world

    def batch_of(part):
        if hasattr(hm, "read_batch"):
            return hm.read_batch(histories, part, cfg, seed=0, step=step)
        return hm.collate([histories.items[u] for u in part], [histories.ratings[u] for u in part],
                          [histories.timestamps[u] for u in part], cfg.max_len)

    count = float((batch_of(users[: per * world]).targets > 0).sum())  # every rank's tokens, computed here
    batch = batch_of(users[rank * per : (rank + 1) * per])
    scale = hm.scale_tensor(count)
    if hasattr(hm, "model_inputs"):
        return hm.model_inputs(batch, scale, cfg)
    # the example before its loader refactor: one negatives draw per rank and step
    return [*batch.tensors(), hm.sample_negatives(cfg.num_items, cfg.num_negatives, 0, step, rank), scale]


def _mark_dynamic(inputs: list[torch.Tensor]) -> None:
    from examples.hstu import model as hm

    if hasattr(hm, "mark_dynamic"):
        hm.mark_dynamic(inputs)
        return
    for t in inputs[:6]:
        torch._dynamo.mark_dynamic(t, 0)


def _pipeline(spec: Spec) -> str | None:
    if not spec.sm_free:
        return None
    from fsc.pass_manager import default_pipeline, format_pipeline
    from fsc.passes import REGISTRY

    base = format_pipeline(default_pipeline())
    return f"{base},sm-free-collectives" if "sm-free-collectives" in REGISTRY else base


def _lowering(spec: Spec) -> dict:
    """What the compile record says about the attention lowering (the record's API is read
    defensively: a change there must not hide the rest of the section)."""
    import fsc

    try:
        pre = fsc.last_compile().graph("pre-grad")
        stats = pre.pass_record("lower-attention").stats
        return {"lowered": stats.get("lowered"), "attention_found": stats.get("attention_found"),
                "fallback": pre.fallback}
    except Exception as exc:  # reported, not fatal
        return {"error": failure(exc)}


def train_compare(rank: int, world: int, spec: Spec) -> dict:
    """Eager, freescale and (optionally) inductor trained side by side on this rank (in this
    process, or a rank process of :func:`bench.spawn.run_gloo_ranks`)."""
    # the sharded embedding's exchange reads its split sizes from a tensor (.tolist())
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        return _train_compare(rank, world, spec)


def _train_compare(rank: int, world: int, spec: Spec) -> dict:
    from examples.hstu.data import synthetic_histories
    from examples.hstu.model import HSTU

    device = torch.device(spec.device, 0) if spec.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    histories = synthetic_histories(num_users=spec.users, num_items=spec.items, seed=0,
                                    mean_length=spec.mean_length, max_length=max(4 * spec.max_len, 32))
    cfg = _config(spec, histories)
    template = HSTU(cfg)
    with torch.no_grad():
        for layer in template.layers:
            layer.position_bias.weight.normal_()
            layer.time_bias.weight.normal_()
    profile = _profile_name(device)
    options: dict[str, Any] = {"inner": spec.inner, "device_profile": profile}
    if _pipeline(spec):
        options["passes"] = _pipeline(spec)
    names = ["eager", "freescale"] + (["inductor"] if spec.with_inductor else [])
    trainers = {name: _trainer(name, cfg, template, device, options) for name in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    code: dict[str, Any] = {"skipped": "inner compiler is eager: no generated code"} if spec.inner != "inductor" \
        else ({"skipped": "not asked for"} if not spec.read_code else {})
    lowering: dict = {}
    for step in range(spec.steps):
        inputs = [t.to(device) for t in _inputs(histories, cfg, spec, step, rank, world)]
        for name in names:  # eager is not compiled, so the Dynamo reset in reading freescale's code spares it
            _sync(device)
            start = time.perf_counter()
            if step == 0 and name == "freescale" and not code:
                loss, sources = _run_and_get_code(trainers[name].step, inputs)
                code = {"found": [k for k in KERNELS if any(k in s for s in sources)], "sources": len(sources),
                        "extern_op_call": any("jagged_attention_fwd" in s for s in sources)}
                code["ok"] = all(k in code["found"] for k in KERNELS)
            else:
                loss = trainers[name].step(inputs)
            losses[name].append(float(loss))
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
            if step == 0 and name == "freescale":
                lowering = _lowering(spec)
    for trainer in trainers.values():
        trainer.close()
    return summarize(losses, times) | {"rank": rank, "world": world, "device_profile": profile, "options": options,
                                       "training_step": type(trainers["eager"]).__qualname__,
                                       "generated_code": code, "lower_attention": lowering,
                                       "transport": _transport_used(world, device),
                                       "attention_form": getattr(cfg, "attention", "dense (the only form)")}


def _trainer(name: str, cfg: Any, template: torch.nn.Module, device: torch.device, options: dict) -> Any:
    """A model with ``template``'s weights and its training step: the example's ``Trainer``
    (forward, backward, bucketed gradient all-reduce, Adam) where the example has one, else
    :class:`_DirectStep`, the same step written here."""
    from examples.hstu import train
    from fsc.backend import freescale

    def compile_model(model: torch.nn.Module) -> tuple[Any, Any]:
        if name == "freescale":
            return torch.compile(model, backend=freescale, options=options, fullgraph=True), contextlib.nullcontext
        return torch.compile(model, backend="inductor", fullgraph=True), contextlib.nullcontext

    compile_fn = None if name == "eager" else compile_model
    trainer_cls = getattr(train, "Trainer", None)
    if trainer_cls is not None:
        trainer = trainer_cls.create(cfg, lr=1e-3, device=device, compile=compile_fn)
    else:
        trainer = _DirectStep.create(cfg, lr=1e-3, device=device, compile=compile_fn)
    trainer.model.load_state_dict(template.state_dict())
    return trainer


class _DirectStep:
    """The example's training step for an example without ``train.Trainer``: forward,
    backward, the dense gradients' all-reduce (``GradientBuckets``), Adam."""

    def __init__(self, model: torch.nn.Module, step_fn: Any, lr: float) -> None:
        from examples.hstu.sharded import GradientBuckets

        self.model, self.step_fn, self.marked = model, step_fn, False
        self.buckets = GradientBuckets(model.dense_parameters())
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)

    @classmethod
    def create(cls, cfg: Any, *, lr: float, device: torch.device, compile: Any) -> _DirectStep:
        from examples.hstu.model import HSTU

        model = HSTU(cfg).to(device)
        return cls(model, compile(model)[0] if compile is not None else model, lr)

    def step(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if not self.marked:
            _mark_dynamic(inputs)
            self.marked = True
        loss = self.step_fn(*inputs)
        loss.backward()
        self.buckets.wait()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def close(self) -> None:
        self.buckets.remove()


def summarize(losses: dict[str, list[float]], times: dict[str, list[float]]) -> dict:
    """Per backend: losses, the largest relative difference from eager's, whether within
    :data:`LOSS_RTOL`, the median step time after the first, and first-step time."""
    out: dict[str, Any] = {}
    for name, values in losses.items():
        diff = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(values, losses["eager"])), default=None)
        steady = times[name][1:] or times[name]
        out[name] = {"losses": values, "max_rel_diff_vs_eager": diff,
                     "loss_equal": None if diff is None else diff <= LOSS_RTOL,
                     "median_step_ms": statistics.median(steady) if steady else None,
                     "first_step_ms": times[name][0] if times[name] else None}
    return {"backends": out, "loss_rtol": LOSS_RTOL, "steps": len(losses["eager"])}


def _run_and_get_code(fn: Any, *args: Any) -> tuple[Any, list[str]]:
    from unittest import mock

    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    patches = [mock.patch.object(inductor_config, "fx_graph_cache", False)] \
        if hasattr(inductor_config, "fx_graph_cache") else []
    functorch_config = torch._functorch.config
    if hasattr(functorch_config, "enable_autograd_cache"):
        patches.append(mock.patch.object(functorch_config, "enable_autograd_cache", False))
    for p in patches:
        p.start()
    try:
        return run_and_get_code(fn, *args)
    finally:
        for p in patches:
            p.stop()


def _profile_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "h200" if "h200" in name else "h100"


def _transport_used(world: int, device: torch.device) -> Any:
    if world == 1:
        return "none (one rank)"
    try:
        from fsc.runtime import describe

        return {dev: list(v) for dev, v in describe().items()}
    except Exception as exc:  # reported, not fatal
        return failure(exc)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend(ctx: Context, budget: Budget) -> dict:
    from bench.spawn import run_gloo_ranks

    base = Spec(device=ctx.device, inner="inductor" if ctx.cuda else "eager", with_inductor=ctx.cuda)
    if ctx.dry_run:
        base = dataclasses.replace(base, **DRY_SPEC)
    result: dict[str, Any] = {"spec": dataclasses.asdict(base)}
    if budget.expired(needs_s=60.0 if ctx.cuda else 0.0):  # compiling takes about a minute on a GPU machine
        result["world_1"] = {"skipped": budget.reason}
    else:
        ctx.log(f"backend: world size 1 ({base.steps} steps, inner={base.inner})")
        try:
            result["world_1"] = train_compare(0, 1, base)
        except Exception as exc:  # world size 2 still runs
            result["world_1"] = {"error": failure(exc), "traceback": _traceback()}
    torch._dynamo.reset()
    if ctx.dry_run:
        result["world_2"] = {"skipped": "dry run: two processes compiling would take most of the dry run's time; "
                                        "the same function runs per rank"}
    elif budget.expired(needs_s=60):
        result["world_2"] = {"skipped": budget.reason}
    else:
        ctx.log("backend: world size 2, two processes on one GPU")
        spec2 = dataclasses.replace(base, with_inductor=False, sm_free=True)
        try:
            ranks = run_gloo_ranks(train_compare, 2, spec2, timeout=max(budget.remaining(), 30.0),
                                   label="gpu-check backend")
            result["world_2"] = {"ranks": ranks}
        except Exception as exc:  # recorded; the run goes on
            result["world_2"] = {"error": failure(exc), "traceback": _traceback()}
    return result


def _traceback() -> str:
    import traceback

    return traceback.format_exc()
