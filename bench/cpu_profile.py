"""``cpu-profile``: measure the numbers behind the ``cpu`` device profile on this machine:
single-thread fp32/bf16 matmul throughput, copy bandwidth, per-op overhead, and a 2-rank
gloo all-to-all's latency and bandwidth over loopback (measured as calibration measures
links: :func:`fsc.analysis.calibration.measure_all_to_all`). Prints them next to the
profile's values and writes JSON."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

import torch
import torch.multiprocessing as mp

from bench.report import write_json
from fsc.analysis.calibration import measure_all_to_all, measure_compute


def _all_to_all_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = measure_all_to_all(repeats=10)
        if rank == 0:
            pathlib.Path(out).write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(argv: list[str], json_path: str) -> int:
    from fsc.analysis.cost_model import DEVICE_PROFILES

    argparse.ArgumentParser(prog="python -m bench cpu-profile").parse_args(argv)
    torch.set_num_threads(1)
    measured = measure_compute("cpu", repeats=5, copy_bytes=64 * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "a2a.json")
        mp.spawn(_all_to_all_rank, args=(2, os.path.join(tmp, "store"), out), nprocs=2)
        measured |= json.loads(pathlib.Path(out).read_text())
    profile = DEVICE_PROFILES["cpu"]
    print(f"{'quantity':<22}{'measured':>14}{'cpu profile':>14}")
    for key, value in measured.items():
        print(f"{key:<22}{value:>14.4g}{getattr(profile, key):>14.4g}")
    write_json(json_path, {"benchmark": "cpu-profile", "measured": measured})
    return 0
