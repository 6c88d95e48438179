"""``lower-attention``: replace SDPA, softmax and HSTU SiLU attention with the jagged kernel.

Written in plain PyTorch, the attention becomes a call of the kernel op
``fsc::jagged_attention_fwd`` (:mod:`fsc.kernels.jagged_attention`).

**Runs on the pre-grad graph** (Dynamo's torch-IR graph, before AOTAutograd; ``stage =
"pre-grad"``), in both inner modes. AOTAutograd partitions forward and backward: replacing
the attention in the forward aten graph alone cannot change what the backward graph saved
and recomputes, and rewriting both jointly would need one pattern per requires-grad
combination and op order. Before AOTAutograd the replacement calls our op, whose
registered autograd supplies the backward. (Inductor runs its own "pre-grad" passes at
this level too.) The aten graphs then hold ``fsc::jagged_attention_fwd``/``_bwd`` on CPU
(its length-grouped PyTorch implementation, run as one op) and, on CUDA, the Triton
kernels they decompose into (so Inductor sees into them). The compile record's ``pre-grad`` graph says what was
lowered and what was declined, and why.

**Matches**

- ``F.scaled_dot_product_attention(q, k, v, is_causal=..., scale=...)`` on ``[B, H, N, D]``
  self-attention (q, k and v of one length N), without ``attn_mask``, dropout or GQA.
- Explicit softmax attention ``softmax(c * (q @ kᵀ), -1) @ v`` on ``[B, H, N, D]``
  (matmul or ``@``; kᵀ by ``transpose``/``mT``; c from scalar ``*``/``/``), optionally
  causal through ``masked_fill(~tril(ones(N, N)), -inf)`` or ``masked_fill(triu(ones, 1), -inf)``.
- The HSTU example's SiLU attention (``examples/hstu/model.py``) over all tokens of the
  batch: ``einsum("thd,shd->hts", q, k)`` [+ ``permute(E_pos(rel_pos) + E_time(bucket),
  (2, 0, 1))``], ``silu``, divided by N, times a mask ``(seq_i == seq_j) & (pos_i - pos_j
  >= 0)``, then ``einsum("hts,shd->thd", ·, v)``, with ``rel_pos = clamp(pos_i - pos_j,
  0, C)`` and ``bucket = clamp(floor(log2(|t_i - t_j| as float + 1)), 0, NB - 1)``. The
  mask, rel_pos and bucket subgraphs are recognised structurally (any equation letters,
  ``method``/``function``/operator spellings).

**Changes** each match into a call of the kernel op. Dense ``[B, H, N, D]`` inputs become
jagged with uniform offsets ``arange(B + 1) * N`` (softmax mode, ``max_seq_len = N``).
For HSTU attention (hstu mode, alpha = the scores' scale or 1, causal, ``max_seq_len`` =
the divisor N) the offsets come from the positions with static shapes: ``starts =
sort(where(pos == 0, arange(T), T))``, ``offsets = cat(starts, [T])`` (T + 1 entries;
the trailing sequences are empty). The bias tables are built in the graph from the
model's embedding tables: ``position_bias[:, C - d] = E_pos[d]`` for d = 0..C (zeros on
the unused key-after-query side), ``time_bias = E_timeᵀ``; they get gradients through the
op. The subgraphs that only fed the old attention are erased.

**Safe because** the kernel computes the same function (module docstring of
``fsc.kernels.jagged_attention``), up to float summation order, PROVIDED, for HSTU
attention, that every sequence's tokens are contiguous, with positions 0, 1, 2, ... in
order, sequence ids rising from one sequence to the next, and positions below N (what the
example's ``collate`` and routing produce). The pass cannot prove that from the graph, so
it inserts a runtime check (``torch._assert_async``) whose message names the pass and how
to turn it off. No collectives are touched.

**Limits.** The kernel buckets time differences exactly (integer log2); the example's
float32 ``log2`` rounds up by one bucket for |dt| within a few units below 2^k, k >= 21
(e.g. dt = 2^21 - 2), so with more than 20 buckets the two can differ and the pass declines
such graphs unless ``inexact_time_buckets=true`` (float64 ``log2``, as the example uses, is
exact below 2^46). It declines, with the reason:
masks it cannot prove (an ``attn_mask``, an arbitrary mask tensor), dropout, GQA, head
dims outside ``[min_head_dim, max_head_dim]``, dtypes other than fp32/bf16/fp16, shapes it
does not know (non-4-D SDPA, cross-attention lengths), other bias constructions. It does
not lower attention already written jagged with offsets, nor targets/prefix/window masks.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch.nn import functional as F

from fsc.errors import OptionError
from fsc.kernels.jagged_attention import DTYPES, MAX_HEAD_DIM, MIN_HEAD_DIM
from fsc.passes.base import Pass, PassContext, PassResult
from fsc.rewriter import GraphRewriter

_OP = "fsc::jagged_attention_fwd"
OFF_SWITCH = ("Remove 'lower-attention' from options['passes'] (e.g. passes="
              "'prioritize-collectives,split-collectives,overlap-schedule') to compile without it.")

# Spellings of one operation in Dynamo's torch IR: (functions, method names).
_SPELLINGS: dict[str, tuple[tuple[Any, ...], tuple[str, ...]]] = {
    "sdpa": ((F.scaled_dot_product_attention,), ()),
    "einsum": ((torch.einsum,), ()),
    "matmul": ((torch.matmul, operator.matmul, torch.bmm), ("matmul", "bmm", "__matmul__")),
    "softmax": ((F.softmax, torch.softmax), ("softmax",)),
    "silu": ((F.silu,), ()),
    "mul": ((operator.mul, torch.mul), ("mul", "__mul__")),
    "div": ((operator.truediv, torch.div, torch.true_divide), ("div", "truediv", "__truediv__")),
    "add": ((operator.add, torch.add), ("add", "__add__")),
    "sub": ((operator.sub, torch.sub), ("sub", "__sub__")),
    "eq": ((operator.eq, torch.eq), ("eq", "__eq__")),
    "ge": ((operator.ge, torch.ge), ("ge", "__ge__")),
    "le": ((operator.le, torch.le), ("le", "__le__")),
    "and": ((operator.and_, torch.logical_and, torch.bitwise_and), ("logical_and", "bitwise_and", "__and__")),
    "not": ((operator.invert, torch.logical_not, torch.bitwise_not), ("logical_not", "bitwise_not", "__invert__")),
    "unsqueeze": ((torch.unsqueeze,), ("unsqueeze",)),
    "transpose": ((torch.transpose,), ("transpose",)),
    "permute": ((torch.permute,), ("permute",)),
    "clamp": ((torch.clamp, torch.clip), ("clamp", "clip")),
    "abs": ((torch.abs,), ("abs",)),
    "log2": ((torch.log2,), ("log2",)),
    "floor": ((torch.floor,), ("floor",)),
    "embedding": ((F.embedding,), ()),
    "masked_fill": ((torch.masked_fill,), ("masked_fill",)),
    "tril": ((torch.tril,), ("tril",)),
    "triu": ((torch.triu,), ("triu",)),
    "ones": ((torch.ones,), ()),
}
# dtype conversions: method name -> dtype (None: read from the argument)
_CASTS = {"to": None, "type": None, "float": torch.float32, "double": torch.float64, "long": torch.int64,
          "int": torch.int32, "bool": torch.bool}


def _is(node: Any, kind: str) -> bool:
    if not isinstance(node, fx.Node):
        return False
    functions, methods = _SPELLINGS[kind]
    if node.op == "call_function":
        return any(node.target is f for f in functions)
    return node.op == "call_method" and node.target in methods


def _cast(node: Any) -> tuple[fx.Node, torch.dtype] | None:
    """(source, dtype) when ``node`` only converts its input's dtype."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or node.target not in _CASTS:
        return None
    dtype = _CASTS[node.target]
    if dtype is None:
        rest = list(node.args[1:]) + list(node.kwargs.values())
        dtypes = [a for a in rest if isinstance(a, torch.dtype)]
        if len(dtypes) != 1 or len(rest) != 1:
            return None
        dtype = dtypes[0]
    elif len(node.args) != 1 or node.kwargs:
        return None
    return node.args[0], dtype


def _val(arg: Any) -> Any:
    return arg.meta.get("example_value", arg.meta.get("val")) if isinstance(arg, fx.Node) else arg


def _shape(node: Any) -> tuple[Any, ...] | None:
    value = _val(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _scalar(arg: Any) -> float | None:
    return float(arg) if isinstance(arg, (int, float)) and not isinstance(arg, bool) else None


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """Arguments by name (``self`` first for methods), defaults filled in."""
    out = dict(defaults)
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _binary(node: fx.Node) -> tuple[Any, Any] | None:
    """The two operands of a binary op (``add`` with ``alpha`` is not one)."""
    if len(node.args) != 2 or (node.kwargs and set(node.kwargs) - {"other"}):
        return None
    return node.args[0], node.kwargs.get("other", node.args[1])


def _factors(node: Any, out: list[tuple[Any, bool]]) -> None:
    """Flatten a product ``a * b / c ...`` into (factor, is_divisor) pairs."""
    if _is(node, "mul") and (ops := _binary(node)) is not None:
        _factors(ops[0], out)
        _factors(ops[1], out)
    elif _is(node, "div") and (ops := _binary(node)) is not None and "rounding_mode" not in node.kwargs:
        _factors(ops[0], out)
        out.append((ops[1], True))
    else:
        out.append((node, False))


def _scale_of(factors: list[tuple[Any, bool]]) -> tuple[float, list[Any]] | None:
    """(product of the scalar factors, the tensor factors), or None if a divisor is a tensor."""
    scale, tensors = 1.0, []
    for factor, divisor in factors:
        c = _scalar(factor)
        if c is not None:
            scale = scale / c if divisor else scale * c
        elif divisor:
            return None
        else:
            tensors.append(factor)
    return scale, tensors


def _einsum(node: fx.Node) -> tuple[str, list[str], str, list[Any]] | None:
    if not _is(node, "einsum") or node.kwargs or not node.args or not isinstance(node.args[0], str):
        return None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    eq = node.args[0].replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    return eq, ins, out, operands


@dataclasses.dataclass(frozen=True, slots=True)
class _Pair:
    """``x_i (op) x_j`` over a pair of unsqueezed copies of one 1-D tensor; query_first:
    x_i is the one unsqueezed at dim 1 (indexes rows)."""

    source: fx.Node
    op: str
    query_first: bool


def _unsqueezed(node: Any) -> tuple[fx.Node, int] | None:
    if not _is(node, "unsqueeze"):
        return None
    args = _bind(node, ("self", "dim"), {})
    dim = args.get("dim")
    if not isinstance(args.get("self"), fx.Node) or dim not in (0, 1, -1, -2):
        return None
    return args["self"], dim % 2


def _pair(node: Any, kinds: tuple[str, ...]) -> _Pair | None:
    for kind in kinds:
        if _is(node, kind) and (ops := _binary(node)) is not None:
            a, b = _unsqueezed(ops[0]), _unsqueezed(ops[1])
            if a is None or b is None or a[0] is not b[0] or a[1] == b[1]:
                return None
            shape = _shape(a[0])
            if shape is None or len(shape) != 1:
                return None
            return _Pair(a[0], kind, query_first=a[1] == 1)
    return None


def _clamp(node: Any) -> tuple[fx.Node, Any, Any] | None:
    if not _is(node, "clamp"):
        return None
    args = _bind(node, ("self", "min", "max"), {"min": None, "max": None})
    if not isinstance(args["self"], fx.Node) or set(args) - {"self", "min", "max"}:
        return None
    return args["self"], args["min"], args["max"]


def _embedding(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """(indices, weight) of a plain ``F.embedding`` lookup (no max_norm)."""
    if not _is(node, "embedding"):
        return None
    names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    args = _bind(node, names, {"max_norm": None})
    if args["max_norm"] is not None or not isinstance(args.get("weight"), fx.Node):
        return None
    return args["input"], args["weight"]


# --------------------------------------------------------------------------- emitting


class _Emitter:
    """Inserts nodes before an anchor through the pass's rewriter and gives each the
    example value Dynamo's later consumers (AOTAutograd, Inductor's pre-grad passes) expect."""

    def __init__(self, rewriter: GraphRewriter, anchor: fx.Node, fake_mode: Any, shared: dict[Any, Any]) -> None:
        self.rewriter, self.anchor, self.fake_mode = rewriter, anchor, fake_mode
        self.shared = shared
        """Nodes several lowerings use (HSTU offsets), keyed by what they are built from."""

    def __call__(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        node = self.rewriter.insert_before(self.anchor, target, args, kwargs)
        if self.fake_mode is not None:
            vals = fx.node.map_arg((args, kwargs), _val)
            with self.fake_mode:
                node.meta["example_value"] = target(*vals[0], **vals[1])
        return node

    def dim(self, node: fx.Node, i: int) -> Any:
        size = _shape(node)[i]
        return size if isinstance(size, int) else self(torch.ops.aten.sym_size.int, node, i)


def _fake_mode(gm: fx.GraphModule) -> Any:
    """The fake mode of the graph's example values (None: the graph has none)."""
    from torch._subclasses.fake_tensor import FakeTensor

    vals = [_val(n) for n in gm.graph.find_nodes(op="placeholder")]
    modes = {v.fake_mode for v in vals if isinstance(v, FakeTensor)}
    return modes.pop() if len(modes) == 1 else None


def _erase_dead(rewriter: GraphRewriter, roots: list[Any]) -> None:
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


# --------------------------------------------------------------------------- the pass


@dataclasses.dataclass(frozen=True, slots=True)
class _Lowering:
    """A match: a description for the record and the function that rewrites it."""

    node: fx.Node
    found: str
    emit: Callable[[_Emitter], fx.Node]
    notes: tuple[str, ...] = ()
    shared_key: Any = None


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
    """Insert the runtime check of the HSTU lowering's layout precondition."""
    inexact_time_buckets: bool = False
    """Lower float32-log2 time bucketing to the kernel's exact integer bucketing even where
    the two can differ by one bucket (see Limits), recording a note; false (default):
    decline those graphs, so the lowered model computes what the eager one does."""

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
        candidates = [n for n in gm.graph.nodes if self._is_candidate(n)]
        if not candidates:
            return PassResult(modified=False, stats={"attention_found": 0, "lowered": 0})
        fake_mode = _fake_mode(gm)
        rewriter = GraphRewriter(gm.graph)
        shared: dict[Any, Any] = {}
        lowered: list[str] = []
        reasons: list[str] = []
        notes: list[str] = []
        for node in candidates:
            if getattr(node, "_erased", False):  # fed an attention lowered before it
                continue
            match = self._match(node)
            if isinstance(match, str):
                reasons.append(f"{node.name} not lowered: {match}")
                continue
            new = match.emit(_Emitter(rewriter, node, fake_mode, shared))
            node.replace_all_uses_with(new)
            _erase_dead(rewriter, [node])
            lowered.append(f"{node.name}: {match.found} -> {_OP}")
            notes.extend(n for n in match.notes if n not in notes)
        stats: dict[str, Any] = {**rewriter.stats(), "attention_found": len(candidates), "lowered": len(lowered)}
        if lowered:
            stats["lowerings"] = lowered
        if notes:
            stats["notes"] = notes
        return PassResult(modified=rewriter.modified, stats=stats, reasons=tuple(reasons))

    # -- candidates: the last node of something that looks like attention

    @staticmethod
    def _is_candidate(node: fx.Node) -> bool:
        if _is(node, "sdpa"):
            return True
        if _is(node, "matmul") and len(node.args) == 2:
            factors: list[tuple[Any, bool]] = []
            _factors(node.args[0], factors)
            return any(_is(f, "softmax") for f, _ in factors)
        if (parsed := _einsum(node)) is not None and len(parsed[3]) == 2:
            factors = []
            _factors(parsed[3][0], factors)
            return any(_is(f, "silu") or _is(f, "softmax") for f, _ in factors)
        return False

    def _match(self, node: fx.Node) -> _Lowering | str:
        if _is(node, "sdpa"):
            return self._match_sdpa(node)
        if _is(node, "matmul"):
            return self._match_softmax(node)
        return self._match_hstu(node)

    def _check_tensors(self, q: Any, k: Any, v: Any) -> str | None:
        vals = [_val(x) for x in (q, k, v)]
        if not all(isinstance(x, torch.Tensor) for x in vals):
            return "q, k, v carry no example values (not a Dynamo graph?)"
        if any(x.dtype not in DTYPES for x in vals) or len({x.dtype for x in vals}) != 1:
            return f"dtypes {[x.dtype for x in vals]}: the kernel takes one of {list(DTYPES)}"
        if len({x.device for x in vals}) != 1:
            return "q, k, v on different devices"
        for name, x in (("q/k", vals[0]), ("v", vals[2])):
            d = x.shape[-1]
            if not isinstance(d, int):
                return f"{name} head dim is symbolic ({d}); the kernel needs it static"
            if not self.min_head_dim <= d <= self.max_head_dim:
                return f"{name} head dim {d} not in [{self.min_head_dim}, {self.max_head_dim}]"
        if vals[1].shape[-1] != vals[0].shape[-1]:
            return f"q and k head dims differ ({vals[0].shape[-1]} vs {vals[1].shape[-1]})"
        return None

    # -- (a) scaled_dot_product_attention

    def _match_sdpa(self, node: fx.Node) -> _Lowering | str:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        args = _bind(node, names, {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                                   "enable_gqa": False})
        if set(args) - set(names):
            return f"unknown arguments {sorted(set(args) - set(names))}"
        if args["attn_mask"] is not None:
            return "attn_mask is given: the kernel takes only causal/full masks it can prove"
        if args["dropout_p"] != 0.0:
            return f"dropout_p={args['dropout_p']}: the kernel has no dropout"
        if args["enable_gqa"] is not False:
            return "enable_gqa: the kernel needs as many k/v heads as q heads"
        if not isinstance(args["is_causal"], bool):
            return f"is_causal={args['is_causal']!r} is not a constant bool"
        scale = args["scale"]
        if scale is not None and _scalar(scale) is None:
            return f"scale={scale!r} is not a constant"
        return self._dense_lowering(node, args["query"], args["key"], args["value"], args["is_causal"],
                                    None if scale is None else float(scale), "scaled_dot_product_attention")

    def _dense_lowering(self, node: fx.Node, q: Any, k: Any, v: Any, causal: bool, scale: float | None,
                        what: str) -> _Lowering | str:
        shapes = [_shape(x) for x in (q, k, v)]
        if any(s is None or len(s) != 4 for s in shapes):
            return f"{what} on shapes {shapes}: only [B, H, N, D] is lowered"
        if problem := self._check_tensors(q, k, v):
            return problem
        (b, h, n, d), kshape, vshape = shapes
        if not all(_same(x, y) for x, y in zip((b, h, n), kshape[:3])) or not all(
                _same(x, y) for x, y in zip((b, h, n), vshape[:3])):
            return (f"{what} on q {list(shapes[0])}, k {list(kshape)}, v {list(vshape)}: only self-attention "
                    "(equal B, H, N) is lowered")
        dv = vshape[3]
        factor = 1.0 / math.sqrt(d) if scale is None else scale

        def emit(e: _Emitter) -> fx.Node:
            bb, hh, nn = e.dim(q, 0), e.dim(q, 1), e.dim(q, 2)

            def jagged(x: fx.Node, last: int) -> fx.Node:
                return e(torch.reshape, e(torch.transpose, x, 1, 2), (-1, hh, last))

            device = _val(q).device
            count = e(operator.add, bb, 1) if isinstance(bb, fx.Node) else bb + 1
            offsets = e(operator.mul, e(torch.arange, count, dtype=torch.int64, device=device), nn)
            out = e(torch.ops.fsc.jagged_attention_fwd.default, jagged(q, d), jagged(k, d), jagged(v, dv), offsets,
                    None, None, None, None, nn, True, factor, causal, 0, 0, "auto")
            out = e(operator.getitem, out, 0)
            return e(torch.transpose, e(torch.reshape, out, (bb, nn, hh, dv)), 1, 2)

        found = (f"{what} [B, H, N, D]={_fmt(shapes[0])} {'causal' if causal else 'full'} softmax, "
                 f"scale={factor:.4g} (jagged, uniform offsets)")
        return _Lowering(node, found, emit)

    # -- (b) explicit softmax attention

    def _match_softmax(self, node: fx.Node) -> _Lowering | str:
        p, v = node.args
        factors: list[tuple[Any, bool]] = []
        _factors(p, factors)
        if len(factors) != 1:
            return "softmax(...) @ v with extra factors after the softmax"
        sm = factors[0][0]
        args = _bind(sm, ("input", "dim"), {"dim": None})
        if args.get("dim") not in (-1, 3) or set(args) - {"input", "dim", "_stacklevel", "dtype"} or args.get("dtype"):
            return "softmax not over the last dim"
        x, causal = args["input"], False
        if _is(x, "masked_fill"):
            margs = _bind(x, ("self", "mask", "value"), {})
            if margs.get("value") != float("-inf") or not _is_causal_fill_mask(margs.get("mask"), _shape(x)):
                return "masked_fill with a mask the pass cannot prove causal (or a fill value other than -inf)"
            x, causal = margs["self"], True
        factors = []
        _factors(x, factors)
        scaled = _scale_of(factors)
        if scaled is None or len(scaled[1]) != 1 or not _is(scaled[1][0], "matmul"):
            return "softmax input is not c * (q @ k^T)"
        scale, (scores,) = scaled
        q, kt = scores.args
        k = _untransposed(kt)
        if k is None:
            return "the scores' right operand is not k transposed in its last two dims"
        return self._dense_lowering(node, q, k, v, causal, scale, "softmax(q @ k^T) @ v")

    # -- (c) the HSTU example's SiLU attention

    def _match_hstu(self, node: fx.Node) -> _Lowering | str:
        parsed = _einsum(node)
        attn, v = parsed[3]
        factors: list[tuple[Any, bool]] = []
        _factors(attn, factors)
        scaled = _scale_of(factors)
        if scaled is None:
            return "the attention weights are divided by a tensor"
        inv_n, tensors = scaled
        silus = [t for t in tensors if _is(t, "silu")]
        others = [t for t in tensors if not _is(t, "silu")]
        if len(silus) != 1 or len(silus[0].args) != 1 or silus[0].kwargs:
            return "not silu(scores) times scalars and a mask"
        if not others:
            return "no mask: attention over every token of the batch is not jagged"
        if len(others) != 1:
            return f"{len(others)} tensor factors besides silu(scores); one mask is lowered"
        mask = _hstu_mask(others[0])
        if isinstance(mask, str):
            return mask
        positions, seq_ids = mask
        n_float = 1.0 / inv_n if inv_n else 0.0
        n = round(n_float)
        if n < 1 or abs(n - n_float) > 1e-9 * n:
            return f"silu(scores) is scaled by {inv_n:.6g}, not 1/N for an integer N"
        # silu input: alpha * einsum(q, k) [+ rab]
        s = silus[0].args[0]
        rab = None
        if _is(s, "add") and (ops := _binary(s)) is not None:
            s, rab = (ops[0], ops[1]) if _einsum_of(ops[0]) else (ops[1], ops[0])
        factors = []
        _factors(s, factors)
        scaled = _scale_of(factors)
        if scaled is None or len(scaled[1]) != 1 or not _einsum_of(scaled[1][0]):
            return "silu input is not alpha * einsum(q, k) [+ bias]"
        alpha, (scores,) = scaled
        layout = _hstu_layout(scores, node)
        if isinstance(layout, str):
            return layout
        q, k = layout
        if problem := self._check_tensors(q, k, v):
            return problem
        bias = _hstu_bias(rab, positions) if rab is not None else ((), None, None)
        if isinstance(bias, str):
            return bias
        tables, timestamps, time_dtype = bias
        notes: tuple[str, ...] = ()
        if time_dtype is not None:
            nb = next(rows for kind, _, rows in tables if kind == "time")
            exact_below = 20 if time_dtype == torch.float32 else 46
            if nb > exact_below:
                note = (f"time buckets: the graph buckets through {time_dtype} log2, the kernel exactly; with "
                        f"{nb} buckets they can differ by one bucket for |dt| just below a power of two >= "
                        f"2^{exact_below + 1}")
                if not self.inexact_time_buckets:
                    return note + " (set inexact_time_buckets=true to lower anyway)"
                notes = (note,)
        found = (f"HSTU SiLU attention q [T, H, D]={_fmt(_shape(q))}, alpha={alpha:.4g}, /N={n}, causal same-sequence "
                 f"mask, bias: {', '.join(f'{kind}[{rows}]' for kind, _, rows in tables) or 'none'} "
                 "(jagged, offsets from positions)")
        check = self.check_preconditions

        def emit(e: _Emitter) -> fx.Node:
            key = (positions, seq_ids, n)
            if key not in e.shared:
                e.shared[key] = _hstu_offsets(e, positions, seq_ids, n, check)
            offsets = e.shared[key]
            pos_table = time_table = None
            for kind, weight, rows in tables:
                if kind == "position":
                    # the kernel reads column clip(id(key) - id(query)) + C: column C - d holds E_pos[d]
                    used = e(torch.flip, e(operator.getitem, weight, slice(None, rows)), (0,))
                    zeros = e(torch.zeros, (_shape(weight)[1], rows - 1), dtype=_val(weight).dtype,
                              device=_val(weight).device)
                    pos_table = e(torch.cat, (e(torch.transpose, used, 0, 1), zeros), dim=1)
                else:
                    # the kernels index a table row with unit column stride
                    time_table = e(torch.clone, e(torch.transpose, e(operator.getitem, weight, slice(None, rows)), 0, 1),
                                   memory_format=torch.contiguous_format)
            out = e(torch.ops.fsc.jagged_attention_fwd.default, q, k, v, offsets, None,
                    timestamps if time_table is not None else None, pos_table, time_table, n, False, alpha, True, 0,
                    0, "auto")
            return e(operator.getitem, out, 0)

        return _Lowering(node, found, emit, notes)


def _fmt(shape: Any) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _same(a: Any, b: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return a is b or (isinstance(a, (int, torch.SymInt)) and isinstance(b, (int, torch.SymInt))
                      and bool(statically_known_true(a == b)))


def _untransposed(node: Any) -> fx.Node | None:
    """k when ``node`` is k with its last two dims swapped (4-D)."""
    shape = _shape(node)
    if shape is None or len(shape) != 4:
        return None
    if _is(node, "transpose"):
        args = _bind(node, ("self", "dim0", "dim1"), {})
        dims = {args.get("dim0", None) % 4 if isinstance(args.get("dim0"), int) else None,
                args.get("dim1", None) % 4 if isinstance(args.get("dim1"), int) else None}
        return args["self"] if dims == {2, 3} else None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


def _is_causal_fill_mask(mask: Any, shape: Any) -> bool:
    """``~tril(ones(N, N)).bool()`` or ``triu(ones(N, N), 1).bool()`` (dtype casts allowed),
    N the scores' last dim: True marks the keys after the query."""
    while (c := _cast(mask)) is not None:
        mask = c[0]
    negate = _is(mask, "not")
    if negate:
        mask = mask.args[0]
        while (c := _cast(mask)) is not None:
            mask = c[0]
    kind = "tril" if _is(mask, "tril") else "triu" if _is(mask, "triu") else None
    if kind is None or negate != (kind == "tril"):
        return False
    args = _bind(mask, ("input", "diagonal"), {"diagonal": 0})
    if args["diagonal"] != (0 if kind == "tril" else 1):
        return False
    ones = args["input"]
    while (c := _cast(ones)) is not None:
        ones = c[0]
    if not _is(ones, "ones") or shape is None:
        return False
    size = _shape(ones)
    return size is not None and len(size) == 2 and _same(size[0], shape[-2]) and _same(size[1], shape[-1])


def _einsum_of(node: Any) -> bool:
    parsed = _einsum(node) if isinstance(node, fx.Node) else None
    return parsed is not None and len(parsed[3]) == 2


def _hstu_layout(scores: fx.Node, final: fx.Node) -> tuple[fx.Node, fx.Node] | str:
    """(q, k) when scores = einsum("thd,shd->hts", q, k) and the final einsum is
    ("hts,shd->thd", attn, v), for any letters."""
    _, (qs, ks), out, (q, k) = _einsum(scores)
    _, (a_s, vs), final_out, _ = _einsum(final)
    if len(qs) != 3 or len(ks) != 3 or len(set(qs)) != 3 or len(set(ks)) != 3:
        return f"scores einsum {qs},{ks}->{out} is not over [T, H, D] q and k"
    t, h, d = qs
    s = ks[0]
    if ks[1:] != h + d or s in qs or out != h + t + s:
        return f"scores einsum {qs},{ks}->{out} is not 'thd,shd->hts' (any letters)"
    if len(a_s) != 3 or len(vs) != 3 or len(set(vs)) != 3:
        return f"output einsum {a_s},{vs}->{final_out} is not over [H, T, T] weights and [T, H, D] v"
    hh, tt, ss = a_s
    e = vs[2]
    if vs[:2] != ss + hh or final_out != tt + hh + e or e in a_s:
        return f"output einsum {a_s},{vs}->{final_out} is not 'hts,shd->thd' (any letters)"
    return q, k


def _hstu_mask(node: Any) -> tuple[fx.Node, fx.Node] | str:
    """(positions, seq_ids) when node = ((seq_i == seq_j) & (pos_i - pos_j >= 0)), cast."""
    while (c := _cast(node)) is not None:
        node = c[0]
    reason = ("mask not recognised: the pass proves only (seq_i == seq_j) & (pos_i - pos_j >= 0) "
              "built from 1-D seq ids and positions")
    if not _is(node, "and") or (ops := _binary(node)) is None:
        return reason
    same = causal = None
    for op in ops:
        pair = _pair(op, ("eq",))
        if pair is not None:
            same = pair
            continue
        if (_is(op, "ge") or _is(op, "le")) and (cmp := _binary(op)) is not None and cmp[1] == 0:
            pair = _pair(cmp[0], ("sub",))
            # query minus key >= 0, or key minus query <= 0
            if pair is not None and pair.query_first == _is(op, "ge"):
                causal = pair
    if same is None or causal is None:
        return reason
    return causal.source, same.source


def _hstu_bias(rab: Any, positions: fx.Node) -> tuple[tuple, Any, Any] | str:
    """((kind, weight, rows used) per table, timestamps, dtype of the time log2) for
    rab = permute(E_pos(rel_pos) [+ E_time(bucket)], (2, 0, 1))."""
    if not _is(rab, "permute"):
        return "bias is not permute(embedding lookups, (2, 0, 1))"
    dims = tuple(rab.args[1:]) if len(rab.args) > 2 else tuple(rab.args[1]) if len(rab.args) == 2 else ()
    if dims not in ((2, 0, 1), (-1, 0, 1)) or rab.kwargs:
        return f"bias permuted by {dims}, not (2, 0, 1)"
    terms = []
    stack = [rab.args[0]]
    while stack:
        x = stack.pop()
        if _is(x, "add") and (ops := _binary(x)) is not None:
            stack.extend(ops)
        else:
            terms.append(x)
    tables, timestamps, time_dtype = [], None, None
    kinds = set()
    for term in terms:
        lookup = _embedding(term)
        if lookup is None:
            return "a bias term is not an embedding lookup"
        index, weight = lookup
        rows_total = _shape(weight)[0]
        rel = _rel_pos(index, positions)
        if isinstance(rel, int):
            kind, rows = "position", rel + 1
        else:
            bucket = _time_bucket(index)
            if isinstance(bucket, str):
                return f"bias lookup not recognised: {rel}; {bucket}"
            kind, (timestamps, rows, time_dtype) = "time", bucket
        if kind in kinds:
            return f"two {kind} bias tables"
        if not isinstance(rows_total, int) or rows > rows_total:
            return f"{kind} bias clamps to {rows} rows, the table has {rows_total}"
        kinds.add(kind)
        tables.append((kind, weight, rows))
    return tuple(tables), timestamps, time_dtype


def _rel_pos(node: Any, positions: fx.Node) -> int | str:
    """C when node = clamp(pos_i - pos_j, <=0, C) with the mask's positions."""
    clamp = _clamp(node)
    if clamp is None:
        return "not clamp(pos_i - pos_j, 0, C)"
    x, lo, hi = clamp
    pair = _pair(x, ("sub",))
    if pair is None or pair.source is not positions or not pair.query_first:
        return "position bias index is not clamp(pos_i - pos_j, 0, C) over the mask's positions"
    if not (lo is None or (isinstance(lo, int) and lo <= 0)) or not isinstance(hi, int) or hi < 0:
        return f"position bias clamp({lo}, {hi}) is not (0, C)"
    return hi


def _time_bucket(node: Any) -> tuple[fx.Node, int, torch.dtype] | str:
    """(timestamps, buckets, float dtype) for clamp(floor(log2(|t_i - t_j| as float + 1)), 0, NB-1)."""
    reason = "time bias index is not clamp(floor(log2(float(|t_i - t_j|) + 1)), 0, NB - 1)"
    clamp = _clamp(node)
    if clamp is None:
        return reason
    x, lo, hi = clamp
    if not (lo is None or (isinstance(lo, int) and lo <= 0)) or not isinstance(hi, int) or hi < 0:
        return reason
    if (c := _cast(x)) is None or c[1] not in (torch.int64, torch.int32):
        return reason
    x = c[0]
    if not _is(x, "floor") or not _is(x.args[0], "log2"):
        return reason
    x = x.args[0].args[0]
    if not _is(x, "add") or (ops := _binary(x)) is None:
        return reason
    dt = ops[0] if _scalar(ops[1]) == 1.0 else ops[1] if _scalar(ops[0]) == 1.0 else None
    if (c := _cast(dt)) is None or c[1] not in (torch.float32, torch.float64):
        return reason
    float_dtype, dt = c[1], c[0]
    if not _is(dt, "abs"):
        return reason
    pair = _pair(dt.args[0], ("sub",))
    if pair is None:
        return reason
    value = _val(pair.source)
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.int64, torch.int32):
        return "time bias on non-integer timestamps"
    return pair.source, hi + 1, float_dtype


def _hstu_offsets(e: _Emitter, positions: fx.Node, seq_ids: fx.Node, n: int, check: bool) -> fx.Node:
    """offsets [T + 1] from positions, and (optionally) the runtime check that the tokens
    are laid out as the lowering assumes."""
    t = e.dim(positions, 0)
    device = _val(positions).device
    idx = e(torch.arange, t, dtype=torch.int64, device=device)
    starts = e(torch.where, e(torch.eq, positions, 0), idx, t)
    starts = e(operator.getitem, e(torch.sort, starts), 0)
    offsets = e(torch.cat, (starts, e(torch.full, (1,), t, dtype=torch.int64, device=device)))
    if check:
        # Each token against the one before it, rolled rather than sliced: a [T - 1] slice
        # would make Dynamo guard on T >= 3 (a contiguity test on fewer than 2 elements)
        # and recompile for a batch of two tokens. Token 0 must start a sequence.
        pos_prev, seq_prev = e(torch.roll, positions, 1), e(torch.roll, seq_ids, 1)
        starts_seq = e(torch.eq, positions, 0)
        cont = e(torch.logical_and, e(torch.eq, positions, e(operator.add, pos_prev, 1)),
                 e(torch.eq, seq_ids, seq_prev))
        new = e(torch.logical_and, starts_seq, e(torch.gt, seq_ids, seq_prev))
        each = e(torch.where, e(torch.eq, idx, 0), starts_seq, e(torch.logical_or, cont, new))
        bounded = e(torch.all, e(torch.lt, positions, n))
        ok = e(torch.logical_and, e(torch.all, each), bounded)
        e(torch._assert_async, ok,
          "lower-attention: the HSTU attention was lowered to the jagged kernel assuming each sequence's "
          f"tokens are contiguous with positions 0, 1, 2, ... below N={n} and sequence ids rising from one "
          f"sequence to the next; this batch breaks that. {OFF_SWITCH}")
    return offsets
