"""Principle 4 — importing metal_guard has no side effects and pulls in nothing heavy."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import metal_guard as mg
from helpers import REPO

PROBE = """
import json, os, sys, _thread
before_env = dict(os.environ)
before_modules = set(sys.modules)
import metal_guard
print(json.dumps({
    "env_changed": dict(os.environ) != before_env,
    "threads": _thread._count(),
    "new_modules": sorted(set(sys.modules) - before_modules),
    "version": metal_guard.__version__,
}))
"""


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_import_in_a_fresh_interpreter_has_no_side_effects(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "PYTHONPATH": REPO}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["version"] == mg.__version__
    assert report["env_changed"] is False
    assert report["threads"] == 0
    # Imported on first use, never at import: together they would add ~21 ms to a ~3 ms
    # import (bench/bench_import.py), above the 10 ms budget.
    heavy = {
        "json",
        "re",
        "logging",
        "mlx",
        "mlx.core",
        "mlx_lm",
        "multiprocessing",
        "subprocess",
        "ctypes",
        "signal",
        "threading",
        "inspect",
        "dataclasses",
        "pathlib",
        "typing",
        "argparse",
    }
    assert heavy.isdisjoint(report["new_modules"]), report["new_modules"]
    assert _files_under(home) == [] and _files_under(work) == []
    assert out.stderr == ""


def test_import_with_garbage_environment_never_fails(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "PYTHONPATH": REPO,
        "METALGUARD_HOME": "\t",
        "METALGUARD_BREADCRUMB_PATH": "/dev/null/nope",
        "METALGUARD_BREADCRUMB_MAX_BYTES": "lots",
        "METALGUARD_CROSS_MODEL_INTERVAL": "nan",
        "METALGUARD_GEMMA4_FIRSTGEN_DISABLED": "perhaps",
        "METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC": "-inf",
    }
    out = subprocess.run(
        [sys.executable, "-c", "import metal_guard; print(metal_guard.__version__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == mg.__version__
    assert _files_under(tmp_path) == []


def test_public_names_exist_and_are_listed() -> None:
    for name in mg.__all__:
        assert hasattr(mg, name), name
    for name in [
        "_is_gemma4_family",
        "_resolve_cross_model_interval",
        "_CROSS_MODEL_ENV_VAR",
        "_CADENCE_PATH_DEFAULT",
        "_WARNED_PANIC_MODELS",
    ]:
        assert hasattr(mg, name), name
    assert mg._CROSS_MODEL_ENV_VAR == "METALGUARD_CROSS_MODEL_INTERVAL"
    assert mg._CADENCE_PATH_DEFAULT is None
    assert mg.__version__ == "0.9.0"


def test_logger_is_quiet_by_default() -> None:
    mg._log()
    logger = logging.getLogger("metal_guard")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)


def test_the_original_incidental_names_are_reachable_lazily() -> None:
    """The original metal-guard exposed ``log`` (its logger) and ``T`` (a TypeVar)."""
    from metal_guard import T, log

    assert log is logging.getLogger("metal_guard")
    assert T is mg.T and type(T).__name__ == "TypeVar"
    assert mg.KNOWN_MODELS is mg.KNOWN_MODELS  # built once, then an ordinary dict
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        mg.no_such_name  # noqa: B018
