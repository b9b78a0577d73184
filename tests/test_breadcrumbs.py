"""Breadcrumbs section: durable one-line events that survive a kernel panic."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import child_env, holding_lock_in_child, spawn_python, warnings_from

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d) pid=(\d+) (.*)$")


def test_default_path_and_line_format(mg_home: str) -> None:
    mg.metal_guard.breadcrumb("SUBPROC_PRE: org/model")
    path = Path(mg_home) / "breadcrumbs.log"
    (line,) = path.read_text().splitlines()
    match = LINE.match(line)
    assert match is not None, line
    assert int(match.group(2)) == os.getpid()
    assert match.group(3) == "SUBPROC_PRE: org/model"
    assert (path.stat().st_mode & 0o777) == 0o600
    assert (Path(mg_home).stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        ("two\nlines", "two\\nlines"),
        ("cr\rtab\t", "cr\\rtab\\t"),
        ("nul\x00bell\x07", "nul\\x00bell\\x07"),
        ("sep\u2028para\u2029", "sep\\u2028para\\u2029"),
        ("c1\x85", "c1\\x85"),
        ("ünïcödé 模型 ok", "ünïcödé 模型 ok"),
        ("", ""),
    ],
)
def test_one_event_is_one_line(mg_home: str, msg: str, expected: str) -> None:
    mg.metal_guard.breadcrumb(msg)
    lines = (Path(mg_home) / "breadcrumbs.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    match = LINE.match(lines[0])
    assert match is not None and match.group(3) == expected


def test_huge_and_odd_messages_never_raise(mg_home: str) -> None:
    mg.metal_guard.breadcrumb("x" * 1_000_000)
    mg.metal_guard.breadcrumb(12345)  # type: ignore[arg-type]
    mg.metal_guard.breadcrumb(None)  # type: ignore[arg-type]
    mg.metal_guard.breadcrumb("lone surrogate \udc80")
    lines = (Path(mg_home) / "breadcrumbs.log").read_bytes().splitlines()
    assert len(lines) == 4
    assert len(lines[0]) < 5000 and lines[0].endswith(b"more chars]")
    assert lines[1].endswith(b" 12345") and lines[2].endswith(b" None")
    assert lines[3].endswith(b" lone surrogate \\udc80")  # escaped, still valid UTF-8


def test_disabled_by_empty_env_or_none(mg_home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_BREADCRUMB_PATH", "")
    mg.metal_guard.breadcrumb("nothing")
    mg.MetalGuard(breadcrumb_path=None).breadcrumb("nothing")
    assert os.listdir(mg_home) == []


def test_explicit_and_env_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "a" / "crumbs.log"
    guard = mg.MetalGuard(breadcrumb_path=explicit)
    assert guard.breadcrumb_path == str(explicit)
    guard.breadcrumb("x")
    assert explicit.read_text().endswith(" x\n")
    env_path = tmp_path / "env.log"
    monkeypatch.setenv("METALGUARD_BREADCRUMB_PATH", str(env_path))
    mg.metal_guard.breadcrumb("y")
    assert env_path.read_text().endswith(" y\n")
    with pytest.raises(TypeError, match=r"breadcrumb_path must be a str or os\.PathLike"):
        mg.MetalGuard(breadcrumb_path=42)  # type: ignore[arg-type]


def test_unwritable_path_warns_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "is_a_dir"
    folder.mkdir()
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "link.log"
    link.symlink_to(target)
    with caplog.at_level(logging.DEBUG, logger="metal_guard"):
        for path in (folder, link):
            guard = mg.MetalGuard(breadcrumb_path=path)
            for _ in range(3):
                guard.breadcrumb("event")
    warnings = [r.getMessage() for r in warnings_from(caplog)]
    assert len(warnings) == 2  # one per broken path, not one per event
    assert str(folder) in warnings[0] and str(link) in warnings[1]
    assert target.read_text() == "keep"  # nothing written through the symlink


def test_library_breadcrumbs_go_through_the_replaceable_singleton(
    monkeypatch: pytest.MonkeyPatch, mg_home: str
) -> None:
    captured: list[Any] = []

    class Capture:
        def breadcrumb(self, msg: str) -> None:
            captured.append(msg)

    monkeypatch.setattr(mg, "metal_guard", Capture())
    with mg.subprocess_inference_guard("org/m"):
        pass
    assert captured == ["SUBPROC_PRE: org/m", "SUBPROC_POST: org/m"]
    assert not (Path(mg_home) / "breadcrumbs.log").exists()


def test_a_broken_replacement_never_breaks_the_guard(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def breadcrumb(self, msg: str) -> None:
            raise RuntimeError("boom")

    monkeypatch.setattr(mg, "metal_guard", Broken())
    with (
        caplog.at_level(logging.DEBUG, logger="metal_guard"),
        mg.subprocess_inference_guard("org/m"),
    ):
        pass
    # said once, at DEBUG: the application's hook is its own business
    hook_failures = [r for r in caplog.records if "breadcrumb hook failed" in r.getMessage()]
    assert [r.levelno for r in hook_failures] == [logging.DEBUG]
    assert "boom" in hook_failures[0].getMessage()


def test_read_breadcrumbs(mg_home: str) -> None:
    assert mg.read_breadcrumbs() == []
    for i in range(10):
        mg.metal_guard.breadcrumb(f"event {i}")
    tail = mg.read_breadcrumbs(3)
    assert [line.rsplit(" ", 2)[-2:] for line in tail] == [
        ["event", "7"],
        ["event", "8"],
        ["event", "9"],
    ]
    assert len(mg.read_breadcrumbs(100)) == 10
    assert mg.read_breadcrumbs(0) == []
    other = Path(mg_home) / "other.log"
    other.write_text("a\nb\n")
    assert mg.read_breadcrumbs(5, path=other) == ["a", "b"]
    with pytest.raises(TypeError, match="n must be an int"):
        mg.read_breadcrumbs("3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be >= 0"):
        mg.read_breadcrumbs(-1)


WRITER = """
import sys, metal_guard as mg
worker, count = int(sys.argv[1]), int(sys.argv[2])
payload = "p" * 40
for i in range(count):
    mg.metal_guard.breadcrumb(f"W{worker} #{i} {payload}")
"""


def _run_writers(env: dict[str, str], workers: int, count: int) -> None:
    procs = [spawn_python(WRITER, str(w), str(count), env=env) for w in range(workers)]
    assert [p.wait(timeout=300) for p in procs] == [0] * workers


def _check_lines(lines: list[str], workers: int, count: int) -> None:
    seen: dict[int, list[int]] = {w: [] for w in range(workers)}
    for line in lines:
        match = LINE.match(line)
        assert match is not None, line
        worker, number, payload = match.group(3).split(" ")
        assert payload == "p" * 40, line  # intact, not interleaved
        seen[int(worker[1:])].append(int(number[1:]))
    for w in range(workers):
        assert sorted(seen[w]) == list(range(count)), w
        assert seen[w] == sorted(seen[w])  # each writer's own lines stay in order


@pytest.mark.multiprocess
def test_eight_concurrent_writers_never_interleave(mg_home: str) -> None:
    _run_writers(child_env(), 8, 300)
    lines = (Path(mg_home) / "breadcrumbs.log").read_text().splitlines()
    assert len(lines) == 8 * 300
    _check_lines(lines, 8, 300)


@pytest.mark.multiprocess
def test_rotation_at_the_limit_loses_no_acknowledged_line(mg_home: str) -> None:
    limit = 64 * 1024
    env = child_env()
    env["METALGUARD_BREADCRUMB_MAX_BYTES"] = str(limit)
    # About 1.5x the limit in all: exactly one rotation, every line kept.
    _run_writers(env, 8, 140)
    log = Path(mg_home) / "breadcrumbs.log"
    rotated = Path(mg_home) / "breadcrumbs.log.1"
    assert rotated.exists()
    assert rotated.stat().st_size > limit
    assert log.stat().st_size <= limit
    lines = rotated.read_text().splitlines() + log.read_text().splitlines()
    assert len(lines) == 8 * 140
    _check_lines(sorted(lines, key=lambda s: s.split(" ")[0]), 8, 140)
    assert len(mg.read_breadcrumbs(8 * 140)) == 8 * 140  # the reader spans both files


def test_rotation_keeps_one_generation(mg_home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_BREADCRUMB_MAX_BYTES", "4096")
    for i in range(400):
        mg.metal_guard.breadcrumb(f"event {i:04d} " + "z" * 50)
    names = sorted(os.listdir(mg_home))
    # (the live file may be absent for a moment: the last write can be the one that rotated)
    assert "breadcrumbs.log.1" in names
    assert set(names) <= {"breadcrumbs.log", "breadcrumbs.log.1", "breadcrumbs.log.lock"}
    total = sum((Path(mg_home) / n).stat().st_size for n in names)
    assert total <= 2 * 4096 + 200  # bounded
    assert mg.read_breadcrumbs(1)[0].split(" ")[3] == "0399"


@pytest.mark.multiprocess
def test_a_busy_rotation_lock_never_holds_up_a_breadcrumb(
    mg_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METALGUARD_BREADCRUMB_MAX_BYTES", "4096")
    log = Path(mg_home) / "breadcrumbs.log"
    with holding_lock_in_child(str(log) + ".lock"):
        for i in range(100):  # well past the limit while another process "rotates"
            mg.metal_guard.breadcrumb(f"event {i:03d} " + "y" * 60)
        # every line landed in the live file; rotation was skipped, not waited for
        assert len(log.read_text().splitlines()) == 100
        assert not (Path(mg_home) / "breadcrumbs.log.1").exists()
    mg.metal_guard.breadcrumb("after")  # the lock is free again: this one rotates
    assert (Path(mg_home) / "breadcrumbs.log.1").exists()
    assert mg.read_breadcrumbs(1)[0].endswith(" after")
