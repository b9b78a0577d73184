"""The tiny-model builder produces folders that mlx-lm loads and runs offline."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from helpers import requires_mlx_lm
from tiny_models import EOS_ID, build_tokenizer, model_config

pytestmark = requires_mlx_lm

MAX_TOKENS = 16


def _count_generated(model: Any, tokenizer: Any, prompt: str, max_tokens: int) -> tuple[str, int]:
    import mlx_lm

    text = ""
    last = None
    for response in mlx_lm.stream_generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens):
        text += response.text
        last = response
    assert last is not None
    assert last.finish_reason == "length", last.finish_reason
    return text, int(last.generation_tokens)


@pytest.mark.parametrize("fixture", ["tiny_llama_path", "tiny_gemma4_path"])
def test_folder_has_the_files_mlx_lm_reads(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(path, name)), name
    # Tiny: about half a megabyte.
    assert os.path.getsize(os.path.join(path, "model.safetensors")) < 4 * 1024 * 1024


def test_config_model_types(tiny_llama_path: str, tiny_gemma4_path: str) -> None:
    with open(os.path.join(tiny_gemma4_path, "config.json"), encoding="utf-8") as f:
        gemma = json.load(f)
    with open(os.path.join(tiny_llama_path, "config.json"), encoding="utf-8") as f:
        llama = json.load(f)
    assert gemma["model_type"] == "gemma4_text"
    assert gemma["layer_types"][-1] == "full_attention"
    assert llama["model_type"] == "llama"


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma4"])
def test_generate_runs_to_max_tokens(fixture: str, request: pytest.FixtureRequest) -> None:
    import mlx_lm

    model, tokenizer = request.getfixturevalue(fixture)
    text = mlx_lm.generate(model, tokenizer, prompt="hello", max_tokens=MAX_TOKENS)
    assert isinstance(text, str) and text

    streamed, n = _count_generated(model, tokenizer, "hello", MAX_TOKENS)
    assert n == MAX_TOKENS
    # Greedy decoding is deterministic: the streamed text matches generate()'s.
    assert streamed == text


@pytest.mark.parametrize("arch", ["llama", "gemma4_text"])
def test_load_is_offline_and_reproducible(arch: str, tmp_path: Any) -> None:
    """Same seed → same weights; a fresh load works with the hub switched off."""
    import mlx.core as mx
    import mlx_lm

    from tiny_models import build_tiny_model

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    a = build_tiny_model(tmp_path / "a", arch, seed=3)
    b = build_tiny_model(tmp_path / "b", arch, seed=3)
    wa = mx.load(os.path.join(a, "model.safetensors"))
    wb = mx.load(os.path.join(b, "model.safetensors"))
    assert isinstance(wa, dict) and isinstance(wb, dict)
    assert sorted(wa) == sorted(wb)
    assert all(mx.array_equal(wa[k], wb[k]).item() for k in wa)

    out_key = "lm_head.weight" if "lm_head.weight" in wa else "model.embed_tokens.weight"
    assert not mx.any(wa[out_key][EOS_ID]).item(), "the <eos> row must be zero"

    model, tokenizer = mlx_lm.load(a)[:2]
    _, n = _count_generated(model, tokenizer, "The quick brown fox", 24)
    assert n == 24


def test_tokenizer_specials(tmp_path: Any) -> None:
    from transformers import PreTrainedTokenizerFast

    vocab = build_tokenizer(str(tmp_path))
    assert 300 < vocab <= 512
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert tok.eos_token_id == EOS_ID
    assert tok.pad_token_id == 0
    ids = tok.encode("hello world", add_special_tokens=False)
    assert tok.decode(ids) == "hello world"


def test_model_config_rejects_unknown_arch() -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        model_config("mamba", vocab_size=512)
