"""The Sentinel vote on given answers (no Redis): majority, disagreement, ties, unreachable."""

from __future__ import annotations

import pytest

from gateway.shards.sentinel import (
    SentinelAnswer,
    SentinelUnreachable,
    parse_master_reply,
    vote,
)
from gateway.shards.topology import Address

S1, S2, S3 = (Address("10.0.0.1", 26379), Address("10.0.0.2", 26379), Address("10.0.0.3", 26379))
A, B = Address("10.0.1.1", 6379), Address("10.0.1.2", 6379)


def _down(
    sentinel: Address, why: str = "cannot connect: ConnectionRefusedError(111)"
) -> SentinelAnswer:
    return SentinelAnswer(sentinel, error=why)


def test_majority_wins() -> None:
    result = vote("shard-0", [SentinelAnswer(S1, B), SentinelAnswer(S2, A), SentinelAnswer(S3, A)])
    assert (result.master, result.votes, result.answered, result.errors) == (A, 2, 3, ())


def test_disagreement_without_majority_takes_the_most_named() -> None:
    answers = [SentinelAnswer(S1, A), SentinelAnswer(S2, B), SentinelAnswer(S3, B)]
    assert vote("shard-0", answers).master == B


@pytest.mark.parametrize(("first", "second"), [(A, B), (B, A)])
def test_a_tie_goes_to_the_earliest_listed_sentinel(first: Address, second: Address) -> None:
    result = vote("shard-0", [SentinelAnswer(S1, first), SentinelAnswer(S2, second), _down(S3)])
    assert (result.master, result.votes, result.answered) == (first, 1, 2)


def test_quorum_not_met_still_follows_the_sentinels_that_answered() -> None:
    """One Sentinel of three answering is enough: the server found is verified before use."""
    result = vote("shard-0", [_down(S1), SentinelAnswer(S2, A), _down(S3, "TimeoutError()")])
    assert (result.master, result.votes, result.answered) == (A, 1, 1)
    assert result.errors == (
        "10.0.0.1:26379: cannot connect: ConnectionRefusedError(111)",
        "10.0.0.3:26379: TimeoutError()",
    )


def test_no_sentinel_answering_raises_with_every_error() -> None:
    with pytest.raises(SentinelUnreachable) as info:
        vote("shard-0", [_down(S1), _down(S2, "authentication as user 'gw' refused: WRONGPASS")])
    assert str(info.value) == (
        "no Sentinel answered: 10.0.0.1:26379: cannot connect: ConnectionRefusedError(111); "
        "10.0.0.2:26379: authentication as user 'gw' refused: WRONGPASS"
    )
    with pytest.raises(SentinelUnreachable, match="no Sentinel answered"):
        vote("shard-0", [])


def test_an_unknown_name_has_no_master_and_says_why() -> None:
    result = vote("shard-9", [SentinelAnswer(S1), SentinelAnswer(S2)])
    assert (result.master, result.votes, result.answered) == (None, 0, 2)
    assert result.unknown == "no Sentinel knows a master named 'shard-9'"
    partial = vote("shard-9", [SentinelAnswer(S1), _down(S2)])
    assert partial.master is None
    assert partial.unknown == (
        "no Sentinel knows a master named 'shard-9' "
        "(10.0.0.2:26379: cannot connect: ConnectionRefusedError(111))"
    )


def test_master_replies_are_parsed_from_bytes_or_text() -> None:
    assert parse_master_reply([b"10.0.1.1", b"6379"]) == A
    assert parse_master_reply(["10.0.1.1", "6379"]) == A
    assert parse_master_reply(None) is None


@pytest.mark.parametrize("reply", [[], [b"10.0.1.1"], [b"10.0.1.1", b"port"], b"OK", 3])
def test_other_master_replies_are_refused(reply: object) -> None:
    with pytest.raises(ValueError, match="unexpected reply"):
        parse_master_reply(reply)
