"""Model identity section: canonical ids and gemma-4 family detection."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

import pytest

import metal_guard as mg

GEMMA4 = [
    "mlx-community/gemma-4-31b-it-8bit",
    "mlx-community/gemma-4-31b-it-4bit",
    "mlx-community/gemma-4-26b-a4b-it-4bit",
    "mlx-community/gemma-4-E4B-it-4bit",
    "mlx-community/gemma-4-e2b-it-bf16",
    "mlx-community/gemma-4-12B-mxfp4",
    "unsloth/gemma-4-31B-it-qat-4bit",
    "mlx-models/gemma-4-31b-it",
    "google/gemma-4-31B-it",
    "google/gemma-4-31b",
    "google/gemma-4-E2B",
    "lmstudio-community/gemma-4-26B-A4B-it-MLX-8bit",
    "someone-new/gemma-4-12b-it-qat-q4_0",
    "MLX-Community/GEMMA-4-31B-IT-8BIT",
    "gemma-4-31b-it-8bit",
    "gemma-4-31b",
    "gemma-4-12b-it",
    "Gemma-4-E4B-It",
    "  mlx-community/gemma-4-31b-it-8bit  ",
    "/Users/me/models/gemma-4-31b-it-8bit",
    "/Users/me/models/gemma-4-31b-it-8bit/",
    "./gemma-4-e4b-it-4bit",
    "~/mlx/gemma-4-26b-a4b-it-4bit",
    "/Users/me/.cache/huggingface/hub/models--mlx-community--gemma-4-31b-it-8bit/snapshots/abc123",
    "/hub/models--google--gemma-4-31B-it",
    "models--unsloth--gemma-4-E4B-it-bf16/snapshots/0f1e2d",
    "C:\\models\\gemma-4-12b-it",
    "gemma-4-1000b-it",
]

NOT_GEMMA4 = [
    "gemma-4b-it",
    "google/gemma-4b-it",
    "mlx-community/gemma-3-27b-it-4bit",
    "google/gemma-3-4b-it",
    "mlx-community/gemma-5-31b-it",
    "gemma-2-27b-4-bit",
    "mlx-community/gemma-2-9b-it-4bit",
    "DiffusionGemma",
    "google/codegemma-7b",
    "mlx-community/recurrentgemma-9b",
    "mlx-community/gemma-4",
    "gemma-4-",
    "gemma-4-it",
    "gemma-4-31",
    "gemma-4-e4",
    "gemma-4-31bit",
    "mlx-community/Qwen3-Coder-30B-A3B-Instruct-8bit",
    "mlx-community/Llama-3.2-3B-Instruct-4bit",
    "my-gemma-4-31b-it",
    "/models/gemma-4-31b-it/other-model",
    "",
    "   ",
    "x" * 10_000,
]


@pytest.mark.parametrize("model_id", GEMMA4)
def test_gemma4_family_members(model_id: str) -> None:
    assert mg.is_gemma4_family(model_id) is True


@pytest.mark.parametrize("model_id", NOT_GEMMA4)
def test_gemma4_family_near_misses(model_id: str) -> None:
    assert mg.is_gemma4_family(model_id) is False


def test_the_original_private_name_answers_the_same() -> None:
    assert mg._is_gemma4_family("google/gemma-4-31B-it") is True
    assert mg._is_gemma4_family("google/gemma-3-4b-it") is False


@pytest.mark.parametrize("junk", [None, 42, 3.5, b"gemma-4-31b", ["gemma-4-31b"], object()])
def test_junk_is_never_gemma4_and_never_raises(junk: object) -> None:
    assert mg.is_gemma4_family(junk) is False


def test_pathlike_ids() -> None:
    assert mg.is_gemma4_family(Path("/models/gemma-4-31b-it-8bit")) is True
    assert mg.is_gemma4_family(PurePosixPath("/models/gemma-3-27b-it")) is False


def _folder_with_config(root: Path, name: str, config: object) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "gemma4"},
        {"model_type": "gemma4_text"},
        {"model_type": "Gemma4_Unified"},
        {"model_type": "gemma4_vlm_wrapper", "text_config": {"model_type": "gemma4_text"}},
    ],
)
def test_config_model_type_decides_for_local_folders(tmp_path: Path, config: object) -> None:
    folder = _folder_with_config(tmp_path, "neutral-name", config)
    assert mg.is_gemma4_family(str(folder)) is True
    assert mg.is_gemma4_family(folder) is True


def test_config_beats_a_misleading_folder_name(tmp_path: Path) -> None:
    folder = _folder_with_config(tmp_path, "gemma-4-31b-it", {"model_type": "llama"})
    assert mg.is_gemma4_family(str(folder)) is False


@pytest.mark.parametrize("content", [b"{garbage", b"[1]", b"\xff\xfe", b'{"model_type": 7}'])
def test_unusable_config_falls_back_to_the_name(tmp_path: Path, content: bytes) -> None:
    for name, expected in (("gemma-4-e4b-it", True), ("neutral", False)):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_bytes(content)
        assert mg.is_gemma4_family(str(folder)) is expected


def test_oversized_config_is_not_read(tmp_path: Path) -> None:
    folder = tmp_path / "neutral"
    folder.mkdir()
    big = '{"model_type": "gemma4", "pad": "' + "x" * (2 << 20) + '"}'
    (folder / "config.json").write_text(big)
    assert mg.is_gemma4_family(str(folder)) is False


def test_config_as_a_directory_is_handled(tmp_path: Path) -> None:
    folder = tmp_path / "neutral"
    folder.mkdir()
    (folder / "config.json").mkdir()
    assert mg.is_gemma4_family(str(folder)) is False


def test_hf_snapshot_with_symlinked_config_is_read(tmp_path: Path) -> None:
    # The Hugging Face cache stores config.json as a symlink into blobs/.
    repo = tmp_path / "models--acme--neutral-name"
    blob = repo / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    blob.write_text('{"model_type": "gemma4_text"}')
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(os.path.relpath(blob, snapshot))
    assert mg.canonical_model_id(str(snapshot)) == "acme/neutral-name"
    assert mg.is_gemma4_family(str(snapshot)) is True


@pytest.mark.mlx_lm
def test_tiny_gemma4_model_under_a_neutral_name_is_detected(
    tiny_gemma4_path: str, tiny_llama_path: str, tmp_path: Path
) -> None:
    neutral = tmp_path / "worker-model"
    os.symlink(tiny_gemma4_path, neutral)
    assert mg.is_gemma4_family(str(neutral)) is True
    assert mg.is_gemma4_family(tiny_gemma4_path) is True
    assert mg.is_gemma4_family(tiny_llama_path) is False


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("mlx-community/gemma-4-31b-it-8bit", "mlx-community/gemma-4-31b-it-8bit"),
        ("  Org/Model \n", "Org/Model"),
        ("/m/models--mlx-community--Qwen3-8B-4bit/snapshots/abc", "mlx-community/Qwen3-8B-4bit"),
        ("/m/models--mlx-community--Qwen3-8B-4bit/snapshots/abc/", "mlx-community/Qwen3-8B-4bit"),
        ("/m/models--mlx-community--Qwen3-8B-4bit", "mlx-community/Qwen3-8B-4bit"),
        ("models--gpt2", "gpt2"),
        ("/local/folder/", "/local/folder"),
        ("/", "/"),
    ],
)
def test_canonical_model_id(raw: str, canonical: str) -> None:
    assert mg.canonical_model_id(raw) == canonical


def test_canonical_model_id_pathlike() -> None:
    assert mg.canonical_model_id(Path("/a/b")) == "/a/b"


@pytest.mark.parametrize("bad", [None, 42, b"org/model", ["org/model"], 1.5, True])
def test_canonical_model_id_rejects_wrong_types(bad: object) -> None:
    with pytest.raises(TypeError, match=r"model_id must be a str or os\.PathLike"):
        mg.canonical_model_id(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "   ", "\n\t", "x" * 5000])
def test_canonical_model_id_rejects_empty_or_huge(bad: str) -> None:
    with pytest.raises(ValueError, match="model_id"):
        mg.canonical_model_id(bad)
