"""Peer benchmark: presence-gateway vs sockudo (a Rust Pusher-protocol server), same clients.

Usage: python bench/bench_peer.py [--sockudo PATH] [--quick] [--json FILE] [--plot FILE.png]
                                  [--connections 2000] [--fanout-clients 200] [--events 1000]
                                  [--churn-clients 50] [--cycles 100] [--members 50]
                                  [--levels 1,4,16] [--requests 2000]
                                  [--locust churn,fanout,read] [--locust-users 40]
                                  [--locust-duration 20] [--ours-only]

The sockudo binary defaults to ``$SOCKUDO_BIN`` or ``.work/peers/sockudo/bin/sockudo``, where
``scripts/install-sockudo.sh`` (``make peer``) puts it; without a binary the peer is skipped.

Starts, on 127.0.0.1 only and on free ports, one side after the other:

* ours: the local Redis topology (``LocalCluster``: 2 shards, 1 replica each, 3 Sentinels) with
  ``init_shards``, and two gateway nodes (``python -m gateway serve``);
* the peer: one plain ``redis-server`` (``--save ''``, no AOF) and two sockudo nodes using it
  for their adapter and cache (``adapter.driver = "redis"``, ``fallback_to_local = false``,
  ``cache.driver = "redis"``, which sockudo requires when clustered), each started as
  ``sockudo --config FILE`` with a generated TOML file (HTTP/WebSocket and Prometheus metrics
  bound to 127.0.0.1, rate limiters off, one app ``1``/``app-key``/``app-secret`` allowing
  100 000 connections). sockudo silently falls back to its defaults when it cannot parse the
  file, so each node is checked to accept the app key before anything is measured. If the
  binary was built without sockudo's ``redis`` cargo feature, the nodes refuse that adapter;
  the peer then runs on its ``local`` adapter and the users figures come from ONE node,
  marked "not comparable".

and measures each side with the same client code (clients in their own process):

1. memory per idle connection: VmRSS (``/proc/<pid>/status``, the node's process tree) of node
   A before and after ``--connections`` idle Pusher connections, each subscribed to a public
   channel; (after - before) / N in KiB. "Held" = connections that got
   ``subscription_succeeded`` and then answered a ``pusher:ping``.
2. presence joins/s: ``bench_gateway``'s churn clients (subscribe with a valid presence
   signature -> ``subscription_succeeded`` -> unsubscribe) on node A.
3. fan-out deliveries/s: ``bench_gateway``'s fan-out clients on node A; events through the HTTP
   API ``batch_events`` (10 a request, signed like the official libraries).
4. ``GET /apps/1/channels/presence-users/users`` with two nodes: ``--members`` presence members,
   half on each node; signed GETs alternate between the nodes, at each concurrency level of
   ``--levels`` (``--requests`` requests per level, split over the requesters); p50/p99 ms,
   requests/s, and how many answers did not list exactly all members. Twice: keep-alive (the
   client reuses its connection unless the server answers ``Connection: close``, as sockudo
   does on every API response; then it reconnects, inside the measured time) and a new TCP
   connection per request on both sides.
5. the load-test scenarios of ``loadtests/`` (``--locust``), run by locust against both nodes:
   requests/s, p50/p99 ms and failures per request name.

Prints a table of both sides, the ratios and the targets (memory <= 1.5x the peer's, joins/s >=
the peer's, users p99 with two nodes <= the peer's at every level in both connection modes,
fan-out >= 0.5x the peer's), one table per load-test scenario, and plots latency (p50, p99)
against achieved requests/s to ``--plot`` (default bench/results/peer_latency.png). Every loop
is bounded by a count and a time limit; every process started here is stopped at the end, also
on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvloop
from websockets.asyncio.client import connect

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_gateway import (  # noqa: E402
    APP_ID,
    KEY,
    SECRET,
    TIME_LIMIT,
    HttpConn,
    _free_port,
    measure,
)

from gateway.localcluster import (  # noqa: E402
    LOOPBACK_LOAD_ENV,
    LocalCluster,
    find_free_port_range,
)
from gateway.protocol.auth import api_string_to_sign, sign  # noqa: E402
from gateway.shards.admin import init_shards  # noqa: E402
from gateway.shards.topology import load_topology  # noqa: E402

WS_PATH = f"/app/{KEY}?protocol=7&client=js&version=8.4.0"
USERS_CHANNEL = "presence-users"
DEFAULT_SOCKUDO = Path(
    os.environ.get("SOCKUDO_BIN", ROOT / ".work" / "peers" / "sockudo" / "bin" / "sockudo")
)
DEFAULT_PLOT = HERE / "results" / "peer_latency.png"
STOP_TIMEOUT = 20.0


# -- processes ------------------------------------------------------------------------------------


class Procs:
    """Processes started by this run; each one's output goes to a log file in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> int:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        log.close()
        self.procs.append((name, proc))
        return proc.pid

    def proc(self, name: str) -> subprocess.Popen[bytes]:
        return next(p for n, p in self.procs if n == name)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, name: str, port: int, timeout: float = 30.0) -> None:
        """Until ``port`` accepts; fail (with the log) if the process exits first."""
        proc = self.proc(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise NodeExited(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name}: nothing listens on {port} after {timeout} s")

    def stop_all(self) -> None:
        """SIGINT every process, wait, SIGKILL what is left (by pid, only ours)."""
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for _, proc in self.procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()


class NodeExited(RuntimeError):
    """A server process exited while we waited for it to listen."""


def _rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and its descendants, in KiB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


# -- the two sides --------------------------------------------------------------------------------


class Side:
    """Nodes of one server (two unless asked otherwise), reachable on 127.0.0.1 ports
    ``ports[0]``, ``ports[1]``; node A (``ports[0]``) is process ``pid_a``."""

    name = ""
    ports: tuple[int, ...]
    pid_a: int
    procs: Procs
    note = ""
    two_nodes = True

    def up(self) -> None:
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError


class Ours(Side):
    name = "ours"

    def __init__(
        self, workdir: Path, procs: Procs, nodes: int = 2, env: dict[str, str] | None = None
    ) -> None:
        """``env``: ``GATEWAY_*`` settings for the nodes, over ``LOOPBACK_LOAD_ENV``."""
        self.cluster = LocalCluster(workdir / "cluster", base_port=find_free_port_range(12))
        self.procs = procs
        self.env = {**LOOPBACK_LOAD_ENV, **(env or {})}
        self.labels = "ab"[:nodes]
        self.two_nodes = nodes == 2

    def up(self) -> None:
        self.cluster.up()
        init_shards(load_topology(self.cluster.topology_path))
        ports = tuple(_free_port() for _ in self.labels)
        pids = []
        for label, port in zip(self.labels, ports, strict=True):
            args = [sys.executable, "-m", "gateway", "serve",
                    "--topology", str(self.cluster.topology_path), "--host", "127.0.0.1",
                    "--port", str(port), "--node-id", f"bench-{label}",
                    "--app", f"{APP_ID}:{KEY}:{SECRET}"]  # fmt: skip
            pids.append(self.procs.start(f"gateway-{label}", args, self.env))
        for label, port in zip(self.labels, ports, strict=True):
            self.procs.wait_ready(f"gateway-{label}", port)
            _wait_health(f"http://127.0.0.1:{port}/health")
        self.ports, self.pid_a = ports, pids[0]

    def down(self) -> None:
        self.procs.stop_all()
        self.cluster.down()


def sockudo_toml(port: int, metrics_port: int, redis_port: int, adapter: str) -> str:
    """The sockudo config file of one node (loopback only, no rate limits, app 1)."""
    # Clustered sockudo refuses a node-local cache.
    cache = "redis" if adapter == "redis" else "memory"
    return f"""\
host = "127.0.0.1"
port = {port}
debug = false

[app_manager]
driver = "memory"

[[app_manager.array.apps]]
id = "{APP_ID}"
key = "{KEY}"
secret = "{SECRET}"
enabled = true
enable_client_messages = false
max_connections = 100000
max_client_events_per_second = 1000
max_presence_members_per_channel = 1000

[adapter]
driver = "{adapter}"
fallback_to_local = false

[adapter.redis]
prefix = "pgbench_adapter:"
requests_timeout = 5000

[database.redis]
host = "127.0.0.1"
port = {redis_port}

[cache]
driver = "{cache}"

[queue]
driver = "memory"

[rate_limiter]
enabled = false

[presence]
max_members_per_channel = 1000

[metrics]
enabled = true
host = "127.0.0.1"
port = {metrics_port}
"""


class Sockudo(Side):
    name = "sockudo"

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        procs: Procs,
        nodes: int = 2,
        adapter: str | None = None,
    ) -> None:
        """``adapter``: ``"redis"`` or ``"local"``; None = redis, or local if the binary has no
        redis feature (with a note)."""
        self.binary = binary
        self.workdir = workdir
        self.procs = procs
        self.redis_port = 0
        self.labels = "ab"[:nodes]
        self.two_nodes = nodes == 2
        self.adapter = adapter

    def up(self) -> None:
        self.redis_port = _free_port()
        self.procs.start(
            "sockudo-redis",
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port),
             "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
        )  # fmt: skip
        self.procs.wait_ready("sockudo-redis", self.redis_port)
        if self.adapter is not None:
            self._nodes(self.adapter)
            return
        try:
            self._nodes("redis")
        except NodeExited as exc:
            if "not compiled in" not in str(exc):
                raise
            # crates.io's default build has no redis feature: keep our nodes honest (local
            # adapter, no cross-node state) and say so instead of silently comparing.
            self.note = (
                "sockudo binary built without the 'redis' cargo feature: ran on its local "
                "adapter; users latency measured on ONE node (not comparable)"
            )
            self.two_nodes = False
            for label in self.labels:
                proc = self.procs.proc(f"sockudo-{label}")
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=STOP_TIMEOUT)
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(timeout=10)
            self.procs.procs = [(n, p) for n, p in self.procs.procs if n == "sockudo-redis"]
            self._nodes("local")

    def _nodes(self, adapter: str) -> None:
        ports = tuple(_free_port() for _ in self.labels)
        pids = []
        for label, port in zip(self.labels, ports, strict=True):
            metrics_port = _free_port()
            config = self.workdir / f"sockudo-{label}.toml"
            config.write_text(sockudo_toml(port, metrics_port, self.redis_port, adapter))
            env = {
                "HOST": "127.0.0.1",
                "PORT": str(port),
                "METRICS_HOST": "127.0.0.1",
                "METRICS_PORT": str(metrics_port),
                "ADAPTER_DRIVER": adapter,
                "CACHE_DRIVER": "redis" if adapter == "redis" else "memory",
                "RATE_LIMITER_ENABLED": "false",
                "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "INSTANCE_PROCESS_ID": f"bench-{label}",
                "RUST_LOG": "warn",
            }
            pids.append(
                self.procs.start(
                    f"sockudo-{label}", [str(self.binary), "--config", str(config)], env
                )
            )
        for label, port in zip(self.labels, ports, strict=True):
            self.procs.wait_ready(f"sockudo-{label}", port)
        self.ports, self.pid_a = ports, pids[0]
        # A crash shortly after binding (e.g. the adapter failing) shows up here.
        time.sleep(1.0)
        for label, port in zip(self.labels, ports, strict=True):
            proc = self.procs.proc(f"sockudo-{label}")
            if proc.poll() is not None:
                raise NodeExited(
                    f"sockudo-{label} exited:\n{self.procs.log_tail(f'sockudo-{label}')}"
                )
            # sockudo falls back to its defaults, silently, when it cannot parse the config
            # file (app unknown -> every socket closed): prove the app is there.
            try:
                uvloop.run(_established(port))
            except Exception as exc:
                raise RuntimeError(
                    f"sockudo-{label} does not accept app key {KEY!r} ({exc!r}); was "
                    f"{self.workdir / f'sockudo-{label}.toml'} applied?\n"
                    f"{self.procs.log_tail(f'sockudo-{label}')}"
                ) from exc

    def down(self) -> None:
        self.procs.stop_all()


def _wait_health(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not 200 within {timeout} s")


# -- clients (their own process) ------------------------------------------------------------------


def _client_proc(kind: str, args: dict[str, Any], out: Any, cmd: Any) -> None:
    """Run one client scenario (``idle`` or ``users``) and report through ``out``."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fn = _idle if kind == "idle" else _users
    try:
        uvloop.run(asyncio.wait_for(fn(out=out, cmd=cmd, **args), TIME_LIMIT * 2))
    except BaseException as exc:  # reported to the parent, which raises it
        out.put({"error": repr(exc)})


async def _pusher_socket(port: int) -> tuple[Any, str]:
    ws = await connect(
        f"ws://127.0.0.1:{port}{WS_PATH}", compression=None, max_queue=None, open_timeout=10
    )
    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
    if frame.get("event") != "pusher:connection_established":
        raise RuntimeError(f"unexpected first frame {frame}")
    return ws, json.loads(frame["data"])["socket_id"]


async def _established(port: int) -> None:
    ws, _ = await _pusher_socket(port)
    await ws.close()


async def _subscribe(ws: Any, channel: str, auth: str = "", channel_data: str = "") -> None:
    data: dict[str, str] = {"channel": channel}
    if auth:
        data["auth"] = auth
    if channel_data:
        data["channel_data"] = channel_data
    await ws.send(json.dumps({"event": "pusher:subscribe", "data": data}))
    async with asyncio.timeout(10):
        while True:
            frame = json.loads(await ws.recv())
            event = frame.get("event")
            if event == "pusher_internal:subscription_succeeded":
                return
            if event in ("pusher:error", "pusher:subscription_error"):
                raise RuntimeError(frame)


async def _idle(*, port: int, connections: int, out: Any, cmd: Any) -> None:
    """Open idle subscribed sockets, check them with a ping, hold them until told to close."""
    sockets: list[Any] = []
    gate = asyncio.Semaphore(50)

    async def one(i: int) -> None:
        async with gate:
            try:
                ws, _ = await _pusher_socket(port)
            except Exception:
                return
            sockets.append(ws)
            with contextlib.suppress(Exception):
                await _subscribe(ws, f"idle-{i % 20}")
                ws.subscribed = True

    async def answers(ws: Any) -> bool:
        if not getattr(ws, "subscribed", False):
            return False
        try:
            await ws.send('{"event":"pusher:ping","data":{}}')
            async with asyncio.timeout(10):
                while True:
                    if json.loads(await ws.recv()).get("event") == "pusher:pong":
                        return True
        except Exception:
            return False

    try:
        await asyncio.gather(*(one(i) for i in range(connections)))
        held = sum(await asyncio.gather(*(answers(ws) for ws in sockets)))
        out.put({"held": held, "opened": len(sockets)})
        loop = asyncio.get_running_loop()
        with contextlib.suppress(queue.Empty):
            await loop.run_in_executor(None, lambda: cmd.get(timeout=TIME_LIMIT))
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    out.put({"closed": len(sockets)})


def _signed_get(path: str) -> str:
    """Path + query of a GET signed like the node library (no body_md5 on an empty body)."""
    params = {"auth_key": KEY, "auth_timestamp": str(int(time.time())), "auth_version": "1.0"}
    params["auth_signature"] = sign(SECRET, api_string_to_sign("GET", path, params))
    return path + "?" + "&".join(f"{k}={v}" for k, v in params.items())


async def _users(
    *,
    ports: list[int],
    members: int,
    levels: list[int],
    requests: int,
    out: Any,
    cmd: Any,
    modes: tuple[bool, ...] = (False, True),
) -> None:
    """Presence members on both nodes, then signed GET users alternating between the nodes."""
    path = f"/apps/{APP_ID}/channels/{USERS_CHANNEL}/users"
    expected = {f"user-{i}" for i in range(members)}
    sockets: list[Any] = []

    async def member(i: int) -> None:
        ws, socket_id = await _pusher_socket(ports[i % len(ports)])
        sockets.append(ws)
        data = json.dumps({"user_id": f"user-{i}", "user_info": {"n": i}})
        auth = f"{KEY}:{sign(SECRET, f'{socket_id}:{USERS_CHANNEL}:{data}')}"
        await _subscribe(ws, USERS_CHANNEL, auth, data)

    async def drain(ws: Any) -> None:
        with contextlib.suppress(Exception):
            async for _ in ws:
                pass

    drains: list[asyncio.Task[None]] = []
    conns: list[HttpConn] = []
    try:
        for start in range(0, members, 25):
            await asyncio.gather(*(member(i) for i in range(start, min(members, start + 25))))
        drains = [asyncio.create_task(drain(ws)) for ws in sockets]

        async def answer_ok(conn: HttpConn, fresh: bool = False) -> tuple[bool, float]:
            begin = time.perf_counter()
            status, body = await conn.request(f"GET {_signed_get(path)} HTTP/1.1\r\n".encode())
            elapsed = time.perf_counter() - begin
            if fresh:
                conn.close()
            ok = status == 200 and {u["id"] for u in json.loads(body)["users"]} == expected
            return ok, elapsed

        # Until every node lists every member (bounded): the cluster has settled.
        settle_start = time.perf_counter()
        for port in ports:
            conn = HttpConn(port)
            conns.append(conn)
            for _ in range(200):
                if (await answer_ok(conn))[0]:
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"node on {port} never listed all {members} members")
        settle = time.perf_counter() - settle_start

        results = []
        for fresh, level in [(f, lv) for f in modes for lv in levels]:
            per_worker = max(1, requests // level)
            latencies: list[float] = []
            oks: list[bool] = []
            barrier = asyncio.Barrier(level + 1)

            async def worker(
                w: int,
                barrier: asyncio.Barrier,
                count: int,
                lat: list[float],
                oks: list[bool],
                fresh: bool,
                streams: list[HttpConn],
            ) -> None:
                for _ in range(2):  # warm-up, twice per node
                    for conn in streams:
                        await answer_ok(conn, fresh)
                await barrier.wait()
                for conn in streams:
                    conn.reconnects = 0
                for n in range(count):
                    ok, elapsed = await answer_ok(streams[(w + n) % len(streams)], fresh)
                    lat.append(elapsed)
                    oks.append(ok)

            streams = [[HttpConn(p) for p in ports] for _ in range(level)]
            conns.extend(c for worker_streams in streams for c in worker_streams)
            tasks = [
                asyncio.create_task(
                    worker(w, barrier, per_worker, latencies, oks, fresh, streams[w])
                )
                for w in range(level)
            ]
            await barrier.wait()
            begin = time.perf_counter()
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - begin
            wrong = oks.count(False)
            latencies.sort()
            results.append(
                {
                    "concurrency": level,
                    "fresh_connections": fresh,
                    "connects_per_request": sum(
                        c.reconnects for worker_streams in streams for c in worker_streams
                    )
                    / len(latencies),
                    "requests": len(latencies),
                    "p50_ms": 1000 * statistics.median(latencies),
                    "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                    "rps": len(latencies) / wall,
                    "wrong_answers": wrong,
                }
            )
        out.put({"levels": results, "settle_s": settle})
    finally:
        for task in drains:
            task.cancel()
        for conn in conns:
            conn.close()
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


@contextlib.contextmanager
def _client(kind: str, **args: Any) -> Iterator[tuple[Any, Any]]:
    ctx = mp.get_context("spawn")
    out, cmd = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_client_proc, args=(kind, args, out, cmd))
    proc.start()
    try:
        yield out, cmd
    finally:
        cmd.put("stop")
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)


def _get(out: Any, timeout: float) -> dict[str, Any]:
    reply = dict(out.get(timeout=timeout))
    if "error" in reply:
        raise RuntimeError(f"client process failed: {reply['error']}")
    return reply


# -- scenarios ------------------------------------------------------------------------------------


def idle_memory(side: Side, connections: int) -> dict[str, Any]:
    """KiB of node A's RSS per idle subscribed connection."""
    port = side.ports[0]
    with _client("idle", port=port, connections=20) as (out, cmd):  # warm-up
        _get(out, TIME_LIMIT + 30)
        cmd.put("close")
        _get(out, 60)
    time.sleep(1.0)
    before = _rss_kib(side.pid_a)
    with _client("idle", port=port, connections=connections) as (out, cmd):
        held = _get(out, 2 * TIME_LIMIT)
        time.sleep(2.0)  # let the node settle (buffers, lazily grown tables)
        after = _rss_kib(side.pid_a)
        cmd.put("close")
        _get(out, 60)
    return {
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": (after - before) / connections,
        "held": held["held"],
        "connections": connections,
    }


def users_latency(
    side: Side,
    members: int,
    levels: list[int],
    requests: int,
    modes: tuple[bool, ...] = (False, True),
) -> dict[str, Any]:
    """GET users latency; ``modes``: False = keep-alive client, True = new connection each."""
    ports = list(side.ports if side.two_nodes else side.ports[:1])
    args = dict(ports=ports, members=members, levels=levels, requests=requests, modes=modes)
    with _client("users", **args) as (out, _):
        return _get(out, 2 * TIME_LIMIT + 30)


def locust_scenarios(side: Side, opts: argparse.Namespace) -> dict[str, Any]:
    """The load-test scenarios (loadtests/) against both nodes of ``side``; CSVs are kept in
    ``bench/results/locust-<side>/``."""
    from loadtests.run import run_locust

    out = opts.locust_out / f"locust-{side.name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ports = side.ports if side.two_nodes else side.ports[:1]
    hosts = [f"http://127.0.0.1:{port}" for port in ports]
    results: dict[str, Any] = {}
    for scenario in opts.locust:
        print(f"  [{side.name}] locust {scenario} ...", flush=True)
        summary = run_locust(
            scenario, hosts, opts.locust_users, opts.locust_users / 2, opts.locust_duration, out
        )
        results[scenario] = {
            "rows": [dataclasses.asdict(row) for row in summary.rows],
            "total": dataclasses.asdict(summary.total) if summary.total else None,
            "counters": summary.counters,
            "exceptions": summary.exceptions,
        }
    return results


def run_side(side: Side, opts: argparse.Namespace) -> dict[str, Any]:
    try:
        side.up()
        fig: dict[str, Any] = {"nodes": 2 if side.two_nodes else 1, "note": side.note}
        print(f"  [{side.name}] idle memory ...", flush=True)
        fig["memory"] = idle_memory(side, opts.connections)
        print(f"  [{side.name}] presence churn ...", flush=True)
        c = measure("churn", "gateway", side.ports[0], clients=opts.churn_clients,
                    cycles=opts.cycles)  # fmt: skip
        fig["joins_per_s"] = c["joins_and_leaves"] / 2 / c["seconds"]
        print(f"  [{side.name}] fan-out ...", flush=True)
        f = measure("fanout", "gateway", side.ports[0], clients=opts.fanout_clients,
                    events=opts.events)  # fmt: skip
        fig["fanout_per_s"] = f["deliveries"] / f["seconds"]
        print(f"  [{side.name}] users latency ...", flush=True)
        fig["users"] = users_latency(side, opts.members, opts.levels, opts.requests)
        fig["locust"] = locust_scenarios(side, opts)
        return fig
    except Exception:
        # What the servers said is usually the explanation: show it before it is deleted.
        for name, _ in side.procs.procs:
            print(f"--- last lines of {name}.log ---\n{side.procs.log_tail(name)}", flush=True)
        raise
    finally:
        side.down()


# -- report ---------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def report(
    ours: dict[str, Any], peer: dict[str, Any] | None, opts: argparse.Namespace
) -> dict[str, bool | None]:
    rows: list[tuple[str, str, str, str, str]] = []
    targets: dict[str, bool | None] = {}
    om = ours["memory"]
    pm = peer["memory"] if peer else None

    def mark(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "MISSED")

    def target_row(
        label: str, mine: float, theirs: float | None, fmt: str, at_most: bool, factor: float
    ) -> bool | None:
        """Add the row of a target 'ours <= factor x peer' (at_most) or 'ours >= factor x peer'."""
        ok = None
        if theirs is not None:
            ok = mine <= factor * theirs if at_most else mine >= factor * theirs
        rows.append((
            label, format(mine, fmt), "-" if theirs is None else format(theirs, fmt),
            "-" if theirs is None else f"{_ratio(mine, theirs):.2f}",
            f"{'<=' if at_most else '>='} {factor:g}x: {mark(ok)}",
        ))  # fmt: skip
        return ok

    targets["memory"] = target_row(
        f"KiB per idle connection (N={opts.connections})", om["kib_per_connection"],
        pm["kib_per_connection"] if pm else None, ".1f", at_most=True, factor=1.5,
    )  # fmt: skip
    rows.append((
        "  connections held / RSS before -> after (MiB)",
        f"{om['held']} / {om['rss_before_kib'] / 1024:.0f} -> {om['rss_after_kib'] / 1024:.0f}",
        f"{pm['held']} / {pm['rss_before_kib'] / 1024:.0f} -> {pm['rss_after_kib'] / 1024:.0f}"
        if pm else "-", "", "",
    ))  # fmt: skip
    targets["joins"] = target_row(
        f"presence joins/s ({opts.churn_clients} clients x {opts.cycles})", ours["joins_per_s"],
        peer["joins_per_s"] if peer else None, ",.0f", at_most=False, factor=1,
    )  # fmt: skip
    targets["fanout"] = target_row(
        f"fan-out deliveries/s ({opts.fanout_clients} x {opts.events})", ours["fanout_per_s"],
        peer["fanout_per_s"] if peer else None, ",.0f", at_most=False, factor=0.5,
    )  # fmt: skip
    comparable = bool(peer and peer["nodes"] == 2)
    all_ok = True
    for i, lo in enumerate(ours["users"]["levels"]):
        lp = peer["users"]["levels"][i] if peer else None
        ok = lo["p99_ms"] <= lp["p99_ms"] if lp and comparable else None
        all_ok = all_ok and bool(ok)
        wrong = f", {lo['wrong_answers']} wrong" if lo["wrong_answers"] else ""
        pwrong = f", {lp['wrong_answers']} wrong" if lp and lp["wrong_answers"] else ""
        mode = "new conn each" if lo["fresh_connections"] else "keep-alive"
        conn = (
            f" [{lp['connects_per_request']:.2f} connects/req]"
            if lp and lp["connects_per_request"] > 0.01 and not lo["fresh_connections"]
            else ""
        )
        rows.append((
            f"users {mode} c={lo['concurrency']}: p50 / p99 ms, req/s",
            f"{lo['p50_ms']:.2f} / {lo['p99_ms']:.2f}, {lo['rps']:,.0f}{wrong}",
            (f"{lp['p50_ms']:.2f} / {lp['p99_ms']:.2f}, {lp['rps']:,.0f}{pwrong}{conn}"
             + ("" if comparable else " (1 node)")) if lp else "-",
            f"p99 {_ratio(lo['p99_ms'], lp['p99_ms']):.2f}" if lp else "-",
            f"p99 <= 1x: {mark(ok)}",
        ))  # fmt: skip
    targets["users_p99"] = all_ok if comparable else None
    head = ("measure", "ours", "sockudo", "ours/peer", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    line = " | ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format(*head))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
    print(
        f"users: {opts.members} presence members, half on each node, signed GETs alternating "
        f"between the two nodes, {opts.requests} requests per level; 'wrong' = answers that "
        "did not list exactly all members. keep-alive = the client reuses its connection "
        "unless the server answers 'Connection: close' (then it reconnects, counted in the "
        "latency and shown as connects/req); new conn each = both sides get a new TCP "
        "connection per request. The p99 target counts as met only if met in both modes."
    )
    if peer and peer.get("note"):
        print(f"NOTE: {peer['note']}")
    return targets


def report_locust(
    ours: dict[str, Any], peer: dict[str, Any] | None, opts: argparse.Namespace
) -> None:
    """One table per load-test scenario: each request name's req/s, p50/p99 ms, failures."""
    for scenario in opts.locust:
        mine = ours.get("locust", {}).get(scenario)
        theirs = (peer or {}).get("locust", {}).get(scenario)
        if mine is None:
            continue
        print(
            f"\nlocust {scenario}: {opts.locust_users} users for {opts.locust_duration} s on both "
            "nodes (req/s, p50 / p99 ms, failures; locust rounds percentiles)"
        )
        names = [r["name"] for r in mine["rows"]]
        if theirs:
            names += [r["name"] for r in theirs["rows"] if r["name"] not in names]

        def cell(side: dict[str, Any] | None, name: str) -> str:
            row = next((r for r in side["rows"] if r["name"] == name), None) if side else None
            if row is None:
                return "-"
            fails = f", {row['failures']} failed" if row["failures"] else ""
            return f"{row['rps']:,.1f}/s, {row['p50']:.0f} / {row['p99']:.0f}{fails}"

        width = max(len(n) for n in names) if names else 10
        print(f"  {'request':<{width}} | {'ours':<32} | sockudo")
        for name in names:
            print(f"  {name:<{width}} | {cell(mine, name):<32} | {cell(theirs, name)}")
        for label, side in (("ours", mine), ("sockudo", theirs)):
            counters = side.get("counters", {}) if side else {}
            if counters.get("fanout_expected"):
                share = 100 * counters.get("fanout_received", 0) / counters["fanout_expected"]
                print(f"  {label}: fan-out delivered {share:.1f} % of expected deliveries")


def plot(ours: dict[str, Any], peer: dict[str, Any] | None, path: Path) -> None:
    """Latency (p50, p99) against achieved GET users requests/s, one panel per connection mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    sides = [("presence-gateway", ours, "tab:blue")]
    if peer:
        label = "sockudo" + ("" if peer["nodes"] == 2 else " (1 node)")
        sides.append((label, peer, "tab:orange"))
    titles = ("keep-alive client (sockudo closes: reconnect per request)",
              "new TCP connection per request, both sides")  # fmt: skip
    for ax, fresh, title in zip(axes, (False, True), titles, strict=True):
        for label, fig_side, color in sides:
            levels = [lv for lv in fig_side["users"]["levels"] if lv["fresh_connections"] == fresh]
            rps = [lv["rps"] for lv in levels]
            ax.plot(rps, [lv["p50_ms"] for lv in levels], "o-", color=color, label=f"{label} p50")
            ax.plot(rps, [lv["p99_ms"] for lv in levels], "s--", color=color, label=f"{label} p99")
            for lv in levels:
                ax.annotate(f"c={lv['concurrency']}", (lv["rps"], lv["p99_ms"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)  # fmt: skip
        ax.set_xlabel("achieved load (GET users requests/s)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("latency (ms)")
    fig.suptitle("GET /apps/{id}/channels/{presence}/users, members on two nodes, alternating")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: Options recorded in the JSON file (the report needs them to label its rows).
SETTINGS = ("connections", "fanout_clients", "events", "churn_clients", "cycles", "members",
            "levels", "requests", "locust", "locust_users", "locust_duration")  # fmt: skip


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockudo", type=Path, default=DEFAULT_SOCKUDO, help="sockudo binary")
    parser.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--connections", type=int)
    parser.add_argument("--fanout-clients", type=int)
    parser.add_argument("--events", type=int)
    parser.add_argument("--churn-clients", type=int)
    parser.add_argument("--cycles", type=int)
    parser.add_argument("--members", type=int)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests", type=int, help="GET users requests per level")
    parser.add_argument("--ours-only", action="store_true", help="skip the peer")
    parser.add_argument(
        "--from-json", type=Path, help="print the report and plot of an earlier --json file"
    )
    parser.add_argument(
        "--locust",
        default="churn,fanout,read",
        help="load-test scenarios to run on both sides ('' for none)",
    )
    parser.add_argument("--locust-users", type=int)
    parser.add_argument("--locust-duration", type=int, help="seconds per scenario")
    parser.add_argument("--locust-out", type=Path, default=HERE / "results")
    opts = parser.parse_args()
    defaults = (
        dict(connections=500, fanout_clients=50, events=200, churn_clients=20, cycles=20,
             members=20, requests=100, locust_users=20, locust_duration=8)
        if opts.quick
        else dict(connections=2000, fanout_clients=200, events=1000, churn_clients=50,
                  cycles=100, members=50, requests=2000, locust_users=40, locust_duration=20)
    )  # fmt: skip
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.levels = [int(x) for x in opts.levels.split(",")]
    opts.locust = [x for x in opts.locust.split(",") if x]
    if opts.from_json:
        saved = json.loads(opts.from_json.read_text())
        for key, value in saved["settings"].items():
            setattr(opts, key, value)
        report(saved["ours"], saved["sockudo"], opts)
        report_locust(saved["ours"], saved["sockudo"], opts)
        plot(saved["ours"], saved["sockudo"], opts.plot)
        print(f"plot: {opts.plot}")
        return 0
    if not shutil.which("redis-server"):
        print("redis-server is required", file=sys.stderr)
        return 2
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers

    workdir = Path(tempfile.mkdtemp(prefix="pg-bench-peer-"))
    procs = Procs(workdir)
    peer: dict[str, Any] | None = None
    try:
        print("== presence-gateway ==", flush=True)
        ours = run_side(Ours(workdir, procs), opts)
        if opts.ours_only:
            print("peer skipped (--ours-only)")
        elif not (opts.sockudo.is_file() and os.access(opts.sockudo, os.X_OK)):
            print(f"peer skipped: no sockudo binary at {opts.sockudo}")
        else:
            print(f"== sockudo ({opts.sockudo}) ==", flush=True)
            peer = run_side(Sockudo(opts.sockudo, workdir, procs), opts)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    targets = report(ours, peer, opts)
    report_locust(ours, peer, opts)
    plot(ours, peer, opts.plot)
    print(f"plot: {opts.plot}")
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(
            json.dumps(
                {
                    "ours": ours,
                    "sockudo": peer,
                    "targets": targets,
                    "settings": {key: getattr(opts, key) for key in SETTINGS},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
