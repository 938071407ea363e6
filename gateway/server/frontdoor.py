"""The front door's listener: one port for HTTP/1.1 and WebSockets, and its open connections.

Each TCP connection is one :class:`asyncio.Protocol` (no task per connection): an
:class:`~gateway.server.httpconn.HttpConnection` that answers requests through the
application's :class:`~gateway.server.httpconn.HttpHandler` and hands a WebSocket upgrade to a
:class:`~gateway.server.websocket.WsConnection`, which reports to the application's
:class:`~gateway.server.websocket.WsHandler`. The connections reach this listener only through
the narrow :class:`~gateway.server.httpconn.HttpDoor` and
:class:`~gateway.server.websocket.WsDoor` protocols, which :class:`FrontDoor` implements; the
names applications use are re-exported here.

Choices worth knowing:

* A sweep, every second (or a quarter of ``http_idle_timeout`` if shorter), answers late
  requests with 408, closes keep-alive connections idle for ``http_idle_timeout`` and lets
  :class:`~gateway.server.admission.Admission` do its upkeep (idle rate buckets, reports).
* The bodies of all unfinished requests are counted here, against one ``max_pending_bytes``.
* Draining (:meth:`FrontDoor.stop_accepting`) refuses new connections and WebSocket upgrades
  and ends keep-alive while open connections go on; :meth:`FrontDoor.shutdown` closes them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from gateway.metrics import Metrics
from gateway.server.admission import Admission, AdmissionSettings, WorkBudget
from gateway.server.httpconn import HttpConnection, HttpHandler
from gateway.server.websocket import (
    WriteCoalescer,
    WsConnection,
    WsHandler,
)

__all__ = ["FrontDoor", "listen_backlog", "start_frontdoor"]

log = logging.getLogger("gateway.server.frontdoor")


class FrontDoor:
    """A listening front door; made by :func:`start_frontdoor`.

    It is the :class:`~gateway.server.httpconn.HttpDoor` (and so the
    :class:`~gateway.server.websocket.WsDoor`) of every connection it accepts: the settings
    they read and the methods under "for the connections" are theirs, not applications'.

    Attributes:
        port: The bound port.
        slow_consumers_closed: WebSockets closed with 4100 for exceeding ``ws_high_water``.
        pending_bytes: Request body bytes buffered over all unfinished requests.
        admission: Connection caps, per-address limits and handshake rates.
        work: The budget of client work per event-loop iteration.
    """

    def __init__(
        self,
        *,
        ws: WsHandler,
        http: HttpHandler,
        max_body: int,
        max_ws_message: int,
        ws_high_water: int,
        ws_close_timeout: float,
        http_idle_timeout: float,
        admission: Admission,
        work: WorkBudget,
        header_timeout: float,
        body_timeout: float,
        max_pending_bytes: int,
        send_timeout: float,
    ) -> None:
        self.ws_handler = ws
        self.http_handler = http
        self.max_body = max_body
        self.max_ws_message = max_ws_message
        self.ws_high_water = ws_high_water
        self.ws_close_timeout = ws_close_timeout
        self.http_idle_timeout = http_idle_timeout
        self.admission = admission
        self.work = work
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_pending_bytes = max_pending_bytes
        self.send_timeout = send_timeout
        self.pending_bytes = 0
        self.timeouts = 0
        self._overflow_logged = 0.0
        self.shutting_down = False
        self.slow_consumers_closed = 0
        self.port = 0
        self.writes = WriteCoalescer()
        self._server: asyncio.Server | None = None
        self._ws: set[WsConnection] = set()
        self._http: set[HttpConnection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None

    @property
    def connections(self) -> int:
        """Open TCP connections (HTTP and WebSocket)."""
        return len(self._ws) + len(self._http)

    def counts(self) -> tuple[int, int]:
        """Open TCP connections: (upgraded to WebSocket, plain HTTP)."""
        return len(self._ws), len(self._http)

    @property
    def websockets(self) -> list[WsConnection]:
        """The WebSocket connections whose handshake completed and that are still open."""
        return [conn for conn in self._ws if conn.is_open]

    def stop_accepting(self) -> None:
        """Draining: refuse new connections and WebSocket upgrades, end keep-alive; the
        connections open go on (and their timeouts keep being enforced)."""
        self.shutting_down = True
        if self._server is not None:
            self._server.close()

    def close(self) -> None:
        """Stop accepting connections; existing ones are left alone."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def shutdown(
        self, code: int = 4200, reason: str = "server shutting down", timeout: float = 5.0
    ) -> None:
        """Stop listening and close every connection, waiting at most ``timeout`` seconds.

        WebSockets are closed with ``code`` (4200 makes pusher-js reconnect at once, to another
        node behind the load balancer); idle HTTP connections are closed and busy ones after
        their current response. Whatever is still open at the deadline is aborted.
        """
        self.shutting_down = True
        self.close()
        for conn in list(self._ws):
            conn.close(code, reason)
        for http_conn in list(self._http):
            http_conn.close_if_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.connections:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), max(0.0, deadline - loop.time()))
        for conn in list(self._ws):
            conn.abort()
        for http_conn in list(self._http):
            http_conn.abort()
        # Let the aborts reach connection_lost so ws_closed has been called on return.
        for _ in range(3):
            await asyncio.sleep(0)

    # -- for the connections (HttpDoor, WsDoor) -----------------------------------------------

    def http_opened(self, conn: HttpConnection) -> None:
        """Track an admitted HTTP connection until it is lost or upgraded."""
        self._http.add(conn)

    def upgraded(self, old: HttpConnection, new: WsConnection) -> None:
        """Track the WebSocket ``new`` instead of ``old``, whose TCP connection it took over."""
        self._http.discard(old)
        self._ws.add(new)

    def http_lost(self, conn: HttpConnection) -> None:
        """Stop tracking an HTTP connection whose TCP connection is gone."""
        self._http.discard(conn)
        self._check_drained()

    def websocket_lost(self, conn: WsConnection) -> None:
        """Stop tracking a WebSocket whose TCP connection is gone."""
        self._ws.discard(conn)
        self._check_drained()

    def release_client(self, ip: str | None, forwarded: str | None) -> None:
        """Stop counting a closed TCP connection under its address (and forwarded address)."""
        self.admission.release(ip)
        if forwarded is not None:
            self.admission.release(forwarded, total=False)

    def note_slow_consumer(self) -> None:
        """Count a WebSocket closed with 4100 for exceeding ``ws_high_water``."""
        self.slow_consumers_closed += 1

    def hold_body_bytes(self, n: int) -> bool:
        """Count ``n`` more bytes of unfinished request bodies.

        Args:
            n: Bytes just received.

        Returns:
            False once all unfinished requests hold more than ``max_pending_bytes``.
        """
        self.pending_bytes += n
        return self.pending_bytes <= self.max_pending_bytes

    def release_body_bytes(self, n: int) -> None:
        """Stop counting ``n`` bytes of request bodies (answered, dropped or gone)."""
        self.pending_bytes -= n

    def note_pending_overflow(self) -> None:
        """A request was refused because unfinished requests hold too many bytes."""
        now = asyncio.get_running_loop().time()
        if now - self._overflow_logged > 10.0:
            self._overflow_logged = now
            log.warning(
                "unfinished HTTP requests hold %d bytes (max_pending_request_bytes %d): "
                "refusing requests with 503 until they finish or time out",
                self.pending_bytes,
                self.max_pending_bytes,
            )

    # -- internals ---------------------------------------------------------------------------

    def _check_drained(self) -> None:
        if self._drained is not None and not self.connections:
            self._drained.set()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        limit = now - self.http_idle_timeout
        for conn in list(self._http):
            if conn.timed_out(now):
                self.timeouts += 1
            elif conn.last_active < limit and conn.idle:
                conn.close()
        self.admission.sweep()
        self._sweeper = loop.call_later(min(1.0, self.http_idle_timeout / 4), self._sweep)


def listen_backlog() -> int:
    """The listen backlog: the kernel's cap (``net.core.somaxconn``), 4096 if unknown.

    A node that dies leaves thousands of clients reconnecting to the others within a second;
    connections beyond the backlog are dropped by the kernel and the clients' TCP retries
    only after 1 s, then 3 s. So the queue is as long as the kernel allows.
    """
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
            return max(128, min(65_535, int(f.read().strip())))
    except (OSError, ValueError):
        return 4096


async def start_frontdoor(
    host: str,
    port: int,
    *,
    ws: WsHandler,
    http: HttpHandler,
    max_body: int = 1_048_576,
    max_ws_message: int = 65_536,
    ws_high_water: int = 1_048_576,
    ws_close_timeout: float = 5.0,
    http_idle_timeout: float = 60.0,
    backlog: int | None = None,
    admission: Admission | None = None,
    work_budget: int = 1_000_000,
    ssl_context: ssl.SSLContext | None = None,
    header_timeout: float = 10.0,
    body_timeout: float = 30.0,
    max_pending_bytes: int = 64 * 1_048_576,
    send_timeout: float = 30.0,
) -> FrontDoor:
    """Listen on ``host:port`` (0 picks a free port) and serve WebSockets and HTTP.

    Args:
        host: Bind address.
        port: Bind port; 0 for any free one (see :attr:`FrontDoor.port`).
        ws: Receives WebSocket connections and messages.
        http: Answers every request that is not a WebSocket upgrade.
        max_body: Largest accepted request body in bytes (else 413).
        max_ws_message: Largest accepted WebSocket message in bytes (else close 1009).
        ws_high_water: Write-buffer size in bytes above which a socket is closed with 4100.
        ws_close_timeout: Seconds to wait for the client's side of a closing handshake.
        http_idle_timeout: Seconds after which an idle keep-alive connection is closed.
        backlog: Listen backlog (default: :func:`listen_backlog`).
        admission: Connection caps, per-address limits and handshake rates (default: none).
        work_budget: Client messages handled per event-loop iteration (see
            :class:`~gateway.server.admission.WorkBudget`).
        ssl_context: Serve TLS (``wss://``, ``https://``) with this context.
        header_timeout: Seconds to receive a request head (408 after), from its first byte or
            from the connection's start.
        body_timeout: Seconds to receive a request body after its head (408 after).
        max_pending_bytes: Body bytes all unfinished requests may hold together (503 beyond).
        send_timeout: Seconds a connection may leave responses unread before it is closed.
    """
    door = FrontDoor(
        ws=ws,
        http=http,
        max_body=max_body,
        max_ws_message=max_ws_message,
        ws_high_water=ws_high_water,
        ws_close_timeout=ws_close_timeout,
        http_idle_timeout=http_idle_timeout,
        admission=admission or Admission(AdmissionSettings(), Metrics()),
        work=WorkBudget(work_budget, admission.shedding if admission is not None else None),
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_pending_bytes=max_pending_bytes,
        send_timeout=send_timeout,
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HttpConnection(door),
        host,
        port,
        backlog=backlog if backlog is not None else listen_backlog(),
        reuse_address=True,
        ssl=ssl_context,
        ssl_handshake_timeout=5.0 if ssl_context is not None else None,
    )
    door._server = server
    with contextlib.suppress(IndexError):
        door.port = int(server.sockets[0].getsockname()[1])
    door._sweeper = loop.call_later(min(1.0, http_idle_timeout / 4), door._sweep)
    return door
