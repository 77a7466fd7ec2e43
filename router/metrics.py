"""A few Prometheus counters and gauges (spec 3.8 names, `lorax_` prefix), rendered without a client library.

Counters are incremented where things happen; gauges are read from their owner when scraped, so they never go stale.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

Labels = tuple[tuple[str, str], ...]

# error_type of an InferError -> the reference's `request_failure{err=...}` label
FAILURE_LABELS = {"incomplete_generation": "incomplete"}


def _series(name: str, labels: Labels) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in labels) + "}"


class Metrics:
    def __init__(self, prefix: str = "lorax_") -> None:
        self._prefix = prefix
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._counters[self._prefix + name][tuple(sorted(labels.items()))] += amount

    def failure(self, error_type: str) -> None:
        self.inc("request_failure", err=FAILURE_LABELS.get(error_type, error_type))

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[self._prefix + name] = read

    def _families(self) -> list[tuple[str, str, list[tuple[str, float]]]]:
        families = [
            (name, "counter", [(_series(name, labels), value) for labels, value in series.items()])
            for name, series in sorted(self._counters.items())
        ]
        families += [(name, "gauge", [(name, float(read()))]) for name, read in sorted(self._gauges.items())]
        return families

    def render_text(self) -> str:
        lines = []
        for name, kind, samples in self._families():
            lines.append(f"# TYPE {name} {kind}")
            lines += [f"{series} {value:g}" for series, value in samples]
        return "\n".join(lines) + "\n"

    def render_json(self) -> dict[str, Any]:
        return {
            name: {"type": kind, "data": [{"key": "" if series == name else series, "value": value}
                                          for series, value in samples]}
            for name, kind, samples in self._families()
        }
