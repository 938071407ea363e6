"""A minimal asyncio HTTP/1.1 client: one POST per connection, for webhooks.

It opens a connection (TLS with the default context for ``https``), sends one request with
``Connection: close`` and reads one response whose body may be delimited by
``Content-Length``, chunked encoding or the end of the connection. Nothing is pooled: webhook
batches are few and a fresh connection per request keeps a broken receiver from poisoning the
next delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

__all__ = ["HttpClientError", "HttpResult", "post"]

MAX_RESPONSE_BODY = 1_048_576


class HttpClientError(Exception):
    """The request could not be made or the response was not valid HTTP."""


@dataclass(slots=True)
class HttpResult:
    """A response.

    Attributes:
        status: Status code.
        headers: Header fields with lower-cased names.
        body: Response body (truncated to 1 MiB).
    """

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class _Reader:
    """httptools callbacks collecting one response."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.headers_done = False
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if len(self.body) < MAX_RESPONSE_BODY:
            self.body += body[: MAX_RESPONSE_BODY - len(self.body)]

    def on_message_complete(self) -> None:
        self.done = True


_default_context: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _default_context  # noqa: PLW0603 - one verified context per process is enough
    if _default_context is None:
        _default_context = ssl.create_default_context()
    return _default_context


async def post(
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    timeout: float = 10.0,
) -> HttpResult:
    """POST ``body`` to ``url`` and return the response.

    Args:
        url: ``http://`` or ``https://`` URL.
        body: Request body (sent with ``Content-Length``).
        headers: Extra request header fields.
        timeout: Seconds for the whole exchange (connect, send, receive).

    Raises:
        HttpClientError: Bad URL, connection failure or invalid response.
        TimeoutError: The exchange took longer than ``timeout``.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpClientError(f"unsupported URL {url!r}")
    tls = parts.scheme == "https"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError as exc:
        raise HttpClientError(f"bad port in {url!r}") from exc
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    host_header = parts.netloc.rpartition("@")[2]
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {host_header}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    for name, value in (headers or {}).items():
        if "\r" in name + value or "\n" in name + value:
            raise HttpClientError(f"invalid header {name!r}")
        lines.append(f"{name}: {value}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    async with asyncio.timeout(timeout):
        return await _exchange(parts.hostname, port, _ssl_context() if tls else None, request)


async def _exchange(
    host: str, port: int, context: ssl.SSLContext | None, request: bytes
) -> HttpResult:
    try:
        reader, writer = await asyncio.open_connection(host, port, ssl=context)
    except OSError as exc:
        raise HttpClientError(f"cannot connect to {host}:{port}: {exc}") from exc
    try:
        writer.write(request)
        await writer.drain()
        sink = _Reader()
        parser = httptools.HttpResponseParser(sink)
        while not sink.done:
            chunk = await reader.read(65_536)
            if not chunk:
                if sink.headers_done:  # close-delimited body (or a truncated one we accept)
                    break
                raise HttpClientError("connection closed before a complete response")
            parser.feed_data(chunk)
        return HttpResult(parser.get_status_code(), sink.headers, bytes(sink.body))
    except httptools.HttpParserError as exc:
        raise HttpClientError(f"invalid HTTP response: {exc}") from exc
    except OSError as exc:
        raise HttpClientError(f"connection error: {exc}") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
