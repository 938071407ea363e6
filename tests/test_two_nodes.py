"""Two gateway nodes on one 2-shard topology: one presence state, one set of webhooks."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from nodes import (
    NodeProcess,
    WebhookReceiver,
    WsClient,
    official_client,
    running_node,
)
from polling import wait_until

pytestmark = pytest.mark.timeout(120)

#: Webhook hold of these nodes: long enough that a leave+rejoin fits comfortably inside it.
HOLD_MS = 1500


@pytest.fixture(scope="module")
def pair(cluster: Any, hooks: WebhookReceiver) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    with (
        running_node(
            cluster.topology_path, node_id="two-a", webhook_url=hooks.url, hold_ms=HOLD_MS
        ) as a,
        running_node(
            cluster.topology_path, node_id="two-b", webhook_url=hooks.url, hold_ms=HOLD_MS
        ) as b,
    ):
        yield a, b


def _name(prefix: str) -> str:
    return f"{prefix}two-{uuid.uuid4().hex[:10]}"


def _counts(node: NodeProcess, presence: str, public: str) -> tuple[int, int, list[str]]:
    api = official_client(node.port)
    users = sorted(u["id"] for u in api.users_info(presence)["users"])
    user_count = api.channel_info(presence, ["user_count"])["user_count"]
    subs = api.channel_info(public, ["subscription_count"])["subscription_count"]
    return user_count, subs, users


def test_join_on_a_is_seen_on_b(pair: tuple[NodeProcess, NodeProcess]) -> None:
    a, b = pair
    channel = _name("presence-")
    with WsClient(b.ws_url()) as watcher, WsClient(a.ws_url()) as joiner:
        watcher.subscribe(channel, "watcher")
        started = time.monotonic()
        roster = json.loads(joiner.subscribe(channel, "ann", {"name": "Ann"})["data"])
        assert sorted(roster["presence"]["ids"]) == ["ann", "watcher"]
        added = watcher.expect("pusher_internal:member_added", channel)
        print(f"member_added across nodes after {1000 * (time.monotonic() - started):.1f} ms")
        assert json.loads(added["data"]) == {"user_id": "ann", "user_info": {"name": "Ann"}}
        for node in pair:
            api = official_client(node.port)
            assert sorted(u["id"] for u in api.users_info(channel)["users"]) == ["ann", "watcher"]
            assert api.channel_info(channel, ["user_count"])["user_count"] == 2


def test_exact_counts_with_sockets_spread_over_both_nodes(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    a, b = pair
    presence, public = _name("presence-"), _name("")
    # 3 users, 5 sockets: ann x2 (A, B), bob x2 (B, B), carol x1 (A).
    placement = [("ann", a), ("ann", b), ("bob", b), ("bob", b), ("carol", a)]
    with ExitStack() as stack:
        sockets = []
        for user, node in placement:
            ws = stack.enter_context(WsClient(node.ws_url()))
            ws.subscribe(presence, user)
            ws.subscribe(public)
            sockets.append(ws)
        for node in pair:
            assert _counts(node, presence, public) == (3, 5, ["ann", "bob", "carol"])
        sockets[1].close()  # ann keeps her socket on A: still 3 users
        sockets[4].close()  # carol's only socket: she leaves
        expected = (2, 3, ["ann", "bob"])
        for node in pair:
            wait_until(
                lambda node=node: _counts(node, presence, public) == expected,
                5,
                lambda node=node: (
                    f"counts {expected} on {node.node_id}; got {_counts(node, presence, public)}"
                ),
            )


def test_trigger_through_b_reaches_subscribers_on_a(pair: tuple[NodeProcess, NodeProcess]) -> None:
    a, b = pair
    channel = _name("private-")
    with WsClient(a.ws_url()) as on_a, WsClient(b.ws_url()) as on_b:
        on_a.subscribe(channel)
        on_b.subscribe(channel)
        official_client(b.port).trigger(channel, "news", {"n": 7})
        for ws in (on_a, on_b):
            assert json.loads(ws.expect("news", channel)["data"]) == {"n": 7}


def _final_webhooks(
    hooks: WebhookReceiver, channel: str, wanted: Counter[tuple[str, Any]]
) -> Counter:
    """The webhooks of ``channel`` once ``wanted`` arrived and a duplicate would have too."""
    hooks.wait_for(
        lambda got: Counter((e["name"], e.get("user_id")) for e in got) >= wanted, channel, 10
    )
    time.sleep(2 * HOLD_MS / 1000)  # a duplicate would be held no longer than this
    return Counter(hooks.names(channel))


def test_one_webhook_per_transition_whichever_node_saw_it(
    pair: tuple[NodeProcess, NodeProcess], hooks: WebhookReceiver
) -> None:
    a, b = pair
    channel = _name("presence-")
    with WsClient(a.ws_url()) as ann_a, WsClient(b.ws_url()) as ann_b:
        ann_a.subscribe(channel, "ann")
        ann_b.subscribe(channel, "ann")
        with WsClient(b.ws_url()) as bob:
            bob.subscribe(channel, "bob")
        ann_a.close()
    wanted = Counter(
        {
            ("channel_occupied", None): 1,
            ("member_added", "ann"): 1,
            ("member_added", "bob"): 1,
            ("member_removed", "bob"): 1,
            ("member_removed", "ann"): 1,
            ("channel_vacated", None): 1,
        }
    )
    got = _final_webhooks(hooks, channel, wanted)
    print(f"webhooks: {dict(got)}")
    assert got == wanted
    assert hooks.invalid() == []


def test_quick_leave_and_rejoin_on_the_other_node_sends_no_member_removed(
    pair: tuple[NodeProcess, NodeProcess], hooks: WebhookReceiver
) -> None:
    a, b = pair
    channel = _name("presence-")
    with WsClient(a.ws_url()) as anchor:
        anchor.subscribe(channel, "anchor")
        first = WsClient(a.ws_url())
        first.subscribe(channel, "ann")
        left = time.monotonic()
        first.close()
        with WsClient(b.ws_url()) as again:
            again.subscribe(channel, "ann")
            gap = time.monotonic() - left
            print(f"ann rejoined on the other node {1000 * gap:.0f} ms after leaving")
            assert gap < HOLD_MS / 1000, "the rejoin must fall inside the hold for this test"
            time.sleep(2 * HOLD_MS / 1000)  # a held member_removed would be sent by now
            names = Counter(hooks.names(channel))
    assert names[("member_removed", "ann")] == 0, names
    assert names[("member_added", "ann")] == 1, names
    assert names[("channel_occupied", None)] == 1, names
