"""Overload detection: the event loop's lag and the lease's age decide when the node sheds load.

A timer fires every ``interval`` seconds; how late it fires is the loop's lag (how long any
callback, a Redis reply or a timer, waits for its turn). Each tick is also the loop's
heartbeat for the lease threads (a loop that stops beating lets its lease go). The node sheds
load while the lag is above ``lag_limit`` or a lease answers slowly, and for ``hold`` seconds
after: new connections are refused with 503, the client work budget per iteration is
quartered, and readiness reports it, so a load balancer sends new clients elsewhere before
the node's lease could be at risk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from gateway.logs import fields
from gateway.metrics import Metrics

__all__ = ["LoadGuard"]

log = logging.getLogger("gateway.overload")


class LoadGuard:
    """Watches the loop's lag and the lease; says when to shed load.

    Args:
        lag_limit: Lag in seconds above which the node sheds load.
        lease_at_risk: True while a lease answers too slowly.
        beat: The lease threads' heartbeat, called every tick.
        metrics: ``pg_loop_lag_seconds``, ``pg_shedding`` and ``pg_shedding_total``.
        interval: Seconds between ticks.
        hold: Seconds the node keeps shedding after the last sign of overload.
    """

    def __init__(
        self,
        *,
        lag_limit: float,
        lease_at_risk: Callable[[], bool],
        beat: Callable[[], None],
        metrics: Metrics,
        interval: float = 0.1,
        hold: float = 2.0,
    ) -> None:
        self.lag_limit = lag_limit
        self.lease_at_risk = lease_at_risk
        self.beat = beat
        self.metrics = metrics
        self.interval = interval
        self.hold = hold
        self.lag = 0.0
        self.reason = ""
        self._until = 0.0
        self._since = 0.0
        self._expected = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._recent: deque[tuple[float, float]] = deque()  # (time, lag) of the last 10 s
        metrics.gauge("pg_loop_lag_seconds", "Worst event-loop lag of the last 10 s", self._gauge)
        metrics.gauge("pg_shedding", "1 while the node sheds load", self._shed_gauge)
        metrics.describe("pg_shedding_total", "Periods of load shedding, by reason")

    def start(self) -> None:
        """Start ticking (call from the event loop)."""
        loop = asyncio.get_running_loop()
        self._expected = loop.time() + self.interval
        self._handle = loop.call_later(self.interval, self._tick)

    def close(self) -> None:
        """Stop ticking."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def shedding(self) -> bool:
        """Whether the node sheds load now."""
        return time.monotonic() < self._until

    def worst_lag(self) -> float:
        """The worst lag seen in the last 10 seconds."""
        return max((lag for _, lag in self._recent), default=0.0)

    def problems(self) -> list[str]:
        """Why the node is not ready, if it sheds load."""
        if not self.shedding:
            return []
        return [f"shedding load: {self.reason}"]

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.lag = max(0.0, now - self._expected)
        self._expected = now + self.interval
        self._handle = loop.call_later(self.interval, self._tick)
        self.beat()
        wall = time.monotonic()
        recent = self._recent
        recent.append((wall, self.lag))
        while recent and recent[0][0] < wall - 10.0:
            recent.popleft()
        reason = ""
        if self.lag > self.lag_limit:
            reason = f"event loop lag {self.lag:.2f} s (shed_lag {self.lag_limit:g} s)"
        elif self.lease_at_risk():
            reason = "the shard answers this node's lease slowly"
        if reason:
            if not self._since:
                self._since = wall
                kind = "lag" if self.lag > self.lag_limit else "lease"
                self.metrics.inc("pg_shedding_total", reason=kind)
                log.warning(
                    "shedding load: %s; refusing new connections",
                    reason,
                    extra=fields(reason=reason),
                )
            self.reason = reason
            self._until = wall + self.hold
        elif self._since and not self.shedding:
            log.warning("load shedding over after %.1f s", wall - self._since)
            self._since = 0.0

    def _gauge(self) -> dict[tuple[tuple[str, str], ...], float]:
        return {(): self.worst_lag()}

    def _shed_gauge(self) -> dict[tuple[tuple[str, str], ...], float]:
        return {(): 1.0 if self.shedding else 0.0}
