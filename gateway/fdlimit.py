"""Process resources: the open-file limit (raised at start, shared between clients and Redis,
EMFILE logged) and free heap memory given back to the system.

Every TCP connection is a file descriptor. If clients may take all of them, the node can no
longer reach Redis or Sentinel (``EMFILE`` on connect), its lease lapses and its members are
announced as gone. So the node raises its soft limit to the hard limit at start, caps client
connections below it (:func:`client_connection_cap`) keeping ``reserved`` descriptors for its
own connections, and logs any ``EMFILE`` once a minute with the figures that explain it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import resource
import time
from collections.abc import Callable
from typing import cast

__all__ = [
    "client_connection_cap",
    "is_emfile",
    "nofile_limit",
    "note_emfile",
    "open_fds",
    "raise_nofile",
    "release_free_memory",
]

log = logging.getLogger("gateway.fdlimit")


class _Reports:
    last = float("-inf")
    suppressed = 0


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard limit (as far as allowed); return the soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def nofile_limit() -> int:
    """The current soft open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def client_connection_cap(configured: int, reserved: int) -> int:
    """Client connections allowed: ``configured``, but never more than the limit allows.

    Args:
        configured: The operator's cap (0 = as many as the open-file limit allows).
        reserved: Descriptors kept for Redis, Sentinel, webhooks and the process itself.
    """
    available = max(1, nofile_limit() - reserved)
    return available if configured <= 0 else min(configured, available)


def open_fds() -> int:
    """Descriptors open in this process right now (-1 if unknown)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def is_emfile(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) says the process is out of file descriptors."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE):
            return True
        seen = seen.__cause__
    return False


def note_emfile(where: str) -> None:
    """Log that an operation failed for lack of descriptors: once a minute, with the figures."""
    now = time.monotonic()
    if now - _Reports.last < 60.0:
        _Reports.suppressed += 1
        return
    more = f" ({_Reports.suppressed} more since the last report)" if _Reports.suppressed else ""
    _Reports.last, _Reports.suppressed = now, 0
    log.error(
        "out of file descriptors (EMFILE) while %s: %d open, limit %d%s; client connections "
        "are capped below the limit (max_client_connections, reserved_fds): raise the limit "
        "(ulimit -n, LimitNOFILE) or lower the cap",
        where,
        open_fds(),
        nofile_limit(),
        more,
    )


def _libc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


_TRIM = _libc_trim()


def release_free_memory() -> None:
    """Return free heap pages to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed memory for reuse, so after a burst the process's resident size stays at
    its peak although the memory is free; trimming makes the resident size follow what is in
    use.
    """
    if _TRIM is not None:
        _TRIM(0)
