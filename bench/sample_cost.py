"""``sample-cost``: the HSTU example's per-sample training cost derived from its compiled
graphs (:meth:`fsc.CompileRecord.sample_cost`), against measured step times on this CPU.

One process, one thread, the unsharded model compiled once with ``backend="freescale"``
(inner Inductor) on single-sample batches with the token dimension dynamic (the ``dense``
attention form: on one sample it is per-sequence attention, and its graph has the one
length symbol the derivation needs; 16 negatives per sample); for each length
L, the median of ``--repeats`` forward+backward steps. The fit: measured ~ alpha * predicted
(least squares through the origin, alpha absorbs the profile's absolute error), reported as
R^2 and the worst relative error, next to a free quadratic fit a L^2 + b L + c of the
measurements (what a hand-made cost model would fit).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from bench.report import write_json

LENGTHS = (8, 16, 32, 64, 128, 256, 384, 512)


def _r2(measured: np.ndarray, fitted: np.ndarray) -> float:
    residual = float(((measured - fitted) ** 2).sum())
    total = float(((measured - measured.mean()) ** 2).sum())
    return 1.0 - residual / total if total > 0 else 1.0


def measure(lengths: tuple[int, ...], repeats: int, dim: int, layers: int) -> dict:
    import fsc
    from examples.hstu.model import HSTU, HSTUConfig, collate, model_inputs, sample_negatives, scale_tensor

    torch.set_num_threads(1)
    torch._dynamo.config.capture_scalar_outputs = True
    max_len = max(lengths)
    cfg = HSTUConfig(num_items=5000, dim=dim, heads=2, qk_dim=dim // 2, v_dim=dim // 2, layers=layers,
                     max_len=max_len, num_negatives=16, sharded=False, attention="dense")
    model = HSTU(cfg)
    compiled = torch.compile(model, backend="freescale", fullgraph=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> list[torch.Tensor]:
        b = collate([rng.integers(1, cfg.num_items + 1, n + 1)], [rng.integers(0, 10, n + 1)],
                    [np.cumsum(rng.integers(1, 1000, n + 1))], max_len,
                    negatives=sample_negatives(cfg.num_items, cfg.num_negatives, 0, 0, [0]))
        return model_inputs(b, scale_tensor(1.0), cfg)

    first = batch(lengths[len(lengths) // 2])
    for t in first[:6]:
        torch._dynamo.mark_dynamic(t, 0)
    compiled(*first).backward()
    cost = fsc.last_compile().sample_cost()
    times = []
    for n in lengths:
        inputs = batch(n)
        samples = []
        for i in range(repeats + 2):
            start = time.perf_counter()
            compiled(*inputs).backward()
            if i >= 2:  # warm-up
                samples.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        times.append(statistics.median(samples))
    predicted = cost.evaluate(lengths)
    measured = np.asarray(times)
    alpha = float((predicted * measured).sum() / (predicted * predicted).sum())
    quad = np.polyfit(np.asarray(lengths, dtype=float), measured, 2)
    quad_fit = np.polyval(quad, np.asarray(lengths, dtype=float))
    return {
        "benchmark": "sample-cost",
        "config": {"dim": dim, "layers": layers, "heads": 2, "max_len": max_len, "negatives_per_sample": 16,
                   "threads": 1, "repeats": repeats},
        "flops_polynomial": str(cost.flops_polynomial().as_expr()),
        "bytes_polynomial": str(cost.bytes_polynomial().as_expr()),
        "rows": [{"length": n, "measured_ms": m * 1e3, "predicted_ms": p * 1e3, "scaled_ms": alpha * p * 1e3}
                 for n, m, p in zip(lengths, times, predicted)],
        "alpha": alpha,
        "r2_graph_cost": _r2(measured, alpha * predicted),
        "max_rel_error_graph_cost": float(np.max(np.abs(alpha * predicted - measured) / measured)),
        "r2_free_quadratic": _r2(measured, quad_fit),
        "max_rel_error_free_quadratic": float(np.max(np.abs(quad_fit - measured) / measured)),
    }


def run(argv: list[str], json_path: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sample-cost")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    result = measure(tuple(args.lengths), args.repeats, args.dim, args.layers)
    print(f"FLOPs(L) = {result['flops_polynomial']}")
    print(f"{'L':>6}{'measured ms':>14}{'graph cost ms':>15}{'x alpha ms':>12}")
    for row in result["rows"]:
        print(f"{row['length']:>6}{row['measured_ms']:>14.3f}{row['predicted_ms']:>15.3f}{row['scaled_ms']:>12.3f}")
    print(f"alpha {result['alpha']:.3f}; graph cost: R^2 {result['r2_graph_cost']:.4f}, worst rel. error "
          f"{result['max_rel_error_graph_cost']:.1%}; free quadratic: R^2 {result['r2_free_quadratic']:.4f}, "
          f"worst {result['max_rel_error_free_quadratic']:.1%}")
    write_json(json_path, result)
    return 0
