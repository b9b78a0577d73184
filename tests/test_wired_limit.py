"""Section 5.7: the wired-limit control (``limit_wired_memory`` / ``restore_wired_memory``).

On Linux MLX runs on the CPU, where ``device_info()`` reports no recommended working set
and ``set_wired_limit`` is a no-op. What cannot run here is faked, and only that: the
real ``device_info`` is wrapped to also report a Metal-like ``max_recommended_working_set_size``
and ``memory_size``, and the real ``set_wired_limit`` is wrapped by a spy that records
what reaches it. Everything between — mlx-lm's ``wired_limit`` around a real ``generate``
on a tiny model, and the policy — is the real code.
"""

from __future__ import annotations

import logging
import math
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import requires_mlx

GIB = 1 << 30
RECOMMENDED = 48 * GIB
TOTAL = 64 * GIB
CAP_64 = TOTAL - int(TOTAL * 0.35)  # the reserve on 64 GiB is 35 % (22.4 GiB > 8 GiB)


@pytest.fixture(autouse=True)
def _no_policy_left_behind() -> Iterator[None]:
    mg.restore_wired_memory()
    yield
    mg.restore_wired_memory()


class FakeCore(types.ModuleType):
    """A stand-in ``mlx.core`` (installed without a parent ``mlx`` package, as some suites do)."""

    def __init__(self, *, total: int | None = TOTAL, metal_only: bool = False) -> None:
        super().__init__("mlx.core")
        self.calls: list[Any] = []
        self.limit = 0
        self.total = total

        def set_wired_limit(limit: Any) -> int:
            self.calls.append(limit)
            previous, self.limit = self.limit, limit
            return previous

        def device_info() -> dict[str, Any]:
            info: dict[str, Any] = {"max_recommended_working_set_size": RECOMMENDED}
            if self.total is not None:
                info["memory_size"] = self.total
            return info

        self.metal = types.SimpleNamespace(set_wired_limit=set_wired_limit)
        if not metal_only:
            self.set_wired_limit = set_wired_limit
        self.device_info = device_info


@pytest.fixture
def fake_mx(monkeypatch: pytest.MonkeyPatch) -> FakeCore:
    core = FakeCore()
    monkeypatch.delitem(sys.modules, "mlx", raising=False)
    monkeypatch.setitem(sys.modules, "mlx.core", core)
    return core


def crumbs() -> list[str]:
    return [line for line in mg.read_breadcrumbs(500) if "WIRED_LIMIT:" in line]


# -- policies on a fake mlx.core --------------------------------------------------------


def test_off_turns_every_request_into_zero(fake_mx: FakeCore) -> None:
    info = mg.limit_wired_memory("off")
    assert info["installed"] is True and info["policy"] == "off" and info["cap_bytes"] == 0
    assert info["source"] == "argument"
    assert info["targets"] == ["mlx.core.set_wired_limit", "mlx.core.metal.set_wired_limit"]
    assert fake_mx.set_wired_limit(RECOMMENDED) == 0
    assert fake_mx.set_wired_limit(0) == 0
    assert fake_mx.metal.set_wired_limit(5 * GIB) == 0
    assert fake_mx.calls == [0, 0, 0]


def test_cap_leaves_a_reserve_of_35_percent_or_8_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    for total, cap in [
        (TOTAL, CAP_64),
        (128 * GIB, 128 * GIB - int(128 * GIB * 0.35)),
        (16 * GIB, 8 * GIB),  # 35 % would be 5.6 GiB: the 8 GiB floor wins
        (8 * GIB, 0),
    ]:
        core = FakeCore(total=total)
        monkeypatch.setitem(sys.modules, "mlx.core", core)
        info = mg.limit_wired_memory("cap")
        assert (info["cap_bytes"], info["total_memory_bytes"]) == (cap, total)
        core.set_wired_limit(RECOMMENDED)
        core.set_wired_limit(cap // 2)  # under the cap: passes unchanged
        assert core.calls == [min(cap, RECOMMENDED), cap // 2]
        mg.restore_wired_memory()


def test_cap_with_a_size(fake_mx: FakeCore) -> None:
    info = mg.limit_wired_memory("cap:1.5")
    assert info["policy"] == "cap:1.5" and info["cap_bytes"] == int(1.5 * GIB)
    fake_mx.set_wired_limit(RECOMMENDED)
    fake_mx.set_wired_limit(GIB)
    assert fake_mx.calls == [int(1.5 * GIB), GIB]


def test_cap_with_unknown_memory_never_wires(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    core = FakeCore(total=None)
    monkeypatch.setitem(sys.modules, "mlx.core", core)

    def no_sysconf(name: str) -> int:
        raise ValueError(name)

    monkeypatch.setattr(mg.os, "sysconf", no_sysconf)
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        info = mg.limit_wired_memory("cap")
        mg.limit_wired_memory("cap")
    assert info["cap_bytes"] == 0 and info["total_memory_bytes"] is None
    warnings = [r for r in caplog.records if "total memory is unknown" in r.getMessage()]
    assert len(warnings) == 1
    core.set_wired_limit(RECOMMENDED)
    assert core.calls == [0]


def test_total_memory_falls_back_to_the_os(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    core = FakeCore(total=None)
    monkeypatch.setitem(sys.modules, "mlx.core", core)
    info = mg.limit_wired_memory("cap")
    assert info["total_memory_bytes"] == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_breadcrumb_on_the_first_clamp_of_each_size(fake_mx: FakeCore) -> None:
    mg.limit_wired_memory("cap:2")
    for limit in (RECOMMENDED, RECOMMENDED, GIB, 3 * GIB, RECOMMENDED):
        fake_mx.set_wired_limit(limit)
    lines = crumbs()
    assert len(lines) == 2, lines
    assert (
        f"WIRED_LIMIT: requested={RECOMMENDED} (48.00 GiB) applied={2 * GIB} (2.00 GiB)"
        in (lines[0])
    )
    assert "policy=cap:2" in lines[0]
    assert f"requested={3 * GIB} " in lines[1]
    state = mg.describe_wired_limit()
    assert (state["requests_seen"], state["requests_clamped"]) >= (5, 4)


def test_restore_puts_the_original_functions_back(fake_mx: FakeCore) -> None:
    top, metal = fake_mx.set_wired_limit, fake_mx.metal.set_wired_limit
    mg.limit_wired_memory("off")
    assert fake_mx.set_wired_limit is not top and fake_mx.metal.set_wired_limit is not metal
    assert fake_mx.set_wired_limit.__wrapped__ is top
    assert mg.restore_wired_memory() is True
    assert fake_mx.set_wired_limit is top and fake_mx.metal.set_wired_limit is metal
    assert mg.restore_wired_memory() is False
    fake_mx.set_wired_limit(RECOMMENDED)
    assert fake_mx.calls == [RECOMMENDED]
    assert mg.describe_wired_limit()["installed"] is False


def test_installing_twice_wraps_once_and_changes_the_policy(fake_mx: FakeCore) -> None:
    top = fake_mx.set_wired_limit
    mg.limit_wired_memory("off")
    wrapper = fake_mx.set_wired_limit
    mg.limit_wired_memory("off")
    assert fake_mx.set_wired_limit is wrapper and wrapper.__wrapped__ is top
    fake_mx.set_wired_limit(RECOMMENDED)
    assert fake_mx.calls == [0]  # one call reaches MLX, once
    mg.limit_wired_memory("cap:4")
    assert fake_mx.set_wired_limit is wrapper
    fake_mx.set_wired_limit(RECOMMENDED)
    assert fake_mx.calls == [0, 4 * GIB]
    mg.restore_wired_memory()
    assert fake_mx.set_wired_limit is top


def test_a_replacement_made_after_us_is_left_alone(fake_mx: FakeCore) -> None:
    mg.limit_wired_memory("off")
    ours = fake_mx.set_wired_limit
    seen: list[Any] = []

    def theirs(limit: Any) -> Any:
        seen.append(limit)
        return ours(limit)

    fake_mx.set_wired_limit = theirs
    mg.restore_wired_memory()
    assert fake_mx.set_wired_limit is theirs  # not clobbered
    fake_mx.set_wired_limit(RECOMMENDED)  # our wrapper inside it no longer clamps
    assert seen == [RECOMMENDED] and fake_mx.calls == [RECOMMENDED]


def test_only_the_older_metal_function(monkeypatch: pytest.MonkeyPatch) -> None:
    core = FakeCore(metal_only=True)
    monkeypatch.setitem(sys.modules, "mlx.core", core)
    original = core.metal.set_wired_limit
    info = mg.limit_wired_memory("off")
    assert info["targets"] == ["mlx.core.metal.set_wired_limit"]
    core.metal.set_wired_limit(RECOMMENDED)
    assert core.calls == [0]
    mg.restore_wired_memory()
    assert core.metal.set_wired_limit is original


def test_context_manager_undoes_itself(fake_mx: FakeCore) -> None:
    top = fake_mx.set_wired_limit
    with mg.limit_wired_memory("off") as info:
        assert info["installed"] is True
        fake_mx.set_wired_limit(RECOMMENDED)
    assert fake_mx.set_wired_limit is top
    assert mg.describe_wired_limit()["installed"] is False
    fake_mx.set_wired_limit(RECOMMENDED)
    assert fake_mx.calls == [0, RECOMMENDED]


def test_nested_context_puts_the_outer_policy_back(fake_mx: FakeCore) -> None:
    mg.limit_wired_memory("cap:2")
    with mg.limit_wired_memory("off"):
        fake_mx.set_wired_limit(RECOMMENDED)
    assert mg.describe_wired_limit()["policy"] == "cap:2"
    fake_mx.set_wired_limit(RECOMMENDED)
    assert fake_mx.calls == [0, 2 * GIB]


def test_the_context_manager_restores_when_the_body_raises(fake_mx: FakeCore) -> None:
    top = fake_mx.set_wired_limit
    with pytest.raises(KeyError), mg.limit_wired_memory("off"):
        raise KeyError("body")
    assert fake_mx.set_wired_limit is top


def test_values_that_are_not_integers_reach_mlx_unchanged(fake_mx: FakeCore) -> None:
    mg.limit_wired_memory("off")
    for value in ("lots", 1.5e9, None, True):
        fake_mx.set_wired_limit(value)
    assert fake_mx.calls == ["lots", 1.5e9, None, True]
    fake_mx.set_wired_limit(-5)  # MLX raises on its own for negative sizes
    assert fake_mx.calls[-1] == -5


def test_numpy_style_integers_are_clamped(fake_mx: FakeCore) -> None:
    class Index:
        def __index__(self) -> int:
            return RECOMMENDED

    mg.limit_wired_memory("off")
    fake_mx.set_wired_limit(Index())
    assert fake_mx.calls == [0]


# -- policy words and the environment ----------------------------------------------------


@pytest.mark.parametrize(
    ("word", "name", "cap"),
    [
        ("off", "off", 0),
        (" OFF ", "off", 0),
        ("cap:24", "cap:24", 24 * GIB),
        ("Cap:0.5", "cap:0.5", GIB // 2),
        ("cap:24GiB", "cap:24", 24 * GIB),
        ("cap: 8g", "cap:8", 8 * GIB),
        ("cap:0", "cap:0", 0),
    ],
)
def test_policy_words(fake_mx: FakeCore, word: str, name: str, cap: int) -> None:
    info = mg.limit_wired_memory(word)
    assert (info["policy"], info["cap_bytes"]) == (name, cap)


@pytest.mark.parametrize(
    "word", ["on", "none", "", "cap:", "cap:-1", "cap:nan", "cap:inf", "cap:abc", "cap=4", "4"]
)
def test_bad_policy_words_raise(fake_mx: FakeCore, word: str) -> None:
    with pytest.raises(ValueError, match="expected 'off', 'cap' or 'cap:<GiB>'"):
        mg.limit_wired_memory(word)
    assert mg.describe_wired_limit()["installed"] is False


@pytest.mark.parametrize("value", [4, 4.0, b"off", ["off"]])
def test_policy_must_be_a_string(fake_mx: FakeCore, value: Any) -> None:
    with pytest.raises(TypeError, match="policy must be a str"):
        mg.limit_wired_memory(value)


def test_environment_policy(fake_mx: FakeCore, monkeypatch: pytest.MonkeyPatch) -> None:
    info = mg.limit_wired_memory()
    assert (info["policy"], info["source"], info["cap_bytes"]) == ("off", "default", 0)
    assert fake_mx.set_wired_limit(RECOMMENDED) == 0 and fake_mx.calls == [0]
    monkeypatch.setenv("METALGUARD_WIRED_LIMIT", "cap")
    info = mg.limit_wired_memory()
    assert (info["policy"], info["source"], info["cap_bytes"]) == (
        "cap",
        "METALGUARD_WIRED_LIMIT",
        CAP_64,
    )
    monkeypatch.setenv("METALGUARD_WIRED_LIMIT", "off")
    info = mg.limit_wired_memory()
    assert (info["policy"], info["source"]) == ("off", "METALGUARD_WIRED_LIMIT")
    monkeypatch.setenv("METALGUARD_WIRED_LIMIT", "cap:3")
    assert mg.limit_wired_memory()["cap_bytes"] == 3 * GIB
    monkeypatch.setenv("METALGUARD_WIRED_LIMIT", "   ")
    assert mg.limit_wired_memory()["source"] == "default"
    state = mg.describe_wired_limit()
    assert state["env_value"] is None and state["env_policy"] == "off"
    assert state["env_policy_source"] == "default"


def test_a_bad_environment_value_warns_once_and_never_wires(
    fake_mx: FakeCore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("METALGUARD_WIRED_LIMIT", "unwired")
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        first = mg.limit_wired_memory()
        mg.limit_wired_memory()
        mg.describe_wired_limit()
    assert (first["policy"], first["source"], first["cap_bytes"]) == ("off", "default", 0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "METALGUARD_WIRED_LIMIT" in messages[0]
    assert "unwired" in messages[0]


def test_describe(fake_mx: FakeCore, monkeypatch: pytest.MonkeyPatch) -> None:
    state = mg.describe_wired_limit()
    assert state["installed"] is False and state["policy"] is None and state["targets"] == []
    monkeypatch.setenv("METALGUARD_WIRED_LIMIT", "off")
    mg.limit_wired_memory("cap:1")
    state = mg.describe_wired_limit()
    assert state["installed"] is True
    assert (state["policy"], state["source"], state["cap_bytes"]) == ("cap:1", "argument", GIB)
    assert state["total_memory_bytes"] == TOTAL
    assert (state["env_value"], state["env_policy"]) == ("off", "off")
    assert state["env_var"] == "METALGUARD_WIRED_LIMIT"


def test_without_mlx_nothing_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # import mlx.core fails
    info = mg.limit_wired_memory("off")
    assert info["installed"] is False and "MLX is not installed" in info["reason"]
    assert info["targets"] == [] and mg.describe_wired_limit()["installed"] is False
    with info:  # harmless as a context manager too
        pass
    assert mg.restore_wired_memory() is False


def test_an_mlx_without_set_wired_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    core = types.ModuleType("mlx.core")
    monkeypatch.setitem(sys.modules, "mlx.core", core)
    info = mg.limit_wired_memory("off")
    assert info["installed"] is False and "no set_wired_limit" in info["reason"]


def test_the_policy_holds_across_threads(fake_mx: FakeCore) -> None:
    import threading

    mg.limit_wired_memory("cap:1")
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(50):
            fake_mx.set_wired_limit(RECOMMENDED)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake_mx.calls == [GIB] * 400
    assert len(crumbs()) == 1


# -- real MLX ------------------------------------------------------------------------------


@requires_mlx
def test_real_mlx_functions_are_wrapped_and_put_back() -> None:
    import mlx.core as mx

    top, metal = mx.set_wired_limit, mx.metal.set_wired_limit
    info = mg.limit_wired_memory("off")
    assert info["installed"] is True
    assert mx.set_wired_limit is not top and mx.metal.set_wired_limit is not metal
    assert mx.set_wired_limit(RECOMMENDED) == 0  # CPU: a no-op that returns 0
    mg.restore_wired_memory()
    assert mx.set_wired_limit is top and mx.metal.set_wired_limit is metal


@pytest.fixture
def metal_like(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Real ``device_info`` plus a recommended working set; a spy on the real ``set_wired_limit``."""
    import mlx.core as mx

    real_info: Callable[[], dict[str, Any]] = mx.device_info
    real_set: Callable[[int], int] = mx.set_wired_limit
    seen: list[int] = []

    def device_info() -> dict[str, Any]:
        return {
            **real_info(),
            "max_recommended_working_set_size": RECOMMENDED,
            "memory_size": TOTAL,
        }

    def spy(limit: int) -> int:
        seen.append(limit)
        return real_set(limit)

    monkeypatch.setattr(mx, "device_info", device_info)
    monkeypatch.setattr(mx, "set_wired_limit", spy)
    yield seen
    mg.restore_wired_memory()


def _generate(model_and_tokenizer: tuple[Any, Any]) -> str:
    import mlx_lm

    model, tokenizer = model_and_tokenizer
    text: str = mlx_lm.generate(model, tokenizer, prompt="hello", max_tokens=3)
    return text


@pytest.mark.mlx_lm
def test_real_generate_without_a_policy_wires_the_recommended_size(
    metal_like: list[int], tiny_llama: tuple[Any, Any]
) -> None:
    _generate(tiny_llama)
    assert metal_like[0] == RECOMMENDED  # mlx-lm's wired_limit asks for the recommended size
    assert metal_like[-1] == 0  # ... and puts the previous limit back afterwards


@pytest.mark.mlx_lm
def test_real_generate_with_off_never_wires(
    metal_like: list[int], tiny_llama: tuple[Any, Any]
) -> None:
    mg.limit_wired_memory("off")
    assert _generate(tiny_llama)
    assert len(metal_like) >= 2 and all(limit == 0 for limit in metal_like)
    (line,) = crumbs()
    assert f"requested={RECOMMENDED} " in line and "applied=0 " in line and "policy=off" in line


@pytest.mark.mlx_lm
def test_real_generate_with_cap_1_stays_under_1_gib(
    metal_like: list[int], tiny_llama: tuple[Any, Any]
) -> None:
    mg.limit_wired_memory("cap:1")
    _generate(tiny_llama)
    assert metal_like and max(metal_like) <= GIB
    assert metal_like[0] == GIB


@pytest.mark.mlx_lm
def test_real_generate_with_the_default_policy_never_wires(
    metal_like: list[int], tiny_llama: tuple[Any, Any]
) -> None:
    """The default is ``off``: mlx-lm's request for the recommended working set reaches MLX as 0."""
    info = mg.limit_wired_memory()
    assert (info["policy"], info["source"], info["cap_bytes"]) == ("off", "default", 0)
    assert _generate(tiny_llama)
    assert len(metal_like) >= 2 and all(limit == 0 for limit in metal_like)
    (line,) = crumbs()
    assert f"requested={RECOMMENDED} " in line and "applied=0 " in line and "policy=off" in line
    assert mg.describe_wired_limit()["requests_clamped"] >= 1


@pytest.mark.mlx_lm
def test_real_generate_with_the_cap_compromise(
    metal_like: list[int], tiny_llama: tuple[Any, Any]
) -> None:
    """``cap`` (asked for by name): RAM minus max(35 %, 8 GiB), not the recommended size."""
    mg.limit_wired_memory("cap")
    _generate(tiny_llama)
    assert metal_like[0] == CAP_64 and math.isclose(CAP_64 / GIB, 41.6, rel_tol=1e-9)


@pytest.mark.mlx_lm
def test_real_generate_after_restore_and_after_installing_twice(
    metal_like: list[int], tiny_llama: tuple[Any, Any]
) -> None:
    import mlx.core as mx

    spy = mx.set_wired_limit
    mg.limit_wired_memory("off")
    mg.limit_wired_memory("off")
    _generate(tiny_llama)
    calls_per_generate = len(metal_like)
    assert calls_per_generate == 2 and metal_like == [0, 0]  # wrapped once, not twice
    assert mg.restore_wired_memory() is True
    assert mx.set_wired_limit is spy  # the function that was there before is back
    metal_like.clear()
    _generate(tiny_llama)
    assert metal_like == [RECOMMENDED, 0]


# -- one recommendation, everywhere ----------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"
OLD_ADVICE = ("leave the wired limit alone", "wired limit at its default", "raise the wired limit")


def test_the_registry_recommends_what_the_default_does() -> None:
    """Registry texts that speak of wiring name the default policy, ``off``; none the old words."""
    speaking = [e for e in mg.KNOWN_PANIC_MODELS.values() if "wire" in e["recommendation"]]
    assert len(speaking) >= 2
    for entry in speaking:
        text = entry["recommendation"]
        assert "never wire memory (limit_wired_memory(), policy 'off'" in text
        assert "cap" not in text
    for entry in mg.KNOWN_PANIC_MODELS.values():
        assert not any(old in entry["recommendation"].lower() for old in OLD_ADVICE)


def test_the_docs_recommend_off_and_call_cap_the_compromise() -> None:
    page = (DOCS / "wired-limit.md").read_text(encoding="utf-8")
    assert "| `off` (default, recommended) |" in page and "`cap` (default)" not in page
    assert "| `cap` | `min(request, RAM − max(0.35 × RAM, 8 GiB))` | The throughput compromise" in (
        page
    )
    config = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert "| `METALGUARD_WIRED_LIMIT` | unset (`off`) |" in config
    assert "Anything else → WARNING, `off`." in config
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    assert '`"off"` (the default and the recommendation: never wire)' in api
    doc = mg.limit_wired_memory.__doc__ or ""
    assert '``"off"`` (the recommended default)' in doc and "throughput compromise" in doc
    for text in (page, config, api, doc):
        assert not any(old in text.lower() for old in OLD_ADVICE)
