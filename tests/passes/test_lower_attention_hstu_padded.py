"""lower-attention on HSTU attention written as generative-recommenders' PyTorch reference
writes it: jagged q, k, v padded by ``fbgemm.jagged_to_padded_dense``, SiLU attention on
``[B, H, N, D]``, back through ``dense_to_jagged``. Golden printouts of the pass alone, then
an STU-like block compiled with ``backend="freescale"`` against eager (forward and
backward), the declines with their reasons, and the run-time length check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_golden_printouts import assert_golden, dynamo_graph, pre_grad_ctx, run_and_print
from torch import nn

import fsc
from fsc.inspect import STORE
from fsc.passes import LowerAttention

# lowered on CPU too (by default the form is kept off CUDA: the op does the padded graph's work, slower)
LOWERED = "lower-attention{dense_on_cpu=true},prioritize-collectives,split-collectives,overlap-schedule"

pytest.importorskip("fbgemm_gpu")

N, H, D = 4, 2, 16


def pad(x: torch.Tensor, offsets: torch.Tensor, n: int, value: float = 0.0) -> torch.Tensor:
    """[L, H, D] jagged -> [B, H, N, D] padded."""
    length, heads, dim = x.shape
    dense = torch.ops.fbgemm.jagged_to_padded_dense(values=x.view(length, heads * dim), offsets=[offsets],
                                                    max_lengths=[n], padding_value=value)
    return dense.view(offsets.numel() - 1, n, heads, dim).transpose(1, 2)


def causal_tril(n: int, device: torch.device) -> torch.Tensor:
    return torch.tril(torch.ones(n, n, device=device))


def causal_arange(n: int, device: torch.device) -> torch.Tensor:
    ids = torch.arange(n, device=device)
    return (ids.unsqueeze(1) >= ids.unsqueeze(0)).float()


def targets_mask(offsets: torch.Tensor, num_targets: torch.Tensor, n: int, window: int = 0) -> torch.Tensor:
    """[B, N, N]: causal over ids capped at the first target (targets see the history and
    themselves); with a window, keys at most ``window`` ids behind."""
    lengths = offsets[1:] - offsets[:-1]
    ids = torch.clamp(torch.arange(n).view(1, n), max=(lengths - num_targets).view(-1, 1))
    dist = ids.unsqueeze(2) - ids.unsqueeze(1)
    mask = torch.eye(n, dtype=torch.bool).unsqueeze(0) | (dist > 0)
    return (mask & (dist <= window) if window else mask).float()


def padded_hstu(q, k, v, offsets, n: int, alpha: float, mask: torch.Tensor | None) -> torch.Tensor:
    """SiLU attention of jagged [L, H, D] q, k, v through padded [B, H, N, D] tensors."""
    length, heads, dv = v.shape
    qk = torch.einsum("bhxa,bhya->bhxy", pad(q, offsets, n), pad(k, offsets, n)) * alpha
    qk = F.silu(qk) / n
    if mask is not None:
        qk = qk * (mask.unsqueeze(1) if mask.dim() == 3 else mask)
    out = torch.einsum("bhxd,bhdv->bhxv", qk, pad(v, offsets, n))
    return torch.ops.fbgemm.dense_to_jagged(out.transpose(1, 2).flatten(2, 3), [offsets], length)[0].view(
        length, heads, dv)


def hstu_causal(q, k, v, offsets):
    return padded_hstu(q, k, v, offsets, N, 0.5, causal_tril(N, q.device))


def hstu_arange_causal(q, k, v, offsets):
    return padded_hstu(q, k, v, offsets, N, 0.5, causal_arange(N, q.device)[None, None])


def hstu_full(q, k, v, offsets):
    return padded_hstu(q, k, v, offsets, N, 1.0, None)


def hstu_targets(q, k, v, offsets, num_targets):
    return padded_hstu(q, k, v, offsets, N, 0.5, targets_mask(offsets, num_targets, N))


def hstu_window(q, k, v, offsets, num_targets):
    return padded_hstu(q, k, v, offsets, N, 0.5, targets_mask(offsets, num_targets, N, window=2))


def hstu_key_padding(q, k, v, offsets):
    """A data-dependent mask the pass does not prove: keys within the sequence."""
    lengths = offsets[1:] - offsets[:-1]
    return padded_hstu(q, k, v, offsets, N, 0.5, (torch.arange(N)[None, :] < lengths[:, None])[:, None, :])


def hstu_matmul_permute(q, k, v, offsets):
    """The same attention through @ and permute, the mask as [1, 1, N, N] by indexing."""
    def padded(x):
        length = x.shape[0]
        dense = torch.ops.fbgemm.jagged_to_padded_dense(x.reshape(length, H * D), [offsets], [N])
        return dense.view(-1, N, H, D).permute(0, 2, 1, 3)

    qk = F.silu(padded(q) @ padded(k).transpose(-2, -1) * 0.25) / N * causal_tril(N, q.device)[None, None]
    out = (qk @ padded(v)).permute(0, 2, 1, 3).reshape(-1, N, H * D)
    return torch.ops.fbgemm.dense_to_jagged(out, [offsets], q.shape[0])[0]


def hstu_dense_output(q, k, v, offsets):
    """The padded output returned as it is: nothing jagged to replace."""
    qk = F.silu(torch.einsum("bhxa,bhya->bhxy", pad(q, offsets, N), pad(k, offsets, N))) / N * causal_tril(N, q.device)
    return torch.einsum("bhxd,bhdv->bhxv", qk, pad(v, offsets, N))


def hstu_divisor_not_n(q, k, v, offsets):
    qk = F.silu(torch.einsum("bhxa,bhya->bhxy", pad(q, offsets, N), pad(k, offsets, N))) / 8 * causal_tril(N, q.device)
    out = torch.einsum("bhxd,bhdv->bhxv", qk, pad(v, offsets, N))
    return torch.ops.fbgemm.dense_to_jagged(out.transpose(1, 2).flatten(2, 3), [offsets], q.shape[0])[0]


def jagged_inputs():
    g = torch.Generator().manual_seed(0)
    return (*(torch.randn(6, H, D, generator=g) for _ in range(3)), torch.tensor([0, 3, 5, 6]))


# form: (function, inputs, lowered?, a phrase of the lowering or of the reason)
FORMS = {
    "hstu_padded_causal": (hstu_causal, jagged_inputs(), True,
                           "q [L, H, D]=[6, 2, 16], alpha=0.5, /N=4, causal (tril(ones(N, N)))"),
    "hstu_padded_arange_causal": (hstu_arange_causal, jagged_inputs(), True,
                                  "causal (arange(N)[:, None] >= arange(N)[None, :])"),
    "hstu_padded_matmul_permute": (hstu_matmul_permute, jagged_inputs(), True,
                                   "alpha=0.25, /N=4, causal (tril(ones(N, N)))"),
    "hstu_padded_full": (hstu_full, jagged_inputs(), True, "alpha=1, /N=4, full (no mask"),
    "hstu_padded_targets": (hstu_targets, (*jagged_inputs(), torch.tensor([1, 0, 1])), True,
                            "causal (ids capped at length - num_targets: targets see the history and themselves)"),
    "hstu_padded_window": (hstu_window, (*jagged_inputs(), torch.tensor([1, 0, 1])), True,
                           "targets see the history and themselves, window max_attn_len=2)"),
    "hstu_padded_key_padding": (hstu_key_padding, jagged_inputs(), False,
                                "mask built from the offsets (sequence lengths, num_targets"),
    "hstu_padded_dense_output": (hstu_dense_output, jagged_inputs(), False,
                                 "the padded attention output is not only transposed to [B, N, H, V] (einsum_1 is used by "
                                 "the graph's output)"),
    "hstu_padded_divisor": (hstu_divisor_not_n, jagged_inputs(), False,
                            "scaled by 0.125, not 1/N for jagged_to_padded_dense's max length N=4"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_lower_attention_padded_hstu_form_matches_its_golden_printout(form):
    f, inputs, lowered, phrase = FORMS[form]
    gm = dynamo_graph(f, *inputs)
    record, before, text = run_and_print(form, gm, LowerAttention(dense_on_cpu=True), pre_grad_ctx())
    assert record.modified is lowered
    assert record.stats["attention_found"] == 1 and record.stats["lowered"] == int(lowered)
    said = record.stats["lowerings"] if lowered else record.reasons
    assert len(said) == 1 and phrase in said[0], said
    after = text.partition("# after")[2]
    if lowered:  # no padding round trip left
        assert "fsc.jagged_attention_fwd" in after and "fbgemm" not in after
    else:
        assert text.partition("# after\n")[2] == before
    assert_golden(f"lower_attention/{form}", text)


def hstu_targets_over_heads(q, k, v, offsets, num_targets):
    """The [B, N, N] targets mask not unsqueezed: with B == H it broadcasts over the heads."""
    qk = F.silu(torch.einsum("bhxa,bhya->bhxy", pad(q, offsets, N), pad(k, offsets, N))) / N
    out = torch.einsum("bhxd,bhdv->bhxv", qk * targets_mask(offsets, num_targets, N), pad(v, offsets, N))
    return torch.ops.fbgemm.dense_to_jagged(out.transpose(1, 2).flatten(2, 3), [offsets], q.shape[0])[0]


def test_lower_attention_declines_a_targets_mask_that_meets_the_heads_not_the_batch():
    q, k, v, _ = jagged_inputs()
    gm = dynamo_graph(hstu_targets_over_heads, q, k, v, torch.tensor([0, 2, 6]), torch.tensor([1, 0]))
    record, _, _ = run_and_print("targets_over_heads", gm, LowerAttention(dense_on_cpu=True), pre_grad_ctx())
    assert not record.modified
    (reason,) = record.reasons
    assert "the targets mask [2, 4, 4] does not broadcast as [B, 1, N, N] over the [B, H, N, N] weights" in reason


class Stu(nn.Module):
    """An STU-like block: u, v, q, k projections, padded SiLU attention, gated output."""

    def __init__(self, mask: str = "causal", dim: int = 32, n: int = 8, window: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.uvqk, self.out, self.mask, self.n = nn.Linear(dim, 4 * H * D), nn.Linear(H * D, dim), mask, n
        self.window = window

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, num_targets: torch.Tensor | None = None):
        length = x.shape[0]
        u, v, q, k = F.silu(self.uvqk(x)).split(H * D, dim=-1)
        mask = (causal_tril(self.n, x.device) if self.mask == "causal"
                else targets_mask(offsets, num_targets, self.n, self.window))
        attn = padded_hstu(q.view(length, H, D), k.view(length, H, D), v.view(length, H, D), offsets, self.n,
                           1.0 / D ** 0.5, mask)
        return x + self.out(u * attn.reshape(length, H * D))


def batch(lengths: list[int], dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    return torch.randn(int(offsets[-1]), dim, requires_grad=True), offsets


def check_parity(model: nn.Module, compiled, *inputs) -> None:
    x = inputs[0]
    params = [x, *model.parameters()]
    ref = model(*inputs)
    grads = torch.autograd.grad(ref.square().sum(), params)
    got = compiled(*inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(got.square().sum(), params), grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inner", ["eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_lower_attention_lowers_padded_stu_attention_and_training_matches_eager_across_lengths(inner):
    model = Stu()
    compiled = torch.compile(model, backend="freescale", options={"inner": inner, "passes": LOWERED})
    x, offsets = batch([3, 8, 1])
    torch._dynamo.mark_dynamic(x, 0)
    before = STORE.count
    check_parity(model, compiled, x, offsets)
    for lengths in ([5, 2, 6], [8, 8, 8]):  # other lengths, the same N and batch: the same graph
        check_parity(model, compiled, *batch(lengths))
    assert STORE.count - before == 1
    pre = fsc.last_compile().graph("pre-grad")
    (lowering,) = pre.pass_record("lower-attention").stats["lowerings"]
    assert "HSTU SiLU attention padded by fbgemm" in lowering and "/N=8, causal (tril(ones(N, N)))" in lowering
    assert "fbgemm.jagged_to_padded_dense" in pre.graph_before
    assert "= torch.ops.fbgemm" not in pre.graph_after and "fsc.jagged_attention_fwd" in pre.graph_after


def test_lower_attention_checks_at_run_time_that_no_sequence_is_longer_than_the_padding():
    model = Stu()
    compiled = torch.compile(model, backend="freescale", options={"inner": "eager", "passes": LOWERED})
    x, offsets = batch([3, 8, 1])
    compiled(x, offsets)
    x, offsets = batch([3, 9, 1])  # jagged_to_padded_dense would drop the 9th token's keys
    with pytest.raises(RuntimeError, match="at most jagged_to_padded_dense's max length N=8"):
        compiled(x, offsets)


def test_lower_attention_lowers_the_num_targets_mask_and_training_matches_eager():
    model = Stu(mask="targets")
    compiled = torch.compile(model, backend="freescale", options={"inner": "eager", "passes": LOWERED})
    for lengths, targets in (([3, 8, 1], [1, 2, 0]), ([3, 8, 1], [3, 0, 1])):
        check_parity(model, compiled, *batch(lengths), torch.tensor(targets))
    (lowering,) = fsc.last_compile().graph("pre-grad").pass_record("lower-attention").stats["lowerings"]
    assert "causal (ids capped at length - num_targets" in lowering
    with pytest.raises(RuntimeError, match=r"exact only while 0 <= num_targets\[b\] <= the length of sequence b"):
        compiled(*batch([3, 8, 1]), torch.tensor([4, 0, 0]))


def test_lower_attention_lowers_a_windowed_targets_mask_and_training_matches_eager():
    model = Stu(mask="targets", window=2)
    compiled = torch.compile(model, backend="freescale", options={"inner": "eager", "passes": LOWERED})
    check_parity(model, compiled, *batch([3, 8, 1]), torch.tensor([1, 2, 0]))
    (lowering,) = fsc.last_compile().graph("pre-grad").pass_record("lower-attention").stats["lowerings"]
    assert "window max_attn_len=2" in lowering


def test_lower_attention_declines_a_key_padding_mask_naming_it_and_matches_eager():
    q, k, v, offsets = (x.requires_grad_(x.is_floating_point()) for x in jagged_inputs())
    compiled = torch.compile(hstu_key_padding, backend="freescale", options={"inner": "eager", "passes": LOWERED})
    got = compiled(q, k, v, offsets)
    torch.testing.assert_close(got, hstu_key_padding(q, k, v, offsets))
    got.sum().backward()
    record = fsc.last_compile().graph("pre-grad").pass_record("lower-attention")
    assert not record.modified and record.stats["lowered"] == 0 and record.stats["attention_found"] == 1
    (reason,) = record.reasons
    assert "mask built from the offsets (sequence lengths, num_targets, a window or a contextual prefix) not recognised" in reason


@pytest.mark.parametrize("form", ["hstu_padded_arange_causal", "hstu_padded_full", "hstu_padded_matmul_permute"])
def test_lower_attention_padded_hstu_forms_match_eager_forward_and_backward(form):
    f, _, _, phrase = FORMS[form]
    offsets = torch.tensor([0, 4, 5, 5, 7])  # a full sequence, a short one, an empty one
    q, k, v = (torch.randn(7, H, D, requires_grad=True) for _ in range(3))
    ref = f(q, k, v, offsets)
    grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    got = torch.compile(f, backend="freescale", options={"inner": "eager", "passes": LOWERED})(q, k, v, offsets)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    (lowering,) = fsc.last_compile().graph("pre-grad").pass_record("lower-attention").stats["lowerings"]
    assert phrase in lowering


def test_lower_attention_keeps_padded_stu_attention_off_cuda_by_default():
    model = Stu()
    compiled = torch.compile(model, backend="freescale", options={"inner": "eager"})
    x, offsets = batch([3, 8, 1])
    check_parity(model, compiled, x, offsets)
    record = fsc.last_compile().graph("pre-grad").pass_record("lower-attention")
    assert record.stats["lowered"] == 0 and record.stats["kept"] == 1
    (reason,) = record.reasons
    assert "kept: HSTU SiLU attention padded by fbgemm" in reason and "dense_on_cpu=true" in reason
