"""Shared test helpers: what this environment has, and skip decorators.

The suite runs twice: with real MLX + mlx-lm and without MLX. Tests that need MLX use
these decorators and skip cleanly (with a reason) in the no-MLX run::

    from helpers import HAS_MLX, requires_mlx, requires_mlx_lm

``tests/`` is on ``sys.path`` through the pytest configuration in ``pyproject.toml``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import pytest

__all__ = [
    "HAS_MLX",
    "HAS_MLX_LM",
    "REPO",
    "child_env",
    "has_module",
    "requires_mlx",
    "requires_mlx_lm",
]

REPO = str(Path(__file__).resolve().parents[1])


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

requires_mlx = pytest.mark.skipif(
    not HAS_MLX, reason="MLX is not installed in this environment (no-MLX suite)"
)
requires_mlx_lm = pytest.mark.skipif(
    not HAS_MLX_LM,
    reason="MLX and mlx-lm are not installed in this environment (no-MLX suite)",
)
