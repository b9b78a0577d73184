"""Circuit breaker section: ``MLXCooldownActive`` and ``CircuitBreaker``."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import child_env, spawn_python, spy_file_locks, spy_report_reads
from panic_fixtures import Panic, write_legacy, write_panic


def _breaker(tmp_path: Path, **kwargs: Any) -> mg.CircuitBreaker:
    reports = tmp_path / "reports"
    reports.mkdir(exist_ok=True)
    return mg.CircuitBreaker(report_dir=reports, **kwargs)


def _panic(
    tmp_path: Path, name: str, *, ago: float, kind: str = "492", pid: int = 1, **kw: Any
) -> Path:
    return write_panic(
        tmp_path / "reports", Panic(kind=kind, pid=pid, ts=time.time() - ago), name=name, **kw
    )


# -- MLXCooldownActive ---------------------------------------------------------------


def test_cooldown_exception_attributes_and_message() -> None:
    until = time.time() + 1800
    exc = mg.MLXCooldownActive(3, 3600, until)
    assert isinstance(exc, RuntimeError)
    assert (exc.panic_count, exc.window_sec, exc.cooldown_until) == (3, 3600.0, until)
    assert 1790 < exc.remaining_sec <= 1800
    message = str(exc)
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until)) in message
    assert "local time" in message
    assert "metal-guard breaker clear" in message
    assert "3 IOGPU kernel panic" in message
    assert mg.MLXCooldownActive(1, 60, time.time() - 5).remaining_sec == 0.0


def test_cooldown_exception_pickles_with_every_attribute() -> None:
    exc = mg.MLXCooldownActive(2, 3600.0, time.time() + 100)
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is mg.MLXCooldownActive
    for name in ("panic_count", "window_sec", "cooldown_until", "remaining_sec"):
        assert getattr(copy, name) == getattr(exc, name)
    assert str(copy) == str(exc)
    assert copy.args == exc.args


# -- constructor -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"window_sec": 0}, ValueError, "window_sec must be > 0, got 0"),
        ({"window_sec": -1}, ValueError, "window_sec must be > 0, got -1"),
        ({"window_sec": math.nan}, ValueError, "window_sec must be a finite number"),
        ({"window_sec": math.inf}, ValueError, "window_sec must be a finite number"),
        ({"window_sec": "3600"}, TypeError, "window_sec must be a number, not str"),
        ({"window_sec": True}, TypeError, "window_sec must be a number, not bool"),
        ({"window_sec": None}, TypeError, "window_sec must be a number, not NoneType"),
        ({"window_sec": 10**9}, ValueError, "is more than the maximum"),
        ({"cooldown_sec": -0.5}, ValueError, "cooldown_sec must be >= 0, got -0.5"),
        ({"cooldown_sec": [1]}, TypeError, "cooldown_sec must be a number, not list"),
        ({"panic_threshold": 0}, ValueError, "panic_threshold must be between 1 and 1000"),
        ({"panic_threshold": 1.5}, TypeError, "panic_threshold must be an int, not float"),
        ({"panic_threshold": True}, TypeError, "panic_threshold must be an int, not bool"),
        ({"panic_threshold": "2"}, TypeError, "panic_threshold must be an int, not str"),
        ({"panic_threshold": 10**6}, ValueError, "panic_threshold must be between 1 and 1000"),
        ({"jsonl_path": 12}, TypeError, "jsonl_path must be a str or os.PathLike"),
        ({"state_path": ""}, ValueError, "state_path must be a non-empty path"),
        ({"state_path": b"/tmp/x"}, TypeError, "state_path must be a str or os.PathLike"),
        ({"report_dir": 1.0}, TypeError, "report_dir must be a str or os.PathLike"),
    ],
)
def test_constructor_validation(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        mg.CircuitBreaker(**kwargs)
    assert message in str(info.value)


def test_constructor_defaults(mg_home: str) -> None:
    breaker = mg.CircuitBreaker()
    assert breaker.jsonl_path == os.path.join(mg_home, "panics.jsonl")
    assert breaker.state_path == os.path.join(mg_home, "breaker.json")
    assert (breaker.window_sec, breaker.panic_threshold, breaker.cooldown_sec) == (3600, 2, 3600)
    assert breaker.report_dir == "/Library/Logs/DiagnosticReports"
    assert "CircuitBreaker(" in repr(breaker)
    assert mg.CircuitBreaker(cooldown_sec=0).cooldown_sec == 0


# -- tripping ----------------------------------------------------------------------


def test_trips_at_threshold_in_window(tmp_path: Path, mg_home: str) -> None:
    breaker = _breaker(tmp_path)
    breaker.check()
    assert not os.path.exists(breaker.state_path)
    _panic(tmp_path, "a.panic", ago=1200, pid=1)
    breaker.check()  # one panic: below the threshold
    assert not os.path.exists(breaker.state_path)
    _panic(tmp_path, "b.panic", ago=600, kind="219", pid=2)
    before = time.time()
    with pytest.raises(mg.MLXCooldownActive) as info:
        breaker.check()
    exc = info.value
    assert exc.panic_count == 2 and exc.window_sec == 3600
    assert before + 3600 <= exc.cooldown_until <= time.time() + 3600
    state = json.loads(Path(breaker.state_path).read_text())
    assert state["cooldown_until"] == exc.cooldown_until
    assert state["panic_count"] == 2
    with pytest.raises(mg.MLXCooldownActive) as again:  # still cooling down: same end
        breaker.check()
    assert again.value.cooldown_until == exc.cooldown_until
    crumbs = Path(mg_home, "breadcrumbs.log").read_text()
    assert crumbs.count("BREAKER_TRIP:") == 1


def test_panics_outside_the_window_do_not_count(tmp_path: Path) -> None:
    breaker = _breaker(tmp_path)
    _panic(tmp_path, "a.panic", ago=7200, pid=1)
    _panic(tmp_path, "b.panic", ago=60, pid=2)
    breaker.check()
    with pytest.raises(mg.MLXCooldownActive):
        _breaker(tmp_path, window_sec=3 * 3600).check()


def test_threshold_and_explicit_now(tmp_path: Path) -> None:
    for i in range(3):
        _panic(tmp_path, f"{i}.panic", ago=100 * (i + 1), pid=i)
    _breaker(tmp_path, panic_threshold=4, state_path=tmp_path / "s4.json").check()
    # seen from two hours later, the panics have left the one-hour window
    later = time.time() + 7200
    _breaker(tmp_path, panic_threshold=3, state_path=tmp_path / "late.json").check(now=later)
    # seen from a moment long before the panics: they are "in the future" and count
    earlier = time.time() - 7200
    with pytest.raises(mg.MLXCooldownActive) as info:
        _breaker(tmp_path, panic_threshold=3, state_path=tmp_path / "s3.json").check(now=earlier)
    assert info.value.panic_count == 3
    assert info.value.cooldown_until == pytest.approx(earlier + 3600)
    with pytest.raises(TypeError, match="now must be a number, not str"):
        _breaker(tmp_path).check(now="now")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="now must be a finite number"):
        _breaker(tmp_path).check(now=math.nan)


@pytest.mark.parametrize("kind", ["watchdog", "unknown"])
def test_non_iogpu_kernel_panics_do_not_trip(tmp_path: Path, kind: str) -> None:
    for i in range(4):
        _panic(tmp_path, f"{i}.panic", ago=60 * (i + 1), kind=kind, pid=i)
    breaker = _breaker(tmp_path, panic_threshold=1)
    breaker.check()
    assert breaker.status()["panics_in_window"] == 0
    assert len(mg.read_panic_archive(breaker.jsonl_path)) == 4  # archived all the same


def test_process_level_aborts_do_not_trip(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    now = time.time()
    (reports / "abort.panic").write_text(
        "panic(cpu 0 caller 0x1): process aborted: Insufficient Memory "
        "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)\n"
    )
    (reports / "limit.panic").write_text(
        "panic(cpu 1 caller 0x2): Resource limit (499000) exceeded\n"
    )
    os.utime(reports / "abort.panic", (now - 10, now - 10))
    os.utime(reports / "limit.panic", (now - 20, now - 20))
    breaker = _breaker(tmp_path, panic_threshold=1)
    breaker.check()
    sigs = sorted(r["signature"] for r in mg.read_panic_archive(breaker.jsonl_path))
    assert sigs == ["metal_oom", "resource_limit"]
    # archived records of process-level failures (written by other tools) do not count either
    with open(breaker.jsonl_path, "a") as f:
        f.write(
            json.dumps({"ts": now - 5, "pid": 9, "signature": "metal_oom", "source_file": "x"})
            + "\n"
        )
    breaker.check()
    assert breaker.status()["panics_in_window"] == 0


def test_duplicate_reports_count_once(tmp_path: Path) -> None:
    p = Panic(kind="550", pid=4321, ts=time.time() - 300)
    reports = tmp_path / "reports"
    write_panic(reports, p, name="panic-full-1.panic")
    write_panic(reports, p, name="panic-base-1.panic")
    write_panic(reports, p, name="panic-full-1.panic", retired=True)
    breaker = _breaker(tmp_path)
    breaker.check()
    assert breaker.status()["panics_in_window"] == 1


def test_legacy_reports_count(tmp_path: Path) -> None:
    write_legacy(tmp_path / "reports", Panic(kind="492", ts=time.time() - 50), name="a.panic")
    write_legacy(tmp_path / "reports", Panic(kind="219", ts=time.time() - 40), name="b.panic")
    with pytest.raises(mg.MLXCooldownActive):
        _breaker(tmp_path).check()


def test_cooldown_ends_and_old_evidence_does_not_retrip(tmp_path: Path) -> None:
    breaker = _breaker(tmp_path, window_sec=7200, cooldown_sec=600)
    _panic(tmp_path, "a.panic", ago=300, pid=1)
    _panic(tmp_path, "b.panic", ago=200, pid=2)
    with pytest.raises(mg.MLXCooldownActive) as info:
        breaker.check()
    later = info.value.cooldown_until + 1
    breaker.check(now=later)  # the same two panics are still in the window: no new trip
    assert breaker.status(now=later)["cooling_down"] is False
    _panic(tmp_path, "c.panic", ago=0, pid=3)  # a new panic with the others in the window
    with pytest.raises(mg.MLXCooldownActive):
        breaker.check(now=time.time() + 700)


def test_clear(tmp_path: Path, mg_home: str) -> None:
    breaker = _breaker(tmp_path)
    _panic(tmp_path, "a.panic", ago=30, pid=1)
    _panic(tmp_path, "b.panic", ago=20, pid=2)
    with pytest.raises(mg.MLXCooldownActive):
        breaker.check()
    assert breaker.clear() is True
    breaker.check()  # panics before the clear are forgotten
    status = breaker.status()
    assert status["cooling_down"] is False and status["panics_in_window"] == 0
    assert status["cleared_at"] is not None
    assert "BREAKER_CLEAR" in Path(mg_home, "breadcrumbs.log").read_text()
    time.sleep(0.01)
    _panic(tmp_path, "c.panic", ago=-1, pid=3)
    breaker.check()  # one new panic: below the threshold
    _panic(tmp_path, "d.panic", ago=-2, pid=4)
    with pytest.raises(mg.MLXCooldownActive):
        breaker.check()


def test_clear_forgets_panics_seen_so_far(tmp_path: Path) -> None:
    breaker = _breaker(tmp_path)
    _panic(tmp_path, "a.panic", ago=30, pid=1)
    _panic(tmp_path, "b.panic", ago=20, pid=2)
    assert breaker.status()["would_trip"] is True
    assert breaker.clear() is False  # nothing was running; the clear time is recorded
    assert json.loads(Path(breaker.state_path).read_text())["cleared_at"] > 0
    breaker.check()
    assert breaker.status()["would_trip"] is False


def test_clear_propagates_environment_faults(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    with pytest.raises(IsADirectoryError):
        _breaker(tmp_path, state_path=tmp_path / "state").clear()


# -- status ------------------------------------------------------------------------


def test_status_never_writes(tmp_path: Path, mg_home: str) -> None:
    _panic(tmp_path, "a.panic", ago=30, pid=1)
    _panic(tmp_path, "b.panic", ago=20, pid=2)
    breaker = _breaker(tmp_path)
    status = breaker.status()
    assert os.listdir(mg_home) == []
    assert status["would_trip"] is True and status["cooling_down"] is False
    assert status["panics_in_window"] == 2
    assert [r["pid"] for r in status["recent_panics"]] == [1, 2]
    assert status["problem"] is None
    json.dumps(status)
    with pytest.raises(mg.MLXCooldownActive):
        breaker.check()
    status = breaker.status()
    assert status["cooling_down"] is True and status["would_trip"] is False
    assert 3590 < status["remaining_sec"] <= 3600
    assert status["trip_panic_count"] == 2 and status["archived_panics"] == 2


@pytest.mark.parametrize(
    "content", [b"{not json", b"[1, 2]", b"\xff\xfe", b'{"cooldown_until": "soon"}']
)
def test_status_and_check_survive_corrupt_state(tmp_path: Path, content: bytes) -> None:
    breaker = _breaker(tmp_path)
    Path(breaker.state_path).parent.mkdir(parents=True, exist_ok=True)
    Path(breaker.state_path).write_bytes(content)
    status = breaker.status()
    assert status["cooling_down"] is False
    breaker.check()
    _panic(tmp_path, "a.panic", ago=30, pid=1)
    _panic(tmp_path, "b.panic", ago=20, pid=2)
    with pytest.raises(mg.MLXCooldownActive):
        breaker.check()
    assert json.loads(Path(breaker.state_path).read_text())["panic_count"] == 2


def test_status_never_raises(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    breaker = _breaker(tmp_path, state_path=tmp_path / "state")
    status = breaker.status()
    assert status["cooling_down"] is False
    assert status["problem"] == "breaker state unreadable: [Errno 21] Is a directory"
    status = _breaker(tmp_path).status(now="bad")  # type: ignore[arg-type]
    assert status["problem"] == "TypeError: now must be a number, not str"


def test_clock_stepped_back_never_lengthens_the_cooldown(tmp_path: Path) -> None:
    breaker = _breaker(tmp_path, cooldown_sec=600)
    now = time.time()
    state = {
        "tripped_at": now + 86400,
        "cooldown_until": now + 86400 + 600,
        "cooldown_sec": 600,
        "panic_count": 2,
        "window_sec": 3600,
    }
    Path(breaker.state_path).parent.mkdir(parents=True, exist_ok=True)
    Path(breaker.state_path).write_text(json.dumps(state))
    assert breaker.status()["remaining_sec"] <= 600
    with pytest.raises(mg.MLXCooldownActive) as info:
        breaker.check()
    assert info.value.remaining_sec <= 600
    repaired = json.loads(Path(breaker.state_path).read_text())
    assert repaired["cooldown_until"] <= time.time() + 600


def test_unwritable_state_still_blocks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "state").mkdir()
    breaker = _breaker(tmp_path, state_path=tmp_path / "state")
    _panic(tmp_path, "a.panic", ago=30, pid=1)
    _panic(tmp_path, "b.panic", ago=20, pid=2)
    with (
        caplog.at_level(logging.WARNING, logger="metal_guard"),
        pytest.raises(mg.MLXCooldownActive),
    ):
        breaker.check()
    assert "cannot record the breaker trip" in caplog.text


def test_symlinked_state_is_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"cooldown_until": time.time() + 999, "cooldown_sec": 3600}))
    (tmp_path / "state.json").symlink_to(target)
    breaker = _breaker(tmp_path, state_path=tmp_path / "state.json")
    status = breaker.status()
    assert status["cooling_down"] is False  # not read through the link ...
    assert "breaker state unreadable" in status["problem"]  # ... and said so
    _panic(tmp_path, "a.panic", ago=30, pid=1)
    _panic(tmp_path, "b.panic", ago=20, pid=2)
    with pytest.raises(mg.MLXCooldownActive):  # the trip still blocks this process
        breaker.check()
    assert json.loads(target.read_text())["cooldown_sec"] == 3600  # not written through it
    assert (tmp_path / "state.json").is_symlink()
    with pytest.raises(OSError) as info:
        breaker.clear()
    assert info.value.errno == errno.ELOOP


def test_unwritable_archive_still_counts_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "archive").mkdir()
    breaker = _breaker(tmp_path, jsonl_path=tmp_path / "archive")
    _panic(tmp_path, "a.panic", ago=30, pid=1)
    _panic(tmp_path, "b.panic", ago=20, pid=2)
    with (
        caplog.at_level(logging.WARNING, logger="metal_guard"),
        pytest.raises(mg.MLXCooldownActive),
    ):
        breaker.check()
    assert "cannot archive panic reports" in caplog.text


def test_check_is_cheap_when_nothing_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(20):
        _panic(tmp_path, f"{i}.panic", ago=10_000 + i, pid=i)
    breaker = _breaker(tmp_path)
    breaker.check()
    reads = spy_report_reads(monkeypatch)
    locks = spy_file_locks(monkeypatch)
    for _ in range(3):
        breaker.check()
    assert locks == []  # no archive lock taken
    assert [path for path, _ in reads if path.endswith(".panic")] == []  # no report read again


# -- across processes ------------------------------------------------------------

_CHECK_WORKER = textwrap.dedent(
    """
    import json, sys, time
    import metal_guard as mg
    start, report_dir = float(sys.argv[1]), sys.argv[2]
    while time.time() < start:
        time.sleep(0.001)
    try:
        mg.CircuitBreaker(report_dir=report_dir).check()
        print(json.dumps({"blocked": False}))
    except mg.MLXCooldownActive as exc:
        print(json.dumps({"blocked": True, "until": exc.cooldown_until, "count": exc.panic_count}))
    """
)


def _run_workers(
    n: int, report_dir: Path, mg_home: str, delay: float = 0.0
) -> list[dict[str, Any]]:
    env = child_env(METALGUARD_HOME=mg_home)
    start = time.time() + delay
    procs = [
        spawn_python(
            _CHECK_WORKER,
            str(start),
            str(report_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    return results


@pytest.mark.multiprocess
def test_cooldown_survives_a_process_restart(tmp_path: Path, mg_home: str) -> None:
    _panic(tmp_path, "a.panic", ago=30, pid=1)
    _panic(tmp_path, "b.panic", ago=20, pid=2)
    (first,) = _run_workers(1, tmp_path / "reports", mg_home)
    assert first["blocked"] is True
    for path in (tmp_path / "reports").iterdir():  # the reports are gone after the trip
        path.unlink()
    (second,) = _run_workers(1, tmp_path / "reports", mg_home)
    assert second == first
    with pytest.raises(mg.MLXCooldownActive) as info:
        mg.CircuitBreaker(report_dir=tmp_path / "reports").check()
    assert info.value.cooldown_until == first["until"]


@pytest.mark.multiprocess
def test_concurrent_checks_trip_once(tmp_path: Path, mg_home: str) -> None:
    for i in range(3):
        _panic(tmp_path, f"{i}.panic", ago=100 + i, pid=i, kind=("492", "219", "528")[i])
    results = _run_workers(8, tmp_path / "reports", mg_home, delay=1.5)
    assert all(r["blocked"] for r in results)
    assert len({r["until"] for r in results}) == 1  # one consistent trip
    state = json.loads(Path(mg_home, "breaker.json").read_text())
    assert state["cooldown_until"] == results[0]["until"]
    assert Path(mg_home, "breadcrumbs.log").read_text().count("BREAKER_TRIP:") == 1
    archive = Path(mg_home, "panics.jsonl").read_text().splitlines()
    assert len(archive) == 3 and all(json.loads(line) for line in archive)
    assert not [n for n in os.listdir(mg_home) if n.endswith(".tmp") or ".corrupt-" in n]
