"""Soak: presence churn, fan-out and API reads at fixed rates for a bounded time; does memory
stay flat?

Usage: python bench/bench_soak.py [--duration 1200] [--sample 10] [--warmup 180]
                                  [--joins 40] [--events 20] [--reads 20] [--json FILE]

Starts, on 127.0.0.1 only: the local Redis topology (2 shards, 1 replica each, 3 Sentinels) and
two gateway nodes (``python -m gateway serve``). A load process of its own then runs, for
``--duration`` seconds and at fixed rates (each action is started on a schedule, not when the
previous one ends, so a slow node does not slow the load down):

* an audience: 100 sockets (half on each node), each a member of one of 10 presence channels
  and a subscriber of one of 10 public channels, for the whole run;
* presence churn: ``--joins`` new connections a second, alternating nodes; each joins a
  presence channel (half from a pool of 200 names that keeps coming back, half never seen
  before, as per-session channels are), stays 2 s, leaves and closes;
* fan-out: ``--events`` events a second through the HTTP API (``POST /apps/1/events``) on the
  public channels, alternating nodes, delivered to the audience;
* reads: ``--reads`` API requests a second (``users`` of a presence channel, one channel's
  info, the list of presence channels with user counts), alternating nodes.

The main process samples every ``--sample`` seconds: each node's resident memory (``VmRSS``),
Redis ``used_memory``, its dataset part (``used_memory_dataset``: without the replication
backlog and client buffers, which fill up once and then stay) and the key count (``DBSIZE``),
each summed over the shard masters. From
the samples after ``--warmup`` seconds it fits a least-squares line per series and reports its
slope as a percentage of the series' mean per 10 minutes; the target is growth below 1 %.
Every failed action is counted and reported. Every loop is bounded by ``--duration`` (at most
2 hours) and every process started here is stopped at the end, also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import uvloop
from websockets.asyncio.client import ClientConnection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import (  # noqa: E402
    APP_ID,
    KEY,
    SECRET,
    HttpConn,
    _free_port,
    _wait_port,
    signed_head,
)
from bench_peer import _pusher_socket, _rss_kib, _subscribe  # noqa: E402

from gateway.localcluster import LOOPBACK_LOAD_ENV, LocalCluster, find_free_port_range  # noqa: E402
from gateway.protocol.auth import sign  # noqa: E402
from gateway.shards.admin import init_shards  # noqa: E402
from gateway.shards.topology import load_topology  # noqa: E402

MAX_DURATION = 7200
AUDIENCE = 100
CHANNELS = 10
POOL = 200
HOLD = 2.0
#: Actions in flight above which a scheduled action is skipped (and counted), so that a node
#: that stops answering cannot make the load process pile up tasks without bound.
MAX_IN_FLIGHT = 2000
TARGET_PCT_PER_10_MIN = 1.0


# -- the load (its own process) -------------------------------------------------------------


@dataclass
class Tally:
    """What the load process did, and what failed."""

    joins: int = 0
    join_failures: int = 0
    events: int = 0
    event_failures: int = 0
    deliveries: int = 0
    reads: int = 0
    read_failures: int = 0
    skipped: int = 0
    audience_lost: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, what: str, exc: BaseException | str) -> None:
        if len(self.errors) < 20:
            self.errors.append(f"{what}: {exc!r}" if isinstance(exc, BaseException) else exc)


async def _join(ws: ClientConnection, socket_id: str, channel: str, user: str) -> None:
    """Subscribe ``ws`` to ``channel`` (as ``user``, signed, on a presence channel)."""
    if not channel.startswith("presence-"):
        await _subscribe(ws, channel)
        return
    data = json.dumps({"user_id": user, "user_info": {"name": user}})
    auth = f"{KEY}:{sign(SECRET, f'{socket_id}:{channel}:{data}')}"
    await _subscribe(ws, channel, auth, data)


async def _call(conn: HttpConn, head: bytes, body: bytes = b"") -> None:
    """One API request; raises unless the answer is 200."""
    status, answer = await asyncio.wait_for(conn.request(head, body), 10)
    if status != 200:
        raise RuntimeError(f"{status} {answer[:200]!r}")


async def _paced(rate: float, duration: float, action: Any, tally: Tally) -> None:
    """Start ``action(i)`` at ``i / rate`` seconds for ``duration`` seconds; wait for all."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: set[asyncio.Task[None]] = set()
    for i in range(int(rate * duration)):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= MAX_IN_FLIGHT:
            tally.skipped += 1
            continue
        task = asyncio.create_task(action(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)


async def _load(
    ports: list[int], duration: float, joins: float, events: float, reads: float
) -> Tally:
    tally = Tally()
    rng = random.Random(7)
    public = [f"soak-pub-{k}" for k in range(CHANNELS)]
    rooms = [f"presence-soak-room-{k}" for k in range(CHANNELS)]

    async def listen(ws: ClientConnection) -> None:
        # Answers the server's pusher:ping as every Pusher client does (a socket that never
        # answers is closed after the activity timeout).
        try:
            async for raw in ws:
                text = str(raw)
                if '"event":"tick"' in text:
                    tally.deliveries += 1
                elif '"event":"pusher:ping"' in text:
                    await ws.send('{"event":"pusher:pong","data":{}}')
        except Exception as exc:
            tally.fail("audience socket", exc)
        if not stopping:
            tally.audience_lost += 1

    stopping = False
    audience: list[ClientConnection] = []
    listeners = []
    for i in range(AUDIENCE):
        ws, socket_id = await _pusher_socket(ports[i % len(ports)])
        await _join(ws, socket_id, rooms[i % CHANNELS], f"member-{i}")
        await _join(ws, socket_id, public[i % CHANNELS], "")
        audience.append(ws)
        listeners.append(asyncio.create_task(listen(ws)))

    async def churn(i: int) -> None:
        name = (
            f"presence-soak-pool-{rng.randrange(POOL)}"
            if i % 2
            else f"presence-soak-once-{i}-{rng.randrange(1 << 30):x}"
        )
        try:
            ws, socket_id = await _pusher_socket(ports[i % len(ports)])
            try:
                await _join(ws, socket_id, name, f"churner-{i}")
                tally.joins += 1
                await asyncio.sleep(HOLD)  # the member stays this long (part of the load)
                await ws.send(
                    json.dumps({"event": "pusher:unsubscribe", "data": {"channel": name}})
                )
            finally:
                await ws.close()
        except Exception as exc:
            tally.join_failures += 1
            tally.fail("join", exc)

    publishers = [HttpConn(port) for port in ports]
    readers = [HttpConn(port) for port in ports]
    path = f"/apps/{APP_ID}/events"

    async def publish(i: int) -> None:
        event = {"name": "tick", "channels": [public[i % CHANNELS]], "data": str(i)}
        body = json.dumps(event).encode()
        conn = publishers[i % len(publishers)]
        try:
            await _call(conn, signed_head("POST", path, body), body)
            tally.events += 1
        except Exception as exc:
            conn.close()
            tally.event_failures += 1
            tally.fail("publish", exc)

    async def read(i: int) -> None:
        kind = i % 3
        if kind == 0:
            target, params = f"/apps/{APP_ID}/channels/{rooms[i % CHANNELS]}/users", {}
        elif kind == 1:
            target = f"/apps/{APP_ID}/channels/{public[i % CHANNELS]}"
            params = {"info": "subscription_count"}
        else:
            target = f"/apps/{APP_ID}/channels"
            params = {"filter_by_prefix": "presence-", "info": "user_count"}
        conn = readers[i % len(readers)]
        try:
            await _call(conn, signed_head("GET", target, params=params))
            tally.reads += 1
        except Exception as exc:
            conn.close()
            tally.read_failures += 1
            tally.fail("read", exc)

    await asyncio.gather(
        _paced(joins, duration, churn, tally),
        _paced(events, duration, publish, tally),
        _paced(reads, duration, read, tally),
    )
    # Events published last may still be on their way to the audience.
    expected = tally.events * AUDIENCE // CHANNELS
    for _ in range(100):
        if tally.deliveries >= expected:
            break
        await asyncio.sleep(0.1)  # bounded wait for the last deliveries
    stopping = True
    for conn in (*publishers, *readers):
        conn.close()
    for ws in audience:
        await ws.close()
    for task in listeners:
        task.cancel()
    return tally


def load_main(
    ports: list[int], duration: float, rates: tuple[float, float, float], out: Any
) -> None:
    """Entry point of the load process: run the load and send its tally back."""
    tally = uvloop.run(_load(ports, duration, *rates))
    out.put(tally.__dict__)


# -- sampling and the report ----------------------------------------------------------------


def sample(nodes: list[subprocess.Popen[bytes]], masters: list[redis.Redis]) -> dict[str, float]:
    """One sample: node RSS (KiB, each and summed), Redis used_memory, its dataset part and
    the key count (summed over the masters)."""
    figures: dict[str, float] = {}
    for i, node in enumerate(nodes):
        figures[f"node{i}_rss_kib"] = _rss_kib(node.pid)
    figures["nodes_rss_kib"] = sum(v for k, v in figures.items() if k.startswith("node"))
    memory = [m.info("memory") for m in masters]
    figures["redis_used_memory"] = sum(int(info["used_memory"]) for info in memory)
    # used_memory less Redis's own overhead (replication backlog, client buffers, ...):
    # what the gateway's data costs.
    figures["redis_dataset_bytes"] = sum(int(info["used_memory_dataset"]) for info in memory)
    figures["redis_keys"] = sum(int(m.dbsize()) for m in masters)
    return figures


def slope_pct_per_10_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(t, value)`` points, in % of their mean per 10 minutes."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0 or mean_v == 0:
        return None
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / var
    return slope * 600 / mean_v * 100


def run(
    *,
    duration: float,
    sample_every: float = 10.0,
    warmup: float = 180.0,
    joins: float = 40.0,
    events: float = 20.0,
    reads: float = 20.0,
    activity_timeout: int | None = None,
) -> dict[str, Any]:
    """Start the topology and two nodes, run the load while sampling, stop everything.

    ``activity_timeout`` (seconds) overrides the nodes' default (120), so that a short run also
    sees the server's ``pusher:ping`` to the audience (which answers it).
    """
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"duration must be in (0, {MAX_DURATION}] s")
    workdir = Path(tempfile.mkdtemp(prefix="pg-soak-"))
    cluster = LocalCluster(workdir / "cluster", base_port=find_free_port_range(12))
    ports = [_free_port(), _free_port()]
    nodes: list[subprocess.Popen[bytes]] = []
    masters: list[redis.Redis] = []
    series: list[dict[str, float]] = []
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    loader = None
    extra_env = (
        {"GATEWAY_ACTIVITY_TIMEOUT": str(activity_timeout)} if activity_timeout is not None else {}
    )
    try:
        cluster.up()
        init_shards(load_topology(cluster.topology_path))
        for i, port in enumerate(ports):
            with (workdir / f"node-{i}.log").open("wb") as log:  # the node keeps its copy
                nodes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "gateway", "serve", "--topology",
                         str(cluster.topology_path), "--host", "127.0.0.1", "--port", str(port),
                         "--node-id", f"soak-{i}"],
                        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                        env={**os.environ, **LOOPBACK_LOAD_ENV, **extra_env},
                    )
                )  # fmt: skip
        for port in ports:
            _wait_port(port)
        masters = [redis.Redis.from_url(f"redis://{m.addr}") for m in cluster.masters()]
        loader = ctx.Process(target=load_main, args=(ports, duration, (joins, events, reads), out))
        start = time.monotonic()
        loader.start()
        next_at = start
        while loader.is_alive() and time.monotonic() - start < duration + 120:
            now = time.monotonic()
            if now >= next_at:
                series.append({"t": round(now - start, 1), **sample(nodes, masters)})
                next_at += sample_every
            loader.join(timeout=max(0.0, min(next_at - time.monotonic(), 1.0)))
        tally = out.get(timeout=60)
        for i, node in enumerate(nodes):
            if node.poll() is not None:
                tally["errors"].append(f"node {i} exited with {node.returncode}")
    finally:
        if loader is not None and loader.is_alive():
            loader.kill()
        for conn in masters:
            conn.close()
        for node in nodes:
            node.send_signal(signal.SIGINT)
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
        cluster.down()
        shutil.rmtree(workdir, ignore_errors=True)
    after = _steady(series, warmup, duration)
    slopes = {
        key: slope_pct_per_10_min([(s["t"], s[key]) for s in after])
        for key in series[0]
        if key != "t"
    }
    return {
        "duration_s": duration,
        "warmup_s": warmup,
        "sample_s": sample_every,
        "rates_per_s": {"joins": joins, "events": events, "reads": reads},
        "audience": AUDIENCE,
        "tally": tally,
        "slopes_pct_per_10_min": slopes,
        "series": series,
    }


def _steady(
    series: list[dict[str, float]], warmup: float, duration: float
) -> list[dict[str, float]]:
    """The samples taken after the warm-up and before the load stopped."""
    return [s for s in series if warmup <= s["t"] <= duration]


def report(figures: dict[str, Any]) -> str:
    """The soak's table: first and last sample after warm-up, slope, verdict per series."""
    after = _steady(figures["series"], figures["warmup_s"], figures["duration_s"])
    tally = figures["tally"]
    lines = [
        f"soak {figures['duration_s']:.0f} s at {figures['rates_per_s']}, "
        f"{len(figures['series'])} samples, warm-up {figures['warmup_s']:.0f} s",
        f"load: {tally['joins']} joins ({tally['join_failures']} failed), {tally['events']} "
        f"events ({tally['event_failures']} failed) -> {tally['deliveries']} deliveries "
        f"(expected {tally['events'] * AUDIENCE // CHANNELS}), {tally['reads']} reads "
        f"({tally['read_failures']} failed), {tally['skipped']} skipped, "
        f"{tally['audience_lost']} audience sockets lost",
        f"{'series':<20} {'after warm-up':>14} {'at the end':>14} {'slope %/10 min':>15}  verdict",
    ]
    for key, slope in figures["slopes_pct_per_10_min"].items():
        first = after[0][key] if after else float("nan")
        last = after[-1][key] if after else float("nan")
        if slope is None:
            verdict = "not enough samples"
        elif slope < TARGET_PCT_PER_10_MIN:
            verdict = "flat (target < 1 %)"
        else:
            verdict = "GROWS"
        shown = "-" if slope is None else f"{slope:+.2f}"
        lines.append(f"{key:<20} {first:>14,.0f} {last:>14,.0f} {shown:>15}  {verdict}")
    lines.extend(f"error: {e}" for e in tally["errors"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1200)
    parser.add_argument("--sample", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=180)
    parser.add_argument("--joins", type=float, default=40)
    parser.add_argument("--events", type=float, default=20)
    parser.add_argument("--reads", type=float, default=20)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    figures = run(
        duration=opts.duration,
        sample_every=opts.sample,
        warmup=opts.warmup,
        joins=opts.joins,
        events=opts.events,
        reads=opts.reads,
    )
    print(report(figures))
    if opts.json:
        opts.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
