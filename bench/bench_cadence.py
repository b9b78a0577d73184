"""Cadence: ``CadenceGuard.admit`` latency and the multi-process contention run.

Results: docs/benchmarks.md → "Cadence".

Part A — single process, ``--n`` calls each, latency p50/p99:

* ``admit``, same id, 0 s interval (every call is admitted and writes the store);
* ``admit``, a fresh id per call with a 180 s interval (admitted; the store grows to N ids);
* ``admit`` refused (``CadenceViolation``: the violation path, which writes nothing but a
  breadcrumb);
* ``check`` (read-only) against the N-id store;
* the original metal-guard's way, re-created: a separate check, then a mark that rewrites
  the file through a fixed-name temp file with ``fsync`` (not atomic across processes) —
  side by side with ``admit`` in the same run;

with breadcrumbs off (the store alone) and, for the first and third, on (one more
``O_APPEND`` write + ``fsync``).

Part B — contention: P processes hammer ``admit`` on one model in one store for S seconds
with interval I (breadcrumbs off, no sleep between attempts). A correct guard admits at most
``floor(S / I) + 1`` times, never two admissions closer than I. Each admitted worker reads
back the timestamp and pid the guard recorded (exact while the guard is correct; a pid
that is not its own marks the read as unverified). Violations = admissions closer than I
to the previous one. The original metal-guard's separate check-then-mark admitted 279 times for 25
slots at (8, 6 s, 0.25 s) and 13 for 7 at (2, 7 s, 1 s).

    python bench/bench_cadence.py [--n 500] [--contention 2x7x1,8x6x0.25]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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

MODEL = "bench/contended-model"


def _import_metal_guard() -> Any:
    sys.path.insert(0, str(REPO))
    import metal_guard

    return metal_guard


# -- part A -------------------------------------------------------------------------


class OriginalStyleCadence:
    """The original metal-guard's way of admitting a load, re-created for comparison.

    Not its code: the same file operations as its documented behaviour — a flat JSON
    object, a separate ``check`` (read) and ``mark_load`` (read, then write a fixed-name
    temp file, ``fsync`` it, ``os.replace``), guarded only by an in-process lock. It is
    not atomic across processes (two processes can both pass ``check``); this row shows
    what that costs when nothing else runs.
    """

    def __init__(self, path: Path, interval: float = 0.0) -> None:
        import threading

        self.path = path
        self.interval = interval
        self.lock = threading.Lock()

    def _read(self) -> dict[str, float]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def check(self, model: str) -> None:
        with self.lock:
            last = self._read().get(model)
        if last is not None and time.time() - last < self.interval:
            raise RuntimeError("too soon")

    def mark_load(self, model: str) -> None:
        with self.lock:
            data = self._read()
            data[model] = time.time()
            tmp = f"{self.path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def check_then_mark(self, model: str) -> None:
        self.check(model)
        self.mark_load(model)


def timed_calls(fn: Callable[[int], None], n: int) -> list[float]:
    """Per-call latency in µs of ``fn(i)`` for i in range(n)."""
    out = []
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        fn(i)
        out.append((clock() - t0) * 1e6)
    return out


def part_a(n: int, tmp: Path) -> dict[str, Any]:
    mg = _import_metal_guard()
    crumbs = str(tmp / "crumbs.log")
    results: dict[str, Any] = {}

    def run(name: str, breadcrumbs: bool, make: Callable[[Path], Callable[[int], None]]) -> None:
        os.environ["METALGUARD_BREADCRUMB_PATH"] = crumbs if breadcrumbs else ""
        folder = tmp / f"a-{len(results)}"
        folder.mkdir()
        fn = make(folder / "cadence.json")
        fn(-1)  # warm-up (creates the store and the lock file)
        lat = timed_calls(fn, n)
        results[f"{name}; breadcrumbs {'on' if breadcrumbs else 'off'}"] = {
            "call": name,
            "breadcrumbs": breadcrumbs,
            "p50_us": percentile(lat, 50),
            "p99_us": percentile(lat, 99),
            "mean_us": sum(lat) / len(lat),
            "max_us": max(lat),
        }

    def admit_same(store: Path) -> Callable[[int], None]:
        guard = mg.CadenceGuard(store, min_interval_sec=0, cross_model_interval_sec=0)
        return lambda i: guard.admit("bench/model")

    def admit_fresh(store: Path) -> Callable[[int], None]:
        guard = mg.CadenceGuard(store, min_interval_sec=180)
        return lambda i: guard.admit(f"bench/model-{i}")

    def refused(store: Path) -> Callable[[int], None]:
        guard = mg.CadenceGuard(store, min_interval_sec=180)
        guard.admit("bench/model")

        def call(i: int) -> None:
            try:
                guard.admit("bench/model")
            except mg.CadenceViolation:
                return
            raise AssertionError("admit was expected to refuse")

        return call

    def original_check_then_mark(store: Path) -> Callable[[int], None]:
        recreation = OriginalStyleCadence(store)
        return lambda i: recreation.check_then_mark("bench/model")

    def check_big(store: Path) -> Callable[[int], None]:
        guard = mg.CadenceGuard(store, min_interval_sec=180)
        for i in range(n):
            guard.mark_load(f"bench/model-{i}")
        return lambda i: guard.check("bench/other-model")

    run("admit, same id, 0 s interval", False, admit_same)
    run("original-style check + mark (not atomic), same id", False, original_check_then_mark)
    run("admit, fresh id each (store grows to N)", False, admit_fresh)
    run("admit refused (CadenceViolation)", False, refused)
    run("check, N-id store", False, check_big)
    run("admit, same id, 0 s interval", True, admit_same)
    run("admit refused (CadenceViolation)", True, refused)
    os.environ.pop("METALGUARD_BREADCRUMB_PATH", None)

    print(f"\n## A. single process, {n} calls each (µs)")
    rows = [
        [
            r["call"],
            "on" if r["breadcrumbs"] else "off",
            f"{r['p50_us']:.0f}",
            f"{r['p99_us']:.0f}",
            f"{r['mean_us']:.0f}",
            f"{r['max_us']:.0f}",
        ]
        for r in results.values()
    ]
    print(md_table(["call", "breadcrumbs", "p50 µs", "p99 µs", "mean µs", "max µs"], rows))
    ours = results["admit, same id, 0 s interval; breadcrumbs off"]["p50_us"]
    theirs = results["original-style check + mark (not atomic), same id; breadcrumbs off"]["p50_us"]
    results["admit_vs_original_p50_ratio"] = ours / theirs
    print(
        f"\nadmit p50 / original-style check+mark p50 = {ours:.0f} / {theirs:.0f} µs "
        f"= {ours / theirs:.2f} (below 1: admit is faster, while also atomic across processes)"
    )
    return results


# -- part B -------------------------------------------------------------------------


def worker(store: str, interval: float, start_at: float, duration: float, out: str) -> int:
    """One contending process: hammer ``admit`` from ``start_at`` for ``duration`` s."""
    os.environ["METALGUARD_BREADCRUMB_PATH"] = ""
    mg = _import_metal_guard()
    guard = mg.CadenceGuard(store, min_interval_sec=interval, cross_model_interval_sec=0)
    admissions: list[dict[str, Any]] = []
    latencies: list[float] = []
    refusals = 0
    errors: list[str] = []
    pid = os.getpid()
    while time.time() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.time())))
    end = start_at + duration
    while True:
        t0 = time.time()
        if t0 >= end:
            break
        p0 = time.perf_counter()
        try:
            guard.admit(MODEL)
        except mg.CadenceViolation:
            refusals += 1
            latencies.append(time.perf_counter() - p0)
            continue
        except Exception as exc:  # counted, not fatal: the run reports errors
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        latencies.append(time.perf_counter() - p0)
        t1 = time.time()
        row = next((e for e in guard.status()["events"] if e["model_id"] == MODEL), None)
        ts = None if row is None else row["last_load"]
        verified = row is not None and row["pid"] == pid and ts is not None and t0 <= ts <= t1
        admissions.append({"t0": t0, "t1": t1, "ts": ts, "verified": verified})
    doc = {
        "pid": pid,
        "admissions": admissions,
        "refusals": refusals,
        "errors": errors,
        "attempts": len(latencies) + len(errors),
        "latency_p50_us": percentile(latencies, 50) * 1e6,
        "latency_p99_us": percentile(latencies, 99) * 1e6,
    }
    Path(out).write_text(json.dumps(doc), encoding="utf-8")
    return 0


def contention(procs: int, duration: float, interval: float, tmp: Path) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"c{procs}-", dir=tmp))
    store = folder / "cadence.json"
    start_at = time.time() + 1.0 + 0.1 * procs  # after every child has started
    children = []
    outs = []
    for k in range(procs):
        out = folder / f"w{k}.json"
        outs.append(out)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(store),
            repr(interval),
            repr(start_at),
            repr(duration),
            str(out),
        ]
        children.append(subprocess.Popen(cmd, env=child_env()))
    codes = [c.wait() for c in children]
    docs = [json.loads(o.read_text(encoding="utf-8")) for o in outs if o.exists()]
    admissions = [a for d in docs for a in d["admissions"]]
    verified = sorted(a["ts"] for a in admissions if a["verified"])
    unverified = [a for a in admissions if not a["verified"]]
    # unverified reads fall back to the middle of the admit call
    times = sorted(verified + [(a["t0"] + a["t1"]) / 2 for a in unverified])
    gaps = [b - a for a, b in itertools.pairwise(times)]
    violations = sum(g < interval - 1e-9 for g in gaps)
    max_correct = math.floor(duration / interval + 1e-9) + 1
    return {
        "processes": procs,
        "seconds": duration,
        "interval_sec": interval,
        "admissions": len(admissions),
        "max_correct": max_correct,
        "violations": violations,
        "unverified_reads": len(unverified),
        "min_gap_sec": min(gaps) if gaps else None,
        "refusals": sum(d["refusals"] for d in docs),
        "attempts": sum(d["attempts"] for d in docs),
        "errors": [e for d in docs for e in d["errors"]],
        "worker_exit_codes": codes,
        "attempt_latency_p50_us": median([d["latency_p50_us"] for d in docs]),
        "attempt_latency_p99_us_max": max((d["latency_p99_us"] for d in docs), default=math.nan),
    }


def part_b(specs: list[tuple[int, float, float]], tmp: Path) -> list[dict[str, Any]]:
    print("\n## B. contention: P processes hammering admit() on one model, one store")
    runs = []
    for procs, duration, interval in specs:
        print(
            f"  running {procs} processes × {duration:g} s × {interval:g} s interval …", flush=True
        )
        runs.append(contention(procs, duration, interval, tmp))
    rows = [
        [
            f"{r['processes']} × {r['seconds']:g} s × {r['interval_sec']:g} s",
            r["admissions"],
            r["max_correct"],
            r["violations"],
            "-" if r["min_gap_sec"] is None else f"{r['min_gap_sec']:.4f}",
            r["attempts"],
            r["refusals"],
            len(r["errors"]),
            r["unverified_reads"],
            f"{r['attempt_latency_p50_us']:.0f}",
            f"{r['attempt_latency_p99_us_max']:.0f}",
        ]
        for r in runs
    ]
    print(
        md_table(
            [
                "procs × seconds × interval",
                "admissions",
                "max correct",
                "violations",
                "min gap s",
                "attempts",
                "refused",
                "errors",
                "unverified",
                "attempt p50 µs",
                "p99 µs (worst proc)",
            ],
            rows,
        )
    )
    bad = [r for r in runs if r["violations"] or r["errors"] or r["admissions"] > r["max_correct"]]
    print(
        "\n"
        + ("0 violations, 0 errors in every run" if not bad else f"PROBLEMS in {len(bad)} run(s)")
    )
    return runs


def parse_spec(text: str) -> list[tuple[int, float, float]]:
    specs = []
    for part in text.split(","):
        p, s, i = part.strip().lower().split("x")
        specs.append((int(p), float(s), float(i)))
    return specs


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        store, interval, start_at, duration, out = sys.argv[2:7]
        return worker(store, float(interval), float(start_at), float(duration), out)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="calls per latency row (default 500)")
    p.add_argument(
        "--contention",
        default="2x7x1,8x6x0.25",
        help="runs as PROCSxSECONDSxINTERVAL, comma-separated (default 2x7x1,8x6x0.25)",
    )
    args = p.parse_args()
    specs = parse_spec(args.contention)

    machine = machine_info()
    print_machine(machine)
    with tempfile.TemporaryDirectory(prefix="bench-cadence-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["METALGUARD_HOME"] = str(tmp / "home")
        latency = part_a(args.n, tmp)
        runs = part_b(specs, tmp)
    path = write_results(
        "bench_cadence",
        machine,
        {"n": args.n, "contention": args.contention},
        {"latency": latency, "contention": runs},
    )
    print(f"\nresults: {path}")
    failed = any(r["violations"] or r["errors"] or any(r["worker_exit_codes"]) for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
