"""Pusher WebSocket frames: parsing client frames into typed values, serializing server frames.

Parsing never raises: a frame is either one of the ``Client*`` dataclasses or a
:class:`~gateway.protocol.errors.FrameError`. Serializers return compact, ASCII-only JSON text
(non-ASCII is ``\\u``-escaped), so every frame can be encoded to UTF-8 whatever strings it
carries. Following Pusher's double-encoding rule, ``data`` is a JSON *string* in every server
frame except ``pusher:error``, ``pusher:signin_success`` and ``pusher:subscription_error``,
which carry an object.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from gateway._native import presence_succeeded as _native_presence_succeeded

from ._json import loads as _loads
from .channels import user_id_error
from .errors import FrameError
from .limits import DEFAULT_LIMITS, Limits

__all__ = [
    "PING",
    "PONG",
    "ClientEvent",
    "ClientMessage",
    "ClientPing",
    "ClientPong",
    "ClientSignin",
    "ClientSubscribe",
    "ClientUnsubscribe",
    "FlatRoster",
    "PresenceMember",
    "UserData",
    "cache_miss",
    "channel_event",
    "compact_json",
    "connection_established",
    "error",
    "member_added",
    "member_removed",
    "parse_channel_data",
    "parse_client_message",
    "parse_user_data",
    "presence_data",
    "presence_succeeded",
    "signin_success",
    "subscription_count",
    "subscription_error",
    "subscription_succeeded",
    "utf8_length",
    "watchlist_events",
]


# ---------------------------------------------------------------------------------------------
# Client frames


@dataclass(frozen=True, slots=True)
class ClientPing:
    """``pusher:ping``: the client checks liveness; answer ``pusher:pong``."""


@dataclass(frozen=True, slots=True)
class ClientPong:
    """``pusher:pong``: the client answers a server ping."""


@dataclass(frozen=True, slots=True)
class ClientSubscribe:
    """``pusher:subscribe``.

    Attributes:
        channel: Channel name as received (not yet validated).
        auth: The ``key:signature`` token; ``""`` when absent (pusher-js sends ``""`` for
            public channels).
        channel_data: Presence member data: the exact JSON text that was signed, or None.
    """

    channel: str
    auth: str = ""
    channel_data: str | None = None


@dataclass(frozen=True, slots=True)
class ClientUnsubscribe:
    """``pusher:unsubscribe``.

    Attributes:
        channel: Channel name as received.
    """

    channel: str


@dataclass(frozen=True, slots=True)
class ClientSignin:
    """``pusher:signin``.

    Attributes:
        auth: The ``key:signature`` token.
        user_data: The exact signed JSON text describing the user.
    """

    auth: str
    user_data: str


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """A ``client-*`` event to forward to the channel's other subscribers.

    Attributes:
        event: Event name, starting with ``client-``.
        channel: Target channel name as received.
        data: The payload as a string: a string ``data`` verbatim, anything else as compact
            JSON, a missing ``data`` as ``"null"``.
    """

    event: str
    channel: str
    data: str


#: Any parsed client frame.
ClientMessage = (
    ClientPing | ClientPong | ClientSubscribe | ClientUnsubscribe | ClientSignin | ClientEvent
)


@dataclass(frozen=True, slots=True)
class PresenceMember:
    """One connection's identity in a presence channel.

    Attributes:
        user_id: The user id, always a string (numeric ids are converted).
        user_info: Compact ASCII JSON text of the ``user_info`` object, or None if absent.
    """

    user_id: str
    user_info: str | None = None


@dataclass(frozen=True, slots=True)
class UserData:
    """The parsed ``user_data`` of a verified sign-in.

    Attributes:
        id: The user id (non-empty, channel charset, at most ``max_user_id_length``).
        user_info: Compact ASCII JSON of ``user_info`` (an object), or None.
        watchlist: The watchlist ids kept (at most ``max_watchlist``).
        watchlist_truncated: True if ids beyond the limit were dropped (error 4302 is due).
    """

    id: str
    user_info: str | None = None
    watchlist: tuple[str, ...] = ()
    watchlist_truncated: bool = False


def compact_json(value: Any) -> str:
    """Compact, ASCII-only JSON text of ``value``."""
    return json.dumps(value, separators=(",", ":"))


def utf8_length(text: str) -> int:
    """Length of ``text`` in UTF-8 bytes (lone surrogates count 3, never raise)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _object_data(event: str, data: Any) -> dict[str, Any] | FrameError:
    # pusher-js and Java send an object; older docs showed a JSON string: accept both.
    if isinstance(data, str):
        ok, data = _loads(data)
        if not ok:
            return FrameError(None, f"{event}: data is a string but not valid JSON")
    if not isinstance(data, dict):
        return FrameError(None, f"{event}: data must be an object")
    return data


def _optional_str(data: dict[str, Any], event: str, field: str) -> str | FrameError | None:
    value = data.get(field)
    if value is None or isinstance(value, str):
        return value
    return FrameError(None, f"{event}: {field} must be a string")


def parse_client_message(text: str, limits: Limits = DEFAULT_LIMITS) -> ClientMessage | FrameError:
    """Parse one client text frame.

    Accepted: ``pusher:ping``, ``pusher:pong``, ``pusher:subscribe``, ``pusher:unsubscribe``,
    ``pusher:signin`` (``data`` as an object or a JSON string holding one) and ``client-*``
    events. Types are strict: ``channel``, ``auth``, ``channel_data`` and ``user_data`` must be
    strings (``auth``/``channel_data`` may be absent or null). A top-level ``user_id`` sent by
    the client is ignored (the server sets it).

    Args:
        text: The frame's text.
        limits: Frame size, event name and event data limits.

    Returns:
        The parsed message, or the error to report with ``pusher:error``.
    """
    size = utf8_length(text)
    if size > limits.max_frame_bytes:
        return FrameError(None, f"Message too large ({size} bytes, max {limits.max_frame_bytes})")
    ok, frame = _loads(text)
    if not ok:
        return FrameError(None, "Invalid JSON: frames must be UTF-8 JSON objects")
    if not isinstance(frame, dict):
        return FrameError(None, "Invalid message: expected a JSON object")
    event = frame.get("event")
    if not isinstance(event, str):
        return FrameError(None, "Invalid message: 'event' must be a string")
    if event.startswith("client-"):
        return _parse_client_event(event, frame, limits)
    if event == "pusher:ping":
        return ClientPing()
    if event == "pusher:pong":
        return ClientPong()
    if event == "pusher:subscribe":
        return _parse_subscribe(frame.get("data"))
    if event == "pusher:unsubscribe":
        data = _object_data(event, frame.get("data"))
        if isinstance(data, FrameError):
            return data
        channel = data.get("channel")
        if not isinstance(channel, str):
            return FrameError(None, "pusher:unsubscribe: channel must be a string")
        return ClientUnsubscribe(channel)
    if event == "pusher:signin":
        return _parse_signin(frame.get("data"))
    shown = event if len(event) <= 64 else event[:64] + "..."
    if event.startswith(("pusher:", "pusher_internal:")):
        return FrameError(None, f"Unsupported event {shown!r}")
    return FrameError(None, f"Client event names must start with 'client-', got {shown!r}")


def _parse_subscribe(raw: Any) -> ClientSubscribe | FrameError:
    event = "pusher:subscribe"
    data = _object_data(event, raw)
    if isinstance(data, FrameError):
        return data
    channel = data.get("channel")
    if not isinstance(channel, str):
        return FrameError(None, f"{event}: channel must be a string")
    auth = _optional_str(data, event, "auth")
    if isinstance(auth, FrameError):
        return auth
    channel_data = _optional_str(data, event, "channel_data")
    if isinstance(channel_data, FrameError):
        return channel_data
    return ClientSubscribe(channel, auth or "", channel_data)


def _parse_signin(raw: Any) -> ClientSignin | FrameError:
    event = "pusher:signin"
    data = _object_data(event, raw)
    if isinstance(data, FrameError):
        return data
    auth = data.get("auth")
    user_data = data.get("user_data")
    if not isinstance(auth, str) or not auth:
        return FrameError(None, f"{event}: auth must be a non-empty string")
    if not isinstance(user_data, str):
        return FrameError(None, f"{event}: user_data must be a string (the signed JSON text)")
    return ClientSignin(auth, user_data)


def _parse_client_event(
    event: str, frame: dict[str, Any], limits: Limits
) -> ClientEvent | FrameError:
    if len(event) > limits.max_event_name_length:
        return FrameError(
            None,
            f"Event name too long ({len(event)} characters, max {limits.max_event_name_length})",
        )
    channel = frame.get("channel")
    if not isinstance(channel, str):
        return FrameError(None, f"Client event {event!r}: channel must be a string")
    if "data" not in frame:
        data = "null"
    elif isinstance(frame["data"], str):
        data = frame["data"]
    else:
        data = compact_json(frame["data"])
    size = utf8_length(data)
    if size > limits.max_event_data_bytes:
        return FrameError(
            None,
            f"Client event {event!r}: data too large ({size} bytes, "
            f"max {limits.max_event_data_bytes})",
        )
    return ClientEvent(event, channel, data)


def parse_channel_data(text: str, limits: Limits = DEFAULT_LIMITS) -> PresenceMember | FrameError:
    """Parse presence ``channel_data``: ``{"user_id": ..., "user_info"?: {...}}``.

    ``user_id`` must be a non-empty string or an integer (numbers appear in the official
    examples; they are stored as their decimal string, as pusher-js keys members by string).
    Floats and booleans are refused. ``user_info`` is optional (absent or null means none) and
    must otherwise be an object of at most ``max_user_info_bytes`` UTF-8 bytes as compact JSON.

    Args:
        text: The ``channel_data`` text as received.
        limits: User id and user info limits.

    Returns:
        The member, or the error to report.
    """
    ok, data = _loads(text)
    if not ok or not isinstance(data, dict):
        return FrameError(None, "Invalid channel_data: expected a JSON object")
    user_id = data.get("user_id")
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        user_id = str(user_id)
    if not isinstance(user_id, str) or not user_id:
        return FrameError(
            None, "Invalid channel_data: user_id must be a non-empty string or an integer"
        )
    if len(user_id) > limits.max_presence_user_id_length:
        return FrameError(
            None,
            f"Invalid channel_data: user_id too long ({len(user_id)} characters, "
            f"max {limits.max_presence_user_id_length})",
        )
    info = _user_info(data.get("user_info"), limits, "channel_data")
    if isinstance(info, FrameError):
        return info
    return PresenceMember(user_id, info)


def _user_info(value: Any, limits: Limits, where: str) -> str | FrameError | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        return FrameError(None, f"Invalid {where}: user_info must be an object")
    # The limit applies to the text as stored and sent (ASCII JSON, non-ASCII escaped as
    # \uXXXX), so it bounds memory and frame sizes whatever the characters.
    text = compact_json(value)
    if len(text) > limits.max_user_info_bytes:
        return FrameError(
            None,
            f"Invalid {where}: user_info too large ({len(text)} bytes as JSON, "
            f"max {limits.max_user_info_bytes})",
        )
    return text


def parse_user_data(text: str, limits: Limits = DEFAULT_LIMITS) -> UserData | FrameError:
    """Parse the ``user_data`` of a sign-in: ``{"id": str, "user_info"?, "watchlist"?}``.

    ``id`` must be a non-empty string of the channel charset, at most ``max_user_id_length``
    characters (what the server libraries require). ``user_info``, if present, must be an
    object within the presence ``max_user_info_bytes`` (it is what presence channels share).
    ``watchlist``, if present, must be a list of strings; ids beyond ``max_watchlist``
    are dropped and ``watchlist_truncated`` is set (sign-in still succeeds, then error 4302).

    Args:
        text: The signed ``user_data`` text.
        limits: User id, user info and watchlist limits.

    Returns:
        The parsed user data, or the error to report.
    """
    ok, data = _loads(text)
    if not ok or not isinstance(data, dict):
        return FrameError(None, "Invalid user_data: expected a JSON object")
    user_id = data.get("id")
    if not isinstance(user_id, str):
        return FrameError(None, "Invalid user_data: id must be a non-empty string")
    problem = user_id_error(user_id, max_length=limits.max_user_id_length)
    if problem is not None:
        return FrameError(None, f"Invalid user_data: {problem}")
    info = _user_info(data.get("user_info"), limits, "user_data")
    if isinstance(info, FrameError):
        return info
    watchlist = data.get("watchlist")
    if watchlist is None:
        watchlist = []
    if not isinstance(watchlist, list) or not all(isinstance(w, str) for w in watchlist):
        return FrameError(None, "Invalid user_data: watchlist must be a list of strings")
    kept = tuple(watchlist[: limits.max_watchlist])
    return UserData(user_id, info, kept, len(watchlist) > len(kept))


# ---------------------------------------------------------------------------------------------
# Server frames


def _frame(event: str, data: str | None = None, channel: str | None = None) -> str:
    parts = ['{"event":', _quote(event)]
    if channel is not None:
        parts += [',"channel":', _quote(channel)]
    if data is not None:
        parts += [',"data":', data]
    parts.append("}")
    return "".join(parts)


#: ``pusher:ping`` sent by the server (``data`` is the string ``"{}"``, per the double-encoding
#: rule; whether production Pusher sends a string or an object is unverified and clients ignore
#: it).
PING = '{"event":"pusher:ping","data":"{}"}'

#: ``pusher:pong`` answering a client ping (same ``data`` choice as :data:`PING`).
PONG = '{"event":"pusher:pong","data":"{}"}'


def connection_established(socket_id: str, activity_timeout: int) -> str:
    """The handshake frame; ``data`` is a JSON string (pusher-js requires a positive timeout)."""
    data = compact_json({"socket_id": socket_id, "activity_timeout": activity_timeout})
    return _frame("pusher:connection_established", _quote(data))


def error(code: int | None, message: str) -> str:
    """``pusher:error`` with object ``data`` ``{"code": int|null, "message": str}``."""
    return _frame("pusher:error", compact_json({"code": code, "message": message}))


def subscription_succeeded(channel: str, data: str = "{}") -> str:
    """``pusher_internal:subscription_succeeded``.

    Args:
        channel: The channel.
        data: The JSON text to string-encode: ``"{}"`` for non-presence channels, or
            :func:`presence_data` for presence channels.
    """
    return _frame("pusher_internal:subscription_succeeded", _quote(data), channel)


def presence_data(roster: Mapping[str, str | None]) -> str:
    """The presence part of ``subscription_succeeded``, as JSON text.

    ``{"presence":{"ids":[...],"hash":{id:user_info,...},"count":N}}``; all three keys are
    sent (pusher-js reads ``hash``/``count``, Java reads ``ids``/``hash``). A member without
    ``user_info`` maps to ``null`` (unverified what Pusher sends; ``null`` keeps "no info"
    distinct from ``{}``).

    Args:
        roster: user id -> compact ``user_info`` JSON text (None = no info). The texts are
            embedded as they are, so they must be valid JSON (as :class:`PresenceMember` holds).
    """
    ids = [_quote(user_id) for user_id in roster]
    hash_items = [
        f"{quoted}:{info if info is not None else 'null'}"
        for quoted, info in zip(ids, roster.values(), strict=True)
    ]
    return (
        '{"presence":{"ids":['
        + ",".join(ids)
        + '],"hash":{'
        + ",".join(hash_items)
        + '},"count":'
        + str(len(ids))
        + "}}"
    )


class FlatRoster(Mapping[str, str | None]):
    """A presence roster in the flat form the store replies with.

    ``flat`` is ``[user_id, user_info, ...]`` as UTF-8 ``bytes``, ``b""`` for a member without
    ``user_info``. As a mapping (user id -> ``user_info`` JSON text or None, a repeated id
    keeping its first place and its last info, as in a dict built from the pairs) it is decoded
    once, on first use; :func:`presence_succeeded` builds its frame without decoding it.

    Args:
        flat: The pairs, flat.
    """

    __slots__ = ("_decoded", "flat")

    def __init__(self, flat: Sequence[bytes]) -> None:
        self.flat = flat
        self._decoded: dict[str, str | None] | None = None

    def decode(self) -> dict[str, str | None]:
        """The roster as a new dict.

        Raises:
            UnicodeDecodeError: An id or info is not UTF-8.
            IndexError: ``flat`` has an odd length.
        """
        flat = self.flat
        return {flat[i].decode(): (flat[i + 1].decode() or None) for i in range(0, len(flat), 2)}

    def _members(self) -> dict[str, str | None]:
        if self._decoded is None:
            self._decoded = self.decode()
        return self._decoded

    def __getitem__(self, user_id: str) -> str | None:
        return self._members()[user_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._members())

    def __len__(self) -> int:
        return len(self._members())

    def __repr__(self) -> str:
        return f"FlatRoster({self.flat!r})"


def presence_succeeded(
    channel: str, roster: Mapping[str, str | None], member: PresenceMember
) -> str:
    """``subscription_succeeded`` of a presence channel: ``roster`` with ``member`` added if
    missing.

    A :class:`FlatRoster` goes to the native builder, which answers the same text (see
    tests/test_native.py) or None for what it leaves to the code here.

    Args:
        channel: The presence channel.
        roster: The members, user id -> ``user_info`` JSON text or None.
        member: The joining member.
    """
    if isinstance(roster, FlatRoster):
        frame = _native_presence_succeeded(channel, roster.flat, member.user_id, member.user_info)
        if frame is not None:
            return frame
    members = dict(roster)
    members.setdefault(member.user_id, member.user_info)
    return subscription_succeeded(channel, presence_data(members))


def member_added(channel: str, user_id: str, user_info: str | None) -> str:
    """``pusher_internal:member_added``; ``user_info`` is JSON text or None (sent as null)."""
    data = (
        '{"user_id":'
        + _quote(user_id)
        + ',"user_info":'
        + (user_info if user_info is not None else "null")
        + "}"
    )
    return _frame("pusher_internal:member_added", _quote(data), channel)


def member_removed(channel: str, user_id: str) -> str:
    """``pusher_internal:member_removed`` with string data ``{"user_id": ...}``."""
    return _frame(
        "pusher_internal:member_removed", _quote('{"user_id":' + _quote(user_id) + "}"), channel
    )


def subscription_count(channel: str, count: int) -> str:
    """``pusher_internal:subscription_count`` with string data ``{"subscription_count": N}``."""
    return _frame(
        "pusher_internal:subscription_count",
        _quote('{"subscription_count":' + str(int(count)) + "}"),
        channel,
    )


def signin_success(user_data: str) -> str:
    """``pusher:signin_success`` with object data ``{"user_data": <the signed text>}``."""
    return _frame("pusher:signin_success", '{"user_data":' + _quote(user_data) + "}")


def subscription_error(channel: str, error_type: str, message: str, status: int) -> str:
    """``pusher:subscription_error`` on ``channel`` with object data ``{type, error, status}``.

    This is the frame soketi and sockudo send when the server refuses a subscription after the
    signature was accepted (member limit, store failure); pusher-js emits it to the channel's
    listeners with the same shape as its own auth-endpoint failures.
    """
    data = compact_json({"type": error_type, "error": message, "status": status})
    return _frame("pusher:subscription_error", data, channel)


def cache_miss(channel: str) -> str:
    """``pusher:cache_miss`` on ``channel``, without ``data`` (soketi's shape; unverified)."""
    return _frame("pusher:cache_miss", None, channel)


def watchlist_events(events: Iterable[tuple[str, Sequence[str]]]) -> str:
    """``pusher_internal:watchlist_events``; ``data`` string-encoded (encoding unverified).

    Args:
        events: ``("online" | "offline", user_ids)`` pairs.
    """
    payload = {"events": [{"name": name, "user_ids": list(ids)} for name, ids in events]}
    return _frame("pusher_internal:watchlist_events", _quote(compact_json(payload)))


def channel_event(event: str, channel: str, data: str, user_id: str | None = None) -> str:
    """A channel event frame: ``{"event","channel","data"[,"user_id"]}``; the hot fan-out path.

    ``data`` is sent verbatim as a JSON string. Build the frame once per event and send the same
    text to every subscriber. ``user_id`` is set for client events on presence channels.
    """
    frame = (
        '{"event":' + _quote(event) + ',"channel":' + _quote(channel) + ',"data":' + _quote(data)
    )
    if user_id is not None:
        frame += ',"user_id":' + _quote(user_id)
    return frame + "}"
