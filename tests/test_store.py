"""The state store's behaviour, run against both implementations: real shards and the twin.

Every test here runs twice: on the Redis store (real ``redis-server`` shards, verified writes
through the function library) and on the in-memory twin the hub's tests use. Global
transitions, counts, held webhooks, leases, the reaper, re-assertion and digests must come out
the same, so the twin cannot drift from the real thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import pytest
from polling import settle
from support import ShardStack, StoreFactory, raw_client, shard_stack

from gateway.localcluster import LocalCluster
from gateway.shards import contract
from gateway.shards.admin import init_shards
from gateway.shards.contract import OUTBOX_MAX, channel_key
from gateway.shards.pubsub import PubSub
from gateway.shards.topology import load_topology
from gateway.store.healing import digest
from gateway.store.presence import LocalChannel, PresenceStore, Subscriptions
from gateway.store.presence_memory import MemoryShards

HOLD_MS = 300


@dataclass
class Node:
    """One simulated gateway node: its store view, its Pub/Sub and what it heard."""

    store: PresenceStore
    pubsub: Subscriptions
    heard: list[tuple[bytes, bytes]] = field(default_factory=list)


def _every_hook(app_id: str, channel: str) -> str:
    """Every webhook kind is wanted (the tests look at the outbox)."""
    return "amovcex"


async def _claims(ch: str, *nodes: Node) -> list[tuple[str, str | None]]:
    """Claim and acknowledge every due outbox entry; those of ``ch`` as (name, rest)."""
    out: list[tuple[str, str | None]] = []
    for node in nodes:
        for shard, _now, entries, _dropped in await node.store.claim_outbox(1000, 60_000):
            await node.store.ack_outbox(shard, [e.id for e in entries])
            out += [(e.name, e.rest.decode() or None) for e in entries if e.channel == ch]
    return out


class Backend(Protocol):
    """What the tests need of a deployment besides the stores themselves."""

    async def node(self, owner: str, *, lease_ms: int = 60_000) -> Node:
        """A node with a lease on every shard."""
        ...

    async def elapse(self, ms: int) -> None:
        """Let ``ms`` milliseconds of shard time pass (holds and leases run out)."""
        ...

    def lose_presence(self, app_id: str, channel: str) -> None:
        """Delete a channel's presence entries behind the gateway's back (a lost write)."""
        ...

    def fill_outbox(self, shard: int, *, empty: bool = False) -> None:
        """Fill ``shard``'s outbox to its bound with filler entries (nobody claims them), or
        take them out again."""
        ...


class RedisBackend:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.topology = load_topology(cluster.topology_path)
        self.opened = contextlib.AsyncExitStack()
        self.stacks: list[ShardStack] = []

    async def node(self, owner: str, *, lease_ms: int = 60_000) -> Node:
        stack = await self.opened.enter_async_context(
            shard_stack(self.topology, owner=owner, hold_ms=HOLD_MS, hooks=_every_hook)
        )
        self.stacks.append(stack)
        store = stack.store
        assert store is not None
        pubsub = PubSub(stack.shards, lambda _s, k, d: node.heard.append((k, d)))
        self.opened.push_async_callback(pubsub.close)  # closed before its shard links
        node = Node(store, pubsub)
        for shard in range(len(stack.shards.links)):  # reads count only owners with a live lease
            await store.lease(shard, lease_ms, first=True, gap_ms=0, grace_ms=0)
        return node

    async def elapse(self, ms: int) -> None:
        await asyncio.sleep(ms / 1000)  # holds and leases run on the shards' own clocks

    def lose_presence(self, app_id: str, channel: str) -> None:
        key = channel_key(app_id, channel)
        shard = self.topology_shard(key)
        raw_client(self.cluster.masters()[shard].addr).delete(key + b":p")

    def fill_outbox(self, shard: int, *, empty: bool = False) -> None:
        tag = self.stacks[0].store.shard_tag(shard)
        assert tag is not None
        with raw_client(self.cluster.masters()[shard].addr) as raw:
            for start in range(0, OUTBOX_MAX, 10_000):
                names = [b"filler-%d" % i for i in range(start, start + 10_000)]
                if empty:
                    raw.hdel(tag + b":ev", *names)
                else:
                    raw.hset(tag + b":ev", mapping=dict.fromkeys(names, b"x"))

    def topology_shard(self, key: bytes) -> int:
        return self.stacks[0].shards.table.shard_for_key(key)

    async def close(self) -> None:
        await self.opened.aclose()


class MemoryBackend:
    def __init__(self) -> None:
        self.now = 1_000_000
        self.shards = MemoryShards(2, clock=lambda: self.now)

    async def node(self, owner: str, *, lease_ms: int = 60_000) -> Node:
        store = self.shards.store(owner, hold_ms=HOLD_MS, hooks=_every_hook)
        node = Node(store, self.shards.subscriptions(lambda _s, k, d: node.heard.append((k, d))))
        for shard in range(len(self.shards.shards)):
            await store.lease(shard, lease_ms, first=True, gap_ms=0, grace_ms=0)
        return node

    async def elapse(self, ms: int) -> None:
        self.now += ms
        await asyncio.sleep(0)  # one loop turn, as a real wait would give

    def lose_presence(self, app_id: str, channel: str) -> None:
        key = channel_key(app_id, channel)
        state = self.shards.shards[self.shards.shard_for_key(key)]
        state.channels[key].members.clear()

    def fill_outbox(self, shard: int, *, empty: bool = False) -> None:
        ev = self.shards.shards[shard].ev
        for i in range(OUTBOX_MAX):
            if empty:
                ev.pop(b"filler-%d" % i, None)
            else:
                ev[b"filler-%d" % i] = b"x"


@pytest.fixture(params=["redis", "memory"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend()
        return
    cluster: LocalCluster = request.getfixturevalue("cluster")
    init_shards(load_topology(cluster.topology_path))
    redis_backend = RedisBackend(cluster)
    yield redis_backend
    await redis_backend.close()


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _node_name(stem: str) -> str:
    return f"{stem}@{_uid()}"


def _heard(node: Node, channel: str) -> Callable[[], list[bytes]]:
    key = channel_key("1", channel)
    return lambda: [data for k, data in node.heard if k == key]


async def test_first_and_last_connection_across_nodes(backend: Backend) -> None:
    a, b = await backend.node(_node_name("a")), await backend.node(_node_name("b"))
    ch = f"presence-room-{_uid()}"
    shard = a.store.shard_of("1", ch)
    for n in (a, b):
        await n.pubsub.subscribe(shard, channel_key("1", ch))

    first = await a.store.join("1", ch, "u1", '{"name":"Ann"}', "1.1")
    assert first.added and first.webhook
    assert first.roster == {"u1": '{"name":"Ann"}'}
    again = await b.store.join("1", ch, "u1", '{"name":"Ann"}', "2.2")
    assert not again.added and not again.webhook
    other = await b.store.join("1", ch, "u2", None, "2.3")
    assert other.added and other.roster == {"u1": '{"name":"Ann"}', "u2": None}
    # Both nodes heard exactly the two member_added transitions, in order.
    await settle(lambda: len(_heard(a, ch)()) == 2 and len(_heard(b, ch)()) == 2)
    assert _heard(a, ch)() == [
        contract.encode_member_added("u1", '{"name":"Ann"}', "1.1"),
        contract.encode_member_added("u2", None, "2.3"),
    ]
    assert (await a.store.counts("1", ch)).user_count == 2
    assert sorted(await a.store.user_ids("1", ch)) == ["u1", "u2"]
    assert not await a.store.leave("1", ch, "u1")  # node b still holds u1
    assert await b.store.leave("1", ch, "u1")
    assert not await b.store.leave("1", ch, "u1")  # idempotent
    await settle(lambda: b"Ru1" in _heard(b, ch)())
    assert _heard(a, ch)().count(b"Ru1") <= 1
    assert await a.store.roster("1", ch) == {"u2": None}


async def test_member_limit(backend: Backend) -> None:
    a = await backend.node(_node_name("a"))
    a.store.max_members = 3
    ch = f"presence-full-{_uid()}"
    for i in range(3):
        assert (await a.store.join("1", ch, f"u{i}", None, "1.1")).roster is not None
    refused = await a.store.join("1", ch, "u9", None, "1.1")
    assert refused.roster is None and not refused.added
    # An existing member may still join from another socket or node.
    assert (await a.store.join("1", ch, "u1", None, "1.2")).roster is not None


async def test_occupied_vacated_and_held_webhooks(backend: Backend) -> None:
    a, b = await backend.node(_node_name("a")), await backend.node(_node_name("b"))
    ch = f"room-{_uid()}"
    shard = a.store.shard_of("1", ch)
    await a.pubsub.subscribe(shard, channel_key("1", ch))
    r1 = await a.store.set_subscribers("1", ch, 2, publish_count=True)
    assert (r1.before, r1.after, r1.occupied_webhook) == (0, 2, True)
    # Recorded in the same call, due at once, and claimed by one node only.
    assert await _claims(ch, b, a) == [("channel_occupied", None), ("subscription_count", "2")]
    assert await _claims(ch, a, b) == []
    r2 = await b.store.set_subscribers("1", ch, 1, publish_count=True)
    assert (r2.before, r2.after, r2.occupied_webhook) == (2, 3, False)
    assert (await b.store.counts("1", ch)).subscription_count == 3
    listed = await b.store.channels("1", "room-")
    assert listed[ch].subscription_count == 3
    await settle(lambda: _heard(a, ch)() == [b"C2", b"C3"], what="both counts published")
    await a.store.set_subscribers("1", ch, 0, publish_count=True)
    r3 = await b.store.set_subscribers("1", ch, 0, publish_count=True)
    assert r3.after == 0
    assert ch not in await a.store.channels("1", "room-")
    # The vacated webhook is held, then claimed by exactly one node.
    assert await _claims(ch, a) == [("subscription_count", "3"), ("subscription_count", "1")]
    await backend.elapse(HOLD_MS + 100)
    assert await _claims(ch, a, b) == [("channel_vacated", None)]


async def test_a_full_outbox_drops_new_webhooks_and_the_next_claim_reports_them(
    backend: Backend,
) -> None:
    a = await backend.node(_node_name("a"))
    ch = f"room-full-{_uid()}"
    shard = a.store.shard_of("1", ch)
    backend.fill_outbox(shard)
    try:
        # The transition itself is made; its two webhooks find the outbox full.
        r = await a.store.set_subscribers("1", ch, 1, publish_count=False)
        assert (r.before, r.after, r.occupied_webhook) == (0, 1, True)
        claims = [cl for cl in await a.store.claim_outbox(1000, 60_000) if cl.shard == shard]
        assert [cl.dropped for cl in claims] == [2]
        assert not [e for cl in claims for e in cl.entries if e.channel == ch]
        # Reported once.
        again = [cl for cl in await a.store.claim_outbox(1000, 60_000) if cl.shard == shard]
        assert all(cl.dropped == 0 for cl in again)
    finally:
        backend.fill_outbox(shard, empty=True)
    # Room again: the next transition's webhooks are recorded.
    await a.store.set_subscribers("1", ch, 0, publish_count=False)
    await backend.elapse(HOLD_MS + 100)
    assert await _claims(ch, a) == [("channel_vacated", None)]


async def test_quick_return_cancels_held_webhooks(backend: Backend) -> None:
    a, b = await backend.node(_node_name("a")), await backend.node(_node_name("b"))
    ch = f"presence-flap-{_uid()}"
    await a.store.set_subscribers("1", ch, 1, publish_count=False)
    assert (await a.store.join("1", ch, "u1", None, "1.1")).webhook
    assert await a.store.leave("1", ch, "u1")
    await a.store.set_subscribers("1", ch, 0, publish_count=False)
    # Back on the other node within the hold: no webhook for the removal nor the re-add.
    back = await b.store.join("1", ch, "u1", None, "2.1")
    assert back.added and not back.webhook
    occ = await b.store.set_subscribers("1", ch, 1, publish_count=False)
    assert occ.after == 1 and not occ.occupied_webhook
    await backend.elapse(HOLD_MS + 100)
    # Only the first join's member_added and occupied: the flap sent nothing.
    assert await _claims(ch, a, b) == [("channel_occupied", None), ("member_added", "u1")]


async def test_cache_and_publish(backend: Backend) -> None:
    a, b = await backend.node(_node_name("a")), await backend.node(_node_name("b"))
    ch = f"cache-{_uid()}"
    assert await a.store.cache_get("1", ch) == (None, -2)
    await a.store.cache_set("1", ch, '{"event":"e","channel":"x","data":"1"}', 60_000)
    frame, ttl = await b.store.cache_get("1", ch)
    assert frame == '{"event":"e","channel":"x","data":"1"}' and 0 < ttl <= 60_000
    shard = b.store.shard_of("1", ch)
    await b.pubsub.subscribe(shard, channel_key("1", ch))
    await a.store.publish("1", ch, contract.encode_event("hello"))
    await settle(lambda: _heard(b, ch)() == [b"E\0hello"])
    assert await _claims(ch, a, b) == []  # no webhook asked for
    # A client event's webhook is recorded by the write that publishes it.
    await a.store.publish("1", ch, contract.encode_event("again"), hook=("e", '{"event":"c"}'))
    await settle(lambda: _heard(b, ch)() == [b"E\0hello", b"E\0again"])
    assert await _claims(ch, a, b) == [("client_event", '{"event":"c"}')]
    b.pubsub.unsubscribe(shard, channel_key("1", ch))


async def test_dead_owner_invisible_at_once_then_reaped(backend: Backend) -> None:
    a = await backend.node(_node_name("a"))
    b = await backend.node(_node_name("b"), lease_ms=600)
    ch = f"presence-reap-{_uid()}"
    shard = a.store.shard_of("1", ch)
    await a.pubsub.subscribe(shard, channel_key("1", ch))
    await a.store.join("1", ch, "alive", None, "1.1")
    await b.store.join("1", ch, "ghost", None, "2.1")
    await a.store.set_subscribers("1", ch, 1, publish_count=False)
    await b.store.set_subscribers("1", ch, 1, publish_count=False)
    assert set(await a.store.roster("1", ch)) == {"alive", "ghost"}
    await backend.elapse(700)  # b stopped refreshing: its lease is over
    assert set(await a.store.roster("1", ch)) == {"alive"}
    counts = await a.store.counts("1", ch)
    assert (counts.user_count, counts.subscription_count) == (1, 1)

    # Another test's node may hold the shard's reap lock for a few seconds, and one pass takes
    # the 16 longest-dead owners: on a shard shared with earlier tests, b may need a few.
    removed = 0

    async def reaped() -> bool:
        nonlocal removed
        reply = await a.store.reap(shard, "reaper-test", lock_ms=2000, limit=100, grace_ms=0)
        removed += max(reply[-1], 0)
        return reply[0] != -1 and ("1", ch) not in await b.store.owned(shard)

    await settle(reaped, what="the dead owner's entries reaped")
    assert removed >= 2  # b's presence entry and its count, at least
    await settle(lambda: b"Rghost" in _heard(a, ch)(), what="member_removed of ghost published")
    await backend.elapse(HOLD_MS + 100)
    due = [d for d in await _claims(ch, a) if d[0] in ("member_removed", "channel_vacated")]
    assert due == [("member_removed", "ghost")]
    assert ("1", ch) not in await b.store.owned(shard)  # nothing of b is left on the shard
    assert ("1", ch) in await a.store.owned(shard)


async def test_new_incarnation_makes_the_old_one_dead(backend: Backend) -> None:
    node = f"node-r{_uid()}"
    old = await backend.node(f"{node}@one")
    ch = f"presence-restart-{_uid()}"
    await old.store.join("1", ch, "u1", None, "1.1")
    assert await old.store.roster("1", ch) == {"u1": None}
    new = await backend.node(f"{node}@two")
    assert await new.store.roster("1", ch) == {}  # at once, before any reaping
    states = {
        owner: state for owner, _, state in await new.store.leases(new.store.shard_of("1", ch))
    }
    assert states[f"{node}@one"] == "dead" and states[f"{node}@two"] == "live"


async def test_sync_reasserts_absolute_state_and_digest_agrees(backend: Backend) -> None:
    a = await backend.node(_node_name("s"))
    ch = f"presence-sync-{_uid()}"
    shard = a.store.shard_of("1", ch)
    local = LocalChannel(3, {"u1": '{"n":1}', "u2": None}, False)
    [due] = await a.store.sync_many([("1", ch, local)])
    assert not isinstance(due, BaseException)
    assert sorted(due, key=str) == sorted(
        [("channel_occupied", None), ("member_added", "u1"), ("member_added", "u2")], key=str
    )
    counts = await a.store.counts("1", ch)
    assert (counts.user_count, counts.subscription_count) == (2, 3)
    mine = {("1", ch): local}  # this owner has entries in this one channel only
    assert await a.store.check(shard) == digest(mine)
    # Lose the presence entries (as a failover losing writes would): the digest differs,
    # and re-asserting the same absolute state restores them.
    backend.lose_presence("1", ch)
    assert await a.store.check(shard) != digest(mine)
    await a.store.sync_many([("1", ch, local)])
    assert await a.store.check(shard) == digest(mine)
    # A user the node no longer holds is removed (member_removed), absolutely.
    await a.store.sync_many([("1", ch, LocalChannel(1, {"u1": '{"n":1}'}, False))])
    assert await a.store.roster("1", ch) == {"u1": '{"n":1}'}


async def test_nodes_of_library_version_4_keep_working_during_an_upgrade(
    store_factory: StoreFactory, cluster: LocalCluster
) -> None:
    """A version-4 node (no ``hooks``; ``claim`` with a limit only) against the version-5
    library: its held webhooks are recorded and claimed its way; entries left by the
    version-4 library (a name without payload) are delivered by version-5 nodes."""
    store = await store_factory(f"old@{_uid()}", lease_ms=60_000, hold_ms=HOLD_MS)
    ch = f"presence-v4-{_uid()}"
    key = channel_key("1", ch)
    writer = store.writer
    owner = store.owner
    reply = await writer.write(b"pjoin", key, owner, b"u1", b"", b"1.1", b"100", b"300", b"60000")
    assert cast(list[object], reply)[:2] == [1, 1]  # added; the webhook is the caller's to send
    assert await writer.write(b"pleave", key, owner, b"u1", b"300") == 1
    assert await writer.write(b"publish", key, b"T") == 0  # the payload only: no webhook
    tag = store.shard_tag(store.shard_of("1", ch))
    assert tag is not None
    await asyncio.sleep(HOLD_MS / 1000 + 0.1)
    names = cast(list[bytes], await writer.write(b"claim", tag, b"1000"))
    assert key + b"\0m\0u1" in names  # the version-4 claim: names, removed
    # An entry the version-4 library left (no payload) goes out through version 5's claim.
    shard = store.shard_of("1", ch)
    raw = raw_client(cluster.masters()[shard].addr)
    raw.zadd(tag + b":due", {key + b"\0m\0u2": 1})
    claims = await store.claim_outbox(1000, 60_000)
    mine = [e for claim in claims for e in claim.entries if e.channel == ch]
    assert [(e.name, e.rest) for e in mine] == [("member_removed", b"u2")]
    await store.ack_outbox(shard, [e.id for e in mine])
