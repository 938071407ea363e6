"""Self-healing of the shared state: leases, the reaper, re-assertion and anti-entropy.

Each node holds a lease on every shard, refreshed every ``lease_interval`` seconds with a
deadline ``lease_ms`` ahead of the shard's own clock by threads of its own
(:mod:`gateway.store.lease`); reads ignore the entries of owners whose lease expired. Any node
reaps a shard under the shard's reap lock, removing the entries of owners dead for longer than
the reap grace through the same transitions as normal leaves, so ``member_removed`` and
``channel_vacated`` (and their webhooks) go out for users who really left. Each node re-asserts
the absolute state it owns when a shard's master changes, when a shard comes back after being
unusable, and whenever the cheap digest check of the anti-entropy loop finds a difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway._native import ReplyError
from gateway.metrics import Metrics
from gateway.periodic import every
from gateway.shards import contract
from gateway.shards.shardset import ShardLink, ShardSet
from gateway.shards.writer import WriteFailed
from gateway.store.lease import LeaseKeeper, LeaseSettings
from gateway.store.presence import LocalChannel, LocalState
from gateway.store.presence_redis import RedisPresenceStore

__all__ = ["Healer", "HealingSettings", "digest"]

log = logging.getLogger("gateway.healing")

#: Channels re-asserted per batch of writes.
_RESYNC_CHUNK = 500


@dataclass(frozen=True)
class HealingSettings:
    """Timing of the self-healing loops (defaults: kill -9 of a node is visible within ~12 s).

    Attributes:
        lease_ms: How long a lease lasts past its refresh (Redis clock).
        lease_interval: Seconds between lease refreshes.
        reap_grace_ms: How long after its lease expired an owner may still refresh before the
            reaper removes its entries.
        loop_stall_limit: Seconds without event-loop progress after which the lease is let go.
        reap_interval: Seconds between reaper passes on each shard.
        reap_lock_ms: Validity of a shard's reap lock.
        reap_limit: Channels reaped per call.
        anti_entropy_interval: Seconds between digest checks of each shard (each wait drawn
            between 0.8 and 1.2 times this, so that nodes do not check in step).
        confirm_delay: Seconds before a digest that differs is checked again (a difference
            seen twice, with this node's own state unchanged in between, triggers the
            re-assertion).
        max_deferral: Seconds a shard's check may be put off because this node's state keeps
            changing (a join storm, a flood of subscriptions); after that a difference seen
            twice is re-asserted even while the state moves.
    """

    lease_ms: int = 10_000
    lease_interval: float = 1.0
    reap_grace_ms: int = 1_000
    loop_stall_limit: float = 30.0
    reap_interval: float = 1.0
    reap_lock_ms: int = 3_000
    reap_limit: int = 200
    anti_entropy_interval: float = 30.0
    confirm_delay: float = 1.0
    max_deferral: float = 120.0


def digest(app_channels: LocalState) -> tuple[int, int]:
    """The (entries, digest) a shard's ``check`` must return for this node's state.

    Order-free: the sum modulo 2**32 of 32 bits of each entry's sha1, as computed by the
    function library.
    """
    n = 0
    total = 0
    for (app_id, channel), local in app_channels.items():
        key = contract.channel_key(app_id, channel)
        if local.count > 0:
            n += 1
            total += contract.entry_hash(contract.count_entry(key, local.count))
        for user, info in local.members.items():
            n += 1
            total += contract.entry_hash(contract.member_entry(key, user, info))
    return n, total % 4294967296


class Healer:
    """Runs the lease, reaper and anti-entropy loops of one node.

    Args:
        store: The node's presence store.
        shards: Its shard links.
        local_state: Returns what the node really holds on a shard.
        local_channel: Returns what the node really holds in one channel (``app_id``,
            ``channel``), read right before that channel is re-asserted.
        metrics: Where the counters go.
        settings: Timing.
    """

    def __init__(
        self,
        store: RedisPresenceStore,
        shards: ShardSet,
        local_state: Callable[[int], LocalState],
        local_channel: Callable[[str, str], LocalChannel],
        metrics: Metrics,
        settings: HealingSettings | None = None,
    ) -> None:
        self.store = store
        self.shards = shards
        self.local_state = local_state
        self.local_channel = local_channel
        self.metrics = metrics
        self.settings = settings or HealingSettings()
        self.token = store.owner.decode()
        s = self.settings
        self.lease = LeaseKeeper(
            shards,
            store,
            LeaseSettings(
                lease_ms=s.lease_ms,
                interval=s.lease_interval,
                grace_ms=s.reap_grace_ms,
                stall_limit=s.loop_stall_limit,
            ),
            metrics,
            on_lapsed=lambda shard: self.resync(shard, "lease_lapsed"),
        )
        n = len(shards.links)
        self._seen_up = [False] * n
        self._resyncing: list[asyncio.Task[None] | None] = [None] * n
        # When each shard's check was first put off because this node's state was moving.
        self._deferred_since: list[float | None] = [None] * n
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        shards.on_link_up(self._link_up)
        shards.on_master_change(self._master_changed)
        m = metrics
        m.describe("pg_reaped_entries_total", "Entries of dead owners removed, by shard")
        m.describe("pg_reassertions_total", "Re-assertions of this node's state, by shard, reason")
        m.describe("pg_convergence_events_total", "Differences found and repaired, by reason")
        m.describe("pg_anti_entropy_checks_total", "Digest checks, by shard and result")

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the lease threads and the loops."""
        s = self.settings
        self.lease.start()
        self._tasks = [
            asyncio.create_task(every(s.reap_interval, self._reap_all, name="reaper")),
            asyncio.create_task(
                every(s.anti_entropy_interval, self._check_all, name="anti-entropy", jitter=0.2)
            ),
        ]

    async def stop_checks(self) -> None:
        """Stop reaping, anti-entropy and re-assertion; the lease threads go on (draining)."""
        tasks = [*self._tasks, *(t for t in self._resyncing if t is not None)]
        self._tasks = []
        self._resyncing = [None] * len(self._resyncing)
        self._stopped = True
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def close(self) -> None:
        """Stop the loops and the lease threads."""
        tasks = [*self._tasks, *(t for t in self._resyncing if t is not None)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.lease.close()

    def lease_problems(self) -> list[str]:
        """Shards on which this node's lease is at risk (for readiness)."""
        return self.lease.problems()

    # -- reaper --------------------------------------------------------------------------------

    async def _reap_all(self) -> None:
        await asyncio.gather(*(self._reap(link) for link in self.shards.links if link.usable))

    async def _reap(self, link: ShardLink) -> None:
        for _ in range(20):  # bounded: at most 20 * reap_limit channels per pass
            try:
                reply = await self.store.reap(
                    link.index,
                    self.token,
                    lock_ms=self.settings.reap_lock_ms,
                    limit=self.settings.reap_limit,
                    grace_ms=self.settings.reap_grace_ms,
                )
            except (WriteFailed, ReplyError, ConnectionError) as exc:
                log.warning("shard %s: reaper failed: %s", link.spec.name, exc)
                return
            if reply[0] <= 0:  # nothing to reap, or another node holds the lock
                return
            done, left, removed = reply
            self.metrics.inc("pg_reaped_entries_total", removed, shard=link.spec.name)
            self.metrics.inc("pg_convergence_events_total", reason="reaped")
            log.info(
                "shard %s: reaped %d channels (%d entries) of dead nodes",
                link.spec.name,
                done,
                removed,
            )
            if left == 0:
                return

    # -- re-assertion --------------------------------------------------------------------------

    def _link_up(self, link: ShardLink) -> None:
        if self._seen_up[link.index]:
            self.resync(link.index, "link_up")
        self._seen_up[link.index] = True

    def _master_changed(self, link: ShardLink) -> None:
        self.resync(link.index, "master_change")

    def resync(self, shard: int, reason: str) -> None:
        """Re-assert this node's absolute state on ``shard`` (coalesced while one runs)."""
        if self._stopped:
            return
        running = self._resyncing[shard]
        if running is not None and not running.done():
            return
        self._resyncing[shard] = asyncio.ensure_future(self._resync(shard, reason))

    async def _resync(self, shard: int, reason: str) -> None:
        name = self.shards.links[shard].spec.name
        self.metrics.inc("pg_reassertions_total", shard=name, reason=reason)
        try:
            # The lease threads keep the lease; this refresh only makes sure it exists before
            # the entries are written (they would not count otherwise).
            s = self.settings
            await self.store.lease(
                shard,
                s.lease_ms,
                first=not self.lease.leased(shard),
                gap_ms=self.lease.settings.gap_ms,
                grace_ms=s.reap_grace_ms,
            )
            owned = set(await self.store.owned(shard))
        except (WriteFailed, ReplyError, ConnectionError) as exc:
            log.warning("shard %s: re-assertion postponed: %s", name, exc)
            return
        targets = sorted(set(self.local_state(shard)) | owned)
        failed = 0
        # In chunks, so that re-asserting tens of thousands of channels never holds the event
        # loop for long; each chunk reads what the node holds right before it is written (a
        # snapshot taken earlier could undo a join made meanwhile).
        for start in range(0, len(targets), _RESYNC_CHUNK):
            chunk = targets[start : start + _RESYNC_CHUNK]
            # Read and submitted in one step: no join or leave can come in between.
            batch = [
                (app_id, channel, self.local_channel(app_id, channel)) for app_id, channel in chunk
            ]
            results = await self.store.sync_many(batch)
            # A re-assertion's transitions record their webhooks in the outbox themselves.
            failed += sum(isinstance(result, BaseException) for result in results)
        log.info(
            "shard %s: re-asserted %d channels (%s)%s",
            name,
            len(targets),
            reason,
            f", {failed} failed" if failed else "",
        )

    # -- anti-entropy --------------------------------------------------------------------------

    async def _check_all(self) -> None:
        await asyncio.gather(*(self.check(link.index) for link in self.shards.links if link.usable))

    async def check(self, i: int) -> str:
        """One anti-entropy check of shard ``i`` (also refreshes this node's expiries there).

        Returns:
            ``"same"``; ``"differ"`` (a re-assertion was started); ``"deferred"`` (it differs
            but this node's state moved between the two looks); ``"failed"`` (the shard did
            not answer).
        """
        name = self.shards.links[i].spec.name
        try:
            remote = await self.store.check(i)
            local = digest(self.local_state(i))
            moving = False
            if remote != local:
                # Writes in flight make a single comparison unreliable: confirm once. If this
                # node's own state changed meanwhile, its writes are still arriving (a join
                # storm, a flood): the comparison says nothing, and re-writing every channel
                # now would only add to the load. Put it off (up to max_deferral).
                await asyncio.sleep(self.settings.confirm_delay)
                remote = await self.store.check(i)
                before, local = local, digest(self.local_state(i))
                moving = before != local
        except (WriteFailed, ReplyError, ConnectionError) as exc:
            log.warning("shard %s: anti-entropy check failed: %s", name, exc)
            return "failed"
        if remote == local:
            self._deferred_since[i] = None
            self.metrics.inc("pg_anti_entropy_checks_total", shard=name, result="same")
            return "same"
        if moving:
            now = asyncio.get_running_loop().time()
            since = self._deferred_since[i]
            if since is None:
                self._deferred_since[i] = since = now
            if now - since < self.settings.max_deferral:
                self.metrics.inc("pg_anti_entropy_checks_total", shard=name, result="deferred")
                return "deferred"
        self._deferred_since[i] = None
        self.metrics.inc("pg_anti_entropy_checks_total", shard=name, result="differ")
        self.metrics.inc("pg_convergence_events_total", reason="digest")
        log.warning(
            "shard %s: state differs from this node's (shard %s, node %s); re-asserting",
            name,
            remote,
            local,
        )
        self.resync(i, "digest")
        return "differ"
