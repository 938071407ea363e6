"""Presence and subscription state on the shards: joins, leaves, counts, events, reads.

Every write goes through the verified batch writer as an op of the shard function library
(``pjoin``, ``pleave``, ``subs``, ``publish``, ``cache``, ``claim``); the global transitions
(first connection of a user anywhere, last one gone, channel occupied or vacated) are decided
atomically on the channel's shard and published there, so they happen once however many
gateway nodes are involved. The Redis layout is described in docs/store.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from gateway._native import ReplyError
from gateway.shards.connection import ConnectionLost
from gateway.shards.shardset import ShardSet
from gateway.shards.writer import BatchWriter, Op, ShardUnavailableError

__all__ = [
    "ChannelCounts",
    "DueWebhook",
    "JoinResult",
    "PresenceStore",
    "SubsResult",
    "channel_key",
    "parse_channel_key",
]


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


@dataclass(frozen=True)
class JoinResult:
    """Outcome of a presence join.

    Attributes:
        added: This was the user's first connection in the channel on any node
            (``member_added`` was published to every node).
        webhook: A ``member_added`` webhook is due (false when the join cancelled a held
            ``member_removed``: the user came back within the hold).
        roster: The channel's members, user id to ``user_info`` JSON text (None if none);
            None when the channel is full and the join was refused.
    """

    added: bool
    webhook: bool
    roster: dict[str, str | None] | None


@dataclass(frozen=True)
class SubsResult:
    """Outcome of setting this node's subscriber count of a channel."""

    before: int
    after: int
    occupied_webhook: bool


@dataclass(frozen=True)
class ChannelCounts:
    """Subscription count (connections) and user count (distinct presence users)."""

    subscription_count: int
    user_count: int


@dataclass(frozen=True)
class DueWebhook:
    """A held ``member_removed`` or ``channel_vacated`` webhook whose hold has passed."""

    app_id: str
    channel: str
    name: str
    user_id: str | None


def _roster(flat: object) -> dict[str, str | None]:
    items = cast(list[bytes], flat)
    return {items[i].decode(): (items[i + 1].decode() or None) for i in range(0, len(items), 2)}


class PresenceStore:
    """This node's view of the sharded presence and subscription state.

    Args:
        shards: The verified shard links (reads go to the shard's verified master).
        writer: The batched writer (all writes).
        owner: This node's owner string (``node_id@incarnation``); entries it writes carry it.
        hold_ms: How long ``member_removed`` / ``channel_vacated`` webhooks are held.
        max_members: Presence members per channel.
    """

    def __init__(
        self,
        shards: ShardSet,
        writer: BatchWriter,
        *,
        owner: str,
        hold_ms: int = 3000,
        max_members: int = 100,
        entry_ttl_ms: int = 300_000,
    ) -> None:
        self.shards = shards
        self.writer = writer
        self.owner = owner.encode()
        self.hold = str(hold_ms).encode()
        self.max_members = str(max_members).encode()
        self.ttl = str(entry_ttl_ms).encode()

    def shard_of(self, app_id: str, channel: str) -> int:
        """The shard holding ``channel``."""
        return self.shards.table.shard_for_key(channel_key(app_id, channel))

    # -- writes ------------------------------------------------------------------------------

    async def join(
        self, app_id: str, channel: str, user_id: str, user_info: str | None, exclude: str
    ) -> JoinResult:
        """Record that this node holds ``user_id`` in presence ``channel``.

        ``exclude`` is the joining socket's id: it gets ``subscription_succeeded``, not
        ``member_added``.
        """
        reply = cast(
            list[object],
            await self.writer.write(
                b"pjoin",
                channel_key(app_id, channel),
                self.owner,
                user_id.encode(),
                (user_info or "").encode(),
                exclude.encode(),
                self.max_members,
                self.hold,
                self.ttl,
            ),
        )
        if reply[0] == -1:
            return JoinResult(False, False, None)
        return JoinResult(reply[0] == 1, reply[1] == 1, _roster(reply[2]))

    async def leave(self, app_id: str, channel: str, user_id: str) -> bool:
        """Record that this node no longer holds ``user_id``; True if it was the last anywhere."""
        reply = await self.writer.write(
            b"pleave", channel_key(app_id, channel), self.owner, user_id.encode(), self.hold
        )
        return reply == 1

    async def set_subscribers(
        self, app_id: str, channel: str, count: int, *, publish_count: bool
    ) -> SubsResult:
        """Set this node's absolute subscriber count of ``channel``."""
        reply = cast(
            list[int],
            await self.writer.write(
                b"subs",
                channel_key(app_id, channel),
                self.owner,
                str(count).encode(),
                self.hold,
                b"1" if publish_count else b"0",
                self.ttl,
            ),
        )
        return SubsResult(reply[0], reply[1], reply[2] == 1)

    async def sync(
        self,
        app_id: str,
        channel: str,
        count: int,
        members: dict[str, str | None],
        *,
        publish_count: bool,
    ) -> list[tuple[str, str | None]]:
        """Make this node's entries in ``channel`` exactly ``count`` and ``members``.

        The re-assertion of absolute state: missing entries are added and extra ones removed
        through the normal transitions. Returns the webhooks due: ``("channel_occupied",
        None)`` and ``("member_added", user_id)``.
        """
        op, key, args = self.sync_op(app_id, channel, count, members, publish_count=publish_count)
        return self.parse_sync(await self.writer.write(op, key, *args))

    def sync_op(
        self,
        app_id: str,
        channel: str,
        count: int,
        members: dict[str, str | None],
        *,
        publish_count: bool,
    ) -> Op:
        """The write of :meth:`sync`, for callers that submit many at once."""
        args: list[bytes] = [
            self.owner,
            str(count).encode(),
            self.hold,
            b"1" if publish_count else b"0",
            self.ttl,
            str(len(members)).encode(),
        ]
        for user, info in members.items():
            args += [user.encode(), (info or "").encode()]
        return (b"sync", channel_key(app_id, channel), args)

    @staticmethod
    def parse_sync(reply: object) -> list[tuple[str, str | None]]:
        """The webhooks due from a ``sync`` reply (see :meth:`sync`)."""
        out: list[tuple[str, str | None]] = []
        for item in cast(list[bytes], reply):
            if item == b"occupied":
                out.append(("channel_occupied", None))
            else:
                out.append(("member_added", item.split(b"\0", 1)[1].decode()))
        return out

    def shard_tag(self, shard: int) -> bytes | None:
        """The hash tag of shard ``shard``'s own keys, once its identity is verified."""
        identity = self.shards.links[shard].identity
        return identity.tag.encode() if identity is not None and identity.tag else None

    def lease_op(self, shard: int, lease_ms: int, *, first: bool, gap_ms: int, grace_ms: int) -> Op:
        """The write that refreshes this node's lease on ``shard`` (see :meth:`lease`).

        Raises:
            ShardUnavailableError: The shard's identity is not verified yet.
        """
        tag = self.shard_tag(shard)
        if tag is None:
            raise ShardUnavailableError(f"shard {shard} not verified yet")
        args = (
            self.owner,
            str(lease_ms).encode(),
            b"1" if first else b"0",
            str(gap_ms).encode(),
            str(grace_ms).encode(),
        )
        return (b"lease", tag, args)

    async def lease(
        self, shard: int, lease_ms: int, *, first: bool, gap_ms: int, grace_ms: int
    ) -> int:
        """Refresh this node's lease on ``shard``; returns the deadline (Redis time, ms).

        Args:
            shard: The shard.
            lease_ms: How long the lease lasts from now (Redis clock).
            first: This incarnation's first lease, which makes earlier incarnations of the
                same node id dead at once.
            gap_ms: A period longer than this without any node's refresh counts as one in
                which the shard was unreachable: owners whose lease expired in it get the
                grace to refresh before they count as gone.
            grace_ms: The reap grace (recorded on the shard for its reads).
        """
        op, key, args = self.lease_op(
            shard, lease_ms, first=first, gap_ms=gap_ms, grace_ms=grace_ms
        )
        return cast(int, await self.writer.write(op, key, *args))

    async def check(self, shard: int) -> tuple[int, int]:
        """Refresh the expiry of this node's entries on ``shard``; return their (count, digest)."""
        tag = self.shard_tag(shard)
        if tag is None:
            raise ShardUnavailableError(f"shard {shard} not verified yet")
        reply = cast(list[object], await self.writer.write(b"check", tag, self.owner, self.ttl))
        return cast(int, reply[0]), int(cast(bytes, reply[1]))

    async def reap(
        self, shard: int, token: str, *, lock_ms: int, limit: int, grace_ms: int
    ) -> list[int]:
        """Reap dead owners' entries on ``shard`` under the shard's reap lock.

        Only owners that are not alive and whose lease expired more than ``grace_ms`` ago are
        reaped (the rule is in ``functions.lua``, ``alive`` and ``reap``). Returns ``[-1]``
        when another node holds the lock, else ``[channels reaped, dead owners left, entries
        removed]``.
        """
        tag = self.shard_tag(shard)
        if tag is None:
            return [-1]
        reply = await self.writer.write(
            b"reap",
            tag,
            token.encode(),
            str(lock_ms).encode(),
            str(limit).encode(),
            self.hold,
            str(grace_ms).encode(),
        )
        return cast(list[int], reply)

    async def leases(self, shard: int) -> list[tuple[str, int, str]]:
        """Every owner with a lease on ``shard``: ``(owner, deadline ms, state)``.

        ``state`` is ``"live"`` (its entries are counted), ``"late"`` (not counted, but within
        the reap grace) or ``"dead"`` (the reaper removes its entries).
        """
        tag = self.shard_tag(shard)
        if tag is None:
            raise ShardUnavailableError(f"shard {shard} not verified yet")
        flat = cast(list[bytes], await self._read(shard, "FCALL_RO", "pg_leases", 1, tag))
        return [
            (flat[i].decode(), int(flat[i + 1]), flat[i + 2].decode())
            for i in range(0, len(flat), 3)
        ]

    async def owned(self, shard: int) -> list[tuple[str, str]]:
        """Channels (app id, channel) in which this node has entries on ``shard``."""
        tag = self.shard_tag(shard)
        if tag is None:
            raise ShardUnavailableError(f"shard {shard} not verified yet")
        reply = await self._read(shard, "FCALL_RO", "pg_owned", 1, tag, self.owner)
        return [parse_channel_key(k) for k in cast(list[bytes], reply)]

    async def publish(self, app_id: str, channel: str, payload: bytes) -> None:
        """Publish ``payload`` to every node listening to ``channel``."""
        await self.writer.write(b"publish", channel_key(app_id, channel), payload)

    async def cache_set(self, app_id: str, channel: str, frame: str, ttl_ms: int) -> None:
        """Remember ``frame`` as the last event of cache channel ``channel``."""
        await self.writer.write(
            b"cache", channel_key(app_id, channel), frame.encode(), str(ttl_ms).encode()
        )

    async def claim_due(self, limit: int = 100) -> list[DueWebhook]:
        """Claim held webhooks whose hold has passed, on every usable shard.

        Each item is claimed by exactly one caller in the whole deployment.
        """
        out: list[DueWebhook] = []
        for link in self.shards.links:
            if not link.usable or link.identity is None or not link.identity.tag:
                continue
            try:
                items = await self.writer.write(
                    b"claim", link.identity.tag.encode(), str(limit).encode()
                )
            except (ShardUnavailableError, ReplyError):
                continue
            for item in cast(list[bytes], items):
                key, kind, user = item.split(b"\0", 2)
                app_id, channel = parse_channel_key(key)
                if kind == b"m":
                    out.append(DueWebhook(app_id, channel, "member_removed", user.decode()))
                else:
                    out.append(DueWebhook(app_id, channel, "channel_vacated", None))
        return out

    # -- reads -------------------------------------------------------------------------------

    async def _read(self, shard: int, *args: bytes | str | int) -> object:
        link = self.shards.links[shard]
        conn = link.conn
        if not link.usable or conn is None:
            raise ShardUnavailableError(f"{link.spec.name} unavailable: {link.last_error}")
        try:
            return await conn.command(*args)
        except (ConnectionLost, TimeoutError) as exc:
            raise ShardUnavailableError(f"{link.spec.name}: {exc}") from exc

    async def _read_roster(self, app_id: str, channel: str) -> list[bytes]:
        """``pg_roster``'s flat reply: user id, user_info, user id, user_info, ..."""
        key = channel_key(app_id, channel)
        flat = await self._read(
            self.shards.table.shard_for_key(key), "FCALL_RO", "pg_roster", 1, key
        )
        return cast(list[bytes], flat)

    async def roster(self, app_id: str, channel: str) -> dict[str, str | None]:
        """Members of a presence channel: user id to ``user_info`` JSON text."""
        return _roster(await self._read_roster(app_id, channel))

    async def user_ids(self, app_id: str, channel: str) -> list[str]:
        """Ids of the members of a presence channel (what ``GET .../users`` lists)."""
        return [user.decode() for user in (await self._read_roster(app_id, channel))[::2]]

    async def counts(self, app_id: str, channel: str) -> ChannelCounts:
        """Subscription and user counts of a channel (0, 0 when unoccupied)."""
        key = channel_key(app_id, channel)
        reply = cast(
            list[int],
            await self._read(self.shards.table.shard_for_key(key), "FCALL_RO", "pg_info", 1, key),
        )
        return ChannelCounts(reply[0], reply[1])

    async def channels(self, app_id: str, prefix: str = "") -> dict[str, ChannelCounts]:
        """Occupied channels of an app whose name starts with ``prefix``, from every shard.

        Raises:
            ShardUnavailableError: A shard could not be read (the answer would be partial).
        """
        match = f"{{{app_id}:{prefix}"
        out: dict[str, ChannelCounts] = {}
        for link in self.shards.links:
            if link.identity is None or not link.identity.tag:
                raise ShardUnavailableError(f"{link.spec.name} unavailable: {link.last_error}")
            flat = cast(
                list[object],
                await self._read(
                    link.index, "FCALL_RO", "pg_channels", 1, link.identity.tag, match
                ),
            )
            for i in range(0, len(flat), 3):
                _, channel = parse_channel_key(cast(bytes, flat[i]))
                out[channel] = ChannelCounts(cast(int, flat[i + 1]), cast(int, flat[i + 2]))
        return out

    async def cache_get(self, app_id: str, channel: str) -> tuple[str | None, int]:
        """The cached last event of a cache channel and its remaining time to live (ms)."""
        key = channel_key(app_id, channel)
        reply = cast(
            list[object],
            await self._read(self.shards.table.shard_for_key(key), "FCALL_RO", "pg_cache", 1, key),
        )
        frame = reply[0]
        return (frame.decode() if isinstance(frame, bytes) else None), cast(int, reply[1])
