"""The wheel installs a typed package and nothing else.

``metal_guard.py`` is a single module, but PEP 561 can only mark packages as typed, so
the wheel lays the same source out as ``metal_guard/__init__.py`` + ``py.typed`` +
``__main__.py``. These tests build the wheel from the working tree, install it into a
throwaway environment and prove that ``mypy --strict`` uses its annotations.

They need ``build``, ``hatchling`` and ``mypy`` (the ``dev`` extra), so they run in the
full environment and skip in the no-MLX one, which only has the ``test`` extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import REPO, has_module

_MISSING = [m for m in ("build", "hatchling", "mypy") if not has_module(m)]

pytestmark = [
    pytest.mark.packaging,
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(_MISSING),
        reason=f"packaging tools not installed here ({', '.join(_MISSING)}); "
        'they come with the "dev" extra',
    ),
]

PACKAGE_FILES = {"metal_guard/__init__.py", "metal_guard/__main__.py", "metal_guard/py.typed"}


def _clean_env() -> dict[str, str]:
    """The environment for child processes, without anything that points at the repo."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    proc = _run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(out),
            REPO,
        ],
        cwd=out,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = sorted(out.glob("mlx_metal_guard-*.whl"))  # not the other project's metal-guard
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare virtual environment with only the wheel installed into its site-packages."""
    env_dir = tmp_path_factory.mktemp("wheel-env")
    proc = _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=env_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    proc = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=env_dir,
    )
    assert proc.returncode == 0, proc.stderr
    site = proc.stdout.strip()
    proc = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-compile",
            "--disable-pip-version-check",
            "--no-index",
            "--target",
            site,
            str(wheel),
        ],
        cwd=env_dir,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return python


def test_wheel_holds_exactly_the_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        init = zf.read("metal_guard/__init__.py")
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    dist_info = {n for n in names if n.split("/", 1)[0].endswith(".dist-info")}
    assert names - dist_info == PACKAGE_FILES
    assert {n.split("/", 1)[1] for n in dist_info} >= {"METADATA", "WHEEL", "RECORD"}
    # The package's __init__ is the single-file module, byte for byte.
    assert init == (Path(REPO) / "metal_guard.py").read_bytes()
    assert b"metal-guard = metal_guard:main" in entry_points
    assert "Requires-Python: >=3.10" in metadata
    assert "\nName: mlx-metal-guard\n" in metadata
    # No runtime dependencies: every Requires-Dist line belongs to an extra.
    requires = [ln for ln in metadata.splitlines() if ln.startswith("Requires-Dist:")]
    assert requires and all("extra ==" in ln for ln in requires), requires


def test_installed_package_runs(venv_python: Path, tmp_path: Path) -> None:
    proc = _run(
        [
            str(venv_python),
            "-c",
            "import metal_guard, os; print(os.path.relpath(metal_guard.__file__, "
            "os.path.dirname(os.path.dirname(metal_guard.__file__)))); print(metal_guard.__version__)",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    where, version = proc.stdout.split()
    assert where == os.path.join("metal_guard", "__init__.py")

    proc = _run([str(venv_python), "-m", "metal_guard", "--version"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert version in proc.stdout + proc.stderr


def _mypy(venv_python: Path, workdir: Path, source: str) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on one client file, resolving imports like a user's project does.

    No MYPYPATH, no search-path options: mypy finds ``metal_guard`` in the environment's
    site-packages, which it only analyses when the package carries ``py.typed``.
    """
    workdir.mkdir()
    (workdir / "mypy.ini").write_text("[mypy]\n", encoding="utf-8")  # not the repo's config
    (workdir / "client.py").write_text(source, encoding="utf-8")
    return _run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            "mypy.ini",
            "--cache-dir",
            str(workdir / ".mypy_cache"),
            "--python-executable",
            str(venv_python),
            "--show-error-codes",
            "--no-pretty",
            "client.py",
        ],
        cwd=workdir,
    )


GOOD_CLIENT = """\
from __future__ import annotations

import metal_guard
from metal_guard import metal_guard as guard


def version() -> str:
    return metal_guard.__version__


def note() -> None:
    guard.breadcrumb("x")
    metal_guard.metal_guard.breadcrumb("y")


def run_cli() -> int:
    return metal_guard.main(["--version"])
"""

BAD_CLIENT = """\
from __future__ import annotations

import metal_guard


def note() -> None:
    metal_guard.metal_guard.breadcrumb(1)
"""


def test_mypy_strict_uses_the_installed_types(venv_python: Path, tmp_path: Path) -> None:
    good = _mypy(venv_python, tmp_path / "good", GOOD_CLIENT)
    assert good.returncode == 0, good.stdout + good.stderr

    bad = _mypy(venv_python, tmp_path / "bad", BAD_CLIENT)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    # It failed on the call, not on a missing py.typed or an unresolved import.
    assert "[arg-type]" in bad.stdout, bad.stdout
    assert "import-untyped" not in bad.stdout and "import-not-found" not in bad.stdout
