"""Gateway configuration: apps and node settings from TOML, environment and flags, validated.

Precedence, highest first: command-line flags, ``GATEWAY_*`` environment variables, the TOML
file given with ``--config``, built-in defaults. Every error names the setting at fault.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.protocol.limits import Limits

__all__ = [
    "APP_LIMITS",
    "DEFAULT_APP",
    "WEBHOOK_EVENTS",
    "AppConfig",
    "ConfigError",
    "NodeConfig",
    "WebhookEndpoint",
    "load_apps_file",
    "load_config",
    "parse_app",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting."""


#: Webhook events an endpoint can subscribe to.
WEBHOOK_EVENTS = (
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
    "subscription_count",
)
#: Header fields the gateway sets itself on a webhook request (lower case).
_RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "host", "connection", "transfer-encoding",
     "x-pusher-key", "x-pusher-signature"}
)  # fmt: skip
_HEADER_NAME = re.compile(r"\A[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}\Z")


@dataclass(frozen=True)
class WebhookEndpoint:
    """One place an app's webhooks go.

    Attributes:
        url: Where they are POSTed (http or https).
        event_types: Events sent there (empty: every event).
        channel_prefixes: Only events of channels starting with one of these (empty: all).
        headers: Extra header fields sent with each request (their values are never logged).
    """

    url: str
    event_types: tuple[str, ...] = ()
    channel_prefixes: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()

    def wants(self, event: str, channel: str) -> bool:
        """Whether ``event`` on ``channel`` goes to this endpoint."""
        if self.event_types and event not in self.event_types:
            return False
        return not self.channel_prefixes or channel.startswith(self.channel_prefixes)


def _endpoint(raw: Any, where: str) -> WebhookEndpoint:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table (url, event_types, channel_prefixes, headers)")
    unknown = set(raw) - {"url", "event_types", "channel_prefixes", "headers"}
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {sorted(unknown)}")
    url = raw.get("url")
    if not isinstance(url, str) or not re.match(r"\Ahttps?://[^\s/]+\S*\Z", url):
        raise ConfigError(f"{where}.url: must be an http(s) URL, got {url!r}")
    events = raw.get("event_types", [])
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise ConfigError(f"{where}.event_types: must be a list of event names")
    bad = sorted(set(events) - set(WEBHOOK_EVENTS))
    if bad:
        raise ConfigError(f"{where}.event_types: unknown {bad}; known: {', '.join(WEBHOOK_EVENTS)}")
    prefixes = raw.get("channel_prefixes", [])
    if not isinstance(prefixes, list) or not all(isinstance(x, str) and x for x in prefixes):
        raise ConfigError(f"{where}.channel_prefixes: must be a list of non-empty strings")
    headers = raw.get("headers", {})
    if not isinstance(headers, dict):
        raise ConfigError(f"{where}.headers: must be a table of header fields")
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ConfigError(f"{where}.headers: {name!r} is not a header field name")
        if name.lower() in _RESERVED_HEADERS:
            raise ConfigError(f"{where}.headers: {name} is set by the gateway")
        if not isinstance(value, str) or len(value) > 8192 or any(ch in value for ch in "\r\n\0"):
            raise ConfigError(
                f"{where}.headers.{name}: must be text of at most 8192 characters on one line"
            )
    return WebhookEndpoint(
        url, tuple(events), tuple(prefixes), tuple(sorted((str(k), v) for k, v in headers.items()))
    )


@dataclass(frozen=True)
class AppConfig:
    """One Pusher app.

    Attributes:
        id: Numeric app id (the official Python server library accepts only digits).
        key: Public key, used by clients in ``/app/{key}``.
        secret: Signing secret.
        webhook_url: Where webhooks are POSTed (every event); None: only ``webhooks``.
        client_events: Whether ``client-*`` events are accepted.
        subscription_count: Whether subscription counting (``pusher_internal:subscription_count``
            events and the ``subscription_count`` attribute) is on.
        max_connections: Connections this app may hold on all nodes together, counted in the
            store (0 = unlimited). Over it a connection is closed with 4100.
        webhook_batching: Send up to 20 webhook events per request, collected for up to
            250 ms (what Pusher does); off: one event per request.
        webhooks: More endpoints, each with its own filters and headers.
        watchlist_events: Whether signed-in users are tracked as online across the cluster
            and watchlists get ``pusher_internal:watchlist_events`` (one store write per
            user's first and last signed-in socket on a node).
        max_presence_members: Distinct users per presence channel (subscription_error 4100).
        max_user_info_bytes: Largest presence or sign-in ``user_info`` as compact JSON.
        max_event_payload_bytes: Largest event ``data``: HTTP 413 for triggers, ``pusher:error``
            for client events.
        max_channels_per_trigger: Channels in one ``POST events`` (HTTP 400 above).
        max_channel_name_length: Longest channel name (subscription refused, HTTP 400).
        client_events_per_second: Client events per connection per sliding second
            (``pusher:error`` 4301 above).
        api_requests_per_second: HTTP API requests per second for the app over all nodes
            (HTTP 429 above; 0 = unlimited).
    """

    id: str
    key: str
    secret: str
    webhook_url: str | None = None
    client_events: bool = True
    subscription_count: bool = True
    max_connections: int = 0
    webhook_batching: bool = True
    watchlist_events: bool = True
    max_presence_members: int = 100
    max_user_info_bytes: int = 1_024
    max_event_payload_bytes: int = 10_240
    max_channels_per_trigger: int = 100
    max_channel_name_length: int = 200
    client_events_per_second: int = 10
    api_requests_per_second: int = 0
    webhooks: tuple[WebhookEndpoint, ...] = ()

    @property
    def endpoints(self) -> tuple[WebhookEndpoint, ...]:
        """Every webhook endpoint: ``webhook_url`` (all events) and ``webhooks``."""
        if self.webhook_url is None:
            return self.webhooks
        return (WebhookEndpoint(self.webhook_url), *self.webhooks)

    @property
    def max_frame_bytes(self) -> int:
        """Largest client text frame parsed for this app: 32 KiB, or more when the app's
        payload or ``user_info`` limit needs it (JSON escaping can double them)."""
        return max(32_768, 2 * max(self.max_event_payload_bytes, self.max_user_info_bytes) + 4096)

    def limits(self, base: Limits | None = None) -> Limits:
        """``base`` (the node's protocol limits; default: the documented defaults) with this
        app's limits in force."""
        if base is None:
            from gateway.protocol.limits import DEFAULT_LIMITS

            base = DEFAULT_LIMITS
        return _app_limits(self, base)


#: Per-app limits: (lowest, highest) accepted value. 0 means "unlimited" where it is allowed.
APP_LIMITS: dict[str, tuple[int, int]] = {
    "max_connections": (0, 100_000_000),
    "max_presence_members": (1, 10_000),
    "max_user_info_bytes": (2, 65_536),
    "max_event_payload_bytes": (1, 1_048_576),
    "max_channels_per_trigger": (1, 1_000),
    "max_channel_name_length": (1, 200),
    "client_events_per_second": (1, 10_000),
    "api_requests_per_second": (0, 1_000_000),
}


@functools.lru_cache(maxsize=4096)
def _app_limits(app: AppConfig, base: Limits) -> Limits:
    return replace(
        base,
        max_frame_bytes=max(base.max_frame_bytes, app.max_frame_bytes),
        max_event_data_bytes=app.max_event_payload_bytes,
        max_presence_members=app.max_presence_members,
        max_user_info_bytes=app.max_user_info_bytes,
        max_channel_name_length=app.max_channel_name_length,
        client_events_per_second=app.client_events_per_second,
        max_channels_per_trigger=app.max_channels_per_trigger,
    )


#: The app ``presence-gateway dev`` serves (numeric id: the official Python library requires it).
DEFAULT_APP = AppConfig(id="1", key="app-key", secret="app-secret")

_APP_ID = re.compile(r"\A[0-9]+\Z")
_TOKEN = re.compile(r"\A[A-Za-z0-9_\-.]+\Z")


def _check_app(app: AppConfig, where: str) -> AppConfig:
    if not _APP_ID.match(app.id):
        raise ConfigError(f"{where}: app id must be all digits, got {app.id!r}")
    for name in ("key", "secret"):
        value = getattr(app, name)
        if not isinstance(value, str) or not _TOKEN.match(value):
            raise ConfigError(f"{where}: app {name} must match [A-Za-z0-9_.-]+, got {value!r}")
    if app.webhook_url is not None and not re.match(r"\Ahttps?://[^\s/]+", app.webhook_url):
        raise ConfigError(f"{where}: webhook_url must be an http(s) URL, got {app.webhook_url!r}")
    for name, (low, high) in APP_LIMITS.items():
        value = getattr(app, name)
        if type(value) is not int or not low <= value <= high:
            raise ConfigError(f"{where}.{name}: must be an integer {low}..{high}, got {value!r}")
    return app


def parse_app(text: str, *, where: str = "--app") -> AppConfig:
    """Parse ``ID:KEY:SECRET``.

    Raises:
        ConfigError: Wrong shape, non-numeric id, or characters outside ``[A-Za-z0-9_.-]``.
    """
    parts = text.split(":")
    if len(parts) != 3:
        raise ConfigError(f"{where}: expected ID:KEY:SECRET, got {text!r}")
    return _check_app(AppConfig(id=parts[0], key=parts[1], secret=parts[2]), where)


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class NodeConfig:
    """Settings of one gateway node.

    Attributes:
        host: Bind address (loopback by default).
        port: TCP port for WebSocket, HTTP API, ``/metrics`` and ``/health``.
        node_id: Stable name of this node; entries it writes carry it with an incarnation.
        topology: Path of a ``topology.json``.
        apps: Apps served; the default app when none is given.
        activity_timeout: Seconds of client silence before the server pings (sent to clients).
        write_timeout: Seconds a write may wait for its shard before failing to its caller.
        webhook_hold_ms: Hold of ``member_removed`` / ``channel_vacated`` webhooks.
        max_message_bytes: Largest WebSocket message accepted from a client.
        lease_ms: How long this node's lease on a shard lasts past each refresh; a node that
            stops refreshing is invisible to reads after it and reaped soon after.
        lease_interval: Seconds between lease refreshes.
        reap_interval: Seconds between reaper passes on each shard.
        anti_entropy_interval: Seconds between digest checks of this node's state on a shard
            (they also refresh its entries' expiry).
        entry_ttl_ms: Expiry of every entry unless refreshed (must exceed 2 x the anti-entropy
            interval).
        reap_grace_ms: How long after its lease expired a node may still refresh it before
            other nodes remove its members (and, after a shard was unreachable, how long every
            node gets to refresh before anyone counts as gone).
        loop_stall_limit: Seconds without any progress of the event loop after which the node
            stops refreshing its lease (it can no longer serve; its members are removed).
        max_client_connections: TCP connections (WebSocket and HTTP) this node accepts; 0 = as
            many as the open-file limit allows after ``reserved_fds``.
        reserved_fds: File descriptors kept for Redis, Sentinel, webhooks and the process.
        max_connections_per_ip: Connections from one client address; 0 = unlimited.
        handshakes_per_ip: WebSocket handshakes per second from one client address (a token
            bucket); 0 = unlimited.
        handshake_burst_per_ip: Handshakes one address may make at once before the rate
            applies.
        trusted_proxies: Addresses or networks (CIDR) of load balancers whose
            ``X-Forwarded-For`` names the client address used by the per-address limits.
        request_header_timeout: Seconds a client has to send a request's head, from its first
            byte (or from the connection's start).
        request_body_timeout: Seconds a client has to send a request's body after its head.
        max_request_bytes: Largest HTTP request body.
        max_pending_request_bytes: Request bytes buffered over all unfinished requests.
        response_send_timeout: Seconds a connection may leave responses unread before it is
            closed.
        subscribes_per_second: Subscriptions one WebSocket may start per second.
        subscribe_burst: Subscriptions one WebSocket may start at once.
        client_work_budget: Client messages handled per event-loop iteration; the rest wait
            (their sockets are not read) until the next one.
        shed_lag: Event-loop lag in seconds above which the node sheds load: it refuses new
            connections (503) and reports not ready until the lag is back down.
        housekeeping_interval: Seconds between passes that size the channel tables to their
            content and return free heap memory to the system.
        tls_cert: PEM certificate (chain) of the public listener; with ``tls_key``, the port
            speaks TLS (``wss://`` and ``https://``).
        tls_key: PEM private key of ``tls_cert``.
        drain_delay: Seconds a draining node (SIGTERM) keeps accepting connections after
            ``/ready`` turned 503, so that load balancers notice first.
        drain_window: Seconds over which a draining node closes its sockets (4200, pusher-js
            reconnects at once), evenly, not in one burst.
        drain_handover: Seconds a draining node keeps its presence members after its last
            socket closed, so that users who reconnect elsewhere are not announced as gone.
        admin_port: A second listener for ``/metrics``, ``/health``, ``/live`` and ``/ready``
            only (0 = none); when set, the public port no longer serves ``/metrics``.
        admin_host: Bind address of the admin listener (default: ``host``).
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        log_format: ``text``, or ``json`` (one object per line: ``ts``, ``level``, ``logger``,
            ``msg``, ``node`` and, on operational lines, ``shard``, ``server``, ``reason``...).
    """

    host: str = "127.0.0.1"
    port: int = 6001
    node_id: str = field(default_factory=_default_node_id)
    topology: str | None = None
    apps: tuple[AppConfig, ...] = (DEFAULT_APP,)
    activity_timeout: int = 120
    write_timeout: float = 30.0
    webhook_hold_ms: int = 3000
    max_message_bytes: int = 65536
    lease_ms: int = 10_000
    lease_interval: float = 1.0
    reap_interval: float = 1.0
    anti_entropy_interval: float = 30.0
    entry_ttl_ms: int = 300_000
    reap_grace_ms: int = 1_000
    loop_stall_limit: float = 30.0
    max_client_connections: int = 0
    reserved_fds: int = 256
    max_connections_per_ip: int = 1_000
    handshakes_per_ip: float = 20.0
    handshake_burst_per_ip: int = 100
    trusted_proxies: tuple[str, ...] = ()
    request_header_timeout: float = 10.0
    request_body_timeout: float = 30.0
    max_request_bytes: int = 1_048_576
    max_pending_request_bytes: int = 64 * 1_048_576
    response_send_timeout: float = 30.0
    subscribes_per_second: int = 20
    subscribe_burst: int = 200
    client_work_budget: int = 500
    shed_lag: float = 1.0
    housekeeping_interval: float = 60.0
    tls_cert: str | None = None
    tls_key: str | None = None
    drain_delay: float = 5.0
    drain_window: float = 10.0
    drain_handover: float = 5.0
    admin_port: int = 0
    admin_host: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    apps_file: str | None = None
    apps_watch_interval: float = 2.0
    webhook_lease_ms: int = 30_000
    # Indexes of the apps (built in __post_init__).
    _by_key: dict[str, AppConfig] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _by_id: dict[str, AppConfig] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError(f"port: must be 0..65535, got {self.port!r}")
        if not isinstance(self.node_id, str) or not re.match(
            r"\A[A-Za-z0-9_.\-]{1,64}\Z", self.node_id
        ):
            raise ConfigError(f"node_id: 1-64 characters of [A-Za-z0-9_.-], got {self.node_id!r}")
        if not self.apps:
            raise ConfigError("apps: at least one app is required")
        _check_unique(self.apps)
        if not isinstance(self.activity_timeout, int) or not 1 <= self.activity_timeout <= 3600:
            raise ConfigError("activity_timeout: must be an integer 1..3600 (seconds)")
        if not isinstance(self.write_timeout, (int, float)) or self.write_timeout <= 0:
            raise ConfigError("write_timeout: must be a positive number of seconds")
        if not isinstance(self.webhook_hold_ms, int) or not 0 <= self.webhook_hold_ms <= 60000:
            raise ConfigError("webhook_hold_ms: must be an integer 0..60000")
        if not isinstance(self.max_message_bytes, int) or self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes: must be an integer >= 1024")
        if not isinstance(self.lease_ms, int) or self.lease_ms < 500:
            raise ConfigError("lease_ms: must be an integer >= 500")
        for name in ("lease_interval", "reap_interval", "anti_entropy_interval"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name}: must be a positive number of seconds")
        if self.lease_interval * 2000 > self.lease_ms:
            raise ConfigError("lease_interval: must be at most half of lease_ms")
        if not isinstance(self.entry_ttl_ms, int) or (
            self.entry_ttl_ms < self.anti_entropy_interval * 2000
        ):
            raise ConfigError("entry_ttl_ms: must exceed 2 x anti_entropy_interval")
        self._check_limits()
        for i, app in enumerate(self.apps):
            if app.max_frame_bytes > self.max_message_bytes:
                raise ConfigError(
                    f"apps[{i}].max_event_payload_bytes/max_user_info_bytes: frames of up to "
                    f"{app.max_frame_bytes} bytes need max_message_bytes >= "
                    f"{app.max_frame_bytes} (now {self.max_message_bytes})"
                )
            if 2 * app.max_event_payload_bytes + 4096 > self.max_request_bytes:
                raise ConfigError(
                    f"apps[{i}].max_event_payload_bytes: {app.max_event_payload_bytes} needs "
                    f"max_request_bytes >= {2 * app.max_event_payload_bytes + 4096} "
                    f"(now {self.max_request_bytes})"
                )

    def _check_limits(self) -> None:
        def integer(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            if type(value) is not int or value < low or (high is not None and value > high):
                bound = f"{low}..{high}" if high is not None else f">= {low}"
                raise ConfigError(f"{name}: must be an integer {bound}, got {value!r}")

        def seconds(name: str, low: float = 0.0, *, zero: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or value < low or (value == 0 and not zero):
                raise ConfigError(f"{name}: must be a number > {low:g}, got {value!r}")

        integer("reap_grace_ms", 0, 600_000)
        integer("webhook_lease_ms", 1_000, 600_000)
        seconds("loop_stall_limit", 1.0)
        integer("max_client_connections", 0)
        integer("reserved_fds", 16)
        integer("max_connections_per_ip", 0)
        seconds("handshakes_per_ip", zero=True)
        integer("handshake_burst_per_ip", 1)
        seconds("request_header_timeout", 0.1)
        seconds("request_body_timeout", 0.1)
        integer("max_request_bytes", 1024)
        integer("max_pending_request_bytes", self.max_request_bytes)
        seconds("response_send_timeout", 0.1)
        integer("subscribes_per_second", 1)
        integer("subscribe_burst", 1)
        integer("client_work_budget", 10)
        seconds("shed_lag", 0.05)
        seconds("housekeeping_interval", 1.0)
        seconds("drain_delay", zero=True)
        seconds("drain_window", zero=True)
        seconds("drain_handover", zero=True)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key: give both (or neither)")
        if type(self.admin_port) is not int or not 0 <= self.admin_port < 65536:
            raise ConfigError(f"admin_port: must be 0..65535, got {self.admin_port!r}")
        if self.admin_port and self.admin_port == self.port:
            raise ConfigError("admin_port: must differ from port")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"log_level: must be debug, info, warning or error, got {self.log_level!r}"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: must be text or json, got {self.log_format!r}")
        proxies = self.trusted_proxies
        if isinstance(proxies, str):
            proxies = tuple(p.strip() for p in proxies.split(",") if p.strip())
        if not isinstance(proxies, (list, tuple)):
            raise ConfigError("trusted_proxies: must be a list of addresses or CIDR networks")
        for item in proxies:
            try:
                ipaddress.ip_network(str(item), strict=False)
            except ValueError as exc:
                raise ConfigError(
                    f"trusted_proxies: {item!r} is not an address or network"
                ) from exc
        object.__setattr__(self, "trusted_proxies", tuple(str(p) for p in proxies))
        if self.apps_file is not None and (
            not isinstance(self.apps_file, str) or not self.apps_file
        ):
            raise ConfigError(f"apps_file: must be a file path, got {self.apps_file!r}")
        value = self.apps_watch_interval
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(
                f"apps_watch_interval: must be a number of seconds >= 0 (0 = off), got {value!r}"
            )
        object.__setattr__(self, "_by_key", {a.key: a for a in self.apps})
        object.__setattr__(self, "_by_id", {a.id: a for a in self.apps})

    def app_by_key(self, key: str) -> AppConfig | None:
        """The app with this public key, if any."""
        return self._by_key.get(key)

    def app_by_id(self, app_id: str) -> AppConfig | None:
        """The app with this id, if any."""
        return self._by_id.get(app_id)


_NODE_FIELDS = {
    f.name: f for f in fields(NodeConfig) if f.name != "apps" and not f.name.startswith("_")
}


def _check_unique(apps: tuple[AppConfig, ...], source: str = "") -> None:
    """Two apps with one id or one key: the message names both entries (``source``: the
    file, as a prefix)."""
    for label in ("id", "key"):
        seen: dict[str, int] = {}
        for i, app in enumerate(apps):
            value = getattr(app, label)
            if value in seen:
                raise ConfigError(
                    f"{source}apps[{i}]: app {label} {value!r} is already used by "
                    f"apps[{seen[value]}]"
                )
            seen[value] = i


def load_apps_file(path: str | Path) -> tuple[AppConfig, ...]:
    """The apps of an apps file: a TOML file of ``[[apps]]`` tables only.

    Raises:
        ConfigError: Unreadable, not TOML (a key given twice in one table is reported with
            its line), another section, no app, a bad app, or two apps sharing an id or key;
            the message names the file and the entry.
    """
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"apps"}
    if unknown:
        raise ConfigError(f"{source}: only [[apps]] tables belong here, found {sorted(unknown)}")
    apps = _apps_from_toml(data.get("apps", []), source)
    if not apps:
        raise ConfigError(f"{source}: no [[apps]] entry")
    _check_unique(apps, f"{source}: ")
    return apps


_APP_FIELDS = {f.name for f in fields(AppConfig)}


def _coerce(name: str, value: Any, kind: object) -> Any:
    """Convert environment text to the field's type; pass TOML values through for checking."""
    if not isinstance(value, str):
        return value
    text = str(kind)
    try:
        if "int" in text and "str" not in text:
            return int(value)
        if "float" in text:
            return float(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: not a number: {value!r}") from exc
    return value


def _apps_from_toml(raw: Any, source: str) -> tuple[AppConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: [[apps]] must be an array of tables")
    apps = []
    for i, entry in enumerate(raw):
        where = f"{source}: apps[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        unknown = set(entry) - _APP_FIELDS
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {sorted(unknown)}")
        missing = {"id", "key", "secret"} - set(entry)
        if missing:
            raise ConfigError(f"{where}: missing {sorted(missing)}")
        values: dict[str, Any] = {
            k: (str(v) if k == "id" and isinstance(v, int) else v) for k, v in entry.items()
        }
        for flag in ("client_events", "subscription_count", "webhook_batching", "watchlist_events"):
            if flag in values and not isinstance(values[flag], bool):
                raise ConfigError(f"{where}.{flag}: must be true or false")
        if "webhooks" in values:
            hooks = values["webhooks"]
            if not isinstance(hooks, list):
                raise ConfigError(
                    f"{where}.webhooks: must be an array of tables ([[apps.webhooks]])"
                )
            values["webhooks"] = tuple(
                _endpoint(h, f"{where}.webhooks[{j}]") for j, h in enumerate(hooks)
            )
        try:
            app = AppConfig(**values)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        apps.append(_check_app(app, where))
    return tuple(apps)


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Build the node configuration from a TOML file, ``GATEWAY_*`` variables and flags.

    TOML layout: a ``[node]`` table with any :class:`NodeConfig` field, and ``[[apps]]``
    tables with :class:`AppConfig` fields. Environment: ``GATEWAY_<FIELD>`` for node fields
    (``GATEWAY_PORT=6002``), ``GATEWAY_APPS="ID:KEY:SECRET,..."`` and
    ``GATEWAY_WEBHOOK_URL`` (applied to every app that has none).

    Raises:
        ConfigError: Unreadable file, unknown or malformed setting; the message names it.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    apps: tuple[AppConfig, ...] = ()
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
        unknown = set(data) - {"node", "apps"}
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}")
        node = data.get("node", {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: [node] must be a table")
        bad = set(node) - set(_NODE_FIELDS)
        if bad:
            raise ConfigError(f"{source}: [node] unknown setting(s) {sorted(bad)}")
        values.update(node)
        if "apps" in data:
            apps = _apps_from_toml(data["apps"], source)
    for name, spec in _NODE_FIELDS.items():
        var = f"GATEWAY_{name.upper()}"
        if var in env:
            values[name] = _coerce(var, env[var], spec.type)
    if values.get("apps_file"):
        if apps:
            raise ConfigError(
                f"{path}: [[apps]] and apps_file both give apps; keep them in one place"
            )
        apps = load_apps_file(values["apps_file"])
    if "GATEWAY_APPS" in env:
        apps = tuple(
            parse_app(item.strip(), where="GATEWAY_APPS")
            for item in env["GATEWAY_APPS"].split(",")
            if item.strip()
        )
    for name, value in (overrides or {}).items():
        if name == "apps":
            if value:
                apps = tuple(value)
        elif value is not None:
            values[name] = value
    webhook = (overrides or {}).get("webhook_url") or env.get("GATEWAY_WEBHOOK_URL")
    values.pop("webhook_url", None)
    if not apps:
        apps = (DEFAULT_APP,)
    if webhook:
        apps = tuple(
            _check_app(replace(a, webhook_url=a.webhook_url or webhook), "webhook_url")
            for a in apps
        )
    try:
        return NodeConfig(apps=apps, **values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
