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
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.config import AppConfig
from gateway.metrics import Metrics
from gateway.server import httpclient

__all__ = ["WebhookSender", "sign_webhook"]

log = logging.getLogger("gateway.server.webhooks")

SENT = "pg_webhooks_sent_total"
FAILURES = "pg_webhook_failures_total"
DROPPED = "pg_webhooks_dropped_total"

PostFunction = Callable[[str, bytes, dict[str, str], float], Awaitable[int]]


def sign_webhook(secret: str, body: bytes) -> str:
    """The ``X-Pusher-Signature`` of ``body``: hex HMAC-SHA256 keyed with the app secret."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def _http_post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    return (await httpclient.post(url, body, headers, timeout=timeout)).status


class _Target:
    """Pending events and the delivery task of one ``(app, url)``."""

    def __init__(self, app: AppConfig, url: str, max_batch: int) -> None:
        self.app = app
        self.url = url
        # Pusher sends one event per request unless the app turned batch webhooks on.
        self.max_batch = max_batch if app.webhook_batching else 1
        self.events: deque[dict[str, Any]] = deque()
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.busy = False


class WebhookSender:
    """Delivers webhook events; one instance per node.

    Args:
        metrics: Where ``pg_webhooks_sent_total`` (events delivered),
            ``pg_webhook_failures_total{reason}`` (failed attempts) and
            ``pg_webhooks_dropped_total{reason}`` (events given up) are counted.
        max_batch: Most events per request, for apps with ``webhook_batching`` on (others get
            one event per request, as Pusher sends them).
        batch_delay: Seconds to wait for more events after the first of a batch.
        max_queue: Most events waiting per target; the oldest are dropped beyond it.
        retry_deadline: Seconds after a batch's first attempt after which it is dropped.
        initial_backoff: First retry delay in seconds; doubles per attempt.
        max_backoff: Cap of the retry delay.
        request_timeout: Seconds for one HTTP exchange.
        post: Replaces the HTTP call (``(url, body, headers, timeout) -> status``); for tests.
    """

    def __init__(
        self,
        *,
        metrics: Metrics | None = None,
        max_batch: int = 100,
        batch_delay: float = 0.05,
        max_queue: int = 10_000,
        retry_deadline: float = 300.0,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        request_timeout: float = 10.0,
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
        self._targets: dict[tuple[str, str], _Target] = {}
        self._closing = False
        self.metrics.describe(SENT, "Webhook events delivered (2xx answer).")
        self.metrics.describe(FAILURES, "Failed webhook delivery attempts, by reason.")
        self.metrics.describe(DROPPED, "Webhook events given up, by reason.")

    @property
    def pending(self) -> int:
        """Events queued and not yet delivered or dropped (excluding a batch in flight)."""
        return sum(len(target.events) for target in self._targets.values())

    def enqueue(self, app: AppConfig, url: str, event: dict[str, Any]) -> None:
        """Queue one event (``{"name": …, "channel": …, …}``) for ``url``; never blocks.

        Must be called from the event loop's thread. After :meth:`close` events are dropped.
        """
        if self._closing:
            self.metrics.inc(DROPPED, reason="closed")
            return
        key = (app.id, url)
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = _Target(app, url, self.max_batch)
        elif target.app is not app:  # apps reloaded: a rotated secret signs from now on
            target.app = app
            target.max_batch = self.max_batch if app.webhook_batching else 1
        if len(target.events) >= self.max_queue:
            target.events.popleft()
            self.metrics.inc(DROPPED, reason="queue_full")
        target.events.append(event)
        if target.task is None:
            target.task = asyncio.get_running_loop().create_task(self._run(target))
        target.wakeup.set()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting events and deliver what can be delivered within ``timeout`` seconds.

        Queued events are sent at once (no batching delay); batches still undelivered at the
        deadline are dropped and counted.
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
                raise

    async def _deliver(self, target: _Target, events: list[dict[str, Any]]) -> None:
        body = json.dumps(
            {"time_ms": int(time.time() * 1000), "events": events}, separators=(",", ":")
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Pusher-Key": target.app.key,
            "X-Pusher-Signature": sign_webhook(target.app.secret, body),
        }
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.retry_deadline
        attempt = 0
        while True:
            reason = await self._attempt(target.url, body, headers)
            if reason is None:
                self.metrics.inc(SENT, len(events))
                return
            self.metrics.inc(FAILURES, reason=reason)
            delay = min(self.initial_backoff * 2**attempt, self.max_backoff)
            delay *= random.uniform(0.75, 1.25)
            attempt += 1
            if self._closing or loop.time() + delay > give_up_at:
                why = "shutdown" if self._closing else "deadline"
                self.metrics.inc(DROPPED, len(events), reason=why)
                log.error(
                    "webhook to %s dropped after %d attempts (%s, last failure %s): %d events",
                    target.url,
                    attempt,
                    why,
                    reason,
                    len(events),
                )
                return
            log.warning(
                "webhook to %s failed (%s); retry %d in %.1f s", target.url, reason, attempt, delay
            )
            await asyncio.sleep(delay)

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
