"""Section 3 — MLX access: lazy lookup, best-effort steps, stream-aware synchronize."""

from __future__ import annotations

import importlib.abc
import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

import metal_guard as mg

pytestmark = []


class Spy:
    """Wraps a real function: records each call's arguments, then calls it."""

    def __init__(self, real: Any, name: str, log: list[tuple[str, tuple[Any, ...]]]) -> None:
        self.real, self.name, self.log = real, name, log

    def __call__(self, *args: Any) -> Any:
        self.log.append((self.name, args))
        return self.real(*args)


@pytest.fixture
def real_mx() -> Any:
    return pytest.importorskip("mlx.core", reason="MLX is not installed (no-MLX suite)")


@pytest.fixture
def sync_log(real_mx: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    log: list[tuple[str, tuple[Any, ...]]] = []
    monkeypatch.setattr(real_mx, "synchronize", Spy(real_mx.synchronize, "synchronize", log))
    monkeypatch.setattr(real_mx, "clear_cache", Spy(real_mx.clear_cache, "clear_cache", log))
    yield log


def test_mlx_absent_when_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    assert mg._mlx() is None


def test_mlx_stub_is_found_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = types.ModuleType("mlx.core")
    monkeypatch.setitem(sys.modules, "mlx.core", stub)
    assert mg._mlx() is stub
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    assert mg._mlx() is None


class _BrokenFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name in ("mlx", "mlx.core"):
            raise RuntimeError("libmlx.so: broken install")
        return None


def test_broken_mlx_install_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in [m for m in sys.modules if m == "mlx" or m.startswith("mlx.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenFinder(), *sys.meta_path])
    monkeypatch.setattr(sys, "path", [*sys.path, "/nonexistent-for-cache-key"])
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        assert mg._mlx() is None
        assert mg._mlx() is None
    warnings = [r for r in caplog.records if "importing mlx.core failed" in r.getMessage()]
    assert len(warnings) == 1


def test_mlx_fn_falls_back_to_metal_namespace() -> None:
    old = types.ModuleType("mlx.core")
    old.metal = types.SimpleNamespace(clear_cache=lambda: "metal")  # type: ignore[attr-defined]
    fn = mg._mlx_fn(old, "clear_cache")
    assert fn is not None and fn() == "metal"
    assert mg._mlx_fn(old, "does_not_exist") is None


def test_mlx_step_is_best_effort(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def boom(x: int) -> None:
        calls.append(x)
        raise RuntimeError("driver says no")

    with caplog.at_level(logging.DEBUG, logger="metal_guard"):
        assert (
            mg._mlx_step("clear_cache", boom, 7, model_id="org/m", level=logging.WARNING) is False
        )
    assert calls == [7]
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "clear_cache" in record.getMessage() and "org/m" in record.getMessage()
    assert mg._mlx_step("missing", None) is False
    assert mg._mlx_step("ok", lambda: None) is True

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mg._mlx_step("sync", interrupted)


def test_synchronize_without_mlx_lm_is_one_bare_call(
    real_mx: Any, sync_log: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "mlx_lm.generate", raising=False)
    mg._synchronize(real_mx)
    assert sync_log == [("synchronize", ())]


def test_synchronize_caller_streams(
    real_mx: Any, sync_log: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "mlx_lm.generate", raising=False)
    stream = real_mx.new_stream(real_mx.default_device())
    with real_mx.stream(stream):
        result = real_mx.ones((256, 256)) @ real_mx.ones((256, 256))
    real_mx.async_eval(result)
    mg._synchronize(real_mx, [stream, stream])  # duplicates are synchronized once
    assert sync_log == [("synchronize", ()), ("synchronize", (stream,))]
    sync_log.clear()
    mg._synchronize(real_mx, stream)  # a single stream is accepted too
    assert sync_log == [("synchronize", ()), ("synchronize", (stream,))]


@pytest.mark.mlx_lm
def test_synchronize_drains_generation_stream_after_real_generate(
    real_mx: Any, sync_log: list[Any], tiny_llama: tuple[Any, Any]
) -> None:
    import mlx_lm

    model, tokenizer = tiny_llama
    text = mlx_lm.generate(model, tokenizer, prompt="hello", max_tokens=8)
    assert isinstance(text, str)
    generation_stream = sys.modules["mlx_lm.generate"].generation_stream
    sync_log.clear()
    mg._synchronize(real_mx)
    assert sync_log[0] == ("synchronize", ())  # exactly the bare call first
    assert ("synchronize", (generation_stream,)) in sync_log
    assert len(sync_log) == 2


def test_without_mlx_every_step_is_a_no_op(monkeypatch: pytest.MonkeyPatch, mg_home: str) -> None:
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    with mg.subprocess_inference_guard("org/m"):
        pass
    flush = mg.gemma4_generation_flush("google/gemma-4-31b-it", 0)
    assert flush.flushed is False and flush.slept_sec == 0.0


def test_a_hook_failing_on_every_call_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, mg_home: str
) -> None:
    # Metal misbehaving cannot be produced on CPU: a stand-in whose clear_cache fails.
    def broken() -> None:
        raise RuntimeError("command buffer error")

    stub = types.ModuleType("mlx.core")
    stub.clear_cache = broken  # type: ignore[attr-defined]
    stub.synchronize = lambda *a: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlx.core", stub)
    monkeypatch.delitem(sys.modules, "mlx_lm.generate", raising=False)
    with caplog.at_level(logging.DEBUG, logger="metal_guard"):
        for _ in range(20):
            with mg.subprocess_inference_guard("org/m"):
                pass
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    debugs = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(warnings) == 2  # "clear_cache (pre)" and "clear_cache (post)", once each
    assert len(debugs) == 38  # the rest stays at DEBUG
