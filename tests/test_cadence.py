"""Cadence section: refuse back-to-back model loads, across processes.

Real files, real ``flock`` locks, real processes. Events are placed in the past with
``ts=`` (so intervals of minutes need no waiting); where real time must pass, the
intervals are a fraction of a second. The only timing assertions are the interval
semantics themselves.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import pickle
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import (
    breadcrumb_messages,
    read_json,
    requires_mlx,
    requires_mlx_lm,
    run_python,
    spawn_python,
    warnings_from,
)
from metal_guard import (
    GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC,
    CadenceGuard,
    CadenceStoreError,
    CadenceViolation,
    CrossModelCadenceViolation,
    StateLockTimeout,
    cadence_scope,
    require_cadence_clear,
)

RESERVED = "__metal_guard__"

LLAMA = "mlx-community/Llama-3.2-1B-Instruct-4bit"
QWEN = "mlx-community/Qwen2.5-7B-Instruct-4bit"
PHI = "mlx-community/phi-4-4bit"
GEMMA = "mlx-community/gemma-4-31b-it-8bit"
G4 = GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC


# -- helpers ------------------------------------------------------------------


def _store(home: str) -> Path:
    return Path(home) / "cadence.json"


def _read(path: Path | str) -> dict[str, Any]:
    data = read_json(path)
    assert isinstance(data, dict)
    return data


def _original_view(path: Path | str) -> dict[str, float]:
    """What the original metal-guard sees in a store: number values only."""
    data = _read(path)
    return {
        k: float(v)
        for k, v in data.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _assert_original_can_read(path: Path | str) -> None:
    """Every key but the reserved one maps to a number; ours live under the reserved key."""
    data = _read(path)
    for key, value in data.items():
        if key == RESERVED:
            assert isinstance(value, dict), value
        else:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
            assert math.isfinite(value)


@pytest.fixture
def guard_path(tmp_path: Path) -> str:
    return str(tmp_path / "store" / "cadence.json")


# -- the semantics table --------------------------------------------------------

# (id, events [(kind, model, age_sec)], target, min_interval, cross_base, expected)
# expected: None (admitted) or (kind, last_model, interval, age of the event it counts from)
CASES: list[tuple[str, list[tuple[str, str, float]], str, float, float, Any]] = [
    ("empty store", [], LLAMA, 180, 60, None),
    ("same model too soon", [("load", LLAMA, 10)], LLAMA, 180, 0, ("same", None, 180, 10)),
    ("same model after the interval", [("load", LLAMA, 181)], LLAMA, 180, 0, None),
    ("min interval 0 disables same", [("load", LLAMA, 0.5)], LLAMA, 0, 0, None),
    (
        "same-model violation wins over cross-model",
        [("load", LLAMA, 10), ("load", QWEN, 5)],
        LLAMA,
        180,
        60,
        ("same", None, 180, 10),
    ),
    ("cross-model too soon", [("load", QWEN, 10)], LLAMA, 180, 60, ("cross", QWEN, 60, 10)),
    ("cross-model base 0 disables", [("load", QWEN, 1)], LLAMA, 180, 0, None),
    ("cross-model after the interval", [("load", QWEN, 61)], LLAMA, 180, 60, None),
    (
        "cross-model counts from the latest other model",
        [("load", QWEN, 50), ("load", PHI, 5)],
        LLAMA,
        0,
        60,
        ("cross", PHI, 60, 5),
    ),
    ("gemma-4 floor at base 0", [("load", QWEN, 30)], GEMMA, 180, 0, ("cross", QWEN, G4, 30)),
    ("gemma-4 floor above base", [("load", QWEN, 70)], GEMMA, 180, 60, ("cross", QWEN, G4, 70)),
    ("gemma-4 base above floor", [("load", QWEN, 100)], GEMMA, 180, 120, ("cross", QWEN, 120, 100)),
    ("gemma-4 clear after the floor", [("load", QWEN, G4 + 1)], GEMMA, 180, 0, None),
    ("floor only for a gemma-4 target", [("load", GEMMA, 30)], LLAMA, 180, 0, None),
    (
        "gemma-4 previous model uses base",
        [("load", GEMMA, 30)],
        LLAMA,
        180,
        60,
        ("cross", GEMMA, 60, 30),
    ),
    (
        "gemma-4 same-model rule is min_interval",
        [("load", GEMMA, 30)],
        GEMMA,
        20,
        0,
        None,
    ),
    (
        "unload restarts the same-model window",
        [("load", LLAMA, 500), ("unload", LLAMA, 20)],
        LLAMA,
        180,
        0,
        ("same", None, 180, 20),
    ),
    (
        "an unload before the load does not count",
        [("unload", LLAMA, 500), ("load", LLAMA, 200)],
        LLAMA,
        180,
        0,
        None,
    ),
    (
        "unload restarts the cross-model window",
        [("load", QWEN, 500), ("unload", QWEN, 5)],
        LLAMA,
        180,
        60,
        ("cross", QWEN, 60, 5),
    ),
    ("unload alone counts", [("unload", QWEN, 5)], GEMMA, 0, 0, ("cross", QWEN, G4, 5)),
    (
        "case-insensitive same model",
        [("load", LLAMA.upper(), 10)],
        LLAMA,
        180,
        60,
        ("same", None, 180, 10),
    ),
    (
        "HF cache folder is the same model",
        [("load", "/hf/hub/models--mlx-community--Llama-3.2-1B-Instruct-4bit/snapshots/abc", 10)],
        LLAMA,
        180,
        60,
        ("same", None, 180, 10),
    ),
    (
        "whitespace is stripped",
        [("load", f"  {LLAMA}\n", 10)],
        LLAMA,
        180,
        60,
        ("same", None, 180, 10),
    ),
]


def _place(guard: CadenceGuard, events: list[tuple[str, str, float]]) -> float:
    now = time.time()
    for kind, model, age in events:
        if kind == "load":
            guard.mark_load(model, ts=now - age)
        else:
            guard.mark_unload(model, ts=now - age)
    return now


def _assert_expected(exc: CadenceViolation, expected: Any, target: str, now: float) -> None:
    kind, last_model, interval, age = expected
    if kind == "same":
        assert type(exc) is CadenceViolation
    else:
        assert type(exc) is CrossModelCadenceViolation
        assert exc.last_model == last_model
        assert exc.cross_model_interval == interval
    assert exc.model_id == target
    assert exc.min_interval == interval
    assert exc.last_ts == pytest.approx(now - age, abs=1e-6)
    # delta is "now - last_ts" at the decision, a few ms after the events were placed
    assert age <= exc.delta < age + 5
    assert exc.remaining_sec == pytest.approx(interval - exc.delta, abs=1e-6)


@pytest.mark.parametrize(
    ("events", "target", "min_interval", "cross", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_cadence_semantics_table(
    guard_path: str,
    mg_home: str,
    events: list[tuple[str, str, float]],
    target: str,
    min_interval: float,
    cross: float,
    expected: Any,
) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=min_interval, cross_model_interval_sec=cross)
    now = _place(guard, events)
    before = Path(guard_path).read_bytes() if events else None

    # check() decides without recording anything
    if expected is None:
        guard.check(target)
    else:
        with pytest.raises(CadenceViolation) as info:
            guard.check(target)
        _assert_expected(info.value, expected, target, now)
    if before is None:
        assert not Path(guard_path).exists()
    else:
        assert Path(guard_path).read_bytes() == before

    # admit() decides the same way, and records the load only when admitted
    if expected is None:
        guard.admit(target)
        recorded = _read(guard_path)[target]
        assert now <= recorded <= time.time()
        assert guard.last_ts(target) == recorded
        assert f"CADENCE_ADMIT: {target}" in "\n".join(breadcrumb_messages(mg_home))
    else:
        with pytest.raises(CadenceViolation) as info:
            guard.admit(target)
        _assert_expected(info.value, expected, target, now)
        assert Path(guard_path).read_bytes() == before  # a refusal records nothing
        assert f"CADENCE_BLOCK: {target}" in "\n".join(breadcrumb_messages(mg_home))


def test_local_gemma4_folder_gets_the_floor_by_config(tmp_path: Path, guard_path: str) -> None:
    folder = tmp_path / "my-finetune"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma4_text"}))
    guard = CadenceGuard(guard_path, min_interval_sec=0, cross_model_interval_sec=0)
    guard.mark_load(QWEN, ts=time.time() - 30)
    assert guard.effective_cross_interval(str(folder)) == G4
    with pytest.raises(CrossModelCadenceViolation) as info:
        guard.admit(folder)  # a pathlib.Path works as a model id
    assert info.value.cross_model_interval == G4
    assert info.value.last_model == QWEN
    # a folder of another architecture, whatever it is called, gets the base (0): admitted
    other = tmp_path / "gemma-4-31b-it"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    guard.admit(other)


def test_real_time_interval_blocks_then_admits(guard_path: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=1.0)
    guard.admit(LLAMA)
    first = guard.last_ts(LLAMA)
    assert first is not None
    with pytest.raises(CadenceViolation) as info:
        guard.admit(LLAMA)
    assert 0 < info.value.remaining_sec <= 1.0
    time.sleep(info.value.remaining_sec + 0.02)
    guard.admit(LLAMA)  # the interval has passed: admitted
    second = guard.last_ts(LLAMA)
    assert second is not None and second - first >= 1.0


def test_mark_unload_moves_the_window(guard_path: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=180, cross_model_interval_sec=60)
    now = time.time()
    guard.mark_load(LLAMA, ts=now - 400)
    assert guard.last_ts(LLAMA) == pytest.approx(now - 400)
    guard.mark_unload(LLAMA, ts=now - 30)
    assert guard.last_ts(LLAMA) == pytest.approx(now - 30)
    data = _read(guard_path)
    assert data[LLAMA] == pytest.approx(now - 400)  # the original metal-guard's view: the load time
    assert data[RESERVED]["unloads"][LLAMA] == pytest.approx(now - 30)
    with pytest.raises(CadenceViolation):
        guard.check(LLAMA)
    with pytest.raises(CrossModelCadenceViolation):
        guard.check(QWEN)
    # A stale, older mark (a delayed report from another process) never shortens the window.
    guard.mark_unload(LLAMA, ts=now - 200)
    guard.mark_load(LLAMA, ts=now - 500)
    assert guard.last_ts(LLAMA) == pytest.approx(now - 30)
    assert _read(guard_path)[LLAMA] == pytest.approx(now - 400)
    with pytest.raises(CadenceViolation):
        guard.check(LLAMA)
    assert guard.clear(LLAMA) == 1  # forgetting is explicit
    guard.check(LLAMA)
    guard.check(QWEN)


# -- scope / cadence_scope -----------------------------------------------------


def test_scope_admits_on_entry_and_marks_unload_on_exit(guard_path: str, mg_home: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=60)
    t0 = time.time()
    with guard.scope(LLAMA) as inside:
        assert inside is guard
        loaded = _read(guard_path)[LLAMA]
        assert loaded >= t0
        assert LLAMA not in _read(guard_path)[RESERVED]["unloads"]
        with pytest.raises(CadenceViolation):
            guard.check(LLAMA)
    unloaded = _read(guard_path)[RESERVED]["unloads"][LLAMA]
    assert unloaded >= loaded
    assert guard.last_ts(LLAMA) == unloaded
    assert "CADENCE_ADMIT: " + LLAMA in "\n".join(breadcrumb_messages(mg_home))


def test_scope_that_raises_before_loading_is_not_counted(guard_path: str) -> None:
    """A body that raises before MLX allocated anything loaded nothing: no record stays."""
    guard = CadenceGuard(guard_path, min_interval_sec=60)
    boom = ValueError("body failed")
    with pytest.raises(ValueError) as info, guard.scope(LLAMA):
        raise boom
    assert info.value is boom
    assert boom.__context__ is None and boom.__cause__ is None
    data = _read(guard_path)
    assert LLAMA not in data and LLAMA not in data[RESERVED]["unloads"]
    assert LLAMA not in data[RESERVED]["pids"]
    guard.admit(LLAMA)  # the next admission is free


@requires_mlx
def test_scope_marks_unload_when_the_body_raises_after_allocating(
    guard_path: str, real_mx: Any
) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=60)
    boom = ValueError("body failed")
    with pytest.raises(ValueError) as info, guard.scope(LLAMA):
        weights = real_mx.ones((512, 512))  # 1 MiB: a load that reached MLX
        real_mx.eval(weights)
        raise boom
    assert info.value is boom
    del weights
    assert LLAMA in _read(guard_path)[RESERVED]["unloads"]
    with pytest.raises(CadenceViolation):
        guard.admit(LLAMA)


def test_scope_blocked_on_entry_runs_no_body_and_marks_nothing(guard_path: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=60)
    guard.mark_load(LLAMA, ts=time.time() - 1)
    ran = False
    with pytest.raises(CadenceViolation), guard.scope(LLAMA):
        ran = True
    assert not ran
    assert LLAMA not in _read(guard_path)[RESERVED]["unloads"]


def test_scope_validates_the_model_id_when_built(guard_path: str) -> None:
    guard = CadenceGuard(guard_path)
    with pytest.raises(TypeError, match="model_id must be a str"):
        guard.scope(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_id is empty"):
        cadence_scope("  ", guard=guard)
    assert not Path(guard_path).exists()


def test_cadence_scope_default_guard_and_guard_argument(guard_path: str, mg_home: str) -> None:
    boom = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt) as info, cadence_scope(LLAMA, min_interval_sec=0.2):
        raise boom
    assert info.value is boom
    store = _read(_store(mg_home))  # interrupted before anything reached MLX: not counted
    assert LLAMA not in store and LLAMA not in store[RESERVED]["unloads"]
    with cadence_scope(LLAMA, min_interval_sec=0.2):
        pass
    store = _read(_store(mg_home))
    assert LLAMA in store and LLAMA in store[RESERVED]["unloads"]

    guard = CadenceGuard(guard_path, min_interval_sec=0.2)
    with cadence_scope(QWEN, min_interval_sec=9999, guard=guard):
        pass
    assert QWEN in _read(guard_path)[RESERVED]["unloads"]
    assert QWEN not in _read(_store(mg_home))
    with pytest.raises(TypeError, match="guard must be a CadenceGuard, not str"):
        cadence_scope(QWEN, guard="not a guard")  # type: ignore[arg-type]


def test_strict_scope_store_failure_on_exit(
    guard_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A strict guard raises on exit, unless the body already raised (never masked)."""
    guard = CadenceGuard(guard_path, min_interval_sec=0, strict=True)
    store = Path(guard_path)

    def break_store() -> None:
        store.unlink()
        store.mkdir()  # a folder where cadence.json should be

    with pytest.raises(CadenceStoreError), guard.scope(LLAMA):
        break_store()
    store.rmdir()

    boom = RuntimeError("the body's own error")
    with pytest.raises(RuntimeError) as info, guard.scope(QWEN):
        break_store()
        raise boom
    assert info.value is boom
    assert boom.__context__ is None
    assert any("cannot be used" in r.getMessage() for r in warnings_from(caplog))


# -- require_cadence_clear: configuration resolution -----------------------------


def _other_loaded(mg_home: str, age: float, model: str = QWEN) -> None:
    CadenceGuard(str(_store(mg_home))).mark_load(model, ts=time.time() - age)


def test_require_cadence_clear_uses_default_store_and_records(mg_home: str) -> None:
    require_cadence_clear(LLAMA, min_interval_sec=60)
    assert LLAMA in _read(_store(mg_home))
    with pytest.raises(CadenceViolation) as info:
        require_cadence_clear(LLAMA, min_interval_sec=60)
    assert info.value.min_interval == 60
    lines = "\n".join(breadcrumb_messages(mg_home))
    assert f"CADENCE_ADMIT: {LLAMA}" in lines
    assert f"CADENCE_BLOCK: {LLAMA}" in lines


def test_require_cadence_clear_default_cross_is_zero(mg_home: str) -> None:
    _other_loaded(mg_home, 1)
    require_cadence_clear(LLAMA)  # compatibility default: no cross-model rule
    assert LLAMA in _read(_store(mg_home))


def test_require_cadence_clear_argument_beats_env(
    mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METALGUARD_CROSS_MODEL_INTERVAL", "1000")
    _other_loaded(mg_home, 10)
    require_cadence_clear(LLAMA, cross_model_interval_sec=5)  # 10 s > 5 s: admitted
    _other_loaded(mg_home, 10)
    with pytest.raises(CrossModelCadenceViolation) as info:
        require_cadence_clear(PHI, cross_model_interval_sec=30)
    assert info.value.cross_model_interval == 30


@pytest.mark.parametrize("explicit", [0, 0.0, -5])
def test_require_cadence_clear_env_when_argument_not_positive(
    explicit: float, mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METALGUARD_CROSS_MODEL_INTERVAL", " 30 ")
    _other_loaded(mg_home, 10)
    with pytest.raises(CrossModelCadenceViolation) as info:
        require_cadence_clear(LLAMA, cross_model_interval_sec=explicit)
    assert info.value.cross_model_interval == 30
    assert info.value.last_model == QWEN


def test_require_cadence_clear_env_zero_allowed(
    mg_home: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("METALGUARD_CROSS_MODEL_INTERVAL", "0")
    _other_loaded(mg_home, 1)
    require_cadence_clear(LLAMA)
    assert warnings_from(caplog) == []
    # a gemma-4 target still gets its floor
    with pytest.raises(CrossModelCadenceViolation) as info:
        require_cadence_clear(GEMMA)
    assert info.value.cross_model_interval == G4


@pytest.mark.parametrize("raw", ["garbage", "nan", "inf", "-5", "1e999", "30s"])
def test_require_cadence_clear_bad_env_warns_once_and_uses_zero(
    raw: str, mg_home: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("METALGUARD_CROSS_MODEL_INTERVAL", raw)
    _other_loaded(mg_home, 1)
    require_cadence_clear(LLAMA)
    _other_loaded(mg_home, 1)
    require_cadence_clear(PHI)
    warnings = warnings_from(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "METALGUARD_CROSS_MODEL_INTERVAL" in warnings[0].getMessage()


def test_require_cadence_clear_guard_argument_wins(guard_path: str, mg_home: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=30, cross_model_interval_sec=0)
    require_cadence_clear(LLAMA, min_interval_sec=0, cross_model_interval_sec=9999, guard=guard)
    assert LLAMA in _read(guard_path)
    assert not _store(mg_home).exists()
    guard.mark_load(QWEN, ts=time.time() - 1)
    require_cadence_clear(PHI, cross_model_interval_sec=9999, guard=guard)  # guard's 0 applies
    with pytest.raises(CadenceViolation) as info:
        require_cadence_clear(PHI, min_interval_sec=0, guard=guard)
    assert info.value.min_interval == 30
    with pytest.raises(TypeError, match="guard must be a CadenceGuard, not object"):
        require_cadence_clear(LLAMA, guard=object())  # type: ignore[arg-type]


def test_cadence_path_default_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "elsewhere" / "store.json"
    monkeypatch.setattr(mg, "_CADENCE_PATH_DEFAULT", str(target))
    assert CadenceGuard().path == str(target)
    require_cadence_clear(LLAMA)
    assert LLAMA in _read(target)


def test_one_cross_model_interval_resolver(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Argument when > 0, else METALGUARD_CROSS_MODEL_INTERVAL, else 0 — for every caller."""
    resolve = mg._cross_model_interval
    assert resolve(0) == 0.0
    assert resolve(5.0) == 5.0
    assert resolve(-3) == 0.0  # a negative interval means 0
    monkeypatch.setenv("METALGUARD_CROSS_MODEL_INTERVAL", "12.5")
    assert resolve(0.0) == 12.5
    assert resolve(7) == 7.0  # an argument > 0 beats the environment
    assert mg._default_guard(180.0, 0.0).cross_model_interval_sec == 12.5
    assert (
        mg._cadence_guard(mg._cli_parser()[0].parse_args(["cadence"])).cross_model_interval_sec
        == 12.5
    )
    assert warnings_from(caplog) == []
    monkeypatch.setenv("METALGUARD_CROSS_MODEL_INTERVAL", "-5")
    assert resolve(0) == 0.0
    (warning,) = warnings_from(caplog)
    assert "METALGUARD_CROSS_MODEL_INTERVAL='-5'" in warning.getMessage()
    mg._reset_process_state()
    caplog.clear()
    monkeypatch.setenv("METALGUARD_CROSS_MODEL_INTERVAL", "not-a-number")
    assert resolve(0) == 0.0
    assert resolve(0) == 0.0
    warnings = warnings_from(caplog)
    assert len(warnings) == 1
    assert "METALGUARD_CROSS_MODEL_INTERVAL" in warnings[0].getMessage()


# -- constructor and argument validation ---------------------------------------


def test_properties_and_defaults(guard_path: str) -> None:
    guard = CadenceGuard(guard_path)
    assert guard.path == guard_path
    assert guard.min_interval_sec == 180.0
    assert guard.cross_model_interval_sec == 0.0
    assert CadenceGuard(Path(guard_path)).path == guard_path
    relative = CadenceGuard("rel/cadence.json").path
    assert os.path.isabs(relative) and relative.endswith("rel/cadence.json")
    explicit = CadenceGuard(guard_path, min_interval_sec=0.0, cross_model_interval_sec=0.0)
    assert explicit.min_interval_sec == 0.0 and explicit.cross_model_interval_sec == 0.0
    ints = CadenceGuard(guard_path, min_interval_sec=5, cross_model_interval_sec=7)
    assert ints.min_interval_sec == 5.0 and ints.cross_model_interval_sec == 7.0
    assert isinstance(ints.min_interval_sec, float)
    with pytest.raises(AttributeError):
        guard.min_interval_sec = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", ["min_interval_sec", "cross_model_interval_sec"])
def test_interval_validation(name: str, guard_path: str) -> None:
    def build(value: Any) -> CadenceGuard:
        kwargs: dict[str, Any] = {name: value}
        return CadenceGuard(guard_path, **kwargs)

    def require(value: Any) -> None:
        kwargs: dict[str, Any] = {name: value}
        require_cadence_clear(LLAMA, **kwargs)

    assert getattr(build(-5), name) == 0.0
    assert getattr(build(-0.0), name) == 0.0
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            build(bad)
    for bad in ("10", None, True, [1], b"1"):
        with pytest.raises(TypeError, match=f"{name} must be a number"):
            build(bad)
    with pytest.raises(TypeError, match=f"{name} must be a number"):
        require("10")
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        require(float("nan"))


def test_path_validation() -> None:
    for bad in (42, b"/tmp/x.json", ["x"]):
        with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
            CadenceGuard(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="path must be a non-empty path"):
        CadenceGuard("   ")


BAD_TYPES = [42, None, b"mlx-community/x", ["mlx-community/x"], 1.5, object()]
BAD_VALUES = ["", "   ", "\n\t ", "x" * 10_000]


def _model_id_calls(guard: CadenceGuard) -> list[Any]:
    return [
        guard.check,
        guard.admit,
        guard.mark_load,
        guard.mark_unload,
        guard.last_ts,
        guard.scope,
        lambda m: require_cadence_clear(m, guard=guard),
        lambda m: require_cadence_clear(m),
        lambda m: cadence_scope(m),
    ]


@pytest.mark.parametrize("bad", BAD_TYPES, ids=lambda b: type(b).__name__)
def test_model_id_type_errors(bad: Any, guard_path: str, mg_home: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=0)
    for call in _model_id_calls(guard):
        with pytest.raises(TypeError, match="model_id"):
            call(bad)
    assert not Path(guard_path).exists()
    assert not _store(mg_home).exists()


@pytest.mark.parametrize("bad", BAD_VALUES, ids=["empty", "spaces", "whitespace", "huge"])
def test_model_id_value_errors(bad: str, guard_path: str, mg_home: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=0)
    for call in _model_id_calls(guard):
        with pytest.raises(ValueError, match="model_id"):
            call(bad)
    assert not Path(guard_path).exists()
    assert not _store(mg_home).exists()


def test_mark_ts_validation(guard_path: str) -> None:
    guard = CadenceGuard(guard_path)
    bads: list[Any] = ["123", True, [1], None.__class__]
    for bad in bads:
        with pytest.raises(TypeError, match="ts"):
            guard.mark_load(LLAMA, ts=bad)
        with pytest.raises(TypeError, match="ts"):
            guard.mark_unload(LLAMA, ts=bad)
    for bad in (float("nan"), float("inf"), -float("inf")):  # a number, but no point in time
        with pytest.raises(ValueError, match="ts"):
            guard.mark_load(LLAMA, ts=bad)
        with pytest.raises(ValueError, match="ts"):
            guard.mark_unload(LLAMA, ts=bad)
    guard.mark_load(LLAMA, ts=1_700_000_000)  # an int is a number of seconds


def test_canonicalisation_and_case(guard_path: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=60)
    hf = Path("/root/.cache/huggingface/hub/models--MLX-Community--Some-Model/snapshots/0123abc")
    guard.admit(hf)
    data = _read(guard_path)
    assert "MLX-Community/Some-Model" in data  # case preserved as given
    assert data[RESERVED]["pids"]["MLX-Community/Some-Model"] == os.getpid()
    for alias in (
        "mlx-community/some-model",
        " MLX-COMMUNITY/SOME-MODEL \n",
        str(hf) + "/",
        "/x/models--mlx-community--some-model",
    ):
        with pytest.raises(CadenceViolation) as info:
            guard.check(alias)
        assert type(info.value) is CadenceViolation
    assert guard.last_ts("mlx-community/SOME-model") == data["MLX-Community/Some-Model"]


def test_breadcrumbs_name_the_canonical_model(guard_path: str, mg_home: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=60)
    guard.admit(f"  {LLAMA}  ")
    with pytest.raises(CadenceViolation):
        guard.admit(LLAMA)
    lines = breadcrumb_messages(mg_home)
    admits = [x for x in lines if "CADENCE_ADMIT: " in x]
    blocks = [x for x in lines if "CADENCE_BLOCK: " in x]
    assert admits == [f"CADENCE_ADMIT: {LLAMA}"]
    assert len(blocks) == 1 and blocks[0].startswith(f"CADENCE_BLOCK: {LLAMA} wait=")
    guard.check(PHI)
    guard.mark_load(PHI)
    assert len(breadcrumb_messages(mg_home)) == 2  # check/mark write no breadcrumbs


def test_a_retry_loop_writes_one_block_breadcrumb_per_event(guard_path: str, mg_home: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=60)
    guard.mark_load(LLAMA, ts=time.time() - 10)
    for _ in range(50):
        with pytest.raises(CadenceViolation):
            guard.admit(LLAMA)
    assert sum("CADENCE_BLOCK: " in x for x in breadcrumb_messages(mg_home)) == 1
    guard.mark_unload(LLAMA)  # a new event: its first refusal is recorded again
    for _ in range(5):
        with pytest.raises(CadenceViolation):
            guard.admit(LLAMA)
    assert sum("CADENCE_BLOCK: " in x for x in breadcrumb_messages(mg_home)) == 2


def test_threads_racing_admit_exactly_one(guard_path: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=60)
    barrier = threading.Barrier(8)
    results: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            guard.admit(LLAMA)
            outcome = "admitted"
        except CadenceViolation:
            outcome = "blocked"
        except Exception as exc:  # pragma: no cover - reported by the assert below
            outcome = repr(exc)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["admitted"] + ["blocked"] * 7


# -- store format and compatibility ----------------------------------------------


def test_reads_a_store_in_the_original_format(guard_path: str) -> None:
    now = time.time()
    Path(guard_path).parent.mkdir(parents=True)
    original = {
        LLAMA: now - 10,
        QWEN: int(now - 20),
        "junk-string": "not a time",
        "junk-list": [1, 2],
        "junk-null": None,
        "junk-bool": True,
        "junk-object": {"a": 1},
        "": now,
    }
    Path(guard_path).write_text(json.dumps(original))
    guard = CadenceGuard(guard_path, min_interval_sec=60, cross_model_interval_sec=0)
    assert guard.last_ts(LLAMA) == pytest.approx(now - 10)
    assert guard.last_ts(QWEN) == float(int(now - 20))
    assert guard.last_ts("junk-string") is None
    assert guard.last_ts("junk-bool") is None
    with pytest.raises(CadenceViolation):
        guard.check(LLAMA)
    guard.admit(PHI)
    data = _read(guard_path)
    # the original's entries and its junk survive our write; ours is a plain number
    assert data[LLAMA] == original[LLAMA] and data[QWEN] == original[QWEN]
    assert data["junk-string"] == "not a time" and data["junk-list"] == [1, 2]
    assert isinstance(data[PHI], float)
    assert isinstance(data[RESERVED], dict)


def test_our_store_stays_readable_by_the_original(guard_path: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=0, cross_model_interval_sec=0)
    with guard.scope(LLAMA):
        pass
    guard.admit(QWEN)
    guard.mark_unload(PHI)
    guard.admit("/hf/models--org--name/snapshots/rev")
    _assert_original_can_read(guard_path)
    view = _original_view(guard_path)
    assert set(view) == {LLAMA, QWEN, "org/name"}  # unload-only PHI is under the reserved key
    data = _read(guard_path)
    assert data[RESERVED]["schema"] == 1
    assert set(data[RESERVED]["unloads"]) == {LLAMA, PHI}


def test_foreign_reserved_content_is_tolerated(guard_path: str) -> None:
    Path(guard_path).parent.mkdir(parents=True)
    now = time.time()
    Path(guard_path).write_text(
        json.dumps(
            {
                LLAMA: now - 5,
                RESERVED: {"unloads": {QWEN: "yesterday", PHI: now - 2}, "future": [1], "pids": 3},
            }
        )
    )
    guard = CadenceGuard(guard_path, min_interval_sec=60, cross_model_interval_sec=60)
    assert guard.last_ts(PHI) == pytest.approx(now - 2)
    assert guard.last_ts(QWEN) is None
    with pytest.raises(CrossModelCadenceViolation) as info:
        guard.check(GEMMA)
    assert info.value.last_model == PHI
    Path(guard_path).write_text(json.dumps({LLAMA: now - 5, RESERVED: "not an object"}))
    assert guard.last_ts(LLAMA) == pytest.approx(now - 5)
    guard.mark_load(QWEN, ts=now - 1000)
    _assert_original_can_read(guard_path)


def test_old_entries_dropped_on_write(guard_path: str) -> None:
    now = time.time()
    Path(guard_path).parent.mkdir(parents=True)
    Path(guard_path).write_text(
        json.dumps(
            {
                "org/ancient": now - 4 * 3600 - 60,
                "org/recent": now - 3 * 3600,
                "junk": "kept",
                RESERVED: {"unloads": {"org/ancient-unload": now - 5 * 3600, "org/u": now - 60}},
            }
        )
    )
    guard = CadenceGuard(guard_path, min_interval_sec=0)
    guard.admit(LLAMA)
    data = _read(guard_path)
    assert "org/ancient" not in data
    assert "org/recent" in data and "junk" in data and LLAMA in data
    assert set(data[RESERVED]["unloads"]) == {"org/u"}


def test_other_spellings_stay_current_for_the_original(guard_path: str) -> None:
    """A process of the original metal-guard looks its model up by the exact string it was given."""
    now = time.time()
    hf = "/Users/me/.cache/huggingface/hub/models--Org--Model/snapshots/abc"
    Path(guard_path).parent.mkdir(parents=True)
    Path(guard_path).write_text(
        json.dumps({hf: now - 500, "ORG/MODEL": now - 400, "org/other": now - 300})
    )
    guard = CadenceGuard(guard_path, min_interval_sec=180)
    guard.admit("Org/Model")
    view = _original_view(guard_path)
    assert view["Org/Model"] >= now  # stored with the case it was given
    assert view[hf] == view["ORG/MODEL"] == view["Org/Model"]  # so the original sees it too
    assert view["org/other"] == now - 300
    with pytest.raises(CadenceViolation):
        guard.check(hf)
    # an older mark never makes another writer's record older
    guard.mark_load("org/model", ts=now - 1000)
    after = _original_view(guard_path)
    assert after["org/model"] == view["Org/Model"]  # the new spelling gets the newest time
    assert after[hf] == after["Org/Model"] == view["Org/Model"]
    assert guard.last_ts("ORG/model") == view["Org/Model"]


CORRUPTIONS = {
    "garbage bytes": b"\x00\x01garbage{{{",
    "truncated": b'{"mlx-community/x": 17',
    "a JSON list": b"[1, 2, 3]",
    "a JSON string": b'"cadence"',
    "a JSON number": b"42",
    "null": b"null",
    "invalid UTF-8": b'{"\xff\xfe": 1.0}',
}


@pytest.mark.parametrize("content", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_store_is_quarantined_once(
    content: bytes, guard_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = Path(guard_path)
    store.parent.mkdir(parents=True)
    store.write_bytes(content)
    guard = CadenceGuard(guard_path, min_interval_sec=60)
    assert guard.last_ts(LLAMA) is None  # treated as empty, even read-only
    guard.check(LLAMA)
    guard.admit(LLAMA)
    with pytest.raises(CadenceViolation):
        guard.admit(LLAMA)
    moved = sorted(store.parent.glob("cadence.json.corrupt-*"))
    assert len(moved) == 1
    assert moved[0].read_bytes() == content
    assert LLAMA in _read(store)
    _assert_original_can_read(store)
    warnings = warnings_from(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "moved it to" in warnings[0].getMessage()


def test_clock_stepped_back_blocks_at_most_one_interval(
    guard_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    Path(guard_path).parent.mkdir(parents=True)
    Path(guard_path).write_text(
        json.dumps({LLAMA: now + 3 * 3600, RESERVED: {"unloads": {QWEN: now + 5 * 3600}}})
    )
    before = Path(guard_path).read_bytes()
    slow = CadenceGuard(guard_path, min_interval_sec=60, cross_model_interval_sec=60)
    # check: a record from the future has no knowable age; it is ignored (one WARNING),
    # never counted as "now" on every call (that would block checks for hours)
    for model in (LLAMA, PHI, LLAMA):
        slow.check(model)
    (warning,) = warnings_from(caplog)
    assert "dated in the future" in warning.getMessage() and LLAMA in warning.getMessage()
    assert Path(guard_path).read_bytes() == before  # check records nothing, not even a repair
    # admit repairs the records (pulled back to now) and so waits at most one interval
    for model in (LLAMA, PHI):  # same-model entry / another model's unload from the future
        with pytest.raises(CadenceViolation) as info:
            slow.admit(model)
        assert 50 < info.value.remaining_sec <= 60  # one interval, not hours
        assert info.value.delta >= 0
    stored = _read(guard_path)
    assert stored[LLAMA] <= time.time() + 1
    assert stored[RESERVED]["unloads"][QWEN] <= time.time() + 1
    with pytest.raises(CadenceViolation):
        slow.check(LLAMA)  # repaired: the check now sees the record
    # with a short interval, the load goes ahead once that interval has passed
    guard = CadenceGuard(guard_path, min_interval_sec=0.3, cross_model_interval_sec=0.3)
    for _ in range(500):
        try:
            guard.admit(LLAMA)
            break
        except CadenceViolation as exc:
            assert exc.remaining_sec <= 0.3
            time.sleep(0.02)
    else:  # pragma: no cover
        pytest.fail("blocked for longer than one interval")


def test_clock_stepped_back_admit_repairs_too(guard_path: str) -> None:
    now = time.time()
    Path(guard_path).parent.mkdir(parents=True)
    Path(guard_path).write_text(json.dumps({QWEN: now + 10 * 3600}))
    guard = CadenceGuard(guard_path, min_interval_sec=0, cross_model_interval_sec=0.2)
    with pytest.raises(CrossModelCadenceViolation) as info:
        guard.admit(LLAMA)
    assert info.value.remaining_sec <= 0.2
    assert _read(guard_path)[QWEN] <= time.time() + 1
    time.sleep(0.25)
    guard.admit(LLAMA)


# -- environment faults: fail open (one WARNING) or strict -------------------------


def _fault_file_as_folder(tmp_path: Path) -> str:
    (tmp_path / "home").write_text("a regular file where the state folder should be")
    return str(tmp_path / "home" / "cadence.json")


def _fault_folder_as_store(tmp_path: Path) -> str:
    (tmp_path / "home" / "cadence.json").mkdir(parents=True)
    return str(tmp_path / "home" / "cadence.json")


def _fault_symlinked_store(tmp_path: Path) -> str:
    (tmp_path / "home").mkdir()
    (tmp_path / "target.json").write_text(json.dumps({LLAMA: 1.0}))
    (tmp_path / "home" / "cadence.json").symlink_to(tmp_path / "target.json")
    return str(tmp_path / "home" / "cadence.json")


def _fault_dangling_symlink(tmp_path: Path) -> str:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "cadence.json").symlink_to(tmp_path / "nowhere.json")
    return str(tmp_path / "home" / "cadence.json")


def _fault_symlinked_lock(tmp_path: Path) -> str:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "cadence.json.lock").symlink_to(tmp_path / "lock-target")
    return str(tmp_path / "home" / "cadence.json")


FAULTS = {
    "file where the folder should be": _fault_file_as_folder,
    "folder where cadence.json should be": _fault_folder_as_store,
    "cadence.json is a symlink": _fault_symlinked_store,
    "cadence.json is a dangling symlink": _fault_dangling_symlink,
    "lock file is a symlink": _fault_symlinked_lock,
}


def _tree(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "->" + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "dir"
    return out


@pytest.mark.parametrize("make_fault", FAULTS.values(), ids=FAULTS.keys())
def test_unusable_store_fails_open_with_one_warning(
    make_fault: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    path = make_fault(faults)
    before = _tree(faults)
    guard = CadenceGuard(path, min_interval_sec=60, cross_model_interval_sec=60)
    for _ in range(3):  # every call proceeds: loads are never blocked by a broken store
        guard.admit(LLAMA)
        guard.check(LLAMA)
        guard.mark_load(QWEN)
        guard.mark_unload(QWEN)
        with guard.scope(PHI):
            pass
        require_cadence_clear(GEMMA, guard=guard)
    after = _tree(faults)
    if "home/cadence.json.lock" not in before:  # the sidecar lock file may be created, empty
        assert after.pop("home/cadence.json.lock", b"") == b""
    assert after == before  # nothing else written anywhere, never through a link
    warnings = warnings_from(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert path in warnings[0].getMessage()
    assert "NOT being spaced" in warnings[0].getMessage()


@pytest.mark.parametrize("make_fault", FAULTS.values(), ids=FAULTS.keys())
def test_unusable_store_strict_raises(make_fault: Any, tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    path = make_fault(faults)
    guard = CadenceGuard(path, min_interval_sec=60, strict=True)
    for call in (guard.admit, guard.mark_load, guard.mark_unload):
        with pytest.raises(CadenceStoreError) as info:
            call(LLAMA)
        err = info.value
        assert err.path == path
        assert path in str(err) and "cannot be used" in str(err) and "strict=True" in str(err)
        assert isinstance(err.__cause__, OSError)
    with pytest.raises(CadenceStoreError):
        require_cadence_clear(LLAMA, guard=guard)


def test_unwritable_home_via_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """METALGUARD_HOME pointing at a regular file: require_cadence_clear still proceeds."""
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("METALGUARD_HOME", str(home))
    monkeypatch.setenv("METALGUARD_BREADCRUMB_PATH", str(tmp_path / "crumbs.log"))
    for _ in range(3):
        require_cadence_clear(LLAMA)
    assert home.read_text() == "not a folder"
    assert len(warnings_from(caplog)) == 1
    assert len(warnings_from(caplog, "cadence store")) == 1
    assert "store unusable" in (tmp_path / "crumbs.log").read_text()


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: directory permissions do not stop root from writing "
    "(the root-proof variants above cover the same fault)",
)
def test_read_only_home_fails_open_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o500)
    try:
        guard = CadenceGuard(str(home / "cadence.json"), min_interval_sec=60)
        for _ in range(3):
            guard.admit(LLAMA)
        assert list(home.iterdir()) == []
        assert len(warnings_from(caplog, "cadence store")) == 1
        strict = CadenceGuard(str(home / "cadence.json"), strict=True)
        with pytest.raises(CadenceStoreError):
            strict.admit(LLAMA)
    finally:
        home.chmod(0o700)


@pytest.fixture
def held_lock(guard_path: str) -> Iterator[str]:
    """The store's lock held through another open file description (a real flock)."""
    Path(guard_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(guard_path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield guard_path
    finally:
        os.close(fd)


def test_lock_held_too_long_fails_open_or_strict(
    held_lock: str, caplog: pytest.LogCaptureFixture
) -> None:
    guard = CadenceGuard(held_lock, min_interval_sec=60, lock_timeout=0.2)
    guard.admit(LLAMA)  # proceeds after the timeout, unrecorded
    assert not Path(held_lock).exists()
    assert len(warnings_from(caplog, "cadence store")) == 1
    strict = CadenceGuard(held_lock, min_interval_sec=60, lock_timeout=0.2, strict=True)
    with pytest.raises(CadenceStoreError) as info:
        strict.admit(LLAMA)
    assert isinstance(info.value.__cause__, StateLockTimeout)
    assert info.value.__cause__.timeout == pytest.approx(0.2)


# -- exceptions: messages and pickling --------------------------------------------


def _same_exception(a: BaseException, b: BaseException) -> None:
    assert type(a) is type(b)
    assert str(a) == str(b)
    assert a.args == b.args
    assert vars(a) == vars(b)


def test_exceptions_round_trip_through_pickle(held_lock: str, tmp_path: Path) -> None:
    raised: list[BaseException] = []
    other = str(tmp_path / "other.json")
    guard = CadenceGuard(other, min_interval_sec=60, cross_model_interval_sec=60)
    guard.mark_load(LLAMA, ts=time.time() - 12.3)
    with pytest.raises(CadenceViolation) as same:
        guard.admit(LLAMA)
    raised.append(same.value)
    with pytest.raises(CrossModelCadenceViolation) as cross:
        guard.admit(GEMMA)
    raised.append(cross.value)
    strict = CadenceGuard(held_lock, strict=True, lock_timeout=0.1)
    with pytest.raises(CadenceStoreError) as store:
        strict.admit(LLAMA)
    raised.append(store.value)
    assert isinstance(store.value.__cause__, StateLockTimeout)
    raised.append(store.value.__cause__)
    # constructed directly, with the original's positional signatures
    raised.append(CadenceViolation("m", time.time() - 1, 180))
    raised.append(CrossModelCadenceViolation("a", "b", time.time() - 1, 90.0))
    for exc in raised:
        for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
            _same_exception(exc, pickle.loads(pickle.dumps(exc, protocol)))
    copy = pickle.loads(pickle.dumps(cross.value))
    assert isinstance(copy, CrossModelCadenceViolation) and isinstance(copy, RuntimeError)
    assert (copy.model_id, copy.last_model) == (GEMMA, LLAMA)
    assert copy.min_interval == copy.cross_model_interval == G4


def test_exception_pickles_in_another_process(guard_path: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=60, cross_model_interval_sec=60)
    guard.mark_load(QWEN, ts=time.time() - 5)
    with pytest.raises(CrossModelCadenceViolation) as info:
        guard.admit(LLAMA)
    blob = pickle.dumps(info.value).hex()
    code = (
        "import pickle, sys\n"
        "e = pickle.loads(bytes.fromhex(sys.argv[1]))\n"
        "print(type(e).__name__, e.model_id, e.last_model, e.min_interval, str(e) == sys.argv[2])\n"
    )
    proc = spawn_python(code, blob, str(info.value), stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.split() == ["CrossModelCadenceViolation", LLAMA, QWEN, "60.0", "True"]


def test_violation_messages() -> None:
    now = time.time()
    same = CadenceViolation("org/Model", now - 12.34, 180.0, now=now)
    text = str(same)
    assert "'org/Model'" in text
    assert "12.3 s ago" in text
    assert "180 s" in text and "180.0 s" not in text  # the interval in whole seconds
    assert "Wait 167.7 s" in text
    assert same.delta == pytest.approx(12.34) and same.remaining_sec == pytest.approx(167.66)

    cross = CrossModelCadenceViolation("org/gemma-4-31b-it", "org/Qwen", now - 30, G4, now=now)
    text = str(cross)
    assert "cross-model load" in text
    assert "'org/gemma-4-31b-it'" in text and "'org/Qwen'" in text
    assert "30.0 s ago" in text and "90 s" in text and "Wait 60.0 s" in text
    assert cross.min_interval == cross.cross_model_interval == 90.0

    # a future last_ts (clock stepped back) never gives a negative age
    future = CadenceViolation("m", now + 3600, 60, now=now)
    assert future.delta == 0.0 and future.remaining_sec == 60.0
    # still blocked: the wait shown is never rounded down to zero
    almost = CadenceViolation("m", now - 59.96, 60, now=now)
    assert almost.remaining_sec > 0
    assert "Wait 0.0 s" not in str(almost)


def test_except_cadence_violation_catches_both(guard_path: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=60, cross_model_interval_sec=60)
    guard.mark_load(QWEN, ts=time.time() - 1)
    with pytest.raises(CadenceViolation) as info:
        guard.admit(LLAMA)
    assert type(info.value) is CrossModelCadenceViolation
    assert issubclass(CadenceViolation, RuntimeError)
    assert issubclass(CadenceStoreError, RuntimeError)


def test_status_and_clear(guard_path: str) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=60, cross_model_interval_sec=30)
    now = time.time()
    guard.mark_load(QWEN, ts=now - 100)
    guard.mark_load(LLAMA, ts=now - 10)
    status = guard.status(now=now)
    assert status["path"] == guard_path and status["problem"] is None
    assert [row["model_id"] for row in status["events"]] == [LLAMA, QWEN]
    assert status["events"][0]["same_model_blocked_sec"] == pytest.approx(50)
    assert status["last_model"] == LLAMA
    assert status["other_models_blocked_sec"] == pytest.approx(20)
    assert status["gemma4_models_blocked_sec"] == pytest.approx(G4 - 10)
    assert guard.clear(LLAMA.upper()) == 1
    assert guard.last_ts(LLAMA) is None and guard.last_ts(QWEN) is not None
    assert guard.clear() == 1
    assert _original_view(guard_path) == {}


# -- real processes ---------------------------------------------------------------

RACE_CODE = r"""
import json, os, sys, time
import metal_guard as mg
out, go, model, interval = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
store = mg.CadenceGuard().path
open(out + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
with open(go) as f:
    end = float(f.read())
admits, errors, blocked = [], [], 0
pause = 0.002 + (os.getpid() % 4) * 0.001
while time.time() < end:
    t0 = time.time()
    try:
        mg.require_cadence_clear(model, min_interval_sec=interval)
    except mg.CadenceViolation:
        blocked += 1
        time.sleep(pause)
        continue
    except Exception as exc:
        errors.append(repr(exc))
        continue
    t1 = time.time()
    exact = None
    try:
        # the admission time the guard recorded under its lock (ours if our pid is there)
        with open(store) as f:
            data = json.load(f)
        ts, pid = data.get(model), data["__metal_guard__"]["pids"].get(model)
        if pid == os.getpid() and isinstance(ts, float) and t0 <= ts <= t1:
            exact = ts
    except Exception as exc:
        errors.append("read: " + repr(exc))
    admits.append([t0, t1, exact])
with open(out, "w") as f:
    json.dump({"admits": admits, "errors": errors, "blocked": blocked}, f)
"""


def _start_together(
    tmp_path: Path, code: str, argvs: list[list[str]], run_for: float
) -> list[dict[str, Any]]:
    """Run one child per argv; all start their loops at the same moment, for ``run_for`` s."""
    go = tmp_path / "go"
    outs = [tmp_path / f"child-{i}.json" for i in range(len(argvs))]
    procs = [
        spawn_python(code, str(out), str(go), *argv, stderr=subprocess.PIPE, text=True)
        for out, argv in zip(outs, argvs, strict=True)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all(Path(str(o) + ".ready").exists() for o in outs):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.01)
        tmp = tmp_path / "go.tmp"
        tmp.write_text(repr(time.time() + run_for))
        tmp.rename(go)
        errs = [p.communicate(timeout=120 + run_for)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * len(procs), errs
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_eight_processes_racing_one_model(tmp_path: Path, mg_home: str) -> None:
    interval, run_for, slack = 0.25, 6.0, 0.05
    results = _start_together(
        tmp_path, RACE_CODE, [[LLAMA, repr(interval)] for _ in range(8)], run_for
    )
    errors = [e for r in results for e in r["errors"]]
    assert errors == []
    admits = sorted(
        (a for r in results for a in r["admits"]),
        key=lambda a: a[2] if a[2] is not None else a[0],
    )
    n = len(admits)
    assert n >= 2 and sum(r["blocked"] for r in results) > 0
    exact = [a[2] for a in admits if a[2] is not None]
    # normally every admission reads back its own record; a process delayed for longer than
    # an interval right after its admission cannot, and is then only bounded by [t0, t1]
    assert len(exact) >= n // 2, (len(exact), n)
    gaps = [b - a for a, b in itertools.pairwise(exact)]
    assert min(gaps) >= interval - 1e-3, sorted(gaps)[:5]
    # the count is what the interval allows over the observed span
    lows = [a[2] if a[2] is not None else a[0] for a in admits]
    highs = [a[2] if a[2] is not None else a[1] for a in admits]
    span_max = max(highs) - min(lows)
    span_min = max(lows) - min(highs)
    low = math.floor(span_min / (interval + slack))
    high = math.floor(span_max / interval) + 1
    assert low <= n <= high, (n, low, high, span_min, span_max)
    # the store holds the last admission
    stored = _read(_store(mg_home))[LLAMA]
    assert stored == max(exact) or any(a[0] <= stored <= a[1] for a in admits if a[2] is None)


MANY_MODELS_CODE = r"""
import json, os, sys, time
import metal_guard as mg
out, go, index, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
open(out + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
errors = []
for j in range(count):
    model = f"proc{index}/model-{j}"
    try:
        mg.require_cadence_clear(model, min_interval_sec=0.01, cross_model_interval_sec=0)
        mg.CadenceGuard().mark_unload(model)
    except Exception as exc:
        errors.append(repr(exc))
with open(out, "w") as f:
    json.dump({"errors": errors, "pid": os.getpid()}, f)
"""


@pytest.mark.multiprocess
def test_eight_processes_twenty_models_lose_no_marks(tmp_path: Path, mg_home: str) -> None:
    results = _start_together(
        tmp_path, MANY_MODELS_CODE, [[str(i), "20"] for i in range(8)], run_for=0
    )
    assert [e for r in results for e in r["errors"]] == []
    expected = {f"proc{i}/model-{j}" for i in range(8) for j in range(20)}
    data = _read(_store(mg_home))
    assert set(data) - {RESERVED} == expected
    assert set(data[RESERVED]["unloads"]) == expected
    pids = data[RESERVED]["pids"]
    assert {m: pids[m] for m in expected} == {
        f"proc{i}/model-{j}": results[i]["pid"] for i in range(8) for j in range(20)
    }
    _assert_original_can_read(_store(mg_home))
    assert sorted(p.name for p in Path(mg_home).iterdir() if p.name.startswith(".")) == []


HAMMER_CODE = r"""
import sys
import metal_guard as mg
guard = mg.CadenceGuard(min_interval_sec=0, strict=True)
i = 0
while True:
    model = f"org/model-{i % 7}"
    guard.admit(model)
    guard.mark_load(model)
    guard.mark_unload(model)
    i += 1
    sys.stdout.write(f"{i}\n")
    sys.stdout.flush()
"""


@pytest.mark.multiprocess
def test_sigkill_mid_admit_leaves_a_parsable_store_and_no_lock(
    tmp_path: Path, mg_home: str
) -> None:
    rng = random.Random(20240611)
    store = _store(mg_home)
    for round_no in range(4):
        proc = spawn_python(HAMMER_CODE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        target = 50 + rng.randrange(40)
        try:
            assert proc.stdout is not None
            count = 0
            while count < target:
                line = proc.stdout.readline()
                assert line, proc.stderr.read() if proc.stderr else "child died"
                count = int(line)
            time.sleep(rng.random() * 0.004)  # land somewhere inside the next iteration
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        data = _read(store)  # parses: never half-written
        _assert_original_can_read(store)
        assert len([k for k in data if k.startswith("org/model-")]) == 7
        fresh = CadenceGuard(strict=True, min_interval_sec=60, lock_timeout=2.0)
        fresh.admit(f"org/fresh-{round_no}")  # the lock is free (strict: a timeout would raise)
        assert f"org/fresh-{round_no}" in _read(store)


# -- waiting for the cadence ----------------------------------------------------------

WAIT_CODE = r"""
import json, os, sys, time
import metal_guard as mg
out, go, model, interval = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
store = mg.CadenceGuard().path
open(out + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
t0 = time.time()
mg.require_cadence_clear(model, min_interval_sec=interval, wait=True)
t1 = time.time()
with open(store) as f:
    data = json.load(f)
mine = data["__metal_guard__"]["pids"].get(model) == os.getpid()
with open(out, "w") as f:
    json.dump({"t0": t0, "t1": t1, "ts": data.get(model) if mine else None}, f)
"""


@pytest.mark.multiprocess
def test_two_processes_waiting_for_one_model_both_load_an_interval_apart(
    tmp_path: Path, mg_home: str
) -> None:
    interval = 1.5
    first, second = sorted(
        _start_together(tmp_path, WAIT_CODE, [[LLAMA, repr(interval)]] * 2, 0.0),
        key=lambda r: r["t1"],
    )
    # each read back its own record right after its admission (the other was still waiting)
    assert first["ts"] is not None and second["ts"] is not None
    assert second["ts"] - first["ts"] >= interval - 1e-3
    assert second["t1"] - second["t0"] >= interval - 0.5  # it waited, not refused
    waits = [m for m in breadcrumb_messages(mg_home) if m.startswith("CADENCE_WAIT: ")]
    assert len(waits) == 1 and LLAMA in waits[0]  # the waiter said so, once
    admits = [m for m in breadcrumb_messages(mg_home) if m.startswith("CADENCE_ADMIT: ")]
    assert len(admits) == 2 and sum("after waiting" in m for m in admits) == 1


def test_wait_seconds_then_raises_as_without_waiting(
    mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    admitted = run_python(
        f"import metal_guard as mg; mg.require_cadence_clear({LLAMA!r})", check=True
    )
    assert admitted.returncode == 0
    start = time.monotonic()
    with pytest.raises(CadenceViolation) as info:
        require_cadence_clear(LLAMA, min_interval_sec=2.5, wait=0.5)
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed <= 1.5, elapsed
    assert 0 < info.value.remaining_sec < 2.1
    (warning,) = warnings_from(caplog, "waiting")
    assert LLAMA in warning.getMessage() and "waiting 0.5 s" in warning.getMessage()
    assert any(m.startswith(f"CADENCE_BLOCK: {LLAMA}") for m in breadcrumb_messages(mg_home))


def test_wait_true_waits_the_interval_that_applies(
    guard_path: str, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=0.8, cross_model_interval_sec=0.6)
    guard.mark_load(LLAMA)
    start = time.monotonic()
    assert guard.admit(LLAMA, wait=True) is True
    assert 0.7 <= time.monotonic() - start < 0.8 + 5
    start = time.monotonic()
    with guard.scope(QWEN, wait=True):  # cross-model interval: 0.6 s after the LLAMA load
        assert 0.5 <= time.monotonic() - start < 0.6 + 5
    warned = warnings_from(caplog, "waiting")
    assert len(warned) == 2
    assert LLAMA in warned[0].getMessage() and QWEN in warned[1].getMessage()
    waits = [m for m in breadcrumb_messages(mg_home) if m.startswith("CADENCE_WAIT: ")]
    assert [w.split()[1] for w in waits] == [LLAMA, QWEN]


def test_wait_when_nothing_blocks_neither_waits_nor_warns(
    guard_path: str, mg_home: str, caplog: pytest.LogCaptureFixture
) -> None:
    guard = CadenceGuard(guard_path, min_interval_sec=600)
    start = time.monotonic()
    assert guard.admit(LLAMA, wait=True) is True
    assert guard.admit(QWEN, wait=30) is True
    assert time.monotonic() - start < 5
    assert warnings_from(caplog) == []
    assert not any(m.startswith("CADENCE_WAIT") for m in breadcrumb_messages(mg_home))
    with pytest.raises(CadenceViolation):  # wait=0 and wait=False refuse at once
        guard.admit(LLAMA, wait=0)
    with pytest.raises(CadenceViolation):
        guard.admit(LLAMA, wait=False)


@pytest.mark.parametrize(
    ("wait", "error", "words"),
    [
        (-1, ValueError, "wait must be >= 0"),
        (float("nan"), ValueError, "wait must be a finite number"),
        (float("inf"), ValueError, "wait must be a finite number"),
        (1e9, ValueError, "wait=1e\\+09 s is more than the maximum"),
        ("1", TypeError, "wait must be a number, not str"),
        (None, TypeError, "wait must be a number, not NoneType"),
    ],
)
def test_bad_wait_values_are_caller_bugs(
    guard_path: str, wait: object, error: type[Exception], words: str
) -> None:
    guard = CadenceGuard(guard_path)
    calls = [
        lambda: guard.admit(LLAMA, wait=wait),  # type: ignore[arg-type]
        lambda: guard.scope(LLAMA, wait=wait),  # type: ignore[arg-type]
        lambda: require_cadence_clear(LLAMA, guard=guard, wait=wait),  # type: ignore[arg-type]
        lambda: cadence_scope(LLAMA, guard=guard, wait=wait),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(error, match=words):
            call()
    assert not os.path.exists(guard_path)  # nothing recorded


@pytest.mark.multiprocess
def test_waiting_does_not_hold_the_store_lock(mg_home: str) -> None:
    CadenceGuard().mark_load(LLAMA)
    code = (
        "import logging, metal_guard as mg; logging.basicConfig(); "
        f"mg.require_cadence_clear({LLAMA!r}, min_interval_sec=4, wait=True)"
    )
    child = spawn_python(code, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(m.startswith("CADENCE_WAIT") for m in breadcrumb_messages(mg_home)):
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.02)
        # the store is free while the child sleeps: a strict guard gets it at once
        CadenceGuard(strict=True, lock_timeout=1.0).admit(QWEN)
        assert child.poll() is None  # still waiting for LLAMA
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert err.count("waiting") == 1 and LLAMA in err  # one WARNING


# -- a load that failed before reaching MLX is not counted ---------------------------

FAILED_LOAD_CODE = r"""
import sys
if sys.argv[1] == "no-mlx":
    sys.modules["mlx"] = sys.modules["mlx.core"] = None  # MLX never imported
import metal_guard as mg
try:
    with mg.cadence_scope("org/m", min_interval_sec=600):
        if sys.argv[1] == "no-mlx":
            raise OSError("no network")
        import mlx_lm
        model = mlx_lm.load(sys.argv[2])
        raise RuntimeError("generation failed after the load")
except Exception as exc:
    print(type(exc).__name__)
try:
    mg.require_cadence_clear("org/m", min_interval_sec=600)
    print("admitted")
except mg.CadenceViolation:
    print("refused")
"""


def test_failed_load_without_mlx_leaves_the_next_admission_free(mg_home: str) -> None:
    proc = run_python(FAILED_LOAD_CODE, "no-mlx", "-", check=True)
    assert proc.stdout.split() == ["OSError", "admitted"]
    assert any(m.startswith("CADENCE_UNCOUNTED: org/m") for m in breadcrumb_messages(mg_home))


@requires_mlx_lm
@pytest.mark.mlx_lm
def test_failed_mlx_lm_load_leaves_the_next_admission_free(
    mg_home: str, tmp_path: Path, tiny_llama_path: str
) -> None:
    missing = run_python(FAILED_LOAD_CODE, "mlx", str(tmp_path / "missing-model"), check=True)
    assert missing.stdout.split()[-1] == "admitted", missing.stdout
    assert CadenceGuard().clear() == 1  # the second admission above
    # the same code with a model that did load: the load counts, the next one must wait
    loaded = run_python(FAILED_LOAD_CODE, "mlx", tiny_llama_path, check=True)
    assert loaded.stdout.split() == ["RuntimeError", "refused"], loaded.stdout


@pytest.mark.multiprocess
def test_taking_back_a_failed_load_keeps_another_process_admission(mg_home: str) -> None:
    guard = CadenceGuard(min_interval_sec=600)
    with pytest.raises(OSError), guard.scope(LLAMA):
        run_python(f"import metal_guard as mg; mg.require_cadence_clear({QWEN!r})", check=True)
        raise OSError("weights missing")
    data = _read(_store(mg_home))
    assert LLAMA not in data and LLAMA not in data[RESERVED]["pids"]
    assert QWEN in data and data[RESERVED]["pids"][QWEN] != os.getpid()
    guard.admit(LLAMA)


@pytest.mark.multiprocess
def test_a_later_record_of_the_same_model_is_not_taken_back(mg_home: str) -> None:
    guard = CadenceGuard(min_interval_sec=600)
    with pytest.raises(OSError), guard.scope(LLAMA):
        ours = _read(_store(mg_home))[LLAMA]
        run_python(f"import metal_guard as mg; mg.CadenceGuard().mark_load({LLAMA!r})", check=True)
        raise OSError("weights missing")
    data = _read(_store(mg_home))
    assert data[LLAMA] > ours and data[RESERVED]["pids"][LLAMA] != os.getpid()
    with pytest.raises(CadenceViolation):
        guard.admit(LLAMA)


def test_observer_mode_waits_then_reports_and_records(
    guard_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    guard = CadenceGuard(guard_path, min_interval_sec=60)
    guard.mark_load(LLAMA, ts=time.time() - 1)
    start = time.monotonic()
    assert guard.admit(LLAMA, wait=0.3) is True  # reported, not raised: the load goes ahead
    assert 0.25 <= time.monotonic() - start < 3
    assert len(warnings_from(caplog, "cadence: waiting 0.3 s")) == 1
    assert len(warnings_from(caplog, "OBSERVE: would refuse (CadenceViolation)")) == 1
    assert _read(guard_path)[LLAMA] >= time.time() - 5  # recorded after the wait
