"""End-to-end gateway benchmark: fan-out and presence churn vs a bare websockets server.

Usage: python bench/bench_gateway.py [--clients 200] [--events 1000] [--churn-clients 50]
                                     [--cycles 100] [--ce-pairs 20] [--ce-events 1000]
                                     [--json FILE]

Starts, in one run and on loopback only: a local Redis topology (2 shards, 1 replica each,
3 Sentinels), one gateway node (``presence-gateway serve``, its own process) and a bare
``websockets`` + uvloop server (its own process) that broadcasts what a publisher socket sends
and echoes everything else. Clients run in a third process.

* fan-out: ``--clients`` sockets subscribed to one channel; the gateway's events come through
  its HTTP API (``batch_events``, 10 events a request, signed like the official libraries,
  published through Redis); the bare server's come from a publisher socket. Deliveries/s until
  every client got every event.
* presence churn: ``--churn-clients`` sockets over 10 presence channels each subscribe (with a
  valid presence signature), wait for ``subscription_succeeded``, and unsubscribe, ``--cycles``
  times. The bare server's ceiling is the same frames echoed (subscribe and unsubscribe, each
  waited for). Joins+leaves/s.
* what webhooks cost: the same churn on the same node against a second app whose webhook
  endpoint (a local receiver, its own process, answering 200) takes every event, so each
  transition also records its webhook in the shard's outbox and the node delivers them.
  Measured alternately with the app without webhooks (two runs each) and reported as the
  ratio of the two; the receiver's count (against the count expected: rejoins within the
  hold cancel the held leaves) shows the webhooks were really sent.
* client events with and without webhooks: ``--ce-pairs`` private channels with two sockets
  each, one sending ``--ce-events`` client events as fast as it can, the other receiving them;
  the same two apps, alternating, two runs each. Every ``client_event`` webhook must reach the
  receiver; how long after the last run the last one arrived is printed.

Also prints how many presence writes the gateway packed per Redis pipeline (from /metrics), to
show that churn is batched rather than paid per operation. Every loop is bounded by its counts
and by a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import DEFAULT_APP  # noqa: E402
from gateway.localcluster import (  # noqa: E402
    LOOPBACK_LOAD_ENV,
    LocalCluster,
    find_free_port_range,
)
from gateway.protocol.auth import sign, sign_api_request  # noqa: E402
from gateway.shards.admin import init_shards  # noqa: E402
from gateway.shards.topology import load_topology  # noqa: E402

KEY, SECRET, APP_ID = "app-key", "app-secret", "1"
# Client events as fast as a socket sends them: the per-connection limit at its maximum.
CE_RATE = "client_events_per_second = 10000"
HOOKS_KEY = "app-key-hooks"  # the second app: same secret, a webhook endpoint for every event
TIME_LIMIT = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the bare baseline server (its own process) --------------------------------------------------


def bare_server_main(port: int) -> None:
    """Broadcast frames from a socket that says it publishes; echo everything else."""

    async def run() -> None:
        clients: set[ServerConnection] = set()

        async def handler(ws: ServerConnection) -> None:
            publisher = ws.request is not None and ws.request.path.startswith("/publish")
            if not publisher:
                clients.add(ws)
            try:
                async for message in ws:
                    if publisher:
                        websockets.broadcast(clients, message)
                    else:
                        await ws.send(message)
            finally:
                clients.discard(ws)

        async with serve(handler, "127.0.0.1", port, compression=None, max_queue=None):
            await asyncio.Future()

    uvloop.run(run())


# -- the webhook receiver (its own process) ----------------------------------------------------


def sink_main(port: int) -> None:
    """Answer every POST with 200 and count the webhook events by name; ``GET /count`` returns
    the counts as JSON."""

    async def run() -> None:
        received: dict[str, int] = {}

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal received
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                if head.startswith(b"GET /count"):
                    answer = json.dumps(received).encode()
                else:
                    for event in json.loads(body)["events"]:
                        received[event["name"]] = received.get(event["name"], 0) + 1
                    answer = b""
                writer.write(
                    b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                    + f"Content-Length: {len(answer)}\r\n\r\n".encode()
                    + answer
                )
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(run())


def _sink_counts(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5) as answer:
        return dict(json.loads(answer.read()))


def _sink_settled(
    port: int, enough: Callable[[dict[str, int]], bool], timeout: float = 60.0
) -> tuple[dict[str, int], float]:
    """The receiver's counts once ``enough`` holds (or after ``timeout``), read again 2 s later
    so that a duplicate delivery would show; and the seconds it took to hold."""
    start = time.monotonic()
    while time.monotonic() - start < timeout and not enough(_sink_counts(port)):
        time.sleep(0.1)
    waited = time.monotonic() - start
    time.sleep(2.0)
    return _sink_counts(port), waited


# -- clients (their own process) ------------------------------------------------------------------


def client_main(kind: str, target: str, port: int, args: dict[str, Any], out: Any) -> None:
    """Run one measurement's clients and send the figures back through ``out``."""
    fn = {"fanout": _fanout, "churn": _churn, "client_events": _client_events}[kind]
    out.put(uvloop.run(asyncio.wait_for(fn(target, port, **args), TIME_LIMIT)))


async def _open(port: int, path: str) -> Any:
    ws = await connect(f"ws://127.0.0.1:{port}{path}", compression=None, max_queue=None)
    return ws


async def _fanout(target: str, port: int, *, clients: int, events: int) -> dict[str, Any]:
    sockets = []
    for _ in range(clients):
        ws = await _open(port, "/app/app-key?protocol=7" if target == "gateway" else "/")
        if target == "gateway":
            await ws.recv()
            await ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "bench"}}))
            while json.loads(await ws.recv())["event"] != "pusher_internal:subscription_succeeded":
                pass
        sockets.append(ws)
    done = asyncio.Event()
    counts = [0] * clients

    async def count(i: int, ws: Any) -> None:
        async for message in ws:
            if '"x"' in message or target == "bare":
                counts[i] += 1
                if counts[i] == events and all(c >= events for c in counts):
                    done.set()
                if counts[i] >= events:
                    return

    readers = [asyncio.create_task(count(i, ws)) for i, ws in enumerate(sockets)]
    start = time.perf_counter()
    if target == "gateway":
        await _publish_http(port, events)
    else:
        pub = await _open(port, "/publish")
        for i in range(events):
            await pub.send(json.dumps({"event": "x", "channel": "bench", "data": str(i)}))
        await pub.close()
    await done.wait()
    elapsed = time.perf_counter() - start
    for task in readers:
        task.cancel()
    for ws in sockets:
        await ws.close()
    return {"deliveries": clients * events, "seconds": elapsed}


class HttpConn:
    """One HTTP/1.1 keep-alive connection that reconnects when the server closes it.

    Servers may answer with ``Connection: close`` (sockudo does on its event endpoints); a real
    client then opens a new connection, and so does this one, inside the measured time.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0

    async def request(self, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request (``head`` without the final blank line); return status and body."""
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.reconnects += 1
        reader, writer = self.reader, self.writer
        writer.write(head + b"Host: 127.0.0.1\r\n\r\n" + body)
        raw = await reader.readuntil(b"\r\n\r\n")
        status = int(raw.split(b" ", 2)[1])
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(b":") for line in raw.split(b"\r\n")[1:] if line)
        }
        if b"content-length" in headers:
            data = await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            data = b""
            for _ in range(10_000):
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                data += chunk[:-2]
        else:
            raise RuntimeError(f"response without length: {raw!r}")
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, data

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def signed_head(
    method: str, path: str, body: bytes = b"", params: dict[str, str] | None = None
) -> bytes:
    """Request line and headers (without the final blank line) of an API request signed like
    the official libraries, for :meth:`HttpConn.request`."""
    signed = sign_api_request(DEFAULT_APP, method, path, params or {}, body, int(time.time()))
    query = "&".join(f"{k}={v}" for k, v in signed.items())
    head = f"{method} {path}?{query} HTTP/1.1\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode()


async def _publish_http(port: int, events: int) -> None:
    """batch_events, 10 events a request, 4 requests in flight, over keep-alive connections."""
    path = f"/apps/{APP_ID}/batch_events"

    async def worker(batches: list[list[int]]) -> None:
        conn = HttpConn(port)
        for batch in batches:
            body = json.dumps(
                {"batch": [{"channel": "bench", "name": "x", "data": str(i)} for i in batch]}
            ).encode()
            status, answer = await conn.request(signed_head("POST", path, body), body)
            if status != 200:
                raise RuntimeError(f"trigger failed: {status} {answer!r}")
        conn.close()

    ids = list(range(events))
    batches = [ids[i : i + 10] for i in range(0, events, 10)]
    await asyncio.gather(*(worker(batches[w::4]) for w in range(4)))


async def _churn(
    target: str, port: int, *, clients: int, cycles: int, key: str = KEY, names: str = ""
) -> dict[str, Any]:
    async def one(i: int) -> int:
        path = f"/app/{key}?protocol=7" if target == "gateway" else "/"
        ws = await _open(port, path)
        socket_id = "0.0"
        if target == "gateway":
            socket_id = json.loads(json.loads(await ws.recv())["data"])["socket_id"]
        channel = f"presence-churn{names}-{i % 10}"
        data = json.dumps({"user_id": f"user{names}-{i}", "user_info": {"n": i}})
        auth = f"{key}:{sign(SECRET, f'{socket_id}:{channel}:{data}')}"
        sub = json.dumps(
            {
                "event": "pusher:subscribe",
                "data": {"channel": channel, "auth": auth, "channel_data": data},
            }
        )
        unsub = json.dumps({"event": "pusher:unsubscribe", "data": {"channel": channel}})
        for _ in range(cycles):
            await ws.send(sub)
            if target == "gateway":
                while True:
                    frame = json.loads(await ws.recv())
                    if frame["event"] == "pusher_internal:subscription_succeeded":
                        break
                    if frame["event"] in ("pusher:error", "pusher:subscription_error"):
                        raise RuntimeError(frame)
                await ws.send(unsub)
            else:
                await ws.recv()
                await ws.send(unsub)
                await ws.recv()
        await ws.close()
        return cycles

    start = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    return {"joins_and_leaves": 2 * sum(done), "seconds": elapsed}


async def _client_events(
    target: str, port: int, *, pairs: int, events: int, key: str, names: str
) -> dict[str, Any]:
    """``pairs`` private channels, two sockets on each: one sends ``events`` client events as
    fast as it can, the other receives them. Returns client-event deliveries and seconds."""

    async def subscribed(channel: str) -> Any:
        ws = await _open(port, f"/app/{key}?protocol=7")
        socket_id = json.loads(json.loads(await ws.recv())["data"])["socket_id"]
        auth = f"{key}:{sign(SECRET, f'{socket_id}:{channel}')}"
        await ws.send(
            json.dumps({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}})
        )
        while True:
            frame = json.loads(await ws.recv())
            if frame["event"] == "pusher_internal:subscription_succeeded":
                return ws
            if frame["event"] in ("pusher:error", "pusher:subscription_error"):
                raise RuntimeError(frame)

    async def pair(i: int) -> int:
        channel = f"private-ce{names}-{i}"
        sender, receiver = await subscribed(channel), await subscribed(channel)
        joined.append(i)
        if len(joined) == pairs:
            all_in.set()
        await ready.wait()
        frame = json.dumps({"event": "client-x", "channel": channel, "data": {"n": 0}})
        for _ in range(events):
            await sender.send(frame)

        async def receive() -> int:
            got = 0
            while got < events:
                message = json.loads(await receiver.recv())
                if message["event"] == "client-x":
                    got += 1
                elif message["event"] == "pusher:error":
                    raise RuntimeError(message)
            return got

        async def refused() -> None:
            # A refused client event (over a limit) is answered to the sender: fail at once
            # instead of waiting for an event that will never come.
            async for message in sender:
                if json.loads(message)["event"] == "pusher:error":
                    raise RuntimeError(f"client event refused: {message}")

        receiving, watching = asyncio.create_task(receive()), asyncio.create_task(refused())
        await asyncio.wait([receiving, watching], return_when=asyncio.FIRST_COMPLETED)
        watching.cancel()
        if not receiving.done():
            receiving.cancel()
            watching.result()  # raises the refusal (or says the sender's socket closed)
            raise RuntimeError("the sender's socket closed")
        for ws in (sender, receiver):
            await ws.close()
        return receiving.result()

    joined: list[int] = []
    all_in, ready = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(pair(i)) for i in range(pairs)]
    # Every socket is subscribed before the clock starts: only the events are timed. A pair
    # that fails to subscribe ends the wait too, and gather raises its error.
    waiter = asyncio.create_task(all_in.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    start = time.perf_counter()
    ready.set()
    done = await asyncio.gather(*tasks)
    return {"deliveries": sum(done), "seconds": time.perf_counter() - start}


def measure(kind: str, target: str, port: int, **args: Any) -> dict[str, Any]:
    """Run one client process and return its figures."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=client_main, args=(kind, target, port, args, out))
    proc.start()
    try:
        return dict(out.get(timeout=TIME_LIMIT + 30))
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def _alternate(
    kind: str, port: int, runs: Sequence[tuple[str, str]], per_second: str, **args: Any
) -> dict[str, list[float]]:
    """Measure ``kind`` on the gateway once per ``(app key, names)`` of ``runs``, in order;
    each run's ``per_second`` figure, by app key. Distinct ``names`` give each run channels
    and users of its own."""
    rates: dict[str, list[float]] = {KEY: [], HOOKS_KEY: []}
    for key, names in runs:
        c = measure(kind, "gateway", port, key=key, names=names, **args)
        rates[key].append(c[per_second] / c["seconds"])
    return rates


def _serve_self(flag: str, port: int) -> subprocess.Popen[bytes]:
    """This script in its own process, serving ``--serve-bare`` or ``--serve-sink``."""
    return subprocess.Popen(
        [sys.executable, __file__, flag, str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run(
    clients: int,
    events: int,
    churn_clients: int,
    cycles: int,
    ce_pairs: int = 20,
    ce_events: int = 1000,
) -> dict[str, Any]:
    """Start everything, measure both scenarios against both servers, stop everything."""
    workdir = Path(tempfile.mkdtemp(prefix="pg-bench-gw-"))
    cluster = LocalCluster(workdir, base_port=find_free_port_range(12))
    gw_port, bare_port, sink_port = _free_port(), _free_port(), _free_port()
    config = workdir / "apps.toml"
    config.write_text(
        f'[[apps]]\nid = "{APP_ID}"\nkey = "{KEY}"\nsecret = "{SECRET}"\n{CE_RATE}\n\n'
        f'[[apps]]\nid = "2"\nkey = "{HOOKS_KEY}"\nsecret = "{SECRET}"\n{CE_RATE}\n'
        f'webhook_url = "http://127.0.0.1:{sink_port}/hooks"\n'
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cluster.up()
        init_shards(load_topology(cluster.topology_path))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--topology",
                 str(cluster.topology_path), "--port", str(gw_port), "--node-id", "bench",
                 "--config", str(config)],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, **LOOPBACK_LOAD_ENV},
            )
        )  # fmt: skip
        procs += [_serve_self("--serve-bare", bare_port), _serve_self("--serve-sink", sink_port)]
        _wait_port(gw_port)
        _wait_port(bare_port)
        _wait_port(sink_port)
        figures: dict[str, Any] = {}
        for target, port in (("bare", bare_port), ("gateway", gw_port)):
            f = measure("fanout", target, port, clients=clients, events=events)
            figures[f"fanout_{target}"] = f["deliveries"] / f["seconds"]
        before = _metrics(gw_port)
        for target, port in (("bare", bare_port), ("gateway", gw_port)):
            c = measure("churn", target, port, clients=churn_clients, cycles=cycles)
            figures[f"churn_{target}"] = c["joins_and_leaves"] / c["seconds"]
        after = _metrics(gw_port)
        writes = _sum(after, "pg_writes_applied_total") - _sum(before, "pg_writes_applied_total")
        batches = _sum(after, "pg_write_batches_total") - _sum(before, "pg_write_batches_total")
        figures["churn_writes_per_pipeline"] = writes / batches if batches else 0.0
        # What webhooks cost: the same churn against the app with an endpoint, alternating
        # (the churn just measured is the first run without). Each hooked run has users and
        # channels of its own, so what it sends does not depend on how long the run between
        # took.
        churn = _alternate(
            "churn", gw_port, [(HOOKS_KEY, "-a"), (KEY, ""), (HOOKS_KEY, "-b")],
            "joins_and_leaves", clients=churn_clients, cycles=cycles,
        )  # fmt: skip
        figures["churn_webhooks"] = statistics.fmean(churn[HOOKS_KEY])
        figures["churn_no_webhooks"] = statistics.fmean([figures["churn_gateway"], *churn[KEY]])
        # Per hooked run: each user's first member_added and last member_removed, each
        # channel's occupied and vacated; a rejoin within the hold cancels the held leave, as
        # Pusher does.
        expected = 2 * (2 * churn_clients + 2 * min(churn_clients, 10))
        figures["webhook_events_expected"] = float(expected)
        counts, _ = _sink_settled(sink_port, lambda c: sum(c.values()) >= expected)
        figures["webhook_events_delivered"] = float(sum(counts.values()))
        # Client events: each one is also recorded as a client_event webhook, in the same write.
        ce = _alternate(
            "client_events", gw_port,
            [(KEY, "-p1"), (HOOKS_KEY, "-a1"), (KEY, "-p2"), (HOOKS_KEY, "-a2")],
            "deliveries", pairs=ce_pairs, events=ce_events,
        )  # fmt: skip
        figures["client_events_no_webhooks"] = statistics.fmean(ce[KEY])
        figures["client_events_webhooks"] = statistics.fmean(ce[HOOKS_KEY])
        expected_ce = 2 * ce_pairs * ce_events
        figures["client_event_webhooks_expected"] = float(expected_ce)
        counts, waited = _sink_settled(sink_port, lambda c: c.get("client_event", 0) >= expected_ce)
        figures["client_event_webhooks_delivered"] = float(counts.get("client_event", 0))
        # How far delivery lagged behind: seconds from the last run's end until every
        # client_event webhook had arrived.
        figures["client_event_webhooks_lag_seconds"] = waited
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.down()
        shutil.rmtree(workdir, ignore_errors=True)
    figures["fanout_ratio"] = figures["fanout_gateway"] / figures["fanout_bare"]
    figures["churn_ratio"] = figures["churn_gateway"] / figures["churn_bare"]
    figures["webhooks_ratio"] = figures["churn_webhooks"] / figures["churn_no_webhooks"]
    figures["client_events_webhooks_ratio"] = (
        figures["client_events_webhooks"] / figures["client_events_no_webhooks"]
    )
    return {k: round(v, 3) for k, v in figures.items()}


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--churn-clients", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--ce-pairs", type=int, default=20, help="client-event channels")
    parser.add_argument("--ce-events", type=int, default=1000, help="client events per channel")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-bare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        bare_server_main(args.serve_bare)
        return
    if args.serve_sink:
        sink_main(args.serve_sink)
        return
    f = run(
        args.clients, args.events, args.churn_clients, args.cycles, args.ce_pairs, args.ce_events
    )
    print(
        f"fan-out, {args.clients} clients x {args.events} events: gateway "
        f"{f['fanout_gateway']:,.0f} deliveries/s, bare websockets {f['fanout_bare']:,.0f}/s, "
        f"ratio {f['fanout_ratio']:.2f} (target >= 0.7)"
    )
    print(
        f"presence churn, {args.churn_clients} clients x {args.cycles} cycles: gateway "
        f"{f['churn_gateway']:,.0f} joins+leaves/s, bare echo {f['churn_bare']:,.0f}/s, "
        f"ratio {f['churn_ratio']:.2f}; {f['churn_writes_per_pipeline']:.1f} writes per "
        "Redis pipeline"
    )
    print(
        f"what webhooks cost, the same churn: app with an endpoint taking every event "
        f"{f['churn_webhooks']:,.0f} joins+leaves/s, app without {f['churn_no_webhooks']:,.0f}/s "
        f"(two runs each, alternating), ratio {f['webhooks_ratio']:.2f}; "
        f"{f['webhook_events_delivered']:,.0f} webhook events delivered "
        f"({f['webhook_events_expected']:,.0f} expected)"
    )
    print(
        f"client events, {args.ce_pairs} channels x {args.ce_events} events: app with an "
        f"endpoint {f['client_events_webhooks']:,.0f} deliveries/s, app without "
        f"{f['client_events_no_webhooks']:,.0f}/s (two runs each, alternating), ratio "
        f"{f['client_events_webhooks_ratio']:.2f}; "
        f"{f['client_event_webhooks_delivered']:,.0f} client_event webhooks delivered "
        f"({f['client_event_webhooks_expected']:,.0f} expected), the last "
        f"{f['client_event_webhooks_lag_seconds']:.1f} s after the last run ended"
    )
    if args.json:
        args.json.write_text(json.dumps(f, indent=2))


if __name__ == "__main__":
    main()
