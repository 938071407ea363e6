"""Conformance with the official browser/Node client, pusher-js 8 (pinned in tests/js).

Each client is ``node tests/js/client.mjs``: it takes commands as JSON lines on stdin and prints
what pusher-js observed as JSON lines; these tests assert on those observations.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nodes import (
    AuthServer,
    NodeProcess,
    WebhookReceiver,
    official_client,
    running_node,
    start_node,
)
from polling import wait_until

JS_DIR = Path(__file__).parent / "js"
SOCKET_ID = re.compile(r"\A\d+\.\d+\Z")

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("node") is None, reason="node (Node.js) is not installed"),
    pytest.mark.skipif(
        not (JS_DIR / "node_modules" / "pusher-js").is_dir(),
        reason="pusher-js not installed: run `make js`",
    ),
]


class JsClient:
    """One pusher-js client in a Node subprocess."""

    def __init__(
        self,
        port: int,
        auth: AuthServer,
        user_id: str,
        *,
        tls_ca: Path | None = None,
        watchlist: tuple[str, ...] = (),
    ) -> None:
        self.user_id = user_id
        self.seen: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        env = dict(os.environ)
        if tls_ca is not None:
            env.update(PG_TLS="1", NODE_EXTRA_CA_CERTS=str(tls_ca))
        if watchlist:
            env["PG_WATCHLIST"] = ",".join(watchlist)
        self.proc = subprocess.Popen(
            ["node", str(JS_DIR / "client.mjs"), str(port), auth.url, user_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, ""):
            try:
                self.seen.append(json.loads(line))
            except ValueError:
                self.stderr.append(line)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr.extend(iter(self.proc.stderr.readline, ""))

    def send(self, op: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()

    def matching(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            o
            for o in list(self.seen)
            if o["type"] == kind and all(o.get(k) == v for k, v in fields.items())
        ]

    def wait_for(
        self, kind: str, timeout: float = 10, count: int = 1, **fields: Any
    ) -> dict[str, Any]:
        """The ``count``-th observation of ``kind`` whose fields match."""
        found = wait_until(
            lambda: len(self.matching(kind, **fields)) >= count,
            timeout,
            f"{self.user_id}: {count}x {kind} {fields}; saw {self.seen} stderr {self.stderr}",
        )
        assert found
        return self.matching(kind, **fields)[count - 1]

    def connected(self, count: int = 1) -> str:
        state = self.wait_for("state", current="connected", count=count)
        socket_id: str = state["socket_id"]
        return socket_id

    def subscribe(self, channel: str, *, events: tuple[str, ...] = (), count: int = 1) -> Any:
        self.send("subscribe", channel=channel, events=list(events))
        return self.wait_for("subscribed", channel=channel, count=count)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@pytest.fixture(scope="module")
def auth() -> Iterator[AuthServer]:
    with AuthServer() as server:
        yield server


@pytest.fixture(scope="module")
def node(cluster: Any, hooks: WebhookReceiver) -> Iterator[NodeProcess]:
    with running_node(cluster.topology_path, node_id="js-a", webhook_url=hooks.url) as proc:
        yield proc


@pytest.fixture
def clients(node: NodeProcess, auth: AuthServer) -> Iterator[Any]:
    started: list[JsClient] = []

    def factory(user_id: str, port: int | None = None, **options: Any) -> JsClient:
        client = JsClient(port or node.port, auth, user_id, **options)
        started.append(client)
        return client

    try:
        yield factory
    finally:
        for client in started:
            client.close()


def _name(prefix: str) -> str:
    return f"{prefix}js-{uuid.uuid4().hex[:10]}"


def test_connects_with_a_valid_socket_id(clients: Any) -> None:
    started = time.monotonic()
    client = clients("u-connect")
    socket_id = client.connected()
    print(f"pusher-js connected in {time.monotonic() - started:.2f} s, socket_id {socket_id}")
    assert SOCKET_ID.match(socket_id)
    assert client.matching("error") == []


def test_public_private_presence_subscriptions(clients: Any, auth: AuthServer) -> None:
    client = clients("ann")
    socket_id = client.connected()
    public, private, presence = _name(""), _name("private-"), _name("presence-")
    client.subscribe(public)
    client.subscribe(private)
    joined = client.subscribe(presence)
    assert joined["me"] == "ann"
    assert joined["count"] == 1
    assert joined["members"] == [{"id": "ann", "info": {"name": "user ann"}}]
    asked = {p["channel_name"] for path, p in auth.calls if p.get("socket_id") == socket_id}
    assert asked == {private, presence}, "public channels must not hit the auth endpoint"


def test_member_added_and_removed_seen_by_another_client(clients: Any) -> None:
    channel = _name("presence-")
    ann, bob = clients("ann"), clients("bob")
    ann.connected()
    ann.subscribe(channel)
    bob.connected()
    seeded = bob.subscribe(channel)
    assert seeded["count"] == 2
    assert sorted(m["id"] for m in seeded["members"]) == ["ann", "bob"]
    added = ann.wait_for("member_added", channel=channel)
    assert added["id"] == "bob" and added["info"] == {"name": "user bob"}
    bob.send("unsubscribe", channel=channel)
    removed = ann.wait_for("member_removed", channel=channel)
    assert removed["id"] == "bob"
    print(f"member_removed reached ann {removed['t'] - added['t']} ms after member_added")
    assert bob.matching("member_added") == [], "the joining socket gets only its roster"


@pytest.mark.parametrize("prefix", ["private-", "presence-"])
def test_client_events_reach_others_but_not_the_sender(clients: Any, prefix: str) -> None:
    channel = _name(prefix)
    ann, bob = clients("ann"), clients("bob")
    for client in (ann, bob):
        client.connected()
        client.subscribe(channel, events=("client-typing",))
    bob.send("trigger", channel=channel, event="client-typing", data={"typing": True})
    assert bob.wait_for("ack")["ok"] is True
    got = ann.wait_for("event", channel=channel, event="client-typing")
    assert got["data"] == {"typing": True}
    if prefix == "presence-":
        assert got["metadata"] == {"user_id": "bob"}, "presence client events carry user_id"
    time.sleep(0.5)  # a wrongly echoed frame would arrive right behind the delivered one
    assert bob.matching("event", event="client-typing") == [], "client events are not echoed"


def test_signin_then_server_to_user_event(clients: Any, node: NodeProcess) -> None:
    user = f"user-{uuid.uuid4().hex[:8]}"
    client = clients(user)
    client.connected()
    client.send("signin")
    signed = client.wait_for("signin")
    assert json.loads(signed["data"]["user_data"])["id"] == user
    api = official_client(node.port)

    # The #server-to-user subscription follows sign-in: send again until a delivery arrives.
    def delivered() -> bool:
        if client.matching("user_event"):
            return True
        assert api.send_to_user(user, "notice", {"n": 1}) == {}
        return False

    wait_until(delivered, 10, "a server-to-user event delivered", step=0.2)
    got = client.wait_for("user_event", event="notice")
    assert got["data"] == {"n": 1}


def test_watchlist_online_and_offline_across_two_nodes(
    clients: Any, cluster: Any, node: NodeProcess
) -> None:
    tag = uuid.uuid4().hex[:8]
    alice, bob, carol = (f"{n}-{tag}" for n in ("alice", "bob", "carol"))
    with running_node(cluster.topology_path, node_id="js-b") as node_b:
        early = clients(carol, node_b.port)  # online on the other node before alice signs in
        early.connected()
        early.send("signin")
        early.wait_for("signin")
        watcher = clients(alice, watchlist=(bob, carol))
        watcher.connected()
        watcher.send("signin")
        watcher.wait_for("signin")
        assert watcher.wait_for("watchlist", name="online")["user_ids"] == [carol]
        late = clients(bob, node_b.port)
        late.connected()
        late.send("signin")
        late.wait_for("signin")
        watcher.wait_for("watchlist", name="online", user_ids=[bob])
        late.close()  # bob's only socket: offline after the hold (3 s by default)
        watcher.wait_for("watchlist", name="offline", user_ids=[bob], timeout=20)
        # Each change once: carol online, bob online, bob offline.
        assert len(watcher.matching("watchlist", user_ids=[carol])) == 1
        assert len(watcher.matching("watchlist")) == 3, watcher.matching("watchlist")


def test_subscription_count_on_a_public_channel(clients: Any) -> None:
    channel = _name("")
    ann, bob = clients("ann"), clients("bob")
    ann.connected()
    ann.subscribe(channel)
    assert ann.wait_for("subscription_count", channel=channel)["count"] == 1
    bob.connected()
    bob.subscribe(channel)
    assert ann.wait_for("subscription_count", channel=channel, count=2)["count"] == 2
    bob.send("unsubscribe", channel=channel)
    assert ann.wait_for("subscription_count", channel=channel, count=3)["count"] == 1


def test_connection_disconnect_then_connect_resubscribes(clients: Any) -> None:
    channel = _name("presence-")
    ann, bob = clients("ann"), clients("bob")
    ann.connected()
    ann.subscribe(channel)
    bob.connected()
    bob.subscribe(channel)
    first = bob.matching("state", current="connected")[0]["socket_id"]
    bob.send("disconnect")
    assert ann.wait_for("member_removed", channel=channel)["id"] == "bob"
    bob.send("connect")
    second = bob.connected(count=2)
    assert second != first
    again = bob.wait_for("subscribed", channel=channel, count=2)
    assert again["count"] == 2
    assert ann.wait_for("member_added", channel=channel, count=2)["id"] == "bob"


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_reconnects_and_resubscribes_after_node_restart(
    cluster: Any, auth: AuthServer, how: str
) -> None:
    channel = _name("presence-")
    node = start_node(cluster.topology_path, node_id=f"js-restart-{how}")
    client = JsClient(node.port, auth, "ann")
    try:
        first = client.connected()
        client.subscribe(channel)
        stopped = time.monotonic()
        if how == "stop":
            node.stop()  # graceful: sockets are closed with 4200 (reconnect now)
        else:
            node.kill()
        client.wait_for("state", current="connecting", timeout=10)
        node = start_node(cluster.topology_path, node_id=f"js-restart-{how}", port=node.port)
        # The immediate retry hits the stopped node; pusher-js's ws strategy loop then waits
        # out its 15 s attempt timeout before trying again, hence the generous bound.
        second = client.wait_for("state", current="connected", count=2, timeout=40)
        assert second["socket_id"] != first
        rejoined = client.wait_for("subscribed", channel=channel, count=2, timeout=20)
        print(f"{how}: re-subscribed {time.monotonic() - stopped:.2f} s after the node went")
        assert rejoined["members"] == [{"id": "ann", "info": {"name": "user ann"}}]
        errors = client.matching("error")
        if how == "stop":
            codes = [e["error"].get("code") for e in errors if isinstance(e["error"], dict)]
            assert set(codes) <= {4200}, f"graceful stop must close with 4200, got {errors}"
    finally:
        client.close()
        node.stop()
