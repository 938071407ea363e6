"""This node's lease on every shard, kept by threads of their own so that load cannot fake death.

A node's members count on a shard only while its lease there is alive (``functions.lua``,
``alive``). The lease used to be refreshed by the event loop through the batched writer, so a
burst of client work (thousands of subscribes waiting in the same loop and the same pipeline)
could delay it past its expiry and get a live node's members announced as gone. Here each
shard has a thread with its own blocking connection to the shard's verified master that sends
one verified ``lease`` write every ``interval`` seconds: neither the event loop nor the write
queue stands between the node and its lease. The thread needs the GIL only for a few
microseconds per refresh, which a busy event loop hands over every few milliseconds.

A failover must not wait for the event loop either: the loop's shard supervisor finds a new
master through Sentinel every second, but a loop lagging by seconds finds it late, and the old
master keeps accepting writes until Sentinel demotes it (up to about ten seconds): the lease
would go on being refreshed there while every other node reads the promoted replica, where it
expires. So when the loop has not verified the shard's master for a few re-check intervals,
or a refresh fails, the thread asks the Sentinels itself (the same vote as the node's,
:func:`gateway.shards.sentinel.vote`) and refreshes on the master they name. That needs no
identity check of its own: the lease write is tagged, so a server that is not this shard
refuses it. Once the loop has verified the master again, its choice is followed.

A lease must not outlive a node that can no longer serve: the event loop beats a heartbeat
(:meth:`LeaseKeeper.beat`), and when the loop has not beaten for ``stall_limit`` seconds (a
callback stuck in a loop, a deadlock) the threads stop refreshing, so the node is treated as
dead and its members are reaped. A loop that is merely busy still beats.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway._native import ReplyError, ReplyReader, ShardBatch, build_batches, pack_command
from gateway.logs import fields
from gateway.metrics import Metrics
from gateway.shards.security import Access, SecurityError
from gateway.shards.sentinel import (
    MASTER_QUERY,
    SentinelAnswer,
    SentinelUnreachable,
    parse_master_reply,
    vote,
)
from gateway.shards.shardset import ShardLink, ShardSet
from gateway.shards.topology import Address
from gateway.store.presence_redis import RedisPresenceStore

__all__ = ["LeaseKeeper", "LeaseSettings"]

log = logging.getLogger("gateway.lease")


@dataclass(frozen=True)
class LeaseSettings:
    """Timing of the lease.

    Attributes:
        lease_ms: How long a lease lasts past its refresh (Redis clock).
        interval: Seconds between refreshes.
        grace_ms: Reap grace: how long a node whose lease expired may still refresh before its
            entries are reaped (and how long after a shard comes back every node gets).
        stall_limit: Seconds without an event-loop heartbeat after which the lease is let go.
        timeout: Seconds to connect or to wait for one refresh's reply.
    """

    lease_ms: int = 10_000
    interval: float = 1.0
    grace_ms: int = 1_000
    stall_limit: float = 30.0
    timeout: float = 2.0

    @property
    def gap_ms(self) -> int:
        """A shard that took no refresh from any node for this long was unreachable."""
        return max(2_000, int(self.interval * 3_000))


class _ShardLease:
    """State of one shard's lease, written by its thread and read by the event loop."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.sock: socket.socket | None = None
        self.addr: Address | None = None
        # The master the Sentinels named after a failed refresh, tried before the link's own
        # address until the link (re-verified by the event loop) catches up with it.
        self.followed: Address | None = None
        self.followed_at = 0.0
        self.asked_at = 0.0  # when this thread last asked the Sentinels because the loop lags
        self.first = True
        self.last_ok = 0.0  # monotonic time of the last refresh the shard accepted
        self.last_rtt = 0.0
        # The link generation (see ShardLink) seen by the last attempt: a lease is judged only
        # once an attempt was made since the link last became usable.
        self.generation = -1
        self.wake = threading.Event()
        self.error = ""
        self.ok = 0
        self.failed = 0


class LeaseKeeper:
    """Refreshes the node's lease on every shard from one thread per shard.

    Args:
        shards: The shard links; each thread follows its shard's verified master.
        store: Builds the verified ``lease`` write.
        settings: Timing.
        metrics: ``pg_lease_refreshes_total{shard,result}`` and ``pg_lease_age_seconds{shard}``.
        on_lapsed: Called on the event loop with a shard index when a refresh succeeded after
            the lease had expired (others may have reaped this node meanwhile).
    """

    def __init__(
        self,
        shards: ShardSet,
        store: RedisPresenceStore,
        settings: LeaseSettings,
        metrics: Metrics,
        on_lapsed: Callable[[int], None],
    ) -> None:
        self.shards = shards
        self.store = store
        self.settings = settings
        self.on_lapsed = on_lapsed
        self._state = [_ShardLease(link.index) for link in shards.links]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._beat = time.monotonic()
        self._started = time.monotonic()
        self._stalled = False
        shards.on_link_up(self._link_up)
        metrics.counter(
            "pg_lease_refreshes_total", "Lease refreshes, by shard and result", self._counts
        )
        metrics.gauge(
            "pg_lease_age_seconds", "Seconds since this node's lease was last refreshed", self._ages
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the threads (call from the event loop, which must then call :meth:`beat`)."""
        self._loop = asyncio.get_running_loop()
        self._beat = time.monotonic()
        for state in self._state:
            name = self.shards.links[state.index].spec.name
            thread = threading.Thread(
                target=self._run, args=(state,), name=f"lease-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    async def close(self) -> None:
        """Stop refreshing (the lease then expires on its own) and close the connections."""
        self._stop.set()
        for state in self._state:
            state.wake.set()
        threads, self._threads = self._threads, []
        if threads:
            await asyncio.to_thread(_join_all, threads, self.settings.timeout + 1)

    def beat(self) -> None:
        """The event loop is making progress (call at least every second)."""
        self._beat = time.monotonic()

    def _link_up(self, link: ShardLink) -> None:
        # A shard back after an outage: refresh now rather than at the next interval.
        self._state[link.index].wake.set()

    # -- what the node reads -------------------------------------------------------------------

    def leased(self, shard: int) -> bool:
        """Whether this incarnation's lease on ``shard`` has been accepted at least once."""
        return not self._state[shard].first

    def age(self, shard: int) -> float | None:
        """Seconds since the last accepted refresh on ``shard``; None before the first."""
        state = self._state[shard]
        return None if state.first else time.monotonic() - state.last_ok

    def problems(self) -> list[str]:
        """Shards on which this node's lease is at risk (not refreshed for half its length, or
        never accepted although the shard is usable)."""
        limit = self.settings.lease_ms / 2000
        out = []
        for state in self._state:
            link = self.shards.links[state.index]
            reason = f": {state.error}" if state.error else ""
            age = self.age(state.index)
            if age is not None and age > limit and self._judged(state):
                out.append(f"{link.spec.name}: lease not refreshed for {age:.1f} s{reason}")
            elif age is None and link.usable and self._waited(3):
                out.append(f"{link.spec.name}: no lease accepted yet{reason}")
        return out

    def _judged(self, state: _ShardLease) -> bool:
        # An attempt was made since the link last became usable (after an outage the age
        # says nothing until then).
        return state.generation == self.shards.links[state.index].generation

    def _waited(self, intervals: float) -> bool:
        return time.monotonic() - self._started > intervals * self.settings.interval

    def at_risk(self) -> bool:
        """Whether a usable shard's lease is older than a quarter of its length.

        The lease threads do not depend on the event loop, so this means Redis answers them
        slowly, typically because of the node's own traffic: the node should shed load.
        """
        limit = self.settings.lease_ms / 4000
        for state in self._state:
            age = self.age(state.index)
            usable = self.shards.links[state.index].usable
            if age is not None and age > limit and usable and self._judged(state):
                return True
        return False

    def _counts(self) -> dict[tuple[tuple[str, str], ...], float]:
        out: dict[tuple[tuple[str, str], ...], float] = {}
        for state in self._state:
            name = self.shards.links[state.index].spec.name
            out[(("result", "ok"), ("shard", name))] = float(state.ok)
            out[(("result", "failed"), ("shard", name))] = float(state.failed)
        return out

    def _ages(self) -> dict[tuple[tuple[str, str], ...], float]:
        out: dict[tuple[tuple[str, str], ...], float] = {}
        for state in self._state:
            age = self.age(state.index)
            if age is not None:
                out[(("shard", self.shards.links[state.index].spec.name),)] = age
        return out

    # -- the threads ---------------------------------------------------------------------------

    def _run(self, state: _ShardLease) -> None:
        interval = self.settings.interval
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self._refresh(state)
            except Exception as exc:  # the thread must survive anything
                self._failed(state, f"unexpected error: {exc!r}")
            next_at = max(next_at + interval, time.monotonic())
            state.wake.wait(max(0.0, next_at - time.monotonic()))
            if state.wake.is_set():
                state.wake.clear()
                next_at = time.monotonic()
        self._disconnect(state)

    def _refresh(self, state: _ShardLease) -> None:
        link = self.shards.links[state.index]
        name = link.spec.name
        stalled = time.monotonic() - self._beat
        if stalled > self.settings.stall_limit:
            if not self._stalled:
                self._stalled = True
                log.error(
                    "event loop stalled for %.0f s (loop_stall_limit %g s): letting this "
                    "node's leases expire, so its members will be removed",
                    stalled,
                    self.settings.stall_limit,
                )
            return
        if self._stalled:
            self._stalled = False
            log.warning("event loop is running again: refreshing leases")
        # Follow the verified master; while the link is being re-verified keep the last one
        # (the write is tagged: a server that is not this shard refuses it).
        generation = link.generation
        if state.followed is not None and link.checked_at > state.followed_at:
            state.followed = None  # the event loop has verified the master since
        addr = state.followed or link.address or state.addr
        if addr is None or link.identity is None:
            return
        s = self.settings
        op = self.store.lease_op(
            state.index, s.lease_ms, first=state.first, gap_ms=s.gap_ms, grace_ms=s.grace_ms
        )
        (batch,) = build_batches(self.shards.table, [op], group=1)
        if batch.shard != state.index:  # the table changed under us; next time
            return
        state.generation = generation
        asked = False
        if self._loop_behind(link) and time.monotonic() - state.asked_at >= 1.0:
            asked, state.asked_at = True, time.monotonic()
            addr = self._follow(state, link, addr, "the event loop has not re-checked it lately")
        started = time.monotonic()
        error = self._send(state, addr, batch)
        if error is not None and not asked:
            before, addr = addr, self._follow(state, link, addr, f"a refresh failed: {error}")
            if addr != before:
                started = time.monotonic()
                error = self._send(state, addr, batch)
        if error is not None:
            self._failed(state, error)
            return
        now = time.monotonic()
        lapsed = not state.first and now - state.last_ok > s.lease_ms / 1000
        state.first = False
        state.last_ok = now
        state.last_rtt = now - started
        state.ok += 1
        if state.error:
            log.info("shard %s: lease refreshed again", name, extra=fields(shard=name, server=addr))
            state.error = ""
        if lapsed and self._loop is not None:
            log.warning(
                "shard %s: this node's lease had expired; re-asserting its state",
                name,
                extra=fields(shard=name, server=addr, reason="lease lapsed"),
            )
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self.on_lapsed, state.index)

    def _send(self, state: _ShardLease, addr: Address, batch: ShardBatch) -> str | None:
        """Send one lease write to ``addr``; None when accepted, else why not."""
        try:
            if state.sock is None or state.addr != addr:
                self._disconnect(state)
                state.sock = _connect(addr, self.shards.access, self.settings.timeout)
                state.addr = addr
            replies = _round_trip(state.sock, batch.payload, batch.n_commands)
        except (OSError, ValueError) as exc:
            self._disconnect(state)
            if isinstance(exc, OSError) and exc.errno == errno.EMFILE:
                return f"{addr}: out of file descriptors (EMFILE)"
            return f"{addr}: {exc!r}"
        (result,) = batch.map_replies(replies)
        if isinstance(result, ReplyError):
            self._disconnect(state)
            return f"{addr} refused the lease: {result}"
        return None

    def _loop_behind(self, link: ShardLink) -> bool:
        """Whether the event loop has not verified ``link``'s master for several re-check
        intervals although it did before (it lags, or the shard is down)."""
        limit = max(2.0, 3 * self.shards.recheck_interval)
        return (
            self.shards.topology.uses_sentinel
            and link.checked_at > 0
            and time.monotonic() - link.checked_at > limit
        )

    def _follow(self, state: _ShardLease, link: ShardLink, addr: Address, why: str) -> Address:
        """The master the Sentinels name if it is not ``addr`` (remembered until the event loop
        verifies the master again), else ``addr``."""
        found = self._ask_sentinels(link)
        if found is None or found == addr:
            return addr
        name = link.spec.name
        log.info(
            "shard %s: refreshing the lease on %s, the master the Sentinels name (%s)",
            name,
            found,
            why,
            extra=fields(shard=name, server=found, reason="lease follows Sentinel"),
        )
        state.followed, state.followed_at = found, time.monotonic()
        return found

    def _ask_sentinels(self, link: ShardLink) -> Address | None:
        """The master the Sentinels name for this shard now (None without Sentinels, or when
        none answers or knows it), asked from this thread with blocking sockets."""
        topology = self.shards.topology
        if not topology.uses_sentinel:
            return None
        timeout = min(self.settings.timeout, 1.0)
        answers = [
            _ask_sentinel(sentinel, topology.sentinel, link.spec.name, timeout)
            for sentinel in topology.sentinels
            if not self._stop.is_set()
        ]
        try:
            return vote(link.spec.name, answers).master
        except SentinelUnreachable:
            return None

    def _failed(self, state: _ShardLease, reason: str) -> None:
        state.failed += 1
        if reason != state.error:
            name = self.shards.links[state.index].spec.name
            log.warning(
                "shard %s: lease not refreshed: %s",
                name,
                reason,
                extra=fields(shard=name, server=state.addr, reason=reason),
            )
            state.error = reason

    @staticmethod
    def _disconnect(state: _ShardLease) -> None:
        if state.sock is not None:
            with contextlib.suppress(OSError):
                state.sock.close()
            state.sock = None


def _connect(addr: Address, access: Access, timeout: float) -> socket.socket:
    """A blocking connection to ``addr``: TCP or TLS, then ``AUTH`` when configured.

    Raises:
        OSError: Unreachable, TLS failed, or the credentials were refused (the message names
            the user, never the password).
    """
    try:
        context = access.ssl_context()
    except SecurityError as exc:
        raise OSError(str(exc)) from None
    sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
    try:
        if context is not None:
            assert access.tls is not None
            sock = context.wrap_socket(sock, server_hostname=access.tls.hostname(addr.host))
        sock.settimeout(timeout)
        auth = access.auth_args()
        if auth is not None:
            (reply,) = _round_trip(sock, pack_command(auth), 1)
            if isinstance(reply, ReplyError):
                raise OSError(f"authentication as user {access.user!r} refused: {reply}")
    except BaseException:
        sock.close()
        raise
    return sock


def _ask_sentinel(sentinel: Address, access: Access, name: str, timeout: float) -> SentinelAnswer:
    """One Sentinel's answer for master ``name`` (blocking)."""
    try:
        sock = _connect(sentinel, access, timeout)
    except OSError as exc:
        return SentinelAnswer(sentinel, error=repr(exc))
    try:
        (reply,) = _round_trip(sock, pack_command((*MASTER_QUERY, name)), 1)
        if isinstance(reply, ReplyError):
            return SentinelAnswer(sentinel, error=str(reply))
        return SentinelAnswer(sentinel, parse_master_reply(reply))
    except (OSError, ValueError) as exc:
        return SentinelAnswer(sentinel, error=repr(exc))
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def _round_trip(sock: socket.socket, payload: bytes, n: int) -> list[object]:
    """Send a packed pipeline and read its ``n`` replies (blocking, with the socket timeout)."""
    sock.sendall(payload)
    reader = ReplyReader()
    while True:
        replies = reader.take(n)
        if replies is not None:
            return replies
        chunk = sock.recv(65_536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        reader.feed(chunk)


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
