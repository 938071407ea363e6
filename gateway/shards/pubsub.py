"""Per-shard Pub/Sub: the channels this node listens to on each shard's verified master."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import cast

from gateway._native import ReplyReader, RespError, pack_command
from gateway.shards.shardset import ShardLink, ShardSet
from gateway.shards.topology import Address

__all__ = ["PubSub"]

log = logging.getLogger("gateway.shards.pubsub")

MessageHandler = Callable[[int, bytes, bytes], None]


class _SubProtocol(asyncio.Protocol):
    """A connection in subscribe mode: acks complete futures in order, messages go to a callback."""

    def __init__(self, shard: int, on_message: MessageHandler) -> None:
        self.shard = shard
        self.on_message = on_message
        self.reader = ReplyReader()
        self.transport: asyncio.Transport | None = None
        self.acks: collections.deque[asyncio.Future[None]] = collections.deque()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
        except RespError as exc:
            log.error("shard %d pubsub: protocol error %s", self.shard, exc)
            if self.transport is not None:
                self.transport.abort()
            return
        while True:
            replies = self.reader.take(1)
            if replies is None:
                return
            reply = replies[0]
            if not isinstance(reply, list) or len(reply) < 3:
                continue
            kind = reply[0]
            if kind == b"message":
                self.on_message(self.shard, cast(bytes, reply[1]), cast(bytes, reply[2]))
            elif kind in (b"subscribe", b"unsubscribe") and self.acks:
                fut = self.acks.popleft()
                if not fut.done():
                    fut.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.acks:
            fut = self.acks.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("pubsub connection lost"))
        if not self.lost.done():
            self.lost.set_result(None)


class PubSub:
    """Keeps one subscriber connection per shard, following the shard's verified master.

    ``subscribe`` returns once the shard confirmed the subscription, so a caller that then
    changes state on that shard sees every message published after the change. When a shard's
    link is re-verified on another server, the subscriptions are re-established there.
    """

    def __init__(self, shards: ShardSet, on_message: MessageHandler) -> None:
        self.shards = shards
        self.on_message = on_message
        self._wanted: list[set[bytes]] = [set() for _ in shards.links]
        self._conns: list[_SubProtocol | None] = [None for _ in shards.links]
        self._addrs: list[Address | None] = [None for _ in shards.links]
        self._confirmed: list[dict[bytes, asyncio.Future[None]]] = [{} for _ in shards.links]
        self._locks = [asyncio.Lock() for _ in shards.links]
        shards.on_link_up(self._link_up)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def _link_up(self, link: ShardLink) -> None:
        if self._closed:
            return
        task = asyncio.create_task(self._reconnect(link.index))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconnect(self, shard: int) -> None:
        try:
            await self._ensure(shard)
        except (ConnectionError, OSError, TimeoutError) as exc:
            log.warning("shard %d pubsub: cannot (re)subscribe: %s", shard, exc)

    async def _ensure(self, shard: int) -> _SubProtocol:
        async with self._locks[shard]:
            link = self.shards.links[shard]
            proto = self._conns[shard]
            addr = link.address
            if proto is not None and not proto.lost.done() and addr == self._addrs[shard]:
                return proto
            if proto is not None and proto.transport is not None:
                proto.transport.abort()
            if addr is None or not link.usable:
                raise ConnectionError(f"{link.spec.name}: shard unavailable: {link.last_error}")
            loop = asyncio.get_running_loop()
            _, fresh = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _SubProtocol(shard, self.on_message), addr.host, addr.port
                ),
                self.shards.connect_timeout,
            )
            self._conns[shard] = fresh
            self._addrs[shard] = addr
            if self._wanted[shard]:
                await self._send(fresh, b"SUBSCRIBE", sorted(self._wanted[shard]))
            return fresh

    @staticmethod
    async def _send(proto: _SubProtocol, command: bytes, channels: list[bytes]) -> None:
        assert proto.transport is not None
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in channels]
        proto.acks.extend(futs)
        proto.transport.write(pack_command([command, *channels]))
        await asyncio.gather(*futs)

    async def subscribe(self, shard: int, channel: bytes, *, timeout: float = 5.0) -> None:
        """Listen to ``channel`` on ``shard``; returns when the shard confirmed it.

        Raises:
            ConnectionError: The shard is unavailable.
            TimeoutError: No confirmation within ``timeout`` seconds.
        """
        confirmed = self._confirmed[shard].get(channel)
        if confirmed is None or (confirmed.done() and confirmed.exception() is not None):
            self._wanted[shard].add(channel)
            confirmed = asyncio.ensure_future(self._subscribe_now(shard, channel, timeout))
            self._confirmed[shard][channel] = confirmed
        await asyncio.shield(confirmed)

    async def _subscribe_now(self, shard: int, channel: bytes, timeout: float) -> None:
        proto = await asyncio.wait_for(self._ensure(shard), timeout)
        await asyncio.wait_for(self._send(proto, b"SUBSCRIBE", [channel]), timeout)

    def unsubscribe(self, shard: int, channel: bytes) -> None:
        """Stop listening to ``channel`` (fire and forget)."""
        if channel not in self._wanted[shard]:
            return
        self._wanted[shard].discard(channel)
        self._confirmed[shard].pop(channel, None)
        proto = self._conns[shard]
        if proto is not None and proto.transport is not None and not proto.lost.done():
            proto.acks.append(asyncio.get_running_loop().create_future())
            proto.transport.write(pack_command([b"UNSUBSCRIBE", channel]))

    def subscribed(self, shard: int) -> set[bytes]:
        """Channels wanted on ``shard``."""
        return set(self._wanted[shard])

    async def close(self) -> None:
        """Close every subscriber connection."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for proto in self._conns:
            if proto is not None and proto.transport is not None:
                proto.transport.abort()
