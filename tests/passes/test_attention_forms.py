"""lower-attention, one golden printout per recognised form (``golden/lower_attention/``):
a small Dynamo graph, the pass alone, the text after it. No compile past Dynamo's trace.
Rerun with ``FSC_UPDATE_GOLDEN=1`` (this file only) when a change is intended, and review."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_golden_printouts import assert_golden, dynamo_graph, pre_grad_ctx, run_and_print
from torch import nn

from fsc.passes import LowerAttention

N, D = 4, 16


def qkv(*lead: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*lead, N, D, generator=g) for _ in range(3))


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_3d_scaled(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=0.5)


def softmax_causal_triu(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.triu(torch.ones(N, N, dtype=torch.bool), 1), float("-inf"))
    return F.softmax(s, dim=-1) @ v


def softmax_causal_fill_1e9(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~torch.tril(torch.ones(N, N)).bool(), -1e9)
    return F.softmax(s, dim=-1) @ v


def softmax_causal_fill_small(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return F.softmax(s.masked_fill(~torch.tril(torch.ones(N, N)).bool(), -100.0), dim=-1) @ v


def softmax_key_padding(q, k, v, ids):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill((ids > 0).unsqueeze(1).unsqueeze(2) == 0, -1e9)
    return F.softmax(s, dim=-1) @ v


def softmax_additive_mask(q, k, v, bias):
    return F.softmax(q @ k.mT * 0.25 + bias, dim=-1) @ v


def sdpa_key_padding(q, k, v, ids):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(ids > 0)[:, None, None, :])


def sdpa_causal_and_padding(q, k, v, ids):
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal & (ids > 0)[:, None, None, :])


def sdpa_additive_padding(q, k, v, ids):
    pad = torch.zeros(ids.shape).masked_fill(ids == 0, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :])


def sdpa_finite_additive_padding(q, k, v, ids):  # HF-style (1 - mask) * -10000: not 0 / -inf
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(1.0 - (ids > 0).float())[:, None, None, :] * -10000.0)


def softmax_causal_or_padding(q, k, v, ids):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    hidden = torch.triu(torch.ones(N, N, dtype=torch.bool), 1) | (ids == 0)[:, None, None, :]
    return F.softmax(s.masked_fill(hidden, float("-inf")), dim=-1) @ v


def softmax_causal_then_padding_fill_1e9(q, k, v, ids):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.triu(torch.ones(N, N, dtype=torch.bool), 1), -1e9)
    s = s.masked_fill((ids == 0)[:, None, None, :], -1e9)
    return F.softmax(s, dim=-1) @ v


def softmax_padding_where_additive(q, k, v, ids):
    pad = torch.where(ids > 0, 0.0, float("-inf"))
    return (q @ k.mT * 0.25 + pad[:, None, None, :]).softmax(-1) @ v


def softmax_mixed_fills(q, k, v, ids):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.triu(torch.ones(N, N, dtype=torch.bool), 1), float("-inf"))
    return F.softmax(s.masked_fill((ids == 0)[:, None, None, :], -1e9), dim=-1) @ v


def sdpa_bool_causal_mask(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(N, N, dtype=torch.bool).tril())


def softmax_additive_causal(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25 + nn.Transformer.generate_square_subsequent_mask(N)
    return s.softmax(-1) @ v


def softmax_bmm_3d_dropout_p0(q, k, v):
    p = torch.bmm(q, k.transpose(1, 2)).mul(0.25).softmax(-1)
    return torch.bmm(F.dropout(p, p=0.0, training=True), v)


def softmax_bmm_3d_key_padding(q, k, v, ids):  # one row of the mask per (batch, head) sequence
    s = torch.bmm(q, k.transpose(1, 2)) * 0.25
    return torch.bmm(s.masked_fill((ids == 0)[:, None, :], float("-inf")).softmax(-1), v)


def softmax_dropout(q, k, v):
    p = (q @ k.mT * 0.25).softmax(-1)
    return F.dropout(p, p=0.1, training=True) @ v


def softmax_then_masked_fill(q, k, v):
    p = (q @ k.mT * 0.25).softmax(-1)
    return p.masked_fill(torch.eye(N, dtype=torch.bool), 0.0) @ v


def softmax_einsum(q, k, v):
    p = torch.einsum("bhnd,bhmd->bhnm", q, k).softmax(-1)
    return torch.einsum("bhnm,bhmd->bhnd", p, v)


def silu_padded(q, k, v):
    return F.silu(q @ k.transpose(-2, -1)) / N @ v


def hstu_silu(q, k, v, pos, seq):
    mask = (seq.unsqueeze(1) == seq.unsqueeze(0)) & (pos.unsqueeze(1) - pos.unsqueeze(0) >= 0)
    a = F.silu(torch.einsum("thd,shd->hts", q, k) * 0.5) / N * mask
    return torch.einsum("hts,shd->thd", a, v)


def hstu_groups(q, k, v, timestamps, token_index, pad, pos_w, time_w):
    """The HSTU example's per-sequence form, one group (examples/hstu/model.py, attention="padded")."""
    valid = pad >= 0
    index = pad.clamp(min=0)
    steps = torch.arange(pad.shape[1])
    dist = steps.unsqueeze(1) - steps.unsqueeze(0)
    mask = (valid.unsqueeze(2) & valid.unsqueeze(1) & (dist >= 0)).float()
    stamps = timestamps[index]
    bucket = torch.log2((stamps.unsqueeze(2) - stamps.unsqueeze(1)).abs().double() + 1.0).floor().long().clamp(0, 7)
    rab = (F.embedding(dist.clamp(0, 3), pos_w) + F.embedding(bucket, time_w)).permute(0, 3, 1, 2)
    a = F.silu(torch.einsum("bihd,bjhd->bhij", q[index], k[index]) + rab) / N * mask.unsqueeze(1)
    return torch.einsum("bhij,bjhd->bihd", a, v[index]).reshape(-1, 2 * D)[token_index]


def hstu_groups_full_rows(q, k, v, timestamps, token_index, pad, pos_w, time_w):
    """The per-sequence form without its causal part: every valid key of the row."""
    valid = pad >= 0
    index = pad.clamp(min=0)
    mask = (valid.unsqueeze(2) & valid.unsqueeze(1)).float()
    a = F.silu(torch.einsum("bihd,bjhd->bhij", q[index], k[index])) / N * mask.unsqueeze(1)
    return torch.einsum("bhij,bjhd->bihd", a, v[index]).reshape(-1, 2 * D)[token_index]


def hstu_groups_softmax(q, k, v, timestamps, token_index, pad, pos_w, time_w, bias=True):
    """The per-sequence form in the example's softmax mode (HSTUConfig.mode="softmax")."""
    valid = pad >= 0
    index = pad.clamp(min=0)
    steps = torch.arange(pad.shape[1])
    dist = steps.unsqueeze(1) - steps.unsqueeze(0)
    mask = (valid.unsqueeze(2) & valid.unsqueeze(1) & (dist >= 0)).float()
    s = torch.einsum("bihd,bjhd->bhij", q[index], k[index]) / 4.0
    if bias:
        stamps = timestamps[index]
        bucket = torch.log2((stamps.unsqueeze(2) - stamps.unsqueeze(1)).abs().double() + 1.0).floor().long()
        rab = F.embedding(dist.clamp(0, 3), pos_w) + F.embedding(bucket.clamp(0, 7), time_w)
        s = s + rab.permute(0, 3, 1, 2)
    hidden = ~(mask.bool() | torch.eye(pad.shape[1], dtype=torch.bool)).unsqueeze(1)
    a = torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1) * mask.unsqueeze(1)
    return torch.einsum("bhij,bjhd->bihd", a, v[index]).reshape(-1, 2 * D)[token_index]


def hstu_groups_softmax_unbounded(q, k, v, timestamps, token_index, pad, pos_w, time_w):
    return hstu_groups_softmax(q, k, v, timestamps, token_index, pad, pos_w, time_w, bias=False)


def hstu_groups_inputs():
    g = torch.Generator().manual_seed(0)
    pad = torch.tensor([[0, 1, 2], [3, 4, -1], [5, -1, -1]])
    return (*(torch.randn(6, 2, D, generator=g) for _ in range(3)), torch.tensor([0, 5, 90, 7, 1000, 3]),
            torch.tensor([0, 1, 2, 3, 4, 6]), pad, torch.randn(4, 2, generator=g), torch.randn(8, 2, generator=g))


class Mha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(2 * D, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False, is_causal=True,
                         attn_mask=nn.Transformer.generate_square_subsequent_mask(N))[0]


class MhaProvedMask(Mha):
    def forward(self, x):  # the mask alone, no hint, need_weights=True with the weights unused
        out, _ = self.attn(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(N))
        return out


class MhaKeyPadding(Mha):
    def forward(self, x, pad):
        return self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]


class MhaCausalKeyPadding(Mha):
    def forward(self, x, pad):  # SASRec: causal mask plus padding, need_weights left True
        out, _ = self.attn(x, x, x, key_padding_mask=pad, attn_mask=~torch.ones(N, N, dtype=torch.bool).tril())
        return out


class EncoderKeyPadding(nn.Module):
    """nn.TransformerEncoderLayer in training: it makes the boolean src_key_padding_mask a
    0 / -inf float mask (masked_fill_ on zeros_like) before calling its MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(2 * D, 2, 64, dropout=0.0, batch_first=True)

    def forward(self, x, pad):
        return self.layer(x, src_key_padding_mask=pad)


def mha_weights():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2 * D, 2 * D, generator=g) / 8 for _ in range(4)) + (torch.zeros(6 * D),)


def mha_separate(x, wq, wk, wv, wo, b):
    return F.multi_head_attention_forward(x, x, x, 2 * D, 2, None, b, None, None, False, 0.0, wo, None,
                                          need_weights=False, use_separate_proj_weight=True, q_proj_weight=wq,
                                          k_proj_weight=wk, v_proj_weight=wv)[0]


def hstu_inputs():
    pos, seq = torch.tensor([0, 1, 2, 0, 1, 0]), torch.tensor([0, 0, 0, 1, 1, 2])
    g = torch.Generator().manual_seed(0)
    return (*(torch.randn(6, 2, D, generator=g) for _ in range(3)), pos, seq)


CPU_TOO = LowerAttention(dense_on_cpu=True)
RUN = "one contiguous run of valid keys per sequence, checked at run time; rows that see no key"
IDS = torch.tensor([[3, 4, 0, 0], [1, 2, 3, 0]])  # item ids, 0 for padding (right-aligned)
PAD = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]]).bool()  # key_padding_mask: True for padding
# form: (function, inputs, pass, lowered?, a phrase of the lowering or of the reason)
FORMS = {
    "sdpa_causal_kept_on_cpu": (sdpa_causal, qkv(2, 2), LowerAttention(), False, "kept: scaled_dot_product_attention"),
    "sdpa_3d_scaled": (sdpa_3d_scaled, qkv(4), CPU_TOO, True, "[B*H, N, D]=[4, 4, 16] full softmax, scale=0.5"),
    "softmax_causal_triu": (softmax_causal_triu, qkv(2, 2), CPU_TOO, True, "[B, H, N, D]=[2, 2, 4, 16] causal"),
    "softmax_causal_fill_1e9": (softmax_causal_fill_1e9, qkv(2, 2), CPU_TOO, True,
                               "causal softmax, scale=0.25, fill -1e+09 as -inf (exact while each row's max score "
                               ">= fill + 104, checked at run time)"),
    "softmax_causal_fill_small": (softmax_causal_fill_small, qkv(2, 2), CPU_TOO, False,
                                  "masked_fill with -100.0: lowered are -inf and finite fills <= -10000"),
    "softmax_key_padding": (softmax_key_padding, (*qkv(2, 2), IDS), CPU_TOO, True,
                            f"full softmax, key padding [2, 1, 1, 4] (masked; {RUN}: the mean of v, as eager), "
                            "scale=0.25, fill -1e+09 as -inf"),
    "softmax_causal_or_padding": (softmax_causal_or_padding, (*qkv(2, 2), IDS), CPU_TOO, True,
                                  f"causal softmax, key padding [2, 1, 1, 4] (masked; {RUN}: NaN, as eager)"),
    "softmax_causal_then_padding_fill_1e9": (softmax_causal_then_padding_fill_1e9, (*qkv(2, 2), IDS), CPU_TOO, True,
                                             "causal softmax, key padding [2, 1, 1, 4] (masked; "),
    "softmax_padding_where_additive": (softmax_padding_where_additive, (*qkv(2, 2), IDS), CPU_TOO, True,
                                       "full softmax, key padding [2, 1, 1, 4] (additive; "),
    "softmax_mixed_fills": (softmax_mixed_fills, (*qkv(2, 2), IDS), CPU_TOO, False,
                            "masks filled with [-inf, -1000000000.0]: with a key-padding mask the fills must be one"),
    "softmax_additive_mask": (softmax_additive_mask, (*qkv(2, 2), torch.zeros(4, 4)), CPU_TOO, False,
                              "softmax input is the scores plus a torch.float32 mask [4, 4] (an additive mask"),
    "sdpa_key_padding": (sdpa_key_padding, (*qkv(2, 2), IDS), CPU_TOO, True,
                         f"full softmax, key padding [2, 1, 1, 4] (kept; {RUN}: 0, as eager)"),
    "sdpa_causal_and_padding": (sdpa_causal_and_padding, (*qkv(2, 2), IDS), CPU_TOO, True,
                                "causal softmax, key padding [2, 1, 1, 4] (kept; "),
    "sdpa_additive_padding": (sdpa_additive_padding, (*qkv(2, 2), IDS), CPU_TOO, True,
                              "full softmax, key padding [2, 1, 1, 4] (additive; "),
    "sdpa_finite_additive_padding": (sdpa_finite_additive_padding, (*qkv(2, 2), IDS), CPU_TOO, False,
                                     "a float key-padding mask [2, 1, 1, 4] not built as masked_fill(zeros, pad, "
                                     "-inf) or where(pad, -inf, 0)"),
    "sdpa_bool_causal_mask": (sdpa_bool_causal_mask, qkv(2, 2), CPU_TOO, True, "[B, H, N, D]=[2, 2, 4, 16] causal"),
    "softmax_additive_causal": (softmax_additive_causal, qkv(2, 2), CPU_TOO, True,
                                "[B, H, N, D]=[2, 2, 4, 16] causal softmax, scale=0.25"),
    "mha_proved_mask": (MhaProvedMask(), (torch.randn(2, N, 2 * D),), CPU_TOO, True,
                        "[N, B, E]=[4, 2, 32], 2 heads, causal"),
    "softmax_bmm_3d_dropout_p0": (softmax_bmm_3d_dropout_p0, qkv(4), CPU_TOO, True, "[B*H, N, D]=[4, 4, 16] full"),
    "softmax_bmm_3d_key_padding": (softmax_bmm_3d_key_padding, (*qkv(4), torch.cat([IDS, IDS.flip(1)])), CPU_TOO,
                                   True, "[B*H, N, D]=[4, 4, 16] full softmax, key padding [4, 1, 4] (masked; "),
    "softmax_dropout": (softmax_dropout, qkv(2, 2), CPU_TOO, False,
                        "dropout(p=0.1) on the attention probabilities: the kernel has no dropout"),
    "softmax_then_masked_fill": (softmax_then_masked_fill, qkv(2, 2), CPU_TOO, False,
                                 "work between the softmax and the product (masked_fill)"),
    "softmax_einsum": (softmax_einsum, qkv(2, 2), CPU_TOO, False, "softmax attention through einsum"),
    "silu_padded": (silu_padded, qkv(2, 2), CPU_TOO, False, "SiLU attention through matmul (padded"),
    "hstu_silu": (hstu_silu, hstu_inputs(), LowerAttention(), True, "HSTU SiLU attention q [T, H, D]=[6, 2, 16]"),
    "hstu_groups_kept_on_cpu": (hstu_groups, hstu_groups_inputs(), LowerAttention(), False,
                                "kept: the HSTU example's per-sequence form (gathered [n, N] groups), 1 group"),
    "hstu_groups": (hstu_groups, hstu_groups_inputs(), CPU_TOO, True,
                    "the HSTU example's per-sequence form (gathered [n, N] groups), 1 group: HSTU SiLU attention, "
                    "alpha=1, /N=4, q [T, H, D]=[6, 2, 16], causal within rows, bias: time[8], position[4]"),
    "hstu_groups_full_rows": (hstu_groups_full_rows, hstu_groups_inputs(), CPU_TOO, False,
                              "the HSTU example's per-sequence form (gathered [n, N] groups): not lowered because "
                              "mask not recognised"),
    "hstu_groups_softmax": (hstu_groups_softmax, hstu_groups_inputs(), CPU_TOO, True,
                            "1 group: HSTU softmax attention, scale=0.25, lengths <= 4, q [T, H, D]=[6, 2, 16], "
                            "causal within rows, bias: time[8], position[4]"),
    "hstu_groups_softmax_unbounded": (hstu_groups_softmax_unbounded, hstu_groups_inputs(), CPU_TOO, False,
                                      "softmax mode without a position bias: no static bound on the sequence lengths"),
    "mha_causal_hint": (Mha(), (torch.randn(2, N, 2 * D),), CPU_TOO, True,
                        "[N, B, E]=[4, 2, 32], 2 heads, causal (is_causal hint) softmax, scale=0.25, packed"),
    "mha_separate_projections": (mha_separate, (torch.randn(N, 2, 2 * D), *mha_weights()), CPU_TOO, True,
                                 "[N, B, E]=[4, 2, 32], 2 heads, full softmax, scale=0.25, separate projections"),
    "mha_key_padding": (MhaKeyPadding(), (torch.randn(2, N, 2 * D), PAD), CPU_TOO, True,
                        f"2 heads, full softmax, key padding [2, 4] (additive; {RUN}: 0, as eager)"),
    "mha_causal_key_padding": (MhaCausalKeyPadding(), (torch.randn(2, N, 2 * D), PAD), CPU_TOO, True,
                               f"causal (mask proved) softmax, key padding [2, 4] (additive; {RUN}: NaN, as eager)"),
    "encoder_layer_key_padding": (EncoderKeyPadding(), (torch.randn(2, N, 2 * D), PAD), CPU_TOO, True,
                                  "full softmax, key padding [2, 4] (additive; "),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_lower_attention_form_matches_its_golden_printout(form):
    f, inputs, p, lowered, phrase = FORMS[form]
    gm = dynamo_graph(f, *inputs)
    record, before, text = run_and_print(form, gm, p, pre_grad_ctx())
    assert record.modified is lowered
    assert record.stats["attention_found"] == 1 and record.stats["lowered"] == int(lowered)
    said = record.stats["lowerings"] if lowered else record.reasons
    assert len(said) == 1 and phrase in said[0], said
    if lowered:
        assert "fsc.jagged_attention_fwd" in text.partition("# after")[2]
    else:
        assert text.partition("# after\n")[2] == before
    assert_golden(f"lower_attention/{form}", text)


def swiglu_like_mlp(x, w1, w2):
    return F.silu(x @ w1) @ w2


def softmax_classifier_head(x, w1, w2):
    return (x @ w1).softmax(-1) @ w2


@pytest.mark.parametrize("f", [swiglu_like_mlp, softmax_classifier_head])
def test_lower_attention_does_not_take_an_mlp_for_attention(f):
    gm = dynamo_graph(f, torch.randn(2, 5, 16), torch.randn(16, 24), torch.randn(24, 16))
    record, before, text = run_and_print(f.__name__, gm, CPU_TOO, pre_grad_ctx())
    assert record.stats["attention_found"] == 0 and record.reasons == () and not record.modified


def test_lower_attention_names_the_encoder_layer_fast_path():
    layer = nn.TransformerEncoderLayer(2 * D, 2, 64, dropout=0.0, batch_first=True).eval()
    with torch.no_grad():
        gm = dynamo_graph(layer, torch.randn(2, N, 2 * D))
    record, _, _ = run_and_print("encoder_fast_path", gm, CPU_TOO, pre_grad_ctx())
    (reason,) = record.reasons
    assert "torch._transformer_encoder_layer_fwd (nn.TransformerEncoderLayer" in reason, reason
