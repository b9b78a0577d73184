"""Section 1 — configuration: the env helper family and the state folder."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import metal_guard as mg
from helpers import REPO, warnings_from

GARBAGE = ["banana", "nan", "NaN", "inf", "-inf", "-5", "1e999", "9" * 400, "☃", "1,5"]
EMPTY = ["", "   ", "\t\n"]


@pytest.mark.parametrize("raw", GARBAGE)
def test_env_float_garbage_gives_default_and_one_warning(
    raw: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("METALGUARD_TEST_FLOAT", raw)
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        values = [mg._env_float("METALGUARD_TEST_FLOAT", 3.0, maximum=60.0) for _ in range(3)]
    assert values == [3.0, 3.0, 3.0]
    assert len(warnings_from(caplog, "METALGUARD_TEST_FLOAT")) == 1


@pytest.mark.parametrize("raw", EMPTY)
def test_empty_counts_as_unset_for_every_helper(
    raw: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("METALGUARD_TEST_VAR", raw)
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        assert mg._env_float("METALGUARD_TEST_VAR", 3.0) == 3.0
        assert mg._env_int("METALGUARD_TEST_VAR", 42) == 42
        assert mg._env_bool("METALGUARD_TEST_VAR", True) is True
        assert mg._env_path("METALGUARD_TEST_VAR", "/default") == "/default"
        assert mg._env_path("METALGUARD_TEST_VAR", "/default", empty_disables=True) is None
    assert warnings_from(caplog, "METALGUARD_TEST_VAR") == []


def test_env_float_valid_values_and_whitespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_TEST_FLOAT", "  2.5\n")
    assert mg._env_float("METALGUARD_TEST_FLOAT", 3.0) == 2.5
    monkeypatch.setenv("METALGUARD_TEST_FLOAT", "0")
    assert mg._env_float("METALGUARD_TEST_FLOAT", 3.0) == 0.0
    monkeypatch.delenv("METALGUARD_TEST_FLOAT")
    assert mg._env_float("METALGUARD_TEST_FLOAT", 3.0) == 3.0


def test_env_float_clamps_when_asked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("METALGUARD_TEST_FLOAT", "1000")
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        assert mg._env_float("METALGUARD_TEST_FLOAT", 3.0, maximum=60.0, clamp=True) == 60.0
    assert len(warnings_from(caplog, "METALGUARD_TEST_FLOAT")) == 1
    monkeypatch.setenv("METALGUARD_TEST_FLOAT", "nan")  # NaN is never clamped into range
    assert mg._env_float("METALGUARD_TEST_FLOAT", 3.0, maximum=60.0, clamp=True) == 3.0


def test_env_reads_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_TEST_INT", "5")
    assert mg._env_int("METALGUARD_TEST_INT", 1) == 5
    monkeypatch.setenv("METALGUARD_TEST_INT", "7")
    assert mg._env_int("METALGUARD_TEST_INT", 1) == 7


@pytest.mark.parametrize("raw", ["x", "1.5", "-3", "1e6", "9" * 100, "0x10"])
def test_env_int_garbage(
    raw: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("METALGUARD_TEST_INT", raw)
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        assert mg._env_int("METALGUARD_TEST_INT", 42, maximum=10**9) == 42
        assert mg._env_int("METALGUARD_TEST_INT", 42, maximum=10**9) == 42
    assert len(warnings_from(caplog, "METALGUARD_TEST_INT")) == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("TRUE", True),
        (" yes ", True),
        ("On", True),
        ("0", False),
        ("off", False),
        ("No", False),
        ("false", False),
    ],
)
def test_env_bool_words(raw: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_TEST_BOOL", raw)
    assert mg._env_bool("METALGUARD_TEST_BOOL") is expected


@pytest.mark.parametrize("raw", ["2", "maybe", "y e s", "nan"])
def test_env_bool_garbage(
    raw: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("METALGUARD_TEST_BOOL", raw)
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        assert mg._env_bool("METALGUARD_TEST_BOOL", False) is False
        assert mg._env_bool("METALGUARD_TEST_BOOL", True) is True
    assert len(warnings_from(caplog, "METALGUARD_TEST_BOOL")) == 1


def test_state_home_default_and_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("METALGUARD_HOME")
    assert mg._state_home() == str(tmp_path / ".cache" / "metal-guard")
    monkeypatch.setenv("METALGUARD_HOME", "~/mg")
    assert mg._state_home() == str(tmp_path / "mg")
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        for empty in EMPTY:  # empty counts as unset: the default, silently
            monkeypatch.setenv("METALGUARD_HOME", empty)
            assert mg._state_home() == str(tmp_path / ".cache" / "metal-guard")
    assert warnings_from(caplog, "METALGUARD_HOME") == []
    assert not (tmp_path / ".cache").exists()  # resolving never creates the folder


def test_breadcrumb_path_empty_disables(monkeypatch: pytest.MonkeyPatch, mg_home: str) -> None:
    assert mg._default_breadcrumb_path() == os.path.join(mg_home, "breadcrumbs.log")
    monkeypatch.setenv("METALGUARD_BREADCRUMB_PATH", "")
    assert mg._default_breadcrumb_path() is None


ALL_VARIABLES = [
    "METALGUARD_HOME",
    "METALGUARD_BREADCRUMB_PATH",
    "METALGUARD_BREADCRUMB_MAX_BYTES",
    "METALGUARD_CROSS_MODEL_INTERVAL",
    "METALGUARD_GEMMA4_FIRSTGEN_DISABLED",
    "METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC",
]

USE_EVERYTHING = """
import logging, sys, metal_guard as mg
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="W %(message)s")
mg.metal_guard.breadcrumb("hello")
with mg.subprocess_inference_guard("m"):
    pass
f = mg.gemma4_generation_flush("mlx-community/gemma-4-31b-it-8bit", 0)
mg.require_cadence_clear("some/model", min_interval_sec=0)
print("ok", f.slept_sec <= 60)
"""


@pytest.mark.parametrize("raw", ["garbage", "nan", "inf", "-1", "", "1" * 500, "\u2028\n"])
def test_garbage_in_every_variable_never_breaks_import_or_calls(raw: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env.update({name: raw for name in ALL_VARIABLES})
    env["HOME"] = str(tmp_path)
    env["PYTHONPATH"] = REPO
    env["MLX_DISABLE_COMPILE"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", USE_EVERYTHING],
        env=env,
        cwd=tmp_path,  # a relative METALGUARD_HOME lands here, not in the repository
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("ok True")
    assert "Traceback" not in out.stderr
    warned = out.stdout
    # One WARNING per variable that had to fall back (never one per call); an empty
    # value counts as unset and says nothing.
    for name in ["METALGUARD_CROSS_MODEL_INTERVAL", "METALGUARD_GEMMA4_FIRSTGEN_DISABLED"]:
        assert warned.count(name) == (0 if raw.strip() == "" else 1), (name, warned)


def test_no_home_at_all_never_means_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A daemon with no HOME and a uid without a passwd entry: expanduser("~") stays "~".
    import pwd

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    monkeypatch.delenv("METALGUARD_HOME")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert os.path.expanduser("~") == "~"
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        home = mg._state_home()
        assert mg._state_home() == home
    assert os.path.isabs(home) and home.startswith(str(tmp_path))
    assert len(warnings_from(caplog, "no home folder")) == 1
    monkeypatch.setenv("METALGUARD_HOME", str(tmp_path / "explicit"))
    assert mg._state_home() == str(tmp_path / "explicit")


LAZY_DATACLASS = """
import dataclasses, inspect, pickle, sys, metal_guard as mg
fields = [f.name for f in dataclasses.fields(mg.MemoryStats)]  # before any instance
assert fields == ["active_bytes", "peak_bytes", "limit_bytes", "cache_bytes", "footprint_bytes"]
assert list(inspect.signature(mg.ModelDims).parameters)[:4] == [
    "n_layers", "n_heads", "n_kv_heads", "head_dim"]
stats = mg.MemoryStats(1, 2, 3)
assert dataclasses.asdict(stats)["limit_bytes"] == 3
assert dataclasses.replace(stats, active_bytes=9).active_bytes == 9
assert pickle.loads(pickle.dumps(stats)) == stats and hash(stats) == hash(mg.MemoryStats(1, 2, 3))
try:
    stats.active_bytes = 5
except dataclasses.FrozenInstanceError:
    print("ok")
"""


def test_lazily_applied_dataclasses_are_real_dataclasses() -> None:
    """``import dataclasses`` is deferred to first use; after that nothing differs."""
    out = subprocess.run(
        [sys.executable, "-c", LAZY_DATACLASS],
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (out.returncode, out.stdout.strip()) == (0, "ok"), out.stderr
