"""Shard topology settings: which shards exist, how to find their masters, and the file format."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.shards.security import PLAIN, Access, Secret, TlsConfig

__all__ = [
    "Address",
    "ShardSpec",
    "TopologyConfig",
    "TopologyError",
    "load_topology",
    "parse_address",
]


class TopologyError(ValueError):
    """A topology file or setting is invalid; the message names the bad field."""


@dataclass(frozen=True, order=True)
class Address:
    """A TCP address of a Redis server or Sentinel."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(text: str, *, where: str = "address") -> Address:
    """Parse ``host:port``.

    Args:
        text: The address text.
        where: Name of the setting, used in the error message.

    Raises:
        TopologyError: The text is not ``host:port`` with a port in 1..65535.
    """
    if not isinstance(text, str):
        raise TopologyError(f"{where}: expected 'host:port', got {text!r}")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise TopologyError(f"{where}: expected 'host:port', got {text!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise TopologyError(f"{where}: port out of range in {text!r}")
    return Address(host.strip("[]"), port)


@dataclass(frozen=True)
class ShardSpec:
    """One shard: its Sentinel master name and, for static setups, its addresses.

    Attributes:
        name: Sentinel master name (also stored in the shard's identity).
        master: Static master address; used when no Sentinels are configured, and as the
            address ``shards init`` writes to.
        replicas: Known replica addresses (informational; discovery uses Sentinel).
    """

    name: str
    master: Address | None = None
    replicas: tuple[Address, ...] = ()


@dataclass(frozen=True)
class TopologyConfig:
    """Where the shards are.

    Attributes:
        cluster: Deployment name, stored in every shard identity.
        shards: The shards in slot-table order (shard ``i`` owns the ``i``-th even slot range).
        sentinels: Sentinel addresses; empty means static masters.
        redis: How nodes reach the shard servers (``"redis"`` in the file).
        redis_admin: How ``shards init`` and ``audit`` reach them (``"redis_admin"``; its TLS
            defaults to ``redis``'s); None: as ``redis``.
        sentinel: How everything reaches the Sentinels (``"sentinel"``).
    """

    cluster: str
    shards: tuple[ShardSpec, ...]
    sentinels: tuple[Address, ...] = field(default=())
    redis: Access = PLAIN
    redis_admin: Access | None = None
    sentinel: Access = PLAIN
    #: The ``redis_admin`` section as written, resolved only when an administrative command
    #: asks for it (a node never needs the admin password).
    admin_section: Any = field(default=None, compare=False, repr=False)
    admin_base: Path = field(default=Path("."), compare=False, repr=False)
    admin_env: Mapping[str, str] | None = field(default=None, compare=False, repr=False)

    @property
    def uses_sentinel(self) -> bool:
        """Whether masters are discovered through Sentinel."""
        return bool(self.sentinels)

    @property
    def admin(self) -> Access:
        """The access of administrative commands (``shards init``, ``audit``).

        Raises:
            TopologyError: The ``redis_admin`` section's password cannot be found.
        """
        admin = self.redis_admin
        if admin is None and self.admin_section is not None:
            admin = _access(
                self.admin_section,
                "topology: redis_admin",
                self.admin_base,
                os.environ if self.admin_env is None else self.admin_env,
                "GATEWAY_REDIS_ADMIN_PASSWORD",
            )
        if admin is None:
            return self.redis
        if admin.tls is None:
            return replace(admin, tls=self.redis.tls)
        return admin

    @classmethod
    def from_dict(
        cls,
        data: Any,
        *,
        source: str = "topology",
        base: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> TopologyConfig:
        """Build and validate a topology from the ``topology.json`` structure.

        Args:
            data: The parsed JSON.
            source: Name used in error messages.
            base: Directory that relative file paths (passwords, certificates) start from.
            env: Environment for ``password_env`` and the ``GATEWAY_REDIS_PASSWORD``,
                ``GATEWAY_REDIS_ADMIN_PASSWORD``, ``GATEWAY_SENTINEL_PASSWORD`` overrides.

        Raises:
            TopologyError: A field is missing or malformed; the message names it.
        """
        if not isinstance(data, dict):
            raise TopologyError(f"{source}: expected a JSON object")
        cluster = data.get("cluster", "local")
        if not isinstance(cluster, str) or not cluster:
            raise TopologyError(f"{source}: 'cluster' must be a non-empty string")
        raw_shards = data.get("shards")
        if not isinstance(raw_shards, list) or not raw_shards:
            raise TopologyError(f"{source}: 'shards' must be a non-empty list")
        shards = []
        names: set[str] = set()
        for i, raw in enumerate(raw_shards):
            where = f"{source}: shards[{i}]"
            if not isinstance(raw, dict):
                raise TopologyError(f"{where}: expected an object")
            name = raw.get("name")
            if not isinstance(name, str) or not name:
                raise TopologyError(f"{where}.name: must be a non-empty string")
            if name in names:
                raise TopologyError(f"{where}.name: duplicate shard name {name!r}")
            names.add(name)
            master_text = raw.get("master")
            master = (
                None if master_text is None else parse_address(master_text, where=f"{where}.master")
            )
            replicas_raw = raw.get("replicas", [])
            if not isinstance(replicas_raw, list):
                raise TopologyError(f"{where}.replicas: must be a list")
            replicas = tuple(
                parse_address(r, where=f"{where}.replicas[{j}]") for j, r in enumerate(replicas_raw)
            )
            shards.append(ShardSpec(name=name, master=master, replicas=replicas))
        raw_sentinels = data.get("sentinels", [])
        if not isinstance(raw_sentinels, list):
            raise TopologyError(f"{source}: 'sentinels' must be a list")
        sentinels = tuple(
            parse_address(s, where=f"{source}: sentinels[{j}]") for j, s in enumerate(raw_sentinels)
        )
        if not sentinels and any(s.master is None for s in shards):
            raise TopologyError(f"{source}: without 'sentinels' every shard needs a 'master'")
        env = os.environ if env is None else env
        base = base or Path(".")
        redis = _access(data.get("redis"), f"{source}: redis", base, env, "GATEWAY_REDIS_PASSWORD")
        admin_section = data.get("redis_admin")
        if admin_section is not None and not isinstance(admin_section, dict):
            raise TopologyError(f"{source}: redis_admin: expected an object")
        sentinel = _access(
            data.get("sentinel"), f"{source}: sentinel", base, env, "GATEWAY_SENTINEL_PASSWORD"
        )
        return cls(
            cluster=cluster,
            shards=tuple(shards),
            sentinels=sentinels,
            redis=redis,
            sentinel=sentinel,
            admin_section=admin_section,
            admin_base=base,
            admin_env=env,
        )


_ACCESS_KEYS = {"username", "password_file", "password_env", "tls"}
_TLS_KEYS = {"ca", "cert", "key", "server_name", "check_hostname"}


def _path(value: Any, where: str, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise TopologyError(f"{where}: must be a file path")
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.is_file():
        raise TopologyError(f"{where}: no such file: {path}")
    return str(path)


def _access(raw: Any, where: str, base: Path, env: Mapping[str, str], override: str) -> Access:
    """Parse one ``redis`` / ``redis_admin`` / ``sentinel`` section (None: plain access)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TopologyError(f"{where}: expected an object")
    unknown = set(raw) - _ACCESS_KEYS
    if unknown:
        raise TopologyError(f"{where}: unknown setting(s) {sorted(unknown)}")
    username = raw.get("username")
    if username is not None and (not isinstance(username, str) or not username):
        raise TopologyError(f"{where}.username: must be a non-empty string")
    password: Secret | None = None
    if "password_file" in raw and "password_env" in raw:
        raise TopologyError(f"{where}: give password_file or password_env, not both")
    if override in env:
        password = Secret(env[override])  # the environment wins, and needs nothing else
    elif "password_file" in raw:
        path = _path(raw["password_file"], f"{where}.password_file", base)
        try:
            text = Path(path).read_text().rstrip("\r\n")
        except OSError as exc:
            raise TopologyError(
                f"{where}.password_file: cannot read {path}: {exc.strerror}"
            ) from exc
        password = Secret(text)
    elif "password_env" in raw:
        name = raw["password_env"]
        if not isinstance(name, str) or name not in env:
            raise TopologyError(f"{where}.password_env: environment variable {name!r} is not set")
        password = Secret(env[name])
    if password is not None and not password.value:
        raise TopologyError(f"{where}: the password is empty")
    if username is not None and password is None:
        raise TopologyError(
            f"{where}: a username needs a password (password_file, password_env or {override})"
        )
    tls = None
    if raw.get("tls") is not None:
        t = raw["tls"]
        if not isinstance(t, dict):
            raise TopologyError(f"{where}.tls: expected an object")
        bad = set(t) - _TLS_KEYS
        if bad:
            raise TopologyError(f"{where}.tls: unknown setting(s) {sorted(bad)}")
        if bool(t.get("cert")) != bool(t.get("key")):
            raise TopologyError(f"{where}.tls: give cert and key together (mutual TLS)")
        check = t.get("check_hostname", True)
        if not isinstance(check, bool):
            raise TopologyError(f"{where}.tls.check_hostname: must be true or false")
        server_name = t.get("server_name")
        if server_name is not None and not isinstance(server_name, str):
            raise TopologyError(f"{where}.tls.server_name: must be a string")
        tls = TlsConfig(
            ca_file=_path(t["ca"], f"{where}.tls.ca", base) if t.get("ca") else None,
            cert_file=_path(t["cert"], f"{where}.tls.cert", base) if t.get("cert") else None,
            key_file=_path(t["key"], f"{where}.tls.key", base) if t.get("key") else None,
            server_name=server_name,
            check_hostname=check,
            where=f"{where}.tls",
        )
    return Access(username=username, password=password, tls=tls)


def load_topology(path: str | Path) -> TopologyConfig:
    """Read a ``topology.json`` file (as written by ``presence-gateway cluster up``).

    Raises:
        TopologyError: The file is missing, not JSON, or invalid.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise TopologyError(f"{p}: cannot read topology file: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise TopologyError(f"{p}: not valid JSON: {exc}") from exc
    return TopologyConfig.from_dict(data, source=str(p), base=p.parent)
