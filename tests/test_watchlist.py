"""Watchlist events across hubs, deterministically on the in-memory store twin.

``online`` when a watched user's first signed-in socket opens on any node, ``offline`` once its
last one closed and the hold passed (a quick return sends nothing), once for a dead node's
users when the reaper removes them. The real store and pusher-js on two real nodes are in
tests/test_conformance_pusherjs.py.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

from polling import settle
from test_hub import APP, LEASE_MS, FakeSocket, Node, World

from gateway.protocol.auth import sign_user
from gateway.protocol.channels import online_channel

HOLD = 0.05  # seconds


async def _node(world: World, name: str) -> Node:
    node = await world.node(name)
    node.hub.watchlists.hold = HOLD
    return node


def _sign_in(node: Node, sock: FakeSocket, user: str, watchlist: list[str] | None = None) -> None:
    data: dict[str, Any] = {"id": user}
    if watchlist is not None:
        data["watchlist"] = watchlist
    user_data = json.dumps(data)
    frame = {
        "event": "pusher:signin",
        "data": {"auth": sign_user(APP, sock.socket_id, user_data), "user_data": user_data},
    }
    node.hub.ws_text(sock, json.dumps(frame))  # type: ignore[arg-type]


def _watch_events(sock: FakeSocket) -> list[tuple[str, list[str]]]:
    out = []
    for frame in sock.frames:
        if frame.get("event") == "pusher_internal:watchlist_events":
            data = json.loads(frame["data"])
            out += [(e["name"], e["user_ids"]) for e in data["events"]]
    return out


async def _signed_in(node: Node, user: str, watchlist: list[str] | None = None) -> FakeSocket:
    sock = node.connect()
    _sign_in(node, sock, user, watchlist)
    await settle(lambda: any(f.get("event") == "pusher:signin_success" for f in sock.frames))
    await settle(node.idle, what="idle hub")
    return sock


async def _delivered(world: World) -> None:
    """Every write done and what it published delivered (the twin delivers with call_soon)."""
    await world.quiet()
    for _ in range(5):
        await asyncio.sleep(0)


async def test_online_then_offline_across_two_nodes() -> None:
    world = World()
    a, b = await _node(world, "a"), await _node(world, "b")
    await _signed_in(a, "u1")  # online before the watcher signs in
    watcher = await _signed_in(b, "w", ["u1", "u2", "u3"])
    await settle(lambda: _watch_events(watcher) == [("online", ["u1"])], what="initial online")
    # signin_success comes first, then the initial online.
    names = [f.get("event") for f in watcher.frames]
    assert names.index("pusher:signin_success") < names.index("pusher_internal:watchlist_events")
    s2 = await _signed_in(a, "u2")
    await settle(lambda: ("online", ["u2"]) in _watch_events(watcher), what="u2 online")
    # A second socket of u2 (another node) changes nothing; closing one of two neither.
    s2b = await _signed_in(b, "u2")
    a.disconnect(s2)
    await _delivered(world)
    await settle(lambda: not b.hub.watchlists._offline and not a.hub.watchlists._offline)
    assert _watch_events(watcher) == [("online", ["u1"]), ("online", ["u2"])]
    b.disconnect(s2b)
    await settle(lambda: ("offline", ["u2"]) in _watch_events(watcher), what="u2 offline")
    assert _watch_events(watcher) == [("online", ["u1"]), ("online", ["u2"]), ("offline", ["u2"])]
    assert await a.store.user_ids(APP.id, online_channel("u2")) == []
    assert await a.store.user_ids(APP.id, online_channel("u1")) == ["u1"]


async def test_a_quick_reconnect_within_the_hold_sends_nothing() -> None:
    world = World()
    a, b = await _node(world, "a"), await _node(world, "b")
    watcher = await _signed_in(b, "w", ["u1"])
    s1 = await _signed_in(a, "u1")
    await settle(lambda: _watch_events(watcher) == [("online", ["u1"])])
    b.hub.watchlists.hold = 30.0  # the reconnect below is well within it
    a.disconnect(s1)
    await settle(lambda: b.hub.watchlists._offline, what="the held offline")
    await _signed_in(b, "u1")  # back, on the other node
    await settle(lambda: not b.hub.watchlists._offline, what="the offline cancelled")
    assert _watch_events(watcher) == [("online", ["u1"])]


async def test_a_dead_nodes_users_go_offline_once() -> None:
    world = World()
    a, b = await _node(world, "a"), await _node(world, "b")
    watcher = await _signed_in(b, "w", ["u1", "u2"])
    await _signed_in(a, "u1")
    await _signed_in(a, "u1")  # two sockets of u1 on the node that dies
    await _signed_in(a, "u2")
    await settle(lambda: len(_watch_events(watcher)) == 2)
    # Node a dies: no leave is ever written; its lease runs out while b refreshes.
    world.now += LEASE_MS + 1
    await b.lease(world.shards)
    assert await b.store.user_ids(APP.id, online_channel("u1")) == []  # invisible at once
    for shard in range(len(world.shards.shards)):
        await b.store.reap(shard, "reaper", lock_ms=3000, limit=100, grace_ms=0)
    await settle(lambda: len(_watch_events(watcher)) == 4, what="both offline")
    assert sorted(_watch_events(watcher)[2:]) == [("offline", ["u1"]), ("offline", ["u2"])]
    await _delivered(world)
    assert len(_watch_events(watcher)) == 4


async def test_anti_entropy_reasserts_online_users() -> None:
    world = World()
    a = await _node(world, "a")
    await _signed_in(a, "u1")
    channel = online_channel("u1")
    shard = a.store.shard_of(APP.id, channel)
    state = a.hub.local_state(shard)
    assert state[(APP.id, channel)].members == {"u1": None}
    assert a.hub.local_channel(APP.id, channel).members == {"u1": None}
    # The entry lost on the shard (an operator's mistake) comes back with a re-assertion.
    await a.store.leave(APP.id, channel, "u1")
    assert await a.store.user_ids(APP.id, channel) == []
    await a.store.sync_many([(APP.id, channel, a.hub.local_channel(APP.id, channel))])
    assert await a.store.user_ids(APP.id, channel) == ["u1"]


async def test_a_new_watchlist_replaces_the_old_and_a_closed_watcher_is_forgotten() -> None:
    world = World()
    a, b = await _node(world, "a"), await _node(world, "b")
    watcher = await _signed_in(b, "w", ["u1"])
    _sign_in(b, watcher, "w", ["u2"])  # same user, new watchlist
    await settle(lambda: b.hub.watchlists.watching.get(b.hub.clients[watcher.id], ((),))[0]
                 == ("u2",))  # fmt: skip
    await _signed_in(a, "u1")
    await _signed_in(a, "u2")
    await settle(lambda: ("online", ["u2"]) in _watch_events(watcher))
    await _delivered(world)
    assert ("online", ["u1"]) not in _watch_events(watcher)
    b.disconnect(watcher)
    assert not b.hub.watchlists.watchers and not b.hub.watchlists.watching


async def test_an_app_without_watchlist_events_writes_nothing() -> None:
    world = World()
    a = await _node(world, "a")
    sock = a.connect()
    client = a.hub.clients[sock.id]
    client.app = replace(APP, watchlist_events=False)
    _sign_in(a, sock, "u1", ["u2"])
    await settle(lambda: any(f.get("event") == "pusher:signin_success" for f in sock.frames))
    await world.quiet()
    assert await a.store.user_ids(APP.id, online_channel("u1")) == []
    assert not a.hub.watchlists.watching


async def test_a_watchlist_over_the_limit_watches_the_first_100_and_says_so() -> None:
    world = World()
    a, b = await _node(world, "a"), await _node(world, "b")
    ids = [f"u{i}" for i in range(150)]
    watcher = await _signed_in(b, "w", ids)
    [error] = [f for f in watcher.frames if f.get("event") == "pusher:error"]
    assert error["data"]["code"] == 4302
    assert b.hub.watchlists.watching[b.hub.clients[watcher.id]][0] == tuple(ids[:100])
    await _signed_in(a, "u99")
    await _signed_in(a, "u100")  # beyond the limit: not watched
    await settle(lambda: _watch_events(watcher) == [("online", ["u99"])])
    await _delivered(world)
    assert _watch_events(watcher) == [("online", ["u99"])]
    assert watcher.closed is None
