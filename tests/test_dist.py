"""The installable artefact: the wheel that ``make dist`` builds installs and serves without a
Rust toolchain.

The wheel is built once (``maturin build --release``, as ``make dist`` does), installed into a
new virtualenv whose ``PATH`` has no ``cargo`` or ``rustc``, and run from outside the source
tree, so the code that answers is the installed package's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodes import AuthServer, NodeProcess
from polling import wait_until
from test_conformance_pusherjs import JS_DIR, JsClient

from gateway.localcluster import LocalCluster, find_free_port_range

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


def _no_rust_path() -> str:
    """``PATH`` without any directory holding ``cargo`` or ``rustc``."""
    keep = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not any((Path(d) / tool).exists() for tool in ("cargo", "rustc"))
    ]
    return os.pathsep.join(keep)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``presence-gateway`` script of a new virtualenv with only the wheel installed."""
    out = tmp_path_factory.mktemp("dist")
    maturin = Path(sys.executable).parent / "maturin"
    subprocess.run(
        [str(maturin), "build", "--release", "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=500,
    )  # fmt: skip
    (wheel,) = out.glob("presence_gateway-*.whl")
    env_dir = out / "venv"
    venv.create(env_dir, with_pip=True)
    env = {**os.environ, "PATH": _no_rust_path()}
    assert shutil.which("cargo", path=env["PATH"]) is None
    subprocess.run(
        [str(env_dir / "bin" / "pip"), "install", "--quiet", str(wheel)],
        cwd=out, env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    yield env_dir / "bin" / "presence-gateway"


def test_the_wheel_installs_and_reports_its_version(installed: Path) -> None:
    env = {**os.environ, "PATH": _no_rust_path()}
    out = subprocess.run(
        [str(installed), "--version"], cwd=installed.parent, env=env, capture_output=True,
        text=True, check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.strip() == "presence-gateway 0.1.0"


@pytest.mark.skipif(shutil.which("node") is None, reason="node (Node.js) is not installed")
@pytest.mark.skipif(not (JS_DIR / "node_modules").exists(), reason="run `make js`")
def test_the_installed_gateway_serves_a_pusher_js_client(
    installed: Path, cluster: LocalCluster, tmp_path: Path
) -> None:
    from nodes import init_shards_once

    init_shards_once(cluster.topology_path)
    port = find_free_port_range(1)
    config = tmp_path / "node.toml"
    config.write_text("[node]\n")
    args = [str(installed), "serve", "--topology", str(cluster.topology_path), "--host",
            "127.0.0.1", "--port", str(port), "--node-id", "from-wheel"]  # fmt: skip
    node = NodeProcess(args, port, "from-wheel", config, env={"PATH": _no_rust_path()})
    try:
        node.wait_healthy(60)
        with AuthServer() as auth:
            client = JsClient(port, auth, "wheel-user")
            try:
                client.connected()
                assert client.subscribe("presence-from-wheel")["channel"] == "presence-from-wheel"
            finally:
                client.close()
        # The code that answered is the installed copy, not the source tree.
        assert str(installed.parent.parent) in _module_path(node)
    finally:
        node.stop()
    wait_until(lambda: node.proc.poll() is not None, 10, "the node to stop")


def _module_path(node: NodeProcess) -> str:
    return (
        os.readlink(f"/proc/{node.pid}/exe")
        + " "
        + " ".join(Path(f"/proc/{node.pid}/cmdline").read_text().split("\0"))
    )
