"""Self-healing on real shards: leases, the reaper, re-assertion, digests, audit and repair."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable

import pytest
from support import StoreFactory, raw_client

from gateway._native import key_slot
from gateway.localcluster import LocalCluster
from gateway.shards.admin import init_shards
from gateway.shards.pubsub import PubSub
from gateway.shards.topology import load_topology
from gateway.store.audit import run_audit
from gateway.store.healing import LocalChannel, digest
from gateway.store.presence import PresenceStore, channel_key


@pytest.fixture
def stores(store_factory: StoreFactory) -> Callable[..., object]:
    """Stores that lease every shard for 60 s at once (``lease_ms`` overrides it)."""
    return functools.partial(store_factory, lease_ms=60_000)


def _uid() -> str:
    return uuid.uuid4().hex[:8]


async def test_dead_owner_invisible_at_once_then_reaped(
    stores: Callable[..., object], cluster: LocalCluster
) -> None:
    a: PresenceStore = await stores(f"node-a@{_uid()}")  # type: ignore[misc]
    b: PresenceStore = await stores(f"node-b@{_uid()}", lease_ms=600)  # type: ignore[misc]
    ch = f"presence-reap-{_uid()}"
    shard = a.shard_of("1", ch)
    heard: list[bytes] = []
    pubsub = PubSub(a.shards, lambda _s, _k, data: heard.append(data))
    try:
        await _dead_owner_scenario(a, b, ch, shard, heard, pubsub, cluster)
    finally:
        await pubsub.close()


async def _dead_owner_scenario(
    a: PresenceStore,
    b: PresenceStore,
    ch: str,
    shard: int,
    heard: list[bytes],
    pubsub: PubSub,
    cluster: LocalCluster,
) -> None:
    await pubsub.subscribe(shard, channel_key("1", ch))
    await a.join("1", ch, "alive", None, "1.1")
    await b.join("1", ch, "ghost", None, "2.1")
    await a.set_subscribers("1", ch, 1, publish_count=False)
    await b.set_subscribers("1", ch, 1, publish_count=False)
    assert set(await a.roster("1", ch)) == {"alive", "ghost"}
    await asyncio.sleep(0.7)  # b stopped refreshing: its lease is over
    assert set(await a.roster("1", ch)) == {"alive"}
    counts = await a.counts("1", ch)
    assert (counts.user_count, counts.subscription_count) == (1, 1)
    # Another node (of an earlier test) may hold the shard's reap lock for up to 3 s.
    for _ in range(100):
        reply = await a.reap(shard, "reaper-test", lock_ms=2000, limit=100, grace_ms=0)
        if reply[0] != -1:
            break
        await asyncio.sleep(0.05)
    assert reply[0] >= 1 and reply[2] >= 2  # b's presence entry and its count
    for _ in range(100):
        if b"Rghost" in heard:
            break
        await asyncio.sleep(0.02)
    assert b"Rghost" in heard  # the leave the dead node never sent
    await asyncio.sleep(0.3)
    due = [d for d in await a.claim_due() if d.channel == ch]
    assert [(d.name, d.user_id) for d in due] == [("member_removed", "ghost")]
    # Nothing of b is left on the shard.
    owned_by_b = await b.owned(shard)
    assert ("1", ch) not in owned_by_b
    master = raw_client(cluster.masters()[shard].addr)
    fields = master.hkeys(channel_key("1", ch) + b":p")
    assert not any(f.startswith(b.owner) for f in fields)


async def test_new_incarnation_makes_the_old_one_dead(stores: Callable[..., object]) -> None:
    node = f"node-r{_uid()}"
    old: PresenceStore = await stores(f"{node}@one")  # type: ignore[misc]
    ch = f"presence-restart-{_uid()}"
    await old.join("1", ch, "u1", None, "1.1")
    assert await old.roster("1", ch) == {"u1": None}
    new: PresenceStore = await stores(f"{node}@two")  # type: ignore[misc]
    assert await new.roster("1", ch) == {}  # at once, before any reaping


async def test_sync_reasserts_absolute_state_and_digest_agrees(
    stores: Callable[..., object], cluster: LocalCluster
) -> None:
    a: PresenceStore = await stores(f"node-s@{_uid()}")  # type: ignore[misc]
    ch = f"presence-sync-{_uid()}"
    shard = a.shard_of("1", ch)
    local = {("1", ch): LocalChannel(3, {"u1": '{"n":1}', "u2": None}, False)}
    due = await a.sync("1", ch, 3, local[("1", ch)].members, publish_count=False)
    assert sorted(due, key=str) == sorted(
        [("channel_occupied", None), ("member_added", "u1"), ("member_added", "u2")], key=str
    )
    counts = await a.counts("1", ch)
    assert (counts.user_count, counts.subscription_count) == (2, 3)
    mine = dict(local)  # this owner has entries in this one channel only
    n, remote = await a.check(shard)
    assert (n, remote) == digest(mine)
    # Lose the presence entries (as a failover losing writes would): the digest differs,
    # and re-asserting the same absolute state restores them.
    raw_client(cluster.masters()[shard].addr).delete(channel_key("1", ch) + b":p")
    assert (await a.check(shard)) != digest(mine)
    await a.sync("1", ch, 3, local[("1", ch)].members, publish_count=False)
    assert await a.check(shard) == digest(mine)
    # A user the node no longer holds is removed (member_removed), absolutely.
    await a.sync("1", ch, 1, {"u1": '{"n":1}'}, publish_count=False)
    assert await a.roster("1", ch) == {"u1": '{"n":1}'}


async def test_audit_reports_and_repairs_planted_stale_data(
    fresh_cluster: LocalCluster,
) -> None:
    topo = load_topology(fresh_cluster.topology_path)
    idents = init_shards(topo)
    m0 = raw_client(fresh_cluster.masters()[0].addr)
    # Entries of an owner that never held a lease, on a channel of shard 0.
    base = next(
        f"{{1:presence-ghost-{n}}}".encode()
        for n in range(1000)
        if key_slot(f"{{1:presence-ghost-{n}}}".encode()) < 8192
    )
    m0.hset(base + b":p", b"ghost@dead\0ghost-user", b"")
    m0.hset(base + b":u", b"ghost-user", 1)
    m0.hset(base + b":s", b"ghost@dead", 2)
    # A key of shard 1 written on shard 0, and one without expiry.
    wrong = next(
        f"{{1:elsewhere-{n}}}:s".encode()
        for n in range(1000)
        if key_slot(f"{{1:elsewhere-{n}}}:s".encode()) >= 8192
    )
    m0.hset(wrong, b"x@y", 1)
    before = await run_audit(topo)
    r0 = before[0]
    assert _text_list(r0.wrong_shard_keys) == [wrong.decode()]
    assert r0.unknown_owner_entries == {"ghost@dead": 2}
    assert base.decode() + ":p" in r0.keys_without_expiry
    assert r0.problems > 0 and before[1].problems == 0
    assert idents[0].tag
    repaired = await run_audit(topo, repair=True)
    assert repaired[0].repaired["wrong_shard_keys_deleted"] == 1
    after = await run_audit(topo)
    assert [r.problems for r in after] == [0, 0], after
    assert m0.exists(wrong) == 0
    assert m0.hlen(base + b":p") == 0


def _text_list(items: list[str]) -> list[str]:
    return sorted(items)
