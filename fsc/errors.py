"""Exceptions raised by fsc. Every one names its cause in words a user can act on."""

from __future__ import annotations


class FscError(Exception):
    """Base class of every error fsc raises on purpose."""


class OptionError(FscError, ValueError):
    """A compile option (or a pass option in a pipeline string) is unknown or has a bad value."""


class PipelineError(OptionError):
    """A pipeline string names an unknown pass or option, or does not parse."""


class PassFailedError(FscError):
    """A pass raised, or left the graph breaking an invariant. The message names the pass."""

    def __init__(self, pass_name: str, message: str) -> None:
        super().__init__(f"pass '{pass_name}' failed: {message}")
        self.pass_name = pass_name


class InvariantError(PassFailedError):
    """A pass left a graph that breaks an invariant of DESIGN.md."""


class VerificationError(PassFailedError):
    """``verify=True`` found that a pass changed the values a graph computes."""


class UnverifiedError(FscError, RuntimeError):
    """``verify=True`` could not check a rewritten graph (the graph before the passes
    itself failed on the first call's inputs). ``verify="warn"`` warns instead."""


class AgreementError(FscError, RuntimeError):
    """The ranks of a process group compiled a graph whose collectives differ, or could not
    agree within the timeout. The message names the graph, the first difference and the
    cause when known."""
