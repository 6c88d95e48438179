"""TorchRec models sharded by DistributedModelParallel on 2 gloo ranks, compiled through
fsc with :func:`fsc.integrations.torchrec.compile`: the models of ``python -m bench
torchrec-models`` (bench/torchrec_models.py), a DLRM-like model (EmbeddingBagCollection,
tables sharded table-wise and column-wise) and a sequence model (EmbeddingCollection,
row-wise and table-wise, feeding a causal transformer layer). Losses, dense parameters and
the fused-optimizer tables equal eager's after several steps of varying batches, the
scheduling passes rewrite the graphs, nothing recompiles."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks

pytestmark = pytest.mark.ranks

torchrec = pytest.importorskip("torchrec", reason="needs torchrec==1.8.0 and fbgemm-gpu-cpu==1.8.0 (make test installs them)")

STEPS = 4


def _batch(step: int, rank: int, batch: int):
    from bench.torchrec_models import make_batch

    return make_batch(step, rank, batch)


def _shard(model_name: str, world: int, optimizer: str):
    from bench.torchrec_models import build

    return build(model_name, world, optimizer=optimizer)


def _state(dmp) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in dmp.named_parameters() if p.numel() > 0}


def _worker(rank: int, world: int, model_name: str, inner: str, optimizer: str, passes: str | None) -> dict:
    import fsc
    import fsc.integrations.torchrec as fsc_torchrec

    eager, model = _shard(model_name, world, optimizer), _shard(model_name, world, optimizer)
    initial = _state(eager)
    fsc_torchrec.prepare()
    with torch.no_grad():  # the warm-up forward compile() runs, for the eager copy too
        eager(*_batch(0, rank, 4))
    compiled = fsc_torchrec.compile(model, _batch(0, rank, 4), options={"inner": inner, "passes": passes})
    dense_opt = [torch.optim.SGD([p for n, p in m.named_parameters() if "embedding" not in n], lr=0.05)
                 for m in (eager, model)]
    worst_loss = 0.0
    for step in range(1, STEPS + 1):
        batch = _batch(step, rank, 3 + step % 3)  # the batch size changes every step
        ref = eager(*batch)
        ref.backward()
        got = compiled(*batch)
        got.backward()
        worst_loss = max(worst_loss, (got - ref).abs().item())
        for opt in dense_opt:
            opt.step()
            opt.zero_grad()
    ref_state, got_state = _state(eager), _state(model)
    unequal = None
    if model_name == "sequence":  # ranks with different batch sizes: refused, not computed wrong
        try:
            compiled(*_batch(99, rank, 3 + rank))
        except Exception as exc:
            unequal = f"{type(exc).__name__}: {exc}"
    record = fsc.last_compile()
    graphs = record.graphs()
    return {
        "loss": worst_loss,
        "params": max((got_state[n] - ref_state[n]).abs().max().item() for n in ref_state),
        "tables_moved": max((ref_state[n] - initial[n]).abs().max().item() for n in ref_state if "embedding" in n),
        "fixes": fsc_torchrec.applied_fixes(),
        "unequal_batches": unequal,
        "subgraphs": len(record.subgraphs),
        "graphs": sorted(graphs),
        "fallbacks": {k: g.fallback for k, g in graphs.items()},
        "passes": {k: {p.name: (p.modified, p.reasons) for p in g.passes} for k, g in graphs.items()},
        "swapped": {k: g.pass_record("sm-free-collectives").stats.get("swapped") for k, g in graphs.items()
                    if any(p.name == "sm-free-collectives" for p in g.passes)},
        "collectives": {k: sum(len(v) for v in (g.collectives or {}).values()) for k, g in graphs.items()},
    }


SM_FREE = "lower-attention,prioritize-collectives,split-collectives,overlap-schedule,sm-free-collectives"


# Each model under both inner compilers, both fused table optimizers the CPU kernels have,
# and the default pipeline as well as the one with the SM-free swap (copy-engine transport:
# shared memory on CPU), four 2-rank runs in all.
@pytest.mark.parametrize(("case", "inner", "optimizer", "passes"), [
    ("pooled", "eager", "sgd", None),
    ("pooled", "inductor", "rowwise_adagrad", SM_FREE),
    ("sequence", "eager", "rowwise_adagrad", SM_FREE),
    ("sequence", "inductor", "sgd", None),
])
def test_torchrec_model_compiles_through_fsc_and_trains_like_eager(case, inner, optimizer, passes):
    for result in run_ranks(_worker, 2, case, inner, optimizer, passes):
        assert {"backward", "forward"} <= set(result["graphs"]) <= {"backward", "forward", "pre-grad"}, result
        assert not any(result["fallbacks"].values()), result
        assert result["subgraphs"] == 1, result  # one graph for every batch size: no recompile
        assert result["loss"] <= 1e-5, result
        assert result["params"] <= 1e-5, result
        assert result["tables_moved"] > 1e-4, result  # the fused optimizer trained the tables, 10x over the tolerance
        assert {"fbgemm-fake-kernels", "resize-awaitables-loop", "warm-up"} <= set(result["fixes"]), result
        if case == "sequence":
            assert (result["unequal_batches"] or "").startswith("TorchRecError: a run-time assertion"), \
                result["unequal_batches"]
            assert "the same batch size on every rank" in result["unequal_batches"]
        for kind in ("forward", "backward"):
            assert result["collectives"][kind] > 0, result
            for name, (_, reasons) in result["passes"][kind].items():
                assert not any("in-place" in r for r in reasons), (kind, name, reasons)
            assert result["passes"][kind]["overlap-schedule"][0] is True, (kind, result["passes"][kind])
            # acted, or said why not in the words these graphs call for
            modified, reasons = result["passes"][kind]["prioritize-collectives"]
            assert modified or (reasons and all(r.startswith("group '") for r in reasons)), (kind, reasons)
            modified, reasons = result["passes"][kind]["split-collectives"]
            assert modified or all("mixes" in r or "min_bytes" in r for r in reasons), (kind, reasons)
            if passes == SM_FREE:  # the exchanges something computes beside move by copy engine
                assert result["swapped"][kind] >= 2, result["swapped"]
