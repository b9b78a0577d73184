"""Sections 5.9-5.11 — how workers end: the idle exit, a parent that dies mid-generate,
and SIGTERM at any moment. Who holds the MLX lock while a worker lives, and that a
restart the library makes waits for cadence instead of refusing.

Real ``spawn``ed workers load the tiny llama with real mlx-lm; the parent that dies is a
real process killed with SIGKILL; SIGTERM is a real signal sent many times.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import metal_guard as mg
from helpers import (
    breadcrumb_messages,
    child_env,
    no_live_workers,
    python_child,
    read_line,
    run_python,
    stop_child,
    wait_until,
    warnings_from,
)

PROMPT = "hello world"

ACQUIRE_ELSEWHERE = (
    "import metal_guard as mg\n"
    "try:\n"
    "    info = mg.acquire_mlx_lock('another app')\n"
    "    print('acquired', info['pid'] == __import__('os').getpid())\n"
    "    mg.release_mlx_lock()\n"
    "except mg.MLXLockConflict as exc:\n"
    "    print('conflict', exc.holder.get('pid'))\n"
)


def _acquire_elsewhere() -> str:
    """What another process gets from ``acquire_mlx_lock`` right now."""
    return run_python(ACQUIRE_ELSEWHERE, check=True).stdout.strip()


pytestmark = pytest.mark.usefixtures("clean_worker_pool")


def _age_cadence_store(home: str, seconds: float) -> None:
    """Move every record of the cadence store ``seconds`` into the past: time passes
    without the test waiting for it (the interval is 180 s)."""
    path = Path(home) / "cadence.json"
    store = json.loads(path.read_text())
    for key, value in list(store.items()):
        if isinstance(value, (int, float)):
            store[key] = value - seconds
    unloads = store.get("__metal_guard__", {}).get("unloads", {})
    for key, value in list(unloads.items()):
        unloads[key] = value - seconds
    path.write_text(json.dumps(store))


# -- the idle exit ------------------------------------------------------------------------------


@pytest.mark.mlx_lm
@pytest.mark.multiprocess
def test_an_idle_pooled_worker_frees_the_mlx_lock_and_the_next_call_waits_for_cadence(
    tiny_llama_path: str, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="metal_guard")
    key = f"{tiny_llama_path}:mlx"
    first = mg.call_model_isolated(
        PROMPT, tiny_llama_path, max_tokens=4, temperature=0, idle_timeout=2
    )
    assert first
    runner = mg._runner_pool[key]
    pid = runner.worker_pid
    assert pid is not None and runner.idle_timeout == 2
    assert mg.read_mlx_lock() is not None
    stopped = f"SUBPROCESS_WORKER: {tiny_llama_path} stopped (idle for 2 s), pid={pid}"
    wait_until(lambda: stopped in breadcrumb_messages(mg_home, pid=pid), 60, "the idle exit")
    # the parent drops its hold as soon as the worker is gone, without any call
    wait_until(lambda: mg.read_mlx_lock() is None, 10, "the parent's hold to go")
    assert _acquire_elsewhere() == "acquired True"
    # the worker's own unload is a few seconds old: the same-model interval (180 s) has
    # ~177 s left; let 174 s "pass" so the restart waits about 3 s instead
    _age_cadence_store(mg_home, 174)
    started = time.monotonic()
    again = mg.call_model_isolated(PROMPT, tiny_llama_path, max_tokens=4, temperature=0)
    waited = time.monotonic() - started
    assert again == first  # no CadenceViolation: the pool waited for the interval
    assert waited >= 1.5
    waits = warnings_from(caplog, "waiting")
    assert len(waits) == 1
    message = waits[0].getMessage()
    assert "restarting the MLX worker for" in message and "stopped after 2 s idle" in message
    assert "cadence interval" in message
    new = mg._runner_pool[key]
    assert new.worker_pid not in (None, pid) and new.idle_timeout == 2  # still the pool's limit


@pytest.mark.mlx_lm
@pytest.mark.multiprocess
def test_a_crashed_pooled_worker_frees_the_lock_at_once_and_its_replacement_waits(
    tiny_llama_path: str, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    first = mg.call_model_isolated(PROMPT, tiny_llama_path, max_tokens=4, temperature=0)
    runner = mg._runner_pool[f"{tiny_llama_path}:mlx"]
    pid = runner.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # test only: a crash (the CPU build holds no Metal memory)
    wait_until(lambda: mg.read_mlx_lock() is None, 10, "the parent's hold to go")
    assert _acquire_elsewhere() == "acquired True"
    _age_cadence_store(mg_home, 176)
    assert mg.call_model_isolated(PROMPT, tiny_llama_path, max_tokens=4, temperature=0) == first
    waits = warnings_from(caplog, "cadence interval")
    assert len(waits) == 1 and "its worker died (exit code -9)" in waits[0].getMessage()


@pytest.mark.mlx_lm
def test_a_runner_restarts_its_idle_worker_on_the_next_generate(
    tiny_llama_path: str, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    guard = mg.CadenceGuard(min_interval_sec=3)
    with mg.MLXSubprocessRunner(tiny_llama_path, idle_timeout=1, cadence=guard) as runner:
        first = runner.generate(PROMPT, max_tokens=4, temperature=0)
        pid = runner.worker_pid
        wait_until(lambda: not runner.is_alive(), 60, "the idle exit")
        assert runner.exitcode == 0
        wait_until(lambda: mg.read_mlx_lock() is None, 10, "the parent's hold to go")
        holder = python_child(
            "import sys, metal_guard as mg\nmg.acquire_mlx_lock('other app')\n"
            "print('held', flush=True)\nsys.stdin.readline()\n"
        )
        try:  # another process took the lock while the worker was gone: a decision, raised
            assert read_line(holder) == "held"
            with pytest.raises(mg.MLXLockConflict):
                runner.generate(PROMPT, max_tokens=4, temperature=0)
        finally:
            stop_child(holder)
        # and the next generate tries the restart again
        assert runner.generate(PROMPT, max_tokens=4, temperature=0) == first
        assert runner.worker_pid not in (None, pid)
        assert mg.read_mlx_lock() is not None  # the new worker holds it again
    assert mg.read_mlx_lock() is None
    waits = warnings_from(caplog, "cadence interval")
    assert len(waits) <= 1  # waited only if the 3 s interval was not over yet


def test_idle_timeout_argument_and_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert mg._idle_timeout_arg(None) == 600.0
    assert mg._idle_timeout_arg(2) == 2.0
    monkeypatch.setenv("METALGUARD_WORKER_IDLE_SEC", "45")
    assert mg._idle_timeout_arg(None) == 45.0
    assert mg._idle_timeout_arg(5) == 5.0  # the argument wins
    for bad in ("soon", "0", "-3", "nan", "1e9"):
        monkeypatch.setenv("METALGUARD_WORKER_IDLE_SEC", bad)
        mg._reset_process_state()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="metal_guard"):
            assert mg._idle_timeout_arg(None) == 600.0
            assert mg._idle_timeout_arg(None) == 600.0
        warned = warnings_from(caplog, "METALGUARD_WORKER_IDLE_SEC")
        assert len(warned) == 1 and "using the default 600.0" in warned[0].getMessage()
    with pytest.raises(ValueError):
        mg.MLXSubprocessRunner("org/model", idle_timeout=0)
    with pytest.raises(TypeError):
        mg.MLXSubprocessRunner("org/model", idle_timeout="10")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mg.call_model_isolated("hi", "org/model", idle_timeout=-1)
    assert no_live_workers() and mg._runner_pool == {}


# -- the parent dies mid-generate ----------------------------------------------------------------

DYING_PARENT = """
import os, sys, time
import metal_guard as mg

# Test only: the worker takes SLOW_SHUTDOWN seconds to let go of its memory, as a big
# model's release barrier can; the test probes the MLX lock during that time.
_shutdown = mg._Worker._shutdown


def slow_shutdown(self, reason):
    time.sleep(float(os.environ["SLOW_SHUTDOWN"]))
    _shutdown(self, reason)


mg._Worker._shutdown = slow_shutdown

if __name__ == "__main__":
    runner = mg.MLXSubprocessRunner(sys.argv[1])
    print(runner.worker_pid, flush=True)
    runner.generate("hello world", max_tokens=1_000_000, temperature=0, timeout=600)
"""


@pytest.mark.mlx_lm
@pytest.mark.multiprocess
def test_a_parent_killed_mid_generate_leaves_the_lock_to_its_worker_until_the_worker_is_gone(
    tiny_llama_path: str, mg_home: str, tmp_path: Path
) -> None:
    script = tmp_path / "dying_parent.py"
    script.write_text(DYING_PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), tiny_llama_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(SLOW_SHUTDOWN="4"),
    )
    worker = None
    try:
        worker = int(read_line(parent, 120))
        generating = f"SUBPROC_PRE: {tiny_llama_path}"
        wait_until(
            lambda: generating in breadcrumb_messages(mg_home, pid=worker), 60, "the generate"
        )
        holder = mg.read_mlx_lock()
        assert holder is not None and holder["pid"] == parent.pid
        assert holder["label"] == f"mlx_subprocess_runner:{tiny_llama_path}"
        parent.kill()  # test only: this process holds no Metal memory, its worker does
        parent.wait(30)
        # the worker, left holding the lock alone, names itself as its holder
        wait_until(
            lambda: (mg.read_mlx_lock() or {}).get("pid") == worker, 3, "the worker's record"
        )
        assert mg.read_mlx_lock()["label"] == f"mlx_subprocess_runner:{tiny_llama_path}"  # type: ignore[index]
        # the worker still runs Metal work (it is stopping, slowly): nobody else gets the lock
        conflicts = 0
        while mg._pid_running(worker):
            outcome = _acquire_elsewhere()
            if outcome.startswith("acquired"):
                # the lock came free as the worker exited: it must be gone now
                wait_until(lambda: not mg._pid_running(worker), 2, "the worker to be gone")
                break
            assert outcome == f"conflict {worker}"
            conflicts += 1
        assert conflicts >= 2
        wait_until(lambda: not mg._pid_running(worker), 60, "the worker to stop")
        assert _acquire_elsewhere() == "acquired True"  # free once the Metal user is gone
        assert mg.read_mlx_lock() is None
        crumbs = breadcrumb_messages(mg_home, pid=worker)
        assert crumbs[-1] == (
            f"SUBPROCESS_WORKER: {tiny_llama_path} stopped (the parent is gone), pid={worker}"
        )
        assert crumbs.count(generating) == crumbs.count(f"SUBPROC_POST: {tiny_llama_path}")
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.communicate(timeout=30)
        if worker is not None and mg._pid_running(worker):
            os.kill(worker, signal.SIGTERM)


# -- SIGTERM at any moment --------------------------------------------------------------------


class _Barrage:
    """Send SIGTERM to ``pid`` every few milliseconds until it is gone."""

    def __init__(self, pid: int, delay: float) -> None:
        self.pid, self.delay, self.sent = pid, delay, 0
        self.first_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        time.sleep(self.delay)
        while mg._pid_running(self.pid):
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            if self.first_at is None:
                self.first_at = time.monotonic()
            self.sent += 1
            time.sleep(random.uniform(0.002, 0.03))

    def __enter__(self) -> _Barrage:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(60)


def _no_sigkill(caplog: pytest.LogCaptureFixture, home: str) -> None:
    assert not [r for r in caplog.records if "SIGKILL" in r.getMessage()]
    assert not [c for c in breadcrumb_messages(home) if "SIGKILL" in c]


@pytest.mark.mlx_lm
@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigterm_again_and_again_never_needs_sigkill(
    tiny_llama_path: str,
    mg_home: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """During the load, during generates (each taking the GPU gate, so signals land in
    lock and state-file code) and during the shutdown sequence: the worker always exits
    by itself within the grace, the locks stay usable, and the runner never sends SIGKILL.

    Real signals cannot be aimed at one instruction, so this is the end-to-end check; the
    instruction-by-instruction proof that a stop never half-takes a lock is in
    ``test_stops.py``."""
    caplog.set_level(logging.WARNING, logger="metal_guard")
    monkeypatch.setenv("METALGUARD_EXCLUSIVE_GPU", "1")  # the worker inherits it
    guard = mg.CadenceGuard(min_interval_sec=0)
    rng = random.Random(1234)
    grace = mg._TERM_GRACE_SEC

    # during the load: the constructor sees the worker end
    for _ in range(3):
        started_crumbs = len(breadcrumb_messages(mg_home))
        outcome: list[BaseException] = []

        def construct(outcome: list[BaseException] = outcome) -> None:
            try:
                mg.MLXSubprocessRunner(tiny_llama_path, cadence=guard).shutdown()
            except BaseException as exc:
                outcome.append(exc)

        maker = threading.Thread(target=construct)
        maker.start()
        pid = None
        deadline = time.monotonic() + 60
        while pid is None and time.monotonic() < deadline:
            for line in breadcrumb_messages(mg_home)[started_crumbs:]:
                if line.startswith(f"SUBPROCESS_WORKER: loading {tiny_llama_path}"):
                    pid = next(
                        int(c.rsplit("pid=", 1)[1])
                        for c in breadcrumb_messages(mg_home)[started_crumbs:]
                        if c.startswith("SUBPROCESS_WORKER: starting")
                    )
            time.sleep(0.005)
        assert pid is not None
        with _Barrage(pid, rng.uniform(0, 0.3)) as barrage:
            maker.join(120)
        assert barrage.first_at is not None and barrage.sent >= 1
        if outcome:  # stopped before it was ready (else the load won the race)
            assert isinstance(outcome[0], mg.SubprocessCrashError)
            assert outcome[0].exitcode == 143
        assert breadcrumb_messages(mg_home, pid=pid)[-1].endswith(f"pid={pid}")
        _no_sigkill(caplog, mg_home)

    # during generates, and during the shutdown sequence
    for phase in ["generate"] * 3 + ["shutdown"] * 3:
        runner = mg.MLXSubprocessRunner(tiny_llama_path, cadence=guard)
        pid = runner.worker_pid
        assert pid is not None
        delay = rng.uniform(0, 0.4) if phase == "generate" else 0.0
        with _Barrage(pid, delay) as barrage:
            if phase == "generate":
                with pytest.raises(mg.SubprocessCrashError) as info:
                    for _ in range(10_000):
                        runner.generate(PROMPT, max_tokens=2, temperature=0)
                assert info.value.exitcode == 143
            else:
                runner.shutdown(timeout=grace)
        assert barrage.first_at is not None
        assert runner.exitcode in (0, 143)  # by itself, never by SIGKILL (-9)
        assert mg.read_mlx_lock() is None and mg.read_gpu_gate() is None
        crumbs = breadcrumb_messages(mg_home, pid=pid)
        assert crumbs[-1].startswith(f"SUBPROCESS_WORKER: {tiny_llama_path} stopped (")
        _no_sigkill(caplog, mg_home)
    # every lock the workers used is usable by another process
    assert _acquire_elsewhere() == "acquired True"
    assert no_live_workers()
