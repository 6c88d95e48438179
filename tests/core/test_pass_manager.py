"""PassManager, PassRegistry and GraphRewriter on fake-traced graphs (no process group:
the functional collective ops trace under fake tensors with a made-up group name)."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import re
import sys

import pytest
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

import fsc
from fsc.analysis.collectives import COLLECTIVE_ID, is_collective
from fsc.analysis.cost_model import DEVICE_PROFILES, CostModel
from fsc.analysis.timeline import peak_memory
from fsc.pass_manager import PassRecord, parse_pipeline
from fsc.passes import REGISTRY
from fsc.passes.base import Pass, PassRegistry, PassResult
from fsc.rewriter import GraphRewriter

c10d = torch.ops._c10d_functional


def ctx(budget: float | None = None) -> fsc.PassContext:
    return fsc.PassContext(
        graph_kind="forward", cost_model=CostModel(DEVICE_PROFILES["cpu"]), memory_budget_bytes=budget
    )


def trace(f, *shapes) -> fx.GraphModule:
    return make_fx(f, tracing_mode="fake")(*(torch.randn(*s) for s in shapes))


def names(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function"]


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    (found,) = [n for n in gm.graph.nodes if n.name == name]
    return found


def collectives(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_collective(n)]


# ---------------------------------------------------------------------------- graphs


def two_exchanges_one_group(x, y):
    a = c10d.all_to_all_single(x, [2, 2], [2, 2], "g0")
    b = c10d.all_to_all_single(y, [2, 2], [2, 2], "g0")
    return c10d.wait_tensor(a), c10d.wait_tensor(b)


def two_exchanges_two_groups(x, y):
    a = c10d.all_to_all_single(x, [2, 2], [2, 2], "g0")
    b = c10d.all_to_all_single(y, [2, 2], [2, 2], "g1")
    return c10d.wait_tensor(a), c10d.wait_tensor(b)


def exchange_plus(x, w):
    return c10d.wait_tensor(c10d.all_to_all_single(x, [2, 2], [2, 2], "g0")) + w


def two_temporaries(x):
    a = x * 2
    s = a.sum()
    b = x * 3
    t = b.sum()
    return s + t


def matmul_relu(a, b):
    return torch.mm(a, b).relu()


# ------------------------------------------------------------------- test-only passes


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoOp(Pass):
    name = "no-op"

    def run(self, gm, ctx):
        return PassResult(modified=False, stats={"looked_at": len(gm.graph.nodes)}, reasons=("nothing to do here",))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Boom(Pass):
    name = "boom"
    error: Exception = dataclasses.field(default_factory=lambda: ValueError("kaboom"))

    def run(self, gm, ctx):
        raise self.error


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReturnsDict(Pass):
    name = "returns-dict"

    def run(self, gm, ctx):
        return {"modified": False}


def swap_first_two_collectives(gm: fx.GraphModule) -> PassResult:
    rewriter = GraphRewriter(gm.graph)
    first, second = collectives(gm)[:2]
    rewriter.move_before(second, first)
    return PassResult(modified=rewriter.modified, stats=rewriter.stats())


@dataclasses.dataclass(frozen=True, kw_only=True)
class SwapCollectives(Pass):
    name = "swap-collectives"

    def run(self, gm, ctx):
        return swap_first_two_collectives(gm)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeclaredSwapCollectives(Pass):
    name = "declared-swap-collectives"
    reorders_collectives = True

    def run(self, gm, ctx):
        return swap_first_two_collectives(gm)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlakySwapCollectives(Pass):
    """Swaps on odd-numbered calls only: its order depends on hidden state, not the graph."""

    name = "flaky-swap-collectives"
    reorders_collectives = True
    calls: list = dataclasses.field(default_factory=list)

    def run(self, gm, ctx):
        self.calls.append(None)
        if len(self.calls) % 2 == 1:
            return swap_first_two_collectives(gm)
        return PassResult(modified=False)


def drop_exchange(gm: fx.GraphModule) -> PassResult:
    """Replace wait(all_to_all(x)) by x: removes a collective."""
    rewriter = GraphRewriter(gm.graph)
    (coll,) = collectives(gm)
    (wait,) = coll.users
    rewriter.replace(wait, coll.args[0])
    rewriter.erase(coll)
    return PassResult(modified=rewriter.modified, stats=rewriter.stats())


@dataclasses.dataclass(frozen=True, kw_only=True)
class DropExchange(Pass):
    name = "drop-exchange"

    def run(self, gm, ctx):
        return drop_exchange(gm)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeclaredDropExchange(Pass):
    name = "declared-drop-exchange"
    rewrites_collectives = True

    def run(self, gm, ctx):
        return drop_exchange(gm)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RebuildExchange(Pass):
    """Replace the collective by an identical new node, keeping (or not) its identity."""

    name = "rebuild-exchange"
    keep_identity: bool = True

    def run(self, gm, ctx):
        rewriter = GraphRewriter(gm.graph)
        (coll,) = collectives(gm)
        meta = dict(coll.meta) if self.keep_identity else {"val": coll.meta["val"]}
        new = rewriter.insert_before(coll, coll.target, coll.args, dict(coll.kwargs), meta=meta)
        rewriter.replace(coll, new)
        return PassResult(modified=rewriter.modified, stats=rewriter.stats())


@dataclasses.dataclass(frozen=True, kw_only=True)
class DropWait(Pass):
    name = "drop-wait"
    rewrites_collectives = True

    def run(self, gm, ctx):
        rewriter = GraphRewriter(gm.graph)
        (coll,) = collectives(gm)
        (wait,) = coll.users
        rewriter.replace(wait, coll)
        return PassResult(modified=rewriter.modified, stats=rewriter.stats())


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReluBeforeMatmul(Pass):
    """Moves a node above its own input."""

    name = "relu-before-matmul"

    def run(self, gm, ctx):
        rewriter = GraphRewriter(gm.graph)
        rewriter.move_before(node(gm, "relu"), node(gm, "mm"))
        return PassResult(modified=rewriter.modified, stats=rewriter.stats())


@dataclasses.dataclass(frozen=True, kw_only=True)
class HoistSecondTemporary(Pass):
    """In ``two_temporaries``, computes ``b`` before ``a`` is consumed: both live at once."""

    name = "hoist-second-temporary"

    def run(self, gm, ctx):
        rewriter = GraphRewriter(gm.graph)
        rewriter.move_after(node(gm, "mul_1"), node(gm, "mul"))
        return PassResult(modified=rewriter.modified, stats=rewriter.stats())


# -------------------------------------------------------------------- failing passes


def test_pass_manager_wraps_exception_naming_pass_with_original_cause():
    gm = trace(matmul_relu, (3, 4), (4, 5))
    original = ValueError("kaboom")
    records: list[PassRecord] = []
    with pytest.raises(fsc.PassFailedError) as info:
        fsc.PassManager([Boom(error=original)]).run(gm, ctx(), records)
    assert info.value.pass_name == "boom"
    assert "pass 'boom' failed" in str(info.value)
    assert "ValueError: kaboom" in str(info.value)
    assert info.value.__cause__ is original
    assert not isinstance(info.value, fsc.InvariantError)
    (record,) = records
    assert record.name == "boom"
    assert record.error == "ValueError: kaboom"
    assert record.seconds >= 0.0


def test_pass_manager_wraps_fsc_error_raised_by_pass_keeping_cause():
    original = fsc.OptionError("option 'x' is bad")
    gm = trace(matmul_relu, (3, 4), (4, 5))
    with pytest.raises(fsc.PassFailedError, match="pass 'boom' failed: option 'x' is bad") as info:
        fsc.PassManager([Boom(error=original)]).run(gm, ctx())
    assert info.value.__cause__ is original


def test_pass_manager_rejects_pass_returning_non_pass_result():
    gm = trace(matmul_relu, (3, 4), (4, 5))
    expected = r"pass 'returns-dict' failed: run\(\) returned dict, not PassResult"
    with pytest.raises(fsc.PassFailedError, match=expected) as info:
        fsc.PassManager([ReturnsDict()]).run(gm, ctx())
    assert info.value.pass_name == "returns-dict"


def test_pass_manager_records_error_when_pass_returns_non_pass_result():
    # The caller keeps the records of a failed run (rewrite_graph summarises them); a
    # failed pass's record must say that it failed.
    gm = trace(matmul_relu, (3, 4), (4, 5))
    records: list[PassRecord] = []
    with pytest.raises(fsc.PassFailedError):
        fsc.PassManager([ReturnsDict()]).run(gm, ctx(), records)
    (record,) = records
    assert record.error is not None and "PassResult" in record.error


def test_pass_manager_keeps_records_of_earlier_passes_when_later_pass_fails():
    gm = trace(matmul_relu, (3, 4), (4, 5))
    records: list[PassRecord] = []
    with pytest.raises(fsc.PassFailedError, match="'boom'"):
        fsc.PassManager([NoOp(), Boom(), NoOp()]).run(gm, ctx(), records)
    assert [r.name for r in records] == ["no-op", "boom"]
    assert records[0].error is None
    assert records[1].error is not None


def test_pass_manager_rejects_pass_that_breaks_topological_order():
    gm = trace(matmul_relu, (3, 4), (4, 5))
    records: list[PassRecord] = []
    with pytest.raises(fsc.PassFailedError) as info:
        fsc.PassManager([ReluBeforeMatmul()]).run(gm, ctx(), records)
    assert info.value.pass_name == "relu-before-matmul"
    assert "pass 'relu-before-matmul' failed" in str(info.value)
    assert "'mm'" in str(info.value) and "'relu'" in str(info.value)  # lint names both nodes
    assert "\n" not in str(info.value)  # not the whole graph lint appends to its message
    assert info.value.__cause__ is not None
    assert records[0].error is not None and records[0].error in str(info.value)


# --------------------------------------------------------------- collective invariants


def test_pass_manager_rejects_undeclared_collective_reordering():
    gm = trace(two_exchanges_one_group, (4, 3), (4, 3))
    with pytest.raises(fsc.InvariantError) as info:
        fsc.PassManager([SwapCollectives()]).run(gm, ctx())
    message = str(info.value)
    assert info.value.pass_name == "swap-collectives"
    assert "pass 'swap-collectives' failed" in message
    assert "'g0'" in message and "reorders_collectives" in message
    assert "['all_to_all_single', 'all_to_all_single_1']" in message
    assert "['all_to_all_single_1', 'all_to_all_single']" in message


def test_pass_manager_accepts_declared_deterministic_collective_reordering():
    gm = trace(two_exchanges_one_group, (4, 3), (4, 3))
    (record,) = fsc.PassManager([DeclaredSwapCollectives()]).run(gm, ctx())
    assert record.modified is True and record.error is None
    assert record.stats == {"inserted": 0, "erased": 0, "moved": 1}
    assert [n.name for n in collectives(gm)] == ["all_to_all_single_1", "all_to_all_single"]
    gm.graph.lint()


def test_pass_manager_rejects_non_deterministic_collective_reordering():
    gm = trace(two_exchanges_one_group, (4, 3), (4, 3))
    flaky = FlakySwapCollectives()
    with pytest.raises(fsc.InvariantError) as info:
        fsc.PassManager([flaky]).run(gm, ctx())
    assert info.value.pass_name == "flaky-swap-collectives"
    assert "deterministic" in str(info.value)
    assert len(flaky.calls) == 2  # the manager re-ran the pass to compare


def test_pass_manager_allows_reordering_collectives_of_different_groups_without_declaration():
    gm = trace(two_exchanges_two_groups, (4, 3), (4, 3))
    (record,) = fsc.PassManager([SwapCollectives()]).run(gm, ctx())
    assert record.modified is True
    assert [n.name for n in collectives(gm)] == ["all_to_all_single_1", "all_to_all_single"]


def test_pass_manager_rejects_undeclared_collective_removal():
    gm = trace(exchange_plus, (4, 3), (4, 3))
    with pytest.raises(fsc.InvariantError) as info:
        fsc.PassManager([DropExchange()]).run(gm, ctx())
    message = str(info.value)
    assert info.value.pass_name == "drop-exchange"
    assert "removed ['all_to_all_single']" in message
    assert "rewrites_collectives" in message


def test_pass_manager_accepts_declared_collective_removal():
    gm = trace(exchange_plus, (4, 3), (4, 3))
    (record,) = fsc.PassManager([DeclaredDropExchange()]).run(gm, ctx())
    assert record.modified is True
    assert record.stats == {"inserted": 0, "erased": 2, "moved": 0}
    assert collectives(gm) == []
    assert names(gm) == ["add"]


def test_pass_manager_accepts_collective_replaced_with_its_identity_kept():
    gm = trace(exchange_plus, (4, 3), (4, 3))
    (record,) = fsc.PassManager([RebuildExchange()]).run(gm, ctx())
    assert record.modified is True
    (coll,) = collectives(gm)
    assert coll.name != "all_to_all_single"
    assert coll.meta[COLLECTIVE_ID] == "all_to_all_single"


def test_pass_manager_rejects_collective_replaced_without_its_identity():
    gm = trace(exchange_plus, (4, 3), (4, 3))
    with pytest.raises(fsc.InvariantError, match="pass 'rebuild-exchange' failed: added .* removed"):
        fsc.PassManager([RebuildExchange(keep_identity=False)]).run(gm, ctx())


def test_pass_manager_rejects_pass_that_drops_a_wait():
    gm = trace(exchange_plus, (4, 3), (4, 3))
    expected = "pass 'drop-wait' failed: collective all_to_all_single lost its wait_tensor"
    with pytest.raises(fsc.InvariantError, match=expected):
        fsc.PassManager([DropWait()]).run(gm, ctx())


# ------------------------------------------------------------------------ memory budget


def test_pass_manager_rejects_pass_raising_peak_memory_above_budget():
    gm = trace(two_temporaries, (64, 64))
    budget = peak_memory(gm.graph)
    with pytest.raises(fsc.InvariantError) as info:
        fsc.PassManager([HoistSecondTemporary()]).run(gm, ctx(budget=budget))
    message = str(info.value)
    assert info.value.pass_name == "hoist-second-temporary"
    assert "peak memory" in message and "budget" in message


def test_pass_manager_accepts_peak_memory_rise_within_budget_or_without_budget():
    buffer = 64 * 64 * 4
    for budget in (None, 3 * buffer + 64):
        gm = trace(two_temporaries, (64, 64))
        before = peak_memory(gm.graph)
        (record,) = fsc.PassManager([HoistSecondTemporary()]).run(gm, ctx(budget=budget))
        assert record.modified is True
        # x, a and b are live together now, and sum(a) (4 bytes) is made while they are
        assert peak_memory(gm.graph) == 3 * buffer + 4 > before


# ------------------------------------------------------------------------------ records


def test_pass_record_of_unmodifying_pass_has_no_graph_after():
    gm = trace(matmul_relu, (3, 4), (4, 5))
    code = gm.code
    (record,) = fsc.PassManager([NoOp()]).run(gm, ctx())
    assert record.name == "no-op" and record.spec == "no-op"
    assert record.modified is False
    assert record.stats == {"looked_at": len(gm.graph.nodes)}
    assert record.reasons == ("nothing to do here",)
    assert record.seconds >= 0.0
    assert record.graph_after is None
    assert record.error is None
    assert gm.code == code


def test_pass_record_of_modifying_pass_holds_the_graph_after():
    gm = trace(two_temporaries, (4, 4))
    records: list[PassRecord] = []
    out = fsc.PassManager([NoOp(), HoistSecondTemporary()]).run(gm, ctx(), records)
    assert out is records
    first, second = records
    assert first.graph_after is None
    assert second.modified is True
    assert second.stats == {"inserted": 0, "erased": 0, "moved": 1}
    assert second.reasons == ()
    assert second.seconds >= 0.0
    assert isinstance(second.graph_after, str)
    text = second.graph_after
    assert text.index("mul_1 =") < text.index("sum_1 =")
    # the module was recompiled to the new order
    assert gm.code.index("mul_1 =") < gm.code.index("sum_1 =")
    assert names(gm) == ["mul", "mul_1", "sum_1", "sum_2", "add"]


def test_pass_manager_stamps_collective_identities():
    gm = trace(two_exchanges_one_group, (4, 3), (4, 3))
    fsc.PassManager([]).run(gm, ctx())
    assert [n.meta[COLLECTIVE_ID] for n in collectives(gm)] == ["all_to_all_single", "all_to_all_single_1"]


# ----------------------------------------------------------------------------- registry


def test_registered_pass_names_are_kebab_case_module_names():
    assert len(REGISTRY) > 0
    for name, cls in REGISTRY.items():
        assert re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name), name
        assert cls.name == name
        module = cls.__module__
        assert module.startswith("fsc.passes."), module
        assert module.rsplit(".", 1)[-1].replace("_", "-") == name
        assert pathlib.Path(inspect.getfile(cls)).stem.replace("_", "-") == name
        # and a pipeline string of that name builds that class
        assert parse_pipeline(name) == (cls(),)


def test_every_module_under_passes_is_a_registered_pass():
    folder = pathlib.Path(inspect.getfile(REGISTRY["overlap-schedule"])).parent
    modules = {p.stem.replace("_", "-") for p in folder.glob("*.py")} - {"--init--", "base"}
    assert modules == set(REGISTRY)


def test_registered_passes_are_frozen_dataclasses_documenting_matches_changes_safe_because():
    for name, cls in REGISTRY.items():
        assert "__dataclass_params__" in vars(cls) and cls.__dataclass_params__.frozen, name
        # one pass per module: the module docstring is the pass's documentation
        doc = sys.modules[cls.__module__].__doc__ or ""
        assert doc.startswith(f"``{name}``: "), name
        for heading in ("**Matches**", "**Changes**", "**Safe because**"):
            assert heading in doc, f"{name}: no {heading} in its docstring"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_pass_rejects_an_unknown_option_naming_pass_and_option(name):
    with pytest.raises(fsc.PipelineError) as info:
        parse_pipeline(f"{name}{{no_such_option=1}}")
    assert f"pass {name!r} has no option 'no_such_option'" in str(info.value)


def test_registry_default_pipeline_is_the_passes_not_opt_in_in_registry_order():
    opt_in = type("OptIn", (NoOp,), {"name": "opt-in", "in_default_pipeline": False})
    registry = PassRegistry([opt_in, NoOp, Tunable])
    assert registry.default_pipeline() == (NoOp(), Tunable())
    assert list(registry) == ["opt-in", "no-op", "tunable"]
    assert parse_pipeline("tunable,opt-in", registry) == (Tunable(), opt_in())


def _pass_class(pass_name: str) -> type[Pass]:
    return type("P", (Pass,), {"name": pass_name})


def test_pass_registry_rejects_duplicate_names():
    with pytest.raises(ValueError, match="two passes are named 'same-name'"):
        PassRegistry([_pass_class("same-name"), _pass_class("other"), _pass_class("same-name")])


@pytest.mark.parametrize("bad", ["", "Overlap-schedule", "overlap_schedule", "-x", "x-", "a--b", "9lives", "a b"])
def test_pass_registry_rejects_non_kebab_names(bad):
    with pytest.raises(ValueError, match="not kebab-case"):
        PassRegistry([_pass_class(bad)])


def test_pass_registry_unknown_lookup_lists_registered_passes():
    with pytest.raises(fsc.PipelineError) as info:
        REGISTRY["no-such-pass"]
    assert "'no-such-pass'" in str(info.value)
    for name in REGISTRY:
        assert name in str(info.value)
    with pytest.raises(fsc.PipelineError, match=r"registered passes: \(none\)"):
        PassRegistry([])["x"]


def test_pass_registry_membership_test_is_false_for_unknown_name():
    # PassRegistry is a Mapping: `in` and `.get` must answer, not raise.
    assert "overlap-schedule" in REGISTRY
    assert "no-such-pass" not in REGISTRY
    assert REGISTRY.get("no-such-pass") is None


def test_parse_pipeline_uses_the_given_registry_even_when_empty():
    mine = PassRegistry([NoOp])
    assert parse_pipeline("no-op", mine) == (NoOp(),)
    with pytest.raises(fsc.PipelineError, match="'overlap-schedule'"):
        parse_pipeline("overlap-schedule", mine)
    with pytest.raises(fsc.PipelineError, match="'overlap-schedule'"):
        parse_pipeline("overlap-schedule", PassRegistry([]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tunable(Pass):
    name = "tunable"
    count: int = 1
    label: str = "x"
    ratio: float | None = 0.5
    sizes: tuple = ()

    def run(self, gm, ctx):
        return PassResult(modified=False)


def test_parse_pipeline_converts_options_to_declared_field_types():
    registry = PassRegistry([Tunable])
    (p,) = parse_pipeline("tunable{count=3,label=hello,ratio=none}", registry)
    assert p == Tunable(count=3, label="hello", ratio=None)
    assert isinstance(p.count, int)
    assert p.spec() == "tunable{count=3,label=hello,ratio=none}"
    assert parse_pipeline(p.spec(), registry) == (p,)
    (q,) = parse_pipeline("tunable{ratio=2}", registry)
    assert q.ratio == 2.0 and isinstance(q.ratio, float)
    assert q.spec() == "tunable{ratio=2.0}"
    assert Tunable().spec() == "tunable"


def test_parse_pipeline_rejects_value_not_of_declared_type():
    with pytest.raises(fsc.PipelineError, match=r"pass 'tunable': option count='2\.5' is not a valid int"):
        parse_pipeline("tunable{count=2.5}", PassRegistry([Tunable]))


def test_parse_pipeline_rejects_option_of_unsupported_type():
    with pytest.raises(fsc.PipelineError, match="pass 'tunable': option 'sizes' has unsupported type"):
        parse_pipeline("tunable{sizes=1}", PassRegistry([Tunable]))


def test_base_pass_run_is_abstract():
    gm = trace(matmul_relu, (3, 4), (4, 5))
    with pytest.raises(NotImplementedError):
        Pass().run(gm, ctx())


# ----------------------------------------------------------------------------- rewriter


def test_rewriter_counts_moves_inserts_and_erases():
    gm = trace(two_temporaries, (4, 4))
    graph = gm.graph
    rewriter = GraphRewriter(graph)
    assert rewriter.modified is False
    assert rewriter.move_after(node(gm, "mul_1"), node(gm, "mul")) is True
    assert rewriter.move_before(node(gm, "sum_2"), node(gm, "sum_1")) is True
    neg = rewriter.insert_before(node(gm, "add"), torch.ops.aten.neg.default, (node(gm, "sum_2"),), meta={"tag": 1})
    assert neg.meta["tag"] == 1
    assert neg.next is node(gm, "add")
    rewriter.replace(neg, node(gm, "sum_2"))  # replace erases: counted once
    assert rewriter.stats() == {"inserted": 1, "erased": 1, "moved": 2}
    assert rewriter.modified is True
    assert names(gm) == ["mul", "mul_1", "sum_2", "sum_1", "add"]
    graph.lint()


def test_rewriter_erase_alone_is_a_modification():
    gm = trace(lambda x: (x.relu(), x.neg())[0], (4,))
    rewriter = GraphRewriter(gm.graph)
    rewriter.erase(node(gm, "neg"))
    assert rewriter.modified is True
    assert rewriter.stats() == {"inserted": 0, "erased": 1, "moved": 0}
    assert names(gm) == ["relu"]


def test_rewriter_no_op_moves_do_not_count():
    gm = trace(two_temporaries, (4, 4))
    before = names(gm)
    rewriter = GraphRewriter(gm.graph)
    mul, sum_1 = node(gm, "mul"), node(gm, "sum_1")
    assert rewriter.move_before(mul, sum_1) is False  # already just before
    assert rewriter.move_after(sum_1, mul) is False  # already just after
    assert rewriter.move_before(mul, mul) is False
    assert rewriter.move_after(mul, mul) is False
    assert rewriter.modified is False
    assert rewriter.moves == 0
    assert names(gm) == before


def test_rewriter_try_move_after_reverts_and_does_not_count_when_rejected():
    gm = trace(two_temporaries, (4, 4))
    before = [n.name for n in gm.graph.nodes]
    rewriter = GraphRewriter(gm.graph)
    seen: list[list[str]] = []

    def reject() -> bool:
        seen.append(names(gm))
        return False

    assert rewriter.try_move_after(node(gm, "mul_1"), node(gm, "mul"), reject) is False
    assert seen == [["mul", "mul_1", "sum_1", "sum_2", "add"]]  # accept saw the moved graph
    assert [n.name for n in gm.graph.nodes] == before
    assert rewriter.moves == 0 and rewriter.modified is False
    gm.graph.lint()


def test_rewriter_try_move_after_reverts_the_first_node():
    gm = trace(two_temporaries, (4, 4))
    before = [n.name for n in gm.graph.nodes]
    rewriter = GraphRewriter(gm.graph)
    first = next(iter(gm.graph.nodes))
    assert rewriter.try_move_after(first, node(gm, "sum_1"), lambda: False) is False
    assert [n.name for n in gm.graph.nodes] == before
    assert rewriter.moves == 0


def test_rewriter_try_move_after_keeps_and_counts_accepted_move():
    gm = trace(two_temporaries, (4, 4))
    rewriter = GraphRewriter(gm.graph)
    assert rewriter.try_move_after(node(gm, "mul_1"), node(gm, "mul"), lambda: True) is True
    assert names(gm) == ["mul", "mul_1", "sum_1", "sum_2", "add"]
    assert rewriter.moves == 1 and rewriter.modified is True


def test_rewriter_try_move_after_skips_accept_for_no_op_move():
    gm = trace(two_temporaries, (4, 4))
    rewriter = GraphRewriter(gm.graph)
    calls: list[None] = []
    assert rewriter.try_move_after(node(gm, "sum_1"), node(gm, "mul"), lambda: calls.append(None) or True) is False
    assert calls == []
    assert rewriter.modified is False
