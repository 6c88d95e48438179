"""Pass infrastructure: the pass base class, the registry, the pipeline-string parser and
the :class:`PassManager` that runs a pipeline, checks invariants and records everything.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch.fx as fx

from fsc.analysis.cost_model import CostModel
from fsc.errors import FscError, PassFailedError, PipelineError
from fsc.graph_utils import readable

log = logging.getLogger(__name__)


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
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "aten"
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
    """An immutable name -> pass class mapping. Built once from a list of classes."""

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

    def __iter__(self):
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


STAGES = ("pre-grad", "aten")


def passes_for_stage(passes: Iterable[Pass], stage: str) -> tuple[Pass, ...]:
    """The passes of a pipeline that run at ``stage``, in pipeline order."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    return tuple(p for p in passes if getattr(p, "stage", "aten") == stage)


def builtin_registry() -> PassRegistry:
    from fsc.passes import REGISTRY

    return REGISTRY


def default_pipeline() -> tuple[Pass, ...]:
    """Every built-in pass with default options, in the canonical order."""
    return tuple(cls() for cls in builtin_registry().values())


_PIPELINE_ITEM = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str, registry: PassRegistry | None = None) -> tuple[Pass, ...]:
    """Parse ``"a,b{opt=1,other=x}"`` into pass instances.

    Option values are converted to the field's declared type (int, float, bool, str,
    optionally None). Errors name the unknown pass, the unknown option and its pass, or
    the bad value, and list what is valid. An empty string is the empty pipeline.
    """
    if registry is None:
        registry = builtin_registry()
    passes: list[Pass] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _PIPELINE_ITEM.match(text, pos)
        if match is None or match.end() == pos:
            raise PipelineError(f"cannot parse pipeline {text!r} at character {pos}: {text[pos:]!r}")
        name, body = match.group(1), match.group(2)
        cls = registry[name]
        passes.append(_instantiate(cls, body or ""))
        pos = match.end()
    return tuple(passes)


def _instantiate(cls: type[Pass], body: str) -> Pass:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise PipelineError(f"pass {cls.name!r}: option {item!r} needs a value (write {item}=...)")
        if key in kwargs:
            raise PipelineError(f"pass {cls.name!r}: option {key!r} is given twice")
        if key not in fields:
            raise PipelineError(
                f"pass {cls.name!r} has no option {key!r}; its options: {', '.join(fields) or '(none)'}"
            )
        kwargs[key] = _convert(cls.name, key, raw.strip(), hints[key])
    return cls(**kwargs)


def _convert(pass_name: str, key: str, raw: str, hint: Any) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if optional and raw.lower() == "none":
        return None
    try:
        if base is bool:
            if raw.lower() in ("true", "1", "yes"):
                return True
            if raw.lower() in ("false", "0", "no"):
                return False
            raise ValueError(raw)
        if base in (int, float, str):
            return base(raw)
    except ValueError:
        pass
    else:
        raise PipelineError(f"pass {pass_name!r}: option {key!r} has unsupported type {hint}")
    raise PipelineError(f"pass {pass_name!r}: option {key}={raw!r} is not a valid {getattr(base, '__name__', base)}")


def format_pipeline(passes: Iterable[Pass]) -> str:
    return ",".join(p.spec() for p in passes)


@dataclasses.dataclass(kw_only=True, slots=True)
class PassRecord:
    """What happened when one pass ran on one graph."""

    name: str
    spec: str
    modified: bool = False
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    seconds: float = 0.0
    graph_after: str | None = None
    """Readable graph after the pass; None when the pass left it unchanged."""
    error: str | None = None


Verifier = typing.Callable[[fx.GraphModule, fx.GraphModule, str, tuple[float, float]], None]


class PassManager:
    """Runs a pipeline on one graph.

    After every pass it lints the graph and checks the static invariants
    (:mod:`fsc.invariants`). A pass that raises, or breaks an invariant, raises
    :class:`PassFailedError` naming it, with the original exception as ``__cause__``.
    With a ``verifier``, every pass that modified the graph is checked for values too.
    """

    def __init__(self, passes: Iterable[Pass], *, verifier: Verifier | None = None) -> None:
        self.passes = tuple(passes)
        self.verifier = verifier

    def run(self, gm: fx.GraphModule, ctx: PassContext, records: list[PassRecord] | None = None) -> list[PassRecord]:
        """Run every pass on ``gm`` in place; append a record per pass to ``records``
        (also when a pass fails, so the caller keeps what happened) and return it."""
        from fsc import invariants

        invariants.stamp_collective_ids(gm.graph)
        records = [] if records is None else records
        for p in self.passes:
            record = PassRecord(name=p.name, spec=p.spec())
            records.append(record)
            # A copy only when something will run the old graph again: cloning is the
            # manager's main cost on large graphs.
            before = invariants.snapshot(gm, ctx, keep_graph=self.verifier is not None or p.reorders_collectives)
            start = time.perf_counter()
            try:
                result = p.run(gm, ctx)
            except FscError as exc:
                record.error = str(exc)
                raise PassFailedError(p.name, str(exc)) from exc
            except Exception as exc:
                record.error = f"{type(exc).__name__}: {exc}"
                raise PassFailedError(p.name, f"raised {type(exc).__name__}: {exc}") from exc
            finally:
                record.seconds = time.perf_counter() - start
            if not isinstance(result, PassResult):
                record.error = f"run() returned {type(result).__name__}, not PassResult"
                raise PassFailedError(p.name, f"run() returned {type(result).__name__}, not PassResult")
            record.modified = result.modified
            record.stats = dict(result.stats)
            record.reasons = tuple(result.reasons)
            for reason in result.reasons:
                log.info("%s on %s graph declined: %s", p.name, ctx.graph_kind, reason)
            try:
                invariants.check(before, gm, p, ctx)
                gm.graph.lint()
            except Exception as exc:
                record.error = str(exc)
                if isinstance(exc, PassFailedError):
                    raise
                raise PassFailedError(p.name, f"left an invalid graph: {exc}") from exc
            if result.modified:
                gm.recompile()
                record.graph_after = readable(gm)
                if self.verifier is not None and before.gm is not None:
                    self.verifier(before.gm, gm, p.name, p.tolerance)
        return records
