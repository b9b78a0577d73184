"""Compatibility with the original metal-guard: keys, texts and words its users rely on."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

import metal_guard as mg
from panic_fixtures import Panic, panic_text, write_panic


def test_breaker_status_carries_the_original_keys(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    breaker = mg.CircuitBreaker(report_dir=reports, cooldown_sec=600)
    calm = breaker.status()
    assert (calm["in_cooldown"], calm["cooldown_remaining_sec"], calm["recent_panic_count"]) == (
        False,
        0.0,
        0,
    )
    now = time.time()
    write_panic(reports, Panic(pid=1, ts=now - 120), name="a.panic")
    write_panic(reports, Panic(pid=2, ts=now - 60), name="b.panic")
    with pytest.raises(mg.MLXCooldownActive):
        breaker.check(now=now)
    tripped = breaker.status(now=now + 100)
    assert tripped["in_cooldown"] is True
    assert tripped["cooldown_remaining_sec"] == pytest.approx(500.0)
    assert tripped["recent_panic_count"] == 2
    assert tripped["in_cooldown"] == tripped["cooling_down"]


@pytest.mark.parametrize(
    "message",
    [
        "IOGPU: context store timeout on channel 3",
        "AGX: ctxstore timed out waiting for the firmware",
    ],
)
def test_ctxstore_timeout_matches_both_spellings(message: str) -> None:
    name, explanation = mg.detect_panic_signature(f"panic(cpu 2 caller 0x1): {message}")
    assert name == "ctxstore_timeout"
    assert explanation is not None and "context-store timeout" in explanation


def test_calendar_time_is_read_outside_an_epoch_block(tmp_path: Path) -> None:
    ts = 1_776_900_000
    text = panic_text(Panic(ts=ts)).replace("Epoch Time:        sec       usec\n", "")
    assert "Epoch Time" not in text and f"Calendar: 0x{ts:08x}" in text
    assert mg._panic_time(text) == pytest.approx(ts, abs=1e-3)
    # with the block present, its Calendar wins over a stray one earlier in the text
    stray = f"Calendar: 0x{ts - 999:08x} 0x00000000\n" + panic_text(Panic(ts=ts))
    assert mg._panic_time(stray) == pytest.approx(ts, abs=1e-3)


def test_known_panic_warning_names_the_registry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    model = next(iter(mg.KNOWN_PANIC_MODELS))
    assert mg.warn_if_known_panic_model(model) is True
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "KNOWN_PANIC_MODELS" in record.getMessage()


def test_context_managers_also_decorate_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The original's ``@contextmanager`` objects worked as decorators; these do too."""
    guard = mg.MetalGuard(cooldown_secs=0.0, breadcrumb_path=None)
    cleanups: list[str] = []
    monkeypatch.setattr(guard, "safe_cleanup", lambda: cleanups.append("cleanup"))

    @guard.guarded_cleanup()
    def work(x: int) -> int:
        """Doubles."""
        cleanups.append("body")
        return 2 * x

    assert (work(3), work(4)) == (6, 8)
    assert cleanups == ["body", "cleanup", "body", "cleanup"]
    assert work.__doc__ == "Doubles." and work.__name__ == "work"

    @guard.oom_protected_context()
    def out_of_memory() -> None:
        raise RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory")

    with pytest.raises(mg.MetalOOMError):
        out_of_memory()
    assert cleanups[-1] == "cleanup"

    @mg.mlx_exclusive_lock("decorated job")
    def locked() -> dict[str, object] | None:
        return mg.read_mlx_lock()

    holder = locked()
    assert holder is not None and holder["label"] == "decorated job"
    assert locked() is not None  # a fresh hold per call
    assert mg.read_mlx_lock() is None  # released after each call


def test_a_huge_integer_in_a_state_file_is_ignored_not_a_crash(tmp_path: Path) -> None:
    """JSON holds integers of any size; ``float()`` of a 400-digit one overflows."""
    import json

    huge = 10**400
    store = tmp_path / "cadence.json"
    store.write_text(json.dumps({"org/a": huge, "org/b": time.time() - 10}))
    guard = mg.CadenceGuard(store, min_interval_sec=60)
    guard.check("org/a")  # the huge record is no time at all: nothing blocks org/a
    with pytest.raises(mg.CadenceViolation):
        guard.check("org/b")
    assert [e["model_id"] for e in guard.status()["events"]] == ["org/b"]
    state = tmp_path / "breaker.json"
    state.write_text(json.dumps({"cooldown_until": huge, "tripped_at": huge}))
    breaker = mg.CircuitBreaker(state_path=state, report_dir=tmp_path / "reports")
    breaker.check()  # an unreadable cooldown is no cooldown
    assert breaker.status()["cooling_down"] is False
    text = mg.format_panic_for_apple_feedback({"panic_time": huge})
    assert str(huge)[:20] in text  # shown as given, not as a time


def test_code_written_for_the_original_leaves_no_watchdog_running(tmp_path: Path) -> None:
    """The original's only way to stop its watchdog was ``stop_periodic_flush()``."""
    import threading

    def monitors() -> list[str]:
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("metal-guard-"))

    guard = mg.MetalGuard(breadcrumb_path=str(tmp_path / "crumbs.log"))
    try:
        guard.start_watchdog(interval_secs=300)
        assert monitors() == ["metal-guard-watchdog"]
        guard.stop_periodic_flush()
        assert monitors() == []
        guard.start_periodic_flush(interval_secs=300)
        guard.start_watchdog(interval_secs=300)
        guard.stop_watchdog()  # ours alone: the periodic flush keeps running
        assert monitors() == ["metal-guard-periodic-flush"]
        guard.stop_periodic_flush()
        assert monitors() == []
    finally:
        guard.stop_periodic_flush()
        guard.stop_kv_cache_monitor()
