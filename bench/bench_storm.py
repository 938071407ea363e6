"""Reconnect storm: kill -9 of a node holding thousands of presence users; ours vs sockudo.

Usage: python bench/bench_storm.py [--users 6000] [--watchers 5] [--procs 3] [--rate 4]
                                   [--sides ours,sockudo] [--skip-peer] [--quick]
                                   [--lease-ms MS]
                                   [--sockudo PATH] [--json FILE] [--from-json FILE]

Starts, on 127.0.0.1 only and one side after the other, TWO nodes of each server (the sides
of ``bench_peer``): ours (the local Redis topology, 2 shards with a replica each and 3
Sentinels, and two gateway nodes) and sockudo on its ``redis`` adapter and cache (the only
sockudo mode in which a user can move to another node and stay listed). Then, per side:

1. ``--users`` storm users join presence channels on node A through ``--procs`` client
   processes: channel ``presence-storm-{c}`` holds ``100 - --watchers`` of them plus
   ``--watchers`` watchers, members that joined on node B and stay connected throughout: they
   are "the other members" whose view is measured. Every socket answers ``pusher:ping``.
2. A publisher sends ``--rate`` events a second through node B's HTTP API (``POST
   /apps/1/events``, up to 100 channels a request, signed like the official libraries) to
   every storm channel, each carrying its send time; the watchers record receive - send.
3. After 5 s of that, node A is killed with SIGKILL. Every storm user sees its socket close
   and reconnects like pusher-js behind a load balancer that already took A out: after a
   random 0-1 s delay it connects to node B and joins its channel again (a new socket id,
   signed again); an attempt that fails or takes longer than 10 s is retried after 1, 2, 4,
   8, 10, 10 ... s (at most 8 attempts).
4. Measured: seconds from the kill until every user is subscribed again (and the p50 / p99
   of the per-user figure); join latency p50 / p99 (start of the successful attempt ->
   ``subscription_succeeded``), also split into TCP connect, WebSocket handshake (until the
   101 is read) and subscribe (sent -> ``subscription_succeeded``); delivery latency p50
   / p99 seen by the watchers for events sent before the kill and during the storm (kill ->
   last user back); node B's CPU time per rejoin, the client processes' CPU and how busy the
   machine's cores were during the storm; every ``member_removed`` / ``member_added``
   the watchers received for storm users, split into announcements of a user who was
   subscribed again at that moment (a false "gone": must be 0) and of a user still on its
   way back (what a lease that lapses before the user returns costs); for ours, when the dead
   node's entries were reaped (node B's log line), which gives the margin
   between the last user back and the reap; and ``GET /apps/1/channels/{c}/users`` of every
   storm channel, sampled every second from the last user back until 15 s after the reap
   (ours) or 10 s after the last user came back (at least 25 s after the kill): whether
   every answer lists exactly the channel's users once the storm is over, and how many
   answers listed fewer users than connected; for ours also node B's anti-entropy checks (by
   result) and re-assertions (by reason) from the kill to the end of the sampling.

``--lease-ms`` sets our nodes' lease (``GATEWAY_LEASE_MS``) to see how a longer lease moves the
reap past a larger storm. Prints a table of the sides; ``--json`` writes the figures. Every loop is
bounded by a count and a time limit and every process started here is stopped at the end,
also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_capacity import GROUP, PONG, Workers, _cpu_seconds, client_process  # noqa: E402
from bench_gateway import APP_ID, KEY, SECRET, HttpConn, _metrics, signed_head  # noqa: E402
from bench_peer import (  # noqa: E402
    DEFAULT_SOCKUDO,
    WS_PATH,
    Ours,
    Procs,
    Side,
    Sockudo,
    _signed_get,
)

from gateway.protocol.auth import sign  # noqa: E402

PREFIX = "storm"
TICK = "storm-tick"
RAMP_LIMIT = 240.0  # the initial joins
STEP_TIMEOUT = 10.0  # one connect + subscribe attempt
BACKOFF = (1.0, 2.0, 4.0, 8.0, 10.0)  # after a failed attempt (then 10 s)
ATTEMPTS = 8
STORM_LIMIT = 120.0  # a storm not over after this is reported as such
BEFORE_KILL = 5.0  # publishing before the kill (the baseline delivery latency)
SETTLE_AFTER_REAP = 15.0  # GET users sampled until this long after the reap (ours)
SETTLE_AFTER_KILL = 25.0  # ... or after the kill, whichever is later
REAP_WAIT = 180.0  # ours: the reap not logged this long after the kill is reported missing
CMD_WAIT = 600.0
CLIENT_LIMIT = 1200.0


def layout(users: int, watchers: int) -> tuple[list[int], list[int], int]:
    """Connection indices of storm users and of watchers, and the number of channels.

    Index ``i`` is user ``u{i}`` in channel ``presence-storm-{i // 100}`` (``bench_capacity``'s
    numbering); each channel's last ``watchers`` indices are its watchers.
    """
    per = GROUP - watchers
    channels = math.ceil(users / per)
    storm = [c * GROUP + j for c in range(channels) for j in range(per)][:users]
    watch = [c * GROUP + j for c in range(channels) for j in range(per, GROUP)]
    return storm, watch, channels


# -- clients (their own processes) -------------------------------------------------------------
#
# The clients speak WebSocket themselves (a few lines of framing, below) instead of through a
# client library: a storm is thousands of handshakes in a second, and with a library client
# the client processes, which share the 2 cores with the servers, would take most of the CPU
# and measure themselves. The framing is the subset both servers use towards clients:
# unmasked, unfragmented or fragmented text frames, ping and close; the clients send masked
# text frames (a zero masking key: allowed by RFC 6455, and the servers do not care).

_REQUEST = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
)


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (masking key 0: the payload goes as is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


PONG_FRAME = _frame(1, PONG.encode())


def server_frames(buf: bytes) -> tuple[list[tuple[bool, int, bytes]], bytes]:
    """The whole (unmasked) server frames at the start of ``buf`` as ``(fin, opcode,
    payload)``, and the bytes left (an incomplete frame)."""
    frames = []
    pos = 0
    while len(buf) - pos >= 2:
        b0, n, at = buf[pos], buf[pos + 1] & 0x7F, pos + 2
        if n == 126:
            if len(buf) - at < 2:
                break
            n, at = int.from_bytes(buf[at : at + 2], "big"), at + 2
        elif n == 127:
            if len(buf) - at < 8:
                break
            n, at = int.from_bytes(buf[at : at + 8], "big"), at + 8
        if len(buf) - at < n:
            break
        frames.append((bool(b0 & 0x80), b0 & 0x0F, buf[at : at + n]))
        pos = at + n
    return frames, buf[pos:]


class JoinFailed(RuntimeError):
    """The handshake was refused, the server sent an error, or the socket closed early."""


class Member(asyncio.Protocol):
    """One presence member's socket: handshake, ``connection_established``, subscribe (signed
    for its socket id), then ``on_text`` for every later text frame; answers
    ``pusher:ping``. ``joined`` resolves on ``subscription_succeeded``; ``closed`` when the
    connection is gone."""

    def __init__(self, port: int, i: int, on_text: Any) -> None:
        self.port, self.i, self.on_text = port, i, on_text
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.joined: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.buf = b""
        self.upgraded = False
        self.started = time.time()
        self.stamps: list[float] = []  # TCP connected, 101 read, subscribe sent
        self.fragments: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.stamps.append(time.time())
        transport.write(_REQUEST.format(path=WS_PATH, port=self.port).encode())  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("connection closed")
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, why: str) -> None:
        if not self.joined.done():
            self.joined.set_exception(JoinFailed(why))

    def send(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame(1, text.encode()))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            status = buf[:end].split(b"\r\n", 1)[0]
            if not status.startswith(b"HTTP/1.1 101"):
                self._fail(f"HTTP {status[9:12].decode(errors='replace')}")
                self.abort()
                return
            self.upgraded = True
            self.stamps.append(time.time())
            buf = buf[end + 4 :]
        frames, self.buf = server_frames(buf)
        for fin, opcode, payload in frames:
            if opcode in (0, 1):
                self.fragments.append(payload)
                if fin:
                    text = b"".join(self.fragments).decode()
                    self.fragments = []
                    self._text(text)
            elif opcode == 8:
                self._fail("closed by the server")
                self.abort()
                return
            elif opcode == 9 and self.transport is not None:
                self.transport.write(_frame(10, payload))

    def _text(self, text: str) -> None:
        if self.joined.done():
            if "pusher:ping" in text:
                self.send(PONG)
            else:
                self.on_text(text)
            return
        frame = json.loads(text)
        event = frame.get("event")
        if event == "pusher:connection_established":
            socket_id = json.loads(frame["data"])["socket_id"]
            channel = f"presence-{PREFIX}-{self.i // GROUP}"
            data = json.dumps({"user_id": f"u{self.i}", "user_info": {"n": self.i}})
            auth = f"{KEY}:{sign(SECRET, f'{socket_id}:{channel}:{data}')}"
            self.stamps.append(time.time())
            self.send(json.dumps({
                "event": "pusher:subscribe",
                "data": {"channel": channel, "auth": auth, "channel_data": data},
            }))  # fmt: skip
        elif event == "pusher_internal:subscription_succeeded":
            self.joined.set_result(None)
        elif event == "pusher:ping":
            self.send(PONG)
        elif event in ("pusher:error", "pusher:subscription_error"):
            data = frame.get("data")
            code = data.get("code") if isinstance(data, dict) else data
            self._fail(f"{event} {code}")
            self.abort()


async def _member(port: int, i: int, on_text: Any, timeout: float) -> Member:
    """Connect member ``i`` to ``port`` and join its channel (``JoinFailed``/``TimeoutError``
    if that does not happen within ``timeout`` seconds)."""
    loop = asyncio.get_running_loop()
    member: Member | None = None
    try:
        async with asyncio.timeout(timeout):
            _t, proto = await loop.create_connection(
                lambda: Member(port, i, on_text), "127.0.0.1", port
            )
            member = proto
            await member.joined
            return member
    except BaseException:
        if member is not None:
            member.abort()
        raise


def _why(exc: BaseException) -> str:
    if isinstance(exc, JoinFailed):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


async def _clients(
    k: int,
    role: str,
    ports: list[int],
    indices: list[int],
    concurrency: int,
    seed: int,
    out: Any,
    cmd: Any,
) -> None:
    """Storm users (``role="storm"``: join on ``ports[0]``, rejoin on ``ports[1]`` when lost)
    or watchers (join on ``ports[1]``, record what they see); answer the parent's commands."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)

    async def command() -> str:
        try:
            return str(await loop.run_in_executor(None, cmd.get, True, CMD_WAIT))
        except Exception:
            return "close"

    st: dict[str, Any] = {"closing": False, "lost": 0, "ramp_failures": Counter()}
    back: dict[int, dict[str, float]] = {}  # storm: index -> t_lost, t_try, t_back, attempts
    failed: Counter[str] = Counter()  # storm: failed rejoin attempts by reason
    seen: list[tuple[str, str, float]] = []  # watchers: (event, user id, time)
    ticks: list[tuple[float, float]] = []  # watchers: (sent, received)
    sockets: dict[int, Member] = {}
    tasks: set[asyncio.Task[None]] = set()

    def on_text(text: str) -> None:
        if role != "watch":
            return
        if TICK in text:
            data = json.loads(text)["data"]
            sent = json.loads(data)["t"] if isinstance(data, str) else data["t"]
            ticks.append((sent, time.time()))
        elif "member_" in text:
            frame = json.loads(text)
            data = frame["data"]
            data = json.loads(data) if isinstance(data, str) else data
            event = frame["event"].rsplit(":", 1)[-1]
            seen.append((event, str(data.get("user_id")), time.time()))

    async def rejoin(i: int) -> None:
        t_lost = time.time()
        await asyncio.sleep(rng.random())  # the clients do not all notice at the same moment
        for attempt in range(ATTEMPTS):
            t_try = time.time()
            try:
                member = await _member(ports[1], i, on_text, STEP_TIMEOUT)
            except Exception as exc:
                failed[_why(exc)] += 1
                await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
                continue
            t_back = time.time()
            conn, upgraded, sent = member.stamps
            back[i] = {
                "lost": t_lost, "try": t_try, "back": t_back, "attempts": attempt + 1,
                "connect": conn - t_try, "handshake": upgraded - conn, "subscribe": t_back - sent,
            }  # fmt: skip
            sockets[i] = member
            return
        failed["gave up"] += 1

    async def hold(i: int, member: Member) -> None:
        await member.closed
        if st["closing"]:
            return
        if role == "storm":
            await rejoin(i)
        else:
            st["lost"] += 1

    out.put({"proc": k, "kind": "ready"})
    if await command() == "go":
        gate = asyncio.Semaphore(concurrency)
        deadline = loop.time() + RAMP_LIMIT
        port = ports[0] if role == "storm" else ports[1]

        async def one(i: int) -> None:
            for attempt in range(3):
                async with gate:
                    if loop.time() >= deadline:
                        st["ramp_failures"]["ramp time limit"] += 1
                        return
                    try:
                        member = await _member(port, i, on_text, 20)
                    except Exception as exc:
                        st["ramp_failures"][_why(exc)] += 1
                    else:
                        sockets[i] = member
                        task = asyncio.create_task(hold(i, member))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        return
                await asyncio.sleep(1.0 * (attempt + 1))

        await asyncio.gather(*(one(i) for i in indices))
        out.put({
            "proc": k, "kind": "ramped", "held": len(sockets),
            "failures": dict(st["ramp_failures"]),
        })  # fmt: skip
        for _ in range(10_000):  # commands, bounded
            what = await command()
            if what == "count":
                out.put({"proc": k, "kind": "count", "back": len(back)})
            elif what == "report":
                out.put({
                    "proc": k, "kind": "report", "back": back, "failed": dict(failed),
                    "seen": seen, "ticks": ticks, "lost": st["lost"],
                })  # fmt: skip
            else:
                break
    st["closing"] = True
    held = list(sockets.values())
    for member in held:
        member.abort()
    for task in list(tasks):
        task.cancel()
    out.put({"proc": k, "kind": "closed", "closed": len(held)})


def _client_main(k: int, args: dict[str, Any], out: Any, cmd: Any) -> None:
    """Entry point of client process ``k``."""
    client_process(_clients, k, args, out, cmd, CLIENT_LIMIT)


# -- the parent's own loops ----------------------------------------------------------------------


class Publisher(threading.Thread):
    """``rate`` events a second on every storm channel through ``port`` until stopped."""

    def __init__(self, port: int, channels: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.port, self.channels, self.rate = port, channels, rate
        self.stopping = threading.Event()
        self.sent: list[tuple[float, int]] = []  # (send time, channels accepted)
        self.errors: list[str] = []

    def run(self) -> None:
        uvloop.run(self._run())

    async def _run(self) -> None:
        names = [f"presence-{PREFIX}-{c}" for c in range(self.channels)]
        chunks = [names[i : i + 100] for i in range(0, len(names), 100)]
        conns = [HttpConn(self.port) for _ in chunks]
        path = f"/apps/{APP_ID}/events"
        started = time.monotonic()
        k = 0
        while not self.stopping.is_set() and time.monotonic() - started < CLIENT_LIMIT:
            t = time.time()
            for conn, chunk in zip(conns, chunks, strict=True):
                body = json.dumps(
                    {"name": TICK, "channels": chunk, "data": json.dumps({"t": t, "k": k})}
                ).encode()
                try:
                    status, answer = await asyncio.wait_for(
                        conn.request(signed_head("POST", path, body), body), 10
                    )
                    if status != 200:
                        raise RuntimeError(f"{status} {answer[:100]!r}")
                    self.sent.append((t, len(chunk)))
                except Exception as exc:
                    conn.close()
                    if len(self.errors) < 10:
                        self.errors.append(repr(exc))
            k += 1
            await asyncio.sleep(max(0.0, started + k / self.rate - time.monotonic()))
        for conn in conns:
            conn.close()


def _users_of(port: int, channel: str) -> set[str] | str:
    """The user ids ``GET users`` lists for ``channel``, or why it failed."""
    target = _signed_get(f"/apps/{APP_ID}/channels/{channel}/users")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{target}", timeout=5) as r:
            return {str(u["id"]) for u in json.loads(r.read())["users"]}
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except Exception as exc:
        return type(exc).__name__


def _first_reap(log: Path, after: float) -> float | None:
    """When node B first logged reaping a dead node's entries after ``after`` (its log lines
    start with the local time, ``%Y-%m-%d %H:%M:%S,mmm``): a node busy with a storm may be too
    slow to answer ``/metrics`` in time, its log is exact."""
    for line in log.read_text(errors="replace").splitlines():
        if "reaped" not in line or "of dead nodes" not in line:
            continue
        with contextlib.suppress(ValueError):
            stamp, ms = line[:23].split(",")
            t = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
            if t >= after:
                return t
    return None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- one side ----------------------------------------------------------------------------------


def run_side(side: Side, opts: argparse.Namespace) -> dict[str, Any]:
    """Bring ``side`` up with two nodes, run the storm, take it down; the figures."""
    storm_idx, watch_idx, channels = layout(opts.users, opts.watchers)
    fig: dict[str, Any] = {"side": side.name, "users": opts.users, "channels": channels,
                           "watchers": len(watch_idx)}  # fmt: skip
    side.up()
    storm: Workers | None = None
    watch: Workers | None = None
    publisher: Publisher | None = None
    try:
        port_a, port_b = side.ports
        pid_b = _node_b_pid(side)
        watch = Workers(
            _client_main,
            [{"role": "watch", "ports": [port_a, port_b], "indices": watch_idx,
              "concurrency": 100, "seed": 1}],
        )  # fmt: skip
        storm = Workers(
            _client_main,
            [{"role": "storm", "ports": [port_a, port_b], "indices": storm_idx[k :: opts.procs],
              "concurrency": 200, "seed": 100 + k} for k in range(opts.procs)],
        )  # fmt: skip
        watch.collect("ready", 60)
        storm.collect("ready", 60)
        watch.send("go")
        held_w = watch.collect("ramped", RAMP_LIMIT + 60)
        storm.send("go")
        held_s = storm.collect("ramped", RAMP_LIMIT + 60)
        fig["held_watchers"] = sum(m["held"] for m in held_w)
        fig["held_users"] = sum(m["held"] for m in held_s)
        fig["ramp_failures"] = dict(
            sum((Counter(m["failures"]) for m in held_s + held_w), Counter())
        )
        print(
            f"  [{side.name}] {fig['held_users']} users on A, {fig['held_watchers']} watchers "
            f"on B, {channels} channels",
            flush=True,
        )
        time.sleep(3.0)  # the last joins' member_added reach everyone
        publisher = Publisher(port_b, channels, opts.rate)
        publisher.start()
        time.sleep(BEFORE_KILL)

        healing0 = _healing(port_b) if side.name == "ours" else {}
        cpu_b0 = _cpu_seconds(pid_b)
        cpu_c0 = storm.cpu_seconds() + watch.cpu_seconds()
        machine0 = _machine_cpu()
        t_kill = time.time()
        os.kill(side.pid_a, signal.SIGKILL)
        log_b = side.procs.workdir / f"{_node_b_name(side)}.log"
        t_done: float | None = None
        while time.time() - t_kill < STORM_LIMIT:
            time.sleep(0.25)
            storm.send("count")
            if sum(m["back"] for m in storm.collect("count", 30)) >= fig["held_users"]:
                t_done = time.time()
                break
        cpu_b1 = _cpu_seconds(pid_b)
        cpu_c1 = storm.cpu_seconds() + watch.cpu_seconds()
        machine1 = _machine_cpu()
        time.sleep(2.0)  # deliveries after the last user back
        publisher.stopping.set()
        publisher.join(15)

        # GET users until the dead node's entries are gone and a while after.
        expect = {c: {f"u{i}" for i in storm_idx + watch_idx if i // GROUP == c}
                  for c in range(channels)}  # fmt: skip
        samples: list[dict[str, Any]] = []
        # ours: until the reap was logged and 15 s more (at most REAP_WAIT after the kill);
        # sockudo: 10 s after the last user came back, at least 25 s after the kill.
        t_end = max(t_kill + SETTLE_AFTER_KILL, (t_done or t_kill) + 10)
        if side.name == "ours":
            t_end = t_kill + REAP_WAIT
        for _ in range(600):  # bounded; about one sample a second
            now = time.time()
            t_reap = _first_reap(log_b, t_kill) if side.name == "ours" else None
            if t_reap is not None:
                t_end = max(t_kill + SETTLE_AFTER_KILL, t_reap + SETTLE_AFTER_REAP)
                t_end = max(t_end, (t_done or t_kill) + 10)
            if now > t_end:
                break
            exact = fewer = more = 0
            errors: Counter[str] = Counter()
            for c in range(channels):
                got = _users_of(port_b, f"presence-{PREFIX}-{c}")
                if isinstance(got, str):
                    errors[got] += 1
                elif got == expect[c]:
                    exact += 1
                elif not expect[c] <= got:
                    fewer += 1
                else:
                    more += 1
            samples.append({"t": round(now - t_kill, 2), "exact": exact, "fewer": fewer,
                            "more": more, "failed": dict(errors)})  # fmt: skip
            time.sleep(max(0.0, 1.0 - (time.time() - now)))

        t_reap = _first_reap(log_b, t_kill) if side.name == "ours" else None
        if side.name == "ours":
            after = _healing(port_b)
            fig["healing_during"] = {k: after[k] - healing0.get(k, 0.0) for k in after
                                     if after[k] - healing0.get(k, 0.0)}  # fmt: skip
        storm.send("report")
        watch.send("report")
        rep_s = storm.collect("report", 60)
        rep_w = watch.collect("report", 60)
        fig.update(_figures(fig, t_kill, t_done, t_reap, rep_s, rep_w, publisher, samples))
        rejoins = len(fig.get("_back", {}))
        fig.pop("_back", None)
        fig["node_b_cpu_ms_per_rejoin"] = (
            round(1000 * (cpu_b1 - cpu_b0) / rejoins, 3) if rejoins else None
        )
        span = (t_done or time.time()) - t_kill
        fig["node_b_cpu_pct_during_storm"] = round(100 * (cpu_b1 - cpu_b0) / span, 1)
        fig["clients_cpu_pct_during_storm"] = round(100 * (cpu_c1 - cpu_c0) / span, 1)
        busy, total = machine1[0] - machine0[0], machine1[1] - machine0[1]
        fig["machine_busy_pct_during_storm"] = round(100 * busy / total, 1) if total else None
        return fig
    finally:
        if publisher is not None:
            publisher.stopping.set()
        for workers in (storm, watch):
            if workers is not None:
                with contextlib.suppress(Exception):
                    workers.stop()
        side.down()


def _healing(port: int) -> dict[str, float]:
    """Node ``port``'s anti-entropy checks by result and re-assertions by reason (summed over
    shards): whether the digest check re-wrote state during the storm."""
    out: dict[str, float] = {}
    for key, value in _metrics(port).items():
        for metric, label in (("pg_anti_entropy_checks_total", "result"),
                              ("pg_reassertions_total", "reason")):  # fmt: skip
            if key.startswith(metric + "{"):
                what = key.split(f'{label}="', 1)[1].split('"', 1)[0]
                name = f"{metric.removeprefix('pg_').removesuffix('_total')}.{what}"
                out[name] = out.get(name, 0.0) + value
    return out


def _machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all cores so far (``/proc/stat``)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _node_b_name(side: Side) -> str:
    return next(n for n, _ in side.procs.procs if n.endswith("-b"))


def _node_b_pid(side: Side) -> int:
    return int(side.procs.proc(_node_b_name(side)).pid)


def _figures(
    fig: dict[str, Any],
    t_kill: float,
    t_done: float | None,
    t_reap: float | None,
    rep_s: list[dict[str, Any]],
    rep_w: list[dict[str, Any]],
    publisher: Publisher,
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    back: dict[str, dict[str, float]] = {}
    failed: Counter[str] = Counter()
    for m in rep_s:
        back.update({f"u{i}": b for i, b in m["back"].items()})
        failed.update(m["failed"])
    since_kill = [b["back"] - t_kill for b in back.values()]
    join_ms = [1000 * (b["back"] - b["try"]) for b in back.values()]
    storm_users = {f"u{i}" for m in rep_s for i in m["back"]}  # only those who came back
    removed_back = removed_away = added = 0
    examples: list[str] = []
    for m in rep_w:
        for event, user, t in m["seen"]:
            b = back.get(user)
            if event == "member_removed":
                if b is not None and b["back"] <= t:
                    removed_back += 1
                    if len(examples) < 5:
                        examples.append(f"{user} removed {t - t_kill:.2f} s after the kill, "
                                        f"back at {b['back'] - t_kill:.2f} s")  # fmt: skip
                else:
                    removed_away += 1
            elif event == "member_added" and t >= t_kill:
                added += 1
    before: list[float] = []
    during: list[float] = []
    for m in rep_w:
        for sent, got in m["ticks"]:
            ms = 1000 * (got - sent)
            if sent < t_kill:
                before.append(ms)
            elif t_done is not None and sent <= t_done:
                during.append(ms)
    after_done = [s for s in samples if t_done is not None and s["t"] >= t_done - t_kill]
    settled = [s for s in after_done if t_reap is None or s["t"] >= t_reap - t_kill + 3]
    last = samples[-1] if samples else None
    expected_deliveries = sum(n for _t, n in publisher.sent) * fig["watchers"] // fig["channels"]
    return {
        "_back": back,
        "back": len(back),
        "all_back_s": round(t_done - t_kill, 2) if t_done else None,
        "back_p50_s": round(_pct(since_kill, 0.5) or 0, 2),
        "back_p99_s": round(_pct(since_kill, 0.99) or 0, 2),
        "join_ms_p50": round(_pct(join_ms, 0.5) or 0, 1),
        "join_ms_p99": round(_pct(join_ms, 0.99) or 0, 1),
        "join_phases_ms_p50_p99": {
            phase: [
                round(1000 * (_pct([b[phase] for b in back.values()], q) or 0), 1)
                for q in (0.5, 0.99)
            ]
            for phase in ("connect", "handshake", "subscribe")
        },
        "attempts_max": max((int(b["attempts"]) for b in back.values()), default=0),
        "failed_attempts": dict(failed),
        "delivery_ms_before": _summary(before),
        "delivery_ms_during": _summary(during),
        "deliveries": sum(len(m["ticks"]) for m in rep_w),
        "deliveries_expected": expected_deliveries,
        "publish_errors": publisher.errors,
        "watchers_lost": sum(m["lost"] for m in rep_w),
        "member_removed_while_back": removed_back,
        "member_removed_while_away": removed_away,
        "member_added_after_kill": added,
        "false_removal_examples": examples,
        "storm_users_back": len(storm_users),
        "reap_s": round(t_reap - t_kill, 2) if t_reap else None,
        "reap_margin_s": round(t_reap - t_done, 2) if t_reap and t_done else None,
        "users_samples": len(samples),
        "users_fewer_after_back": sum(s["fewer"] for s in after_done),
        "users_exact_at_end": bool(last and last["exact"] == fig["channels"]),
        "users_exact_settled": bool(settled)
        and all(s["exact"] == fig["channels"] for s in settled),
        "users_series": samples,
    }


def _summary(ms: list[float]) -> dict[str, Any]:
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50": round(statistics.median(ms), 1),
        "p99": round(_pct(ms, 0.99) or 0, 1),
        "max": round(max(ms), 1),
    }


# -- report ------------------------------------------------------------------------------------


def report(results: list[dict[str, Any]]) -> str:
    """A table of the sides' figures (``results`` as returned by :func:`run_side`)."""

    def cell(r: dict[str, Any], key: str) -> str:
        value: Any = r
        for part in key.split("."):
            if isinstance(value, dict):
                value = value.get(part)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                value = None
        return "n/a" if value is None else str(value)

    rows = [
        ("users held on A / watchers on B", "held_users", "held_watchers"),
        ("users back / seconds until all back", "back", "all_back_s"),
        ("per-user back after kill, p50 / p99 s", "back_p50_s", "back_p99_s"),
        ("join latency in the storm, p50 / p99 ms", "join_ms_p50", "join_ms_p99"),
        ("join: TCP connect, p50 / p99 ms", "join_phases_ms_p50_p99.connect.0",
         "join_phases_ms_p50_p99.connect.1"),
        ("join: handshake (101), p50 / p99 ms", "join_phases_ms_p50_p99.handshake.0",
         "join_phases_ms_p50_p99.handshake.1"),
        ("join: subscribe, p50 / p99 ms", "join_phases_ms_p50_p99.subscribe.0",
         "join_phases_ms_p50_p99.subscribe.1"),
        ("delivery before kill, p50 / p99 ms", "delivery_ms_before.p50", "delivery_ms_before.p99"),
        ("delivery during storm, p50 / p99 ms", "delivery_ms_during.p50", "delivery_ms_during.p99"),
        ("deliveries received / expected", "deliveries", "deliveries_expected"),
        ("member_removed: user back (false) / away", "member_removed_while_back",
         "member_removed_while_away"),
        ("member_added after kill / watchers lost", "member_added_after_kill", "watchers_lost"),
        ("reap after kill / margin after last back, s", "reap_s", "reap_margin_s"),
        ("GET users: exact when settled / at end", "users_exact_settled", "users_exact_at_end"),
        ("GET users answers short a member after back", "users_fewer_after_back", "users_samples"),
        ("node B CPU per rejoin ms / % of a core", "node_b_cpu_ms_per_rejoin",
         "node_b_cpu_pct_during_storm"),
        ("clients % of a core / machine busy % (storm)", "clients_cpu_pct_during_storm",
         "machine_busy_pct_during_storm"),
    ]  # fmt: skip
    names = [r["side"] for r in results]
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, a, b in rows:
        lines.append(
            f"| {label} | " + " | ".join(f"{cell(r, a)} / {cell(r, b)}" for r in results) + " |"
        )
    for r in results:
        if r.get("healing_during") is not None:
            lines.append(f"{r['side']}: anti-entropy and re-assertions from the kill until the "
                         f"end of sampling: {r['healing_during'] or 'none'}")  # fmt: skip
        if r.get("failed_attempts"):
            lines.append(f"{r['side']}: failed rejoin attempts {r['failed_attempts']}")
        if r.get("false_removal_examples"):
            lines.append(f"{r['side']}: false removals, e.g. {r['false_removal_examples']}")
        if r.get("error"):
            lines.append(f"{r['side']}: FAILED: {r['error']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=6000)
    parser.add_argument("--watchers", type=int, default=5, help="per channel, on node B")
    parser.add_argument("--procs", type=int, default=3, help="storm client processes")
    parser.add_argument("--rate", type=float, default=4.0, help="events a second, per channel")
    parser.add_argument("--sides", default="ours,sockudo")
    parser.add_argument(
        "--lease-ms", type=int, default=0, help="ours: the nodes' lease_ms (default: theirs)"
    )
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 000 users: a smoke run")
    parser.add_argument("--sockudo", type=Path, default=DEFAULT_SOCKUDO)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path)
    opts = parser.parse_args()
    if opts.from_json:
        print(report(json.loads(opts.from_json.read_text())["sides"]))
        return 0
    if opts.quick:
        opts.users = 1000
    sides = [s for s in opts.sides.split(",") if s]
    if opts.skip_peer or not opts.sockudo.exists():
        if "sockudo" in sides:
            print(f"sockudo skipped ({opts.sockudo} missing or --skip-peer)")
        sides = [s for s in sides if s != "sockudo"]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    lease_env = {"GATEWAY_LEASE_MS": str(opts.lease_ms)} if opts.lease_ms else {}
    results = []
    for name in sides:
        workdir = Path(tempfile.mkdtemp(prefix=f"pg-storm-{name}-"))
        procs = Procs(workdir)
        side: Side = (
            Ours(workdir, procs, nodes=2, env=lease_env)
            if name == "ours"
            else Sockudo(opts.sockudo, workdir, procs, nodes=2, adapter="redis")
        )
        side.name = name
        print(f"[{name}] storm of {opts.users} users (logs in {workdir})", flush=True)
        try:
            results.append(run_side(side, opts))
        except Exception as exc:
            results.append({"side": name, "error": repr(exc)})
    print(report(results))
    if opts.json:
        opts.json.write_text(json.dumps({"settings": vars(opts) | {"sockudo": str(opts.sockudo),
                                         "json": None, "from_json": None},
                                         "sides": results}, indent=1))  # fmt: skip
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
