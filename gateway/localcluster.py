"""Start, inspect, damage and stop a local Redis + Sentinel topology on loopback.

The topology is ``shards`` masters, ``replicas`` replicas per master and ``sentinels`` Redis
Sentinels monitoring every shard under the master name ``shard-<i>``.  Every process is a
daemonized ``redis-server`` / ``redis-sentinel`` bound to loopback with persistence disabled;
its config, pidfile and logfile live in the cluster directory, so ``down`` (from any later
process, e.g. the CLI) can find and stop exactly the processes ``up`` started.

Port layout, starting at ``base_port``: the masters (``shard-0`` … ``shard-N-1``), then the
replicas shard-major (all replicas of shard 0, then shard 1, …), then the sentinels.

Files in the directory, named after the port (a process keeps its file names when its role
changes through a failover): ``redis-<port>.conf|.pid|.log`` and
``sentinel-<port>.conf|.pid|.log``, plus ``topology.json`` written by :meth:`LocalCluster.up`.

The chaos helpers (:meth:`LocalCluster.stop_process`, :meth:`~LocalCluster.start_process`,
:meth:`~LocalCluster.repoint_sentinels`, :meth:`~LocalCluster.failover`) exist for the
reliability tests; everything is blocking and synchronous.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from signal import SIGCONT, SIGKILL, SIGSTOP, SIGTERM, Signals
from typing import Any, Literal

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.pki import make_pki
from gateway.shards.security import PLAIN, Access, Secret, TlsConfig

__all__ = [
    "LOOPBACK_LOAD_ENV",
    "TOPOLOGY_FILE",
    "ClusterError",
    "LocalCluster",
    "PortInUseError",
    "ProcessSpec",
    "find_free_port_range",
    "format_status",
    "port_is_free",
]

TOPOLOGY_FILE = "topology.json"
"""Name of the topology file written by :meth:`LocalCluster.up` inside the cluster directory."""

LOOPBACK_LOAD_ENV = {
    "GATEWAY_MAX_CONNECTIONS_PER_IP": "0",
    "GATEWAY_HANDSHAKES_PER_IP": "0",
    "GATEWAY_SUBSCRIBES_PER_SECOND": "1000000",
    "GATEWAY_SUBSCRIBE_BURST": "1000000",
}
"""Environment for a node driven by a load generator on loopback.

Every synthetic client shares 127.0.0.1 and churns subscriptions far faster than a person, so
the per-address limits are off and the per-socket subscription rate is raised; everything
else (the work budget, load shedding, timeouts, the connection cap) stays as in production.
"""

Role = Literal["master", "replica", "sentinel"]

_POLL = 0.1
_CONNECT_TIMEOUT = 1.0
_PIDFILE_RE = re.compile(r"^(redis|sentinel)-(\d+)\.pid$")


class ClusterError(RuntimeError):
    """A local topology could not be started, reached or changed as asked.

    The message says what was not ready or what failed and, when useful, where the logs are.
    """


class PortInUseError(ClusterError):
    """A port of the topology is already taken by a process this topology did not start.

    Attributes:
        addrs: The busy ``host:port`` addresses.
    """

    def __init__(self, message: str, addrs: Sequence[str]) -> None:
        super().__init__(message)
        self.addrs = list(addrs)


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One process of the topology, as planned (its *initial* role).

    Attributes:
        role: ``"master"``, ``"replica"`` or ``"sentinel"`` at start-up; failovers change what
            the process reports, never this field.
        shard: Shard index for masters and replicas, ``None`` for sentinels.
        host: Loopback address the process binds to.
        port: TCP port.
        conf: Config file (rewritten by Sentinel and by ``REPLICAOF``-driven config rewrites).
        pidfile: Pidfile written by the daemonized process.
        logfile: Logfile of the process.
    """

    role: Role
    shard: int | None
    host: str
    port: int
    conf: Path
    pidfile: Path
    logfile: Path

    @property
    def addr(self) -> str:
        """``host:port`` of the process."""
        return f"{self.host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        """Return the ``processes`` entry of ``topology.json`` for this process."""
        return {
            "role": self.role,
            "shard": self.shard,
            "addr": self.addr,
            "pidfile": str(self.pidfile),
            "logfile": str(self.logfile),
            "conf": str(self.conf),
        }


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address must look like 'host:port', got {addr!r}")
    return host, int(port)


def _pairs(reply: Any) -> dict[str, str]:
    """Turn a RESP3 map or a flat RESP2 ``[k1, v1, k2, v2, ...]`` reply into a dict."""
    if isinstance(reply, Mapping):
        return {str(k): str(v) for k, v in reply.items()}
    items = [str(x) for x in reply]
    return dict(zip(items[0::2], items[1::2], strict=True))


def _proc_state(pid: int) -> str | None:
    """Return the Linux process state letter, or ``None`` when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces; the state follows it.
    return stat[stat.rfind(")") + 2 :][:1] or None


def _proc_cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _connect(
    host: str, port: int, timeout: float = _CONNECT_TIMEOUT, access: Access = PLAIN
) -> redis.Redis:
    # No retries: a dead or paused server must show up as an error at once while polling.
    return redis.Redis(
        host=host,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
        **access.redis_kwargs(),  # type: ignore[arg-type]
    )


#: The least-privilege ACL rules of the user a gateway node needs on the shard servers: the
#: README gives them as ``ACL SETUSER``, and ``cluster up --secure`` creates the user with them.
GATEWAY_ACL = (
    "resetkeys ~{* ~__pg:shard resetchannels &{* -@all +@read +@write +@pubsub +@scripting "
    "+@connection -@dangerous +info +role +time -function"
)
#: What the gateway needs on a Sentinel.
GATEWAY_SENTINEL_ACL = "-@all +sentinel|get-master-addr-by-name +ping"
#: What Redis documents for Sentinel's own user on the servers it monitors.
SENTINEL_ACL = (
    "allchannels +multi +slaveof +ping +exec +subscribe +config|rewrite +role +publish +info "
    "+client|setname +client|kill +script|kill"
)
#: Replication's user.
REPLICA_ACL = "+psync +replconf +ping"
_SECRET_NAMES = ("pg-admin", "gateway", "gateway-sentinel", "replica", "sentinel", "sentinel-peer")


def port_is_free(host: str, port: int) -> bool:
    """Whether ``port`` on ``host`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# Below Linux's default ephemeral range (32768-60999), so client sockets do not collide.
_PORT_LOW = 20000
_PORT_HIGH = 32000


def find_free_port_range(count: int, *, host: str = "127.0.0.1", attempts: int = 200) -> int:
    """Return a base port such that ``base .. base+count-1`` all bind on ``host`` right now.

    The base is random, so concurrent processes rarely pick the same range; the range can
    still be taken before it is used (``up`` then raises :class:`PortInUseError`).

    Args:
        count: Number of consecutive ports needed.
        host: Address to bind-check.
        attempts: Random bases to try before giving up.

    Raises:
        RuntimeError: No free range was found.
    """
    for _ in range(attempts):
        base = random.randrange(_PORT_LOW, _PORT_HIGH - count)
        if all(port_is_free(host, base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no free range of {count} ports on {host}")


class LocalCluster:
    """A local master/replica/Sentinel topology whose processes live in one directory.

    Constructing the object starts nothing; :meth:`up` starts the processes, :meth:`down`
    stops them. Every method can be called from a fresh process pointed at the same
    directory (use :meth:`from_dir` to rebuild the options from ``topology.json``).

    Args:
        dir: Directory for configs, pidfiles, logs and ``topology.json`` (created by ``up``).
        shards: Number of shards (masters), at least 1.
        replicas: Replicas per shard, at least 0.
        sentinels: Number of Sentinels, at least 0 (0 gives a topology without failover).
        base_port: First port of the range; the range is ``shards * (1 + replicas) +
            sentinels`` ports long.
        host: Loopback IPv4 address every process binds to.
        cluster_name: Name recorded in ``topology.json`` as ``cluster``.
        down_after_ms: Sentinel ``down-after-milliseconds`` for every master name.
        failover_timeout_ms: Sentinel ``failover-timeout`` for every master name.
        redis_server: ``redis-server`` executable (name on ``PATH`` or path).
        redis_sentinel: ``redis-sentinel`` executable (name on ``PATH`` or path).
        secure: TLS only (plain ports disabled, client certificates required) and ACL users on
            every server and Sentinel: certificates in ``DIR/tls`` (made with ``openssl``),
            passwords in ``DIR/secrets``; ``topology.json`` says how to use them.

    Raises:
        ValueError: An option is invalid; the message names the option.
    """

    def __init__(
        self,
        dir: Path | str,
        *,
        shards: int = 2,
        replicas: int = 1,
        sentinels: int = 3,
        base_port: int = 7100,
        host: str = "127.0.0.1",
        cluster_name: str = "local",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        redis_server: str = "redis-server",
        redis_sentinel: str = "redis-sentinel",
        secure: bool = False,
    ) -> None:
        if not isinstance(dir, str | os.PathLike):
            raise ValueError(f"dir must be a path, got {dir!r}")
        self.shards = _check_int("shards", shards, 1)
        self.replicas = _check_int("replicas", replicas, 0)
        self.sentinels = _check_int("sentinels", sentinels, 0)
        total = shards * (1 + replicas) + sentinels
        self.base_port = _check_int("base_port", base_port, 1, 65536 - total)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"host must be a loopback IPv4 address, got {host!r}") from None
        if ip.version != 4 or not ip.is_loopback:
            raise ValueError(f"host must be a loopback IPv4 address, got {host!r}")
        self.host = host
        if not isinstance(cluster_name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", cluster_name):
            raise ValueError(
                f"cluster_name must be a non-empty word of [A-Za-z0-9_.-], got {cluster_name!r}"
            )
        self.cluster_name = cluster_name
        self.down_after_ms = _check_int("down_after_ms", down_after_ms, 1)
        self.failover_timeout_ms = _check_int("failover_timeout_ms", failover_timeout_ms, 1)
        self.quorum = sentinels // 2 + 1
        self.dir = Path(dir).absolute()
        self.redis_server = redis_server
        self.redis_sentinel = redis_sentinel
        self.secure = bool(secure)
        self.processes: tuple[ProcessSpec, ...] = tuple(self._plan())

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dir(cls, dir: Path | str, **overrides: Any) -> LocalCluster:
        """Rebuild a cluster object from the ``topology.json`` that ``up`` wrote in ``dir``.

        This is what ``cluster down|status --dir DIR`` uses, so it needs no layout options.

        Args:
            dir: The cluster directory.
            **overrides: Constructor keyword arguments that win over the file's values.

        Raises:
            FileNotFoundError: ``dir`` holds no ``topology.json``.
            ValueError: The file does not describe a topology of this launcher.
        """
        path = Path(dir) / TOPOLOGY_FILE
        data = json.loads(path.read_text())
        try:
            shards = data["shards"]
            _, base_port = _split_addr(shards[0]["master"])
            host, _ = _split_addr(shards[0]["master"])
            options: dict[str, Any] = {
                "shards": len(shards),
                "replicas": len(shards[0]["replicas"]),
                "sentinels": len(data["sentinels"]),
                "base_port": base_port,
                "host": host,
                "cluster_name": data.get("cluster", "local"),
            }
            options["secure"] = bool(data.get("secure", False))
            settings = data.get("sentinel_settings") or {}
            for key in ("down_after_ms", "failover_timeout_ms"):
                if key in settings:
                    options[key] = settings[key]
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{path} is not a topology written by LocalCluster: {exc!r}") from exc
        options.update(overrides)
        return cls(dir, **options)

    def _plan(self) -> Iterator[ProcessSpec]:
        s, r = self.shards, self.replicas
        for i in range(s):
            yield self._spec("master", i, self.base_port + i)
        for i in range(s):
            for j in range(r):
                yield self._spec("replica", i, self.base_port + s + i * r + j)
        for k in range(self.sentinels):
            yield self._spec("sentinel", None, self.base_port + s * (1 + r) + k)

    def _spec(self, role: Role, shard: int | None, port: int) -> ProcessSpec:
        stem = self.dir / f"{'sentinel' if role == 'sentinel' else 'redis'}-{port}"
        return ProcessSpec(
            role=role,
            shard=shard,
            host=self.host,
            port=port,
            conf=stem.with_suffix(".conf"),
            pidfile=stem.with_suffix(".pid"),
            logfile=stem.with_suffix(".log"),
        )

    # ------------------------------------------------------------------ layout accessors

    @staticmethod
    def master_name(shard: int) -> str:
        """Return the Sentinel master name of shard ``shard`` (``shard-<i>``)."""
        return f"shard-{shard}"

    @property
    def master_names(self) -> list[str]:
        """Sentinel master names, in shard order."""
        return [self.master_name(i) for i in range(self.shards)]

    @property
    def topology_path(self) -> Path:
        """Path of ``topology.json``."""
        return self.dir / TOPOLOGY_FILE

    def masters(self) -> list[ProcessSpec]:
        """Processes started as masters, in shard order."""
        return [p for p in self.processes if p.role == "master"]

    def replicas_of(self, shard: int) -> list[ProcessSpec]:
        """Processes started as replicas of shard ``shard``."""
        return [p for p in self.processes if p.role == "replica" and p.shard == shard]

    def sentinel_processes(self) -> list[ProcessSpec]:
        """Sentinel processes."""
        return [p for p in self.processes if p.role == "sentinel"]

    def shard_members(self, shard: int) -> list[ProcessSpec]:
        """Master and replicas started for shard ``shard``."""
        return [p for p in self.processes if p.role != "sentinel" and p.shard == shard]

    def process(self, addr: str) -> ProcessSpec:
        """Return the process listening on ``addr`` (``host:port``).

        Raises:
            ValueError: No process of this topology has that address.
        """
        for p in self.processes:
            if p.addr == addr:
                return p
        raise ValueError(f"{addr} is not a process of the topology in {self.dir}")

    def topology(self) -> dict[str, Any]:
        """Return the ``topology.json`` content for the *planned* layout.

        The ``master``/``replicas`` fields are the initial roles; after a failover, ask the
        sentinels (:meth:`sentinel_master_addr`) or :meth:`status` for the current ones.
        """
        return {
            "cluster": self.cluster_name,
            "shards": [
                {
                    "name": self.master_name(i),
                    "master": self.masters()[i].addr,
                    "replicas": [p.addr for p in self.replicas_of(i)],
                }
                for i in range(self.shards)
            ],
            "sentinels": [p.addr for p in self.sentinel_processes()],
            "sentinel_settings": {
                "quorum": self.quorum,
                "down_after_ms": self.down_after_ms,
                "failover_timeout_ms": self.failover_timeout_ms,
            },
            "processes": [p.to_json() for p in self.processes],
            "dir": str(self.dir),
            **self._security_json(),
        }

    # ------------------------------------------------------------------ security

    @property
    def tls_dir(self) -> Path:
        """Certificates of a secure topology."""
        return self.dir / "tls"

    @property
    def secrets_dir(self) -> Path:
        """Passwords of a secure topology, one file per user (mode 600)."""
        return self.dir / "secrets"

    def _secret(self, user: str) -> str:
        return (self.secrets_dir / f"{user}.pass").read_text().strip()

    def _prepare_secure(self) -> None:
        """Make the certificates and passwords once (kept across restarts of the processes)."""
        if not (self.tls_dir / "ca.crt").exists():
            make_pki(self.tls_dir, hosts=(self.host, "localhost"))
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.chmod(0o700)
        for user in _SECRET_NAMES:
            path = self.secrets_dir / f"{user}.pass"
            if not path.exists():
                path.write_text(secrets.token_hex(16) + "\n")
                path.chmod(0o600)

    def _tls_json(self) -> dict[str, str]:
        return {"ca": "tls/ca.crt", "cert": "tls/client.crt", "key": "tls/client.key"}

    def _security_json(self) -> dict[str, Any]:
        if not self.secure:
            return {}
        tls = self._tls_json()
        return {
            "secure": True,
            "redis": {"username": "gateway", "password_file": "secrets/gateway.pass", "tls": tls},
            "redis_admin": {"username": "pg-admin", "password_file": "secrets/pg-admin.pass"},
            "sentinel": {
                "username": "gateway-sentinel",
                "password_file": "secrets/gateway-sentinel.pass",
                "tls": tls,
            },
        }

    def admin_access(self) -> Access:
        """How this launcher (and tests) reach every process: the admin user, over TLS."""
        if not self.secure:
            return PLAIN
        return Access(
            username="pg-admin",
            password=Secret(self._secret("pg-admin")),
            tls=TlsConfig(
                ca_file=str(self.tls_dir / "ca.crt"),
                cert_file=str(self.tls_dir / "client.crt"),
                key_file=str(self.tls_dir / "client.key"),
            ),
        )

    def _secure_conf(self, spec: ProcessSpec) -> list[str]:
        tls = self.tls_dir
        lines = [
            "port 0",
            f"tls-port {spec.port}",
            f'tls-cert-file "{tls / "server.crt"}"',
            f'tls-key-file "{tls / "server.key"}"',
            f'tls-ca-cert-file "{tls / "ca.crt"}"',
            "tls-auth-clients yes",
            "tls-replication yes",
            "user default off",
        ]
        admin = self._secret("pg-admin")
        if spec.role == "sentinel":
            lines += [
                f"user pg-admin on >{admin} allchannels +@all",
                f"user gateway-sentinel on >{self._secret('gateway-sentinel')} "
                f"{GATEWAY_SENTINEL_ACL}",
                f"user sentinel-peer on >{self._secret('sentinel-peer')} allchannels +@all",
                "sentinel sentinel-user sentinel-peer",
                f"sentinel sentinel-pass {self._secret('sentinel-peer')}",
            ]
        else:
            lines += [
                f"user pg-admin on >{admin} ~* &* +@all",
                f"user gateway on >{self._secret('gateway')} {GATEWAY_ACL}",
                f"user replica on >{self._secret('replica')} {REPLICA_ACL}",
                f"user sentinel on >{self._secret('sentinel')} {SENTINEL_ACL}",
                "masteruser replica",
                f"masterauth {self._secret('replica')}",
            ]
        return lines

    def _sentinel_auth(self, name: str) -> list[str]:
        """``SENTINEL SET`` arguments that let Sentinel log in to the servers of ``name``."""
        if not self.secure:
            return []
        return ["auth-user", "sentinel", "auth-pass", self._secret("sentinel")]

    # ------------------------------------------------------------------ process identity

    def pid(self, spec: ProcessSpec) -> int | None:
        """Return the pid of ``spec`` if a process *we started* is alive for it, else ``None``.

        The pidfile's pid must exist, not be a zombie, and its command line must be a Redis
        process title naming ``spec``'s address — so a recycled pid is never mistaken for ours.
        """
        try:
            pid = int(spec.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._still_running(spec, pid) else None

    @staticmethod
    def _still_running(spec: ProcessSpec, pid: int) -> bool:
        """Whether ``pid`` is a live (not zombie) Redis process whose title names ``spec``'s
        address.

        Independent of the pidfile: Redis deletes its pidfile while shutting down, before the
        process has closed its port and exited, so a missing pidfile does not mean gone.
        """
        state = _proc_state(pid)
        if state is None or state in "ZX":
            return False
        cmdline = _proc_cmdline(pid)
        return "redis" in cmdline and f"{spec.host}:{spec.port}" in cmdline

    def is_alive(self, addr: str) -> bool:
        """Whether the process on ``addr`` that this topology started is running."""
        return self.pid(self.process(addr)) is not None

    def _client(self, spec: ProcessSpec, timeout: float = _CONNECT_TIMEOUT) -> redis.Redis:
        return _connect(spec.host, spec.port, timeout, self.admin_access())

    def client(self, addr: str) -> redis.Redis:
        """Return a new synchronous redis-py client (``decode_responses=True``) for ``addr``.

        Use it as a context manager so its connections are closed.
        """
        return self._client(self.process(addr))

    # ------------------------------------------------------------------ up / down

    def up(self, timeout: float = 30.0) -> dict[str, Any]:
        """Start every process that is not running, wait until healthy, write ``topology.json``.

        Healthy means: every replica reports ``master_link_status:up`` to its shard's current
        master, and every sentinel knows every master name at the address all sentinels
        agree on, each shard member as a connected replica and all other sentinels.

        If the topology is already running and healthy, nothing is started and the existing
        ``topology.json`` content is returned. If nothing of it is running, the configs are
        written afresh (a clean start); otherwise only the missing processes are started, from
        their existing (possibly Sentinel-rewritten) configs.

        Args:
            timeout: Seconds to wait for the topology to become healthy.

        Returns:
            The ``topology.json`` content.

        Raises:
            PortInUseError: A port of a process to start is taken.
            ClusterError: A process failed to start, a different topology
                runs in the directory, or the topology was not healthy within ``timeout``
                (the processes started by this call are stopped again).
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.secure:
            self._prepare_secure()
        planned = self.topology()
        alive = {p.addr for p in self.processes if self.pid(p) is not None}
        existing = self._read_topology()
        if existing is not None and any(
            existing.get(k) != planned[k] for k in ("shards", "sentinels", "cluster")
        ):
            if alive or self._foreign_alive():
                raise ClusterError(
                    f"a different topology is running in {self.dir}; run down() first"
                )
            existing = None
        if existing is not None and len(alive) == len(self.processes) and not self._problems():
            return existing

        fresh = not alive and not self._foreign_alive()
        to_start = [p for p in self.processes if p.addr not in alive]
        busy = [p.addr for p in to_start if not port_is_free(p.host, p.port)]
        if busy:
            raise PortInUseError(
                f"cannot start the topology in {self.dir}: port(s) in use: {', '.join(busy)}",
                busy,
            )
        if fresh:
            self.topology_path.unlink(missing_ok=True)
        started: list[ProcessSpec] = []
        try:
            # Masters before replicas before sentinels, so sentinels find everything at once.
            for spec in to_start:
                if fresh or not spec.conf.exists():
                    self._write_conf(spec)
                self._spawn(spec)
                started.append(spec)
            self._wait(
                lambda: self._problems(started=started),
                timeout,
                "the topology to become healthy",
            )
        except BaseException:
            self._stop(started)
            raise
        self._write_topology(planned)
        return planned

    def down(self, timeout: float = 10.0) -> list[str]:
        """Stop every process this topology started; idempotent.

        Processes are found through their pidfiles in the directory (so ones promoted or
        reconfigured since ``up`` are included, and so are stray ones of an aborted ``up``)
        and verified to be ours before any signal is sent. Each gets SIGTERM (and SIGCONT, in
        case it was stopped by :meth:`stop_process`); survivors get SIGKILL after ``timeout``.
        Sentinels go first so that no failover starts while the data nodes stop.

        Args:
            timeout: Seconds to wait for a graceful exit before SIGKILL.

        Returns:
            Addresses of the processes that were running and have been stopped.
        """
        specs = list(self.processes)
        known = {p.pidfile for p in specs}
        if self.dir.is_dir():
            for path in sorted(self.dir.iterdir()):
                match = _PIDFILE_RE.match(path.name)
                if match and path not in known:
                    role: Role = "sentinel" if match.group(1) == "sentinel" else "master"
                    specs.append(self._spec(role, None, int(match.group(2))))
        stopped: list[str] = []
        sentinels = [p for p in specs if p.role == "sentinel"]
        for group in (sentinels, [p for p in specs if p.role != "sentinel"]):
            stopped += self._stop(group, timeout)
        return stopped

    def _foreign_alive(self) -> bool:
        """Whether a pidfile in the directory outside our plan belongs to a live process."""
        if not self.dir.is_dir():
            return False
        ours = {p.pidfile for p in self.processes}
        for path in self.dir.iterdir():
            match = _PIDFILE_RE.match(path.name)
            if match and path not in ours:
                role: Role = "sentinel" if match.group(1) == "sentinel" else "master"
                if self.pid(self._spec(role, None, int(match.group(2)))) is not None:
                    return True
        return False

    def _stop(self, specs: Sequence[ProcessSpec], timeout: float = 10.0) -> list[str]:
        pids = {p.addr: (p, pid) for p in specs if (pid := self.pid(p)) is not None}
        for _, pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, SIGTERM)
                os.kill(pid, SIGCONT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
            self._still_running(p, pid) for p, pid in pids.values()
        ):
            time.sleep(_POLL)
        for p, pid in pids.values():
            if self._still_running(p, pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, SIGKILL)
        self._wait(
            lambda: [a for a, (p, pid) in pids.items() if self._still_running(p, pid)],
            5.0,
            "killed processes to exit",
        )
        for p, _ in pids.values():
            # A SIGKILLed Redis leaves its pidfile behind; a stale one is harmless but noisy.
            p.pidfile.unlink(missing_ok=True)
        return list(pids)

    # ------------------------------------------------------------------ configs and spawning

    def _write_conf(self, spec: ProcessSpec) -> None:
        lines = [
            f"bind {spec.host}",
            *(self._secure_conf(spec) if self.secure else [f"port {spec.port}"]),
            "daemonize yes",
            f'pidfile "{spec.pidfile}"',
            f'logfile "{spec.logfile}"',
            f'dir "{self.dir}"',
            "loglevel notice",
        ]
        if spec.role == "sentinel":
            for i, master in enumerate(self.masters()):
                name = self.master_name(i)
                lines += [
                    f"sentinel monitor {name} {master.host} {master.port} {self.quorum}",
                    f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                    f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {name} 1",
                ]
                if self.secure:
                    lines += [
                        f"sentinel auth-user {name} sentinel",
                        f"sentinel auth-pass {name} {self._secret('sentinel')}",
                    ]
        else:
            lines += [
                'save ""',
                "appendonly no",
                f'dbfilename "redis-{spec.port}.rdb"',
                # Full syncs go over the socket both ways and leave no RDB file behind.
                "repl-diskless-sync yes",
                "repl-diskless-sync-delay 0",
                "repl-diskless-load on-empty-db",
                "rdb-del-sync-files yes",
                # Tests may use DEBUG SLEEP / DEBUG SEGFAULT from loopback.
                "enable-debug-command local",
                # Masters would otherwise wait up to 10 s for lagging replicas on SIGTERM.
                "shutdown-timeout 1",
            ]
            if spec.role == "replica":
                assert spec.shard is not None
                master = self.masters()[spec.shard]
                lines.append(f"replicaof {master.host} {master.port}")
        spec.conf.write_text("\n".join(lines) + "\n")
        if self.secure:
            spec.conf.chmod(0o600)  # it holds passwords

    def _spawn(self, spec: ProcessSpec) -> None:
        exe_name = self.redis_sentinel if spec.role == "sentinel" else self.redis_server
        exe = shutil.which(exe_name)
        if exe is None:
            raise ClusterError(f"{exe_name} not found on PATH")
        # Daemonized: the command returns once the server forked; failures before the fork
        # (bad config) show up on stderr, failures after it in the logfile.
        result = subprocess.run(
            [exe, str(spec.conf)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
            cwd=self.dir,
        )
        if result.returncode != 0:
            raise ClusterError(
                f"{exe_name} {spec.conf} exited with {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()} (log: {spec.logfile})"
            )

    def _wait_reachable(self, spec: ProcessSpec, timeout: float) -> None:
        def problems() -> list[str]:
            if self.pid(spec) is None:
                return [f"{spec.addr} has no live process (pidfile {spec.pidfile})"]
            return [] if self._ping(spec) else [f"{spec.addr} does not answer PING"]

        self._wait(problems, timeout, f"{spec.addr} to start")

    def _ping(self, spec: ProcessSpec) -> bool:
        try:
            with self._client(spec) as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    # ------------------------------------------------------------------ health

    def _wait(self, problems: Callable[[], list[str]], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            found = problems()
            if not found:
                return
            if time.monotonic() >= deadline:
                shown = "; ".join(found[:8]) + ("; …" if len(found) > 8 else "")
                raise ClusterError(
                    f"timed out after {timeout:g}s waiting for {what}: {shown} "
                    f"(logs: {self.dir}/*.log)"
                )
            time.sleep(_POLL)

    def _problems(self, started: Sequence[ProcessSpec] = ()) -> list[str]:
        """Return what keeps the topology from being healthy (empty when healthy)."""
        problems: list[str] = []
        for spec in started:
            if self.pid(spec) is None and not spec.pidfile.exists():
                # Not daemonized yet, or died at once: the log says which.
                problems.append(f"{spec.addr} not running yet (log: {spec.logfile})")
        if problems:
            return problems
        current: dict[int, ProcessSpec] = {}
        for i in range(self.shards):
            master, problem = self._agreed_master(i)
            if problem:
                problems.append(problem)
                continue
            assert master is not None
            current[i] = master
            problems += self._replication_problems(i, master)
        if not problems:
            problems += self._sentinel_problems(current)
        return problems

    def _agreed_master(self, shard: int) -> tuple[ProcessSpec | None, str | None]:
        name = self.master_name(shard)
        if not self.sentinels:
            return self.masters()[shard], None
        reported = self.sentinel_master_addr(name)
        if None in reported or len(set(reported)) != 1:
            return None, f"sentinels disagree on or do not know {name}: {reported}"
        addr = reported[0]
        members = {p.addr: p for p in self.shard_members(shard)}
        if addr not in members:
            return None, f"sentinels report {name} at {addr}, which is not a member of {name}"
        return members[addr], None

    def _replication_problems(self, shard: int, master: ProcessSpec) -> list[str]:
        problems: list[str] = []
        info = self._info_replication(master)
        if info is None or info.get("role") != "master":
            role = None if info is None else info.get("role")
            problems.append(f"{master.addr} (master of {self.master_name(shard)}) role is {role}")
        for spec in self.shard_members(shard):
            if spec == master:
                continue
            info = self._info_replication(spec)
            if info is None:
                problems.append(f"{spec.addr} unreachable")
            elif info.get("role") != "slave":
                problems.append(f"{spec.addr} is {info.get('role')}, not a replica")
            elif f"{info.get('master_host')}:{info.get('master_port')}" != master.addr:
                where = f"{info.get('master_host')}:{info.get('master_port')}"
                problems.append(f"{spec.addr} replicates {where}, not {master.addr}")
            elif info.get("master_link_status") != "up":
                problems.append(f"{spec.addr} master_link_status is not up")
        return problems

    def _sentinel_problems(self, current: dict[int, ProcessSpec]) -> list[str]:
        problems: list[str] = []
        sentinel_addrs = {p.addr for p in self.sentinel_processes()}
        for sentinel in self.sentinel_processes():
            try:
                with self._client(sentinel) as c:
                    for i, master in current.items():
                        name = self.master_name(i)
                        state = _pairs(c.execute_command("SENTINEL", "MASTER", name))
                        if state.get("flags") != "master":
                            problems.append(f"{sentinel.addr}: {name} flags {state.get('flags')}")
                        want = {p.addr for p in self.shard_members(i)} - {master.addr}
                        have = {
                            f"{r['ip']}:{r['port']}"
                            for r in map(_pairs, c.execute_command("SENTINEL", "REPLICAS", name))
                            if r.get("flags") == "slave"
                        }
                        if missing := sorted(want - have):
                            problems.append(f"{sentinel.addr}: {name} replicas {missing} unseen")
                        peers = {
                            f"{r['ip']}:{r['port']}"
                            for r in map(_pairs, c.execute_command("SENTINEL", "SENTINELS", name))
                            if r.get("flags") == "sentinel"
                        }
                        if missing := sorted(sentinel_addrs - {sentinel.addr} - peers):
                            problems.append(f"{sentinel.addr}: {name} sentinels {missing} unseen")
            except redis.RedisError as exc:
                problems.append(f"{sentinel.addr}: {exc}")
        return problems

    def _info_replication(self, spec: ProcessSpec) -> dict[str, Any] | None:
        try:
            with self._client(spec) as c:
                info: dict[str, Any] = c.info("replication")
                return info
        except redis.RedisError:
            return None

    def healthy(self) -> bool:
        """Whether every process runs and the topology is as :meth:`up` leaves it."""
        return all(self.pid(p) is not None for p in self.processes) and not self._problems()

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """Report on every process: alive, pid, reported role, and what sentinels believe.

        Returns:
            ``{"cluster", "dir", "healthy", "problems", "processes": [...]}`` where each
            process entry has ``role`` (initial), ``shard``, ``addr``, ``pid``, ``alive``,
            ``reachable``, ``reported_role`` (``"master"``, ``"replica"``, ``"sentinel"`` or
            ``None``), for replicas ``master`` and ``link`` (``"up"``/``"down"``), and for
            sentinels ``masters`` mapping each master name to the reported ``host:port``
            (``None`` when unknown).
        """
        entries: list[dict[str, Any]] = []
        for spec in self.processes:
            pid = self.pid(spec)
            entry: dict[str, Any] = {
                "role": spec.role,
                "shard": spec.shard,
                "addr": spec.addr,
                "pid": pid,
                "alive": pid is not None,
                "reachable": False,
                "reported_role": None,
            }
            if pid is not None and _proc_state(pid) == "T":
                entry["stopped"] = True
            if pid is not None and entry.get("stopped") is None:
                if spec.role == "sentinel":
                    masters = {n: self._sentinel_addr(spec, n) for n in self.master_names}
                    entry["masters"] = masters
                    entry["reachable"] = self._ping(spec)
                    entry["reported_role"] = "sentinel" if entry["reachable"] else None
                else:
                    info = self._info_replication(spec)
                    if info is not None:
                        entry["reachable"] = True
                        role = info.get("role")
                        entry["reported_role"] = "replica" if role == "slave" else role
                        if role == "slave":
                            entry["master"] = f"{info['master_host']}:{info['master_port']}"
                            entry["link"] = info.get("master_link_status")
            entries.append(entry)
        alive = all(e["alive"] for e in entries)
        problems = self._problems() if alive else ["not every process is running"]
        return {
            "cluster": self.cluster_name,
            "dir": str(self.dir),
            "healthy": alive and not problems,
            "problems": problems,
            "processes": entries,
        }

    # ------------------------------------------------------------------ chaos helpers

    def stop_process(self, addr: str, signal: Signals = SIGKILL, *, timeout: float = 10.0) -> None:
        """Send ``signal`` to the process on ``addr`` and wait for its effect.

        For SIGSTOP, waits until the process is stopped (it keeps its port and pidfile; resume
        it with :meth:`start_process`). For any other signal, waits until it has exited.

        Args:
            addr: ``host:port`` of a process of this topology.
            signal: Signal to send (SIGKILL simulates a crash, SIGTERM a clean shutdown).
            timeout: Seconds to wait.

        Raises:
            ClusterError: The process is not running, or did not react within ``timeout``.
        """
        spec = self.process(addr)
        pid = self.pid(spec)
        if pid is None:
            raise ClusterError(f"{addr} is not running")
        os.kill(pid, signal)
        if signal == SIGSTOP:
            self._wait(
                lambda: [] if _proc_state(pid) == "T" else [f"{addr} not stopped"],
                timeout,
                f"{addr} to stop",
            )
        else:
            self._wait(
                lambda: [f"{addr} still running"] if self._still_running(spec, pid) else [],
                timeout,
                f"{addr} to exit",
            )

    def start_process(self, addr: str, *, timeout: float = 10.0) -> None:
        """Bring the process on ``addr`` back: resume it if stopped, restart it if dead.

        A restart uses the process's existing config file, which Redis and Sentinel may have
        rewritten since ``up`` (a demoted master comes back with its ``replicaof`` line, a
        sentinel with the masters it last knew). Does nothing if the process is running.
        Waits until it answers PING; replication and Sentinel discovery are not awaited.

        Raises:
            PortInUseError: The port is taken by another process.
            ClusterError: The process did not start.
        """
        spec = self.process(addr)
        pid = self.pid(spec)
        if pid is not None:
            if _proc_state(pid) == "T":
                os.kill(pid, SIGCONT)
            self._wait_reachable(spec, timeout)
            return
        if not port_is_free(spec.host, spec.port):
            raise PortInUseError(f"cannot restart {addr}: port in use by another process", [addr])
        if not spec.conf.exists():
            self._write_conf(spec)
        self._spawn(spec)
        self._wait_reachable(spec, timeout)

    def _sentinel_addr(self, sentinel: ProcessSpec, name: str) -> str | None:
        try:
            with self._client(sentinel) as c:
                reply = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name)
        except redis.RedisError:
            return None
        if not reply:
            return None
        return f"{reply[0]}:{reply[1]}"

    def sentinel_master_addr(self, name: str) -> list[str | None]:
        """Ask every sentinel where master ``name`` is.

        Returns:
            One entry per sentinel, in sentinel order: ``"host:port"``, or ``None`` when that
            sentinel is unreachable or does not monitor ``name``.
        """
        return [self._sentinel_addr(s, name) for s in self.sentinel_processes()]

    def repoint_sentinels(self, name: str, addr: str, *, timeout: float = 15.0) -> None:
        """Make every sentinel monitor master name ``name`` at ``addr``.

        On each sentinel: ``SENTINEL REMOVE name`` then ``SENTINEL MONITOR name host port
        quorum`` and ``SENTINEL SET`` of the usual down-after / failover-timeout /
        parallel-syncs settings. Pointing ``shard-0`` at shard 1's master replays the
        operator mistake of the incident; pointing it back at its own master fixes it.
        Waits until every sentinel reports ``addr`` for ``name`` and has rediscovered the
        other sentinels for it (so a later failover can reach quorum).

        Args:
            name: Sentinel master name, e.g. ``"shard-0"``.
            addr: ``host:port`` of any Redis server (need not belong to shard ``name``).
            timeout: Seconds to wait for the sentinels to converge.

        Raises:
            ClusterError: A sentinel refused the commands or did not converge in time.
        """
        host, port = _split_addr(addr)
        sentinels = self.sentinel_processes()
        if not sentinels:
            raise ClusterError("this topology has no sentinels")
        for sentinel in sentinels:
            try:
                with self._client(sentinel) as c:
                    with contextlib.suppress(redis.ResponseError):  # not monitored yet
                        c.execute_command("SENTINEL", "REMOVE", name)
                    c.execute_command("SENTINEL", "MONITOR", name, host, port, self.quorum)
                    c.execute_command(
                        "SENTINEL",
                        "SET",
                        name,
                        "down-after-milliseconds",
                        self.down_after_ms,
                        "failover-timeout",
                        self.failover_timeout_ms,
                        "parallel-syncs",
                        1,
                        *self._sentinel_auth(name),
                    )
            except redis.RedisError as exc:
                raise ClusterError(f"{sentinel.addr}: repointing {name} failed: {exc}") from exc
        others = len(sentinels) - 1

        def problems() -> list[str]:
            found: list[str] = []
            for sentinel in sentinels:
                try:
                    with self._client(sentinel) as c:
                        state = _pairs(c.execute_command("SENTINEL", "MASTER", name))
                except redis.RedisError as exc:
                    found.append(f"{sentinel.addr}: {exc}")
                    continue
                if f"{state.get('ip')}:{state.get('port')}" != addr:
                    found.append(f"{sentinel.addr} reports {name} elsewhere")
                elif int(state.get("num-other-sentinels", 0)) < others:
                    found.append(f"{sentinel.addr} sees too few sentinels for {name}")
            return found

        self._wait(problems, timeout, f"sentinels to monitor {name} at {addr}")

    def failover(self, name: str, *, timeout: float = 30.0) -> str:
        """Force a Sentinel failover of ``name`` and wait until it is visible everywhere.

        Sends ``SENTINEL FAILOVER`` to the first reachable sentinel, then waits until every
        sentinel reports a new address for ``name`` and the server there reports role master.
        The old master, if alive, is demoted by Sentinel only some seconds later; this method
        does not wait for that (use :meth:`wait_healthy`).

        Args:
            name: Sentinel master name.
            timeout: Seconds to wait.

        Returns:
            ``host:port`` of the new master.

        Raises:
            ClusterError: No sentinel accepted the failover, or it did not complete in time.
        """
        before = {a for a in self.sentinel_master_addr(name) if a is not None}
        errors: dict[str, str] = {}

        def ask() -> list[str]:
            # NOGOODSLAVE is transient right after start-up or a repoint (the sentinel has
            # not yet seen a healthy replica), so retry; an unreachable sentinel is skipped.
            for sentinel in self.sentinel_processes():
                try:
                    with self._client(sentinel) as c:
                        c.execute_command("SENTINEL", "FAILOVER", name)
                    return []
                except redis.ResponseError as exc:
                    errors[sentinel.addr] = str(exc)
                    return [f"{sentinel.addr}: {exc}"]
                except redis.RedisError as exc:
                    errors[sentinel.addr] = str(exc)
            return [f"no sentinel reachable: {errors}"]

        if not self.sentinels:
            raise ClusterError("this topology has no sentinels")
        self._wait(ask, timeout, f"a sentinel to accept SENTINEL FAILOVER {name}")
        result: list[str] = []

        def problems() -> list[str]:
            reported = self.sentinel_master_addr(name)
            if None in reported or len(set(reported)) != 1 or reported[0] in before:
                return [f"sentinels report {name} at {reported} (was {sorted(before)})"]
            new = reported[0]
            assert new is not None
            host, port = _split_addr(new)
            try:
                with _connect(host, port, access=self.admin_access()) as c:
                    role = c.execute_command("ROLE")[0]
            except redis.RedisError as exc:
                return [f"{new}: {exc}"]
            if role != "master":
                return [f"{new} reports role {role}"]
            result[:] = [new]
            return []

        self._wait(problems, timeout, f"failover of {name}")
        return result[0]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until :meth:`healthy` would be true (e.g. after a failover or a restart).

        Raises:
            ClusterError: Not healthy within ``timeout``; the message lists what is not.
        """

        def problems() -> list[str]:
            dead = [p.addr for p in self.processes if self.pid(p) is None]
            return [f"not running: {', '.join(dead)}"] if dead else self._problems()

        self._wait(problems, timeout, "the topology to become healthy")

    # ------------------------------------------------------------------ topology file

    def _read_topology(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.topology_path.read_text())
        except (OSError, ValueError):
            return None
        return data

    def _write_topology(self, data: dict[str, Any]) -> None:
        tmp = self.topology_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.topology_path)


def format_status(status: dict[str, Any]) -> str:
    """Render :meth:`LocalCluster.status` as a table for ``presence-gateway cluster status``.

    Args:
        status: The dict returned by :meth:`LocalCluster.status`.

    Returns:
        Multi-line text, without a trailing newline.
    """
    head = "healthy" if status.get("healthy") else "NOT healthy"
    lines = [f"cluster {status.get('cluster')} in {status.get('dir')}: {head}"]
    rows = [("ROLE", "SHARD", "ADDR", "PID", "STATE", "REPORTS")]
    for p in status.get("processes", []):
        if p.get("stopped"):
            state = "stopped"
        else:
            state = "up" if p.get("reachable") else ("alive" if p.get("alive") else "down")
        if p["role"] == "sentinel" and "masters" in p:
            reports = " ".join(f"{n}={a or '?'}" for n, a in p["masters"].items())
        elif p.get("reported_role") == "replica":
            reports = f"replica of {p.get('master')} (link {p.get('link')})"
        else:
            reports = p.get("reported_role") or "-"
        shard = "-" if p.get("shard") is None else str(p["shard"])
        pid = "-" if p.get("pid") is None else str(p["pid"])
        rows.append((p["role"], shard, p["addr"], pid, state, reports))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:5], widths, strict=True)]
        lines.append("  ".join([*cells, row[5]]).rstrip())
    lines += [f"  problem: {p}" for p in status.get("problems", [])]
    return "\n".join(lines)
