"""Shard identities and the one check that a server is the shard it is taken for (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway._native import SlotTable, key_slot
from gateway.shards.contract import IDENTITY_KEY
from gateway.shards.topology import TopologyConfig

__all__ = [
    "IDENTITY_KEY",
    "DamagedIdentity",
    "IdentityMismatch",
    "MisplacedIdentity",
    "MissingIdentity",
    "ShardIdentity",
    "check_identity",
    "expected_identities",
    "shard_tag",
]


class IdentityMismatch(RuntimeError):
    """The server found for a shard is not that shard (or not a master)."""


class MissingIdentity(IdentityMismatch):
    """The server holds no shard identity."""


class DamagedIdentity(IdentityMismatch):
    """The server's identity hash lacks a field or has a malformed number."""


class MisplacedIdentity(IdentityMismatch):
    """The server holds the identity of another place (deployment, name, index, size or slots).

    Attributes:
        found: The identity the server holds.
    """

    def __init__(self, message: str, found: ShardIdentity) -> None:
        super().__init__(message)
        self.found = found


@dataclass(frozen=True)
class ShardIdentity:
    """The identity record stored in ``__pg:shard`` on every shard master (and its replicas)."""

    cluster: str
    name: str
    index: int
    shards: int
    uuid: str
    epoch: int
    slots: str
    tag: str = ""

    @classmethod
    def from_hash(cls, data: Mapping[str, str]) -> ShardIdentity:
        """Decode an identity hash; raises ``ValueError`` naming a missing or bad field."""
        try:
            return cls(
                cluster=data["cluster"],
                name=data["name"],
                index=int(data["index"]),
                shards=int(data["shards"]),
                uuid=data["uuid"],
                epoch=int(data["epoch"]),
                slots=data["slots"],
                tag=data.get("tag", ""),
            )
        except KeyError as exc:
            raise ValueError(f"shard identity lacks field {exc.args[0]!r}") from exc
        except ValueError as exc:
            raise ValueError(f"shard identity has a malformed number: {exc}") from exc

    def to_hash(self, *, lib: str) -> dict[str, str]:
        """Encode as the fields of ``__pg:shard``.

        Args:
            lib: Version of the function library loaded with this identity.
        """
        return {
            "cluster": self.cluster,
            "name": self.name,
            "index": str(self.index),
            "shards": str(self.shards),
            "uuid": self.uuid,
            "epoch": str(self.epoch),
            "slots": self.slots,
            "tag": self.tag,
            "lib": lib,
        }

    def same_place(self, other: ShardIdentity) -> bool:
        """Whether both describe the same slot-table position of the same deployment."""
        return (self.cluster, self.name, self.index, self.shards, self.slots) == (
            other.cluster,
            other.name,
            other.index,
            other.shards,
            other.slots,
        )

    @property
    def place(self) -> str:
        """The position, for messages: ``cluster/name (index i of n, slots a-b)``."""
        return (
            f"{self.cluster}/{self.name} (index {self.index} of {self.shards}, slots {self.slots})"
        )


def shard_tag(index: int, ranges: Sequence[tuple[int, int]]) -> str:
    """The hash tag of shard ``index``'s own keys: ``{pgs-<index>-<n>}`` with the least ``n``
    whose slot falls in the shard's range (so shard-wide keys obey the slot table too)."""
    first, last = ranges[index]
    for n in range(1_000_000):
        tag = f"{{pgs-{index}-{n}}}"
        if first <= key_slot(tag.encode()) <= last:
            return tag
    raise ValueError(f"no hash tag found for slots {first}-{last}")


def expected_identities(topology: TopologyConfig) -> list[ShardIdentity]:
    """The place (and shard tag) each shard of ``topology`` must hold; ``uuid`` and ``epoch``
    are left empty (they are chosen by ``shards init``)."""
    n = len(topology.shards)
    ranges = SlotTable.even_ranges(n)
    return [
        ShardIdentity(
            cluster=topology.cluster,
            name=spec.name,
            index=i,
            shards=n,
            uuid="",
            epoch=0,
            slots=f"{ranges[i][0]}-{ranges[i][1]}",
            tag=shard_tag(i, ranges),
        )
        for i, spec in enumerate(topology.shards)
    ]


def check_identity(
    role: str,
    stored: Mapping[str, str],
    *,
    expected: ShardIdentity | None,
    previous: ShardIdentity | None = None,
) -> ShardIdentity:
    """Check that a server may be used as a shard, from what it answered; return its identity.

    Used by the node before it trusts a server with a shard's writes, and by ``shards init``
    before it writes identities.

    Args:
        role: First element of the server's ``ROLE`` reply (``master``, ``slave``...).
        stored: The server's ``__pg:shard`` hash, decoded (empty if it has none).
        expected: The place the server must hold (see :func:`expected_identities`); None
            skips the place and epoch checks.
        previous: The identity last verified for this shard: a different uuid is accepted
            only at a newer epoch (a re-initialised topology), never at the same or an older
            one.

    Raises:
        IdentityMismatch: The server is not a master, or claims the shard under an epoch not
            newer than ``previous``'s.
        MissingIdentity: The server holds no identity.
        DamagedIdentity: The identity cannot be decoded.
        MisplacedIdentity: The identity is of another place than ``expected``.
    """
    if role != "master":
        raise IdentityMismatch(f"server is a {role}, not a master")
    if not stored:
        raise MissingIdentity("server holds no shard identity (run shards init)")
    try:
        identity = ShardIdentity.from_hash(stored)
    except ValueError as exc:
        raise DamagedIdentity(str(exc)) from exc
    if expected is None:
        return identity
    if not identity.same_place(expected):
        raise MisplacedIdentity(f"server is {identity.place}, expected {expected.place}", identity)
    if previous is not None and identity.uuid != previous.uuid and identity.epoch <= previous.epoch:
        raise IdentityMismatch(
            f"server claims {identity.name} with uuid {identity.uuid} at epoch "
            f"{identity.epoch}, but this shard is uuid {previous.uuid} at epoch {previous.epoch}"
        )
    return identity
