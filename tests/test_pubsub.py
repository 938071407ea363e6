"""Supervised Pub/Sub connections against real shards: lost, reported, restored."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable

import redis
import requests
from nodes import WsClient, official_client, running_node
from polling import wait_until
from support import raw_client

from gateway._native import key_slot
from gateway.localcluster import LocalCluster
from gateway.shards.contract import channel_key


def _refuse_new_connections_and_kill_pubsub(r: redis.Redis) -> None:
    """Kill every Pub/Sub client of the server and accept no new connection: the ones open
    (the node's verified link, its lease thread, this client) go on."""
    clients = r.client_list()
    pubsub = sum(1 for c in clients if "P" in c["flags"])
    r.config_set("maxclients", str(len(clients) - pubsub))
    r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")


def test_a_pubsub_connection_that_cannot_come_back_makes_the_node_not_ready(
    cluster_factory: Callable[..., LocalCluster],
) -> None:
    """Kill the node's Pub/Sub connection while the shard refuses new connections: /ready
    says why until the shard takes connections again, then delivery resumes by itself."""
    # Sentinels that lose their own Pub/Sub link must not fail the master over meanwhile.
    fresh_cluster = cluster_factory(down_after_ms=60_000)
    with running_node(fresh_cluster.topology_path, node_id="ps-ready") as node:
        channel = f"ready-{uuid.uuid4().hex[:8]}"
        with WsClient(node.ws_url()) as ws:
            ws.subscribe(channel)
            key = channel_key("1", channel)
            masters = [raw_client(m.addr) for m in fresh_cluster.masters()]
            holder = next(r for r in masters if r.pubsub_numsub(key)[0][1] > 0)
            saved = holder.config_get("maxclients")["maxclients"]
            try:
                _refuse_new_connections_and_kill_pubsub(holder)
                # (a 503 response is falsy: wrap it in a list for wait_until)
                (ready,) = wait_until(
                    lambda: [
                        r
                        for r in [requests.get(f"{node.url}/ready", timeout=5)]
                        if r.status_code == 503
                    ],
                    10,
                    "/ready to report the lost Pub/Sub connection",
                )
                problems = ready.json()["problems"]
                assert any("Pub/Sub connection down" in p for p in problems), problems
                assert requests.get(f"{node.url}/live", timeout=5).status_code == 200
            finally:
                holder.config_set("maxclients", saved)
            restored = time.monotonic()
            wait_until(lambda: node.health() == 200, 10, "/ready 200 again")
            ready_s = time.monotonic() - restored
            official_client(node.port).trigger(channel, "after", {"n": 1})
            event = ws.expect("after", channel, timeout=10)
            assert json.loads(event["data"]) == {"n": 1}
            for r in masters:
                r.close()
        lines = [line for line in node.output.splitlines() if "pubsub" in line]
        assert any("lost: closed by the server" in line for line in lines), lines
        assert any("listening again" in line for line in lines), lines
        print(f"\nPUBSUB not ready while refused: {problems}; ready {ready_s:.2f} s after")


def _same_shard(channel: str, prefix: str) -> str:
    """A new channel name whose keys live on the same shard as ``channel``'s (2 shards)."""
    half = key_slot(channel_key("1", channel)) >= 8192
    while True:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        if (key_slot(channel_key("1", name)) >= 8192) == half:
            return name


def test_subscriptions_made_while_down_are_sent_when_back(
    cluster_factory: Callable[..., LocalCluster],
) -> None:
    """A channel subscribed while the Pub/Sub connection is down is listened to once it is back
    (it used to be marked confirmed and never sent)."""
    fresh_cluster = cluster_factory(down_after_ms=60_000)
    with running_node(fresh_cluster.topology_path, node_id="ps-later") as node:
        masters = [raw_client(m.addr) for m in fresh_cluster.masters()]
        saved = [r.config_get("maxclients")["maxclients"] for r in masters]
        first = f"first-{uuid.uuid4().hex[:8]}"
        later = _same_shard(first, "later")
        with WsClient(node.ws_url()) as ws:
            ws.subscribe(first)
            try:
                for r in masters:
                    _refuse_new_connections_and_kill_pubsub(r)
                # Subscribed while that shard's Pub/Sub connection cannot come back.
                ws.send(ws.subscribe_frame(later))
                time.sleep(1.0)
            finally:
                for r, value in zip(masters, saved, strict=True):
                    r.config_set("maxclients", value)
            ws.expect("pusher_internal:subscription_succeeded", later, timeout=15)
            wait_until(lambda: node.health() == 200, 10, "/ready 200 again")
            official_client(node.port).trigger([first, later], "both", {})
            got = {
                ws.expect("both", timeout=10)["channel"],
                ws.expect("both", timeout=10)["channel"],
            }
            assert got == {first, later}
        for r in masters:
            with contextlib.suppress(Exception):
                r.close()
