"""The reentrant lock primitive (``_FileLock``): per-process and per-thread holds, OS truth.

Cross-process claims use real processes: a child probes the lock with a non-blocking
``flock`` on its own descriptor, which is what another process would see.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import metal_guard as mg
from helpers import run_python

PROBE_CODE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held")
"""


def _seen_from_another_process(lock: str) -> str:
    out = run_python(PROBE_CODE, lock, check=True)
    return out.stdout.strip()


@pytest.mark.multiprocess
def test_per_process_lock_is_held_until_the_last_release(tmp_path: Path) -> None:
    lock = str(tmp_path / "x.lock")
    first, second = (
        mg._FileLock(lock, None, per_thread=False),
        mg._FileLock(lock, None, per_thread=False),
    )
    assert first.acquire() is True  # took the OS lock
    assert second.acquire() is False  # re-entry: counted, no second flock
    assert first.count == 2
    assert first.release() is False
    assert _seen_from_another_process(lock) == "held"  # one release must not drop it
    assert second.release() is True
    assert _seen_from_another_process(lock) == "free"
    assert first.release() is False  # an extra release is harmless
    assert Path(lock).exists()  # the lock file is never deleted


def test_per_process_lock_is_shared_by_threads(tmp_path: Path) -> None:
    lock = mg._FileLock(str(tmp_path / "x.lock"), 0, per_thread=False)
    lock.acquire()
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(lock.acquire()))
    worker.start()
    worker.join(10)
    assert results == [False] and lock.count == 2  # the process is the holder
    lock.release()
    lock.release()
    assert lock.count == 0


def test_per_thread_lock_excludes_other_threads_and_reenters(tmp_path: Path) -> None:
    path = str(tmp_path / "x.lock")
    lock = mg._FileLock(path, 0.2)
    with lock:
        with lock:  # the same thread re-enters
            assert lock.count == 2 and lock.held_by_me()
        errors: list[BaseException] = []

        def other() -> None:
            try:
                mg._FileLock(path, 0.2).acquire()
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=other)
        worker.start()
        worker.join(10)
        assert len(errors) == 1 and isinstance(errors[0], mg.StateLockTimeout)
        assert lock.held_by_me()
    assert lock.count == 0


def test_waiting_thread_gets_the_lock_when_it_is_released(tmp_path: Path) -> None:
    path = str(tmp_path / "x.lock")
    order: list[str] = []
    holder = mg._FileLock(path, None)
    holder.acquire()

    def waiter() -> None:
        with mg._FileLock(path, 10):
            order.append("waiter")

    worker = threading.Thread(target=waiter)
    worker.start()
    time.sleep(0.1)
    order.append("holder")
    holder.release()
    worker.join(10)
    assert order == ["holder", "waiter"]


def _flock_unsupported(fd: int, op: int) -> None:
    raise OSError(errno.ENOLCK, "No locks available")


def test_exclusion_lock_refuses_to_run_unlocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NFS/SMB-like filesystem is faked by making ``flock`` fail with ENOLCK."""
    import fcntl

    monkeypatch.setattr(fcntl, "flock", _flock_unsupported)
    path = str(tmp_path / "gpu.lock")
    lock = mg._FileLock(path, 1, must_exclude=True, env_var="METALGUARD_GPU_LOCK_PATH")
    with pytest.raises(mg.LockUnsupported) as info:
        lock.acquire()
    assert info.value.lock_path == path
    assert "METALGUARD_GPU_LOCK_PATH" in str(info.value) and path in str(info.value)
    assert lock.count == 0  # nothing is held after the refusal
    # a state-file lock carries on unlocked (and says so once)
    with mg._FileLock(str(tmp_path / "s.lock"), 1) as state_lock:
        assert state_lock.count == 1


def test_cadence_store_is_not_fsynced_but_breaker_state_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = mg.os.fsync
    monkeypatch.setattr(mg.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(mg, "_breadcrumb", lambda msg: None)  # breadcrumbs fsync by design
    mg.CadenceGuard(tmp_path / "c.json").mark_load("org/model")
    assert (tmp_path / "c.json").exists() and synced == []
    mg._JsonFile(str(tmp_path / "b.json"), durable=True).update(lambda d: d.update(x=1))
    assert len(synced) == 2  # the file and its folder


@pytest.mark.multiprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the zombie")
def test_an_exited_unreaped_child_counts_as_gone(tmp_path: Path) -> None:
    """A zombie's memory is freed already: the reclaim wait must not run to its bound."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(200):  # until it has exited (still unreaped: a zombie)
        if Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] == "Z":
            break
        time.sleep(0.01)
    try:
        assert mg._pid_alive(child.pid) is True  # kill(pid, 0) still sees it
        assert mg._pid_running(child.pid) is False
        started = time.monotonic()
        mg._await_release(5.0, reclaimed_from=child.pid)
        assert time.monotonic() - started < 2.5  # not the 5 s bound
    finally:
        child.wait()
    assert mg._pid_running(child.pid) is False
