"""FLOP formulas of the attention ops: what fsc's cost model (and FlopCounterMode users)
count for ``fsc::jagged_attention_fwd/bwd``, which are opaque nodes in CPU aten graphs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import flop_registry

import fsc.kernels  # noqa: F401  (registers the ops and their formulas)
from fsc.analysis.cost_model import DEVICE_PROFILES, CostModel


def _args(t: int, h: int, d: int, dv: int, causal: bool):
    q, k, v = torch.empty(t, h, d), torch.empty(t, h, d), torch.empty(t, h, dv)
    offsets = torch.tensor([0, t])
    tail = (None, None, None, None, t, False, 1.0, causal, 0, 0, "reference")
    return q, k, v, offsets, tail


@pytest.mark.parametrize("causal", [True, False])
def test_forward_and_backward_flops_count_pairs_times_head_dims(causal):
    t, h, d, dv = 10, 3, 16, 32
    q, k, v, offsets, tail = _args(t, h, d, dv, causal)
    pairs2 = t * t if causal else 2 * t * t  # twice the visited (query, key) pairs
    fwd = flop_registry[torch.ops.fsc.jagged_attention_fwd]
    out = (torch.empty(t, h, dv), torch.empty(0))
    assert fwd(q, k, v, offsets, *tail, out_val=out) == pairs2 * h * (d + dv)
    bwd = flop_registry[torch.ops.fsc.jagged_attention_bwd]
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty(0), torch.empty(0))
    got = bwd(torch.empty(t, h, dv), q, k, v, torch.empty(t, h, dv), torch.empty(0), offsets, *tail, out_val=grads)
    assert got == pairs2 * h * (3 * d + 2 * dv)


def test_cost_model_counts_the_opaque_op_as_compute():
    from torch.fx.experimental.proxy_tensor import make_fx

    t, h, d = 64, 2, 32

    def f(q, k, v, offsets):
        return torch.ops.fsc.jagged_attention_fwd(q, k, v, offsets, None, None, None, None, t, False, 1.0, True, 0, 0,
                                                  "reference")[0]

    inputs = (torch.randn(t, h, d), torch.randn(t, h, d), torch.randn(t, h, d), torch.tensor([0, t]))
    gm = make_fx(f, tracing_mode="fake")(*inputs)
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and "jagged_attention_fwd" in str(n.target))
    cost = CostModel(DEVICE_PROFILES["h100"]).node_cost(node)
    assert cost.flops == t * t * h * (d + d)
