"""Two guarded ``mlx_lm.server`` processes sharing one GPU: turns, never overlaps, a clean stop.

Starts ``metal-guard run -- python -m mlx_lm server --model <tiny> --port P`` twice, on a
tiny random-weight llama and a tiny ``gemma4_text`` (local folders, no model hub), sends
concurrent completions to both (4 clients per server by default), then reads the GPU gate's
own log (``METALGUARD_RUN_GATE_LOG``: one ``pid start end`` line per turn a process took on
the gate, each turn one forward step or a few back-to-back ones) and shows that the two
servers' GPU work took turns and never overlapped. Last, SIGTERM to each
``run``: it passes the signal on, the server shuts down within the grace period and ``run``
exits with the server's own code — no SIGKILL.

Every step checks its own outcome, as in ``guarded_pipeline.py``, whose last step this is
(``make demo``); on its own it builds its models and prints the same kind of table:

    python examples/guarded_servers.py
    python examples/guarded_servers.py --clients 2 --max-tokens 8

``run`` is started as ``python -m metal_guard`` with this checkout first on ``PYTHONPATH``,
so the checkout's ``metal_guard.py`` supervises and guards the servers. State (cadence,
breadcrumbs, the GPU gate, the runs registry) goes to a temp ``METALGUARD_HOME``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

os.environ["HF_HUB_OFFLINE"] = "1"  # the models are local folders
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from metal_guard import read_breadcrumbs  # noqa: E402

PROMPT = "hello world"
GRACE_SEC = 10.0  # run's --grace for the demo (default 30)
START_TIMEOUT_SEC = 120.0
REQUEST_TIMEOUT_SEC = 120.0
FLUSH_SLEEP_SEC = 0.5  # the gemma-4 first-generate settle window (production: 3 s)


class Checks(Protocol):
    """What the demo's report offers (``guarded_pipeline.Report``)."""

    def check(self, name: str, expected: str, observed: str, ok: bool) -> bool: ...

    def note(self, text: str, indent: str = ...) -> None: ...


@dataclass
class Server:
    """One ``metal-guard run -- python -m mlx_lm server`` and what it answered."""

    name: str
    model: str
    port: int
    proc: subprocess.Popen[bytes]
    logs: list[IO[bytes]]
    stderr_path: Path
    pid: int = 0  # the server's own pid (run's child), from `metal-guard status`
    replies: list[tuple[int, int]] = field(default_factory=list)  # (HTTP status, tokens)

    def stderr(self) -> str:
        for log in self.logs:
            log.flush()
        return self.stderr_path.read_text("utf-8", errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(reply.status)
    except (urllib.error.URLError, OSError):
        return 0


def complete(server: Server, max_tokens: int) -> tuple[int, int]:
    """One completion request (plain urllib): the HTTP status and the tokens generated."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/v1/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SEC) as reply:
            answer = json.loads(reply.read())
            return int(reply.status), int(answer["usage"]["completion_tokens"])
    except (OSError, ValueError, KeyError, TypeError):  # counted as a failed request
        return 0, 0


def client(server: Server, max_tokens: int, start: threading.Barrier) -> None:
    """One client thread: waits for the others, then one request; the reply is kept."""
    start.wait()
    server.replies.append(complete(server, max_tokens))


def run_env(home: Path, gate_log: Path, flush_sleep: float) -> dict[str, str]:
    """The environment of both runs: this checkout's metal_guard, the demo's own state."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(
        METALGUARD_HOME=str(home),
        METALGUARD_BREADCRUMB_PATH=str(home / "breadcrumbs.log"),
        METALGUARD_RUN_GATE_LOG=str(gate_log),
        METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC=f"{flush_sleep:g}",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    # The gate lives in the demo's state folder; the cadence's cross-model base is 0.
    for key in ("METALGUARD_GPU_LOCK_PATH", "METALGUARD_CROSS_MODEL_INTERVAL"):
        env.pop(key, None)
    return env


def start(name: str, model: str, home: Path, env: dict[str, str]) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "metal_guard", "run", "--grace", f"{GRACE_SEC:g}", "--"]
    command += [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--port", str(port)]
    out = (home / f"{name}.out").open("wb")
    err_path = home / f"{name}.err"
    err = err_path.open("wb")
    proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    return Server(name, model, port, proc, [out, err], err_path)


def messages(home: Path, pid: int) -> list[str]:
    """This process's breadcrumb messages (``<time> pid=<n> <message>`` lines)."""
    tag = f" pid={pid} "
    lines = read_breadcrumbs(1000, home / "breadcrumbs.log")
    return [line.split(tag, 1)[1] for line in lines if tag in line]


def wait_for_admit(server: Server, home: Path, deadline: float) -> bool:
    """Until the server's load went through the cadence (its CADENCE_ADMIT breadcrumb)."""
    want = f"CADENCE_ADMIT: {server.model}"
    while time.monotonic() < deadline and server.proc.poll() is None:
        lines = read_breadcrumbs(1000, home / "breadcrumbs.log")
        if any(line.endswith(want) for line in lines):
            return True
        time.sleep(0.1)
    return False


def wait_healthy(server: Server, deadline: float) -> bool:
    while time.monotonic() < deadline and server.proc.poll() is None:
        if http_status(f"http://127.0.0.1:{server.port}/health") == 200:
            return True
        time.sleep(0.2)
    return False


def runs_listed(env: dict[str, str]) -> list[dict[str, Any]]:
    """``metal-guard status --json``'s programs under run (this checkout's module)."""
    done = subprocess.run(
        [sys.executable, "-m", "metal_guard", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        runs = json.loads(done.stdout).get("runs", [])
    except ValueError:
        return []
    return [r for r in runs if isinstance(r, dict)]


def gate_rows(path: Path) -> list[tuple[int, float, float]]:
    """The gate log's ``pid start end`` lines (monotonic seconds), by start time."""
    rows: list[tuple[int, float, float]] = []
    if path.exists():
        for line in path.read_text("ascii").splitlines():
            words = line.split()
            if len(words) == 3:
                rows.append((int(words[0]), float(words[1]), float(words[2])))
    return sorted(rows, key=lambda r: r[1])


def overlapping(rows: list[tuple[int, float, float]]) -> int:
    """Pairs of intervals of different processes that overlap."""
    count = 0
    for i, (pid, _, end) in enumerate(rows):
        for other, other_start, _ in rows[i + 1 :]:
            if other_start >= end:
                break
            count += other != pid
    return count


def handovers(rows: list[tuple[int, float, float]]) -> int:
    return sum(1 for a, b in itertools.pairwise(rows) if a[0] != b[0])


def flush_pairs(lines: list[str], model: str) -> int:
    """SUBPROC_PRE/SUBPROC_POST pairs of ``model`` (concurrent requests interleave them)."""
    pre = sum(m == f"SUBPROC_PRE: {model}" for m in lines)
    post = sum(m == f"SUBPROC_POST: {model}" for m in lines)
    return min(pre, post)


def stop(servers: list[Server]) -> None:
    """Last resort when the demo fails midway: SIGTERM to each run, then wait, then kill."""
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.proc.wait(GRACE_SEC + 10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
        for log in server.logs:
            log.close()


def servers_step(
    report: Checks,
    llama: str,
    gemma: str,
    workdir: Path,
    *,
    clients: int = 4,
    max_tokens: int = 32,
    flush_sleep: float = FLUSH_SLEEP_SEC,
    heading: str = "10. Two guarded mlx_lm.server processes",
) -> None:
    """Start both servers under run, load them with clients, read the gate log, stop them."""
    print(f"\n== {heading}: concurrent requests, one GPU, a graceful stop")
    r = report
    home = workdir / "servers"
    home.mkdir(parents=True, exist_ok=True)
    gate_log = home / "gate.log"
    env = run_env(home, gate_log, flush_sleep)
    print(f"  state for this step: {home}")
    print(f"  gate log (METALGUARD_RUN_GATE_LOG): {gate_log}")
    print(
        f"  each: {Path(sys.executable).name} -m metal_guard run --grace {GRACE_SEC:g} -- "
        f"{Path(sys.executable).name} -m mlx_lm server --model <model> --port <port>"
    )
    servers: list[Server] = []
    try:
        began = time.monotonic()
        deadline = began + START_TIMEOUT_SEC
        # The gemma-4 server loads first: the 90 s cross-model floor applies only in front
        # of a gemma-4 load, so the llama that follows is admitted at once.
        servers.append(start("gemma-4", gemma, home, env))
        admitted = wait_for_admit(servers[0], home, deadline)
        servers.append(start("llama", llama, home, env))
        up = [admitted and wait_healthy(s, deadline) for s in servers]
        healthy = all(up)
        took = time.monotonic() - began
        listed = {
            run["argv"][run["argv"].index("--model") + 1]: run
            for run in runs_listed(env)
            if "--model" in run.get("argv", [])[:-1]
        }
        for server in servers:
            server.pid = int(listed.get(server.model, {}).get("pid") or 0)
            print(
                f"  {server.name:8} run pid {server.proc.pid}, server pid {server.pid}, "
                f"port {server.port}"
            )
        waited = [s.name for s in servers if "waiting" in s.stderr()]
        r.note(
            "the gemma-4 server loaded first: the 90 s cross-model floor stands only in front "
            "of a gemma-4 load, so the llama's load that follows is admitted at once"
        )
        r.check(
            "servers: start under run",
            "2 x /health 200, listed, no cadence wait",
            f"{sum(up)} of 2 healthy in {took:.1f} s, "
            f"{sum(s.pid > 0 for s in servers)} listed by status"
            + (f", {'/'.join(waited)} waited" if waited else ""),
            healthy and all(s.pid > 0 for s in servers) and not waited,
        )
        if not healthy:
            for server in servers:
                r.note(f"{server.name} stderr: {server.stderr()[-600:]}")
            return

        # One request each first, one server after the other: a fresh model's first steps
        # (and the gemma-4 first-generate settle window) are not what is measured below.
        warm = [complete(server, max_tokens) for server in servers]
        r.note(
            "warm-up: one request per server, one after the other (HTTP "
            + ", ".join(str(status) for status, _ in warm)
            + "); the gate log of the concurrent requests starts after it"
        )
        gate_log.replace(home / "gate.warm-up.log")  # the hooks reopen the path per step
        barrier = threading.Barrier(clients * len(servers))
        threads = [
            threading.Thread(target=client, args=(server, max_tokens, barrier), daemon=True)
            for server in servers
            for _ in range(clients)
        ]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT_SEC + 10)
        took = time.monotonic() - began
        replies = [reply for server in servers for reply in server.replies]
        answered = sum(status == 200 and tokens > 0 for status, tokens in replies)
        r.check(
            "servers: concurrent completions",
            f"{len(threads)} x 200, tokens in each",
            f"{answered} of {len(threads)} in {took:.1f} s ({sum(t for _, t in replies)} tokens)",
            answered == len(threads),
        )
        pairs = {s.name: flush_pairs(messages(home, s.pid), s.model) for s in servers}
        r.check(
            "servers: per-request flush",
            f">= {clients + 1} SUBPROC_PRE/POST pairs each",
            ", ".join(f"{name} {n} pairs" for name, n in pairs.items()),
            all(n >= clients + 1 for n in pairs.values()),
        )
        settled = {
            s.name: sum(m == f"GEMMA4_FLUSH_DONE: {s.model}" for m in messages(home, s.pid))
            for s in servers
        }
        r.check(
            "servers: gemma-4 first generate",
            "one settle flush, gemma-4 server only",
            ", ".join(f"{name} {n}" for name, n in settled.items()),
            settled == {"gemma-4": 1, "llama": 0},
        )

        rows = gate_rows(gate_log)
        turns = {s.name: sum(1 for row in rows if row[0] == s.pid) for s in servers}
        spans = {
            s.name: (
                min(x[1] for x in rows if x[0] == s.pid),
                max(x[2] for x in rows if x[0] == s.pid),
            )
            for s in servers
            if turns[s.name]
        }
        both_busy = 0.0
        if len(spans) == 2:
            (a0, a1), (b0, b1) = spans.values()
            both_busy = max(0.0, min(a1, b1) - max(a0, b0))
        print("  the gate's log, one line per turn either server took on the GPU gate:")
        r.note(
            f"{' + '.join(f'{n} {k} turns' for n, k in turns.items())}; both servers were "
            f"busy at once for {both_busy:.2f} s of it"
        )
        t0 = rows[0][1] if rows else 0.0
        names = {s.pid: s.name for s in servers}
        order = [
            (names.get(pid, str(pid)), len(list(group)))
            for pid, group in itertools.groupby(row[0] for row in rows)
        ]
        r.note(
            "in order (server x turns in a row): "
            + ", ".join(f"{n} x{k}" for n, k in order[:12])
            + (f", ... ({len(rows)} turns in {rows[-1][2] - t0:.2f} s)" if len(order) > 12 else "")
        )
        overlaps, changed = overlapping(rows), handovers(rows)
        r.check(
            "GPU gate: 2 servers",
            "taking turns (>= 2 hand-overs), 0 overlapping",
            f"{len(rows)} turns, {changed} hand-overs, {overlaps} overlapping intervals",
            all(turns.values())
            and set(names) >= {row[0] for row in rows}
            and changed >= 2
            and overlaps == 0,
        )

        began = time.monotonic()
        for server in servers:
            server.proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for server in servers:
            try:
                codes.append(server.proc.wait(GRACE_SEC + 5))
            except subprocess.TimeoutExpired:
                codes.append(None)
        took = time.monotonic() - began
        texts = [s.stderr() for s in servers]
        passed = sum("SIGTERM: passed on to" in t for t in texts)
        killed = sum("SIGKILL" in t for t in texts)
        unloads = sum(f"RUN_UNLOAD: {s.model}" in messages(home, s.pid) for s in servers)
        gone = not any(alive(s.pid) for s in servers)
        for server, text in zip(servers, texts, strict=True):
            line = next((ln for ln in text.splitlines() if "SIGTERM: passed on" in ln), "")
            if line:
                r.note(f"{server.name}: {line}")
        r.check(
            "graceful stop (SIGTERM to run)",
            f"passed on, exit 0 < {GRACE_SEC:g} s, no SIGKILL",
            f"exit {'/'.join(str(c) for c in codes)} in {took:.1f} s, {passed} passed on, "
            f"{killed} SIGKILL, {unloads} unloads recorded"
            + ("" if gone else ", a server still running"),
            codes == [0, 0]
            and took < GRACE_SEC
            and passed == 2
            and killed == 0
            and unloads == 2
            and gone
            and not runs_listed(env),
        )
    finally:
        stop(servers)


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=4, help="clients per server (default 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 16 or not 1 <= args.max_tokens <= 64:
        p.error("--clients must be 1..16 and --max-tokens 1..64")
    try:
        import mlx_lm  # noqa: F401
    except ImportError as exc:
        print(f"this demo needs MLX and mlx-lm ({exc}): pip install -e '.[lm]'", file=sys.stderr)
        return 1
    from guarded_pipeline import Report

    from tiny_models import build_tiny_model

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="metal-guard-servers-"))
    models = workdir / "models"
    report = Report(models)
    llama = build_tiny_model(models / "tiny-llama", "llama", seed=1)
    gemma = build_tiny_model(models / "tiny-gemma4", "gemma4_text", seed=2)
    print(f"models: <models>/tiny-llama, <models>/tiny-gemma4; <models> = {models}")
    try:
        servers_step(
            report,
            llama,
            gemma,
            workdir,
            clients=args.clients,
            max_tokens=args.max_tokens,
            heading="Two guarded mlx_lm.server processes",
        )
    except Exception as exc:
        report.check("servers", "runs to the end", f"aborted: {type(exc).__name__}: {exc}", False)
    shutil.rmtree(models, ignore_errors=True)
    print(f"\n== Summary ({time.perf_counter() - started:.1f} s)")
    print(report.table())
    failed = [s for s in report.steps if not s.ok]
    if failed:
        print(
            f"{len(failed)} of {len(report.steps)} steps did NOT behave as stated", file=sys.stderr
        )
        return 1
    print(f"all {len(report.steps)} steps behaved as stated; kept: {workdir / 'servers'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
