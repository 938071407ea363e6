"""Runs every benchmark and prints the ratios measured in this run.

Usage: python bench/run.py [--quick]

* native: tag + slot + RESP packing per operation, native module vs the pure-Python reference;
* store: verified writes/s through the gateway's shard client vs raw pipelined HSET measured by
  redis-benchmark on the same server;
* frontdoor: fan-out deliveries/s and server CPU per delivery of the one-port front door vs a
  bare websockets + uvloop broadcast server;
* gateway: end to end through a gateway node (Redis, Pub/Sub, HTTP API): fan-out deliveries/s
  and presence joins+leaves/s vs a bare websockets + uvloop broadcast/echo server;
* peer: vs sockudo (two nodes each): KiB per idle connection, presence joins/s, fan-out
  deliveries/s, GET users latency across two nodes (plot: bench/results/peer_latency.png) and
  the load-test scenarios of ``loadtests/`` (churn, fan-out, read API) run by locust against
  both (CSVs in bench/results/locust-*/). The peer binary comes from
  ``scripts/install-sockudo.sh`` (``make peer``); without it the peer's side is skipped;
* soak: presence churn, fan-out and API reads at fixed rates for 20 minutes (2 with
  ``--quick``) on two nodes, sampling node RSS, Redis ``used_memory`` and keys every 10 s;
  the slope of each after the warm-up, in % per 10 minutes (target: below 1 %);
* capacity: one node each (ours, sockudo on its local and on its redis adapter) holding
  15 000 presence connections (2 000 with ``--quick``; fewer if the open-file limit does not
  allow them): connect + subscribe rate, node RSS per connection, Redis bytes per member, idle
  CPU, and delivery latency of events that reach every connection;
* joins: presence joins+leaves per second on ONE node each (ours, sockudo local and redis),
  with clients light enough that the servers are measured; node and Redis CPU per operation;
* storm: kill -9 of a node holding 6 000 presence users (1 000 with ``--quick``) who rejoin the
  other node after a random 0-1 s delay, ours vs sockudo on Redis (two nodes each): seconds
  until all are back, join and delivery latency during the storm, false ``member_removed``,
  ``GET users`` exactness after it, and (ours) the margin before the dead node is reaped.

Figures are also written to bench/results/*.json (ignored by git) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    """Run the benchmarks in sequence; return non-zero if one of them failed."""
    parser = argparse.ArgumentParser(description="run all benchmarks")
    parser.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    args = parser.parse_args()
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}"
    )
    runs = [
        [
            "bench_native.py",
            *(["--ops", "20000"] if args.quick else []),
            "--json",
            str(results / "native.json"),
        ],
        [
            "bench_store.py",
            *(["--ops", "50000", "--rounds", "1"] if args.quick else []),
            "--json",
            str(results / "store.json"),
        ],
        [
            "bench_frontdoor.py",
            *(["--clients", "100", "--messages", "500"] if args.quick else []),
            "--json",
            str(results / "frontdoor.json"),
        ],
        [
            "bench_gateway.py",
            *(["--clients", "50", "--events", "200", "--cycles", "20"] if args.quick else []),
            "--json",
            str(results / "gateway.json"),
        ],
        [
            "bench_peer.py",
            *(["--quick"] if args.quick else []),
            "--json",
            str(results / "peer.json"),
            "--plot",
            str(results / "peer_latency.png"),
        ],
        [
            "bench_soak.py",
            *(["--duration", "120", "--warmup", "40"] if args.quick else []),
            "--json",
            str(results / "soak.json"),
        ],
        [
            "bench_capacity.py",
            *(["--quick"] if args.quick else []),
            "--json",
            str(results / "capacity.json"),
        ],
        [
            "bench_joins.py",
            *(["--quick"] if args.quick else []),
            "--json",
            str(results / "joins.json"),
        ],
        [
            "bench_storm.py",
            *(["--quick"] if args.quick else []),
            "--json",
            str(results / "storm.json"),
        ],
    ]
    status = 0
    for script, *rest in runs:
        print(f"\n== {script} ==", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / script), *rest])
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
