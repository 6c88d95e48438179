"""HSTU (Zhai et al. 2024, "Actions Speak Louder than Words") on jagged batches.

A batch is jagged: the tokens of all sequences are concatenated (``[T, d]``) with
``offsets [B+1]``; per-token ``seq_ids`` and ``positions`` and the attention layout are
computed on the host, so the graph has no data-dependent shapes besides the embedding
exchange. Everything per token (projections, norms, the loss) runs on the jagged tokens;
attention runs per sequence, in one of three forms (``HSTUConfig.attention``):

``padded`` (default)
    What generative-recommenders' PyTorch reference does: every sequence padded to the
    batch's longest (``[B, H, N, D]``), causal and padding masks. The form users write.
``jagged``
    Length-grouped: sequences sorted by length and cut into ``attention_groups`` groups
    (a small dynamic program minimises the padded work), each group padded to its own
    longest sequence. Same maths, less padding when lengths are skewed.
``kernel``
    fsc's jagged attention op (:func:`fsc.kernels.jagged_attention.jagged_attention`), one
    call per layer over all of a rank's sequences, with the model's bias tables. The one
    form that runs *chunks* of split samples (``Balancer(split=True)``, routed by
    :func:`examples.hstu.routing.route_batch`): inside each layer,
    :func:`fsc.runtime.routing.prefix_kv` brings a chunk the keys and values of its sample's
    earlier chunks from the ranks holding them (one autograd all-to-all per layer, plus one
    for the keys' timestamps per step; empty when nothing is split, so one compiled graph
    serves steps with and without splits), and the op attends with ``kv_offsets`` and
    ``q_start``. Head dims must be in the kernel's range (16..256).
``dense``
    NOT a form anyone writes: one ``[T, T]`` product over all of a rank's tokens with a
    block-diagonal causal mask, quadratic in the rank's token count. Kept because the
    ``lower-attention`` pass recognises it, and to reproduce earlier numbers; never a
    peer's form in a benchmark.

One HSTU layer, with X the input [T, d]:

    U, V, Q, K = split(SiLU(Linear(LayerNorm(X))))
    A[h, i, j] = SiLU(Q_i . K_j + rab_h(i, j)) / N * mask(i, j)        (N = max_len)
    Y = X + Linear(LayerNorm(A V) * U)

``HSTUConfig.mode``: ``hstu`` (above) or ``softmax``: ``A = softmax_j(Q_i . K_j / sqrt(qk_dim) +
rab_h(i, j))`` over the visible keys, SASRec-style (padded, jagged and kernel forms).

rab is a learned per-head bias by clipped relative position plus one by log2-bucketed
timestamp difference; every form computes it with the same tables and the same index
functions (:meth:`HSTU._relative_position`, :meth:`HSTU._time_bucket`). Training is
next-item prediction with a sampled softmax over the positive and K random negatives
per sample (every token of a sequence is scored against its own sequence's draw, keyed
by seed, step and the sample's key, so moving a sample to another rank never changes
its loss), on L2-normalised embeddings with a temperature, as in the public HSTU setup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from fsc.runtime.balancer import QuadraticCost
from fsc.runtime.embedding import RowShardedEmbedding
from fsc.kernels.jagged_attention import jagged_attention
from fsc.runtime.routing import PrefixExchange, prefix_kv, prefix_tokens

ATTENTION_FORMS = ("padded", "jagged", "kernel", "dense")
MODES = ("hstu", "softmax")


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
    num_negatives: int = 16
    """Sampled negatives per sample (sequence); a rank looks up this many times its samples."""
    temperature: float = 0.05
    dropout: float = 0.0
    seed: int = 0
    sharded: bool = True
    """Shard the item table over the ranks (False: every rank holds it all)."""
    attention: str = "padded"
    """padded, jagged, kernel or dense (see the module docstring)."""
    attention_groups: int = 4
    """Groups of the jagged form (a fixed count, so the compiled graph's inputs do not change)."""
    mode: str = "hstu"
    """hstu (SiLU, / max_len) or softmax attention (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_FORMS:
            raise ValueError(f"HSTUConfig.attention must be one of {', '.join(ATTENTION_FORMS)}, "
                             f"got {self.attention!r}")
        if self.mode not in MODES:
            raise ValueError(f"HSTUConfig.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "softmax" and self.attention == "dense":
            raise ValueError("HSTUConfig.mode='softmax' runs in the padded, jagged and kernel forms, not dense")
        if self.attention_groups < 1:
            raise ValueError(f"HSTUConfig.attention_groups must be >= 1, got {self.attention_groups}")
        if self.num_negatives < 1:
            raise ValueError(f"HSTUConfig.num_negatives must be >= 1, got {self.num_negatives}")


def sample_cost(cfg: HSTUConfig) -> QuadraticCost:
    """The balancer's per-sample cost for this model: forward FLOPs of one layer with
    per-sequence attention, ``a * L**2 + b * L`` (what a user passes as ``Balancer(cost=...)``).

    Per token: uvqk ``2*d*h*(2*v + 2*qk)`` and out ``2*h*v*d``; per causal pair (``L*(L+1)/2``
    of them) q.k ``2*h*qk`` and a.v ``2*h*v``, so ``a = h*(qk + v)`` and ``b = per token + a``
    (at the defaults: a = 128, b = 41088). Layers, backward (about 2x forward) and the
    device's speed scale every sample alike, so they do not change the assignment; the
    pointwise work (SiLU, norms, the relative bias) and the loss are left out. The padded
    form pads to the batch's longest sequence, which this per-sample sum does not see."""
    h, d, qk, v = cfg.heads, cfg.dim, cfg.qk_dim, cfg.v_dim
    a = float(h * (qk + v))
    return QuadraticCost(a=a, b=float(2 * d * h * (2 * v + 2 * qk) + 2 * h * v * d) + a)


#: :func:`sample_cost` at HSTUConfig's defaults (dim 64, 2 heads, qk_dim = v_dim = 32).
EXAMPLE_COST = QuadraticCost(a=128.0, b=41088.0)


@dataclasses.dataclass(kw_only=True, slots=True)
class JaggedBatch:
    """Tokens of B sequences, concatenated. ``targets[t]`` is the next item after token t
    (0: none, not trained on). Per sample: ``keys`` (who it is: the user id) and its
    ``negatives [B, K]`` (drawn for that key, so they travel with the sample)."""

    items: torch.Tensor
    ratings: torch.Tensor
    timestamps: torch.Tensor
    positions: torch.Tensor
    seq_ids: torch.Tensor
    targets: torch.Tensor
    offsets: torch.Tensor
    keys: torch.Tensor
    negatives: torch.Tensor
    exchange: PrefixExchange | None = None
    """Set by routing (``examples.hstu.routing.route_batch``): the pieces' key/value exchange;
    a piece may be a chunk of a split sample, whose ``positions`` are absolute."""
    global_tokens: int | None = None
    """Set by routing: the global batch's token count (a loss normalizer with no all-reduce)."""
    split: bool = False
    """Set by routing: the step's plan split some sample (on any rank), so every rank's
    model must run the ``kernel`` form; decided from the global plan, so all ranks agree."""

    @property
    def num_tokens(self) -> int:
        return int(self.items.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.items, self.ratings, self.timestamps, self.positions, self.seq_ids, self.targets)


def collate(items: list[np.ndarray], ratings: list[np.ndarray], timestamps: list[np.ndarray],
            max_len: int, *, with_targets: bool = True, keys: Sequence[int] | None = None,
            negatives: torch.Tensor | None = None) -> JaggedBatch:
    """Jagged batch of the most recent ``max_len`` interactions of each sequence.

    With targets, token t's target is the item at t+1 (so a sequence of n items yields
    n-1 tokens); without (evaluation), all items are inputs and targets are 0. ``keys``
    default to 0..B-1; ``negatives`` (``[B, K]``) default to none (``[B, 0]``)."""
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
    key_tensor = torch.as_tensor(np.asarray(keys if keys is not None else np.arange(len(lengths)), dtype=np.int64))
    if key_tensor.shape != (len(lengths),):
        raise ValueError(f"collate: {len(lengths)} sequences but keys of shape {tuple(key_tensor.shape)}")
    if negatives is None:
        negatives = torch.zeros(len(lengths), 0, dtype=torch.int64)
    if negatives.ndim != 2 or negatives.shape[0] != len(lengths):
        raise ValueError(f"collate: negatives must be [{len(lengths)}, K] (one row per sequence), "
                         f"got {tuple(negatives.shape)}")
    return JaggedBatch(offsets=offsets, keys=key_tensor, negatives=negatives, **tensors)


# ----------------------------------------------------------------------------- attention layout


def plan_groups(lengths: np.ndarray, groups: int) -> list[np.ndarray]:
    """The non-empty sequences in exactly ``groups`` groups of similar length (some may be
    empty), minimising the padded attention work ``sum max(2, rows) * max(2, longest)**2``
    (every group is at least 2 x 2: see :func:`attention_layout`). Contiguous in length order,
    solved exactly by dynamic programming."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] > 0]
    n = len(order)
    size = lengths[order]

    def cost(i: int, j: int) -> float:  # order[i:j] as one group
        rows = max(2, j - i)
        longest = max(2, int(size[j - 1])) if j > i else 2
        return float(rows * longest * longest)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for g in range(1, groups + 1):
        for j in range(n + 1):
            for i in range(j + 1):
                if best[g - 1][i] < inf and best[g - 1][i] + cost(i, j) < best[g][j]:
                    best[g][j], cut[g][j] = best[g - 1][i] + cost(i, j), i
    out, j = [], n
    for g in range(groups, 0, -1):
        i = cut[g][j]
        out.append(order[i:j])
        j = i
    return out[::-1]


def attention_layout(offsets: torch.Tensor, cfg: HSTUConfig,
                     exchange: PrefixExchange | None = None) -> tuple[torch.Tensor, ...]:
    """The host-side index tensors the model's attention form needs, appended to its inputs.

    ``dense``: none. ``kernel``: the offsets and ``exchange`` (by default the empty
    :class:`PrefixExchange` of whole samples; a routed batch brings its own). ``padded`` and
    ``jagged``: ``token_index [T]`` and one ``pad_index [n, N]``
    per group (padded: one group, all sequences, N = the batch's longest). ``pad_index[r, i]``
    is the token at position i of the group's r-th sequence, -1 past its end; ``token_index[t]``
    is token t's place in the groups' outputs, flattened and concatenated. Every group has at
    least 2 rows and 2 columns (extra rows are all padding): a size-1 dimension would be
    specialised by the compiler and recompile when it grows."""
    if cfg.attention == "dense":
        return ()
    if cfg.attention == "kernel":
        if exchange is None:  # whole samples: nothing to exchange, but the same inputs
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
                else (0, 1)
            exchange = PrefixExchange.unsplit(offsets, world, rank)
        return _two_pieces(offsets, exchange)
    starts = offsets[:-1].numpy()
    lengths = (offsets[1:] - offsets[:-1]).numpy()
    if cfg.attention == "padded":
        groups = [np.flatnonzero(lengths > 0)]
    else:
        groups = plan_groups(lengths, cfg.attention_groups)
    token_index = np.zeros(int(lengths.sum()), dtype=np.int64)
    pads, base = [], 0
    for members in groups:
        longest = max(2, int(lengths[members].max()) if len(members) else 2)
        pad = np.full((max(2, len(members)), longest), -1, dtype=np.int64)
        for row, s in enumerate(members):
            n, start = int(lengths[s]), int(starts[s])
            pad[row, :n] = np.arange(start, start + n)
            token_index[start : start + n] = base + row * longest + np.arange(n)
        pads.append(torch.from_numpy(pad))
        base += pad.size
    return (torch.from_numpy(token_index), *pads)


def _two_pieces(offsets: torch.Tensor, exchange: PrefixExchange) -> tuple[torch.Tensor, ...]:
    """The kernel form's layout, with empty pieces appended up to 2: a rank holding one
    piece (a long sample's chunk) would otherwise make the piece count 1, which the compiler
    specialises, and the next step, holding more, would recompile. (The negatives get rows
    up to 2 likewise, in :func:`model_inputs`; no token reads them.)"""
    missing = max(0, 3 - offsets.shape[0])
    if missing:
        offsets = torch.cat([offsets, offsets[-1:].expand(missing)])
        kv_offsets = torch.cat([exchange.kv_offsets, exchange.kv_offsets[-1:].expand(missing)])
        exchange = exchange._replace(kv_offsets=kv_offsets,
                                     q_start=torch.cat([exchange.q_start, exchange.q_start.new_zeros(missing)]))
    return (offsets, *exchange)


# ----------------------------------------------------------------------------- model


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
        self.kv_group: dist.ProcessGroup | None = None  # HSTU.exchange_over

    def forward(self, x: torch.Tensor, attention: tuple) -> torch.Tensor:
        cfg = self.cfg
        h, dv, dqk = cfg.heads, cfg.v_dim, cfg.qk_dim
        tokens = x.shape[0]
        uvqk = F.silu(self.uvqk(self.norm(x)))
        u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        q = q.view(tokens, h, dqk)
        k = k.view(tokens, h, dqk)
        v = v.view(tokens, h, dv)
        if cfg.attention == "dense":
            av = self._dense(q, k, v, *attention)
        elif cfg.attention == "kernel":
            av = self._kernel(q, k, v, *attention)
        else:
            av = self._per_sequence(q, k, v, *attention)
        return x + self.dropout(self.out(self.out_norm(av) * u))

    def _dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, rel_pos: torch.Tensor,
               time_bucket: torch.Tensor) -> torch.Tensor:
        """All of the rank's tokens at once, block-diagonal causal mask (the ``dense`` form)."""
        scores = torch.einsum("thd,shd->hts", q, k)
        rab = (self.position_bias(rel_pos) + self.time_bias(time_bucket)).permute(2, 0, 1)
        attn = F.silu(scores + rab) / self.cfg.max_len * mask
        return torch.einsum("hts,shd->thd", attn, v).reshape(q.shape[0], -1)

    def _per_sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_index: torch.Tensor,
                      groups: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Each group of sequences padded to ``[n, H, N, N]`` (``padded``: one group)."""
        outs = []
        for index, mask, rel_pos, time_bucket in groups:
            scores = torch.einsum("bihd,bjhd->bhij", q[index], k[index])
            rab = (self.position_bias(rel_pos) + self.time_bias(time_bucket)).permute(0, 3, 1, 2)
            if self.cfg.mode == "softmax":
                # padding rows see only their diagonal (never a row of -inf: no NaN), then are zeroed
                eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
                hidden = ~(mask.bool() | eye).unsqueeze(1)
                scores = scores / self.cfg.qk_dim**0.5 + rab
                attn = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1) * mask.unsqueeze(1)
            else:
                attn = F.silu(scores + rab) / self.cfg.max_len * mask.unsqueeze(1)
            outs.append(torch.einsum("bhij,bjhd->bihd", attn, v[index]).reshape(-1, q.shape[1] * v.shape[2]))
        padded = outs[0] if len(outs) == 1 else torch.cat(outs)
        return padded[token_index]

    def _kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                exchange: PrefixExchange, key_timestamps: torch.Tensor) -> torch.Tensor:
        """fsc's jagged attention over the rank's pieces, each attending to its keys ``[0, stop)``
        (earlier chunks' keys and values from their ranks: :func:`prefix_kv`)."""
        cfg = self.cfg
        keys, values = prefix_kv(k, v, exchange, self.kv_group)
        # The op's position table is [H, 2P-1], indexed by the signed distance j - i + P - 1;
        # ours by i - j >= 0 (causal): column P-1-d holds our row d, later columns are never seen.
        table = self.position_bias.weight
        position = torch.cat([table.flip(0).t(), table.new_zeros(table.shape[1], table.shape[0] - 1)], dim=1)
        factor = {"alpha": 1.0} if cfg.mode == "hstu" else {"scale": cfg.qk_dim**-0.5}
        out = jagged_attention(q, keys, values, offsets, cfg.max_len, mode=cfg.mode, position_bias=position,
                               time_bias=self.time_bias.weight.t(), timestamps=key_timestamps,
                               kv_offsets=exchange.kv_offsets, q_start=exchange.q_start, **factor)
        return out.reshape(q.shape[0], -1)


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
        self.kv_group: dist.ProcessGroup | None = None

    def exchange_over(self, group: dist.ProcessGroup | None) -> None:
        """Run the kernel form's key/value exchanges (split samples) on ``group``
        (``Router.exchange_group``: a group of their own, so that they do not queue behind
        the step's other collectives); None: the default group."""
        self.kv_group = group
        for layer in self.layers:
            layer.kv_group = group

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("item.")]

    # The relative bias's indices, shared by every form: clipped position difference and
    # log2-bucketed timestamp difference.
    def _relative_position(self, dist: torch.Tensor) -> torch.Tensor:
        return dist.clamp(0, self.cfg.max_len - 1)

    def _time_bucket(self, dt: torch.Tensor) -> torch.Tensor:
        # float64: log2 is exact on integer differences below 2**46 (float32 rounds up near 2**k, k >= 21)
        return torch.log2(dt.abs().to(torch.float64) + 1.0).floor().long().clamp(0, self.cfg.time_buckets - 1)

    def _attention_inputs(self, positions, seq_ids, timestamps):
        """The dense form's mask and bias indices over all token pairs ``[T, T]``."""
        same = seq_ids.unsqueeze(1) == seq_ids.unsqueeze(0)
        dist = positions.unsqueeze(1) - positions.unsqueeze(0)
        mask = (same & (dist >= 0)).to(torch.float32)
        rel_pos = self._relative_position(dist)
        time_bucket = self._time_bucket(timestamps.unsqueeze(1) - timestamps.unsqueeze(0))
        return mask, rel_pos, time_bucket

    def _group_inputs(self, pad_index: torch.Tensor, timestamps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One padded group's gather index, mask and bias indices (``[n, N]``, ``[n, N, N]``;
        the position part is the same for every row, ``[N, N]``)."""
        valid = pad_index >= 0
        index = pad_index.clamp(min=0)  # padding reads token 0: masked out, never written back
        steps = torch.arange(pad_index.shape[1], device=pad_index.device)
        dist = steps.unsqueeze(1) - steps.unsqueeze(0)
        mask = (valid.unsqueeze(2) & valid.unsqueeze(1) & (dist >= 0)).to(torch.float32)
        stamps = timestamps[index]
        time_bucket = self._time_bucket(stamps.unsqueeze(2) - stamps.unsqueeze(1))
        return index, mask, self._relative_position(dist), time_bucket

    def encode(self, item_emb, ratings, timestamps, positions, seq_ids, *layout) -> torch.Tensor:
        x = item_emb + self.rating(ratings) + self.position(positions)
        if self.cfg.attention == "dense":
            attention = self._attention_inputs(positions, seq_ids, timestamps)
        elif self.cfg.attention == "kernel":
            offsets, *rest = layout
            exchange = PrefixExchange(*rest)
            # the keys' timestamps (the time bias reads them): once per step, not per layer
            attention = (offsets, exchange, prefix_tokens(timestamps, exchange, self.kv_group))
        else:
            token_index, *pads = layout
            attention = (token_index, [self._group_inputs(p, timestamps) for p in pads])
        for layer in self.layers:
            x = layer(x, attention)
        return F.normalize(self.final_norm(x), dim=-1)

    def forward(self, items, ratings, timestamps, positions, seq_ids, targets, negatives, loss_scale, *layout):
        """Sum of this rank's sampled-softmax losses divided by ``loss_scale`` (a 0-d
        tensor: the number of trained tokens over all ranks), so that summing gradients
        over ranks gives the gradient of the global mean. ``negatives [B, K]``: each
        sample's negatives; ``layout``: :func:`attention_layout`'s tensors."""
        # one sharded lookup for history, targets and negatives: one exchange each way
        emb = self.item(torch.cat([items, targets, negatives.reshape(-1)]))
        return self.loss(emb, items, ratings, timestamps, positions, seq_ids, targets, negatives, loss_scale, *layout)

    def loss(self, emb, items, ratings, timestamps, positions, seq_ids, targets, negatives, loss_scale, *layout):
        """The forward after its item lookup: ``emb`` holds the rows of ``cat([items, targets,
        negatives.reshape(-1)])`` (a model whose table lives elsewhere, e.g. TorchRec's, calls this)."""
        tokens = items.shape[0]
        hidden = self.encode(emb[:tokens], ratings, timestamps, positions, seq_ids, *layout)
        target_emb = F.normalize(emb[tokens : 2 * tokens], dim=-1)
        negative_emb = F.normalize(emb[2 * tokens :], dim=-1).view(negatives.shape[0], negatives.shape[1], -1)
        positive = (hidden * target_emb).sum(-1, keepdim=True)
        # every token against its own sequence's negatives
        negative = torch.einsum("td,tkd->tk", hidden, negative_emb[seq_ids])
        negative = negative.masked_fill(negatives[seq_ids] == targets.unsqueeze(1), float("-inf"))
        logits = torch.cat([positive, negative], dim=-1) / self.cfg.temperature
        per_token = F.cross_entropy(logits, torch.zeros_like(targets), reduction="none")
        return (per_token * (targets > 0)).sum() / loss_scale


def model_inputs(batch: JaggedBatch, loss_scale: torch.Tensor, cfg: HSTUConfig) -> list[torch.Tensor]:
    """:meth:`HSTU.forward`'s positional inputs for this batch. The ``kernel`` form's layout
    is the query offsets and the batch's :class:`PrefixExchange` (an empty one for a batch
    not routed with splits); a batch holding chunks of split samples needs that form."""
    if cfg.attention == "kernel":
        negatives = batch.negatives
        if negatives.shape[0] < 2:  # a rank holding one piece: rows never read, see _two_pieces
            negatives = torch.cat([negatives, negatives.new_ones(2 - negatives.shape[0], negatives.shape[1])])
        return [*batch.tensors(), negatives, loss_scale, *attention_layout(batch.offsets, cfg, batch.exchange)]
    # from the global plan: every rank raises in the same step (a rank holding only a first
    # chunk, or only whole samples, would otherwise go on and wait for its peers)
    if batch.split:
        raise ValueError(f"this step's plan splits samples into chunks, which only HSTUConfig.attention='kernel' "
                         f"runs (it fetches their earlier keys and values); got attention={cfg.attention!r}")
    return [*batch.tensors(), batch.negatives, loss_scale, *attention_layout(batch.offsets, cfg)]


def mark_dynamic(inputs: Sequence[torch.Tensor], cfg: HSTUConfig | None = None) -> None:
    """Compile for any token count, sample count and padded length: every dimension of
    :func:`model_inputs` is marked dynamic (where not size 1) except the negatives per
    sample, the 0-d loss scale and, in the kernel form (pass ``cfg``), the world-sized
    split sizes of the key/value exchange."""
    kernel = cfg is not None and cfg.attention == "kernel"
    for i, t in enumerate(inputs):
        # 10, 11 in the kernel form: the exchange's split sizes, [world], read by .tolist()
        fixed = i == 7 or (kernel and i in (10, 11))
        dims = () if fixed else (0,) if i == 6 else range(t.ndim)
        for dim in dims:
            if t.shape[dim] > 1:
                torch._dynamo.mark_dynamic(t, dim)


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


def sample_negatives(num_items: int, count: int, seed: int, step: int, keys: Sequence[int]) -> torch.Tensor:
    """``[len(keys), count]``: each sample's negatives, uniform over all items, drawn from a
    generator keyed by (seed, step, the sample's key): the same whichever rank reads or
    trains the sample."""
    out = np.empty((len(keys), count), dtype=np.int64)
    for row, key in enumerate(keys):
        out[row] = np.random.default_rng([seed, step, int(key), 1]).integers(1, num_items + 1, size=count)
    return torch.from_numpy(out)


def read_batch(histories: Any, users: Sequence[int], cfg: HSTUConfig, *, seed: int, step: int) -> JaggedBatch:
    """What a data loader yields for these users at this step: their collated samples (keyed
    by user id), each with its negatives. ``histories``: anything with ``items``, ``ratings``
    and ``timestamps`` indexable by user (:class:`examples.hstu.data.Histories`)."""
    users = [int(u) for u in users]
    return collate([histories.items[u] for u in users], [histories.ratings[u] for u in users],
                   [histories.timestamps[u] for u in users], cfg.max_len, keys=users,
                   negatives=sample_negatives(cfg.num_items, cfg.num_negatives, seed, step, users))


def global_batch_users(num_users: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """The users of one step's global batch, the same on every rank."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(num_users, size=min(global_batch, num_users), replace=False)


def scale_tensor(count: float) -> torch.Tensor:
    return torch.tensor(float(max(count, 1.0)))
