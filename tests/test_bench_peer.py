"""The peer benchmark's own logic: sockudo's generated config, the report's target verdicts and
the plot, and (slow) a run of our side end to end.

The side-by-side run itself needs a sockudo binary (``make peer``) and is not part of the
tests; these make sure the parts it depends on do what BENCHMARKS.md says they do.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_peer  # noqa: E402


@pytest.mark.parametrize("adapter", ["redis", "local"])
def test_sockudo_config_is_loopback_and_has_the_app(adapter: str) -> None:
    config = tomllib.loads(bench_peer.sockudo_toml(7001, 7002, 7003, adapter))
    assert config["host"] == "127.0.0.1" and config["port"] == 7001
    assert config["metrics"]["host"] == "127.0.0.1" and config["metrics"]["port"] == 7002
    (app,) = config["app_manager"]["array"]["apps"]
    assert (app["id"], app["key"], app["secret"]) == ("1", "app-key", "app-secret")
    assert config["adapter"]["driver"] == adapter
    assert config["adapter"]["fallback_to_local"] is False
    # Clustered sockudo refuses a node-local cache.
    assert config["cache"]["driver"] == ("redis" if adapter == "redis" else "memory")
    assert config["database"]["redis"] == {"host": "127.0.0.1", "port": 7003}
    assert config["rate_limiter"]["enabled"] is False
    # sockudo cannot deserialize these maps from TOML and then ignores the WHOLE file.
    assert "redis_pub_options" not in config["adapter"]["redis"]
    assert "redis_sub_options" not in config["adapter"]["redis"]


def _users(p99s: list[float], fresh: bool) -> list[dict[str, Any]]:
    return [
        {"concurrency": c, "fresh_connections": fresh, "connects_per_request": 1.0 if fresh else 0,
         "requests": 100, "p50_ms": p99 / 2, "p99_ms": p99, "rps": 1000.0 * c, "wrong_answers": 0}
        for c, p99 in zip((1, 4), p99s, strict=True)
    ]  # fmt: skip


def _side(kib: float, joins: float, fanout: float, p99s: list[float]) -> dict[str, Any]:
    return {
        "nodes": 2,
        "note": "",
        "memory": {"kib_per_connection": kib, "held": 10, "connections": 10,
                   "rss_before_kib": 1000, "rss_after_kib": 1000 + int(10 * kib)},
        "joins_per_s": joins,
        "fanout_per_s": fanout,
        "users": {"levels": _users(p99s, False) + _users(p99s, True), "settle_s": 0.1},
        "locust": {"churn": {"rows": [{"type": "WS", "name": "presence join", "requests": 9,
                                       "failures": 0, "rps": 3.0, "p50": 2.0, "p99": 5.0}],
                             "total": None, "counters": {}, "exceptions": 0}},
    }  # fmt: skip


def _report(tmp_path: Path, ours: dict[str, Any], peer: dict[str, Any]) -> str:
    saved = tmp_path / "peer.json"
    settings = {"connections": 10, "fanout_clients": 2, "events": 3, "churn_clients": 2,
                "cycles": 3, "members": 4, "levels": [1, 4], "requests": 100,
                "locust": ["churn"], "locust_users": 2, "locust_duration": 1}  # fmt: skip
    saved.write_text(json.dumps({"ours": ours, "sockudo": peer, "settings": settings}))
    plot = tmp_path / "latency.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_peer.py"), "--from-json", str(saved),
         "--plot", str(plot)],
        check=True, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result.stdout


def _verdict(report: str, measure: str) -> list[str]:
    return [line.rsplit("|", 1)[1].strip() for line in report.splitlines() if measure in line]


def test_report_judges_each_target(tmp_path: Path) -> None:
    # memory 1.4x (met), joins 0.9x (missed), fan-out 0.5x (met), users p99 worse at c=4.
    ours = _side(kib=14.0, joins=900.0, fanout=500.0, p99s=[1.0, 3.0])
    peer = _side(kib=10.0, joins=1000.0, fanout=1000.0, p99s=[1.0, 2.0])
    report = _report(tmp_path, ours, peer)
    assert _verdict(report, "KiB per idle connection") == ["<= 1.5x: met"]
    assert _verdict(report, "presence joins/s") == [">= 1x: MISSED"]
    assert _verdict(report, "fan-out deliveries/s") == [">= 0.5x: met"]
    assert _verdict(report, "c=1:") == ["p99 <= 1x: met", "p99 <= 1x: met"]
    assert _verdict(report, "c=4:") == ["p99 <= 1x: MISSED", "p99 <= 1x: MISSED"]
    assert "locust churn" in report and "presence join" in report


def test_report_misses_memory_above_one_and_a_half(tmp_path: Path) -> None:
    ours = _side(kib=16.0, joins=1000.0, fanout=499.0, p99s=[1.0, 2.0])
    peer = _side(kib=10.0, joins=1000.0, fanout=1000.0, p99s=[1.0, 2.0])
    report = _report(tmp_path, ours, peer)
    assert _verdict(report, "KiB per idle connection") == ["<= 1.5x: MISSED"]
    assert _verdict(report, "presence joins/s") == [">= 1x: met"]
    assert _verdict(report, "fan-out deliveries/s") == [">= 0.5x: MISSED"]


@pytest.mark.slow
@pytest.mark.bench
@pytest.mark.skipif(shutil.which("redis-sentinel") is None, reason="redis-sentinel not installed")
def test_our_side_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "peer.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_peer.py"), "--quick", "--ours-only",
         "--connections", "50", "--requests", "40", "--locust", "churn",
         "--locust-duration", "4", "--locust-out", str(tmp_path), "--json", str(out),
         "--plot", str(tmp_path / "plot.png")],
        check=True, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    figures = json.loads(out.read_text())["ours"]
    assert figures["memory"]["held"] == 50
    assert figures["joins_per_s"] > 0 and figures["fanout_per_s"] > 0
    assert all(level["wrong_answers"] == 0 for level in figures["users"]["levels"])
    churn = figures["locust"]["churn"]["rows"]
    assert churn and all(row["failures"] == 0 for row in churn)
