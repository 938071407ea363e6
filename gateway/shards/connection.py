"""One pipelined RESP connection to one Redis server, driven by the native reply reader."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, cast

from gateway._native import ReplyError, ReplyReader, RespError, pack_command
from gateway.fdlimit import is_emfile, note_emfile
from gateway.shards.security import PLAIN, Access, SecurityError
from gateway.shards.topology import Address

__all__ = ["AuthenticationError", "ConnectionLost", "ShardConnection", "open_connection"]


class ConnectionLost(ConnectionError):
    """The connection to a shard server closed or broke while requests were pending."""


class AuthenticationError(ConnectionLost):
    """The server refused the configured user and password (the message names the user, the
    server and Redis's reason, never the password)."""


class _Protocol(asyncio.Protocol):
    """Feeds received bytes to the native reader and completes requests in FIFO order.

    Payloads sent in one event-loop iteration leave in one write (one syscall), so concurrent
    reads from many HTTP requests share it.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.outbox: list[bytes] = []
        self.reader = ReplyReader()
        # Each pending request: (number of replies expected, future of their list).
        self.pending: collections.deque[tuple[int, asyncio.Future[list[object]]]] = (
            collections.deque()
        )
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.error: BaseException | None = None
        # Loop time of the last bytes received: a reply that is late while others keep
        # arriving is queued behind them, not lost.
        self.last_data = loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_data = self.closed.get_loop().time()
        try:
            self.reader.feed(data)
        except RespError as exc:
            self._fail(ConnectionLost(f"protocol error from server: {exc}"))
            return
        pending = self.pending
        reader = self.reader
        while pending:
            n, fut = pending[0]
            replies = reader.take(n)
            if replies is None:
                break
            pending.popleft()
            if not fut.done():
                fut.set_result(replies)

    def flush(self) -> None:
        """Write what was sent since the last flush (scheduled by :meth:`ShardConnection.send`)."""
        out, self.outbox = self.outbox, []
        if self.transport is not None and self.error is None and out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost(f"connection closed: {exc}" if exc else "connection closed"))

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        while self.pending:
            _, fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()
        if not self.closed.done():
            self.closed.set_result(None)


class _Timeout:
    """Fails a command's future when its server shows no sign of life for ``timeout`` s."""

    __slots__ = ("conn", "fut", "handle", "hard", "late_checked", "timeout")

    def __init__(
        self, conn: ShardConnection, fut: asyncio.Future[list[object]], timeout: float
    ) -> None:
        loop = fut.get_loop()
        self.conn = conn
        self.fut = fut
        self.timeout = timeout
        self.hard = loop.time() + max(10 * timeout, 30.0)
        self.late_checked = False
        self.handle: asyncio.Handle = loop.call_later(timeout, self.fire)

    def fire(self) -> None:
        fut = self.fut
        if fut.done():
            return
        loop = fut.get_loop()
        if not self.late_checked:
            # uvloop runs due timers before it polls sockets: after a long loop iteration the
            # reply may be waiting unread. Look again after one poll (two call_soon hops).
            self.late_checked = True
            self.handle = loop.call_soon(self._hop)
            return
        self.late_checked = False
        now = loop.time()
        if now - self.conn._protocol.last_data < self.timeout and now < self.hard:
            self.handle = loop.call_later(self.timeout, self.fire)
            return
        fut.set_exception(TimeoutError())
        self.conn.close()

    def _hop(self) -> None:
        self.handle = self.fut.get_loop().call_soon(self.fire)

    def cancel(self) -> None:
        self.handle.cancel()


class ShardConnection:
    """A pipelined connection: many requests may be in flight; replies return in order.

    Use :func:`open_connection` to create one.
    """

    def __init__(self, address: Address, protocol: _Protocol) -> None:
        self.address = address
        self._protocol = protocol

    @property
    def is_closed(self) -> bool:
        """Whether the connection has failed or been closed."""
        return self._protocol.error is not None

    @property
    def in_flight(self) -> int:
        """Requests sent whose replies have not all arrived."""
        return len(self._protocol.pending)

    def send(self, payload: bytes, n_replies: int) -> asyncio.Future[list[object]]:
        """Write an already packed pipeline and return a future of its ``n_replies`` replies.

        The future fails with :class:`ConnectionLost` if the connection breaks first.
        """
        proto = self._protocol
        fut: asyncio.Future[list[object]] = asyncio.get_running_loop().create_future()
        if proto.error is not None or proto.transport is None:
            fut.set_exception(ConnectionLost(f"{self.address}: connection is closed"))
            return fut
        proto.pending.append((n_replies, fut))
        if not proto.outbox:
            fut.get_loop().call_soon(proto.flush)
        proto.outbox.append(payload)
        return fut

    async def command(self, *args: bytes | str | int, timeout: float = 5.0) -> Any:
        """Run one command and return its reply; an error reply is raised.

        The timeout is about the server, not about the queue: while replies to earlier
        requests keep arriving, the wait goes on (up to ``max(10 * timeout, 30)`` seconds), so
        a connection busy with a long pipeline is not mistaken for a dead one.

        Raises:
            ReplyError: The server answered with an error (subclass chosen by its code).
            ConnectionLost: The connection broke.
            TimeoutError: No reply and no progress within ``timeout`` seconds (the connection
                is closed).
        """
        fut = self.send(pack_command(args), 1)
        timer = _Timeout(self, fut, timeout)
        try:
            replies = await fut
        finally:
            timer.cancel()
        reply = replies[0]
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def pipeline(
        self, commands: Sequence[Sequence[bytes | str | int]], *, timeout: float = 5.0
    ) -> list[Any]:
        """Send ``commands`` in one write and return their replies, in order.

        An error reply is returned in its place as a ``ReplyError`` instance (not raised), so
        one failed command does not hide the others' replies. The timeout works as for
        :meth:`command`.

        Raises:
            ConnectionLost: The connection broke.
            TimeoutError: No reply and no progress within ``timeout`` seconds.
        """
        if not commands:
            return []
        fut = self.send(b"".join(pack_command(c) for c in commands), len(commands))
        timer = _Timeout(self, fut, timeout)
        try:
            return await fut
        finally:
            timer.cancel()

    def close(self) -> None:
        """Close the connection; pending requests fail with :class:`ConnectionLost`."""
        self._protocol._fail(ConnectionLost(f"{self.address}: closed by the gateway"))

    async def wait_closed(self) -> None:
        """Wait until the connection is closed."""
        await self._protocol.closed


async def open_connection(
    address: Address, *, timeout: float = 2.0, access: Access = PLAIN
) -> ShardConnection:
    """Connect to a Redis server (or a Sentinel): TCP or TLS, then ``AUTH`` when configured.

    Raises:
        AuthenticationError: The server refused the user and password.
        ConnectionLost: The server is unreachable within ``timeout`` seconds, or the TLS
            handshake failed (the message says why, e.g. the certificate's name).
    """
    loop = asyncio.get_running_loop()
    try:
        context = access.ssl_context()
    except SecurityError as exc:
        raise ConnectionLost(f"{address}: {exc}") from None
    try:
        _, protocol = await asyncio.wait_for(
            loop.create_connection(
                _Protocol,
                address.host,
                address.port,
                ssl=context,
                server_hostname=access.tls.hostname(address.host) if access.tls else None,
            ),
            timeout,
        )
    except (OSError, TimeoutError) as exc:
        if is_emfile(exc):
            note_emfile(f"connecting to {address}")
        raise ConnectionLost(f"{address}: cannot connect: {exc!r}") from exc
    conn = ShardConnection(address, protocol)
    auth = access.auth_args()
    if auth is not None:
        try:
            await conn.command(*auth, timeout=timeout)
        except ReplyError as exc:
            conn.close()
            raise AuthenticationError(
                f"{address}: authentication as user {access.user!r} refused: {exc}"
            ) from None
        except (ConnectionLost, TimeoutError) as exc:
            conn.close()
            raise ConnectionLost(f"{address}: no answer to AUTH: {exc!r}") from None
        except BaseException:  # cancelled (a closing shard set): never leave it open
            conn.close()
            raise
    return conn
