"""The release barrier (``wait_for_release``) and ``bench_scoped_load``.

Real parts only: MLX on CPU allocates and frees real memory (200 MB), the tiny llama is
loaded with mlx-lm, and the MLX lock is probed by real child processes with ``flock``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import HAS_MLX_LM, child_env, requires_mlx, requires_mlx_lm

MB = 1 << 20
SPIKE = 200_000_000  # bytes


def messages(n: int = 200) -> list[str]:
    """This process's breadcrumb messages (the singleton's default path under mg_home)."""
    return [line.split(" ", 2)[2] for line in mg.read_breadcrumbs(n)]


@pytest.fixture
def fast_cleanup(monkeypatch: pytest.MonkeyPatch) -> None:
    """The singleton's 2 s cleanup cooldown is not what these tests are about."""
    monkeypatch.setattr(mg.metal_guard, "cooldown_secs", 0)


@pytest.fixture
def lock_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "locks" / "mlx_exclusive.lock"
    monkeypatch.setenv("MLX_LOCK_PATH", str(path))
    return path


PROBE = """
import fcntl, os, sys
path = sys.argv[1]
if not os.path.exists(path):
    print("free"); sys.exit()
fd = os.open(path, os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("busy")
"""

HOLD = """
import fcntl, os, sys
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def lock_state(path: Path) -> str:
    """What another process sees: "busy" while we hold the MLX lock, else "free"."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


@pytest.fixture
def foreign_holder(lock_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the MLX lock until the test ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(30)


# -- wait_for_release --------------------------------------------------------------------


@requires_mlx
def test_release_after_dropping_200mb_is_measured() -> None:
    import mlx.core as mx

    baseline = mx.get_active_memory()
    holder: dict[str, Any] = {"array": mx.ones((SPIKE // 4,), dtype=mx.float32)}
    mx.eval(holder["array"])
    assert mx.get_active_memory() - baseline >= SPIKE

    def drop_later() -> None:  # another part of the program lets go 0.3 s from now
        time.sleep(0.3)
        holder.clear()

    dropper = threading.Thread(target=drop_later)
    dropper.start()
    stats = mg.wait_for_release(baseline, timeout=10)
    dropper.join()
    assert isinstance(stats, mg.ReleaseStats) and isinstance(stats, mg.MemoryStats)
    assert stats.released is True and stats.baseline_bytes == baseline
    assert stats.active_bytes <= baseline + 64 * MB
    assert 0.25 <= stats.waited_sec < 10  # it waited for the drop, and no longer than needed
    (line,) = [m for m in messages() if m.startswith("RELEASE:")]
    assert line.startswith(f"RELEASE: done active={stats.active_gb:.2f}GB")
    assert line.endswith(f"waited={stats.waited_sec:.2f}s")


@requires_mlx
def test_release_times_out_while_the_memory_is_still_referenced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import mlx.core as mx

    baseline = mx.get_active_memory()
    kept = mx.ones((SPIKE // 4,), dtype=mx.float32)
    mx.eval(kept)
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        stats = mg.wait_for_release(baseline, timeout=0.3, slack_bytes=0)
    assert stats.released is False
    assert stats.active_bytes >= baseline + SPIKE
    assert stats.waited_sec >= 0.3
    assert messages()[-1].startswith("RELEASE: TIMEOUT active=")
    (warning,) = caplog.records
    assert "something still references the model" in warning.getMessage()
    del kept
    assert mg.wait_for_release(baseline, timeout=5).released is True


@requires_mlx
def test_release_defaults_to_the_baseline_of_the_last_admitted_load(mg_home: str) -> None:
    import mlx.core as mx

    assert mg.wait_for_release().baseline_bytes is None  # no load admitted in this process yet
    mg.CadenceGuard(min_interval_sec=0).admit("org/model-a")
    baseline = mx.get_active_memory()
    loaded = mx.ones((SPIKE // 4,), dtype=mx.float32)  # "the model"
    mx.eval(loaded)
    del loaded
    stats = mg.wait_for_release(timeout=5)
    assert stats.baseline_bytes == baseline and stats.released
    mg.CadenceGuard(min_interval_sec=0).mark_load("org/model-b")
    assert mg.wait_for_release(timeout=5).baseline_bytes == mx.get_active_memory()


def test_release_without_mlx_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    start = time.monotonic()
    stats = mg.wait_for_release(123, timeout=30)
    assert time.monotonic() - start < 1
    assert (stats.active_bytes, stats.baseline_bytes, stats.released) == (0, 123, True)
    assert not any(m.startswith("RELEASE:") for m in messages())


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"baseline_bytes": -1}, ValueError),
        ({"baseline_bytes": "0"}, TypeError),
        ({"timeout": -1}, ValueError),
        ({"timeout": float("inf")}, ValueError),
        ({"slack_bytes": float("nan")}, ValueError),
    ],
)
def test_release_arguments(kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        mg.wait_for_release(**kwargs)


@requires_mlx
def test_release_as_a_guard_method_writes_its_breadcrumbs(tmp_path: Path) -> None:
    path = tmp_path / "own.log"
    guard = mg.MetalGuard(breadcrumb_path=path)
    stats = guard.wait_for_release(0, timeout=1, slack_bytes=1 << 40)
    assert stats.released
    assert path.read_text().count("RELEASE: done") == 1


# -- bench_scoped_load -------------------------------------------------------------------


@requires_mlx_lm
def test_bench_scoped_load_leaves_memory_at_its_baseline(
    tiny_llama_path: str, fast_cleanup: None, lock_path: Path
) -> None:
    import mlx.core as mx

    scope = mg.bench_scoped_load(tiny_llama_path)
    with scope as (model, tokenizer):
        assert scope.baseline_bytes is not None
        loaded = mx.get_active_memory() - scope.baseline_bytes
        assert loaded > 100_000  # the weights are really in MLX memory
        assert lock_state(lock_path) == "busy"
        assert type(model).__module__.startswith("mlx_lm.models.")
        assert hasattr(tokenizer, "encode")
        del model, tokenizer  # the caller's references: the scope cannot drop them
    assert scope.release is not None and scope.release.released
    assert scope.release.active_bytes <= scope.baseline_bytes + MB
    assert mx.get_active_memory() <= scope.baseline_bytes + MB
    assert lock_state(lock_path) == "free"
    tags = [m for m in messages() if m.startswith(("BENCH_SCOPED_LOAD", "RELEASE", "CADENCE"))]
    assert tags == [
        f"BENCH_SCOPED_LOAD: ENTER {tiny_llama_path} backend=mlx",
        f"CADENCE_ADMIT: {tiny_llama_path}",
        f"BENCH_SCOPED_LOAD: direct load {tiny_llama_path}",
        f"BENCH_SCOPED_LOAD: EXIT {tiny_llama_path} — unloading + cooldown",
        tags[4],
        f"CADENCE_UNLOAD: {tiny_llama_path}",
        f"BENCH_SCOPED_LOAD: EXIT {tiny_llama_path} done, active={scope.release.active_gb:.1f}GB",
    ]
    assert tags[4].startswith("RELEASE: done")
    status = mg.CadenceGuard().status()["events"][0]
    assert status["model_id"] == tiny_llama_path and status["last_unload"] is not None


@requires_mlx_lm
def test_bench_scoped_load_refuses_a_back_to_back_load(
    tiny_llama_path: str, fast_cleanup: None, lock_path: Path
) -> None:
    with mg.bench_scoped_load(tiny_llama_path) as loaded:
        del loaded
    with pytest.raises(mg.CadenceViolation) as info, mg.bench_scoped_load(tiny_llama_path):
        pytest.fail("the body must not run")
    assert info.value.model_id == tiny_llama_path
    assert lock_state(lock_path) == "free"
    crumbs = messages()
    assert any(m.startswith(f"CADENCE_BLOCK: {tiny_llama_path}") for m in crumbs)
    assert crumbs[-1].startswith("MLX_LOCK: released")  # released after the refusal


def test_bench_scoped_load_releases_the_lock_when_the_load_raises(
    tmp_path: Path, fast_cleanup: None, lock_path: Path
) -> None:
    missing = str(tmp_path / "no-such-model")
    # mlx-lm reads a missing folder as a hub id and rejects it (a ValueError); without
    # mlx-lm (the no-MLX suite) the loader's import fails.
    expected = ValueError if HAS_MLX_LM else ModuleNotFoundError
    with pytest.raises(expected), mg.bench_scoped_load(missing):
        pytest.fail("the body must not run")
    assert lock_state(lock_path) == "free"
    tags = [m for m in messages() if m.startswith("BENCH_SCOPED_LOAD")]
    assert tags == [
        f"BENCH_SCOPED_LOAD: ENTER {missing} backend=mlx",
        f"BENCH_SCOPED_LOAD: direct load {missing}",
        f"BENCH_SCOPED_LOAD: EXIT {missing} — unloading + cooldown",
        f"BENCH_SCOPED_LOAD: EXIT {missing} done, active=0.0GB",
    ]
    event = mg.CadenceGuard().status()["events"][0]
    assert event["last_unload"] is not None  # the interval counts from the failed attempt


def test_bench_scoped_load_with_the_lock_held_elsewhere(
    foreign_holder: subprocess.Popen[str], fast_cleanup: None, lock_path: Path
) -> None:
    conflict = getattr(mg, "MLXLockConflict", mg.StateLockTimeout)
    with pytest.raises(conflict), mg.bench_scoped_load("org/model"):
        pytest.fail("the body must not run")
    assert mg.CadenceGuard().last_ts("org/model") is None  # never admitted, never loaded
    assert not any("direct load" in m for m in messages())


def test_bench_scoped_load_rejects_caller_bugs_before_anything(lock_path: Path) -> None:
    with pytest.raises(ValueError, match="backend must be"):
        mg.bench_scoped_load("org/model", backend="torch")
    with pytest.raises(ValueError, match="model_id is empty"):
        mg.bench_scoped_load("  ")
    with pytest.raises(TypeError):
        mg.bench_scoped_load(42)  # type: ignore[arg-type]
    assert messages() == [] and not lock_path.exists()
