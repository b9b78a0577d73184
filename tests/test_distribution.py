"""The distribution's own name, and what ``metal-guard status`` says about which
``metal_guard`` runs.

Another project publishes ``metal-guard`` (1.x) on the package index with a
``metal_guard`` package of its own; this library is distributed as
``mlx-metal-guard`` so that pip never swaps one for the other. These tests use a
real ``.dist-info`` folder and a real package on ``sys.path`` for that other
project (its ``__init__`` exits if imported: status must only look at it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import metal_guard as mg
from helpers import REPO, child_env

DIST_NAME = "mlx-metal-guard"


def test_the_distribution_is_not_named_metal_guard() -> None:
    text = Path(REPO, "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]\n", 1)[1].split("\n[", 1)[0]
    assert f'\nname = "{DIST_NAME}"\n' in "\n" + project
    assert '\n[project.scripts]\nmetal-guard = "metal_guard:main"\n' in text


def _other_project(site: Path) -> None:
    """The other project, installed as pip would: its package and its metadata."""
    package = site / "metal_guard"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise SystemExit('the other metal_guard was imported')\n")
    info = site / "metal_guard-1.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: metal-guard\nVersion: 1.1.0\n")
    (info / "RECORD").write_text("metal_guard/__init__.py,,\n")


STATUS = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("metal_guard", sys.argv[1])
mg = importlib.util.module_from_spec(spec)
sys.modules["metal_guard"] = mg
spec.loader.exec_module(mg)
sys.exit(mg.main(sys.argv[2:]))
"""


def _status(pythonpath: str, home: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``status`` of this working copy, loaded from its file, with ``pythonpath`` as given."""
    env = child_env(METALGUARD_HOME=home, PYTHONPATH=pythonpath)
    return subprocess.run(
        [sys.executable, "-c", STATUS, os.path.join(REPO, "metal_guard.py"), "status", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=home,
        timeout=60,
    )


def test_status_names_the_imported_file_and_warns_of_nothing_here(mg_home: str) -> None:
    assert mg._other_metal_guard() == []
    proc = _status(REPO, mg_home, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["module_file"] == os.path.join(REPO, "metal_guard.py")
    assert doc["shadowed_by"] == []
    text = _status(REPO, mg_home).stdout
    assert f"imported from  {os.path.join(REPO, 'metal_guard.py')}" in text
    assert "!" not in text.split("Locks")[0]


def test_status_warns_when_the_other_project_is_installed(mg_home: str, tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    _other_project(site)
    # behind this library on sys.path: installed, not (yet) shadowing
    proc = _status(REPO + os.pathsep + str(site), mg_home, "--json")
    assert proc.returncode == 0, proc.stderr
    (warning,) = json.loads(proc.stdout)["shadowed_by"]
    assert "metal-guard 1.1.0 (another project) is installed" in warning
    # in front of it: a fresh `import metal_guard` would get the other project
    proc = _status(str(site) + os.pathsep + REPO, mg_home)
    assert proc.returncode == 0, proc.stderr
    assert "was imported" not in proc.stderr
    shadow = f"! `import metal_guard` finds {site / 'metal_guard' / '__init__.py'} first"
    assert shadow in proc.stdout
    assert "! the distribution metal-guard 1.1.0 (another project) is installed" in proc.stdout
