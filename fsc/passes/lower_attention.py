"""``lower-attention``: replace SDPA, softmax and HSTU SiLU attention with the jagged kernel.

Written in plain PyTorch, the attention becomes a call of the kernel op
``fsc::jagged_attention_fwd`` (:mod:`fsc.kernels.jagged_attention`). The forms live in
pattern modules, one per family (:mod:`fsc.passes.attention`); this module walks the graph,
asks them, and records what each lowered or why not.

**Runs on the pre-grad graph** (Dynamo's torch-IR graph, before AOTAutograd; ``stage =
"pre-grad"``), in both inner modes. AOTAutograd partitions forward and backward: replacing
the attention in the forward aten graph alone cannot change what the backward graph saved
and recomputes, and rewriting both jointly would need one pattern per requires-grad
combination and op order. Before AOTAutograd the replacement calls our op, whose
registered autograd supplies the backward. (Inductor runs its own "pre-grad" passes at
this level too.) The aten graphs then hold ``fsc::jagged_attention_fwd``/``_bwd`` on CPU
(its length-grouped PyTorch implementation, run as one op) and, on CUDA, the Triton
kernels they decompose into (so Inductor sees into them). The compile record's ``pre-grad``
graph says what was lowered and what was declined, and why.

**Matches** (each family's module docstring has the details)

- :mod:`~fsc.passes.attention.sdpa`: ``F.scaled_dot_product_attention`` self-attention on
  ``[B, H, N, D]`` or ``[B*H, N, D]``, full or causal (``is_causal``, or an ``attn_mask``
  proved causal by :mod:`~fsc.passes.attention.masks`), with or without a key-padding
  ``attn_mask``, without dropout or GQA.
- :mod:`~fsc.passes.attention.softmax`: ``softmax(c * (q @ kᵀ) [causal and/or key-padding
  masks], -1) [dropout that is the identity] @ v`` on the same layouts.
- :mod:`~fsc.passes.attention.hstu`: the HSTU example's SiLU attention over a rank's tokens.
- :mod:`~fsc.passes.attention.hstu_groups`: the HSTU example's per-sequence attention
  (``attention="padded"`` and ``"jagged"``): q, k, v gathered into ``[n, N]`` groups of
  sequences, one product per group, the groups' outputs concatenated and read back by
  ``token_index``, in hstu or softmax mode.
- :mod:`~fsc.passes.attention.hstu_padded`: HSTU SiLU attention on jagged q, k, v padded by
  ``fbgemm.jagged_to_padded_dense`` and made jagged again by ``dense_to_jagged``
  (generative-recommenders' PyTorch form), causal (constant or its targets mask, proved from
  the graph, with an optional window) or full.
- :mod:`~fsc.passes.attention.mha`: ``nn.MultiheadAttention`` (one opaque
  ``F.multi_head_attention_forward`` call in Dynamo's graph, also inside
  ``nn.TransformerEncoderLayer``'s training path), self-attention full or causal (a proved
  mask, or the ``is_causal`` hint), with or without a ``key_padding_mask``: unpacked into
  its projections around the kernel. The encoder layer's
  fast path (one fused op) is found and declined.

**Changes** each match into a call of the kernel op: dense inputs (and MHA's projected
q, k, v) become jagged with uniform offsets (softmax mode), or with a key-padding mask,
every query row over its sequence's valid keys (separate key extents from the mask at run
time; :mod:`~fsc.passes.attention.lowering`); HSTU attention gets offsets from the positions and its
bias tables built from the model's embedding tables (hstu mode); the per-sequence HSTU
form likewise, with offsets from its groups' rows, the op's output (the tokens in their
order) replacing ``cat(groups)[token_index]``; fbgemm-padded HSTU
attention takes the padding's jagged inputs and offsets directly (hstu mode, no padding
round trip). The subgraphs that only fed the old attention are erased.

**Where it pays.** On CUDA the op runs the Triton kernels. Off CUDA it runs a PyTorch
implementation; for dense attention (every sequence of length N: SDPA, explicit softmax)
that does the work the graph did, slower than Inductor's code for the same attention
(``python -m bench attention-cpu`` measures it: results/attention-cpu.json), so there the
pass keeps the user's attention and records ``kept: ...`` (``dense_on_cpu=true`` lowers it
anyway). The HSTU form is lowered everywhere: its dense product spans every token of the
batch, the jagged op only each sequence's (on CPU faster than Inductor's dense form, same
benchmark with ``--family hstu``: results/attention-cpu-hstu.json). The fbgemm-padded HSTU
form is kept off CUDA like dense attention: its padded product is already per sequence, and
lowered on CPU it was slower (results/attention-cpu-padding.json); so are the HSTU example's
per-sequence forms, for the same reason (:mod:`~fsc.passes.attention.hstu_groups` has the
measurement).

**Safe because** the kernel computes the same function (module docstring of
``fsc.kernels.jagged_attention``), up to float summation order, PROVIDED, for HSTU
attention, that every sequence's tokens are contiguous, with positions 0, 1, 2, ... in
order, sequence ids rising from one sequence to the next, and positions below N (what the
example's ``collate`` and routing produce). The pass cannot prove that from the graph, so
it inserts a runtime check (``torch._assert_async``) whose message names the pass and how
to turn it off; for the per-sequence HSTU form, that each group row holds one sequence's
tokens, consecutive and in order, valid entries first, at most N of them, every token in
one row, and that ``token_index`` reads every token back from its own row and step (checked
likewise); for a key-padding mask, that each sequence's valid keys are one
contiguous run (right- or left-aligned padding), which the extents assume. Rows that see no
key get eager's value (0, NaN or the mean of v, by form). For fbgemm-padded HSTU attention
the check is that every sequence length is at most the padded N (the padding truncates
longer ones) and 0 <= num_targets <= length. No collectives are touched.

**Limits.** The kernel buckets time differences exactly (integer log2); the example's
float32 ``log2`` rounds up by one bucket for |dt| within a few units below 2^k, k >= 21
(e.g. dt = 2^21 - 2), so with more than 20 buckets the two can differ and the pass declines
such graphs unless ``inexact_time_buckets=true`` (float64 ``log2``, as the example uses, is
exact below 2^46). It declines, with the reason: masks it can read as neither causal
nor key padding (an ``attn_mask``, an arbitrary mask tensor), dropout, GQA, head dims outside ``[min_head_dim,
max_head_dim]``, dtypes other than fp32/bf16/fp16, shapes it does not know (cross-attention
lengths), other bias constructions, additive key-padding masks not built from a boolean one with 0 /
-inf, a -inf and a finite fill mixed with key padding (eager's rows that see no key then
depend on which mask hides which key). Where eager's softmax rows are NaN (no key visible,
-inf fills) the lowered rows are NaN too, but eager's NaN also reaches every key's gradient
of that sequence, the lowering's does not. It does not lower attention
already written jagged with offsets (other than fbgemm-padded HSTU attention), nor
targets/prefix/window masks other than the fbgemm-padded form's targets mask and window.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch.fx as fx

import fsc.kernels.jagged_attention  # noqa: F401  (registers fsc::jagged_attention_fwd, which lowerings call)
from fsc.errors import OptionError
from fsc.kernels.limits import MAX_HEAD_DIM, MIN_HEAD_DIM
from fsc.passes.attention import FAMILIES, Family, Settings
from fsc.passes.attention.lowering import OP, Emitter, erase_dead, fake_mode
from fsc.passes.base import Pass, PassContext, PassResult
from fsc.rewriter import GraphRewriter


# The measurement behind this choice: python -m bench attention-cpu, which writes the ratios per family
# and length to results/attention-cpu.json (lowered and kept, each against Inductor, interleaved).
KEPT_OFF_CUDA = ("the jagged op has no kernel here, only a PyTorch implementation that does about the work of this "
                 "attention, slower than Inductor's (python -m bench attention-cpu measures it: "
                 "results/attention-cpu.json, results/attention-cpu-padding.json); dense_on_cpu=true lowers it anyway")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowerAttention(Pass):
    name = "lower-attention"
    stage: ClassVar[str] = "pre-grad"
    # float summation order differs from the unlowered attention's
    tolerance = (1e-4, 1e-6)

    min_head_dim: int = MIN_HEAD_DIM
    """Smallest q/k and v head dim lowered (the kernel's tl.dot needs 16)."""
    max_head_dim: int = MAX_HEAD_DIM
    """Largest head dim lowered (the kernel's limit, 256)."""
    check_preconditions: bool = True
    """Insert the run-time checks of what a lowering assumes and the graph cannot prove: the
    HSTU example's token layout, a key-padding mask's contiguous valid keys, a finite fill's
    underflow, the fbgemm-padded form's lengths (<= N) and targets."""
    inexact_time_buckets: bool = False
    """Lower float32-log2 time bucketing to the kernel's exact integer bucketing even where
    the two can differ by one bucket (see Limits), recording a note; false (default):
    decline those graphs, so the lowered model computes what the eager one does."""
    dense_on_cpu: bool = False
    """Lower off CUDA too the forms whose jagged op does about the work the user's graph did:
    dense attention (SDPA, explicit softmax, bmm, ``nn.MultiheadAttention``), the same with
    key-padding masks, fbgemm-padded HSTU attention and the HSTU example's per-sequence
    forms. There the op runs its PyTorch implementation, slower than Inductor's code for
    them (see ``KEPT_OFF_CUDA``); false (default): keep the user's attention and record that
    choice. (The HSTU example's dense form is lowered everywhere.)"""

    def __post_init__(self) -> None:
        for key in ("min_head_dim", "max_head_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not MIN_HEAD_DIM <= value <= MAX_HEAD_DIM:
                raise OptionError(f"lower-attention option {key}={value!r} must be an int in "
                                  f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (the kernel's head dims)")
        if self.min_head_dim > self.max_head_dim:
            raise OptionError(f"lower-attention option min_head_dim={self.min_head_dim} is above "
                              f"max_head_dim={self.max_head_dim}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.graph_kind != "pre-grad":
            return PassResult(modified=False, reasons=(
                f"runs on the pre-grad (torch IR) graph only, not on the {ctx.graph_kind} graph",))
        found = [(node, family) for node in gm.graph.nodes if (family := _family(node)) is not None]
        if not found:
            return PassResult(modified=False, stats={"attention_found": 0, "lowered": 0})
        settings = Settings(min_head_dim=self.min_head_dim, max_head_dim=self.max_head_dim,
                            check_preconditions=self.check_preconditions,
                            inexact_time_buckets=self.inexact_time_buckets)
        mode = fake_mode(gm)
        rewriter = GraphRewriter(gm.graph)
        shared: dict[Any, Any] = {}
        lowered: list[str] = []
        reasons: list[str] = []
        notes: list[str] = []
        kept = 0
        for node, family in found:
            if getattr(node, "_erased", False):  # fed an attention lowered before it
                continue
            match = family.match(node, settings)
            if isinstance(match, str):
                reasons.append(f"{node.name} not lowered: {match}")
                continue
            if match.uniform and match.device is not None and match.device.type != "cuda" and not self.dense_on_cpu:
                reasons.append(f"{node.name} kept: {match.found} on {match.device.type}: {KEPT_OFF_CUDA}")
                kept += 1
                continue
            new = match.emit(Emitter(rewriter, node, mode, shared))
            match.node.replace_all_uses_with(new)  # the anchor, or the output it stands for (MHA's [0])
            erase_dead(rewriter, [match.node])
            lowered.append(f"{node.name}: {match.found} -> {OP}")
            notes.extend(n for n in match.notes if n not in notes)
        stats: dict[str, Any] = {**rewriter.stats(), "attention_found": len(found), "lowered": len(lowered)}
        if kept:
            stats["kept"] = kept
        if lowered:
            stats["lowerings"] = lowered
        if notes:
            stats["notes"] = notes
        return PassResult(modified=rewriter.modified, stats=stats, reasons=tuple(reasons))


def _family(node: fx.Node) -> Family | None:
    """The first family for which ``node`` ends an attention."""
    return next((family for family in FAMILIES if family.anchors(node)), None)
