"""Connection caps, per-address limits, handshake rates and the per-iteration work budget."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from gateway import fdlimit
from gateway.fdlimit import client_connection_cap, nofile_limit
from gateway.metrics import Metrics
from gateway.server.admission import Admission, AdmissionSettings, WorkBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_node_cap_and_per_address_cap() -> None:
    metrics = Metrics()
    adm = Admission(AdmissionSettings(max_connections=5, max_per_ip=2), metrics)
    assert adm.admit("10.0.0.1") is None
    assert adm.admit("10.0.0.1") is None
    refusal = adm.admit("10.0.0.1")
    assert refusal is not None and "max_connections_per_ip" in refusal
    assert adm.admit("10.0.0.2") is None
    assert adm.admit("10.0.0.3") is None
    assert adm.admit("10.0.0.4") is None
    refusal = adm.admit("10.0.0.5")  # 5 held: the node is full
    assert refusal is not None and "maximum of 5" in refusal
    adm.release("10.0.0.1")
    assert adm.connections_from("10.0.0.1") == 1
    assert adm.admit("10.0.0.1") is None
    assert metrics.get("pg_connections_refused_total", reason="address_limit") == 1
    assert metrics.get("pg_connections_refused_total", reason="node_limit") == 1
    # Released addresses leave nothing behind.
    for ip in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
        adm.release(ip)
    assert adm.total == 0 and adm._per_ip == {}


def test_shedding_refuses_handshakes_not_connections() -> None:
    shedding = [False]
    adm = Admission(AdmissionSettings(), Metrics(), shedding=lambda: shedding[0])
    assert adm.admit("10.0.0.1") is None
    assert adm.shed("10.0.0.1") is None
    shedding[0] = True
    assert adm.admit("10.0.0.1") is None  # probes and /metrics still get through
    assert adm.shed("10.0.0.1") == "this node is overloaded and sheds load"


def test_trusted_proxy_forwards_the_client_address() -> None:
    adm = Admission(
        AdmissionSettings(max_per_ip=1, trusted_proxies=("10.1.0.0/16", "192.168.0.9")), Metrics()
    )
    # Connections from the proxy are not counted per address at accept time.
    for _ in range(5):
        assert adm.admit("10.1.2.3") is None
    assert not adm.counts("10.1.2.3") and adm.counts("8.8.8.8")
    assert adm.client_address("10.1.2.3", "1.2.3.4, 192.168.0.9") == "1.2.3.4"
    assert adm.client_address("10.1.2.3", None) == "10.1.2.3"
    assert adm.client_address("8.8.8.8", "1.2.3.4") == "8.8.8.8"  # untrusted peer: ignored
    assert adm.admit_forwarded("1.2.3.4") is None
    assert adm.admit_forwarded("1.2.3.4") is not None
    adm.release("1.2.3.4", total=False)
    assert adm.admit_forwarded("1.2.3.4") is None


def test_handshake_rate_is_a_token_bucket_per_address() -> None:
    clock = Clock()
    adm = Admission(
        AdmissionSettings(handshakes_per_ip=2.0, handshake_burst=3), Metrics(), clock=clock
    )
    assert [adm.handshake("a") is None for _ in range(4)] == [True, True, True, False]
    assert adm.handshake("b") is None  # another address has its own bucket
    clock.now += 0.5  # one token back
    assert adm.handshake("a") is None
    assert adm.handshake("a") is not None
    clock.now += 60  # refilled completely: the bucket is dropped at the next sweep
    adm.sweep()
    assert adm._buckets == {}


def test_connection_cap_keeps_descriptors_in_reserve() -> None:
    limit = nofile_limit()
    assert client_connection_cap(0, 100) == limit - 100
    assert client_connection_cap(10, 100) == min(10, limit - 100)
    assert client_connection_cap(10**9, 100) == limit - 100


async def test_work_budget_defers_in_arrival_order() -> None:
    budget = WorkBudget(3)
    ran: list[str] = []

    def work(name: str) -> None:
        if budget.may_run(resumed=name.startswith("r")):
            budget.spend()
            ran.append(name)
        else:
            budget.defer(lambda: work("r" + name))

    for name in ("a", "b", "c", "d", "e"):
        work(name)
    assert ran == ["a", "b", "c"]
    work("f")  # comes after the waiting ones
    assert budget.waiting == 3
    for _ in range(5):
        await asyncio.sleep(0)
    assert ran == ["a", "b", "c", "rd", "re", "rf"]
    assert budget.waiting == 0


async def test_work_budget_is_quartered_while_shedding() -> None:
    budget = WorkBudget(8, shedding=lambda: True)
    budget.spend(8)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert budget.left == 2


def test_emfile_is_recognised_and_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    lost = ConnectionError("cannot connect")
    lost.__cause__ = OSError(errno.EMFILE, "Too many open files")
    assert fdlimit.is_emfile(lost)
    assert not fdlimit.is_emfile(OSError(errno.ECONNREFUSED, "Connection refused"))
    fdlimit._Reports.last = float("-inf")
    with caplog.at_level(logging.ERROR, logger="gateway.fdlimit"):
        fdlimit.note_emfile("connecting to 127.0.0.1:1")
        fdlimit.note_emfile("connecting to 127.0.0.1:2")  # within the minute: counted only
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.fdlimit"]
    assert len(messages) == 1, messages
    assert "EMFILE" in messages[0] and f"limit {nofile_limit()}" in messages[0]
    assert fdlimit._Reports.suppressed == 1
