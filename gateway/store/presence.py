"""The state-store interface: what a node asks of the shared presence and subscription state.

Two implementations follow the same semantics and pass the same behavioural tests
(tests/test_store.py): :class:`~gateway.store.presence_redis.RedisPresenceStore`, the real one
(sharded Redis, verified writes through the shard function library), and
:class:`~gateway.store.presence_memory.MemoryPresenceStore`, its in-memory twin, with which the
hub's concurrency is tested deterministically (tests/test_hub.py).

The semantics, decided atomically per channel on the channel's shard:

* Entries belong to an **owner** (``node_id@incarnation``) and are absolute: a node's socket
  count in a channel, a node's presence of a user. A user is a member while any owner with a
  live lease holds it.
* **Transitions happen once** however many nodes are involved: ``member_added`` (first owner of
  a user), ``member_removed`` (last owner gone), ``channel_occupied`` (total count 0 to more),
  ``channel_vacated`` (back to 0). Member changes are published to every node listening to the
  channel; the caller whose write made an ``added``/``occupied`` transition gets a flag saying
  its webhook is due.
* Webhooks are recorded in the shard's **outbox** by the same call that makes their
  transition (only the kinds the app wants on the channel, see ``hooks``), with a stable id.
  ``member_removed`` and ``channel_vacated`` are **held** for ``hold_ms``: the same transition
  back within the hold cancels both (a page reload sends none). Any node claims due entries
  (:meth:`PresenceStore.claim_outbox`, leased), delivers them and acknowledges them; entries of
  a node that died meanwhile are claimed again when their lease runs out (at least once).
* Reads count only owners whose **lease** is live; the reaper removes a dead owner's entries
  through the same transitions (so ``member_removed`` goes out for users it held).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.shards.contract import (
    ChannelCounts,
    Due,
    JoinResult,
    OutboxClaim,
    OutboxEntry,
    SubsResult,
)

__all__ = [
    "ChannelCounts",
    "Due",
    "HooksFor",
    "JoinResult",
    "LocalChannel",
    "LocalState",
    "OutboxClaim",
    "OutboxEntry",
    "PresenceStore",
    "SubsItem",
    "SubsResult",
    "Subscriptions",
]


@dataclass(frozen=True)
class LocalChannel:
    """What one node really holds in one channel: its socket count and presence members.

    Attributes:
        count: Sockets of the node subscribed to the channel.
        members: Presence users the node holds, user id to ``user_info`` JSON text.
        publish_count: Whether count changes are announced (``subscription_count``).
    """

    count: int
    members: dict[str, str | None]
    publish_count: bool


#: (app id, channel) -> what the node holds there.
LocalState = dict[tuple[str, str], LocalChannel]

#: The webhook kinds (letters of :data:`gateway.shards.contract.HOOK_KINDS`) an app wants
#: recorded for a channel: ``hooks_for(app_id, channel)``.
HooksFor = Callable[[str, str], str]

#: One subscriber count to write: (app id, channel, count, publish_count), as
#: :meth:`PresenceStore.set_subscribers` takes them.
SubsItem = tuple[str, str, int, bool]


class PresenceStore(Protocol):
    """One node's view of the shared state (its writes carry the node's owner string).

    Writes and reads raise ``WriteFailed`` (or a ``ConnectionError``/``TimeoutError``) when the
    channel's shard stays unavailable; nothing is silently dropped.
    """

    #: This node's owner string, encoded.
    owner: bytes
    #: Presence members per channel.
    max_members: int

    def shard_of(self, app_id: str, channel: str) -> int:
        """The shard holding ``channel``."""
        ...

    def shard_name(self, shard: int) -> str:
        """A shard's name, for messages."""
        ...

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
        """This node holds ``user_id`` in presence ``channel`` (``exclude``: the joining
        socket, which gets ``subscription_succeeded`` rather than ``member_added``).

        ``max_members``: the channel's member limit (default :attr:`max_members`); a new user
        over it gets a result without roster."""
        ...

    async def leave(self, app_id: str, channel: str, user_id: str) -> bool:
        """This node no longer holds ``user_id``; True if it was the last owner anywhere."""
        ...

    async def set_subscribers(
        self, app_id: str, channel: str, count: int, *, publish_count: bool
    ) -> SubsResult:
        """This node's absolute socket count in ``channel``."""
        ...

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
        """:meth:`join` without a coroutine: ``done`` gets its result or its error.

        Returns a future that completes once ``done`` was called (to wait for the write).
        """
        ...

    def submit_leave(
        self, app_id: str, channel: str, user_id: str, done: Callable[[bool | BaseException], None]
    ) -> asyncio.Future[Any]:
        """:meth:`leave` without a coroutine (see :meth:`submit_join`)."""
        ...

    def submit_subscribers(
        self,
        items: Sequence[SubsItem],
        done: Callable[[list[SubsResult | BaseException]], None],
    ) -> asyncio.Future[Any]:
        """:meth:`set_subscribers` for several channels in one batch, without a coroutine:
        ``done`` gets one result or error per item, in order (see :meth:`submit_join`)."""
        ...

    async def sync_many(
        self, channels: Sequence[tuple[str, str, LocalChannel]]
    ) -> list[list[Due] | BaseException]:
        """Re-assert this node's entries in each channel, exactly, in one batch.

        Returns per channel the webhooks its transitions made due, or the error that kept it
        from being written.
        """
        ...

    async def publish(
        self, app_id: str, channel: str, payload: bytes, *, hook: tuple[str, str] | None = None
    ) -> None:
        """Publish a Pub/Sub message (``E`` or ``T``) to every node listening to ``channel``;
        with ``hook`` (kind, rest: ``e`` client_event), record that webhook in the channel's
        outbox in the same write."""
        ...

    async def cache_set(self, app_id: str, channel: str, frame: str, ttl_ms: int) -> None:
        """Remember ``frame`` as the last event of a cache channel."""
        ...

    async def claim_outbox(self, limit: int, lease_ms: int) -> list[OutboxClaim]:
        """Lease due outbox entries on every usable shard to this node for ``lease_ms``: one
        :class:`OutboxClaim` per shard that had entries or dropped webhooks (outbox full). Each
        entry goes to one node at a time; if it is neither acknowledged nor deferred within the
        lease, any node may claim it again."""
        ...

    async def ack_outbox(self, shard: int, ids: Sequence[str]) -> None:
        """Outbox entries delivered (or given up): they leave the shard."""
        ...

    async def defer_outbox(self, shard: int, ids: Sequence[str], delay_ms: int) -> None:
        """Keep claimed outbox entries leased ``delay_ms`` longer (0: give them back now)."""
        ...

    def submit_hook(self, app_id: str, channel: str, kind: str, rest: str) -> asyncio.Future[Any]:
        """Record a webhook that is no transition (``e`` client_event, ``x`` cache_miss) in
        the channel's outbox; the future completes with True or the error."""
        ...

    async def lease(
        self, shard: int, lease_ms: int, *, first: bool, gap_ms: int, grace_ms: int
    ) -> int:
        """Refresh this node's lease on ``shard``; returns the deadline (ms, shard clock)."""
        ...

    async def check(self, shard: int) -> tuple[int, int]:
        """Refresh the expiry of this node's entries on ``shard``; return (entries, digest)."""
        ...

    async def reap(
        self, shard: int, token: str, *, lock_ms: int, limit: int, grace_ms: int
    ) -> list[int]:
        """Reap dead owners' entries on ``shard``: ``[-1]`` when another node holds the
        shard's reap lock, else ``[channels reaped, dead owners left, entries removed]``."""
        ...

    # -- reads -------------------------------------------------------------------------------

    async def roster(self, app_id: str, channel: str) -> dict[str, str | None]:
        """Members of a presence channel: user id to ``user_info`` JSON text."""
        ...

    async def user_ids(self, app_id: str, channel: str) -> list[str]:
        """Ids of the members of a presence channel."""
        ...

    async def counts(self, app_id: str, channel: str) -> ChannelCounts:
        """Subscription and user counts of a channel (0, 0 when unoccupied)."""
        ...

    async def channels(self, app_id: str, prefix: str = "") -> dict[str, ChannelCounts]:
        """Occupied channels of an app whose name starts with ``prefix``, from every shard."""
        ...

    async def cache_get(self, app_id: str, channel: str) -> tuple[str | None, int]:
        """The cached last event of a cache channel and its remaining time to live (ms)."""
        ...

    async def leases(self, shard: int) -> list[tuple[str, int, str]]:
        """Every owner with a lease on ``shard``: ``(owner, deadline ms, live|late|dead)``."""
        ...

    async def owned(self, shard: int) -> list[tuple[str, str]]:
        """Channels (app id, channel) in which this node has entries on ``shard``."""
        ...


class Subscriptions(Protocol):
    """The node's Pub/Sub subscriptions to channel keys (messages go to the node's callback)."""

    async def subscribe(self, shard: int, key: bytes) -> None:
        """Listen to ``key`` on ``shard`` (returns once the shard confirmed it)."""
        ...

    def listening(self, shard: int, key: bytes) -> bool:
        """True when :meth:`subscribe` of ``key`` would return at once: the caller may skip
        it."""
        ...

    def unsubscribe(self, shard: int, key: bytes) -> None:
        """Stop listening to ``key``."""
        ...

    def compact(self) -> None:
        """Give back memory after a burst of channels."""
        ...
