"""The 2020 incident, replayed: Sentinel sends shard 1's master name to shard 0's master.

With writes flowing, every Sentinel is re-pointed (SENTINEL REMOVE + MONITOR, the operator
mistake of the real incident) so that master name ``shard-1`` resolves to shard 0's master; a
few seconds later the mistake is undone. The invariants checked:

* zero writes accepted by the wrong shard (no key of shard 1's slots ever exists on shard 0);
* every write refused during the incident is counted and applied later on the right shard;
* nothing is lost: every write's final value is on its own shard;
* shard 0's keyspace holds only its own keys afterwards (its memory did not take shard 1's data).

Two gateways are replayed: the normal one, which also verifies each server's identity on
connect (so it never sends to the wrong master), and one with that client-side check disabled,
which proves the server-side guard on its own: its writes do reach shard 0 and are all refused.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from polling import settle
from support import raw_client, shard_stack

from gateway._native import key_slot
from gateway.localcluster import LocalCluster
from gateway.shards.admin import init_shards
from gateway.shards.contract import IDENTITY_KEY
from gateway.shards.topology import load_topology

pytestmark = pytest.mark.chaos

INCIDENT_SECONDS = 3.0
WRITES_PER_TICK = 50
TICK = 0.01


async def _replay(cluster: LocalCluster, *, verify_identity: bool) -> dict[str, Any]:
    topo = load_topology(cluster.topology_path)
    idents = init_shards(topo)
    masters = [m.addr for m in cluster.masters()]
    async with shard_stack(
        topo,
        shards_options={"verify_identity": verify_identity},
        writer_options={"write_timeout": 120.0},  # held writes outlive the incident
    ) as stack:
        writer = stack.writer
        expected: dict[tuple[bytes, bytes], bytes] = {}
        pending: list[asyncio.Future[list[object]]] = []
        counter = 0
        stop = asyncio.Event()

        async def produce() -> None:
            nonlocal counter
            while not stop.is_set():
                ops = []
                for _ in range(WRITES_PER_TICK):
                    counter += 1
                    key = f"{{1:presence-room-{counter % 97}}}:pres".encode()
                    field = f"node-a/user-{counter % 1013}".encode()
                    value = f'{{"n":{counter}}}'.encode()
                    expected[(key, field)] = value
                    ops.append((b"hset", key, [field, value, b"600000"]))
                pending.append(writer.submit_many(ops))
                await asyncio.sleep(TICK)

        loop = asyncio.get_running_loop()
        producer = asyncio.create_task(produce())
        try:
            await asyncio.sleep(1.0)  # writes flow for a while before the mistake
            # The operator's mistake: shard-1 now resolves to shard 0's master on every Sentinel.
            await loop.run_in_executor(None, cluster.repoint_sentinels, "shard-1", masters[0])
            t_bad = time.monotonic()
            await asyncio.sleep(INCIDENT_SECONDS)  # the incident lasts this long
            held_at_fix = writer.held_count()
            t_fixed = time.monotonic()
            fix = loop.run_in_executor(None, cluster.repoint_sentinels, "shard-1", masters[1])
            await settle(
                lambda: writer.held_count() == 0,
                timeout=60,
                what="the writes held during the incident applied",
                step=0.01,
            )
            t_drained = time.monotonic()
            await fix
            stop.set()
            await producer
            results = await asyncio.wait_for(asyncio.gather(*pending), 60)
        finally:
            stop.set()

    flat = [r for batch in results for r in batch]
    failures = [r for r in flat if isinstance(r, BaseException)]
    m = stack.shards.metrics
    figures = {
        "writes": len(flat),
        "failed": len(failures),
        "rejected_wrong_shard": m.get("pg_writes_rejected_total", reason="wrong_shard"),
        "rejected_total": m.total("pg_writes_rejected_total"),
        "identity_rejections": m.total("pg_identity_rejections_total"),
        "retried": m.total("pg_writes_retried_total"),
        "held_at_fix": held_at_fix,
        "incident_s": round(t_fixed - t_bad, 2),
        "held_writes_applied_after_fix_s": round(t_drained - t_fixed, 2),
    }

    # Invariant checks against the real servers.
    c0 = raw_client(masters[0])
    c1 = raw_client(masters[1])
    ranges = [(0, 8191), (8192, 16383)]
    foreign_on_0 = [
        k
        for k in c0.scan_iter(count=1000)
        if k != IDENTITY_KEY and not ranges[0][0] <= key_slot(k) <= ranges[0][1]
    ]
    lost = 0
    for (key, field), value in expected.items():
        client = c0 if key_slot(key) <= ranges[0][1] else c1
        if client.hget(key, field) != value:
            lost += 1
    own_keys_0 = {key for key, _ in expected if key_slot(key) <= ranges[0][1]}
    figures["accepted_by_wrong_shard"] = len(foreign_on_0)
    figures["shard0_expected_keys"] = len(own_keys_0) + 1  # + the identity hash
    figures["lost"] = lost
    figures["shard0_keys"] = c0.dbsize()
    figures["shard0_used_memory"] = c0.info("memory")["used_memory"]
    figures["epoch"] = idents[0].epoch
    print(f"\nincident replay (verify_identity={verify_identity}): {figures}")
    assert not failures, failures[:3]
    # Shard 0 holds exactly its own keys: nothing of shard 1's took memory there.
    assert figures["shard0_keys"] == figures["shard0_expected_keys"]
    return figures


async def test_incident_replay_identity_checked(fresh_cluster: LocalCluster) -> None:
    f = await _replay(fresh_cluster, verify_identity=True)
    assert f["accepted_by_wrong_shard"] == 0
    assert f["lost"] == 0
    # The gateway noticed the wrong master and held shard 1's writes instead of sending them.
    assert f["identity_rejections"] > 0
    assert f["held_at_fix"] > 0
    assert f["retried"] >= f["held_at_fix"]


async def test_incident_replay_server_side_guard(fresh_cluster: LocalCluster) -> None:
    f = await _replay(fresh_cluster, verify_identity=False)
    # Writes really reached shard 0 and every one was refused there, then applied on shard 1.
    assert f["rejected_wrong_shard"] > 0
    assert f["accepted_by_wrong_shard"] == 0
    assert f["lost"] == 0
    assert f["retried"] >= f["rejected_wrong_shard"]
