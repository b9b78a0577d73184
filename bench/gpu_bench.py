#!/usr/bin/env python3
"""GPU benchmark for ``subprocess_inference_guard`` on a real MLX device.

What it measures (docs/benchmarks.md → "Per-inference guard on a GPU"; CHANGELOG
"Stream-aware synchronize"):

1. Overhead of the per-inference guard around mlx-lm generation. Random-weight llama
   models (about 1B and 7.5B parameters, bf16, built in memory, nothing downloaded) run a
   tokenizer-free generation loop (``mlx_lm.generate.generate_step`` on random token-id
   prompts). Three variants are interleaved round by round, in rotating order:

   * ``plain``      -- the generation loop alone;
   * ``bare_flush`` -- ``mx.clear_cache()`` before, ``mx.synchronize()`` and
     ``mx.clear_cache()`` after (the pattern the original metal-guard uses);
   * ``guarded``    -- the loop inside ``metal_guard.subprocess_inference_guard``.

   Each variant runs as a block of ``--block`` consecutive calls and only the calls after
   the first of a block are timed, so every timed call starts from that variant's own steady
   state (allocator cache, work left in flight by the previous call of the same variant).
   Between blocks every stream is drained, untimed, so one variant's leftovers never land
   in another variant's timing.

2. Stream drain: work queued on mlx-lm's ``generation_stream`` is still running when a bare
   ``mx.synchronize()`` returns, while the guard's POST step waits for it.

Results go to ``<out>/gpu-<device-slug>.json`` and ``.md``; a Markdown table is printed.

Usage::

    python bench/gpu_bench.py                      # full run: 1b,7.5b x 128,2048
    python bench/gpu_bench.py --quick              # tiny models, CPU-friendly smoke run
    python bench/gpu_bench.py --sizes 1b --prompts 128 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import hashlib
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten

# --------------------------------------------------------------------------------------
# model shapes (llama family; vocab 128256 and tied embeddings for both real sizes)
# --------------------------------------------------------------------------------------

SIZES: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B shape: 1,235,814,400 parameters.
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
    # Llama-3-8B shape with tied embeddings: 7,504,924,672 parameters.
    "7.5b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
    # Small shapes for local CPU runs.
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 4,
        "intermediate_size": 1408,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 8192,
    },
}

# mlx.nn ships no type information; models are plain objects to the type checker.
LlamaModel = Any

VARIANTS: tuple[str, ...] = ("plain", "bare_flush", "guarded")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "unknown"


def summarize(values_ms: list[float]) -> dict[str, float | int]:
    """Median, p10, p90, mean, min, max of a series (milliseconds)."""
    n = len(values_ms)
    if n == 0:
        return {"n": 0}
    if n >= 2:
        deciles = statistics.quantiles(values_ms, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[8]
    else:
        p10 = p90 = values_ms[0]
    return {
        "n": n,
        "median": statistics.median(values_ms),
        "p10": p10,
        "p90": p90,
        "mean": statistics.fmean(values_ms),
        "min": min(values_ms),
        "max": max(values_ms),
    }


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def command_output(args: list[str], timeout: float) -> str | None:
    """Stripped stdout of a command, or None when it cannot run or prints nothing."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def nvidia_smi() -> str | None:
    return command_output(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv"], timeout=30
    )


def git_commit() -> str | None:
    return os.environ.get("BENCH_GIT_COMMIT") or command_output(
        ["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], timeout=10
    )


def file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def pkg_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_guard(guard_dir: str) -> Any:
    """Import ``metal_guard`` from ``guard_dir`` (the repository root by default)."""
    sys.path.insert(0, guard_dir)
    try:
        module = importlib.import_module("metal_guard")
    finally:
        sys.path.remove(guard_dir)
    if not hasattr(module, "subprocess_inference_guard"):
        raise SystemExit(f"{module.__file__} has no subprocess_inference_guard")
    return module


# --------------------------------------------------------------------------------------
# model and generation
# --------------------------------------------------------------------------------------


def build_model(size: str, seed: int) -> tuple[LlamaModel, int, dict[str, Any]]:
    from mlx_lm.models.llama import Model, ModelArgs

    shape = dict(SIZES[size])
    config: dict[str, Any] = {
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        **shape,
    }
    mx.random.seed(seed)
    model = Model(ModelArgs(**config))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    flat = cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))
    n_params = sum(int(v.size) for _, v in flat)
    return model, n_params, config


def generate_once(
    generate_step: Callable[..., Iterator[tuple[Any, Any]]],
    model: LlamaModel,
    prompt: mx.array,
    gen_tokens: int,
) -> int:
    count = 0
    for _token, _logprobs in generate_step(prompt, model, max_tokens=gen_tokens):
        count += 1
    return count


# --------------------------------------------------------------------------------------
# benchmark 1: guard overhead around generation
# --------------------------------------------------------------------------------------


def bench_generation(
    *,
    model: LlamaModel,
    model_label: str,
    vocab: int,
    prompt_len: int,
    gen_tokens: int,
    rounds: int,
    min_rounds: int,
    block: int,
    warmup: int,
    budget_s: float,
    guard_mod: Any,
    gen_stream: Any,
    generate_step: Callable[..., Iterator[tuple[Any, Any]]],
    seed: int,
) -> dict[str, Any]:
    guard = guard_mod.subprocess_inference_guard
    mx.random.seed(seed + prompt_len)
    prompt = mx.random.randint(0, vocab, (prompt_len,), dtype=mx.int32)
    mx.eval(prompt)

    def drain() -> None:
        mx.synchronize()
        mx.synchronize(gen_stream)

    def run_plain() -> int:
        return generate_once(generate_step, model, prompt, gen_tokens)

    def run_bare() -> int:
        mx.clear_cache()
        n = generate_once(generate_step, model, prompt, gen_tokens)
        mx.synchronize()
        mx.clear_cache()
        return n

    def run_guarded() -> int:
        with guard(model_label):
            n = generate_once(generate_step, model, prompt, gen_tokens)
        return n

    runners: dict[str, Callable[[], int]] = {
        "plain": run_plain,
        "bare_flush": run_bare,
        "guarded": run_guarded,
    }

    t_start = time.monotonic()
    # warm-up: every variant, untimed (kernel compilation, allocator growth)
    for _ in range(warmup):
        for name in VARIANTS:
            got = runners[name]()
            if got != gen_tokens:
                raise RuntimeError(f"{name}: generated {got} tokens, wanted {gen_tokens}")
    drain()
    warm_s = time.monotonic() - t_start

    series: dict[str, list[float]] = {name: [] for name in VARIANTS}
    orders: list[list[str]] = []
    t_rounds = time.monotonic()
    done = 0
    for r in range(rounds):
        if done >= min_rounds and time.monotonic() - t_start > budget_s:
            log(f"    budget reached after {done} rounds")
            break
        k = r % len(VARIANTS)
        order = list(VARIANTS[k:] + VARIANTS[:k])
        if (r // len(VARIANTS)) % 2 == 1:
            order.reverse()
        orders.append(order)
        for name in order:
            fn = runners[name]
            for i in range(block):
                t0 = time.perf_counter_ns()
                fn()
                t1 = time.perf_counter_ns()
                if i > 0 or block == 1:
                    series[name].append((t1 - t0) / 1e6)
            drain()
        done += 1
    rounds_s = time.monotonic() - t_rounds

    result: dict[str, Any] = {
        "model": model_label,
        "prompt_tokens": prompt_len,
        "generated_tokens": gen_tokens,
        "rounds": done,
        "block": block,
        "warmup_rounds": warmup,
        "warmup_s": warm_s,
        "rounds_s": rounds_s,
        "orders": orders,
        "series_ms": series,
    }
    score_generation(result)
    return result


def score_generation(row: dict[str, Any]) -> None:
    """(Re)compute a generation row's summaries from its raw ``series_ms``.

    ``ratios`` divide the variants' medians. ``paired_ratios`` divide, round by round,
    the calls of one round (they ran back to back, so they share the machine's state of
    the moment) and summarize those per-round ratios: on a machine whose call times
    wander between modes this is the steadier estimate of the guard's cost.
    """
    series: dict[str, list[float]] = row["series_ms"]
    summary = {name: summarize(series[name]) for name in VARIANTS}
    med = {name: float(summary[name].get("median", math.nan)) for name in VARIANTS}
    pairs = {
        "guarded_over_plain": ("guarded", "plain"),
        "guarded_over_bare_flush": ("guarded", "bare_flush"),
        "bare_flush_over_plain": ("bare_flush", "plain"),
    }
    row["summary_ms"] = summary
    row["ratios"] = {key: med[a] / med[b] for key, (a, b) in pairs.items()}
    row["paired_ratios"] = {
        key: summarize([x / y for x, y in zip(series[a], series[b], strict=True)])
        for key, (a, b) in pairs.items()
    }
    row["decode_tokens_per_s_plain_median"] = row["generated_tokens"] / (med["plain"] / 1e3)


# --------------------------------------------------------------------------------------
# benchmark 2: does the sync reach mlx-lm's generation stream?
# --------------------------------------------------------------------------------------


def bench_drain(
    *,
    guard_mod: Any,
    gen_stream: Any,
    matrix: int,
    target_ms: float,
    reps: int,
) -> dict[str, Any]:
    guard = guard_mod.subprocess_inference_guard
    mx.random.seed(1234)
    a = (mx.random.normal((matrix, matrix)) / math.sqrt(matrix)).astype(mx.bfloat16)
    mx.eval(a)
    mx.synchronize()

    def queue(chain: int) -> mx.array:
        """Queue ``chain`` dependent matmuls on generation_stream; return at once."""
        with mx.stream(gen_stream):
            x = a
            for _ in range(chain):
                x = x @ a
            mx.async_eval(x)  # type: ignore[no-untyped-call]
        return x

    def work_ms(chain: int) -> float:
        """Queue and wait on generation_stream: the time the queued work takes."""
        mx.synchronize()
        mx.synchronize(gen_stream)
        t0 = time.perf_counter_ns()
        x = queue(chain)
        mx.synchronize(gen_stream)
        t1 = time.perf_counter_ns()
        del x
        return (t1 - t0) / 1e6

    # calibrate the chain length so the queued work takes about target_ms
    work_ms(4)  # warm-up (kernel compilation)
    chain = 4
    for _ in range(8):
        ms = work_ms(chain)
        if ms >= target_ms * 0.7:
            break
        grow = max(2.0, min(16.0, target_ms / max(ms, 0.05)))
        chain = min(4096, int(chain * grow) + 1)
    calib_ms = work_ms(chain)

    # idle baselines: guard exit and bare sync with nothing queued
    idle_exit: list[float] = []
    idle_sync: list[float] = []
    for _ in range(reps):
        mx.synchronize()
        mx.synchronize(gen_stream)
        t0 = time.perf_counter_ns()
        mx.synchronize()
        idle_sync.append((time.perf_counter_ns() - t0) / 1e6)
        with guard("drain-idle"):
            t0 = time.perf_counter_ns()
        idle_exit.append((time.perf_counter_ns() - t0) / 1e6)

    work: list[float] = []
    bare_rows: list[dict[str, float]] = []
    guard_rows: list[dict[str, float]] = []

    def do_bare() -> None:
        mx.synchronize()
        mx.synchronize(gen_stream)
        t0 = time.perf_counter_ns()
        x = queue(chain)
        t1 = time.perf_counter_ns()
        mx.synchronize()  # bare: default stream only
        t2 = time.perf_counter_ns()
        mx.synchronize(gen_stream)  # still waits if the work was not finished
        t3 = time.perf_counter_ns()
        del x
        bare_rows.append(
            {
                "queue_ms": (t1 - t0) / 1e6,
                "bare_sync_ms": (t2 - t1) / 1e6,
                "stream_sync_after_ms": (t3 - t2) / 1e6,
            }
        )

    def do_guard() -> None:
        mx.synchronize()
        mx.synchronize(gen_stream)
        with guard("drain-demo"):
            t0 = time.perf_counter_ns()
            x = queue(chain)
            t1 = time.perf_counter_ns()
        t2 = time.perf_counter_ns()  # guard POST done
        mx.synchronize(gen_stream)
        t3 = time.perf_counter_ns()
        del x
        guard_rows.append(
            {
                "queue_ms": (t1 - t0) / 1e6,
                "guard_exit_ms": (t2 - t1) / 1e6,
                "stream_sync_after_ms": (t3 - t2) / 1e6,
            }
        )

    for r in range(reps):
        work.append(work_ms(chain))
        if r % 2 == 0:
            do_bare()
            do_guard()
        else:
            do_guard()
            do_bare()

    def col(rows: list[dict[str, float]], key: str) -> list[float]:
        return [row[key] for row in rows]

    summary = {
        "queued_work_ms": summarize(work),
        "bare_sync_ms": summarize(col(bare_rows, "bare_sync_ms")),
        "bare_then_stream_sync_ms": summarize(col(bare_rows, "stream_sync_after_ms")),
        "guard_exit_ms": summarize(col(guard_rows, "guard_exit_ms")),
        "guard_then_stream_sync_ms": summarize(col(guard_rows, "stream_sync_after_ms")),
        "idle_bare_sync_ms": summarize(idle_sync),
        "idle_guard_exit_ms": summarize(idle_exit),
    }
    med_work = float(summary["queued_work_ms"]["median"])
    med_exit = float(summary["guard_exit_ms"]["median"])
    med_bare = float(summary["bare_sync_ms"]["median"])
    med_after = float(summary["bare_then_stream_sync_ms"]["median"])
    verdict = {
        "guard_exit_over_work": med_exit / med_work,
        "bare_sync_over_work": med_bare / med_work,
        "bare_left_work_in_flight": med_after > 0.5 * med_work,
        "guard_drained": float(summary["guard_then_stream_sync_ms"]["median"]) < 0.1 * med_work,
    }
    return {
        "matrix": matrix,
        "dtype": "bfloat16",
        "chain": chain,
        "calibration_ms": calib_ms,
        "reps": reps,
        "queued_work_ms": work,
        "bare": bare_rows,
        "guarded": guard_rows,
        "idle_bare_sync_ms": idle_sync,
        "idle_guard_exit_ms": idle_exit,
        "summary_ms": summary,
        "verdict": verdict,
    }


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------


def fmt_ms(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "-"
    return f"{s['median']:.1f} ({s['p10']:.1f}-{s['p90']:.1f})"


def device_line(dev: dict[str, Any]) -> str:
    smi = dev.get("nvidia_smi")
    rows = [r.strip() for r in str(smi).splitlines()[1:] if r.strip()] if smi else []
    if rows:
        return "nvidia-smi: " + "; ".join(rows)
    return str(dev.get("device_name"))


def markdown(report: dict[str, Any]) -> str:
    dev = report["device"]
    lines = [
        f"# GPU benchmark: subprocess_inference_guard on {dev['device_name']}",
        "",
        f"mlx {report['versions']['mlx']}, mlx-lm {report['versions']['mlx_lm']}, "
        f"Python {report['versions']['python'].split()[0]}, {report['timestamp']}. "
        "Random-weight llama models in bf16, greedy `generate_step`, "
        f"{report['config']['gen_tokens']} generated tokens per call. "
        "Times in ms per generate call: median (p10-p90). Ratios: quotient of the "
        "medians, and in brackets the median of the per-round ratios (the variants of "
        "one round ran back to back).",
        "",
        f"Device: {device_line(dev)}.",
        "",
        "| model | params | prompt | n | plain | bare flush | guarded "
        "| guarded/plain | guarded/bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["generation"]:
        s = row["summary_ms"]
        ratios = row["ratios"]
        paired = row["paired_ratios"]
        params = report["models"][row["model"]]["parameters"]
        lines.append(
            f"| {row['model']} | {params:,} | {row['prompt_tokens']} "
            f"| {s['plain']['n']} | {fmt_ms(s['plain'])} | {fmt_ms(s['bare_flush'])} "
            f"| {fmt_ms(s['guarded'])} "
            f"| {ratios['guarded_over_plain']:.3f} "
            f"({paired['guarded_over_plain']['median']:.3f}) "
            f"| {ratios['guarded_over_bare_flush']:.3f} "
            f"({paired['guarded_over_bare_flush']['median']:.3f}) |"
        )
    drain = report.get("drain")
    if drain:
        s = drain["summary_ms"]
        lines += [
            "",
            f"Stream drain: a chain of {drain['chain']} bf16 {drain['matrix']}x"
            f"{drain['matrix']} matmuls queued on mlx-lm's `generation_stream` "
            f"(`mx.async_eval`), {drain['reps']} repetitions, median (p10-p90) ms.",
            "",
            "| measurement | ms |",
            "|---|---:|",
            f"| queued work, waited on with `mx.synchronize(generation_stream)` "
            f"| {fmt_ms(s['queued_work_ms'])} |",
            f"| bare `mx.synchronize()` returns after | {fmt_ms(s['bare_sync_ms'])} |",
            f"| ...then `mx.synchronize(generation_stream)` still waits "
            f"| {fmt_ms(s['bare_then_stream_sync_ms'])} |",
            f"| guard exit (POST) with the work queued in its body "
            f"| {fmt_ms(s['guard_exit_ms'])} |",
            f"| ...then `mx.synchronize(generation_stream)` waits "
            f"| {fmt_ms(s['guard_then_stream_sync_ms'])} |",
            f"| idle bare `mx.synchronize()` | {fmt_ms(s['idle_bare_sync_ms'])} |",
            f"| idle guard exit | {fmt_ms(s['idle_guard_exit_ms'])} |",
        ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str, slug: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"gpu-{slug}.json")
    md_path = os.path.join(out_dir, f"gpu-{slug}.md")
    tmp = json_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(to_jsonable(report), f, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, json_path)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown(report))
    return json_path, md_path


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default="1b,7.5b", help=f"comma list of {sorted(SIZES)}")
    p.add_argument("--prompts", default="128,2048", help="prompt lengths, comma list")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds per config")
    p.add_argument("--min-rounds", type=int, default=4)
    p.add_argument("--block", type=int, default=2, help="calls per variant per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds")
    p.add_argument("--budget-s", type=float, default=300.0, help="soft total time budget")
    p.add_argument("--drain-matrix", type=int, default=8192)
    p.add_argument("--drain-target-ms", type=float, default=100.0)
    p.add_argument("--drain-reps", type=int, default=7)
    p.add_argument("--no-drain", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--guard-dir", default=REPO_ROOT, help="folder holding metal_guard.py (repo root)"
    )
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or os.path.join(REPO_ROOT, "bench", "results"),
        help="output folder (default $OUT, else bench/results)",
    )
    p.add_argument("--slug", default=None, help="device slug for file names")
    p.add_argument(
        "--rescore",
        metavar="JSON",
        default=None,
        help="measure nothing: recompute summaries of a result file from its raw series "
        "and write JSON and Markdown to --out",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny models, short prompts, few rounds (local smoke test)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = "tiny,small"
        args.prompts = "16,128"
        args.gen_tokens = 8
        args.rounds = 4
        args.min_rounds = 2
        args.drain_matrix = 512
        args.drain_target_ms = 30.0
        args.drain_reps = 3
    return args


def rescore(path: str, out_dir: str, slug: str | None) -> int:
    with open(path, encoding="utf-8") as f:
        report: dict[str, Any] = json.load(f)
    for row in report["generation"]:
        score_generation(row)
    name = os.path.basename(path)
    if slug is None:
        slug = name[4:-5] if name.startswith("gpu-") and name.endswith(".json") else "unknown"
    report["files"] = [f"gpu-{slug}.json", f"gpu-{slug}.md"]
    paths = write_report(report, out_dir, slug)
    print(markdown(report))
    log(f"rescored {path} -> {paths}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rescore:
        return rescore(args.rescore, args.out, args.slug)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"unknown size {s!r}; known: {sorted(SIZES)}")
    prompts = [int(x) for x in args.prompts.split(",") if x.strip()]

    home = tempfile.mkdtemp(prefix="metalguard-bench-")
    os.environ["METALGUARD_HOME"] = home
    os.environ.pop("METALGUARD_BREADCRUMB_PATH", None)
    guard_mod = load_guard(os.path.abspath(args.guard_dir))

    # Importing the module makes the guard also synchronize generation_stream.
    from mlx_lm.generate import generate_step

    gen_mod = sys.modules["mlx_lm.generate"]
    gen_stream = gen_mod.generation_stream

    info = {k: to_jsonable(v) for k, v in mx.device_info().items()}
    device_name = str(info.get("device_name") or info.get("architecture") or "unknown")
    slug = args.slug or slugify(device_name)
    t_begin = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "subprocess_inference_guard overhead and stream drain",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {
            "device_name": device_name,
            "default_device": str(mx.default_device()),
            "device_info": info,
            "nvidia_smi": nvidia_smi(),
            "platform": platform.platform(),
        },
        "versions": {
            "mlx": getattr(mx, "__version__", None),
            "mlx_lm": pkg_version("mlx-lm"),
            "mlx_cuda_13": pkg_version("mlx-cuda-13"),
            "python": sys.version,
            "metal_guard": getattr(guard_mod, "__version__", None),
            "metal_guard_file": os.path.relpath(str(guard_mod.__file__), REPO_ROOT),
            "metal_guard_sha256": file_sha256(str(guard_mod.__file__)),
            "git_commit": git_commit(),
        },
        "config": {
            "sizes": sizes,
            "prompts": prompts,
            "gen_tokens": args.gen_tokens,
            "rounds": args.rounds,
            "block": args.block,
            "warmup": args.warmup,
            "seed": args.seed,
            "sampler": "greedy (generate_step default)",
            "method": (
                "Per (model, prompt): untimed warm-up of every variant, then rounds in "
                "rotating (and every other cycle reversed) variant order; each variant "
                "runs --block consecutive generate calls and only calls after the first "
                "are timed; all streams are drained, untimed, between blocks. Times are "
                "wall clock (perf_counter_ns) around one full generate_step loop."
            ),
        },
        "models": {},
        "generation": [],
    }
    log(f"device: {device_name}  mlx {report['versions']['mlx']}  guard {guard_mod.__file__}")

    def save() -> None:
        report["elapsed_s"] = time.monotonic() - t_begin
        paths = write_report(report, args.out, slug)
        report["files"] = [os.path.basename(p) for p in paths]

    if not args.no_drain:
        log("stream drain demo ...")
        t0 = time.monotonic()
        report["drain"] = bench_drain(
            guard_mod=guard_mod,
            gen_stream=gen_stream,
            matrix=args.drain_matrix,
            target_ms=args.drain_target_ms,
            reps=args.drain_reps,
        )
        report["drain"]["elapsed_s"] = time.monotonic() - t0
        s = report["drain"]["summary_ms"]
        log(
            f"  work {s['queued_work_ms']['median']:.2f} ms, bare sync "
            f"{s['bare_sync_ms']['median']:.3f} ms (then stream sync "
            f"{s['bare_then_stream_sync_ms']['median']:.2f} ms), guard exit "
            f"{s['guard_exit_ms']['median']:.2f} ms; verdict {report['drain']['verdict']}"
        )
        save()

    n_configs = len(sizes) * len(prompts)
    done_configs = 0
    for size in sizes:
        t0 = time.monotonic()
        model, n_params, config = build_model(size, args.seed)
        build_s = time.monotonic() - t0
        label = f"llama-{size}"
        report["models"][label] = {
            "size": size,
            "parameters": n_params,
            "dtype": "bfloat16",
            "build_s": build_s,
            "config": config,
            "active_memory_bytes": mx.get_active_memory(),
        }
        log(f"{label}: {n_params:,} parameters, built in {build_s:.1f} s")
        for plen in prompts:
            remaining = args.budget_s - (time.monotonic() - t_begin)
            budget = max(0.0, remaining / max(1, n_configs - done_configs))
            mx.reset_peak_memory()
            log(f"  prompt {plen}: budget {budget:.0f} s")
            row = bench_generation(
                model=model,
                model_label=label,
                vocab=int(config["vocab_size"]),
                prompt_len=plen,
                gen_tokens=args.gen_tokens,
                rounds=args.rounds,
                min_rounds=args.min_rounds,
                block=args.block,
                warmup=args.warmup,
                budget_s=budget,
                guard_mod=guard_mod,
                gen_stream=gen_stream,
                generate_step=generate_step,
                seed=args.seed,
            )
            row["peak_memory_bytes"] = mx.get_peak_memory()
            report["generation"].append(row)
            done_configs += 1
            s = row["summary_ms"]
            log(
                f"    plain {fmt_ms(s['plain'])}  bare {fmt_ms(s['bare_flush'])}  "
                f"guarded {fmt_ms(s['guarded'])}  g/p {row['ratios']['guarded_over_plain']:.3f}"
                f"  g/b {row['ratios']['guarded_over_bare_flush']:.3f}  ({row['rounds']} rounds,"
                f" {row['rounds_s']:.0f} s)"
            )
            save()
        del model
        gc.collect()
        mx.synchronize()
        mx.clear_cache()

    # Forensics sanity: the guard wrote one SUBPROC_POST per guarded call.
    crumbs = os.path.join(home, "breadcrumbs.log")
    with contextlib.suppress(OSError), open(crumbs, encoding="utf-8") as f:
        text = f.read()
        report["breadcrumbs"] = {
            "path": "$METALGUARD_HOME/breadcrumbs.log",
            "subproc_pre": text.count("SUBPROC_PRE:"),
            "subproc_post": text.count("SUBPROC_POST:"),
        }
    save()
    md = markdown(report)
    print(md)
    log(f"wrote {report['files']} to {args.out} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
