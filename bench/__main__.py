from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from bench import BENCHMARKS

    parser = argparse.ArgumentParser(prog="python -m bench", description="Run one benchmark by name.")
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v.help}" for k, v in BENCHMARKS.items()))
    parser.add_argument("--json", default=None, help="where to write the results (default results/NAME.json)")
    args, rest = parser.parse_known_args(argv)
    bench = BENCHMARKS[args.name]
    return bench.main(rest, args.json or bench.json or f"results/{args.name}.json")


if __name__ == "__main__":
    sys.exit(main())
