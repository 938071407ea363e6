"""The adversarial suite: careless and hostile clients against running nodes, on loopback.

Every case attacks the *target* node (malformed frames, floods, request smuggling, slowloris,
unfinished bodies, descriptor exhaustion, bombs, lost Pub/Sub connections) and then checks
that nothing it must protect moved (:meth:`Ctx.intact`): the target still runs, a new client
subscribes on it and receives an event published through the other node, and the presence
members the target holds are listed on the *watch* node exactly as before, with no
``member_removed`` sent to a watcher or to the webhook receiver. Each case prints one line
``ADVERSARIAL <case>: {...}`` with what the client got and what it cost the node.

Protocol-level bad input (malformed JSON, bad signatures, oversized fields: 37 cases) is in
``test_bad_input.py``; this module is about resources and liveness.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from flood import masked_text_frame, subscribe_frames
from nodes import (
    APP_KEY,
    NodeProcess,
    WebhookReceiver,
    WsClient,
    api_request,
    official_client,
    running_node,
)
from polling import wait_until
from support import raw_client

from gateway.localcluster import LOOPBACK_LOAD_ENV, LocalCluster
from gateway.shards.contract import channel_key

pytestmark = [pytest.mark.timeout(300)]

HANDSHAKE = (
    f"GET /app/{APP_KEY}?protocol=7&client=js&version=8.6.0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
).encode()

#: Target node settings: production defaults, with timeouts short enough for a test and
#: per-address limits sized so that this suite's own clients stay below them.
TARGET_TOML = """
request_header_timeout = 1.0
request_body_timeout = 1.0
max_pending_request_bytes = 4194304
max_connections_per_ip = 200
handshakes_per_ip = 100
handshake_burst_per_ip = 200
"""


def report(case: str, figures: dict[str, Any]) -> None:
    print(f"\nADVERSARIAL {case}: {json.dumps(figures, default=str)}")


@dataclass
class Ctx:
    """The two nodes, the presence members the target holds and the watcher of them."""

    target: NodeProcess
    watch: NodeProcess
    hooks: WebhookReceiver
    cluster: LocalCluster
    channel: str
    keepers: list[WsClient]
    watcher: WsClient
    seen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def keeper_ids(self) -> set[str]:
        return {f"keeper-{i}" for i in range(len(self.keepers))}

    def intact(self, case: str) -> dict[str, Any]:
        """Assert the target survived with nothing lost or invented; return figures."""
        assert self.target.proc.poll() is None, f"target died:\n{self.target.output[-3000:]}"
        # Ready again (a node that shed load takes new clients again a few seconds later).
        wait_until(lambda: self.target.health() == 200, 20, "the target to be ready")
        # A new client on the target subscribes and gets an event published via the other
        # node (so delivery through Redis Pub/Sub works too).
        channel = f"intact-{uuid.uuid4().hex[:8]}"
        with WsClient(self.target.ws_url()) as ws:
            ws.subscribe(channel)
            official_client(self.watch.port).trigger(channel, "check", {"case": case})
            event = ws.expect("check", channel, timeout=10)
            assert json.loads(event["data"]) == {"case": case}
        users = official_client(self.watch.port).users_info(self.channel)["users"]
        assert {u["id"] for u in users} == self.keeper_ids | {"watcher"}, users
        self.seen += self.watcher.quiet(0.3)
        protected = self.keeper_ids | {"watcher"}
        removed = [
            f
            for f in self.seen
            if f.get("event") == "pusher_internal:member_removed"
            and json.loads(f["data"])["user_id"] in protected
        ]
        assert removed == [], removed
        hooks = [
            e
            for e in self.hooks.events(self.channel)
            if e["name"] == "member_removed" and e["user_id"] in protected
        ]
        assert hooks == [], hooks
        return {"target_rss_mb": round(self.target.rss() / 2**20, 1)}


@pytest.fixture(scope="module")
def ctx(cluster: LocalCluster, hooks: WebhookReceiver) -> Iterator[Ctx]:
    with contextlib.ExitStack() as stack:
        target = stack.enter_context(
            running_node(
                cluster.topology_path,
                node_id="adv-target",
                webhook_url=hooks.url,
                extra_toml=TARGET_TOML,
            )
        )
        watch = stack.enter_context(
            running_node(cluster.topology_path, node_id="adv-watch", webhook_url=hooks.url)
        )
        channel = f"presence-adv-{uuid.uuid4().hex[:8]}"
        keepers = []
        for i in range(3):
            ws = stack.enter_context(WsClient(target.ws_url()))
            ws.subscribe(channel, f"keeper-{i}")
            keepers.append(ws)
        watcher = stack.enter_context(WsClient(watch.ws_url()))
        watcher.subscribe(channel, "watcher")
        yield Ctx(target, watch, hooks, cluster, channel, keepers, watcher)


class RawWs:
    """A WebSocket spoken by hand, to send what no library would."""

    def __init__(self, port: int, *, extra_headers: bytes = b"") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(HANDSHAKE + extra_headers + b"\r\n")
        self.head = b""
        while b"\r\n\r\n" not in self.head:
            chunk = self.sock.recv(4096)
            assert chunk, f"closed during the handshake: {self.head!r}"
            self.head += chunk
        self.head, _, self.rest = self.head.partition(b"\r\n\r\n")
        assert self.head.startswith(b"HTTP/1.1 101"), self.head

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until_closed(self, timeout: float = 10) -> bytes:
        """Everything the server sends until it closes (the last frame is its close)."""
        self.sock.settimeout(timeout)
        out = self.rest
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                out += chunk
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def close_code(data: bytes) -> int | None:
    """The code of the close frame ending ``data`` (server frames are unmasked)."""
    at = data.rfind(b"\x88")
    if at < 0 or at + 4 > len(data):
        return None
    return int.from_bytes(data[at + 2 : at + 4], "big")


def raw_http(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                out += chunk
        return out


# -- WebSocket frames ---------------------------------------------------------------------------


def test_protocol_violations_close_the_socket_only(ctx: Ctx) -> None:
    cases = {
        "unmasked frame": (b"\x81\x05hello", 1002),
        "reserved opcode": (b"\x83\x80" + b"\x00" * 4, 1002),
        "rsv1 without deflate": (b"\xc1\x80" + b"\x00" * 4, 1002),
        "invalid utf-8": (b"\x81\x82" + b"\x00" * 4 + b"\xc3\x28", 1007),
        "message over max_message_bytes": (b"\x81\xff" + (70_000).to_bytes(8, "big"), 1009),
        "control frame too long": (b"\x89\xfe\x00\x80" + b"\x00" * 4 + b"p" * 128, 1002),
    }
    got = {}
    for name, (frame, expected) in cases.items():
        ws = RawWs(ctx.target.port)
        ws.send(frame)
        got[name] = close_code(ws.read_until_closed())
        ws.close()
        assert got[name] == expected, (name, got[name])
    figures = ctx.intact("protocol violations")
    report("protocol_violations", {"close_codes": got, **figures})


def test_permessage_deflate_is_never_negotiated(ctx: Ctx) -> None:
    ws = RawWs(
        ctx.target.port,
        extra_headers=b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    assert b"sec-websocket-extensions" not in ws.head.lower()
    ws.close()
    report("deflate_offer", {"extension_in_response": False, **ctx.intact("deflate")})


def test_message_flood_from_one_socket(ctx: Ctx) -> None:
    ws = RawWs(ctx.target.port)
    ping = masked_text_frame('{"event":"pusher:ping","data":{}}')
    for _ in range(20):
        ws.send(ping * 1000)  # 20 000 messages, never reading the pongs
    ws.close()
    report("message_flood", {"messages": 20_000, **ctx.intact("message flood")})


def test_subscribe_flood_does_not_starve_others(ctx: Ctx) -> None:
    ws = RawWs(ctx.target.port)
    prefix = f"sflood-{uuid.uuid4().hex[:6]}"
    pairs = subscribe_frames(prefix, 50) + subscribe_frames(prefix, 50, unsubscribe=True)
    ws.send(pairs * 200)  # 20 000 subscribe/unsubscribe pairs in one burst
    started = time.monotonic()
    with WsClient(ctx.target.ws_url()) as normal:
        normal.subscribe(f"normal-{uuid.uuid4().hex[:6]}")  # fails after 10 s
    normal_s = round(time.monotonic() - started, 2)
    ws.sock.settimeout(0.5)
    received = b""
    with contextlib.suppress(OSError):
        while len(received) < 200_000 and (chunk := ws.sock.recv(65536)):
            received += chunk
    ws.close()
    refusals = received.count(b"Subscription rate limit exceeded")
    assert refusals > 0
    figures = ctx.intact("subscribe flood")
    report(
        "subscribe_flood",
        {"pairs": 20_000, "normal_subscribe_s": normal_s, "rate_limit_refusals_seen": refusals,
         **figures},
    )  # fmt: skip


# -- HTTP ---------------------------------------------------------------------------------------


def test_request_smuggling_is_refused(ctx: Ctx) -> None:
    port = ctx.target.port
    cases = {
        "content-length and chunked": b"POST /apps/1/events HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
        "two content-lengths": b"POST /apps/1/events HTTP/1.1\r\nContent-Length: 1\r\n"
        b"Content-Length: 20\r\n\r\nx",
        "bad chunk size": b"POST /apps/1/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nxx\r\n0\r\n\r\n",
        "space before colon": b"GET /x HTTP/1.1\r\nContent-Length : 5\r\n\r\nhello",
    }
    got = {}
    for name, data in cases.items():
        reply = raw_http(port, data)
        got[name] = reply.split(b"\r\n", 1)[0].decode()
        assert reply.startswith(b"HTTP/1.1 400 "), (name, reply[:200])
        assert reply.count(b"HTTP/1.1 ") == 1, (name, reply)  # nothing smuggled through
    report("smuggling", {"answers": got, **ctx.intact("smuggling")})


def test_header_and_target_bombs(ctx: Ctx) -> None:
    port = ctx.target.port
    many = b"GET /x HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n"
    long_target = b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n"
    got = {
        "200 headers": raw_http(port, many)[:12],
        "20 KB target": raw_http(port, long_target)[:12],
    }
    assert got["200 headers"] == b"HTTP/1.1 431" and got["20 KB target"] == b"HTTP/1.1 414"
    nested = b'{"name":"e","channels":["c"],"data":' + b"[" * 400_000 + b"]" * 400_000 + b"}"
    reply = api_request(port, "POST", "/apps/1/events", body=nested)
    assert reply.status_code in (400, 413), reply.text
    frame = json.dumps({"event": "pusher:subscribe", "data": {"channel": "x"}})[:-1]
    with WsClient(ctx.target.ws_url()) as ws:
        ws.send(frame + ',"deep":' + "[" * 15_000 + "]" * 15_000 + "}")
        assert ws.expect("pusher:error")["data"]["code"] is None
    report(
        "bombs",
        {"200_headers": "431", "20KB_target": "414", "nested_json_body": reply.status_code,
         "nested_json_frame": "pusher:error", **ctx.intact("bombs")},
    )  # fmt: skip


def test_slowloris_is_cut_off(ctx: Ctx) -> None:
    port = ctx.target.port
    socks = []
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /live HTTP/1.1\r\nX-Slow: ")
        socks.append(sock)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(b"y")
            stop.wait(0.2)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    answers = []
    try:
        for sock in socks:
            out = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(4096):
                    out += chunk
            answers.append(out[:12])
    finally:
        stop.set()
        thread.join(5)
        for sock in socks:
            sock.close()
    assert answers == [b"HTTP/1.1 408"] * 50, answers
    report("slowloris", {"connections": 50, "answers": "408 x 50", **ctx.intact("slowloris")})


def test_unfinished_bodies_are_capped_and_freed(ctx: Ctx) -> None:
    port = ctx.target.port
    rss_before = ctx.target.rss()
    socks = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = b"POST /apps/1/events HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n"
        with contextlib.suppress(OSError):
            sock.sendall(head + b"z" * 500_000)  # 20 x 0.5 MB unfinished, 10 MB in all
        socks.append(sock)
    answers: dict[str, int] = {}
    for sock in socks:
        out = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                out += chunk
        status = out[9:12].decode() or "reset"
        answers[status] = answers.get(status, 0) + 1
        sock.close()
    assert answers.get("503", 0) >= 1 and answers.get("408", 0) >= 1, answers
    wait_until(lambda: ctx.target.metric("pg_http_pending_bytes") == 0, 10, "bytes freed")
    growth_mb = round((ctx.target.rss() - rss_before) / 2**20, 1)
    report(
        "unfinished_bodies",
        {"requests": 20, "bytes_sent": 10_000_000, "answers": answers, "rss_growth_mb": growth_mb,
         **ctx.intact("unfinished bodies")},
    )  # fmt: skip


def test_pipelined_requests_are_all_answered(ctx: Ctx) -> None:
    n = 20_000
    with socket.create_connection(("127.0.0.1", ctx.target.port), timeout=30) as sock:
        done = threading.Event()

        def send() -> None:
            for _ in range(n // 1000):
                sock.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
            done.set()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answered = statuses_other = 0
        tail = b""
        while answered < n:
            chunk = sock.recv(1 << 16)
            assert chunk, f"closed after {answered}"
            data = tail + chunk
            answered += data.count(b"HTTP/1.1 200 ")
            statuses_other += data.count(b"HTTP/1.1 4") + data.count(b"HTTP/1.1 5")
            tail = data[-16:]
        sender.join(10)
    assert answered == n and statuses_other == 0
    report("pipelined", {"requests": n, "answered_200": answered, **ctx.intact("pipelined")})


# -- connection limits --------------------------------------------------------------------------


def test_per_address_connection_limit(ctx: Ctx) -> None:
    held = int(ctx.target.metric("pg_tcp_connections"))  # every client here is 127.0.0.1
    socks = []
    refused = 0
    try:
        for _ in range(260):
            sock = socket.create_connection(("127.0.0.1", ctx.target.port), timeout=10)
            sock.setblocking(False)
            socks.append(sock)
        time.sleep(0.5)
        for sock in socks:
            with contextlib.suppress(BlockingIOError, OSError):
                if sock.recv(64).startswith(b"HTTP/1.1 503"):
                    refused += 1
    finally:
        for sock in socks:
            sock.close()
    # 200 per address, of which this suite's own clients already held some.
    assert abs(refused - (260 - (200 - held))) <= 10, (refused, held)
    time.sleep(0.5)
    report("per_address_limit", {"opened": 260, "refused_503": refused, **ctx.intact("per-ip")})


def test_handshake_rate_per_address(ctx: Ctx) -> None:
    statuses: dict[str, int] = {}
    for _ in range(600):
        with socket.create_connection(("127.0.0.1", ctx.target.port), timeout=10) as sock:
            sock.sendall(HANDSHAKE + b"\r\n")
            status = sock.recv(12)[9:12].decode()
            statuses[status] = statuses.get(status, 0) + 1
    assert statuses.get("429", 0) > 0 and statuses.get("101", 0) > 0, statuses
    time.sleep(2.5)  # the bucket fills up again
    report("handshake_rate", {"handshakes": 600, "answers": statuses, **ctx.intact("rate")})


def test_descriptor_exhaustion_keeps_redis_work_going(ctx: Ctx) -> None:
    """A node whose open-file limit is nearly all taken by clients keeps its lease, its
    Sentinel checks and its members; clients beyond the cap get a clean 503."""
    toml = (
        "reserved_fds = 96\nmax_connections_per_ip = 0\nhandshakes_per_ip = 0\n"
        "request_header_timeout = 30\n"
    )
    with running_node(
        ctx.cluster.topology_path,
        node_id="adv-fd",
        webhook_url=ctx.hooks.url,
        extra_toml=toml,
        nofile=256,
    ) as node:
        cap = int(node.metric("pg_tcp_connections_max"))
        with WsClient(node.ws_url()) as keeper:
            keeper.subscribe(ctx.channel, "fd-keeper")
            socks: list[socket.socket] = []
            statuses: dict[str, int] = {}
            try:
                for _ in range(cap + 100):
                    try:
                        sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
                    except OSError:
                        statuses["connect error"] = statuses.get("connect error", 0) + 1
                        continue
                    socks.append(sock)
                time.sleep(1.0)
                for sock in socks:
                    sock.setblocking(False)
                    try:
                        data = sock.recv(64)
                    except BlockingIOError:
                        data = b"(held)"
                    except OSError:
                        data = b"(reset)"
                    key = data[:12].decode(errors="replace") or "(closed)"
                    statuses[key] = statuses.get(key, 0) + 1
                # Hold everything for longer than the lease: the member must stay.
                time.sleep(12)
                users = official_client(ctx.watch.port).users_info(ctx.channel)["users"]
                assert "fd-keeper" in {u["id"] for u in users}, users
                lease_ages = node.metric("pg_lease_age_seconds")
            finally:
                for sock in socks:
                    sock.close()
            assert statuses.get("HTTP/1.1 503", 0) >= 90, statuses
            keeper.subscribe(f"after-fd-{uuid.uuid4().hex[:6]}")
        assert "refused connections or handshakes" in node.output
    report(
        "fd_exhaustion",
        {"nofile": 256, "client_cap": cap, "opened": cap + 100, "answers": statuses,
         "lease_ages_sum_s": round(lease_ages, 2), **ctx.intact("fd exhaustion")},
    )  # fmt: skip


# -- presence and Pub/Sub -----------------------------------------------------------------------


def test_nul_in_user_id_is_delivered_intact(ctx: Ctx) -> None:
    user = "nul\x00user"
    with WsClient(ctx.target.ws_url()) as ws:
        ws.subscribe(ctx.channel, user)
        added = ctx.watcher.next_event(
            lambda f: (
                f.get("event") == "pusher_internal:member_added"
                and json.loads(f["data"])["user_id"] == user
            ),
            timeout=10,
        )
        users = official_client(ctx.watch.port).users_info(ctx.channel)["users"]
        assert {u["id"] for u in users} == ctx.keeper_ids | {"watcher", user}
    removed = ctx.watcher.next_event(
        lambda f: f.get("event") == "pusher_internal:member_removed", timeout=10
    )
    assert json.loads(removed["data"]) == {"user_id": user}
    report("nul_user_id", {"member_added": json.loads(added["data"]), **ctx.intact("nul")})


def _received(ws: WsClient, channel: str, event: str, port: int, timeout: float) -> float:
    """Trigger ``event`` until ``ws`` receives it; seconds it took."""
    started = time.monotonic()

    def delivered() -> bool:
        official_client(port).trigger(channel, event, {})
        try:
            ws.expect(event, channel, timeout=0.2)
        except AssertionError:
            return False
        return True

    wait_until(delivered, timeout, f"{event} delivered on {channel}", step=0)
    return time.monotonic() - started


def test_killed_pubsub_connection_is_restored(ctx: Ctx) -> None:
    channel = f"pskill-{uuid.uuid4().hex[:8]}"
    with WsClient(ctx.target.ws_url()) as ws:
        ws.subscribe(channel)
        before = ctx.target.metric("pg_pubsub_reconnects_total")
        for master in ctx.cluster.masters():
            with contextlib.closing(raw_client(master.addr)) as r:
                r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        resumed = _received(ws, channel, "after-kill", ctx.watch.port, 10)
        reconnects = ctx.target.metric("pg_pubsub_reconnects_total") - before
    assert reconnects >= 1  # every connection in subscribe mode (the idle shard has none)
    assert (
        "pubsub: connection to" in ctx.target.output and "closed by the server" in ctx.target.output
    )
    report(
        "pubsub_client_kill",
        {"reconnects": reconnects, "delivery_resumed_s": round(resumed, 2),
         **ctx.intact("pubsub kill")},
    )  # fmt: skip


def test_pubsub_output_buffer_overflow_is_noticed_and_repaired(ctx: Ctx) -> None:
    channel = f"psbuf-{uuid.uuid4().hex[:8]}"
    key = channel_key("1", channel)
    with WsClient(ctx.target.ws_url()) as ws:
        ws.subscribe(channel)
        masters = {m.addr: raw_client(m.addr) for m in ctx.cluster.masters()}
        holder = next(addr for addr, r in masters.items() if r.pubsub_numsub(key)[0][1] > 0)
        r = masters[holder]
        saved = r.config_get("client-output-buffer-limit")["client-output-buffer-limit"]
        before = ctx.target.metric("pg_pubsub_reconnects_total")
        try:
            r.config_set("client-output-buffer-limit", "pubsub 256kb 128kb 1")
            os.kill(ctx.target.pid, signal.SIGSTOP)  # the node falls behind reading
            try:
                filler = {"event": "filler", "channel": channel, "data": "x" * 10_000}
                payload = b"E\0" + json.dumps(filler).encode()
                # 40 MB for a node that reads nothing: more than the kernel's socket buffers
                # hold, so Redis's own output buffer for the node fills up.
                for _ in range(4000):
                    r.publish(key, payload)
                time.sleep(1.5)
            finally:
                os.kill(ctx.target.pid, signal.SIGCONT)
            resumed = _received(ws, channel, "after-overflow", ctx.watch.port, 15)
        finally:
            r.config_set("client-output-buffer-limit", saved)
            for client in masters.values():
                client.close()
        reconnects = ctx.target.metric("pg_pubsub_reconnects_total") - before
    assert reconnects >= 1
    assert "output-buffer" in ctx.target.output
    report(
        "pubsub_output_buffer",
        {"published_mb": 40, "reconnects": reconnects, "delivery_resumed_s": round(resumed, 2),
         **ctx.intact("pubsub overflow")},
    )  # fmt: skip


# -- memory -------------------------------------------------------------------------------------


def _churn(node: NodeProcess, prefix: str, names: int, sockets: int = 20, wave: int = 100) -> None:
    """Subscribe and unsubscribe ``names`` distinct public channels, ``wave`` at a time."""
    per = names // sockets
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with WsClient(node.ws_url()) as ws:
                for start in range(0, per, wave):
                    chans = [f"{prefix}-{k}-{i}" for i in range(start, min(per, start + wave))]
                    for ch in chans:
                        ws.send({"event": "pusher:subscribe", "data": {"channel": ch}})
                    for _ in chans:
                        ws.expect("pusher_internal:subscription_succeeded", timeout=30)
                    for ch in chans:
                        ws.send({"event": "pusher:unsubscribe", "data": {"channel": ch}})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(sockets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_channel_bookkeeping_memory_is_bounded(cluster: LocalCluster) -> None:
    """100 000 distinct channels subscribed and left: the node's memory comes back."""
    env = {**LOOPBACK_LOAD_ENV, "GATEWAY_HOUSEKEEPING_INTERVAL": "2"}
    with running_node(cluster.topology_path, node_id="adv-mem", env=env) as node:
        # Warm-up at the same pace: the high-water mark of channels waiting out their
        # release grace (5 s) is reached before the start is measured.
        _churn(node, f"warm-{uuid.uuid4().hex[:6]}", 20_000)
        time.sleep(8)
        start = node.rss()
        started = time.monotonic()
        _churn(node, f"big-{uuid.uuid4().hex[:6]}", 100_000)
        churn_s = time.monotonic() - started
        peak = node.rss()
        time.sleep(8)  # release grace, then housekeeping
        end = node.rss()
    growth = (end - start) / 2**20
    report(
        "channel_memory",
        {"names": 100_000, "churn_s": round(churn_s, 1), "rss_start_mb": round(start / 2**20, 1),
         "rss_peak_mb": round(peak / 2**20, 1), "rss_end_mb": round(end / 2**20, 1),
         "growth_mb": round(growth, 1)},
    )  # fmt: skip
    # Before channel bookkeeping was released, 100 000 names kept ~180 MB.
    assert growth < 16, growth


def test_live_endpoint(ctx: Ctx) -> None:
    assert requests.get(f"{ctx.target.url}/live", timeout=5).json()["status"] == "alive"
    ready = requests.get(f"{ctx.target.url}/ready", timeout=5)
    assert ready.status_code == 200, ready.text


def test_user_info_limit_counts_the_escaped_text(ctx: Ctx) -> None:
    channel = f"presence-info-{uuid.uuid4().hex[:8]}"
    with WsClient(ctx.target.ws_url()) as ws:
        # 600 bytes of UTF-8, 1 808 bytes once stored as escaped JSON.
        ws.send(ws.subscribe_frame(channel, "wide", {"k": "\u00e9" * 300}))
        error = ws.expect("pusher:error")
        assert "user_info too large (1808 bytes as JSON" in error["data"]["message"]
        ws.subscribe(channel, "narrow", {"k": "\u00e9" * 150})  # 908 bytes stored: fine
    report("user_info_escaped", {"refused_bytes": 1808, **ctx.intact("user_info")})
