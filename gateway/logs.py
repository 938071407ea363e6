"""The node's logs: plain text or one JSON object per line, each line naming the node.

Operational lines (a shard down, a Pub/Sub connection lost, a lease not refreshed, refused
connections) carry their subject as structured fields, passed with :func:`fields`: ``shard``,
``server``, ``reason`` and a few more. In the JSON format every line is an object with the
stable keys ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``msg``, ``node``
and those fields when present; in the text format the fields are already part of the message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["FIELDS", "LEVELS", "JsonFormatter", "fields", "setup"]

#: Structured fields a log line may carry (``extra`` keys), in output order.
FIELDS = ("shard", "server", "reason", "client", "channels", "seconds", "count")
#: Accepted values of the ``log_level`` setting.
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}  # fmt: skip

_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def fields(**values: Any) -> dict[str, Any]:
    """``extra`` for a log call: ``log.warning("...", extra=fields(shard=name, reason=why))``."""
    unknown = set(values) - set(FIELDS)
    assert not unknown, f"unknown log fields {unknown}"
    return values


class _NodeFilter(logging.Filter):
    def __init__(self, node: str | None) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "node": getattr(record, "node", None),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value if isinstance(value, (int, float, bool)) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text", node: str | None = None) -> None:
    """Configure the root logger (replaces earlier handlers).

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``text`` or ``json``.
        node: The node id put on every line.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    handler.addFilter(_NodeFilter(node))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
