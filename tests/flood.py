"""A hostile load generator for the chaos and adversarial tests, run as its own process.

Raw sockets on uvloop, nothing per frame but one precomputed write, so one process can open
thousands of WebSocket connections and keep a gateway node's event loop saturated:

``burst``
    Open ``--connections`` connections at once; on each, right after the handshake, send
    ``--subs`` public subscriptions in one write; hold them ``--hold`` seconds; close.
``churn``
    For ``--duration`` seconds, ``--connections`` workers each loop: connect, subscribe
    ``--subs`` channels, unsubscribe them, close. Refused handshakes (503, 429) are retried.

Prints one JSON line of counts. Every connection goes to 127.0.0.1 and every loop is bounded
in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from typing import Any

import uvloop

_HANDSHAKE = (
    "GET /app/{key}?protocol=7&client=js&version=8.6.0 HTTP/1.1\r\n"
    "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def masked_text_frame(text: str) -> bytes:
    """A client (masked) text frame."""
    data = text.encode()
    mask = os.urandom(4)
    n = len(data)
    head = bytes((129, 128 | n)) if n < 126 else bytes((129, 128 | 126)) + n.to_bytes(2, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return head + mask + body


def subscribe_frames(prefix: str, count: int, *, unsubscribe: bool = False) -> bytes:
    event = "pusher:unsubscribe" if unsubscribe else "pusher:subscribe"
    return b"".join(
        masked_text_frame(json.dumps({"event": event, "data": {"channel": f"{prefix}-{i}"}}))
        for i in range(count)
    )


class Stats:
    def __init__(self) -> None:
        self.opened = 0
        self.refused = 0
        self.failed = 0
        self.closed_by_server = 0
        self.bytes_received = 0


class _Client(asyncio.Protocol):
    def __init__(self, stats: Stats, payload: bytes, key: str) -> None:
        self.stats = stats
        self.payload = payload
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.upgraded: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.write(_HANDSHAKE.format(key=self.key).encode())

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_received += len(data)
        if self.upgraded.done():
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            ok = self.head.startswith(b"HTTP/1.1 101")
            self.upgraded.set_result(ok)
            if ok and self.transport is not None and self.payload:
                self.transport.write(self.payload)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_result(False)
        if not self.lost.done():
            self.lost.set_result(None)


async def _open(port: int, stats: Stats, payload: bytes, key: str) -> _Client | None:
    loop = asyncio.get_running_loop()
    try:
        _, client = await asyncio.wait_for(
            loop.create_connection(lambda: _Client(stats, payload, key), "127.0.0.1", port), 10
        )
    except (OSError, TimeoutError):
        stats.failed += 1
        return None
    try:
        ok = await asyncio.wait_for(client.upgraded, 30)
    except TimeoutError:
        ok = False
    if not ok:
        stats.refused += 1
        if client.transport is not None:
            client.transport.abort()
        return None
    stats.opened += 1
    return client


async def burst(args: argparse.Namespace, stats: Stats) -> None:
    gate = asyncio.Semaphore(args.concurrency)
    clients: list[_Client] = []

    async def one(i: int) -> None:
        payload = subscribe_frames(f"{args.prefix}-{i}", args.subs)
        async with gate:
            client = await _open(args.port, stats, payload, args.key)
        if client is not None:
            clients.append(client)

    await asyncio.gather(*(one(i) for i in range(args.connections)))
    await asyncio.sleep(args.hold)
    for client in clients:
        if client.lost.done():
            stats.closed_by_server += 1
        elif client.transport is not None:
            client.transport.abort()


async def churn(args: argparse.Namespace, stats: Stats) -> None:
    deadline = time.monotonic() + args.duration

    async def worker(w: int) -> None:
        n = 0
        await asyncio.sleep(random.random() * 0.5)
        while time.monotonic() < deadline:
            prefix = f"{args.prefix}-{w}-{n % 50}"
            payload = subscribe_frames(prefix, args.subs) + subscribe_frames(
                prefix, args.subs, unsubscribe=True
            )
            client = await _open(args.port, stats, payload, args.key)
            n += 1
            if client is None:
                await asyncio.sleep(0.2)
                continue
            await asyncio.sleep(args.hold)
            if client.transport is not None:
                client.transport.abort()

    await asyncio.gather(*(worker(w) for w in range(args.connections)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", default="app-key")
    parser.add_argument("--mode", choices=["burst", "churn"], default="burst")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--subs", type=int, default=20)
    parser.add_argument("--hold", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--prefix", default=f"flood-{os.getpid()}")
    args = parser.parse_args(argv)
    stats = Stats()
    started = time.monotonic()
    run = burst if args.mode == "burst" else churn
    with contextlib.suppress(TimeoutError):
        uvloop.run(asyncio.wait_for(run(args, stats), args.duration + args.hold + 120))
    result: dict[str, Any] = dict(vars(stats))
    result["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
