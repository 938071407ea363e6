"""Periodic background jobs that survive their own failures."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

__all__ = ["every"]

log = logging.getLogger("gateway.periodic")


async def every(
    period: float,
    job: Callable[[], object],
    *,
    name: str,
    run_first: bool = True,
    jitter: float = 0.0,
) -> None:
    """Run ``job`` (a function, or one returning an awaitable) every ``period`` seconds.

    A failing run is logged and the next one happens on time; only cancellation stops it.

    Args:
        period: Seconds between runs.
        job: The work.
        name: Used in the log line of a failure.
        run_first: Run once at once (else first after ``period``).
        jitter: Each wait is drawn uniformly within ``period * (1 ± jitter)``, so that jobs
            of several nodes started together drift apart.
    """

    def wait() -> float:
        return period * random.uniform(1 - jitter, 1 + jitter) if jitter else period

    if not run_first:
        await asyncio.sleep(wait())
    while True:
        try:
            result = job()
            if asyncio.iscoroutine(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic job %s failed", name)
        await asyncio.sleep(wait())
