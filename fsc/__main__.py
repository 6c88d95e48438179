"""``python -m fsc``: list what exists (passes, compile options, device profiles)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from fsc.analysis.cost_model import DEVICE_PROFILES
from fsc.config import INNER_COMPILERS, ON_ERROR, Config
from fsc.pass_manager import default_pipeline, format_pipeline
from fsc.passes import REGISTRY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fsc",
        description="FreeScale compiler: torch.compile(model, backend='freescale', options={...}).",
        epilog="Benchmarks and the simulator are development tools beside the package: from a checkout, "
        "python -m bench --help and python -m sim --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list the registered passes (opt-in ones marked) with their options")
    sub.add_parser("options", help="list the compile options and device profiles")
    args = parser.parse_args(argv)
    if args.command == "passes":
        for name, cls in REGISTRY.items():
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
            summary = doc[0].removeprefix(f"``{name}``:").strip() if doc else ""
            print(f"{name}{'' if cls.in_default_pipeline else ' (opt-in)'}: {summary}")
            for f in dataclasses.fields(cls):
                print(f"    {f.name}: {f.type} = {f.default!r}")
        return 0
    if args.command == "options":
        print("options:", ", ".join(Config.option_names()))
        print("  passes (default):", format_pipeline(default_pipeline()))
        print("  inner:", ", ".join(INNER_COMPILERS))
        print("  device_profile:", ", ".join(DEVICE_PROFILES))
        print("  on_error:", ", ".join(ON_ERROR))
        return 0
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse allows only the choices above


if __name__ == "__main__":
    sys.exit(main())
