"""``make demo``: train the HSTU example on 2 gloo ranks with ``backend="freescale"`` and,
with the same seed, in eager mode; print the loss curves side by side and a final table;
the freescale run's compile record (rewritten graphs) lands in ``./freescale_out/``.

    python examples/hstu/demo.py [--ranks 2] [--steps 40] [--out freescale_out] [-- extra train.py flags]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def run(backend: str, args: argparse.Namespace, extra: list[str]) -> dict:
    out = pathlib.Path(args.out) / backend
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
        str(HERE / "train.py"), "--backend", backend, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--seed", str(args.seed), "--out", str(out), *extra,
    ]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="freescale_out")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    runs = {backend: run(backend, args, extra) for backend in ("freescale", "eager")}
    fs, eg = runs["freescale"]["losses"], runs["eager"]["losses"]
    print(f"\n{'step':>5} {'eager loss':>12} {'freescale loss':>15} {'|diff|':>9}")
    every = max(1, len(fs) // 10)
    for step in list(range(0, len(fs), every)) + ([len(fs) - 1] if (len(fs) - 1) % every else []):
        print(f"{step:>5} {eg[step]:>12.5f} {fs[step]:>15.5f} {abs(eg[step] - fs[step]):>9.2e}")
    print(f"\n{'backend':<10} {'final loss':>11} {'median step ms':>15} {'recompiles':>11}")
    for backend, s in runs.items():
        print(f"{backend:<10} {s['final_loss']:>11.5f} {s['median_step_ms']:>15.1f} {s['recompiles']:>11}")
    worst = max(abs(a - b) for a, b in zip(fs, eg))
    print(f"\nlargest |loss difference| over {len(fs)} steps: {worst:.2e}")
    print(f"compile record (graphs before/after each pass): {pathlib.Path(args.out) / 'freescale' / 'compile_record'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
