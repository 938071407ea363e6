"""Presence joins+leaves per second on ONE node; ours vs sockudo (local and Redis adapters).

Usage: python bench/bench_joins.py [--clients 100] [--channels 20] [--procs 2]
                                   [--seconds 10] [--rounds 2] [--quick]
                                   [--sides ours,sockudo-local,sockudo-redis] [--skip-peer]
                                   [--sockudo PATH] [--json FILE] [--from-json FILE]

Starts, on 127.0.0.1 only and one side after the other, ONE node of each side of
``bench_capacity`` (ours on the local topology: 2 shards with a replica each, 3 Sentinels;
sockudo on its ``local`` adapter; sockudo on its ``redis`` adapter with its own
``redis-server``). ``--clients`` sockets (in ``--procs`` processes, spread over ``--channels``
presence channels, so each join and leave is announced to the channel's other members) loop:
``pusher:subscribe`` with a valid signature for their socket id → wait for
``subscription_succeeded`` → ``pusher:unsubscribe`` and the next subscribe, sent together (the
server handles a socket's frames in order, so the next ``subscription_succeeded`` follows the
leave). After a 2 s warm-up, for ``--seconds``: joins+leaves completed per second, the node's
CPU time per join+leave (``/proc/<pid>/stat``, all threads), the Redis servers' (ours: the
shard masters, ``INFO cpu``) and the client processes'. Each side runs ``--rounds`` times,
the sides alternating, and the best round of each is reported (the machine is shared: the
best round is the one least disturbed).

The clients speak WebSocket with a few lines of framing (``bench_storm``'s), not a client
library, so that they cost less than the servers and the rate measures the servers. Every
loop is bounded by a count and a time limit; every process started here is stopped at the
end, also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_capacity import Workers, _cpu_seconds, client_process  # noqa: E402
from bench_gateway import KEY, SECRET  # noqa: E402
from bench_peer import DEFAULT_SOCKUDO, WS_PATH, Ours, Procs, Side, Sockudo  # noqa: E402
from bench_storm import _REQUEST, PONG_FRAME, _frame, server_frames  # noqa: E402

from gateway.protocol.auth import sign  # noqa: E402

SIDES = ("ours", "sockudo-local", "sockudo-redis")
WARMUP = 2.0
CLIENT_LIMIT = 300.0


# -- clients (their own processes) -------------------------------------------------------------


class Churner(asyncio.Protocol):
    """One socket joining and leaving presence channel ``channel`` as user ``user``."""

    def __init__(self, port: int, channel: str, user: str, counts: dict[str, int]) -> None:
        self.port, self.channel, self.user, self.counts = port, channel, user, counts
        self.transport: Any = None
        self.buf = b""
        self.upgraded = False
        self.unsub = _frame(
            1, json.dumps({"event": "pusher:unsubscribe", "data": {"channel": channel}}).encode()
        )
        self.sub = b""
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(_REQUEST.format(path=WS_PATH, port=self.port).encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.counts["errors"] += 1
                self.transport.abort()
                return
            self.upgraded = True
            buf = buf[end + 4 :]
        frames, self.buf = server_frames(buf)
        for _fin, opcode, payload in frames:
            if opcode == 1:
                self._text(payload)
            elif opcode == 8:
                self.counts["errors"] += 1

    def _text(self, payload: bytes) -> None:
        if b"subscription_succeeded" in payload:
            self.counts["joins"] += 1
            self.transport.write(self.unsub + self.sub)
        elif b"connection_established" in payload:
            socket_id = json.loads(json.loads(payload)["data"])["socket_id"]
            data = json.dumps({"user_id": self.user, "user_info": {"name": self.user}})
            auth = f"{KEY}:{sign(SECRET, f'{socket_id}:{self.channel}:{data}')}"
            frame = {"channel": self.channel, "auth": auth, "channel_data": data}
            self.sub = _frame(1, json.dumps({"event": "pusher:subscribe", "data": frame}).encode())
            self.transport.write(self.sub)
        elif b"pusher:ping" in payload:
            self.transport.write(PONG_FRAME)
        elif b"error" in payload:
            self.counts["errors"] += 1


async def _churn(
    k: int, port: int, users: list[int], channels: int, seconds: float, out: Any, cmd: Any
) -> None:
    loop = asyncio.get_running_loop()
    counts = {"joins": 0, "errors": 0}
    socks = []
    for i in users:
        factory = functools.partial(
            Churner, port, f"presence-joins-{i % channels}", f"u{i}", counts
        )
        _t, proto = await loop.create_connection(factory, "127.0.0.1", port)
        socks.append(proto)
    await asyncio.sleep(WARMUP)
    j0, t0 = counts["joins"], time.monotonic()
    out.put({"proc": k, "kind": "started"})
    await asyncio.sleep(seconds)
    out.put({
        "proc": k, "kind": "done", "joins": counts["joins"] - j0,
        "seconds": time.monotonic() - t0, "errors": counts["errors"],
    })  # fmt: skip
    for s in socks:
        s.transport.abort()


def _client_main(k: int, args: dict[str, Any], out: Any, cmd: Any) -> None:
    """Entry point of client process ``k``."""
    client_process(_churn, k, args, out, cmd, CLIENT_LIMIT)


# -- one side ----------------------------------------------------------------------------------


def _redis_cpu(clients: list[redis.Redis]) -> float:
    infos = [c.info("cpu") for c in clients]
    return sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"]) for i in infos)


def run_side(name: str, opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One node of side ``name``; the churn figures."""
    procs = Procs(workdir)
    side: Side = (
        Ours(workdir, procs, nodes=1)
        if name == "ours"
        else Sockudo(opts.sockudo, workdir, procs, nodes=1, adapter=name.split("-")[1])
    )
    side.name = name
    try:
        side.up()
        if isinstance(side, Ours):
            rc = [redis.Redis.from_url(f"redis://{m.addr}") for m in side.cluster.masters()]
        elif isinstance(side, Sockudo) and name == "sockudo-redis":
            rc = [redis.Redis(host="127.0.0.1", port=side.redis_port)]
        else:
            rc = []
        workers = Workers(
            _client_main,
            [{"port": side.ports[0], "users": list(range(opts.clients))[k :: opts.procs],
              "channels": opts.channels, "seconds": opts.seconds} for k in range(opts.procs)],
        )  # fmt: skip
        try:
            workers.collect("started", 60)
            node0, redis0, clients0 = (
                _cpu_seconds(side.pid_a),
                _redis_cpu(rc),
                workers.cpu_seconds(),
            )
            done = workers.collect("done", opts.seconds + 60)
            node1, redis1, clients1 = (
                _cpu_seconds(side.pid_a),
                _redis_cpu(rc),
                workers.cpu_seconds(),
            )
        finally:
            for proc in workers.procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
        ops = 2 * sum(m["joins"] for m in done)
        seconds = max(m["seconds"] for m in done)
        return {
            "side": name,
            "ops_per_s": ops / seconds,
            "ops": ops,
            "errors": sum(m["errors"] for m in done),
            "node_us_per_op": 1e6 * (node1 - node0) / ops if ops else None,
            "redis_us_per_op": 1e6 * (redis1 - redis0) / ops if ops and rc else None,
            "clients_us_per_op": 1e6 * (clients1 - clients0) / ops if ops else None,
        }
    finally:
        side.down()


def report(results: dict[str, list[dict[str, Any]]]) -> str:
    """The best round of each side and the ratios ours / peer."""
    best = {n: max(rs, key=lambda r: r["ops_per_s"]) for n, rs in results.items() if rs}
    lines = [
        "| side | joins+leaves/s (rounds) | node µs / op | Redis µs / op | clients µs / op |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in best.items():
        rounds = ", ".join(f"{x['ops_per_s']:,.0f}" for x in results[name])

        def us(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f}"

        lines.append(
            f"| {name} | **{r['ops_per_s']:,.0f}** ({rounds}) | {us(r['node_us_per_op'])} | "
            f"{us(r['redis_us_per_op'])} | {us(r['clients_us_per_op'])} |"
        )
    ours = best.get("ours")
    for name, r in best.items():
        if ours is not None and name != "ours":
            lines.append(
                f"ours / {name}: joins+leaves/s {ours['ops_per_s'] / r['ops_per_s']:.2f}, "
                f"node CPU per op {ours['node_us_per_op'] / r['node_us_per_op']:.2f}"
            )
    errors = {n: sum(x["errors"] for x in rs) for n, rs in results.items()}
    if any(errors.values()):
        lines.append(f"errors: {errors}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one round of 4 s")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--sockudo", type=Path, default=DEFAULT_SOCKUDO)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path)
    opts = parser.parse_args()
    if opts.from_json:
        print(report(json.loads(opts.from_json.read_text())["sides"]))
        return 0
    if opts.quick:
        opts.rounds, opts.seconds = 1, 4.0
    sides = [s for s in opts.sides.split(",") if s]
    if opts.skip_peer or not opts.sockudo.exists():
        sides = [s for s in sides if s == "ours"]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    failed = False
    for _round in range(opts.rounds):
        for name in sides:
            workdir = Path(tempfile.mkdtemp(prefix=f"pg-joins-{name}-"))
            print(f"[{name}] round {_round + 1}: {opts.clients} clients ...", flush=True)
            try:
                results[name].append(run_side(name, opts, workdir))
            except Exception as exc:
                failed = True
                print(f"[{name}] FAILED: {exc!r} (logs in {workdir})", flush=True)
    print(report(results))
    if opts.json:
        with contextlib.suppress(OSError):
            settings = {k: getattr(opts, k) for k in ("clients", "channels", "procs", "seconds")}
            opts.json.write_text(json.dumps({"settings": settings, "sides": results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
