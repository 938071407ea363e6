"""Helpers for end-to-end tests: gateway node subprocesses, a webhook receiver, an auth server.

Not fixtures (test modules build their fixtures from these):

``start_node(topology_path, node_id=..., ...) -> NodeProcess``
    Runs ``python -m gateway serve`` on a free loopback port with a small webhook hold, drains
    its output in a thread, and returns once ``GET /health`` answers 200 (bounded; the node's
    output is in the failure message). ``NodeProcess`` is a context manager that stops it.

``WebhookReceiver``
    Threaded HTTP server on a free loopback port that records every POST and validates it with
    the official ``pusher`` library's ``validate_webhook``.

``AuthServer``
    The app's auth endpoints: ``POST /pusher/auth`` and ``POST /pusher/user-auth``, signing with
    the official ``pusher`` library; the user id comes from the ``user_id`` form/query param.

``WsClient``
    A raw Pusher-protocol client over the ``websockets`` sync client, for frame-level checks.
    ``AsyncWsClient`` is the same client for coroutines (tests whose event loop runs the node).

``api_request``
    A hand-signed HTTP API request (every part of the signature can be broken on purpose).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pusher
import requests
from polling import wait_until
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from gateway.localcluster import find_free_port_range

APP_ID = "1"
APP_KEY = "app-key"
APP_SECRET = "app-secret"
#: Webhook hold used by test nodes (the production default is 3000 ms).
TEST_HOLD_MS = 500

_initialised: set[str] = set()


def official_client(port: int) -> pusher.Pusher:
    """The official ``pusher`` server library pointed at a node."""
    return pusher.Pusher(
        app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1", port=port, ssl=False
    )


def _signer() -> pusher.Pusher:
    return pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET)


#: ``user_info`` left out of a presence subscription: sent as ``{}`` (pass None for ``null``).
NO_INFO: Any = object()


def init_shards_once(topology_path: str | Path) -> None:
    """Write shard identities and load the function library (once per topology per session)."""
    from gateway.shards.admin import init_shards
    from gateway.shards.topology import load_topology

    path = str(topology_path)
    if path not in _initialised:
        init_shards(load_topology(path))
        _initialised.add(path)


# --------------------------------------------------------------------------- gateway nodes


class NodeProcess:
    """A ``presence-gateway serve`` subprocess whose output is drained by a thread."""

    def __init__(
        self,
        args: list[str],
        port: int,
        node_id: str,
        config: Path,
        *,
        nofile: int | None = None,
        env: dict[str, str] | None = None,
        tls_ca: Path | None = None,
    ) -> None:
        self.port = port
        self.node_id = node_id
        self.tls_ca = tls_ca
        self.url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{port}"
        #: ``verify`` for requests: the CA of a TLS node, else the default.
        self.verify: str | bool = str(tls_ca) if tls_ca else True
        self.config = config
        self._lines: list[str] = []

        def limit_files() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            preexec_fn=limit_files if nofile is not None else None,  # noqa: PLW1509
            env={**os.environ, **env} if env else None,
        )
        self._drain = threading.Thread(target=self._read, name=f"drain-{node_id}", daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, ""):
            self._lines.append(line)

    @property
    def pid(self) -> int:
        """The node's process id."""
        return self.proc.pid

    def rss(self) -> int:
        """Resident memory of the node's process, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time the node's process has used."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metric(self, name: str) -> float:
        """Sum of every series of one metric on ``/metrics``."""
        text = requests.get(f"{self.url}/metrics", timeout=10, verify=self.verify).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    @property
    def output(self) -> str:
        """Everything the node printed so far."""
        return "".join(self._lines)

    def ws_url(self, key: str = APP_KEY, query: str = "protocol=7&client=js&version=8.6.0") -> str:
        scheme = "wss" if self.tls_ca else "ws"
        return f"{scheme}://127.0.0.1:{self.port}/app/{key}?{query}"

    def health(self, path: str = "/health") -> int | None:
        """Status of ``GET /health`` (or another path), None when nothing answers."""
        try:
            return requests.get(f"{self.url}{path}", timeout=2, verify=self.verify).status_code
        except requests.RequestException:
            return None

    def wait_healthy(self, timeout: float = 30, path: str = "/health") -> None:
        """Wait for ``path`` to answer 200; RuntimeError as soon as the node has exited."""

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"node {self.node_id} exited with {self.proc.returncode}:\n{self.output}"
                )
            return self.health(path) == 200

        try:
            wait_until(healthy, timeout, f"node {self.node_id} to answer {path} 200", step=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; output:\n{self.output}") from None

    def _finish(self) -> None:
        self.config.unlink(missing_ok=True)
        self._drain.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self, timeout: float = 30) -> int:
        """SIGINT, wait (SIGKILL after ``timeout``); return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                self._finish()
                raise AssertionError(
                    f"node {self.node_id} ignored SIGINT for {timeout} s:\n{self.output}"
                ) from None
        self._finish()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (a crash: no goodbye to clients, no cleanup)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._finish()

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_node(
    topology_path: str | Path,
    *,
    node_id: str,
    port: int | None = None,
    webhook_url: str | None = None,
    extra_toml: str = "",
    hold_ms: int = TEST_HOLD_MS,
    timeout: float = 30,
    nofile: int | None = None,
    env: dict[str, str] | None = None,
    init: bool = True,
    ready: bool = True,
    tls: Any = None,
    app_settings: dict[str, Any] | None = None,
    app_flag: bool = True,
) -> NodeProcess:
    """Start a node on ``topology_path`` and wait for ``/health`` 200.

    ``app_settings`` (per-app settings such as limits) configures the test app in the config
    file instead of with ``--app``; ``app_flag=False`` gives no app at all (the config's
    own, e.g. an ``apps_file`` in ``extra_toml``).

    ``extra_toml`` is appended to the ``[node]`` table of the generated config (so plain
    ``key = value`` lines are node settings; it may open further tables such as ``[[apps]]``).
    Without ``port`` a free port is picked (retried if it was taken meanwhile). ``nofile``
    sets the node's open-file limit (soft and hard); ``env`` adds environment variables.
    ``init=False`` leaves the shards as they are; ``ready=False`` returns as soon as ``/live``
    answers (a node may serve while some shards are unusable). ``tls`` (a
    :class:`gateway.pki.Pki`) makes the node serve TLS with its server certificate.
    """
    if init:
        init_shards_once(topology_path)
    config = Path(tempfile.mkstemp(prefix=f"node-{node_id}-", suffix=".toml")[1])
    text = f"[node]\nwebhook_hold_ms = {hold_ms}\n{extra_toml}\n"
    if app_settings is not None:
        entry = {"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET, **app_settings}
        text += "\n[[apps]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in entry.items())
    config.write_text(text)
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        chosen = port if port is not None else find_free_port_range(1)
        args = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config),
            "--topology",
            str(topology_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(chosen),
            "--node-id",
            node_id,
        ]
        if app_settings is None and app_flag:
            args += ["--app", f"{APP_ID}:{APP_KEY}:{APP_SECRET}"]
        if webhook_url is not None:
            args += ["--webhook-url", webhook_url]
        if tls is not None:
            args += ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)]
        node = NodeProcess(
            args,
            chosen,
            node_id,
            config,
            nofile=nofile,
            env=env,
            tls_ca=tls.ca_cert if tls is not None else None,
        )
        try:
            node.wait_healthy(timeout, path="/ready" if ready else "/live")
        except RuntimeError:
            node.kill()
            if attempt == attempts - 1 or "in use" not in node.output:
                raise
            continue
        except BaseException:
            node.kill()
            raise
        return node
    raise AssertionError("unreachable")


@contextlib.contextmanager
def running_node(topology_path: str | Path, **options: Any) -> Iterator[NodeProcess]:
    """``start_node`` as a context manager that always stops (or kills) the node."""
    node = start_node(topology_path, **options)
    try:
        yield node
    finally:
        try:
            node.stop()
        finally:
            node.kill()


# --------------------------------------------------------------------------- HTTP servers


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Background:
    """A ThreadingHTTPServer on a free loopback port, served by one daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = _QuietServer(("127.0.0.1", 0), handler)
        self.server.owner = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Webhook:
    """One webhook request as received."""

    headers: dict[str, str]
    body: bytes
    validated: dict[str, Any] | None
    received: float = field(default_factory=time.monotonic)
    status: int = 200


class _WebhookHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        receiver: WebhookReceiver = self.server.owner  # type: ignore[attr-defined]
        status = receiver.status
        hang = receiver.hang
        # A request left hanging is recorded as never answered (599).
        receiver._record(dict(self.headers.items()), body, 599 if hang else status)
        if hang:
            time.sleep(hang)  # longer than the sender waits: a hanging endpoint
            return
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


class WebhookReceiver(_Background):
    """Records webhooks; ``validated`` is the official library's verdict (None = rejected).

    ``status`` is what it answers (set it to 500 for a failing endpoint); ``hang`` seconds it
    waits before answering. :meth:`events` counts only requests answered with 2xx.
    """

    def __init__(self) -> None:
        self.status = 200
        self.hang = 0.0
        self.requests: list[Webhook] = []
        self._lock = threading.Lock()
        self._validator = _signer()
        super().__init__(_WebhookHandler)
        self.url = f"http://127.0.0.1:{self.port}/hooks"

    def _record(self, headers: dict[str, str], body: bytes, status: int = 200) -> None:
        lowered = {k.lower(): v for k, v in headers.items()}
        try:
            validated = self._validator.validate_webhook(
                lowered.get("x-pusher-key", ""), lowered.get("x-pusher-signature", ""), body
            )
        except Exception:
            validated = None
        with self._lock:
            self.requests.append(Webhook(lowered, body, validated, status=status))

    def events(self, channel: str | None = None) -> list[dict[str, Any]]:
        """Events of every *valid* request so far, optionally only those of one channel."""
        with self._lock:
            found = [
                event
                for request in self.requests
                if request.validated is not None and 200 <= request.status < 300
                for event in request.validated["events"]
            ]
        return [e for e in found if channel is None or e.get("channel") == channel]

    def invalid(self) -> list[Webhook]:
        with self._lock:
            return [r for r in self.requests if r.validated is None]

    def names(self, channel: str) -> list[tuple[str, str | None]]:
        """``(name, user_id)`` of every event on ``channel``, in arrival order."""
        return [(e["name"], e.get("user_id")) for e in self.events(channel)]

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], channel: str, timeout: float
    ) -> list[dict[str, Any]]:
        return wait_until(
            lambda: predicate(self.events(channel)) and self.events(channel),
            timeout,
            lambda: f"webhooks on {channel}; got {self.names(channel)}",
        )


class _AuthHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _params(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length).decode()
        query = urllib.parse.urlsplit(self.path).query
        params = dict(urllib.parse.parse_qsl(query))
        params.update(urllib.parse.parse_qsl(body))
        return params

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self) -> None:
        server: AuthServer = self.server.owner  # type: ignore[attr-defined]
        params = self._params()
        path = urllib.parse.urlsplit(self.path).path
        server.calls.append((path, params))
        try:
            if path == "/pusher/auth":
                self._reply(200, server.channel_auth(params))
            elif path == "/pusher/user-auth":
                self._reply(200, server.user_auth(params))
            else:
                self._reply(404, {"error": "not found"})
        except (KeyError, ValueError) as exc:
            self._reply(403, {"error": str(exc)})


class AuthServer(_Background):
    """The app's auth endpoints, signing with the official ``pusher`` library.

    ``POST /pusher/auth`` (``socket_id``, ``channel_name``; presence: ``user_id`` and an
    optional JSON ``user_info`` param, else ``default_user``) and ``POST /pusher/user-auth``
    (``socket_id``, ``user_id``). A ``deny=1`` param answers 403.
    """

    def __init__(self, default_user: str = "anonymous") -> None:
        self.default_user = default_user
        self.calls: list[tuple[str, dict[str, str]]] = []
        self._pusher = _signer()
        super().__init__(_AuthHandler)
        self.url = f"http://127.0.0.1:{self.port}"

    def channel_auth(self, params: dict[str, str]) -> dict[str, Any]:
        if params.get("deny") == "1":
            raise ValueError("denied by test")
        channel = params["channel_name"]
        custom = None
        if channel.startswith("presence-"):
            user_id = params.get("user_id") or self.default_user
            custom = {"user_id": user_id, "user_info": json.loads(params.get("user_info", "{}"))}
        result: dict[str, Any] = self._pusher.authenticate(channel, params["socket_id"], custom)
        return result

    def user_auth(self, params: dict[str, str]) -> dict[str, Any]:
        user_id = params.get("user_id") or self.default_user
        data: dict[str, Any] = {"id": user_id, "user_info": {"name": f"user {user_id}"}}
        if params.get("watchlist"):
            data["watchlist"] = params["watchlist"].split(",")
        result: dict[str, Any] = self._pusher.authenticate_user(params["socket_id"], data)
        return result


# --------------------------------------------------------------------------- raw clients


class WsClient:
    """A raw protocol-7 client: connects, reads the handshake, signs with the official library."""

    def __init__(
        self,
        url: str,
        *,
        open_timeout: float = 10,
        ssl_ca: Path | None = None,
        max_queue: int | None = 16,
        busy_retry: float = 0.0,
    ) -> None:
        """Connect and read ``pusher:connection_established``.

        Args:
            max_queue: Frames buffered unread (None: unbounded, so that a socket the test
                does not read for a while keeps answering keepalive pings).
            busy_retry: Seconds during which a 503 (a node shedding load) is retried after a
                short pause, as pusher-js reconnects; 0 raises it at once.
        """
        context = ssl.create_default_context(cafile=str(ssl_ca)) if ssl_ca else None
        deadline = time.monotonic() + busy_retry
        while True:
            try:
                self.ws: ClientConnection = connect(
                    url,
                    open_timeout=open_timeout,
                    max_size=None,
                    max_queue=max_queue,
                    close_timeout=2,
                    ssl=context,
                )
                break
            except InvalidStatus as exc:
                if exc.response.status_code != 503 or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # pacing the retry, as a client's back-off would
        # Entering marks it as managed (websockets >= 17.1 warns on a bare connect() otherwise);
        # close() below is its exit.
        self.ws.__enter__()
        hello = self.recv(timeout=10)
        assert hello["event"] == "pusher:connection_established", hello
        self.hello = hello
        self.socket_id: str = json.loads(hello["data"])["socket_id"]
        self.pending: list[dict[str, Any]] = []

    def send(self, frame: dict[str, Any] | str) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def recv(self, timeout: float = 5) -> dict[str, Any]:
        raw = self.ws.recv(timeout=timeout)
        frame: dict[str, Any] = json.loads(raw)
        return frame

    def next_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5) -> Any:
        """First frame (buffered or new) matching ``predicate``; others are kept for later."""
        for i, frame in enumerate(self.pending):
            if predicate(frame):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching frame within {timeout} s; kept {self.pending}")
            try:
                frame = self.recv(timeout=left)
            except TimeoutError:
                continue
            if predicate(frame):
                return frame
            self.pending.append(frame)

    def expect(self, event: str, channel: str | None = None, timeout: float = 5) -> Any:
        return self.next_event(
            lambda f: f.get("event") == event and (channel is None or f.get("channel") == channel),
            timeout,
        )

    def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Frames that arrive within ``seconds`` (for "nothing is delivered" checks)."""
        got = list(self.pending)
        self.pending.clear()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.recv(timeout=left))
            except TimeoutError:
                break
        return got

    def subscribe_frame(
        self, channel: str, user_id: str | None = None, user_info: Any = NO_INFO
    ) -> dict[str, Any]:
        data: dict[str, Any] = {"channel": channel, "auth": ""}
        if channel.startswith("presence-"):
            info = {} if user_info is NO_INFO else user_info
            custom = {"user_id": user_id or "u", "user_info": info}
            data.update(_signer().authenticate(channel, self.socket_id, custom))
        elif channel.startswith("private-"):
            data.update(_signer().authenticate(channel, self.socket_id))
        return {"event": "pusher:subscribe", "data": data}

    def subscribe(
        self,
        channel: str,
        user_id: str | None = None,
        user_info: Any = NO_INFO,
        timeout: float = 10,
    ) -> Any:
        """Subscribe and return the ``subscription_succeeded`` frame (fails on an error)."""
        self.send(self.subscribe_frame(channel, user_id, user_info))
        reply = self.next_event(
            lambda f: (
                f.get("event") in ("pusher:error", "pusher:subscription_error")
                or (
                    f.get("event") == "pusher_internal:subscription_succeeded"
                    and f.get("channel") == channel
                )
            ),
            timeout,
        )
        assert reply["event"] == "pusher_internal:subscription_succeeded", reply
        return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()

    def __enter__(self) -> WsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncWsClient:
    """:class:`WsClient` for coroutines: the same client, each call run in a worker thread so
    that the event loop (which may be serving the node under test) keeps running meanwhile."""

    def __init__(self, client: WsClient) -> None:
        self.client = client
        self.hello = client.hello
        self.socket_id = client.socket_id

    @classmethod
    async def open(cls, url: str, **options: Any) -> AsyncWsClient:
        """Connect and read the handshake (``options`` as for :class:`WsClient`)."""
        return cls(await asyncio.to_thread(WsClient, url, **options))

    async def send(self, frame: dict[str, Any] | str) -> None:
        await asyncio.to_thread(self.client.send, frame)

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        return await asyncio.to_thread(self.client.recv, timeout)

    async def next_event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5
    ) -> Any:
        return await asyncio.to_thread(self.client.next_event, predicate, timeout)

    async def expect(self, event: str, channel: str | None = None, timeout: float = 5) -> Any:
        return await asyncio.to_thread(self.client.expect, event, channel, timeout)

    async def quiet(self, seconds: float) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.client.quiet, seconds)

    async def subscribe(
        self,
        channel: str,
        user_id: str | None = None,
        user_info: Any = NO_INFO,
        timeout: float = 10,
    ) -> Any:
        """:meth:`WsClient.subscribe`: the ``subscription_succeeded`` frame."""
        return await asyncio.to_thread(self.client.subscribe, channel, user_id, user_info, timeout)

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)

    async def __aenter__(self) -> AsyncWsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def api_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    params: dict[str, str] | None = None,
    timestamp: int | None = None,
    key: str = APP_KEY,
    secret: str = APP_SECRET,
    body_md5: str | None = None,
    signature: str | None = None,
) -> requests.Response:
    """A request signed per protocol §3.2, each part overridable to break it on purpose."""
    query = dict(params or {})
    query.update(
        auth_key=key,
        auth_timestamp=str(int(time.time()) if timestamp is None else timestamp),
        auth_version="1.0",
    )
    if body is not None:
        query["body_md5"] = body_md5 or hashlib.md5(body).hexdigest()
    canonical = "&".join(f"{k}={query[k]}" for k in sorted(query))
    to_sign = f"{method}\n{path}\n{canonical}"
    query["auth_signature"] = (
        signature or hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    )
    headers = {"Content-Type": "application/json"} if body is not None else {}
    return requests.request(
        method,
        f"http://127.0.0.1:{port}{path}",
        params=query,
        data=body,
        headers=headers,
        timeout=10,
    )
