"""Memory layers: the cost of reading memory numbers and flushing, and how long the release
barrier waits.

Results: docs/benchmarks.md → "Memory layers".

Part A — ``MetalGuard.memory_stats()`` per call (µs), with the parts it is made of: the
footprint read alone (Linux ``/proc/self/status`` ``VmRSS``; macOS ``proc_pid_rusage``), the
bare MLX calls alone (``device_info``, ``get_active_memory``, ``get_peak_memory``,
``get_cache_memory``), and without MLX (``sys.modules["mlx.core"] = None``: the footprint only).

Part B — ``MetalGuard.flush_gpu()`` against the bare calls it makes
(``mx.synchronize()`` + ``mx.clear_cache()``), with breadcrumbs off and on (three
``O_APPEND`` + ``fsync`` lines per flush), after a small evaluated array each time so there
is something to synchronize and free. The variants run in blocks of 25 calls in rotating
order, so a shared machine's drift hits all of them alike.

Part C — the release barrier: allocate 200 MB / 1 GB of real MLX memory (``mx.ones``,
evaluated), drop it, and time ``wait_for_release(baseline)`` (synchronize, ``gc.collect``,
``clear_cache``, poll until active memory is back within 64 MiB). The original metal-guard
slept a fixed 8 s here. Also timed: the same after the memory is dropped by another thread
100 ms into the wait (the barrier polls; it does not sleep a guess).

    python bench/bench_memory.py [--n 2000] [--flush-n 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    REPO,
    machine_info,
    md_table,
    median,
    percentile,
    print_machine,
    timed_calls,
    write_results,
)

sys.path.insert(0, str(REPO))
import metal_guard as mg


def timed(fn: Callable[[], object], n: int) -> list[float]:
    """Per-call latency in µs of ``fn()`` over ``n`` calls (after 20 untimed calls)."""
    return timed_calls(fn, n, warmup=20)


def interleaved(
    variants: dict[str, Callable[[], Any]], n: int, block: int = 25
) -> dict[str, list[float]]:
    """Per-call µs of each variant, ``n`` calls each, run in blocks in rotating order.

    A shared machine drifts; interleaving blocks makes the drift hit every variant alike.
    """
    names = list(variants)
    out: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    for fn in variants.values():
        for _ in range(20):
            fn()
    for round_no in range((n + block - 1) // block):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            fn = variants[name]
            for _ in range(block):
                t0 = clock()
                fn()
                out[name].append((clock() - t0) * 1e6)
    return out


def summary(lat: list[float]) -> dict[str, float]:
    return {"p50_us": median(lat), "p99_us": percentile(lat, 99), "mean_us": sum(lat) / len(lat)}


def row(name: str, s: dict[str, float], ref: float | None = None) -> list[str]:
    ratio = f"{s['p50_us'] / ref:.2f}x" if ref else "-"
    return [name, f"{s['p50_us']:.1f}", f"{s['p99_us']:.1f}", f"{s['mean_us']:.1f}", ratio]


def part_a(n: int) -> dict[str, Any]:
    import mlx.core as mx

    guard = mg.MetalGuard(breadcrumb_path=None)

    def bare() -> None:
        mx.device_info()
        mx.get_active_memory()
        mx.get_peak_memory()
        mx.get_cache_memory()

    results = {
        "footprint read alone": summary(timed(mg._read_footprint_bytes, n)),
        "bare MLX calls (4)": summary(timed(bare, n)),
        "memory_stats()": summary(timed(guard.memory_stats, n)),
    }
    saved = sys.modules["mlx.core"]
    sys.modules["mlx.core"] = None  # type: ignore[assignment]
    try:
        results["memory_stats() without MLX"] = summary(timed(guard.memory_stats, n))
    finally:
        sys.modules["mlx.core"] = saved
    print(f"\n## A. memory_stats() per call, {n} calls each (µs; footprint from {sys.platform})")
    ref = results["bare MLX calls (4)"]["p50_us"]
    print(
        md_table(
            ["call", "p50 µs", "p99 µs", "mean µs", "p50 vs bare MLX"],
            [row(k, v, ref) for k, v in results.items()],
        )
    )
    return results


def part_b(n: int, tmp: Path) -> dict[str, Any]:
    import mlx.core as mx

    quiet = mg.MetalGuard(breadcrumb_path=None)
    noisy = mg.MetalGuard(breadcrumb_path=tmp / "flush-crumbs.log")

    def work() -> None:
        mx.eval(mx.ones((256, 256)) * 2)  # a little work to synchronize and free

    def bare() -> None:
        work()
        mx.synchronize()
        mx.clear_cache()

    def flush(guard: mg.MetalGuard) -> Callable[[], None]:
        def call() -> None:
            work()
            guard.flush_gpu()

        return call

    lat = interleaved(
        {
            "bare synchronize() + clear_cache(), no work": lambda: (
                mx.synchronize(),
                mx.clear_cache(),
            ),
            "flush_gpu(), breadcrumbs off, no work": quiet.flush_gpu,
            "work alone": work,
            "work + bare synchronize() + clear_cache()": bare,
            "work + flush_gpu(), breadcrumbs off": flush(quiet),
            "work + flush_gpu(), breadcrumbs on": flush(noisy),
        },
        n,
    )
    results = {name: summary(values) for name, values in lat.items()}
    work_p50 = results["work alone"]["p50_us"]
    for name, value in results.items():
        value["minus_work_p50_us"] = value["p50_us"] - (0.0 if "no work" in name else work_p50)
    print(f"\n## B. flush_gpu() vs the bare calls, {n} calls each, interleaved blocks (µs)")
    ref = results["work + bare synchronize() + clear_cache()"]["p50_us"]
    ref_alone = results["bare synchronize() + clear_cache(), no work"]["p50_us"]
    rows = [
        [*row(k, v, ref_alone if "no work" in k else ref), f"{v['minus_work_p50_us']:.1f}"]
        for k, v in results.items()
    ]
    print(md_table(["call", "p50 µs", "p99 µs", "mean µs", "p50 vs bare", "p50 − work µs"], rows))
    return results


def part_c(rounds: int) -> dict[str, Any]:
    import mlx.core as mx

    results: dict[str, Any] = {}
    for size in (200_000_000, 1_000_000_000):
        for mode in ("dropped before the wait", "dropped by another thread after 100 ms"):
            waits, drops, released = [], [], 0
            for _ in range(rounds):
                baseline = mx.get_active_memory()
                box = {"a": mx.ones((size // 4,), dtype=mx.float32)}
                mx.eval(box["a"])
                if mode.startswith("dropped before"):
                    t0 = time.perf_counter()
                    box.clear()
                    drops.append((time.perf_counter() - t0) * 1e3)
                    stats = mg.wait_for_release(baseline, timeout=8.0)
                else:
                    timer = threading.Timer(0.1, box.clear)
                    timer.start()
                    stats = mg.wait_for_release(baseline, timeout=8.0)
                    timer.join()
                waits.append(stats.waited_sec * 1e3)
                released += stats.released
            key = f"{size / 1e9:g} GB, {mode}"
            results[key] = {
                "bytes": size,
                "mode": mode,
                "rounds": rounds,
                "released": released,
                "wait_p50_ms": median(waits),
                "wait_max_ms": max(waits),
                "drop_p50_ms": median(drops) if drops else None,
            }
    print(f"\n## C. release barrier after dropping real MLX memory on CPU, {rounds} rounds each")
    rows = [
        [
            k,
            f"{v['released']}/{v['rounds']}",
            f"{v['wait_p50_ms']:.1f}",
            f"{v['wait_max_ms']:.1f}",
            "-" if v["drop_p50_ms"] is None else f"{v['drop_p50_ms']:.1f}",
            "8000",
        ]
        for k, v in results.items()
    ]
    print(
        md_table(
            ["case", "released", "wait p50 ms", "wait max ms", "del p50 ms", "original's sleep ms"],
            rows,
        )
    )
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="calls per memory_stats row (default 2000)")
    p.add_argument("--flush-n", type=int, default=2000, help="calls per flush row (default 2000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per release case (default 5)")
    args = p.parse_args()
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        print("bench_memory needs MLX (pip install -e '.[mlx]')", file=sys.stderr)
        return 1
    machine = machine_info()
    print_machine(machine)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["METALGUARD_HOME"] = str(tmp / "home")
        os.environ["METALGUARD_BREADCRUMB_PATH"] = ""  # the barrier's breadcrumbs: not measured
        stats = part_a(args.n)
        flush = part_b(args.flush_n, tmp)
        release = part_c(args.rounds)
    path = write_results(
        "bench_memory",
        machine,
        {"n": args.n, "flush_n": args.flush_n, "rounds": args.rounds},
        {"memory_stats": stats, "flush_gpu": flush, "release": release},
    )
    print(f"\nresults: {path}")
    failed = any(v["released"] != v["rounds"] for v in release.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
