"""Golden printouts: every pass on one small graph, the graph before and after compared as
text with ``tests/passes/golden/<case>.txt`` (in the manner of xDSL's filecheck tests).

The graphs come from the helpers of each pass's own tests (pytest puts this folder on
``sys.path``, so the sibling test modules import by name); the pass runs under the
PassManager, so lint and the invariant checks run too. A pass that changes what it emits
fails here with a diff. When the change is intended, rerun with ``FSC_UPDATE_GOLDEN=1``
(this file only) and review the diff of the ``.txt`` files.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from test_overlap_schedule import ctx, dense_then_exchange, trace
from test_prioritize_collectives import late_then_urgent
from test_sm_free_collectives import overlapped
from test_split_collectives import inputs as lookup_inputs
from test_split_collectives import lookup_round_trip
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.node import _get_qualified_name

import fsc
from fsc.passes import (
    REGISTRY,
    LowerAttention,
    OverlapSchedule,
    PrioritizeCollectives,
    SmFreeCollectives,
    SplitCollectives,
)

GOLDEN = pathlib.Path(__file__).parent / "golden"
_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
           torch.int64: "i64", torch.int32: "i32", torch.bool: "b8"}


# ---------------------------------------------------------------------------- printout


class _Ref:
    """A node as an argument: its name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _type(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        return f"{_DTYPES.get(val.dtype, str(val.dtype))}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (list, tuple)):
        return f"({', '.join(_type(v) for v in val)})"
    if isinstance(val, (int, torch.SymInt)):
        return "int"
    return type(val).__name__


def _target(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}"
    if isinstance(node.target, str):
        return node.target
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)  # "aten.mm.default", "fsc.wait_tensor.default"
    return _get_qualified_name(node.target).replace("_operator.", "operator.")


def printout(gm: fx.GraphModule) -> str:
    """One line a node, in program order: ``name: type = target(args)``. Types are the
    nodes' fake values (dtype and shape); no strides, devices or source locations, so the
    text changes only when the graph does."""
    lines = []
    for node in gm.graph.nodes:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _Ref(n.name))
        parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        if node.op == "output":
            lines.append(f"return {', '.join(parts)}")
            continue
        val = node.meta.get("val", node.meta.get("example_value"))
        typed = "" if val is None else f": {_type(val)}"
        rhs = "input" if node.op == "placeholder" else f"{_target(node)}({', '.join(parts)})"
        lines.append(f"{node.name}{typed} = {rhs}")
    return "\n".join(lines) + "\n"


def run_and_print(case: str, gm: fx.GraphModule, p: fsc.Pass, context: fsc.PassContext) -> tuple[Any, str, str]:
    """Run ``p`` on ``gm``; return its record, the printout before and the golden text: a
    header (pass, graph, what the rewriter counted, why it declined), then both graphs."""
    before = printout(gm)
    (record,) = fsc.PassManager([p]).run(gm, context)
    counts = " ".join(f"{k}={record.stats[k]}" for k in ("inserted", "erased", "moved") if k in record.stats)
    head = [f"# {p.spec()} on {case}", f"# modified={record.modified} {counts}".rstrip()]
    head += [f"# declined: {reason}" for reason in record.reasons]
    return record, before, "\n".join(head) + "\n\n# before\n" + before + "\n# after\n" + printout(gm)


def assert_golden(case: str, text: str) -> None:
    path = GOLDEN / f"{case}.txt"
    if os.environ.get("FSC_UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"no golden file {path}; write it with FSC_UPDATE_GOLDEN=1 and review it")
    expected = path.read_text()
    if text != expected:
        diff = difflib.unified_diff(expected.splitlines(keepends=True), text.splitlines(keepends=True),
                                    f"golden/{case}.txt", "this run")
        pytest.fail("the pass's output differs from its golden printout:\n" + "".join(diff), pytrace=False)


def dynamo_graph(f: Any, *args: torch.Tensor) -> fx.GraphModule:
    """The torch-IR graph Dynamo hands a backend (what pre-grad passes see)."""
    graphs: list[fx.GraphModule] = []

    def capture(gm: fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    torch.compile(f, backend=capture, fullgraph=True)(*args)
    (gm,) = graphs
    return gm


def pre_grad_ctx() -> fsc.PassContext:
    return dataclasses.replace(ctx(), graph_kind="pre-grad")


# -------------------------------------------------------------------------- one per pass


def causal_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_lower_attention_replaces_causal_sdpa_with_the_jagged_kernel():
    gm = dynamo_graph(causal_sdpa, *(torch.randn(2, 2, 4, 16) for _ in range(3)))
    record, _, text = run_and_print("causal_sdpa", gm, LowerAttention(dense_on_cpu=True), pre_grad_ctx())
    assert record.modified is True
    assert_golden("lower_attention", text)


def test_prioritize_collectives_issues_the_urgently_needed_exchange_first():
    gm = trace(late_then_urgent, (64, 64), (64, 64), (64, 64))
    record, _, text = run_and_print("late_then_urgent", gm, PrioritizeCollectives(), ctx())
    assert record.modified is True
    assert_golden("prioritize_collectives", text)


def test_split_collectives_cuts_a_lookup_round_trip_into_chunks_joined_where_rows_mix():
    gm = make_fx(lookup_round_trip("g0"), tracing_mode="fake")(*lookup_inputs())
    record, _, text = run_and_print("lookup_round_trip", gm, SplitCollectives(min_bytes=0, force=True), ctx())
    assert record.modified is True
    assert_golden("split_collectives", text)


def test_overlap_schedule_issues_the_exchange_early_and_waits_after_independent_matmul():
    gm = trace(dense_then_exchange, (4, 8), (64, 64), (64, 64))
    record, _, text = run_and_print("dense_then_exchange", gm, OverlapSchedule(), ctx())
    assert record.modified is True
    assert_golden("overlap_schedule", text)


def test_sm_free_collectives_swaps_an_overlapped_all_to_all_and_its_wait_for_fsc_ops():
    gm = trace(overlapped, (64, 64), (64, 64))
    record, _, text = run_and_print("overlapped", gm, SmFreeCollectives(), ctx())
    assert record.modified is True
    assert_golden("sm_free_collectives", text)


def test_every_registered_pass_has_a_golden_printout():
    assert {p.stem.replace("_", "-") for p in GOLDEN.glob("*.txt")} == set(REGISTRY)


# ------------------------------------------------------------------------ nothing matches


def matmul_relu(a, b):
    return torch.mm(a, b).relu()


@pytest.mark.parametrize("name", list(REGISTRY))
def test_pass_that_finds_nothing_to_rewrite_reports_unmodified_and_leaves_the_graph(name):
    p = REGISTRY[name]()
    args = (torch.randn(4, 4), torch.randn(4, 4))
    if p.stage == "pre-grad":
        gm, context = dynamo_graph(matmul_relu, *args), pre_grad_ctx()
    else:
        gm, context = make_fx(matmul_relu, tracing_mode="fake")(*args), ctx()
    code = gm.code
    record, before, _ = run_and_print("matmul_relu", gm, p, context)
    assert record.modified is False
    assert record.graph_after is None
    assert printout(gm) == before
    assert gm.code == code
