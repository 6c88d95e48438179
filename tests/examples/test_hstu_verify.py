"""verify=True on the HSTU example, sharded on 2 gloo ranks with every pass on (lower-attention,
prioritize-, split-, overlap-schedule, the SM-free swap): the pre-grad, forward and backward
graphs are checked on the first call's real inputs, and each of four injected value-changing
bugs is caught before the compiled code runs, naming the pass that carries it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx
from dist_harness import run_ranks
from test_hstu_attention_lowering import lowering_config, randomised
from test_hstu_model import step_inputs

import fsc
from fsc.passes import LowerAttention, OverlapSchedule, PrioritizeCollectives, SmFreeCollectives, SplitCollectives

pytestmark = pytest.mark.ranks

aten = torch.ops.aten


def _scale_after(gm: fx.GraphModule, target, factor: float) -> None:
    """Multiply the first ``target`` node's result by ``factor`` for all its users."""
    node = next(n for n in gm.graph.nodes if n.target is target)
    with gm.graph.inserting_after(node):
        scaled = gm.graph.call_function(aten.mul.Tensor, (node, factor))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)


def _flip_first_lookup(gm: fx.GraphModule) -> None:
    """Reverse the ids of the first embedding lookup (a wrong permutation of indices)."""
    node = next(n for n in gm.graph.nodes if n.target is aten.embedding.default)
    with gm.graph.inserting_before(node):
        flipped = gm.graph.call_function(aten.flip.default, (node.args[1], [0]))
    node.args = (node.args[0], flipped, *node.args[2:])


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuggyOverlapSchedule(OverlapSchedule):
    """overlap-schedule (same name) with one injected bug in the graph kind it names."""

    bug: str = "none"

    def run(self, gm: fx.GraphModule, ctx: fsc.PassContext) -> fsc.PassResult:
        result = super().run(gm, ctx)
        if self.bug == "forward-matmul" and ctx.graph_kind == "forward":
            _scale_after(gm, aten.addmm.default, 1 + 1e-3)
        elif self.bug == "backward-matmul" and ctx.graph_kind == "backward":
            _scale_after(gm, aten.mm.default, 1.01)
        elif self.bug == "flipped-index" and ctx.graph_kind == "forward":
            _flip_first_lookup(gm)
        else:
            return result
        return dataclasses.replace(result, modified=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuggyLowerAttention(LowerAttention):
    """lower-attention (same name) whose rewrite scales the kernel's queries by 1 + 1e-3."""

    def run(self, gm: fx.GraphModule, ctx: fsc.PassContext) -> fsc.PassResult:
        result = super().run(gm, ctx)
        node = next(n for n in gm.graph.nodes if n.target is torch.ops.fsc.jagged_attention_fwd.default)
        with gm.graph.inserting_before(node):
            scaled = gm.graph.call_function(torch.mul, (node.args[0], 1 + 1e-3))
        node.args = (scaled, *node.args[1:])
        return result


BUGS = ("none", "forward-matmul", "backward-matmul", "flipped-index", "pre-grad")


def _pipeline(bug: str) -> list[fsc.Pass]:
    lower = BuggyLowerAttention() if bug == "pre-grad" else LowerAttention()
    overlap = BuggyOverlapSchedule(bug=bug if bug != "pre-grad" else "none")
    # split-collectives' default min_bytes skips this small model's exchanges: force it
    return [lower, PrioritizeCollectives(), SplitCollectives(min_bytes=0, force=True), overlap, SmFreeCollectives()]


def _verify_with_bugs(rank: int, world: int) -> dict[str, dict]:
    import torch.distributed as dist

    from examples.hstu.model import HSTU, mark_dynamic

    torch._dynamo.config.capture_scalar_outputs = True
    cfg = dataclasses.replace(lowering_config(), sharded=True)
    out = {}
    for bug in BUGS:
        torch._dynamo.reset()
        model = randomised(HSTU(cfg))
        compiled = torch.compile(model, backend="freescale", options={"inner": "eager", "verify": True,
                                                                     "passes": _pipeline(bug)}, fullgraph=True)
        inputs, _, _ = step_inputs(0, rank, world, cfg)
        mark_dynamic(inputs)
        caught, where = None, "forward call"
        try:
            loss = compiled(*inputs)
            where = "backward call"
            loss.backward()
        except fsc.VerificationError as exc:
            caught = (exc.pass_name, str(exc))
        notes = {} if caught else {k: g.notes for k, g in fsc.last_compile().graphs().items()}
        out[bug] = {"caught": caught, "where": where, "notes": notes}
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def bug_results():
    return run_ranks(_verify_with_bugs, 2, timeout=600)


def test_verify_checks_every_graph_of_the_sharded_example_on_real_inputs(bug_results):
    for rank_results in bug_results:
        clean = rank_results["none"]
        assert clean["caught"] is None, clean
        assert set(clean["notes"]) == {"pre-grad", "forward", "backward"}
        for kind, notes in clean["notes"].items():
            verified = [n for n in notes if n.startswith("verified on the first call's inputs")]
            assert len(verified) == 1, (kind, notes)
            assert not any("could not" in n for n in notes), (kind, notes)
        assert "lower-attention" in clean["notes"]["pre-grad"][-1] and "input gradients" in clean["notes"]["pre-grad"][-1]
        for kind in ("forward", "backward"):  # every rewriting pass was checked, the SM-free swap too
            verified = next(n for n in clean["notes"][kind] if n.startswith("verified"))
            assert all(p in verified for p in ("split-collectives", "overlap-schedule", "sm-free-collectives")), verified


@pytest.mark.parametrize(("bug", "pass_name", "where", "graph"), [
    ("forward-matmul", "overlap-schedule", "forward call", "the forward graph"),
    ("backward-matmul", "overlap-schedule", "backward call", "the backward graph"),
    ("flipped-index", "overlap-schedule", "forward call", "the forward graph"),
    ("pre-grad", "lower-attention", "forward call", "the pre-grad graph"),
])
def test_verify_catches_each_injected_bug_on_both_ranks(bug_results, bug, pass_name, where, graph):
    for rank_results in bug_results:
        result = rank_results[bug]
        assert result["caught"] is not None, (bug, result)
        caught_pass, message = result["caught"]
        assert caught_pass == pass_name, message
        assert result["where"] == where, message
        assert f"changed the values of {graph}" in message and "first call's inputs" in message, message
