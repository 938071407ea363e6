"""One gateway node: shard links, the batched writer and the WebSocket front door, composed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from gateway.config import NodeConfig
from gateway.metrics import Metrics
from gateway.shards.shardset import ShardSet
from gateway.shards.topology import TopologyConfig
from gateway.shards.writer import BatchWriter

__all__ = ["GatewayNode", "new_socket_id"]

log = logging.getLogger("gateway.server")

ACTIVITY_TIMEOUT = 120
MEMBER_TTL_MS = 60_000


def new_socket_id() -> str:
    """A Pusher socket id: two decimal integers joined by a dot."""
    return f"{secrets.randbelow(10**10)}.{secrets.randbelow(10**10)}"


class GatewayNode:
    """A running gateway node.

    Every accepted WebSocket on ``/app/{key}`` receives ``pusher:connection_established`` and is
    recorded as a member of the app's ``presence-lobby`` channel through the verified writer;
    the entry is removed when the socket closes.
    """

    def __init__(self, config: NodeConfig, topology: TopologyConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.shards = ShardSet(topology, metrics=self.metrics)
        self.writer = BatchWriter(self.shards, metrics=self.metrics)
        self._server: Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, *, ready_timeout: float = 15.0) -> None:
        """Connect to every shard, then listen."""
        await self.shards.start()
        await self.shards.wait_ready(ready_timeout)
        self.writer.start()
        self._server = await serve(self._handle, self.config.host, self.config.port)
        log.info(
            "gateway node %s listening on %s:%d", self.config.node_id, self.config.host, self.port
        )

    async def close(self) -> None:
        """Stop listening, close sockets, flush and disconnect from the shards."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.writer.close()
        await self.shards.close()

    async def _handle(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else ""
        parts = path.split("?", 1)[0].split("/")
        if len(parts) != 3 or parts[1] != "app":
            await ws.close(4005, "Path not found")
            return
        app = self.config.app_by_key(parts[2])
        if app is None:
            await ws.send(
                json.dumps(
                    {
                        "event": "pusher:error",
                        "data": {"code": 4001, "message": "App key not found"},
                    }
                )
            )
            await ws.close(4001, "App key not found")
            return
        socket_id = new_socket_id()
        await ws.send(
            json.dumps(
                {
                    "event": "pusher:connection_established",
                    "data": json.dumps(
                        {"socket_id": socket_id, "activity_timeout": ACTIVITY_TIMEOUT}
                    ),
                }
            )
        )
        key = f"{{{app.id}:presence-lobby}}:pres".encode()
        field = f"{self.config.node_id}/{socket_id}".encode()
        info = json.dumps({"user_id": socket_id}).encode()
        joined = False
        try:
            await self.writer.write(b"hset", key, field, info, str(MEMBER_TTL_MS).encode())
            joined = True
            async for message in ws:
                if isinstance(message, str) and '"pusher:ping"' in message:
                    await ws.send('{"event":"pusher:pong","data":"{}"}')
        except ConnectionClosed:
            pass
        finally:
            if joined:
                with contextlib.suppress(Exception):
                    await self.writer.write(b"hdel", key, field)


async def run_node(config: NodeConfig, topology: TopologyConfig) -> None:
    """Run a node until SIGINT or SIGTERM, then shut it down (bounded in time)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = GatewayNode(config, topology)
    try:
        await node.start()
        await stop.wait()
        log.info("gateway node %s: stopping", config.node_id)
    finally:
        try:
            await asyncio.wait_for(node.close(), 10)
        except TimeoutError:
            log.error("gateway node %s: shutdown took longer than 10 s", config.node_id)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
