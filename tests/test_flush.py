"""Flush guards section: ``subprocess_inference_guard`` and ``gemma4_generation_flush``.

Order of MLX calls is proven with spies that wrap the real ``mx`` functions during real
mlx-lm generation on tiny local models.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import MlxCalls, breadcrumb_messages, stub_mx, warnings_from

# -- subprocess_inference_guard ------------------------------------------------


@pytest.mark.mlx_lm
@pytest.mark.parametrize("which", ["llama", "gemma4"])
def test_guard_order_around_real_generation(
    which: str, mx_calls: MlxCalls, request: pytest.FixtureRequest, mg_home: str
) -> None:
    import mlx_lm

    model, tokenizer = request.getfixturevalue(f"tiny_{which}")
    with mg.subprocess_inference_guard(f"tiny/{which}"):
        mx_calls.mark("BODY_START")
        text = mlx_lm.generate(model, tokenizer, prompt="hello world", max_tokens=8)
        mx_calls.mark("BODY_END")
    assert isinstance(text, str) and text
    generation_stream = sys.modules["mlx_lm.generate"].generation_stream
    pre = mx_calls.events[: mx_calls.events.index(("BODY_START", ()))]
    assert pre == [("clear_cache", ())]
    assert mx_calls.after("BODY_END") == [
        ("synchronize", ()),  # the bare call, exactly as callers' doubles expect
        ("synchronize", (generation_stream,)),  # mlx-lm's own stream
        ("clear_cache", ()),  # only after every stream drained
    ]
    assert breadcrumb_messages(mg_home) == [
        f"SUBPROC_PRE: tiny/{which}",
        f"SUBPROC_POST: tiny/{which}",
    ]


@pytest.mark.mlx_lm
def test_guard_around_a_streaming_body(
    mx_calls: MlxCalls, tiny_llama: tuple[Any, Any], mg_home: str
) -> None:
    import mlx_lm

    model, tokenizer = tiny_llama
    pieces: list[str] = []
    with mg.subprocess_inference_guard("tiny/llama"):
        for response in mlx_lm.stream_generate(model, tokenizer, prompt="hi", max_tokens=12):
            pieces.append(response.text)
        mx_calls.mark("BODY_END")
    assert len(pieces) == 12
    generation_stream = sys.modules["mlx_lm.generate"].generation_stream
    assert mx_calls.after("BODY_END") == [
        ("synchronize", ()),
        ("synchronize", (generation_stream,)),
        ("clear_cache", ()),
    ]


@pytest.mark.mlx
def test_guard_synchronizes_caller_streams(mx_calls: MlxCalls, real_mx: Any) -> None:
    stream = real_mx.new_stream(real_mx.default_device())
    with mg.subprocess_inference_guard("m", streams=[stream]):
        with real_mx.stream(stream):
            out = real_mx.ones((128, 128)) @ real_mx.ones((128, 128))
        real_mx.async_eval(out)
        mx_calls.mark("BODY_END")
    assert ("synchronize", (stream,)) in mx_calls.after("BODY_END")
    assert mx_calls.after("BODY_END")[-1] == ("clear_cache", ())


@pytest.mark.mlx
def test_guard_accepts_a_generator_of_streams_and_reuses_it(
    mx_calls: MlxCalls, real_mx: Any
) -> None:
    streams = [real_mx.new_stream(real_mx.default_device()) for _ in range(2)]
    guard = mg.subprocess_inference_guard("m", streams=(s for s in streams))
    for _ in range(2):  # the generator is read once, the guard used twice
        mx_calls.events.clear()
        with guard:
            mx_calls.mark("BODY_END")
        synced = [
            args[0] for name, args in mx_calls.after("BODY_END") if name == "synchronize" and args
        ]
        assert all(any(s is x for x in synced) for s in streams)


def test_guard_without_mlx_writes_breadcrumbs_only(
    monkeypatch: pytest.MonkeyPatch, mg_home: str
) -> None:
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    with mg.subprocess_inference_guard("org/model") as guard:
        assert isinstance(guard, mg.subprocess_inference_guard)
    assert breadcrumb_messages(mg_home) == ["SUBPROC_PRE: org/model", "SUBPROC_POST: org/model"]


def test_body_exception_is_the_same_object_with_no_context(
    monkeypatch: pytest.MonkeyPatch, mg_home: str
) -> None:
    rec = MlxCalls()
    stub_mx(monkeypatch, rec, failing={"clear_cache", "synchronize"})
    error = ValueError("generation failed")
    with pytest.raises(ValueError) as info, mg.subprocess_inference_guard("org/m"):
        raise error
    assert info.value is error
    assert error.__context__ is None and error.__cause__ is None
    assert rec.names() == ["clear_cache", "synchronize", "clear_cache"]  # POST still ran
    assert breadcrumb_messages(mg_home) == ["SUBPROC_PRE: org/m", "SUBPROC_POST: org/m"]


def test_failing_hooks_never_block_the_body(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, mg_home: str
) -> None:
    rec = MlxCalls()
    stub_mx(monkeypatch, rec, failing={"clear_cache", "synchronize"})
    ran = []
    with (
        caplog.at_level(logging.DEBUG, logger="metal_guard"),
        mg.subprocess_inference_guard("org/m"),
    ):
        ran.append(True)
    assert ran == [True]
    assert {w.getMessage().split(" failed")[0] for w in warnings_from(caplog)} == {
        "metal_guard: clear_cache (pre)",
        "metal_guard: synchronize",
        "metal_guard: clear_cache (post)",
    }
    assert breadcrumb_messages(mg_home) == ["SUBPROC_PRE: org/m", "SUBPROC_POST: org/m"]


def test_keyboard_interrupt_passes_through_after_post(
    monkeypatch: pytest.MonkeyPatch, mg_home: str
) -> None:
    rec = MlxCalls()
    stub_mx(monkeypatch, rec)
    with pytest.raises(KeyboardInterrupt), mg.subprocess_inference_guard("org/m"):
        raise KeyboardInterrupt
    assert rec.names() == ["clear_cache", "synchronize", "clear_cache"]
    assert breadcrumb_messages(mg_home)[-1] == "SUBPROC_POST: org/m"


@pytest.mark.mlx
def test_eight_threads_fifty_calls_every_pre_has_its_post(real_mx: Any, mg_home: str) -> None:
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(50):
                with mg.subprocess_inference_guard(f"t{t}/call{i}"):
                    real_mx.eval(real_mx.ones((32, 32)) * (t + i))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    crumbs = breadcrumb_messages(mg_home)
    assert len(crumbs) == 8 * 50 * 2
    for t in range(8):
        for i in range(50):
            pre = crumbs.index(f"SUBPROC_PRE: t{t}/call{i}")
            post = crumbs.index(f"SUBPROC_POST: t{t}/call{i}")
            assert pre < post


def test_nested_guards_and_decorator(monkeypatch: pytest.MonkeyPatch, mg_home: str) -> None:
    rec = MlxCalls()
    stub_mx(monkeypatch, rec)
    with mg.subprocess_inference_guard("outer"), mg.subprocess_inference_guard("inner"):
        pass
    assert breadcrumb_messages(mg_home) == [
        "SUBPROC_PRE: outer",
        "SUBPROC_PRE: inner",
        "SUBPROC_POST: inner",
        "SUBPROC_POST: outer",
    ]

    @mg.subprocess_inference_guard("decorated")
    def generate(prompt: str) -> str:
        return prompt.upper()

    assert generate("ok") == "OK"
    assert generate.__name__ == "generate"
    assert breadcrumb_messages(mg_home)[-2:] == [
        "SUBPROC_PRE: decorated",
        "SUBPROC_POST: decorated",
    ]


@pytest.mark.parametrize(
    ("model_id", "label"),
    [
        ("", ""),
        ("  spaced  ", "  spaced  "),
        ("new\nline", "new\\nline"),
        (None, "None"),
        (42, "42"),
        (Path("/models/x"), "/models/x"),
        (b"bytes", "b'bytes'"),
    ],
)
def test_any_model_id_is_written_safely(
    model_id: Any, label: str, mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    with mg.subprocess_inference_guard(model_id):
        pass
    assert breadcrumb_messages(mg_home) == [f"SUBPROC_PRE: {label}", f"SUBPROC_POST: {label}"]


# -- gemma4_generation_flush ---------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    # Waiting out real settle windows (up to 60 s) is not a test; record them instead.
    record: list[float] = []
    monkeypatch.setattr(mg.time, "sleep", record.append)
    return record


@pytest.mark.mlx_lm
def test_flush_as_a_call_on_a_real_gemma4_model(
    mx_calls: MlxCalls,
    sleeps: list[float],
    tiny_gemma4_path: str,
    mg_home: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlx_lm

    monkeypatch.setenv("METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC", "0.5")
    model, tokenizer = mlx_lm.load(tiny_gemma4_path)
    mx_calls.events.clear()
    flush = mg.gemma4_generation_flush(tiny_gemma4_path, 0)
    assert flush.flushed is True and flush.slept_sec == 0.5
    assert sleeps == [0.5]
    names = mx_calls.names()
    assert names[0] == "synchronize" and names[-1] == "clear_cache"
    with mg.subprocess_inference_guard(tiny_gemma4_path):
        text = mlx_lm.generate(model, tokenizer, prompt="hi", max_tokens=4)
    assert isinstance(text, str)
    crumbs = breadcrumb_messages(mg_home)
    assert crumbs[:2] == [
        f"GEMMA4_FLUSH: {tiny_gemma4_path}",
        f"GEMMA4_FLUSH_DONE: {tiny_gemma4_path}",
    ]


@pytest.mark.mlx
def test_flush_as_a_context_manager(mx_calls: MlxCalls, sleeps: list[float], mg_home: str) -> None:
    with mg.gemma4_generation_flush("mlx-community/gemma-4-E4B-it-4bit", 0) as flush:
        inside = list(mx_calls.events)
    assert flush.flushed is True and flush.slept_sec == 3.0 and sleeps == [3.0]
    names = [n for n, _ in inside]
    assert names[0] == "synchronize" and names[-1] == "clear_cache"
    assert set(names[:-1]) == {"synchronize"}
    assert mx_calls.events == inside  # leaving the block does nothing
    assert breadcrumb_messages(mg_home) == [
        "GEMMA4_FLUSH: mlx-community/gemma-4-E4B-it-4bit",
        "GEMMA4_FLUSH_DONE: mlx-community/gemma-4-E4B-it-4bit",
    ]


@pytest.mark.mlx
@pytest.mark.parametrize(
    ("model_id", "count"),
    [
        ("mlx-community/gemma-4-31b-it-8bit", 1),
        ("mlx-community/gemma-4-31b-it-8bit", 7),
        ("mlx-community/Llama-3.2-3B-Instruct-4bit", 0),
        ("mlx-community/gemma-3-27b-it-4bit", 0),
    ],
)
def test_flush_only_on_first_call_of_gemma4(
    model_id: str, count: int, mx_calls: MlxCalls, sleeps: list[float], mg_home: str
) -> None:
    flush = mg.gemma4_generation_flush(model_id, count)
    assert flush.flushed is False and flush.slept_sec == 0.0
    assert mx_calls.events == [] and sleeps == [] and breadcrumb_messages(mg_home) == []


@pytest.mark.mlx
@pytest.mark.parametrize("switch", ["1", "true", "YES", " on "])
def test_kill_switch(
    switch: str, mx_calls: MlxCalls, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METALGUARD_GEMMA4_FIRSTGEN_DISABLED", switch)
    flush = mg.gemma4_generation_flush("google/gemma-4-31B-it", 0)
    assert flush.flushed is False and mx_calls.events == [] and sleeps == []


@pytest.mark.mlx
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0", 0.0),
        ("2.5", 2.5),
        ("100", 60.0),
        ("-1", 0.0),
        ("inf", 3.0),
        ("nan", 3.0),
        ("soon", 3.0),
        ("", 3.0),
        ("1e999", 3.0),
    ],
)
def test_sleep_override_is_clamped(
    raw: str,
    expected: float,
    mx_calls: MlxCalls,
    sleeps: list[float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC", raw)
    flush = mg.gemma4_generation_flush("google/gemma-4-31B-it", 0)
    assert flush.flushed is True and flush.slept_sec == expected
    assert sleeps == ([expected] if expected > 0 else [])


def test_no_sleep_without_mlx(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch, mg_home: str
) -> None:
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    flush = mg.gemma4_generation_flush("google/gemma-4-31B-it", 0)
    assert flush.flushed is False and sleeps == [] and breadcrumb_messages(mg_home) == []


@pytest.mark.parametrize("count", ["0", None, True, [0], float("nan"), float("inf")], ids=repr)
def test_a_count_that_is_not_a_number_warns_and_does_not_flush(
    count: Any,
    sleeps: list[float],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mg_home: str,
) -> None:
    # A stand-in MLX (not the real one) so the decision, not a missing MLX, is what is seen.
    rec = MlxCalls()
    stub_mx(monkeypatch, rec)
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        flush = mg.gemma4_generation_flush("google/gemma-4-31B-it", count)
        mg.gemma4_generation_flush("google/gemma-4-31B-it", count)
    assert flush.flushed is False and flush.slept_sec == 0.0
    assert rec.events == [] and sleeps == [] and breadcrumb_messages(mg_home) == []
    (warning,) = warnings_from(caplog)  # once per process, not once per call
    assert "generate_call_count" in warning.getMessage()
    assert repr(flush).startswith("gemma4_generation_flush('google/gemma-4-31B-it', ")


@pytest.mark.parametrize(
    ("model_id", "count"),
    [
        ("google/gemma-4-31B-it", 1.0),
        (None, 0),
        (42, 0),
        ("", 0),
        ("x" * 10_000, 0),
    ],
    ids=["later-call", "None-id", "int-id", "empty-id", "huge-id"],
)
def test_not_a_first_gemma4_call_is_silent_and_does_nothing(
    model_id: Any,
    count: Any,
    sleeps: list[float],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = MlxCalls()
    stub_mx(monkeypatch, rec)
    with caplog.at_level(logging.DEBUG, logger="metal_guard"):
        flush = mg.gemma4_generation_flush(model_id, count)
    assert flush.flushed is False and rec.events == [] and sleeps == []
    assert caplog.records == []


def test_flush_step_failures_are_debug_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, sleeps: list[float]
) -> None:
    rec = MlxCalls()
    stub_mx(monkeypatch, rec, failing={"clear_cache", "synchronize"})
    with caplog.at_level(logging.DEBUG, logger="metal_guard"):
        flush = mg.gemma4_generation_flush("google/gemma-4-31B-it", 0)
    assert flush.flushed is True and sleeps == [3.0]
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]


@pytest.mark.parametrize("count", [0, 0.0, -0.0])
def test_flush_counts_like_the_original(
    count: Any, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The original metal-guard flushed when `generate_call_count == 0`; any real zero does here too.
    rec = MlxCalls()
    stub_mx(monkeypatch, rec)
    assert mg.gemma4_generation_flush("google/gemma-4-31B-it", count).flushed is True


def test_flush_accepts_numpy_counts(sleeps: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    np = pytest.importorskip("numpy", reason="NumPy comes with the MLX environment")
    rec = MlxCalls()
    stub_mx(monkeypatch, rec)
    assert mg.gemma4_generation_flush("google/gemma-4-31B-it", np.int64(0)).flushed is True
    assert mg.gemma4_generation_flush("google/gemma-4-31B-it", np.int32(3)).flushed is False
