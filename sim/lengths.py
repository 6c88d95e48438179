"""Per-sample sequence lengths for simulated ranks: a ratings file's real user histories,
a lognormal, or a Zipf law, capped at the model's ``max_len``, drawn with a seed.

``LengthDistribution.parse`` reads the CLI form: ``lognormal:MEDIAN:SIGMA``,
``zipf:MIN:A`` or ``file:PATH`` (any MovieLens ratings file the HSTU example reads:
``ratings.csv``, ``ratings.dat``, ``u.data``).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np


class LengthsError(ValueError):
    """A length distribution that cannot be built or drawn from; names the input."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class LengthDistribution:
    kind: str
    """``lognormal``, ``zipf`` or ``empirical``."""
    params: tuple[float, ...] = ()
    values: np.ndarray | None = None
    """The empirical lengths (``empirical`` only)."""
    source: str = ""

    @classmethod
    def lognormal(cls, median: float = 300.0, sigma: float = 1.0) -> LengthDistribution:
        if not (median > 0 and sigma >= 0):
            raise LengthsError(f"lognormal lengths need median > 0 and sigma >= 0, got {median}, {sigma}")
        return cls(kind="lognormal", params=(float(median), float(sigma)), source=f"lognormal:{median:g}:{sigma:g}")

    @classmethod
    def zipf(cls, minimum: float = 32.0, a: float = 1.5) -> LengthDistribution:
        """``minimum * Z`` with Z ~ Zipf(a) (a > 1): most samples short, a power-law tail."""
        if not (minimum > 0 and a > 1):
            raise LengthsError(f"zipf lengths need minimum > 0 and a > 1, got {minimum}, {a}")
        return cls(kind="zipf", params=(float(minimum), float(a)), source=f"zipf:{minimum:g}:{a:g}")

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, source: str = "lengths") -> LengthDistribution:
        values = np.asarray(lengths)
        if values.ndim != 1 or values.size == 0:
            raise LengthsError(f"{source}: no lengths to draw from")
        if not np.issubdtype(values.dtype, np.number) or not np.isfinite(values).all() or (values < 1).any():
            raise LengthsError(f"{source}: lengths must be finite numbers >= 1")
        return cls(kind="empirical", values=values.astype(np.int64), source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LengthDistribution:
        """Users' history lengths in a MovieLens ratings file (read by the HSTU example's loader)."""
        p = pathlib.Path(path)
        if not p.is_file():
            raise LengthsError(f"lengths file {p} does not exist or is not a file")
        from examples.hstu.data import history_lengths

        try:
            lengths = history_lengths(p)
        except (ValueError, OSError) as exc:
            raise LengthsError(f"lengths file {p}: {exc}") from exc
        return cls.from_lengths(lengths, source=f"file:{p}")

    @classmethod
    def parse(cls, text: str) -> LengthDistribution:
        kind, _, rest = text.partition(":")
        if kind == "file" and rest:
            return cls.from_file(rest)
        try:
            numbers = [float(v) for v in rest.split(":")] if rest else []
        except ValueError as exc:
            raise LengthsError(f"length distribution {text!r}: parameters must be numbers") from exc
        if kind == "lognormal" and len(numbers) <= 2:
            return cls.lognormal(*numbers)
        if kind == "zipf" and len(numbers) <= 2:
            return cls.zipf(*numbers)
        raise LengthsError(f"unknown length distribution {text!r}; use lognormal[:MEDIAN[:SIGMA]], "
                           "zipf[:MIN[:A]] or file:PATH")

    def draw(self, n: int, rng: np.random.Generator, max_len: int) -> np.ndarray:
        """``n`` lengths in [1, max_len] (int64)."""
        if max_len < 1:
            raise LengthsError(f"max_len must be >= 1, got {max_len}")
        if self.kind == "lognormal":
            median, sigma = self.params
            raw = rng.lognormal(np.log(median), sigma, size=n)
        elif self.kind == "zipf":
            minimum, a = self.params
            raw = minimum * rng.zipf(a, size=n).astype(np.float64)
        else:
            raw = rng.choice(self.values, size=n, replace=True).astype(np.float64)
        return np.clip(np.rint(raw), 1, max_len).astype(np.int64)
