"""Chaos: a rolling restart of a two-node deployment with 1 000 presence users, no flaps.

Both nodes are restarted one after the other with SIGTERM (drain: not ready at once, new
connections refused after ``drain_delay``, sockets closed with 4200 over ``drain_window``,
presence handed over for ``drain_handover``), each restarted with a new incarnation before the
next one goes. 1 000 presence users in 10 channels (``tests/presence_fleet.py``, reconnecting
like pusher-js through a load balancer that follows ``/ready``) watch each other all along.
Prints ``CHAOS rolling_restart: {figures}``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from nodes import NodeProcess, WebhookReceiver, official_client, start_node
from polling import wait_until

from gateway.localcluster import LocalCluster, find_free_port_range

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

FLEET = str(Path(__file__).with_name("presence_fleet.py"))
USERS, CHANNELS = 1000, 10
ENV = {"GATEWAY_MAX_CONNECTIONS_PER_IP": "0", "GATEWAY_HANDSHAKES_PER_IP": "0"}
DRAIN = "drain_delay = 1.0\ndrain_window = 5.0\ndrain_handover = 3.0\n"


def _start(cluster: LocalCluster, node_id: str, port: int, hooks: WebhookReceiver) -> NodeProcess:
    return start_node(
        cluster.topology_path, node_id=node_id, port=port, webhook_url=hooks.url,
        hold_ms=3000, env=ENV, extra_toml=DRAIN,
    )  # fmt: skip


def test_rolling_restart_without_presence_flaps(
    fresh_cluster: LocalCluster, hooks: WebhookReceiver
) -> None:
    ports = [find_free_port_range(1), find_free_port_range(1)]
    nodes = [_start(fresh_cluster, f"roll-{k}", ports[k], hooks) for k in range(2)]
    prefix = f"roll{int(time.time())}"
    channels = [f"presence-{prefix}-{c}" for c in range(CHANNELS)]
    fleet = subprocess.Popen(
        [sys.executable, FLEET, "--ports", ",".join(map(str, ports)), "--users", str(USERS),
         "--channels", str(CHANNELS), "--prefix", prefix, "--max-seconds", "400"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for port in ports:
                with contextlib.suppress(Exception):
                    api = official_client(port)
                    samples.append(min(len(api.users_info(c)["users"]) for c in channels))
                    break
            stop.wait(0.2)

    try:
        per = USERS // CHANNELS
        wait_until(
            lambda: all(
                len(official_client(ports[0]).users_info(c)["users"]) == per for c in channels
            ),
            120,
            "every user joined",
            step=1.0,
        )
        time.sleep(4)  # the joins' webhooks are out
        assert fleet.stdin is not None
        fleet.stdin.write("steady\n")
        fleet.stdin.flush()
        hooks_before = len(hooks.events())
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        per_node = []
        for k in range(2):
            t0 = time.monotonic()
            nodes[k].proc.send_signal(signal.SIGTERM)
            nodes[k].proc.wait(timeout=120)
            drained_s = time.monotonic() - t0
            nodes[k].kill()
            nodes[k] = _start(fresh_cluster, f"roll-{k}", ports[k], hooks)
            per_node.append(
                {"node": f"roll-{k}", "drain_s": round(drained_s, 1),
                 "back_ready_s": round(time.monotonic() - t0, 1)}
            )  # fmt: skip
            time.sleep(2)
        time.sleep(5)  # held webhooks would be due by now
        stop.set()
        sampler.join(10)
        fleet.stdin.write("stop\n")
        fleet.stdin.flush()
        out, _ = fleet.communicate(timeout=60)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        webhooks = [
            (e["name"], e.get("user_id"))
            for e in hooks.events()[hooks_before:]
            if e.get("channel", "").startswith(f"presence-{prefix}")
        ]
        figures = {
            "users": USERS,
            "channels": CHANNELS,
            "per_node": per_node,
            "fleet": result,
            "webhooks_sent": len(webhooks),
            "webhook_examples": webhooks[:5],
            "users_api_samples": len(samples),
            "users_api_min_per_channel": min(samples, default=None),
            "users_expected_per_channel": per,
        }
        print(f"\nCHAOS rolling_restart: {json.dumps(figures)}")
        assert result["flaps_member_added"] == 0 and result["flaps_member_removed"] == 0
        assert webhooks == []
        assert samples and min(samples) == per
        assert result["short_rosters"] == 0
    finally:
        stop.set()
        if fleet.poll() is None:
            fleet.kill()
        for node in nodes:
            with contextlib.suppress(Exception):
                node.stop()
            node.kill()
