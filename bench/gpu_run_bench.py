#!/usr/bin/env python3
"""GPU benchmark of ``metal-guard run``: mlx-lm generation under run vs bare, one and two
programs at once.

On the lent GPU machine (docs in ../shared/GPU.md; wheels installed to /tmp/site), from the
repository root, one command (about 4-5 minutes on an H100, model build included):

    export PYTHONPATH=/tmp/site:$PWD && python3 bench/gpu_run_bench.py --out "$OUT"

What it measures (docs/benchmarks.md → "Generation under run on a GPU"; issue 15 and
SPEC-3 §2.3): a random-weight llama model of about 1B parameters (bf16; the shape of
``bench/gpu_bench.py``'s ``1b``, built in memory, nothing downloaded) is saved to a local
folder with a tokenizer ``mlx_lm.load`` reads offline, and a separate program,
``bench/gpu_run_child.py``, loads it and generates (``mlx_lm.load`` + ``mlx_lm.stream_generate``,
greedy, a fixed prompt of ``--prompt-tokens`` token ids, ``--max-tokens`` tokens). Four
variants, interleaved over ``--rounds`` rounds in rotating order (reversed every other cycle):

* ``bare``:    ``python gpu_run_child.py MODEL``
* ``run``:     ``python -m metal_guard run -- python gpu_run_child.py MODEL``
* ``bare_x2``: two bare programs started together
* ``run_x2``:  two programs, each under its own ``metal-guard run``, started together (they
  share the host-wide GPU gate: one forward step at a time, handed over fairly)

Every program times itself: after an untimed warm-up generation it meets its peer at a start
barrier (files in a folder), then runs ``--reps`` timed generations and prints tokens, the
wall time of its generation loop (a request's end included: under run, its flush) and the
time of every token. Reported per variant (medians over rounds): tokens/s per program, the
aggregate tokens/s of the two programs together (their tokens over the stretch from the first
start to the last end), the first token's time, and the p50/p99 per-token latency each program
sees; ratios run/bare side by side, and the per-round ratios' median. The parent checks that
every ``run`` program has the hooks installed and no ``bare`` one does.

All programs share one fresh state folder (``METALGUARD_HOME``, other ``METALGUARD_*``
variables dropped). Each program loads the model through a path of its own (a symbolic link
to the one folder): the cadence keys on the path and would otherwise hold each reload of the
same model for 180 s; the load is not timed.

Results go to ``<out>/gpu-run-<device-slug>.json`` and ``.md``; the Markdown is printed.

Usage::

    python bench/gpu_run_bench.py                      # full run: 1b, prompt 128, 256 tokens
    python bench/gpu_run_bench.py --quick              # tiny model, CPU-friendly smoke run
    python bench/gpu_run_bench.py --rounds 3 --reps 2 --out /tmp/results
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import itertools
import json
import math
import os
import platform
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from typing import Any, cast

import mlx.core as mx
from common import machine_info
from common import median as med
from common import percentile as pct
from gpu_bench import (
    SIZES,
    build_model,
    file_sha256,
    git_commit,
    nvidia_smi,
    pkg_version,
    slugify,
    to_jsonable,
)
from mlx.utils import tree_flatten

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(REPO_ROOT, "bench", "gpu_run_child.py")
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

from tiny_models import (  # noqa: E402  (tests/, after the path set-up)
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    byte_level_tokenizer,
    save_tokenizer,
)

VARIANTS: tuple[str, ...] = ("bare", "run", "bare_x2", "run_x2")
PAIRS = (("run", "bare"), ("run_x2", "bare_x2"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# the model folder
# --------------------------------------------------------------------------------------


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def build_tokenizer(dest: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with exactly ``vocab_size`` ids, for ``mlx_lm.load``.

    The files and settings are tests/tiny_models.py's (``save_tokenizer``), but the
    vocabulary is written out, not trained: the four specials, the 256 byte symbols, then
    letter strings up to ``vocab_size``, so every id a model of that vocabulary can generate
    decodes (mlx-lm's streaming detokenizer indexes a table by id).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    vocab: dict[str, int] = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    for n in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            if len(vocab) >= vocab_size:
                break
            vocab.setdefault("".join(letters), len(vocab))
        if len(vocab) >= vocab_size:
            break
    tok = byte_level_tokenizer(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    save_tokenizer(tok, dest, model_max_length=8192)


def save_model(size: str, seed: int, dest: str) -> dict[str, Any]:
    """Build ``size`` with gpu_bench's ``build_model`` and save a loadable folder in ``dest``.

    As in tests/tiny_models.py, the ``<eos>`` row of the output projection is zeroed, so
    greedy decoding runs to ``max_tokens`` instead of stopping on a random ``<eos>``.
    """
    t0 = time.monotonic()
    os.makedirs(dest, exist_ok=True)
    model, n_params, config = build_model(size, seed)
    weights = dict(cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters())))
    del model
    key = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    w = weights[key]
    weights[key] = mx.where(mx.arange(w.shape[0])[:, None] == EOS_ID, mx.zeros_like(w), w)
    mx.eval(weights)
    mx.save_safetensors(
        os.path.join(dest, "model.safetensors"), weights, metadata={"format": "mlx"}
    )
    del weights, w
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    full_config = {
        **config,
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    write_json(os.path.join(dest, "config.json"), full_config)
    build_tokenizer(dest, int(config["vocab_size"]))
    size_bytes = sum(os.path.getsize(os.path.join(dest, name)) for name in sorted(os.listdir(dest)))
    return {
        "size": size,
        "parameters": n_params,
        "dtype": "bfloat16",
        "config": full_config,
        "folder_bytes": size_bytes,
        "build_s": time.monotonic() - t0,
    }


# --------------------------------------------------------------------------------------
# launching the programs
# --------------------------------------------------------------------------------------


class Bench:
    """Launches of the child program; the work folder, its links and the environment."""

    def __init__(self, args: argparse.Namespace, work: str, model_dir: str) -> None:
        self.args = args
        self.work = work
        self.model_dir = model_dir
        self.count = itertools.count()
        self.home = os.path.join(work, "home")
        os.makedirs(self.home, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
        env["METALGUARD_HOME"] = self.home
        env["HF_HUB_OFFLINE"] = "1"
        env["TOKENIZERS_PARALLELISM"] = "false"
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if not any(os.path.abspath(p) == REPO_ROOT for p in paths):
            paths.insert(0, REPO_ROOT)  # ``python -m metal_guard`` imports this checkout
        env["PYTHONPATH"] = os.pathsep.join(paths)
        self.env = env

    def argv(self, guarded: bool, link: str, barrier: str | None, peers: int) -> list[str]:
        a = self.args
        child = [
            sys.executable,
            CHILD,
            link,
            f"--prompt-tokens={a.prompt_tokens}",
            f"--max-tokens={a.max_tokens}",
            f"--reps={a.reps}",
            f"--warmup={a.warmup}",
            f"--seed={a.seed}",
        ]
        if barrier is not None:
            child += [f"--barrier={barrier}", f"--peers={peers}"]
        if guarded:
            return [sys.executable, "-m", "metal_guard", "run", "--", *child]
        return child

    def launch(self, variant: str) -> dict[str, Any]:
        """Start the variant's programs together; wait; return their checked records."""
        guarded = variant.startswith("run")
        n = 2 if variant.endswith("_x2") else 1
        k = next(self.count)
        barrier = os.path.join(self.work, f"barrier-{k}") if n > 1 else None
        procs: list[tuple[subprocess.Popen[bytes], str, str, list[str]]] = []
        t0 = time.monotonic()
        for i in range(n):
            link = os.path.join(self.work, f"model-{k}-{i}")
            os.symlink(self.model_dir, link)
            out = os.path.join(self.work, f"launch-{k}-{i}.out")
            err = os.path.join(self.work, f"launch-{k}-{i}.err")
            argv = self.argv(guarded, link, barrier, n)
            with open(out, "wb") as fo, open(err, "wb") as fe:
                proc = subprocess.Popen(argv, stdout=fo, stderr=fe, env=self.env, cwd=REPO_ROOT)
            procs.append((proc, out, err, argv))
        records: list[dict[str, Any]] = []
        failures: list[str] = []
        for proc, out, err, argv in procs:
            rc = wait_or_stop(proc, self.args.timeout_s - (time.monotonic() - t0))
            wall = time.monotonic() - t0
            with open(out, encoding="utf-8", errors="replace") as f:
                lines = [ln for ln in f.read().splitlines() if ln.startswith("{")]
            with open(err, encoding="utf-8", errors="replace") as f:
                err_text = f.read()
            notes = sorted({ln.strip() for ln in err_text.splitlines() if "metal-guard" in ln})
            if rc != 0 or not lines:
                tail = "\n".join(err_text.strip().splitlines()[-15:])
                failures.append(f"{' '.join(argv)}\n  exit {rc}\n{tail}")
                continue
            rec: dict[str, Any] = json.loads(lines[-1])
            if rec["hooked"] != guarded or rec["guarded"] != guarded:
                failures.append(
                    f"{variant}: expected guarded={guarded}, the program says "
                    f"guarded={rec['guarded']} hooked={rec['hooked']}\n{err_text[-2000:]}"
                )
            rec["launch_wall_s"] = wall
            rec["stderr_notes"] = notes
            records.append(rec)
        if failures:
            raise SystemExit(f"{variant}: " + "\n".join(failures))
        return {"variant": variant, "processes": records}


def wait_or_stop(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """The exit code; past ``timeout_s``: SIGTERM, a grace of 15 s, then SIGKILL (warned)."""
    try:
        return proc.wait(timeout=max(0.1, timeout_s))
    except subprocess.TimeoutExpired:
        pass
    log(f"  pid {proc.pid} still running after {timeout_s:.0f} s: SIGTERM")
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        log(f"  WARNING: pid {proc.pid} ignored SIGTERM for 15 s: SIGKILL")
        proc.kill()
        proc.wait()
    return 124


# --------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------


def score_launch(launch: dict[str, Any]) -> None:
    """Per program: tokens/s, p50/p99; per launch: aggregate tokens/s and the overlap."""
    procs = launch["processes"]
    for rec in procs:
        lat = rec["latencies_ms"]
        rec["tokens_per_s"] = rec["tokens"] / rec["loop_s"]
        rec["p50_ms"] = pct(lat, 50)
        rec["p99_ms"] = pct(lat, 99)
        rec["first_ms_median"] = med([r["first_ms"] for r in rec["reps"]])
    start = min(r["start"] for r in procs)
    end = max(r["end"] for r in procs)
    both = min(r["end"] for r in procs) - max(r["start"] for r in procs)
    launch["aggregate_tokens_per_s"] = sum(r["tokens"] for r in procs) / (end - start)
    launch["overlap"] = max(0.0, both) / (end - start) if len(procs) > 1 else 1.0
    rates = [r["tokens_per_s"] for r in procs]
    launch["slowest_share"] = min(rates) / max(rates)


def score(report: dict[str, Any]) -> None:
    """Summaries per variant (medians over rounds) and the run/bare ratios."""
    launches: list[dict[str, Any]] = report["launches"]
    summary: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        rows = [la for la in launches if la["variant"] == variant]
        procs = [p for la in rows for p in la["processes"]]
        summary[variant] = {
            "launches": len(rows),
            "processes": len(procs),
            "tokens_per_s_per_process": med([p["tokens_per_s"] for p in procs]),
            "aggregate_tokens_per_s": med([la["aggregate_tokens_per_s"] for la in rows]),
            "first_ms": med([p["first_ms_median"] for p in procs]),
            "p50_ms": med([p["p50_ms"] for p in procs]),
            "p99_ms": med([p["p99_ms"] for p in procs]),
            "p99_ms_worst_process": max((p["p99_ms"] for p in procs), default=math.nan),
            "p50_ms_pooled": pct([x for p in procs for x in p["latencies_ms"]], 50),
            "p99_ms_pooled": pct([x for p in procs for x in p["latencies_ms"]], 99),
            "overlap": med([la["overlap"] for la in rows]),
            "slowest_share": med([la["slowest_share"] for la in rows]),
            "launch_wall_s": med([p["launch_wall_s"] for p in procs]),
            "load_s": med([p["load_s"] for p in procs]),
        }
    report["summary"] = summary
    ratios: dict[str, dict[str, float]] = {}
    for guarded, bare in PAIRS:
        g, b = summary[guarded], summary[bare]
        by_round: dict[int, dict[str, float]] = {}
        for la in launches:
            if la["variant"] in (guarded, bare):
                by_round.setdefault(la["round"], {})[la["variant"]] = la["aggregate_tokens_per_s"]
        paired = [r[guarded] / r[bare] for r in by_round.values() if guarded in r and bare in r]
        ratios[guarded] = {
            "tokens_per_s_per_process": g["tokens_per_s_per_process"]
            / b["tokens_per_s_per_process"],
            "aggregate_tokens_per_s": g["aggregate_tokens_per_s"] / b["aggregate_tokens_per_s"],
            "aggregate_tokens_per_s_paired_median": med(paired),
            "first_ms": g["first_ms"] / b["first_ms"],
            "p50_ms": g["p50_ms"] / b["p50_ms"],
            "p99_ms": g["p99_ms"] / b["p99_ms"],
        }
    report["ratios"] = ratios


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------

LABELS = {
    "bare": "bare, 1 program",
    "run": "under run, 1 program",
    "bare_x2": "bare, 2 programs at once",
    "run_x2": "under run, 2 programs at once",
}


def markdown(report: dict[str, Any]) -> str:
    dev = report["device"]
    cfg = report["config"]
    model = report["model"]
    s, ratios = report["summary"], report["ratios"]
    versions = report["versions"]
    smi = dev.get("nvidia_smi")
    smi_rows = [r.strip() for r in str(smi).splitlines()[1:] if r.strip()] if smi else []
    lines = [
        f"# GPU benchmark: mlx-lm generation under `metal-guard run` on {dev['device_name']}",
        "",
        f"Device: {'; '.join(smi_rows) if smi_rows else dev['device_name']} "
        f"(`{dev['default_device']}`); {dev['platform']}; CPU {report['machine']['cpu']}, "
        f"{report['machine']['usable_cores']} cores. mlx {versions['mlx']}, mlx-lm "
        f"{versions['mlx_lm']}, Python {versions['python'].split()[0]}, {report['timestamp']}.",
        "",
        f"Random-weight llama `{model['size']}` ({model['parameters']:,} parameters, bf16), "
        f"loaded from a local folder by a separate program (`mlx_lm.load` + "
        f"`mlx_lm.stream_generate`, greedy): prompt {cfg['prompt_tokens']} token ids, "
        f"{cfg['max_tokens']} generated tokens per request, {cfg['warmup']} untimed + "
        f"{cfg['reps']} timed requests per program, {report['rounds_done']} interleaved "
        "rounds. Medians over the programs (the aggregate: over the rounds). Per-token "
        "latency: the time between two tokens of one request (the first token's: from the "
        "call). Ratios are run / bare; in brackets the median of the per-round ratios.",
        "",
        "| variant | programs | tok/s per program | aggregate tok/s | first token ms "
        "| per-token p50 ms | per-token p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for guarded, bare in PAIRS:
        for v in (bare, guarded):
            row = s[v]
            lines.append(
                f"| {LABELS[v]} | {int(row['processes'])} "
                f"| {row['tokens_per_s_per_process']:.1f} | {row['aggregate_tokens_per_s']:.1f} "
                f"| {row['first_ms']:.1f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |"
            )
        r = ratios[guarded]
        lines.append(
            f"| **run / bare** | | **{r['tokens_per_s_per_process']:.3f}** "
            f"| **{r['aggregate_tokens_per_s']:.3f}** "
            f"({r['aggregate_tokens_per_s_paired_median']:.3f}) "
            f"| {r['first_ms']:.3f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |"
        )
    lines += [
        "",
        "Two programs at once: how much of the timed stretch both ran, and the slower "
        "program's tokens/s over the faster's (medians over the rounds); the worst p99 a "
        "program saw; the model load (inside the program) and the launch to exit.",
        "",
        "| variant | overlap | slower / faster | worst p99 ms | load s | launch to exit s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        row = s[v]
        pair = v.endswith("_x2")
        overlap = f"{row['overlap']:.2f}" if pair else "-"
        share = f"{row['slowest_share']:.2f}" if pair else "-"
        lines.append(
            f"| {LABELS[v]} | {overlap} | {share} "
            f"| {row['p99_ms_worst_process']:.2f} | {row['load_s']:.2f} "
            f"| {row['launch_wall_s']:.1f} |"
        )
    crumbs = report.get("breadcrumbs")
    if crumbs:
        lines += [
            "",
            f"Guarded requests: {crumbs['guarded_requests']}; breadcrumbs "
            f"`SUBPROC_PRE` {crumbs['subproc_pre']}, `SUBPROC_POST` {crumbs['subproc_post']} "
            "(run's per-request flush).",
        ]
    notes = sorted(
        {n for la in report["launches"] for p in la["processes"] for n in p["stderr_notes"]}
    )
    if notes:
        lines += ["", "What the guarded programs said on stderr:", ""]
        lines += [f"- `{n}`" for n in notes[:10]]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str, slug: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"gpu-run-{slug}.json")
    md_path = os.path.join(out_dir, f"gpu-run-{slug}.md")
    tmp = json_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(to_jsonable(report), f, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, json_path)
    if "summary" in report:
        with open(md_path, "w", encoding="utf-8") as f:
            f.write(markdown(report))
    return [json_path, md_path]


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size", default="1b", help=f"model shape, one of {sorted(SIZES)}")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256, help="generated tokens per request")
    p.add_argument("--reps", type=int, default=3, help="timed requests per program")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests per program first")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the four variants")
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument(
        "--budget-s",
        type=float,
        default=300.0,
        help="soft time budget: no new round after it once --min-rounds are done",
    )
    p.add_argument("--timeout-s", type=float, default=150.0, help="per launch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or os.path.join(REPO_ROOT, "bench", "results"),
        help="output folder (default $OUT, else bench/results)",
    )
    p.add_argument("--slug", default=None, help="device slug for file names")
    p.add_argument("--keep", action="store_true", help="keep the work folder (model, logs)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, short prompt, few tokens and rounds (local smoke test)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.size = "tiny"
        args.prompt_tokens = 16
        args.max_tokens = 32
        args.reps = 2
        args.rounds = 2
        args.min_rounds = 2
        args.timeout_s = 120.0
    if args.size not in SIZES:
        p.error(f"unknown size {args.size!r}; known: {sorted(SIZES)}")
    if min(args.prompt_tokens, args.reps, args.rounds) < 1 or args.max_tokens < 2:
        p.error("--prompt-tokens, --reps, --rounds >= 1 and --max-tokens >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_begin = time.monotonic()
    info = {k: to_jsonable(v) for k, v in mx.device_info().items()}
    device_name = str(info.get("device_name") or info.get("architecture") or "unknown")
    slug = args.slug or slugify(device_name) + ("-quick" if args.quick else "")
    work = tempfile.mkdtemp(prefix="gpu-run-bench-")
    report: dict[str, Any] = {
        "benchmark": "mlx-lm generation under metal-guard run vs bare, 1 and 2 programs",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {
            "device_name": device_name,
            "default_device": str(mx.default_device()),
            "device_info": info,
            "nvidia_smi": nvidia_smi(),
            "platform": platform.platform(),
        },
        "machine": machine_info(),
        "versions": {
            "mlx": getattr(mx, "__version__", None),
            "mlx_lm": pkg_version("mlx-lm"),
            "mlx_cuda_13": pkg_version("mlx-cuda-13"),
            "python": sys.version,
            "metal_guard_sha256": file_sha256(os.path.join(REPO_ROOT, "metal_guard.py")),
            "git_commit": git_commit(),
        },
        "config": {
            "size": args.size,
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "reps": args.reps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "seed": args.seed,
            "sampler": "greedy (make_sampler(temp=0.0))",
            "quick": args.quick,
            "method": (
                "One untimed launch each of bare and run first. Then per round the four "
                "variants in rotating order (reversed every other cycle). Each program: "
                "mlx_lm.load, --warmup untimed requests, a start barrier with its peer, "
                "--reps timed mlx_lm.stream_generate requests; times are time.monotonic() "
                "inside the program. Aggregate tokens/s: both programs' tokens over the "
                "first start to the last end."
            ),
        },
        "launches": [],
    }
    log(f"device: {device_name} ({mx.default_device()}), work folder {work}")
    try:
        model_dir = os.path.join(work, "model")
        report["model"] = save_model(args.size, args.seed, model_dir)
        log(
            f"llama-{args.size}: {report['model']['parameters']:,} parameters, "
            f"{report['model']['folder_bytes'] / 2**30:.2f} GiB saved in "
            f"{report['model']['build_s']:.1f} s"
        )
        bench = Bench(args, work, model_dir)
        t0 = time.monotonic()
        report["warmup_launches"] = [bench.launch("bare"), bench.launch("run")]
        log(f"warm-up launches (bare, run): {time.monotonic() - t0:.1f} s")
        for r in range(args.rounds):
            if r >= args.min_rounds and time.monotonic() - t_begin > args.budget_s:
                log(f"budget reached after {r} rounds")
                break
            k = r % len(VARIANTS)
            order = list(VARIANTS[k:] + VARIANTS[:k])
            if (r // len(VARIANTS)) % 2 == 1:
                order.reverse()
            parts = []
            for variant in order:
                launch = bench.launch(variant)
                launch["round"] = r
                score_launch(launch)
                report["launches"].append(launch)
                parts.append(
                    f"{variant} {launch['aggregate_tokens_per_s']:.1f} tok/s"
                    f" ({launch['processes'][0]['launch_wall_s']:.1f} s)"
                )
            report["rounds_done"] = r + 1
            log(f"round {r + 1}: " + ", ".join(parts) + f"; {time.monotonic() - t_begin:.0f} s")
            score(report)
            report["elapsed_s"] = time.monotonic() - t_begin
            write_report(report, args.out, slug)
        crumbs_path = os.path.join(bench.home, "breadcrumbs.log")
        with contextlib.suppress(OSError), open(crumbs_path, encoding="utf-8") as f:
            text = f.read()
            launches = report["launches"] + report["warmup_launches"]
            guarded = sum(
                len(la["processes"]) for la in launches if la["variant"].startswith("run")
            )
            report["breadcrumbs"] = {
                "guarded_requests": guarded * (args.warmup + args.reps),
                "subproc_pre": text.count("SUBPROC_PRE:"),
                "subproc_post": text.count("SUBPROC_POST:"),
            }
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["elapsed_s"] = time.monotonic() - t_begin
    paths = write_report(report, args.out, slug)
    print(markdown(report))
    log(f"wrote {paths} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
