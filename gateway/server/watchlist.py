"""Watchlist events: ``online`` / ``offline`` of the users a signed-in socket watches.

A user is **online** while at least one socket signed in as the user is open on any node.

* **Who is online** lives in the presence store, with everything presence has: for each user
  signed in on it, a node holds the user as the one member of the internal channel
  ``#online-{user_id}`` (the hub joins it on the user's first signed-in socket on the node and
  leaves it after the last). Ownership, leases, anti-entropy and the reaper are presence's: the
  first socket anywhere publishes ``M``, the last one (or the reap of a dead node) ``R``, once.
* **Watching**: a node listens to ``#online-{id}`` for every id its signed-in sockets watch.
  Right after ``pusher:signin_success`` a watcher gets ``online`` with the watched ids online on
  any node (read from the store); then ``online`` on ``M``. ``R`` starts a hold (the node's
  ``webhook_hold_ms``, the hold of ``member_removed`` webhooks): an ``M`` within it cancels it,
  so a page reload or a quick reconnect sends nothing; after it, ``offline``.
* Each socket is told a change only if it changes what the socket was last told (no ``online``
  twice, no ``offline`` for a user it never saw online).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING

from gateway.metrics import Metrics
from gateway.protocol import messages
from gateway.protocol.channels import online_channel
from gateway.shards import contract
from gateway.shards.contract import channel_key
from gateway.shards.writer import WriteFailed
from gateway.store.presence import PresenceStore, Subscriptions

if TYPE_CHECKING:
    from gateway.server.hub import Client

__all__ = ["Watchlists"]

log = logging.getLogger("gateway.watchlist")

#: (app id, watched user id).
Watched = tuple[str, str]


class Watchlists:
    """The watchers of one node and the ``online`` / ``offline`` events they are due.

    Args:
        store: The presence store (reads of ``#online-{id}``).
        pubsub: The node's Pub/Sub subscriptions.
        keys: The hub's map of listened channel keys to (app id, channel); entries for
            ``#online-{id}`` channels are added and removed here.
        is_open: Whether a client's socket is still open.
        metrics: Counter ``pg_watchlist_events_total{event}`` (frames sent).
        hold: Seconds an ``offline`` waits for the user to come back (cancelled if so).
        grace: Seconds the node keeps listening to a watched id after its last watcher left.
    """

    def __init__(
        self,
        store: PresenceStore,
        pubsub: Subscriptions,
        keys: MutableMapping[bytes, tuple[str, str]],
        is_open: Callable[[Client], bool],
        metrics: Metrics,
        *,
        hold: float,
        grace: float,
    ) -> None:
        self.store = store
        self.pubsub = pubsub
        self.keys = keys
        self.is_open = is_open
        self.metrics = metrics
        self.hold = hold
        self.grace = grace
        #: Sockets watching each (app, user id).
        self.watchers: dict[Watched, set[Client]] = {}
        #: Per watching socket: the ids it watches and those it was last told are online.
        self.watching: dict[Client, tuple[tuple[str, ...], set[str]]] = {}
        self._offline: dict[Watched, asyncio.TimerHandle] = {}

    # -- watchers ------------------------------------------------------------------------------

    async def watch(self, client: Client, ids: Sequence[str]) -> None:
        """``client`` (signed in) now watches ``ids`` (replacing what it watched): listen to
        each, then send ``online`` with those online anywhere."""
        self.unwatch(client)
        ids = tuple(dict.fromkeys(ids))
        if not ids:
            return
        app_id = client.app.id
        told: set[str] = set()
        self.watching[client] = (ids, told)
        for user in ids:
            self.watchers.setdefault((app_id, user), set()).add(client)
        results = await asyncio.gather(
            *(self._listen(app_id, user) for user in ids), return_exceptions=True
        )
        failed = [user for user, r in zip(ids, results, strict=True) if r is not None]
        reads = await asyncio.gather(
            *(self.store.user_ids(app_id, online_channel(user)) for user in ids),
            return_exceptions=True,
        )
        if self.watching.get(client, (None,))[0] is not ids or not self.is_open(client):
            return  # closed or signed in again meanwhile
        online = []
        for user, read in zip(ids, reads, strict=True):
            if isinstance(read, BaseException):
                if not isinstance(read, (WriteFailed, ConnectionError, TimeoutError)):
                    raise read
                failed.append(user)
            elif read and user not in told and (app_id, user) not in self._offline:
                online.append(user)
        if failed:
            log.warning(
                "watchlist of a socket of app %s: %d watched ids unreadable or not listened "
                "to (shard unavailable); their changes may be missed until it signs in again",
                app_id,
                len(set(failed)),
            )
        if online:
            told.update(online)
            self._send([client], "online", online)

    def unwatch(self, client: Client) -> None:
        """``client`` watches nothing any more (closed, or signed in with a new watchlist)."""
        entry = self.watching.pop(client, None)
        if entry is None:
            return
        app_id = client.app.id
        for user in entry[0]:
            watched = (app_id, user)
            sockets = self.watchers.get(watched)
            if sockets is None:
                continue
            sockets.discard(client)
            if not sockets:
                del self.watchers[watched]
                asyncio.get_running_loop().call_later(self.grace, self._forget, watched)

    async def _listen(self, app_id: str, user: str) -> None:
        channel = online_channel(user)
        key = channel_key(app_id, channel)
        self.keys[key] = (app_id, channel)
        shard = self.store.shard_of(app_id, channel)
        if not self.pubsub.listening(shard, key):
            await self.pubsub.subscribe(shard, key)

    def _forget(self, watched: Watched) -> None:
        if watched in self.watchers:
            return  # watched again
        timer = self._offline.pop(watched, None)
        if timer is not None:
            timer.cancel()
        app_id, user = watched
        channel = online_channel(user)
        key = channel_key(app_id, channel)
        if self.keys.pop(key, None) is not None:
            self.pubsub.unsubscribe(self.store.shard_of(app_id, channel), key)

    # -- changes -------------------------------------------------------------------------------

    def on_message(self, app_id: str, data: bytes) -> None:
        """A message published on an ``#online-{id}`` channel this node listens to."""
        message = contract.decode_message(data)
        if isinstance(message, contract.MemberAdded):
            watched = (app_id, message.user_id)
            timer = self._offline.pop(watched, None)
            if timer is not None:
                timer.cancel()  # back within the hold: nobody was told offline
            self._tell(watched, "online")
        elif isinstance(message, contract.MemberRemoved):
            watched = (app_id, message.user_id)
            if watched not in self._offline and watched in self.watchers:
                loop = asyncio.get_running_loop()
                self._offline[watched] = loop.call_later(self.hold, self._gone, watched)
        else:
            self.metrics.inc("pg_pubsub_malformed_total")

    def _gone(self, watched: Watched) -> None:
        self._offline.pop(watched, None)
        self._tell(watched, "offline")

    def _tell(self, watched: Watched, name: str) -> None:
        user = watched[1]
        due = []
        for client in self.watchers.get(watched, ()):
            told = self.watching[client][1]
            if (name == "online") != (user in told):
                if name == "online":
                    told.add(user)
                else:
                    told.discard(user)
                due.append(client)
        if due:
            self._send(due, name, [user])

    def _send(self, clients: Iterable[Client], name: str, ids: Sequence[str]) -> None:
        text = messages.watchlist_events([(name, ids)])
        n = 0
        for client in clients:
            client.conn.send_text(text)
            n += 1
        self.metrics.inc("pg_watchlist_events_total", n, event=name)

    def close(self) -> None:
        """Cancel held offline events (node stopping)."""
        for timer in self._offline.values():
            timer.cancel()
        self._offline.clear()
