"""The in-memory twin of the state store, for testing the hub's concurrency deterministically.

:class:`MemoryShards` is a whole deployment's shared state in one process: shards (channels
spread by the same slot table as Redis), owners' leases, held webhooks and Pub/Sub. Each
simulated node gets a :class:`MemoryPresenceStore` (its owner string) and
:class:`MemorySubscriptions` (its Pub/Sub). Every operation applies atomically, as the shard
function library's does, with the same transitions, holds, owners and leases; the behavioural
tests in tests/test_store.py run against both this and the Redis implementation, so the twin
cannot drift from the real thing.

What a test controls:

* time: ``clock`` (milliseconds) drives leases, holds and cache expiry;
* interleavings: :meth:`MemoryShards.hold` stops the next matching operations just before they
  apply, until the test releases them;
* shard loss: :meth:`MemoryShards.take_down` makes writes wait for the shard (failing with
  ``ShardUnavailableError`` after ``write_timeout``, as the batch writer's do), reads and
  subscriptions fail at once, until :meth:`MemoryShards.bring_up`.

Not modelled: entry expiry (``ttl``: nothing expires here), the lease gap rule (all owners
reach a memory shard or none does), the ``:ct`` rate limit's Redis expiry semantics beyond its
5 s window, and messages lost while a Pub/Sub connection is down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway._native import SlotTable
from gateway.shards import contract as c
from gateway.shards.writer import ShardUnavailableError
from gateway.store.presence import (
    ChannelCounts,
    Due,
    HooksFor,
    JoinResult,
    LocalChannel,
    OutboxClaim,
    SubsItem,
    SubsResult,
)

_T = TypeVar("_T")


def _submit(work: Awaitable[_T], done: Callable[[_T | BaseException], None]) -> asyncio.Task[None]:
    """Run ``work`` in a task that hands its result or its error to ``done``."""

    async def run() -> None:
        try:
            result = await work
        except Exception as exc:
            done(exc)
            return
        done(result)

    return asyncio.ensure_future(run())


__all__ = ["Gate", "MemoryPresenceStore", "MemoryShards", "MemorySubscriptions"]

#: ``pusher_internal:subscription_count`` of channels over this many subscribers is published
#: at most every 5 s (as ``functions.lua`` does).
_COUNT_RATE_LIMIT_ABOVE = 100

OnMessage = Callable[[int, bytes, bytes], None]


@dataclass
class _Channel:
    counts: dict[bytes, int] = field(default_factory=dict)  # owner -> sockets (':s')
    members: dict[tuple[bytes, str], str] = field(default_factory=dict)  # (owner, user) -> info
    users: dict[str, int] = field(default_factory=dict)  # user -> owners holding it (':u')
    cache: tuple[str, int] | None = None  # frame, expiry (ms)
    count_quiet_until: int = 0


@dataclass
class _Shard:
    index: int
    channels: dict[bytes, _Channel] = field(default_factory=dict)
    occupied: set[bytes] = field(default_factory=set)  # ':chans'
    due: dict[bytes, int] = field(default_factory=dict)  # ':due': name -> due time (ms)
    inflight: dict[bytes, int] = field(default_factory=dict)  # ':inflight': id -> deadline
    ev: dict[bytes, bytes] = field(default_factory=dict)  # ':ev': name or id -> payload
    seq: int = 0  # ':seq'
    dropped: int = 0  # ':dropped': webhooks dropped, the outbox being full
    nodes: dict[bytes, int] = field(default_factory=dict)  # ':nodes': owner -> deadline (ms)
    owner_index: dict[bytes, set[bytes]] = field(default_factory=dict)  # ':idx:<owner>'
    reaper: tuple[str, int] | None = None  # (token, lock expiry)
    grace_ms: int = 0
    up: bool = True


class Gate:
    """Stops matching operations just before they apply, until :meth:`release`.

    Attributes:
        reached: Set once a matching operation is waiting at the gate.
        waiting: How many are waiting.
    """

    def __init__(self, op: str, owner: bytes | None, key: bytes | None) -> None:
        self.op = op
        self.owner = owner
        self.key = key
        self.reached = asyncio.Event()
        self.waiting = 0
        self._open = asyncio.Event()

    def matches(self, op: str, owner: bytes | None, key: bytes) -> bool:
        """Whether an operation stops here."""
        return (
            op == self.op
            and (self.owner is None or owner == self.owner)
            and (self.key is None or key == self.key)
        )

    async def wait_reached(self) -> None:
        """Return once an operation is waiting at the gate."""
        await self.reached.wait()

    def release(self) -> None:
        """Let every waiting (and later matching) operation through."""
        self._open.set()

    async def pass_through(self) -> None:
        """Wait here until released (called by the operation being held)."""
        self.waiting += 1
        self.reached.set()
        await self._open.wait()


class MemoryShards:
    """A whole deployment's shared state, in memory.

    Args:
        shards: Number of shards.
        clock: Milliseconds now (a test's controllable clock); monotonic time by default.
        write_timeout: Seconds a write waits for a shard that is down before failing.
    """

    def __init__(
        self,
        shards: int = 2,
        *,
        clock: Callable[[], int] | None = None,
        write_timeout: float = 30.0,
    ) -> None:
        self.clock = clock or (lambda: int(time.monotonic() * 1000))
        self.write_timeout = write_timeout
        self.table = SlotTable.even(1, [f"memory-{i}" for i in range(shards)])
        self.shards = [_Shard(i) for i in range(shards)]
        self._listeners: dict[tuple[int, bytes], list[OnMessage]] = {}
        self._gates: list[Gate] = []
        self._up = [asyncio.Event() for _ in range(shards)]
        for event in self._up:
            event.set()

    # -- what tests control ----------------------------------------------------------------

    def hold(self, op: str, *, owner: str | None = None, key: bytes | None = None) -> Gate:
        """Stop the next operations named ``op`` (of ``owner``, on ``key``) before they apply.

        ``op`` is an operation of the library (``pjoin``, ``pleave``, ``subs``, ``sync``,
        ``publish``, ``claim``, ``reap``, ...), ``read`` for any read, or ``subscribe``.
        """
        gate = Gate(op, owner.encode() if owner is not None else None, key)
        self._gates.append(gate)
        return gate

    def take_down(self, shard: int) -> None:
        """The shard becomes unreachable (its state is kept, as a restarted master's is)."""
        self.shards[shard].up = False
        self._up[shard].clear()

    def bring_up(self, shard: int) -> None:
        """The shard is reachable again; writes waiting for it apply, in order."""
        self.shards[shard].up = True
        self._up[shard].set()

    def store(
        self,
        owner: str,
        *,
        hold_ms: int = 3000,
        max_members: int = 100,
        hooks: HooksFor | None = None,
    ) -> MemoryPresenceStore:
        """A node's view (its writes carry ``owner``)."""
        return MemoryPresenceStore(
            self, owner=owner, hold_ms=hold_ms, max_members=max_members, hooks=hooks
        )

    def subscriptions(self, on_message: OnMessage) -> MemorySubscriptions:
        """A node's Pub/Sub: messages on keys it subscribed to go to ``on_message``."""
        return MemorySubscriptions(self, on_message)

    # -- plumbing --------------------------------------------------------------------------

    def shard_for_key(self, key: bytes) -> int:
        """The shard of a key (the same slot table as an evenly split Redis deployment)."""
        return self.table.shard_for_key(key)

    async def enter(
        self, op: str, shard: int, key: bytes, owner: bytes | None, *, write: bool
    ) -> _Shard:
        """Pass the gates and the shard's availability; return the shard to apply on.

        Raises:
            ShardUnavailableError: The shard is down (reads at once, writes after waiting
                ``write_timeout`` for it).
        """
        await self.pass_gates(op, owner, key)
        state = self.shards[shard]
        if not state.up:
            if not write:
                raise ShardUnavailableError(f"memory-{shard} unavailable: down")
            try:
                await asyncio.wait_for(self._up[shard].wait(), self.write_timeout)
            except TimeoutError:
                raise ShardUnavailableError(
                    f"memory-{shard} unavailable for {self.write_timeout:g} s: down"
                ) from None
        return state

    async def pass_gates(self, op: str, owner: bytes | None, key: bytes) -> None:
        """Wait at every gate that holds this operation."""
        for gate in list(self._gates):
            if gate.matches(op, owner, key):
                await gate.pass_through()

    def publish(self, shard: int, key: bytes, data: bytes) -> int:
        """Deliver ``data`` to every listener of ``key``, later in this loop, in order."""
        listeners = self._listeners.get((shard, key), ())
        loop = asyncio.get_running_loop()
        for listener in listeners:
            loop.call_soon(listener, shard, key, data)
        return len(listeners)

    def listen(self, shard: int, key: bytes, listener: OnMessage) -> None:
        """Add a listener of ``key`` on ``shard`` (once)."""
        listeners = self._listeners.setdefault((shard, key), [])
        if listener not in listeners:
            listeners.append(listener)

    def unlisten(self, shard: int, key: bytes, listener: OnMessage) -> None:
        """Remove a listener."""
        listeners = self._listeners.get((shard, key))
        if listeners is not None and listener in listeners:
            listeners.remove(listener)
            if not listeners:
                del self._listeners[(shard, key)]


class _Ops:
    """The library's operations on one shard, at one instant (as one ``FCALL`` sees it)."""

    def __init__(self, shards: MemoryShards, shard: _Shard) -> None:
        self.shards = shards
        self.shard = shard
        self.now = shards.clock()

    def alive(self, owner: bytes) -> bool:
        deadline = self.shard.nodes.get(owner)
        return deadline is not None and deadline >= self.now

    def channel(self, key: bytes) -> _Channel:
        chan = self.shard.channels.get(key)
        if chan is None:
            chan = self.shard.channels[key] = _Channel()
        return chan

    def total(self, chan: _Channel, *, live: bool) -> int:
        return sum(n for owner, n in chan.counts.items() if not live or self.alive(owner))

    def roster(self, chan: _Channel) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for (owner, user), info in chan.members.items():
            if user not in out and self.alive(owner):
                out[user] = info or None
        return out

    def publish(self, key: bytes, data: bytes) -> int:
        return self.shards.publish(self.shard.index, key, data)

    def index(self, key: bytes, owner: bytes) -> None:
        chan = self.shard.channels.get(key)
        present = chan is not None and (
            owner in chan.counts or any(o == owner for o, _ in chan.members)
        )
        if present:
            self.shard.owner_index.setdefault(owner, set()).add(key)
        else:
            self.shard.owner_index.get(owner, set()).discard(key)

    # -- the outbox (functions.lua: outbox, cancel_held) -------------------------------------

    def outbox(self, kind: str, key: bytes, rest: str, at: int, name: bytes | None = None) -> None:
        shard = self.shard
        if len(shard.ev) >= c.OUTBOX_MAX:
            shard.dropped += 1
            return
        shard.seq += 1
        ident = f"mem-{shard.index}:{self.now}:{shard.seq:012d}".encode()
        payload = b"\0".join((ident, str(self.now).encode(), kind.encode(), key, rest.encode()))
        shard.ev[name or ident] = payload
        shard.due[name or ident] = at

    def cancel_held(self, name: bytes) -> bool:
        shard = self.shard
        at = shard.due.pop(name, None)
        if at is None:
            return False
        payload = shard.ev.pop(name, None)
        if at > self.now:
            return True
        if payload is not None:  # due already: it goes on under its own id
            ident = payload.split(b"\0", 1)[0]
            shard.ev[ident] = payload
            shard.due[ident] = at
        return False

    def add_member(
        self, key: bytes, owner: bytes, user: str, info: str, exclude: str, hooks: str | None
    ) -> tuple[bool, bool]:
        chan = self.channel(key)
        if (owner, user) in chan.members:
            chan.members[(owner, user)] = info
            return False, False
        chan.members[(owner, user)] = info
        self.shard.owner_index.setdefault(owner, set()).add(key)
        chan.users[user] = chan.users.get(user, 0) + 1
        if chan.users[user] != 1:
            return False, False
        self.publish(key, c.encode_member_added(user, info or None, exclude or None))
        if self.cancel_held(key + b"\0m\0" + user.encode()):
            return True, False
        if _wants(hooks, "a"):
            self.outbox("a", key, user, self.now)
        return True, True

    def remove_member(
        self, key: bytes, owner: bytes, user: str, hold: int, hooks: str | None
    ) -> bool:
        chan = self.channel(key)
        if chan.members.pop((owner, user), None) is None:
            return False
        left = chan.users.get(user, 0) - 1
        if left > 0:
            chan.users[user] = left
            return False
        chan.users.pop(user, None)
        self.publish(key, c.encode_member_removed(user))
        if _wants(hooks, "m"):
            name = key + b"\0m\0" + user.encode()
            self.cancel_held(name)
            self.outbox("m", key, user, self.now + hold, name)
        return True

    def set_count(
        self, key: bytes, owner: bytes, count: int, hold: int, publish: bool, hooks: str | None
    ) -> tuple[int, int, bool]:
        chan = self.channel(key)
        old = chan.counts.get(owner, 0)
        before = self.total(chan, live=False)
        if count == old:
            return before, before, False
        if count > 0:
            chan.counts[owner] = count
            self.shard.owner_index.setdefault(owner, set()).add(key)
        else:
            chan.counts.pop(owner, None)
        after = before - old + count
        occupied = False
        if before == 0 and after > 0:
            self.shard.occupied.add(key)
            occupied = not self.cancel_held(key + b"\0v\0")
            if occupied and _wants(hooks, "o"):
                self.outbox("o", key, "", self.now)
        elif after == 0 and before > 0:
            self.shard.occupied.discard(key)
            if _wants(hooks, "v"):
                self.cancel_held(key + b"\0v\0")
                self.outbox("v", key, "", self.now + hold, key + b"\0v\0")
        presence = b":presence-" in key
        if after > 0 and after != before and hooks and not presence and _wants(hooks, "c"):
            self.outbox("c", key, str(after), self.now)
        announce = after <= _COUNT_RATE_LIMIT_ABOVE or chan.count_quiet_until <= self.now
        if publish and after > 0 and b":presence-" not in key and announce:
            if after > _COUNT_RATE_LIMIT_ABOVE:
                chan.count_quiet_until = self.now + 5000
            self.publish(key, c.encode_count(after))
        return before, after, occupied

    def reap_owner(self, owner: bytes, limit: int, hold: int) -> tuple[int, int]:
        keys = self.shard.owner_index.get(owner, set())
        done = removed = 0
        for key in list(keys)[:limit]:
            chan = self.channel(key)
            hooks = "" if b":#" in key else "mv"  # no webhooks of internal channels
            for o, user in [m for m in chan.members if m[0] == owner]:
                self.remove_member(key, o, user, hold, hooks)
                removed += 1
            if owner in chan.counts:
                self.set_count(key, owner, 0, hold, True, hooks)
                removed += 1
            keys.discard(key)
            done += 1
        if not keys:
            self.shard.owner_index.pop(owner, None)
            self.shard.nodes.pop(owner, None)
        return done, removed


class MemoryPresenceStore:
    """One node's view of a :class:`MemoryShards` deployment (see
    :class:`~gateway.store.presence.PresenceStore`)."""

    def __init__(
        self,
        shards: MemoryShards,
        *,
        owner: str,
        hold_ms: int = 3000,
        max_members: int = 100,
        hooks: HooksFor | None = None,
    ) -> None:
        self.shards = shards
        self.hooks_for: HooksFor = hooks or (lambda app_id, channel: "")
        self.owner = owner.encode()
        self.hold_ms = hold_ms
        self.max_members = max_members
        self._tail: dict[int, asyncio.Future[None]] = {}

    def shard_of(self, app_id: str, channel: str) -> int:
        """The shard holding ``channel``."""
        return self.shards.shard_for_key(c.channel_key(app_id, channel))

    def shard_name(self, shard: int) -> str:
        """``memory-<index>``."""
        return f"memory-{shard}"

    async def _enter(self, op: str, shard: int, key: bytes, *, write: bool) -> _Shard:
        if not write:
            return await self.shards.enter(op, shard, key, self.owner, write=False)
        # A node's writes to one shard apply in the order it made them, as the batch writer
        # sends them (a write held for its shard holds the later ones too).
        prev = self._tail.get(shard)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tail[shard] = mine
        try:
            if prev is not None and not prev.done():
                await prev
            return await self.shards.enter(op, shard, key, self.owner, write=True)
        finally:
            # The caller applies the operation right after this returns, without yielding:
            # the next write of this node cannot run before it.
            mine.set_result(None)

    async def _ops(
        self, op: str, app_id: str, channel: str, *, write: bool = True
    ) -> tuple[_Ops, bytes]:
        key = c.channel_key(app_id, channel)
        shard = self.shards.shard_for_key(key)
        state = await self._enter(op, shard, key, write=write)
        return _Ops(self.shards, state), key

    async def _shard_ops(self, op: str, shard: int, *, write: bool = True) -> _Ops:
        state = await self._enter(op, shard, b"", write=write)
        return _Ops(self.shards, state)

    # -- writes ------------------------------------------------------------------------------

    async def join(
        self,
        app_id: str,
        channel: str,
        user_id: str,
        user_info: str | None,
        exclude: str,
        *,
        max_members: int | None = None,
    ) -> JoinResult:
        """See :meth:`PresenceStore.join <gateway.store.presence.PresenceStore.join>`."""
        ops, key = await self._ops("pjoin", app_id, channel)
        chan = ops.channel(key)
        limit = self.max_members if max_members is None else max_members
        if user_id not in chan.users and len(chan.users) >= limit:
            return JoinResult(False, False, None)
        hooks = self.hooks_for(app_id, channel)
        added, webhook = ops.add_member(key, self.owner, user_id, user_info or "", exclude, hooks)
        return JoinResult(added, webhook, ops.roster(chan))

    def submit_join(
        self,
        app_id: str,
        channel: str,
        user_id: str,
        user_info: str | None,
        exclude: str,
        done: Callable[[JoinResult | BaseException], None],
        *,
        max_members: int | None = None,
    ) -> asyncio.Future[Any]:
        """See :meth:`PresenceStore.submit_join` (a task here, so the gates apply)."""
        join = self.join(app_id, channel, user_id, user_info, exclude, max_members=max_members)
        return _submit(join, done)

    def submit_leave(
        self, app_id: str, channel: str, user_id: str, done: Callable[[bool | BaseException], None]
    ) -> asyncio.Future[Any]:
        """See :meth:`PresenceStore.submit_leave`."""
        return _submit(self.leave(app_id, channel, user_id), done)

    def submit_subscribers(
        self,
        items: Sequence[SubsItem],
        done: Callable[[list[SubsResult | BaseException]], None],
    ) -> asyncio.Future[Any]:
        """See :meth:`PresenceStore.submit_subscribers`: the writes one after the other."""

        async def run() -> list[SubsResult | BaseException]:
            out: list[SubsResult | BaseException] = []
            for app_id, channel, count, publish in items:
                try:
                    out.append(
                        await self.set_subscribers(app_id, channel, count, publish_count=publish)
                    )
                except Exception as exc:
                    out.append(exc)
            return out

        return _submit(run(), lambda results: done(_as_list(results, len(items))))

    async def leave(self, app_id: str, channel: str, user_id: str) -> bool:
        """See :meth:`PresenceStore.leave`."""
        ops, key = await self._ops("pleave", app_id, channel)
        hooks = self.hooks_for(app_id, channel)
        last = ops.remove_member(key, self.owner, user_id, self.hold_ms, hooks)
        ops.index(key, self.owner)
        return last

    async def set_subscribers(
        self, app_id: str, channel: str, count: int, *, publish_count: bool
    ) -> SubsResult:
        """See :meth:`PresenceStore.set_subscribers`."""
        ops, key = await self._ops("subs", app_id, channel)
        hooks = self.hooks_for(app_id, channel)
        before, after, occupied = ops.set_count(
            key, self.owner, count, self.hold_ms, publish_count, hooks
        )
        ops.index(key, self.owner)
        return SubsResult(before, after, occupied)

    async def sync_many(
        self, channels: Sequence[tuple[str, str, LocalChannel]]
    ) -> list[list[Due] | BaseException]:
        """See :meth:`PresenceStore.sync_many`."""
        out: list[list[Due] | BaseException] = []
        for app_id, channel, local in channels:
            try:
                out.append(await self.sync(app_id, channel, local))
            except ShardUnavailableError as exc:
                out.append(exc)
        return out

    async def sync(self, app_id: str, channel: str, local: LocalChannel) -> list[Due]:
        """Re-assert one channel (see :meth:`sync_many`)."""
        ops, key = await self._ops("sync", app_id, channel)
        hooks = self.hooks_for(app_id, channel)
        chan = ops.channel(key)
        due: list[Due] = []
        for owner, user in [m for m in chan.members if m[0] == self.owner]:
            if user not in local.members:
                ops.remove_member(key, owner, user, self.hold_ms, hooks)
        for user, info in local.members.items():
            _, webhook = ops.add_member(key, self.owner, user, info or "", "", hooks)
            if webhook:
                due.append(("member_added", user))
        _, _, occupied = ops.set_count(
            key, self.owner, local.count, self.hold_ms, local.publish_count, hooks
        )
        if occupied:
            due.append(("channel_occupied", None))
        ops.index(key, self.owner)
        return due

    async def publish(
        self, app_id: str, channel: str, payload: bytes, *, hook: tuple[str, str] | None = None
    ) -> None:
        """See :meth:`PresenceStore.publish`."""
        ops, key = await self._ops("publish", app_id, channel)
        ops.publish(key, payload)
        if hook is not None:
            ops.outbox(hook[0], key, hook[1], ops.now)

    async def cache_set(self, app_id: str, channel: str, frame: str, ttl_ms: int) -> None:
        """See :meth:`PresenceStore.cache_set`."""
        ops, key = await self._ops("cache", app_id, channel)
        ops.channel(key).cache = (frame, ops.now + ttl_ms)

    async def claim_outbox(self, limit: int, lease_ms: int) -> list[OutboxClaim]:
        """See :meth:`PresenceStore.claim_outbox`."""
        out = []
        for shard in self.shards.shards:
            if not shard.up:
                continue
            ops = await self._shard_ops("claim", shard.index)
            now = ops.now
            payloads: list[bytes] = []
            for ident, at in sorted(shard.inflight.items(), key=lambda kv: kv[1]):
                if at > now or len(payloads) >= limit:
                    break
                if ident in shard.ev:
                    shard.inflight[ident] = now + lease_ms
                    payloads.append(shard.ev[ident])
                else:
                    del shard.inflight[ident]
            due = sorted((at, name) for name, at in shard.due.items() if at <= now)
            for _, name in due[: max(0, limit - len(payloads))]:
                del shard.due[name]
                payload = shard.ev.pop(name, None)
                if payload is None:
                    continue
                ident = payload.split(b"\0", 1)[0]
                shard.ev[ident] = payload
                shard.inflight[ident] = now + lease_ms
                payloads.append(payload)
            dropped, shard.dropped = shard.dropped, 0
            claimed = c.decode_claim(shard.index, [now, dropped, *payloads])
            if claimed.entries or claimed.dropped:
                out.append(claimed)
        return out

    async def ack_outbox(self, shard: int, ids: Sequence[str]) -> None:
        """See :meth:`PresenceStore.ack_outbox`."""
        ops = await self._shard_ops("ack", shard)
        for ident in ids:
            ops.shard.inflight.pop(ident.encode(), None)
            ops.shard.ev.pop(ident.encode(), None)

    async def defer_outbox(self, shard: int, ids: Sequence[str], delay_ms: int) -> None:
        """See :meth:`PresenceStore.defer_outbox`."""
        ops = await self._shard_ops("defer", shard)
        for ident in ids:
            if ident.encode() in ops.shard.inflight:
                ops.shard.inflight[ident.encode()] = ops.now + delay_ms

    def submit_hook(self, app_id: str, channel: str, kind: str, rest: str) -> asyncio.Future[Any]:
        """See :meth:`PresenceStore.submit_hook`."""

        async def run() -> bool:
            ops, key = await self._ops("hook", app_id, channel)
            ops.outbox(kind, key, rest, ops.now)
            return True

        return asyncio.ensure_future(run())

    async def lease(
        self, shard: int, lease_ms: int, *, first: bool, gap_ms: int, grace_ms: int
    ) -> int:
        """See :meth:`PresenceStore.lease` (``gap_ms`` is not modelled)."""
        ops = await self._shard_ops("lease", shard)
        nodes = ops.shard.nodes
        if first:
            node = self.owner[: self.owner.index(b"@") + 1]
            for other in nodes:
                if other != self.owner and other.startswith(node):
                    nodes[other] = 0
        nodes[self.owner] = deadline = ops.now + lease_ms
        ops.shard.grace_ms = grace_ms
        return deadline

    async def check(self, shard: int) -> tuple[int, int]:
        """See :meth:`PresenceStore.check`."""
        ops = await self._shard_ops("check", shard)
        n = total = 0
        for key in ops.shard.owner_index.get(self.owner, set()):
            chan = ops.channel(key)
            count = chan.counts.get(self.owner)
            if count is not None:
                n += 1
                total += c.entry_hash(c.count_entry(key, count))
            for (owner, user), info in chan.members.items():
                if owner == self.owner:
                    n += 1
                    total += c.entry_hash(c.member_entry(key, user, info))
        return n, total % 4294967296

    async def reap(
        self, shard: int, token: str, *, lock_ms: int, limit: int, grace_ms: int
    ) -> list[int]:
        """See :meth:`PresenceStore.reap`."""
        ops = await self._shard_ops("reap", shard)
        state = ops.shard
        if state.reaper is not None and state.reaper[1] > ops.now and state.reaper[0] != token:
            return [-1]
        state.reaper = (token, ops.now + lock_ms)
        cutoff = ops.now - grace_ms
        done = removed = 0
        expired = sorted((d, o) for o, d in state.nodes.items() if d < cutoff)[:16]
        for _, owner in expired:
            if done >= limit:
                break
            if not ops.alive(owner):
                d, r = ops.reap_owner(owner, limit - done, self.hold_ms)
                done, removed = done + d, removed + r
        left = sum(1 for d in state.nodes.values() if d < cutoff)
        return [done, left, removed]

    # -- reads -------------------------------------------------------------------------------

    async def roster(self, app_id: str, channel: str) -> dict[str, str | None]:
        """See :meth:`PresenceStore.roster`."""
        ops, key = await self._ops("read", app_id, channel, write=False)
        return ops.roster(ops.channel(key))

    async def user_ids(self, app_id: str, channel: str) -> list[str]:
        """See :meth:`PresenceStore.user_ids`."""
        return list(await self.roster(app_id, channel))

    async def counts(self, app_id: str, channel: str) -> ChannelCounts:
        """See :meth:`PresenceStore.counts`."""
        ops, key = await self._ops("read", app_id, channel, write=False)
        chan = ops.channel(key)
        return ChannelCounts(ops.total(chan, live=True), len(ops.roster(chan)))

    async def channels(self, app_id: str, prefix: str = "") -> dict[str, ChannelCounts]:
        """See :meth:`PresenceStore.channels`."""
        match = f"{{{app_id}:{prefix}".encode()
        out: dict[str, ChannelCounts] = {}
        for shard in self.shards.shards:
            ops = await self._shard_ops("read", shard.index, write=False)
            for key in sorted(shard.occupied):
                if key.startswith(match):
                    chan = ops.channel(key)
                    count = ops.total(chan, live=True)
                    if count > 0:
                        _, name = c.parse_channel_key(key)
                        out[name] = ChannelCounts(count, len(ops.roster(chan)))
        return out

    async def cache_get(self, app_id: str, channel: str) -> tuple[str | None, int]:
        """See :meth:`PresenceStore.cache_get` (-2 as the time left when there is none)."""
        ops, key = await self._ops("read", app_id, channel, write=False)
        cached = ops.channel(key).cache
        if cached is None or cached[1] <= ops.now:
            return None, -2
        return cached[0], cached[1] - ops.now

    async def leases(self, shard: int) -> list[tuple[str, int, str]]:
        """See :meth:`PresenceStore.leases`."""
        ops = await self._shard_ops("read", shard, write=False)
        out = []
        for owner, deadline in ops.shard.nodes.items():
            if ops.alive(owner):
                state = "live"
            elif deadline >= ops.now - ops.shard.grace_ms:
                state = "late"
            else:
                state = "dead"
            out.append((owner.decode(), deadline, state))
        return out

    async def owned(self, shard: int) -> list[tuple[str, str]]:
        """See :meth:`PresenceStore.owned`."""
        ops = await self._shard_ops("read", shard, write=False)
        return [c.parse_channel_key(k) for k in ops.shard.owner_index.get(self.owner, set())]


def _as_list(
    results: list[SubsResult | BaseException] | BaseException, n: int
) -> list[SubsResult | BaseException]:
    return results if isinstance(results, list) else [results] * n


class MemorySubscriptions:
    """One node's Pub/Sub on a :class:`MemoryShards` deployment (see
    :class:`~gateway.store.presence.Subscriptions`)."""

    def __init__(self, shards: MemoryShards, on_message: OnMessage) -> None:
        self.shards = shards
        self.on_message = on_message
        self.keys: set[tuple[int, bytes]] = set()

    async def subscribe(self, shard: int, key: bytes) -> None:
        """Listen to ``key``.

        Raises:
            ConnectionError: The shard is down.
        """
        await self.shards.pass_gates("subscribe", None, key)
        if not self.shards.shards[shard].up:
            raise ConnectionError(f"memory-{shard}: down")
        self.keys.add((shard, key))
        self.shards.listen(shard, key, self.on_message)

    def listening(self, shard: int, key: bytes) -> bool:
        """Always False: every subscribe passes the gates (tests hold them)."""
        return False

    def unsubscribe(self, shard: int, key: bytes) -> None:
        """Stop listening to ``key``."""
        self.keys.discard((shard, key))
        self.shards.unlisten(shard, key, self.on_message)

    def compact(self) -> None:
        """Nothing to give back."""


def _wants(hooks: str | None, kind: str) -> bool:
    """Whether ``kind`` is recorded (``None``: a version-4 node's call, held kinds only)."""
    if hooks is None:
        return kind in "mv"
    return kind in hooks
