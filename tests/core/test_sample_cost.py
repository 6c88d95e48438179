"""Per-sample cost from compiled graphs: a polynomial in the length with the terms the
model's maths says, available from the compile record."""

from __future__ import annotations

import pytest
import sympy
import torch

import fsc
from fsc.analysis.sample_cost import L, sample_cost


def attention_like(x, w):
    scores = x @ x.t()  # L x L: the quadratic term
    return (torch.softmax(scores, -1) @ (x @ w)).sum()


def test_sample_cost_is_a_polynomial_in_the_length_with_the_attention_term():
    fn = torch.compile(attention_like, backend="freescale", options={"inner": "eager"})
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)
    torch._dynamo.mark_dynamic(x, 0)
    fn(x, w).backward()
    cost = fsc.last_compile().sample_cost()
    poly = cost.flops_polynomial()
    assert poly.degree() == 2
    # forward: x x^T is 2*16*L^2 FLOPs and softmax(...) @ (x w) another 2*16*L^2; backward twice that
    assert poly.coeff_monomial(L**2) == 3 * (2 * 16 + 2 * 16)
    assert cost(20) > cost(10) > 0
    assert list(cost.evaluate([10, 20])) == pytest.approx([cost(10), cost(20)])


def test_sample_cost_rejects_graphs_with_several_size_symbols():
    a, b = sympy.symbols("s0 s1")
    costs = [fsc.analysis.cost_model.GraphCost(flops=a * b, nbytes=a, seconds=a + b, ops=1)]
    with pytest.raises(ValueError, match=r"size symbols \['s0', 's1'\]"):
        sample_cost(costs)
    with pytest.raises(ValueError, match=r"sizes \['s1'\] besides the length 's0'"):
        sample_cost(costs, symbol="s0")
    with pytest.raises(ValueError, match="'s9' is not among"):
        sample_cost(costs, symbol="s9")


def test_sample_cost_needs_compiled_graphs():
    with pytest.raises(ValueError, match="no graph costs"):
        sample_cost([])


def linear_only(x, w):
    return (torch.relu(x @ w) @ w.t()).sum()  # per token: no token meets another


@pytest.mark.parametrize("fn,refused", [(attention_like, True), (linear_only, False)])
def test_split_refusal_names_the_node_that_mixes_a_samples_tokens(fn, refused, caplog):
    from fsc.runtime.balancer import Balancer

    compiled = torch.compile(fn, backend="freescale", options={"inner": "eager"})
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)
    torch._dynamo.mark_dynamic(x, 0)
    compiled(x, w).backward()
    record = fsc.last_compile()
    reason = record.split_refusal()
    if refused:
        assert reason is not None and "splitting samples across ranks is refused" in reason
        assert "aten.mm.default" in reason and "**2" in reason, reason
    else:
        assert reason is None
    # the balancer built from the compile cuts samples only where the graphs can run chunks
    with caplog.at_level("WARNING", logger="fsc.runtime.balancer"):
        balancer = Balancer.from_compile(record, ranks=4, split=True)
    assert balancer.split is (not refused) and balancer.split_refused == reason
    assert ("balancing whole samples" in caplog.text) is refused
    assert Balancer.from_compile(record, ranks=4).split is False  # not asked: never split
    torch._dynamo.reset()
