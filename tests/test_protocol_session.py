"""Tests of gateway.protocol.session: every rule of the per-connection state machine."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import AppConfig
from gateway.protocol.auth import sign_channel, sign_user
from gateway.protocol.limits import Limits
from gateway.protocol.messages import FlatRoster, PresenceMember
from gateway.protocol.session import (
    Action,
    Close,
    Join,
    Leave,
    Publish,
    Send,
    Session,
    SignIn,
)

APP = AppConfig("3", "278d425bdf160c739803", "7ad3773142a6692b25b8")
SOCKET = "1234.1234"
# From /work/shared/vectors/pusher-signing.json (made with the official library).
PRIVATE_AUTH = (
    "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
)
PRESENCE_DATA = '{"user_id":10,"user_info":{"name":"Mr. Channels"}}'
PRESENCE_AUTH = (
    "278d425bdf160c739803:31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80"
)
PY_PRESENCE_DATA = '{"user_id": "1", "user_info": {"name": "Ann"}}'
PY_PRESENCE_AUTH = (
    "278d425bdf160c739803:3894557ca60685c33ae5c83c50154a35d1506dbe898f4124fa8dd29c5518b698"
)
USER_DATA = '{"id":"12345"}'
USER_AUTH = "278d425bdf160c739803:4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba"


def make(now: float = 0.0, **options: Any) -> Session:
    session = Session(app=APP, socket_id=SOCKET, now=now, **options)
    session.open()
    return session


def subscribe(channel: str, auth: str | None = None, channel_data: str | None = None) -> str:
    data: dict[str, Any] = {"channel": channel}
    if auth is not None:
        data["auth"] = auth
    if channel_data is not None:
        data["channel_data"] = channel_data
    return json.dumps({"event": "pusher:subscribe", "data": data})


def unsubscribe(channel: str) -> str:
    return json.dumps({"event": "pusher:unsubscribe", "data": {"channel": channel}})


def signin(user_data: str = USER_DATA, auth: str | None = None) -> str:
    token = auth if auth is not None else sign_user(APP, SOCKET, user_data)
    return json.dumps({"event": "pusher:signin", "data": {"auth": token, "user_data": user_data}})


def client_event(channel: str, event: str = "client-typing", data: Any = None) -> str:
    return json.dumps({"event": event, "channel": channel, "data": data or {"a": 1}})


def frames(actions: list[Action]) -> list[dict[str, Any]]:
    assert all(isinstance(a, Send) for a in actions), actions
    return [json.loads(a.text) for a in actions if isinstance(a, Send)]


def single_error(actions: list[Action]) -> tuple[int | None, str]:
    [frame] = frames(actions)
    assert frame["event"] == "pusher:error"
    return frame["data"]["code"], frame["data"]["message"]


def joined(session: Session, channel: str, roster: dict[str, str | None] | None = None) -> None:
    """Subscribe through the whole Join -> subscribed round trip."""
    if channel.startswith("private-"):
        actions = session.receive_text(subscribe(channel, sign_channel(APP, SOCKET, channel)), 1)
    else:
        actions = session.receive_text(subscribe(channel), 1)
    assert [type(a) for a in actions] == [Join]
    session.subscribed(channel, roster)
    assert channel in session.channels


def state(session: Session) -> tuple[Any, ...]:
    return (session.channels, session.pending_channels, session.user_id, session.closing)


# --- handshake --------------------------------------------------------------------------------


def test_open_sends_connection_established_once() -> None:
    session = Session(app=APP, socket_id=SOCKET, now=0)
    [frame] = frames(session.open())
    assert frame["event"] == "pusher:connection_established"
    assert isinstance(frame["data"], str)
    assert json.loads(frame["data"]) == {"socket_id": SOCKET, "activity_timeout": 120}
    assert session.open() == []


def test_activity_timeout_comes_from_limits() -> None:
    session = Session(app=APP, socket_id=SOCKET, now=0, limits=Limits(activity_timeout=30))
    [frame] = frames(session.open())
    assert json.loads(frame["data"])["activity_timeout"] == 30


def test_nothing_before_connection_established() -> None:
    session = Session(app=APP, socket_id=SOCKET, now=0)
    code, message = single_error(session.receive_text(subscribe("public"), 1))
    assert code is None
    assert "not established" in message
    assert session.pending_channels == frozenset()


def test_read_only_properties() -> None:
    session = make(subscription_count=False)
    assert session.socket_id == SOCKET
    assert session.app == APP
    assert session.user_id is None
    assert session.user is None
    assert session.subscription_count is False
    assert session.limits == Limits()


# --- subscribing ------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, "", "ignored:x"])
@pytest.mark.parametrize("channel", ["public", "cache-x", "a=b@c,d.e;f_g-h"])
def test_public_subscribe(channel: str, auth: str | None) -> None:
    session = make()
    assert session.receive_text(subscribe(channel, auth), 1) == [Join(channel, None)]
    assert session.pending_channels == {channel}
    assert session.channels == frozenset()
    [frame] = frames(session.subscribed(channel, None))
    assert frame == {
        "event": "pusher_internal:subscription_succeeded",
        "channel": channel,
        "data": "{}",
    }
    assert session.channels == {channel}
    assert session.pending_channels == frozenset()


def test_subscribe_data_as_json_string() -> None:
    session = make()
    text = json.dumps({"event": "pusher:subscribe", "data": json.dumps({"channel": "a"})})
    assert session.receive_text(text, 1) == [Join("a", None)]


@pytest.mark.parametrize("channel", ["", "a b", "#x", "a" * 201, "é"])
def test_invalid_channel_name(channel: str) -> None:
    session = make()
    code, message = single_error(session.receive_text(subscribe(channel), 1))
    assert code is None
    assert message
    assert session.pending_channels == frozenset()


def test_private_with_vector_signature() -> None:
    session = make()
    actions = session.receive_text(subscribe("private-foobar", PRIVATE_AUTH), 1)
    assert actions == [Join("private-foobar", None)]


@pytest.mark.parametrize(
    "channel", ["private-x", "private-cache-x", "private-encrypted-x", "private-encrypted-cache-x"]
)
def test_private_and_encrypted_need_valid_auth(channel: str) -> None:
    session = make()
    _, message = single_error(session.receive_text(subscribe(channel), 1))
    assert message == f"Subscription to {channel!r} requires auth"
    _, message = single_error(session.receive_text(subscribe(channel, ""), 1))
    assert "requires auth" in message
    bad = sign_channel(APP, "1.1", channel)
    _, message = single_error(session.receive_text(subscribe(channel, bad), 1))
    assert message.startswith(
        f"Invalid signature: Expected HMAC SHA256 hex digest of {SOCKET}:{channel}"
    )
    wrong_key = "nope:" + bad.split(":")[1]
    _, message = single_error(session.receive_text(subscribe(channel, wrong_key), 1))
    assert message == "Invalid key in subscription auth data: 'nope'"
    assert state(session) == (frozenset(), frozenset(), None, False)
    good = sign_channel(APP, SOCKET, channel)
    assert session.receive_text(subscribe(channel, good), 1) == [Join(channel, None)]


def test_private_with_channel_data_verifies_over_it() -> None:
    session = make()
    token = sign_channel(APP, SOCKET, "private-x", '{"a":1}')
    assert session.receive_text(subscribe("private-x", token, '{"a":1}'), 1) == [
        Join("private-x", None)
    ]


def test_presence_vector_numeric_user_id() -> None:
    session = make()
    actions = session.receive_text(subscribe("presence-foobar", PRESENCE_AUTH, PRESENCE_DATA), 1)
    member = PresenceMember("10", '{"name":"Mr. Channels"}')
    assert actions == [Join("presence-foobar", member)]
    assert session.presence_member("presence-foobar") == member
    [frame] = frames(
        session.subscribed("presence-foobar", {"7": '{"name":"Bo"}', "10": member.user_info})
    )
    assert frame["event"] == "pusher_internal:subscription_succeeded"
    assert frame["channel"] == "presence-foobar"
    assert isinstance(frame["data"], str)
    assert json.loads(frame["data"]) == {
        "presence": {
            "ids": ["7", "10"],
            "hash": {"7": {"name": "Bo"}, "10": {"name": "Mr. Channels"}},
            "count": 2,
        }
    }
    assert session.presence_member("presence-foobar") == member


class _UndecodableRoster(FlatRoster):
    def decode(self) -> dict[str, str | None]:
        raise AssertionError("the join path decoded the flat roster")


def test_presence_flat_roster_is_not_decoded() -> None:
    session = make()
    session.receive_text(subscribe("presence-foobar", PRESENCE_AUTH, PRESENCE_DATA), 1)
    roster = _UndecodableRoster([b"7", b'{"name":"Bo"}', b"8", b""])
    [frame] = frames(session.subscribed("presence-foobar", roster))
    assert json.loads(frame["data"])["presence"] == {
        "ids": ["7", "8", "10"],
        "hash": {"7": {"name": "Bo"}, "8": None, "10": {"name": "Mr. Channels"}},
        "count": 3,
    }


def test_presence_vector_python_spacing_signed_over_exact_text() -> None:
    session = make()
    actions = session.receive_text(
        subscribe("presence-room", PY_PRESENCE_AUTH, PY_PRESENCE_DATA), 1
    )
    assert actions == [Join("presence-room", PresenceMember("1", '{"name":"Ann"}'))]


def test_presence_roster_always_contains_the_subscriber() -> None:
    session = make()
    session.receive_text(subscribe("presence-room", PY_PRESENCE_AUTH, PY_PRESENCE_DATA), 1)
    [frame] = frames(session.subscribed("presence-room", None))
    assert json.loads(frame["data"]) == {
        "presence": {"ids": ["1"], "hash": {"1": {"name": "Ann"}}, "count": 1}
    }


def test_presence_reencoded_channel_data_fails() -> None:
    session = make()
    reencoded = json.dumps(json.loads(PRESENCE_DATA))  # python spacing: different bytes
    _, message = single_error(
        session.receive_text(subscribe("presence-foobar", PRESENCE_AUTH, reencoded), 1)
    )
    assert message.startswith("Invalid signature")


@pytest.mark.parametrize(
    "channel_data",
    [
        "not json",
        "{}",
        '{"user_id":""}',
        '{"user_id":1.5}',
        '{"user_id":"u","user_info":"x"}',
        '{"user_id":"' + "a" * 129 + '"}',
        json.dumps({"user_id": "u", "user_info": {"k": "v" * 2000}}),
    ],
)
def test_presence_bad_channel_data(channel_data: str) -> None:
    session = make()
    token = sign_channel(APP, SOCKET, "presence-a", channel_data)
    code, message = single_error(
        session.receive_text(subscribe("presence-a", token, channel_data), 1)
    )
    assert code is None
    assert "channel_data" in message
    assert session.pending_channels == frozenset()


def test_presence_without_channel_data_needs_signin() -> None:
    session = make()
    token = sign_channel(APP, SOCKET, "presence-a")
    _, message = single_error(session.receive_text(subscribe("presence-a", token), 1))
    assert "requires channel_data or a signed-in connection" in message


def test_presence_signed_in_without_channel_data() -> None:
    session = make()
    user_data = '{"id":"42","user_info":{"name":"Ann"}}'
    session.receive_text(signin(user_data), 1)
    token = sign_channel(APP, SOCKET, "presence-a")
    actions = session.receive_text(subscribe("presence-a", token), 1)
    assert actions == [Join("presence-a", PresenceMember("42", '{"name":"Ann"}'))]
    bad = sign_channel(APP, "9.9", "presence-b")
    _, message = single_error(session.receive_text(subscribe("presence-b", bad), 1))
    assert message.startswith("Invalid signature")


def test_presence_signed_in_user_id_too_long() -> None:
    session = make()
    session.receive_text(signin(json.dumps({"id": "a" * 150})), 1)
    assert session.user_id == "a" * 150
    token = sign_channel(APP, SOCKET, "presence-a")
    _, message = single_error(session.receive_text(subscribe("presence-a", token), 1))
    assert "too long" in message


def test_server_to_user_channel() -> None:
    session = make()
    _, message = single_error(session.receive_text(subscribe("#server-to-user-12345", ""), 1))
    assert "not signed in as that user" in message
    session.receive_text(signin(), 1)
    assert session.receive_text(subscribe("#server-to-user-12345", ""), 1) == [
        Join("#server-to-user-12345", None)
    ]
    _, message = single_error(session.receive_text(subscribe("#server-to-user-999", ""), 1))
    assert "not signed in as that user" in message


def test_duplicate_subscribe_is_idempotent() -> None:
    session = make()
    assert session.receive_text(subscribe("a"), 1) == [Join("a", None)]
    assert session.receive_text(subscribe("a"), 1) == []  # still pending: one success will come
    session.subscribed("a", None)
    [frame] = frames(session.receive_text(subscribe("a"), 1))
    assert frame["event"] == "pusher_internal:subscription_succeeded"
    assert session.channels == {"a"}


def test_duplicate_presence_subscribe_sends_no_join() -> None:
    session = make()
    session.receive_text(subscribe("presence-foobar", PRESENCE_AUTH, PRESENCE_DATA), 1)
    session.subscribed("presence-foobar", None)
    assert session.receive_text(subscribe("presence-foobar", PRESENCE_AUTH, PRESENCE_DATA), 1) == []


def test_duplicate_subscribe_still_checks_auth() -> None:
    session = make()
    joined(session, "private-x")
    _, message = single_error(session.receive_text(subscribe("private-x", "k:bad"), 1))
    assert "Invalid key" in message


def test_max_channels_per_connection() -> None:
    session = make(limits=Limits(max_channels_per_connection=2))
    joined(session, "a")
    session.receive_text(subscribe("b"), 1)
    _, message = single_error(session.receive_text(subscribe("c"), 1))
    assert "at most 2 channels" in message
    session.receive_text(unsubscribe("a"), 1)
    assert session.receive_text(subscribe("c"), 1) == [Join("c", None)]


# --- store answers ----------------------------------------------------------------------------


def test_subscribe_failed_sends_subscription_error() -> None:
    session = make()
    session.receive_text(subscribe("presence-foobar", PRESENCE_AUTH, PRESENCE_DATA), 1)
    [frame] = frames(session.subscribe_failed("presence-foobar", 4100, "Member limit reached"))
    assert frame == {
        "event": "pusher:subscription_error",
        "channel": "presence-foobar",
        "data": {"type": "LimitReached", "error": "Member limit reached", "status": 4100},
    }
    assert session.pending_channels == frozenset()
    assert session.presence_member("presence-foobar") is None
    # The client may try again.
    assert (
        len(session.receive_text(subscribe("presence-foobar", PRESENCE_AUTH, PRESENCE_DATA), 1))
        == 1
    )


def test_subscribe_failed_custom_status_and_type() -> None:
    session = make()
    session.receive_text(subscribe("a"), 1)
    [frame] = frames(session.subscribe_failed("a", 4200, "store down", status=503))
    assert frame["data"] == {"type": "SubscriptionError", "error": "store down", "status": 503}
    session.receive_text(subscribe("b"), 1)
    [frame] = frames(session.subscribe_failed("b", 4100, "x", error_type="Custom"))
    assert frame["data"]["type"] == "Custom"


def test_store_answers_for_unknown_channels_are_ignored() -> None:
    session = make()
    assert session.subscribed("nope", None) == []
    assert session.subscribe_failed("nope", 4100, "x") == []
    joined(session, "a")
    assert session.subscribed("a", None) == []  # a second confirmation
    assert session.subscribe_failed("a", 4100, "x") == []
    assert session.channels == {"a"}


# --- unsubscribing ----------------------------------------------------------------------------


def test_unsubscribe_joined_emits_leave_and_sends_nothing() -> None:
    session = make()
    session.receive_text(subscribe("presence-foobar", PRESENCE_AUTH, PRESENCE_DATA), 1)
    session.subscribed("presence-foobar", None)
    member = PresenceMember("10", '{"name":"Mr. Channels"}')
    assert session.receive_text(unsubscribe("presence-foobar"), 2) == [
        Leave("presence-foobar", member)
    ]
    assert session.channels == frozenset()
    assert session.receive_text(unsubscribe("presence-foobar"), 2) == []


def test_unsubscribe_unknown_sends_nothing() -> None:
    session = make()
    assert session.receive_text(unsubscribe("never"), 1) == []
    assert session.receive_text(unsubscribe("bad name !"), 1) == []


def test_unsubscribe_while_pending_then_store_confirms() -> None:
    session = make()
    session.receive_text(subscribe("a"), 1)
    assert session.receive_text(unsubscribe("a"), 1) == [Leave("a", None)]
    assert session.pending_channels == frozenset()
    # The store finished the join after the leave: undo it, send no success.
    assert session.subscribed("a", None) == [Leave("a", None)]
    assert session.channels == frozenset()
    assert session.subscribed("a", None) == []


def test_unsubscribe_while_pending_then_store_fails() -> None:
    session = make()
    session.receive_text(subscribe("a"), 1)
    session.receive_text(unsubscribe("a"), 1)
    assert session.subscribe_failed("a", 4100, "x") == []
    assert session.subscribed("a", None) == []


def test_resubscribe_after_cancel() -> None:
    session = make()
    session.receive_text(subscribe("a"), 1)
    session.receive_text(unsubscribe("a"), 1)
    assert session.receive_text(subscribe("a"), 1) == [Join("a", None)]
    [frame] = frames(session.subscribed("a", None))
    assert frame["event"] == "pusher_internal:subscription_succeeded"
    assert session.subscribed("a", None) == []
    assert session.channels == {"a"}


def test_malformed_unsubscribe() -> None:
    session = make()
    code, _ = single_error(session.receive_text('{"event":"pusher:unsubscribe","data":{}}', 1))
    assert code is None


# --- closing ----------------------------------------------------------------------------------


def test_closed_leaves_everything_once() -> None:
    session = make()
    joined(session, "a")
    session.receive_text(subscribe("presence-foobar", PRESENCE_AUTH, PRESENCE_DATA), 1)
    member = PresenceMember("10", '{"name":"Mr. Channels"}')
    assert session.closed() == [Leave("a", None), Leave("presence-foobar", member)]
    assert session.closed() == []
    assert session.closing
    assert session.channels == frozenset()
    # A join that lands after the socket died is undone.
    assert session.subscribed("presence-foobar", {"10": None}) == [Leave("presence-foobar", member)]
    assert session.receive_text(subscribe("b"), 2) == []
    assert session.tick(10_000) == []
    assert session.deadline() is None
    assert session.open() == []


# --- client events ----------------------------------------------------------------------------


def test_client_event_on_private_channel() -> None:
    session = make()
    joined(session, "private-x")
    actions = session.receive_text(client_event("private-x", data={"t": "é"}), 2)
    assert actions == [Publish("private-x", "client-typing", '{"t":"\\u00e9"}', None)]


def test_client_event_on_presence_carries_user_id() -> None:
    session = make()
    session.receive_text(subscribe("presence-foobar", PRESENCE_AUTH, PRESENCE_DATA), 1)
    session.subscribed("presence-foobar", None)
    text = json.dumps(
        {"event": "client-x", "channel": "presence-foobar", "data": "hi", "user_id": "spoof"}
    )
    assert session.receive_text(text, 2) == [Publish("presence-foobar", "client-x", "hi", "10")]


@pytest.mark.parametrize(
    ("channel", "fragment"),
    [
        ("public", "only allowed on private and presence"),
        ("cache-x", "only allowed on private and presence"),
        ("private-encrypted-x", "not supported on encrypted"),
        ("#server-to-user-12345", "only allowed on private and presence"),
    ],
)
def test_client_event_wrong_channel_kind(channel: str, fragment: str) -> None:
    session = make()
    session.receive_text(signin(), 1)
    if channel.startswith("private-"):
        session.receive_text(subscribe(channel, sign_channel(APP, SOCKET, channel)), 1)
    else:
        session.receive_text(subscribe(channel, ""), 1)
    session.subscribed(channel, None)
    assert channel in session.channels
    code, message = single_error(session.receive_text(client_event(channel), 2))
    assert code is None
    assert fragment in message


def test_client_event_requires_confirmed_subscription() -> None:
    session = make()
    _, message = single_error(session.receive_text(client_event("private-x"), 1))
    assert "not subscribed" in message
    session.receive_text(subscribe("private-x", sign_channel(APP, SOCKET, "private-x")), 1)
    _, message = single_error(session.receive_text(client_event("private-x"), 1))
    assert "not subscribed" in message


def test_client_event_name_must_start_with_client() -> None:
    session = make()
    joined(session, "private-x")
    _, message = single_error(session.receive_text(client_event("private-x", event="typing"), 2))
    assert "client-" in message


def test_client_events_disabled() -> None:
    session = make(client_events=False)
    joined(session, "private-x")
    _, message = single_error(session.receive_text(client_event("private-x"), 2))
    assert "not enabled" in message


def test_client_event_rate_limit_is_an_error_event_not_a_close() -> None:
    session = make()
    joined(session, "private-x")
    for i in range(10):
        actions = session.receive_text(client_event("private-x"), 10 + i * 0.05)
        assert [type(a) for a in actions] == [Publish]
    code, message = single_error(session.receive_text(client_event("private-x"), 10.6))
    assert code == 4301
    assert "rate limit" in message
    # Rejected events do not count; the window slides.
    code, _ = single_error(session.receive_text(client_event("private-x"), 10.99))
    assert code == 4301
    assert [type(a) for a in session.receive_text(client_event("private-x"), 11.0)] == [Publish]
    assert [type(a) for a in session.receive_text(client_event("private-x"), 11.06)] == [Publish]
    assert not session.closing


def test_client_event_rate_limit_configurable() -> None:
    session = make(limits=Limits(client_events_per_second=1))
    joined(session, "private-x")
    assert len(session.receive_text(client_event("private-x"), 5)) == 1
    code, _ = single_error(session.receive_text(client_event("private-x"), 5.5))
    assert code == 4301


def test_client_event_data_too_large() -> None:
    session = make()
    joined(session, "private-x")
    code, message = single_error(
        session.receive_text(client_event("private-x", data="x" * 10_241), 2)
    )
    assert code is None
    assert "too large" in message
    assert len(session.receive_text(client_event("private-x", data="x" * 10_240), 2)) == 1


# --- heartbeat --------------------------------------------------------------------------------


def test_ping_pong() -> None:
    session = make()
    assert frames(session.receive_text('{"event":"pusher:ping","data":{}}', 1)) == [
        {"event": "pusher:pong", "data": "{}"}
    ]
    assert session.receive_text('{"event":"pusher:pong","data":{}}', 1) == []


def test_tick_pings_then_closes_4201() -> None:
    session = make(now=0)
    assert session.deadline() == 120
    assert session.tick(119.9) == []
    assert frames(session.tick(120)) == [{"event": "pusher:ping", "data": "{}"}]
    assert session.deadline() == 150
    assert session.tick(130) == []
    assert session.tick(149.9) == []
    assert session.tick(150) == [Close(4201, "Pong reply not received")]
    assert session.closing
    assert session.deadline() is None
    assert session.tick(200) == []
    assert session.receive_text('{"event":"pusher:pong"}', 201) == []


@pytest.mark.parametrize(
    "text",
    ['{"event":"pusher:pong","data":{}}', '{"event":"pusher:ping"}', "garbage", '{"event":"x"}'],
)
def test_any_frame_resets_activity(text: str) -> None:
    session = make(now=0)
    assert len(session.tick(120)) == 1
    session.receive_text(text, 140)
    assert session.tick(175) == []
    assert session.deadline() == 260
    assert session.tick(259) == []
    assert len(session.tick(260)) == 1


def test_binary_frame_resets_activity_and_errors() -> None:
    session = make(now=0)
    code, message = single_error(session.receive_binary(100))
    assert code is None
    assert "Binary" in message
    assert session.tick(219) == []


def test_timeouts_from_limits() -> None:
    session = make(now=0, limits=Limits(activity_timeout=10, pong_timeout=5))
    assert len(session.tick(10)) == 1
    assert session.tick(15) == [Close(4201, "Pong reply not received")]


# --- sign-in ----------------------------------------------------------------------------------


def test_signin_with_vector() -> None:
    session = make()
    actions = session.receive_text(signin(USER_DATA, USER_AUTH), 1)
    assert actions[0] == SignIn("12345", USER_DATA)
    assert frames(actions[1:]) == [
        {"event": "pusher:signin_success", "data": {"user_data": USER_DATA}}
    ]
    assert session.user_id == "12345"


def test_signin_python_spacing_vector() -> None:
    session = make()
    user_data = '{"id": "12345"}'
    token = "278d425bdf160c739803:d06dc389319077f890321aeac54e04868921e1601686928f61fc9bf702e92830"
    actions = session.receive_text(signin(user_data, token), 1)
    assert actions[0] == SignIn("12345", user_data)


def test_signin_data_as_string() -> None:
    session = make()
    text = json.dumps(
        {"event": "pusher:signin", "data": json.dumps({"auth": USER_AUTH, "user_data": USER_DATA})}
    )
    assert session.receive_text(text, 1)[0] == SignIn("12345", USER_DATA)


def test_signin_bad_signature() -> None:
    session = make()
    _, message = single_error(
        session.receive_text(signin(USER_DATA, sign_user(APP, "9.9", USER_DATA)), 1)
    )
    assert message.startswith("Invalid signature")
    _, message = single_error(session.receive_text(signin(USER_DATA, "wrong:abc"), 1))
    assert "Invalid key" in message
    assert session.user_id is None


@pytest.mark.parametrize("user_data", ["{}", '{"id":""}', '{"id":5}', "nope", '{"id":"a b"}'])
def test_signin_bad_user_data(user_data: str) -> None:
    session = make()
    code, message = single_error(session.receive_text(signin(user_data), 1))
    assert code is None
    assert "user_data" in message
    assert session.user_id is None


def test_signin_as_another_user_is_refused() -> None:
    session = make()
    session.receive_text(signin('{"id":"a"}'), 1)
    _, message = single_error(session.receive_text(signin('{"id":"b"}'), 1))
    assert "already signed in" in message
    assert session.user_id == "a"


def test_signin_again_as_same_user() -> None:
    session = make()
    session.receive_text(signin('{"id":"a"}'), 1)
    assert (
        frames(session.receive_text(signin('{"id":"a"}'), 1))[0]["event"] == "pusher:signin_success"
    )
    actions = session.receive_text(signin('{"id":"a","user_info":{"n":1}}'), 1)
    assert actions[0] == SignIn("a", '{"id":"a","user_info":{"n":1}}')
    assert session.user is not None
    assert session.user.user_info == '{"n":1}'


def test_signin_watchlist_over_limit_warns_4302() -> None:
    session = make()
    user_data = json.dumps({"id": "a", "watchlist": [str(i) for i in range(101)]})
    actions = session.receive_text(signin(user_data), 1)
    assert actions[0] == SignIn("a", user_data)
    sent = frames(actions[1:])
    assert sent[0]["event"] == "pusher:signin_success"
    assert sent[1] == {
        "event": "pusher:error",
        "data": {
            "code": 4302,
            "message": "Watchlist limit exceeded: only the first 100 user ids are watched",
        },
    }
    assert session.user is not None
    assert len(session.user.watchlist) == 100


# --- malformed input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "{",
        "[1,2]",
        '{"event":null}',
        '{"event":"pusher:subscribe"}',
        '{"event":"pusher:subscribe","data":"{"}',
        '{"event":"pusher:subscribe","data":{"channel":["a"]}}',
        '{"event":"pusher:signin","data":{"auth":1}}',
        '{"event":"pusher:whatever"}',
        '{"event":"pusher_internal:subscription_succeeded","channel":"a"}',
        '{"event":"other","channel":"a"}',
        '{"event":"client-x"}',
        "x" * 40_000,
    ],
)
def test_malformed_input_gets_error_and_changes_nothing(text: str) -> None:
    session = make()
    joined(session, "a")
    before = state(session)
    code, message = single_error(session.receive_text(text, 5))
    assert code is None
    assert message
    assert state(session) == before


# --- property tests ---------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.lists(st.text(max_size=300), max_size=10))
def test_random_text_never_raises_and_never_joins(texts: list[str]) -> None:
    session = make()
    for text in texts:
        for action in session.receive_text(text, 1):
            assert isinstance(action, Send)
            json.loads(action.text)
            action.text.encode()


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
CHANNELS = [
    "public",
    "cache-c",
    "private-p",
    "private-encrypted-e",
    "presence-r",
    "#server-to-user-u1",
    "bad name",
    "",
    "#x",
]
EVENTS = [
    "pusher:subscribe",
    "pusher:unsubscribe",
    "pusher:signin",
    "pusher:ping",
    "pusher:pong",
    "client-x",
    "other",
    "pusher:foo",
]


@st.composite
def frames_strategy(draw: st.DrawFn) -> str:
    event = draw(st.sampled_from(EVENTS) | st.text(max_size=10))
    channel = draw(st.sampled_from(CHANNELS) | st.text(max_size=10) | json_values)
    channel_data = draw(
        st.none()
        | st.sampled_from(['{"user_id":"u1"}', '{"user_id":2,"user_info":{"a":1}}', "{}", "x"])
        | json_values
    )
    valid_auth = isinstance(channel, str) and draw(st.booleans())
    if valid_auth:
        assert isinstance(channel, str)
        data_text = channel_data if isinstance(channel_data, str) else None
        auth: Any = sign_channel(APP, SOCKET, channel, data_text)
    else:
        auth = draw(st.none() | st.just("") | st.text(max_size=20) | json_values)
    data: Any = {"channel": channel, "auth": auth, "channel_data": channel_data}
    if event == "pusher:signin":
        user_data = draw(
            st.sampled_from(['{"id":"u1"}', '{"id":"u2","user_info":{"n":1}}', "{}"])
            | st.text(max_size=10)
        )
        data = {
            "user_data": user_data,
            "auth": sign_user(APP, SOCKET, user_data) if draw(st.booleans()) else auth,
        }
    if draw(st.booleans()):
        data = {k: v for k, v in data.items() if draw(st.booleans())}
    if draw(st.booleans()):
        data = json.dumps(data)
    body: dict[str, Any] = {"event": event, "data": data}
    if event.startswith("client-"):
        body = {"event": event, "channel": channel, "data": draw(json_values)}
    return json.dumps(body)


def _expected_join_allowed(frame: dict[str, Any], session_user: str | None) -> bool:
    data = frame["data"]
    if isinstance(data, str):
        data = json.loads(data)
    channel: str = data["channel"]
    auth = data.get("auth") or ""
    channel_data = data.get("channel_data")
    if channel.startswith("#server-to-user-"):
        return channel == f"#server-to-user-{session_user}"
    if channel.startswith(("private-", "presence-")):
        if channel.startswith("presence-") and channel_data is None:
            return session_user is not None and auth == sign_channel(APP, SOCKET, channel)
        return auth == sign_channel(APP, SOCKET, channel, channel_data)
    return True


@settings(max_examples=500)
@given(st.lists(frames_strategy(), max_size=12), st.randoms(use_true_random=False))
def test_structured_fuzz(texts: list[str], rnd: Any) -> None:
    session = make()
    for i, text in enumerate(texts):
        user_before = session.user_id
        actions = session.receive_text(text, float(i))
        frame = json.loads(text)
        for action in actions:
            if isinstance(action, Join):
                assert frame["event"] == "pusher:subscribe"
                data = (
                    frame["data"] if isinstance(frame["data"], dict) else json.loads(frame["data"])
                )
                assert action.channel == data["channel"]
                assert _expected_join_allowed(frame, user_before)
                assert (action.member is not None) is action.channel.startswith("presence-")
            elif isinstance(action, SignIn):
                assert frame["event"] == "pusher:signin"
            elif isinstance(action, Publish):
                assert action.channel in session.channels
                assert frame["event"].startswith("client-")
            elif isinstance(action, Leave):
                assert frame["event"] == "pusher:unsubscribe"
            else:
                assert isinstance(action, Send)
                action.text.encode()
        # The store answers some joins at random.
        for channel in sorted(session.pending_channels):
            choice = rnd.random()
            if choice < 0.4:
                session.subscribed(channel, {"x": None})
            elif choice < 0.6:
                session.subscribe_failed(channel, 4100, "full")
        assert not (session.channels & session.pending_channels)
        assert (
            len(session.channels | session.pending_channels)
            <= session.limits.max_channels_per_connection
        )
    held = session.channels | session.pending_channels
    left = session.closed()
    assert all(isinstance(a, Leave) for a in left)
    assert {a.channel for a in left if isinstance(a, Leave)} == held


# --- subscription rate ------------------------------------------------------------------------


def test_subscription_rate_limit_is_a_subscription_error() -> None:
    session = make(limits=Limits(subscribes_per_second=2, subscribe_burst=3))
    for i in range(3):
        assert [type(a) for a in session.receive_text(subscribe(f"c{i}"), 1.0)] == [Join]
    (refused,) = session.receive_text(subscribe("c3"), 1.0)
    assert isinstance(refused, Send)
    frame = json.loads(refused.text)
    assert frame["event"] == "pusher:subscription_error" and frame["channel"] == "c3"
    assert frame["data"]["status"] == 4301 and frame["data"]["type"] == "LimitReached"
    assert "c3" not in session.pending_channels and not session.closing
    # A repeated subscribe of a pending or joined channel costs nothing.
    assert session.receive_text(subscribe("c0"), 1.0) == []
    # Tokens come back at the rate: one every half second.
    assert [type(a) for a in session.receive_text(subscribe("c3"), 1.5)] == [Join]
    assert isinstance(session.receive_text(subscribe("c4"), 1.6)[0], Send)
    # Unsubscribing and subscribing again is a new subscription: it is counted.
    session.receive_text(unsubscribe("c0"), 2.0)
    assert [type(a) for a in session.receive_text(subscribe("c0"), 2.1)] == [Join]
    assert isinstance(session.receive_text(subscribe("c5"), 2.1)[0], Send)
