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
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from gateway._native import key_slot
from gateway.shards.connection import ShardConnection
from gateway.shards.shardset import ShardSet
from gateway.shards.topology import TopologyConfig
from gateway.shards.writer import BatchWriter

__all__ = ["ShardReport", "format_report", "run_audit"]

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


async def _scan(conn: ShardConnection) -> list[bytes]:
    keys: list[bytes] = []
    cursor = b"0"
    while True:
        reply = cast(list[Any], await conn.command("SCAN", cursor, "COUNT", 1000))
        cursor = reply[0]
        keys.extend(reply[1])
        if cursor == b"0":
            return keys


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
    leases = cast(list[bytes], await conn.command("FCALL_RO", "pg_leases", 1, tag))
    state = {leases[i]: leases[i + 2].decode() for i in range(0, len(leases), 3)}
    report.live_owners = sorted(_text(o) for o, st in state.items() if st == "live")
    report.late_owners = sorted(_text(o) for o, st in state.items() if st == "late")

    keys = await _scan(conn)
    counts: Counter[str] = Counter()
    memory: Counter[str] = Counter()
    channels: set[bytes] = set()
    for key in keys:
        if key == b"__pg:shard":
            kind = "identity"
        elif key.startswith(b"{pgs-"):
            kind = "shard"
            if not key.startswith(tag + b":"):
                report.wrong_shard_keys.append(_text(key))
        elif key.startswith(b"{") and b"}:" in key:
            base, _, suffix = key.partition(b"}:")
            kind = _CLASSES.get(suffix, "other")
            if not first <= key_slot(key) <= last:
                report.wrong_shard_keys.append(_text(key))
            else:
                channels.add(base + b"}")
        else:
            kind = "foreign"
            report.foreign_keys.append(_text(key))
        counts[kind] += 1
        usage = await conn.command("MEMORY", "USAGE", key, "SAMPLES", "0")
        memory[kind] += int(cast(int, usage or 0))
        if kind not in ("identity", "foreign") and await conn.command("PTTL", key) == -1:
            report.keys_without_expiry.append(_text(key))
    report.keys = dict(counts)
    report.memory_bytes = dict(memory)

    dead: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    dead_owners: dict[bytes, set[bytes]] = defaultdict(set)  # channel -> owners to reap
    unknown_owners: dict[bytes, set[bytes]] = defaultdict(set)  # channel -> owners to purge
    chans = set(cast(list[bytes], await conn.command("SMEMBERS", tag + b":chans")))
    for base in sorted(channels):
        subs = cast(list[bytes], await conn.command("HGETALL", base + b":s"))
        pres = cast(list[bytes], await conn.command("HGETALL", base + b":p"))
        users = cast(list[bytes], await conn.command("HGETALL", base + b":u"))
        owners: list[bytes] = [subs[i] for i in range(0, len(subs), 2)]
        per_user: Counter[bytes] = Counter()
        for i in range(0, len(pres), 2):
            owner, _, user = pres[i].partition(b"\0")
            owners.append(owner)
            per_user[user] += 1
        for owner in owners:
            if owner not in state:
                unknown[_text(owner)] += 1
                unknown_owners[base].add(owner)
            elif state[owner] == "dead":
                dead[_text(owner)] += 1
                dead_owners[base].add(owner)
        stored = {users[i]: int(users[i + 1]) for i in range(0, len(users), 2)}
        if stored != dict(per_user):
            report.mismatches.append(f"{_text(base)}: per-user owner counts disagree with entries")
        occupied = sum(int(subs[i + 1]) for i in range(0, len(subs), 2)) > 0
        if occupied != (base in chans):
            report.mismatches.append(f"{_text(base)}: occupied-channel set disagrees with counts")
        for owner in set(owners):
            idx = tag + b":idx:" + owner
            if not await conn.command("SISMEMBER", idx, base):
                report.mismatches.append(f"{_text(base)}: missing from the index of {_text(owner)}")
    report.dead_owner_entries = dict(dead)
    report.unknown_owner_entries = dict(unknown)

    if repair:
        fixed: Counter[str] = Counter()
        for key_text in report.wrong_shard_keys:
            await writer.write(b"admin", tag, b"del", key_text.encode(), b"0")
            fixed["wrong_shard_keys_deleted"] += 1
        for base, owners_to_remove in dead_owners.items():
            for owner in owners_to_remove:
                # Users of a dead owner were shown: they leave through the normal transitions
                # (member_removed, channel_vacated and their held webhooks).
                await writer.write(
                    b"sync", base, owner, b"0", str(hold_ms).encode(), b"1",
                    str(ttl_ms).encode(), b"0",
                )  # fmt: skip
                fixed["dead_owner_entries_removed"] += 1
        for base, owners_to_remove in unknown_owners.items():
            for owner in owners_to_remove:
                # An owner that never held a lease was never shown: removed silently.
                await writer.write(b"purge", base, owner)
                fixed["unknown_owner_entries_removed"] += 1
        for base in sorted(channels):
            fixes = await writer.write(b"repair", base, str(ttl_ms).encode())
            fixed["derived_state_fixes"] += int(cast(int, fixes))
        for key_text in report.keys_without_expiry:
            await writer.write(b"admin", tag, b"pexpire", key_text.encode(), str(ttl_ms).encode())
            fixed["expiries_set"] += 1
        report.repaired = dict(fixed)
    return report


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
