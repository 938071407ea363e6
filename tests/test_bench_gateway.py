"""The end-to-end benchmark (``bench/bench_gateway.py``) with small counts: every scenario runs
to the end against a real node and topology, and the app with a webhook endpoint gets exactly
the webhooks its churn and its client events should send. Figures are printed (``-s``), never
judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.timeout(300)]


def test_the_gateway_benchmark_runs_and_its_webhooks_all_arrive(tmp_path: Path) -> None:
    out = tmp_path / "gateway.json"
    args = ["--clients", "5", "--events", "20", "--churn-clients", "5", "--cycles", "3"]
    args += ["--ce-pairs", "3", "--ce-events", "50"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gateway.py"), *args, "--json", str(out)],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    print(done.stdout)
    figures = json.loads(out.read_text())
    # Two runs of 5 users on 5 channels: each user's first member_added and last
    # member_removed, each channel's occupied and vacated; the leaves followed by a rejoin
    # within the hold send nothing. Fewer would be a lost webhook, more a duplicate.
    assert figures["webhook_events_expected"] == 40
    assert figures["webhook_events_delivered"] == 40
    # Every client event of the app with an endpoint, two runs of 3 channels x 50, once each.
    assert figures["client_event_webhooks_expected"] == 300
    assert figures["client_event_webhooks_delivered"] == 300
    for name in (
        "fanout_gateway",
        "churn_gateway",
        "churn_webhooks",
        "churn_no_webhooks",
        "client_events_webhooks",
        "client_events_no_webhooks",
    ):
        assert figures[name] > 0, name
