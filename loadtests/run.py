"""Run one locust scenario headless against a gateway started for the run, on loopback only.

Usage (from the repository root)::

    .venv/bin/python -m loadtests.run --scenario fanout [--users 50] [--spawn-rate 10]
        [--duration 20] [--nodes 1] [--out .work/load]

What it does, in order, and undoes in reverse whatever happens:

1. starts a local Redis topology (2 shards, 1 replica each, 3 Sentinels) in a temporary
   directory on a free port range (:class:`gateway.localcluster.LocalCluster`) and writes the
   shard identities (``init_shards``); ``--topology FILE`` uses an existing topology instead;
2. starts ``--nodes`` gateway nodes (``python -m gateway serve``) on free ports of 127.0.0.1
   and waits for their ``/health``; ``--host URL`` skips steps 1-2 and uses a running gateway;
3. runs ``locust -f loadtests/locustfile.py --headless -u N -r R -t Ts --csv OUT/<scenario>``
   with the scenario's user classes (bounded: at most 500 users and 600 s);
4. prints a summary from ``OUT/<scenario>_final_stats.csv``: requests/s, p50/p99 and failures per
   request name, plus the fan-out tallies; then stops the nodes and the topology.

Files in ``--out``: ``<scenario>_final_stats.csv`` (final figures), ``_stats.csv`` (locust's,
without the last second), ``_stats_history.csv``, ``_failures.csv``,
``_exceptions.csv`` (locust's), ``<scenario>_counters.json``, ``locust.log`` and
``node-<i>.log``. Exit status 0 when requests were made and none failed, else 1.

Scenarios: ``idle`` (IdleUser), ``churn`` (PresenceChurnUser), ``client-events``
(ClientEventUser), ``fanout`` (FanoutSubscriber + HttpPublisher), ``read`` (ReadApiUser +
IdleUser), ``all`` (every class).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"

#: Scenario name -> locust user classes.
SCENARIOS: dict[str, list[str]] = {
    "idle": ["IdleUser"],
    "churn": ["PresenceChurnUser"],
    "client-events": ["ClientEventUser"],
    "fanout": ["FanoutSubscriber", "HttpPublisher"],
    "read": ["IdleUser", "ReadApiUser"],
    "all": [
        "IdleUser",
        "PresenceChurnUser",
        "ClientEventUser",
        "FanoutSubscriber",
        "HttpPublisher",
        "ReadApiUser",
    ],
}
MAX_USERS = 500
MAX_DURATION = 600
APP = ("1", "app-key", "app-secret")


@dataclass
class Row:
    """One line of locust's ``_stats.csv``."""

    type: str
    name: str
    requests: int
    failures: int
    rps: float
    p50: float
    p99: float


@dataclass
class Summary:
    """What a run measured (parsed from the CSV files)."""

    scenario: str
    rows: list[Row] = field(default_factory=list)
    total: Row | None = None
    counters: dict[str, int] = field(default_factory=dict)
    exceptions: int = 0
    stats_csv: Path | None = None

    @property
    def ok(self) -> bool:
        """Requests were made and none failed."""
        return self.total is not None and self.total.requests > 0 and self.total.failures == 0

    def format(self) -> str:
        """Human-readable table."""
        lines = [
            f"{'type':<5} {'name':<32} {'requests':>9} {'fails':>6} {'req/s':>9} "
            f"{'p50 ms':>8} {'p99 ms':>8}"
        ]
        rows = [*self.rows, *([self.total] if self.total else [])]
        for r in rows:
            lines.append(
                f"{r.type:<5} {r.name[:32]:<32} {r.requests:>9} {r.failures:>6} {r.rps:>9.1f} "
                f"{r.p50:>8.0f} {r.p99:>8.0f}"
            )
        c = self.counters
        if c.get("fanout_triggered"):
            expected, received = c.get("fanout_expected", 0), c.get("fanout_received", 0)
            share = 100 * received / expected if expected else 0.0
            lines.append(
                f"fan-out: {c['fanout_triggered']} triggers, {received} deliveries of "
                f"{expected} expected ({share:.1f} %), {c.get('fanout_gaps', 0)} missed in gaps"
            )
        if self.exceptions:
            lines.append(f"task exceptions: {self.exceptions} (see the _exceptions.csv file)")
        return "\n".join(lines)


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0


def read_summary(scenario: str, prefix: Path) -> Summary:
    """Parse ``<prefix>_final_stats.csv`` (else ``_stats.csv``), ``_exceptions.csv`` and
    ``_counters.json``."""
    final = Path(f"{prefix}_final_stats.csv")
    summary = Summary(scenario, stats_csv=final if final.exists() else Path(f"{prefix}_stats.csv"))
    if summary.stats_csv and summary.stats_csv.exists():
        with summary.stats_csv.open(newline="") as f:
            for rec in csv.DictReader(f):
                row = Row(
                    rec["Type"],
                    rec["Name"],
                    int(_number(rec["Request Count"])),
                    int(_number(rec["Failure Count"])),
                    _number(rec["Requests/s"]),
                    _number(rec["50%"]),
                    _number(rec["99%"]),
                )
                if rec["Name"] == "Aggregated":
                    summary.total = row
                else:
                    summary.rows.append(row)
    exceptions = Path(f"{prefix}_exceptions.csv")
    if exceptions.exists():
        with exceptions.open(newline="") as f:
            summary.exceptions = sum(int(_number(r.get("Count", "0"))) for r in csv.DictReader(f))
    counters = Path(f"{prefix}_counters.json")
    if counters.exists():
        summary.counters = json.loads(counters.read_text())
    return summary


# ------------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGINT (the gateway drains), then SIGKILL after ``timeout``; only this process."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def start_topology(stack: contextlib.ExitStack) -> Path:
    """Start a LocalCluster in a temp dir, init its shards; returns ``topology.json``."""
    from gateway.localcluster import LocalCluster, PortInUseError, find_free_port_range
    from gateway.shards.admin import init_shards
    from gateway.shards.topology import load_topology

    workdir = Path(tempfile.mkdtemp(prefix="pg-load-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    for attempt in range(3):
        cluster = LocalCluster(workdir / f"cluster-{attempt}", base_port=find_free_port_range(7))
        try:
            cluster.up()
        except PortInUseError:
            cluster.down()
            continue
        except BaseException:
            cluster.down()
            raise
        stack.callback(cluster.down)
        init_shards(load_topology(cluster.topology_path))
        return cluster.topology_path
    raise RuntimeError("could not start a local topology (ports kept being taken)")


def start_nodes(stack: contextlib.ExitStack, topology: Path, count: int, out: Path) -> list[str]:
    """Start ``count`` gateway nodes on free loopback ports; returns their base URLs."""
    from gateway.localcluster import LOOPBACK_LOAD_ENV

    urls = []
    for i in range(count):
        port = _free_port()
        log = stack.enter_context((out / f"node-{i}.log").open("wb"))
        args = [sys.executable, "-m", "gateway", "serve", "--topology", str(topology),
                "--host", "127.0.0.1", "--port", str(port), "--node-id", f"load-{i}",
                "--app", ":".join(APP)]  # fmt: skip
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **LOOPBACK_LOAD_ENV},
        )
        stack.callback(_stop, proc)
        deadline = time.monotonic() + 30
        while not _healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway node {i} did not become healthy; see {log.name}")
            time.sleep(0.2)
        urls.append(f"http://127.0.0.1:{port}")
    return urls


def run_locust(
    scenario: str, hosts: list[str], users: int, spawn_rate: float, duration: int, out: Path,
    env_extra: dict[str, str] | None = None,
) -> Summary:  # fmt: skip
    """Run locust headless as a subprocess (bounded by ``duration + 60`` s); parse results."""
    prefix = out / scenario
    classes = SCENARIOS[scenario]
    env = dict(os.environ)
    env.update(
        PG_LOAD_HOSTS=",".join(hosts),
        PG_LOAD_APP=":".join(APP),
        PG_LOAD_COUNTERS=f"{prefix}_counters.json",
    )
    env.setdefault("PG_LOAD_ACTIVITY_TIMEOUT", "5")
    helpers = max(1, users // 10)
    if "HttpPublisher" in classes and len(classes) > 1:
        env.setdefault("PG_LOAD_PUBLISHERS", str(helpers))
    if "ReadApiUser" in classes and len(classes) > 1:
        env.setdefault("PG_LOAD_READERS", str(helpers))
    env.update(env_extra or {})
    args = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", str(users), "-r", str(spawn_rate), "-t", f"{duration}s",
            "--csv", str(prefix), "--host", hosts[0], "--only-summary",
            "--loglevel", "WARNING", *classes]  # fmt: skip
    with (out / "locust.log").open("wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return read_summary(scenario, prefix)


def run(
    scenario: str,
    *,
    users: int = 50,
    spawn_rate: float = 10,
    duration: int = 20,
    nodes: int = 1,
    out: Path,
    host: str | None = None,
    topology: Path | None = None,
    env_extra: dict[str, str] | None = None,
) -> Summary:
    """Start what is needed, run the scenario, stop everything started; return the summary."""
    from loadtests.hosts import check_loopback

    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    if not 1 <= users <= MAX_USERS:
        raise ValueError(f"--users must be 1..{MAX_USERS}, got {users}")
    if not 1 <= duration <= MAX_DURATION:
        raise ValueError(f"--duration must be 1..{MAX_DURATION} s, got {duration}")
    if not 1 <= nodes <= 4:
        raise ValueError(f"--nodes must be 1..4, got {nodes}")
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if host is not None:
            problem = check_loopback(host)
            if problem:
                raise ValueError(problem)
            hosts = [host.rstrip("/")]
        else:
            topo = topology if topology is not None else start_topology(stack)
            if topology is not None:
                from gateway.shards.admin import init_shards
                from gateway.shards.topology import load_topology

                init_shards(load_topology(topology))
            hosts = start_nodes(stack, topo, nodes, out)
        return run_locust(scenario, hosts, users, spawn_rate, duration, out, env_extra)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; exit status 0 when requests were made and none failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="all")
    parser.add_argument("--users", type=int, default=50, help="peak users (default 50)")
    parser.add_argument("--spawn-rate", type=float, default=10, help="users started per second")
    parser.add_argument("--duration", type=int, default=20, help="seconds (default 20)")
    parser.add_argument("--nodes", type=int, default=1, help="gateway nodes to start (1-4)")
    parser.add_argument("--out", type=Path, default=ROOT / ".work" / "load")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--host", help="use this running gateway (loopback) instead")
    where.add_argument("--topology", type=Path, help="start nodes on this existing topology")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        summary = run(
            args.scenario,
            users=args.users,
            spawn_rate=args.spawn_rate,
            duration=args.duration,
            nodes=args.nodes,
            out=args.out,
            host=args.host,
            topology=args.topology,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(
        f"scenario {args.scenario}: {args.users} users, {args.duration} s, "
        f"{'given host' if args.host else f'{args.nodes} node(s)'}; "
        f"wall time {time.monotonic() - started:.0f} s"
    )
    print(summary.format() if summary.total else "no results (see locust.log)")
    print(f"CSV: {summary.stats_csv}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
