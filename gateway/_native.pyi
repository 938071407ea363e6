"""Stub of the Rust extension: slot hashing, write tags, RESP packing/parsing, per-shard batches,
the client-frame fast path and the presence frame builders.

Exceptions::

    ValueError
     └── RespError           malformed RESP, or replies that do not fit the batch
    RuntimeError
     └── ReplyError          an error reply from Redis (returned as a value by ReplyReader)
          ├── RoutingError   reached a server that must not apply it; retry after rediscovery
          │    ├── WrongShardError   WRONGSHARD
          │    ├── StaleEpochError   STALEEPOCH
          │    ├── NoIdentityError   NOIDENTITY
          │    └── ReadOnlyError     READONLY
          ├── BadTagError    BADTAG
          └── BadOpError     BADOP
"""

from collections.abc import Sequence
from typing import final

from typing_extensions import disjoint_base

__all__ = [
    "BadOpError",
    "BadTagError",
    "NoIdentityError",
    "ReadOnlyError",
    "ReplyError",
    "ReplyReader",
    "RespError",
    "RoutingError",
    "ShardBatch",
    "SlotTable",
    "StaleEpochError",
    "WrongShardError",
    "build_batches",
    "client_frame",
    "key_slot",
    "member_frame",
    "pack_command",
    "presence_succeeded",
    "write_tag",
]

def key_slot(key: bytes) -> int:
    """The Redis Cluster slot of ``key``; equals ``CLUSTER KEYSLOT``."""

def write_tag(uuid: str, epoch: int, key: bytes) -> str:
    """16 lowercase hex digits of ``sha1(uuid ":" epoch ":" key)``."""

def pack_command(args: Sequence[bytes | str | int]) -> bytes:
    """One command as a RESP2 array of bulk strings (``str`` UTF-8, ``int`` decimal)."""

def client_frame(
    text: str,
    socket_id: str,
    key: str,
    secret: str,
    *,
    max_frame_bytes: int,
    max_channel_name_length: int,
    max_user_id_length: int,
    max_user_info_bytes: int,
) -> tuple[str, str, str | None] | str | None:
    """The client frame ``text`` if it is one of the common ones, checked as
    :mod:`gateway.protocol` checks it.

    ``(channel, user_id, user_info)`` for a ``pusher:subscribe`` to a presence channel with
    ``channel_data``, correctly signed for ``socket_id`` with the app's ``key`` and ``secret``,
    within the limits (``user_info`` as :func:`gateway.protocol.messages.compact_json` writes
    it); the channel (a ``str``) for a ``pusher:unsubscribe`` whose ``data`` is an object. None
    when the frame is anything else or anything unusual: then :mod:`gateway.protocol` decides.
    Never raises on ``text``."""

def presence_succeeded(
    channel: str, flat: object, user_id: str, user_info: str | None
) -> str | None:
    """``pusher_internal:subscription_succeeded`` of a presence channel, as
    :func:`gateway.protocol.messages.subscription_succeeded` with
    :func:`~gateway.protocol.messages.presence_data` builds it, from ``flat``, the roster of a
    join reply (a list of ``bytes``: user id, ``user_info`` JSON text or ``b""``, ...), with the
    member ``user_id`` added if missing. None when ``flat`` is not such a list of valid UTF-8."""

def member_frame(channel: str, message: bytes) -> tuple[str, str | None] | None:
    """The ``pusher_internal:member_added`` or ``member_removed`` frame of an ``M`` or ``R``
    Pub/Sub message (:mod:`gateway.shards.contract`) for ``channel``, as
    :func:`gateway.protocol.messages.member_added` / ``member_removed`` build it, and the socket
    id it must not be sent to (None: none). None for any other message, or a malformed one."""

@final
class SlotTable:
    """Which shard owns each slot, and each shard's identity, under one topology epoch."""

    def __new__(
        cls, epoch: int, uuids: Sequence[str], ranges: Sequence[tuple[int, int]]
    ) -> SlotTable: ...
    @staticmethod
    def even(epoch: int, uuids: Sequence[str]) -> SlotTable:
        """A table splitting the slots evenly over ``len(uuids)`` shards."""

    @staticmethod
    def even_ranges(n: int) -> list[tuple[int, int]]:
        """The even split of the slots over ``n`` shards, as inclusive ranges."""

    @property
    def epoch(self) -> int:
        """The topology epoch."""

    @property
    def num_shards(self) -> int:
        """Number of shards."""

    def uuid(self, shard: int) -> str:
        """The uuid of ``shard``."""

    def shard_of_slot(self, slot: int) -> int:
        """The shard owning ``slot`` (0..16383)."""

    def shard_for_key(self, key: bytes) -> int:
        """The shard owning ``key``'s slot."""

@final
class ShardBatch:
    """One shard's pipeline of ``FCALL pg_apply`` commands and the plan mapping replies to ops."""

    @property
    def shard(self) -> int:
        """Index of the shard in the slot table."""

    @property
    def payload(self) -> bytes:
        """The packed commands, to write to the shard's connection as they are."""

    @property
    def op_indices(self) -> list[int]:
        """Indices into the input ops, in the order of their replies."""

    @property
    def n_commands(self) -> int:
        """Number of ``FCALL`` commands in the payload (= number of replies to read)."""

    def map_replies(self, replies: Sequence[object]) -> list[object]:
        """One result per op (aligned with ``op_indices``) from the ``n_commands`` replies."""

def build_batches(
    table: SlotTable,
    ops: Sequence[tuple[bytes, bytes, Sequence[bytes]]],
    *,
    group: int = 128,
) -> list[ShardBatch]:
    """Groups ``ops`` by shard and packs them as ``FCALL pg_apply`` calls of <= ``group`` ops."""

@final
class ReplyReader:
    """Incremental RESP2 reply parser."""

    def __new__(cls) -> ReplyReader: ...
    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises ``RespError`` on malformed input (the reader is then unusable)."""

    def available(self) -> int:
        """Number of complete replies waiting."""

    def take(self, n: int) -> list[object] | None:
        """Pop exactly ``n`` replies if available, else ``None`` (nothing consumed)."""

class RespError(ValueError):
    """Malformed RESP, or replies whose shape does not match the batch."""

@disjoint_base
class ReplyError(RuntimeError):
    """An error reply from Redis; ``args[0]`` is the full message."""

    @property
    def code(self) -> str:
        """The first word of the message, e.g. ``WRONGSHARD``."""

class RoutingError(ReplyError):
    """The write reached a server that must not apply it; safe to retry after rediscovery."""

class WrongShardError(RoutingError):
    """``WRONGSHARD``: the server is another shard."""

class StaleEpochError(RoutingError):
    """``STALEEPOCH``: the topology was re-initialised."""

class NoIdentityError(RoutingError):
    """``NOIDENTITY``: the server is not an initialised shard."""

class ReadOnlyError(RoutingError):
    """``READONLY``: the server is a replica."""

class BadTagError(ReplyError):
    """``BADTAG``: the write tag does not match the key."""

class BadOpError(ReplyError):
    """``BADOP``: unknown operation or wrong argument count."""
