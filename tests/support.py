"""Helpers shared by tests (not fixtures): raw Redis clients that return bytes.

With ``PG_SECURE=1`` in the environment the topology fixtures start secure topologies (TLS,
ACL users); :func:`register` records how to reach each of their processes, so
:func:`raw_client` keeps working unchanged in the tests that run both ways.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import redis

from gateway.localcluster import LocalCluster
from gateway.shards.security import PLAIN, Access
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
