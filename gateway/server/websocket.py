"""One WebSocket connection of the front door, from its opening handshake to its end.

A :class:`WsConnection` is the transport's :class:`asyncio.Protocol` once the HTTP connection
(:mod:`gateway.server.httpconn`) hands an upgrade request over. websockets' sans-I/O
:class:`~websockets.server.ServerProtocol` does the handshake, framing, masking checks,
automatic pongs and the closing handshake, while this module moves bytes and owns the timers.

Choices worth knowing:

* WebSocket extensions (permessage-deflate) are never negotiated, so a server frame is the same
  bytes for every receiver: :func:`encode_text_frame` once, then :func:`broadcast_frame` (or
  :meth:`WsConnection.send_frame_bytes`) per receiver, is how fan-out stays cheap.
* Frames queued during one event-loop iteration are written with one ``write`` per connection
  at its end (:class:`WriteCoalescer`); more than 64 KiB queued is written at once.
* A socket whose transport write buffer grows past ``ws_high_water`` is a slow consumer and is
  closed with 4100 ("over capacity": pusher-js retries after 1 s).
* Each complete message is client work paid from the per-iteration
  :class:`~gateway.server.admission.WorkBudget`: a socket with more input than the budget
  allows is not read until a later iteration.
* A closing handshake the client does not finish within ``ws_close_timeout`` ends with the TCP
  connection aborted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import functools
import hashlib
import itertools
import logging
import re
import struct
import time
import typing
from collections.abc import Iterable
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Event, State
from websockets.server import ServerProtocol

from gateway.server.admission import WorkBudget

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = [
    "WriteCoalescer",
    "WsConnection",
    "WsDoor",
    "WsHandler",
    "broadcast_frame",
    "encode_text_frame",
    "parse_text_frames",
]

# The whole front door logs under one name, whichever module: log filters rely on it.
log = logging.getLogger("gateway.server.frontdoor")

_OPEN = State.OPEN
_TEXT = Opcode.TEXT
_BINARY = Opcode.BINARY
_CONT = Opcode.CONT
_DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)
_ids = itertools.count(1)
_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack

#: Bytes of frames a connection collects before writing them without waiting for the end of
#: the event-loop iteration.
_COALESCE_LIMIT = 65_536


class _QuietLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets logs every connection's open and close at INFO; at 10 000 connections that
    is noise (``pg_connections_opened_total`` counts them): they go to DEBUG."""

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


_ws_logger = _QuietLogger(logging.getLogger("websockets.server"), {})

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> bytes:
    """The ``Date`` header value of ``second`` (formatted once a second)."""
    return email.utils.formatdate(second, usegmt=True).encode()


def fast_handshake(raw_request: bytes) -> tuple[bytes, bytes] | None:
    """The 101 response to an ordinary WebSocket upgrade request, without websockets' parser.

    Accepts only the common shape: ``GET <target> HTTP/1.1``; header names that are tokens
    and values without control characters; exactly one ``Upgrade: websocket``, one
    ``Connection`` header whose tokens include ``upgrade``, ``Sec-WebSocket-Version: 13`` and
    one ``Sec-WebSocket-Key`` that is base64 of 16 bytes; no body headers. Extensions and
    subprotocols are not negotiated (the server offers none), as in websockets' own answer,
    which this reproduces byte for byte (``Date``, ``Upgrade``, ``Connection``,
    ``Sec-WebSocket-Accept``). Anything else returns None and goes through websockets, which
    answers it (or refuses it with its exact error response).

    Args:
        raw_request: The request head (up to and including the blank line) and any bytes that
            followed it.

    Returns:
        ``(response, rest)``: the response bytes and the bytes after the request head; or None.
    """
    end = raw_request.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = raw_request[:end].split(b"\r\n")
    first = lines[0]
    if not first.startswith(b"GET ") or not first.endswith(b" HTTP/1.1") or first.count(b" ") != 2:
        return None
    found: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None:
            return None
        value = value.strip(b" \t")
        if _VALUE.fullmatch(value) is None:
            return None
        lname = name.lower()
        if lname in _HANDSHAKE_HEADERS:
            if lname in found:
                return None  # repeated: websockets decides
            found[lname] = value
        elif lname in (b"content-length", b"transfer-encoding"):
            return None
    key = found.get(b"sec-websocket-key")
    connection = found.get(b"connection")
    if (
        key is None
        or connection is None
        or found.get(b"upgrade", b"").lower() != b"websocket"
        or found.get(b"sec-websocket-version") != b"13"
    ):
        return None
    tokens = [token.strip(b" \t") for token in connection.split(b",")]
    if any(_TOKEN.fullmatch(t) is None for t in tokens if t) or b"upgrade" not in (
        t.lower() for t in tokens
    ):
        return None
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except binascii.Error:
        return None
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    response = (
        b"HTTP/1.1 101 Switching Protocols\r\nDate: "
        + _http_date(int(time.time()))
        + b"\r\nUpgrade: websocket"
        b"\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    return response, raw_request[end + 4 :]


_TOKEN = re.compile(rb"[-!#$%&\'*+.^_`|~0-9a-zA-Z]+")
_VALUE = re.compile(rb"[\x09\x20-\x7e\x80-\xff]*")
_HANDSHAKE_HEADERS = frozenset(
    (b"upgrade", b"connection", b"sec-websocket-version", b"sec-websocket-key")
)


class WsHandler(typing.Protocol):
    """The application's callbacks for WebSocket connections.

    All calls are synchronous and happen on the event loop; the handler may call
    :meth:`WsConnection.send_text` or :meth:`WsConnection.close` from inside them. An exception
    from a callback is logged and closes that connection with 1011.
    """

    def ws_open(self, conn: WsConnection) -> None:
        """A handshake completed; ``conn`` is open."""

    def ws_text(self, conn: WsConnection, text: str) -> None:
        """A complete text message arrived."""

    def ws_binary(self, conn: WsConnection, data: bytes) -> None:
        """A complete binary message arrived."""

    def ws_closed(self, conn: WsConnection, code: int | None) -> None:
        """The connection is gone; called exactly once per opened connection.

        ``code`` is the close code the client sent (1005 for a close frame without one), or
        ``None`` when the TCP connection ended without a close frame from the client.
        """


class WsDoor(typing.Protocol):
    """What a WebSocket connection needs from the front door that accepted it.

    Attributes:
        ws_handler: The application's callbacks.
        work: The budget of client work per event-loop iteration.
        writes: Writes the frames connections queued, once per loop iteration.
        max_ws_message: Largest accepted message in bytes (else close 1009).
        ws_high_water: Write-buffer size in bytes above which a socket is closed with 4100.
        ws_close_timeout: Seconds to wait for the client's side of a closing handshake.
    """

    ws_handler: WsHandler
    work: WorkBudget
    writes: WriteCoalescer
    max_ws_message: int
    ws_high_water: int
    ws_close_timeout: float

    def note_slow_consumer(self) -> None:
        """A connection is being closed with 4100 for exceeding ``ws_high_water``."""

    def release_client(self, ip: str | None, forwarded: str | None) -> None:
        """Stop counting a closed TCP connection under its addresses."""

    def websocket_lost(self, conn: WsConnection) -> None:
        """``conn``'s TCP connection is gone: stop tracking it."""


def encode_text_frame(text: str) -> bytes:
    """Serialize ``text`` as one unmasked, unfragmented server text frame.

    The result is the same bytes websockets' ``ServerProtocol.send_text`` produces when no
    extension is negotiated (the front door never negotiates one), so it can be written to any
    number of connections with :func:`broadcast_frame` or :meth:`WsConnection.queue_frame`.

    Args:
        text: The message.

    Returns:
        The whole frame, header included.
    """
    data = text.encode()
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65_536:
        return _pack_16(0x81, 126, n) + data
    return _pack_64(0x81, 127, n) + data


def parse_text_frames(data: bytes, max_size: int | None) -> list[bytes] | None:
    """The payloads of ``data`` if it is nothing but whole, small, masked client text frames.

    This is the receive fast path: a client's ``pusher:*`` message is one such frame, and
    parsing it here costs a fraction of websockets' generator-based parser. Only what needs no
    protocol state qualifies: each frame FIN, no reserved bit, opcode text, masked, at most
    ``max_size`` bytes (when not None) and at most 65 535 bytes, and ``data`` ending exactly at
    the end of a frame. For anything else (control, binary or fragmented frames, a partial
    frame, an oversized or unmasked one) the answer is None and the caller hands ``data`` to
    websockets, which then behaves exactly as if this function did not exist: for the frames
    this accepts, websockets would emit the same payloads as text frames and change no state.

    Args:
        data: Bytes received from the client, with nothing buffered before them.
        max_size: The largest accepted message (websockets' ``max_size``), or None.

    Returns:
        The unmasked payloads in order, or None.
    """
    out: list[bytes] = []
    end = len(data)
    pos = 0
    while pos < end:
        if end - pos < 6 or data[pos] != 0x81:
            return None
        length = data[pos + 1] ^ 0x80  # the mask bit must be set: its absence leaves >= 128
        if length < 126:
            start = pos + 6
        elif length == 126 and end - pos >= 8:
            length = (data[pos + 2] << 8) | data[pos + 3]
            start = pos + 8
        else:
            return None  # unmasked, 64-bit length, or a partial header
        stop = start + length
        if stop > end or (max_size is not None and length > max_size):
            return None
        out.append(apply_mask(data[start:stop], data[start - 4 : start]))
        pos = stop
    return out if out else None


def broadcast_frame(conns: Iterable[WsConnection], frame: bytes) -> int:
    """Write an already-encoded frame to every open connection in ``conns``.

    Args:
        conns: The receivers; closed ones are skipped.
        frame: A whole server frame, e.g. from :func:`encode_text_frame`.

    Returns:
        How many connections were open (and so received the frame).
    """
    sent = 0
    for conn in conns:
        if conn.queue_frame(frame):
            sent += 1
    return sent


class WriteCoalescer:
    """The connections that queued frames in this event-loop iteration.

    Each is written once, with one ``write``, when the iteration ends, however many frames it
    got; one coalescer serves every connection of a front door.
    """

    __slots__ = ("_dirty",)

    def __init__(self) -> None:
        self._dirty: list[WsConnection] = []

    def add(self, conn: WsConnection) -> None:
        """Write ``conn``'s queued frames at the end of this iteration (call once per batch)."""
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self._write)
        self._dirty.append(conn)

    def _write(self) -> None:
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            if not conn._transport.is_closing():
                conn._write_pending()
            else:
                conn._pending = []
                conn._pending_bytes = 0


class WsConnection(asyncio.Protocol):
    """One WebSocket connection after (or during) its opening handshake.

    This object is also the transport's :class:`asyncio.Protocol` once the connection is
    upgraded; the ``connection_*``, ``data_received``, ``eof_received`` and ``*_writing``
    methods are for the event loop, and :meth:`handshake` for the HTTP connection that hands
    over, not for applications.

    Args:
        door: The front door that accepted the TCP connection.
        transport: The TCP (or TLS) transport, taken over from the HTTP connection.
        path: Raw path of the handshake request target.
        query: Raw query string of the handshake request target.
        remote: Peer ``(host, port)`` if known.
        ticket: The ``(address, forwarded address)`` this TCP connection is counted under;
            released when it closes.

    Attributes:
        id: Unique per connection in this process.
        path: Raw path of the handshake request target.
        query: Raw query string of the handshake request target.
        remote: Peer ``(host, port)`` if known.
    """

    __slots__ = (
        "_close_timer",
        "_door",
        "_fragments",
        "_fragments_text",
        "_notified",
        "_open",
        "_opened",
        "_pending",
        "_pending_bytes",
        "_proto",
        "_stash",
        "_ticket",
        "_transport",
        "_writes",
        "id",
        "path",
        "query",
        "remote",
    )

    def __init__(
        self,
        door: WsDoor,
        transport: asyncio.Transport,
        path: str,
        query: str,
        remote: tuple[str, int] | None,
        ticket: tuple[str | None, str | None],
    ) -> None:
        self.id = next(_ids)
        self.path = path
        self.query = query
        self.remote = remote
        self._door = door
        self._writes = door.writes
        self._transport = transport
        # Frames queued during this event-loop iteration; written with one call at its end.
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._proto: ServerProtocol  # made by :meth:`handshake`
        self._open = False
        self._opened = False
        self._notified = False
        self._fragments: list[bytes] | None = None
        self._fragments_text = False
        self._close_timer: asyncio.TimerHandle | None = None
        # Frames received but not handled yet: the work budget ran out (reading is paused).
        self._stash: list[Event] = []
        self._ticket: tuple[str | None, str | None] | None = ticket

    def __repr__(self) -> str:
        return f"<WsConnection {self.id} {self.path!r} open={self._open}>"

    # -- application API ---------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True while messages can be sent (handshake done, no close frame sent or received)."""
        return self._open

    @property
    def buffered(self) -> int:
        """Bytes waiting in the transport's write buffer."""
        return self._transport.get_write_buffer_size()

    def send_text(self, text: str) -> None:
        """Queue a text frame; a no-op once the connection is no longer open.

        Args:
            text: The message.
        """
        if self._open:
            self.queue_frame(encode_text_frame(text))

    def send_frame_bytes(self, frame: bytes) -> None:
        """Queue an already-serialized server frame (see :func:`encode_text_frame`).

        A no-op once the connection is no longer open.

        Args:
            frame: A whole server frame.
        """
        self.queue_frame(frame)

    def queue_frame(self, frame: bytes) -> bool:
        """Queue an already-serialized server frame if the connection is open.

        This is the fan-out hot path (once per delivery per socket), so the open check and the
        queueing are one call.

        Args:
            frame: A whole server frame (see :func:`encode_text_frame`).

        Returns:
            Whether the connection was open, and so will send the frame.
        """
        if not self._open:
            return False
        if not self._pending:
            self._writes.add(self)
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        if self._pending_bytes > _COALESCE_LIMIT:
            # Large bursts go to the transport now, where the slow-consumer check applies.
            self._write_pending()
        return True

    def _write_pending(self) -> None:
        pending = self._pending
        if pending:
            self._pending = []
            self._pending_bytes = 0
            if len(pending) == 1:
                self._transport.write(pending[0])
            else:
                self._transport.write(b"".join(pending))

    def ping(self) -> None:
        """Send a protocol-level ping (the client's pong is consumed silently)."""
        if self._open:
            self._proto.send_ping(b"")
            self._flush()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with ``code``; the transport closes after it.

        If the client does not finish the handshake within the front door's close timeout,
        the TCP connection is aborted. A no-op if the connection is not open.

        Args:
            code: The close code.
            reason: The close reason; cut to the 123 bytes a close frame has room for.
        """
        if not self._open:
            return
        reason_bytes = reason.encode()[:123]
        reason = reason_bytes.decode(errors="ignore")
        try:
            self._proto.send_close(code, reason)
        except Exception:  # an invalid close code from the caller must not leave us half-open
            log.warning("invalid close code %r for connection %d; using 1011", code, self.id)
            self._proto.fail(1011, "internal error")
        self._open = False
        self._flush()

    def abort(self) -> None:
        """Drop the TCP connection at once, without (or without finishing) a closing handshake."""
        self._close_timer = None
        self._open = False
        self._transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        proto = self._proto
        if (
            proto.state is _OPEN
            and not self._stash
            and not proto.reader.buffer
            and proto.current_size is None
            and not proto.debug
        ):
            texts = parse_text_frames(data, proto.max_message_size)
            if texts is not None:
                # websockets would only have emitted these frames: no state of its changes.
                self._dispatch_texts(texts)
                self._flush()
                return
        proto.receive_data(data)
        events = proto.events_received()
        self._open = proto.state is _OPEN
        if events:
            if self._stash:
                self._stash.extend(events)
            else:
                self._dispatch(events)
        self._flush()

    def eof_received(self) -> bool | None:
        self._proto.receive_eof()
        self._open = False
        self._flush()
        return None  # the transport closes itself

    def pause_writing(self) -> None:
        # Called by the transport, synchronously inside write(), when its buffer passes
        # ws_high_water: this client does not read as fast as we send.
        if self._open and self._transport.get_write_buffer_size() > self._door.ws_high_water:
            self._door.note_slow_consumer()
            log.info("closing slow consumer %d (%d bytes buffered)", self.id, self.buffered)
            self.close(4100, "over capacity")

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        self._stash = []
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._ticket is not None:
            self._door.release_client(*self._ticket)
            self._ticket = None
        self._door.websocket_lost(self)
        if self._opened and not self._notified:
            self._notified = True
            received = self._proto.close_rcvd
            code = received.code if received is not None else None
            try:
                self._door.ws_handler.ws_closed(self, code)
            except Exception:
                log.exception("ws_closed handler failed for connection %d", self.id)

    # -- the hand-over -----------------------------------------------------------------------

    def handshake(self, raw_request: bytes) -> None:
        """Run the opening handshake on the request bytes (plus any bytes that followed).

        Called once, by the HTTP connection, right after this object became the transport's
        protocol.

        Args:
            raw_request: The upgrade request's head and whatever the client sent after it.
        """
        max_size = self._door.max_ws_message
        fast = fast_handshake(raw_request)
        if fast is not None:
            # The common request: answered here; websockets takes over from the first frame.
            response, rest = fast
            self._proto = proto = ServerProtocol(max_size=max_size, logger=_ws_logger, state=_OPEN)
            self._open = True
            # Queued like a frame: written together with connection_established, one write.
            self.queue_frame(response)
            later: list[Event] = []
            if rest:
                proto.receive_data(rest)
                later = proto.events_received()
        else:
            self._proto = proto = ServerProtocol(max_size=max_size, logger=_ws_logger)
            proto.receive_data(raw_request)
            events = proto.events_received()
            if not events or not isinstance(events[0], Request):
                self._flush()  # websockets could not parse it and already sent EOF
                return
            response_obj = proto.accept(events[0])
            proto.send_response(response_obj)
            self._open = proto.state is _OPEN
            self._flush()
            if not self._open:
                return
            later = events[1:]
        self._opened = True
        self._transport.set_write_buffer_limits(high=self._door.ws_high_water)
        try:
            self._door.ws_handler.ws_open(self)
        except Exception:
            log.exception("ws_open handler failed for connection %d", self.id)
            self._fail(1011, "internal error")
            return
        if later:
            self._dispatch(later)
            self._flush()

    # -- internals ---------------------------------------------------------------------------

    def _dispatch(self, events: list[Event], *, resumed: bool = False) -> None:
        work = self._door.work
        for i, event in enumerate(events):
            if not self._open:
                return
            if not isinstance(event, Frame):
                continue
            opcode = event.opcode
            if event.fin and opcode in _DATA_OPCODES:
                # A complete message: client work, paid from the loop iteration's budget.
                if not work.may_run(resumed=resumed):
                    self._stash = events[i:]
                    self._transport.pause_reading()
                    work.defer(self._resume)
                    return
                work.spend()
            if opcode is _TEXT or opcode is _BINARY:
                if event.fin:
                    self._deliver(opcode is _TEXT, bytes(event.data))
                else:
                    self._fragments = [bytes(event.data)]
                    self._fragments_text = opcode is _TEXT
            elif opcode is _CONT and self._fragments is not None:
                self._fragments.append(bytes(event.data))
                if event.fin:
                    data = b"".join(self._fragments)
                    self._fragments = None
                    self._deliver(self._fragments_text, data)
            # PING (auto-ponged by websockets), PONG and CLOSE need nothing from us.

    def _dispatch_texts(self, texts: list[bytes]) -> None:
        """:meth:`_dispatch` for the complete text messages of the receive fast path."""
        work = self._door.work
        for i, data in enumerate(texts):
            if not self._open:
                return
            if not work.may_run(resumed=False):
                self._stash = [Frame(_TEXT, text) for text in texts[i:]]
                self._transport.pause_reading()
                work.defer(self._resume)
                return
            work.spend()
            self._deliver(True, data)

    def _resume(self) -> None:
        """Handle the frames that waited for the work budget, then read the socket again."""
        events, self._stash = self._stash, []
        if not events or self._transport.is_closing():
            return
        self._dispatch(events, resumed=True)
        if not self._stash and not self._transport.is_closing():
            self._transport.resume_reading()
        self._flush()

    def _deliver(self, is_text: bool, data: bytes) -> None:
        handler = self._door.ws_handler
        try:
            if is_text:
                try:
                    text = data.decode()
                except UnicodeDecodeError:
                    self._fail(1007, "invalid UTF-8")
                    return
                handler.ws_text(self, text)
            else:
                handler.ws_binary(self, data)
        except Exception:
            log.exception("WebSocket handler failed for connection %d", self.id)
            self._fail(1011, "internal error")

    def _fail(self, code: int, reason: str) -> None:
        if self._proto.state is _OPEN:
            self._proto.fail(code, reason)
        self._open = False
        self._flush()

    def _flush(self) -> None:
        transport = self._transport
        # Queued frames go first: a pong or close frame must never overtake them.
        self._write_pending()
        for chunk in self._proto.data_to_send():
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        if self._close_timer is None and self._proto.close_expected():
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(self._door.ws_close_timeout, self.abort)
