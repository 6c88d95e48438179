"""End to end on real gloo ranks: compiled results equal eager (forward and gradients)
for a model with functional all-to-alls, both inner compilers, empty and full pipelines,
and the order the passes chose is the order in Inductor's generated code."""

from __future__ import annotations

import re

import pytest
import torch
from dist_harness import run_ranks

pytestmark = pytest.mark.ranks

CONFIGS = [(inner, passes) for inner in ("eager", "inductor") for passes in ("", None)]
VERIFY_INNERS = ("eager", "inductor")


def _parity_worker(rank: int, world: int) -> list[dict]:
    import torch.distributed as dist

    import fsc
    from examples.tinyrec import TinyRec

    results = []
    for inner, passes in CONFIGS:
        torch._dynamo.reset()
        torch.manual_seed(0)
        eager = TinyRec(num_items=128, dim=16, max_length=32)
        model = TinyRec(num_items=128, dim=16, max_length=32)
        model.load_state_dict(eager.state_dict())
        options = {"inner": inner} | ({} if passes is None else {"passes": passes})
        compiled = torch.compile(model, backend="freescale", options=options, fullgraph=True)
        worst_loss = worst_grad = 0.0
        for step in range(3):
            ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(10 * step + rank))
            ref = eager(ids)
            ref.backward()
            out = compiled(ids)
            out.backward()
            worst_loss = max(worst_loss, (out - ref).abs().item())
            for p, q in zip(model.parameters(), eager.parameters()):
                worst_grad = max(worst_grad, (p.grad - q.grad).abs().max().item())
                p.grad = q.grad = None
        summary = fsc.last_compile().summary()
        results.append(
            {
                "inner": inner,
                "passes": passes,
                "loss_diff": worst_loss,
                "grad_diff": worst_grad,
                "summary": summary,
                "world": dist.get_world_size(),
            }
        )
    return results


def _verify_worker(rank: int, world: int) -> list[tuple[str, bool, dict]]:
    """verify=True on graphs with collectives: every rank runs them alike at the first call."""
    import fsc
    from examples.tinyrec import TinyRec

    out = []
    for inner in VERIFY_INNERS:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TinyRec(num_items=128, dim=16, max_length=32)
        compiled = torch.compile(model, backend="freescale", options={"inner": inner, "verify": True}, fullgraph=True)
        ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(rank))
        compiled(ids).backward()
        # the aten graphs (TinyRec's single-head attention also gets a pre-grad record: kept on CPU)
        graphs = {k: g for k, g in fsc.last_compile().graphs().items() if k != "pre-grad"}
        assert set(graphs) == {"forward", "backward"}, sorted(graphs)
        modified = all(g.pass_record("overlap-schedule").modified for g in graphs.values())
        # the notes besides the ranks' agreement on the collectives: what verify checked
        out.append((inner, modified, {k: [n for n in g.notes if not n.startswith("collectives agreed across ranks")]
                                      for k, g in graphs.items()}))
    return out


def test_verify_runs_graphs_with_collectives_on_two_ranks():
    for rank_results in run_ranks(_verify_worker, 2):
        for inner, modified, notes in rank_results:
            assert modified, inner  # the pass rewrote both graphs and verification accepted them
            for kind, kind_notes in notes.items():  # checked once, on the first call's inputs
                assert len(kind_notes) == 1 and kind_notes[0].startswith("verified on the first call's inputs"), \
                    (inner, kind, kind_notes)
                assert "overlap-schedule" in kind_notes[0], (inner, kind, kind_notes)


@pytest.fixture(scope="module")
def parity_results():
    return run_ranks(_parity_worker, 2)


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[f"{i}-{'empty' if p == '' else 'full'}" for i, p in CONFIGS])
def test_all_to_all_model_matches_eager_on_two_gloo_ranks(parity_results, index):
    for rank_results in parity_results:
        result = rank_results[index]
        assert result["world"] == 2
        assert result["loss_diff"] <= 1e-5, result
        assert result["grad_diff"] <= 1e-5, result


def test_full_pipeline_fires_and_reduces_estimated_exposed_communication(parity_results):
    for rank_results in parity_results:
        for result in rank_results:
            if result["passes"] == "":
                assert result["summary"]["forward"]["passes"] == {}
                continue
            for kind in ("forward", "backward"):
                entry = result["summary"][kind]
                assert entry["passes"]["overlap-schedule"]["stats"]["collectives"] == 1
                assert entry["exposed_comm_ms_after"] <= entry["exposed_comm_ms_before"]
            forward = result["summary"]["forward"]
            assert forward["passes"]["overlap-schedule"]["modified"] is True
            assert forward["exposed_comm_ms_after"] < forward["exposed_comm_ms_before"]
    # every rank made the same decisions (rank-invariant schedule)
    for kind in ("forward", "backward"):
        decisions = [
            {k: (v["modified"], v["stats"]) for k, v in rank_results[3]["summary"][kind]["passes"].items()}
            for rank_results in parity_results
        ]
        assert decisions[0] == decisions[1]


def _codegen_worker(rank: int, world: int) -> dict[str, list[str]]:
    from torch._inductor.utils import run_and_get_code

    from examples.tinyrec import TinyRec

    out = {}
    for label, passes in (("scheduled", None), ("unscheduled", "")):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TinyRec(num_items=128, dim=16, max_length=32)
        options = {"inner": "inductor"} | ({} if passes is None else {"passes": passes})
        compiled = torch.compile(model, backend="freescale", options=options, fullgraph=True)
        ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(rank))

        def step():
            compiled(ids).backward()

        _, codes = run_and_get_code(step)
        out[label] = codes
    return out


def _call_lines(code: str) -> list[str]:
    """The statements of the generated ``call`` function that launch work."""
    body = code[code.index("def call(") :]
    return [
        line.strip()
        for line in body.splitlines()
        if re.search(r"extern_kernels\.|cpp_fused_|_c10d_functional\.", line) and not line.strip().startswith(("#", "assert"))
    ]


def _index(lines: list[str], pattern: str) -> int:
    hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
    assert hits, f"{pattern!r} not in generated code:\n" + "\n".join(lines)
    return hits[0]


def test_generated_code_keeps_the_chosen_collective_order():
    results = run_ranks(_codegen_worker, 2)
    for codes in results:
        scheduled_fwd = _call_lines(codes["scheduled"][0])
        a2a = _index(scheduled_fwd, r"all_to_all_single\.default")
        wait = _index(scheduled_fwd, r"wait_tensor\.default")
        # the learned-position MLP (two addmm reading primals, a fused silu) runs in the window
        between = scheduled_fwd[a2a + 1 : wait]
        assert sum("extern_kernels.addmm" in line for line in between) == 2, "\n".join(scheduled_fwd)
        assert any("silu" in line for line in between)

        unscheduled_fwd = _call_lines(codes["unscheduled"][0])
        a2a = _index(unscheduled_fwd, r"all_to_all_single\.default")
        wait = _index(unscheduled_fwd, r"wait_tensor\.default")
        assert wait == a2a + 1, "without the pass the wait follows the collective at once"

        scheduled_bwd = _call_lines(codes["scheduled"][1])
        a2a = _index(scheduled_bwd, r"all_to_all_single\.default")
        wait = _index(scheduled_bwd, r"wait_tensor\.default")
        assert wait > a2a + 1, "\n".join(scheduled_bwd)


def _dynamic_worker(rank: int, world: int) -> list[tuple[str, float, int]]:
    from torch._dynamo.utils import counters

    import fsc
    from examples.tinyrec import TinyRec

    out = []
    for inner in ("eager", "inductor"):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        eager = TinyRec(num_items=128, dim=16, max_length=32)
        model = TinyRec(num_items=128, dim=16, max_length=32)
        model.load_state_dict(eager.state_dict())
        compiled = torch.compile(model, backend="freescale", options={"inner": inner}, dynamic=True, fullgraph=True)
        worst = 0.0
        for length in (6, 10, 15):  # every step a different length: one symbolic graph
            ids = torch.randint(0, 128, (4, length), generator=torch.Generator().manual_seed(length + rank))
            worst = max(worst, (compiled(ids) - eager(ids)).abs().item())
        stats = fsc.last_compile().summary()["forward"]["passes"]["overlap-schedule"]["stats"]
        out.append((inner, worst, counters["stats"]["unique_graphs"], stats["collectives"]))
    return out


def test_dynamic_lengths_with_all_to_all_compile_once_and_match_eager():
    for rank_results in run_ranks(_dynamic_worker, 2):
        for inner, worst, graphs, collectives in rank_results:
            assert worst <= 1e-5, inner
            assert graphs == 1, inner
            assert collectives == 1, inner


def _data_dependent_worker(rank: int, world: int) -> list[tuple]:
    """A row-wise sharded embedding lookup: ids travel to their owners with split sizes
    computed from the batch (data-dependent, unbacked in the graph), rows come back."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    import fsc

    torch._dynamo.config.capture_scalar_outputs = True
    rows_per_rank = 50
    table = torch.nn.Embedding(rows_per_rank, 8)  # this rank's shard
    torch.nn.init.normal_(table.weight, generator=torch.Generator().manual_seed(rank))
    dense = torch.nn.Linear(8, 8)

    def lookup(ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        owner = ids // rows_per_rank
        order = torch.argsort(owner, stable=True)
        send_counts = (owner.unsqueeze(1) == torch.arange(world)).sum(0)
        recv_counts = funcol.all_to_all_single(send_counts, None, None, dist.group.WORLD)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        wanted = funcol.all_to_all_single(ids[order], recv, send, dist.group.WORLD)
        rows = table(wanted - rank * rows_per_rank)
        back = funcol.all_to_all_single_autograd(rows, send, recv, dist.group.WORLD)
        embedded = torch.zeros_like(back).index_copy(0, order, back)
        return (embedded * dense(features)).square().mean()

    out = []
    for inner in ("eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(lookup, backend="freescale", options={"inner": inner}, fullgraph=True)
        worst = 0.0
        for step in range(4):
            g = torch.Generator().manual_seed(100 * step + rank)
            n = int(torch.randint(3, 30, (1,), generator=g))  # a different batch size every step
            ids = torch.randint(0, rows_per_rank * world, (n,), generator=g)
            features = torch.randn(n, 8, generator=g)
            ref = lookup(ids, features)
            ref.backward()
            ref_grads = [table.weight.grad.clone(), dense.weight.grad.clone()]
            table.weight.grad = dense.weight.grad = None
            got = compiled(ids, features)
            got.backward()
            worst = max(worst, (got - ref).abs().item())
            worst = max(worst, *((a - b).abs().max().item() for a, b in zip([table.weight.grad, dense.weight.grad], ref_grads)))
            table.weight.grad = dense.weight.grad = None
        # Ranks share Inductor's cache: a rank served from it reads the record the other rank
        # wrote, which may still be adding its backward; wait until every rank is done.
        dist.barrier()
        record = fsc.last_compile()
        graphs = record.graphs()
        # the backward's cost model plans with the forward's split-size estimates: every rank
        # must hold the same ones, whether Inductor compiled its forward or served it from the cache
        estimates = sorted(f"{k}={v}" for k, v in record.subgraphs[-1].size_estimates.items())
        out.append((inner, worst, {k: g.fallback for k, g in graphs.items()}, sorted(graphs), _record_state(record),
                    estimates))
    return out


def _record_state(record) -> str:
    """What a failed record check needs to be understood: each subgraph's cache state."""
    import pickle

    lines = []
    for sub in record.subgraphs:
        path = sub.cache_path
        try:
            on_disk = sorted(pickle.loads(path.read_bytes())) if path is not None else None
        except Exception as exc:
            on_disk = f"unreadable: {exc!r}"
        lines.append(f"subgraph {sub.index}: graphs={sorted(sub.graphs)} from_cache={sub.from_cache} "
                     f"served={sorted(sub.served)} cached={sorted(sub.cached_keys)} file={on_disk} notes={sub.notes}")
    return "; ".join(lines)


def test_data_dependent_split_sizes_compile_and_match_eager():
    results = run_ranks(_data_dependent_worker, 2)
    for rank_results in results:
        for inner, worst, fallbacks, kinds, state, estimates in rank_results:
            assert worst <= 1e-5, inner
            assert kinds == ["backward", "forward"], (inner, state)
            assert estimates, inner  # the data-dependent split sizes got estimates
            assert all(f is None for f in fallbacks.values()), (inner, fallbacks)  # passes ran, no fallback
    for per_inner in zip(*results):  # the same inner on every rank
        assert len({tuple(r[5]) for r in per_inner}) == 1, per_inner[0][0]
