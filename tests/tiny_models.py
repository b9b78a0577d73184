"""Tiny random-weight models that ``mlx_lm.load`` reads offline.

Used by the test suite, the examples and the benchmarks. Nothing here downloads
anything: the weights come from mlx-lm's own model class for the config (so the
parameter names always match the installed mlx-lm), and the tokenizer is a
byte-level BPE trained on a small synthetic corpus with the ``tokenizers`` library.

Examples and benchmarks outside ``tests/`` can import it with::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import build_tiny_model

Needs ``mlx`` (``mlx[cpu]`` on Linux), ``mlx-lm`` and ``tokenizers`` (a dependency of
``transformers``, which mlx-lm requires). Set ``HF_HUB_OFFLINE=1`` before importing
mlx-lm, and always pass ``mlx_lm.load`` a folder that exists (a missing path is
treated as a hub id).
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = [
    "ARCHES",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "build_tiny_model",
    "build_tokenizer",
    "byte_level_tokenizer",
    "model_config",
    "save_tokenizer",
]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
ARCHES = ("llama", "gemma4_text")

_VOCAB_TARGET = 512

_WORDS = (  # noqa: SIM905  (a word list reads better as text)
    "hello world model metal guard memory cache stream buffer kernel panic load "
    "unload token generate prompt answer question apple silicon device tensor layer "
    "weight the a an of to in on for with and or but not is are was were be been it "
    "this that one two three four five six seven eight nine ten quick brown fox "
    "jumps over lazy dog red green blue yellow light dark small large fast slow "
    "early late first last next"
).split()


def _corpus(lines: int = 600) -> list[str]:
    """A deterministic synthetic corpus (no randomness from the process)."""
    out: list[str] = []
    n = len(_WORDS)
    for i in range(lines):
        k = 6 + (i % 9)
        words = [_WORDS[(i * 7 + j * 13 + (i * j) % 5) % n] for j in range(k)]
        sentence = " ".join(words)
        out.append(sentence.capitalize() + (". " if i % 3 else "? ") + str(i % 97))
    return out


def byte_level_tokenizer(tok: Any) -> Any:
    """``tok`` (a ``tokenizers.Tokenizer``) with the byte-level pre-tokenizer, decoder and
    post-processor every tokenizer here uses."""
    from tokenizers import decoders, pre_tokenizers, processors

    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def save_tokenizer(tok: Any, dest: str, *, model_max_length: int = 2048) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
    for ``transformers.PreTrainedTokenizerFast`` (the specials of ``SPECIAL_TOKENS``)."""
    tok.save(os.path.join(dest, "tokenizer.json"))
    specials = {
        "pad_token": "<pad>",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
    }
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **specials,
    }
    _write_json(os.path.join(dest, "tokenizer_config.json"), tok_config)
    _write_json(os.path.join(dest, "special_tokens_map.json"), specials)


def build_tokenizer(dest: str, *, vocab_size: int = _VOCAB_TARGET) -> int:
    """Train a byte-level BPE tokenizer into ``dest``; return its vocabulary size.

    Writes the files of ``save_tokenizer``. Specials: ``<pad>`` = 0, ``<bos>`` = 1,
    ``<eos>`` = 2, ``<unk>`` = 3.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = byte_level_tokenizer(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:  # pragma: no cover - trainer contract
            raise RuntimeError(f"special token {name!r} did not get id {i}")
    save_tokenizer(tok, dest)
    return int(tok.get_vocab_size())


def model_config(
    arch: str, *, vocab_size: int, hidden: int = 64, layers: int = 2
) -> dict[str, Any]:
    """The ``config.json`` content for a tiny model of ``arch``."""
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")
    if hidden < 16 or hidden % 16:
        raise ValueError(f"hidden must be a positive multiple of 16, got {hidden!r}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers!r}")
    heads = max(2, hidden // 16)
    common: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    if arch == "llama":
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            **common,
            "num_key_value_heads": max(1, heads // 2),
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
        }
    # gemma4_text: mlx_lm/models/gemma4_text.py. The defaults there describe a large
    # model (20 KV-shared layers, 262k vocab); everything below is set explicitly.
    # The last layer must be full attention.
    layer_types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    return {
        "model_type": "gemma4_text",
        "architectures": ["Gemma4ForCausalLM"],
        **common,
        "num_key_value_heads": 1,
        "num_global_key_value_heads": 1,
        "global_head_dim": 2 * (hidden // heads),
        "num_kv_shared_layers": 0,
        "vocab_size_per_layer_input": vocab_size,
        "hidden_size_per_layer_input": 16,
        "sliding_window": 64,
        "sliding_window_pattern": 2,
        "layer_types": layer_types,
        "final_logit_softcapping": 30.0,
        "use_double_wide_mlp": False,
        "enable_moe_block": False,
        "attention_k_eq_v": False,
        "tie_word_embeddings": True,
    }


def build_tiny_model(
    dest: str | os.PathLike[str],
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
) -> str:
    """Write a tiny random-weight ``arch`` model into folder ``dest``; return its path.

    ``arch`` is ``"llama"`` or ``"gemma4_text"``. The folder gets ``config.json``,
    ``model.safetensors`` and the tokenizer files, and loads with ``mlx_lm.load(dest)``
    offline. The ``<eos>`` row of the output projection is zeroed, so greedy decoding
    runs to ``max_tokens`` instead of stopping after a few random tokens.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    path = os.fspath(dest)
    os.makedirs(path, exist_ok=True)
    vocab = build_tokenizer(path)
    config = model_config(arch, vocab_size=vocab, hidden=hidden, layers=layers)

    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    weights: dict[str, Any] = dict(tree_flatten(model.parameters()))

    out_key = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    w = weights[out_key]
    weights[out_key] = mx.where(mx.arange(w.shape[0])[:, None] == EOS_ID, mx.zeros_like(w), w)
    mx.eval(weights)
    mx.save_safetensors(
        os.path.join(path, "model.safetensors"), weights, metadata={"format": "mlx"}
    )
    _write_json(os.path.join(path, "config.json"), config)
    return path


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
