"""Chaos under overload: a slow node is not a dead node.

Two ``presence-gateway serve`` processes on a private topology. Six presence members are held
by node A and watched from node B (a socket in the same channel, ``GET users`` every 100 ms,
the webhook receiver). Then node A is flooded from another process:

``flood``
    8 000 connections x 20 public subscriptions each, sent in one burst (what once left A's
    lease unrefreshed for 16 s and got its members announced as gone), held 15 s.
``cpu``
    30 s of churn from two processes (connect, 20 subscriptions, 20 unsubscriptions, close,
    again) that keeps A at (nearly) 100 % of a core.

Both must show 0 ``member_removed`` for the six (to the watcher and as webhooks) and ``GET
users`` never below the true count, during the flood and for longer than a lease after it.
Each prints ``CHAOS <scenario>: {figures}``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from nodes import NodeProcess, WebhookReceiver, WsClient, official_client, running_node

from gateway.localcluster import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(400)]

FLOOD = str(Path(__file__).with_name("flood.py"))
#: The flood comes from one address here; in the field it comes from thousands.
ENV = {"GATEWAY_MAX_CONNECTIONS_PER_IP": "0", "GATEWAY_HANDSHAKES_PER_IP": "0"}
MEMBERS = 6


def report(name: str, figures: dict[str, Any]) -> None:
    print(f"\nCHAOS {name}: {json.dumps(figures, default=str)}")


@dataclass
class Watch:
    """What node B and the webhook receiver see of node A's members, sampled in a thread."""

    a: NodeProcess
    b: NodeProcess
    channel: str
    users: list[int] = field(default_factory=list)
    not_ready: int = 0
    lease_age_max: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        api = official_client(self.b.port)
        tick = 0
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.users.append(len(api.users_info(self.channel)["users"]))
            if tick % 5 == 0:
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{self.a.url}/ready", timeout=5).status_code != 200:
                        self.not_ready += 1
                with contextlib.suppress(Exception):
                    self.lease_age_max = max(self.lease_age_max, _lease_age(self.a))
            tick += 1
            self._stop.wait(0.1)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(10)


def _lease_age(node: NodeProcess) -> float:
    text = requests.get(f"{node.url}/metrics", timeout=5).text
    ages = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pg_lease_age_seconds{")
    ]
    return max(ages, default=0.0)


@contextlib.contextmanager
def scene(cluster: LocalCluster, hooks: WebhookReceiver) -> Iterator[tuple[Watch, WsClient]]:
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(
            running_node(
                cluster.topology_path, node_id="slow-a", webhook_url=hooks.url, env=ENV,
                hold_ms=3000,
            )
        )  # fmt: skip
        b = stack.enter_context(
            running_node(
                cluster.topology_path, node_id="slow-b", webhook_url=hooks.url, hold_ms=3000
            )
        )
        channel = f"presence-slow-{uuid.uuid4().hex[:8]}"
        for i in range(MEMBERS):
            member = stack.enter_context(WsClient(a.ws_url()))
            member.subscribe(channel, f"member-{i}")
        watcher = stack.enter_context(WsClient(b.ws_url()))
        watcher.subscribe(channel, "watcher")
        yield Watch(a, b, channel), watcher


def _verdict(
    name: str, watch: Watch, watcher: WsClient, hooks: WebhookReceiver, extra: dict[str, Any]
) -> None:
    frames = watcher.quiet(1.0)
    removed = [f for f in frames if f.get("event") == "pusher_internal:member_removed"]
    added = [f for f in frames if f.get("event") == "pusher_internal:member_added"]
    webhooks = [e for e in hooks.events(watch.channel) if e["name"] == "member_removed"]
    true_count = MEMBERS + 1  # and the watcher
    figures = {
        **extra,
        "false_member_removed": len(removed),
        "false_member_added": len(added),
        "false_webhooks": len(webhooks),
        "users_samples": len(watch.users),
        "users_min": min(watch.users, default=None),
        "users_true": true_count,
        "a_not_ready_samples": watch.not_ready,
        "a_lease_age_max_s": round(watch.lease_age_max, 2),
        "a_shedding_episodes": watch.a.metric("pg_shedding_total"),
        "a_alive": watch.a.proc.poll() is None,
    }
    report(name, figures)
    assert figures["a_alive"]
    assert removed == [] and webhooks == [] and added == []
    assert len(watch.users) > 50 and min(watch.users) == true_count, watch.users
    assert watch.lease_age_max < 5.0  # half the lease: never at risk


def test_subscription_burst_does_not_make_members_vanish(
    fresh_cluster: LocalCluster, hooks: WebhookReceiver
) -> None:
    with scene(fresh_cluster, hooks) as (watch, watcher):
        with watch.sampling():
            cpu0, t0 = watch.a.cpu_seconds(), time.monotonic()
            flood = subprocess.run(
                [sys.executable, FLOOD, "--port", str(watch.a.port), "--mode", "burst",
                 "--connections", "8000", "--subs", "20", "--hold", "15"],
                capture_output=True, text=True, timeout=300, check=True,
            )  # fmt: skip
            flood_s = time.monotonic() - t0
            cpu = (watch.a.cpu_seconds() - cpu0) / flood_s
            time.sleep(13)  # longer than a lease plus the reap grace: a lapse would show by now
        figures = {
            "flood": json.loads(flood.stdout),
            "flood_s": round(flood_s, 1),
            "a_cpu_share": round(cpu, 2),
        }
        _verdict("subscription_burst", watch, watcher, hooks, figures)


def _churn_command(port: int, k: int) -> list[str]:
    return [
        sys.executable, FLOOD, "--port", str(port), "--mode", "churn", "--connections", "300",
        "--subs", "20", "--hold", "0.2", "--duration", "30", "--prefix", f"cpu-{k}",
    ]  # fmt: skip


def test_thirty_seconds_at_full_cpu(fresh_cluster: LocalCluster, hooks: WebhookReceiver) -> None:
    with scene(fresh_cluster, hooks) as (watch, watcher):
        with watch.sampling():
            cpu0, t0 = watch.a.cpu_seconds(), time.monotonic()
            floods = [
                subprocess.Popen(_churn_command(watch.a.port, k), stdout=subprocess.PIPE, text=True)
                for k in range(2)
            ]
            results = [json.loads(p.communicate(timeout=200)[0]) for p in floods]
            busy_s = time.monotonic() - t0
            cpu = (watch.a.cpu_seconds() - cpu0) / busy_s
            time.sleep(13)
        figures = {"floods": results, "busy_s": round(busy_s, 1), "a_cpu_share": round(cpu, 2)}
        _verdict("full_cpu_30s", watch, watcher, hooks, figures)
    # The scenario is only meaningful if node A was really kept busy.
    assert cpu > 0.6, cpu
