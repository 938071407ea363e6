"""Probes and the admin listener: /live, /ready, /health, /metrics where they belong."""

from __future__ import annotations

import signal

import pytest
import requests
from nodes import running_node
from polling import wait_until
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gateway.localcluster import LocalCluster, find_free_port_range


def test_admin_listener_serves_metrics_and_probes_only(cluster: LocalCluster) -> None:
    admin = find_free_port_range(1)
    with running_node(
        cluster.topology_path, node_id="probes", extra_toml=f"admin_port = {admin}"
    ) as node:
        admin_url = f"http://127.0.0.1:{admin}"
        metrics = requests.get(f"{admin_url}/metrics", timeout=5)
        assert metrics.status_code == 200 and "pg_connections" in metrics.text
        assert requests.get(f"{node.url}/metrics", timeout=5).status_code == 404
        for url in (node.url, admin_url):
            live = requests.get(f"{url}/live", timeout=5)
            assert live.status_code == 200 and live.json()["status"] == "alive"
            assert requests.get(f"{url}/ready", timeout=5).status_code == 200
        health = requests.get(f"{admin_url}/health", timeout=5).json()
        assert health["status"] == "ok" and len(health["shards"]) == 2
        # The public port keeps the details to the admin port.
        assert requests.get(f"{node.url}/ready", timeout=5).json() == {"ready": True}
        assert requests.get(f"{node.url}/health", timeout=5).status_code == 404
        assert requests.get(f"{admin_url}/apps/1/channels", timeout=5).status_code == 404
        with (
            connect(f"ws://127.0.0.1:{admin}/app/app-key?protocol=7") as ws,
            pytest.raises(ConnectionClosed) as closed,
        ):
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4005


def test_without_an_admin_port_metrics_stay_on_the_public_port(cluster: LocalCluster) -> None:
    with running_node(cluster.topology_path, node_id="no-admin") as node:
        assert requests.get(f"{node.url}/metrics", timeout=5).status_code == 200


def test_a_second_signal_cuts_a_drain_short(cluster: LocalCluster) -> None:
    """SIGTERM starts a (here very long) drain; SIGINT during it closes everything at once."""
    with running_node(
        cluster.topology_path, node_id="cut-short", extra_toml="drain_delay = 600"
    ) as node:
        with connect(node.ws_url()) as ws:
            assert "connection_established" in str(ws.recv(timeout=5))
            node.proc.send_signal(signal.SIGTERM)
            wait_until(
                lambda: requests.get(f"{node.url}/ready", timeout=5).status_code == 503,
                15,
                "not ready once draining",
            )
            node.proc.send_signal(signal.SIGINT)
            # The drain would hold this socket open for 600 s; the second signal closes it.
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(timeout=60)
        assert node.proc.wait(timeout=60) == 0
        assert "cutting the drain short" in node.output
        assert "Traceback" not in node.output
