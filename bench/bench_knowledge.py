"""Knowledge: what version advisories, the system audit and the wired-limit policy cost.

Results: docs/benchmarks.md → "Knowledge"; docs/knowledge.md.

Part A — in-process latency (median and p99 of ``--n`` calls, µs):

* ``check_version_advisories()``: versions from package metadata (three
  ``importlib.metadata`` look-ups), then 14 entries matched;
* ``check_version_advisories(packages=...)``: matching only;
* ``_spec_matches`` for one (cached) spec;
* ``audit_wired_limit()``, ``read_gpu_driver_version()``, ``log_system_audit_at_startup()``
  as this machine runs them (off macOS: no subprocess);
* one ``mx.set_wired_limit`` call through the wired-limit policy vs the bare function (a
  stand-in function, so only the wrapper is measured).

Part B — the audit with the macOS commands, as stand-in executables on ``PATH`` (this
machine cannot run the real ones): ``sysctl`` answering at once (the cost of the two
subprocesses), and a ``sysctl`` that never answers (the bound: 2 s, then SIGTERM).

Part C — ``metal-guard audit --json`` end to end (a fresh interpreter each run).

    python bench/bench_knowledge.py [--n 300] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import types
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
    timed_calls,
    write_results,
)

FAKE_SYSCTL = """#!{python}
import os, sys, time
if os.environ.get("FAKE_SYSCTL_HANG"):
    time.sleep(60)
print({{"iogpu.wired_limit_mb": "0", "hw.memsize": "68719476736"}}.get(sys.argv[-1], ""))
"""


def _import_metal_guard() -> Any:
    sys.path.insert(0, str(REPO))
    import metal_guard

    return metal_guard


def timed(fn: Callable[[], object], n: int) -> list[float]:
    """Per-call latency in µs of ``fn()`` over ``n`` calls (after 1 untimed call)."""
    return timed_calls(fn, n, warmup=1)


def row(name: str, lat: list[float]) -> dict[str, Any]:
    return {"call": name, "n": len(lat), "p50_us": median(lat), "p99_us": percentile(lat, 99)}


def part_a(mg: Any, n: int) -> list[dict[str, Any]]:
    rows = [
        row("check_version_advisories() (metadata)", timed(mg.check_version_advisories, n)),
        row(
            "check_version_advisories(packages=...)",
            timed(
                lambda: mg.check_version_advisories(
                    packages={"mlx": "0.31.2", "mlx-lm": "0.31.2", "mlx-vlm": "0.4.4"}
                ),
                n,
            ),
        ),
        row(
            "_spec_matches('>=0.31.0,<=0.31.2', '0.31.2rc1')",
            timed(lambda: mg._spec_matches(">=0.31.0,<=0.31.2", "0.31.2rc1"), n),
        ),
        row("audit_wired_limit() (this machine)", timed(mg.audit_wired_limit, n)),
        row("read_gpu_driver_version() (this machine)", timed(mg.read_gpu_driver_version, n)),
        row(
            "log_system_audit_at_startup() (this machine)", timed(mg.log_system_audit_at_startup, n)
        ),
    ]
    core = types.ModuleType("mlx.core")
    core.set_wired_limit = lambda limit: 0  # type: ignore[attr-defined]
    core.device_info = lambda: {"memory_size": 64 << 30}  # type: ignore[attr-defined]
    saved = sys.modules.get("mlx.core")
    sys.modules["mlx.core"] = core
    try:
        bare = timed(lambda: core.set_wired_limit(48 << 30), n)
        mg.limit_wired_memory("cap")
        wrapped = timed(lambda: core.set_wired_limit(48 << 30), n)
        under = timed(lambda: core.set_wired_limit(1 << 30), n)
        mg.restore_wired_memory()
    finally:
        if saved is None:
            sys.modules.pop("mlx.core", None)
        else:
            sys.modules["mlx.core"] = saved
    rows += [
        row("set_wired_limit (bare stand-in)", bare),
        row("set_wired_limit through policy 'cap', clamped", wrapped),
        row("set_wired_limit through policy 'cap', under the cap", under),
    ]
    return rows


def part_b(mg: Any, tmp: Path, runs: int) -> list[dict[str, Any]]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sysctl"
    script.write_text(FAKE_SYSCTL.format(python=sys.executable))
    script.chmod(0o755)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    real_on_macos = mg._on_macos
    mg._on_macos = lambda: True
    results = []
    try:
        for label, hang, count in (
            ("answers at once", False, runs * 4),
            ("never answers", True, runs),
        ):
            if hang:
                os.environ["FAKE_SYSCTL_HANG"] = "1"
            else:
                os.environ.pop("FAKE_SYSCTL_HANG", None)
            walls = []
            mode = None
            for _ in range(count):
                t0 = time.perf_counter()
                report = mg.audit_wired_limit()
                walls.append(time.perf_counter() - t0)
                mode = report["mode"]
            results.append(
                {
                    "stand-in sysctl": label,
                    "runs": count,
                    "median_s": median(walls),
                    "max_s": max(walls),
                    "mode": mode,
                }
            )
    finally:
        mg._on_macos = real_on_macos
        os.environ.pop("FAKE_SYSCTL_HANG", None)
    return results


def part_c(home: Path, runs: int) -> dict[str, Any]:
    env = child_env(METALGUARD_HOME=str(home), PYTHONPATH=str(REPO))
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "metal_guard", "audit", "--json"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        walls.append(time.perf_counter() - t0)
    assert '"command": "audit"' in proc.stdout
    baseline = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=60)
        baseline.append(time.perf_counter() - t0)
    return {
        "runs": runs,
        "audit_median_s": median(walls),
        "python_startup_median_s": median(baseline),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="calls per latency row (default 300)")
    p.add_argument("--runs", type=int, default=5, help="runs of parts B and C (default 5)")
    args = p.parse_args()
    machine = machine_info()
    print_machine(machine)
    with tempfile.TemporaryDirectory(prefix="bench-knowledge-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["METALGUARD_HOME"] = str(tmp / "home")
        os.environ["METALGUARD_BREADCRUMB_PATH"] = ""
        mg = _import_metal_guard()
        a = part_a(mg, args.n)
        print(f"\n## A. in-process latency (µs, {args.n} calls after a warm-up)\n")
        print(
            md_table(
                ["call", "p50 µs", "p99 µs"],
                [[r["call"], f"{r['p50_us']:.2f}", f"{r['p99_us']:.2f}"] for r in a],
            )
        )
        b = part_b(mg, tmp, args.runs)
        print("\n## B. audit_wired_limit() with a stand-in macOS sysctl on PATH\n")
        print(
            md_table(
                ["stand-in sysctl", "runs", "median s", "max s", "mode"],
                [
                    [
                        r["stand-in sysctl"],
                        r["runs"],
                        f"{r['median_s']:.3f}",
                        f"{r['max_s']:.3f}",
                        r["mode"],
                    ]
                    for r in b
                ],
            )
        )
        print("\n(bound: both sysctl calls share 2 s; an overrunning one gets SIGTERM, then 0.5 s)")
        c = part_c(tmp / "cli-home", args.runs)
        print("\n## C. `metal-guard audit --json`, fresh interpreter each run\n")
        print(
            md_table(
                ["runs", "audit median s", "bare `python -c pass` median s"],
                [[c["runs"], f"{c['audit_median_s']:.3f}", f"{c['python_startup_median_s']:.3f}"]],
            )
        )
    path = write_results(
        "bench_knowledge", machine, {"n": args.n, "runs": args.runs}, {"A": a, "B": b, "C": c}
    )
    print(f"\nresults: {path}")
    hang = next(r for r in b if r["stand-in sysctl"] == "never answers")
    return 0 if hang["max_s"] < 3.5 else 1


if __name__ == "__main__":
    sys.exit(main())
