"""Sections 5.6-5.7 — guarded worker subprocesses: ``MLXSubprocessRunner``,
``call_model_isolated`` and its pool, ``shutdown_all_workers``.

Real ``spawn``ed workers loading the tiny llama with real mlx-lm. One worker is shared by
the tests of the first part (module fixture, its own ``METALGUARD_HOME``); the tests that
end a worker start their own. Refusals happen before the load, so those tests run
without MLX too.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import (
    breadcrumb_messages,
    no_live_workers,
    python_child,
    read_line,
    stop_child,
    write_breaker_cooldown,
)

PROMPT = "hello world"
SYSTEM = "the quick brown fox"
# Renders only the system message when there is one, else the user message: a system
# message that reaches the template makes the model see exactly that text.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}"
    "{%- else -%}{{ messages[-1]['content'] }}{%- endif -%}"
)


pytestmark = pytest.mark.usefixtures("clean_worker_pool")


@pytest.fixture(scope="module")
def chat_model(tiny_llama_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny llama with a chat template (``CHAT_TEMPLATE``)."""
    dest = tmp_path_factory.mktemp("chat") / "tiny-chat-llama"
    shutil.copytree(tiny_llama_path, dest)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return str(dest)


@pytest.fixture(scope="module")
def worker_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    home = tmp_path_factory.mktemp("worker_home")
    home.chmod(0o700)
    return str(home)


@pytest.fixture(scope="module")
def shared(chat_model: str, worker_home: str) -> Iterator[mg.MLXSubprocessRunner]:
    """One worker for the first tests; its state (cadence, breadcrumbs) in ``worker_home``."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("METALGUARD_")]:
            mp.delenv(name)
        mp.setenv("METALGUARD_HOME", worker_home)  # the worker inherits it at spawn
        runner = mg.MLXSubprocessRunner(chat_model, load_timeout=120)
    yield runner
    runner.shutdown()


# -- one shared worker -------------------------------------------------------------------


@pytest.mark.mlx_lm
def test_text_comes_back_from_the_worker(shared: mg.MLXSubprocessRunner) -> None:
    assert shared.is_alive() and shared.worker_pid not in (None, os.getpid())
    text = shared.generate(PROMPT, max_tokens=12, temperature=0)
    assert isinstance(text, str) and len(text) >= 6


@pytest.mark.mlx_lm
def test_greedy_is_deterministic_and_temperature_samples(shared: mg.MLXSubprocessRunner) -> None:
    greedy = [shared.generate(PROMPT, max_tokens=16, temperature=0) for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = {shared.generate(PROMPT, max_tokens=16, temperature=2.0) for _ in range(3)}
    assert len(sampled) >= 2 and greedy[0] not in sampled


@pytest.mark.mlx_lm
def test_system_message_reaches_the_chat_template(shared: mg.MLXSubprocessRunner) -> None:
    with_system = shared.generate(PROMPT, system=SYSTEM, max_tokens=12, temperature=0)
    as_prompt = shared.generate(SYSTEM, max_tokens=12, temperature=0)
    plain = shared.generate(PROMPT, max_tokens=12, temperature=0)
    assert with_system == as_prompt  # the template rendered exactly the system message
    assert with_system != plain


@pytest.mark.mlx_lm
def test_worker_breadcrumbs_show_its_guards(
    shared: mg.MLXSubprocessRunner, worker_home: str, chat_model: str
) -> None:
    shared.generate(PROMPT, max_tokens=4, temperature=0)
    pid = shared.worker_pid
    assert pid is not None
    mine = breadcrumb_messages(worker_home, pid=pid)
    assert mine[:4] == [
        f"SUBPROCESS_WORKER: starting {chat_model}, pid={pid}",
        f"CADENCE_ADMIT: {chat_model}",
        f"SUBPROCESS_WORKER: loading {chat_model}",
        f"SUBPROCESS_WORKER: {chat_model} ready, pid={pid}",
    ]
    guarded = mine[4:]
    assert guarded and len(guarded) % 2 == 0
    assert guarded == [f"SUBPROC_PRE: {chat_model}", f"SUBPROC_POST: {chat_model}"] * (
        len(guarded) // 2
    )
    parent = breadcrumb_messages(worker_home, pid=os.getpid())
    assert f"MLX_LOCK: acquired mlx_subprocess_runner:{chat_model} pid={os.getpid()}" in parent


@pytest.mark.mlx_lm
def test_shared_worker_shuts_down_gracefully_and_is_reaped(
    shared: mg.MLXSubprocessRunner, worker_home: str, chat_model: str
) -> None:
    pid = shared.worker_pid
    assert pid is not None
    lock_path = str(Path(worker_home) / "mlx_exclusive.lock")
    assert mg._read_mlx_lock_at(lock_path) is not None  # the runner holds the MLX lock
    started = time.monotonic()
    shared.shutdown(timeout=30)
    assert time.monotonic() - started < 30  # the message was enough: no SIGTERM grace used
    assert shared.exitcode == 0 and not shared.is_alive() and shared.worker_pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    mine = breadcrumb_messages(worker_home, pid=pid)
    assert mine[-1] == f"SUBPROCESS_WORKER: {chat_model} stopped (shutdown requested), pid={pid}"
    assert not any("SIGTERM" in line or "SIGKILL" in line for line in mine)
    store = json.loads((Path(worker_home) / "cadence.json").read_text())
    assert chat_model in store["__metal_guard__"]["unloads"]  # the unload was marked
    assert mg._read_mlx_lock_at(lock_path) is None  # and the lock hold dropped
    with pytest.raises(mg.SubprocessCrashError, match="is not running"):
        shared.generate(PROMPT)


# -- workers that end badly ---------------------------------------------------------------


@pytest.mark.mlx_lm
def test_a_worker_killed_from_outside_raises_subprocess_crash_error(
    tiny_llama_path: str, mg_home: str
) -> None:
    runner = mg.MLXSubprocessRunner(tiny_llama_path)
    assert runner.generate(PROMPT, max_tokens=4, temperature=0)
    assert mg.read_mlx_lock() is not None
    os.kill(runner.worker_pid or 0, signal.SIGKILL)
    with pytest.raises(mg.SubprocessCrashError) as info:
        runner.generate(PROMPT, max_tokens=4)
    exc = info.value
    assert exc.exitcode == -signal.SIGKILL and exc.model_id == tiny_llama_path
    assert "SIGKILL" in str(exc) and "killed by signal 9" in str(exc)
    assert not runner.is_alive()
    assert mg.read_mlx_lock() is None  # a dead worker's runner holds no lock
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.model_id, copy.exitcode, str(copy)) == (exc.model_id, exc.exitcode, str(exc))


@pytest.mark.mlx_lm
def test_generate_timeout_sends_sigterm_first_and_reaps(
    tiny_llama_path: str, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="metal_guard")
    runner = mg.MLXSubprocessRunner(tiny_llama_path, generate_timeout=60)
    pid = runner.worker_pid
    assert pid is not None
    started = time.monotonic()
    with pytest.raises(mg.SubprocessTimeoutError, match="did not answer within 1 s"):
        runner.generate(PROMPT, max_tokens=1_000_000, temperature=0, timeout=1)
    assert time.monotonic() - started < 1 + 1 + 10  # never reached the SIGKILL step
    assert runner.exitcode == 143  # exited by itself after handling SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    mine = breadcrumb_messages(mg_home, pid=pid)
    assert f"SUBPROCESS_WORKER: SIGTERM received, pid={pid} ({tiny_llama_path})" in mine
    assert mine[-1] == f"SUBPROCESS_WORKER: {tiny_llama_path} stopped (SIGTERM), pid={pid}"
    assert mine.count(f"SUBPROC_PRE: {tiny_llama_path}") == mine.count(
        f"SUBPROC_POST: {tiny_llama_path}"
    )  # the interrupted generate still ran its POST flush
    assert not any("SIGKILL" in r.getMessage() for r in caplog.records)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "did not answer within 1 s" in errors[0]
    assert mg.read_mlx_lock() is None


@pytest.mark.mlx_lm
def test_shutdown_from_another_thread_during_a_long_generate(
    tiny_llama_path: str, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The generating thread owns the pipe: shutdown() waits its grace, then SIGTERMs; the
    generate ends with the crash error, and every resource is released exactly once."""
    caplog.set_level(logging.WARNING, logger="metal_guard")
    runner = mg.MLXSubprocessRunner(tiny_llama_path)
    outcome: list[BaseException] = []

    def generate() -> None:
        try:
            runner.generate(PROMPT, max_tokens=1_000_000, temperature=0, timeout=120)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    # 3 s of grace: a busy 2-core machine can take more than 1 s to run the shutdown sequence
    runner.shutdown(timeout=3)
    assert time.monotonic() - started < 3 + 3 + 5
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], mg.SubprocessCrashError)
    assert outcome[0].exitcode == 143 and runner.exitcode == 143  # stopped by SIGTERM, cleanly
    assert not [r for r in caplog.records if "SIGKILL" in r.getMessage()]
    assert mg.read_mlx_lock() is None and mg.release_mlx_lock() is False


class _WatchedPipe:
    """The runner's real request pipe; records which messages went through (a spy)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.generate_sent = threading.Event()
        self.shutdown_sent = threading.Event()

    def send(self, message: Any) -> None:
        self.conn.send(message)
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "generate":
            self.generate_sent.set()
        elif kind == "shutdown":
            self.shutdown_sent.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


GATE_HOLDER = (
    "import sys, metal_guard as mg\nwith mg.exclusive_gpu('test holder'):\n"
    "    print('inside', flush=True)\n    sys.stdin.readline()\n"
)


@pytest.mark.mlx_lm
@pytest.mark.multiprocess
def test_shutdown_during_a_generate_that_then_completes_drops_the_lock_hold_and_pipes(
    tiny_llama_path: str, mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """shutdown() gives up waiting for a generate in flight and asks the worker to stop;
    the generate then completes (the worker was waiting for the GPU gate, held by another
    process until the shutdown message is sent). The generating thread owns the pipe, yet
    shutdown() returns only once the MLX-lock hold and the pipes are gone."""
    monkeypatch.setenv("METALGUARD_EXCLUSIVE_GPU", "1")  # the worker inherits it
    holder = python_child(GATE_HOLDER)
    try:
        assert read_line(holder) == "inside"
        runner = mg.MLXSubprocessRunner(tiny_llama_path)
        pipe = _WatchedPipe(runner._requests)
        runner._requests = pipe
        generated: list[object] = []
        after_shutdown: list[object] = []

        def generate() -> None:
            try:
                generated.append(runner.generate(PROMPT, max_tokens=4, temperature=0, timeout=120))
            except BaseException as exc:
                generated.append(exc)

        def shutdown() -> None:
            runner.shutdown(timeout=5)
            after_shutdown.extend([mg.read_mlx_lock(), runner._requests, runner._replies])

        generating = threading.Thread(target=generate)
        generating.start()
        assert pipe.generate_sent.wait(30)
        stopping = threading.Thread(target=shutdown)
        stopping.start()
        assert pipe.shutdown_sent.wait(30)  # shutdown() gave up on the request lock
        assert holder.stdin is not None
        holder.stdin.write("\n")  # the worker gets the gate and completes the generate
        holder.stdin.flush()
        stopping.join(60)
        generating.join(60)
    finally:
        stop_child(holder)
    assert len(generated) == 1 and isinstance(generated[0], str) and generated[0]
    assert runner.exitcode == 0  # it read the shutdown message after answering
    assert after_shutdown == [None, None, None]  # no hold, no pipes when shutdown() returned
    assert pipe.conn.closed
    assert mg.release_mlx_lock() is False


class _Interrupt:
    """Raise ``KeyboardInterrupt`` in the main thread after ``seconds`` (SIGALRM), as a
    Ctrl-C would; cancelled when the block ends, so it can only fire inside it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.previous: Any = None

    def __enter__(self) -> None:
        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        self.previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)


@pytest.mark.mlx_lm
def test_an_interrupted_generate_stops_the_worker_so_its_late_answer_is_never_read(
    tiny_llama_path: str, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    runner = mg.MLXSubprocessRunner(tiny_llama_path)
    pid = runner.worker_pid
    try:
        with pytest.raises(KeyboardInterrupt), _Interrupt(0.5):
            runner.generate(PROMPT, max_tokens=1_000_000, temperature=0)
        assert not runner.is_alive() and runner.exitcode == 143  # SIGTERM, handled
        assert mg.read_mlx_lock() is None and runner._replies is None
        # the next call cannot be answered with the interrupted prompt's text
        with pytest.raises(mg.SubprocessCrashError, match="the worker is not running"):
            runner.generate(PROMPT, max_tokens=2, temperature=0)
    finally:
        runner.kill()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "was interrupted (KeyboardInterrupt); stopping the worker" in warnings[0]
    assert breadcrumb_messages(mg_home, pid=pid)[-1] == (
        f"SUBPROCESS_WORKER: {tiny_llama_path} stopped (SIGTERM), pid={pid}"
    )


@pytest.mark.mlx_lm
def test_an_interrupted_pooled_call_takes_its_worker_out_of_the_pool(
    tiny_llama_path: str, mg_home: str
) -> None:
    key = f"{tiny_llama_path}:mlx"
    first = mg.call_model_isolated(PROMPT, tiny_llama_path, max_tokens=4, temperature=0)
    runner = mg._runner_pool[key]
    with pytest.raises(KeyboardInterrupt), _Interrupt(0.5):
        mg.call_model_isolated(PROMPT, tiny_llama_path, max_tokens=1_000_000, temperature=0)
    assert key not in mg._runner_pool and not runner.is_alive() and no_live_workers()
    assert mg.read_mlx_lock() is None
    assert mg._pool_failures.get(key, []) == []  # an interrupt is not a crash
    mg.CadenceGuard().clear()  # the same-model cadence would refuse the new worker
    assert mg.call_model_isolated(PROMPT, tiny_llama_path, max_tokens=4, temperature=0) == first
    assert mg._runner_pool[key] is not runner


@pytest.mark.mlx_lm
@pytest.mark.slow
def test_pool_stops_replacing_a_crash_looping_worker(
    tiny_llama_path: str, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    key = f"{tiny_llama_path}:mlx"
    pids = []
    for _ in range(4):  # the first worker and its 3 replacements
        assert mg.call_model_isolated(PROMPT, tiny_llama_path, max_tokens=4, temperature=0)
        runner = mg._runner_pool[key]
        pid = runner.worker_pid
        assert pid is not None and pid not in pids
        pids.append(pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while runner.is_alive() and time.monotonic() < deadline:  # died (and was reaped)
            time.sleep(0.01)
        # the same-model cadence (180 s) would refuse the replacement: let "time pass"
        mg.CadenceGuard().clear()
    with pytest.raises(mg.SubprocessCrashError, match="crash-looping") as info:
        mg.call_model_isolated(PROMPT, tiny_llama_path, max_tokens=4)
    assert info.value.exitcode == -signal.SIGKILL
    replaced = [r.getMessage() for r in caplog.records if "replacing it" in r.getMessage()]
    assert len(replaced) == 4  # three replacements, and the death that hit the cap
    assert key not in mg._runner_pool and no_live_workers()
    assert mg.read_mlx_lock() is None


@pytest.mark.mlx_lm
def test_a_killed_pooled_worker_logs_error_and_returns_empty(
    tiny_llama_path: str, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="metal_guard")
    assert mg.call_model_isolated(PROMPT, tiny_llama_path, max_tokens=4, temperature=0)
    runner = mg._runner_pool[f"{tiny_llama_path}:mlx"]
    # kill it while it generates: the reply never comes
    threading.Timer(0.5, os.kill, (runner.worker_pid, signal.SIGKILL)).start()
    # (greedy: the tiny model never picks <eos>, so the generate runs until the kill)
    assert (
        mg.call_model_isolated(PROMPT, tiny_llama_path, max_tokens=1_000_000, temperature=0) == ""
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("was killed by signal 9 (SIGKILL)" in e for e in errors), errors
    assert f"{tiny_llama_path}:mlx" not in mg._runner_pool and no_live_workers()


@pytest.mark.mlx_lm
def test_a_metal_oom_reported_by_the_worker_is_never_restarted(
    tmp_path: Path, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Fakes only what cannot happen on a CPU: a Metal out-of-memory. The worker's real load
    error carries the model path, and the path carries Metal's out-of-memory text."""
    caplog.set_level(logging.ERROR, logger="metal_guard")
    model = str(tmp_path / "missing" / "kIOGPUCommandBufferCallbackErrorOutOfMemory")
    assert mg.call_model_isolated(PROMPT, model, max_tokens=4) == ""
    assert any("could not start" in r.getMessage() for r in caplog.records)
    with pytest.raises(mg.SubprocessCrashError, match="not restarted after a fatal error"):
        mg.call_model_isolated(PROMPT, model, max_tokens=4)
    mg.shutdown_all_workers()  # resets the pool: a start is attempted again
    mg.CadenceGuard().clear()  # (the failed load counts for cadence)
    assert mg.call_model_isolated(PROMPT, model, max_tokens=4) == ""


def test_a_load_error_is_logged_and_returns_empty(
    tmp_path: Path, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="metal_guard")
    model = str(tmp_path / "no-such-model")
    assert mg.call_model_isolated(PROMPT, model, max_tokens=4) == ""
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"MLX worker for {model} could not start" in errors[0]
    assert "failed (load)" in errors[0]
    assert no_live_workers() and mg.read_mlx_lock() is None
    # the failed load was admitted (and its unload marked): the same model now waits
    with pytest.raises(mg.CadenceViolation):
        mg.MLXSubprocessRunner(model)
    with pytest.raises(RuntimeError, match="failed \\(load\\)"):
        mg.MLXSubprocessRunner(str(tmp_path / "other-model"))


# -- refusals propagate as the same exception ----------------------------------------------


def test_a_cadence_refusal_in_the_worker_raises_cadence_violation_in_the_parent(
    mg_home: str,
) -> None:
    model = "mlx-community/some-model-4bit"
    mg.CadenceGuard().mark_load(model)  # loaded a moment ago (by anyone)
    with pytest.raises(mg.CadenceViolation) as info:
        mg.MLXSubprocessRunner(model)
    assert type(info.value) is mg.CadenceViolation
    assert info.value.model_id == model and 175 < info.value.remaining_sec <= 180
    with pytest.raises(mg.CadenceViolation):
        mg.call_model_isolated(PROMPT, model)  # a refusal is not a crash: no "" here
    assert no_live_workers() and mg.read_mlx_lock() is None
    crumbs = breadcrumb_messages(mg_home)
    assert crumbs.count(f"SUBPROCESS_WORKER: {model} refused: CadenceViolation") == 2
    assert not any(c.startswith("SUBPROCESS_WORKER: loading") for c in crumbs)
    # a worker refused before its load never imports MLX (that would initialise Metal)
    assert not any(c.startswith("RELEASE:") for c in crumbs)


def test_a_breaker_cooldown_in_the_worker_raises_mlx_cooldown_active(
    mg_home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    monkeypatch.setenv("METALGUARD_PANIC_REPORT_DIR", str(reports))
    write_breaker_cooldown(mg_home)
    with pytest.raises(mg.MLXCooldownActive) as info:
        mg.MLXSubprocessRunner("org/model")
    assert info.value.panic_count == 2 and info.value.remaining_sec > 3500
    assert no_live_workers() and mg.read_mlx_lock() is None


@pytest.mark.multiprocess
def test_mlx_lock_conflict_propagates_before_any_worker_starts(mg_home: str) -> None:
    holder = python_child(
        "import sys, metal_guard as mg\nmg.acquire_mlx_lock('other app')\n"
        "print('held', flush=True)\nsys.stdin.readline()\n"
    )
    try:
        assert read_line(holder) == "held"
        with pytest.raises(mg.MLXLockConflict) as info:
            mg.MLXSubprocessRunner("org/model")
        assert info.value.holder["pid"] == holder.pid
        with pytest.raises(mg.MLXLockConflict):
            mg.call_model_isolated(PROMPT, "org/model")
        assert no_live_workers()
    finally:
        stop_child(holder)


# -- stopping: SIGKILL only after SIGTERM was ignored for the whole grace ---------------------


def _bare_runner(code: str) -> mg.MLXSubprocessRunner:
    """A runner around a plain spawned process running ``code`` (no model, no pipes)."""
    ctx = multiprocessing.get_context("spawn")
    process = ctx.Process(target=exec, args=(code,), name="metal-guard test", daemon=True)
    process.start()
    runner = object.__new__(mg.MLXSubprocessRunner)
    runner.model_id = "test/model"
    runner._process = process
    runner._requests = runner._replies = None
    runner._lock_path = None
    runner._pid = process.pid
    runner.fatal_error = None
    time.sleep(0.5)  # let it install its handler
    return runner


def test_stop_escalates_to_sigkill_only_after_the_grace_with_a_warning(
    mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    runner = _bare_runner(
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)"
    )
    started = time.monotonic()
    runner._stop(grace=0.5, message_grace=None, why="a test")
    assert time.monotonic() - started >= 0.5
    assert runner.exitcode == -signal.SIGKILL
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for part in ("ignored", "0.5 s of SIGTERM", "stopping because a test", "SIGKILL", "wired"):
        assert part in warnings[0]


def test_stop_never_sigkills_a_worker_that_exits_on_sigterm(
    mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    runner = _bare_runner("import time\ntime.sleep(60)")
    runner._stop(grace=10, message_grace=None, why="a test")
    assert runner.exitcode == -signal.SIGTERM
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- arguments ---------------------------------------------------------------------------------


def test_bad_arguments_are_caller_errors() -> None:
    with pytest.raises(ValueError, match="backend"):
        mg.MLXSubprocessRunner("org/model", backend="torch")
    with pytest.raises(ValueError):
        mg.MLXSubprocessRunner("org/model", load_timeout=0)
    with pytest.raises(TypeError):
        mg.MLXSubprocessRunner("org/model", cadence="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prompt"):
        mg.call_model_isolated(b"bytes", "org/model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        mg.call_model_isolated("hi", "org/model", temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        mg.call_model_isolated("hi", "org/model", max_tokens=0)
    assert no_live_workers() and mg._runner_pool == {}


def test_exceptions_keep_their_contract() -> None:
    exc = mg.SubprocessCrashError("org/m", 3, "detail here")
    assert isinstance(exc, RuntimeError) and exc.exitcode == 3
    assert str(exc) == "MLX worker for 'org/m' exited with code 3: detail here"
    assert issubclass(mg.SubprocessTimeoutError, TimeoutError)
    copy: Any = pickle.loads(pickle.dumps(mg.SubprocessTimeoutError("slow")))
    assert type(copy) is mg.SubprocessTimeoutError and str(copy) == "slow"
