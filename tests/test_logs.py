"""The node's log formats: JSON lines with stable keys, and no line per connection at INFO."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from nodes import WsClient, running_node

from gateway import logs
from gateway.localcluster import LocalCluster


def test_json_lines_have_stable_keys_and_fields() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logs.setup("info", "json", "gw-7")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        log = logging.getLogger("gateway.test")
        log.warning(
            "shard %s: unavailable: %s",
            "shard-1",
            "wrong password",
            extra=logs.fields(shard="shard-1", server="10.0.0.3:6379", reason="wrong password"),
        )
        log.debug("not shown at info")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("with a traceback")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    first: dict[str, Any] = lines[0]
    assert set(first) == {"ts", "level", "logger", "msg", "node", "shard", "server", "reason"}
    assert first["level"] == "warning" and first["logger"] == "gateway.test"
    assert first["node"] == "gw-7" and first["msg"] == "shard shard-1: unavailable: wrong password"
    assert first["ts"].endswith("Z") and first["server"] == "10.0.0.3:6379"
    assert len(lines) == 2 and "ValueError: boom" in lines[1]["exception"]


def test_a_node_logs_json_and_no_line_per_connection(cluster: LocalCluster) -> None:
    with running_node(
        cluster.topology_path, node_id="log-json", extra_toml='log_format = "json"'
    ) as node:
        for _ in range(3):
            with WsClient(node.ws_url()) as ws:
                ws.subscribe("logged")
    lines = [line for line in node.output.splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(p["node"] == "log-json" for p in parsed)
    messages = [p["msg"] for p in parsed]
    assert any("listening on" in m for m in messages)
    assert not any(m in ("connection open", "connection closed") for m in messages)
