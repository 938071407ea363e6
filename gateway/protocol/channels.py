"""Channel names: validation, and classification into public, private, encrypted, presence."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "ONLINE_PREFIX",
    "SERVER_TO_USER_PREFIX",
    "Channel",
    "ChannelKind",
    "channel_error",
    "classify",
    "is_cache",
    "online_channel",
    "online_user_id",
    "server_to_user_channel",
    "server_to_user_id",
    "user_id_error",
]

#: Prefix of the reserved per-user channel (``#server-to-user-{user_id}``).
SERVER_TO_USER_PREFIX = "#server-to-user-"
#: Prefix of the internal channel whose one presence member is a user while signed in
#: anywhere (``#online-{user_id}``, watchlist events); never subscribable by clients.
ONLINE_PREFIX = "#online-"

_NAME = re.compile(r"[A-Za-z0-9_\-=@,.;]+")
_BAD_CHAR = re.compile(r"[^A-Za-z0-9_\-=@,.;]")


class ChannelKind(StrEnum):
    """The authorization class of a channel."""

    PUBLIC = "public"
    PRIVATE = "private"
    PRIVATE_ENCRYPTED = "private-encrypted"
    PRESENCE = "presence"
    SERVER_TO_USER = "server-to-user"


# Longest prefixes first so that "private-encrypted-cache-" is not read as "private-".
_PREFIXES: tuple[tuple[str, ChannelKind, bool], ...] = (
    ("private-encrypted-cache-", ChannelKind.PRIVATE_ENCRYPTED, True),
    ("private-encrypted-", ChannelKind.PRIVATE_ENCRYPTED, False),
    ("private-cache-", ChannelKind.PRIVATE, True),
    ("private-", ChannelKind.PRIVATE, False),
    ("presence-cache-", ChannelKind.PRESENCE, True),
    ("presence-", ChannelKind.PRESENCE, False),
    ("cache-", ChannelKind.PUBLIC, True),
)


@dataclass(frozen=True, slots=True)
class Channel:
    """A classified channel name.

    Attributes:
        name: The full channel name.
        kind: Its authorization class.
        cache: True for ``cache-``, ``private-cache-``, ``private-encrypted-cache-`` and
            ``presence-cache-`` channels.
        user_id: For ``#server-to-user-{id}`` channels, the id; otherwise None.
    """

    name: str
    kind: ChannelKind
    cache: bool = False
    user_id: str | None = None

    @property
    def requires_auth(self) -> bool:
        """Whether subscribing needs a signed ``auth`` token (private, encrypted, presence)."""
        return self.kind in (
            ChannelKind.PRIVATE,
            ChannelKind.PRIVATE_ENCRYPTED,
            ChannelKind.PRESENCE,
        )

    @property
    def is_presence(self) -> bool:
        """Whether the channel tracks members."""
        return self.kind is ChannelKind.PRESENCE

    @property
    def allows_client_events(self) -> bool:
        """Whether ``client-`` events may be sent on it: private and presence only.

        Encrypted channels are excluded: the SDKs cannot encrypt client events and pusher-js
        refuses to trigger them.
        """
        return self.kind in (ChannelKind.PRIVATE, ChannelKind.PRESENCE)


_CACHE_PREFIXES = tuple(prefix for prefix, _, cache in _PREFIXES if cache)


def is_cache(name: str) -> bool:
    """``classify(name).cache``, without building the :class:`Channel`."""
    return name.startswith(_CACHE_PREFIXES)


def classify(name: str) -> Channel:
    """Classify a channel name by its prefix.

    The name is not validated; call :func:`channel_error` first for untrusted input.

    Args:
        name: A channel name.

    Returns:
        The channel's kind, cache flag and, for server-to-user channels, the user id.
    """
    if name.startswith(SERVER_TO_USER_PREFIX):
        return Channel(name, ChannelKind.SERVER_TO_USER, user_id=name[len(SERVER_TO_USER_PREFIX) :])
    for prefix, kind, cache in _PREFIXES:
        if name.startswith(prefix):
            return Channel(name, kind, cache)
    return Channel(name, ChannelKind.PUBLIC)


def _charset_error(what: str, value: str) -> str | None:
    if _NAME.fullmatch(value):
        return None
    bad = _BAD_CHAR.search(value)
    char = bad.group() if bad else ""
    return f"{what} contains an invalid character {char!r} (allowed: A-Z a-z 0-9 _ - = @ , . ;)"


def channel_error(name: str, *, max_length: int = 200) -> str | None:
    """Check a channel name against Pusher's rules.

    Rules: 1 to ``max_length`` characters from ``[A-Za-z0-9_\\-=@,.;]``; ``#`` is allowed only
    as ``#server-to-user-{user_id}`` with a valid user id.

    Args:
        name: The name to check.
        max_length: Longest accepted name.

    Returns:
        None if the name is valid, otherwise a message saying what is wrong.
    """
    if not name:
        return "Channel name is empty"
    if len(name) > max_length:
        return f"Channel name is too long ({len(name)} characters, max {max_length})"
    if name.startswith(SERVER_TO_USER_PREFIX):
        user_id = name[len(SERVER_TO_USER_PREFIX) :]
        if not user_id:
            return f"Channel {name!r} names no user id"
        error = _charset_error("User id of server-to-user channel", user_id)
        return None if error is None else f"{error} in channel {name!r}"
    if name.startswith("#"):
        return f"Channel {name!r}: '#' is reserved for #server-to-user-{{user_id}} channels"
    error = _charset_error("Channel name", name)
    return None if error is None else f"{error}: {name!r}"


def user_id_error(user_id: str, *, max_length: int = 200) -> str | None:
    """Check a signed-in user id: 1 to ``max_length`` characters of the channel charset.

    Args:
        user_id: The id to check.
        max_length: Longest accepted id (the server libraries allow 200).

    Returns:
        None if valid, otherwise a message.
    """
    if not user_id:
        return "User id is empty"
    if len(user_id) > max_length:
        return f"User id is too long ({len(user_id)} characters, max {max_length})"
    return _charset_error("User id", user_id)


def server_to_user_channel(user_id: str) -> str:
    """The name of the channel that delivers server-to-user messages to ``user_id``."""
    return SERVER_TO_USER_PREFIX + user_id


def server_to_user_id(channel: str) -> str | None:
    """The user id of a ``#server-to-user-{user_id}`` channel; None for any other channel."""
    if channel.startswith(SERVER_TO_USER_PREFIX):
        return channel[len(SERVER_TO_USER_PREFIX) :]
    return None


def online_channel(user_id: str) -> str:
    """The internal channel that holds ``user_id`` while it is signed in on any node."""
    return ONLINE_PREFIX + user_id


def online_user_id(channel: str) -> str | None:
    """The user id of an ``#online-{user_id}`` channel; None for any other channel."""
    if channel.startswith(ONLINE_PREFIX):
        return channel[len(ONLINE_PREFIX) :]
    return None
