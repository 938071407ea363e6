"""Sans-I/O Pusher Channels protocol: frames, the per-connection session, signatures, HTTP API.

Nothing here performs I/O or imports asyncio, websockets or redis; the server layer drives it.
Modules: :mod:`~.errors` (codes), :mod:`~.limits`, :mod:`~.channels` (names),
:mod:`~.auth` (signatures), :mod:`~.messages` (frames), :mod:`~.session` (state machine),
:mod:`~.http_api` (REST routing and validation).
"""

from __future__ import annotations

from .auth import (
    sign_channel,
    sign_user,
    sign_webhook,
    verify_api_request,
    verify_channel_auth,
    verify_user_auth,
    verify_webhook,
)
from .channels import Channel, ChannelKind, channel_error, classify, user_id_error
from .errors import CODES, ApiError, FrameError, ProtocolCode, is_close_code
from .http_api import (
    BatchRequest,
    ChannelQuery,
    ChannelsQuery,
    Endpoint,
    Route,
    TriggerRequest,
    parse_batch,
    parse_channel_query,
    parse_channels_query,
    parse_terminate_request,
    parse_trigger,
    parse_users_request,
    route,
)
from .limits import DEFAULT_LIMITS, Limits
from .messages import PresenceMember, UserData, channel_event, parse_user_data
from .session import Action, Close, Join, Leave, Publish, Send, Session, SignIn

__all__ = [
    "CODES",
    "DEFAULT_LIMITS",
    "Action",
    "ApiError",
    "BatchRequest",
    "Channel",
    "ChannelKind",
    "ChannelQuery",
    "ChannelsQuery",
    "Close",
    "Endpoint",
    "FrameError",
    "Join",
    "Leave",
    "Limits",
    "PresenceMember",
    "ProtocolCode",
    "Publish",
    "Route",
    "Send",
    "Session",
    "SignIn",
    "TriggerRequest",
    "UserData",
    "channel_error",
    "channel_event",
    "classify",
    "is_close_code",
    "parse_batch",
    "parse_channel_query",
    "parse_channels_query",
    "parse_terminate_request",
    "parse_trigger",
    "parse_user_data",
    "parse_users_request",
    "route",
    "sign_channel",
    "sign_user",
    "sign_webhook",
    "user_id_error",
    "verify_api_request",
    "verify_channel_auth",
    "verify_user_auth",
    "verify_webhook",
]
