"""A guarded multi-model MLX pipeline: every metal-guard defence, end to end, offline.

The demo builds two tiny random-weight models (a llama and a ``gemma4_text``) in a temp
folder, then runs them one after the other the way a worker should:

1. known-panic advisory for each model id (and one lookup of a real registry entry);
2. cadence admission before every load (``CadenceGuard``): a same-model refusal, the
   90 s cross-model floor in front of a gemma-4 load, and a cross-model refusal that is
   waited out;
3. the gemma-4 first-generate flush before the first generate of a fresh gemma-4 model;
4. ``subprocess_inference_guard`` around every ``mlx_lm.generate`` call and around a
   ``mlx_lm.stream_generate`` loop;
5. unload marks, so cadence intervals count from the unload;
6. the wired-limit control (``limit_wired_memory``): mlx-lm asks to wire the recommended
   working set around a real generate, and the policy clamps it;
7. the memory layers (``MetalGuard``): a fit check before a load, a guarded cleanup, the
   release barrier's measured drop, and the watchdog catching a deliberate allocation
   spike of real MLX memory;
8. the breadcrumb tail (forensics that survive a kernel panic);
9. process isolation: the llama in a guarded worker subprocess through
   ``call_model_isolated`` (its breadcrumbs show its own guards), the GPU gate
   serialising two processes, and a graceful shutdown of the worker;
10. ``metal-guard run``: two guarded ``mlx_lm.server`` processes (the llama and the
    gemma-4) answering concurrent requests, their GPU work taking turns and never
    overlapping (from the gate's own log), then a graceful stop (``guarded_servers.py``).

Every step checks its own outcome; the run ends with a table of expected vs observed
behaviour and exits 1 if any step did not behave as stated. The intervals are short so
the demo ends in well under a minute; the 90 s gemma-4 floor is shown as a refusal, then
(by default) skipped by forgetting the llama's cadence records with ``guard.clear(llama)``
(records never move backwards, so a backdated mark would not do). ``--real-wait`` waits
it out instead.

    make demo
    python examples/guarded_pipeline.py --min-interval 2 --cross-model-interval 1
    python examples/guarded_pipeline.py --real-wait        # about two minutes

State (cadence store, breadcrumbs) goes to a temp ``METALGUARD_HOME`` unless you set one;
the paths are printed. Needs MLX and mlx-lm (``pip install -e '.[lm]'``); runs on Linux
(CPU) and on a Mac (Metal).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The models are local folders; nothing may reach a model hub. huggingface_hub reads
# this when it is first imported, so it must be set before mlx_lm is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from guarded_servers import servers_step  # noqa: E402  (examples/, next to this script)

from metal_guard import (  # noqa: E402
    GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC,
    CadenceGuard,
    CadenceViolation,
    CrossModelCadenceViolation,
    MetalGuard,
    call_model_isolated,
    canonical_model_id,
    check_known_panic_model,
    gemma4_generation_flush,
    is_gemma4_family,
    limit_wired_memory,
    read_breadcrumbs,
    require_cadence_clear,
    shutdown_all_workers,
    subprocess_inference_guard,
    wait_for_release,
    warn_if_known_panic_model,
)
from metal_guard import metal_guard as guard_singleton  # noqa: E402

PROMPT = "hello world"
GIB = 1 << 30
REGISTRY_DEMO_ID = "mlx-community/gemma-4-31b-it-8bit"
FLOOR = GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC


# -- reporting ---------------------------------------------------------------------


@dataclass
class Step:
    name: str
    expected: str
    observed: str
    ok: bool


class Report:
    """Steps checked so far; each one prints a line as it is recorded."""

    def __init__(self, models_dir: Path) -> None:
        self.steps: list[Step] = []
        self.models_dir = str(models_dir)

    def short(self, text: str) -> str:
        """Shorten the temp models folder in printed text to ``<models>``."""
        return text.replace(self.models_dir, "<models>")

    def check(self, name: str, expected: str, observed: str, ok: bool) -> bool:
        self.steps.append(Step(name, expected, self.short(observed), ok))
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {self.short(observed)}")
        return ok

    def note(self, text: str, indent: str = "    ") -> None:
        for line in textwrap.wrap(
            self.short(text), 96, initial_indent=indent, subsequent_indent=indent
        ):
            print(line)

    def table(self) -> str:
        headers = ("step", "expected", "observed", "result")
        rows = [(s.name, s.expected, s.observed, "ok" if s.ok else "FAIL") for s in self.steps]
        widths = [min(36, max(len(r[i]) for r in [headers, *rows])) for i in range(4)]

        def fmt(row: tuple[str, ...]) -> str:
            cells = [
                c if len(c) <= w else c[: w - 1] + "…" for c, w in zip(row, widths, strict=True)
            ]
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        lines = [fmt(headers), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in rows]
        return "\n".join(lines)


def section(title: str) -> None:
    print(f"\n== {title}")


class LogCapture(logging.Handler):
    """Prints the library's log records and keeps them for the checks."""

    def __init__(self, report: Report) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if record.levelno >= logging.WARNING:
            self.report.note(f"log {record.levelname}: {record.getMessage()}", indent="    | ")

    def warnings(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno >= logging.WARNING]


class MlxCallRecorder:
    """Wraps ``mx.synchronize`` and ``mx.clear_cache`` to record calls; the real ones still run."""

    NAMES = ("synchronize", "clear_cache")

    def __init__(self, mx: Any, generation_stream: Any) -> None:
        self.mx = mx
        self.generation_stream = generation_stream
        self.calls: list[str] = []
        self._real: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> MlxCallRecorder:
        for name in self.NAMES:
            self._real[name] = real = getattr(self.mx, name)
            setattr(self.mx, name, self._spy(name, real))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, real in self._real.items():
            setattr(self.mx, name, real)

    def _spy(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def spy(*args: Any) -> Any:
            labels = ["generation_stream" if a is self.generation_stream else repr(a) for a in args]
            self.calls.append(f"{name}({', '.join(labels)})")
            return real(*args)

        return spy

    def mark(self) -> int:
        return len(self.calls)


# -- pipeline ----------------------------------------------------------------------


def try_admit(guard: CadenceGuard, model: str) -> CadenceViolation | None:
    """``guard.admit(model)``; the refusal if there was one (a successful admit records a load)."""
    try:
        guard.admit(model)
    except CadenceViolation as exc:
        return exc
    return None


def describe(exc: CadenceViolation | None) -> str:
    if exc is None:
        return "admitted"
    kind = "cross-model" if isinstance(exc, CrossModelCadenceViolation) else "same model"
    return f"refused ({kind}), wait {exc.remaining_sec:.1f} s"


class Pipeline:
    def __init__(
        self, args: argparse.Namespace, report: Report, logs: LogCapture, mx: Any, mlx_lm: Any
    ) -> None:
        self.args = args
        self.report = report
        self.logs = logs
        self.mx = mx
        self.mlx_lm = mlx_lm
        self.guarded_calls = 0
        self.blocking_events: set[tuple[str, float]] = set()  # (model, event time)
        self.admits = 0
        self.advisory_warnings = 0
        self.memory_warnings = 0  # the fit miss and the watchdog's CRITICAL, both on purpose

    # one guarded mlx_lm.generate call
    def generate(self, model_id: str, model: Any, tokenizer: Any) -> str:
        self.guarded_calls += 1
        with subprocess_inference_guard(model_id):
            text: str = self.mlx_lm.generate(
                model, tokenizer, prompt=PROMPT, max_tokens=self.args.max_tokens
            )
        return text

    def refuse(self, guard: CadenceGuard, model: str) -> CadenceViolation | None:
        exc = try_admit(guard, model)
        if exc is None:
            self.admits += 1
        else:
            self.blocking_events.add((exc.model_id, exc.last_ts))
            self.report.note(f"refusal message: {exc}")
        return exc

    def advisory(self, llama: str, gemma: str) -> None:
        section("1. Known-panic advisory (warn_if_known_panic_model) and gemma-4 family detection")
        r = self.report
        fam = (is_gemma4_family(llama), is_gemma4_family(gemma))
        r.check(
            "gemma-4 family detection",
            "llama False, gemma True",
            f"llama {fam[0]}, gemma {fam[1]} (from config.json)",
            fam == (False, True),
        )
        before = len(self.logs.warnings())
        flagged = [warn_if_known_panic_model(m) for m in (llama, gemma)]
        new = len(self.logs.warnings()) - before
        r.check(
            "advisory: demo models",
            "False, False; no WARNING",
            f"{flagged[0]}, {flagged[1]}; {new} WARNING",
            flagged == [False, False] and new == 0,
        )
        print(f"  What an advisory looks like, for a real registry entry ({REGISTRY_DEMO_ID}):")
        before = len(self.logs.warnings())
        first = warn_if_known_panic_model(REGISTRY_DEMO_ID)
        second = warn_if_known_panic_model(REGISTRY_DEMO_ID)  # same process: no second WARNING
        new = len(self.logs.warnings()) - before
        self.advisory_warnings += new
        entry = check_known_panic_model(REGISTRY_DEMO_ID) or {}
        r.note(
            f"registry entry: tier={entry.get('tier')!r}, signature={entry.get('panic_signature')!r}, "
            f"safer alternative={entry.get('safer_alternative')!r}, "
            f"{len(entry.get('reproductions', []))} reproduction(s), upstream={entry.get('upstream')}"
        )
        r.check(
            "advisory: registry id",
            "True twice; exactly one WARNING",
            f"{first}, {second}; {new} WARNING",
            first and second and new == 1 and entry.get("tier") == "panic",
        )

    def llama_phase(self, guard: CadenceGuard, llama: str, gemma: str) -> float:
        """Admit, load, generate (plain and streaming), unload; returns the earlier gemma wait."""
        section(
            "2. llama: cadence admission, load, guarded generations, unload (CadenceGuard.scope)"
        )
        r, mx, mlx_lm, args = self.report, self.mx, self.mlx_lm, self.args
        gemma_wait = 0.0
        with guard.scope(llama):  # admit on entry (may raise CadenceViolation), unload mark on exit
            self.admits += 1
            r.check("cadence: admit llama", "admitted (empty store)", "admitted", True)
            model, tokenizer = mlx_lm.load(llama)[:2]

            print("  Loading the llama again right away (same model):")
            exc = self.refuse(guard, llama)
            r.check(
                "cadence: same-model reload",
                f"refused (same model), wait <= {args.min_interval:g} s",
                describe(exc),
                type(exc) is CadenceViolation and 0 < exc.remaining_sec <= args.min_interval,
            )

            print(
                "  Loading the gemma-4 model while the llama is loaded (cross-model, gemma-4 target):"
            )
            exc = self.refuse(guard, gemma)
            ok = (
                isinstance(exc, CrossModelCadenceViolation)
                and exc.min_interval == FLOOR
                and exc.last_model == canonical_model_id(llama)
                and FLOOR - 10 < exc.remaining_sec <= FLOOR
            )
            r.check(
                "cadence: gemma-4 90 s floor",
                f"refused (cross-model), wait ~{FLOOR:g} s",
                describe(exc),
                ok,
            )
            if exc is not None:
                gemma_wait = exc.remaining_sec

            generation_stream = getattr(
                sys.modules.get("mlx_lm.generate"), "generation_stream", None
            )
            with MlxCallRecorder(mx, generation_stream) as rec:
                self.guarded_calls += 1
                with subprocess_inference_guard(llama):
                    body_start = rec.mark()
                    text = mlx_lm.generate(
                        model, tokenizer, prompt=PROMPT, max_tokens=args.max_tokens
                    )
                    body_end = rec.mark()
            pre, post = rec.calls[:body_start], rec.calls[body_end:]
            r.note(f"generated {text!r}")
            r.note(f"guard PRE: {pre}; guard POST: {post}")
            want_post = ["synchronize()", "synchronize(generation_stream)", "clear_cache()"]
            ok_order = pre == ["clear_cache()"] and post == want_post
            r.check(
                "guarded generate (llama)",
                "PRE clear; POST sync x2, then clear",
                f"PRE {len(pre)}, POST {len(post)} MLX calls, order "
                + ("ok" if ok_order else "wrong"),
                bool(text) and ok_order,
            )

            pieces: list[str] = []
            self.guarded_calls += 1
            with subprocess_inference_guard(llama):  # around the whole streaming loop
                for response in mlx_lm.stream_generate(
                    model, tokenizer, prompt=PROMPT, max_tokens=args.max_tokens
                ):
                    pieces.append(response.text)
            r.note(f"streamed {len(pieces)} responses: {''.join(pieces)!r}")
            r.check(
                "guarded stream_generate",
                f"{args.max_tokens} responses inside one guard",
                f"{len(pieces)} responses",
                len(pieces) == args.max_tokens,
            )
            del model, tokenizer
            gc.collect()
            mx.clear_cache()
        unloaded = guard.status()["events"]
        row = next((e for e in unloaded if e["model_id"] == canonical_model_id(llama)), None)
        age = (
            None if row is None or row["last_unload"] is None else time.time() - row["last_unload"]
        )
        r.check(
            "unload mark (scope exit)",
            "llama unload recorded just now",
            "no unload recorded" if age is None else f"unload recorded {age:.2f} s ago",
            age is not None and age < 5,
        )
        return gemma_wait

    def gemma_phase(self, guard: CadenceGuard, llama: str, gemma: str, earlier_wait: float) -> None:
        section("3. gemma-4: the cross-model floor counts from the llama's unload")
        r, mx, mlx_lm, args = self.report, self.mx, self.mlx_lm, self.args
        exc = self.refuse(guard, gemma)
        r.check(
            "cadence: gemma after unload",
            "refused; clock restarts at unload",
            describe(exc),
            isinstance(exc, CrossModelCadenceViolation) and exc.remaining_sec > earlier_wait,
        )
        if args.real_wait:
            while exc is not None:  # check() decides like admit() but records nothing
                print(f"  --real-wait: sleeping {exc.remaining_sec:.1f} s as the refusal asks")
                time.sleep(exc.remaining_sec + 0.05)
                try:
                    guard.check(gemma)
                    exc = None
                except CadenceViolation as again:
                    exc = again
        else:
            print(
                "  Demo shortcut (not something to do in production): forgetting the llama's\n"
                f"  records with guard.clear(llama), as if the {FLOOR:g} s floor had passed. Records\n"
                "  never move backwards, so a backdated mark would not do. Use --real-wait to wait."
            )
            guard.clear(llama)

        with guard.scope(gemma):
            self.admits += 1
            r.check(
                "cadence: admit gemma-4", "admitted once the floor has passed", "admitted", True
            )
            model, tokenizer = mlx_lm.load(gemma)[:2]

            section("4. gemma-4 first-generate flush (gemma4_generation_flush)")
            noop_llama = gemma4_generation_flush(llama, 0)
            noop_second = gemma4_generation_flush(gemma, 1)
            r.check(
                "flush: llama / gemma count 1",
                "no-op both (flushed False, 0 s)",
                f"flushed {noop_llama.flushed}/{noop_second.flushed}, "
                f"slept {noop_llama.slept_sec:g}/{noop_second.slept_sec:g} s",
                not noop_llama.flushed
                and not noop_second.flushed
                and noop_llama.slept_sec == 0
                and noop_second.slept_sec == 0,
            )
            start = time.perf_counter()
            flush = gemma4_generation_flush(gemma, 0)  # before the first generate of this worker
            took = time.perf_counter() - start
            r.note(f"{flush!r} took {took:.2f} s")
            r.check(
                "flush: gemma count 0",
                f"flushed, slept {args.flush_sleep:g} s",
                f"flushed {flush.flushed}, slept {flush.slept_sec:g} s ({took:.2f} s)",
                flush.flushed
                and flush.slept_sec == args.flush_sleep
                and took >= args.flush_sleep * 0.9,
            )
            text = self.generate(gemma, model, tokenizer)
            r.note(f"generated {text!r}")
            r.check(
                "guarded generate (gemma-4)",
                "text generated inside the guard",
                f"{len(text)} chars",
                bool(text),
            )
            del model, tokenizer
            gc.collect()
            mx.clear_cache()

    def llama_again(self, guard: CadenceGuard, llama: str, gemma: str) -> None:
        section("5. llama again: a cross-model refusal that says how long to wait, then honoured")
        r, mx, mlx_lm, args = self.report, self.mx, self.mlx_lm, self.args
        exc = self.refuse(guard, llama)
        ok = (
            isinstance(exc, CrossModelCadenceViolation)
            and exc.last_model == canonical_model_id(gemma)
            and exc.min_interval == args.cross_model_interval
            and 0 < exc.remaining_sec <= args.cross_model_interval
        )
        r.check(
            "cadence: cross-model refusal",
            f"refused (cross-model), wait <= {args.cross_model_interval:g} s",
            describe(exc),
            ok,
        )
        if exc is not None:
            print(f"  waiting {exc.remaining_sec:.2f} s as the refusal asks")
            time.sleep(exc.remaining_sec + 0.05)
        require_cadence_clear(llama, guard=guard)  # the one-line form; raises if still too soon
        self.admits += 1
        r.check(
            "cadence: retry after the wait", "admitted (require_cadence_clear)", "admitted", True
        )
        model, tokenizer = mlx_lm.load(llama)[:2]
        text = self.generate(llama, model, tokenizer)
        r.note(f"generated {text!r}")
        self.wired_limit(llama, model, tokenizer)
        del model, tokenizer
        gc.collect()
        mx.clear_cache()
        guard.mark_unload(llama)  # explicit form of what scope() does on exit
        status = guard.status()
        blocked = status["gemma4_models_blocked_sec"]
        r.note(
            f"guard.status(): last model {os.path.basename(str(status['last_model']))!r}; other models "
            f"blocked {status['other_models_blocked_sec']:.1f} s, gemma-4 models blocked {blocked:.1f} s"
        )
        r.check(
            "cadence: status()",
            f"gemma-4 loads blocked ~{FLOOR:g} s",
            f"gemma-4 blocked {blocked:.1f} s, others {status['other_models_blocked_sec']:.1f} s",
            status["last_model"] == canonical_model_id(llama) and FLOOR - 10 < blocked <= FLOOR,
        )

    def memory_layers(self, guard: CadenceGuard, models_dir: Path) -> None:
        section(
            "7. Memory layers (MetalGuard): fit check, guarded cleanup, release barrier, watchdog"
        )
        r, mx, mlx_lm = self.report, self.mx, self.mlx_lm
        from tiny_models import build_tiny_model

        wide = build_tiny_model(
            models_dir / "tiny-llama-wide", "llama", seed=3, hidden=512, layers=4
        )
        size_gb = sum(p.stat().st_size for p in Path(wide).glob("*.safetensors")) / 1e9
        # Short cooldowns and thread waits: the demo's own guard (the singleton keeps 2 s / 30 s).
        mem = MetalGuard(cooldown_secs=0.2, thread_timeout_secs=2)
        spike_bytes = 300 << 20
        base = mem.memory_stats().in_use_bytes
        limit = base + int(spike_bytes * 1.5)
        real_info = mx.device_info
        print(
            "  MLX on a CPU reports no memory limit, so mx.device_info is wrapped for this step to\n"
            f"  report one: what this process uses now ({base / 1e9:.2f} GB: max(MLX active, process\n"
            f"  footprint)) + {1.5 * spike_bytes / 1e9:.2f} GB = {limit / 1e9:.2f} GB. The memory itself is real."
        )
        mx.device_info = lambda: {**real_info(), "max_recommended_working_set_size": limit}
        first_warning = len(self.logs.warnings())
        try:
            fits = mem.can_fit(size_gb, overhead_gb=0.05)
            too_big = mem.can_fit(2.0, overhead_gb=0.05)
            try:
                mem.require_fit(2.0, "a 2 GB model", overhead_gb=0.05)
                refusal = "no refusal"
            except MemoryError as exc:
                refusal = str(exc)
            r.note(f"require_fit refusal: {refusal}")
            r.check(
                "fit check before a load",
                f"{size_gb * 1000:.0f} MB model fits; 2 GB refused",
                f"fits {fits}; 2 GB fits {too_big}; "
                + ("refused" if refusal.startswith("Cannot fit a 2 GB model") else refusal),
                fits and not too_big and refusal.startswith("Cannot fit a 2 GB model (2.0GB)"),
            )

            exc = self.refuse(guard, wide)  # the llama was unloaded a moment ago
            if exc is not None:
                time.sleep(exc.remaining_sec + 0.05)
                require_cadence_clear(wide, guard=guard)
                self.admits += 1
            baseline = mx.get_active_memory()
            crumb_mark = len(read_breadcrumbs(5000))
            with mem.guarded_cleanup():  # safe_cleanup() after the body, even if it raised
                model, tokenizer = mlx_lm.load(wide)[:2]
                loaded = mx.get_active_memory()
                text = self.generate(wide, model, tokenizer)
                del model, tokenizer  # the caller's references: only the caller can drop them
            tail = [line.split(" ", 2)[2] for line in read_breadcrumbs(5000)[crumb_mark:]]
            cleanup = [m for m in tail if m.startswith(("CLEANUP", "FLUSH"))]
            r.note(f"generated {text!r}; guarded cleanup wrote {cleanup}")
            r.check(
                "guarded cleanup",
                "CLEANUP START, flush, DONE after the body",
                f"{len(cleanup)} lines: {cleanup[0] if cleanup else '-'} … {cleanup[-1] if cleanup else '-'}",
                cleanup[:1] == ["CLEANUP: START"]
                and cleanup[-1:] == ["CLEANUP: DONE"]
                and "FLUSH: mx.clear_cache()" in cleanup,
            )
            release = wait_for_release(timeout=8.0)  # back to the memory before the admit
            guard.mark_unload(wide)
            dropped = (loaded - release.active_bytes) / 1e6
            r.note(f"release barrier: {release}")
            r.check(
                "release barrier",
                "back to the pre-load baseline",
                f"{loaded / 1e6:.1f} → {release.active_bytes / 1e6:.1f} MB (−{dropped:.1f} MB), "
                f"waited {release.waited_sec:.3f} s",
                release.released
                and release.baseline_bytes == baseline
                and release.active_bytes <= baseline + (1 << 20)
                and dropped > size_gb * 1000 * 0.9,
            )

            before_pct = 100 * mem.memory_stats().in_use_bytes / limit
            critical = round((before_pct + 100) / 2, 1)
            alarms: list[float] = []
            mem.start_watchdog(
                0.05,
                warn_pct=critical,
                critical_pct=critical,
                on_critical=lambda: alarms.append(time.monotonic()),
            )
            print(
                f"  watchdog every 0.05 s, critical at {critical:g}% (in use now {before_pct:.1f}%);"
                f" allocating {spike_bytes / 1e6:.0f} MB of real MLX memory"
            )
            time.sleep(0.3)
            quiet = not alarms
            start = time.monotonic()
            spike = mx.ones((spike_bytes // 4,), dtype=mx.float32)
            mx.eval(spike)
            deadline = start + 10
            while not alarms and time.monotonic() < deadline:
                time.sleep(0.01)
            mem.stop_watchdog()
            del spike
            caught = [
                line.split(" ", 2)[2]
                for line in read_breadcrumbs(50)
                if " WATCHDOG: CRITICAL " in line
            ]
            r.note(f"watchdog breadcrumb: {caught[0] if caught else 'none'}")
            r.check(
                "watchdog catches a spike",
                "quiet before; CRITICAL after the spike",
                f"quiet before {quiet}; on_critical after {alarms[0] - start:.2f} s"
                if alarms
                else "no alarm",
                quiet and bool(alarms) and bool(caught),
            )
        finally:
            mx.device_info = real_info
            mem.stop_watchdog()
        new = self.logs.warnings()[first_warning:]
        expected = [
            w
            for w in new
            if "does not fit" in w.getMessage() or "watchdog CRITICAL" in w.getMessage()
        ]
        self.memory_warnings = len(expected)

    def wired_limit(self, llama: str, model: Any, tokenizer: Any) -> None:
        """mlx-lm wires the recommended working set around every generate; the policy clamps it."""
        section(
            "6. Wired-limit control (limit_wired_memory): mlx-lm asks to wire, the policy clamps"
        )
        r, mx = self.report, self.mx
        r.note(
            "On a Mac, mlx-lm calls mx.set_wired_limit(<recommended working set>) around every "
            "generate. On a CPU device_info() reports no such size, so the demo makes it report a "
            "Metal-like 48 GiB of 64 GiB (only that is faked) and records what reaches the real "
            "mx.set_wired_limit."
        )
        real_info, real_set = mx.device_info, mx.set_wired_limit
        seen: list[int] = []

        def device_info() -> dict[str, Any]:
            return {
                **real_info(),
                "max_recommended_working_set_size": 48 * GIB,
                "memory_size": 64 * GIB,
            }

        def recorder(limit: int) -> int:
            seen.append(limit)
            result: int = real_set(limit)
            return result

        def gib(values: list[int]) -> str:
            return ", ".join(f"{v / GIB:.1f}" for v in values) + " GiB"

        start = len(read_breadcrumbs(2000))
        mx.device_info, mx.set_wired_limit = device_info, recorder
        try:
            self.generate(llama, model, tokenizer)
            unguarded = seen[:]
            seen.clear()
            with limit_wired_memory("cap") as info:
                self.generate(llama, model, tokenizer)
            capped, cap = seen[:], info["cap_bytes"]
            seen.clear()
            with limit_wired_memory("off"):
                self.generate(llama, model, tokenizer)
            off = seen[:]
            restored = mx.set_wired_limit is recorder
        finally:
            mx.device_info, mx.set_wired_limit = real_info, real_set
        r.check(
            "wired limit: no policy",
            "mlx-lm asks for 48.0 GiB",
            f"set_wired_limit({gib(unguarded)})",
            unguarded[:1] == [48 * GIB],
        )
        r.check(
            "wired limit: cap",
            "clamped to 41.6 GiB (RAM - 35 %)",
            f"set_wired_limit({gib(capped)})",
            capped[:1] == [cap] and abs(cap / GIB - 41.6) < 1e-9 and max(capped) <= cap,
        )
        r.check(
            "wired limit: off",
            "nothing but 0 reaches MLX",
            f"set_wired_limit({gib(off)})",
            bool(off) and set(off) == {0},
        )
        lines = [line for line in read_breadcrumbs(2000)[start:] if "WIRED_LIMIT:" in line]
        for line in lines:
            print("  " + r.short(line))
        r.check(
            "wired limit: breadcrumbs, restore",
            "one WIRED_LIMIT per clamp; original back",
            f"{len(lines)} WIRED_LIMIT lines; restored {restored}",
            len(lines) == 2 and restored,
        )

    def breadcrumbs(self, llama: str, gemma: str) -> None:
        section("8. Breadcrumbs (read_breadcrumbs): the forensic trail of this run")
        r, args = self.report, self.args
        path = guard_singleton.breadcrumb_path
        tag = f" pid={os.getpid()} "
        mine = [line for line in read_breadcrumbs(2000) if tag in line]
        msgs = [line.split(tag, 1)[1] for line in mine]
        for line in mine[-args.tail :]:
            print("  " + r.short(line))
        print(
            f"  ({len(mine)} lines from this process in {path}; last {min(args.tail, len(mine))} shown)"
        )

        stack: list[str] = []
        pairs, bad = 0, 0
        for msg in msgs:
            if msg.startswith("SUBPROC_PRE: "):
                stack.append(msg.removeprefix("SUBPROC_PRE: "))
            elif msg.startswith("SUBPROC_POST: "):
                if stack and stack.pop() == msg.removeprefix("SUBPROC_POST: "):
                    pairs += 1
                else:
                    bad += 1
        bad += len(stack)
        r.check(
            "breadcrumbs: SUBPROC_*",
            f"{self.guarded_calls} matched pairs",
            f"{pairs} pairs, {bad} unmatched",
            pairs == self.guarded_calls and bad == 0,
        )
        flush = [m for m in msgs if m.startswith("GEMMA4_FLUSH")]
        want_flush = [f"GEMMA4_FLUSH: {gemma}", f"GEMMA4_FLUSH_DONE: {gemma}"]
        r.check(
            "breadcrumbs: GEMMA4_FLUSH*",
            "one pair, for the gemma only",
            f"{len(flush)} lines" + (" (gemma)" if flush == want_flush else ""),
            flush == want_flush,
        )
        admits = sum(m.startswith("CADENCE_ADMIT: ") for m in msgs)
        blocks = sum(m.startswith("CADENCE_BLOCK: ") for m in msgs)
        r.check(
            "breadcrumbs: CADENCE_*",
            f"{self.admits} admits, {len(self.blocking_events)} blocks (1 per event)",
            f"{admits} admits, {blocks} blocks",
            admits == self.admits and blocks == len(self.blocking_events),
        )


# One of the two processes of the GPU-gate step: three 0.2 s bodies under the gate.
GATE_CHILD = r"""
import json, sys, time
import metal_guard as mg
spans = []
print("ready", flush=True)
sys.stdin.readline()
for i in range(3):
    with mg.exclusive_gpu(f"{sys.argv[1]} body {i + 1}"):
        start = time.time()
        time.sleep(0.2)
        spans.append([start, time.time()])
print(json.dumps(spans), flush=True)
"""


def isolation(report: Report, llama: str, workdir: Path, max_tokens: int) -> None:
    """Step 7: a guarded worker subprocess, the GPU gate across processes, a graceful stop."""
    section("9. Process isolation: a guarded worker, the GPU gate, a graceful shutdown")
    r = report
    home = workdir / "isolation"
    crumbs_path = home / "breadcrumbs.log"
    saved = {k: os.environ.get(k) for k in ("METALGUARD_HOME", "METALGUARD_BREADCRUMB_PATH")}
    # Its own state folder: the worker's cadence admission (180 s, the default) must not
    # meet the loads of the steps above. The worker inherits this environment.
    os.environ["METALGUARD_HOME"] = str(home)
    os.environ["METALGUARD_BREADCRUMB_PATH"] = str(crumbs_path)
    try:
        print(f"  state for this step: {home}")
        start = time.perf_counter()
        first = call_model_isolated(PROMPT, llama, max_tokens=max_tokens, temperature=0)
        took = time.perf_counter() - start
        again = call_model_isolated(PROMPT, llama, max_tokens=max_tokens, temperature=0)
        lines = read_breadcrumbs(200, crumbs_path)
        worker = next((ln for ln in lines if " ready, pid=" in ln), "")
        pid = int(worker.rsplit("pid=", 1)[1]) if worker else -1
        r.note(f"call_model_isolated -> {first!r} (spawn + load + generate {took:.1f} s)")
        r.check(
            "worker: call_model_isolated",
            "text back; greedy repeat identical",
            f"{len(first)} chars, repeat {'identical' if again == first else 'DIFFERENT'}, "
            f"worker pid {pid}",
            bool(first) and again == first and pid not in (-1, os.getpid()),
        )
        tag = f" pid={pid} "
        mine = [ln.split(tag, 1)[1] for ln in lines if tag in ln]
        print("  the worker's breadcrumbs (its own guards):")
        for line in mine:
            print("    " + r.short(line))
        name = r.short(llama)
        want = [
            f"SUBPROCESS_WORKER: starting {name}, pid={pid}",
            f"CADENCE_ADMIT: {name}",
            f"SUBPROCESS_WORKER: loading {name}",
            f"SUBPROCESS_WORKER: {name} ready, pid={pid}",
        ] + [f"SUBPROC_PRE: {name}", f"SUBPROC_POST: {name}"] * 2
        r.check(
            "worker breadcrumbs",
            "start, admit, load, ready, 2 PRE/POST",
            f"{len(mine)} lines" + (", as expected" if [r.short(m) for m in mine] == want else ""),
            [r.short(m) for m in mine] == want,
        )

        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        )
        children = [
            subprocess.Popen(
                [sys.executable, "-c", GATE_CHILD, label],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for label in ("A", "B")
        ]
        try:
            for child in children:
                assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            for child in children:  # both start at the same moment
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
            spans = sorted(
                (start, end, label)
                for label, child in zip("AB", children, strict=True)
                for start, end in json.loads(child.communicate(timeout=60)[0])
            )
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        t0 = spans[0][0]
        print("  two processes, three 0.2 s bodies each, under exclusive_gpu():")
        print("    " + "  ".join(f"{lb} {a - t0:.2f}-{b - t0:.2f}s" for a, b, lb in spans))
        overlaps = sum(1 for x, y in itertools.pairwise(spans) if y[0] < x[1])
        r.check(
            "GPU gate: 2 processes",
            "6 bodies, none overlapping",
            f"{len(spans)} bodies in {spans[-1][1] - t0:.2f} s, {overlaps} overlapping",
            len(spans) == 6 and overlaps == 0 and spans[-1][1] - t0 >= 1.2,
        )

        start = time.perf_counter()
        shutdown_all_workers()
        took = time.perf_counter() - start
        mine = [ln.split(tag, 1)[1] for ln in read_breadcrumbs(200, crumbs_path) if tag in ln]
        try:
            os.kill(pid, 0)
            reaped = False
        except ProcessLookupError:
            reaped = True
        r.note(f"shutdown_all_workers() took {took:.2f} s; last worker line: {r.short(mine[-1])}")
        r.check(
            "graceful shutdown",
            "message only (no SIGTERM/SIGKILL), reaped",
            f"{'stopped on the message' if 'stopped (shutdown requested)' in mine[-1] else mine[-1]}"
            f", {'reaped' if reaped else 'NOT reaped'}",
            "stopped (shutdown requested)" in mine[-1]
            and reaped
            and not any("SIGTERM" in m or "SIGKILL" in m for m in mine),
        )
    finally:
        shutdown_all_workers()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def positive(limit: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not 0 < value <= limit:
            raise argparse.ArgumentTypeError(f"must be > 0 and <= {limit:g}, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--min-interval",
        type=positive(30),
        default=2.0,
        metavar="S",
        help="same-model cadence interval in seconds (default 2; production default 180)",
    )
    p.add_argument(
        "--cross-model-interval",
        type=positive(30),
        default=1.0,
        metavar="S",
        help="cross-model cadence interval in seconds (default 1); gemma-4 targets get "
        f"at least {FLOOR:g} s whatever this says",
    )
    p.add_argument(
        "--flush-sleep",
        type=positive(10),
        default=0.5,
        metavar="S",
        help="METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC for the demo (default 0.5; production 3)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=16, help="tokens per generate call (default 16)"
    )
    p.add_argument("--tail", type=int, default=30, help="breadcrumb lines to print (default 30)")
    p.add_argument(
        "--real-wait",
        action="store_true",
        help=f"wait out the {FLOOR:g} s gemma-4 floor instead of clearing the records (about 2 min)",
    )
    p.add_argument("--keep-models", action="store_true", help="keep the tiny model folders")
    args = p.parse_args(argv)
    if not 1 <= args.max_tokens <= 256:
        p.error("--max-tokens must be between 1 and 256")
    if args.tail < 0:
        p.error("--tail must be >= 0")
    return args


def setup_state(workdir: Path, report: Report) -> str | None:
    """Point the library at a temp state folder unless the user chose one; the cadence path."""
    if os.environ.get("METALGUARD_HOME", "").strip():
        home = os.environ["METALGUARD_HOME"]
        cadence: str | None = str(workdir / "cadence.json")
        print(f"  METALGUARD_HOME (yours): {home}")
        print("  The demo's cadence store is a separate file, so its loads, refusals and the")
        print(f"  records it clears never touch your real store: {cadence}")
    else:
        home = str(workdir / "state")
        os.environ["METALGUARD_HOME"] = home
        cadence = None  # the default: $METALGUARD_HOME/cadence.json
        print(f"  METALGUARD_HOME (temp, for this demo): {home}")
    if guard_singleton.breadcrumb_path is None:  # METALGUARD_BREADCRUMB_PATH="" turns them off
        guard_singleton.breadcrumb_path = workdir / "breadcrumbs.log"
        print(
            "  METALGUARD_BREADCRUMB_PATH is empty (breadcrumbs off); the demo writes them anyway"
        )
    print(f"  breadcrumbs: {guard_singleton.breadcrumb_path}")
    if os.environ.pop("METALGUARD_GEMMA4_FIRSTGEN_DISABLED", None) is not None:
        print(
            "  METALGUARD_GEMMA4_FIRSTGEN_DISABLED is ignored for the demo (the flush is one of its steps)"
        )
    return cadence


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError as exc:
        print(f"this demo needs MLX and mlx-lm ({exc}): pip install -e '.[lm]'", file=sys.stderr)
        return 1
    from tiny_models import build_tiny_model

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="metal-guard-demo-"))
    models_dir = workdir / "models"
    report = Report(models_dir)
    logs = LogCapture(report)
    logger = logging.getLogger("metal_guard")
    logger.addHandler(logs)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    section("0. Setup")
    print(
        f"  MLX {getattr(mx, '__version__', '?')} on {mx.default_device()}; demo folder {workdir}"
    )
    cadence_path = setup_state(workdir, report)
    os.environ["METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC"] = f"{args.flush_sleep:g}"
    guard = CadenceGuard(
        cadence_path,
        min_interval_sec=args.min_interval,
        cross_model_interval_sec=args.cross_model_interval,
        strict=True,  # a store problem raises instead of failing open: the demo wants to know
    )
    gemma_floor = guard.effective_cross_interval("google/gemma-4-31b-it")
    print(f"  cadence store: {guard.path}")
    print(
        f"  intervals: same model {guard.min_interval_sec:g} s, cross-model "
        f"{guard.cross_model_interval_sec:g} s, gemma-4 targets {gemma_floor:g} s"
    )
    print(
        f"  first-generate flush sleep: {args.flush_sleep:g} s (METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC)"
    )
    print("  library log: the 'metal_guard' logger stays silent until the application configures")
    print("  logging (e.g. logging.basicConfig()); this demo attaches a handler and shows WARNINGs")
    llama = build_tiny_model(models_dir / "tiny-llama", "llama", seed=1)
    gemma = build_tiny_model(models_dir / "tiny-gemma4", "gemma4_text", seed=2)
    print(
        f"  models: <models>/tiny-llama (llama), <models>/tiny-gemma4 (gemma4_text); <models> = {models_dir}"
    )
    print("  (random weights: the generated text is noise; the guards are what is being shown)")

    pipeline = Pipeline(args, report, logs, mx, mlx_lm)
    try:
        pipeline.advisory(llama, gemma)
        earlier_wait = pipeline.llama_phase(guard, llama, gemma)
        pipeline.gemma_phase(guard, llama, gemma, earlier_wait)
        pipeline.llama_again(guard, llama, gemma)
        pipeline.memory_layers(guard, models_dir)
    except Exception as exc:  # report what happened, then the summary (exit 1)
        report.check("pipeline", "runs to the end", f"aborted: {type(exc).__name__}: {exc}", False)
    pipeline.breadcrumbs(llama, gemma)
    try:
        isolation(report, llama, workdir, args.max_tokens)
    except Exception as exc:
        report.check("isolation", "runs to the end", f"aborted: {type(exc).__name__}: {exc}", False)
    try:
        servers_step(report, llama, gemma, workdir, flush_sleep=args.flush_sleep)
    except Exception as exc:
        report.check("servers", "runs to the end", f"aborted: {type(exc).__name__}: {exc}", False)
    unexpected = len(logs.warnings()) - pipeline.advisory_warnings - pipeline.memory_warnings
    report.check(
        "library warnings",
        "only the intended ones",
        f"{unexpected} other WARNING(s)",
        unexpected == 0,
    )

    if not args.keep_models:
        shutil.rmtree(models_dir, ignore_errors=True)
    failed = [s for s in report.steps if not s.ok]
    section(f"Summary ({time.perf_counter() - started:.1f} s)")
    print(report.table())
    print(f"\nkept: cadence store {guard.path}")
    print(f"      breadcrumbs    {guard_singleton.breadcrumb_path}")
    if failed:
        print(
            f"{len(failed)} of {len(report.steps)} steps did NOT behave as stated", file=sys.stderr
        )
        return 1
    print(f"all {len(report.steps)} steps behaved as stated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
