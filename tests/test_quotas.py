"""Per-app limits: the cluster-wide quotas (connections, API requests per second) and the
per-app protocol limits, on the in-memory twin (deterministic) and on real nodes."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import pusher
import pytest
import requests
from nodes import APP_ID, APP_KEY, APP_SECRET, NodeProcess, WsClient, running_node
from polling import settle, wait_until
from test_hub import APP, CONFIG, LEASE_MS, Node, World
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gateway.config import AppConfig
from gateway.protocol.auth import sign_api_request
from gateway.server.quotas import API_CHANNEL, CONNECTIONS_CHANNEL


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _node(world: World, name: str, **limits: Any) -> Node:
    node = await world.node(name)
    node.hub.config = replace(CONFIG, apps=(replace(APP, **limits),))
    return node


def _app(node: Node) -> Any:
    return node.hub.config.apps[0]


# --------------------------------------------------------------------------- in-memory twin


async def test_max_connections_counts_every_node() -> None:
    world = World()
    a, b = await _node(world, "a", max_connections=3), await _node(world, "b", max_connections=3)
    s1, _s2 = a.connect(), a.connect()
    await world.quiet()
    await b.hub.quotas.refresh()
    assert b.hub.quotas.others[(APP.id, CONNECTIONS_CHANNEL)] == 2
    s3 = b.connect()
    assert s3.closed is None
    refused = b.connect()
    assert refused.closed is not None and refused.closed[0] == 4100
    assert refused.frames[-1]["event"] == "pusher:error"
    await world.quiet()
    await a.hub.quotas.refresh()
    assert a.connect().closed is not None  # a sees b's connection too
    # One closes on a: b may take one more once it has read the new total.
    a.disconnect(s1)
    await world.quiet()
    await b.hub.quotas.refresh()
    assert b.connect().closed is None


async def test_a_dead_nodes_connections_stop_counting_when_its_lease_lapses() -> None:
    world = World()
    a, b = await _node(world, "a", max_connections=2), await _node(world, "b", max_connections=2)
    a.connect(), a.connect()
    await world.quiet()
    await b.hub.quotas.refresh()
    assert b.connect().closed is not None
    world.now += LEASE_MS + 1  # a dies: no write, no lease refresh
    await b.lease(world.shards)
    await b.hub.quotas.refresh()
    assert b.hub.quotas.others[(APP.id, CONNECTIONS_CHANNEL)] == 0
    assert b.connect().closed is None and b.connect().closed is None


async def test_connection_figures_are_reasserted_by_anti_entropy() -> None:
    world = World()
    a = await _node(world, "a", max_connections=10)
    a.connect(), a.connect()
    await world.quiet()
    shard = a.store.shard_of(APP.id, CONNECTIONS_CHANNEL)
    assert a.hub.local_state(shard)[(APP.id, CONNECTIONS_CHANNEL)].count == 2
    assert a.hub.local_channel(APP.id, CONNECTIONS_CHANNEL).count == 2
    # An app without the quota writes and re-asserts nothing.
    plain = await _node(world, "p")
    plain.connect()
    await world.quiet()
    assert plain.hub.local_channel(APP.id, CONNECTIONS_CHANNEL).count == 0
    assert (APP.id, CONNECTIONS_CHANNEL) not in plain.hub.local_state(shard)


async def test_api_requests_per_second_shared_between_nodes() -> None:
    world = World()
    a = await _node(world, "a", api_requests_per_second=5)
    b = await _node(world, "b", api_requests_per_second=5)
    clock = Clock()
    for node in (a, b):
        node.hub.quotas.clock = clock
        node.hub.quotas._window = int(clock())
    app = _app(a)
    assert [a.hub.quotas.admit_request(app) for _ in range(6)] == [True] * 5 + [False]
    clock.now += 1.0  # a's second ends: its figure (5) is written
    await a.hub.quotas.refresh()
    await world.quiet()
    await b.hub.quotas.refresh()
    assert b.hub.quotas.others[(app.id, API_CHANNEL)] == 5
    assert not b.hub.quotas.admit_request(app)  # the app used its rate on a last second
    clock.now += 1.0  # a quiet second on a: its figure drops to 0
    await a.hub.quotas.refresh()
    await world.quiet()
    await b.hub.quotas.refresh()
    assert [b.hub.quotas.admit_request(app) for _ in range(6)] == [True] * 5 + [False]


async def test_per_app_presence_member_limit() -> None:
    world = World()
    a = await _node(world, "a", max_presence_members=1)
    s1, s2 = a.connect(), a.connect()
    a.subscribe(s1, "u1")
    a.subscribe(s2, "u2")
    await settle(lambda: s2.events("pusher:subscription_error"))
    data = s2.events("pusher:subscription_error")[0]["data"]
    text = data if isinstance(data, str) else json.dumps(data)
    assert "full (1 members)" in text and '"status": 4100' in json.dumps(json.loads(text))


# --------------------------------------------------------------------------- real nodes


def _api(node: NodeProcess) -> pusher.Pusher:
    return pusher.Pusher(
        app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1", port=node.port, ssl=False
    )


def _refused(node: NodeProcess) -> int | None:
    """The ``pusher:error`` code a new connection gets before it is closed, or None when it
    is established."""
    with connect(node.ws_url(), open_timeout=10, close_timeout=2) as ws:
        frame = json.loads(ws.recv(timeout=10))
        if frame["event"] == "pusher:connection_established":
            return None
        assert frame["event"] == "pusher:error", frame
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == frame["data"]["code"]
        return int(frame["data"]["code"])


def test_max_connections_across_two_real_nodes(cluster: Any) -> None:
    settings = {"max_connections": 3}
    with (
        running_node(cluster.topology_path, node_id="quota-a", app_settings=settings) as a,
        running_node(cluster.topology_path, node_id="quota-b", app_settings=settings) as b,
    ):
        held = [WsClient(a.ws_url()), WsClient(a.ws_url())]
        wait_until(lambda: b.metric("pg_quota_usage") == 2, 10, "b sees a's 2 connections")
        held.append(WsClient(b.ws_url()))
        wait_until(lambda: a.metric("pg_quota_usage") == 3, 10, "a sees 3")
        assert _refused(a) == 4100
        assert _refused(b) == 4100
        assert a.metric("pg_quota_refusals_total") >= 1
        held.pop(0).close()
        wait_until(lambda: b.metric("pg_quota_usage") == 2, 10, "b sees the close")
        held.append(WsClient(b.ws_url()))
        for ws in held:
            ws.close()


def test_api_rate_limit_answers_429_with_retry_after(cluster: Any) -> None:
    with running_node(
        cluster.topology_path, node_id="quota-api", app_settings={"api_requests_per_second": 3}
    ) as node:
        statuses = []
        for _ in range(20):  # bounded: well over 3 within one second on any machine
            r = requests.get(f"{node.url}/apps/{APP_ID}/channels", params=_signed(node), timeout=5)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["Retry-After"] == "1"
                assert "limited to 3 per second" in r.json()["error"]
                break
        assert 429 in statuses, statuses
        assert statuses.count(200) >= 1


def _signed(node: NodeProcess) -> dict[str, str]:
    app = AppConfig(APP_ID, APP_KEY, APP_SECRET)
    path = f"/apps/{APP_ID}/channels"
    return sign_api_request(app, "GET", path, {}, b"", int(time.time()), always_md5=False)


def test_per_app_payload_and_trigger_limits_from_config(cluster: Any) -> None:
    settings = {"max_event_payload_bytes": 100, "max_channels_per_trigger": 2}
    with running_node(cluster.topology_path, node_id="quota-lim", app_settings=settings) as node:
        api = _api(node)
        with pytest.raises(pusher.errors.PusherBadStatus, match="413.*max 100"):
            api.trigger("c1", "e", "x" * 101)
        api.trigger("c1", "e", "x" * 100)
        with pytest.raises(pusher.errors.PusherBadRequest, match="max 2"):
            api.trigger(["c1", "c2", "c3"], "e", {})
        api.trigger(["c1", "c2"], "e", {})


async def test_per_app_protocol_limits_reach_the_sessions() -> None:
    world = World()
    a = await _node(
        world,
        "a",
        max_channel_name_length=12,
        client_events_per_second=2,
        max_user_info_bytes=20,
    )
    sock = a.connect()
    a.hub.ws_text(sock, json.dumps({"event": "pusher:subscribe", "data": {"channel": "x" * 13}}))  # type: ignore[arg-type]
    [error] = [f for f in sock.frames if f.get("event") == "pusher:error"]
    assert "too long" in json.dumps(error)
    # user_info over 20 bytes: refused before any state changes.
    a.subscribe(sock, "a-user-with-a-long-name", channel="presence-r")
    await settle(lambda: len([f for f in sock.frames if "error" in f.get("event", "")]) == 2)
    assert not a.hub.presence
    # Client events: the third within a second gets 4301.
    a.subscribe(sock, "u", channel="presence-r2")
    await settle(lambda: sock.events("pusher_internal:subscription_succeeded", "presence-r2"))
    for _ in range(3):
        frame = {"event": "client-x", "channel": "presence-r2", "data": "{}"}
        a.hub.ws_text(sock, json.dumps(frame))  # type: ignore[arg-type]
    codes = [f["data"].get("code") for f in sock.frames if f.get("event") == "pusher:error"]
    assert codes[-1] == 4301 and sock.closed is None
