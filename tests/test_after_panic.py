"""After a kernel panic: the post-panic gate, ``diagnose``/``ack``/``postmortem``, the
likely-trigger reading of the breadcrumbs, and the stuck-GPU-work watch.

The panic reports are the realistic two-document ``.panic`` files of
``panic_fixtures`` (macOS writes them; on Linux the test writes them into a folder
that ``METALGUARD_PANIC_REPORT_DIR`` points at). Everything else is real: files,
processes, signals, the command line.
"""

from __future__ import annotations

import datetime
import json
import pickle
import signal
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import (
    breadcrumb_messages,
    child_env,
    run_python,
    spy_report_reads,
    warnings_from,
)
from panic_fixtures import Panic, write_panic

# -- helpers ----------------------------------------------------------------------------


@pytest.fixture
def reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty panic-report folder the library reads instead of the system's."""
    folder = tmp_path / "DiagnosticReports"
    folder.mkdir()
    monkeypatch.setenv("METALGUARD_PANIC_REPORT_DIR", str(folder))
    return folder


def panic_ago(folder: Path, seconds: float, **fields: Any) -> Panic:
    """Write an IOGPU panic report dated ``seconds`` ago (distinct pids give distinct files)."""
    fields.setdefault("pid", 40000 + int(seconds) % 20000)
    p = Panic(ts=time.time() - seconds, **fields)
    write_panic(folder, p)
    return p


def cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = mg.main(list(args))
    return code, capsys.readouterr().out


def cli_json(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code, out = cli(*args, "--json", capsys=capsys)
    return code, json.loads(out)


def crumb(ts: float, pid: int, message: str) -> str:
    """A breadcrumb line as the library writes it (``<local ISO time> pid=<n> <message>``)."""
    stamp = datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="microseconds")
    return f"{stamp} pid={pid} {message}"


# -- the post-panic gate ----------------------------------------------------------------


def test_one_recent_panic_refuses_check_and_load_admission(
    mg_home: str, reports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = panic_ago(reports, 120, process="mlx_lm.server")
    code, out = cli("check", "mlx-community/Llama-3.2-1B-Instruct-4bit", capsys=capsys)
    assert code == 2 and "BLOCKED by post-panic gate" in out
    assert "kernel-panicked at" in out and "mlx_lm.server" in out
    assert "prepare count underflow" in out and "metal-guard diagnose" in out
    assert "Refused for" in out  # the time left
    with pytest.raises(mg.MLXCooldownActive) as caught:
        mg.require_cadence_clear("mlx-community/Llama-3.2-1B-Instruct-4bit")
    assert 470 < caught.value.remaining_sec <= 480
    assert caught.value.cooldown_until == pytest.approx(p.ts + 600, abs=1)
    # the first check archived the report
    archived = mg.read_panic_archive()
    assert [r["pid"] for r in archived] == [p.pid]
    # the refusal survives pickling (a worker sends it to its parent)
    again = pickle.loads(pickle.dumps(caught.value))
    assert isinstance(again, mg.MLXCooldownActive) and str(again) == str(caught.value)


def test_cadence_scope_and_runner_start_are_refused(mg_home: str, reports: Path) -> None:
    panic_ago(reports, 60)
    with pytest.raises(mg.MLXCooldownActive), mg.cadence_scope("org/model"):
        pytest.fail("the body must not run")
    with pytest.raises(mg.MLXCooldownActive):
        mg.MLXSubprocessRunner("org/model")  # refused before a worker is spawned
    assert mg.read_mlx_lock() is None  # the runner took no lock


def test_cooldown_past_everything_goes_ahead(
    mg_home: str, reports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    panic_ago(reports, 601)
    code, _ = cli("check", "org/model", capsys=capsys)
    assert code == 0
    mg.require_cadence_clear("org/model")  # admitted
    assert "CADENCE_ADMIT: org/model" in breadcrumb_messages(mg_home)


def test_a_shorter_cooldown_from_the_environment(
    mg_home: str, reports: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    panic_ago(reports, 120)
    monkeypatch.setenv("METALGUARD_PANIC_COOLDOWN", "60")
    mg.require_cadence_clear("org/model")
    monkeypatch.setenv("METALGUARD_PANIC_COOLDOWN", "300")
    with pytest.raises(mg.MLXCooldownActive, match="METALGUARD_PANIC_COOLDOWN=300 s"):
        mg.require_cadence_clear("org/other")


def test_only_iogpu_panics_count(mg_home: str, reports: Path) -> None:
    panic_ago(reports, 60, kind="watchdog")
    mg.require_cadence_clear("org/model")


@pytest.mark.skipif("run" not in mg._COMMANDS, reason="the run command is not merged yet")
def test_run_is_refused_without_running_the_command(
    mg_home: str, reports: Path, tmp_path: Path
) -> None:
    panic_ago(reports, 120)
    marker = tmp_path / "ran"
    proc = run_python(
        "import sys, metal_guard; sys.exit(metal_guard.main(sys.argv[1:]))",
        "run",
        "--",
        sys.executable,
        "-c",
        f"open({str(marker)!r}, 'w').write('hi')",
        env=child_env(METALGUARD_HOME=mg_home, METALGUARD_PANIC_REPORT_DIR=str(reports)),
    )
    assert proc.returncode == 2, proc.stderr
    assert "metal-guard diagnose" in proc.stdout + proc.stderr
    assert not marker.exists()


def test_two_panics_in_a_day_lock_out_until_ack(
    mg_home: str, reports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    panic_ago(reports, 3 * 3600)
    panic_ago(reports, 2 * 3600)
    code, doc = cli_json("check", "org/model", capsys=capsys)
    assert code == 2 and doc["blocked_by"] == ["post-panic gate"]
    assert doc["post_panic"]["needs_ack"] is True and doc["breaker"]["blocked"] is False
    code, out = cli("check", "org/model", capsys=capsys)
    assert code == 2 and "2 IOGPU kernel panics within 24 h" in out
    assert "`metal-guard ack`" in out
    with pytest.raises(mg.MLXCooldownActive, match="metal-guard ack"):
        mg.require_cadence_clear("org/model")
    code, out = cli(capsys=capsys)
    assert code == 0 and "metal-guard diagnose" in out  # bare: points to diagnose
    code, doc = cli_json("ack", "--note", "moved to a smaller model", capsys=capsys)
    assert code == 0 and len(doc["panics"]) == 2
    code, _ = cli("check", "org/model", capsys=capsys)
    assert code == 0
    mg.require_cadence_clear("org/model")
    archived = mg.read_panic_archive()
    assert len(archived) == 2
    assert all(r["acknowledged_at"] == doc["acked_at"] for r in archived)
    assert all(r["ack_note"] == "moved to a smaller model" for r in archived)
    assert any(m.startswith("PANIC_ACK: 2 panic(s)") for m in breadcrumb_messages(mg_home))
    code, out = cli(capsys=capsys)
    assert "no unacknowledged kernel panic" in out
    # a panic after the ack (the next boot): its own cooldown again
    time.sleep(0.05)
    write_panic(reports, Panic(ts=time.time(), pid=4242))
    with pytest.raises(mg.MLXCooldownActive, match="Refused for"):
        mg.require_cadence_clear("org/next")


@pytest.mark.parametrize(
    ("ages_h", "locked"),
    [
        ((30, 29), True),  # a day ago and more: still locked until ack
        ((150, 140), True),
        ((72, 1.5), False),  # two panics, but not within 24 h of each other
        ((200, 190), False),  # older than the 7 days the gate remembers
    ],
)
def test_a_lockout_lasts_until_ack(
    mg_home: str, reports: Path, ages_h: tuple[float, float], locked: bool
) -> None:
    for age in ages_h:
        panic_ago(reports, age * 3600)
    refusal = mg._post_panic_refusal()
    assert (refusal is not None) == locked
    if locked:
        assert refusal is not None and "metal-guard ack" in str(refusal)
        # without an ack: until the gate forgets the older panic, a week after it
        assert refusal.remaining_sec == pytest.approx(7 * 86400 - ages_h[0] * 3600, abs=5)
        mg._acknowledge_panics()
        assert mg._post_panic_refusal() is None


def test_lockout_zero_turns_it_off(
    mg_home: str, reports: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    panic_ago(reports, 3 * 3600)
    panic_ago(reports, 2 * 3600)
    monkeypatch.setenv("METALGUARD_PANIC_LOCKOUT", "0")
    mg.require_cadence_clear("org/model")
    monkeypatch.setenv("METALGUARD_PANIC_LOCKOUT", "3")
    mg.require_cadence_clear("org/other")
    monkeypatch.setenv("METALGUARD_PANIC_LOCKOUT", "2")
    with pytest.raises(mg.MLXCooldownActive):
        mg.require_cadence_clear("org/third")


def test_observer_mode_warns_instead(
    mg_home: str,
    reports: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    panic_ago(reports, 120)
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    mg.require_cadence_clear("org/model")  # goes ahead
    [warning] = warnings_from(caplog, "would refuse")
    assert "kernel-panicked" in warning.getMessage()
    messages = breadcrumb_messages(mg_home)
    assert any(m.startswith("OBSERVE: would refuse _PostPanicRefusal") for m in messages)
    assert "CADENCE_ADMIT: org/model" in messages
    code, doc = cli_json("check", "org/other", capsys=capsys)
    assert code == 0 and doc["would_refuse_by"] == ["post-panic gate"]
    assert doc["post_panic"]["would_refuse"] is True and not doc["post_panic"]["blocked"]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("METALGUARD_PANIC_COOLDOWN", "ten minutes", "refused"),
        ("METALGUARD_PANIC_COOLDOWN", "-5", "refused"),
        ("METALGUARD_PANIC_COOLDOWN", "nan", "refused"),
        ("METALGUARD_PANIC_LOCKOUT", "two", "locked"),
        ("METALGUARD_PANIC_LOCKOUT", "1.5", "locked"),
    ],
)
def test_garbage_settings_warn_and_use_the_default(
    mg_home: str,
    reports: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    name: str,
    value: str,
    expected: str,
) -> None:
    if expected == "refused":
        panic_ago(reports, 300)  # inside the default 600 s
    else:
        panic_ago(reports, 3 * 3600)
        panic_ago(reports, 2 * 3600)  # the default lockout of 2
    monkeypatch.setenv(name, value)
    with pytest.raises(mg.MLXCooldownActive) as caught:
        mg.require_cadence_clear("org/model")
    assert ("metal-guard ack" in str(caught.value)) == (expected == "locked")
    [warning] = warnings_from(caplog, name)
    assert "using the default" in warning.getMessage()


def test_unusable_state_files_still_see_the_reports(
    mg_home: str, reports: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Path(mg_home, "post_panic.json").mkdir()  # a folder where the state file should be
    Path(mg_home, "panics.jsonl").mkdir()  # and where the archive should be
    panic_ago(reports, 60)
    # the gate still sees the report it can read, and refuses
    with pytest.raises(mg.MLXCooldownActive):
        mg.require_cadence_clear("org/model")
    assert len(warnings_from(caplog, "cannot archive panic reports")) == 1
    caplog.clear()
    Path(mg_home, "post_panic.json").rmdir()
    Path(mg_home, "post_panic.json").write_text("{not json")
    with pytest.raises(mg.MLXCooldownActive):  # corrupt state: quarantined and rebuilt
        mg.require_cadence_clear("org/model")


def test_an_unchanged_report_folder_is_not_read_again(
    mg_home: str, reports: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    panic_ago(reports, 7200)
    for i in range(5):
        (reports / f"python3.12-2026-01-0{i + 1}-101010.ips").write_text('{"bug_type":"309"}\n{}\n')
    assert mg._post_panic_refusal() is None
    mg._reset_process_state()  # as a fresh process: no per-process caches
    reads = spy_report_reads(monkeypatch)
    assert mg._post_panic_refusal() is None
    assert [r for r in reads if r[0].startswith(str(reports))] == []
    p = panic_ago(reports, 10)  # a new report changes the folder: scanned again
    refusal = mg._post_panic_refusal()
    assert refusal is not None and f"pid {p.pid}" in str(refusal)
    assert any(r[0].startswith(str(reports)) for r in reads)


def test_status_and_breaker_keep_their_own_rules(mg_home: str, reports: Path) -> None:
    panic_ago(reports, 120)
    breaker = mg.CircuitBreaker()
    breaker.check()  # one panic: the breaker's 2-per-hour rule does not trip
    assert breaker.status()["cooling_down"] is False
    assert mg._post_panic_status()["refused"] is True


# -- likely triggers (pure) --------------------------------------------------------------

PANIC_TS = 1_776_900_000.0


def _lines(*events: tuple[float, int, str]) -> list[str]:
    return [crumb(PANIC_TS - ago, pid, message) for ago, pid, message in events]


TRIGGER_FIXTURES: dict[str, list[tuple[float, int, str]]] = {
    "load_after_unload": [
        (200, 11, "CADENCE_ADMIT: org/a"),
        (90, 11, "CADENCE_UNLOAD: org/a"),
        (40, 11, "CADENCE_ADMIT: org/b"),
    ],
    "concurrent_generation": [
        (60, 11, "SUBPROC_PRE: org/a"),
        (50, 22, "SUBPROC_PRE: org/b"),
        (30, 11, "SUBPROC_POST: org/a"),
        (20, 22, "SUBPROC_POST: org/b"),
    ],
    "wired_limit_request": [
        (
            100,
            11,
            "WIRED_LIMIT: requested=128849018880 (120.00 GiB) applied=1 (0.00 GiB) policy=cap",
        ),
    ],
    "generate_in_flight": [
        (100, 11, "SUBPROC_PRE: org/a"),
        (80, 11, "SUBPROC_POST: org/a"),
        (10, 11, "SUBPROC_PRE: org/a"),
    ],
    "gemma4_first_generate": [
        (30, 11, "GEMMA4_FLUSH: mlx-community/gemma-4-e4b-it-4bit"),
        (25, 11, "GEMMA4_FLUSH_DONE: mlx-community/gemma-4-e4b-it-4bit"),
        (20, 11, "SUBPROC_PRE: gemma"),
        (15, 11, "SUBPROC_POST: gemma"),
    ],
}


@pytest.mark.parametrize("trigger", sorted(TRIGGER_FIXTURES))
def test_each_trigger_is_named_with_its_lines(trigger: str) -> None:
    lines = _lines(*TRIGGER_FIXTURES[trigger])
    found = mg._likely_triggers(lines, PANIC_TS)
    assert [f["trigger"] for f in found] == [trigger]
    assert found[0]["lines"] and set(found[0]["lines"]) <= set(lines)


def test_trigger_evidence_is_quoted_exactly() -> None:
    lines = _lines(*TRIGGER_FIXTURES["load_after_unload"])
    [finding] = mg._likely_triggers(lines, PANIC_TS)
    assert finding["lines"] == [lines[1], lines[2]]
    assert "50 s after an unload" in finding["summary"]
    lines = _lines(*TRIGGER_FIXTURES["concurrent_generation"])
    [finding] = mg._likely_triggers(lines, PANIC_TS)
    assert finding["lines"] == lines and "pid 11 and pid 22" in finding["summary"]


@pytest.mark.parametrize(
    "events",
    [
        [],
        [
            (100, 11, "CADENCE_ADMIT: org/a"),
            (90, 11, "SUBPROC_PRE: org/a"),
            (80, 11, "SUBPROC_POST: org/a"),
        ],
        # a load long after the unload; one process generating at a time
        [
            (290, 11, "CADENCE_UNLOAD: org/a"),
            (60, 11, "CADENCE_ADMIT: org/b"),
            (50, 11, "SUBPROC_PRE: org/b"),
            (45, 11, "SUBPROC_POST: org/b"),
            (40, 22, "SUBPROC_PRE: org/c"),
            (35, 22, "SUBPROC_POST: org/c"),
        ],
        # everything that would be a trigger, but after the panic or long before it
        [
            (-5, 11, "SUBPROC_PRE: org/a"),
            (-6, 11, "WIRED_LIMIT: requested=1"),
            (4000, 11, "GEMMA4_FLUSH: gemma-4"),
            (3990, 11, "SUBPROC_PRE: x"),
        ],
    ],
)
def test_no_trigger_when_the_breadcrumbs_show_nothing(
    events: list[tuple[float, int, str]],
) -> None:
    lines = [*_lines(*events), "not a breadcrumb line", ""]
    assert mg._likely_triggers(lines, PANIC_TS) == []


def test_the_original_line_format_is_read() -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(PANIC_TS - 30))
    [finding] = mg._likely_triggers([f"[{stamp}] WIRED_LIMIT: requested=1"], PANIC_TS)
    assert finding["trigger"] == "wired_limit_request"


# -- diagnose on fixtures ----------------------------------------------------------------


@pytest.mark.parametrize("trigger", sorted(TRIGGER_FIXTURES))
def test_diagnose_names_the_trigger(
    mg_home: str, reports: Path, capsys: pytest.CaptureFixture[str], trigger: str
) -> None:
    p = panic_ago(reports, 120)
    events = TRIGGER_FIXTURES[trigger]
    lines = [crumb(p.ts - ago, pid, message) for ago, pid, message in events]
    noise = [crumb(p.ts - 3000, 5, "CADENCE_ADMIT: long/before"), crumb(p.ts + 400, 6, "boot")]
    Path(mg_home, "breadcrumbs.log").write_text("\n".join([noise[0], *lines, noise[1]]) + "\n")
    code, doc = cli_json("diagnose", capsys=capsys)
    assert code == 0
    [entry] = doc["panics"]
    assert entry["process"] == "python3.12" and entry["signature"] == "prepare_count_underflow"
    assert "prepare count underflow" in entry["what"]
    assert [t["trigger"] for t in entry["triggers"]] == [trigger]
    assert entry["breadcrumbs"] == lines  # the minutes before, nothing after
    assert any(
        "cadence" in s or "GPU" in s or "gemma" in s or "guard" in s for s in doc["next_steps"]
    )
    code, out = cli("diagnose", capsys=capsys)
    assert "likely trigger(s):" in out and lines[-1] in out


def test_diagnose_reads_the_library_s_own_breadcrumbs(
    mg_home: str, reports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with mg.cadence_scope("org/a", min_interval_sec=0):
        pass
    mg.require_cadence_clear("org/b", min_interval_sec=0)
    time.sleep(0.01)
    write_panic(reports, Panic(ts=time.time(), pid=777))
    _, doc = cli_json("diagnose", capsys=capsys)
    [finding] = doc["panics"][0]["triggers"]
    assert finding["trigger"] == "load_after_unload"
    assert finding["lines"][0].endswith("CADENCE_UNLOAD: org/a")
    assert finding["lines"][1].endswith("CADENCE_ADMIT: org/b")


def test_diagnose_without_breadcrumbs_names_no_trigger(
    mg_home: str, reports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    panic_ago(reports, 120)
    code, doc = cli_json("diagnose", capsys=capsys)
    assert code == 0 and doc["panics"][0]["triggers"] == []
    assert doc["gate"]["refused"] is True
    _, out = cli("diagnose", capsys=capsys)
    assert "likely trigger: none shown by the breadcrumbs" in out


def test_diagnose_with_no_panic(
    mg_home: str, reports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = cli_json("diagnose", capsys=capsys)
    assert code == 0 and doc["panics"] == [] and doc["gate"]["refused"] is False
    assert doc["next_steps"][-1] == "No kernel panic on record: nothing to do."


# -- postmortem --------------------------------------------------------------------------

USER = "zoeqmrxuser"


def test_postmortem_archive_is_complete_and_anonymous(
    mg_home: str, reports: Path, tmp_path: Path
) -> None:
    home = tmp_path / "Users" / USER
    home.mkdir(parents=True)
    secret_path = f"{home}/models/ZoeqMrxUser-finetune"
    p = Panic(
        ts=time.time() - 120,
        process="python3.12",
        extra_text=f"last file: {secret_path}/weights.safetensors owner {USER}",
    )
    report = write_panic(reports, p)
    Path(mg_home, "breadcrumbs.log").write_text(
        crumb(p.ts - 30, 11, f"CADENCE_ADMIT: {secret_path}")
        + "\n"
        + crumb(p.ts - 20, 11, "SUBPROC_PRE: x")
        + "\n"
    )
    out = tmp_path / "bundle.tar.gz"
    env = child_env(
        HOME=str(home),
        USER=USER,
        LOGNAME=USER,
        METALGUARD_HOME=mg_home,
        METALGUARD_PANIC_REPORT_DIR=str(reports),
        METALGUARD_CROSS_MODEL_INTERVAL="30",
        MLX_METAL_DEBUG=f"{home}/debug",
    )
    proc = run_python(
        "import sys, metal_guard; sys.exit(metal_guard.main(sys.argv[1:]))",
        "postmortem",
        "-o",
        str(out),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    with tarfile.open(out) as archive:
        members = {
            m.name.split("/", 1)[1]: archive.extractfile(m).read()  # type: ignore[union-attr]
            for m in archive.getmembers()
        }
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(p.ts))
    assert set(members) == {
        f"panic-reports/{report.name}",
        f"breadcrumbs/{stamp}.log",
        "status.json",
        "audit.json",
        "diagnose.json",
        "versions.json",
        "environment.json",
        "apple-feedback.md",
    }
    for name, data in members.items():
        text = data.decode("utf-8")
        assert text.strip(), name
        assert str(home) not in text, name
        assert USER.lower() not in text.lower(), name
    panic_report = members[f"panic-reports/{report.name}"].decode()
    assert "~/models/<user>-finetune/weights.safetensors owner <user>" in panic_report
    assert "prepare count underflow" in panic_report  # otherwise as macOS wrote it
    env_doc = json.loads(members["environment.json"])
    assert env_doc["METALGUARD_CROSS_MODEL_INTERVAL"] == "30"
    assert env_doc["MLX_METAL_DEBUG"] == "~/debug"
    assert "CADENCE_ADMIT: ~/models/<user>-finetune" in members[f"breadcrumbs/{stamp}.log"].decode()
    assert json.loads(members["diagnose.json"])["panics"][0]["triggers"]
    assert "panic string:" in members["apple-feedback.md"].decode().lower()
    assert json.loads(members["versions.json"])["metal-guard"] == mg.__version__


@pytest.mark.parametrize(
    ("text", "home", "user", "expected"),
    [
        ("/Users/ann/x and /Users/ann", "/Users/ann", "ann", "~/x and ~"),
        ("Ann's model annotated by ANN", None, "ann", "<user>'s model <user>otated by <user>"),
        ("jo, jones and jo.txt", None, "jo", "<user>, jones and <user>.txt"),  # 2 letters: words
        ("nothing to hide", "/", "x", "nothing to hide"),  # "/" and one letter: left alone
    ],
)
def test_redaction(text: str, home: str | None, user: str, expected: str) -> None:
    assert mg._redact(text, home, user) == expected


def test_postmortem_as_zip(
    mg_home: str, reports: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    panic_ago(reports, 120)
    out = tmp_path / "bundle.zip"
    code, text = cli("postmortem", "-o", str(out), capsys=capsys)
    assert code == 0 and text.strip() == str(out)
    with zipfile.ZipFile(out) as archive:
        names = {n.split("/", 1)[1] for n in archive.namelist()}
        assert all(archive.read(n) for n in archive.namelist())
    assert "diagnose.json" in names and any(n.startswith("panic-reports/") for n in names)


def test_postmortem_into_a_missing_folder_is_an_error(
    mg_home: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = mg.main(["postmortem", "-o", str(tmp_path / "no" / "such" / "x.tar.gz")])
    assert code == 1 and "cannot write" in capsys.readouterr().err


# -- stuck GPU work ----------------------------------------------------------------------

STUCK_CHILD = """
import os, signal, time, metal_guard as mg
mg._on_stuck(lambda label, seconds: os.kill(os.getpid(), signal.SIGTERM))
print("started", flush=True)
with mg._stuck_watch("generate org/model"):
    time.sleep(60)
print("finished", flush=True)
"""


def test_a_step_past_the_limit_is_reported_and_the_process_stopped_with_term(
    mg_home: str,
) -> None:
    started = time.monotonic()
    proc = run_python(
        "import logging; logging.basicConfig()\n" + STUCK_CHILD,
        env=child_env(METALGUARD_HOME=mg_home, METALGUARD_STUCK_SEC="1"),
    )
    assert proc.returncode == -signal.SIGTERM
    assert time.monotonic() - started < 30
    assert "started" in proc.stdout and "finished" not in proc.stdout
    assert "GPU work 'generate org/model' has run for" in proc.stderr
    assert "reboot the Mac" in proc.stderr
    [stuck] = [m for m in breadcrumb_messages(mg_home) if m.startswith("GPU_STUCK:")]
    assert stuck.startswith("GPU_STUCK: generate org/model running for")


def test_steps_within_the_limit_report_nothing_and_leave_no_thread(
    mg_home: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("METALGUARD_STUCK_SEC", "30")
    called: list[str] = []
    remove = mg._on_stuck(lambda label, seconds: called.append(label))
    try:
        for _ in range(100):
            with mg._stuck_watch("step"):
                pass

        @mg._stuck_watch("decorated")
        def work() -> int:
            return 7

        assert work() == 7
        deadline = time.monotonic() + 10
        while any(t.name == "metal-guard stuck-work" for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the watcher thread did not exit when idle"
            time.sleep(0.1)
    finally:
        remove()
    assert called == [] and warnings_from(caplog) == []
    assert not any(m.startswith("GPU_STUCK") for m in breadcrumb_messages(mg_home))


def test_stuck_watch_off_and_garbage_values(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("METALGUARD_STUCK_SEC", "0")
    assert mg._stuck_limit() == 0
    with mg._stuck_watch("x"):
        assert mg._stuck_steps == {}  # off: nothing recorded, no thread
    monkeypatch.setenv("METALGUARD_STUCK_SEC", "soon")
    assert mg._stuck_limit() == 1800.0
    [warning] = warnings_from(caplog, "METALGUARD_STUCK_SEC")
    assert "using the default 1800.0" in warning.getMessage()
    with pytest.raises(TypeError, match="action must be callable"):
        mg._on_stuck("stop")  # type: ignore[arg-type]


def test_help_lists_the_after_panic_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert mg.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("diagnose", "ack", "postmortem"))
    assert mg.main(["ack", "--note"]) == 64


@pytest.mark.mlx_lm
@pytest.mark.multiprocess
def test_a_stuck_worker_generate_is_reported_stopped_with_term_and_not_restarted(
    tiny_llama_path: str,
    mg_home: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A generate that does not finish (a million tokens stands in for a GPU wedge, which
    cannot happen on Linux) runs past METALGUARD_STUCK_SEC inside a pooled worker."""
    import logging

    caplog.set_level(logging.WARNING, logger="metal_guard")
    monkeypatch.setenv("METALGUARD_STUCK_SEC", "1")  # the spawned worker inherits it
    key = f"{tiny_llama_path}:mlx"
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"GPUStuck: generate .* the GPU looks wedged"):
            mg.call_model_isolated(
                "hello world", tiny_llama_path, max_tokens=1_000_000, temperature=0
            )
        assert time.monotonic() - started < 60
        assert key not in mg._runner_pool  # taken out of the pool
        with pytest.raises(RuntimeError, match="not restarted after a fatal error"):
            mg.call_model_isolated("hello world", tiny_llama_path, max_tokens=4)
    finally:
        mg.shutdown_all_workers()
    messages = breadcrumb_messages(mg_home)
    [stuck] = [m for m in messages if m.startswith("GPU_STUCK: ")]
    assert stuck.startswith(f"GPU_STUCK: generate {tiny_llama_path} running for")
    worker = [m for m in messages if m.startswith("SUBPROCESS_WORKER: SIGTERM received")]
    assert len(worker) == 1  # stopped with SIGTERM, once: no replacement was started
    assert any(
        m.startswith(f"SUBPROCESS_WORKER: {tiny_llama_path} stopped (SIGTERM)") for m in messages
    )
    assert not [r for r in caplog.records if "SIGKILL" in r.getMessage()]
    assert sum(m.startswith("SUBPROCESS_WORKER: starting") for m in messages) == 1
    assert mg.read_mlx_lock() is None
