"""Verified writes per second through the gateway's shard client vs raw ``redis-benchmark``.

Starts a local topology (2 shards, 1 replica each, 3 Sentinels, loopback only), initialises the
shards, then measures on shard 0's master, in the same run:

* the baseline: ``redis-benchmark`` sending pipelined plain ``HSET`` of the same key, field and
  value shapes (no tag, no function call);
* ours: ``BatchWriter`` writes (tag verified inside ``FCALL pg_apply``), for several group
  sizes (operations per function call), all keys chosen to live on shard 0.

The two sides alternate for ``--rounds`` rounds and the best of each is compared, so that noise
from other work on the machine does not favour either. Prints writes/s and the ratio. Every
loop is bounded by its count.

Usage: python bench/bench_store.py [--ops N] [--rounds R] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from gateway._native import key_slot
from gateway.localcluster import LocalCluster, find_free_port_range
from gateway.shards.admin import init_shards
from gateway.shards.shardset import ShardSet
from gateway.shards.topology import load_topology
from gateway.shards.writer import BatchWriter

VALUE = b"v" * 16


def redis_benchmark(addr: str, ops: int, *, clients: int = 8, pipeline: int = 128) -> float:
    """Raw pipelined HSET writes/s reported by ``redis-benchmark``."""
    host, _, port = addr.rpartition(":")
    cmd = [
        "redis-benchmark", "-h", host, "-p", port, "-n", str(ops), "-c", str(clients),
        "-P", str(pipeline), "-r", "100000", "--csv",
        "HSET", "{1:presence-room-__rand_int__}:pres", "node-a/user-__rand_int__", VALUE.decode(),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    rows = [line for line in out.splitlines() if line.startswith('"HSET')]
    if not rows:
        raise RuntimeError(f"unexpected redis-benchmark output: {out!r}")
    return float(re.findall(r'"([0-9.]+)"', rows[-1])[0])


def shard0_ops(n: int) -> list[tuple[bytes, bytes, list[bytes]]]:
    """``n`` HSET ops whose keys all hash to shard 0 (slots 0..8191)."""
    ops = []
    i = 0
    while len(ops) < n:
        i += 1
        key = f"{{1:presence-room-{i % 100_000}}}:pres".encode()
        if key_slot(key) < 8192:
            ops.append((b"hset", key, [f"node-a/user-{i}".encode(), VALUE, b"0"]))
    return ops


async def gateway_writes(
    topology_file: Path, ops: list[tuple[bytes, bytes, list[bytes]]], *, group: int
) -> float:
    """Verified writes/s through ShardSet + BatchWriter, ``chunk`` ops per submit, 8 in flight."""
    shards = ShardSet(load_topology(topology_file))
    writer = BatchWriter(shards, group=group)
    await shards.start()
    await shards.wait_ready(10)
    writer.start()
    chunk = 1024
    in_flight = 8
    try:
        start = time.perf_counter()
        pending: set[asyncio.Future[list[object]]] = set()
        for i in range(0, len(ops), chunk):
            pending.add(writer.submit_many(ops[i : i + chunk]))
            if len(pending) >= in_flight:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    bad = [r for r in fut.result() if isinstance(r, BaseException)]
                    if bad:
                        raise RuntimeError(f"write failed: {bad[0]!r}")
        if pending:
            await asyncio.gather(*pending)
        elapsed = time.perf_counter() - start
    finally:
        await writer.close()
        await shards.close()
    return len(ops) / elapsed


GROUPS = (1, 16, 128, 512)


def run(ops: int, rounds: int = 3) -> dict[str, Any]:
    """Start a topology, measure, stop it; returns the figures."""
    if shutil.which("redis-benchmark") is None:
        raise SystemExit("redis-benchmark not found: run `make setup` (installs redis-tools)")
    workdir = Path(tempfile.mkdtemp(prefix="pg-bench-"))
    cluster = LocalCluster(workdir, base_port=find_free_port_range(16))
    try:
        cluster.up()
        topo = load_topology(cluster.topology_path)
        init_shards(topo)
        addr = cluster.masters()[0].addr
        workload = shard0_ops(ops)
        raws: list[float] = []
        ours: dict[int, list[float]] = {g: [] for g in GROUPS}
        # Alternate the two sides so that noise from other work on the machine hits both.
        for _ in range(rounds):
            raws.append(redis_benchmark(addr, ops))
            for group in GROUPS:
                n = ops if group > 1 else ops // 4
                rate = uvloop.run(gateway_writes(cluster.topology_path, workload[:n], group=group))
                ours[group].append(rate)
    finally:
        cluster.down()
        shutil.rmtree(workdir, ignore_errors=True)
    baseline = max(raws)
    best = {g: max(v) for g, v in ours.items()}
    return {
        "ops": ops,
        "rounds": rounds,
        "redis_benchmark_hset_per_s": [round(r) for r in raws],
        "verified_writes_per_s": {str(g): [round(r) for r in v] for g, v in ours.items()},
        "best_verified_writes_per_s_by_group": {str(g): round(v) for g, v in best.items()},
        "ratio_by_group": {str(g): round(v / baseline, 3) for g, v in best.items()},
        "ratio": round(best[128] / baseline, 3),
    }


def main() -> None:
    """Command-line entry: print the figures and the headline ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=400_000, help="writes per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (best taken)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    figures = run(args.ops, args.rounds)
    for group, rate in figures["best_verified_writes_per_s_by_group"].items():
        print(
            f"verified writes, {group:>3} ops per FCALL: {rate:>10,} /s   "
            f"ratio {figures['ratio_by_group'][group]:.3f}"
        )
    print(f"redis-benchmark pipelined HSET, each round: {figures['redis_benchmark_hset_per_s']}")
    print(f"verified writes vs raw HSET (group 128): {figures['ratio']:.3f}  (target >= 0.5)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
