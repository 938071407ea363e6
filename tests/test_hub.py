"""The hub's concurrency, tested deterministically on the in-memory store twin.

Several hubs (nodes) share one :class:`~gateway.store.presence_memory.MemoryShards`
deployment; the test holds chosen store operations at gates, takes shards down and moves the
shard clock, so that each interleaving happens exactly as written, in milliseconds. The twin
itself is held to the Redis store's behaviour by tests/test_store.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from dataclasses import replace
from typing import Any

import pytest
from polling import settle

from gateway.config import AppConfig, NodeConfig
from gateway.metrics import Metrics
from gateway.protocol.auth import sign_channel
from gateway.protocol.session import Action, Session
from gateway.server.hub import Hub
from gateway.server.outbox import event_of
from gateway.shards import contract
from gateway.store.presence_memory import MemoryShards

APP = AppConfig("1", "app-key", "app-secret", webhook_url="http://127.0.0.1:9/hooks")
CONFIG = NodeConfig(apps=(APP,))
CHANNEL = "presence-room"
HOLD_MS = 500
LEASE_MS = 10_000

_ids = itertools.count(1)


def _text_of_frame(frame: bytes) -> str:
    """The payload of one unmasked server text frame."""
    n = frame[1] & 0x7F
    offset = 2
    if n == 126:
        n, offset = int.from_bytes(frame[2:4], "big"), 4
    elif n == 127:
        n, offset = int.from_bytes(frame[2:10], "big"), 10
    return frame[offset : offset + n].decode()


class FakeSocket:
    """A WebSocket as the hub sees it: frames sent to it are recorded, decoded."""

    def __init__(self, key: str = APP.key) -> None:
        self.id = next(_ids)
        self.path = f"/app/{key}"
        self.query = "protocol=7&client=js&version=8.6.0"
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def send_text(self, text: str) -> None:
        self.frames.append(json.loads(text))

    def queue_frame(self, frame: bytes) -> bool:  # what the front door's broadcast calls
        if self.closed is not None:
            return False
        self.send_text(_text_of_frame(frame))
        return True

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = (code, reason)

    @property
    def socket_id(self) -> str:
        data = json.loads(self.frames[0]["data"])
        return str(data["socket_id"])

    def events(self, name: str, channel: str = CHANNEL) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("event") == name and f.get("channel") == channel]


class Node:
    """A hub on the shared memory deployment, with its store view, Pub/Sub and webhooks."""

    def __init__(self, world: MemoryShards, name: str) -> None:
        self.owner = f"{name}@1"
        self.store = world.store(
            self.owner,
            hold_ms=HOLD_MS,
            hooks=lambda a, c: self.hub.hooks_for(a, c),  # noqa: PLW0108
        )
        self.pubsub = world.subscriptions(self._on_message)
        self.hub = Hub(CONFIG, self.store, self.pubsub, Metrics())
        self.webhooks: list[dict[str, Any]] = []  # claimed from the outbox by this node

    def _on_message(self, shard: int, key: bytes, data: bytes) -> None:
        self.hub.on_message(shard, key, data)

    async def lease(self, world: MemoryShards) -> None:
        for shard in range(len(world.shards)):
            await self.store.lease(shard, LEASE_MS, first=False, gap_ms=0, grace_ms=0)

    def connect(self, key: str = APP.key) -> FakeSocket:
        sock = FakeSocket(key)
        self.hub.ws_open(sock)  # type: ignore[arg-type]
        return sock

    def subscribe(self, sock: FakeSocket, user_id: str, channel: str = CHANNEL) -> None:
        channel_data = json.dumps({"user_id": user_id, "user_info": {"name": user_id}})
        auth = sign_channel(APP, sock.socket_id, channel, channel_data)
        frame = {
            "event": "pusher:subscribe",
            "data": {"channel": channel, "auth": auth, "channel_data": channel_data},
        }
        self.hub.ws_text(sock, json.dumps(frame))  # type: ignore[arg-type]

    def unsubscribe(self, sock: FakeSocket, channel: str = CHANNEL) -> None:
        frame = {"event": "pusher:unsubscribe", "data": {"channel": channel}}
        self.hub.ws_text(sock, json.dumps(frame))  # type: ignore[arg-type]

    def disconnect(self, sock: FakeSocket) -> None:
        self.hub.ws_closed(sock, 1000)  # type: ignore[arg-type]

    async def claim(self) -> None:
        """Claim what the outbox has due (as the node's dispatcher does) and acknowledge it."""
        for shard, _now, entries, _dropped in await self.store.claim_outbox(1000, 60_000):
            await self.store.ack_outbox(shard, [e.id for e in entries])
            self.webhooks += [event_of(e) for e in entries]

    def webhooks_for(self, name: str, user_id: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.webhooks
            if e["name"] == name and (user_id is None or e.get("user_id") == user_id)
        ]

    def idle(self) -> bool:
        return not self.hub._tasks and not self.hub._count_dirty


class World:
    """The shared deployment, its clock, and the nodes on it."""

    def __init__(self, *, write_timeout: float = 30.0) -> None:
        self.now = 1_000_000
        self.shards = MemoryShards(2, clock=lambda: self.now, write_timeout=write_timeout)
        self.nodes: list[Node] = []
        self.marks = itertools.count()

    async def node(self, name: str) -> Node:
        node = Node(self.shards, name)
        await node.lease(self.shards)
        self.nodes.append(node)
        return node

    @property
    def shard(self) -> int:
        return self.shards.shard_for_key(contract.channel_key(APP.id, CHANNEL))

    async def quiet(self, *nodes: Node) -> None:
        """Wait until the hubs have no store work in flight."""
        await settle(lambda: all(n.idle() for n in nodes or self.nodes), what="idle hubs")

    async def mark(self, watcher: FakeSocket, node: Node) -> None:
        """Publish a marker event and wait until ``watcher`` has it: every member event
        published before it on the channel has been delivered by then (Pub/Sub is in order)."""
        name = f"mark-{next(self.marks)}"
        frame = json.dumps({"event": name, "channel": CHANNEL, "data": "{}"})
        await node.store.publish(APP.id, CHANNEL, contract.encode_event(frame))
        await settle(lambda: watcher.events(name), what=name)


def _succeeded(sock: FakeSocket) -> dict[str, Any] | None:
    ok = sock.events("pusher_internal:subscription_succeeded")
    return json.loads(ok[0]["data"]) if ok else None


def _roster(sock: FakeSocket) -> set[str]:
    """The members ``sock`` knows of: its roster, then the member events in order."""
    data = _succeeded(sock)
    assert data is not None
    members = set(data["presence"]["ids"])
    for frame in sock.frames:
        if frame.get("channel") != CHANNEL:
            continue
        user = json.loads(frame["data"]).get("user_id") if frame.get("data") else None
        if frame["event"] == "pusher_internal:member_added":
            members.add(user)
        elif frame["event"] == "pusher_internal:member_removed":
            members.discard(user)
    return members


async def _watcher(world: World) -> tuple[Node, FakeSocket]:
    node = await world.node("watch")
    sock = node.connect()
    node.subscribe(sock, "watcher")
    await settle(lambda: _succeeded(sock), what="the watcher's subscription")
    return node, sock


def _added(sock: FakeSocket, user: str) -> int:
    return sum(
        json.loads(f["data"])["user_id"] == user
        for f in sock.events("pusher_internal:member_added")
    )


def _removed(sock: FakeSocket, user: str) -> int:
    return sum(
        json.loads(f["data"])["user_id"] == user
        for f in sock.events("pusher_internal:member_removed")
    )


async def test_one_user_joining_on_two_hubs_at_once_is_added_once() -> None:
    world = World()
    wnode, watcher = await _watcher(world)
    a, b = await world.node("a"), await world.node("b")
    gate = world.shards.hold("pjoin", owner=a.owner)
    sa = a.connect()
    a.subscribe(sa, "u1")
    await gate.wait_reached()  # a's join is in flight
    sb = b.connect()
    b.subscribe(sb, "u1")
    await settle(lambda: _succeeded(sb), what="b's subscription")
    gate.release()
    await settle(lambda: _succeeded(sa), what="a's subscription")
    await world.quiet()
    await world.mark(watcher, wnode)
    assert _added(watcher, "u1") == 1
    await a.claim()
    await b.claim()
    assert set(
        json.loads(sa.events("pusher_internal:subscription_succeeded")[0]["data"])["presence"][
            "ids"
        ]
    ) == {"watcher", "u1"}
    # The member_added webhook is recorded once, whichever node claims it.
    assert len(a.webhooks_for("member_added", "u1") + b.webhooks_for("member_added", "u1")) == 1
    assert await wnode.store.roster(APP.id, CHANNEL) == {
        "watcher": '{"name":"watcher"}',
        "u1": '{"name":"u1"}',
    }


async def test_a_leave_while_the_join_is_in_flight_leaves_nothing_behind() -> None:
    world = World()
    wnode, watcher = await _watcher(world)
    a = await world.node("a")
    gate = world.shards.hold("pjoin", owner=a.owner)
    sa = a.connect()
    a.subscribe(sa, "u1")
    await gate.wait_reached()
    a.disconnect(sa)  # the leave is written after the join: a node's writes keep their order
    gate.release()
    await world.quiet()
    await world.mark(watcher, wnode)
    assert set(await wnode.store.roster(APP.id, CHANNEL)) == {"watcher"}
    assert _roster(watcher) == {"watcher"}
    assert not a.hub.presence and (APP.id, CHANNEL) not in a.hub.members
    assert _succeeded(sa) is None  # it never got a subscription_succeeded


async def test_shard_loss_mid_join_fails_the_subscription_cleanly_then_a_retry_succeeds() -> None:
    world = World(write_timeout=0.05)
    wnode, watcher = await _watcher(world)
    a = await world.node("a")
    gate = world.shards.hold("pjoin", owner=a.owner)
    sa = a.connect()
    a.subscribe(sa, "u1")
    await gate.wait_reached()
    world.shards.take_down(world.shard)
    gate.release()
    await settle(lambda: sa.events("pusher:subscription_error"), what="the subscription error")
    [error] = sa.events("pusher:subscription_error")
    data = error["data"] if isinstance(error["data"], dict) else json.loads(error["data"])
    assert data["status"] == 4200
    assert f"memory-{world.shard}" in json.dumps(data)
    assert not a.hub.presence and (APP.id, CHANNEL) not in a.hub.members
    assert sa.closed is None  # the socket stays up; only the subscription failed
    await world.quiet(a)
    world.shards.bring_up(world.shard)
    a.subscribe(sa, "u1")
    await settle(lambda: _succeeded(sa), what="the retried subscription")
    await world.quiet()
    await world.mark(watcher, wnode)
    assert _added(watcher, "u1") == 1 and _removed(watcher, "u1") == 0
    assert _roster(watcher) == {"watcher", "u1"}


async def test_a_dead_owner_reaped_while_its_user_reconnects_elsewhere_announces_nothing() -> None:
    world = World()
    wnode, watcher = await _watcher(world)
    a, b = await world.node("a"), await world.node("b")
    sa = a.connect()
    a.subscribe(sa, "u1")
    await settle(lambda: _succeeded(sa))
    await world.quiet()
    # Node a dies (no leave is ever written); its lease runs out while the others refresh.
    world.now += LEASE_MS + 1
    for node in (wnode, b):
        await node.lease(world.shards)
    assert set(await b.store.roster(APP.id, CHANNEL)) == {"watcher"}
    # The user reconnects to b before the reaper ran: nothing to announce.
    sb = b.connect()
    b.subscribe(sb, "u1")
    await settle(lambda: _succeeded(sb))
    assert "u1" in _succeeded(sb)["presence"]["ids"]  # type: ignore[index]
    reply = await b.store.reap(world.shard, "reaper", lock_ms=3000, limit=100, grace_ms=0)
    assert reply[0] >= 1  # a's channel was reaped
    await world.quiet()
    await world.mark(watcher, wnode)
    assert _added(watcher, "u1") == 1 and _removed(watcher, "u1") == 0
    world.now += HOLD_MS + 1
    await b.claim()
    assert not b.webhooks_for("member_removed", "u1")
    assert len(b.webhooks_for("member_added", "u1")) == 1  # the first join's, only


async def test_a_dead_owner_reaped_announces_its_users_once() -> None:
    world = World()
    wnode, watcher = await _watcher(world)
    a = await world.node("a")
    sa = a.connect()
    a.subscribe(sa, "u1")
    await settle(lambda: _succeeded(sa))
    await world.quiet()
    world.now += LEASE_MS + 1
    await wnode.lease(world.shards)
    reply = await wnode.store.reap(world.shard, "reaper", lock_ms=3000, limit=100, grace_ms=0)
    assert reply[0] >= 1
    await world.mark(watcher, wnode)
    assert _removed(watcher, "u1") == 1
    world.now += HOLD_MS + 1
    await wnode.claim()
    assert len(wnode.webhooks_for("member_removed", "u1")) == 1


async def test_a_full_channel_refuses_with_the_configured_limit() -> None:
    world = World()
    a = await world.node("a")
    a.hub.config = replace(CONFIG, apps=(replace(APP, max_presence_members=2),))
    socks = [a.connect() for _ in range(3)]
    for i, sock in enumerate(socks):
        a.subscribe(sock, f"u{i}")
    await settle(lambda: socks[2].events("pusher:subscription_error"))
    data = socks[2].events("pusher:subscription_error")[0]["data"]
    text = data if isinstance(data, str) else json.dumps(data)
    assert "full (2 members)" in text
    assert all(_succeeded(s) for s in socks[:2])


@pytest.mark.parametrize("seed", range(40))
async def test_random_interleavings_converge(seed: int) -> None:
    """Joins, leaves and closes on two hubs, with writes held and released at random: once
    everything settled, the store, every hub's local view and a watcher's roster agree."""
    rng = random.Random(seed)
    world = World()
    wnode, watcher = await _watcher(world)
    hubs = [await world.node("a"), await world.node("b")]
    sockets: list[tuple[Node, FakeSocket, str]] = []
    gates = []
    for _ in range(60):
        step = rng.random()
        if step < 0.4 or not sockets:
            node = rng.choice(hubs)
            sock = node.connect()
            user = rng.choice(["u1", "u2", "u3"])
            node.subscribe(sock, user)
            sockets.append((node, sock, user))
        elif step < 0.55:
            node, sock, _ = sockets.pop(rng.randrange(len(sockets)))
            node.disconnect(sock)
        elif step < 0.65:
            node, sock, _ = sockets.pop(rng.randrange(len(sockets)))
            node.unsubscribe(sock)
        elif step < 0.8:
            node = rng.choice(hubs)
            gates.append(
                world.shards.hold(rng.choice(["pjoin", "pleave", "subs"]), owner=node.owner)
            )
        elif gates:
            gates.pop(rng.randrange(len(gates))).release()
        for _ in range(rng.randrange(4)):
            await asyncio.sleep(0)
    for gate in gates:
        gate.release()
    await world.quiet()
    await world.mark(watcher, wnode)
    held: set[str] = set()
    for _, sock, user in sockets:
        await settle(lambda sock=sock: _succeeded(sock) or sock.events("pusher:subscription_error"))
        assert _succeeded(sock), f"seed {seed}: {user} never subscribed"
        held.add(user)
    expected = held | {"watcher"}
    assert set(await wnode.store.roster(APP.id, CHANNEL)) == expected, f"seed {seed}"
    assert _roster(watcher) == expected, f"seed {seed}"
    for node in hubs:
        local = {u for (_, ch, u) in node.hub.presence if ch == CHANNEL}
        assert local == {u for n, _, u in sockets if n is node}, f"seed {seed}"
    counts = await wnode.store.counts(APP.id, CHANNEL)
    assert counts.subscription_count == len(sockets) + 1, f"seed {seed}"


# --- heartbeat schedule -----------------------------------------------------------------------

PONG = '{"event":"pusher:pong","data":{}}'


class Clock:
    """A settable clock for a hub's heartbeat (seconds)."""

    def __init__(self, now: float = 5_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _clocked_hub(clock: Clock) -> Hub:
    """A hub on the memory store whose time is ``clock``."""
    world = MemoryShards(2, clock=lambda: int(clock.now * 1000))
    store = world.store("clock@1", hold_ms=HOLD_MS)
    pubsub = world.subscriptions(lambda shard, key, data: None)
    return Hub(CONFIG, store, pubsub, Metrics(), clock=clock)


def _open(hub: Hub) -> FakeSocket:
    sock = FakeSocket()
    hub.ws_open(sock)  # type: ignore[arg-type]
    return sock


def _pings(sock: FakeSocket) -> int:
    return sum(f.get("event") == "pusher:ping" for f in sock.frames)


def _run(hub: Hub, clock: Clock, until: float, on_tick: Any = None) -> None:
    """Tick once a second until ``until``, calling ``on_tick()`` after each tick."""
    while clock.now + 1 <= until:
        clock.now += 1
        hub.tick()
        if on_tick is not None:
            on_tick()


def test_a_silent_socket_gets_one_ping_then_4201_after_the_pong_timeout() -> None:
    clock = Clock()
    hub = _clocked_hub(clock)
    start = clock.now
    sock = _open(hub)
    _run(hub, clock, start + CONFIG.activity_timeout - 1)
    assert _pings(sock) == 0
    _run(hub, clock, start + CONFIG.activity_timeout)
    assert _pings(sock) == 1
    _run(hub, clock, start + CONFIG.activity_timeout + hub.limits.pong_timeout - 1)
    assert _pings(sock) == 1
    assert sock.closed is None
    _run(hub, clock, start + CONFIG.activity_timeout + hub.limits.pong_timeout)
    assert sock.closed == (4201, "Pong reply not received")
    assert _pings(sock) == 1
    assert len(hub.deadlines) == 0  # a closing session is not filed again
    _run(hub, clock, start + 1_000)
    assert _pings(sock) == 1
    hub.ws_closed(sock, 4201)  # type: ignore[arg-type]
    assert len(hub.deadlines) == 0


def test_a_socket_answering_its_pings_is_never_closed() -> None:
    clock = Clock()
    hub = _clocked_hub(clock)
    sock = _open(hub)
    answered = 0

    def answer() -> None:
        nonlocal answered
        if _pings(sock) > answered:
            answered = _pings(sock)
            hub.ws_text(sock, PONG)  # type: ignore[arg-type]

    _run(hub, clock, clock.now + 1_000, answer)
    assert sock.closed is None
    assert _pings(sock) == 1_000 // CONFIG.activity_timeout  # answered at once: every 120 s
    assert hub.clients[sock.id] in hub.deadlines


def test_a_socket_sending_frames_is_filed_again_and_never_pinged() -> None:
    clock = Clock()
    hub = _clocked_hub(clock)
    sock = _open(hub)
    client = hub.clients[sock.id]
    for second in range(1, 1_001):
        clock.now += 1
        if second % 60 == 0:
            hub.ws_text(sock, '{"event":"pusher:ping","data":{}}')  # type: ignore[arg-type]
        hub.tick()
        assert client in hub.deadlines
    assert _pings(sock) == 0
    assert sock.closed is None


def test_a_tick_with_no_session_due_ticks_none(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    hub = _clocked_hub(clock)
    socks = [_open(hub) for _ in range(2_000)]
    calls = 0
    tick = Session.tick

    def counted(self: Session, now: float) -> list[Action]:
        nonlocal calls
        calls += 1
        return tick(self, now)

    monkeypatch.setattr(Session, "tick", counted)
    _run(hub, clock, clock.now + CONFIG.activity_timeout - 1)
    assert calls == 0
    _run(hub, clock, clock.now + 1)
    assert calls == len(socks)
    assert all(_pings(s) == 1 for s in socks)
    _run(hub, clock, clock.now + hub.limits.pong_timeout - 1)
    assert calls == len(socks)


def test_closed_sockets_leave_the_schedule_whatever_the_churn() -> None:
    clock = Clock()
    hub = _clocked_hub(clock)
    for _ in range(400):  # 48 000 short-lived sockets, 120 a second
        socks = [_open(hub) for _ in range(120)]
        assert len(hub.deadlines) == 120
        clock.now += 1
        hub.tick()
        for sock in socks:
            hub.ws_closed(sock, 1000)  # type: ignore[arg-type]
        assert len(hub.deadlines) == 0
        assert hub.deadlines._buckets == {}
    assert not hub.clients
    # Some left open across the ticks that would have pinged them, then closed.
    socks = [_open(hub) for _ in range(100)]
    _run(hub, clock, clock.now + CONFIG.activity_timeout + 5)
    assert len(hub.deadlines) == 100
    for sock in socks:
        hub.ws_closed(sock, 1000)  # type: ignore[arg-type]
    assert len(hub.deadlines) == 0
    hub.deadlines.compact()
    assert hub.deadlines._buckets == {} and hub.deadlines._slot == {}


@pytest.mark.parametrize("seed", range(5))
def test_the_schedule_acts_when_a_full_scan_would(seed: int) -> None:
    """Irregular ticks (a busy loop), frames at random times, sockets opening and closing:
    every socket gets its pings and 4201 at the same ticks as when every session is ticked."""
    rng = random.Random(seed)

    def full_scan(hub: Hub) -> None:  # the tick before the schedule
        now = hub.clock()
        for client in list(hub.clients.values()):
            actions = client.session.tick(now)
            if actions:
                hub._apply(client, actions)

    clock = Clock(rng.uniform(0, 10_000))
    wheel, scan = _clocked_hub(clock), _clocked_hub(clock)
    pairs: list[tuple[FakeSocket, FakeSocket]] = []
    for _ in range(3_000):
        clock.now += rng.choice([rng.uniform(0.2, 1.0), 1.0, rng.uniform(1.0, 2.5)])
        step = rng.random()
        if step < 0.05 or not pairs:
            pairs.append((_open(wheel), _open(scan)))
        elif step < 0.08:
            a, b = pairs.pop(rng.randrange(len(pairs)))
            wheel.ws_closed(a, 1000)  # type: ignore[arg-type]
            scan.ws_closed(b, 1000)  # type: ignore[arg-type]
        elif step < 0.3:
            a, b = rng.choice(pairs)
            wheel.ws_text(a, PONG)  # type: ignore[arg-type]
            scan.ws_text(b, PONG)  # type: ignore[arg-type]
        wheel.tick()
        full_scan(scan)
        for a, b in pairs:
            assert [f["event"] for f in a.frames] == [f["event"] for f in b.frames]
            assert a.closed == b.closed
    # The run went through both: pings, and 4201 closes.
    assert sum(_pings(a) for a, _ in pairs) > 10
    assert any(a.closed for a, _ in pairs)
    wheel_due = sum(c.session.deadline() is not None for c in wheel.clients.values())
    assert len(wheel.deadlines) == wheel_due


async def test_hooks_for_follows_the_apps_endpoints() -> None:
    from gateway.config import WebhookEndpoint

    world = World()
    a = await world.node("a")
    assert a.hub.hooks_for(APP.id, CHANNEL) == "".join(sorted("amovcex"))  # webhook_url: all
    presence = WebhookEndpoint("http://h/p", ("member_added",), ("presence-",))
    app = replace(APP, webhook_url=None, webhooks=(presence,), subscription_count=False)
    a.hub.set_apps(replace(CONFIG, apps=(app,)))
    assert a.hub.hooks_for(APP.id, CHANNEL) == "a"
    assert a.hub.hooks_for(APP.id, "public") == ""
    assert a.hub.hooks_for(APP.id, "#server-to-user-1") == ""
    a.hub.set_apps(replace(CONFIG, apps=(replace(app, webhooks=()),)))
    assert a.hub.hooks_for(APP.id, CHANNEL) == ""  # nothing recorded for an app without hooks
