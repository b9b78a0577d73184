"""Stops that cannot corrupt state: the deferred-interrupt primitive of section 0.2
(``_interrupt`` / ``_critical`` / ``_checkpoint`` / ``@_defers_interrupts``) and the lock of
section 1.2 (``_FileLock``), which must stay consistent whatever exception arrives between a
system call and its bookkeeping.

Interrupts are injected the way a signal handler delivers them: a trace function calls
``_interrupt(exc, frame)`` at a chosen line, exactly what a handler does with the frame it
interrupted. Exceptions raised by the system calls themselves (right after they succeeded)
are injected by wrapping the real calls. Another process checks the lock through its own
``flock``, and ``/proc/self/fd`` shows leaked descriptors.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest

import metal_guard as mg
from helpers import holding_lock_in_child, spawn_python


class Stop(BaseException):
    """What a stop handler raises (a ``BaseException``, like the worker's)."""


# -- the primitive ------------------------------------------------------------------------


def test_an_interrupt_outside_a_critical_block_is_raised_at_once() -> None:
    with pytest.raises(Stop):
        mg._interrupt(Stop())
    assert mg._pending_interrupts == {}


def test_inside_critical_blocks_the_first_interrupt_waits_for_the_outermost_end() -> None:
    first, steps = Stop("first"), []
    with pytest.raises(Stop) as info, mg._critical():
        with mg._critical():
            mg._interrupt(first)
            mg._interrupt(Stop("second"))  # one stop at a time: the first wins
            steps.append("inner done")
        steps.append("outer done")
    assert info.value is first and steps == ["inner done", "outer done"]
    assert mg._pending_interrupts == {} and mg._critical_depth == {}


def test_a_checkpoint_raises_the_recorded_interrupt_where_the_block_can_unwind() -> None:
    steps = []
    with pytest.raises(Stop), mg._critical():
        mg._checkpoint()  # nothing recorded: no-op
        steps.append("before")
        mg._interrupt(Stop())
        steps.append("recorded")
        mg._checkpoint()
        steps.append("never")
    assert steps == ["before", "recorded"] and mg._critical_depth == {}


def test_undo_runs_before_a_recorded_interrupt_and_only_then() -> None:
    undone: list[str] = []
    with mg._critical(lambda: undone.append("quiet")):
        pass
    assert undone == []
    with pytest.raises(Stop), mg._critical(lambda: undone.append("undone")):
        mg._interrupt(Stop())
    assert undone == ["undone"]


def test_a_function_marked_defers_interrupts_is_critical_from_its_first_line() -> None:
    steps: list[str] = []

    @mg._defers_interrupts
    def release_like(frame_box: list[Any]) -> None:
        mg._interrupt(Stop(), sys._getframe())  # lands before the block begins
        steps.append("before block")
        with mg._critical():
            steps.append("in block")
        steps.append("never")

    with pytest.raises(Stop):
        release_like([])
    assert steps == ["before block", "in block"]


def test_a_real_signal_handler_is_deferred_by_a_critical_block() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        mg._interrupt(Stop(), frame)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        steps = []
        with pytest.raises(Stop), mg._critical():
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(1000):  # bytecodes run: the handler ran and recorded it
                pass
            steps.append("finished")
        assert steps == ["finished"]
        with pytest.raises(Stop):  # outside a block: raised in the middle of the wait
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGUSR1, previous)


# -- _FileLock under injected exceptions -----------------------------------------------------


class Boom(BaseException):
    """The injected exception (a ``BaseException``: ``except Exception`` must not eat it)."""


def _open_fds(path: str) -> int:
    """This process's descriptors open on ``path``: the lock's own, not the ones other
    threads (a runner's watcher, a lock-wait ticker of an earlier test) open and close."""
    real, count = os.path.realpath(path), 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            count += os.readlink(f"/proc/self/fd/{name}") == real
    return count


def _lines(fn: Callable[..., Any]) -> list[tuple[CodeType, int]]:
    code = fn.__code__
    lines = {line for _, _, line in code.co_lines() if line is not None}
    return [(code, line) for line in sorted(lines) if line > code.co_firstlineno]


INJECTION_POINTS = [
    point
    for fn in (
        mg._FileLock.acquire,
        mg._FileLock._acquire,
        mg._FileLock._os_lock,
        mg._FileLock.release,
        mg._FileLock.__exit__,
    )
    for point in _lines(fn)
]


class InterruptAt:
    """A trace function that delivers ``Boom`` through ``_interrupt`` at one line, once."""

    def __init__(self, code: CodeType, line: int) -> None:
        self.code, self.line, self.fired = code, line, False

    def __enter__(self) -> InterruptAt:
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)

    def _call(self, frame: FrameType, event: str, arg: object) -> Any:
        return self._line if frame.f_code is self.code else None

    def _line(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "line" and frame.f_lineno == self.line and not self.fired:
            self.fired = True
            mg._interrupt(Boom(), frame)  # what a stop handler does
        return self._line


PROBE_LOOP = """
import fcntl, os, sys
for line in sys.stdin:
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        answer = "free"
    except BlockingIOError:
        answer = "held"
    os.close(fd)  # before answering: the caller may take the lock at once
    print(answer, flush=True)
"""


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Asks another process whether it could take ``tmp_path/x.lock`` right now."""
    child = spawn_python(
        PROBE_LOOP,
        str(tmp_path / "x.lock"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None

    def ask() -> str:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("?\n")
        child.stdin.flush()
        return child.stdout.readline().strip()

    try:
        yield ask
    finally:
        child.stdin.close()
        child.wait(30)
        child.stdout.close()


def _assert_clean(lock: mg._FileLock, fds: int, held_by_other_thread: bool = False) -> None:
    state = mg._lock_state(lock.path)
    assert not state.acquiring, "left 'acquiring'"
    if not held_by_other_thread:
        assert state.count == 0 and state.fd is None and state.owner is None
    assert _open_fds(lock.path) == fds, "a descriptor leaked"
    assert mg._pending_interrupts == {} and mg._critical_depth == {}


def _usable(lock: mg._FileLock, probe: Callable[[], str]) -> None:
    assert probe() == "free"  # another process could take it
    assert lock.acquire(0) is True  # and so can this one
    assert probe() == "held"
    assert lock.release() is True
    assert probe() == "free"


@pytest.mark.multiprocess
@pytest.mark.parametrize("per_thread", [True, False], ids=["per-thread", "per-process"])
def test_an_interrupt_at_any_line_of_an_uncontended_acquire_and_release(
    tmp_path: Path, probe: Callable[[], str], per_thread: bool
) -> None:
    lock = mg._FileLock(str(tmp_path / "x.lock"), 1.0, per_thread=per_thread)
    _usable(lock, probe)  # the lock file exists: counting descriptors from here
    fds = _open_fds(lock.path)
    fired = 0
    for code, line in INJECTION_POINTS:
        with InterruptAt(code, line) as inject:
            try:
                with lock:  # acquire, body, __exit__ → release
                    assert lock.count == 1 and probe() == "held"
            except Boom:
                pass
        fired += inject.fired
        _assert_clean(lock, fds)  # taken and given back, or never taken: never half
        _usable(lock, probe)
    assert fired >= 25  # most lines run on this path (the waits do not)


@pytest.mark.multiprocess
def test_an_interrupt_while_waiting_for_another_process(
    tmp_path: Path, probe: Callable[[], str]
) -> None:
    path = str(tmp_path / "x.lock")
    lock = mg._FileLock(path, 0.1)
    _usable(lock, probe)
    fds = _open_fds(lock.path)
    fired = 0
    with holding_lock_in_child(path):
        fds_with_holder = _open_fds(lock.path)
        for code, line in INJECTION_POINTS:
            with InterruptAt(code, line) as inject:
                started = time.monotonic()
                with pytest.raises((Boom, mg.StateLockTimeout)):
                    lock.acquire()
                assert time.monotonic() - started < 5  # the waits stayed interruptible
            fired += inject.fired
            _assert_clean(lock, fds_with_holder)
    assert fired >= 15  # the busy loop's lines, checkpoint included
    _assert_clean(lock, fds)
    _usable(lock, probe)


def test_a_real_signal_ends_a_wait_blocked_in_the_kernel(
    tmp_path: Path, probe: Callable[[], str]
) -> None:
    """A wait without a deadline blocks in ``flock`` (the GPU gate's waiters do): a stop
    delivered by a real signal still ends it at once, inside the acquire's critical block,
    and leaves no descriptor and no half-taken state behind."""
    path = str(tmp_path / "x.lock")
    lock = mg._FileLock(path, None)
    fds = _open_fds(lock.path)

    def handler(signum: int, frame: FrameType | None) -> None:
        mg._interrupt(Stop(), frame)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        with holding_lock_in_child(path):
            fds_with_holder = _open_fds(lock.path)
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            started = time.monotonic()
            with pytest.raises(Stop):
                lock.acquire()  # would block until the holder leaves: it never does
            assert time.monotonic() - started < 5
            assert mg._pending_interrupts == {} and mg._critical_depth == {}
            _assert_clean(lock, fds_with_holder)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    _assert_clean(lock, fds)
    _usable(lock, probe)


def test_an_interrupt_while_waiting_for_another_thread(
    tmp_path: Path, probe: Callable[[], str]
) -> None:
    lock = mg._FileLock(str(tmp_path / "x.lock"), 0.1)
    _usable(lock, probe)
    fds = _open_fds(lock.path)
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with mg._FileLock(lock.path, 5):
            inside.set()
            leave.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(10)
        fired = 0
        for code, line in INJECTION_POINTS:
            with InterruptAt(code, line) as inject, pytest.raises((Boom, mg.StateLockTimeout)):
                lock.acquire()
            fired += inject.fired
            _assert_clean(lock, fds + 1, held_by_other_thread=True)
            state = mg._lock_state(lock.path)
            assert state.count == 1 and state.owner == holder.ident  # its hold untouched
        assert fired >= 8
    finally:
        leave.set()
        holder.join(10)
    _assert_clean(lock, fds)
    _usable(lock, probe)


@pytest.mark.multiprocess
@pytest.mark.parametrize("call", ["flock", "close"])
def test_an_exception_right_after_a_successful_system_call(
    tmp_path: Path, probe: Callable[[], str], monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """The system call did its work, then an exception came out of it (as a signal handler's
    would, raised as the call returns): flock → the descriptor is closed and nothing is
    held; close → the release is complete."""
    lock = mg._FileLock(str(tmp_path / "x.lock"), 1.0)
    _usable(lock, probe)
    fds = _open_fds(lock.path)
    armed = [True]
    real = fcntl.flock if call == "flock" else os.close

    def then_raise(*args: Any) -> Any:
        result = real(*args)
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt
        return result

    if call == "flock":
        monkeypatch.setattr(fcntl, "flock", then_raise)
        with pytest.raises(KeyboardInterrupt):
            lock.acquire()
    else:
        lock.acquire()
        monkeypatch.setattr(os, "close", then_raise)
        with pytest.raises(KeyboardInterrupt):
            lock.release()
    monkeypatch.undo()
    assert not armed[0]
    _assert_clean(lock, fds)
    _usable(lock, probe)
