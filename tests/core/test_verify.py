"""fsc.verify on small graphs: the chain kept while passes run is checked on the first call's
inputs only, gradients are compared for pre-grad graphs, a graph that cannot be checked
raises (or warns with verify="warn"), and a fallback leaves nothing to check."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import fsc
from fsc.verify import CheckedOnFirstCall, Verifier


def traced(fn) -> fx.GraphModule:
    return fx.symbolic_trace(fn)


def relu(x):
    return torch.relu(x)


def relu_with_wrong_grad(x):
    # the same values as relu, but the gradient gains 0.01 * cotangent everywhere
    return torch.relu(x) + (x - x.detach()) * 0.01


def positive_only(x):
    if not bool((x > 0).all()):
        raise ValueError("inputs must be positive")
    return x


torch.fx.wrap("positive_only")  # a leaf of the traced graph: it checks at run time


def checks_positive(x):
    return positive_only(x) * 2


def test_gradient_only_change_is_caught_when_gradients_are_checked():
    x = torch.randn(8, requires_grad=True)
    for with_grads, caught in ((False, False), (True, True)):
        notes: list[str] = []
        verifier = Verifier("pre-grad", notes, with_grads=with_grads)
        verifier(traced(relu), traced(relu_with_wrong_grad), "bad-backward", (1e-4, 1e-6))
        if caught:
            with pytest.raises(fsc.VerificationError, match="input gradients") as info:
                verifier.check([x])
            assert info.value.pass_name == "bad-backward"
        else:  # the values alone agree: only the gradient check sees it
            verifier.check([x])
            assert notes and notes[0].startswith("verified on the first call's inputs")
    assert x.grad is None  # the check differentiates copies, never the caller's tensors


def test_check_runs_once_and_only_on_the_first_call():
    calls = []
    notes: list[str] = []
    verifier = Verifier("forward", notes)
    verifier(traced(relu), traced(relu), "noop")

    def compiled(args):
        calls.append(len(args))
        return [torch.relu(args[0])]

    wrapped = CheckedOnFirstCall(compiled, verifier, boxed=True)
    assert wrapped._boxed_call
    for _ in range(3):
        wrapped([torch.randn(4)])
    assert calls == [1, 1, 1] and len(notes) == 1 and not verifier.pending


def test_unverifiable_graph_raises_by_default_and_warns_when_asked(caplog):
    bad = torch.tensor([-1.0, 2.0])
    verifier = Verifier("forward", [])
    verifier(traced(checks_positive), traced(checks_positive), "noop")
    with pytest.raises(fsc.UnverifiedError, match="before the passes raised on the first call's inputs"):
        CheckedOnFirstCall(lambda x: x, verifier, boxed=False)(bad)

    notes: list[str] = []
    verifier = Verifier("forward", notes, mode="warn")
    verifier(traced(checks_positive), traced(checks_positive), "noop")
    with pytest.warns(RuntimeWarning, match="verify could not check"):
        assert torch.equal(CheckedOnFirstCall(lambda x: x + 1, verifier, boxed=False)(bad), bad + 1)  # then runs the code
    assert notes and "noop unverified" in notes[0]
    assert any("verify could not check" in r.getMessage() for r in caplog.records)


def test_a_pass_that_makes_the_graph_raise_is_named():
    verifier = Verifier("forward", [])
    verifier(traced(relu), traced(checks_positive), "picky")
    with pytest.raises(fsc.VerificationError, match="made the forward graph raise") as info:
        verifier.check([torch.tensor([-1.0, 1.0])])
    assert info.value.pass_name == "picky"


def test_fallback_discards_the_chain_with_a_note():
    notes: list[str] = []
    verifier = Verifier("forward", notes)
    verifier(traced(relu), traced(relu_with_wrong_grad), "whatever")
    verifier.discard("the graph compiles unrewritten")
    assert not verifier.pending and notes == ["verify: nothing to check, the graph compiles unrewritten"]
    verifier.check([torch.randn(3)])  # nothing runs
