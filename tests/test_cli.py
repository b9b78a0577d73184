"""Command-line section: ``metal-guard``, run as real subprocesses (and ``main`` in process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import HAS_MLX, REPO, child_env
from panic_fixtures import Panic, write_panic

GEMMA_PANIC = "mlx-community/gemma-4-31b-it-8bit"


@pytest.fixture
def reports(tmp_path: Path) -> Path:
    folder = tmp_path / "reports"
    folder.mkdir()
    return folder


def run(
    home: str, *args: str, reports: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m metal_guard ARGS`` with its own state folder and report folder."""
    full_env = child_env(
        METALGUARD_HOME=home,
        # never the real /Library/Logs/DiagnosticReports of a Mac running the tests
        METALGUARD_PANIC_REPORT_DIR=str(reports or Path(home) / "no-reports"),
        **(env or {}),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "metal_guard", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def run_json(home: str, *args: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    proc = run(home, *args, "--json", **kw)
    return proc.returncode, json.loads(proc.stdout)


def _field(out: str, label: str) -> str:
    """The value of ``check``'s ``  <label>   <value>`` line (the column layout may change)."""
    (value,) = [
        line.strip()[len(label) :].strip()
        for line in out.splitlines()
        if line.strip().startswith(label + " ")
    ]
    return value


def _two_recent_panics(folder: Path) -> None:
    write_panic(folder, Panic(kind="492", pid=11, ts=time.time() - 120), name="a.panic")
    write_panic(folder, Panic(kind="219", pid=12, ts=time.time() - 60), name="b.panic")


# -- version, help, status ------------------------------------------------------------


def test_version(mg_home: str) -> None:
    for flag in ("--version", "-V"):
        proc = run(mg_home, flag)
        assert (proc.returncode, proc.stdout) == (0, f"metal-guard {mg.__version__}\n")
    # the same keys as every other command
    assert run_json(mg_home, "--version") == (
        0,
        {"command": "version", "exit_code": 0, "version": mg.__version__},
    )


def test_help(mg_home: str) -> None:
    proc = run(mg_home, "--help")
    assert proc.returncode == 0
    assert "usage: metal-guard" in proc.stdout and "Exit codes" in proc.stdout
    for command in ("check", "panics", "breaker", "cadence", "models", "breadcrumbs", "status"):
        assert command in proc.stdout
    assert run(mg_home, "check", "--help").returncode == 0


def test_status_human_and_json_create_no_state(mg_home: str, reports: Path) -> None:
    proc = run(mg_home, "status", reports=reports)
    assert proc.returncode == 0
    out = proc.stdout
    assert out.startswith(f"metal-guard {mg.__version__}\n")
    for part in ("python", "MLX", "state folder", "Cadence", "Circuit breaker", "Recent panics"):
        assert part in out
    assert mg_home in out
    assert "nothing is blocked" in out and "armed" in out and "none found" in out
    assert ("not installed" in out) is (not HAS_MLX)
    code, doc = run_json(mg_home, "status", reports=reports)
    assert code == 0 and doc["command"] == "status" and doc["exit_code"] == 0
    assert doc["version"] == mg.__version__
    assert doc["state_folder"] == mg_home
    assert doc["mlx"]["installed"] is HAS_MLX
    # Metal is not initialised by a plain status (it may run during a cooldown) ...
    assert doc["mlx"]["device_probed"] is False and doc["mlx"]["device_info"] is None
    if HAS_MLX:
        assert isinstance(doc["mlx"]["version"], str)
        assert "device not probed" in out
        # ... only when asked for the device
        code, probed = run_json(mg_home, "status", "--device", reports=reports)
        assert code == 0 and probed["mlx"]["device_probed"] is True
        assert isinstance(probed["mlx"]["device_info"], dict)
    assert doc["cadence"]["events"] == []
    assert doc["breaker"]["cooling_down"] is False
    assert run(mg_home, reports=reports).stdout.startswith("metal-guard ")  # default command
    assert os.listdir(mg_home) == []  # showing status writes nothing


def test_status_never_imports_mlx(mg_home: str, reports: Path) -> None:
    code = (
        "import contextlib, io, sys, metal_guard\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = metal_guard.main(['status', '--json'])\n"
        "print(rc, 'mlx.core' in sys.modules, 'mlx_lm' in sys.modules)\n"
    )
    env = child_env(METALGUARD_HOME=mg_home, METALGUARD_PANIC_REPORT_DIR=str(reports))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.split() == ["0", "False", "False"], proc.stderr


def test_status_shows_what_is_blocked(mg_home: str, reports: Path) -> None:
    mg.CadenceGuard().admit("org/alpha")
    _two_recent_panics(reports)
    assert run(mg_home, "check", "org/beta", reports=reports).returncode == 2  # trips
    out = run(mg_home, "status", reports=reports).stdout
    assert "org/alpha" in out
    assert "SAME MODEL BLOCKED" in out and "gemma-4 models: blocked for" in out
    assert "COOLING DOWN until" in out and "left" in out
    assert "prepare_count_underflow" in out and "IOGPUMemory.cpp:492" in out
    _, doc = run_json(mg_home, "status", reports=reports)
    assert doc["breaker"]["cooling_down"] is True
    assert doc["cadence"]["events"][0]["model_id"] == "org/alpha"
    assert [r["pid"] for r in doc["recent_panics"]] == [11, 12]


# -- check ------------------------------------------------------------------------


def test_check_clear_model(mg_home: str) -> None:
    proc = run(mg_home, "check", "org/model")
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[0] == "check org/model: GO"
    code, doc = run_json(mg_home, "check", "org/model")
    assert code == 0
    assert doc["decision"] == "go" and doc["blocked_by"] == [] and doc["exit_code"] == 0
    assert doc["known_panic_model"] is None
    assert doc["breaker"] == {"blocked": False}
    assert doc["cadence"]["blocked"] is False and doc["cadence"]["admitted"] is False
    assert not os.path.exists(os.path.join(mg_home, "cadence.json"))  # check only


def test_check_cadence(mg_home: str) -> None:
    assert run(mg_home, "check", "org/model", "--admit").returncode == 0
    assert "CADENCE_ADMIT: org/model" in Path(mg_home, "breadcrumbs.log").read_text()
    proc = run(mg_home, "check", "org/model")
    assert proc.returncode == 2
    assert "BLOCKED by cadence" in proc.stdout and "Wait" in proc.stdout
    code, doc = run_json(mg_home, "check", "org/model")
    assert code == 2 and doc["exit_code"] == 2
    assert doc["decision"] == "blocked" and doc["blocked_by"] == ["cadence"]
    assert 0 < doc["cadence"]["remaining_sec"] <= 180
    assert run(mg_home, "check", "org/model", "--min-interval", "0").returncode == 0
    assert run(mg_home, "check", "org/other").returncode == 0  # cross-model base is 0
    assert run(mg_home, "check", "org/other", "--cross-model-interval", "60").returncode == 2
    env = {"METALGUARD_CROSS_MODEL_INTERVAL": "60"}
    assert run(mg_home, "check", "org/other", env=env).returncode == 2
    assert run(mg_home, "check", "org/gemma-4-12b-it").returncode == 2  # gemma-4 floor of 90 s
    blocked = run(mg_home, "check", "org/model", "--admit")
    assert blocked.returncode == 2 and "not recorded" in blocked.stdout


def test_check_known_panic_model(mg_home: str) -> None:
    proc = run(mg_home, "check", GEMMA_PANIC)
    assert proc.returncode == 0  # advisory by default
    assert _field(proc.stdout, "known panic model").startswith("YES")
    assert _field(proc.stdout, "safer alternative") == "mlx-community/gemma-4-26b-a4b-it-4bit"
    code, doc = run_json(mg_home, "check", GEMMA_PANIC)
    assert code == 0 and doc["known_panic_model"]["tier"] == "panic"
    assert doc["known_panic_model"]["model_id"] == GEMMA_PANIC
    code, doc = run_json(mg_home, "check", GEMMA_PANIC, "--refuse-known", "--admit")
    assert code == 2 and doc["blocked_by"] == ["known panic model (--refuse-known)"]
    assert doc["cadence"]["admitted"] is False
    assert not os.path.exists(os.path.join(mg_home, "cadence.json"))
    assert run(mg_home, "check", "org/fine", "--refuse-known").returncode == 0


def test_check_during_a_cooldown(mg_home: str, reports: Path) -> None:
    _two_recent_panics(reports)
    proc = run(mg_home, "check", "org/model", "--admit", reports=reports)
    assert proc.returncode == 2
    assert _field(proc.stdout, "circuit breaker").startswith("BLOCKED")
    assert "metal-guard breaker clear" in proc.stdout
    assert not os.path.exists(os.path.join(mg_home, "cadence.json"))  # not admitted
    code, doc = run_json(mg_home, "check", "org/model", reports=reports)
    # the post-panic gate refuses too (2 IOGPU panics within 24 h: until `metal-guard ack`)
    assert code == 2 and doc["blocked_by"] == ["circuit breaker cooldown", "post-panic gate"]
    assert doc["breaker"]["blocked"] is True and doc["breaker"]["panic_count"] == 2
    assert doc["breaker"]["cooldown_until"] > time.time() + 3500
    assert len(Path(mg_home, "panics.jsonl").read_text().splitlines()) == 2

    proc = run(mg_home, "breaker", reports=reports)
    assert proc.returncode == 0 and "COOLING DOWN until" in proc.stdout
    code, doc = run_json(mg_home, "breaker", "status", reports=reports)
    assert code == 0 and doc["cooling_down"] is True and doc["panics_in_window"] == 2
    proc = run(mg_home, "breaker", "clear", reports=reports)
    assert proc.returncode == 0 and "cleared" in proc.stdout and "was running" in proc.stdout
    # the post-panic gate keeps its own lockout (2 panics in 24 h) until a person acks
    proc = run(mg_home, "check", "org/model", reports=reports)
    assert proc.returncode == 2 and "`metal-guard ack`" in proc.stdout
    assert run(mg_home, "ack", reports=reports).returncode == 0
    assert run(mg_home, "check", "org/model", reports=reports).returncode == 0
    code, doc = run_json(mg_home, "breaker", "clear", reports=reports)
    assert code == 0 and doc["was_cooling_down"] is False


# -- panics, cadence, models, breadcrumbs --------------------------------------------


def test_panics(mg_home: str, reports: Path, tmp_path: Path) -> None:
    now = time.time()
    write_panic(
        reports, Panic(kind="550", pid=7, ts=now - 600, os_build="25E253"), name="new.panic"
    )
    write_panic(reports, Panic(kind="watchdog", pid=8, ts=now - 3 * 86400), name="old.panic")
    proc = run(mg_home, "panics", reports=reports)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0] == f"2 panic report(s) in {reports}"
    assert lines[1].split() == ["TIME", "SIGNATURE", "AT", "PID", "PROCESS", "OS", "IOGPU", "FILE"]
    assert "gpu_watchdog" in lines[2] and "old.panic" in lines[2]
    assert "prepare_count_underflow" in lines[3] and "IOGPUMemory.cpp:550" in lines[3]
    assert "25E253" in lines[3]
    (summary,) = [line for line in lines if "of them" in line]
    assert "1 of them is an IOGPU kernel panic" in summary
    code, doc = run_json(mg_home, "panics", "--since", "24", reports=reports)
    assert code == 0 and [r["pid"] for r in doc["panics"]] == [7]
    assert doc["panics"][0]["signature"] == "prepare_count_underflow"
    other = tmp_path / "other"
    write_panic(other, Panic(kind="323", pid=9, ts=now - 5))
    code, doc = run_json(mg_home, "panics", "--dir", str(other), reports=reports)
    assert [r["pid"] for r in doc["panics"]] == [9] and doc["report_dir"] == str(other)
    missing = run(mg_home, "panics", "--dir", str(tmp_path / "missing"))
    assert missing.returncode == 1 and "no such folder" in missing.stderr
    code, doc = run_json(mg_home, "panics", "--dir", str(tmp_path / "missing"))
    assert code == 1 and "no such folder" in doc["error"]
    empty = run(mg_home, "panics")
    assert empty.returncode == 0 and empty.stdout.startswith("0 panic report(s)")
    # the archive
    assert run(mg_home, "panics", "--archive", reports=reports).stdout.startswith("0 panic")
    run(mg_home, "check", "org/m", reports=reports)  # archives the reports
    code, doc = run_json(mg_home, "panics", "--archive", reports=reports)
    assert code == 0 and [r["pid"] for r in doc["panics"]] == [8, 7]
    assert os.listdir(mg_home) and not os.path.exists(os.path.join(mg_home, "breaker.json"))


def test_cadence_show_and_clear(mg_home: str) -> None:
    guard = mg.CadenceGuard()
    guard.admit("org/a")
    guard.mark_load("org/b", ts=time.time() - 30)
    proc = run(mg_home, "cadence")
    assert proc.returncode == 0 and "org/a" in proc.stdout and "org/b" in proc.stdout
    code, doc = run_json(mg_home, "cadence", "show", "--min-interval", "10")
    assert code == 0 and {e["model_id"] for e in doc["events"]} == {"org/a", "org/b"}
    assert doc["min_interval_sec"] == 10
    code, doc = run_json(mg_home, "cadence", "clear", "org/a")
    assert code == 0 and doc["removed"] == 1
    proc = run(mg_home, "cadence", "clear")
    assert proc.returncode == 0 and "1 model(s) forgotten" in proc.stdout
    assert run_json(mg_home, "cadence")[1]["events"] == []


def test_cadence_clear_on_a_fresh_home_creates_nothing(mg_home: str) -> None:
    code, doc = run_json(mg_home, "cadence", "clear")
    assert code == 0 and doc["removed"] == 0
    assert os.listdir(mg_home) == []


def test_cadence_clear_that_cannot_touch_the_store_is_an_error(
    mg_home: str, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text('{"org/a": 1.0}')
    (Path(mg_home) / "cadence.json").symlink_to(target)
    proc = run(mg_home, "cadence", "clear")
    store = Path(mg_home) / "cadence.json"
    assert (
        proc.returncode == 1 and f"metal-guard cadence: error: cannot use {store}: " in proc.stderr
    )
    assert "strict=True" not in proc.stderr  # no library advice to a shell user
    assert target.read_text() == '{"org/a": 1.0}'  # untouched, and not claimed as cleared


def test_cadence_clear_with_a_file_where_the_folder_should_be(tmp_path: Path) -> None:
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    proc = run(str(home), "cadence", "clear")
    assert proc.returncode == 1
    assert f"cannot use {home}: state folder is not a directory" in proc.stderr
    assert home.read_text() == ""


def test_status_says_when_a_file_sits_where_the_folder_should_be(tmp_path: Path) -> None:
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    proc = run(str(home), "status")
    assert proc.returncode == 0
    (line,) = [x for x in proc.stdout.splitlines() if x.strip().startswith("state folder")]
    assert "NOT a folder" in line and "not created yet" not in line
    code, doc = run_json(str(home), "status")
    assert code == 0
    assert doc["state_folder_exists"] is False and "NOT a folder" in doc["state_folder_note"]


def test_cadence_show_model(mg_home: str) -> None:
    mg.CadenceGuard(min_interval_sec=180).mark_load("org/a")
    mg.CadenceGuard(min_interval_sec=180).mark_load("org/b")
    code, doc = run_json(mg_home, "cadence", "show", "org/a")
    assert code == 0 and doc["model_id"] == "org/a" and doc["blocked"] is True
    assert [e["model_id"] for e in doc["model_events"]] == ["org/a"]
    assert {e["model_id"] for e in doc["events"]} == {"org/a", "org/b"}
    assert 170 < doc["remaining_sec"] <= 180
    proc = run(mg_home, "cadence", "show", "org/c")
    assert proc.returncode == 0 and "org/c: may load now" in proc.stdout
    # blocked only by another model's load: the verdict and the table agree
    gemma = "mlx-community/gemma-4-e4b-it-4bit"
    proc = run(mg_home, "cadence", "show", gemma)
    assert "BLOCKED" in proc.stdout and "nothing is blocked" not in proc.stdout


def test_models(mg_home: str) -> None:
    proc = run(mg_home, "models")
    assert proc.returncode == 0
    for key in mg.KNOWN_PANIC_MODELS:
        assert key in proc.stdout
    code, doc = run_json(mg_home, "models")
    assert code == 0 and [m["model_id"] for m in doc["models"]] == list(mg.KNOWN_PANIC_MODELS)
    proc = run(mg_home, "models", "/Users/me/models/gemma-4-31b-it-8bit")
    assert proc.returncode == 0 and proc.stdout.startswith(f"{GEMMA_PANIC}: known panic-tier")
    assert "recommendation" in proc.stdout and "upstream" in proc.stdout
    code, doc = run_json(mg_home, "models", "org/unknown")
    assert code == 0 and doc["known"] is False and doc["entry"] is None
    assert "not in the known-panic registry" in run(mg_home, "models", "org/unknown").stdout


def test_breadcrumbs(mg_home: str) -> None:
    assert run(mg_home, "breadcrumbs").stdout.startswith("no breadcrumbs in")
    for i in range(5):
        mg.metal_guard.breadcrumb(f"event {i}\nforged line")
    proc = run(mg_home, "breadcrumbs", "-n", "2")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 3
    assert lines[1].endswith("event 3\\nforged line") and lines[2].endswith("event 4\\nforged line")
    code, doc = run_json(mg_home, "breadcrumbs", "-n", "10")
    assert code == 0 and len(doc["lines"]) == 5
    assert doc["path"] == os.path.join(mg_home, "breadcrumbs.log")
    assert run_json(mg_home, "breadcrumbs", "-n", "0")[1]["lines"] == []
    off = run(mg_home, "breadcrumbs", env={"METALGUARD_BREADCRUMB_PATH": ""})
    assert off.returncode == 0 and "disabled" in off.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["check", "org/x"],
        ["panics"],
        ["breaker"],
        ["breaker", "status"],
        ["cadence"],
        ["models"],
        ["models", "org/x"],
        ["breadcrumbs"],
    ],
)
def test_json_flag_before_or_after_the_command(mg_home: str, args: list[str]) -> None:
    after = run(mg_home, *args, "--json")
    before = run(mg_home, "--json", *args)
    for proc in (after, before):
        assert proc.returncode == 0
        doc = json.loads(proc.stdout)  # exactly one JSON document
        assert doc["command"] == args[0] and doc["exit_code"] == 0


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["check"], "MODEL"),
        (["bogus"], "COMMAND"),
        (["check", "m", "--min-interval", "abc"], "--min-interval"),
        (["check", "m", "--min-interval", "-1"], "--min-interval"),
        (["check", "m", "--min-interval", "nan"], "--min-interval"),
        (["check", "m", "--cross-model-interval", "inf"], "--cross-model-interval"),
        (["check", "m", "--min-interval", "1e12"], "--min-interval"),
        (["check", ""], "MODEL"),
        (["check", "   "], "MODEL"),
        (["check", "x" * 5000], "MODEL"),
        (["check", "a", "b"], "unrecognized arguments: b"),
        (["panics", "--since", "-2"], "--since"),
        (["panics", "--since", "soon"], "--since"),
        (["breadcrumbs", "-n", "-3"], "-n"),
        (["breadcrumbs", "-n", "1.5"], "-n"),
        (["breaker", "reset"], "'reset'"),
        (["cadence", "wipe"], "'wipe'"),
        (["status", "extra"], "unrecognized arguments: extra"),
        (["models", "a", "b"], "unrecognized arguments: b"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
    ids=lambda v: " ".join(v)[:40] if isinstance(v, list) else None,
)
def test_usage_errors_exit_64(mg_home: str, args: list[str], names: str) -> None:
    proc = run(mg_home, *args)
    assert proc.returncode == 64
    assert proc.stderr.startswith("usage: metal-guard")
    (error,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert names in error  # the message names what is wrong
    assert proc.stdout == ""
    assert os.listdir(mg_home) == []


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--json", "check"], "MODEL"),
        (["check", "--json", "m", "-n"], "-n"),
        (["--json", "bogus"], "bogus"),
    ],
)
def test_usage_errors_with_json_print_one_document(
    mg_home: str, args: list[str], names: str
) -> None:
    proc = run(mg_home, *args)
    assert proc.returncode == 64
    assert proc.stderr.startswith("usage: metal-guard")
    doc = json.loads(proc.stdout)  # exactly one JSON document
    assert doc["exit_code"] == 64 and names in doc["error"]
    assert set(doc) == {"command", "exit_code", "error"}


def test_panics_since_message_speaks_in_hours(mg_home: str) -> None:
    proc = run(mg_home, "panics", "--since", "-1")
    assert proc.returncode == 64
    assert "hours must be >= 0" in proc.stderr and "seconds" not in proc.stderr


def test_environment_errors_exit_1(tmp_path: Path) -> None:
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    proc = run(str(home), "breaker", "clear")
    assert proc.returncode == 1
    assert f"metal-guard breaker: error: cannot use {home}: " in proc.stderr
    assert "state folder is not a directory" in proc.stderr
    code, doc = run_json(str(home), "breaker", "clear")
    assert code == 1 and doc["exit_code"] == 1
    assert "state folder is not a directory" in doc["error"]
    assert run(str(home), "status").returncode == 0  # showing state still works
    proc = run(str(home), "check", "org/m")
    assert proc.returncode == 1  # no state can be read there: it cannot tell
    proc = run(str(home), "check", "org/m", "--admit")
    # the load could not be recorded: a shell wrapper must be able to tell (exit 1)
    assert proc.returncode == 1
    assert f"metal-guard check: error: cannot use {home}: " in proc.stderr
    code, doc = run_json(str(home), "check", "org/m", "--admit")
    assert code == 1 and "state folder is not a directory" in doc["error"]
    assert not home.read_text()


# the commands that need the state folder (to change state, or to decide on it)
NEED_STATE = [["breaker", "clear"], ["cadence", "clear"], ["cadence", "clear", "org/m"]]
NEED_STATE += [["check", "org/m"], ["check", "org/m", "--admit"]]
NEED_STATE += [["check", "org/m", "--admit", "--wait"]]


@pytest.mark.parametrize("args", NEED_STATE, ids=" ".join)
def test_a_file_for_a_state_folder_reads_the_same_in_every_command(
    tmp_path: Path, args: list[str]
) -> None:
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    fault = (
        f"cannot use {home}: state folder is not a directory (METALGUARD_HOME must name a "
        "folder: move the file aside or point it elsewhere)"
    )
    proc = run(str(home), *args)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"metal-guard {args[0]}: error: {fault}\n"
    code, doc = run_json(str(home), *args)
    assert (code, doc) == (1, {"command": args[0], "exit_code": 1, "error": fault})
    assert home.read_text() == ""


def test_every_subcommand_help_says_what_it_does_and_its_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, subparsers = mg._cli_parser()
    assert {"status", "check", "breaker", "cadence", "panics", "lock"} <= set(subparsers)
    for name, parser in subparsers.items():
        description = parser.description or ""
        assert description.strip() and "\n" not in description, name
        assert mg.main([name, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert description in text, name
        assert "Exit codes: 0 " in text and "1 error" in text and "64 usage error" in text, name
    assert mg.main(["breaker", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "status (default): the state" in text and "clear: end a cooldown" in text
    assert mg.main(["check", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "2 blocked" in text and "--wait [SEC]" in text


# -- check with state it cannot read --------------------------------------------------

CORRUPT = {"garbage": "{not json", "not an object": "[1, 2]", "binary": "\udcff"}


@pytest.mark.parametrize("name", ["breaker.json", "cadence.json"])
@pytest.mark.parametrize("content", list(CORRUPT), ids=str)
def test_check_with_a_corrupt_state_file_says_unreadable(
    mg_home: str, name: str, content: str
) -> None:
    path = Path(mg_home) / name
    path.write_bytes(CORRUPT[content].encode("utf-8", "surrogateescape"))
    before = path.read_bytes()
    fix = f"`metal-guard {name.removesuffix('.json')} clear`"
    proc = run(mg_home, "check", "org/m")
    assert proc.returncode == 1
    (line,) = [x for x in proc.stdout.splitlines() if "unreadable:" in x]
    assert str(path) in line and "move it aside" in line and fix in line
    assert "UNREADABLE state" in proc.stdout.splitlines()[0]
    code, doc = run_json(mg_home, "check", "org/m", "--admit")
    assert code == 1 and doc["decision"] == "error" and doc["cadence"]["admitted"] is False
    assert list(doc["unreadable"]) == [name]
    entry = doc["unreadable"][name]
    assert entry["path"] == str(path) and fix in entry["what_to_do"] and entry["problem"]
    assert "unreadable" in doc["error"] and str(path) in doc["error"]
    assert path.read_bytes() == before  # left for the user to look at; nothing recorded
    # what it says to do works
    assert run(mg_home, name.removesuffix(".json"), "clear").returncode == 0
    assert run(mg_home, "check", "org/m").returncode == 0


def test_check_with_both_state_files_unreadable_names_both(mg_home: str) -> None:
    (Path(mg_home) / "breaker.json").write_text("garbage")
    (Path(mg_home) / "cadence.json").mkdir()
    code, doc = run_json(mg_home, "check", "org/m")
    assert code == 1 and sorted(doc["unreadable"]) == ["breaker.json", "cadence.json"]
    proc = run(mg_home, "check", "org/m")
    assert proc.returncode == 1 and proc.stdout.count("unreadable:") == 2


def test_control_characters_are_escaped_in_human_output(mg_home: str) -> None:
    proc = run(mg_home, "check", "org/evil\x1b[2Jname\tx")
    assert proc.returncode == 0
    assert "\x1b" not in proc.stdout and "\t" not in proc.stdout


def test_running_the_file_directly(mg_home: str) -> None:
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "metal_guard.py"), "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, "METALGUARD_HOME": mg_home},
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, f"metal-guard {mg.__version__}\n")


# -- main() in process ---------------------------------------------------------------


def test_main_in_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METALGUARD_PANIC_REPORT_DIR", "/nonexistent-metal-guard-reports")
    assert mg.main(["--version"]) == 0
    assert capsys.readouterr().out == f"metal-guard {mg.__version__}\n"
    assert mg.main(["bogus"]) == 64  # returns, never raises SystemExit
    assert "usage:" in capsys.readouterr().err
    assert mg.main(["--help"]) == 0
    capsys.readouterr()
    assert mg.main(("check", "org/x")) == 0  # type: ignore[arg-type]
    assert capsys.readouterr().out.startswith("check org/x: GO")
    monkeypatch.setattr(sys, "argv", ["metal-guard", "models", "--json"])
    assert mg.main() == 0
    assert json.loads(capsys.readouterr().out)["command"] == "models"


def test_main_reports_unexpected_failures(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(mg._COMMANDS, "models", broken)
    assert mg.main(["models"]) == 1
    err = capsys.readouterr().err
    assert "metal-guard models: error: RuntimeError: disk on fire" in err


def test_check_admit_with_an_older_record_and_an_unusable_store_exits_1(
    mg_home: str, tmp_path: Path
) -> None:
    """An older record must not pass for "recorded" when this load could not be written."""
    mg.CadenceGuard().mark_load("org/old", ts=time.time() - 1000)
    lock = Path(mg_home) / "cadence.json.lock"
    lock.unlink()
    lock.symlink_to(tmp_path / "elsewhere")  # the lock is refused: the store fails open
    proc = run(mg_home, "check", "org/old", "--admit", "--min-interval", "60")
    assert proc.returncode == 1
    assert "could NOT be recorded" in proc.stdout and "load recorded" not in proc.stdout


def test_admit_says_whether_it_recorded(mg_home: str, tmp_path: Path) -> None:
    guard = mg.CadenceGuard(min_interval_sec=0)
    assert guard.admit("org/a") is True
    (Path(mg_home) / "cadence.json.lock").unlink()
    (Path(mg_home) / "cadence.json.lock").symlink_to(tmp_path / "elsewhere")
    assert guard.admit("org/a") is False  # failed open: admitted, not recorded


def test_abbreviated_options_are_usage_errors(mg_home: str) -> None:
    proc = run(mg_home, "models", "--js")  # not silently --json
    assert proc.returncode == 64 and "unrecognized arguments: --js" in proc.stderr


# -- check --admit --wait ----------------------------------------------------------------


def test_check_admit_wait_waits_for_the_cadence(mg_home: str) -> None:
    assert run(mg_home, "check", "org/m", "--admit", "--min-interval", "1.5").returncode == 0
    code, doc = run_json(mg_home, "check", "org/m", "--admit", "--min-interval", "1.5", "--wait")
    assert code == 0 and doc["decision"] == "go" and doc["cadence"]["admitted"] is True
    assert 0.5 <= doc["cadence"]["waited_sec"] <= 1.5 + 5
    crumbs = Path(mg_home, "breadcrumbs.log").read_text()
    assert crumbs.count("CADENCE_WAIT: org/m") == 1
    proc = run(mg_home, "check", "org/m", "--admit", "--min-interval", "1.5", "--wait")
    assert proc.returncode == 0 and "load recorded after waiting" in proc.stdout
    assert "WARNING: metal_guard: cadence: waiting" in proc.stderr


def test_check_admit_wait_seconds_then_blocked(mg_home: str) -> None:
    assert run(mg_home, "check", "org/m", "--admit").returncode == 0
    args = ["check", "org/m", "--admit", "--min-interval", "60", "--wait=0.5"]
    code, doc = run_json(mg_home, *args)
    assert code == 2 and doc["blocked_by"] == ["cadence"] and doc["cadence"]["admitted"] is False
    assert 0.4 <= doc["cadence"]["waited_sec"] <= 1.5
    assert 58 < doc["cadence"]["remaining_sec"] < 60


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--wait"], "--wait needs --admit"),
        (["--admit", "--wait=-1"], "expected a number of seconds >= 0"),
        (["--admit", "--wait=soon"], "expected a number of seconds >= 0"),
        (["--admit", "--wait=nan"], "expected a number of seconds >= 0"),
    ],
)
def test_check_bad_wait_is_a_usage_error(mg_home: str, args: list[str], words: str) -> None:
    proc = run(mg_home, "check", "org/m", *args)
    assert proc.returncode == 64 and words in proc.stderr
    assert not Path(mg_home, "cadence.json").exists()
