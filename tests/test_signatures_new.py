"""Panic and error signatures added with SPEC-2 §7, with their kinds.

``ImpactingInteractivity``, ``kIOGPUCommandBufferCallbackErrorTimeout`` and
``SubmissionsIgnored`` are process-level failures (the Mac stays up); ``cpt_mapcnt_inc:
refcnt overflow`` is a kernel panic outside the IOGPU driver. None of them is counted by
the circuit breaker, which still trips on IOGPU kernel panics only.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import metal_guard as mg
from panic_fixtures import (
    COMMAND_BUFFER_OOM_TEXT,
    GPU_TIMEOUT_TEXT,
    IMPACTING_INTERACTIVITY_TEXT,
    KINDS,
    SUBMISSIONS_IGNORED_TEXT,
    Panic,
    panic_text,
    write_panic,
)

NEW = {
    "impacting_interactivity": "process",
    "gpu_timeout": "process",
    "submissions_ignored": "process",
    "cpt_mapcnt_overflow": "kernel",
}


@pytest.mark.parametrize(
    ("text", "name"),
    [
        (IMPACTING_INTERACTIVITY_TEXT, "impacting_interactivity"),
        ("kIOGPUCommandBufferCallbackErrorImpactingInteractivity", "impacting_interactivity"),
        ("Command buffer execution failed: Impacting\nInteractivity", "impacting_interactivity"),
        (GPU_TIMEOUT_TEXT, "gpu_timeout"),
        ("error 00000002:kIOGPUCommandBufferCallbackErrorTimeout", "gpu_timeout"),
        ("[METAL] Command buffer execution failed: Caused GPU Timeout Error", "gpu_timeout"),
        (SUBMISSIONS_IGNORED_TEXT, "submissions_ignored"),
        ("kIOGPUCommandBufferCallbackErrorSubmissionsIgnored", "submissions_ignored"),
        ("SubmissionsIgnored", "submissions_ignored"),
        ("cpt_mapcnt_inc: refcnt overflow", "cpt_mapcnt_overflow"),
        (panic_text(Panic(kind="mapcnt")), "cpt_mapcnt_overflow"),
    ],
)
def test_new_signatures_are_detected(text: str, name: str) -> None:
    found, explanation = mg.detect_panic_signature(text)
    assert found == name
    assert explanation is not None and len(explanation) > 60
    assert mg._signature_kind(found) == NEW[name]


def test_kinds_and_order_in_the_table() -> None:
    table = [(entry[0], entry[1]) for entry in mg._PANIC_SIGNATURES]
    kinds = dict(table)
    for name, kind in NEW.items():
        assert kinds[name] == kind
    order = [name for name, _ in table]
    last_kernel = max(i for i, (_, kind) in enumerate(table) if kind != "process")
    assert all(order.index(n) > last_kernel for n, k in NEW.items() if k == "process")
    # the consequence (refused submissions) never hides the failure that caused it
    assert order.index("submissions_ignored") > order.index("gpu_timeout")
    assert order.index("submissions_ignored") > order.index("impacting_interactivity")
    assert order.index("submissions_ignored") > order.index("metal_oom")


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (GPU_TIMEOUT_TEXT, "gpu_timeout"),
        (IMPACTING_INTERACTIVITY_TEXT, "impacting_interactivity"),
        (COMMAND_BUFFER_OOM_TEXT, "metal_oom"),
    ],
)
def test_the_root_cause_wins_over_refused_submissions(first: str, expected: str) -> None:
    log = "\n".join([first, SUBMISSIONS_IGNORED_TEXT, SUBMISSIONS_IGNORED_TEXT])
    assert mg.detect_panic_signature(log)[0] == expected


def test_explanations_say_what_happened_and_what_to_do() -> None:
    _, watchdog = mg.detect_panic_signature(IMPACTING_INTERACTIVITY_TEXT)
    assert watchdog is not None
    assert "ml-explore/mlx#3267" in watchdog and "display" in watchdog
    assert "did not panic" in watchdog
    _, ignored = mg.detect_panic_signature(SUBMISSIONS_IGNORED_TEXT)
    assert ignored is not None and "Restart the process" in ignored
    _, mapcnt = mg.detect_panic_signature(panic_text(Panic(kind="mapcnt")))
    assert mapcnt is not None and "not the IOGPU driver bug" in mapcnt
    assert ".cpp:" not in mapcnt  # the report names no location: nothing is invented


def test_none_of_them_is_a_metal_out_of_memory() -> None:
    for text in (IMPACTING_INTERACTIVITY_TEXT, GPU_TIMEOUT_TEXT, SUBMISSIONS_IGNORED_TEXT):
        assert mg.detect_panic_signature(text)[0] != "metal_oom"


def test_the_mapcnt_report_is_parsed_as_a_kernel_panic(tmp_path: Path) -> None:
    write_panic(tmp_path, Panic(kind="mapcnt", pid=777, ts=time.time() - 30))
    (record,) = mg.parse_panic_reports(tmp_path)
    assert record["signature"] == "cpt_mapcnt_overflow"
    assert record["pid"] == 777
    assert KINDS["mapcnt"][1] == "cpt_mapcnt_overflow"


def test_the_breaker_counts_iogpu_kernel_panics_only(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    now = time.time()
    for i in range(4):  # four non-IOGPU kernel panics in the window
        write_panic(
            reports, Panic(kind="mapcnt", pid=100 + i, ts=now - 60 * (i + 1)), name=f"m{i}.panic"
        )
    write_panic(reports, Panic(kind="watchdog", pid=200, ts=now - 30), name="w.panic")
    breaker = mg.CircuitBreaker(report_dir=reports, panic_threshold=2)
    breaker.check()  # archived, not counted: no cooldown
    status = breaker.status()
    assert status["archived_panics"] == 5
    assert status["panics_in_window"] == 0 and status["cooling_down"] is False
    write_panic(reports, Panic(kind="492", pid=300, ts=now - 20), name="i1.panic")
    breaker.check()  # one IOGPU panic: still below the threshold of 2
    write_panic(reports, Panic(kind="219", pid=301, ts=now - 10), name="i2.panic")
    with pytest.raises(mg.MLXCooldownActive) as info:
        breaker.check()
    assert info.value.panic_count == 2
