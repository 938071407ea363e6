"""Apps reloaded live: a watched apps file and SIGHUP on a real node; bad files refused whole."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from nodes import WsClient, running_node
from polling import wait_until
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gateway.config import AppConfig, ConfigError, NodeConfig, load_apps_file
from gateway.metrics import Metrics
from gateway.protocol.auth import sign_api_request, sign_channel
from gateway.server.reload import AppsReloader, AppsSource


def _apps(*apps: tuple[str, str, str], extra: str = "") -> str:
    out = ""
    for app_id, key, secret in apps:
        out += f'[[apps]]\nid = "{app_id}"\nkey = "{key}"\nsecret = "{secret}"\n{extra}\n'
    return out


BAD_FILES = [
    (_apps(("1", "k1", "s1"), ("2", "k1", "s2")), "apps[1]: app key 'k1' is already used by"),
    (_apps(("1", "k1", "s1"), ("1", "k2", "s2")), "apps[1]: app id '1' is already used by"),
    ('[[apps]]\nid = "1"\nkey = "k"\nkey = "k2"\nsecret = "s"\n', "not valid TOML"),
    (_apps(("1", "k1", "s1"), extra="max_presence_members = -5"),
     "apps[0].max_presence_members: must be an integer 1..10000, got -5"),
    (_apps(("x", "k1", "s1")), "apps[0]: app id must be all digits"),
    ("[node]\nport = 1\n", "only [[apps]] tables belong here"),
    ("", "no [[apps]] entry"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_apps_file_is_refused_naming_the_entry(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "apps.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_apps_file(path)


def test_the_reloader_keeps_the_apps_in_force_when_the_file_is_bad(tmp_path: Path) -> None:
    path = tmp_path / "apps.toml"
    path.write_text(_apps(("1", "k1", "s1")))
    state = {"config": NodeConfig(apps=load_apps_file(path))}
    applied: list[NodeConfig] = []

    def apply(config: NodeConfig) -> dict[str, int]:
        state["config"] = config
        applied.append(config)
        return {}

    source = AppsSource(lambda: NodeConfig(apps=load_apps_file(path)), (str(path),))
    reloader = AppsReloader(source, lambda: state["config"], apply, Metrics())
    path.write_text(_apps(("1", "k1", "s1"), ("2", "k1", "s2")))
    assert reloader.reload("test") is False
    assert [a.id for a in state["config"].apps] == ["1"] and not applied
    path.write_text(_apps(("1", "k1", "rotated"), ("2", "k2", "s2")))
    reloader.poll()  # the file changed: reloaded
    assert [(a.id, a.secret) for a in state["config"].apps] == [("1", "rotated"), ("2", "s2")]
    assert reloader.reload("again") is True and len(applied) == 1  # no change: nothing applied


def _get_channels(port: int, app: AppConfig) -> int:
    path = f"/apps/{app.id}/channels"
    params = sign_api_request(app, "GET", path, {}, b"", int(time.time()))
    return requests.get(f"http://127.0.0.1:{port}{path}", params=params, timeout=5).status_code


def _close_code(ws: WsClient) -> int | None:
    try:
        while True:
            ws.recv(timeout=10)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


def test_apps_file_reloaded_live_on_a_real_node(cluster: Any, tmp_path: Path) -> None:
    path = tmp_path / "apps.toml"
    path.write_text(_apps(("1", "key-one", "secret-one"), ("2", "key-two", "secret-two")))
    extra = f'apps_file = "{path}"\napps_watch_interval = 0.2\n'
    with running_node(
        cluster.topology_path, node_id="reload", extra_toml=extra, app_flag=False
    ) as node:
        one = WsClient(node.ws_url(key="key-one"))
        two = WsClient(node.ws_url(key="key-two"))
        old_one = AppConfig("1", "key-one", "secret-one")
        assert _get_channels(node.port, old_one) == 200
        # Rotate app 1's secret, remove app 2, add app 3.
        path.write_text(_apps(("1", "key-one", "secret-new"), ("3", "key-three", "secret-3")))
        assert _close_code(two) == 4001
        wait_until(lambda: "apps reloaded" in node.output, 10, "the reload logged")
        assert "secret-new" not in node.output and "secret-one" not in node.output
        new_one = AppConfig("1", "key-one", "secret-new")
        assert _get_channels(node.port, old_one) == 401
        assert _get_channels(node.port, new_one) == 200
        # App 1's socket stayed; its next subscriptions are checked with the new secret.
        for app, channel in ((old_one, "private-old"), (new_one, "private-new")):
            auth = sign_channel(app, one.socket_id, channel)
            one.send({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}})
        one.expect("pusher_internal:subscription_succeeded", "private-new")
        assert not [
            f for f in one.pending if f.get("event") == "pusher_internal:subscription_succeeded"
        ]
        with connect(node.ws_url(key="key-three"), open_timeout=10) as three:
            assert json.loads(three.recv(timeout=10))["event"] == "pusher:connection_established"
        with connect(node.ws_url(key="key-two"), open_timeout=10) as gone:
            assert json.loads(gone.recv(timeout=10))["data"]["code"] == 4001
        # A bad file is refused whole; the apps in force stay.
        path.write_text(_apps(("1", "key-one", "s"), ("4", "key-one", "t")))
        wait_until(lambda: "apps reload" in node.output and "refused" in node.output, 10, "refused")
        assert "apps[1]: app key 'key-one' is already used by apps[0]" in node.output
        assert _get_channels(node.port, new_one) == 200
        one.close()


def test_sighup_reloads_the_apps(cluster: Any, tmp_path: Path) -> None:
    path = tmp_path / "apps.toml"
    path.write_text(_apps(("1", "key-one", "secret-one")))
    extra = f'apps_file = "{path}"\napps_watch_interval = 0\n'  # no watching: only SIGHUP
    with running_node(
        cluster.topology_path, node_id="reload-hup", extra_toml=extra, app_flag=False
    ) as node:
        path.write_text(_apps(("1", "key-one", "secret-one"), ("5", "key-five", "secret-5")))
        time.sleep(0.5)  # nothing watches the file: nothing happens by itself
        assert "apps reloaded" not in node.output
        node.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "apps reloaded (SIGHUP)" in node.output, 10, "the SIGHUP reload")
        with connect(node.ws_url(key="key-five"), open_timeout=10) as five:
            assert json.loads(five.recv(timeout=10))["event"] == "pusher:connection_established"
        assert node.metric("pg_apps") == 2
        assert node.health() == 200


def test_apps_check_command(tmp_path: Path) -> None:
    from gateway.cli import main

    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(_apps(("1", "k1", "s1"), ("2", "k2", "s2")))
    bad.write_text(_apps(("1", "k1", "s1"), ("2", "k1", "s2")))
    assert main(["apps", "check", str(good)]) == 0
    assert main(["apps", "check", str(bad)]) == 2


async def test_a_removed_apps_sockets_leave_their_channels_and_others_stay() -> None:
    from dataclasses import replace

    from polling import settle
    from test_hub import APP, CHANNEL, CONFIG, World, _succeeded

    world = World()
    other = AppConfig("9", "key-nine", "secret-nine")
    a = await world.node("a")
    a.hub.config = replace(CONFIG, apps=(APP, other))
    sock = a.connect()
    a.subscribe(sock, "u1")
    await settle(lambda: _succeeded(sock))
    closed = a.hub.set_apps(replace(CONFIG, apps=(other,)))
    assert closed == {APP.id: 1}
    assert sock.closed is not None and sock.closed[0] == 4001
    await world.quiet()
    assert await a.store.user_ids(APP.id, CHANNEL) == []
    assert not a.hub.clients and not a.hub.presence
    rotated = replace(other, secret="rotated")
    keep = a.connect(key="key-nine")
    assert a.hub.set_apps(replace(CONFIG, apps=(rotated,))) == {}
    assert keep.closed is None and a.hub.clients[keep.id].session.app.secret == "rotated"
