"""Section 4.5: ``KVGrowthTracker`` and the shared ``kv_tracker``."""

from __future__ import annotations

import logging
import math
import pickle
import threading
import time
from typing import Any

import pytest

import metal_guard as mg


def test_a_request_under_its_ceiling() -> None:
    tracker = mg.KVGrowthTracker()
    tracker.start("r1", ceiling_gb=1.0)
    assert tracker.add_bytes("r1", 300_000_000) == 300_000_000
    assert tracker.add_bytes("r1", 700_000_000) == 1_000_000_000  # at the ceiling: still fine
    assert tracker.snapshot() == [
        {
            "request_id": "r1",
            "cumulative_gb": 1.0,
            "ceiling_gb": 1.0,
            "step_count": 2,
            "aborted": False,
        }
    ]
    summary = tracker.finalize("r1")
    assert summary == {
        "request_id": "r1",
        "cumulative_gb": 1.0,
        "ceiling_gb": 1.0,
        "step_count": 2,
        "aborted": False,
    }
    assert tracker.finalize("r1") is None and tracker.snapshot() == []


def test_crossing_the_ceiling_aborts_the_request(caplog: pytest.LogCaptureFixture) -> None:
    tracker = mg.KVGrowthTracker()
    tracker.start("r2", ceiling_gb=0.5)
    tracker.add_bytes("r2", 400_000_000)
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        with pytest.raises(mg.MetalOOMError, match=r"grew to 0\.6 GB, above its 0\.5 GB ceiling"):
            tracker.add_bytes("r2", 200_000_000)
        with pytest.raises(mg.MetalOOMError, match="already aborted"):
            tracker.add_bytes("r2", 1)
    assert len(caplog.records) == 1 and "r2" in caplog.records[0].getMessage()
    crumbs = [line for line in mg.read_breadcrumbs(50) if "KV_TRACKER: ABORT" in line]
    assert len(crumbs) == 1 and "request=r2" in crumbs[0] and "steps=2" in crumbs[0]
    summary = tracker.finalize("r2")
    assert summary is not None and summary["aborted"] is True and summary["step_count"] == 2


def test_the_error_is_a_metal_oom_error_that_pickles() -> None:
    tracker = mg.KVGrowthTracker()
    tracker.start(7, ceiling_gb=0.001)
    with pytest.raises(mg.MetalOOMError) as info:
        tracker.add_bytes(7, 2_000_000)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is mg.MetalOOMError and str(copy) == str(info.value)
    assert tracker.snapshot()[0]["request_id"] == "7"  # ids are strings


def test_unknown_requests_and_restarts() -> None:
    tracker = mg.KVGrowthTracker()
    assert tracker.add_bytes("nobody", 10) == 0
    tracker.start("r", ceiling_gb=1)
    tracker.add_bytes("r", 10)
    tracker.start("r", ceiling_gb=2)  # a restart is a fresh record
    assert tracker.snapshot()[0]["cumulative_gb"] == 0.0
    assert tracker.snapshot()[0]["ceiling_gb"] == 2.0


@pytest.mark.parametrize(
    ("ceiling", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
        (None, TypeError),
    ],
)
def test_bad_ceilings(ceiling: Any, error: type) -> None:
    with pytest.raises(error, match="ceiling_gb"):
        mg.KVGrowthTracker().start("r", ceiling_gb=ceiling)


@pytest.mark.parametrize(
    ("count", "error"), [(-1, ValueError), (math.nan, ValueError), ("5", TypeError)]
)
def test_bad_byte_counts(count: Any, error: type) -> None:
    tracker = mg.KVGrowthTracker()
    tracker.start("r")
    with pytest.raises(error, match="bytes_added"):
        tracker.add_bytes("r", count)


def test_idle_records_are_dropped() -> None:
    tracker = mg.KVGrowthTracker(idle_expiry_sec=0.2)
    tracker.start("idle")
    tracker.start("busy")
    for _ in range(4):
        time.sleep(0.1)
        tracker.add_bytes("busy", 1)
    assert [r["request_id"] for r in tracker.snapshot()] == ["busy"]
    assert tracker.add_bytes("idle", 5) == 0
    assert mg.KVGrowthTracker().idle_expiry_sec == 3600.0
    with pytest.raises(ValueError):
        mg.KVGrowthTracker(idle_expiry_sec=0)


def test_threads_add_concurrently() -> None:
    tracker = mg.KVGrowthTracker()
    tracker.start("shared", ceiling_gb=100)
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(1000):
            tracker.add_bytes("shared", 1000)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = tracker.finalize("shared")
    assert summary is not None
    assert summary["step_count"] == 8000 and summary["cumulative_gb"] == 0.008


def test_the_shared_tracker() -> None:
    assert isinstance(mg.kv_tracker, mg.KVGrowthTracker)
    mg.kv_tracker.start("shared-test", ceiling_gb=1)
    try:
        assert mg.kv_tracker.add_bytes("shared-test", 5) == 5
    finally:
        mg.kv_tracker.finalize("shared-test")
    assert "open request" in repr(mg.kv_tracker)
