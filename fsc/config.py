"""``fsc.Config``: the frozen, validated form of ``torch.compile(..., options={...})``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from fsc.agreement import DEFAULT_TIMEOUT_S as DEFAULT_AGREEMENT_TIMEOUT_S
from fsc.analysis.cost_model import DEVICE_PROFILES, DeviceProfile
from fsc.errors import OptionError
from fsc.pass_manager import default_pipeline, format_pipeline, parse_pipeline
from fsc.passes.base import Pass, check_memory_budget

INNER_COMPILERS = ("inductor", "eager")
ON_ERROR = ("fallback", "raise")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    """Everything one ``freescale`` compile depends on.

    Built by :meth:`from_options`; every field is validated there so that a bad value
    fails at compile time, naming the option.
    """

    passes: tuple[Pass, ...]
    """The parsed pipeline: pass instances in run order."""
    pipeline: str
    """The pipeline as a canonical string (what :func:`fsc.pass_manager.format_pipeline` prints)."""
    inner: str = "inductor"
    device_profile: str | DeviceProfile = "cpu"
    """A profile name, or a :class:`fsc.analysis.cost_model.DeviceProfile` (e.g. from
    :func:`fsc.calibrate`)."""
    memory_budget_gb: float | None = None
    verify: bool | str = False
    """True: check each rewritten graph on its first call's inputs (:mod:`fsc.verify`), and
    raise when a graph cannot be checked; ``"warn"``: warn instead of raising then."""
    dump_dir: str | None = None
    on_error: str = "fallback"
    agreement_timeout_s: float = DEFAULT_AGREEMENT_TIMEOUT_S
    """How long a rank waits for its peers to agree on a newly compiled graph's collectives
    (:mod:`fsc.agreement`) before raising."""

    @property
    def profile(self) -> DeviceProfile:
        """The :class:`DeviceProfile` that costs are computed on."""
        return DEVICE_PROFILES[self.device_profile] if isinstance(self.device_profile, str) else self.device_profile

    @staticmethod
    def option_names() -> tuple[str, ...]:
        return ("passes", "inner", "device_profile", "memory_budget_gb", "verify", "dump_dir", "on_error",
                "agreement_timeout_s")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> Config:
        """Validate ``options`` (the dict given to ``torch.compile``) and build a Config.

        Raises :class:`fsc.errors.OptionError` naming the first bad option and what is valid.
        """
        if options is not None and not isinstance(options, Mapping):
            raise OptionError(
                f"options must be a dict of option names to values, got {type(options).__name__} {options!r}: "
                "write options={'verify': True}, not options='verify=True'"
            )
        options = dict(options or {})
        valid = cls.option_names()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise OptionError(
                f"unknown freescale option {unknown[0]!r}; valid options: {', '.join(valid)}"
            )
        inner = options.get("inner", "inductor")
        if not isinstance(inner, str) or inner not in INNER_COMPILERS:
            raise OptionError(f"option 'inner'={inner!r} is not one of {', '.join(INNER_COMPILERS)}")
        profile = options.get("device_profile", "cpu")
        if not isinstance(profile, DeviceProfile) and (not isinstance(profile, str) or profile not in DEVICE_PROFILES):
            raise OptionError(
                f"option 'device_profile'={profile!r} is not one of {', '.join(DEVICE_PROFILES)} "
                "or a DeviceProfile (see fsc.calibrate)"
            )
        budget = check_memory_budget("option 'memory_budget_gb'", options.get("memory_budget_gb"))
        verify = options.get("verify", False)
        if not isinstance(verify, bool) and verify != "warn":
            raise OptionError(f"option 'verify'={verify!r} must be True, False or 'warn'")
        dump_dir = options.get("dump_dir")
        if dump_dir is not None and not isinstance(dump_dir, str):
            raise OptionError(f"option 'dump_dir'={dump_dir!r} must be a path string or None")
        on_error = options.get("on_error", "fallback")
        if not isinstance(on_error, str) or on_error not in ON_ERROR:
            raise OptionError(f"option 'on_error'={on_error!r} is not one of {', '.join(ON_ERROR)}")
        timeout = options.get("agreement_timeout_s", DEFAULT_AGREEMENT_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise OptionError(f"option 'agreement_timeout_s'={timeout!r} must be a number of seconds > 0")
        spec = options.get("passes")
        if spec is None:
            passes = default_pipeline()
        elif isinstance(spec, str):
            passes = parse_pipeline(spec)
        elif isinstance(spec, Sequence):
            passes = _passes_from_sequence(spec)
        else:
            raise OptionError(
                f"option 'passes'={spec!r} must be a pipeline string such as "
                "'overlap-schedule{memory_budget_gb=2}' or a list of pass names/instances"
            )
        return cls(
            passes=passes,
            pipeline=format_pipeline(passes),
            inner=inner,
            device_profile=profile,
            memory_budget_gb=budget,
            verify=verify,
            dump_dir=dump_dir,
            on_error=on_error,
            agreement_timeout_s=float(timeout),
        )


def _passes_from_sequence(spec: Sequence[Any]) -> tuple[Pass, ...]:
    out: list[Pass] = []
    for item in spec:
        if isinstance(item, str):
            out.extend(parse_pipeline(item))
        elif isinstance(item, Pass):
            out.append(item)
        else:
            raise OptionError(
                f"option 'passes' holds {item!r}; each item must be a pass name or an fsc.Pass instance"
            )
    return tuple(out)
