"""``mlx_lm.server`` throughput with the child hooks of ``metal-guard run`` vs bare.

Two real servers on the tiny llama, one bare and one started with the run bootstrap
(a ``sitecustomize`` that calls ``metal_guard._child_bootstrap()`` and the
``METALGUARD_RUN_*`` environment: wired policy off, GPU gate and per-request flush
on). They are measured one after the other, in interleaved rounds, so drift hits
both alike: each round sends ``--requests`` completions of ``--tokens`` tokens with
1 and with 4 concurrent clients. Reported: requests/s and generated tokens/s
(``usage.completion_tokens``) and the median time of one request, medians over the
rounds, and guarded/bare ratios
side by side (goal ≥ 0.97), and the median of the per-round ratios (each round's two
measurements ran back to back, so drift of a shared machine moves it least).

    python bench/bench_run_server.py [--rounds 11] [--requests 32] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import (
    REPO,
    RESULTS,
    child_env,
    machine_info,
    md_table,
    median,
    percentile,
    print_machine,
    write_results,
)

BOOTSTRAP = "import metal_guard\nmetal_guard._child_bootstrap()\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def start_server(model: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while not _health(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not start")
        time.sleep(0.3)
    return proc, port


def _complete(port: int, tokens: int) -> int:
    body = json.dumps({"prompt": "hello there, how are you", "max_tokens": tokens}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as reply:
        return int(json.loads(reply.read())["usage"]["completion_tokens"])


def measure(
    port: int, clients: int, requests: int, tokens: int, latencies: list[float] | None = None
) -> tuple[float, float]:
    """(requests/s, generated tokens/s) for ``requests`` completions over ``clients`` threads;
    each request's seconds are added to ``latencies``."""
    counts: list[int] = []
    lock = threading.Lock()
    todo = list(range(requests))

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            sent = time.perf_counter()
            n = _complete(port, tokens)
            took = time.perf_counter() - sent
            with lock:
                counts.append(n)
                if latencies is not None:
                    latencies.append(took)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return len(counts) / elapsed, sum(counts) / elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--requests", type=int, default=32, help="completions per measurement")
    p.add_argument("--tokens", type=int, default=32, help="max_tokens per completion")
    args = p.parse_args()
    machine = machine_info()
    print_machine(machine)
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import build_tiny_model

    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    latencies: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-run-server-") as tmp_name:
        tmp = Path(tmp_name)
        model = build_tiny_model(tmp / "tiny-llama", "llama")
        boot = tmp / "bootstrap"
        boot.mkdir()
        (boot / "sitecustomize.py").write_text(BOOTSTRAP)
        home = str(tmp / "home")
        user_path = os.environ.get("PYTHONPATH", "")  # kept after ours, in order
        bare_env = child_env(
            PYTHONPATH=os.pathsep.join([str(REPO), user_path]), METALGUARD_HOME=home
        )
        guarded_env = child_env(
            PYTHONPATH=os.pathsep.join([str(boot), str(REPO), user_path]),
            METALGUARD_HOME=home,
            METALGUARD_RUN_SUPERVISOR=str(os.getpid()),
            METALGUARD_RUN_MODULE=str(REPO / "metal_guard.py"),
            METALGUARD_RUN_BOOTSTRAP=str(boot),
            METALGUARD_RUN_WIRED="off",
            METALGUARD_RUN_WAIT="1",
            METALGUARD_RUN_GPU_GATE="1",
        )
        servers = {
            "bare": start_server(model, bare_env),
            "guarded": start_server(model, guarded_env),
        }
        try:
            for _, port in servers.values():  # warm-up, untimed
                measure(port, 4, 4, args.tokens)
            for r in range(args.rounds):
                order = ["bare", "guarded"] if r % 2 == 0 else ["guarded", "bare"]
                for clients in (1, 4):  # a pair's two measurements back to back
                    for mode in order:
                        took = latencies.setdefault((mode, clients), [])
                        got = measure(servers[mode][1], clients, args.requests, args.tokens, took)
                        samples.setdefault((mode, clients), []).append(got)
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)

    rows = []
    results: dict[str, Any] = {}
    for clients in (1, 4):
        bare = samples[("bare", clients)]
        guarded = samples[("guarded", clients)]
        b_req, g_req = median([x[0] for x in bare]), median([x[0] for x in guarded])
        b_tok, g_tok = median([x[1] for x in bare]), median([x[1] for x in guarded])
        # each round's guarded/bare pair ran back to back: the median of their ratios is
        # what drift of the shared machine between rounds moves least
        paired = [g[1] / b[1] for b, g in zip(bare, guarded, strict=True)]
        b_lat = median(latencies[("bare", clients)]) * 1e3
        g_lat = median(latencies[("guarded", clients)]) * 1e3
        results[f"clients_{clients}"] = {
            "bare_requests_per_s": b_req,
            "guarded_requests_per_s": g_req,
            "requests_ratio": g_req / b_req,
            "bare_tokens_per_s": b_tok,
            "guarded_tokens_per_s": g_tok,
            "tokens_ratio": g_tok / b_tok,
            "paired_tokens_ratio_median": median(paired),
            "paired_tokens_ratio_p25_p75": [percentile(paired, 25), percentile(paired, 75)],
            "bare_request_ms_median": b_lat,
            "guarded_request_ms_median": g_lat,
            "samples": {"bare": bare, "guarded": guarded},
        }
        rows.append(
            [
                clients,
                f"{b_req:.2f}",
                f"{g_req:.2f}",
                f"{b_tok:.1f}",
                f"{g_tok:.1f}",
                f"{g_tok / b_tok:.3f}",
                f"{median(paired):.3f} ({percentile(paired, 25):.3f}–{percentile(paired, 75):.3f})",
                f"{b_lat:.1f} / {g_lat:.1f} ({g_lat - b_lat:+.1f})",
            ]
        )
    table = md_table(
        [
            "clients",
            "bare req/s",
            "guarded req/s",
            "bare tok/s",
            "guarded tok/s",
            "ratio of medians",
            "median per-round ratio (p25–p75)",
            "request ms, bare / guarded (median)",
        ],
        rows,
    )
    print(
        f"\nmedians of {args.rounds} rounds, {args.requests} completions × {args.tokens} tokens\n"
    )
    print(table)
    params = {"rounds": args.rounds, "requests": args.requests, "tokens": args.tokens}
    path = write_results("bench_run_server", machine, params, results)
    (RESULTS / "bench_run_server.md").write_text(
        "## bench_run_server\n\n"
        f"machine: {machine['platform']}; cpu: {machine['cpu']}, {machine['usable_cores']} usable "
        f"cores; mlx {machine['mlx']}, mlx-lm {machine['mlx_lm']}\n\n"
        f"Medians of {args.rounds} interleaved rounds, {args.requests} completions of "
        f"{args.tokens} tokens each; goal: guarded/bare ≥ 0.97.\n\n{table}\n",
        encoding="utf-8",
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
