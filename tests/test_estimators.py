"""Section 3.7: ``ModelDims``, ``KNOWN_MODELS``, ``lookup_dims`` and the prefill estimators.

The formulas are the original metal-guard's; the expected values here are computed
independently from the formula as written in the reference (and the largest contexts
under the 5 GB ceiling it lists).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import run_python

DIMS = {
    "gemma-4-26b-a4b-it-4bit": (62, 16, 16, 256),
    "gemma-4-e2b-it-4bit": (30, 8, 4, 256),
    "gemma-4-e4b-it-4bit": (34, 16, 8, 256),
    "gemma-4-31b-it-8bit": (48, 32, 16, 256),
    "Mistral-Small-3.2-24B": (56, 32, 8, 128),
    "pixtral-12b-4bit": (40, 32, 8, 128),
    "Hermes-3-Llama-3.1-8B-4bit": (32, 32, 8, 128),
    "LFM2-VL-3B-4bit": (24, 16, 16, 128),
}


def reference_peak(ctx: int, layers: int, heads: int, kv: int, head_dim: int, dtype: int) -> float:
    return max(heads * ctx**2 * dtype, 2 * layers * kv * ctx * head_dim * dtype) / 1e9


# -- ModelDims and KNOWN_MODELS ---------------------------------------------------------------


def test_model_dims_is_a_frozen_dataclass_with_the_original_fields() -> None:
    dims = mg.ModelDims(32, 32, 8, 128)
    assert [f.name for f in dataclasses.fields(mg.ModelDims)] == [
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "dtype_bytes",
    ]
    assert dims.dtype_bytes == 2
    assert dims == mg.ModelDims(n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, dtype_bytes=2)
    assert hash(dims) == hash(mg.ModelDims(32, 32, 8, 128))
    with pytest.raises(dataclasses.FrozenInstanceError):
        dims.n_layers = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(dims)) == dims


def test_known_models_table() -> None:
    table = mg.KNOWN_MODELS
    assert list(table) == list(DIMS)
    for name, (layers, heads, kv, head_dim) in DIMS.items():
        assert table[name] == mg.ModelDims(layers, heads, kv, head_dim, 2)
        with pytest.raises(dataclasses.FrozenInstanceError):
            table[name].head_dim = 1  # type: ignore[misc]
    assert mg.KNOWN_MODELS is table  # built once, then an ordinary module attribute
    assert "KNOWN_MODELS" in vars(mg)


def test_known_models_is_built_on_first_access_only() -> None:
    code = (
        "import sys, metal_guard as mg\n"
        "print('KNOWN_MODELS' in vars(mg), 'dataclasses' in sys.modules)\n"
        "from metal_guard import KNOWN_MODELS\n"
        "print('KNOWN_MODELS' in vars(mg), len(KNOWN_MODELS), mg.KNOWN_MODELS is KNOWN_MODELS)\n"
        "print(hasattr(mg, 'NO_SUCH_NAME'))\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["False False", "True 8 True", "False"]


def test_known_models_is_extensible(monkeypatch: pytest.MonkeyPatch) -> None:
    custom = mg.ModelDims(10, 10, 2, 64)
    monkeypatch.setitem(mg.KNOWN_MODELS, "my-model-7b", custom)
    assert mg.lookup_dims("org/my-model-7b") is custom
    assert mg.describe_prefill_plan(context_tokens=1000, model_id="org/my-model-7b")["dims_known"]


# -- lookup_dims ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "key"),
    [
        ("mlx-community/gemma-4-e2b-it-4bit", "gemma-4-e2b-it-4bit"),  # exact name
        ("gemma-4-26b-a4b-it-4bit", "gemma-4-26b-a4b-it-4bit"),
        ("mlx-community/Mistral-Small-3.2-24B-Instruct-2506-4bit", "Mistral-Small-3.2-24B"),
        ("NousResearch/Hermes-3-Llama-3.1-8B-4bit", "Hermes-3-Llama-3.1-8B-4bit"),
        # beyond the original: the same model under another quantisation or case
        ("mlx-community/gemma-4-31b-it-4bit", "gemma-4-31b-it-8bit"),
        ("mlx-community/gemma-4-31b-it-bf16", "gemma-4-31b-it-8bit"),
        ("MLX-COMMUNITY/GEMMA-4-E4B-IT-8BIT", "gemma-4-e4b-it-4bit"),
        ("mlx-community/mistral-small-3.2-24b-instruct-2506-8bit", "Mistral-Small-3.2-24B"),
        ("/cache/models--mlx-community--pixtral-12b-4bit/snapshots/abc", "pixtral-12b-4bit"),
    ],
)
def test_lookup_by_name(model_id: str, key: str) -> None:
    assert mg.lookup_dims(model_id) == mg.KNOWN_MODELS[key]


@pytest.mark.parametrize(
    "model_id", ["org/unknown-7b", "gemma-4-12b-it", "llama", None, 42, "", "   ", b"gemma"]
)
def test_lookup_unknown_or_junk_is_none(model_id: Any) -> None:
    assert mg.lookup_dims(model_id) is None


def _write_config(folder: Path, config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_lookup_from_a_local_config(tmp_path: Path) -> None:
    llama = _write_config(
        tmp_path / "some-llama",
        {
            "model_type": "llama",
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "hidden_size": 2048,
            "torch_dtype": "bfloat16",
        },
    )
    assert mg.lookup_dims(llama) == mg.ModelDims(16, 32, 8, 64, 2)  # head_dim = 2048 / 32
    assert mg.lookup_dims(str(llama) + "/") == mg.ModelDims(16, 32, 8, 64, 2)


def test_lookup_from_a_vlm_config_and_dtypes(tmp_path: Path) -> None:
    vlm = _write_config(
        tmp_path / "vlm",
        {
            "model_type": "gemma4",
            "vision_config": {"num_hidden_layers": 27, "num_attention_heads": 16},
            "text_config": {
                "num_hidden_layers": 30,
                "num_attention_heads": 8,
                "num_key_value_heads": 1,
                "head_dim": 256,
            },
        },
    )
    assert mg.lookup_dims(vlm) == mg.ModelDims(30, 8, 1, 256, 2)
    f32 = _write_config(
        tmp_path / "f32",
        {
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "head_dim": 16,
            "torch_dtype": "float32",
        },
    )
    assert mg.lookup_dims(f32) == mg.ModelDims(2, 4, 4, 16, 4)  # no kv heads: MHA


def test_a_config_wins_over_the_name_and_a_bad_config_falls_back(tmp_path: Path) -> None:
    named = _write_config(
        tmp_path / "gemma-4-e2b-it-4bit",
        {"num_hidden_layers": 3, "num_attention_heads": 2, "head_dim": 8},
    )
    assert mg.lookup_dims(named) == mg.ModelDims(3, 2, 2, 8, 2)
    broken = tmp_path / "pixtral-12b-4bit"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert mg.lookup_dims(broken) == mg.KNOWN_MODELS["pixtral-12b-4bit"]
    partial = _write_config(tmp_path / "LFM2-VL-3B-4bit", {"num_hidden_layers": 3})
    assert mg.lookup_dims(partial) == mg.KNOWN_MODELS["LFM2-VL-3B-4bit"]
    bogus = _write_config(
        tmp_path / "x", {"num_hidden_layers": True, "num_attention_heads": -4, "head_dim": "8"}
    )
    assert mg.lookup_dims(bogus) is None
    assert mg.lookup_dims(_write_config(tmp_path / "list", [1, 2])) is None


@pytest.mark.mlx_lm
def test_lookup_from_the_tiny_models_real_config(tiny_llama_path: str) -> None:
    config = json.loads((Path(tiny_llama_path) / "config.json").read_text())
    dims = mg.lookup_dims(tiny_llama_path)
    assert dims == mg.ModelDims(
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
        2,
    )
    assert dims == mg.ModelDims(2, 4, 2, 16, 2)


# -- estimate_prefill_peak_alloc_gb ------------------------------------------------------------

CONTEXTS = [0, 1, 512, 4096, 4922, 4923, 8192, 32768, 131072]


@pytest.mark.parametrize("name", list(DIMS))
@pytest.mark.parametrize("ctx", CONTEXTS)
def test_estimate_matches_the_formula(name: str, ctx: int) -> None:
    got = mg.estimate_prefill_peak_alloc_gb(context_tokens=ctx, dims=mg.KNOWN_MODELS[name])
    assert got == pytest.approx(reference_peak(ctx, *DIMS[name], 2), rel=1e-12, abs=0)


@pytest.mark.parametrize(
    ("names", "largest"),
    [
        (["gemma-4-26b-a4b-it-4bit"], 4922),
        (["gemma-4-31b-it-8bit"], 6357),
        (["Mistral-Small-3.2-24B", "pixtral-12b-4bit", "Hermes-3-Llama-3.1-8B-4bit"], 8838),
        (["gemma-4-e4b-it-4bit", "LFM2-VL-3B-4bit"], 12500),
        (["gemma-4-e2b-it-4bit"], 17677),
    ],
)
def test_largest_context_under_the_5_gb_ceiling(names: list[str], largest: int) -> None:
    for name in names:
        dims = mg.KNOWN_MODELS[name]
        assert mg.estimate_prefill_peak_alloc_gb(context_tokens=largest, dims=dims) <= 5.0
        assert mg.estimate_prefill_peak_alloc_gb(context_tokens=largest + 1, dims=dims) > 5.0


def test_at_128k_tokens_the_estimates_are_hundreds_of_gb() -> None:
    peaks = [
        mg.estimate_prefill_peak_alloc_gb(context_tokens=131072, dims=d)
        for d in mg.KNOWN_MODELS.values()
    ]
    assert min(peaks) > 270 and max(peaks) < 1110


def test_dtype_scales_the_estimate() -> None:
    half = mg.ModelDims(8, 8, 8, 64, 2)
    full = mg.ModelDims(8, 8, 8, 64, 4)
    one = mg.estimate_prefill_peak_alloc_gb(context_tokens=1000, dims=half)
    assert mg.estimate_prefill_peak_alloc_gb(context_tokens=1000, dims=full) == 2 * one


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"context_tokens": -1}, ValueError, "context_tokens must be >= 0"),
        ({"context_tokens": 1.5}, TypeError, "context_tokens must be an int"),
        ({"context_tokens": True}, TypeError, "context_tokens must be an int"),
        ({"context_tokens": "100"}, TypeError, "context_tokens must be an int"),
        ({"dims": (32, 32, 8, 128)}, TypeError, "dims must be a ModelDims"),
        ({"dims": None}, TypeError, "dims must be a ModelDims"),
    ],
)
def test_estimate_bad_input(kwargs: dict[str, Any], error: type, message: str) -> None:
    args: dict[str, Any] = {"context_tokens": 100, "dims": mg.KNOWN_MODELS["pixtral-12b-4bit"]}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        mg.estimate_prefill_peak_alloc_gb(**args)


# -- require_prefill_fit ---------------------------------------------------------------------

GEMMA26 = "gemma-4-26b-a4b-it-4bit"


def test_require_prefill_fit_passes_when_it_fits() -> None:
    dims = mg.KNOWN_MODELS[GEMMA26]
    assert mg.require_prefill_fit(context_tokens=4000, dims=dims, available_gb=40.0) is None
    # exactly at the headroom line passes: 4000 tokens ≈ 4.063 GB, 70 % of 5.805 GB
    peak = reference_peak(4000, *DIMS[GEMMA26], 2)
    mg.require_prefill_fit(context_tokens=4000, dims=dims, available_gb=peak / 0.7 + 1e-9)


def test_require_prefill_fit_over_the_ceiling() -> None:
    dims = mg.KNOWN_MODELS[GEMMA26]
    with pytest.raises(mg.MetalOOMError) as info:
        mg.require_prefill_fit(context_tokens=8192, dims=dims, available_gb=500.0)
    message = str(info.value)
    assert "8192 tokens" in message and "8.32 GB" in message
    # the original's words (reference-surface, R4/R7: the message names the "single-alloc ceiling")
    assert message == (
        "Prefill of 8192 tokens needs an estimated 8.32 GB in one allocation, above the 5 GB "
        "single-alloc ceiling; prefill in chunks of at most "
        f"{mg.recommend_chunk_size(context_tokens=8192, dims=dims, single_alloc_ceiling_gb=5.0)} tokens"
    )
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == message
    with pytest.raises(mg.MetalOOMError):
        mg.require_prefill_fit(
            context_tokens=4000, dims=dims, available_gb=500.0, single_alloc_ceiling_gb=4.0
        )


def test_require_prefill_fit_over_the_available_memory() -> None:
    dims = mg.KNOWN_MODELS[GEMMA26]
    with pytest.raises(mg.MetalOOMError, match=r"only 3\.50 GB of the 5\.00 GB available"):
        mg.require_prefill_fit(context_tokens=4000, dims=dims, available_gb=5.0)
    mg.require_prefill_fit(context_tokens=4000, dims=dims, available_gb=5.0, headroom_pct=0.0)
    with pytest.raises(mg.MetalOOMError, match="no memory is available"):
        mg.require_prefill_fit(context_tokens=4000, dims=dims, available_gb=0.0)


def test_require_prefill_fit_refuses_when_memory_is_over_the_limit() -> None:
    """``MemoryStats.available_gb`` goes negative over the limit: that is a refusal
    (``MetalOOMError``, as the original metal-guard), not a caller error."""
    dims = mg.KNOWN_MODELS[GEMMA26]
    over = mg.MemoryStats(active_bytes=30 * 10**9, limit_bytes=28 * 10**9)
    assert over.available_gb == pytest.approx(-2.0)
    with pytest.raises(mg.MetalOOMError) as info:
        mg.require_prefill_fit(context_tokens=1000, dims=dims, available_gb=over.available_gb)
    message = str(info.value)
    assert "1000 tokens" in message and "no memory is available" in message
    assert "available_gb=-2.00" in message
    with pytest.raises(mg.MetalOOMError, match="no memory is available"):
        mg.require_prefill_fit(context_tokens=1, dims=dims, available_gb=-1e12)
    # a prefill of nothing needs nothing, even then
    assert mg.require_prefill_fit(context_tokens=0, dims=dims, available_gb=-2.0) is None
    # any finite number is a size: a large one is not a caller error
    assert mg.require_prefill_fit(context_tokens=1000, dims=dims, available_gb=1e7) is None


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"available_gb": math.nan}, ValueError),
        ({"available_gb": math.inf}, ValueError),
        ({"available_gb": -math.inf}, ValueError),
        ({"available_gb": True}, TypeError),
        ({"available_gb": "8"}, TypeError),
        ({"single_alloc_ceiling_gb": 0}, ValueError),
        ({"single_alloc_ceiling_gb": math.inf}, ValueError),
        ({"headroom_pct": 1.0}, ValueError),
        ({"headroom_pct": -0.1}, ValueError),
        ({"headroom_pct": None}, TypeError),
    ],
)
def test_require_prefill_fit_bad_input(kwargs: dict[str, Any], error: type) -> None:
    args: dict[str, Any] = {
        "context_tokens": 100,
        "dims": mg.KNOWN_MODELS[GEMMA26],
        "available_gb": 10.0,
    }
    args.update(kwargs)
    with pytest.raises(error):
        mg.require_prefill_fit(**args)


# -- recommend_chunk_size ------------------------------------------------------------------------


def largest_fitting(dims: mg.ModelDims, ctx: int, ceiling: float) -> int:
    return max(
        n
        for n in range(0, ctx + 1)
        if reference_peak(n, dims.n_layers, dims.n_heads, dims.n_kv_heads, dims.head_dim, 2)
        <= ceiling
    )


@pytest.mark.parametrize("name", list(DIMS))
@pytest.mark.parametrize(("ctx", "min_chunk"), [(32768, 512), (20000, 256), (9000, 1000)])
def test_recommend_chunk_size_is_within_min_chunk_of_the_largest_fit(
    name: str, ctx: int, min_chunk: int
) -> None:
    dims = mg.KNOWN_MODELS[name]
    chunk = mg.recommend_chunk_size(context_tokens=ctx, dims=dims, min_chunk=min_chunk)
    best = largest_fitting(dims, ctx, 4.0)
    if best == ctx:
        assert chunk == ctx
    else:
        assert best - min_chunk < chunk <= best


def test_recommend_chunk_size_edges() -> None:
    dims = mg.KNOWN_MODELS[GEMMA26]
    assert mg.recommend_chunk_size(context_tokens=1000, dims=dims) == 1000  # fits: whole
    assert mg.recommend_chunk_size(context_tokens=0, dims=dims) == 0
    huge = mg.ModelDims(1000, 64, 64, 512)  # even min_chunk does not fit
    assert mg.recommend_chunk_size(context_tokens=100_000, dims=huge) == 512
    assert mg.recommend_chunk_size(context_tokens=300, dims=huge) == 300  # never above the context
    with pytest.raises(ValueError, match="min_chunk must be >= 1"):
        mg.recommend_chunk_size(context_tokens=100, dims=dims, min_chunk=0)
    with pytest.raises(ValueError):
        mg.recommend_chunk_size(context_tokens=100, dims=dims, single_alloc_ceiling_gb=-1)


# -- describe_prefill_plan ------------------------------------------------------------------------

PLAN_KEYS = {
    "model_id",
    "context_tokens",
    "dims_known",
    "peak_alloc_gb",
    "fits_ceiling",
    "fits_headroom",
    "recommended_chunk_size",
    "advisory",
}


def test_plan_that_fits() -> None:
    plan = mg.describe_prefill_plan(context_tokens=2048, model_id="mlx-community/" + GEMMA26)
    assert set(plan) == PLAN_KEYS
    assert plan["dims_known"] is True and plan["context_tokens"] == 2048
    assert plan["peak_alloc_gb"] == round(reference_peak(2048, *DIMS[GEMMA26], 2), 3)
    assert plan["fits_ceiling"] is True and plan["fits_headroom"] is None
    assert plan["recommended_chunk_size"] is None and plan["advisory"] is None


def test_plan_over_the_ceiling_and_headroom() -> None:
    plan = mg.describe_prefill_plan(context_tokens=16384, model_id=GEMMA26, available_gb=20.0)
    assert plan["fits_ceiling"] is False and plan["fits_headroom"] is False
    chunk = mg.recommend_chunk_size(context_tokens=16384, dims=mg.KNOWN_MODELS[GEMMA26])
    assert plan["recommended_chunk_size"] == chunk
    assert f"chunks of {chunk} tokens" in plan["advisory"]
    tight = mg.describe_prefill_plan(context_tokens=4000, model_id=GEMMA26, available_gb=5.0)
    assert tight["fits_ceiling"] is True and tight["fits_headroom"] is False
    assert "70%" in tight["advisory"]
    roomy = mg.describe_prefill_plan(context_tokens=4000, model_id=GEMMA26, available_gb=64)
    assert roomy["fits_headroom"] is True and roomy["advisory"] is None


def test_plan_under_memory_pressure_keeps_the_estimate() -> None:
    """A negative ``available_gb`` (over the limit) is a plan that does not fit, not bad input."""
    over = mg.MemoryStats(active_bytes=30 * 10**9, limit_bytes=28 * 10**9)
    plan = mg.describe_prefill_plan(
        context_tokens=2048, model_id=GEMMA26, available_gb=over.available_gb
    )
    assert plan["dims_known"] is True
    assert plan["peak_alloc_gb"] == round(reference_peak(2048, *DIMS[GEMMA26], 2), 3)
    assert plan["fits_ceiling"] is True and plan["fits_headroom"] is False
    assert "no memory is available" in plan["advisory"]
    assert "Cannot plan" not in plan["advisory"]
    over_ceiling = mg.describe_prefill_plan(context_tokens=16384, model_id=GEMMA26, available_gb=0)
    assert over_ceiling["fits_ceiling"] is False and over_ceiling["fits_headroom"] is False
    assert over_ceiling["recommended_chunk_size"] is not None
    for bad in (math.nan, math.inf, True, "8"):
        refused = mg.describe_prefill_plan(context_tokens=2048, model_id=GEMMA26, available_gb=bad)
        assert refused["advisory"].startswith("Cannot plan this prefill")


def test_plan_with_explicit_dims_wins_over_the_model_id() -> None:
    dims = mg.ModelDims(2, 2, 2, 8)
    plan = mg.describe_prefill_plan(context_tokens=100, model_id=GEMMA26, dims=dims)
    assert plan["peak_alloc_gb"] == round(reference_peak(100, 2, 2, 2, 8, 2), 3)
    assert plan["model_id"] == GEMMA26


def test_plan_for_an_unknown_model() -> None:
    plan = mg.describe_prefill_plan(context_tokens=4096, model_id="org/unknown-7b")
    assert plan["dims_known"] is False
    assert [plan[k] for k in ("peak_alloc_gb", "fits_ceiling", "fits_headroom")] == [None] * 3
    assert plan["recommended_chunk_size"] is None
    assert "Unknown dimensions" in plan["advisory"] and "org/unknown-7b" in plan["advisory"]
    assert mg.describe_prefill_plan(context_tokens=10)["dims_known"] is False


class Hostile:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __index__(self) -> int:
        raise RuntimeError("no index")


JUNK: list[Any] = [
    None,
    "x",
    "",
    -1,
    1.5,
    math.nan,
    math.inf,
    True,
    10**30,
    [],
    {},
    object(),
    Hostile(),
    mg.ModelDims("a", 1, 1, 1),  # type: ignore[arg-type]
    mg.ModelDims(-5, -5, -5, -5, -5),
]


@pytest.mark.parametrize("value", JUNK, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("param", ["context_tokens", "model_id", "dims", "available_gb"])
def test_plan_never_raises(param: str, value: Any) -> None:
    args: dict[str, Any] = {"context_tokens": 1000, "model_id": GEMMA26}
    args[param] = value
    plan = mg.describe_prefill_plan(**args)
    assert set(plan) == PLAN_KEYS
    json.dumps(plan)  # plain data, whatever came in
    if plan["dims_known"] is False:
        assert isinstance(plan["advisory"], str) and plan["advisory"]
