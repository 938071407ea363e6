"""Gateway configuration: apps and node settings, validated; no I/O besides reading files."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

__all__ = ["DEFAULT_APP", "AppConfig", "ConfigError", "NodeConfig", "parse_app"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting."""


@dataclass(frozen=True)
class AppConfig:
    """One Pusher app: its numeric id, public key and signing secret."""

    id: str
    key: str
    secret: str


#: The app ``presence-gateway dev`` serves (numeric id: the official Python library requires it).
DEFAULT_APP = AppConfig(id="1", key="app-key", secret="app-secret")

_APP_ID = re.compile(r"\A[0-9]+\Z")
_TOKEN = re.compile(r"\A[A-Za-z0-9_\-.]+\Z")


def parse_app(text: str, *, where: str = "--app") -> AppConfig:
    """Parse ``ID:KEY:SECRET``.

    Raises:
        ConfigError: Wrong shape, non-numeric id, or characters outside ``[A-Za-z0-9_.-]``.
    """
    parts = text.split(":")
    if len(parts) != 3:
        raise ConfigError(f"{where}: expected ID:KEY:SECRET, got {text!r}")
    app_id, key, secret = parts
    if not _APP_ID.match(app_id):
        raise ConfigError(f"{where}: app id must be all digits, got {app_id!r}")
    for name, value in (("key", key), ("secret", secret)):
        if not _TOKEN.match(value):
            raise ConfigError(f"{where}: app {name} must match [A-Za-z0-9_.-]+, got {value!r}")
    return AppConfig(app_id, key, secret)


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class NodeConfig:
    """Settings of one gateway node.

    Attributes:
        host: Bind address (loopback by default).
        port: TCP port for WebSocket, HTTP API, ``/metrics`` and ``/health``.
        node_id: Stable name of this node; entries it writes carry it.
        topology: Path of a ``topology.json``.
        apps: Apps served; the default app when none is given.
    """

    host: str = "127.0.0.1"
    port: int = 6001
    node_id: str = field(default_factory=_default_node_id)
    topology: str | None = None
    apps: tuple[AppConfig, ...] = (DEFAULT_APP,)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port: must be 0..65535, got {self.port}")
        if not self.node_id or "/" in self.node_id or len(self.node_id) > 64:
            raise ConfigError(f"node_id: 1-64 characters without '/', got {self.node_id!r}")
        keys = [a.key for a in self.apps]
        if len(set(keys)) != len(keys):
            raise ConfigError("apps: two apps share a key")

    def app_by_key(self, key: str) -> AppConfig | None:
        """The app with this public key, if any."""
        for app in self.apps:
            if app.key == key:
                return app
        return None
