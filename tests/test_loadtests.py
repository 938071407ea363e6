"""The locust load-test runner, end to end: a few users for a few seconds against a real node.

``loadtests/run.py`` starts its own local topology and gateway node, runs locust headless as a
subprocess and stops everything; this checks that its CSV results exist and hold requests
and no failures. The ``all`` scenario exercises every user class (connect, subscribe, presence
join/leave, client events, HTTP triggers and fan-out, the read API).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(
        shutil.which("redis-server") is None or shutil.which("redis-sentinel") is None,
        reason="redis-server / redis-sentinel not installed",
    ),
    pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed"),
]


def test_runner_all_scenario_few_users(tmp_path: Path) -> None:
    out = tmp_path / "load"
    # Run as a subprocess: importing locust here would gevent-patch the test process.
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.run", "--scenario", "all", "--users", "8",
         "--spawn-rate", "8", "--duration", "5", "--out", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    log = (out / "locust.log").read_text() if (out / "locust.log").exists() else ""
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{log}"
    for name in ("all_stats.csv", "all_final_stats.csv", "all_failures.csv"):
        assert (out / name).exists(), name
    with (out / "all_final_stats.csv").open(newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0, rows
    assert int(total["Failure Count"]) == 0, rows
    for name in ("connect", "presence join", "POST events", "GET channels"):
        assert int(rows[name]["Request Count"]) > 0, (name, rows)
    counters = json.loads((out / "all_counters.json").read_text())
    assert counters.get("fanout_gaps", 0) == 0, counters
    assert "Aggregated" in result.stdout
