"""One HTTP/1.1 connection of the front door, answered in order until it closes or upgrades.

Each TCP connection starts as an :class:`HttpConnection`, the transport's
:class:`asyncio.Protocol` (no task per connection). Requests are parsed by ``httptools``; a
``GET`` with ``Upgrade: websocket`` is handed to a :class:`~gateway.server.websocket.WsConnection`,
which becomes the transport's protocol. Any other request goes to the application's
:class:`HttpHandler`, one at a time per connection (keep-alive and pipelining, answered in
order).

Choices worth knowing:

* Request bodies may be sent with ``Content-Length`` or ``Transfer-Encoding: chunked`` (llhttp
  decodes chunks); either way at most ``max_body`` bytes, else 413 and the connection closes.
  ``Expect: 100-continue`` is answered when the request is next in line.
* Limits: request target 8 KiB (414), 100 header fields and 64 KiB of header data (431);
  anything the parser rejects gets 400; every error response closes the connection.
* Bounded resources: a request head must arrive within ``header_timeout`` of its first byte
  (or of the connection's start) and its body within ``body_timeout`` after the head (else
  408; the front door's sweep calls :meth:`HttpConnection.timed_out`); the bodies of all
  unfinished requests share ``max_pending_bytes`` (503 beyond); a connection whose responses
  are not read stops being read and answered, and is closed after ``send_timeout``. New
  connections and WebSocket handshakes go through
  :class:`~gateway.server.admission.Admission` (caps, per-address limits, rates, shedding; a
  connection refused at once gets a 503 before anything is read), and requests and handshakes
  are client work paid from the per-iteration :class:`~gateway.server.admission.WorkBudget`.
* Targets: ``path`` and ``query`` are the raw (undecoded) request target split at ``?``;
  absolute-form targets (``http://host/p?q``) keep only path and query, and a target without a
  leading ``/`` gets one (``*`` stays ``*``).
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import typing
from collections import deque
from dataclasses import dataclass, field

import httptools

from gateway.server.admission import Admission
from gateway.server.websocket import WsConnection, WsDoor

__all__ = [
    "HttpConnection",
    "HttpDoor",
    "HttpHandler",
    "HttpRequest",
    "HttpResponse",
    "split_target",
]

# The whole front door logs under one name, whichever module: log filters rely on it.
log = logging.getLogger("gateway.server.frontdoor")

MAX_TARGET = 8192
MAX_HEADERS = 100
MAX_HEAD_BYTES = 65_536
#: Requests parsed ahead of the one being answered before reading pauses.
MAX_PIPELINE = 16
#: Seconds to keep reading (and discarding) after the last response before closing.
LINGER = 2.0
#: Units of the work budget a WebSocket handshake costs (a message costs 1).
_HANDSHAKE_COST = 4


@dataclass(slots=True)
class HttpRequest:
    """One parsed HTTP request.

    Attributes:
        method: Upper-case method, e.g. ``"POST"``.
        path: Raw (not percent-decoded) path part of the request target.
        query: Raw query string (without ``?``), empty if none.
        headers: Header fields with lower-cased names; repeated fields joined with ``", "``.
        body: The whole request body (chunked bodies already decoded).
        remote: Peer ``(host, port)`` if known.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    remote: tuple[str, int] | None


@dataclass(slots=True)
class HttpResponse:
    """What an :class:`HttpHandler` answers.

    ``Content-Length`` and ``Connection`` are set by the front door; values in ``headers`` for
    those names (and ``Transfer-Encoding``) are ignored.

    Attributes:
        status: Status code (100-599).
        body: Response body.
        headers: Extra header fields.
        content_type: Value of ``Content-Type``.
    """

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


class HttpHandler(typing.Protocol):
    """The application's handler for plain HTTP requests."""

    async def http_request(self, request: HttpRequest) -> HttpResponse:
        """Answer one request; an exception becomes a logged 500."""
        ...


class HttpDoor(WsDoor, typing.Protocol):
    """What an HTTP connection needs from the front door that accepted it.

    It is a :class:`~gateway.server.websocket.WsDoor` too: the WebSocket an upgrade makes
    belongs to the same front door.

    Attributes:
        http_handler: The application's handler.
        admission: Connection caps, per-address limits and handshake rates.
        max_body: Largest accepted request body in bytes (else 413).
        header_timeout: Seconds to receive a request head (408 after).
        body_timeout: Seconds to receive a request body after its head (408 after).
        send_timeout: Seconds a connection may leave responses unread before it is closed.
        shutting_down: True while draining: no upgrades, no keep-alive.
    """

    http_handler: HttpHandler
    admission: Admission
    max_body: int
    header_timeout: float
    body_timeout: float
    send_timeout: float
    shutting_down: bool

    def hold_body_bytes(self, n: int) -> bool:
        """Count ``n`` more bytes of unfinished request bodies; False once over the limit."""
        ...

    def release_body_bytes(self, n: int) -> None:
        """Stop counting ``n`` bytes of request bodies (answered, dropped or gone)."""

    def note_pending_overflow(self) -> None:
        """A request is refused because unfinished requests hold too many bytes."""

    def http_opened(self, conn: HttpConnection) -> None:
        """``conn`` was admitted: track it until :meth:`http_lost` or :meth:`upgraded`."""

    def http_lost(self, conn: HttpConnection) -> None:
        """``conn``'s TCP connection is gone: stop tracking it."""

    def upgraded(self, old: HttpConnection, new: WsConnection) -> None:
        """``old``'s TCP connection now belongs to the WebSocket ``new``: track that instead."""


class _Rejected(Exception):
    """Raised inside a parser callback to stop parsing with an HTTP error status."""


@dataclass(slots=True)
class _Pending:
    request: HttpRequest | None  # None: answer ``error`` and close
    keep_alive: bool
    error: int = 0
    message: str | None = None


_REASONS = {status.value: status.phrase for status in http.HTTPStatus}


def _reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def _json_error(status: int, message: str | None = None) -> HttpResponse:
    text = message if message is not None else _reason(status)
    headers = {"Retry-After": "5"} if status in (429, 503) else {}
    return HttpResponse(status, json.dumps({"error": text}).encode(), headers)


def _refusal(status: int, message: str) -> bytes:
    """A whole response for a connection refused before anything was read from it."""
    return _serialize(_json_error(status, message), keep_alive=False, head=False)


_SKIPPED_HEADERS = frozenset({"content-length", "connection", "transfer-encoding"})


def _serialize(response: HttpResponse, *, keep_alive: bool, head: bool) -> bytes:
    body = response.body
    parts = [
        f"HTTP/1.1 {response.status} {_reason(response.status)}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
    ]
    for name, value in response.headers.items():
        if name.lower() in _SKIPPED_HEADERS:
            continue
        # A CR or LF from the application must never split the response.
        parts.append(f"{name}: {value}\r\n".replace("\r", " ").replace("\n", " ")[:-2] + "\r\n")
    parts.append("\r\n")
    head_bytes = "".join(parts).encode("latin-1", errors="replace")
    return head_bytes if head else head_bytes + body


def split_target(target: str) -> tuple[str, str]:
    """Split a request target into raw ``(path, query)``; see the module docstring."""
    if not target.startswith("/"):
        scheme, sep, rest = target.partition("://")
        if sep and scheme.isalpha():
            cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
            target = rest[cut:]
            if not target.startswith("/"):
                target = "/" + target
        elif target != "*":
            target = "/" + target
    path, _, query = target.partition("?")
    return path.partition("#")[0], query.partition("#")[0]


class HttpConnection(asyncio.Protocol):
    """A TCP connection before (or without) a WebSocket upgrade.

    The ``connection_*``, ``data_received``, ``eof_received``, ``*_writing`` and ``on_*``
    methods are for the event loop and the parser; the others for the front door.

    Args:
        door: The front door that accepted the connection.

    Attributes:
        last_active: Event-loop time of the last bytes read or response written.
    """

    def __init__(self, door: HttpDoor) -> None:
        self._door = door
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._remote: tuple[str, int] | None = None
        self._queue: deque[_Pending] = deque()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False  # the parser is done with this connection
        self._closed = False
        self._reading = True
        self._upgrade: bytearray | None = None  # handshake bytes (+ what followed) to hand over
        self._upgrade_target = ("/", "")
        self._reject = 0
        self._reject_message: str | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self.last_active = self._loop.time()
        self._head_extra = 0
        self._begun = 0  # requests begun so far (to tell whether a head began in this read)
        self._admitted = False
        self._counted_ip: str | None = None  # the address this connection is counted under
        self._forwarded_ip: str | None = None  # ... and, behind a trusted proxy, the client's
        self._deadline: float | None = None  # when the request being received times out
        self._held = 0  # request body bytes held (counted in the door's pending bytes)
        self._write_paused: asyncio.Future[None] | None = None
        self._new_message()

    def _new_message(self) -> None:
        self._in_head = False
        self._url = bytearray()
        self._headers: dict[str, str] = {}
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._body = bytearray()

    # -- for the front door ------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """True when no request is being received, waiting or answered."""
        return self._task is None and not self._queue and not self._in_head

    def timed_out(self, now: float) -> bool:
        """Answer 408 if the request being received is late.

        Args:
            now: The event loop's time.

        Returns:
            Whether the request was late (and is being answered with 408).
        """
        if self._deadline is None or now < self._deadline or self._stopped or self._closed:
            return False
        self._deadline = None
        self._stopped = True
        self._in_head = False
        self._release_bytes(len(self._body))
        self._body = bytearray()
        self._queue.append(_Pending(None, False, 408, "request not received in time"))
        self._pump()
        return True

    def close(self) -> None:
        """Close the TCP connection (after what is buffered is written)."""
        if self._transport is not None and not self._closed:
            self._transport.close()

    def close_if_idle(self) -> None:
        """Close the connection unless a request (or an upgrade) is under way."""
        if self.idle and self._upgrade is None:
            self.close()

    def abort(self) -> None:
        """Drop the TCP connection at once, buffered responses and all."""
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport, so no isinstance check.
        transport = typing.cast(asyncio.Transport, transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._remote = (str(peer[0]), int(peer[1]))
        door = self._door
        ip = self._remote[0] if self._remote is not None else None
        refusal = door.admission.admit(ip)
        if refusal is not None:
            # Written before anything is read, then closed: the client gets a clean 503.
            self._stopped = self._closed = True
            transport.write(_refusal(503, refusal))
            transport.close()
            return
        self._admitted = True
        self._counted_ip = ip if door.admission.counts(ip) else None
        self._deadline = self._loop.time() + door.header_timeout
        door.http_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)
        self._release_bytes(self._held)
        if self._admitted:
            self._admitted = False
            self._door.release_client(self._counted_ip, self._forwarded_ip)
        self._door.http_lost(self)

    def pause_writing(self) -> None:
        # The client does not read our responses: answer nothing more until it does.
        if self._write_paused is None:
            self._write_paused = self._loop.create_future()

    def resume_writing(self) -> None:
        paused, self._write_paused = self._write_paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    def _release_bytes(self, n: int) -> None:
        n = min(n, self._held)  # never more than this connection holds
        if n > 0:
            self._held -= n
            self._door.release_body_bytes(n)

    def data_received(self, data: bytes) -> None:
        if self._upgrade is not None:
            # Bytes after an upgrade request whose turn has not come (earlier requests are
            # being answered, or the work budget is spent): reading was paused, so this is at
            # most what one read brought; anything beyond a message and a head is refused.
            self._upgrade += data
            if len(self._upgrade) > self._door.max_ws_message + MAX_HEAD_BYTES:
                self.abort()
            return
        if self._stopped:
            return
        self.last_active = self._loop.time()
        continued = self._in_head
        begun = self._begun
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._upgrade is not None:
                self._upgrade += data[int(exc.args[0]) :]
            else:  # an upgrade to something else (h2c, CONNECT): answer it, then close
                self._stopped = True
        except httptools.HttpParserError:
            # The request being received is dropped with its body: free its bytes at once.
            self._release_bytes(len(self._body))
            self._body = bytearray()
            if self._upgrade is None:  # after an upgrade request the rest is not HTTP anyway
                self._stopped = True
                self._queue.append(_Pending(None, False, self._reject or 400, self._reject_message))
        else:
            if self._in_head:
                # llhttp has no limit of its own on a head arriving in many small reads, and
                # httptools reports a header only once it is complete: count the bytes of
                # reads that continue an unfinished head. A head that began in this read is
                # not counted for this read (its start is unknown; at most one read more).
                if continued and self._begun == begun:
                    self._head_extra += len(data)
                else:
                    self._head_extra = 0
                if self._head_extra > MAX_HEAD_BYTES:
                    self._stopped = True
                    self._queue.append(_Pending(None, False, 431))
        self._pump()

    def eof_received(self) -> bool | None:
        # Half-closed by the client: finish answering what was received, then close.
        if self._task is None and not self._queue:
            return None
        self._stopped = True
        self._upgrade = None
        return True

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._new_message()
        self._in_head = True
        self._begun += 1
        self._deadline = self._loop.time() + self._door.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_TARGET:
            self._fail_parse(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if len(self._raw_headers) > MAX_HEADERS or self._head_size > MAX_HEAD_BYTES:
            self._fail_parse(431)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_extra = 0
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._door.max_body:
            self._fail_parse(413)
        body_expected = (length is not None and length != "0") or (
            "transfer-encoding" in self._headers
        )
        self._deadline = self._loop.time() + self._door.body_timeout if body_expected else None
        expect = self._headers.get("expect")
        if (
            expect is not None
            and expect.lower() == "100-continue"
            and self._task is None
            and not self._queue
            and self._transport is not None
        ):
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body += body
        door = self._door
        self._held += len(body)
        within = door.hold_body_bytes(len(body))
        if len(self._body) > door.max_body:
            self._fail_parse(413)
        if not within:
            door.note_pending_overflow()
            self._fail_parse(503, "server busy: too many unfinished requests; retry later")

    def on_message_complete(self) -> None:
        self._deadline = None
        if self._stopped:
            return
        method = self._parser.get_method().decode("ascii", errors="replace")
        target = self._url.decode("latin-1")
        path, query = split_target(target)
        if method == "GET" and self._headers.get("upgrade", "").lower() == "websocket":
            if (
                self._body
                or "transfer-encoding" in self._headers
                or (self._headers.get("content-length", "0") != "0")
            ):
                self._release_bytes(len(self._body))
                self._body = bytearray()
                self._stopped = True
                self._queue.append(_Pending(None, False, 400, "a WebSocket handshake has no body"))
                return
            # Rebuild the head for websockets to parse; bytes after it are appended later.
            version = self._parser.get_http_version()
            head = [f"GET {target} HTTP/{version}\r\n".encode("latin-1")]
            head.extend(name + b": " + value + b"\r\n" for name, value in self._raw_headers)
            head.append(b"\r\n")
            self._upgrade = bytearray(b"".join(head))
            self._upgrade_target = (path, query)
            self._stopped = True
            # Nothing more is read until the hand-over: the WebSocket reads it then.
            if self._reading and self._transport is not None:
                self._reading = False
                self._transport.pause_reading()
            return
        request = HttpRequest(method, path, query, self._headers, bytes(self._body), self._remote)
        keep_alive = self._parser.should_keep_alive() and not self._parser.should_upgrade()
        self._queue.append(_Pending(request, keep_alive))
        if len(self._queue) >= MAX_PIPELINE and self._reading and self._transport is not None:
            self._reading = False
            self._transport.pause_reading()

    def _fail_parse(self, status: int, message: str | None = None) -> typing.NoReturn:
        self._reject = status
        self._reject_message = message
        raise _Rejected(status)

    # -- answering ---------------------------------------------------------------------------

    def _pump(self) -> None:
        if self._task is not None or self._closed:
            return
        if self._queue:
            self._task = self._loop.create_task(self._serve())
        elif self._upgrade is not None:
            self._upgrade_now()
        elif self._stopped:
            self._linger()

    def _upgrade_now(self, *, resumed: bool = False) -> None:
        if self._closed or self._upgrade is None:
            return
        door = self._door
        work = door.work
        if not work.may_run(resumed=resumed):
            # Out of budget for this loop iteration: wait for a later one, reading nothing.
            if self._reading and self._transport is not None:
                self._reading = False
                self._transport.pause_reading()
            work.defer(lambda: self._upgrade_now(resumed=True))
            return
        work.spend(_HANDSHAKE_COST)
        refusal = self._admit_upgrade()
        if refusal is not None:
            status, message = refusal
            self._upgrade = None
            self._queue.append(_Pending(None, False, status, message))
            self._pump()
            return
        self._hand_over()

    def _admit_upgrade(self) -> tuple[int, str] | None:
        """Per-address limits of a WebSocket handshake: (status, message) when refused."""
        admission = self._door.admission
        peer = self._remote[0] if self._remote is not None else None
        client = admission.client_address(peer, self._headers.get("x-forwarded-for"))
        if client != peer and client is not None:
            refusal = admission.admit_forwarded(client)
            if refusal is not None:
                return 503, refusal
            self._forwarded_ip = client
        if self._door.shutting_down:
            return 503, "this node is shutting down; reconnect"
        refusal = admission.shed(client)
        if refusal is not None:
            return 503, refusal
        refusal = admission.handshake(client)
        if refusal is not None:
            return 429, refusal
        return None

    async def _writable(self) -> None:
        paused = self._write_paused
        if paused is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(paused), self._door.send_timeout)
        except TimeoutError:
            log.info(
                "closing HTTP connection from %s: responses unread for %g s",
                self._remote,
                self._door.send_timeout,
            )
            self.abort()

    async def _serve(self) -> None:
        keep_alive = True
        try:
            while self._queue and not self._closed:
                item = self._queue.popleft()
                if (
                    not self._reading
                    and len(self._queue) < MAX_PIPELINE // 2
                    and self._upgrade is None
                ):
                    self._reading = True
                    if self._transport is not None:
                        self._transport.resume_reading()
                if item.request is None:
                    self._send(_json_error(item.error, item.message), keep_alive=False, head=False)
                    keep_alive = False
                    break
                if self._write_paused is not None:
                    await self._writable()
                    if self._closed:
                        break
                # The request is complete: its body no longer counts as unfinished.
                self._release_bytes(len(item.request.body))
                work = self._door.work
                if work.may_run():
                    work.spend()
                else:
                    await work.turn()  # charged when the turn comes
                response = await self._answer(item.request)
                keep_alive = item.keep_alive and not self._door.shutting_down
                self._send(response, keep_alive=keep_alive, head=item.request.method == "HEAD")
                if not keep_alive:
                    break
        finally:
            self._task = None
        if not keep_alive:
            self._linger()
        else:
            self._pump()

    async def _answer(self, request: HttpRequest) -> HttpResponse:
        try:
            response = await self._door.http_handler.http_request(request)
            if not isinstance(response, HttpResponse) or not 100 <= response.status <= 599:
                raise TypeError(f"handler returned {response!r}, not an HttpResponse")
            return response
        except Exception:
            log.exception("HTTP handler failed on %s %s", request.method, request.path)
            return _json_error(500, "internal server error")

    def _send(self, response: HttpResponse, *, keep_alive: bool, head: bool) -> None:
        if self._closed or self._transport is None or self._transport.is_closing():
            return
        self.last_active = self._loop.time()
        self._transport.write(_serialize(response, keep_alive=keep_alive, head=head))

    def _linger(self) -> None:
        # Closing while the client still sends would make the kernel answer with a reset that
        # can destroy our last response before the client reads it; so send FIN, keep reading
        # (and discarding) until the client closes, for at most LINGER seconds.
        transport = self._transport
        if transport is None or self._closed or transport.is_closing():
            return
        self._stopped = True
        if not self._reading:
            self._reading = True
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
            self._linger_timer = self._loop.call_later(LINGER, transport.close)
        else:
            transport.close()

    def _hand_over(self) -> None:
        transport = self._transport
        assert transport is not None and self._upgrade is not None
        raw = bytes(self._upgrade)
        self._upgrade = None
        if not self._reading:
            self._reading = True
            transport.resume_reading()
        path, query = self._upgrade_target
        # The TCP connection stays counted: the WebSocket releases it when it closes. Body
        # bytes of the upgrade request (a body without "Connection: Upgrade" is parsed) are
        # released here: this object's connection_lost will never run.
        ticket = (self._counted_ip, self._forwarded_ip)
        conn = WsConnection(self._door, transport, path, query, self._remote, ticket)
        self._release_bytes(self._held)
        self._body = bytearray()
        self._admitted = False
        self._deadline = None
        self._door.upgraded(self, conn)
        transport.set_protocol(conn)
        conn.handshake(raw)
