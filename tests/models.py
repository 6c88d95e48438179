"""Small models for end-to-end tests."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).square().mean()


def check_parity(make_model, inputs, options, *, fullgraph=True, rtol=1e-5, atol=1e-6):
    """Compile a fresh copy of the model; compare loss and every gradient with eager."""
    torch.manual_seed(0)
    eager = make_model()
    compiled_model = make_model()
    compiled_model.load_state_dict(eager.state_dict())
    ref = eager(*inputs)
    ref.backward()
    compiled = torch.compile(compiled_model, backend="freescale", options=options, fullgraph=fullgraph)
    out = compiled(*inputs)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    return out
