"""Nothing is left open: the shard set closes a connection it had not finished checking, and
the tests' event loop turns a connection left open into a failure, never a hang.

uvloop closes what is still open when its loop closes and warns once per handle; with warnings
as errors that used to abort the close half-way and leave ``loop.close()`` waiting for ever.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from conftest import CheckedLoop, LeakedResources

from gateway.shards.shardset import ShardSet
from gateway.shards.topology import TopologyConfig


def _leak_a_connection(loop: asyncio.AbstractEventLoop, port: int) -> asyncio.BaseTransport:
    async def connect() -> asyncio.BaseTransport:
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        return transport

    # Opened and deliberately never closed.
    return loop.run_until_complete(connect())


def test_a_connection_left_open_fails_the_close_and_is_closed() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        loop = CheckedLoop()
        _transport = _leak_a_connection(loop, server.getsockname()[1])
        peer, _ = server.accept()
        with peer:
            with pytest.raises(LeakedResources, match="TCPTransport"):
                loop.close()
            assert loop.is_closed()
            # The leaked connection really was closed: the server side reads end of file.
            peer.settimeout(10)
            assert peer.recv(1) == b""


def test_a_clean_loop_closes_quietly() -> None:
    loop = CheckedLoop()

    async def nothing() -> None:
        await asyncio.sleep(0)

    loop.run_until_complete(nothing())
    loop.close()
    assert loop.is_closed()


async def test_closing_the_shard_set_mid_check_closes_the_new_connection() -> None:
    """A server that accepted the connection but has not answered ``ROLE`` yet when the shard
    set closes (a node stopping during a reconnection) sees the connection closed."""
    accepted = asyncio.Event()
    ended = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        while await reader.read(4096):  # reads the commands, never answers
            pass
        ended.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    topology = TopologyConfig.from_dict(
        {"cluster": "hygiene", "shards": [{"name": "shard-0", "master": f"127.0.0.1:{port}"}]}
    )
    shards = ShardSet(topology, connect_timeout=60.0)
    async with server:
        await shards.start()
        await asyncio.wait_for(accepted.wait(), 10)
        await shards.close()
        await asyncio.wait_for(ended.wait(), 10)
