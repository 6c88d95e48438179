"""Reading Dynamo's torch-IR graph for the attention pattern modules.

Dynamo keeps the user's spelling: ``x.softmax(-1)``, ``F.softmax(x, dim=-1)``, ``x / c``,
``torch.div(x, c)``. :func:`call` reads any of them as one torch function with its
arguments by name, through ``torch.fx.operator_schemas.normalize_function`` (what
``Node.normalized_arguments`` calls, here also for method calls and Python operators), so a
pattern names ``torch.softmax`` once, not every spelling of it.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.normalize import NormalizeOperators
from torch.fx.operator_schemas import normalize_function
from torch.nn import functional as F

# Python operators as the torch functions they dispatch to: torch's own table of the binary
# ones, plus those it leaves out.
_OPERATORS: dict[Any, Any] = {op: fn for fn, op in NormalizeOperators.binary_magic_method_remap.items()} | {
    operator.matmul: torch.matmul, operator.and_: torch.bitwise_and, operator.or_: torch.bitwise_or,
    operator.invert: torch.bitwise_not, operator.neg: torch.neg,
}
_COMMUTATIVE = (torch.mul, torch.add, torch.eq, torch.bitwise_and, torch.bitwise_or)
# methods that only convert the dtype (the target dtype is read from the node's value)
_CASTS = ("to", "type", "float", "double", "half", "bfloat16", "long", "int", "bool")


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """One call in the graph: ``fn`` is a torch function (a method call ``x.f(...)`` reads as
    ``torch.f(x, ...)``, ``a * b`` as ``torch.mul(a, b)``); ``args`` its arguments by
    parameter name, defaults filled in, or None where no schema fits (``einsum``, view
    methods): then ``raw`` holds the node's own positional arguments (``self`` first)."""

    fn: Any
    args: Mapping[str, Any] | None
    raw: tuple[Any, ...]
    kwargs: Mapping[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        return default if self.args is None else self.args.get(name, default)

    def __getitem__(self, name: str) -> Any:
        if self.args is None or name not in self.args:
            raise KeyError(name)
        return self.args[name]


def function(node: Any) -> Any:
    """The torch function ``node`` calls (None: not a function or method call); cheap, no
    argument normalisation."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_method":
        fn = getattr(torch, node.target, None)
        if not callable(fn) or isinstance(fn, torch.dtype):  # x.float(): torch.float is a dtype
            fn = getattr(torch.Tensor, node.target, None)
        return fn
    return _OPERATORS.get(node.target, node.target)


def call(node: Any) -> Call | None:
    """The call ``node`` makes, read as a torch function (None: not a function or method call)."""
    fn = function(node)
    if fn is None:
        return None
    return Call(fn, _normalized(fn, node.args, dict(node.kwargs)), tuple(node.args), node.kwargs)


def _normalized(fn: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    tries = [args]
    if fn in _COMMUTATIVE and len(args) == 2 and not isinstance(val(args[0]), torch.Tensor):
        tries.append((args[1], args[0]))  # 2 * x
    if len(args) > 2 and all(isinstance(a, (int, fx.Node)) and not isinstance(val(a), torch.Tensor)
                             for a in args[1:]):
        tries.append((args[0], tuple(args[1:])))  # x.permute(2, 0, 1)
    if len(args) > 1 and all(isinstance(a, int) for a in args):
        tries.append((tuple(args),))  # torch.ones(n, n)
    for positional in tries:
        done = _normalize(fn, positional, kwargs)
        if done is not None:
            return done
    return None


def _normalize(fn: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    with warnings.catch_warnings():  # schemas with nested generic types warn, then do not match
        warnings.simplefilter("ignore")
        try:
            done = normalize_function(fn, args, kwargs, normalize_to_only_use_kwargs=True)
        except RuntimeError:  # several schemas fit: the argument types pick one
            types = tuple(_type(a) for a in args)
            ktypes = {k: _type(a) for k, a in kwargs.items()}
            try:
                done = normalize_function(fn, args, kwargs, types, ktypes, normalize_to_only_use_kwargs=True)
            except RuntimeError:
                return None
        except (TypeError, ValueError):
            return None
    return None if done is None else dict(done.kwargs)


def _type(arg: Any) -> type:
    value = val(arg)
    if isinstance(value, torch.Tensor):
        return torch.Tensor
    if isinstance(value, torch.SymInt):
        return int
    if isinstance(value, torch.SymFloat):
        return float
    return type(value)


def is_call(node: Any, *fns: Any) -> bool:
    fn = function(node)
    return fn is not None and fn in fns


def upstream(node: Any, hops: int = 6) -> list[fx.Node]:
    """``node`` and the calls that feed it through at most ``hops`` calls producing the same
    shape (elementwise work, masking, dropout, casts): where a product's attention weights
    may have come from."""
    dims = shape(node)
    seen: list[fx.Node] = []
    frontier = [node] if isinstance(node, fx.Node) else []
    for _ in range(hops + 1):
        nxt = []
        for n in frontier:
            if n in seen or n.op not in ("call_function", "call_method") or not same_shape(shape(n), dims):
                continue
            seen.append(n)
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return seen


def attention_weights(left: Any, *activations: Any) -> bool:
    """Whether a product's left operand looks like attention weights: square in its last
    two dims (queries by keys) and made by one of ``activations`` from a matmul, bmm or
    einsum, through elementwise work. (An MLP's ``silu(x @ w1) @ w2`` is not square.)"""
    dims = shape(left)
    if dims is None or len(dims) < 2 or not same(dims[-1], dims[-2]):
        return False
    feeding = upstream(left)
    return (any(is_call(n, *activations) for n in feeding)
            and any(is_call(n, torch.matmul, torch.bmm, torch.einsum) for n in feeding))


def val(arg: Any) -> Any:
    """A node's example value (Dynamo's fake tensor), or the argument itself."""
    return arg.meta.get("example_value", arg.meta.get("val")) if isinstance(arg, fx.Node) else arg


def shape(node: Any) -> tuple[Any, ...] | None:
    value = val(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def scalar(arg: Any) -> float | None:
    return float(arg) if isinstance(arg, (int, float)) and not isinstance(arg, bool) else None


def fmt(dims: Any) -> str:
    return "[" + ", ".join(str(s) for s in dims) + "]"


def same(a: Any, b: Any) -> bool:
    """Two sizes that are equal for every value of their symbols."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return a is b or (isinstance(a, (int, torch.SymInt)) and isinstance(b, (int, torch.SymInt))
                      and bool(statically_known_true(a == b)))


def same_shape(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    """Two shapes equal for every value of their symbols (comparing SymInts with ``==``
    would guard on them and specialise a dynamic graph)."""
    return a is not None and b is not None and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def uncast(node: Any) -> tuple[Any, torch.dtype | None]:
    """(source, dtype of the last conversion) after stripping dtype conversions
    (``.float()``, ``.to(dtype)``, ...); dtype None when there were none."""
    dtype = None
    while _is_cast(node):
        dtype = dtype or val(node).dtype
        node = node.args[0]
    return node, dtype


def _is_cast(node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_method" or node.target not in _CASTS:
        return False
    extra = (*node.args[1:], *node.kwargs.values())
    if set(node.kwargs) - {"dtype"} or not all(isinstance(a, torch.dtype) for a in extra):
        return False
    return len(extra) == (1 if node.target in ("to", "type") else 0) and isinstance(val(node), torch.Tensor)


def binary(node: Any, *fns: Any) -> tuple[Any, Any] | None:
    """The two operands of ``input (op) other`` for one of ``fns`` (``add``/``sub`` only
    with alpha 1)."""
    if function(node) not in fns:
        return None
    c = call(node)
    if c.args is None or c.get("alpha", 1) != 1:
        return None
    if c.fn is torch.div and c.get("rounding_mode") is not None:
        return None
    return c.args.get("input"), c.args.get("other")


def factors(node: Any, out: list[tuple[Any, bool]] | None = None) -> list[tuple[Any, bool]]:
    """A product ``a * b / c ...`` as (factor, is_divisor) pairs."""
    out = [] if out is None else out
    if (ops := binary(node, torch.mul)) is not None:
        factors(ops[0], out)
        factors(ops[1], out)
    elif (ops := binary(node, torch.div)) is not None:
        factors(ops[0], out)
        out.append((ops[1], True))
    else:
        out.append((node, False))
    return out


def scale_of(fs: list[tuple[Any, bool]]) -> tuple[float, list[Any]] | None:
    """(product of the scalar factors, the tensor factors), or None if a divisor is a tensor."""
    scale, tensors = 1.0, []
    for factor, divisor in fs:
        c = scalar(factor)
        if c is not None:
            scale = scale / c if divisor else scale * c
        elif divisor:
            return None
        else:
            tensors.append(factor)
    return scale, tensors


def silu_weights(attn: Any) -> tuple[float, fx.Node, list[Any]] | str:
    """(scalar factor, the silu node, the other tensor factors) when ``attn`` is one
    ``silu(scores)`` times scalars and tensors (HSTU's weights), or why not."""
    scaled = scale_of(factors(attn))
    if scaled is None:
        return "the attention weights are divided by a tensor"
    scale, tensors = scaled
    silus = [t for t in tensors if is_call(t, F.silu)]
    if len(silus) != 1 or call(silus[0]).get("inplace"):
        return "the attention weights are not silu(scores) times scalars and a mask"
    return scale, silus[0], [t for t in tensors if t is not silus[0]]


def einsum(node: Any) -> tuple[str, list[str], str, list[Any]] | None:
    """(equation, input subscripts, output subscripts, operands) of an explicit ``einsum``."""
    if function(node) is not torch.einsum:
        return None
    c = call(node)
    if c.kwargs or not c.raw or not isinstance(c.raw[0], str):
        return None
    operands = list(c.raw[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    eq = c.raw[0].replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    return eq, lhs.split(","), out, operands


def untransposed(node: Any) -> fx.Node | None:
    """k when ``node`` is k with its last two dims swapped (``transpose``, ``mT``), 3-D or 4-D."""
    dims = shape(node)
    if dims is None or len(dims) not in (3, 4):
        return None
    rank = len(dims)
    c = call(node)
    if c is not None and c.fn is torch.transpose and c.args is not None:
        swapped = {d % rank for d in (c.args["dim0"], c.args["dim1"]) if isinstance(d, int)}
        return c.args["input"] if swapped == {rank - 2, rank - 1} else None
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None
