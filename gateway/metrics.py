"""Process-wide counters and gauges, rendered in the Prometheus text format."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["CounterSeries", "Metrics"]

_Labels = tuple[tuple[str, str], ...]


class CounterSeries:
    """One series of a counter, resolved once: :meth:`inc` costs one dict update.

    Get one with :meth:`Metrics.series`; it counts exactly as :meth:`Metrics.inc` with the same
    name and labels (the series appears once first incremented).
    """

    __slots__ = ("_counters", "_key", "_name", "_series")

    def __init__(self, counters: dict[str, dict[_Labels, float]], name: str, key: _Labels) -> None:
        self._counters = counters
        self._name = name
        self._key = key
        self._series: dict[_Labels, float] | None = counters.get(name)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount``."""
        series = self._series
        if series is None:
            series = self._series = self._counters.setdefault(self._name, {})
        key = self._key
        series[key] = series.get(key, 0) + amount


class Metrics:
    """A small registry of labelled counters and gauges.

    Counters only go up; gauges are read from callbacks at render time so they are never stale.
    """

    def __init__(self) -> None:
        self._counters: dict[str, dict[_Labels, float]] = {}
        self._help: dict[str, str] = {}
        self._gauges: dict[str, tuple[str, Callable[[], dict[_Labels, float]]]] = {}
        self._counter_fns: dict[str, tuple[str, Callable[[], dict[_Labels, float]]]] = {}

    def describe(self, name: str, text: str) -> None:
        """Set the ``# HELP`` text of a counter."""
        self._help[name] = text

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        """Add ``amount`` to counter ``name`` with the given labels."""
        series = self._counters.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        series[key] = series.get(key, 0) + amount

    def series(self, name: str, **labels: str) -> CounterSeries:
        """A handle on one series of counter ``name``, for hot paths (:class:`CounterSeries`)."""
        return CounterSeries(self._counters, name, tuple(sorted(labels.items())))

    def get(self, name: str, **labels: str) -> float:
        """Current value of one counter series (0 if never incremented)."""
        return self._series(name).get(tuple(sorted(labels.items())), 0)

    def total(self, name: str) -> float:
        """Sum of a counter over all its label sets."""
        return sum(self._series(name).values())

    def _series(self, name: str) -> dict[_Labels, float]:
        if name in self._counter_fns:
            return self._counter_fns[name][1]()
        return self._counters.get(name, {})

    def gauge(self, name: str, text: str, read: Callable[[], dict[_Labels, float]]) -> None:
        """Register a gauge whose series are produced by ``read`` at render time."""
        self._gauges[name] = (text, read)

    def counter(self, name: str, text: str, read: Callable[[], dict[_Labels, float]]) -> None:
        """Register a counter whose series are kept elsewhere (e.g. by a thread of its own)
        and read by ``read`` at render time."""
        self._counter_fns[name] = (text, read)

    def render(self) -> str:
        """The Prometheus text exposition of every counter and gauge."""
        lines: list[str] = []
        for name in sorted(self._counters):
            lines.append(f"# HELP {name} {self._help.get(name, name)}")
            lines.append(f"# TYPE {name} counter")
            for labels, value in sorted(self._counters[name].items()):
                lines.append(f"{name}{_fmt(labels)} {value:g}")
        for kind, table in (("counter", self._counter_fns), ("gauge", self._gauges)):
            for name in sorted(table):
                text, read = table[name]
                lines.append(f"# HELP {name} {text}")
                lines.append(f"# TYPE {name} {kind}")
                for labels, value in sorted(read().items()):
                    lines.append(f"{name}{_fmt(labels)} {value:g}")
        return "\n".join(lines) + "\n"


def _fmt(labels: _Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels
    )
    return "{" + inner + "}"
