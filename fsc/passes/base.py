"""The types every pass and the pass manager share: a pass, its result, its context and
the registry of passes. Nothing here imports a pass or the manager, so both import this.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch.fx as fx

from fsc.analysis.cost_model import CostModel
from fsc.errors import OptionError, PipelineError

STAGES = ("pre-grad", "aten")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PassResult:
    """What one pass did. ``modified`` must come from counted edits."""

    modified: bool
    stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    """Why the pass declined, entirely or for some nodes, in words a user can act on."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PassContext:
    """What a pass may consult besides the graph. Rank-invariant by construction."""

    graph_kind: str
    """``forward``, ``backward`` or ``inference`` (aten graphs), or ``pre-grad`` (Dynamo's
    torch-IR graph, for passes whose ``stage`` is ``"pre-grad"``)."""
    cost_model: CostModel
    memory_budget_bytes: float | None
    """None: no budget beyond the device's memory."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pass:
    """Base class of every pass: a frozen dataclass whose fields are its options.

    Subclasses set ``name`` (kebab-case, equal to the module name with dashes) and
    implement :meth:`run`. A pass that moves collectives relative to each other on one
    process group sets ``reorders_collectives``; one that adds or removes collectives
    sets ``rewrites_collectives``. The manager holds passes to those declarations.

    ``stage`` says which graphs a pass runs on: ``"aten"`` (default), the forward and
    backward graphs AOTAutograd makes; ``"pre-grad"``, Dynamo's torch-IR graph before
    AOTAutograd (lowerings whose backward must come from the replacement's own autograd).

    ``in_default_pipeline`` False makes a registered pass opt-in: it runs only where a
    pipeline names it.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "aten"
    in_default_pipeline: ClassVar[bool] = True
    reorders_collectives: ClassVar[bool] = False
    rewrites_collectives: ClassVar[bool] = False
    tolerance: ClassVar[tuple[float, float]] = (0.0, 0.0)
    """(rtol, atol) within which ``verify=True`` accepts changed values; reorderings: exact."""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """This pass in pipeline syntax, with the options that differ from defaults."""
        changed = [
            f"{f.name}={_format_value(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != _field_default(f)
        ]
        return self.name + (f"{{{','.join(changed)}}}" if changed else "")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _format_value(value: Any) -> str:
    return "true" if value is True else "false" if value is False else "none" if value is None else str(value)


class PassRegistry(Mapping[str, type[Pass]]):
    """An immutable name -> pass class mapping, in canonical pipeline order. Built once
    from a list of classes; opt-in passes (``in_default_pipeline = False``) are registered
    like the others, so pipeline strings can name them."""

    def __init__(self, classes: Iterable[type[Pass]]) -> None:
        table: dict[str, type[Pass]] = {}
        for cls in classes:
            if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", cls.name):
                raise ValueError(f"pass class {cls.__qualname__} has name {cls.name!r}, not kebab-case")
            if cls.name in table:
                raise ValueError(f"two passes are named {cls.name!r}")
            if cls.stage not in STAGES:
                raise ValueError(f"pass class {cls.__qualname__} has stage {cls.stage!r}, not one of {STAGES}")
            table[cls.name] = cls
        self._table = types.MappingProxyType(table)

    def __getitem__(self, name: str) -> type[Pass]:
        try:
            return self._table[name]
        except KeyError:
            raise PipelineError(
                f"unknown pass {name!r}; registered passes: {', '.join(self._table) or '(none)'}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def get(self, name: str, default: Any = None) -> Any:
        return self._table.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def default_pipeline(self) -> tuple[Pass, ...]:
        """The registered passes that are not opt-in, with default options, in registry order."""
        return tuple(cls() for cls in self._table.values() if cls.in_default_pipeline)


def check_memory_budget(what: str, budget: Any) -> float | None:
    """A budget in GiB: None, or a finite positive number. Raises :class:`OptionError`.

    Shared by the compile option and the passes' own ``memory_budget_gb`` options."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise OptionError(f"{what}={budget!r} must be a positive number or None (a budget in GiB)")
    return float(budget)
