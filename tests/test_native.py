"""The native write path (gateway._native) against its pure-Python reference and real Redis."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polling import wait_until

from gateway import _native as native
from gateway._native import (
    BadOpError,
    BadTagError,
    NoIdentityError,
    ReadOnlyError,
    ReplyError,
    ReplyReader,
    RespError,
    RoutingError,
    StaleEpochError,
    WrongShardError,
)
from gateway.config import AppConfig
from gateway.protocol.auth import sign, verify_channel_auth
from gateway.protocol.channels import channel_error, classify
from gateway.protocol.limits import DEFAULT_LIMITS, Limits
from gateway.protocol.messages import (
    ClientSubscribe,
    ClientUnsubscribe,
    FlatRoster,
    PresenceMember,
    member_added,
    member_removed,
    parse_channel_data,
    parse_client_message,
    presence_data,
    presence_succeeded,
    subscription_succeeded,
)
from gateway.shards import contract
from gateway.shards import reference as ref

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "key_slot.tsv"
REDIS_SERVER = "/usr/bin/redis-server"

# ---------------------------------------------------------------------------- strategies

brace_heavy = st.binary(max_size=24) | st.lists(
    st.sampled_from([b"{", b"}", b"a", b"b", b"\x00", b"\xff", b":"]), max_size=16
).map(b"".join)
uuids = st.text(alphabet="0123456789abcdef", min_size=1, max_size=40)
epochs = st.integers(min_value=1, max_value=2**63 - 1)
args_st = st.lists(st.binary(max_size=40), max_size=4)
op_st = st.tuples(
    st.sampled_from([b"hset", b"hdel", b"del", b"pexpire", b""]), brace_heavy, args_st
)


def table_pair(n: int, epoch: int = 1) -> tuple[native.SlotTable, ref.SlotTable]:
    ids = [f"{i:032x}" for i in range(n)]
    return native.SlotTable.even(epoch, ids), ref.SlotTable.even(epoch, ids)


# ---------------------------------------------------------------------------- key_slot


def test_key_slot_shared_vectors() -> None:
    if not VECTORS.exists():
        pytest.skip(f"{VECTORS} not found")
    rows = [
        line.split("\t")
        for line in VECTORS.read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert len(rows) > 3000
    for hex_key, slot in rows:
        key = bytes.fromhex(hex_key)
        assert native.key_slot(key) == int(slot), hex_key
        assert ref.key_slot(key) == int(slot), hex_key


def test_key_slot_known() -> None:
    assert native.key_slot(b"foo") == 12182
    assert native.key_slot(b"{user1000}.following") == native.key_slot(b"user1000")
    assert native.key_slot(b"foo{}{bar}") == ref.crc16(b"foo{}{bar}") % 16384
    assert ref.crc16(b"123456789") == 0x31C3


@given(brace_heavy)
def test_key_slot_matches_reference(key: bytes) -> None:
    assert native.key_slot(key) == ref.key_slot(key)


def test_key_slot_rejects_str() -> None:
    with pytest.raises(TypeError):
        native.key_slot("foo")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- write_tag


def test_write_tag_definition() -> None:
    import hashlib

    want = hashlib.sha1(b"u:42:k").hexdigest()[:16]
    assert native.write_tag("u", 42, b"k") == want == ref.write_tag("u", 42, b"k")


@given(uuids | st.text(max_size=10), epochs, brace_heavy)
def test_write_tag_matches_reference(uuid: str, epoch: int, key: bytes) -> None:
    assert native.write_tag(uuid, epoch, key) == ref.write_tag(uuid, epoch, key)


@pytest.mark.parametrize(
    ("epoch", "exc"), [(0, ValueError), (-1, ValueError), (2**64, ValueError), (True, TypeError)]
)
def test_write_tag_bad_epoch(epoch: int, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        native.write_tag("u", epoch, b"k")
    with pytest.raises(exc):
        ref.write_tag("u", epoch, b"k")


# ---------------------------------------------------------------------------- pack_command


def test_pack_command_exact() -> None:
    assert native.pack_command([b"SET", "k\u00e9", -5, 2**70]) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa9\r\n$2\r\n-5\r\n$22\r\n1180591620717411303424\r\n"
    )
    assert native.pack_command(()) == b"*0\r\n"


@given(st.lists(st.binary(max_size=30) | st.text(max_size=10) | st.integers(), max_size=8))
def test_pack_command_matches_reference(args: list[bytes | str | int]) -> None:
    assert native.pack_command(args) == ref.pack_command(args)


@pytest.mark.parametrize("bad", [[1.5], [True], [None], b"SET", "SET", [bytearray(b"x")]])
def test_pack_command_rejects(bad: object) -> None:
    with pytest.raises(TypeError):
        native.pack_command(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ref.pack_command(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- SlotTable


def test_slot_table_lookups() -> None:
    t = native.SlotTable(5, ["a", "b"], [(0, 8191), (8192, 16383)])
    assert (t.epoch, t.num_shards, t.uuid(0), t.uuid(1)) == (5, 2, "a", "b")
    assert t.shard_of_slot(8191) == 0
    assert t.shard_of_slot(8192) == 1
    assert t.shard_for_key(b"foo") == 1
    assert native.SlotTable.even_ranges(3) == ref.even_ranges(3)
    assert native.SlotTable.even_ranges(2) == [(0, 8191), (8192, 16383)]
    for bad in (-1, 16384):
        with pytest.raises(ValueError, match="out of range"):
            t.shard_of_slot(bad)
    with pytest.raises(ValueError, match="out of range"):
        t.uuid(2)


@given(st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=16383))
def test_slot_table_matches_reference(n: int, slot: int) -> None:
    nat, py = table_pair(n)
    assert nat.shard_of_slot(slot) == py.shard_of_slot(slot)
    assert native.SlotTable.even_ranges(n) == ref.SlotTable.even_ranges(n)


@pytest.mark.parametrize(
    ("epoch", "ids", "ranges", "message"),
    [
        (0, ["a"], [(0, 16383)], "epoch must be >= 1"),
        (1, [], [], "at least one shard"),
        (1, ["a", "b"], [(0, 16383)], "2 uuids but 1 slot ranges"),
        (1, [""], [(0, 16383)], "uuid of shard 0"),
        (1, ["caf\u00e9"], [(0, 16383)], "uuid of shard 0"),
        (1, ["a"], [(0, 16384)], "outside"),
        (1, ["a", "b"], [(0, 100), (100, 16383)], "slot 100 is in the ranges of both"),
        (1, ["a", "b"], [(0, 100), (102, 16383)], "slot 101 is not in any"),
        (1, ["a", "b"], [(0, 100), (16383, 101)], "starts after it ends"),
    ],
)
def test_slot_table_validation(
    epoch: int, ids: list[str], ranges: list[tuple[int, int]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        native.SlotTable(epoch, ids, ranges)
    with pytest.raises(ValueError, match=message):
        ref.SlotTable(epoch, ids, ranges)


def test_slot_table_type_errors() -> None:
    with pytest.raises(TypeError):
        native.SlotTable("1", ["a"], [(0, 16383)])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native.SlotTable(1, "a", [(0, 16383)])
    with pytest.raises(ValueError, match="number of shards"):
        native.SlotTable.even_ranges(0)
    for module in (native, ref):
        with pytest.raises(ValueError, match="at least one shard"):
            module.SlotTable.even(1, [])


# ---------------------------------------------------------------------------- build_batches


def test_build_batches_framing() -> None:
    nat, _ = table_pair(1, epoch=3)
    uuid = nat.uuid(0)
    [batch] = native.build_batches(nat, [(b"hset", b"k", [b"f", b"v", b"0"]), (b"del", b"j", ())])
    tag_k, tag_j = native.write_tag(uuid, 3, b"k"), native.write_tag(uuid, 3, b"j")
    cmd: list[bytes | str | int] = ["FCALL", "pg_apply", 2, b"k", b"j", uuid, 3]
    cmd += [b"hset", tag_k, 3, b"f", b"v", b"0", b"del", tag_j, 0]
    assert batch.payload == native.pack_command(cmd)
    assert (batch.shard, batch.op_indices, batch.n_commands) == (0, [0, 1], 1)
    assert native.build_batches(nat, []) == []


@settings(max_examples=200)
@given(
    st.lists(op_st, max_size=40),
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=1, max_value=6),
    epochs,
)
def test_build_batches_matches_reference(
    ops: list[tuple[bytes, bytes, list[bytes]]], shards: int, group: int, epoch: int
) -> None:
    nat_table, ref_table = table_pair(shards, epoch)
    got = native.build_batches(nat_table, ops, group=group)
    want = ref.build_batches(ref_table, ops, group=group)
    assert [(b.shard, b.payload, b.op_indices, b.n_commands) for b in got] == [
        (b.shard, b.payload, b.op_indices, b.n_commands) for b in want
    ]
    assert sorted(i for b in got for i in b.op_indices) == list(range(len(ops)))


def test_build_batches_bad_input() -> None:
    t, _ = table_pair(2)
    with pytest.raises(ValueError, match="group"):
        native.build_batches(t, [], group=0)
    bad_ops: list[object] = [
        [(b"hset", "k", [])],
        [(b"hset", b"k", [b"f", 1])],
        [(b"hset", b"k", b"args")],
        [[b"hset", b"k", []]],
        [(b"hset", b"k")],
    ]
    for ops in bad_ops:
        with pytest.raises(TypeError):
            native.build_batches(t, ops)  # type: ignore[arg-type]


def test_map_replies() -> None:
    t, _ = table_pair(1)
    ops = [(b"del", f"k{i}".encode(), ()) for i in range(5)]
    [batch] = native.build_batches(t, ops, group=2)
    assert batch.n_commands == 3
    err = WrongShardError("WRONGSHARD other")
    results = batch.map_replies([[1, 0], err, [BadTagError("BADTAG x")]])
    assert results[:2] == [1, 0]
    assert results[2] is err
    assert results[3] is err
    assert isinstance(results[4], BadTagError)
    with pytest.raises(RespError, match="expected 3 replies"):
        batch.map_replies([[1, 0], err])
    with pytest.raises(RespError, match="elements"):
        batch.map_replies([[1], err, [1]])
    with pytest.raises(RespError, match="neither"):
        batch.map_replies([[1, 0], "OK", [1]])


# ---------------------------------------------------------------------------- ReplyReader

WIRE = (
    b"+OK\r\n"
    b"-ERR unknown command\r\n"
    b":-42\r\n"
    b"$5\r\nhe\r\no\r\n"
    b"$-1\r\n"
    b"*-1\r\n"
    b"*0\r\n"
    b"*3\r\n*2\r\n:1\r\n$0\r\n\r\n-BADTAG tag mismatch\r\n+x\r\n"
    b"$0\r\n\r\n"
)


def check_wire_replies(replies: list[object]) -> None:
    assert replies[0] == "OK"
    assert type(replies[1]) is ReplyError
    assert replies[1].args == ("ERR unknown command",)
    assert replies[1].code == "ERR"
    assert replies[2:7] == [-42, b"he\r\no", None, None, []]
    nested = replies[7]
    assert isinstance(nested, list)
    assert nested[0] == [1, b""]
    assert isinstance(nested[1], BadTagError)
    assert nested[1].code == "BADTAG"
    assert nested[2] == "x"
    assert replies[8] == b""


def test_reader_whole() -> None:
    r = ReplyReader()
    r.feed(WIRE)
    assert r.available() == 9
    replies = r.take(9)
    assert replies is not None
    check_wire_replies(replies)


def test_reader_every_split() -> None:
    for cut in range(len(WIRE) + 1):
        r = ReplyReader()
        r.feed(WIRE[:cut])
        r.feed(WIRE[cut:])
        replies = r.take(9)
        assert replies is not None, cut
        check_wire_replies(replies)


def test_reader_byte_by_byte() -> None:
    r = ReplyReader()
    seen = 0
    for i in range(len(WIRE)):
        r.feed(WIRE[i : i + 1])
        assert r.available() >= seen
        seen = r.available()
    replies = r.take(9)
    assert replies is not None
    check_wire_replies(replies)


def test_reader_take_all_or_nothing() -> None:
    r = ReplyReader()
    r.feed(b":1\r\n:2\r\n*2\r\n:3\r\n")
    assert r.available() == 2
    assert r.take(3) is None
    assert r.take(1) == [1]
    r.feed(b":4\r\n")
    assert r.take(2) == [2, [3, 4]]
    assert r.take(0) == []
    with pytest.raises(ValueError):
        r.take(-1)


@pytest.mark.parametrize(
    ("message", "cls"),
    [
        ("WRONGSHARD expected shard-1", WrongShardError),
        ("STALEEPOCH stored 2", StaleEpochError),
        ("NOIDENTITY", NoIdentityError),
        ("READONLY You can't write against a read only replica.", ReadOnlyError),
        ("BADTAG op 3", BadTagError),
        ("BADOP nope", BadOpError),
        ("ERR something", ReplyError),
        ("WRONGSHARDX y", ReplyError),
    ],
)
def test_reader_error_classes(message: str, cls: type[ReplyError]) -> None:
    r = ReplyReader()
    r.feed(b"-" + message.encode() + b"\r\n")
    [err] = r.take(1) or []
    assert type(err) is cls
    assert isinstance(err, ReplyError)
    assert isinstance(err, RuntimeError)
    assert err.args == (message,)
    assert err.code == message.split(" ", maxsplit=1)[0]
    routing = cls in {WrongShardError, StaleEpochError, NoIdentityError, ReadOnlyError}
    assert isinstance(err, RoutingError) == routing


def test_exception_hierarchy() -> None:
    assert issubclass(RespError, ValueError)
    assert issubclass(ReplyError, RuntimeError)
    e = StaleEpochError("STALEEPOCH now 3")
    assert (e.code, str(e)) == ("STALEEPOCH", "STALEEPOCH now 3")
    with pytest.raises(RoutingError):
        raise e


@pytest.mark.parametrize(
    "bad",
    [
        b"?\r\n",
        b":12x\r\n",
        b":\r\n",
        b":99999999999999999999\r\n",
        b"$3\r\nabcd\r\n",
        b"$-2\r\n",
        b"*-3\r\n",
        b"+a\rb\r\n",
        b"%1\r\n",
        b"*1\r\n:1\r\n!",
    ],
)
def test_reader_malformed(bad: bytes) -> None:
    r = ReplyReader()
    with pytest.raises(RespError):
        for i in range(len(bad)):
            r.feed(bad[i : i + 1])
    with pytest.raises(RespError):
        r.feed(b"+OK\r\n")
    with pytest.raises(RespError):
        r.available()
    with pytest.raises(RespError):
        r.take(0)


# ---------------------------------------------------------------------------- real Redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_redis(tmp_path: Path, *extra: str) -> Iterator[int]:
    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server not installed")
    for _attempt in range(5):
        port = _free_port()
        cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--dir", str(tmp_path), *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:

            def settled(proc: subprocess.Popen[bytes] = proc, port: int = port) -> bool:
                """It answers PING, or it exited (the port was taken: another one is tried)."""
                if proc.poll() is not None:
                    return True
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                        s.sendall(native.pack_command(["PING"]))
                        return s.recv(64).startswith(b"+PONG")
                except OSError:
                    return False

            wait_until(settled, 10, f"redis-server on port {port} to answer PING")
            if proc.poll() is None:
                yield port
                return
        finally:
            proc.kill()
            proc.wait()
    pytest.fail("could not start redis-server")


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    yield from _start_redis(tmp_path)


@pytest.fixture
def cluster_port(tmp_path: Path) -> Iterator[int]:
    yield from _start_redis(
        tmp_path, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"
    )


def test_key_slot_equals_cluster_keyslot(cluster_port: int) -> None:
    rng = random.Random(1234)
    keys = [rng.randbytes(rng.randrange(0, 24)) for _ in range(2000)]
    alphabet = [b"{", b"}", b"a", b"{}", b"x:"]
    keys += [b"".join(rng.choices(alphabet, k=rng.randrange(0, 10))) for _ in range(1000)]
    keys += [f"{{1:presence-room-{i}}}:pres".encode() for i in range(500)]
    client = redis.Redis(host="127.0.0.1", port=cluster_port)
    try:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("CLUSTER", "KEYSLOT", key)  # type: ignore[no-untyped-call]
        slots = pipe.execute()
    finally:
        client.close()
    for key, slot in zip(keys, slots, strict=True):
        assert native.key_slot(key) == slot, key


def _exchange(port: int, payload: bytes, n: int) -> list[object]:
    reader = ReplyReader()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        while reader.available() < n:
            chunk = s.recv(7)  # tiny reads exercise the incremental parser
            assert chunk, "server closed the connection"
            reader.feed(chunk)
    replies = reader.take(n)
    assert replies is not None
    return replies


def test_pipeline_against_redis(redis_port: int) -> None:
    commands: list[list[bytes | str | int]] = [
        [b"SET", b"k", b"v\r\nv"],
        ["GET", "k"],
        ["HSET", "h", "f", 1, "g", b"2"],
        ["HGETALL", "h"],
        ["NOSUCHCOMMAND", 1],
        ["GET", "h"],
        ["GET", "missing"],
        ["INCRBY", "n", -5],
    ]
    payload = b"".join(native.pack_command(c) for c in commands)
    replies = _exchange(redis_port, payload, 8)
    assert replies[:4] == ["OK", b"v\r\nv", 2, [b"f", b"1", b"g", b"2"]]
    assert type(replies[4]) is ReplyError
    assert replies[4].code == "ERR"
    assert type(replies[5]) is ReplyError
    assert replies[5].code == "WRONGTYPE"
    assert replies[6:] == [None, -5]


# A stand-in for the real library: checks the framing and the tags the way the shard does.
TEST_LIBRARY = """#!lua name=pgtest
redis.register_function('pg_apply', function(keys, argv)
  if argv[1] ~= 'shard-good' then
    return redis.error_reply('WRONGSHARD this is shard-good')
  end
  local out = {}
  local i = 3
  for k = 1, #keys do
    local op, tag, argc = argv[i], argv[i + 1], tonumber(argv[i + 2])
    local want = string.sub(redis.sha1hex(argv[1] .. ':' .. argv[2] .. ':' .. keys[k]), 1, 16)
    if tag ~= want then
      out[k] = redis.error_reply('BADTAG tag mismatch')
    elseif op == 'hset' and argc == 2 then
      out[k] = redis.call('HSET', keys[k], argv[i + 3], argv[i + 4])
    else
      out[k] = redis.error_reply('BADOP ' .. op)
    end
    i = i + 3 + argc
  end
  if i ~= #argv + 1 then
    return redis.error_reply('ERR bad framing')
  end
  return out
end)
"""


def test_batches_against_redis_function(redis_port: int) -> None:
    table = native.SlotTable(4, ["shard-good", "shard-bad"], native.SlotTable.even_ranges(2))
    [loaded] = _exchange(
        redis_port, native.pack_command(["FUNCTION", "LOAD", "REPLACE", TEST_LIBRARY]), 1
    )
    assert loaded == b"pgtest"
    ops: list[tuple[bytes, bytes, list[bytes]]] = [
        (b"hset", f"{{1:presence-room-{i}}}:pres".encode(), [b"node-a/user-%d" % i, b"{}"])
        for i in range(40)
    ]
    ops.append((b"nope", b"{1:presence-room-0}:pres", []))
    batches = native.build_batches(table, ops, group=8)
    assert [b.shard for b in batches] == [0, 1]
    good, bad = batches
    tampered_key = ops[good.op_indices[3]][1]
    tag = native.write_tag("shard-good", 4, tampered_key).encode()
    payload = good.payload.replace(tag, b"0" * 16)

    results = good.map_replies(_exchange(redis_port, payload, good.n_commands))
    for pos, (i, result) in enumerate(zip(good.op_indices, results, strict=True)):
        if pos == 3:
            assert isinstance(result, BadTagError)
        elif ops[i][0] == b"nope":
            assert isinstance(result, BadOpError)
        else:
            assert result == 1

    results = bad.map_replies(_exchange(redis_port, bad.payload, bad.n_commands))
    assert len(results) == len(bad.op_indices)
    assert all(isinstance(r, WrongShardError) for r in results)
    # One error object per call, shared by the ops of that call.
    assert results[0] is results[min(7, len(results) - 1)]


# ------------------------------------------------------ client frame fast path vs reference

_APP = AppConfig("1", "app-key", "sëcret")
_SOCKET = "123.456"


def _reference_subscribe(text: str, limits: Limits) -> tuple[str, str, str | None] | None:
    """What gateway.protocol makes of a frame, where the native fast path may answer."""
    message = parse_client_message(text, limits)
    if not isinstance(message, ClientSubscribe) or message.channel_data is None:
        return None
    name = message.channel
    if channel_error(name, max_length=limits.max_channel_name_length) is not None:
        return None
    if not classify(name).is_presence or not message.auth:
        return None
    if verify_channel_auth(_APP, _SOCKET, name, message.auth, message.channel_data) is not None:
        return None
    member = parse_channel_data(message.channel_data, limits)
    if not isinstance(member, PresenceMember):
        return None
    return name, member.user_id, member.user_info


def _reference_frame(text: str, limits: Limits) -> tuple[str, str, str | None] | str | None:
    """What gateway.protocol makes of a frame, in the fast path's terms."""
    message = parse_client_message(text, limits)
    if isinstance(message, ClientUnsubscribe):
        return message.channel
    return _reference_subscribe(text, limits)


def _native_subscribe(text: str, limits: Limits) -> tuple[str, str, str | None] | None:
    answer = _native_frame(text, limits)
    return answer if isinstance(answer, tuple) else None


def _native_frame(text: str, limits: Limits) -> tuple[str, str, str | None] | str | None:
    return native.client_frame(
        text,
        _SOCKET,
        _APP.key,
        _APP.secret,
        max_frame_bytes=limits.max_frame_bytes,
        max_channel_name_length=limits.max_channel_name_length,
        max_user_id_length=limits.max_presence_user_id_length,
        max_user_info_bytes=limits.max_user_info_bytes,
    )


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["\x7f", "é", "\U0001f600", '"\\/', "\n\t\x00"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_channels = st.sampled_from(
    ["presence-room", "presence-cache-x", "private-room", "presence-", "presence-a b", "presence-é",
     "#server-to-user-1", "presence-" + "x" * 200, "presence-=@,.;_-9"]
)  # fmt: skip


@st.composite
def _subscribe_frames(draw: st.DrawFn) -> str:
    # Mostly frames the fast path takes, so that its answers get compared.
    channel = draw(st.just("presence-room") | _channels)
    member: dict[str, object] = {}
    if draw(st.integers(0, 4)):
        member["user_id"] = draw(
            st.text(min_size=1, max_size=6)
            | st.integers()
            | st.text(max_size=6)
            | st.booleans()
            | st.floats()
            | st.none()
        )
    if draw(st.booleans()):
        member["user_info"] = draw(_json_values)
    ascii_only, seps = draw(st.booleans()), draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    data = json.dumps(member, ensure_ascii=ascii_only, separators=seps)
    if not draw(st.integers(0, 4)):  # a duplicate key, raw
        data = data.replace("{", '{"user_info":{"a":1},', 1) if data != "{}" else data
    if draw(st.booleans()):
        data = data.replace(":", ": ").replace("{", " { ")
    signature = sign(_APP.secret, f"{_SOCKET}:{channel}:{data}")
    auth = draw(
        st.sampled_from(
            [f"{_APP.key}:{signature}"] * 6
            + [f"{_APP.key}:{signature.upper()}", f"x:{signature}", "",
             f"{_APP.key}:{signature[:-1]}", f"{_APP.key}:{signature}0"]
        )
    )  # fmt: skip
    payload: dict[str, object] = {"channel": channel, "auth": auth, "channel_data": data}
    frame: object = {"event": "pusher:subscribe", "data": payload}
    if not draw(st.integers(0, 4)):
        frame = {"event": "pusher:subscribe", "data": json.dumps(payload)}
    return json.dumps(frame, ensure_ascii=draw(st.booleans()))


@given(_subscribe_frames(), st.sampled_from([DEFAULT_LIMITS, Limits(max_user_info_bytes=20)]))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_presence_subscribe_fast_path_agrees_with_the_reference(text: str, limits: Limits) -> None:
    native_answer = _native_subscribe(text, limits)
    if native_answer is not None:
        assert native_answer == _reference_subscribe(text, limits)


@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_client_frame_fast_path_never_accepts_junk(text: str) -> None:
    answer = _native_frame(text, DEFAULT_LIMITS)
    assert answer is None or answer == _reference_frame(text, DEFAULT_LIMITS)


@pytest.mark.parametrize(
    "member",
    [
        {"user_id": "u-1"},
        {"user_id": 42, "user_info": None},
        {"user_id": "u", "user_info": {"name": "Zoë", "n": [1, -2, True, None, "\U0001f600\x7f"]}},
        {"user_id": "u", "user_info": {}},
    ],
)
@pytest.mark.parametrize("seps", [(",", ":"), (", ", ": ")])
def test_presence_subscribe_fast_path_takes_the_common_frames(
    member: dict[str, object], seps: tuple[str, str]
) -> None:
    data = json.dumps(member, separators=seps)
    channel = "presence-room"
    auth = f"{_APP.key}:{sign(_APP.secret, f'{_SOCKET}:{channel}:{data}')}"
    text = json.dumps(
        {
            "event": "pusher:subscribe",
            "data": {"channel": channel, "auth": auth, "channel_data": data},
        }
    )
    answer = _native_subscribe(text, DEFAULT_LIMITS)
    assert answer is not None
    assert answer == _reference_subscribe(text, DEFAULT_LIMITS)
    assert _native_subscribe(text + "\ud800", DEFAULT_LIMITS) is None  # no UTF-8 form: no answer


@st.composite
def _unsubscribe_frames(draw: st.DrawFn) -> str:
    channel = draw(
        st.text(max_size=8)
        | st.sampled_from(["presence-room", "é\U0001f600", "\x00\n"])
        | st.integers()
        | st.none()
    )
    data: object = {"channel": channel}
    if draw(st.booleans()):
        data = {**draw(st.dictionaries(st.text(max_size=3), _json_values, max_size=2)), **data}
    if not draw(st.integers(0, 4)):
        data = json.dumps(data)
    elif not draw(st.integers(0, 6)):
        data = draw(_json_values)
    frame = {"event": draw(st.sampled_from(["pusher:unsubscribe"] * 4 + ["pusher:ping"])),
             "data": data}  # fmt: skip
    text = json.dumps(frame, ensure_ascii=draw(st.booleans()))
    if not draw(st.integers(0, 4)):  # a duplicate key, raw
        text = text.replace('{"channel": ', '{"channel": "first", "channel": ', 1)
    return text


@given(_unsubscribe_frames(), st.sampled_from([DEFAULT_LIMITS, Limits(max_frame_bytes=40)]))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_unsubscribe_fast_path_agrees_with_the_reference(text: str, limits: Limits) -> None:
    answer = _native_frame(text, limits)
    if answer is not None:
        assert answer == _reference_frame(text, limits)


def test_unsubscribe_fast_path_takes_the_common_frame() -> None:
    text = '{"event":"pusher:unsubscribe","data":{"channel":"presence-room"}}'
    assert _native_frame(text, DEFAULT_LIMITS) == "presence-room"
    assert _native_frame(text.replace("presence-", "é-"), DEFAULT_LIMITS) == "é-room"


# ------------------------------------------------------------ presence frames vs reference

_ids = st.text(max_size=6) | st.sampled_from(["u1", "u2", "é", "\U0001f600", '"\\', "\x7f"])
_infos = st.none() | _json_values.map(
    lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False)
)


def _reference_succeeded(
    channel: str, flat: list[bytes], user_id: str, user_info: str | None
) -> str:
    """What the join path builds without the native builder: dict roster, member added."""
    members = {flat[i].decode(): flat[i + 1].decode() or None for i in range(0, len(flat), 2)}
    members.setdefault(user_id, user_info)
    return subscription_succeeded(channel, presence_data(members))


@given(
    st.sampled_from(["presence-room", "presence-=@,.;_-9"]),
    st.lists(st.tuples(_ids, _infos), max_size=8),
    _ids,
    _infos,
)
@settings(max_examples=300)
def test_presence_succeeded_agrees_with_the_reference(
    channel: str, roster: list[tuple[str, str | None]], user_id: str, user_info: str | None
) -> None:
    flat: list[bytes] = []
    for uid, info in roster:
        flat += [uid.encode(), (info or "").encode()]
    expected = _reference_succeeded(channel, flat, user_id, user_info)
    assert native.presence_succeeded(channel, flat, user_id, user_info) == expected
    member = PresenceMember(user_id, user_info)
    assert presence_succeeded(channel, FlatRoster(flat), member) == expected
    assert presence_succeeded(channel, dict(FlatRoster(flat)), member) == expected
    assert contract.decode_pjoin([1, 1, flat]).roster == dict(FlatRoster(flat))


def test_presence_succeeded_leaves_the_unusual_to_the_reference() -> None:
    assert native.presence_succeeded("presence-a", [b"u"], "v", None) is None
    assert native.presence_succeeded("presence-a", [b"\xff", b""], "v", None) is None
    assert native.presence_succeeded("presence-a", [b"u", "x"], "v", None) is None
    assert native.presence_succeeded("presence-a", (b"u", b""), "v", None) is None
    assert native.presence_succeeded("presence-\ud800", [], "v", None) is None


_messages = (
    st.builds(contract.encode_member_added, _ids, _infos, st.none() | st.sampled_from(["1.2"]))
    | st.builds(contract.encode_member_removed, _ids)
    | st.builds(contract.encode_event, st.text(max_size=5), st.none() | st.just("1.2"))
    | st.builds(contract.encode_count, st.integers(0, 99))
    | st.binary(max_size=12).map(lambda b: b"M" + b)
    | st.binary(max_size=12).map(lambda b: b"R" + b)
    | st.binary(max_size=12)
)


@given(st.sampled_from(["presence-room", "presence-é"]), _messages)
@settings(max_examples=400)
def test_member_frame_agrees_with_the_reference(channel: str, data: bytes) -> None:
    message = contract.decode_message(data)
    expected: tuple[str, str | None] | None = None
    if isinstance(message, contract.MemberAdded):
        frame = member_added(channel, message.user_id, message.user_info)
        expected = frame, message.exclude
    elif isinstance(message, contract.MemberRemoved):
        expected = member_removed(channel, message.user_id), None
    assert native.member_frame(channel, data) == expected
