"""Capacity: how many presence connections one node holds, and what they cost; ours vs sockudo.

Usage: python bench/bench_capacity.py [--connections 15000] [--procs 4] [--concurrency 200]
                                      [--idle 30] [--events 20] [--rate 2] [--quick]
                                      [--skip-peer] [--sides ours,sockudo-local,sockudo-redis]
                                      [--sockudo PATH] [--json FILE] [--from-json FILE]

Starts, on 127.0.0.1 only and one side after the other, ONE node of each server (the sides
of ``bench_peer``, with one node):

* ours: the local Redis topology (2 shards, 1 replica each, 3 Sentinels) and one gateway node
  (``python -m gateway serve``, ``LOOPBACK_LOAD_ENV``);
* sockudo-local: one sockudo node on its ``local`` adapter (state in the node only);
* sockudo-redis: one sockudo node on its ``redis`` adapter and cache, with its own plain
  ``redis-server`` (skipped with a note if the binary has no redis feature).

The target is ``--connections`` presence connections on the node; the open-file limit is
checked first and, if it does not allow that many for the node (with 500 descriptors of
headroom), the run holds what it allows and says so. The same client code measures each side,
spread over ``--procs`` processes (``multiprocessing`` spawn, uvloop, each raising its own soft
open-file limit to the hard limit):

1. ramp: connection i opens a WebSocket (``/app/app-key?protocol=7``, as pusher-js also sends
   ``client`` and ``version``), reads ``pusher:connection_established``, subscribes with a
   valid signature to ``presence-cap-{i // 100}`` as user ``u{i}`` (channels of 100 members)
   and waits for ``subscription_succeeded``; at most ``--concurrency`` in flight per process;
   a failed attempt is counted and retried (at most 3 attempts, with a back-off, as pusher-js
   reconnects). Connect + subscribe rate = connections subscribed / (last success - start),
   over all processes; also the CPU time this took in the node (``/proc/<pid>/stat``), in the
   Redis servers measured below (``INFO cpu``) and in the client processes, which share the
   2 cores. Every socket then has a reader that answers ``pusher:ping`` with
   ``pusher:pong`` and records deliveries, so no server sees a slow client.
2. with all connected: node RSS per connection (VmRSS of the node process, which has no
   children, after - before / connections held; before = after a 50-connection warm-up),
   Redis bytes per presence member (``INFO memory`` ``used_memory`` delta summed over our shard
   masters, or sockudo's redis-server; n/a on the local adapter), and the node's idle CPU:
   utime + stime (``/proc/<pid>/stat``, all threads) over ``--idle`` seconds, as % of one core
   (it includes pings and, for ours, leases, reaping and anti-entropy).
3. delivery latency: ``--events`` events at ``--rate`` a second through ``POST
   /apps/1/events`` (signed like the official libraries), each on up to 100 presence channels
   (the API's limit; several requests, sent together, cover all channels), so that every
   connection receives every event; each carries its ``time.time()`` at sending; clients
   record receive - send time (same machine clock). min / p50 / p99 ms, deliveries received
   vs expected (connections held in the channels of each accepted request), and the node's CPU
   time per delivery over the publishing and the wait for the last deliveries (idle work
   included). Each event is one frame per connection, read by clients on the same 2 cores: the
   latency percentiles include the time the clients take to read such a burst.

Prints a table of the sides and the ratios ours / peer; ``--json`` writes the figures. Every
loop is bounded by a count and a time limit (a side that is not done in time is stopped and
reported as failed; sides that would start after ``RUN_LIMIT`` are skipped) and every process
started here is stopped at the end, also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
import uvloop
import websockets
from websockets.asyncio.client import ClientConnection, connect

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_gateway import APP_ID, KEY, SECRET, HttpConn, signed_head  # noqa: E402
from bench_peer import (  # noqa: E402
    DEFAULT_SOCKUDO,
    WS_PATH,
    NodeExited,
    Ours,
    Procs,
    Side,
    Sockudo,
    _rss_kib,
)

from gateway.protocol.auth import sign  # noqa: E402

SIDES = ("ours", "sockudo-local", "sockudo-redis")
GROUP = 100  # members per presence channel
CHANNELS_PER_REQUEST = 100  # POST events: at most 100 channels (both servers)
FD_HEADROOM = 500
WARMUP_CONNECTIONS = 50
ATTEMPTS = 3
STEP_TIMEOUT = 20.0  # one connect + subscribe attempt
RAMP_LIMIT = 180.0  # a process stops starting attempts after this
CMD_WAIT = 600.0  # a client process waiting for its next command gives up after this
CLIENT_LIMIT = 900.0  # a client process ends after this, whatever happens
DRAIN_LIMIT = 15.0  # wait for the last deliveries after the last publish
RUN_LIMIT = 1020.0  # no side starts after this many seconds of the run
SIDE_BUDGET = 360.0  # ... nor if less than this is left
TICK = "cap-tick"
PONG = '{"event":"pusher:pong","data":{}}'


# -- clients (their own processes) -----------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """A short label of why an attempt failed (failures are counted by it)."""
    if isinstance(exc, websockets.InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, websockets.ConnectionClosed):
        return f"closed {exc.rcvd.code if exc.rcvd else ''}".strip()
    if isinstance(exc, PusherError):
        return str(exc)
    return type(exc).__name__


class PusherError(RuntimeError):
    """The server answered with ``pusher:error`` or ``pusher:subscription_error``."""


async def _join(port: int, i: int, prefix: str, user: str) -> ClientConnection:
    """Connection ``i``: open, read ``connection_established``, join its presence channel."""
    ws = await connect(
        f"ws://127.0.0.1:{port}{WS_PATH}", compression=None, ping_interval=None, open_timeout=10
    )
    try:
        hello = json.loads(await ws.recv())
        if hello.get("event") != "pusher:connection_established":
            raise PusherError(f"first frame {hello.get('event')}")
        socket_id = json.loads(hello["data"])["socket_id"]
        channel = f"presence-{prefix}-{i // GROUP}"
        data = json.dumps({"user_id": f"{user}{i}", "user_info": {"n": i}})
        auth = f"{KEY}:{sign(SECRET, f'{socket_id}:{channel}:{data}')}"
        await ws.send(
            json.dumps(
                {
                    "event": "pusher:subscribe",
                    "data": {"channel": channel, "auth": auth, "channel_data": data},
                }
            )
        )
        for _ in range(10_000):  # other frames first (a ping), bounded
            frame = json.loads(await ws.recv())
            event = frame.get("event")
            if event == "pusher_internal:subscription_succeeded":
                return ws
            if event == "pusher:ping":
                await ws.send(PONG)
            elif event in ("pusher:error", "pusher:subscription_error"):
                data = frame.get("data")
                code = data.get("code") if isinstance(data, dict) else data
                raise PusherError(f"{event} {code}")
        raise PusherError("no subscription_succeeded")
    except BaseException:
        ws.transport.abort()
        raise


async def _hold(
    k: int,
    port: int,
    lo: int,
    hi: int,
    concurrency: int,
    prefix: str,
    user: str,
    out: Any,
    cmd: Any,
) -> None:
    """Open connections ``lo`` .. ``hi - 1``, hold them and answer the parent's commands."""
    loop = asyncio.get_running_loop()

    async def command() -> str:
        try:
            return str(await loop.run_in_executor(None, cmd.get, True, CMD_WAIT))
        except queue.Empty:
            return "close"

    held: dict[int, ClientConnection] = {}
    readers: set[asyncio.Task[None]] = set()
    latencies: list[float] = []
    st = {"received": 0, "pongs": 0, "lost": 0, "closing": False}
    lost_reasons: Counter[str] = Counter()

    async def read(ws: ClientConnection) -> None:
        try:
            async for message in ws:
                text = message if isinstance(message, str) else message.decode()
                if TICK in text:
                    now = time.time()
                    data = json.loads(text)["data"]
                    sent = json.loads(data)["t"] if isinstance(data, str) else data["t"]
                    latencies.append(round((now - sent) * 1000, 3))
                    st["received"] += 1
                elif "pusher:ping" in text:
                    await ws.send(PONG)
                    st["pongs"] += 1
            reason = f"closed {ws.close_code}"
        except Exception as exc:
            reason = _reason(exc)
        if not st["closing"]:
            st["lost"] += 1
            lost_reasons[reason] += 1

    out.put({"proc": k, "kind": "ready"})
    if await command() == "go":
        failures: Counter[str] = Counter()
        gate = asyncio.Semaphore(concurrency)
        deadline = loop.time() + RAMP_LIMIT
        t_go = time.time()
        t_last = t_go

        async def one(i: int) -> None:
            nonlocal t_last
            for attempt in range(ATTEMPTS):
                async with gate:
                    if loop.time() >= deadline:
                        failures["ramp time limit"] += 1
                        return
                    try:
                        ws = await asyncio.wait_for(_join(port, i, prefix, user), STEP_TIMEOUT)
                    except Exception as exc:
                        failures[_reason(exc)] += 1
                    else:
                        held[i] = ws
                        t_last = time.time()
                        task = asyncio.create_task(read(ws))
                        readers.add(task)
                        task.add_done_callback(readers.discard)
                        return
                if attempt + 1 < ATTEMPTS:
                    await asyncio.sleep(1.0 * (attempt + 1))
            failures["gave up (3 attempts)"] += 1

        await asyncio.gather(*(one(i) for i in range(lo, hi)))
        out.put({
            "proc": k, "kind": "ramped", "subscribed": len(held), "failures": dict(failures),
            "t_go": t_go, "t_last": t_last, "groups": dict(Counter(i // GROUP for i in held)),
        })  # fmt: skip
        for _ in range(1000):  # commands, bounded
            what = await command()
            if what == "count":
                out.put({"proc": k, "kind": "count", "received": st["received"]})
            elif what == "report":
                out.put({
                    "proc": k, "kind": "report", "latencies_ms": latencies,
                    "received": st["received"], "pongs": st["pongs"], "lost": st["lost"],
                    "lost_reasons": dict(lost_reasons),
                })  # fmt: skip
            else:
                break
    st["closing"] = True
    sockets = list(held.values())
    try:
        await asyncio.wait_for(
            asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True), 30
        )
    except TimeoutError:
        for ws in sockets:
            ws.transport.abort()
    for task in list(readers):
        task.cancel()
    out.put({"proc": k, "kind": "closed", "closed": len(sockets)})


def client_process(
    main: Any, k: int, args: dict[str, Any], out: Any, cmd: Any, limit: float = CLIENT_LIMIT
) -> None:
    """Run coroutine function ``main(k, out=out, cmd=cmd, **args)`` in client process ``k``
    (uvloop, the open-file soft limit raised to the hard one, at most ``limit``
    seconds); an error is reported on ``out`` for the parent to raise."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        uvloop.run(asyncio.wait_for(main(k, out=out, cmd=cmd, **args), limit))
    except BaseException as exc:  # reported to the parent, which raises it
        out.put({"proc": k, "kind": "error", "error": repr(exc)})


def _client_main(k: int, args: dict[str, Any], out: Any, cmd: Any) -> None:
    """Entry point of client process ``k``."""
    client_process(_hold, k, args, out, cmd)


class Workers:
    """Client processes (``multiprocessing`` spawn), process ``k`` running
    ``main(k, args[k], out, cmd_k)``: it reports on the shared ``out`` queue (dicts with
    ``proc`` and ``kind``; kind ``error`` is raised here) and reads commands from its own."""

    def __init__(self, main: Any, args: list[dict[str, Any]]) -> None:
        ctx = mp.get_context("spawn")
        self.out = ctx.Queue()
        self.cmds = [ctx.Queue() for _ in args]
        self.procs = [
            ctx.Process(target=main, args=(k, a, self.out, self.cmds[k]), daemon=True)
            for k, a in enumerate(args)
        ]
        for proc in self.procs:
            proc.start()

    def send(self, what: str) -> None:
        for q in self.cmds:
            q.put(what)

    def collect(self, kind: str, timeout: float) -> list[dict[str, Any]]:
        """One ``kind`` message from every process (raises on an error or a timeout)."""
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.procs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"client processes: no {kind!r} within {timeout:.0f} s")
            try:
                msg = self.out.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [k for k, p in enumerate(self.procs) if not p.is_alive() and k not in got]
                if dead:
                    raise RuntimeError(f"client process(es) {dead} exited") from None
                continue
            if msg["kind"] == "error":
                raise RuntimeError(f"client process {msg['proc']} failed: {msg['error']}")
            if msg["kind"] == kind:
                got[msg["proc"]] = msg
        return [got[k] for k in sorted(got)]

    def cpu_seconds(self) -> float:
        """utime + stime of the client processes so far."""
        total = 0.0
        for proc in self.procs:
            with contextlib.suppress(OSError, TypeError):
                total += _cpu_seconds(proc.pid or 0)
        return total

    def stop(self) -> int:
        """Close every connection, end the processes; return how many were closed."""
        closed = 0
        self.send("close")
        with contextlib.suppress(Exception):
            closed = sum(m["closed"] for m in self.collect("closed", 60))
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        return closed


class Clients(Workers):
    """Client processes holding connections ``0 .. total - 1`` (split evenly) on one port."""

    def __init__(
        self, port: int, total: int, procs: int, concurrency: int, prefix: str, user: str
    ) -> None:
        bounds = [total * k // procs for k in range(procs + 1)]
        args = {"port": port, "concurrency": concurrency, "prefix": prefix, "user": user}
        super().__init__(
            _client_main,
            [args | {"lo": bounds[k], "hi": bounds[k + 1]} for k in range(procs)],
        )


# -- measuring one side ----------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu(pid: int, clients: Clients, redis_clients: list[redis.Redis]) -> dict[str, float]:
    """CPU seconds so far of the node, the client processes and the Redis servers measured
    (``INFO cpu``: used_cpu_user + used_cpu_sys; ours: the shard masters)."""
    infos = [c.info("cpu") for c in redis_clients]
    return {
        "node": _cpu_seconds(pid),
        "clients": clients.cpu_seconds(),
        "redis": sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"]) for i in infos),
    }


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def _redis_memory(clients: list[redis.Redis]) -> dict[str, int]:
    infos = [c.info("memory") for c in clients]
    return {
        "used_memory": sum(int(i["used_memory"]) for i in infos),
        "used_memory_dataset": sum(int(i["used_memory_dataset"]) for i in infos),
        "keys": sum(int(c.dbsize()) for c in clients),
    }


async def _publish(port: int, groups: list[int], events: int, rate: float) -> dict[str, Any]:
    """``events`` events at ``rate``/s, each on every channel of ``groups`` (100 a request)."""
    path = f"/apps/{APP_ID}/events"
    chunks = [
        groups[i : i + CHANNELS_PER_REQUEST] for i in range(0, len(groups), CHANNELS_PER_REQUEST)
    ]
    conns = [HttpConn(port) for _ in chunks]
    accepted: list[list[int]] = []
    errors: list[str] = []
    loop = asyncio.get_running_loop()

    async def send(conn: HttpConn, chunk: list[int], k: int) -> None:
        body = json.dumps({
            "name": TICK, "channels": [f"presence-cap-{g}" for g in chunk],
            "data": json.dumps({"t": time.time(), "k": k}),
        }).encode()  # fmt: skip
        try:
            status, answer = await asyncio.wait_for(
                conn.request(signed_head("POST", path, body), body), 10
            )
            if status != 200:
                raise RuntimeError(f"{status} {answer[:200]!r}")
            accepted.append(chunk)
        except Exception as exc:
            conn.close()
            if len(errors) < 10:
                errors.append(repr(exc))

    start = loop.time()
    deadline = start + events / rate + 30
    sent = 0
    for k in range(events):
        delay = start + k / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if loop.time() > deadline:
            break
        await asyncio.gather(*(send(c, chunk, k) for c, chunk in zip(conns, chunks, strict=True)))
        sent += 1
    for conn in conns:
        conn.close()
    return {"ticks": sent, "requests": sent * len(chunks), "accepted": accepted, "errors": errors}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def measure_side(side: Side, target: int, opts: argparse.Namespace) -> dict[str, Any]:
    """Ramp ``target`` presence connections onto the side's node and measure what they cost."""
    port, pid = side.ports[0], side.pid_a
    fig: dict[str, Any] = {"target": target, "note": side.note}
    label = f"  [{side.name}]"
    redis_clients: list[redis.Redis] = []
    if isinstance(side, Ours):
        redis_clients = [redis.Redis.from_url(f"redis://{m.addr}") for m in side.cluster.masters()]
        fig["redis"] = f"{len(redis_clients)} shard masters"
    elif isinstance(side, Sockudo) and side.adapter == "redis":
        redis_clients = [redis.Redis(host="127.0.0.1", port=side.redis_port)]
        fig["redis"] = "its redis-server"
    try:
        print(f"{label} warm-up ({WARMUP_CONNECTIONS} connections) ...", flush=True)
        warm = Clients(port, WARMUP_CONNECTIONS, 1, opts.concurrency, "capw", "w")
        try:
            warm.collect("ready", 60)
            warm.send("go")
            warmed = warm.collect("ramped", RAMP_LIMIT + 30)[0]["subscribed"]
        finally:
            warm.stop()
        if warmed != WARMUP_CONNECTIONS:
            raise RuntimeError(f"warm-up: {warmed} of {WARMUP_CONNECTIONS} subscribed")
        time.sleep(2.0)
        rss_before = _rss_kib(pid)
        redis_before = _redis_memory(redis_clients) if redis_clients else None

        print(f"{label} ramp to {target} presence connections ...", flush=True)
        clients = Clients(port, target, opts.procs, opts.concurrency, "cap", "u")
        try:
            clients.collect("ready", 60)
            cpu_before = _cpu(pid, clients, redis_clients)
            clients.send("go")
            ramped = clients.collect("ramped", RAMP_LIMIT + 60)
            fig["ramp_cpu_s"] = _cpu_delta(cpu_before, _cpu(pid, clients, redis_clients))
            held = sum(r["subscribed"] for r in ramped)
            seconds = max(r["t_last"] for r in ramped) - min(r["t_go"] for r in ramped)
            failures: Counter[str] = Counter()
            groups: Counter[int] = Counter()
            for r in ramped:
                failures.update(r["failures"])
                groups.update(r["groups"])
            fig.update(held=held, ramp_s=seconds, failures=dict(failures),
                       connects_per_s=held / seconds if seconds > 0 else None)  # fmt: skip
            print(f"{label} {held} held in {seconds:.1f} s, failures {dict(failures)}", flush=True)
            time.sleep(3.0)  # let the node settle (buffers, lazily grown tables, writes)
            rss_after = _rss_kib(pid)
            fig["rss_before_kib"], fig["rss_after_kib"] = rss_before, rss_after
            fig["kib_per_connection"] = (rss_after - rss_before) / held if held else None
            if redis_before is not None:
                after = _redis_memory(redis_clients)
                fig["redis_before"], fig["redis_after"] = redis_before, after
                fig["redis_bytes_per_member"] = (
                    (after["used_memory"] - redis_before["used_memory"]) / held if held else None
                )
                fig["redis_dataset_bytes_per_member"] = (
                    (after["used_memory_dataset"] - redis_before["used_memory_dataset"]) / held
                    if held
                    else None
                )
                fig["redis_keys_added"] = after["keys"] - redis_before["keys"]

            print(f"{label} idle CPU over {opts.idle:g} s ...", flush=True)
            cpu0, t0 = _cpu_seconds(pid), time.monotonic()
            time.sleep(opts.idle)
            cpu1, t1 = _cpu_seconds(pid), time.monotonic()
            fig["idle_cpu_pct"] = 100 * (cpu1 - cpu0) / (t1 - t0)

            print(f"{label} delivery latency ({opts.events} events at {opts.rate:g}/s) ...",
                  flush=True)  # fmt: skip
            cpu_before = _cpu(pid, clients, redis_clients)
            pub = asyncio.run(_publish(port, sorted(groups), opts.events, opts.rate))
            expected = sum(groups[g] for chunk in pub["accepted"] for g in chunk)
            deadline = time.monotonic() + DRAIN_LIMIT
            while time.monotonic() < deadline:
                clients.send("count")
                if sum(m["received"] for m in clients.collect("count", 30)) >= expected:
                    break
                time.sleep(0.5)
            fig["delivery_cpu_s"] = _cpu_delta(cpu_before, _cpu(pid, clients, redis_clients))
            clients.send("report")
            reports = clients.collect("report", 60)
            latencies = sorted(x for r in reports for x in r["latencies_ms"])
            lost: Counter[str] = Counter()
            for r in reports:
                lost.update(r["lost_reasons"])
            fig.update(
                publish_requests=pub["requests"], publish_accepted=len(pub["accepted"]),
                publish_errors=pub["errors"], events=pub["ticks"], expected=expected,
                received=sum(r["received"] for r in reports),
                p50_ms=statistics.median(latencies) if latencies else None,
                p99_ms=_pct(latencies, 0.99), max_ms=latencies[-1] if latencies else None,
                min_ms=latencies[0] if latencies else None,
                pongs=sum(r["pongs"] for r in reports), lost=sum(r["lost"] for r in reports),
                lost_reasons=dict(lost),
            )  # fmt: skip
            if held:
                fig["node_us_per_join"] = 1e6 * fig["ramp_cpu_s"]["node"] / held
                fig["redis_us_per_join"] = 1e6 * fig["ramp_cpu_s"]["redis"] / held
            if fig["received"]:
                fig["node_us_per_delivery"] = 1e6 * fig["delivery_cpu_s"]["node"] / fig["received"]
            node = side.procs.proc(f"{'gateway' if isinstance(side, Ours) else 'sockudo'}-a")
            if node.poll() is not None:
                raise RuntimeError(f"the node exited with {node.returncode} during the run")
        finally:
            clients.stop()
        return fig
    finally:
        for c in redis_clients:
            c.close()


def run_side(name: str, target: int, opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start one node of side ``name``, measure it, stop everything of it."""
    procs = Procs(workdir)
    side: Side
    if name == "ours":
        side = Ours(workdir, procs, nodes=1)
    else:
        side = Sockudo(opts.sockudo, workdir, procs, nodes=1, adapter=name.split("-")[1])
    side.name = name
    try:
        side.up()
        return measure_side(side, target, opts)
    except NodeExited as exc:
        if "not compiled in" in str(exc):
            return {"skipped": "sockudo binary built without the 'redis' cargo feature"}
        raise
    except Exception:
        for proc_name, _ in procs.procs:
            print(f"--- last lines of {proc_name}.log ---\n{procs.log_tail(proc_name)}")
        raise
    finally:
        side.down()


# -- report ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _redis_cell(key: str, spec: str) -> Any:
    return lambda f: _fmt(f.get(key), spec) if "redis" in f else "n/a"


#: The table's rows: label, figure whose ratio ours / peer is shown (or None), cell text.
ROWS: list[tuple[str, str | None, Any]] = [
    ("connections held / target", None, lambda f: f"{f['held']:,} / {f['target']:,}"),
    (
        "failed attempts (retried)",
        None,
        lambda f: ", ".join(f"{k}: {v}" for k, v in f["failures"].items()) or "0",
    ),
    (
        "connect + subscribe /s (ramp s)",
        "connects_per_s",
        lambda f: f"{_fmt(f['connects_per_s'], ',.0f')} ({f['ramp_s']:.1f} s)",
    ),
    ("node RSS KiB per connection", "kib_per_connection",
     lambda f: _fmt(f["kib_per_connection"], ".2f")),
    ("  node RSS before -> after (MiB)", None,
     lambda f: f"{f['rss_before_kib'] >> 10} -> {f['rss_after_kib'] >> 10}"),
    ("Redis bytes per presence member", None, _redis_cell("redis_bytes_per_member", ",.0f")),
    ("  (used_memory_dataset only)", None, _redis_cell("redis_dataset_bytes_per_member", ",.0f")),
    ("  Redis keys added", None, _redis_cell("redis_keys_added", ",")),
    ("node CPU µs per connect + subscribe", "node_us_per_join",
     lambda f: _fmt(f.get("node_us_per_join"), ",.0f")),
    ("  Redis CPU µs per join (ramp)", None, _redis_cell("redis_us_per_join", ",.0f")),
    ("  clients' CPU s during the ramp", None, lambda f: f"{f['ramp_cpu_s']['clients']:.1f}"),
    ("idle CPU, % of one core", "idle_cpu_pct", lambda f: f"{f['idle_cpu_pct']:.1f}"),
    ("delivery min / p50 ms", "p50_ms",
     lambda f: f"{_fmt(f['min_ms'], '.1f')} / {_fmt(f['p50_ms'], '.1f')}"),
    ("delivery p99 ms", "p99_ms", lambda f: _fmt(f["p99_ms"], ".1f")),
    ("node CPU µs per delivery", "node_us_per_delivery",
     lambda f: _fmt(f.get("node_us_per_delivery"), ".2f")),
    ("  clients' CPU s during deliveries", None,
     lambda f: f"{f['delivery_cpu_s']['clients']:.1f}"),
    ("deliveries received / expected", None, lambda f: f"{f['received']:,} / {f['expected']:,}"),
    ("publish requests accepted / sent", None,
     lambda f: f"{f['publish_accepted']} / {f['publish_requests']}"),
    ("connections lost while held", None, lambda f: str(f["lost"])),
]  # fmt: skip


def report(results: dict[str, dict[str, Any]], opts: argparse.Namespace) -> None:
    """Print the table of the sides (figures and ratios ours / peer) and their notes."""
    names = [n for n in SIDES if n in results]
    measured = {n: f for n, f in results.items() if "held" in f}
    ours = measured.get("ours")
    head = ["measure"]
    for n in names:
        head.append(n)
        if n != "ours" and ours:
            head.append(f"ours/{n.removeprefix('sockudo-')}")
    table = []
    for label, key, cell in ROWS:
        line = [label + (f" ({opts.idle:g} s)" if key == "idle_cpu_pct" else "")]
        for n in names:
            f = measured.get(n)
            line.append(cell(f) if f else "-")
            if n != "ours" and ours:
                ok = key and f and ours.get(key) is not None and f.get(key)
                line.append(f"{ours[key] / f[key]:.2f}" if ok else "")
        table.append(line)
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(fmt.format(*head))
    print("-+-".join("-" * w for w in widths))
    for line in table:
        print(fmt.format(*line))
    print(
        "One node each. RSS: the node process (ours: the gateway only, Redis not included). "
        "Redis: used_memory delta over ours' 2 shard masters / sockudo-redis' redis-server, per "
        "member held. Latency: POST events -> client read, clients on the same 2 cores."
    )
    for n in names:
        f = results[n]
        for key in ("skipped", "error", "note"):
            if f.get(key):
                print(f"{n}: {key}: {f[key]}")
        if f.get("lost_reasons"):
            print(f"{n}: lost connections: {f['lost_reasons']}")
        if f.get("publish_errors"):
            print(f"{n}: publish errors: {f['publish_errors']}")


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, help="target per node (default 15000)")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--concurrency", type=int, default=200, help="in flight per process")
    parser.add_argument("--idle", type=float, help="idle CPU window, s (default 30)")
    parser.add_argument("--events", type=int, help="events published (default 20)")
    parser.add_argument("--rate", type=float, default=2.0, help="events per second")
    parser.add_argument("--quick", action="store_true", help="2 000 connections, shorter")
    parser.add_argument("--skip-peer", action="store_true", help="ours only")
    parser.add_argument("--sides", default=",".join(SIDES), help="sides to run")
    parser.add_argument("--sockudo", type=Path, default=DEFAULT_SOCKUDO, help="sockudo binary")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path, help="print the report of an earlier --json")
    opts = parser.parse_args()
    if opts.from_json:
        saved = json.loads(opts.from_json.read_text())
        opts.idle = saved["settings"]["idle"]
        report(saved["sides"], opts)
        return 0
    defaults = (
        dict(connections=2000, idle=10.0, events=10)
        if opts.quick
        else dict(connections=15000, idle=30.0, events=20)
    )
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    sides = [s for s in opts.sides.split(",") if s]
    if unknown := set(sides) - set(SIDES):
        parser.error(f"unknown sides {sorted(unknown)}; known: {', '.join(SIDES)}")
    if opts.skip_peer:
        sides = [s for s in sides if s == "ours"]
    if not shutil.which("redis-server"):
        print("redis-server is required", file=sys.stderr)
        return 2
    peer_ok = opts.sockudo.is_file() and os.access(opts.sockudo, os.X_OK)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"open-file limit: soft {soft}, hard {hard} per process")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers
    target = min(opts.connections, hard - FD_HEADROOM)
    if target < opts.connections:
        print(
            f"the node may open {hard} files: holding {target} connections instead of "
            f"{opts.connections} ({FD_HEADROOM} descriptors of headroom)"
        )
    procs_needed = math.ceil(target / (hard - FD_HEADROOM))
    if opts.procs < procs_needed:
        print(f"{opts.procs} client processes cannot hold {target}: using {procs_needed}")
        opts.procs = procs_needed

    results: dict[str, dict[str, Any]] = {}
    start = time.monotonic()
    for name in sides:
        if name != "ours" and not peer_ok:
            results[name] = {"skipped": f"no sockudo binary at {opts.sockudo}"}
            continue
        left = RUN_LIMIT - (time.monotonic() - start)
        if left < SIDE_BUDGET:
            results[name] = {"skipped": f"run time limit ({left:.0f} s left)"}
            continue
        print(f"== {name} ==", flush=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"pg-bench-cap-{name}-"))
        try:
            results[name] = run_side(name, target, opts, workdir)
        except Exception as exc:
            results[name] = {"error": repr(exc)}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, opts)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(opts, k) for k in ("connections", "procs", "concurrency", "idle",
                                                   "events", "rate")}  # fmt: skip
        settings.update(target=target, nofile=[soft, hard])
        opts.json.write_text(json.dumps({"settings": settings, "sides": results}, indent=2))
    return 0 if all("error" not in f for f in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
