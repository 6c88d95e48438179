"""Benchmarks: ``python -m fsc.bench NAME [--json PATH] ...``. Each prints a table and
writes JSON; none is a unit test."""

from fsc.bench.compile_overhead import BENCH as _compile_overhead

BENCHMARKS = {_compile_overhead.name: _compile_overhead}

__all__ = ["BENCHMARKS"]
