"""Process isolation: the GPU gate's cost per guarded call, and a worker's life cycle.

Results: docs/benchmarks.md → "Process isolation".

Part A — uncontended GPU gate, in this process (breadcrumbs off), ``--n`` calls per row in
interleaved blocks so drift hits every row alike:

* ``exclusive_gpu()`` entered and left with an empty body (the gate alone: open + flock +
  one 2 KiB ``pwrite`` of the holder + close);
* ``subprocess_inference_guard`` around an empty body, without and with ``exclusive=True``
  (MLX imported, so the guard's MLX calls run too); the difference is the gate's price;
* the same two around a real ``mlx_lm.generate`` of ``--tokens`` tokens on the tiny llama,
  to put that price next to the smallest real generate there is (the gate's share is the
  empty-body difference over the generate time: the generate rows alone are too noisy to
  resolve tens of µs).

Part B — a worker's life cycle, ``--cycles`` times, with the tiny llama: a bare ``spawn``
of a Python process that does nothing (the floor), ``MLXSubprocessRunner(...)`` until the
worker is ready (spawn + import + cadence admission + ``mlx_lm.load``), the first and
second ``generate``, ``shutdown()`` (the message path: the worker drops the model, marks
the unload, exits and is reaped) and, on a second worker, ``kill()`` (the SIGTERM path).

    python bench/bench_isolation.py [--n 2000] [--tokens 8] [--cycles 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Set before anything imports mlx_lm: nothing may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import REPO, machine_info, md_table, median, percentile, print_machine, write_results

PROMPT = "hello world"


def _import_metal_guard() -> Any:
    sys.path.insert(0, str(REPO))
    import metal_guard

    return metal_guard


def _noop() -> None:
    """Target of the bare spawn (module level, so ``spawn`` can import it)."""


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values),
        "min": min(values),
        "max": max(values),
    }


# -- part A -------------------------------------------------------------------------


def part_a(n: int, tokens: int, model_path: str) -> dict[str, Any]:
    mg = _import_metal_guard()
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(model_path)[:2]
    sampler = make_sampler(temp=0.0)

    def gate(_: int) -> None:
        with mg.exclusive_gpu("bench"):
            pass

    def guard(_: int) -> None:
        with mg.subprocess_inference_guard("bench/model", exclusive=False):
            pass

    def guard_gated(_: int) -> None:
        with mg.subprocess_inference_guard("bench/model", exclusive=True):
            pass

    def generate(exclusive: bool) -> Callable[[int], None]:
        def call(_: int) -> None:
            with mg.subprocess_inference_guard("bench/model", exclusive=exclusive):
                mlx_lm.generate(model, tokenizer, prompt=PROMPT, max_tokens=tokens, sampler=sampler)

        return call

    empty = {"exclusive_gpu()": gate, "guard": guard, "guard, exclusive=True": guard_gated}
    gen = {"guard": generate(False), "guard, exclusive=True": generate(True)}
    samples: dict[str, list[float]] = {f"empty body: {k}": [] for k in empty}
    samples.update({f"generate {tokens} tokens: {k}": [] for k in gen})
    for fn in [*empty.values(), *gen.values()]:  # warm-up: lock files, compiled kernels
        for i in range(5):
            fn(i)
    mx.synchronize()
    rounds, gen_calls = 20, max(5, n // 200)
    clock = time.perf_counter
    for r in range(rounds):
        order = list(empty.items())
        order = order[r % len(order) :] + order[: r % len(order)]
        for name, fn in order:
            for i in range(n // rounds):
                t0 = clock()
                fn(i)
                samples[f"empty body: {name}"].append((clock() - t0) * 1e6)
        gen_order = list(gen.items())[:: 1 if r % 2 else -1]
        for name, fn in gen_order:
            for i in range(gen_calls):
                t0 = clock()
                fn(i)
                samples[f"generate {tokens} tokens: {name}"].append((clock() - t0) * 1e6)
    results = {name: _stats(values) for name, values in samples.items()}
    plain, gated = results["empty body: guard"], results["empty body: guard, exclusive=True"]
    g_plain = results[f"generate {tokens} tokens: guard"]
    g_gated = results[f"generate {tokens} tokens: guard, exclusive=True"]
    rows = [
        [name, len(samples[name]), f"{s['p50']:.1f}", f"{s['p99']:.1f}", f"{s['mean']:.1f}"]
        for name, s in results.items()
    ]
    print(f"\n### A. uncontended GPU gate, {n} empty-body calls per row (µs)\n")
    print(md_table(["call", "calls", "p50 µs", "p99 µs", "mean µs"], rows))
    gate_cost = gated["p50"] - plain["p50"]
    summary = {
        "gate_alone_p50_us": results["empty body: exclusive_gpu()"]["p50"],
        "gate_cost_in_guard_p50_us": gate_cost,
        "tiny_generate_p50_ms": g_plain["p50"] / 1000,
        "gate_cost_share_of_tiny_generate": gate_cost / g_plain["p50"],
        "generate_with_gate_minus_without_p50_us": g_gated["p50"] - g_plain["p50"],
    }
    print(
        f"\nthe gate alone: {summary['gate_alone_p50_us']:.1f} µs (p50); it adds "
        f"{gate_cost:.1f} µs (p50) to a guarded call, "
        f"{100 * summary['gate_cost_share_of_tiny_generate']:.2f} % of a {tokens}-token generate "
        f"of the tiny llama ({summary['tiny_generate_p50_ms']:.1f} ms p50). The generate rows "
        f"differ by {summary['generate_with_gate_minus_without_p50_us']:.0f} µs, which is "
        "mostly the machine's noise at this size."
    )
    return {"rows": results, "summary": summary}


# -- part B -------------------------------------------------------------------------


def part_b(cycles: int, model_path: str) -> dict[str, Any]:
    import multiprocessing

    mg = _import_metal_guard()
    cadence = mg.CadenceGuard(min_interval_sec=0)  # back-to-back loads are the point here
    times: dict[str, list[float]] = {
        "spawn a no-op process (start → reaped)": [],
        "MLXSubprocessRunner() until ready (spawn + load)": [],
        "first generate (8 tokens)": [],
        "second generate (8 tokens)": [],
        "shutdown() (message path, reaped)": [],
        "kill() (SIGTERM path, reaped)": [],
    }
    ctx = multiprocessing.get_context("spawn")
    exit_codes: list[int | None] = []
    for _ in range(cycles):
        t0 = time.perf_counter()
        proc = ctx.Process(target=_noop)
        proc.start()
        proc.join()
        times["spawn a no-op process (start → reaped)"].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        runner = mg.MLXSubprocessRunner(model_path, cadence=cadence)
        times["MLXSubprocessRunner() until ready (spawn + load)"].append(time.perf_counter() - t0)
        for key in ("first generate (8 tokens)", "second generate (8 tokens)"):
            t0 = time.perf_counter()
            runner.generate(PROMPT, max_tokens=8, temperature=0)
            times[key].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        runner.shutdown()
        times["shutdown() (message path, reaped)"].append(time.perf_counter() - t0)
        exit_codes.append(runner.exitcode)

        runner = mg.MLXSubprocessRunner(model_path, cadence=cadence)
        t0 = time.perf_counter()
        runner.kill()
        times["kill() (SIGTERM path, reaped)"].append(time.perf_counter() - t0)
        exit_codes.append(runner.exitcode)
    rows = [
        [name, len(v), f"{median(v):.3f}", f"{min(v):.3f}", f"{max(v):.3f}"]
        for name, v in times.items()
    ]
    print(f"\n### B. worker life cycle, tiny llama, {cycles} cycles (seconds)\n")
    print(md_table(["step", "runs", "median s", "min s", "max s"], rows))
    print(f"\nworker exit codes: {sorted(set(exit_codes), key=str)} (0 = message, 143 = SIGTERM)")
    return {
        "seconds": {
            k: {"median": median(v), "min": min(v), "max": max(v)} for k, v in times.items()
        },
        "exit_codes": exit_codes,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="empty-body calls per row (default 2000)")
    p.add_argument("--tokens", type=int, default=8, help="tokens per generate (default 8)")
    p.add_argument("--cycles", type=int, default=5, help="worker life cycles (default 5)")
    args = p.parse_args()
    machine = machine_info()
    print_machine(machine)
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-isolation-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["METALGUARD_HOME"] = str(tmp / "home")
        os.environ["METALGUARD_BREADCRUMB_PATH"] = ""
        model_path = build_tiny_model(tmp / "tiny-llama", "llama")
        gate = part_a(args.n, args.tokens, model_path)
        life = part_b(args.cycles, model_path)
    path = write_results(
        "bench_isolation",
        machine,
        {"n": args.n, "tokens": args.tokens, "cycles": args.cycles},
        {"gate": gate, "worker": life},
    )
    print(f"\nresults: {path}")
    bad = [c for c in life["exit_codes"] if c not in (0, 143)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
