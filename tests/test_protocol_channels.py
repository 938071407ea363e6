"""Tests of gateway.protocol.channels: name validation and classification."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol.channels import (
    Channel,
    ChannelKind,
    channel_error,
    classify,
    is_cache,
    server_to_user_channel,
    user_id_error,
)

PUBLIC, PRIVATE, ENCRYPTED, PRESENCE, S2U = (
    ChannelKind.PUBLIC,
    ChannelKind.PRIVATE,
    ChannelKind.PRIVATE_ENCRYPTED,
    ChannelKind.PRESENCE,
    ChannelKind.SERVER_TO_USER,
)


@pytest.mark.parametrize(
    ("name", "kind", "cache"),
    [
        ("my-channel", PUBLIC, False),
        ("cache-x", PUBLIC, True),
        ("private-x", PRIVATE, False),
        ("private-cache-x", PRIVATE, True),
        ("private-encrypted-x", ENCRYPTED, False),
        ("private-encrypted-cache-x", ENCRYPTED, True),
        ("presence-x", PRESENCE, False),
        ("presence-cache-x", PRESENCE, True),
        ("presencex", PUBLIC, False),
        ("privatex", PUBLIC, False),
        ("cachex", PUBLIC, False),
        ("x-private-y", PUBLIC, False),
    ],
)
def test_classify(name: str, kind: ChannelKind, cache: bool) -> None:
    channel = classify(name)
    assert channel == Channel(name, kind, cache)
    assert is_cache(name) is cache
    assert channel_error(name) is None


def test_classify_server_to_user() -> None:
    channel = classify("#server-to-user-42")
    assert channel.kind is S2U
    assert channel.user_id == "42"
    assert not channel.cache
    assert not channel.requires_auth
    assert not channel.allows_client_events
    assert server_to_user_channel("42") == "#server-to-user-42"


@pytest.mark.parametrize(
    ("kind", "auth", "client_events", "presence"),
    [
        (PUBLIC, False, False, False),
        (PRIVATE, True, True, False),
        (ENCRYPTED, True, False, False),
        (PRESENCE, True, True, True),
    ],
)
def test_properties(kind: ChannelKind, auth: bool, client_events: bool, presence: bool) -> None:
    channel = Channel("x", kind)
    assert channel.requires_auth is auth
    assert channel.allows_client_events is client_events
    assert channel.is_presence is presence


def test_all_allowed_characters() -> None:
    assert channel_error("AZaz09_-=@,.;") is None


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "empty"),
        ("a" * 201, "too long (201 characters, max 200)"),
        ("a b", "invalid character ' '"),
        ("a/b", "invalid character '/'"),
        ("é", "invalid character 'é'"),
        ("a:b", "invalid character ':'"),
        ("#foo", "'#' is reserved"),
        ("#server-to-user-", "names no user id"),
        ("#server-to-user-a#b", "invalid character '#'"),
        ("private-a*", "invalid character '*'"),
    ],
)
def test_invalid_names(name: str, fragment: str) -> None:
    error = channel_error(name)
    assert error is not None
    assert fragment in error


def test_max_length_is_configurable_and_inclusive() -> None:
    assert channel_error("a" * 200) is None
    assert channel_error("a" * 10, max_length=10) is None
    assert channel_error("a" * 11, max_length=10) is not None
    assert channel_error("#server-to-user-" + "a" * 184) is None
    assert channel_error("#server-to-user-" + "a" * 185) is not None


@pytest.mark.parametrize(
    ("user_id", "ok"),
    [("42", True), ("", False), ("a" * 200, True), ("a" * 201, False), ("a b", False)],
)
def test_user_id_error(user_id: str, ok: bool) -> None:
    assert (user_id_error(user_id) is None) is ok


@given(st.text(max_size=300))
def test_validation_matches_the_documented_regex(name: str) -> None:
    plain = re.fullmatch(r"[A-Za-z0-9_\-=@,.;]{1,200}", name) is not None
    s2u = (
        re.fullmatch(r"#server-to-user-[A-Za-z0-9_\-=@,.;]+", name) is not None and len(name) <= 200
    )
    assert (channel_error(name) is None) is (plain or s2u)
