"""Gateway nodes in-process on a real topology: presence across nodes, events, graceful stop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from gateway.config import DEFAULT_APP, NodeConfig
from gateway.localcluster import LocalCluster
from gateway.protocol.auth import sign
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


class Client:
    """A raw Pusher protocol client over websockets."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.socket_id = ""

    @classmethod
    async def open(cls, node: GatewayNode) -> Client:
        ws = await connect(f"ws://127.0.0.1:{node.port}/app/app-key?protocol=7")
        client = cls(ws)
        hello = await client.recv()
        assert hello["event"] == "pusher:connection_established"
        client.socket_id = json.loads(hello["data"])["socket_id"]
        return client

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        return dict(json.loads(await asyncio.wait_for(self.ws.recv(), timeout)))

    async def expect(self, event: str, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            frame = await self.recv(timeout)
            if frame["event"] == event:
                return frame

    async def send(self, event: str, data: Any, channel: str | None = None) -> None:
        frame: dict[str, Any] = {"event": event, "data": data}
        if channel:
            frame["channel"] = channel
        await self.ws.send(json.dumps(frame))

    async def subscribe_presence(self, channel: str, user_id: str, info: Any = None) -> Any:
        channel_data = json.dumps({"user_id": user_id, "user_info": info})
        sig = sign(DEFAULT_APP.secret, f"{self.socket_id}:{channel}:{channel_data}")
        await self.send(
            "pusher:subscribe",
            {"channel": channel, "auth": f"app-key:{sig}", "channel_data": channel_data},
        )
        frame = await self.expect("pusher_internal:subscription_succeeded")
        return json.loads(frame["data"])["presence"]


async def test_presence_across_two_nodes(two_nodes: tuple[GatewayNode, GatewayNode]) -> None:
    a, b = two_nodes
    ch = "presence-room-node-test"
    ann = await Client.open(a)
    bob = await Client.open(b)
    roster = await ann.subscribe_presence(ch, "ann", {"name": "Ann"})
    assert roster == {"ids": ["ann"], "hash": {"ann": {"name": "Ann"}}, "count": 1}
    roster = await bob.subscribe_presence(ch, "bob")
    assert roster["count"] == 2 and set(roster["ids"]) == {"ann", "bob"}
    added = await ann.expect("pusher_internal:member_added")
    assert json.loads(added["data"]) == {"user_id": "bob", "user_info": None}
    # A second socket of ann on node b: nobody hears a new member.
    ann2 = await Client.open(b)
    roster = await ann2.subscribe_presence(ch, "ann", {"name": "Ann"})
    assert roster["count"] == 2
    counts = await a.store.counts("1", ch)
    assert (counts.user_count, counts.subscription_count) == (2, 3)
    # Client event from bob reaches ann on the other node with user_id, not bob himself.
    await bob.send("client-typing", {"t": 1}, ch)
    event = await ann.expect("client-typing")
    assert event["user_id"] == "bob" and json.loads(event["data"]) == {"t": 1}
    await bob.ws.close()
    removed = await ann.expect("pusher_internal:member_removed")
    assert json.loads(removed["data"]) == {"user_id": "bob"}
    await ann2.ws.close()
    await asyncio.sleep(0.2)
    counts = await b.store.counts("1", ch)
    assert (counts.user_count, counts.subscription_count) == (1, 1)
    await ann.ws.close()


async def test_public_channel_events_and_unsubscribe(
    two_nodes: tuple[GatewayNode, GatewayNode],
) -> None:
    a, b = two_nodes
    c1 = await Client.open(a)
    c2 = await Client.open(b)
    for c in (c1, c2):
        await c.send("pusher:subscribe", {"channel": "news", "auth": ""})
        assert (await c.expect("pusher_internal:subscription_succeeded"))["data"] == "{}"
    await a.store.publish("1", "news", b"E\0" + b'{"event":"x","channel":"news","data":"1"}')
    for c in (c1, c2):
        assert (await c.expect("x"))["data"] == "1"
    await c2.send("pusher:unsubscribe", {"channel": "news"})
    await asyncio.sleep(0.2)
    assert (await a.store.counts("1", "news")).subscription_count == 1
    await c1.ws.close()
    await c2.ws.close()
