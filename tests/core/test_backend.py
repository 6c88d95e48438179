"""The backend on one process: options, parity with eager, records, verify, fallbacks."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.fx as fx
from models import MLP, check_parity
from torch._dynamo.exc import BackendCompilerFailed

import fsc
from examples.tinyrec import TinyRec
from fsc.backend import InductorPass
from fsc.inspect import SubgraphRecord

INNERS = ["eager", pytest.param("inductor", marks=pytest.mark.inductor)]


def tiny_rec():
    return TinyRec(num_items=64, dim=16, max_length=16, exchange=False)


def ids(batch=3, length=9):
    return (torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(1)),)


@pytest.mark.ranks
def test_entry_point_works_in_a_process_that_never_imported_fsc():
    code = (
        "import sys, torch\n"
        "assert 'fsc' not in sys.modules\n"
        "f = torch.compile(lambda x: torch.sin(x) * 2, backend='freescale', options={'inner': 'eager'})\n"
        "x = torch.arange(4.0)\n"
        "torch.testing.assert_close(f(x), torch.sin(x) * 2)\n"
        "assert 'fsc' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"bogus": 1}, "unknown freescale option 'bogus'; valid options: passes, inner"),
        ({"inner": "tvm"}, "option 'inner'='tvm' is not one of inductor, eager"),
        ({"device_profile": "a100"}, "option 'device_profile'='a100' is not one of cpu, h100, h200"),
        ({"passes": "overlap-schedule,nope"}, "unknown pass 'nope'; registered passes: lower-attention, prioritize-collectives, split-collectives, overlap-schedule"),
        ({"passes": "overlap-schedule{frobnicate=1}"}, "pass 'overlap-schedule' has no option 'frobnicate'"),
        ({"memory_budget_gb": -1}, "option 'memory_budget_gb'=-1 must be a positive number"),
    ],
)
def test_bad_options_fail_at_compile_time_naming_the_option(options, needle):
    f = torch.compile(lambda x: x + 1, backend="freescale", options=options)
    with pytest.raises(BackendCompilerFailed) as info:
        f(torch.ones(2))
    assert isinstance(info.value.inner_exception, fsc.OptionError)
    assert needle in str(info.value.inner_exception)


def test_bad_mode_fails_naming_it():
    f = torch.compile(lambda x: x + 1, backend="freescale", mode="fastest")
    with pytest.raises(BackendCompilerFailed, match="mode='fastest' is not one of"):
        f(torch.ones(2))


def test_mode_needs_inductor():
    # torch.compile refuses mode and options together; the backend is also callable directly
    gm = fx.symbolic_trace(lambda x: x + 1)
    with pytest.raises(fsc.OptionError, match="needs inner='inductor'"):
        fsc.freescale(gm, [torch.ones(2)], mode="max-autotune", options={"inner": "eager"})


def test_unexpected_backend_argument_is_named():
    gm = fx.symbolic_trace(lambda x: x + 1)
    with pytest.raises(fsc.OptionError, match="unexpected backend argument"):
        fsc.freescale(gm, [torch.ones(2)], dynamic=True)


@pytest.mark.inductor
def test_inductor_mode_is_forwarded():
    f = torch.compile(lambda x: x * 2 + 1, backend="freescale", mode="max-autotune-no-cudagraphs")
    torch.testing.assert_close(f(torch.arange(3.0)), torch.arange(3.0) * 2 + 1)


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("passes", ["", None])
def test_mlp_matches_eager_forward_and_gradients(inner, passes):
    options = {"inner": inner} | ({} if passes is None else {"passes": passes})
    check_parity(MLP, (torch.randn(5, 16),), options)
    record = fsc.last_compile()
    assert set(record.summary()) == {"forward", "backward"}
    expected = [] if passes == "" else ["prioritize-collectives", "split-collectives", "overlap-schedule"]
    assert [p.name for p in record.graph("forward").passes] == expected


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("passes", ["", None])
def test_embedding_attention_model_matches_eager(inner, passes):
    options = {"inner": inner} | ({} if passes is None else {"passes": passes})
    check_parity(tiny_rec, ids(), options, rtol=1e-4, atol=1e-5)


def test_steady_state_does_not_recompile():
    from torch._dynamo.utils import counters

    compiled = torch.compile(MLP(), backend="freescale", options={"inner": "eager"})
    counters.clear()
    for seed in range(5):
        compiled(torch.randn(5, 16, generator=torch.Generator().manual_seed(seed))).backward()
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("inner", INNERS)
def test_explain_returns_graphs_before_and_after_each_pass(inner):
    model = tiny_rec()
    grads_before = [p.grad for p in model.parameters()]
    record = fsc.explain(model, *ids(), inner=inner)
    summary = record.summary()
    # pre-grad: lower-attention keeps TinyRec's single-head [B, N, D] attention on CPU, with the reason
    assert set(summary) == {"pre-grad", "forward", "backward"}
    for key in ("forward", "backward"):
        entry = summary[key]
        for field in ("exposed_comm_ms_before", "exposed_comm_ms_after", "makespan_ms_before", "makespan_ms_after"):
            assert isinstance(entry[field], float)
        assert entry["passes"]["overlap-schedule"]["modified"] is False
        assert entry["declined"]["overlap-schedule"] == ["no collectives in the graph"]
        graph = record.graph(key)
        assert "def forward" in graph.graph_before and "def forward" in graph.graph_after
    assert "mm" in record.graph("forward").graph_before
    assert [p.grad for p in model.parameters()] == grads_before  # explain trains nothing
    assert "forward:" in str(record) and "declined: no collectives in the graph" in str(record)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SwapAddForSub(fsc.Pass):
    """Deliberately wrong: turns every aten.add.Tensor into aten.sub.Tensor."""

    name = "swap-add-for-sub"

    def run(self, gm: fx.GraphModule, ctx: fsc.PassContext) -> fsc.PassResult:
        changed = 0
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.add.Tensor:
                node.target = torch.ops.aten.sub.Tensor
                changed += 1
        return fsc.PassResult(modified=changed > 0, stats={"changed": changed})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Crash(fsc.Pass):
    name = "crash"

    def run(self, gm: fx.GraphModule, ctx: fsc.PassContext) -> fsc.PassResult:
        raise ZeroDivisionError("boom")


def add_model(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x + y).relu() * 3


@pytest.mark.parametrize("inner", INNERS)
def test_verify_catches_a_wrong_pass_and_names_it(inner):
    f = torch.compile(add_model, backend="freescale", options={"inner": inner, "verify": True, "passes": [SwapAddForSub()]})
    with pytest.raises(fsc.VerificationError) as info:  # at the first call, before the compiled code runs
        f(torch.randn(4), torch.randn(4))
    assert info.value.pass_name == "swap-add-for-sub"
    assert "changed the values of the inference graph on the first call's inputs" in str(info.value)


def test_without_verify_the_wrong_pass_goes_unnoticed():
    # the control for the test above: the pass really changes values
    f = torch.compile(add_model, backend="freescale", options={"inner": "eager", "passes": [SwapAddForSub()]})
    x, y = torch.ones(4), torch.ones(4)
    assert not torch.equal(f(x, y), add_model(x, y))


@pytest.mark.parametrize("inner", INNERS)
def test_verify_accepts_the_real_pipeline(inner):
    check_parity(tiny_rec, ids(), {"inner": inner, "verify": True}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inner", INNERS)
def test_failing_pass_falls_back_to_unrewritten_graph_with_reason(inner, caplog):
    f = torch.compile(add_model, backend="freescale", options={"inner": inner, "passes": [Crash()]})
    x, y = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(f(x, y), add_model(x, y))
    graph = fsc.last_compile().graph("inference")
    assert graph.fallback is not None and "pass 'crash' failed" in graph.fallback
    assert "ZeroDivisionError: boom" in graph.fallback
    assert graph.graph_after == graph.graph_before
    assert any("compiling the" in r.getMessage() and "unrewritten" in r.getMessage() for r in caplog.records)


def test_failing_pass_raises_with_cause_when_asked():
    f = torch.compile(add_model, backend="freescale", options={"inner": "eager", "passes": [Crash()], "on_error": "raise"})
    with pytest.raises(BackendCompilerFailed) as info:
        f(torch.randn(4), torch.randn(4))
    exc = info.value.inner_exception
    assert isinstance(exc, fsc.PassFailedError) and exc.pass_name == "crash"
    assert isinstance(exc.__cause__, ZeroDivisionError)


def test_dump_dir_writes_record_files(tmp_path):
    f = torch.compile(MLP(), backend="freescale", options={"inner": "eager", "dump_dir": str(tmp_path)})
    f(torch.randn(2, 16)).backward()
    summaries = sorted(tmp_path.rglob("summary.json"))
    assert summaries, list(tmp_path.rglob("*"))
    kinds = set()
    for path in summaries:
        kinds |= set(json.loads(path.read_text()))
    assert {"forward", "backward"} <= kinds
    assert list(tmp_path.rglob("forward.0_before.py")) and list(tmp_path.rglob("backward.final.py"))


def test_inductor_pass_uuid_is_stable_and_tracks_the_configuration():
    record = SubgraphRecord(index=0, config=None, dynamo_graph="")
    a = InductorPass(fsc.Config.from_options({}), record)
    b = InductorPass(fsc.Config.from_options({}), record)
    c = InductorPass(fsc.Config.from_options({"passes": ""}), record)
    d = InductorPass(fsc.Config.from_options({"device_profile": "h100"}), record)
    assert a.uuid() == b.uuid()
    assert len({a.uuid(), c.uuid(), d.uuid()}) == 3


@pytest.mark.inductor
def test_inductor_cache_hit_still_has_a_record(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    from torch._inductor import config as inductor_config

    with inductor_config.patch(fx_graph_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            torch.compile(MLP(), backend="freescale")(torch.randn(2, 16)).backward()
    record = fsc.last_compile()
    assert "overlap-schedule" in record.summary()["forward"]["passes"]
    assert os.listdir(tmp_path / "fsc_records")


@pytest.mark.slow  # Dynamo and AOT autograd over symbolic shapes: about 11 s on 2 cores
@pytest.mark.parametrize("inner", INNERS)
def test_dynamic_lengths_compile_once_with_estimates_at_the_hint(inner):
    from torch._dynamo.utils import counters

    model = tiny_rec()
    compiled = torch.compile(model, backend="freescale", options={"inner": inner}, dynamic=True)
    counters.clear()
    for length in (5, 9, 14):
        batch = torch.randint(0, 64, (3, length), generator=torch.Generator().manual_seed(length))
        out = compiled(batch)
        out.backward()
        torch.testing.assert_close(out, model(batch), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    summary = fsc.last_compile().summary()
    assert summary["forward"]["makespan_ms_before"] > 0
    assert re.search(r"Sym\(s\d+\)", fsc.last_compile().graph("forward").graph_before)  # really symbolic


@dataclasses.dataclass(frozen=True, kw_only=True)
class BreakTopologicalOrder(fsc.Pass):
    """Deliberately wrong: moves the first compute node after its first user."""

    name = "break-topological-order"

    def run(self, gm: fx.GraphModule, ctx: fsc.PassContext) -> fsc.PassResult:
        first = next(n for n in gm.graph.nodes if n.op == "call_function")
        user = next(iter(first.users))
        user.append(first)
        return fsc.PassResult(modified=True)


@pytest.mark.parametrize("inner", INNERS)
def test_pass_that_breaks_topological_order_falls_back(inner):
    f = torch.compile(add_model, backend="freescale", options={"inner": inner, "passes": [BreakTopologicalOrder()]})
    x, y = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(f(x, y), add_model(x, y))
    graph = fsc.last_compile().graph("inference")
    assert "was used before it has been defined" in graph.fallback
    assert "\n" not in graph.fallback  # lint's first line, not the graph it appends


@pytest.mark.parametrize("inner", INNERS)
def test_inference_graphs_are_recorded_as_inference_by_both_inner_compilers(inner):
    f = torch.compile(MLP(), backend="freescale", options={"inner": inner})
    with torch.no_grad():
        f(torch.randn(2, 16))
    assert list(fsc.last_compile().summary()) == ["inference"]


class EMA(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.ema.mul_(0.9).add_(x * 0.1)
        return x * 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class SwapAddForSubEverywhere(SwapAddForSub):
    name = "swap-add-for-sub-everywhere"

    def run(self, gm: fx.GraphModule, ctx: fsc.PassContext) -> fsc.PassResult:
        changed = 0
        for node in gm.graph.nodes:
            if node.target in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor):
                node.target = torch.ops.aten.sub.Tensor if node.target is torch.ops.aten.add.Tensor else torch.ops.aten.sub_.Tensor
                changed += 1
        return fsc.PassResult(modified=changed > 0)


@pytest.mark.parametrize("inner", INNERS)
def test_verify_compares_what_a_graph_writes_into_its_inputs(inner):
    model = EMA()
    f = torch.compile(model, backend="freescale", options={"inner": inner, "verify": True, "passes": [SwapAddForSubEverywhere()]})
    with pytest.raises(fsc.VerificationError):
        f(torch.ones(4))
    assert torch.equal(model.ema, torch.zeros(4))  # the check ran on copies, and the compiled code never ran


@dataclasses.dataclass(frozen=True, kw_only=True)
class NegateTwice(fsc.Pass):
    """Value-preserving: routes every ``mul`` of the backward graph through two negations."""

    name = "negate-twice"

    def run(self, gm: fx.GraphModule, ctx: fsc.PassContext) -> fsc.PassResult:
        if ctx.graph_kind != "backward":
            return fsc.PassResult(modified=False)
        muls = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor]
        for node in muls:
            with gm.graph.inserting_after(node):
                neg = gm.graph.call_function(torch.ops.aten.neg.default, (node,))
                with gm.graph.inserting_after(neg):
                    back = gm.graph.call_function(torch.ops.aten.neg.default, (neg,))
            node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not neg)
        return fsc.PassResult(modified=bool(muls))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaleBackwardMul(NegateTwice):
    """Deliberately wrong in the backward only: a mul gains a factor 1.01."""

    name = "scale-backward-mul"

    def run(self, gm: fx.GraphModule, ctx: fsc.PassContext) -> fsc.PassResult:
        if ctx.graph_kind != "backward":
            return fsc.PassResult(modified=False)
        node = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
        with gm.graph.inserting_before(node):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node.args[0], 1.01))
        node.args = (scaled, *node.args[1:])
        return fsc.PassResult(modified=True)


def _masked_sin(w: torch.Tensor):
    def f(x):
        return (x[x > 0].unsqueeze(1) * w).sin().sum()

    return f


@pytest.mark.parametrize(("pass_", "wrong"), [(NegateTwice(), False), (ScaleBackwardMul(), True)])
def test_verify_checks_a_backward_with_data_dependent_sizes_on_real_inputs(pass_, wrong):
    # the backward's inputs have a size known only at run time: made-up inputs could not check it
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    try:
        w = torch.randn(1, 4, requires_grad=True)
        compiled = torch.compile(_masked_sin(w), backend="freescale",
                                 options={"inner": "eager", "verify": True, "passes": [pass_]})
        loss = compiled(torch.randn(20, generator=torch.Generator().manual_seed(0)))
        if wrong:
            with pytest.raises(fsc.VerificationError) as info:
                loss.backward()
            assert info.value.pass_name == "scale-backward-mul" and "backward graph" in str(info.value)
        else:
            loss.backward()
            notes = fsc.last_compile().graph("backward").notes
            assert any(n.startswith("verified on the first call's inputs") and "negate-twice" in n for n in notes), notes
    finally:
        torch._dynamo.config.capture_dynamic_output_shape_ops = False


def test_explain_twice_compiles_twice_and_leaves_model_and_inputs_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    x = torch.randn(8, 4, requires_grad=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    for _ in range(2):
        record = fsc.explain(model, x, inner="eager")
        assert set(record.summary()) == {"forward", "backward"}
    assert x.grad is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state())


def test_dump_dir_keeps_every_subgraph_apart(tmp_path):
    def two_graphs(x):
        y = torch.relu(x) * 2
        torch._dynamo.graph_break()
        return (y.sin() + 1).sum()

    f = torch.compile(two_graphs, backend="freescale", options={"inner": "eager", "dump_dir": str(tmp_path)})
    f(torch.randn(4, requires_grad=True)).backward()
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 2
    for folder in folders:
        assert {"forward.final.py", "backward.final.py"} <= {p.name for p in folder.iterdir()}, folder
    texts = [(folder / "forward.0_before.py").read_text() for folder in folders]
    assert ("relu" in texts[0]) != ("relu" in texts[1])


def test_user_pass_source_is_part_of_the_cache_key():
    from fsc.backend import _pass_identity

    namespace: dict = {}
    source = (
        "import dataclasses, fsc\n"
        "@dataclasses.dataclass(frozen=True, kw_only=True)\n"
        "class Mine(fsc.Pass):\n"
        "    name = 'mine'\n"
        "    def run(self, gm, ctx):\n"
        "        return fsc.PassResult(modified=False)\n"
    )
    exec(compile(source, "<no file>", "exec"), namespace)
    assert _pass_identity(namespace["Mine"]()) is None  # no source to hash: uncacheable
    config = fsc.Config.from_options({"passes": [namespace["Mine"]()]})
    assert InductorPass(config, SubgraphRecord(index=0, config=None, dynamo_graph="")).uuid() is None
    assert _pass_identity(SwapAddForSub()) != _pass_identity(Crash())
    assert _pass_identity(SwapAddForSub()) == _pass_identity(SwapAddForSub())


@pytest.mark.ranks
def test_last_compile_before_any_compile_says_so():
    code = "import fsc\ntry:\n    fsc.last_compile()\nexcept LookupError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "the freescale backend has compiled nothing in this process yet"


def test_record_lookup_of_a_missing_graph_lists_what_exists():
    record = fsc.explain(MLP(), torch.randn(2, 16), inner="eager")
    with pytest.raises(KeyError, match=r"no 'inference' graph in this record; it has \['backward', 'forward'\]"):
        record.graph("inference")


def test_explain_raises_clearly_when_dynamo_never_calls_the_backend():
    with torch._dynamo.config.patch(disable=True), pytest.raises(RuntimeError, match="explain compiled nothing"):
        fsc.explain(lambda x: x * 2, torch.randn(3))


def _graph_record(kind, text):
    from fsc.inspect import GraphRecord

    return GraphRecord(kind=kind, graph_before=text, graph_after=text)


def test_record_file_only_gains_graphs(tmp_path):
    """A rank that has compiled only its forward must not erase the backward another rank wrote."""
    import pickle

    from fsc.backend import _save_record

    path = tmp_path / "fsc_records" / "entry.pkl"
    full = SubgraphRecord(index=0, config=None, dynamo_graph="", cache_path=path)
    full.graphs = {"forward": _graph_record("forward", "a"), "backward": _graph_record("backward", "a")}
    _save_record(full)
    late = SubgraphRecord(index=0, config=None, dynamo_graph="", cache_path=path)
    late.graphs = {"forward": _graph_record("forward", "b")}
    _save_record(late)
    stored = pickle.loads(path.read_bytes())
    assert sorted(stored) == ["backward", "forward"]
    assert stored["forward"].graph_after == "b"  # the writer's own graph wins over the file's
    assert stored["backward"].graph_after == "a"


def test_record_writer_waits_for_the_lock_and_then_merges(tmp_path):
    """The read-merge-write happens under the entry's lock: a writer waits while another
    holds it (here the test, through its own open file), then keeps both graphs."""
    import fcntl
    import pickle
    import threading
    import time

    from fsc.backend import _save_record

    path = tmp_path / "entry.pkl"
    first = SubgraphRecord(index=0, config=None, dynamo_graph="", cache_path=path)
    first.graphs = {"forward": _graph_record("forward", "a")}
    _save_record(first)
    second = SubgraphRecord(index=0, config=None, dynamo_graph="", cache_path=path)
    second.graphs = {"backward": _graph_record("backward", "b")}
    with open(path.with_suffix(".lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        writer = threading.Thread(target=_save_record, args=(second,))
        writer.start()
        time.sleep(0.5)
        assert writer.is_alive()  # blocked on the lock, nothing written yet
        assert sorted(pickle.loads(path.read_bytes())) == ["forward"]
        fcntl.flock(held, fcntl.LOCK_UN)
    writer.join(timeout=30)
    assert not writer.is_alive()
    assert sorted(pickle.loads(path.read_bytes())) == ["backward", "forward"]


def test_unreadable_record_file_is_replaced(tmp_path):
    import pickle

    from fsc.backend import _save_record

    path = tmp_path / "entry.pkl"
    path.write_bytes(b"not a pickle")  # a crashed writer's leftovers
    record = SubgraphRecord(index=0, config=None, dynamo_graph="", cache_path=path)
    record.graphs = {"forward": _graph_record("forward", "a")}
    _save_record(record)
    assert sorted(pickle.loads(path.read_bytes())) == ["forward"]


def test_backward_served_from_cache_joins_a_record_whose_forward_ran_here(tmp_path):
    """Inductor compiles the backward at the first backward call and may serve it from its
    cache even though this process rewrote the forward (another rank wrote the entry)."""
    import pickle

    from fsc.backend import _save_record
    from fsc.inspect import CACHE_NOTE

    path = tmp_path / "entry.pkl"
    writer = SubgraphRecord(index=0, config=None, dynamo_graph="", cache_path=path)
    writer.graphs = {"forward": _graph_record("forward", "theirs"), "backward": _graph_record("backward", "theirs")}
    _save_record(writer)
    here = SubgraphRecord(index=0, config=None, dynamo_graph="", cache_path=path)
    here.add(_graph_record("forward", "ours"))
    here.served.update({"forward", "inference"})
    here.refresh()
    assert sorted(here.graphs) == ["forward"]  # no backward compiled or served here yet: none shown
    here.served.add("backward")  # Inductor served it from its cache: our pass did not run
    here.refresh()
    assert sorted(here.graphs) == ["backward", "forward"]
    assert here.graphs["forward"].graph_after == "ours"
    assert CACHE_NOTE in here.graphs["backward"].notes and CACHE_NOTE not in here.graphs["forward"].notes
    _save_record(here)  # the read-back copy is not written back (nor its note)
    stored = pickle.loads(path.read_bytes())
    assert stored["forward"].graph_after == "ours" and stored["backward"].notes == []
    here.add(_graph_record("backward", "ours"))  # compiled here after all: replaces the cached one
    assert sorted(here.graphs) == ["backward", "forward"]
    assert here.graphs["backward"].graph_after == "ours"


@pytest.mark.inductor
def test_record_with_inductor_cache_off_neither_reads_nor_writes_files(tmp_path, monkeypatch):
    """dump_dir (like verify and explain) turns Inductor's FX graph cache off: no entry is
    made, so no record is kept beside one, and none from an earlier run is shown."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    from torch._inductor import config as inductor_config

    with inductor_config.patch(fx_graph_cache=True):
        torch._dynamo.reset()
        torch.compile(MLP(), backend="freescale")(torch.randn(2, 16)).backward()  # writes a full record
        torch._dynamo.reset()
        torch.compile(MLP(), backend="freescale", options={"dump_dir": str(tmp_path / "dump")})(torch.randn(2, 16))
    record = fsc.last_compile()
    assert record.subgraphs[0].cache_path is None
    assert sorted(record.graphs()) == ["forward"]  # forward only ran: no backward from the earlier file


@pytest.mark.inductor
def test_aten_graphs_another_dynamo_graph_cached_still_have_their_records(tmp_path, monkeypatch):
    """Inductor's FX graph cache is keyed by the aten graph: two Dynamo graphs that differ
    only in names share their aten graphs, so the second is served entirely from the first's
    entries and our passes never run for it. Its record still lists both graphs, read back
    from the per-aten-graph records the first compile left."""
    from torch._inductor import config as inductor_config

    from fsc.inspect import CACHE_NOTE

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    w = torch.nn.Parameter(torch.randn(16, 16))

    def first(x):
        return (x @ w).sin().sum()

    def second(renamed):
        return (renamed @ w).sin().sum()

    with inductor_config.patch(fx_graph_cache=True):
        records = []
        for fn in (first, second):
            torch._dynamo.reset()
            torch.compile(fn, backend="freescale")(torch.randn(4, 16)).backward()
            records.append(fsc.last_compile())
    mine, served = records[0].graphs(), records[1].graphs()
    assert sorted(mine) == sorted(served) == ["backward", "forward"]
    assert records[0].subgraphs[0].cache_path != records[1].subgraphs[0].cache_path  # two Dynamo graphs
    assert all(CACHE_NOTE not in g.notes for g in mine.values())
    assert all(CACHE_NOTE in g.notes for g in served.values())  # our passes did not run for the second
    assert served["backward"].graph_after == mine["backward"].graph_after
