"""Secured Redis: TLS only and ACL users on every server and Sentinel.

``LocalCluster(secure=True)`` is what ``presence-gateway cluster up --secure`` starts; its
``topology.json`` is used unchanged by ``shards init``, ``serve`` and ``audit``. The node logs
in with the least-privilege user whose rules the README gives. Bad security settings (a
wrong password, a missing CA file, a certificate for another name, a user without ``FCALL``)
each give one clear message naming the setting and the server, and never show a password.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from nodes import NodeProcess, WsClient, official_client, running_node
from support import raw_client

from gateway.localcluster import GATEWAY_ACL, LocalCluster
from gateway.shards.admin import init_shards
from gateway.shards.topology import load_topology

README = Path(__file__).resolve().parent.parent / "README.md"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import start_local_cluster

    local = start_local_cluster(tmp_path_factory.mktemp("secure"), secure=True)
    try:
        init_shards(load_topology(local.topology_path))
        yield local
    finally:
        local.down()


def _variant(
    cluster: LocalCluster, tmp_path: Path, change: Callable[[dict[str, Any]], None]
) -> Path:
    """A copy of the cluster's topology.json (paths made absolute) with ``change`` applied."""
    data = json.loads(cluster.topology_path.read_text())
    for section in ("redis", "redis_admin", "sentinel"):
        part = data.get(section) or {}
        if "password_file" in part:
            part["password_file"] = str(cluster.dir / part["password_file"])
        for key, value in (part.get("tls") or {}).items():
            if key in ("ca", "cert", "key"):
                part["tls"][key] = str(cluster.dir / value)
    change(data)
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(data))
    return path


def _problems(node: NodeProcess) -> list[str]:
    reply = requests.get(f"{node.url}/ready", timeout=5)
    assert reply.status_code == 503, reply.text
    problems: list[str] = reply.json()["problems"]
    return problems


def test_secure_topology_serves_with_the_least_privilege_user(
    secure: LocalCluster, tmp_path: Path
) -> None:
    topology = load_topology(secure.topology_path)
    assert topology.redis.username == "gateway" and topology.redis.tls is not None
    # No plain port anywhere.
    host, port = secure.masters()[0].addr.split(":")
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host=host, port=int(port), socket_timeout=2).ping()
    # The node's user has exactly the README's rules.
    with raw_client(secure.masters()[0].addr) as admin:
        rules = admin.acl_getuser("gateway")
    assert rules["enabled"]
    assert f"ACL SETUSER gateway on >PASSWORD {GATEWAY_ACL}" in README.read_text()
    with running_node(secure.topology_path, node_id="secure-a", init=False) as node:
        channel = f"presence-secure-{uuid.uuid4().hex[:8]}"
        with WsClient(node.ws_url()) as ann, WsClient(node.ws_url()) as bob:
            ann.subscribe(channel, "ann")
            bob.subscribe(channel, "bob")
            assert ann.expect("pusher_internal:member_added", channel)
            users = official_client(node.port).users_info(channel)["users"]
            assert {u["id"] for u in users} == {"ann", "bob"}
        secrets = [p.read_text().strip() for p in secure.secrets_dir.glob("*.pass")]
        health = requests.get(f"{node.url}/health", timeout=5).text
    assert not any(s in node.output or s in health for s in secrets)
    audit = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "--topology", str(secure.topology_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_a_wrong_password_is_one_clear_reason_and_never_shown(
    secure: LocalCluster, tmp_path: Path
) -> None:
    wrong = "not-the-password-" + uuid.uuid4().hex
    (tmp_path / "wrong.pass").write_text(wrong + "\n")

    def change(data: dict[str, Any]) -> None:
        data["redis"]["password_file"] = str(tmp_path / "wrong.pass")

    topology = _variant(secure, tmp_path, change)
    with running_node(topology, node_id="secure-wrong", init=False, ready=False) as node:
        problems = _problems(node)
        assert all("authentication as user 'gateway' refused: WRONGPASS" in p for p in problems)
        health = requests.get(f"{node.url}/health", timeout=5).text
    assert wrong not in node.output and wrong not in health
    assert "Traceback" not in node.output


def test_a_certificate_for_another_name_is_refused(secure: LocalCluster, tmp_path: Path) -> None:
    def change(data: dict[str, Any]) -> None:
        data["redis"]["tls"]["server_name"] = "shard.example.org"

    topology = _variant(secure, tmp_path, change)
    with running_node(topology, node_id="secure-name", init=False, ready=False) as node:
        problems = _problems(node)
        assert all("certificate" in p.lower() for p in problems), problems
        assert any("shard.example.org" in p for p in problems), problems


def test_a_user_without_fcall_is_named(secure: LocalCluster, tmp_path: Path) -> None:
    password = uuid.uuid4().hex
    for master in secure.masters():
        with raw_client(master.addr) as admin:
            admin.execute_command(
                "ACL", "SETUSER", "no-fcall", "on", f">{password}", *GATEWAY_ACL.split(),
                "-fcall", "-fcall_ro",
            )  # fmt: skip
    (tmp_path / "no-fcall.pass").write_text(password)

    def change(data: dict[str, Any]) -> None:
        data["redis"]["username"] = "no-fcall"
        data["redis"]["password_file"] = str(tmp_path / "no-fcall.pass")

    topology = _variant(secure, tmp_path, change)
    with running_node(topology, node_id="secure-acl", init=False, ready=False) as node:
        problems = _problems(node)
        assert all("user 'no-fcall' lacks a permission" in p for p in problems), problems
        assert all("fcall_ro" in p for p in problems), problems


def test_a_missing_ca_file_names_the_setting(secure: LocalCluster, tmp_path: Path) -> None:
    def change(data: dict[str, Any]) -> None:
        data["redis"]["tls"]["ca"] = str(tmp_path / "missing-ca.crt")

    topology = _variant(secure, tmp_path, change)
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--topology", str(topology), "--port", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "redis.tls.ca: no such file" in proc.stderr and "Traceback" not in proc.stderr
