"""Shared test helpers: what this environment has, skip decorators, and the small tools
several test files need (child processes, log and breadcrumb readers, spies).

The suite runs twice: with real MLX + mlx-lm and without MLX. Tests that need MLX use
these decorators (or the ``mlx`` / ``mlx_lm`` markers) and skip cleanly with a reason::

    from helpers import HAS_MLX, requires_mlx, requires_mlx_lm

``tests/`` is on ``sys.path`` through the pytest configuration in ``pyproject.toml``.
Fixtures (``mg_home``, ``real_mx``, ``mx_calls``, the tiny models) live in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "HAS_MLX",
    "HAS_MLX_LM",
    "NO_MLX_LM_REASON",
    "NO_MLX_REASON",
    "REPO",
    "MlxCalls",
    "breadcrumb_messages",
    "child_env",
    "free_port",
    "gpu_gate_held_by_another_thread",
    "has_module",
    "holding_lock_in_child",
    "python_child",
    "read_json",
    "read_line",
    "run_python",
    "requires_mlx",
    "requires_mlx_lm",
    "spawn_python",
    "spy_file_locks",
    "spy_report_reads",
    "stop_child",
    "stub_mx",
    "warnings_from",
    "write_breaker_cooldown",
]

REPO = str(Path(__file__).resolve().parents[1])


# -- the environment --------------------------------------------------------------------


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a child Python that imports the working copy."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(overrides)
    return env


def has_module(name: str) -> bool:
    """True when ``name`` can be found, without importing it (parents are imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _mlx_works() -> bool:
    # find_spec alone is not enough: on Linux plain `mlx` installs the `mlx` package
    # but `import mlx.core` fails until the `mlx-cpu` wheel is present.
    if not has_module("mlx.core"):
        return False
    try:
        importlib.import_module("mlx.core")
    except Exception:
        return False
    return True


HAS_MLX: bool = _mlx_works()

# mlx-lm is not imported here: the import takes about 2 s (transformers) and calls
# resource.setrlimit. Finding the package (and tokenizers, which the tiny-model
# builder uses) is enough to decide; the fixtures that need it import it.
HAS_MLX_LM: bool = HAS_MLX and has_module("mlx_lm") and has_module("tokenizers")

NO_MLX_REASON = "MLX is not installed in this environment (no-MLX suite)"
NO_MLX_LM_REASON = "MLX and mlx-lm are not installed in this environment (no-MLX suite)"

requires_mlx = pytest.mark.skipif(not HAS_MLX, reason=NO_MLX_REASON)
requires_mlx_lm = pytest.mark.skipif(not HAS_MLX_LM, reason=NO_MLX_LM_REASON)


# -- child processes --------------------------------------------------------------------


def run_python(code: str, *args: str, **run_kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports the working copy; text output captured.

    ``env`` defaults to :func:`child_env`, ``timeout`` to 60 s; other keyword arguments go to
    ``subprocess.run`` (``check=True`` to fail on a non-zero exit).
    """
    run_kwargs.setdefault("env", child_env())
    run_kwargs.setdefault("timeout", 60)
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, **run_kwargs
    )


@contextlib.contextmanager
def gpu_gate_held_by_another_thread(label: str = "holder") -> Iterator[None]:
    """Another thread of this process holds the GPU gate for the ``with`` body."""
    import threading

    import metal_guard as mg

    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with mg.exclusive_gpu(label):
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        assert inside.wait(10), "the holder thread never got the gate"
        yield
    finally:
        leave.set()
        thread.join(10)


def spawn_python(code: str, *args: str, **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """A fresh interpreter running ``code`` (argv ``args``) that imports the working copy.

    ``env`` defaults to :func:`child_env`; other keyword arguments go to ``Popen``.
    """
    popen_kwargs.setdefault("env", child_env())
    return subprocess.Popen([sys.executable, "-c", code, *args], **popen_kwargs)


_HOLD_LOCK = """
import sys, time, metal_guard as mg
with mg._FileLock(sys.argv[1], timeout=5):
    sys.stdout.write("held\\n"); sys.stdout.flush()
    time.sleep(60)
"""


@contextlib.contextmanager
def holding_lock_in_child(lock_path: str) -> Iterator[subprocess.Popen[bytes]]:
    """Another process holds the library's file lock on ``lock_path`` inside the block.

    The child is killed on exit, so the OS releases the lock with it.
    """
    holder = spawn_python(_HOLD_LOCK, lock_path, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- what the library wrote ------------------------------------------------------------


def read_json(path: Path | str) -> Any:
    """The JSON document in ``path``."""
    return json.loads(Path(path).read_text("utf-8"))


def warnings_from(
    caplog: pytest.LogCaptureFixture, containing: str | None = None
) -> list[logging.LogRecord]:
    """The library's WARNING (and worse) records, optionally only those whose message
    contains ``containing``."""
    return [
        r
        for r in caplog.records
        if r.name == "metal_guard"
        and r.levelno >= logging.WARNING
        and (containing is None or containing in r.getMessage())
    ]


def write_breaker_cooldown(home: Path | str) -> None:
    """A ``breaker.json`` under ``home`` saying a one-hour cooldown started now (2 panics)."""
    now = time.time()
    state = {
        "schema": 1,
        "tripped_at": now,
        "cooldown_until": now + 3600,
        "cooldown_sec": 3600,
        "panic_count": 2,
        "window_sec": 3600,
    }
    (Path(home) / "breaker.json").write_text(json.dumps(state))


def breadcrumb_messages(
    home: Path | str, name: str = "breadcrumbs.log", *, pid: int | None = None
) -> list[str]:
    """The message of each line of ``home/name`` (``<time> pid=<n> <message>``), or ``[]``;
    with ``pid``, only that process's lines."""
    path = Path(home) / name
    if not path.exists():
        return []
    lines = path.read_text("utf-8").splitlines()
    if pid is not None:
        lines = [line for line in lines if f" pid={pid} " in line]
    return [line.split(" ", 2)[2] for line in lines]


# -- spies ----------------------------------------------------------------------------


def spy_file_locks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every library file lock built from now on (the lock still works)."""
    import metal_guard as mg

    paths: list[str] = []
    real = mg._FileLock

    class SpyLock(real):  # type: ignore[misc, valid-type]
        def __init__(self, path: str, timeout: float = 10.0) -> None:
            paths.append(path)
            super().__init__(path, timeout)

    monkeypatch.setattr(mg, "_FileLock", SpyLock)
    return paths


def spy_report_reads(
    monkeypatch: pytest.MonkeyPatch, deny: Callable[[str], bool] = lambda path: False
) -> list[tuple[str, int]]:
    """Record ``(path, limit)`` of every bounded file read of the panic scanner.

    Paths for which ``deny(path)`` is true fail with ``PermissionError`` instead.
    """
    import metal_guard as mg

    reads: list[tuple[str, int]] = []
    real = mg._read_bounded

    def spy(path: str, limit: int) -> bytes:
        reads.append((path, limit))
        if deny(path):
            raise PermissionError(13, "Permission denied", path)
        return real(path, limit)

    monkeypatch.setattr(mg, "_read_bounded", spy)
    return reads


class MlxCalls:
    """An ordered log of MLX calls: wrapped functions append ``(name, args)``; a test
    appends its own markers with :meth:`mark`."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []

    def wrap(self, real: Callable[..., Any], name: str, *, fail: bool = False) -> Any:
        def wrapper(*args: Any) -> Any:
            self.events.append((name, args))
            if fail:
                raise RuntimeError(f"{name} failed: the driver is unhappy")
            return real(*args)

        return wrapper

    def mark(self, label: str) -> None:
        self.events.append((label, ()))

    def names(self) -> list[str]:
        """Call names; a call with arguments (a stream) shows as ``name(stream)``."""
        return [name if not args else f"{name}(stream)" for name, args in self.events]

    def after(self, label: str) -> list[tuple[str, tuple[Any, ...]]]:
        """The events after the last ``label`` marker."""
        index = max(i for i, (name, _) in enumerate(self.events) if name == label)
        return self.events[index + 1 :]


def stub_mx(
    monkeypatch: pytest.MonkeyPatch, calls: MlxCalls, *, failing: Iterable[str] = ()
) -> types.ModuleType:
    """Install a stand-in ``mlx.core`` whose ``clear_cache`` / ``synchronize`` log to
    ``calls`` and raise when named in ``failing``.

    Only for what the CPU build cannot do: make Metal itself fail. mlx-lm's generate
    module is hidden too, so only the stub's default stream exists.
    """
    failing = set(failing)
    monkeypatch.delitem(sys.modules, "mlx_lm.generate", raising=False)
    stub = types.ModuleType("mlx.core")
    stub.clear_cache = calls.wrap(  # type: ignore[attr-defined]
        lambda: None, "clear_cache", fail="clear_cache" in failing
    )
    stub.synchronize = calls.wrap(  # type: ignore[attr-defined]
        lambda *a: None, "synchronize", fail="synchronize" in failing
    )
    monkeypatch.setitem(sys.modules, "mlx.core", stub)
    return stub


def python_child(code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    """:func:`spawn_python` in text mode with stdin/stdout/stderr piped and ``cwd`` the repo.

    ``env`` overrides go in ``env=...`` as for :func:`child_env`.
    """
    options: dict[str, Any] = {
        "stdin": subprocess.PIPE,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
        "text": True,
        "cwd": REPO,
    }
    options.update(kwargs)
    options["env"] = child_env(**kwargs.get("env", {}))
    child: subprocess.Popen[str] = spawn_python(code, *args, **options)
    return child


def read_line(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """The next stdout line of ``proc`` (stripped); fails the test on EOF or after ``timeout``."""
    import threading

    stdout = proc.stdout
    assert stdout is not None
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert got, f"no output from pid {proc.pid} within {timeout} s"
    line = got[0]
    if not line:
        err = proc.stderr.read() if proc.stderr is not None else ""
        raise AssertionError(f"pid {proc.pid} exited ({proc.wait()}) without output: {err}")
    return line.strip()


def stop_child(proc: subprocess.Popen[str]) -> None:
    """End a test child (these hold no Metal memory, so SIGKILL is fine) and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


def wait_until(condition: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``condition()`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.005)


def no_live_workers() -> bool:
    """No metal-guard worker process of this test process is alive."""
    return not [p for p in multiprocessing.active_children() if "metal-guard" in p.name]
