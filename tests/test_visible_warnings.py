"""Advisories people see without configuring logging: ``MetalGuardWarning`` (SPEC-3 §3.4).

The known-panic advisory, the startup audit's critical findings and critical version
advisories go through ``warnings.warn`` besides the log; Python's default filter shows
each once per place. The README's Quick start runs as pasted (the tiny local model stands
in for the 4 B model it names).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import metal_guard as mg
from helpers import child_env, requires_mlx_lm, run_python, warnings_from

GEMMA = "mlx-community/gemma-4-31b-it-8bit"
README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_warning_class_is_public_and_a_user_warning() -> None:
    assert "MetalGuardWarning" in mg.__all__
    assert issubclass(mg.MetalGuardWarning, UserWarning)


def test_known_panic_model_warns_on_stderr_without_logging_configured() -> None:
    out = run_python(f"import metal_guard as mg; mg.warn_if_known_panic_model({GEMMA!r})")
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert out.stderr.count("MetalGuardWarning") == 1
    first = out.stderr.splitlines()[0]
    assert first.startswith("<string>:1: MetalGuardWarning: 'mlx-community/gemma-4-31b-it-8bit'")
    assert "is in KNOWN_PANIC_MODELS" in first and "prepare count underflow" in first


def test_the_same_place_in_a_loop_warns_once_and_another_model_warns_again() -> None:
    code = (
        "import metal_guard as mg\n"
        "for _ in range(2):\n"
        f"    print(mg.warn_if_known_panic_model({GEMMA!r}))\n"
        "print(mg.warn_if_known_panic_model('mlx-community/Qwen3.6-35B-A3B-4bit'))\n"
        "print(mg.warn_if_known_panic_model('mlx-community/Qwen3-4B-4bit'))\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True", "False"]
    lines = [line for line in out.stderr.splitlines() if "MetalGuardWarning" in line]
    assert len(lines) == 2
    assert lines[0].startswith("<string>:3: MetalGuardWarning: 'mlx-community/gemma-4-31b-it-8bit'")
    assert lines[1].startswith(
        "<string>:4: MetalGuardWarning: 'mlx-community/Qwen3.6-35B-A3B-4bit'"
    )


def test_the_warning_points_at_the_caller_and_the_log_record_stays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    visible = pytest.warns(mg.MetalGuardWarning, match="is in KNOWN_PANIC_MODELS")
    with caplog.at_level(logging.WARNING, logger="metal_guard"), visible as record:
        assert mg.warn_if_known_panic_model(GEMMA) is True
    (warning,) = record.list
    assert warning.filename == __file__
    (logged,) = warnings_from(caplog, "KNOWN_PANIC_MODELS")
    assert logged.getMessage() == "metal_guard: " + str(warning.message)


def test_the_warning_can_be_silenced_by_its_class(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", mg.MetalGuardWarning)
        with caplog.at_level(logging.WARNING, logger="metal_guard"):
            assert mg.warn_if_known_panic_model(GEMMA) is True
    assert seen == []
    assert len(warnings_from(caplog, "KNOWN_PANIC_MODELS")) == 1  # the log record is still there


def test_importing_the_library_does_not_import_warnings() -> None:
    out = run_python("import sys, metal_guard; print('warnings' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_critical_version_advisory_warns_at_startup_audit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Versions faked through package metadata; mlx 0.31.2 has one critical advisory (mlx#3450)."""
    monkeypatch.setattr(mg, "_installed_version", {"mlx": "0.31.2"}.get)
    visible = pytest.warns(mg.MetalGuardWarning)
    with caplog.at_level(logging.WARNING, logger="metal_guard"), visible as record:
        result = mg.log_system_audit_at_startup()
    assert [a["issue"] for a in result["critical_advisories"]] == ["ml-explore/mlx#3450"]
    messages = [str(w.message) for w in record.list if w.category is mg.MetalGuardWarning]
    assert messages == [
        "critical advisory ml-explore/mlx#3450 for mlx 0.31.2: MLX 0.31.2: mx.clear_cache() can "
        "crash the process with SIGSEGV (regression). Use another MLX release (0.31.1, or a later "
        "release with the fix). (https://github.com/ml-explore/mlx/issues/3450)"
    ]
    assert {w.filename for w in record.list} == {__file__}
    logged = [r.getMessage() for r in warnings_from(caplog, "critical advisory")]
    assert logged == ["metal_guard: " + messages[0]]
    # high-severity ones (mlx#3350, mlx#3390 also apply to 0.31.2) are not startup warnings
    assert not any("3350" in m or "3390" in m for m in messages)


def test_no_critical_advisory_no_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mg, "_installed_version", {"mlx": "0.32.0", "mlx-lm": "0.31.2"}.get)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = mg.log_system_audit_at_startup()
    assert result["critical_advisories"] == []
    assert [w for w in seen if w.category is mg.MetalGuardWarning] == []


def test_fast_synch_warns_visibly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mg, "_installed_version", lambda name: None)
    monkeypatch.setenv("MLX_METAL_FAST_SYNCH", "1")
    with pytest.warns(mg.MetalGuardWarning, match=r"MLX_METAL_FAST_SYNCH=1 is set") as record:
        mg.log_system_audit_at_startup()
    assert "ml-explore/mlx#3830" in str(record.list[0].message)


# -- the README's Quick start ---------------------------------------------------------------


def quick_start_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_quick_start_has_one_block_that_names_a_model() -> None:
    (block,) = quick_start_blocks()
    assert block.count('MODEL = "mlx-community/Qwen3-4B-4bit"\n') == 1


@requires_mlx_lm
def test_the_quick_start_runs_as_pasted(tiny_llama_path: str, mg_home: str, tmp_path: Path) -> None:
    """The block verbatim, except the model: the tiny local llama stands in for the 4 B model."""
    (block,) = quick_start_blocks()
    script = tmp_path / "worker.py"
    script.write_text(
        block.replace('MODEL = "mlx-community/Qwen3-4B-4bit"', f"MODEL = {tiny_llama_path!r}"),
        encoding="utf-8",
    )
    env = child_env(METALGUARD_HOME=mg_home, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # the generated text and the streamed text
    # its load was recorded: a second run right away is refused by cadence with exit 2
    again = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert again.returncode == 2, again.stderr
    assert (
        again.stderr.startswith("Cadence violation: ") and "before loading it again" in again.stderr
    )
