"""The Sentinel vote: which master address a shard has, from every Sentinel's answer (no I/O)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.shards.topology import Address

__all__ = [
    "MASTER_QUERY",
    "SentinelAnswer",
    "SentinelUnreachable",
    "Vote",
    "parse_master_reply",
    "vote",
]

#: The command that asks a Sentinel for a master's address (followed by the master name).
MASTER_QUERY = ("SENTINEL", "get-master-addr-by-name")


class SentinelUnreachable(ConnectionError):
    """No Sentinel answered (the message lists why, per Sentinel)."""


@dataclass(frozen=True)
class SentinelAnswer:
    """What one Sentinel said when asked for a master.

    Attributes:
        sentinel: The Sentinel asked.
        master: The address it reports; None if it knows no master by that name or did not
            answer.
        error: Why it did not answer (its address is added by the vote); None if it answered.
    """

    sentinel: Address
    master: Address | None = None
    error: str | None = None


@dataclass(frozen=True)
class Vote:
    """The outcome of asking every Sentinel for one master name.

    Attributes:
        name: The master name asked for.
        master: The address named by the most Sentinels (on a tie, the one named by the
            earliest Sentinel of the list); None when no Sentinel that answered knows the name.
        votes: How many Sentinels named ``master``.
        answered: How many Sentinels answered (knowing the name or not).
        errors: Why the others did not answer, one ``"host:port: why"`` per Sentinel.
    """

    name: str
    master: Address | None
    votes: int
    answered: int
    errors: tuple[str, ...]

    @property
    def unknown(self) -> str:
        """Why there is no master, for messages: the name, and every Sentinel's error."""
        why = f" ({'; '.join(self.errors)})" if self.errors else ""
        return f"no Sentinel knows a master named {self.name!r}{why}"


def parse_master_reply(reply: object) -> Address | None:
    """Decode a reply to ``SENTINEL get-master-addr-by-name`` (items as bytes or text).

    Returns:
        The address; None for a nil reply (the Sentinel knows no master by that name).

    Raises:
        ValueError: The reply is neither nil nor ``[host, port]`` with a numeric port.
    """
    if reply is None:
        return None
    if not isinstance(reply, list | tuple) or len(reply) != 2:
        raise ValueError(f"unexpected reply {reply!r}")
    host, port = (x.decode() if isinstance(x, bytes) else x for x in reply)
    if not isinstance(host, str) or not isinstance(port, str) or not port.isdigit():
        raise ValueError(f"unexpected reply {reply!r}")
    return Address(host, int(port))


def vote(name: str, answers: Sequence[SentinelAnswer]) -> Vote:
    """Count the Sentinels' answers for master ``name``.

    The address named by the most Sentinels that answered wins, even when that is not a
    majority of all Sentinels (Sentinels that did not answer do not count): the server found
    is verified before use (role and shard identity) and every write is tagged, so a wrong
    answer cannot misroute writes, while requiring a majority would leave shards unreachable
    whenever most Sentinels are.

    Raises:
        SentinelUnreachable: No Sentinel answered; the message gives each one's error.
    """
    errors = tuple(f"{a.sentinel}: {a.error}" for a in answers if a.error is not None)
    answered = len(answers) - len(errors)
    if not answered:
        raise SentinelUnreachable("no Sentinel answered: " + "; ".join(errors))
    counts = Counter(a.master for a in answers if a.master is not None)
    if not counts:
        return Vote(name, None, 0, answered, errors)
    # most_common keeps first-seen order among equal counts: the earliest listed Sentinel wins.
    master, votes = counts.most_common(1)[0]
    return Vote(name, master, votes, answered, errors)
