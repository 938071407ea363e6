"""Shard topology settings: which shards exist, how to find their masters, and the file format."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """

    cluster: str
    shards: tuple[ShardSpec, ...]
    sentinels: tuple[Address, ...] = field(default=())

    @property
    def uses_sentinel(self) -> bool:
        """Whether masters are discovered through Sentinel."""
        return bool(self.sentinels)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "topology") -> TopologyConfig:
        """Build and validate a topology from the ``topology.json`` structure.

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
        return cls(cluster=cluster, shards=tuple(shards), sentinels=sentinels)


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
    return TopologyConfig.from_dict(data, source=str(p))
