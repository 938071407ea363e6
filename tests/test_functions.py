"""The function library on real shards: every refusal reason, before any effect."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from support import raw_client

from gateway._native import SlotTable, build_batches, pack_command, write_tag
from gateway.localcluster import LocalCluster
from gateway.shards.admin import (
    ShardInitError,
    init_shards,
    library_source,
    read_identity,
)
from gateway.shards.contract import IDENTITY_KEY
from gateway.shards.topology import TopologyConfig, load_topology


def _fcall(client: redis.Redis, uuid: str, epoch: int, ops: list[tuple[str, str, str, list[str]]]):
    """FCALL pg_apply with explicit tags: ops = [(op, key, tag, args)]."""
    keys = [key for _, key, _, _ in ops]
    argv: list[Any] = [uuid, str(epoch)]
    for op, _, tag, args in ops:
        argv += [op, tag, str(len(args)), *args]
    return client.execute_command("FCALL", "pg_apply", len(keys), *keys, *argv)


@pytest.fixture
def shards(cluster: LocalCluster) -> list[Any]:
    """The shared topology, initialised (idempotent), with shard 0's slot keys cleaned."""
    idents = init_shards(load_topology(cluster.topology_path))
    for spec in cluster.masters():
        c = raw_client(spec.addr)
        for key in c.scan_iter(match="{t:*"):
            c.delete(key)
    return idents


def _key_on(table: SlotTable, shard: int, stem: str) -> str:
    for n in range(10_000):
        key = f"{{t:{stem}-{n}}}:pres"
        if table.shard_for_key(key.encode()) == shard:
            return key
    raise AssertionError("no key found")


def test_identity_replicated_to_replicas(cluster: LocalCluster, shards: list[Any]) -> None:
    for i, ident in enumerate(shards):
        for replica in cluster.replicas_of(i):
            found = read_identity(raw_client(replica.addr))
            assert found == ident


def test_verified_write_applies(cluster: LocalCluster, shards: list[Any]) -> None:
    table = SlotTable.even(shards[0].epoch, [s.uuid for s in shards])
    for i, ident in enumerate(shards):
        key = _key_on(table, i, "ok")
        client = raw_client(cluster.masters()[i].addr)
        tag = write_tag(ident.uuid, ident.epoch, key.encode())
        assert _fcall(
            client, ident.uuid, ident.epoch, [("hset", key, tag, ["f", "v", "60000"])]
        ) == [1]
        assert client.hget(key, "f") == b"v"
        assert 0 < client.pttl(key) <= 60000


def test_wrong_shard_refused_without_effect(cluster: LocalCluster, shards: list[Any]) -> None:
    _, s1 = shards
    client0 = raw_client(cluster.masters()[0].addr)
    key = "{t:misrouted}:pres"
    tag = write_tag(s1.uuid, s1.epoch, key.encode())
    with pytest.raises(redis.ResponseError, match="^WRONGSHARD"):
        _fcall(client0, s1.uuid, s1.epoch, [("hset", key, tag, ["f", "v", "0"])])
    assert client0.exists(key) == 0


def test_stale_epoch_refused(cluster: LocalCluster, shards: list[Any]) -> None:
    s0 = shards[0]
    client0 = raw_client(cluster.masters()[0].addr)
    key = "{t:stale}:pres"
    old = s0.epoch + 5
    with pytest.raises(redis.ResponseError, match="^STALEEPOCH"):
        _fcall(
            client0,
            s0.uuid,
            old,
            [("hset", key, write_tag(s0.uuid, old, key.encode()), ["f", "v", "0"])],
        )
    assert client0.exists(key) == 0


def test_bad_tag_refuses_only_that_op(cluster: LocalCluster, shards: list[Any]) -> None:
    s0 = shards[0]
    client0 = raw_client(cluster.masters()[0].addr)
    good, bad = "{t:good}:pres", "{t:bad}:pres"
    wrong_tag = write_tag(s0.uuid, s0.epoch, b"{t:other}:pres")  # a tag moved to another key
    reply = _fcall(
        client0,
        s0.uuid,
        s0.epoch,
        [
            ("hset", good, write_tag(s0.uuid, s0.epoch, good.encode()), ["f", "v", "0"]),
            ("hset", bad, wrong_tag, ["f", "v", "0"]),
        ],
    )
    assert reply[0] == 1
    assert isinstance(reply[1], redis.ResponseError) and str(reply[1]).startswith("BADTAG")
    assert client0.exists(good) == 1
    assert client0.exists(bad) == 0


def test_bad_op_and_framing(cluster: LocalCluster, shards: list[Any]) -> None:
    s0 = shards[0]
    client0 = raw_client(cluster.masters()[0].addr)
    key = "{t:badop}:pres"
    tag = write_tag(s0.uuid, s0.epoch, key.encode())
    reply = _fcall(client0, s0.uuid, s0.epoch, [("flushall", key, tag, [])])
    assert str(reply[0]).startswith("BADOP")
    reply = _fcall(client0, s0.uuid, s0.epoch, [("hset", key, tag, ["only-one-arg"])])
    assert str(reply[0]).startswith("BADOP")
    # argc pointing past the end: the whole call is refused before any effect.
    with pytest.raises(redis.ResponseError, match="^BADOP"):
        client0.execute_command("FCALL", "pg_apply", 1, key, s0.uuid, s0.epoch, "hset", tag, "9")
    assert client0.exists(key) == 0


def test_replica_refuses_with_readonly(cluster: LocalCluster, shards: list[Any]) -> None:
    s0 = shards[0]
    replica = raw_client(cluster.replicas_of(0)[0].addr)
    key = "{t:replica}:pres"
    with pytest.raises(redis.ReadOnlyError):
        _fcall(
            replica,
            s0.uuid,
            s0.epoch,
            [("hset", key, write_tag(s0.uuid, s0.epoch, key.encode()), ["f", "v", "0"])],
        )


def test_native_batches_accepted_by_shard(cluster: LocalCluster, shards: list[Any]) -> None:
    """Bytes packed by the native module are exactly what the library expects."""
    table = SlotTable.even(shards[0].epoch, [s.uuid for s in shards])
    ops = [
        (b"hset", f"{{t:batch-{n}}}:pres".encode(), [b"f", str(n).encode(), b"60000"])
        for n in range(300)
    ]
    for batch in build_batches(table, ops, group=64):
        client = raw_client(cluster.masters()[batch.shard].addr)
        conn = client.connection_pool.get_connection()
        try:
            conn.send_packed_command([batch.payload])
            replies = [conn.read_response() for _ in range(batch.n_commands)]
        finally:
            client.connection_pool.release(conn)
        flat = [r for reply in replies for r in reply]
        assert flat == [1] * len(batch.op_indices)
    for n in range(300):
        key = f"{{t:batch-{n}}}:pres".encode()
        client = raw_client(cluster.masters()[table.shard_for_key(key)].addr)
        assert client.hget(key, "f") == str(n).encode()
    assert pack_command([b"PING"]) == b"*1\r\n$4\r\nPING\r\n"


def test_no_identity(fresh_cluster: LocalCluster) -> None:
    client = raw_client(fresh_cluster.masters()[0].addr)

    client.execute_command("FUNCTION", "LOAD", "REPLACE", library_source())
    key = "{t:x}:pres"
    with pytest.raises(redis.ResponseError, match="^NOIDENTITY"):
        _fcall(client, "u", 1, [("del", key, write_tag("u", 1, key.encode()), [])])


def test_init_is_idempotent_and_refuses_foreign_identity(fresh_cluster: LocalCluster) -> None:
    topo = load_topology(fresh_cluster.topology_path)
    first = init_shards(topo)
    assert [i.epoch for i in first] == [1, 1]
    again = init_shards(topo)
    assert again == first
    # Another deployment's identity on shard 1: refused unless forced.
    client1 = raw_client(fresh_cluster.masters()[1].addr)
    client1.hset(IDENTITY_KEY, "cluster", "other")
    with pytest.raises(ShardInitError, match="refusing to overwrite"):
        init_shards(topo)
    forced = init_shards(topo, force=True)
    assert {i.epoch for i in forced} == {2}
    assert forced[0].uuid != first[0].uuid
    assert read_identity(client1) == forced[1]


def test_init_refuses_same_server_twice(fresh_cluster: LocalCluster) -> None:
    data = fresh_cluster.topology()
    data = {**data, "sentinels": []}
    data["shards"] = [dict(s) for s in data["shards"]]
    data["shards"][1]["master"] = data["shards"][0]["master"]
    with pytest.raises(ShardInitError, match="same server"):
        init_shards(TopologyConfig.from_dict(data))
