"""Pusher error and close codes as documented data, plus the error values this package returns.

Nothing in this package raises on bad input; failures are returned as values::

    ApiError            HTTP API failure: status (400/401/403/404/405/413) + message
    FrameError          unusable client frame: pusher:error code (int or None) + message
    ProtocolCode        the 4000-4399 codes (IntEnum), with CODES describing each one
        close codes     4000-4299: sent as WebSocket close codes
        error events    4300-4399: only ever sent as pusher:error events, never as close codes
                        (pusher-js treats a >= 4300 close as "refused" and stops reconnecting)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

__all__ = [
    "CODES",
    "ApiError",
    "CodeInfo",
    "FrameError",
    "ProtocolCode",
    "Reconnect",
    "is_close_code",
    "reconnect_policy",
]


class ProtocolCode(IntEnum):
    """Every code of the Pusher protocol's 4000-4399 table."""

    TLS_ONLY = 4000
    APP_NOT_FOUND = 4001
    APP_DISABLED = 4003
    OVER_CONNECTION_QUOTA = 4004
    PATH_NOT_FOUND = 4005
    INVALID_VERSION = 4006
    UNSUPPORTED_PROTOCOL = 4007
    NO_PROTOCOL = 4008
    UNAUTHORIZED = 4009
    OVER_CAPACITY = 4100
    RECONNECT = 4200
    PONG_TIMEOUT = 4201
    INACTIVITY = 4202
    CLIENT_EVENT_RATE_LIMIT = 4301
    WATCHLIST_LIMIT = 4302


class Reconnect(Enum):
    """What a client should do after a code, by the documented ranges."""

    NEVER = "do not reconnect with the same parameters"  # 4000-4099
    BACKOFF = "reconnect after backing off >= 1 s"  # 4100-4199
    IMMEDIATELY = "reconnect immediately"  # 4200-4299
    OTHER = "other error"  # 4300-4399


@dataclass(frozen=True, slots=True)
class CodeInfo:
    """Documentation of one code.

    Attributes:
        code: The numeric code.
        meaning: The documented meaning.
        close: True if the gateway may use it as a WebSocket close code, False if it is only
            ever sent inside a ``pusher:error`` event.
        reconnect: The documented client reaction.
    """

    code: int
    meaning: str
    close: bool
    reconnect: Reconnect


def reconnect_policy(code: int) -> Reconnect:
    """The documented client reaction to a code in 4000-4399 (``OTHER`` outside that range)."""
    if 4000 <= code < 4100:
        return Reconnect.NEVER
    if 4100 <= code < 4200:
        return Reconnect.BACKOFF
    if 4200 <= code < 4300:
        return Reconnect.IMMEDIATELY
    return Reconnect.OTHER


def is_close_code(code: int) -> bool:
    """Whether ``code`` may be used to close a socket: 4000-4299 only (never 43xx)."""
    return 4000 <= code < 4300


_MEANINGS = {
    ProtocolCode.TLS_ONLY: "application only accepts SSL connections; reconnect using wss://",
    ProtocolCode.APP_NOT_FOUND: "application does not exist",
    ProtocolCode.APP_DISABLED: "application disabled",
    ProtocolCode.OVER_CONNECTION_QUOTA: "application is over connection quota",
    ProtocolCode.PATH_NOT_FOUND: "path not found",
    ProtocolCode.INVALID_VERSION: "invalid version string format",
    ProtocolCode.UNSUPPORTED_PROTOCOL: "unsupported protocol version",
    ProtocolCode.NO_PROTOCOL: "no protocol version supplied",
    ProtocolCode.UNAUTHORIZED: "connection is unauthorized",
    ProtocolCode.OVER_CAPACITY: "over capacity",
    ProtocolCode.RECONNECT: "generic reconnect immediately (graceful shutdown or drain)",
    ProtocolCode.PONG_TIMEOUT: "pong reply not received",
    ProtocolCode.INACTIVITY: "closed after inactivity",
    ProtocolCode.CLIENT_EVENT_RATE_LIMIT: "client event rejected due to rate limit",
    ProtocolCode.WATCHLIST_LIMIT: "watchlist limit exceeded; the first ids were kept",
}

#: Every documented code with its meaning, whether it is a close code, and the client reaction.
CODES: dict[int, CodeInfo] = {
    int(code): CodeInfo(int(code), meaning, is_close_code(code), reconnect_policy(code))
    for code, meaning in _MEANINGS.items()
}


@dataclass(frozen=True, slots=True)
class ApiError:
    """An HTTP API request the gateway refuses.

    Attributes:
        status: HTTP status: 400 bad request, 401 authentication failure, 403 forbidden,
            404 unknown path, 405 wrong method, 413 event data too large.
        message: Plain-text explanation for the response body.
    """

    status: int
    message: str


@dataclass(frozen=True, slots=True)
class FrameError:
    """A client frame the session answers with ``pusher:error`` and otherwise ignores.

    Attributes:
        code: The ``pusher:error`` code: a documented code (4301, 4302) where one applies,
            otherwise ``None`` (serialized as ``null``, as production Pusher and the emulators
            do for malformed input and bad signatures).
        message: Human-readable reason.
    """

    code: int | None
    message: str
