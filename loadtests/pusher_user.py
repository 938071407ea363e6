"""Locust users that speak the Pusher Channels protocol (version 7) to presence-gateway.

Locust has no WebSocket user, so :class:`PusherUser` (a plain ``locust.User``) drives
``websockets.sync.client`` (which works under locust's gevent patching) and reports every
request/response exchange itself with ``environment.events.request.fire``. Frames are built
with the gateway's sans-I/O helpers (:func:`gateway.protocol.messages.compact_json`, the exact
text that is signed) and subscriptions are authorized locally with the app secret
(:func:`gateway.protocol.auth.sign_channel`), as an app's auth endpoint would. HTTP API calls
are signed like the official server libraries (:func:`gateway.protocol.auth.sign_api_request`)
and timed around their own ``requests`` session.

Scenarios (one user class each; pick them by class name on locust's command line):

``IdleUser``            connect-and-idle: one socket, one presence channel, a ``pusher:ping``
                        after every activity timeout of silence (as pusher-js does).
``PresenceChurnUser``   presence churn: a watcher socket stays in a presence channel while a
                        second socket joins and leaves it in a loop; join and leave are timed
                        until the watcher sees ``member_added`` / ``member_removed``.
``ClientEventUser``     client events between members of a presence channel: a ``client-load``
                        addressed to a random other member, timed until its ``client-load-ack``.
``FanoutSubscriber``    subscribes to a public ``fanout-N`` channel and reports every received
                        event's delivery latency (receive time minus the publisher's timestamp).
``HttpPublisher``       triggers those events through ``POST /apps/{id}/events``.
``ReadApiUser``         the read side: ``GET channels``, ``GET channel``, ``GET users``.

Request names reported (type ``WS`` or ``HTTP``): ``connect``, ``subscribe``,
``presence join``, ``presence join (seen by member)``, ``presence leave``, ``ping``,
``client event round trip``, ``fan-out delivery``, ``connection lost``, ``POST events``,
``GET channels``, ``GET channel``, ``GET users``.

Settings come from ``PG_LOAD_*`` environment variables (see :class:`Settings`); every wait is
bounded by ``PG_LOAD_TIMEOUT`` and only loopback hosts are accepted.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import requests
from locust import User, constant, task
from locust.env import Environment
from locust.exception import RescheduleTask
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from gateway.config import AppConfig
from gateway.protocol.auth import sign_api_request, sign_channel
from gateway.protocol.messages import compact_json
from loadtests.hosts import check_loopback

__all__ = [
    "COUNTERS",
    "ClientEventUser",
    "FanoutSubscriber",
    "Frame",
    "HttpPublisher",
    "IdleUser",
    "PresenceChurnUser",
    "PusherConnection",
    "PusherUser",
    "ReadApiUser",
    "Settings",
    "check_loopback",
    "parse_server_frame",
    "settings",
]

#: Process-wide tallies the locustfile writes out at test stop (fan-out delivered vs expected).
COUNTERS: collections.Counter[str] = collections.Counter()

#: Client events a connection may send per sliding second (the gateway accepts 10).
CLIENT_EVENT_BUDGET = 9


class ProtocolError(Exception):
    """The server sent something the protocol does not allow here (or a ``pusher:error``)."""


class HttpStatusError(Exception):
    """An HTTP API call answered with a status other than 200."""


class DeliveryGap(Exception):
    """A subscriber missed events of one publisher (its sequence numbers jumped)."""


# ------------------------------------------------------------------------------- settings


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw else default


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw else default


@dataclass(frozen=True, slots=True)
class Settings:
    """Load-test knobs, read once from the environment.

    Attributes:
        hosts: Gateway base URLs (``PG_LOAD_HOSTS``, comma-separated; default: locust's
            ``--host``). Users spread over them by index, so with two nodes members of one
            channel sit on different nodes.
        app: ``PG_LOAD_APP`` as ``ID:KEY:SECRET`` (default ``1:app-key:app-secret``).
        timeout: Seconds any single exchange may take before it fails (``PG_LOAD_TIMEOUT``).
        group_size: Users of one class sharing a presence channel (``PG_LOAD_GROUP_SIZE``);
            at most 50 (a presence channel holds 100 members and churn users hold two).
        activity_timeout: Seconds of silence before an idle user pings
            (``PG_LOAD_ACTIVITY_TIMEOUT``; 0 = what the server announces, 120 by default).
        churn_pause: Upper bound of the random pause between churn cycles
            (``PG_LOAD_CHURN_PAUSE``; 0 = a storm).
        client_event_interval: Mean seconds between a member's client events
            (``PG_LOAD_CLIENT_EVENT_INTERVAL``).
        publish_interval: Seconds between one publisher's triggers
            (``PG_LOAD_PUBLISH_INTERVAL``).
        fanout_channels: Public ``fanout-N`` channels subscribers spread over
            (``PG_LOAD_FANOUT_CHANNELS``).
        payload_bytes: Padding added to each published event (``PG_LOAD_PAYLOAD_BYTES``).
        read_interval: Seconds between one reader's rounds of GETs (``PG_LOAD_READ_INTERVAL``).
    """

    hosts: tuple[str, ...]
    app: AppConfig
    timeout: float
    group_size: int
    activity_timeout: float
    churn_pause: float
    client_event_interval: float
    publish_interval: float
    fanout_channels: int
    payload_bytes: int
    read_interval: float

    @classmethod
    def from_env(cls) -> Settings:
        """Read every ``PG_LOAD_*`` variable; raise ValueError naming a bad one."""
        hosts = tuple(h.strip().rstrip("/") for h in os.environ.get("PG_LOAD_HOSTS", "").split(","))
        hosts = tuple(h for h in hosts if h)
        for host in hosts:
            problem = check_loopback(host)
            if problem:
                raise ValueError(f"PG_LOAD_HOSTS: {problem}")
        app_id, key, secret = os.environ.get("PG_LOAD_APP", "1:app-key:app-secret").split(":")
        group_size = _env_int("PG_LOAD_GROUP_SIZE", 10)
        if not 1 <= group_size <= 50:
            raise ValueError(f"PG_LOAD_GROUP_SIZE must be 1..50, got {group_size}")
        return cls(
            hosts=hosts,
            app=AppConfig(id=app_id, key=key, secret=secret),
            timeout=_env_float("PG_LOAD_TIMEOUT", 10.0),
            group_size=group_size,
            activity_timeout=_env_float("PG_LOAD_ACTIVITY_TIMEOUT", 0.0),
            churn_pause=_env_float("PG_LOAD_CHURN_PAUSE", 0.25),
            client_event_interval=max(0.2, _env_float("PG_LOAD_CLIENT_EVENT_INTERVAL", 1.0)),
            publish_interval=_env_float("PG_LOAD_PUBLISH_INTERVAL", 0.2),
            fanout_channels=max(1, _env_int("PG_LOAD_FANOUT_CHANNELS", 2)),
            payload_bytes=max(0, _env_int("PG_LOAD_PAYLOAD_BYTES", 100)),
            read_interval=_env_float("PG_LOAD_READ_INTERVAL", 0.2),
        )


@functools.cache
def settings() -> Settings:
    """The settings of this locust process (read from the environment on first use)."""
    return Settings.from_env()


# ------------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Frame:
    """One server frame.

    Attributes:
        event: The ``event`` name.
        channel: The ``channel``, or None.
        data: ``data`` decoded: Pusher double-encodes it as a JSON string, which is decoded
            again when it holds JSON (otherwise the string is kept).
        user_id: The sender of a client event on a presence channel, or None.
        size: Length of the frame's text.
    """

    event: str
    channel: str | None
    data: Any
    user_id: str | None
    size: int


def parse_server_frame(text: str) -> Frame:
    """Decode one server text frame; raise ProtocolError when it is not a Pusher frame."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"frame is not JSON: {text[:200]!r}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        raise ProtocolError(f"frame without an event name: {text[:200]!r}")
    data = obj.get("data")
    if isinstance(data, str) and data[:1] in ("{", "["):
        with contextlib.suppress(ValueError):
            data = json.loads(data)
    return Frame(obj["event"], obj.get("channel"), data, obj.get("user_id"), len(text))


def _is_error(frame: Frame) -> bool:
    return frame.event in ("pusher:error", "pusher:subscription_error")


class PusherConnection:
    """One Pusher protocol-7 WebSocket, synchronous (run inside a locust greenlet).

    ``open`` connects and reads ``pusher:connection_established``; ``recv`` returns parsed
    frames and answers server pings itself. The ``websockets`` connection is entered as a
    context manager and left by ``close``.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.socket_id = ""
        self.activity_timeout = 120.0
        self.last_received = time.monotonic()
        self._stack = contextlib.ExitStack()
        self._ws: ClientConnection | None = None
        self._client_events: collections.deque[float] = collections.deque()

    def open(self) -> Frame:
        """Connect and wait for the handshake (bounded by ``timeout``)."""
        self._ws = self._stack.enter_context(
            connect(
                self.url,
                open_timeout=self.timeout,
                close_timeout=2,
                compression=None,
                max_size=2**20,
                max_queue=1024,
            )
        )
        hello = self.recv(self.timeout)
        if hello is None:
            raise TimeoutError(f"no pusher:connection_established within {self.timeout} s")
        if hello.event != "pusher:connection_established" or not isinstance(hello.data, dict):
            raise ProtocolError(f"expected pusher:connection_established, got {hello}")
        self.socket_id = str(hello.data["socket_id"])
        self.activity_timeout = float(hello.data.get("activity_timeout", 120))
        return hello

    def send(self, event: str, data: Any, channel: str | None = None) -> int:
        """Send one frame; returns its length."""
        if self._ws is None:
            raise ConnectionError("not connected")
        frame: dict[str, Any] = {"event": event, "data": data}
        if channel is not None:
            frame["channel"] = channel
        text = compact_json(frame)
        self._ws.send(text)
        return len(text)

    def send_client_event(self, event: str, channel: str, data: Any) -> int:
        """Send a ``client-*`` event, pacing to stay under the gateway's 10 per second."""
        now = time.monotonic()
        while self._client_events and now - self._client_events[0] >= 1.0:
            self._client_events.popleft()
        if len(self._client_events) >= CLIENT_EVENT_BUDGET:
            gevent.sleep(max(0.0, 1.0 - (now - self._client_events[0])) + 0.01)
            self._client_events.popleft()
        self._client_events.append(time.monotonic())
        return self.send(event, compact_json(data), channel)

    def recv(self, timeout: float) -> Frame | None:
        """The next frame, or None when none arrives within ``timeout`` seconds."""
        if self._ws is None:
            raise ConnectionError("not connected")
        try:
            text = self._ws.recv(timeout=max(timeout, 0.0))
        except TimeoutError:
            return None
        self.last_received = time.monotonic()
        if not isinstance(text, str):
            raise ProtocolError("binary frame from the server")
        frame = parse_server_frame(text)
        if frame.event == "pusher:ping":
            self.send("pusher:pong", {})
        return frame

    def close(self) -> None:
        """Close the socket (close handshake bounded by 2 s); never raises."""
        with contextlib.suppress(Exception):
            self._stack.close()
        self._ws = None


def subscribe_payload(
    app: AppConfig, socket_id: str, channel: str, user_id: str | None = None
) -> dict[str, str]:
    """``pusher:subscribe`` data, authorized locally as the app's auth endpoint would."""
    if channel.startswith("presence-"):
        channel_data = compact_json({"user_id": user_id, "user_info": {"name": user_id}})
        auth = sign_channel(app, socket_id, channel, channel_data)
        return {"channel": channel, "auth": auth, "channel_data": channel_data}
    if channel.startswith("private-"):
        return {"channel": channel, "auth": sign_channel(app, socket_id, channel)}
    return {"channel": channel, "auth": ""}


# ------------------------------------------------------------------------------- base user


class Exchange:
    """One timed request/response exchange (see :meth:`PusherUser.exchange`)."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.length = 0
        self.cancelled = False

    def cancel(self) -> None:
        """Do not report this exchange (its counterpart went away; not a failure)."""
        self.cancelled = True


_INDEXES: dict[str, Iterator[int]] = {}


class PusherUser(User):
    """Base class: connections, timed exchanges, frame pumping and signed HTTP API calls.

    Subclasses implement :meth:`setup` (open connections, subscribe; rerun after a failure)
    and :meth:`cycle` (one bounded round of work, pauses included: ``wait_time`` is 0 so the
    sockets are read during pauses), and may override :meth:`on_frame` for unsolicited frames.
    """

    abstract = True
    wait_time = constant(0)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.settings = settings()
        name = type(self).__name__
        #: Index of this user among users of its class in this process.
        self.index = next(_INDEXES.setdefault(name, itertools.count()))
        #: Presence channel group: ``group_size`` consecutive users share one channel.
        self.channel_group = self.index // self.settings.group_size
        self.uid = f"{name[:6].lower()}-{os.getpid()}-{self.index}"
        self.connections: list[PusherConnection] = []
        self.ready = False
        self._retry_at = 0.0

    # -- addresses

    def base_url(self, offset: int = 0) -> str:
        """This user's gateway (``offset`` picks the next node, for cross-node checks)."""
        hosts = self.settings.hosts or ((self.host or "http://127.0.0.1:6001").rstrip("/"),)
        return hosts[(self.index + offset) % len(hosts)]

    def ws_url(self, offset: int = 0) -> str:
        """``ws://host:port/app/{key}?protocol=7…`` of this user's gateway."""
        base = self.base_url(offset)
        scheme = "wss" if base.startswith("https:") else "ws"
        rest = base.split("://", 1)[1]
        key = self.settings.app.key
        return f"{scheme}://{rest}/app/{key}?protocol=7&client=locust-pusher&version=0.1"

    # -- reporting

    def fire(
        self,
        name: str,
        response_time: float,
        length: int = 0,
        exception: BaseException | None = None,
        request_type: str = "WS",
    ) -> None:
        """Report one exchange to locust (``response_time`` in milliseconds)."""
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=response_time,
            response_length=length,
            exception=exception,
            context={},
        )

    @contextlib.contextmanager
    def exchange(
        self, name: str, request_type: str = "WS", start: float | None = None
    ) -> Iterator[Exchange]:
        """Time the block as one exchange named ``name``.

        Success is reported when the block ends (unless cancelled). An exception is reported
        as this exchange's failure; the user's connections are then dropped (their state is
        unknown) and the task is rescheduled, so the next cycle starts over with ``setup``.
        """
        ex = Exchange(time.perf_counter() if start is None else start)
        try:
            yield ex
        except RescheduleTask:
            raise
        except Exception as exc:
            elapsed = (time.perf_counter() - ex.start) * 1000
            self.fire(name, elapsed, ex.length, exc, request_type)
            self.reset()
            raise RescheduleTask() from exc
        if not ex.cancelled:
            self.fire(name, (time.perf_counter() - ex.start) * 1000, ex.length, None, request_type)

    # -- connection lifecycle

    def reset(self) -> None:
        """Drop every connection; ``setup`` runs again after a one-second back-off."""
        for conn in self.connections:
            conn.close()
        self.connections.clear()
        self.ready = False
        self._retry_at = time.monotonic() + 1.0

    def setup(self) -> None:
        """Open connections and subscribe (override)."""

    def cycle(self) -> None:
        """One bounded round of work (override)."""
        raise NotImplementedError

    @task
    def run_cycle(self) -> None:
        """The only task: (re)run ``setup`` when needed, then one ``cycle``."""
        if not self.ready:
            delay = self._retry_at - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            self.setup()
            self.ready = True
        self.cycle()

    def on_stop(self) -> None:
        """Close every socket when locust stops this user."""
        self.reset()

    def open_connection(self, offset: int = 0) -> PusherConnection:
        """Connect, timed as ``connect`` until ``pusher:connection_established``."""
        conn = PusherConnection(self.ws_url(offset), self.settings.timeout)
        self.connections.append(conn)
        with self.exchange("connect") as ex:
            ex.length = conn.open().size
        return conn

    def subscribe(
        self,
        conn: PusherConnection,
        channel: str,
        user_id: str | None = None,
        name: str = "subscribe",
    ) -> Frame:
        """Subscribe, timed as ``name`` until ``pusher_internal:subscription_succeeded``."""
        with self.exchange(name) as ex:
            payload = subscribe_payload(self.settings.app, conn.socket_id, channel, user_id)
            conn.send("pusher:subscribe", payload)
            frame = self.wait_for(conn, _succeeded(channel))
            ex.length = frame.size
        return frame

    # -- reading

    def on_frame(self, conn: PusherConnection, frame: Frame) -> None:
        """Handle a frame as it is read (override); called for every frame."""

    def wait_for(
        self,
        conn: PusherConnection,
        match: Callable[[Frame], bool],
        abort: Callable[[Frame], bool] | None = None,
    ) -> Frame:
        """Read ``conn`` until a frame matches (or ``abort`` matches: then return it).

        Every frame goes through :meth:`on_frame` first. ``pusher:error`` and
        ``pusher:subscription_error`` raise ProtocolError; no match within the timeout
        raises TimeoutError.
        """
        deadline = time.monotonic() + self.settings.timeout
        while (left := deadline - time.monotonic()) > 0:
            frame = conn.recv(left)
            if frame is None:
                continue
            self.on_frame(conn, frame)
            if _is_error(frame):
                raise ProtocolError(f"{frame.event}: {frame.data}")
            if match(frame) or (abort is not None and abort(frame)):
                return frame
        raise TimeoutError(f"no matching frame within {self.settings.timeout} s")

    def pump(self, conns: Sequence[PusherConnection], duration: float) -> None:
        """Read every connection for ``duration`` seconds, handing frames to ``on_frame``.

        A closed connection is reported as a ``connection lost`` failure.
        """
        deadline = time.monotonic() + duration
        try:
            while (left := deadline - time.monotonic()) > 0:
                got = False
                for conn in conns:
                    # One socket: block up to the deadline; several: poll each in short slices.
                    frame = conn.recv(left if len(conns) == 1 else min(left, 0.02))
                    if frame is not None:
                        got = True
                        self.on_frame(conn, frame)
                        if _is_error(frame):
                            raise ProtocolError(f"{frame.event}: {frame.data}")
                if not got and len(conns) > 1:
                    gevent.sleep(0)
        except (ConnectionClosed, ConnectionError, ProtocolError) as exc:
            self.fire("connection lost", 0, 0, exc)
            self.reset()
            raise RescheduleTask() from exc

    # -- HTTP API

    def api(
        self,
        method: str,
        path: str,
        *,
        name: str,
        params: dict[str, str] | None = None,
        body: Any = None,
        session: requests.Session,
    ) -> Any:
        """A signed HTTP API call timed as ``name`` (type ``HTTP``); returns the JSON body.

        Signed like the node library: ``body_md5`` only when there is a body (some servers,
        sockudo among them, refuse the python library's ``body_md5`` on a GET).
        """
        raw = b"" if body is None else compact_json(body).encode()
        query = sign_api_request(
            self.settings.app, method, path, params or {}, raw, int(time.time()), always_md5=False
        )
        headers = {"Content-Type": "application/json"} if body is not None else {}
        with self.exchange(name, request_type="HTTP") as ex:
            response = session.request(
                method,
                self.base_url() + path,
                params=query,
                data=raw or None,
                headers=headers,
                timeout=self.settings.timeout,
            )
            ex.length = len(response.content)
            if response.status_code != 200:
                raise HttpStatusError(f"{response.status_code}: {response.text[:200]}")
            return response.json()


def _succeeded(channel: str) -> Callable[[Frame], bool]:
    return lambda f: f.event == "pusher_internal:subscription_succeeded" and f.channel == channel


def _member_event(event: str, channel: str, user_id: str) -> Callable[[Frame], bool]:
    def match(frame: Frame) -> bool:
        return (
            frame.event == event
            and frame.channel == channel
            and isinstance(frame.data, dict)
            and frame.data.get("user_id") == user_id
        )

    return match


# ------------------------------------------------------------------------------- scenarios


class IdleUser(PusherUser):
    """Connect-and-idle: holds a socket in ``presence-idle-<group>`` and keeps it alive.

    Like pusher-js, it sends ``pusher:ping`` after ``activity_timeout`` seconds without any
    frame from the server (the server's announced value, or ``PG_LOAD_ACTIVITY_TIMEOUT``) and
    times the ``pusher:pong`` as ``ping``; server pings are answered with ``pusher:pong``.
    """

    weight = 4

    def setup(self) -> None:
        """One socket, one presence membership (``presence join``)."""
        conn = self.open_connection()
        self.subscribe(conn, f"presence-idle-{self.channel_group}", self.uid, name="presence join")

    def cycle(self) -> None:
        """Read until the activity timeout has passed in silence, then ping."""
        conn = self.connections[0]
        interval = self.settings.activity_timeout or conn.activity_timeout
        silent_for = time.monotonic() - conn.last_received
        if silent_for < interval:
            self.pump([conn], min(interval - silent_for, 5.0))
            return
        with self.exchange("ping") as ex:
            conn.send("pusher:ping", {})
            ex.length = self.wait_for(conn, lambda f: f.event == "pusher:pong").size


class PresenceChurnUser(PusherUser):
    """Presence churn: join/leave storms over ``presence-churn-<group>`` channels.

    A watcher socket (on the other node when there are two) stays in the channel as
    ``<uid>-w``; a churn socket joins as ``<uid>-c`` and leaves again, every cycle:

    * ``presence join``: subscribe until the churn socket's ``subscription_succeeded``;
    * ``presence join (seen by member)``: from the same subscribe until the watcher reads
      ``member_added`` (the write reached the store and was fanned out);
    * ``presence leave``: unsubscribe until the watcher reads ``member_removed``.

    Then a random pause up to ``PG_LOAD_CHURN_PAUSE`` (0 = storm).
    """

    weight = 2

    def setup(self) -> None:
        """Watcher joins and stays; the churn socket connects."""
        self.channel = f"presence-churn-{self.channel_group}"
        self.member = f"{self.uid}-c"
        self.watcher = self.open_connection(offset=1)
        self.subscribe(self.watcher, self.channel, f"{self.uid}-w", name="presence join")
        self.churner = self.open_connection()

    def cycle(self) -> None:
        """One join, one leave, one pause."""
        app, channel = self.settings.app, self.channel
        with self.exchange("presence join") as joined:
            self.churner.send(
                "pusher:subscribe",
                subscribe_payload(app, self.churner.socket_id, channel, self.member),
            )
            joined.length = self.wait_for(self.churner, _succeeded(channel)).size
        with self.exchange("presence join (seen by member)", start=joined.start) as seen:
            match = _member_event("pusher_internal:member_added", channel, self.member)
            seen.length = self.wait_for(self.watcher, match).size
        with self.exchange("presence leave") as left:
            self.churner.send("pusher:unsubscribe", {"channel": channel})
            match = _member_event("pusher_internal:member_removed", channel, self.member)
            left.length = self.wait_for(self.watcher, match).size
        pause = random.uniform(0, self.settings.churn_pause)
        self.pump([self.watcher, self.churner], pause)


class ClientEventUser(PusherUser):
    """Client events between members of ``presence-chat-<group>``.

    Each cycle reads for about ``PG_LOAD_CLIENT_EVENT_INTERVAL`` seconds, then sends a
    ``client-load`` addressed to a random other member and times it until that member's
    ``client-load-ack`` comes back: ``client event round trip`` (sender -> gateway -> receiver
    -> gateway -> sender, over two sockets of different users). Every member answers events
    addressed to it while it reads. A round trip whose peer left meanwhile is not reported.
    """

    weight = 2

    def setup(self) -> None:
        """Join the group's channel and learn the roster."""
        self.channel = f"presence-chat-{self.channel_group}"
        self.seq = 0
        self.conn = self.open_connection()
        welcome = self.subscribe(self.conn, self.channel, self.uid, name="presence join")
        ids = (
            welcome.data.get("presence", {}).get("ids", [])
            if isinstance(welcome.data, dict)
            else []
        )
        self.roster = {str(i) for i in ids} - {self.uid}

    def on_frame(self, conn: PusherConnection, frame: Frame) -> None:
        """Track the roster; acknowledge client events addressed to this member."""
        if frame.channel != self.channel or not isinstance(frame.data, dict):
            return
        if frame.event == "pusher_internal:member_added":
            self.roster.add(str(frame.data.get("user_id")))
            self.roster.discard(self.uid)
        elif frame.event == "pusher_internal:member_removed":
            self.roster.discard(str(frame.data.get("user_id")))
        elif frame.event == "client-load" and frame.data.get("to") == self.uid:
            ack = {"to": frame.user_id, "seq": frame.data.get("seq")}
            conn.send_client_event("client-load-ack", self.channel, ack)

    def cycle(self) -> None:
        """Read for a while, then one timed round trip to a random peer."""
        interval = self.settings.client_event_interval
        self.pump([self.conn], random.uniform(0.5 * interval, 1.5 * interval))
        if not self.roster:
            return
        peer = random.choice(sorted(self.roster))
        self.seq += 1
        seq = self.seq

        def acked(f: Frame) -> bool:
            return (
                f.event == "client-load-ack"
                and f.user_id == peer
                and isinstance(f.data, dict)
                and f.data.get("to") == self.uid
                and f.data.get("seq") == seq
            )

        gone = _member_event("pusher_internal:member_removed", self.channel, peer)
        with self.exchange("client event round trip") as ex:
            payload = {"to": peer, "seq": seq, "t": time.time()}
            ex.length = self.conn.send_client_event("client-load", self.channel, payload)
            if gone(self.wait_for(self.conn, acked, abort=gone)):
                ex.cancel()


class FanoutSubscriber(PusherUser):
    """Subscribes to public ``fanout-<index % PG_LOAD_FANOUT_CHANNELS>`` and counts events.

    Every ``load`` event is reported as ``fan-out delivery`` with response time = receive time
    minus the ``t`` the publisher put in the data (same host, same clock). A jump in one
    publisher's sequence numbers is reported as a failed delivery (``DeliveryGap``).
    """

    weight = 4

    def setup(self) -> None:
        """One socket, one public channel."""
        self.channel = f"fanout-{self.index % self.settings.fanout_channels}"
        self.last_seq: dict[str, int] = {}
        self.conn = self.open_connection()
        self.subscribe(self.conn, self.channel)

    def on_frame(self, conn: PusherConnection, frame: Frame) -> None:
        """Report deliveries of ``load`` events."""
        if frame.event != "load" or frame.channel != self.channel:
            return
        data = frame.data
        if not isinstance(data, dict) or "t" not in data:
            return
        COUNTERS["fanout_received"] += 1
        latency = max(0.0, (time.time() - float(data["t"])) * 1000)
        publisher, seq = str(data.get("pub")), int(data.get("seq", 0))
        last = self.last_seq.get(publisher)
        self.last_seq[publisher] = max(seq, last or 0)
        gap = None
        if last is not None and seq > last + 1:
            COUNTERS["fanout_gaps"] += seq - last - 1
            gap = DeliveryGap(f"{publisher} on {self.channel}: {last} -> {seq}")
        self.fire("fan-out delivery", latency, frame.size, gap)

    def cycle(self) -> None:
        """Read for one second."""
        self.pump([self.conn], 1.0)


class HttpPublisher(PusherUser):
    """Triggers ``load`` events on the ``fanout-N`` channels over the HTTP API.

    ``POST events`` every ``PG_LOAD_PUBLISH_INTERVAL`` seconds, round-robin over the channels,
    with ``info=subscription_count`` so the expected number of deliveries is known; the data
    carries the publisher id, a per-channel sequence number, the send time ``t`` and
    ``PG_LOAD_PAYLOAD_BYTES`` of padding.
    """

    weight = 1

    def setup(self) -> None:
        """A keep-alive HTTP session."""
        self.session = requests.Session()
        self.seqs: collections.Counter[str] = collections.Counter()
        self.turn = itertools.count(self.index)

    def cycle(self) -> None:
        """One trigger, one pause."""
        channel = f"fanout-{next(self.turn) % self.settings.fanout_channels}"
        seq = self.seqs[channel] + 1
        data = {
            "pub": self.uid,
            "seq": seq,
            "t": time.time(),
            "pad": "x" * self.settings.payload_bytes,
        }
        body = {
            "name": "load",
            "channels": [channel],
            "data": compact_json(data),
            "info": "subscription_count",
        }
        path = f"/apps/{self.settings.app.id}/events"
        reply = self.api("POST", path, name="POST events", body=body, session=self.session)
        self.seqs[channel] = seq
        counts = reply.get("channels", {}) if isinstance(reply, dict) else {}
        COUNTERS["fanout_triggered"] += 1
        COUNTERS["fanout_expected"] += int(counts.get(channel, {}).get("subscription_count", 0))
        gevent.sleep(self.settings.publish_interval)

    def on_stop(self) -> None:
        """Close the HTTP session."""
        with contextlib.suppress(AttributeError):
            self.session.close()
        super().on_stop()


class ReadApiUser(PusherUser):
    """The read side: ``GET channels`` (presence, with ``user_count``), then ``GET channel``
    and ``GET users`` of one of the channels it listed, every ``PG_LOAD_READ_INTERVAL`` s.

    Pair it with users that hold presence memberships (``IdleUser``) so the answers are not
    empty.
    """

    weight = 1

    def setup(self) -> None:
        """A keep-alive HTTP session."""
        self.session = requests.Session()

    def cycle(self) -> None:
        """One round of GETs, one pause."""
        app_id = self.settings.app.id
        listing = self.api(
            "GET",
            f"/apps/{app_id}/channels",
            name="GET channels",
            params={"filter_by_prefix": "presence-", "info": "user_count"},
            session=self.session,
        )
        names = sorted(listing.get("channels", {})) if isinstance(listing, dict) else []
        if names:
            channel = random.choice(names)
            self.api(
                "GET",
                f"/apps/{app_id}/channels/{channel}",
                name="GET channel",
                params={"info": "user_count"},
                session=self.session,
            )
            self.api(
                "GET",
                f"/apps/{app_id}/channels/{channel}/users",
                name="GET users",
                session=self.session,
            )
        gevent.sleep(self.settings.read_interval)

    def on_stop(self) -> None:
        """Close the HTTP session."""
        with contextlib.suppress(AttributeError):
            self.session.close()
        super().on_stop()
