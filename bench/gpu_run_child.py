#!/usr/bin/env python3
"""The program ``bench/gpu_run_bench.py`` times, bare and under ``metal-guard run``.

An ordinary mlx-lm program: ``mlx_lm.load`` of a local folder, then ``mlx_lm.stream_generate``
with greedy sampling on a fixed prompt of token ids. It knows nothing of metal-guard: under
``metal-guard run`` the guards reach it through run's bootstrap, as they reach any program.

After an untimed warm-up it waits at an optional start barrier (``--barrier DIR --peers N``:
every peer leaves a file in DIR, all start once N are there), so two programs started
together time their generation over the same stretch; then it runs ``--reps`` timed
generations and prints ONE JSON line on stdout:

* ``tokens``: tokens generated in the timed generations; ``start`` / ``end``: system-wide
  ``time.monotonic()`` at the first call and after the last generation returned (a request's
  end, a guard's flush included); ``loop_s`` = ``end - start``;
* ``reps``: per generation ``start``, ``end``, ``tokens``, ``first_ms`` (the call to the first
  token: the prompt's prefill and one step);
* ``latencies_ms``: every later token's time since the previous one (decode, per token);
* ``import_s``, ``load_s``, ``warmup_s``, ``barrier_s``; ``guarded`` (``metal_guard`` was
  loaded into the process) and ``hooked`` (``stream_generate`` and ``generate_step`` are
  wrapped), so the parent can check that each variant is what it claims.

    python bench/gpu_run_child.py MODEL_DIR [--prompt-tokens 128] [--max-tokens 256]
        [--reps 3] [--warmup 1] [--seed 0] [--barrier DIR --peers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any


def wait_at_barrier(folder: str, peers: int, timeout_s: float) -> float:
    """Leave this process's mark in ``folder``; return once ``peers`` marks are there."""
    t0 = time.monotonic()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{os.getpid()}.ready"), "w", encoding="ascii"):
        pass
    while sum(1 for name in os.listdir(folder) if name.endswith(".ready")) < peers:
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"barrier {folder}: fewer than {peers} peers after {timeout_s:g} s")
        time.sleep(0.002)
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("model", help="local model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=3, help="timed generations")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations first")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt's token ids")
    p.add_argument("--barrier", default=None, help="folder of the start barrier")
    p.add_argument("--peers", type=int, default=1, help="processes meeting at the barrier")
    p.add_argument("--barrier-timeout-s", type=float, default=600.0)
    args = p.parse_args(argv)
    if args.prompt_tokens < 1 or args.max_tokens < 2 or args.reps < 1 or args.warmup < 0:
        p.error("--prompt-tokens >= 1, --max-tokens >= 2, --reps >= 1, --warmup >= 0")
    if not os.path.isdir(args.model):  # mlx_lm.load would take a missing path for a hub id
        p.error(f"{args.model!r} is not a folder")

    t0 = time.monotonic()
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    t1 = time.monotonic()
    loaded: tuple[Any, ...] = mlx_lm.load(args.model)
    model, tokenizer = loaded[0], loaded[1]
    t2 = time.monotonic()

    rng = random.Random(args.seed)
    # ids past the four specials (pad, bos, eos, unk) of the bench's tokenizer
    prompt = [rng.randrange(4, int(tokenizer.vocab_size)) for _ in range(args.prompt_tokens)]
    sampler = make_sampler(temp=0.0)  # greedy

    def generate() -> tuple[int, float, float, float, list[float]]:
        """One request: tokens, start, end, first-token ms, later tokens' ms."""
        gaps: list[float] = []
        count = 0
        first_ms = 0.0
        start = prev = time.monotonic()
        for _response in mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler
        ):
            now = time.monotonic()
            if count == 0:
                first_ms = (now - start) * 1e3
            else:
                gaps.append((now - prev) * 1e3)
            prev = now
            count += 1
        end = time.monotonic()
        if count != args.max_tokens:
            raise SystemExit(f"generated {count} tokens, wanted {args.max_tokens}")
        return count, start, end, first_ms, gaps

    for _ in range(args.warmup):
        generate()
    t3 = time.monotonic()
    barrier_s = 0.0
    if args.barrier:
        barrier_s = wait_at_barrier(args.barrier, args.peers, args.barrier_timeout_s)

    reps: list[dict[str, float]] = []
    latencies: list[float] = []
    for _ in range(args.reps):
        count, start, end, first_ms, gaps = generate()
        reps.append({"start": start, "end": end, "tokens": count, "first_ms": first_ms})
        latencies.extend(gaps)

    hooks = (mlx_lm.stream_generate, sys.modules["mlx_lm.generate"].generate_step)
    result = {
        "pid": os.getpid(),
        "guarded": "metal_guard" in sys.modules,
        "hooked": all(hasattr(fn, "__wrapped__") for fn in hooks),
        "tokens": sum(int(r["tokens"]) for r in reps),
        "start": reps[0]["start"],
        "end": reps[-1]["end"],
        "loop_s": reps[-1]["end"] - reps[0]["start"],
        "reps": reps,
        "latencies_ms": latencies,
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "warmup_s": t3 - t2,
        "barrier_s": barrier_s,
        "device": str(sys.modules["mlx.core"].default_device()),
    }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
