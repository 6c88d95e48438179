"""``attention-cpu``: what lower-attention does to a dense attention's training step on CPU.

One self-attention block (qkv projection, attention, output projection; B=16, H=2, D=32 by
default) per attention family, written as users write it:

- ``sdpa``: ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` on ``[B, H, N, D]``;
- ``softmax``: ``softmax(q @ kᵀ / sqrt(D) masked causal) @ v`` on ``[B, H, N, D]``;
- ``bmm``: ``bmm(dropout(softmax(bmm(q, kᵀ) / sqrt(D)), p=0), v)`` on ``[B*H, N, D]``;
- ``mha``: ``nn.MultiheadAttention(batch_first=True)`` with a causal mask and the
  ``is_causal`` hint, ``need_weights=False`` (its own projections replace qkv/out);
- ``hstu``: the HSTU example's dense SiLU attention over all B*N tokens of the batch
  (``silu(einsum(q, k) * alpha) / N * same-sequence causal mask``, then ``einsum`` with v),
  which lower-attention lowers on every device (its jagged form skips the cross-sequence
  scores), so ``freescale`` and ``freescale-lowered`` both run the jagged op;
- ``bert4rec``: BERT4Rec's bidirectional ``softmax(q @ kᵀ / sqrt(D)).masked_fill(pad == 0,
  -1e9)`` on right-aligned padded rows (lengths a fixed 18% short of N on average);
- ``encoder``: ``nn.TransformerEncoderLayer(batch_first=True, dropout=0)`` in training with
  a causal mask and ``src_key_padding_mask`` (SASRec-style; the same lengths);
- ``hstu-padded``: generative-recommenders' PyTorch HSTU attention: jagged q, k, v padded by
  ``fbgemm.jagged_to_padded_dense``, ``silu(einsum(q, k) * alpha) / N`` times a causal
  mask, ``einsum`` with v, ``fbgemm.dense_to_jagged`` (the same lengths; needs fbgemm-gpu),
  kept off CUDA by default like the dense forms.

Each is trained (forward, backward) compiled three ways, all with Inductor generating the
code: ``inductor`` (plain ``torch.compile``); ``freescale`` (the default pipeline, in
which lower-attention keeps dense attention off CUDA); ``freescale-lowered`` (the same with
``lower-attention{dense_on_cpu=true}``, which replaces the attention by
``fsc::jagged_attention``). The three run interleaved, one step each per round in a
shuffled order, so the machine's load falls on all alike; we report medians and, per
configuration, the median over rounds of the step-time ratio to inductor's step in the
same round, with its 10-90% spread. Values are checked against eager (forward and
gradients) before timing.
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import random
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.report import markdown_table, write_json

FAMILIES = ("sdpa", "softmax", "bmm", "mha", "hstu", "bert4rec", "encoder", "hstu-padded")
# valid fraction per padded row (18% padding on average), cycled over the batch
FRACTIONS = (1.0, 0.6, 0.95, 0.7, 0.9, 0.75, 1.0, 0.65, 0.85, 0.8, 0.95, 0.7, 0.9, 0.8, 0.75, 0.82)
VARIANTS = ("inductor", "freescale", "freescale-lowered")


class Block(nn.Module):
    def __init__(self, family: str, heads: int, head_dim: int) -> None:
        super().__init__()
        dim = heads * head_dim
        self.family, self.heads = family, heads
        self.encoder = None
        if family == "mha":
            self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        elif family == "encoder":
            self.mha = None
            self.encoder = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        else:
            self.qkv, self.out, self.mha = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        if self.family == "hstu":
            return x + self.out(self._hstu(x.reshape(b * n, d), b, n)).view(b, n, d)
        if self.family == "hstu-padded":
            return self._hstu_padded(x)
        valid = torch.arange(n, device=x.device)[None, :] < _lengths(b, n, x.device)[:, None]
        if self.encoder is not None:  # boolean masks both (mixed mask types warn: a graph break)
            mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1)
            return self.encoder(x, src_mask=mask, src_key_padding_mask=~valid)
        if self.mha is not None:
            mask = nn.Transformer.generate_square_subsequent_mask(n, device=x.device)
            return x + self.mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        if self.family == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.family == "bert4rec":
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            o = s.masked_fill(valid.long()[:, None, None, :] == 0, -1e9).softmax(-1) @ v
        elif self.family == "softmax":
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1), float("-inf"))
            o = s.softmax(-1) @ v
        else:
            q, k, v = (t.reshape(b * self.heads, n, -1) for t in (q, k, v))
            p = torch.bmm(q, k.transpose(1, 2)).div(math.sqrt(q.shape[-1])).softmax(-1)
            o = torch.bmm(F.dropout(p, p=0.0, training=self.training), v).view(b, self.heads, n, -1)
        return x + self.out(o.transpose(1, 2).reshape(b, n, d))

    def _hstu_padded(self, x: torch.Tensor) -> torch.Tensor:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

        b, n, d = x.shape
        lengths = _lengths(b, n, x.device).tolist()  # a function of (b, n): constants in the graph
        offsets = torch.tensor([0] + list(itertools.accumulate(lengths)), device=x.device)
        rows = torch.tensor([i * n + j for i, length in enumerate(lengths) for j in range(length)], device=x.device)
        total = len(rows)
        tokens = x.reshape(b * n, d).index_select(0, rows)
        q, k, v = (u.view(total, self.heads, -1) for u in self.qkv(tokens).split(d, -1))
        pad = [torch.ops.fbgemm.jagged_to_padded_dense(u.reshape(total, d), [offsets], [n], 0.0)
               .view(b, n, self.heads, -1).transpose(1, 2) for u in (q, k, v)]
        causal = torch.tril(torch.ones(n, n, device=x.device))
        a = F.silu(torch.einsum("bhxa,bhya->bhxy", pad[0], pad[1]) / math.sqrt(q.shape[-1])) / n * causal
        o = torch.einsum("bhxy,bhyd->bhxd", a, pad[2]).transpose(1, 2).flatten(2, 3)
        jagged = torch.ops.fbgemm.dense_to_jagged(o, [offsets], total)[0]
        out = x.new_zeros(b * n, d).index_copy(0, rows, self.out(jagged))
        return x + out.view(b, n, d)

    def _hstu(self, x: torch.Tensor, b: int, n: int) -> torch.Tensor:
        t, d = x.shape
        q, k, v = (u.view(t, self.heads, -1) for u in self.qkv(x).split(d, -1))
        pos = torch.arange(n, device=x.device).repeat(b)
        seq = torch.arange(b, device=x.device).repeat_interleave(n)
        mask = (seq.unsqueeze(1) == seq.unsqueeze(0)) & (pos.unsqueeze(1) - pos.unsqueeze(0) >= 0)
        a = F.silu(torch.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[-1])) / n * mask
        return torch.einsum("hts,shd->thd", a, v).reshape(t, d)


def _lengths(b: int, n: int, device: torch.device) -> torch.Tensor:
    """Valid tokens per padded row: :data:`FRACTIONS` of N, cycled over the batch."""
    return torch.tensor([round(FRACTIONS[i % len(FRACTIONS)] * n) for i in range(b)], device=device)


def _compiled(variant: str, model: nn.Module) -> Any:
    if variant == "inductor":
        return torch.compile(model)
    from fsc.pass_manager import default_pipeline
    from fsc.passes import LowerAttention

    passes = list(default_pipeline())
    if variant == "freescale-lowered":
        passes = [LowerAttention(dense_on_cpu=True) if p.name == "lower-attention" else p for p in passes]
    return torch.compile(model, backend="freescale", options={"inner": "inductor", "passes": passes})


def _step(fn: Any, x: torch.Tensor, model: nn.Module) -> float:
    start = time.perf_counter()
    fn(x).square().mean().backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def _lowering(variant: str) -> str:
    if variant == "inductor":
        return "-"
    import fsc

    try:
        record = fsc.last_compile().graph("pre-grad").pass_record("lower-attention")
    except (KeyError, LookupError):
        return "no attention found"
    if record.stats.get("lowered"):
        return "lowered"
    return "kept" if record.stats.get("kept") else "declined: " + "; ".join(record.reasons)


def measure(family: str, n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    # every configuration compiles Block.forward again: without a reset the later ones would
    # pass Dynamo's recompile limit and run eagerly
    torch._dynamo.reset()
    torch.manual_seed(0)
    template = Block(family, args.heads, args.head_dim)
    x = torch.randn(args.batch, n, args.heads * args.head_dim)
    ref = template(x)
    ref_grads = torch.autograd.grad(ref.square().mean(), list(template.parameters()))
    runs: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        model = Block(family, args.heads, args.head_dim)
        model.load_state_dict(template.state_dict())
        fn = _compiled(variant, model)
        start = time.perf_counter()
        out = fn(x)
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
        compile_s = time.perf_counter() - start
        err = max([(out - ref).abs().max().item()] + [(g - r).abs().max().item() for g, r in zip(grads, ref_grads)])
        rows[variant] = {"family": family, "n": n, "variant": variant, "compile_s": compile_s,
                         "max_abs_err_vs_eager": err, "lowering": _lowering(variant)}
        runs[variant] = (fn, model)
        for _ in range(args.warmup):
            _step(fn, x, model)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(VARIANTS)
        rng.shuffle(order)
        for variant in order:
            fn, model = runs[variant]
            times[variant].append(_step(fn, x, model))
    for variant in VARIANTS:
        ratios = sorted(t / b for t, b in zip(times[variant], times["inductor"]))
        rows[variant] |= {"step_ms_median": 1e3 * statistics.median(times[variant]),
                          "ratio_to_inductor": statistics.median(ratios),
                          "ratio_p10": ratios[len(ratios) // 10], "ratio_p90": ratios[(9 * len(ratios)) // 10]}
    return list(rows.values())


def run(argv: list[str], json_path: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench attention-cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=FAMILIES, action="append", help="default: all")
    parser.add_argument("--lengths", default="50,200,512")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=10, help="steps per variant before timing (compiled code is slow for its first few steps)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for family in args.family or FAMILIES for n in map(int, args.lengths.split(","))
            for row in measure(family, n, args)]
    body = [[r["family"], str(r["n"]), r["variant"], r["lowering"], f"{r['step_ms_median']:.2f}",
             f"{r['ratio_to_inductor']:.2f} ({r['ratio_p10']:.2f}-{r['ratio_p90']:.2f})",
             f"{r['max_abs_err_vs_eager']:.1e}"] for r in rows]
    print("\n".join(markdown_table(["family", "N", "variant", "lower-attention", "step ms", "vs inductor (p10-p90)",
                                    "max err vs eager"], body, numeric=3)))
    write_json(json_path, {"config": vars(args), "rows": rows, "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "machine": platform.machine(), "measured": True})
    return 0
