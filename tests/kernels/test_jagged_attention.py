"""fsc.kernels.jagged_attention: the Triton kernels (under the interpreter, in a worker: see
conftest.py) against the float64 reference, the reference against the stated semantics,
registration (opcheck, torch.compile), and every argument check."""

from __future__ import annotations

import importlib
import math

import _attention_cases as cases
import pytest
import torch
from _attention_cases import Case
from torch.nn import functional as F

from fsc.kernels import jagged_attention, jagged_attention_reference

# the function shadows its module's name on fsc.kernels
ja = importlib.import_module("fsc.kernels.jagged_attention")

ODD = (1, 7, 0, 129)  # odd lengths and an empty sequence
MASKS = dict(targets=(1, 2, 0, 3), contextual_len=3, max_attn_len=5)
BIAS = dict(pos_p=6, time_buckets=8)

FP32_CASES = [
    Case(mode="hstu", lengths=ODD),
    Case(mode="softmax", lengths=ODD),
    Case(mode="hstu", lengths=(1, 7, 0, 40), **MASKS, **BIAS),
    Case(mode="softmax", lengths=(1, 7, 0, 40), **MASKS, **BIAS),
    Case(mode="hstu", lengths=(5, 0, 33), targets=(2, 0, 4)),
    Case(mode="softmax", lengths=(5, 0, 33), targets=(5, 0, 1)),
    # a prefix longer than some sequences
    Case(mode="hstu", lengths=(2, 9, 30), contextual_len=4, pos_p=4),
    Case(mode="softmax", lengths=(2, 9, 30), contextual_len=4, time_buckets=3),
    Case(mode="hstu", lengths=(1, 7, 40), max_attn_len=3),
    Case(mode="softmax", lengths=(1, 7, 40), max_attn_len=3, targets=(0, 2, 5)),
    # windows wider than a block reach across block boundaries with a long prefix
    Case(mode="hstu", lengths=(3, 70), contextual_len=20, max_attn_len=17, targets=(1, 6), **BIAS),
    Case(mode="hstu", lengths=(1, 7, 0, 40), causal=False, **MASKS, pos_p=6),
    Case(mode="softmax", lengths=(1, 7, 0, 40), causal=False, **MASKS, time_buckets=8),
    # head dims: not a power of two, q/k and v differ, larger
    Case(mode="hstu", lengths=(1, 7, 129), heads=1, d=48, dv=64),
    Case(mode="softmax", lengths=(7, 65), heads=1, d=64, dv=32, targets=(1, 3)),
    # a max_seq_len larger than every length: HSTU divides by it, not by the length
    Case(mode="hstu", lengths=(3, 9), max_seq_len=50),
    # empty: all sequences empty (T = 0), and no sequences at all (B = 0)
    Case(mode="hstu", lengths=(0, 0, 0), **BIAS),
    Case(mode="softmax", lengths=(), targets=()),
    # non-square blocks, through the launchers
    Case(mode="hstu", lengths=(1, 7, 0, 40), **MASKS, **BIAS, blocks=(32, 16)),
    Case(mode="softmax", lengths=(1, 7, 0, 40), **MASKS, **BIAS, blocks=(16, 32)),
]

LOW_PRECISION_CASES = [
    Case(mode="hstu", lengths=(1, 7, 0, 50), dtype="bfloat16", **MASKS, **BIAS),
    Case(mode="softmax", lengths=(1, 7, 0, 50), dtype="bfloat16", **MASKS, **BIAS),
    Case(mode="hstu", lengths=(1, 7, 33), dtype="float16", d=32, dv=32, targets=(0, 1, 2)),
    Case(mode="softmax", lengths=(1, 7, 33), dtype="float16", d=32, dv=32, max_attn_len=4),
]


# The fast subset (make test-fast) keeps one interpreter case per kernel mode: masks, both bias
# tables, an empty and a length-1 sequence, and one crossing a block boundary (about 3 s each
# under the interpreter). The rest of the sweep, the 16-bit cases and opcheck through the
# interpreter (about 1-8 s each, 67 s together on 2 cores) are marked slow: make test runs them.
REPRESENTATIVE = (
    Case(mode="hstu", lengths=(1, 7, 0, 40), **MASKS, **BIAS),
    Case(mode="softmax", lengths=(1, 7, 0, 40), **MASKS, **BIAS),
)


def slow_unless_representative(sweep: list[Case]) -> list:
    return [case if case in REPRESENTATIVE else pytest.param(case, marks=pytest.mark.slow) for case in sweep]


def test_fast_subset_keeps_an_interpreter_case_per_kernel_mode():
    assert all(case in FP32_CASES for case in REPRESENTATIVE)
    assert {case.mode for case in REPRESENTATIVE} == {"hstu", "softmax"}


def test_worker_runs_triton_in_interpreter_mode(interpreter):
    assert interpreter.submit(cases.interpreted).result() is True


@pytest.mark.parametrize("case", slow_unless_representative(FP32_CASES), ids=str)
def test_kernels_match_float64_reference_in_float32(interpreter, case):
    for name, (err, _, scale) in interpreter.submit(cases.errors, case).result().items():
        assert err <= 1e-5 * max(scale, 1e-30), f"{name}: max error {err:.3g} vs max |value| {scale:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_kernels_in_16_bit_err_at_most_twice_the_16_bit_reference(interpreter, case):
    for name, (err, ref_err, scale) in interpreter.submit(cases.errors, case).result().items():
        assert err <= 2 * ref_err, f"{name}: kernel error {err:.3g} > 2 x reference error {ref_err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hstu", "softmax"])
def test_opcheck_with_triton_impl(interpreter, mode):
    interpreter.submit(cases.opcheck, Case(mode=mode, lengths=(1, 7, 0, 20), **MASKS, **BIAS)).result()


# On CPU: the grouped path, the plain reference (about 1 s each). The schema, fake and autograd
# registration are the op's, shared by both impls; the fast subset keeps "auto", the path a CPU
# caller gets, and leaves "reference" (its outputs against the fake's) to make test.
@pytest.mark.parametrize("impl", ["auto", pytest.param("reference", marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", ["hstu", "softmax"])
def test_opcheck_with_cpu_impls(mode, impl):
    x = cases.make_inputs(Case(mode=mode, lengths=(1, 7, 0, 12), **MASKS, **BIAS))
    o = x["options"]
    q, k, v = (x[n].float().requires_grad_() for n in ("q", "k", "v"))
    tables = [o[n].float().requires_grad_() for n in ("position_bias", "time_bias")]
    args = (q, k, v, x["offsets"], o["num_targets"], o["timestamps"], *tables, x["max_seq_len"], mode == "softmax",
            0.25, True, 3, 5, impl)
    torch.library.opcheck(torch.ops.fsc.jagged_attention_fwd.default, args)
    # non-contiguous q, k, v ([H, T, D] storage seen as [T, H, D])
    q, k, v = (t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.fsc.jagged_attention_fwd.default, (q, k, v, *args[3:]))


# --- the reference against the semantics as stated -------------------------------------

def _mask(length, *, targets=None, contextual_len=0, max_attn_len=0, causal=True) -> torch.Tensor:
    offsets = torch.tensor([0, length])
    parts = ja._reference_scores(
        torch.zeros(length, 1, 16), torch.zeros(length, 1, 16), torch.zeros(length, 1, 16), offsets, length,
        scale=1.0, causal=causal, num_targets=torch.tensor([targets]) if targets is not None else None,
        contextual_len=contextual_len, max_attn_len=max_attn_len, position_bias=None, timestamps=None, time_bias=None)
    return parts["visible"][0, 0].int()


def test_reference_mask_prefix_and_targets_golden():
    # positions 0-1 prefix, 2-3 history, 4-5 targets
    assert _mask(6, targets=2, contextual_len=2).tolist() == [
        [1, 1, 1, 1, 0, 0],  # prefix rows see every non-target, also later ones
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0],  # history: causal, sees the prefix
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],  # targets: prefix, history and themselves, not each other
        [1, 1, 1, 1, 0, 1],
    ]
    # a window of 1 id: history keeps the previous id only; prefix rows are exempt
    assert _mask(6, targets=2, contextual_len=2, max_attn_len=1).tolist() == [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 0, 1],
    ]


def _rules(length, targets, c, window, causal) -> list[list[int]]:
    """The module docstring's rules, one pair at a time."""
    cap = length - targets + (1 - c if c > 0 else 0)

    def ident(p):
        return min(max(p - c + 1, 0) if c > 0 else p, cap)

    rows = []
    for i in range(length):
        row = []
        for j in range(length):
            d = ident(i) - ident(j)
            d = d if causal else abs(d)
            row.append(int(i == j or (d > 0 and (window == 0 or d <= window))
                           or (c > 0 and ident(i) == 0 and ident(j) < cap)))
        rows.append(row)
    return rows


@pytest.mark.parametrize("causal", [True, False])
def test_reference_mask_follows_the_stated_rules(causal):
    for length in (1, 2, 5, 9):
        for targets in range(0, min(length, 3) + 1):
            for c in (0, 1, 3, 12):
                for window in (0, 1, 3):
                    got = _mask(length, targets=targets, contextual_len=c, max_attn_len=window, causal=causal)
                    assert got.tolist() == _rules(length, targets, c, window, causal), (length, targets, c, window)


def test_reference_hstu_is_silu_over_max_seq_len_with_alpha_inside():
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 1, 16, dtype=torch.float64), torch.randn(5, 1, 16, dtype=torch.float64), \
        torch.randn(5, 1, 16, dtype=torch.float64)
    offsets, n, alpha = torch.tensor([0, 2, 5]), 8, 0.3
    out = jagged_attention_reference(q, k, v, offsets, n, alpha=alpha)
    expected = torch.zeros_like(out)
    for start, end in ((0, 2), (2, 5)):
        for i in range(start, end):
            for j in range(start, i + 1):
                expected[i] += F.silu(alpha * (q[i] * k[j]).sum(-1, keepdim=True)) / n * v[j]
    torch.testing.assert_close(out, expected)


def test_reference_softmax_matches_sdpa_per_sequence():
    torch.manual_seed(0)
    q, k, v = (torch.randn(9, 2, 16, dtype=torch.float64) for _ in range(3))
    offsets = torch.tensor([0, 4, 4, 9])
    out = jagged_attention_reference(q, k, v, offsets, 5, mode="softmax", scale=0.5)
    for start, end in ((0, 4), (4, 9)):
        sl = slice(start, end)
        expected = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
                                                  is_causal=True, scale=0.5).transpose(0, 1)
        torch.testing.assert_close(out[sl], expected)


def test_reference_bias_tables_index_by_clipped_id_distance_and_log2_time():
    h, length = 1, 4
    offsets = torch.tensor([0, length])
    position_bias = torch.tensor([[10.0, 20.0, 30.0]])  # columns: distance key - query = -1, 0, +1
    time_bias = torch.tensor([[100.0, 200.0, 300.0]])
    timestamps = torch.tensor([0, 1, 3, 100])
    parts = ja._reference_scores(
        torch.zeros(length, h, 16), torch.zeros(length, h, 16), torch.zeros(length, h, 16), offsets, length,
        scale=1.0, causal=True, num_targets=None, contextual_len=0, max_attn_len=0, position_bias=position_bias,
        timestamps=timestamps, time_bias=time_bias)
    s = parts["s"][0, 0]
    # query 3, key 0: distance -3 clips to -(P-1) = -1; |dt| = 100: floor(log2 101) = 6 caps at NB-1 = 2
    assert s[3, 0] == 10.0 + 300.0
    # query 2, key 1: distance -1; |dt| = 2: floor(log2 3) = 1
    assert s[2, 1] == 10.0 + 200.0
    # query 1, key 1: distance 0; dt = 0: bucket 0
    assert s[1, 1] == 20.0 + 100.0


def test_time_bucket_is_exact_next_to_powers_of_two():
    dt = torch.tensor([d for k in range(1, 45) for d in (2 ** k - 2, 2 ** k - 1, 2 ** k)], dtype=torch.int64)
    expected = torch.tensor([(int(d) + 1).bit_length() - 1 for d in dt])
    assert torch.equal(ja._reference_time_bucket(dt, 64), expected)
    assert torch.equal(ja._reference_time_bucket(-dt, 64), expected)


@pytest.mark.parametrize("mode", ["hstu", "softmax"])
def test_reference_backward_maths_matches_autograd(mode):
    x = cases.make_inputs(Case(mode=mode, lengths=(1, 7, 0, 12), **MASKS, **BIAS))
    leaves, options = cases._leaves(x, torch.float64)
    out = jagged_attention_reference(*leaves[:3], x["offsets"], x["max_seq_len"], **options)
    expected = torch.autograd.grad(out, leaves, x["dout"])
    options.pop("mode")
    got = ja._reference_backward(x["dout"], *(t.detach() for t in leaves[:3]), x["offsets"], x["max_seq_len"],
                                 softmax=mode == "softmax", scale=1 / math.sqrt(16),
                                 **{n: (t.detach() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                                    for n, t in options.items()})
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


# several length groups: skewed lengths, a run of equal ones, empties, a length-1 sequence
SPREAD = (1, 200, 3, 0, 57, 57, 57, 120, 9, 0, 31, 180, 2, 75)
GROUPED_CASES = [c for c in FP32_CASES if c.blocks is None] + [
    Case(mode="hstu", lengths=SPREAD, **BIAS),
    Case(mode="softmax", lengths=SPREAD, pos_p=6),
    Case(mode="hstu", lengths=SPREAD, targets=tuple(min(n, 3) for n in SPREAD), contextual_len=2, max_attn_len=40,
         time_buckets=12),
]


def _spy_on_grouped(monkeypatch) -> list[str]:
    """Record each call of the grouped implementation (the op looks it up in its module)."""
    calls: list[str] = []
    for name in ("grouped_forward", "grouped_backward"):
        real = getattr(ja, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(ja, name, spy)
    return calls


@pytest.mark.parametrize("case", GROUPED_CASES, ids=str)
def test_cpu_op_runs_the_grouped_path_matching_float64_reference(case, monkeypatch):
    """impl="auto" on CPU tensors: the length-grouped implementation, in float32, within 1e-5
    of the float64 reference, forward and every gradient (the tables' too)."""
    calls = _spy_on_grouped(monkeypatch)
    x = cases.make_inputs(case)
    truth = cases.reference_results(x, torch.float64)
    leaves, options = cases._leaves(x, torch.float32)
    out = jagged_attention(*leaves[:3], x["offsets"], x["max_seq_len"], **options)
    got = [out, *torch.autograd.grad(out, leaves, x["dout"].float())]
    assert calls == ["grouped_forward", "grouped_backward"]
    assert len(got) == len(truth)
    for g, t in zip(got, truth):
        scale = float(t.abs().max()) if t.numel() else 0.0
        torch.testing.assert_close(g.double(), t, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("group_cost", [0.0, 1.0], ids=["a-group-per-bucket", "one-group"])
@pytest.mark.parametrize("case", GROUPED_CASES[-3:], ids=str)
def test_grouped_path_is_exact_however_the_sequences_are_grouped(case, group_cost, monkeypatch):
    monkeypatch.setattr("fsc.kernels.attention_grouped._SECONDS_PER_GROUP", group_cost)
    test_cpu_op_runs_the_grouped_path_matching_float64_reference(case, monkeypatch)


@pytest.mark.inductor
def test_grouped_path_takes_non_contiguous_inputs_and_returns_contiguous_gradients():
    """q, k, v as transposes of [H, T, D] tensors: the op's gradients are contiguous, as its
    fake implementation declares, so Inductor-compiled code can rely on them."""
    x = cases.make_inputs(Case(mode="hstu", lengths=SPREAD[:6], **BIAS))
    o = x["options"]

    def run(fn):
        q, k, v = (x[n].float().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for n in "qkv")
        assert not q.is_contiguous()
        out = fn(q, k, v, x["offsets"], x["max_seq_len"], position_bias=o["position_bias"].float(),
                 time_bias=o["time_bias"].float(), timestamps=o["timestamps"])
        return [out, *torch.autograd.grad(out, (q, k, v), x["dout"].float())]

    eager = run(jagged_attention)
    assert all(g.is_contiguous() for g in eager[1:])
    compiled = run(torch.compile(jagged_attention, backend="inductor", fullgraph=True))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e)


def test_length_groups_cover_each_nonempty_sequence_once_and_cut_padding():
    import numpy as np

    from fsc.kernels.attention_grouped import plan_groups

    lengths = np.array(SPREAD * 4)
    groups = plan_groups(lengths, heads=2, dim=64)
    members = np.concatenate(groups)
    assert sorted(members.tolist()) == [i for i, n in enumerate(lengths) if n > 0]
    assert len(groups) > 1
    padded = sum(len(g) * int(lengths[g].max()) ** 2 for g in groups)
    assert padded < 0.6 * (lengths > 0).sum() * int(lengths.max()) ** 2
    assert plan_groups(np.array([0, 0]), 2, 64) == []
    assert [g.tolist() for g in plan_groups(np.array([5]), 2, 64)] == [[0]]


def test_grouped_time_bucket_is_exact_on_both_paths():
    from fsc.kernels.attention_grouped import time_bucket

    small = [d for k in range(1, 52) for d in (2 ** k - 2, 2 ** k - 1, 2 ** k)]
    large = small + [2 ** 53 - 1, 2 ** 53, 2 ** 60 + 5]  # past 2**53: the shift-corrected path
    for values in (small, large):
        dt = torch.tensor(values, dtype=torch.int64)
        expected = torch.tensor([(int(d) + 1).bit_length() - 1 for d in values])
        assert torch.equal(time_bucket(dt, 64), expected)
        assert torch.equal(time_bucket(-dt, 64), expected)
        assert torch.equal(time_bucket(dt, 20), expected.clamp_max(19))


def test_cpu_op_upcasts_bfloat16_to_float32():
    x = cases.make_inputs(Case(mode="hstu", lengths=(3, 9), pos_p=3))
    leaves, options = cases._leaves(x, torch.bfloat16)
    out = jagged_attention(*leaves[:3], x["offsets"], x["max_seq_len"], **options)
    out.sum().backward()
    assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in leaves)
    expected = jagged_attention_reference(*(t.detach().float() for t in leaves[:3]), x["offsets"], x["max_seq_len"],
                                          position_bias=options["position_bias"].detach().float())
    torch.testing.assert_close(out, expected.bfloat16())


def test_compiled_matches_eager_on_cpu():
    x = cases.make_inputs(Case(mode="softmax", lengths=(1, 7, 0, 12), **MASKS, **BIAS))

    def run(fn):
        leaves, options = cases._leaves(x, torch.float32)
        out = fn(*leaves[:3], x["offsets"], x["max_seq_len"], **options)
        return [out, *torch.autograd.grad(out, leaves, x["dout"].float())]

    compiled = torch.compile(jagged_attention, backend="aot_eager", fullgraph=True)
    for c, e in zip(run(compiled), run(jagged_attention)):
        torch.testing.assert_close(c, e)


# --- errors -----------------------------------------------------------------------------

def test_triton_impl_on_cpu_without_interpreter_raises(monkeypatch):
    # as in any process where triton was imported without TRITON_INTERPRET=1
    monkeypatch.setattr(ja, "_is_interpreted", lambda kernel: False)
    q = torch.randn(3, 1, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        jagged_attention(q, q, q, torch.tensor([0, 3]), 3, impl="triton")


def test_triton_impl_on_cpu_cannot_be_traced():
    q = torch.randn(3, 1, 16)
    fn = torch.compile(lambda q: jagged_attention(q, q, q, torch.tensor([0, 3]), 3, impl="triton"),
                       backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="cannot be traced"):
        fn(q)


def _good() -> dict:
    t = 5
    return dict(q=torch.randn(t, 2, 16), k=torch.randn(t, 2, 16), v=torch.randn(t, 2, 16),
                offsets=torch.tensor([0, 2, 5]), max_seq_len=4)


KV = {"k": torch.randn(6, 2, 16), "v": torch.randn(6, 2, 16), "kv_offsets": torch.tensor([0, 2, 6])}

BAD = [
    ({"mode": "relu"}, ValueError, "mode must be one of"),
    ({"impl": "cuda"}, ValueError, "impl must be one of"),
    ({"q": torch.randn(5, 32)}, ValueError, "q must be a 3-D tensor"),
    ({"k": "k"}, ValueError, "k must be a 3-D tensor"),
    ({"v": torch.randn(5, 2, 16, dtype=torch.float64)}, TypeError, "v must have a dtype in"),
    ({"q": torch.randn(5, 0, 16), "k": torch.randn(5, 0, 16), "v": torch.randn(5, 0, 16)}, ValueError,
     "q must have at least one head"),
    ({"k": torch.randn(5, 2, 32)}, ValueError, "k must have q's shape"),
    ({"v": torch.randn(5, 3, 16)}, ValueError, "v must be \\[T, H, Dv\\]"),
    ({"k": torch.randn(5, 2, 16, dtype=torch.bfloat16)}, TypeError, "q, k and v must share a dtype"),
    ({"q": torch.randn(5, 2, 8), "k": torch.randn(5, 2, 8)}, ValueError, "q's head dim must be in"),
    ({"v": torch.randn(5, 2, 512)}, ValueError, "v's head dim must be in"),
    ({"offsets": torch.tensor([[0, 5]])}, ValueError, "offsets must be a 1-D tensor"),
    ({"offsets": torch.tensor([0.0, 5.0])}, TypeError, "offsets must be int32 or int64"),
    ({"offsets": torch.tensor([], dtype=torch.int64)}, ValueError, "offsets must have B\\+1 >= 1 entries"),
    ({"max_seq_len": 0}, ValueError, "max_seq_len must be a positive int"),
    ({"max_seq_len": 4.0}, ValueError, "max_seq_len must be a positive int"),
    ({"contextual_len": -1}, ValueError, "contextual_len must be a non-negative int"),
    ({"max_attn_len": True}, ValueError, "max_attn_len must be a non-negative int"),
    ({"num_targets": torch.tensor([1])}, ValueError, "num_targets must have 2 entries"),
    ({"num_targets": torch.tensor([1, 1], device="meta")}, ValueError, "num_targets must be on q's device"),
    ({"position_bias": torch.randn(3, 5)}, ValueError, "position_bias must be a 2-D tensor \\[H=2"),
    ({"position_bias": torch.ones(2, 5, dtype=torch.int64)}, TypeError, "position_bias must be floating point"),
    ({"position_bias": torch.randn(2, 5, device="meta")}, ValueError, "position_bias must be on q's device"),
    ({"position_bias": torch.randn(2, 4)}, ValueError, "an odd number of columns"),
    ({"time_bias": torch.randn(2, 4)}, ValueError, "time_bias and timestamps go together"),
    ({"timestamps": torch.arange(5)}, ValueError, "time_bias and timestamps go together"),
    ({"time_bias": torch.randn(2, 4), "timestamps": torch.arange(4)}, ValueError, "timestamps must have 5 entries"),
    ({"scale": 0.5}, ValueError, "scale is the softmax-mode factor"),
    ({"mode": "softmax", "alpha": 0.5}, ValueError, "alpha is the hstu-mode factor"),
    ({"alpha": "0.5"}, TypeError, "alpha must be a float"),
    ({"offsets": torch.tensor([1, 2, 5])}, ValueError, "offsets must rise from 0 to T=5"),
    ({"offsets": torch.tensor([0, 3, 2, 5])}, ValueError, "offsets must rise from 0 to T=5"),
    ({"offsets": torch.tensor([0, 5])}, ValueError, "length 5 > max_seq_len=4"),
    ({"num_targets": torch.tensor([1, 4])}, ValueError, "num_targets must lie in"),
    # separate key extents: q has 5 tokens in sequences of 2 and 3; k and v have 6 (2 and 4)
    ({"kv_offsets": torch.tensor([0, 6])}, ValueError, "kv_offsets must have 3 entries"),
    ({"kv_offsets": torch.tensor([0, 2, 6]).float()}, TypeError, "kv_offsets must be int32 or int64"),
    ({"q_start": torch.tensor([0, 0])}, ValueError, "q_start needs kv_offsets"),
    ({**KV, "q_start": torch.tensor([0])}, ValueError, "q_start must have 2 entries"),
    ({**KV, "k": torch.randn(6, 2, 32)}, ValueError, "k must be \\[Tk, H, D\\] with q's H and D"),
    ({**KV, "v": torch.randn(5, 2, 16)}, ValueError, "v must be \\[T, H, Dv\\] with k's T and H"),
    ({**KV, "kv_offsets": torch.tensor([0, 2, 5])}, ValueError, "kv_offsets must rise from 0 to Tk=6"),
    ({**KV, "kv_offsets": torch.tensor([0, 1, 6])}, ValueError, "key extent of length 5 > max_seq_len=4"),
    # queries outside their key extent: allowed, except with a prefix, a window or timestamps
    ({**KV, "kv_offsets": torch.tensor([0, 1, 6]), "max_seq_len": 8, "contextual_len": 1}, ValueError,
     "with contextual_len the key extents must hold the queries' positions: 0 <= q_start and query length"),
    ({**KV, "q_start": torch.tensor([1, 0]), "max_attn_len": 2}, ValueError,
     "with max_attn_len the key .* q_start \\+ query length <= key length"),
    ({**KV, "q_start": torch.tensor([-1, 0]), "time_bias": torch.randn(2, 4), "timestamps": torch.arange(6)},
     ValueError, "with timestamps the key extents must hold"),
    ({**KV, "num_targets": torch.tensor([3, 0])}, ValueError, "num_targets must lie in \\[0, key length\\]"),
    ({**KV, "time_bias": torch.randn(2, 4), "timestamps": torch.arange(5)}, ValueError,
     "timestamps must have 6 entries"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD, ids=[b[2] for b in BAD])
def test_bad_argument_raises_naming_it(change, error, match):
    args = _good() | change
    positional = [args.pop(n) for n in ("q", "k", "v", "offsets", "max_seq_len")]
    with pytest.raises(error, match=match):
        jagged_attention(*positional, **args)


def test_reference_rejects_bad_arguments_too():
    args = _good()
    with pytest.raises(ValueError, match="k must have q's shape"):
        jagged_attention_reference(args["q"], args["q"][:, :, :8], args["v"], args["offsets"], 4)


# --- split sequences: separate key/value extents ----------------------------------------
# A sequence cut at p into chunks [0, p) and [p, L), each run with its queries against keys
# [0, end) (the whole sequence for prefix rows and causal=False), gives the unsplit op's
# outputs, and gradients once k's and v's are summed over the chunks that read them.

SPLITS = [
    # cuts: at 0 (first chunk empty), mid-block, at the end (second chunk has keys, no queries)
    (Case(mode="hstu", lengths=(7, 40, 0, 1)), (3, 17, 0, 1)),
    (Case(mode="softmax", lengths=(7, 40, 0, 1)), (0, 17, 0, 0)),
    # targets (40 - 3 = 37: a cut at 38 falls among them), prefix, window, both bias tables
    (Case(mode="hstu", lengths=(1, 7, 0, 40), **MASKS, **BIAS), (0, 5, 0, 38)),
    (Case(mode="softmax", lengths=(1, 7, 0, 40), **MASKS, **BIAS), (1, 2, 0, 20)),
    (Case(mode="hstu", lengths=(3, 70), contextual_len=20, max_attn_len=17, targets=(1, 6), **BIAS), (2, 33)),
    (Case(mode="softmax", lengths=(5, 33), targets=(5, 1), max_attn_len=4, pos_p=3), (2, 32)),
    (Case(mode="hstu", lengths=(1, 7, 0, 40), causal=False, **MASKS, pos_p=6), (1, 4, 0, 25)),
    (Case(mode="softmax", lengths=(1, 7, 0, 40), causal=False, **MASKS, time_buckets=8), (0, 7, 0, 39)),
]
SPLIT_IDS = [f"{case}_cut{'-'.join(map(str, cuts))}" for case, cuts in SPLITS]
# query blocks that start off the key blocks' grid, with blocks other than the interpreter's;
# 16-bit chunks
SPLITS_TRITON_ONLY = [
    (Case(mode="hstu", lengths=(1, 7, 0, 40), **MASKS, **BIAS, blocks=(32, 16)), (0, 5, 0, 21)),
    (Case(mode="softmax", lengths=(1, 7, 0, 40), **MASKS, **BIAS, blocks=(16, 32)), (1, 3, 0, 37)),
]
SPLITS_16_BIT = [
    (Case(mode="hstu", lengths=(7, 50), dtype="bfloat16", targets=(1, 3), contextual_len=3, max_attn_len=5, **BIAS),
     (3, 29)),
    (Case(mode="softmax", lengths=(7, 50), dtype="bfloat16", targets=(1, 3), contextual_len=3, max_attn_len=5,
          **BIAS), (3, 29)),
]


@pytest.mark.parametrize(("case", "cuts"), SPLITS, ids=SPLIT_IDS)
def test_reference_split_sequence_equals_unsplit(case, cuts):
    for name, (err, _, scale) in cases.split_errors(case, cuts, "reference").items():
        assert err <= 1e-12 * max(scale, 1.0), f"{name}: max error {err:.3g} vs max |value| {scale:.3g}"


@pytest.mark.parametrize(("case", "cuts"), SPLITS, ids=SPLIT_IDS)
def test_cpu_op_split_sequence_matches_unsplit_float64_reference(case, cuts, monkeypatch):
    calls = _spy_on_grouped(monkeypatch)
    for name, (err, _, scale) in cases.split_errors(case, cuts, "auto").items():
        assert err <= 1e-5 * max(scale, 1e-30), f"{name}: max error {err:.3g} vs max |value| {scale:.3g}"
    assert calls == ["grouped_forward", "grouped_forward", "grouped_backward", "grouped_backward"]


# under the interpreter, one case per mode with every mask and both tables in the fast subset (2-4 s
# each); the rest in make test
SPLIT_REPRESENTATIVE = (SPLITS[2], SPLITS[3])


@pytest.mark.parametrize(("case", "cuts"), [s if s in SPLIT_REPRESENTATIVE else pytest.param(*s, marks=pytest.mark.slow)
                                            for s in SPLITS], ids=SPLIT_IDS)
def test_kernels_split_sequence_match_unsplit_float64_reference(interpreter, case, cuts):
    for name, (err, _, scale) in interpreter.submit(cases.split_errors, case, cuts, "triton").result().items():
        assert err <= 1e-5 * max(scale, 1e-30), f"{name}: max error {err:.3g} vs max |value| {scale:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize(("case", "cuts"), SPLITS_TRITON_ONLY, ids=str)
def test_kernels_split_sequence_with_other_blocks_match_unsplit_float64_reference(interpreter, case, cuts):
    for name, (err, _, scale) in interpreter.submit(cases.split_errors, case, cuts, "triton").result().items():
        assert err <= 1e-5 * max(scale, 1e-30), f"{name}: max error {err:.3g} vs max |value| {scale:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize(("case", "cuts"), SPLITS_16_BIT, ids=str)
def test_kernels_split_sequence_in_16_bit_err_at_most_twice_the_16_bit_reference(interpreter, case, cuts):
    for name, (err, ref_err, _) in interpreter.submit(cases.split_errors, case, cuts, "triton").result().items():
        assert err <= 2 * ref_err, f"{name}: kernel error {err:.3g} > 2 x unsplit reference error {ref_err:.3g}"


@pytest.mark.parametrize("mode", ["hstu", "softmax"])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_split_is_exact_for_every_mask_rule_and_cut(mode, causal):
    """Every cut of short sequences, with and without targets (cuts among them too), prefix
    and window. Softmax needs no merging across chunks: a chunk's keys hold every key its
    rows see (causal: keys up to the row; targets see the history before them and
    themselves; windows look back only; prefix rows and causal=False rows get the whole
    sequence), so each row's normalization runs over the same keys as unsplit."""
    for length in (5, 9):
        for targets in (0, 2):
            for c in (0, 3):
                for window in (0, 2):
                    for p in range(length + 1):
                        case = Case(mode=mode, lengths=(length,), causal=causal, targets=(targets,),
                                    contextual_len=c, max_attn_len=window, pos_p=3)
                        for name, (err, _, scale) in cases.split_errors(case, (p,), "reference").items():
                            assert err <= 1e-12 * max(scale, 1.0), (name, length, targets, c, window, p)


def test_split_without_kv_offsets_is_the_op_as_before():
    """kv_offsets=None: the op is called without the new arguments (its graph and printout
    as before); kv_offsets equal to offsets with q_start 0 gives the same values bit for bit
    on the CPU path."""
    x = cases.make_inputs(Case(mode="softmax", lengths=(1, 7, 0, 12), **MASKS, **BIAS))
    leaves, options = cases._leaves(x, torch.float32)
    base = jagged_attention(*leaves[:3], x["offsets"], x["max_seq_len"], **options)
    same = jagged_attention(*leaves[:3], x["offsets"], x["max_seq_len"], kv_offsets=x["offsets"],
                            q_start=torch.zeros(4, dtype=torch.int64), **options)
    assert torch.equal(base, same)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch.compile(lambda q, k, v, offsets: jagged_attention(q, k, v, offsets, 12), backend=keep, fullgraph=True)(
        *(t.detach() for t in leaves[:3]), x["offsets"])
    (node,) = [n for n in graphs[0].graph.nodes if n.target is torch.ops.fsc.jagged_attention_fwd]
    assert len(node.args) == 15 and not node.kwargs


@pytest.mark.parametrize("impl", ["auto", pytest.param("reference", marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", ["hstu", "softmax"])
def test_opcheck_with_cpu_impls_and_key_extents(mode, impl):
    case = Case(mode=mode, lengths=(1, 7, 0, 12), **MASKS, **BIAS)
    x = cases.make_inputs(case)
    o = x["options"]
    # queries: the last 1, 3, 0, 5 tokens of each key extent; the second from position 2
    q_offsets = torch.tensor([0, 1, 4, 4, 9])
    q_start = torch.tensor([0, 2, 0, 7])
    q = x["q"][:9].float().requires_grad_()
    k, v = (x[n].float().requires_grad_() for n in ("k", "v"))
    tables = [o[n].float().requires_grad_() for n in ("position_bias", "time_bias")]
    args = (q, k, v, q_offsets, o["num_targets"], o["timestamps"], *tables, x["max_seq_len"], mode == "softmax",
            0.25, True, 3, 5, impl, x["offsets"], q_start)
    torch.library.opcheck(torch.ops.fsc.jagged_attention_fwd.default, args)


def test_flops_of_a_chunk_count_its_queries_against_its_keys():
    from torch.utils.flop_counter import flop_registry

    tq, tk, h, d, dv = 4, 10, 2, 16, 32
    q, k, v = torch.empty(tq, h, d), torch.empty(tk, h, d), torch.empty(tk, h, dv)
    head = (q, k, v, torch.tensor([0, tq]), None, None, None, None, tk, False, 1.0)
    split = (0, 0, "reference", torch.tensor([0, tk]), torch.tensor([tk - tq]))
    fwd = flop_registry[torch.ops.fsc.jagged_attention_fwd]
    # queries at 6..9 see 7..10 keys, 34 pairs; Tq (2 Tk - Tq) = 64 is twice that, less Tq
    # (as T^2 is for T(T+1)/2 pairs)
    assert fwd(*head, True, *split, out_val=None) == tq * (2 * tk - tq) * h * (d + dv)
    assert fwd(*head, False, *split, out_val=None) == 2 * tq * tk * h * (d + dv)


def test_compiled_split_matches_eager_on_cpu():
    """Traced, the op runs the reference (padding to max_seq_len) with the key extents."""
    case = Case(mode="softmax", lengths=(1, 7, 0, 12), **MASKS, **BIAS)
    x = cases.make_inputs(case)
    # the second chunk of each sequence: queries from positions 0, 3, 0, 5 against all keys
    _, (q_rows, kv_rows, q_offsets, kv_offsets, chunk_options) = cases._chunks(
        case, x, (0, 3, 0, 5), x["options"]["num_targets"], x["options"]["timestamps"], {})
    assert kv_rows.numel() > q_rows.numel() > 0

    def run(fn):
        leaves, options = cases._leaves(x, torch.float32)
        options = {**options, **chunk_options}
        out = fn(leaves[0][q_rows], leaves[1][kv_rows], leaves[2][kv_rows], q_offsets, x["max_seq_len"],
                 kv_offsets=kv_offsets, **options)
        return [out, *torch.autograd.grad(out, leaves, x["dout"][q_rows].float())]

    compiled = torch.compile(jagged_attention, backend="aot_eager", fullgraph=True)
    for c, e in zip(run(compiled), run(jagged_attention)):
        torch.testing.assert_close(c, e)


# --- queries outside their key extent: key padding ------------------------------------------
# A padded row of N tokens whose valid keys are one run [s, s + L): N queries from position -s
# over the L keys (key_padding_extents), equal on every row to dense attention over the padded
# layout with the padding keys hidden: full, all-padding, right-, left-aligned and middle runs,
# runs that end mid-block and on a block edge (16), rows before a left-aligned run (causal: see
# nothing, 0).

PADDED_RUNS = ((0, 19), (0, 7), (12, 7), (3, 9), (0, 0), (3, 16), (0, 1), (18, 1))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_cpu_op_over_padded_rows_matches_dense_attention_with_the_padding_keys_hidden(impl, causal, monkeypatch):
    calls = _spy_on_grouped(monkeypatch) if impl == "auto" else None
    for name, (err, _, scale) in cases.padded_errors(PADDED_RUNS, 19, causal, impl).items():
        tolerance = 1e-12 if impl == "reference" else 1e-5
        assert err <= tolerance * max(scale, 1.0), f"{name}: max error {err:.3g} vs max |value| {scale:.3g}"
    if calls is not None:
        assert calls == ["grouped_forward", "grouped_backward"]


@pytest.mark.parametrize("causal", [True, False])
def test_kernels_over_padded_rows_match_dense_attention_with_the_padding_keys_hidden(interpreter, causal):
    result = interpreter.submit(cases.padded_errors, PADDED_RUNS, 19, causal, "triton").result()
    for name, (err, _, scale) in result.items():
        assert err <= 1e-5 * max(scale, 1.0), f"{name}: max error {err:.3g} vs max |value| {scale:.3g}"


def test_key_padding_extents_says_whether_the_valid_keys_are_one_run():
    valid = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    offsets, kv_offsets, q_start, seen, contiguous = ja.key_padding_extents(valid, causal=True)
    assert bool(contiguous)
    # per row: the padding before the run (no queries), the N queries over the run, the padding after it
    assert offsets.tolist() == [0, 0, 4, 4, 4, 8, 8, 8, 12, 12, 12, 16, 16]
    assert kv_offsets.tolist() == [0, 0, 2, 4, 6, 8, 8, 9, 11, 12, 16, 16, 16]
    assert q_start.tolist() == [0, 0, 0, 0, -2, 0, 0, -1, 0, 0, -4, 0]
    assert seen.tolist() == [[True] * 4, [False, False, True, True], [False, True, True, True], [False] * 4]
    assert not bool(ja.key_padding_extents(torch.tensor([[1, 0, 1, 0]], dtype=torch.bool), causal=False)[4])


def test_opcheck_with_queries_outside_their_key_extent():
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    offsets, kv_offsets, q_start, _, _ = ja.key_padding_extents(valid, causal=True)
    q, k, v = (torch.randn(10, 2, 16, requires_grad=True) for _ in range(3))
    args = (q, k, v, offsets, None, None, None, None, 5, True, 0.25, True, 0, 0, "auto", kv_offsets, q_start)
    torch.library.opcheck(torch.ops.fsc.jagged_attention_fwd.default, args)


def test_public_entry_takes_queries_outside_their_key_extent():
    """Queries from position -1 and past the keys' end, without a prefix, window or
    timestamps: accepted, and the reference agrees with the CPU op."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, 2, 16, generator=g, dtype=torch.float64) for t in (6, 4, 4))
    args = (torch.tensor([0, 3, 6]), 4)
    split = dict(mode="softmax", kv_offsets=torch.tensor([0, 1, 4]), q_start=torch.tensor([-1, 1]))
    ours = jagged_attention(q.float(), k.float(), v.float(), *args, **split)
    ref = jagged_attention_reference(q, k, v, *args, **split)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    assert float(ref[0].abs().max()) == 0.0  # position -1 sees no key (causal)
