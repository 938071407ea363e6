"""The public listener over TLS: pusher-js with forceTLS and the official library with ssl=True,
both trusting a CA made for the test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pusher
import pytest
import requests
from nodes import APP_ID, APP_KEY, APP_SECRET, AuthServer, NodeProcess, WsClient, running_node
from pusher.requests import RequestsBackend
from test_conformance_pusherjs import JS_DIR, JsClient

from gateway.localcluster import LocalCluster
from gateway.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_node(cluster: LocalCluster, pki: Pki) -> Iterator[NodeProcess]:
    with running_node(cluster.topology_path, node_id="tls", tls=pki) as node:
        yield node


def _official(node: NodeProcess) -> pusher.Pusher:
    """The official library with ``ssl=True``, trusting the test's CA.

    With ``ssl=True`` the library verifies against its own CA bundle; its backend hook is the
    documented way to change that.
    """
    ca = str(node.tls_ca)

    class TrustingBackend(RequestsBackend):  # type: ignore[misc]
        def __init__(self, client: object, **options: object) -> None:
            super().__init__(client, **options)
            self.options["verify"] = ca

    return pusher.Pusher(
        app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1", port=node.port,
        ssl=True, backend=TrustingBackend,
    )  # fmt: skip


def test_official_library_over_tls(tls_node: NodeProcess, pki: Pki) -> None:
    channel = f"tls-{uuid.uuid4().hex[:8]}"
    with WsClient(tls_node.ws_url(), ssl_ca=pki.ca_cert) as ws:
        ws.subscribe(channel)
        _official(tls_node).trigger(channel, "over-tls", {"ok": True})
        assert json.loads(ws.expect("over-tls", channel)["data"]) == {"ok": True}
        info = _official(tls_node).channel_info(channel, ["subscription_count"])
        assert info["subscription_count"] == 1
    # Plain HTTP on the TLS port gets nowhere.
    with pytest.raises(requests.RequestException):
        requests.get(f"http://127.0.0.1:{tls_node.port}/live", timeout=3)


@pytest.mark.skipif(shutil.which("node") is None, reason="node (Node.js) is not installed")
@pytest.mark.skipif(not (JS_DIR / "node_modules").exists(), reason="run `make js`")
def test_pusher_js_with_force_tls(tls_node: NodeProcess, pki: Pki) -> None:
    with AuthServer() as auth:
        client = JsClient(tls_node.port, auth, "tls-user", tls_ca=pki.ca_cert)
        try:
            client.connected()
            channel = f"presence-tls-{uuid.uuid4().hex[:8]}"
            assert client.subscribe(channel)["channel"] == channel
            _official(tls_node).trigger(channel, "from-server", {"n": 1})
            event = client.wait_for("event", channel=channel, event="from-server")
            assert event["data"] == {"n": 1}
        finally:
            client.close()


def test_a_key_that_does_not_load_stops_the_node_with_one_line(
    cluster: LocalCluster, pki: Pki, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.key"
    broken.write_text("not a key\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--topology", str(cluster.topology_path),
         "--port", "0", "--tls-cert", str(pki.server_cert), "--tls-key", str(broken)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "tls_cert / tls_key: cannot load" in proc.stderr and "Traceback" not in proc.stderr
