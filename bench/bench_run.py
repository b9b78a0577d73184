"""Start-up cost of ``metal-guard run`` and of its bootstrap (goal: the bootstrap adds
< 15 ms to a ``python -c pass``).

Results: docs/run.md → "Cost".

Runs ``--runs`` interleaved rounds of three fresh interpreters (the order rotates each
round, so slow drift hits all alike):

* bare:      ``python -c pass``
* bootstrap: ``python -c pass`` with only the environment run gives a Python program (the
  bootstrap folder first on ``PYTHONPATH``, the ``METALGUARD_RUN_*`` variables): what the
  program itself pays — the user ``sitecustomize`` chain and ``import metal_guard``
* run:       ``python -m metal_guard run -- python -c pass``: the whole command, run's own
  interpreter, parser and pre-flight included

and reports the medians side by side with their ratios and differences to bare.

    python bench/bench_run.py [--runs 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
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

sys.path.insert(0, str(REPO))
import metal_guard as mg  # the working copy, after the path is set

TARGET_MS = 15.0


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Wall time (ms) of ``argv`` to completion; it must exit 0."""
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"{argv!r} failed ({proc.returncode}): {proc.stderr.strip()}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=40, help="interleaved rounds (default 40)")
    args = p.parse_args()

    machine = machine_info()
    print_machine(machine)
    print(f"\n{args.runs} interleaved rounds of fresh interpreters ({sys.executable})")

    with tempfile.TemporaryDirectory(prefix="bench-run-") as home:
        base = child_env(METALGUARD_HOME=home, PYTHONPATH=str(REPO))
        # As a user's Python: byte code cached (without it, every start compiles the module).
        base.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["METALGUARD_HOME"] = home  # where this process writes the bootstrap folder
        folder = mg._run_bootstrap_folder()
        boot_env = mg._run_child_env(base, folder, mg._RunOptions(), supervisor=os.getpid())
        py = [sys.executable, "-c", "pass"]
        cases: dict[str, tuple[list[str], dict[str, str]]] = {
            "bare": (py, base),
            "bootstrap": (py, boot_env),
            "run": ([sys.executable, "-m", "metal_guard", "run", "--", *py], base),
        }
        for argv, env in cases.values():  # warm the page cache and the .pyc files
            for _ in range(3):
                timed(argv, env)
        times: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for i in range(args.runs):
            for name in names[i % 3 :] + names[: i % 3]:
                times[name].append(timed(*cases[name]))

    med = {name: median(values) for name, values in times.items()}
    rows = [
        [
            label,
            f"{med[name]:.2f}",
            f"{percentile(times[name], 10):.2f}",
            f"{percentile(times[name], 90):.2f}",
            f"{med[name] / med['bare']:.2f}x",
            f"{med[name] - med['bare']:+.2f}",
        ]
        for name, label in (
            ("bare", "python -c pass"),
            ("bootstrap", "python -c pass, bootstrap environment only"),
            ("run", "metal-guard run -- python -c pass"),
        )
    ]
    print()
    print(md_table(["command", "median ms", "p10 ms", "p90 ms", "vs bare", "added ms"], rows))
    added = med["bootstrap"] - med["bare"]
    verdict = "meets" if added < TARGET_MS else "MISSES"
    print(
        f"\nthe bootstrap adds {added:.2f} ms to the program's start: {verdict} the "
        f"< {TARGET_MS:g} ms goal; run's own start (its interpreter, parser and pre-flight) "
        f"is the rest: {med['run'] - med['bootstrap']:.2f} ms"
    )

    results: dict[str, Any] = {
        name: {
            "median_ms": med[name],
            "p10_ms": percentile(values, 10),
            "p90_ms": percentile(values, 90),
            "ratio_to_bare": med[name] / med["bare"],
            "added_ms": med[name] - med["bare"],
            "raw_ms": values,
        }
        for name, values in times.items()
    }
    results["target_bootstrap_added_ms"] = TARGET_MS
    path = write_results("bench_run", machine, {"runs": args.runs}, results)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
