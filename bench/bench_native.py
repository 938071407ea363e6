"""Per-operation cost of native ``build_batches`` (slot + tag + pack) against the Python reference.

Usage: ``python bench/bench_native.py [--ops N] [--batch B] [--repeats R] [--shards S] [--group G]``

The ops are presence-like: ``hset`` of ``node-a/user-<n>`` with a ~60-byte JSON value on keys
``{1:presence-room-<n>}:pres``, spread over ``S`` shards. The writer calls ``build_batches`` once
per event-loop tick with the writes it has just built, so the main figure feeds the ``N`` ops in
calls of ``B`` ops, each call's ops created right before it (untimed). Two more figures reuse ops
built once (in calls of ``B``, and all ``N`` in one call); their objects are cold in the CPU
cache, which costs the native side a visible share. Each side runs ``R`` times and the best run
counts (the least disturbed by the machine). Both sides' payloads are checked equal first.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway import _native as native
from gateway.shards import reference as ref

Op = tuple[bytes, bytes, Sequence[bytes]]


def make_ops(n: int, start: int = 0, rooms: int | None = None) -> list[Op]:
    """``n`` presence-like ``hset`` ops (users ``start``...) over ``rooms`` rooms (``n // 4``)."""
    rooms = rooms or max(1, n // 4)
    ops: list[Op] = []
    for i in range(start, start + n):
        value = json.dumps(
            {"user_id": f"user-{i}", "user_info": {"name": f"Member {i}"}},
            separators=(",", ":"),
        ).encode()
        field = f"node-a/user-{i}".encode()
        ops.append(
            (b"hset", f"{{1:presence-room-{i % rooms}}}:pres".encode(), (field, value, b"0"))
        )
    return ops


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def best_time_fresh(fn: Callable[[list[Op]], object], n: int, batch: int, repeats: int) -> float:
    """Best of ``repeats`` totals of timing ``fn`` on ops built just before each call (untimed),
    as the writer builds a tick's ops right before packing them; in seconds."""
    best = float("inf")
    rooms = max(1, n // 4)
    for _ in range(repeats):
        total = 0.0
        for first in range(0, n, batch):
            ops = make_ops(min(batch, n - first), first, rooms)
            start = time.perf_counter()
            fn(ops)
            total += time.perf_counter() - start
        best = min(best, total)
    return best


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the benchmark and prints per-op costs and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20_000, help="ops per run (default 20000)")
    parser.add_argument(
        "--batch", type=int, default=256, help="ops per build_batches call (default 256)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="runs per side (default 7)")
    parser.add_argument("--shards", type=int, default=2, help="shards (default 2)")
    parser.add_argument("--group", type=int, default=128, help="ops per FCALL (default 128)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.ops, args.batch, args.repeats, args.shards, args.group) < 1:
        parser.error("--ops, --batch, --repeats, --shards and --group must be >= 1")

    uuids = [f"{i:032x}" for i in range(args.shards)]
    nat_table = native.SlotTable.even(1, uuids)
    ref_table = ref.SlotTable.even(1, uuids)
    ops = make_ops(args.ops)

    got = native.build_batches(nat_table, ops, group=args.group)
    want = ref.build_batches(ref_table, ops, group=args.group)
    assert [b.payload for b in got] == [b.payload for b in want], "payloads differ"
    value_len = sum(len(op[2][1]) for op in ops) // len(ops)
    payload_len = sum(len(b.payload) for b in got)

    chunks = [ops[i : i + args.batch] for i in range(0, len(ops), args.batch)]

    def run_native() -> None:
        for chunk in chunks:
            native.build_batches(nat_table, chunk, group=args.group)

    def run_ref() -> None:
        for chunk in chunks:
            ref.build_batches(ref_table, chunk, group=args.group)

    print(
        f"build_batches: {args.ops} hset ops (value ~{value_len} B, "
        f"{payload_len / args.ops:.0f} payload B/op), {args.shards} shards, group {args.group}, "
        f"best of {args.repeats}"
    )
    figures = (
        (
            f"fresh calls of {args.batch}",
            best_time_fresh(
                lambda o: native.build_batches(nat_table, o, group=args.group),
                args.ops,
                args.batch,
                args.repeats,
            ),
            best_time_fresh(
                lambda o: ref.build_batches(ref_table, o, group=args.group),
                args.ops,
                args.batch,
                args.repeats,
            ),
        ),
        (
            f"calls of {args.batch}",
            best_time(run_native, args.repeats),
            best_time(run_ref, args.repeats),
        ),
        (
            f"one call of {args.ops}",
            best_time(lambda: native.build_batches(nat_table, ops, group=args.group), args.repeats),
            best_time(lambda: ref.build_batches(ref_table, ops, group=args.group), args.repeats),
        ),
    )
    rows = []
    for label, t_native, t_ref in figures:
        per_native = t_native / args.ops * 1e9
        per_ref = t_ref / args.ops * 1e9
        rows.append(
            {
                "case": label,
                "native_ns_per_op": round(per_native, 1),
                "reference_ns_per_op": round(per_ref, 1),
                "ratio": round(per_ref / per_native, 1),
            }
        )
        print(
            f"  {label:>22}: native {per_native:7.1f} ns/op, reference {per_ref:7.1f} ns/op, "
            f"ratio {per_ref / per_native:5.1f}x"
        )
    print(
        "  (fresh: each call's ops are built just before it, untimed, as in the writer; the "
        "others reuse ops built once, so their objects are cold in the CPU cache)"
    )
    if args.json:
        args.json.write_text(json.dumps({"ops": args.ops, "group": args.group, "rows": rows}))


if __name__ == "__main__":
    main()
