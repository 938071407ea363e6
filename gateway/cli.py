"""The ``presence-gateway`` command: dev, serve, cluster, shards."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway import __version__
from gateway.config import ConfigError, NodeConfig, load_apps_file, load_config, parse_app
from gateway.shards.topology import TopologyConfig, TopologyError, load_topology

__all__ = ["main"]


def _cluster_args(p: argparse.ArgumentParser, *, dir_default: str | None = None) -> None:
    p.add_argument(
        "--dir",
        required=dir_default is None,
        default=dir_default,
        help="working directory for configs, logs, pids and topology.json",
    )
    p.add_argument("--shards", type=int, default=2, help="number of shards (default 2)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per shard (default 1)")
    p.add_argument("--sentinels", type=int, default=3, help="number of Sentinels (default 3)")
    p.add_argument("--base-port", type=int, default=7100, help="first port used (default 7100)")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="TOML file with [node] and [[apps]] tables")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 6001)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve wss:// and https://")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="also serve /metrics and the probes on this port (and /metrics only there)",
    )
    p.add_argument("--node-id", default=None, help="stable node name (default host-pid)")
    p.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="ID:KEY:SECRET",
        help="serve this app (repeatable); default app 1:app-key:app-secret",
    )
    p.add_argument(
        "--webhook-url", default=None, help="webhook URL for every app that has none configured"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="presence-gateway",
        description="Pusher-compatible WebSocket gateway with verified, sharded presence state.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"presence-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="local topology + shards init + one gateway node")
    _cluster_args(dev, dir_default=".work/dev")
    _serve_args(dev)

    serve = sub.add_parser("serve", help="run one gateway node")
    serve.add_argument(
        "--topology",
        default=None,
        help="topology.json (from cluster up); or GATEWAY_TOPOLOGY / [node] topology",
    )
    _serve_args(serve)

    cluster = sub.add_parser("cluster", help="local Redis topology (masters, replicas, Sentinels)")
    csub = cluster.add_subparsers(dest="action", required=True)
    for action in ("up", "down", "status"):
        p = csub.add_parser(action, help=f"{action} the local topology")
        _cluster_args(p)
        if action == "up":
            p.add_argument(
                "--secure",
                action="store_true",
                help="TLS only and ACL users on every server and Sentinel (certificates and "
                "passwords in DIR/tls and DIR/secrets)",
            )

    shards = sub.add_parser("shards", help="shard administration")
    ssub = shards.add_subparsers(dest="action", required=True)
    init = ssub.add_parser("init", help="write shard identities and load the function library")
    init.add_argument("--topology", required=True, help="topology.json")
    init.add_argument(
        "--force",
        action="store_true",
        help="overwrite different existing identities (new topology epoch)",
    )
    apps = sub.add_parser("apps", help="apps files")
    asub = apps.add_subparsers(dest="action", required=True)
    check = asub.add_parser(
        "check", help="validate an apps file (as a node would on reload); exit 2 if refused"
    )
    check.add_argument("file", help="TOML file of [[apps]] tables")
    audit = sub.add_parser(
        "audit",
        help="report wrong-shard keys, dead owners, mismatches, keys without expiry, memory",
    )
    audit.add_argument("--topology", required=True, help="topology.json")
    audit.add_argument("--json", action="store_true", help="machine-readable output")
    audit.add_argument("--repair", action="store_true", help="fix what is reported")
    audit.add_argument(
        "--ttl-ms", type=int, default=300_000, help="expiry given to entries (default 300000)"
    )
    return parser


def _audit(args: argparse.Namespace) -> int:
    import uvloop

    from gateway.store.audit import format_report, run_audit

    topo = load_topology(args.topology)
    reports = uvloop.run(run_audit(topo, repair=args.repair, ttl_ms=args.ttl_ms))
    print(format_report(reports, as_json=args.json))
    if args.repair:
        after = uvloop.run(run_audit(topo))
        left = sum(r.problems for r in after)
        if not args.json:
            print(f"after repair: {left} problem(s)")
        return 1 if left else 0
    return 1 if any(r.problems for r in reports) else 0


def _node_config(args: argparse.Namespace, topology: str | None) -> NodeConfig:
    return load_config(
        args.config,
        overrides={
            "host": args.host,
            "port": args.port,
            "admin_port": args.admin_port,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "node_id": args.node_id,
            "topology": topology,
            "apps": tuple(parse_app(a) for a in args.app),
            "webhook_url": args.webhook_url,
        },
    )


def _local_cluster(args: argparse.Namespace) -> object:
    from gateway.localcluster import TOPOLOGY_FILE, LocalCluster

    if getattr(args, "action", "up") != "up" and (Path(args.dir) / TOPOLOGY_FILE).exists():
        return LocalCluster.from_dir(Path(args.dir))  # as it was started (secure or not)
    return LocalCluster(
        Path(args.dir),
        shards=args.shards,
        replicas=args.replicas,
        sentinels=args.sentinels,
        base_port=args.base_port,
        secure=getattr(args, "secure", False),
    )


def _run_serve(
    config: NodeConfig,
    topology: TopologyConfig,
    *,
    verbose: bool = False,
    reload: Callable[[], NodeConfig] | None = None,
    config_path: str | None = None,
) -> None:
    import uvloop

    from gateway import logs
    from gateway.server.node import run_node
    from gateway.server.reload import AppsSource

    logs.setup("debug" if verbose else config.log_level, config.log_format, config.node_id)
    apps = None
    if reload is not None:
        paths = tuple(p for p in (config_path, config.apps_file) if p)
        apps = AppsSource(reload, paths)

    # run_node handles SIGINT/SIGTERM itself; KeyboardInterrupt can only come before that.
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run_node(config, topology, apps))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``presence-gateway``; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "cluster":
            from gateway.localcluster import LocalCluster, format_status

            lc = _local_cluster(args)
            assert isinstance(lc, LocalCluster)
            if args.action == "up":
                print(json.dumps(lc.up(), indent=2))
            elif args.action == "down":
                lc.down()
            else:
                print(format_status(lc.status()))
            return 0
        if args.command == "shards":
            from gateway.shards.admin import init_shards

            topo = load_topology(args.topology)
            for ident in init_shards(topo, force=args.force):
                print(
                    f"{ident.name}: index {ident.index}, uuid {ident.uuid}, "
                    f"epoch {ident.epoch}, slots {ident.slots}"
                )
            return 0
        if args.command == "serve":
            config = _node_config(args, args.topology)
            if config.topology is None:
                raise ConfigError("topology: give --topology, GATEWAY_TOPOLOGY or [node] topology")
            _run_serve(
                config,
                load_topology(config.topology),
                verbose=args.verbose,
                reload=lambda: _node_config(args, args.topology),
                config_path=args.config,
            )
            return 0
        if args.command == "apps":
            apps = load_apps_file(args.file)
            print(f"{args.file}: {len(apps)} apps, ids {', '.join(a.id for a in apps)}")
            return 0
        if args.command == "dev":
            return _dev(args)
        if args.command == "audit":
            return _audit(args)
    except (ConfigError, TopologyError) as exc:
        print(f"presence-gateway: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"presence-gateway: {exc}", file=sys.stderr)
        return 1
    return 2


def _dev(args: argparse.Namespace) -> int:
    from gateway.localcluster import LocalCluster
    from gateway.shards.admin import init_shards

    lc = _local_cluster(args)
    assert isinstance(lc, LocalCluster)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    topology_file = Path(args.dir) / "topology.json"
    try:
        lc.up()
        topo = load_topology(topology_file)
        init_shards(topo)
        config = _node_config(args, str(topology_file))
        app = config.apps[0]
        print(
            f"presence-gateway dev: ws://{config.host}:{config.port}/app/{app.key} "
            f"(app id {app.id}, secret {app.secret}); topology {topology_file}; Ctrl-C stops",
            flush=True,
        )
        _run_serve(
            config,
            topo,
            verbose=args.verbose,
            reload=lambda: _node_config(args, str(topology_file)),
            config_path=args.config,
        )
    finally:
        lc.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
