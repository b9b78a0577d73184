"""The child hooks of ``metal-guard run`` (sections 5.12 and 5.13), in real processes.

Every guarded program runs under the real supervisor, ``python -m metal_guard run ...
-- COMMAND``, whose bootstrap calls ``metal_guard._child_bootstrap()`` in the child.
Real mlx-lm on the tiny local models; ``mlx_lm.server`` runs for real on a free port.
Faked, because Linux has no Metal: ``mx.device_info()``'s
``max_recommended_working_set_size`` (a spy in the user's own ``sitecustomize``, which
run chains, adds it, so mlx-lm asks for the recommended working set as on a Mac).
"""

from __future__ import annotations

import ast
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import breadcrumb_messages, child_env, free_port, requires_mlx_lm

# The user's own sitecustomize (run chains it before its bootstrap): a spy under
# mlx.core.set_wired_limit (what reaches MLX is written to MG_TEST_WIRED_SPY) and the
# Metal-only max_recommended_working_set_size (8 GiB) added to mx.device_info().
_SPY_SITECUSTOMIZE = """
import os, sys
_spy = os.environ.get("MG_TEST_WIRED_SPY")
if _spy:
    class _SpyLoader:
        def __init__(self, loader):
            self._loader = loader
        def create_module(self, spec):
            return self._loader.create_module(spec)
        def exec_module(self, module):
            self._loader.exec_module(module)
            real, info = module.set_wired_limit, module.device_info
            def set_wired_limit(limit):
                with open(_spy, "a") as f:
                    f.write(f"{int(limit)}\\n")
                return real(limit)
            module.set_wired_limit = set_wired_limit
            module.device_info = lambda: {**info(), "max_recommended_working_set_size": 8 << 30}
        def __getattr__(self, name):
            return getattr(self._loader, name)
    class _SpyFinder:
        def find_spec(self, name, path=None, target=None):
            if name != "mlx.core":
                return None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    spec.loader = _SpyLoader(spec.loader)
                    return spec
            return None
    sys.meta_path.insert(0, _SpyFinder())
"""

GIB8 = 8 << 30


RUN = [sys.executable, "-m", "metal_guard", "run"]


@pytest.fixture
def spy_dir(tmp_path: Path) -> str:
    folder = tmp_path / "user-site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(_SPY_SITECUSTOMIZE)
    return str(folder)


def run_env(*first: str, **extra: str) -> dict[str, str]:
    """The user's environment for ``metal-guard run`` (``first``: PYTHONPATH entries before ours)."""
    env = bare_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join([*first, env["PYTHONPATH"]])
    return env


def guarded(cmd: list[str], *options: str) -> list[str]:
    return [*RUN, *options, "--", *cmd]


def bare_env(**extra: str) -> dict[str, str]:
    return child_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)


def run_cmd(
    cmd: list[str], env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def metal_guard_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("metal-guard: ")]


@pytest.fixture(scope="session")
def tiny_llama2_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second tiny llama (other weights, other folder: another model id)."""
    from helpers import HAS_MLX_LM

    if not HAS_MLX_LM:
        pytest.skip("mlx-lm is not installed")
    from tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama2"), "llama", seed=1)


# -- a program that never imports MLX -------------------------------------------------

_MODULES = "import sys, signal; print(sorted(sys.modules)); print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)"


def test_program_without_mlx_is_unchanged(mg_home: str) -> None:
    done = run_cmd(guarded([sys.executable, "-c", _MODULES]), run_env())
    bare = run_cmd([sys.executable, "-c", _MODULES], bare_env())
    assert done.returncode == 0 and bare.returncode == 0, done.stderr
    g_mods, g_sig = done.stdout.splitlines()
    b_mods, b_sig = bare.stdout.splitlines()
    extra = set(ast.literal_eval(g_mods)) - set(ast.literal_eval(b_mods))
    bootstrap = {"metal_guard", "sitecustomize", "__future__", "errno", "warnings"}
    assert {m for m in extra if not m.startswith("importlib")} <= bootstrap, extra
    assert g_sig == b_sig == "True"
    # the child wrote nothing (what is there is the supervisor's pre-flight and registry)
    assert not {"breadcrumbs.log", "cadence.json", "gpu.lock"} & set(os.listdir(mg_home))
    assert done.stderr == ""


# -- wired policy ------------------------------------------------------------------------

_WIRED_PROGRAM = """
import mlx.core as mx
from mlx_lm.utils import maybe_set_recommended_wired_limit
maybe_set_recommended_wired_limit()
mx.set_wired_limit(1 << 30)
"""


HALF_GIB = 1 << 29


@requires_mlx_lm
@pytest.mark.parametrize(
    ("options", "wired_limit_env", "expected"),
    [
        (["--wired", "off"], None, [0, 0]),
        (["--wired", "keep"], None, [GIB8, 1 << 30]),
        ([], None, [0, 0]),  # run's default: off
        ([], "cap:0.5", [HALF_GIB, HALF_GIB]),  # no --wired: the user's variable decides
        (["--wired", "off"], "cap:0.5", [0, 0]),  # --wired wins over the variable
    ],
)
def test_wired_policy_reaches_mlx(
    spy_dir: str,
    mg_home: str,
    tmp_path: Path,
    options: list[str],
    wired_limit_env: str | None,
    expected: list[int],
) -> None:
    spy = tmp_path / "wired.txt"
    env = run_env(spy_dir, MG_TEST_WIRED_SPY=str(spy))
    if wired_limit_env is not None:
        env["METALGUARD_WIRED_LIMIT"] = wired_limit_env
    done = run_cmd(guarded([sys.executable, "-c", _WIRED_PROGRAM], *options), env)
    assert done.returncode == 0, done.stderr
    assert [int(x) for x in spy.read_text().split()] == expected


# -- loads: cadence that waits, refusal, failed loads ---------------------------------

_TWO_LOADS = """
import sys, time
from mlx_lm import load
t0 = time.time()
load(sys.argv[1])
t1 = time.time()
print("loaded first", flush=True)
load(sys.argv[2])
t2 = time.time()
print("loaded second", t1 - t0, t2 - t1, flush=True)
"""


@requires_mlx_lm
def test_second_load_too_soon_waits_then_loads(
    mg_home: str, tiny_llama_path: str, tiny_llama2_path: str
) -> None:
    env = run_env(METALGUARD_CROSS_MODEL_INTERVAL="4")
    done = run_cmd(
        guarded([sys.executable, "-c", _TWO_LOADS, tiny_llama_path, tiny_llama2_path]),
        env,
    )
    assert done.returncode == 0, done.stderr
    second = float(done.stdout.split()[-1])
    assert second >= 3.9, done.stdout  # the spacing of the cross-model interval
    lines = metal_guard_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("metal-guard: waiting "), done.stderr
    admits = [m for m in breadcrumb_messages(mg_home) if m.startswith("CADENCE_ADMIT")]
    assert len(admits) == 2


@requires_mlx_lm
def test_no_wait_refuses_with_exit_2_before_the_load(
    mg_home: str, tiny_llama_path: str, tiny_llama2_path: str
) -> None:
    env = run_env(METALGUARD_CROSS_MODEL_INTERVAL="60")
    done = run_cmd(
        guarded([sys.executable, "-c", _TWO_LOADS, tiny_llama_path, tiny_llama2_path], "--no-wait"),
        env,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout.splitlines() == ["loaded first"]
    lines = metal_guard_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("metal-guard: refused: "), done.stderr
    assert "Traceback" not in done.stderr
    store = json.loads((Path(mg_home) / "cadence.json").read_text())
    assert tiny_llama2_path not in store  # the refused load was never admitted


_FAILED_THEN_REAL = """
import sys, time
from mlx_lm import load
try:
    load(sys.argv[1])
except Exception as exc:
    print("failed:", type(exc).__name__, flush=True)
t0 = time.time()
load(sys.argv[2])
print("loaded", time.time() - t0, flush=True)
"""


@requires_mlx_lm
def test_load_failed_on_missing_files_does_not_delay_the_next(
    mg_home: str, tmp_path: Path, tiny_llama_path: str
) -> None:
    missing = tmp_path / "no-such-model"
    missing.mkdir()  # an empty folder: no config.json, no weights
    env = run_env(METALGUARD_CROSS_MODEL_INTERVAL="120")
    done = run_cmd(
        guarded([sys.executable, "-c", _FAILED_THEN_REAL, str(missing), tiny_llama_path]),
        env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("failed:"), done.stdout
    assert float(done.stdout.split()[-1]) < 60  # not the 120 s interval
    assert metal_guard_lines(done.stderr) == []
    crumbs = breadcrumb_messages(mg_home)
    assert any(m.startswith(f"CADENCE_UNCOUNTED: {missing} ") for m in crumbs), crumbs


_REPLACE = """
import gc, sys
from mlx_lm import load
model = load(sys.argv[1])
del model
gc.collect()
print("replaced", flush=True)
"""


@requires_mlx_lm
def test_unloads_recorded_on_replacement_and_at_exit(mg_home: str, tiny_llama_path: str) -> None:
    done = run_cmd(
        guarded([sys.executable, "-c", _REPLACE, tiny_llama_path]),
        run_env(),
    )
    assert done.returncode == 0, done.stderr
    assert f"RUN_UNLOAD: {tiny_llama_path}" in breadcrumb_messages(mg_home)
    store = json.loads((Path(mg_home) / "cadence.json").read_text())
    assert tiny_llama_path in store["__metal_guard__"]["unloads"]


# -- hooks missing in another mlx-lm shape --------------------------------------------


def test_missing_hook_target_is_named_once_and_skipped(mg_home: str, tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "mlx_lm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        '__version__ = "0.99.0"\nfrom .utils import load\nfrom .generate import generate\n'
    )
    (fake / "utils.py").write_text("def load(path):\n    return ('model', 'tokenizer')\n")
    (fake / "generate.py").write_text(
        "def generate(model, tokenizer, prompt):\n    return 'text'\n"
    )
    env = run_env(str(fake.parent))
    code = "import mlx_lm\nm, t = mlx_lm.load('some/model')\nprint(mlx_lm.generate(m, t, 'hi'))\n"
    done = run_cmd(guarded([sys.executable, "-c", code]), env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "text\n"
    lines = metal_guard_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(
        "metal-guard: mlx-lm 0.99.0: not hooked (not found in this version): "
    )
    assert "mlx_lm.generate.BatchGenerator._next" in lines[0]
    assert "mlx_lm.generate.stream_generate" in lines[0]
    assert "mlx_lm.utils.load," not in lines[0]  # found, so hooked
    assert "mlx_lm.utils.generate_step" not in lines[0]  # where mlx-lm < 0.23 had it
    assert "CADENCE_ADMIT: some/model" in breadcrumb_messages(mg_home)
    assert "SUBPROC_POST: some/model" in breadcrumb_messages(mg_home)


# -- two programs generating at once -------------------------------------------------

_GENERATOR = """
import os, sys, time
import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step, generation_stream
model, tok = load(sys.argv[1])
prompt = mx.array(tok.encode("the quick brown fox jumps over the lazy dog"))
out = open(sys.argv[3], "a")
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
for _ in range(3):
    steps = generate_step(prompt, model, max_tokens=60)
    while True:
        start = time.monotonic()
        try:
            next(steps)
        except StopIteration:
            break
        mx.synchronize(generation_stream)
        out.write(f"{os.getpid()} {start:.6f} {time.monotonic():.6f}\\n")
out.close()
"""


def _intervals(path: Path) -> list[tuple[int, float, float]]:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return sorted((int(p), float(s), float(e)) for p, s, e in rows)


def _overlaps(rows: list[tuple[int, float, float]]) -> int:
    by_start = sorted(rows, key=lambda r: r[1])
    count = 0
    for i, (pid, _start, end) in enumerate(by_start):
        for other, o_start, _ in by_start[i + 1 :]:
            if o_start >= end:
                break
            count += other != pid
    return count


def _run_pair(
    under_run: bool, env: dict[str, str], models: list[str], tmp: Path, log: Path
) -> None:
    go = tmp / "go"
    if go.exists():
        go.unlink()
    procs = [
        subprocess.Popen(
            (guarded if under_run else list)(
                [sys.executable, "-c", _GENERATOR, model, str(go), str(log)]
            ),
            stdin=subprocess.DEVNULL,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for model in models
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        go.touch()
        for proc in procs:
            proc.wait(timeout=300)
            assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def _handovers(rows: list[tuple[int, float, float]]) -> int:
    pids = [pid for pid, _, _ in sorted(rows, key=lambda r: r[1])]
    return sum(1 for a, b in itertools.pairwise(pids) if a != b)


@requires_mlx_lm
def test_two_guarded_programs_never_overlap_and_take_turns(
    mg_home: str, tmp_path: Path, tiny_llama_path: str, tiny_llama2_path: str
) -> None:
    gate_log, own_log = tmp_path / "gate.log", tmp_path / "own.log"
    env = run_env(METALGUARD_RUN_GATE_LOG=str(gate_log))
    _run_pair(True, env, [tiny_llama_path, tiny_llama2_path], tmp_path, own_log)
    passes = _intervals(own_log)  # each program's own log: every step ran (waits included)
    assert len(passes) == 2 * 3 * 60 and len({pid for pid, _, _ in passes}) == 2
    # the gate's log: one line per turn, from taking the gate to releasing it after the
    # streams were synchronized, so every forward pass was evaluated inside its turn
    turns = _intervals(gate_log)
    assert len({pid for pid, _, _ in turns}) == 2
    assert _overlaps(turns) == 0
    assert _handovers(turns) >= 10, "the GPU changed hands only a few times"

    # the same programs, bare: their forward passes do overlap (so the check above can fail)
    bare_log = tmp_path / "bare.log"
    _run_pair(False, bare_env(), [tiny_llama_path, tiny_llama2_path], tmp_path, bare_log)
    assert _overlaps(_intervals(bare_log)) > 0


# -- a real mlx_lm.server ----------------------------------------------------------------


def _get(url: str, timeout: float = 5) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return int(reply.status)
    except (urllib.error.URLError, OSError):
        return 0


def _complete(port: int, results: list[Any], max_tokens: int = 8) -> None:
    body = json.dumps({"prompt": "hello there", "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            results.append((reply.status, json.loads(reply.read())))
    except Exception as exc:  # recorded; the test asserts on it
        results.append((0, repr(exc)))


@contextlib.contextmanager
def _guarded_server(
    spy_dir: str, tmp_path: Path, model: str, spelling: tuple[str, ...] = ("mlx_lm", "server")
) -> Iterator[dict[str, Any]]:
    """``run -- python -m <spelling> --model <model> --port P``, up and answering /health."""
    port = free_port()
    spy = tmp_path / "wired.txt"
    env = run_env(
        spy_dir, MG_TEST_WIRED_SPY=str(spy), METALGUARD_RUN_GATE_LOG=str(tmp_path / "gate.log")
    )
    server = [sys.executable, "-m", *spelling, "--model", model]
    proc = subprocess.Popen(
        guarded([*server, "--port", str(port)], "--grace", "30"),
        stdin=subprocess.DEVNULL,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    info = {"proc": proc, "port": port, "spy": spy, "gate_log": tmp_path / "gate.log"}
    info["model"] = model
    try:
        deadline = time.monotonic() + 120
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the server never answered /health"
            time.sleep(0.3)
        (entry,) = mg._read_runs()
        info["pid"] = entry["pid"]  # the server (run's child)
        yield info
    finally:
        if proc.poll() is None:  # a failed test: stop run and its server, never leave them
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=30)


@pytest.fixture
def server(
    spy_dir: str, mg_home: str, tmp_path: Path, tiny_llama_path: str
) -> Iterator[dict[str, Any]]:
    with _guarded_server(spy_dir, tmp_path, tiny_llama_path) as info:
        yield info


@requires_mlx_lm
def test_guarded_server_serves_flushes_and_stops_on_sigterm(
    server: dict[str, Any], mg_home: str
) -> None:
    proc, port, pid = server["proc"], server["port"], server["pid"]
    results: list[Any] = []
    threads = [threading.Thread(target=_complete, args=(port, results)) for _ in range(4)]
    asked = time.monotonic()  # CLOCK_MONOTONIC: the same clock as the server's gate log
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert [status for status, _ in results] == [200] * 4, results
    assert all(reply["usage"]["completion_tokens"] > 0 for _, reply in results)

    crumbs = breadcrumb_messages(mg_home, pid=pid)
    assert sum(m.startswith("SUBPROC_PRE: ") for m in crumbs) >= 4, crumbs
    assert sum(m.startswith("SUBPROC_POST: ") for m in crumbs) >= 4, crumbs
    # the server's own start-up request for the recommended working set reached MLX as 0
    wired = [int(x) for x in server["spy"].read_text().split()]
    assert wired and set(wired) == {0}, wired
    # an idle server holds no turn: the loop lets its kept turn go when it waits for a
    # request, which may come just after the last reply reached its client
    deadline = time.monotonic() + 10
    while mg.read_gpu_gate() is not None:
        assert time.monotonic() < deadline, mg.read_gpu_gate()
        time.sleep(0.05)
    idle = time.monotonic()
    # its batch steps ran under the gate, in turns taken for these requests and given back
    # once they were answered: never one turn for the server's lifetime (a turn is logged
    # before its release)
    turns = _intervals(server["gate_log"])
    assert turns and all(asked <= start <= end <= idle for _, start, end in turns), turns

    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # to run, which passes it on
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30  # within the grace: no SIGKILL
    assert proc.returncode == 0, err  # the server's own shutdown ran, as after Ctrl-C
    assert "Traceback" not in err and "SIGKILL" not in err
    assert not mg._pid_alive(pid)
    assert f"RUN_UNLOAD: {server['model']}" in breadcrumb_messages(mg_home, pid=pid)


@requires_mlx_lm
def test_the_deprecated_module_spelling_gets_the_server_loop_hooks_too(
    spy_dir: str, mg_home: str, tmp_path: Path, tiny_llama_path: str
) -> None:
    # ``python -m mlx_lm.server`` runs server.py as __main__ (runpy, not an import): its
    # ResponseGenerator is hooked as the class statement ends, before the module starts serving
    with _guarded_server(spy_dir, tmp_path, tiny_llama_path, ("mlx_lm.server",)) as server:
        results: list[Any] = []
        _complete(server["port"], results, max_tokens=16)
        ((status, reply),) = results
        assert status == 200, reply
        deadline = time.monotonic() + 10
        while mg.read_gpu_gate() is not None:  # the loop let its kept turn go to wait
            assert time.monotonic() < deadline, mg.read_gpu_gate()
            time.sleep(0.05)
        turns = _intervals(server["gate_log"])
        # the loop kept its turn across its steps (the generation-thread hook): fewer turns
        # than generated tokens; with one turn per step there would be one per token at least
        assert 0 < len(turns) < reply["usage"]["completion_tokens"], (turns, reply["usage"])
        proc = server["proc"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "not hooked" not in err and "Traceback" not in err, err
    assert "deprecated" in out  # the module's own notice: the program behaves like itself


_DYING_SERVER = """
import sys
from mlx_lm.server import main
g = sys.modules["mlx_lm.generate"]  # the attribute mlx_lm.generate is the function

def out_of_memory(*args, **kwargs):
    raise RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory "
                       "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")

g.PromptProcessingBatch.prompt = out_of_memory  # Metal's OOM cannot happen on Linux: raised here
g.GenerationBatch._step = out_of_memory
sys.argv = ["mlx_lm.server", "--model", sys.argv[1], "--port", sys.argv[2]]
main()
"""


@requires_mlx_lm
def test_generation_thread_death_ends_the_server_with_70(
    mg_home: str, tiny_llama_path: str
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        guarded([sys.executable, "-c", _DYING_SERVER, tiny_llama_path, str(port)]),
        stdin=subprocess.DEVNULL,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.3)
        (entry,) = mg._read_runs()
        results: list[Any] = []
        _complete(port, results)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 70, err  # the child's code, passed through by run
    line = [x for x in metal_guard_lines(err) if "generation thread died" in x]
    assert len(line) == 1 and line[0].endswith("exiting with 70"), err
    crumbs = breadcrumb_messages(mg_home, pid=entry["pid"])
    assert any(m.startswith("RUN_GENERATION_DEAD: ") for m in crumbs)
    assert f"RUN_UNLOAD: {tiny_llama_path}" in crumbs


_ENDLESS = """
import sys
import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
model, tok = load(sys.argv[1])
prompt = mx.array(tok.encode("hello"))
print("generating", flush=True)
try:
    while True:
        for _ in generate_step(prompt, model, max_tokens=50):
            pass
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@requires_mlx_lm
def test_sigterm_is_ctrl_c_between_gated_steps_and_leaves_the_gate_free(
    mg_home: str, tiny_llama_path: str
) -> None:
    proc = subprocess.Popen(
        guarded([sys.executable, "-c", _ENDLESS, tiny_llama_path]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=run_env(),
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "generating\n"
        time.sleep(1.0)  # inside the loop of gated steps
        proc.send_signal(signal.SIGTERM)  # to run, which passes it on
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert out == "interrupted\n", err  # the program's own handler of Ctrl-C ran
    assert proc.returncode == 0, err
    assert mg.read_gpu_gate() is None  # never left held
    assert any(m.startswith("RUN_UNLOAD: ") for m in breadcrumb_messages(mg_home))


_GEMMA = """
import sys
from mlx_lm import generate, load
model, tok = load(sys.argv[1])
for _ in range(2):
    generate(model, tok, "hello", max_tokens=4)
"""


@requires_mlx_lm
def test_gemma4_first_generate_gets_the_settle_flush_once(
    mg_home: str, tiny_gemma4_path: str
) -> None:
    done = run_cmd(
        guarded([sys.executable, "-c", _GEMMA, tiny_gemma4_path]),
        run_env(METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC="0"),
    )
    assert done.returncode == 0, done.stderr
    crumbs = breadcrumb_messages(mg_home)
    assert crumbs.count(f"GEMMA4_FLUSH: {tiny_gemma4_path}") == 1, crumbs
    assert crumbs.count(f"GEMMA4_FLUSH_DONE: {tiny_gemma4_path}") == 1
    first = crumbs.index(f"GEMMA4_FLUSH_DONE: {tiny_gemma4_path}")
    assert crumbs[first + 1] == f"SUBPROC_PRE: {tiny_gemma4_path}"  # before the first generate
    assert crumbs.count(f"SUBPROC_POST: {tiny_gemma4_path}") == 2  # one per request


# -- stuck GPU work ----------------------------------------------------------------------

# A program whose forward pass never returns (a stand-in for a GPU wedge: a real one
# spins in Metal's fence_wait, which Linux cannot reproduce); it counts its starts.
_STUCK_PROGRAM = """
import sys, time, signal
with open(sys.argv[2], "a") as f:
    f.write("start\\n")
from mlx_lm import load, generate
model, tokenizer = load(sys.argv[1])
inner = type(model).__call__
def wedged(self, *args, **kwargs):
    if sys.argv[3] == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(0.05)
type(model).__call__ = wedged
generate(model, tokenizer, prompt="hello", max_tokens=4)
"""


@requires_mlx_lm
@pytest.mark.parametrize("on_term", ["stop", "ignore"])
def test_a_stuck_step_is_reported_stopped_with_term_and_not_restarted(
    mg_home: str, tiny_llama_path: str, tmp_path: Path, on_term: str
) -> None:
    starts = tmp_path / "starts.txt"
    env = run_env(METALGUARD_STUCK_SEC="1")
    cmd = [sys.executable, "-c", _STUCK_PROGRAM, tiny_llama_path, str(starts), on_term]
    started = time.monotonic()
    done = run_cmd(guarded(cmd, "--restart", "always", "--grace", "2"), env, timeout=120)
    assert done.returncode == mg._EXIT_GPU_STUCK == 71, done.stderr
    assert time.monotonic() - started < 60
    assert starts.read_text().splitlines() == ["start"]  # never restarted
    said = [line for line in done.stderr.splitlines() if line.startswith("metal-guard run: ")]
    assert any("stuck GPU work" in line and "not restarting it: reboot" in line for line in said)
    stuck = [m for m in breadcrumb_messages(mg_home) if m.startswith("GPU_STUCK")]
    assert len(stuck) == 1 and "generate_step step" in stuck[0], stuck
    killed = "sending SIGKILL" in done.stderr
    assert killed is (on_term == "ignore"), done.stderr  # SIGTERM first; SIGKILL only last
