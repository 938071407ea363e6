"""The contract with the shard function library: checked against functions.lua, the native
module and docs/store.md, so that none of them can drift from :mod:`gateway.shards.contract`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway._native import ReplyReader
from gateway.shards import contract
from gateway.shards import contract as wire
from gateway.shards.admin import library_source

ROOT = Path(__file__).resolve().parent.parent


def test_member_added_round_trip_with_any_user_id() -> None:
    for user in ["42", "a\0b", "\0", "ünï\0cødé", "x" * 300]:
        data = wire.encode_member_added(user, '{"n":1}', "1.2")
        assert wire.decode_message(data) == wire.MemberAdded("1.2", user, '{"n":1}')
    assert wire.decode_message(wire.encode_member_added("u", None)) == wire.MemberAdded(
        None, "u", None
    )


@given(st.text(min_size=1, max_size=64), st.one_of(st.none(), st.text(max_size=64)))
def test_member_added_fuzz(user: str, info: str | None) -> None:
    decoded = wire.decode_message(wire.encode_member_added(user, info, "9.9"))
    assert decoded == wire.MemberAdded("9.9", user, info or None)


def test_other_kinds() -> None:
    assert wire.decode_message(wire.encode_event('{"event":"e"}', "1.1")) == wire.EventMessage(
        "1.1", '{"event":"e"}'
    )
    assert wire.decode_message(wire.encode_event("{}")) == wire.EventMessage(None, "{}")
    assert wire.decode_message(b"Ru\0x") == wire.MemberRemoved("u\0x")
    assert wire.decode_message(b"C17") == wire.CountMessage(17)
    assert wire.decode_message(wire.encode_terminate()) == wire.Terminate()


@pytest.mark.parametrize(
    "data",
    [b"", b"X", b"Enosep", b"M1.1", b"M1.1\x00", b"M1.1\x00u1", b"M\x009:short", b"M\x00x:u",
     b"A1.1\x00u1\x00{}",
     b"C", b"C-1", b"C1x", b"R\xff", b"E\x00\xff"],
)  # fmt: skip
def test_malformed_messages_are_dropped(data: bytes) -> None:
    assert wire.decode_message(data) is None


# -- functions.lua -----------------------------------------------------------------------------


def _lua_ops() -> dict[str, tuple[int, ...]]:
    """``OPS`` of functions.lua: op name -> accepted argument counts (-1: variable)."""
    lua = library_source()
    block = lua[lua.index("local OPS = {") : lua.index("\n}\n", lua.index("local OPS = {"))]
    out: dict[str, tuple[int, ...]] = {}
    for name, arity in re.findall(r"^  (\w+) = \{(\{[\d, ]+\}|-?\d+),", block, re.MULTILINE):
        out[name] = tuple(int(n) for n in re.findall(r"-?\d+", arity))
    return out


def test_every_op_of_the_library_is_in_the_contract_with_its_arity() -> None:
    lua = _lua_ops()
    assert set(lua) == set(contract.OPS), "ops differ between functions.lua and contract.OPS"
    for name, spec in contract.OPS.items():
        if spec.pairs is not None:
            assert lua[name] == (-1,), name
            # The variable op's fixed part: functions.lua's arity_ok counts it as "argc >= 6".
            assert f"argc >= {len(spec.args)}" in library_source(), name
        else:
            assert sorted(lua[name]) == sorted({len(spec.args), *spec.legacy}), name


def test_every_read_function_is_in_the_contract() -> None:
    registered = set(re.findall(r"function_name = '(\w+)'", library_source()))
    registered |= set(re.findall(r"register_function\('(\w+)'", library_source()))
    assert registered - {"pg_apply"} == set(contract.READS)


def test_builders_match_the_table() -> None:
    key, tag, owner = b"{1:presence-x}", b"{pgs-0-1}", b"n@1"
    built = {
        "pjoin": contract.pjoin(key, owner=owner, user="u", info=None, exclude="1.1",
                                max_members=100, hold_ms=1, ttl_ms=2),
        "pleave": contract.pleave(key, owner=owner, user="u", hold_ms=1),
        "subs": contract.subs(key, owner=owner, count=1, hold_ms=1, publish=True, ttl_ms=2),
        "sync": contract.sync(key, owner=owner, count=1, members={"u": None, "v": "{}"},
                              hold_ms=1, publish=False, ttl_ms=2),
        "publish": contract.publish(key, b"T"),
        "cache": contract.cache(key, frame="{}", ttl_ms=5),
        "claim": contract.claim(tag, limit=5, lease_ms=1000),
        "ack": contract.ack(tag, ["a", "b"]),
        "defer": contract.defer(tag, ["a"], delay_ms=5),
        "hook": contract.hook(key, kind="e", rest="{}"),
        "lease": contract.lease(tag, owner=owner, lease_ms=1, first=True, gap_ms=2, grace_ms=3),
        "check": contract.check(tag, owner=owner, ttl_ms=1),
        "reap": contract.reap(tag, token="t", lock_ms=1, limit=2, hold_ms=3, grace_ms=4),
        "repair": contract.repair(key, ttl_ms=1),
        "purge": contract.purge(key, owner=owner),
        "admin": contract.admin_delete(tag, key + b":s"),
    }  # fmt: skip
    for name, (op, _, args) in built.items():
        spec = contract.OPS[name]
        assert op == name.encode()
        fixed = len(spec.args)
        if spec.pairs is None:
            assert len(args) == fixed, name
        else:
            assert len(args) == fixed + 2 * int(args[fixed - 1]), name
    assert contract.admin_expire(tag, key, ttl_ms=1)[2][0] == b"pexpire"


def test_error_names_match_the_library_and_the_native_module() -> None:
    codes = {e.code for e in contract.ERRORS}
    used = set(re.findall(r"error_reply\('([A-Z]+) ", library_source()))
    used |= set(re.findall(r"return '([A-Z]+) ", library_source()))  # check_identity's messages
    assert used <= codes, used - codes
    assert codes - used == {"READONLY"}  # Redis's own, from a replica
    for name in contract.ERRORS:
        reader = ReplyReader()
        reader.feed(f"-{name.code} something went wrong\r\n".encode())
        (reply,) = reader.take(1) or [None]
        assert type(reply) is name.exception, name.code
        assert reply.code == name.code
        assert contract.error_reason(reply) == name.reason


def test_library_publishes_the_documented_kinds() -> None:
    lua = library_source()
    published = set(re.findall(r"PUBLISH', key, '([A-Z])'", lua))
    assert published == {k for k, m in contract.MESSAGES.items() if m.publisher == "library"}


def test_store_doc_lists_the_contract() -> None:
    doc = (ROOT / "docs" / "store.md").read_text()
    begin, end = "<!-- ops:begin -->\n", "<!-- ops:end -->"
    assert begin in doc and end in doc
    section = doc[doc.index(begin) + len(begin) : doc.index(end)]
    assert section == contract.ops_markdown(), (
        "docs/store.md is out of date: replace its ops section with the output of "
        "`python -m gateway.shards.contract`"
    )


def test_the_outbox_bound_is_the_librarys() -> None:
    found = re.search(r"^local OUTBOX_MAX = (\d+)$", library_source(), re.MULTILINE)
    assert found is not None and int(found.group(1)) == contract.OUTBOX_MAX
