"""Tests of gateway.protocol.auth: shared vectors, the doc's tables, the official library."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pusher
import pytest

from gateway.config import AppConfig
from gateway.protocol import auth
from gateway.protocol.errors import ApiError

VECTORS_PATH = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "pusher-signing.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text())
APP = AppConfig(VECTORS["app"]["app_id"], VECTORS["app"]["key"], VECTORS["app"]["secret"])
OTHER = AppConfig("4", "other-key", "other-secret")
NOW = 1353088179


def by_id(app_id: str) -> AppConfig | None:
    return {APP.id: APP, OTHER.id: OTHER}.get(app_id)


def by_key(key: str) -> AppConfig | None:
    return {APP.key: APP, OTHER.key: OTHER}.get(key)


def query_string(params: dict[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in params.items())


def verify(
    method: str, path: str, params: dict[str, str], body: bytes = b"", now: float = NOW
) -> AppConfig | ApiError:
    return auth.verify_api_request(method, path, query_string(params), body, now, by_id, by_key)


# --- shared vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS["http_api"], ids=lambda v: f"{v['method']} {v['path']}")
def test_http_vector_verifies(vector: dict[str, Any]) -> None:
    result = verify(vector["method"], vector["path"], vector["query"], vector["body"].encode())
    assert result == APP


@pytest.mark.parametrize("vector", VECTORS["http_api"], ids=lambda v: f"{v['method']} {v['path']}")
def test_http_vector_string_to_sign(vector: dict[str, Any]) -> None:
    assert (
        auth.api_string_to_sign(vector["method"], vector["path"], vector["query"])
        == vector["string_to_sign"]
    )
    extra = {k: v for k, v in vector["query"].items() if not k.startswith(("auth_", "body_"))}
    signed = auth.sign_api_request(
        APP, vector["method"], vector["path"], extra, vector["body"].encode(), NOW
    )
    assert signed == vector["query"]


@pytest.mark.parametrize("vector", VECTORS["http_api"], ids=lambda v: f"{v['method']} {v['path']}")
def test_http_vector_tampered_signature_fails(vector: dict[str, Any]) -> None:
    query = dict(vector["query"])
    query["auth_signature"] = query["auth_signature"][:-1] + (
        "0" if query["auth_signature"][-1] != "0" else "1"
    )
    result = verify(vector["method"], vector["path"], query, vector["body"].encode())
    assert isinstance(result, ApiError)
    assert result.status == 401
    assert "Invalid signature" in result.message


@pytest.mark.parametrize("vector", VECTORS["channel_auth"], ids=lambda v: v["channel"])
def test_channel_auth_vectors(vector: dict[str, Any]) -> None:
    data = vector.get("channel_data")
    assert (
        auth.channel_string_to_sign(vector["socket_id"], vector["channel"], data)
        == (vector["string_to_sign"])
    )
    assert auth.sign_channel(APP, vector["socket_id"], vector["channel"], data) == vector["auth"]
    assert (
        auth.verify_channel_auth(APP, vector["socket_id"], vector["channel"], vector["auth"], data)
        is None
    )


@pytest.mark.parametrize("vector", VECTORS["user_auth"], ids=lambda v: v["user_data"])
def test_user_auth_vectors(vector: dict[str, Any]) -> None:
    assert (
        auth.user_string_to_sign(vector["socket_id"], vector["user_data"])
        == (vector["string_to_sign"])
    )
    assert auth.sign_user(APP, vector["socket_id"], vector["user_data"]) == vector["auth"]
    assert (
        auth.verify_user_auth(APP, vector["socket_id"], vector["user_data"], vector["auth"]) is None
    )


def test_webhook_vector() -> None:
    hook = VECTORS["webhook"]
    body = hook["body"].encode()
    assert auth.sign_webhook(APP, body) == {
        "X-Pusher-Key": hook["X-Pusher-Key"],
        "X-Pusher-Signature": hook["X-Pusher-Signature"],
    }
    assert auth.verify_webhook(APP, hook["X-Pusher-Key"], hook["X-Pusher-Signature"], body)
    assert not auth.verify_webhook(
        APP, hook["X-Pusher-Key"], hook["X-Pusher-Signature"], body + b" "
    )
    assert not auth.verify_webhook(APP, "other-key", hook["X-Pusher-Signature"], body)
    assert not auth.verify_webhook(APP, hook["X-Pusher-Key"], "zz\u00e9", body)


# --- the protocol document's tables -----------------------------------------------------------

DOC_SIGNATURES = [
    (
        "1234.1234:private-foobar",
        "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4",
    ),
    (
        '1234.1234:presence-foobar:{"user_id":10,"user_info":{"name":"Mr. Channels"}}',
        "31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80",
    ),
    (
        '1234.1234:presence-room:{"user_id": "1", "user_info": {"name": "Ann"}}',
        "3894557ca60685c33ae5c83c50154a35d1506dbe898f4124fa8dd29c5518b698",
    ),
    (
        '1234.1234::user::{"id":"12345"}',
        "4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba",
    ),
    (
        '{"time_ms":1327078148132,"events":[{"name":"channel_occupied","channel":"test-channel"}]}',
        "5dd6562a9f744b72a688bcdfea41c14c2c56d12c44c99e32c08face4cc1e8aeb",
    ),
    (
        "POST\n/apps/3/events\nauth_key=278d425bdf160c739803&auth_timestamp=1353088179"
        "&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f",
        "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c",
    ),
]


@pytest.mark.parametrize(("message", "digest"), DOC_SIGNATURES)
def test_doc_signatures(message: str, digest: str) -> None:
    assert auth.sign(APP.secret, message) == digest
    assert auth.verify_signature(APP.secret, message, digest)
    assert not auth.verify_signature(APP.secret, message, digest.upper())


def test_doc_post_events_vector() -> None:
    body = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
    assert hashlib.md5(body).hexdigest() == "ec365a775a4cd0599faeb73354201b6f"
    params = {
        "auth_key": APP.key,
        "auth_timestamp": str(NOW),
        "auth_version": "1.0",
        "body_md5": "ec365a775a4cd0599faeb73354201b6f",
        "auth_signature": "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c",
    }
    assert verify("POST", "/apps/3/events", params, body) == APP


def test_doc_node_style_get_without_body_md5() -> None:
    params = {
        "auth_key": APP.key,
        "auth_timestamp": str(NOW),
        "auth_version": "1.0",
        "filter_by_prefix": "presence-",
        "info": "user_count",
        "auth_signature": "16819168891cb5dfd72b5c7a5d3d602605b26c6ba1930033b5e2eeeb65010291",
    }
    assert verify("GET", "/apps/3/channels", params) == APP


# --- verification rules -----------------------------------------------------------------------


def signed(
    method: str,
    path: str,
    extra: dict[str, str] | None = None,
    body: bytes = b"",
    timestamp: int = NOW,
    app: AppConfig = APP,
) -> dict[str, str]:
    return auth.sign_api_request(app, method, path, extra or {}, body, timestamp)


def test_node_style_signing_adds_body_md5_only_with_a_body() -> None:
    get = auth.sign_api_request(APP, "GET", "/apps/3/channels", {}, b"", NOW, always_md5=False)
    assert "body_md5" not in get
    assert verify("GET", "/apps/3/channels", get) == APP
    body = b'{"name":"e","channels":["c"],"data":"x"}'
    post = auth.sign_api_request(APP, "POST", "/apps/3/events", {}, body, NOW, always_md5=False)
    assert post["body_md5"] == hashlib.md5(body).hexdigest()
    assert verify("POST", "/apps/3/events", post, body) == APP


@pytest.mark.parametrize("skew", [-600, 0, 600])
def test_timestamp_window_accepts(skew: int) -> None:
    assert (
        verify("GET", "/apps/3/channels", signed("GET", "/apps/3/channels"), now=NOW + skew) == APP
    )


@pytest.mark.parametrize("skew", [-601, 601, 10**6])
def test_timestamp_window_rejects(skew: int) -> None:
    result = verify("GET", "/apps/3/channels", signed("GET", "/apps/3/channels"), now=NOW + skew)
    assert isinstance(result, ApiError)
    assert result.status == 401
    assert "Timestamp expired" in result.message


@pytest.mark.parametrize("timestamp", ["abc", "1.5", "-3", "1e9", " 1353088179"])
def test_bad_timestamp_is_401(timestamp: str) -> None:
    params = signed("GET", "/apps/3/channels")
    params["auth_timestamp"] = timestamp
    result = verify("GET", "/apps/3/channels", params)
    assert isinstance(result, ApiError)
    assert result.status == 401


@pytest.mark.parametrize(
    "missing", ["auth_key", "auth_timestamp", "auth_version", "auth_signature"]
)
def test_missing_auth_param_is_401(missing: str) -> None:
    params = signed("GET", "/apps/3/channels")
    del params[missing]
    result = verify("GET", "/apps/3/channels", params)
    assert result == ApiError(401, f"Missing {missing} query parameter")


def test_auth_version_must_be_1_0() -> None:
    params = signed("GET", "/apps/3/channels")
    params["auth_version"] = "2.0"
    result = verify("GET", "/apps/3/channels", params)
    assert isinstance(result, ApiError)
    assert result.status == 401


def test_body_md5_mismatch_is_401() -> None:
    body = b'{"name":"e","channels":["c"],"data":"x"}'
    params = signed("POST", "/apps/3/events", body=body)
    result = verify("POST", "/apps/3/events", params, body + b" ")
    assert isinstance(result, ApiError)
    assert result.status == 401
    assert "body_md5" in result.message


def test_body_without_body_md5_is_401() -> None:
    body = b"{}"
    params = signed("POST", "/apps/3/events", body=body)
    del params["body_md5"]
    params["auth_signature"] = auth.sign(
        APP.secret, auth.api_string_to_sign("POST", "/apps/3/events", params)
    )
    result = verify("POST", "/apps/3/events", params, body)
    assert isinstance(result, ApiError)
    assert result.status == 401


def test_empty_body_with_wrong_body_md5_is_401() -> None:
    params = signed("GET", "/apps/3/channels", body=b"x")
    result = verify("GET", "/apps/3/channels", params, b"")
    assert isinstance(result, ApiError)
    assert result.status == 401


def test_key_of_another_app_is_401() -> None:
    params = signed("GET", "/apps/3/channels", app=OTHER)
    result = verify("GET", "/apps/3/channels", params)
    assert isinstance(result, ApiError)
    assert result.status == 401
    assert "Invalid auth_key" in result.message


def test_unknown_app_id_is_401() -> None:
    result = verify("GET", "/apps/99/channels", signed("GET", "/apps/99/channels"))
    assert isinstance(result, ApiError)
    assert result.status == 401


def test_path_without_app_is_404() -> None:
    result = verify("GET", "/channels", signed("GET", "/channels"))
    assert isinstance(result, ApiError)
    assert result.status == 404


def test_path_and_method_are_signed() -> None:
    params = signed("GET", "/apps/3/channels")
    assert isinstance(verify("GET", "/apps/3/channels/x", params), ApiError)
    assert isinstance(verify("POST", "/apps/3/channels", params), ApiError)


def test_extra_params_are_signed() -> None:
    params = signed("GET", "/apps/3/channels", {"filter_by_prefix": "presence-"})
    assert verify("GET", "/apps/3/channels", params) == APP
    params["filter_by_prefix"] = "private-"
    assert isinstance(verify("GET", "/apps/3/channels", params), ApiError)


def test_query_values_are_url_decoded_before_signing() -> None:
    params = signed("GET", "/apps/3/channels/x", {"info": "user_count,subscription_count"})
    raw = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    result = auth.verify_api_request("GET", "/apps/3/channels/x", raw, b"", NOW, by_id, by_key)
    assert result == APP


def test_keys_are_lowercased_in_canonical_string() -> None:
    params = {"INFO": "user_count", "auth_key": "k"}
    assert auth.api_string_to_sign("get", "/p", params) == "GET\n/p\nauth_key=k&info=user_count"


def test_repeated_query_param_is_400() -> None:
    raw = query_string(signed("GET", "/apps/3/channels")) + "&auth_key=" + APP.key
    result = auth.verify_api_request("GET", "/apps/3/channels", raw, b"", NOW, by_id, by_key)
    assert isinstance(result, ApiError)
    assert result.status == 400


def test_parse_query() -> None:
    assert auth.parse_query("") == {}
    assert auth.parse_query("a=1&b=&c&&d=x%2Cy") == {"a": "1", "b": "", "c": "", "d": "x,y"}
    assert auth.parse_query("a=%ff") == ApiError(400, "Query parameter 'a' is not valid UTF-8")


def test_python_terminate_path_resolves_app_from_key() -> None:
    path = "/users/42/terminate_connections"
    body = b"{}"
    assert verify("POST", path, signed("POST", path, body=body), body) == APP
    assert verify("POST", path, signed("POST", path, body=body, app=OTHER), body) == OTHER
    unknown = signed("POST", path, body=body, app=AppConfig("9", "nokey", "s"))
    result = verify("POST", path, unknown, body)
    assert isinstance(result, ApiError)
    assert result.status == 401


def test_node_terminate_path() -> None:
    path = "/apps/3/users/42/terminate_connections"
    assert verify("POST", path, signed("POST", path, body=b"{}"), b"{}") == APP


# --- channel and user tokens ------------------------------------------------------------------


def test_channel_auth_failures_have_pusher_messages() -> None:
    good = auth.sign_channel(APP, "1.1", "private-a")
    assert auth.verify_channel_auth(APP, "1.1", "private-a", good) is None
    assert auth.verify_channel_auth(APP, "1.2", "private-a", good) == (
        "Invalid signature: Expected HMAC SHA256 hex digest of 1.2:private-a, "
        f"but got {good.split(':')[1]}"
    )
    wrong_key = "nope:" + good.split(":")[1]
    assert auth.verify_channel_auth(APP, "1.1", "private-a", wrong_key) == (
        "Invalid key in subscription auth data: 'nope'"
    )
    for malformed in ["", "no-colon", f"{APP.key}:", "::"]:
        assert auth.verify_channel_auth(APP, "1.1", "private-a", malformed) is not None


def test_presence_auth_is_over_exact_channel_data() -> None:
    data = '{"user_id": "1"}'
    token = auth.sign_channel(APP, "1.1", "presence-a", data)
    assert auth.verify_channel_auth(APP, "1.1", "presence-a", token, data) is None
    assert auth.verify_channel_auth(APP, "1.1", "presence-a", token, '{"user_id":"1"}') is not None
    assert auth.verify_channel_auth(APP, "1.1", "presence-a", token) is not None


def test_non_ascii_and_surrogate_input_never_raises() -> None:
    assert auth.verify_channel_auth(APP, "1.1", "private-a", f"{APP.key}:\u00e9\ud800") is not None
    assert auth.verify_user_auth(APP, "1.1", "\ud800", f"{APP.key}:abc") is not None


def test_user_auth_signature_covers_user_data() -> None:
    token = auth.sign_user(APP, "1.1", '{"id":"a"}')
    assert auth.verify_user_auth(APP, "1.1", '{"id":"a"}', token) is None
    assert auth.verify_user_auth(APP, "1.1", '{"id":"b"}', token) is not None
    assert auth.verify_user_auth(APP, "2.1", '{"id":"a"}', token) is not None


# --- cross-check with the official python library ---------------------------------------------


@pytest.fixture
def client() -> pusher.Pusher:
    return pusher.Pusher(app_id=APP.id, key=APP.key, secret=APP.secret)


@pytest.mark.parametrize(
    ("channel", "custom"),
    [
        ("private-foo", None),
        ("private-encrypted-foo", None),
        ("presence-foo", {"user_id": 7, "user_info": {"name": "Zoë", "tags": [1, 2]}}),
        ("presence-foo", {"user_id": "u-1"}),
    ],
)
def test_official_authenticate(client: pusher.Pusher, channel: str, custom: Any) -> None:
    if "encrypted" in channel:
        client = pusher.Pusher(
            app_id=APP.id,
            key=APP.key,
            secret=APP.secret,
            encryption_master_key_base64="MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        )
    response = client.authenticate(channel=channel, socket_id="123.456", custom_data=custom)
    data = response.get("channel_data")
    assert auth.verify_channel_auth(APP, "123.456", channel, response["auth"], data) is None


def test_official_authenticate_user(client: pusher.Pusher) -> None:
    response = client.authenticate_user("123.456", {"id": "42", "user_info": {"n": "é"}})
    assert auth.verify_user_auth(APP, "123.456", response["user_data"], response["auth"]) is None


def _official_request(client: pusher.Pusher, name: str, *args: Any) -> Any:
    # The public Pusher methods send at once; the inner client's methods can build requests.
    return getattr(client._pusher_client, name).make_request(*args)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("trigger", (["a", "presence-b"], "ev", {"x": "é"}, "1.2")),
        ("trigger_batch", ([{"channel": "c", "name": "e", "data": "d"}],)),
        ("channels_info", ("presence-", ["user_count"])),
        ("channel_info", ("presence-x", ["user_count"])),
        ("users_info", ("presence-x",)),
        ("terminate_user_connections", ("42",)),
        ("trigger", (["#server-to-user-42"], "ev", {"a": 1})),
    ],
)
def test_official_request_signing(client: pusher.Pusher, name: str, args: Any) -> None:
    request = _official_request(client, name, *args)
    raw = "&".join(f"{k}={v}" for k, v in request.query_params.items())
    result = auth.verify_api_request(
        request.method, request.path, raw, request.body, time.time(), by_id, by_key
    )
    assert result == APP


def test_official_validate_webhook(client: pusher.Pusher) -> None:
    body = json.dumps({"time_ms": int(time.time() * 1000), "events": []}).encode()
    headers = auth.sign_webhook(APP, body)
    parsed = client.validate_webhook(
        headers["X-Pusher-Key"], headers["X-Pusher-Signature"], body.decode()
    )
    assert parsed is not None
