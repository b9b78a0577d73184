"""Section 4.8 — the GPU gate: one MLX workload at a time across the threads and
processes of the host (``exclusive_gpu``, ``subprocess_inference_guard(exclusive=...)``).

Real processes and threads, real ``flock``. Bodies record when they entered and left;
the intervals must never overlap while the gate is on, and do overlap without it (the
control run proves the detector sees concurrency when there is some).
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import gpu_gate_held_by_another_thread, python_child, read_line, stop_child

BODIES = r"""
import json, sys, threading, time
import metal_guard as mg
exclusive = sys.argv[1] == "1"
records = []
def work(name):
    for i in range(20):
        with mg.subprocess_inference_guard(f"model-{name}", exclusive=exclusive):
            enter = time.monotonic()
            time.sleep(0.02)
            records.append((enter, time.monotonic(), name))
print("ready", flush=True)
sys.stdin.readline()
threads = [threading.Thread(target=work, args=(f"{i}",)) for i in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(records), flush=True)
"""

HOLDER = r"""
import sys, time
import metal_guard as mg
with mg.exclusive_gpu(sys.argv[1]):
    print("inside", flush=True)
    sys.stdin.readline()
"""


def _run_bodies(exclusive: bool) -> list[tuple[float, float, str]]:
    procs = [
        python_child(BODIES, "1" if exclusive else "0", env={"METALGUARD_BREADCRUMB_PATH": ""})
        for _ in range(4)
    ]
    try:
        for proc in procs:
            assert read_line(proc) == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        records = []
        for index, proc in enumerate(procs):
            for enter, leave, name in json.loads(read_line(proc, timeout=120)):
                records.append((enter, leave, f"{index}/{name}"))
    finally:
        for proc in procs:
            stop_child(proc)
    assert len(records) == 4 * 2 * 20
    return sorted(records)


def _overlaps(records: list[tuple[float, float, str]]) -> list[Any]:
    return [(a, b) for a, b in itertools.pairwise(records) if b[0] < a[1]]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_four_processes_two_threads_each_never_overlap_with_the_gate(mg_home: str) -> None:
    gated = _run_bodies(exclusive=True)
    assert _overlaps(gated) == []
    # 160 bodies of 20 ms one after the other take at least 3.2 s
    assert gated[-1][1] - gated[0][0] >= 160 * 0.02
    free = _run_bodies(exclusive=False)
    assert len(_overlaps(free)) > 20  # without the gate they run concurrently


# Two processes × two threads, each taking the gate in a tight loop (release → retake at
# once). ``gate`` uses exclusive_gpu; ``bare`` the same loop on a plain flock polled until a
# deadline (_FileLock with a timeout), which is what the gate was: the control proves the
# count can fail. (A flock blocked in the kernel, _FileLock(path, None), hands over more.)
TIGHT_LOOP = r"""
import json, sys, threading, time
import metal_guard as mg
mode, path, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
records = []
def gate():
    return mg.exclusive_gpu("loop") if mode == "gate" else mg._FileLock(path, 3600.0)
def work():
    for _ in range(rounds):
        with gate():
            enter = time.monotonic()
            time.sleep(0.002)
            records.append((enter, time.monotonic()))
threads = [threading.Thread(target=work) for _ in range(2)]
print("ready", flush=True)
sys.stdin.readline()
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(records), flush=True)
"""


def _tight_loops(mode: str, path: str, rounds: int) -> list[tuple[float, float, int]]:
    procs = [python_child(TIGHT_LOOP, mode, path, str(rounds)) for _ in range(2)]
    try:
        for proc in procs:
            assert read_line(proc) == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        records = [
            (enter, leave, index)
            for index, proc in enumerate(procs)
            for enter, leave in json.loads(read_line(proc, timeout=120))
        ]
    finally:
        for proc in procs:
            stop_child(proc)
    assert len(records) == 2 * 2 * rounds
    return sorted(records)


def _handovers(records: list[tuple[float, float, int]]) -> int:
    """How often consecutive bodies belong to different processes."""
    return sum(a[2] != b[2] for a, b in itertools.pairwise(records))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_gate_is_handed_over_fairly_between_busy_processes(
    mg_home: str, tmp_path: Path
) -> None:
    rounds = 40  # per thread: 80 bodies per process, at most 159 changes of hands
    most = 2 * 2 * rounds - 1
    gated = _tight_loops("gate", "", rounds)
    assert _overlaps([(a, b, str(p)) for a, b, p in gated]) == []
    fair = _handovers(gated)
    assert fair >= 0.3 * most, (fair, most)
    bare = _handovers(_tight_loops("bare", str(tmp_path / "bare.lock"), rounds))
    assert bare < 0.3 * most, (bare, most)  # a plain flock stays with the process that has it
    assert mg.read_gpu_gate() is None


STUCK_WAITER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_SH)  # what a waiting process holds while it polls the gate
print("waiting", flush=True)
sys.stdin.readline()
"""


@pytest.mark.multiprocess
def test_a_waiter_that_never_takes_its_turn_delays_a_releaser_only_briefly(
    mg_home: str,
) -> None:
    """A waiter stopped (SIGSTOP) while queued: the releaser that let it go first retakes
    the gate after a bounded wait instead of waiting for it for ever."""
    proc = python_child(STUCK_WAITER, str(Path(mg_home) / "gpu.lock.queue"))
    try:
        assert read_line(proc) == "waiting"
        with mg.exclusive_gpu("first"):
            pass
        started = time.monotonic()
        with mg.exclusive_gpu("again", timeout=10):
            waited = time.monotonic() - started
        assert 0.2 <= waited < 5, waited  # it did wait for the waiter's turn, boundedly
    finally:
        stop_child(proc)
    with mg.exclusive_gpu("alone"):
        pass
    assert mg._GPU_GATE.turns(mg._gpu_lock_path()).left is None  # nobody waited: no deferral


@pytest.mark.multiprocess
def test_timeout_raises_gpubusy_naming_the_holder(mg_home: str) -> None:
    proc = python_child(HOLDER, "batch-generate")
    try:
        assert read_line(proc) == "inside"
        holder = mg.read_gpu_gate()
        assert holder is not None
        assert (holder["pid"], holder["label"], holder["thread"]) == (
            proc.pid,
            "batch-generate",
            "MainThread",
        )
        started = time.monotonic()
        with pytest.raises(mg.GPUBusy) as info, mg.exclusive_gpu("waiter", timeout=0.3):
            pytest.fail("the body must not run")
        assert 0.3 <= time.monotonic() - started < 5
        exc = info.value
        assert isinstance(exc, TimeoutError)
        assert exc.holder is not None and exc.holder["pid"] == proc.pid
        assert exc.timeout == 0.3 and exc.label == "waiter"
        for part in (f"pid {proc.pid}", "'batch-generate'", "0.3 s", "'waiter'", "gpu.lock"):
            assert part in str(exc)
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is mg.GPUBusy and copy.holder == exc.holder and str(copy) == str(exc)
    finally:
        stop_child(proc)


@pytest.mark.multiprocess
def test_a_holder_killed_mid_body_frees_the_gate(mg_home: str) -> None:
    proc = python_child(HOLDER, "doomed")
    assert read_line(proc) == "inside"
    assert mg.read_gpu_gate() is not None
    proc.kill()
    proc.wait(timeout=30)
    stop_child(proc)
    assert mg.read_gpu_gate() is None
    started = time.monotonic()
    with mg.exclusive_gpu("next", timeout=2):
        assert time.monotonic() - started < 1.0
        mine = mg.read_gpu_gate()
        assert mine is not None and (mine["pid"], mine["label"]) == (os.getpid(), "next")
    assert mg.read_gpu_gate() is None


def _wait_until_queued(mg_home: str) -> None:
    """Until a process holds the gate's queue: it found the gate busy and waits."""
    queue = str(Path(mg_home) / "gpu.lock.queue")
    deadline = time.monotonic() + 30
    while mg._lock_probe(queue, exclusive=True) is not True:
        assert time.monotonic() < deadline, f"nobody queued on {queue} within 30 s"
        time.sleep(0.01)


def _blocked_in_flock(pid: int) -> bool | None:
    """Whether ``pid``'s main thread sleeps in the kernel's lock wait, from 50 looks at
    Linux's ``/proc/<pid>/wchan`` ("0" while it runs); None where that cannot tell."""
    seen: set[str] = set()
    for _ in range(50):
        try:
            with open(f"/proc/{pid}/wchan", encoding="ascii") as f:
                wchan = f.read()
        except OSError:
            return None
        if "lock" in wchan:
            return True
        seen.add(wchan)
        time.sleep(0.02)
    return None if seen <= {"", "0"} else False


@pytest.mark.multiprocess
def test_a_waiter_without_timeout_is_handed_the_gate_when_its_holder_is_killed(
    mg_home: str,
) -> None:
    """A waiter with no timeout sleeps in ``flock`` (no polling); SIGKILL of the holder
    wakes it with the gate: a dead holder never leaves the gate stuck."""
    holder = python_child(HOLDER, "doomed")
    waiter = None
    try:
        assert read_line(holder) == "inside"
        waiter = python_child(HOLDER, "patient")
        _wait_until_queued(mg_home)
        blocked = _blocked_in_flock(waiter.pid)
        assert blocked in (True, None), "a waiter without timeout must sleep in flock"
        assert mg.read_gpu_gate()["pid"] == holder.pid  # type: ignore[index]
        holder.kill()
        holder.wait(timeout=30)
        assert read_line(waiter, timeout=30) == "inside"
        now = mg.read_gpu_gate()
        assert now is not None and (now["pid"], now["label"]) == (waiter.pid, "patient")
    finally:
        stop_child(holder)
        if waiter is not None:
            stop_child(waiter)
    assert mg.read_gpu_gate() is None


TIMED_WAITER = r"""
import sys, time
import metal_guard as mg
started = time.monotonic()
try:
    with mg.exclusive_gpu("timed", timeout=float(sys.argv[1])):
        print("ran", flush=True)
except mg.GPUBusy as exc:
    print(f"busy {time.monotonic() - started:.3f} {exc.holder and exc.holder['pid']}", flush=True)
"""


@pytest.mark.multiprocess
def test_a_timed_waiter_raises_gpubusy_after_its_timeout_while_an_untimed_one_waits_on(
    mg_home: str,
) -> None:
    """Beside a waiter that sleeps in ``flock``, one with a timeout still gives up after
    about its timeout naming the holder, which keeps the gate; the untimed one gets it
    once the holder leaves."""
    holder = python_child(HOLDER, "keeper")
    patient = timed = None
    try:
        assert read_line(holder) == "inside"
        patient = python_child(HOLDER, "patient")
        _wait_until_queued(mg_home)
        timed = python_child(TIMED_WAITER, "1.0")
        word, waited, pid = read_line(timed, timeout=60).split()
        assert word == "busy" and pid == str(holder.pid)
        assert 1.0 <= float(waited) < 10.0, waited
        assert mg.read_gpu_gate()["pid"] == holder.pid  # type: ignore[index]
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert read_line(patient, timeout=30) == "inside"
        assert mg.read_gpu_gate()["label"] == "patient"  # type: ignore[index]
    finally:
        for proc in (holder, patient, timed):
            if proc is not None:
                stop_child(proc)


def test_a_waiter_blocked_in_flock_still_logs_its_warnings_and_the_helper_thread_ends(
    mg_home: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The once-per-interval warning of a waiter asleep in ``flock`` (the holder is another
    process) comes from a helper thread, which is gone once nobody waits."""
    monkeypatch.setattr(mg, "_GPU_WAIT_WARN_SEC", 0.2)
    caplog.set_level(logging.WARNING, logger="metal_guard")
    holder = python_child(HOLDER, "other process")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "has waited" in r.getMessage()]

    def let_go() -> None:
        deadline = time.monotonic() + 20
        while len(warnings()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()

    try:
        assert read_line(holder) == "inside"
        releaser = threading.Thread(target=let_go)
        releaser.start()
        started = time.monotonic()
        with mg.exclusive_gpu("blocked"):
            waited = time.monotonic() - started
        releaser.join(30)
    finally:
        stop_child(holder)
    got = warnings()
    assert 3 <= len(got) <= waited / 0.2 + 1, (len(got), waited)
    assert all(f"pid {holder.pid}" in w and "'other process'" in w for w in got)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "metal_guard lock waits" not in [t.name for t in threading.enumerate()]:
            break
        time.sleep(0.02)
    assert "metal_guard lock waits" not in [t.name for t in threading.enumerate()]


def test_reentrant_in_one_thread_other_threads_wait(mg_home: str) -> None:
    events: list[str] = []

    def other() -> None:
        with mg.exclusive_gpu("other thread"):
            events.append("other in")

    with mg.exclusive_gpu("outer"):
        with mg.exclusive_gpu("inner"), mg.subprocess_inference_guard("m", exclusive=True):
            events.append("nested in")
            assert mg.read_gpu_gate()["label"] == "outer"  # type: ignore[index]
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.3)
        assert thread.is_alive()  # waiting: the outer hold is still ours
        events.append("outer out")
    thread.join(10)
    assert events == ["nested in", "outer out", "other in"]
    assert mg.read_gpu_gate() is None


def test_threads_take_the_gate_in_order_of_arrival_and_a_timeout_leaves_the_line(
    mg_home: str,
) -> None:
    line = mg._GPU_GATE.turns(mg._gpu_lock_path()).line
    order: list[int] = []

    def take(n: int) -> None:
        with mg.exclusive_gpu(f"thread {n}"):
            order.append(n)

    with gpu_gate_held_by_another_thread("holder"):
        threads = []
        for n in range(4):
            threads.append(threading.Thread(target=take, args=(n,)))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while len(line) < n + 2 and time.monotonic() < deadline:  # the holder + n + 1
                time.sleep(0.001)
            assert len(line) == n + 2
        with pytest.raises(mg.GPUBusy), mg.exclusive_gpu("impatient", timeout=0.1):
            pytest.fail("the body must not run")
        assert len(line) == 5  # the one that gave up left the line
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2, 3]
    assert line == [] and mg.read_gpu_gate() is None


def test_waiting_logs_one_warning_per_interval_naming_the_holder(
    mg_home: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(mg, "_GPU_WAIT_WARN_SEC", 0.2)
    caplog.set_level(logging.WARNING, logger="metal_guard")
    inside = threading.Event()

    def waiting_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "has waited" in r.getMessage()]

    def holder() -> None:
        with mg.exclusive_gpu("slow holder"):
            inside.set()
            deadline = time.monotonic() + 20
            while len(waiting_warnings()) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)

    thread = threading.Thread(target=holder, name="holder-thread")
    thread.start()
    assert inside.wait(10)
    started = time.monotonic()
    with mg.exclusive_gpu("patient"):
        waited = time.monotonic() - started
    thread.join(10)
    warnings = waiting_warnings()
    assert 3 <= len(warnings) <= waited / 0.2 + 1, (len(warnings), waited)
    assert all("'slow holder'" in w and "holder-thread" in w for w in warnings)
    assert "'patient' has waited" in warnings[0]


def test_guard_takes_the_gate_from_the_environment_when_exclusive_is_none(
    mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def holder_inside(**kwargs: Any) -> dict[str, Any] | None:
        with mg.subprocess_inference_guard("org/model", **kwargs):
            return mg.read_gpu_gate()

    assert holder_inside() is None
    monkeypatch.setenv("METALGUARD_EXCLUSIVE_GPU", "yes")
    seen = holder_inside()
    assert seen is not None and seen["label"] == "subprocess_inference_guard:org/model"
    assert holder_inside(exclusive=False) is None
    monkeypatch.setenv("METALGUARD_EXCLUSIVE_GPU", "0")
    assert holder_inside() is None
    assert holder_inside(exclusive=True) is not None
    assert mg.read_gpu_gate() is None


def test_guard_releases_the_gate_when_the_body_raises_and_as_a_decorator(mg_home: str) -> None:
    with pytest.raises(KeyError), mg.subprocess_inference_guard("m", exclusive=True):
        raise KeyError("boom")
    assert mg.read_gpu_gate() is None

    @mg.subprocess_inference_guard("m", exclusive=True)
    def generate() -> dict[str, Any] | None:
        return mg.read_gpu_gate()

    seen = generate()
    assert seen is not None and seen["label"] == "subprocess_inference_guard:m"
    assert mg.read_gpu_gate() is None
    assert "exclusive=True" in repr(mg.subprocess_inference_guard("m", exclusive=True))


def test_gate_path_from_the_environment_and_unsupported_filesystems(
    mg_home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fakes only what cannot run here: a filesystem whose flock fails with ENOLCK."""
    moved = tmp_path / "shared" / "gate.lock"
    monkeypatch.setenv("METALGUARD_GPU_LOCK_PATH", str(moved))
    with mg.exclusive_gpu("moved"):
        assert json.loads(moved.read_bytes())["label"] == "moved"
    assert not (Path(mg_home) / "gpu.lock").exists()

    import fcntl

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(mg.LockUnsupported) as info, mg.exclusive_gpu("x"):
        pytest.fail("must not run unlocked")
    assert "METALGUARD_GPU_LOCK_PATH" in str(info.value) and str(moved) in str(info.value)


def test_bad_timeout_is_a_caller_error() -> None:
    with pytest.raises(TypeError):
        mg.exclusive_gpu(timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mg.exclusive_gpu(timeout=-1)


# -- the command line shows both holders ---------------------------------------------

BOTH = r"""
import sys
import metal_guard as mg
mg.acquire_mlx_lock("cli-demo")
with mg.exclusive_gpu("cli-gate"):
    print("inside", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.multiprocess
def test_lock_and_status_commands_show_the_holders(
    mg_home: str, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = python_child(BOTH)
    try:
        assert read_line(proc) == "inside"
        assert mg.main(["lock", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["command"] == "lock"
        assert doc["mlx_lock"]["holder"]["pid"] == proc.pid
        assert doc["mlx_lock"]["holder"]["label"] == "cli-demo"
        assert doc["gpu_gate"]["holder"]["label"] == "cli-gate"
        assert doc["gpu_gate"]["path"] == str(Path(mg_home) / "gpu.lock")
        assert mg.main(["lock"]) == 0
        text = capsys.readouterr().out
        assert f"held by pid {proc.pid} ('cli-demo'" in text
        assert f"held by pid {proc.pid} ('cli-gate', thread MainThread" in text
        assert mg.main(["status", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["mlx_lock"]["holder"]["pid"] == proc.pid
        assert status["gpu_gate"]["holder"]["label"] == "cli-gate"
    finally:
        stop_child(proc)
    assert mg.main(["lock"]) == 0
    text = capsys.readouterr().out
    assert "MLX lock  free" in text and "GPU gate  free" in text
    # the killed holder's details are still on disk; the OS locks say nobody holds them
    assert json.loads((Path(mg_home) / "mlx_exclusive.lock").read_text())["pid"] == proc.pid


def test_status_never_creates_lock_files(mg_home: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert mg.main(["lock", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["mlx_lock"]["holder"] is None and doc["gpu_gate"]["holder"] is None
    assert list(Path(mg_home).iterdir()) == []


@pytest.mark.mlx_lm
def test_a_worker_does_not_wait_for_the_gate_its_caller_holds_for_it(
    tiny_llama_path: str, mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``METALGUARD_EXCLUSIVE_GPU`` on (the worker inherits it): a generate wrapped in the
    caller's own guard runs instead of the worker waiting for the gate its parent holds
    for it. A gate held by another thread of the parent still makes the worker wait."""
    monkeypatch.setenv("METALGUARD_EXCLUSIVE_GPU", "1")
    prompt = "hello world"
    try:
        with mg.subprocess_inference_guard(tiny_llama_path):
            holder = mg.read_gpu_gate()
            text = mg.call_model_isolated(
                prompt, tiny_llama_path, max_tokens=4, temperature=0, timeout=20
            )
        assert holder is not None and holder["pid"] == os.getpid()
        assert text  # not "" (a worker that waited for the gate timed out)
        runner = mg._runner_pool[f"{tiny_llama_path}:mlx"]
        with mg.exclusive_gpu("caller"):
            assert runner.generate(prompt, max_tokens=4, temperature=0, timeout=20) == text
        assert mg.read_gpu_gate() is None
        with (
            gpu_gate_held_by_another_thread("another thread"),
            pytest.raises(mg.SubprocessTimeoutError, match="did not answer within 2 s"),
        ):
            runner.generate(prompt, max_tokens=4, temperature=0, timeout=2)
    finally:
        mg.shutdown_all_workers()
    assert mg.read_gpu_gate() is None and mg.read_mlx_lock() is None
