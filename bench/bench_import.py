"""Import time of ``metal_guard`` in fresh interpreters (target: < 10 ms).

Results: docs/benchmarks.md → "Import time".

Runs ``--runs`` interleaved pairs of fresh, isolated (``-I``) interpreters:

* baseline: ``python -I -c "import sys; sys.path.insert(0, REPO)"``
* import:   ``python -I -c "import sys; sys.path.insert(0, REPO); import metal_guard"``

and reports the median wall time of each and the difference of the medians (what
``import metal_guard`` adds to a bare interpreter), plus the median of the per-pair
differences. ``-X importtime`` gives the module's own cumulative import time and its
biggest entries for reference, and a last child lists the modules the import brings in.

    python bench/bench_import.py [--runs 100]
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
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

TARGET_MS = 10.0
PATH_SETUP = f"import sys; sys.path.insert(0, {str(REPO)!r})"
BASE_CODE = PATH_SETUP
IMPORT_CODE = PATH_SETUP + "; import metal_guard"
NEW_MODULES_CODE = (
    PATH_SETUP
    + "; before = set(sys.modules); import metal_guard; "
    + "print('\\n'.join(sorted(set(sys.modules) - before)))"
)
IMPORTTIME_RE = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)")


def run_child(code: str, *flags: str) -> tuple[float, str]:
    """Wall time (s) of a fresh ``python -I`` running ``code``; its stderr."""
    cmd = [sys.executable, "-I", *flags, "-c", code]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({proc.returncode}): {proc.stderr.strip()}")
    return elapsed, proc.stderr


def importtime_entries(stderr: str) -> list[tuple[int, int, int, str]]:
    """``(self_us, cumulative_us, depth, module)`` rows of ``-X importtime`` output."""
    rows = []
    for line in stderr.splitlines():
        m = IMPORTTIME_RE.match(line)
        if m:
            depth = (len(m.group(3)) - 1) // 2
            rows.append((int(m.group(1)), int(m.group(2)), depth, m.group(4)))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--runs", type=int, default=100, help="interleaved pairs of interpreters (default 100)"
    )
    p.add_argument("--importtime-runs", type=int, default=9, help="-X importtime runs (default 9)")
    args = p.parse_args()

    machine = machine_info()
    print_machine(machine)
    print(f"\n{args.runs} interleaved pairs of fresh `python -I` interpreters ({sys.executable})")

    for _ in range(3):  # warm the page cache and the .pyc files
        run_child(BASE_CODE)
        run_child(IMPORT_CODE)
    base: list[float] = []
    imp: list[float] = []
    for i in range(args.runs):
        # alternate which one goes first so slow drift hits both alike
        order = (BASE_CODE, IMPORT_CODE) if i % 2 == 0 else (IMPORT_CODE, BASE_CODE)
        for code in order:
            (base if code is BASE_CODE else imp).append(run_child(code)[0] * 1000)
    diffs = [b - a for a, b in zip(base, imp, strict=True)]

    # the module's own cumulative import time, measured inside the interpreter
    cumulative: list[float] = []
    last_rows: list[tuple[int, int, int, str]] = []
    for _ in range(args.importtime_runs):
        entries = importtime_entries(run_child(IMPORT_CODE, "-X", "importtime")[1])
        mine = [r for r in entries if r[3] == "metal_guard"]
        if mine:
            cumulative.append(mine[-1][1] / 1000)
        last_rows = entries
    # entries of the last run that belong to metal_guard's import (it is the last top-level one)
    start = max(
        (i for i, r in enumerate(last_rows) if r[2] == 0 and r[3] != "metal_guard"), default=-1
    )
    beneath = last_rows[start + 1 :]
    top = sorted(beneath, key=lambda r: r[1], reverse=True)[:8]

    proc = subprocess.run(
        [sys.executable, "-I", "-c", NEW_MODULES_CODE],
        capture_output=True,
        text=True,
        env=child_env(),
        check=True,
    )
    new_modules = proc.stdout.split()

    base_med, imp_med = median(base), median(imp)
    added = imp_med - base_med
    pair_med = median(diffs)
    cum_med = median(cumulative)
    rows = [
        [
            "python -I -c pass (+ sys.path)",
            f"{base_med:.2f}",
            f"{percentile(base, 10):.2f}",
            f"{percentile(base, 90):.2f}",
        ],
        [
            "python -I -c 'import metal_guard'",
            f"{imp_med:.2f}",
            f"{percentile(imp, 10):.2f}",
            f"{percentile(imp, 90):.2f}",
        ],
    ]
    print()
    print(md_table(["interpreter", "median ms", "p10 ms", "p90 ms"], rows))
    print()
    summary = [
        ["difference of medians", f"{added:.2f}"],
        ["median of per-pair differences", f"{pair_med:.2f}"],
        ["-X importtime cumulative (median)", f"{cum_med:.2f}"],
        ["-X importtime cumulative (min)", f"{min(cumulative, default=math.nan):.2f}"],
        ["target", f"< {TARGET_MS:g}"],
    ]
    print(md_table(["import metal_guard adds", "ms"], summary))
    verdict = "meets" if max(added, cum_med) < TARGET_MS else "MISSES"
    print(f"\n{verdict} the < {TARGET_MS:g} ms target (the original metal-guard: 40-60 ms)")

    print(
        f"\n-X importtime, biggest entries under `import metal_guard` (last of {args.importtime_runs} runs):"
    )
    print(
        md_table(
            ["module", "self us", "cumulative us"],
            [[("  " * r[2]) + r[3], r[0], r[1]] for r in top],
        )
    )
    print(
        f"\nmodules the import adds to sys.modules ({len(new_modules)}): {', '.join(new_modules)}"
    )

    results: dict[str, Any] = {
        "baseline_ms": {
            "median": base_med,
            "p10": percentile(base, 10),
            "p90": percentile(base, 90),
        },
        "import_ms": {"median": imp_med, "p10": percentile(imp, 10), "p90": percentile(imp, 90)},
        "added_ms_difference_of_medians": added,
        "added_ms_median_of_pair_differences": pair_med,
        "importtime_cumulative_ms_median": cum_med,
        "importtime_cumulative_ms_runs": cumulative,
        "importtime_top": [{"module": r[3], "self_us": r[0], "cumulative_us": r[1]} for r in top],
        "new_modules": new_modules,
        "target_ms": TARGET_MS,
        "raw_baseline_ms": base,
        "raw_import_ms": imp,
    }
    path = write_results(
        "bench_import",
        machine,
        {"runs": args.runs, "importtime_runs": args.importtime_runs},
        results,
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
