"""Counters and their pre-resolved series handles."""

from __future__ import annotations

from gateway.metrics import Metrics


def test_series_counts_as_inc() -> None:
    metrics = Metrics()
    handle = metrics.series("pg_x_total", shard="a")
    assert "pg_x_total" not in metrics.render()  # nothing shown before the first increment
    handle.inc()
    metrics.inc("pg_x_total", 2, shard="a")
    handle.inc(3)
    metrics.inc("pg_x_total", shard="b")
    assert metrics.get("pg_x_total", shard="a") == 6
    assert metrics.total("pg_x_total") == 7
    assert 'pg_x_total{shard="a"} 6' in metrics.render()


def test_series_created_before_the_counter_exists() -> None:
    metrics = Metrics()
    early = metrics.series("pg_y_total")
    metrics.inc("pg_y_total")
    early.inc()
    assert metrics.get("pg_y_total") == 2
