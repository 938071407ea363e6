"""Per-shard Pub/Sub: the channels this node listens to on each shard's verified master.

Each shard has one subscriber connection, kept by a supervisor task: it connects to the
shard's verified master, subscribes every wanted channel, then watches the connection (closed
by the server, killed, over Redis's ``client-output-buffer-limit pubsub``, silent: a ``PING``
that gets no answer, or the master moved) and on any loss logs one line with the reason,
reports the shard as not ready, and reconnects with a short back-off, re-subscribing every
channel. Delivery resumes as soon as the shard answers again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from gateway._native import ReplyError, ReplyReader, RespError, pack_command
from gateway.fdlimit import is_emfile, note_emfile
from gateway.logs import fields
from gateway.metrics import Metrics
from gateway.shards.security import SecurityError
from gateway.shards.shardset import ShardLink, ShardSet
from gateway.shards.topology import Address

__all__ = ["PubSub"]

log = logging.getLogger("gateway.shards.pubsub")

MessageHandler = Callable[[int, bytes, bytes], None]

#: Channels per SUBSCRIBE command when re-subscribing after a reconnect.
_CHUNK = 1000


class _SubProtocol(asyncio.Protocol):
    """A connection in subscribe mode: acks and pongs complete futures in order, messages go
    to a callback."""

    def __init__(self, shard: int, on_message: MessageHandler) -> None:
        self.shard = shard
        self.on_message = on_message
        self.reader = ReplyReader()
        self.transport: asyncio.Transport | None = None
        self.acks: collections.deque[asyncio.Future[None]] = collections.deque()
        self.pongs: collections.deque[asyncio.Future[None]] = collections.deque()
        self.replies: collections.deque[asyncio.Future[object]] = collections.deque()
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.lost_reason = ""
        self.closed_by_us = False
        self.last_data = loop.time()
        #: Channels the server confirmed on this connection.
        self.confirmed: set[bytes] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_data = self.lost.get_loop().time()
        try:
            self.reader.feed(data)
        except RespError as exc:
            self.abort(f"protocol error from the server: {exc}")
            return
        while True:
            replies = self.reader.take(1)
            if replies is None:
                return
            reply = replies[0]
            if reply == "PONG" and self.pongs:  # PING outside subscribe mode (simple string)
                fut = self.pongs.popleft()
                if not fut.done():
                    fut.set_result(None)
                continue
            if not isinstance(reply, list) or not reply:
                if self.replies:  # the answer to AUTH, sent before subscribe mode
                    fut2 = self.replies.popleft()
                    if not fut2.done():
                        fut2.set_result(reply)
                continue
            kind = reply[0]
            if kind == b"message" and len(reply) == 3:
                try:
                    self.on_message(self.shard, cast(bytes, reply[1]), cast(bytes, reply[2]))
                except Exception:  # one bad message must not stop the others
                    log.exception("shard %d pubsub: message handler failed", self.shard)
            elif kind in (b"subscribe", b"unsubscribe") and self.acks:
                fut = self.acks.popleft()
                if not fut.done():
                    fut.set_result(None)
            elif kind == b"pong" and self.pongs:
                fut = self.pongs.popleft()
                if not fut.done():
                    fut.set_result(None)

    def abort(self, reason: str) -> None:
        """Close the connection on our side, recording why."""
        if not self.lost_reason:
            self.lost_reason = reason
        self.closed_by_us = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost_reason:
            self.lost_reason = f"connection error: {exc!r}" if exc else "closed by the server"
        error = ConnectionError(f"pubsub connection lost: {self.lost_reason}")
        for queue in (self.acks, self.pongs, self.replies):
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_exception(error)
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, command: bytes, channels: list[bytes]) -> list[asyncio.Future[None]]:
        """Write one (UN)SUBSCRIBE; returns one ack future per channel."""
        if self.transport is None or self.lost.done():
            raise ConnectionError(f"pubsub connection lost: {self.lost_reason}")
        loop = self.lost.get_loop()
        futs = [loop.create_future() for _ in channels]
        self.acks.extend(futs)
        self.transport.write(pack_command([command, *channels]))
        return futs


class _Shard:
    """One shard's wanted channels and the supervised connection that listens to them."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.wanted: set[bytes] = set()
        self.proto: _SubProtocol | None = None
        self.ready = asyncio.Event()
        self.wake = asyncio.Event()
        self.down_since: float | None = time.monotonic()
        self.down_reason = "not connected yet"
        self.ever_up = False
        self.losses = 0


class PubSub:
    """Keeps one supervised subscriber connection per shard, following the verified master.

    ``subscribe`` returns once the shard confirmed the subscription, so a caller that then
    changes state on that shard sees every message published after the change. A lost
    connection is re-established and every channel re-subscribed; until then the shard is
    listed by :meth:`problems` (the node's readiness).

    Args:
        shards: The shard links whose verified masters are listened to.
        on_message: Called with ``(shard, channel, payload)`` for every message.
        metrics: ``pg_pubsub_reconnects_total{shard,reason}``.
        lag: Returns the event loop's recent worst lag in seconds (used to explain a
            disconnection by the server: a node that fell behind reading is cut off by Redis's
            output-buffer limit).
        ping_interval: Seconds between health pings on an idle connection.
        ping_timeout: Seconds without any byte from the server after a ping before the
            connection counts as dead.
    """

    def __init__(
        self,
        shards: ShardSet,
        on_message: MessageHandler,
        *,
        metrics: Metrics | None = None,
        lag: Callable[[], float] | None = None,
        ping_interval: float = 2.0,
        ping_timeout: float = 5.0,
    ) -> None:
        self.shards = shards
        self.on_message = on_message
        self.metrics = metrics or shards.metrics
        self.lag = lag or (lambda: 0.0)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._shards = [_Shard(link.index) for link in shards.links]
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        shards.on_link_up(self._link_up)
        self.metrics.describe(
            "pg_pubsub_reconnects_total", "Pub/Sub connections lost and re-established, by shard"
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the supervisors (also started by the first :meth:`subscribe`)."""
        if not self._tasks and not self._closed:
            self._tasks = [
                asyncio.create_task(self._supervise(state), name=f"pubsub-{state.index}")
                for state in self._shards
            ]

    async def close(self) -> None:
        """Close every subscriber connection."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        for state in self._shards:
            if state.proto is not None:
                state.proto.abort("gateway shutting down")

    def _link_up(self, link: ShardLink) -> None:
        self._shards[link.index].wake.set()

    # -- what the node asks --------------------------------------------------------------------

    async def subscribe(self, shard: int, channel: bytes, *, timeout: float = 5.0) -> None:
        """Listen to ``channel`` on ``shard``; returns when the shard confirmed it.

        While the shard's connection is down the wait lasts until it is back (the supervisor
        re-subscribes every wanted channel), at most ``timeout`` seconds.

        Raises:
            TimeoutError: No confirmation within ``timeout`` seconds.
        """
        self.start()
        state = self._shards[shard]
        state.wanted.add(channel)
        proto = state.proto
        if proto is not None and channel in proto.confirmed and not proto.lost.done():
            return
        await asyncio.wait_for(self._confirm(state, channel), timeout)

    async def _confirm(self, state: _Shard, channel: bytes) -> None:
        while True:
            if not state.ready.is_set():
                await state.ready.wait()
            proto = state.proto
            if proto is None or proto.lost.done():
                state.ready.clear()
                continue
            if channel in proto.confirmed or channel not in state.wanted:
                return  # confirmed by a re-subscription, or released meanwhile
            try:
                (ack,) = proto.send(b"SUBSCRIBE", [channel])
                await ack
            except ConnectionError:
                continue  # the supervisor reconnects and re-subscribes; wait for it
            if channel in state.wanted:
                proto.confirmed.add(channel)
            else:  # released while the SUBSCRIBE was on its way
                _unsubscribe(proto, [channel])
            return

    def listening(self, shard: int, channel: bytes) -> bool:
        """True when ``channel`` is wanted and confirmed on a live connection: :meth:`subscribe`
        would return at once."""
        state = self._shards[shard]
        proto = state.proto
        return (
            proto is not None
            and channel in proto.confirmed
            and channel in state.wanted
            and not proto.lost.done()
        )

    def unsubscribe(self, shard: int, channel: bytes) -> None:
        """Stop listening to ``channel`` (fire and forget)."""
        state = self._shards[shard]
        if channel not in state.wanted:
            return
        state.wanted.discard(channel)
        proto = state.proto
        if proto is not None and not proto.lost.done():
            proto.confirmed.discard(channel)
            _unsubscribe(proto, [channel])

    def subscribed(self, shard: int) -> set[bytes]:
        """Channels wanted on ``shard``."""
        return set(self._shards[shard].wanted)

    def problems(self) -> list[str]:
        """Shards whose Pub/Sub connection is down while the shard is usable, and why."""
        now = time.monotonic()
        out = []
        for state in self._shards:
            link = self.shards.links[state.index]
            if state.down_since is not None and link.usable and self._tasks:
                out.append(
                    f"{link.spec.name}: Pub/Sub connection down for "
                    f"{now - state.down_since:.1f} s ({state.down_reason}); events for its "
                    "channels are not delivered"
                )
        return out

    def compact(self) -> None:
        """Copy the channel sets to fit their content (sets never shrink by themselves)."""
        for state in self._shards:
            state.wanted = set(state.wanted)
            if state.proto is not None:
                state.proto.confirmed = set(state.proto.confirmed)

    def connected(self, shard: int) -> bool:
        """Whether ``shard``'s subscriber connection is up and re-subscribed."""
        return self._shards[shard].ready.is_set()

    # -- supervision ---------------------------------------------------------------------------

    async def _supervise(self, state: _Shard) -> None:
        backoff = 0.05
        while not self._closed:
            link = self.shards.links[state.index]
            addr = link.address
            if not link.usable or addr is None:
                state.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.wake.wait(), 1.0)
                continue
            try:
                proto = await self._connect(state, addr)
            except (OSError, ConnectionError, TimeoutError, RespError) as exc:
                if is_emfile(exc):
                    note_emfile(f"opening the Pub/Sub connection to {addr}")
                self._down(state, f"cannot connect to {addr}: {exc!r}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            self._up(state, proto, addr)
            reason = await self._watch(state, proto, link, addr)
            state.proto = None
            state.ready.clear()
            if proto.transport is not None:
                proto.transport.abort()
            if not self._closed:
                self._lost(state, reason, addr)

    async def _connect(self, state: _Shard, addr: Address) -> _SubProtocol:
        loop = asyncio.get_running_loop()
        access = self.shards.access
        try:
            context = access.ssl_context()
        except SecurityError as exc:
            raise ConnectionError(str(exc)) from None
        _, proto = await asyncio.wait_for(
            loop.create_connection(
                lambda: _SubProtocol(state.index, self.on_message),
                addr.host,
                addr.port,
                ssl=context,
                server_hostname=access.tls.hostname(addr.host) if access.tls else None,
            ),
            self.shards.connect_timeout,
        )
        try:
            auth = access.auth_args()
            if auth is not None:
                answer: asyncio.Future[object] = loop.create_future()
                proto.replies.append(answer)
                assert proto.transport is not None
                proto.transport.write(pack_command(auth))
                reply = await asyncio.wait_for(answer, self.shards.connect_timeout)
                if isinstance(reply, ReplyError):
                    raise ConnectionError(
                        f"authentication as user {access.user!r} refused: {reply}"
                    )
            wanted = sorted(state.wanted)
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                await _wait_progress(proto, asyncio.gather(*proto.send(b"SUBSCRIBE", chunk)), 10)
                proto.confirmed.update(c for c in chunk if c in state.wanted)
            # Channels released while we were re-subscribing.
            gone = [c for c in wanted if c not in state.wanted]
            if gone:
                _unsubscribe(proto, gone)
        except BaseException:
            proto.abort("re-subscribing failed")
            raise
        return proto

    async def _watch(
        self, state: _Shard, proto: _SubProtocol, link: ShardLink, addr: Address
    ) -> str:
        """Wait until the connection is lost or must be replaced; return why."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            state.wake.clear()
            lost: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(proto.lost))
            woken: asyncio.Future[Any] = asyncio.ensure_future(state.wake.wait())
            try:
                await asyncio.wait(
                    {lost, woken}, timeout=self.ping_interval, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                lost.cancel()
                woken.cancel()
            if proto.lost.done():
                return proto.lost_reason
            if link.usable and link.address is not None and link.address != addr:
                return f"the shard's master is now {link.address}"
            if loop.time() - proto.last_data < self.ping_interval:
                continue  # messages are flowing: the connection is alive
            pong: asyncio.Future[None] = loop.create_future()
            proto.pongs.append(pong)
            assert proto.transport is not None
            proto.transport.write(pack_command([b"PING"]))
            try:
                await _wait_progress(proto, pong, self.ping_timeout)
            except TimeoutError:
                proto.abort(f"no answer to PING for {self.ping_timeout:g} s")
                return proto.lost_reason
            except ConnectionError:
                return proto.lost_reason
        return "gateway shutting down"

    def _up(self, state: _Shard, proto: _SubProtocol, addr: Address) -> None:
        state.proto = proto
        state.ready.set()
        name = self.shards.links[state.index].spec.name
        if state.ever_up and state.down_since is not None:
            down_s = time.monotonic() - state.down_since
            log.warning(
                "shard %s pubsub: listening again on %s after %.2f s (%d channels re-subscribed)",
                name,
                addr,
                down_s,
                len(proto.confirmed),
                extra=fields(
                    shard=name, server=addr, seconds=round(down_s, 3), channels=len(proto.confirmed)
                ),
            )
        state.ever_up = True
        state.down_since = None
        state.down_reason = ""

    def _down(self, state: _Shard, reason: str) -> None:
        if state.down_since is None:
            state.down_since = time.monotonic()
        if reason != state.down_reason:
            state.down_reason = reason
            if state.ever_up:
                name = self.shards.links[state.index].spec.name
                log.warning(
                    "shard %s pubsub: %s", name, reason, extra=fields(shard=name, reason=reason)
                )

    def _lost(self, state: _Shard, reason: str, addr: Address) -> None:
        name = self.shards.links[state.index].spec.name
        state.losses += 1
        if reason == "closed by the server":
            lag = self.lag()
            reason = (
                "closed by the server (CLIENT KILL, a restart, or Redis's "
                "client-output-buffer-limit for Pub/Sub clients)"
            )
            if lag >= 1.0:
                reason += (
                    f"; this node's event loop lagged {lag:.1f} s just before, so it most "
                    "likely fell behind reading and hit the output-buffer limit"
                )
        self.metrics.inc("pg_pubsub_reconnects_total", shard=name)
        state.down_since = time.monotonic()
        state.down_reason = reason
        log.warning(
            "shard %s pubsub: connection to %s lost: %s; %d channels get no events until it "
            "is re-established",
            name,
            addr,
            reason,
            len(state.wanted),
            extra=fields(shard=name, server=addr, reason=reason, channels=len(state.wanted)),
        )


def _unsubscribe(proto: _SubProtocol, channels: list[bytes]) -> None:
    """Fire and forget: nobody waits for the acks (their failure on a lost connection is
    expected and must not be reported as an unretrieved exception)."""
    with contextlib.suppress(ConnectionError):
        for ack in proto.send(b"UNSUBSCRIBE", channels):
            ack.add_done_callback(_retrieved)


def _retrieved(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _wait_progress(proto: _SubProtocol, awaitable: Awaitable[Any], timeout: float) -> None:
    """Await ``awaitable`` while the server keeps sending; TimeoutError after ``timeout`` s
    without a byte from it."""
    fut: asyncio.Future[Any] = asyncio.ensure_future(awaitable)
    loop = asyncio.get_running_loop()
    try:
        while True:
            done, _ = await asyncio.wait({fut}, timeout=timeout)
            if not done:
                # After a long loop iteration the answer may be waiting unread (uvloop runs
                # due timers before it polls): let the loop poll once more before judging.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            if fut.done():
                fut.result()
                return
            if loop.time() - proto.last_data >= timeout:
                raise TimeoutError(f"no answer from the server for {timeout:g} s")
    finally:
        if not fut.done():
            fut.cancel()
