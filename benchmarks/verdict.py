"""A verdict and the checks it is made of, each carrying its evidence.

A timing bound fails only when the whole confidence interval of the measured ratio lies
beyond it, and its message gives the interval: a ratio whose interval straddles the bound
is reported as "not shown either way" and passes, because the run could not tell. Exact
facts (tokens equal, bytes per token) are checked exactly. A check that does not apply on
this machine (a GPU goal on a CPU) is `skipped` with its reason and its measured value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

from benchmarks.stats import RatioEstimate


class Outcome(str, Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Outcome
    message: str
    measured: object = None
    bound: object = None

    @property
    def failed(self) -> bool:
        return self.outcome is Outcome.FAILED

    def as_dict(self) -> dict:
        data = asdict(self)
        data["outcome"] = self.outcome.value
        if isinstance(self.measured, RatioEstimate):
            data["measured"] = self.measured.as_dict()
        return data


def at_most(name: str, estimate: RatioEstimate, bound: float, *, applies: str | None = None) -> Check:
    """Fails only when the interval's low end exceeds `bound`. `applies`: why it is skipped here."""
    if applies is not None:
        return Check(name, Outcome.SKIPPED, f"{name} {estimate}: not judged here: {applies}", estimate, bound)
    if estimate.low > bound:
        return Check(name, Outcome.FAILED, f"{name} {estimate}: the whole interval lies above {bound:g}",
                     estimate, bound)
    shown = "below" if estimate.high <= bound else "not shown either way against"
    return Check(name, Outcome.PASSED, f"{name} {estimate}: {shown} {bound:g}", estimate, bound)


def at_least(name: str, estimate: RatioEstimate, bound: float, *, applies: str | None = None) -> Check:
    """Fails only when the interval's high end is under `bound`."""
    if applies is not None:
        return Check(name, Outcome.SKIPPED, f"{name} {estimate}: not judged here: {applies}", estimate, bound)
    if estimate.high < bound:
        return Check(name, Outcome.FAILED, f"{name} {estimate}: the whole interval lies below {bound:g}",
                     estimate, bound)
    shown = "above" if estimate.low >= bound else "not shown either way against"
    return Check(name, Outcome.PASSED, f"{name} {estimate}: {shown} {bound:g}", estimate, bound)


def exact(name: str, ok: bool, message: str, measured: object = None, bound: object = None) -> Check:
    """An exact fact: bytes, token identity, counts."""
    return Check(name, Outcome.PASSED if ok else Outcome.FAILED, message, measured, bound)


def skipped(name: str, reason: str, measured: object = None) -> Check:
    return Check(name, Outcome.SKIPPED, f"{name}: {reason}", measured)


@dataclass(frozen=True)
class Verdict:
    experiment: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.failed)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def summary(self) -> str:
        return "\n".join(f"{c.outcome.value.upper():7} {c.message}" for c in self.checks)

    def as_dict(self) -> dict:
        return {"experiment": self.experiment, "passed": self.passed, "checks": [c.as_dict() for c in self.checks]}
