"""The presence-gateway command as a user runs it: dev, cluster, shards init, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import find_free_port_range
from polling import wait_until
from support import raw_client
from websockets.sync.client import ClientConnection, connect

from gateway.cli import main
from gateway.protocol.auth import sign

CLI = [sys.executable, "-m", "gateway"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_dev_serves_connection_established_and_stops_everything(tmp_path: Path) -> None:
    base = find_free_port_range(8)
    ws_port = base + 7
    work = tmp_path / "dev"
    proc = subprocess.Popen(
        [*CLI, "dev", "--dir", str(work), "--base-port", str(base), "--port", str(ws_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Drain its output continuously so a full pipe can never block it.
    lines: list[str] = []
    assert proc.stdout is not None
    drain = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    drain.start()
    try:

        def banner() -> bool:
            return any("presence-gateway dev: ws://" in line for line in lines)

        # Stop waiting as soon as the command has exited, too: its output says why.
        wait_until(
            lambda: banner() or proc.poll() is not None,
            60,
            lambda: "the dev banner or an exit; output:\n" + "".join(lines),
        )
        assert banner(), "".join(lines)
        url = f"ws://127.0.0.1:{ws_port}/app/app-key?protocol=7&client=js&version=8.4.0"

        def connected() -> ClientConnection | None:
            try:
                return connect(url)
            except OSError:
                return None

        # The node listens right after the banner.
        ws = wait_until(connected, 10, "the dev node to accept a WebSocket", step=0.1)
        with ws:
            frame = json.loads(ws.recv(timeout=10))
            assert frame["event"] == "pusher:connection_established"
            data = json.loads(frame["data"])
            assert data["activity_timeout"] > 0
            socket_id = data["socket_id"]
            # A presence join goes through the verified writer to the channel's shard.
            channel_data = json.dumps({"user_id": "dev-user"})
            sig = sign("app-secret", f"{socket_id}:presence-dev:{channel_data}")
            ws.send(
                json.dumps(
                    {
                        "event": "pusher:subscribe",
                        "data": {
                            "channel": "presence-dev",
                            "auth": f"app-key:{sig}",
                            "channel_data": channel_data,
                        },
                    }
                )
            )
            reply = json.loads(ws.recv(timeout=10))
            assert reply["event"] == "pusher_internal:subscription_succeeded"
            topo = json.loads((work / "topology.json").read_text())
            holders = [
                raw_client(shard["master"]).hget("{1:presence-dev}:u", "dev-user")
                for shard in topo["shards"]
            ]
            assert sorted(holders, key=str) == [None, b"1"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail("dev did not stop on SIGINT within 30 s; its output:\n" + "".join(lines))
        finally:
            drain.join(timeout=10)
            proc.stdout.close()
    pids = [int(p.read_text()) for p in work.glob("*.pid") if p.read_text().strip()]
    for pid in pids:
        state = Path(f"/proc/{pid}/stat")
        assert not state.exists() or state.read_text().split()[2] == "Z", f"pid {pid} left"


def test_cluster_up_status_init_down(tmp_path: Path) -> None:
    base = find_free_port_range(7)
    work = str(tmp_path / "c")
    up = _run("cluster", "up", "--dir", work, "--base-port", str(base))
    assert up.returncode == 0, up.stderr
    try:
        topo = json.loads(up.stdout)
        assert [s["name"] for s in topo["shards"]] == ["shard-0", "shard-1"]
        assert len(topo["sentinels"]) == 3
        status = _run("cluster", "status", "--dir", work, "--base-port", str(base))
        assert status.returncode == 0
        assert str(base) in status.stdout
        init = _run("shards", "init", "--topology", f"{work}/topology.json")
        assert init.returncode == 0, init.stderr
        assert "shard-0: index 0" in init.stdout and "epoch 1" in init.stdout
        assert _run("shards", "init", "--topology", f"{work}/topology.json").returncode == 0
    finally:
        down = _run("cluster", "down", "--dir", work, "--base-port", str(base))
    assert down.returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--topology", "/nonexistent/topology.json"], "cannot read topology file"),
        (["shards", "init", "--topology", "{bad}"], "cannot read topology file"),
        (["serve", "--topology", "{json}", "--app", "x:y"], "expected ID:KEY:SECRET"),
        (["serve", "--topology", "{json}", "--app", "abc:key:secret"], "all digits"),
        (["serve", "--topology", "{badaddr}"], "shards[0].master"),
    ],
)
def test_bad_input_exits_2_with_named_field(
    tmp_path: Path,
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"shards": [{"name": "shard-0", "master": "127.0.0.1:1"}]}))
    badaddr = tmp_path / "badaddr.json"
    badaddr.write_text(json.dumps({"shards": [{"name": "shard-0", "master": "nohost"}]}))
    subst = {"{json}": str(good), "{badaddr}": str(badaddr), "{bad}": str(tmp_path / "missing")}
    assert main([subst.get(a, a) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("presence-gateway: ")


def test_module_entry_point_help() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for command in ("dev", "serve", "cluster", "shards"):
        assert command in result.stdout
