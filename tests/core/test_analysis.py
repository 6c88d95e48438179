"""fsc.analysis on fake- and symbolic-traced graphs: collectives, cost model, timeline and
peak memory. Expected numbers are derived here from the device profile, never copied from
the code under test."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from fsc.analysis import (
    DEVICE_PROFILES,
    CostModel,
    estimate_timeline,
    find_collectives,
    is_collective,
    is_wait,
    opaque_collectives,
)
from fsc.analysis.cost_model import exchange_size_estimates, is_host_scalar_op
from fsc.analysis.timeline import exposed_lower_bound, peak_memory

c10d = torch.ops._c10d_functional
CPU = DEVICE_PROFILES["cpu"]
F32 = 4  # bytes per float32 element


def trace(f, *shapes, dtype: torch.dtype = torch.float32, mode: str = "fake") -> fx.GraphModule:
    return make_fx(f, tracing_mode=mode)(*(torch.randn(*s, dtype=dtype) for s in shapes))


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    (found,) = [n for n in gm.graph.nodes if n.name == name]
    return found


def cost_model() -> CostModel:
    return CostModel(CPU)


def alpha_beta(ranks: int, moved_bytes: float, factor: float, steps: int) -> float:
    """Seconds of a collective on the cpu profile, from the profile's link figures."""
    if ranks > CPU.ranks_per_node:
        latency, bandwidth = CPU.inter_node_latency, CPU.inter_node_bandwidth
    else:
        latency, bandwidth = CPU.intra_node_latency, CPU.intra_node_bandwidth
    return latency * steps + moved_bytes * factor / bandwidth


# --------------------------------------------------------------------------- collectives


def exchange_then_add(x, w):
    y = c10d.all_to_all_single(x, [1, 1, 1, 1], [1, 1, 1, 1], "g0")
    return c10d.wait_tensor(y) + w


def test_find_collectives_describes_all_to_all_single():
    gm = trace(exchange_then_add, (4, 3), (4, 3))
    (coll,) = find_collectives(gm.graph)
    assert coll.node is node(gm, "all_to_all_single")
    assert coll.kind == "all_to_all_single"
    assert coll.group_name == "g0"
    assert coll.waits == (node(gm, "wait_tensor"),)
    assert coll.nbytes == 4 * 3 * F32
    assert coll.input_nbytes == 4 * 3 * F32
    assert coll.group_size == 4  # four split sizes: four ranks
    assert coll.identity == "all_to_all_single"
    assert is_collective(coll.node) and not is_wait(coll.node)
    assert is_wait(node(gm, "wait_tensor")) and not is_collective(node(gm, "wait_tensor"))


def test_find_collectives_counts_bytes_by_dtype():
    gm = trace(exchange_then_add, (4, 3), (4, 3), dtype=torch.bfloat16)
    (coll,) = find_collectives(gm.graph)
    assert coll.nbytes == coll.input_nbytes == 4 * 3 * 2


def every_kind(x):
    a = c10d.all_gather_into_tensor(x, 4, "tp")
    r = c10d.reduce_scatter_tensor(x, "sum", 2, "dp")
    s = c10d.all_reduce(x, "sum", "dp")
    t = c10d.all_to_all_single(x, [3, 5], [4, 4], "ep")  # no wait: unwaited collective
    return c10d.wait_tensor(a), c10d.wait_tensor(r), c10d.wait_tensor(s), t


def test_find_collectives_lists_every_kind_in_program_order():
    gm = trace(every_kind, (8, 2))
    found = find_collectives(gm.graph)
    assert [c.kind for c in found] == [
        "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_to_all_single",
    ]
    assert [c.group_name for c in found] == ["tp", "dp", "dp", "ep"]
    assert [c.group_size for c in found] == [4, 2, None, 2]
    row = 2 * F32
    assert [c.input_nbytes for c in found] == [8 * row] * 4
    # gather: 4x rows; scatter: 1/2 rows; all-reduce: same; all-to-all: sum(output splits)
    assert [c.nbytes for c in found] == [32 * row, 4 * row, 8 * row, 8 * row]
    assert [len(c.waits) for c in found] == [1, 1, 1, 0]


def broadcast_graph(x, y):
    b = c10d.wait_tensor(c10d.broadcast(x, 0, "g0"))
    e = c10d.wait_tensor(c10d.all_to_all_single(y, [2, 2], [2, 2], "g0"))
    return b + e


def test_opaque_collectives_flags_broadcast_but_not_understood_collectives():
    assert hasattr(c10d, "broadcast")
    gm = trace(broadcast_graph, (4, 3), (4, 3))
    assert opaque_collectives(gm.graph) == [node(gm, "broadcast")]
    assert [c.kind for c in find_collectives(gm.graph)] == ["all_to_all_single"]


def test_opaque_collectives_flags_coalesced_gather():
    def f(x, y):
        a, b = c10d.all_gather_into_tensor_coalesced([x, y], 2, "g0")
        return c10d.wait_tensor(a), c10d.wait_tensor(b)

    gm = trace(f, (4, 3), (4, 3))
    assert opaque_collectives(gm.graph) == [node(gm, "all_gather_into_tensor_coalesced")]
    assert find_collectives(gm.graph) == []


def test_opaque_collectives_is_empty_for_understood_collectives_and_compute():
    gm = trace(every_kind, (8, 2))
    assert opaque_collectives(gm.graph) == []
    gm = trace(lambda a, b: torch.mm(a, b).relu(), (3, 4), (4, 5))
    assert opaque_collectives(gm.graph) == []
    assert find_collectives(gm.graph) == []


# ----------------------------------------------------------------------------- cost model


def test_cost_model_matmul_is_roofline_time_on_profile():
    m, k, n = 64, 128, 256
    gm = trace(torch.mm, (m, k), (k, n))
    cost = cost_model().node_cost(node(gm, "mm"))
    flops = 2 * m * n * k
    nbytes = (m * k + k * n + m * n) * F32
    assert cost.lane == "compute"
    assert cost.flops == flops
    assert cost.nbytes == nbytes
    assert cost.seconds == max(flops / CPU.flops_fp32, nbytes / CPU.memory_bandwidth) + CPU.op_overhead
    assert cost.expr is None  # static shapes: no expression


def test_cost_model_half_precision_matmul_uses_half_peak():
    m, k, n = 64, 128, 256
    gm = trace(torch.mm, (m, k), (k, n), dtype=torch.bfloat16)
    cost = cost_model().node_cost(node(gm, "mm"))
    flops = 2 * m * n * k
    nbytes = (m * k + k * n + m * n) * 2
    assert cost.seconds == max(flops / CPU.flops_half, nbytes / CPU.memory_bandwidth) + CPU.op_overhead


def test_cost_model_elementwise_op_is_memory_bound():
    gm = trace(torch.add, (1024,), (1024,))
    cost = cost_model().node_cost(node(gm, "add"))
    nbytes = 3 * 1024 * F32
    assert cost.flops == 0
    assert cost.nbytes == nbytes
    assert cost.seconds == nbytes / CPU.memory_bandwidth + CPU.op_overhead


def views(x):
    return x.view(-1), x.t(), x.transpose(0, 1), x.detach(), x[0], x.unsqueeze(0), x.expand(2, 4, 4), torch.split(x, 2)


def test_cost_model_views_are_free():
    gm = trace(views, (4, 4))
    model = cost_model()
    targets = []
    for n in gm.graph.nodes:
        cost = model.node_cost(n)
        assert cost.lane == "free", n.name
        assert cost.seconds == 0.0 and cost.flops == 0.0 and cost.nbytes == 0.0
        targets.append(n.name)
    assert {"view", "t", "transpose", "detach", "select", "unsqueeze", "expand", "split", "getitem"} <= set(targets)


def test_cost_model_wait_is_on_wait_lane():
    gm = trace(exchange_then_add, (4, 3), (4, 3))
    cost = cost_model().node_cost(node(gm, "wait_tensor"))
    assert cost.lane == "wait" and cost.seconds == 0.0


def test_cost_model_all_to_all_is_alpha_beta_on_intra_node_link():
    rows, cols = 1024, 256
    gm = trace(lambda x: c10d.wait_tensor(c10d.all_to_all_single(x, [512, 512], [512, 512], "g0")), (rows, cols))
    cost = cost_model().node_cost(node(gm, "all_to_all_single"))
    sent = rows * cols * F32
    # two ranks on one node: one step, each rank keeps half of its input
    expected = CPU.intra_node_latency * 1 + sent * (1 / 2) / CPU.intra_node_bandwidth
    assert cost.lane == "comm"
    assert cost.seconds == expected
    assert cost.seconds == alpha_beta(2, sent, 1 / 2, 1)
    assert cost.nbytes == sent / 2
    assert cost.expr is None


def test_cost_model_all_to_all_beyond_one_node_uses_inter_node_link():
    ranks = 2 * CPU.ranks_per_node
    splits = [4] * ranks
    gm = trace(lambda x: c10d.wait_tensor(c10d.all_to_all_single(x, splits, splits, "g0")), (4 * ranks, 8))
    cost = cost_model().node_cost(node(gm, "all_to_all_single"))
    sent = 4 * ranks * 8 * F32
    expected = CPU.inter_node_latency * 1 + sent * ((ranks - 1) / ranks) / CPU.inter_node_bandwidth
    assert cost.seconds == expected


def test_cost_model_ring_collectives_alpha_beta():
    gm = trace(every_kind, (8, 2))
    model = cost_model()
    tensor = 8 * 2 * F32
    default = CPU.default_group_size
    # all-gather of 4: 3 ring steps moving 3/4 of the gathered tensor
    assert model.node_cost(node(gm, "all_gather_into_tensor")).seconds == alpha_beta(4, 4 * tensor, 3 / 4, 3)
    # reduce-scatter of 2: 1 step moving 1/2 of the input
    assert model.node_cost(node(gm, "reduce_scatter_tensor")).seconds == alpha_beta(2, tensor, 1 / 2, 1)
    # all-reduce, group size unstated: profile default, reduce-scatter + all-gather
    assert model.node_cost(node(gm, "all_reduce")).seconds == alpha_beta(
        default, tensor, 2 * (default - 1) / default, 2 * (default - 1)
    )


def test_cost_model_symbolic_matmul_has_expression_evaluating_to_seconds():
    m, k, n = 64, 128, 256
    gm = trace(torch.mm, (m, k), (k, n), mode="symbolic")
    hints: dict[sympy.Symbol, int] = {}
    for p in gm.graph.find_nodes(op="placeholder"):
        for size in p.meta["val"].shape:
            assert isinstance(size, torch.SymInt)
            hints[sympy.sympify(size.node.expr)] = size.node.hint
    assert sorted(hints.values()) == [m, k, n]  # three distinct symbols: M, K, N
    cost = cost_model().node_cost(node(gm, "mm"))
    assert isinstance(cost.expr, sympy.Expr)
    assert cost.expr.free_symbols and cost.expr.free_symbols <= set(hints)
    assert cost.flops == 2 * m * n * k
    static = max(2 * m * n * k / CPU.flops_fp32, (m * k + k * n + m * n) * F32 / CPU.memory_bandwidth) + CPU.op_overhead
    assert cost.seconds == pytest.approx(static, rel=1e-12)
    assert float(cost.expr.subs(hints)) == pytest.approx(cost.seconds, rel=1e-12)
    # and at other sizes the expression follows the roofline too
    sym = {hint: sym for sym, hint in hints.items()}
    other = {sym[m]: 8, sym[k]: 8, sym[n]: 8}
    small = max(2 * 8**3 / CPU.flops_fp32, 3 * 64 * F32 / CPU.memory_bandwidth) + CPU.op_overhead
    assert float(cost.expr.subs(other)) == pytest.approx(small, rel=1e-12)


def test_cost_model_memoises_per_node():
    gm = trace(torch.mm, (4, 4), (4, 4))
    model = cost_model()
    mm = node(gm, "mm")
    assert model.node_cost(mm) is model.node_cost(mm)


# ------------------------------------------------------------------------------- timeline


def overlapped(x, w):
    c = c10d.all_to_all_single(x, [512, 512], [512, 512], "g0")
    m = torch.mm(w, w)
    return c10d.wait_tensor(c), m


def serial(x, w):
    y = c10d.wait_tensor(c10d.all_to_all_single(x, [512, 512], [512, 512], "g0"))
    m = torch.mm(w, w)
    return y, m


def test_timeline_overlapping_matmul_hides_communication():
    shapes = ((1024, 256), (64, 64))
    fast, slow = trace(overlapped, *shapes), trace(serial, *shapes)
    model = cost_model()
    comm = model.node_cost(node(fast, "all_to_all_single")).seconds
    mm = model.node_cost(node(fast, "mm")).seconds
    assert comm == model.node_cost(node(slow, "all_to_all_single")).seconds
    assert mm == model.node_cost(node(slow, "mm")).seconds
    assert comm > mm  # so some of the transfer stays exposed when overlapped

    a, b = estimate_timeline(fast.graph, model), estimate_timeline(slow.graph, model)
    assert a.exposed_communication == comm - mm
    assert b.exposed_communication == comm
    assert a.exposed_communication < b.exposed_communication
    assert a.compute == b.compute == mm
    assert a.communication == b.communication == comm
    assert a.makespan == comm
    assert b.makespan == comm + mm
    assert [(e.node, e.lane, e.start, e.end) for e in a.events] == [
        ("all_to_all_single", "comm:g0", 0.0, comm),
        ("mm", "compute", 0.0, mm),
        ("wait_tensor", "wait", mm, comm),
    ]
    assert [(e.node, e.lane, e.start, e.end) for e in b.events] == [
        ("all_to_all_single", "comm:g0", 0.0, comm),
        ("wait_tensor", "wait", 0.0, comm),
        ("mm", "compute", comm, comm + mm),
    ]
    assert a.summary()["exposed_comm_ms"] == pytest.approx((comm - mm) * 1e3)


def test_timeline_serialises_collectives_of_one_group_and_overlaps_groups():
    def two(x, y, group_b):
        a = c10d.all_to_all_single(x, [2, 2], [2, 2], "g0")
        b = c10d.all_to_all_single(y, [2, 2], [2, 2], group_b)
        return c10d.wait_tensor(a), c10d.wait_tensor(b)

    model = cost_model()
    same = trace(lambda x, y: two(x, y, "g0"), (4, 3), (4, 3))
    t = model.node_cost(node(same, "all_to_all_single")).seconds
    assert model.node_cost(node(same, "all_to_all_single_1")).seconds == t
    timeline = estimate_timeline(same.graph, model)
    assert timeline.makespan == t + t
    assert timeline.exposed_communication == t + t
    apart = trace(lambda x, y: two(x, y, "g1"), (4, 3), (4, 3))
    timeline = estimate_timeline(apart.graph, model)
    assert timeline.makespan == t
    assert timeline.exposed_communication == t
    assert {e.lane for e in timeline.events if e.lane.startswith("comm")} == {"comm:g0", "comm:g1"}


# ---------------------------------------------------------------------------- peak memory


def chain(x):
    a = x * 2
    b = a * 3
    c = b * 4
    return c.sum()


def test_peak_memory_frees_buffers_after_last_use():
    gm = trace(chain, (4, 4))
    buf = 4 * 4 * F32
    # x is live throughout; making b needs x, a and b; making c needs x, b and c (a freed).
    assert peak_memory(gm.graph) == 3 * buf
    assert estimate_timeline(gm.graph, cost_model()).peak_memory == 3 * buf


def test_peak_memory_keeps_inputs_live_throughout():
    def f(x, y):
        return (x * 2).sum() + y.sum()

    gm = trace(f, (4, 4), (64,))
    # x (64 B) and y (256 B) live from the start; mul adds 64 B, sum a scalar.
    assert peak_memory(gm.graph) == 64 + 256 + 64 + 4


def test_peak_memory_view_keeps_its_base_alive():
    def f(x):
        a = x * 2
        v = a.view(-1)
        b = x * 3
        s = b.sum()
        return s + v.sum()

    gm = trace(f, (4, 4))
    buf = 4 * 4 * F32
    # a must survive until v.sum(): at b.sum() x, a, b and s are live.
    assert peak_memory(gm.graph) == 3 * buf + F32


def test_peak_memory_holds_collective_input_until_its_wait():
    def f(x):
        a = x * 2
        c = c10d.all_to_all_single(a, [2, 2], [2, 2], "g0")
        m = torch.cat([x] * 8)
        s = m.sum()
        return c10d.wait_tensor(c).sum() + s

    gm = trace(f, (4, 4))
    buf = 4 * 4 * F32
    # at m.sum(): x, a (read by the transfer in flight), the collective's output, m and s
    assert peak_memory(gm.graph) == buf + buf + buf + 8 * buf + F32


def test_peak_memory_counts_wait_tensor_as_alias_of_its_collective():
    # wait_tensor returns its argument (the collective's output) and allocates nothing.
    def f(x):
        a = x * 2
        return c10d.wait_tensor(c10d.all_to_all_single(a, [2, 2], [2, 2], "g0")).sum()

    gm = trace(f, (4, 4))
    buf = 4 * 4 * F32
    # at the wait: x, a (held until the wait) and the collective's output, nothing more
    assert peak_memory(gm.graph) == 3 * buf


def test_peak_memory_does_not_count_graph_outputs_twice():
    from fsc.analysis.timeline import peak_memory as peak

    gm = make_fx(lambda x: torch.relu(x), tracing_mode="fake")(torch.randn(256, 256))
    one = 256 * 256 * 4
    for node in gm.graph.nodes:  # Inductor's graphs carry a value on the output node too
        if node.op == "output":
            node.meta["val"] = (next(n for n in gm.graph.nodes if n.name == "relu").meta["val"],)
    assert peak(gm.graph) == 2 * one  # input + relu's buffer


# ------------------------------------------------- data-dependent sizes, host ops, bounds


def lookup_exchange(ids, counts, table):
    """ids out to their owners, rows looked up, rows back: split sizes read from data."""
    send, recv = counts[:2].tolist(), counts[2:].tolist()
    for s in send + recv:
        torch._check(s >= 0)
    wanted = c10d.wait_tensor(c10d.all_to_all_single(ids, recv, send, "g0"))
    rows = torch.nn.functional.embedding(wanted, table)
    return c10d.wait_tensor(c10d.all_to_all_single(rows, send, recv, "g0"))


def traced_lookup(tokens: int = 40) -> fx.GraphModule:
    return make_fx(lookup_exchange, tracing_mode="symbolic")(
        torch.randint(0, 16, (tokens,)), torch.tensor([tokens // 2, tokens // 2, 20, 20]), torch.randn(16, 8))


def test_exchange_size_estimates_tie_data_dependent_splits_to_the_rows_sent():
    gm = traced_lookup()
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    rows = sympy.sympify(ids.meta["val"].shape[0].node.expr)
    first, second = [n for n in gm.graph.nodes if is_collective(n)]
    send = [sympy.sympify(s.meta["val"].node.expr) for s in first.args[2]]
    recv = [sympy.sympify(s.meta["val"].node.expr) for s in first.args[1]]
    estimates = exchange_size_estimates(gm.graph)
    # input splits share the rows sent; a balanced exchange receives as many as it sends
    assert set(estimates) == set(send) | set(recv)
    for sym in send + recv:
        assert sympy.simplify(estimates[sym] - sympy.floor(sympy.Max(0, rows) / 2)) == 0  # whole rows
    # the reply's cost is sized at the token count's hint (40 rows of 8 floats), not the fallback
    cost = cost_model().node_cost(second)
    assert cost.seconds == pytest.approx(alpha_beta(2, 40 * 8 * F32, 0.5, 1), rel=1e-9)
    assert rows in cost.expr.free_symbols
    assert not free_unbacked_symbols(cost.expr)  # no data-dependent size left in it


def test_cost_model_without_estimates_sizes_unknown_splits_at_the_fallback():
    gm = traced_lookup()
    second = [n for n in gm.graph.nodes if is_collective(n)][1]
    given = {sym: sympy.Integer(100) for sym in exchange_size_estimates(gm.graph)}
    # a given estimate yields to the graph's own
    assert cost_model().node_cost(second).seconds == CostModel(CPU, size_estimates=given).node_cost(second).seconds


def test_cost_model_charges_nothing_for_size_reads_and_size_checks():
    def f(x):
        n = x.shape[0]
        torch._check(n >= 2)
        return x.new_zeros(n * 2)

    gm = trace(f, (1024, 1024), mode="symbolic")
    model = cost_model()
    host = [n for n in gm.graph.nodes if is_host_scalar_op(n)]
    assert host, gm.code  # sym_size of a 4 MiB tensor, its arithmetic and the check
    for n in host:
        assert model.node_cost(n).lane == "free" and model.node_cost(n).seconds == 0.0
    zeros = [n for n in gm.graph.nodes if n.op == "call_function" and not is_host_scalar_op(n)
             and model.node_cost(n).lane == "compute"]
    assert zeros and all(model.node_cost(n).seconds > 0 for n in zeros)


def exchange_beside_dense(x, w):
    y = c10d.wait_tensor(c10d.all_to_all_single(x, [512, 512], [512, 512], "g0"))
    m = torch.mm(w, w)
    return y.sum() + m.sum()


def test_exposed_lower_bound_is_what_independent_compute_cannot_hide():
    gm = trace(exchange_beside_dense, (1024, 256), (64, 64))
    model = cost_model()
    comm = model.node_cost(node(gm, "all_to_all_single")).seconds
    mm = model.node_cost(node(gm, "mm")).seconds
    mm_sum = model.node_cost(node(gm, "sum_2")).seconds  # m.sum(): needs no wait either
    assert comm > mm + mm_sum
    bound = exposed_lower_bound(gm.graph, model)
    assert bound == pytest.approx(comm - mm - mm_sum, rel=1e-12)
    # program order exposes the whole transfer: above the bound, as every order must be
    assert estimate_timeline(gm.graph, model).exposed_communication >= bound
    big = trace(exchange_beside_dense, (1024, 256), (1024, 1024))  # enough dense work to hide it all
    assert exposed_lower_bound(big.graph, model) == 0.0


def test_exposed_lower_bound_counts_compute_between_chained_exchanges():
    def chain(x, w):
        a = c10d.wait_tensor(c10d.all_to_all_single(x, [512, 512], [512, 512], "g0"))
        b = c10d.wait_tensor(c10d.all_to_all_single(torch.relu(a), [512, 512], [512, 512], "g0"))
        return b.sum() + torch.mm(w, w).sum()

    gm = trace(chain, (1024, 256), (64, 64))
    model = cost_model()
    comm = model.node_cost(node(gm, "all_to_all_single")).seconds
    relu = model.node_cost(node(gm, "relu")).seconds
    mm = model.node_cost(node(gm, "mm")).seconds
    sums = sum(model.node_cost(n).seconds for n in gm.graph.nodes if n.name.startswith("sum") or n.name == "add")
    desc = sums - model.node_cost(node(gm, "sum_2")).seconds  # the mm's sum does not wait for b
    total = relu + mm + sums
    assert exposed_lower_bound(gm.graph, model) == pytest.approx(2 * comm + relu - (total - desc), rel=1e-9)
