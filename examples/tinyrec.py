"""Small models shared by the benchmarks, the demo and the tests.

``TinyRec`` is a sequential recommender in miniature: item embeddings, an all-to-all that
sends each rank's rows to their owner (equal splits), learned positions through an MLP
(independent of the all-to-all), causal softmax attention, an MLP and
a next-item loss. Without a process group (or with ``exchange=False``) it skips the
all-to-all.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


class TinyRec(nn.Module):
    def __init__(self, num_items: int = 512, dim: int = 32, max_length: int = 256, exchange: bool = True) -> None:
        super().__init__()
        self.item = nn.Embedding(num_items, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.position = nn.Embedding(max_length, dim)
        self.position_mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.exchange = exchange

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        x = self.item(ids)
        if self.exchange and dist.is_available() and dist.is_initialized():
            rows = x.reshape(batch * length, -1)
            rows = funcol.all_to_all_single_autograd(rows, None, None, dist.group.WORLD)
            x = rows.reshape(batch, length, -1)
        # Learned positions through an MLP: work that does not need the exchanged rows,
        # so a schedule can run it while the all-to-all is in flight.
        x = x + self.position_mlp(self.position.weight[:length])
        dense = self.mlp(self.norm(x))
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        h = x + self.proj(scores.softmax(-1) @ v) + dense
        logits = h[:, :-1] @ self.item.weight.t()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
