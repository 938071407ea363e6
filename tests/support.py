"""Helpers shared by tests (not fixtures): raw Redis clients that return bytes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import redis

from gateway.store.presence import PresenceStore

#: ``await factory(owner, lease_ms=None, hold_ms=200, topology=None)``: the ``store_factory``
#: fixture of ``conftest.py``.
StoreFactory = Callable[..., Awaitable[PresenceStore]]


def raw_client(addr: str) -> redis.Redis:
    """A redis-py client for ``host:port`` whose replies are bytes, not decoded text."""
    host, _, port = addr.rpartition(":")
    return redis.Redis(host=host, port=int(port), socket_timeout=5, protocol=2)
