"""Tests of gateway.protocol.http_api: routing and validation of HTTP API requests."""

from __future__ import annotations

import json
from typing import Any

import pusher
import pytest

from gateway.protocol.errors import ApiError
from gateway.protocol.http_api import (
    BatchRequest,
    ChannelQuery,
    ChannelsQuery,
    Endpoint,
    Route,
    TriggerRequest,
    parse_batch,
    parse_channel_query,
    parse_channels_query,
    parse_terminate_request,
    parse_trigger,
    parse_users_request,
    route,
)
from gateway.protocol.limits import Limits


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def status(result: object) -> int:
    assert isinstance(result, ApiError), result
    return result.status


# --- routing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/apps/3/events", Route(Endpoint.TRIGGER, "3")),
        ("POST", "/apps/3/batch_events", Route(Endpoint.BATCH, "3")),
        ("GET", "/apps/3/channels", Route(Endpoint.CHANNELS, "3")),
        ("GET", "/apps/3/channels/presence-a", Route(Endpoint.CHANNEL, "3", channel="presence-a")),
        (
            "GET",
            "/apps/3/channels/presence-a/users",
            Route(Endpoint.USERS, "3", channel="presence-a"),
        ),
        (
            "GET",
            "/apps/3/channels/%23server-to-user-1",
            Route(Endpoint.CHANNEL, "3", channel="#server-to-user-1"),
        ),
        ("POST", "/users/42/terminate_connections", Route(Endpoint.TERMINATE, None, user_id="42")),
        (
            "POST",
            "/apps/3/users/42/terminate_connections",
            Route(Endpoint.TERMINATE, "3", user_id="42"),
        ),
        ("post", "/apps/3/events", Route(Endpoint.TRIGGER, "3")),
    ],
)
def test_route(method: str, path: str, expected: Route) -> None:
    assert route(method, path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/",
        "apps/3/events",
        "/apps/3/events/",
        "/apps//events",
        "/apps/3",
        "/apps/3/nope",
        "/apps/3/channels/a/b/c",
        "/apps/3/channels/a/events",
        "/users/42",
        "/metrics2",
        "/apps/3/channels/%ff",
    ],
)
def test_route_404(path: str) -> None:
    assert status(route("POST", path)) == 404
    assert status(route("GET", path)) == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/apps/3/events"),
        ("GET", "/apps/3/batch_events"),
        ("POST", "/apps/3/channels"),
        ("DELETE", "/apps/3/channels/a"),
        ("POST", "/apps/3/channels/presence-a/users"),
        ("GET", "/users/42/terminate_connections"),
        ("PUT", "/apps/3/users/42/terminate_connections"),
    ],
)
def test_route_405(method: str, path: str) -> None:
    result = route(method, path)
    assert status(result) == 405
    assert isinstance(result, ApiError)
    assert method in result.message


# --- POST events ------------------------------------------------------------------------------


def test_trigger_full() -> None:
    request = parse_trigger(
        body(
            {
                "name": "my-event",
                "channels": ["a", "presence-b", "a"],
                "data": '{"x":1}',
                "socket_id": "123.456",
                "info": "user_count,subscription_count",
                "extra": True,
            }
        )
    )
    assert request == TriggerRequest(
        "my-event",
        '{"x":1}',
        ("a", "presence-b"),
        "123.456",
        frozenset({"user_count", "subscription_count"}),
    )


def test_trigger_single_channel_and_server_to_user() -> None:
    assert parse_trigger(
        body({"name": "e", "channel": "#server-to-user-42", "data": ""})
    ) == TriggerRequest("e", "", ("#server-to-user-42",))


def test_trigger_socket_id_null_is_absent() -> None:
    request = parse_trigger(body({"name": "e", "channels": ["a"], "data": "d", "socket_id": None}))
    assert isinstance(request, TriggerRequest)
    assert request.socket_id is None


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"channels": ["a"], "data": "d"}, "name"),
        ({"name": "", "channels": ["a"], "data": "d"}, "name"),
        ({"name": 5, "channels": ["a"], "data": "d"}, "name"),
        ({"name": "e" * 201, "channels": ["a"], "data": "d"}, "too long"),
        ({"name": "e", "channels": ["a"]}, "data"),
        ({"name": "e", "channels": ["a"], "data": {"x": 1}}, "data must be a string"),
        ({"name": "e", "data": "d"}, "Missing 'channels'"),
        ({"name": "e", "channels": [], "data": "d"}, "must not be empty"),
        ({"name": "e", "channels": "a", "data": "d"}, "list"),
        ({"name": "e", "channels": [1], "data": "d"}, "strings"),
        ({"name": "e", "channels": ["a"], "channel": "a", "data": "d"}, "not both"),
        ({"name": "e", "channels": ["bad name"], "data": "d"}, "invalid character"),
        ({"name": "e", "channels": ["#other"], "data": "d"}, "reserved"),
        (
            {"name": "e", "channels": [str(i) for i in range(101)], "data": "d"},
            "Too many channels (101, max 100)",
        ),
        ({"name": "e", "channels": ["a"], "data": "d", "socket_id": "abc"}, "socket_id"),
        ({"name": "e", "channels": ["a"], "data": "d", "socket_id": "1.2.3"}, "socket_id"),
        ({"name": "e", "channels": ["a"], "data": "d", "socket_id": 1.2}, "socket_id"),
        (
            {"name": "e", "channels": ["a"], "data": "d", "info": "cache"},
            "Unsupported info attribute 'cache'",
        ),
        ({"name": "e", "channels": ["a"], "data": "d", "info": 5}, "info"),
    ],
)
def test_trigger_400(payload: dict[str, Any], fragment: str) -> None:
    result = parse_trigger(body(payload))
    assert status(result) == 400
    assert isinstance(result, ApiError)
    assert fragment in result.message


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"[]", b'"x"', b"\xff", b'{"name":NaN}', b'{"data":"\\ud800"}']
)
def test_trigger_bad_body(raw: bytes) -> None:
    assert status(parse_trigger(raw)) == 400


def test_trigger_100_channels_ok() -> None:
    request = parse_trigger(
        body({"name": "e", "channels": [str(i) for i in range(100)], "data": "d"})
    )
    assert isinstance(request, TriggerRequest)
    assert len(request.channels) == 100


def test_trigger_data_limit_is_413() -> None:
    assert isinstance(
        parse_trigger(body({"name": "e", "channel": "a", "data": "x" * 10_240})), TriggerRequest
    )
    result = parse_trigger(body({"name": "e", "channel": "a", "data": "x" * 10_241}))
    assert status(result) == 413
    result = parse_trigger(body({"name": "e", "channel": "a", "data": "é" * 5_121}))
    assert status(result) == 413
    assert (
        status(
            parse_trigger(
                body({"name": "e", "channel": "a", "data": "x" * 11}),
                Limits(max_event_data_bytes=10),
            )
        )
        == 413
    )


def test_trigger_subscription_count_feature_gate() -> None:
    payload = body({"name": "e", "channel": "a", "data": "d", "info": "subscription_count"})
    assert isinstance(parse_trigger(payload), TriggerRequest)
    assert status(parse_trigger(payload, subscription_count_enabled=False)) == 400


# --- POST batch_events ------------------------------------------------------------------------


def test_batch() -> None:
    result = parse_batch(
        body(
            {
                "batch": [
                    {"channel": "c1", "name": "e1", "data": "x"},
                    {
                        "channel": "c2",
                        "name": "e2",
                        "data": "y",
                        "socket_id": "1.2",
                        "info": "subscription_count",
                    },
                ]
            }
        )
    )
    assert result == BatchRequest(
        (
            TriggerRequest("e1", "x", ("c1",)),
            TriggerRequest("e2", "y", ("c2",), "1.2", frozenset({"subscription_count"})),
        )
    )
    assert parse_batch(body({"batch": []})) == BatchRequest(())


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({}, "batch must be a list"),
        ({"batch": {}}, "batch must be a list"),
        (
            {"batch": [{"channel": "c", "name": "e", "data": "d"}] * 11},
            "Batch too large (11 events, max 10)",
        ),
        ({"batch": [1]}, "batch[0]"),
        (
            {"batch": [{"channel": "c", "name": "e", "data": "d"}, {"name": "e", "data": "d"}]},
            "batch[1]: channel",
        ),
        ({"batch": [{"channels": ["c"], "name": "e", "data": "d"}]}, "single 'channel'"),
        ({"batch": [{"channel": "c", "name": "e", "data": 1}]}, "data must be a string"),
    ],
)
def test_batch_400(payload: dict[str, Any], fragment: str) -> None:
    result = parse_batch(body(payload))
    assert status(result) == 400
    assert isinstance(result, ApiError)
    assert fragment in result.message


def test_batch_413_names_the_index() -> None:
    result = parse_batch(
        body(
            {
                "batch": [
                    {"channel": "c", "name": "e", "data": "d"},
                    {"channel": "c", "name": "e", "data": "x" * 10_241},
                ]
            }
        )
    )
    assert result == ApiError(413, "batch[1]: Event data too large (10241 bytes, max 10240)")


# --- GET channels / channel / users -----------------------------------------------------------


def test_channels_query() -> None:
    assert parse_channels_query({}) == ChannelsQuery()
    assert parse_channels_query({"filter_by_prefix": "private-"}) == ChannelsQuery("private-")
    assert parse_channels_query(
        {"filter_by_prefix": "presence-", "info": "user_count"}
    ) == ChannelsQuery("presence-", frozenset({"user_count"}))
    assert parse_channels_query(
        {"filter_by_prefix": "presence-room-", "info": "user_count"}
    ) == ChannelsQuery("presence-room-", frozenset({"user_count"}))
    assert parse_channels_query({"info": "", "auth_key": "k"}) == ChannelsQuery()


@pytest.mark.parametrize(
    "query",
    [
        {"info": "user_count"},
        {"filter_by_prefix": "private-", "info": "user_count"},
        {"filter_by_prefix": "presence-", "info": "subscription_count"},
        {"filter_by_prefix": "presence-", "info": "user_count,cache"},
    ],
)
def test_channels_query_400(query: dict[str, str]) -> None:
    assert status(parse_channels_query(query)) == 400


@pytest.mark.parametrize(
    ("channel", "info"),
    [
        ("presence-a", "user_count"),
        ("a", "subscription_count"),
        ("private-a", "subscription_count"),
        ("cache-a", "cache,subscription_count"),
        ("presence-cache-a", "user_count,cache"),
        ("private-encrypted-cache-a", "cache"),
        ("a", ""),
    ],
)
def test_channel_query(channel: str, info: str) -> None:
    expected = frozenset(a for a in info.split(",") if a)
    assert parse_channel_query(channel, {"info": info}) == ChannelQuery(channel, expected)


@pytest.mark.parametrize(
    ("channel", "info"),
    [
        ("a", "user_count"),
        ("private-a", "user_count"),
        ("presence-a", "subscription_count"),
        ("a", "cache"),
        ("presence-a", "cache"),
        ("a", "occupied"),
        ("bad name", ""),
    ],
)
def test_channel_query_400(channel: str, info: str) -> None:
    assert status(parse_channel_query(channel, {"info": info})) == 400


def test_channel_query_subscription_count_gate() -> None:
    assert (
        status(
            parse_channel_query(
                "a", {"info": "subscription_count"}, subscription_count_enabled=False
            )
        )
        == 400
    )


def test_users_request() -> None:
    assert parse_users_request("presence-a") == "presence-a"
    assert parse_users_request("presence-cache-a") == "presence-cache-a"
    for channel in ["a", "private-a", "cache-a", "bad name"]:
        assert status(parse_users_request(channel)) == 400


def test_terminate_request() -> None:
    assert parse_terminate_request("42") == "42"
    for user_id in ["", "a b", "x" * 201]:
        assert status(parse_terminate_request(user_id)) == 400


# --- bodies built by the official library -----------------------------------------------------


@pytest.fixture
def client() -> Any:
    return pusher.Pusher(app_id="3", key="key", secret="secret")._pusher_client


def test_official_trigger_body(client: Any) -> None:
    request = client.trigger.make_request(["a", "presence-b"], "ev", {"x": "é"}, "1.2")
    assert route(request.method, request.path) == Route(Endpoint.TRIGGER, "3")
    parsed = parse_trigger(request.body)
    assert parsed == TriggerRequest("ev", '{"x": "é"}', ("a", "presence-b"), "1.2")


def test_official_batch_body(client: Any) -> None:
    request = client.trigger_batch.make_request([{"channel": "c", "name": "e", "data": {"k": 1}}])
    assert route(request.method, request.path) == Route(Endpoint.BATCH, "3")
    assert parse_batch(request.body) == BatchRequest((TriggerRequest("e", '{"k": 1}', ("c",)),))


def test_official_query_requests(client: Any) -> None:
    request = client.channels_info.make_request("presence-", ["user_count"])
    assert route(request.method, request.path) == Route(Endpoint.CHANNELS, "3")
    assert parse_channels_query(request.query_params) == ChannelsQuery(
        "presence-", frozenset({"user_count"})
    )
    request = client.channel_info.make_request("presence-x", ["user_count"])
    found = route(request.method, request.path)
    assert found == Route(Endpoint.CHANNEL, "3", channel="presence-x")
    assert parse_channel_query("presence-x", request.query_params) == ChannelQuery(
        "presence-x", frozenset({"user_count"})
    )
    request = client.users_info.make_request("presence-x")
    assert route(request.method, request.path) == Route(Endpoint.USERS, "3", channel="presence-x")
    request = client.terminate_user_connections.make_request("42")
    assert route(request.method, request.path) == Route(Endpoint.TERMINATE, None, user_id="42")
