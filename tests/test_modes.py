"""Sections 4.1 and 3.9 — modes: ``METALGUARD_MODE`` (defensive / observer) decides
whether a refusal raises or is only reported; ``detect_process_mode`` and its defaults.

Every refusal path is run for real in both modes: cadence (check and admit), the circuit
breaker (a running cooldown and a fresh trip), a GPU-gate timeout and a worker spawn
refused by the MLX lock and by cadence. ``python -m mlx_lm.server`` is recognised in a
real child process that runs a stand-in ``mlx_lm`` package (no server is started).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import metal_guard as mg
from helpers import (
    REPO,
    breadcrumb_messages,
    child_env,
    gpu_gate_held_by_another_thread,
    python_child,
    read_line,
    stop_child,
    warnings_from,
    write_breaker_cooldown,
)
from panic_fixtures import Panic, write_panic

MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"


def _observed(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in warnings_from(caplog, "OBSERVE: would refuse")]


@pytest.fixture
def observer(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    caplog.set_level(logging.WARNING, logger="metal_guard")
    yield


@pytest.fixture
def reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "reports"
    folder.mkdir()
    monkeypatch.setenv("METALGUARD_PANIC_REPORT_DIR", str(folder))
    return folder


# -- the mode itself ---------------------------------------------------------------------


def test_mode_is_read_at_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    assert mg.current_mode() == mg.DEFENSIVE == "defensive"
    assert mg.is_defensive() and not mg.is_observer()
    monkeypatch.setenv("METALGUARD_MODE", "  Observer ")
    assert mg.current_mode() == mg.OBSERVER == "observer"
    assert mg.is_observer() and not mg.is_defensive()
    monkeypatch.setenv("METALGUARD_MODE", "")
    assert mg.current_mode() == "defensive"


def test_a_bad_mode_warns_once_per_process_and_means_defensive(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    monkeypatch.setenv("METALGUARD_MODE", "permissive")
    assert [mg.current_mode() for _ in range(3)] == ["defensive"] * 3
    assert mg.is_defensive()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "METALGUARD_MODE='permissive'" in warnings[0] and "'observer'" in warnings[0]


def test_describe_mode_says_what_each_mode_does(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = mg.describe_mode()
    assert set(doc) == {"mode", "description", "env_var"}
    assert doc["mode"] == "defensive"
    assert doc["env_var"] == "METALGUARD_MODE=<unset> (default → defensive)"
    assert "raise" in doc["description"]
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    doc = mg.describe_mode()
    assert doc["mode"] == "observer" and doc["env_var"] == "METALGUARD_MODE='observer'"
    assert "WARNING" in doc["description"] and "OBSERVE: would refuse" in doc["description"]


# -- observer: every refusal is reported, never raised -------------------------------------


def test_observer_cadence_check_and_admit_report_instead_of_raising(
    observer: None, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    guard = mg.CadenceGuard(min_interval_sec=180)
    guard.mark_load(MODEL, ts=time.time() - 10)
    assert guard.check(MODEL) is None
    before = guard.last_ts(MODEL)
    assert before is not None
    mg.require_cadence_clear(MODEL)  # too soon: reported, and the load goes ahead ...
    after = guard.last_ts(MODEL)
    assert after is not None and after > before + 5  # ... and is recorded
    observed = _observed(caplog)
    assert len(observed) == 2 and all("(CadenceViolation)" in o for o in observed)
    crumbs = breadcrumb_messages(mg_home)
    assert sum(c.startswith("OBSERVE: would refuse CadenceViolation: ") for c in crumbs) == 2
    assert sum(c.startswith("CADENCE_BLOCK: ") for c in crumbs) == 1
    assert not any(c.startswith("CADENCE_ADMIT: ") for c in crumbs)


def test_observer_breaker_reports_a_running_cooldown_and_a_fresh_trip(
    observer: None, mg_home: str, reports: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_breaker_cooldown(mg_home)
    assert mg.CircuitBreaker().check() is None
    (Path(mg_home) / "breaker.json").unlink()
    now = time.time()
    for i in range(2):
        write_panic(reports, Panic(ts=now - 60 * (i + 1), pid=100 + i), name=f"p{i}.panic")
    assert mg.CircuitBreaker().check() is None
    state = json.loads((Path(mg_home) / "breaker.json").read_text())
    assert state["cooldown_until"] > now  # the trip itself was recorded as usual
    observed = _observed(caplog)
    assert len(observed) == 2 and all("(MLXCooldownActive)" in o for o in observed)
    crumbs = breadcrumb_messages(mg_home)
    assert any(c.startswith("BREAKER_TRIP: 2 IOGPU kernel panics") for c in crumbs)
    assert sum(c.startswith("OBSERVE: would refuse MLXCooldownActive: ") for c in crumbs) == 2


def test_observer_gate_timeout_runs_the_body_without_the_gate(
    observer: None, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    with gpu_gate_held_by_another_thread("holder"):
        ran = False
        with mg.exclusive_gpu("observed", timeout=0.2):
            ran = True
            assert mg.read_gpu_gate()["label"] == "holder"  # type: ignore[index]
        assert ran
        assert mg.read_gpu_gate()["label"] == "holder"  # type: ignore[index]  # untouched
    assert mg.read_gpu_gate() is None
    observed = _observed(caplog)
    assert len(observed) == 1 and "(GPUBusy)" in observed[0] and "'holder'" in observed[0]
    assert any(
        c.startswith("OBSERVE: would refuse GPUBusy: ") for c in breadcrumb_messages(mg_home)
    )


@pytest.mark.multiprocess
def test_observer_worker_spawn_refusals_are_reported(
    observer: None, mg_home: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The MLX lock is held elsewhere and cadence would refuse the load: both are only
    reported, and the worker goes on to load (a missing folder, so the load fails)."""
    model = str(tmp_path / "missing-model")
    mg.CadenceGuard().mark_load(model)
    holder = python_child(
        "import sys, metal_guard as mg\nmg.acquire_mlx_lock('other app')\n"
        "print('held', flush=True)\nsys.stdin.readline()\n",
        env={"METALGUARD_MODE": "defensive"},
    )
    try:
        assert read_line(holder) == "held"
        with pytest.raises(RuntimeError, match="failed \\(load\\)"):
            mg.MLXSubprocessRunner(model)
    finally:
        stop_child(holder)
    observed = _observed(caplog)
    assert len(observed) == 1 and "(MLXLockConflict)" in observed[0]
    crumbs = breadcrumb_messages(mg_home)
    assert any(c.startswith("OBSERVE: would refuse MLXLockConflict: ") for c in crumbs)
    # inside the worker (same environment, so also observing): the cadence refusal
    assert any(c.startswith("OBSERVE: would refuse CadenceViolation: ") for c in crumbs)
    assert f"SUBPROCESS_WORKER: loading {model}" in crumbs


def _check_rows(out: str) -> dict[str, str]:
    """``metal-guard check``'s ``  <label>  <value>`` rows by label (the layout may change)."""
    rows = {}
    for line in out.splitlines()[1:]:
        label, _, value = line.strip().partition("  ")
        rows[label] = value.strip()
    return rows


def test_observer_check_command_says_what_it_would_refuse(
    observer: None,
    mg_home: str,
    reports: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mg.CadenceGuard().mark_load(MODEL)
    write_breaker_cooldown(mg_home)
    assert mg.main(["check", MODEL]) == 0  # observer mode: the load would go ahead
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"check {MODEL}: GO (observer mode; would refuse: circuit breaker cooldown, cadence)"
    )
    rows = _check_rows(out)
    assert rows["circuit breaker"].startswith("would refuse (observer mode): MLX cooldown active")
    assert rows["cadence"].startswith("would refuse (observer mode): Cadence violation")
    assert "clear" not in (rows["circuit breaker"], rows["cadence"])
    assert mg.main(["--json", "check", MODEL]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["decision"] == "go" and doc["blocked_by"] == []
    assert doc["would_refuse_by"] == ["circuit breaker cooldown", "cadence"]
    assert doc["breaker"]["would_refuse"] is True and doc["breaker"]["blocked"] is False
    assert doc["breaker"]["panic_count"] == 2
    assert doc["cadence"]["would_refuse"] is True and doc["cadence"]["blocked"] is False
    assert 170 < doc["cadence"]["remaining_sec"] <= 180
    assert mg.main(["check", MODEL, "--admit"]) == 0  # observed, so the load is recorded
    assert _check_rows(capsys.readouterr().out)["note"] == "load recorded"
    monkeypatch.setenv("METALGUARD_MODE", "defensive")
    assert mg.main(["check", MODEL]) == 2
    assert capsys.readouterr().out.splitlines()[0] == (
        f"check {MODEL}: BLOCKED by circuit breaker cooldown, cadence"
    )


@pytest.mark.multiprocess
def test_observer_still_raises_what_is_not_a_refusal(
    observer: None, mg_home: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A strict cadence store that cannot be used is an environment fault, and the MLX lock
    that bench_scoped_load takes is an explicit lock: both raise in observer mode too, and
    describe_mode() says so."""
    description = mg.describe_mode()["description"]
    assert "CadenceStoreError" in description and "bench_scoped_load" in description
    store = tmp_path / "cadence.json"
    store.mkdir()  # a folder where the store should be
    strict = mg.CadenceGuard(str(store), strict=True)
    with pytest.raises(mg.CadenceStoreError):
        strict.admit(MODEL)
    holder = python_child(
        "import sys, metal_guard as mg\nmg.acquire_mlx_lock('other app')\n"
        "print('held', flush=True)\nsys.stdin.readline()\n"
    )
    try:
        assert read_line(holder) == "held"
        with pytest.raises(mg.MLXLockConflict), mg.bench_scoped_load(MODEL):
            pytest.fail("the load must not happen")
    finally:
        stop_child(holder)
    assert _observed(caplog) == []


# -- defensive: the same refusals raise -------------------------------------------------------


def test_defensive_refusals_raise(
    mg_home: str, reports: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    guard = mg.CadenceGuard(min_interval_sec=180)
    guard.mark_load(MODEL, ts=time.time() - 10)
    with pytest.raises(mg.CadenceViolation):
        guard.check(MODEL)
    with pytest.raises(mg.CadenceViolation):
        mg.require_cadence_clear(MODEL)
    write_breaker_cooldown(mg_home)
    with pytest.raises(mg.MLXCooldownActive):
        mg.CircuitBreaker().check()
    with (
        gpu_gate_held_by_another_thread("holder"),
        pytest.raises(mg.GPUBusy),
        mg.exclusive_gpu("refused", timeout=0.1),
    ):
        pytest.fail("the body must not run")
    assert _observed(caplog) == []
    assert not any(c.startswith("OBSERVE") for c in breadcrumb_messages(mg_home))


# -- process mode (R6) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/usr/local/bin/uvicorn", "app:app"], "server"),
        (["/srv/venv/bin/gunicorn", "-w", "2", "app:app"], "server"),
        (["python", "-m", "fastapi"], "server"),
        (["/opt/bin/mlx_lm.server", "--model", "m"], "server"),
        (["/home/u/run.py", "--serve-with", "mlx_lm.server"], "server"),
        (["/home/u/pipeline.py"], "cli"),
        (["/usr/bin/pytest", "-q"], "cli"),
        (["python3.12"], "cli"),
        (["-c"], "embedded"),
        ([], "embedded"),
    ],
)
def test_detect_process_mode_from_argv(
    argv: list[str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert mg.detect_process_mode() == expected


def test_detect_process_mode_notebook_and_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/opt/lib/ipykernel_launcher.py", "-f", "kernel.json"])
    assert mg.detect_process_mode() == "notebook"
    monkeypatch.setattr(sys, "argv", ["/home/u/script.py"])
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert mg.detect_process_mode() == "notebook"
    monkeypatch.setenv("METALGUARD_SUBPROCESS_WORKER", "1")
    assert mg.detect_process_mode() == "subprocess_worker"
    doc = mg.describe_process_mode()
    assert doc == {
        "mode": "subprocess_worker",
        "argv0": "/home/u/script.py",
        "has_ipykernel": True,
        "subprocess_worker_env": "1",
        "defaults": {
            "generate_timeout_sec": 300,
            "periodic_flush_interval_sec": 300,
            "kv_ceiling_gb": 20,
            "prefill_single_alloc_ceiling_gb": 5.0,
            "skip_process_lock": True,
            "mode": "subprocess_worker",
        },
    }


STAND_IN = "import metal_guard, sys\nprint(metal_guard.detect_process_mode())\n"


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-m", "mlx_lm.server", "--port", "8080"], "server"),
        (["-m", "mlx_lm", "server", "--port", "8080"], "server"),
        (["-m", "mlx_lm.generate", "--prompt", "hi"], "cli"),
    ],
)
def test_python_dash_m_mlx_lm_server_is_a_server(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    """A stand-in ``mlx_lm`` package (first on the path) reports what the module sees."""
    package = tmp_path / "mlx_lm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("server.py", "__main__.py", "generate.py"):
        (package / name).write_text(STAND_IN)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), REPO])
    out = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == expected


def test_apply_mode_defaults() -> None:
    assert mg.apply_mode_defaults("server") == {
        "generate_timeout_sec": 60,
        "periodic_flush_interval_sec": 60,
        "kv_ceiling_gb": 10,
        "prefill_single_alloc_ceiling_gb": 4.0,
        "mode": "server",
    }
    unknown = mg.apply_mode_defaults("batch")
    assert unknown["mode"] == "batch" and unknown["generate_timeout_sec"] == 300
    first = mg.apply_mode_defaults("notebook")
    first["kv_ceiling_gb"] = 1
    assert mg.apply_mode_defaults("notebook")["kv_ceiling_gb"] == 30  # a copy every time
    assert mg.apply_mode_defaults()["mode"] == mg.detect_process_mode()
    assert mg.ProcessMode is str
