"""The audit and its repair on real shards (leases, the reaper, re-assertion and digests are
tested on both store implementations in test_store.py)."""

from __future__ import annotations

from support import raw_client

from gateway._native import key_slot
from gateway.localcluster import LocalCluster
from gateway.shards.admin import init_shards
from gateway.shards.topology import load_topology
from gateway.store.audit import run_audit


async def test_audit_reports_and_repairs_planted_stale_data(
    fresh_cluster: LocalCluster,
) -> None:
    topo = load_topology(fresh_cluster.topology_path)
    idents = init_shards(topo)
    m0 = raw_client(fresh_cluster.masters()[0].addr)
    # Entries of an owner that never held a lease, on a channel of shard 0.
    base = next(
        f"{{1:presence-ghost-{n}}}".encode()
        for n in range(1000)
        if key_slot(f"{{1:presence-ghost-{n}}}".encode()) < 8192
    )
    m0.hset(base + b":p", b"ghost@dead\0ghost-user", b"")
    m0.hset(base + b":u", b"ghost-user", 1)
    m0.hset(base + b":s", b"ghost@dead", 2)
    # A key of shard 1 written on shard 0, and one without expiry.
    wrong = next(
        f"{{1:elsewhere-{n}}}:s".encode()
        for n in range(1000)
        if key_slot(f"{{1:elsewhere-{n}}}:s".encode()) >= 8192
    )
    m0.hset(wrong, b"x@y", 1)
    before = await run_audit(topo)
    r0 = before[0]
    assert _text_list(r0.wrong_shard_keys) == [wrong.decode()]
    assert r0.unknown_owner_entries == {"ghost@dead": 2}
    assert base.decode() + ":p" in r0.keys_without_expiry
    assert r0.problems > 0 and before[1].problems == 0
    assert idents[0].tag
    repaired = await run_audit(topo, repair=True)
    assert repaired[0].repaired["wrong_shard_keys_deleted"] == 1
    after = await run_audit(topo)
    assert [r.problems for r in after] == [0, 0], after
    assert m0.exists(wrong) == 0
    assert m0.hlen(base + b":p") == 0


def _text_list(items: list[str]) -> list[str]:
    return sorted(items)
