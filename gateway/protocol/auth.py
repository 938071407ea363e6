"""Pusher signatures: HMAC-SHA256 signing and constant-time verification of every token kind.

Covered: channel authorization (private, encrypted, presence), user sign-in, HTTP API request
signatures exactly as the official server libraries compute them, and webhook signatures.
Signatures are always checked over the exact strings or bytes received, never over re-encoded
JSON (python's ``json.dumps`` and node's ``JSON.stringify`` space their output differently).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from urllib.parse import unquote

from gateway.config import AppConfig

from .errors import ApiError

__all__ = [
    "API_TIMESTAMP_WINDOW",
    "EMPTY_BODY_MD5",
    "api_string_to_sign",
    "channel_string_to_sign",
    "parse_query",
    "sign",
    "sign_api_request",
    "sign_channel",
    "sign_user",
    "sign_webhook",
    "user_string_to_sign",
    "verify_api_params",
    "verify_api_request",
    "verify_channel_auth",
    "verify_signature",
    "verify_user_auth",
    "verify_webhook",
]

#: Seconds an HTTP API ``auth_timestamp`` may differ from the server clock.
API_TIMESTAMP_WINDOW = 600

#: ``body_md5`` of an empty body (the python library sends it on every GET).
EMPTY_BODY_MD5 = hashlib.md5(b"").hexdigest()

_AUTH_PARAMS = ("auth_key", "auth_timestamp", "auth_version", "auth_signature")
_TIMESTAMP = re.compile(r"[0-9]{1,15}")
_APP_PATH = re.compile(r"/apps/([^/]+)(?:/.*)?")
_USER_PATH = re.compile(r"/users/[^/]+/terminate_connections")


def sign(secret: str, message: str) -> str:
    """Lowercase hex HMAC-SHA256 of ``message`` keyed with ``secret`` (both UTF-8)."""
    # surrogatepass: a lone surrogate (possible via a JSON \u escape) must fail, not raise.
    data = message.encode("utf-8", "surrogatepass")
    return hmac.digest(secret.encode(), data, "sha256").hex()


def verify_signature(secret: str, message: str, signature: str) -> bool:
    """Whether ``signature`` is the hex HMAC-SHA256 of ``message``, compared in constant time.

    Any string is accepted as ``signature`` (non-ASCII input is compared as UTF-8 bytes, so it
    simply fails instead of raising).
    """
    expected = sign(secret, message).encode()
    return hmac.compare_digest(expected, signature.encode("utf-8", "surrogatepass"))


def channel_string_to_sign(socket_id: str, channel: str, channel_data: str | None = None) -> str:
    """``socket_id:channel``, plus ``:channel_data`` when given (presence)."""
    if channel_data is None:
        return f"{socket_id}:{channel}"
    return f"{socket_id}:{channel}:{channel_data}"


def user_string_to_sign(socket_id: str, user_data: str) -> str:
    """``socket_id::user::user_data``, the string signed for ``pusher:signin``."""
    return f"{socket_id}::user::{user_data}"


def sign_channel(
    app: AppConfig, socket_id: str, channel: str, channel_data: str | None = None
) -> str:
    """The ``key:signature`` token an auth endpoint returns for a channel subscription."""
    return f"{app.key}:{sign(app.secret, channel_string_to_sign(socket_id, channel, channel_data))}"


def sign_user(app: AppConfig, socket_id: str, user_data: str) -> str:
    """The ``key:signature`` token a user-authentication endpoint returns."""
    return f"{app.key}:{sign(app.secret, user_string_to_sign(socket_id, user_data))}"


def _verify_token(app: AppConfig, token: str, message: str, what: str) -> str | None:
    key, colon, signature = token.partition(":")
    if not colon or not signature:
        return f"Invalid {what} auth format: expected '<key>:<signature>'"
    # The key is public, so comparing it in variable time leaks nothing.
    if key != app.key:
        return f"Invalid key in {what} auth data: {key!r}"
    if not verify_signature(app.secret, message, signature):
        return (
            f"Invalid signature: Expected HMAC SHA256 hex digest of {message}, but got {signature}"
        )
    return None


def verify_channel_auth(
    app: AppConfig, socket_id: str, channel: str, auth: str, channel_data: str | None = None
) -> str | None:
    """Verify a subscription ``auth`` token.

    The signed string is ``socket_id:channel`` for private and encrypted channels, and
    ``socket_id:channel:channel_data`` (the exact received text) when ``channel_data`` is
    given. A presence subscription from a signed-in socket may omit ``channel_data``; it is then
    verified over ``socket_id:channel``, which is what node's ``authorizeChannel`` signs without
    presence data (the official server's behaviour is unverified).

    Args:
        app: The app whose key and secret apply.
        socket_id: The subscribing socket.
        channel: The channel name as received.
        auth: The ``key:hexsignature`` token as received.
        channel_data: The presence ``channel_data`` text as received, or None.

    Returns:
        None when valid, otherwise the ``pusher:error`` message (Pusher's wording).
    """
    return _verify_token(
        app, auth, channel_string_to_sign(socket_id, channel, channel_data), "subscription"
    )


def verify_user_auth(app: AppConfig, socket_id: str, user_data: str, auth: str) -> str | None:
    """Verify a ``pusher:signin`` token over ``socket_id::user::user_data`` (exact text).

    Returns:
        None when valid, otherwise the ``pusher:error`` message.
    """
    return _verify_token(app, auth, user_string_to_sign(socket_id, user_data), "signin")


def sign_webhook(app: AppConfig, body: bytes) -> dict[str, str]:
    """Headers that authenticate a webhook: ``X-Pusher-Key`` and ``X-Pusher-Signature``.

    The signature is the hex HMAC-SHA256 of the raw body bytes. The caller adds
    ``Content-Type: application/json`` (node's validator requires it).
    """
    signature = hmac.new(app.secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Pusher-Key": app.key, "X-Pusher-Signature": signature}


def verify_webhook(app: AppConfig, key: str, signature: str, body: bytes) -> bool:
    """Whether a webhook's ``X-Pusher-Key``/``X-Pusher-Signature`` pair matches its raw body."""
    expected = sign_webhook(app, body)["X-Pusher-Signature"].encode()
    return key == app.key and hmac.compare_digest(
        expected, signature.encode("utf-8", "surrogatepass")
    )


def parse_query(raw_query_string: str) -> dict[str, str] | ApiError:
    """Decode a raw query string into a dict.

    Values are percent-decoded (``+`` is kept as ``+``: the libraries never escape values and
    no valid channel or attribute contains ``+`` or a space). A key without ``=`` has an empty
    value. Repeated keys are refused (``channels[]``-style query parameters are not part of the
    API; the canonical string would be ambiguous).

    Returns:
        The parameters, or ``ApiError(400)``.
    """
    params: dict[str, str] = {}
    if not raw_query_string:
        return params
    for part in raw_query_string.split("&"):
        if not part:
            continue
        raw_key, _, raw_value = part.partition("=")
        try:
            key = unquote(raw_key, errors="strict")
            value = unquote(raw_value, errors="strict")
        except UnicodeDecodeError:
            return ApiError(400, f"Query parameter {raw_key!r} is not valid UTF-8")
        if key in params:
            return ApiError(400, f"Query parameter {key!r} is repeated")
        params[key] = value
    return params


def api_string_to_sign(method: str, path: str, params: Mapping[str, str]) -> str:
    """``METHOD\\npath\\ncanonical_query`` as the official libraries build it.

    The canonical query holds every parameter except ``auth_signature``, keys lowercased,
    sorted by key, joined as ``k=v`` with ``&``, values not escaped.
    """
    pairs = sorted((k.lower(), v) for k, v in params.items() if k != "auth_signature")
    query = "&".join(f"{k}={v}" for k, v in pairs)
    return f"{method.upper()}\n{path}\n{query}"


def sign_api_request(
    app: AppConfig,
    method: str,
    path: str,
    params: Mapping[str, str],
    body: bytes,
    timestamp: int,
    *,
    always_md5: bool = True,
) -> dict[str, str]:
    """The full query parameters of a signed HTTP API request.

    Adds ``auth_key``, ``auth_timestamp``, ``auth_version=1.0`` and ``body_md5`` to ``params``,
    then ``auth_signature``. With ``always_md5`` (the python library's style) ``body_md5`` is
    added to every request, GETs included; without it only when there is a body (the node
    library's style). Used by tests and load tools.
    """
    query = dict(params)
    query.update(auth_key=app.key, auth_timestamp=str(timestamp), auth_version="1.0")
    if always_md5 or body:
        query["body_md5"] = hashlib.md5(body).hexdigest()
    query["auth_signature"] = sign(app.secret, api_string_to_sign(method, path, query))
    return query


def verify_api_request(
    method: str,
    path: str,
    raw_query_string: str,
    body: bytes,
    now: float,
    find_app_by_id: Callable[[str], AppConfig | None],
    find_app_by_key: Callable[[str], AppConfig | None],
) -> AppConfig | ApiError:
    """Authenticate an HTTP API request as the official libraries sign it.

    Steps: decode the query; require ``auth_key``, ``auth_timestamp``, ``auth_version``
    (``1.0``) and ``auth_signature``; resolve the app from ``/apps/{id}/...`` and check that
    ``auth_key`` is its key, or, for python's ``/users/{id}/terminate_connections`` (no app in
    the path), resolve the app from ``auth_key``; refuse timestamps more than 600 s from
    ``now``; check ``body_md5`` against the MD5 of the raw body when the body is non-empty or
    ``body_md5`` is sent; finally compare the signature over the canonical string in constant
    time. The path is signed as received (not percent-decoded).

    Args:
        method: HTTP method.
        path: Request path without the query string, as received.
        raw_query_string: The query string as received (without ``?``).
        body: Raw request body.
        now: Current Unix time in seconds.
        find_app_by_id: Looks an app up by id.
        find_app_by_key: Looks an app up by key.

    Returns:
        The authenticated app, or ``ApiError`` (400 malformed query, 401 authentication
        failure, 404 path that names no app).
    """
    params = parse_query(raw_query_string)
    if isinstance(params, ApiError):
        return params
    return verify_api_params(method, path, params, body, now, find_app_by_id, find_app_by_key)


def verify_api_params(
    method: str,
    path: str,
    params: Mapping[str, str],
    body: bytes,
    now: float,
    find_app_by_id: Callable[[str], AppConfig | None],
    find_app_by_key: Callable[[str], AppConfig | None],
) -> AppConfig | ApiError:
    """:func:`verify_api_request` for a query already decoded by :func:`parse_query`.

    For callers that need the decoded parameters themselves, so the query is decoded once.
    """
    for name in _AUTH_PARAMS:
        if not params.get(name):
            return ApiError(401, f"Missing {name} query parameter")
    if params["auth_version"] != "1.0":
        return ApiError(401, f"Unsupported auth_version {params['auth_version']!r}, expected 1.0")
    key = params["auth_key"]
    app_match = _APP_PATH.fullmatch(path)
    if app_match is not None:
        app = find_app_by_id(app_match.group(1))
        if app is None:
            return ApiError(401, f"Unknown app id {app_match.group(1)!r}")
        if app.key != key:
            return ApiError(401, f"Invalid auth_key {key!r} for app {app.id}")
    elif _USER_PATH.fullmatch(path):
        app = find_app_by_key(key)
        if app is None:
            return ApiError(401, f"Unknown auth_key {key!r}")
    else:
        return ApiError(404, f"No app in path {path!r}")
    timestamp = params["auth_timestamp"]
    if not _TIMESTAMP.fullmatch(timestamp):
        return ApiError(401, f"auth_timestamp must be integer Unix seconds, got {timestamp!r}")
    if abs(now - int(timestamp)) > API_TIMESTAMP_WINDOW:
        return ApiError(
            401,
            f"Timestamp expired: given {timestamp}, now {now:.0f}, "
            f"window {API_TIMESTAMP_WINDOW} s (check the client clock)",
        )
    body_md5 = params.get("body_md5")
    if body or body_md5 is not None:
        actual = hashlib.md5(body).hexdigest()
        if body_md5 is None:
            return ApiError(401, "Missing body_md5 query parameter for a request with a body")
        if not hmac.compare_digest(actual.encode(), body_md5.encode("utf-8", "surrogatepass")):
            return ApiError(401, f"Invalid body_md5: expected {actual}, got {body_md5}")
    string_to_sign = api_string_to_sign(method, path, params)
    if not verify_signature(app.secret, string_to_sign, params["auth_signature"]):
        return ApiError(
            401,
            f"Invalid signature: you should have sent HmacSHA256Hex({string_to_sign!r}, "
            f"your_secret_key), but you sent {params['auth_signature']!r}",
        )
    return app
