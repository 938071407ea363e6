"""The per-connection Pusher state machine: frames and timer ticks in, actions out (sans-I/O).

The I/O layer owns the socket and the presence store. It feeds the session what the client sent
(:meth:`Session.receive_text`), the passing of time (:meth:`Session.tick`), and the store's
answers (:meth:`Session.subscribed`, :meth:`Session.subscribe_failed`), and carries out the
returned actions in order. A typical connection::

    session = Session(app=app, socket_id="123.456", now=clock())
    run(session.open())                                  # [Send(connection_established)]
    run(session.receive_text(frame, now=clock()))        # e.g. [Join("presence-x", member)]
    run(session.subscribed("presence-x", roster))        # [Send(subscription_succeeded)]
    run(session.tick(now=clock()))                       # every few seconds
    run(session.closed())                                # [Leave(...), ...] once the socket is gone

Contract for the I/O layer:

- ``Join`` and ``Leave`` for one socket must reach the store in the order emitted, and ``Leave``
  must be idempotent: a ``Leave`` is emitted when a pending subscription is cancelled, and
  another one if the store confirms the cancelled ``Join`` afterwards (:meth:`subscribed`).
- A ``Join`` is emitted at most once per (socket, channel) until a matching ``Leave``.
- After a ``Close`` action the session ignores further input; call :meth:`closed` once the
  socket is gone.
- Presence ``member_added``/``member_removed`` to *other* sockets, ``subscription_count``
  broadcasts and cache replay (cached event or ``pusher:cache_miss`` after the success frame)
  are the I/O layer's job; frames for them come from :mod:`gateway.protocol.messages`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from gateway._native import client_frame
from gateway.config import AppConfig

from . import messages
from .auth import verify_channel_auth, verify_user_auth
from .channels import ChannelKind, channel_error, classify
from .errors import FrameError, ProtocolCode
from .limits import DEFAULT_LIMITS, Limits
from .messages import (
    ClientEvent,
    ClientPing,
    ClientPong,
    ClientSignin,
    ClientSubscribe,
    ClientUnsubscribe,
    PresenceMember,
    UserData,
)

__all__ = [
    "Action",
    "Close",
    "Join",
    "Leave",
    "PresenceMember",
    "Publish",
    "Send",
    "Session",
    "SignIn",
]


@dataclass(frozen=True, slots=True)
class Send:
    """Send one text frame to this socket.

    Attributes:
        text: The frame (compact ASCII JSON).
    """

    text: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close this socket with a WebSocket close code (always 4000-4299, never 43xx).

    Attributes:
        code: Close code.
        reason: Close reason.
    """

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Join:
    """Subscribe this socket to a channel in the store, then call ``subscribed`` or
    ``subscribe_failed``.

    Attributes:
        channel: Channel name (validated, authorized).
        member: The presence member for presence channels, else None.
    """

    channel: str
    member: PresenceMember | None


@dataclass(frozen=True, slots=True)
class Leave:
    """Unsubscribe this socket from a channel in the store (idempotent).

    Attributes:
        channel: Channel name.
        member: The presence member the socket joined with, else None.
    """

    channel: str
    member: PresenceMember | None


@dataclass(frozen=True, slots=True)
class Publish:
    """Deliver a client event to the channel's other subscribers (never back to this socket).

    Build the frame with :func:`gateway.protocol.messages.channel_event` and fire the
    ``client_event`` webhook if configured.

    Attributes:
        channel: Channel name (private or presence, joined by this socket).
        event: Event name (``client-*``).
        data: Payload string, forwarded verbatim.
        user_id: The sender's presence user id on presence channels, else None.
    """

    channel: str
    event: str
    data: str
    user_id: str | None


@dataclass(frozen=True, slots=True)
class SignIn:
    """Bind this socket to a user after a verified ``pusher:signin``.

    The I/O layer routes ``#server-to-user-{user_id}`` events, watchlists and
    ``terminate_connections`` by it; :func:`gateway.protocol.messages.parse_user_data` parses
    ``user_data`` (watchlist, user_info).

    Attributes:
        user_id: The signed-in user id.
        user_data: The signed ``user_data`` JSON text, verbatim.
    """

    user_id: str
    user_data: str


#: Anything the session asks the I/O layer to do.
Action = Send | Close | Join | Leave | Publish | SignIn


def _show(name: str) -> str:
    return repr(name if len(name) <= 64 else name[:64] + "...")


class Session:
    """State of one Pusher connection; never raises on client input.

    Every method returns the list of actions to perform, in order. Malformed, oversized,
    unauthorized or unknown input yields a ``pusher:error`` frame (``code`` null unless a code is
    documented for the case: 4301 client-event rate limit, 4302 watchlist truncated) and changes
    nothing except the activity timer.

    Args:
        app: The app this socket connected to.
        socket_id: The socket id announced in ``connection_established`` (``\\d+\\.\\d+``).
        now: Current time in seconds (any monotonic clock; only differences matter).
        limits: Protocol limits.
        client_events: Whether the app accepts ``client-*`` events.
        subscription_count: Whether the app has the subscription-count feature; the session
            only records it for the I/O layer, which does the broadcasting.
    """

    def __init__(
        self,
        *,
        app: AppConfig,
        socket_id: str,
        now: float,
        limits: Limits = DEFAULT_LIMITS,
        client_events: bool = True,
        subscription_count: bool = True,
    ) -> None:
        self._app = app
        self._socket_id = socket_id
        self._limits = limits
        self._client_events = client_events
        self._subscription_count = subscription_count
        self._last_activity = now
        self._ping_sent_at: float | None = None
        self._opened = False
        self._closing = False
        self._closed = False
        self._joined: dict[str, PresenceMember | None] = {}
        self._pending: dict[str, PresenceMember | None] = {}
        self._cancelled: dict[str, PresenceMember | None] = {}
        self._user: UserData | None = None
        self._user_data: str | None = None
        self._client_event_times: deque[float] = deque()
        # Token bucket of subscriptions: full at the start, refilled at the per-second rate.
        self._subscribe_tokens = float(limits.subscribe_burst)
        self._subscribe_refill = now

    def set_app(self, app: AppConfig, limits: Limits) -> None:
        """The app's settings changed (apps reloaded: a rotated secret, new limits or flags);
        they apply from the next frame. The key and id stay the same."""
        self._app = app
        self._limits = limits
        self._client_events = app.client_events
        self._subscription_count = app.subscription_count

    # -- read-only state ----------------------------------------------------------------------

    @property
    def app(self) -> AppConfig:
        """The app this socket belongs to."""
        return self._app

    @property
    def socket_id(self) -> str:
        """This socket's id."""
        return self._socket_id

    @property
    def limits(self) -> Limits:
        """The limits in force."""
        return self._limits

    @property
    def subscription_count(self) -> bool:
        """Whether the app broadcasts ``pusher_internal:subscription_count``."""
        return self._subscription_count

    @property
    def user_id(self) -> str | None:
        """The signed-in user id, or None."""
        return self._user.id if self._user is not None else None

    @property
    def user(self) -> UserData | None:
        """The parsed ``user_data`` of the sign-in, or None."""
        return self._user

    @property
    def channels(self) -> frozenset[str]:
        """Channels whose subscription the store confirmed."""
        return frozenset(self._joined)

    @property
    def pending_channels(self) -> frozenset[str]:
        """Channels with a ``Join`` awaiting ``subscribed``/``subscribe_failed``."""
        return frozenset(self._pending)

    @property
    def closing(self) -> bool:
        """True once the session emitted ``Close`` or :meth:`closed` was called."""
        return self._closing or self._closed

    def presence_member(self, channel: str) -> PresenceMember | None:
        """This socket's member in a joined or pending presence channel, else None."""
        member = self._joined.get(channel)
        return member if member is not None else self._pending.get(channel)

    def deadline(self) -> float | None:
        """The earliest time at which :meth:`tick` has something to do, or None once closing.

        That is ``activity_timeout`` after the last client frame (the ping), or, once the ping
        went out, ``pong_timeout`` after it (the 4201 close). :meth:`tick` acts exactly when
        ``now >= deadline()``. A client frame moves the deadline later, never earlier, so a
        scheduler may keep an older, earlier deadline and re-check then.
        """
        if self.closing:
            return None
        if self._ping_sent_at is None:
            return self._last_activity + self._limits.activity_timeout
        return self._ping_sent_at + self._limits.pong_timeout

    # -- inputs -------------------------------------------------------------------------------

    def open(self) -> list[Action]:
        """Start the connection: the ``pusher:connection_established`` frame (only once)."""
        if self._opened or self.closing:
            return []
        self._opened = True
        frame = messages.connection_established(self._socket_id, self._limits.activity_timeout)
        return [Send(frame)]

    def receive_text(self, text: str, now: float) -> list[Action]:
        """Handle one text frame from the client.

        Args:
            text: The frame.
            now: Current time.
        """
        if self.closing:
            return []
        self._activity(now)
        if not self._opened:
            return self._error(None, "Connection not established yet")
        limits = self._limits
        # The common presence subscribe and unsubscribe, parsed (and verified) in one native
        # call; None for anything else, which the reference code below handles
        # (tests/test_native.py).
        fast = client_frame(
            text,
            self._socket_id,
            self._app.key,
            self._app.secret,
            max_frame_bytes=limits.max_frame_bytes,
            max_channel_name_length=limits.max_channel_name_length,
            max_user_id_length=limits.max_presence_user_id_length,
            max_user_info_bytes=limits.max_user_info_bytes,
        )
        if fast is not None:
            if isinstance(fast, str):
                return self._unsubscribe(fast)
            return self._admit(fast[0], PresenceMember(fast[1], fast[2]), now)
        message = messages.parse_client_message(text, limits)
        if isinstance(message, FrameError):
            return self._error(message.code, message.message)
        if isinstance(message, ClientEvent):
            return self._client_event(message, now)
        if isinstance(message, ClientSubscribe):
            return self._subscribe(message, now)
        if isinstance(message, ClientUnsubscribe):
            return self._unsubscribe(message.channel)
        if isinstance(message, ClientPing):
            return [Send(messages.PONG)]
        if isinstance(message, ClientPong):
            return []
        assert isinstance(message, ClientSignin)
        return self._signin(message)

    def receive_binary(self, now: float) -> list[Action]:
        """Handle a binary frame: unsupported, answered with ``pusher:error``."""
        if self.closing:
            return []
        self._activity(now)
        return self._error(None, "Binary frames are not supported; send UTF-8 JSON text")

    def tick(self, now: float) -> list[Action]:
        """Advance the heartbeat timer.

        After ``activity_timeout`` seconds without any client frame, send ``pusher:ping``; if
        still nothing arrives within ``pong_timeout`` seconds, close with 4201. Nothing happens
        before :meth:`deadline`, so a caller may skip the call until then.
        """
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return []
        if self._ping_sent_at is None:
            self._ping_sent_at = now
            return [Send(messages.PING)]
        self._closing = True
        return [Close(int(ProtocolCode.PONG_TIMEOUT), "Pong reply not received")]

    def subscribed(self, channel: str, roster: Mapping[str, str | None] | None) -> list[Action]:
        """The store confirmed a ``Join``.

        Args:
            channel: The joined channel.
            roster: For presence channels, user id -> ``user_info`` JSON text (None = no info)
                of the channel's members; this socket's member is added if missing. None for
                other channels.

        Returns:
            ``subscription_succeeded`` (``"{}"`` or the presence roster); or, if the socket
            unsubscribed or closed meanwhile, a ``Leave`` undoing the join; or nothing for an
            unknown or already confirmed channel.
        """
        if channel in self._pending:
            member = self._pending.pop(channel)
            self._joined[channel] = member
            if member is not None:
                return [
                    Send(
                        messages.presence_succeeded(
                            channel, {} if roster is None else roster, member
                        )
                    )
                ]
            return [Send(messages.subscription_succeeded(channel))]
        if channel in self._cancelled:
            return [Leave(channel, self._cancelled.pop(channel))]
        return []

    def subscribe_failed(
        self,
        channel: str,
        code: int,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
    ) -> list[Action]:
        """The store refused or failed a ``Join``; tell the client on the channel.

        Sends ``pusher:subscription_error`` with object data ``{type, error, status}`` (what
        soketi and sockudo send; pusher-js emits it to the channel's listeners).

        Args:
            channel: The channel.
            code: Reason code, e.g. 4100 (member limit reached, store over capacity).
            message: Human-readable reason.
            status: ``status`` in the frame; defaults to ``code`` (soketi sends 4100 there).
            error_type: ``type`` in the frame; defaults to ``"LimitReached"`` for 4100-4199
                (soketi's name) and ``"SubscriptionError"`` otherwise.
        """
        if channel in self._pending:
            del self._pending[channel]
            if error_type is None:
                error_type = "LimitReached" if 4100 <= code < 4200 else "SubscriptionError"
            frame = messages.subscription_error(
                channel, error_type, message, code if status is None else status
            )
            return [Send(frame)]
        self._cancelled.pop(channel, None)
        return []

    def closed(self) -> list[Action]:
        """The socket is gone: a ``Leave`` for every joined or pending channel (once)."""
        if self._closed:
            return []
        self._closed = True
        actions: list[Action] = [Leave(c, m) for c, m in self._joined.items()]
        actions += [Leave(c, m) for c, m in self._pending.items()]
        self._cancelled.update(self._pending)
        self._joined.clear()
        self._pending.clear()
        return actions

    # -- internals ----------------------------------------------------------------------------

    def _activity(self, now: float) -> None:
        self._last_activity = now
        self._ping_sent_at = None

    @staticmethod
    def _error(code: int | None, message: str) -> list[Action]:
        return [Send(messages.error(code, message))]

    def _subscribe_allowed(self, now: float) -> bool:
        limits = self._limits
        elapsed = max(0.0, now - self._subscribe_refill)
        self._subscribe_refill = now
        self._subscribe_tokens = min(
            float(limits.subscribe_burst),
            self._subscribe_tokens + elapsed * limits.subscribes_per_second,
        )
        if self._subscribe_tokens < 1.0:
            return False
        self._subscribe_tokens -= 1.0
        return True

    def _subscribe(self, message: ClientSubscribe, now: float) -> list[Action]:
        name = message.channel
        problem = channel_error(name, max_length=self._limits.max_channel_name_length)
        if problem is not None:
            return self._error(None, problem)
        channel = classify(name)
        member: PresenceMember | None = None
        if channel.kind is ChannelKind.SERVER_TO_USER:
            if self._user is None or self._user.id != channel.user_id:
                return self._error(
                    None, f"Subscription to {name!r} refused: not signed in as that user"
                )
        elif channel.requires_auth:
            if not message.auth:
                return self._error(None, f"Subscription to {name!r} requires auth")
            channel_data = message.channel_data
            if channel.is_presence and channel_data is None:
                if self._user is None:
                    return self._error(
                        None,
                        f"Subscription to {name!r} requires channel_data or a signed-in connection",
                    )
                member = PresenceMember(self._user.id, self._user.user_info)
                if len(member.user_id) > self._limits.max_presence_user_id_length:
                    return self._error(
                        None,
                        f"Presence user id too long (max "
                        f"{self._limits.max_presence_user_id_length} characters)",
                    )
            problem = verify_channel_auth(
                self._app, self._socket_id, name, message.auth, channel_data
            )
            if problem is not None:
                return self._error(None, problem)
            if channel.is_presence and channel_data is not None:
                parsed = messages.parse_channel_data(channel_data, self._limits)
                if isinstance(parsed, FrameError):
                    return self._error(parsed.code, parsed.message)
                member = parsed
        return self._admit(name, member, now)

    def _admit(self, name: str, member: PresenceMember | None, now: float) -> list[Action]:
        """A valid, authorized subscription to ``name``: join unless already joined or
        pending, within the channel and rate limits."""
        if name in self._joined:
            # Idempotent: no second Join. A presence roster is not known to the session, so a
            # repeated presence subscribe gets no second success frame.
            if self._joined[name] is not None:
                return []
            return [Send(messages.subscription_succeeded(name))]
        if name in self._pending:
            return []
        if len(self._joined) + len(self._pending) >= self._limits.max_channels_per_connection:
            return self._error(
                None,
                f"Subscription to {name!r} refused: at most "
                f"{self._limits.max_channels_per_connection} channels per connection",
            )
        if not self._subscribe_allowed(now):
            limits = self._limits
            return [
                Send(
                    messages.subscription_error(
                        name,
                        "LimitReached",
                        f"Subscription rate limit exceeded: at most "
                        f"{limits.subscribes_per_second} subscriptions per second "
                        f"(bursts of {limits.subscribe_burst}) per connection",
                        int(ProtocolCode.CLIENT_EVENT_RATE_LIMIT),
                    )
                )
            ]
        self._cancelled.pop(name, None)
        self._pending[name] = member
        return [Join(name, member)]

    def _unsubscribe(self, name: str) -> list[Action]:
        if name in self._joined:
            return [Leave(name, self._joined.pop(name))]
        if name in self._pending:
            member = self._pending.pop(name)
            self._cancelled[name] = member
            return [Leave(name, member)]
        return []

    def _signin(self, message: ClientSignin) -> list[Action]:
        problem = verify_user_auth(self._app, self._socket_id, message.user_data, message.auth)
        if problem is not None:
            return self._error(None, problem)
        user = messages.parse_user_data(message.user_data, self._limits)
        if isinstance(user, FrameError):
            return self._error(user.code, user.message)
        if self._user is not None and user.id != self._user.id:
            return self._error(
                None, "Sign-in refused: the connection is already signed in as another user"
            )
        success = Send(messages.signin_success(message.user_data))
        if message.user_data == self._user_data:
            return [success]
        self._user = user
        self._user_data = message.user_data
        actions: list[Action] = [SignIn(user.id, message.user_data), success]
        if user.watchlist_truncated:
            actions += self._error(
                int(ProtocolCode.WATCHLIST_LIMIT),
                f"Watchlist limit exceeded: only the first {self._limits.max_watchlist} "
                "user ids are watched",
            )
        return actions

    def _client_event(self, message: ClientEvent, now: float) -> list[Action]:
        name = message.channel
        if not self._client_events:
            return self._error(None, "Client events are not enabled for this app")
        kind = classify(name).kind
        if kind is ChannelKind.PRIVATE_ENCRYPTED:
            return self._error(None, "Client events are not supported on encrypted channels")
        if kind not in (ChannelKind.PRIVATE, ChannelKind.PRESENCE):
            return self._error(
                None, "Client events are only allowed on private and presence channels"
            )
        if name not in self._joined:
            return self._error(
                None, f"Client event rejected: not subscribed to channel {_show(name)}"
            )
        window = self._client_event_times
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= self._limits.client_events_per_second:
            return self._error(
                int(ProtocolCode.CLIENT_EVENT_RATE_LIMIT),
                f"Client event rejected: rate limit of "
                f"{self._limits.client_events_per_second} events per second exceeded",
            )
        window.append(now)
        member = self._joined[name]
        user_id = member.user_id if member is not None else None
        return [Publish(name, message.event, message.data, user_id)]
