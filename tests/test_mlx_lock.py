"""Section 4.6 — the MLX lock: an OS lock (``flock``) that excludes, never goes stale,
counts holds per process and never SIGKILLs.

Real processes, real ``flock``. The racers are 16 persistent interpreters that each run
40 trials, released together through their stdin pipes; every holder records when it
entered and left, and the intervals must never overlap.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import metal_guard as mg
from helpers import python_child, read_line, run_python, stop_child

RACER = r"""
import json, os, sys, time
import metal_guard as mg
print("ready", flush=True)
for line in sys.stdin:
    trial = int(line)
    try:
        info = mg.acquire_mlx_lock(f"racer-{os.getpid()}-{trial}")
    except mg.MLXLockConflict as exc:
        print(json.dumps({"trial": trial, "held": False, "holder": exc.holder.get("pid")}), flush=True)
        continue
    enter = time.monotonic()
    seen = mg.read_mlx_lock()
    time.sleep(0.002)
    leave = time.monotonic()
    mg.release_mlx_lock()
    print(json.dumps({"trial": trial, "held": True, "enter": enter, "leave": leave,
                      "info_pid": info["pid"], "seen_pid": seen and seen["pid"]}), flush=True)
"""

HOLDER = r"""
import os, signal, sys, time
import metal_guard as mg
if sys.argv[1] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
mg.acquire_mlx_lock("holder " + sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
"""


def _lock_path(home: str) -> Path:
    return Path(home) / "mlx_exclusive.lock"


def _record(home: str) -> dict[str, object]:
    """The holder record written into the lock file itself (a "free" one after release)."""
    data: dict[str, object] = json.loads(_lock_path(home).read_text())
    return data


def _start_holder(mode: str = "plain") -> subprocess.Popen[str]:
    proc = python_child(HOLDER, mode)
    assert read_line(proc) == "held"
    return proc


def _other_process_sees() -> dict[str, object] | None:
    """What another process reads (and whether it could take the lock)."""
    code = (
        "import json, metal_guard as mg\n"
        "seen = mg.read_mlx_lock()\n"
        "try:\n"
        "    mg.acquire_mlx_lock('probe'); took = True; mg.release_mlx_lock()\n"
        "except mg.MLXLockConflict:\n"
        "    took = False\n"
        "print(json.dumps({'seen': seen, 'took': took}))\n"
    )
    out = run_python(code, check=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.fixture(autouse=True)
def _no_holds_left() -> object:
    yield
    while mg.release_mlx_lock():
        pass


# -- exclusion across processes ------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sixteen_processes_forty_trials_never_two_holders(mg_home: str) -> None:
    racers = [python_child(RACER) for _ in range(16)]
    try:
        for proc in racers:
            assert read_line(proc) == "ready"
        intervals: list[tuple[float, float, int]] = []
        conflicts = 0
        for trial in range(40):
            for proc in racers:  # release all 16 at (nearly) the same instant
                assert proc.stdin is not None
                proc.stdin.write(f"{trial}\n")
                proc.stdin.flush()
            results = [json.loads(read_line(proc)) for proc in racers]
            assert {r["trial"] for r in results} == {trial}
            held = [r for r, p in zip(results, racers, strict=True) if r["held"]]
            assert held, f"trial {trial}: nobody got the lock"
            for r, proc in zip(results, racers, strict=True):
                if r["held"]:
                    assert r["info_pid"] == r["seen_pid"] == proc.pid
                    intervals.append((r["enter"], r["leave"], proc.pid))
                else:
                    conflicts += 1
                    assert r["holder"] in {p.pid for p in racers} | {None}
        intervals.sort()
        overlaps = [(a, b) for a, b in itertools.pairwise(intervals) if b[0] < a[1]]
        assert overlaps == [], overlaps[:3]
        assert len(intervals) + conflicts == 16 * 40
        assert len(intervals) >= 40
    finally:
        for proc in racers:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in racers:
            proc.wait(timeout=60)
    assert [p.returncode for p in racers] == [0] * 16
    assert mg.read_mlx_lock() is None


@pytest.mark.multiprocess
def test_holder_killed_with_sigkill_frees_the_lock_at_once(mg_home: str) -> None:
    proc = _start_holder()
    holder = mg.read_mlx_lock()
    assert holder is not None and holder["pid"] == proc.pid
    assert holder["label"] == "holder plain"
    with pytest.raises(mg.MLXLockConflict) as info:
        mg.acquire_mlx_lock("me")
    assert info.value.holder["pid"] == proc.pid
    proc.kill()
    proc.wait(timeout=30)
    stop_child(proc)
    # the dead holder's details are still on disk, but the OS lock says nobody holds it
    assert _record(mg_home)["pid"] == proc.pid
    assert mg.read_mlx_lock() is None
    info_now = mg.acquire_mlx_lock("after the kill")
    assert info_now["pid"] == os.getpid() and info_now["label"] == "after the kill"
    assert _record(mg_home)["pid"] == os.getpid()


@pytest.mark.multiprocess
def test_info_file_naming_a_live_unrelated_pid_does_not_block(mg_home: str) -> None:
    """After a reboot the pid in a leftover info file may belong to anything."""
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_path(mg_home).write_text(
            json.dumps(
                {
                    "pid": unrelated.pid,
                    "label": "before the reboot",
                    "started_at": "x",
                    "cmdline": "",
                }
            )
        )
        assert mg.read_mlx_lock() is None
        info = mg.acquire_mlx_lock("fresh", force=True)
        assert info["pid"] == os.getpid()
        assert unrelated.poll() is None  # force=True did not signal it: it held nothing
        assert mg.read_mlx_lock() == info
    finally:
        unrelated.kill()
        unrelated.wait()


@pytest.mark.multiprocess
def test_nested_holds_keep_the_lock_until_the_last_release(mg_home: str) -> None:
    first = mg.acquire_mlx_lock("outer")
    second = mg.acquire_mlx_lock("inner")
    assert second == first  # re-entry: the first hold's details
    with mg.mlx_exclusive_lock("innermost") as third:
        assert third == first
    assert mg.release_mlx_lock() is True
    seen = _other_process_sees()
    assert seen is not None and seen["took"] is False
    assert seen["seen"] == first
    assert mg.release_mlx_lock() is True
    seen = _other_process_sees()
    assert seen is not None and seen == {"seen": None, "took": True}
    assert mg.release_mlx_lock() is False
    assert _record(mg_home)["pid"] is None  # the last release left a "free" record


def test_threads_of_one_process_share_the_hold(mg_home: str) -> None:
    import threading

    mg.acquire_mlx_lock("main thread")
    results: list[dict[str, object]] = []
    thread = threading.Thread(target=lambda: results.append(mg.acquire_mlx_lock("thread")))
    thread.start()
    thread.join(10)
    assert results and results[0]["label"] == "main thread"
    assert mg.release_mlx_lock() and mg.release_mlx_lock()
    assert mg.read_mlx_lock() is None


# -- force -----------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_force_against_a_holder_that_ignores_sigterm_times_out_and_never_kills(
    mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "1")
    proc = _start_holder("ignore-term")
    try:
        started = time.monotonic()
        with pytest.raises(mg.MLXLockConflict) as info:
            mg.acquire_mlx_lock("forcer", force=True)
        waited = time.monotonic() - started
        holder = info.value.holder
        assert holder["force_timeout"] is True and holder["pid"] == proc.pid
        assert "not killed" in holder["message"] and "MLX_FORCE_WAIT_SEC" in str(info.value)
        assert 1.0 <= waited < 10.0
        assert proc.poll() is None  # still alive: SIGTERM was ignored and nothing else was sent
        assert mg.read_mlx_lock() is not None and mg.read_mlx_lock()["pid"] == proc.pid  # type: ignore[index]
        copy = pickle.loads(pickle.dumps(info.value))
        assert type(copy) is mg.MLXLockConflict and copy.holder == holder
    finally:
        stop_child(proc)


@pytest.mark.multiprocess
def test_force_sigterms_the_holder_and_takes_the_lock(
    mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "20")
    monkeypatch.setenv("MLX_RECLAIM_COOLDOWN_SEC", "0")
    proc = _start_holder()
    try:
        info = mg.acquire_mlx_lock("forcer", force=True)
        assert info["pid"] == os.getpid()
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        stop_child(proc)
    crumbs = (Path(mg_home) / "breadcrumbs.log").read_text()
    assert f"MLX_LOCK: FORCE SIGTERM pid={proc.pid} (holder plain) for forcer" in crumbs


def test_force_refuses_when_the_holder_pid_is_unknown(
    mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another open file description of this process holds the flock but no info says who."""
    import fcntl

    path = _lock_path(mg_home)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(mg.MLXLockConflict) as info:
            mg.acquire_mlx_lock("forcer", force=True)
        assert info.value.holder["pid"] is None
        assert "pid is unknown" in str(info.value)
    finally:
        os.close(fd)


# -- paths, environment, unsupported filesystems -----------------------------------------


def test_lock_path_is_read_at_call_time(
    mg_home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moved = tmp_path / "elsewhere" / "mlx.lock"
    monkeypatch.setenv("MLX_LOCK_PATH", str(moved))
    mg.acquire_mlx_lock("moved")
    assert json.loads(moved.read_text())["label"] == "moved"
    assert not _lock_path(mg_home).exists()
    monkeypatch.setenv("MLX_LOCK_PATH", "  ")  # empty means unset
    assert mg.read_mlx_lock() is None  # the default path is free
    monkeypatch.setenv("MLX_LOCK_PATH", str(moved))
    assert mg.release_mlx_lock() is True
    assert json.loads(moved.read_text())["pid"] is None


def test_unsupported_filesystem_raises_instead_of_running_unlocked(
    mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fakes only what cannot run here: a filesystem whose flock fails with ENOLCK."""
    import fcntl

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(mg.LockUnsupported) as info:
        mg.acquire_mlx_lock("x")
    assert "MLX_LOCK_PATH" in str(info.value) and str(_lock_path(mg_home)) in str(info.value)
    assert mg.release_mlx_lock() is False


def test_conflict_message_and_pickling() -> None:
    holder = {
        "pid": 4242,
        "label": "batch job",
        "started_at": "2026-01-02T03:04:05Z",
        "cmdline": "python job.py",
    }
    exc = mg.MLXLockConflict(holder)
    assert isinstance(exc, RuntimeError) and exc.holder == holder
    text = str(exc)
    for part in (
        "'batch job'",
        "pid 4242",
        "2026-01-02T03:04:05Z",
        "'python job.py'",
        "force=True",
    ):
        assert part in text
    copy = pickle.loads(pickle.dumps(exc))
    assert copy.holder == holder and str(copy) == text


# -- forked children do not keep the lock (fixed in _FileLock) ----------------------------

FORKER = r"""
import os, sys, time
import metal_guard as mg
mg.acquire_mlx_lock("forker")
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
mg.release_mlx_lock()
print("released", flush=True)
sys.stdin.readline()
"""


@pytest.mark.multiprocess
def test_a_forked_child_does_not_keep_the_lock_after_the_parent_released(mg_home: str) -> None:
    proc = python_child(FORKER)
    grandchild = int(read_line(proc))
    try:
        assert read_line(proc) == "released"
        assert os.kill(grandchild, 0) is None  # the forked child is alive ...
        assert mg.read_mlx_lock() is None  # ... and holds nothing
        assert mg.acquire_mlx_lock("next")["pid"] == os.getpid()
    finally:
        try:
            os.kill(grandchild, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stop_child(proc)


# -- reading when the probe cannot tell, and reading never writes ----------------------

ORIGINAL_HOLDER_KEYS = {"pid", "label", "started_at", "cmdline"}


def _fake_probe_failure(fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fakes what cannot be produced here (the tests run as root, on a local disk with
    ``flock``): a lock file another user owns (mode 0600: ``EACCES`` on open), a system without
    ``fcntl``, and a filesystem whose ``flock`` fails with ``ENOLCK``."""
    if fault == "eacces":
        real_open = os.open

        def no_read(path: object, flags: int, *args: object) -> int:
            reading = not flags & (os.O_WRONLY | os.O_RDWR)
            if str(path).endswith(".lock") and reading and os.path.exists(path):  # type: ignore[arg-type]
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", no_read)
    elif fault == "no-fcntl":
        monkeypatch.setitem(sys.modules, "fcntl", None)  # ``import fcntl`` raises ImportError
    else:
        import fcntl

        def no_locks(fd: int, op: int) -> None:
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(fcntl, "flock", no_locks)


@pytest.mark.parametrize("fault", ["eacces", "no-fcntl", "enolck"])
def test_a_lock_that_cannot_be_probed_reads_as_held_by_an_unknown_holder(
    fault: str, mg_home: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probe failure is faked (see ``_fake_probe_failure``): "cannot tell" must read as
    held, never as free."""
    _lock_path(mg_home).write_text("")
    (Path(mg_home) / "gpu.lock").write_text("")
    _fake_probe_failure(fault, monkeypatch)
    holder = mg.read_mlx_lock()
    assert holder is not None and set(holder) >= ORIGINAL_HOLDER_KEYS
    assert holder["pid"] is None and holder["label"] == "" and holder["started_at"] is None
    assert "Cannot tell whether it is held" in holder["note"]
    assert {"eacces": "Permission denied", "no-fcntl": "fcntl", "enolck": "No locks"}[
        fault
    ] in holder["note"]
    gate = mg.read_gpu_gate()
    assert gate is not None and gate["pid"] is None
    assert set(gate) >= ORIGINAL_HOLDER_KEYS | {"thread", "since"}
    assert "Cannot tell whether it is held" in gate["note"]
    assert "Cannot tell whether it is held" in str(mg.MLXLockConflict(holder))
    assert mg.main(["lock", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["mlx_lock"]["holder"]["note"] == holder["note"]
    assert doc["gpu_gate"]["holder"]["pid"] is None
    assert mg.main(["lock"]) == 0
    text = capsys.readouterr().out
    assert "free" not in text and text.count("held by pid unknown") == 2
    assert text.count("Cannot tell whether it is held") == 2  # the text says why, too


@pytest.mark.parametrize("fault", ["eacces", "no-fcntl", "enolck"])
def test_a_missing_lock_file_is_free_whatever_the_probe_fault(
    fault: str, mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same faked faults; nobody can hold a lock file that does not exist."""
    _fake_probe_failure(fault, monkeypatch)
    assert mg.read_mlx_lock() is None and mg.read_gpu_gate() is None
    assert list(Path(mg_home).iterdir()) == []


def test_reading_while_another_thread_takes_the_lock_writes_nothing(
    mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window between another thread's OS acquire and its holder record is opened on
    purpose: that thread's lock object is wrapped to pause right after the real ``flock``."""
    import threading

    real_file_lock = mg._MLX_LOCK.file_lock
    taken, go_on = threading.Event(), threading.Event()

    class PausedAfterAcquire:
        def __init__(self, lock: object) -> None:
            self._lock = lock

        def __getattr__(self, name: str) -> object:
            return getattr(self._lock, name)

        def acquire(self, wait: float | None = None) -> bool:
            took: bool = self._lock.acquire(wait)  # type: ignore[attr-defined]
            taken.set()
            go_on.wait(30)
            return took

    def file_lock(path: str) -> object:
        lock = real_file_lock(path)
        return PausedAfterAcquire(lock) if threading.current_thread().name == "taker" else lock

    monkeypatch.setattr(mg._MLX_LOCK, "file_lock", file_lock)
    results: list[dict[str, object]] = []
    taker = threading.Thread(
        target=lambda: results.append(mg.acquire_mlx_lock("taker")), name="taker"
    )
    taker.start()
    try:
        assert taken.wait(30)
        seen = mg.read_mlx_lock()
        assert seen is not None and seen["pid"] == os.getpid() and seen["label"] == ""
        assert set(seen) >= ORIGINAL_HOLDER_KEYS
        assert not _lock_path(mg_home).read_text().strip()  # read wrote nothing
    finally:
        go_on.set()
        taker.join(30)
    assert results and results[0]["label"] == "taker"
    assert _record(mg_home)["label"] == "taker"
    assert mg.read_mlx_lock() == results[0]
