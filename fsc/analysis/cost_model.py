"""Analytical cost model: FLOPs and bytes per node, roofline time on a device profile,
alpha-beta time for collectives.

Costs are sympy expressions when shapes are symbolic and are evaluated at the size
hint. Nothing here reads a clock or a rank-local fact, so every rank agrees.
"""

from __future__ import annotations

import dataclasses
import re
import functools
import logging
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from fsc.analysis.collectives import COLLECTIVE_KINDS, call_arg, describe, is_collective, is_wait
from fsc.analysis.symbolic import UNBACKED_FALLBACK, as_expr, hint, is_symbolic, tensor_nbytes

log = logging.getLogger(__name__)

GB = 1e9
TB = 1e12


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DeviceProfile:
    """Throughputs and latencies of one device and its links."""

    name: str
    flops_fp32: float
    """FLOP/s for fp32 matmuls."""
    flops_half: float
    """FLOP/s for bf16/fp16 matmuls (dense, no sparsity)."""
    memory_bandwidth: float
    """Bytes/s between memory and compute units."""
    intra_node_bandwidth: float
    """Bytes/s one rank can send to peers on its node (one direction)."""
    intra_node_latency: float
    inter_node_bandwidth: float
    """Bytes/s one rank can send off its node (one direction)."""
    inter_node_latency: float
    ranks_per_node: int
    op_overhead: float
    """Seconds every non-view op costs regardless of size (launch or dispatch)."""
    memory_bytes: float
    default_group_size: int
    """Group size assumed when the graph does not state it."""


# H100 SXM numbers are NVIDIA's datasheet figures (dense bf16 989 TFLOP/s, fp32 via TF32
# tensor cores 495 TFLOP/s, HBM3 3.35 TB/s, NVLink 4 at 450 GB/s per direction, one 400 Gb/s
# NDR NIC per GPU); latencies are typical NCCL small-message figures. The cpu profile is
# the 2-core CI machine with one thread per rank and gloo over loopback, measured with
# `python -m bench cpu-profile` (2026-11-22: fp32 mm 75-90 GFLOP/s, bf16 mm 190-210,
# copy 19-20 GB/s, 4-5 us per op, 2-rank all-to-all 220-450 us + 0.92-0.95 GB/s); its
# inter-node figures are assumptions (no multi-host CPU run has been made).
DEVICE_PROFILES: dict[str, DeviceProfile] = {
    "cpu": DeviceProfile(
        name="cpu",
        flops_fp32=80e9,
        flops_half=190e9,
        memory_bandwidth=19 * GB,
        intra_node_bandwidth=0.93 * GB,
        intra_node_latency=300e-6,
        inter_node_bandwidth=1.0 * GB,
        inter_node_latency=100e-6,
        ranks_per_node=8,
        op_overhead=4.5e-6,
        memory_bytes=24 * GB,
        default_group_size=2,
    ),
    "h100": DeviceProfile(
        name="h100",
        flops_fp32=495 * TB,
        flops_half=989 * TB,
        memory_bandwidth=3.35 * TB,
        intra_node_bandwidth=450 * GB,
        intra_node_latency=10e-6,
        inter_node_bandwidth=50 * GB,
        inter_node_latency=20e-6,
        ranks_per_node=8,
        op_overhead=5e-6,
        memory_bytes=80 * GB,
        default_group_size=8,
    ),
}


# H200: the H100's compute and links with HBM3e (4.8 TB/s, 141 GB).
DEVICE_PROFILES["h200"] = dataclasses.replace(
    DEVICE_PROFILES["h100"], name="h200", memory_bandwidth=4.8 * TB, memory_bytes=141 * GB
)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class NodeCost:
    """What one node costs. ``lane`` says where the time is spent: ``compute`` (the
    compute stream), ``comm`` (the collective's group queue), ``wait`` or ``free``."""

    lane: str
    seconds: float
    expr: sympy.Expr | None = None
    """Seconds as a sympy expression when shapes are symbolic, else None."""
    flops: float = 0.0
    nbytes: float = 0.0
    flops_expr: Any = 0
    """FLOPs as an int or sympy expression in the graph's size symbols."""
    nbytes_expr: Any = 0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GraphCost:
    """Compute work of a whole graph as expressions in its size symbols: what one run of
    it costs as a function of, say, the sequence length."""

    flops: sympy.Expr
    nbytes: sympy.Expr
    seconds: sympy.Expr
    """Sum over compute nodes of the roofline time max(flops/peak, bytes/bandwidth) plus
    the per-op overhead."""
    ops: int
    mixing: tuple[str, ...] = ()
    """The nodes whose FLOPs grow with the square of a size (a sample's tokens meeting each
    other: attention, written any way) other than ``fsc::jagged_attention`` called with
    ``q_start``, which takes a chunk of a sample with separate query and key extents; each as
    ``name (op, FLOPs) in layer``. What :meth:`fsc.CompileRecord.split_refusal` reads. (A record pickled before
    this field existed has none: read it with ``getattr(cost, "mixing", ())``.)"""


def graph_cost(graph: fx.Graph, cost_model: CostModel) -> GraphCost:
    """Sum of the compute costs of ``graph`` (collectives, waits and views excluded)."""
    flops, nbytes, seconds, ops = sympy.Integer(0), sympy.Integer(0), sympy.Integer(0), 0
    mixing = []
    for node in graph.nodes:
        cost = cost_model.node_cost(node)
        if cost.lane != "compute":
            continue
        ops += 1
        node_flops = as_expr(cost.flops_expr)
        flops += node_flops
        nbytes += as_expr(cost.nbytes_expr)
        seconds += cost.expr if cost.expr is not None else sympy.Float(cost.seconds)
        if _quadratic(node_flops) and not _takes_chunks(node):
            mixing.append(f"{node.name} ({node.target}, FLOPs {node_flops}) in {_layer(node)}")
    return GraphCost(flops=flops, nbytes=nbytes, seconds=seconds, ops=ops, mixing=tuple(mixing))


def _takes_chunks(node: fx.Node) -> bool:
    """``fsc::jagged_attention`` called with ``q_start`` (the model passes each piece's first
    position and its keys' extents: a chunk sees its earlier chunks' keys). Without it, as
    lower-attention emits for attention written over whole samples, a chunk would not."""
    if "jagged_attention" not in str(node.target):
        return False
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    if "q_start" in node.kwargs:
        return node.kwargs["q_start"] is not None
    index = names.index("q_start") if "q_start" in names else -1
    return 0 <= index < len(node.args) and node.args[index] is not None


def _quadratic(expr: sympy.Expr) -> bool:
    for symbol in expr.free_symbols:
        try:
            if sympy.Poly(expr, symbol).degree() >= 2:
                return True
        except sympy.PolynomialError:  # Max, Min, ...: not a polynomial, not counted
            continue
    return False


def _layer(node: fx.Node) -> str:
    """The module a node came from (its innermost ``nn_module_stack`` entry), else the last
    frame of its stack trace."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, kind = list(stack.values())[-1]
        path = re.sub(r"^L\['self'\]\.?", "", str(path))  # Dynamo's name for the compiled module
        name = getattr(kind, "__name__", None) or str(kind).rsplit(".", 1)[-1].strip("'>")
        return f"{path} ({name})" if path else name
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [line.strip() for line in trace if line.strip().startswith("File ")]
    return frames[-1] if frames else "an unknown layer"


def _at_hints(expr: sympy.Expr, node: fx.Node) -> float:
    """``expr`` at the size hints of the shape environment ``node``'s values live in."""
    if not expr.free_symbols:
        return float(expr)
    shape_env = None
    flat, _ = tree_flatten((node.meta.get("val"), [_val(a) for a in node.all_input_nodes]))
    for v in flat:
        if isinstance(v, torch.Tensor):
            v = next((d for d in v.shape if isinstance(d, torch.SymInt)), None)
        if isinstance(v, (torch.SymInt, torch.SymFloat)) and getattr(v.node, "shape_env", None) is not None:
            shape_env = v.node.shape_env
            break
    backed = {}
    if shape_env is not None:
        backed = getattr(shape_env, "backed_var_to_val", None)
        backed = backed if backed is not None else shape_env.var_to_val
    return float(expr.xreplace({s: backed.get(s, UNBACKED_FALLBACK) for s in expr.free_symbols}))


def invariant_seconds(cost: NodeCost, size: float = UNBACKED_FALLBACK) -> float:
    """``cost`` with every size symbol at the same fixed value ``size`` on every rank: what
    scheduling decisions must use (hints are rank-local; see
    :func:`fsc.analysis.symbolic.invariant_value`)."""
    if cost.expr is None:
        return cost.seconds
    return _evaluate_at(cost.expr, int(size) if float(size).is_integer() else float(size))


@functools.lru_cache(maxsize=1 << 16)
def _evaluate_at(expr: sympy.Expr, size: int | float) -> float:
    # Schedulers ask for the same few expressions at the same few sizes many times. Sizes
    # stay integers where they are: size arithmetic (FloorDiv, Mod) evaluates only on those.
    return float(expr.xreplace({sym: size for sym in expr.free_symbols}))


_VIEW_LIKE = {operator.getitem}

#: Ops that read sizes or check them on the host: Inductor emits no kernel for them, and
#: they touch no tensor data (``sym_size`` of a large tensor reads its metadata only).
_HOST_SIZE_OPS = {
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.sym_stride.int,
    torch.ops.aten.sym_storage_offset.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


def is_host_scalar_op(node: fx.Node) -> bool:
    """Size reads, size checks and arithmetic on sizes (``operator.mul`` of SymInts,
    ``torch.sym_sum``): host-side scalar work that launches nothing, costed as free.
    ``_local_scalar_dense`` (a device-to-host copy) is not among them."""
    if node.op != "call_function":
        return False
    if node.target in _HOST_SIZE_OPS:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return False
    scalar = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)
    return getattr(node.target, "__module__", None) in ("_operator", "torch") and isinstance(
        node.meta.get("val"), scalar)


def _is_unbacked(sym: sympy.Symbol) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return bool(free_unbacked_symbols(sym))


def exchange_size_estimates(graph: fx.Graph) -> dict[sympy.Symbol, sympy.Expr]:
    """Data-dependent (unbacked) split sizes of the graph's all-to-alls, as expressions in
    the graph's other size symbols.

    An ``all_to_all_single``'s input split sizes sum to its input's first dimension (the
    op requires it): each unknown one is estimated at an equal share of what the known ones
    leave. Its output split sizes, the rows this rank receives, are data: they are
    estimated as a balanced exchange, in which a rank receives as many rows as it sends,
    in equal shares. The estimates propagate from one all-to-all to the next (an embedding
    exchange's reply reuses the request's split sizes reversed), in program order until
    nothing changes. Symbols no all-to-all determines are left out (costs then size them
    at :data:`~fsc.analysis.symbolic.UNBACKED_FALLBACK`). Only graph structure is read,
    so every rank derives the same expressions.
    """
    estimates: dict[sympy.Symbol, sympy.Expr] = {}

    def resolved(expr: sympy.Expr) -> sympy.Expr | None:
        expr = expr.xreplace(estimates)
        return None if any(_is_unbacked(s) for s in expr.free_symbols) else expr

    def share(splits: Any, total: sympy.Expr) -> bool:
        if not isinstance(splits, (list, tuple)) or not splits:
            return False
        exprs = [as_expr(s.meta.get("val") if isinstance(s, fx.Node) else s) for s in splits]
        unknown = [e for e in exprs if isinstance(e, sympy.Symbol) and _is_unbacked(e) and e not in estimates]
        known = [resolved(e) for e in exprs if e not in unknown]
        if not unknown or any(k is None for k in known):
            return False
        # A whole number of rows: size arithmetic downstream (FloorDiv) evaluates on integers only.
        rest = sympy.floor(sympy.Max(0, total - sum(known, sympy.Integer(0))) / len(unknown))
        for sym in dict.fromkeys(unknown):
            estimates[sym] = rest
        return True

    exchanges = [n for n in graph.nodes if is_collective(n) and describe(n).kind == "all_to_all_single"]
    changed = True
    while changed:
        changed = False
        for node in exchanges:
            inp = _val(call_arg(node, "input"))
            if not isinstance(inp, torch.Tensor) or inp.dim() == 0:
                continue
            rows = resolved(as_expr(inp.shape[0]))
            if rows is None:
                continue
            changed |= share(call_arg(node, "input_split_sizes"), rows)
            changed |= share(call_arg(node, "output_split_sizes"), rows)
    return estimates


def is_view(node: fx.Node) -> bool:
    """Nodes that allocate nothing and launch nothing: views, aliases, getitem."""
    if node.op != "call_function":
        return True
    if node.target in _VIEW_LIKE:
        return True
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target is torch.ops.aten.detach.default:
            return True
        returns = target._schema.returns
        return bool(returns) and all(
            r.alias_info is not None and not r.alias_info.is_write for r in returns
        )
    return False


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def _flop_formula(target: Any) -> Any:
    from torch.utils.flop_counter import flop_registry

    packet = getattr(target, "overloadpacket", None)
    return flop_registry.get(packet) if packet is not None else None


class CostModel:
    """Per-node costs on a :class:`DeviceProfile`.

    ``node_cost`` is memoised per node object and must only be asked about nodes whose
    shapes do not change afterwards (passes move nodes; they do not change shapes).

    Data-dependent split sizes of all-to-alls are sized by
    :func:`exchange_size_estimates` (derived once per graph): ``seconds`` and ``expr``
    use them, while ``flops_expr`` and ``nbytes_expr`` keep the graph's own symbols.
    ``size_estimates`` adds estimates for symbols a graph cannot size alone (a backward
    graph's exchange, whose split sizes only its forward graph ties to the token count);
    a graph's own estimates come first.
    """

    def __init__(self, profile: DeviceProfile, *,
                 size_estimates: dict[sympy.Symbol, sympy.Expr] | None = None) -> None:
        self.profile = profile
        self._cache: dict[fx.Node, NodeCost] = {}
        self._given = dict(size_estimates or {})
        self._estimates: dict[fx.Graph, dict[sympy.Symbol, sympy.Expr]] = {}

    def node_cost(self, node: fx.Node) -> NodeCost:
        cached = self._cache.get(node)
        if cached is None:
            cached = self._cache[node] = self._node_cost(node)
        return cached

    def _node_cost(self, node: fx.Node) -> NodeCost:
        if node.op == "call_function" and node.target in COLLECTIVE_KINDS:
            return self._sized(node, self.collective_cost(node))
        if node.op == "call_function" and is_wait(node):
            return NodeCost(lane="wait", seconds=0.0)
        if is_view(node) or is_host_scalar_op(node):
            return NodeCost(lane="free", seconds=0.0)
        return self._sized(node, self.compute_cost(node))

    def _sized(self, node: fx.Node, cost: NodeCost) -> NodeCost:
        """``cost`` with the graph's exchange size estimates put into its time."""
        if cost.expr is None:
            return cost
        graph = node.graph
        if graph not in self._estimates:
            self._estimates[graph] = {**self._given, **exchange_size_estimates(graph)}
        estimates = self._estimates[graph]
        expr = cost.expr.xreplace(estimates) if estimates else cost.expr
        if expr is cost.expr:
            return cost
        try:
            seconds = _at_hints(expr, node)
            for size in (1, UNBACKED_FALLBACK):  # what schedulers will ask: must evaluate too
                _evaluate_at(expr, size)
        except (TypeError, ValueError):  # an estimate sympy cannot evaluate: keep the graph's own sizes
            log.debug("size estimates not used for %s: %s does not evaluate", node.name, expr)
            return cost
        return dataclasses.replace(cost, expr=expr, seconds=seconds)

    def compute_cost(self, node: fx.Node) -> NodeCost:
        args = tree_map(_val, node.args)
        kwargs = tree_map(_val, node.kwargs)
        out = node.meta.get("val")
        flat_in, _ = tree_flatten((args, kwargs))
        flat_out, _ = tree_flatten(out)
        in_tensors = [t for t in flat_in if isinstance(t, torch.Tensor)]
        out_tensors = [t for t in flat_out if isinstance(t, torch.Tensor)]
        nbytes: Any = sum((tensor_nbytes(t) for t in in_tensors + out_tensors), 0)
        flops: Any = 0
        formula = _flop_formula(node.target)
        if formula is not None and out is not None:
            try:
                flops = formula(*args, out_val=out, **kwargs)
            except Exception:  # a formula that cannot take these args counts as memory-bound
                flops = 0
        dtype = out_tensors[0].dtype if out_tensors else torch.float32
        peak = self.profile.flops_half if dtype in (torch.bfloat16, torch.float16) else self.profile.flops_fp32
        seconds = max(hint(flops) / peak, hint(nbytes) / self.profile.memory_bandwidth) + self.profile.op_overhead
        expr = None
        if is_symbolic(flops) or is_symbolic(nbytes):  # sympy only where shapes are symbolic
            expr = sympy.Max(as_expr(flops) / peak, as_expr(nbytes) / self.profile.memory_bandwidth)
            expr = expr + self.profile.op_overhead
        return NodeCost(
            lane="compute",
            seconds=seconds,
            expr=expr,
            flops=hint(flops),
            nbytes=hint(nbytes),
            flops_expr=flops,
            nbytes_expr=nbytes,
        )

    def link(self, ranks: int | None) -> tuple[float, float]:
        """(bandwidth, latency) of a group of ``ranks``: inter-node once it spans nodes."""
        ranks = ranks or self.profile.default_group_size
        if ranks > self.profile.ranks_per_node:
            return self.profile.inter_node_bandwidth, self.profile.inter_node_latency
        return self.profile.intra_node_bandwidth, self.profile.intra_node_latency

    def collective_cost(self, node: fx.Node) -> NodeCost:
        coll = describe(node)
        ranks = coll.group_size or self.profile.default_group_size
        bandwidth, latency = self.link(ranks)
        share = (ranks - 1) / ranks
        # Bytes each rank sends: an all-to-all keeps 1/R of its input, a ring all-gather
        # or reduce-scatter moves (R-1)/R of the full tensor, a ring all-reduce does both.
        moved, factor = {
            "all_to_all_single": (coll.input_nbytes, share),
            "all_gather_into_tensor": (coll.nbytes, share),
            "reduce_scatter_tensor": (coll.input_nbytes, share),
            "all_reduce": (coll.nbytes, 2 * share),
        }[coll.kind]
        steps = 1 if coll.kind == "all_to_all_single" else max(ranks - 1, 1)
        if coll.kind == "all_reduce":
            steps *= 2
        seconds = latency * steps + hint(moved) * factor / bandwidth
        expr = latency * steps + as_expr(moved) * factor / bandwidth if is_symbolic(moved) else None
        return NodeCost(
            lane="comm",
            seconds=seconds,
            expr=expr,
            nbytes=hint(moved) * factor,
        )

