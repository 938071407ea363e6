"""HTTP API requests: routing (method, path) to endpoints and validating their inputs, sans-I/O.

Authentication is :func:`gateway.protocol.auth.verify_api_request`; this module validates what
an authenticated request asks for and returns typed requests or an
:class:`~gateway.protocol.errors.ApiError` (400 bad request, 404 unknown path, 405 wrong
method, 413 event data too large).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import unquote

from ._json import loads
from .channels import channel_error, classify, user_id_error
from .errors import ApiError
from .limits import DEFAULT_LIMITS, Limits
from .messages import utf8_length

__all__ = [
    "BatchRequest",
    "ChannelQuery",
    "ChannelsQuery",
    "Endpoint",
    "Route",
    "TriggerRequest",
    "parse_batch",
    "parse_channel_query",
    "parse_channels_query",
    "parse_terminate_request",
    "parse_trigger",
    "parse_users_request",
    "route",
]

_SOCKET_ID = re.compile(r"[0-9]+\.[0-9]+")


class Endpoint(StrEnum):
    """The HTTP API endpoints the gateway serves."""

    TRIGGER = "trigger"  # POST /apps/{id}/events
    BATCH = "batch"  # POST /apps/{id}/batch_events
    CHANNELS = "channels"  # GET /apps/{id}/channels
    CHANNEL = "channel"  # GET /apps/{id}/channels/{channel}
    USERS = "users"  # GET /apps/{id}/channels/{channel}/users
    TERMINATE = "terminate"  # POST [/apps/{id}]/users/{user_id}/terminate_connections


@dataclass(frozen=True, slots=True)
class Route:
    """A routed request.

    Attributes:
        endpoint: Which endpoint.
        app_id: The app id from the path; None for python's
            ``/users/{id}/terminate_connections`` (the app comes from ``auth_key``).
        channel: Percent-decoded channel name for the channel endpoints, else None.
        user_id: Percent-decoded user id for terminate_connections, else None.
    """

    endpoint: Endpoint
    app_id: str | None
    channel: str | None = None
    user_id: str | None = None


def _allow(method: str, allowed: str, found: Route) -> Route | ApiError:
    if method.upper() != allowed:
        return ApiError(405, f"Method {method} not allowed on this path; use {allowed}")
    return found


def route(method: str, path: str) -> Route | ApiError:
    """Map a request to an endpoint and its path parameters.

    Both terminate-connections paths are routed: node's
    ``/apps/{id}/users/{user_id}/terminate_connections`` and python 3.3.x's
    ``/users/{user_id}/terminate_connections``. The deprecated
    ``POST /apps/{id}/channels/{channel}/events`` is not served (404).

    Args:
        method: HTTP method.
        path: Path without the query string.

    Returns:
        The route, ``ApiError(404)`` for an unknown path, ``ApiError(405)`` for a known path with
        the wrong method.
    """
    parts = path.split("/")
    if len(parts) < 2 or parts[0] != "" or any(not part for part in parts[1:]):
        return ApiError(404, f"Not found: {path[:200]!r}")
    try:
        segments = [unquote(part, errors="strict") for part in parts[1:]]
    except UnicodeDecodeError:
        return ApiError(404, "Not found: path is not valid UTF-8")
    match segments:
        case ["users", user_id, "terminate_connections"]:
            return _allow(method, "POST", Route(Endpoint.TERMINATE, None, user_id=user_id))
        case ["apps", app_id, "users", user_id, "terminate_connections"]:
            return _allow(method, "POST", Route(Endpoint.TERMINATE, app_id, user_id=user_id))
        case ["apps", app_id, "events"]:
            return _allow(method, "POST", Route(Endpoint.TRIGGER, app_id))
        case ["apps", app_id, "batch_events"]:
            return _allow(method, "POST", Route(Endpoint.BATCH, app_id))
        case ["apps", app_id, "channels"]:
            return _allow(method, "GET", Route(Endpoint.CHANNELS, app_id))
        case ["apps", app_id, "channels", channel]:
            return _allow(method, "GET", Route(Endpoint.CHANNEL, app_id, channel=channel))
        case ["apps", app_id, "channels", channel, "users"]:
            return _allow(method, "GET", Route(Endpoint.USERS, app_id, channel=channel))
        case ["apps", _, "channels", _, "events"]:
            return ApiError(404, "The deprecated channel events endpoint is not supported")
    return ApiError(404, f"Not found: {path[:200]!r}")


@dataclass(frozen=True, slots=True)
class TriggerRequest:
    """One event to publish.

    Attributes:
        name: Event name.
        data: Event data, forwarded verbatim.
        channels: Distinct target channels, in request order.
        socket_id: Connection to exclude, or None.
        info: Requested attributes (``user_count``, ``subscription_count``); answer each for
            the channels it applies to (``user_count`` presence only, ``subscription_count``
            non-presence only).
    """

    name: str
    data: str
    channels: tuple[str, ...]
    socket_id: str | None = None
    info: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """A ``batch_events`` request: each event has exactly one channel.

    Attributes:
        events: The events, in order.
    """

    events: tuple[TriggerRequest, ...]


@dataclass(frozen=True, slots=True)
class ChannelsQuery:
    """``GET /apps/{id}/channels``.

    Attributes:
        prefix: ``filter_by_prefix``, or None.
        info: Requested attributes (only ``user_count``).
    """

    prefix: str | None = None
    info: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ChannelQuery:
    """``GET /apps/{id}/channels/{channel}``.

    Attributes:
        channel: The channel.
        info: Requested attributes (``user_count``, ``subscription_count``, ``cache``).
    """

    channel: str
    info: frozenset[str] = frozenset()


def _info(value: Any, allowed: frozenset[str]) -> frozenset[str] | ApiError:
    if value is None:
        return frozenset()
    if not isinstance(value, str):
        return ApiError(400, "info must be a comma-separated string")
    attributes = frozenset(a.strip() for a in value.split(",") if a.strip())
    unknown = sorted(attributes - allowed)
    if unknown:
        return ApiError(
            400,
            f"Unsupported info attribute {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})",
        )
    return attributes


def _body_object(body: bytes) -> dict[str, Any] | ApiError:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return ApiError(400, "Body is not valid UTF-8")
    ok, value = loads(text)
    if not ok:
        return ApiError(400, "Body is not valid JSON")
    if not isinstance(value, dict):
        return ApiError(400, "Body must be a JSON object")
    return value


def _event(
    item: dict[str, Any],
    limits: Limits,
    *,
    batch: bool,
    subscription_count_enabled: bool,
) -> TriggerRequest | ApiError:
    name = item.get("name")
    if not isinstance(name, str) or not name:
        return ApiError(400, "name must be a non-empty string")
    if len(name) > limits.max_event_name_length:
        return ApiError(
            400, f"Event name too long ({len(name)} characters, max {limits.max_event_name_length})"
        )
    data = item.get("data")
    if not isinstance(data, str):
        return ApiError(400, "data must be a string (JSON-encode objects before sending)")
    if batch:
        if "channels" in item:
            return ApiError(400, "batch events take a single 'channel', not 'channels'")
        channel = item.get("channel")
        if not isinstance(channel, str):
            return ApiError(400, "channel must be a string")
        raw_channels: list[Any] = [channel]
    else:
        if "channel" in item and "channels" in item:
            return ApiError(400, "Give either 'channels' or 'channel', not both")
        if "channels" in item:
            raw_channels = item["channels"]
            if not isinstance(raw_channels, list):
                return ApiError(400, "channels must be a list of strings")
        elif "channel" in item:
            raw_channels = [item["channel"]]
        else:
            return ApiError(400, "Missing 'channels' (or 'channel')")
        if not raw_channels:
            return ApiError(400, "channels must not be empty")
        if len(raw_channels) > limits.max_channels_per_trigger:
            return ApiError(
                400,
                f"Too many channels ({len(raw_channels)}, max {limits.max_channels_per_trigger})",
            )
    channels: dict[str, None] = {}
    for channel in raw_channels:
        if not isinstance(channel, str):
            return ApiError(400, "channel names must be strings")
        problem = channel_error(channel, max_length=limits.max_channel_name_length)
        if problem is not None:
            return ApiError(400, problem)
        channels[channel] = None
    socket_id = item.get("socket_id")
    if socket_id is not None and (
        not isinstance(socket_id, str) or not _SOCKET_ID.fullmatch(socket_id)
    ):
        return ApiError(400, f"Invalid socket_id {socket_id!r}: expected '<digits>.<digits>'")
    allowed = {"user_count", "subscription_count"} if subscription_count_enabled else {"user_count"}
    info = _info(item.get("info"), frozenset(allowed))
    if isinstance(info, ApiError):
        return info
    size = utf8_length(data)
    if size > limits.max_event_data_bytes:
        return ApiError(
            413, f"Event data too large ({size} bytes, max {limits.max_event_data_bytes})"
        )
    return TriggerRequest(name, data, tuple(channels), socket_id, info)


def parse_trigger(
    body: bytes, limits: Limits = DEFAULT_LIMITS, *, subscription_count_enabled: bool = True
) -> TriggerRequest | ApiError:
    """Validate a ``POST /apps/{id}/events`` body.

    Rules: ``name`` a non-empty string of at most 200 characters; ``data`` a string of at most
    10 KB (UTF-8) else 413; ``channels`` a list of 1-100 valid names, or ``channel`` a single
    name (not both); ``socket_id`` absent, null or ``\\d+\\.\\d+``; ``info`` a comma list of
    ``user_count``/``subscription_count`` (the latter only when the feature is enabled).
    Duplicate channels are merged. Unknown keys are ignored.

    Returns:
        The request, or ``ApiError`` 400/413.
    """
    item = _body_object(body)
    if isinstance(item, ApiError):
        return item
    return _event(item, limits, batch=False, subscription_count_enabled=subscription_count_enabled)


def parse_batch(
    body: bytes, limits: Limits = DEFAULT_LIMITS, *, subscription_count_enabled: bool = True
) -> BatchRequest | ApiError:
    """Validate a ``POST /apps/{id}/batch_events`` body: ``{"batch": [event, ...]}``.

    At most ``max_batch_events`` (10) events, each with a single ``channel`` and otherwise the
    rules of :func:`parse_trigger`. An empty batch is valid (nothing to publish).

    Returns:
        The request, or ``ApiError`` 400/413 (the message names the failing index).
    """
    value = _body_object(body)
    if isinstance(value, ApiError):
        return value
    batch = value.get("batch")
    if not isinstance(batch, list):
        return ApiError(400, "batch must be a list of events")
    if len(batch) > limits.max_batch_events:
        return ApiError(
            400, f"Batch too large ({len(batch)} events, max {limits.max_batch_events})"
        )
    events: list[TriggerRequest] = []
    for index, item in enumerate(batch):
        if not isinstance(item, dict):
            return ApiError(400, f"batch[{index}]: each event must be an object")
        event = _event(
            item, limits, batch=True, subscription_count_enabled=subscription_count_enabled
        )
        if isinstance(event, ApiError):
            return ApiError(event.status, f"batch[{index}]: {event.message}")
        events.append(event)
    return BatchRequest(tuple(events))


def parse_channels_query(query: Mapping[str, str]) -> ChannelsQuery | ApiError:
    """Validate ``GET /apps/{id}/channels`` parameters.

    ``filter_by_prefix`` is optional; ``info`` may only hold ``user_count``, and only together
    with a prefix that starts with ``presence-`` (otherwise 400).

    Args:
        query: Decoded query parameters (auth parameters are ignored).
    """
    prefix = query.get("filter_by_prefix") or None
    info = _info(query.get("info"), frozenset({"user_count"}))
    if isinstance(info, ApiError):
        return info
    if "user_count" in info and not (prefix or "").startswith("presence-"):
        return ApiError(
            400, "info=user_count requires filter_by_prefix limiting results to presence- channels"
        )
    return ChannelsQuery(prefix, info)


def parse_channel_query(
    channel: str, query: Mapping[str, str], *, subscription_count_enabled: bool = True
) -> ChannelQuery | ApiError:
    """Validate ``GET /apps/{id}/channels/{channel}`` parameters.

    ``info`` attributes: ``user_count`` (presence channels only), ``subscription_count``
    (non-presence channels, when the feature is enabled), ``cache`` (cache channels only). Any
    other attribute, or one not applicable to the channel, is a 400.
    """
    problem = channel_error(channel)
    if problem is not None:
        return ApiError(400, problem)
    info = _info(query.get("info"), frozenset({"user_count", "subscription_count", "cache"}))
    if isinstance(info, ApiError):
        return info
    kind = classify(channel)
    if "user_count" in info and not kind.is_presence:
        return ApiError(400, "info=user_count is only available for presence channels")
    if "subscription_count" in info:
        if kind.is_presence:
            return ApiError(400, "info=subscription_count is not available for presence channels")
        if not subscription_count_enabled:
            return ApiError(400, "info=subscription_count is not enabled for this app")
    if "cache" in info and not kind.cache:
        return ApiError(400, "info=cache is only available for cache channels")
    return ChannelQuery(channel, info)


def parse_users_request(channel: str) -> str | ApiError:
    """Validate ``GET /apps/{id}/channels/{channel}/users``: presence channels only (else 400)."""
    problem = channel_error(channel)
    if problem is not None:
        return ApiError(400, problem)
    if not classify(channel).is_presence:
        return ApiError(400, "Users can only be listed for presence channels")
    return channel


def parse_terminate_request(user_id: str) -> str | ApiError:
    """Validate the user id of ``terminate_connections`` (channel charset, <= 200 characters)."""
    problem = user_id_error(user_id)
    if problem is not None:
        return ApiError(400, problem)
    return user_id
