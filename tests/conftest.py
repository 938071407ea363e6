"""Shared pytest fixtures: real local Redis + Sentinel topologies started by gateway.localcluster.

Fixtures for test authors:

``cluster`` (session scope)
    A running :class:`~gateway.localcluster.LocalCluster` — 2 shards, 1 replica each,
    3 sentinels (master names ``shard-0``, ``shard-1``) — on a free port range in a temporary
    directory, started once and stopped at the end of the session. It is *shared*: tests may
    read and write keys (clean up after yourself or use unique key names) but must not change
    the topology (no kills, failovers or sentinel repointing). ``cluster.topology_path`` is the
    ``topology.json`` to hand to code under test; ``cluster.client(addr)`` gives a redis-py
    client (use it in a ``with`` block).

``fresh_cluster`` (function scope)
    The same layout, started for one test and stopped after it, whatever the test did to it.
    Use it for chaos tests: ``stop_process``, ``start_process``, ``failover``,
    ``repoint_sentinels``. Starting one costs about 2-3 s.

``cluster_factory`` (function scope)
    ``cluster_factory(**options) -> LocalCluster`` starts a topology with other options (for
    example ``shards=3`` or ``sentinels=0``) on a free port range; every topology it started
    is stopped after the test.

``hooks`` (module scope)
    A :class:`nodes.WebhookReceiver` listening on loopback; give ``hooks.url`` to the nodes a
    test module starts.

``store_factory`` (function scope)
    ``await store_factory(owner, lease_ms=None, topology=None)`` -> a Redis store
    (:class:`~gateway.store.presence_redis.RedisPresenceStore`) with its own shard links (on the
    shared ``cluster`` unless ``topology`` names another ``topology.json``); with ``lease_ms`` it
    leases every shard at once with no grace rule (gap 0, grace 0), so the lease expires
    exactly ``lease_ms`` later unless refreshed. Everything is closed after the test.

Plain helpers behind the fixtures: :func:`find_free_port_range` picks a base port whose whole
range binds on 127.0.0.1 right now; :func:`start_local_cluster` starts a topology on such a
range, retrying with another range if a port is taken meanwhile. Prefer the fixtures.

All of them skip the test when ``redis-server`` or ``redis-sentinel`` is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from nodes import WebhookReceiver
from support import SECURE, StoreFactory, register, shard_stack

from gateway.localcluster import LocalCluster, PortInUseError, find_free_port_range
from gateway.shards.admin import init_shards
from gateway.shards.topology import load_topology
from gateway.store.presence_redis import RedisPresenceStore

__all__ = ["find_free_port_range", "start_local_cluster"]


def start_local_cluster(directory: Path, *, retries: int = 5, **options: Any) -> LocalCluster:
    """Start a :class:`LocalCluster` in ``directory`` on a free port range and return it.

    Args:
        directory: Cluster directory (configs, logs, ``topology.json``).
        retries: Port ranges to try when one turns out to be taken.
        **options: ``LocalCluster`` keyword options except ``base_port``.

    Raises:
        PortInUseError: Every range tried was taken.
        ClusterError: The topology did not come up (its processes are stopped again).
    """
    if shutil.which("redis-server") is None or shutil.which("redis-sentinel") is None:
        pytest.skip("redis-server / redis-sentinel not installed")
    options.setdefault("secure", SECURE)
    probe = LocalCluster(directory, **options)
    count = len(probe.processes)
    for attempt in range(retries):
        base = find_free_port_range(count, host=probe.host)
        local = LocalCluster(directory, base_port=base, **options)
        try:
            local.up()
        except PortInUseError:
            if attempt == retries - 1:
                raise
            continue
        register(local)
        return local
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Shared running topology (2 shards x 1 replica, 3 sentinels); do not damage it."""
    local = start_local_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield local
    finally:
        local.down()


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Private running topology (2 shards x 1 replica, 3 sentinels) for one test."""
    local = start_local_cluster(tmp_path / "cluster")
    try:
        yield local
    finally:
        local.down()


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Factory ``(**LocalCluster options) -> running LocalCluster``; all stopped after the test."""
    started: list[LocalCluster] = []

    def factory(**options: Any) -> LocalCluster:
        local = start_local_cluster(tmp_path / f"cluster-{len(started)}", **options)
        started.append(local)
        return local

    try:
        yield factory
    finally:
        for local in started:
            local.down()


def pytest_configure(config: pytest.Config) -> None:
    """Run every async test on uvloop, the loop the gateway runs on in production."""
    asyncio.set_event_loop_policy(_CheckedPolicy())


class LeakedResources(AssertionError):
    """A test's event loop still held open transports or handles when it was closed."""


class CheckedLoop(uvloop.Loop):  # type: ignore[misc]
    """A uvloop loop whose ``close()`` fails the test when something was left open.

    uvloop closes the handles still open at ``close()`` with a ``ResourceWarning`` per handle,
    raised from a libuv callback that cannot propagate it. With ``filterwarnings = error`` that
    warning aborted the callback before the handle was closed, and ``close()`` then waited for
    it for ever: a leaked connection hung the whole run. Here the warnings are recorded while
    the loop closes, every handle gets closed, and the leak fails the test instead.
    """

    def close(self) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            super().close()
        leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        for w in caught:  # any other warning goes on as it would have (an error, here)
            if not issubclass(w.category, ResourceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if leaked:
            raise LeakedResources("left open when the event loop closed: " + "; ".join(leaked))


class _CheckedPolicy(asyncio.DefaultEventLoopPolicy):
    """The event loop policy of the tests: every new loop is a :class:`CheckedLoop`."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return CheckedLoop()


@pytest.fixture(scope="module")
def hooks() -> Iterator[WebhookReceiver]:
    """A webhook receiver on loopback, one per test module (for the nodes it starts)."""
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
async def store_factory(cluster: LocalCluster) -> AsyncIterator[StoreFactory]:
    """Presence stores with their own shard links; all closed after the test."""
    opened = contextlib.AsyncExitStack()
    initialised: set[str] = set()

    async def make(
        owner: str,
        *,
        lease_ms: int | None = None,
        hold_ms: int = 200,
        topology: Path | str | None = None,
    ) -> RedisPresenceStore:
        path = str(topology or cluster.topology_path)
        topo = load_topology(path)
        if path not in initialised:
            init_shards(topo)
            initialised.add(path)
        stack = await opened.enter_async_context(
            shard_stack(topo, owner=owner, hold_ms=hold_ms, entry_ttl_ms=60_000)
        )
        assert stack.store is not None
        if lease_ms is not None:
            for shard in range(len(stack.shards.links)):
                await stack.store.lease(shard, lease_ms, first=True, gap_ms=0, grace_ms=0)
        return stack.store

    yield make
    await opened.aclose()
