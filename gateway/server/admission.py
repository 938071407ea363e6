"""Who gets in, and how much work each gets: connection caps, per-address limits, handshake
rates, and the budget of client work per event-loop iteration.

The front door asks :class:`Admission` at every new TCP connection (over the node's cap or the
address's cap: a ``503`` and the connection is closed), at every WebSocket handshake (while
the node sheds load: ``503``; over the address's rate: ``429``) and before each piece of client
work (:class:`WorkBudget`: once a loop iteration's budget is spent, sockets with more input
are not read until the next iteration, so the node's own work, Redis replies and timers
always get their turn).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.logs import fields
from gateway.metrics import Metrics

__all__ = ["Admission", "AdmissionSettings", "WorkBudget"]

log = logging.getLogger("gateway.server.admission")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AdmissionSettings:
    """Limits on connections and work; every 0 means "unlimited" (see the node settings).

    Attributes:
        max_connections: TCP connections the node holds at most (HTTP and WebSocket).
        max_per_ip: Connections from one client address.
        handshakes_per_ip: WebSocket handshakes per second from one address (token bucket).
        handshake_burst: Handshakes one address may make at once.
        trusted_proxies: Networks whose ``X-Forwarded-For`` names the client address.
        work_budget: Client messages handled per event-loop iteration.
    """

    max_connections: int = 0
    max_per_ip: int = 0
    handshakes_per_ip: float = 0.0
    handshake_burst: int = 100
    trusted_proxies: tuple[str, ...] = ()
    work_budget: int = 1_000_000
    networks: tuple[IpNetwork, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        nets = tuple(ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies)
        object.__setattr__(self, "networks", nets)


class WorkBudget:
    """A budget of client work per event-loop iteration, with a queue for what must wait.

    Client work (a WebSocket message, a handshake, an HTTP request) is done at once while the
    iteration's budget lasts; after that, whoever has more waits in :meth:`defer` (and stops
    reading its socket) until the next iteration, in arrival order.

    Args:
        per_iteration: Units of work per iteration.
        shedding: While it returns True the budget is a quarter of ``per_iteration``.
    """

    def __init__(self, per_iteration: int, shedding: Callable[[], bool] | None = None) -> None:
        self.per_iteration = per_iteration
        self.shedding = shedding or (lambda: False)
        self.left = per_iteration
        self._armed = False
        self._waiting: deque[Callable[[], None]] = deque()
        self.deferrals = 0

    def may_run(self, *, resumed: bool = False) -> bool:
        """Whether a piece of work may run now (``resumed``: it was waiting its turn)."""
        return self.left > 0 and (resumed or not self._waiting)

    def spend(self, units: int = 1) -> None:
        """Record work done in this iteration."""
        self.left -= units
        self._arm()

    def defer(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in a later iteration, when the budget allows (in arrival order)."""
        self.deferrals += 1
        self._waiting.append(callback)
        self._arm()

    def turn(self) -> asyncio.Future[None]:
        """A future resolved when the caller's turn comes, one unit already charged (for work
        done in tasks)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def go() -> None:
            self.left -= 1
            if not fut.done():
                fut.set_result(None)

        self.defer(go)
        return fut

    @property
    def waiting(self) -> int:
        """Pieces of work waiting for a later iteration."""
        return len(self._waiting)

    def _arm(self) -> None:
        if not self._armed:
            self._armed = True
            asyncio.get_running_loop().call_soon(self._next)

    def _next(self) -> None:
        # call_soon callbacks scheduled from here run in the next iteration, after the loop
        # has polled its sockets and run its timers.
        self._armed = False
        budget = self.per_iteration
        if self.shedding():
            budget = max(1, budget // 4)
        self.left = budget
        while self._waiting and self.left > 0:
            callback = self._waiting.popleft()
            try:
                callback()
            except Exception:
                log.exception("deferred client work failed")
        if self._waiting:
            self._arm()


class _Bucket:
    __slots__ = ("last", "tokens")

    def __init__(self, tokens: float, last: float) -> None:
        self.tokens = tokens
        self.last = last


class Admission:
    """Counts connections per node and per address and rate-limits handshakes per address.

    Args:
        settings: The limits.
        metrics: ``pg_connections_refused_total{reason}``.
        shedding: Returns True while the node sheds load (new connections are refused).
        clock: Monotonic clock (seconds).
    """

    def __init__(
        self,
        settings: AdmissionSettings,
        metrics: Metrics,
        *,
        shedding: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.shedding = shedding or (lambda: False)
        self.clock = clock
        self.total = 0
        self._per_ip: Counter[str] = Counter()
        self._buckets: dict[str, _Bucket] = {}
        self._refused: Counter[str] = Counter()
        self._sample: dict[str, str] = {}
        self._last_report = float("-inf")
        metrics.describe(
            "pg_connections_refused_total",
            "Connections and handshakes refused, by reason (node_limit, address_limit, "
            "shedding, handshake_rate)",
        )

    # -- addresses -----------------------------------------------------------------------------

    def trusted(self, ip: str | None) -> bool:
        """Whether ``ip`` is a trusted proxy (its ``X-Forwarded-For`` names the client)."""
        if ip is None or not self.settings.networks:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.settings.networks)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The address limits apply to: the peer, or for a trusted proxy the last address in
        ``X-Forwarded-For`` that is not itself a trusted proxy."""
        if not self.trusted(peer) or not forwarded_for:
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self.trusted(hop):
                return hop
        return hops[0] if hops else peer

    # -- connections ---------------------------------------------------------------------------

    def admit(self, ip: str | None) -> str | None:
        """Count a new TCP connection from ``ip``, or return why it is refused.

        Connections from trusted proxies are counted per address at their WebSocket handshake
        (:meth:`admit_forwarded`), when the client's address is known.
        """
        s = self.settings
        if s.max_connections and self.total >= s.max_connections:
            return self._refuse(
                "node_limit", ip, f"this node holds its maximum of {s.max_connections} connections"
            )
        if ip is not None and s.max_per_ip and not self.trusted(ip):
            if self._per_ip[ip] >= s.max_per_ip:
                return self._refuse(
                    "address_limit",
                    ip,
                    f"{s.max_per_ip} connections from this address (max_connections_per_ip)",
                )
            self._per_ip[ip] += 1
        self.total += 1
        return None

    def admit_forwarded(self, ip: str) -> str | None:
        """Count a proxied client's connection by its forwarded address, or return why not."""
        s = self.settings
        if s.max_per_ip and self._per_ip[ip] >= s.max_per_ip:
            return self._refuse(
                "address_limit",
                ip,
                f"{s.max_per_ip} connections from this address (max_connections_per_ip)",
            )
        self._per_ip[ip] += 1
        return None

    def counts(self, ip: str | None) -> bool:
        """Whether connections from ``ip`` are counted per address at accept time."""
        return ip is not None and self.settings.max_per_ip > 0 and not self.trusted(ip)

    def release(self, ip: str | None, *, total: bool = True) -> None:
        """A connection counted by :meth:`admit` (or :meth:`admit_forwarded`) closed."""
        if total:
            self.total -= 1
        if ip is not None and ip in self._per_ip:
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]

    def connections_from(self, ip: str) -> int:
        """Connections currently counted for ``ip``."""
        return self._per_ip.get(ip, 0)

    # -- handshakes ----------------------------------------------------------------------------

    def shed(self, ip: str | None) -> str | None:
        """Why a WebSocket handshake is refused while the node sheds load (else None).

        Only handshakes are shed: probes, ``/metrics`` and the HTTP API keep working, and a
        load balancer reading ``/ready`` sends new clients elsewhere.
        """
        if self.shedding():
            return self._refuse("shedding", ip, "this node is overloaded and sheds load")
        return None

    def handshake(self, ip: str | None) -> str | None:
        """Take one handshake token for ``ip``; return why not when its rate is exceeded."""
        s = self.settings
        if ip is None or s.handshakes_per_ip <= 0:
            return None
        now = self.clock()
        bucket = self._buckets.get(ip)
        if bucket is None:
            # Idle buckets are dropped by sweep(), about every second: the table holds the
            # addresses seen within burst / rate seconds.
            bucket = self._buckets[ip] = _Bucket(float(s.handshake_burst), now)
        bucket.tokens = min(
            float(s.handshake_burst), bucket.tokens + (now - bucket.last) * s.handshakes_per_ip
        )
        bucket.last = now
        if bucket.tokens < 1.0:
            return self._refuse(
                "handshake_rate",
                ip,
                f"more than {s.handshakes_per_ip:g} WebSocket handshakes per second from this "
                "address",
            )
        bucket.tokens -= 1.0
        return None

    def _prune(self, now: float) -> None:
        # A bucket that has refilled completely holds no information: drop it.
        s = self.settings
        full = s.handshake_burst / s.handshakes_per_ip if s.handshakes_per_ip > 0 else 0.0
        for ip in [ip for ip, b in self._buckets.items() if now - b.last > full]:
            del self._buckets[ip]

    def sweep(self) -> None:
        """Periodic upkeep (about every second): drop idle rate buckets, report refusals."""
        now = self.clock()
        self._prune(now)
        if self._refused and now - self._last_report >= 10.0:
            self._report(now)

    def _refuse(self, reason: str, ip: str | None, text: str) -> str:
        self.metrics.inc("pg_connections_refused_total", reason=reason)
        self._refused[reason] += 1
        self._sample.setdefault(reason, f"{ip}: {text}")
        now = self.clock()
        if now - self._last_report >= 10.0:
            self._report(now)
        return text

    def _report(self, now: float) -> None:
        # One line at the first refusal, then at most one every 10 s with the counts.
        parts = "; ".join(
            f"{n} {reason} (e.g. {self._sample[reason]})"
            for reason, n in self._refused.most_common()
        )
        log.warning(
            "refused connections or handshakes: %s",
            parts,
            extra=fields(count=sum(self._refused.values()), reason=", ".join(self._refused)),
        )
        self._refused.clear()
        self._sample.clear()
        self._last_report = now
