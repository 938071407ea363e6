"""The batched, verified write path: ops in, one tagged pipeline per shard per loop tick out."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from gateway._native import (
    ReplyError,
    RespError,
    RoutingError,
    ShardBatch,
    build_batches,
)
from gateway.logs import fields
from gateway.metrics import CounterSeries, Metrics
from gateway.shards.connection import ConnectionLost
from gateway.shards.contract import Op, error_reason
from gateway.shards.shardset import ShardLink, ShardSet

__all__ = ["BatchWriter", "ShardUnavailableError", "WriteFailed"]

log = logging.getLogger("gateway.shards.writer")


def _reason(exc: BaseException) -> str:
    """The metrics ``reason`` label of a failed batch or a refused write."""
    return "connection_lost" if isinstance(exc, ConnectionLost) else error_reason(exc)


class WriteFailed(RuntimeError):
    """A write could not be applied; it was not silently dropped: this is its error."""


class ShardUnavailableError(WriteFailed):
    """The write's shard stayed unavailable for longer than the write timeout."""


#: Result slot of a write whose reply has not been handled yet (a reply may be ``None``).
_UNSET = object()


@dataclass(eq=False)
class _Request:
    ops: Sequence[Op]
    future: asyncio.Future[list[object]]
    deadline: float
    seq: int
    results: list[object] = field(default_factory=list)
    remaining: int = 0


class _Write(NamedTuple):
    """One write waiting for its reply."""

    op: Op
    request: _Request
    #: Index of the write in ``request.ops`` and ``request.results``.
    position: int


def _submission_order(write: _Write) -> tuple[int, int]:
    return write.request.seq, write.position


class _Writes:
    """A list of :class:`_Write`, stored as three columns.

    Every write passes through one of these, so adding a request costs three C-level extends
    and no object per write: with a record object per write, bench_store's workload cost
    ~500 ns more per write (mostly garbage-collector work), as much again as the rest of the
    writer's Python path.
    """

    __slots__ = ("ops", "positions", "requests")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.requests: list[_Request] = []
        self.positions: list[int] = []

    def __len__(self) -> int:
        return len(self.ops)

    def __getitem__(self, index: int) -> _Write:
        return _Write(self.ops[index], self.requests[index], self.positions[index])

    def add_request(self, req: _Request) -> None:
        n = len(req.ops)
        self.ops.extend(req.ops)
        self.requests.extend(itertools.repeat(req, n))
        self.positions.extend(range(n))

    def extend(self, writes: Sequence[_Write]) -> None:
        for op, req, pos in writes:
            self.ops.append(op)
            self.requests.append(req)
            self.positions.append(pos)

    def slice(self, start: int, stop: int) -> _Writes:
        part = _Writes()
        part.ops = self.ops[start:stop]
        part.requests = self.requests[start:stop]
        part.positions = self.positions[start:stop]
        return part


class BatchWriter:
    """Collects writes from the whole process and sends them as verified per-shard pipelines.

    Writes submitted during one event-loop tick are packed together by the native module (one
    ``FCALL pg_apply`` per ``group`` operations, all of a shard's calls in one pipeline) and
    sent once per tick. A write the shard refused for routing (wrong shard, stale epoch,
    replica, no identity) or lost with its connection is counted by reason, held, and sent
    again, in order, once its shard is verified again; a write still held after
    ``write_timeout`` seconds fails with :class:`ShardUnavailableError`. Writes are absolute
    (``HSET`` of a value the gateway owns), so a retry after a lost reply is harmless. A reply
    that cannot be handled (it does not fit its batch) fails that batch's writes with
    :class:`WriteFailed`: every submitted write ends with a result or an error.
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        metrics: Metrics | None = None,
        group: int = 128,
        max_pipeline_ops: int = 1024,
        write_timeout: float = 30.0,
    ) -> None:
        self.shards = shards
        self.metrics = metrics or shards.metrics
        self.group = group
        self.max_pipeline_ops = max_pipeline_ops
        self.write_timeout = write_timeout
        self._new: list[_Request] = []
        # Per shard: ops waiting for the shard to be usable again, in original order.
        self._held: list[list[_Write]] = [[] for _ in shards.links]
        self._scheduled = False
        self._seq = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._shard_series: dict[tuple[str, str], CounterSeries] = {}
        shards.on_link_up(self._link_up)
        m = self.metrics
        m.describe("pg_writes_applied_total", "Writes applied by the right shard")
        m.describe(
            "pg_writes_rejected_total",
            "Writes refused by a shard or lost in flight (all reasons but bad_tag, bad_op retry)",
        )
        m.describe("pg_writes_retried_total", "Writes sent again after a rejection")
        m.describe("pg_writes_failed_total", "Writes that failed to their caller, by reason")
        m.describe("pg_write_batches_total", "Pipelines sent, by shard")
        m.gauge("pg_writes_held", "Writes waiting for their shard", self._held_gauge)

    def _held_gauge(self) -> dict[tuple[tuple[str, str], ...], float]:
        return {
            (("shard", link.spec.name),): float(len(self._held[link.index]))
            for link in self.shards.links
        }

    # -- public API --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the task that fails writes held past their timeout."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())

    async def close(self) -> None:
        """Stop; writes still held fail with :class:`ShardUnavailableError`."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for held in self._held:
            for _, req, pos in held:
                self._fail(req, pos, ShardUnavailableError("gateway shutting down"), "shutdown")
            held.clear()

    def submit_many(self, ops: Sequence[Op]) -> asyncio.Future[list[object]]:
        """Queue ``ops`` for this tick's flush.

        Returns a future of one result per op, in order: the shard's reply, or an exception
        instance (:class:`WriteFailed`, ``BadTagError``, ``BadOpError``) for an op that failed.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[object]] = loop.create_future()
        if not ops:
            fut.set_result([])
            return fut
        self._seq += 1
        req = _Request(
            ops,
            fut,
            time.monotonic() + self.write_timeout,
            self._seq,
            [_UNSET] * len(ops),
            len(ops),
        )
        self._new.append(req)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    async def write(self, op: bytes, key: bytes, *args: bytes) -> object:
        """Apply one write and return the shard's reply.

        Raises:
            WriteFailed: The shard stayed unavailable past the write timeout.
            BadTagError, BadOpError: The shard refused the write as malformed.
        """
        (result,) = await self.submit_many([(op, key, args)])
        if isinstance(result, BaseException):
            raise result
        return result

    def oldest_held_age(self) -> float:
        """Seconds the oldest held write has been waiting (0 when none)."""
        now = time.monotonic()
        ages = [
            now - (req.deadline - self.write_timeout)
            for held in self._held
            for _, req, _ in held[:1]
        ]
        return max(ages, default=0.0)

    def held_count(self) -> int:
        """Writes currently waiting for their shard."""
        return sum(len(h) for h in self._held)

    # -- flushing ----------------------------------------------------------------------------

    def _link_up(self, link: ShardLink) -> None:
        if self._held[link.index] and not self._scheduled and not self._closed:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        writes = _Writes()
        links = self.shards.links
        # Held writes of shards that are usable again go first, to keep per-shard order.
        for index, held in enumerate(self._held):
            if held and links[index].usable:
                self.metrics.inc("pg_writes_retried_total", len(held))
                # Failures of pipelined batches can interleave with newer held writes.
                held.sort(key=_submission_order)
                writes.extend(held)
                held.clear()
        for req in self._new:
            writes.add_request(req)
        self._new = []
        if not writes:
            return
        # Several smaller pipelines instead of one huge one: replies of the first are handled
        # while the shard still works on the next, so gateway and Redis overlap.
        step = self.max_pipeline_ops
        if len(writes) <= step:
            self._send(writes)
            return
        for start in range(0, len(writes), step):
            self._send(writes.slice(start, start + step))

    def _send(self, writes: _Writes) -> None:
        links = self.shards.links
        for batch in build_batches(self.shards.table, writes.ops, group=self.group):
            link = links[batch.shard]
            conn = link.conn
            if not link.usable or conn is None or self._held[batch.shard]:
                self._hold(batch.shard, batch.op_indices, writes)
                continue
            self._series("pg_write_batches_total", link).inc()
            fut = conn.send(batch.payload, batch.n_commands)
            fut.add_done_callback(functools.partial(self._done, batch, link.generation, writes))

    def _series(self, name: str, link: ShardLink) -> CounterSeries:
        """Counter ``name`` of ``link``'s shard, resolved once."""
        shard = link.spec.name
        series = self._shard_series.get((name, shard))
        if series is None:
            series = self._shard_series[(name, shard)] = self.metrics.series(name, shard=shard)
        return series

    def _hold(self, shard: int, indices: Sequence[int], writes: _Writes) -> None:
        self._held[shard].extend(map(writes.__getitem__, indices))

    def _done(
        self,
        batch: ShardBatch,
        generation: int,
        writes: _Writes,
        fut: asyncio.Future[list[object]],
    ) -> None:
        try:
            self._settle(batch, generation, writes, fut)
        except (Exception, asyncio.CancelledError) as exc:
            # A callback that raises would leave its writes pending for ever: fail them instead.
            self._lost(batch, writes, exc)

    def _settle(
        self,
        batch: ShardBatch,
        generation: int,
        writes: _Writes,
        fut: asyncio.Future[list[object]],
    ) -> None:
        link = self.shards.links[batch.shard]
        exc = fut.exception()
        if exc is not None:
            reason = _reason(exc)
            self.metrics.inc("pg_writes_rejected_total", len(batch.op_indices), reason=reason)
            if link.generation == generation:
                self.shards.mark_suspect(batch.shard, f"{reason}: {exc}")
            self._hold(batch.shard, batch.op_indices, writes)
            return
        results = batch.map_replies(fut.result())
        requests, positions = writes.requests, writes.positions
        applied = 0
        rerouted: list[int] = []
        for i, result in zip(batch.op_indices, results, strict=True):
            if isinstance(result, ReplyError):
                if isinstance(result, RoutingError):
                    rerouted.append(i)
                    continue
                reason = _reason(result)
                self.metrics.inc("pg_writes_rejected_total", reason=reason)
                self._fail(requests[i], positions[i], result, reason)
                continue
            applied += 1
            self._set(requests[i], positions[i], result)
        if applied:
            self._series("pg_writes_applied_total", link).inc(applied)
            if not rerouted:
                self.shards.mark_healthy(batch.shard)
        if rerouted:
            first = results[batch.op_indices.index(rerouted[0])]
            assert isinstance(first, RoutingError)
            reason = _reason(first)
            self.metrics.inc("pg_writes_rejected_total", len(rerouted), reason=reason)
            if link.generation == generation:
                self.shards.mark_suspect(batch.shard, f"{reason}: {first}")
            self._hold(batch.shard, rerouted, writes)
            log.warning(
                "shard %s: %d writes rejected (%s); held for retry",
                link.spec.name,
                len(rerouted),
                reason,
            )

    def _lost(self, batch: ShardBatch, writes: _Writes, exc: BaseException) -> None:
        """Fail each write of ``batch`` that handling its reply left neither settled nor held."""
        name = self.shards.links[batch.shard].spec.name
        held = {(id(w.request), w.position) for w in self._held[batch.shard]}
        lost = [
            w
            for w in map(writes.__getitem__, batch.op_indices)
            if w.request.results[w.position] is _UNSET and (id(w.request), w.position) not in held
        ]
        # A reply that does not fit the batch means the server is not running the function
        # library this gateway verified; anything else is a bug here. Either way the shard may
        # have applied the writes, so they fail rather than being sent again.
        reason = "bad_reply" if isinstance(exc, RespError) else "internal_error"
        log.error(
            "shard %s: the reply to %d writes could not be handled (%s: %s); %d failed to their "
            "callers",
            name,
            len(batch.op_indices),
            type(exc).__name__,
            exc,
            len(lost),
            exc_info=not isinstance(exc, RespError),
            extra=fields(shard=name, reason=reason, count=len(lost)),
        )
        for w in lost:
            error = WriteFailed(
                f"{name}: the shard's reply could not be handled ({type(exc).__name__}: {exc}); "
                "the write may or may not have been applied"
            )
            self._fail(w.request, w.position, error, reason)

    # -- completion --------------------------------------------------------------------------

    @staticmethod
    def _set(req: _Request, pos: int, value: object) -> None:
        req.results[pos] = value
        req.remaining -= 1
        if req.remaining == 0 and not req.future.done():
            req.future.set_result(req.results)

    def _fail(self, req: _Request, pos: int, exc: BaseException, reason: str) -> None:
        self.metrics.inc("pg_writes_failed_total", reason=reason)
        self._set(req, pos, exc)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for index, held in enumerate(self._held):
                if not held or held[0].request.deadline > now:
                    continue
                keep = []
                for entry in held:
                    _, req, pos = entry
                    if req.deadline <= now:
                        name = self.shards.links[index].spec.name
                        error = ShardUnavailableError(
                            f"{name} unavailable for {self.write_timeout:g} s: "
                            f"{self.shards.links[index].last_error}"
                        )
                        self._fail(req, pos, error, "timeout")
                    else:
                        keep.append(entry)
                self._held[index] = keep
