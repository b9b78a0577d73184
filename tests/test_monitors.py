"""Threads and timers of the memory layers: the GPU-thread registry (L1), cleanup that never
clears under a live GPU thread (L2), and the three monitors (L5).

The monitor tests give a ``MetalGuard`` subclass scripted memory numbers (a Mac's working
set cannot be reported here) and count what the monitors do; the threads, timers and
events are all real. The last test drives the watchdog with real MLX memory on CPU, with
``device_info`` wrapped to report a small limit (CPU MLX reports none).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import breadcrumb_messages, requires_mlx, wait_until

GB = 1_000_000_000
FAST = 0.01  # monitor interval in these tests


def crumbs(path: Path) -> list[str]:
    """Breadcrumb messages (without time and pid) written to ``path``."""
    return breadcrumb_messages(path.parent, path.name)


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("metal-guard-")]


class Scripted(mg.MetalGuard):
    """A guard whose memory numbers the test sets; flushes are counted, not run."""

    def __init__(self, path: Path, stats: mg.MemoryStats) -> None:
        super().__init__(cooldown_secs=0, thread_timeout_secs=1, breadcrumb_path=path)
        self.stats = stats
        self.reads = 0
        self.flushes: list[str] = []
        self.pause: threading.Event | None = None
        self.in_tick = threading.Event()

    def memory_stats(self) -> mg.MemoryStats:
        self.reads += 1
        pause = self.pause
        if pause is not None:
            self.in_tick.set()
            pause.wait(10)
        return self.stats

    def flush_gpu(self) -> None:
        self.flushes.append(threading.current_thread().name)


@pytest.fixture
def crumb_path(tmp_path: Path) -> Path:
    return tmp_path / "crumbs.log"


@pytest.fixture
def guards() -> Iterator[list[mg.MetalGuard]]:
    """Guards made by a test; every monitor is stopped afterwards, whatever happened."""
    made: list[mg.MetalGuard] = []
    yield made
    for guard in made:
        guard.stop_periodic_flush()
        guard.stop_watchdog()
        guard.stop_kv_cache_monitor()


def scripted(
    guards: list[mg.MetalGuard], path: Path, active_gb: float, limit_gb: float = 100
) -> Scripted:
    guard = Scripted(path, mg.MemoryStats(int(active_gb * GB), 0, int(limit_gb * GB)))
    guards.append(guard)
    return guard


class Blocker:
    """``n`` real threads that run until released."""

    def __init__(self, n: int) -> None:
        self.release = threading.Event()
        self.threads = [
            threading.Thread(target=self.release.wait, args=(30,), name=f"gpu-{i}")
            for i in range(n)
        ]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.release.set()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def blockers() -> Iterator[list[Blocker]]:
    made: list[Blocker] = []
    yield made
    for blocker in made:
        blocker.finish()


# -- L1 thread registry ----------------------------------------------------------------


def test_wait_for_threads_uses_one_deadline_for_all(
    crumb_path: Path, blockers: list[Blocker], caplog: pytest.LogCaptureFixture
) -> None:
    guard = mg.MetalGuard(breadcrumb_path=crumb_path)
    blocker = Blocker(5)
    blockers.append(blocker)
    for thread in blocker.threads:
        guard.register_thread(thread)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        alive = guard.wait_for_threads(0.5)
    took = time.monotonic() - start
    assert alive == 5
    assert 0.45 <= took < 1.5  # about 0.5 s, not 5 × 0.5 s
    assert crumbs(crumb_path) == [
        "WAIT_GPU: 5 thread(s) alive, waiting 0.5s",
        "WAIT_GPU: WARNING — 5 still alive",
    ]
    assert (
        len(caplog.records) == 1 and "5 registered GPU thread(s)" in caplog.records[0].getMessage()
    )


def test_wait_for_threads_when_they_finish(crumb_path: Path) -> None:
    guard = mg.MetalGuard(breadcrumb_path=crumb_path)
    assert guard.wait_for_threads() == 0  # nothing registered: nothing written
    assert crumbs(crumb_path) == []
    threads = [threading.Thread(target=time.sleep, args=(0.1,)) for _ in range(3)]
    for thread in threads:
        thread.start()
        guard.register_thread(thread)
    assert guard.wait_for_threads(10) == 0
    assert crumbs(crumb_path) == [
        "WAIT_GPU: 3 thread(s) alive, waiting 10s",
        "WAIT_GPU: all threads finished",
    ]
    assert guard._threads == []  # finished threads are dropped


def test_register_thread_rules(crumb_path: Path, blockers: list[Blocker]) -> None:
    guard = mg.MetalGuard(breadcrumb_path=crumb_path, thread_timeout_secs=0.1)
    with pytest.raises(TypeError, match=r"threading\.Thread"):
        guard.register_thread("worker")  # type: ignore[arg-type]
    not_started = threading.Thread(target=lambda: None)
    guard.register_thread(not_started)
    guard.register_thread(not_started)
    assert guard._threads == [not_started]  # once, and kept until it ran
    assert guard.wait_for_threads() == 0  # never joined before it started

    # A registered thread that calls wait_for_threads does not wait for itself.
    result: list[int] = []

    def worker() -> None:
        guard.register_thread(threading.current_thread())
        result.append(guard.wait_for_threads(5))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert result == [0]


@requires_mlx
def test_safe_cleanup_never_clears_under_a_live_gpu_thread(
    crumb_path: Path,
    blockers: list[Blocker],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import mlx.core as mx

    cleared: list[str] = []
    real_clear = mx.clear_cache

    def spy() -> None:
        cleared.append(threading.current_thread().name)
        real_clear()

    monkeypatch.setattr(mx, "clear_cache", spy)
    guard = mg.MetalGuard(cooldown_secs=0, thread_timeout_secs=0.2, breadcrumb_path=crumb_path)
    blocker = Blocker(1)
    blockers.append(blocker)
    guard.register_thread(blocker.threads[0])
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        guard.safe_cleanup()
    assert cleared == []
    assert crumbs(crumb_path) == [
        "CLEANUP: START",
        "WAIT_GPU: 1 thread(s) alive, waiting 0.2s",
        "WAIT_GPU: WARNING — 1 still alive",
        "CLEANUP: SKIP_FLUSH 1 thread(s) alive",
        "CLEANUP: DONE",
    ]
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "not clearing the MLX cache" in warning.getMessage()

    blocker.finish()
    guard.safe_cleanup()
    assert cleared == [threading.current_thread().name]
    assert crumbs(crumb_path)[-4:] == [
        "FLUSH: synchronize",
        "FLUSH: mx.clear_cache()",
        "FLUSH: done",
        "CLEANUP: DONE",
    ]


# -- L5 monitors -------------------------------------------------------------------------


def test_watchdog_stopped_during_a_tick_calls_nothing_after(
    crumb_path: Path, guards: list[mg.MetalGuard]
) -> None:
    guard = scripted(guards, crumb_path, active_gb=95)
    calls: list[float] = []
    guard.start_watchdog(FAST, on_critical=lambda: calls.append(time.monotonic()))
    wait_until(lambda: len(calls) >= 2)
    monitor = guard._monitors["watchdog"]
    guard.pause = threading.Event()
    assert guard.in_tick.wait(5)  # a tick is now inside memory_stats()
    stopper = threading.Thread(target=guard.stop_watchdog)
    stopper.start()
    wait_until(monitor.stopped.is_set)
    count_at_stop = len(calls)
    guard.pause.set()  # let the tick finish
    stopper.join(10)
    assert not stopper.is_alive() and not monitor.thread.is_alive()
    time.sleep(0.1)
    assert len(calls) == count_at_stop  # the interrupted tick called nothing, nor did any later
    assert monitor_threads() == []


def test_kv_monitor_stopped_during_a_tick_calls_nothing_after(
    crumb_path: Path, guards: list[mg.MetalGuard]
) -> None:
    guard = scripted(guards, crumb_path, active_gb=99)  # 1 GB headroom < 4 GB
    calls: list[tuple[float, float]] = []
    guard.start_kv_cache_monitor(FAST, on_pressure=lambda a, r: calls.append((a, r)))
    wait_until(lambda: len(calls) >= 2)
    assert calls[0] == (pytest.approx(1.0), 0.0)
    monitor = guard._monitors["kv"]
    guard.pause = threading.Event()
    assert guard.in_tick.wait(5)
    stopper = threading.Thread(target=guard.stop_kv_cache_monitor)
    stopper.start()
    wait_until(monitor.stopped.is_set)
    count_at_stop = len(calls)
    guard.pause.set()
    stopper.join(10)
    time.sleep(0.1)
    assert len(calls) == count_at_stop
    assert monitor_threads() == []
    assert "KV_MONITOR: LOW_HEADROOM available=1.0GB rate=0.00GB/min" in crumbs(crumb_path)


def test_starting_twice_replaces_the_first_chain(
    crumb_path: Path, guards: list[mg.MetalGuard]
) -> None:
    guard = scripted(guards, crumb_path, active_gb=95)
    first: list[str] = []
    second: list[str] = []
    guard.start_watchdog(FAST, on_critical=lambda: first.append(threading.current_thread().name))
    wait_until(lambda: len(first) >= 2)
    old_thread = guard._monitors["watchdog"].thread
    guard.start_watchdog(
        FAST, on_critical=lambda: second.append(str(threading.current_thread().ident))
    )
    assert not old_thread.is_alive()  # joined before start_watchdog returned
    count_first = len(first)
    wait_until(lambda: len(second) >= 10)
    assert len(first) == count_first
    assert len(set(second)) == 1  # every tick from one thread: one chain
    assert [t.name for t in monitor_threads()] == ["metal-guard-watchdog"]
    guard.stop_watchdog()
    assert monitor_threads() == []


def test_watchdog_and_periodic_flush_run_together(
    crumb_path: Path, guards: list[mg.MetalGuard], caplog: pytest.LogCaptureFixture
) -> None:
    guard = scripted(guards, crumb_path, active_gb=75)  # above warn (70), below critical (85)
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        guard.start_periodic_flush(FAST)
        guard.start_watchdog(FAST)
        wait_until(
            lambda: {"metal-guard-periodic-flush", "metal-guard-watchdog"} <= set(guard.flushes)
        )
        names = sorted(t.name for t in monitor_threads())
        assert names == ["metal-guard-periodic-flush", "metal-guard-watchdog"]
        guard.stop_watchdog()  # stopping one leaves the other running
        assert [t.name for t in monitor_threads()] == ["metal-guard-periodic-flush"]
        flushes = len(guard.flushes)
        wait_until(lambda: len(guard.flushes) >= flushes + 3)
        guard.stop_periodic_flush()
    assert monitor_threads() == []
    assert any("watchdog: 75.0% of the limit in use" in r.getMessage() for r in caplog.records)


def test_stop_periodic_flush_stops_the_watchdog_too(
    crumb_path: Path, guards: list[mg.MetalGuard], caplog: pytest.LogCaptureFixture
) -> None:
    """The original's only way to stop its watchdog was ``stop_periodic_flush()``."""
    guard = scripted(guards, crumb_path, active_gb=75)
    guard.start_watchdog(FAST)
    wait_until(lambda: "metal-guard-watchdog" in guard.flushes)
    assert [t.name for t in monitor_threads()] == ["metal-guard-watchdog"]
    with caplog.at_level(logging.INFO, logger="metal_guard"):
        guard.stop_periodic_flush()  # no periodic flush was running
    assert monitor_threads() == []
    assert "metal-guard-watchdog" not in [t.name for t in threading.enumerate()]
    reads = guard.reads
    time.sleep(20 * FAST)
    assert guard.reads == reads  # nothing ticks any more
    assert [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()] == [
        "metal_guard: watchdog stopped (stop_periodic_flush stops both)"
    ]
    # both running: one call stops both; the KV monitor is not the periodic flush's business
    guard.start_periodic_flush(FAST)
    guard.start_watchdog(FAST)
    guard.start_kv_cache_monitor(FAST)
    assert len(monitor_threads()) == 3
    guard.stop_periodic_flush()
    assert [t.name for t in monitor_threads()] == ["metal-guard-kv-monitor"]
    guard.stop_kv_cache_monitor()
    assert monitor_threads() == []


def test_stop_watchdog_alone_leaves_a_running_periodic_flush_running(
    crumb_path: Path, guards: list[mg.MetalGuard]
) -> None:
    guard = scripted(guards, crumb_path, active_gb=10)  # below warn: both flush, nothing else
    guard.start_periodic_flush(FAST)
    guard.start_watchdog(FAST)
    assert len(monitor_threads()) == 2
    guard.stop_watchdog()
    assert [t.name for t in monitor_threads()] == ["metal-guard-periodic-flush"]
    flushes = len(guard.flushes)
    wait_until(lambda: len(guard.flushes) >= flushes + 3)
    assert set(guard.flushes[flushes:]) == {"metal-guard-periodic-flush"}
    guard.stop_periodic_flush()
    assert monitor_threads() == []


def test_monitors_can_be_stopped_from_their_own_callback(
    crumb_path: Path, guards: list[mg.MetalGuard]
) -> None:
    guard = scripted(guards, crumb_path, active_gb=95)
    calls: list[int] = []

    def on_critical() -> None:
        calls.append(1)
        guard.stop_watchdog()  # must not deadlock (the thread cannot join itself)

    guard.start_watchdog(FAST, on_critical=on_critical)
    wait_until(lambda: calls == [1] and monitor_threads() == [])
    time.sleep(0.05)
    assert calls == [1]


def test_watchdog_critical_cleans_up_and_resets_the_baseline(
    crumb_path: Path, guards: list[mg.MetalGuard], caplog: pytest.LogCaptureFixture
) -> None:
    guard = scripted(guards, crumb_path, active_gb=50)
    calls: list[int] = []
    with caplog.at_level(logging.ERROR, logger="metal_guard"):
        guard.start_watchdog(FAST, on_critical=lambda: calls.append(1))
        wait_until(lambda: guard.reads >= 3)
        assert calls == []  # 50 %: below warn
        guard.stats = mg.MemoryStats(int(90.5 * GB), 0, 100 * GB)
        wait_until(lambda: len(calls) >= 1)
        guard.stop_watchdog()
    messages = crumbs(crumb_path)
    assert "WATCHDOG: CRITICAL active=90.5% drift=+40.5GB" in messages
    assert messages[messages.index("WATCHDOG: CRITICAL active=90.5% drift=+40.5GB") + 1] == (
        "CLEANUP: START"
    )
    assert any("watchdog CRITICAL" in r.getMessage() for r in caplog.records)
    if messages.count("CLEANUP: START") > 1:  # a second critical tick: drift from the new baseline
        assert "WATCHDOG: CRITICAL active=90.5% drift=+0.0GB" in messages


def test_kv_monitor_is_silent_when_the_limit_is_unknown(
    crumb_path: Path, guards: list[mg.MetalGuard], caplog: pytest.LogCaptureFixture
) -> None:
    guard = scripted(guards, crumb_path, active_gb=50, limit_gb=0)
    calls: list[tuple[float, float]] = []
    with caplog.at_level(logging.DEBUG, logger="metal_guard"):
        guard.start_kv_cache_monitor(
            FAST, headroom_gb=4.0, on_pressure=lambda a, r: calls.append((a, r))
        )
        guard.start_watchdog(FAST, on_critical=lambda: calls.append((0.0, 0.0)))
        wait_until(lambda: guard.reads >= 10)
        guard.stop_kv_cache_monitor()
        guard.stop_watchdog()
    assert calls == []
    assert crumbs(crumb_path) == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_kv_growth_rate_over_the_window(crumb_path: Path) -> None:
    guard = mg.MetalGuard(breadcrumb_path=crumb_path)
    calls: list[tuple[float, float]] = []
    monitor = mg._Monitor(
        "test",
        1.0,
        lambda m: None,
        rate_warn=1.0,
        headroom=4.0,
        on_pressure=lambda a, r: calls.append((a, r)),
        samples=[],
    )

    def at(minute: float, active_gb: float) -> None:
        stats = mg.MemoryStats(int(active_gb * GB), 0, 48 * GB)
        guard._kv_check(monitor, stats, 1000.0 + minute * 60)

    at(0, 10)
    at(0.05, 20)  # 3 s later: too short to call a rate
    assert calls == []
    at(1, 14)  # 4 GB in one minute
    assert calls == [(pytest.approx(34.0), pytest.approx(4.0))]
    assert crumbs(crumb_path) == ["KV_MONITOR: RAPID_GROWTH rate=4.00GB/min available=34.0GB"]
    at(10, 14)  # the 10-minute-old samples left the 5-minute window
    assert len(monitor.state["samples"]) == 1 and len(calls) == 1


def test_ticks_skip_while_registered_gpu_threads_run(
    crumb_path: Path, guards: list[mg.MetalGuard], blockers: list[Blocker]
) -> None:
    guard = scripted(guards, crumb_path, active_gb=95)
    blocker = Blocker(1)
    blockers.append(blocker)
    guard.register_thread(blocker.threads[0])
    calls: list[int] = []
    guard.start_watchdog(FAST, on_critical=lambda: calls.append(1))
    guard.start_periodic_flush(FAST)
    time.sleep(0.2)
    assert (calls, guard.flushes, guard.reads) == ([], [], 0)
    blocker.finish()
    wait_until(lambda: calls and guard.flushes)


@pytest.mark.parametrize(
    ("start", "error"),
    [
        (lambda g: g.start_periodic_flush(0), ValueError),
        (lambda g: g.start_periodic_flush(-1), ValueError),
        (lambda g: g.start_watchdog(1, warn_pct=90, critical_pct=80), ValueError),
        (lambda g: g.start_watchdog(1, critical_pct=float("nan")), ValueError),
        (lambda g: g.start_watchdog(1, on_critical=42), TypeError),
        (lambda g: g.start_kv_cache_monitor("30"), TypeError),
        (lambda g: g.start_kv_cache_monitor(1, headroom_gb=-1), ValueError),
        (lambda g: g.start_kv_cache_monitor(1, on_pressure="clear"), TypeError),
    ],
)
def test_monitor_arguments(start: Callable[[Any], None], error: type, crumb_path: Path) -> None:
    guard = mg.MetalGuard(breadcrumb_path=crumb_path)
    with pytest.raises(error):
        start(guard)
    assert guard._monitors == {} and monitor_threads() == []


def test_stopping_what_never_started_is_a_no_op(crumb_path: Path) -> None:
    guard = mg.MetalGuard(breadcrumb_path=crumb_path)
    guard.stop_periodic_flush()
    guard.stop_watchdog()
    guard.stop_kv_cache_monitor()
    assert monitor_threads() == []


@requires_mlx
def test_watchdog_catches_a_real_allocation_spike(
    crumb_path: Path, guards: list[mg.MetalGuard], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real MLX memory on CPU; ``device_info`` wrapped to report a limit (CPU MLX has none)."""
    import mlx.core as mx

    guard = mg.MetalGuard(cooldown_secs=0, thread_timeout_secs=1, breadcrumb_path=crumb_path)
    guards.append(guard)
    spike_bytes = 300 << 20
    base = guard.memory_stats().in_use_bytes
    limit = base + spike_bytes
    real_info = mx.device_info
    monkeypatch.setattr(
        mx, "device_info", lambda: {**real_info(), "max_recommended_working_set_size": limit}
    )
    before_pct = 100 * base / limit
    critical = (before_pct + 100) / 2
    calls: list[float] = []
    guard.start_watchdog(
        0.02,
        warn_pct=critical,
        critical_pct=critical,
        on_critical=lambda: calls.append(guard.memory_stats().active_pct),
    )
    time.sleep(0.2)
    assert calls == []
    spike = mx.ones((spike_bytes // 4,), dtype=mx.float32)
    mx.eval(spike)
    try:
        wait_until(lambda: len(calls) >= 1)
    finally:
        guard.stop_watchdog()
        del spike
    critical_lines = [m for m in crumbs(crumb_path) if m.startswith("WATCHDOG: CRITICAL active=")]
    assert critical_lines
    pct = float(critical_lines[0].split("active=")[1].split("%")[0])
    assert pct > critical
