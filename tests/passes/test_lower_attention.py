"""lower-attention on Dynamo graphs: what it lowers (SDPA, explicit softmax attention),
training parity with eager in both inner modes, the record, and every decline."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fsc
from fsc.analysis.cost_model import DEVICE_PROFILES, CostModel
from fsc.inspect import STORE
from fsc.kernels import jagged_attention
from fsc.pass_manager import default_pipeline, parse_pipeline, passes_for_stage
from fsc.passes import LowerAttention

INNERS = ["eager", pytest.param("inductor", marks=pytest.mark.inductor)]


def lowering_everywhere(inner: str) -> dict:
    """The default pipeline, with dense attention lowered on CPU too (where it is kept by
    default): the tests check the lowering's values here, its speed is another matter."""
    passes = [LowerAttention(dense_on_cpu=True), *(p for p in default_pipeline() if p.name != "lower-attention")]
    return {"inner": inner, "passes": passes}


class SasRecBlock(nn.Module):
    """A SASRec-style self-attention block written with SDPA on [B, H, N, D]."""

    def __init__(self, dim: int = 64, heads: int = 2, **sdpa) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out, self.heads, self.sdpa = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads, sdpa

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        extra = {} if mask is None else {"attn_mask": mask}
        o = F.scaled_dot_product_attention(q, k, v, **self.sdpa, **extra)
        return x + self.out(o.transpose(1, 2).reshape(b, n, d))


class SoftmaxBlock(SasRecBlock):
    """The same attention written out: softmax(q @ k^T * c [masked causal]) @ v."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if self.sdpa.get("is_causal"):
            s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), self.sdpa.get("fill", float("-inf")))
        o = s.softmax(dim=-1) @ v
        return x + self.out(o.transpose(1, 2).reshape(b, n, d))


def run_pass(model: nn.Module, *inputs: torch.Tensor, **options) -> tuple[fsc.GraphRecord, int]:
    """Compile with only lower-attention (eager inner); return the pre-grad record and the
    number of backend calls made."""
    before = STORE.count
    compiled = torch.compile(model, backend="freescale",
                             options={"inner": "eager", "passes": [LowerAttention(**options)]})
    compiled(*inputs).sum().backward()
    return fsc.last_compile().graph("pre-grad"), STORE.count - before


def check_training_parity(model: nn.Module, compiled, x: torch.Tensor) -> None:
    ref = model(x)
    grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    got = compiled(x)
    got_grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(got_grads, grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inner", INNERS)
def test_lower_attention_lowers_causal_sdpa_and_training_matches_eager_without_recompiles(inner):
    model = SasRecBlock(is_causal=True)
    compiled = torch.compile(model, backend="freescale", options=lowering_everywhere(inner), dynamic=True)
    before = STORE.count
    for b, n in ((2, 8), (3, 5)):  # another batch size and length: same compiled graph
        check_training_parity(model, compiled, torch.randn(b, n, 64))
    assert STORE.count - before == 1
    pre = fsc.last_compile().graph("pre-grad")
    record = pre.pass_record("lower-attention")
    assert record.modified and record.stats["lowered"] == 1
    assert "scaled_dot_product_attention" in record.stats["lowerings"][0]
    assert "causal" in record.stats["lowerings"][0]
    assert "fsc.jagged_attention_fwd" in pre.graph_after
    assert "torch._C._nn.scaled_dot_product_attention(" in pre.graph_before
    assert "torch._C._nn.scaled_dot_product_attention(" not in pre.graph_after
    # the aten-stage passes never see it; the aten graphs carry the kernel ops
    assert "lower-attention" not in [p.name for p in fsc.last_compile().graph("forward").passes]
    if inner == "eager":
        assert "fsc.jagged_attention_fwd" in fsc.last_compile().graph("forward").graph_after
        assert "fsc.jagged_attention_bwd" in fsc.last_compile().graph("backward").graph_after


def test_lower_attention_lowers_full_sdpa_with_a_scale():
    model = SasRecBlock(is_causal=False, scale=0.3)
    compiled = torch.compile(model, backend="freescale", options=lowering_everywhere("eager"))
    check_training_parity(model, compiled, torch.randn(2, 7, 64))
    record = fsc.last_compile().graph("pre-grad").pass_record("lower-attention")
    assert record.stats["lowered"] == 1 and "full softmax, scale=0.3" in record.stats["lowerings"][0]


@pytest.mark.parametrize("causal", [True, False])
def test_lower_attention_lowers_explicit_softmax_attention(causal):
    model = SoftmaxBlock(is_causal=causal)
    compiled = torch.compile(model, backend="freescale", options=lowering_everywhere("eager"))
    check_training_parity(model, compiled, torch.randn(2, 6, 64))
    record = fsc.last_compile().graph("pre-grad").pass_record("lower-attention")
    assert record.stats["lowered"] == 1
    assert ("causal" if causal else "full") in record.stats["lowerings"][0]


class BmmBlock(SasRecBlock):
    """[B*H, N, D] attention through bmm, with nn.Dropout on the probabilities (BERT4Rec's habit)."""

    def __init__(self, p: float = 0.1, **kw) -> None:
        super().__init__(**kw)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2).reshape(b * self.heads, n, -1)
                   for t in self.qkv(x).split(d, -1))
        p = torch.bmm(q, k.transpose(1, 2)).div(math.sqrt(q.shape[-1])).softmax(-1)
        o = torch.bmm(self.drop(p), v)
        return x + self.out(o.view(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, d))


def test_lower_attention_lowers_3d_bmm_attention_with_dropout_in_eval_mode():
    model = BmmBlock(p=0.1).eval()  # eval: the dropout is the identity and is stripped
    compiled = torch.compile(model, backend="freescale", options=lowering_everywhere("eager"))
    check_training_parity(model, compiled, torch.randn(2, 7, 64))
    record = fsc.last_compile().graph("pre-grad").pass_record("lower-attention")
    assert record.stats["lowered"] == 1 and "[B*H, N, D]=[4, 7, 32] full softmax" in record.stats["lowerings"][0]


def test_lower_attention_declines_dropout_that_drops_and_says_so():
    pre, _ = run_pass(BmmBlock(p=0.1).train(), torch.randn(2, 4, 64, requires_grad=True), dense_on_cpu=True)
    record = pre.pass_record("lower-attention")
    assert record.stats["lowered"] == 0 and record.stats["attention_found"] == 1
    assert any("dropout(p=0.1) on the attention probabilities: the kernel has no dropout" in r for r in record.reasons)


def test_lower_attention_keeps_dense_attention_on_cpu_and_explain_says_why():
    model = SasRecBlock(is_causal=True)
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(model, backend="freescale", options={"inner": "eager"})
    check_training_parity(model, compiled, x)
    pre = fsc.last_compile().graph("pre-grad")
    record = pre.pass_record("lower-attention")
    assert not record.modified and record.stats["kept"] == 1 and record.stats["lowered"] == 0
    assert pre.graph_after == pre.graph_before
    (reason,) = record.reasons
    assert "kept: scaled_dot_product_attention" in reason and "on cpu" in reason and "dense_on_cpu=true" in reason
    assert reason in str(fsc.explain(model, x, inner="eager"))


class MhaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(64, 2, batch_first=True)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]


def test_explain_says_multihead_attention_with_key_padding_is_kept_on_cpu():
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    text = str(fsc.explain(MhaBlock(), torch.randn(2, 5, 64), pad, inner="eager"))
    assert ("kept: nn.MultiheadAttention (one F.multi_head_attention_forward call in Dynamo's graph) [N, B, E]=[5, 2, "
            "64], 2 heads, full softmax, key padding [2, 5] (additive; one contiguous run of valid keys per sequence, "
            "checked at run time; rows that see no key: 0, as eager)") in text
    assert "on cpu" in text and "dense_on_cpu=true" in text


# --- key-padding masks: every row as eager computes it, padded rows included ---------------

def padding(layout: str, n: int = 6) -> torch.Tensor:
    """valid [4, n]: a full row, 3 valid keys, 1 valid key, none; right-aligned (valid tokens
    first) or left-aligned (valid tokens last)."""
    valid = torch.zeros(4, n, dtype=torch.bool)
    for b, length in enumerate((n, 3, 1, 0)):
        if layout == "right":
            valid[b, :length] = True
        elif length:
            valid[b, -length:] = True
    return valid


class KeyPaddingBlock(SasRecBlock):
    """Attention over [B, H, N, D] with a key-padding mask, as users write it."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        form = self.sdpa["form"]
        future = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
        if form.startswith("sdpa"):
            mask = valid[:, None, None, :]
            if form == "sdpa_causal":
                mask = ~future & mask
            elif form == "sdpa_additive":
                mask = torch.where(valid, 0.0, float("-inf"))[:, None, None, :]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # BERT4Rec: scores.masked_fill(mask == 0, -1e9), mask from the item ids
            s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            pad = valid.long()[:, None, None, :] == 0
            if form == "bert4rec":
                s = s.masked_fill(pad, -1e9)
            elif form == "bert4rec_causal":
                s = s.masked_fill(future | pad, -1e9)
            else:  # -inf: eager's rows that see no key are NaN
                s = s.masked_fill(pad, float("-inf"))
            o = F.softmax(s, dim=-1) @ v
        return x + self.out(o.transpose(1, 2).reshape(b, n, d))


class MhaPaddingBlock(nn.Module):
    """SASRec's nn.MultiheadAttention with a causal attn_mask plus key_padding_mask, or an
    nn.TransformerEncoderLayer (training, dropout 0) with src_key_padding_mask."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.form = form
        self.attn = nn.MultiheadAttention(64, 2, batch_first=True)
        self.layer = nn.TransformerEncoderLayer(64, 2, 128, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if self.form == "encoder_layer":
            return self.layer(x, src_key_padding_mask=~valid)
        causal = ~torch.ones(n, n, dtype=torch.bool).tril() if self.form.endswith("causal") else None
        weights = self.form.startswith("weights")
        return self.attn(x, x, x, key_padding_mask=~valid, attn_mask=causal, need_weights=weights)[0]


def check_padded_training_parity(model: nn.Module, valid: torch.Tensor, nan_rows: bool = False) -> str:
    """Compile with key padding lowered on CPU; outputs on every row and parameter gradients
    equal eager's. The lowering's record."""
    compiled = torch.compile(model, backend="freescale", options=lowering_everywhere("eager"))
    x = torch.randn(valid.shape[0], valid.shape[1], 64)
    ref, got = model(x, valid), compiled(x, valid)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, equal_nan=nan_rows)
    if not nan_rows:  # eager's gradients are NaN wherever a row is
        grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()), allow_unused=True)
        got_grads = torch.autograd.grad(got.square().sum(), list(model.parameters()), allow_unused=True)
        for g, r in zip(got_grads, grads):
            if r is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    (lowering,) = fsc.last_compile().graph("pre-grad").pass_record("lower-attention").stats["lowerings"]
    return lowering


@pytest.mark.parametrize("layout", ["right", "left"])
@pytest.mark.parametrize("form, words", [
    ("sdpa", "full softmax, key padding [4, 1, 1, 6] (kept; "),
    ("sdpa_causal", "causal softmax, key padding [4, 1, 1, 6] (kept; "),
    ("sdpa_additive", "full softmax, key padding [4, 1, 1, 6] (additive; "),
    ("bert4rec", "full softmax, key padding [4, 1, 1, 6] (masked; "),
    ("bert4rec_causal", "causal softmax, key padding [4, 1, 1, 6] (masked; "),
])
def test_lower_attention_lowers_key_padding_and_training_matches_eager_on_every_row(form, words, layout):
    """Rows that see no key included: an all-padding sequence, and causal with left-aligned
    padding, the padded rows before the valid keys (SDPA: 0; one finite fill: the mean of v)."""
    lowering = check_padded_training_parity(KeyPaddingBlock(form=form), padding(layout))
    assert words in lowering and "jagged, valid keys per sequence" in lowering


@pytest.mark.parametrize("layout", ["right", "left"])
@pytest.mark.parametrize("form, words", [
    ("mha", "full softmax, key padding [4, 6] (additive; "),
    ("mha_causal", "causal (mask proved) softmax, key padding [4, 6] (additive; "),
    ("encoder_layer", "full softmax, key padding [4, 6] (additive; "),
])
def test_lower_attention_lowers_multihead_attention_key_padding_and_training_matches_eager(form, words, layout):
    lowering = check_padded_training_parity(MhaPaddingBlock(form), padding(layout))
    assert words in lowering and "rows that see no key: 0, as eager" in lowering


@pytest.mark.parametrize("model", [KeyPaddingBlock(form="softmax_inf"), MhaPaddingBlock("weights_causal")],
                         ids=["softmax_inf", "mha_weights_causal"])
def test_lower_attention_gives_nan_where_eager_softmax_over_minus_infinity_does(model):
    """An explicit softmax over a row of -inf scores (and MultiheadAttention with
    need_weights=True, which computes one) is NaN in eager: the lowering's forward is NaN on
    those rows too; without such rows, training matches."""
    lowering = check_padded_training_parity(model, padding("left"), nan_rows=True)
    assert "rows that see no key: NaN, as eager" in lowering
    check_padded_training_parity(model, padding("right")[:3])  # every row sees a key


@pytest.mark.inductor
def test_lower_attention_lowers_key_padding_under_inductor_for_any_batch_and_length():
    model = KeyPaddingBlock(form="bert4rec_causal")
    compiled = torch.compile(model, backend="freescale", options=lowering_everywhere("inductor"), dynamic=True)
    before = STORE.count
    for layout, n in (("right", 6), ("left", 7)):
        valid = padding(layout, n)
        x = torch.randn(4, n, 64)
        ref, got = model(x, valid), compiled(x, valid)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
        for g, r in zip(torch.autograd.grad(got.square().sum(), list(model.parameters())), grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert STORE.count - before == 1
    assert fsc.last_compile().graph("pre-grad").pass_record("lower-attention").stats["lowered"] == 1


def test_lower_attention_checks_at_run_time_that_valid_keys_are_contiguous():
    model = KeyPaddingBlock(form="bert4rec")
    compiled = torch.compile(model, backend="freescale", options=lowering_everywhere("eager"))
    x = torch.randn(2, 5, 64)
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)  # right-aligned, then a middle run
    torch.testing.assert_close(compiled(x, valid), model(x, valid), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="assuming each sequence's valid \\(unmasked\\) keys are one contiguous run"):
        compiled(x, torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))


class MhaSelfAttention(nn.Module):
    def __init__(self, batch_first: bool, mask: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(64, 2, batch_first=batch_first)
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1 if self.attn.batch_first else 0])
        if self.mask == "hint":
            return self.attn(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
        # need_weights=True, the weights unused
        out, _ = self.attn(x, x, x, attn_mask=causal if self.mask == "proved" else None)
        return out


@pytest.mark.parametrize("batch_first, mask, how", [(True, "hint", "causal (is_causal hint)"), (False, None, "full"),
                                                   (True, "proved", "causal (mask proved)")])
def test_lower_attention_unpacks_multihead_attention_and_training_matches_eager(batch_first, mask, how):
    model = MhaSelfAttention(batch_first, mask)
    compiled = torch.compile(model, backend="freescale", options=lowering_everywhere("eager"))
    check_training_parity(model, compiled, torch.randn(3, 6, 64))
    (lowering,) = fsc.last_compile().graph("pre-grad").pass_record("lower-attention").stats["lowerings"]
    n, b = (6, 3) if batch_first else (3, 6)
    assert f"[N, B, E]=[{n}, {b}, 64], 2 heads, {how}" in lowering


def test_lower_attention_unpacks_a_transformer_encoder_layer_in_training():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 2, 128, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    compiled = torch.compile(lambda x: model(x, mask=mask, is_causal=True), backend="freescale",
                             options=lowering_everywhere("eager"))
    x = torch.randn(2, 5, 64)
    ref = model(x, mask=mask, is_causal=True)
    grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    got = compiled(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(torch.autograd.grad(got.square().sum(), list(model.parameters())), grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    record = fsc.last_compile().graph("pre-grad").pass_record("lower-attention")
    assert record.stats["lowered"] == 2 == record.stats["attention_found"]


@pytest.mark.parametrize("fill", [-1e9, -1e4, torch.finfo(torch.float32).min])
def test_lower_attention_lowers_a_finite_causal_fill_as_minus_infinity(fill):
    model = SoftmaxBlock(is_causal=True, fill=fill)
    compiled = torch.compile(model, backend="freescale", options=lowering_everywhere("eager"))
    check_training_parity(model, compiled, torch.randn(2, 6, 64))
    (lowering,) = fsc.last_compile().graph("pre-grad").pass_record("lower-attention").stats["lowerings"]
    assert f"causal softmax, scale=0.1768, fill {fill:g} as -inf" in lowering and "checked at run time" in lowering


def scores_near_the_fill(q, k, v):
    s = q @ k.mT / 4.0
    s = s.masked_fill(torch.triu(torch.ones(4, 4, dtype=torch.bool), 1), -1e4)
    return s.softmax(-1) @ v


def test_lower_attention_checks_at_run_time_that_a_finite_fill_underflows():
    compiled = torch.compile(scores_near_the_fill, backend="freescale",
                             options={"inner": "eager", "passes": [LowerAttention(dense_on_cpu=True)]})
    q, k, v = (torch.randn(1, 1, 4, 16) for _ in range(3))
    torch.testing.assert_close(compiled(q, k, v), scores_near_the_fill(q, k, v))
    assert fsc.last_compile().graph("pre-grad").pass_record("lower-attention").stats["lowered"] == 1
    # every score about -9950: the masked -1e4 is within 104 of the row max, not an exact zero in eager
    q, k = torch.full((1, 1, 4, 16), 50.0), torch.full((1, 1, 4, 16), -49.75)
    with pytest.raises(RuntimeError, match="fill -10000 was lowered as -inf, exact only while"):
        compiled(q, k, v)


class CausalMaskBlock(SasRecBlock):
    """Causal attention through a mask tensor built in the model, as SASRec ports write it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        if self.sdpa["form"] == "sdpa_bool":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(n, n, dtype=torch.bool).tril())
        elif self.sdpa["form"] == "sdpa_additive":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=nn.Transformer.generate_square_subsequent_mask(n))
        else:
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + nn.Transformer.generate_square_subsequent_mask(n)
            o = s.softmax(-1) @ v
        return x + self.out(o.transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("form", ["sdpa_bool", "sdpa_additive", "softmax_additive"])
def test_lower_attention_proves_causal_mask_tensors_and_training_matches_eager(form):
    model = CausalMaskBlock(form=form)
    compiled = torch.compile(model, backend="freescale", options=lowering_everywhere("eager"))
    check_training_parity(model, compiled, torch.randn(2, 6, 64))
    (lowering,) = fsc.last_compile().graph("pre-grad").pass_record("lower-attention").stats["lowerings"]
    assert "[B, H, N, D]=[2, 2, 6, 32] causal softmax" in lowering


class ArbitraryMaskHstu(nn.Module):
    """SiLU attention over all tokens with a mask the pass cannot prove (an input)."""

    def forward(self, q, k, v, mask):
        a = F.silu(torch.einsum("thd,shd->hts", q, k)) / 8 * mask
        return torch.einsum("hts,shd->thd", a, v)


@pytest.mark.parametrize(
    "model, inputs, reason",
    [
        (SasRecBlock(), (torch.randn(2, 4, 64), torch.ones(4, 4, dtype=torch.bool)), "attn_mask is given"),
        (SasRecBlock(dropout_p=0.5), (torch.randn(2, 4, 64),), "dropout_p=0.5"),
        (SasRecBlock(dim=16), (torch.randn(2, 4, 16),), "head dim 8 not in [16, 256]"),
        (SasRecBlock(enable_gqa=True), (torch.randn(2, 4, 64),), "enable_gqa"),
        (ArbitraryMaskHstu(), (torch.randn(6, 2, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16),
                               torch.ones(6, 6)), "mask not recognised"),
    ],
    ids=["attn_mask", "dropout", "head_dim", "gqa", "arbitrary_mask"],
)
def test_lower_attention_declines_with_the_reason_and_leaves_the_graph(model, inputs, reason):
    for x in inputs:
        x.requires_grad_(x.is_floating_point() and x.dim() == 3)
    pre, _ = run_pass(model, *inputs)
    record = pre.pass_record("lower-attention")
    assert not record.modified and record.stats["lowered"] == 0 and record.stats["attention_found"] == 1
    assert any(reason in r for r in record.reasons), record.reasons
    assert pre.graph_after == pre.graph_before


def test_lower_attention_head_dim_options_bound_what_is_lowered():
    (p,) = parse_pipeline("lower-attention{min_head_dim=64,max_head_dim=128}")
    assert (p.min_head_dim, p.max_head_dim) == (64, 128)
    pre, _ = run_pass(SasRecBlock(is_causal=True), torch.randn(2, 4, 64), min_head_dim=64)
    assert any("head dim 32 not in [64, 256]" in r for r in pre.pass_record("lower-attention").reasons)


@pytest.mark.parametrize("options, needle", [
    ({"min_head_dim": 8}, "min_head_dim=8 must be an int in [16, 256]"),
    ({"max_head_dim": 512}, "max_head_dim=512"),
    ({"min_head_dim": 128, "max_head_dim": 64}, "min_head_dim=128 is above max_head_dim=64"),
])
def test_lower_attention_rejects_bad_options_naming_them(options, needle):
    with pytest.raises(fsc.OptionError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        LowerAttention(**options)


def test_lower_attention_is_the_pre_grad_stage_of_the_default_pipeline():
    config = fsc.Config.from_options(None)
    assert config.passes[0].name == "lower-attention"
    assert [p.name for p in passes_for_stage(config.passes, "pre-grad")] == ["lower-attention"]
    assert "lower-attention" not in [p.name for p in passes_for_stage(config.passes, "aten")]


def test_lower_attention_refuses_aten_graphs():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    ctx = fsc.PassContext(graph_kind="forward", cost_model=CostModel(DEVICE_PROFILES["cpu"]),
                          memory_budget_bytes=None)
    result = LowerAttention().run(gm, ctx)
    assert not result.modified and "pre-grad" in result.reasons[0]


def test_lower_attention_on_a_graph_without_attention_is_unchanged_and_not_recorded():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    ctx = fsc.PassContext(graph_kind="pre-grad", cost_model=CostModel(DEVICE_PROFILES["cpu"]),
                          memory_budget_bytes=None)
    result = LowerAttention().run(gm, ctx)
    assert not result.modified and result.reasons == () and result.stats["attention_found"] == 0
    model = nn.Linear(4, 4)
    torch.compile(model, backend="freescale", options={"inner": "eager"})(torch.randn(2, 4))
    assert set(fsc.last_compile().summary()) == {"forward"}  # no pre-grad graph in the record


def test_reference_drops_empty_sequences_without_changing_results():
    # lower-attention passes T + 1 offsets (most sequences empty); the CPU reference drops them
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    dense = torch.tensor([0, 4, 9])
    padded = torch.tensor([0, 0, 4, 4, 9, 9, 9, 9, 9, 9])
    outs = [jagged_attention(q, k, v, o, 5, mode=m) for o in (dense, padded) for m in ("hstu", "softmax")]
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], outs[3], rtol=0, atol=0)
