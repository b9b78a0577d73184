"""Section 3.9: ``format_panic_for_apple_feedback``.

The "What MetalGuard observed" section must reflect the ``guards`` entry of the input
and nothing else (the original asserted a fixed list of active guards).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from panic_fixtures import Panic, write_panic

SECTIONS = [
    "**PANIC STRING:**",
    "**TIME:**",
    "## System",
    "## Reproducer",
    "## Active advisories at panic time",
    "## Breadcrumb tail (last 3 lines)",
    "## What MetalGuard observed",
    "## Related upstream issues",
]
GUARD_NAMES = [
    "subprocess_inference_guard",
    "gemma4_generation_flush",
    "CadenceGuard",
    "CircuitBreaker",
    "limit_wired_memory",
    "require_cadence_clear",
]


def full() -> dict[str, Any]:
    return {
        "panic_string": '"completeMemory() prepare count underflow" @IOGPUMemory.cpp:550',
        "panic_time": "2026-04-24 03:14:07 +0800",
        "hardware": {"chip": "Apple M1 Ultra", "gpu_memory_gb": 64.0},
        "gpu_driver": "130.13",
        "os_version": "macOS 26.4.1 (25E253)",
        "kernel_version": "Darwin Kernel Version 25.4.0",
        "mlx_versions": {"mlx-lm": "0.31.2", "mlx": "0.31.2"},
        "repro_steps": ["Load gemma-4-31b-it-8bit", "Generate 4k tokens twice"],
        "breadcrumbs": ["one", "two", "three", "four", "five"],
        "advisories": mg.check_version_advisories(packages={"mlx": "0.31.2"})[:1],
        "guards": {"subprocess_inference_guard": True, "CadenceGuard": False},
    }


def test_every_section_in_order() -> None:
    text = mg.format_panic_for_apple_feedback(full(), max_breadcrumb_lines=3)
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert (
        '**PANIC STRING:** `"completeMemory() prepare count underflow" @IOGPUMemory.cpp:550`'
        in text
    )
    assert "**TIME:** 2026-04-24 03:14:07 +0800" in text
    assert "- Hardware: Apple M1 Ultra (64.0 GB GPU memory)" in text
    assert "- macOS: macOS 26.4.1 (25E253)" in text
    assert "- IOGPUFamily kext: 130.13" in text
    assert "- MLX stack: mlx 0.31.2, mlx-lm 0.31.2" in text  # sorted by name
    assert "1. Load gemma-4-31b-it-8bit\n2. Generate 4k tokens twice" in text
    assert (
        "- [high] mlx 0.31.2 — MLX 0.31.2 and earlier: high-severity defect "
        "(https://github.com/ml-explore/mlx/issues/3350)"
    ) in text
    assert "```\nthree\nfour\nfive\n```" in text and "two" not in text.split("## Breadcrumb")[1]
    # the original's list of related public issues, its words first, then the link
    assert text.endswith(
        "## Related upstream issues\n\n"
        "- mlx#3186 (canonical IOGPUFamily panic) — https://github.com/ml-explore/mlx/issues/3186\n"
        "- mlx#3348 (CommandEncoder thread-local) — https://github.com/ml-explore/mlx/pull/3348\n"
        "- mlx#3346 (merged into #3186) — https://github.com/ml-explore/mlx/issues/3346\n"
        "- mlx-lm#1047 (wired_limit correlation) — "
        "https://github.com/ml-explore/mlx-lm/issues/1047\n"
    )


def test_the_active_section_reflects_the_input_only() -> None:
    text = mg.format_panic_for_apple_feedback(full())
    observed = text.split("## What MetalGuard observed")[1].split("## Related")[0]
    assert "- subprocess_inference_guard: active" in observed
    assert "- CadenceGuard: not active" in observed
    for name in set(GUARD_NAMES) - {"subprocess_inference_guard", "CadenceGuard"}:
        assert name not in text
    listed = mg.format_panic_for_apple_feedback(
        {"guards": ["CircuitBreaker", "limit_wired_memory"]}
    )
    observed = listed.split("## What MetalGuard observed")[1].split("## Related")[0]
    assert "- CircuitBreaker\n- limit_wired_memory" in observed
    assert "subprocess_inference_guard" not in listed
    states = mg.format_panic_for_apple_feedback({"guards": {"wired limit": "cap:24"}})
    assert "- wired limit: cap:24" in states


def test_without_guards_no_claim_is_made() -> None:
    text = mg.format_panic_for_apple_feedback({})
    observed = text.split("## What MetalGuard observed")[1].split("## Related")[0]
    assert "makes no claim" in observed
    for name in GUARD_NAMES:
        assert name not in text
    assert observed.strip() == (
        "The forensics do not say which metal-guard defences were active (no `guards` "
        "entry), so this report makes no claim about them."
    )
    empty = mg.format_panic_for_apple_feedback({"guards": {}})
    assert "list no active metal-guard defences" in empty


def test_missing_facts_read_unknown() -> None:
    text = mg.format_panic_for_apple_feedback({})
    assert "**PANIC STRING:** `unknown`" in text
    assert "**TIME:** unknown" in text
    assert "- Hardware: unknown (? GB GPU memory)" in text
    assert "- MLX stack: unknown" in text
    assert "_Steps to reproduce" in text
    assert "## Active advisories" not in text and "## Breadcrumb tail" not in text


def test_breadcrumb_options() -> None:
    crumbs = {"breadcrumbs": [f"line {i}" for i in range(100)]}
    assert "## Breadcrumb tail (last 60 lines)" in mg.format_panic_for_apple_feedback(crumbs)
    assert "## Breadcrumb" not in mg.format_panic_for_apple_feedback(
        crumbs, include_breadcrumb=False
    )
    assert "## Breadcrumb" not in mg.format_panic_for_apple_feedback(crumbs, max_breadcrumb_lines=0)
    few = mg.format_panic_for_apple_feedback(crumbs, max_breadcrumb_lines=2)
    assert "```\nline 98\nline 99\n```" in few


def test_backticks_and_control_characters_cannot_break_the_markdown() -> None:
    text = mg.format_panic_for_apple_feedback(
        {"panic_string": "a `tick` and ```fence```", "breadcrumbs": ["```", "x\ny"]}
    )
    # a code span longer than any backtick run inside, padded because the text ends in one
    assert text.splitlines()[0] == "**PANIC STRING:** ```` a `tick` and ```fence``` ````"
    plain = mg.format_panic_for_apple_feedback({"panic_string": "x `y` z"})
    assert plain.splitlines()[0] == "**PANIC STRING:** ``x `y` z``"
    tail = text.split("## Breadcrumb tail (last 2 lines)\n\n")[1]
    assert tail.startswith("````\n```\nx\\ny\n````\n")  # fence longer; newline escaped


def test_epoch_panic_time_is_shown_in_local_time() -> None:
    ts = 1_776_900_000.0
    text = mg.format_panic_for_apple_feedback({"panic_time": ts})
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts))
    assert f"**TIME:** {expected}" in text


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="forensics must be a dict"):
        mg.format_panic_for_apple_feedback(["panic"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_breadcrumb_lines must be >= 0"):
        mg.format_panic_for_apple_feedback({}, max_breadcrumb_lines=-1)
    with pytest.raises(TypeError):
        mg.format_panic_for_apple_feedback({}, max_breadcrumb_lines=2.5)  # type: ignore[arg-type]
    odd = mg.format_panic_for_apple_feedback(
        {"hardware": "M2", "mlx_versions": ["mlx"], "repro_steps": "run", "advisories": [1, None]}
    )
    assert "- Hardware: unknown" in odd and "- [?] ? ? — 1 (no link)" in odd


def test_from_a_parsed_report(tmp_path: Path) -> None:
    """The facts a caller has after a panic: the parsed report, advisories, breadcrumbs."""
    write_panic(tmp_path, Panic(kind="550", os_build="25E253", iogpu_version="130.13"))
    (record,) = mg.parse_panic_reports(tmp_path)
    mg.metal_guard.breadcrumb("SUBPROC_PRE: org/model")
    text = mg.format_panic_for_apple_feedback(
        {
            "panic_string": record["panic_line"],
            "panic_time": record["ts"],
            "gpu_driver": record["iogpu_version"],
            "os_version": record["os_version"],
            "kernel_version": record["kernel_version"],
            "breadcrumbs": mg.read_breadcrumbs(10),
            "guards": ["subprocess_inference_guard"],
        }
    )
    assert "IOGPUMemory.cpp:550" in text.splitlines()[0]
    assert "- IOGPUFamily kext: 130.13" in text and "25E253" in text
    assert "SUBPROC_PRE: org/model" in text
