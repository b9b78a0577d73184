"""``metal-guard run -- COMMAND``: the supervisor, with real processes and real signals.

Every test runs ``python -m metal_guard run ...`` as a child of the test (the working copy
through ``PYTHONPATH``) with a fresh ``METALGUARD_HOME`` (the ``mg_home`` fixture), so the
bootstrap folder and the runs registry live there. Grace periods and restart delays are
short; nothing here measures speed (``bench/bench_run.py`` does).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import REPO, child_env, read_line, requires_mlx_lm, write_breaker_cooldown

RUN = [sys.executable, "-m", "metal_guard", "run"]
NOTE = "is not a Python program: pre-flight, supervision and graceful stop only"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    """``metal-guard run ARGS`` to completion; text output captured."""
    return subprocess.run(
        [*RUN, *args],
        stdin=subprocess.DEVNULL,  # not a terminal: run passes Ctrl-C on itself
        capture_output=True,
        text=True,
        env=env or child_env(),
        timeout=timeout,
        cwd=REPO,
    )


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*RUN, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or child_env(),
        cwd=REPO,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # a failed test: never leave the supervisor behind
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def counting_program(counter: Path, code: int) -> list[str]:
    """A Python command that appends one line to ``counter`` per start, then exits ``code``."""
    source = f"open({str(counter)!r}, 'a').write('started\\n'); raise SystemExit({code})"
    return [sys.executable, "-c", source]


def starts(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


# -- restarts ------------------------------------------------------------------------------


def test_on_failure_restarts_twice_then_gives_up(tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    done = run(
        "--restart", "on-failure", "--max-restarts", "2", "--restart-delay", "0.5", "--",
        *counting_program(counter, 1),
    )  # fmt: skip
    assert done.returncode == mg._RUN_EXIT_GAVE_UP == 69, done.stderr
    assert starts(counter) == 3
    assert "gave up" in done.stderr and "--max-restarts 2" in done.stderr
    assert done.stderr.count("restart 1 of at most 2") == 1
    assert done.stderr.count("restart 2 of at most 2") == 1


def test_always_restarts_a_program_that_succeeded(tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    done = run(
        "--restart", "always", "--max-restarts", "1", "--restart-delay", "0.5", "--",
        *counting_program(counter, 0),
    )  # fmt: skip
    assert (done.returncode, starts(counter)) == (69, 2), done.stderr


@pytest.mark.parametrize(
    ("code", "expected_starts", "expected_exit"),
    [(0, 1, 0), (2, 1, 2), (71, 1, 71), (70, 2, 69)],
    ids=["success", "guard-refused", "gpu-stuck", "generation-dead"],
)
def test_on_failure_restart_rules(
    tmp_path: Path, code: int, expected_starts: int, expected_exit: int
) -> None:
    counter = tmp_path / "starts"
    done = run(
        "--restart", "on-failure", "--max-restarts", "1", "--restart-delay", "0.5", "--",
        *counting_program(counter, code),
    )  # fmt: skip
    assert (done.returncode, starts(counter)) == (expected_exit, expected_starts), done.stderr
    if code == 71:
        assert "not restarted" in done.stderr and "reboot" in done.stderr


def test_a_restart_waits_for_the_cadence_of_the_model_on_the_command_line(
    tmp_path: Path,
) -> None:
    model = "example-org/tiny-model"
    loaded = time.time() - 177.0  # the same-model interval (180 s) ends in about 3 s
    mg.CadenceGuard().mark_load(model, ts=loaded)
    counter = tmp_path / "starts"
    program = f"import time; open({str(counter)!r}, 'a').write(f'{{time.time()}}\\n'); exit(1)"
    done = run(
        "--restart", "on-failure", "--max-restarts", "1", "--restart-delay", "0.5", "--",
        sys.executable, "-c", program, "--model", model,
    )  # fmt: skip
    assert done.returncode == 69, done.stderr
    first, second = (float(t) for t in counter.read_text().split())
    assert f"for the cadence of {model}" in done.stderr
    assert second >= loaded + 180.0 - 0.1  # the reload came only after the interval
    assert second > first


def test_never_is_the_default_and_passes_the_code_through(tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    done = run("--", *counting_program(counter, 5))
    assert (done.returncode, starts(counter)) == (5, 1)
    assert "restart" not in done.stderr


# -- pre-flight ------------------------------------------------------------------------------


def test_a_tripped_breaker_refuses_and_the_child_never_starts(mg_home: str, tmp_path: Path) -> None:
    write_breaker_cooldown(mg_home)
    counter = tmp_path / "starts"
    done = run("--restart", "always", "--", *counting_program(counter, 0))
    assert done.returncode == mg._RUN_EXIT_REFUSED == 2
    assert starts(counter) == 0
    refusals = [line for line in done.stderr.splitlines() if "refused" in line]
    assert len(refusals) == 1, done.stderr
    assert "MLX cooldown active" in refusals[0] and "refused until" in refusals[0]
    assert "was not started" in refusals[0]


def test_observer_mode_reports_the_cooldown_and_starts(mg_home: str, tmp_path: Path) -> None:
    write_breaker_cooldown(mg_home)
    counter = tmp_path / "starts"
    done = run("--", *counting_program(counter, 0), env=child_env(METALGUARD_MODE="observer"))
    assert (done.returncode, starts(counter)) == (0, 1), done.stderr
    assert "OBSERVE: would refuse (MLXCooldownActive)" in done.stderr
    assert "was not started" not in done.stderr


def test_a_restart_repeats_the_pre_flight(mg_home: str, tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    now = time.time()
    cooldown = {"schema": 1, "tripped_at": now, "cooldown_until": now + 3600}
    cooldown.update(cooldown_sec=3600, panic_count=2, window_sec=3600)
    trip = (
        f"open({str(counter)!r}, 'a').write('started\\n'); "
        f"open({str(Path(mg_home) / 'breaker.json')!r}, 'w').write({json.dumps(cooldown)!r}); "
        "raise SystemExit(1)"
    )
    done = run(
        "--restart", "on-failure", "--restart-delay", "0.5", "--", sys.executable, "-c", trip
    )  # fmt: skip
    assert (done.returncode, starts(counter)) == (2, 1), done.stderr
    assert "MLX cooldown active" in done.stderr


def test_a_known_panic_model_on_the_command_line_is_named(tmp_path: Path) -> None:
    model = next(iter(mg.KNOWN_PANIC_MODELS))
    done = run("--", sys.executable, "-c", "pass", f"--model={model}")
    assert done.returncode == 0
    assert "KNOWN_PANIC_MODELS" in done.stderr and model in done.stderr


def test_mlx_metal_fast_synch_is_reported_before_the_start() -> None:
    done = run("--", sys.executable, "-c", "pass", env=child_env(MLX_METAL_FAST_SYNCH="1"))
    assert done.returncode == 0
    assert "MLX_METAL_FAST_SYNCH=1 is set" in done.stderr


# -- what the child gets -------------------------------------------------------------------

USER_SITE = """
import os
log = os.environ.get("USER_SITE_LOG")
if log:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
"""

PROBE = """
import json, os, sys
import mod_b, mod_c
module = sys.modules.get("metal_guard")
print(json.dumps({
    "pid": os.getpid(),
    "path": sys.path,
    "supervisor": os.environ.get("METALGUARD_RUN_SUPERVISOR"),
    "loaded": None if module is None else module.__file__,
}))
"""


@pytest.fixture
def user_paths(tmp_path: Path) -> dict[str, str]:
    """A user sitecustomize (it logs the pid of every process that runs it) and two
    package folders, all on PYTHONPATH in a known order."""
    folders = {name: tmp_path / name for name in ("site", "b", "c")}
    for folder in folders.values():
        folder.mkdir()
    (folders["site"] / "sitecustomize.py").write_text(USER_SITE)
    (folders["b"] / "mod_b.py").write_text("")
    (folders["c"] / "mod_c.py").write_text("")
    pythonpath = os.pathsep.join([*(str(f) for f in folders.values()), REPO])
    return {
        "PYTHONPATH": pythonpath,
        "USER_SITE_LOG": str(tmp_path / "user-site.log"),
    }


def test_user_sitecustomize_and_pythonpath_are_kept(
    user_paths: dict[str, str], tmp_path: Path
) -> None:
    env = {**os.environ, **user_paths}
    bare = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True
    )
    proc = start("--", sys.executable, "-c", PROBE, env=env)
    code, out, err = finish(proc)
    assert code == 0, err
    guarded, plain = json.loads(out), json.loads(bare.stdout)
    assert guarded["path"] == plain["path"]  # same entries, same order, the bootstrap gone
    assert guarded["supervisor"] == str(proc.pid) and plain["supervisor"] is None
    assert guarded["loaded"] == os.path.join(REPO, "metal_guard.py")
    ran = Path(user_paths["USER_SITE_LOG"]).read_text().split()
    assert str(guarded["pid"]) in ran and str(plain["pid"]) in ran
    assert "Error in sitecustomize" not in err and "guards not installed" not in err


def test_a_failing_user_sitecustomize_is_reported_as_python_does(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("raise RuntimeError('user site broke')\n")
    env = child_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    code = "import sys; print('metal_guard' in sys.modules)"
    done = run("--", sys.executable, "-c", code, env=env)
    assert done.returncode == 0
    assert done.stdout == "True\n"  # the guards are installed all the same
    assert "Error in sitecustomize" in done.stderr
    assert "RuntimeError: user site broke" in done.stderr


SPAWNER = """
import json, multiprocessing, os, sys

def probe(queue):
    module = sys.modules.get("metal_guard")
    queue.put({
        "pid": os.getpid(),
        "supervisor": os.environ.get("METALGUARD_RUN_SUPERVISOR"),
        "loaded": None if module is None else module.__file__,
    })

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=probe, args=(queue,))
    child.start()
    print(json.dumps(queue.get(timeout=60)))
    child.join(60)
"""


def test_a_multiprocessing_spawn_child_has_the_bootstrap_too(
    user_paths: dict[str, str], tmp_path: Path
) -> None:
    script = tmp_path / "spawner.py"
    script.write_text(SPAWNER)
    proc = start("--", sys.executable, str(script), env={**os.environ, **user_paths})
    code, out, err = finish(proc)
    assert code == 0, err
    grandchild = json.loads(out)
    assert grandchild["supervisor"] == str(proc.pid)
    assert grandchild["loaded"] == os.path.join(REPO, "metal_guard.py")
    assert str(grandchild["pid"]) in Path(user_paths["USER_SITE_LOG"]).read_text().split()


def test_options_reach_the_child_environment() -> None:
    code = (
        "import os, json; print(json.dumps({k: v for k, v in os.environ.items() "
        "if k.startswith(('METALGUARD_RUN_', 'PYTHONPATH'))}))"
    )
    done = run(
        "--wired", "CAP:8", "--no-wait", "--no-gpu-gate", "--", sys.executable, "-c", code,
        env=child_env(PYTHONPATH=f"/x{os.pathsep}{REPO}"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)
    bootstrap = env["METALGUARD_RUN_BOOTSTRAP"]
    assert env["PYTHONPATH"] == os.pathsep.join([bootstrap, "/x", REPO])
    assert Path(bootstrap, "sitecustomize.py").read_text() == mg._RUN_SITECUSTOMIZE
    assert env["METALGUARD_RUN_MODULE"] == os.path.join(REPO, "metal_guard.py")
    assert (env["METALGUARD_RUN_WIRED"], env["METALGUARD_RUN_WAIT"]) == ("cap:8", "0")
    assert env["METALGUARD_RUN_GPU_GATE"] == "0"
    defaults = json.loads(run("--", sys.executable, "-c", code).stdout)
    assert (defaults["METALGUARD_RUN_WIRED"], defaults["METALGUARD_RUN_WAIT"]) == ("off", "1")
    assert defaults["METALGUARD_RUN_GPU_GATE"] == "1"


def test_child_pythonpath_rules() -> None:
    options = mg._RunOptions()
    alone = mg._run_child_env({}, "/boot", options, supervisor=7)
    assert alone["PYTHONPATH"] == "/boot" and alone["METALGUARD_RUN_SUPERVISOR"] == "7"
    empty = mg._run_child_env({"PYTHONPATH": ""}, "/boot", options, supervisor=7)
    assert empty["PYTHONPATH"] == "/boot"
    kept = mg._run_child_env({"PYTHONPATH": "/a::/b"}, "/boot", options, supervisor=7)
    assert kept["PYTHONPATH"] == "/boot:/a::/b"  # unchanged after the folder, empty entry too
    # run under run: the outer run's bootstrap folder is not kept behind the inner one
    outer = {"PYTHONPATH": "/outer:/a", "METALGUARD_RUN_BOOTSTRAP": "/outer", "X": "1"}
    nested = mg._run_child_env(outer, "/boot", options, supervisor=7)
    assert (nested["PYTHONPATH"], nested["METALGUARD_RUN_BOOTSTRAP"]) == ("/boot:/a", "/boot")
    assert nested["X"] == "1" and outer["PYTHONPATH"] == "/outer:/a"  # the base is not changed


# -- what counts as a Python program ---------------------------------------------------------


def _script(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_scripts_whose_shebang_names_python_are_python_programs(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    body = "import os\nprint(os.environ.get('METALGUARD_RUN_SUPERVISOR'))\n"
    _script(bin_dir, "direct-tool", f"#!{sys.executable}\n{body}")
    _script(bin_dir, "env-tool", f"#!/usr/bin/env python3\n{body}")
    _script(bin_dir, "shell-tool", '#!/bin/sh\necho "${METALGUARD_RUN_SUPERVISOR:-none}"\n')
    env = child_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for tool in ("direct-tool", "env-tool"):
        proc = start("--", tool, env=env)
        code, out, err = finish(proc)
        assert (code, out) == (0, f"{proc.pid}\n"), err
        assert NOTE not in err
    code, out, err = finish(start("--", "shell-tool", env=env))
    assert (code, out) == (0, "none\n")
    assert err.count(NOTE) == 1
    # a script's own arguments are not interpreter options
    proc = start("--", "direct-tool", "-I", env=env)
    code, out, err = finish(proc)
    assert (code, out) == (0, f"{proc.pid}\n")
    assert "keeps Python from running the bootstrap" not in err


def test_python_detection(tmp_path: Path) -> None:
    for name in ("python", "python3", "python3.12", "python3.13t"):
        assert mg._python_interpreter(f"/usr/bin/{name}") == (f"/usr/bin/{name}", [])
    for name in ("pythonista", "python3.x", "ipython", "sh"):
        assert mg._python_interpreter(f"/usr/bin/{name}") is None
    pip_long = _script(
        tmp_path,
        "long-path-tool",
        "#!/bin/sh\n'''exec' \"/opt/a venv/bin/python3\" \"$0\" \"$@\"\n' '''\nimport x\n",
    )
    assert mg._python_interpreter(str(pip_long)) == ("/opt/a venv/bin/python3", [])
    flags = _script(tmp_path, "isolated-tool", "#!/usr/bin/python3 -I\n")
    assert mg._python_interpreter(str(flags)) == ("/usr/bin/python3", ["-I"])
    assert mg._python_skips_site(["-I"]) == "-I"
    assert mg._python_skips_site(["-u", "-c", "-I"]) is None  # -I is -c's code here
    assert mg._python_skips_site(["-WE", "x.py"]) is None  # E is -W's value
    assert mg._python_skips_site(["-uS", "x.py"]) == "-S"


def test_an_isolated_interpreter_is_said_to_run_unguarded() -> None:
    done = run("--", sys.executable, "-I", "-c", "import sys; print('metal_guard' in sys.modules)")
    assert (done.returncode, done.stdout) == (0, "False\n")
    assert "-I keeps Python from running the bootstrap: guards not installed" in done.stderr


# -- non-Python programs, exit codes --------------------------------------------------------


def test_a_non_python_command_passes_output_and_exit_code_through() -> None:
    done = run("--", "sh", "-c", "echo hi; echo oops >&2; exit 7")
    assert (done.returncode, done.stdout) == (7, "hi\n")
    assert done.stderr.count(NOTE) == 1 and "oops\n" in done.stderr


def test_the_non_python_note_is_said_once_across_restarts() -> None:
    done = run(
        "--restart", "on-failure", "--max-restarts", "1", "--restart-delay", "0.5",
        "--", "sh", "-c", "echo hi; exit 1",
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (69, "hi\nhi\n")
    assert done.stderr.count(NOTE) == 1


@pytest.mark.parametrize(
    "command",
    [
        ["sh", "-c", "kill -USR1 $$"],
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGUSR1)"],
    ],
    ids=["shell", "python"],
)
def test_death_by_signal_is_128_plus_n(command: list[str]) -> None:
    done = run("--", *command)
    assert done.returncode == 128 + signal.SIGUSR1


def test_a_missing_command_is_127() -> None:
    done = run("--", "no-such-command-anywhere")
    assert done.returncode == 127
    assert "command not found" in done.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--grace", "-1"], "--grace"),
        (["--grace", "0"], "--grace"),
        (["--restart", "sometimes"], "invalid choice: 'sometimes'"),
        (["--max-restarts", "-1"], "--max-restarts"),
        (["--max-restarts", "2.5"], "--max-restarts"),
        (["--restart-window", "0"], "--restart-window"),
        (["--restart-delay", "0.1"], "tight loop"),
        (["--wired", "cap:lots"], "--wired"),
        (["--wired", "always"], "--wired"),
        (["--nonsense"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_64(args: list[str], words: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    done = run(*args, "--", "touch", str(marker))
    assert done.returncode == 64, done.stderr
    assert words in done.stderr and "usage: metal-guard" in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("args", [[], ["--"], ["--grace", "2"]])
def test_a_missing_command_is_a_usage_error(args: list[str]) -> None:
    done = run(*args)
    assert done.returncode == 64
    assert "a command is required: metal-guard run [options] -- COMMAND" in done.stderr


def test_help_documents_the_exit_codes() -> None:
    done = run("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for words in ("128+N", "2 pre-flight refused", "69 gave up restarting", "64 usage error"):
        assert words in text


# -- signals --------------------------------------------------------------------------------

SLEEPER = """
import os, signal, sys, time
mode = sys.argv[1]
if mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
elif mode == "exit":
    signal.signal(signal.SIGTERM, lambda *a: (print("child got SIGTERM", flush=True), os._exit(3)))
print("ready", os.getpid(), flush=True)
time.sleep(120)
"""


def test_sigterm_is_passed_on_and_the_child_exits_within_the_grace() -> None:
    proc = start("--grace", "20", "--", sys.executable, "-c", SLEEPER, "exit")
    assert read_line(proc).startswith("ready")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 3
    assert out == "child got SIGTERM\n"
    assert time.monotonic() - sent < 20
    assert "SIGKILL" not in err and "SIGTERM: passed on to" in err


def test_a_child_that_ignores_sigterm_is_killed_only_after_the_grace() -> None:
    proc = start("--grace", "2", "--", sys.executable, "-c", SLEEPER, "ignore")
    assert read_line(proc).startswith("ready")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert time.monotonic() - sent >= 1.9
    assert code == 128 + signal.SIGKILL
    assert "WARNING" in err and "ignored 2 s of SIGTERM" in err
    assert "sending SIGKILL" in err and "may stay wired until reboot" in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_are_passed_on(signum: int) -> None:
    proc = start("--grace", "20", "--", sys.executable, "-c", SLEEPER, "default")
    assert read_line(proc).startswith("ready")
    proc.send_signal(signum)
    code, _, err = finish(proc)
    assert code == 128 + signum  # SIGINT: KeyboardInterrupt ends Python by SIGINT too
    assert "SIGKILL" not in err


COUNT_SIGINTS = """
import signal, sys, time
seen = []
signal.signal(signal.SIGINT, lambda *a: seen.append(1))
print("ready", flush=True)
while not seen:
    time.sleep(0.05)
time.sleep(1.0)  # a second SIGINT (one passed on by run) would arrive in this time
print("SIGINTs:", len(seen), flush=True)
"""


def test_ctrl_c_in_a_terminal_reaches_the_program_once() -> None:
    import fcntl
    import termios

    master, slave = os.openpty()

    def controlling_terminal() -> None:  # in run's process: the pty becomes its terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [*RUN, "--grace", "20", "--", sys.executable, "-c", COUNT_SIGINTS],
        stdin=slave, stdout=slave, stderr=slave, env=child_env(), cwd=REPO,
        start_new_session=True, preexec_fn=controlling_terminal,
    )  # fmt: skip
    os.close(slave)
    output = b""
    try:
        deadline = time.monotonic() + 60
        while b"ready" not in output and time.monotonic() < deadline:
            output += os.read(master, 4096)
        os.write(master, b"\x03")  # Ctrl-C: the terminal signals its foreground group
        code = proc.wait(timeout=30)
        try:
            while chunk := os.read(master, 4096):
                output += chunk
        except OSError:  # EIO: every process left the terminal
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = output.decode(errors="replace")
    assert code == 0, text
    assert "SIGINTs: 1" in text  # from the terminal only: run did not send a second one
    assert "SIGINT: the terminal sent it to" in text


def test_a_stop_during_the_restart_pause_ends_run_at_once(tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    proc = start(
        "--restart", "on-failure", "--restart-delay", "60", "--", *counting_program(counter, 1)
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until run says it pauses
        if "restart 1 of at most 3" in line:
            break
    proc.send_signal(signal.SIGTERM)
    code, _, _ = finish(proc, timeout=20)
    assert (code, starts(counter)) == (128 + signal.SIGTERM, 1)


# -- the runs registry and status --------------------------------------------------------------

WAITER = """
import os, sys, time, metal_guard
metal_guard._run_note_gate_wait(1.5)
metal_guard._run_note_gate_wait(0.25)
print("ready", os.getpid(), flush=True)
time.sleep(120)
"""


def _status_json() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "metal_guard", "status", "--json"],
        capture_output=True, text=True, env=child_env(), timeout=60, check=True,
    )  # fmt: skip
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def test_status_lists_programs_under_run() -> None:
    assert _status_json()["runs"] == []
    proc = start("--grace", "20", "--", sys.executable, "-c", WAITER)
    try:
        child_pid = int(read_line(proc).split()[1])
        (entry,) = _status_json()["runs"]
        assert (entry["pid"], entry["supervisor_pid"]) == (child_pid, proc.pid)
        assert entry["argv"] == [sys.executable, "-c", WAITER]
        assert entry["restarts"] == 0 and entry["gate_wait_sec"] == pytest.approx(1.75)
        assert entry["since"] <= time.time()
        text = subprocess.run(
            [sys.executable, "-m", "metal_guard", "status"],
            capture_output=True, text=True, env=child_env(), timeout=60, check=True,
        ).stdout  # fmt: skip
        table = text.split("Programs under `metal-guard run` on this host")[1]
        assert str(child_pid) in table and str(proc.pid) in table and "1.8 s" in table
    finally:
        proc.send_signal(signal.SIGTERM)
        finish(proc)
    assert _status_json()["runs"] == []


def test_a_dead_supervisors_entry_is_not_listed(mg_home: str) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    entry = {"host": os.uname().nodename, "pid": 1, "argv": ["x"], "since": time.time()}
    Path(mg_home, "runs.json").write_text(json.dumps({dead.stdout.strip(): entry}))
    assert mg._read_runs() == []


def test_gate_wait_outside_run_is_a_no_op(mg_home: str) -> None:
    mg._run_note_gate_wait(2.0)
    assert not Path(mg_home, "runs.json").exists()
    with pytest.raises(TypeError):
        mg._run_note_gate_wait("2")  # type: ignore[arg-type]


# -- a real mlx_lm.server under run -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(port: int, path: str, body: dict[str, Any] | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            reply.read()
            return int(reply.status)
    except (urllib.error.URLError, OSError):
        return 0


@requires_mlx_lm
def test_mlx_lm_server_under_run_serves_and_stops_gracefully(tiny_llama_path: str) -> None:
    port = _free_port()
    proc = start(
        "--grace", "30", "--", sys.executable, "-m", "mlx_lm", "server",
        "--model", tiny_llama_path, "--port", str(port),
        env=child_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _http(port, "/health") != 200:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the server never answered /health"
            time.sleep(0.3)
        (entry,) = mg._read_runs()
        server_pid = entry["pid"]
        statuses: list[int] = []
        body = {"prompt": "hello there", "max_tokens": 8}
        threads = [
            threading.Thread(target=lambda: statuses.append(_http(port, "/v1/completions", body)))
            for _ in range(3)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        assert statuses == [200, 200, 200]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert time.monotonic() - sent < 30  # within the grace
    assert code == 0, err  # the server shut down as after Ctrl-C, and exited 0
    assert "SIGKILL" not in err and "Traceback" not in err
    assert not mg._pid_alive(server_pid)
    assert mg._read_runs() == []
