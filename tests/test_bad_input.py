"""Bad input against a running node: refused with the documented code, nothing else changes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from nodes import APP_KEY, NodeProcess, WsClient, api_request, official_client, running_node
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.timeout(120)

ERRORS = ("pusher:error", "pusher:subscription_error")


@pytest.fixture(scope="module")
def node(cluster: Any) -> Iterator[NodeProcess]:
    with running_node(cluster.topology_path, node_id="bad-input") as proc:
        yield proc


@pytest.fixture
def witness(node: NodeProcess) -> Iterator[tuple[WsClient, str, str]]:
    """A socket holding one presence and one public channel, whose counts must not move."""
    presence = f"presence-bad-{uuid.uuid4().hex[:8]}"
    public = f"bad-{uuid.uuid4().hex[:8]}"
    with WsClient(node.ws_url()) as ws:
        ws.subscribe(presence, "witness")
        ws.subscribe(public)
        yield ws, presence, public


def _state(node: NodeProcess, presence: str, public: str) -> dict[str, Any]:
    api = official_client(node.port)
    return {
        "users": api.users_info(presence)["users"],
        "user_count": api.channel_info(presence, ["user_count"])["user_count"],
        "subs": api.channel_info(public, ["subscription_count"])["subscription_count"],
    }


def _still_works(ws: WsClient) -> None:
    """The socket still works: a fresh public subscription succeeds."""
    ws.subscribe(f"after-{uuid.uuid4().hex[:8]}")


def _presence_data(ws: WsClient, channel: str, user_info: Any) -> dict[str, Any]:
    return ws.subscribe_frame(channel, "big", user_info)


# Each case: (id, frame builder). The builder gets the socket (for its socket_id).
WS_CASES: list[tuple[str, Callable[[WsClient], Any]]] = [
    ("malformed-json", lambda ws: '{"event": "pusher:subscribe", '),
    ("json-array", lambda ws: "[1, 2, 3]"),
    ("json-string", lambda ws: '"pusher:subscribe"'),
    ("json-number", lambda ws: "42"),
    ("event-not-string", lambda ws: {"event": 7, "data": {}}),
    ("subscribe-data-number", lambda ws: {"event": "pusher:subscribe", "data": 5}),
    ("subscribe-channel-number", lambda ws: {"event": "pusher:subscribe", "data": {"channel": 5}}),
    (
        "subscribe-auth-list",
        lambda ws: {"event": "pusher:subscribe", "data": {"channel": "private-x", "auth": []}},
    ),
    (
        "subscribe-bad-channel-name",
        lambda ws: {"event": "pusher:subscribe", "data": {"channel": "bad name!", "auth": ""}},
    ),
    (
        "subscribe-hash-channel",
        lambda ws: {"event": "pusher:subscribe", "data": {"channel": "#server-to-user-x"}},
    ),
    ("unknown-pusher-event", lambda ws: {"event": "pusher:frobnicate", "data": {}}),
    (
        "client-event-on-public",
        lambda ws: {"event": "client-hi", "channel": "some-public", "data": {}},
    ),
    (
        "client-event-not-subscribed",
        lambda ws: {"event": "client-hi", "channel": "private-not-mine", "data": {}},
    ),
    (
        "bad-private-signature",
        lambda ws: {
            "event": "pusher:subscribe",
            "data": {"channel": "private-x", "auth": f"{APP_KEY}:{'0' * 64}"},
        },
    ),
    (
        "wrong-key-in-auth",
        lambda ws: {
            "event": "pusher:subscribe",
            "data": {"channel": "private-x", "auth": f"other-key:{'0' * 64}"},
        },
    ),
    (
        "presence-without-channel-data",
        lambda ws: {
            "event": "pusher:subscribe",
            "data": {"channel": "presence-x", "auth": f"{APP_KEY}:{'0' * 64}"},
        },
    ),
    (
        "presence-user-info-too-big",
        lambda ws: _presence_data(ws, "presence-big", {"blob": "x" * 2000}),
    ),
    ("signin-missing-user-data", lambda ws: {"event": "pusher:signin", "data": {"auth": "k:0"}}),
    (
        "signin-bad-signature",
        lambda ws: {
            "event": "pusher:signin",
            "data": {"auth": f"{APP_KEY}:{'0' * 64}", "user_data": '{"id": "mallory"}'},
        },
    ),
    ("frame-over-32k", lambda ws: json.dumps({"event": "client-x", "data": "y" * 40_000})),
]


@pytest.mark.parametrize("build", [c[1] for c in WS_CASES], ids=[c[0] for c in WS_CASES])
def test_bad_frame_is_refused_and_changes_nothing(
    node: NodeProcess, witness: tuple[WsClient, str, str], build: Callable[[WsClient], Any]
) -> None:
    _, presence, public = witness
    before = _state(node, presence, public)
    with WsClient(node.ws_url()) as ws:
        ws.send(build(ws))
        try:
            reply = ws.next_event(lambda f: f.get("event") in ERRORS, timeout=5)
        except ConnectionClosed:
            code = ws.ws.close_code
            print(f"closed with {code} {ws.ws.close_reason!r}")
            assert code is not None and (code == 1009 or 4000 <= code < 4300), code
        else:
            print(f"refused: {reply}")
            data = reply["data"]
            data = json.loads(data) if isinstance(data, str) else data
            assert isinstance(data, dict), reply
            if reply["event"] == "pusher:error":  # {"code": int or null, "message": str}
                assert "code" in data and isinstance(data["message"], str), reply
            else:  # pusher:subscription_error {"type", "error", "status"}
                assert "error" in data and "status" in data, reply
            _still_works(ws)
    assert _state(node, presence, public) == before
    assert node.health() == 200


def test_oversize_frame_closes_with_1009(node: NodeProcess) -> None:
    with WsClient(node.ws_url()) as ws:
        ws.send(json.dumps({"event": "client-x", "data": "y" * 200_000}))
        with pytest.raises(ConnectionClosed):
            ws.next_event(lambda f: False, timeout=5)
        print(f"oversize frame: close {ws.ws.close_code} {ws.ws.close_reason!r}")
        assert ws.ws.close_code == 1009
    assert node.health() == 200


def test_too_many_channels_on_one_socket(node: NodeProcess) -> None:
    with WsClient(node.ws_url()) as ws:
        prefix = f"many-{uuid.uuid4().hex[:6]}"
        accepted = 0
        refusal = None
        for i in range(150):
            ws.send(ws.subscribe_frame(f"{prefix}-{i}"))
            frame = ws.next_event(
                lambda f: f.get("event") in (*ERRORS, "pusher_internal:subscription_succeeded"),
                timeout=5,
            )
            if frame["event"] in ERRORS:
                refusal = frame
                break
            accepted += 1
        print(f"accepted {accepted} channels, then: {refusal}")
        assert refusal is not None, "a socket must not hold unbounded channels"
        ws.send({"event": "pusher:unsubscribe", "data": {"channel": f"{prefix}-0"}})
        ws.subscribe(f"{prefix}-again")  # room again after an unsubscribe


def test_client_event_rate_limit_is_an_error_event_not_a_close(node: NodeProcess) -> None:
    channel = f"private-rate-{uuid.uuid4().hex[:6]}"
    with WsClient(node.ws_url()) as sender, WsClient(node.ws_url()) as receiver:
        sender.subscribe(channel)
        receiver.subscribe(channel)
        for i in range(25):
            sender.send({"event": "client-burst", "channel": channel, "data": {"i": i}})
        error = sender.expect("pusher:error", timeout=5)
        assert error["data"]["code"] == 4301
        sender.send({"event": "pusher:ping", "data": {}})
        assert sender.expect("pusher:pong")
        delivered = [f for f in receiver.quiet(1.0) if f.get("event") == "client-burst"]
        print(f"rate limit: {len(delivered)} of 25 delivered")
        assert 1 <= len(delivered) <= 11


# ------------------------------------------------------------------------------- HTTP API


def _events_body(channels: list[str], data: str = "{}") -> bytes:
    return json.dumps({"name": "evil", "channels": channels, "data": data}).encode()


HTTP_CASES: list[tuple[str, dict[str, Any], set[int]]] = [
    ("bad-signature", {"signature": "0" * 64}, {401}),
    ("old-timestamp", {"skew": -700}, {401}),
    ("future-timestamp", {"skew": 700}, {401}),
    ("body-md5-mismatch", {"body_md5": "0" * 32}, {401}),
    ("wrong-key", {"key": "nobody"}, {401}),
    ("wrong-secret", {"secret": "not-the-secret"}, {401}),
    ("wrong-app-id", {"path": "/apps/999/events"}, {401, 404}),
    ("data-too-large", {"data": "x" * 11_000}, {413}),
    ("too-many-channels", {"channels": 101}, {400}),
    ("too-many-batch-events", {"batch": 11}, {400}),
    ("bad-json", {"raw": b'{"name": "evil", "channels": '}, {400}),
    ("json-not-object", {"raw": b"[1, 2]"}, {400}),
    ("data-not-string", {"raw": b'{"name": "evil", "channels": ["c"], "data": {"x": 1}}'}, {400}),
]


@pytest.mark.parametrize(
    ("case", "expected"), [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES]
)
def test_bad_http_request_is_refused_and_changes_nothing(
    node: NodeProcess,
    witness: tuple[WsClient, str, str],
    case: dict[str, Any],
    expected: set[int],
) -> None:
    ws, presence, public = witness
    before = _state(node, presence, public)
    case = dict(case)
    path = case.pop("path", "/apps/1/events")
    if "skew" in case:  # relative to now: the case list is built at collection time
        case["timestamp"] = int(time.time()) + case.pop("skew")
    if "batch" in case:
        count = case.pop("batch")
        path = "/apps/1/batch_events"
        batch = [{"name": "evil", "channel": public, "data": "{}"} for _ in range(count)]
        body = json.dumps({"batch": batch}).encode()
    elif "channels" in case:
        body = _events_body([public] + [f"c{i}" for i in range(case.pop("channels") - 1)])
    elif "raw" in case:
        body = case.pop("raw")
    else:
        body = _events_body([public], case.pop("data", "{}"))
    response = api_request(node.port, "POST", path, body=body, **case)
    print(f"{response.status_code} {response.text[:120]!r}")
    assert response.status_code in expected
    assert [f for f in ws.quiet(0.3) if f.get("event") == "evil"] == [], "nothing delivered"
    assert _state(node, presence, public) == before
    assert node.health() == 200


def test_well_formed_request_through_the_same_helper_succeeds(
    node: NodeProcess, witness: tuple[WsClient, str, str]
) -> None:
    """Guards the cases above: the helper's unbroken request is accepted and delivered."""
    ws, _, public = witness
    response = api_request(node.port, "POST", "/apps/1/events", body=_events_body([public]))
    assert response.status_code == 200, response.text
    assert response.json() == {}
    assert ws.expect("evil", public)["data"] == "{}"
