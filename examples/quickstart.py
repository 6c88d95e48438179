"""The demo (``make demo``): train a small sequential recommender on 2 gloo ranks with
``torch.compile(backend="freescale")`` next to an eager copy, check they agree step by
step, and print what the compiler rewrote and why.

    python examples/quickstart.py [--ranks 2] [--steps 20] [--inner inductor|eager]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fsc
from examples.tinyrec import TinyRec


def train(rank: int, world: int, store: str, steps: int, inner: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        eager = TinyRec()
        compiled_model = TinyRec()
        compiled_model.load_state_dict(eager.state_dict())
        compiled = torch.compile(compiled_model, backend="freescale", options={"inner": inner}, fullgraph=True)
        opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
        opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(100 + rank)
        worst = 0.0
        for step in range(steps):
            ids = torch.randint(0, 512, (8, 32), generator=data)
            for model, opt in ((eager, opt_e), (compiled, opt_c)):
                opt.zero_grad()
                loss = model(ids)
                loss.backward()
                # Dense parameters are data parallel: average their gradients.
                for p in (compiled_model if model is compiled else model).parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
                opt.step()
                if model is eager:
                    eager_loss = loss.item()
                else:
                    compiled_loss = loss.item()
            worst = max(worst, abs(eager_loss - compiled_loss))
            if rank == 0 and (step % 5 == 0 or step == steps - 1):
                print(f"step {step:3d}  loss eager {eager_loss:.5f}  freescale {compiled_loss:.5f}")
        if rank == 0:
            print(f"\nlargest |loss difference| over {steps} steps: {worst:.2e}\n")
            print("What freescale did (fsc.last_compile()):")
            print(fsc.last_compile())
        dist.barrier()  # no rank tears down gloo while a peer still talks to it
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(train, args=(args.ranks, os.path.join(tmp, "store"), args.steps, args.inner), nprocs=args.ranks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
