"""The contract with the shard function library (``functions.lua``), in one place.

Everything a node and the library say to each other is defined here and nowhere else: the keys
of a channel, the error names a shard answers with, every write operation (its arguments, a
typed builder and a decoder of its reply), every read function, and the Pub/Sub messages. Tests
read ``functions.lua`` and check it against :data:`OPS`, :data:`READS`, :data:`ERRORS` and
:data:`MESSAGES`, the native module's error classes against :data:`ERRORS`, and the operations
section of ``docs/store.md`` against :func:`ops_markdown`, so none of them can drift.

Pub/Sub messages, published on a channel's key (``{<app_id>:<channel>}``), are one kind byte and
a body:

======  =========================================  ================================================
kind    body                                       meaning
======  =========================================  ================================================
``E``   ``<exclude>\\0<frame>``                     an event frame for every subscriber but socket
                                                   ``exclude`` (empty: nobody excluded)
``M``   ``<exclude>\\0<n>:<user_id><user_info>``    ``member_added``; ``n`` is the byte length of
                                                   the user id, which may hold any byte (NUL too)
``R``   ``<user_id>``                              ``member_removed`` (the rest of the message)
``C``   ``<count>``                                ``pusher_internal:subscription_count``
``T``   (none)                                     terminate the user's connections (user channels)
======  =========================================  ================================================

``M``, ``R`` and ``C`` are published by the library, ``E`` and ``T`` by nodes (through the
``publish`` operation). Socket ids are digits and one dot, and frames are JSON text without raw
NULs, so the first NUL always ends ``exclude``. (Library version 3 sent ``member_added`` as
``A`` with NUL separators, which a user id holding a NUL broke; nodes ignore kinds they do not
know, so a node of version 3 meeting ``M`` during an upgrade skips it instead of failing.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, cast

from gateway._native import (
    BadOpError,
    BadTagError,
    NoIdentityError,
    ReadOnlyError,
    ReplyError,
    StaleEpochError,
    WrongShardError,
)
from gateway.protocol.messages import FlatRoster

__all__ = [
    "ERRORS",
    "HOOK_KINDS",
    "HOOK_LETTERS",
    "IDENTITY_KEY",
    "MESSAGES",
    "OPS",
    "OUTBOX_MAX",
    "READS",
    "ChannelCounts",
    "CountMessage",
    "Due",
    "ErrorName",
    "EventMessage",
    "JoinResult",
    "MemberAdded",
    "MemberRemoved",
    "Message",
    "MessageKind",
    "Op",
    "OpSpec",
    "OutboxClaim",
    "OutboxEntry",
    "Read",
    "ReadSpec",
    "SubsResult",
    "Terminate",
    "ack",
    "admin_delete",
    "admin_expire",
    "cache",
    "channel_key",
    "check",
    "claim",
    "count_entry",
    "decode_cache",
    "decode_channels",
    "decode_check",
    "decode_claim",
    "decode_info",
    "decode_lease",
    "decode_lease_states",
    "decode_leases",
    "decode_message",
    "decode_owned",
    "decode_pjoin",
    "decode_pleave",
    "decode_reap",
    "decode_roster",
    "decode_subs",
    "decode_sync",
    "decode_user_ids",
    "defer",
    "encode_count",
    "encode_event",
    "encode_member_added",
    "encode_member_removed",
    "encode_terminate",
    "entry_hash",
    "error_reason",
    "hook",
    "lease",
    "member_entry",
    "ops_markdown",
    "parse_channel_key",
    "pjoin",
    "pleave",
    "publish",
    "purge",
    "read_cache",
    "read_channels",
    "read_info",
    "read_leases",
    "read_owned",
    "read_roster",
    "read_version",
    "reap",
    "repair",
    "subs",
    "sync",
]

#: One write: (op name, key, args), framed by the native module as docs/write-path.md says.
Op = tuple[bytes, bytes, Sequence[bytes]]

#: The key of a shard's identity hash (written by ``shards init``, checked by every write).
IDENTITY_KEY = b"__pg:shard"


# -- keys ------------------------------------------------------------------------------------


def channel_key(app_id: str, channel: str) -> bytes:
    """The hash-tagged base key (and Pub/Sub channel) of a channel: ``{<app_id>:<channel>}``."""
    return f"{{{app_id}:{channel}}}".encode()


def parse_channel_key(key: bytes) -> tuple[str, str]:
    """Inverse of :func:`channel_key`.

    Raises:
        ValueError: ``key`` is not a channel key.
    """
    text = key.decode()
    if not (text.startswith("{") and text.endswith("}")) or ":" not in text:
        raise ValueError(f"not a channel key: {text!r}")
    app_id, _, channel = text[1:-1].partition(":")
    return app_id, channel


# -- error names -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorName:
    """An error a shard answers a write with.

    Attributes:
        code: The first word of the error reply.
        exception: The native module's class for it (``ReplyReader`` returns an instance).
        reason: The ``reason`` label of the writer's metrics.
        routing: The write reached a server that must not apply it: it is held and sent again
            once the shard is verified again, instead of failing.
        meaning: What it says, for operators.
    """

    code: str
    exception: type[ReplyError]
    reason: str
    routing: bool
    meaning: str


#: Every error name of the write path. READONLY is Redis's own (a replica); the others are
#: the library's.
ERRORS: tuple[ErrorName, ...] = (
    ErrorName("WRONGSHARD", WrongShardError, "wrong_shard", True,
              "the server is another shard (a misrouted write; it took no effect)"),
    ErrorName("STALEEPOCH", StaleEpochError, "stale_epoch", True,
              "the topology was re-initialised since the write was tagged"),
    ErrorName("NOIDENTITY", NoIdentityError, "no_identity", True,
              "the server is not an initialised shard (run presence-gateway shards init)"),
    ErrorName("READONLY", ReadOnlyError, "read_only", True,
              "the server is a replica"),
    ErrorName("BADTAG", BadTagError, "bad_tag", False,
              "the write tag does not match the key"),
    ErrorName("BADOP", BadOpError, "bad_op", False,
              "unknown operation, wrong argument count or malformed batch"),
)  # fmt: skip

_REASONS: dict[type[BaseException], str] = {e.exception: e.reason for e in ERRORS}


def error_reason(exc: BaseException) -> str:
    """The metrics ``reason`` label of a shard's error reply (its lowercased code if unknown)."""
    reason = _REASONS.get(type(exc))
    if reason is not None:
        return reason
    if isinstance(exc, ReplyError):
        return exc.code.lower()
    return "error"


# -- replies ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JoinResult:
    """Outcome of a presence join.

    Attributes:
        added: This was the user's first connection in the channel on any node
            (``member_added`` was published to every node).
        webhook: A ``member_added`` webhook is due (false when the join cancelled a held
            ``member_removed``: the user came back within the hold).
        roster: The channel's members, user id to ``user_info`` JSON text (None if none);
            None when the channel is full and the join was refused. From a shard, a
            :class:`~gateway.protocol.messages.FlatRoster` (decoded only when read).
    """

    added: bool
    webhook: bool
    roster: Mapping[str, str | None] | None


@dataclass(frozen=True, slots=True)
class SubsResult:
    """Outcome of setting this node's subscriber count of a channel."""

    before: int
    after: int
    occupied_webhook: bool


@dataclass(frozen=True, slots=True)
class ChannelCounts:
    """Subscription count (connections) and user count (distinct presence users)."""

    subscription_count: int
    user_count: int


#: Outbox kinds (one letter in the store) and the webhook event each is.
HOOK_KINDS: dict[bytes, str] = {
    b"a": "member_added",
    b"m": "member_removed",
    b"o": "channel_occupied",
    b"v": "channel_vacated",
    b"c": "subscription_count",
    b"e": "client_event",
    b"x": "cache_miss",
}
#: Event name to its kind letter.
HOOK_LETTERS: dict[str, str] = {name: kind.decode() for kind, name in HOOK_KINDS.items()}
#: At most this many webhooks wait in one shard's outbox (due and being delivered), so that an
#: endpoint down for long cannot grow Redis memory without bound (an entry is about 100 to
#: 400 bytes). Webhooks beyond it are dropped and counted; the next claim reports them.
OUTBOX_MAX = 100_000


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A webhook event claimed from a shard's outbox.

    Attributes:
        id: Stable id (the same on every redelivery): receivers de-duplicate by it.
        created_ms: When the transition happened (shard clock).
        name: The webhook event name (``member_added``...).
        app_id: The app.
        channel: The channel.
        rest: The user id (member events), the count (``subscription_count``) or the event's
            JSON fields (``client_event``); empty otherwise.
    """

    id: str
    created_ms: int
    name: str
    app_id: str
    channel: str
    rest: bytes


class OutboxClaim(NamedTuple):
    """What one shard's ``claim`` gave: its entries, and the webhooks it dropped since the
    last claim because its outbox was full (:data:`OUTBOX_MAX`)."""

    shard: int
    #: The shard's clock (ms) at the claim.
    now_ms: int
    entries: list[OutboxEntry]
    dropped: int


#: A webhook a re-assertion made due: ``("channel_occupied", None)`` or
#: ``("member_added", user_id)``.
Due = tuple[str, str | None]


def _flat_roster(flat: object) -> dict[str, str | None]:
    return FlatRoster(cast(list[bytes], flat)).decode()


# -- write operations ------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """One write operation of ``pg_apply``.

    Attributes:
        name: Its name in the batch.
        key: What its key is: a ``channel`` key, the ``shard`` tag, or ``any`` key (the raw
            operations the write-path tests and benchmarks use).
        args: Its arguments, in order.
        pairs: For a variable operation: the names of the pairs that follow ``args`` (their
            number is the last of ``args``).
        legacy: Shorter argument counts still accepted (nodes of library version 3 during a
            rolling upgrade).
        effect: What it does.
        reply: What it answers.
    """

    name: str
    key: Literal["channel", "shard", "any"]
    args: tuple[str, ...]
    effect: str
    reply: str
    pairs: tuple[str, str] | None = None
    legacy: tuple[int, ...] = ()


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("pjoin", "channel",
               ("owner", "user", "info", "exclude", "max", "hold", "ttl", "hooks"),
               "adds the owner's presence of the user; the user's first owner: **member_added** "
               "(published as `M`, its webhook in the outbox if `hooks` has `a`), cancelling a "
               "held member_removed of the user",
               "`{added, webhook, roster}`; `{-1}` when the channel has `max` users",
               legacy=(7,)),
        OpSpec("pleave", "channel", ("owner", "user", "hold", "hooks"),
               "removes it; the user's last owner: **member_removed** (published as `R`), its "
               "webhook held `hold` ms in the outbox (`m`)",
               "1 if it was the last owner", legacy=(3,)),
        OpSpec("subs", "channel", ("owner", "count", "hold", "publish", "ttl", "hooks"),
               "sets the owner's socket count; total 0 → >0: **channel_occupied** (`o`, unless "
               "it cancels a held vacate); >0 → 0: **channel_vacated** (`v`), held; `C<total>` "
               "published when `publish` is 1; a new non-zero total: subscription_count (`c`)",
               "`{before, after, occupied_webhook}`", legacy=(5,)),
        OpSpec("sync", "channel", ("owner", "count", "hold", "publish", "ttl", "hooks", "n"),
               "re-assertion: makes the owner's entries exactly `count` and the `n` members, "
               "through the transitions above (version 4: without `hooks`)",
               "the transitions made: `occupied`, `added\\0<user>`",
               pairs=("user", "info")),
        OpSpec("publish", "channel", ("payload", "kind", "rest"),
               "publishes the payload (`E...` or `T`) on the channel key and, in the same call, "
               "records its webhook in the outbox when `kind` is not empty (`e` client_event)",
               "receivers", legacy=(1,)),
        OpSpec("cache", "channel", ("frame", "ttl"),
               "stores a cache channel's last event", "OK"),
        OpSpec("claim", "shard", ("limit", "lease_ms"),
               "leases up to `limit` outbox entries to the caller for `lease_ms`: claimed ones "
               "whose lease ran out, then due ones (version 4, `limit` only: removes due held "
               "entries)",
               "the shard's time (ms), the webhooks dropped since the last claim (outbox full), "
               "then payloads `id\\0created\\0kind\\0key\\0rest`",
               legacy=(1,)),
        OpSpec("ack", "shard", ("ids",),
               "removes delivered (or given up) outbox entries; `ids` one per line",
               "entries removed"),
        OpSpec("defer", "shard", ("ids", "delay_ms"),
               "keeps claimed entries `delay_ms` longer (any node may claim them again after)",
               "entries still claimed"),
        OpSpec("hook", "channel", ("kind", "rest"),
               "records a webhook that goes with no write of state (`x` cache_miss) in the "
               "outbox, due now", "1"),
        OpSpec("lease", "shard", ("owner", "lease_ms", "first", "gap_ms", "grace_ms"),
               "refreshes the owner's lease (`first`: earlier incarnations of the node id are "
               "dead at once)",
               "the deadline (ms, Redis clock)", legacy=(3,)),
        OpSpec("check", "shard", ("owner", "ttl"),
               "refreshes the expiry of the owner's channels", "`{entries, digest}`"),
        OpSpec("reap", "shard", ("token", "lock_ms", "limit", "hold", "grace_ms"),
               "under the reap lock, removes dead owners' entries through the transitions",
               "`{-1}` (lock held elsewhere) or `{channels, dead owners left, entries}`",
               legacy=(4,)),
        OpSpec("repair", "channel", ("ttl",),
               "audit: rebuilds the channel's derived state", "corrections made"),
        OpSpec("purge", "channel", ("owner",),
               "audit: removes an owner that never held a lease, silently", "entries removed"),
        OpSpec("admin", "shard", ("action", "target", "ttl"),
               "audit: `del` a misplaced key or `pexpire` a key without expiry", "Redis's reply"),
        OpSpec("hset", "any", ("field", "value", "ttl"),
               "raw `HSET` (+ `PEXPIRE` when ttl > 0): write-path tests and benchmarks",
               "Redis's reply"),
        OpSpec("hdel", "any", ("field",), "raw `HDEL`", "Redis's reply"),
        OpSpec("del", "any", (), "raw `DEL`", "Redis's reply"),
        OpSpec("pexpire", "any", ("ttl",), "raw `PEXPIRE`", "Redis's reply"),
    )
}  # fmt: skip


def _n(value: int) -> bytes:
    return str(value).encode()


def _hooks(kinds: str) -> bytes:
    # Never empty nor a number: sync tells version 5's arguments from version 4's by it.
    return kinds.encode() if kinds else b"-"


def _flag(value: bool) -> bytes:
    return b"1" if value else b"0"


def pjoin(
    key: bytes,
    *,
    owner: bytes,
    user: str,
    info: str | None,
    exclude: str,
    max_members: int,
    hold_ms: int,
    ttl_ms: int,
    hooks: str = "",
) -> Op:
    """``pjoin``: this owner holds ``user`` in the presence channel ``key`` (``hooks``: the
    webhook kinds wanted on the channel, see :data:`HOOK_KINDS`)."""
    args = (owner, user.encode(), (info or "").encode(), exclude.encode(), _n(max_members),
            _n(hold_ms), _n(ttl_ms), _hooks(hooks))  # fmt: skip
    return (b"pjoin", key, args)


def decode_pjoin(reply: object) -> JoinResult:
    """The reply of ``pjoin``."""
    items = cast(list[object], reply)
    if items[0] == -1:
        return JoinResult(False, False, None)
    return JoinResult(items[0] == 1, items[1] == 1, FlatRoster(cast(list[bytes], items[2])))


def pleave(key: bytes, *, owner: bytes, user: str, hold_ms: int, hooks: str = "") -> Op:
    """``pleave``: this owner no longer holds ``user``."""
    return (b"pleave", key, (owner, user.encode(), _n(hold_ms), _hooks(hooks)))


def decode_pleave(reply: object) -> bool:
    """The reply of ``pleave``: whether it was the user's last owner anywhere."""
    return reply == 1


def subs(
    key: bytes,
    *,
    owner: bytes,
    count: int,
    hold_ms: int,
    publish: bool,
    ttl_ms: int,
    hooks: str = "",
) -> Op:
    """``subs``: this owner's absolute socket count in the channel."""
    args = (owner, _n(count), _n(hold_ms), _flag(publish), _n(ttl_ms), _hooks(hooks))
    return (b"subs", key, args)


def decode_subs(reply: object) -> SubsResult:
    """The reply of ``subs``."""
    items = cast(list[int], reply)
    return SubsResult(items[0], items[1], items[2] == 1)


def sync(
    key: bytes,
    *,
    owner: bytes,
    count: int,
    members: dict[str, str | None],
    hold_ms: int,
    publish: bool,
    ttl_ms: int,
    hooks: str = "",
) -> Op:
    """``sync``: this owner's entries in the channel are exactly ``count`` and ``members``."""
    args = [owner, _n(count), _n(hold_ms), _flag(publish), _n(ttl_ms), _hooks(hooks),
            _n(len(members))]  # fmt: skip
    for user, info in members.items():
        args += (user.encode(), (info or "").encode())
    return (b"sync", key, args)


def decode_sync(reply: object) -> list[Due]:
    """The reply of ``sync``: the webhooks its transitions made due."""
    out: list[Due] = []
    for item in cast(list[bytes], reply):
        if item == b"occupied":
            out.append(("channel_occupied", None))
        else:
            out.append(("member_added", item.split(b"\0", 1)[1].decode()))
    return out


def publish(key: bytes, payload: bytes, *, hook: tuple[str, str] | None = None) -> Op:
    """``publish``: ``payload`` (see :func:`encode_event`) to every node listening to ``key``;
    with ``hook`` (kind, rest), that webhook is recorded in the outbox in the same call."""
    kind, rest = hook or ("", "")
    return (b"publish", key, (payload, kind.encode(), rest.encode()))


def cache(key: bytes, *, frame: str, ttl_ms: int) -> Op:
    """``cache``: remember ``frame`` as the cache channel's last event."""
    return (b"cache", key, (frame.encode(), _n(ttl_ms)))


def claim(tag: bytes, *, limit: int, lease_ms: int) -> Op:
    """``claim``: lease up to ``limit`` outbox entries (shard tag ``tag``) for ``lease_ms``."""
    return (b"claim", tag, (_n(limit), _n(lease_ms)))


def decode_claim(shard: int, reply: object) -> OutboxClaim:
    """The reply of ``claim`` on ``shard``: the shard's time (ms), the webhooks dropped since
    the last claim (outbox full) and the entries (malformed ones are skipped)."""
    items = cast(list[object], reply)
    now, dropped = cast(int, items[0]), cast(int, items[1])
    out: list[OutboxEntry] = []
    for item in cast(list[bytes], items[2:]):
        parts = item.split(b"\0", 4)
        name = HOOK_KINDS.get(parts[2]) if len(parts) == 5 else None
        if name is None:
            continue
        try:
            app_id, channel = parse_channel_key(parts[3])
            created = int(parts[1])
        except ValueError:
            continue
        out.append(OutboxEntry(parts[0].decode(), created, name, app_id, channel, parts[4]))
    return OutboxClaim(shard, now, out, dropped)


def ack(tag: bytes, ids: Sequence[str]) -> Op:
    """``ack``: outbox entries delivered or given up."""
    return (b"ack", tag, ("\n".join(ids).encode(),))


def defer(tag: bytes, ids: Sequence[str], *, delay_ms: int) -> Op:
    """``defer``: keep claimed entries for ``delay_ms`` more."""
    return (b"defer", tag, ("\n".join(ids).encode(), _n(delay_ms)))


def hook(key: bytes, *, kind: str, rest: str) -> Op:
    """``hook``: record a webhook that goes with no write of state (``x`` cache_miss) in the
    outbox."""
    return (b"hook", key, (kind.encode(), rest.encode()))


def lease(
    tag: bytes, *, owner: bytes, lease_ms: int, first: bool, gap_ms: int, grace_ms: int
) -> Op:
    """``lease``: refresh ``owner``'s lease on the shard of tag ``tag``."""
    return (b"lease", tag, (owner, _n(lease_ms), _flag(first), _n(gap_ms), _n(grace_ms)))


def decode_lease(reply: object) -> int:
    """The reply of ``lease``: the new deadline (ms, Redis clock)."""
    return cast(int, reply)


def check(tag: bytes, *, owner: bytes, ttl_ms: int) -> Op:
    """``check``: refresh the expiry of ``owner``'s entries; return their digest."""
    return (b"check", tag, (owner, _n(ttl_ms)))


def decode_check(reply: object) -> tuple[int, int]:
    """The reply of ``check``: (entries, digest)."""
    items = cast(list[object], reply)
    return cast(int, items[0]), int(cast(bytes, items[1]))


def reap(tag: bytes, *, token: str, lock_ms: int, limit: int, hold_ms: int, grace_ms: int) -> Op:
    """``reap``: remove dead owners' entries under the shard's reap lock."""
    return (b"reap", tag, (token.encode(), _n(lock_ms), _n(limit), _n(hold_ms), _n(grace_ms)))


def decode_reap(reply: object) -> list[int]:
    """The reply of ``reap``: ``[-1]`` or ``[channels, dead owners left, entries removed]``."""
    return cast(list[int], reply)


def repair(key: bytes, *, ttl_ms: int) -> Op:
    """``repair``: rebuild the channel's derived state (audit)."""
    return (b"repair", key, (_n(ttl_ms),))


def purge(key: bytes, *, owner: bytes) -> Op:
    """``purge``: silently remove the entries of an owner that never held a lease (audit)."""
    return (b"purge", key, (owner,))


def admin_delete(tag: bytes, target: bytes) -> Op:
    """``admin del``: delete a key that does not belong on this shard (audit)."""
    return (b"admin", tag, (b"del", target, b"0"))


def admin_expire(tag: bytes, target: bytes, *, ttl_ms: int) -> Op:
    """``admin pexpire``: give a key without expiry one (audit)."""
    return (b"admin", tag, (b"pexpire", target, _n(ttl_ms)))


def entry_hash(text: bytes) -> int:
    """One entry's contribution to an owner's digest (``check``): 32 bits of its sha1."""
    return int(hashlib.sha1(text).hexdigest()[:8], 16)


def count_entry(key: bytes, count: int) -> bytes:
    """The digest text of an owner's socket count in channel ``key``."""
    return b"s\0" + key + b"\0" + _n(count)


def member_entry(key: bytes, user: str, info: str | None) -> bytes:
    """The digest text of an owner's presence of ``user`` in channel ``key``."""
    return b"p\0" + key + b"\0" + user.encode() + b"\0" + (info or "").encode()


# -- reads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadSpec:
    """A read-only function (``FCALL_RO``): one key (none for ``pg_version``), then ``args``."""

    name: str
    key: Literal["channel", "shard", "none"]
    args: tuple[str, ...]
    reply: str


READS: dict[str, ReadSpec] = {
    spec.name: spec
    for spec in (
        ReadSpec("pg_roster", "channel", (), "user, info, user, info, ... (live owners only)"),
        ReadSpec("pg_info", "channel", (), "`{subscription count, user count}`"),
        ReadSpec("pg_channels", "shard", ("prefix",),
                 "key, subscription count, user count, ... of occupied channels"),
        ReadSpec("pg_cache", "channel", (), "`{frame or nil, remaining ms}`"),
        ReadSpec("pg_leases", "shard", (), "owner, deadline, live/late/dead, ..."),
        ReadSpec("pg_owned", "shard", ("owner",), "channel keys the owner has entries in"),
        ReadSpec("pg_version", "none", (), "the library version"),
    )
}  # fmt: skip

#: A read command, ready for ``ShardConnection.command(*read)``.
Read = tuple[str | bytes | int, ...]


def read_roster(key: bytes) -> Read:
    """``pg_roster``: the members of a presence channel."""
    return ("FCALL_RO", "pg_roster", 1, key)


def decode_roster(reply: object) -> dict[str, str | None]:
    """The reply of ``pg_roster``: user id to ``user_info`` JSON text (None if none)."""
    return _flat_roster(reply)


def decode_user_ids(reply: object) -> list[str]:
    """The user ids of a ``pg_roster`` reply (what ``GET .../users`` lists)."""
    return [user.decode() for user in cast(list[bytes], reply)[::2]]


def read_info(key: bytes) -> Read:
    """``pg_info``: a channel's counts."""
    return ("FCALL_RO", "pg_info", 1, key)


def decode_info(reply: object) -> ChannelCounts:
    """The reply of ``pg_info``."""
    items = cast(list[int], reply)
    return ChannelCounts(items[0], items[1])


def read_channels(tag: bytes, app_id: str, prefix: str) -> Read:
    """``pg_channels``: occupied channels of ``app_id`` starting with ``prefix`` on a shard."""
    return ("FCALL_RO", "pg_channels", 1, tag, f"{{{app_id}:{prefix}")


def decode_channels(reply: object) -> dict[str, ChannelCounts]:
    """The reply of ``pg_channels``: channel name to its counts."""
    flat = cast(list[object], reply)
    out: dict[str, ChannelCounts] = {}
    for i in range(0, len(flat), 3):
        _, channel = parse_channel_key(cast(bytes, flat[i]))
        out[channel] = ChannelCounts(cast(int, flat[i + 1]), cast(int, flat[i + 2]))
    return out


def read_cache(key: bytes) -> Read:
    """``pg_cache``: a cache channel's last event."""
    return ("FCALL_RO", "pg_cache", 1, key)


def decode_cache(reply: object) -> tuple[str | None, int]:
    """The reply of ``pg_cache``: the frame (None if none) and its remaining time (ms)."""
    items = cast(list[object], reply)
    frame = items[0]
    return (frame.decode() if isinstance(frame, bytes) else None), cast(int, items[1])


def read_leases(tag: bytes) -> Read:
    """``pg_leases``: every owner with a lease on the shard."""
    return ("FCALL_RO", "pg_leases", 1, tag)


def decode_leases(reply: object) -> list[tuple[str, int, str]]:
    """The reply of ``pg_leases``: ``(owner, deadline ms, "live" | "late" | "dead")``."""
    flat = cast(list[bytes], reply)
    return [
        (flat[i].decode(), int(flat[i + 1]), flat[i + 2].decode()) for i in range(0, len(flat), 3)
    ]


def decode_lease_states(reply: object) -> dict[bytes, str]:
    """The reply of ``pg_leases`` as raw owner to state (for the audit)."""
    flat = cast(list[bytes], reply)
    return {flat[i]: flat[i + 2].decode() for i in range(0, len(flat), 3)}


def read_owned(tag: bytes, owner: bytes) -> Read:
    """``pg_owned``: the channels ``owner`` has entries in on the shard."""
    return ("FCALL_RO", "pg_owned", 1, tag, owner)


def decode_owned(reply: object) -> list[tuple[str, str]]:
    """The reply of ``pg_owned``: (app id, channel) pairs."""
    return [parse_channel_key(k) for k in cast(list[bytes], reply)]


def read_version() -> Read:
    """``pg_version``: the library version loaded on the server (no key)."""
    return ("FCALL_RO", "pg_version", 0)


# -- Pub/Sub messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageKind:
    """One kind of Pub/Sub message (see the module docstring)."""

    kind: str
    publisher: Literal["library", "node"]
    meaning: str


MESSAGES: dict[str, MessageKind] = {
    m.kind: m
    for m in (
        MessageKind("E", "node", "an event frame, except for one socket"),
        MessageKind("M", "library", "member_added"),
        MessageKind("R", "library", "member_removed"),
        MessageKind("C", "library", "subscription_count"),
        MessageKind("T", "node", "terminate a user's connections"),
    )
}


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
    """An ``M`` message, as the library publishes it."""
    user = user_id.encode()
    return (
        b"M"
        + (exclude or "").encode()
        + b"\0"
        + _n(len(user))
        + b":"
        + user
        + (user_info or "").encode()
    )


def encode_member_removed(user_id: str) -> bytes:
    """An ``R`` message, as the library publishes it."""
    return b"R" + user_id.encode()


def encode_count(count: int) -> bytes:
    """A ``C`` message, as the library publishes it."""
    return b"C" + _n(count)


def encode_terminate() -> bytes:
    """A ``T`` message."""
    return b"T"


def decode_message(data: bytes) -> Message | None:
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


# -- documentation ---------------------------------------------------------------------------


def ops_markdown() -> str:
    """The operations and read functions as the Markdown tables of ``docs/store.md``."""
    lines = [
        "| op (key) | arguments | effect | reply |",
        "|---|---|---|---|",
    ]
    for spec in OPS.values():
        args = " ".join(spec.args)
        if spec.pairs:
            args += f" then n x ({' '.join(spec.pairs)})"
        if spec.legacy:
            args += f" (also {', '.join(map(str, spec.legacy))}: older nodes)"
        lines.append(
            f"| `{spec.name}` ({spec.key}) | {args or '-'} | {spec.effect} | {spec.reply} |"
        )
    lines += [
        "",
        "| read function (key) | arguments | reply |",
        "|---|---|---|",
    ]
    for read in READS.values():
        lines.append(
            f"| `{read.name}` ({read.key}) | {' '.join(read.args) or '-'} | {read.reply} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(ops_markdown(), end="")
