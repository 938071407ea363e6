"""Tests of gateway.protocol.errors and limits, and of the package's import boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.protocol import errors
from gateway.protocol.errors import CODES, ProtocolCode, Reconnect, is_close_code
from gateway.protocol.limits import DEFAULT_LIMITS, Limits


def test_every_code_is_documented() -> None:
    assert set(CODES) == {int(code) for code in ProtocolCode}
    assert all(info.meaning for info in CODES.values())


@pytest.mark.parametrize(
    ("code", "close", "reconnect"),
    [
        (4000, True, Reconnect.NEVER),
        (4009, True, Reconnect.NEVER),
        (4100, True, Reconnect.BACKOFF),
        (4200, True, Reconnect.IMMEDIATELY),
        (4201, True, Reconnect.IMMEDIATELY),
        (4301, False, Reconnect.OTHER),
        (4302, False, Reconnect.OTHER),
    ],
)
def test_code_ranges(code: int, close: bool, reconnect: Reconnect) -> None:
    assert CODES[code].close is close
    assert CODES[code].reconnect is reconnect
    assert is_close_code(code) is close
    assert errors.reconnect_policy(code) is reconnect


def test_non_pusher_codes_are_not_close_codes() -> None:
    assert not is_close_code(1000)
    assert not is_close_code(4400)


def test_default_limits_are_the_documented_ones() -> None:
    limits = DEFAULT_LIMITS
    assert limits == Limits()
    assert (
        limits.max_event_data_bytes,
        limits.max_presence_members,
        limits.max_user_info_bytes,
    ) == (
        10_240,
        100,
        1_024,
    )
    assert (limits.max_presence_user_id_length, limits.max_event_name_length) == (128, 200)
    assert (limits.max_channel_name_length, limits.client_events_per_second) == (200, 10)
    assert (limits.max_channels_per_trigger, limits.max_batch_events, limits.max_watchlist) == (
        100,
        10,
        100,
    )
    assert (limits.activity_timeout, limits.pong_timeout) == (120, 30)
    assert limits.max_channels_per_connection == 100
    assert limits.max_frame_bytes >= limits.max_event_data_bytes


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_limits_must_be_positive_ints(value: object) -> None:
    with pytest.raises(ValueError, match="activity_timeout"):
        Limits(activity_timeout=value)  # type: ignore[arg-type]


def test_package_does_no_io_imports() -> None:
    code = (
        "import sys, gateway.protocol; "
        "bad = [m for m in ('asyncio', 'websockets', 'redis', 'gateway.server', 'gateway.store',"
        " 'gateway.shards') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
