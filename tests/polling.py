"""Waiting for a condition, the one way tests synchronise (never a bare sleep).

:func:`wait_until` blocks (tests that drive processes and sockets from the test thread);
:func:`settle` is the same for coroutines, so that the event loop keeps running meanwhile.
Both return the predicate's first truthy value and fail with what was awaited (``what``: a
text, or a function giving one at the time of failure, for messages that show the last state).
The timeout is a bound on a hang, not a performance claim: it is generous on purpose.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

__all__ = ["settle", "wait_until"]


Description = str | Callable[[], str]


def _timed_out(timeout: float, what: Description) -> AssertionError:
    text = what() if callable(what) else what
    return AssertionError(f"timed out after {timeout} s waiting for {text}")


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: Description, step: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what)
        time.sleep(step)


async def settle(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: Description = "the condition",
    step: float = 0.02,
) -> Any:
    """:func:`wait_until` for coroutines: the loop runs between polls, and ``predicate`` may
    be a coroutine function (each poll awaits it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what)
        await asyncio.sleep(step)
