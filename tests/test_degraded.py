"""A node starts and serves when shards are unusable at start, and heals without a restart.

What a client gets for a channel on an unusable shard (the documented choice): its
subscription waits up to 5 s for the shard, then gets ``pusher:subscription_error`` with
status 4200 (pusher-js hands it to the channel; apps retry); the HTTP API answers 503.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import requests
from nodes import NodeProcess, WsClient, official_client, running_node
from polling import wait_until

from gateway._native import key_slot
from gateway.localcluster import LocalCluster
from gateway.shards.admin import init_shards
from gateway.shards.topology import load_topology

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]


def _channel_on(shard: int) -> str:
    while True:
        name = f"deg-{uuid.uuid4().hex[:8]}"
        if (key_slot(f"{{1:{name}}}".encode()) >= 8192) == (shard == 1):
            return name


def _ready(node: NodeProcess) -> tuple[int, list[str]]:
    reply = requests.get(f"{node.url}/ready", timeout=5)
    return reply.status_code, reply.json()["problems"]


def _subscription_status(node: NodeProcess, channel: str) -> str | int:
    """``"ok"`` or the status of the ``pusher:subscription_error``."""
    with WsClient(node.ws_url()) as ws:
        ws.send(ws.subscribe_frame(channel))
        frame = ws.next_event(
            lambda f: (
                f.get("channel") == channel
                and f.get("event")
                in ("pusher_internal:subscription_succeeded", "pusher:subscription_error")
            ),
            timeout=15,
        )
        if frame["event"] == "pusher:subscription_error":
            return int(frame["data"]["status"])
        official_client(node.port).trigger(channel, "hello", {"to": channel})
        event = ws.expect("hello", channel, timeout=10)
        assert json.loads(event["data"]) == {"to": channel}
        return "ok"


@pytest.fixture
def uninitialised(fresh_cluster: LocalCluster) -> Iterator[tuple[LocalCluster, NodeProcess]]:
    with running_node(
        fresh_cluster.topology_path, node_id="deg-noid", init=False, ready=False
    ) as node:
        yield fresh_cluster, node


def test_a_node_serves_before_shards_init_and_heals_after(
    uninitialised: tuple[LocalCluster, NodeProcess],
) -> None:
    cluster, node = uninitialised
    assert requests.get(f"{node.url}/live", timeout=5).status_code == 200
    status, problems = _ready(node)
    assert status == 503 and len(problems) == 2, problems
    assert all("run presence-gateway shards init" in p for p in problems), problems
    assert _subscription_status(node, _channel_on(0)) == 4200
    assert official_client_status(node, _channel_on(1)) == 503
    started = time.monotonic()
    init_shards(load_topology(cluster.topology_path))
    wait_until(lambda: _ready(node)[0] == 200, 15, "ready once the shards are initialised")
    healed_s = time.monotonic() - started
    assert _subscription_status(node, _channel_on(0)) == "ok"
    assert _subscription_status(node, _channel_on(1)) == "ok"
    lines = node.output.splitlines()
    assert sum("not usable at start" in line for line in lines) == 2, lines
    assert "Traceback" not in node.output
    print(f"\nDEGRADED start before shards init: ready {healed_s:.2f} s after init")


def official_client_status(node: NodeProcess, channel: str) -> int:
    """Status of ``GET users`` of ``channel`` through the HTTP API."""
    from nodes import api_request

    return api_request(node.port, "GET", f"/apps/1/channels/presence-{channel}/users").status_code


def test_a_misrouted_shard_at_start_leaves_the_other_working(fresh_cluster: LocalCluster) -> None:
    masters = fresh_cluster.masters()
    init_shards(load_topology(fresh_cluster.topology_path))
    # The incident's mistake, made before the node starts: shard-1 named at shard 0's server.
    fresh_cluster.repoint_sentinels("shard-1", masters[0].addr)
    with running_node(
        fresh_cluster.topology_path, node_id="deg-misrouted", init=False, ready=False
    ) as node:
        status, problems = _ready(node)
        assert status == 503 and len(problems) == 1 and "shard-1" in problems[0], problems
        assert "shard-0" in problems[0]  # it says whose server Sentinel named
        assert _subscription_status(node, _channel_on(0)) == "ok"
        assert _subscription_status(node, _channel_on(1)) == 4200
        started = time.monotonic()
        fresh_cluster.repoint_sentinels("shard-1", masters[1].addr)
        wait_until(lambda: _ready(node)[0] == 200, 15, "ready once Sentinel is fixed")
        healed_s = time.monotonic() - started
        assert _subscription_status(node, _channel_on(1)) == "ok"
        line = next(x for x in node.output.splitlines() if "not usable at start" in x)
        assert "shard-1" in line and "Traceback" not in node.output
    print(f"\nDEGRADED misrouted shard at start: {line}; ready {healed_s:.2f} s after the fix")
