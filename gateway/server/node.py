"""One gateway node: shard links, writer, store, Pub/Sub, hub, HTTP API and front door, composed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import signal
import ssl
import time
from collections.abc import Awaitable

from gateway.config import ConfigError, NodeConfig
from gateway.fdlimit import client_connection_cap, nofile_limit, raise_nofile, release_free_memory
from gateway.logs import fields
from gateway.metrics import Metrics
from gateway.periodic import every
from gateway.server.admission import Admission, AdmissionSettings
from gateway.server.api import AdminApi, Api
from gateway.server.frontdoor import FrontDoor, listen_backlog, start_frontdoor
from gateway.server.hub import Hub
from gateway.server.outbox import OutboxDispatcher
from gateway.server.overload import LoadGuard
from gateway.server.reload import AppsReloader, AppsSource
from gateway.server.webhooks import WebhookSender
from gateway.shards.pubsub import PubSub
from gateway.shards.shardset import ShardSet
from gateway.shards.topology import TopologyConfig
from gateway.shards.writer import BatchWriter
from gateway.store.healing import Healer, HealingSettings
from gateway.store.presence_redis import RedisPresenceStore

__all__ = ["GatewayNode", "run_node"]

log = logging.getLogger("gateway.server")


class GatewayNode:
    """A running gateway node.

    Args:
        config: Node settings and apps.
        topology: Where the shards are.

    Attributes:
        incarnation: Random id of this process's life; with the node id it owns every entry
            this node writes, so a restarted node never mistakes old entries for its own.
    """

    def __init__(
        self, config: NodeConfig, topology: TopologyConfig, apps: AppsSource | None = None
    ) -> None:
        self.config = config
        self.incarnation = secrets.token_hex(4)
        self.owner = f"{config.node_id}@{self.incarnation}"
        self.metrics = Metrics()
        self.shards = ShardSet(topology, metrics=self.metrics)
        self.writer = BatchWriter(
            self.shards, metrics=self.metrics, write_timeout=config.write_timeout
        )
        self.store = RedisPresenceStore(
            self.shards,
            self.writer,
            owner=self.owner,
            hold_ms=config.webhook_hold_ms,
            entry_ttl_ms=config.entry_ttl_ms,
            # Late-bound: the hub is made below.
            hooks=lambda app_id, channel: self.hub.hooks_for(app_id, channel),  # noqa: PLW0108
        )
        self.webhooks = WebhookSender(metrics=self.metrics)
        self.pubsub = PubSub(self.shards, self._on_message, metrics=self.metrics, lag=self._lag)
        self.hub = Hub(config, self.store, self.pubsub, self.metrics)
        self.outbox = OutboxDispatcher(
            self.store,
            self.webhooks,
            lambda app_id: self.config.app_by_id(app_id),  # noqa: PLW0108 (apps get reloaded)
            self.metrics,
            lease_ms=config.webhook_lease_ms,
        )
        self.healer = Healer(
            self.store,
            self.shards,
            self.hub.local_state,
            self.hub.local_channel,
            self.metrics,
            HealingSettings(
                lease_ms=config.lease_ms,
                lease_interval=config.lease_interval,
                reap_grace_ms=config.reap_grace_ms,
                loop_stall_limit=config.loop_stall_limit,
                reap_interval=config.reap_interval,
                anti_entropy_interval=config.anti_entropy_interval,
            ),
        )
        self.guard = LoadGuard(
            lag_limit=config.shed_lag,
            lease_at_risk=self.healer.lease.at_risk,
            beat=self.healer.lease.beat,
            metrics=self.metrics,
        )
        self.admission = Admission(
            AdmissionSettings(
                max_connections=client_connection_cap(
                    config.max_client_connections, config.reserved_fds
                ),
                max_per_ip=config.max_connections_per_ip,
                handshakes_per_ip=config.handshakes_per_ip,
                handshake_burst=config.handshake_burst_per_ip,
                trusted_proxies=config.trusted_proxies,
            ),
            self.metrics,
            shedding=lambda: self.guard.shedding,
        )
        self.api = Api(
            config,
            self.store,
            self.shards,
            self.writer,
            self.hub,
            self.metrics,
            self.healer,
            readiness=self.readiness_problems,
        )
        #: Reloads the apps (SIGHUP, a watched file); None when they cannot be read again.
        self.apps = (
            AppsReloader(apps, lambda: self.config, self._set_apps, self.metrics)
            if apps is not None
            else None
        )
        self._door: FrontDoor | None = None
        self._admin: FrontDoor | None = None
        #: Set when SIGTERM started the drain (readiness is off from then on).
        self.draining = False
        self._loops: list[asyncio.Task[None]] = []

    def _on_message(self, shard: int, key: bytes, data: bytes) -> None:
        self.hub.on_message(shard, key, data)

    def _set_apps(self, config: NodeConfig) -> dict[str, int]:
        self.config = config
        self.api.config = config
        return self.hub.set_apps(config)

    def _lag(self) -> float:
        return self.guard.worst_lag()

    def readiness_problems(self) -> list[str]:
        """Why this node should not get new clients now (empty: ready).

        Pub/Sub connections down, leases at risk and load shedding; the shards' own state is
        reported by the API next to these.
        """
        return [
            *(["draining: this node is shutting down"] if self.draining else []),
            *self.pubsub.problems(),
            *self.healer.lease_problems(),
            *self.guard.problems(),
        ]

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._door is not None
        return self._door.port

    @property
    def admin_port(self) -> int | None:
        """The admin listener's bound port, if there is one."""
        return self._admin.port if self._admin is not None else None

    async def start(self, *, ready_timeout: float = 5.0) -> None:
        """Connect to the shards, then listen, whether every shard is usable or not.

        A node waits at most ``ready_timeout`` seconds for its shards, then serves: channels on
        usable shards work at once, the others get ``pusher:subscription_error`` 4200 (and the
        HTTP API 503) until their shard is fixed, which needs no restart. Each unusable shard
        is logged once with its server and reason, and ``/ready`` says the same.

        Raises:
            OSError: The port cannot be bound (the message says which and why).
        """
        await self.shards.start()
        try:
            await self.shards.wait_ready(ready_timeout)
        except TimeoutError:
            for link in self.shards.links:
                if not link.usable:
                    reason = link.last_error
                    if reason == "not connected yet":
                        reason = "no answer yet (still trying; the reason follows when known)"
                    log.error(
                        "shard %s: not usable at start: %s; serving the other shards, its "
                        "channels get subscription errors until it is fixed (no restart needed)",
                        link.spec.name,
                        reason,
                        extra=fields(shard=link.spec.name, reason=reason),
                    )
        self.shards.reported = True
        self.writer.start()
        self.pubsub.start()
        self.healer.start()
        self.guard.start()
        c = self.config
        self._door = await _listen(
            f"{c.host}:{c.port}",
            start_frontdoor(
                c.host,
                c.port,
                ws=self.hub,
                http=self.api,
                max_ws_message=c.max_message_bytes,
                max_body=c.max_request_bytes,
                admission=self.admission,
                work_budget=c.client_work_budget,
                ssl_context=_server_tls(c),
                header_timeout=c.request_header_timeout,
                body_timeout=c.request_body_timeout,
                max_pending_bytes=c.max_pending_request_bytes,
                send_timeout=c.response_send_timeout,
            ),
        )
        if c.admin_port:
            admin = AdminApi(self.api)
            self._admin = await _listen(
                f"admin listener {c.admin_host or c.host}:{c.admin_port}",
                start_frontdoor(
                    c.admin_host or c.host,
                    c.admin_port,
                    ws=admin,
                    http=admin,
                    max_body=1024,
                    admission=Admission(AdmissionSettings(max_connections=256), self.metrics),
                ),
            )
            log.info(
                "admin listener (metrics and probes) on %s:%d", c.admin_host or c.host, c.admin_port
            )
        door = self._door
        m = self.metrics

        def tcp_connections() -> dict[tuple[tuple[str, str], ...], float]:
            websockets, http = door.counts()
            return {(("kind", "websocket"),): float(websockets), (("kind", "http"),): float(http)}

        m.gauge("pg_tcp_connections", "Open client TCP connections, by kind", tcp_connections)
        m.gauge(
            "pg_tcp_connections_max",
            "Client connections this node accepts (max_client_connections or the fd limit)",
            lambda: {(): float(self.admission.settings.max_connections)},
        )
        m.gauge(
            "pg_http_pending_bytes",
            "Request body bytes held by unfinished HTTP requests",
            lambda: {(): float(door.pending_bytes)},
        )
        m.gauge(
            "pg_client_work_waiting",
            "Sockets whose input waits for the next event-loop iteration (work budget)",
            lambda: {(): float(door.work.waiting)},
        )
        watch = self.config.apps_watch_interval
        if self.apps is not None and self.apps.source.paths and watch:
            self._loops.append(
                asyncio.create_task(every(watch, self.apps.poll, name="apps", run_first=False))
            )
        self._loops += [
            asyncio.create_task(every(1.0, self._tick, name="activity", run_first=False)),
            asyncio.create_task(every(0.25, self.outbox.run_once, name="webhooks")),
            asyncio.create_task(every(0.5, self.hub.quotas.refresh, name="quotas")),
            asyncio.create_task(
                every(
                    self.config.housekeeping_interval,
                    self._housekeeping,
                    name="housekeeping",
                    run_first=False,
                )
            ),
        ]
        log.info(
            "gateway node %s (owner %s) listening on %s:%d; up to %d connections "
            "(open-file limit %d, %d reserved for Redis, Sentinel and webhooks); "
            "listen backlog %d (net.core.somaxconn)",
            self.config.node_id,
            self.owner,
            self.config.host,
            self.port,
            self.admission.settings.max_connections,
            nofile_limit(),
            self.config.reserved_fds,
            listen_backlog(),
        )

    def _tick(self) -> None:
        self.hub.tick()

    def _housekeeping(self) -> None:
        # Give memory back after a burst: channel tables sized to their content, then free
        # heap pages returned to the system (glibc keeps them otherwise).
        self.hub.compact()
        release_free_memory()

    async def drain(self) -> None:
        """Leave gracefully (SIGTERM), without presence flaps; then :meth:`close`.

        ``/ready`` turns 503 at once; new connections are still accepted for ``drain_delay``
        seconds (load balancers notice the probe), then refused; the sockets are closed with
        4200 (pusher-js reconnects at once, through the balancer to another node) evenly over
        ``drain_window`` seconds; presence members are handed over: kept in the store until
        ``drain_handover`` seconds after the last socket closed, so a user who reconnected
        elsewhere meanwhile causes no ``member_removed`` / ``member_added`` and no webhook.
        """
        c = self.config
        started = time.monotonic()
        self.draining = True
        log.info(
            "draining: not ready; closing sockets over %g s after %g s, handing presence over",
            c.drain_window,
            c.drain_delay,
        )
        await asyncio.sleep(c.drain_delay)
        door = self._door
        if door is None:
            return
        door.stop_accepting()  # no new connections, no new upgrades
        await self.healer.stop_checks()  # our own leaves must not be re-asserted or reaped
        self.hub.handing_over = True
        closed = 0
        slices = max(1, int(c.drain_window * 10))
        for i in range(slices):
            # What is still open now (a request under way may have upgraded meanwhile),
            # spread over the slices left.
            open_now = door.websockets
            for conn in open_now[: -(-len(open_now) // (slices - i))]:
                conn.close(4200, "server shutting down; reconnect")
                closed += 1
            await asyncio.sleep(c.drain_window / slices)
        for conn in door.websockets:
            conn.close(4200, "server shutting down; reconnect")
            closed += 1
        await asyncio.sleep(c.drain_handover)
        left = await self.hub.finish_handover()
        log.info(
            "drained %d sockets in %.1f s; %d presence members left the store after the handover",
            closed,
            time.monotonic() - started,
            left,
        )

    async def close(self) -> None:
        """Close sockets with 4200 (reconnect now), leave every channel, disconnect."""
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.guard.close()
        await self.healer.close()
        if self._door is not None:
            await self._door.shutdown(4200, "server shutting down")
        if self._admin is not None:
            await self._admin.shutdown(4200, "server shutting down", timeout=1.0)
        if self.hub.handing_over:  # a drain cut short: its members leave now
            await self.hub.finish_handover()
        await self.hub.drain()
        # Webhooks in delivery get a last chance; what is left goes back to the outboxes for
        # the other nodes (held ones of our own leaves are there already).
        self.outbox.closing = True
        await self.webhooks.close()
        await self.outbox.close()
        await self.writer.close()
        await self.pubsub.close()
        await self.shards.close()


async def _listen(what: str, opening: Awaitable[FrontDoor]) -> FrontDoor:
    """Await a listener, naming it when its address cannot be bound."""
    try:
        return await opening
    except OSError as exc:
        raise OSError(exc.errno, f"{what}: {exc.strerror or exc}") from None


def _server_tls(config: NodeConfig) -> ssl.SSLContext | None:
    """The public listener's TLS context, when ``tls_cert`` and ``tls_key`` are set."""
    if not config.tls_cert or not config.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert / tls_key: cannot load {config.tls_cert}: {exc}") from exc
    return context


async def run_node(
    config: NodeConfig, topology: TopologyConfig, apps: AppsSource | None = None
) -> None:
    """Run a node until SIGINT or SIGTERM, then shut it down (bounded in time); SIGHUP
    reloads the apps from ``apps``."""
    stop = asyncio.Event()
    drain = False
    drain_task: asyncio.Task[None] | None = None

    def on_signal(graceful: bool) -> None:
        nonlocal drain
        if drain_task is not None and not drain_task.done():
            # A second signal during the drain: the operator wants out now.
            log.warning("gateway node %s: second signal, cutting the drain short", config.node_id)
            drain_task.cancel()
            return
        drain = drain or graceful
        stop.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, on_signal, False)
    loop.add_signal_handler(signal.SIGTERM, on_signal, True)
    raise_nofile()
    node = GatewayNode(config, topology, apps)
    reloader = node.apps
    if reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
    try:
        try:
            await node.start()
        except OSError as exc:  # start-up conditions a node cannot serve through
            log.error("cannot listen: %s", exc.strerror or exc)
            raise SystemExit(2) from None
        except ConfigError as exc:
            log.error("%s", exc)
            raise SystemExit(2) from None
        # Everything allocated so far (modules, config, shard links) lives as long as the
        # process: keep it out of the cyclic collector, whose full passes otherwise pause the
        # loop for ~10 ms (measured) and grow with the heap.
        gc.freeze()
        await stop.wait()
        log.info(
            "gateway node %s: %s", config.node_id, "draining (SIGTERM)" if drain else "stopping"
        )
        if drain:
            limit = config.drain_delay + config.drain_window + config.drain_handover + 5
            drain_task = asyncio.create_task(node.drain())
            done, _ = await asyncio.wait({drain_task}, timeout=limit)
            if not done:
                log.error("gateway node %s: draining took longer than %g s", config.node_id, limit)
                drain_task.cancel()
            try:
                await drain_task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this task itself is being cancelled, not only the drain
    finally:
        try:
            await asyncio.wait_for(node.close(), 15)
        except TimeoutError:
            log.error("gateway node %s: shutdown took longer than 15 s", config.node_id)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
