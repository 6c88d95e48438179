"""Graphs whose inputs are mutated, on 2 real gloo ranks: the shape of an FBGEMM-backed
TorchRec model without TorchRec. A custom op that mutates its argument (like fbgemm's
bounds check, which counts and clamps out-of-range ids) and a buffer updated under
no_grad make AOTAutograd write the inputs back (``copy_``) at the end of the forward; the
scheduling passes and the SM-free swap still act on the graphs, and losses, gradients and
the mutated buffers equal eager's. (Hand-traced graphs: tests/passes/test_mutation_safety.py.)"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks

pytestmark = pytest.mark.ranks

ROWS_PER_RANK = 40
DIM = 16
PIPELINE = "prioritize-collectives,split-collectives,overlap-schedule,sm-free-collectives"


@torch.library.custom_op("fsc_test::bounds_check", mutates_args=("errors",))
def bounds_check(ids: torch.Tensor, rows: int, errors: torch.Tensor) -> torch.Tensor:
    """Clamped ids; ``errors`` counts the ids that were out of range (in place)."""
    bad = (ids < 0) | (ids >= rows)
    errors.add_(bad.sum())
    return ids.clamp(0, rows - 1)


@bounds_check.register_fake
def _(ids: torch.Tensor, rows: int, errors: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(ids)


def _model(rank: int, world: int):
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    class ShardedLookup(torch.nn.Module):
        """Row-wise sharded table: equal-size id exchange, lookup, rows back, then dense."""

        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(ROWS_PER_RANK, DIM, generator=torch.Generator().manual_seed(rank)))
            self.dense = torch.nn.Linear(DIM, DIM)
            self.register_buffer("errors", torch.zeros((), dtype=torch.int64))
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
            ids = bounds_check(ids, ROWS_PER_RANK * world, self.errors)
            with torch.no_grad():
                self.seen.add_(ids.numel())
            wanted = funcol.all_to_all_single(ids, None, None, dist.group.WORLD)
            local = (wanted - rank * ROWS_PER_RANK).clamp(0, ROWS_PER_RANK - 1)
            rows = funcol.all_to_all_single_autograd(self.table[local], None, None, dist.group.WORLD)
            hidden = self.dense(features).relu() @ self.dense.weight  # compute to overlap the exchange
            return (rows * hidden).square().mean()

    torch.manual_seed(0)
    return ShardedLookup()


def _worker(rank: int, world: int) -> list[dict]:
    import fsc

    out = []
    for inner in ("eager", "inductor"):
        torch._dynamo.reset()
        eager, model = _model(rank, world), _model(rank, world)
        compiled = torch.compile(model, backend="freescale", options={"inner": inner, "passes": PIPELINE},
                                 fullgraph=True)
        worst = 0.0
        for step in range(3):
            g = torch.Generator().manual_seed(100 * step + rank)
            ids = torch.randint(-5, ROWS_PER_RANK * world + 5, (8 * world,), generator=g)  # some out of range
            features = torch.randn(8 * world, DIM, generator=g)
            ref = eager(ids, features)
            ref.backward()
            got = compiled(ids, features)
            got.backward()
            worst = max(worst, (got - ref).abs().item())
            for p, q in zip(model.parameters(), eager.parameters()):
                worst = max(worst, (p.grad - q.grad).abs().max().item())
                p.grad = q.grad = None
        graphs = fsc.last_compile().graphs()
        out.append({
            "inner": inner,
            "worst": worst,
            "buffers": [(b.item(), r.item()) for b, r in zip(model.buffers(), eager.buffers())],
            "forward_code": graphs["forward"].graph_before,
            "passes": {kind: {p.name: (p.modified, p.reasons) for p in graphs[kind].passes}
                       for kind in ("forward", "backward")},
            "fallbacks": [g.fallback for g in graphs.values()],
        })
    return out


def test_input_write_backs_leave_the_passes_acting_and_values_equal_to_eager():
    for rank_results in run_ranks(_worker, 2):
        for result in rank_results:
            inner, passes = result["inner"], result["passes"]
            assert result["fallbacks"] == [None, None], (inner, result["fallbacks"])
            assert result["worst"] <= 1e-5, inner
            for got, ref in result["buffers"]:
                assert got == ref and ref > 0, (inner, result["buffers"])  # the counter and the no_grad buffer
            assert "aten.copy_.default" in result["forward_code"], inner  # the write-back is there
            for kind, by_pass in passes.items():
                for name, (_, reasons) in by_pass.items():
                    assert not any("in-place" in r for r in reasons), (inner, kind, name, reasons)
            assert passes["forward"]["overlap-schedule"][0] is True, (inner, passes["forward"])
            assert passes["forward"]["sm-free-collectives"][0] is True, (inner, passes["forward"])
