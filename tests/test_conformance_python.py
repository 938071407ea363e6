"""Conformance with the official Python server library (``pusher`` 3.3.4) and ``pysher``."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pusher
import pysher
import pysher.pusher as pysher_pusher
import pytest
from nodes import (
    APP_KEY,
    APP_SECRET,
    NodeProcess,
    WebhookReceiver,
    WsClient,
    official_client,
    running_node,
)
from polling import wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def node(cluster: Any, hooks: WebhookReceiver) -> Iterator[NodeProcess]:
    with running_node(cluster.topology_path, node_id="py-a", webhook_url=hooks.url) as proc:
        yield proc


@pytest.fixture
def api(node: NodeProcess) -> pusher.Pusher:
    return official_client(node.port)


def _name(prefix: str) -> str:
    return f"{prefix}py-{uuid.uuid4().hex[:10]}"


def test_trigger_reaches_a_subscriber(node: NodeProcess, api: pusher.Pusher) -> None:
    channel = _name("")
    with WsClient(node.ws_url()) as ws:
        ws.subscribe(channel)
        started = time.monotonic()
        assert api.trigger(channel, "greet", {"hello": "world"}) == {}
        frame = ws.expect("greet", channel)
        print(f"trigger -> delivery {1000 * (time.monotonic() - started):.1f} ms")
        assert json.loads(frame["data"]) == {"hello": "world"}
        assert isinstance(frame["data"], str), "REST data is forwarded as the publisher's string"


def test_trigger_excludes_the_given_socket(node: NodeProcess, api: pusher.Pusher) -> None:
    channel = _name("")
    with WsClient(node.ws_url()) as sender, WsClient(node.ws_url()) as other:
        sender.subscribe(channel)
        other.subscribe(channel)
        api.trigger(channel, "ping", "x", socket_id=sender.socket_id)
        assert other.expect("ping", channel)["data"] == "x"
        assert [f for f in sender.quiet(0.5) if f.get("event") == "ping"] == []


def test_trigger_batch(node: NodeProcess, api: pusher.Pusher) -> None:
    first, second = _name(""), _name("private-")
    with WsClient(node.ws_url()) as ws:
        ws.subscribe(first)
        ws.subscribe(second)
        batch = [
            {"channel": first, "name": "one", "data": {"n": 1}},
            {"channel": second, "name": "two", "data": "plain"},
        ]
        assert api.trigger_batch(batch) == {}
        assert json.loads(ws.expect("one", first)["data"]) == {"n": 1}
        assert ws.expect("two", second)["data"] == "plain"


def test_channels_and_channel_info_and_users(node: NodeProcess, api: pusher.Pusher) -> None:
    presence, public = _name("presence-"), _name("")
    with (
        WsClient(node.ws_url()) as a1,
        WsClient(node.ws_url()) as a2,
        WsClient(node.ws_url()) as b,
    ):
        a1.subscribe(presence, "alice")
        a2.subscribe(presence, "alice")
        b.subscribe(presence, "bob")
        a1.subscribe(public)
        b.subscribe(public)
        listed = api.channels_info(prefix_filter="presence-", attributes=["user_count"])
        assert listed["channels"][presence] == {"user_count": 2}
        assert all(name.startswith("presence-") for name in listed["channels"])
        info = api.channel_info(presence, ["user_count"])
        assert info == {"occupied": True, "user_count": 2}
        assert api.channel_info(public, ["subscription_count"]) == {
            "occupied": True,
            "subscription_count": 2,
        }
        users = api.users_info(presence)["users"]
        assert sorted(u["id"] for u in users) == ["alice", "bob"]
        a2.close()
        b.close()
        wait_until(
            lambda: api.channel_info(presence, ["user_count"])["user_count"] == 1,
            5,
            "user_count 1 after bob left",
        )
        assert api.users_info(presence)["users"] == [{"id": "alice"}]
    wait_until(lambda: not api.channel_info(public)["occupied"], 5, "public channel vacated")
    assert api.channel_info(_name("presence-"), ["user_count"]) == {
        "occupied": False,
        "user_count": 0,
    }


def test_authenticate_tokens_are_accepted(node: NodeProcess, api: pusher.Pusher) -> None:
    private, presence = _name("private-"), _name("presence-")
    with WsClient(node.ws_url()) as ws:
        auth = api.authenticate(private, ws.socket_id)
        ws.send({"event": "pusher:subscribe", "data": {"channel": private, **auth}})
        assert ws.expect("pusher_internal:subscription_succeeded", private)["data"] == "{}"
        # Numeric user id and python-style JSON spacing, signed over the exact string.
        custom = {"user_id": 42, "user_info": {"name": "Ann"}}
        auth = api.authenticate(presence, ws.socket_id, custom)
        ws.send({"event": "pusher:subscribe", "data": {"channel": presence, **auth}})
        roster = json.loads(ws.expect("pusher_internal:subscription_succeeded", presence)["data"])
        assert roster["presence"] == {"ids": ["42"], "hash": {"42": {"name": "Ann"}}, "count": 1}


def test_terminate_user_connections(node: NodeProcess, api: pusher.Pusher) -> None:
    user = f"victim-{uuid.uuid4().hex[:6]}"
    with WsClient(node.ws_url()) as ws, WsClient(node.ws_url()) as bystander:
        signed = api.authenticate_user(ws.socket_id, {"id": user})
        ws.send({"event": "pusher:signin", "data": signed})
        success = ws.expect("pusher:signin_success")
        assert json.loads(success["data"]["user_data"])["id"] == user
        assert api.terminate_user_connections(user) == {}
        wait_until(lambda: ws.ws.close_code is not None or _closed(ws), 5, "terminated socket")
        print(f"terminated socket closed with {ws.ws.close_code} {ws.ws.close_reason!r}")
        assert ws.ws.close_code is not None
        bystander.send({"event": "pusher:ping", "data": {}})
        assert bystander.expect("pusher:pong")


def _closed(ws: WsClient) -> bool:
    try:
        ws.ws.recv(timeout=0.05)
    except TimeoutError:
        return False
    except Exception:
        return True
    return False


def test_webhooks_validate_with_the_official_library(
    node: NodeProcess, hooks: WebhookReceiver
) -> None:
    presence = _name("presence-")
    with WsClient(node.ws_url()) as ann:
        ann.subscribe(presence, "ann")
        with WsClient(node.ws_url()) as bob:
            bob.subscribe(presence, "bob")
            bob.send({"event": "client-wave", "channel": presence, "data": {"hi": 1}})
            assert ann.expect("client-wave", presence)["user_id"] == "bob"
    wanted = {
        ("channel_occupied", None),
        ("member_added", "ann"),
        ("member_added", "bob"),
        ("client_event", "bob"),
        ("member_removed", "bob"),
        ("member_removed", "ann"),
        ("channel_vacated", None),
    }
    events = hooks.wait_for(
        lambda got: wanted <= {(e["name"], e.get("user_id")) for e in got}, presence, 10
    )
    print(f"webhooks on {presence}: {[(e['name'], e.get('user_id')) for e in events]}")
    assert hooks.invalid() == [], "every webhook must pass pusher.validate_webhook"
    assert sorted(hooks.names(presence), key=str) == sorted(wanted, key=str), "one per transition"
    client_event = next(e for e in events if e["name"] == "client_event")
    assert client_event["event"] == "client-wave"
    assert json.loads(client_event["data"]) == {"hi": 1}
    assert client_event["socket_id"]
    for request in hooks.requests:
        assert request.headers["content-type"].startswith("application/json")


def test_pysher_presence_round_trip(node: NodeProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    channel = _name("presence-")
    logging.getLogger("pysher").setLevel(logging.WARNING)
    events: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def record(name: str) -> Any:
        def callback(data: Any) -> None:
            with lock:
                events.append((name, data))

        return callback

    client = pysher.Pusher(
        APP_KEY,
        secret=APP_SECRET,
        custom_host="127.0.0.1",
        port=node.port,
        secure=False,
        user_data={"user_id": "py-user", "user_info": {"lang": "python"}},
        log_level=logging.WARNING,
    )
    client.connect()
    try:
        wait_until(lambda: client.connection.state == "connected", 10, "pysher connected")
        # pysher sends the subscribe before it creates the channel object that its reply is
        # routed to, so a fast reply can be dropped by pysher itself; channel objects bound at
        # creation (and one in place before the subscribe) close that window.
        names = (
            "pusher_internal:subscription_succeeded",
            "pusher_internal:member_added",
            "pusher_internal:member_removed",
        )

        class BoundChannel(pysher_pusher.Channel):  # type: ignore[misc]
            def __init__(self, name: str, connection: Any) -> None:
                super().__init__(name, connection)
                if name == channel:
                    for event in names:
                        self.bind(event, record(event))

        monkeypatch.setattr(pysher_pusher, "Channel", BoundChannel)
        client.channels[channel] = BoundChannel(channel, client.connection)
        client.subscribe(channel)
        wait_until(lambda: events, 10, "pysher subscription_succeeded")
        roster = json.loads(events[0][1])["presence"]
        assert roster["ids"] == ["py-user"]
        assert roster["hash"]["py-user"] == {"lang": "python"}
        with WsClient(node.ws_url()) as other:
            other.subscribe(channel, "ws-user", {"lang": "raw"})
            added = wait_until(
                lambda: [d for n, d in events if n.endswith("member_added")], 10, "member_added"
            )
            assert json.loads(added[0]) == {"user_id": "ws-user", "user_info": {"lang": "raw"}}
        removed = wait_until(
            lambda: [d for n, d in events if n.endswith("member_removed")], 10, "member_removed"
        )
        assert json.loads(removed[0]) == {"user_id": "ws-user"}
    finally:
        client.disconnect(timeout=5)
