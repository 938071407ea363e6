"""The batched writer and shard links against real Redis and Sentinel processes."""

from __future__ import annotations

import asyncio
import logging

import pytest
from polling import settle
from support import raw_client, shard_stack

from gateway._native import BadOpError, key_slot
from gateway.localcluster import LocalCluster
from gateway.shards.admin import init_shards, library_source
from gateway.shards.shardset import discover_master
from gateway.shards.topology import Address, TopologyConfig, load_topology
from gateway.shards.writer import ShardUnavailableError, WriteFailed

# pg_apply as shipped, except that a call whose first key contains "misfit" answers one result
# short: a real reply from a real shard that does not fit the batch the gateway sent.
_REGISTRATION = "redis.register_function('pg_apply', apply)\n"
_MISFIT_REGISTRATION = """
redis.register_function('pg_apply', function(keys, argv)
  local out = apply(keys, argv)
  if out.err == nil and string.find(keys[1], 'misfit', 1, true) then table.remove(out) end
  return out
end)
"""


async def test_discover_master_by_sentinel(cluster: LocalCluster) -> None:
    topo = load_topology(cluster.topology_path)
    for i, spec in enumerate(topo.shards):
        found = await discover_master(topo.sentinels, spec.name)
        assert str(found) == cluster.masters()[i].addr
    assert await discover_master(topo.sentinels, "no-such-shard") is None


async def test_writes_land_on_their_shard(cluster: LocalCluster) -> None:
    topo = load_topology(cluster.topology_path)
    init_shards(topo)
    async with shard_stack(topo) as stack:
        writer = stack.writer
        ops = [
            (b"hset", f"{{w:room-{n}}}:pres".encode(), [b"node/u", str(n).encode(), b"60000"])
            for n in range(2000)
        ]
        results = await writer.submit_many(ops)
        assert all(r in (0, 1) for r in results)
        assert await writer.write(b"hdel", b"{w:room-1}:pres", b"node/u") == 1
        with pytest.raises(BadOpError):
            await writer.write(b"nosuchop", b"{w:room-2}:pres")
    clients = [raw_client(m.addr) for m in cluster.masters()]
    for n in range(2000):
        key = f"{{w:room-{n}}}:pres".encode()
        owner = 0 if key_slot(key) < 8192 else 1
        expected = None if n == 1 else str(n).encode()
        assert clients[owner].hget(key, "node/u") == expected
        assert clients[1 - owner].exists(key) == 0
    assert stack.shards.metrics.get("pg_writes_rejected_total", reason="bad_op") == 1


async def test_reinit_with_new_epoch_is_followed(fresh_cluster: LocalCluster) -> None:
    """After `shards init --force` the writer sees STALEEPOCH, re-verifies, re-tags, retries."""
    topo = load_topology(fresh_cluster.topology_path)
    init_shards(topo)
    async with shard_stack(topo) as stack:
        shards, writer = stack.shards, stack.writer
        assert await writer.write(b"hset", b"{w:a}:pres", b"f", b"1", b"0") == 1
        loop = asyncio.get_running_loop()
        new = await loop.run_in_executor(None, lambda: init_shards(topo, force=True))
        results = await writer.submit_many(
            [(b"hset", f"{{w:e-{n}}}:pres".encode(), [b"f", b"2", b"0"]) for n in range(100)]
        )
        assert results == [1] * 100
        assert shards.table.epoch == new[0].epoch == 2
        # The re-initialised shards have new uuids, so the first refusal names the shard.
        m = shards.metrics
        rejected = m.get("pg_writes_rejected_total", reason="wrong_shard") + m.get(
            "pg_writes_rejected_total", reason="stale_epoch"
        )
        assert rejected > 0


async def test_unavailable_shard_fails_write_after_timeout(cluster: LocalCluster) -> None:
    """A write is never dropped silently: with its shard gone it fails to the caller."""
    topo = load_topology(cluster.topology_path)
    init_shards(topo)
    static = TopologyConfig(
        cluster=topo.cluster,
        shards=tuple(
            type(s)(name=s.name, master=Address("127.0.0.1", 1) if i == 1 else s.master)
            for i, s in enumerate(topo.shards)
        ),
    )
    async with shard_stack(
        static,
        ready=False,  # shard 1 never comes up
        shards_options={"recheck_interval": 0.1, "connect_timeout": 0.2},
        writer_options={"write_timeout": 0.5},
    ) as stack:
        shards, writer = stack.shards, stack.writer
        key1 = next(
            f"{{w:x{n}}}".encode() for n in range(100) if key_slot(f"{{w:x{n}}}".encode()) >= 8192
        )
        with pytest.raises(ShardUnavailableError, match="shard-1"):
            await asyncio.wait_for(writer.write(b"del", key1), 10)
        assert shards.metrics.get("pg_writes_failed_total", reason="timeout") == 1
        assert not shards.links[1].usable
        assert "cannot connect" in shards.links[1].last_error


async def test_demoted_master_read_only_is_retried(fresh_cluster: LocalCluster) -> None:
    """A master turned replica answers READONLY: counted, held, applied once it is master."""
    topo = load_topology(fresh_cluster.topology_path)
    init_shards(topo)
    static = TopologyConfig.from_dict({**fresh_cluster.topology(), "sentinels": []})
    # Sentinel would undo the demotion below; take it out of the picture.
    for s in fresh_cluster.sentinel_processes():
        fresh_cluster.stop_process(s.addr)
    master = raw_client(fresh_cluster.masters()[0].addr)
    replica_addr = fresh_cluster.replicas_of(0)[0].addr
    key0 = next(
        f"{{w:ro{n}}}".encode() for n in range(100) if key_slot(f"{{w:ro{n}}}".encode()) < 8192
    )
    async with shard_stack(static) as stack:
        shards, writer = stack.shards, stack.writer
        assert await writer.write(b"hset", key0, b"f", b"1", b"0") == 1
        host, _, port = replica_addr.rpartition(":")
        raw_client(replica_addr).execute_command("REPLICAOF", "NO", "ONE")
        master.execute_command("REPLICAOF", host, port)
        pending = asyncio.ensure_future(writer.write(b"hset", key0, b"f", b"2", b"0"))
        await settle(
            lambda: shards.metrics.get("pg_writes_rejected_total", reason="read_only") >= 1,
            what="a READONLY refusal counted",
        )
        assert not pending.done()
        assert writer.held_count() == 1
        # The operator promotes it back: the held write is applied there.
        master.execute_command("REPLICAOF", "NO", "ONE")
        assert await asyncio.wait_for(pending, 10) == 0
        assert master.hget(key0, "f") == b"2"


async def test_reply_that_does_not_fit_fails_exactly_its_writes(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply the native module cannot map fails that batch's writes; none stays pending."""
    topo = load_topology(cluster.topology_path)
    init_shards(topo)
    source = library_source()
    assert _REGISTRATION in source
    master0 = raw_client(cluster.masters()[0].addr)
    keys = [f"{{w:misfit-{n}}}:pres".encode() for n in range(200)]
    misfits = [k for k in keys if key_slot(k) < 8192][:3]
    others = [k for k in keys if key_slot(k) >= 8192][:3]
    ops = [(b"hset", k, [b"f", b"1", b"60000"]) for k in misfits + others]
    async with shard_stack(topo) as stack:
        shards, writer = stack.shards, stack.writer
        try:
            master0.execute_command(
                "FUNCTION", "LOAD", "REPLACE", source.replace(_REGISTRATION, _MISFIT_REGISTRATION)
            )
            with caplog.at_level(logging.ERROR, logger="gateway.shards.writer"):
                results = await asyncio.wait_for(writer.submit_many(ops), 10)
            failed, applied = results[: len(misfits)], results[len(misfits) :]
            assert all(isinstance(r, WriteFailed) for r in failed), failed
            assert all("shard-0" in str(r) and "RespError" in str(r) for r in failed), failed
            # The other shard's batch of the same request is applied as usual.
            assert applied == [1] * len(others)
            m = shards.metrics
            assert m.get("pg_writes_failed_total", reason="bad_reply") == len(misfits)
            assert writer.held_count() == 0
            errors = [r for r in caplog.records if r.name == "gateway.shards.writer"]
            assert len(errors) == 1 and "shard shard-0" in errors[0].getMessage(), errors
            # The link itself is fine: a reply that fits is handled on the same connection.
            assert shards.links[0].usable
            fits = next(k for n in range(200) if key_slot(k := f"{{w:fits-{n}}}".encode()) < 8192)
            assert await writer.write(b"hset", fits, b"f", b"1", b"60000") in (0, 1)
        finally:
            master0.execute_command("FUNCTION", "LOAD", "REPLACE", source)
