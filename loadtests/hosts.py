"""Loopback guard shared by the runner and the locust users (imports nothing heavy).

The runner must not import locust (it monkey-patches the process with gevent), so the check
lives here.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["check_loopback"]


def check_loopback(url: str) -> str | None:
    """None when ``url`` names a loopback host, else the reason it is refused."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return f"load tests run on loopback only; refusing host {url!r}"
