"""Panic reports section: signatures, report parsing and the panic archive."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import spawn_python, spy_file_locks, spy_report_reads
from panic_fixtures import (
    COMMAND_BUFFER_OOM_TEXT,
    KINDS,
    RESOURCE_LIMIT_TEXT,
    Panic,
    panic_text,
    write_binary,
    write_legacy,
    write_non_panic_ips,
    write_panic,
    write_truncated,
)

T0 = 1_776_900_000.0  # 2026-04-22, a fixed "panic time" for records

# -- detect_panic_signature ------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k in KINDS if KINDS[k][1] is not None])
def test_detect_names_every_fixture_kind_and_its_location(kind: str) -> None:
    text = panic_text(Panic(kind=kind))
    name, explanation = mg.detect_panic_signature(text)
    assert name == KINDS[kind][1]
    assert explanation is not None
    location = KINDS[kind][2]
    if location is not None:
        assert location in explanation
    else:
        assert ".cpp:" not in explanation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '"completeMemory() prepare count underflow" @IOGPUMemory.cpp:492',
            "prepare_count_underflow",
        ),
        (
            '"completeMemory() prepare count underflow" @IOGPUMemory.cpp:550',
            "prepare_count_underflow",
        ),
        ("prepare count underflow @IOGPUMemory.cpp:9999", "prepare_count_underflow"),
        ("fPendingMemorySet", "pending_memory_set"),
        ("something @IOGPUGroupMemory.cpp:219", "pending_memory_set"),
        ("remove_memory_object() failed @IOGPUGroupMemory.cpp:323", "remove_memory_object"),
        ("@IOGPUGroupMemory.cpp:323", "remove_memory_object"),
        ("@IOGPUGroupMemory.cpp:528", "pending_in_non_pending_hash"),
        ("IOGPU ctxstore timeout on channel 3", "ctxstore_timeout"),
        ("AGX: CtxStore save timed out", "ctxstore_timeout"),
        ("watchdog timeout: no checkins from watchdogd in 90 seconds", "gpu_watchdog"),
        ("kIOGPUCommandBufferCallbackErrorOutOfMemory", "metal_oom"),
        ("Command buffer execution failed: Insufficient Memory", "metal_oom"),
        (COMMAND_BUFFER_OOM_TEXT, "metal_oom"),
        (RESOURCE_LIMIT_TEXT, "resource_limit"),
        ("[metal::malloc] Resource limit (499000) exceeded.", "resource_limit"),
    ],
)
def test_detect_table(text: str, expected: str) -> None:
    assert mg.detect_panic_signature(text)[0] == expected


def test_detect_matches_across_line_breaks_and_case() -> None:
    assert mg.detect_panic_signature("PREPARE COUNT\n   underflow")[0] == "prepare_count_underflow"
    assert mg.detect_panic_signature("watchdog timeout:\nno checkins\nfrom watchdogd")[0] == (
        "gpu_watchdog"
    )
    assert mg.detect_panic_signature("Resource limit\n(499000)\nexceeded")[0] == "resource_limit"
    assert mg.detect_panic_signature("Insufficient\r\nMemory")[0] == "metal_oom"


KERNEL_TEXTS = {
    "prepare_count_underflow": "completeMemory() prepare count underflow @IOGPUMemory.cpp:550",
    "pending_memory_set": "fPendingMemorySet is not empty @IOGPUGroupMemory.cpp:219",
    "remove_memory_object": "remove_memory_object(): memory not in group",
    "pending_in_non_pending_hash": "pending in non-pending hash @IOGPUGroupMemory.cpp:528",
    "ctxstore_timeout": "IOGPU ctxstore timeout on channel 3",
    "gpu_watchdog": "watchdog timeout: no checkins from watchdogd in 90 seconds",
}


@pytest.mark.parametrize("kernel", list(KERNEL_TEXTS))
@pytest.mark.parametrize(
    "process_text", [COMMAND_BUFFER_OOM_TEXT, RESOURCE_LIMIT_TEXT], ids=["metal_oom", "limit"]
)
def test_kernel_signatures_win_over_process_level_ones(kernel: str, process_text: str) -> None:
    text = process_text + "\n" + KERNEL_TEXTS[kernel]
    assert mg.detect_panic_signature(text)[0] == kernel


@pytest.mark.parametrize(
    ("message", "signature", "kernel_panic", "iogpu_panic"),
    [
        (KERNEL_TEXTS["prepare_count_underflow"], "prepare_count_underflow", True, True),
        (KERNEL_TEXTS["pending_memory_set"], "pending_memory_set", True, True),
        (KERNEL_TEXTS["remove_memory_object"], "remove_memory_object", True, True),
        (KERNEL_TEXTS["pending_in_non_pending_hash"], "pending_in_non_pending_hash", True, True),
        (KERNEL_TEXTS["ctxstore_timeout"], "ctxstore_timeout", True, True),
        (KERNEL_TEXTS["gpu_watchdog"], "gpu_watchdog", True, False),
        ('"AppleSomeDriver: unexpected state" @AppleSomeDriver.cpp:77', None, True, False),
        (COMMAND_BUFFER_OOM_TEXT, "metal_oom", False, False),
        (RESOURCE_LIMIT_TEXT, "resource_limit", False, False),
    ],
    ids=[*KERNEL_TEXTS, "unknown", "metal_oom", "resource_limit"],
)
def test_which_reports_are_kernel_and_iogpu_panics(
    tmp_path: Path, message: str, signature: str | None, kernel_panic: bool, iogpu_panic: bool
) -> None:
    # Only IOGPU driver panics are what the circuit breaker counts.
    (tmp_path / "r.panic").write_text(f"panic(cpu 0 caller 0x1): {message}\n")
    (record,) = mg.parse_panic_reports(tmp_path)
    assert (record["signature"], record["kernel_panic"], record["iogpu_panic"]) == (
        signature,
        kernel_panic,
        iogpu_panic,
    )


def test_explanation_names_the_location_and_what_to_do() -> None:
    _, explanation = mg.detect_panic_signature(panic_text(Panic(kind="492")))
    assert explanation is not None
    assert "IOGPUMemory.cpp:492" in explanation
    assert "subprocess_inference_guard" in explanation
    _, bare = mg.detect_panic_signature("fPendingMemorySet")
    assert bare is not None and ".cpp:" not in bare  # nothing invented
    _, watchdog = mg.detect_panic_signature("watchdog timeout: no checkins from watchdogd")
    assert watchdog is not None and "not the IOGPU" in watchdog


@pytest.mark.parametrize(
    "value",
    [None, b"fPendingMemorySet", 123, 4.5, ["fPendingMemorySet"], object(), "", "   ", "hello"],
)
def test_detect_bad_or_unknown_input(value: object) -> None:
    assert mg.detect_panic_signature(value) == (None, None)


def test_detect_huge_strings() -> None:
    filler = "x" * (8 << 20)
    assert mg.detect_panic_signature(filler + " fPendingMemorySet")[0] == "pending_memory_set"
    assert mg.detect_panic_signature(filler) == (None, None)
    assert mg.detect_panic_signature("ctxstore" + " " * 100_000 + "timeout") == (None, None)


# -- parse_panic_reports: fields --------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_parse_every_field(tmp_path: Path, kind: str) -> None:
    p = Panic(kind=kind, ts=T0 + 0.375, pid=4242, process="python3.12", os_build="24F74")
    path = write_panic(tmp_path, p)
    (record,) = mg.parse_panic_reports(tmp_path)
    assert record["ts"] == pytest.approx(T0 + 0.375, abs=1e-6)
    assert record["signature"] == p.signature
    assert record["pid"] == 4242
    assert record["process"] == "python3.12"
    assert record["os_build"] == "24F74"
    assert record["os_version"] == "macOS 15.5 (24F74)"
    assert record["iogpu_version"] == "130.13"
    assert record["source_file"] == str(path)
    assert record["chip"] == "T6020"
    assert record["incident_id"] == p.incident_id
    assert record["kernel_version"].endswith("RELEASE_ARM64_T6020")
    assert record["panic_line"].startswith("panic(cpu 4 caller 0x")
    assert record["location"] == p.location
    assert record["kernel_panic"] is True
    assert record["iogpu_panic"] is (kind not in ("watchdog", "unknown", "mapcnt"))
    if p.signature is None:
        assert record["explanation"] is None
    else:
        assert record["explanation"] == mg.detect_panic_signature(panic_text(p))[1]
    json.dumps(record)  # archivable as is


def test_parse_macos26_report(tmp_path: Path) -> None:
    write_panic(tmp_path, Panic(kind="550", os_build="25E253", chip="T8132", iogpu_version="131.2"))
    (record,) = mg.parse_panic_reports(tmp_path)
    assert record["signature"] == "prepare_count_underflow"
    assert "IOGPUMemory.cpp:550" in record["explanation"]
    assert record["os_build"] == "25E253"
    assert record["os_version"] == "macOS 26.4.1 (25E253)"
    assert record["chip"] == "T8132"
    assert record["iogpu_version"] == "131.2"


def test_parse_names_retired_and_sorting(tmp_path: Path) -> None:
    write_panic(tmp_path, Panic(ts=T0 + 300, pid=3), name="panic-base-2026-04-22-100500.panic")
    write_panic(tmp_path, Panic(ts=T0 + 100, pid=1), name="panic-full-2026-04-22-100100")
    write_panic(tmp_path, Panic(ts=T0 + 200, pid=2), name="Kernel-2026-04-22.panic", retired=True)
    write_panic(tmp_path, Panic(ts=T0 + 400, pid=4), name="panic-full-2026.ips")
    write_panic(tmp_path, Panic(ts=T0 + 500, pid=5), name="notes.txt")  # not a report name
    records = mg.parse_panic_reports(tmp_path)
    assert [r["pid"] for r in records] == [1, 2, 3, 4]
    assert records[1]["source_file"] == str(tmp_path / "Retired" / "Kernel-2026-04-22.panic")
    assert [r["ts"] for r in records] == sorted(r["ts"] for r in records)


def test_since_ts(tmp_path: Path) -> None:
    for i in range(5):
        write_panic(tmp_path, Panic(ts=T0 + i * 1000, pid=i), name=f"p{i}.panic")
    assert [r["pid"] for r in mg.parse_panic_reports(tmp_path, since_ts=T0 + 2000)] == [2, 3, 4]
    assert mg.parse_panic_reports(tmp_path, since_ts=T0 + 10**6) == []
    assert len(mg.parse_panic_reports(tmp_path, since_ts=0)) == 5


def test_timestamp_fallbacks(tmp_path: Path) -> None:
    # No Epoch block: the header timestamp (local time with offset) is used.
    p = Panic(ts=T0 + 0.5)
    path = write_panic(tmp_path, p, name="a.panic")
    raw = path.read_text().replace("Epoch Time:", "Epoch-less:")
    path.write_text(raw)
    (record,) = mg.parse_panic_reports(tmp_path)
    assert record["ts"] == pytest.approx(T0 + 0.5, abs=0.02)
    # Nothing at all: the file's modification time.
    path.write_text("panic(cpu 0 caller 0x1): fPendingMemorySet\n")
    os.utime(path, (T0 - 50, T0 - 50))
    (record,) = mg.parse_panic_reports(tmp_path)
    assert record["ts"] == T0 - 50
    assert record["signature"] == "pending_memory_set"


def test_truncated_body_uses_the_regex_fallback(tmp_path: Path) -> None:
    write_truncated(tmp_path, Panic(kind="550", ts=T0 + 7.5, pid=777, os_build="25E253"))
    (record,) = mg.parse_panic_reports(tmp_path)
    assert record["signature"] == "prepare_count_underflow"
    assert record["location"] == "IOGPUMemory.cpp:550"
    assert record["ts"] == pytest.approx(T0 + 7.5, abs=1e-6)
    assert (record["pid"], record["process"], record["os_build"]) == (777, "python3.12", "25E253")
    assert record["iogpu_version"] == "130.13"


def test_legacy_plain_text_report(tmp_path: Path) -> None:
    write_legacy(tmp_path, Panic(kind="492", ts=T0, process="Python", os_build="20G95"))
    (record,) = mg.parse_panic_reports(tmp_path)
    assert record["signature"] == "prepare_count_underflow"
    assert record["ts"] == T0
    assert record["process"] == "Python"
    assert record["pid"] is None
    assert record["os_build"] == "20G95"
    assert record["iogpu_version"] == "130.13"
    assert record["chip"] == "T6020"


def test_non_panic_files_are_ignored(tmp_path: Path) -> None:
    write_non_panic_ips(tmp_path)
    write_binary(tmp_path)
    write_binary(tmp_path, name="x.ips")
    (tmp_path / "empty.panic").write_bytes(b"")
    (tmp_path / "header-only.ips").write_text('{"bug_type":"288"}\n')
    (tmp_path / "other.panic").write_text(
        '{"bug_type":"151"}\n{"panicString":"fPendingMemorySet"}\n'
    )
    (tmp_path / "noheader.ips").write_text(panic_text(Panic()))  # .ips needs bug_type 210
    (tmp_path / "json-list.panic").write_text("[1, 2, 3]\n")
    (tmp_path / ".hidden.panic").write_bytes(write_panic(tmp_path / "sub", Panic()).read_bytes())
    assert mg.parse_panic_reports(tmp_path) == []


def test_macos_panic_string_of_intel_t2_reports(tmp_path: Path) -> None:
    header = {"bug_type": "210", "timestamp": "2026-04-22 10:00:00.00 +0000"}
    body = {
        "panicString": "panic(cpu 0 caller 0x1): bridgeOS watchdog note\n",
        "macOSPanicString": panic_text(Panic(kind="528", pid=31, ts=T0)),
    }
    (tmp_path / "t2.panic").write_text(json.dumps(header) + "\n" + json.dumps(body))
    (one_doc := tmp_path / "one.ips").write_text(json.dumps({**header, **body}, indent=1))
    records = mg.parse_panic_reports(tmp_path)
    assert [(r["signature"], r["pid"]) for r in records] == [
        ("pending_in_non_pending_hash", 31)
    ] * 2
    assert {r["source_file"] for r in records} == {str(tmp_path / "t2.panic"), str(one_doc)}


def test_ips_with_bug_type_210_counts(tmp_path: Path) -> None:
    write_panic(tmp_path, Panic(kind="219"), name="panic-full-x.ips")
    # header longer than the first probe read
    big = Panic(kind="323", ts=T0 + 5, pid=5, header_extra={"pad": "x" * 10_000})
    write_panic(tmp_path, big, name="long-header.ips")
    assert [r["signature"] for r in mg.parse_panic_reports(tmp_path)] == [
        "pending_memory_set",
        "remove_memory_object",
    ]


def test_single_document_and_non_utf8_reports(tmp_path: Path) -> None:
    p = Panic(kind="528", ts=T0 + 1, pid=9)
    one_doc = {"bug_type": "210", "panicString": panic_text(p)}
    (tmp_path / "one.panic").write_text(json.dumps(one_doc, indent=2))
    raw = write_panic(
        tmp_path, Panic(kind="219", ts=T0 + 2, pid=10), name="bytes.panic"
    ).read_bytes()
    raw = raw.replace(b"Debugger message: panic", b"Debugger message: \xff\xfe\xc3(panic")
    (tmp_path / "bytes.panic").write_bytes(raw)  # body JSON now invalid UTF-8 → fallback
    records = mg.parse_panic_reports(tmp_path)
    assert [(r["pid"], r["signature"]) for r in records] == [
        (9, "pending_in_non_pending_hash"),
        (10, "pending_memory_set"),
    ]


def test_huge_file_reads_a_bounded_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_panic(tmp_path, Panic(kind="492"))
    with path.open("ab") as f:
        f.write(b"\n" + b"z" * (12 << 20))
    reads = spy_report_reads(monkeypatch)
    (record,) = mg.parse_panic_reports(tmp_path)
    assert record["signature"] == "prepare_count_underflow"
    assert reads and max(limit for _, limit in reads) <= 4 << 20


def test_unreadable_and_odd_entries_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write_panic(tmp_path, Panic(pid=1, ts=T0), name="good.panic")
    bad = write_panic(tmp_path, Panic(pid=2, ts=T0 + 1), name="bad.panic")
    (tmp_path / "dir.panic").mkdir()
    os.mkfifo(tmp_path / "fifo.panic")
    denied = True
    spy_report_reads(monkeypatch, deny=lambda path: denied and path == str(bad))
    assert [r["source_file"] for r in mg.parse_panic_reports(tmp_path)] == [str(good)]
    denied = False
    # not cached as "no panic": once readable, it is found
    assert len(mg.parse_panic_reports(tmp_path)) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_file(tmp_path: Path) -> None:
    path = write_panic(tmp_path, Panic())
    path.chmod(0)
    try:
        assert mg.parse_panic_reports(tmp_path) == []
    finally:
        path.chmod(0o600)


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    target = write_panic(outside, Panic(pid=1), name="real.panic")
    retired_target = write_panic(tmp_path / "elsewhere", Panic(pid=2), name="r.panic").parent
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "link.panic").symlink_to(target)
    (reports / "Retired").symlink_to(retired_target, target_is_directory=True)
    (reports / "dangling.panic").symlink_to(tmp_path / "nowhere")
    assert mg.parse_panic_reports(reports) == []


def test_missing_folder_or_file_in_its_place(tmp_path: Path) -> None:
    assert mg.parse_panic_reports(tmp_path / "missing") == []
    (tmp_path / "file").write_text("x")
    assert mg.parse_panic_reports(tmp_path / "file") == []
    assert mg.parse_panic_reports(os.fspath(tmp_path)) == []


def test_default_folder_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_panic(tmp_path, Panic())
    monkeypatch.setenv("METALGUARD_PANIC_REPORT_DIR", str(tmp_path))
    assert len(mg.parse_panic_reports()) == 1
    monkeypatch.setenv("METALGUARD_PANIC_REPORT_DIR", "")  # bad value → the system folder
    assert mg._report_dir(None) == "/Library/Logs/DiagnosticReports"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"directory": 123}, TypeError, "directory must be a str or os.PathLike"),
        ({"directory": b"/tmp"}, TypeError, "directory must be a str or os.PathLike"),
        ({"directory": ""}, ValueError, "directory must be a non-empty path"),
        ({"directory": "a\x00b"}, ValueError, "without NUL characters"),
        ({"since_ts": "yesterday"}, TypeError, "since_ts must be a number"),
        ({"since_ts": True}, TypeError, "since_ts must be a number"),
        ({"since_ts": math.nan}, ValueError, "since_ts must be a finite number"),
        ({"since_ts": math.inf}, ValueError, "since_ts must be a finite number"),
    ],
)
def test_parse_bad_arguments(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        mg.parse_panic_reports(**kwargs)
    assert message in str(info.value)


# -- parse_panic_reports: the re-scan cache ----------------------------------------


def test_rescan_reads_only_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [write_panic(tmp_path, Panic(pid=i, ts=T0 + i), name=f"p{i}.panic") for i in range(6)]
    write_non_panic_ips(tmp_path)
    write_binary(tmp_path)
    log = spy_report_reads(monkeypatch)
    first = mg.parse_panic_reports(tmp_path)
    assert len(first) == 6 and len(log) == 8
    log.clear()
    assert mg.parse_panic_reports(tmp_path) == first
    assert [
        path for path, _ in log
    ] == []  # unchanged files (and known non-panics) are not read again
    # a new modification time → read again (same size)
    st = paths[2].stat()
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    mg.parse_panic_reports(tmp_path)
    assert [path for path, _ in log] == [str(paths[2])]
    log.clear()
    # a new size → read again, and the new content is seen
    write_panic(tmp_path, Panic(kind="watchdog", pid=3, ts=T0 + 3), name="p3.panic")
    records = mg.parse_panic_reports(tmp_path)
    assert [path for path, _ in log] == [str(paths[3])]
    assert records[3]["signature"] == "gpu_watchdog"
    log.clear()
    # a new file → only it is read
    write_panic(tmp_path, Panic(pid=99, ts=T0 + 99), name="new.panic")
    assert len(mg.parse_panic_reports(tmp_path)) == 7
    assert [path for path, _ in log] == [str(tmp_path / "new.panic")]


def test_threads_scanning_at_once(tmp_path: Path) -> None:
    import threading

    for i in range(30):
        write_panic(
            tmp_path, Panic(pid=i, ts=T0 + i, kind=list(KINDS)[i % len(KINDS)]), name=f"{i}.panic"
        )
    results: list[list[dict[str, Any]]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def scan() -> None:
        try:
            barrier.wait()
            for _ in range(5):
                results.append(mg.parse_panic_reports(tmp_path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=scan) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 40 and all(r == results[0] for r in results)
    assert [r["pid"] for r in results[0]] == list(range(30))


def test_returned_records_are_copies(tmp_path: Path) -> None:
    write_panic(tmp_path, Panic())
    (record,) = mg.parse_panic_reports(tmp_path)
    record["signature"] = "tampered"
    assert mg.parse_panic_reports(tmp_path)[0]["signature"] == "prepare_count_underflow"


# -- ingest_panics_jsonl and the archive -------------------------------------------


def _archive_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_ingest_appends_once(tmp_path: Path, mg_home: str) -> None:
    reports = tmp_path / "reports"
    for i, kind in enumerate(["492", "550", "watchdog"]):
        write_panic(reports, Panic(kind=kind, pid=i, ts=time.time() - 600 + i), name=f"{i}.panic")
    assert mg.ingest_panics_jsonl(report_dir=reports) == 3
    archive = Path(mg_home) / "panics.jsonl"
    lines = _archive_lines(archive)
    assert [r["pid"] for r in lines] == [0, 1, 2]
    assert {r["source_file"] for r in lines} == {str(reports / f"{i}.panic") for i in range(3)}
    assert mg.ingest_panics_jsonl(report_dir=reports) == 0
    assert len(_archive_lines(archive)) == 3
    assert (archive.stat().st_mode & 0o777) == 0o600
    assert mg.read_panic_archive() == lines


def test_ingest_dedupes_copies_by_second_and_pid(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    second = int(time.time()) - 100
    p = Panic(pid=500, ts=second + 0.2)
    write_panic(reports, p, name="panic-full-a.panic")
    write_panic(reports, Panic(pid=500, ts=second + 0.7), name="panic-base-a.panic")  # same second
    write_panic(reports, p, name="moved.panic", retired=True)
    archive = tmp_path / "a.jsonl"
    assert mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=archive) == 1
    # the file moves to Retired/ later: still the same panic
    write_panic(reports, p, name="panic-full-b.panic", retired=True)
    assert mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=archive) == 0
    # another pid in the same second is another panic
    write_panic(reports, Panic(pid=501, ts=second + 0.2), name="other.panic")
    assert mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=archive) == 1
    assert len(_archive_lines(archive)) == 2


def test_ingest_without_reports_creates_nothing(tmp_path: Path, mg_home: str) -> None:
    assert mg.ingest_panics_jsonl(report_dir=tmp_path / "missing") == 0
    assert mg.ingest_panics_jsonl(report_dir=tmp_path) == 0
    assert os.listdir(mg_home) == []


def test_ingest_tolerates_corrupt_lines_and_a_torn_tail(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    now = time.time()
    archive = tmp_path / "a.jsonl"
    valid = {
        "ts": now - 50,
        "pid": 1,
        "source_file": "/old/1.panic",
        "signature": "pending_memory_set",
    }
    archive.write_text(
        "garbage line\n"
        + json.dumps(valid)
        + "\n[1, 2]\n"
        + '{"ts": "not a number"}\n{"ts": NaN}\n\n'
        + '{"ts": 1e400}\n'
        + '{"ts": '  # a torn last line (no newline)
    )
    write_panic(reports, Panic(pid=2, ts=now - 10))
    assert mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=archive) == 1
    records = mg.read_panic_archive(archive)
    assert [r["pid"] for r in records] == [1, 2]
    assert records[0] == {**valid, "ts": float(valid["ts"])}
    text = archive.read_text()
    assert text.endswith("\n") and "garbage line" in text  # nothing rewritten, nothing lost


def test_archive_is_bounded_by_count(tmp_path: Path) -> None:
    now = time.time()
    archive = tmp_path / "a.jsonl"
    old = [{"ts": now - 10_000 + i, "pid": i, "source_file": f"/x/{i}"} for i in range(1000)]
    archive.write_text("".join(json.dumps(r) + "\n" for r in old))
    reports = tmp_path / "reports"
    for i in range(5):
        write_panic(reports, Panic(pid=5000 + i, ts=now - 100 + i), name=f"{i}.panic")
    assert mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=archive) == 5
    records = mg.read_panic_archive(archive)
    assert len(records) == 1000
    assert records[0]["pid"] == 5  # the five oldest went
    assert [r["pid"] for r in records[-5:]] == [5000, 5001, 5002, 5003, 5004]
    assert len(archive.read_text().splitlines()) == 1000


def test_archive_keeps_old_records_and_is_capped_by_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    archive = tmp_path / "a.jsonl"
    stale = {"ts": now - 400 * 86400, "pid": 1, "source_file": "/x/stale"}
    archive.write_text(json.dumps(stale) + "\n")
    reports = tmp_path / "reports"
    write_panic(reports, Panic(pid=2, ts=now - 60), name="new.panic")
    write_panic(reports, Panic(pid=3, ts=now - 190 * 86400), name="ancient.panic")
    assert mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=archive) == 2
    # a record is never dropped for its age: the archive is the user's history
    assert [r["pid"] for r in mg.read_panic_archive(archive)] == [1, 3, 2]
    before = archive.stat()
    mg._reset_panic_caches()  # even without this process's memo: no rewrite, no re-add
    assert mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=archive) == 0
    after = archive.stat()
    assert (before.st_ino, before.st_size, before.st_mtime_ns) == (
        after.st_ino,
        after.st_size,
        after.st_mtime_ns,
    )
    # past the count cap the oldest go first
    monkeypatch.setattr(mg, "_PANIC_ARCHIVE_MAX_RECORDS", 2)
    write_panic(reports, Panic(pid=4, ts=now - 30), name="newer.panic")
    assert mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=archive) == 1
    assert [r["pid"] for r in mg.read_panic_archive(archive)] == [2, 4]


def test_ingest_sees_other_writers(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    archive = tmp_path / "a.jsonl"
    now = time.time()
    write_panic(reports, Panic(pid=1, ts=now - 30), name="1.panic")
    assert mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=archive) == 1
    archive.write_text("")  # another tool truncated the archive
    assert mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=archive) == 1


def test_read_panic_archive_bad_input(tmp_path: Path) -> None:
    assert mg.read_panic_archive(tmp_path / "missing.jsonl") == []
    (tmp_path / "dir.jsonl").mkdir()
    assert mg.read_panic_archive(tmp_path / "dir.jsonl") == []
    (tmp_path / "bin.jsonl").write_bytes(os.urandom(4096))
    assert mg.read_panic_archive(tmp_path / "bin.jsonl") == []
    with pytest.raises(TypeError, match=r"jsonl_path must be a str or os\.PathLike"):
        mg.read_panic_archive(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="jsonl_path must be a non-empty path"):
        mg.read_panic_archive("")


def test_ingest_refuses_unusable_archives(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    write_panic(reports, Panic(ts=time.time() - 5))
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(IsADirectoryError):
        mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=tmp_path / "dir.jsonl")
    target = tmp_path / "target.jsonl"
    target.write_text("")
    (tmp_path / "link.jsonl").symlink_to(target)
    with pytest.raises(OSError) as info:
        mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=tmp_path / "link.jsonl")
    assert info.value.errno == errno.ELOOP
    assert target.read_text() == ""  # never written through a symlink
    with pytest.raises(TypeError, match=r"jsonl_path must be a str or os\.PathLike"):
        mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=3.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"directory must be a str or os\.PathLike"):
        mg.ingest_panics_jsonl(report_dir=object())  # type: ignore[arg-type]


def test_ingest_uses_the_archive_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reports = tmp_path / "reports"
    write_panic(reports, Panic(ts=time.time() - 5))
    archive = tmp_path / "a.jsonl"
    locks = spy_file_locks(monkeypatch)
    mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=archive)
    assert locks == [str(archive) + ".lock"]


_INGEST_WORKER = textwrap.dedent(
    """
    import json, sys, time
    import metal_guard as mg
    start, report_dir, archive = float(sys.argv[1]), sys.argv[2], sys.argv[3]
    while time.time() < start:
        time.sleep(0.001)
    total = 0
    for _ in range(3):
        total += mg.ingest_panics_jsonl(report_dir=report_dir, jsonl_path=archive)
    print(json.dumps(total))
    """
)


@pytest.mark.multiprocess
def test_concurrent_ingest_from_real_processes(tmp_path: Path) -> None:
    now = time.time()
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(40):
        p = Panic(kind="492" if i % 2 else "watchdog", pid=1000 + i, ts=now - 3600 + i * 10)
        if i < 30:
            write_panic(a, p, name=f"{i}.panic")
        if i >= 10:  # b holds copies of 10..29 under other names, plus 30..39
            write_panic(b, p, name=f"copy-{i}.panic")
    archive = tmp_path / "panics.jsonl"
    start = time.time() + 1.5
    procs = [
        spawn_python(
            _INGEST_WORKER,
            str(start),
            str(a if n % 2 else b),
            str(archive),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(8)
    ]
    totals = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        totals.append(json.loads(out))
    lines = archive.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is valid JSON
    assert sum(totals) == len(records) == 40
    assert sorted(r["pid"] for r in records) == list(range(1000, 1040))
    assert len({(int(r["ts"]), r["pid"]) for r in records}) == 40


_KILLED_WORKER = textwrap.dedent(
    """
    import sys
    import metal_guard as mg
    report_dir, archive = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    while True:
        mg._reset_panic_caches()  # parse and re-check the archive every time
        mg.ingest_panics_jsonl(report_dir=report_dir, jsonl_path=archive)
    """
)


@pytest.mark.multiprocess
def test_sigkill_during_ingest_leaves_a_valid_archive(tmp_path: Path) -> None:
    import random
    import signal

    now = time.time()
    reports = tmp_path / "reports"
    for i in range(200):
        write_panic(reports, Panic(pid=i, ts=now - 5000 + i * 10), name=f"{i}.panic")
    rng = random.Random(1234)
    for round_ in range(6):
        archive = tmp_path / f"panics-{round_}.jsonl"
        proc = spawn_python(_KILLED_WORKER, str(reports), str(archive), stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.08))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if archive.exists():  # every line that made it is a whole record, but the last:
            # Linux stops a large write() at a fatal signal (generic_perform_write checks
            # fatal_signal_pending between pages), so SIGKILL may cut the last append short;
            # readers skip that torn line and the next append starts on a line of its own
            lines = archive.read_text().splitlines()
            records = [json.loads(line) for line in lines[:-1]]
            try:
                records += [json.loads(line) for line in lines[-1:]]
            except ValueError:
                assert not archive.read_text().endswith("\n")  # only an unfinished last line
            assert len({r["source_file"] for r in records}) == len(records)
        mg._reset_panic_caches()
        mg.ingest_panics_jsonl(report_dir=reports, jsonl_path=archive)
        records = mg.read_panic_archive(archive)
        assert sorted(r["pid"] for r in records) == list(range(200))  # nothing lost, no duplicate
