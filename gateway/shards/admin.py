"""Shard administration: write shard identities and load the function library (``shards init``)."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import redis

from gateway._native import SlotTable, key_slot
from gateway.shards.security import Access
from gateway.shards.topology import Address, TopologyConfig

__all__ = [
    "IDENTITY_KEY",
    "LIBRARY_NAME",
    "ShardIdentity",
    "ShardInitError",
    "init_shards",
    "library_source",
    "library_version",
    "resolve_master_sync",
    "shard_tag",
]

IDENTITY_KEY = "__pg:shard"
LIBRARY_NAME = "pg"


class ShardInitError(RuntimeError):
    """``shards init`` refused to proceed; the message says which shard and why."""


@dataclass(frozen=True)
class ShardIdentity:
    """The identity record stored in ``__pg:shard`` on every shard master (and its replicas)."""

    cluster: str
    name: str
    index: int
    shards: int
    uuid: str
    epoch: int
    slots: str
    tag: str = ""

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> ShardIdentity:
        """Decode an identity hash; raises ``ValueError`` naming a missing or bad field."""
        try:
            return cls(
                cluster=data["cluster"],
                name=data["name"],
                index=int(data["index"]),
                shards=int(data["shards"]),
                uuid=data["uuid"],
                epoch=int(data["epoch"]),
                slots=data["slots"],
                tag=data.get("tag", ""),
            )
        except KeyError as exc:
            raise ValueError(f"shard identity lacks field {exc.args[0]!r}") from exc
        except ValueError as exc:
            raise ValueError(f"shard identity has a malformed number: {exc}") from exc

    def to_hash(self) -> dict[str, str]:
        """Encode as the fields of ``__pg:shard``."""
        return {
            "cluster": self.cluster,
            "name": self.name,
            "index": str(self.index),
            "shards": str(self.shards),
            "uuid": self.uuid,
            "epoch": str(self.epoch),
            "slots": self.slots,
            "tag": self.tag,
            "lib": library_version(),
        }

    def same_place(self, other: ShardIdentity) -> bool:
        """Whether both describe the same slot-table position of the same deployment."""
        return (self.cluster, self.name, self.index, self.shards, self.slots) == (
            other.cluster,
            other.name,
            other.index,
            other.shards,
            other.slots,
        )


def shard_tag(index: int, ranges: Sequence[tuple[int, int]]) -> str:
    """The hash tag of shard ``index``'s own keys: ``{pgs-<index>-<n>}`` with the least ``n``
    whose slot falls in the shard's range (so shard-wide keys obey the slot table too)."""
    first, last = ranges[index]
    for n in range(1_000_000):
        tag = f"{{pgs-{index}-{n}}}"
        if first <= key_slot(tag.encode()) <= last:
            return tag
    raise ValueError(f"no hash tag found for slots {first}-{last}")


def library_source() -> str:
    """The Lua source of the function library shipped with this package."""
    return resources.files("gateway.shards").joinpath("functions.lua").read_text()


def library_version() -> str:
    """The version string the library reports through ``pg_version``."""
    for line in library_source().splitlines():
        if line.startswith("local LIB_VERSION"):
            return line.split("=", 1)[1].strip().strip("'\"")
    raise RuntimeError("functions.lua has no LIB_VERSION line")


def resolve_master_sync(topology: TopologyConfig, index: int, *, timeout: float = 2.0) -> Address:
    """Find shard ``index``'s master: by Sentinel majority when Sentinels are configured.

    Raises:
        ShardInitError: No Sentinel answered, or the shard has no address.
    """
    spec = topology.shards[index]
    if not topology.uses_sentinel:
        assert spec.master is not None  # validated by TopologyConfig
        return spec.master
    votes: Counter[Address] = Counter()
    errors: list[str] = []
    for sentinel in topology.sentinels:
        client = redis.Redis(
            host=sentinel.host,
            port=sentinel.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            **topology.sentinel.redis_kwargs(),  # type: ignore[arg-type]
        )
        try:
            reply = _cmd(client, "SENTINEL", "get-master-addr-by-name", spec.name)
        except redis.RedisError as exc:
            errors.append(f"{sentinel}: {exc}")
            continue
        finally:
            client.close()
        if reply:
            votes[Address(str(reply[0]), int(reply[1]))] += 1
    if not votes:
        why = f" ({'; '.join(errors)})" if errors else ""
        raise ShardInitError(f"{spec.name}: no Sentinel knows a master for this name{why}")
    return votes.most_common(1)[0][0]


def _cmd(client: redis.Redis, *args: str | int) -> Any:
    """``execute_command`` with a typed signature (redis-py leaves it untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _connect(addr: Address, access: Access) -> redis.Redis:
    return redis.Redis(
        host=addr.host,
        port=addr.port,
        socket_timeout=5,
        socket_connect_timeout=5,
        decode_responses=True,
        **access.redis_kwargs(),  # type: ignore[arg-type]
    )


def init_shards(
    topology: TopologyConfig, *, force: bool = False, wait_replicas_ms: int = 2000
) -> list[ShardIdentity]:
    """Write identities and load the function library on every shard master.

    Idempotent: a shard that already holds the identity this topology gives it keeps its uuid
    and epoch; only the library is reloaded. A shard holding a *different* identity (another
    deployment, another position) is refused unless ``force``; with ``force`` every shard gets
    a new topology epoch (greater than any seen) so writes tagged under the old one are refused.

    Raises:
        ShardInitError: A master is unreachable, is not a master, appears twice, or holds a
            different identity and ``force`` is false.
    """
    for label, access in (("redis_admin", topology.admin), ("sentinel", topology.sentinel)):
        if access.tls is not None and access.tls.server_name:
            raise ShardInitError(
                f"{label}.tls.server_name is not supported by shards init (its Redis client "
                "verifies the name it connects to): list the servers by a name their "
                "certificates carry"
            )
    n = len(topology.shards)
    ranges = SlotTable.even_ranges(n)
    clients: list[redis.Redis] = []
    existing: list[ShardIdentity | None] = []
    run_ids: dict[str, str] = {}
    try:
        for i, spec in enumerate(topology.shards):
            addr = resolve_master_sync(topology, i)
            client = _connect(addr, topology.admin)
            clients.append(client)
            try:
                role = _cmd(client, "ROLE")
                info = client.info("server")
                raw = cast(dict[str, str], client.hgetall(IDENTITY_KEY))
            except redis.RedisError as exc:
                raise ShardInitError(f"{spec.name}: cannot talk to master {addr}: {exc}") from exc
            if role[0] != "master":
                raise ShardInitError(f"{spec.name}: {addr} is a {role[0]}, not a master")
            run_id = str(info.get("run_id"))
            if run_id in run_ids:
                raise ShardInitError(
                    f"{spec.name}: {addr} is the same server as {run_ids[run_id]}; "
                    "every shard needs its own master"
                )
            run_ids[run_id] = spec.name
            try:
                existing.append(ShardIdentity.from_hash(raw) if raw else None)
            except ValueError as exc:
                if not force:
                    raise ShardInitError(
                        f"{spec.name}: {addr} holds a damaged identity ({exc}); use --force"
                    ) from exc
                existing.append(None)

        wanted = [
            ShardIdentity(
                cluster=topology.cluster,
                name=spec.name,
                index=i,
                shards=n,
                uuid="",
                epoch=0,
                slots=f"{ranges[i][0]}-{ranges[i][1]}",
                tag=shard_tag(i, ranges),
            )
            for i, spec in enumerate(topology.shards)
        ]
        conflicts = [
            (i, old)
            for i, old in enumerate(existing)
            if old is not None and not old.same_place(wanted[i])
        ]
        if conflicts and not force:
            details = "; ".join(
                f"{topology.shards[i].name} holds {old.cluster}/{old.name} "
                f"(index {old.index} of {old.shards}, uuid {old.uuid})"
                for i, old in conflicts
            )
            raise ShardInitError(
                f"refusing to overwrite different shard identities: {details}; "
                "use --force if this is intended"
            )
        epochs = {old.epoch for old in existing if old is not None}
        if force or len(epochs) > 1 or (epochs and any(old is None for old in existing)):
            epoch = max(epochs, default=0) + 1
        else:
            epoch = next(iter(epochs), 1)

        source = library_source()
        result: list[ShardIdentity] = []
        for i, client in enumerate(clients):
            old = existing[i]
            keep_uuid = old is not None and old.same_place(wanted[i]) and not force
            identity = ShardIdentity(
                **{
                    **wanted[i].__dict__,
                    "uuid": old.uuid if keep_uuid and old else secrets.token_hex(16),
                    "epoch": epoch,
                }
            )
            try:
                _cmd(client, "FUNCTION", "LOAD", "REPLACE", source)
                pipe = client.pipeline(transaction=True)
                pipe.delete(IDENTITY_KEY)
                pipe.hset(IDENTITY_KEY, mapping=identity.to_hash())  # type: ignore[arg-type]
                pipe.execute()
                _cmd(client, "WAIT", len(topology.shards[i].replicas), wait_replicas_ms)
            except redis.RedisError as exc:
                raise ShardInitError(f"{identity.name}: initialisation failed: {exc}") from exc
            result.append(identity)
        return result
    finally:
        for client in clients:
            client.close()


def read_identity(client: Any) -> ShardIdentity | None:
    """Read the identity of the server behind a sync redis-py client (None if absent)."""
    raw = client.hgetall(IDENTITY_KEY)
    if not raw:
        return None
    decoded = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    return ShardIdentity.from_hash(decoded)
