"""Deadlines bucketed by whole second: the hub's heartbeat schedule.

A node holds tens of thousands of mostly idle sockets, each of which has something to do (a
``pusher:ping``, a 4201 close) only every ``activity_timeout`` seconds. Instead of looking at
every socket every second, the hub files each one under the second of its next deadline and,
once a second, takes out only the seconds that have come: the work of a tick is proportional to
the sockets due, not to the sockets held.

Deadlines are re-checked lazily: when a socket's deadline moves later (a client frame arrived),
nothing here is touched; the socket comes out at its old, earlier second, the owner sees the
deadline has not come yet and files it again under the new one. The per-frame path never pays
for the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

T = TypeVar("T", bound=Hashable)


class Deadlines(Generic[T]):
    """Items filed under the whole second of their deadline.

    :meth:`pop_due` returns every item filed under a second up to the current one, so an item
    comes out at the first call with ``now >= deadline``, or up to one call earlier (its
    deadline is later within the current second): the caller re-checks each item and files it
    again with :meth:`schedule` if it is not due yet. An item filed again during or after a
    :meth:`pop_due` under a second that call already took out comes out at the next call, never
    within the same one.

    An item is filed at most once: :meth:`schedule` moves it, :meth:`discard` removes it. The
    memory held is proportional to the items filed now, whatever the churn before (see
    :meth:`compact`).

    Args:
        now: The current time (same clock as the deadlines and ``now`` of :meth:`pop_due`).
    """

    __slots__ = ("_buckets", "_cursor", "_slot")

    def __init__(self, now: float) -> None:
        self._buckets: dict[int, set[T]] = {}
        self._slot: dict[T, int] = {}
        #: The earliest second that may still hold items (the last one taken out).
        self._cursor = math.floor(now)

    def __len__(self) -> int:
        """How many items are filed."""
        return len(self._slot)

    def __contains__(self, item: object) -> bool:
        return item in self._slot

    def schedule(self, item: T, deadline: float) -> None:
        """File ``item`` under ``deadline`` (moving it if it was filed already)."""
        second = max(math.floor(deadline), self._cursor)
        old = self._slot.get(item)
        if old == second:
            return
        if old is not None:
            self._unfile(item, old)
        self._slot[item] = second
        bucket = self._buckets.get(second)
        if bucket is None:
            self._buckets[second] = {item}
        else:
            bucket.add(item)

    def discard(self, item: T) -> None:
        """Forget ``item`` (a no-op if it is not filed)."""
        second = self._slot.pop(item, None)
        if second is not None:
            self._unfile(item, second)

    def pop_due(self, now: float) -> list[T]:
        """Take out and return the items filed under a second up to ``now``'s.

        They are no longer filed: the caller files again those that still have a deadline.
        """
        second = math.floor(now)
        buckets = self._buckets
        if second - self._cursor <= len(buckets):
            seconds: list[int] | range = range(self._cursor, second + 1)
        else:  # a long gap (a stalled loop, a test clock): visit the buckets, not the seconds
            seconds = sorted(s for s in buckets if s <= second)
        self._cursor = max(self._cursor, second)
        due: list[T] = []
        slot = self._slot
        for s in seconds:
            bucket = buckets.pop(s, None)
            if bucket is not None:
                due.extend(bucket)
                for item in bucket:
                    del slot[item]
        return due

    def compact(self) -> None:
        """Copy the tables to fit their content: a dict keeps the size of its largest past
        content, so after a burst of sockets that are gone the memory is given back."""
        self._slot = dict(self._slot)
        self._buckets = dict(self._buckets)

    def _unfile(self, item: T, second: int) -> None:
        bucket = self._buckets[second]
        bucket.discard(item)
        if not bucket:
            del self._buckets[second]
