"""A small certificate authority for local topologies and tests, made with the ``openssl`` command.

:func:`make_pki` writes a CA, a server certificate for the loopback names and a client
certificate (for mutual TLS), each with its private key, into a directory. They are meant for
``presence-gateway cluster up --secure`` and the tests; a deployment uses its own.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pki", "PkiError", "make_pki"]


class PkiError(RuntimeError):
    """The certificates could not be made (``openssl`` missing or failing)."""


@dataclass(frozen=True)
class Pki:
    """Paths of the files :func:`make_pki` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    try:
        subprocess.run(
            ["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60
        )
    except subprocess.CalledProcessError as exc:
        raise PkiError(f"openssl {args[0]} failed: {exc.stderr.strip()}") from exc


def make_pki(
    directory: Path | str, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 30
) -> Pki:
    """Write a CA, a server and a client certificate (EC P-256) into ``directory``.

    The server certificate names every host of ``hosts`` (IP addresses and DNS names) and is
    valid for server and client authentication; the client certificate is valid for client
    authentication. Existing files are replaced.

    Raises:
        PkiError: ``openssl`` is not installed or failed.
    """
    if shutil.which("openssl") is None:
        raise PkiError("the openssl command is needed to make certificates (Debian: openssl)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", str(days),
        "-subj", "/CN=presence-gateway local CA", cwd=out,
    )  # fmt: skip
    names = ",".join(
        f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts
    )
    for name, usage, cn in (
        ("server", "serverAuth,clientAuth", hosts[0]),
        ("client", "clientAuth", "presence-gateway client"),
    ):
        _openssl("req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=out)  # fmt: skip
        ext = out / f"{name}.ext"
        alt = f"subjectAltName={names}\n" if name == "server" else ""
        ext.write_text(f"{alt}extendedKeyUsage={usage}\n")
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", str(days), "-extfile", ext.name,
            cwd=out,
        )  # fmt: skip
        (out / f"{name}.csr").unlink()
        ext.unlink()
    for private in ("ca.key", "server.key", "client.key"):
        (out / private).chmod(0o600)
    return Pki(
        out / "ca.crt",
        out / "ca.key",
        out / "server.crt",
        out / "server.key",
        out / "client.crt",
        out / "client.key",
    )
