"""The Pub/Sub message codec shared with the function library."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.store import wire


def test_member_added_round_trip_with_any_user_id() -> None:
    for user in ["42", "a\0b", "\0", "ünï\0cødé", "x" * 300]:
        data = wire.encode_member_added(user, '{"n":1}', "1.2")
        assert wire.decode(data) == wire.MemberAdded("1.2", user, '{"n":1}')
    assert wire.decode(wire.encode_member_added("u", None)) == wire.MemberAdded(None, "u", None)


@given(st.text(min_size=1, max_size=64), st.one_of(st.none(), st.text(max_size=64)))
def test_member_added_fuzz(user: str, info: str | None) -> None:
    decoded = wire.decode(wire.encode_member_added(user, info, "9.9"))
    assert decoded == wire.MemberAdded("9.9", user, info or None)


def test_other_kinds() -> None:
    assert wire.decode(wire.encode_event('{"event":"e"}', "1.1")) == wire.EventMessage(
        "1.1", '{"event":"e"}'
    )
    assert wire.decode(wire.encode_event("{}")) == wire.EventMessage(None, "{}")
    assert wire.decode(b"Ru\0x") == wire.MemberRemoved("u\0x")
    assert wire.decode(b"C17") == wire.CountMessage(17)
    assert wire.decode(wire.encode_terminate()) == wire.Terminate()


@pytest.mark.parametrize(
    "data",
    [b"", b"X", b"Enosep", b"M1.1", b"M1.1\x00", b"M1.1\x00u1", b"M\x009:short", b"M\x00x:u",
     b"A1.1\x00u1\x00{}",
     b"C", b"C-1", b"C1x", b"R\xff", b"E\x00\xff"],
)  # fmt: skip
def test_malformed_messages_are_dropped(data: bytes) -> None:
    assert wire.decode(data) is None
