"""Numeric limits of the Pusher protocol, as one frozen value with the documented defaults."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["DEFAULT_LIMITS", "Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Every size, count, rate and timeout the protocol package enforces.

    Sizes are UTF-8 byte counts, lengths are character counts, times are seconds. Defaults are
    Pusher's documented limits (``pusher-protocol.md`` §1.13); the two that Pusher does not
    document are design choices, explained per attribute.

    Attributes:
        max_frame_bytes: Largest client WebSocket text frame parsed (32 KiB). Not a Pusher
            number: Pusher's limit is on event *data* (10 KB, below). The frame limit is a cheap
            guard applied before JSON parsing and leaves room for the envelope, JSON escaping of
            a 10 KB payload, presence ``channel_data`` and sign-in ``user_data`` with a full
            watchlist. Set the WebSocket library's ``max_size`` to at least this value.
        max_event_data_bytes: Largest event ``data`` string, for REST triggers (HTTP 413 above)
            and for client events (``pusher:error`` above; Pusher's own client-event limit is
            unverified, the REST one is reused).
        max_presence_members: Distinct users per presence channel.
        max_user_info_bytes: Largest presence ``user_info`` (compact JSON text).
        max_presence_user_id_length: Longest presence user id.
        max_user_id_length: Longest signed-in user id (the server libraries' limit).
        max_event_name_length: Longest event name (REST and client events).
        max_channel_name_length: Longest channel name (the libraries' 200, not the docs' 164).
        client_events_per_second: Client events accepted per connection per sliding second.
        max_channels_per_trigger: Channels in one ``POST events``.
        max_batch_events: Events in one ``POST batch_events``.
        max_watchlist: Watchlist ids kept at sign-in (the rest are dropped with error 4302).
        activity_timeout: Seconds of client silence before the server pings; also the value
            announced in ``connection_established`` (must be a positive integer for pusher-js).
        pong_timeout: Seconds to wait for any frame after a server ping before closing (4201).
        max_channels_per_connection: Channels (joined or pending) one socket may hold. Not a
            Pusher number; 100 bounds per-socket state and Leave fan-out on disconnect.
        subscribes_per_second: Subscriptions one socket may start per second, on average. Not a
            Pusher number: it keeps one socket's subscribe/unsubscribe flood from delaying
            everybody else's subscriptions. Over it the subscription is refused with
            ``pusher:subscription_error`` (status 4301).
        subscribe_burst: Subscriptions a socket may start at once before the rate applies
            (a page load or a reconnect re-subscribing every channel).
    """

    max_frame_bytes: int = 32_768
    max_event_data_bytes: int = 10_240
    max_presence_members: int = 100
    max_user_info_bytes: int = 1_024
    max_presence_user_id_length: int = 128
    max_user_id_length: int = 200
    max_event_name_length: int = 200
    max_channel_name_length: int = 200
    client_events_per_second: int = 10
    max_channels_per_trigger: int = 100
    max_batch_events: int = 10
    max_watchlist: int = 100
    activity_timeout: int = 120
    pong_timeout: int = 30
    max_channels_per_connection: int = 100
    subscribes_per_second: int = 20
    subscribe_burst: int = 200

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"Limits.{field.name} must be a positive int, got {value!r}")


#: The documented defaults.
DEFAULT_LIMITS = Limits()
