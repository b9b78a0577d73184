"""Section 5.8: ``install_upstream_defensive_patches`` (the mlx-lm 0.31.2 think_start_id fix).

The defective release cannot be installed next to the current mlx-lm, so its
``mlx_lm.tokenizer_utils`` is faked in ``sys.modules`` with the property exactly as
mlx-lm 0.31.2 ships it. With real mlx-lm installed, the real (fixed) release is also
checked: it is left alone unless forced, and a forced patch keeps its behaviour.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

import metal_guard as mg
from helpers import requires_mlx_lm

PATCH = "mlx_lm_1128_think_start_id"


def make_wrapper_class() -> type:
    class TokenizerWrapper:
        """The relevant part of mlx-lm 0.31.2's ``TokenizerWrapper``."""

        def __init__(self, think_start_tokens: tuple[int, ...] | None) -> None:
            self._think_start_tokens = think_start_tokens

        @property
        def think_start_id(self) -> int:
            """The id of the single think-start token."""
            if len(self._think_start_tokens) > 1:  # type: ignore[arg-type]
                raise ValueError("The start thinking sequence is more than 1 token")
            return self._think_start_tokens[0]  # type: ignore[index]

    return TokenizerWrapper


@pytest.fixture
def fake_mlx_lm(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """``mlx_lm`` 0.31.2 with its ``tokenizer_utils``, as imported modules."""
    package = types.ModuleType("mlx_lm")
    package.__version__ = "0.31.2"  # type: ignore[attr-defined]
    utils = types.ModuleType("mlx_lm.tokenizer_utils")
    utils.TokenizerWrapper = make_wrapper_class()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlx_lm", package)
    monkeypatch.setitem(sys.modules, "mlx_lm.tokenizer_utils", utils)
    yield utils


def test_the_defect_as_shipped(fake_mlx_lm: types.ModuleType) -> None:
    wrapper = fake_mlx_lm.TokenizerWrapper
    with pytest.raises(TypeError, match="NoneType"):
        wrapper(None).think_start_id  # noqa: B018 - the property access is the test


def test_patched_once_then_idempotent(
    fake_mlx_lm: types.ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    wrapper = fake_mlx_lm.TokenizerWrapper
    doc = wrapper.__dict__["think_start_id"].__doc__
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        assert mg.install_upstream_defensive_patches() == {PATCH: True}
        patched = wrapper.__dict__["think_start_id"]
        assert mg.install_upstream_defensive_patches() == {PATCH: False}
        assert mg.install_upstream_defensive_patches(force=True) == {PATCH: False}
    assert wrapper.__dict__["think_start_id"] is patched  # not wrapped again
    assert patched.__doc__ == doc
    (record,) = caplog.records
    assert "0.31.2" in record.getMessage() and "think_start_id" in record.getMessage()
    assert "mlx-lm#1128" in record.getMessage()


def test_patched_behaviour(fake_mlx_lm: types.ModuleType) -> None:
    wrapper = fake_mlx_lm.TokenizerWrapper
    mg.install_upstream_defensive_patches()
    assert wrapper(None).think_start_id is None
    assert wrapper(()).think_start_id is None
    assert wrapper((42,)).think_start_id == 42
    with pytest.raises(ValueError, match="more than 1 token"):
        wrapper((1, 2)).think_start_id  # noqa: B018


@pytest.mark.parametrize("version", ["0.31.1", "0.31.3", "0.32.2", "0.31.2.post1"])
def test_other_releases_are_skipped_unless_forced(
    fake_mlx_lm: types.ModuleType, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    monkeypatch.setattr(sys.modules["mlx_lm"], "__version__", version)
    original = fake_mlx_lm.TokenizerWrapper.__dict__["think_start_id"]
    assert mg.install_upstream_defensive_patches() == {PATCH: False}
    assert fake_mlx_lm.TokenizerWrapper.__dict__["think_start_id"] is original
    assert mg.install_upstream_defensive_patches(force=True) == {PATCH: True}
    assert fake_mlx_lm.TokenizerWrapper(None).think_start_id is None


def test_the_version_comes_from_metadata_when_mlx_lm_is_not_imported(
    fake_mlx_lm: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "mlx_lm")
    monkeypatch.setattr(mg, "_installed_version", lambda name: "0.31.2")
    assert mg.install_upstream_defensive_patches() == {PATCH: True}
    monkeypatch.setattr(mg, "_installed_version", lambda name: "0.32.0")
    fake_mlx_lm.TokenizerWrapper = make_wrapper_class()  # type: ignore[attr-defined]
    assert mg.install_upstream_defensive_patches() == {PATCH: False}


@pytest.mark.parametrize("force", [False, True])
def test_never_raises_when_mlx_lm_is_absent(monkeypatch: pytest.MonkeyPatch, force: bool) -> None:
    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # import mlx_lm fails
    monkeypatch.setitem(sys.modules, "mlx_lm.tokenizer_utils", None)
    monkeypatch.setattr(mg, "_installed_version", lambda name: None)
    assert mg.install_upstream_defensive_patches(force=force) == {PATCH: False}


def test_an_importable_version_without_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Metadata says 0.31.2 but ``mlx_lm.tokenizer_utils`` cannot be imported."""
    monkeypatch.delitem(sys.modules, "mlx_lm", raising=False)
    monkeypatch.setitem(sys.modules, "mlx_lm.tokenizer_utils", None)
    monkeypatch.setattr(mg, "_installed_version", lambda name: "0.31.2")
    assert mg.install_upstream_defensive_patches() == {PATCH: False}


@pytest.mark.parametrize(
    "attribute",
    [None, 7, staticmethod(lambda: 1), property(None)],
    ids=["missing", "not-a-property", "staticmethod", "no-getter"],
)
def test_an_unexpected_shape_is_left_alone(fake_mlx_lm: types.ModuleType, attribute: Any) -> None:
    class TokenizerWrapper:
        pass

    if attribute is not None:
        TokenizerWrapper.think_start_id = attribute  # type: ignore[attr-defined]
    fake_mlx_lm.TokenizerWrapper = TokenizerWrapper  # type: ignore[attr-defined]
    assert mg.install_upstream_defensive_patches(force=True) == {PATCH: False}
    assert TokenizerWrapper.__dict__.get("think_start_id") is attribute


def test_a_failing_patch_warns_and_returns_false(
    fake_mlx_lm: types.ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    class Frozen(type):
        def __setattr__(cls, name: str, value: Any) -> None:
            raise AttributeError(f"{name} is read-only")

    class TokenizerWrapper(metaclass=Frozen):
        think_start_id = make_wrapper_class().__dict__["think_start_id"]

    fake_mlx_lm.TokenizerWrapper = TokenizerWrapper  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        assert mg.install_upstream_defensive_patches() == {PATCH: False}
    (record,) = caplog.records
    assert "mlx_lm_1128_think_start_id failed" in record.getMessage()
    assert "read-only" in record.getMessage()


@requires_mlx_lm
def test_the_installed_mlx_lm(monkeypatch: pytest.MonkeyPatch, tiny_llama: tuple[Any, Any]) -> None:
    """The installed (fixed) mlx-lm is left alone; forcing the patch keeps its behaviour."""
    import importlib.metadata

    from mlx_lm.tokenizer_utils import TokenizerWrapper

    _, tokenizer = tiny_llama
    original = TokenizerWrapper.__dict__["think_start_id"]
    monkeypatch.setattr(TokenizerWrapper, "think_start_id", original)  # restored afterwards
    installed = importlib.metadata.version("mlx-lm")
    expected = installed == "0.31.2"
    assert mg.install_upstream_defensive_patches() == {PATCH: expected}
    if not expected:
        assert TokenizerWrapper.__dict__["think_start_id"] is original
    assert tokenizer.think_start_id is None  # the tiny tokenizer has no thinking tokens
    assert mg.install_upstream_defensive_patches(force=True) == {PATCH: not expected}
    assert TokenizerWrapper.__dict__["think_start_id"] is not original
    assert tokenizer.think_start_id is None
