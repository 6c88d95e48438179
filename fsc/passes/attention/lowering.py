"""What a pattern module hands the pass: a :class:`Lowering` (what was found and how to
emit the kernel call) or a reason; the :class:`Emitter` that inserts nodes with their
example values; and the dense lowering that SDPA, explicit softmax attention and their
3-D ``[B*H, N, D]`` forms share (jagged with uniform offsets), with :func:`attend`, the
kernel call that it and ``nn.MultiheadAttention``'s lowering share, key padding included.

**Key padding.** A key-padding mask hides, per sequence of N tokens, the keys outside its
valid tokens; eager still computes every query row, padded ones included (a padded row
attends over the valid keys like any other). The lowering keeps all N query rows and gives
the kernel only the valid keys (``key_padding_extents`` of :mod:`fsc.kernels.jagged_attention`:
queries over a contiguous run of keys, from the run's start, so causal stays the padded
layout's ``j <= i``), after a run-time check that each sequence's valid keys are one
contiguous run (right- or left-aligned padding). Rows that see no key at all (every row of
an all-padding sequence; causal, the rows before a left-padded run) get what eager gives
them: SDPA (and ``nn.MultiheadAttention`` without weights, which calls it) 0; an explicit
softmax over -inf scores NaN; over scores that all hold one finite fill, the mean of v over
all N tokens (``empty`` = ``"zero"``, ``"nan"``, ``"mean"``). (Gradients there: eager's NaN
rows make NaN gradients for every key of the sequence; the lowering's NaN rows are a
constant, so the other rows' gradients stay finite.)
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from fsc.kernels.jagged_attention import key_padding_extents
from fsc.kernels.limits import DTYPES
from fsc.passes.attention.graph import fmt, same, shape, val
from fsc.passes.attention.masks import KeyPadding
from fsc.rewriter import GraphRewriter

OP = "fsc::jagged_attention_fwd"
OFF_SWITCH = ("Remove 'lower-attention' from options['passes'] (e.g. passes="
              "'prioritize-collectives,split-collectives,overlap-schedule') to compile without it.")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """The pass's options that the pattern modules read."""

    min_head_dim: int
    max_head_dim: int
    check_preconditions: bool
    inexact_time_buckets: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Lowering:
    """A match: a description for the record and the function that rewrites it."""

    node: fx.Node
    """The node whose uses the lowering's result replaces (the anchor, or the one output of
    a multi-output anchor that the lowering computes)."""
    found: str
    emit: Callable[[Emitter], fx.Node]
    notes: tuple[str, ...] = ()
    uniform: bool = False
    """Dense attention made jagged with equal lengths (or a padded layout's valid keys): the
    kernel does about the work the graph did (the pass weighs that per device)."""
    device: torch.device | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Family:
    """One family of attention forms: ``anchors(node)`` says whether ``node`` is the last
    node of something of this family; ``match(node, settings)`` returns a lowering or why not."""

    name: str
    anchors: Callable[[fx.Node], bool]
    match: Callable[[fx.Node, Settings], Lowering | str]


class Emitter:
    """Inserts nodes before an anchor through the pass's rewriter and gives each the
    example value Dynamo's later consumers (AOTAutograd, Inductor's pre-grad passes) expect."""

    def __init__(self, rewriter: GraphRewriter, anchor: fx.Node, fake_mode: Any, shared: dict[Any, Any]) -> None:
        self.rewriter, self.anchor, self.fake_mode = rewriter, anchor, fake_mode
        self.shared = shared
        """Nodes several lowerings use (HSTU offsets), keyed by what they are built from."""

    def __call__(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        node = self.rewriter.insert_before(self.anchor, target, args, kwargs)
        if self.fake_mode is not None:
            vals = fx.node.map_arg((args, kwargs), val)
            with self.fake_mode:
                node.meta["example_value"] = target(*vals[0], **vals[1])
        return node

    def dim(self, node: fx.Node, i: int) -> Any:
        size = shape(node)[i]
        return size if isinstance(size, int) else self(torch.ops.aten.sym_size.int, node, i)


def fake_mode(gm: fx.GraphModule) -> Any:
    """The fake mode of the graph's example values (None: the graph has none)."""
    from torch._subclasses.fake_tensor import FakeTensor

    vals = [val(n) for n in gm.graph.find_nodes(op="placeholder")]
    modes = {v.fake_mode for v in vals if isinstance(v, FakeTensor)}
    return modes.pop() if len(modes) == 1 else None


def erase_dead(rewriter: GraphRewriter, roots: list[Any]) -> None:
    """Erase pure nodes left without users, following their inputs."""
    stack = [n for n in roots if isinstance(n, fx.Node)]
    while stack:
        node = stack.pop()
        if node.graph is not rewriter.graph or node.users or node.op not in ("call_function", "call_method"):
            continue
        if node.is_impure():
            continue
        inputs = node.all_input_nodes
        rewriter.erase(node)
        stack.extend(inputs)


def head_dim_problem(name: str, d: Any, settings: Settings) -> str | None:
    if not isinstance(d, int):
        return f"{name} head dim is symbolic ({d}); the kernel needs it static"
    if not settings.min_head_dim <= d <= settings.max_head_dim:
        return f"{name} head dim {d} not in [{settings.min_head_dim}, {settings.max_head_dim}]"
    return None


def check_tensors(q: Any, k: Any, v: Any, settings: Settings) -> str | None:
    """Why the kernel cannot take these q, k, v (None: it can)."""
    vals = [val(x) for x in (q, k, v)]
    if not all(isinstance(x, torch.Tensor) for x in vals):
        return "q, k, v carry no example values (not a Dynamo graph?)"
    if any(x.dtype not in DTYPES for x in vals) or len({x.dtype for x in vals}) != 1:
        return f"dtypes {[x.dtype for x in vals]}: the kernel takes one of {list(DTYPES)}"
    if len({x.device for x in vals}) != 1:
        return "q, k, v on different devices"
    for name, x in (("q/k", vals[0]), ("v", vals[2])):
        if problem := head_dim_problem(name, x.shape[-1], settings):
            return problem
    if vals[1].shape[-1] != vals[0].shape[-1]:
        return f"q and k head dims differ ({vals[0].shape[-1]} vs {vals[1].shape[-1]})"
    return None


def padded(padding: KeyPadding | None, empty: str) -> str:
    """The record's words for a key-padding mask (empty without one)."""
    if padding is None:
        return ""
    rows = {"zero": "0", "nan": "NaN", "mean": "the mean of v"}[empty]
    return (f", key padding {fmt(shape(padding.mask))} ({padding.meaning}; one contiguous run of valid keys per "
            f"sequence, checked at run time; rows that see no key: {rows}, as eager)")


# float32 exp(x) rounds to 0 below about -103.97 (half the smallest subnormal, 2^-150)
UNDERFLOW = 104.0


def uniform_offsets(e: Emitter, count: Any, length: Any, device: torch.device) -> fx.Node:
    """``arange(count + 1) * length``: the offsets of ``count`` sequences of one length."""
    count = e(operator.add, count, 1) if isinstance(count, fx.Node) else count + 1
    return e(operator.mul, e(torch.arange, count, dtype=torch.int64, device=device), length)


def attend(e: Emitter, jagged: Callable[[], tuple[fx.Node, fx.Node, fx.Node]], rows: Any, n: Any, dv: int,
           device: torch.device, causal: bool, scale: float, settings: Settings, *, fill: float | None = None,
           padding: KeyPadding | None = None, empty: str = "zero") -> fx.Node:
    """The kernel on ``jagged()``'s ``q, k [rows*n, H, D]``, ``v [rows*n, H, dv]`` (``rows``
    sequences of ``n`` tokens; emitted after the offsets): its output ``[rows*n, H, dv]``.
    Without ``padding``, uniform offsets; with it, every query row over its sequence's valid
    keys (module docstring), the run-time layout check, and the rows that see no key set as
    ``empty`` says.

    ``fill``: the masks wrote a finite value, not -inf, into the masked scores. Where every
    row's largest visible score is at least ``fill + 104``, exp underflows to 0 for the
    masked ones and the softmax is exactly the masked one; the kernel's log-sum-exp bounds
    that maximum from below (``max >= lse - log N``), so with ``check_preconditions`` the
    lowering asserts ``lse - log N >= fill + 104`` at run time (on the rows that see a key)."""
    seen = None
    if padding is None:
        offsets = uniform_offsets(e, rows, n, device)
        q, k, v = jagged()
        out = e(torch.ops.fsc.jagged_attention_fwd.default, q, k, v, offsets, None, None, None, None, n, True, scale,
                causal, 0, 0, "auto")
    else:
        q, k, v = jagged()
        mask = padding.mask
        if padding.meaning == "kept":
            valid = mask
        elif padding.meaning == "masked":
            valid = e(torch.logical_not, mask)
        else:  # additive, of 0 and -inf
            valid = e(torch.eq, mask, 0)
        ones = [1] * (len(shape(mask)) - 2)  # [B, 1, 1, N] -> [B, N]
        valid = e(torch.reshape, e(torch.broadcast_to, valid, (rows, *ones, n)), (rows, n))
        extents = e(key_padding_extents, valid, causal)
        offsets, kv_offsets, q_start, seen, contiguous = (e(operator.getitem, extents, i) for i in range(5))
        if settings.check_preconditions:
            e(torch._assert_async, contiguous,
              "lower-attention: a key-padding mask was lowered to the jagged kernel assuming each sequence's valid "
              "(unmasked) keys are one contiguous run (padding only before and/or after them: right- or left-aligned); "
              f"this batch's mask breaks that. {OFF_SWITCH}")
        out = e(torch.ops.fsc.jagged_attention_fwd.default, q, k, v, offsets, None, None, None, None, n, True, scale,
                causal, 0, 0, "auto", kv_offsets, q_start)
    if fill is not None and settings.check_preconditions:
        # lse - log N >= fill + 104, as exp(lse - fill - 104) >= N (an overflow to inf passes)
        margin = e(torch.exp, e(operator.sub, e(operator.getitem, out, 1), fill + UNDERFLOW))
        ok = e(torch.ge, margin, n)
        if seen is not None:  # rows that see no key have no largest visible score
            ok = e(torch.logical_or, ok, e(torch.logical_not, e(torch.reshape, seen, (-1, 1))))
        whose = "causal mask's" if padding is None else "masks'"
        e(torch._assert_async, e(torch.all, ok),
          f"lower-attention: the {whose} fill {fill:g} was lowered as -inf, "
          f"exact only while every row's largest visible score is at least the fill + {UNDERFLOW:g} (exp then "
          f"underflows to 0 in float32); this batch's scores come within that of the fill. {OFF_SWITCH}")
    out = e(operator.getitem, out, 0)
    if seen is None or empty == "zero":  # the kernel gives 0 where a row sees no key
        return out
    heads = e.dim(q, 1)
    seen = e(torch.reshape, seen, (rows, n, 1, 1))
    out = e(torch.reshape, out, (rows, n, heads, dv))
    if empty == "nan":
        out = e(torch.where, seen, out, float("nan"))
    else:  # every score held the one fill: uniform weights over all n tokens
        out = e(torch.where, seen, out, e(torch.mean, e(torch.reshape, v, (rows, n, heads, dv)), 1, True))
    return e(torch.reshape, out, (-1, heads, dv))


def dense_lowering(node: fx.Node, q: Any, k: Any, v: Any, causal: bool, scale: float | None, what: str,
                   settings: Settings, fill: float | None = None, padding: KeyPadding | None = None,
                   empty: str = "zero") -> Lowering | str:
    """Softmax attention over ``[B, H, N, D]`` (or ``[B*H, N, D]``) q, k, v as the jagged
    kernel with uniform offsets ``arange(B + 1) * N``, or, with a key-padding mask, over each
    sequence's valid keys (:func:`attend`)."""
    shapes = [shape(x) for x in (q, k, v)]
    if any(s is None or len(s) not in (3, 4) for s in shapes) or len({len(s) for s in shapes}) != 1:
        return f"{what} on shapes {shapes}: only [B, H, N, D] and [B*H, N, D] are lowered"
    if problem := check_tensors(q, k, v, settings):
        return problem
    qshape, kshape, vshape = shapes
    lead = len(qshape) - 1  # B, H (4-D) or B*H (3-D), then N
    if not all(same(x, y) for x, y in zip(qshape[:lead], kshape[:lead])) or not all(
            same(x, y) for x, y in zip(qshape[:lead], vshape[:lead])):
        return (f"{what} on q {list(qshape)}, k {list(kshape)}, v {list(vshape)}: only self-attention "
                f"(equal {'B, H, N' if lead == 3 else 'B*H, N'}) is lowered")
    d, dv = qshape[-1], vshape[-1]
    factor = 1.0 / math.sqrt(d) if scale is None else scale

    def emit(e: Emitter) -> fx.Node:
        nn = e.dim(q, lead - 1)
        if lead == 3:  # [B, H, N, D] -> [B*N, H, D]
            bb, hh = e.dim(q, 0), e.dim(q, 1)

            def jagged(x: fx.Node, last: int) -> fx.Node:
                return e(torch.reshape, e(torch.transpose, x, 1, 2), (-1, hh, last))
        else:  # [B*H, N, D] -> [B*H*N, 1, D]: one head per sequence
            bb = e.dim(q, 0)

            def jagged(x: fx.Node, last: int) -> fx.Node:
                return e(torch.reshape, x, (-1, 1, last))

        out = attend(e, lambda: (jagged(q, d), jagged(k, d), jagged(v, dv)), bb, nn, dv, val(q).device, causal,
                     factor, settings, fill=fill, padding=padding, empty=empty)
        if lead == 3:
            return e(torch.transpose, e(torch.reshape, out, (bb, nn, hh, dv)), 1, 2)
        return e(torch.reshape, out, (bb, nn, dv))

    layout = "[B, H, N, D]" if lead == 3 else "[B*H, N, D]"
    filled = "" if fill is None else (f", fill {fill:g} as -inf (exact while each row's max score >= fill + "
                                      f"{UNDERFLOW:g}{', checked at run time' if settings.check_preconditions else ''})")
    found = (f"{what} {layout}={fmt(qshape)} {'causal' if causal else 'full'} softmax"
             f"{padded(padding, empty)}, scale={factor:.4g}{filled} "
             f"({'jagged, valid keys per sequence' if padding else 'jagged, uniform offsets'})")
    return Lowering(node, found, emit, uniform=True, device=val(q).device)
