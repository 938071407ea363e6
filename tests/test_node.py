"""Gateway nodes in-process on a real topology: presence across nodes, events, graceful stop."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nodes import APP_KEY, AsyncWsClient
from polling import settle

from gateway.config import NodeConfig
from gateway.localcluster import LocalCluster
from gateway.server.node import GatewayNode
from gateway.shards.admin import init_shards
from gateway.shards.topology import load_topology


@pytest.fixture
async def two_nodes(cluster: LocalCluster) -> AsyncIterator[tuple[GatewayNode, GatewayNode]]:
    topo = load_topology(cluster.topology_path)
    init_shards(topo)
    nodes = []
    for name in ("node-a", "node-b"):
        node = GatewayNode(NodeConfig(port=0, node_id=name, webhook_hold_ms=200), topo)
        await node.start()
        nodes.append(node)
    yield nodes[0], nodes[1]
    for node in nodes:
        await node.close()


async def _open(node: GatewayNode) -> AsyncWsClient:
    return await AsyncWsClient.open(f"ws://127.0.0.1:{node.port}/app/{APP_KEY}?protocol=7")


async def _presence(client: AsyncWsClient, channel: str, user_id: str, info: Any) -> Any:
    """Subscribe to a presence channel; the roster of ``subscription_succeeded``."""
    frame = await client.subscribe(channel, user_id, info)
    return json.loads(frame["data"])["presence"]


async def test_presence_across_two_nodes(two_nodes: tuple[GatewayNode, GatewayNode]) -> None:
    a, b = two_nodes
    ch = "presence-room-node-test"
    ann = await _open(a)
    bob = await _open(b)
    roster = await _presence(ann, ch, "ann", {"name": "Ann"})
    assert roster == {"ids": ["ann"], "hash": {"ann": {"name": "Ann"}}, "count": 1}
    roster = await _presence(bob, ch, "bob", None)
    assert roster["count"] == 2 and set(roster["ids"]) == {"ann", "bob"}
    added = await ann.expect("pusher_internal:member_added")
    assert json.loads(added["data"]) == {"user_id": "bob", "user_info": None}
    # A second socket of ann on node b: nobody hears a new member.
    ann2 = await _open(b)
    roster = await _presence(ann2, ch, "ann", {"name": "Ann"})
    assert roster["count"] == 2
    counts = await a.store.counts("1", ch)
    assert (counts.user_count, counts.subscription_count) == (2, 3)
    # Client event from bob reaches ann on the other node with user_id, not bob himself.
    await bob.send({"event": "client-typing", "data": {"t": 1}, "channel": ch})
    event = await ann.expect("client-typing")
    assert event["user_id"] == "bob" and json.loads(event["data"]) == {"t": 1}
    await bob.close()
    removed = await ann.expect("pusher_internal:member_removed")
    assert json.loads(removed["data"]) == {"user_id": "bob"}
    await ann2.close()

    async def ann_alone() -> bool:
        counts = await b.store.counts("1", ch)
        return (counts.user_count, counts.subscription_count) == (1, 1)

    await settle(ann_alone, what="1 user with 1 subscription once ann's second socket closed")
    await ann.close()


async def test_public_channel_events_and_unsubscribe(
    two_nodes: tuple[GatewayNode, GatewayNode],
) -> None:
    a, b = two_nodes
    c1 = await _open(a)
    c2 = await _open(b)
    for c in (c1, c2):
        assert (await c.subscribe("news"))["data"] == "{}"
    await a.store.publish("1", "news", b"E\0" + b'{"event":"x","channel":"news","data":"1"}')
    for c in (c1, c2):
        assert (await c.expect("x"))["data"] == "1"
    await c2.send({"event": "pusher:unsubscribe", "data": {"channel": "news"}})

    async def one_left() -> bool:
        return (await a.store.counts("1", "news")).subscription_count == 1

    await settle(one_left, what="1 subscription to news once c2 unsubscribed")
    await c1.close()
    await c2.close()
