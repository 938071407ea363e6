"""Presence store against real shards: global transitions, counts, held webhooks, Pub/Sub."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from gateway.localcluster import LocalCluster
from gateway.shards.admin import init_shards
from gateway.shards.pubsub import PubSub
from gateway.shards.shardset import ShardSet
from gateway.shards.topology import load_topology
from gateway.shards.writer import BatchWriter
from gateway.store import wire
from gateway.store.presence import PresenceStore, channel_key


@dataclass
class Node:
    """One simulated gateway node: its own links, writer, Pub/Sub and owner string."""

    shards: ShardSet
    writer: BatchWriter
    store: PresenceStore
    pubsub: PubSub
    messages: list[tuple[bytes, bytes]] = field(default_factory=list)


async def _node(cluster: LocalCluster, owner: str) -> Node:
    shards = ShardSet(load_topology(cluster.topology_path), recheck_interval=0.2)
    writer = BatchWriter(shards)
    store = PresenceStore(shards, writer, owner=owner, hold_ms=300)
    box: list[tuple[bytes, bytes]] = []
    pubsub = PubSub(shards, lambda _shard, ch, data: box.append((ch, data)))
    await shards.start()
    await shards.wait_ready(10)
    writer.start()
    for shard in range(len(shards.links)):  # reads count only owners with a live lease
        await store.lease(shard, 60_000, first=True, gap_ms=0, grace_ms=0)
    return Node(shards, writer, store, pubsub, box)


@pytest.fixture
async def nodes(cluster: LocalCluster) -> AsyncIterator[tuple[Node, Node]]:
    init_shards(load_topology(cluster.topology_path))
    a = await _node(cluster, f"node-a@{uuid.uuid4().hex[:8]}")
    b = await _node(cluster, f"node-b@{uuid.uuid4().hex[:8]}")
    yield a, b
    for n in (a, b):
        await n.pubsub.close()
        await n.writer.close()
        await n.shards.close()


def _channel(stem: str) -> str:
    return f"presence-{stem}-{uuid.uuid4().hex[:8]}"


async def _settle(cond: object, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if callable(cond) and cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_first_and_last_connection_across_nodes(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    ch = _channel("room")
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
    await _settle(lambda: len(a.messages) == 2 and len(b.messages) == 2)
    assert [m[1][:1] for m in a.messages] == [b"M", b"M"]
    assert a.messages[0][1] == wire.encode_member_added("u1", '{"name":"Ann"}', "1.1")
    assert wire.decode(a.messages[0][1]) == wire.MemberAdded("1.1", "u1", '{"name":"Ann"}')

    assert (await a.store.counts("1", ch)).user_count == 2
    assert not await a.store.leave("1", ch, "u1")  # node b still holds u1
    assert await b.store.leave("1", ch, "u1")
    assert not await b.store.leave("1", ch, "u1")  # idempotent
    await _settle(lambda: any(m[1] == b"Ru1" for m in b.messages))
    assert await a.store.roster("1", ch) == {"u2": None}


async def test_member_limit(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    a.store.max_members = b"3"
    ch = _channel("full")
    for i in range(3):
        assert (await a.store.join("1", ch, f"u{i}", None, "1.1")).roster is not None
    refused = await a.store.join("1", ch, "u9", None, "1.1")
    assert refused.roster is None and not refused.added
    # An existing member may still join from another socket or node.
    assert (await a.store.join("1", ch, "u1", None, "1.2")).roster is not None


async def test_occupied_vacated_and_held_webhooks(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    ch = f"room-{uuid.uuid4().hex[:8]}"
    r1 = await a.store.set_subscribers("1", ch, 2, publish_count=True)
    assert (r1.before, r1.after, r1.occupied_webhook) == (0, 2, True)
    r2 = await b.store.set_subscribers("1", ch, 1, publish_count=True)
    assert (r2.before, r2.after, r2.occupied_webhook) == (2, 3, False)
    assert (await b.store.counts("1", ch)).subscription_count == 3
    listed = await b.store.channels("1", "room-")
    assert listed[ch].subscription_count == 3
    await a.store.set_subscribers("1", ch, 0, publish_count=True)
    r3 = await b.store.set_subscribers("1", ch, 0, publish_count=True)
    assert r3.after == 0
    assert ch not in await a.store.channels("1", "room-")
    # The vacated webhook is held, then claimed by exactly one node.
    assert not [c for c in await a.store.claim_due() if c.channel == ch]  # still held
    await asyncio.sleep(0.4)
    claims = await a.store.claim_due() + await b.store.claim_due()
    vacated = [c for c in claims if c.channel == ch]
    assert [(c.name, c.app_id) for c in vacated] == [("channel_vacated", "1")]


async def test_quick_return_cancels_held_webhooks(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    ch = _channel("flap")
    await a.store.set_subscribers("1", ch, 1, publish_count=False)
    assert (await a.store.join("1", ch, "u1", None, "1.1")).webhook
    assert await a.store.leave("1", ch, "u1")
    await a.store.set_subscribers("1", ch, 0, publish_count=False)
    # Back on the other node within the hold: no webhook for the removal nor the re-add.
    back = await b.store.join("1", ch, "u1", None, "2.1")
    assert back.added and not back.webhook
    occ = await b.store.set_subscribers("1", ch, 1, publish_count=False)
    assert occ.after == 1 and not occ.occupied_webhook
    await asyncio.sleep(0.4)
    claims = [c for c in await a.store.claim_due() + await b.store.claim_due() if c.channel == ch]
    assert claims == []


async def test_cache_and_publish(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    ch = f"cache-{uuid.uuid4().hex[:8]}"
    assert await a.store.cache_get("1", ch) == (None, -2)
    await a.store.cache_set("1", ch, '{"event":"e","channel":"x","data":"1"}', 60_000)
    frame, ttl = await b.store.cache_get("1", ch)
    assert frame == '{"event":"e","channel":"x","data":"1"}' and 0 < ttl <= 60_000
    shard = b.store.shard_of("1", ch)
    await b.pubsub.subscribe(shard, channel_key("1", ch))
    await a.store.publish("1", ch, b"E\0hello")
    await _settle(lambda: (channel_key("1", ch), b"E\0hello") in b.messages)
    b.pubsub.unsubscribe(shard, channel_key("1", ch))
