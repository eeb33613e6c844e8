"""What the suite measured, in one session-scoped object that the criteria read.

pytest-benchmark keeps its session's results in one `BenchmarkSession`; this is ours. A
test records a typed result under its experiment and key; a criteria test judges exactly
what the ledger holds, so a `-k` selection judges what ran rather than skipping because a
module-level dict of another test was empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterator


@dataclass
class Ledger:
    _sections: dict[str, dict[Hashable, object]] = field(default_factory=dict)

    def record(self, experiment: str, key: Hashable, result: object) -> None:
        self._sections.setdefault(experiment, {})[key] = result

    def results(self, experiment: str) -> dict[Hashable, object]:
        """A copy of an experiment's results, in the order they were recorded."""
        return dict(self._sections.get(experiment, {}))

    def experiments(self) -> Iterator[str]:
        return iter(self._sections)
