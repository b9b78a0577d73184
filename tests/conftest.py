"""Shared fixtures for the metal-guard test suite.

Fixtures (keep these names; tests across the suite rely on them):

- ``mg_home`` (autouse): a fresh ``METALGUARD_HOME`` for every test, every other
  ``METALGUARD_*`` variable removed, the library's per-process caches reset.
- ``tiny_llama_path`` / ``tiny_gemma4_path`` (session): folders holding tiny
  random-weight models that ``mlx_lm.load`` reads offline (see ``tiny_models.py``).
- ``tiny_llama`` / ``tiny_gemma4`` (session): ``(model, tokenizer)`` loaded from them.
- ``real_mx``: the real ``mlx.core`` (the test skips without MLX).
- ``mx_calls``: an ``MlxCalls`` log of every ``synchronize`` / ``clear_cache`` call made on
  the real ``mlx.core`` during the test (the real functions still run).

Markers (registered in ``pyproject.toml``): ``mlx`` and ``mlx_lm`` skip the test where
MLX / mlx-lm are absent, like the ``requires_mlx`` / ``requires_mlx_lm`` decorators in
``helpers.py``.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

# No test may reach a model hub: mlx-lm treats a missing folder as a hub id.
# huggingface_hub reads this when it is first imported, so set it before any test runs.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import HAS_MLX, HAS_MLX_LM, NO_MLX_LM_REASON, NO_MLX_REASON, MlxCalls


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not HAS_MLX:
        return ["metal-guard suite: without MLX (MLX tests skip)"]
    mlx = _dist_version("mlx") or "?"
    lm = _dist_version("mlx-lm") if HAS_MLX_LM else None
    return [f"metal-guard suite: with MLX {mlx}" + (f", mlx-lm {lm}" if lm else ", no mlx-lm")]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_mlx = pytest.mark.skip(reason=NO_MLX_REASON)
    skip_lm = pytest.mark.skip(reason=NO_MLX_LM_REASON)
    for item in items:
        if not HAS_MLX and item.get_closest_marker("mlx") is not None:
            item.add_marker(skip_mlx)
        if not HAS_MLX_LM and item.get_closest_marker("mlx_lm") is not None:
            item.add_marker(skip_lm)


def _reset_library_state() -> None:
    # Only a module that is already imported can hold state; importing it here would
    # turn a broken metal_guard.py into an error in every test, including those that
    # do not use it.
    module = sys.modules.get("metal_guard")
    reset = getattr(module, "_reset_process_state", None)
    if callable(reset):
        reset()


@pytest.fixture(autouse=True)
def mg_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A fresh, empty ``METALGUARD_HOME`` (mode 0700) for this test; yields its path."""
    home = tmp_path_factory.mktemp("mg_home")
    home.chmod(0o700)
    for name in list(os.environ):
        if name.startswith("METALGUARD_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("METALGUARD_HOME", str(home))
    _reset_library_state()
    yield str(home)
    _reset_library_state()


@pytest.fixture
def real_mx() -> Any:
    """The real ``mlx.core``; the test skips where MLX is not installed."""
    if not HAS_MLX:
        pytest.skip(NO_MLX_REASON)
    import mlx.core

    return mlx.core


@pytest.fixture
def mx_calls(real_mx: Any, monkeypatch: pytest.MonkeyPatch) -> MlxCalls:
    """Every ``synchronize`` / ``clear_cache`` call on the real ``mlx.core``, in order."""
    calls = MlxCalls()
    monkeypatch.setattr(real_mx, "synchronize", calls.wrap(real_mx.synchronize, "synchronize"))
    monkeypatch.setattr(real_mx, "clear_cache", calls.wrap(real_mx.clear_cache, "clear_cache"))
    return calls


def _build(tmp_path_factory: pytest.TempPathFactory, arch: str) -> str:
    if not HAS_MLX_LM:
        pytest.skip(NO_MLX_LM_REASON)
    from tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp(f"tiny_{arch}"), arch)


def _load(path: str) -> tuple[Any, Any]:
    import mlx_lm

    loaded = mlx_lm.load(path)
    return loaded[0], loaded[1]


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder with a tiny random-weight llama model (64 wide, 2 layers)."""
    return _build(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_gemma4_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder with a tiny random-weight gemma4_text model (64 wide, 2 layers)."""
    return _build(tmp_path_factory, "gemma4_text")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_path: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the tiny llama, loaded with ``mlx_lm.load``."""
    return _load(tiny_llama_path)


@pytest.fixture(scope="session")
def tiny_gemma4(tiny_gemma4_path: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the tiny gemma4_text model, loaded with ``mlx_lm.load``."""
    return _load(tiny_gemma4_path)


@pytest.fixture
def clean_worker_pool() -> Iterator[None]:
    """After the test: every pooled worker stopped and this process's MLX-lock holds dropped."""
    yield
    import metal_guard as mg  # at use only: a broken module fails its own tests, not all

    mg.shutdown_all_workers()
    while mg.release_mlx_lock():
        pass
