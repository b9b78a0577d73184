"""State files section: locks, locked JSON read-modify-write, atomic writes, appends.

Everything here uses real files, real ``flock`` locks and real processes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

import metal_guard as mg
from helpers import holding_lock_in_child, spawn_python, warnings_from

INCREMENT_CODE = """
import sys, metal_guard as mg
path, n = sys.argv[1], int(sys.argv[2])
def bump(data):
    data["count"] = data.get("count", 0) + 1
for _ in range(n):
    mg._JsonFile(path, durable=True, lock_timeout=60).update(bump)
"""


@pytest.mark.multiprocess
def test_eight_processes_increment_exactly(tmp_path: Path) -> None:
    path = str(tmp_path / "counter.json")
    for _round in range(2):  # "every time": the exact total twice in a row
        procs = [spawn_python(INCREMENT_CODE, path, "200") for _ in range(8)]
        assert [p.wait(timeout=300) for p in procs] == [0] * 8
    data = json.loads(Path(path).read_text())
    assert data == {"count": 2 * 8 * 200}
    # the lock file stays (never deleted); no temp files are left behind
    assert (tmp_path / "counter.json.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter.json", "counter.json.lock"]


HAMMER_CODE = """
import sys, metal_guard as mg
path = sys.argv[1]
def bump(data):
    data["count"] = data.get("count", 0) + 1
    data["blob"] = "x" * (data["count"] % 5000)
sys.stdout.write("ready\\n"); sys.stdout.flush()
while True:
    mg._JsonFile(path, durable=True, lock_timeout=60).update(bump)
"""


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigkilled_writers_never_corrupt_or_hold_the_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    rng = random.Random(1234)
    kills = 0
    last_count = 0
    # Two writers at a time, killed at random moments; 200+ kills in all.
    while kills < 200:
        procs = [spawn_python(HAMMER_CODE, path, stdout=subprocess.PIPE) for _ in range(2)]
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.03))
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
            kills += 1
        # The file always parses, the count never goes backwards (no lost state) ...
        if os.path.exists(path):
            data = json.loads(Path(path).read_text())
            assert isinstance(data, dict)
            assert data.get("count", 0) >= last_count
            last_count = data.get("count", 0)
        # ... and the lock is free again: the OS released it with the process.
        with mg._FileLock(path + ".lock", timeout=2.0):
            pass
    assert last_count > 0
    # A later write sweeps the temp files that killed writers left behind.
    mg._JsonFile(path, durable=True).update(lambda d: d.update(final=True))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_update_json_returns_result_and_writes_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    assert mg._JsonFile(str(path), durable=True).update(lambda d: d.setdefault("a", 1)) == 1
    assert json.loads(path.read_text()) == {"a": 1}
    mtime = path.stat().st_mtime_ns
    inode = path.stat().st_ino
    assert mg._JsonFile(str(path), durable=True).update(lambda d: d["a"]) == 1
    assert path.stat().st_ino == inode and path.stat().st_mtime_ns == mtime  # unchanged → no write


def test_state_folder_and_file_modes(tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "home"
    path = folder / "s.json"
    mg._JsonFile(str(path), durable=True).update(lambda d: d.update(x=1))
    assert (folder.stat().st_mode & 0o777) == 0o700
    assert (path.stat().st_mode & 0o777) == 0o600
    assert ((folder / "s.json.lock").stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize(
    "garbage",
    [b"{not json", b"[1, 2, 3]", b"\xff\xfe\x00garbage", b'"a string"', b"null", b"{" * 100000],
)
def test_corrupt_file_is_quarantined_with_one_warning(
    tmp_path: Path, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        mg._JsonFile(str(path), durable=True).update(lambda d: d.update(ok=True))
    assert json.loads(path.read_text()) == {"ok": True}
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("s.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage  # nothing lost: kept aside
    (warning,) = warnings_from(caplog)
    assert "moved it to" in warning.getMessage() and aside[0].name in warning.getMessage()


def test_read_never_writes_and_names_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(b"garbage")
    data, problem = mg._JsonFile(str(path), durable=True).read()
    assert data == {} and problem is not None and "not valid JSON" in problem
    assert path.read_bytes() == b"garbage"
    assert mg._JsonFile(str(tmp_path / "missing.json"), durable=True).read() == ({}, None)
    assert not (tmp_path / "missing.json").exists()


def test_symlinked_store_is_never_written_through(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "s.json"
    link.symlink_to(target)
    with pytest.raises(OSError) as info:
        mg._JsonFile(str(link), durable=True).update(lambda d: d.update(x=1))
    assert info.value.errno == errno.ELOOP
    assert target.read_text() == "keep me" and link.is_symlink()
    with pytest.raises(OSError) as info:
        mg._append_bytes(str(link), b"line\n")
    assert info.value.errno == errno.ELOOP
    assert target.read_text() == "keep me"


def test_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "s.json.lock").symlink_to(target)
    with pytest.raises(OSError) as info:
        mg._JsonFile(str(tmp_path / "s.json"), durable=True).update(lambda d: d.update(x=1))
    assert info.value.errno == errno.ELOOP
    assert not (tmp_path / "s.json").exists()


def test_directory_where_a_file_should_be(tmp_path: Path) -> None:
    (tmp_path / "s.json").mkdir()
    with pytest.raises(IsADirectoryError):
        mg._JsonFile(str(tmp_path / "s.json"), durable=True).update(lambda d: d.update(x=1))
    assert (tmp_path / "s.json").is_dir()


def test_file_where_the_state_folder_should_be(tmp_path: Path) -> None:
    (tmp_path / "home").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="state folder is not a directory"):
        mg._JsonFile(str(tmp_path / "home" / "s.json"), durable=True).update(
            lambda d: d.update(x=1)
        )
    assert (tmp_path / "home").read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_no_permission_raises_oserror(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            mg._JsonFile(str(folder / "s.json"), durable=True).update(lambda d: d.update(x=1))
    finally:
        folder.chmod(0o700)


@pytest.mark.multiprocess
def test_lock_timeout_is_a_clear_picklable_error(tmp_path: Path) -> None:
    lock = str(tmp_path / "s.json.lock")
    with holding_lock_in_child(lock):
        with pytest.raises(mg.StateLockTimeout) as info:
            mg._FileLock(lock, timeout=0.2).acquire()
        err = info.value
        assert isinstance(err, TimeoutError)
        assert err.lock_path == lock and err.timeout == 0.2
        assert "another process holds it" in str(err)
        again = pickle.loads(pickle.dumps(err))
        assert (again.lock_path, again.timeout, str(again)) == (
            err.lock_path,
            err.timeout,
            str(err),
        )
    with mg._FileLock(lock, timeout=2):  # released when the holder died
        pass


def test_flock_unsupported_fails_open_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Network filesystems answer ENOLCK/ENOSYS; that cannot be produced here, so flock is
    # replaced for this one test.
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    path = str(tmp_path / "s.json")
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        for _ in range(3):
            mg._JsonFile(path, durable=True).update(lambda d: d.update(n=d.get("n", 0) + 1))
    assert json.loads(Path(path).read_text()) == {"n": 3}
    (warning,) = warnings_from(caplog)
    assert "cannot lock" in warning.getMessage()


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    mg._atomic_write_bytes(str(path), b"one")
    mg._atomic_write_bytes(str(path), b"two" * 1000)
    assert path.read_bytes() == b"two" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    assert (path.stat().st_mode & 0o777) == 0o600


def test_append_is_one_line_per_call(tmp_path: Path) -> None:
    path = tmp_path / "log"
    sizes = [mg._append_bytes(str(path), f"line {i}\n".encode()) for i in range(5)]
    assert sizes == sorted(sizes) and sizes[-1] == path.stat().st_size
    assert path.read_text().splitlines() == [f"line {i}" for i in range(5)]
