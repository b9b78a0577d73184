"""Overhead of ``subprocess_inference_guard``.

Results: docs/benchmarks.md → "Per-inference guard on CPU".

Part A — per-call cost with an empty body, in fresh child interpreters:

* without MLX (``sys.modules["mlx.core"] = None`` before ``import metal_guard``) and with
  MLX (``mlx.core`` and ``mlx_lm.generate`` imported, as in a real worker, so the guard also
  synchronizes mlx-lm's ``generation_stream``);
* breadcrumbs off (``METALGUARD_BREADCRUMB_PATH=""``) and on (one ``O_APPEND`` write +
  ``fsync`` per line, two lines per call);
* with MLX, the bare MLX calls the guard makes (``clear_cache``; ``synchronize()``,
  ``synchronize(generation_stream)``, ``clear_cache``) are timed alone, so
  guard − bare is the library's own work.

Part B — generation on a tiny random-weight llama (CPU on Linux, Metal on a Mac): blocks
of ``--calls`` ``mlx_lm.generate`` calls of ``--tokens`` tokens, interleaved round by round
in rotating order, for

* ``plain``     — ``mlx_lm.generate`` alone;
* ``bare``      — ``mx.clear_cache()`` before; ``mx.synchronize()`` + ``mx.clear_cache()``
  after (the original metal-guard's flush pattern: it does not wait for mlx-lm's generation stream);
* ``bare-gs``   — the same plus ``mx.synchronize(generation_stream)`` before the final
  ``clear_cache``: exactly the MLX calls the guard makes, written inline;
* ``guarded``   — inside ``subprocess_inference_guard`` (breadcrumbs on, the default);
* ``guarded-nb``— the same with breadcrumbs off.

So bare-gs/bare is the price of draining mlx-lm's stream (the race the guard closes),
guarded-nb/bare-gs is the library's own work, and guarded/guarded-nb the breadcrumbs'.

Each block's first call is not timed: it starts the variant's own steady state (allocator
cache, work left in flight by the previous variant); every other call is timed. Reported:
per variant the median and mean ms/call over all timed calls, and the ratios guarded/plain,
bare/plain, guarded/bare of medians and of means, each with a 95 % confidence interval
from bootstrap resamples of whole rounds (the same rounds for both sides, so slow drift of
the machine hits both alike). Many short blocks (default 40 rounds of 20 calls per variant,
760 timed calls each) resolve small differences better than a few long ones on a noisy
machine. Target: our own work within about 1 % (guarded-nb/bare-gs); the verdicts read
the CIs, and where a CI is wider than that, part A is the precise answer.

    python bench/bench_guard.py [--rounds 32] [--calls 20] [--tokens 8] [--empty-calls 20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Set before anything imports mlx_lm (huggingface_hub reads it at import): nothing may
# reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

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

PROMPT = "hello world"

# Child program for part A. argv: mode ("mlx" | "nomlx"), calls, rounds, breadcrumb path.
EMPTY_BODY_CHILD = r"""
import json, os, sys, time
mode, calls, rounds, crumbs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if mode == "nomlx":
    sys.modules["mlx"] = None
    sys.modules["mlx.core"] = None
else:
    import mlx.core as mx
    import mlx_lm.generate  # noqa: F401  (a real worker has it: the guard syncs its stream)
    gs = sys.modules["mlx_lm.generate"].generation_stream
sys.path.insert(0, REPO)
from metal_guard import subprocess_inference_guard as guard

def timed(fn, n):
    start = time.perf_counter()
    fn(n)
    return (time.perf_counter() - start) / n * 1e6

def empty_with(n):
    class Null:
        def __enter__(self): return self
        def __exit__(self, *a): return None
    for _ in range(n):
        with Null():
            pass

def guarded(n):
    for _ in range(n):
        with guard("bench/empty-body"):
            pass

def bare(n):
    for _ in range(n):
        mx.clear_cache()
        mx.synchronize()
        mx.synchronize(gs)
        mx.clear_cache()

variants = {"empty_with": (empty_with, calls), "guard_off": (guarded, calls),
            "guard_on": (guarded, max(200, calls // 20))}
if mode == "mlx":
    variants["bare_mlx"] = (bare, calls)
out = {name: [] for name in variants}
for r in range(rounds + 1):  # round 0 warms up
    for name, (fn, n) in variants.items():
        os.environ["METALGUARD_BREADCRUMB_PATH"] = crumbs if name == "guard_on" else ""
        us = timed(fn, n)
        if r:
            out[name].append(us)
print(json.dumps({"calls": {k: v[1] for k, v in variants.items()}, "us": out}))
"""


def run_empty_body(mode: str, calls: int, rounds: int, crumbs: str) -> dict[str, Any]:
    code = f"REPO = {str(REPO)!r}\n" + EMPTY_BODY_CHILD
    proc = subprocess.run(
        [sys.executable, "-c", code, mode, str(calls), str(rounds), crumbs],
        capture_output=True,
        text=True,
        env=child_env(),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"empty-body child ({mode}) failed: {proc.stderr.strip()}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def part_a(args: argparse.Namespace, tmp: Path, has_mlx: bool) -> dict[str, Any]:
    print(
        f"\n## A. empty body: µs per call (median of {args.empty_rounds} rounds, fresh child per mode)"
    )
    modes = ["nomlx", "mlx"] if has_mlx else ["nomlx"]
    out: dict[str, Any] = {}
    rows = []
    for mode in modes:
        res = run_empty_body(
            mode, args.empty_calls, args.empty_rounds, str(tmp / f"crumbs-{mode}.log")
        )
        us = {k: median(v) for k, v in res["us"].items()}
        out[mode] = {"median_us": us, "calls_per_round": res["calls"], "rounds_us": res["us"]}
        bare = us.get("bare_mlx")
        label = "with MLX (+ mlx_lm.generate)" if mode == "mlx" else "without MLX"
        for crumbs, key in (("off", "guard_off"), ("on", "guard_on")):
            own = us[key] - bare if bare is not None else us[key]
            rows.append(
                [
                    label,
                    crumbs,
                    f"{us[key]:.2f}",
                    "-" if bare is None else f"{bare:.2f}",
                    f"{own:.2f}",
                ]
            )
        out[mode]["empty_with_us"] = us["empty_with"]
    print(
        md_table(
            [
                "guard around an empty body",
                "breadcrumbs",
                "guard µs",
                "bare MLX calls µs",
                "library's own µs",
            ],
            rows,
        )
    )
    print(
        f"(an empty `with` of a trivial context manager costs {out['nomlx']['empty_with_us']:.2f} µs; "
        "breadcrumbs on = 2 lines per call, each an O_APPEND write + fsync)"
    )
    return out


# -- part B ---------------------------------------------------------------------------


def part_b(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    sys.path[:0] = [str(REPO / "tests"), str(REPO)]
    os.environ["METALGUARD_HOME"] = str(tmp / "home")
    import mlx.core as mx
    import mlx_lm

    from metal_guard import subprocess_inference_guard
    from tiny_models import build_tiny_model

    path = build_tiny_model(tmp / "tiny-llama", "llama", seed=0)
    model, tokenizer = mlx_lm.load(path)[:2]
    tokens = args.tokens

    def plain() -> None:
        mlx_lm.generate(model, tokenizer, prompt=PROMPT, max_tokens=tokens)

    def bare() -> None:
        mx.clear_cache()
        try:
            mlx_lm.generate(model, tokenizer, prompt=PROMPT, max_tokens=tokens)
        finally:
            mx.synchronize()
            mx.clear_cache()

    generation_stream = sys.modules["mlx_lm.generate"].generation_stream

    def bare_gs() -> None:  # exactly the MLX calls the guard makes, inline
        mx.clear_cache()
        try:
            mlx_lm.generate(model, tokenizer, prompt=PROMPT, max_tokens=tokens)
        finally:
            mx.synchronize()
            mx.synchronize(generation_stream)
            mx.clear_cache()

    def guarded() -> None:
        with subprocess_inference_guard(path):
            mlx_lm.generate(model, tokenizer, prompt=PROMPT, max_tokens=tokens)

    crumbs = str(tmp / "home" / "breadcrumbs.log")
    variants: dict[str, tuple[Callable[[], None], str]] = {
        "plain": (plain, crumbs),
        "bare": (bare, crumbs),
        "bare-gs": (bare_gs, crumbs),
        "guarded": (guarded, crumbs),
        "guarded-nb": (guarded, ""),
    }
    names = list(variants)
    print(
        f"\n## B. tiny llama on {mx.default_device()}: {args.rounds} rounds × {len(names)} variants × "
        f"blocks of {args.calls} calls of {tokens} tokens (first call of each block untimed)"
    )
    for fn, crumb in variants.values():  # warm-up: compile kernels, settle the allocator
        os.environ["METALGUARD_BREADCRUMB_PATH"] = crumb
        for _ in range(10):
            fn()
    # blocks[name][round] = per-call ms of the timed calls of that round's block
    blocks: dict[str, list[list[float]]] = {name: [] for name in names}
    clock = time.perf_counter
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, crumb = variants[name]
            os.environ["METALGUARD_BREADCRUMB_PATH"] = crumb
            gc.collect()
            fn()  # untimed: starts this variant's own steady state (allocator cache, queues)
            times = []
            for _ in range(args.calls - 1):
                t0 = clock()
                fn()
                times.append((clock() - t0) * 1000)
            blocks[name].append(times)
        if (r + 1) % max(1, args.rounds // 4) == 0:
            done = ", ".join(f"{n} {median(_pool(blocks[n])):.3f}" for n in names)
            print(f"  after round {r + 1}/{args.rounds}: median ms/call {done}")

    median_ms = {n: median(_pool(blocks[n])) for n in names}
    mean_ms = {n: statistics.fmean(_pool(blocks[n])) for n in names}
    rows = [
        [
            n,
            f"{median_ms[n]:.3f}",
            f"{mean_ms[n]:.3f}",
            f"{percentile(_pool(blocks[n]), 10):.3f}",
            f"{percentile(_pool(blocks[n]), 90):.3f}",
            len(_pool(blocks[n])),
        ]
        for n in names
    ]
    print()
    print(md_table(["variant", "median ms/call", "mean", "p10", "p90", "calls timed"], rows))

    rng = random.Random(12345)
    pairs = [
        ("guarded", "plain"),
        ("bare", "plain"),
        ("guarded", "bare"),
        ("bare-gs", "bare"),
        ("guarded-nb", "bare-gs"),
        ("guarded", "bare-gs"),
        ("guarded", "guarded-nb"),
    ]
    ratios: dict[str, dict[str, Any]] = {}
    table = []
    for a, b in pairs:
        med = _ratio(blocks[a], blocks[b], median, rng, args.bootstrap)
        mean = _ratio(blocks[a], blocks[b], statistics.fmean, rng, args.bootstrap)
        ratios[f"{a}/{b}"] = {
            "of_medians": med[0],
            "of_medians_ci95": [med[1], med[2]],
            "of_means": mean[0],
            "of_means_ci95": [mean[1], mean[2]],
        }
        table.append(
            [
                f"{a}/{b}",
                f"{med[0]:.4f}",
                f"{med[1]:.3f}-{med[2]:.3f}",
                f"{mean[0]:.4f}",
                f"{mean[1]:.3f}-{mean[2]:.3f}",
            ]
        )
    print()
    print(
        md_table(
            ["ratio", "of medians", "95 % CI", "of means", "95 % CI"],
            table,
        )
    )
    for key, what in (
        ("guarded/bare", "guard vs the bare flush pattern"),
        ("guarded-nb/bare-gs", "library's own work (same MLX calls, breadcrumbs off)"),
        ("guarded/bare-gs", "library's own work incl. breadcrumbs"),
    ):
        q = ratios[key]
        verdicts = []
        for stat in ("medians", "means"):
            lo, hi = float(q[f"of_{stat}_ci95"][0]), float(q[f"of_{stat}_ci95"][1])
            verdicts.append(f"{stat} {q[f'of_{stat}']:.3f} [{lo:.3f}-{hi:.3f}] {_verdict(lo, hi)}")
        print(f"- {key}, {what}:\n    " + "\n    ".join(verdicts))
    print(
        f"(95 % CIs: {args.bootstrap} bootstrap resamples of whole rounds, the same rounds for both sides)"
    )
    return {
        "device": str(mx.default_device()),
        "calls_per_block": args.calls,
        "timed_calls_per_block": args.calls - 1,
        "tokens": tokens,
        "rounds": args.rounds,
        "ms_per_call_median": median_ms,
        "ms_per_call_mean": mean_ms,
        "ratios": ratios,
        "blocks_ms": blocks,
    }


def _verdict(lo: float, hi: float, tolerance: float = 0.01) -> str:
    """What a ratio's 95 % CI says about a ``tolerance`` target."""
    if 1 - tolerance <= lo and hi <= 1 + tolerance:
        return f"within {tolerance:.0%}"
    if lo > 1 + tolerance:
        return f"MORE than {tolerance:.0%} slower"
    if hi < 1 - tolerance:
        return f"more than {tolerance:.0%} faster"
    return f"not resolved to {tolerance:.0%} here (CI too wide; see part A)"


def _pool(rounds: list[list[float]]) -> list[float]:
    return [t for block in rounds for t in block]


def _ratio(
    a: list[list[float]],
    b: list[list[float]],
    stat: Callable[[list[float]], float],
    rng: random.Random,
    resamples: int,
) -> tuple[float, float, float]:
    """``stat(a) / stat(b)`` over pooled calls, with a 95 % bootstrap CI over rounds."""
    point = stat(_pool(a)) / stat(_pool(b))
    n = len(a)
    boots = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(stat(_pool([a[i] for i in idx])) / stat(_pool([b[i] for i in idx])))
    return point, percentile(boots, 2.5), percentile(boots, 97.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--empty-calls", type=int, default=20000, help="calls per round in part A")
    p.add_argument("--empty-rounds", type=int, default=7, help="rounds in part A")
    p.add_argument("--rounds", type=int, default=32, help="rounds in part B")
    p.add_argument(
        "--calls", type=int, default=20, help="generate calls per block in part B (first untimed)"
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--tokens", type=int, default=8, help="max_tokens per generate call in part B")
    p.add_argument("--skip-generate", action="store_true", help="part A only")
    args = p.parse_args()

    machine = machine_info()
    print_machine(machine)
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401

        has_mlx = True
    except ImportError:
        has_mlx = False
        print("MLX / mlx-lm not installed: only part A without MLX runs")

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-guard-") as tmp_name:
        tmp = Path(tmp_name)
        results["empty_body"] = part_a(args, tmp, has_mlx)
        if has_mlx and not args.skip_generate:
            results["generate"] = part_b(args, tmp)
    path = write_results("bench_guard", machine, vars(args), results)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
