"""A node's lease on real shards: kept by its own threads while the event loop is blocked (even
across a failover the loop has not seen), let go when the loop stalls, and the reap rule that
tells a late node from a dead one."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator

from polling import settle
from support import StoreFactory, raw_client, shard_stack

from gateway.localcluster import LocalCluster
from gateway.metrics import Metrics
from gateway.shards.admin import init_shards
from gateway.shards.contract import IDENTITY_KEY, channel_key
from gateway.shards.pubsub import PubSub
from gateway.shards.topology import load_topology
from gateway.store.lease import LeaseKeeper, LeaseSettings
from gateway.store.presence_redis import RedisPresenceStore


def _uid() -> str:
    return uuid.uuid4().hex[:8]


class Sampler:
    """Reads a channel's roster from a thread (works while the event loop is blocked)."""

    def __init__(self, cluster: LocalCluster, shard: int, key: bytes) -> None:
        self.client = raw_client(cluster.masters()[shard].addr)
        self.key = key
        self.samples: list[tuple[float, set[bytes]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            flat = self.client.fcall_ro("pg_roster", 1, self.key)
            self.samples.append((time.monotonic(), set(flat[::2])))
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


@contextlib.asynccontextmanager
async def running_keeper(
    store: RedisPresenceStore, settings: LeaseSettings, shard: int
) -> AsyncIterator[tuple[LeaseKeeper, list[int]]]:
    """A started keeper whose event-loop heartbeat beats every 50 ms; yields it and the
    shards it reported as lapsed. Returns once its first lease on ``shard`` is accepted."""
    lapsed: list[int] = []
    keeper = LeaseKeeper(store.shards, store, settings, Metrics(), on_lapsed=lapsed.append)

    async def beat() -> None:
        while True:
            keeper.beat()
            await asyncio.sleep(0.05)  # the heartbeat's pace

    beating = asyncio.create_task(beat())
    keeper.start()
    try:
        await settle(lambda: keeper.leased(shard), what=f"the first lease on shard {shard}")
        yield keeper, lapsed
    finally:
        beating.cancel()
        await keeper.close()


async def test_lease_is_kept_while_the_event_loop_is_blocked(
    store_factory: StoreFactory, cluster: LocalCluster
) -> None:
    store = await store_factory(f"busy@{_uid()}")
    ch = f"presence-busy-{_uid()}"
    shard = store.shard_of("1", ch)
    settings = LeaseSettings(lease_ms=1000, interval=0.2, grace_ms=0, stall_limit=30)
    async with running_keeper(store, settings, shard) as (keeper, lapsed):
        await store.join("1", ch, "u1", None, "1.1")
        with Sampler(cluster, shard, channel_key("1", ch)) as sampler:
            time.sleep(3.0)  # noqa: ASYNC251 -- the event loop is blocked for three leases
        seen = [users for _, users in sampler.samples]
        assert len(seen) > 20
        assert all(users == {b"u1"} for users in seen), seen
        age = keeper.age(shard)
        assert age is not None and age < 1.0
        assert lapsed == []


async def test_lease_is_let_go_when_the_loop_stalls(
    store_factory: StoreFactory, cluster: LocalCluster
) -> None:
    store = await store_factory(f"stuck@{_uid()}")
    other = await store_factory(f"healthy@{_uid()}")
    ch = f"presence-stuck-{_uid()}"
    shard = store.shard_of("1", ch)
    settings = LeaseSettings(lease_ms=600, interval=0.1, grace_ms=0, stall_limit=1.0)
    # Another node keeps refreshing (as in any cluster of more than one node): the shard is
    # reachable, so the stuck node's silence is its own.
    healthy = LeaseSettings(lease_ms=600, interval=0.1, grace_ms=0, stall_limit=30)
    async with (
        running_keeper(other, healthy, shard),
        running_keeper(store, settings, shard) as (_, lapsed),
    ):
        await store.join("1", ch, "u1", None, "1.1")
        with Sampler(cluster, shard, channel_key("1", ch)) as sampler:
            time.sleep(3.0)  # noqa: ASYNC251 -- no heartbeat for longer than the stall limit
        assert sampler.samples[0][1] == {b"u1"}
        assert sampler.samples[-1][1] == set(), sampler.samples[-5:]
        # The loop runs again: the lease is refreshed, and the lapse is reported so the node
        # re-asserts its state (others may have reaped it meanwhile).
        await settle(lambda: shard in lapsed, what="the lapse to be reported")


async def test_a_late_owner_is_hidden_but_not_reaped_within_the_grace(
    store_factory: StoreFactory, cluster: LocalCluster
) -> None:
    a = await store_factory(f"alive@{_uid()}", hold_ms=100)
    b = await store_factory(f"late@{_uid()}", hold_ms=100)
    ch = f"presence-late-{_uid()}"
    shard = a.shard_of("1", ch)
    heard: list[bytes] = []
    pubsub = PubSub(a.shards, lambda _s, _k, data: heard.append(data))
    lease = {"gap_ms": 1000, "grace_ms": 1500}
    master = raw_client(cluster.masters()[shard].addr)

    async def alive_a(seconds: float) -> None:
        # a stays alive (so the shard never goes without refreshes) while time passes.
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await a.lease(shard, 60_000, first=False, **lease)
            await asyncio.sleep(0.2)  # a's refresh pace while the time passes

    def b_entries() -> int:
        return sum(f.startswith(b.owner) for f in master.hkeys(channel_key("1", ch) + b":p"))

    try:
        await pubsub.subscribe(shard, channel_key("1", ch))
        await a.lease(shard, 60_000, first=True, **lease)
        # A shard that had no refresh before (first use, or unreachable) gives every owner
        # the grace: let that pass, with a refreshing all along.
        for _ in range(8):
            await asyncio.sleep(0.25)  # 2 s pass on purpose
            await a.lease(shard, 60_000, first=False, **lease)
        await b.lease(shard, 300, first=True, **lease)
        await b.join("1", ch, "late-user", None, "2.1")
        await alive_a(0.4)  # b's lease is over
        await a.lease(shard, 60_000, first=False, **lease)
        assert await a.roster("1", ch) == {}  # hidden at once
        states = {owner: state for owner, _, state in await a.leases(shard)}
        assert states[b.owner.decode()] == "late"
        await _reap(a, shard, grace_ms=1500)
        assert b_entries() == 1  # within the grace: not reaped
        # b was only late: it refreshes, and its member is back without any event.
        await b.lease(shard, 60_000, first=False, **lease)
        assert await a.roster("1", ch) == {"late-user": None}
        await asyncio.sleep(0.2)  # a "nothing arrives" window: no member_removed may come
        assert not any(m.startswith(b"R") for m in heard), heard
        # Now b dies for good: after its lease and the grace it is reaped, with the event.
        await b.lease(shard, 300, first=False, **lease)
        await alive_a(0.4)
        await _reap(a, shard, grace_ms=1500)
        assert b_entries() == 1
        await alive_a(1.5)
        states = {owner: state for owner, _, state in await a.leases(shard)}
        assert states[b.owner.decode()] == "dead"
        await _reap(a, shard, grace_ms=1500)
        assert b_entries() == 0
        await settle(lambda: b"Rlate-user" in heard, what="member_removed of the reaped late-user")
    finally:
        master.close()
        await pubsub.close()


async def test_owners_that_could_not_refresh_get_the_grace_after_the_shard_is_back(
    store_factory: StoreFactory, fresh_cluster: LocalCluster
) -> None:
    # A private topology: on the shared one other tests' nodes refresh their leases, so the
    # shard never goes without refreshes.
    topology = fresh_cluster.topology_path
    a = await store_factory(f"first@{_uid()}", hold_ms=100, topology=topology)
    b = await store_factory(f"second@{_uid()}", hold_ms=100, topology=topology)
    old = await store_factory(f"restarted@{_uid()}", hold_ms=100, topology=topology)
    await _gap_scenario(a, b, old, fresh_cluster)


async def _gap_scenario(
    a: RedisPresenceStore, b: RedisPresenceStore, old: RedisPresenceStore, cluster: LocalCluster
) -> None:
    ch = f"presence-gap-{_uid()}"
    shard = a.shard_of("1", ch)
    master = raw_client(cluster.masters()[shard].addr)

    def b_entries() -> int:
        return sum(f.startswith(b.owner) for f in master.hkeys(channel_key("1", ch) + b":p"))

    lease = {"gap_ms": 1000, "grace_ms": 1500}
    await a.lease(shard, 500, first=True, **lease)
    await b.lease(shard, 500, first=True, **lease)
    await old.lease(shard, 500, first=True, **lease)
    await a.join("1", ch, "ua", None, "1.1")
    await b.join("1", ch, "ub", None, "2.1")
    await old.join("1", ch, "u-old", None, "3.1")
    # Nobody refreshes for 1.3 s (as when the shard is unreachable or failing over): the
    # leases expire while no node could refresh them.
    await asyncio.sleep(1.3)  # the leases expire on purpose
    # A reaper call that reaches the shard before any refresh (its writes were held while the
    # shard was away) removes nobody, and everyone who expired in the silence is listed.
    await _reap(a, shard, grace_ms=1500)
    assert b_entries() == 1
    assert await a.roster("1", ch) == {"ua": None, "ub": None, "u-old": None}
    # The restarted node's new incarnation ends the old one's lease on purpose: never excused.
    restarted = RedisPresenceStore(
        old.shards, old.writer, owner=old.owner.decode().split("@")[0] + "@new", hold_ms=100
    )
    await restarted.lease(shard, 500, first=True, **lease)
    assert await a.roster("1", ch) == {"ua": None, "ub": None}
    await a.lease(shard, 500, first=False, **lease)  # the shard is back; a refreshes first
    # b gets the grace to refresh before it counts as gone: still listed, not reaped.
    assert await a.roster("1", ch) == {"ua": None, "ub": None}
    await _reap(a, shard, grace_ms=1500)
    assert b_entries() == 1
    # b never comes back: once the grace is over, it is hidden and reaped.
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        await a.lease(shard, 500, first=False, **lease)
        await asyncio.sleep(0.2)  # a's refresh pace while the grace runs out
    await a.lease(shard, 500, first=False, **lease)
    assert await a.roster("1", ch) == {"ua": None}
    await _reap(a, shard, grace_ms=1500)
    assert b_entries() == 0
    master.close()


async def _reap(store: RedisPresenceStore, shard: int, *, grace_ms: int) -> None:
    """One reaper pass (waiting for another test's reap lock to lapse)."""

    async def reaped() -> bool:
        reply = await store.reap(shard, "lease-test", lock_ms=500, limit=100, grace_ms=grace_ms)
        return bool(reply[0] != -1)

    await settle(reaped, what="the reap lock (another test's reaper may hold it)", step=0.05)


async def test_lease_follows_a_failover_the_blocked_event_loop_has_not_seen(
    fresh_cluster: LocalCluster,
) -> None:
    topology = load_topology(fresh_cluster.topology_path)
    init_shards(topology)
    owner = f"follow@{_uid()}"
    shard = 0
    settings = LeaseSettings(lease_ms=4000, interval=0.2, grace_ms=0, stall_limit=60)
    async with shard_stack(topology, owner=owner) as stack:
        assert stack.store is not None
        async with running_keeper(stack.store, settings, shard) as (_, lapsed):
            old = stack.shards.links[shard].address
            # From here the event loop is blocked: its shard supervisor cannot see the
            # failover, only the lease thread can follow it.
            new = fresh_cluster.failover(fresh_cluster.master_name(shard))
            time.sleep(6.0)  # noqa: ASYNC251 -- longer than the lease, the loop still blocked
            assert stack.shards.links[shard].address == old  # the loop has not seen it
            master = raw_client(new)
            tag = master.hget(IDENTITY_KEY, "tag")
            seconds, micros = master.time()
            deadline = master.zscore(tag + b":nodes", owner)
            assert deadline is not None and deadline > seconds * 1000 + micros // 1000
        assert lapsed == []  # no refresh came later than the lease
        # Once unblocked, the loop follows the failover too.
        await settle(
            lambda: stack.shards.links[shard].address != old and stack.shards.links[shard].usable,
            what="the shard set on the new master",
        )
