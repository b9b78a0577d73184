"""Bad input across the public surface, with the specific outcome of each.

Caller bugs surface as a clear ``TypeError`` or ``ValueError`` naming the argument;
lookups and forensics never raise and answer "no". Each table row states the outcome.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg

HF = Path("/nonexistent/models--org--name/snapshots/abc")
JUNK: dict[str, Any] = {
    "None": None,
    "zero": 0,
    "minus_one": -1,
    "one_and_a_half": 1.5,
    "nan": math.nan,
    "inf": math.inf,
    "true": True,
    "bytes": b"org/model",
    "empty": "",
    "blank": "   ",
    "huge": "x" * 100_000,
    "newline": "two\nlines",
    "nul": "nul\x00byte",
    "list": [],
    "object": object(),
    "hf_path": HF,
}
T, V = TypeError, ValueError


def _outcome(call: Any) -> Any:
    try:
        return ("ok", call())
    except (TypeError, ValueError) as exc:
        return type(exc)


@pytest.mark.parametrize("name", JUNK)
def test_lookups_answer_no_and_never_raise(name: str) -> None:
    junk = JUNK[name]
    assert mg.is_gemma4_family(junk) is False
    assert mg.check_known_panic_model(junk) is None
    assert mg.warn_if_known_panic_model(junk) is False
    assert mg.detect_panic_signature(junk) == (None, None)


# model id → canonical_model_id outcome (TypeError, ValueError or the id)
CANONICAL = {
    "None": T,
    "zero": T,
    "minus_one": T,
    "one_and_a_half": T,
    "nan": T,
    "inf": T,
    "true": T,
    "bytes": T,
    "empty": V,
    "blank": V,
    "huge": V,
    "newline": ("ok", "two\nlines"),
    "nul": ("ok", "nul\x00byte"),
    "list": T,
    "object": T,
    "hf_path": ("ok", "org/name"),
}


@pytest.mark.parametrize("name", JUNK)
def test_model_ids(name: str, mg_home: str) -> None:
    junk, expected = JUNK[name], CANONICAL[name]
    assert _outcome(lambda: mg.canonical_model_id(junk)) == expected
    guard = mg.CadenceGuard(min_interval_sec=0)
    # every cadence entry point decides the same way (admit says it recorded the load)
    for call, result in (
        (guard.check, None),
        (guard.admit, True),
        (guard.mark_load, None),
        (guard.mark_unload, None),
    ):
        outcome = _outcome(lambda call=call: call(junk))
        assert outcome == (("ok", result) if isinstance(expected, tuple) else expected)
    if not isinstance(expected, tuple):
        with pytest.raises(expected):
            mg.require_cadence_clear(junk, min_interval_sec=0)


# duration arguments (min_interval_sec...): negative means 0 for cadence intervals
INTERVAL = {
    "None": T,
    "zero": ("ok", 0.0),
    "minus_one": ("ok", 0.0),
    "one_and_a_half": ("ok", 1.5),
    "nan": V,
    "inf": V,
    "true": T,
    "bytes": T,
    "empty": T,
    "list": T,
    "object": T,
}
# breaker window: must be > 0
WINDOW = {**INTERVAL, "zero": V, "minus_one": V}


@pytest.mark.parametrize("name", INTERVAL)
def test_number_arguments(name: str, mg_home: str) -> None:
    junk = JUNK[name]
    assert (
        _outcome(lambda: mg.CadenceGuard(min_interval_sec=junk).min_interval_sec)
        == (INTERVAL[name])
    )
    assert (
        _outcome(lambda: mg.CadenceGuard(cross_model_interval_sec=junk).cross_model_interval_sec)
        == (INTERVAL[name])
    )
    assert _outcome(lambda: mg.CircuitBreaker(window_sec=junk).window_sec) == WINDOW[name]


def test_number_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match="min_interval_sec must be a number, not NoneType"):
        mg.CadenceGuard(min_interval_sec=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window_sec must be a finite number, got nan"):
        mg.CircuitBreaker(window_sec=math.nan)
    with pytest.raises(ValueError, match=r"window_sec must be > 0, got -1"):
        mg.CircuitBreaker(window_sec=-1)
    with pytest.raises(TypeError, match="panic_threshold must be an int, not float"):
        mg.CircuitBreaker(panic_threshold=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="panic_threshold must be between 1 and 1000, got 0"):
        mg.CircuitBreaker(panic_threshold=0)
    with pytest.raises(ValueError, match="ts must be a finite number, got inf"):
        mg.CadenceGuard().mark_load("org/m", ts=math.inf)


# path arguments: None/"" turn breadcrumbs off; anything but str/PathLike is a TypeError
BREADCRUMB_PATH = {
    "None": ("ok", None),
    "empty": ("ok", None),
    "zero": T,
    "bytes": T,
    "blank": V,
    "nul": V,
    "list": T,
    "object": T,
    "hf_path": ("ok", str(HF)),
}


@pytest.mark.parametrize("name", BREADCRUMB_PATH)
def test_path_arguments(name: str, tmp_path: Path) -> None:
    junk = JUNK[name]
    outcome = _outcome(lambda: mg.MetalGuard(breadcrumb_path=junk).breadcrumb_path)
    assert outcome == BREADCRUMB_PATH[name]
    expected = BREADCRUMB_PATH[name]
    if name in ("None", "hf_path"):
        expected = ("ok", [])  # None: the default archive; a missing archive is empty
    elif name == "empty":
        expected = V  # an empty path is not "the default" for a path argument
    assert _outcome(lambda: mg.read_panic_archive(junk)) == expected


def test_read_breadcrumbs_count_and_path(mg_home: str) -> None:
    assert mg.read_breadcrumbs(0) == []
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        mg.read_breadcrumbs(-1)
    with pytest.raises(TypeError, match="n must be an int, not float"):
        mg.read_breadcrumbs(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        mg.read_breadcrumbs(5, path=b"/tmp/x")  # type: ignore[arg-type]


def test_guard_argument_must_be_a_cadence_guard(mg_home: str) -> None:
    with pytest.raises(TypeError, match="guard must be a CadenceGuard, not str"):
        mg.require_cadence_clear("org/c", guard="guard")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["None", "nan", "true", "bytes", "object", "newline"])
def test_forensics_take_anything_and_write_one_line_each(
    name: str, mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    junk = JUNK[name]
    monkeypatch.setitem(__import__("sys").modules, "mlx.core", None)  # MLX-free and fast
    mg.metal_guard.breadcrumb(junk)
    with mg.subprocess_inference_guard(junk):
        pass
    assert mg.gemma4_generation_flush(junk, 0).flushed is False  # not a gemma-4 id
    # a count that is not a finite number: no flush, never an error
    assert mg.gemma4_generation_flush("google/gemma-4-31b-it", junk).flushed is False
    lines = Path(mg_home, "breadcrumbs.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3  # one line per event (breadcrumb, PRE, POST)
    assert all("\n" not in line for line in lines)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["check", ""], 64),  # an empty model id is a usage error
        (["breadcrumbs", "-n", "-3"], 64),
        (["breadcrumbs", "-n", "1e3"], 64),
        (["panics", "--since", "nan"], 64),
        (["panics", "--since", "-1"], 64),
        (["cadence", "--min-interval", "inf"], 64),
        (["no-such-command"], 64),
    ],
)
def test_cli_junk_is_a_usage_error(
    argv: list[str], expected: int, mg_home: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mg.main(argv) == expected
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_cli_argv_must_be_a_list_of_str() -> None:
    with pytest.raises(TypeError, match="not one str"):
        mg.main("check m")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argv must be a list of str"):
        mg.main(["check", b"m"])  # type: ignore[list-item]


def test_numpy_numbers_are_numbers(mg_home: str, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy", reason="NumPy comes with the MLX environment")
    guard = mg.CadenceGuard(min_interval_sec=np.int64(60), cross_model_interval_sec=np.float32(1.5))
    assert guard.min_interval_sec == 60.0 and guard.cross_model_interval_sec == 1.5
    guard.mark_load("org/m", ts=np.float64(1_700_000_000.0))
    assert guard.last_ts("org/m") == 1_700_000_000.0
    breaker = mg.CircuitBreaker(panic_threshold=np.int64(3), window_sec=np.float64(60))
    assert breaker.panic_threshold == 3 and type(breaker.panic_threshold) is int
    assert mg.read_breadcrumbs(np.int64(5)) == mg.read_breadcrumbs(5)


def test_huge_ids_are_not_kept_in_the_memo() -> None:
    before = len(mg._canonical_memo)
    for i in range(50):
        assert mg.is_gemma4_family(f"{i}" + "x" * 200_000) is False
    assert len(mg._canonical_memo) <= before


def test_exceptions_with_infinite_values_still_build_and_pickle() -> None:
    for exc in (
        mg.CadenceViolation("org/m", 0.0, math.inf),
        mg.CrossModelCadenceViolation("org/m", "org/o", 0.0, math.inf),
        mg.MLXCooldownActive(2, 3600, math.inf),
        mg.MLXCooldownActive(2, math.inf, 0.0),
    ):
        again = pickle.loads(pickle.dumps(exc))
        assert str(again) == str(exc) != ""
