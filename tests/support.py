"""Helpers shared by tests (not fixtures): raw Redis clients that return bytes, and the
in-process shard stack (:func:`shard_stack`: shard links, batched writer, optional store).

With ``PG_SECURE=1`` in the environment the topology fixtures start secure topologies (TLS,
ACL users); :func:`register` records how to reach each of their processes, so
:func:`raw_client` keeps working unchanged in the tests that run both ways.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from gateway.localcluster import LocalCluster
from gateway.shards.security import PLAIN, Access
from gateway.shards.shardset import ShardSet
from gateway.shards.topology import TopologyConfig, load_topology
from gateway.shards.writer import BatchWriter
from gateway.store.presence_redis import RedisPresenceStore

#: Whether the topology fixtures start secure topologies (``PG_SECURE=1``).
SECURE = os.environ.get("PG_SECURE") == "1"
_ACCESS: dict[str, Access] = {}

#: ``await factory(owner, lease_ms=None, hold_ms=200, topology=None)``: the ``store_factory``
#: fixture of ``conftest.py``.
StoreFactory = Callable[..., Awaitable[RedisPresenceStore]]


def register(cluster: LocalCluster) -> None:
    """Remember how to reach ``cluster``'s processes (its admin user and TLS when secure)."""
    access = cluster.admin_access()
    for process in cluster.processes:
        _ACCESS[process.addr] = access


def raw_client(addr: str) -> redis.Redis:
    """A redis-py client for ``host:port`` whose replies are bytes, not decoded text."""
    host, _, port = addr.rpartition(":")
    kwargs = _ACCESS.get(addr, PLAIN).redis_kwargs()
    return redis.Redis(
        host=host,
        port=int(port),
        socket_timeout=5,
        protocol=2,
        **kwargs,  # type: ignore[arg-type]
    )


@dataclass
class ShardStack:
    """A node's shard links and batched writer, and its store when an owner was given."""

    shards: ShardSet
    writer: BatchWriter
    store: RedisPresenceStore | None = None


@contextlib.asynccontextmanager
async def shard_stack(
    topology: TopologyConfig | Path | str,
    *,
    owner: str | None = None,
    ready: bool = True,
    shards_options: Mapping[str, Any] | None = None,
    writer_options: Mapping[str, Any] | None = None,
    **store_options: Any,
) -> AsyncIterator[ShardStack]:
    """Start a :class:`ShardSet` on ``topology`` (rechecking every 0.2 s), wait until every
    shard is usable (unless ``ready=False``), start a :class:`BatchWriter` on it and, with
    ``owner``, build a :class:`RedisPresenceStore` (``store_options``: ``hold_ms``,
    ``entry_ttl_ms`` ...). Closes the writer, then the shard links, on exit.

    ``shards_options`` and ``writer_options`` go to the constructors (``connect_timeout``,
    ``verify_identity``; ``write_timeout``). The shards must be initialised already.
    """
    if owner is None and store_options:
        raise TypeError(f"store options without an owner: {sorted(store_options)}")
    topo = topology if isinstance(topology, TopologyConfig) else load_topology(topology)
    shards = ShardSet(topo, **{"recheck_interval": 0.2, **(shards_options or {})})
    writer = BatchWriter(shards, **(writer_options or {}))
    await shards.start()
    try:
        if ready:
            await shards.wait_ready(10)
        writer.start()
        store = None
        if owner is not None:
            store = RedisPresenceStore(shards, writer, owner=owner, **store_options)
        yield ShardStack(shards, writer, store)
    finally:
        await writer.close()
        await shards.close()
