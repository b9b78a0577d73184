"""Section 5.9: system audits, and the ``metal-guard audit`` command.

On Linux the audits answer "unknown" / ``None`` without running anything. The macOS
side cannot run here, so ``sysctl``, ``kextstat`` and ``ioreg`` are replaced by small
executables on ``PATH`` that print outputs captured from Macs (and one that hangs); the
library's real subprocess handling, time bounds and parsing run against them.
"""

from __future__ import annotations

import json
import logging
import os
import plistlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import REPO, child_env

GIB = 1 << 30
MEMSIZE_64 = "68719476736\n"
UNKNOWN = {"limit_mb": None, "total_gb": None, "ratio": 0.0, "mode": "unknown", "advisory": None}

# `kextstat -l -b com.apple.iokit.IOGPUFamily` on macOS 14 (kextstat forwards to kmutil)
KEXTSTAT_OUT = (
    "Executing: /usr/bin/kmutil showloaded --list-only --bundle-identifier "
    "com.apple.iokit.IOGPUFamily\n"
    "No variant specified, falling back to release\n"
    "  141    8 0xfffffe0007a6c000 0x5c000    0x5c000    com.apple.iokit.IOGPUFamily (104.4.2) "
    "0E0D3A7B-9F0C-3A53-9A53-6A0F0B9C1E8D <98 17 8 7 6 3 1>\n"
)
IOREG_OUT = (
    "+-o IOGPUFamily  <class IOService, id 0x100000321, registered, matched, active, busy 0>\n"
    "    {\n"
    '      "IOClass" = "IOGPUFamily"\n'
    '      "CFBundleIdentifier" = "com.apple.iokit.IOGPUFamily"\n'
    '      "CFBundleVersion" = "129.3.4"\n'
    "    }\n"
)

FAKE_COMMAND = """#!{python}
import os, signal, sys, time
folder = os.environ["FAKE_MAC_DIR"]
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
with open(os.path.join(folder, "calls"), "a") as log:
    log.write(" ".join([name, *args]) + "\\n")
key = name + ("." + args[-1] if name == "sysctl" else "")
base = os.path.join(folder, key)
if os.path.exists(base + ".hang"):
    def stop(*_):
        with open(os.path.join(folder, "terminated"), "a") as out:
            out.write(key + "\\n")
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(60)
    sys.exit(0)
if os.path.exists(base + ".out"):
    with open(base + ".out") as answer:
        sys.stdout.write(answer.read())
    sys.exit(int(open(base + ".rc").read()) if os.path.exists(base + ".rc") else 0)
sys.stderr.write(name + ": unknown oid '" + (args[-1] if args else "") + "'\\n")
sys.exit(1)
"""


class FakeMac:
    """``sysctl``/``kextstat``/``ioreg`` stand-ins on PATH, answering from files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def answer(self, key: str, text: str, rc: int = 0) -> None:
        (self.folder / f"{key}.out").write_text(text)
        (self.folder / f"{key}.rc").write_text(str(rc))

    def hang(self, key: str) -> None:
        (self.folder / f"{key}.hang").write_text("")

    def calls(self) -> list[str]:
        path = self.folder / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def terminated(self) -> list[str]:
        path = self.folder / "terminated"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def fake_mac(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeMac:
    folder = tmp_path / "fake-mac"
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("sysctl", "kextstat", "ioreg"):
        script = bin_dir / name
        script.write_text(FAKE_COMMAND.format(python=sys.executable))
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_MAC_DIR", str(folder))
    monkeypatch.setattr(mg, "_on_macos", lambda: True)
    monkeypatch.setattr(mg, "_IOGPU_PLIST", str(folder / "no-such-Info.plist"))
    return FakeMac(folder)


linux_only = pytest.mark.skipif(
    sys.platform == "darwin", reason="checks the non-macOS answers (this is a Mac)"
)


# -- Linux (off macOS): unknown, fast, nothing run -------------------------------------------


@linux_only
def test_off_macos_the_audits_answer_unknown_and_run_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_subprocess(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no subprocess may run off macOS")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(mg, "_installed_version", lambda name: None)  # no MLX stack advisories
    start = time.monotonic()
    assert mg.audit_wired_limit() == UNKNOWN
    assert mg.read_gpu_driver_version() is None
    assert mg.read_gpu_driver_version(timeout=0.1) is None
    result = mg.log_system_audit_at_startup()
    assert time.monotonic() - start < 1.0
    assert result == {
        "wired_limit": UNKNOWN,
        "gpu_driver_version": None,
        "mlx_metal_fast_synch": False,
        "critical_advisories": [],
    }


@linux_only
def test_startup_audit_logs_info_off_macos(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="metal_guard"):
        mg.log_system_audit_at_startup()
    levels = {r.levelname for r in caplog.records}
    assert "WARNING" not in levels
    assert any("wired limit mode=unknown" in r.getMessage() for r in caplog.records)


# -- parsing captured sysctl outputs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "memsize", "expected"),
    [
        ("0\n", MEMSIZE_64, {"limit_mb": 0, "total_gb": 64.0, "mode": "default", "ratio": 0.0}),
        (
            "49152\n",
            MEMSIZE_64,
            {"limit_mb": 49152, "total_gb": 64.0, "mode": "override", "ratio": 0.75},
        ),
        (
            "57344\n",
            MEMSIZE_64,
            {"limit_mb": 57344, "total_gb": 64.0, "mode": "override", "ratio": 0.875},
        ),
        ("  120000 ", "137438953472", {"limit_mb": 120000, "total_gb": 128.0, "mode": "override"}),
        ("49152\n", None, {"limit_mb": 49152, "total_gb": None, "mode": "override", "ratio": 0.0}),
        (None, MEMSIZE_64, {"limit_mb": None, "total_gb": 64.0, "mode": "unknown"}),
        ("sysctl: unknown oid 'iogpu.wired_limit_mb'", MEMSIZE_64, {"mode": "unknown"}),
        ("0x0", MEMSIZE_64, {"mode": "unknown", "limit_mb": None}),
        ("-1", MEMSIZE_64, {"mode": "unknown"}),
        ("", "", {"mode": "unknown", "total_gb": None}),
        ("49152", "garbage", {"mode": "override", "total_gb": None}),
    ],
)
def test_wired_limit_report_from_captured_outputs(
    limit: str | None, memsize: str | None, expected: dict[str, Any]
) -> None:
    report = mg._wired_limit_report(limit, memsize)
    assert set(report) == {"limit_mb", "total_gb", "ratio", "mode", "advisory"}
    for key, value in expected.items():
        assert report[key] == value, key


def test_the_advisory_above_85_percent() -> None:
    report = mg._wired_limit_report("57344", MEMSIZE_64)
    advisory = report["advisory"]
    assert advisory is not None
    assert "sudo sysctl iogpu.wired_limit_mb=0" in advisory
    assert "55705 MB" in advisory  # 85 % of 64 GiB in MB
    assert "88%" in advisory
    assert mg._wired_limit_report("55705", MEMSIZE_64)["advisory"] is None  # just under
    assert mg._wired_limit_report("55706", MEMSIZE_64)["advisory"] is not None
    assert mg._wired_limit_report("0", MEMSIZE_64)["advisory"] is None


def test_kextstat_and_ioreg_parsing() -> None:
    assert mg._kextstat_version(KEXTSTAT_OUT) == "104.4.2"
    legacy = (
        "  141    8 0xffffff7f8a6c000 0x5c000 0x5c000 com.apple.iokit.IOGPUFamily (16.0.4) "
        "0E0D3A7B <8 7 6 3 1>\n"
    )
    assert mg._kextstat_version(legacy) == "16.0.4"
    assert mg._kextstat_version("com.apple.iokit.IOSurface (372.5.2)\n") is None
    assert mg._kextstat_version("com.apple.iokit.IOGPUFamily\n") is None
    assert mg._ioreg_version(IOREG_OUT) == "129.3.4"
    assert mg._ioreg_version('"CFBundleVersion" = ""\n') is None
    assert mg._ioreg_version("nothing here") is None


# -- macOS commands replaced by captured outputs --------------------------------------------


def test_audit_reads_both_sysctls(fake_mac: FakeMac) -> None:
    fake_mac.answer("sysctl.iogpu.wired_limit_mb", "57344\n")
    fake_mac.answer("sysctl.hw.memsize", MEMSIZE_64)
    report = mg.audit_wired_limit()
    assert (report["mode"], report["limit_mb"], report["total_gb"]) == ("override", 57344, 64.0)
    assert report["advisory"] is not None
    assert fake_mac.calls() == ["sysctl -n iogpu.wired_limit_mb", "sysctl -n hw.memsize"]


def test_audit_on_a_mac_without_the_iogpu_sysctl(fake_mac: FakeMac) -> None:
    fake_mac.answer("sysctl.hw.memsize", MEMSIZE_64)  # iogpu.wired_limit_mb: unknown oid, rc 1
    report = mg.audit_wired_limit()
    assert report == {**UNKNOWN, "total_gb": 64.0}


def test_a_hanging_sysctl_is_stopped_with_sigterm_within_the_bound(fake_mac: FakeMac) -> None:
    fake_mac.hang("sysctl.iogpu.wired_limit_mb")
    fake_mac.answer("sysctl.hw.memsize", MEMSIZE_64)
    start = time.monotonic()
    report = mg.audit_wired_limit()
    took = time.monotonic() - start
    assert report == UNKNOWN  # the 2 s budget was spent on the first call
    assert took < 4.0, took  # 2 s budget + half a second of grace, with margin
    assert fake_mac.terminated() == ["sysctl.iogpu.wired_limit_mb"]  # asked, not killed


def test_driver_version_prefers_the_kext_plist(fake_mac: FakeMac, tmp_path: Path) -> None:
    plist = tmp_path / "Info.plist"
    plist.write_bytes(
        plistlib.dumps(
            {"CFBundleIdentifier": "com.apple.iokit.IOGPUFamily", "CFBundleVersion": "130.13"}
        )
    )
    fake_mac.answer("kextstat", KEXTSTAT_OUT)
    mg._IOGPU_PLIST = str(plist)  # restored by the fixture's monkeypatch
    assert mg.read_gpu_driver_version() == "130.13"
    assert fake_mac.calls() == []  # no subprocess needed


def test_driver_version_from_kextstat_then_ioreg(fake_mac: FakeMac) -> None:
    fake_mac.answer("kextstat", KEXTSTAT_OUT)
    fake_mac.answer("ioreg", IOREG_OUT)
    assert mg.read_gpu_driver_version() == "104.4.2"
    assert fake_mac.calls() == ["kextstat -l -b com.apple.iokit.IOGPUFamily"]
    fake_mac.answer("kextstat", "", rc=1)
    assert mg.read_gpu_driver_version() == "129.3.4"
    assert fake_mac.calls()[-1] == "ioreg -rc IOGPUFamily -d 1"
    fake_mac.answer("ioreg", "no version here\n")
    assert mg.read_gpu_driver_version() is None


def test_driver_version_shares_one_time_bound(fake_mac: FakeMac) -> None:
    fake_mac.hang("kextstat")
    fake_mac.answer("ioreg", IOREG_OUT)
    start = time.monotonic()
    assert mg.read_gpu_driver_version(timeout=1.0) is None
    took = time.monotonic() - start
    assert took < 3.0, took
    assert [c.split()[0] for c in fake_mac.calls()] == ["kextstat"]  # no time left for ioreg
    assert fake_mac.terminated() == ["kextstat"]


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError)])
def test_driver_version_timeout_must_be_positive(value: float, error: type) -> None:
    with pytest.raises(error, match="timeout must be"):
        mg.read_gpu_driver_version(timeout=value)


@pytest.mark.parametrize("value", ["3", None, True])
def test_driver_version_timeout_must_be_a_number(value: Any) -> None:
    with pytest.raises(TypeError, match="timeout must be a number"):
        mg.read_gpu_driver_version(timeout=value)


def test_startup_audit_warns_about_an_oversized_wired_limit(
    fake_mac: FakeMac, caplog: pytest.LogCaptureFixture
) -> None:
    fake_mac.answer("sysctl.iogpu.wired_limit_mb", "61440\n")
    fake_mac.answer("sysctl.hw.memsize", MEMSIZE_64)
    fake_mac.answer("kextstat", KEXTSTAT_OUT)
    visible = pytest.warns(mg.MetalGuardWarning, match="iogpu.wired_limit_mb=61440 lets the GPU")
    with caplog.at_level(logging.INFO, logger="metal_guard"), visible:
        result = mg.log_system_audit_at_startup()
    assert result["gpu_driver_version"] == "104.4.2"
    assert result["wired_limit"]["ratio"] == 0.938
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "iogpu.wired_limit_mb=61440" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("IOGPUFamily kext 104.4.2" in m for m in infos)


def test_startup_audit_default_limit_is_info_only(
    fake_mac: FakeMac, caplog: pytest.LogCaptureFixture
) -> None:
    fake_mac.answer("sysctl.iogpu.wired_limit_mb", "0\n")
    fake_mac.answer("sysctl.hw.memsize", MEMSIZE_64)
    with caplog.at_level(logging.INFO, logger="metal_guard"):
        result = mg.log_system_audit_at_startup()
    assert result["wired_limit"]["mode"] == "default"
    assert all(r.levelno < logging.WARNING for r in caplog.records)
    assert any("mode=default limit_mb=0 total_gb=64.0" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("value", "warned"),
    [("1", True), (" 1 ", True), ("true", True), ("2", True), ("0", False), ("", False)],
)
def test_startup_audit_warns_about_fast_synch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str, warned: bool
) -> None:
    monkeypatch.setenv("MLX_METAL_FAST_SYNCH", value)
    with caplog.at_level(logging.WARNING, logger="metal_guard"):
        result = mg.log_system_audit_at_startup()
    assert result["mlx_metal_fast_synch"] is warned
    messages = [r.getMessage() for r in caplog.records if "MLX_METAL_FAST_SYNCH" in r.getMessage()]
    assert len(messages) == (1 if warned else 0)
    if warned:
        assert "ml-explore/mlx#3830" in messages[0] and "wedge the GPU" in messages[0]


def test_run_bounded_failures_give_none(tmp_path: Path) -> None:
    assert mg._run_bounded([str(tmp_path / "no-such-command")], 1.0) is None
    assert mg._run_bounded([sys.executable, "-c", "raise SystemExit(3)"], 5.0) is None
    assert mg._run_bounded([sys.executable, "-c", "print('x')"], 0) is None
    assert mg._run_bounded([sys.executable, "-c", "print('ok')"], 10.0) == "ok\n"


# -- metal-guard audit --------------------------------------------------------------------


def run_audit(
    home: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "metal_guard", "audit", *args],
        cwd=REPO,
        env=child_env(METALGUARD_HOME=home, **(env or {})),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _dist_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@linux_only
def test_audit_json_says_what_it_could_not_read(mg_home: str) -> None:
    proc = run_audit(mg_home, "--json")
    assert proc.returncode == 0
    doc = json.loads(proc.stdout)
    assert doc["command"] == "audit" and doc["exit_code"] == 0
    assert doc["wired_limit"] == UNKNOWN
    assert doc["gpu_driver_version"] is None and doc["mlx_metal_fast_synch"] is False
    assert len(doc["unreadable"]) == 3
    assert all(item.endswith(": not macOS") for item in doc["unreadable"])
    assert any(item.startswith("iogpu.wired_limit_mb") for item in doc["unreadable"])
    assert doc["packages"] == {n: _dist_version(n) for n in ("mlx", "mlx-lm", "mlx-vlm")}
    policy = doc["wired_limit_policy"]
    assert policy["installed"] is False and policy["env_policy"] == "off"
    assert os.listdir(mg_home) == []  # an audit writes nothing


@linux_only
def test_audit_human_output(mg_home: str) -> None:
    proc = run_audit(mg_home)
    assert proc.returncode == 0
    out = proc.stdout
    for text in (
        "System",
        "wired limit",
        "MLX stack (package metadata; MLX is not imported)",
        "Wired-limit control",
        "METALGUARD_WIRED_LIMIT  unset: limit_wired_memory() installs the default 'off'",
        "Could not read",
        "  - hw.memsize (sysctl): not macOS",
    ):
        assert text in out, text


def test_audit_lists_advisories_of_the_installed_stack(mg_home: str, tmp_path: Path) -> None:
    """A real ``mlx_vlm-0.4.4.dist-info`` on the path: five advisories, critical first."""
    site = tmp_path / "site"
    dist = site / "mlx_vlm-0.4.4.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx-vlm\nVersion: 0.4.4\n")
    env = {"PYTHONPATH": f"{site}{os.pathsep}{child_env()['PYTHONPATH']}"}
    doc = json.loads(run_audit(mg_home, "--json", env=env).stdout)
    assert doc["packages"]["mlx-vlm"] == "0.4.4"
    vlm = [a for a in doc["advisories"] if a["package"] == "mlx-vlm"]
    assert [a["issue"] for a in vlm] == [
        "Blaizzy/mlx-vlm#967",
        "Blaizzy/mlx-vlm#943",
        "Blaizzy/mlx-vlm#1016",
        "Blaizzy/mlx-vlm#1011",
        "Blaizzy/mlx-vlm#999",
    ]
    order = [mg._SEVERITY_ORDER[a["severity"]] for a in doc["advisories"]]
    assert order == sorted(order)
    out = run_audit(mg_home, env=env).stdout
    assert "[critical] mlx-vlm 0.4.4: mlx-vlm before 0.4.5: critical defect" in out
    assert "https://github.com/Blaizzy/mlx-vlm/issues/967" in out
    assert "what to do:" in out


def test_audit_reports_the_environment(mg_home: str) -> None:
    env = {"METALGUARD_WIRED_LIMIT": "off", "MLX_METAL_FAST_SYNCH": "1"}
    doc = json.loads(run_audit(mg_home, "--json", env=env).stdout)
    assert doc["mlx_metal_fast_synch"] is True
    policy = doc["wired_limit_policy"]
    assert (policy["env_value"], policy["env_policy"]) == ("off", "off")
    out = run_audit(mg_home, env=env).stdout
    assert "METALGUARD_WIRED_LIMIT  'off': limit_wired_memory() installs 'off'" in out
    assert "MLX_METAL_FAST_SYNCH  1: can deadlock" in out
    bad = run_audit(mg_home, env={"METALGUARD_WIRED_LIMIT": "nope"})
    assert "'nope' is not a policy" in bad.stdout
    assert "METALGUARD_WIRED_LIMIT" in bad.stderr  # the library's one WARNING


@pytest.mark.parametrize("where", ["before", "after"])
def test_audit_json_flag_anywhere(mg_home: str, where: str) -> None:
    args = ["--json", "audit"] if where == "before" else ["audit", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "metal_guard", *args],
        cwd=REPO,
        env=child_env(METALGUARD_HOME=mg_home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["command"] == "audit"


def test_audit_usage_error(mg_home: str) -> None:
    proc = run_audit(mg_home, "extra")
    assert proc.returncode == 64 and "usage: metal-guard" in proc.stderr


def test_audit_never_imports_mlx(mg_home: str) -> None:
    code = (
        "import contextlib, io, sys, metal_guard\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = metal_guard.main(['audit', '--json'])\n"
        "print(rc, 'mlx.core' in sys.modules, 'mlx_lm' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(METALGUARD_HOME=mg_home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.split() == ["0", "False", "False"], proc.stderr
