"""Registry section: the registry of models that kernel-panicked with defences engaged.

The registry's shape is validated entry by entry (the original metal-guard's seven keys plus our
structured fields), the facts each entry records (from the public reports cited in its
sources) are checked, and the lookups are exercised with every spelling a caller may pass,
near-misses and junk.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import re
import threading
from pathlib import Path, PureWindowsPath
from typing import Any
from urllib.parse import urlsplit

import pytest

import metal_guard as mg
from helpers import warnings_from
from metal_guard import KNOWN_PANIC_MODELS, check_known_panic_model, warn_if_known_panic_model

GEMMA = "mlx-community/gemma-4-31b-it-8bit"
QWEN36 = "mlx-community/Qwen3.6-35B-A3B-4bit"
QWEN35 = "mlx-community/Qwen3.5-122B-A10B-4bit"
CODER = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-8bit"

ISSUE_3186 = "https://github.com/ml-explore/mlx/issues/3186"
ISSUE_3346 = "https://github.com/ml-explore/mlx/issues/3346"
ISSUE_883 = "https://github.com/ml-explore/mlx-lm/issues/883"

ORIGINAL_KEYS: dict[str, Any] = {
    "panic_signature": str,
    "first_observed": (str, type(None)),
    "last_observed": (str, type(None)),
    "reproductions": list,
    "community": list,
    "upstream": list,
    "recommendation": str,
}
OUR_KEYS = {"tier", "error_classes", "hardware", "safer_alternative"}
TIERS = {"panic", "abort", "degradation"}
# the signature names of detect_panic_signature (CONTRIBUTING's registry schema, error_classes)
SIGNATURES = {
    "prepare_count_underflow",
    "pending_memory_set",
    "remove_memory_object",
    "pending_in_non_pending_hash",
    "ctxstore_timeout",
    "metal_oom",
    "gpu_watchdog",
    "resource_limit",
}
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _entry(model_id: str) -> dict[str, Any]:
    return KNOWN_PANIC_MODELS[model_id]


def _text(entry: dict[str, Any]) -> str:
    """Every string of an entry, joined (facts may be worded freely)."""
    parts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(entry)
    return "\n".join(parts)


# -- schema ---------------------------------------------------------------------


def test_registry_is_a_dict_of_canonical_ids() -> None:
    assert isinstance(KNOWN_PANIC_MODELS, dict) and KNOWN_PANIC_MODELS
    folded = [key.casefold() for key in KNOWN_PANIC_MODELS]
    assert len(set(folded)) == len(folded)  # unique, case-insensitively
    for key in KNOWN_PANIC_MODELS:
        assert isinstance(key, str)
        assert mg.canonical_model_id(key) == key
        org, _, name = key.partition("/")
        assert org and name and "/" not in name, key
        assert key == key.strip() and not re.search(r"\s", key)


@pytest.mark.parametrize("model_id", list(KNOWN_PANIC_MODELS))
def test_entry_schema(model_id: str) -> None:
    entry = _entry(model_id)
    assert isinstance(entry, dict)
    assert set(entry) == set(ORIGINAL_KEYS) | OUR_KEYS
    for key, types in ORIGINAL_KEYS.items():
        assert isinstance(entry[key], types), (key, entry[key])

    assert entry["panic_signature"].strip()
    assert entry["recommendation"].strip()
    for key in ("first_observed", "last_observed"):
        value = entry[key]
        if value is not None:
            assert ISO_DATE.fullmatch(value), value
            assert datetime.date.fromisoformat(value).isoformat() == value
    if entry["first_observed"] and entry["last_observed"]:
        assert entry["first_observed"] <= entry["last_observed"]
    for key in ("reproductions", "community", "upstream"):
        assert all(isinstance(item, str) and item.strip() for item in entry[key]), key
    assert entry["reproductions"] and entry["upstream"]
    for url in entry["upstream"]:
        parts = urlsplit(url)
        assert parts.scheme == "https" and parts.netloc and parts.path.strip("/"), url
        assert url == url.strip()
    assert len(set(entry["upstream"])) == len(entry["upstream"])

    assert entry["tier"] in TIERS
    assert isinstance(entry["error_classes"], list) and entry["error_classes"]
    assert set(entry["error_classes"]) <= SIGNATURES, entry["error_classes"]
    assert isinstance(entry["hardware"], list)
    for hw in entry["hardware"]:
        assert isinstance(hw, dict) and set(hw) == {"chip", "memory_gb", "os"}, hw
        assert isinstance(hw["chip"], str) and re.fullmatch(r"M\d+( \w+)?", hw["chip"]), hw
        assert isinstance(hw["memory_gb"], int) and not isinstance(hw["memory_gb"], bool)
        assert hw["memory_gb"] > 0
        assert hw["os"] is None or (isinstance(hw["os"], str) and hw["os"].startswith("macOS"))
    alternative = entry["safer_alternative"]
    if alternative is not None:
        assert isinstance(alternative, str)
        assert mg.canonical_model_id(alternative) == alternative and alternative.count("/") == 1
        assert check_known_panic_model(alternative) is None  # never another known panic model


# -- facts (the public reports cited in each entry's sources) -------------------------
# Structured fields exactly; in the free text only identifiers (versions, builds, PIDs,
# issue numbers, backends): the wording is the registry's own.


def _hardware(model_id: str) -> list[tuple[str, int]]:
    return [(hw["chip"], hw["memory_gb"]) for hw in _entry(model_id)["hardware"]]


def _assert_mentions(text: str, *facts: str) -> None:
    missing = [fact for fact in facts if fact not in text]
    assert missing == [], missing


def test_facts_gemma_4_31b_8bit() -> None:
    entry = _entry(GEMMA)
    assert entry["tier"] == "panic"
    assert entry["error_classes"] == ["prepare_count_underflow"]
    _assert_mentions(entry["panic_signature"], "IOGPUMemory.cpp:492", "prepare count underflow")
    assert (entry["first_observed"], entry["last_observed"]) == ("2026-04-23", "2026-04-24")
    assert len(entry["reproductions"]) == 2
    _assert_mentions("\n".join(entry["reproductions"]), "67840", "26608", "M1 Ultra")
    assert {("M1 Ultra", 64), ("M4 Max", 64), ("M3 Ultra", 96)} <= set(_hardware(GEMMA))
    _assert_mentions("\n".join(entry["community"]), "lmstudio-bug-tracker#1740", "883")
    assert sorted(entry["upstream"]) == sorted([ISSUE_3186, ISSUE_883, ISSUE_3346])
    alternative = "mlx-community/gemma-4-26b-a4b-it-4bit"
    assert entry["safer_alternative"] == alternative
    _assert_mentions(entry["recommendation"], "Ollama", "llama.cpp", alternative)
    _assert_mentions(_text(entry), "26.4", "26.5")  # macOS releases that did not fix it


def test_facts_qwen36_35b() -> None:
    entry = _entry(QWEN36)
    assert entry["tier"] == "panic"
    assert entry["error_classes"] == ["prepare_count_underflow"]
    assert "IOGPUMemory.cpp" in entry["panic_signature"]
    assert entry["first_observed"] == "2026-04-24"
    assert ISSUE_3186 in entry["upstream"]
    assert _hardware(QWEN36) == [("M4", 32)]
    _assert_mentions(entry["hardware"][0]["os"], "26.4.1", "25E253")
    # IOGPUFamily, mlx, mlx-lm, --prompt-cache-bytes, the backend it moved to
    _assert_mentions(_text(entry), "130.13", "0.31.2", "0.31.3", "8589934592", "llama.cpp")


def test_facts_qwen35_122b() -> None:
    entry = _entry(QWEN35)
    assert entry["tier"] == "panic"
    assert set(entry["error_classes"]) == {"prepare_count_underflow", "pending_memory_set"}
    _assert_mentions(
        entry["panic_signature"],
        "IOGPUMemory.cpp:550",
        "IOGPUGroupMemory.cpp:219",
        "fPendingMemorySet",
    )
    assert ISSUE_3346 in entry["upstream"] and ISSUE_3186 in entry["upstream"]
    assert _hardware(QWEN35) == [("M3 Ultra", 96)]
    _assert_mentions(entry["hardware"][0]["os"], "26.4", "25E246")
    # the source gives no dates for this entry
    assert entry["first_observed"] is None and entry["last_observed"] is None


def test_facts_qwen3_coder_30b() -> None:
    entry = _entry(CODER)
    assert entry["tier"] == "panic"
    assert entry["error_classes"] == ["prepare_count_underflow"]
    assert "IOGPUMemory.cpp:550" in entry["panic_signature"]
    assert entry["upstream"] == [ISSUE_883]
    assert _hardware(CODER) == [("M3 Ultra", 96)]
    _assert_mentions(_text(entry), "0.30.6", "Qwen3-Coder-30B-A3B-8bit")  # as reported
    assert entry["first_observed"] is None and entry["last_observed"] is None


# -- lookups ----------------------------------------------------------------------


def _strip_added(found: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in found.items() if k != "model_id"}


@pytest.mark.parametrize("model_id", list(KNOWN_PANIC_MODELS))
def test_lookup_by_exact_id_returns_the_entry(model_id: str) -> None:
    found = check_known_panic_model(model_id)
    assert found is not None
    assert found["model_id"] == model_id
    assert _strip_added(found) == KNOWN_PANIC_MODELS[model_id]


GEMMA_SPELLINGS = [
    GEMMA,
    GEMMA.upper(),
    "MLX-Community/Gemma-4-31B-it-8bit",
    f"  {GEMMA}\n",
    "/Users/me/models/gemma-4-31b-it-8bit",
    "/Users/me/models/gemma-4-31b-it-8bit/",
    "/Users/me/models/GEMMA-4-31B-IT-8BIT",
    "~/models/gemma-4-31b-it-8bit",
    "./gemma-4-31b-it-8bit",
    "../weights/gemma-4-31b-it-8bit",
    "gemma-4-31b-it-8bit",
    "C:\\models\\gemma-4-31b-it-8bit",
    "models--mlx-community--gemma-4-31b-it-8bit/snapshots/x",
    "/root/.cache/huggingface/hub/models--mlx-community--gemma-4-31b-it-8bit/snapshots/0a1b2c/",
    "/root/.cache/huggingface/hub/models--mlx-community--gemma-4-31b-it-8bit",
    Path("/Users/me/models/gemma-4-31b-it-8bit"),
    Path("models--mlx-community--gemma-4-31b-it-8bit/snapshots/x"),
    PureWindowsPath("C:/models/gemma-4-31b-it-8bit"),
    # an HF cache folder is a local copy of the same weights, whoever uploaded them
    "/cache/hub/models--other-org--gemma-4-31b-it-8bit/snapshots/x",
]


@pytest.mark.parametrize("spelling", GEMMA_SPELLINGS, ids=repr)
def test_lookup_spellings_match(spelling: Any) -> None:
    found = check_known_panic_model(spelling)
    assert found is not None
    assert found["model_id"] == GEMMA
    assert found["tier"] == "panic"


def test_lookup_relative_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``models/<name>`` reads like a repo id; when it is an existing folder it is local."""
    monkeypatch.chdir(tmp_path)
    assert check_known_panic_model("models/gemma-4-31b-it-8bit") is None  # another repo id
    (tmp_path / "models" / "gemma-4-31b-it-8bit").mkdir(parents=True)
    found = check_known_panic_model("models/gemma-4-31b-it-8bit")
    assert found is not None and found["model_id"] == GEMMA
    found = check_known_panic_model(Path("models") / "gemma-4-31b-it-8bit")
    assert found is not None and found["model_id"] == GEMMA


@pytest.mark.parametrize("model_id", list(KNOWN_PANIC_MODELS))
def test_every_entry_matches_by_local_path_and_hf_cache(model_id: str) -> None:
    org, name = model_id.split("/")
    for spelling in (
        f"/srv/models/{name}",
        f"/cache/hub/models--{org}--{name}/snapshots/abc",
        model_id.swapcase(),
    ):
        found = check_known_panic_model(spelling)
        assert found is not None and found["model_id"] == model_id, spelling


NEAR_MISSES = [
    "other-org/gemma-4-31b-it-8bit",
    "google/gemma-4-31b-it-8bit",
    "gemma-4-31b-it-4bit",
    "mlx-community/gemma-4-31b-it-4bit",
    "mlx-community/gemma-4-31b-it",
    "mlx-community/gemma-4-31b-it-8bit-dwq",
    "mlx-community/gemma-4-31b-it-8bi",
    "mlx-community/gemma-4-26b-a4b-it-4bit",
    "mlx-community/gemma-4-31b-it-8bit/extra",
    "/models/gemma-4-31b-it-8bit.bak",
    "mlx-community/Qwen3.6-35B-A3B-8bit",
    "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit",
    "mlx-community",
    "gemma-4-31b-it-8bit\x00",
]


@pytest.mark.parametrize("model_id", NEAR_MISSES, ids=repr)
def test_near_misses_are_not_matched(model_id: str) -> None:
    assert check_known_panic_model(model_id) is None
    assert warn_if_known_panic_model(model_id) is False


JUNK: list[Any] = [
    None,
    42,
    3.5,
    float("nan"),
    True,
    "",
    "   ",
    "\n",
    "x" * 1_000_000,
    "a/" * 50_000 + "gemma-4-31b-it-8bit",
    b"mlx-community/gemma-4-31b-it-8bit",
    bytearray(b"gemma-4-31b-it-8bit"),
    ["mlx-community/gemma-4-31b-it-8bit"],
    {"model": "mlx-community/gemma-4-31b-it-8bit"},
    object(),
    "\x00",
    "line\nbreak/gemma",
]


@pytest.mark.parametrize("junk", JUNK, ids=lambda j: type(j).__name__)
def test_junk_returns_none_without_raising(junk: Any, caplog: pytest.LogCaptureFixture) -> None:
    assert check_known_panic_model(junk) is None
    assert warn_if_known_panic_model(junk) is False
    assert warnings_from(caplog) == []


def test_bytes_path_like_is_not_matched() -> None:
    class BytesPath:
        def __fspath__(self) -> bytes:
            return b"/models/gemma-4-31b-it-8bit"

    assert check_known_panic_model(BytesPath()) is None
    assert warn_if_known_panic_model(BytesPath()) is False


def test_returned_dict_is_a_deep_copy() -> None:
    snapshot = copy.deepcopy(KNOWN_PANIC_MODELS)
    found = check_known_panic_model(GEMMA)
    assert found is not None
    found["tier"] = "degradation"
    found["upstream"].append("https://example.invalid/")
    found["reproductions"].clear()
    found["community"][0] = "changed"
    found["error_classes"].append("gpu_watchdog")
    found["hardware"][0]["chip"] = "M9"
    found["hardware"].append({"chip": "M0", "memory_gb": 1, "os": None})
    del found["panic_signature"]
    assert snapshot == KNOWN_PANIC_MODELS
    again = check_known_panic_model(GEMMA)
    assert again is not None and again is not found
    assert _strip_added(again) == snapshot[GEMMA]
    assert again["hardware"] is not snapshot[GEMMA]["hardware"]


# -- warn_if_known_panic_model ------------------------------------------------------


def test_warn_unknown_is_false_and_silent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    assert warn_if_known_panic_model("mlx-community/Llama-3.2-1B-Instruct-4bit") is False
    assert warnings_from(caplog) == []
    assert not mg._WARNED_PANIC_MODELS


def test_warn_known_once_per_process(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    spellings = [
        GEMMA,
        GEMMA,
        GEMMA.upper(),
        "/Users/me/models/gemma-4-31b-it-8bit",
        Path("/root/.cache/huggingface/hub/models--mlx-community--gemma-4-31b-it-8bit"),
    ]
    assert [warn_if_known_panic_model(s) for s in spellings] == [True] * len(spellings)
    warnings = warnings_from(caplog)
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    entry = _entry(GEMMA)
    assert GEMMA in message
    assert entry["panic_signature"] in message
    assert entry["recommendation"] in message
    assert GEMMA in mg._WARNED_PANIC_MODELS

    # another known model warns once of its own
    assert warn_if_known_panic_model(CODER) is True
    assert warn_if_known_panic_model(CODER.lower()) is True
    assert len(warnings_from(caplog)) == 2
    assert CODER in warnings_from(caplog)[1].getMessage()
    assert {GEMMA, CODER} <= mg._WARNED_PANIC_MODELS


def test_warn_once_across_eight_threads(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    models = list(KNOWN_PANIC_MODELS)
    barrier = threading.Barrier(8)
    results: list[list[bool]] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        got = [warn_if_known_panic_model(m) for m in models for _ in range(3)]
        with lock:
            results.append(got)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [[True] * (3 * len(models))] * 8
    warnings = warnings_from(caplog)
    assert len(warnings) == len(models), [w.getMessage() for w in warnings]
    for model in models:
        assert sum(model in w.getMessage() for w in warnings) == 1, model
    assert set(models) <= mg._WARNED_PANIC_MODELS


def test_replacing_the_warned_set_re_enables_the_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    assert warn_if_known_panic_model(GEMMA) is True
    assert warn_if_known_panic_model(GEMMA) is True
    assert len(warnings_from(caplog)) == 1
    fresh: set[str] = set()
    monkeypatch.setattr(
        mg, "_WARNED_PANIC_MODELS", fresh
    )  # what callers of the original metal-guard do
    assert warn_if_known_panic_model(GEMMA) is True
    assert len(warnings_from(caplog)) == 2
    assert fresh == {GEMMA}
    assert warn_if_known_panic_model(GEMMA) is True
    assert len(warnings_from(caplog)) == 2


def test_reset_process_state_re_enables_the_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="metal_guard")
    warn_if_known_panic_model(QWEN36)
    mg._reset_process_state()
    assert not mg._WARNED_PANIC_MODELS
    warn_if_known_panic_model(QWEN36)
    assert len(warnings_from(caplog)) == 2


def test_lookups_touch_no_files(mg_home: str) -> None:
    check_known_panic_model(GEMMA)
    warn_if_known_panic_model(GEMMA)
    check_known_panic_model("/nonexistent/gemma-4-31b-it-8bit")
    assert os.listdir(mg_home) == []
