"""lower-attention on the HSTU example's per-sequence forms (``attention="padded"`` and
``"jagged"``: gathered ``[n, N]`` groups): replaced by the jagged kernel op (on CPU, where
they are kept by default, with ``dense_on_cpu=true``), training equals eager over batches of
varying lengths with one compile, in hstu and softmax mode, and the run-time layout check
fires on a layout the lowering does not compute."""

from __future__ import annotations

import pytest
import torch
from test_hstu_attention_forms import batch_of, config
from test_hstu_attention_lowering import randomised, train_step

import fsc
from examples.hstu.model import HSTU, mark_dynamic, model_inputs, scale_tensor

# off CUDA the pass keeps these forms unless asked (hstu_groups' docstring has the measurement)
LOWERED = {"inner": "eager", "passes": "lower-attention{dense_on_cpu=true}"}
INNERS = ["eager", pytest.param("inductor", marks=pytest.mark.inductor)]
# token counts per sequence: a length-16 one (= max_len), length 1, empty sequences, two tokens
BATCHES = [[5, 1, 16, 2, 9, 1, 13], [3, 0, 7, 7, 7, 2, 1, 16, 11, 4], [2, 3], [1, 1, 4, 0]]


def lowered_config(form: str, **kw):
    return config(attention=form, qk_dim=16, v_dim=16, sharded=False, **kw)


def inputs_of(lengths: list[int], seed: int, cfg) -> list[torch.Tensor]:
    return model_inputs(batch_of(lengths, seed=seed), scale_tensor(float(sum(lengths))), cfg)


# traces the whole example per form (several seconds on 2 cores): slow, like the dense form's tests
@pytest.mark.slow
@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("mode", ["hstu", "softmax"])
@pytest.mark.parametrize("form", ["padded", "jagged"])
def test_per_sequence_hstu_attention_is_lowered_and_trains_as_eager_with_one_compile(form, mode, inner):
    from torch._dynamo.utils import counters

    cfg = lowered_config(form, mode=mode)
    eager = randomised(HSTU(cfg))
    model = HSTU(cfg)
    model.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="freescale", options=LOWERED | {"inner": inner}, fullgraph=True)
    counters.clear()
    for step, lengths in enumerate(BATCHES):
        inputs = inputs_of(lengths, step, cfg)
        if step == 0:
            mark_dynamic(inputs)
        loss, grad = train_step(eager, model, compiled, inputs)
        assert loss <= 1e-5 and grad <= 1e-5, (step, loss, grad)
    assert counters["stats"]["unique_graphs"] == 1
    record = fsc.last_compile().graph("pre-grad").pass_record("lower-attention")
    assert record.stats["lowered"] == 2, record.reasons  # both layers
    groups = 1 if form == "padded" else cfg.attention_groups
    weights = "softmax attention, scale=0.25, lengths <= 16" if mode == "softmax" else "SiLU attention, alpha=1, /N=16"
    assert all(f"per-sequence form (gathered [n, N] groups), {groups} group" in s and weights in s
               and "position[16]" in s and "time[32]" in s for s in record.stats["lowerings"])


def _reversed_row(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The padded form's first sequence gathered back to front (token_index follows it, so
    eager reads every token back, but causal order within the row is reversed)."""
    token_index, pad = inputs[-2].clone(), inputs[-1].clone()
    n = int((pad[0] >= 0).sum())
    pad[0, :n] = pad[0, :n].flip(0)
    token_index[pad[0, :n]] = torch.arange(n)
    return [*inputs[:-2], token_index, pad]


def _swapped_tokens(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    token_index = inputs[-2].clone()
    token_index[[0, 1]] = token_index[[1, 0]]
    return [*inputs[:-2], token_index, inputs[-1]]


@pytest.mark.slow
@pytest.mark.parametrize("broken", [_reversed_row, _swapped_tokens])
def test_per_sequence_lowering_checks_the_layout_at_run_time(broken):
    cfg = lowered_config("padded")
    compiled = torch.compile(HSTU(cfg), backend="freescale", options=LOWERED)
    inputs = inputs_of([3, 5, 2], 0, cfg)
    compiled(*inputs)
    with pytest.raises(RuntimeError, match="lower-attention: the HSTU example's per-sequence attention .* "
                                           "Remove 'lower-attention'"):
        compiled(*broken(inputs))
