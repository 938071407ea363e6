"""A reconnect storm (``bench/bench_storm.py``, our side only, 1 500 users): the node holding
them is killed with SIGKILL and they rejoin the other node after a random 0-1 s delay.

Invariants: every user comes back; no member is announced gone while it is subscribed again
(the dead node's entries are reaped after the users returned, so the watchers see neither
``member_removed`` nor ``member_added``); the surviving node's existing clients lose nothing
(every event published during the storm reaches them); ``GET users`` lists exactly the
channel's users once the dead node is reaped. The figures (seconds until all back, latencies,
reap margin) are printed (``-s``); ``make bench`` runs 6 000 users against sockudo too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_storm  # noqa: E402
from bench_peer import Ours, Procs  # noqa: E402

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]


def test_reconnect_storm_loses_no_member_and_announces_no_false_leave() -> None:
    opts = argparse.Namespace(users=1500, watchers=5, procs=2, rate=4.0)
    workdir = Path(tempfile.mkdtemp(prefix="pg-storm-test-"))
    fig = bench_storm.run_side(Ours(workdir, Procs(workdir), nodes=2), opts)
    print(f"\n{bench_storm.report([fig])}")
    print(f"STORM {json.dumps({k: v for k, v in fig.items() if k != 'users_series'})}")
    assert fig["held_users"] == 1500 and fig["held_watchers"] == fig["watchers"]
    assert fig["back"] == 1500, fig["failed_attempts"]
    assert fig["member_removed_while_back"] == 0, fig["false_removal_examples"]
    assert fig["watchers_lost"] == 0
    assert fig["publish_errors"] == []
    assert fig["deliveries"] == fig["deliveries_expected"]
    # The dead node's entries were reaped (the margin is a figure, printed above) and every
    # channel's roster is exact from then on, never short of a member that came back.
    assert fig["reap_s"] is not None
    assert fig["users_fewer_after_back"] == 0, fig["users_series"]
    assert fig["users_exact_settled"] and fig["users_exact_at_end"], fig["users_series"]
