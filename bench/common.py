"""Shared helpers of the ``bench/bench_*.py`` scripts: machine description, statistics,
Markdown tables and the ``bench/results/<name>.json`` files.

Not a benchmark itself (``run_all.py`` runs ``bench_*.py`` only). Standard library only, and
nothing here imports MLX: versions come from package metadata.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"


def _cpu_model() -> str:
    """The CPU's marketing name: ``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    return platform.processor() or platform.machine() or "unknown"


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "mlx": _dist_version("mlx"),
        "mlx_cpu": _dist_version("mlx-cpu"),
        "mlx_metal": _dist_version("mlx-metal"),
        "mlx_lm": _dist_version("mlx-lm"),
    }


def print_machine(info: dict[str, Any]) -> None:
    mlx = info["mlx"] or "not installed"
    extra = " + ".join(
        f"{k.replace('_', '-')} {info[k]}" for k in ("mlx_cpu", "mlx_metal") if info[k]
    )
    print(f"machine: {info['platform']} ({info['machine']})")
    print(f"cpu:     {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable)")
    print(f"python:  {info['python']}")
    print(
        f"mlx:     {mlx}{' (' + extra + ')' if extra else ''}; mlx-lm {info['mlx_lm'] or 'not installed'}"
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def timed_runs(
    fn: Callable[[], object], runs: int, before: Callable[[], object] | None = None
) -> list[float]:
    """Seconds per call of ``fn()``, ``runs`` times; ``before()`` runs untimed ahead of each."""
    out = []
    clock = time.perf_counter
    for _ in range(runs):
        if before is not None:
            before()
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def timed_calls(fn: Callable[[], object], n: int, *, warmup: int = 1) -> list[float]:
    """Per-call latency in µs of ``fn()``, ``n`` times, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return [sec * 1e6 for sec in timed_runs(fn, n)]


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [bool(cells) and all(_is_number(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    sep = ["-" * (w - 1) + (":" if num else "-") for w, num in zip(widths, numeric, strict=True)]
    return "\n".join([line(list(headers)), line(sep), *(line(r) for r in cells)])


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("%x").lstrip("+"))
    except ValueError:
        return text in ("", "-", "n/a")
    return True


def write_results(name: str, machine: dict[str, Any], params: dict[str, Any], results: Any) -> Path:
    """Write ``bench/results/<name>.json``; returns its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {
        "benchmark": name,
        "when": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "params": params,
        "results": results,
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def child_env(**extra: str) -> dict[str, str]:
    """Environment for child interpreters: offline, temp files in the tree's TMPDIR."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env
