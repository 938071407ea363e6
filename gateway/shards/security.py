"""How the gateway authenticates to Redis servers and Sentinels, and encrypts the connection.

Each kind of server (shard servers, Sentinels, and for ``shards init`` and ``audit`` an admin
user on the shard servers) has an :class:`Access`: an optional ACL user and password
(``AUTH``) and optional TLS (CA file, client certificate and key for mutual TLS, the name to
verify). Passwords are :class:`Secret` values: they never appear in a ``repr``, a log line, an
error or ``/health``.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass

__all__ = ["Access", "Secret", "SecurityError", "TlsConfig"]


class SecurityError(ValueError):
    """A TLS file cannot be used; the message names the setting and the file (never a secret)."""


@dataclass(frozen=True)
class Secret:
    """A password: its text is only given to ``AUTH``, never shown."""

    value: str

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


@dataclass(frozen=True)
class TlsConfig:
    """TLS towards one kind of server.

    Attributes:
        ca_file: CA certificates (PEM) that the server's certificate must chain to; the
            system's when None.
        cert_file: Client certificate (PEM) for mutual TLS.
        key_file: Private key of ``cert_file``.
        server_name: Name the server's certificate must carry (default: the host connected to).
        check_hostname: Whether the name is verified (on by default).
        where: The setting these came from, for error messages.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    check_hostname: bool = True
    where: str = "tls"

    def context(self) -> ssl.SSLContext:
        """The client context (made once per configuration).

        Raises:
            SecurityError: A file is missing or not a valid certificate or key.
        """
        return _context(self)

    def hostname(self, host: str) -> str:
        """The name to verify when connecting to ``host``."""
        return self.server_name or host


@functools.lru_cache(maxsize=16)
def _context(tls: TlsConfig) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise SecurityError(f"{tls.where}.ca: cannot load {tls.ca_file}: {exc}") from exc
    context.check_hostname = tls.check_hostname
    if not tls.check_hostname:
        context.verify_mode = ssl.CERT_REQUIRED  # the chain is still verified
    if tls.cert_file:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise SecurityError(
                f"{tls.where}.cert / {tls.where}.key: cannot load {tls.cert_file}: {exc}"
            ) from exc
    return context


@dataclass(frozen=True)
class Access:
    """Credentials and TLS for one kind of server.

    Attributes:
        username: ACL user (None: the ``default`` user, or ``requirepass``).
        password: Its password (None: no ``AUTH``).
        tls: TLS settings (None: plain TCP).
    """

    username: str | None = None
    password: Secret | None = None
    tls: TlsConfig | None = None

    @property
    def user(self) -> str:
        """The user name for messages."""
        return self.username or "default"

    def auth_args(self) -> list[bytes] | None:
        """The ``AUTH`` command's arguments, or None when no password is set."""
        if self.password is None:
            return None
        if self.username:
            return [b"AUTH", self.username.encode(), self.password.value.encode()]
        return [b"AUTH", self.password.value.encode()]

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context, or None for plain TCP."""
        return self.tls.context() if self.tls is not None else None

    def redis_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``redis.Redis`` (redis-py) to connect the same way."""
        out: dict[str, object] = {}
        if self.password is not None:
            out["password"] = self.password.value
            if self.username:
                out["username"] = self.username
        if self.tls is not None:
            out.update(
                ssl=True,
                ssl_ca_certs=self.tls.ca_file,
                ssl_certfile=self.tls.cert_file,
                ssl_keyfile=self.tls.key_file,
                ssl_check_hostname=self.tls.check_hostname,
                ssl_cert_reqs="required",
            )
        return out


#: Plain TCP, no AUTH.
PLAIN = Access()
