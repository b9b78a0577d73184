"""MLX access section: lazy lookup, best-effort steps, stream-aware synchronize."""

from __future__ import annotations

import importlib.abc
import logging
import sys
import types
from typing import Any

import pytest

import metal_guard as mg
from helpers import MlxCalls, stub_mx, warnings_from


def test_mlx_is_looked_up_at_call_time_in_sys_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in placed only at sys.modules["mlx.core"], with no parent `mlx` package.
    monkeypatch.delitem(sys.modules, "mlx", raising=False)
    stub = types.ModuleType("mlx.core")
    monkeypatch.setitem(sys.modules, "mlx.core", stub)
    assert mg._mlx() is stub
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # blocked: absent, no import tried
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
    (warning,) = warnings_from(caplog)
    assert "importing mlx.core failed" in warning.getMessage()
    assert "libmlx.so: broken install" in warning.getMessage()


def test_mlx_fn_prefers_top_level_and_falls_back_to_metal() -> None:
    old = types.ModuleType("mlx.core")
    old.metal = types.SimpleNamespace(clear_cache=lambda: "metal")  # type: ignore[attr-defined]
    fn = mg._mlx_fn(old, "clear_cache")
    assert fn is not None and fn() == "metal"
    assert mg._mlx_fn(old, "does_not_exist") is None
    new = types.ModuleType("mlx.core")
    new.clear_cache = lambda: "top"  # type: ignore[attr-defined]
    new.metal = old.metal  # type: ignore[attr-defined]
    fn = mg._mlx_fn(new, "clear_cache")
    assert fn is not None and fn() == "top"


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
    assert "driver says no" in record.getMessage()
    assert mg._mlx_step("missing", None) is False
    assert mg._mlx_step("ok", lambda: None) is True

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mg._mlx_step("sync", interrupted)


def test_synchronize_without_mlx_lm_is_one_bare_call(
    real_mx: Any, mx_calls: MlxCalls, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "mlx_lm.generate", raising=False)
    mg._synchronize(real_mx)
    assert mx_calls.events == [("synchronize", ())]


def test_synchronize_caller_streams(
    real_mx: Any, mx_calls: MlxCalls, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "mlx_lm.generate", raising=False)
    stream = real_mx.new_stream(real_mx.default_device())
    with real_mx.stream(stream):
        result = real_mx.ones((256, 256)) @ real_mx.ones((256, 256))
    real_mx.async_eval(result)
    mg._synchronize(real_mx, [stream, stream])  # duplicates are synchronized once
    assert mx_calls.events == [("synchronize", ()), ("synchronize", (stream,))]
    mx_calls.events.clear()
    mg._synchronize(real_mx, stream)  # a single stream is accepted too
    assert mx_calls.events == [("synchronize", ()), ("synchronize", (stream,))]


@pytest.mark.mlx_lm
def test_synchronize_drains_generation_stream_after_real_generate(
    real_mx: Any, mx_calls: MlxCalls, tiny_llama: tuple[Any, Any]
) -> None:
    import mlx_lm

    model, tokenizer = tiny_llama
    mlx_lm.generate(model, tokenizer, prompt="hello", max_tokens=8)
    generation_stream = sys.modules["mlx_lm.generate"].generation_stream
    mx_calls.events.clear()
    mg._synchronize(real_mx)
    # the bare call first (as callers' doubles expect), then mlx-lm's own stream
    assert mx_calls.events == [("synchronize", ()), ("synchronize", (generation_stream,))]


def test_a_hook_failing_on_every_call_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, mg_home: str
) -> None:
    # Metal misbehaving cannot be produced on CPU: a stand-in whose clear_cache fails.
    stub_mx(monkeypatch, MlxCalls(), failing={"clear_cache"})
    with caplog.at_level(logging.DEBUG, logger="metal_guard"):
        for _ in range(20):
            with mg.subprocess_inference_guard("org/m"):
                pass
    warnings = [r.getMessage() for r in warnings_from(caplog)]
    debugs = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(warnings) == 2  # once each for the two steps ...
    assert "clear_cache (pre) failed" in warnings[0] and "clear_cache (post) failed" in warnings[1]
    assert len(debugs) == 38  # ... the other 19 + 19 failures stay at DEBUG
