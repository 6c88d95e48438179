"""Ranks that disagree fail loudly, never compute wrong (fsc.agreement), on real gloo ranks.

Each situation used to pair the wrong tensors silently or die in a gloo abort naming
nothing of ours: ranks compiled for different static shapes (the passes order two equal
all-to-alls differently), one rank recompiling alone, a pass failing on one rank only
(``on_error="fallback"`` and ``"raise"``), the SM-free pass on one rank only. Every rank
runs under a hard deadline (the harness kills it), and the process group has a short
timeout, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import time
import traceback

import pytest
import torch
import torch.fx as fx

from bench.spawn import spawn_ranks
from fsc.passes.base import Pass, PassContext, PassResult

pytestmark = pytest.mark.ranks

TIMEOUT_S = 4.0  # the agreement's bound where a test waits for it (option agreement_timeout_s; default 300 s)
NO_WAIT_S = 60.0  # the bound where nothing should wait for it: such a step takes well under half of it
PG_TIMEOUT_S = 20.0  # gloo's own bound, so a rank stuck in a collective fails too


def _entry(fn, rank: int, world: int, store: str, out: str, args: tuple) -> None:
    """A rank that writes its result as soon as ``fn`` returns and exits without a barrier:
    these tests expect ranks to fail at different points."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        result = ("ok", fn(rank, world, *args))
    except BaseException:
        result = ("error", traceback.format_exc())
    with open(out, "wb") as f:
        pickle.dump(result, f)
    os._exit(0)


def _run(fn, world: int = 2, *args) -> list:
    hung, outcomes = spawn_ranks(_entry, fn, world, *args, timeout=120.0)
    assert not hung, f"ranks {hung} hung"
    for outcome in outcomes:
        assert outcome[0] == "ok", outcome
    return [outcome[1] for outcome in outcomes]


class TwoExchanges(torch.nn.Module):
    """Two independent all-to-alls of equal shape: ``a``'s result feeds work whose cost grows
    with ``ctx``'s length, ``b``'s feeds fixed work, so prioritize-collectives issues ``b``
    first when ``ctx`` is short and ``a`` first when it is long."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.wa = torch.nn.Linear(dim, dim)
        self.wb = torch.nn.Linear(dim, dim)

    def forward(self, a: torch.Tensor, b: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        xa = funcol.all_to_all_single(a, None, None, group=dist.group.WORLD)
        xb = funcol.all_to_all_single(b, None, None, group=dist.group.WORLD)
        ha = torch.tanh(self.wa(ctx * xa.sum(0)))
        hb = xb
        for _ in range(4):
            hb = torch.tanh(self.wb(hb))
        return ha.sum() + hb.sum()


SHORT, LONG = 2, 65536


def _inputs(rank: int, length: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(length, 16, generator=g)


def _attempt(step) -> dict:
    start = time.monotonic()
    try:
        value = step()
    except Exception as exc:  # noqa: BLE001 - the test reads what was raised
        exc = getattr(exc, "inner_exception", exc)  # Dynamo wraps what a backend raises in BackendCompilerFailed
        return {"error": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - start}
    return {"error": None, "value": value, "seconds": time.monotonic() - start}


def _static_shapes_worker(rank: int, world: int) -> dict:
    import fsc

    torch.manual_seed(0)
    model = torch.compile(TwoExchanges(), backend="freescale", fullgraph=True,
                          options={"inner": "eager", "passes": "prioritize-collectives",
                                   "agreement_timeout_s": NO_WAIT_S})
    out = _attempt(lambda: model(*_inputs(rank, SHORT if rank == 0 else LONG)).item())
    record = fsc.last_compile().graphs().get("forward")
    out["reordered"] = record.pass_record("prioritize-collectives").stats.get("reordered") if record else None
    return out


def test_ranks_compiled_for_different_static_shapes_all_raise_naming_the_collective_and_cause():
    results = _run(_static_shapes_worker)
    assert [r["reordered"] for r in results] == [1, 0]  # the passes did choose different orders
    for r in results:
        assert r["error"] == "AgreementError", r
        assert "collective #0 on group" in r["message"]
        assert "different input shapes" in r["message"]
        assert "forward graph" in r["message"]
        assert r["seconds"] < NO_WAIT_S / 2, r  # both reach the agreement: no wait for a timeout


def _lone_recompile_worker(rank: int, world: int) -> dict:
    import fsc  # noqa: F401

    torch._dynamo.config.automatic_dynamic_shapes = False  # a new length is a new static graph
    torch.manual_seed(0)
    model = torch.compile(TwoExchanges(), backend="freescale", fullgraph=True,
                          options={"inner": "eager", "passes": "prioritize-collectives",
                                   "agreement_timeout_s": TIMEOUT_S})
    first = _attempt(lambda: model(*_inputs(rank, LONG)).item())
    second = _attempt(lambda: model(*_inputs(rank, SHORT if rank == 0 else LONG)).item())
    return {"first": first, "second": second}


def test_one_rank_recompiling_alone_raises_within_the_timeout_and_its_peer_fails_too():
    r0, r1 = _run(_lone_recompile_worker)
    assert r0["first"]["error"] is None and r1["first"]["error"] is None
    assert r0["second"]["error"] == "AgreementError", r0
    assert "recompiled it alone" in r0["second"]["message"]
    assert TIMEOUT_S <= r0["second"]["seconds"] < TIMEOUT_S + 15
    # rank 1 was waiting in gloo for rank 0's collective: it fails when rank 0 leaves, not later
    assert r1["second"]["error"] is not None, r1
    assert r1["second"]["seconds"] < PG_TIMEOUT_S, r1


def _eager_and_static(**options) -> tuple[TwoExchanges, torch.nn.Module]:
    """An eager model and a compiled copy with the same weights that recompiles for every
    new length (no automatic dynamic shapes)."""
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch.manual_seed(0)
    eager = TwoExchanges()
    module = TwoExchanges()
    module.load_state_dict(eager.state_dict())
    model = torch.compile(module, backend="freescale", fullgraph=True,
                          options={"inner": "eager", "agreement_timeout_s": NO_WAIT_S} | options)
    return eager, model


def _lone_same_worker(rank: int, world: int) -> dict:
    import fsc

    eager, model = _eager_and_static(passes="prioritize-collectives")
    first = _attempt(lambda: model(*_inputs(rank, LONG)).item())
    inputs = _inputs(rank, LONG + 1 if rank == 0 else LONG)  # rank 0 recompiles; same order of exchanges
    second = _attempt(lambda: model(*inputs).item())
    notes = fsc.last_compile().graphs()["forward"].notes
    return {"first": first, "second": second, "eager": eager(*inputs).item(), "notes": notes}


def test_one_rank_recompiling_alone_with_the_same_collectives_runs_on_after_a_grace():
    from fsc.agreement import STALE_GRACE_S

    r0, r1 = _run(_lone_same_worker)
    for r in (r0, r1):
        assert r["first"]["error"] is None and r["second"]["error"] is None, r
        assert abs(r["second"]["value"] - r["eager"]) <= 1e-4 * max(1.0, abs(r["eager"])), r
    assert STALE_GRACE_S <= r0["second"]["seconds"] < NO_WAIT_S / 2, r0
    assert any(n.startswith("collectives agreed across ranks in") for n in r0["notes"]), r0["notes"]


def _lone_verify_worker(rank: int, world: int, verify) -> dict:
    import warnings

    import fsc

    eager, model = _eager_and_static(passes="prioritize-collectives,overlap-schedule", verify=verify)
    first = _attempt(lambda: model(*_inputs(rank, LONG)).item())
    first_notes = fsc.last_compile().graphs()["forward"].notes
    inputs = _inputs(rank, LONG + 1 if rank == 0 else LONG)  # rank 0 recompiles alone, same collectives
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = _attempt(lambda: model(*inputs).item())
    if second["error"] is not None:  # the job is over: the peer is gone, no more collectives
        return {"first": first, "first_notes": first_notes, "second": second}
    notes = fsc.last_compile().graphs()["forward"].notes
    return {"first": first, "first_notes": first_notes, "second": second, "eager": eager(*inputs).item(),
            "notes": notes, "warnings": [str(w.message) for w in caught]}


@pytest.mark.parametrize("verify", [True, "warn"])
def test_verify_never_runs_the_collectives_of_a_lone_recompile(verify):
    # checking rank 0's new graph would run its two all-to-alls while rank 1 runs its step:
    # gloo would pair them with rank 1's. verify=True raises instead; "warn" runs unchecked.
    r0, r1 = _run(_lone_verify_worker, 2, verify)
    for r in (r0, r1):  # the first compile is checked on both ranks together
        assert r["first"]["error"] is None, r
        assert any(n.startswith("verified on the first call's inputs") for n in r["first_notes"]), r["first_notes"]
    if verify is True:
        assert r0["second"]["error"] == "UnverifiedError", r0
        assert "without its peers" in r0["second"]["message"] and "overlap-schedule" in r0["second"]["message"]
        assert r1["second"]["error"] is not None and r1["second"]["seconds"] < PG_TIMEOUT_S + 10, r1
    else:
        for r in (r0, r1):
            assert r["second"]["error"] is None, r
            assert abs(r["second"]["value"] - r["eager"]) <= 1e-4 * max(1.0, abs(r["eager"])), r
        assert any("verify could not check" in n and "without its peers" in n for n in r0["notes"]), r0["notes"]
        assert any("without its peers" in w for w in r0["warnings"]), r0["warnings"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FailOnRank(Pass):
    """Raises on one rank only (a stand-in for a pass bug that one rank's graph triggers)."""

    name = "fail-on-rank"
    rank: int = 1

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        import torch.distributed as dist

        if dist.get_rank() == self.rank:
            raise RuntimeError("injected failure on this rank")
        return PassResult(modified=False)


FALLBACK_PASSES = ("prioritize-collectives", "overlap-schedule", "split-collectives", "sm-free-collectives")


def _fallback_worker(rank: int, world: int) -> list[dict]:
    import fsc
    from examples.tinyrec import TinyRec
    from fsc.pass_manager import parse_pipeline

    results = []
    for name in FALLBACK_PASSES:
        for failing_first in (True, False):
            torch.distributed.barrier()  # both ranks compile each model at about the same time
            torch._dynamo.reset()
            torch.manual_seed(0)
            eager = TinyRec(num_items=128, dim=16, max_length=32)
            model = TinyRec(num_items=128, dim=16, max_length=32)
            model.load_state_dict(eager.state_dict())
            passes = [FailOnRank(), *parse_pipeline(name)] if failing_first else [*parse_pipeline(name), FailOnRank()]
            compiled = torch.compile(model, backend="freescale", fullgraph=True,
                                     options={"inner": "eager", "passes": passes, "agreement_timeout_s": NO_WAIT_S})
            ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(rank))

            def step() -> tuple[float, float]:
                loss = compiled(ids)
                loss.backward()
                ref = eager(ids)
                ref.backward()
                grad = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), eager.parameters()))
                return (loss - ref).abs().item(), grad

            out = _attempt(step)
            graphs = fsc.last_compile().graphs()
            out.update(name=name, failing_first=failing_first,
                       fallback={k: g.fallback for k, g in graphs.items() if k != "pre-grad"})
            results.append(out)
    return results


def test_a_pass_failing_on_one_rank_makes_every_rank_fall_back_with_eager_values():
    per_rank = _run(_fallback_worker)
    for rank, results in enumerate(per_rank):
        for r in results:
            where = (rank, r["name"], r["failing_first"])
            assert r["error"] is None, (where, r)
            loss_diff, grad_diff = r["value"]
            assert loss_diff <= 1e-5 and grad_diff <= 1e-5, (where, r["value"])
            forward = r["fallback"]["forward"]
            assert forward is not None, where  # every rank compiled it unrewritten
            if rank == 0:  # the healthy rank says whose failure made it fall back
                assert "rank 1 could not rewrite it" in forward and "injected failure" in forward, forward


def _raise_worker(rank: int, world: int) -> dict:
    from examples.tinyrec import TinyRec
    from fsc.pass_manager import parse_pipeline

    torch.manual_seed(0)
    model = TinyRec(num_items=128, dim=16, max_length=32)
    compiled = torch.compile(model, backend="freescale", fullgraph=True,
                             options={"inner": "eager", "on_error": "raise", "agreement_timeout_s": NO_WAIT_S,
                                      "passes": [*parse_pipeline("split-collectives"), FailOnRank()]})
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(rank))
    return _attempt(lambda: compiled(ids).item())


def test_on_error_raise_on_one_rank_makes_every_rank_raise():
    r0, r1 = _run(_raise_worker)
    assert r1["error"] == "PassFailedError" and "injected failure" in r1["message"], r1
    assert r0["error"] == "AgreementError" and "rank 1 failed compiling it" in r0["message"], r0
    assert r0["seconds"] < NO_WAIT_S / 2, r0


def _different_pipelines_worker(rank: int, world: int) -> dict:
    from examples.tinyrec import TinyRec

    torch.manual_seed(0)
    model = TinyRec(num_items=128, dim=16, max_length=32)
    compiled = torch.compile(model, backend="freescale", fullgraph=True,
                             options={"inner": "eager", "agreement_timeout_s": NO_WAIT_S,
                                      "passes": "sm-free-collectives{swap_all=true}" if rank == 0 else ""})
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(rank))
    return _attempt(lambda: compiled(ids).item())


def test_sm_free_pass_on_one_rank_only_raises_on_both_naming_the_transport():
    for r in _run(_different_pipelines_worker):
        assert r["error"] == "AgreementError", r
        assert "copy-engine transport" in r["message"] and "group collective" in r["message"], r
        assert "pipelines differ" in r["message"], r
        assert r["seconds"] < NO_WAIT_S / 2, r


def _agreeing_worker(rank: int, world: int) -> dict:
    import fsc

    torch.manual_seed(0)
    model = torch.compile(TwoExchanges(), backend="freescale", fullgraph=True,
                          options={"inner": "eager", "passes": "prioritize-collectives"})
    out = _attempt(lambda: [model(*_inputs(rank, SHORT)).item() for _ in range(3)])
    out["notes"] = fsc.last_compile().graphs()["forward"].notes
    return out


def test_ranks_that_agree_run_and_record_the_agreement():
    for r in _run(_agreeing_worker):
        assert r["error"] is None, r
        assert any(n.startswith("collectives agreed across ranks in") for n in r["notes"]), r["notes"]
