"""The GPU gate: its uncontended cost, how it is handed over under contention and how
fast, before and after, side by side in one run.

Results: docs/benchmarks.md → "GPU gate".

"before" is ``metal_guard.py`` as of ``--baseline`` (a git revision, default the last
commit whose fair gate polled the lock every 2 ms at most) or ``--before-file``, "after"
the working copy; both are loaded from their files as ``metal_guard`` (one per
interpreter), with breadcrumbs off.

Part A — uncontended: ``with exclusive_gpu("bench"): pass`` in one process, ``--n`` calls
per row in interleaved blocks so drift hits both alike; "after" also once the queue file
exists (it does on any host where the gate was ever contended: the release probes it).

Part B — contention: P processes × 2 threads, each thread entering the gate in a tight
loop (release → retake at once) for ``--seconds``, bodies empty or a 1 ms sleep (a short
decode step). Bodies per second, hand-overs (consecutive bodies of different processes)
per second and as a share of the most possible, each process's share of the bodies, and
overlapping bodies (must be 0).

Part C — hand-over latency: 2 processes × 1 thread, each entering the gate in a loop with
a 2 ms body (so the other one is always waiting when a body ends), ``timeout=None`` (what
``metal-guard run`` uses) and ``timeout=60``; and, for the floor, the same loop around a
bare blocking ``flock`` without the library. Per hand-over (consecutive bodies of
different processes): the time from the end of one body (just before the release) to the
start of the next one (just after the acquire), median and p99. Parts C and D run
each row ``--rounds`` times, the rows taking turns, and pool the runs.

Part D — throughput with short bodies: 2 processes × 1 thread, bodies of 1 and 2 ms
(sleeps, as a decode step waits for the GPU), ``timeout=None``; bodies per second of both
together, with the gate against the same loops without any gate. The gate runs one body
at a time, so 0.5 of the ungated rate is the most it can reach with two processes.

    python bench/bench_gate.py [--n 3000] [--seconds 3] [--rounds 3] [--baseline 3707d36]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    REPO,
    child_env,
    machine_info,
    md_table,
    median,
    percentile,
    print_machine,
    write_results,
)

BASELINE = "3707d36"  # the last commit whose fair gate polls (every 2 ms at most)

UNCONTENDED = r"""
import importlib.util, json, os, sys, time
spec = importlib.util.spec_from_file_location("metal_guard", sys.argv[1])
mg = importlib.util.module_from_spec(spec); sys.modules["metal_guard"] = mg; spec.loader.exec_module(mg)
n, rounds = int(sys.argv[2]), 20
clock = time.perf_counter
for _ in range(50):
    with mg.exclusive_gpu("bench"): pass
print("ready", flush=True)
out = []
for line in sys.stdin:  # one block per line: interleaved with the other interpreter's
    if line.strip() == "end": break
    for _ in range(n // rounds):
        t0 = clock()
        with mg.exclusive_gpu("bench"): pass
        out.append((clock() - t0) * 1e6)
    print("done", flush=True)
print(json.dumps(out), flush=True)
"""

LOOP = r"""
import importlib.util, json, sys, threading, time
spec = importlib.util.spec_from_file_location("metal_guard", sys.argv[1])
mg = importlib.util.module_from_spec(spec); sys.modules["metal_guard"] = mg; spec.loader.exec_module(mg)
seconds, body = float(sys.argv[2]), float(sys.argv[3])
records = []
def work():
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with mg.exclusive_gpu("bench"):
            enter = time.monotonic()
            if body: time.sleep(body)
            records.append((enter, time.monotonic()))
with mg.exclusive_gpu("warm-up"): pass
threads = [threading.Thread(target=work) for _ in range(2)]
print("ready", flush=True)
sys.stdin.readline()
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(records), flush=True)
"""


PAIR = r"""
import contextlib, fcntl, importlib.util, json, os, sys, time
spec = importlib.util.spec_from_file_location("metal_guard", sys.argv[1])
mg = importlib.util.module_from_spec(spec); sys.modules["metal_guard"] = mg; spec.loader.exec_module(mg)
mode, seconds, body = sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
timeout = None if sys.argv[5] == "none" else float(sys.argv[5])
@contextlib.contextmanager
def bare_flock():  # the floor: a blocking flock and nothing else
    fd = os.open(os.path.join(os.environ["METALGUARD_HOME"], "bare.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)
def gate():
    if mode == "gate":
        return mg.exclusive_gpu("bench", timeout=timeout)
    return bare_flock() if mode == "flock" else contextlib.nullcontext()
with mg.exclusive_gpu("warm-up"): pass
records = []
print("ready", flush=True)
sys.stdin.readline()
clock = time.monotonic
end = clock() + seconds
while clock() < end:
    with gate():
        enter = clock()
        time.sleep(body)
        records.append((enter, clock()))
print(json.dumps(records), flush=True)
"""


def _spawn(code: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def _send(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text + "\n")
    proc.stdin.flush()


def part_a(files: dict[str, str], n: int, home: Path) -> dict[str, dict[str, float]]:
    """Uncontended p50/p99 per version, blocks interleaved between the interpreters."""
    samples: dict[str, list[float]] = {}
    for name in ("before", "after"):
        (home / name).mkdir(parents=True)
    (home / "queued").mkdir(parents=True)
    (home / "queued" / "gpu.lock.queue").touch()
    procs = {
        "before": _spawn(UNCONTENDED, files["before"], str(n), env=_env(home / "before")),
        "after": _spawn(UNCONTENDED, files["after"], str(n), env=_env(home / "after")),
        "after, queue file exists": _spawn(
            UNCONTENDED, files["after"], str(n), env=_env(home / "queued")
        ),
    }
    for proc in procs.values():
        assert _line(proc) == "ready"
    for r in range(20):
        order = list(procs.values())
        for proc in order[r % 3 :] + order[: r % 3]:
            _send(proc, "go")
            assert _line(proc) == "done"
    for name, proc in procs.items():
        _send(proc, "end")
        samples[name] = json.loads(_line(proc))
        proc.wait(30)
    return {
        name: {"p50": median(v), "p99": percentile(v, 99), "calls": len(v)}
        for name, v in samples.items()
    }


def _env(home: Path) -> dict[str, str]:
    return child_env(METALGUARD_HOME=str(home), METALGUARD_BREADCRUMB_PATH="")


def _gated_bodies(
    code: str, procs_n: int, *args: str, home: Path
) -> list[tuple[float, float, int]]:
    """Start ``procs_n`` processes of ``code``, let them go together, and collect their
    ``(enter, leave, process index)`` body records, sorted by entry."""
    home.mkdir(parents=True)
    procs = [_spawn(code, *args, env=_env(home)) for _ in range(procs_n)]
    for proc in procs:
        assert _line(proc) == "ready"
    for proc in procs:
        _send(proc, "go")
    records = sorted(
        (enter, leave, index)
        for index, proc in enumerate(procs)
        for enter, leave in json.loads(_line(proc))
    )
    for proc in procs:
        proc.wait(30)
    return records


def part_b(file: str, procs_n: int, seconds: float, body: float, home: Path) -> dict[str, Any]:
    records = _gated_bodies(LOOP, procs_n, file, str(seconds), str(body), home=home)
    span = records[-1][1] - records[0][0]
    counts = [sum(r[2] == i for r in records) for i in range(procs_n)]
    handovers = sum(a[2] != b[2] for a, b in itertools.pairwise(records))
    # the most hand-overs possible: every body but those of the largest share alternates
    most = min(len(records) - 1, 2 * (len(records) - max(counts)))
    return {
        "bodies": len(records),
        "bodies_per_s": len(records) / span,
        "handovers": handovers,
        "handovers_per_s": handovers / span,
        "handover_share": handovers / most if most else 0.0,
        "smallest_process_share": min(counts) / len(records),
        "overlaps": sum(b[0] < a[1] for a, b in itertools.pairwise(records)),
    }


def pair(
    file: str, mode: str, seconds: float, body: float, timeout: str, home: Path
) -> dict[str, Any]:
    """Two processes × one thread, bodies of ``body`` s: bodies, span, hand-over gaps (µs),
    overlaps."""
    records = _gated_bodies(PAIR, 2, file, mode, str(seconds), str(body), timeout, home=home)
    return {
        "bodies": len(records),
        "span": records[-1][1] - records[0][0],
        "gaps": [(b[0] - a[1]) * 1e6 for a, b in itertools.pairwise(records) if a[2] != b[2]],
        "overlaps": sum(b[0] < a[1] for a, b in itertools.pairwise(records)),
    }


def pairs(
    configs: dict[str, tuple[str, str, float, str]], rounds: int, seconds: float, home: Path
) -> dict[str, dict[str, Any]]:
    """Each ``name: (file, mode, body, timeout)`` run ``rounds`` times, the configurations
    taking turns (drift of a shared machine hits all alike); runs pooled per name."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(rounds):
        for i, name in enumerate(names[r % len(names) :] + names[: r % len(names)]):
            file, mode, body, timeout = configs[name]
            runs[name].append(pair(file, mode, seconds, body, timeout, home / f"{r}-{i}"))
    out = {}
    for name, done in runs.items():
        gaps = [g for run in done for g in run["gaps"]]
        bodies = sum(run["bodies"] for run in done)
        out[name] = {
            "bodies": bodies,
            "bodies_per_s": bodies / sum(run["span"] for run in done),
            "handovers": len(gaps),
            "gap_p50_us": median(gaps) if gaps else None,
            "gap_p99_us": percentile(gaps, 99) if gaps else None,
            "overlaps": sum(run["overlaps"] for run in done),
            "rounds": rounds,
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="uncontended calls per version")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each contended run")
    p.add_argument("--rounds", type=int, default=3, help="runs of each row of parts C and D")
    p.add_argument("--baseline", default=BASELINE, help="git revision of 'before'")
    p.add_argument("--before-file", help="'before' from this file instead of a git revision")
    args = p.parse_args()
    machine = machine_info()
    print_machine(machine)
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp_name:
        tmp = Path(tmp_name)
        before = tmp / "metal_guard_before.py"
        if args.before_file:  # e.g. on a machine without the repository's history
            before.write_bytes(Path(args.before_file).read_bytes())
        else:
            before.write_bytes(
                subprocess.run(
                    ["git", "-C", str(REPO), "show", f"{args.baseline}:metal_guard.py"],
                    capture_output=True,
                    check=True,
                ).stdout
            )
        files = {"before": str(before), "after": str(REPO / "metal_guard.py")}
        origin = args.before_file or f"metal_guard.py at {args.baseline}"
        print(f"\nbefore: {origin}; after: the working copy\n")
        a = part_a(files, args.n, tmp / "a")
        print(f"### A. uncontended enter + leave of an empty gate, {args.n} calls each (µs)\n")
        base = a["before"]["p50"]
        print(
            md_table(
                ["version", "p50 µs", "p99 µs", "p50 / before"],
                [
                    [k, f"{v['p50']:.1f}", f"{v['p99']:.1f}", f"{v['p50'] / base:.2f}"]
                    for k, v in a.items()
                ],
            )
        )
        b: dict[str, Any] = {}
        rows = []
        for procs_n, body in ((2, 0.0), (2, 0.001), (3, 0.001)):
            for version in ("before", "after"):
                key = f"{procs_n} procs × 2 threads, body {body * 1000:g} ms, {version}"
                home = tmp / f"b{procs_n}-{body}-{version}"
                b[key] = r = part_b(files[version], procs_n, args.seconds, body, home)
                rows.append(
                    [
                        f"{procs_n} × 2, {body * 1000:g} ms",
                        version,
                        f"{r['bodies_per_s']:.0f}",
                        f"{r['handovers_per_s']:.0f}",
                        f"{100 * r['handover_share']:.0f}%",
                        f"{100 * r['smallest_process_share']:.0f}%",
                        r["overlaps"],
                    ]
                )
        print(f"\n### B. contention: each thread retakes the gate at once, {args.seconds:g} s\n")
        print(
            md_table(
                [
                    "procs × threads, body",
                    "version",
                    "bodies/s",
                    "hand-overs/s",
                    "of most possible",
                    "smallest proc's share",
                    "overlaps",
                ],
                rows,
            )
        )
        c = pairs(
            {
                **{
                    f"timeout {timeout}, {version}": (files[version], "gate", 0.002, timeout)
                    for timeout in ("none", "60")
                    for version in ("before", "after")
                },
                "-, a bare blocking flock": (files["after"], "flock", 0.002, "none"),
            },
            args.rounds,
            args.seconds,
            tmp / "c",
        )
        rows = [
            [
                "None" if key.startswith("timeout none") else key.split(",")[0][8:] or "-",
                key.split(", ")[1],
                r["handovers"],
                f"{r['gap_p50_us']:.0f}",
                f"{r['gap_p99_us']:.0f}",
                r["overlaps"],
            ]
            for key, r in c.items()
        ]
        print(
            f"\n### C. hand-over latency: 2 processes × 1 thread, 2 ms bodies, "
            f"{args.rounds} × {args.seconds:g} s\n"
        )
        print(md_table(["timeout", "version", "hand-overs", "p50 µs", "p99 µs", "overlaps"], rows))
        d = pairs(
            {
                f"body {body * 1000:g} ms, {version}": (
                    files["after" if version == "no gate" else version],
                    "none" if version == "no gate" else "gate",
                    body,
                    "none",
                )
                for body in (0.001, 0.002)
                for version in ("no gate", "before", "after")
            },
            args.rounds,
            args.seconds,
            tmp / "d",
        )
        rows = []
        for body in ("1", "2"):
            bare = d[f"body {body} ms, no gate"]
            for version in ("before", "after"):
                r = d[f"body {body} ms, {version}"]
                r["ratio"] = r["bodies_per_s"] / bare["bodies_per_s"]
                rows.append(
                    [
                        f"{body} ms",
                        version,
                        f"{bare['bodies_per_s']:.0f}",
                        f"{r['bodies_per_s']:.0f}",
                        f"{r['ratio']:.3f}",
                        f"{r['gap_p50_us']:.0f}",
                        r["overlaps"],
                    ]
                )
        print(
            f"\n### D. 2 processes × 1 thread, short bodies, timeout None, "
            f"{args.rounds} × {args.seconds:g} s (0.5 is the most a gate allows)\n"
        )
        print(
            md_table(
                [
                    "body",
                    "version",
                    "no gate bodies/s",
                    "gated bodies/s",
                    "gated / no gate",
                    "hand-over p50 µs",
                    "overlaps",
                ],
                rows,
            )
        )
        after_q = a["after, queue file exists"]["p50"]
        print(
            f"\nuncontended p50: after / before = {a['after']['p50']:.1f} / {base:.1f} µs = "
            f"{a['after']['p50'] / base:.2f}; with the queue file {after_q:.1f} µs = "
            f"{after_q / base:.2f}"
        )
        path = write_results(
            "bench_gate",
            machine,
            {
                "n": args.n,
                "seconds": args.seconds,
                "rounds": args.rounds,
                "baseline": args.before_file or args.baseline,
            },
            {"uncontended": a, "contended": b, "handover": c, "short_bodies": d},
        )
        print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
