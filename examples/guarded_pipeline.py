"""Minimal pipeline: build a tiny random-weight llama, load it with mlx-lm, generate.

A placeholder for the full guarded-pipeline example. Runs offline: the model is built
on the fly into a temporary folder with the test suite's builder (tests/tiny_models.py).

    make demo            # or: HF_HUB_OFFLINE=1 .venv/bin/python examples/guarded_pipeline.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from tiny_models import build_tiny_model  # noqa: E402


def main() -> int:
    try:
        import mlx_lm
    except ImportError:
        print("this example needs MLX and mlx-lm: pip install -e '.[lm]'", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="metal-guard-demo-") as tmp:
        path = build_tiny_model(os.path.join(tmp, "tiny-llama"), "llama")
        model, tokenizer = mlx_lm.load(path)[:2]
        start = time.perf_counter()
        text = mlx_lm.generate(model, tokenizer, prompt="hello", max_tokens=16)
        elapsed = time.perf_counter() - start
    print(f"generated 16 tokens in {elapsed * 1000:.0f} ms: {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
