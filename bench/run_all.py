"""Run every benchmark script ``bench/bench_*.py`` in name order.

Each script runs in its own interpreter (the same one running this file), from the
repository root, and writes its results JSON under ``bench/results/`` itself (most as
``<name>.json``; ``bench_panic.py`` as ``panic_scan.json``). Its printed report (the machine
and Markdown tables) is kept as ``bench/results/<name>.md``, and the latest report of every
script together as ``bench/results/SUMMARY.md`` (also after a filtered run). Exits
non-zero when any script fails.

    make bench            # or: .venv/bin/python bench/run_all.py [NAME_FILTER ...]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _run_and_echo(script: Path) -> tuple[int, list[str]]:
    """Run ``script``, echoing its output as it comes; return the exit code and the lines."""
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=HERE.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line.rstrip("\n"))
    return proc.wait(), lines


def _as_markdown(lines: list[str]) -> str:
    """Tables stay as they are; every other run of lines goes into a text block."""
    out: list[str] = []
    text: list[str] = []

    def flush_text() -> None:
        while text and not text[-1].strip():
            text.pop()
        if any(t.strip() for t in text):
            out.extend(["```text", *text, "```", ""])
        text.clear()

    for line in lines:
        if line.startswith("## "):  # a script's own section heading
            flush_text()
            out.extend([f"#{line}", ""])
        elif line.lstrip().startswith("|"):
            flush_text()
            out.append(line)
        else:
            if out and out[-1].lstrip().startswith("|"):
                out.append("")
            if text or line.strip():
                text.append(line)
    flush_text()
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    filters = sys.argv[1:] if argv is None else argv
    scripts = sorted(HERE.glob("bench_*.py"))
    if filters:
        scripts = [s for s in scripts if any(f in s.name for f in filters)]
    if not scripts:
        print("no benchmarks found (bench/bench_*.py)")
        return 0
    failed: list[str] = []
    reports: list[str] = []
    for script in scripts:
        print(f"=== {script.name}", flush=True)
        start = time.perf_counter()
        rc, output = _run_and_echo(script)
        print(f"=== {script.name}: exit {rc} in {time.perf_counter() - start:.1f} s", flush=True)
        if rc != 0:
            failed.append(script.name)
            continue
        report = f"## {script.stem}\n\n{_as_markdown(output)}"
        (RESULTS / f"{script.stem}.md").write_text(report)
        reports.append(report)
    if reports:  # every script's latest report, also those not run this time
        latest = [
            (RESULTS / f"{script.stem}.md").read_text()
            for script in sorted(HERE.glob("bench_*.py"))
            if (RESULTS / f"{script.stem}.md").exists()
        ]
        (RESULTS / "SUMMARY.md").write_text(
            "# Benchmark results\n\nWritten by `make bench` (bench/run_all.py): the latest "
            "report of each script.\n\n" + "\n".join(latest)
        )
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(scripts)} benchmarks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
