"""Pusher webhooks: batched, signed POSTs to each app's URL, retried until a deadline.

Events for one ``(app, url)`` are collected for up to ``batch_delay`` seconds or ``max_batch``
events and sent as one request ``{"time_ms": …, "events": […]}`` with ``X-Pusher-Key`` and
``X-Pusher-Signature`` (hex HMAC-SHA256 of the raw body with the app secret). Batches for one
target are delivered one after the other, in order. A non-2xx answer or a connection error is
retried with exponential backoff and jitter until ``retry_deadline`` seconds after the first
attempt (Pusher's 5 minutes), then the batch is dropped and counted. ``time_ms`` is the batch's
creation time, as Pusher documents it, so a receiver that checks freshness (the official
libraries allow 300 s) may refuse the very last retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gateway.config import AppConfig, WebhookEndpoint
from gateway.metrics import Metrics
from gateway.server import httpclient

__all__ = ["WebhookSender", "sign_webhook"]

log = logging.getLogger("gateway.server.webhooks")

SENT = "pg_webhooks_sent_total"
RETRIES = "pg_webhook_retries_total"
FAILURES = "pg_webhook_failures_total"
DROPPED = "pg_webhooks_dropped_total"
QUEUED = "pg_webhooks_queued"

PostFunction = Callable[[str, bytes, dict[str, str], float], Awaitable[int]]


def sign_webhook(secret: str, body: bytes) -> str:
    """The ``X-Pusher-Signature`` of ``body``: hex HMAC-SHA256 keyed with the app secret."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def _http_post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    return (await httpclient.post(url, body, headers, timeout=timeout)).status


@dataclass(slots=True)
class _Queued:
    """One event waiting for its endpoint: ``done(True)`` once delivered, ``done(False)``
    when given up."""

    event: dict[str, Any]
    done: Callable[[bool], None] | None
    deadline: float  # loop time after which it is given up


class _Target:
    """Pending events and the delivery task of one ``(app, endpoint)``."""

    def __init__(self, app: AppConfig, endpoint: WebhookEndpoint, max_batch: int) -> None:
        self.app = app
        self.endpoint = endpoint
        self.batch = max_batch
        self.events: deque[_Queued] = deque()
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def max_batch(self) -> int:
        """Pusher batches (20 events, 250 ms); an app may turn it off: one event per request."""
        return self.batch if self.app.webhook_batching else 1


class WebhookSender:
    """Delivers webhook events to endpoints; one instance per node.

    Args:
        metrics: Where ``pg_webhooks_sent_total`` (events delivered),
            ``pg_webhook_retries_total`` (requests sent again), ``pg_webhook_failures_total
            {reason}`` (failed attempts), ``pg_webhooks_dropped_total{reason}`` (events given
            up) and the gauge ``pg_webhooks_queued`` are counted.
        max_batch: Most events per request, for apps with ``webhook_batching`` on (the
            default; Pusher's 20). Others get one event per request.
        batch_delay: Seconds to wait for more events after the first of a batch (Pusher's
            250 ms).
        max_queue: Most events waiting per endpoint; the oldest are dropped beyond it.
        retry_deadline: Default seconds after which an event is given up (Pusher's 5 minutes);
            :meth:`enqueue` may give each event its own deadline.
        initial_backoff: First retry delay in seconds; doubles per attempt.
        max_backoff: Cap of the retry delay.
        request_timeout: Seconds for one HTTP exchange (Pusher expects an answer within 4 s).
        post: Replaces the HTTP call (``(url, body, headers, timeout) -> status``); for tests.
    """

    def __init__(
        self,
        *,
        metrics: Metrics | None = None,
        max_batch: int = 20,
        batch_delay: float = 0.25,
        max_queue: int = 10_000,
        retry_deadline: float = 300.0,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        request_timeout: float = 4.0,
        post: PostFunction | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.max_batch = max_batch
        self.batch_delay = batch_delay
        self.max_queue = max_queue
        self.retry_deadline = retry_deadline
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.request_timeout = request_timeout
        self._post = post or _http_post
        self._targets: dict[tuple[str, WebhookEndpoint], _Target] = {}
        self._closing = False
        self.metrics.describe(SENT, "Webhook events delivered (2xx answer).")
        self.metrics.describe(RETRIES, "Webhook requests sent again after a failure.")
        self.metrics.describe(FAILURES, "Failed webhook delivery attempts, by reason.")
        self.metrics.describe(DROPPED, "Webhook events given up, by reason.")
        self.metrics.gauge(
            QUEUED, "Webhook events waiting for delivery", lambda: {(): float(self.pending)}
        )

    @property
    def pending(self) -> int:
        """Events queued and not yet delivered or dropped (excluding a batch in flight)."""
        return sum(len(target.events) for target in self._targets.values())

    def enqueue(
        self,
        app: AppConfig,
        endpoint: WebhookEndpoint | str,
        event: dict[str, Any],
        *,
        done: Callable[[bool], None] | None = None,
        deadline: float | None = None,
    ) -> None:
        """Queue one event (``{"name": …, "channel": …, …}``) for ``endpoint``; never blocks.

        ``done`` is called with True once it was delivered, False when it was given up
        (``deadline``, loop time; default ``retry_deadline`` from now). Must be called from
        the event loop's thread. After :meth:`close` events are dropped.
        """
        if isinstance(endpoint, str):
            endpoint = WebhookEndpoint(endpoint)
        if self._closing:
            self.metrics.inc(DROPPED, reason="closed")
            if done is not None:
                done(False)
            return
        loop = asyncio.get_running_loop()
        key = (app.id, endpoint)
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = _Target(app, endpoint, self.max_batch)
        else:
            target.app = app  # apps reloaded: a rotated secret signs from now on
        if len(target.events) >= self.max_queue:
            _finish([target.events.popleft()], False)
            self.metrics.inc(DROPPED, reason="queue_full")
        when = deadline if deadline is not None else loop.time() + self.retry_deadline
        target.events.append(_Queued(event, done, when))
        if target.task is None:
            target.task = loop.create_task(self._run(target))
        target.wakeup.set()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting events and deliver what can be delivered within ``timeout`` seconds.

        Queued events are sent at once (no batching delay); events still undelivered at the
        deadline are given up (``done(False)``: outbox entries go back to the store for
        another node).
        """
        self._closing = True
        for target in self._targets.values():
            target.wakeup.set()
        tasks = [t.task for t in self._targets.values() if t.task is not None]
        if tasks:
            _done, still = await asyncio.wait(tasks, timeout=timeout)
            for task in still:
                task.cancel()
            for task in still:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for target in self._targets.values():
            if target.events:
                self.metrics.inc(DROPPED, len(target.events), reason="shutdown")
                _finish(target.events, False)
                target.events.clear()

    async def _run(self, target: _Target) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not target.events:
                if self._closing:
                    return
                target.wakeup.clear()
                await target.wakeup.wait()
                continue
            if not self._closing and len(target.events) < target.max_batch:
                deadline = loop.time() + self.batch_delay
                while len(target.events) < target.max_batch and not self._closing:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    target.wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(target.wakeup.wait(), remaining)
            count = min(target.max_batch, len(target.events))
            batch = [target.events.popleft() for _ in range(count)]
            try:
                await self._deliver(target, batch)
            except asyncio.CancelledError:
                self.metrics.inc(DROPPED, len(batch), reason="shutdown")
                _finish(batch, False)
                raise

    def _request(self, target: _Target, batch: list[_Queued]) -> tuple[bytes, dict[str, str]]:
        body = json.dumps(
            {"time_ms": int(time.time() * 1000), "events": [q.event for q in batch]},
            separators=(",", ":"),
        ).encode()
        headers = dict(target.endpoint.headers)
        headers.update(
            {
                "Content-Type": "application/json",
                "X-Pusher-Key": target.app.key,
                "X-Pusher-Signature": sign_webhook(target.app.secret, body),
            }
        )
        return body, headers

    async def _deliver(self, target: _Target, batch: list[_Queued]) -> None:
        loop = asyncio.get_running_loop()
        url = target.endpoint.url
        body, headers = self._request(target, batch)
        attempt = 0
        while True:
            reason = await self._attempt(url, body, headers)
            if reason is None:
                self.metrics.inc(SENT, len(batch))
                _finish(batch, True)
                return
            self.metrics.inc(FAILURES, reason=reason)
            delay = min(self.initial_backoff * 2**attempt, self.max_backoff)
            delay *= random.uniform(0.75, 1.25)
            attempt += 1
            late = [q for q in batch if self._closing or loop.time() + delay > q.deadline]
            if late:
                why = "shutdown" if self._closing else "deadline"
                self.metrics.inc(DROPPED, len(late), reason=why)
                _finish(late, False)
                log.error(
                    "webhook to %s: %d events given up after %d attempts (%s, last failure %s)",
                    url,
                    len(late),
                    attempt,
                    why,
                    reason,
                )
                batch = [q for q in batch if q not in late]
                if not batch:
                    return
                body, headers = self._request(target, batch)
            log.warning(
                "webhook to %s failed (%s); retry %d in %.1f s", url, reason, attempt, delay
            )
            await asyncio.sleep(delay)
            self.metrics.inc(RETRIES)

    async def _attempt(self, url: str, body: bytes, headers: dict[str, str]) -> str | None:
        """One POST; ``None`` on a 2xx answer, else the failure reason label."""
        try:
            status = await self._post(url, body, headers, self.request_timeout)
        except TimeoutError:
            return "timeout"
        except httpclient.HttpClientError:
            return "connection"
        except Exception:
            log.exception("webhook POST to %s raised", url)
            return "error"
        if 200 <= status < 300:
            return None
        return f"http_{status // 100}xx"


def _finish(items: Iterable[_Queued], delivered: bool) -> None:
    for item in items:
        if item.done is not None:
            item.done(delivered)
