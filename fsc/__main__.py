"""``python -m fsc``: list what exists (passes, device profiles, benchmarks)."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fsc",
        description="FreeScale compiler: torch.compile(model, backend='freescale', options={...}).",
        epilog="Benchmarks: python -m fsc.bench NAME [--json PATH] (python -m fsc.bench --help lists them).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list the registered passes with their options")
    sub.add_parser("options", help="list the compile options and device profiles")
    bench = sub.add_parser("bench", help="run a benchmark (same as python -m fsc.bench)")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "passes":
        from fsc.passes import REGISTRY

        for name, cls in REGISTRY.items():
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
            summary = doc[0].removeprefix(f"``{name}``:").strip() if doc else ""
            print(f"{name}: {summary}")
            for f in dataclasses.fields(cls):
                print(f"    {f.name}: {f.type} = {f.default!r}")
        return 0
    if args.command == "options":
        from fsc.analysis.cost_model import DEVICE_PROFILES
        from fsc.config import INNER_COMPILERS, ON_ERROR, Config
        from fsc.pass_manager import default_pipeline, format_pipeline

        print("options:", ", ".join(Config.option_names()))
        print("  passes (default):", format_pipeline(default_pipeline()))
        print("  inner:", ", ".join(INNER_COMPILERS))
        print("  device_profile:", ", ".join(DEVICE_PROFILES))
        print("  on_error:", ", ".join(ON_ERROR))
        return 0
    from fsc.bench.__main__ import main as bench_main

    return bench_main(args.rest)


if __name__ == "__main__":
    sys.exit(main())
