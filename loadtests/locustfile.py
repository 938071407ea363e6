"""Locust entry point for the presence-gateway load tests (users in ``pusher_user``).

Against a gateway that is already running on loopback (``presence-gateway dev`` serves
``127.0.0.1:6001``), pick the scenario by user class name::

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 20s \\
        --host http://127.0.0.1:6001 --csv /tmp/load/idle IdleUser

Classes: ``IdleUser``, ``PresenceChurnUser``, ``ClientEventUser``, ``FanoutSubscriber`` +
``HttpPublisher``, ``ReadApiUser`` (+ ``IdleUser`` so there is something to read). Without a
class name every class runs, mixed by weight. ``loadtests/run.py`` starts a topology and the
node(s) itself and calls this file the same way.

Environment (besides the ``PG_LOAD_*`` knobs of :class:`loadtests.pusher_user.Settings`):

* ``PG_LOAD_PUBLISHERS`` / ``PG_LOAD_READERS``: exact numbers of ``HttpPublisher`` /
  ``ReadApiUser`` users (locust ``fixed_count``); unset or 0 = by weight.
* ``PG_LOAD_COUNTERS``: a JSON file written at test stop with the fan-out tallies
  (``fanout_triggered``, ``fanout_expected``, ``fanout_received``, ``fanout_gaps``).

With ``--csv PREFIX`` this file also writes ``PREFIX_final_stats.csv`` when locust quits: the
same columns as ``PREFIX_stats.csv``, but with the final figures (locust rewrites its own file
once a second, so it misses the last second of a run).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from locust import events
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from loadtests.pusher_user import (
    COUNTERS,
    ClientEventUser,
    FanoutSubscriber,
    HttpPublisher,
    IdleUser,
    PresenceChurnUser,
    ReadApiUser,
    check_loopback,
    settings,
)

__all__ = [
    "ClientEventUser",
    "FanoutSubscriber",
    "HttpPublisher",
    "IdleUser",
    "PresenceChurnUser",
    "ReadApiUser",
]

for _cls, _var in ((HttpPublisher, "PG_LOAD_PUBLISHERS"), (ReadApiUser, "PG_LOAD_READERS")):
    if int(os.environ.get(_var) or 0) > 0:
        _cls.fixed_count = int(os.environ[_var])


_ENVIRONMENTS: list[Any] = []


@events.init.add_listener
def _check_hosts(environment: Any, **_: Any) -> None:
    """Refuse to start against anything but loopback; fail early on bad settings."""
    _ENVIRONMENTS.append(environment)
    settings()  # raises ValueError naming a bad PG_LOAD_* variable
    if environment.host:
        problem = check_loopback(environment.host)
        if problem:
            raise SystemExit(problem)


@events.test_stop.add_listener
def _write_counters(**_: Any) -> None:
    """Write the fan-out tallies where ``PG_LOAD_COUNTERS`` says."""
    path = os.environ.get("PG_LOAD_COUNTERS")
    if path:
        Path(path).write_text(json.dumps(dict(COUNTERS), indent=2, sort_keys=True))


@events.quit.add_listener
def _write_final_stats(**_: Any) -> None:
    """Write ``<csv prefix>_final_stats.csv`` with the figures of the whole run."""
    for environment in _ENVIRONMENTS:
        prefix = getattr(environment.parsed_options, "csv_prefix", None)
        if prefix:
            with Path(f"{prefix}_final_stats.csv").open("w", newline="") as f:
                StatsCSV(environment, PERCENTILES_TO_REPORT).requests_csv(csv.writer(f))
