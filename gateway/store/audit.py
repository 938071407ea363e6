"""``presence-gateway audit``: explain every shard's contents in seconds, and repair them.

For each shard the audit scans every key and reports: keys on the wrong shard (their slot, or
their shard tag, belongs to another shard), entries of dead owners (by the reap rule of the
function library: lease expired longer than the reap grace ago) and of
unknown owners (no lease at all), derived state that disagrees with the entries it summarises
(per-user owner counts, the occupied-channel set, owner indexes), keys without an expiry, and
memory by key class. ``--repair`` fixes what it reports, through the same verified write path
as the gateway: misplaced keys are deleted, dead owners' entries are removed with the normal
transitions (so ``member_removed`` / ``channel_vacated`` still go out for users who were shown),
entries of owners that never held a lease are removed silently (nobody ever saw them), derived
state is rebuilt and expiries set.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar, cast

from gateway._native import ReplyError, key_slot
from gateway.shards import contract
from gateway.shards.connection import ShardConnection
from gateway.shards.contract import (
    IDENTITY_KEY,
    OUTBOX_MAX,
    Op,
    decode_lease_states,
    read_leases,
)
from gateway.shards.shardset import ShardSet
from gateway.shards.topology import TopologyConfig
from gateway.shards.writer import BatchWriter

__all__ = ["ShardReport", "format_report", "run_audit"]

log = logging.getLogger("gateway.audit")
T = TypeVar("T")

_CLASSES = {b"s": "subscriptions", b"p": "presence", b"u": "presence-users", b"c": "cache",
            b"ct": "rate-limit"}  # fmt: skip


@dataclass
class ShardReport:
    """What one shard holds, and what is wrong with it."""

    shard: str
    address: str
    keys: dict[str, int] = field(default_factory=dict)
    memory_bytes: dict[str, int] = field(default_factory=dict)
    live_owners: list[str] = field(default_factory=list)
    late_owners: list[str] = field(default_factory=list)
    wrong_shard_keys: list[str] = field(default_factory=list)
    dead_owner_entries: dict[str, int] = field(default_factory=dict)
    unknown_owner_entries: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    keys_without_expiry: list[str] = field(default_factory=list)
    foreign_keys: list[str] = field(default_factory=list)
    repaired: dict[str, int] = field(default_factory=dict)
    #: The webhook outbox: entries waiting (held or due), entries a node is delivering, and
    #: webhooks dropped because it was full, not yet reported by a node's claim.
    webhooks_waiting: int = 0
    webhooks_in_delivery: int = 0
    webhooks_dropped: int = 0

    @property
    def problems(self) -> int:
        """Number of findings that ``--repair`` fixes."""
        return (
            len(self.wrong_shard_keys)
            + sum(self.dead_owner_entries.values())
            + sum(self.unknown_owner_entries.values())
            + len(self.mismatches)
            + len(self.keys_without_expiry)
        )


def _text(value: bytes) -> str:
    return value.decode(errors="backslashreplace")


#: Keys (or channels) whose reads go out in one pipeline: bounds the audit's memory per round
#: trip while keeping round trips few (a shard of 20 000 keys takes about 40).
_BATCH = 500


def _batches(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), _BATCH):
        yield items[i : i + _BATCH]


async def _scan(conn: ShardConnection) -> list[bytes]:
    keys: list[bytes] = []
    cursor = b"0"
    while True:
        reply = cast(list[Any], await conn.command("SCAN", cursor, "COUNT", 1000))
        cursor = reply[0]
        keys.extend(reply[1])
        if cursor == b"0":
            return keys


async def _read(
    conn: ShardConnection, commands: Sequence[Sequence[bytes | str | int]]
) -> list[Any]:
    """Replies to ``commands`` sent as one pipeline; an error reply is raised."""
    replies = await conn.pipeline(commands, timeout=10.0)
    for reply in replies:
        if isinstance(reply, ReplyError):
            raise reply
    return replies


def _classify(key: bytes, tag: bytes, first: int, last: int) -> tuple[str, bool]:
    """A key's class for the report, and whether it is on the wrong shard."""
    if key == IDENTITY_KEY:
        return "identity", False
    if key.startswith(b"{pgs-"):
        return "shard", not key.startswith(tag + b":")
    if key.startswith(b"{") and b"}:" in key:
        suffix = key.partition(b"}:")[2]
        return _CLASSES.get(suffix, "other"), not first <= key_slot(key) <= last
    return "foreign", False


async def _audit_shard(
    shards: ShardSet, writer: BatchWriter, index: int, *, repair: bool, ttl_ms: int, hold_ms: int
) -> ShardReport:
    link = shards.links[index]
    conn, identity = link.conn, link.identity
    assert conn is not None and identity is not None
    report = ShardReport(link.spec.name, str(link.address))
    first, last = (int(x) for x in identity.slots.split("-"))
    tag = identity.tag.encode()
    # The shard applies its own reap rule (functions.lua): live, late (within the reap grace:
    # left alone) or dead (its entries are reported, and removed by --repair).
    state = decode_lease_states(await conn.command(*read_leases(tag)))
    report.live_owners = sorted(_text(o) for o, st in state.items() if st == "live")
    report.late_owners = sorted(_text(o) for o, st in state.items() if st == "late")

    keys = await _scan(conn)
    counts: Counter[str] = Counter()
    memory: Counter[str] = Counter()
    channels: set[bytes] = set()
    for batch in _batches(keys):
        replies = await _read(
            conn, [c for key in batch for c in (("MEMORY", "USAGE", key, "SAMPLES", "0"),
                                                 ("PTTL", key))]
        )  # fmt: skip
        for i, key in enumerate(batch):
            kind, misplaced = _classify(key, tag, first, last)
            if misplaced:
                report.wrong_shard_keys.append(_text(key))
            elif kind == "foreign":
                report.foreign_keys.append(_text(key))
            elif kind not in ("identity", "shard"):
                channels.add(key.partition(b"}:")[0] + b"}")
            counts[kind] += 1
            memory[kind] += int(replies[2 * i] or 0)
            if kind not in ("identity", "foreign") and replies[2 * i + 1] == -1:
                report.keys_without_expiry.append(_text(key))
    report.keys = dict(counts)
    report.memory_bytes = dict(memory)
    waiting, delivering, dropped = await _read(
        conn, [("ZCARD", tag + b":due"), ("ZCARD", tag + b":inflight"), ("GET", tag + b":dropped")]
    )
    report.webhooks_waiting, report.webhooks_in_delivery = int(waiting), int(delivering)
    report.webhooks_dropped = int(dropped or 0)

    dead: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    dead_owners: dict[bytes, set[bytes]] = defaultdict(set)  # channel -> owners to reap
    unknown_owners: dict[bytes, set[bytes]] = defaultdict(set)  # channel -> owners to purge
    chans = set(cast(list[bytes], await conn.command("SMEMBERS", tag + b":chans")))
    for batch in _batches(sorted(channels)):
        replies = await _read(
            conn, [("HGETALL", base + suffix) for base in batch for suffix in (b":s", b":p", b":u")]
        )
        indexed: list[tuple[bytes, bytes]] = []  # (channel, owner) pairs to find in indexes
        for i, base in enumerate(batch):
            subs, pres, users = (cast(list[bytes], r) for r in replies[3 * i : 3 * i + 3])
            owners: list[bytes] = [subs[j] for j in range(0, len(subs), 2)]
            per_user: Counter[bytes] = Counter()
            for j in range(0, len(pres), 2):
                owner, _, user = pres[j].partition(b"\0")
                owners.append(owner)
                per_user[user] += 1
            for owner in owners:
                if owner not in state:
                    unknown[_text(owner)] += 1
                    unknown_owners[base].add(owner)
                elif state[owner] == "dead":
                    dead[_text(owner)] += 1
                    dead_owners[base].add(owner)
            stored = {users[j]: int(users[j + 1]) for j in range(0, len(users), 2)}
            if stored != dict(per_user):
                report.mismatches.append(
                    f"{_text(base)}: per-user owner counts disagree with entries"
                )
            occupied = sum(int(subs[j + 1]) for j in range(0, len(subs), 2)) > 0
            if occupied != (base in chans):
                report.mismatches.append(
                    f"{_text(base)}: occupied-channel set disagrees with counts"
                )
            indexed.extend((base, owner) for owner in sorted(set(owners)))
        found = await _read(
            conn, [("SISMEMBER", tag + b":idx:" + owner, base) for base, owner in indexed]
        )
        report.mismatches.extend(
            f"{_text(base)}: missing from the index of {_text(owner)}"
            for (base, owner), present in zip(indexed, found, strict=True)
            if not present
        )
    report.dead_owner_entries = dict(dead)
    report.unknown_owner_entries = dict(unknown)

    if repair:
        report.repaired = await _repair(
            writer, report, tag, dead_owners, unknown_owners, sorted(channels), ttl_ms, hold_ms
        )
    return report


async def _repair(
    writer: BatchWriter,
    report: ShardReport,
    tag: bytes,
    dead_owners: dict[bytes, set[bytes]],
    unknown_owners: dict[bytes, set[bytes]],
    channels: list[bytes],
    ttl_ms: int,
    hold_ms: int,
) -> dict[str, int]:
    """Fix what ``report`` found through the verified write path; counts of what was done."""
    planned: list[tuple[str, Op]] = []
    planned += [
        ("wrong_shard_keys_deleted", contract.admin_delete(tag, key.encode()))
        for key in report.wrong_shard_keys
    ]
    # Users of a dead owner were shown: they leave through the normal transitions
    # (member_removed, channel_vacated and their held webhooks).
    planned += [
        ("dead_owner_entries_removed", contract.sync(
            base, owner=owner, count=0, members={}, hold_ms=hold_ms, publish=True, ttl_ms=ttl_ms
        ))
        for base, owners in dead_owners.items()
        for owner in sorted(owners)
    ]  # fmt: skip
    # An owner that never held a lease was never shown: removed silently.
    planned += [
        ("unknown_owner_entries_removed", contract.purge(base, owner=owner))
        for base, owners in unknown_owners.items()
        for owner in sorted(owners)
    ]
    planned += [("derived_state_fixes", contract.repair(base, ttl_ms=ttl_ms)) for base in channels]
    planned += [
        ("expiries_set", contract.admin_expire(tag, key.encode(), ttl_ms=ttl_ms))
        for key in report.keys_without_expiry
    ]
    fixed: Counter[str] = Counter()
    for batch in _batches(planned):
        results = await writer.submit_many([op for _, op in batch])
        for (what, _), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                fixed["failed"] += 1
                log.warning("audit: %s failed: %s", what, result)
            elif what == "derived_state_fixes":
                fixed[what] += int(cast(int, result))
            else:
                fixed[what] += 1
    return dict(fixed)


async def run_audit(
    topology: TopologyConfig,
    *,
    repair: bool = False,
    ttl_ms: int = 300_000,
    hold_ms: int = 3000,
) -> list[ShardReport]:
    """Audit (and with ``repair`` fix) every shard of ``topology``.

    Raises:
        TimeoutError: A shard is not reachable and verified within 10 s.
    """
    shards = ShardSet(topology, admin=True)
    writer = BatchWriter(shards, write_timeout=10.0)
    await shards.start()
    try:
        await shards.wait_ready(10)
        writer.start()
        return [
            await _audit_shard(shards, writer, i, repair=repair, ttl_ms=ttl_ms, hold_ms=hold_ms)
            for i in range(len(shards.links))
        ]
    finally:
        await writer.close()
        await shards.close()


def format_report(reports: list[ShardReport], *, as_json: bool = False) -> str:
    """Human-readable (default) or JSON text of an audit."""
    if as_json:
        return json.dumps(
            [{**asdict(r), "problems": r.problems} for r in reports], indent=2, sort_keys=True
        )
    lines: list[str] = []
    for r in reports:
        lines.append(f"{r.shard} ({r.address}): {r.problems} problem(s)")
        lines.append(f"  live owners: {', '.join(r.live_owners) or 'none'}")
        if r.late_owners:
            lines.append(
                f"  late owners (lease expired, within the reap grace): {', '.join(r.late_owners)}"
            )
        keys = ", ".join(f"{k} {n}" for k, n in sorted(r.keys.items()))
        lines.append(f"  keys: {keys or 'none'}")
        mem = ", ".join(f"{k} {n / 1024:.1f} KiB" for k, n in sorted(r.memory_bytes.items()))
        lines.append(f"  memory: {mem or 'none'}")
        lines.append(
            f"  webhook outbox: {r.webhooks_waiting} waiting (held or due), "
            f"{r.webhooks_in_delivery} being delivered"
            + (
                f", {r.webhooks_dropped} dropped (outbox full: {OUTBOX_MAX} entries)"
                if r.webhooks_dropped
                else ""
            )
        )
        sections = (
            ("keys on the wrong shard", r.wrong_shard_keys),
            ("entries of dead owners", [f"{o}: {n}" for o, n in r.dead_owner_entries.items()]),
            ("entries of unknown owners",
             [f"{o}: {n}" for o, n in r.unknown_owner_entries.items()]),
            ("derived state mismatches", r.mismatches),
            ("keys without expiry", r.keys_without_expiry),
            ("keys not written by the gateway (left alone)", r.foreign_keys),
        )  # fmt: skip
        for title, items in sections:
            if items:
                lines.append(f"  {title}: {len(items)}")
                lines.extend(f"    {item}" for item in items[:20])
                if len(items) > 20:
                    lines.append(f"    ... {len(items) - 20} more (use --json for all)")
        if r.repaired:
            done = ", ".join(f"{k} {n}" for k, n in sorted(r.repaired.items()))
            lines.append(f"  repaired: {done}")
    return "\n".join(lines)
