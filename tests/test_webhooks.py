"""Webhook delivery against a loopback receiver, verified with the official pusher library."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pusher
import pytest
from polling import settle

from gateway.config import AppConfig
from gateway.metrics import Metrics
from gateway.server import httpclient
from gateway.server.webhooks import WebhookSender, sign_webhook

APP = AppConfig(id="1", key="app-key", secret="app-secret", webhook_batching=True)
SINGLE = AppConfig(id="2", key="app-key-2", secret="app-secret-2", webhook_batching=False)


class Receiver:
    """A tiny HTTP server recording each POST and answering with scripted statuses."""

    def __init__(self, statuses: list[int] | None = None, *, chunked: bool = False) -> None:
        self.statuses = list(statuses or [])
        self.chunked = chunked
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Event()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hooks?x=1"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            assert lines[0] == "POST /hooks?x=1 HTTP/1.1", lines[0]
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers["content-length"]))
            self.requests.append((headers, body))
            status = self.statuses.pop(0) if self.statuses else 200
            if self.chunked:
                writer.write(
                    f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "2\r\nok\r\n0\r\n\r\n".encode()
                )
            else:
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
            await writer.drain()
        finally:
            writer.close()
            self.arrived.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.close()


def validate(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    client = pusher.Pusher(app_id=APP.id, key=APP.key, secret=APP.secret)
    result = client.validate_webhook(
        headers["x-pusher-key"], headers["x-pusher-signature"], body.decode()
    )
    assert result is not None, "the official library rejected the webhook"
    return dict(result)


def test_signature_matches_the_documented_vector() -> None:
    body = (
        b'{"time_ms":1327078148132,"events":[{"name":"channel_occupied","channel":"test-channel"}]}'
    )
    assert (
        sign_webhook("7ad3773142a6692b25b8", body)
        == "5dd6562a9f744b72a688bcdfea41c14c2c56d12c44c99e32c08face4cc1e8aeb"
    )


async def test_events_are_batched_signed_and_valid(receiver: Receiver) -> None:
    metrics = Metrics()
    sender = WebhookSender(metrics=metrics, batch_delay=0.05)
    for i in range(5):
        sender.enqueue(APP, receiver.url, {"name": "channel_occupied", "channel": f"c{i}"})
    await receiver.wait_for(1)
    await sender.close(timeout=2)
    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    assert headers["content-type"] == "application/json"
    assert headers["x-pusher-key"] == APP.key
    payload = validate(headers, body)
    assert isinstance(payload["time_ms"], int)
    assert [e["channel"] for e in payload["events"]] == [f"c{i}" for i in range(5)]
    assert metrics.total("pg_webhooks_sent_total") == 5


async def test_one_event_per_request_without_batching(receiver: Receiver) -> None:
    sender = WebhookSender(batch_delay=0.05)
    for i in range(3):
        sender.enqueue(SINGLE, receiver.url, {"name": "channel_occupied", "channel": f"c{i}"})
    await receiver.wait_for(3)
    await sender.close(timeout=2)
    events = [json.loads(body)["events"] for _h, body in receiver.requests]
    assert events == [[{"name": "channel_occupied", "channel": f"c{i}"}] for i in range(3)]
    for headers, body in receiver.requests:
        assert headers["x-pusher-key"] == SINGLE.key
        assert pusher.Pusher(app_id="2", key=SINGLE.key, secret=SINGLE.secret).validate_webhook(
            SINGLE.key, headers["x-pusher-signature"], body.decode()
        )


async def test_batches_hold_at_most_max_batch_events(receiver: Receiver) -> None:
    sender = WebhookSender(max_batch=100, batch_delay=0.05)
    for i in range(250):
        sender.enqueue(APP, receiver.url, {"name": "member_added", "channel": "p", "user_id": i})
    await receiver.wait_for(3)
    await sender.close(timeout=2)
    sizes = [len(json.loads(body)["events"]) for _h, body in receiver.requests]
    assert sizes == [100, 100, 50]
    ids = [e["user_id"] for _h, body in receiver.requests for e in json.loads(body)["events"]]
    assert ids == list(range(250))  # in order


async def test_retries_after_500_then_succeeds(receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    metrics = Metrics()
    sender = WebhookSender(metrics=metrics, batch_delay=0.01, initial_backoff=0.05)
    sender.enqueue(APP, receiver.url, {"name": "channel_vacated", "channel": "c"})
    await receiver.wait_for(3)
    await sender.close(timeout=2)
    bodies = {body for _h, body in receiver.requests}
    assert len(bodies) == 1  # the same signed body every time
    validate(*receiver.requests[-1])
    assert metrics.get("pg_webhook_failures_total", reason="http_5xx") == 2
    assert metrics.total("pg_webhooks_sent_total") == 1
    assert metrics.total("pg_webhooks_dropped_total") == 0


async def test_gives_up_after_the_deadline(receiver: Receiver) -> None:
    receiver.statuses = [500] * 100
    metrics = Metrics()
    sender = WebhookSender(
        metrics=metrics, batch_delay=0.01, initial_backoff=0.05, retry_deadline=0.3
    )
    sender.enqueue(APP, receiver.url, {"name": "channel_occupied", "channel": "c"})
    sender.enqueue(APP, receiver.url, {"name": "channel_occupied", "channel": "d"})
    await settle(lambda: metrics.total("pg_webhooks_dropped_total"), what="a dropped webhook")
    assert metrics.get("pg_webhooks_dropped_total", reason="deadline") == 2
    assert 2 <= len(receiver.requests) <= 6
    assert metrics.total("pg_webhooks_sent_total") == 0
    await sender.close(timeout=1)


async def test_connection_refused_is_retried_then_dropped() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    metrics = Metrics()
    sender = WebhookSender(
        metrics=metrics, batch_delay=0.01, initial_backoff=0.02, retry_deadline=0.2
    )
    sender.enqueue(APP, f"http://127.0.0.1:{port}/", {"name": "channel_occupied", "channel": "c"})
    await settle(lambda: metrics.total("pg_webhooks_dropped_total"), what="a dropped webhook")
    assert metrics.get("pg_webhook_failures_total", reason="connection") >= 2
    await sender.close(timeout=1)


async def test_full_queue_drops_oldest(receiver: Receiver) -> None:
    metrics = Metrics()
    sender = WebhookSender(metrics=metrics, max_queue=3, batch_delay=0.05)
    for i in range(5):
        sender.enqueue(APP, receiver.url, {"name": "channel_occupied", "channel": f"c{i}"})
    await receiver.wait_for(1)
    await sender.close(timeout=2)
    events = [e["channel"] for _h, body in receiver.requests for e in json.loads(body)["events"]]
    assert events == ["c2", "c3", "c4"]
    assert metrics.get("pg_webhooks_dropped_total", reason="queue_full") == 2


async def test_close_flushes_pending_events(receiver: Receiver) -> None:
    sender = WebhookSender(batch_delay=10.0)  # would wait 10 s without close()
    sender.enqueue(APP, receiver.url, {"name": "channel_occupied", "channel": "c"})
    await asyncio.sleep(0.01)  # the sender is in its 10 s batch wait: close() must cut it short
    await sender.close(timeout=2)
    assert len(receiver.requests) == 1
    sender.enqueue(APP, receiver.url, {"name": "channel_occupied", "channel": "late"})
    assert sender.metrics.get("pg_webhooks_dropped_total", reason="closed") == 1


async def test_http_client_reads_chunked_responses() -> None:
    r = Receiver([202], chunked=True)
    await r.start()
    try:
        result = await httpclient.post(r.url, b"{}", {"Content-Type": "application/json"})
        assert (result.status, result.body) == (202, b"ok")
    finally:
        await r.close()


async def test_http_client_reads_close_delimited_responses() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        result = await httpclient.post(f"http://127.0.0.1:{port}/", b"")
        assert (result.status, result.body) == (200, b"until close")
    finally:
        server.close()
        await server.wait_closed()


async def test_http_client_times_out() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # never answers; returns when the client gives up and closes
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(TimeoutError):
            await httpclient.post(f"http://127.0.0.1:{port}/", b"", timeout=0.1)
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- endpoints, e2e


def test_endpoints_filters_headers_and_a_hanging_endpoint(cluster: Any) -> None:
    from nodes import APP_ID, APP_KEY, APP_SECRET, WebhookReceiver, WsClient, running_node
    from polling import wait_until

    with WebhookReceiver() as presence_only, WebhookReceiver() as everything:
        everything.hang = 6.0  # longer than the 4 s a node waits for an answer
        extra = f"""
[[apps]]
id = "{APP_ID}"
key = "{APP_KEY}"
secret = "{APP_SECRET}"

[[apps.webhooks]]
url = "{presence_only.url}"
event_types = ["member_added", "member_removed"]
channel_prefixes = ["presence-"]
headers = {{ Authorization = "Bearer s3cr3t-t0ken" }}

[[apps.webhooks]]
url = "{everything.url}"
"""
        with running_node(
            cluster.topology_path, node_id="hooks-ep", extra_toml=extra, app_flag=False, hold_ms=200
        ) as node:
            ws = WsClient(node.ws_url())
            ws.subscribe("presence-ep", "u1")
            ws.subscribe("public-ep")
            ws.close()
            got = presence_only.wait_for(
                lambda evs: [e["name"] for e in evs] == ["member_added", "member_removed"],
                "presence-ep",
                timeout=15,
            )
            assert all(e["id"] for e in got)
            assert presence_only.events("public-ep") == []  # filtered by prefix
            assert all(r.headers["authorization"] == "Bearer s3cr3t-t0ken"
                       for r in presence_only.requests)  # fmt: skip
            # The hanging endpoint held nothing up; once it answers, it gets everything.
            everything.hang = 0.0
            names = {"member_added", "member_removed", "channel_occupied", "channel_vacated"}
            wait_until(
                lambda: (
                    {e["name"] for e in everything.events("presence-ep")} == names
                    and {e["name"] for e in everything.events("public-ep")}
                    >= {"channel_occupied", "channel_vacated", "subscription_count"}
                ),
                30,
                "the hanging endpoint's events after it recovered",
            )
            assert node.metric("pg_webhook_failures_total") >= 1
            assert "s3cr3t-t0ken" not in node.output


# --------------------------------------------------------------------------- the dispatcher


class _Posts:
    """A scripted endpoint for :class:`WebhookSender` (``post=``): records the events."""

    def __init__(self) -> None:
        self.status = 200
        self.events: list[dict[str, Any]] = []

    async def __call__(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
        if self.status == 200:
            self.events += json.loads(body)["events"]
        return self.status


def _outbox_world(posts: Any, shards: int = 1, max_queue: int = 10_000, **options: Any) -> Any:
    from gateway.server.outbox import OutboxDispatcher
    from gateway.store.presence_memory import MemoryShards

    clock = {"now": 1_000_000}
    world = MemoryShards(shards, clock=lambda: clock["now"])
    store = world.store("n@1", hold_ms=100, hooks=lambda a, c: "amovcex")
    sender = WebhookSender(batch_delay=0.01, initial_backoff=0.05, post=posts, max_queue=max_queue)
    apps = {APP.id: replace(APP, webhook_url="http://h/x")}
    dispatcher = OutboxDispatcher(store, sender, apps.get, Metrics(), **options)
    return clock, store, sender, dispatcher


async def test_the_dispatcher_delivers_acknowledges_and_gives_back() -> None:
    posts = _Posts()
    clock, store, sender, dispatcher = _outbox_world(posts, lease_ms=1000)
    await store.set_subscribers(APP.id, "room", 1, publish_count=False)
    await store.join(APP.id, "presence-r", "u1", None, "1.1")
    await store.join(APP.id, "#online-u1", "u1", None, "")  # internal: never delivered
    await dispatcher.run_once()
    await settle(lambda: len(posts.events) >= 3, what="deliveries")
    await dispatcher.run_once()  # acknowledges
    assert {e["name"] for e in posts.events} == {
        "channel_occupied",
        "subscription_count",
        "member_added",
    }
    assert [e["channel"] for e in posts.events if e["name"] == "member_added"] == ["presence-r"]
    assert all(e["id"] for e in posts.events) and not dispatcher.claimed
    assert await store.claim_outbox(100, 1000) == []  # nothing left
    # A failing endpoint: the entry stays claimed and its lease is extended while retried.
    posts.status = 500
    await store.leave(APP.id, "presence-r", "u1")
    clock["now"] += 200  # past the hold
    await dispatcher.run_once()
    assert len(dispatcher.claimed) == 1
    (claimed,) = dispatcher.claimed.values()
    claimed.leased_until = 0  # as if half the lease had passed
    await dispatcher.run_once()
    assert claimed.leased_until > 0
    # Shutdown gives it back at once: another node claims it without waiting for the lease.
    dispatcher.closing = True
    await sender.close(timeout=0.1)
    await dispatcher.close()
    [(_, _, entries, _)] = await store.claim_outbox(100, 1000)
    assert [(e.name, e.rest) for e in entries] == [("member_removed", b"u1")]


class _Gated(_Posts):
    """An endpoint that answers nothing until :attr:`gate` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def __call__(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
        await self.gate.wait()
        return await super().__call__(url, body, headers, timeout)


async def test_a_backlog_is_claimed_up_to_what_the_sender_queues_and_no_more() -> None:
    posts = _Gated()
    # The sender queues at most 7 events per endpoint; the dispatcher claims 5 per shard at a
    # time from 2 shards. Beyond 7 in hand the sender would drop the oldest, and a dropped entry
    # would be acknowledged: lost.
    _clock, store, sender, dispatcher = _outbox_world(posts, shards=2, max_queue=7, limit=5)
    assert dispatcher.cap == 7
    for i in range(20):
        await store.set_subscribers(APP.id, f"room-{i}", 1, publish_count=False)
    per_shard = [len(shard.ev) for shard in store.shards.shards]
    assert min(per_shard) >= 5, per_shard  # both shards have more due than one claim takes
    await dispatcher.run_once()
    assert len(dispatcher.claimed) == 7
    assert sender.metrics.get("pg_webhooks_dropped_total", reason="queue_full") == 0
    # What came back over the cap is claimable at once, not after the lease.
    rest = await store.claim_outbox(100, 1000)
    assert sum(len(c.entries) for c in rest) == 40 - 7
    for claim in rest:
        await store.defer_outbox(claim.shard, [e.id for e in claim.entries], 0)
    # Once the endpoint answers, rounds of claims drain the backlog, nothing dropped twice.
    posts.gate.set()
    for _ in range(40):
        await dispatcher.run_once()
        if len(posts.events) == 40 and not dispatcher.claimed:
            break
        await asyncio.sleep(0.02)
    assert len(posts.events) == 40
    assert len({e["id"] for e in posts.events}) == 40
    assert await store.claim_outbox(100, 1000) == []
    assert sender.metrics.get("pg_webhooks_dropped_total", reason="queue_full") == 0
    await sender.close(timeout=0.1)


async def test_a_backlog_drains_in_rounds_of_claims() -> None:
    posts = _Posts()
    _clock, store, sender, dispatcher = _outbox_world(posts, limit=5, rounds=3)
    for i in range(20):
        await store.set_subscribers(APP.id, f"room-{i}", 1, publish_count=False)
    await dispatcher.run_once()
    # Three claims of 5 in one run: a shard with a backlog is not held to one claim a period.
    assert dispatcher.metrics.get("pg_webhooks_claimed_total") == 15
    await sender.close(timeout=1.0)


async def test_entries_older_than_the_give_up_time_are_dropped() -> None:
    posts = _Posts()
    clock, store, sender, dispatcher = _outbox_world(posts, give_up=1.0)
    await store.set_subscribers(APP.id, "room", 1, publish_count=False)
    clock["now"] += 2000  # every node was down for longer than the give-up time
    await dispatcher.run_once()
    await dispatcher.run_once()
    assert posts.events == [] and not dispatcher.claimed
    assert dispatcher.metrics.get("pg_webhooks_dropped_total", reason="expired") == 2
    await sender.close(timeout=0.1)


async def test_webhooks_dropped_by_a_full_outbox_are_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from gateway.shards.contract import OUTBOX_MAX

    posts = _Posts()
    _clock, store, sender, dispatcher = _outbox_world(posts)
    ev = store.shards.shards[0].ev
    ev.update({b"filler-%d" % i: b"x" for i in range(OUTBOX_MAX)})
    await store.set_subscribers(APP.id, "room", 1, publish_count=False)
    with caplog.at_level("WARNING", logger="gateway.outbox"):
        await dispatcher.run_once()
    assert dispatcher.metrics.get("pg_webhooks_dropped_total", reason="outbox_full") == 2
    assert "was full (100000 webhooks waiting): 2 webhooks dropped" in caplog.text
    await dispatcher.run_once()  # reported once
    assert dispatcher.metrics.get("pg_webhooks_dropped_total", reason="outbox_full") == 2
    assert posts.events == []
    await sender.close(timeout=0.1)
