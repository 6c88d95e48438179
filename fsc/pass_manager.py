"""The pipeline-string parser and the :class:`PassManager` that runs a pipeline, checks
invariants and records everything. The pass types and the registry live in
:mod:`fsc.passes.base`; the built-in registry in :mod:`fsc.passes`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import typing
from collections.abc import Iterable
from typing import Any

import torch.fx as fx

from fsc import invariants
from fsc.errors import FscError, PassFailedError, PipelineError
from fsc.graph_utils import readable
from fsc.passes import REGISTRY
from fsc.passes.base import STAGES, Pass, PassContext, PassRegistry, PassResult

log = logging.getLogger(__name__)


def passes_for_stage(passes: Iterable[Pass], stage: str) -> tuple[Pass, ...]:
    """The passes of a pipeline that run at ``stage``, in pipeline order."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    return tuple(p for p in passes if getattr(p, "stage", "aten") == stage)


def default_pipeline() -> tuple[Pass, ...]:
    """Every built-in pass that is not opt-in, with default options, in the canonical order."""
    return REGISTRY.default_pipeline()


_PIPELINE_ITEM = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str, registry: PassRegistry | None = None) -> tuple[Pass, ...]:
    """Parse ``"a,b{opt=1,other=x}"`` into pass instances.

    Option values are converted to the field's declared type (int, float, bool, str,
    optionally None). Errors name the unknown pass, the unknown option and its pass, or
    the bad value, and list what is valid. An empty string is the empty pipeline.
    """
    if registry is None:
        registry = REGISTRY
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
    With a ``verifier``, every pass that modified the graph is handed to it (``verify``
    keeps the chain and checks it on the graph's first call: :mod:`fsc.verify`).
    """

    def __init__(self, passes: Iterable[Pass], *, verifier: Verifier | None = None) -> None:
        self.passes = tuple(passes)
        self.verifier = verifier

    def run(self, gm: fx.GraphModule, ctx: PassContext, records: list[PassRecord] | None = None) -> list[PassRecord]:
        """Run every pass on ``gm`` in place; append a record per pass to ``records``
        (also when a pass fails, so the caller keeps what happened) and return it."""
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
                gm.graph.lint()  # a valid FX graph first: the invariant checks walk it
                invariants.check(before, gm, p, ctx)
            except PassFailedError as exc:
                record.error = str(exc)
                raise
            except Exception as exc:
                # lint appends the whole graph to its message; the record and the error keep
                # the first line (the full message stays on the cause).
                record.error = str(exc).partition("\n")[0]
                raise PassFailedError(p.name, f"left an invalid graph: {record.error}") from exc
            if result.modified:
                gm.recompile()
                record.graph_after = readable(gm)
                if self.verifier is not None and before.gm is not None:
                    self.verifier(before.gm, gm, p.name, p.tolerance)
        return records
