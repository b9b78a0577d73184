"""Benchmark: the post-panic gate's check when nothing changed, against a scan.

Results: ``bench/results/bench_post_panic.json`` (and ``.md`` through ``run_all.py``).

Every load admission, worker start, ``check`` and ``run`` asks the post-panic gate
first, so its common case — no new report since the last scan, by any process —
must cost little. A report folder like a Mac's ``/Library/Logs/DiagnosticReports``
is generated: N kernel-panic reports (the tests' builder, synthetic ids, months
old) plus 3N crash reports of other kinds (``.ips`` with another ``bug_type``).
Then, in this one process, medians of:

- gate, unchanged folder, as a fresh process: the per-process caches emptied before
  each call (what the first admission of a new Python process pays);
- gate, unchanged folder, warm: the same call again in one process;
- gate after a change (the folder scanned again), as a fresh process;
- the scan alone: ``parse_panic_reports`` cold (caches emptied) and unchanged.

Run from the repository root:

    python bench/bench_post_panic.py [--reports N] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import (
    REPO,
    machine_info,
    md_table,
    median,
    print_machine,
    timed_runs,
    write_results,
)

sys.path[:0] = [str(REPO), str(REPO / "tests")]

import metal_guard as mg  # noqa: E402
from panic_fixtures import write_panic_series  # noqa: E402  (after the path set-up)


def _generate(folder: Path, count: int) -> None:
    write_panic_series(folder, count, time.time() - 120 * 86400)  # old: the gate lets work go
    crash = {"procName": "Safari", "exception": {"type": "EXC_CRASH"}, "threads": ["x" * 40] * 300}
    body = json.dumps(crash)
    for i in range(3 * count):
        header = json.dumps({"bug_type": "309", "timestamp": "2026-01-01 10:10:10.00 +0000"})
        (folder / f"Safari-2026-01-01-{i:06d}.ips").write_text(header + "\n" + body + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=200, help="kernel-panic reports (200)")
    parser.add_argument("--runs", type=int, default=15, help="runs per measurement (15)")
    args = parser.parse_args(argv)

    machine = machine_info()
    print_machine(machine)
    with tempfile.TemporaryDirectory(prefix="bench-post-panic-") as tmp:
        reports = Path(tmp) / "DiagnosticReports"
        reports.mkdir()
        home = Path(tmp) / "home"
        os.environ["METALGUARD_HOME"] = str(home)
        os.environ["METALGUARD_PANIC_REPORT_DIR"] = str(reports)
        _generate(reports, args.reports)
        files = sum(1 for f in reports.rglob("*") if f.is_file())
        state = home / "post_panic.json"

        assert mg._post_panic_refusal() is None  # the first check: scans, archives, saves

        def forget_scan() -> None:  # the folder "changed": the next check scans again
            mg._reset_panic_caches()
            data = json.loads(state.read_text())
            data.pop("scanned", None)
            state.write_text(json.dumps(data))

        rows = [
            (
                "gate_unchanged_fresh",
                "gate, folder unchanged, fresh process",
                timed_runs(mg._post_panic_refusal, args.runs, mg._reset_panic_caches),
            ),
            (
                "gate_unchanged_warm",
                "gate, folder unchanged, same process",
                timed_runs(mg._post_panic_refusal, args.runs),
            ),
            (
                "gate_rescan_fresh",
                "gate after a change (scan), fresh process",
                timed_runs(mg._post_panic_refusal, args.runs, forget_scan),
            ),
            (
                "scan_cold",
                "parse_panic_reports, cold",
                timed_runs(
                    lambda: mg.parse_panic_reports(reports), args.runs, mg._reset_panic_caches
                ),
            ),
            (
                "scan_unchanged",
                "parse_panic_reports, unchanged",
                timed_runs(lambda: mg.parse_panic_reports(reports), args.runs),
            ),
        ]
    medians = {key: median(samples) for key, _, samples in rows}
    print(
        f"\n{files} files in the report folder ({args.reports} kernel panics, "
        f"{3 * args.reports} other reports); {args.runs} runs each\n"
    )
    table = [[name, f"{median(s) * 1e3:.3f}", f"{min(s) * 1e3:.3f}"] for _, name, s in rows]
    print(md_table(["operation", "median ms", "min ms"], table))
    fresh = medians["gate_rescan_fresh"] / medians["gate_unchanged_fresh"]
    warm = medians["scan_unchanged"] / medians["gate_unchanged_warm"]
    print(
        f"\nfresh process: a scan costs {fresh:.0f}x the unchanged-folder check; "
        f"same process: the unchanged re-scan costs {warm:.0f}x the check"
    )
    path = write_results(
        "bench_post_panic",
        machine,
        {"panic_reports": args.reports, "files": files, "runs": args.runs},
        {
            "median_sec": medians,
            "min_sec": {key: min(samples) for key, _, samples in rows},
            "labels": {key: name for key, name, _ in rows},
            "rescan_over_unchanged_fresh": fresh,
            "scan_unchanged_over_gate_warm": warm,
            "metal_guard_version": mg.__version__,
            "notes": "fresh process = per-process caches emptied; OS page cache warm",
        },
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
