"""Bad input across the whole public surface: every public function gets wrong types,
empty strings, huge strings, newlines, ``None`` and hostile objects.

Caller bugs must surface as a clear ``TypeError``/``ValueError``; lookups and forensics
must never raise at all. No other exception type may escape.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg


class BrokenPath(os.PathLike[str]):
    def __fspath__(self) -> str:
        raise RuntimeError("__fspath__ exploded")


class BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("__repr__ exploded")

    __str__ = __repr__


class Shouty(str):
    """A str subclass, as some frameworks pass around."""


class EvilStr(str):
    """A str subclass whose own conversions explode."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ exploded")

    def __format__(self, spec: str) -> str:
        raise RuntimeError("__format__ exploded")

    def strip(self, chars: str | None = None) -> str:
        raise RuntimeError("strip exploded")


class BadIndex:
    def __index__(self) -> int:
        raise ValueError("__index__ exploded")


JUNK: list[Any] = [
    None,
    0,
    -1,
    1.5,
    math.nan,
    math.inf,
    True,
    b"org/model",
    "",
    "   ",
    "x" * 100_000,
    "two\nlines",
    "nul\x00byte",
    [],
    {},
    object(),
    BrokenPath(),
    BrokenRepr(),
    Shouty("org/model"),
    EvilStr("google/gemma-4-31b-it"),
    BadIndex(),
    Path("/nonexistent/models--org--name/snapshots/abc"),
]
IDS = [
    type(j).__name__ + ":" + (repr(j)[:12] if not isinstance(j, BrokenRepr) else "?") for j in JUNK
]


def _clean_errors_only(call: Callable[[], object]) -> None:
    try:
        call()
    except (TypeError, ValueError):
        pass  # a clear caller-bug error is the point


@pytest.fixture
def no_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "reports"
    folder.mkdir()
    monkeypatch.setenv("METALGUARD_PANIC_REPORT_DIR", str(folder))
    return folder


# -- lookups and forensics: never raise ------------------------------------------------


@pytest.mark.parametrize("junk", JUNK, ids=IDS)
def test_lookups_never_raise(junk: Any) -> None:
    assert mg.is_gemma4_family(junk) in (True, False)
    entry = mg.check_known_panic_model(junk)
    assert entry is None or isinstance(entry, dict)
    assert mg.warn_if_known_panic_model(junk) in (True, False)
    name, _explanation = mg.detect_panic_signature(junk)
    assert name is None or isinstance(name, str)


@pytest.mark.parametrize("junk", JUNK, ids=IDS)
def test_forensics_never_raise(junk: Any, mg_home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "mlx.core", None)  # keep it fast and MLX-free
    mg.metal_guard.breadcrumb(junk)
    with mg.subprocess_inference_guard(junk):
        pass
    flush = mg.gemma4_generation_flush(junk, 0)
    assert flush.flushed is False
    flush = mg.gemma4_generation_flush("google/gemma-4-31b-it", junk)
    assert flush.flushed is False or junk == 0
    lines = Path(mg_home, "breadcrumbs.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3  # one line per event, whatever the input


# -- caller bugs: TypeError / ValueError only -------------------------------------------


@pytest.mark.parametrize("junk", JUNK, ids=IDS)
def test_model_id_entry_points(junk: Any, mg_home: str) -> None:
    guard = mg.CadenceGuard(min_interval_sec=0)
    for call in (
        lambda: mg.canonical_model_id(junk),
        lambda: guard.check(junk),
        lambda: guard.admit(junk),
        lambda: guard.mark_load(junk),
        lambda: guard.mark_unload(junk),
        lambda: guard.last_ts(junk),
        lambda: guard.scope(junk),
        lambda: guard.clear(junk),
        lambda: mg.require_cadence_clear(junk, min_interval_sec=0),
        lambda: mg.cadence_scope(junk, min_interval_sec=0),
    ):
        _clean_errors_only(call)


@pytest.mark.parametrize("junk", JUNK, ids=IDS)
def test_numeric_and_path_arguments(junk: Any, mg_home: str, no_reports: Path) -> None:
    for call in (
        lambda: mg.CadenceGuard(junk),
        lambda: mg.CadenceGuard(min_interval_sec=junk),
        lambda: mg.CadenceGuard(cross_model_interval_sec=junk),
        lambda: mg.CadenceGuard(lock_timeout=junk),
        lambda: mg.CadenceGuard().mark_load("org/m", ts=junk),
        lambda: mg.require_cadence_clear("org/a", min_interval_sec=junk),
        lambda: mg.require_cadence_clear(
            "org/a", min_interval_sec=0, cross_model_interval_sec=junk
        ),
        lambda: mg.require_cadence_clear("org/c", guard=junk),
        lambda: mg.MetalGuard(breadcrumb_path=junk),
        lambda: mg.read_breadcrumbs(junk),
        lambda: mg.read_breadcrumbs(5, path=junk),
        lambda: mg.parse_panic_reports(junk),
        lambda: mg.parse_panic_reports(no_reports, since_ts=junk),
        lambda: mg.ingest_panics_jsonl(report_dir=junk),
        lambda: mg.ingest_panics_jsonl(report_dir=no_reports, jsonl_path=junk),
        lambda: mg.read_panic_archive(junk),
        lambda: mg.CircuitBreaker(jsonl_path=junk),
        lambda: mg.CircuitBreaker(state_path=junk),
        lambda: mg.CircuitBreaker(window_sec=junk),
        lambda: mg.CircuitBreaker(panic_threshold=junk),
        lambda: mg.CircuitBreaker(cooldown_sec=junk),
        lambda: mg.CircuitBreaker(report_dir=no_reports).check(now=junk),
        lambda: mg.CircuitBreaker(report_dir=no_reports).status(now=junk),
    ):
        _clean_errors_only(call)


@pytest.mark.parametrize("junk", JUNK, ids=IDS)
def test_cli_argv_junk_is_a_usage_error_or_a_clear_type_error(
    junk: Any, mg_home: str, no_reports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in ([junk], ["check", junk], ["breadcrumbs", "-n", junk], ["panics", "--since", junk]):
        try:
            code = mg.main(argv)
        except TypeError:
            continue  # a non-str argv element is a caller bug
        assert code in (0, 1, 2, 64)
    assert "Traceback" not in capsys.readouterr().err


def test_evil_str_subclass_is_handled_as_its_plain_text(mg_home: str) -> None:
    evil = EvilStr("mlx-community/gemma-4-31b-it-8bit")
    assert mg.canonical_model_id(evil) == "mlx-community/gemma-4-31b-it-8bit"
    assert type(mg.canonical_model_id(evil)) is str
    assert mg.is_gemma4_family(evil) is True
    assert mg.check_known_panic_model(evil) is not None
    error = KeyError("body")
    with pytest.raises(KeyError) as info, mg.subprocess_inference_guard(evil):
        raise error
    assert info.value is error and error.__context__ is None


def test_numpy_numbers_are_numbers(mg_home: str, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy", reason="NumPy comes with the MLX environment")
    guard = mg.CadenceGuard(min_interval_sec=np.int64(60), cross_model_interval_sec=np.float32(1.5))
    assert guard.min_interval_sec == 60.0 and guard.cross_model_interval_sec == 1.5
    guard.mark_load("org/m", ts=np.float64(1_700_000_000.0))
    mg.require_cadence_clear("org/n", min_interval_sec=np.int32(5))
    breaker = mg.CircuitBreaker(panic_threshold=np.int64(3), window_sec=np.float64(60))
    assert breaker.panic_threshold == 3 and type(breaker.panic_threshold) is int
    assert mg.read_breadcrumbs(np.int64(5)) == mg.read_breadcrumbs(5)


def test_huge_ids_are_not_kept_in_the_memo() -> None:
    before = len(mg._canonical_memo)
    for i in range(50):
        assert mg.is_gemma4_family(f"{i}" + "x" * 200_000) is False
    assert len(mg._canonical_memo) <= before


def test_exceptions_with_infinite_values_still_build_and_pickle() -> None:
    import pickle

    for exc in (
        mg.CadenceViolation("org/m", 0.0, math.inf),
        mg.CrossModelCadenceViolation("org/m", "org/o", 0.0, math.inf),
        mg.MLXCooldownActive(2, 3600, math.inf),
        mg.MLXCooldownActive(2, math.inf, 0.0),
    ):
        again = pickle.loads(pickle.dumps(exc))
        assert str(again) == str(exc) and str(exc)
