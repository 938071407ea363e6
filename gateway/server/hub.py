"""The node's local view: its sockets, their channels, and delivery of shard events to them.

The hub drives one sans-I/O :class:`~gateway.protocol.session.Session` per WebSocket, carries
out the actions it asks for against the presence store, and delivers what the shards publish
to the local subscribers. Only node-level transitions reach Redis: the first local socket of a
channel subscribes the node to the channel on its shard, the first local socket of a presence
user joins the user for this node, and subscriber counts are written as this node's absolute
values, coalesced.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, assert_never

from gateway._native import member_frame
from gateway.config import AppConfig, NodeConfig
from gateway.metrics import Metrics
from gateway.protocol import messages
from gateway.protocol.channels import (
    ONLINE_PREFIX,
    is_cache,
    online_channel,
    online_user_id,
    server_to_user_channel,
    server_to_user_id,
)
from gateway.protocol.limits import Limits
from gateway.protocol.session import Action, Close, Join, Leave, Publish, Send, Session, SignIn
from gateway.server.deadlines import Deadlines
from gateway.server.quotas import CONNECTIONS_CHANNEL, QUOTA_CHANNELS, Quotas
from gateway.server.watchlist import Watchlists
from gateway.server.websocket import WsConnection, broadcast_frame, encode_text_frame
from gateway.shards import contract
from gateway.shards.contract import JoinResult, SubsResult, channel_key
from gateway.shards.writer import WriteFailed
from gateway.store.presence import (
    LocalChannel,
    LocalState,
    PresenceStore,
    Subscriptions,
    SubsItem,
)

__all__ = ["Client", "Hub", "LocalMember"]

log = logging.getLogger("gateway.hub")

#: Cache channels keep their last event this long (Pusher: up to 30 minutes).
CACHE_TTL_MS = 30 * 60 * 1000

ChannelId = tuple[str, str]  # (app id, channel name)

#: Seconds a node keeps listening to a channel after its last local socket left.
UNSUBSCRIBE_GRACE = 5.0


def new_socket_id() -> str:
    """A Pusher socket id: two decimal integers joined by a dot."""
    import secrets

    return f"{secrets.randbelow(10**10)}.{secrets.randbelow(10**10)}"


@dataclass(slots=True)
class LocalMember:
    """A presence user this node holds in one channel.

    Attributes:
        sockets: This node's sockets of the user in the channel (counted from the join).
        info: The ``user_info`` the node joined the user with (the first socket's).
    """

    sockets: int
    info: str | None


#: (app id, channel, user id): a presence user in a channel.
MemberId = tuple[str, str, str]


@dataclass(eq=False)
class Client:
    """One WebSocket and its session."""

    conn: WsConnection
    app: AppConfig
    session: Session
    #: Channels whose subscription_succeeded has not been sent yet: frames wait here.
    pending: dict[str, list[str]] = field(default_factory=dict)
    joined: set[str] = field(default_factory=set)


class Hub:
    """Local sockets and channels of one node, wired to the presence store and Pub/Sub."""

    def __init__(
        self,
        config: NodeConfig,
        store: PresenceStore,
        pubsub: Subscriptions,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.store = store
        self.pubsub = pubsub
        self._hooks: dict[ChannelId, str] = {}
        self.metrics = metrics
        self.clock = clock
        self.clients: dict[int, Client] = {}
        self.by_app: dict[str, int] = {}
        # Sockets subscribed or subscribing, per channel: drives the node's count and delivery.
        self.members: dict[ChannelId, set[Client]] = {}
        self.presence: dict[MemberId, LocalMember] = {}
        self.users: dict[tuple[str, str], set[Client]] = {}  # signed-in sockets
        #: Open sockets by the second of their next heartbeat deadline (see :meth:`tick`).
        self.deadlines: Deadlines[Client] = Deadlines(clock())
        self._count_dirty: set[ChannelId] = set()
        self._count_scheduled = False
        #: Work in flight: tasks, and store writes until their result was handled.
        self._tasks: set[asyncio.Future[Any]] = set()
        self._keys: dict[bytes, ChannelId] = {}
        #: While draining, presence members whose last local socket closed are kept in the
        #: store (handed over): see :meth:`finish_handover`.
        self.handing_over = False
        self._handed: set[MemberId] = set()
        self.limits = Limits(
            activity_timeout=config.activity_timeout,
            subscribes_per_second=config.subscribes_per_second,
            subscribe_burst=config.subscribe_burst,
        )
        self.watchlists = Watchlists(
            store,
            pubsub,
            self._keys,
            lambda client: client.conn.id in self.clients,
            metrics,
            hold=config.webhook_hold_ms / 1000,
            grace=UNSUBSCRIBE_GRACE,
        )
        self.quotas = Quotas(
            store,
            lambda: self.config.apps,
            lambda app_id: self.by_app.get(app_id, 0),
            self._schedule_count,
            metrics,
            clock=clock,
        )
        metrics.gauge("pg_connections", "Open WebSocket connections", self._conn_gauge)
        self._delivered = metrics.series("pg_messages_delivered_total")

    def _conn_gauge(self) -> dict[tuple[tuple[str, str], ...], float]:
        return {(("app", app),): float(n) for app, n in self.by_app.items()}

    # -- front door callbacks ------------------------------------------------------------------

    def ws_open(self, conn: WsConnection) -> None:
        """A WebSocket completed its handshake."""
        parts = conn.path.split("/")
        if len(parts) != 3 or parts[1] != "app":
            self._refuse(conn, 4005, "Path not found")
            return
        app = self.config.app_by_key(parts[2])
        if app is None:
            self._refuse(conn, 4001, f"App key {parts[2]} not in this cluster")
            return
        protocol = _query_param(conn.query, "protocol")
        if protocol is not None and (not protocol.isdigit() or not 4 <= int(protocol) <= 7):
            self._refuse(conn, 4007, f"Unsupported protocol version {protocol}")
            return
        if not self.quotas.admit_connection(app):
            self._refuse(conn, 4100, f"Over connection quota ({app.max_connections})")
            return
        session = Session(
            app=app,
            socket_id=new_socket_id(),
            now=self.clock(),
            limits=app.limits(self.limits),
            client_events=app.client_events,
            subscription_count=app.subscription_count,
        )
        client = Client(conn, app, session)
        self.clients[conn.id] = client
        self.by_app[app.id] = self.by_app.get(app.id, 0) + 1
        if app.max_connections:
            self._schedule_count((app.id, CONNECTIONS_CHANNEL))
        self.metrics.inc("pg_connections_opened_total")
        self._apply(client, session.open())
        self._schedule(client)

    def ws_text(self, conn: WsConnection, text: str) -> None:
        """A text frame arrived."""
        client = self.clients.get(conn.id)
        if client is not None:
            self._apply(client, client.session.receive_text(text, self.clock()))

    def ws_binary(self, conn: WsConnection, data: bytes) -> None:
        """A binary frame arrived (unsupported by the protocol)."""
        client = self.clients.get(conn.id)
        if client is not None:
            self._apply(client, client.session.receive_binary(self.clock()))

    def ws_closed(self, conn: WsConnection, code: int | None) -> None:
        """The WebSocket is gone: leave every channel it was in."""
        client = self.clients.pop(conn.id, None)
        if client is None:
            return
        self.by_app[client.app.id] -= 1
        if client.app.max_connections:
            self._schedule_count((client.app.id, CONNECTIONS_CHANNEL))
        self.deadlines.discard(client)
        user = client.session.user_id
        if user is not None:
            self._unregister_user(client, user)
        self._apply(client, client.session.closed())

    def set_apps(self, config: NodeConfig) -> dict[str, int]:
        """Put ``config``'s apps in force (apps reloaded).

        Sockets of an app that is gone, or whose key changed, get ``pusher:error`` 4001 and
        are closed with 4001 (they leave their channels as any closed socket); sockets of a
        changed app (a rotated secret, new limits) get its new settings from their next
        frame. Returns the number of sockets closed per app id.
        """
        self.config = config
        self._hooks.clear()
        closed: dict[str, int] = {}
        for client in list(self.clients.values()):
            app = config.app_by_id(client.app.id)
            if app is None or app.key != client.app.key:
                closed[client.app.id] = closed.get(client.app.id, 0) + 1
                self._refuse(client.conn, 4001, f"App key {client.app.key} not in this cluster")
                self.ws_closed(client.conn, 4001)  # leaves its channels now; nothing more read
            elif app is not client.app:
                client.app = app
                client.session.set_app(app, app.limits(self.limits))
        return closed

    @staticmethod
    def _refuse(conn: WsConnection, code: int, message: str) -> None:
        conn.send_text(messages.error(code, message))
        conn.close(code, message)

    # -- actions -------------------------------------------------------------------------------

    def _apply(self, client: Client, actions: Sequence[Action]) -> None:
        for i, action in enumerate(actions):
            match action:
                case Send():
                    client.conn.send_text(action.text)
                case Join():
                    self._join(client, action)
                case Leave():
                    self._leave(client, action)
                case Publish():
                    self._track(self._publish(client, action))
                case SignIn():
                    # signin_success waits until this node listens to the user's channel, so
                    # a server-to-user event or a termination sent right after is not missed.
                    self._track(self._sign_in(client, action.user_id, actions[i + 1 :]))
                    return
                case Close():
                    client.conn.close(action.code, action.reason)
                case _:
                    assert_never(action)

    def _track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hub task failed", exc_info=task.exception())

    def _join(self, client: Client, action: Join) -> None:
        cid = (client.app.id, action.channel)
        key = channel_key(*cid)
        self._keys[key] = cid
        # Deliveries start before the state change so nothing published after it is missed;
        # they wait in client.pending until subscription_succeeded is sent.
        client.pending[action.channel] = []
        self.members.setdefault(cid, set()).add(client)
        shard = self.store.shard_of(*cid)
        if self.pubsub.listening(shard, key):
            self._join_store(client, action)
        else:
            self._track(self._subscribe_then_join(client, action, shard, key))

    async def _subscribe_then_join(
        self, client: Client, action: Join, shard: int, key: bytes
    ) -> None:
        try:
            await self.pubsub.subscribe(shard, key)
        except (ConnectionError, TimeoutError) as exc:
            self._join_failed(client, action, exc, counted=False)
            return
        self._join_store(client, action)

    def _join_store(self, client: Client, action: Join) -> None:
        """The node listens to the channel: count the socket, join its member in the store."""
        app, channel, member = client.app, action.channel, action.member
        cid = (app.id, channel)
        if client not in self.members.get(cid, ()):
            return  # left meanwhile; nothing was changed yet
        self._schedule_count(cid)
        if member is None:
            self._join_done(client, channel, None)
            return
        # Counted before the write: a Leave arriving meanwhile undoes it in _leave.
        pres_key = (app.id, channel, member.user_id)
        local = self.presence.get(pres_key)
        if local is not None:
            local.sockets += 1
            self._track(self._join_known(client, action))
            return
        self.presence[pres_key] = LocalMember(1, member.user_info)
        self._pending_write(
            self.store.submit_join(
                app.id,
                channel,
                member.user_id,
                member.user_info,
                client.session.socket_id,
                functools.partial(self._joined, client, action),
                max_members=app.max_presence_members,
            )
        )

    def _joined(self, client: Client, action: Join, result: JoinResult | BaseException) -> None:
        """The store answered the join of a member new on this node."""
        if isinstance(result, BaseException):
            self._join_failed(client, action, result, counted=True)
        elif result.roster is None:
            limit = client.app.max_presence_members
            refused = _Refused(4100, f"Presence channel is full ({limit} members)")
            self._join_failed(client, action, refused, counted=True)
        else:
            self._join_done(client, action.channel, result.roster)

    async def _join_known(self, client: Client, action: Join) -> None:
        """Another socket of the member holds it on this node: only the roster is needed."""
        try:
            roster = await self.store.roster(client.app.id, action.channel)
        except (WriteFailed, ConnectionError, TimeoutError) as exc:
            self._join_failed(client, action, exc, counted=True)
            return
        self._join_done(client, action.channel, roster)

    def _join_failed(
        self, client: Client, action: Join, exc: BaseException, *, counted: bool
    ) -> None:
        app, channel, member = client.app, action.channel, action.member
        if not isinstance(exc, (_Refused, WriteFailed, ConnectionError, TimeoutError)):
            log.error("hub task failed", exc_info=exc)
            return
        cid = (app.id, channel)
        if client not in self.members.get(cid, ()):
            return  # already left: _leave undid the local state
        if counted and member is not None:
            self._drop_presence((app.id, channel, member.user_id))
        self._undo_join(client, cid)
        if isinstance(exc, _Refused):
            code, message = exc.code, exc.message
        else:
            shard = self.store.shard_name(self.store.shard_of(app.id, channel))
            code = 4200
            message = f"State store unavailable for this channel ({shard}); retry later"
        self._apply(client, client.session.subscribe_failed(channel, code, message))

    def _join_done(
        self, client: Client, channel: str, roster: Mapping[str, str | None] | None
    ) -> None:
        buffered = client.pending.pop(channel, [])
        actions = client.session.subscribed(channel, roster)
        self._apply(client, actions)
        if not any(isinstance(a, Send) for a in actions):
            return  # the socket unsubscribed or closed meanwhile (the Leave ran above)
        client.joined.add(channel)
        for text in buffered:
            client.conn.send_text(text)
        if is_cache(channel):
            self._track(self._send_cache(client, channel))

    def _undo_join(self, client: Client, cid: ChannelId) -> None:
        client.pending.pop(cid[1], None)
        members = self.members.get(cid)
        if members is not None:
            members.discard(client)
            if not members:
                del self.members[cid]
                self._release(cid)
        self._schedule_count(cid)

    def _release(self, cid: ChannelId) -> None:
        """Forget a channel no local socket wants, after a grace period.

        The grace period keeps a channel whose sockets come and go (reloads, churn) from paying
        a Pub/Sub round trip on every join. After it, nothing of the channel stays in memory.
        """
        asyncio.get_running_loop().call_later(UNSUBSCRIBE_GRACE, self._forget, cid)

    def _forget(self, cid: ChannelId) -> None:
        if cid in self.members:
            return  # wanted again
        app_id, channel = cid
        user = server_to_user_id(channel)
        if user is not None and (app_id, user) in self.users:
            return  # a signed-in socket of the user still needs it
        key = channel_key(app_id, channel)
        if self._keys.pop(key, None) is not None:
            self.pubsub.unsubscribe(self.store.shard_of(app_id, channel), key)

    def _drop_presence(self, pres_key: MemberId) -> int:
        """One socket of the member fewer; returns how many are left (0: forgotten)."""
        local = self.presence.get(pres_key)
        if local is None or local.sockets <= 1:
            self.presence.pop(pres_key, None)
            return 0
        local.sockets -= 1
        return local.sockets

    def _leave_member(self, pres_key: MemberId) -> None:
        """One local socket of a member fewer; after the last, the member leaves in the store
        (or is kept there while draining: see :meth:`finish_handover`)."""
        if pres_key in self.presence and self._drop_presence(pres_key) == 0:
            if self.handing_over:
                self._handed.add(pres_key)
            else:
                app_id, channel, user = pres_key
                self._pending_write(self.store.submit_leave(app_id, channel, user, _leave_written))

    def _leave(self, client: Client, action: Leave) -> None:
        app, channel = client.app, action.channel
        cid = (app.id, channel)
        client.joined.discard(channel)
        client.pending.pop(channel, None)
        members = self.members.get(cid)
        if members is None or client not in members:
            return
        members.discard(client)
        if action.member is not None:
            self._leave_member((app.id, channel, action.member.user_id))
        if not members:
            del self.members[cid]
            self._release(cid)
        self._schedule_count(cid)

    def _pending_write(self, future: asyncio.Future[Any]) -> None:
        """Keep a store write in flight in :attr:`_tasks` (for :meth:`drain`) until done."""
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    async def _publish(self, client: Client, action: Publish) -> None:
        app = client.app
        frame = messages.channel_event(action.event, action.channel, action.data, action.user_id)
        payload = contract.encode_event(frame, client.session.socket_id)
        hook = None
        if "e" in self.hooks_for(app.id, action.channel):
            extra: dict[str, Any] = {
                "event": action.event,
                "data": action.data,
                "socket_id": client.session.socket_id,
            }
            if action.user_id is not None:
                extra["user_id"] = action.user_id
            hook = ("e", json.dumps(extra, separators=(",", ":")))
        try:
            # The event and its client_event webhook are one write: both or neither.
            await self.store.publish(app.id, action.channel, payload, hook=hook)
        except (WriteFailed, ConnectionError, TimeoutError) as exc:
            log.warning("client event not published: %s", exc)

    async def _send_cache(self, client: Client, channel: str) -> None:
        try:
            frame, _ = await self.store.cache_get(client.app.id, channel)
        except (WriteFailed, ConnectionError, TimeoutError):
            return
        if frame is not None:
            client.conn.send_text(frame)
        else:
            client.conn.send_text(messages.cache_miss(channel))
            self._cache_miss_webhook(client.app, channel)

    # -- subscription counts -------------------------------------------------------------------

    def _schedule_count(self, cid: ChannelId) -> None:
        self._count_dirty.add(cid)
        if not self._count_scheduled:
            self._count_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_counts)

    def _write_counts(self) -> None:
        # Coalesces count changes of one loop tick in one submission; each write carries the
        # absolute count, and the writer keeps a shard's writes in order.
        self._count_scheduled = False
        dirty, self._count_dirty = self._count_dirty, set()
        apps: list[AppConfig] = []
        items: list[SubsItem] = []
        for app_id, channel in dirty:
            app = self.config.app_by_id(app_id)
            if app is None:
                continue
            if channel in QUOTA_CHANNELS:
                count, publish = self.quotas.own(app_id, channel), False
            else:
                count = len(self.members.get((app_id, channel), ()))
                publish = app.subscription_count and not channel.startswith("presence-")
            apps.append(app)
            items.append((app_id, channel, count, publish))
        if items:
            done = functools.partial(self._counts_written, apps, items)
            self._pending_write(self.store.submit_subscribers(items, done))

    def _counts_written(
        self,
        apps: list[AppConfig],
        items: list[SubsItem],
        results: list[SubsResult | BaseException],
    ) -> None:
        for app, (_, channel, count, _publish), result in zip(apps, items, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("subscriber count of %s not written: %s", (app.id, channel), result)
                continue
            elif channel in QUOTA_CHANNELS:
                self.quotas.written(app.id, channel, count)
        # Their webhooks (channel_occupied, subscription_count) are in the outbox already.

    # -- signed-in users -----------------------------------------------------------------------

    async def _sign_in(self, client: Client, user_id: str, then: Sequence[Action]) -> None:
        app = client.app
        if client.conn.id not in self.clients:
            return  # closed before this ran: nothing to register
        ukey = (app.id, user_id)
        sockets = self.users.setdefault(ukey, set())
        if client not in sockets:
            sockets.add(client)
            if app.watchlist_events:
                self._online(app.id, user_id)
        channel = server_to_user_channel(user_id)
        key = channel_key(app.id, channel)
        self._keys[key] = (app.id, channel)
        try:
            await self.pubsub.subscribe(self.store.shard_of(app.id, channel), key)
        except (ConnectionError, TimeoutError) as exc:
            log.warning("user channel of %s not subscribed: %s", user_id, exc)
        if client.conn.id not in self.clients:
            return
        self._apply(client, then)
        user = client.session.user
        if app.watchlist_events and user is not None and client.conn.id in self.clients:
            await self.watchlists.watch(client, user.watchlist)

    def _online(self, app_id: str, user_id: str) -> None:
        """One more signed-in socket of the user on this node: the first one holds the user
        in ``#online-{user_id}`` (watchlist events; see :mod:`gateway.server.watchlist`)."""
        pres_key = (app_id, online_channel(user_id), user_id)
        local = self.presence.get(pres_key)
        if local is not None:
            local.sockets += 1
            return
        self.presence[pres_key] = LocalMember(1, None)
        self._pending_write(
            self.store.submit_join(app_id, pres_key[1], user_id, None, "", _online_written)
        )

    def _unregister_user(self, client: Client, user_id: str) -> None:
        ukey = (client.app.id, user_id)
        sockets = self.users.get(ukey)
        if sockets is None or client not in sockets:
            return
        sockets.discard(client)
        self.watchlists.unwatch(client)
        self._leave_member((client.app.id, online_channel(user_id), user_id))
        if not sockets:
            del self.users[ukey]
            self._forget((client.app.id, server_to_user_channel(user_id)))

    # -- delivery of shard messages ------------------------------------------------------------

    def on_message(self, shard: int, key: bytes, data: bytes) -> None:
        """A message published on a shard channel this node listens to."""
        cid = self._keys.get(key)
        if cid is None:
            return  # a channel this node no longer holds (released during the grace period)
        if cid[1].startswith(ONLINE_PREFIX):
            self.watchlists.on_message(cid[0], data)
            return
        # member_added/member_removed, built natively from the message (tests/test_native.py);
        # None for the other kinds, decoded below.
        member = member_frame(cid[1], data)
        if member is not None:
            self._deliver(cid, member[0], member[1])
            return
        message = contract.decode_message(data)
        exclude: str | None = None
        match message:
            case contract.EventMessage():
                exclude = message.exclude
                text = message.frame
            case contract.MemberAdded():
                exclude = message.exclude
                text = messages.member_added(cid[1], message.user_id, message.user_info)
            case contract.MemberRemoved():
                text = messages.member_removed(cid[1], message.user_id)
            case contract.CountMessage():
                app = self.config.app_by_id(cid[0])
                if app is None or not app.subscription_count:
                    return
                text = messages.subscription_count(cid[1], message.count)
            case contract.Terminate():
                user = server_to_user_id(cid[1])
                if user is not None:
                    self._terminate(cid[0], user)
                return
            case None:
                self.metrics.inc("pg_pubsub_malformed_total")
                return
            case _:
                assert_never(message)
        self._deliver(cid, text, exclude)

    def _deliver(self, cid: ChannelId, text: str, exclude: str | None) -> None:
        receivers: list[WsConnection] = []
        for client in self.members.get(cid, ()):
            if client.session.socket_id == exclude:
                continue
            waiting = client.pending.get(cid[1])
            if waiting is not None:
                waiting.append(text)
            elif cid[1] in client.joined:
                receivers.append(client.conn)
        user = server_to_user_id(cid[1])
        if user is not None:
            for client in self.users.get((cid[0], user), ()):
                if client.conn not in receivers and client.session.socket_id != exclude:
                    receivers.append(client.conn)
        if len(receivers) == 1:
            receivers[0].send_text(text)
        elif receivers:
            broadcast_frame(receivers, encode_text_frame(text))
        self._delivered.inc(len(receivers))

    def _terminate(self, app_id: str, user_id: str) -> None:
        for client in list(self.users.get((app_id, user_id), ())):
            self._refuse(client.conn, 4009, "Connection terminated by the app")

    # -- webhooks and periodic work ------------------------------------------------------------

    def hooks_for(self, app_id: str, channel: str) -> str:
        """The webhook kinds (letters of :data:`~gateway.shards.contract.HOOK_KINDS`) the app's
        endpoints want on ``channel``: what its store writes record in the outbox."""
        app = self.config.app_by_id(app_id)
        # '#' channels (#server-to-user-{id}, #online-...) are internal: no webhooks.
        if app is None or not app.endpoints or channel.startswith("#"):
            return ""  # the common case, and nothing kept per channel for it
        cid = (app_id, channel)
        kinds = self._hooks.get(cid)
        if kinds is None:
            wanted = {
                letter
                for name, letter in contract.HOOK_LETTERS.items()
                if any(e.wants(name, channel) for e in app.endpoints)
            }
            if not app.subscription_count:
                wanted.discard("c")
            kinds = "".join(sorted(wanted))
            if len(self._hooks) >= 16_384:  # a bounded memo, not a second channel table
                self._hooks.clear()
            self._hooks[cid] = kinds
        return kinds

    def _cache_miss_webhook(self, app: AppConfig, channel: str) -> None:
        """A cache_miss webhook (``x``, the only one that goes with no write of state): into
        the channel's outbox when an endpoint wants it."""
        if "x" in self.hooks_for(app.id, channel):
            self._pending_write(self.store.submit_hook(app.id, channel, "x", ""))

    def local_state(self, shard: int) -> LocalState:
        """What this node really holds on ``shard``: the truth it re-asserts."""
        out: LocalState = {}
        for (app_id, channel), sockets in self.members.items():
            if not sockets or self.store.shard_of(app_id, channel) != shard:
                continue
            app = self.config.app_by_id(app_id)
            publish = bool(app and app.subscription_count) and not channel.startswith("presence-")
            out[(app_id, channel)] = LocalChannel(len(sockets), {}, publish)
        for app_id, channel, count in self.quotas.local_channels():
            if count and self.store.shard_of(app_id, channel) == shard:
                out[(app_id, channel)] = LocalChannel(count, {}, False)
        for (app_id, channel, user), local in self.presence.items():
            state = out.get((app_id, channel))
            if state is None and channel.startswith(ONLINE_PREFIX):
                if self.store.shard_of(app_id, channel) != shard:
                    continue
                state = out[(app_id, channel)] = LocalChannel(0, {}, False)
            if state is not None:
                state.members[user] = local.info
        return out

    def local_channel(self, app_id: str, channel: str) -> LocalChannel:
        """What this node really holds in one channel (empty when nothing)."""
        user = online_user_id(channel)
        if user is not None:
            local = self.presence.get((app_id, channel, user))
            return LocalChannel(0, {} if local is None else {user: local.info}, False)
        if channel in QUOTA_CHANNELS:
            figures = self.quotas.local_channels()
            count = next((n for a, c, n in figures if (a, c) == (app_id, channel)), 0)
            return LocalChannel(count, {}, False)
        sockets = self.members.get((app_id, channel))
        if not sockets:
            return LocalChannel(0, {}, False)
        app = self.config.app_by_id(app_id)
        publish = bool(app and app.subscription_count) and not channel.startswith("presence-")
        members: dict[str, str | None] = {}
        for client in sockets:
            member = client.session.presence_member(channel)
            if member is not None:
                local = self.presence.get((app_id, channel, member.user_id))
                if local is not None:
                    members[member.user_id] = local.info
        return LocalChannel(len(sockets), members, publish)

    def compact(self) -> None:
        """Rebuild the channel tables: a dict keeps the size of its largest past content, so
        after a burst of channels the tables are copied to fit what is left."""
        self.members = dict(self.members)
        self._keys = dict(self._keys)
        self.presence = dict(self.presence)
        self.users = dict(self.users)
        self.deadlines.compact()
        self.pubsub.compact()

    def tick(self) -> None:
        """Give the sessions whose heartbeat deadline came their check (pings, 4201 closes).

        Called once a second. Only the sockets filed under a second that has come are looked
        at: a session acts at the first tick at or after its :meth:`Session.deadline
        <gateway.protocol.session.Session.deadline>`, as if every session were ticked. A
        socket that sent frames since it was filed is not due yet and is filed again under its
        later deadline (client frames never touch the schedule).
        """
        now = self.clock()
        for client in self.deadlines.pop_due(now):
            actions = client.session.tick(now)  # nothing before the session's deadline
            if actions:
                self._apply(client, actions)
            self._schedule(client)

    def _schedule(self, client: Client) -> None:
        """File ``client`` under its session's deadline; not once it is closing (4201 sent,
        or the socket gone)."""
        deadline = client.session.deadline()
        if deadline is not None:
            self.deadlines.schedule(client, deadline)

    async def finish_handover(self) -> int:
        """Leave for the members kept while draining; returns how many.

        A member whose user reconnected to another node meanwhile is held there too: its leave
        here announces nothing. Others leave normally (``member_removed`` once, its webhook
        after the hold).
        """
        handed, self._handed = self._handed, set()
        self.handing_over = False
        leaves = [
            self.store.submit_leave(app_id, channel, user, _leave_written)
            for app_id, channel, user in handed
            if (app_id, channel, user) not in self.presence
        ]
        if leaves:
            await asyncio.gather(*leaves, return_exceptions=True)
        return len(leaves)

    async def drain(self) -> None:
        """Leave every channel (graceful shutdown): other nodes see the leaves at once."""
        for client in list(self.clients.values()):
            self.ws_closed(client.conn, None)
        if self._count_dirty:
            self._write_counts()  # now rather than at the next loop tick
        with contextlib.suppress(Exception):
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=5)


def _online_written(result: JoinResult | BaseException) -> None:
    _leave_written(result if isinstance(result, BaseException) else True)


def _leave_written(result: bool | BaseException) -> None:
    if isinstance(result, (WriteFailed, ConnectionError, TimeoutError)):
        log.warning("store write failed: %s", result)
    elif isinstance(result, BaseException):
        log.error("hub task failed", exc_info=result)


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _query_param(query: str, name: str) -> str | None:
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == name:
            return value
    return None
