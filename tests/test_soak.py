"""The soak (``bench/bench_soak.py``) for about a minute: churn, fan-out and API reads at fixed
rates on two nodes; every action succeeds, every event reaches its audience, and the shards'
keys do not accumulate with the channels that come and go. Memory slopes are printed (``-s``);
the 20-minute run of ``make bench`` judges them."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_soak  # noqa: E402

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(400)]


def test_a_minute_of_mixed_load_leaves_nothing_behind() -> None:
    # A short activity timeout: the server pings the audience (which must answer) in the run.
    figures = bench_soak.run(
        duration=60, sample_every=5, warmup=20, joins=20, events=10, reads=10, activity_timeout=10
    )
    print(f"\n{bench_soak.report(figures)}")
    print(f"SOAK {json.dumps({k: v for k, v in figures.items() if k != 'series'})}")
    tally = figures["tally"]
    assert tally["errors"] == []
    assert tally["join_failures"] == tally["event_failures"] == tally["read_failures"] == 0
    assert tally["audience_lost"] == 0 and tally["skipped"] == 0
    assert tally["joins"] == 20 * 60 and tally["events"] == 10 * 60 and tally["reads"] == 10 * 60
    assert tally["deliveries"] == tally["events"] * bench_soak.AUDIENCE // bench_soak.CHANNELS
    # Half the churned channels are new names: if their keys stayed behind, the key count
    # would grow by about 30 keys a second after the warm-up instead of staying level.
    series = figures["series"]
    early = statistics.median(s["redis_keys"] for s in series if 10 <= s["t"] <= 25)
    late = statistics.median(s["redis_keys"] for s in series if s["t"] >= 45)
    assert late <= early * 1.25 + 20, [s["redis_keys"] for s in series]
