"""Pure-Python reference of the native write path: the oracle for tests and the benchmark baseline.

Every function here mirrors one in :mod:`gateway._native` and must produce byte-identical results
(slots, tags, RESP payloads, batch plans). It is written for clarity, not speed; production code
uses the native module. Property tests compare the two on random inputs, and
``bench/bench_native.py`` measures how much faster the native path is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "SLOTS",
    "ShardBatch",
    "SlotTable",
    "build_batches",
    "crc16",
    "even_ranges",
    "key_slot",
    "pack_command",
    "write_tag",
]

SLOTS = 16384
"""Number of Redis Cluster hash slots."""

_MAX_EPOCH = 2**63 - 1


def _crc16_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC16_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16/XMODEM (polynomial 0x1021, initial value 0), as Redis Cluster uses it."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16_TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: bytes) -> int:
    """The Redis Cluster slot of ``key``; equals ``CLUSTER KEYSLOT``.

    Hashes the content between the first ``{`` and the first ``}`` after it when that content is
    non-empty, otherwise the whole key.
    """
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key) & (SLOTS - 1)


def _check_epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(f"epoch must be an int, not {type(epoch).__name__}")
    if epoch > _MAX_EPOCH:
        raise ValueError("epoch is out of range")
    if epoch < 1:
        raise ValueError(f"epoch must be >= 1, got {epoch}")
    return epoch


def write_tag(uuid: str, epoch: int, key: bytes) -> str:
    """The write tag: the first 16 lowercase hex digits of ``sha1(uuid:epoch:key)``."""
    _check_epoch(epoch)
    return hashlib.sha1(f"{uuid}:{epoch}:".encode() + key).hexdigest()[:16]


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack_command(args: Sequence[bytes | str | int]) -> bytes:
    """Packs one command as a RESP2 array of bulk strings (``str`` as UTF-8, ``int`` decimal)."""
    if isinstance(args, bytes | str):
        raise TypeError(f"args must be a sequence of arguments, not {type(args).__name__}")
    parts = [b"*%d\r\n" % len(args)]
    for i, arg in enumerate(args):
        if isinstance(arg, bytes):
            parts.append(_bulk(arg))
        elif isinstance(arg, str):
            parts.append(_bulk(arg.encode()))
        elif isinstance(arg, int) and not isinstance(arg, bool):
            parts.append(_bulk(str(arg).encode()))
        else:
            raise TypeError(f"args[{i}] must be bytes, str or int, not {type(arg).__name__}")
    return b"".join(parts)


def even_ranges(n: int) -> list[tuple[int, int]]:
    """Even split of the slots over ``n`` shards.

    Shard ``i`` owns ``[i*16384//n, (i+1)*16384//n - 1]``.
    """
    if not 1 <= n <= SLOTS:
        raise ValueError(f"number of shards must be in 1..={SLOTS}, got {n}")
    return [(i * SLOTS // n, (i + 1) * SLOTS // n - 1) for i in range(n)]


class SlotTable:
    """Which shard owns each slot, and each shard's identity, under one topology epoch."""

    def __init__(self, epoch: int, uuids: Sequence[str], ranges: Sequence[tuple[int, int]]) -> None:
        """Shard ``i`` has ``uuids[i]`` and owns the inclusive slot range ``ranges[i]``.

        Raises:
            ValueError: the epoch is below 1, a uuid is empty or not printable ASCII, or the
                ranges do not cover every slot exactly once.
        """
        self._epoch = _check_epoch(epoch)
        if not uuids:
            raise ValueError("a slot table needs at least one shard")
        if len(uuids) != len(ranges):
            raise ValueError(f"{len(uuids)} uuids but {len(ranges)} slot ranges")
        for i, uuid in enumerate(uuids):
            if not uuid or not all(0x21 <= ord(c) <= 0x7E for c in uuid):
                raise ValueError(
                    f"uuid of shard {i} must be non-empty printable ASCII, got {uuid!r}"
                )
        owner: list[int | None] = [None] * SLOTS
        for i, (start, end) in enumerate(ranges):
            if not (0 <= start < SLOTS and 0 <= end < SLOTS):
                raise ValueError(
                    f"slot range of shard {i} ({start}, {end}) is outside 0..{SLOTS - 1}"
                )
            if start > end:
                raise ValueError(f"slot range of shard {i} ({start}, {end}) starts after it ends")
            for slot in range(start, end + 1):
                other = owner[slot]
                if other is not None:
                    raise ValueError(
                        f"slot {slot} is in the ranges of both shard {other} and shard {i}"
                    )
                owner[slot] = i
        self._owner: list[int] = []
        for slot, o in enumerate(owner):
            if o is None:
                raise ValueError(f"slot {slot} is not in any shard's range")
            self._owner.append(o)
        self._uuids = list(uuids)

    @staticmethod
    def even(epoch: int, uuids: Sequence[str]) -> SlotTable:
        """A table splitting the slots evenly over ``len(uuids)`` shards."""
        if not uuids:
            raise ValueError("a slot table needs at least one shard")
        return SlotTable(epoch, uuids, even_ranges(len(uuids)))

    @staticmethod
    def even_ranges(n: int) -> list[tuple[int, int]]:
        """The even split of the slots over ``n`` shards (see :func:`even_ranges`)."""
        return even_ranges(n)

    @property
    def epoch(self) -> int:
        """The topology epoch."""
        return self._epoch

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return len(self._uuids)

    def uuid(self, shard: int) -> str:
        """The uuid of ``shard``."""
        if not 0 <= shard < len(self._uuids):
            raise ValueError(f"shard {shard} out of range (table has {len(self._uuids)} shards)")
        return self._uuids[shard]

    def shard_of_slot(self, slot: int) -> int:
        """The shard owning ``slot``."""
        if not 0 <= slot < SLOTS:
            raise ValueError(f"slot {slot} out of range 0..16383")
        return self._owner[slot]

    def shard_for_key(self, key: bytes) -> int:
        """The shard owning ``key``'s slot."""
        return self._owner[key_slot(key)]


@dataclass(frozen=True, slots=True)
class ShardBatch:
    """One shard's pipeline of ``FCALL pg_apply`` commands and the reply plan.

    Attributes:
        shard: index of the shard in the slot table.
        payload: the packed commands.
        op_indices: indices into the input ops, in the order of their replies.
        calls: number of ops in each ``FCALL``.
    """

    shard: int
    payload: bytes
    op_indices: list[int]
    calls: list[int]

    @property
    def n_commands(self) -> int:
        """Number of ``FCALL`` commands (= replies to read)."""
        return len(self.calls)

    def map_replies(self, replies: Sequence[object]) -> list[object]:
        """One result per op from the call replies: a call-level error (an exception instance)
        repeats for each op of its call, an array contributes its elements.

        Raises:
            ValueError: the number or shape of the replies does not match the batch.
        """
        if len(replies) != len(self.calls):
            raise ValueError(f"expected {len(self.calls)} replies, got {len(replies)}")
        out: list[object] = []
        for i, (reply, n) in enumerate(zip(replies, self.calls, strict=True)):
            if isinstance(reply, BaseException):
                out.extend([reply] * n)
            elif isinstance(reply, list):
                if len(reply) != n:
                    raise ValueError(f"reply {i} has {len(reply)} elements, expected {n}")
                out.extend(reply)
            else:
                raise ValueError(f"reply {i} is neither an array nor an error reply")
        return out


def build_batches(
    table: SlotTable,
    ops: Sequence[tuple[bytes, bytes, Sequence[bytes]]],
    *,
    group: int = 128,
) -> list[ShardBatch]:
    """Groups ``ops`` (``(op, key, args)``) by shard and packs them as ``FCALL pg_apply`` calls.

    Each call carries at most ``group`` ops, framed as
    ``FCALL pg_apply <n> <keys…> <uuid> <epoch> (<op> <tag> <argc> <args…>)…``.
    Returns one batch per shard that has ops, ordered by shard index.
    """
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    per_shard: list[list[int]] = [[] for _ in range(table.num_shards)]
    for i, (_, key, _) in enumerate(ops):
        per_shard[table.shard_for_key(key)].append(i)
    epoch = str(table.epoch)
    batches = []
    for shard, indices in enumerate(per_shard):
        if not indices:
            continue
        uuid = table.uuid(shard)
        payload = []
        calls = []
        for first in range(0, len(indices), group):
            chunk = indices[first : first + group]
            args: list[bytes | str | int] = ["FCALL", "pg_apply", len(chunk)]
            args.extend(ops[i][1] for i in chunk)
            args += [uuid, epoch]
            for i in chunk:
                name, key, op_args = ops[i]
                args += [name, write_tag(uuid, table.epoch, key), len(op_args), *op_args]
            payload.append(pack_command(args))
            calls.append(len(chunk))
        batches.append(ShardBatch(shard, b"".join(payload), indices, calls))
    return batches
