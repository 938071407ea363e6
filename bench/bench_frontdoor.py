"""Fan-out throughput: the front door vs a bare websockets server, measured in one run.

Usage: python bench/bench_frontdoor.py [--clients 200] [--messages 2000] [--json FILE]

Both servers run in this process on uvloop and broadcast the same text frames to the same
number of clients, paced identically (bursts, then wait while any socket has more than
256 KiB buffered). The clients run in a separate process (websockets on uvloop) and count what
they receive. Baseline (a): ``websockets.asyncio.server.serve`` + ``websockets.broadcast``.
Ours (b): the front door, one :func:`encode_text_frame` per message and
:func:`broadcast_frame` to every socket; (b') the front door's per-connection ``send_text``.

Two figures per server: deliveries/s (wall clock, clients included; on a small machine the
client process is part of what is measured) and server CPU µs per delivery (CPU time of this
process during the broadcast, which is the gateway's own cost). Ratios are ours / baseline for
throughput and baseline / ours for CPU (so > 1 means the front door is better in both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.server.frontdoor import start_frontdoor
from gateway.server.httpconn import HttpRequest, HttpResponse
from gateway.server.websocket import WsConnection, broadcast_frame, encode_text_frame

BURST = 20
MAX_BUFFERED = 256 * 1024
TIME_LIMIT = 120.0


# -- client process -------------------------------------------------------------------------


def client_main(port: int, clients: int, messages: int, out: Any) -> None:
    """Connect ``clients`` sockets, report ready, count messages, report the totals."""
    uvloop.run(_clients(port, clients, messages, out))


async def _clients(port: int, clients: int, messages: int, out: Any) -> None:
    sockets = []
    for i in range(0, clients, 50):
        sockets += await asyncio.gather(
            *(
                connect(f"ws://127.0.0.1:{port}/app/bench", max_queue=None)
                for _ in range(min(50, clients - i))
            )
        )
    out.send(("ready", clients))
    counts = [0] * clients
    first = [0.0]

    async def count(index: int) -> None:
        ws = sockets[index]
        async for _msg in ws:
            if not first[0]:
                first[0] = time.perf_counter()
            counts[index] += 1
            if counts[index] >= messages:
                return

    start = time.perf_counter()
    try:
        async with asyncio.timeout(TIME_LIMIT):
            await asyncio.gather(*(count(i) for i in range(clients)))
    except TimeoutError:
        pass
    out.send(("done", sum(counts), time.perf_counter() - (first[0] or start)))
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


# -- servers --------------------------------------------------------------------------------


class _Registry:
    """Front-door handler that only keeps the open connections."""

    def __init__(self) -> None:
        self.conns: dict[int, WsConnection] = {}

    def ws_open(self, conn: WsConnection) -> None:
        self.conns[conn.id] = conn

    def ws_text(self, conn: WsConnection, text: str) -> None:
        pass

    def ws_binary(self, conn: WsConnection, data: bytes) -> None:
        pass

    def ws_closed(self, conn: WsConnection, code: int | None) -> None:
        self.conns.pop(conn.id, None)

    async def http_request(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse(404)


def _payload(i: int) -> str:
    data = json.dumps({"n": i, "text": "x" * 40})
    return json.dumps({"event": "update", "channel": "presence-bench", "data": data})


async def _run(
    name: str,
    start: Callable[[], Awaitable[tuple[int, Callable[[], list[Any]], Any]]],
    send: Callable[[list[Any], str], None],
    buffered: Callable[[Any], int],
    clients: int,
    messages: int,
) -> dict[str, float]:
    port, conns, stop = await start()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=client_main, args=(port, clients, messages, child), daemon=True)
    proc.start()
    try:
        kind, _ = await asyncio.to_thread(parent.recv)
        assert kind == "ready"
        async with asyncio.timeout(30):
            while len(conns()) < clients:  # noqa: ASYNC110 - both servers polled alike
                await asyncio.sleep(0.01)
        targets = conns()
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        for i in range(messages):
            send(targets, _payload(i))
            if i % BURST == BURST - 1:
                await asyncio.sleep(0)
                while any(buffered(c) > MAX_BUFFERED for c in targets):  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
        sent_cpu = time.process_time() - cpu0
        result = await asyncio.to_thread(parent.recv)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        _, received, client_span = result
    finally:
        await stop()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    expected = clients * messages
    out = {
        "deliveries": float(received),
        "expected": float(expected),
        "seconds": wall,
        "client_span_s": client_span,
        "deliveries_per_s": received / wall,
        "server_cpu_s": cpu,
        "server_send_cpu_s": sent_cpu,
        "server_cpu_us_per_delivery": cpu / max(received, 1) * 1e6,
    }
    print(
        f"{name:<34} {received:>8}/{expected} delivered in {wall:6.2f} s: "
        f"{out['deliveries_per_s']:>10,.0f} deliveries/s, "
        f"server CPU {out['server_cpu_us_per_delivery']:.2f} µs/delivery",
        flush=True,
    )
    return out


async def _websockets_server() -> tuple[int, Callable[[], list[Any]], Any]:
    conns: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        conns.add(ws)
        try:
            await ws.wait_closed()
        finally:
            conns.discard(ws)

    server = await serve(handler, "127.0.0.1", 0, compression=None, max_queue=None)
    port = server.sockets[0].getsockname()[1]

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    return port, lambda: list(conns), stop


async def _frontdoor_server() -> tuple[int, Callable[[], list[Any]], Any]:
    registry = _Registry()
    door = await start_frontdoor(
        "127.0.0.1", 0, ws=registry, http=registry, ws_high_water=64 * 1024 * 1024
    )

    async def stop() -> None:
        await door.shutdown(code=1001, timeout=5)

    return door.port, lambda: list(registry.conns.values()), stop


def _ws_buffered(conn: ServerConnection) -> int:
    return conn.transport.get_write_buffer_size()


def _fd_buffered(conn: WsConnection) -> int:
    return conn.buffered


async def main_async(clients: int, messages: int) -> dict[str, Any]:
    """Run the baseline and the front door (twice each, alternating) and return the figures."""
    print(f"fan-out: {clients} clients x {messages} messages, clients in a separate process")
    runs: dict[str, list[dict[str, float]]] = {"websockets": [], "frontdoor": [], "send_text": []}
    for _round in range(2):
        runs["websockets"].append(
            await _run(
                "(a) websockets.serve + broadcast",
                _websockets_server,
                websockets.broadcast,
                _ws_buffered,
                clients,
                messages,
            )
        )
        runs["frontdoor"].append(
            await _run(
                "(b) front door, shared frame",
                _frontdoor_server,
                lambda conns, text: broadcast_frame(conns, encode_text_frame(text)),
                _fd_buffered,
                clients,
                messages,
            )
        )
        runs["send_text"].append(
            await _run(
                "(b') front door, send_text each",
                _frontdoor_server,
                lambda conns, text: [c.send_text(text) for c in conns],
                _fd_buffered,
                clients,
                messages,
            )
        )
    best = {
        k: max(v, key=lambda r: r["deliveries_per_s"] / max(r["server_cpu_s"], 1e-9))
        for k, v in runs.items()
    }

    def best_rate(k: str) -> float:
        return max(r["deliveries_per_s"] for r in runs[k])

    def best_cpu(k: str) -> float:
        return min(r["server_cpu_us_per_delivery"] for r in runs[k])

    summary = {
        "throughput_ratio_b_over_a": best_rate("frontdoor") / best_rate("websockets"),
        "cpu_ratio_a_over_b": best_cpu("websockets") / best_cpu("frontdoor"),
        "throughput_ratio_send_text_over_a": best_rate("send_text") / best_rate("websockets"),
        "cpu_ratio_a_over_send_text": best_cpu("websockets") / best_cpu("send_text"),
    }
    print()
    print(f"best deliveries/s   (a) websockets      {best_rate('websockets'):>12,.0f}")
    print(f"best deliveries/s   (b) front door      {best_rate('frontdoor'):>12,.0f}")
    print(f"best deliveries/s   (b') send_text each {best_rate('send_text'):>12,.0f}")
    print(
        f"server CPU µs/delivery (a) {best_cpu('websockets'):.3f}   (b) "
        f"{best_cpu('frontdoor'):.3f}   (b') {best_cpu('send_text'):.3f}"
    )
    print(
        f"RATIO throughput b/a = {summary['throughput_ratio_b_over_a']:.2f}   "
        f"server CPU per delivery a/b = {summary['cpu_ratio_a_over_b']:.2f}   "
        f"(b'/a = {summary['throughput_ratio_send_text_over_a']:.2f}, "
        f"CPU a/b' = {summary['cpu_ratio_a_over_send_text']:.2f})"
    )
    return {"clients": clients, "messages": messages, "runs": runs, "best": best, **summary}


def main() -> int:
    """Parse arguments, run, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    result = uvloop.run(main_async(args.clients, args.messages))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
