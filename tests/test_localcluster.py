"""Tests of gateway.localcluster against real redis-server and redis-sentinel processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import find_free_port_range

from gateway.localcluster import (
    TOPOLOGY_FILE,
    ClusterError,
    LocalCluster,
    PortInUseError,
    format_status,
)


def _dead(pid: int) -> bool:
    # Daemonized Redis is reparented to PID 1, which may never reap it: a zombie is dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def _role(local: LocalCluster, addr: str) -> str:
    with local.client(addr) as c:
        return str(c.execute_command("ROLE")[0])


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"shards": 0}, "shards"),
        ({"shards": "2"}, "shards"),
        ({"shards": True}, "shards"),
        ({"replicas": -1}, "replicas"),
        ({"sentinels": -1}, "sentinels"),
        ({"base_port": 0}, "base_port"),
        ({"base_port": 65530}, "base_port"),
        ({"host": "0.0.0.0"}, "host"),
        ({"host": "localhost"}, "host"),
        ({"cluster_name": ""}, "cluster_name"),
        ({"cluster_name": "a b"}, "cluster_name"),
        ({"down_after_ms": 0}, "down_after_ms"),
        ({"failover_timeout_ms": -5}, "failover_timeout_ms"),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LocalCluster(tmp_path, **options)


def test_options_are_keyword_only(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        LocalCluster(tmp_path, 2)  # type: ignore[call-arg]


def test_port_layout(tmp_path: Path) -> None:
    local = LocalCluster(tmp_path, shards=2, replicas=2, sentinels=3, base_port=9000)
    topo = local.topology()
    assert [s["master"] for s in topo["shards"]] == ["127.0.0.1:9000", "127.0.0.1:9001"]
    assert [s["replicas"] for s in topo["shards"]] == [
        ["127.0.0.1:9002", "127.0.0.1:9003"],
        ["127.0.0.1:9004", "127.0.0.1:9005"],
    ]
    assert topo["sentinels"] == ["127.0.0.1:9006", "127.0.0.1:9007", "127.0.0.1:9008"]
    assert local.quorum == 2
    sentinel_confs = {p["conf"] for p in topo["processes"] if p["role"] == "sentinel"}
    assert len(sentinel_confs) == 3


# --------------------------------------------------------------------------- shared cluster


def test_topology_json(cluster: LocalCluster) -> None:
    on_disk = json.loads((cluster.dir / TOPOLOGY_FILE).read_text())
    base = cluster.base_port
    assert on_disk["cluster"] == "local"
    assert on_disk["dir"] == str(cluster.dir)
    assert on_disk["shards"] == [
        {"name": "shard-0", "master": f"127.0.0.1:{base}", "replicas": [f"127.0.0.1:{base + 2}"]},
        {
            "name": "shard-1",
            "master": f"127.0.0.1:{base + 1}",
            "replicas": [f"127.0.0.1:{base + 3}"],
        },
    ]
    assert on_disk["sentinels"] == [f"127.0.0.1:{base + i}" for i in (4, 5, 6)]
    roles = [(p["role"], p["shard"]) for p in on_disk["processes"]]
    assert roles == [
        ("master", 0),
        ("master", 1),
        ("replica", 0),
        ("replica", 1),
        ("sentinel", None),
        ("sentinel", None),
        ("sentinel", None),
    ]
    for p in on_disk["processes"]:
        for key in ("pidfile", "logfile", "conf"):
            assert Path(p[key]).parent == cluster.dir
        assert Path(p["conf"]).is_file()
        assert Path(p["logfile"]).is_file()


def test_up_again_returns_existing_topology(cluster: LocalCluster) -> None:
    pids = [cluster.pid(p) for p in cluster.processes]
    started = time.monotonic()
    assert cluster.up() == json.loads(cluster.topology_path.read_text())
    assert time.monotonic() - started < 5
    assert [cluster.pid(p) for p in cluster.processes] == pids


def test_processes_are_loopback_only_without_persistence(cluster: LocalCluster) -> None:
    for spec in cluster.processes:
        with cluster.client(spec.addr) as c:
            if spec.role == "sentinel":
                assert c.execute_command("ROLE")[0] == "sentinel"
                continue
            config = c.config_get("*")
            assert config["bind"] == "127.0.0.1"
            assert config["save"] == ""
            assert config["appendonly"] == "no"
            assert config["daemonize"] == "yes"
            assert Path(config["dir"]) == cluster.dir


def test_status_reports_roles_and_sentinel_views(cluster: LocalCluster) -> None:
    status = cluster.status()
    assert status["healthy"], status["problems"]
    by_addr = {p["addr"]: p for p in status["processes"]}
    base = cluster.base_port
    assert all(p["alive"] and p["reachable"] for p in status["processes"])
    assert by_addr[f"127.0.0.1:{base}"]["reported_role"] == "master"
    replica = by_addr[f"127.0.0.1:{base + 2}"]
    assert replica["reported_role"] == "replica"
    assert replica["master"] == f"127.0.0.1:{base}"
    assert replica["link"] == "up"
    sentinel = by_addr[f"127.0.0.1:{base + 4}"]
    assert sentinel["reported_role"] == "sentinel"
    assert sentinel["masters"] == {
        "shard-0": f"127.0.0.1:{base}",
        "shard-1": f"127.0.0.1:{base + 1}",
    }

    text = format_status(status)
    assert "healthy" in text
    assert "NOT" not in text
    for p in cluster.processes:
        assert p.addr in text


def test_replication_works(cluster: LocalCluster) -> None:
    key = f"test:{uuid.uuid4()}"
    for shard in range(cluster.shards):
        master = cluster.masters()[shard]
        with cluster.client(master.addr) as c:
            c.set(key, f"v{shard}", ex=60)
            assert c.wait(1, 5000) == 1
        for replica in cluster.replicas_of(shard):
            with cluster.client(replica.addr) as c:
                assert c.get(key) == f"v{shard}"
        with cluster.client(master.addr) as c:
            c.delete(key)


def test_sentinels_agree_on_masters(cluster: LocalCluster) -> None:
    for shard, master in enumerate(cluster.masters()):
        assert cluster.sentinel_master_addr(f"shard-{shard}") == [master.addr] * 3
    assert cluster.sentinel_master_addr("no-such-master") == [None] * 3
    with cluster.client(cluster.sentinel_processes()[0].addr) as c:
        reply = c.execute_command("SENTINEL", "MASTER", "shard-0")
    # RESP3 (redis-py's default here) gives a map, RESP2 a flat list.
    state = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
    assert state["quorum"] == "2"
    assert state["down-after-milliseconds"] == "1000"
    assert state["failover-timeout"] == "5000"
    assert state["parallel-syncs"] == "1"
    assert state["num-other-sentinels"] == "2"


# --------------------------------------------------------------------------- refusals


def test_port_in_use_is_refused(tmp_path: Path) -> None:
    base = find_free_port_range(7)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base + 5))
        squatter.listen()
        local = LocalCluster(tmp_path, base_port=base)
        with pytest.raises(PortInUseError, match=f"127.0.0.1:{base + 5}") as info:
            local.up()
    assert info.value.addrs == [f"127.0.0.1:{base + 5}"]
    assert not any(local.is_alive(p.addr) for p in local.processes)
    assert not local.topology_path.exists()


def test_down_never_signals_foreign_processes(tmp_path: Path) -> None:
    local = LocalCluster(tmp_path, base_port=find_free_port_range(7))
    with subprocess.Popen(["sleep", "30"]) as stranger:
        try:
            # A stale pidfile whose pid now belongs to some other program.
            local.masters()[0].pidfile.write_text(f"{stranger.pid}\n")
            (tmp_path / "redis-1.pid").write_text(f"{os.getpid()}\n")
            assert local.down() == []
            assert stranger.poll() is None
        finally:
            stranger.kill()


_LINGERING = """
import os, signal, sys, time
pidfile = sys.argv[1]
def term(*_):
    # Like Redis: the pidfile goes first, the process exits a moment later.
    os.unlink(pidfile)
    time.sleep(1.0)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
open(pidfile, "w").write(f"{os.getpid()}\\n")
time.sleep(60)
"""


def test_down_waits_for_exit_not_for_the_pidfile(tmp_path: Path) -> None:
    local = LocalCluster(tmp_path, base_port=find_free_port_range(7))
    spec = local.masters()[0]
    # A stand-in whose command line names Redis and the address, as a Redis process title does.
    with subprocess.Popen(
        ["python3", "-c", _LINGERING, str(spec.pidfile), "redis-server", spec.addr]
    ) as proc:
        try:
            deadline = time.monotonic() + 10
            while local.pid(spec) is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert local.pid(spec) == proc.pid
            assert local.down() == [spec.addr]
            # down returned only once the process itself was gone (Popen has reaped it or it
            # is a zombie waiting for us), not as soon as its pidfile disappeared.
            assert _dead(proc.pid)
            assert proc.wait(timeout=5) == 0
        finally:
            proc.kill()


def test_failed_start_reports_logs_and_cleans_up(tmp_path: Path) -> None:
    local = LocalCluster(tmp_path, base_port=find_free_port_range(7), redis_sentinel="false")
    with pytest.raises(ClusterError, match="false"):
        local.up(timeout=10)
    assert not any(local.is_alive(p.addr) for p in local.processes)


# --------------------------------------------------------------------------- damaging tests


def test_down_stops_everything(fresh_cluster: LocalCluster) -> None:
    pids = {p.addr: fresh_cluster.pid(p) for p in fresh_cluster.processes}
    assert all(pids.values())
    # A paused process ignores SIGTERM until resumed: down must stop it as well.
    fresh_cluster.stop_process(fresh_cluster.sentinel_processes()[0].addr, signal.SIGSTOP)
    stopped = fresh_cluster.down()
    assert sorted(stopped) == sorted(pids)
    for addr, pid in pids.items():
        assert pid is not None
        assert _dead(pid), addr
    assert fresh_cluster.down() == []
    status = fresh_cluster.status()
    assert not status["healthy"]
    assert not any(p["alive"] for p in status["processes"])
    assert "NOT healthy" in format_status(status)


def test_down_from_dir_after_failover(fresh_cluster: LocalCluster) -> None:
    fresh_cluster.failover("shard-1")
    pids = [fresh_cluster.pid(p) for p in fresh_cluster.processes]
    again = LocalCluster.from_dir(fresh_cluster.dir)
    assert again.topology() == fresh_cluster.topology()
    assert len(again.down()) == len(pids)
    assert all(pid is not None and _dead(pid) for pid in pids)


def test_failover_promotes_the_replica(fresh_cluster: LocalCluster) -> None:
    old = fresh_cluster.masters()[0].addr
    replica = fresh_cluster.replicas_of(0)[0].addr
    with fresh_cluster.client(old) as c:
        c.set("before-failover", "kept")
        assert c.wait(1, 5000) == 1

    new = fresh_cluster.failover("shard-0")

    assert new == replica
    assert fresh_cluster.sentinel_master_addr("shard-0") == [replica] * 3
    assert _role(fresh_cluster, replica) == "master"
    with fresh_cluster.client(replica) as c:
        assert c.get("before-failover") == "kept"
    # Sentinel demotes the old master only after it has reported role master for a while
    # (about 10 s); until then there are two masters for shard-0.
    fresh_cluster.wait_healthy(timeout=30)
    assert _role(fresh_cluster, old) == "slave"
    assert fresh_cluster.sentinel_master_addr("shard-1") == [fresh_cluster.masters()[1].addr] * 3


def test_repoint_sentinels_and_back(fresh_cluster: LocalCluster) -> None:
    right = fresh_cluster.masters()[0].addr
    wrong = fresh_cluster.masters()[1].addr

    fresh_cluster.repoint_sentinels("shard-0", wrong)
    assert fresh_cluster.sentinel_master_addr("shard-0") == [wrong] * 3
    status = fresh_cluster.status()
    assert not status["healthy"]
    assert any("not a member of shard-0" in p for p in status["problems"])
    with pytest.raises(ClusterError, match="shard-0"):
        fresh_cluster.wait_healthy(timeout=0.5)

    fresh_cluster.repoint_sentinels("shard-0", right)
    assert fresh_cluster.sentinel_master_addr("shard-0") == [right] * 3
    fresh_cluster.wait_healthy(timeout=20)
    # The repaired master name fails over like before.
    assert fresh_cluster.failover("shard-0") == fresh_cluster.replicas_of(0)[0].addr


def test_stop_start_and_up_restarts_missing(fresh_cluster: LocalCluster) -> None:
    replica = fresh_cluster.replicas_of(1)[0].addr
    sentinel = fresh_cluster.sentinel_processes()[2].addr

    fresh_cluster.stop_process(replica)
    assert not fresh_cluster.is_alive(replica)
    assert not fresh_cluster.status()["healthy"]
    fresh_cluster.start_process(replica)
    assert fresh_cluster.is_alive(replica)

    fresh_cluster.stop_process(sentinel, signal.SIGSTOP)
    entry = {p["addr"]: p for p in fresh_cluster.status()["processes"]}[sentinel]
    assert entry["alive"] and entry.get("stopped")
    fresh_cluster.start_process(sentinel)
    assert fresh_cluster.sentinel_master_addr("shard-1")[2] == fresh_cluster.masters()[1].addr

    fresh_cluster.stop_process(replica, signal.SIGTERM)
    fresh_cluster.up(timeout=20)
    assert fresh_cluster.healthy()

    master = fresh_cluster.masters()[0].addr
    fresh_cluster.stop_process(master)
    with pytest.raises(ClusterError, match="not running"):
        fresh_cluster.stop_process(master)


def test_cluster_factory_other_layout(cluster_factory: Callable[..., LocalCluster]) -> None:
    local = cluster_factory(shards=3, replicas=0, sentinels=0, cluster_name="solo")
    topo = json.loads(local.topology_path.read_text())
    assert topo["cluster"] == "solo"
    assert [s["replicas"] for s in topo["shards"]] == [[], [], []]
    assert topo["sentinels"] == []
    assert local.healthy()
