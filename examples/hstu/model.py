"""HSTU (Zhai et al. 2024, "Actions Speak Louder than Words") on jagged batches.

A batch is jagged: the tokens of all sequences are concatenated (``[T, d]``) with
``offsets [B+1]``; per-token ``seq_ids`` and ``positions`` are computed on the host so
the graph has no data-dependent shapes besides the embedding exchange. Attention is
pointwise SiLU attention over a block-diagonal causal mask on the token axis (tokens
attend to earlier tokens of their own sequence only): nothing is padded to a maximum
length. Its cost is quadratic in the batch's token count; the jagged Triton kernel
(``fsc.kernels``) is what makes it linear in sequences.

One HSTU layer, with X the input [T, d]:

    U, V, Q, K = split(SiLU(Linear(LayerNorm(X))))
    A[h, i, j] = SiLU(Q_i . K_j + rab_h(i, j)) / N * mask(i, j)        (N = max_len)
    Y = X + Linear(LayerNorm(A V) * U)

rab is a learned per-head bias by clipped relative position plus one by log2-bucketed
timestamp difference. Training is next-item prediction with a sampled softmax over the
positive and K random negatives drawn uniformly from all items (shared by the tokens of
a rank), on L2-normalised embeddings with a temperature, as in the public HSTU setup.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from examples.hstu.sharded import RowShardedEmbedding


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HSTUConfig:
    num_items: int
    num_ratings: int = 10
    dim: int = 64
    heads: int = 2
    qk_dim: int = 32
    v_dim: int = 32
    layers: int = 2
    max_len: int = 200
    time_buckets: int = 32
    num_negatives: int = 128
    temperature: float = 0.05
    dropout: float = 0.0
    seed: int = 0
    sharded: bool = True
    """Shard the item table over the ranks (False: every rank holds it all)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class JaggedBatch:
    """Tokens of B sequences, concatenated. ``targets[t]`` is the next item after token t
    (0: none, not trained on)."""

    items: torch.Tensor
    ratings: torch.Tensor
    timestamps: torch.Tensor
    positions: torch.Tensor
    seq_ids: torch.Tensor
    targets: torch.Tensor
    offsets: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.items.shape[0])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.items, self.ratings, self.timestamps, self.positions, self.seq_ids, self.targets)


def collate(items: list[np.ndarray], ratings: list[np.ndarray], timestamps: list[np.ndarray],
            max_len: int, *, with_targets: bool = True) -> JaggedBatch:
    """Jagged batch of the most recent ``max_len`` interactions of each sequence.

    With targets, token t's target is the item at t+1 (so a sequence of n items yields
    n-1 tokens); without (evaluation), all items are inputs and targets are 0."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("items", "ratings", "timestamps", "positions", "seq_ids", "targets")}
    lengths = []
    for b, (it, ra, ts) in enumerate(zip(items, ratings, timestamps)):
        keep = max_len + 1 if with_targets else max_len
        it, ra, ts = it[-keep:], ra[-keep:], ts[-keep:]
        if with_targets:
            inputs, targets = it[:-1], it[1:]
            ra, ts = ra[:-1], ts[:-1]
        else:
            inputs, targets = it, np.zeros_like(it)
        n = len(inputs)
        lengths.append(n)
        cols["items"].append(inputs)
        cols["ratings"].append(ra)
        cols["timestamps"].append(ts)
        cols["positions"].append(np.arange(n))
        cols["seq_ids"].append(np.full(n, b))
        cols["targets"].append(targets)
    tensors = {k: torch.from_numpy(np.concatenate(v).astype(np.int64)) if v else torch.zeros(0, dtype=torch.int64)
               for k, v in cols.items()}
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0) if lengths else offsets[1:]
    return JaggedBatch(offsets=offsets, **tensors)


class HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.heads
        self.norm = nn.LayerNorm(cfg.dim)
        self.uvqk = nn.Linear(cfg.dim, h * (2 * cfg.v_dim + 2 * cfg.qk_dim))
        self.position_bias = nn.Embedding(cfg.max_len, h)
        self.time_bias = nn.Embedding(cfg.time_buckets, h)
        nn.init.zeros_(self.position_bias.weight)
        nn.init.zeros_(self.time_bias.weight)
        self.out_norm = nn.LayerNorm(h * cfg.v_dim)
        self.out = nn.Linear(h * cfg.v_dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rel_pos: torch.Tensor, time_bucket: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        h, dv, dqk = cfg.heads, cfg.v_dim, cfg.qk_dim
        tokens = x.shape[0]
        uvqk = F.silu(self.uvqk(self.norm(x)))
        u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        q = q.view(tokens, h, dqk)
        k = k.view(tokens, h, dqk)
        v = v.view(tokens, h, dv)
        scores = torch.einsum("thd,shd->hts", q, k)
        rab = (self.position_bias(rel_pos) + self.time_bias(time_bucket)).permute(2, 0, 1)
        attn = F.silu(scores + rab) / cfg.max_len * mask
        av = torch.einsum("hts,shd->thd", attn, v).reshape(tokens, h * dv)
        return x + self.dropout(self.out(self.out_norm(av) * u))


class HSTU(nn.Module):
    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        torch.manual_seed(cfg.seed)  # dense parameters: the same on every rank
        # id 0 is padding; ids 1..num_items are items
        self.item = RowShardedEmbedding(cfg.num_items + 1, cfg.dim, seed=cfg.seed + 1, sharded=cfg.sharded)
        self.rating = nn.Embedding(cfg.num_ratings, cfg.dim)
        self.position = nn.Embedding(cfg.max_len, cfg.dim)
        nn.init.normal_(self.rating.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.dim)

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("item.")]

    def _attention_inputs(self, positions, seq_ids, timestamps):
        same = seq_ids.unsqueeze(1) == seq_ids.unsqueeze(0)
        dist = positions.unsqueeze(1) - positions.unsqueeze(0)
        mask = (same & (dist >= 0)).to(torch.float32)
        rel_pos = dist.clamp(0, self.cfg.max_len - 1)
        # float64: log2 is exact on integer differences below 2**46 (float32 rounds up near 2**k, k >= 21)
        dt = (timestamps.unsqueeze(1) - timestamps.unsqueeze(0)).abs().to(torch.float64)
        time_bucket = torch.log2(dt + 1.0).floor().long().clamp(0, self.cfg.time_buckets - 1)
        return mask, rel_pos, time_bucket

    def encode(self, item_emb, ratings, timestamps, positions, seq_ids) -> torch.Tensor:
        x = item_emb + self.rating(ratings) + self.position(positions)
        mask, rel_pos, time_bucket = self._attention_inputs(positions, seq_ids, timestamps)
        for layer in self.layers:
            x = layer(x, mask, rel_pos, time_bucket)
        return F.normalize(self.final_norm(x), dim=-1)

    def forward(self, items, ratings, timestamps, positions, seq_ids, targets, negatives, loss_scale):
        """Sum of this rank's sampled-softmax losses divided by ``loss_scale`` (a 0-d
        tensor: the number of trained tokens over all ranks), so that summing gradients
        over ranks gives the gradient of the global mean."""
        # one sharded lookup for history, targets and negatives: one exchange each way
        emb = self.item(torch.cat([items, targets, negatives]))
        return self.loss(emb, items, ratings, timestamps, positions, seq_ids, targets, negatives, loss_scale)

    def loss(self, emb, items, ratings, timestamps, positions, seq_ids, targets, negatives, loss_scale):
        """The forward after its item lookup: ``emb`` holds the rows of ``cat([items, targets,
        negatives])`` (a model whose table lives elsewhere, e.g. TorchRec's, calls this)."""
        tokens = items.shape[0]
        hidden = self.encode(emb[:tokens], ratings, timestamps, positions, seq_ids)
        target_emb = F.normalize(emb[tokens : 2 * tokens], dim=-1)
        negative_emb = F.normalize(emb[2 * tokens :], dim=-1)
        positive = (hidden * target_emb).sum(-1, keepdim=True)
        negative = hidden @ negative_emb.t()
        negative = negative.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
        logits = torch.cat([positive, negative], dim=-1) / self.cfg.temperature
        per_token = F.cross_entropy(logits, torch.zeros_like(targets), reduction="none")
        return (per_token * (targets > 0)).sum() / loss_scale


def rank_metrics(scores: torch.Tensor, targets: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user hit@k and NDCG@k of ``targets`` under ``scores [users, items+1]`` (column 0,
    padding, never ranks). Rank = number of other items not scored strictly lower, so ties
    count against the target and a NaN score is a miss."""
    scores = scores.clone()
    scores[:, 0] = float("-inf")
    target_score = scores.gather(1, targets.unsqueeze(1))
    rank = (~(scores < target_score)).sum(1) - 1
    hit = (rank < k).to(torch.float64)
    ndcg = hit / torch.log2(rank.to(torch.float64) + 2.0)
    return hit, ndcg


def sample_negatives(num_items: int, count: int, seed: int, step: int, rank: int) -> torch.Tensor:
    """K negatives for one rank and step, uniform over all items, reproducible."""
    rng = np.random.default_rng([seed, step, rank, 1])
    return torch.from_numpy(rng.integers(1, num_items + 1, size=count).astype(np.int64))


def global_batch_users(num_users: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """The users of one step's global batch, the same on every rank."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(num_users, size=min(global_batch, num_users), replace=False)


def scale_tensor(count: float) -> torch.Tensor:
    return torch.tensor(float(max(count, 1.0)))

