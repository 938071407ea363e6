"""The Pusher HTTP API, ``/health`` and ``/metrics``, answered from the shared store.

Every node answers the same: counts, channel lists and member lists are read from the shards,
never from the node's local sockets. A shard that cannot be read makes the answer a 503 rather
than a silently partial one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any

from gateway.config import AppConfig, NodeConfig
from gateway.metrics import Metrics
from gateway.protocol import http_api, messages
from gateway.protocol.auth import parse_query, verify_api_params
from gateway.protocol.channels import classify, server_to_user_channel
from gateway.protocol.errors import ApiError
from gateway.server.httpconn import HttpRequest, HttpResponse
from gateway.server.hub import CACHE_TTL_MS, Hub
from gateway.server.websocket import WsConnection
from gateway.shards import contract
from gateway.shards.shardset import ShardSet
from gateway.shards.writer import BatchWriter, WriteFailed
from gateway.store.healing import Healer
from gateway.store.presence import PresenceStore

__all__ = ["AdminApi", "Api"]


def _json(status: int, body: Any) -> HttpResponse:
    return HttpResponse(status, json.dumps(body, separators=(",", ":")).encode())


def _users_body(user_ids: list[str]) -> bytes:
    """``{"users":[{"id":...},...]}``, built without a dict per member (this is a hot path)."""
    if not user_ids:
        return b'{"users":[]}'
    ids = '},{"id":'.join(map(encode_basestring_ascii, user_ids))
    return ('{"users":[{"id":' + ids + "}]}").encode()


def _error(err: ApiError) -> HttpResponse:
    return _json(err.status, {"error": err.message})


class AdminApi:
    """The admin listener (``admin_port``): ``/metrics``, ``/health``, ``/live``, ``/ready``
    only; WebSocket upgrades are refused (4005)."""

    def __init__(self, api: Api) -> None:
        self.api = api

    async def http_request(self, request: HttpRequest) -> HttpResponse:
        """Answer one operational request; 404 for anything else."""
        answer = self.api.operational(request)
        return answer if answer is not None else _json(404, {"error": "not found"})

    def ws_open(self, conn: WsConnection) -> None:
        """No WebSocket on the admin listener."""
        conn.close(4005, "no WebSocket on the admin port")

    def ws_text(self, conn: WsConnection, text: str) -> None:
        """Never called (the socket is closed at once)."""

    def ws_binary(self, conn: WsConnection, data: bytes) -> None:
        """Never called (the socket is closed at once)."""

    def ws_closed(self, conn: WsConnection, code: int | None) -> None:
        """Nothing to clean up."""


class Api:
    """Answers HTTP requests on the node's port (everything that is not a WebSocket)."""

    def __init__(
        self,
        config: NodeConfig,
        store: PresenceStore,
        shards: ShardSet,
        writer: BatchWriter,
        hub: Hub,
        metrics: Metrics,
        healer: Healer | None = None,
        *,
        clock: Any = time.time,
        readiness: Callable[[], list[str]] | None = None,
    ) -> None:
        self.healer = healer
        self.readiness = readiness
        self.config = config
        self.store = store
        self.shards = shards
        self.writer = writer
        self.hub = hub
        self.metrics = metrics
        self.clock = clock
        metrics.describe("pg_api_requests_total", "HTTP API requests, by endpoint and status")

    def operational(self, request: HttpRequest, *, admin: bool = True) -> HttpResponse | None:
        """``/live``, ``/ready``, ``/health``, ``/metrics``; else None.

        Without ``admin`` (the public port of a node that has an admin listener) only
        ``/live`` and a bare ``/ready`` (status, no details) are served.
        """
        if request.method not in ("GET", "HEAD"):
            return None
        if request.path == "/ready" and not admin:
            health = self.health()
            return _json(health.status, {"ready": health.status == 200})
        if request.path in ("/health", "/ready") and admin:
            return self.health()
        if request.path == "/live":
            # Answered by the event loop itself: an answer is the proof that it runs.
            return _json(200, {"status": "alive", "node": self.config.node_id})
        if request.path == "/metrics" and admin:
            return HttpResponse(
                200, self.metrics.render().encode(), content_type="text/plain; version=0.0.4"
            )
        return None

    async def http_request(self, request: HttpRequest) -> HttpResponse:
        """Route one request; never raises."""
        # With an admin listener, /metrics and the detailed /health are served there only.
        answer = self.operational(request, admin=not self.config.admin_port)
        if answer is not None:
            return answer
        found = http_api.route(request.method, request.path)
        if isinstance(found, ApiError):
            return self._count("unknown", _error(found))
        query = parse_query(request.query)
        if isinstance(query, ApiError):
            return self._count(found.endpoint, _error(query))
        app = verify_api_params(
            request.method,
            request.path,
            query,
            request.body,
            self.clock(),
            self.config.app_by_id,
            self.config.app_by_key,
        )
        if isinstance(app, ApiError):
            return self._count(found.endpoint, _error(app))
        if not self.hub.quotas.admit_request(app):
            limit = app.api_requests_per_second
            body = {"error": f"Too many requests: app {app.id} is limited to {limit} per second"}
            refused = _json(429, body)
            refused.headers["Retry-After"] = "1"
            return self._count(found.endpoint, refused)
        try:
            response = await self._dispatch(found, app, request, query)
        except WriteFailed as exc:
            response = _json(503, {"error": f"state store unavailable: {exc}"})
        return self._count(found.endpoint, response)

    def _count(self, endpoint: str, response: HttpResponse) -> HttpResponse:
        self.metrics.inc(
            "pg_api_requests_total", endpoint=str(endpoint), status=str(response.status)
        )
        return response

    def health(self) -> HttpResponse:
        """Readiness (``/ready``, also ``/health``): 200 while the node can take clients.

        503 with the reasons when a shard is unusable (unreachable, wrong identity, demoted
        master), when writes have waited for a shard for more than 2 s, when a shard's Pub/Sub
        connection is down, when this node's lease on a shard has not been refreshed for half
        its duration, or while the node sheds load.
        """
        shards = self.shards.status()
        problems = [f"{s['shard']}: {s['error']}" for s in shards if not s["usable"]]
        oldest = self.writer.oldest_held_age()
        if oldest > 2.0:
            problems.append(f"writes waiting for a shard for {oldest:.1f} s")
        if self.readiness is not None:
            problems += self.readiness()
        elif self.healer is not None:
            problems += self.healer.lease_problems()
        ok = not problems
        body = {
            "status": "ok" if ok else "degraded",
            "node": self.config.node_id,
            "connections": len(self.hub.clients),
            "problems": problems,
            "shards": shards,
        }
        return _json(200 if ok else 503, body)

    async def _dispatch(
        self, found: http_api.Route, app: AppConfig, request: HttpRequest, query: dict[str, str]
    ) -> HttpResponse:
        ep = http_api.Endpoint
        if found.endpoint == ep.TRIGGER:
            trigger = http_api.parse_trigger(
                request.body,
                app.limits(self.hub.limits),
                subscription_count_enabled=app.subscription_count,
            )
            if isinstance(trigger, ApiError):
                return _error(trigger)
            await self._trigger(app, trigger)
            if not trigger.info:
                return _json(200, {})
            return _json(200, {"channels": await self._infos(app, trigger)})
        if found.endpoint == ep.BATCH:
            batch = http_api.parse_batch(
                request.body,
                app.limits(self.hub.limits),
                subscription_count_enabled=app.subscription_count,
            )
            if isinstance(batch, ApiError):
                return _error(batch)
            for event in batch.events:
                await self._trigger(app, event)
            if not any(event.info for event in batch.events):
                return _json(200, {})
            infos = [
                (await self._infos(app, event)).get(event.channels[0], {}) for event in batch.events
            ]
            return _json(200, {"batch": infos})
        if found.endpoint == ep.CHANNELS:
            cq = http_api.parse_channels_query(query)
            if isinstance(cq, ApiError):
                return _error(cq)
            channels = await self.store.channels(app.id, cq.prefix or "")
            body: dict[str, Any] = {}
            for name, counts in sorted(channels.items()):
                if name.startswith("#"):
                    continue
                attrs: dict[str, Any] = {}
                if "user_count" in cq.info:
                    attrs["user_count"] = counts.user_count
                body[name] = attrs
            return _json(200, {"channels": body})
        if found.endpoint == ep.CHANNEL:
            assert found.channel is not None
            chq = http_api.parse_channel_query(
                found.channel, query, subscription_count_enabled=app.subscription_count
            )
            if isinstance(chq, ApiError):
                return _error(chq)
            counts = await self.store.counts(app.id, chq.channel)
            result: dict[str, Any] = {"occupied": counts.subscription_count > 0}
            if "user_count" in chq.info:
                result["user_count"] = counts.user_count
            if "subscription_count" in chq.info:
                result["subscription_count"] = counts.subscription_count
            if "cache" in chq.info:
                frame, ttl = await self.store.cache_get(app.id, chq.channel)
                result["cache"] = (
                    None
                    if frame is None
                    else {"data": json.loads(frame).get("data"), "ttl": max(ttl, 0) // 1000}
                )
            return _json(200, result)
        if found.endpoint == ep.USERS:
            assert found.channel is not None
            channel = http_api.parse_users_request(found.channel)
            if isinstance(channel, ApiError):
                return _error(channel)
            return HttpResponse(200, _users_body(await self.store.user_ids(app.id, channel)))
        if found.endpoint == ep.TERMINATE:
            assert found.user_id is not None
            user = http_api.parse_terminate_request(found.user_id)
            if isinstance(user, ApiError):
                return _error(user)
            await self.store.publish(
                app.id, server_to_user_channel(user), contract.encode_terminate()
            )
            return _json(200, {})
        return _json(404, {"error": "not found"})

    async def _trigger(self, app: AppConfig, trigger: http_api.TriggerRequest) -> None:
        for channel in trigger.channels:
            frame = messages.channel_event(trigger.name, channel, trigger.data)
            await self.store.publish(
                app.id, channel, contract.encode_event(frame, trigger.socket_id)
            )
            if classify(channel).cache:
                await self.store.cache_set(app.id, channel, frame, CACHE_TTL_MS)
        self.metrics.inc("pg_events_published_total", len(trigger.channels), app=app.id)

    async def _infos(
        self, app: AppConfig, trigger: http_api.TriggerRequest
    ) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for channel in trigger.channels:
            counts = await self.store.counts(app.id, channel)
            presence = classify(channel).kind == "presence"
            attrs: dict[str, int] = {}
            if "user_count" in trigger.info and presence:
                attrs["user_count"] = counts.user_count
            if "subscription_count" in trigger.info and not presence:
                attrs["subscription_count"] = counts.subscription_count
            out[channel] = attrs
        return out
