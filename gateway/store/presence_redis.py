"""The state store on sharded Redis: every write a verified op of the shard function library.

Writes go through the batched writer as ops of ``functions.lua`` (built and decoded by
:mod:`gateway.shards.contract`); the global transitions are decided atomically on the
channel's shard and published there, so they happen once however many gateway nodes are
involved. Reads go to the shard's verified master. The Redis layout is described in
docs/store.md.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from gateway.shards import contract as c
from gateway.shards.connection import ConnectionLost
from gateway.shards.shardset import ShardSet
from gateway.shards.writer import BatchWriter, ShardUnavailableError
from gateway.store.presence import (
    ChannelCounts,
    Due,
    HooksFor,
    JoinResult,
    LocalChannel,
    OutboxClaim,
    SubsItem,
    SubsResult,
)

_T = TypeVar("_T")


def _settle_one(
    decode: Callable[[object], _T],
    done: Callable[[_T | BaseException], None],
    future: asyncio.Future[list[object]],
) -> None:
    """Hand the decoded reply of a one-op submission, or its error, to ``done``."""
    done(_decoded(decode, future, 1)[0])


def _settle_many(
    decode: Callable[[object], _T],
    done: Callable[[list[_T | BaseException]], None],
    n: int,
    future: asyncio.Future[list[object]],
) -> None:
    """Hand the decoded replies of an ``n``-op submission, or their errors, to ``done``."""
    done(_decoded(decode, future, n))


def _decoded(
    decode: Callable[[object], _T], future: asyncio.Future[list[object]], n: int
) -> list[_T | BaseException]:
    """The ``n`` replies of a submission, decoded, or the error of each op."""
    if future.cancelled():
        return [asyncio.CancelledError() for _ in range(n)]
    exc = future.exception()
    if exc is not None:
        return [exc] * n
    out: list[_T | BaseException] = []
    for reply in future.result():
        if isinstance(reply, BaseException):
            out.append(reply)
            continue
        try:
            out.append(decode(reply))
        except Exception as error:  # a reply of the wrong shape
            out.append(error)
    return out


__all__ = ["RedisPresenceStore"]


class RedisPresenceStore:
    """This node's view of the sharded presence and subscription state (see
    :class:`~gateway.store.presence.PresenceStore`).

    Args:
        shards: The verified shard links (reads go to the shard's verified master).
        writer: The batched writer (all writes).
        owner: This node's owner string (``node_id@incarnation``); entries it writes carry it.
        hold_ms: How long ``member_removed`` / ``channel_vacated`` webhooks are held.
        max_members: Presence members per channel.
        entry_ttl_ms: Expiry of every entry unless refreshed by the anti-entropy check.
        hooks: The webhook kinds an app wants recorded for a channel (default: none).
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
        hooks: HooksFor | None = None,
    ) -> None:
        self.hooks_for: HooksFor = hooks or _no_hooks
        self.shards = shards
        self.writer = writer
        self.owner = owner.encode()
        self.hold_ms = hold_ms
        self.max_members = max_members
        self.ttl_ms = entry_ttl_ms

    def shard_of(self, app_id: str, channel: str) -> int:
        """The shard holding ``channel``."""
        return self.shards.table.shard_for_key(c.channel_key(app_id, channel))

    def shard_name(self, shard: int) -> str:
        """A shard's name from the topology."""
        return self.shards.links[shard].spec.name

    def shard_tag(self, shard: int) -> bytes | None:
        """The hash tag of shard ``shard``'s own keys, once its identity is verified."""
        identity = self.shards.links[shard].identity
        return identity.tag.encode() if identity is not None and identity.tag else None

    def _tag(self, shard: int) -> bytes:
        tag = self.shard_tag(shard)
        if tag is None:
            raise ShardUnavailableError(f"shard {shard} not verified yet")
        return tag

    async def _write(self, op: c.Op) -> object:
        return await self.writer.write(op[0], op[1], *op[2])

    # -- writes ------------------------------------------------------------------------------

    async def join(
        self,
        app_id: str,
        channel: str,
        user_id: str,
        user_info: str | None,
        exclude: str,
        *,
        max_members: int | None = None,
    ) -> JoinResult:
        """See :meth:`PresenceStore.join <gateway.store.presence.PresenceStore.join>`."""
        op = self._join_op(app_id, channel, user_id, user_info, exclude, max_members)
        return c.decode_pjoin(await self._write(op))

    def _join_op(
        self,
        app_id: str,
        channel: str,
        user_id: str,
        user_info: str | None,
        exclude: str,
        max_members: int | None,
    ) -> c.Op:
        return c.pjoin(
            c.channel_key(app_id, channel),
            owner=self.owner,
            user=user_id,
            info=user_info,
            exclude=exclude,
            max_members=self.max_members if max_members is None else max_members,
            hold_ms=self.hold_ms,
            ttl_ms=self.ttl_ms,
            hooks=self.hooks_for(app_id, channel),
        )

    def _leave_op(self, app_id: str, channel: str, user_id: str) -> c.Op:
        return c.pleave(
            c.channel_key(app_id, channel),
            owner=self.owner,
            user=user_id,
            hold_ms=self.hold_ms,
            hooks=self.hooks_for(app_id, channel),
        )

    def submit_join(
        self,
        app_id: str,
        channel: str,
        user_id: str,
        user_info: str | None,
        exclude: str,
        done: Callable[[JoinResult | BaseException], None],
        *,
        max_members: int | None = None,
    ) -> asyncio.Future[Any]:
        """See :meth:`PresenceStore.submit_join`: straight to the writer, no task."""
        op = self._join_op(app_id, channel, user_id, user_info, exclude, max_members)
        future = self.writer.submit_many((op,))
        future.add_done_callback(functools.partial(_settle_one, c.decode_pjoin, done))
        return future

    def submit_leave(
        self, app_id: str, channel: str, user_id: str, done: Callable[[bool | BaseException], None]
    ) -> asyncio.Future[Any]:
        """See :meth:`PresenceStore.submit_leave`."""
        future = self.writer.submit_many((self._leave_op(app_id, channel, user_id),))
        future.add_done_callback(functools.partial(_settle_one, c.decode_pleave, done))
        return future

    def submit_subscribers(
        self,
        items: Sequence[SubsItem],
        done: Callable[[list[SubsResult | BaseException]], None],
    ) -> asyncio.Future[Any]:
        """See :meth:`PresenceStore.submit_subscribers`: one submission for all items."""
        ops = [self._subs_op(*item) for item in items]
        future = self.writer.submit_many(ops)
        future.add_done_callback(functools.partial(_settle_many, c.decode_subs, done, len(ops)))
        return future

    async def leave(self, app_id: str, channel: str, user_id: str) -> bool:
        """See :meth:`PresenceStore.leave <gateway.store.presence.PresenceStore.leave>`."""
        return c.decode_pleave(await self._write(self._leave_op(app_id, channel, user_id)))

    async def set_subscribers(
        self, app_id: str, channel: str, count: int, *, publish_count: bool
    ) -> SubsResult:
        """See :meth:`PresenceStore.set_subscribers`."""
        op = self._subs_op(app_id, channel, count, publish_count)
        return c.decode_subs(await self._write(op))

    def _subs_op(self, app_id: str, channel: str, count: int, publish: bool) -> c.Op:
        return c.subs(
            c.channel_key(app_id, channel),
            owner=self.owner,
            count=count,
            hold_ms=self.hold_ms,
            publish=publish,
            ttl_ms=self.ttl_ms,
            hooks=self.hooks_for(app_id, channel),
        )

    def sync_op(self, app_id: str, channel: str, local: LocalChannel) -> c.Op:
        """The ``sync`` write that makes this node's entries in ``channel`` exactly ``local``."""
        return c.sync(
            c.channel_key(app_id, channel),
            owner=self.owner,
            count=local.count,
            members=local.members,
            hold_ms=self.hold_ms,
            publish=local.publish_count,
            ttl_ms=self.ttl_ms,
            hooks=self.hooks_for(app_id, channel),
        )

    async def sync_many(
        self, channels: Sequence[tuple[str, str, LocalChannel]]
    ) -> list[list[Due] | BaseException]:
        """See :meth:`PresenceStore.sync_many`: one batch, submitted in one step."""
        ops = [self.sync_op(app_id, channel, local) for app_id, channel, local in channels]
        results = await self.writer.submit_many(ops)
        return [r if isinstance(r, BaseException) else c.decode_sync(r) for r in results]

    async def sync(self, app_id: str, channel: str, local: LocalChannel) -> list[Due]:
        """Re-assert one channel (see :meth:`sync_many`)."""
        return c.decode_sync(await self._write(self.sync_op(app_id, channel, local)))

    def lease_op(
        self, shard: int, lease_ms: int, *, first: bool, gap_ms: int, grace_ms: int
    ) -> c.Op:
        """The write that refreshes this node's lease on ``shard`` (see :meth:`lease`).

        Raises:
            ShardUnavailableError: The shard's identity is not verified yet.
        """
        return c.lease(
            self._tag(shard),
            owner=self.owner,
            lease_ms=lease_ms,
            first=first,
            gap_ms=gap_ms,
            grace_ms=grace_ms,
        )

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
        op = self.lease_op(shard, lease_ms, first=first, gap_ms=gap_ms, grace_ms=grace_ms)
        return c.decode_lease(await self._write(op))

    async def check(self, shard: int) -> tuple[int, int]:
        """See :meth:`PresenceStore.check`."""
        op = c.check(self._tag(shard), owner=self.owner, ttl_ms=self.ttl_ms)
        return c.decode_check(await self._write(op))

    async def reap(
        self, shard: int, token: str, *, lock_ms: int, limit: int, grace_ms: int
    ) -> list[int]:
        """See :meth:`PresenceStore.reap` (the rule is in ``functions.lua``, ``alive`` and
        ``reap``)."""
        tag = self.shard_tag(shard)
        if tag is None:
            return [-1]
        op = c.reap(
            tag, token=token, lock_ms=lock_ms, limit=limit, hold_ms=self.hold_ms, grace_ms=grace_ms
        )
        return c.decode_reap(await self._write(op))

    async def publish(
        self, app_id: str, channel: str, payload: bytes, *, hook: tuple[str, str] | None = None
    ) -> None:
        """See :meth:`PresenceStore.publish`."""
        await self._write(c.publish(c.channel_key(app_id, channel), payload, hook=hook))

    async def cache_set(self, app_id: str, channel: str, frame: str, ttl_ms: int) -> None:
        """See :meth:`PresenceStore.cache_set`."""
        await self._write(c.cache(c.channel_key(app_id, channel), frame=frame, ttl_ms=ttl_ms))

    async def claim_outbox(self, limit: int, lease_ms: int) -> list[OutboxClaim]:
        """See :meth:`PresenceStore.claim_outbox`."""
        usable = [
            link.index
            for link in self.shards.links
            if link.usable and link.identity is not None and link.identity.tag
        ]
        ops = [c.claim(self._tag(i), limit=limit, lease_ms=lease_ms) for i in usable]
        replies = await self.writer.submit_many(ops) if ops else []
        out = []
        for shard, reply in zip(usable, replies, strict=True):
            if isinstance(reply, BaseException):
                continue  # that shard's entries wait for the next claim
            claimed = c.decode_claim(shard, reply)
            if claimed.entries or claimed.dropped:
                out.append(claimed)
        return out

    async def ack_outbox(self, shard: int, ids: Sequence[str]) -> None:
        """See :meth:`PresenceStore.ack_outbox`."""
        await self._write(c.ack(self._tag(shard), ids))

    async def defer_outbox(self, shard: int, ids: Sequence[str], delay_ms: int) -> None:
        """See :meth:`PresenceStore.defer_outbox`."""
        await self._write(c.defer(self._tag(shard), ids, delay_ms=delay_ms))

    def submit_hook(self, app_id: str, channel: str, kind: str, rest: str) -> asyncio.Future[Any]:
        """See :meth:`PresenceStore.submit_hook`."""
        op = c.hook(c.channel_key(app_id, channel), kind=kind, rest=rest)
        return self.writer.submit_many((op,))

    # -- reads -------------------------------------------------------------------------------

    async def _read(self, shard: int, read: c.Read) -> object:
        link = self.shards.links[shard]
        conn = link.conn
        if not link.usable or conn is None:
            raise ShardUnavailableError(f"{link.spec.name} unavailable: {link.last_error}")
        try:
            return await conn.command(*read)
        except (ConnectionLost, TimeoutError) as exc:
            raise ShardUnavailableError(f"{link.spec.name}: {exc}") from exc

    async def _read_channel(
        self, app_id: str, channel: str, read: Callable[[bytes], c.Read]
    ) -> object:
        key = c.channel_key(app_id, channel)
        return await self._read(self.shards.table.shard_for_key(key), read(key))

    async def leases(self, shard: int) -> list[tuple[str, int, str]]:
        """See :meth:`PresenceStore.leases`."""
        return c.decode_leases(await self._read(shard, c.read_leases(self._tag(shard))))

    async def owned(self, shard: int) -> list[tuple[str, str]]:
        """See :meth:`PresenceStore.owned`."""
        return c.decode_owned(await self._read(shard, c.read_owned(self._tag(shard), self.owner)))

    async def roster(self, app_id: str, channel: str) -> dict[str, str | None]:
        """See :meth:`PresenceStore.roster`."""
        return c.decode_roster(await self._read_channel(app_id, channel, c.read_roster))

    async def user_ids(self, app_id: str, channel: str) -> list[str]:
        """See :meth:`PresenceStore.user_ids`."""
        return c.decode_user_ids(await self._read_channel(app_id, channel, c.read_roster))

    async def counts(self, app_id: str, channel: str) -> ChannelCounts:
        """See :meth:`PresenceStore.counts`."""
        return c.decode_info(await self._read_channel(app_id, channel, c.read_info))

    async def channels(self, app_id: str, prefix: str = "") -> dict[str, ChannelCounts]:
        """See :meth:`PresenceStore.channels`.

        Raises:
            ShardUnavailableError: A shard could not be read (the answer would be partial).
        """
        out: dict[str, ChannelCounts] = {}
        for link in self.shards.links:
            if link.identity is None or not link.identity.tag:
                raise ShardUnavailableError(f"{link.spec.name} unavailable: {link.last_error}")
            read = c.read_channels(link.identity.tag.encode(), app_id, prefix)
            out.update(c.decode_channels(await self._read(link.index, read)))
        return out

    async def cache_get(self, app_id: str, channel: str) -> tuple[str | None, int]:
        """See :meth:`PresenceStore.cache_get`."""
        return c.decode_cache(await self._read_channel(app_id, channel, c.read_cache))


def _no_hooks(app_id: str, channel: str) -> str:
    return ""
