"""Shard administration: write shard identities and load the function library (``shards init``)."""

from __future__ import annotations

import secrets
from importlib import resources
from typing import Any, cast

import redis

from gateway.shards.contract import IDENTITY_KEY
from gateway.shards.identity import (
    DamagedIdentity,
    IdentityMismatch,
    MisplacedIdentity,
    MissingIdentity,
    ShardIdentity,
    check_identity,
    expected_identities,
)
from gateway.shards.security import Access
from gateway.shards.sentinel import (
    MASTER_QUERY,
    SentinelAnswer,
    SentinelUnreachable,
    parse_master_reply,
    vote,
)
from gateway.shards.topology import Address, TopologyConfig

__all__ = [
    "LIBRARY_NAME",
    "ShardInitError",
    "init_shards",
    "library_source",
    "library_version",
    "read_identity",
    "resolve_master_sync",
]

LIBRARY_NAME = "pg"


class ShardInitError(RuntimeError):
    """``shards init`` refused to proceed; the message says which shard and why."""


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
    """Find shard ``index``'s master: by the Sentinel vote (see
    :func:`gateway.shards.sentinel.vote`) when Sentinels are configured.

    Raises:
        ShardInitError: No Sentinel answered, or none of those that did knows the shard's name.
    """
    spec = topology.shards[index]
    if not topology.uses_sentinel:
        assert spec.master is not None  # validated by TopologyConfig
        return spec.master
    answers = [
        _ask_sentinel(topology, sentinel, spec.name, timeout) for sentinel in topology.sentinels
    ]
    try:
        found = vote(spec.name, answers)
    except SentinelUnreachable as exc:
        raise ShardInitError(f"{spec.name}: {exc}") from None
    if found.master is None:
        raise ShardInitError(found.unknown)
    return found.master


def _ask_sentinel(
    topology: TopologyConfig, sentinel: Address, name: str, timeout: float
) -> SentinelAnswer:
    client = redis.Redis(
        host=sentinel.host,
        port=sentinel.port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
        **topology.sentinel.redis_kwargs(),  # type: ignore[arg-type]
    )
    try:
        return SentinelAnswer(sentinel, parse_master_reply(_cmd(client, *MASTER_QUERY, name)))
    except (redis.RedisError, ValueError) as exc:
        return SentinelAnswer(sentinel, error=str(exc))
    finally:
        client.close()


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
    wanted = expected_identities(topology)
    clients: list[redis.Redis] = []
    existing: list[ShardIdentity | None] = []
    conflicts: list[str] = []
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
            run_id = str(info.get("run_id"))
            if run_id in run_ids:
                raise ShardInitError(
                    f"{spec.name}: {addr} is the same server as {run_ids[run_id]}; "
                    "every shard needs its own master"
                )
            run_ids[run_id] = spec.name
            old: ShardIdentity | None
            try:
                old = check_identity(str(role[0]), raw, expected=wanted[i])
            except MissingIdentity:
                old = None
            except DamagedIdentity as exc:
                if not force:
                    raise ShardInitError(
                        f"{spec.name}: {addr} holds a damaged identity ({exc}); use --force"
                    ) from exc
                old = None
            except MisplacedIdentity as exc:
                old = exc.found
                conflicts.append(f"{spec.name}: {addr}: {exc} (uuid {old.uuid})")
            except IdentityMismatch as exc:
                raise ShardInitError(f"{spec.name}: {addr}: {exc}") from exc
            existing.append(old)

        if conflicts and not force:
            raise ShardInitError(
                f"refusing to overwrite different shard identities: {'; '.join(conflicts)}; "
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
                pipe.hset(
                    IDENTITY_KEY,
                    mapping=identity.to_hash(lib=library_version()),  # type: ignore[arg-type]
                )
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
