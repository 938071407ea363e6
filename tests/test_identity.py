"""The shard identity check on given answers (no Redis): role, presence, place, epoch."""

from __future__ import annotations

import dataclasses

import pytest

from gateway._native import key_slot
from gateway.shards.identity import (
    DamagedIdentity,
    IdentityMismatch,
    MisplacedIdentity,
    MissingIdentity,
    ShardIdentity,
    check_identity,
    expected_identities,
)
from gateway.shards.topology import TopologyConfig

TOPOLOGY = TopologyConfig.from_dict(
    {
        "cluster": "prod",
        "shards": [
            {"name": "shard-0", "master": "10.0.1.1:6379"},
            {"name": "shard-1", "master": "10.0.1.2:6379"},
        ],
    }
)
EXPECTED = expected_identities(TOPOLOGY)
HELD = dataclasses.replace(EXPECTED[1], uuid="a" * 32, epoch=3)


def _stored(identity: ShardIdentity) -> dict[str, str]:
    return identity.to_hash(lib="4")


def test_expected_identities_split_the_slots_and_tag_each_shard() -> None:
    assert [(e.cluster, e.name, e.index, e.shards) for e in EXPECTED] == [
        ("prod", "shard-0", 0, 2),
        ("prod", "shard-1", 1, 2),
    ]
    assert [e.slots for e in EXPECTED] == ["0-8191", "8192-16383"]
    for e in EXPECTED:
        first, last = (int(x) for x in e.slots.split("-"))
        assert first <= key_slot(e.tag.encode()) <= last


def test_the_shard_it_is_taken_for_passes() -> None:
    assert check_identity("master", _stored(HELD), expected=EXPECTED[1]) == HELD


def test_a_replica_is_refused() -> None:
    with pytest.raises(IdentityMismatch, match="^server is a slave, not a master$") as info:
        check_identity("slave", _stored(HELD), expected=EXPECTED[1])
    assert type(info.value) is IdentityMismatch


def test_a_server_without_identity_is_refused() -> None:
    with pytest.raises(MissingIdentity, match="holds no shard identity"):
        check_identity("master", {}, expected=EXPECTED[1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"uuid": None}, "lacks field 'uuid'"),
        ({"epoch": "three"}, "malformed number"),
    ],
)
def test_a_damaged_identity_is_refused(change: dict[str, str | None], message: str) -> None:
    stored = {k: v for k, v in {**_stored(HELD), **change}.items() if v is not None}
    with pytest.raises(DamagedIdentity, match=message):
        check_identity("master", stored, expected=None)


@pytest.mark.parametrize(
    "other",
    [
        dataclasses.replace(HELD, cluster="staging"),
        dataclasses.replace(HELD, name="shard-0", index=0, slots="0-8191"),
        dataclasses.replace(HELD, shards=3),
        dataclasses.replace(HELD, slots="8192-16000"),
    ],
)
def test_another_place_is_refused_naming_both(other: ShardIdentity) -> None:
    with pytest.raises(MisplacedIdentity) as info:
        check_identity("master", _stored(other), expected=EXPECTED[1])
    assert info.value.found == other
    assert str(info.value) == f"server is {other.place}, expected {EXPECTED[1].place}"
    # Without an expected place (identity verification off) only role and presence count.
    assert check_identity("master", _stored(other), expected=None) == other


def test_a_new_uuid_needs_a_newer_epoch() -> None:
    same_epoch = dataclasses.replace(HELD, uuid="b" * 32)
    with pytest.raises(IdentityMismatch, match="at epoch 3, but this shard is uuid a+ at epoch 3"):
        check_identity("master", _stored(same_epoch), expected=EXPECTED[1], previous=HELD)
    newer = dataclasses.replace(same_epoch, epoch=4)
    assert check_identity("master", _stored(newer), expected=EXPECTED[1], previous=HELD) == newer
    assert check_identity("master", _stored(HELD), expected=EXPECTED[1], previous=HELD) == HELD
