"""Benchmark: scanning 1,000 kernel-panic reports, cold and unchanged.

Results: docs/benchmarks.md → "Panic-report scan".

Generates 1,000 realistic two-document reports (the tests' builder, synthetic ids)
in a temp folder: 900 in the folder, 100 in ``Retired/``, a mix of every signature.
Then, in this one process:

- cold scan: ``parse_panic_reports`` with the process cache emptied (every file is
  read and parsed; the OS page cache is warm, so this measures our own work);
- unchanged re-scan: the same call again (one ``stat`` per file, nothing read);
- archive: the first ``ingest_panics_jsonl`` of all 1,000 records, and a repeated one;
- ``CircuitBreaker.check()`` in the steady state (nothing new since the last call).

Medians of several runs, printed as a table with the machine, and written to
``bench/results/panic_scan.json``. Run from the repository root:

    python bench/bench_panic.py [--reports N] [--runs N]
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=1000, help="reports to generate (1000)")
    parser.add_argument("--runs", type=int, default=7, help="cold runs; re-scans get 3x (7)")
    args = parser.parse_args(argv)

    machine = machine_info()
    print_machine(machine)
    with tempfile.TemporaryDirectory(prefix="bench-panic-") as tmp:
        reports = Path(tmp) / "DiagnosticReports"
        home = Path(tmp) / "home"
        os.environ["METALGUARD_HOME"] = str(home)
        t0 = time.perf_counter()
        write_panic_series(reports, args.reports, time.time() - 170 * 86400)  # the 180-day horizon
        generate_sec = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in reports.rglob("*") if f.is_file())

        found = mg.parse_panic_reports(reports)
        assert len(found) == args.reports, len(found)
        cold = timed_runs(
            lambda: mg.parse_panic_reports(reports), args.runs, mg._reset_panic_caches
        )
        rescan = timed_runs(lambda: mg.parse_panic_reports(reports), args.runs * 3)

        archive = home / "panics.jsonl"

        def fresh_archive() -> None:
            mg._reset_panic_caches()
            mg.parse_panic_reports(reports)  # parsing is timed above; this times archiving
            if archive.exists():
                archive.unlink()

        ingest_first = timed_runs(
            lambda: mg.ingest_panics_jsonl(report_dir=reports), args.runs, fresh_archive
        )
        ingest_again = timed_runs(lambda: mg.ingest_panics_jsonl(report_dir=reports), args.runs * 3)
        breaker = mg.CircuitBreaker(report_dir=reports)
        try:
            breaker.check()
        except mg.MLXCooldownActive:
            pass
        check_steady = timed_runs(breaker.check, args.runs * 3)

    rows = [
        ("cold_scan", "cold scan (parse every file)", cold),
        ("rescan", "unchanged re-scan", rescan),
        ("ingest_first", f"first ingest (archive {args.reports:,})", ingest_first),
        ("ingest_again", "repeated ingest (nothing new)", ingest_again),
        ("check_steady", "CircuitBreaker.check (steady)", check_steady),
    ]
    medians = {key: median(samples) for key, _, samples in rows}
    ratio = medians["cold_scan"] / medians["rescan"]
    print(
        f"\n{args.reports} reports ({size / 1e6:.1f} MB, generated in {generate_sec:.1f} s); "
        f"{args.runs} cold runs, {args.runs * 3} re-scan/steady runs\n"
    )
    table = [
        [
            name,
            f"{median(samples) * 1e3:.2f}",
            f"{min(samples) * 1e3:.2f}",
            f"{median(samples) / args.reports * 1e6:.1f}",
        ]
        for _, name, samples in rows
    ]
    print(md_table(["operation", "median ms", "min ms", "per report µs"], table))
    print(f"\ncold / unchanged re-scan: {ratio:.1f}x")
    path = write_results(
        "panic_scan",
        machine,
        {"reports": args.reports, "report_bytes": size, "runs": args.runs},
        {
            "median_sec": medians,
            "min_sec": {key: min(samples) for key, _, samples in rows},
            "samples_sec": {key: samples for key, _, samples in rows},
            "labels": {key: name for key, name, _ in rows},
            "cold_over_rescan": ratio,
            "metal_guard_version": mg.__version__,
            "notes": "cold = process cache emptied, OS page cache warm; re-scan = files unchanged",
        },
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
