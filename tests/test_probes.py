"""Probes and the admin listener: /live, /ready, /health, /metrics where they belong."""

from __future__ import annotations

import pytest
import requests
from nodes import running_node
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
            health = requests.get(f"{url}/health", timeout=5).json()
            assert health["status"] == "ok" and len(health["shards"]) == 2
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
