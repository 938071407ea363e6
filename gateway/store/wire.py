"""The bytes of the Pub/Sub messages that nodes and the function library exchange on a channel.

A message published on a channel's key (``{<app_id>:<channel>}``) is one kind byte and a body:

======  =========================================  ================================================
kind    body                                       meaning
======  =========================================  ================================================
``E``   ``<exclude>\\0<frame>``                     an event frame for every subscriber but socket
                                                   ``exclude`` (empty: nobody excluded)
``A``   ``<exclude>\\0<n>:<user_id><user_info>``    ``member_added``; ``n`` is the byte length of
                                                   the user id, which may hold any byte (NUL too)
``R``   ``<user_id>``                              ``member_removed`` (the rest of the message)
``C``   ``<count>``                                ``pusher_internal:subscription_count``
``T``   (none)                                     terminate the user's connections (user channels)
======  =========================================  ================================================

``M``, ``R`` and ``C`` are published by the function library (``functions.lua``), ``E`` and
``T`` by nodes. Socket ids are digits and one dot, and frames are JSON text without raw NULs,
so the first NUL always ends ``exclude``. (Library version 3 sent ``member_added`` as ``A``
with NUL separators, which a user id holding a NUL broke; nodes ignore kinds they do not
know, so a node of version 3 meeting ``M`` during an upgrade skips it instead of failing.)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CountMessage",
    "EventMessage",
    "MemberAdded",
    "MemberRemoved",
    "Message",
    "Terminate",
    "decode",
    "encode_event",
    "encode_member_added",
    "encode_terminate",
]


@dataclass(frozen=True, slots=True)
class EventMessage:
    """An event frame for the channel's subscribers, except socket ``exclude``."""

    exclude: str | None
    frame: str


@dataclass(frozen=True, slots=True)
class MemberAdded:
    """A user's first connection to a presence channel, on any node."""

    exclude: str | None
    user_id: str
    user_info: str | None


@dataclass(frozen=True, slots=True)
class MemberRemoved:
    """A user's last connection to a presence channel closed, on every node."""

    user_id: str


@dataclass(frozen=True, slots=True)
class CountMessage:
    """The channel's new subscription count."""

    count: int


@dataclass(frozen=True, slots=True)
class Terminate:
    """Close every connection of the user whose ``#server-to-user-`` channel this is."""


Message = EventMessage | MemberAdded | MemberRemoved | CountMessage | Terminate


def encode_event(frame: str, exclude: str | None = None) -> bytes:
    """An ``E`` message: ``frame`` for every subscriber but socket ``exclude``."""
    return b"E" + (exclude or "").encode() + b"\0" + frame.encode()


def encode_member_added(user_id: str, user_info: str | None, exclude: str | None = None) -> bytes:
    """An ``M`` message, as the function library publishes it (for tests and tools)."""
    user = user_id.encode()
    return (
        b"M"
        + (exclude or "").encode()
        + b"\0"
        + str(len(user)).encode()
        + b":"
        + user
        + (user_info or "").encode()
    )


def encode_terminate() -> bytes:
    """A ``T`` message."""
    return b"T"


def decode(data: bytes) -> Message | None:
    """Parse one message; None for anything malformed or of an unknown kind.

    Never raises: a message that cannot be parsed is dropped by the caller, not delivered.
    """
    kind = data[:1]
    try:
        if kind == b"E":
            sock, sep, body = data[1:].partition(b"\0")
            if not sep:
                return None
            return EventMessage(sock.decode() or None, body.decode())
        if kind == b"M":
            sock, sep, rest = data[1:].partition(b"\0")
            size, colon, rest = rest.partition(b":")
            if not sep or not colon or not size.isdigit() or int(size) > len(rest):
                return None
            n = int(size)
            info = rest[n:].decode()
            return MemberAdded(sock.decode() or None, rest[:n].decode(), info or None)
        if kind == b"R":
            return MemberRemoved(data[1:].decode())
        if kind == b"C":
            body = data[1:]
            return CountMessage(int(body)) if body.isdigit() else None
        if kind == b"T":
            return Terminate()
    except UnicodeDecodeError:
        return None
    return None
