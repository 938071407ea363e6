"""Tests of gateway.protocol.messages: client frame parsing and server frame serialization."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import messages as m
from gateway.protocol.errors import FrameError
from gateway.protocol.limits import Limits


def frame(event: str, data: Any = None, **extra: Any) -> str:
    body: dict[str, Any] = {"event": event, **extra}
    if data is not None:
        body["data"] = data
    return json.dumps(body, ensure_ascii=False)


# --- parsing ----------------------------------------------------------------------------------


def test_ping_pong() -> None:
    assert m.parse_client_message('{"event":"pusher:ping","data":{}}') == m.ClientPing()
    assert m.parse_client_message('{"event":"pusher:ping"}') == m.ClientPing()
    assert m.parse_client_message('{"event":"pusher:pong","data":"{}"}') == m.ClientPong()


@pytest.mark.parametrize("as_string", [False, True])
def test_subscribe_data_object_or_string(as_string: bool) -> None:
    data = {"channel": "presence-a", "auth": "k:s", "channel_data": '{"user_id": 1}'}
    payload = json.dumps(data) if as_string else data
    assert m.parse_client_message(frame("pusher:subscribe", payload)) == m.ClientSubscribe(
        "presence-a", "k:s", '{"user_id": 1}'
    )


def test_subscribe_auth_optional() -> None:
    parsed = m.parse_client_message(frame("pusher:subscribe", {"channel": "a"}))
    assert parsed == m.ClientSubscribe("a", "", None)
    parsed = m.parse_client_message(frame("pusher:subscribe", {"channel": "a", "auth": None}))
    assert parsed == m.ClientSubscribe("a", "", None)


@pytest.mark.parametrize(
    "data",
    [
        None,
        "not json",
        "[1]",
        [],
        {"auth": ""},
        {"channel": 5},
        {"channel": "a", "auth": 5},
        {"channel": "a", "channel_data": {"user_id": "1"}},
    ],
)
def test_subscribe_strict_types(data: Any) -> None:
    parsed = m.parse_client_message(frame("pusher:subscribe", data))
    assert isinstance(parsed, FrameError)
    assert parsed.code is None
    assert parsed.message.startswith("pusher:subscribe")


@pytest.mark.parametrize("as_string", [False, True])
def test_unsubscribe(as_string: bool) -> None:
    data = {"channel": "a"}
    parsed = m.parse_client_message(
        frame("pusher:unsubscribe", json.dumps(data) if as_string else data)
    )
    assert parsed == m.ClientUnsubscribe("a")
    assert isinstance(m.parse_client_message(frame("pusher:unsubscribe", {})), FrameError)


@pytest.mark.parametrize("as_string", [False, True])
def test_signin(as_string: bool) -> None:
    data = {"auth": "k:s", "user_data": '{"id":"1"}'}
    parsed = m.parse_client_message(frame("pusher:signin", json.dumps(data) if as_string else data))
    assert parsed == m.ClientSignin("k:s", '{"id":"1"}')


@pytest.mark.parametrize(
    "data",
    [
        {"auth": "k:s"},
        {"user_data": "{}"},
        {"auth": "", "user_data": "{}"},
        {"auth": "k:s", "user_data": {"id": "1"}},
    ],
)
def test_signin_strict(data: Any) -> None:
    assert isinstance(m.parse_client_message(frame("pusher:signin", data)), FrameError)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"a": 1, "b": [1, 2]}, '{"a":1,"b":[1,2]}'),
        ("raw string", "raw string"),
        ('{"x": 1}', '{"x": 1}'),
        (5, "5"),
        ([1, "é"], '[1,"\\u00e9"]'),
    ],
)
def test_client_event_data(data: Any, expected: str) -> None:
    parsed = m.parse_client_message(frame("client-x", data, channel="private-a"))
    assert parsed == m.ClientEvent("client-x", "private-a", expected)


def test_client_event_missing_data_is_null() -> None:
    parsed = m.parse_client_message('{"event":"client-x","channel":"private-a"}')
    assert parsed == m.ClientEvent("client-x", "private-a", "null")


def test_client_event_limits() -> None:
    limits = Limits(max_event_data_bytes=10, max_event_name_length=12)
    ok = m.parse_client_message(frame("client-x", "a" * 10, channel="c"), limits)
    assert isinstance(ok, m.ClientEvent)
    big = m.parse_client_message(frame("client-x", "a" * 11, channel="c"), limits)
    assert isinstance(big, FrameError)
    assert "data too large (11 bytes, max 10)" in big.message
    multibyte = m.parse_client_message(frame("client-x", "é" * 6, channel="c"), limits)
    assert isinstance(multibyte, FrameError)
    long_name = m.parse_client_message(frame("client-xxxxxx", "a", channel="c"), limits)
    assert isinstance(long_name, FrameError)
    assert "Event name too long" in long_name.message


def test_client_event_requires_channel() -> None:
    assert isinstance(m.parse_client_message(frame("client-x", "a")), FrameError)
    assert isinstance(m.parse_client_message(frame("client-x", "a", channel=1)), FrameError)


def test_client_user_id_is_ignored() -> None:
    parsed = m.parse_client_message(frame("client-x", "a", channel="c", user_id="spoof"))
    assert parsed == m.ClientEvent("client-x", "c", "a")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "Invalid JSON"),
        ("{", "Invalid JSON"),
        ("[]", "expected a JSON object"),
        ('"x"', "expected a JSON object"),
        ("{}", "'event' must be a string"),
        ('{"event":1}', "'event' must be a string"),
        ('{"event":"pusher:nope"}', "Unsupported event 'pusher:nope'"),
        ('{"event":"pusher_internal:member_added"}', "Unsupported event"),
        ('{"event":"my-event","channel":"a"}', "must start with 'client-'"),
        ('{"event":"client-x","channel":"a","data":NaN}', "Invalid JSON"),
        ('{"event":"client-x","channel":"a","data":Infinity}', "Invalid JSON"),
        ('{"event":"client-x","channel":"a","data":"\\ud800"}', "Invalid JSON"),
        ("[" * 100_000, "Message too large"),
        ("[" * 15_000 + "]" * 15_000, "Invalid JSON"),
    ],
)
def test_malformed_frames(text: str, fragment: str) -> None:
    parsed = m.parse_client_message(text)
    assert isinstance(parsed, FrameError)
    assert parsed.code is None
    assert fragment in parsed.message


def test_frame_size_limit_counts_utf8_bytes() -> None:
    limits = Limits(max_frame_bytes=45)
    text = frame("pusher:ping", "é" * 6)
    assert len(text) <= 45 < len(text.encode())
    assert isinstance(m.parse_client_message(text, limits), FrameError)
    assert m.parse_client_message(frame("pusher:ping", "e" * 6), limits) == m.ClientPing()


@given(st.text(max_size=200))
def test_parse_never_raises(text: str) -> None:
    m.parse_client_message(text)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_client_event_data_round_trips(data: Any) -> None:
    parsed = m.parse_client_message(json.dumps({"event": "client-x", "channel": "c", "data": data}))
    assert isinstance(parsed, m.ClientEvent)
    assert parsed.data.isascii() or isinstance(data, str)
    if not isinstance(data, str):
        assert json.loads(parsed.data) == data


# --- channel_data and user_data ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "member"),
    [
        (
            '{"user_id":10,"user_info":{"name":"Mr. Channels"}}',
            m.PresenceMember("10", '{"name":"Mr. Channels"}'),
        ),
        ('{"user_id": "1", "user_info": {"name": "Ann"}}', m.PresenceMember("1", '{"name":"Ann"}')),
        ('{"user_id":"u"}', m.PresenceMember("u", None)),
        ('{"user_id":"u","user_info":null}', m.PresenceMember("u", None)),
        ('{"user_id":"u","user_info":{"n":"é"}}', m.PresenceMember("u", '{"n":"\\u00e9"}')),
        ('{"user_id":-3}', m.PresenceMember("-3", None)),
    ],
)
def test_parse_channel_data(text: str, member: m.PresenceMember) -> None:
    assert m.parse_channel_data(text) == member


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nope",
        "[]",
        "{}",
        '{"user_id":""}',
        '{"user_id":null}',
        '{"user_id":true}',
        '{"user_id":1.5}',
        '{"user_id":["1"]}',
        '{"user_id":"u","user_info":"str"}',
        '{"user_id":"u","user_info":[1]}',
        '{"user_id":"' + "a" * 129 + '"}',
    ],
)
def test_parse_channel_data_rejects(text: str) -> None:
    assert isinstance(m.parse_channel_data(text), FrameError)


def test_channel_data_limits() -> None:
    assert m.parse_channel_data('{"user_id":"' + "a" * 128 + '"}') == m.PresenceMember("a" * 128)
    info = {"k": "v" * 1016}  # {"k":"..."} = 1024 bytes
    assert len(json.dumps(info, separators=(",", ":"))) == 1024
    assert isinstance(
        m.parse_channel_data(json.dumps({"user_id": 1, "user_info": info})), m.PresenceMember
    )
    info = {"k": "v" * 1017}
    error = m.parse_channel_data(json.dumps({"user_id": 1, "user_info": info}))
    assert isinstance(error, FrameError)
    assert "user_info too large (1025 bytes as JSON, max 1024)" in error.message


def test_user_info_limit_counts_the_stored_text() -> None:
    # Regression: the limit was checked on UTF-8 before escaping, so 1 000 non-ASCII
    # characters (2-3 bytes each) were stored as ~6 000 bytes of \uXXXX escapes.
    info = {"k": "\u00e9" * 300}  # 600 bytes of UTF-8, 1 808 bytes as stored
    error = m.parse_channel_data(json.dumps({"user_id": 1, "user_info": info}))
    assert isinstance(error, FrameError)
    assert "user_info too large (1808 bytes as JSON, max 1024)" in error.message
    fits = {"k": "\u00e9" * 150}  # 908 bytes as stored
    member = m.parse_channel_data(json.dumps({"user_id": 1, "user_info": fits}))
    assert isinstance(member, m.PresenceMember)
    assert member.user_info is not None and len(member.user_info) <= 1024


def test_parse_user_data() -> None:
    assert m.parse_user_data('{"id":"42"}') == m.UserData("42")
    parsed = m.parse_user_data('{"id":"42","user_info":{"a":1},"watchlist":["1","2"]}')
    assert parsed == m.UserData("42", '{"a":1}', ("1", "2"), False)
    many = json.dumps({"id": "42", "watchlist": [str(i) for i in range(150)]})
    parsed = m.parse_user_data(many)
    assert isinstance(parsed, m.UserData)
    assert parsed.watchlist == tuple(str(i) for i in range(100))
    assert parsed.watchlist_truncated


@pytest.mark.parametrize(
    "text",
    [
        "x",
        "[]",
        "{}",
        '{"id":""}',
        '{"id":42}',
        '{"id":"a b"}',
        '{"id":"' + "a" * 201 + '"}',
        '{"id":"a","user_info":5}',
        '{"id":"a","watchlist":"1"}',
        '{"id":"a","watchlist":[1]}',
    ],
)
def test_parse_user_data_rejects(text: str) -> None:
    assert isinstance(m.parse_user_data(text), FrameError)


# --- serialization ----------------------------------------------------------------------------


def decode(text: str) -> dict[str, Any]:
    assert text.isascii()
    assert (", " not in text and ": " not in text) or '"' in text  # compact separators
    value = json.loads(text)
    assert isinstance(value, dict)
    return value


def test_connection_established_has_string_data() -> None:
    text = m.connection_established("123.456", 120)
    assert text == (
        '{"event":"pusher:connection_established",'
        '"data":"{\\"socket_id\\":\\"123.456\\",\\"activity_timeout\\":120}"}'
    )
    assert json.loads(decode(text)["data"]) == {"socket_id": "123.456", "activity_timeout": 120}


def test_error_has_object_data() -> None:
    assert (
        m.error(4301, "slow down")
        == '{"event":"pusher:error","data":{"code":4301,"message":"slow down"}}'
    )
    assert decode(m.error(None, "é"))["data"] == {"code": None, "message": "é"}


def test_ping_pong_frames() -> None:
    assert json.loads(m.PING) == {"event": "pusher:ping", "data": "{}"}
    assert json.loads(m.PONG) == {"event": "pusher:pong", "data": "{}"}


def test_subscription_succeeded() -> None:
    assert m.subscription_succeeded("private-a") == (
        '{"event":"pusher_internal:subscription_succeeded","channel":"private-a","data":"{}"}'
    )


def test_presence_roster() -> None:
    roster = {"1": '{"name":"Ann"}', "2": None, "é": "{}"}
    data = m.presence_data(roster)
    assert json.loads(data) == {
        "presence": {
            "ids": ["1", "2", "é"],
            "hash": {"1": {"name": "Ann"}, "2": None, "é": {}},
            "count": 3,
        }
    }
    frame_ = decode(m.subscription_succeeded("presence-a", data))
    assert frame_["channel"] == "presence-a"
    assert json.loads(frame_["data"])["presence"]["count"] == 3
    assert json.loads(m.presence_data({})) == {"presence": {"ids": [], "hash": {}, "count": 0}}


def test_member_frames() -> None:
    added = decode(m.member_added("presence-a", "7", '{"n":1}'))
    assert added["event"] == "pusher_internal:member_added"
    assert json.loads(added["data"]) == {"user_id": "7", "user_info": {"n": 1}}
    assert json.loads(decode(m.member_added("presence-a", "7", None))["data"]) == {
        "user_id": "7",
        "user_info": None,
    }
    removed = decode(m.member_removed("presence-a", "7"))
    assert removed == {
        "event": "pusher_internal:member_removed",
        "channel": "presence-a",
        "data": '{"user_id":"7"}',
    }


def test_subscription_count_frame() -> None:
    assert decode(m.subscription_count("a", 5)) == {
        "event": "pusher_internal:subscription_count",
        "channel": "a",
        "data": '{"subscription_count":5}',
    }


def test_signin_success_has_object_data() -> None:
    assert decode(m.signin_success('{"id": "1"}')) == {
        "event": "pusher:signin_success",
        "data": {"user_data": '{"id": "1"}'},
    }


def test_subscription_error_and_cache_miss() -> None:
    assert decode(m.subscription_error("presence-a", "LimitReached", "full", 4100)) == {
        "event": "pusher:subscription_error",
        "channel": "presence-a",
        "data": {"type": "LimitReached", "error": "full", "status": 4100},
    }
    assert m.cache_miss("cache-a") == '{"event":"pusher:cache_miss","channel":"cache-a"}'


def test_watchlist_events() -> None:
    text = m.watchlist_events([("online", ["1", "2"]), ("offline", ["3"])])
    assert json.loads(decode(text)["data"]) == {
        "events": [
            {"name": "online", "user_ids": ["1", "2"]},
            {"name": "offline", "user_ids": ["3"]},
        ]
    }


def test_channel_event() -> None:
    assert m.channel_event("my-event", "a", '{"x":1}') == (
        '{"event":"my-event","channel":"a","data":"{\\"x\\":1}"}'
    )
    assert decode(m.channel_event("client-x", "presence-a", "hi", "7")) == {
        "event": "client-x",
        "channel": "presence-a",
        "data": "hi",
        "user_id": "7",
    }


@given(st.text(), st.text(), st.text(), st.none() | st.text())
def test_channel_event_round_trips_any_text(
    event: str, channel: str, data: str, user: str | None
) -> None:
    text = m.channel_event(event, channel, data, user)
    assert text.isascii()
    expected = {"event": event, "channel": channel, "data": data}
    if user is not None:
        expected["user_id"] = user
    assert json.loads(text) == expected


def test_frames_survive_lone_surrogates() -> None:
    text = m.channel_event("e", "c", "\ud800")
    text.encode("utf-8")
    assert json.loads(text)["data"] == "\ud800"
