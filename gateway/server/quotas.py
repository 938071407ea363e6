"""Per-app quotas over all nodes: connections, and HTTP API requests per second.

Each node keeps its own figures per app in the presence store as the subscriber count of an
internal channel: ``#connections`` (its open connections of the app) and ``#api-requests``
(the app's API requests it accepted in its last whole second). They are owner entries like
any count, so leases, anti-entropy and the reaper apply: a dead node's figures stop counting
when its lease lapses. Every ``refresh`` (twice a second) the node reads the totals over live
nodes and keeps the other nodes' share; admission then compares its own live figure plus the
others' with the quota.

The bound: nodes learn of each other's admissions within a refresh, so connections opened on
several nodes within the same half second can pass ``max_connections`` by what the others
admitted in it; the API rate is this second's own requests plus the others' last second.
Only apps with a quota pay for it (one coalesced write per change, one read per refresh).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from gateway.config import AppConfig
from gateway.metrics import Metrics
from gateway.shards.writer import WriteFailed
from gateway.store.presence import PresenceStore

__all__ = ["API_CHANNEL", "CONNECTIONS_CHANNEL", "QUOTA_CHANNELS", "Quotas"]

log = logging.getLogger("gateway.quotas")

#: The internal channel whose per-node count is the node's open connections of the app.
CONNECTIONS_CHANNEL = "#connections"
#: The internal channel whose per-node count is the app's API requests in the node's last second.
API_CHANNEL = "#api-requests"
QUOTA_CHANNELS = frozenset({CONNECTIONS_CHANNEL, API_CHANNEL})


class Quotas:
    """One node's side of the cluster-wide quotas.

    Args:
        store: Reads of the totals.
        apps: The apps in force now.
        connections: This node's open connections of an app (by app id).
        schedule: Asks the hub to write this node's figure of (app id, channel) (coalesced).
        metrics: ``pg_quota_refusals_total{app,quota}`` and the gauge ``pg_quota_usage{app,quota}``.
        clock: Monotonic seconds (the API rate's windows).
    """

    def __init__(
        self,
        store: PresenceStore,
        apps: Callable[[], Iterable[AppConfig]],
        connections: Callable[[str], int],
        schedule: Callable[[tuple[str, str]], None],
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.apps = apps
        self.connections = connections
        self.schedule = schedule
        self.metrics = metrics
        self.clock = clock
        #: Other nodes' connections / last-second API requests, per app id (last refresh).
        self.others: dict[tuple[str, str], int] = {}
        #: This node's figures as last acknowledged by the store, per (app id, channel).
        self.acknowledged: dict[tuple[str, str], int] = {}
        self._window = int(clock())
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        self._failed_once = False
        metrics.gauge(
            "pg_quota_usage",
            "Use of each per-app cluster quota as this node sees it (all nodes together)",
            self._usage,
        )

    # -- admission -----------------------------------------------------------------------------

    def admit_connection(self, app: AppConfig) -> bool:
        """Whether one more connection of ``app`` stays within ``max_connections``."""
        if not app.max_connections:
            return True
        total = self.connections(app.id) + self.others.get((app.id, CONNECTIONS_CHANNEL), 0)
        if total < app.max_connections:
            return True
        self.metrics.inc("pg_quota_refusals_total", app=app.id, quota="max_connections")
        return False

    def admit_request(self, app: AppConfig) -> bool:
        """Whether one more API request of ``app`` stays within ``api_requests_per_second``
        (counted when admitted)."""
        limit = app.api_requests_per_second
        if not limit:
            return True
        self._roll()
        mine = self._current.get(app.id, 0)
        if mine + self.others.get((app.id, API_CHANNEL), 0) >= limit:
            self.metrics.inc("pg_quota_refusals_total", app=app.id, quota="api_requests_per_second")
            return False
        self._current[app.id] = mine + 1
        return True

    def _roll(self) -> None:
        window = int(self.clock())
        if window == self._window:
            return
        # A second with no request after the last one counts as 0.
        previous = self._current if window == self._window + 1 else {}
        changed = set(previous) | set(self._previous)
        self._window, self._previous, self._current = window, previous, {}
        for app_id in changed:
            self.schedule((app_id, API_CHANNEL))

    # -- this node's figures -------------------------------------------------------------------

    def own(self, app_id: str, channel: str) -> int:
        """This node's figure for an internal quota channel (what the hub writes and
        re-asserts)."""
        if channel == CONNECTIONS_CHANNEL:
            return self.connections(app_id)
        self._roll()
        return self._previous.get(app_id, 0)

    def local_channels(self) -> list[tuple[str, str, int]]:
        """(app id, channel, figure) of every quota this node takes part in now."""
        out = []
        for app in self.apps():
            if app.max_connections:
                out.append((app.id, CONNECTIONS_CHANNEL, self.connections(app.id)))
            if app.api_requests_per_second:
                out.append((app.id, API_CHANNEL, self.own(app.id, API_CHANNEL)))
        return out

    def written(self, app_id: str, channel: str, count: int) -> None:
        """The store acknowledged this node's figure ``count``."""
        self.acknowledged[(app_id, channel)] = count

    def _usage(self) -> dict[tuple[tuple[str, str], ...], float]:
        out: dict[tuple[tuple[str, str], ...], float] = {}
        for app_id, channel, figure in self.local_channels():
            quota = "max_connections" if channel == CONNECTIONS_CHANNEL else "api_requests"
            # The API rate: this second so far on this node.
            mine = figure if channel == CONNECTIONS_CHANNEL else self._current.get(app_id, 0)
            total = mine + self.others.get((app_id, channel), 0)
            out[(("app", app_id), ("quota", quota))] = float(total)
        return out

    # -- the others ----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the totals over live nodes of every quota in force; keep the others' share."""
        self._roll()
        wanted = [(app_id, channel) for app_id, channel, _ in self.local_channels()]
        reads = await asyncio.gather(
            *(self.store.counts(app_id, channel) for app_id, channel in wanted),
            return_exceptions=True,
        )
        failed = 0
        others: dict[tuple[str, str], int] = {}
        for cid, read in zip(wanted, reads, strict=True):
            if isinstance(read, BaseException):
                if not isinstance(read, (WriteFailed, ConnectionError, TimeoutError)):
                    raise read
                failed += 1
                others[cid] = self.others.get(cid, 0)  # keep the last known share
                continue
            others[cid] = max(0, read.subscription_count - self.acknowledged.get(cid, 0))
        self.others = others
        if failed and not self._failed_once:
            log.warning(
                "quotas: %d of %d totals unreadable (shard unavailable); enforcing the last "
                "known shares of other nodes until it is back",
                failed,
                len(wanted),
            )
        self._failed_once = bool(failed)
