"""Builders for realistic macOS kernel-panic reports (synthetic ids and addresses).

A modern report (macOS 12+) is two JSON documents: a one-line header
(``bug_type`` "210", ``timestamp``, ``os_version``, ``incident_id``) and a body
whose ``panicString`` holds the text log. The text log carries the panic line
``panic(cpu N caller 0x...): "<message>" @File.cpp:LINE``, ``OS version:``,
``Kernel version: ...RELEASE_ARM64_T<chip>``, an ``Epoch Time:`` block whose
``Calendar:`` line is the panic time, ``Panicked task ...: pid N: name`` and the
kext list with ``com.apple.iokit.IOGPUFamily(<version>)``.

Used by the panic, breaker and CLI tests and by ``bench/bench_panic.py``.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "COMMAND_BUFFER_OOM_TEXT",
    "GPU_TIMEOUT_TEXT",
    "IMPACTING_INTERACTIVITY_TEXT",
    "SUBMISSIONS_IGNORED_TEXT",
    "KINDS",
    "RESOURCE_LIMIT_TEXT",
    "Panic",
    "panic_text",
    "write_binary",
    "write_legacy",
    "write_non_panic_ips",
    "write_panic",
    "write_truncated",
]

# What the process (not the kernel) prints when a Metal command buffer runs out of memory.
COMMAND_BUFFER_OOM_TEXT = (
    "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
    "[METAL] Command buffer execution failed: Insufficient Memory "
    "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"
)
RESOURCE_LIMIT_TEXT = "RuntimeError: [metal::malloc] Resource limit (499000) exceeded."

# kind → (panic message after the caller address, expected signature, expected File.cpp:LINE)
KINDS: dict[str, tuple[str, str | None, str | None]] = {
    "492": (
        '"completeMemory() prepare count underflow" @IOGPUMemory.cpp:492',
        "prepare_count_underflow",
        "IOGPUMemory.cpp:492",
    ),
    "550": (
        '"completeMemory() prepare count underflow" @IOGPUMemory.cpp:550',
        "prepare_count_underflow",
        "IOGPUMemory.cpp:550",
    ),
    "219": (
        '"IOGPUGroupMemory::~IOGPUGroupMemory(): fPendingMemorySet is not empty" '
        "@IOGPUGroupMemory.cpp:219",
        "pending_memory_set",
        "IOGPUGroupMemory.cpp:219",
    ),
    "323": (
        '"void IOGPUGroupMemory::remove_memory_object(IOGPUMemory *): memory not in group" '
        "@IOGPUGroupMemory.cpp:323",
        "remove_memory_object",
        "IOGPUGroupMemory.cpp:323",
    ),
    "528": (
        '"IOGPUGroupMemory::markPending(): memory 0xfffffe1a2b3c4d00 is pending in '
        'non-pending hash" @IOGPUGroupMemory.cpp:528',
        "pending_in_non_pending_hash",
        "IOGPUGroupMemory.cpp:528",
    ),
    "watchdog": (
        "watchdog timeout: no checkins from watchdogd in 92 seconds (27 total checkins "
        "since monitoring last enabled)",
        "gpu_watchdog",
        None,
    ),
    "unknown": (
        '"AppleSomeDriver: unexpected state 0x3" @AppleSomeDriver.cpp:77',
        None,
        None,
    ),
}

_BUILDS = {
    "24F74": ("15.5", "24.5.0", "xnu-11417.121.6~2"),
    "25E253": ("26.4.1", "25.4.0", "xnu-12377.101.14~1"),
}


@dataclass
class Panic:
    """One synthetic panic; every field the parser extracts is set explicitly."""

    kind: str = "492"
    ts: float = 1_776_900_000.25  # 2026-04-22 UTC
    pid: int = 67840
    process: str = "python3.12"
    os_build: str = "24F74"
    iogpu_version: str = "130.13"
    chip: str = "T6020"
    incident_id: str = "5A1B2C3D-0000-4000-8000-000000000001"
    extra_text: str = ""
    header_extra: dict[str, object] = field(default_factory=dict)

    @property
    def signature(self) -> str | None:
        return KINDS[self.kind][1]

    @property
    def location(self) -> str | None:
        return KINDS[self.kind][2]

    @property
    def os_version(self) -> str:
        version = _BUILDS.get(self.os_build, ("15.5", "24.5.0", "xnu-1"))[0]
        return f"macOS {version} ({self.os_build})"


def _local_stamp(ts: float) -> str:
    moment = datetime.datetime.fromtimestamp(ts).astimezone()
    return (
        moment.strftime("%Y-%m-%d %H:%M:%S.")
        + f"{moment.microsecond // 10000:02d} "
        + moment.strftime("%z")
    )


def _kernel_version(p: Panic) -> str:
    _, darwin, xnu = _BUILDS.get(p.os_build, ("15.5", "24.5.0", "xnu-1"))
    return (
        f"Darwin Kernel Version {darwin}: Tue Apr 22 19:53:27 PDT 2025; "
        f"root:{xnu}/RELEASE_ARM64_{p.chip}"
    )


def panic_text(p: Panic) -> str:
    """The text log of a panic, as found in a report's ``panicString``."""
    seconds = int(p.ts)
    micros = round((p.ts - seconds) * 1e6)
    boot = seconds - 86_400
    message = KINDS[p.kind][0]
    lines = [
        f"panic(cpu 4 caller 0xfffffe0021a3b5c8): {message}",
        "Debugger message: panic",
        "Memory ID: 0x6",
        "OS release type: User",
        f"OS version: {p.os_build}",
        f"Kernel version: {_kernel_version(p)}",
        "Fileset Kernelcache UUID: 0F1E2D3C4B5A69788796A5B4C3D2E1F0",
        "Kernel UUID: 11111111-2222-3333-4444-555555555555",
        "Boot session UUID: 66666666-7777-8888-9999-AAAAAAAAAAAA",
        "iBoot version: iBoot-11881.121.1",
        "secure boot?: YES",
        "roots installed: 0",
        "Paniclog version: 14",
        "KernelCache slide: 0x0000000018a3c000",
        "KernelCache base:  0xfffffe001fa40000",
        "Kernel slide:      0x00000000197b0000",
        "Kernel text base:  0xfffffe00207b4000",
        "mach_absolute_time: 0x1f2e3d4c5b6a",
        "Epoch Time:        sec       usec",
        f"  Boot    : 0x{boot:08x} 0x{123456:08x}",
        "  Sleep   : 0x00000000 0x00000000",
        "  Wake    : 0x00000000 0x00000000",
        f"  Calendar: 0x{seconds:08x} 0x{micros:08x}",
        "",
        "Zone info:",
        "  Zone map: 0xfffffe1000000000 - 0xfffffe3000000000",
        "",
        "CORE 0 recently retired instr at 0xfffffe0020a1b2c4",
        "TPIDRx_ELy = {1: 0xfffffe2a1b2c3d80  0: 0x0000000000000000  0ro: 0x000000016f2a30e0 }",
        f"Panicked task 0xfffffe2a1b2c3d40: 1234567 pages, 45 threads: pid {p.pid}: {p.process}",
        "Panicked thread: 0xfffffe2a1b2c3d80, backtrace: 0xfffffe8f1234abcd, tid: 123456",
        "\t\t  lr: 0xfffffe0020a5c8e4  fp: 0xfffffe8f1234ab00",
        "\t\t  lr: 0xfffffe0021a3b5c8  fp: 0xfffffe8f1234ab60",
        "      Kernel Extensions in backtrace:",
        f"         com.apple.iokit.IOGPUFamily({p.iogpu_version})"
        "[0A1B2C3D-4E5F-6071-8293-A4B5C6D7E8F9]@0xfffffe0030c1c000->0xfffffe0030c4ffff",
        "            dependency: com.apple.iokit.IOSurface(372.5.2)"
        "[1B2C3D4E-5F60-7182-93A4-B5C6D7E8F9A0]@0xfffffe0030c50000->0xfffffe0030c7ffff",
        "",
        "last started kext at 1234567890: com.apple.driver.AppleUSBHostMergeProperties 1.2",
        "loaded kexts:",
        f"com.apple.iokit.IOGPUFamily\t{p.iogpu_version}",
        "com.apple.AGXG14X\t325.34.1",
    ]
    if p.extra_text:
        lines.append(p.extra_text)
    return "\n".join(lines) + "\n"


def _header(p: Panic) -> dict[str, object]:
    header: dict[str, object] = {
        "bug_type": "210",
        "timestamp": _local_stamp(p.ts),
        "os_version": p.os_version,
        "roots_installed": 0,
        "incident_id": p.incident_id,
    }
    header.update(p.header_extra)
    return header


def _body(p: Panic) -> dict[str, object]:
    return {
        "build": p.os_version,
        "product": "Mac14,13",
        "socId": "6020",
        "socRevision": "11",
        "incident": p.incident_id,
        "crashReporterKey": "ABCDEF0123456789ABCDEF0123456789ABCDEF01",
        "kernel": _kernel_version(p),
        "date": _local_stamp(p.ts + 0.5),
        "panicString": panic_text(p),
        "panicFlags": "0x902",
        "otherString": "\n** Stackshot Succeeded ** Bytes Traced 123456 (Uncompressed 234567) **\n",
        "macOSPanicFlags": "0x0",
        "macOSPanicString": "BAD MAGIC! (flag set in iBoot panic header), no macOS panic log available",
        "extensionsLoaded": ["com.apple.iokit.IOGPUFamily", "com.apple.AGXG14X"],
    }


def report_bytes(p: Panic) -> bytes:
    """A complete two-document report, formatted like the files macOS writes."""
    header = json.dumps(_header(p), separators=(",", ":"))
    body = json.dumps(_body(p), indent=2, separators=(",", " : "))
    return (header + "\n" + body + "\n").encode("utf-8")


def _target(folder: Path, name: str, retired: bool) -> Path:
    where = folder / "Retired" if retired else folder
    where.mkdir(parents=True, exist_ok=True)
    return where / name


def _default_name(p: Panic) -> str:
    stamp = datetime.datetime.fromtimestamp(p.ts).strftime("%Y-%m-%d-%H%M%S")
    return f"panic-full-{stamp}.{p.pid % 10000:04d}.panic"


def write_panic(
    folder: Path | str, p: Panic | None = None, *, name: str | None = None, retired: bool = False
) -> Path:
    """Write ``p`` as a two-document ``.panic`` report; returns its path."""
    p = p or Panic()
    path = _target(Path(folder), name or _default_name(p), retired)
    path.write_bytes(report_bytes(p))
    return path


def write_panic_series(folder: Path | str, count: int, start: float) -> None:
    """``count`` full reports an hour apart from ``start`` (the kinds in turn, two OS builds,
    each with its own incident id; every tenth in ``Retired/``): a folder at scale."""
    kinds = list(KINDS)
    for i in range(count):
        p = Panic(
            kind=kinds[i % len(kinds)],
            ts=start + i * 3600.5,
            pid=10_000 + i,
            os_build="24F74" if i % 2 else "25E253",
            incident_id=f"00000000-0000-4000-8000-{i:012d}",
        )
        write_panic(folder, p, name=f"panic-full-{i:05d}.panic", retired=i % 10 == 0)


def write_truncated(folder: Path | str, p: Panic | None = None, *, name: str | None = None) -> Path:
    """A report cut off in the middle of its body (invalid JSON), as after a disk-full write."""
    p = p or Panic()
    data = report_bytes(p)
    cut = data.index(b"com.apple.iokit.IOGPUFamily(") + 60  # after the kext line, mid-string
    path = _target(Path(folder), name or "truncated-" + _default_name(p), False)
    path.write_bytes(data[:cut])
    return path


def write_legacy(
    folder: Path | str, p: Panic | None = None, *, name: str = "Kernel_legacy.panic"
) -> Path:
    """A plain-text report as macOS 11 and older wrote them (no JSON body)."""
    p = p or Panic()
    seconds = int(p.ts)
    text = "\n".join(
        [
            "Anonymous UUID:       01234567-89AB-CDEF-0123-456789ABCDEF",
            "",
            datetime.datetime.fromtimestamp(p.ts).strftime("%a %b %d %H:%M:%S %Y"),
            "",
            "*** Panic Report ***",
            f"panic(cpu 2 caller 0xfffffe0017a3b5c8): {KINDS[p.kind][0]}",
            "Backtrace (CPU 2), Frame : Return Address",
            "0xfffffe8f1234ab00 : 0xfffffe0017a5c8e4",
            "",
            f"BSD process name corresponding to current thread: {p.process}",
            "",
            "Mac OS version:",
            p.os_build,
            "",
            "Kernel version:",
            _kernel_version(p),
            "Epoch Time:        sec       usec",
            f"  Boot    : 0x{seconds - 3600:08x} 0x00000000",
            f"  Calendar: 0x{seconds:08x} 0x00000000",
            "",
            f"      com.apple.iokit.IOGPUFamily({p.iogpu_version})[ABCD]@0xfffffe0030c1c000",
        ]
    )
    path = _target(Path(folder), name, False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def write_non_panic_ips(
    folder: Path | str, *, name: str = "python3.12-2026-04-22-101010.ips"
) -> Path:
    """A crash report (bug_type 309) that merely mentions panic-like words."""
    header = {"bug_type": "309", "timestamp": "2026-04-22 10:10:10.00 +0000", "incident_id": "X"}
    body = {
        "procName": "python3.12",
        "exception": {"type": "EXC_CRASH", "signal": "SIGABRT"},
        "asi": {"libsystem_c.dylib": [COMMAND_BUFFER_OOM_TEXT, "panic(cpu 1 caller 0x1): fake"]},
    }
    path = Path(folder) / name
    path.write_text(json.dumps(header) + "\n" + json.dumps(body, indent=2) + "\n", encoding="utf-8")
    return path


def write_binary(
    folder: Path | str, *, name: str = "panic-base-garbage.panic", size: int = 8192
) -> Path:
    """A file with a panic-like name holding random bytes."""
    path = Path(folder) / name
    path.write_bytes(os.urandom(size))
    return path


# -- signatures of SPEC-2 §7 -------------------------------------------------------------
# A kernel panic in the VM layer (not the IOGPU driver): its message carries no File:LINE.
KINDS["mapcnt"] = (
    "cpt_mapcnt_inc: refcnt overflow, ptd=0xfffffe1a2b3c4d00 refcnt=0xfffe",
    "cpt_mapcnt_overflow",
    None,
)

# What the process prints when Metal fails a command buffer for these reasons (the Mac
# stays up): MLX turns the MTLCommandBuffer error into a std::runtime_error that aborts.
_ABORT = "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
IMPACTING_INTERACTIVITY_TEXT = (
    _ABORT + "[METAL] Command buffer execution failed: Impacting Interactivity "
    "(0000000e:kIOGPUCommandBufferCallbackErrorImpactingInteractivity)"
)
GPU_TIMEOUT_TEXT = (
    _ABORT + "[METAL] Command buffer execution failed: Caused GPU Timeout Error "
    "(00000002:kIOGPUCommandBufferCallbackErrorTimeout)"
)
SUBMISSIONS_IGNORED_TEXT = (
    _ABORT + "[METAL] Command buffer execution failed: Ignored (for causing prior/excessive "
    "GPU errors) (00000004:kIOGPUCommandBufferCallbackErrorSubmissionsIgnored)"
)
