"""Webhooks out of the shards' outboxes: claimed, delivered to every endpoint, acknowledged.

Every webhook is recorded in the outbox of its channel's shard by the same call that makes its
transition (see ``functions.lua``, ``outbox``), so a node killed between a transition and its
POST loses nothing. Every node runs a :class:`OutboxDispatcher`:

* every ``interval`` it claims due entries on every usable shard, each leased to it for
  ``lease_ms`` (entries another node claimed and did not finish within its lease come back);
* each entry goes to every endpoint of its app whose filters take it (none: acknowledged at
  once), through the :class:`~gateway.server.webhooks.WebhookSender` (batched, signed,
  retried with backoff);
* once every endpoint took it, or gave up on it ``give_up`` seconds after the transition, the
  entry is acknowledged and leaves the shard; while deliveries are still being retried the
  lease is extended; on shutdown unfinished entries are given back at once.

Delivery is at least once: a node that dies after a POST but before its acknowledgement leaves
the entry to be sent again by another node. Each event carries the entry's stable ``id`` so a
receiver can de-duplicate.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.config import AppConfig
from gateway.logs import fields
from gateway.metrics import Metrics
from gateway.server.webhooks import DROPPED, WebhookSender
from gateway.shards.contract import OUTBOX_MAX, OutboxEntry
from gateway.shards.writer import WriteFailed
from gateway.store.presence import PresenceStore

__all__ = ["OutboxDispatcher", "event_of"]

log = logging.getLogger("gateway.outbox")


@dataclass(slots=True)
class _Claimed:
    shard: int
    pending: int  # endpoints still delivering it
    leased_until: float  # loop time


def event_of(entry: OutboxEntry) -> dict[str, Any]:
    """The webhook event (as Pusher sends it, plus ``id``) of an outbox entry."""
    event: dict[str, Any] = {"name": entry.name, "channel": entry.channel}
    if entry.name in ("member_added", "member_removed"):
        event["user_id"] = entry.rest.decode()
    elif entry.name == "subscription_count":
        event["subscription_count"] = int(entry.rest or b"0")
    elif entry.name == "client_event":
        fields = json.loads(entry.rest) if entry.rest else {}
        if isinstance(fields, dict):
            event.update((k, v) for k, v in fields.items() if k not in ("name", "channel", "id"))
    event["id"] = entry.id
    return event


class OutboxDispatcher:
    """Claims outbox entries and delivers them (see the module docstring).

    Args:
        store: The presence store (claim, ack, defer).
        sender: Delivers events to endpoints.
        app_by_id: The app in force with an id.
        metrics: ``pg_webhooks_claimed_total``, ``pg_webhooks_dropped_total{reason}``
            (``expired``: older than ``give_up`` when claimed).
        lease_ms: How long a claim lasts before another node may claim the entry again.
        give_up: Seconds after its transition an event is given up (Pusher's 5 minutes).
        limit: Entries claimed per shard at a time.
        rounds: Claims made one after the other in one :meth:`run_once` while shards still
            have due entries (a backlog drains at up to ``rounds * limit`` entries per shard a
            round instead of ``limit``).
    """

    def __init__(
        self,
        store: PresenceStore,
        sender: WebhookSender,
        app_by_id: Callable[[str], AppConfig | None],
        metrics: Metrics,
        *,
        lease_ms: int = 30_000,
        give_up: float = 300.0,
        limit: int = 200,
        rounds: int = 8,
    ) -> None:
        self.store = store
        self.sender = sender
        self.app_by_id = app_by_id
        self.metrics = metrics
        self.lease_ms = lease_ms
        self.give_up = give_up
        self.limit = limit
        self.rounds = rounds
        #: Most entries in hand at once. Never more than the sender queues for one endpoint:
        #: beyond that it would drop the oldest, and a dropped entry would be acknowledged.
        self.cap = min(50 * limit, sender.max_queue)
        #: Entries this node claimed and still delivers, by id.
        self.claimed: dict[str, _Claimed] = {}
        self._acks: dict[int, list[str]] = {}
        #: Set when the node stops: deliveries cut short then are given back, not dropped.
        self.closing = False
        self.metrics.describe("pg_webhooks_claimed_total", "Outbox entries claimed by this node.")

    async def run_once(self) -> None:
        """One round: finish acknowledgements, extend leases, claim and dispatch; claim again
        at once (up to ``rounds`` times) while a shard had more due than one claim takes."""
        await self.flush()
        await self._extend()
        for _ in range(self.rounds):
            if not await self._claim():
                return

    async def _claim(self) -> bool:
        """Claim and dispatch once; whether a shard may have more due and there is room."""
        room = self.cap - len(self.claimed)
        if room <= 0:
            return False  # enough in hand: let endpoints catch up (others may claim the rest)
        limit = min(self.limit, room)
        try:
            claims = await self.store.claim_outbox(limit, self.lease_ms)
        except (WriteFailed, ConnectionError, TimeoutError) as exc:
            log.warning("outbox: claim failed: %s", exc)
            return False
        loop = asyncio.get_running_loop()
        more = False
        back: dict[int, list[str]] = {}
        for shard, shard_now, entries, dropped in claims:
            if dropped:
                self.metrics.inc(DROPPED, dropped, reason="outbox_full")
                log.warning(
                    "outbox: the shard at index %d of the topology was full (%d webhooks "
                    "waiting): %d webhooks dropped; are the webhook endpoints down?",
                    shard,
                    OUTBOX_MAX,
                    dropped,
                    extra=fields(shard=shard, reason="outbox_full"),
                )
            self.metrics.inc("pg_webhooks_claimed_total", len(entries))
            more = more or len(entries) >= limit
            for entry in entries:
                if len(self.claimed) >= self.cap and entry.id not in self.claimed:
                    # Over the cap (several shards answered): another claim takes it soon.
                    back.setdefault(shard, []).append(entry.id)
                else:
                    self._dispatch(shard, shard_now, entry, loop.time())
        if back:
            await self._give_back(back)
            return False
        return more

    def _dispatch(self, shard: int, shard_now: int, entry: OutboxEntry, now: float) -> None:
        if entry.id in self.claimed:
            return  # already being delivered here (its lease was renewed by this claim)
        app = self.app_by_id(entry.app_id)
        # '#' channels are internal (the reaper records their held kinds like any channel's).
        internal = entry.channel.startswith("#")
        endpoints = (
            [e for e in app.endpoints if e.wants(entry.name, entry.channel)]
            if app is not None and not internal
            else []
        )
        if app is None or not endpoints:
            self._ack(shard, entry.id)  # nobody wants it (any more)
            return
        left = self.give_up - (shard_now - entry.created_ms) / 1000
        if left <= 0:
            self.metrics.inc(DROPPED, reason="expired")
            self._ack(shard, entry.id)
            return
        self.claimed[entry.id] = claimed = _Claimed(
            shard, len(endpoints), now + self.lease_ms / 1000
        )
        event = event_of(entry)
        done = functools.partial(self._done, entry.id, claimed)
        for endpoint in endpoints:
            self.sender.enqueue(app, endpoint, event, done=done, deadline=now + left)

    def _done(self, ident: str, claimed: _Claimed, delivered: bool) -> None:
        if not delivered and self.closing:
            return  # cut short by the shutdown: given back by close(), for another node
        claimed.pending -= 1
        if claimed.pending == 0 and self.claimed.pop(ident, None) is claimed:
            self._ack(claimed.shard, ident)

    def _ack(self, shard: int, ident: str) -> None:
        self._acks.setdefault(shard, []).append(ident)

    async def flush(self) -> None:
        """Send the acknowledgements collected so far."""
        acks, self._acks = self._acks, {}
        for shard, ids in acks.items():
            try:
                await self.store.ack_outbox(shard, ids)
            except (WriteFailed, ConnectionError, TimeoutError) as exc:
                # The entries come back after their lease and are sent again (at least once).
                log.warning("outbox: %d acknowledgements not written: %s", len(ids), exc)

    async def _extend(self) -> None:
        """Keep the lease of entries still being delivered (retries can take minutes)."""
        now = asyncio.get_running_loop().time()
        half = self.lease_ms / 2000
        due: dict[int, list[str]] = {}
        for ident, claimed in self.claimed.items():
            if claimed.leased_until - now < half:
                due.setdefault(claimed.shard, []).append(ident)
                claimed.leased_until = now + self.lease_ms / 1000
        for shard, ids in due.items():
            try:
                await self.store.defer_outbox(shard, ids, self.lease_ms)
            except (WriteFailed, ConnectionError, TimeoutError) as exc:
                log.warning("outbox: leases of %d entries not extended: %s", len(ids), exc)

    async def close(self) -> None:
        """Give back what this node has not finished: other nodes claim it at once (set
        :attr:`closing` before the sender closes)."""
        self.closing = True
        await self.flush()
        back: dict[int, list[str]] = {}
        for ident, claimed in self.claimed.items():
            back.setdefault(claimed.shard, []).append(ident)
        self.claimed.clear()
        await self._give_back(back)

    async def _give_back(self, back: dict[int, list[str]]) -> None:
        """Make entries claimable again at once (by any node)."""
        for shard, ids in back.items():
            try:
                await self.store.defer_outbox(shard, ids, 0)
            except (WriteFailed, ConnectionError, TimeoutError) as exc:
                log.warning(
                    "outbox: %d entries not given back (claimable after their lease): %s",
                    len(ids),
                    exc,
                )
