"""Configuration from TOML, environment and flags: precedence and errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import DEFAULT_APP, AppConfig, ConfigError, load_config, parse_app


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_defaults_serve_the_default_app() -> None:
    config = load_config(env={})
    assert config.apps == (DEFAULT_APP,)
    assert (config.host, config.port, config.activity_timeout) == ("127.0.0.1", 6001, 120)


def test_toml_env_and_flags_in_order(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
[node]
port = 7001
node_id = "gw-1"
activity_timeout = 60

[[apps]]
id = 42
key = "k42"
secret = "s42"
webhook_url = "http://127.0.0.1:9999/hooks"
client_events = false
""",
    )
    config = load_config(path, env={"GATEWAY_PORT": "7002", "GATEWAY_NODE_ID": "gw-env"})
    assert config.port == 7002  # environment beats the file
    assert config.node_id == "gw-env"
    assert config.activity_timeout == 60
    (app,) = config.apps
    assert app == AppConfig("42", "k42", "s42", "http://127.0.0.1:9999/hooks", False)
    config = load_config(path, env={"GATEWAY_PORT": "7002"}, overrides={"port": 7003})
    assert config.port == 7003  # flags beat both


def test_env_apps_and_webhook() -> None:
    config = load_config(
        env={"GATEWAY_APPS": "1:a:b, 2:c:d", "GATEWAY_WEBHOOK_URL": "https://hooks.example/x"}
    )
    assert [a.key for a in config.apps] == ["a", "c"]
    assert all(a.webhook_url == "https://hooks.example/x" for a in config.apps)


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[node]\nport = 70000\n", {}, "port"),
        ("[node]\nbogus = 1\n", {}, "bogus"),
        ("[[apps]]\nid = 'x1'\nkey = 'k'\nsecret = 's'\n", {}, "apps[0]: app id must be all"),
        ("[[apps]]\nid = 1\nkey = 'k'\n", {}, "apps[0]: missing ['secret']"),
        ("[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\nclient_events = 'yes'\n", {},
         "client_events"),
        ("[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\nwatchlist_events = 1\n", {},
         "apps[0].watchlist_events: must be true or false"),
        ("[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\nmax_presence_members = 0\n", {},
         "apps[0].max_presence_members: must be an integer 1..10000, got 0"),
        ("[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\nmax_connections = -1\n", {},
         "apps[0].max_connections: must be an integer 0..100000000, got -1"),
        ("[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\nclient_events_per_second = true\n", {},
         "apps[0].client_events_per_second: must be an integer 1..10000, got True"),
        ("[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\nmax_channel_name_length = 500\n", {},
         "apps[0].max_channel_name_length: must be an integer 1..200, got 500"),
        ("[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\napi_requests_per_second = '10'\n", {},
         "apps[0].api_requests_per_second: must be an integer 0..1000000, got '10'"),
        ("[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\nmax_event_payload_bytes = 2.5\n", {},
         "apps[0].max_event_payload_bytes: must be an integer"),
        ("[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\nmax_event_payload_bytes = 100000\n", {},
         "apps[0].max_event_payload_bytes/max_user_info_bytes: frames of up to 204096 bytes "
         "need max_message_bytes >= 204096"),
        ("[node]\nmax_message_bytes = 300000\n[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\n"
         "max_event_payload_bytes = 100000\n", {"GATEWAY_MAX_REQUEST_BYTES": "100000"},
         "apps[0].max_event_payload_bytes: 100000 needs max_request_bytes >= 204096"),
        ("[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\nwebhook_url = 'ftp:'\n", {},
         "webhook_url"),
        ("[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\n[[apps]]\nid = 2\nkey = 'k'\nsecret = 't'\n",
         {}, "apps[1]: app key 'k' is already used by apps[0]"),
        ("not toml [", {}, "not valid TOML"),
        ("", {"GATEWAY_PORT": "many"}, "GATEWAY_PORT"),
        ("", {"GATEWAY_APPS": "1:k"}, "GATEWAY_APPS"),
        ("[node]\nnode_id = 'a/b'\n", {}, "node_id"),
    ],
)  # fmt: skip
def test_bad_settings_are_named(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(_toml(tmp_path, toml), env=env)


def test_missing_file_and_bad_app_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="--app: expected ID:KEY:SECRET"):
        parse_app("1:2")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('url = "ftp://x"', "apps[0].webhooks[0].url: must be an http(s) URL"),
        ('url = "https://h/x"\nevent_types = ["member_joined"]',
         "apps[0].webhooks[0].event_types: unknown ['member_joined']"),
        ('url = "https://h/x"\nheaders = { "X-Pusher-Signature" = "x" }',
         "apps[0].webhooks[0].headers: X-Pusher-Signature is set by the gateway"),
        ('url = "https://h/x"\nheaders = { Auth = "a\\nb" }',
         "apps[0].webhooks[0].headers.Auth: must be text of at most 8192 characters on one line"),
        ('url = "https://h/x"\nchannel_prefixes = [""]',
         "apps[0].webhooks[0].channel_prefixes: must be a list of non-empty strings"),
        ('url = "https://h/x"\nretries = 3', "apps[0].webhooks[0]: unknown setting(s) ['retries']"),
    ],
)  # fmt: skip
def test_bad_webhook_endpoints_are_named(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f"[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\n[[apps.webhooks]]\n{entry}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path, env={})


def test_webhook_endpoints_and_their_filters(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        "[[apps]]\nid = 1\nkey = 'k'\nsecret = 's'\nwebhook_url = 'https://all.example/h'\n"
        "[[apps.webhooks]]\nurl = 'https://p.example/h'\nevent_types = ['member_added']\n"
        "channel_prefixes = ['presence-', 'private-']\nheaders = { Authorization = 'Bearer t' }\n"
    )
    (app,) = load_config(path, env={}).apps
    everything, presence = app.endpoints
    assert everything.wants("channel_vacated", "x") and everything.url == "https://all.example/h"
    assert presence.wants("member_added", "presence-a")
    assert not presence.wants("member_added", "a") and not presence.wants(
        "member_removed", "presence-a"
    )
    assert presence.headers == (("Authorization", "Bearer t"),)
    assert app.webhook_batching  # Pusher batches by default
