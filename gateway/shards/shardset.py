"""The set of shard links: discovery, identity verification, periodic re-checks, the slot table."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway._native import ReplyError, SlotTable
from gateway.logs import fields
from gateway.metrics import Metrics
from gateway.shards.admin import library_version
from gateway.shards.connection import ConnectionLost, ShardConnection, open_connection
from gateway.shards.contract import read_version
from gateway.shards.identity import (
    IDENTITY_KEY,
    IdentityMismatch,
    ShardIdentity,
    check_identity,
    expected_identities,
)
from gateway.shards.security import PLAIN, Access
from gateway.shards.sentinel import (
    MASTER_QUERY,
    SentinelAnswer,
    SentinelUnreachable,
    Vote,
    parse_master_reply,
    vote,
)
from gateway.shards.topology import Address, ShardSpec, TopologyConfig

__all__ = [
    "IdentityMismatch",
    "SentinelUnreachable",
    "ShardLink",
    "ShardSet",
    "ask_sentinels",
    "discover_master",
]

log = logging.getLogger("gateway.shards")

#: uuid used in the slot table for a shard whose identity is not known yet; never sent.
_UNKNOWN_UUID = "unverified"


async def ask_sentinels(
    sentinels: tuple[Address, ...], name: str, *, timeout: float = 1.0, access: Access = PLAIN
) -> Vote:
    """Ask every Sentinel, at once, for master ``name`` and count the answers (see :func:`vote`).

    Sentinels that do not answer in ``timeout`` seconds count as not answering.

    Raises:
        SentinelUnreachable: No Sentinel answered at all.
    """

    async def ask(sentinel: Address) -> SentinelAnswer:
        try:
            conn = await open_connection(sentinel, timeout=timeout, access=access)
        except ConnectionLost as exc:
            # Its message starts with the address, which the vote adds again.
            return SentinelAnswer(sentinel, error=str(exc).removeprefix(f"{sentinel}: "))
        try:
            reply = await conn.command(*MASTER_QUERY, name, timeout=timeout)
            return SentinelAnswer(sentinel, parse_master_reply(reply))
        except (ReplyError, ConnectionLost, TimeoutError, ValueError) as exc:
            return SentinelAnswer(sentinel, error=repr(exc))
        finally:
            conn.close()

    return vote(name, await asyncio.gather(*(ask(s) for s in sentinels)))


async def discover_master(
    sentinels: tuple[Address, ...], name: str, *, timeout: float = 1.0, access: Access = PLAIN
) -> Address | None:
    """Ask every Sentinel for master ``name``; return the address most of them report.

    Sentinels that do not answer in ``timeout`` seconds are ignored. Returns ``None`` when the
    Sentinels that answered do not know the name.

    Raises:
        SentinelUnreachable: No Sentinel answered at all.
    """
    return (await ask_sentinels(sentinels, name, timeout=timeout, access=access)).master


class _Unresolved(Exception):
    """No master address for a shard (the message says why)."""


def _decode_hash(reply: object) -> dict[str, str]:
    if not isinstance(reply, list):
        return {}
    items = [x.decode() if isinstance(x, bytes) else str(x) for x in reply]
    return dict(zip(items[0::2], items[1::2], strict=True))


def _info_field(info: bytes, name: str) -> str:
    prefix = name.encode() + b":"
    for line in info.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].decode().strip()
    return ""


@dataclass
class ShardLink:
    """The gateway's connection to one shard's current master, and what it verified there.

    Attributes:
        index: Position in the slot table.
        spec: The configured shard.
        conn: Open, verified connection, or None while the shard is unavailable.
        identity: The identity last verified on this shard.
        run_id: ``run_id`` of the verified server (changes when the master changes).
        replid: Replication id of the verified master.
        last_error: Why the link is down, for health reports.
        warning: A problem that does not stop the link (Sentinels unreachable while the
            verified master still answers), for health reports.
        checked_at: ``time.monotonic()`` of the last check that verified the master (0 before
            the first): the lease threads use it to tell when the event loop lags behind.
    """

    index: int
    spec: ShardSpec
    conn: ShardConnection | None = None
    identity: ShardIdentity | None = None
    run_id: str = ""
    replid: str = ""
    last_error: str = "not connected yet"
    warning: str | None = None
    usable: bool = False
    suspect_reason: str | None = None
    failures: int = 0
    generation: int = 0
    checked_at: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> Address | None:
        """Address of the server this link is connected to."""
        return self.conn.address if self.conn is not None else None


class ShardSet:
    """Keeps one verified connection per shard and the slot table that tags writes.

    A link is *usable* only while its server answered ``ROLE`` as master and holds the identity
    of that shard (same deployment, name, index, shard count and slots; same uuid, or a newer
    epoch: :func:`~gateway.shards.identity.check_identity`). A supervisor task per shard
    re-resolves the master through the Sentinel vote every
    ``recheck_interval`` seconds, re-verifies the identity on the open connection, and
    reconnects at once when a write was rejected for routing (:meth:`mark_suspect`).
    """

    def __init__(
        self,
        topology: TopologyConfig,
        *,
        metrics: Metrics | None = None,
        recheck_interval: float = 1.0,
        connect_timeout: float = 2.0,
        verify_identity: bool = True,
        admin: bool = False,
    ) -> None:
        self.topology = topology
        #: How the shard servers are reached: the node's user, or the admin user.
        self.access = topology.admin if admin else topology.redis
        self.metrics = metrics or Metrics()
        self.recheck_interval = recheck_interval
        self.connect_timeout = connect_timeout
        self.verify_identity = verify_identity
        self.links = [ShardLink(i, spec) for i, spec in enumerate(topology.shards)]
        self._expected = expected_identities(topology)
        #: Set once the shards unusable at start have been reported (by the node).
        self.reported = False
        self.library_version = library_version()
        self._ranges = SlotTable.even_ranges(len(self.links))
        self.table = SlotTable(1, [_UNKNOWN_UUID] * len(self.links), self._ranges)
        self._listeners: list[Callable[[ShardLink], None]] = []
        self._master_change_listeners: list[Callable[[ShardLink], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.metrics.describe(
            "pg_identity_rejections_total",
            "Servers refused by identity verification (wrong shard, not master, stale epoch)",
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start one supervisor task per shard; returns at once (see :meth:`wait_ready`)."""
        self._tasks = [asyncio.create_task(self._supervise(link)) for link in self.links]

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until every shard is usable.

        Raises:
            TimeoutError: Some shard is still unavailable; the message says why.
        """
        deadline = time.monotonic() + timeout
        while not all(link.usable for link in self.links):
            if time.monotonic() > deadline:
                down = "; ".join(
                    f"{link.spec.name}: {link.last_error}" for link in self.links if not link.usable
                )
                raise TimeoutError(f"shards not ready: {down}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        """Stop the supervisors and close every connection."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for link in self.links:
            if link.conn is not None:
                link.conn.close()
                link.conn = None
            link.usable = False

    def on_link_up(self, callback: Callable[[ShardLink], None]) -> None:
        """Call ``callback(link)`` whenever a link becomes usable."""
        self._listeners.append(callback)

    def on_master_change(self, callback: Callable[[ShardLink], None]) -> None:
        """Call ``callback(link)`` when a shard's verified master is a different server."""
        self._master_change_listeners.append(callback)

    # -- routing feedback ------------------------------------------------------------------

    def mark_suspect(self, index: int, reason: str) -> None:
        """Stop using shard ``index`` until it is rediscovered and verified again."""
        link = self.links[index]
        link.failures += 1
        if link.usable:
            log.warning(
                "shard %s: suspended (%s); rediscovering",
                link.spec.name,
                reason,
                extra=fields(shard=link.spec.name, server=link.address, reason=reason),
            )
        link.usable = False
        link.suspect_reason = reason
        link.last_error = reason
        link.wake.set()

    def mark_healthy(self, index: int) -> None:
        """Record that shard ``index`` applied writes (resets the rediscovery back-off)."""
        self.links[index].failures = 0

    def status(self) -> list[dict[str, object]]:
        """Per-shard status for health reports."""
        return [
            {
                "shard": link.spec.name,
                "usable": link.usable,
                "address": str(link.address) if link.address else None,
                "epoch": link.identity.epoch if link.identity else None,
                "error": None if link.usable else link.last_error,
                "warning": link.warning,
            }
            for link in self.links
        ]

    # -- supervision -----------------------------------------------------------------------

    async def _supervise(self, link: ShardLink) -> None:
        while not self._closing:
            if link.suspect_reason is not None:
                # A rejected write woke us: back off (50 ms doubling up to the re-check
                # interval) so a persistent misroute cannot turn into a retry storm.
                delay = 0.05 * 2 ** min(link.failures - 1, 10)
                await asyncio.sleep(min(delay, self.recheck_interval))
            try:
                await self._check(link)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep supervising whatever happened
                self._down(link, f"check failed: {exc!r}")
            link.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.wake.wait(), self.recheck_interval)

    async def _resolve(self, link: ShardLink) -> Address:
        if not self.topology.uses_sentinel:
            assert link.spec.master is not None  # validated by TopologyConfig
            return link.spec.master
        conn = link.conn
        current = (
            conn.address
            if conn is not None and not conn.is_closed and link.suspect_reason is None
            else None
        )
        try:
            found = await ask_sentinels(
                self.topology.sentinels,
                link.spec.name,
                timeout=self.connect_timeout,
                access=self.topology.sentinel,
            )
        except SentinelUnreachable as exc:
            if current is None:
                raise _Unresolved(str(exc)) from None
            # The verified master stays verified on its own connection (role and identity are
            # checked again below, and every write is tagged): Sentinels being unreachable is
            # no reason to stop using it.
            self._warn(link, f"{exc}; keeping the verified master {current}")
            return current
        if found.master is None and current is not None:
            self._warn(link, f"{found.unknown}; keeping the verified master {current}")
            return current
        if link.warning is not None:
            log.info(
                "shard %s: Sentinels answer again",
                link.spec.name,
                extra=fields(shard=link.spec.name),
            )
            link.warning = None
        if found.master is None:
            raise _Unresolved(found.unknown)
        return found.master

    def _warn(self, link: ShardLink, warning: str) -> None:
        if link.warning is None:
            log.warning(
                "shard %s: %s",
                link.spec.name,
                warning,
                extra=fields(shard=link.spec.name, server=link.address, reason=warning),
            )
        link.warning = warning

    async def _check(self, link: ShardLink) -> None:
        try:
            addr = await self._resolve(link)
        except _Unresolved as exc:
            self._down(link, str(exc))
            return
        conn = link.conn
        if conn is not None and (
            conn.is_closed or conn.address != addr or link.suspect_reason is not None
        ):
            conn.close()
            link.conn = conn = None
        if conn is None:
            try:
                conn = await open_connection(addr, timeout=self.connect_timeout, access=self.access)
            except ConnectionLost as exc:
                self._down(link, str(exc))
                return
        try:
            identity, run_id, replid = await self._verify(link, conn)
        except (IdentityMismatch, ReplyError) as exc:
            conn.close()
            if isinstance(exc, ReplyError) and exc.code == "NOPERM":
                self._down(
                    link,
                    f"{addr}: user {self.access.user!r} lacks a permission the gateway needs "
                    f"({exc}); give it the ACL rules of the README",
                )
                return
            self._down(link, f"{addr}: {exc}")
            self.metrics.inc("pg_identity_rejections_total", shard=link.spec.name)
            return
        except (ConnectionLost, TimeoutError) as exc:
            conn.close()
            self._down(link, f"{addr}: {exc!r}")
            return
        except BaseException:
            # Cancelled by close() while verifying: a connection the link does not hold yet
            # would be left open (and its transport with it).
            if conn is not link.conn:
                conn.close()
            raise
        master_changed = bool(link.run_id) and (run_id, replid) != (link.run_id, link.replid)
        link.checked_at = time.monotonic()
        link.conn = conn
        link.run_id, link.replid = run_id, replid
        link.suspect_reason = None
        self._set_identity(link, identity)
        if master_changed:
            log.warning(
                "shard %s: master is now %s (run id %s)",
                link.spec.name,
                addr,
                run_id,
                extra=fields(shard=link.spec.name, server=addr, reason="master change"),
            )
            for cb in self._master_change_listeners:
                cb(link)
        if not link.usable:
            link.usable = True
            link.generation += 1
            link.last_error = ""
            log.info(
                "shard %s: using master %s (epoch %d)",
                link.spec.name,
                addr,
                identity.epoch,
                extra=fields(shard=link.spec.name, server=addr),
            )
            for cb in self._listeners:
                cb(link)

    async def _verify(
        self, link: ShardLink, conn: ShardConnection
    ) -> tuple[ShardIdentity, str, str]:
        role = await conn.command("ROLE", timeout=self.connect_timeout)
        raw = await conn.command("HGETALL", IDENTITY_KEY, timeout=self.connect_timeout)
        info = await conn.command("INFO", "server", "replication", timeout=self.connect_timeout)
        kind = role[0].decode() if isinstance(role, list) and role else "unknown"
        if kind == "master":
            # Before the identity: on a server shards init has not prepared, the missing
            # library is the first thing to report. A non-master is refused just below.
            await self._check_library(conn)
        identity = check_identity(
            kind,
            _decode_hash(raw),
            expected=self._expected[link.index] if self.verify_identity else None,
            previous=link.identity,
        )
        assert isinstance(info, bytes)
        return identity, _info_field(info, "run_id"), _info_field(info, "master_replid")

    async def _check_library(self, conn: ShardConnection) -> None:
        try:
            version = await conn.command(*read_version(), timeout=self.connect_timeout)
        except ReplyError as exc:
            if exc.code == "NOPERM":
                raise
            raise IdentityMismatch(
                f"the function library is not loaded ({exc}); run presence-gateway shards init"
            ) from exc
        if bytes(version).decode() != self.library_version:
            raise IdentityMismatch(
                f"function library version {bytes(version).decode()} is loaded, this gateway "
                f"needs version {self.library_version}: run presence-gateway shards init with "
                "this gateway's package"
            )

    def _set_identity(self, link: ShardLink, identity: ShardIdentity) -> None:
        if self.verify_identity or link.identity is None:
            link.identity = identity
        self._rebuild_table()

    def _rebuild_table(self) -> None:
        epoch = max((link.identity.epoch for link in self.links if link.identity), default=1)
        uuids = [
            link.identity.uuid if link.identity is not None else _UNKNOWN_UUID
            for link in self.links
        ]
        if epoch != self.table.epoch or uuids != [
            self.table.uuid(i) for i in range(len(self.links))
        ]:
            self.table = SlotTable(epoch, uuids, self._ranges)
        for link in self.links:
            if link.identity is not None and link.identity.epoch != epoch and link.usable:
                self.mark_suspect(link.index, f"stale epoch {link.identity.epoch} < {epoch}")

    def _down(self, link: ShardLink, reason: str) -> None:
        # Logged when a usable shard goes down, and for a shard never usable yet when its
        # reason changes once the node has reported the shards it started without.
        if link.usable or (link.generation == 0 and self.reported and reason != link.last_error):
            log.warning(
                "shard %s: unavailable: %s",
                link.spec.name,
                reason,
                extra=fields(shard=link.spec.name, server=link.address, reason=reason),
            )
        link.usable = False
        link.last_error = reason
