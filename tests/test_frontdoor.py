"""The one-port front door against real clients: websockets, websocket-client, http.client, raw."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import random
from collections.abc import AsyncIterator

import pytest
import websocket
from hypothesis import example, given
from hypothesis import strategies as st  # websocket-client, the library pysher uses
from polling import settle
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from gateway.server.frontdoor import FrontDoor, listen_backlog, start_frontdoor
from gateway.server.httpconn import HttpRequest, HttpResponse, split_target
from gateway.server.websocket import (
    WsConnection,
    broadcast_frame,
    encode_text_frame,
    fast_handshake,
    parse_text_frames,
)


class App:
    """Echo/broadcast WebSocket handler and a reflecting HTTP handler."""

    def __init__(self) -> None:
        self.conns: dict[int, WsConnection] = {}
        self.closed: dict[int, int | None] = {}
        self.closed_event = asyncio.Event()
        self.requests: list[HttpRequest] = []

    def ws_open(self, conn: WsConnection) -> None:
        self.conns[conn.id] = conn
        conn.send_text(json.dumps({"welcome": conn.id, "path": conn.path, "query": conn.query}))

    def ws_text(self, conn: WsConnection, text: str) -> None:
        command, _, arg = text.partition(":")
        if command == "close":
            conn.close(int(arg), "bye")
        elif command == "bcast":
            frame = encode_text_frame(arg)
            broadcast_frame(self.conns.values(), frame)
        elif command == "flood":
            chunk = "x" * 16_384
            for _ in range(int(arg)):
                if not conn.is_open:
                    break
                conn.send_text(chunk)
        elif command == "raise":
            raise RuntimeError("handler bug")
        elif command == "ping":
            conn.ping()
            conn.send_text("pinged")
        else:
            conn.send_text("echo:" + text)

    def ws_binary(self, conn: WsConnection, data: bytes) -> None:
        conn.send_text(f"binary:{len(data)}")

    def ws_closed(self, conn: WsConnection, code: int | None) -> None:
        assert conn.id not in self.closed, "ws_closed called twice"
        self.conns.pop(conn.id, None)
        self.closed[conn.id] = code
        self.closed_event.set()

    async def http_request(self, request: HttpRequest) -> HttpResponse:
        self.requests.append(request)
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        if request.path == "/slow":
            await asyncio.sleep(0.05)
        body = {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "body": request.body.decode("latin-1"),
            "remote": list(request.remote) if request.remote else None,
        }
        return HttpResponse(200, json.dumps(body).encode(), headers={"X-Test": "1"})

    async def wait_closed(self, conn_id: int, timeout: float = 5.0) -> int | None:
        async with asyncio.timeout(timeout):
            while conn_id not in self.closed:
                self.closed_event.clear()
                await self.closed_event.wait()
        return self.closed[conn_id]


@pytest.fixture
async def app() -> App:
    return App()


@pytest.fixture
async def door(app: App) -> AsyncIterator[FrontDoor]:
    front = await start_frontdoor(
        "127.0.0.1", 0, ws=app, http=app, max_body=10_000, max_ws_message=1000
    )
    yield front
    await front.shutdown(timeout=1.0)


def url(door: FrontDoor, path: str = "/app/key?protocol=7") -> str:
    return f"ws://127.0.0.1:{door.port}{path}"


async def raw_exchange(door: FrontDoor, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read(-1)
    finally:
        writer.close()


# -- WebSocket ------------------------------------------------------------------------------


async def test_handshake_echo_path_and_query(door: FrontDoor, app: App) -> None:
    async with connect(url(door)) as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["path"] == "/app/key"
        assert welcome["query"] == "protocol=7"
        await ws.send("hello")
        assert await ws.recv() == "echo:hello"
        await ws.send("ünïcødé ✓")
        assert await ws.recv() == "echo:ünïcødé ✓"
        await ws.send(b"\x00\x01\x02")
        assert await ws.recv() == "binary:3"
        conn = app.conns[welcome["welcome"]]
        assert conn.is_open
        assert conn.remote is not None and conn.remote[0] == "127.0.0.1"
    assert await app.wait_closed(welcome["welcome"]) == 1000


async def test_fragmented_message_is_assembled(door: FrontDoor) -> None:
    async with connect(url(door)) as ws:
        await ws.recv()
        await ws.send(["frag", "ment", "ed"])
        assert await ws.recv() == "echo:fragmented"


async def test_ping_pong_both_ways(door: FrontDoor) -> None:
    async with connect(url(door)) as ws:
        await ws.recv()
        pong = await ws.ping(b"abc")
        async with asyncio.timeout(2):
            await pong
        await ws.send("ping")  # the server pings; the client pongs on its own
        assert await ws.recv() == "pinged"
        await ws.send("still")
        assert await ws.recv() == "echo:still"


async def test_client_close_code_reaches_the_app(door: FrontDoor, app: App) -> None:
    async with connect(url(door)) as ws:
        conn_id = json.loads(await ws.recv())["welcome"]
        await ws.close(4321, "client says bye")
    assert await app.wait_closed(conn_id) == 4321
    await settle(lambda: door.connections == 0, what="the door to hold no connection")


async def test_server_close_code_reaches_the_client(door: FrontDoor, app: App) -> None:
    async with connect(url(door)) as ws:
        conn_id = json.loads(await ws.recv())["welcome"]
        await ws.send("close:4001")
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 4001
        assert info.value.rcvd.reason == "bye"
    assert await app.wait_closed(conn_id) == 4001  # the client echoes it


async def test_abrupt_disconnect_reports_none(door: FrontDoor, app: App) -> None:
    ws = await connect(url(door))
    conn_id = json.loads(await ws.recv())["welcome"]
    assert ws.transport is not None
    ws.transport.abort()
    assert await app.wait_closed(conn_id) is None


async def test_many_connections_broadcast(door: FrontDoor, app: App) -> None:
    clients = await asyncio.gather(*(connect(url(door)) for _ in range(200)))
    try:
        for ws in clients:
            await ws.recv()
        assert len(door.websockets) == 200
        await clients[0].send("bcast:hello all")
        got = await asyncio.gather(*(ws.recv() for ws in clients))
        assert got == ["hello all"] * 200
    finally:
        await asyncio.gather(*(ws.close() for ws in clients))
    await settle(lambda: len(app.closed) == 200, what="all 200 sockets reported closed")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
def test_encode_text_frame_matches_websockets(size: int) -> None:
    text = ("é" * size)[:size] if size % 2 else "a" * size
    expected = Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])
    assert encode_text_frame(text) == expected


def _open_server_protocol(max_size: int | None) -> ServerProtocol:
    proto = ServerProtocol(max_size=max_size)
    request = (
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    proto.receive_data(request)
    (event,) = proto.events_received()
    proto.send_response(proto.accept(event))
    proto.data_to_send()
    return proto


def _client_frame(opcode: Opcode, payload: bytes, fin: bool, mask: bool, rsv1: bool) -> bytes:
    """A client frame built by hand: websockets' serializer refuses the invalid ones."""
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    key = b"abcd" if mask else b""
    bit = 0x80 if mask else 0
    if len(payload) < 126:
        head += bytes([bit | len(payload)])
    else:
        head += bytes([bit | 126]) + len(payload).to_bytes(2, "big")
    return head + key + (bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if mask else payload)


_frames = st.lists(
    st.tuples(
        st.sampled_from([Opcode.TEXT, Opcode.TEXT, Opcode.TEXT, Opcode.BINARY, Opcode.CONT,
                         Opcode.PING, Opcode.CLOSE]),
        st.binary(max_size=300),
        st.booleans() | st.just(True),  # fin
        st.just(True) | st.booleans(),  # masked
        st.just(False) | st.booleans(),  # rsv1
    ),
    max_size=4,
)  # fmt: skip


@given(_frames, st.integers(0, 6), st.sampled_from([None, 0, 10, 200, 1000]))
@example([(Opcode.TEXT, b'{"event":"pusher:ping"}', True, True, False)], 0, None)
@example([(Opcode.TEXT, b"x" * 200, True, True, False)] * 2, 0, 200)
@example([(Opcode.TEXT, b"x" * 201, True, True, False)], 0, 200)
def test_text_frame_fast_path_agrees_with_websockets(
    frames: list[tuple[Opcode, bytes, bool, bool, bool]], cut: int, max_size: int | None
) -> None:
    data = b"".join(_client_frame(*f) for f in frames)
    data = data[: len(data) - cut]  # sometimes a partial frame at the end
    texts = parse_text_frames(data, max_size)
    if texts is None:
        return  # websockets handles these bytes
    proto = _open_server_protocol(max_size)
    proto.receive_data(data)
    events = proto.events_received()
    assert [(e.opcode, e.fin, bytes(e.data)) for e in events] == [
        (Opcode.TEXT, True, t) for t in texts
    ]
    assert proto.state is State.OPEN and not proto.data_to_send()
    assert not proto.reader.buffer and proto.current_size is None


_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
_HEADERS = [
    ("Host", "127.0.0.1:6001"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", _KEY),
    ("Sec-WebSocket-Version", "13"),
]
_header_lines = st.lists(
    st.sampled_from([
        *_HEADERS, ("upgrade", "WebSocket"), ("Upgrade", "h2c"), ("Upgrade", "websocket, x"),
        ("Connection", "keep-alive, Upgrade"), ("Connection", "close"), ("Connection", "up@grade"),
        ("Connection", "Upgrade, @@"), ("Sec-WebSocket-Key", "c2hvcnQ="), ("Sec-WebSocket-Key", ""),
        ("Sec-WebSocket-Key", "not base64!"), ("Sec-WebSocket-Version", "8"),
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ("Sec-WebSocket-Protocol", "chat"), ("Origin", "https://example.com"),
        ("Content-Length", "0"), ("Transfer-Encoding", "chunked"), ("X Bad", "1"),
        ("X-Ctl", "a\x01b"), ("User-Agent", "pusher-js 8.4.0"),
    ]),
    max_size=9,
)  # fmt: skip


@given(
    st.permutations(_HEADERS) | _header_lines.map(lambda more: [*_HEADERS, *more]) | _header_lines,
    st.sampled_from(["GET /app/k?protocol=7 HTTP/1.1", "POST /app/k HTTP/1.1",
                     "GET /app/k HTTP/1.0", "GET /a b HTTP/1.1", "GET /app/k?x=1 HTTP/1.1"]),
    st.sampled_from([b"", b"\x81\x80\0\0\0\0", b"\x81\x85\0\0\0\0hello"]),
)  # fmt: skip
@example(_HEADERS, "GET /app/k?protocol=7 HTTP/1.1", b"")
def test_handshake_fast_path_agrees_with_websockets(
    headers: list[tuple[str, str]], request_line: str, after: bytes
) -> None:
    head = request_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    raw = head.encode("latin-1") + after
    fast = fast_handshake(raw)
    if fast is None:
        return  # websockets answers this one
    response, rest = fast
    assert rest == after
    proto = ServerProtocol(max_size=None)
    proto.receive_data(head.encode("latin-1"))
    request = proto.events_received()[0]
    proto.send_response(proto.accept(request))
    assert proto.state is State.OPEN, "the fast path accepted what websockets refuses"
    expected = b"".join(proto.data_to_send())
    # Same bytes, the Date header aside (each formats the current second).
    strip = lambda b: [line for line in b.split(b"\r\n") if not line.startswith(b"Date: ")]  # noqa: E731
    assert strip(response) == strip(expected)
    assert response.split(b"\r\n")[1].startswith(b"Date: ")


def test_handshake_fast_path_takes_the_common_requests() -> None:
    for line, headers in [
        ("GET /app/app-key?protocol=7&client=js&version=8.4.0 HTTP/1.1", _HEADERS),
        ("GET /app/k HTTP/1.1", [*_HEADERS, ("Sec-WebSocket-Extensions", "permessage-deflate")]),
        ("GET /app/k HTTP/1.1", [("host", "x"), ("upgrade", "websocket"),
                                 ("connection", "keep-alive, Upgrade"),
                                 ("sec-websocket-key", _KEY), ("sec-websocket-version", "13")]),
    ]:  # fmt: skip
        head = line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        assert fast_handshake(head.encode()) is not None, headers


async def test_oversized_message_closes_1009(door: FrontDoor, app: App) -> None:
    async with connect(url(door)) as ws:
        conn_id = json.loads(await ws.recv())["welcome"]
        await ws.send("x" * 5000)
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.sent is None or info.value.rcvd is not None
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    assert conn_id in await _closed_soon(app, conn_id)


async def test_handler_exception_closes_1011(door: FrontDoor) -> None:
    async with connect(url(door)) as ws:
        await ws.recv()
        await ws.send("raise")
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011


async def test_slow_consumer_is_closed_4100(app: App) -> None:
    front = await start_frontdoor(
        "127.0.0.1", 0, ws=app, http=app, ws_high_water=256 * 1024, ws_close_timeout=10
    )
    try:
        async with connect(url(front), max_queue=2) as ws:
            conn_id = json.loads(await ws.recv())["welcome"]
            # 32 MiB in one go: far more than the kernel's socket buffers plus high water.
            await ws.send("flood:2048")
            # The client reads nothing meanwhile.
            await settle(lambda: front.slow_consumers_closed == 1, what="the slow consumer closed")
            assert not app.conns.get(conn_id) or not app.conns[conn_id].is_open
            received = 0
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await ws.recv()
                    received += 1
            assert info.value.rcvd is not None and info.value.rcvd.code == 4100
            assert 0 < received < 2048
        assert await app.wait_closed(conn_id) == 4100
    finally:
        await front.shutdown(timeout=1)


async def test_shutdown_closes_every_socket_with_4200(app: App) -> None:
    front = await start_frontdoor("127.0.0.1", 0, ws=app, http=app)
    clients = await asyncio.gather(*(connect(url(front)) for _ in range(20)))
    for ws in clients:
        await ws.recv()
    await front.shutdown(code=4200, timeout=2)
    assert front.connections == 0
    assert len(app.closed) == 20
    for ws in clients:
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 4200
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", front.port)


async def test_websocket_client_library(door: FrontDoor, app: App) -> None:
    def run() -> list[object]:
        ws = websocket.create_connection(url(door, "/app/key?client=js&protocol=7"), timeout=5)
        try:
            welcome = json.loads(ws.recv())
            out: list[object] = [welcome["query"], welcome["welcome"]]
            ws.send("from websocket-client")
            out.append(ws.recv())
            ws.ping("x")
            ws.send_binary(b"1234")
            out.append(ws.recv())
            ws.close(status=4300)
            return out
        finally:
            ws.shutdown()

    query, conn_id, echo, binary = await asyncio.to_thread(run)
    assert isinstance(conn_id, int)
    assert await app.wait_closed(conn_id) == 4300
    assert query == "client=js&protocol=7"
    assert echo == "echo:from websocket-client"
    assert binary == "binary:4"


async def test_invalid_utf8_closes_1007(door: FrontDoor, app: App) -> None:
    def run() -> int:
        ws = websocket.create_connection(url(door), timeout=5)
        try:
            ws.recv()
            ws.send(b"\xff\xfe", opcode=websocket.ABNF.OPCODE_TEXT)
            frame = ws.recv_frame()
            return int.from_bytes(frame.data[:2], "big")
        finally:
            ws.shutdown()

    assert await asyncio.to_thread(run) == 1007


async def test_bad_handshake_gets_http_error(door: FrontDoor) -> None:
    reply = await raw_exchange(
        door,
        b"GET /app/key HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 400 ")


async def test_upgrade_after_keep_alive_request(door: FrontDoor) -> None:
    key = base64.b64encode(os.urandom(16))
    reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
    writer.write(
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /app/key HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    first = await reader.readuntil(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ")
    length = int(first.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    second = await reader.readuntil(b"\r\n\r\n")
    assert second.startswith(b"HTTP/1.1 101 ")
    frame = await reader.readexactly(2)
    assert frame[0] == 0x81
    writer.close()


# -- HTTP -----------------------------------------------------------------------------------


async def test_http_keep_alive_get_and_post(door: FrontDoor) -> None:
    def run() -> list[tuple[int, str | None, dict[str, object]]]:
        conn = http.client.HTTPConnection("127.0.0.1", door.port, timeout=5)
        out = []
        conn.request("GET", "/apps/1/channels?filter_by_prefix=presence-")
        resp = conn.getresponse()
        out.append((resp.status, resp.getheader("Connection"), json.loads(resp.read())))
        assert resp.getheader("X-Test") == "1"
        assert resp.getheader("Content-Type") == "application/json"
        sock = conn.sock
        conn.request("POST", "/apps/1/events", body=b'{"name":"e"}')
        resp = conn.getresponse()
        out.append((resp.status, resp.getheader("Connection"), json.loads(resp.read())))
        assert conn.sock is sock  # same TCP connection
        conn.close()
        return out

    (s1, c1, b1), (s2, c2, b2) = await asyncio.to_thread(run)
    assert (s1, c1, b1["method"], b1["path"], b1["query"]) == (
        200,
        "keep-alive",
        "GET",
        "/apps/1/channels",
        "filter_by_prefix=presence-",
    )
    assert (s2, c2, b2["method"], b2["body"]) == (200, "keep-alive", "POST", '{"name":"e"}')


async def test_http_pipelining_answers_in_order(door: FrontDoor) -> None:
    requests = b"".join(
        f"GET /{'slow' if i % 2 == 0 else 'fast'}?i={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        for i in range(6)
    )
    reply = await raw_exchange(door, requests + b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\n")
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in _split_responses(reply)]
    assert [b["query"] for b in bodies[:6]] == [f"i={i}" for i in range(6)]
    assert bodies[6]["path"] == "/last"
    assert b"Connection: close" in reply.rsplit(b"HTTP/1.1 ", 1)[1]


async def test_http_1_0_closes_and_head_has_no_body(door: FrontDoor) -> None:
    reply = await raw_exchange(door, b"GET /x HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in reply
    reply = await raw_exchange(door, b"HEAD /x HTTP/1.1\r\nConnection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Content-Length: " in head and body == b""


async def test_chunked_request_body(door: FrontDoor) -> None:
    reply = await raw_exchange(
        door,
        b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["body"] == "hello world"


async def test_absolute_form_and_slashless_targets(door: FrontDoor) -> None:
    reply = await raw_exchange(
        door,
        b"GET http://example.com:6001/apps/1/channels?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert (body["path"], body["query"]) == ("/apps/1/channels", "x=1")
    assert split_target("http://h") == ("/", "")
    assert split_target("http://h?q=1") == ("/", "q=1")
    assert split_target("*") == ("*", "")
    assert split_target("apps/1?x") == ("/apps/1", "x")


async def test_expect_100_continue(door: FrontDoor) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
    writer.write(b"POST /e HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"abc")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()


async def test_handler_exception_is_500_and_connection_survives(door: FrontDoor) -> None:
    def run() -> tuple[int, dict[str, str], int]:
        conn = http.client.HTTPConnection("127.0.0.1", door.port, timeout=5)
        conn.request("POST", "/boom", body=b"{}")
        resp = conn.getresponse()
        first = (resp.status, json.loads(resp.read()))
        conn.request("GET", "/ok")
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return first[0], first[1], resp.status

    status, body, after = await asyncio.to_thread(run)
    assert status == 500 and body == {"error": "internal server error"}
    assert after == 200


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS ClientHello
        (b"POST / HTTP/1.1\r\nContent-Length: 10001\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431),
    ],
)
async def test_bad_requests_are_answered_and_closed(
    door: FrontDoor, request_bytes: bytes, status: int
) -> None:
    reply = await raw_exchange(door, request_bytes)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:80]
    assert b"Connection: close" in reply


async def test_oversized_chunked_body_is_413(door: FrontDoor) -> None:
    chunk = b"2710\r\n" + b"x" * 10_000 + b"\r\n"
    reply = await raw_exchange(
        door, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2
    )
    assert reply.startswith(b"HTTP/1.1 413 ")


async def test_head_sent_in_many_small_reads_is_limited(door: FrontDoor) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
    writer.write(b"GET / HTTP/1.1\r\nX-Long: ")
    for _ in range(100):
        writer.write(b"y" * 1024)
        await writer.drain()
        await asyncio.sleep(0.001)
    async with asyncio.timeout(5):
        reply = await reader.read(-1)
    assert reply.startswith(b"HTTP/1.1 431 ")
    writer.close()


async def test_random_garbage_never_breaks_the_server(door: FrontDoor) -> None:
    rng = random.Random(7)
    for _ in range(50):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        prefix = rng.choice(
            [b"", b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n"]
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        writer.write(prefix + junk)
        writer.write_eof()
        async with asyncio.timeout(5):
            await reader.read(-1)
        writer.close()
    async with connect(url(door)) as ws:  # still serving
        await ws.recv()
        await ws.send("ok")
        assert await ws.recv() == "echo:ok"


# -- helpers --------------------------------------------------------------------------------


def _split_responses(data: bytes) -> list[bytes]:
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        out.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return out


async def _closed_soon(app: App, conn_id: int) -> dict[int, int | None]:
    await app.wait_closed(conn_id)
    return app.closed


def test_listen_backlog_is_the_kernels_cap() -> None:
    # A storm of reconnects must not overflow a short accept queue (the kernel drops the
    # excess and clients retry only after 1 s): the backlog asked for is the kernel's cap.
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
            expected = max(128, min(65_535, int(f.read())))
    except OSError:
        expected = 4096
    assert listen_backlog() == expected
