"""metal-guard: keep Apple's MLX from kernel-panicking the Mac.

Apple's Metal driver can panic the whole machine while MLX loads, runs and
unloads models (``"completeMemory() prepare count underflow"
@IOGPUMemory.cpp:492`` on macOS 15, ``:550`` on macOS 26, and relatives in
``IOGPUGroupMemory.cpp``). No userspace code can fix a kernel extension; this
module narrows the race windows, refuses the known triggers and leaves
forensics that survive the reboot. It is one file with no dependencies: copy
it next to a worker script, or install it from a checkout (``pip install .``).
The name ``metal-guard`` on PyPI belongs to a different code base (the original
project's 1.x line).

Map of this module. Its order is its architecture: tiers
(prelude → storage → MLX access → knowledge → policies → runtime → command line),
each section opening with a banner that says what it provides and which
earlier sections it uses (``tests/test_structure.py`` keeps that true):

0.1 Prelude — logging, environment variables, argument checks, process state.
0.2 Processes — the platform, a bounded command, stopping a process gracefully.
1.1 Files — the state folder, atomic replacement, appends, bounded reads.
1.2 Locks — the one lock: a reentrant ``flock`` on a lock file never deleted.
1.3 JSON state files — the one locked-JSON-file primitive.
1.4 Breadcrumbs — one line per event, durable before the next step runs.
2.1 MLX access — the only place that touches ``mlx.core``; memory numbers.
2.2 Memory numbers — what MLX and the operating system say this process uses.
2.3 Release barrier — wait until MLX memory actually dropped, bounded.
3.1 Model identity — what a model id means, without loading the model.
3.2 Registry — models that kernel-panicked with defences engaged.
3.3 Panic signatures — what a panic or error text says happened.
3.4 Panic reports — reading macOS panic reports after the reboot.
3.5 Size and hardware tables — a model's size guessed from its name, and the
    hardware tiers of ``recommended_config``.
3.6 Version advisories — MLX, mlx-lm and mlx-vlm releases with known panic- or
    crash-class bugs, and the small PEP 440 matcher that decides which apply.
3.7 Estimators — prefill and KV-cache sizes from a model's dimensions.
3.8 Apple Feedback — a kernel panic formatted for Feedback Assistant.
3.9 Process mode (R6) — what kind of process this is, and advisory defaults.
3.10 Cadence rules — the cadence store's format, read and pruned, the
    arithmetic of waiting, and the refusals' exceptions; pure functions.
3.11 Panic triggers — what the breadcrumbs of the minutes before a panic show.
4.1 Modes (L6) — defensive or observer: whether a refusal raises or is
    reported.
4.2 Cadence — refuse back-to-back model loads, across processes.
4.3 Panic archive — ``panics.jsonl``: the user's panic history.
4.4 Circuit breaker — refuse MLX work after repeated IOGPU kernel panics.
4.5 KV growth tracker — per-request KV-cache bytes against a ceiling.
4.6 Host locks — one class for both host-wide locks: an ``flock`` that cannot
    go stale, the holder's record in the lock file, fair turns.
4.7 MLX lock (L8) — one MLX user per host, as an OS lock that cannot go stale.
4.8 GPU gate — one MLX workload at a time across the threads and processes of
    the host.
4.9 Post-panic gate — one IOGPU kernel panic stops the relaunch that follows it.
4.10 Runs registry — the programs running under ``metal-guard run`` on this host.
5.0 Stuck GPU work — a guarded step that never finishes is reported, once.
5.1 Flush guards — per-inference flush and the gemma-4 first-generate flush.
5.2 Wired-limit control — keep MLX from wiring the recommended working set.
5.3 Upstream patches — defects of installed MLX packages fixed in place.
5.4 System audits — the machine's wired-memory setting, the GPU driver version
    and MLX settings known to wedge the GPU.
5.5 Memory layers — MetalGuard L1-L4: GPU-thread registry, safe cleanup, Metal
    out-of-memory recovery, the pre-load fit check.
5.6 Monitors — MetalGuard L5: periodic flush, memory watchdog, KV-cache
    monitor, as three independent daemon threads.
5.7 MetalGuard — the health probe, the SIGABRT breadcrumb, hardware detection,
    and the ``metal_guard`` singleton.
5.8 Scoped loads — ``bench_scoped_load`` and the KV-pressure callback.
5.9 Subprocess worker — (L7, child side) a worker process that guards itself.
5.10 Subprocess runner — (L7, parent side) workers that start guarded, stop
    gracefully and are reaped.
5.11 Worker pool — ``call_model_isolated``: one pooled worker per model.
5.12 Child state — what a program under ``metal-guard run`` remembers, its GPU
    turns and its wired policy.
5.13 Child hooks — what ``_child_bootstrap`` installs in a Python program run
    under ``metal-guard run``.
5.14 Program start — which commands run Python, the bootstrap ``sitecustomize``
    and the environment a program under ``metal-guard run`` starts with.
5.15 Supervisor — ``metal-guard run``: pre-flight, signals passed on with a
    grace period, restarts and exit codes.
6.1 Command line — the ``metal-guard`` parser and output helpers.
6.2 Commands — each subcommand calls public functions; wiring only.
6.3 Check — ``metal-guard check``: the pre-flight for one load, as a command.
6.4 After-panic commands — ``diagnose``, ``ack``, ``postmortem`` and the bare
    ``metal-guard`` summary.
6.5 Entry point — ``main``: parse, run one command, print text or one JSON
    document.

Importing has no side effects: no files, threads, environment reads or heavy
imports happen until a function is called.
"""

from __future__ import annotations

import _thread
import errno
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - typing only, never imported at run time
    import logging
    import threading
    from collections.abc import Callable
    from types import ModuleType, TracebackType
    from typing import Any, NoReturn, TypeVar

    _T = TypeVar("_T")
    _F = TypeVar("_F", bound=Callable[..., Any])
    StrPath = str | os.PathLike[str]

__version__ = "0.9.0"

__all__ = [
    "__version__",
    # 0.1 Prelude
    "MetalGuardWarning",
    # 1.2 Locks
    "LockUnsupported",
    "StateLockTimeout",
    # 1.4 Breadcrumbs
    "read_breadcrumbs",
    # 2.1 MLX access
    "MemoryStats",
    "MetalOOMError",
    # 2.2 Memory numbers
    "ReleaseStats",
    # 2.3 Release barrier
    "wait_for_release",
    # 3.1 Model identity
    "canonical_model_id",
    "is_gemma4_family",
    # 3.2 Registry
    "KNOWN_PANIC_MODELS",
    "check_known_panic_model",
    "warn_if_known_panic_model",
    # 3.3 Panic signatures
    "detect_panic_signature",
    # 3.4 Panic reports
    "parse_panic_reports",
    # 3.6 Version advisories
    "check_version_advisories",
    # 3.7 Estimators
    "KNOWN_MODELS",
    "ModelDims",
    "describe_prefill_plan",
    "estimate_prefill_peak_alloc_gb",
    "lookup_dims",
    "recommend_chunk_size",
    "require_prefill_fit",
    # 3.8 Apple Feedback
    "format_panic_for_apple_feedback",
    # 3.9 Process mode (R6)
    "ProcessMode",
    "apply_mode_defaults",
    "describe_process_mode",
    "detect_process_mode",
    # 3.10 Cadence rules
    "CadenceStoreError",
    "CadenceViolation",
    "CrossModelCadenceViolation",
    # 4.1 Modes (L6)
    "DEFENSIVE",
    "OBSERVER",
    "current_mode",
    "describe_mode",
    "is_defensive",
    "is_observer",
    # 4.2 Cadence
    "CadenceGuard",
    "GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC",
    "cadence_scope",
    "require_cadence_clear",
    # 4.3 Panic archive
    "ingest_panics_jsonl",
    "read_panic_archive",
    # 4.4 Circuit breaker
    "CircuitBreaker",
    "MLXCooldownActive",
    # 4.5 KV growth tracker
    "KVGrowthTracker",
    "kv_tracker",
    # 4.7 MLX lock (L8)
    "MLXLockConflict",
    "acquire_mlx_lock",
    "mlx_exclusive_lock",
    "read_mlx_lock",
    "release_mlx_lock",
    # 4.8 GPU gate
    "GPUBusy",
    "exclusive_gpu",
    "read_gpu_gate",
    # 5.1 Flush guards
    "gemma4_generation_flush",
    "subprocess_inference_guard",
    # 5.2 Wired-limit control
    "describe_wired_limit",
    "limit_wired_memory",
    "restore_wired_memory",
    # 5.3 Upstream patches
    "install_upstream_defensive_patches",
    # 5.4 System audits
    "audit_wired_limit",
    "log_system_audit_at_startup",
    "read_gpu_driver_version",
    # 5.7 MetalGuard
    "MetalGuard",
    "metal_guard",
    # 5.8 Scoped loads
    "bench_scoped_load",
    "kv_cache_clear_on_pressure",
    # 5.9 Subprocess worker
    "SubprocessCrashError",
    "SubprocessTimeoutError",
    # 5.10 Subprocess runner
    "MLXSubprocessRunner",
    # 5.11 Worker pool
    "call_model_isolated",
    "shutdown_all_workers",
    # 6.5 Entry point
    "main",
]


# =============================================================================
# 0.1 Prelude — logging, environment variables, argument checks, process state.
#
# Every METALGUARD_* variable is read at call time through one helper family: a
# bad value logs one WARNING per variable per process and the default is used; an
# empty value counts as unset. Caller bugs get a clear TypeError/ValueError from
# one family of checks (os.fspath for paths, one finite-number check). Logging,
# json, re and dataclasses are imported on first use: importing them here would
# more than double the cost of ``import metal_guard``. Advisories people must see
# also go through ``warnings.warn`` as a ``MetalGuardWarning`` (imported on first
# use too: it is not loaded at interpreter start).
#
# Provides: _ContextDecorator, _DEBUG, _INF, _LAZY_ATTRIBUTES, _TRUE_WORDS, _WARNING, _dataclass,
#   _env_bool, _env_float, _env_int, _env_parsed, _env_path, _finite, _first_time, _gb_arg,
#   _int_arg, _label, _log, _log_once, _number, _on_reset, _once_lock, _path_arg, _real_arg,
#   _seconds_arg, _str_path,
#   MetalGuardWarning, _warn
# Uses: nothing
# =============================================================================

_DEBUG = 10
_WARNING = 30

_logger_obj: logging.Logger | None = None
_once_lock = _thread.allocate_lock()
_once_keys: set[str] = set()


def _log() -> logging.Logger:
    """The ``metal_guard`` logger (with a ``NullHandler``), created on first use."""
    global _logger_obj
    if _logger_obj is None:
        import logging

        logger = logging.getLogger("metal_guard")
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())
        _logger_obj = logger
    return _logger_obj


def _first_time(key: str) -> bool:
    """True exactly once per process for ``key`` (thread-safe)."""
    with _once_lock:
        if key in _once_keys:
            return False
        _once_keys.add(key)
        return True


def _log_once(key: str, level: int, msg: str, *args: object) -> None:
    """Log ``msg`` at ``level`` the first time ``key`` is seen in this process."""
    if _first_time(key):
        _log().log(level, msg, *args)


class MetalGuardWarning(UserWarning):
    """A startup advisory people must see: a known-panic model, a critical defect.

    Issued with ``warnings.warn`` besides the log record, so that a program
    that never configured logging still shows it (once per place, by Python's
    default filter). Silence it with
    ``warnings.simplefilter("ignore", metal_guard.MetalGuardWarning)``.
    """


def _warn(message: str) -> None:
    """``warnings.warn(message, MetalGuardWarning)`` attributed to the first caller outside this module."""
    import warnings

    level, frame = 1, sys._getframe(0)
    while frame.f_globals.get("__name__") == __name__ and frame.f_back is not None:
        level, frame = level + 1, frame.f_back
    warnings.warn(message, MetalGuardWarning, stacklevel=level)


def _env_bad(name: str, raw: str, why: str, default: object) -> None:
    _log_once(
        "env:" + name,
        _WARNING,
        "metal_guard: ignoring %s=%r (%s); using the default%s",
        name,
        raw[:200],
        why,
        "" if default is None else f" {default!r}",
    )


def _env_float(
    name: str,
    default: float,
    *,
    minimum: float = 0.0,
    maximum: float | None = None,
    clamp: bool = False,
) -> float:
    """Read a finite float from ``name``; bad or out-of-range values give ``default``.

    With ``clamp=True`` an out-of-range number is clamped into range instead
    (still with one WARNING, since the caller asked for something we won't do).
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():  # empty counts as unset
        return default
    text = raw.strip()
    try:
        value = float(text)
    except ValueError:
        _env_bad(name, raw, "not a number", default)
        return default
    if not _finite(value):
        _env_bad(name, raw, "not finite", default)
        return default
    if value < minimum or (maximum is not None and value > maximum):
        if not clamp:
            _env_bad(
                name,
                raw,
                f"outside [{minimum:g}, {maximum if maximum is not None else 'inf'}]",
                default,
            )
            return default
        clamped = min(max(value, minimum), maximum if maximum is not None else value)
        _log_once(
            "env:" + name,
            _WARNING,
            "metal_guard: %s=%r is outside [%g, %s]; using %g",
            name,
            raw[:200],
            minimum,
            "inf" if maximum is None else f"{maximum:g}",
            clamped,
        )
        return clamped
    return value


def _env_int(name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    """Read a base-10 integer from ``name`` (``1e6``, ``0x10`` and ``1.5`` are bad values)."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():  # empty counts as unset
        return default
    text = raw.strip()
    if len(text) > 30:
        _env_bad(name, raw, "too long to be a sensible number", default)
        return default
    try:
        value = int(text, 10)
    except ValueError:
        _env_bad(name, raw, "not an integer", default)
        return default
    if value < minimum or (maximum is not None and value > maximum):
        _env_bad(
            name, raw, f"outside [{minimum}, {maximum if maximum is not None else 'inf'}]", default
        )
        return default
    return value


_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def _env_parsed(
    name: str, parse: Callable[[str], _T], *, expected: str, default: object
) -> _T | None:
    """``parse`` of ``name``'s stripped value; ``None`` when unset, empty or bad.

    ``parse`` raises ``ValueError`` for a bad value, which logs one WARNING per
    variable per process (``expected`` says what was expected, ``default``
    what is used instead).
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():  # empty counts as unset
        return None
    try:
        return parse(raw.strip())
    except ValueError:
        _env_bad(name, raw, expected, default)
        return None


def _bool_word(text: str) -> bool:
    word = text.lower()
    if word in _TRUE_WORDS or word in _FALSE_WORDS:
        return word in _TRUE_WORDS
    raise ValueError(text)


def _env_bool(name: str, default: bool = False) -> bool:
    """Read ``1/true/yes/on`` or ``0/false/no/off`` (any case) from ``name``."""
    value = _env_parsed(
        name, _bool_word, expected="expected 1/true/yes/on or 0/false/no/off", default=default
    )
    return default if value is None else value


def _env_path(name: str, default: str | None, *, empty_disables: bool = False) -> str | None:
    """Read a filesystem path from ``name`` (``~`` expanded, made absolute).

    An empty value means ``None`` when ``empty_disables`` (a documented off
    switch), otherwise it counts as unset.
    """
    raw = os.environ.get(name)
    if raw is None:
        return default
    text = raw.strip()
    if not text:  # empty counts as unset, unless it is the documented off switch
        return None if empty_disables else default
    if "\x00" in text or len(text) > 4096:
        _env_bad(name, raw, "not a usable path", default)
        return default
    return os.path.abspath(os.path.expanduser(text))


# -- Argument checks: caller bugs get a clear TypeError/ValueError at once. ----

_INF = float("inf")


def _finite(value: float) -> bool:
    """Neither NaN nor an infinity."""
    return value == value and value not in (_INF, -_INF)


def _real_arg(
    name: str, value: object, *, minimum: float | None = None, above: bool = False
) -> float:
    """The one number check: a finite real number (``int``, ``float``, NumPy...), not ``bool``;
    at least ``minimum`` (``above``: more than it) when given."""
    if type(value) is not float and type(value) is not int:  # the common cases skip ``numbers``
        import numbers

        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = _INF
    if not _finite(number):
        raise ValueError(f"{name} must be a finite number, got {number!r}")
    if minimum is not None and (number <= minimum if above else number < minimum):
        bound = f"{'>' if above else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return number


def _number(value: object) -> float | None:
    """A finite float from a stored or given value; ``None`` for anything else.

    Booleans are not numbers here, and neither is an int too large for a float
    (a corrupt file can hold one: it must be ignored, not crash a guard).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if _finite(number) else None


def _int_arg(name: str, value: object, *, minimum: int | None = None) -> int:
    """An integer argument: ``int``, NumPy integers... not ``bool``; at least ``minimum``."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def _str_path(name: str, value: object) -> str:
    """``os.fspath(value)`` as ``str``; ``TypeError`` for anything else (bytes paths too)."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str or os.PathLike[str], not {type(value).__name__}")
    return text


def _path_arg(name: str, value: object) -> str:
    """A user-supplied path argument as an absolute ``str`` (``TypeError``/``ValueError``)."""
    text = _str_path(name, value)
    if not text.strip() or "\x00" in text:
        raise ValueError(f"{name} must be a non-empty path without NUL characters, got {text!r}")
    return os.path.abspath(os.path.expanduser(text))


def _seconds_arg(
    name: str,
    value: object,
    *,
    maximum: float,
    negative_to_zero: bool = False,
    allow_zero: bool = True,
    unit: str = "s",
) -> float:
    """A duration argument: a finite number within ``[0, maximum]`` (``> 0`` unless ``allow_zero``).

    A negative value is a ``ValueError`` unless ``negative_to_zero`` (then it means 0).
    ``unit`` is how the value is spelled in messages (``"s"``, ``"h"``).
    """
    seconds = _real_arg(name, value)
    if seconds > maximum:
        raise ValueError(
            f"{name}={seconds:g} {unit} is more than the maximum of {maximum:g} {unit}"
        )
    if seconds < 0 and negative_to_zero:
        seconds = 0.0
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {seconds:g}")
    return seconds + 0.0  # -0.0 → 0.0


_GB_MAX = 1e6  # a million GB: anything larger is a unit mistake


def _gb_arg(name: str, value: object, *, allow_zero: bool = True) -> float:
    """A size in decimal GB: a finite number in ``[0, 1e6]`` (``> 0`` unless ``allow_zero``)."""
    gb = _real_arg(name, value)
    if gb < 0 or gb > _GB_MAX or (gb == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number of GB {bound} and <= {_GB_MAX:g}, got {gb:g}")
    return gb


def _label(value: object) -> str:
    """A printable label for logs and breadcrumbs: ``str`` as is, a path as its text,
    an exception as its message, anything else as its ``repr``."""
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return str(os.fspath(value))
    return str(value) if isinstance(value, BaseException) else repr(value)


_process_state_resets: list[Callable[[], None]] = []


if TYPE_CHECKING:
    from dataclasses import dataclass as _dataclass
else:

    def _dataclass(*, frozen: bool = False):
        """``@dataclasses.dataclass(frozen=...)``, applied when the class is first used.

        ``import dataclasses`` costs more than the rest of this module's import,
        so a class is turned into a real dataclass on its first instantiation or
        its first ``dataclasses.fields``/``is_dataclass`` look-up (through its
        ``__dataclass_fields__``); after that it is an ordinary dataclass.
        """

        def wrap(cls):
            lock = _thread.allocate_lock()

            def materialize():
                with lock:
                    if "__dataclass_fields__" in cls.__dict__ and not isinstance(
                        cls.__dict__["__dataclass_fields__"], _LazyFields
                    ):
                        return
                    del cls.__init__, cls.__dataclass_fields__, cls.__signature__
                    import dataclasses

                    dataclasses.dataclass(frozen=frozen)(cls)

            def __init__(self, *args, **kwargs):
                materialize()
                cls.__init__(self, *args, **kwargs)

            class _LazyFields:
                def __get__(self, obj, owner):
                    materialize()
                    return owner.__dict__["__dataclass_fields__"]

            class _LazySignature:  # inspect.signature(cls) sees the real fields
                def __get__(self, obj, owner):
                    materialize()
                    import inspect

                    return inspect.signature(owner)

            cls.__init__ = __init__
            cls.__dataclass_fields__ = _LazyFields()
            cls.__signature__ = _LazySignature()
            return cls

        return wrap


class _ContextDecorator:
    """Lets a context-manager class decorate a function, as ``@contextmanager`` objects can.

    ``@guard.guarded_cleanup()`` on a function runs every call inside a fresh
    instance (``_recreate``), like ``contextlib.ContextDecorator`` (whose import
    this avoids).
    """

    __slots__ = ()

    def _recreate(self) -> Any:
        return self

    def __call__(self, fn: _F) -> _F:
        import functools

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with self._recreate():
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]


# Module attributes built on first access (PEP 562): building them at import
# would import ``logging``/``typing``/``dataclasses``. Sections register theirs.
_LAZY_ATTRIBUTES: dict[str, Callable[[], Any]] = {}


def __getattr__(name: str) -> Any:
    build = _LAZY_ATTRIBUTES.get(name)
    if build is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return build()


def _type_var_t() -> Any:
    from typing import TypeVar

    return globals().setdefault("T", TypeVar("T"))


# The original metal-guard's incidental public names: its logger and its TypeVar.
_LAZY_ATTRIBUTES["log"] = lambda: _log()
_LAZY_ATTRIBUTES["T"] = _type_var_t


def _on_reset(reset: Callable[[], None]) -> Callable[[], None]:
    """Register a section's "forget what this process remembers" function."""
    _process_state_resets.append(reset)
    return reset


def _reset_process_state() -> None:
    """Forget every once-per-process memory (warnings given, models warned about, caches).

    For tests and long-lived supervisors that want a fresh set of warnings.
    Each section registers its own part with ``_on_reset``.
    """
    for reset in _process_state_resets:
        reset()


@_on_reset
def _forget_warnings() -> None:
    with _once_lock:
        _once_keys.clear()


# =============================================================================
# 0.2 Processes — the platform, a bounded command, stopping a process gracefully.
#
# A process that holds Metal memory and is killed with SIGKILL can leave
# memory wired until reboot, so every stop here is SIGTERM first, a grace
# period to exit and be reaped, and SIGKILL only after it.
#
# The receiving side of a stop: a signal handler that raises (to unwind a
# worker out of a long generate) must never do so while a library lock or
# state file is half-taken. Handlers call ``_interrupt(exc, frame)`` instead
# of ``raise exc``: outside a ``with _critical():`` block it raises at once;
# inside one the exception is recorded and raised when the outermost block of
# that thread ends (or at a ``_checkpoint()`` the block calls where it can
# unwind, e.g. while waiting). ``_critical(undo)``: when a recorded interrupt
# is about to be raised at the block's end, ``undo()`` runs first, still
# protected (a lock acquire gives back what it just took, so "raised" always
# means "not taken"). A function decorated ``@_defers_interrupts`` (a lock's
# release) is critical from its first instruction: a signal that lands before
# its block begins is raised at that block's end. A blocking call inside a
# block that can unwind from there runs as ``with _unwinding_wait():`` (the
# interrupt raises at once). A handler that must not raise at all sets a flag.
#
# Provides: _checkpoint, _critical, _defers_interrupts, _interrupt, _on_macos, _pid_alive,
#   _pid_running, _platform, _run_bounded, _stop_process, _unwinding_wait
# Uses: Prelude
# =============================================================================

_critical_depth: dict[int, int] = {}  # thread ident → nesting of ``_critical`` blocks
_pending_interrupts: dict[int, BaseException] = {}  # thread ident → interrupt raised at block end
_critical_codes: set[object] = set()  # code of functions that are critical from their start
_unwinding_waits: set[int] = set()  # threads blocked where a stop may unwind at once


class _unwinding_wait:
    """``with _unwinding_wait(): <a blocking call>`` inside a ``_critical`` block:
    an interrupt raises at once (the caller unwinds cleanly from there) instead
    of waiting for the block's end, which a blocking call might never reach."""

    __slots__ = ()

    def __enter__(self) -> None:
        _checkpoint()
        _unwinding_waits.add(_thread.get_ident())

    def __exit__(self, *exc: object) -> None:
        _unwinding_waits.discard(_thread.get_ident())


def _defers_interrupts(fn: _F) -> _F:
    """Mark ``fn`` critical from its first instruction; its whole body (its return
    included) must be one ``_critical`` block, or calls into such a function."""
    _critical_codes.add(fn.__code__)
    return fn


def _interrupt(exc: BaseException, frame: object = None) -> None:
    """What a signal handler calls instead of ``raise exc``: raise now, or at a safe point.

    Inside a ``_critical`` block of the interrupted thread, or when ``frame``
    (the handler's second argument) is in a ``@_defers_interrupts`` function,
    the exception is recorded (the first one wins) and raised when the
    outermost block ends or at a ``_checkpoint()``; elsewhere it is raised at once.
    """
    me = _thread.get_ident()
    outer: Any = frame
    deferred = bool(_critical_depth.get(me)) and me not in _unwinding_waits
    for _ in range(8):  # the interrupted function and its few callers
        if deferred or outer is None:
            break
        deferred = outer.f_code in _critical_codes
        outer = outer.f_back
    if deferred:
        if me not in _pending_interrupts:
            _pending_interrupts[me] = exc
        return
    _pending_interrupts.pop(me, None)  # one stop at a time: nothing stale stays behind
    raise exc


def _checkpoint() -> None:
    """Raise the interrupt recorded for this thread, if any.

    Called inside a ``_critical`` block only where every enclosing block can
    unwind cleanly (a wait, before anything new is taken): waits stay
    interruptible while the bookkeeping around them is not.
    """
    exc = _pending_interrupts.pop(_thread.get_ident(), None)
    if exc is not None:
        raise exc


class _critical:
    """``with _critical(): ...`` — exceptions raised by signal handlers through
    ``_interrupt`` wait until the outermost block of this thread ends.

    ``undo`` (optional) runs, still protected, just before a recorded interrupt
    is raised at the end of a block that ends normally: it reverts what the
    block did, so the caller never sees "raised" together with "done".
    Nesting is counted per thread; a handler's exception always reaches the
    thread the handler runs in (Python runs handlers in the main thread).
    """

    __slots__ = ("undo",)

    def __init__(self, undo: Callable[[], object] | None = None) -> None:
        self.undo = undo

    def __enter__(self) -> _critical:
        me = _thread.get_ident()
        _critical_depth[me] = _critical_depth.get(me, 0) + 1
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        me = _thread.get_ident()
        depth = _critical_depth.get(me, 1)
        if depth > 1:
            _critical_depth[me] = depth - 1
            return
        if me in _pending_interrupts and exc_type is None and self.undo is not None:
            try:  # still inside the block: a further signal is recorded, not raised
                self.undo()
            except Exception as error:  # the interrupt below matters more
                _log().debug("metal_guard: undo before an interrupt failed: %r", error)
        pending = _pending_interrupts.pop(me, None)
        # No call between the pop and the raise: a handler cannot run in between.
        del _critical_depth[me]
        if pending is not None:
            raise pending


_SUBPROCESS_OUTPUT_MAX = 1 << 20
_REAP_AFTER_KILL_SEC = 10.0  # a SIGKILLed process is gone at once; this only bounds the wait


def _platform() -> str:
    """``sys.platform``, read at call time (tests fake macOS through it)."""
    return sys.platform


def _on_macos() -> bool:
    return _platform() == "darwin"


def _process_exited(proc: Any) -> bool:
    """Whether a ``subprocess.Popen`` or ``multiprocessing.Process`` has exited."""
    if hasattr(proc, "join"):  # multiprocessing: exitcode polls without blocking
        return proc.exitcode is not None
    return proc.poll() is not None


def _wait_process(proc: Any, timeout: float) -> None:
    if hasattr(proc, "join"):
        proc.join(timeout)
        return
    import subprocess

    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def _stop_process(
    proc: Any,
    *,
    grace: float,
    why: str,
    what: str = "process",
    wait: Callable[[float], object] | None = None,
    signum: int | None = None,
    signal_name: str = "SIGTERM",
) -> bool:
    """The one way this module stops a process: SIGTERM, ``grace`` s, SIGKILL only then.

    ``proc`` is a ``subprocess.Popen`` or a ``multiprocessing.Process``;
    ``wait(t)`` waits up to ``t`` s for it (default: its own ``wait``/``join``),
    so it is reaped before this returns. A SIGKILL comes with a WARNING that
    says why. Returns True when SIGKILL was needed. ``signum`` sends another
    first signal instead of SIGTERM (``signal_name`` names it in the WARNING;
    ``0`` sends none: the process already got it, e.g. from the terminal).
    """
    waiter = wait if wait is not None else (lambda t: _wait_process(proc, t))
    if _process_exited(proc):
        waiter(0.0)  # reap it
        return False
    if signum is None:
        proc.terminate()
    elif signum:
        os.kill(proc.pid, signum)
    waiter(grace)
    if _process_exited(proc):
        return False
    _log().warning(
        "metal_guard: %s (pid %s) ignored %g s of %s (stopping because %s); sending "
        "SIGKILL. Memory it held on the GPU may stay wired until reboot.",
        what,
        proc.pid,
        grace,
        signal_name,
        why,
    )
    proc.kill()
    waiter(_REAP_AFTER_KILL_SEC)
    return True


def _run_bounded(argv: list[str], timeout: float) -> str | None:
    """``argv``'s standard output if it exits 0 within ``timeout`` seconds, else ``None``.

    Never raises. A command that overruns gets SIGTERM, then SIGKILL only if
    it is still running half a second later.
    """
    if timeout <= 0:
        return None
    import subprocess

    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, ValueError) as exc:
        _log().debug("metal_guard: cannot run %s: %r", argv[0], exc)
        return None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        why = f"it did not answer within {timeout:.1f} s"
        _stop_process(proc, grace=0.5, why=why, what=argv[0])
        _log().debug("metal_guard: %s: %s", argv[0], why)
        return None
    except BaseException:  # KeyboardInterrupt: do not leave the child behind
        _stop_process(proc, grace=0.5, why="the caller was interrupted", what=argv[0])
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    if proc.returncode != 0:
        _log().debug("metal_guard: %s exited with %s", argv[0], proc.returncode)
        return None
    return out[:_SUBPROCESS_OUTPUT_MAX].decode("utf-8", "replace")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _pid_running(pid: int) -> bool:
    """Alive and not a zombie (exited, not yet reaped by its parent: its memory is freed)."""
    if not _pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:  # Linux: "pid (name) S ..."
            stat = stat_file.read()
        end = stat.rindex(b")")
        return stat[end + 2 : end + 3] != b"Z"
    except (OSError, ValueError):
        pass
    if _on_macos():
        return not (_run_bounded(["ps", "-o", "state=", "-p", str(pid)], 1.0) or "").startswith("Z")
    return True


# =============================================================================
# 1.1 Files — the state folder, atomic replacement, appends, bounded reads.
#
# Nothing is written through a symlink (``O_NOFOLLOW``); a replacement is a
# uniquely named temp file + ``os.replace`` (+ ``fsync`` of file and folder when
# the file must survive a kernel panic); an append is one ``O_APPEND`` write.
#
# Provides: _FLOCK_BUSY, _FLOCK_UNSUPPORTED, _O_CLOEXEC, _O_NOFOLLOW, _append_bytes,
#   _atomic_write_bytes, _fsync_dir, _open_creating, _read_bounded, _read_json_object,
#   _refuse_symlink, _state_file, _state_home
# Uses: Prelude, Processes
# =============================================================================


def _user_home() -> str:
    """The user's home folder, absolute.

    With no ``HOME`` and no passwd entry, ``expanduser`` leaves ``~`` as is,
    which would put state under the working directory (every worker its own
    store); use a per-user folder in the temp directory instead, with a WARNING.
    """
    home = os.path.expanduser("~")
    if not home.startswith("~"):
        return home
    getuid = getattr(os, "getuid", None)
    fallback = os.path.join(
        os.environ.get("TMPDIR") or "/tmp", f"metal-guard-home-{getuid() if getuid else 'user'}"
    )
    _log_once(
        "no-home",
        _WARNING,
        "metal_guard: no home folder (HOME unset, no passwd entry); using %s — set METALGUARD_HOME",
        fallback,
    )
    return os.path.abspath(fallback)


def _state_home() -> str:
    """The state folder: ``METALGUARD_HOME`` or ``~/.cache/metal-guard`` (not created here)."""
    return _env_path("METALGUARD_HOME", None) or os.path.join(_user_home(), ".cache", "metal-guard")


def _state_file(name: str) -> str:
    return os.path.join(_state_home(), name)


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# flock errors that mean "this filesystem cannot lock" (e.g. some NFS/SMB mounts)
_FLOCK_UNSUPPORTED = frozenset(
    {errno.ENOSYS, errno.ENOLCK, getattr(errno, "EOPNOTSUPP", -1), getattr(errno, "ENOTSUP", -1)}
)
_FLOCK_BUSY = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})


def _ensure_dir(path: str) -> None:
    """Create ``path`` (mode 0700) if missing; raise ``OSError`` if it is not a folder."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:  # a file sits where the folder should be
        raise NotADirectoryError(errno.ENOTDIR, "state folder is not a directory", path) from None


def _open_creating(path: str, flags: int) -> int:
    """``os.open`` of ``path`` (created 0600, never through a symlink) with ``flags``.

    The folder is created only when the open finds it missing: the file is
    opened first, so ``makedirs`` stays off the hot paths (a breadcrumb per
    inference, a lock per admission). A file where the folder should be raises
    the clear ``NotADirectoryError`` of ``_ensure_dir``.
    """
    flags |= os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except (FileNotFoundError, NotADirectoryError):  # no folder, or a file in its place
        _ensure_dir(os.path.dirname(path) or ".")
        return os.open(path, flags, 0o600)


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _refuse_symlink(path: str) -> None:
    if os.path.islink(path):
        raise OSError(errno.ELOOP, "refusing to replace a symbolic link", path)


def _sweep_stale_temps(path: str) -> None:
    """Remove temp files of ``_atomic_write_bytes`` left by writers that were killed.

    Only files whose writer pid is gone are removed, so no lock is needed: a live
    writer's temp file (even under a reused pid) is never touched.
    """
    folder = os.path.dirname(path) or "."
    prefix = f".{os.path.basename(path)}."
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid_text = name[len(prefix) :].split(".", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def _atomic_write_bytes(path: str, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (mode 0600); ``durable`` adds the fsyncs.

    Atomic means readers see the old or the new bytes, never a mix. Durable
    means the new bytes survive a kernel panic: the file and the folder are
    fsynced (milliseconds on some disks, so files that need not survive skip it).
    """
    folder = os.path.dirname(path) or "."
    _refuse_symlink(path)
    _sweep_stale_temps(path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = _open_creating(tmp, os.O_WRONLY | os.O_EXCL)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        _fsync_dir(folder)


def _append_bytes(path: str, data: bytes) -> int:
    """Append ``data`` in one ``O_APPEND`` write + ``fsync``; return the file's new size."""
    fd = _open_creating(path, os.O_WRONLY | os.O_APPEND)
    try:
        written = os.write(fd, data)
        if written != len(data):  # only on a full disk or a signal; finish the line
            view = memoryview(data)[written:]
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _read_bounded(path: str, limit: int, *, follow_symlinks: bool = False) -> bytes:
    """Read at most ``limit`` bytes of a file; a symlink is refused unless ``follow_symlinks``."""
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | (0 if follow_symlinks else _O_NOFOLLOW))
    try:
        chunks: list[bytes] = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_json_object(
    path: str, limit: int, *, follow_symlinks: bool = False
) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` (missing, unreadable, over ``limit`` bytes,
    not JSON, not an object). For files that are only displayed or consulted; state
    files go through ``_JsonFile``."""
    import json

    try:
        raw = _read_bounded(path, limit + 1, follow_symlinks=follow_symlinks)
        if len(raw) > limit:
            return None
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


# =============================================================================
# 1.2 Locks — the one lock: a reentrant ``flock`` on a lock file never deleted.
#
# Counted per thread (state files, the GPU gate) or per process (the MLX lock).
# The OS lock is the truth: a holder that dies releases it by dying. A lock
# whose job is to exclude never runs silently unlocked. Acquire and release
# run inside ``_critical`` (0.2): a stop raised by a signal handler never
# lands between the system call and the bookkeeping, and any other exception
# there closes the descriptor, so the lock stays usable whatever happens. A
# wait without a deadline blocks in ``flock`` (the kernel wakes it as the holder
# leaves) as an unwinding wait of 0.2, so a stop still ends it at once. Such a
# waiter cannot wake to say it still waits: ``_ticker()`` calls its ``pause``
# from one thread per process, which ends at its next wake-up once nobody is
# blocked (not at once: waking it would compete with the new holder).
#
# Provides: LockUnsupported, StateLockTimeout, _FileLock, _lock_state, _ticker
# Uses: Prelude, Processes, Files
# =============================================================================


class StateLockTimeout(TimeoutError):
    """A state file's lock was held by another process for longer than ``timeout``."""

    def __init__(self, lock_path: str, timeout: float) -> None:
        self.lock_path = lock_path
        self.timeout = timeout
        super().__init__(
            f"could not lock {lock_path!r} within {timeout:g} s: another process holds it "
            "(if none is running, the holder was hung; the OS frees the lock when it exits)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.lock_path, self.timeout))


class LockUnsupported(OSError):
    """The filesystem cannot ``flock``, so an exclusion lock cannot exclude.

    Raised instead of running unlocked by the locks whose whole job is to
    exclude (the MLX lock, the GPU gate). ``env_var`` names the variable that
    moves the lock file to a local disk.
    """

    def __init__(self, lock_path: str, env_var: str, reason: str = "") -> None:
        self.lock_path = lock_path
        self.env_var = env_var
        self.reason = reason
        super().__init__(
            errno.ENOLCK,
            f"cannot lock {lock_path!r}: the filesystem does not support flock"
            + (f" ({reason})" if reason else "")
            + f"; set {env_var} to a path on a local disk",
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.lock_path, self.env_var, self.reason))


class _LockState:
    """What this process knows about one lock file: its descriptor and holders."""

    __slots__ = ("acquiring", "cond", "count", "fd", "owner", "pid")

    def __init__(self) -> None:
        import threading  # not at module import: it costs as much as the rest of it

        self.cond = threading.Condition(threading.Lock())
        self.fd: int | None = None
        self.count = 0
        self.owner: int | None = None  # thread ident for per-thread locks
        self.acquiring = False
        self.pid = os.getpid()


_WAIT_SLICE = 0.05  # a thread waiting for another thread's hold looks for a stop this often
_lock_states: dict[str, _LockState] = {}
_lock_states_guard = _thread.allocate_lock()


_fork_hook = [False]  # [installed]: the after-fork handler is registered on the first OS lock


def _drop_locks_after_fork() -> None:
    """In a forked child: close its copies of the parent's lock descriptors.

    A forked child shares the parent's open file descriptions, so its copy of
    a held lock's descriptor would keep the ``flock`` held after the parent
    released it (or died) for as long as the child lives. Closing the copy
    (never ``LOCK_UN``, which would release it for the parent too) leaves the
    parent's hold intact. The guard may have been held by another thread at
    fork time, so the child starts with a fresh one.
    """
    global _lock_states_guard
    for state in list(_lock_states.values()):
        if state.fd is not None:
            try:
                os.close(state.fd)
            except OSError:
                pass
    _lock_states.clear()
    _lock_states_guard = _thread.allocate_lock()


_lock_keys: dict[str, str] = {}  # an absolute path → its normal form (cwd cannot change it)


def _lock_state(path: str) -> _LockState:
    key = _lock_keys.get(path)
    if key is None:
        key = os.path.abspath(path)
        if os.path.isabs(path) and len(_lock_keys) < 1024:
            _lock_keys[path] = key
    with _lock_states_guard:
        state = _lock_states.get(key)
        if state is None or state.pid != os.getpid():  # a forked child holds nothing
            state = _lock_states[key] = _LockState()
        return state


class _FileLock:
    """A reentrant exclusive ``flock`` on ``path``: the one lock of this module.

    ``with _FileLock(p, timeout=5): ...`` or ``acquire()`` / ``release()``. The
    lock file is opened with ``O_NOFOLLOW`` and never deleted (a process may
    hold the lock on an inode another one just unlinked). The OS lock is the
    truth: a holder that dies releases it by dying.

    Within one process the lock is counted: with ``per_thread=True`` (state
    files, the GPU gate) the thread that holds it may re-enter and other
    threads wait; with ``per_thread=False`` (the MLX lock) the whole process
    is the holder, and the OS lock is released by the last ``release()``.

    ``timeout`` ``None`` waits forever (blocked in ``flock``: the kernel wakes
    the waiter as the holder leaves), ``0`` tries once; expiry raises
    ``StateLockTimeout``. Where ``flock`` is unsupported an exclusion lock
    (``must_exclude=True``) raises ``LockUnsupported`` naming ``env_var``;
    a state-file lock logs one WARNING and runs unlocked.
    """

    def __init__(
        self,
        path: str,
        timeout: float | None = 10.0,
        *,
        per_thread: bool = True,
        must_exclude: bool = False,
        env_var: str = "METALGUARD_HOME",
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.per_thread = per_thread
        self.must_exclude = must_exclude
        self.env_var = env_var

    @property
    def count(self) -> int:
        """How many times this process (or, per thread, its holder) holds the lock."""
        return _lock_state(self.path).count

    def held_by_me(self) -> bool:
        """True when the calling thread (per-thread) or process holds the lock."""
        state = _lock_state(self.path)
        with state.cond:
            return state.count > 0 and (not self.per_thread or state.owner == _thread.get_ident())

    def acquire(self, timeout: float | None = _INF) -> bool:
        """Take the lock; True when this call took the OS lock, False on re-entry.

        Safe against stops: an exception a signal handler raises through
        ``_interrupt`` waits until the bookkeeping is done, and comes out only
        while waiting (nothing taken) or after the hold was given back; any
        other exception between a system call and the bookkeeping closes the
        descriptor. A raise always means "not taken", and the lock stays usable.
        """
        wait = self.timeout if timeout == _INF else timeout
        deadline = None if wait is None else time.monotonic() + max(0.0, wait)
        block = _critical()
        with block:
            took = self._acquire(deadline, wait)
            block.undo = self.release  # a stop recorded meanwhile: give the hold back first
            return took

    def _acquire(self, deadline: float | None, wait: float | None) -> bool:
        state = _lock_state(self.path)
        me = _thread.get_ident()
        with state.cond:
            while True:
                if state.count > 0 and (not self.per_thread or state.owner == me):
                    state.count += 1
                    return False
                if state.count == 0 and not state.acquiring:
                    state.acquiring = True
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise StateLockTimeout(self.path, wait or 0.0)
                _checkpoint()  # nothing taken yet: a stop may unwind here
                state.cond.wait(_WAIT_SLICE if remaining is None else min(remaining, _WAIT_SLICE))
        try:
            fd = self._os_lock(deadline, wait)
        except BaseException:
            with state.cond:
                state.acquiring = False
                state.cond.notify_all()
            raise
        with state.cond:
            state.acquiring = False
            state.fd, state.count, state.owner = fd, 1, me
            state.cond.notify_all()
        if not _fork_hook[0] and fd is not None and hasattr(os, "register_at_fork"):
            _fork_hook[0] = True
            os.register_at_fork(after_in_child=_drop_locks_after_fork)
        return True

    def _os_lock(self, deadline: float | None, wait: float | None) -> int | None:
        """flock the file; the descriptor, or ``None`` when running unlocked.

        The descriptor is closed on every way out but success, whatever raises.
        """
        try:
            import fcntl
        except ImportError:  # not a POSIX system: nothing to lock with
            self._unsupported("fcntl is unavailable")
            return None
        fd = _open_creating(self.path, os.O_RDWR)
        locked = False
        try:
            delay = 0.001
            while True:
                try:
                    if deadline is None:  # block in the kernel: woken as the holder leaves
                        with _unwinding_wait():
                            fcntl.flock(fd, fcntl.LOCK_EX)
                    else:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                    return fd
                except OSError as exc:
                    if exc.errno in _FLOCK_UNSUPPORTED:
                        self._unsupported(exc.strerror or str(exc))
                        return None
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if exc.errno not in _FLOCK_BUSY or (remaining is not None and remaining <= 0):
                        if exc.errno in _FLOCK_BUSY:
                            raise StateLockTimeout(self.path, wait or 0.0) from None
                        raise
                _checkpoint()  # the descriptor is closed below: a stop may unwind here
                time.sleep(delay if remaining is None else min(delay, remaining))
                delay = min(delay * 2, 0.02)
        finally:
            if not locked:
                os.close(fd)  # closing also drops a flock taken just before an exception

    def _unsupported(self, reason: str) -> None:
        if self.must_exclude:
            raise LockUnsupported(self.path, self.env_var, reason)
        _log_once(
            "flock:" + os.path.dirname(self.path),
            _WARNING,
            "metal_guard: cannot lock %s (%s); state files there are not locked",
            self.path,
            reason,
        )

    @_defers_interrupts
    def release(self) -> bool:
        """Drop one hold; True when this released the OS lock.

        Never raises, except an interrupt a signal handler recorded meanwhile,
        raised once the release is complete (the state is forgotten before the
        descriptor is closed, so nothing can leave it half-released).
        """
        with _critical():
            state = _lock_state(self.path)
            with state.cond:
                if state.count == 0:
                    return False
                state.count -= 1
                if state.count:
                    return False
                fd, state.fd, state.owner = state.fd, None, None
                state.cond.notify_all()
            if fd is not None:
                try:
                    os.close(fd)  # closing the descriptor releases the flock
                except OSError:
                    pass
            return True

    def __enter__(self) -> _FileLock:
        self.acquire()
        return self

    @_defers_interrupts
    def __exit__(self, *exc: object) -> None:
        self.release()


class _Ticker:
    """Calls the ``pause()`` of waiters blocked in the kernel (which ticks when due), from
    one thread per process; the thread ends once nobody is blocked at its next wake-up."""

    def __init__(self) -> None:
        import threading

        self.cond = threading.Condition(threading.Lock())
        self.waiting: dict[object, Callable[[], float]] = {}
        self.running = self.added = False
        self.pid = os.getpid()

    def add(self, key: object, pause: Callable[[], float]) -> None:
        with self.cond:
            self.waiting[key] = pause
            if self.running:
                self.added = True
                self.cond.notify()
                return
            self.running = True
        import threading

        threading.Thread(target=self._run, name="metal_guard lock waits", daemon=True).start()

    def remove(self, key: object) -> None:
        with self.cond:  # no wake-up: the thread finds out at its next one
            self.waiting.pop(key, None)

    def _run(self) -> None:
        while True:
            with self.cond:
                if not self.waiting:
                    self.running = False
                    return
                pauses, self.added = list(self.waiting.values()), False
            wait = min(min(pause() for pause in pauses), 3600.0)  # ticks those due
            with self.cond:
                if not self.added:  # one added meanwhile: look again at once
                    self.cond.wait(wait)


_tickers: list[_Ticker] = []


def _ticker() -> _Ticker:
    """This process's ``_Ticker`` (a forked child starts its own; two made at once both work)."""
    ticker = _tickers[0] if _tickers else None
    if ticker is None or ticker.pid != os.getpid():
        ticker = _Ticker()
        _tickers[:] = [ticker]
    return ticker


# =============================================================================
# 1.3 JSON state files — the one locked-JSON-file primitive.
#
# A read never writes; ``update(fn)`` runs under the file's lock; a corrupt file
# is moved aside; each file chooses its durability.
#
# Provides: _CorruptFile, _JsonFile
# Uses: Prelude, Processes, Files, Locks
# =============================================================================


class _CorruptFile(ValueError):
    """A state file exists but does not hold a JSON object."""


_JSON_MAX_BYTES = 16 << 20


def _quarantine(path: str, why: str) -> None:
    """Move a corrupt state file aside to ``<path>.corrupt-<timestamp>`` (one WARNING)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = f"{path}.corrupt-{stamp}-{os.getpid()}"
    try:
        os.replace(path, target)
    except OSError as exc:
        _log().warning(
            "metal_guard: %s; could not move it aside (%s); treating it as empty", why, exc
        )
        return
    _log().warning("metal_guard: %s; moved it to %s and started afresh", why, target)


class _JsonFile:
    """One JSON-object state file: the only way this module persists state.

    - ``read()`` never writes and never raises: ``(object, problem)``, where a
      missing file is ``({}, None)`` and a corrupt or unreadable one is
      ``({}, "why")``; the caller decides whether that fails open.
    - ``update(fn)`` runs ``fn(object)`` under the file's lock (a sidecar
      ``.lock`` that is never deleted); ``fn`` changes the object in place and
      its result is returned. The file is replaced atomically, and only when
      the object changed. A corrupt file is moved aside (``.corrupt-*``, one
      WARNING) and ``fn`` starts from ``{}``. Environment faults raise
      ``OSError`` / ``StateLockTimeout``.
    - ``durable`` is chosen per file: ``True`` fsyncs every replacement so it
      survives a kernel panic; ``False`` leaves it in the page cache, which
      every running process shares (enough for state that only coordinates
      running processes).
    """

    __slots__ = ("durable", "lock_timeout", "path")

    def __init__(self, path: str, *, durable: bool, lock_timeout: float | None = 10.0) -> None:
        self.path = path
        self.durable = durable
        self.lock_timeout = lock_timeout

    def load(self) -> dict[str, Any]:
        """The object (``{}`` when missing); raises ``_CorruptFile`` / ``OSError``."""
        return self._load()[0]

    def _load(self) -> tuple[dict[str, Any], bytes]:
        """The object and the bytes it came from; raises ``_CorruptFile`` / ``OSError``."""
        import json

        try:
            raw = _read_bounded(self.path, _JSON_MAX_BYTES + 1)
        except FileNotFoundError:
            return {}, b""
        if len(raw) > _JSON_MAX_BYTES:
            raise _CorruptFile(f"{self.path} is larger than {_JSON_MAX_BYTES} bytes")
        if not raw.strip():
            return {}, raw
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _CorruptFile(f"{self.path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _CorruptFile(f"{self.path} holds a JSON {type(data).__name__}, not an object")
        return data, raw

    def read(self) -> tuple[dict[str, Any], str | None]:
        """``(object, None)``, or ``({}, problem)`` when the file is corrupt or unreadable."""
        try:
            return self._load()[0], None
        except (_CorruptFile, OSError) as exc:
            return {}, str(exc)

    def update(self, mutate: Callable[[dict[str, Any]], _T]) -> _T:
        """Locked read-modify-write; returns what ``mutate`` returned."""
        import json

        with _critical(), _FileLock(self.path + ".lock", self.lock_timeout):
            try:  # a stop waits until the file is replaced (or left as it was)
                data, raw = self._load()
            except _CorruptFile:
                # A writer that does not replace the file atomically (the original
                # metal-guard sharing the store) may be mid-write: look once more.
                time.sleep(0.05)
                try:
                    data, raw = self._load()
                except _CorruptFile as exc:
                    _quarantine(self.path, str(exc))
                    data, raw = {}, b""
            result = mutate(data)
            # Compare with the bytes read instead of re-serialising the old object:
            # one dumps per update. (A file in another layout is rewritten once.)
            encoded = json.dumps(data, sort_keys=True, default=str).encode("utf-8") + b"\n"
            if encoded != raw and (data or raw):
                _atomic_write_bytes(self.path, encoded, durable=self.durable)
            return result


# =============================================================================
# 1.4 Breadcrumbs — one line per event, durable before the next step runs.
#
# A kernel panic loses the page cache, so each line is one ``O_APPEND`` write
# followed by ``fsync``; what was acknowledged survives the reboot. The file
# rotates to ``.1`` past ``METALGUARD_BREADCRUMB_MAX_BYTES``. The library writes
# through the ``metal_guard`` singleton, which the MetalGuard section registers
# here as a getter looked up at call time, so applications can redirect or
# capture breadcrumbs.
#
# Provides: read_breadcrumbs, _BreadcrumbLog, _DEFAULT_PATH, _DefaultPath, _breadcrumb,
#   _escape_line, _guard_getter
# Uses: Prelude, Files, Locks
# =============================================================================

_BREADCRUMB_MAX_DEFAULT = 8 << 20
_BREADCRUMB_MSG_MAX = 4096


class _DefaultPath:
    """Sentinel: resolve the breadcrumb path from the environment at each write."""

    def __repr__(self) -> str:
        return "<default breadcrumb path>"


_DEFAULT_PATH = _DefaultPath()

# One event is one line: control characters (and Unicode line separators)
# are escaped, so a model id with a newline cannot forge a second event.
_ESCAPES: dict[int, str] = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7F, 0xA0)]}
_ESCAPES.update(
    {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029", 0x5C: "\\\\"}
)


def _escape_line(text: str) -> str:
    if len(text) > _BREADCRUMB_MSG_MAX:
        text = f"{text[:_BREADCRUMB_MSG_MAX]}...[{len(text) - _BREADCRUMB_MSG_MAX} more chars]"
    return text.translate(_ESCAPES)


def _default_breadcrumb_path() -> str | None:
    return _env_path(
        "METALGUARD_BREADCRUMB_PATH", _state_file("breadcrumbs.log"), empty_disables=True
    )


class _BreadcrumbLog:
    """The forensic breadcrumb log (the base of ``MetalGuard``).

    ``MetalGuard()`` writes to ``METALGUARD_BREADCRUMB_PATH`` if set (empty
    disables), else ``$METALGUARD_HOME/breadcrumbs.log``, resolved at each
    write. ``MetalGuard(breadcrumb_path=p)`` pins a path; ``None`` disables.
    """

    def __init__(self, breadcrumb_path: StrPath | _DefaultPath | None = _DEFAULT_PATH) -> None:
        self.breadcrumb_path = breadcrumb_path

    @property
    def breadcrumb_path(self) -> str | None:
        """Where the next breadcrumb goes (``None``: breadcrumbs are off)."""
        if isinstance(self._breadcrumb_path, _DefaultPath):
            return _default_breadcrumb_path()
        return self._breadcrumb_path

    @breadcrumb_path.setter
    def breadcrumb_path(self, value: StrPath | _DefaultPath | None) -> None:
        if value is None or isinstance(value, _DefaultPath) or value == "":
            self._breadcrumb_path: str | _DefaultPath | None = value or None
        else:
            self._breadcrumb_path = _path_arg("breadcrumb_path", value)

    def breadcrumb(self, msg: str) -> None:
        """Append ``<local ISO time> pid=<pid> <msg>`` durably; never raises."""
        path = self.breadcrumb_path
        if path is None:
            return
        try:
            line = f"{_local_timestamp()} pid={os.getpid()} {_escape_line(_label(msg))}\n"
            size = _append_bytes(path, line.encode("utf-8", "backslashreplace"))
            limit = _env_int(
                "METALGUARD_BREADCRUMB_MAX_BYTES",
                _BREADCRUMB_MAX_DEFAULT,
                minimum=4096,
                maximum=1 << 40,
            )
            if size > limit:
                _rotate(path, limit)
        except Exception as exc:  # forensics must never break the caller
            _log_once(
                "breadcrumb:" + path,
                _WARNING,
                "metal_guard: cannot write breadcrumbs to %s (%s); forensics are lost until this is fixed",
                path,
                exc,
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(breadcrumb_path={self._breadcrumb_path!r})"


def _local_timestamp() -> str:
    import datetime

    return datetime.datetime.now().astimezone().isoformat(timespec="microseconds")


def _rotate(path: str, limit: int) -> None:
    """Move ``path`` to ``path.1`` if it is still over ``limit`` (under the file lock).

    Writers append without the lock; one that opened the file before the
    rename finishes its line in ``.1``, so no acknowledged line is lost.
    """
    try:
        with _FileLock(path + ".lock", timeout=0.0):  # busy: another process is rotating
            st = os.lstat(path)
            if st.st_size <= limit:
                return  # another process rotated first
            _refuse_symlink(path + ".1")
            os.replace(path, path + ".1")
            _fsync_dir(os.path.dirname(path) or ".")
    except (OSError, StateLockTimeout) as exc:
        _log_once(
            "rotate:" + path, _DEBUG, "metal_guard: breadcrumb rotation of %s failed: %s", path, exc
        )


def _tail_lines(path: str, n: int) -> list[str]:
    """The last ``n`` lines of ``path`` (reads only as much of the end as needed)."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError:
        return []
    try:
        end = os.fstat(fd).st_size
        block = 64 << 10
        data = b""
        pos = end
        while pos > 0 and data.count(b"\n") <= n:
            step = min(block, pos)
            pos -= step
            data = os.pread(fd, step, pos) + data
    finally:
        os.close(fd)
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[-n:] if n else []


_guard_getter: list[Callable[[], _BreadcrumbLog]] = []  # set by the MetalGuard section


def _guard_object() -> _BreadcrumbLog:
    """The module's ``metal_guard`` singleton, through the getter its section registers.

    The singleton is built in the runtime tier (it is a ``MetalGuard``); its
    getter reads the module attribute at each call, so an application that
    assigns ``metal_guard.metal_guard = MetalGuard(breadcrumb_path=...)``
    redirects the library's breadcrumbs too.
    """
    return _guard_getter[0]()


def _breadcrumb(msg: str) -> None:
    """Write ``msg`` through the (replaceable) singleton; never raises."""
    try:
        _guard_object().breadcrumb(msg)
    except Exception as exc:  # an application's replacement may be broken
        _log_once("breadcrumb-hook", _DEBUG, "metal_guard: breadcrumb hook failed: %r", exc)


def read_breadcrumbs(n: int = 200, path: StrPath | None = None) -> list[str]:
    """The last ``n`` breadcrumb lines, oldest first (including the rotated ``.1``)."""
    n = _int_arg("n", n, minimum=0)
    target = _str_path("path", path) if path is not None else _guard_object().breadcrumb_path
    if not target or n == 0:
        return []
    lines = _tail_lines(target, n)
    if len(lines) < n:
        lines = _tail_lines(target + ".1", n - len(lines)) + lines
    return lines


# =============================================================================
# 2.1 MLX access — the only place that touches ``mlx.core``; memory numbers.
#
# MLX is optional: it is looked up at call time (``sys.modules`` first, so a
# fake ``mlx.core`` installed by a test suite is honoured), and when it is absent
# every MLX step is a no-op. Each step runs best-effort: a failing hook logs and
# carries on, because a broken guard must never make inference worse than none.
#
# Provides: MemoryStats, MetalOOMError, _as_stream_list, _generation_stream, _mlx, _mlx_fn,
#   _mlx_step, _stats_line, _synchronize
# Uses: Prelude
# =============================================================================

_mlx_lock = _thread.allocate_lock()
# sys.path snapshots under which ``import mlx.core`` already failed; a failed
# import costs a full path scan, so it is not repeated until sys.path changes.
_mlx_missing_for: set[tuple[str, ...]] = set()


@_on_reset
def _forget_missing_mlx() -> None:
    with _mlx_lock:
        _mlx_missing_for.clear()


def _mlx() -> ModuleType | None:
    """``mlx.core`` if it can be imported, else ``None`` (never raises)."""
    mod = sys.modules.get("mlx.core")
    if mod is not None:
        return mod
    if "mlx.core" in sys.modules:  # explicitly blocked with sys.modules[...] = None
        return None
    key = tuple(sys.path)
    if key in _mlx_missing_for:
        return None
    import importlib

    try:
        return importlib.import_module("mlx.core")
    except ImportError:
        pass
    except Exception as exc:  # a broken install: say so once, then behave as absent
        _log_once(
            "mlx-import",
            _WARNING,
            "metal_guard: importing mlx.core failed (%r); MLX steps are skipped",
            exc,
        )
    with _mlx_lock:
        _mlx_missing_for.add(key)
    return None


def _mlx_fn(mx: ModuleType, name: str) -> Callable[..., Any] | None:
    """``mx.<name>``, falling back to ``mx.metal.<name>`` on MLX versions before 0.25."""
    fn = getattr(mx, name, None)
    if fn is None:
        fn = getattr(getattr(mx, "metal", None), name, None)
    return fn if callable(fn) else None


def _mlx_step(
    step: str,
    fn: Callable[..., Any] | None,
    *args: Any,
    model_id: object = None,
    level: int = _DEBUG,
) -> bool:
    """Run one MLX step best-effort: True if it ran, False if missing or it raised.

    Failures are logged at ``level`` with the step and model; never raises an
    ``Exception`` (``KeyboardInterrupt`` and ``SystemExit`` still propagate).
    """
    if fn is None:
        return False
    try:
        fn(*args)
        return True
    except Exception as exc:
        if level >= _WARNING and not _first_time(f"mlx-step:{step}:{type(exc).__name__}"):
            level = _DEBUG  # said once already; a hook failing on every call stays quiet
        _log().log(
            level,
            "metal_guard: %s failed for model %s: %s: %s",
            step,
            _label(model_id),
            type(exc).__name__,
            _label(exc),
        )
        return False


def _generation_stream() -> object | None:
    """mlx-lm's ``generation_stream`` if ``mlx_lm.generate`` is already imported.

    Never imports mlx-lm (it costs seconds and changes rlimits). Note that
    ``import mlx_lm.generate`` binds the *function* ``generate``, hence
    ``sys.modules``.
    """
    module = sys.modules.get("mlx_lm.generate")
    return getattr(module, "generation_stream", None) if module is not None else None


def _as_stream_list(streams: object) -> list[object]:
    """Accept one stream, any iterable of streams (a generator too), or ``None``."""
    if streams is None:
        return []
    if hasattr(streams, "__iter__") and not isinstance(streams, (str, bytes)):
        try:
            return list(streams)
        except Exception as exc:  # an odd object: treat it as one stream, as given
            _log().debug("metal_guard: cannot iterate streams=%s: %s", _label(streams), _label(exc))
    return [streams]


def _synchronize(
    mx: ModuleType, streams: object = None, *, model_id: object = None, level: int = _DEBUG
) -> None:
    """Wait for queued MLX work: the default stream, mlx-lm's generation stream, ``streams``.

    A bare ``mx.synchronize()`` waits only for the default stream of the
    default device, while mlx-lm generates on its own stream; releasing
    buffers before that stream drained is the race this library narrows. A
    thread-local stream must be synchronized from the thread that used it.
    """
    sync = _mlx_fn(mx, "synchronize")
    _mlx_step("synchronize", sync, model_id=model_id, level=level)
    extra = _as_stream_list(streams)
    generation_stream = _generation_stream()
    if generation_stream is not None:
        extra.insert(0, generation_stream)
    done: list[object] = []
    for stream in extra:
        if any(stream is seen for seen in done):
            continue
        done.append(stream)
        _mlx_step("synchronize(stream)", sync, stream, model_id=model_id, level=level)


# -- memory numbers -----------------------------------------------------------


@_dataclass(frozen=True)
class MemoryStats:
    """MLX memory numbers of this process (bytes; ``*_gb`` properties in decimal GB).

    The first three fields are the original metal-guard's, in its order;
    ``cache_bytes`` (MLX's buffer cache) and ``footprint_bytes`` (the process's
    physical footprint, which also counts memory MLX does not track) are added
    at the end with defaults, so positional construction stays compatible.
    """

    active_bytes: int = 0
    peak_bytes: int = 0
    limit_bytes: int = 0
    cache_bytes: int = 0
    footprint_bytes: int = 0

    @property
    def active_gb(self) -> float:
        return self.active_bytes / 1e9

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / 1e9

    @property
    def limit_gb(self) -> float:
        return self.limit_bytes / 1e9

    @property
    def cache_gb(self) -> float:
        return self.cache_bytes / 1e9

    @property
    def footprint_gb(self) -> float:
        return self.footprint_bytes / 1e9

    @property
    def in_use_bytes(self) -> int:
        """What the memory layers decide on: ``max(active, footprint)``."""
        return max(self.active_bytes, self.footprint_bytes)

    @property
    def available_gb(self) -> float:
        """``(limit - active) / 1e9`` as the original; negative when over the limit."""
        return (self.limit_bytes - self.active_bytes) / 1e9

    @property
    def active_pct(self) -> float:
        return 100.0 * self.active_bytes / self.limit_bytes if self.limit_bytes else 0.0

    @property
    def peak_pct(self) -> float:
        return 100.0 * self.peak_bytes / self.limit_bytes if self.limit_bytes else 0.0

    def __str__(self) -> str:
        """The original's one line, exactly (code parses it): ``active=1.0GB peak=2.0GB
        limit=48GB avail=47.0GB (active 2% / peak 4%)``."""
        return (
            f"active={self.active_gb:.1f}GB peak={self.peak_gb:.1f}GB "
            f"limit={self.limit_gb:.0f}GB avail={self.available_gb:.1f}GB "
            f"(active {self.active_pct:.0f}% / peak {self.peak_pct:.0f}%)"
        )


def _stats_line(stats: MemoryStats) -> str:
    """``str(stats)`` plus the two numbers the original did not have, for log lines."""
    return f"{stats} cache={stats.cache_gb:.2f}GB footprint={stats.footprint_gb:.2f}GB"


class MetalOOMError(RuntimeError):
    """Metal ran out of memory (after the recovery this library attempted)."""

    def __init__(self, message: str, stats: MemoryStats | None = None) -> None:
        super().__init__(message)
        self.stats = stats

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.stats))


# =============================================================================
# 2.2 Memory numbers — what MLX and the operating system say this process uses.
#
# ``_read_memory_stats()`` never raises: a missing MLX, a failing
# ``device_info()`` or an unreadable footprint each give 0 for that number.
# The footprint is the process's physical footprint (macOS ``proc_pid_rusage``
# → ``ri_phys_footprint``, Linux ``VmRSS``): it also counts memory MLX does not
# track, so the memory layers decide on ``max(active, footprint)``. The load
# baseline is MLX's active memory when this process last admitted a load
# (cadence ``admit``/``mark_load``, ``bench_scoped_load``); the release barrier
# waits for memory to come back to it.
#
# Provides: ReleaseStats, _load_baseline_bytes, _mlx_allocation_mark, _mlx_memory_grew,
#   _read_memory_stats, _remember_load_baseline, _total_memory_bytes
# Uses: Prelude, Processes, Files, MLX access
# =============================================================================

_RUSAGE_INFO_V0 = 0  # <sys/resource.h>: the oldest flavour already has ri_phys_footprint
_footprint_readers: dict[str, Callable[[], int]] = {}  # built on first use (ctypes)
_load_baseline: list[int] = []  # [MLX active bytes when this process last admitted a load]


@_on_reset
def _forget_memory_state() -> None:
    _footprint_readers.clear()
    _load_baseline.clear()


def _libproc() -> Any:
    """The macOS C library that exports ``proc_pid_rusage`` (libSystem)."""
    import ctypes

    try:
        return ctypes.CDLL("/usr/lib/libSystem.B.dylib", use_errno=True)
    except OSError:
        return ctypes.CDLL(None, use_errno=True)


def _darwin_footprint_reader() -> Callable[[], int]:
    """A function returning ``ri_phys_footprint`` of this process (bytes), via ctypes."""
    import ctypes

    u64 = ctypes.c_uint64

    class RusageInfoV0(ctypes.Structure):  # struct rusage_info_v0
        _fields_ = [
            ("ri_uuid", ctypes.c_uint8 * 16),
            ("ri_user_time", u64),
            ("ri_system_time", u64),
            ("ri_pkg_idle_wkups", u64),
            ("ri_interrupt_wkups", u64),
            ("ri_pageins", u64),
            ("ri_wired_size", u64),
            ("ri_resident_size", u64),
            ("ri_phys_footprint", u64),
            ("ri_proc_start_abstime", u64),
            ("ri_proc_exit_abstime", u64),
        ]

    proc_pid_rusage = _libproc().proc_pid_rusage
    proc_pid_rusage.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    proc_pid_rusage.restype = ctypes.c_int

    def read() -> int:
        info = RusageInfoV0()
        if proc_pid_rusage(os.getpid(), _RUSAGE_INFO_V0, ctypes.byref(info)) != 0:
            raise OSError(ctypes.get_errno(), "proc_pid_rusage failed")
        return int(info.ri_phys_footprint)

    return read


def _linux_rss() -> int:
    """The resident set of this process in bytes (``VmRSS``), from ``/proc/self/statm``.

    ``statm``'s second field is the number ``VmRSS`` shows, in pages; it is a
    third of the cost of reading ``/proc/self/status``.
    """
    fd = os.open("/proc/self/statm", os.O_RDONLY | _O_CLOEXEC)
    try:
        fields = os.read(fd, 256).split()
    finally:
        os.close(fd)
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


def _total_memory_bytes() -> int:
    """Physical memory: Metal's ``memory_size``, else pages × page size; 0 when unknown."""
    mx = _mlx()
    device_info = None if mx is None else _mlx_fn(mx, "device_info")
    if device_info is not None:
        try:
            size = device_info().get("memory_size")
            if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                return size
        except Exception as exc:
            _log().debug("metal_guard: device_info() failed: %r", exc)
    try:
        return max(0, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return 0


def _read_footprint_bytes() -> int:
    """This process's physical footprint in bytes; 0 where it cannot be read. Never raises."""
    try:
        platform = _platform()
        if platform == "darwin":
            reader = _footprint_readers.get("darwin")
            if reader is None:
                reader = _footprint_readers["darwin"] = _darwin_footprint_reader()
            return max(0, reader())
        if platform.startswith("linux"):
            return _linux_rss()
    except Exception as exc:  # no libproc, no /proc: the number is unknown, not an error
        _log_once("footprint", _DEBUG, "metal_guard: cannot read the process footprint: %r", exc)
    return 0


def _mlx_number(mx: ModuleType, name: str) -> int:
    """``mx.<name>()`` as a byte count ≥ 0; 0 when missing or failing (DEBUG)."""
    fn = _mlx_fn(mx, name)
    if fn is None:
        return 0
    try:
        return max(0, int(fn()))
    except Exception as exc:
        _log().debug("metal_guard: mx.%s() failed: %s", name, _label(exc))
        return 0


def _read_memory_stats() -> MemoryStats:
    """MLX memory numbers plus the footprint; never raises (unknown numbers are 0)."""
    footprint = _read_footprint_bytes()
    mx = _mlx()
    if mx is None:
        return MemoryStats(footprint_bytes=footprint)
    limit = 0
    device_info = _mlx_fn(mx, "device_info")
    if device_info is not None:
        try:
            limit = max(0, int(device_info().get("max_recommended_working_set_size", 0) or 0))
        except Exception as exc:
            _log().debug("metal_guard: mx.device_info() failed; memory limit unknown: %r", exc)
    return MemoryStats(
        active_bytes=_mlx_number(mx, "get_active_memory"),
        peak_bytes=_mlx_number(mx, "get_peak_memory"),
        limit_bytes=limit,
        cache_bytes=_mlx_number(mx, "get_cache_memory"),
        footprint_bytes=footprint,
    )


def _remember_load_baseline() -> int:
    """Record MLX's active memory now as the release barrier's default baseline.

    Only looks: when ``mlx.core`` is not imported yet, MLX holds nothing (0)
    and it is not imported here. Never raises; returns the recorded bytes.
    """
    mx = sys.modules.get("mlx.core")
    active = _mlx_number(mx, "get_active_memory") if mx is not None else 0
    _load_baseline[:] = [active]
    return active


def _load_baseline_bytes() -> int | None:
    """The baseline recorded by the last admitted load of this process, if any."""
    return _load_baseline[0] if _load_baseline else None


def _mlx_allocation_mark() -> tuple[int, int] | None:
    """MLX's ``(active, peak)`` bytes now; ``None`` while ``mlx.core`` is not imported.

    Only looks, like ``_remember_load_baseline``: MLX is never imported here, and a
    process that has not imported it holds nothing on the GPU. Never raises.
    """
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return None
    return _mlx_number(mx, "get_active_memory"), _mlx_number(mx, "get_peak_memory")


_ALLOCATION_NOISE_BYTES = 64 * 1024  # constants a library creates on import are not a model


def _mlx_memory_grew(mark: tuple[int, int] | None) -> bool:
    """Whether MLX allocated since ``mark`` (``_mlx_allocation_mark``): active or peak
    memory rose by more than 64 KiB (importing mlx-lm alone creates a few bytes)."""
    now = _mlx_allocation_mark()
    if now is None:
        return False
    before = mark or (0, 0)
    return max(now[0] - before[0], now[1] - before[1]) > _ALLOCATION_NOISE_BYTES


@_dataclass(frozen=True)
class ReleaseStats(MemoryStats):
    """What ``wait_for_release`` saw: the last memory numbers, and how the wait went.

    ``baseline_bytes`` is what it waited for (``None``: no baseline, nothing
    to wait for), ``waited_sec`` how long it took, ``released`` whether
    active memory came back within the slack before the timeout.
    """

    baseline_bytes: int | None = None
    waited_sec: float = 0.0
    released: bool = True

    def __str__(self) -> str:
        outcome = "released" if self.released else "NOT released"
        base = "none" if self.baseline_bytes is None else f"{self.baseline_bytes / 1e9:.2f}GB"
        return f"{MemoryStats.__str__(self)}; {outcome} (baseline {base}, waited {self.waited_sec:.2f}s)"


# =============================================================================
# 2.3 Release barrier — wait until MLX memory actually dropped, bounded.
#
# Where the original metal-guard slept a fixed time "to let memory settle",
# this polls the condition with the fixed time as the upper bound:
# synchronize, collect, clear the cache, then poll active memory until it is
# back within ``slack_bytes`` of the baseline or the timeout passes.
#
# Provides: wait_for_release, _RELEASE_SLACK_DEFAULT, _await_memory, _release, _release_args
# Uses: Prelude, Breadcrumbs, MLX access, Memory numbers
# =============================================================================

_RELEASE_SLACK_DEFAULT = 64 << 20
_RELEASE_TIMEOUT_MAX = 3600.0
_POLL_FIRST_SEC = 0.002
_POLL_MAX_SEC = 0.01  # a poll costs ~20 µs: a late answer costs more than polling


def _byte_count(name: str, value: object) -> int:
    """A byte-count argument: a finite real number ≥ 0, as ``int``."""
    return int(_real_arg(name, value, minimum=0))


def _await_memory(
    done: Callable[[MemoryStats], bool],
    timeout: float,
    read: Callable[[], MemoryStats] = _read_memory_stats,
) -> tuple[MemoryStats, float, bool]:
    """Poll ``read()`` until ``done(stats)`` or ``timeout`` s: ``(last stats, waited, done)``."""
    start = time.monotonic()
    delay = _POLL_FIRST_SEC
    while True:
        stats = read()
        waited = time.monotonic() - start
        if done(stats):
            return stats, waited, True
        if waited >= timeout:
            return stats, waited, False
        time.sleep(min(delay, timeout - waited))
        delay = min(delay * 2, _POLL_MAX_SEC)


def _release_stats(
    stats: MemoryStats, baseline: int | None, waited: float, released: bool
) -> ReleaseStats:
    return ReleaseStats(
        stats.active_bytes,
        stats.peak_bytes,
        stats.limit_bytes,
        stats.cache_bytes,
        stats.footprint_bytes,
        baseline_bytes=baseline,
        waited_sec=waited,
        released=released,
    )


def wait_for_release(
    baseline_bytes: int | None = None,
    *,
    timeout: float = 8.0,
    slack_bytes: int = _RELEASE_SLACK_DEFAULT,
) -> ReleaseStats:
    """Wait until MLX's active memory is back near ``baseline_bytes``; return what was seen.

    Synchronizes (default stream, mlx-lm's generation stream), runs
    ``gc.collect()`` and ``mx.clear_cache()``, then polls
    ``mx.get_active_memory()`` until it is at most ``baseline_bytes +
    slack_bytes`` or ``timeout`` seconds passed. The default baseline is the
    active memory recorded when this process last admitted a load (cadence
    ``admit``/``mark_load``, ``bench_scoped_load``); with none it only
    synchronizes, collects and clears. Breadcrumb ``RELEASE: done ...`` or
    ``RELEASE: TIMEOUT ...`` (with one WARNING: something still references
    the model). Returns a ``ReleaseStats`` (a ``MemoryStats`` with
    ``baseline_bytes``, ``waited_sec``, ``released``). Without MLX it returns
    at once.
    """
    return _release(*_release_args(baseline_bytes, timeout, slack_bytes), _breadcrumb)


def _release_args(
    baseline_bytes: object, timeout: object, slack_bytes: object
) -> tuple[int | None, float, int]:
    """``wait_for_release``'s arguments checked: (baseline, timeout, slack)."""
    wait = _seconds_arg("timeout", timeout, maximum=_RELEASE_TIMEOUT_MAX)
    slack = _byte_count("slack_bytes", slack_bytes)
    baseline = (
        _load_baseline_bytes()
        if baseline_bytes is None
        else _byte_count("baseline_bytes", baseline_bytes)
    )
    return baseline, wait, slack


def _release(
    baseline: int | None, wait: float, slack: int, crumb: Callable[[str], None]
) -> ReleaseStats:
    mx = _mlx()
    if mx is None:
        return _release_stats(_read_memory_stats(), baseline, 0.0, True)
    import gc

    start = time.monotonic()
    _synchronize(mx)
    gc.collect()
    clear_cache = _mlx_fn(mx, "clear_cache")
    _mlx_step("clear_cache", clear_cache)
    if baseline is None:
        stats, released = _read_memory_stats(), True
    else:
        limit = baseline + slack
        stats, _, released = _await_memory(lambda s: s.active_bytes <= limit, wait)
        if released:
            _mlx_step("clear_cache", clear_cache)  # what was freed while we polled
    waited = time.monotonic() - start
    base = "none" if baseline is None else f"{baseline / 1e9:.2f}GB"
    if released:
        crumb(f"RELEASE: done active={stats.active_gb:.2f}GB baseline={base} waited={waited:.2f}s")
    else:
        crumb(
            f"RELEASE: TIMEOUT active={stats.active_gb:.2f}GB baseline={base} "
            f"slack={slack / 1e9:.2f}GB waited={waited:.2f}s"
        )
        _log().warning(
            "metal_guard: MLX still holds %.2f GB above the %.2f GB baseline after %.1f s: "
            "something still references the model (drop it, e.g. `del model`, before the wait)",
            (stats.active_bytes - (baseline or 0)) / 1e9,
            (baseline or 0) / 1e9,
            waited,
        )
    return _release_stats(stats, baseline, waited, released)


# =============================================================================
# 3.1 Model identity — what a model id means, without loading the model.
#
# Ids arrive as repo ids, local folders, Hugging Face cache folders or
# ``os.PathLike`` objects. ``canonical_model_id`` is strict (cadence keys on
# it); the lookups built on ``_lenient_model_id`` answer False/None for junk.
#
# Provides: canonical_model_id, is_gemma4_family, _hf_cache_id, _lenient_model_id, _local_config,
#   _model_name, _regex
# Uses: Prelude, Files
# =============================================================================

_MODEL_ID_MAX = 4096
_re_cache: dict[str, Any] = {}


def _regex(name: str, pattern: str) -> Any:
    """Compile ``pattern`` once, on first use (flags go inline: ``(?is)``).

    ``re`` is imported here, not at module import: it alone would double the
    cost of ``import metal_guard`` (measured in ``bench/bench_import.py``).
    """
    rx = _re_cache.get(name)
    if rx is None:
        import re

        rx = _re_cache[name] = re.compile(pattern)
    return rx


def _hf_cache_id(path: str) -> str | None:
    """``ORG/NAME`` for a Hugging Face cache folder, else ``None``."""
    match = _regex(
        "hfcache",
        r"(?:^|[/\\])models--([^/\\]+?)(?:--([^/\\]+))?(?:[/\\]snapshots(?:[/\\][^/\\]+)?)?[/\\]*\Z",
    ).search(path)
    if match is None:
        return None
    org, name = match.group(1), match.group(2)
    return f"{org}/{name}" if name else org


def canonical_model_id(model_id: StrPath) -> str:
    """The id cadence and the registry compare: stripped, HF cache folder → ``ORG/NAME``.

    Case is preserved. Raises ``TypeError`` for anything but ``str`` /
    ``os.PathLike``, ``ValueError`` for an empty or absurdly long id.
    """
    text = _str_path("model_id", model_id).strip()
    if not text:
        raise ValueError("model_id is empty; pass the repo id or local path you load")
    if len(text) > _MODEL_ID_MAX:
        raise ValueError(
            f"model_id is {len(text)} characters long; expected at most {_MODEL_ID_MAX}"
        )
    hf = _hf_cache_id(text)
    if hf is not None:
        return hf
    return text.rstrip("/\\") or text


_canonical_memo: dict[str, str | None] = {}
_CANONICAL_MEMO_MAX = 4096
_on_reset(_canonical_memo.clear)


def _lenient_model_id(model_id: object) -> str | None:
    """``canonical_model_id`` or ``None``; memoised for strings (store keys repeat a lot).

    The memo is a pure cache of a pure function: a race between threads can
    only compute an entry twice, so it needs no lock.
    """
    memo = type(model_id) is str and len(model_id) <= _MODEL_ID_MAX  # never pin huge strings
    if memo:
        try:
            return _canonical_memo[model_id]  # type: ignore[index]
        except KeyError:  # not seen yet (or the memo was just cleared)
            pass
    try:
        canonical: str | None = canonical_model_id(model_id)  # type: ignore[arg-type]
    except Exception:  # TypeError/ValueError, or anything a hostile object raises
        canonical = None
    if memo:
        if len(_canonical_memo) >= _CANONICAL_MEMO_MAX:
            _canonical_memo.clear()
        _canonical_memo[model_id] = canonical  # type: ignore[index]
    return canonical


def _model_name(canonical: str) -> str:
    """The last path component: ``org/gemma-4-31b-it`` → ``gemma-4-31b-it``."""
    return canonical.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


_GEMMA4_MODEL_TYPES = frozenset({"gemma4", "gemma4_text", "gemma4_unified"})
_CONFIG_MAX_BYTES = 1 << 20


def _read_model_config(folder: str) -> dict[str, Any] | None:
    """``folder/config.json`` as a dict, or ``None`` (missing, too big, not JSON, not an object)."""
    # Hugging Face snapshots hold config.json as a symlink into blobs/: follow it
    # (this is a read of someone else's file, never a write).
    return _read_json_object(
        os.path.join(folder, "config.json"), _CONFIG_MAX_BYTES, follow_symlinks=True
    )


def _local_config(model_id: object) -> dict[str, Any] | None:
    """The ``config.json`` of the local model folder ``model_id`` names, else ``None``.

    A repo id (no such folder) or junk reads as ``None``: the open fails, no
    ``isdir`` first. ``model_id`` must be one ``canonical_model_id`` accepts.
    """
    return _read_model_config(_str_path("model_id", model_id).strip())


def _config_model_types(model_id: object) -> list[str] | None:
    """``model_type`` values in the local model's ``config.json`` (top level and
    ``text_config``); ``None`` when there is no readable, valid config (callers fall
    back to the name)."""
    config = _local_config(model_id)
    if config is None:
        return None
    types = [config.get("model_type")]
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        types.append(text_config.get("model_type"))
    found = [t for t in types if isinstance(t, str)]
    return found or None


def is_gemma4_family(model_id: object) -> bool:
    """True for Gemma 4 models (any org, local paths, HF cache folders); never raises.

    A local folder with a ``config.json`` is judged by its ``model_type``
    (``gemma4``, ``gemma4_text``, ``gemma4_unified``); otherwise the name must
    be ``gemma-4-<size>[-<variant>]`` with size ``31b``/``12B``/``e4b`` etc.
    """
    canonical = _lenient_model_id(model_id)
    if canonical is None:
        return False
    types = _config_model_types(model_id)
    if types is not None:
        return any(t.lower() in _GEMMA4_MODEL_TYPES for t in types)
    return bool(
        _regex("gemma4", r"(?i)gemma-4-(?:\d+|e\d+)b(?:-.+)?").fullmatch(_model_name(canonical))
    )


_is_gemma4_family = is_gemma4_family


# =============================================================================
# 3.2 Registry — models that kernel-panicked with defences engaged.
#
# Facts from public reports, with their sources. An entry is advice, not a ban.
# Lookups never raise and return copies.
#
# Provides: KNOWN_PANIC_MODELS, check_known_panic_model, warn_if_known_panic_model
# Uses: Prelude, Model identity
# =============================================================================

_UPSTREAM_3186 = "https://github.com/ml-explore/mlx/issues/3186"
_UPSTREAM_3346 = "https://github.com/ml-explore/mlx/issues/3346"
_UPSTREAM_883 = "https://github.com/ml-explore/mlx-lm/issues/883"

KNOWN_PANIC_MODELS: dict[str, dict[str, Any]] = {
    "mlx-community/gemma-4-31b-it-8bit": {
        "tier": "panic",
        "panic_signature": 'IOGPUMemory.cpp:492 "completeMemory() prepare count underflow"',
        "error_classes": ["prepare_count_underflow"],
        "first_observed": "2026-04-23",
        "last_observed": "2026-04-24",
        "reproductions": [
            "2026-04-23 03:14 local, PID 67840: production pipeline on a Mac Studio M1 Ultra 64 GB, "
            "about 6 min from worker ready to panic; cross-model cadence did not exist yet",
            "2026-04-24 03:14 local, PID 26608: same pipeline, about 1.5 min from worker ready to "
            "panic, with the older cadence defences in place",
        ],
        "community": [
            "Medium write-up 'MLX Crashed My Mac': M4 Max 64 GB, same signature; moved to the MoE "
            "model Qwen3-Coder-30B-A3B",
            "lmstudio-bug-tracker#1740: gemma-4 31B hybrid attention (50 sliding + 10 global "
            "layers); about 34 GB of 8-bit weights plus over 20 GB of full-context KV cache do not "
            "fit a 64 GB Mac",
            "ml-explore/mlx-lm#883: M3 Ultra 96 GB, same signature",
        ],
        "upstream": [_UPSTREAM_3186, _UPSTREAM_883, _UPSTREAM_3346],
        "recommendation": (
            "The v0.9.0 defences (cross-model cadence, first-generate flush, per-inference flush) "
            "narrow the race but did not stop panics with this model in the pipeline that reported "
            "it; macOS 26.4.x and the 26.5 beta had not fixed the driver and 96 GB of RAM did not "
            "prevent it. After a repeat panic, serve it with another backend (Ollama, llama.cpp) or "
            "move to an MoE variant such as mlx-community/gemma-4-26b-a4b-it-4bit."
        ),
        "hardware": [
            {"chip": "M1 Ultra", "memory_gb": 64, "os": None},
            {"chip": "M4 Max", "memory_gb": 64, "os": None},
            {"chip": "M3 Ultra", "memory_gb": 96, "os": None},
        ],
        "safer_alternative": "mlx-community/gemma-4-26b-a4b-it-4bit",
    },
    "mlx-community/Qwen3.6-35B-A3B-4bit": {
        "tier": "panic",
        "panic_signature": 'IOGPUMemory.cpp "completeMemory() prepare count underflow"',
        "error_classes": ["prepare_count_underflow"],
        "first_observed": "2026-04-24",
        "last_observed": "2026-04-24",
        "reproductions": [
            "mlx_lm.server with --prompt-cache-bytes 8589934592 on a Mac mini M4 32 GB (macOS 26.4.1 "
            "25E253, IOGPUFamily 130.13, mlx 0.31.2, mlx-lm 0.31.3): panic about 8 min 16 s after "
            "server start during an ordinary throughput benchmark; the cache byte limit did not "
            "prevent it",
        ],
        "community": [
            "ml-explore/mlx#3186 comment of 2026-04-24: the reporter moved production serving to "
            "llama.cpp, although MLX had been 30-55 % faster at prefill",
        ],
        "upstream": [_UPSTREAM_3186],
        "recommendation": (
            "A prompt-cache byte limit is not enough on a 32 GB machine. For long-running servers, "
            "consider llama.cpp or Ollama; if you stay on MLX, never wire memory "
            "(limit_wired_memory(), policy 'off'; leave iogpu.wired_limit_mb at 0) and keep the "
            "per-inference flush on."
        ),
        "hardware": [{"chip": "M4", "memory_gb": 32, "os": "macOS 26.4.1 (25E253)"}],
        "safer_alternative": None,
    },
    "mlx-community/Qwen3.5-122B-A10B-4bit": {
        "tier": "panic",
        "panic_signature": (
            'IOGPUMemory.cpp:550 "completeMemory() prepare count underflow"; also '
            "fPendingMemorySet @IOGPUGroupMemory.cpp:219"
        ),
        "error_classes": ["prepare_count_underflow", "pending_memory_set"],
        "first_observed": None,
        "last_observed": None,
        "reproductions": [
            "M3 Ultra 96 GB, macOS 26.4 (25E246), 4-bit model of about 50 GB: 9 panics in 6 days, "
            "4 of them within 2 hours; IOGPUMemory.cpp:550 seven times, IOGPUGroupMemory.cpp:219 "
            "otherwise",
        ],
        "community": ["ml-explore/mlx#3346 (closed, folded into ml-explore/mlx#3186)"],
        "upstream": [_UPSTREAM_3346, _UPSTREAM_3186],
        "recommendation": (
            "A 50 GB model on a 96 GB machine panicked repeatedly in days. Leave generous headroom "
            "below the GPU working-set limit, space loads with cadence, and switch backend if it "
            "repeats."
        ),
        "hardware": [{"chip": "M3 Ultra", "memory_gb": 96, "os": "macOS 26.4 (25E246)"}],
        "safer_alternative": None,
    },
    "mlx-community/Qwen3-Coder-30B-A3B-Instruct-8bit": {
        "tier": "panic",
        "panic_signature": 'IOGPUMemory.cpp:550 "completeMemory() prepare count underflow"',
        "error_classes": ["prepare_count_underflow"],
        "first_observed": None,
        "last_observed": None,
        "reproductions": [
            "Agentic coding session on an M3 Ultra 96 GB (mlx and mlx-lm 0.30.6) whose context grew "
            "to about 58k tokens, then panicked (reported as Qwen3-Coder-30B-A3B-8bit)",
        ],
        "community": [
            "ml-explore/mlx-lm#883 (closed): a maintainer pointed at a wired limit set too high; "
            "bounding the KV cache by rotation was judged to degrade output",
            "Workload-dependent: the same family was another user's safe alternative at short contexts",
        ],
        "upstream": [_UPSTREAM_883],
        "recommendation": (
            "Workload-dependent: the panic came with a long, growing context. Bound the context "
            "length, never wire memory (limit_wired_memory(), policy 'off'; leave "
            "iogpu.wired_limit_mb at 0), and watch KV growth in long sessions."
        ),
        "hardware": [{"chip": "M3 Ultra", "memory_gb": 96, "os": None}],
        "safer_alternative": None,
    },
}

_WARNED_PANIC_MODELS: set[str] = set()
_warned_panic_lock = _thread.allocate_lock()


@_on_reset
def _forget_warned_panic_models() -> None:
    with _warned_panic_lock:
        _WARNED_PANIC_MODELS.clear()  # the module global as it is now (callers may replace it)


def _copy_json(value: Any) -> Any:
    """Deep copy of plain JSON-like data (dicts, lists, scalars)."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value


def _looks_like_repo_id(text: str) -> bool:
    """``org/name`` (one slash, not a path that starts at /, ., ~ or a drive)."""
    return (
        text.count("/") == 1
        and not text.startswith(("/", ".", "~"))
        and "\\" not in text
        and ":" not in text
    )


def _is_dir(path: str) -> bool:
    try:
        return os.path.isdir(path)
    except (OSError, ValueError):
        return False


def _registry_key(model_id: object) -> str | None:
    """The ``KNOWN_PANIC_MODELS`` key ``model_id`` refers to, case-insensitively, or ``None``."""
    canon = _lenient_model_id(model_id)
    if canon is None:
        return None
    # An HF cache folder is a local copy, whatever organisation uploaded it.
    local_copy = _hf_cache_id(_str_path("model_id", model_id).strip()) is not None
    fold = canon.casefold()
    name = _model_name(canon).casefold()
    by_name = None
    for key in KNOWN_PANIC_MODELS:
        if key.casefold() == fold:
            return key
        org, _, entry_name = key.casefold().rpartition("/")
        if entry_name == name:
            # ``other-org/name`` is another publisher's repo; a local path, an HF
            # cache folder or a bare folder name with the same name is this
            # model. Like ``mlx_lm.load``, an existing folder is a local path
            # even when it reads like ``org/name`` (``models/gemma-4-31b-it-8bit``).
            if (
                _looks_like_repo_id(canon)
                and canon.casefold().split("/")[0] != org
                and not local_copy
                and not _is_dir(canon)
            ):
                continue
            by_name = key
    return by_name


def check_known_panic_model(model_id: object) -> dict[str, Any] | None:
    """The registry entry for ``model_id`` (a copy, with ``model_id`` added), or ``None``."""
    key = _registry_key(model_id)
    if key is None:
        return None
    entry: dict[str, Any] = _copy_json(KNOWN_PANIC_MODELS[key])
    entry["model_id"] = key
    return entry


def warn_if_known_panic_model(model_id: object) -> bool:
    """True if ``model_id`` is a known panic model; the first call per model per process warns once.

    The warning is a WARNING log record and a ``MetalGuardWarning`` (``warnings.warn``,
    attributed to the caller), so it shows on stderr even without logging configured.
    """
    entry = check_known_panic_model(model_id)
    if entry is None:
        return False
    key = entry["model_id"]
    with _warned_panic_lock:
        warned = _WARNED_PANIC_MODELS
        first = key not in warned
        warned.add(key)
    if first:
        message = (
            f"{key!r} is in KNOWN_PANIC_MODELS: a known kernel-panic model "
            f"({entry['tier']} tier; signature: {entry['panic_signature']}). "
            f"{entry['recommendation']}"
        )
        _log().warning("metal_guard: %s", message)
        _warn(message)
    return True


# =============================================================================
# 3.3 Panic signatures — what a panic or error text says happened.
#
# Kernel panics are tried before process-level errors; patterns are bounded
# so a huge text stays linear, and run only when a cheap substring matches.
#
# Provides: detect_panic_signature, _BREAKER_CLOCK_SLACK, _BREAKER_SCHEMA, _BREAKER_SECONDS_MAX,
#   _IOGPU, _IPS_HEAD_MAX, _KERNEL, _PANIC_ARCHIVE_MAX_RECORDS, _PANIC_ARCHIVE_READ_MAX,
#   _PANIC_BUG_TYPE, _PANIC_CACHE_MAX, _PANIC_DIR_ENV_VAR, _PANIC_FIELD_MAX, _PANIC_READ_MAX,
#   _PANIC_REPORT_DIR, _PROCESS, _detect, _panic_archive_cache, _panic_ingest_memo, _panic_lock,
#   _panic_report_cache, _signature_kind
# Uses: Prelude, Model identity
# =============================================================================

_PANIC_REPORT_DIR = "/Library/Logs/DiagnosticReports"
_PANIC_DIR_ENV_VAR = "METALGUARD_PANIC_REPORT_DIR"
_PANIC_READ_MAX = 4 << 20  # a real report is 20-200 KiB; the panic text comes first
_IPS_HEAD_MAX = 4096  # enough for an .ips header line (bug_type is in it)
_PANIC_BUG_TYPE = "210"  # bug_type of kernel panics in Apple's diagnostic reports
_PANIC_CACHE_MAX = 20_000
_PANIC_FIELD_MAX = 500
_PANIC_ARCHIVE_MAX_RECORDS = 1000
_PANIC_ARCHIVE_READ_MAX = 64 << 20
_BREAKER_SCHEMA = 1
_BREAKER_SECONDS_MAX = 366 * 86400.0
_BREAKER_CLOCK_SLACK = 60.0

if TYPE_CHECKING:  # pragma: no cover - typing only
    # name, kind, needles, pattern, what happened, what to do
    _SignatureEntry = tuple[str, str, tuple[str, ...], str, str, str]

_IOGPU, _KERNEL, _PROCESS = "iogpu", "kernel", "process"
_SIGNATURE_LOOKBEHIND = 4096
_LOCATION_WINDOW = 64 << 10

_ADVICE_IOGPU = (
    "No userspace code can fix the driver: wrap every generate in subprocess_inference_guard, "
    "space model loads with require_cadence_clear (cross-model too), call "
    "gemma4_generation_flush before the first generate, and if it repeats with the same model "
    "move to a smaller or MoE model or another backend (`metal-guard models`)."
)

# Signatures in the order they are tried: kernel panics before process-level
# errors. Fields: name, kind, needles, pattern, what happened, what to do. Kind
# ``iogpu`` is an IOGPU driver kernel panic (the only kind the circuit breaker
# counts), ``kernel`` another kernel panic, ``process`` an error inside the
# process (the Mac did not go down). Patterns are searched case-insensitively
# with ``.`` matching newlines; every gap is bounded so a huge text stays linear.
# The pattern runs only when the lower-cased text contains one of the needles
# (one of them occurs in every match): a plain substring search is about 100
# times faster than a case-insensitive alternation on a text without a match.
_PANIC_SIGNATURES: tuple[_SignatureEntry, ...] = (
    (
        "prepare_count_underflow",
        _IOGPU,
        ("underflow",),
        r"prepare\s+count\s+underflow",
        "IOGPU kernel panic: completeMemory() prepare count underflow, the Metal driver's "
        "memory accounting went below zero (ml-explore/mlx#3186)",
        "It follows back-to-back model loads and GPU memory freed while a command buffer is "
        "still in flight. " + _ADVICE_IOGPU,
    ),
    (
        "pending_memory_set",
        _IOGPU,
        ("fpendingmemoryset", "iogpugroupmemory.cpp:219"),
        r"fPendingMemorySet|IOGPUGroupMemory\.cpp:219\b",
        "IOGPU kernel panic: fPendingMemorySet, the driver found GPU memory still pending "
        "while releasing a memory group",
        _ADVICE_IOGPU,
    ),
    (
        "remove_memory_object",
        _IOGPU,
        ("iogpugroupmemory.cpp:323", "remove_memory_object"),
        r"IOGPUGroupMemory\.cpp:323\b|remove_memory_object\s*\(",
        "IOGPU kernel panic in remove_memory_object(), the driver removed a GPU memory object "
        "from a group that no longer tracked it",
        _ADVICE_IOGPU,
    ),
    (
        "pending_in_non_pending_hash",
        _IOGPU,
        ("iogpugroupmemory.cpp:528", "hash"),
        r"IOGPUGroupMemory\.cpp:528\b|non[\s_-]?pending[\s_-]{1,3}hash",
        "IOGPU kernel panic: a pending GPU memory object was found in the non-pending hash",
        _ADVICE_IOGPU,
    ),
    (
        "ctxstore_timeout",
        _IOGPU,
        ("store",),
        r"(?:ctx|context)[\s_-]?store\w{0,40}.{0,200}?time(?:d)?[\s_-]?out",
        "GPU driver kernel panic: context-store timeout, the GPU did not save or restore a "
        "context in time",
        "Often seen under heavy GPU memory pressure. " + _ADVICE_IOGPU,
    ),
    (
        "gpu_watchdog",
        _KERNEL,
        ("watchdogd",),
        r"watchdog\s+timeout:\s+no\s+checkins\s+from\s+watchdogd",
        "Kernel panic: watchdog timeout (no checkins from watchdogd); userspace stopped "
        "responding, usually under extreme memory pressure or swapping. This is not the IOGPU "
        "driver bug and the circuit breaker does not count it",
        "Leave more memory headroom: use a smaller or more quantised model, a shorter context, "
        "or fewer concurrent workers, and watch swap usage.",
    ),
    (
        "cpt_mapcnt_overflow",
        _KERNEL,
        ("cpt_mapcnt_inc",),
        r"cpt_mapcnt_inc\W{0,8}refcnt\s+overflow",
        "Kernel panic: cpt_mapcnt_inc: refcnt overflow, a page-table mapping count in the "
        "kernel's virtual memory system overflowed. This is not the IOGPU driver bug and the "
        "circuit breaker does not count it",
        "Keep the report and file it with Apple (format_panic_for_apple_feedback); note what "
        "was running from the breadcrumbs, and whether it repeats with the same workload.",
    ),
    (
        "metal_oom",
        _PROCESS,
        ("outofmemory", "insufficient"),
        r"kIOGPUCommandBufferCallbackErrorOutOfMemory|Insufficient\s+Memory",
        "Metal command buffer failed with out-of-memory "
        "(kIOGPUCommandBufferCallbackErrorOutOfMemory): the process aborted, the Mac did not "
        "panic",
        "Use a smaller or more quantised model, bound the context / KV cache, lower the batch "
        "size, or free other GPU users; the circuit breaker does not count it.",
    ),
    (
        "impacting_interactivity",
        _PROCESS,
        ("interactivity",),
        r"kIOGPUCommandBufferCallbackErrorImpactingInteractivity|Impacting\s+Interactivity",
        "Metal command buffer killed by the GPU watchdog "
        "(kIOGPUCommandBufferCallbackErrorImpactingInteractivity): one GPU job ran so long that "
        "it stalled the display; the process failed, the Mac did not panic",
        "It happened 4 of 4 times with the display on and 0 of 4 with it off "
        "(ml-explore/mlx#3267): run long jobs with the display asleep or headless, or split the "
        "work into shorter GPU jobs (smaller prefill chunks: recommend_chunk_size). Retrying the "
        "same work as it is will likely fail again; the circuit breaker does not count it.",
    ),
    (
        "gpu_timeout",
        _PROCESS,
        ("timeout",),
        r"kIOGPUCommandBufferCallbackErrorTimeout\b|Caused\s+GPU\s+Timeout",
        "Metal command buffer timed out on the GPU (kIOGPUCommandBufferCallbackErrorTimeout): "
        "the process failed, the Mac did not panic",
        "Split the work into shorter GPU jobs (smaller prefill chunks or batches) and leave the "
        "GPU to one process at a time; restart the process if later GPU work is refused "
        "(submissions_ignored). The circuit breaker does not count it.",
    ),
    (
        "resource_limit",
        _PROCESS,
        ("exceeded",),
        r"Resource\s+limit\s+\(\s*\d{1,12}\s*\)\s+exceeded",
        "MLX hit Metal's limit on live GPU buffers (Resource limit exceeded): the process "
        "failed, the Mac did not panic",
        "Too many arrays are alive at once (an unbounded cache or lists of arrays): release "
        "them, call mx.clear_cache() between requests or restart the worker periodically.",
    ),
    (
        "submissions_ignored",
        _PROCESS,
        ("submissionsignored", "prior/excessive"),
        r"kIOGPUCommandBufferCallbackErrorSubmissionsIgnored|SubmissionsIgnored"
        r"|Ignored\s+\(for\s+causing\s+prior/excessive\s+GPU\s+errors\)",
        "Metal refused this process's GPU work (kIOGPUCommandBufferCallbackErrorSubmissionsIgnored) "
        "after earlier GPU errors: the process's GPU context is degraded; the Mac did not panic",
        "Restart the process: its GPU context does not recover. Look for the first GPU error "
        "before this one (timeout, watchdog, out of memory) and fix that; the circuit breaker "
        "does not count it.",
    ),
)
_PANIC_SIGNATURE_KINDS: dict[str, str] = {entry[0]: entry[1] for entry in _PANIC_SIGNATURES}

_panic_lock = _thread.allocate_lock()
# path → ((size, mtime_ns, inode), record or None for "not a kernel panic")
_panic_report_cache: dict[str, tuple[tuple[int, int, int], dict[str, Any] | None]] = {}
# archive path → ((size, mtime_ns, inode), valid records in file order)
_panic_archive_cache: dict[str, tuple[tuple[int, int, int], list[dict[str, Any]]]] = {}
# archive path → (archive identity after our last ingest, source files already handled)
_panic_ingest_memo: dict[str, tuple[tuple[int, int, int] | None, frozenset[str]]] = {}


@_on_reset
def _reset_panic_caches() -> None:
    """Forget parsed reports, archive reads and ingest memos (tests, benchmarks)."""
    with _panic_lock:
        _panic_report_cache.clear()
        _panic_archive_cache.clear()
        _panic_ingest_memo.clear()


def _signature_kind(name: object) -> str | None:
    """``iogpu`` / ``kernel`` / ``process`` for a signature name, else ``None``."""
    return _PANIC_SIGNATURE_KINDS.get(name) if isinstance(name, str) else None


def _match_signature(text: str) -> tuple[_SignatureEntry, int] | None:
    """The first signature (table order) found in ``text`` and where it matched."""
    lowered = text.lower()
    same_positions = len(lowered) == len(text)  # lower() may lengthen rare characters
    for entry in _PANIC_SIGNATURES:
        hits = [i for i in (lowered.find(needle) for needle in entry[2]) if i >= 0]
        if not hits:
            continue
        rx = _regex("panic-sig:" + entry[0], "(?is)" + entry[3])
        # start near the first needle (a match begins a little before it), then everywhere
        hint = max(0, min(hits) - _SIGNATURE_LOOKBEHIND) if same_positions else 0
        found = rx.search(text, hint) or (rx.search(text) if hint else None)
        if found is not None:
            return entry, found.start()
    return None


def _panic_location(text: str, start: int, kind: str) -> str | None:
    """The ``File.cpp:LINE`` a panic names, searched from the signature's match onwards.

    IOGPU signatures prefer an ``IOGPU*.cpp`` location; otherwise the first one
    near the match (the panic line puts it right after the message).
    """
    source = r"\b([A-Za-z_]\w{0,80}\.(?:cpp|cc|cxx|c|mm|m|h)):(\d{1,6})\b"
    candidates = []
    if kind == _IOGPU:
        candidates.append(_regex("panic-loc-iogpu", r"\b(IOGPU\w{0,80}\.cpp):(\d{1,6})\b"))
    candidates.append(_regex("panic-loc", source))
    low, high = max(0, start - _LOCATION_WINDOW), start + _LOCATION_WINDOW
    for rx in candidates:
        found = rx.search(text, start, high) or rx.search(text, low, high)
        if found is not None:
            return f"{found.group(1)}:{found.group(2)}"
    return None


def _explain(entry: _SignatureEntry, location: str | None) -> str:
    where = f" at {location}" if location else ""
    return f"{entry[4]}{where}. {entry[5]}"


def _detect(text: str) -> tuple[str, str, str, str | None] | None:
    """``(name, kind, explanation, location)`` for ``text``, or ``None``."""
    found = _match_signature(text)
    if found is None:
        return None
    entry, start = found
    location = _panic_location(text, start, entry[1])
    return entry[0], entry[1], _explain(entry, location), location


def detect_panic_signature(text: object) -> tuple[str | None, str | None]:
    """Name a panic or MLX failure from its text: ``(signature, explanation)``.

    Kernel-panic signatures (``prepare_count_underflow``, ``pending_memory_set``,
    ``remove_memory_object``, ``pending_in_non_pending_hash``,
    ``ctxstore_timeout``, ``gpu_watchdog``, ``cpt_mapcnt_overflow``) are tried
    before process-level ones (``metal_oom``, ``impacting_interactivity``,
    ``gpu_timeout``, ``resource_limit``, ``submissions_ignored``). The
    explanation names the ``File.cpp:LINE`` the text reports and says what to
    do. Anything that is not a ``str``, or matches nothing, gives
    ``(None, None)``; never raises.
    """
    if not isinstance(text, str) or not text:
        return None, None
    try:
        found = _detect(text)
    except Exception as exc:  # e.g. MemoryError on an absurd input: never break the caller
        _log_once("detect-panic", _DEBUG, "metal_guard: panic signature detection failed: %r", exc)
        return None, None
    if found is None:
        return None, None
    return found[0], found[2]


# =============================================================================
# 3.4 Panic reports — reading macOS panic reports after the reboot.
#
# Reports are read with bounded reads, never through a symlink, and cached
# by file identity so a re-scan costs one ``stat`` per file.
#
# Provides: parse_panic_reports, _report_dir
# Uses: Prelude, Files, Model identity, Panic signatures
# =============================================================================

# -- reading one report -------------------------------------------------------


def _json_object(text: str) -> dict[str, Any] | None:

    import json

    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


_JSON_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "b": "\b",
    "f": "\f",
    '"': '"',
    "\\": "\\",
    "/": "/",
}


def _unescape_json_fragment(fragment: str) -> str:
    """Decode JSON string escapes in a possibly truncated string body (lenient)."""

    def replace(match: Any) -> str:
        token: str = match.group(1)
        if token[0] == "u" and len(token) == 5:
            code = int(token[1:], 16)
            return "\ufffd" if 0xD800 <= code <= 0xDFFF else chr(code)
        return _JSON_ESCAPES.get(token, token)

    rx = _regex("json-escape", r"(?s)\\(u[0-9a-fA-F]{4}|.)")
    result: str = rx.sub(replace, fragment)
    return result


def _panic_string_fallback(text: str) -> str | None:
    """The ``panicString`` of an invalid or truncated JSON body, found by bounded regex."""
    key = _regex("panic-string-key", r'"(?:panicString|macOSPanicString)"\s*:\s*"').search(text)
    if key is None:
        return None
    # the string body up to its closing quote (or the end of a truncated file)
    body = _regex("json-string-body", r'(?s)[^"\\]*(?:\\.[^"\\]*)*').match(text, key.end())
    return _unescape_json_fragment(body.group(0)) if body is not None else None


def _clip(value: object) -> str | None:
    """A stripped string field of bounded length, or ``None``."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text:
        return None
    return text if len(text) <= _PANIC_FIELD_MAX else text[:_PANIC_FIELD_MAX] + "..."


def _search_group(name: str, pattern: str, text: str) -> str | None:
    found = _regex(name, pattern).search(text)
    return found.group(1) if found is not None else None


def _report_time(value: object) -> float | None:
    """Epoch seconds of a report's ``timestamp`` (``2025-06-01 03:14:15.00 -0700``)."""
    if not isinstance(value, str):
        return None
    import datetime

    text = value.strip()[:64]
    for fmt in ("%Y-%m-%d %H:%M:%S.%f %z", "%Y-%m-%d %H:%M:%S %z"):
        try:
            return datetime.datetime.strptime(text, fmt).timestamp()
        except (ValueError, OverflowError, OSError):
            continue
    return None


def _panic_time(text: str) -> float | None:
    """The ``Calendar: 0x<sec> 0x<usec>`` line, preferably the ``Epoch Time:`` block's.

    Some reports carry the line without the block header; it is read there too.
    """
    calendar = r"Calendar\s*:\s*0x([0-9a-fA-F]{1,16})\s+0x([0-9a-fA-F]{1,16})"
    found = _regex("panic-epoch", r"(?s)Epoch\s+Time:.{0,1000}?" + calendar).search(text)
    if found is None:
        found = _regex("panic-calendar", calendar).search(text)
    if found is None:
        return None
    seconds, micros = int(found.group(1), 16), int(found.group(2), 16)
    if not 0 < seconds < 1 << 40:
        return None
    return seconds + (micros / 1e6 if micros < 1_000_000 else 0.0)


def _os_build(text: str, *versions: object) -> str | None:
    """The macOS build (``24F74``) from the panic text, else from ``macOS 15.5 (24F74)``."""
    build = r"(\d{1,2}[A-Z]\d{1,5}[a-z]?)"
    found = _search_group("panic-os-build", r"(?:Mac\s+)?OS\s+version:\s*" + build + r"\b", text)
    if found is not None:
        return found
    for version in versions:
        if isinstance(version, str):
            found = _search_group("panic-os-paren", r"\(" + build + r"\)", version[:200])
            if found is not None:
                return found
    return None


def _panic_text_fields(text: str) -> dict[str, Any]:
    """Fields found in a panic log (the ``panicString``, or a legacy plain report)."""
    pid: int | None = None
    process: str | None = None
    task = _regex(
        "panic-task",
        r"Panicked\s+task\s+0x[0-9a-fA-F]{1,20}:[^\n]{0,200}?pid\s+(\d{1,10}):[ \t]*([^\n]{0,256})",
    ).search(text)
    if task is not None:
        pid, process = int(task.group(1)), _clip(task.group(2))
    if process is None:  # legacy reports (macOS 11 and older)
        process = _clip(
            _search_group(
                "panic-bsd-name",
                r"BSD\s+process\s+name\s+corresponding\s+to\s+current\s+thread:"
                r"[ \t]*([^\n]{1,256})",
                text,
            )
        )
    kernel = _clip(_search_group("panic-kernel", r"Kernel\s+version:\s*([^\n]{1,400})", text))
    chip = _search_group("panic-chip", r"RELEASE_ARM64_(\w{1,20})", kernel) if kernel else None
    return {
        "pid": pid,
        "process": process,
        "kernel_version": kernel,
        "chip": chip,
        "iogpu_version": _search_group(
            "panic-iogpu", r"com\.apple\.iokit\.IOGPUFamily\s*\(\s*([0-9][0-9.]{0,30})\s*\)", text
        ),
        "panic_line": _clip(_search_group("panic-line", r"(panic\(cpu\s*\d+[^\n]{0,2000})", text)),
    }


def _split_report(text: str) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """``(header, body object or None, body text)`` of a report."""
    first, _, rest = text.partition("\n")
    if first.lstrip().startswith("{"):
        header = _json_object(first)
        if header is not None:
            body_text = rest
            return (
                header,
                _json_object(body_text) if body_text.lstrip().startswith("{") else None,
                rest,
            )
        whole = _json_object(text)  # one JSON document: header and body in one
        if whole is not None:
            return whole, whole, text
    return {}, None, text


def _parse_report_text(text: str, path: str, mtime: float, *, ips: bool) -> dict[str, Any] | None:
    """The record for one report's text, or ``None`` when it is not a kernel panic."""
    header, body, body_text = _split_report(text)
    bug_type = header.get("bug_type")
    if bug_type is not None and str(bug_type).strip() != _PANIC_BUG_TYPE:
        return None  # another kind of diagnostic report
    if ips and bug_type is None:
        return None  # an .ips file counts only with bug_type 210
    panic_text: str | None = None
    if body is not None:
        # Apple silicon: panicString; Intel with a T2 chip: macOSPanicString holds the
        # macOS panic (and panicString the bridgeOS one). Search both.
        texts = [body.get(k) for k in ("panicString", "macOSPanicString")]
        panic_text = "\n".join(t for t in texts if isinstance(t, str)) or None
    if panic_text is None:
        panic_text = _panic_string_fallback(body_text)
    if panic_text is None:
        panic_text = body_text  # legacy plain-text report
    detected = _detect(panic_text)
    if bug_type is None and detected is None and "panic(cpu" not in panic_text:
        return None  # a stray file with a panic-like name
    body = body or {}
    fields = _panic_text_fields(panic_text)
    os_version = _clip(header.get("os_version")) or _clip(body.get("build"))
    ts = _panic_time(panic_text)
    if ts is None:
        ts = _report_time(header.get("timestamp")) or _report_time(body.get("date")) or mtime
    name, kind, explanation, location = detected or (None, None, None, None)
    incident = header.get("incident_id") or body.get("incident")
    record: dict[str, Any] = {
        "ts": float(ts),
        "signature": name,
        "explanation": explanation,
        "pid": fields["pid"],
        "process": fields["process"],
        "os_build": _os_build(panic_text, header.get("os_version"), body.get("build")),
        "iogpu_version": fields["iogpu_version"],
        "source_file": path,
        "kernel_panic": kind != _PROCESS,
        "iogpu_panic": kind == _IOGPU,
        "location": location,
        "chip": fields["chip"],
        "kernel_version": fields["kernel_version"],
        "incident_id": _clip(incident),
        "os_version": os_version,
        "panic_line": fields["panic_line"],
    }
    return record


def _ips_may_be_panic(head: bytes) -> bool:
    """False when an ``.ips`` header line names another ``bug_type`` (no need to read on)."""
    line, newline, _ = head.partition(b"\n")
    if not newline:
        return True  # header longer than the probe: read the whole file to decide
    header = _json_object(line.decode("utf-8", "replace"))
    if header is None or "bug_type" not in header:
        return True  # not a one-line header (a pretty-printed document?): let the parser decide
    return str(header["bug_type"]).strip() == _PANIC_BUG_TYPE


def _report_record(path: str, st: os.stat_result, *, ips: bool) -> dict[str, Any] | None:
    """The (cached) record of one report file; unreadable files are skipped."""
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    with _panic_lock:
        hit = _panic_report_cache.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        record: dict[str, Any] | None = None
        if not ips or _ips_may_be_panic(_read_bounded(path, _IPS_HEAD_MAX)):
            raw = _read_bounded(path, _PANIC_READ_MAX)
            record = _parse_report_text(raw.decode("utf-8", "replace"), path, st.st_mtime, ips=ips)
    except OSError as exc:
        _log().debug("metal_guard: skipping unreadable panic report %s: %s", path, exc)
        return None
    except Exception as exc:  # a pathological file must not break the scan
        _log().debug("metal_guard: cannot parse panic report %s: %r", path, exc)
        record = None
    with _panic_lock:
        if len(_panic_report_cache) >= _PANIC_CACHE_MAX:
            _panic_report_cache.clear()
        _panic_report_cache[path] = (key, record)
    return record


def _is_report_name(name: str) -> tuple[bool, bool]:
    """``(is a candidate, is an .ips file)`` for a file name in the report folder."""
    if name.startswith("."):
        return False, False
    if name.endswith(".ips"):
        return True, True
    return name.endswith(".panic") or name.startswith(("panic-full-", "panic-base-")), False


def _scan_report_folder(folder: str, records: list[dict[str, Any]], *, retired: bool) -> None:
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except (FileNotFoundError, NotADirectoryError):
        return
    except PermissionError as exc:
        _log_once(
            "panic-dir:" + folder,
            _WARNING,
            "metal_guard: cannot list panic reports in %s (%s); the circuit breaker cannot see "
            "kernel panics until this user may read that folder",
            folder,
            exc.strerror,
        )
        return
    except OSError as exc:
        _log_once("panic-dir:" + folder, _DEBUG, "metal_guard: cannot list %s: %s", folder, exc)
        return
    for entry in entries:
        try:
            if entry.is_symlink():
                continue  # never follow a link out of the report folder
            if retired and entry.name == "Retired" and entry.is_dir(follow_symlinks=False):
                _scan_report_folder(entry.path, records, retired=False)
                continue
            candidate, ips = _is_report_name(entry.name)
            if not candidate or not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        record = _report_record(entry.path, st, ips=ips)
        if record is not None:
            records.append(dict(record))


def _report_dir(directory: object) -> str:
    if directory is not None:
        return _path_arg("directory", directory)
    return _env_path(_PANIC_DIR_ENV_VAR, _PANIC_REPORT_DIR) or _PANIC_REPORT_DIR


def parse_panic_reports(
    directory: StrPath | None = None, *, since_ts: float | None = None
) -> list[dict[str, Any]]:
    """Kernel-panic reports in ``directory`` (and its ``Retired/``), oldest first.

    ``directory`` defaults to ``METALGUARD_PANIC_REPORT_DIR`` or
    ``/Library/Logs/DiagnosticReports``. Reads ``*.panic``, ``panic-full-*``,
    ``panic-base-*`` and ``.ips`` files with ``bug_type`` 210 (symbolic links
    are skipped, at most 4 MiB of each file is read, unchanged files are not
    read again). Each record has ``ts``, ``signature``, ``explanation``,
    ``pid``, ``process``, ``os_build``, ``iogpu_version``, ``source_file``,
    ``kernel_panic``, ``iogpu_panic``, ``location``, ``chip``,
    ``kernel_version``, ``incident_id``, ``os_version`` and ``panic_line``
    (``None`` where the report does not say). A missing folder gives ``[]``.
    """
    folder = _report_dir(directory)
    since = None if since_ts is None else _real_arg("since_ts", since_ts)
    records: list[dict[str, Any]] = []
    _scan_report_folder(folder, records, retired=True)
    if since is not None:
        records = [r for r in records if r["ts"] >= since]
    records.sort(key=lambda r: (r["ts"], r["source_file"]))
    return records


# =============================================================================
# 3.5 Size and hardware tables — a model's size guessed from its name, and the
# hardware tiers of ``recommended_config``.
#
# Pure functions and data. The size guess is the original metal-guard's
# heuristic (parameter count × bytes per parameter, decimal GB) with its
# known misses fixed: "mini" inside "gemini", ``e4b``, ``8x7B``, and 5-bit /
# fp8 / q8 quantisations.
#
# Provides: _HARDWARE_TIERS, _estimate_model_size_gb, _hardware_tier
# Uses: Prelude, Model identity
# =============================================================================

# Bytes per parameter; the first group that matches the lower-cased name wins.
# ``(?<!\d)`` keeps "16bit" from reading as "6bit"; ``(?<![a-z])`` keeps "q4"
# from matching inside a word.
_QUANT_BYTES: tuple[tuple[str, str, float], ...] = (
    ("q16", r"(?<!\d)16bit|fp16|bf16", 2.0),
    ("q8", r"(?<!\d)8bit|int8|fp8|(?<![a-z])q8", 1.0),
    ("q6", r"(?<!\d)6bit|(?<![a-z])q6", 0.75),
    ("q5", r"(?<!\d)5bit|(?<![a-z])q5", 0.625),
    ("q4", r"(?<!\d)4bit|int4|(?<![a-z])q4|mxfp4|nvfp4|tq4", 0.5),
    ("q3", r"(?<!\d)3bit|int3|tq3|(?<![a-z])q3", 0.375),
    ("q2", r"(?<!\d)2bit|int2|(?<![a-z])q2", 0.25),
)
_DEFAULT_BYTES_PER_PARAM = 2.0  # no quantisation in the name: fp16/bf16
# Size words when the name holds no parameter count (billions), in this order.
_SIZE_WORDS: tuple[tuple[str, float], ...] = (
    ("mini", 4.0),
    ("small", 7.0),
    ("medium", 13.0),
    ("large", 70.0),
    ("xl", 13.0),
)


def _params_billions(name: str) -> float | None:
    """Parameter count in billions read from a lower-cased model name, or ``None``."""
    # ``(?<![\w.])``, not ``\b``: the "7B" of "A2.7B" is not a parameter count.
    plain = _regex("size-plain", r"(?<![\w.])(\d+(?:\.\d+)?)([bm])\b").search(name)
    if plain is not None:
        count = float(plain.group(1))
        return count / 1000.0 if plain.group(2) == "m" else count
    experts = _regex("size-moe", r"(?<![\w.])(\d+)x(\d+(?:\.\d+)?)b\b").search(name)
    if experts is not None:  # 8x7B: every expert in memory (shared layers make it an upper bound)
        return float(experts.group(1)) * float(experts.group(2))
    effective = _regex("size-effective", r"\be(\d+(?:\.\d+)?)b\b").search(name)
    if effective is not None:  # Gemma E2B/E4B: per-layer embeddings about double the raw count
        return 2.0 * float(effective.group(1))
    for word, billions in _SIZE_WORDS:
        if _regex("size-word:" + word, rf"(?<![a-z]){word}(?![a-z])").search(name):
            return billions
    return None


def _estimate_model_size_gb(model_name: object) -> float | None:
    """Weights size in decimal GB guessed from a model id; ``None`` when the name says nothing."""
    if isinstance(model_name, os.PathLike):
        model_name = _label(model_name)
    if not isinstance(model_name, str) or not model_name:
        return None
    name = model_name.lower()
    billions = _params_billions(name)
    if billions is None:
        return None
    per_param = _DEFAULT_BYTES_PER_PARAM
    for key, pattern, nbytes in _QUANT_BYTES:
        if _regex("quant:" + key, pattern).search(name):
            per_param = nbytes
            break
    return billions * per_param


# The original metal-guard's advisory table, by hardware tier.
_HARDWARE_TIERS: dict[str, dict[str, float | int]] = {
    "low": {
        "watchdog_warn_pct": 60.0,
        "watchdog_critical_pct": 75.0,
        "kv_headroom_gb": 2.0,
        "kv_growth_rate_warn": 0.5,
        "cooldown_secs": 3.0,
        "max_concurrent_models": 1,
        "overhead_gb": 3.0,
    },
    "mid": {
        "watchdog_warn_pct": 67.0,
        "watchdog_critical_pct": 82.0,
        "kv_headroom_gb": 4.0,
        "kv_growth_rate_warn": 1.0,
        "cooldown_secs": 2.0,
        "max_concurrent_models": 2,
        "overhead_gb": 2.0,
    },
    "high": {
        "watchdog_warn_pct": 70.0,
        "watchdog_critical_pct": 85.0,
        "kv_headroom_gb": 8.0,
        "kv_growth_rate_warn": 2.0,
        "cooldown_secs": 2.0,
        "max_concurrent_models": 3,
        "overhead_gb": 2.0,
    },
}


def _hardware_tier(memory_gib: float) -> str:
    """``low`` up to 16 GiB, ``mid`` up to 64 GiB, else ``high``; ``unknown`` for 0."""
    if memory_gib <= 0:
        return "unknown"
    if memory_gib <= 16:
        return "low"
    return "mid" if memory_gib <= 64 else "high"


# =============================================================================
# 3.6 Version advisories — MLX, mlx-lm and mlx-vlm releases with known panic- or
# crash-class bugs, and the small PEP 440 matcher that decides which apply.
#
# Installed versions come from package metadata (``importlib.metadata``), never
# from importing the packages: ``import mlx.core`` initialises Metal. Matching
# is our own subset of PEP 440 (``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``,
# ``~=``, ``==X.Y.*``, comma-joined; epochs, pre-, post-, dev- and local
# versions ordered as PEP 440), so ``packaging`` is never imported. A pre- or
# dev-release inside an affected range counts as affected, exactly as
# ``packaging.specifiers.SpecifierSet(spec, prereleases=True)`` (26+) decides:
# ``<V`` and ``>V`` exclude only V's own pre-, post- and local versions.
#
# Provides: check_version_advisories, _SEVERITY_ORDER, _installed_version, _other_metal_guard,
#   _spec_matches
# Uses: Prelude, Model identity
# =============================================================================

_SEVERITY_ORDER: dict[str, int] = {"critical": 0, "high": 1, "medium": 2, "info": 3}
_UNVERIFIED_SYMPTOM = (
    "A {severity}-severity defect reported against {package} {affected}{where}. "
    "The upstream issue describes the trigger and the fix."
)
_UNVERIFIED_MITIGATION = (
    "Use a {package} release outside {affected} (read the upstream issue for the first fixed "
    "release){scope_advice}."
)


def _advisory(
    package: str,
    spec: str,
    issue: str,
    severity: str,
    title: str,
    symptom: str | None = None,
    mitigation: str | None = None,
    scope: str | None = None,
) -> tuple[str, str, dict[str, str]]:
    """One ``(package, spec, advisory)`` entry; ``issue`` is the full ``owner/repo#number``."""
    repo, number = issue.split("#")
    affected = spec.replace(",", ", ")
    where = f" (when running {scope})" if scope else ""
    entry = {
        "issue": issue,
        "severity": severity,
        "title": title,
        "url": f"https://github.com/{repo}/issues/{number}",
        "symptom": symptom
        or _UNVERIFIED_SYMPTOM.format(
            severity=severity, package=package, affected=affected, where=where
        ),
        "mitigation": mitigation
        or _UNVERIFIED_MITIGATION.format(
            package=package,
            affected=affected,
            scope_advice=f", or avoid {scope} on an affected release" if scope else "",
        ),
    }
    if scope:
        entry["scope"] = scope
    return package, spec, entry


# (package, PEP 440 spec, advisory). Entries without a symptom of their own carry
# the upstream issue, range and severity; their text says only what is known.
_VERSION_ADVISORIES: tuple[tuple[str, str, dict[str, str]], ...] = (
    _advisory(
        "mlx-lm",
        "==0.31.2",
        "ml-explore/mlx-lm#1128",
        "high",
        "TokenizerWrapper.think_start_id raises TypeError for tokenizers without thinking tokens",
        "In mlx-lm 0.31.2 the property calls len() on the think-start token list even when the "
        "tokenizer has none (the list is None), so code that reads it to test for thinking "
        "support fails with TypeError instead of getting None.",
        "Call install_upstream_defensive_patches() at start-up (it patches the property in "
        "place on 0.31.2), or use another mlx-lm release (0.32 returns None).",
    ),
    _advisory(
        "mlx-lm",
        "==0.31.2",
        "ml-explore/mlx-lm#1139",
        "high",
        "mlx-lm 0.31.2: high-severity defect",
    ),
    _advisory(
        "mlx-lm",
        "==0.31.2",
        "ml-explore/mlx-lm#1081",
        "medium",
        "mlx-lm 0.31.2: medium-severity defect",
    ),
    _advisory(
        "mlx",
        "<0.31.2",
        "ml-explore/mlx#3348",
        "info",
        "MLX before 0.31.2: upstream issue worth knowing about",
        "Reported against MLX releases before 0.31.2 (informational); it is one of the upstream "
        "issues related to the IOGPU kernel panic that format_panic_for_apple_feedback lists.",
        "Nothing to do urgently; upgrading MLX picks up the upstream change.",
    ),
    _advisory(
        "mlx-vlm",
        "<0.4.5",
        "Blaizzy/mlx-vlm#967",
        "critical",
        "mlx-vlm before 0.4.5: critical defect",
    ),
    _advisory(
        "mlx-vlm", "==0.4.4", "Blaizzy/mlx-vlm#1016", "high", "mlx-vlm 0.4.4: high-severity defect"
    ),
    _advisory(
        "mlx-vlm", "==0.4.4", "Blaizzy/mlx-vlm#1011", "high", "mlx-vlm 0.4.4: high-severity defect"
    ),
    _advisory(
        "mlx-vlm",
        "==0.4.4",
        "Blaizzy/mlx-vlm#943",
        "critical",
        "mlx-vlm 0.4.4 with gemma-4-26b-a4b-it-4bit: critical defect",
        scope="gemma-4-26b-a4b-it-4bit through mlx-vlm",
    ),
    _advisory(
        "mlx",
        "<=0.31.1",
        "ml-explore/mlx#3384",
        "critical",
        "MLX 0.31.1 and earlier: critical defect",
    ),
    _advisory(
        "mlx-lm",
        ">=0.31.0,<=0.31.2",
        "ml-explore/mlx-lm#897",
        "high",
        "mlx_lm.server 0.31.0-0.31.2: high-severity defect",
        scope="mlx_lm.server",
    ),
    _advisory(
        "mlx-vlm",
        "==0.4.4",
        "Blaizzy/mlx-vlm#999",
        "high",
        "mlx_vlm.server 0.4.4: high-severity defect",
        scope="mlx_vlm.server",
    ),
    _advisory(
        "mlx",
        "<=0.31.2",
        "ml-explore/mlx#3350",
        "high",
        "MLX 0.31.2 and earlier: high-severity defect",
    ),
    _advisory(
        "mlx",
        "<=0.31.2",
        "ml-explore/mlx#3390",
        "high",
        "A Metal command-buffer error aborts the process (uncatchable SIGABRT)",
        "When the GPU reports a command-buffer error (a timeout, memory pressure), MLX's "
        "check_error throws from a Metal completion handler running on a system dispatch "
        "queue; the exception reaches std::terminate and the process aborts with SIGABRT. "
        "A try/except around mx.eval() never sees it.",
        "Run MLX work in a worker process (MLXSubprocessRunner, call_model_isolated) so the "
        "abort ends only the worker. The original metal-guard set "
        "AGX_RELAX_CDM_CTXSTORE_TIMEOUT=1 at import as a stop-gap against the GPU timeouts "
        "that trigger it; this library sets no environment variables: export it yourself "
        "before Python starts if you want it (its effect is not measured).",
    ),
    _advisory(
        "mlx",
        "==0.31.2",
        "ml-explore/mlx#3450",
        "critical",
        "MLX 0.31.2: mx.clear_cache() can crash the process with SIGSEGV (regression)",
        "On MLX 0.31.2 mx.clear_cache() can crash the process with a segmentation fault. "
        "metal-guard's flushes call mx.clear_cache(), so on this release they can trigger it too.",
        "Use another MLX release (0.31.1, or a later release with the fix).",
    ),
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    # epoch, release, pre (rank, number), post, dev, local
    _Version = tuple[
        int, tuple[int, ...], tuple[int, int] | None, int | None, int | None, tuple[Any, ...] | None
    ]
    _Clause = tuple[str, _Version, bool]

_PRE_RANK = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}
# PEP 440 "public version" with the normalisations it allows (case, separators,
# implicit numbers, "-N" post-releases, a leading "v"), plus a local label.
_VERSION_PATTERN = (
    r"(?i)\s*v?(?:([0-9]+)!)?([0-9]+(?:\.[0-9]+)*)"
    r"(?:[-_.]?(alpha|a|beta|b|preview|pre|c|rc)[-_.]?([0-9]+)?)?"
    r"(?:-([0-9]+)|[-_.]?(post|rev|r)[-_.]?([0-9]+)?)?"
    r"(?:[-_.]?(dev)[-_.]?([0-9]+)?)?"
    r"(?:\+([a-z0-9]+(?:[-_.][a-z0-9]+)*))?\s*"
)
_SPEC_CACHE_MAX = 256
_spec_cache: dict[str, tuple[_Clause, ...]] = {}
_on_reset(_spec_cache.clear)


def _parse_version(text: str) -> _Version:
    """A PEP 440 version as ``(epoch, release, pre, post, dev, local)``; ``ValueError`` if invalid."""
    found = _regex("pep440", _VERSION_PATTERN).fullmatch(text)
    if found is None:
        raise ValueError(f"not a PEP 440 version: {text!r}")
    g = found.groups()
    pre = None if g[2] is None else (_PRE_RANK[g[2].lower()], int(g[3] or 0))
    post = int(g[4]) if g[4] is not None else int(g[6] or 0) if g[5] is not None else None
    dev = int(g[8] or 0) if g[7] is not None else None
    local = None
    if g[9] is not None:
        parts = _regex("pep440-local", r"[-_.]").split(g[9].lower())
        local = tuple(int(p) if p.isdigit() else p for p in parts)
    release = tuple(int(p) for p in g[1].split("."))
    return int(g[0] or 0), release, pre, post, dev, local


def _version_key(v: _Version) -> tuple[Any, ...]:
    """PEP 440 ordering: trailing zeros ignored, dev < pre < final < post, local last."""
    epoch, release, pre, post, dev, local = v
    end = len(release)
    while end and release[end - 1] == 0:
        end -= 1
    pre_key = ((-1, 0) if post is None and dev is not None else (3, 0)) if pre is None else pre
    local_key: tuple[Any, ...] = (0,)
    if local is not None:  # numbers sort after words, words alphabetically
        local_key = (1, *((1, p, "") if isinstance(p, int) else (0, 0, p) for p in local))
    return (
        epoch,
        release[:end],
        pre_key,
        -1 if post is None else post,
        (1, 0) if dev is None else (0, dev),
        local_key,
    )


def _public(v: _Version) -> _Version:
    return v[0], v[1], v[2], v[3], v[4], None


def _base_key(v: _Version) -> tuple[Any, ...]:
    return _version_key((v[0], v[1], None, None, None, None))


def _release_prefix_matches(candidate: _Version, prefix: tuple[int, ...], epoch: int) -> bool:
    """``==<epoch>!<prefix>.*``: the candidate's release, zero-padded, starts with ``prefix``."""
    release = candidate[1] + (0,) * max(0, len(prefix) - len(candidate[1]))
    return candidate[0] == epoch and release[: len(prefix)] == prefix


def _parse_spec(spec: str) -> tuple[_Clause, ...]:
    """Comma-joined clauses as ``(operator, version, wildcard)``; ``ValueError`` if invalid."""
    cached = _spec_cache.get(spec)
    if cached is not None:
        return cached
    clauses: list[_Clause] = []
    for item in spec.split(","):
        if not item.strip():
            continue
        found = _regex("pep440-spec", r"\s*(~=|===|==|!=|<=|>=|<|>)\s*(\S+?)\s*").fullmatch(item)
        if found is None:
            raise ValueError(f"not a version specifier: {item.strip()!r} (in {spec!r})")
        op, text = found.groups()
        if op == "===":
            raise ValueError(f"arbitrary equality (===) is not supported: {spec!r}")
        wildcard = text.endswith(".*")
        version = _parse_version(text[:-2] if wildcard else text)
        if wildcard and (op not in ("==", "!=") or version[2:] != (None, None, None, None)):
            raise ValueError(f"a .* prefix needs == or != and a plain release: {item.strip()!r}")
        if version[5] is not None and (op not in ("==", "!=") or wildcard):
            raise ValueError(f"a local version (+...) is only allowed with == and !=: {item!r}")
        if op == "~=" and len(version[1]) < 2:
            raise ValueError(f"~= needs at least two release numbers: {item.strip()!r}")
        clauses.append((op, version, wildcard))
    result = tuple(clauses)
    if len(_spec_cache) >= _SPEC_CACHE_MAX:
        _spec_cache.clear()
    _spec_cache[spec] = result
    return result


def _clause_matches(op: str, spec: _Version, wildcard: bool, candidate: _Version) -> bool:
    if op in ("==", "!="):
        if wildcard:
            equal = _release_prefix_matches(candidate, spec[1], spec[0])
        else:  # a spec without a local label ignores the candidate's
            compared = candidate if spec[5] is not None else _public(candidate)
            equal = _version_key(compared) == _version_key(spec)
        return equal if op == "==" else not equal
    public, wanted = _version_key(_public(candidate)), _version_key(spec)
    if op == "<=":
        return public <= wanted
    if op == ">=":
        return public >= wanted
    if op == "~=":
        return public >= wanted and _release_prefix_matches(candidate, spec[1][:-1], spec[0])
    key = _version_key(candidate)
    epoch, release, pre, post, dev, _ = spec
    if op == "<":  # <V admits no pre-release of V itself unless V is one: below V.dev0
        bound = (
            spec if pre is not None or dev is not None else (epoch, release, None, post, 0, None)
        )
        return key < _version_key(bound)
    # >V admits none of V's own later versions: V+local, and the post-releases of a
    # final or pre-release V (those share V's epoch, release and pre segment).
    if dev is not None:
        return key >= _version_key((epoch, release, pre, post, dev + 1, None))
    if post is not None:
        return key >= _version_key((epoch, release, pre, post + 1, 0, None))
    same_family = _base_key(candidate) == _base_key(spec) and candidate[2] == pre
    return key > wanted and not same_family


def _spec_matches(spec: str, version: str) -> bool:
    """True when ``version`` satisfies every clause of ``spec`` (pre-releases included).

    ``ValueError`` when either does not parse. An empty spec matches everything.
    """
    clauses = _parse_spec(spec)
    candidate = _parse_version(version)
    return all(_clause_matches(op, v, wildcard, candidate) for op, v, wildcard in clauses)


def _dist_key(name: str) -> str:
    """A distribution name normalised as PEP 503 does (``MLX_LM`` → ``mlx-lm``)."""
    key: str = _regex("dist-name", r"[-_.]+").sub("-", name)
    return key.lower()


def _installed_version(name: str) -> str | None:
    """The installed version of distribution ``name`` from its metadata, else ``None``."""
    import importlib.metadata

    try:
        version = importlib.metadata.version(name)
    except Exception as exc:  # not installed, or broken metadata
        _log().debug("metal_guard: no version for %s: %r", name, exc)
        return None
    return version if isinstance(version, str) and version.strip() else None


def _other_metal_guard() -> list[str]:
    """What may take this library's place: a ``metal_guard`` that a fresh ``import`` would
    find first on ``sys.path`` when it is not this file, and the distribution ``metal-guard``
    1.x or later (another project of that name). Nothing is imported."""
    import importlib.machinery

    found = []
    try:
        spec = importlib.machinery.PathFinder.find_spec("metal_guard")
    except (ImportError, OSError, ValueError):
        spec = None
    origin = spec.origin if spec is not None else None
    if origin and os.path.realpath(origin) != os.path.realpath(__file__):
        found.append(f"`import metal_guard` finds {origin} first on sys.path, not this file")
    version = _installed_version("metal-guard")
    major = (version or "").split(".", 1)[0]
    if major.isdigit() and int(major) >= 1:
        found.append(
            f"the distribution metal-guard {version} (another project) is installed; "
            "`pip install -U metal-guard` would replace this library"
        )
    return found


def check_version_advisories(*, packages: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Advisories that apply to the installed (or given) MLX, mlx-lm and mlx-vlm versions.

    ``packages`` maps distribution names to versions and replaces the
    installed ones (a package it leaves out is skipped); otherwise versions
    come from package metadata, and packages that are not installed are
    skipped. Each result is a copy of the advisory (``issue``, ``severity``
    — ``critical``/``high``/``medium``/``info`` —, ``title``, ``url``,
    ``symptom``, ``mitigation``, optional ``scope``) plus ``package``,
    ``installed_version`` and ``affected_spec``, in table order. A version
    that is not PEP 440 is skipped (DEBUG). Never imports MLX.
    """
    given: dict[str, str] | None = None
    if packages is not None:
        if not hasattr(packages, "items"):
            raise TypeError(
                f"packages must be a dict of name → version, not {type(packages).__name__}"
            )
        given = {_dist_key(str(k)): str(v) for k, v in packages.items()}
    versions: dict[str, str | None] = {}
    found: list[dict[str, Any]] = []
    for package, spec, advisory in _VERSION_ADVISORIES:
        if package not in versions:
            versions[package] = (
                given.get(_dist_key(package)) if given is not None else _installed_version(package)
            )
        installed = versions[package]
        if installed is None:
            continue
        try:
            matches = _spec_matches(spec, installed)
        except ValueError as exc:
            _log().debug("metal_guard: cannot compare %s %r: %s", package, installed, exc)
            continue
        if matches:
            found.append(
                {
                    **advisory,
                    "package": package,
                    "installed_version": installed,
                    "affected_spec": spec,
                }
            )
    return found


# =============================================================================
# 3.7 Estimators — prefill and KV-cache sizes from a model's dimensions.
#
# The formulas are the original metal-guard's (they are the contract): the
# larger of the attention-score matrix (heads × ctx² × dtype) and the whole
# KV cache (2 × layers × kv_heads × ctx × head_dim × dtype), in decimal GB.
# They over-estimate the score term (fused attention never materialises it)
# and ignore weights, activations and sliding-window layers; they are a
# planning aid. Nothing in the library refuses work on them by itself.
#
# Provides: KNOWN_MODELS, ModelDims, describe_prefill_plan, estimate_prefill_peak_alloc_gb,
#   lookup_dims, recommend_chunk_size, require_prefill_fit
# Uses: Prelude, MLX access, Model identity
# =============================================================================


@_dataclass(frozen=True)
class ModelDims:
    """The dimensions the prefill and KV estimates need (``dtype_bytes``: 2 for fp16/bf16)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2


# name → (n_layers, n_heads, n_kv_heads, head_dim); all fp16/bf16 KV caches.
_KNOWN_MODEL_DIMS: tuple[tuple[str, int, int, int, int], ...] = (
    ("gemma-4-26b-a4b-it-4bit", 62, 16, 16, 256),
    ("gemma-4-e2b-it-4bit", 30, 8, 4, 256),
    ("gemma-4-e4b-it-4bit", 34, 16, 8, 256),
    ("gemma-4-31b-it-8bit", 48, 32, 16, 256),
    ("Mistral-Small-3.2-24B", 56, 32, 8, 128),
    ("pixtral-12b-4bit", 40, 32, 8, 128),
    ("Hermes-3-Llama-3.1-8B-4bit", 32, 32, 8, 128),
    ("LFM2-VL-3B-4bit", 24, 16, 16, 128),
)
_PREFILL_CEILING_GB = 5.0  # describe_prefill_plan's single-allocation ceiling
_PREFILL_HEADROOM_FRACTION = 0.70  # describe_prefill_plan: peak must fit in 70 % of available
_QUANT_SUFFIX = (
    r"(?i)(?:[-_](?:\d+-?bits?|bf16|fp16|f16|fp32|f32|fp8|mxfp[48]|nvfp4|q[2-8](?:_k)?|dwq|awq"
    r"|gptq|mlx))+\Z"
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    KNOWN_MODELS: dict[str, ModelDims]


def _known_models() -> dict[str, ModelDims]:
    """``KNOWN_MODELS``, built on first use (a dataclass instance at import would cost ms)."""
    table: dict[str, ModelDims] | None = globals().get("KNOWN_MODELS")
    if table is None:
        built = {name: ModelDims(*dims) for name, *dims in _KNOWN_MODEL_DIMS}
        table = globals().setdefault("KNOWN_MODELS", built)
    return table


_LAZY_ATTRIBUTES["KNOWN_MODELS"] = _known_models


def _positive_int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _dims_from_config(config: dict[str, Any]) -> ModelDims | None:
    """Dims from a Hugging Face ``config.json`` (the text model's, for VLMs); ``None`` if absent."""
    text = config.get("text_config")
    layers_keys = ("num_hidden_layers", "n_layer", "num_layers")
    if isinstance(text, dict) and _positive_int(config, *layers_keys) is None:
        config = text
    layers = _positive_int(config, *layers_keys)
    heads = _positive_int(config, "num_attention_heads", "n_head")
    if layers is None or heads is None:
        return None
    kv_heads = _positive_int(config, "num_key_value_heads", "num_kv_heads") or heads
    head_dim = _positive_int(config, "head_dim")
    if head_dim is None:
        hidden = _positive_int(config, "hidden_size", "n_embd")
        head_dim = hidden // heads if hidden is not None and hidden >= heads else None
    if head_dim is None:
        return None
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "").lower()
    return ModelDims(layers, heads, kv_heads, head_dim, 4 if dtype in ("float32", "fp32") else 2)


def _dims_base(name: str) -> str:
    """A model name without its quantisation suffix, lower case (``X-4bit`` → ``x``)."""
    base: str = _regex("quant-suffix", _QUANT_SUFFIX).sub("", name)
    return base.lower()


def lookup_dims(model_id: StrPath) -> ModelDims | None:
    """The dims of a model: its local ``config.json``, else the ``KNOWN_MODELS`` table.

    For a local folder (or Hugging Face cache folder) with a ``config.json``,
    the dims come from it. Otherwise, as the original: an exact match of the
    name after the last ``/``, then the first table key contained in the id;
    then, beyond the original, the same name ignoring case and quantisation
    suffixes (``gemma-4-31b-it-4bit`` has the dims of ``gemma-4-31b-it-8bit``).
    Junk input gives ``None``; never raises.
    """
    canonical = _lenient_model_id(model_id)
    if canonical is None:
        return None
    config = _local_config(model_id)
    dims = _dims_from_config(config) if config is not None else None
    if dims is not None:
        return dims
    table = _known_models()
    name = _model_name(canonical)
    if name in table:
        return table[name]
    for key, dims in table.items():
        if key in canonical:
            return dims
    base = _dims_base(name)
    lowered = canonical.lower()
    for key, dims in table.items():
        if _dims_base(key) == base:
            return dims
    for key, dims in table.items():
        if _dims_base(key) in lowered:
            return dims
    return None


def _context_arg(value: object) -> int:
    return _int_arg("context_tokens", value, minimum=0)


def _dims_arg(value: object) -> ModelDims:
    if not isinstance(value, ModelDims):
        raise TypeError(f"dims must be a ModelDims, not {type(value).__name__}")
    return value


def _prefill_peak_gb(context_tokens: int, dims: ModelDims) -> float:
    scores = dims.n_heads * context_tokens * context_tokens * dims.dtype_bytes
    kv_cache = (
        2 * dims.n_layers * dims.n_kv_heads * context_tokens * dims.head_dim * dims.dtype_bytes
    )
    return max(scores, kv_cache) / 1e9


def estimate_prefill_peak_alloc_gb(*, context_tokens: int, dims: ModelDims) -> float:
    """Estimated largest single allocation of a prefill of ``context_tokens`` tokens (GB, 1e9)."""
    return _prefill_peak_gb(_context_arg(context_tokens), _dims_arg(dims))


def require_prefill_fit(
    *,
    context_tokens: int,
    dims: ModelDims,
    available_gb: float,
    single_alloc_ceiling_gb: float = 5.0,
    headroom_pct: float = 0.30,
) -> None:
    """Raise ``MetalOOMError`` when the estimated prefill peak is too big to attempt.

    Too big: above ``single_alloc_ceiling_gb``, or above ``available_gb``
    minus ``headroom_pct`` of it. ``available_gb`` is any finite number: at or
    below 0 (``MemoryStats.available_gb`` over the limit) nothing is available,
    so any prefill is refused. The message says by how much and the chunk
    size that would fit.
    """
    tokens, shape = _context_arg(context_tokens), _dims_arg(dims)
    available = _real_arg("available_gb", available_gb)
    ceiling = _gb_arg("single_alloc_ceiling_gb", single_alloc_ceiling_gb, allow_zero=False)
    headroom = _real_arg("headroom_pct", headroom_pct)
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom_pct must be in [0, 1), got {headroom_pct!r}")
    peak = _prefill_peak_gb(tokens, shape)
    if peak > ceiling:
        chunk = recommend_chunk_size(
            context_tokens=tokens, dims=shape, single_alloc_ceiling_gb=ceiling
        )
        raise MetalOOMError(
            f"Prefill of {tokens} tokens needs an estimated {peak:.2f} GB in one allocation, "
            f"above the {ceiling:g} GB single-alloc ceiling; prefill in chunks of at most "
            f"{chunk} tokens"
        )
    usable = max(available, 0.0) * (1.0 - headroom)
    if peak > usable and available <= 0:
        raise MetalOOMError(
            f"Prefill of {tokens} tokens needs an estimated {peak:.2f} GB but no memory is "
            f"available (available_gb={available:.2f}: active memory is at or over the limit)"
        )
    if peak > usable:
        raise MetalOOMError(
            f"Prefill of {tokens} tokens needs an estimated {peak:.2f} GB but only {usable:.2f} GB "
            f"of the {available:.2f} GB available may be used ({headroom:.0%} kept as headroom)"
        )
    _log().debug("metal_guard: prefill of %d tokens fits (%.3f GB estimated)", tokens, peak)


def recommend_chunk_size(
    *,
    context_tokens: int,
    dims: ModelDims,
    single_alloc_ceiling_gb: float = 4.0,
    min_chunk: int = 512,
) -> int:
    """The largest prefill chunk (tokens) whose estimate stays under the ceiling.

    The whole context when it fits; otherwise a bisection between
    ``min_chunk`` and the context length, to within ``min_chunk`` tokens. The
    result never exceeds the context and is ``min_chunk`` (or the context,
    if shorter) when even that does not fit.
    """
    tokens, shape = _context_arg(context_tokens), _dims_arg(dims)
    ceiling = _gb_arg("single_alloc_ceiling_gb", single_alloc_ceiling_gb, allow_zero=False)
    smallest = _int_arg("min_chunk", min_chunk, minimum=1)
    if _prefill_peak_gb(tokens, shape) <= ceiling:
        return tokens
    low, high = smallest, tokens
    while high - low > smallest:
        middle = (low + high) // 2
        if _prefill_peak_gb(middle, shape) <= ceiling:
            low = middle
        else:
            high = middle
    return min(low, tokens)


def describe_prefill_plan(
    *,
    context_tokens: int,
    model_id: str | None = None,
    dims: ModelDims | None = None,
    available_gb: float | None = None,
) -> dict[str, Any]:
    """A prefill plan as a dict; never raises (bad input is named in ``advisory``).

    Keys: ``model_id``, ``context_tokens``, ``dims_known``, ``peak_alloc_gb``
    (3 decimals), ``fits_ceiling`` (5 GB), ``fits_headroom`` (peak ≤ 70 % of
    ``available_gb``; ``None`` without it; ``False`` when ``available_gb`` is
    at or below 0, i.e. over the limit), ``recommended_chunk_size`` (only
    over the ceiling, for a 4 GB ceiling) and ``advisory`` (text or ``None``).
    ``dims`` wins over ``model_id``, which is looked up with ``lookup_dims``.
    """
    plan: dict[str, Any] = {
        "model_id": model_id if model_id is None or isinstance(model_id, str) else None,
        "context_tokens": None,
        "dims_known": False,
        "peak_alloc_gb": None,
        "fits_ceiling": None,
        "fits_headroom": None,
        "recommended_chunk_size": None,
        "advisory": None,
    }
    try:
        if plan["model_id"] is None and model_id is not None:
            plan["model_id"] = _label(model_id)
        tokens = _context_arg(context_tokens)
        plan["context_tokens"] = tokens
        if dims is not None:
            shape: ModelDims | None = _dims_arg(dims)
        else:
            shape = lookup_dims(model_id) if model_id is not None else None
        if shape is None:
            plan["advisory"] = (
                f"Unknown dimensions for model {plan['model_id']!r}: pass dims=ModelDims(...), "
                "a local model folder with a config.json, or add it to KNOWN_MODELS."
            )
            return plan
        available = None if available_gb is None else _real_arg("available_gb", available_gb)
        peak = _prefill_peak_gb(tokens, shape)
        fits = peak <= _PREFILL_CEILING_GB
        plan.update(dims_known=True, peak_alloc_gb=round(peak, 3), fits_ceiling=fits)
        if available is not None:
            plan["fits_headroom"] = peak <= _PREFILL_HEADROOM_FRACTION * max(available, 0.0)
        if not fits:
            chunk = recommend_chunk_size(context_tokens=tokens, dims=shape)
            plan["recommended_chunk_size"] = chunk
            plan["advisory"] = (
                f"The estimated peak of {peak:.2f} GB is above the {_PREFILL_CEILING_GB:g} GB "
                f"single-alloc ceiling: prefill in chunks of {chunk} tokens."
            )
        elif plan["fits_headroom"] is False and available is not None and available <= 0:
            plan["advisory"] = (
                f"The estimated peak of {peak:.2f} GB does not fit: no memory is available "
                f"(available_gb={available:g}: active memory is at or over the limit). Free "
                "memory first."
            )
        elif plan["fits_headroom"] is False:
            plan["advisory"] = (
                f"The estimated peak of {peak:.2f} GB is more than "
                f"{_PREFILL_HEADROOM_FRACTION:.0%} of the {available:g} GB available: free "
                "memory first or use a shorter context."
            )
    except Exception as exc:  # bad input or a broken object: say so, never raise
        try:
            detail = _label(exc)
        except Exception:
            detail = "(unprintable)"
        plan["advisory"] = f"Cannot plan this prefill: {type(exc).__name__}: {detail}"
    return plan


# =============================================================================
# 3.8 Apple Feedback — a kernel panic formatted for Feedback Assistant.
#
# Pure text formatting, no I/O: the caller collects the facts (a record from
# ``parse_panic_reports``, ``read_breadcrumbs``, ``check_version_advisories``,
# the guards it enabled) and gets Markdown to paste. The "what was active"
# section states only what the ``guards`` entry says.
#
# Provides: format_panic_for_apple_feedback
# Uses: Prelude, Breadcrumbs, Model identity
# =============================================================================

# The original's list, its words first (reports and scripts match them), then the link.
_FEEDBACK_RELATED_ISSUES = (
    ("mlx#3186 (canonical IOGPUFamily panic)", "https://github.com/ml-explore/mlx/issues/3186"),
    ("mlx#3348 (CommandEncoder thread-local)", "https://github.com/ml-explore/mlx/pull/3348"),
    ("mlx#3346 (merged into #3186)", "https://github.com/ml-explore/mlx/issues/3346"),
    ("mlx-lm#1047 (wired_limit correlation)", "https://github.com/ml-explore/mlx-lm/issues/1047"),
)


def _one_line(value: object, default: str = "unknown") -> str:
    """``value`` as one line of text (``default`` when missing or empty)."""
    if value is None or value == "" or value == [] or value == {}:
        return default
    return " ".join(_label(value).split()) or default


def _md_code(text: str) -> str:
    """``text`` as an inline code span that its own backticks cannot close."""
    longest = max((len(run) for run in _regex("backticks", r"`+").findall(text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _feedback_time(value: object) -> str:
    """A panic time: epoch seconds become local ISO time; text is kept as given."""
    seconds = _number(value)
    if seconds is not None:
        import datetime

        try:
            moment = datetime.datetime.fromtimestamp(seconds).astimezone()
            return moment.isoformat(timespec="seconds")
        except (OverflowError, OSError, ValueError):
            pass
    return _one_line(value)


def _guard_lines(guards: object) -> list[str]:
    """What the ``guards`` entry says, one bullet per guard, nothing added."""
    if guards is None:
        return [
            "The forensics do not say which metal-guard defences were active (no `guards` "
            "entry), so this report makes no claim about them."
        ]
    if isinstance(guards, dict):
        items = list(guards.items())
        if not items:
            return ["The forensics list no active metal-guard defences (empty `guards`)."]
        lines = []
        for name, state in items:
            if state is True:
                text = "active"
            elif state is False or state is None:
                text = "not active"
            else:
                text = _one_line(state)
            lines.append(f"- {_one_line(name)}: {text}")
        return ["Defences as recorded in the forensics:", *lines]
    if isinstance(guards, (list, tuple, set, frozenset)):
        names = (
            sorted(_one_line(g) for g in guards)
            if isinstance(guards, (set, frozenset))
            else [_one_line(g) for g in guards]
        )
        if not names:
            return ["The forensics list no active metal-guard defences (empty `guards`)."]
        return ["Defences recorded as active in the forensics:", *(f"- {n}" for n in names)]
    return [f"Defences as recorded in the forensics: {_one_line(guards)}"]


def format_panic_for_apple_feedback(
    forensics: dict[str, Any],
    *,
    include_breadcrumb: bool = True,
    max_breadcrumb_lines: int = 60,
) -> str:
    """A Feedback Assistant report (Markdown) for one kernel panic; pure, no I/O.

    Optional ``forensics`` keys: ``panic_string``, ``panic_time`` (text or
    epoch seconds), ``hardware`` (``chip``, ``gpu_memory_gb``), ``gpu_driver``,
    ``os_version``, ``kernel_version``, ``mlx_versions`` (name → version),
    ``repro_steps`` (list), ``breadcrumbs`` (list of lines), ``advisories``
    (from ``check_version_advisories``) and ``guards`` (a dict name → state
    or a list of active names). Missing facts read ``unknown`` / ``?``. The
    sections carry the original's headers (``**PANIC STRING:**``, ``**TIME:**``,
    ``## System`` … ``## Related upstream issues`` with mlx#3186, mlx#3348,
    mlx#3346, mlx-lm#1047); "What MetalGuard observed" reports ``guards`` and
    nothing else.
    """
    if not isinstance(forensics, dict):
        raise TypeError(f"forensics must be a dict, not {type(forensics).__name__}")
    keep = _int_arg("max_breadcrumb_lines", max_breadcrumb_lines, minimum=0)
    hardware = forensics.get("hardware")
    hardware = hardware if isinstance(hardware, dict) else {}
    memory = hardware.get("gpu_memory_gb")
    lines = [
        f"**PANIC STRING:** {_md_code(_one_line(forensics.get('panic_string')))}",
        f"**TIME:** {_feedback_time(forensics.get('panic_time'))}",
        "",
        "## System",
        "",
        f"- Hardware: {_one_line(hardware.get('chip'))} ({_one_line(memory, '?')} GB GPU memory)",
        f"- macOS: {_one_line(forensics.get('os_version'))}",
        f"- Kernel: {_one_line(forensics.get('kernel_version'))}",
        f"- IOGPUFamily kext: {_one_line(forensics.get('gpu_driver'))}",
    ]
    versions = forensics.get("mlx_versions")
    if isinstance(versions, dict) and versions:
        stack = ", ".join(
            f"{_one_line(k)} {_one_line(v, '?')}" for k, v in sorted(versions.items(), key=str)
        )
    else:
        stack = "unknown"
    lines += [f"- MLX stack: {stack}", "", "## Reproducer", ""]
    steps = forensics.get("repro_steps")
    if isinstance(steps, (list, tuple)) and steps:
        lines += [f"{i}. {_one_line(step)}" for i, step in enumerate(steps, 1)]
    else:
        lines.append("_Steps to reproduce: describe the workload that was running._")
    advisories = forensics.get("advisories")
    if isinstance(advisories, (list, tuple)) and advisories:
        lines += ["", "## Active advisories at panic time", ""]
        for advisory in advisories:
            entry = advisory if isinstance(advisory, dict) else {}
            lines.append(
                f"- [{_one_line(entry.get('severity'), '?')}] "
                f"{_one_line(entry.get('package'), '?')} "
                f"{_one_line(entry.get('installed_version'), '?')} — "
                f"{_one_line(entry.get('title'), _one_line(advisory))} "
                f"({_one_line(entry.get('url'), 'no link')})"
            )
    crumbs = forensics.get("breadcrumbs")
    if include_breadcrumb and keep and isinstance(crumbs, (list, tuple)) and crumbs:
        tail = [_escape_line(_label(line)) for line in crumbs[-keep:]]
        runs = _regex("backticks", r"`+").findall("\n".join(tail))
        fence = "`" * max(3, 1 + max((len(run) for run in runs), default=0))
        lines += ["", f"## Breadcrumb tail (last {len(tail)} lines)", "", fence, *tail, fence]
    lines += ["", "## What MetalGuard observed", "", *_guard_lines(forensics.get("guards"))]
    lines += ["", "## Related upstream issues", ""]
    lines += [f"- {what} — {url}" for what, url in _FEEDBACK_RELATED_ISSUES]
    return "\n".join(lines) + "\n"


# =============================================================================
# 3.9 Process mode (R6) — what kind of process this is, and advisory defaults.
#
# Pure look-ups of ``sys.argv``, ``sys.modules`` and one environment variable;
# nothing is cached (a process can change its mind, e.g. a notebook importing a
# server). ``python -m mlx_lm.server`` is recognised from the ``__main__``
# module's spec, since its ``argv[0]`` is the path of ``server.py``.
#
# Provides: ProcessMode, apply_mode_defaults, describe_process_mode, detect_process_mode,
#   _SUBPROCESS_WORKER_ENV
# Uses: Prelude
# =============================================================================

ProcessMode = str
_SUBPROCESS_WORKER_ENV = "METALGUARD_SUBPROCESS_WORKER"
_SERVER_MODULES = ("mlx_lm.server", "mlx_vlm.server")
_SERVER_PACKAGES = ("mlx_lm", "mlx_vlm")  # ``python -m mlx_lm server`` / ``mlx_lm server``
_SERVER_FRAMEWORKS = ("uvicorn", "gunicorn", "hypercorn", "fastapi")

_MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "server": {
        "generate_timeout_sec": 60,
        "periodic_flush_interval_sec": 60,
        "kv_ceiling_gb": 10,
        "prefill_single_alloc_ceiling_gb": 4.0,
    },
    "embedded": {
        "generate_timeout_sec": 120,
        "periodic_flush_interval_sec": 120,
        "kv_ceiling_gb": 15,
        "prefill_single_alloc_ceiling_gb": 4.5,
    },
    "notebook": {
        "generate_timeout_sec": 600,
        "periodic_flush_interval_sec": 900,
        "kv_ceiling_gb": 30,
        "prefill_single_alloc_ceiling_gb": 5.0,
    },
    "cli": {
        "generate_timeout_sec": 300,
        "periodic_flush_interval_sec": 300,
        "kv_ceiling_gb": 20,
        "prefill_single_alloc_ceiling_gb": 5.0,
    },
    "subprocess_worker": {
        "generate_timeout_sec": 300,
        "periodic_flush_interval_sec": 300,
        "kv_ceiling_gb": 20,
        "prefill_single_alloc_ceiling_gb": 5.0,
        "skip_process_lock": True,
    },
}


def _argv() -> list[str]:
    argv = getattr(sys, "argv", None)
    return [_label(a) for a in argv] if isinstance(argv, (list, tuple)) else []


def _main_module_name() -> str:
    """The dotted name ``python -m`` ran (``""`` for a script, ``-c`` or an embedded interpreter)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    return name if isinstance(name, str) else ""


def _is_mlx_server(argv: list[str]) -> bool:
    main = _main_module_name()
    if main.removesuffix(".__main__") in _SERVER_MODULES:
        return True
    joined = " ".join(argv)
    if "mlx_lm.server" in joined or "mlx.server" in joined:  # the original's rule
        return True
    argv0 = argv[0].replace("\\", "/") if argv else ""
    if any(argv0.endswith(f"/{m.replace('.', '/')}.py") for m in _SERVER_MODULES):
        return True
    # ``python -m mlx_lm server ...`` and the ``mlx_lm server`` console script
    package = main.removesuffix(".__main__") or os.path.basename(argv0)
    return package in _SERVER_PACKAGES and len(argv) > 1 and argv[1] == "server"


def detect_process_mode() -> ProcessMode:
    """``server``, ``notebook``, ``cli``, ``subprocess_worker`` or ``embedded`` (first rule wins).

    A metal-guard worker (``METALGUARD_SUBPROCESS_WORKER=1``); an MLX server
    (``mlx_lm.server`` however started) or a web server (``uvicorn``,
    ``gunicorn``, ``hypercorn``, ``fastapi``); a Jupyter kernel; a script,
    ``python`` or ``pytest``; anything else is ``embedded``.
    """
    if os.environ.get(_SUBPROCESS_WORKER_ENV) == "1":
        return "subprocess_worker"
    argv = _argv()
    if _is_mlx_server(argv):
        return "server"
    argv0 = argv[0] if argv else ""
    base = os.path.basename(argv0)
    if any(name in base or name in argv for name in _SERVER_FRAMEWORKS):
        return "server"
    if "ipykernel" in sys.modules or any("ipykernel_launcher" in a for a in argv):
        return "notebook"
    if "pytest" in base or argv0.endswith("_pytest"):
        return "cli"
    if argv0.endswith(".py") or base == "python" or base.startswith("python"):
        return "cli"
    return "embedded"


def apply_mode_defaults(mode: ProcessMode | None = None) -> dict[str, Any]:
    """The advisory defaults of ``mode`` (detected when ``None``) plus ``mode``.

    An unknown mode gets the ``cli`` defaults, with its own name in ``mode``.
    Advisory only: nothing in the library reads these values.
    """
    name = detect_process_mode() if mode is None else _label(mode)
    defaults = dict(_MODE_DEFAULTS.get(name, _MODE_DEFAULTS["cli"]))
    defaults["mode"] = name
    return defaults


def describe_process_mode() -> dict[str, Any]:
    """``mode``, ``argv0``, ``has_ipykernel``, ``subprocess_worker_env`` and ``defaults``."""
    mode = detect_process_mode()
    argv = _argv()
    return {
        "mode": mode,
        "argv0": argv[0] if argv else "",
        "has_ipykernel": "ipykernel" in sys.modules,
        "subprocess_worker_env": os.environ.get(_SUBPROCESS_WORKER_ENV, ""),
        "defaults": apply_mode_defaults(mode),
    }


# =============================================================================
# 3.10 Cadence rules — the cadence store's format, read and pruned, the
# arithmetic of waiting, and the refusals' exceptions; pure functions.
#
# The store is the original metal-guard's flat JSON object of model id → epoch
# seconds of the last load; our additions (unloads, pids) live under the
# reserved key. What a store says is decided here, without files or locks.
#
# Provides: CadenceStoreError, CadenceViolation, CrossModelCadenceViolation, _Admission,
#   _CadenceEvents, _cadence_spellings, _prune_cadence_store, _rebuild_exception, _wait_sec,
#   _CADENCE_CLOCK_SLACK, _CADENCE_KEEP_SEC, _CADENCE_RESERVED, _CADENCE_SCHEMA,
#   _CADENCE_WAIT_STEP
# Uses: Prelude, Model identity
# =============================================================================

_CADENCE_RESERVED = "__metal_guard__"
_CADENCE_SCHEMA = 1
_CADENCE_KEEP_SEC = 4 * 3600.0
_CADENCE_CLOCK_SLACK = (
    1.0  # seconds in the future tolerated before an entry is "clock stepped back"
)
_CADENCE_WAIT_STEP = 0.05  # added to a wait so the decision after it falls past the window


def _wait_sec(seconds: float) -> float:
    """``seconds`` rounded up to a tenth, so a wait still owed never reads as 0.0 s."""
    import math

    if not _finite(seconds):
        return 0.0 if seconds != seconds or seconds < 0 else seconds
    return max(0.0, math.ceil(round(seconds * 10, 6)) / 10)


class _Admission:
    """What one ``admit`` wrote, so that a load that never happened can be taken back."""

    __slots__ = ("before", "canon", "pid", "pid_before", "ts")

    def __init__(self, canon: str, ts: float, before: dict[str, Any], pid_before: object) -> None:
        self.canon = canon
        self.ts = ts  # the value written under every key in ``before``
        self.pid = os.getpid()
        self.before = before  # key → its value before the admission (None: absent)
        self.pid_before = pid_before


class _CadenceEvents:
    """What a cadence store says, keyed by case-folded canonical id."""

    def __init__(self, data: dict[str, Any], now: float, *, horizon: float | None = None) -> None:
        """``horizon``: skip records dated after it, listing their keys in ``future``."""
        self.now = now
        self.horizon = _INF if horizon is None else horizon
        self.future: set[str] = set()
        self.names: dict[str, str] = {}
        self.loads: dict[str, float] = {}
        self.unloads: dict[str, float] = {}
        self.pids: dict[str, int] = {}
        for key, value in data.items():
            ts = _number(value)
            canon = _lenient_model_id(key) if key != _CADENCE_RESERVED else None
            if ts is None or canon is None:
                continue
            if ts > self.horizon:
                self.future.add(key)
                continue
            fold = canon.casefold()
            if ts >= self.loads.get(fold, float("-inf")):
                self.loads[fold], self.names[fold] = ts, canon
        reserved = data.get(_CADENCE_RESERVED)
        if isinstance(reserved, dict):
            self._read_reserved(reserved)

    def _read_reserved(self, reserved: dict[str, Any]) -> None:
        unloads = reserved.get("unloads")
        for key, value in unloads.items() if isinstance(unloads, dict) else ():
            ts, canon = _number(value), _lenient_model_id(key)
            if ts is not None and ts > self.horizon:
                self.future.add(key)
            elif ts is not None and canon is not None:
                fold = canon.casefold()
                self.unloads[fold] = max(ts, self.unloads.get(fold, float("-inf")))
                self.names.setdefault(fold, canon)
        pids = reserved.get("pids")
        for key, value in pids.items() if isinstance(pids, dict) else ():
            canon = _lenient_model_id(key)
            if canon is not None and isinstance(value, int) and not isinstance(value, bool):
                self.pids[canon.casefold()] = value

    def last_event(self, fold: str) -> float | None:
        """Later of load and unload; a future-dated time (clock stepped back) counts as now."""
        times = [t for t in (self.loads.get(fold), self.unloads.get(fold)) if t is not None]
        return min(max(times), self.now) if times else None

    def latest_other(self, fold: str) -> tuple[str, float] | None:
        best: tuple[str, float] | None = None
        for other in self.names:
            if other == fold:
                continue
            ts = self.last_event(other)
            if ts is not None and (best is None or ts > best[1]):
                best = (self.names[other], ts)
        return best


def _cadence_spellings(mapping: dict[str, Any], canon: str) -> list[str]:
    """Keys of ``mapping`` naming the same model as ``canon`` (any case, HF cache path...)."""
    fold = canon.casefold()
    return [
        key
        for key in mapping
        if key != _CADENCE_RESERVED and (_lenient_model_id(key) or "").casefold() == fold
    ]


def _prune_cadence_store(data: dict[str, Any], now: float, keep: float) -> dict[str, Any]:
    """Drop entries older than ``keep`` s, pull future-dated ones back to ``now``;
    return the reserved object (created when missing)."""
    for key in list(data):
        if key == _CADENCE_RESERVED:
            continue
        ts = _number(data[key])
        if ts is None:
            continue  # not ours to judge; the original metal-guard ignores such values too
        if ts < now - keep:
            del data[key]
        elif ts > now + _CADENCE_CLOCK_SLACK:
            data[key] = now
    reserved = data.get(_CADENCE_RESERVED)
    if not isinstance(reserved, dict):
        reserved = data[_CADENCE_RESERVED] = {}
    reserved["schema"] = _CADENCE_SCHEMA
    unloads = reserved.get("unloads")
    if not isinstance(unloads, dict):
        unloads = reserved["unloads"] = {}
    for key in list(unloads):
        ts = _number(unloads[key])
        if ts is None or ts < now - keep:
            del unloads[key]
        elif ts > now + _CADENCE_CLOCK_SLACK:
            unloads[key] = now
    pids = reserved.get("pids")
    if not isinstance(pids, dict):
        pids = reserved["pids"] = {}
    for key in list(pids):
        if key not in data and key not in unloads:
            del pids[key]
    return reserved


class CadenceViolation(RuntimeError):
    """A model load now would follow the previous load/unload of the same model too soon."""

    def __init__(
        self, model_id: str, last_ts: float, min_interval: float, *, now: float | None = None
    ) -> None:
        now = time.time() if now is None else now
        self.model_id = model_id
        self.last_ts = float(last_ts)
        self.min_interval = float(min_interval)
        self.delta = max(0.0, now - self.last_ts)
        self.remaining_sec = max(0.0, self.min_interval - self.delta)
        super().__init__(self._message())

    def _message(self) -> str:
        return (
            f"Cadence violation: {self.model_id!r} was last loaded/unloaded {self.delta:.1f} s ago; "
            f"the minimum interval between loads is {self.min_interval:g} s. "
            f"Wait {_wait_sec(self.remaining_sec):.1f} s before loading it again."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_exception, (type(self), self.__dict__))


class CrossModelCadenceViolation(CadenceViolation):
    """A model load now would follow another model's load/unload too soon."""

    def __init__(
        self,
        model_id: str,
        last_model: str,
        last_ts: float,
        cross_model_interval: float,
        *,
        now: float | None = None,
    ) -> None:
        self.last_model = last_model
        self.cross_model_interval = float(cross_model_interval)
        super().__init__(model_id, last_ts, cross_model_interval, now=now)

    def _message(self) -> str:
        return (
            f"Cross-model cadence violation: cross-model load of {self.model_id!r} refused: "
            f"{self.last_model!r} was loaded/unloaded {self.delta:.1f} s ago and the cross-model "
            f"interval is {self.cross_model_interval:g} s. "
            f"Wait {_wait_sec(self.remaining_sec):.1f} s before loading {self.model_id!r}."
        )


class CadenceStoreError(RuntimeError):
    """A strict ``CadenceGuard`` could not use its store (unwritable, locked, a symlink...)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"cadence store {path!r} cannot be used: {reason}. Fix the file or its folder "
            "(METALGUARD_HOME), or build the guard without strict=True to fail open."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


def _rebuild_exception(cls: type[BaseException], state: dict[str, Any]) -> BaseException:
    """Unpickle an exception with exactly the attributes it was raised with."""
    exc = cls.__new__(cls)
    exc.__dict__.update(state)
    exc.args = (exc._message(),) if hasattr(exc, "_message") else ()
    return exc


# =============================================================================
# 3.11 Panic triggers — what the breadcrumbs of the minutes before a panic show.
#
# Pure functions over breadcrumb text (the log is fsynced line by line, so it
# survives the reboot): the lines around a panic time, and the likely trigger
# read from them — a load soon after an unload, two processes generating at
# once, a wired-limit request, a generate still in flight, a gemma-4 first
# generate. Each finding quotes the lines it rests on and claims nothing more.
# Also the plain words for a panic signature and the redaction of a home
# folder and user name from text that leaves the machine.
#
# Provides: _breadcrumb_time, _breadcrumbs_around, _likely_triggers, _redact, _signature_words
# Uses: Panic signatures
# =============================================================================

_TRIGGER_WINDOW_SEC = 300.0  # "the minutes before": how far back a trigger is looked for
_TRIGGER_CADENCE_SEC = 180.0  # the default same-model cadence interval
_LOAD_TAGS = ("CADENCE_ADMIT: ", "BENCH_SCOPED_LOAD: direct ", "SUBPROCESS_WORKER: loading ")
_UNLOAD_TAGS = ("CADENCE_UNLOAD: ", "BENCH_SCOPED_LOAD: EXIT ")


def _signature_words(name: object) -> str:
    """What a panic signature means, in plain words (no advice)."""
    for entry in _PANIC_SIGNATURES:
        if entry[0] == name:
            return entry[4]
    return "a kernel panic metal-guard has no name for (read the report itself)"


def _breadcrumb_time(line: str) -> float | None:
    """Epoch seconds of a breadcrumb line (``<ISO time> pid=<n> ...`` or the original's
    ``[YYYY-MM-DD HH:MM:SS] ...``, local time); ``None`` when it has none."""
    import datetime

    stamp = line[1:20] if line.startswith("[") else line.split(" ", 1)[0]
    try:
        moment = datetime.datetime.fromisoformat(stamp)
        if moment.tzinfo is None:
            moment = moment.astimezone()  # the original's lines: local time
        return moment.timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _crumb_parts(line: str) -> tuple[float, int | None, str] | None:
    """``(time, pid, message)`` of a breadcrumb line, or ``None`` without a time."""
    ts = _breadcrumb_time(line)
    if ts is None:
        return None
    if line.startswith("["):
        return ts, None, line[21:].lstrip()
    _, _, rest = line.partition(" ")
    pid: int | None = None
    if rest.startswith("pid="):
        word, _, rest = rest.partition(" ")
        pid = int(word[4:]) if word[4:].isdigit() else None
    return ts, pid, rest


def _breadcrumbs_around(
    lines: list[str], panic_ts: float, *, before: float = _TRIGGER_WINDOW_SEC, after: float = 0.0
) -> list[str]:
    """The lines stamped within ``[panic_ts - before, panic_ts + after]``, in order."""
    kept = []
    for line in lines:
        ts = _breadcrumb_time(line)
        if ts is not None and panic_ts - before <= ts <= panic_ts + after:
            kept.append(line)
    return kept


def _finding(trigger: str, summary: str, lines: list[str]) -> dict[str, Any]:
    return {"trigger": trigger, "summary": summary, "lines": lines}


def _generation_spans(
    events: list[tuple[float, int | None, str, str]],
) -> list[tuple[int, str, str | None]]:
    """``(pid, SUBPROC_PRE line, its SUBPROC_POST line or None)`` for each guarded generate."""
    open_pre: dict[int, str] = {}
    spans: list[tuple[int, str, str | None]] = []
    for _, pid, message, line in events:
        if pid is None:
            continue
        if message.startswith("SUBPROC_PRE: "):
            if pid in open_pre:  # a PRE without its POST (the process died): still open
                spans.append((pid, open_pre[pid], None))
            open_pre[pid] = line
        elif message.startswith("SUBPROC_POST: ") and pid in open_pre:
            spans.append((pid, open_pre.pop(pid), line))
    spans += [(pid, pre, None) for pid, pre in open_pre.items()]
    return spans


def _likely_triggers(
    lines: list[str],
    panic_ts: float,
    *,
    window_sec: float = _TRIGGER_WINDOW_SEC,
    cadence_sec: float = _TRIGGER_CADENCE_SEC,
) -> list[dict[str, Any]]:
    """The likely triggers the breadcrumbs of the ``window_sec`` before ``panic_ts`` show.

    Each finding is ``{"trigger", "summary", "lines"}`` where ``lines`` are the
    breadcrumb lines it rests on. Triggers: ``load_after_unload`` (a load
    within ``cadence_sec`` of an unload), ``concurrent_generation`` (guarded
    generates of two processes overlapping), ``wired_limit_request``,
    ``generate_in_flight`` (a ``SUBPROC_PRE`` with no ``SUBPROC_POST`` before the
    panic) and ``gemma4_first_generate``. Nothing found gives ``[]``.
    """
    events = []
    for line in _breadcrumbs_around(lines, panic_ts, before=window_sec):
        parts = _crumb_parts(line)
        if parts is not None:
            events.append((*parts, line))
    events.sort(key=lambda e: e[0])
    found: list[dict[str, Any]] = []
    unloads = [e for e in events if e[2].startswith(_UNLOAD_TAGS) and " done, " not in e[2]]
    for ts, _, message, line in events:
        if not message.startswith(_LOAD_TAGS):
            continue
        prior = [u for u in unloads if 0 <= ts - u[0] < cadence_sec]
        if prior:
            gap = ts - prior[-1][0]
            found.append(
                _finding(
                    "load_after_unload",
                    f"a model load {gap:.0f} s after an unload (less than the {cadence_sec:g} s "
                    "cadence interval): the driver may still be releasing the unloaded memory",
                    [prior[-1][3], line],
                )
            )
            break
    import itertools

    spans = _generation_spans(events)
    times = {e[3]: e[0] for e in events}
    for (pid_a, pre_a, post_a), (pid_b, pre_b, post_b) in itertools.combinations(spans, 2):
        end_a = times[post_a] if post_a else panic_ts
        end_b = times[post_b] if post_b else panic_ts
        if pid_a != pid_b and times[pre_a] < end_b and times[pre_b] < end_a:
            quoted = [x for x in (pre_a, post_a, pre_b, post_b) if x]
            found.append(
                _finding(
                    "concurrent_generation",
                    f"two processes (pid {pid_a} and pid {pid_b}) were in guarded generation "
                    "at the same time",
                    sorted(quoted, key=lambda x: times[x]),
                )
            )
            break
    wired = [e for e in events if e[2].startswith("WIRED_LIMIT: ")]
    if wired:
        found.append(
            _finding(
                "wired_limit_request",
                f"a wired-limit request {panic_ts - wired[-1][0]:.0f} s before the panic",
                [w[3] for w in wired[-3:]],
            )
        )
    in_flight = [pre for _, pre, post in spans if post is None]
    if in_flight:
        found.append(
            _finding(
                "generate_in_flight",
                "a guarded generate had started and not finished when the Mac panicked",
                in_flight[-2:],
            )
        )
    gemma = [e for e in events if e[2].startswith("GEMMA4_FLUSH")]
    if gemma:
        found.append(
            _finding(
                "gemma4_first_generate",
                f"a gemma-4 first generate began {panic_ts - gemma[0][0]:.0f} s before the panic",
                [g[3] for g in gemma[:2]],
            )
        )
    return found


def _redact(text: str, home: str | None, user: str | None) -> str:
    """``text`` with the home folder written ``~`` and the user name removed."""
    if home and len(home) > 1:
        for spelling in {home.rstrip("/"), os.path.realpath(home).rstrip("/")}:
            if len(spelling) > 1:
                text = text.replace(spelling, "~")
    if user and len(user) > 1:
        import re

        # everywhere (a name inside a longer word too); a two-letter name only as a word
        edge = "" if len(user) > 2 else r"(?<![A-Za-z0-9])"
        pattern = edge + re.escape(user) + (r"(?![A-Za-z0-9])" if edge else "")
        text = re.sub(pattern, "<user>", text, flags=re.IGNORECASE)
    return text


# =============================================================================
# 4.1 Modes (L6) — defensive or observer: whether a refusal raises or is reported.
#
# ``METALGUARD_MODE`` is read on every decision. In ``defensive`` mode (the
# default) every refusal raises its exception. In ``observer`` mode each refusal
# (cadence, circuit breaker, GPU-gate timeout, worker spawn) logs a WARNING and
# writes an ``OBSERVE: would refuse …`` breadcrumb, and the call goes ahead;
# flushes, breadcrumbs and monitors run as usual. The policies call ``_refuse``
# at each refusal, so the mode is decided in one place; ``_ObservedRefusals``
# lets a caller (``metal-guard check``) see what was reported instead of raised.
#
# Provides: DEFENSIVE, OBSERVER, current_mode, describe_mode, is_defensive, is_observer,
#   _ObservedRefusals, _admission_gate, _on_admission, _refuse
# Uses: Prelude, Breadcrumbs
# =============================================================================

DEFENSIVE = "defensive"
OBSERVER = "observer"
_MODE_ENV_VAR = "METALGUARD_MODE"
_MODE_DESCRIPTIONS = {
    DEFENSIVE: (
        "Refusals raise: a cadence violation, the circuit breaker's cooldown, a GPU-gate "
        "timeout, an MLX-lock conflict when a worker starts and a worker's own refusals stop "
        "the call with their exception."
    ),
    OBSERVER: (
        "Refusals are only reported: each one logs a WARNING and writes an 'OBSERVE: would "
        "refuse ...' breadcrumb, and the call goes ahead (a cadence-refused load is still "
        "recorded, a GPU-gate timeout runs the body without the gate). Flushes, breadcrumbs "
        "and monitors run as usual. Not refusals, so they raise in both modes: explicit "
        "MLX-lock calls (acquire_mlx_lock, mlx_exclusive_lock and bench_scoped_load's lock) "
        "and a strict CadenceGuard whose store cannot be used (CadenceStoreError)."
    ),
}
# thread id → the refusals ``_refuse`` reported in that thread while a caller collects them
_observed_refusals: dict[int, list[BaseException]] = {}


def current_mode() -> str:
    """``"defensive"`` or ``"observer"`` from ``METALGUARD_MODE`` (read now; unset → defensive).

    Any other value logs one WARNING per process and means defensive.
    """
    mode = _env_parsed(
        _MODE_ENV_VAR,
        _mode_word,
        expected=f"expected {DEFENSIVE!r} or {OBSERVER!r}",
        default=DEFENSIVE,
    )
    return mode or DEFENSIVE


def _mode_word(text: str) -> str:
    word = text.lower()
    if word not in _MODE_DESCRIPTIONS:
        raise ValueError(text)
    return word


def is_defensive() -> bool:
    return current_mode() == DEFENSIVE


def is_observer() -> bool:
    return current_mode() == OBSERVER


def describe_mode() -> dict[str, str]:
    """``mode``, ``description`` (what the mode does) and ``env_var`` (what the variable says)."""
    mode = current_mode()
    raw = os.environ.get(_MODE_ENV_VAR)
    if raw is None or not raw.strip():
        env = f"{_MODE_ENV_VAR}=<unset> (default → {DEFENSIVE})"
    else:
        env = f"{_MODE_ENV_VAR}={raw!r}"
    return {"mode": mode, "description": _MODE_DESCRIPTIONS[mode], "env_var": env}


def _refuse(exc: BaseException) -> None:
    """Raise ``exc`` (defensive mode), or report it and return (observer mode)."""
    if not is_observer():
        raise exc
    text = _label(exc)
    _log().warning("metal_guard: OBSERVE: would refuse (%s): %s", type(exc).__name__, text)
    _breadcrumb(f"OBSERVE: would refuse {type(exc).__name__}: {text}")
    collected = _observed_refusals.get(_thread.get_ident())
    if collected is not None:
        collected.append(exc)


# Checks every admission of MLX work runs first (load admission, worker start); a
# later policy registers its own (the post-panic gate), so admission needs no
# knowledge of it.
_admission_checks: list[Callable[[], None]] = []


def _on_admission(check: Callable[..., None]) -> Callable[..., None]:
    """Register ``check()`` (raises, or reports through ``_refuse``) to run at every admission."""
    _admission_checks.append(check)
    return check


def _admission_gate() -> None:
    """Run the registered admission checks: MLX work may start when none raised."""
    for check in _admission_checks:
        check()


class _ObservedRefusals:
    """``with _ObservedRefusals() as seen:`` — ``seen`` lists the refusals reported
    (observer mode) by this thread inside the block; they were not raised.
    """

    def __init__(self) -> None:
        self._outer: list[BaseException] | None = None

    def __enter__(self) -> list[BaseException]:
        me = _thread.get_ident()
        self._outer = _observed_refusals.get(me)
        seen: list[BaseException] = []
        _observed_refusals[me] = seen
        return seen

    def __exit__(self, *exc: object) -> None:
        me = _thread.get_ident()
        if self._outer is None:
            _observed_refusals.pop(me, None)
        else:
            _observed_refusals[me] = self._outer


# =============================================================================
# 4.2 Cadence — refuse back-to-back model loads, across processes.
#
# The store's format is section 3.10's. ``admit`` checks and records in one critical section
# under the file lock, so of N racing processes exactly one is admitted. The
# dangerous window follows the unload: intervals count from the later of the two.
# ``wait=`` sleeps with the lock released, then decides again under it. A load
# that raised before MLX allocated anything is taken back, record by exact value.
#
# Provides: CadenceGuard, GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC, cadence_scope,
#   require_cadence_clear, _INTERVAL_MAX, _default_guard
# Uses: Prelude, Files, Locks, JSON state files, Breadcrumbs, Memory numbers, Model identity,
#   Cadence rules, Modes (L6)
# =============================================================================

GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC = 90.0
_CROSS_MODEL_ENV_VAR = "METALGUARD_CROSS_MODEL_INTERVAL"
_CADENCE_PATH_DEFAULT: str | None = None
_INTERVAL_MAX = 7 * 86400.0


_block_crumb_lock = _thread.allocate_lock()
_block_crumb_last: dict[str, float] = {}  # model → event time of the last CADENCE_BLOCK written


@_on_reset
def _forget_block_crumbs() -> None:
    with _block_crumb_lock:
        _block_crumb_last.clear()


def _first_block_of_window(canon: str, event_ts: float) -> bool:
    """True for the first refusal of ``canon`` caused by one event (per process).

    A caller retrying in a tight loop would otherwise write (and fsync) one
    ``CADENCE_BLOCK`` line per attempt and push useful forensics out of the
    rotated log.
    """
    with _block_crumb_lock:
        if _block_crumb_last.get(canon) == event_ts:
            return False
        _block_crumb_last[canon] = event_ts
        return True


def _interval_arg(name: str, value: object) -> float:
    """A cadence interval: seconds up to a week; negative means 0 (the original metal-guard's rule)."""
    return _seconds_arg(name, value, maximum=_INTERVAL_MAX, negative_to_zero=True)


def _wait_arg(value: object) -> float | None:
    """``wait=``: ``False`` → 0 (refuse at once), ``True`` → ``None`` (up to the interval
    that applies), else seconds in ``[0, a week]`` (``TypeError``/``ValueError``)."""
    if value is False:
        return 0.0
    if value is True:
        return None
    return _seconds_arg("wait", value, maximum=_INTERVAL_MAX)


def _cadence_path(path: StrPath | None) -> str:
    if path is not None:
        return _path_arg("path", path)
    if _CADENCE_PATH_DEFAULT:
        return _path_arg("_CADENCE_PATH_DEFAULT", _CADENCE_PATH_DEFAULT)
    return _state_file("cadence.json")


class CadenceGuard:
    """Refuse model loads that follow the previous one too closely.

    Same-model rule: a model loaded/unloaded less than ``min_interval_sec``
    ago → ``CadenceViolation``. Cross-model rule: any *other* model
    loaded/unloaded less than the effective cross interval ago →
    ``CrossModelCadenceViolation``; the effective interval is
    ``cross_model_interval_sec``, raised to at least 90 s when the model
    being loaded is gemma-4 family (even when the base is 0).

    Use ``admit`` (atomic check + record) or ``scope`` (admit, then record
    the unload on exit). An unusable store never blocks inference: one
    WARNING and the call proceeds, unless ``strict=True``.
    """

    def __init__(
        self,
        path: StrPath | None = None,
        *,
        min_interval_sec: float = 180.0,
        cross_model_interval_sec: float = 0.0,
        strict: bool = False,
        lock_timeout: float = 10.0,
    ) -> None:
        self._path = _cadence_path(path)
        self._min_interval = _interval_arg("min_interval_sec", min_interval_sec)
        self._cross_interval = _interval_arg("cross_model_interval_sec", cross_model_interval_sec)
        self.strict = bool(strict)
        self.lock_timeout = _interval_arg("lock_timeout", lock_timeout)

    @property
    def path(self) -> str:
        return self._path

    @property
    def _store(self) -> _JsonFile:
        # Not fsynced: the store spaces the loads of running processes, which share
        # the page cache; a kernel panic ends them all. The CADENCE_ADMIT breadcrumb
        # (fsynced) is what tells which load preceded a panic.
        return _JsonFile(self._path, durable=False, lock_timeout=self.lock_timeout)

    @property
    def min_interval_sec(self) -> float:
        return self._min_interval

    @property
    def cross_model_interval_sec(self) -> float:
        return self._cross_interval

    def effective_cross_interval(self, model_id: object) -> float:
        """The cross-model interval that applies when loading ``model_id``."""
        if is_gemma4_family(model_id):
            return max(self._cross_interval, GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC)
        return self._cross_interval

    # -- store access -------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        """The store for a read-only decision; an unreadable store fails open (or strict raises)."""
        try:
            return self._store.load()
        except _CorruptFile:
            return {}  # quarantined by the next write
        except OSError as exc:
            self._store_failed(exc)
            return {}

    def _update(self, mutate: Callable[[dict[str, Any]], _T]) -> tuple[bool, _T | None]:
        """Locked read-modify-write; ``(False, None)`` when the store is unusable (fail-open)."""
        try:
            return True, self._store.update(mutate)
        except (OSError, StateLockTimeout) as exc:
            self._store_failed(exc)
            return False, None

    def _store_failed(self, exc: BaseException) -> None:
        if self.strict:
            raise CadenceStoreError(self._path, str(exc)) from exc
        _log_once(
            "cadence-store:" + self._path,
            _WARNING,
            "metal_guard: cadence store %s is unusable (%s); loads are NOT being spaced until this is fixed",
            self._path,
            exc,
        )

    def _prune(self, data: dict[str, Any], now: float) -> dict[str, Any]:
        """Drop stale entries, pull future-dated ones back to now; return the reserved object."""
        keep = max(
            _CADENCE_KEEP_SEC,
            self._min_interval,
            self._cross_interval,
            GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC,
        )
        return _prune_cadence_store(data, now, keep)

    def _violation(
        self, canon: str, cross: float, events: _CadenceEvents
    ) -> CadenceViolation | None:
        """The rule ``events`` break for a load of ``canon`` (``cross``: its cross interval)."""
        fold = canon.casefold()
        last = events.last_event(fold)
        if last is not None and events.now - last < self._min_interval:
            return CadenceViolation(canon, last, self._min_interval, now=events.now)
        if cross > 0:
            other = events.latest_other(fold)
            if other is not None and events.now - other[1] < cross:
                return CrossModelCadenceViolation(canon, other[0], other[1], cross, now=events.now)
        return None

    def _record(
        self,
        data: dict[str, Any],
        canon: str,
        ts: float,
        *,
        unload: bool,
        reserved: dict[str, Any] | None = None,
    ) -> None:
        """Record ``canon`` at ``ts``; ``reserved`` is ``_prune``'s result when already pruned."""
        if reserved is None:
            reserved = self._prune(data, time.time())
        mapping = reserved["unloads"] if unload else data
        spellings = _cadence_spellings(mapping, canon)
        # Never move a record backwards: a late or stale mark (another process's
        # delayed unload, a backdated ``ts``) must not shorten anyone's window.
        ts = max([ts, *(t for key in spellings if (t := _number(mapping[key])) is not None)])
        for key in spellings:
            if key == canon:
                continue
            if unload:  # our own key: one spelling is enough
                del mapping[key]
            elif _number(mapping[key]) is not None:
                # A process of the original metal-guard looks its model up by the exact string
                # it was given: keep its spelling current instead of dropping it.
                mapping[key] = ts
        mapping[canon] = ts
        reserved["pids"][canon] = os.getpid()

    # -- public API ---------------------------------------------------------

    def check(self, model_id: StrPath) -> None:
        """Raise ``CadenceViolation`` if loading ``model_id`` now is too soon; records nothing."""
        canon = canonical_model_id(model_id)
        now = time.time()
        # A record dated in the future (the clock stepped back) has no knowable age, and a
        # check never writes, so it cannot repair it: counting it as "now" would block
        # every check until the clock caught up (hours). It is skipped, with a WARNING;
        # the next admit or mark repairs it (so that admission waits one interval).
        events = _CadenceEvents(self._read(), now, horizon=now + _CADENCE_CLOCK_SLACK)
        if events.future:
            _log_once(
                "cadence-future:" + self._path,
                _WARNING,
                "metal_guard: cadence store %s has records dated in the future (%s; the clock "
                "stepped back?); check ignores them, the next admit repairs them",
                self._path,
                ", ".join(sorted(events.future)[:5]),
            )
        violation = self._violation(canon, self.effective_cross_interval(model_id), events)
        if violation is not None:
            _refuse(violation)

    def admit(self, model_id: StrPath, *, wait: bool | float = False) -> bool:
        """Check and record a load in one critical section (atomic across processes).

        Raises ``CadenceViolation`` / ``CrossModelCadenceViolation`` when too
        soon; otherwise the caller may load. Returns whether the load was
        recorded: ``False`` when the store is unusable (it fails open with one
        WARNING; a ``strict`` guard raises instead).

        ``wait=True`` waits until the load is allowed, never longer than the
        interval that applies (plus a second of clock slack); a number waits at
        most that many seconds. Each wait sleeps without the store's lock and is
        followed by a fresh atomic decision; still too soon when the wait is
        spent → the same exceptions as without it. A call that waits logs one
        WARNING naming the model and the wait.
        """
        return self._admit(model_id, wait)[0]

    def _admit(self, model_id: StrPath, wait: object) -> tuple[bool, _Admission | None]:
        """``admit``; also returns what it recorded (``None``: nothing)."""
        budget = _wait_arg(wait)
        canon = canonical_model_id(model_id)
        _admission_gate()  # the post-panic gate (4.9) first
        # Family detection may stat the folder and read its config.json: do it before
        # taking the store's lock, not while every other process waits for it.
        cross = self.effective_cross_interval(model_id)
        observing = is_observer()  # the load goes ahead after a refusal: record it too
        start = time.monotonic()
        deadline = None if budget is None else start + budget
        admission: list[_Admission] = []
        waited = final = False  # final: the last decision (no wait left); observer records

        def decide(data: dict[str, Any]) -> CadenceViolation | None:
            now = time.time()
            reserved = self._prune(data, now)
            violation = self._violation(canon, cross, _CadenceEvents(data, now))
            if violation is None or (observing and final):
                keys = [*_cadence_spellings(data, canon), canon]
                before = {key: data.get(key) for key in keys}
                pid_before = reserved["pids"].get(canon)
                self._record(data, canon, now, unload=False, reserved=reserved)
                admission[:] = [_Admission(canon, data[canon], before, pid_before)]
            return violation

        while True:
            final = deadline is not None and time.monotonic() >= deadline
            stored, violation = self._update(decide)
            if violation is None or final:
                break
            if deadline is None:  # wait=True: bounded by the interval that applies
                deadline = start + violation.min_interval + _CADENCE_CLOCK_SLACK
            pause = max(
                0.0, min(violation.remaining_sec + _CADENCE_WAIT_STEP, deadline - time.monotonic())
            )
            if not waited:
                waited = True
                _log().warning(
                    "metal_guard: cadence: waiting %.1f s before loading %s (%s)",
                    pause,
                    canon,
                    violation,
                )
                _breadcrumb(f"CADENCE_WAIT: {canon} wait={pause:.1f}s")
            time.sleep(pause)  # without the store's lock: others decide meanwhile
        recorded = admission[0] if stored and admission else None
        if violation is not None:
            if _first_block_of_window(canon, violation.last_ts):
                _breadcrumb(
                    f"CADENCE_BLOCK: {canon} wait={_wait_sec(violation.remaining_sec):.1f}s ({violation})"
                )
            _refuse(violation)  # observer mode: one WARNING, and the load goes ahead
            _remember_load_baseline()
            return stored, recorded
        _remember_load_baseline()  # what the release barrier waits for after the unload
        waited_text = f" after waiting {time.monotonic() - start:.1f}s" if waited else ""
        _breadcrumb(
            f"CADENCE_ADMIT: {canon}{waited_text}"
            + ("" if stored else " (store unusable: not recorded)")
        )
        return stored, recorded

    def _take_back(self, admission: _Admission) -> bool:
        """Remove exactly the load record ``admission`` wrote (a load that never happened).

        Under the store's lock: each key still holding our time gets its previous
        value back; a record another process wrote since (a later load, another
        pid) stays. Returns whether anything was taken back.
        """

        def undo(data: dict[str, Any]) -> bool:
            reserved = data.get(_CADENCE_RESERVED)
            pids = reserved.get("pids") if isinstance(reserved, dict) else None
            if (
                not isinstance(pids, dict)
                or pids.get(admission.canon) != admission.pid
                or _number(data.get(admission.canon)) != admission.ts
            ):
                return False
            for key, value in admission.before.items():
                if _number(data.get(key)) != admission.ts:
                    continue
                if value is None:
                    del data[key]
                else:
                    data[key] = value
            if admission.pid_before is None:
                del pids[admission.canon]
            else:
                pids[admission.canon] = admission.pid_before
            return True

        return bool(self._update(undo)[1])

    def mark_load(self, model_id: StrPath, *, ts: float | None = None) -> None:
        """Record that ``model_id`` was loaded now (or at ``ts``, epoch seconds).

        A record never moves backwards: an older ``ts`` than the one stored is ignored.
        """
        self._mark(model_id, ts, unload=False)
        _remember_load_baseline()  # what the release barrier waits for after the unload

    def mark_unload(self, model_id: StrPath, *, ts: float | None = None) -> None:
        """Record that ``model_id`` was unloaded now (or at ``ts``): intervals count from here.

        A record never moves backwards: an older ``ts`` than the one stored is ignored.
        """
        self._mark(model_id, ts, unload=True)

    def _mark(self, model_id: StrPath, ts: float | None, *, unload: bool) -> None:
        canon = canonical_model_id(model_id)
        stamp = time.time() if ts is None else _real_arg("ts", ts)
        self._update(lambda data: self._record(data, canon, stamp, unload=unload))
        if unload:  # what the panic triggers (3.11) read: a load soon after an unload
            _breadcrumb(f"CADENCE_UNLOAD: {canon}")

    def last_ts(self, model_id: StrPath) -> float | None:
        """Epoch seconds the intervals count from: the later of last load and last unload."""
        canon = canonical_model_id(model_id)
        return _CadenceEvents(self._read(), time.time()).last_event(canon.casefold())

    def scope(self, model_id: StrPath, *, wait: bool | float = False) -> _CadenceScope:
        """``with guard.scope(model_id): load, generate, unload`` — admit, then mark the unload.

        ``wait`` as for ``admit``. A body that raises before MLX's memory grew
        loaded nothing: its load record is taken back and no unload is marked.
        """
        canonical_model_id(model_id)
        _wait_arg(wait)
        return _CadenceScope(self, model_id, wait)

    def status(self, *, now: float | None = None) -> dict[str, Any]:
        """What the store says and what is blocked now, for how long (never writes).

        A bad ``now`` is the caller's bug (``TypeError``/``ValueError``).
        """
        now = time.time() if now is None else _real_arg("now", now)
        data, problem = self._store.read()
        events = _CadenceEvents(data, now)
        rows: list[dict[str, Any]] = []
        for fold, name in events.names.items():
            last = events.last_event(fold)
            if last is None:
                continue
            age = max(0.0, now - last)
            rows.append(
                {
                    "model_id": name,
                    "last_load": events.loads.get(fold),
                    "last_unload": events.unloads.get(fold),
                    "last_event": last,
                    "age_sec": age,
                    "pid": events.pids.get(fold),
                    "same_model_blocked_sec": max(0.0, self._min_interval - age),
                }
            )
        rows.sort(key=lambda row: row["last_event"], reverse=True)
        latest_age = rows[0]["age_sec"] if rows else None
        gemma_cross = max(self._cross_interval, GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC)
        return {
            "path": self._path,
            "problem": problem,
            "min_interval_sec": self._min_interval,
            "cross_model_interval_sec": self._cross_interval,
            "gemma4_cross_model_interval_sec": gemma_cross,
            "events": rows,
            "last_model": rows[0]["model_id"] if rows else None,
            "other_models_blocked_sec": 0.0
            if latest_age is None
            else max(0.0, self._cross_interval - latest_age),
            "gemma4_models_blocked_sec": 0.0
            if latest_age is None
            else max(0.0, gemma_cross - latest_age),
        }

    def clear(self, model_id: StrPath | None = None) -> int:
        """Forget every entry (or one model's); returns how many models were removed."""
        fold = None if model_id is None else canonical_model_id(model_id).casefold()

        def remove(data: dict[str, Any]) -> int:
            removed: set[str] = set()
            reserved = data.get(_CADENCE_RESERVED)
            maps: list[dict[str, Any]] = [data]
            if isinstance(reserved, dict):
                maps += [
                    m
                    for m in (reserved.get("unloads"), reserved.get("pids"))
                    if isinstance(m, dict)
                ]
            for mapping in maps:
                for key in list(mapping):
                    canon = _lenient_model_id(key) if key != _CADENCE_RESERVED else None
                    if canon is not None and (fold is None or canon.casefold() == fold):
                        del mapping[key]
                        removed.add(canon.casefold())
            return len(removed)

        return self._update(remove)[1] or 0

    def __repr__(self) -> str:
        return (
            f"CadenceGuard({self._path!r}, min_interval_sec={self._min_interval:g}, "
            f"cross_model_interval_sec={self._cross_interval:g}, strict={self.strict})"
        )


class _CadenceScope:
    """Context manager from ``CadenceGuard.scope``: admit on entry, mark the unload on exit.

    A body that raises before MLX's active (or peak) memory grew did not load:
    its record is taken back instead. Without ``mlx.core`` imported by then,
    nothing can have reached the GPU, so such a failure is not counted either.
    """

    __slots__ = ("_admission", "_mark", "guard", "model_id", "wait")

    def __init__(self, guard: CadenceGuard, model_id: StrPath, wait: object = False) -> None:
        self.guard = guard
        self.model_id = model_id
        self.wait = wait
        self._admission: _Admission | None = None
        self._mark: tuple[int, int] | None = None

    def __enter__(self) -> CadenceGuard:
        self._mark = _mlx_allocation_mark()
        self._admission = self.guard._admit(self.model_id, self.wait)[1]
        return self.guard

    def __exit__(self, *exc: object) -> None:
        admission, self._admission = self._admission, None
        if exc[1] is not None and admission is not None and not _mlx_memory_grew(self._mark):
            self._not_counted(admission, exc[1])
            return
        try:
            self.guard.mark_unload(self.model_id)
        except CadenceStoreError as err:  # strict guard: never mask the body's exception
            if exc[1] is None:
                raise
            _log().warning("metal_guard: %s", err)

    def _not_counted(self, admission: _Admission, error: object) -> None:
        why = f"{type(error).__name__} before MLX memory grew"
        try:
            taken = self.guard._take_back(admission)
        except CadenceStoreError as err:  # strict guard: never mask the body's exception
            _log().warning("metal_guard: %s", err)
            return
        if taken:
            _log().info(
                "metal_guard: cadence: %s is not counted as a load (%s)", admission.canon, why
            )
            _breadcrumb(f"CADENCE_UNCOUNTED: {admission.canon} ({why})")


def _cross_model_interval(explicit: object = 0.0) -> float:
    """The one resolver of the cross-model base interval.

    ``explicit`` when > 0, else ``METALGUARD_CROSS_MODEL_INTERVAL`` (unset or
    empty: 0; a bad value: one WARNING and 0), else 0. gemma-4 targets still
    get their 90 s floor from the guard.
    """
    base = _interval_arg("cross_model_interval_sec", explicit)
    if base > 0:
        return base
    return _env_float(_CROSS_MODEL_ENV_VAR, 0.0, minimum=0.0, maximum=_INTERVAL_MAX)


# The original metal-guard's private name (its test suites call it); one resolver now.
_resolve_cross_model_interval = _cross_model_interval


def _default_guard(min_interval_sec: float, cross_model_interval_sec: float) -> CadenceGuard:
    """The guard ``require_cadence_clear`` builds at the default path."""
    return CadenceGuard(
        min_interval_sec=min_interval_sec,
        cross_model_interval_sec=_cross_model_interval(cross_model_interval_sec),
    )


def require_cadence_clear(
    model_id: StrPath,
    *,
    min_interval_sec: float = 180.0,
    cross_model_interval_sec: float = 0.0,
    guard: CadenceGuard | None = None,
    wait: bool | float = False,
) -> None:
    """Call right before ``mlx_lm.load``: raises ``CadenceViolation`` or records the load.

    With ``guard`` its own intervals apply. Without, a default-path guard is
    built whose cross-model base is the argument when > 0, else
    ``METALGUARD_CROSS_MODEL_INTERVAL``, else 0 (gemma-4 targets still get
    the 90 s floor). ``wait`` as for ``CadenceGuard.admit`` (``True``: wait
    until the load is allowed, at most the interval; a number: at most that
    many seconds).
    """
    if guard is None:
        guard = _default_guard(min_interval_sec, cross_model_interval_sec)
    elif not isinstance(guard, CadenceGuard):
        raise TypeError(f"guard must be a CadenceGuard, not {type(guard).__name__}")
    guard.admit(model_id, wait=wait)


def cadence_scope(
    model_id: StrPath,
    *,
    min_interval_sec: float = 180.0,
    cross_model_interval_sec: float = 0.0,
    guard: CadenceGuard | None = None,
    wait: bool | float = False,
) -> _CadenceScope:
    """``with cadence_scope(model_id): load → generate → unload``: admit, then mark the unload.

    ``wait`` as for ``CadenceGuard.admit``. A body that raises before MLX's
    memory grew (a missing folder, no network) is not counted as a load.
    """
    if guard is None:
        guard = _default_guard(min_interval_sec, cross_model_interval_sec)
    elif not isinstance(guard, CadenceGuard):
        raise TypeError(f"guard must be a CadenceGuard, not {type(guard).__name__}")
    return guard.scope(model_id, wait=wait)


# =============================================================================
# 4.3 Panic archive — ``panics.jsonl``: the user's panic history.
#
# New reports are appended under the archive's lock, deduplicated by source
# file and (second, pid); the archive is capped by count, never by age.
#
# Provides: ingest_panics_jsonl, read_panic_archive, _archive_path, _ingest, _unseen
# Uses: Prelude, Files, Locks, Panic signatures, Panic reports
# =============================================================================

# -- the archive ----------------------------------------------------------------


def _file_identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _archive_record(value: object) -> dict[str, Any] | None:
    """A valid archived record (a JSON object with a finite ``ts``), else ``None``."""
    if not isinstance(value, dict):
        return None
    ts = _number(value.get("ts"))
    if ts is None:
        return None
    value["ts"] = ts
    return value


def _load_archive(path: str) -> tuple[list[dict[str, Any]], bool]:
    """Valid records of the archive in file order, and whether it ends with a newline.

    Corrupt lines are skipped; a missing file is empty. Raises ``OSError`` for
    an unreadable one (a directory in its place, a symlink, no permission).
    """
    import json

    key = _file_identity(path)
    with _panic_lock:
        hit = _panic_archive_cache.get(path)
    if key is not None and hit is not None and hit[0] == key:
        return [dict(r) for r in hit[1]], True
    try:
        raw = _read_bounded(path, _PANIC_ARCHIVE_READ_MAX + 1)
    except FileNotFoundError:
        return [], True
    if len(raw) > _PANIC_ARCHIVE_READ_MAX:
        _log_once(
            "archive-size:" + path,
            _WARNING,
            "metal_guard: %s is larger than %d bytes; reading only its start",
            path,
            _PANIC_ARCHIVE_READ_MAX,
        )
        raw = raw[: raw.rfind(b"\n", 0, _PANIC_ARCHIVE_READ_MAX) + 1]
    records: list[dict[str, Any]] = []
    bad = 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = _archive_record(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, ValueError, RecursionError):
            record = None
        if record is None:
            bad += 1
        else:
            records.append(record)
    if bad:
        _log_once(
            "archive-bad:" + path, _DEBUG, "metal_guard: skipped %d corrupt lines in %s", bad, path
        )
    clean = not raw or raw.endswith(b"\n")
    if key is not None and clean:
        with _panic_lock:
            if len(_panic_archive_cache) >= 64:
                _panic_archive_cache.clear()
            _panic_archive_cache[path] = (key, records)
        records = [dict(r) for r in records]
    return records, clean


def _archive_path(jsonl_path: object) -> str:
    return (
        _state_file("panics.jsonl") if jsonl_path is None else _path_arg("jsonl_path", jsonl_path)
    )


def read_panic_archive(path: StrPath | None = None) -> list[dict[str, Any]]:
    """The archived panic records (``$METALGUARD_HOME/panics.jsonl``), oldest first.

    Corrupt lines are skipped; a missing or unreadable archive gives ``[]``
    (logged at DEBUG). Never writes.
    """
    target = _archive_path(path)
    try:
        records, _ = _load_archive(target)
    except OSError as exc:
        _log_once("archive-read:" + target, _DEBUG, "metal_guard: cannot read %s: %s", target, exc)
        return []
    records.sort(key=lambda r: r["ts"])
    return records


def _dedupe_key(record: dict[str, Any]) -> tuple[int, object]:
    """Same panic in two files (panic-full/panic-base, moved to Retired/): same second, same pid."""
    return int(record["ts"]), record.get("pid")


def _bound_archive(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records to keep: the newest 1,000, sorted by time.

    Never dropped for their age: ``metal-guard panics`` is the user's history
    (the breaker looks only at its own window anyway).
    """
    return sorted(records, key=lambda r: r["ts"])[-_PANIC_ARCHIVE_MAX_RECORDS:]


def _archive_line(record: dict[str, Any]) -> bytes:

    import json

    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return text.encode("utf-8") + b"\n"


def _unseen(existing: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` that ``existing`` does not have (same source file, or same second and
    pid), each once."""
    seen_sources = {r.get("source_file") for r in existing}
    seen_keys = {_dedupe_key(r) for r in existing}
    fresh: list[dict[str, Any]] = []
    for record in records:
        key = _dedupe_key(record)
        if record["source_file"] in seen_sources or key in seen_keys:
            continue
        seen_sources.add(record["source_file"])
        seen_keys.add(key)
        fresh.append(record)
    return fresh


def _ingest(path: str, records: list[dict[str, Any]]) -> int:
    sources = frozenset(r["source_file"] for r in records)
    with _panic_lock:
        memo = _panic_ingest_memo.get(path)
    if memo is not None and memo[0] == _file_identity(path) and sources <= memo[1]:
        return 0  # nothing new since this process last looked, and nobody else wrote
    with _FileLock(path + ".lock"):
        existing, clean = _load_archive(path)
        fresh = _unseen(existing, records)
        kept = _bound_archive(existing + fresh)
        kept_ids = {id(r) for r in kept}
        appended = [r for r in fresh if id(r) in kept_ids]
        if len(kept) - len(appended) < len(existing):  # over a bound: rewrite
            _atomic_write_bytes(path, b"".join(_archive_line(r) for r in kept))
        elif appended:
            data = b"".join(_archive_line(r) for r in appended)
            _append_bytes(path, data if clean else b"\n" + data)  # a torn last line stays alone
        known = (r.get("source_file") for r in existing)
        handled = frozenset(s for s in known if isinstance(s, str)) | sources
        identity = _file_identity(path)
    with _panic_lock:
        if len(_panic_ingest_memo) >= 64:
            _panic_ingest_memo.clear()
        _panic_ingest_memo[path] = (identity, handled)
    return len(appended)


def ingest_panics_jsonl(
    *, report_dir: StrPath | None = None, jsonl_path: StrPath | None = None
) -> int:
    """Append new kernel-panic reports to the archive; returns how many were added.

    The archive is ``$METALGUARD_HOME/panics.jsonl`` (one JSON record per
    line). A report already archived — same source file, or same second and
    pid (a copy in ``Retired/``, panic-full and panic-base) — is not added
    again. Runs under the archive's file lock; the archive keeps the newest
    1,000 records (never dropped for their age). Raises ``OSError`` or
    ``StateLockTimeout`` when the archive cannot be written.
    """
    path = _archive_path(jsonl_path)
    records = parse_panic_reports(report_dir)
    if not records:
        return 0  # nothing to archive: create no file
    return _ingest(path, records)


# =============================================================================
# 4.4 Circuit breaker — refuse MLX work after repeated IOGPU kernel panics.
#
# The cooldown lives in ``breaker.json`` (fsynced, locked), so it survives
# restarts and reboots and every process sees the same trip.
#
# Provides: CircuitBreaker, MLXCooldownActive, _duration, _local_time
# Uses: Prelude, Files, Locks, JSON state files, Breadcrumbs, Panic signatures, Panic reports,
#   Cadence rules, Modes (L6), Panic archive
# =============================================================================

# -- the circuit breaker ------------------------------------------------------


def _local_time(ts: float) -> str:
    """``2026-04-24 03:14:15 +0200`` for epoch seconds (local time)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        return f"{ts:.0f} (epoch seconds)"


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min 5 s``, ``2 h 3 min``, ``3 d 4 h``."""
    if not _finite(seconds):
        return "forever" if seconds > 0 else "0 s"
    total = max(0, int(seconds + 0.999))
    if total < 60:
        return f"{total} s"
    minutes, sec = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {sec} s" if sec else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


class MLXCooldownActive(RuntimeError):
    """Repeated IOGPU kernel panics tripped the circuit breaker: MLX work must wait."""

    def __init__(
        self,
        panic_count: int,
        window_sec: float,
        cooldown_until: float,
        *,
        now: float | None = None,
    ) -> None:
        now = time.time() if now is None else now
        self.panic_count = int(panic_count)
        self.window_sec = float(window_sec)
        self.cooldown_until = float(cooldown_until)
        self.remaining_sec = max(0.0, self.cooldown_until - now)
        super().__init__(self._message())

    def _message(self) -> str:
        return (
            f"MLX cooldown active: {self.panic_count} IOGPU kernel panic(s) within "
            f"{_duration(self.window_sec)} tripped the circuit breaker; MLX work is refused until "
            f"{_local_time(self.cooldown_until)} local time ({_duration(self.remaining_sec)} from "
            "now). Let the machine settle and find the trigger (`metal-guard panics`); if the "
            "cause is fixed, run `metal-guard breaker clear`."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_exception, (type(self), self.__dict__))


def _merge_panics(
    archived: list[dict[str, Any]], parsed: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Archived records plus parsed ones not archived yet, without duplicates, by time."""
    return sorted(archived + _unseen(archived, parsed), key=lambda r: r["ts"])


class CircuitBreaker:
    """Refuse MLX work for a cooldown after repeated IOGPU kernel panics.

    ``check()`` archives new panic reports (cheaply: unchanged reports are
    not read again), then raises ``MLXCooldownActive`` while a cooldown runs,
    and trips one when ``panic_threshold`` IOGPU kernel panics fall within
    ``window_sec`` (watchdog panics, process-level aborts and duplicate
    reports do not count). The cooldown lives in ``breaker.json`` (written
    atomically under its file lock), so it survives restarts and reboots and
    all processes see the same trip. ``clear()`` ends it and forgets the
    panics seen so far. ``report_dir`` defaults to the system report folder.
    """

    def __init__(
        self,
        *,
        jsonl_path: StrPath | None = None,
        state_path: StrPath | None = None,
        window_sec: float = 3600,
        panic_threshold: int = 2,
        cooldown_sec: float = 3600,
        report_dir: StrPath | None = None,
    ) -> None:
        self._jsonl_path = _archive_path(jsonl_path)
        self._state_path = (
            _state_file("breaker.json")
            if state_path is None
            else _path_arg("state_path", state_path)
        )
        self._report_dir = None if report_dir is None else _path_arg("report_dir", report_dir)
        self._window = _seconds_arg(
            "window_sec", window_sec, maximum=_BREAKER_SECONDS_MAX, allow_zero=False
        )
        self._cooldown = _seconds_arg("cooldown_sec", cooldown_sec, maximum=_BREAKER_SECONDS_MAX)
        panic_threshold = _int_arg("panic_threshold", panic_threshold)
        if not 1 <= panic_threshold <= 1000:
            raise ValueError(f"panic_threshold must be between 1 and 1000, got {panic_threshold}")
        self._threshold = panic_threshold

    @property
    def jsonl_path(self) -> str:
        return self._jsonl_path

    @property
    def state_path(self) -> str:
        return self._state_path

    @property
    def _state(self) -> _JsonFile:
        # fsynced: a trip must survive the kernel panic that may follow it.
        return _JsonFile(self._state_path, durable=True)

    @property
    def report_dir(self) -> str:
        return _report_dir(self._report_dir)

    @property
    def window_sec(self) -> float:
        return self._window

    @property
    def panic_threshold(self) -> int:
        return self._threshold

    @property
    def cooldown_sec(self) -> float:
        return self._cooldown

    # -- internals ------------------------------------------------------------

    @staticmethod
    def _cooldown_until(state: dict[str, Any], now: float) -> float | None:
        """End of the running cooldown, or ``None``; a clock stepped back never lengthens it."""
        until = _number(state.get("cooldown_until"))
        if until is None or until <= now:
            return None
        length = _number(state.get("cooldown_sec"))
        if length is not None and length >= 0 and until - now > length + _BREAKER_CLOCK_SLACK:
            until = now + length
        return until

    def _evidence(
        self, panics: list[dict[str, Any]], state: dict[str, Any], now: float
    ) -> list[float]:
        """Times of the IOGPU kernel panics that count now (window, after the last clear)."""
        cleared = _number(state.get("cleared_at"))
        floor = now - self._window
        if cleared is not None:
            floor = max(floor, cleared + 1e-6)
        return sorted(
            r["ts"]
            for r in panics
            if _signature_kind(r.get("signature")) == _IOGPU and r["ts"] >= floor
        )

    def _would_trip(self, evidence: list[float], state: dict[str, Any]) -> bool:
        """Enough panics in the window, at least one newer than what tripped last time."""
        if len(evidence) < self._threshold:
            return False
        acted_on = _number(state.get("last_trip_panic_ts"))
        return acted_on is None or evidence[-1] > acted_on

    def _panics(self) -> list[dict[str, Any]]:
        """New reports archived; archived panics plus reports not archived yet (if it failed)."""
        parsed = parse_panic_reports(self._report_dir)
        if parsed:
            try:
                _ingest(self._jsonl_path, parsed)
            except (OSError, StateLockTimeout) as exc:
                _log_once(
                    "breaker-ingest:" + self._jsonl_path,
                    _WARNING,
                    "metal_guard: cannot archive panic reports in %s (%s); the breaker uses the "
                    "reports it can still see",
                    self._jsonl_path,
                    exc,
                )
        return _merge_panics(read_panic_archive(self._jsonl_path), parsed)

    def _exception(self, state: dict[str, Any], until: float, now: float) -> MLXCooldownActive:
        count = state.get("panic_count")
        window = _number(state.get("window_sec"))
        return MLXCooldownActive(
            count if isinstance(count, int) and not isinstance(count, bool) else self._threshold,
            window if window is not None else self._window,
            until,
            now=now,
        )

    def _repair_clock(self, now: float) -> None:
        """A trip dated in the future (clock stepped back): restart its cooldown from now."""

        def repair(data: dict[str, Any]) -> None:
            tripped, until = _number(data.get("tripped_at")), _number(data.get("cooldown_until"))
            if tripped is not None and until is not None and tripped > now + _BREAKER_CLOCK_SLACK:
                data["cooldown_until"] = now + max(0.0, until - tripped)
                data["tripped_at"] = now

        try:
            self._state.update(repair)
        except (OSError, StateLockTimeout) as exc:
            _log().debug("metal_guard: cannot repair %s: %s", self._state_path, exc)

    # -- public API -----------------------------------------------------------

    def check(self, *, now: float | None = None) -> None:
        """Raise ``MLXCooldownActive`` while cooling down, or when this check trips the breaker."""
        now = time.time() if now is None else _real_arg("now", now)
        panics = self._panics()
        state = self._state.read()[0]
        tripped = _number(state.get("tripped_at"))
        if tripped is not None and tripped > now + _BREAKER_CLOCK_SLACK:
            self._repair_clock(now)
            state = self._state.read()[0]
        until = self._cooldown_until(state, now)
        if until is not None:
            _refuse(self._exception(state, until, now))
            return
        evidence = self._evidence(panics, state, now)
        if not self._would_trip(evidence, state):
            return
        threshold, window, cooldown = self._threshold, self._window, self._cooldown

        def trip(data: dict[str, Any]) -> bool:
            # Decide again inside the lock: another process may have tripped or cleared.
            if self._cooldown_until(data, now) is not None:
                return False
            counted = self._evidence(panics, data, now)
            if not self._would_trip(counted, data):
                return False
            data.update(
                schema=_BREAKER_SCHEMA,
                tripped_at=now,
                cooldown_until=now + cooldown,
                cooldown_sec=cooldown,
                panic_count=len(counted),
                window_sec=window,
                panic_threshold=threshold,
                panic_ts=counted[-50:],
                last_trip_panic_ts=counted[-1],
                pid=os.getpid(),
            )
            return True

        try:
            won = self._state.update(trip)
            state = self._state.read()[0]
        except (OSError, StateLockTimeout) as exc:
            _log_once(
                "breaker-state:" + self._state_path,
                _WARNING,
                "metal_guard: cannot record the breaker trip in %s (%s); the cooldown will not "
                "survive this process",
                self._state_path,
                exc,
            )
            unrecorded = MLXCooldownActive(len(evidence), window, now + cooldown, now=now)
            unrecorded.__suppress_context__ = True  # as `raise ... from None`
            _refuse(unrecorded)
            return
        until = self._cooldown_until(state, now)
        if won:
            _breadcrumb(
                f"BREAKER_TRIP: {len(evidence)} IOGPU kernel panics in {window:g}s; "
                f"cooldown until {_local_time(now + cooldown)}"
            )
        if until is not None:
            _refuse(self._exception(state, until, now))

    def status(self, *, now: float | None = None) -> dict[str, Any]:
        """What the breaker would decide now, and why (never raises, never writes)."""
        doc: dict[str, Any] = {
            "state_path": self._state_path,
            "jsonl_path": self._jsonl_path,
            "report_dir": self.report_dir,
            "window_sec": self._window,
            "panic_threshold": self._threshold,
            "cooldown_sec": self._cooldown,
            "cooling_down": False,
            "cooldown_until": None,
            "remaining_sec": 0.0,
            "tripped_at": None,
            "trip_panic_count": None,
            "cleared_at": None,
            "panics_in_window": 0,
            "would_trip": False,
            "archived_panics": 0,
            "recent_panics": [],
            "problem": None,
            "state_problem": None,  # why breaker.json cannot be read, if it cannot
            "in_cooldown": False,
            "cooldown_remaining_sec": 0.0,
            "recent_panic_count": 0,
        }
        try:
            when = time.time() if now is None else _real_arg("now", now)
            state, problem = self._state.read()
            if problem is not None:
                doc["state_problem"] = problem
                doc["problem"] = f"breaker state unreadable: {problem}"
            archived = read_panic_archive(self._jsonl_path)
            panics = _merge_panics(archived, parse_panic_reports(self._report_dir))
            until = self._cooldown_until(state, when)
            evidence = self._evidence(panics, state, when)
            count = state.get("panic_count")
            doc.update(
                cooling_down=until is not None,
                cooldown_until=until,
                remaining_sec=0.0 if until is None else until - when,
                tripped_at=_number(state.get("tripped_at")),
                trip_panic_count=count if isinstance(count, int) else None,
                cleared_at=_number(state.get("cleared_at")),
                panics_in_window=len(evidence),
                would_trip=until is None and self._would_trip(evidence, state),
                archived_panics=len(archived),
                recent_panics=panics[-10:],
            )
            doc.update(  # the original metal-guard's keys, with its meanings
                in_cooldown=doc["cooling_down"],
                cooldown_remaining_sec=doc["remaining_sec"],
                recent_panic_count=doc["panics_in_window"],
            )
        except Exception as exc:  # a status display must never fail
            doc["problem"] = f"{type(exc).__name__}: {exc}"
        return doc

    def clear(self) -> bool:
        """End the cooldown and forget the panics seen so far; True if one was running.

        Raises ``OSError`` / ``StateLockTimeout`` when the state cannot be written.
        """
        now = time.time()

        def wipe(data: dict[str, Any]) -> bool:
            active = self._cooldown_until(data, now) is not None
            last = _number(data.get("last_trip_panic_ts"))
            data.clear()
            data.update(schema=_BREAKER_SCHEMA, cleared_at=now, cleared_by_pid=os.getpid())
            if last is not None:
                data["last_trip_panic_ts"] = last
            return active

        active = self._state.update(wipe)
        _breadcrumb("BREAKER_CLEAR" + (": cooldown ended early" if active else ""))
        return active

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(jsonl_path={self._jsonl_path!r}, state_path={self._state_path!r}, "
            f"window_sec={self._window:g}, panic_threshold={self._threshold}, "
            f"cooldown_sec={self._cooldown:g}, report_dir={self._report_dir!r})"
        )


# =============================================================================
# 4.5 KV growth tracker — per-request KV-cache bytes against a ceiling.
#
# The caller reports the bytes each decoding step added; crossing the
# request's ceiling aborts the request with ``MetalOOMError`` before the KV
# cache grows into a Metal allocation failure. Records idle for an hour are
# dropped, so requests that never call ``finalize`` cannot pile up. The
# shared ``kv_tracker`` costs one dict and one lock at import.
#
# Provides: KVGrowthTracker, kv_tracker
# Uses: Prelude, Breadcrumbs, MLX access
# =============================================================================

_KV_IDLE_EXPIRY_SEC = 3600.0


class _KVRecord:
    __slots__ = ("aborted", "ceiling_bytes", "cumulative_bytes", "step_count", "touched")

    def __init__(self, ceiling_bytes: int, now: float) -> None:
        self.ceiling_bytes = ceiling_bytes
        self.cumulative_bytes = 0
        self.step_count = 0
        self.aborted = False
        self.touched = now

    def as_dict(self, request_id: str) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "cumulative_gb": round(self.cumulative_bytes / 1e9, 3),
            "ceiling_gb": round(self.ceiling_bytes / 1e9, 3),
            "step_count": self.step_count,
            "aborted": self.aborted,
        }


class KVGrowthTracker:
    """Track the KV-cache bytes each request adds and abort it past its ceiling.

    ``start(request_id, ceiling_gb=20.0)`` opens (or reopens) a record;
    ``add_bytes(request_id, n)`` adds one step's bytes and raises
    ``MetalOOMError`` when the total crosses the ceiling (and on every later
    call for that request); ``finalize(request_id)`` closes it and returns its
    summary; ``snapshot()`` lists the open ones. Thread-safe. Records not
    touched for ``idle_expiry_sec`` (an hour) are dropped.
    """

    def __init__(self, *, idle_expiry_sec: float = _KV_IDLE_EXPIRY_SEC) -> None:
        self.idle_expiry_sec = _seconds_arg(
            "idle_expiry_sec", idle_expiry_sec, maximum=366 * 86400.0, allow_zero=False
        )
        self._records: dict[str, _KVRecord] = {}
        self._lock = _thread.allocate_lock()
        self._last_sweep = 0.0

    def _sweep(self, now: float) -> None:
        """Drop idle records (at most once per minute, or per expiry if that is shorter)."""
        if now - self._last_sweep < min(60.0, self.idle_expiry_sec):
            return
        self._last_sweep = now
        idle = [rid for rid, r in self._records.items() if now - r.touched >= self.idle_expiry_sec]
        for rid in idle:
            del self._records[rid]
        if idle:
            _log().debug("metal_guard: KV tracker dropped %d idle request(s)", len(idle))

    def start(self, request_id: str, *, ceiling_gb: float = 20.0) -> None:
        """Open a record for ``request_id`` (a fresh one if it exists); ``ValueError`` if ceiling ≤ 0."""
        ceiling = _real_arg("ceiling_gb", ceiling_gb, minimum=0, above=True)
        rid = str(request_id)
        now = time.monotonic()
        with self._lock:
            self._sweep(now)
            self._records[rid] = _KVRecord(int(ceiling * 1e9), now)
        _log().debug("metal_guard: KV tracker started %s (ceiling %.3f GB)", rid, ceiling)

    def add_bytes(self, request_id: str, bytes_added: int) -> int:
        """Add one step's bytes; the request's running total (0 for an unknown request).

        ``ValueError`` for a negative or non-finite count; ``MetalOOMError`` when
        this step crosses the ceiling or the request was already aborted.
        """
        added = _real_arg("bytes_added", bytes_added, minimum=0)
        rid = str(request_id)
        now = time.monotonic()
        with self._lock:
            self._sweep(now)
            record = self._records.get(rid)
            if record is None:
                return 0
            record.touched = now
            if record.aborted:
                summary, crossed = record.as_dict(rid), False
            else:
                record.cumulative_bytes += int(added)
                record.step_count += 1
                if record.cumulative_bytes <= record.ceiling_bytes:
                    return record.cumulative_bytes
                record.aborted = True
                summary, crossed = record.as_dict(rid), True
        if crossed:
            _breadcrumb(
                f"KV_TRACKER: ABORT request={rid} cumulative={summary['cumulative_gb']}GB "
                f"ceiling={summary['ceiling_gb']}GB steps={summary['step_count']}"
            )
            _log().warning(
                "metal_guard: request %s crossed its KV ceiling (%.3f GB > %.3f GB after %d "
                "steps); aborting it",
                rid,
                summary["cumulative_gb"],
                summary["ceiling_gb"],
                summary["step_count"],
            )
            raise MetalOOMError(
                f"KV cache of request {rid} grew to {summary['cumulative_gb']} GB, above its "
                f"{summary['ceiling_gb']} GB ceiling, after {summary['step_count']} steps"
            )
        raise MetalOOMError(
            f"request {rid} was already aborted: its KV cache crossed the "
            f"{summary['ceiling_gb']} GB ceiling"
        )

    def finalize(self, request_id: str) -> dict[str, Any] | None:
        """Close the record and return its summary (``None`` for an unknown request)."""
        rid = str(request_id)
        with self._lock:
            record = self._records.pop(rid, None)
        if record is None:
            return None
        summary = record.as_dict(rid)
        _log().debug("metal_guard: KV tracker finalized %s: %s", rid, summary)
        return summary

    def snapshot(self) -> list[dict[str, Any]]:
        """Summaries of the open records (``request_id``, ``cumulative_gb``, ...), oldest first."""
        with self._lock:
            self._sweep(time.monotonic())
            return [record.as_dict(rid) for rid, record in self._records.items()]

    def __repr__(self) -> str:
        return f"KVGrowthTracker({len(self._records)} open request(s))"


kv_tracker = KVGrowthTracker()


# =============================================================================
# 4.6 Host locks — one class for both host-wide locks: an ``flock`` that cannot
# go stale, the holder's record in the lock file, fair turns.
#
# Both host-wide locks, the MLX lock (4.7) and the GPU gate (4.8), are one ``_HostLock``:
# ``flock`` on a lock file that is never deleted (``_FileLock``), so a holder
# that dies releases it by dying — no stale files, no pid-reuse mistakes after
# a reboot. The holder's details (pid, label, start time, command line; the
# gate adds thread and since) are written into the lock file itself, as the
# original's lock file held them: one padded ``pwrite`` once the OS lock is
# taken, overwritten by a "free" record before it is released, never fsynced
# (after a crash the lock is free anyway). The OS lock stays the truth: a
# reader probes it first, so ``read_mlx_lock`` returns ``None`` whenever nobody
# holds it, whatever the file says.
#
# The gate is fair (``flock`` alone is not: a process that releases and retakes
# it keeps it). Threads of a process queue first-come first-served; the head
# speaks for its process. A process that finds the gate busy holds a shared lock
# on ``<lock>.queue`` while it waits. A releaser probes the queue right after it
# let go and, if someone waits, yields its CPU (the woken waiter may be queued
# on it) and does not retake the gate until the record shows that someone else
# took it, nobody waits any more, or 0.25 s passed (a waiter stopped by
# SIGSTOP): busy processes alternate. Only OS locks and one record: a process
# that dies leaves nothing.
#
# How a process waits decides how fast the gate changes hands, which matters
# when it is taken per decode step (``metal-guard run``: steps of 2-20 ms).
# Without a timeout (``run`` has none) it blocks in ``flock``: the kernel wakes
# it as the holder leaves: 0.14 ms (median) from release to acquire on a 2-core
# box where the 2 ms polling of before took 0.53 ms (bench/bench_gate.py); its
# once-a-minute warning comes from one helper thread per process, which ends
# within a minute once nobody waits. A blocking ``flock`` cannot time out, so with a timeout it
# polls, every 50 µs at first, doubling to every 2 ms. The releaser's wait for
# the record also starts at 50 µs: the waiter takes the gate within that.
#
# Provides: _HostLock, _holder_dict, _holder_info, _lock_probe, _utc_stamp, _HOLDER_BYTES
# Uses: Prelude, Processes, Files, Locks
# =============================================================================

_HOLDER_CMDLINE_MAX = 300
_HOLDER_LABEL_MAX = 200
_HOLDER_BYTES = 2048  # a holder record is padded to this size: one write, no torn tail
_FAIR_POLL_MIN = 0.00005  # a polling waiter's first pause; it doubles up to the next one
_FAIR_POLL_MAX = 0.002  # a process waiting for a fair lock with a timeout tries it this often
_FAIR_DEFER_MAX = 0.25  # a releaser waits no longer for a waiter to take its turn (a stopped one)


_cmdline_memo: dict[int, str] = {}  # pid → command line (a holder record is written per call)


def _cmdline() -> str:
    """``sys.argv`` joined by spaces, at most 300 characters (the original's format)."""
    pid = os.getpid()
    text = _cmdline_memo.get(pid)
    if text is None:
        argv = getattr(sys, "argv", None) or []
        text = _cmdline_memo[pid] = " ".join(_label(a) for a in argv)[:_HOLDER_CMDLINE_MAX]
    return text


def _lock_probe(path: str, *, exclusive: bool = False) -> bool | str:
    """Is ``path`` flocked by anyone (``exclusive``: also shared)? ``False`` when free or
    missing; why not, when unknown (a lock file another user owns, no ``fcntl``, no
    ``flock``). A non-blocking attempt on a descriptor of our own, so a lock held by this
    process counts too. Never creates the file."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):  # no lock file: nobody can hold it
        return False
    except OSError as exc:
        return f"cannot open {path}: {exc.strerror or exc}"
    try:
        try:
            import fcntl
        except ImportError:
            return "fcntl is unavailable"
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _FLOCK_BUSY:
                return True
            return f"cannot flock {path}: {exc.strerror or exc}"
    finally:
        os.close(fd)  # also drops our lock, if we got it
    return False


def _holder_dict(data: dict[str, Any]) -> dict[str, Any]:
    """The four holder keys of the original, from whatever the file held."""
    pid = data.get("pid")
    return {
        "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        "label": _label(data.get("label", "")),
        "started_at": data.get("started_at") if isinstance(data.get("started_at"), str) else None,
        "cmdline": _label(data.get("cmdline", "")),
    }


class _Turns:
    """This process's first-come first-served line of threads for one fair lock."""

    __slots__ = ("cond", "left", "line", "pid")

    def __init__(self) -> None:
        import threading

        self.cond = threading.Condition(threading.Lock())
        self.line: list[object] = []  # the head is taking or holding the lock
        self.left: bytes | None = None  # our last "free" record, when someone waited for it
        self.pid = os.getpid()


class _HostLock:
    """One host-wide lock (the MLX lock, the GPU gate): OS lock, holder record, reader.

    ``gate``: held per thread (reentrant per thread), handed over fairly, its
    records add ``thread`` and ``since``; else held per process. The path is
    read from ``env_var`` at each use.
    """

    def __init__(self, env_var: str, default_name: str, *, gate: bool) -> None:
        self.env_var, self.default_name = env_var, default_name
        self.per_thread = self.fair = gate
        self.extra: dict[str, Any] = {"thread": "", "since": None} if gate else {}
        self.mine: dict[str, dict[str, Any]] = {}  # lock path → this process's holder
        # (label, thread, pid) → the holder record's fixed parts, for ``hold_turn``
        self._parts: dict[tuple[str, str, int], tuple[dict[str, Any], bytes, bytes] | None] = {}
        self.guard = _thread.allocate_lock()  # for ``mine`` of a per-process lock
        self._turns: dict[str, _Turns] = {}

    def path(self) -> str:
        """``env_var`` if set to a path (empty means unset), else ``$METALGUARD_HOME/<name>``."""
        return _env_path(self.env_var, None) or _state_file(self.default_name)

    def file_lock(self, path: str) -> _FileLock:
        return _FileLock(
            path, None, per_thread=self.per_thread, must_exclude=True, env_var=self.env_var
        )

    def awaited(self, path: str) -> bool:
        """Whether another thread of this process or another process waits for this fair
        lock now (a holder that keeps it across steps lets go when one does)."""
        turns = self._turns.get(path)
        if turns is not None and len(turns.line) > 1:
            return True
        return _lock_probe(path + ".queue", exclusive=True) is True

    def turns(self, path: str) -> _Turns:
        turns = self._turns.get(path)
        if turns is None or turns.pid != os.getpid():  # a forked child waits for nothing
            turns = self._turns[path] = _Turns()
        return turns

    # -- taking and giving back ------------------------------------------------------

    def acquire(
        self,
        path: str,
        timeout: float | None,
        *,
        tick: Callable[[], None] | None = None,
        every: float = _INF,
    ) -> bool:
        """Take the lock; True when this call took the OS lock, False on re-entry. ``timeout``
        ``None`` waits forever; expiry raises ``StateLockTimeout``. A fair lock calls
        ``tick()`` every ``every`` seconds of waiting."""
        lock, state = self.file_lock(path), _lock_state(path)
        if not self.fair or (state.count and state.owner == _thread.get_ident()):
            return lock.acquire(timeout)  # only this thread sets ``owner`` to itself
        start = time.monotonic()
        deadline = _INF if timeout is None else start + timeout
        next_tick = [start + every if tick else _INF]

        def pause() -> float:  # how long to sleep at most; raises at the deadline
            now = time.monotonic()
            if now >= deadline:
                raise StateLockTimeout(path, timeout or 0.0)
            if tick is not None and now >= next_tick[0]:
                next_tick[0] = now + every
                tick()
            return min(deadline, next_tick[0]) - now

        turns, me = self.turns(path), object()
        with turns.cond:
            turns.line.append(me)
            try:
                while turns.line[0] is not me:
                    turns.cond.wait(min(pause(), 3600.0))
            except BaseException:
                turns.line.remove(me)
                turns.cond.notify_all()
                raise
        try:
            self._take_turn(path, lock, turns, pause, block=timeout is None, ticks=tick is not None)
        except BaseException:
            if state.count and state.owner == _thread.get_ident():  # taken as it came: give back
                lock.release()
            with turns.cond:
                turns.line.remove(me)
                turns.cond.notify_all()
            raise
        return True

    def _take_turn(
        self,
        path: str,
        lock: _FileLock,
        turns: _Turns,
        pause: Callable[[], float],
        *,
        block: bool,
        ticks: bool,
    ) -> None:
        """The head thread takes the OS lock for its process, after those who waited:
        blocked in ``flock`` when it may wait forever (``block``), else polling."""
        delay, until = _FAIR_POLL_MIN, time.monotonic() + _FAIR_DEFER_MAX
        while turns.left is not None:  # our last release was awaited: let a waiter go first
            if self._handed_over(path, turns.left) or time.monotonic() > until:
                turns.left = None
                break
            time.sleep(min(delay, pause()))
            delay = min(delay * 2, _FAIR_POLL_MAX)
        queue, delay = None, _FAIR_POLL_MIN
        try:
            while True:
                try:
                    lock.acquire(0)
                    return
                except StateLockTimeout:
                    queue = queue if queue is not None else self._join_queue(path + ".queue")
                if block:  # a releaser probes the queue after it let go: it sees us there
                    ticker, key = _ticker() if ticks else None, object()
                    if ticker is not None:
                        ticker.add(key, pause)
                    try:
                        lock.acquire(None)
                    finally:
                        if ticker is not None:
                            ticker.remove(key)
                    return
                time.sleep(min(delay, pause()))
                delay = min(delay * 2, _FAIR_POLL_MAX)
        finally:
            if queue is not None:
                os.close(queue)

    def _join_queue(self, queue_path: str) -> int:
        """A descriptor holding a shared lock on the queue file: "this process waits"."""
        import fcntl

        fd = _open_creating(queue_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # only exclusive probes compete, for an instant
        except OSError as exc:
            os.close(fd)
            if exc.errno in _FLOCK_UNSUPPORTED:
                raise LockUnsupported(queue_path, self.env_var, exc.strerror or "") from None
            raise
        return fd

    @staticmethod
    def _handed_over(path: str, left: bytes) -> bool:
        """Someone took the lock since we left ``left`` in it, or nobody waits any more."""
        try:
            if _read_bounded(path, len(left)) != left:  # the usual answer, from one read
                return True
        except OSError:
            return True
        return _lock_probe(path + ".queue", exclusive=True) is not True

    def hold(self, path: str, info: dict[str, Any]) -> dict[str, Any]:
        """Record ``info`` as the holder (this process's memory and the lock file)."""
        import json

        self.mine[path] = info
        data = json.dumps(info).encode("utf-8")
        if len(data) > _HOLDER_BYTES:  # a label or command line full of escapes
            short = {**info, "label": str(info.get("label"))[:40], "cmdline": ""}
            data = json.dumps(short).encode("utf-8")[:_HOLDER_BYTES]
        self._write(path, _lock_state(path).fd, data)
        return dict(info)

    def hold_turn(self, path: str, label: str, thread: str, now: float) -> None:
        """``hold`` for the gate, on the path from one holder to the next: what stays the
        same from one hold to the next (pid, label, command line, thread) is encoded once."""
        key = (label, thread, os.getpid())
        parts = self._parts.get(key)
        if parts is None:
            import json

            info = {**_holder_info(label, now), "thread": thread, "since": 0.0}
            first = json.dumps({k: info[k] for k in ("pid", "label")})[:-1]
            rest = json.dumps({k: info[k] for k in ("cmdline", "thread")})[1:-1]
            lead, trail = f'{first}, "started_at": ', f", {rest}, " + '"since": '
            fits = len(lead) + len(trail) + 60 < _HOLDER_BYTES  # else ``hold`` shortens it
            if len(self._parts) > 256:
                self._parts.clear()
            parts = self._parts[key] = (info, lead.encode(), trail.encode()) if fits else None
        if parts is None:
            self.hold(path, {**_holder_info(label, now), "thread": thread, "since": now})
            return
        fixed, head, tail = parts
        stamp = _utc_stamp(now)
        self.mine[path] = {**fixed, "started_at": stamp, "since": now}
        data = b"".join((head, b'"', stamp.encode(), b'"', tail, repr(now).encode(), b"}"))
        self._write(path, _lock_state(path).fd, data)

    def release(self, path: str) -> bool:
        """Drop one hold; True when this released the OS lock. Never raises."""
        lock, state = self.file_lock(path), _lock_state(path)
        if state.count != 1 or (self.per_thread and state.owner != _thread.get_ident()):
            return lock.release()
        self.mine.pop(path, None)
        left = self._write(  # unique, so that a releaser can tell when someone took it since
            path,
            state.fd,
            f'{{"pid": null, "free": "{os.getpid()}:{time.monotonic_ns()}"}}'.encode(),
        )
        lock.release()
        # probed after the release, off the waiter's path: a waiter still queued now was
        # queued before (it holds the queue while it waits, until it has the lock)
        awaited = self.fair and _lock_probe(path + ".queue", exclusive=True) is True
        if awaited and hasattr(os, "sched_yield"):
            os.sched_yield()  # the waiter just woken may be queued behind us on this CPU
        if self.fair:
            turns = self.turns(path)
            with turns.cond:
                turns.left = left if awaited else None
                if turns.line:
                    turns.line.pop(0)
                turns.cond.notify_all()
        return True

    @staticmethod
    def _write(path: str, fd: int | None, data: bytes) -> bytes | None:
        """One padded ``pwrite`` of a record at the start of the held lock file; the bytes."""
        if fd is None:
            return None
        data = data.ljust(_HOLDER_BYTES)
        try:
            os.pwrite(fd, data, 0)
        except OSError as exc:  # the OS lock is held all the same; only the display suffers
            _log_once("holder:" + path, _WARNING, "metal_guard: cannot record in %s: %s", path, exc)
        return data

    # -- reading ----------------------------------------------------------------------

    def read(self, path: str) -> dict[str, Any] | None:
        """The holder: this process's record, or the one in the file; ``None`` when free."""
        for _ in range(20):  # a thread here took the OS lock: its details follow within moments
            with self.guard:
                held_here = _lock_state(path).count > 0
                mine = self.mine.get(path) if held_here else None
            if not held_here:
                return self._foreign(path)
            if mine:
                return dict(mine)
            time.sleep(0.005)
        # still between that thread's OS acquire and its record: say so from memory
        return {
            **_holder_dict({"pid": os.getpid(), "cmdline": _cmdline()}),
            **self.extra,
            "note": "This process is taking the lock; its details are not recorded yet.",
        }

    def _read_file(self, path: str) -> dict[str, Any] | None:
        data = _read_json_object(path, _HOLDER_BYTES)
        if data is None:
            return None
        info = _holder_dict(data)
        if "thread" in self.extra:
            info.update(thread=_label(data.get("thread", "")), since=_number(data.get("since")))
        return info

    def _foreign(self, path: str) -> dict[str, Any] | None:
        """The holder of a lock another process holds: ``None`` when free, else its details.

        The record may lag the OS lock (or name a holder that died): read again a few
        times before reporting the holder as unknown (``pid`` ``None``, a ``note``). A lock
        that cannot be probed reads as held by an unknown holder, never as free.
        """
        unknown = {**_holder_dict({}), **self.extra}
        for _ in range(10):
            probe = _lock_probe(path)
            if probe is False:
                return None
            if isinstance(probe, str):
                return {
                    **unknown,
                    "note": f"Cannot tell whether it is held ({probe}): reported as held by an "
                    "unknown process.",
                }
            info = self._read_file(path)
            pid = info.get("pid") if info else None
            if info and isinstance(pid, int) and pid > 0 and pid != os.getpid() and _pid_alive(pid):
                return info
            time.sleep(0.02)
        return {
            **unknown,
            "note": "Held, but the holder's details are not written yet or name a process that "
            "has exited.",
        }


_stamp_memo: list[tuple[int, str]] = [(-1, "")]  # (whole second, its started_at text)


def _utc_stamp(now: float) -> str:
    """``now`` as the original's ``started_at`` (UTC, whole seconds), formatted once a second."""
    second, text = _stamp_memo[0]
    if second != int(now):
        second = int(now)
        text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        _stamp_memo[0] = (second, text)
    return text


def _holder_info(label: str, now: float) -> dict[str, Any]:
    """The original's holder keys for this process: pid, label, started_at (UTC), cmdline."""
    return {
        "pid": os.getpid(),
        "label": label[:_HOLDER_LABEL_MAX],
        "started_at": _utc_stamp(now),
        "cmdline": _cmdline(),
    }


# =============================================================================
# 4.7 MLX lock (L8) — one MLX user per host, as an OS lock that cannot go stale.
#
# The lock is section 4.6's ``_HostLock``: a holder that dies releases it by dying.
# The MLX lock is counted per process. ``force=True`` sends SIGTERM to a live
# holder and waits for the lock to come free; it never sends SIGKILL.
#
# Provides: MLXLockConflict, acquire_mlx_lock, mlx_exclusive_lock, read_mlx_lock, release_mlx_lock,
#   _acquire_mlx_lock_at, _MLX_LOCK, _mlx_lock_path, _read_mlx_lock_at, _release_mlx_lock_at
# Uses: Prelude, Processes, Locks, Breadcrumbs, Release barrier, Host locks
# =============================================================================

_FORCE_WAIT_DEFAULT = 30.0
_RECLAIM_COOLDOWN_DEFAULT = 8.0
# A plain acquire waits this long for a holder that is just leaving (and rides
# out the instant a status probe holds a shared lock) before it reports a conflict.
_MLX_LOCK_GRACE_SEC = 0.5


_MLX_LOCK = _HostLock("MLX_LOCK_PATH", "mlx_exclusive.lock", gate=False)


def _mlx_lock_path() -> str:
    return _MLX_LOCK.path()


def _await_release(timeout: float, *, reclaimed_from: int | None = None) -> None:
    """Wait at most ``timeout`` s for memory a stopped MLX user held to be given back.

    The memory of a process we took the lock from comes back when it exits, so
    first wait (bounded) for it to be gone; then the release barrier for this
    process's own MLX memory, only if MLX is imported here already.
    """
    deadline = time.monotonic() + timeout
    if reclaimed_from is not None:
        while _pid_running(reclaimed_from) and time.monotonic() < deadline:
            time.sleep(0.1)
    remaining = deadline - time.monotonic()
    if "mlx.core" in sys.modules and remaining > 0:
        wait_for_release(timeout=remaining)


class MLXLockConflict(RuntimeError):
    """Another process holds the MLX lock (``.holder`` says who).

    After ``force=True`` failed, ``.holder`` also carries ``force_timeout`` or
    ``force_permission_denied`` (``True``) and a ``message``.
    """

    def __init__(self, holder: dict[str, Any]) -> None:
        self.holder: dict[str, Any] = dict(holder) if isinstance(holder, dict) else {}
        h = self.holder
        who = (
            f"{_label(h.get('label') or '?')!r} (pid {h.get('pid') or 'unknown'}, since "
            f"{h.get('started_at') or 'unknown'}, command line {_label(h.get('cmdline') or '')!r})"
        )
        text = f"MLX lock is held by {who}."
        if h.get("note"):
            text += f" {_label(h['note'])}"
        if h.get("message"):
            text += f" {_label(h['message'])}"
        else:
            text += (
                " Only one process should drive MLX at a time: wait for it to finish, stop it, "
                "or acquire with force=True to send it SIGTERM and wait for it to exit "
                "(MLX_FORCE_WAIT_SEC, default 30 s)."
            )
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.holder,))


def read_mlx_lock() -> dict[str, Any] | None:
    """Who holds the MLX lock: ``pid``, ``label``, ``started_at``, ``cmdline``; ``None`` if free.

    The OS lock decides (never the record alone). Never writes; never raises
    for a missing or unreadable file.
    """
    return _read_mlx_lock_at(_mlx_lock_path())


def _read_mlx_lock_at(path: str) -> dict[str, Any] | None:
    return _MLX_LOCK.read(path)


def acquire_mlx_lock(label: str, *, force: bool = False) -> dict[str, Any]:
    """Take the host's MLX lock for this process; returns the holder info.

    Reentrant: a process that holds it takes one more hold (released by as many
    ``release_mlx_lock()`` calls) and gets the info of its first hold. A holder
    that is just leaving is waited for briefly; otherwise ``MLXLockConflict``.
    With ``force=True`` the live holder gets SIGTERM and this call waits up to
    ``MLX_FORCE_WAIT_SEC`` (default 30) for the lock, then up to
    ``MLX_RECLAIM_COOLDOWN_SEC`` (default 8) for the memory to be released.
    Raises ``LockUnsupported`` where the filesystem cannot ``flock`` (set
    ``MLX_LOCK_PATH`` to a local disk).
    """
    return _acquire_mlx_lock_at(_mlx_lock_path(), _label(label), force=bool(force))


def _acquire_mlx_lock_at(path: str, label: str, *, force: bool) -> dict[str, Any]:
    deadline = time.monotonic() + _MLX_LOCK_GRACE_SEC
    while True:
        try:
            took = _MLX_LOCK.acquire(path, max(0.0, deadline - time.monotonic()))
            break
        except StateLockTimeout:
            holder = _read_mlx_lock_at(path)
            if holder is None and time.monotonic() < deadline + 5 * _MLX_LOCK_GRACE_SEC:
                continue  # it came free meanwhile
            holder = holder or _holder_dict({})
            if not force:
                raise MLXLockConflict(holder) from None
            took = _force_acquire(path, holder, label)
            break
    with _MLX_LOCK.guard:
        mine = None if took else _MLX_LOCK.mine.get(path)
        info = dict(mine) if mine else _MLX_LOCK.hold(path, _holder_info(label, time.time()))
    if took:
        _breadcrumb(f"MLX_LOCK: acquired {label} pid={os.getpid()}")
    return info


def _force_acquire(path: str, holder: dict[str, Any], label: str) -> bool:
    """SIGTERM the live holder, wait for the lock, then for the memory; never SIGKILL."""
    import signal

    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 1 or pid == os.getpid():
        raise MLXLockConflict(
            {**holder, "message": "force=True cannot stop it: the holder's pid is unknown."}
        )
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # exited meanwhile: the lock is free or about to be
    except PermissionError:
        raise MLXLockConflict(
            {
                **holder,
                "force_permission_denied": True,
                "message": f"force=True could not signal pid {pid} (permission denied; another user's process).",
            }
        ) from None
    _breadcrumb(f"MLX_LOCK: FORCE SIGTERM pid={pid} ({_label(holder.get('label'))}) for {label}")
    wait = _env_float("MLX_FORCE_WAIT_SEC", _FORCE_WAIT_DEFAULT, maximum=3600.0)
    try:
        took = _MLX_LOCK.acquire(path, wait)
    except StateLockTimeout:
        raise MLXLockConflict(
            {
                **holder,
                "force_timeout": True,
                "message": (
                    f"force=True sent SIGTERM to pid {pid}, which still held the lock after "
                    f"{wait:g} s (MLX_FORCE_WAIT_SEC). It was not killed: SIGKILL can leave its "
                    "Metal memory wired until reboot. Stop it yourself."
                ),
            }
        ) from None
    cooldown = _env_float("MLX_RECLAIM_COOLDOWN_SEC", _RECLAIM_COOLDOWN_DEFAULT, maximum=600.0)
    if cooldown > 0:
        _log().info(
            "metal_guard: reclaimed the MLX lock from pid %d; waiting up to %g s for its memory",
            pid,
            cooldown,
        )
        _await_release(cooldown, reclaimed_from=pid)
    return took


def release_mlx_lock() -> bool:
    """Drop one hold of this process on the MLX lock; ``False`` when it held none.

    The OS lock (and the holder record) go with the last hold. Never raises.
    """
    return _release_mlx_lock_at(_mlx_lock_path())


def _release_mlx_lock_at(path: str) -> bool:
    with _MLX_LOCK.guard:
        count = _MLX_LOCK.file_lock(path).count
        if count == 0:
            return False
        _MLX_LOCK.release(path)
    if count == 1:
        _breadcrumb(f"MLX_LOCK: released pid={os.getpid()}")
    return True


class mlx_exclusive_lock(_ContextDecorator):
    """``with mlx_exclusive_lock(label) as info:`` — acquire, always release on exit.

    Also a decorator (``@mlx_exclusive_lock("job")``), as the original's
    ``@contextmanager`` was.
    """

    __slots__ = ("_path", "force", "label")

    def __init__(self, label: str, *, force: bool = False) -> None:
        self.label = _label(label)
        self.force = bool(force)
        self._path: str | None = None

    def _recreate(self) -> mlx_exclusive_lock:
        return type(self)(self.label, force=self.force)

    def __enter__(self) -> dict[str, Any]:
        path = _mlx_lock_path()
        info = _acquire_mlx_lock_at(path, self.label, force=self.force)
        self._path = path
        return info

    def __exit__(self, *exc: object) -> None:
        path, self._path = self._path, None
        if path is not None:
            _release_mlx_lock_at(path)


# =============================================================================
# 4.8 GPU gate — one MLX workload at a time across the threads and processes
# of the host.
#
# Two generation streams at once panicked 3 of 3 cold boots in 102-108 s while
# the same work run one after the other ran 111 minutes clean (ml-explore/mlx
# #3186). ``exclusive_gpu`` serialises MLX work on a fair ``_HostLock``
# (``gpu.lock``, reentrant per thread): waiting threads and processes get their
# turn, so two busy programs alternate instead of one keeping it. Uncontended
# it costs about two ``flock`` pairs and two ``pwrite`` calls (the holder's
# record, whose fixed parts are encoded once per label and thread, then the
# free one); see ``bench/bench_gate.py``.
#
# Provides: GPUBusy, exclusive_gpu, read_gpu_gate, _describe_holder, _GPU_GATE, _gpu_gate_held_here,
#   _gpu_lock_path
# Uses: Prelude, Locks, Modes (L6), Cadence, Host locks
# =============================================================================

_GPU_WAIT_WARN_SEC = 60.0  # while waiting, one WARNING per this many seconds

_GPU_GATE = _HostLock("METALGUARD_GPU_LOCK_PATH", "gpu.lock", gate=True)


def _gpu_lock_path() -> str:
    return _GPU_GATE.path()


def read_gpu_gate() -> dict[str, Any] | None:
    """Who holds the GPU gate: ``pid``, ``thread``, ``label``, ``since``, ``started_at``,
    ``cmdline``; ``None`` when free. Never writes.
    """
    return _GPU_GATE.read(_gpu_lock_path())


class GPUBusy(TimeoutError):
    """The GPU gate stayed busy for ``timeout`` seconds; ``.holder`` says who held it."""

    def __init__(
        self, holder: dict[str, Any] | None, timeout: float, label: str = "", path: str = ""
    ) -> None:
        self.holder = dict(holder) if isinstance(holder, dict) else None
        self.timeout = float(timeout)
        self.label = _label(label)
        self.path = _label(path)
        h = self.holder or {}
        who = (
            f"pid {h.get('pid') or 'unknown'} (label {_label(h.get('label') or '')!r}, thread "
            f"{_label(h.get('thread') or '?')}, since {h.get('started_at') or 'unknown'}, "
            f"command line {_label(h.get('cmdline') or '')!r})"
            if self.holder
            else "a holder that has just left"
        )
        super().__init__(
            f"GPU gate {self.path or 'gpu.lock'} still busy after {self.timeout:g} s"
            + (f" for {self.label!r}" if self.label else "")
            + f": held by {who}."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.holder, self.timeout, self.label, self.path))


class exclusive_gpu:
    """``with exclusive_gpu(label): ...`` — run MLX work as the host's only GPU user.

    Waits for the gate (``timeout`` seconds, ``None`` = forever), logging one
    WARNING per minute of waiting that names the holder; on expiry raises
    ``GPUBusy`` (in observer mode: reports it and runs the body without the
    gate). Reentrant in one thread; other threads and processes wait, and get
    their turn in order of arrival. The path is ``METALGUARD_GPU_LOCK_PATH`` or
    ``$METALGUARD_HOME/gpu.lock``; a filesystem that cannot ``flock`` raises
    ``LockUnsupported``.
    """

    __slots__ = ("_held", "label", "timeout")

    def __init__(self, label: str = "", *, timeout: float | None = None) -> None:
        self.label = _label(label)
        self.timeout = (
            None if timeout is None else _seconds_arg("timeout", timeout, maximum=_INTERVAL_MAX)
        )
        # per thread: a stack of the paths this object holds (None: ran without the gate)
        self._held: dict[int, list[str | None]] = {}

    def __enter__(self) -> exclusive_gpu:
        path = _gpu_lock_path()
        held = path if self._wait(path) else None  # re-entry by this thread returns at once
        self._held.setdefault(_thread.get_ident(), []).append(held)
        return self

    def _wait(self, path: str) -> bool:
        """Take the gate; False when it timed out in observer mode (run ungated)."""
        start = time.monotonic()

        def waited() -> None:
            _log().warning(
                "metal_guard: %s has waited %.0f s for the GPU gate %s, held by %s",
                repr(self.label) if self.label else "this thread",
                time.monotonic() - start,
                path,
                _describe_holder(read_gpu_gate()),
            )

        try:
            took = _GPU_GATE.acquire(path, self.timeout, tick=waited, every=_GPU_WAIT_WARN_SEC)
        except StateLockTimeout:
            _refuse(GPUBusy(read_gpu_gate(), self.timeout or 0.0, self.label, path))
            return False
        if took:
            import threading

            _GPU_GATE.hold_turn(path, self.label, threading.current_thread().name, time.time())
        return True

    def __exit__(self, *exc: object) -> None:
        stack = self._held.get(_thread.get_ident())
        path = stack.pop() if stack else None
        if stack is not None and not stack:
            del self._held[_thread.get_ident()]
        if path is not None:
            _GPU_GATE.release(path)

    def __repr__(self) -> str:
        return f"exclusive_gpu({self.label!r}, timeout={self.timeout!r})"


def _gpu_gate_awaited() -> bool:
    """Whether another thread or process waits for the GPU gate now (one probe)."""
    return _GPU_GATE.awaited(_gpu_lock_path())


def _gpu_gate_held_here() -> bool:
    """True when the calling thread holds the GPU gate (a worker it waits for must not take it)."""
    return _GPU_GATE.file_lock(_gpu_lock_path()).held_by_me()


def _describe_holder(holder: dict[str, Any] | None) -> str:
    """``pid 123 ('label', thread T, since …)`` for logs and the command line."""
    if not holder:
        return "nobody"
    text = f"pid {holder.get('pid') or 'unknown'}"
    details = [repr(holder["label"])] if holder.get("label") else []
    if holder.get("thread"):
        details.append(f"thread {holder['thread']}")
    if holder.get("started_at"):
        details.append(f"since {holder['started_at']}")
    if holder.get("note"):  # e.g. a lock that cannot be probed: held, by someone unknown
        details.append(str(holder["note"]))
    return text + (f" ({', '.join(details)})" if details else "")


# =============================================================================
# 4.9 Post-panic gate — one IOGPU kernel panic stops the relaunch that follows it.
#
# After a kernel panic the Mac reboots and launchd starts the same job, which
# repeats the same trigger. The first check after the reboot (load admission,
# worker start, ``check``, ``run``) archives the new report; then MLX work is
# refused until the panic time plus ``METALGUARD_PANIC_COOLDOWN`` seconds
# (default 600), and ``METALGUARD_PANIC_LOCKOUT`` (default 2; 0 is off) IOGPU
# panics within 24 h refuse it until a person runs ``metal-guard ack`` (panics of
# the last 7 days are remembered for that). The
# refusal is ``MLXCooldownActive`` through the modes (observer mode warns). A
# check costs one small state-file read and two ``stat`` calls while the report
# folder is unchanged; only a changed folder is scanned again. The breaker's own
# 2-per-hour rule is untouched.
#
# Provides: _acknowledge_panics, _post_panic_refusal, _post_panic_status,
#   _require_post_panic_clear, _PostPanicRefusal
# Uses: Prelude, Files, Locks, JSON state files, Breadcrumbs, Panic signatures, Panic reports,
#   Panic triggers, Modes (L6), Panic archive, Circuit breaker
# =============================================================================

_PANIC_COOLDOWN_ENV = "METALGUARD_PANIC_COOLDOWN"
_PANIC_LOCKOUT_ENV = "METALGUARD_PANIC_LOCKOUT"
_PANIC_COOLDOWN_DEFAULT = 600.0
_PANIC_LOCKOUT_DEFAULT = 2
_LOCKOUT_WINDOW_SEC = 86400.0
_POST_PANIC_MEMORY_SEC = 7 * 86400.0  # a lockout lasts until ack, for panics of the last week
_POST_PANIC_SCHEMA = 1
_POST_PANIC_KEEP = 50


def _post_panic_settings() -> tuple[float, int]:
    """``(cooldown seconds, lockout count)`` from the environment (0 turns each off)."""
    cooldown = _env_float(
        _PANIC_COOLDOWN_ENV, _PANIC_COOLDOWN_DEFAULT, minimum=0.0, maximum=_LOCKOUT_WINDOW_SEC
    )
    lockout = _env_int(_PANIC_LOCKOUT_ENV, _PANIC_LOCKOUT_DEFAULT, minimum=0, maximum=1000)
    return cooldown, lockout


def _post_panic_file() -> _JsonFile:
    # fsynced: an acknowledgement must survive the next panic
    return _JsonFile(_state_file("post_panic.json"), durable=True)


def _folder_key(folder: str) -> list[int]:
    """What changes when a report is added to ``folder`` or its ``Retired/`` (0s: absent)."""
    key: list[int] = []
    for path in (folder, os.path.join(folder, "Retired")):
        try:
            st = os.stat(path)
            key += [st.st_mtime_ns, st.st_ino, st.st_size, st.st_nlink]
        except OSError:
            key += [0, 0, 0, 0]
    return key


def _panic_summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("ts", "signature", "process", "pid", "location", "source_file", "incident_id")
    return {k: record.get(k) for k in keys}


def _post_panic_state(now: float, *, record: bool = True) -> dict[str, Any]:
    """The gate's state, refreshed by a scan when the report folder changed.

    ``record`` archives new reports and saves the scan; without it nothing is
    written (a status display).
    """
    folder, archive = _report_dir(None), _archive_path(None)
    key = _folder_key(folder)
    store = _post_panic_file()
    state, problem = store.read()
    if problem is None and state.get("scanned") == [folder, archive, key]:
        return state  # nothing new in the folder since the last scan (any process)
    parsed = parse_panic_reports(folder)
    if parsed and record:
        try:
            _ingest(archive, parsed)
        except (OSError, StateLockTimeout) as exc:
            _log_once(
                "post-panic-ingest:" + archive,
                _WARNING,
                "metal_guard: cannot archive panic reports in %s (%s)",
                archive,
                exc,
            )
    recent = [
        _panic_summary(r)
        for r in _merge_panics(read_panic_archive(archive), parsed)
        if _signature_kind(r.get("signature")) == _IOGPU and r["ts"] >= now - _POST_PANIC_MEMORY_SEC
    ][-_POST_PANIC_KEEP:]
    if not record:
        return {**state, "panics": recent}

    def save(data: dict[str, Any]) -> dict[str, Any]:
        data.update(schema=_POST_PANIC_SCHEMA, scanned=[folder, archive, key], panics=recent)
        return dict(data)

    try:
        return store.update(save)
    except (OSError, StateLockTimeout) as exc:
        _log_once(
            "post-panic-state",
            _DEBUG,
            "metal_guard: cannot write %s (%s); the panic folder is scanned at every check",
            store.path,
            exc,
        )
        return {**state, "panics": recent}


def _unacknowledged(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The IOGPU panics of the state newer than the last ``ack``, oldest first."""
    acked = _number(state.get("acked_at"))
    panics = [
        p
        for p in state.get("panics") or []
        if isinstance(p, dict) and _number(p.get("ts")) is not None
    ]
    return sorted(
        (p for p in panics if acked is None or p["ts"] > acked), key=lambda p: float(p["ts"])
    )


class _PostPanicRefusal(MLXCooldownActive):
    """``MLXCooldownActive`` raised by the post-panic gate; ``panic`` is the newest panic,
    ``lockout`` the lockout count when a person must run ``metal-guard ack`` (else 0)."""

    def __init__(
        self,
        panic: dict[str, Any],
        panic_count: int,
        window_sec: float,
        cooldown_until: float,
        *,
        lockout: int = 0,
        now: float | None = None,
    ) -> None:
        self.panic = dict(panic)
        self.lockout = lockout
        super().__init__(panic_count, window_sec, cooldown_until, now=now)

    def _message(self) -> str:
        p = self.panic
        process = p.get("process") or "an unknown process"
        pid = f", pid {p['pid']}" if p.get("pid") is not None else ""
        what = (
            f"the Mac kernel-panicked at {_local_time(float(p['ts']))} "
            f"({_signature_words(p.get('signature'))}; process {process}{pid})"
        )
        if self.lockout:
            return (
                f"MLX work refused after a kernel panic: {self.panic_count} IOGPU kernel panics "
                f"within 24 h ({_PANIC_LOCKOUT_ENV}={self.lockout}); the newest: {what}. Refused "
                "until a person runs `metal-guard ack`; read `metal-guard diagnose` first."
            )
        return (
            f"MLX work refused after a kernel panic: {what}. Refused for "
            f"{_duration(self.remaining_sec)} more, until {_local_time(self.cooldown_until)} "
            f"({_PANIC_COOLDOWN_ENV}={self.window_sec:g} s), so a relaunch does not repeat the "
            "trigger. See what happened: `metal-guard diagnose`."
        )


def _burst(times: list[float]) -> int:
    """The most panics (epoch seconds) that fall within one 24-h window."""
    return max(
        (sum(1 for u in times if t <= u < t + _LOCKOUT_WINDOW_SEC) for t in times), default=0
    )


def _post_panic_decision(
    state: dict[str, Any], now: float, cooldown: float, lockout: int
) -> _PostPanicRefusal | None:
    unacked = _unacknowledged(state)
    if not unacked:
        return None
    newest = unacked[-1]
    times = sorted(float(p["ts"]) for p in unacked if p["ts"] >= now - _POST_PANIC_MEMORY_SEC)
    # ``lockout`` panics within some 24 h: refused until ``ack``, however long ago that was
    burst = _burst(times)
    if lockout and burst >= lockout:
        # without an ack it would end only when the gate forgets enough of those panics
        forgotten = next(
            t + _POST_PANIC_MEMORY_SEC
            for t in times
            if _burst([u for u in times if u > t]) < lockout
        )
        return _PostPanicRefusal(
            newest, burst, _LOCKOUT_WINDOW_SEC, forgotten, lockout=lockout, now=now
        )
    # a clock stepped back never lengthens the cooldown past ``now + cooldown``
    until = min(float(newest["ts"]) + cooldown, now + cooldown)
    if cooldown > 0 and until > now:
        return _PostPanicRefusal(newest, 1, cooldown, until, now=now)
    return None


def _post_panic_refusal(*, now: float | None = None) -> MLXCooldownActive | None:
    """The refusal the post-panic gate gives now (not raised), or ``None`` to go ahead.

    Archives new panic reports first (cheap while the report folder is
    unchanged). Never raises for environment faults: a gate that cannot read
    its state fails open with one WARNING.
    """
    when = time.time() if now is None else _real_arg("now", now)
    cooldown, lockout = _post_panic_settings()
    if cooldown <= 0 and lockout <= 0:
        return None
    try:
        state = _post_panic_state(when)
    except Exception as exc:  # never break the caller's inference over forensics
        _log_once(
            "post-panic-check",
            _WARNING,
            "metal_guard: cannot check for recent kernel panics (%s); MLX work goes ahead",
            exc,
        )
        return None
    return _post_panic_decision(state, when, cooldown, lockout)


@_on_admission
def _require_post_panic_clear(*, now: float | None = None) -> None:
    """Raise ``MLXCooldownActive`` while the post-panic gate refuses (observer mode: warn)."""
    refusal = _post_panic_refusal(now=now)
    if refusal is not None:
        _refuse(refusal)


def _acknowledge_panics(note: str | None = None, *, now: float | None = None) -> dict[str, Any]:
    """``metal-guard ack``: lift the lockout and the cooldown for the panics seen so far.

    Records ``acknowledged_at`` (and ``ack_note``) on each archived panic it
    covers and in the gate's state; returns ``acked_at``, ``note`` and
    ``panics`` (the panics acknowledged now). Raises ``OSError`` /
    ``StateLockTimeout`` when the state cannot be written.
    """
    when = time.time() if now is None else _real_arg("now", now)
    text = None if note is None else _label(note).strip()[:_PANIC_FIELD_MAX] or None
    state = _post_panic_state(when)
    covered = _unacknowledged(state)
    archive = _archive_path(None)
    with _FileLock(archive + ".lock"):
        records, _ = _load_archive(archive)
        changed = False
        for record in records:
            if record.get("acknowledged_at") is None and record["ts"] <= when:
                record["acknowledged_at"] = when
                record["ack_note"] = text
                changed = True
        if changed:
            _atomic_write_bytes(archive, b"".join(_archive_line(r) for r in records))

    def ack(data: dict[str, Any]) -> None:
        data.update(schema=_POST_PANIC_SCHEMA, acked_at=when, ack_note=text, acked_pid=os.getpid())

    _post_panic_file().update(ack)
    _breadcrumb(f"PANIC_ACK: {len(covered)} panic(s) acknowledged" + (f": {text}" if text else ""))
    return {"acked_at": when, "note": text, "panics": covered}


def _post_panic_status(*, now: float | None = None) -> dict[str, Any]:
    """What the gate decides now and why; never raises or writes (a status display)."""
    when = time.time() if now is None else _real_arg("now", now)
    cooldown, lockout = _post_panic_settings()
    doc: dict[str, Any] = {
        "cooldown_sec": cooldown,
        "lockout": lockout,
        "refused": False,
        "message": None,
        "remaining_sec": 0.0,
        "needs_ack": False,
        "unacknowledged": [],
        "acked_at": None,
        "ack_note": None,
        "problem": None,
    }
    try:
        state = _post_panic_state(when, record=False)
        refusal = _post_panic_decision(state, when, cooldown, lockout)
        doc.update(
            unacknowledged=_unacknowledged(state),
            acked_at=_number(state.get("acked_at")),
            ack_note=state.get("ack_note"),
        )
        if refusal is not None:
            doc.update(
                refused=True,
                message=str(refusal),
                remaining_sec=None if refusal.lockout else refusal.remaining_sec,
                needs_ack=bool(refusal.lockout),
            )
    except Exception as exc:
        doc["problem"] = f"{type(exc).__name__}: {exc}"
    return doc


# =============================================================================
# 4.10 Runs registry — the programs running under ``metal-guard run`` on this host.
#
# One entry per supervisor in ``runs.json`` (the locked-JSON-file primitive, not
# fsynced: it only describes running processes). The supervisor writes its entry
# when a child starts and removes it when it ends; a guarded child adds the time
# it waited for the GPU gate (``_run_note_gate_wait``, found through
# ``METALGUARD_RUN_SUPERVISOR``) and, when a guarded step is stuck, a note that
# SIGUSR1 tells the supervisor to read (``_run_note_stuck``). Entries whose supervisor is gone are ignored on
# read and dropped on the next write, so a supervisor killed with SIGKILL leaves
# nothing behind that ``status`` shows.
#
# Provides: _read_runs, _run_forget, _run_note_gate_wait, _run_note_stuck, _run_record,
#   _run_stuck_note, _run_supervisor, _RUN_SUPERVISOR_ENV_VAR
# Uses: Prelude, Processes, Files, Locks, JSON state files
# =============================================================================

_RUN_SUPERVISOR_ENV_VAR = "METALGUARD_RUN_SUPERVISOR"
_RUNS_LOCK_TIMEOUT_SEC = 2.0  # a child never waits long to add its gate time
_RUN_ARGV_MAX_WORDS, _RUN_ARGV_MAX_CHARS = 64, 300


def _runs_file() -> _JsonFile:
    return _JsonFile(_state_file("runs.json"), durable=False, lock_timeout=_RUNS_LOCK_TIMEOUT_SEC)


def _host() -> str:
    return os.uname().nodename if hasattr(os, "uname") else ""


def _run_entry_live(key: str, entry: object, host: str) -> bool:
    """Whether ``entry`` (keyed by its supervisor's pid) belongs to a running supervisor.

    Entries of other hosts (a state folder on a shared home) are kept but never
    judged: their pids mean nothing here.
    """
    if not isinstance(entry, dict) or not key.isdigit():
        return False
    if entry.get("host") != host:
        return True
    return _pid_running(int(key))


def _runs_update(mutate: Callable[[dict[str, Any]], None]) -> None:
    """``mutate`` the runs of this host's live supervisors; one WARNING per process on failure."""
    host = _host()

    def change(data: dict[str, Any]) -> None:
        for key in [k for k, v in data.items() if not _run_entry_live(k, v, host)]:
            del data[key]
        mutate(data)

    try:
        _runs_file().update(change)
    except (OSError, StateLockTimeout) as exc:
        _log_once(
            "runs-registry",
            _WARNING,
            "metal_guard: cannot update the runs registry %s (%s); `metal-guard status` will not "
            "list this program",
            _state_file("runs.json"),
            exc,
        )


def _run_record(*, child_pid: int | None, argv: list[str], restarts: int, since: float) -> None:
    """The supervisor's (this process's) entry: its child now, the command, restarts so far."""
    words = [w[:_RUN_ARGV_MAX_CHARS] for w in argv[:_RUN_ARGV_MAX_WORDS]]
    now = time.time()

    def put(data: dict[str, Any]) -> None:
        entry = data.get(str(os.getpid()))
        entry = entry if isinstance(entry, dict) else {}
        entry.update(
            host=_host(),
            supervisor_pid=os.getpid(),
            pid=child_pid,
            argv=words,
            since=since,
            child_since=now if child_pid is not None else None,
            restarts=restarts,
        )
        entry.setdefault("gate_wait_sec", 0.0)
        data[str(os.getpid())] = entry

    _runs_update(put)


def _run_forget() -> None:
    """Remove this supervisor's entry (at its exit)."""

    def drop(data: dict[str, Any]) -> None:
        data.pop(str(os.getpid()), None)

    _runs_update(drop)


def _run_supervisor() -> int:
    """The pid of this program's ``metal-guard run`` (child side), or 0 when not under run."""
    return _env_int(_RUN_SUPERVISOR_ENV_VAR, 0, minimum=1)


def _run_update_mine(change: Callable[[dict[str, Any]], None]) -> None:
    """``change`` this program's supervisor entry (child side; no-op outside run)."""
    supervisor = _run_supervisor()
    if supervisor <= 0:
        return

    def mine(data: dict[str, Any]) -> None:
        entry = data.get(str(supervisor))
        if isinstance(entry, dict):
            change(entry)

    _runs_update(mine)


def _run_note_gate_wait(seconds: float) -> None:
    """Add ``seconds`` waited for the GPU gate to this program's supervisor entry.

    Child side; a no-op when the process does not run under ``metal-guard run``.
    Call it once per request or every few seconds, never per step (it takes a
    file lock). Never raises for environment faults.
    """
    waited = _real_arg("seconds", seconds)
    if waited > 0:
        _run_update_mine(
            lambda entry: entry.update(
                gate_wait_sec=(_number(entry.get("gate_wait_sec")) or 0.0) + waited
            )
        )


def _run_note_stuck(label: str, seconds: float) -> None:
    """Tell the supervisor that a guarded step of this program is stuck (child side).

    Marks the entry (``stuck``: this pid, the step, how long) and wakes the
    supervisor with SIGUSR1; the supervisor stops the program gracefully and
    does not restart it. Never raises for environment faults.
    """
    import signal

    pid = os.getpid()
    note = {"pid": pid, "step": _label(label), "seconds": round(float(seconds), 1)}
    _run_update_mine(lambda entry: entry.update(stuck=note))
    supervisor = _run_supervisor()
    if supervisor > 0:
        try:
            os.kill(supervisor, signal.SIGUSR1)
        except OSError as exc:
            _log().warning("metal_guard: cannot tell metal-guard run (pid %d): %s", supervisor, exc)


def _run_stuck_note(child_pid: int) -> dict[str, Any] | None:
    """The stuck note ``child_pid`` left in this supervisor's entry, if any."""
    data, _ = _runs_file().read()
    entry = data.get(str(os.getpid())) if isinstance(data, dict) else None
    note = entry.get("stuck") if isinstance(entry, dict) else None
    return note if isinstance(note, dict) and note.get("pid") == child_pid else None


def _read_runs() -> list[dict[str, Any]]:
    """This host's programs under run, oldest first (never writes, never raises)."""
    data, problem = _runs_file().read()
    if problem is not None:
        _log().debug("metal_guard: runs registry unreadable: %s", problem)
    host = _host()
    runs: list[dict[str, Any]] = []
    for key, entry in data.items():
        if not isinstance(entry, dict) or entry.get("host") != host:
            continue
        if not _run_entry_live(key, entry, host):
            continue
        argv = entry.get("argv")
        runs.append(
            {
                "pid": entry.get("pid") if isinstance(entry.get("pid"), int) else None,
                "supervisor_pid": int(key),
                "argv": [str(w) for w in argv] if isinstance(argv, list) else [],
                "since": _number(entry.get("since")),
                "child_since": _number(entry.get("child_since")),
                "restarts": entry.get("restarts") if isinstance(entry.get("restarts"), int) else 0,
                "gate_wait_sec": _number(entry.get("gate_wait_sec")) or 0.0,
            }
        )
    runs.sort(key=lambda r: r["since"] or 0.0)
    return runs


# =============================================================================
# 5.0 Stuck GPU work — a guarded step that never finishes is reported, once.
#
# A GPU wedge (``fence_wait`` spinning at about 3 W, ml-explore/mlx#3830) leaves
# a step that never returns and wired memory that may never come back. ``with
# _stuck_watch("generate"):`` records the step's start (a dict entry, no
# syscall); one daemon thread per process, started with the first watched step
# and gone when none is left, looks once a second. A step running past
# ``METALGUARD_STUCK_SEC`` (default 1800 s; 0 turns the watch off) gets one
# ``GPU_STUCK`` breadcrumb, one WARNING advising a reboot, and the actions
# registered with ``_on_stuck`` (under ``run``: tell the supervisor and stop;
# in a worker: stop gracefully, no restart).
#
# Provides: _GPU_STUCK_ERROR, _on_stuck, _stuck_limit, _stuck_watch
# Uses: Prelude, Breadcrumbs
# =============================================================================

_STUCK_ENV = "METALGUARD_STUCK_SEC"
_STUCK_DEFAULT_SEC = 1800.0
_STUCK_MAX_SEC = 7 * 86400.0
_STUCK_POLL_SEC = 1.0
_GPU_STUCK_ERROR = "GPUStuck"  # how a worker's stuck report starts (never restarted)

_stuck_lock = _thread.allocate_lock()
_stuck_steps: dict[int, list[Any]] = {}  # token → [label, start (monotonic), limit, reported]
_stuck_actions: list[Callable[[str, float], None]] = []
_stuck_watcher: list[bool] = [False]  # whether the watcher thread runs
_stuck_tokens = iter(range(1, 1 << 62))


def _stuck_limit() -> float:
    """``METALGUARD_STUCK_SEC`` (0: off), read at each watched step."""
    return _env_float(_STUCK_ENV, _STUCK_DEFAULT_SEC, minimum=0.0, maximum=_STUCK_MAX_SEC)


def _on_stuck(action: Callable[[str, float], None]) -> Callable[[], None]:
    """Call ``action(label, seconds)`` when a watched step runs past the limit.

    Returns a function that unregisters it. Actions run on the watcher
    thread; an action that raises is logged and the others still run.
    """
    if not callable(action):
        raise TypeError(f"action must be callable, not {type(action).__name__}")
    with _stuck_lock:
        _stuck_actions.append(action)

    def remove() -> None:
        with _stuck_lock:
            if action in _stuck_actions:
                _stuck_actions.remove(action)

    return remove


def _report_stuck(label: str, seconds: float, limit: float) -> None:
    _breadcrumb(f"GPU_STUCK: {label} running for {seconds:.0f}s (limit {limit:g}s)")
    _log().warning(
        "metal_guard: GPU work %r has run for %.0f s (%s=%g): the GPU looks wedged "
        "(ml-explore/mlx#3830). Stop this process and reboot the Mac before running MLX "
        "again: wired memory may be stranded until reboot.",
        label,
        seconds,
        _STUCK_ENV,
        limit,
    )
    with _stuck_lock:
        actions = list(_stuck_actions)
    for action in actions:
        try:
            action(label, seconds)
        except Exception as exc:
            _log().warning("metal_guard: stuck-work action %r failed: %r", action, exc)


def _stuck_loop() -> None:
    """The watcher thread: once a second, report steps past their limit; exit when idle."""
    while True:
        time.sleep(_STUCK_POLL_SEC)
        now = time.monotonic()
        due = []
        with _stuck_lock:
            if not _stuck_steps:
                _stuck_watcher[0] = False
                return
            for step in _stuck_steps.values():
                if not step[3] and now - step[1] > step[2]:
                    step[3] = True
                    due.append((step[0], now - step[1], step[2]))
        for label, seconds, limit in due:
            _report_stuck(label, seconds, limit)


class _stuck_watch(_ContextDecorator):
    """``with _stuck_watch("generate"):`` — report the body if it runs past the limit."""

    __slots__ = ("_token", "label")

    def __init__(self, label: str) -> None:
        self.label = _label(label)
        self._token = 0

    def _recreate(self) -> _stuck_watch:
        return _stuck_watch(self.label)

    def __enter__(self) -> _stuck_watch:
        limit = _stuck_limit()
        if limit <= 0:
            return self
        token = next(_stuck_tokens)
        start = False
        with _stuck_lock:
            _stuck_steps[token] = [self.label, time.monotonic(), limit, False]
            if not _stuck_watcher[0]:
                _stuck_watcher[0] = start = True
        self._token = token
        if start:
            import threading

            try:
                threading.Thread(
                    target=_stuck_loop, name="metal-guard stuck-work", daemon=True
                ).start()
            except RuntimeError as exc:  # interpreter shutting down: no watch
                with _stuck_lock:
                    _stuck_watcher[0] = False
                _log().debug("metal_guard: cannot start the stuck-work watcher: %r", exc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token:
            with _stuck_lock:
                _stuck_steps.pop(self._token, None)
            self._token = 0


# =============================================================================
# 5.1 Flush guards — per-inference flush and the gemma-4 first-generate flush.
#
# Both are best-effort: a failing MLX step logs and carries on, and the body's
# own exception always propagates unchanged.
#
# Provides: gemma4_generation_flush, subprocess_inference_guard, _inference_flush_post,
#   _inference_flush_pre
# Uses: Prelude, Breadcrumbs, MLX access, Model identity, GPU gate
# =============================================================================


def _inference_flush_pre(model_id: object) -> None:
    """PRE of one inference: ``mx.clear_cache()`` and a ``SUBPROC_PRE`` breadcrumb."""
    mx = _mlx()
    if mx is not None:
        _mlx_step(
            "clear_cache (pre)", _mlx_fn(mx, "clear_cache"), model_id=model_id, level=_WARNING
        )
    _breadcrumb(f"SUBPROC_PRE: {_label(model_id)}")


def _inference_flush_post(
    model_id: object, streams: object = None, *, failed: bool = False
) -> None:
    """POST of one inference: synchronize the streams, then ``mx.clear_cache()`` and a
    ``SUBPROC_POST`` breadcrumb. After a failed body the driver may already be in
    trouble: step failures are then expected and logged at DEBUG only.
    """
    level = _DEBUG if failed else _WARNING
    mx = _mlx()
    if mx is not None:
        _synchronize(mx, streams, model_id=model_id, level=level)
        _mlx_step("clear_cache (post)", _mlx_fn(mx, "clear_cache"), model_id=model_id, level=level)
    _breadcrumb(f"SUBPROC_POST: {_label(model_id)}")


class subprocess_inference_guard(_ContextDecorator):
    """Flush MLX around one generate call: ``with subprocess_inference_guard(model_id): ...``.

    PRE: ``mx.clear_cache()`` and a ``SUBPROC_PRE`` breadcrumb. POST (also when
    the body raises): synchronize the default stream, mlx-lm's
    ``generation_stream`` and every stream in ``streams`` **before**
    ``mx.clear_cache()``, then a ``SUBPROC_POST`` breadcrumb. Releasing
    buffers while a command buffer is still in flight is the race this closes.

    Wrap the generate call in the thread that runs it (mlx-lm's stream may be
    thread-local). Works around ``stream_generate`` loops, nested, from many
    threads, and as a decorator of a function that returns its result (for a
    generator, put the ``with`` around the loop instead). Without MLX only the
    breadcrumbs are written.

    ``exclusive=True`` (or ``None`` with ``METALGUARD_EXCLUSIVE_GPU`` true) also
    holds the GPU gate (``exclusive_gpu``) around PRE, body and POST, so only
    one guarded generate runs at a time on the host.
    """

    __slots__ = ("_gates", "exclusive", "model_id", "streams")

    def __init__(
        self, model_id: object, *, streams: object = None, exclusive: bool | None = None
    ) -> None:
        self.model_id = model_id
        # Materialised once, so a generator of streams serves every use of the guard.
        self.streams: tuple[object, ...] = tuple(_as_stream_list(streams))
        self.exclusive = None if exclusive is None else bool(exclusive)
        # per thread: the GPU gates this guard entered (None: not exclusive), innermost last
        self._gates: dict[int, list[exclusive_gpu | None]] = {}

    def __enter__(self) -> subprocess_inference_guard:
        gate = None
        if self.exclusive or (self.exclusive is None and _env_bool("METALGUARD_EXCLUSIVE_GPU")):
            gate = exclusive_gpu(f"subprocess_inference_guard:{_label(self.model_id)}")
            gate.__enter__()
        self._gates.setdefault(_thread.get_ident(), []).append(gate)
        try:
            self._pre()
        except BaseException:  # KeyboardInterrupt during PRE: do not keep the gate
            self._leave_gate()
            raise
        return self

    def _leave_gate(self) -> None:
        me = _thread.get_ident()
        stack = self._gates.get(me)
        gate = stack.pop() if stack else None
        if stack is not None and not stack:
            del self._gates[me]
        if gate is not None:
            gate.__exit__(None, None, None)

    def _pre(self) -> None:
        _inference_flush_pre(self.model_id)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            _inference_flush_post(self.model_id, self.streams, failed=exc is not None)
        finally:
            self._leave_gate()

    def _recreate(self) -> subprocess_inference_guard:
        # as a decorator: a fresh guard per call, so concurrent calls never share one
        return subprocess_inference_guard(
            self.model_id, streams=self.streams, exclusive=self.exclusive
        )

    def __repr__(self) -> str:
        return (
            f"subprocess_inference_guard({self.model_id!r}, streams={self.streams!r}, "
            f"exclusive={self.exclusive!r})"
        )


_GEMMA4_SLEEP_DEFAULT = 3.0
_GEMMA4_SLEEP_MAX = 60.0


class gemma4_generation_flush:
    """Settle window before the first forward pass of a fresh gemma-4 worker.

    Call it (``gemma4_generation_flush(model_id, n)``) or use it as a context
    manager (``with gemma4_generation_flush(model_id, n): generate(...)``):
    either way the flush happens when the object is created, and leaving the
    ``with`` does nothing. It acts only when ``generate_call_count == 0``, the
    model is gemma-4 family, MLX is present and
    ``METALGUARD_GEMMA4_FIRSTGEN_DISABLED`` is not truthy: breadcrumb
    ``GEMMA4_FLUSH``, synchronize, ``mx.clear_cache()``, sleep
    ``METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC`` (default 3, clamped to [0, 60]),
    breadcrumb ``GEMMA4_FLUSH_DONE``. Never raises. ``flushed`` and
    ``slept_sec`` say what it did.
    """

    __slots__ = ("flushed", "generate_call_count", "model_id", "slept_sec")

    def __init__(self, model_id: object, generate_call_count: int) -> None:
        self.model_id = model_id
        self.generate_call_count = generate_call_count
        self.flushed = False
        self.slept_sec = 0.0
        try:  # the original's `count == 0`, for any real number (NumPy scalars too)
            first_call = _real_arg("generate_call_count", generate_call_count) == 0
        except (TypeError, ValueError):  # a best-effort guard: say so, never raise
            _log_once(
                "gemma4-count",
                _WARNING,
                "metal_guard: gemma4_generation_flush needs a finite number as "
                "generate_call_count, got %s; no flush",
                _label(generate_call_count),
            )
            return
        if not first_call or not is_gemma4_family(model_id):
            return
        if _env_bool("METALGUARD_GEMMA4_FIRSTGEN_DISABLED"):
            return
        mx = _mlx()
        if mx is None:
            return
        label = _label(model_id)
        _breadcrumb(f"GEMMA4_FLUSH: {label}")
        _synchronize(mx, model_id=model_id, level=_DEBUG)
        _mlx_step("clear_cache", _mlx_fn(mx, "clear_cache"), model_id=model_id, level=_DEBUG)
        sleep_sec = _env_float(
            "METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC",
            _GEMMA4_SLEEP_DEFAULT,
            minimum=0.0,
            maximum=_GEMMA4_SLEEP_MAX,
            clamp=True,
        )
        if sleep_sec > 0:
            time.sleep(sleep_sec)
        self.slept_sec = sleep_sec
        self.flushed = True
        _breadcrumb(f"GEMMA4_FLUSH_DONE: {label}")

    def __enter__(self) -> gemma4_generation_flush:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return (
            f"gemma4_generation_flush({self.model_id!r}, {self.generate_call_count!r}, "
            f"flushed={self.flushed}, slept_sec={self.slept_sec:g})"
        )


# =============================================================================
# 5.2 Wired-limit control — keep MLX from wiring the recommended working set.
#
# mlx-lm wires the device's recommended working set around every generate
# (``wired_limit`` in mlx_lm.generate) and ``mlx_lm.server`` does so at start.
# With ``mx.set_wired_limit`` never called, a workload that panicked 3 of 3
# times ran 10 of 10 times clean for 4.2 hours, and a production follow-up
# ran 663 requests over 3 days without a panic (ml-explore/mlx#3186).
# ``limit_wired_memory`` wraps ``mlx.core.set_wired_limit`` (and the older
# ``mlx.core.metal.set_wired_limit``) process-wide, so every caller that looks
# it up through the module gets the policy: ``off`` (the default, what that
# evidence supports) turns every request into 0; ``cap`` clamps to RAM minus
# max(35 %, 8 GiB) and ``cap:<GiB>`` to a size — the throughput compromise for
# workloads that measurably need wired memory, not measured against panics.
# Nothing is installed unless it is called.
#
# Provides: describe_wired_limit, limit_wired_memory, restore_wired_memory
# Uses: Prelude, Breadcrumbs, MLX access, Memory numbers
# =============================================================================

_WIRED_ENV_VAR = "METALGUARD_WIRED_LIMIT"
_WIRED_DEFAULT_POLICY = "off"
_GIB = 1 << 30
_WIRED_RESERVE_FRACTION = 0.35
_WIRED_RESERVE_MIN_BYTES = 8 << 30
_WIRED_SEEN_MAX = 256
_WIRED_MARK = "_metal_guard_wired_original"


class _WiredPolicy:
    """The policy in force (replaced, never mutated: the wrappers read it without a lock)."""

    __slots__ = ("cap_bytes", "name", "source", "total_bytes")

    def __init__(self, name: str, cap_bytes: int, total_bytes: int | None, source: str) -> None:
        self.name = name
        self.cap_bytes = cap_bytes
        self.total_bytes = total_bytes
        self.source = source


_wired_lock = _thread.allocate_lock()
_wired_policy: _WiredPolicy | None = None
# (owner module, attribute, label, original function, our wrapper)
_wired_installs: list[tuple[Any, str, str, Callable[..., Any], Callable[..., Any]]] = []
_wired_seen: set[tuple[int, int]] = set()  # (requested, applied) pairs already breadcrumbed
_wired_counts = [0, 0]  # requests seen, requests clamped


@_on_reset
def _forget_wired_clamps() -> None:
    with _wired_lock:
        _wired_seen.clear()


def _parse_wired_policy(text: str) -> tuple[str, float | None]:
    """``off`` / ``cap`` / ``cap:<GiB>`` (any case) → (canonical name, GiB or ``None``)."""
    word = text.strip().lower()
    if word in ("off", "cap"):
        return word, None
    if word.startswith("cap:"):
        number = word[4:].strip().removesuffix("gib").removesuffix("g").strip()
        try:
            gib = float(number)
        except ValueError:
            gib = -1.0
        if _finite(gib) and gib >= 0:
            return f"cap:{gib:g}", gib
    raise ValueError(
        f"unknown wired-limit policy {text!r}: expected 'off', 'cap' or 'cap:<GiB>' (e.g. 'cap:24')"
    )


def _wired_policy_from_env() -> tuple[str, float | None, str]:
    """The policy ``METALGUARD_WIRED_LIMIT`` asks for, and where it came from."""
    parsed = _env_parsed(
        _WIRED_ENV_VAR,
        _parse_wired_policy,
        expected="expected off, cap or cap:<GiB>",
        default=_WIRED_DEFAULT_POLICY,
    )
    if parsed is None:
        return _WIRED_DEFAULT_POLICY, None, "default"
    return (*parsed, _WIRED_ENV_VAR)


def _wired_cap(name: str, gib: float | None, total: int | None) -> int:
    if name == "off":
        return 0
    if gib is not None:
        return int(gib * _GIB)
    if total is None:
        _log_once(
            "wired-cap-unknown",
            _WARNING,
            "metal_guard: total memory is unknown, so wired-limit policy 'cap' never wires "
            "(as 'off'); set %s=cap:<GiB> to choose a size",
            _WIRED_ENV_VAR,
        )
        return 0
    reserve = max(int(total * _WIRED_RESERVE_FRACTION), _WIRED_RESERVE_MIN_BYTES)
    return max(0, total - reserve)


def _wired_request(limit: Any) -> Any:
    """What a ``set_wired_limit(limit)`` call actually passes to MLX under the policy."""
    policy = _wired_policy
    if policy is None or isinstance(limit, bool):
        return limit
    try:
        requested = int(limit.__index__())
    except Exception:  # not an integer: let MLX raise its own error
        return limit
    clamp = requested > policy.cap_bytes
    with _wired_lock:
        _wired_counts[0] += 1
        _wired_counts[1] += clamp
        first = clamp and (requested, policy.cap_bytes) not in _wired_seen
        if first and len(_wired_seen) < _WIRED_SEEN_MAX:
            _wired_seen.add((requested, policy.cap_bytes))
    if not clamp:
        return limit
    if first:
        applied = policy.cap_bytes
        _breadcrumb(
            f"WIRED_LIMIT: requested={requested} ({requested / _GIB:.2f} GiB) "
            f"applied={applied} ({applied / _GIB:.2f} GiB) policy={policy.name}"
        )
        _log().info(
            "metal_guard: set_wired_limit(%d) clamped to %d by wired-limit policy %s",
            requested,
            applied,
            policy.name,
        )
    return policy.cap_bytes


def _wired_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    def set_wired_limit(limit: Any) -> Any:
        return original(_wired_request(limit))

    set_wired_limit.__doc__ = getattr(original, "__doc__", None)
    set_wired_limit.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(set_wired_limit, _WIRED_MARK, original)
    return set_wired_limit


def _wired_targets(mx: ModuleType) -> list[tuple[Any, str, str]]:
    return [
        (owner, "set_wired_limit", label)
        for owner, label in (
            (mx, "mlx.core.set_wired_limit"),
            (getattr(mx, "metal", None), "mlx.core.metal.set_wired_limit"),
        )
        if owner is not None and callable(getattr(owner, "set_wired_limit", None))
    ]


def _install_wrappers(mx: ModuleType) -> list[str]:
    """Wrap every ``set_wired_limit`` of ``mx`` not wrapped yet; the labels now covered."""
    covered = []
    for owner, attr, label in _wired_targets(mx):
        current = getattr(owner, attr)
        if any(i[0] is owner and i[1] == attr and i[4] is current for i in _wired_installs):
            covered.append(label)
            continue
        wrapper = _wired_wrapper(current)
        try:
            setattr(owner, attr, wrapper)
        except Exception as exc:
            _log_once(
                "wired-setattr:" + label,
                _WARNING,
                "metal_guard: cannot replace %s (%r); the wired-limit policy does not cover it",
                label,
                exc,
            )
            continue
        _wired_installs.append((owner, attr, label, current, wrapper))
        covered.append(label)
    return covered


if TYPE_CHECKING:
    _DictBase = dict[str, Any]
else:
    _DictBase = dict


class _WiredLimitHandle(_DictBase):
    """What ``limit_wired_memory`` installed (a dict); as a context manager it undoes it."""

    def __init__(self, info: dict[str, Any], previous: str | None) -> None:
        super().__init__(info)
        self._previous = previous

    def __enter__(self) -> _WiredLimitHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.get("installed"):
            return
        if self._previous is None:
            restore_wired_memory()
        else:  # a policy was in force before this block: put it back
            limit_wired_memory(self._previous)


def limit_wired_memory(policy: str | None = None) -> dict[str, Any]:
    """Install a process-wide wired-memory policy on ``mx.set_wired_limit``.

    ``"off"`` (the recommended default): every request becomes 0, so MLX never
    wires memory — the setting that ran clean where wiring the recommended
    working set panicked (ml-explore/mlx#3186). ``"cap"``: requests are
    clamped to total RAM minus max(35 % of it, 8 GiB); ``"cap:<GiB>"``: to
    that size — the throughput compromise for a workload that measurably
    needs wired memory; not shown to prevent panics. ``None`` reads
    ``METALGUARD_WIRED_LIMIT`` (default ``"off"``; a bad value warns once and
    uses the default). Requests at or under the limit pass unchanged. The
    first clamp of each size writes a ``WIRED_LIMIT: requested=… applied=…``
    breadcrumb.

    Idempotent: calling it again changes the policy, never wraps twice. The
    returned dict says what was installed (``policy``, ``source``,
    ``installed``, ``cap_bytes``, ``total_memory_bytes``, ``targets``,
    ``reason``); used as a context manager, it undoes itself on exit.
    ``restore_wired_memory()`` puts the original functions back. Install it
    before the first generate: a limit MLX already wired stays until the
    next ``set_wired_limit`` call.
    """
    global _wired_policy
    if policy is None:
        name, gib, source = _wired_policy_from_env()
    elif isinstance(policy, str):
        name, gib = _parse_wired_policy(policy)
        source = "argument"
    else:
        raise TypeError(f"policy must be a str or None, not {type(policy).__name__}")
    info: dict[str, Any] = {
        "policy": name,
        "source": source,
        "installed": False,
        "cap_bytes": None,
        "total_memory_bytes": None,
        "targets": [],
        "reason": None,
    }
    mx = _mlx()
    if mx is None:
        info["reason"] = "MLX is not installed: there is no wired limit to control"
        return _WiredLimitHandle(info, None)
    total = _total_memory_bytes() or None
    cap = _wired_cap(name, gib, total)
    info.update(cap_bytes=cap, total_memory_bytes=total)
    with _wired_lock:
        previous = _wired_policy.name if _wired_policy is not None and _wired_installs else None
        targets = _install_wrappers(mx)
        if targets:
            _wired_policy = _WiredPolicy(name, cap, total, source)
    if not targets:
        info["reason"] = "this MLX has no set_wired_limit to wrap"
        return _WiredLimitHandle(info, None)
    info.update(installed=True, targets=targets)
    _log().info(
        "metal_guard: wired-limit policy %s installed (limit %.2f GiB) on %s",
        name,
        cap / _GIB,
        ", ".join(targets),
    )
    return _WiredLimitHandle(info, previous)


def restore_wired_memory() -> bool:
    """Remove the wired-limit policy: the original ``set_wired_limit`` functions go back.

    Returns True when a policy was installed. A wrapper that someone else has
    replaced since is left alone (and stops clamping). The wired limit MLX
    holds now is not changed (mlx-lm restores its own after each generate).
    """
    global _wired_policy
    with _wired_lock:
        installs = list(_wired_installs)
        _wired_installs.clear()
        was_installed = _wired_policy is not None or bool(installs)
        _wired_policy = None
        for owner, attr, label, original, wrapper in installs:
            if getattr(owner, attr, None) is wrapper:
                setattr(owner, attr, original)
            else:
                _log().debug("metal_guard: %s was replaced since; left as it is", label)
    if was_installed:
        _log().info("metal_guard: wired-limit policy removed")
    return was_installed


def describe_wired_limit() -> dict[str, Any]:
    """The wired-limit policy in force in this process, and what the environment asks for."""
    env_name, _, env_source = _wired_policy_from_env()
    with _wired_lock:
        policy = _wired_policy
        installed = policy is not None and bool(_wired_installs)
        targets = [i[2] for i in _wired_installs]
        seen, clamped = _wired_counts
    raw = os.environ.get(_WIRED_ENV_VAR)
    return {
        "installed": installed,
        "policy": policy.name if installed and policy else None,
        "source": policy.source if installed and policy else None,
        "cap_bytes": policy.cap_bytes if installed and policy else None,
        "total_memory_bytes": policy.total_bytes if installed and policy else None,
        "targets": targets,
        "requests_seen": seen,
        "requests_clamped": clamped,
        "env_var": _WIRED_ENV_VAR,
        "env_value": raw if raw is not None and raw.strip() else None,
        "env_policy": env_name,
        "env_policy_source": env_source,
    }


# =============================================================================
# 5.3 Upstream patches — defects of installed MLX packages fixed in place.
#
# Each patch is gated on the exact release that has the defect (``force=True``
# applies it anyway), is idempotent (a marker on the replacement), never
# raises, and logs one WARNING naming what it patched.
#
# Provides: install_upstream_defensive_patches
# Uses: Prelude, Version advisories
# =============================================================================

_PATCH_MARK = "_metal_guard_safe"
_MLX_LM_1128_VERSION = "0.31.2"


def _mlx_lm_version() -> str | None:
    """The running mlx-lm's version: an imported ``mlx_lm.__version__``, else its metadata."""
    module = sys.modules.get("mlx_lm")
    version = getattr(module, "__version__", None) if module is not None else None
    if isinstance(version, str) and version.strip():
        return version.strip()
    return _installed_version("mlx-lm")


def _safe_think_start_id(self: Any) -> Any:
    """``think_start_id`` that answers ``None`` for tokenizers without thinking tokens."""
    tokens = getattr(self, "_think_start_tokens", None)
    if not tokens:
        return None
    if len(tokens) > 1:
        raise ValueError("The start thinking sequence is more than 1 token")
    return tokens[0]


setattr(_safe_think_start_id, _PATCH_MARK, True)


def _patch_mlx_lm_1128(*, force: bool = False) -> bool:
    """Patch ``TokenizerWrapper.think_start_id`` of mlx-lm 0.31.2 (ml-explore/mlx-lm#1128).

    On 0.31.2 the property calls ``len(None)`` for tokenizers without a
    think-start sequence. True when the patch was applied by this call.
    """
    version = _mlx_lm_version()
    if version is None:
        _log().debug("metal_guard: mlx-lm is not installed; patch mlx_lm_1128 not needed")
        return False
    if not force and version != _MLX_LM_1128_VERSION:
        _log().debug("metal_guard: mlx-lm %s does not need patch mlx_lm_1128", version)
        return False
    module = sys.modules.get("mlx_lm.tokenizer_utils")
    if module is None:
        import importlib

        try:
            module = importlib.import_module("mlx_lm.tokenizer_utils")
        except Exception as exc:  # ImportError, or a broken install
            _log().debug("metal_guard: cannot import mlx_lm.tokenizer_utils: %r", exc)
            return False
    wrapper_cls: Any = getattr(module, "TokenizerWrapper", None)
    current = getattr(wrapper_cls, "__dict__", {}).get("think_start_id")
    if not isinstance(current, property) or current.fget is None:
        _log().debug("metal_guard: TokenizerWrapper.think_start_id is not a property; not patched")
        return False
    if getattr(current.fget, _PATCH_MARK, False):
        return False
    wrapper_cls.think_start_id = property(_safe_think_start_id, doc=current.__doc__)
    _log().warning(
        "metal_guard: patched mlx-lm %s TokenizerWrapper.think_start_id (ml-explore/mlx-lm#1128): "
        "it now returns None for tokenizers without thinking tokens instead of raising TypeError",
        version,
    )
    return True


def install_upstream_defensive_patches(*, force: bool = False) -> dict[str, bool]:
    """Apply the in-place fixes for defects of the installed MLX packages; never raises.

    ``{"mlx_lm_1128_think_start_id": applied}``: True only when this call
    patched it (already patched, mlx-lm absent, another release → False).
    ``force=True`` patches whatever mlx-lm release is installed.
    """
    try:
        applied = _patch_mlx_lm_1128(force=bool(force))
    except Exception as exc:  # a patch must never break start-up
        _log_once(
            "patch-1128",
            _WARNING,
            "metal_guard: patch mlx_lm_1128_think_start_id failed: %s: %s",
            type(exc).__name__,
            _label(exc),
        )
        applied = False
    return {"mlx_lm_1128_think_start_id": applied}


# =============================================================================
# 5.4 System audits — the machine's wired-memory setting, the GPU driver
# version and MLX settings known to wedge the GPU.
#
# The macOS facts come from ``sysctl``, the IOGPUFamily kext's Info.plist,
# ``kextstat`` and ``ioreg``. Every subprocess runs with a time bound (it is
# asked to stop with SIGTERM, killed only if it ignores that), nothing here
# raises on an environment fault, and off macOS nothing is run at all: the
# answers are "unknown" / ``None``.
#
# Provides: audit_wired_limit, log_system_audit_at_startup, read_gpu_driver_version,
#   _FAST_SYNCH_ENV_VAR, _fast_synch_value, _nonnegative_int, _sysctl
# Uses: Prelude, Processes, Files, Model identity, Version advisories
# =============================================================================

_WIRED_LIMIT_WARN_RATIO = 0.85
_SYSCTL_BUDGET_SEC = 2.0
_IOGPU_BUNDLE = "com.apple.iokit.IOGPUFamily"
_IOGPU_PLIST = "/System/Library/Extensions/IOGPUFamily.kext/Contents/Info.plist"
_FAST_SYNCH_ENV_VAR = "MLX_METAL_FAST_SYNCH"


def _sysctl(name: str, *, timeout: float = _SYSCTL_BUDGET_SEC) -> str | None:
    """``sysctl -n name`` on macOS (stripped, ``None`` if empty or failed); ``None`` elsewhere."""
    if not _on_macos():
        return None
    out = _run_bounded(["sysctl", "-n", name], timeout)
    text = out.strip() if out is not None else ""
    return text or None


def _nonnegative_int(text: str | None) -> int | None:
    if text is None or not _regex("digits", r"\s*[0-9]{1,20}\s*").fullmatch(text):
        return None
    return int(text)


def _wired_limit_report(limit_text: str | None, memsize_text: str | None) -> dict[str, Any]:
    """``audit_wired_limit``'s dict from the two ``sysctl`` outputs."""
    limit_mb = _nonnegative_int(limit_text)
    total_bytes = _nonnegative_int(memsize_text) or None
    total_gb = total_bytes / (1 << 30) if total_bytes else None
    report: dict[str, Any] = {
        "limit_mb": limit_mb,
        "total_gb": round(total_gb, 2) if total_gb is not None else None,
        "ratio": 0.0,
        "mode": "unknown",
        "advisory": None,
    }
    if limit_mb is None:
        return report
    if limit_mb == 0:
        report["mode"] = "default"
        return report
    report["mode"] = "override"
    if total_gb is None:
        return report
    ratio = (limit_mb / 1024) / total_gb
    report["ratio"] = round(ratio, 3)
    if ratio > _WIRED_LIMIT_WARN_RATIO:
        ceiling_mb = int(total_gb * 1024 * _WIRED_LIMIT_WARN_RATIO)
        report["advisory"] = (
            f"iogpu.wired_limit_mb={limit_mb} lets the GPU wire {ratio:.0%} of the "
            f"{total_gb:.0f} GiB of RAM, leaving macOS too little (overrides this high are "
            f"correlated with IOGPUFamily kernel panics, ml-explore/mlx-lm#1047); reset it with "
            f"`sudo sysctl iogpu.wired_limit_mb=0` or keep it below {ceiling_mb} MB "
            f"({_WIRED_LIMIT_WARN_RATIO:.0%} of RAM)"
        )
    return report


def audit_wired_limit() -> dict[str, Any]:
    """The machine's ``iogpu.wired_limit_mb`` against its RAM; never raises.

    Keys: ``limit_mb``, ``total_gb`` (GiB), ``ratio`` (limit / RAM),
    ``mode`` (``default`` for 0, ``override``, or ``unknown`` when unreadable,
    e.g. off macOS) and ``advisory`` (text when the limit is above 85 % of
    RAM, else ``None``). Both ``sysctl`` calls share a 2 s bound.
    """
    try:
        deadline = time.monotonic() + _SYSCTL_BUDGET_SEC
        limit = _sysctl("iogpu.wired_limit_mb", timeout=_SYSCTL_BUDGET_SEC)
        memsize = _sysctl("hw.memsize", timeout=deadline - time.monotonic())
        return _wired_limit_report(limit, memsize)
    except Exception as exc:
        _log().debug("metal_guard: wired-limit audit failed: %r", exc)
        return _wired_limit_report(None, None)


def _kextstat_version(text: str) -> str | None:
    """The IOGPUFamily version in ``kextstat`` output: ``... IOGPUFamily (104.4.2) ...``."""
    for line in text.splitlines():
        if _IOGPU_BUNDLE in line:
            found = _regex("kext-version", r"\(([^()\s]{1,64})\)").search(
                line.split(_IOGPU_BUNDLE, 1)[1]
            )
            if found is not None:
                return str(found.group(1))
    return None


def _ioreg_version(text: str) -> str | None:
    """The first ``"CFBundleVersion" = "104.4.2"`` value in ``ioreg`` output."""
    for line in text.splitlines():
        if "CFBundleVersion" in line and "=" in line:
            value = line.split("=", 1)[1].strip().strip('"').strip()
            if value:
                return value[:64]
    return None


def _plist_version(path: str) -> str | None:
    """``CFBundleVersion`` of a kext's ``Info.plist`` (the installed version)."""
    import plistlib

    try:
        data = plistlib.loads(_read_bounded(path, 1 << 20, follow_symlinks=True))
    except Exception as exc:  # missing, unreadable, not a plist
        _log().debug("metal_guard: cannot read %s: %r", path, exc)
        return None
    version = data.get("CFBundleVersion") if isinstance(data, dict) else None
    if not isinstance(version, str):
        return None
    return version.strip()[:64] or None


def read_gpu_driver_version(*, timeout: float = 3.0) -> str | None:
    """The IOGPUFamily kext version (the GPU driver), or ``None``; never raises on faults.

    Tries the kext's ``Info.plist``, then ``kextstat``, then ``ioreg``, all
    within ``timeout`` seconds together. ``None`` off macOS.
    """
    budget = _real_arg("timeout", timeout, minimum=0, above=True)
    if not _on_macos():
        return None
    try:
        deadline = time.monotonic() + budget
        version = _plist_version(_IOGPU_PLIST)
        if version is None:
            out = _run_bounded(["kextstat", "-l", "-b", _IOGPU_BUNDLE], deadline - time.monotonic())
            version = _kextstat_version(out) if out is not None else None
        if version is None:
            out = _run_bounded(
                ["ioreg", "-rc", "IOGPUFamily", "-d", "1"], deadline - time.monotonic()
            )
            version = _ioreg_version(out) if out is not None else None
        return version
    except Exception as exc:
        _log().debug("metal_guard: reading the IOGPUFamily version failed: %r", exc)
        return None


def _fast_synch_value() -> str | None:
    """The value of ``MLX_METAL_FAST_SYNCH`` when it turns fast synchronisation on."""
    raw = os.environ.get(_FAST_SYNCH_ENV_VAR)
    if raw is None:
        return None
    word = raw.strip().lower()
    enabled = word in _TRUE_WORDS or (word.isdigit() and int(word) != 0)
    return raw.strip() if enabled else None


def log_system_audit_at_startup() -> dict[str, Any]:
    """Audit the wired limit, the GPU driver and MLX settings, and log what matters.

    The critical findings — a wired limit above 85 % of RAM, ``MLX_METAL_FAST_SYNCH``
    set (it can deadlock in a fence wait and wedge the GPU until reboot,
    ml-explore/mlx#3830) and each ``critical`` version advisory of the installed
    MLX stack — are logged at WARNING and issued as a ``MetalGuardWarning``
    (shown even without logging configured); the rest at INFO. Returns
    ``{"wired_limit": …, "gpu_driver_version": …, "mlx_metal_fast_synch": …,
    "critical_advisories": [...]}``; never raises.
    """
    wired = audit_wired_limit()
    driver = read_gpu_driver_version()
    fast_synch = _fast_synch_value()
    try:
        critical = [a for a in check_version_advisories() if a["severity"] == "critical"]
    except Exception as exc:  # broken package metadata must not break the audit
        _log().debug("metal_guard: version advisories unavailable: %r", exc)
        critical = []
    log = _log()
    if wired["advisory"]:
        log.warning("metal_guard: %s", wired["advisory"])
        _warn(wired["advisory"])
    else:
        log.info(
            "metal_guard: wired limit mode=%s limit_mb=%s total_gb=%s",
            wired["mode"],
            wired["limit_mb"],
            wired["total_gb"],
        )
    if driver is not None:
        log.info("metal_guard: IOGPUFamily kext %s", driver)
    else:
        log.debug("metal_guard: the IOGPUFamily kext version could not be read")
    if fast_synch is not None:
        message = (
            f"{_FAST_SYNCH_ENV_VAR}={fast_synch} is set: MLX's fast GPU synchronisation can "
            "deadlock in a fence wait and wedge the GPU until reboot (ml-explore/mlx#3830); unset it"
        )
        log.warning("metal_guard: %s", message)
        _warn(message)
    for advisory in critical:
        message = (
            f"critical advisory {advisory['issue']} for {advisory['package']} "
            f"{advisory['installed_version']}: {advisory['title']}. {advisory['mitigation']} "
            f"({advisory['url']})"
        )
        log.warning("metal_guard: %s", message)
        _warn(message)
    return {
        "wired_limit": wired,
        "gpu_driver_version": driver,
        "mlx_metal_fast_synch": fast_synch is not None,
        "critical_advisories": critical,
    }


# =============================================================================
# 5.5 Memory layers — MetalGuard L1-L4: GPU-thread registry, safe cleanup,
# Metal out-of-memory recovery, the pre-load fit check.
#
# The original metal-guard's methods and breadcrumb tags, corrected: one
# deadline for all threads, a real (stream-aware) synchronize before the cache
# is cleared, no cache clearing while registered GPU threads still run, OOM
# means out-of-memory only, and fit decisions on max(active, footprint).
#
# Provides: _ERROR, _MemoryLayers, _reset_peak_memory
# Uses: Prelude, Breadcrumbs, MLX access, Memory numbers, Release barrier, Model identity,
#   Size and hardware tables
# =============================================================================

_ERROR = 40
# Metal out-of-memory, and nothing else: fPendingMemorySet is a kernel-panic
# string and ImpactingInteractivity a GPU watchdog kill (retrying those is wrong).
_OOM_PATTERN = (
    r"(?is)kIOGPUCommandBufferCallbackErrorOutOfMemory"
    r"|Command buffer execution failed.*?Insufficient Memory"
)
_OOM_TEXT_MAX = 1 << 16


def _reset_peak_memory() -> None:
    mx = _mlx()
    if mx is not None:
        _mlx_step("reset_peak_memory", _mlx_fn(mx, "reset_peak_memory"))


class _GuardedCleanup(_ContextDecorator):
    """``with guard.guarded_cleanup():`` — ``safe_cleanup()`` after the body, also on errors."""

    __slots__ = ("guard",)

    def __init__(self, guard: _MemoryLayers) -> None:
        self.guard = guard

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.guard.safe_cleanup()


class _OOMContext(_ContextDecorator):
    """``with guard.oom_protected_context():`` — a Metal OOM becomes ``MetalOOMError`` after cleanup."""

    __slots__ = ("guard",)

    def __init__(self, guard: _MemoryLayers) -> None:
        self.guard = guard

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        guard = self.guard
        if exc is None or isinstance(exc, MetalOOMError) or not guard.is_metal_oom(exc):
            return  # not ours: propagates unchanged
        stats = guard.memory_stats()
        _log().error("metal_guard: Metal out of memory: %s; %s", _label(exc), _stats_line(stats))
        guard._crumb("OOM_RECOVERY: context manager cleanup")
        guard.safe_cleanup()
        raise MetalOOMError(f"Metal out of memory ({stats}): {_label(exc)}", stats) from exc


class _MemoryLayers(_BreadcrumbLog):
    """L1-L4 of ``MetalGuard`` (thread registry, cleanup, OOM recovery, fit check)."""

    def __init__(
        self,
        cooldown_secs: float = 2.0,
        thread_timeout_secs: float = 30.0,
        breadcrumb_path: StrPath | _DefaultPath | None = _DEFAULT_PATH,
    ) -> None:
        super().__init__(breadcrumb_path)
        self.cooldown_secs = _seconds_arg("cooldown_secs", cooldown_secs, maximum=3600.0)
        self.thread_timeout_secs = _seconds_arg(
            "thread_timeout_secs", thread_timeout_secs, maximum=86400.0
        )
        # Built cheaply: no threading import, no threads until a monitor starts.
        self._lock = _thread.allocate_lock()
        self._threads: list[threading.Thread] = []
        self._monitors: dict[str, Any] = {}  # kind → running monitor (section 5.3)
        self._abort_handler: Any = None  # (section 5.4)
        self._abort_previous: Any = None

    def _crumb(self, msg: str) -> None:
        """This guard's breadcrumb, through its (replaceable) ``breadcrumb``; never raises."""
        try:
            self.breadcrumb(msg)
        except Exception as exc:
            _log_once("breadcrumb-hook", _DEBUG, "metal_guard: breadcrumb hook failed: %r", exc)

    # -- L1: GPU threads ----------------------------------------------------

    def register_thread(self, thread: threading.Thread) -> None:
        """Track a thread that runs MLX work: cleanup waits for it and never clears under it."""
        import threading

        if not isinstance(thread, threading.Thread):
            raise TypeError(f"thread must be a threading.Thread, not {type(thread).__name__}")
        with self._lock:
            self._threads = [
                t for t in self._threads if t is not thread and (t.ident is None or t.is_alive())
            ]
            self._threads.append(thread)

    def _live_threads(self) -> list[threading.Thread]:
        """Registered threads that are running now (finished ones are dropped)."""
        with self._lock:
            self._threads = [t for t in self._threads if t.ident is None or t.is_alive()]
            return [t for t in self._threads if t.is_alive()]

    def wait_for_threads(self, timeout: float | None = None) -> int:
        """Wait for the registered threads, all within one ``timeout`` (default ``thread_timeout_secs``).

        Returns how many are still alive (0: all finished). Never raises for
        environment reasons; a thread never waits for itself.
        """
        return self._wait_for_threads(timeout, warn=True)

    def _wait_for_threads(self, timeout: float | None, *, warn: bool) -> int:
        import threading

        wait = (
            self.thread_timeout_secs
            if timeout is None
            else _seconds_arg("timeout", timeout, maximum=86400.0, negative_to_zero=True)
        )
        me = threading.current_thread()
        alive = [t for t in self._live_threads() if t is not me]
        if not alive:
            return 0
        self._crumb(f"WAIT_GPU: {len(alive)} thread(s) alive, waiting {wait:g}s")
        deadline = time.monotonic() + wait
        for thread in alive:
            thread.join(max(0.0, deadline - time.monotonic()))
        survivors = sum(t.is_alive() for t in alive)
        self._live_threads()
        if survivors:
            self._crumb(f"WAIT_GPU: WARNING — {survivors} still alive")
            if warn:
                _log().warning(
                    "metal_guard: %d registered GPU thread(s) still running after %g s",
                    survivors,
                    wait,
                )
        else:
            self._crumb("WAIT_GPU: all threads finished")
        return survivors

    # -- L2: cleanup ----------------------------------------------------------

    def flush_gpu(self) -> None:
        """Synchronize (default stream, mlx-lm's generation stream), then ``mx.clear_cache()``.

        Best-effort: a failing step logs one WARNING and the flush carries on.
        """
        mx = _mlx()
        if mx is None:
            return
        self._crumb("FLUSH: synchronize")
        _synchronize(mx, level=_WARNING)
        self._crumb("FLUSH: mx.clear_cache()")
        _mlx_step("clear_cache", _mlx_fn(mx, "clear_cache"), level=_WARNING)
        self._crumb("FLUSH: done")

    def safe_cleanup(self) -> None:
        """Wait for GPU threads, ``gc.collect()``, flush, then sleep ``cooldown_secs``.

        While registered GPU threads are still alive after the wait the cache
        is NOT cleared (freeing memory under in-flight GPU work is the race
        that panics the driver): breadcrumb ``CLEANUP: SKIP_FLUSH`` and one WARNING.
        """
        import gc

        self._crumb("CLEANUP: START")
        alive = self._wait_for_threads(None, warn=False)
        gc.collect()
        if alive:
            self._crumb(f"CLEANUP: SKIP_FLUSH {alive} thread(s) alive")
            _log().warning(
                "metal_guard: %d registered GPU thread(s) still running after %g s; not clearing "
                "the MLX cache (freeing memory under in-flight GPU work can panic the driver)",
                alive,
                self.thread_timeout_secs,
            )
        else:
            self.flush_gpu()
        if self.cooldown_secs > 0:
            time.sleep(self.cooldown_secs)
        self._crumb("CLEANUP: DONE")

    def guarded_cleanup(self) -> _GuardedCleanup:
        """Context manager: ``safe_cleanup()`` after the body, also when it raises."""
        return _GuardedCleanup(self)

    # -- L3: out-of-memory recovery -----------------------------------------

    @staticmethod
    def is_metal_oom(exc: BaseException) -> bool:
        """True for a Metal out-of-memory ``RuntimeError`` (and ``MetalOOMError``) only.

        Not for ``fPendingMemorySet`` (a kernel-panic string) nor
        ``ImpactingInteractivity`` (the GPU watchdog killed the command buffer).
        """
        if isinstance(exc, MetalOOMError):
            return True
        if not isinstance(exc, RuntimeError):
            return False
        text = _label(exc)[:_OOM_TEXT_MAX]
        return _regex("metal-oom", _OOM_PATTERN).search(text) is not None

    def oom_protected(
        self, fn: Callable[..., _T], *args: Any, max_retries: int = 1, **kwargs: Any
    ) -> _T:
        """``fn(*args, **kwargs)``, retried up to ``max_retries`` times after a Metal OOM.

        Each OOM: ERROR log, breadcrumb ``OOM_RECOVERY: attempt <i>, cleaning
        up``, ``safe_cleanup()``. Out of attempts → ``MetalOOMError`` chained
        to the last error. Other exceptions, and a ``MetalOOMError`` from an
        inner guard, propagate unchanged.
        """
        retries = _int_arg("max_retries", max_retries, minimum=0)
        attempts = retries + 1
        last: RuntimeError | None = None
        stats = MemoryStats()
        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, **kwargs)
            except MetalOOMError:
                raise  # already handled by an inner guard
            except RuntimeError as exc:
                if not self.is_metal_oom(exc):
                    raise
                last = exc
            stats = self.memory_stats()
            _log().error(
                "metal_guard: Metal out of memory (attempt %d/%d): %s; %s",
                attempt,
                attempts,
                _label(last),
                _stats_line(stats),
            )
            self._crumb(f"OOM_RECOVERY: attempt {attempt}, cleaning up")
            self.safe_cleanup()
            if attempt < attempts:
                _log().info("metal_guard: retrying after cleanup (%d left)", attempts - attempt)
        raise MetalOOMError(
            f"Metal out of memory after {attempts} attempt(s) ({stats}); last error: {_label(last)}",
            stats,
        ) from last

    def oom_protected_context(self) -> _OOMContext:
        """Context manager: a Metal OOM in the body → cleanup, then ``MetalOOMError`` (no retry)."""
        return _OOMContext(self)

    # -- L4: will it fit? -----------------------------------------------------

    def _fit(self, model_size_gb: object, overhead_gb: object) -> tuple[bool, MemoryStats, float]:
        """(fits, stats, bytes needed); fits on ``limit - max(active, footprint) >= needed``."""
        size = _gb_arg("model_size_gb", model_size_gb)
        overhead = _gb_arg("overhead_gb", overhead_gb)
        needed = (size + overhead) * 1e9
        stats = self.memory_stats()
        if not stats.limit_bytes:
            _log_once(
                "fit-unknown-limit",
                _DEBUG,
                "metal_guard: the memory limit is unknown (no MLX or no Metal device); "
                "fit checks cannot refuse anything",
            )
            return True, stats, needed
        return stats.limit_bytes - stats.in_use_bytes >= needed, stats, needed

    @staticmethod
    def _fit_numbers(stats: MemoryStats, needed: float) -> str:
        return (
            f"available {(stats.limit_bytes - stats.in_use_bytes) / 1e9:.1f}GB, "
            f"needed {needed / 1e9:.1f}GB; in use {stats.in_use_bytes / 1e9:.1f}GB "
            f"(MLX active {stats.active_gb:.1f}GB, process footprint {stats.footprint_gb:.1f}GB), "
            f"limit {stats.limit_gb:.1f}GB"
        )

    def can_fit(self, model_size_gb: float, overhead_gb: float = 2.0) -> bool:
        """True when ``model_size_gb + overhead_gb`` fits under the memory limit now.

        In use is ``max(MLX active, process footprint)``; an unknown limit (no
        MLX, no Metal) answers True as the original. A miss logs one WARNING.
        """
        fits, stats, needed = self._fit(model_size_gb, overhead_gb)
        if not fits:
            _log().warning("metal_guard: model does not fit: %s", self._fit_numbers(stats, needed))
        return fits

    def require_fit(
        self,
        model_size_gb: float,
        model_name: str = "",
        overhead_gb: float = 2.0,
        *,
        cache_clear_cb: Callable[[], None] | None = None,
        escalated_cooldown_sec: float = 0.0,
    ) -> None:
        """Raise ``MemoryError`` unless the model fits, after cleaning up to make room.

        Fits → return. Else ``safe_cleanup()`` and check again. Still not, and
        ``escalated_cooldown_sec > 0``: call ``cache_clear_cb()``, clean up
        again, reset the peak, and wait (at most that long) for memory to drop
        far enough — a bounded wait on the condition, not a blind sleep.
        """
        escalate = _seconds_arg(
            "escalated_cooldown_sec", escalated_cooldown_sec, maximum=3600.0, negative_to_zero=True
        )
        if cache_clear_cb is not None and not callable(cache_clear_cb):
            raise TypeError(f"cache_clear_cb must be callable, not {type(cache_clear_cb).__name__}")
        name = _label(model_name) if model_name else "model"
        fits, stats, needed = self._fit(model_size_gb, overhead_gb)
        if fits:
            return
        size = float(model_size_gb)
        _log().info("metal_guard: %s (%.1f GB) does not fit yet; cleaning up", name, size)
        self.safe_cleanup()
        fits, stats, needed = self._fit(model_size_gb, overhead_gb)
        if fits:
            return
        if escalate <= 0:
            raise MemoryError(
                f"Cannot fit {name} ({size:.1f}GB): {self._fit_numbers(stats, needed)}"
            )
        _log().warning(
            "metal_guard: %s (%.1f GB) still does not fit; escalated cleanup (up to %g s)",
            name,
            size,
            escalate,
        )
        if cache_clear_cb is not None:
            try:
                cache_clear_cb()
            except Exception as exc:
                _log().warning("metal_guard: cache_clear_cb failed: %r", exc)
        self.safe_cleanup()
        _reset_peak_memory()
        target = stats.limit_bytes - needed
        _await_memory(lambda s: s.in_use_bytes <= target, escalate, self.memory_stats)
        fits, stats, needed = self._fit(model_size_gb, overhead_gb)
        if fits:
            _log().info("metal_guard: %s fits after escalated cleanup", name)
            return
        raise MemoryError(
            f"Cannot fit {name} ({size:.1f}GB) even after escalated cleanup "
            f"({escalate:g}s cooldown). {self._fit_numbers(stats, needed)}"
        )

    @staticmethod
    def estimate_model_size_from_name(model_name: str) -> float | None:
        """Weights size in decimal GB guessed from the model id, or ``None``.

        Parameter count (``24B``, ``1.5b``, ``350m``, ``8x7B``, ``E4B`` ≈ 8 B raw,
        else ``mini``/``small``/``medium``/``large``/``xl``) × bytes per
        parameter from the quantisation in the name (``16bit`` 2, ``8bit``/``fp8``/``q8``
        1, ``6bit`` 0.75, ``5bit`` 0.625, ``4bit``/``mxfp4``/``q4`` 0.5, ``3bit``
        0.375, ``2bit`` 0.25; none: 2). A guess: see docs/memory.md for its misses.
        """
        return _estimate_model_size_gb(model_name)

    # -- memory numbers ---------------------------------------------------------

    def memory_stats(self) -> MemoryStats:
        """MLX active/peak/cache, the limit and the process footprint; never raises."""
        return _read_memory_stats()

    def is_pressure_high(self, threshold_pct: float = 67.0, model_name: str = "") -> bool:
        """True (with a WARNING) when max(peak, footprint) is above ``threshold_pct`` of the limit."""
        threshold = _real_arg("threshold_pct", threshold_pct)
        stats = self.memory_stats()
        if not stats.limit_bytes:
            return False
        pct = 100.0 * max(stats.peak_bytes, stats.footprint_bytes) / stats.limit_bytes
        if pct <= threshold:
            return False
        _log().warning(
            "metal_guard: memory pressure %.1f%% > %g%%%s: %s",
            pct,
            threshold,
            f" ({_label(model_name)})" if model_name else "",
            _stats_line(stats),
        )
        return True

    def ensure_headroom(self, model_name: str = "", threshold_pct: float = 67.0) -> None:
        """When pressure is high: ``safe_cleanup()`` and reset MLX's peak counter."""
        if self.is_pressure_high(threshold_pct, model_name):
            self.safe_cleanup()
            _reset_peak_memory()

    def log_memory(self, label: str, model_name: str = "") -> None:
        """One INFO line with the memory numbers (also when the limit is unknown)."""
        _log().info(
            "metal_guard: [%s]%s %s",
            _label(label),
            f" {_label(model_name)}" if model_name else "",
            _stats_line(self.memory_stats()),
        )


# =============================================================================
# 5.6 Monitors — MetalGuard L5: periodic flush, memory watchdog, KV-cache
# monitor, as three independent daemon threads.
#
# Each monitor is one daemon thread waiting on its own stop event: starting
# one twice replaces the first (never two chains), ``stop_*`` is final even
# during a tick and joins the thread, and no tick calls a callback once its
# monitor was stopped. ``stop_periodic_flush`` also stops the watchdog (the
# original's only way to stop it); ``stop_watchdog`` stops the watchdog alone.
# Ticks skip while registered GPU threads are alive, and the watchdog and KV
# monitor stay silent while the memory limit is unknown.
#
# Provides: _MemoryMonitors
# Uses: Prelude, MLX access, Memory layers
# =============================================================================

_INTERVAL_MAX_SEC = 86400.0
_KV_WINDOW_SEC = 300.0
_KV_MIN_ELAPSED_MIN = 0.1


class _Monitor:
    """One monitor: a daemon thread calling ``tick(self)`` every ``interval`` s until stopped."""

    def __init__(
        self, name: str, interval: float, tick: Callable[[_Monitor], None], **state: Any
    ) -> None:
        import threading

        self.name = name
        self.interval = interval
        self.state = state
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(tick,), name=name, daemon=True)

    def _run(self, tick: Callable[[_Monitor], None]) -> None:
        while not self.stopped.wait(self.interval):
            try:
                tick(self)
            except Exception as exc:  # a monitor never dies of one bad tick
                _log().debug("metal_guard: %s tick failed: %r", self.name, exc)

    def stop(self, join_timeout: float) -> None:
        """Stop for good; wait (bounded) for a tick in progress to finish."""
        import threading

        self.stopped.set()
        if self.thread is threading.current_thread() or self.thread.ident is None:
            return  # stopped from its own tick (a callback): it exits when the tick returns
        self.thread.join(join_timeout)
        if self.thread.is_alive():
            _log().warning(
                "metal_guard: %s is still finishing a tick after %g s; it exits when the tick returns",
                self.name,
                join_timeout,
            )


def _interval_secs(value: object) -> float:
    return _seconds_arg("interval_secs", value, maximum=_INTERVAL_MAX_SEC, allow_zero=False)


def _callback_arg(name: str, value: object) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, not {type(value).__name__}")
    return value


class _MemoryMonitors(_MemoryLayers):
    """L5 monitors of ``MetalGuard``."""

    def _start_monitor(self, kind: str, monitor: _Monitor) -> None:
        with self._lock:
            previous = self._monitors.get(kind)
            self._monitors[kind] = monitor
            monitor.thread.start()
        if previous is not None:
            previous.stop(self._join_timeout())

    def _stop_monitor(self, kind: str) -> bool:
        with self._lock:
            monitor = self._monitors.pop(kind, None)
        if monitor is None:
            return False
        monitor.stop(self._join_timeout())
        return True

    def _join_timeout(self) -> float:
        # A tick may be inside safe_cleanup: the thread wait, the cooldown, some slack.
        return float(self.thread_timeout_secs) + float(self.cooldown_secs) + 5.0

    def _gpu_busy(self, monitor: _Monitor) -> bool:
        alive = len(self._live_threads())
        if alive:
            _log().debug("metal_guard: %s skipped: %d GPU thread(s) running", monitor.name, alive)
        return alive > 0

    # -- periodic flush -------------------------------------------------------

    def start_periodic_flush(self, interval_secs: float = 300.0) -> None:
        """Flush the GPU every ``interval_secs`` while MLX holds memory (replaces a running one)."""
        interval = _interval_secs(interval_secs)
        self._start_monitor(
            "flush", _Monitor("metal-guard-periodic-flush", interval, self._flush_tick)
        )
        _log().info("metal_guard: periodic flush every %g s", interval)

    def stop_periodic_flush(self) -> None:
        """Stop the periodic flush **and the watchdog** (final, also during a tick).

        As in the original, where one timer served both and this was the only way
        to stop the watchdog: code written for it must not leave a watchdog thread
        running. ``stop_watchdog()`` stops the watchdog alone. No-op for a monitor
        that is not running; the KV-cache monitor is not touched.
        """
        if self._stop_monitor("flush"):
            _log().info("metal_guard: periodic flush stopped")
        if self._stop_monitor("watchdog"):
            _log().info("metal_guard: watchdog stopped (stop_periodic_flush stops both)")

    def _flush_tick(self, monitor: _Monitor) -> None:
        if self._gpu_busy(monitor):
            return
        stats = self.memory_stats()
        if (stats.active_bytes > 0 or stats.peak_pct > 50) and not monitor.stopped.is_set():
            _log().info("metal_guard: periodic flush: %s", _stats_line(stats))
            self.flush_gpu()

    # -- watchdog -------------------------------------------------------------

    def start_watchdog(
        self,
        interval_secs: float = 300.0,
        warn_pct: float = 70.0,
        critical_pct: float = 85.0,
        on_critical: Callable[[], None] | None = None,
    ) -> None:
        """Watch memory use (max(active, footprint) as % of the limit) every ``interval_secs``.

        Above ``critical_pct``: ERROR, breadcrumb ``WATCHDOG: CRITICAL``,
        ``safe_cleanup()``, then ``on_critical()``. Above ``warn_pct``: WARNING
        and a flush. Otherwise a flush while MLX holds memory. Independent of
        the periodic flush; replaces a running watchdog.
        """
        interval = _interval_secs(interval_secs)
        warn = _real_arg("warn_pct", warn_pct)
        critical = _real_arg("critical_pct", critical_pct)
        if not 0 < warn <= critical:
            raise ValueError(
                f"need 0 < warn_pct <= critical_pct (finite), got {warn_pct!r} and {critical_pct!r}"
            )
        monitor = _Monitor(
            "metal-guard-watchdog",
            interval,
            self._watchdog_tick,
            warn=warn,
            critical=critical,
            on_critical=_callback_arg("on_critical", on_critical),
            baseline=None,
        )
        self._start_monitor("watchdog", monitor)
        _log().info(
            "metal_guard: watchdog every %g s (warn %g%%, critical %g%%)", interval, warn, critical
        )

    def stop_watchdog(self) -> None:
        """Stop the watchdog (final, also during a tick); no-op when not running."""
        if self._stop_monitor("watchdog"):
            _log().info("metal_guard: watchdog stopped")

    def _watchdog_tick(self, monitor: _Monitor) -> None:
        if self._gpu_busy(monitor):
            return
        stats = self.memory_stats()
        if not stats.limit_bytes:
            return
        state = monitor.state
        in_use = stats.in_use_bytes
        if state["baseline"] is None:
            state["baseline"] = in_use
        drift_gb = (in_use - state["baseline"]) / 1e9
        pct = 100.0 * in_use / stats.limit_bytes
        if pct > state["critical"]:
            _log().error(
                "metal_guard: watchdog CRITICAL: %.1f%% of the limit in use (> %g%%), drift %+.1f GB: %s",
                pct,
                state["critical"],
                drift_gb,
                _stats_line(stats),
            )
            self._crumb(f"WATCHDOG: CRITICAL active={pct:.1f}% drift={drift_gb:+.1f}GB")
            self.safe_cleanup()
            callback = state["on_critical"]
            if callback is not None and not monitor.stopped.is_set():
                try:
                    callback()
                except Exception as exc:
                    _log().error("metal_guard: watchdog on_critical callback failed: %r", exc)
            state["baseline"] = self.memory_stats().in_use_bytes
        elif pct > state["warn"]:
            _log().warning(
                "metal_guard: watchdog: %.1f%% of the limit in use (> %g%%): %s",
                pct,
                state["warn"],
                _stats_line(stats),
            )
            self.flush_gpu()
        elif stats.active_bytes > 0 or stats.peak_pct > 50:
            self.flush_gpu()

    # -- KV-cache monitor -----------------------------------------------------

    def start_kv_cache_monitor(
        self,
        interval_secs: float = 30.0,
        growth_rate_warn_gb_per_min: float = 1.0,
        headroom_gb: float = 4.0,
        on_pressure: Callable[[float, float], None] | None = None,
    ) -> None:
        """Watch headroom and growth rate (last 5 min) every ``interval_secs``.

        Headroom below ``headroom_gb`` → WARNING + breadcrumb ``KV_MONITOR:
        LOW_HEADROOM``; growth above ``growth_rate_warn_gb_per_min`` → WARNING +
        ``KV_MONITOR: RAPID_GROWTH``; either → ``on_pressure(available_gb,
        growth_rate)`` once (e.g. ``kv_cache_clear_on_pressure``). Silent while
        the memory limit is unknown. Replaces a running KV monitor.
        """
        interval = _interval_secs(interval_secs)
        rate = _gb_arg("growth_rate_warn_gb_per_min", growth_rate_warn_gb_per_min)
        headroom = _gb_arg("headroom_gb", headroom_gb)
        monitor = _Monitor(
            "metal-guard-kv-monitor",
            interval,
            self._kv_tick,
            rate_warn=rate,
            headroom=headroom,
            on_pressure=_callback_arg("on_pressure", on_pressure),
            samples=[],
        )
        self._start_monitor("kv", monitor)
        _log().info(
            "metal_guard: KV-cache monitor every %g s (headroom %g GB, growth %g GB/min)",
            interval,
            headroom,
            rate,
        )

    def stop_kv_cache_monitor(self) -> None:
        """Stop the KV-cache monitor (final, also during a tick); no-op when not running."""
        if self._stop_monitor("kv"):
            _log().info("metal_guard: KV-cache monitor stopped")

    def _kv_tick(self, monitor: _Monitor) -> None:
        if self._gpu_busy(monitor):
            return
        self._kv_check(monitor, self.memory_stats(), time.monotonic())

    def _kv_check(self, monitor: _Monitor, stats: MemoryStats, now: float) -> None:
        if not stats.limit_bytes:
            return
        state = monitor.state
        samples: list[tuple[float, float]] = state["samples"]
        used_gb = stats.in_use_bytes / 1e9
        samples.append((now, used_gb))
        while len(samples) > 1 and now - samples[0][0] > _KV_WINDOW_SEC:
            samples.pop(0)
        elapsed_min = (now - samples[0][0]) / 60.0
        rate = (used_gb - samples[0][1]) / elapsed_min if elapsed_min > _KV_MIN_ELAPSED_MIN else 0.0
        available = (stats.limit_bytes - stats.in_use_bytes) / 1e9
        low = available < state["headroom"]
        rapid = rate > state["rate_warn"]
        if low:
            _log().warning(
                "metal_guard: KV monitor: only %.1f GB headroom left (< %g GB), growing %.2f GB/min",
                available,
                state["headroom"],
                rate,
            )
            self._crumb(
                f"KV_MONITOR: LOW_HEADROOM available={available:.1f}GB rate={rate:.2f}GB/min"
            )
        if rapid:
            _log().warning(
                "metal_guard: KV monitor: memory growing %.2f GB/min (> %g), %.1f GB available",
                rate,
                state["rate_warn"],
                available,
            )
            if not low:
                self._crumb(
                    f"KV_MONITOR: RAPID_GROWTH rate={rate:.2f}GB/min available={available:.1f}GB"
                )
        callback = state["on_pressure"]
        if (low or rapid) and callback is not None and not monitor.stopped.is_set():
            try:
                callback(available, rate)
            except Exception as exc:
                _log().error("metal_guard: KV monitor on_pressure callback failed: %r", exc)


# =============================================================================
# 5.7 MetalGuard — the health probe, the SIGABRT breadcrumb, hardware
# detection, and the ``metal_guard`` singleton.
#
# ``detect_hardware()`` spends at most about 2 s in subprocesses in total and
# never raises; off macOS its fields say "unknown". The abort handler can only
# be installed from the main thread, chains to the handler it replaced and can
# be removed again.
#
# Provides: MetalGuard, metal_guard
# Uses: Prelude, Processes, Breadcrumbs, MLX access, Memory numbers, Release barrier,
#   Size and hardware tables, System audits, Monitors
# =============================================================================

_HARDWARE_BUDGET_SEC = 2.0


class MetalGuard(_MemoryMonitors):
    """The memory layers of metal-guard: use the module singleton ``metal_guard``.

    ``MetalGuard(cooldown_secs=2.0, thread_timeout_secs=30.0,
    breadcrumb_path=<default>)``: L1 GPU-thread registry, L2 safe cleanup, L3
    Metal OOM recovery, L4 pre-load fit check, L5 monitors, plus the
    breadcrumb log (``METALGUARD_BREADCRUMB_PATH``, else
    ``$METALGUARD_HOME/breadcrumbs.log``; ``None`` disables). Building one
    starts nothing: no threads, no files.
    """

    def wait_for_release(
        self,
        baseline_bytes: int | None = None,
        *,
        timeout: float = 8.0,
        slack_bytes: int = _RELEASE_SLACK_DEFAULT,
    ) -> ReleaseStats:
        """``wait_for_release`` with this guard's breadcrumbs (see the module function)."""
        return _release(*_release_args(baseline_bytes, timeout, slack_bytes), self._crumb)

    def probe_metal_health(self) -> bool:
        """Evaluate a 1-element array and synchronize: True when MLX answers; never raises."""
        mx = _mlx()
        if mx is None:
            return False
        self._crumb("PROBE: Metal health check START")
        try:
            mx.eval(mx.zeros(1))
            sync = _mlx_fn(mx, "synchronize")
            if sync is not None:
                sync()
        except Exception as exc:
            self._crumb(f"PROBE: Metal health check FAILED {type(exc).__name__}: {_label(exc)}")
            _log().warning("metal_guard: Metal health check failed: %s", _label(exc))
            return False
        self._crumb("PROBE: Metal health check OK")
        return True

    # -- SIGABRT ----------------------------------------------------------------

    def install_abort_handler(self) -> None:
        """Write a ``SIGABRT:`` breadcrumb when the process is aborted (main thread only).

        The previous handler is kept: after the breadcrumb, a Python handler
        it replaced is called, otherwise the previous disposition is restored
        and the signal re-sent, so the process still dies as it would have.
        Python runs signal handlers between bytecodes of the main thread: an
        ``abort()`` inside MLX's C++ code usually kills the process before
        that, so this catches Python-visible aborts only.
        """
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "install_abort_handler() must be called from the main thread (Python installs "
                "signal handlers only there); call it at start-up"
            )
        with self._lock:
            if self._abort_handler is not None:
                return  # already installed: keep the original previous handler
            previous = signal.getsignal(signal.SIGABRT)
            handler = self._abort_handler_for(previous)
            signal.signal(signal.SIGABRT, handler)
            self._abort_handler, self._abort_previous = handler, previous
        self._crumb("SIGABRT handler installed")
        _log().info("metal_guard: SIGABRT handler installed")

    def _abort_handler_for(self, previous: Any) -> Callable[[int, Any], None]:
        import signal

        def on_sigabrt(signum: int, frame: Any) -> None:
            try:
                self._crumb(
                    f"SIGABRT: process {os.getpid()} is aborting (an MLX/Metal assertion or "
                    "an uncaught C++ exception?); see the lines above for the last MLX work"
                )
                _log().critical("metal_guard: SIGABRT received: the process is aborting")
            except Exception:
                pass
            if callable(previous):
                previous(signum, frame)
                return
            keep = previous if previous in (signal.SIG_DFL, signal.SIG_IGN) else signal.SIG_DFL
            signal.signal(signal.SIGABRT, keep)
            if keep == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGABRT)

        return on_sigabrt

    def uninstall_abort_handler(self) -> bool:
        """Restore the SIGABRT handler that ``install_abort_handler`` replaced (main thread only).

        True when it was restored; False when none was installed, or another
        handler has replaced ours since (that one is left in place).
        """
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("uninstall_abort_handler() must be called from the main thread")
        with self._lock:
            handler, previous = self._abort_handler, self._abort_previous
            if handler is None:
                return False
            self._abort_handler = self._abort_previous = None
            if signal.getsignal(signal.SIGABRT) is not handler:
                return False
            signal.signal(signal.SIGABRT, signal.SIG_DFL if previous is None else previous)
        self._crumb("SIGABRT handler removed")
        return True

    # -- hardware -------------------------------------------------------------

    @staticmethod
    def detect_hardware() -> dict[str, Any]:
        """GPU memory, chip, recommended working set, tier and GPU driver version; never raises.

        Keys ``gpu_memory_gb`` (GiB, 1 decimal), ``chip``,
        ``recommended_working_set_gb``, ``tier`` (``low`` ≤ 16 GiB, ``mid`` ≤
        64, ``high``), ``gpu_driver_version``. Off macOS (no unified GPU
        memory): 0.0, ``"unknown"``, 0.0, ``"unknown"``, ``None``. Subprocesses
        get about 2 s in total.
        """
        deadline = time.monotonic() + _HARDWARE_BUDGET_SEC
        result: dict[str, Any] = {
            "gpu_memory_gb": 0.0,
            "chip": "unknown",
            "recommended_working_set_gb": 0.0,
            "tier": "unknown",
            "gpu_driver_version": None,
        }
        if _platform() != "darwin":
            return result
        recommended = total = 0
        try:
            mx = _mlx()
            device_info = None if mx is None else _mlx_fn(mx, "device_info")
            info = device_info() if device_info is not None else {}
            recommended = int(info.get("max_recommended_working_set_size", 0) or 0)
            total = int(info.get("memory_size", 0) or 0)
        except Exception as exc:
            _log().debug("metal_guard: device_info() failed: %r", exc)
        total = total or _total_memory_bytes()
        if not total:
            memsize = _sysctl("hw.memsize", timeout=deadline - time.monotonic())
            total = _nonnegative_int(memsize) or 0
        if not recommended and total:
            recommended = int(total * 0.75)
        chip = _sysctl("machdep.cpu.brand_string", timeout=deadline - time.monotonic())
        gib = total / (1 << 30)
        result.update(
            gpu_memory_gb=round(gib, 1),
            chip=chip or "unknown",
            recommended_working_set_gb=round(recommended / (1 << 30), 1),
            tier=_hardware_tier(gib),
        )
        remaining = deadline - time.monotonic()
        if remaining > 0:
            result["gpu_driver_version"] = read_gpu_driver_version(timeout=remaining)
        return result

    @classmethod
    def recommended_config(cls) -> dict[str, Any]:
        """``detect_hardware()`` merged with the advisory settings of its tier (nothing is applied).

        An ``unknown`` tier gets the ``low`` column, the most careful one.
        """
        hardware = cls.detect_hardware()
        return {**hardware, **_HARDWARE_TIERS.get(hardware["tier"], _HARDWARE_TIERS["low"])}

    def __repr__(self) -> str:
        return (
            f"MetalGuard(cooldown_secs={self.cooldown_secs:g}, "
            f"thread_timeout_secs={self.thread_timeout_secs:g}, "
            f"breadcrumb_path={self._breadcrumb_path!r})"
        )


metal_guard = MetalGuard()
_guard_getter.append(lambda: metal_guard)  # the breadcrumbs' writer, read at each call


# =============================================================================
# 5.8 Scoped loads — ``bench_scoped_load`` and the KV-pressure callback.
#
# ``bench_scoped_load`` admits the load through the cadence guard, holds the
# MLX lock from before the load to after the release (released on every
# path, also when the load raises), and on exit waits for the memory to come
# back instead of sleeping a fixed 8 s.
#
# Provides: bench_scoped_load, kv_cache_clear_on_pressure
# Uses: Prelude, Breadcrumbs, MLX access, Memory numbers, Release barrier, Model identity, Cadence,
#   MLX lock (L8), Memory layers, MetalGuard
# =============================================================================

_BENCH_BACKENDS = {"mlx": "mlx_lm", "mlx-lm": "mlx_lm", "mlx-vlm": "mlx_vlm"}
_BENCH_RELEASE_TIMEOUT_SEC = 8.0  # the original's fixed sleep, now an upper bound
_BENCH_ACTIVE_NOTE_BYTES = 4e9


class bench_scoped_load:
    """``with bench_scoped_load(model_id) as (model, tokenizer):`` — one guarded load.

    Entry: breadcrumb ``BENCH_SCOPED_LOAD: ENTER``, the MLX lock, cadence
    admission (``require_cadence_clear``: may raise ``CadenceViolation``),
    ``mlx_lm.load`` (``backend="mlx"``/``"mlx-lm"``) or ``mlx_vlm.load``
    (``"mlx-vlm"``). Exit: ``safe_cleanup()``, ``wait_for_release()`` (8 s
    upper bound) back to the memory before the load, ``mark_unload``, release
    the lock — on every path, also when the load raises. Drop your own
    references inside the ``with`` (``del model, tokenizer``), or the memory
    cannot be freed. ``release`` holds what the release barrier saw.
    """

    def __init__(self, model_id: StrPath, *, backend: str = "mlx") -> None:
        if backend not in _BENCH_BACKENDS:
            raise ValueError(f"backend must be 'mlx', 'mlx-lm' or 'mlx-vlm', got {backend!r}")
        canonical_model_id(model_id)  # a caller bug surfaces before anything happens
        self.model_id = model_id
        self.backend = backend
        self.baseline_bytes: int | None = None
        self.release: ReleaseStats | None = None
        self._lock: Any = None
        self._loaded: Any = None

    def __enter__(self) -> Any:
        label = _label(self.model_id)
        _breadcrumb(f"BENCH_SCOPED_LOAD: ENTER {label} backend={self.backend}")
        _log().info("metal_guard: bench_scoped_load %s (backend %s)", label, self.backend)
        lock = mlx_exclusive_lock("bench_scoped_load")
        lock.__enter__()
        admitted = False
        try:
            require_cadence_clear(self.model_id)
            admitted = True
            self.baseline_bytes = _remember_load_baseline()
            vlm = self.backend == "mlx-vlm"
            _breadcrumb(f"BENCH_SCOPED_LOAD: direct {'vlm ' if vlm else ''}load {label}")
            import importlib

            loader = importlib.import_module(_BENCH_BACKENDS[self.backend])
            self._loaded = loader.load(self.model_id)
        except BaseException:
            self._finish(lock, admitted)
            raise
        self._lock = lock
        return self._loaded

    def __exit__(self, *exc: object) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            self._finish(lock, True)

    def _finish(self, lock: Any, admitted: bool) -> None:
        """Unload and release; never raises, and the lock is released whatever happens."""
        label = _label(self.model_id)
        try:
            self._loaded = None
            if not admitted:
                return
            _breadcrumb(f"BENCH_SCOPED_LOAD: EXIT {label} — unloading + cooldown")
            _log().info("metal_guard: bench_scoped_load %s: unloading", label)
            metal_guard.safe_cleanup()
            _reset_peak_memory()
            stats = wait_for_release(self.baseline_bytes, timeout=_BENCH_RELEASE_TIMEOUT_SEC)
            self.release = stats
            if stats.active_bytes > _BENCH_ACTIVE_NOTE_BYTES:
                _log().info(
                    "metal_guard: %.1f GB still active after unloading %s", stats.active_gb, label
                )
            CadenceGuard().mark_unload(self.model_id)
            _breadcrumb(f"BENCH_SCOPED_LOAD: EXIT {label} done, active={stats.active_gb:.1f}GB")
            _log().info("metal_guard: bench_scoped_load %s done: %s", label, _stats_line(stats))
        except Exception as exc:
            _log().warning("metal_guard: bench_scoped_load cleanup of %s failed: %r", label, exc)
        finally:
            lock.__exit__(None, None, None)

    def __repr__(self) -> str:
        return f"bench_scoped_load({self.model_id!r}, backend={self.backend!r})"


def kv_cache_clear_on_pressure(available_gb: float, growth_rate_gb_per_min: float) -> None:
    """Ready-made ``on_pressure`` for the KV monitor: one WARNING, then ``mx.clear_cache()``.

    Clears only MLX's buffer cache (memory MLX keeps for reuse), never an
    application's own caches. Without MLX it does nothing; a failing clear is
    logged at ERROR.
    """
    available = _real_arg("available_gb", available_gb)
    rate = _real_arg("growth_rate_gb_per_min", growth_rate_gb_per_min)
    mx = _mlx()
    if mx is None:
        return
    _log().warning(
        "metal_guard: memory pressure (%.1f GB available, growing %.2f GB/min); "
        "clearing the MLX buffer cache",
        available,
        rate,
    )
    _mlx_step("clear_cache", _mlx_fn(mx, "clear_cache"), level=_ERROR)


# =============================================================================
# 5.9 Subprocess worker — (L7, child side) a worker process that guards itself.
#
# ``_worker_main`` runs in a ``spawn``ed child (never ``fork``: a forked child
# would inherit a process that may have touched Metal). Before the load: the
# known-panic advisory, the circuit breaker and cadence admission (a refusal is
# sent to the parent, which raises the same exception). Every generate: the
# gemma-4 first-generate flush (first one only) and
# ``subprocess_inference_guard``; ``temperature`` goes to mlx-lm's sampler and
# ``system`` into the chat template. On shutdown (a message, end of the pipe,
# SIGTERM, its parent gone, or ``idle_timeout`` s without a request): drop the
# model, wait for the memory, mark the unload.
#
# The worker is the MLX user, so it holds the host's MLX lock itself: the
# parent's hold travels to it as a descriptor of the same open file (the flock
# belongs to that file description), so the lock stays held while either the
# parent holds it or the worker lives, and is free exactly when both are gone;
# a parent killed mid-generate cannot hand the GPU to another process while
# its orphaned worker still runs Metal work. The worker watches its parent
# (end of the spawn pipe) and stops gracefully when it is gone.
#
# Stops are signal-safe: the SIGTERM handler only sets flags and raises through
# ``_interrupt`` (0.2), so it never lands inside a lock or state-file update;
# breadcrumbs about it are written by the main thread afterwards.
#
# Message protocol (dicts over two one-way pipes), the original's plus
# ``refused``: parent → child ``{"type": "generate", "prompt", "max_tokens",
# "temperature", "system"}`` or ``{"type": "shutdown"}``; child → parent
# ``ready`` (``model_id``, ``pid``), ``result`` (``text``), ``error``
# (``error``), ``refused`` (``error``, ``exception``), ``waiting``
# (``seconds``, ``error``: a restart the library made waits for cadence) and
# ``shutdown_ack``. What a worker's ``error`` means (out of memory, kernel-panic
# class, stuck GPU work: never restarted) and the errors a runner raises are here too.
# A generate request carries ``"parent_holds_gpu_gate": True`` when the
# parent's calling thread holds the GPU gate: the parent waits for this very
# generate, so the worker's guard must not wait for the gate too.
#
# Provides: Connection, SubprocessCrashError, SubprocessTimeoutError, _BACKENDS, _REFUSALS,
#   _InheritedFd, _idle_timeout_arg, _is_fatal_worker_error, _worker_error_kind, _worker_main
# Uses: Prelude, Processes, Breadcrumbs, Release barrier, Registry, Panic signatures,
#   Process mode (R6), Cadence rules, Cadence, Circuit breaker, Host locks, MLX lock (L8),
#   GPU gate, Stuck GPU work, Flush guards
# =============================================================================

if TYPE_CHECKING:  # pragma: no cover - typing only
    from multiprocessing.connection import Connection

_BACKENDS = {"mlx": "mlx_lm", "mlx-lm": "mlx_lm", "mlx_lm": "mlx_lm", "mlx-vlm": "mlx_vlm"}
_WORKER_IDLE_SEC = 600.0  # a worker with no request for this long stops by itself
_WORKER_EXIT_SIGTERM = 143  # 128 + SIGTERM: stopped gracefully after a SIGTERM
_REFUSALS: tuple[type[BaseException], ...] = (
    CadenceViolation,
    MLXCooldownActive,
    MLXLockConflict,
    GPUBusy,
)


_WORKER_IDLE_ENV = "METALGUARD_WORKER_IDLE_SEC"
_IDLE_MAX = 7 * 86400.0


def _idle_seconds(text: str) -> float:
    seconds = float(text)
    if not (_finite(seconds) and 0 < seconds <= _IDLE_MAX):
        raise ValueError(text)
    return seconds


def _idle_timeout_arg(value: object) -> float:
    """``idle_timeout``: seconds > 0; ``None`` reads ``METALGUARD_WORKER_IDLE_SEC`` (else 600)."""
    if value is not None:
        return _seconds_arg("idle_timeout", value, maximum=_IDLE_MAX, allow_zero=False)
    seconds = _env_parsed(
        _WORKER_IDLE_ENV,
        _idle_seconds,
        expected=f"expected a number of seconds > 0 and <= {_IDLE_MAX:g}",
        default=_WORKER_IDLE_SEC,
    )
    return _WORKER_IDLE_SEC if seconds is None else seconds


class _WorkerStop(BaseException):
    """Raised in the worker by its SIGTERM handler, to unwind into the shutdown sequence."""


class _InheritedFd:
    """A descriptor handed to a ``spawn``ed child: the same open file description.

    Pickled only while ``multiprocessing`` spawns the child (the descriptor is
    passed with the child's other inherited descriptors); in the child it is
    not inherited any further.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction

        return (_InheritedFd._rebuild, (reduction.DupFd(self.fd),))

    @staticmethod
    def _rebuild(dup: Any) -> _InheritedFd:
        fd = dup.detach()
        os.set_inheritable(fd, False)
        return _InheritedFd(fd)


def _worker_main(
    model_id: str,
    backend: str,
    recv_conn: Connection,
    send_conn: Connection,
    options: dict[str, Any] | None = None,
) -> None:
    """Body of a worker process (a ``spawn`` target; exits with the worker's code)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ[_SUBPROCESS_WORKER_ENV] = "1"
    code = _Worker(model_id, backend, recv_conn, send_conn, options or {}).run()
    if code:
        sys.exit(code)


class _Worker:
    def __init__(
        self,
        model_id: str,
        backend: str,
        requests: Connection,
        replies: Connection,
        options: dict[str, Any],
    ) -> None:
        self.model_id = model_id
        self.label = _label(model_id)
        self.module = _BACKENDS.get(backend, "")
        self.requests = requests
        self.replies = replies
        cadence, breaker = options.get("cadence"), options.get("breaker")
        self.cadence = cadence if isinstance(cadence, CadenceGuard) else None
        self.breaker = breaker if isinstance(breaker, CircuitBreaker) else None
        idle = options.get("idle_timeout")
        self.idle_timeout = float(idle) if isinstance(idle, (int, float)) else _WORKER_IDLE_SEC
        self.restart = _label(options.get("restart") or "")  # why the library restarts it
        # Kept open for the worker's life: its share of the parent's MLX-lock hold.
        held = options.get("mlx_lock")
        self.mlx_lock_fd = held.fd if isinstance(held, _InheritedFd) else None
        self.model: Any = None
        self.tokenizer: Any = None
        self.generate_calls = 0
        self.admitted = False
        self.stopping = False
        self.sigterm_seen = False
        self.sigterm_noted = False
        self.parent_gone = False

    # -- life cycle -------------------------------------------------------------

    def run(self) -> int:
        import signal

        # Ctrl-C reaches the whole process group: the parent decides when workers stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        _on_stuck(self._stuck)  # a wedged generate: the parent stops us and never restarts us
        reason, code = "shutdown requested", 0
        try:
            self._watch_parent()
            if self._start():
                reason = self._serve()
            else:
                reason, code = "did not start", 1
        except _WorkerStop:
            reason, code = "SIGTERM", _WORKER_EXIT_SIGTERM
            if self.parent_gone:
                reason, code = "the parent is gone", 0
        except Exception as exc:  # a bug here must still stop the worker cleanly
            reason, code = f"{type(exc).__name__}: {_label(exc)}", 1
        self._shutdown(reason)
        # Stopped: a later SIGTERM has nothing left to stop. Ignored, it cannot turn this
        # exit code into "killed" once the interpreter restores the default action.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return code

    def _on_sigterm(self, signum: int, frame: object) -> None:
        """Flags only, and a stop raised where no lock or state file is half-taken."""
        if not self.parent_gone:
            self.sigterm_seen = True
        if not self.stopping:
            self.stopping = True
            _interrupt(_WorkerStop(), frame)

    def _note_sigterm(self) -> None:
        """The SIGTERM breadcrumb, written by the main thread (never by the handler)."""
        if self.sigterm_seen and not self.sigterm_noted:
            self.sigterm_noted = True
            _breadcrumb(f"SUBPROCESS_WORKER: SIGTERM received, pid={os.getpid()} ({self.label})")

    def _watch_parent(self) -> None:
        """A daemon thread that stops this worker gracefully when its parent is gone.

        The end of the spawn pipe (EOF when the parent exits, however it dies)
        is awaited; then the main thread gets SIGTERM, which unwinds a load or
        a generate between two steps into the shutdown sequence.
        """
        import multiprocessing
        import signal
        import threading

        parent = multiprocessing.parent_process()
        if parent is None:
            return
        main = threading.main_thread().ident or 0

        def watch() -> None:
            from multiprocessing.connection import wait

            try:
                wait([parent.sentinel])
            except (OSError, ValueError):
                return
            self.parent_gone = True
            self._record_as_holder()
            signal.pthread_kill(main, signal.SIGTERM)

        threading.Thread(target=watch, name="metal-guard parent watch", daemon=True).start()

    def _record_as_holder(self) -> None:
        """The parent is gone and this worker holds the MLX lock alone: the lock file's
        holder record names it (``read_mlx_lock``, ``force=True``, ``metal-guard lock``)."""
        if self.mlx_lock_fd is None:
            return
        import json

        info = _holder_info(f"mlx_subprocess_runner:{self.model_id}", time.time())
        data = json.dumps(info).encode("utf-8")[:_HOLDER_BYTES]  # too long: an unknown holder
        _MLX_LOCK._write(_MLX_LOCK.path(), self.mlx_lock_fd, data)

    def _stuck(self, label: str, seconds: float) -> None:
        # on the watcher thread; the main thread is stuck in the generate, so it is not sending
        error = f"{_GPU_STUCK_ERROR}: {label} has run for {seconds:.0f} s: the GPU looks wedged"
        self._send({"type": "error", "error": error + "; reboot the Mac before using MLX again"})

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.replies.send(message)
        except (OSError, ValueError):  # the parent is gone
            pass
        except Exception:  # an exception that will not pickle: send its text only
            message.pop("exception", None)
            try:
                self.replies.send(message)
            except Exception:
                pass

    def _start(self) -> bool:
        """Guards, then the load; True when ready (the parent was told either way)."""
        _breadcrumb(f"SUBPROCESS_WORKER: starting {self.label}, pid={os.getpid()}")
        if not self.module:
            self._send({"type": "error", "error": "ValueError: unsupported backend"})
            return False
        try:
            warn_if_known_panic_model(self.model_id)
            (self.breaker or CircuitBreaker()).check()
            self._admit()
            self.admitted = True
        except _REFUSALS as exc:
            _breadcrumb(f"SUBPROCESS_WORKER: {self.label} refused: {type(exc).__name__}")
            self._send(
                {"type": "refused", "error": f"{type(exc).__name__}: {exc}", "exception": exc}
            )
            return False
        except Exception as exc:  # e.g. a strict cadence store that cannot be used
            self._send({"type": "error", "error": f"{type(exc).__name__}: {_label(exc)}"})
            return False
        _breadcrumb(f"SUBPROCESS_WORKER: loading {self.label}")
        try:
            self.model, self.tokenizer = self._load()
        except Exception as exc:
            self._send({"type": "error", "error": f"{type(exc).__name__}: {_label(exc)}"})
            return False
        self._send({"type": "ready", "model_id": self.model_id, "pid": os.getpid()})
        _breadcrumb(f"SUBPROCESS_WORKER: {self.label} ready, pid={os.getpid()}")
        return True

    def _admit(self) -> None:
        """Cadence admission; a restart the library made waits (the parent is told how long)."""
        try:
            require_cadence_clear(self.model_id, guard=self.cadence)
        except CadenceViolation as exc:
            if not self.restart:
                raise
            wait = exc.remaining_sec
            _breadcrumb(f"SUBPROCESS_WORKER: {self.label} waits {wait:.1f}s for cadence")
            self._send({"type": "waiting", "seconds": wait, "error": f"{exc}"})
            require_cadence_clear(self.model_id, guard=self.cadence, wait=True)

    def _load(self) -> tuple[Any, Any]:
        import importlib

        loaded = importlib.import_module(self.module).load(self.model_id)
        return loaded[0], loaded[1]

    def _serve(self) -> str:
        """Answer requests until told to stop; the reason it stopped."""
        while True:
            if not self.requests.poll(self.idle_timeout):
                return f"idle for {self.idle_timeout:g} s"
            try:
                message = self.requests.recv()
            except (EOFError, OSError):
                return "the parent closed the pipe"
            if message is None or (isinstance(message, dict) and message.get("type") == "shutdown"):
                return "shutdown requested"
            if not isinstance(message, dict) or message.get("type", "generate") != "generate":
                self._send({"type": "error", "error": f"ValueError: unknown request {message!r}"})
                continue
            self._send(self._generate(message))

    def _shutdown(self, reason: str) -> None:
        """Drop the model, wait for its memory, mark the unload; SIGTERM no longer interrupts."""
        self.stopping = True
        self._note_sigterm()
        try:
            self.model = self.tokenizer = None
            if "mlx.core" in sys.modules:  # a worker refused before its load never touched
                wait_for_release(timeout=5.0)  # Metal: importing MLX now would initialise it
            if self.admitted:
                (self.cadence or CadenceGuard()).mark_unload(self.model_id)
        except Exception as exc:
            _log().warning("metal_guard: worker shutdown of %s: %s", self.label, _label(exc))
        self._note_sigterm()  # a SIGTERM that arrived during the shutdown
        _breadcrumb(f"SUBPROCESS_WORKER: {self.label} stopped ({reason}), pid={os.getpid()}")
        self._send({"type": "shutdown_ack"})

    # -- one request ------------------------------------------------------------

    def _generate(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            prompt = _label(request.get("prompt", ""))
            system = _label(request.get("system") or "")
            max_tokens = int(request.get("max_tokens", 4096))
            temperature = float(request.get("temperature", 0.3))
            text = self._format(prompt, system)
            gemma4_generation_flush(self.model_id, self.generate_calls)
            self.generate_calls += 1
            # The parent holds the gate for us (METALGUARD_EXCLUSIVE_GPU is inherited):
            # waiting for it here would wait for ourselves.
            exclusive = False if request.get("parent_holds_gpu_gate") else None
            watch = _stuck_watch(f"generate {self.label}")  # past METALGUARD_STUCK_SEC: _stuck
            with watch, subprocess_inference_guard(self.model_id, exclusive=exclusive):
                return {"type": "result", "text": self._run(text, max_tokens, temperature)}
        except _REFUSALS as exc:
            return {"type": "refused", "error": f"{type(exc).__name__}: {exc}", "exception": exc}
        except Exception as exc:
            return {"type": "error", "error": f"{type(exc).__name__}: {_label(exc)}"}

    def _format(self, prompt: str, system: str) -> str:
        """The prompt through the model's chat template (system message first, if any)."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        apply = getattr(self.tokenizer, "apply_chat_template", None)
        if callable(apply):
            attempts = [messages]
            if system:  # a template without a system role: fold it into the user turn
                attempts.append([{"role": "user", "content": f"{system}\n\n{prompt}"}])
            for attempt in attempts:
                try:
                    text = apply(attempt, tokenize=False, add_generation_prompt=True)
                except Exception:
                    continue
                if isinstance(text, str):
                    return text
        # No usable template: the original's hand-written ones, chosen by name.
        body = f"{system}\n\n{prompt}" if system else prompt
        name = self.label.lower()
        if "gemma" in name:
            return f"<start_of_turn>user\n{body}<end_of_turn>\n<start_of_turn>model\n"
        if "mistral" in name:
            return f"[INST] {body} [/INST]"
        if "phi" in name:
            return f"<|user|>\n{body}<|end|>\n<|assistant|>\n"
        return body

    def _run(self, prompt: str, max_tokens: int, temperature: float) -> str:
        import importlib

        backend = importlib.import_module(self.module)
        if self.module == "mlx_vlm":
            result = backend.generate(
                self.model,
                self.tokenizer,
                prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                verbose=False,
            )
        else:
            kwargs: dict[str, Any] = {"max_tokens": max_tokens, "verbose": False}
            try:
                from mlx_lm.sample_utils import make_sampler
            except ImportError:  # mlx-lm before samplers: a temperature argument
                kwargs["temp"] = temperature
            else:
                kwargs["sampler"] = make_sampler(temp=temperature)
            result = backend.generate(self.model, self.tokenizer, prompt=prompt, **kwargs)
        return result if isinstance(result, str) else _label(getattr(result, "text", result))


class SubprocessCrashError(RuntimeError):
    """An MLX worker process died (``exitcode`` negative: killed by that signal)."""

    def __init__(self, model_id: str, exitcode: int | None, detail: str = "") -> None:
        self.model_id = _label(model_id)
        self.exitcode = exitcode
        self.detail = _label(detail)
        super().__init__(self._message())

    def _message(self) -> str:
        code = self.exitcode
        if code is None:
            how = "is not running"
        elif code < 0:
            how = f"was killed by signal {-code} ({_signal_name(-code)})"
        else:
            how = f"exited with code {code}"
        text = f"MLX worker for {self.model_id!r} {how}"
        return f"{text}: {self.detail}" if self.detail else text

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.model_id, self.exitcode, self.detail))


class SubprocessTimeoutError(TimeoutError):
    """An MLX worker did not load or answer in time; it was stopped (SIGTERM first) and reaped."""


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _worker_error_kind(error: str) -> str | None:
    """``"oom"`` (Metal out of memory), ``"panic"`` (kernel-panic class), ``"stuck"`` or ``None``."""
    if error.startswith(_GPU_STUCK_ERROR):
        return "stuck"
    if error.startswith("MetalOOMError"):
        return "oom"
    name, _ = detect_panic_signature(error)
    if name == "metal_oom":
        return "oom"
    return "panic" if _signature_kind(name) in (_IOGPU, _KERNEL) else None


def _is_fatal_worker_error(error: str) -> bool:
    """A Metal out-of-memory or a kernel-panic-class failure: the worker must not be restarted."""
    return _worker_error_kind(error) is not None


# =============================================================================
# 5.10 Subprocess runner — (L7, parent side) workers that start guarded, stop
# gracefully and are reaped.
#
# A runner takes one hold on the MLX lock (counted per process) for each worker
# it starts and hands it to the worker (5.9: the worker, the MLX user, shares
# the flocked file description). A watcher thread per worker drops the
# parent's hold the moment the worker exits, however it exits (idle, crash,
# stop). A worker that stopped after ``idle_timeout`` s without a request is
# restarted by the next ``generate``; such a restart waits for the cadence
# interval (one WARNING with the time) instead of surfacing a refusal that
# its own unload caused. Stopping is always: shutdown message → wait → SIGTERM →
# wait → SIGKILL only then, with a WARNING that says why (SIGKILL can leave
# hundreds of GiB of Metal memory wired until reboot). The parent reaps the
# child before returning, so the next load starts after the OS reclaimed it.
# Replies are read only by the thread that holds the request lock; a wait it
# leaves by an exception stops the worker (a late answer would be read as the
# next request's), and a stop begun by another thread leaves the final release
# to that reader.
# ``multiprocessing`` is imported on first use: importing it at module import
# would cost time and pin the start method of the application.
#
# Provides: BaseProcess, MLXSubprocessRunner, _POOL_RESTART_CAP, _POOL_RESTART_WINDOW_SEC,
#   _generate_request, _timeout_arg
# Uses: Prelude, Processes, Locks, Breadcrumbs, MLX access, Modes (L6), Cadence,
#   Circuit breaker, MLX lock (L8), GPU gate, Subprocess worker
# =============================================================================

if TYPE_CHECKING:  # pragma: no cover - typing only
    from multiprocessing.process import BaseProcess

_DEFAULT_LOAD_TIMEOUT = 120.0
_DEFAULT_GENERATE_TIMEOUT = 300.0
_TIMEOUT_MAX = 7 * 86400.0
_TERM_GRACE_SEC = 10.0  # after SIGTERM, before SIGKILL
_BUSY_MESSAGE_GRACE_SEC = 1.0  # a worker stuck in a generate cannot read the shutdown message
_POOL_RESTART_CAP = 3  # replacements of a dead worker per model ...
_POOL_RESTART_WINDOW_SEC = 60.0  # ... within this many seconds


_runner_release_guard = _thread.allocate_lock()


class _NoReply(Exception):
    """The worker sent nothing within the time allowed."""


class MLXSubprocessRunner:
    """One model in its own ``spawn``ed, self-guarding worker process.

    The constructor takes a hold on the MLX lock (``MLXLockConflict`` when
    another process holds it; in observer mode a warning), starts the worker
    and waits ``load_timeout`` for it: a refusal inside the worker
    (``CadenceViolation``, ``MLXCooldownActive``...) is raised here as the
    same exception; a load error is a ``RuntimeError``; no answer is a
    ``SubprocessTimeoutError``; a dead worker a ``SubprocessCrashError``.
    ``cadence`` / ``breaker`` replace the default ``CadenceGuard()`` /
    ``CircuitBreaker()`` the worker checks before loading.

    Use it as a context manager or call ``shutdown()``: message, then SIGTERM,
    then (only if both were ignored) SIGKILL with a WARNING.

    ``idle_timeout`` (default ``METALGUARD_WORKER_IDLE_SEC``, else 600 s): the
    worker stops by itself after that long without a request, which frees its
    memory and the MLX lock at once; the next ``generate`` starts it again,
    waiting for the cadence interval if it must (one WARNING).
    """

    def __init__(
        self,
        model_id: str,
        *,
        backend: str = "mlx",
        load_timeout: float = _DEFAULT_LOAD_TIMEOUT,
        generate_timeout: float = _DEFAULT_GENERATE_TIMEOUT,
        cadence: CadenceGuard | None = None,
        breaker: CircuitBreaker | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self._setup(
            model_id, backend, load_timeout, generate_timeout, cadence, breaker, idle_timeout
        )
        self._launch(restart=None)

    def _setup(
        self,
        model_id: object,
        backend: object,
        load_timeout: object,
        generate_timeout: object,
        cadence: object,
        breaker: object,
        idle_timeout: object,
    ) -> None:
        import threading

        self.model_id = _str_path("model_id", model_id).strip()
        if not self.model_id:
            raise ValueError("model_id is empty; pass the repo id or local path to load")
        self.backend = _label(backend)
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {self.backend!r}")
        self.load_timeout = _timeout_arg("load_timeout", load_timeout)
        self.generate_timeout = _timeout_arg("generate_timeout", generate_timeout)
        if cadence is not None and not isinstance(cadence, CadenceGuard):
            raise TypeError(f"cadence must be a CadenceGuard, not {type(cadence).__name__}")
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, not {type(breaker).__name__}")
        self.idle_timeout = _idle_timeout_arg(idle_timeout)
        self._options: dict[str, Any] = {"cadence": cadence, "breaker": breaker}
        self._lock = threading.Lock()  # one request at a time
        self._process: BaseProcess | None = None
        self._requests: Connection | None = None
        self._replies: Connection | None = None
        self._lock_path: str | None = None
        self._hold_for: BaseProcess | None = None  # the worker the MLX-lock hold is for
        self._pid: int | None = None
        self._stopping = False  # shutdown()/kill() began while another thread was generating
        self._retry_launch = False  # a restart after an idle exit was refused: try again
        self.fatal_error: str | None = None

    def _launch(self, *, restart: str | None) -> None:
        """Take a hold on the MLX lock and start a worker; ``restart``: why the library
        starts it again (it then waits for cadence instead of being refused)."""
        _admission_gate()  # the post-panic gate: refuse before a worker is spawned
        path = _mlx_lock_path()
        fd = None
        try:
            _acquire_mlx_lock_at(path, f"mlx_subprocess_runner:{self.model_id}", force=False)
            self._lock_path = path
            fd = _lock_state(path).fd
        except MLXLockConflict as exc:
            _refuse(exc)  # observer mode: reported, and the worker starts anyway
        options = dict(self._options, idle_timeout=self.idle_timeout, restart=restart)
        if fd is not None:
            options["mlx_lock"] = _InheritedFd(fd)
        try:
            self._start_worker(options)
        except BaseException:
            self._stop(grace=_TERM_GRACE_SEC, message_grace=None, why="start-up failed")
            raise

    # -- start-up ----------------------------------------------------------------

    def _start_worker(self, options: dict[str, Any]) -> None:
        import multiprocessing
        import threading
        import weakref

        ctx = multiprocessing.get_context("spawn")
        req_recv, req_send = ctx.Pipe(duplex=False)
        rep_recv, rep_send = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_worker_main,
            args=(self.model_id, self.backend, req_recv, rep_send, options),
            name=f"metal-guard worker {self.model_id}",
            daemon=True,
        )
        self._process, self._requests, self._replies = process, req_send, rep_recv
        try:
            process.start()
        finally:  # the child has its own copies; ours would hide its death (no EOF)
            req_recv.close()
            rep_send.close()
        self._pid = process.pid
        if self._lock_path is not None:
            self._hold_for = process
        threading.Thread(
            target=_watch_worker,
            args=(weakref.ref(self), process),
            name=f"metal-guard worker watch {process.pid}",
            daemon=True,
        ).start()
        timeout = self.load_timeout
        while True:
            try:
                reply = self._reply(timeout, starting=True)
            except _NoReply:
                _log().error(
                    "metal_guard: MLX worker for %s did not load within %g s; stopping it",
                    self.model_id,
                    timeout,
                )
                self._stop(
                    grace=_TERM_GRACE_SEC,
                    message_grace=_BUSY_MESSAGE_GRACE_SEC,
                    why="load timed out",
                )
                raise SubprocessTimeoutError(
                    f"MLX worker for {self.model_id!r} did not load within {timeout:g} s; "
                    "it was stopped (SIGTERM first) and reaped"
                ) from None
            if reply.get("type") != "waiting":
                break
            seconds = _number(reply.get("seconds")) or 0.0
            _log().warning(
                "metal_guard: restarting the MLX worker for %s (%s): waiting %.1f s for the "
                "cadence interval (%s)",
                self.model_id,
                options.get("restart"),
                seconds,
                _label(reply.get("error") or ""),
            )
            timeout = seconds + self.load_timeout  # the wait, then the load
        kind = reply.get("type")
        if kind == "ready":
            return
        self._stop(grace=_TERM_GRACE_SEC, message_grace=_TERM_GRACE_SEC, why="did not start")
        self._raise_reply(reply, "load")

    def _raise_reply(self, reply: dict[str, Any], phase: str) -> NoReturn:
        """Raise what a ``refused`` / ``error`` / unexpected reply means."""
        exc = reply.get("exception")
        if reply.get("type") == "refused" and isinstance(exc, BaseException):
            raise exc
        error = _label(reply.get("error") or reply)[:2000]
        if reply.get("type") in ("error", "refused"):
            if _worker_error_kind(error) == "oom":
                raise MetalOOMError(f"MLX worker for {self.model_id!r} ({phase}): {error}")
            raise RuntimeError(f"MLX worker for {self.model_id!r} failed ({phase}): {error}")
        raise RuntimeError(f"MLX worker for {self.model_id!r} sent an unexpected reply: {error}")

    # -- talking to the worker -----------------------------------------------------

    def _reply(self, timeout: float, *, starting: bool = False) -> dict[str, Any]:
        """The worker's next message; ``_NoReply`` after ``timeout``; crash error if it died."""
        from multiprocessing.connection import wait

        process, replies = self._process, self._replies
        if process is None or replies is None:
            raise SubprocessCrashError(self.model_id, None, "the worker was stopped")
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _NoReply
            ready = wait([replies, process.sentinel], remaining)
            if replies in ready or (ready and replies.poll(0)):
                try:
                    message = replies.recv()
                except (EOFError, OSError):
                    break
                if isinstance(message, dict) and message.get("type") != "shutdown_ack":
                    return message
                continue  # the worker is stopping: its exit follows
            if ready:
                break
        # Its end of the pipe closed or it exited: let it finish exiting on its own
        # (a worker that stops after a SIGTERM closes the pipe before it is gone).
        self._join(_TERM_GRACE_SEC, drain=False)
        self._stop(grace=_TERM_GRACE_SEC, message_grace=None, why="it stopped answering")
        detail = "the worker process died"
        if starting:
            detail += (
                " while starting (its stderr says why; a spawned worker imports the main "
                "module again, so a script must guard its entry point with "
                "`if __name__ == '__main__':`)"
            )
        raise SubprocessCrashError(self.model_id, self.exitcode, detail)

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 4096,
        temperature: float = 0.3,
        system: str = "",
        timeout: float | None = None,
    ) -> str:
        """Generate in the worker; the text.

        ``SubprocessCrashError`` when the worker is dead or dies;
        ``SubprocessTimeoutError`` after ``timeout`` (default ``generate_timeout``),
        once the worker was stopped and reaped; ``RuntimeError`` (``MetalOOMError``
        for an out-of-memory) for an error the worker reports; a refusal inside
        the worker is raised as its own exception. A wait interrupted by an
        exception (``KeyboardInterrupt``...) stops the worker gracefully before
        the exception goes on: its late answer must not become the next call's.
        """
        request = _generate_request(prompt, max_tokens, temperature, system)
        wait = self.generate_timeout if timeout is None else _timeout_arg("timeout", timeout)
        if _gpu_gate_held_here():  # the worker must not wait for a gate we hold for it
            request["parent_holds_gpu_gate"] = True
        with self._lock:
            if self._idle_exited():
                self._relaunch(f"its worker stopped after {self.idle_timeout:g} s idle")
            try:
                reply = self._exchange(request, wait)
            finally:
                if self._stopping and not self.is_alive():
                    self._release()  # shutdown() came from another thread: we own the pipe
        if reply.get("type") == "result":
            return _label(reply.get("text", ""))
        error = _label(reply.get("error") or "")
        if reply.get("type") == "error" and _is_fatal_worker_error(error):
            self.fatal_error = error
            self.shutdown()  # its Metal state is suspect: never reuse it
        self._raise_reply(reply, "generate")

    def _idle_exited(self) -> bool:
        """The worker exited by itself (code 0) while this runner still runs: it was idle
        (or the restart that followed was refused, and may be tried again)."""
        process = self._process
        idle = process is not None and process.exitcode == 0 and self._requests is not None
        return (idle or self._retry_launch) and not self._stopping

    def _relaunch(self, why: str) -> None:
        """Reap the exited worker and start another (the caller holds the request lock)."""
        self._stop(grace=_TERM_GRACE_SEC, message_grace=None, why=why)
        _log().info("metal_guard: restarting the MLX worker for %s: %s", self.model_id, why)
        try:
            self._launch(restart=why)
        except _REFUSALS:  # e.g. another process took the MLX lock meanwhile: a decision
            self._retry_launch = True
            raise
        self._retry_launch = False

    def _exchange(self, request: dict[str, Any], wait: float) -> dict[str, Any]:
        """Send one request and return its reply (the caller holds the request lock)."""
        process, requests = self._process, self._requests
        if self._stopping or process is None or requests is None or not process.is_alive():
            code = self.exitcode
            if not self._stopping:  # else the stopping thread is at it
                self._stop(grace=_TERM_GRACE_SEC, message_grace=None, why="it is not running")
            detail = "shutdown() was called" if self._stopping else "the worker is not running"
            raise SubprocessCrashError(self.model_id, code, detail)
        try:
            requests.send(request)
        except (OSError, ValueError) as exc:
            self._stop(grace=_TERM_GRACE_SEC, message_grace=None, why="its pipe broke")
            raise SubprocessCrashError(
                self.model_id, self.exitcode, f"sending the request failed: {exc}"
            ) from None
        except BaseException as exc:  # the request may have gone out: as below
            self._stop_interrupted(exc)
            raise
        try:
            return self._reply(wait)
        except _NoReply:
            _log().error(
                "metal_guard: MLX worker for %s (pid %s) did not answer within %g s; stopping it",
                self.model_id,
                self._pid,
                wait,
            )
            self._stop(
                grace=_TERM_GRACE_SEC,
                message_grace=_BUSY_MESSAGE_GRACE_SEC,
                why="a generate timed out",
            )
            raise SubprocessTimeoutError(
                f"MLX worker for {self.model_id!r} did not answer within {wait:g} s; it was "
                "stopped (SIGTERM first) and reaped"
            ) from None
        except SubprocessCrashError:
            raise  # the worker died; it was reaped already
        except BaseException as exc:
            self._stop_interrupted(exc)
            raise

    def _stop_interrupted(self, exc: BaseException) -> None:
        """Stop the worker after ``exc`` interrupted a generate (the caller re-raises it).

        Its answer would arrive late and be read as the next request's; a worker busy
        generating cannot be told to drop one request, so it is stopped.
        """
        _log().warning(
            "metal_guard: a generate on the MLX worker for %s (pid %s) was interrupted "
            "(%s); stopping the worker",
            self.model_id,
            self._pid,
            type(exc).__name__,
        )
        try:
            self._stop(
                grace=_TERM_GRACE_SEC,
                message_grace=_BUSY_MESSAGE_GRACE_SEC,
                why=f"a generate was interrupted ({type(exc).__name__})",
            )
        finally:
            self._release()  # also if a second interrupt cut the stop short

    # -- stopping ------------------------------------------------------------------

    def _join(self, timeout: float, *, drain: bool = True) -> bool:
        """Wait up to ``timeout`` for the worker to exit; True if it did.

        With ``drain`` its replies are read and dropped meanwhile, so a late answer
        never blocks a worker that is trying to exit (only the thread that owns the
        request lock may read the pipe).
        """
        from multiprocessing.connection import wait

        process = self._process
        if process is None:
            return True
        replies = self._replies if drain else None
        deadline = time.monotonic() + timeout
        while process.exitcode is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready = wait([process.sentinel] + ([replies] if replies is not None else []), remaining)
            if replies is not None and replies in ready:
                try:
                    replies.recv()  # a late answer: drained so the worker never blocks on it
                except (EOFError, OSError):
                    replies = None
            elif ready:
                process.join(1.0)
        return True

    def _stop(
        self, *, grace: float, message_grace: float | None, why: str, owner: bool = True
    ) -> None:
        """Shutdown message (if ``message_grace``) → SIGTERM → SIGKILL only after ``grace``.

        ``owner``: the caller holds the request lock. Otherwise (another thread is in
        ``generate``) the pipe is left to that thread, which also cleans up when it
        sees the worker gone.
        """
        process = self._process
        if process is not None and process.exitcode is None:
            if message_grace is not None and self._requests is not None:
                try:
                    self._requests.send({"type": "shutdown"})
                except (OSError, ValueError):
                    pass
                self._join(message_grace, drain=owner)
            killed = _stop_process(
                process,
                grace=grace,
                why=why,
                what=f"MLX worker for {self.model_id}",
                wait=lambda t: self._join(t, drain=owner),
            )
            if killed:
                _breadcrumb(
                    f"SUBPROCESS_WORKER: SIGKILL pid={process.pid} ({self.model_id}): {why}"
                )
        if owner:
            self._release()

    def _release(self) -> None:
        """Close the pipes and drop this runner's MLX-lock hold (once)."""
        with _runner_release_guard:
            conns = (self._requests, self._replies)
            self._requests = self._replies = None
        for conn in conns:
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass
        self._drop_hold(None)

    def _drop_hold(self, worker: BaseProcess | None) -> None:
        """Drop the MLX-lock hold taken for ``worker`` (``None``: whichever is held), once."""
        with _runner_release_guard:
            if worker is not None and worker is not self._hold_for:
                return
            path, self._lock_path, self._hold_for = self._lock_path, None, None
        if path is not None:
            _release_mlx_lock_at(path)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the worker: shutdown message, ``timeout`` s, SIGTERM, ``timeout`` s, SIGKILL.

        Returns once the worker is reaped and this runner's MLX-lock hold and pipes are
        gone, also when a generate was in flight in another thread.
        """
        grace = _seconds_arg("timeout", timeout, maximum=_TIMEOUT_MAX)
        pid = self._pid
        self._retry_launch = False
        owner = self._lock.acquire(timeout=grace)  # a generate in flight gets to finish first
        self._stop_as(owner, grace=grace, message_grace=grace, why="shutdown() was called")
        _log().info("metal_guard: MLX worker for %s (pid %s) stopped", self.model_id, pid)

    def kill(self) -> None:
        """Stop the worker without the shutdown message: SIGTERM, 5 s, then SIGKILL."""
        self._retry_launch = False
        owner = self._lock.acquire(blocking=False)
        self._stop_as(owner, grace=5.0, message_grace=None, why="kill() was called")

    def _stop_as(self, owner: bool, *, grace: float, message_grace: float | None, why: str) -> None:
        """``_stop``, then release the request lock (``owner``) or, when a generate in
        another thread owns the pipe, wait for it to return and drop what it left.
        """
        if not owner:
            self._stopping = True  # that generate releases once the worker is gone
        try:
            self._stop(grace=grace, message_grace=message_grace, why=why, owner=owner)
        finally:
            if owner:
                self._lock.release()
        if owner:
            return
        # The worker is reaped: the generating thread sees its answer or its end at once.
        if self._lock.acquire(timeout=_TERM_GRACE_SEC):
            try:
                self._release()
            finally:
                self._lock.release()

    def is_alive(self) -> bool:
        return self._process is not None and self._process.exitcode is None

    @property
    def worker_pid(self) -> int | None:
        """The worker's pid while it runs, else ``None``."""
        return self._pid if self.is_alive() else None

    @property
    def exitcode(self) -> int | None:
        """The worker's exit code once it exited and was reaped (negative: the signal)."""
        return None if self._process is None else self._process.exitcode

    def __enter__(self) -> MLXSubprocessRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        # Garbage collection must not block: ask the worker to stop (it also stops
        # when our pipe ends close) and drop the lock hold; no SIGKILL, no waiting.
        try:
            if self.is_alive() and self._requests is not None:
                self._requests.send({"type": "shutdown"})
            self._release()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = f"pid={self._pid}" if self.is_alive() else f"exitcode={self.exitcode}"
        return f"MLXSubprocessRunner({self.model_id!r}, backend={self.backend!r}, {state})"


def _watch_worker(runner: Callable[[], MLXSubprocessRunner | None], worker: BaseProcess) -> None:
    """Thread body: when ``worker`` exits, drop the MLX-lock hold its runner took for it.

    Only the hold: the pipes and the reaping belong to the thread that talks to
    the worker. Holds a weak reference, so an abandoned runner is still collected.
    """
    from multiprocessing.connection import wait

    try:
        wait([worker.sentinel])
    except (OSError, ValueError):  # the sentinel is gone: the process object was closed
        pass
    owner = runner()
    if owner is not None:
        owner._drop_hold(worker)


def _timeout_arg(name: str, value: object) -> float:
    return _seconds_arg(name, value, maximum=_TIMEOUT_MAX, allow_zero=False)


def _generate_request(
    prompt: object, max_tokens: object, temperature: object, system: object
) -> dict[str, Any]:
    """The request message, after the caller's arguments were checked."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
    if not isinstance(system, str):
        raise TypeError(f"system must be a str, not {type(system).__name__}")
    tokens = _int_arg("max_tokens", max_tokens, minimum=1)
    temp = _real_arg("temperature", temperature, minimum=0)
    return {
        "type": "generate",
        "prompt": str.__str__(prompt),
        "max_tokens": tokens,
        "temperature": temp,
        "system": str.__str__(system),
    }


# =============================================================================
# 5.11 Worker pool — ``call_model_isolated``: one pooled worker per model.
#
# The pool's lock is never held while a worker loads or stops: callers of the
# same model wait for the one load in progress, other models are not blocked.
# A dead worker is replaced at most 3 times in 60 s; a Metal out-of-memory or a
# kernel-panic-class error ends that model's worker for good (until
# ``shutdown_all_workers()``). Refusals propagate; crashes and timeouts log an
# ERROR and return ``""`` (the original's contract). A call interrupted while it
# waits (Ctrl-C) stopped its worker: that worker leaves the pool, uncounted.
# A worker the pool starts again because its previous one stopped by itself
# (``idle_timeout``) or died waits for the cadence interval (one WARNING with
# the time) instead of raising the refusal its predecessor's unload caused.
#
# Provides: call_model_isolated, shutdown_all_workers
# Uses: Prelude, MLX access, Subprocess worker, Subprocess runner
# =============================================================================


_runner_pool: dict[str, MLXSubprocessRunner] = {}
_pool_lock = _thread.allocate_lock()  # never held while a worker loads or stops
_pool_starting: set[str] = set()  # keys whose worker is loading (other callers wait)
_pool_failures: dict[str, list[float]] = {}  # key → monotonic times its worker died/failed
_pool_banned: dict[str, str] = {}  # key → the fatal error that ended its worker
# key → why its previous worker ended (the next one waits for cadence) and its idle limit
_pool_restart: dict[str, tuple[str, float]] = {}
_pool_generation = 0  # bumped by shutdown_all_workers(): a load that began before is dropped
_pool_atexit_registered = False
_pool_condition_box: list[Any] = []


def _pool_condition() -> Any:
    """A ``threading.Condition`` on ``_pool_lock`` (created on first use, not at import)."""
    if not _pool_condition_box:
        import threading

        with _once_lock:
            if not _pool_condition_box:
                _pool_condition_box.append(threading.Condition(_pool_lock))
    return _pool_condition_box[0]


def _pool_failed(key: str, fatal_error: str | None = None) -> None:
    """Count a dead or failed worker of ``key`` (with ``_pool_lock`` held)."""
    _pool_failures.setdefault(key, []).append(time.monotonic())
    if fatal_error is not None:
        _pool_banned[key] = fatal_error


def _pool_claim(
    key: str, model: str
) -> tuple[MLXSubprocessRunner | None, int, tuple[str, float] | None]:
    """``(live runner, _, _)``, or ``(None, generation, restart)`` with ``key`` claimed for
    starting; ``restart``: why the library starts that model's worker again, and the idle
    limit its predecessor had.

    A dead pooled runner is reaped (outside the lock). Raises
    ``SubprocessCrashError`` when the worker may not be (re)started.
    """
    dead: MLXSubprocessRunner | None = None
    refusal: SubprocessCrashError | None = None
    generation = 0
    condition = _pool_condition()
    with condition:
        while True:
            if key in _pool_banned:
                refusal = SubprocessCrashError(
                    model,
                    None,
                    f"not restarted after a fatal error ({_pool_banned[key][:300]}); "
                    "call shutdown_all_workers() to reset the pool",
                )
                break
            runner = _runner_pool.get(key)
            if runner is not None and runner.is_alive():
                return runner, _pool_generation, None
            if runner is not None:
                del _runner_pool[key]
                dead = runner
                if runner.exitcode == 0:  # it stopped by itself after idling
                    _log().info("metal_guard: pooled MLX worker for %s had stopped", model)
                    why = f"its worker stopped after {runner.idle_timeout:g} s idle"
                else:
                    why = f"its worker died (exit code {runner.exitcode})"
                    _log().warning(
                        "metal_guard: %s; replacing it",
                        SubprocessCrashError(model, runner.exitcode, "pooled worker")._message(),
                    )
                    _pool_failed(key)
                _pool_restart[key] = (why, runner.idle_timeout)
            if key not in _pool_starting:
                break
            condition.wait()  # another caller is starting this worker
        if refusal is None:
            cutoff = time.monotonic() - _POOL_RESTART_WINDOW_SEC
            recent = [t for t in _pool_failures.get(key, []) if t >= cutoff]
            _pool_failures[key] = recent
            if len(recent) > _POOL_RESTART_CAP:
                refusal = SubprocessCrashError(
                    model,
                    dead.exitcode if dead is not None else None,
                    f"the worker is crash-looping ({len(recent)} failures within "
                    f"{_POOL_RESTART_WINDOW_SEC:g} s, at most {_POOL_RESTART_CAP} replacements); "
                    "not restarting it now",
                )
            else:
                _pool_starting.add(key)
                generation = _pool_generation
                restart = _pool_restart.pop(key, None)
    if dead is not None:
        dead.kill()  # it is dead already: this reaps it and drops its lock hold
    if refusal is not None:
        raise refusal
    return None, generation, restart


def _pool_start(
    key: str,
    model: str,
    backend: str,
    generation: int,
    *,
    idle_timeout: float | None,
    restart: str | None,
) -> MLXSubprocessRunner:
    """Start the claimed worker (no pool lock held while it loads) and pool it."""
    global _pool_atexit_registered
    runner = None
    keep = False
    condition = _pool_condition()
    try:
        if restart is None:
            runner = MLXSubprocessRunner(model, backend=backend, idle_timeout=idle_timeout)
        else:  # the library replaces a worker that ended: it waits for cadence
            new = MLXSubprocessRunner.__new__(MLXSubprocessRunner)
            new._setup(
                model,
                backend,
                _DEFAULT_LOAD_TIMEOUT,
                _DEFAULT_GENERATE_TIMEOUT,
                None,
                None,
                idle_timeout,
            )
            new._launch(restart=restart)
            runner = new
    finally:
        with condition:
            _pool_starting.discard(key)
            keep = runner is not None and generation == _pool_generation
            if keep and runner is not None:
                _runner_pool[key] = runner
                if not _pool_atexit_registered:
                    import atexit

                    atexit.register(shutdown_all_workers)
                    _pool_atexit_registered = True
            condition.notify_all()
    if not keep:  # shutdown_all_workers() ran during the load
        runner.shutdown()
        raise SubprocessCrashError(model, None, "shutdown_all_workers() was called meanwhile")
    return runner


def call_model_isolated(
    prompt: str,
    model: str,
    *,
    backend: str = "mlx",
    max_tokens: int = 4096,
    temperature: float = 0.3,
    system: str = "",
    timeout: float | None = None,
    idle_timeout: float | None = None,
) -> str:
    """Generate with ``model`` in a pooled worker process (one per model and backend).

    Refusals propagate (``CadenceViolation``, ``MLXCooldownActive``,
    ``MLXLockConflict``, ``GPUBusy``): they are decisions, not crashes. An
    exception that interrupts the wait (Ctrl-C) stops the worker and propagates.
    A worker that fails to start, crashes or times out is logged at ERROR and
    ``""`` is returned; the next call replaces it, at most 3 times in 60 s
    (then ``SubprocessCrashError``: crash-looping). An error the worker
    reports while generating propagates; after a Metal out-of-memory or a
    kernel-panic-class error that model's worker is not restarted until
    ``shutdown_all_workers()``. ``idle_timeout`` applies to a worker this call
    starts (see ``MLXSubprocessRunner``); a worker the pool starts again after
    its predecessor idled out or died waits for cadence instead of refusing.
    """
    request = _generate_request(prompt, max_tokens, temperature, system)
    model_id = _str_path("model", model).strip()
    backend = _label(backend)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    wait = None if timeout is None else _timeout_arg("timeout", timeout)
    idle = None if idle_timeout is None else _idle_timeout_arg(idle_timeout)
    key = f"{model_id}:{backend}"
    runner, generation, restart = _pool_claim(key, model_id)
    if runner is None:
        if restart is not None and idle is None:
            idle = restart[1]  # a replacement keeps the limit its predecessor was given
        try:
            runner = _pool_start(
                key,
                model_id,
                backend,
                generation,
                idle_timeout=idle,
                restart=None if restart is None else restart[0],
            )
        except _REFUSALS:
            raise
        except (SubprocessTimeoutError, RuntimeError) as exc:  # crashes and load errors
            fatal = _label(exc) if _is_fatal_worker_error(_label(exc)) else None
            if isinstance(exc, MetalOOMError):
                fatal = _label(exc)
            with _pool_lock:
                _pool_failed(key, fatal)
            _log().error("metal_guard: MLX worker for %s could not start: %s", model_id, exc)
            return ""
    try:
        return runner.generate(
            request["prompt"],
            max_tokens=request["max_tokens"],
            temperature=request["temperature"],
            system=request["system"],
            timeout=wait,
        )
    except (SubprocessCrashError, SubprocessTimeoutError) as exc:
        _log().error("metal_guard: MLX worker for %s failed: %s", model_id, exc)
        runner.kill()  # stopped and reaped already; makes sure its lock hold is gone
        _evict(key, runner)
        return ""
    except BaseException:
        if runner.fatal_error is not None:
            _evict(key, runner)
        elif not runner.is_alive():  # stopped after an interrupted generate: not a crash
            _evict(key, runner, failed=False)
        raise


def _evict(key: str, runner: MLXSubprocessRunner, *, failed: bool = True) -> None:
    """Take a runner out of the pool; a ``failed`` one counts towards the restart cap."""
    with _pool_lock:
        if _runner_pool.get(key) is runner:
            del _runner_pool[key]
        if failed:
            _pool_failed(key, runner.fatal_error)
            _pool_restart[key] = (
                f"its worker failed (exit code {runner.exitcode})",
                runner.idle_timeout,
            )


def shutdown_all_workers() -> None:
    """Stop every pooled worker gracefully and reset the pool (also run at exit)."""
    global _pool_generation
    with _pool_lock:
        runners = list(_runner_pool.values())
        _runner_pool.clear()
        _pool_failures.clear()
        _pool_banned.clear()
        _pool_restart.clear()
        _pool_generation += 1
    for runner in runners:
        try:
            runner.shutdown()
        except Exception as exc:
            _log().warning("metal_guard: stopping the worker for %s: %s", runner.model_id, exc)


# =============================================================================
# 5.12 Child state — what a program under ``metal-guard run`` remembers, its GPU
# turns and its wired policy.
#
# One ``_RunState`` per process (plain attributes). A GPU turn takes the gate,
# runs one forward-pass step, synchronizes the streams the step used and
# releases the gate; mlx_lm.server's loop, which steps back to back and waits only
# for requests, and a ``generate_step`` loop keep a turn across steps while nobody
# waits, else up to 20 ms. Taking a turn is a ``_critical`` block:
# a stop that lands meanwhile gives the gate back first. SIGTERM is Ctrl-C,
# through ``_interrupt``.
#
# Provides: _EXIT_GENERATION_DEAD, _EXIT_GPU_STUCK, _GpuTurn, _run, _run_end_kept_turn,
#   _run_note_wait, _run_on_sigterm, _run_say, _run_wired_policy
# Uses: Prelude, Processes, MLX access, GPU gate, Runs registry, Wired-limit control
# =============================================================================

_EXIT_REFUSED = 2
_EXIT_GENERATION_DEAD = 70  # mlx_lm.server's generation thread died (after the flush)
_EXIT_GPU_STUCK = 71  # run's exit after it stopped a program with stuck GPU work
_RUN_WIRED_ENV = "METALGUARD_RUN_WIRED"
_RUN_GATE_LOG_ENV = "METALGUARD_RUN_GATE_LOG"  # test aid: "pid start end" per GPU turn
_RUN_NOTE_EVERY_SEC = 5.0
_RUN_TURN_SLICE_SEC = 0.02  # mlx_lm.server's loop keeps its turn across steps this long at most


class _RunState:
    """What the hooks of this process remember (one instance; plain attributes)."""

    def __init__(self) -> None:
        self.installed = False
        self.gate_on = True
        self.gate_log: str | None = None
        self.main_ident = 0
        self.gate_wait = 0.0
        self.gate_wait_noted = time.monotonic()
        self.labels: dict[int, str] = {}  # id(model) → model id
        self.live: dict[int, str] = {}  # id(model) → model id, models not freed yet
        self.gemma_pending: set[int] = set()
        self.unloads: list[tuple[str, float]] = []  # freed models not recorded yet
        self.local: threading.local | None = None
        self.gate: exclusive_gpu | None = None


_run = _RunState()


def _run_say(text: str | None) -> None:
    """One line on stderr (``None``: nothing); stdout and stderr flushed either way."""
    for stream, line in ((sys.stderr, text), (sys.stdout, None), (sys.stderr, None)):
        try:
            stream.write(f"metal-guard: {line}\n") if line else stream.flush()
        except Exception:  # a closed stream: nothing to tell
            pass


def _run_wired_policy() -> None:
    """``METALGUARD_RUN_WIRED`` (off, cap, cap:<GiB>, keep; bad: off); unset:
    ``METALGUARD_WIRED_LIMIT`` when set, else ``off``. ``keep`` installs nothing.
    """
    raw = os.environ.get(_RUN_WIRED_ENV, "").strip()
    if raw.lower() == "keep":
        return
    try:
        limit_wired_memory(raw or (None if os.environ.get(_WIRED_ENV_VAR, "").strip() else "off"))
    except ValueError as exc:
        _log_once(
            "run-wired", _WARNING, "metal_guard: %s=%r: %s; using off", _RUN_WIRED_ENV, raw, exc
        )
        limit_wired_memory("off")


def _run_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C; held back while the main thread is inside a lock step (0.2)."""
    _interrupt(KeyboardInterrupt(), frame)


def _run_local() -> Any:
    local = _run.local
    if local is None:  # hooks applied before mlx.core (a module imported without it)
        import threading

        local = _run.local = threading.local()
    return local


class _GpuTurn:
    """One turn on the GPU gate: take it, run the step, synchronize its streams, release."""

    __slots__ = ("checked", "gate", "start", "streams")

    def __init__(self, streams: tuple[object, ...] = ()) -> None:
        self.streams = streams
        self.gate: exclusive_gpu | None = None
        self.start = self.checked = 0.0  # taken; last found nobody waiting

    def __enter__(self) -> _GpuTurn:
        gate, local = _run.gate, _run_local()
        if not _run.gate_on or gate is None or getattr(local, "turn", False):
            return self  # nested in a turn of this thread: that one synchronizes and releases
        kept = getattr(local, "kept", None)  # the turn kept since this thread's last step
        if kept is not None:
            local.kept = None
            # asked once a slice (a probe opens a file): a waiter gets the GPU within a
            # slice and a step, and a long request does not probe at every step
            now = time.monotonic()
            asked_lately = now - kept.checked < _RUN_TURN_SLICE_SEC
            if asked_lately or not _gpu_gate_awaited():
                self.gate, self.start, local.turn = kept.gate, kept.start, True
                self.checked = kept.checked if asked_lately else now
                self.streams = kept.streams + tuple(
                    s for s in self.streams if s not in kept.streams
                )
                return self
            kept.let_go()
        asked = time.monotonic()
        with _critical(undo=self._release):  # a stop while taking it gives it back
            gate.__enter__()
            self.gate, local.turn = gate, True
        self.start = self.checked = time.monotonic()
        _run.gate_wait += self.start - asked
        return self

    def __exit__(self, *exc: object) -> None:
        if self.gate is None:
            return
        local = _run_local()
        if exc[0] is None and getattr(local, "keep", False):
            # kept: the next step goes on with it while it is young or nobody waits (no
            # synchronize in between, so MLX keeps overlapping steps); else it lets go first
            local.turn, local.kept = False, self
            return
        self.let_go()

    def let_go(self) -> None:
        with _critical():
            self._release()

    def _release(self) -> None:
        gate, self.gate = self.gate, None
        if gate is None:
            return
        _run_local().turn = False
        try:
            mx = sys.modules.get("mlx.core")
            if mx is not None:  # the step's own streams (one sync costs tens of µs)
                sync = _mlx_fn(mx, "synchronize")
                for stream in self.streams or (_generation_stream(),):
                    _mlx_step("synchronize(step)", sync, *([] if stream is None else [stream]))
            if _run.gate_log:
                _run_log_turn(self.start, time.monotonic())
        finally:
            gate.__exit__(None, None, None)


def _run_end_kept_turn() -> None:
    """Release the turn the server loop kept (before it waits, loads or ends)."""
    local = _run_local()
    kept, local.kept = getattr(local, "kept", None), None
    if kept is not None:
        kept.let_go()


def _run_log_turn(start: float, end: float) -> None:
    try:
        with open(_run.gate_log or "", "a", encoding="ascii") as log:
            log.write(f"{os.getpid()} {start:.6f} {end:.6f}\n")
    except OSError as exc:
        _log_once(
            "run-gate-log", _WARNING, "metal_guard: cannot write %s: %s", _RUN_GATE_LOG_ENV, exc
        )


def _run_note_wait(force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - _run.gate_wait_noted < _RUN_NOTE_EVERY_SEC:
        return
    waited, _run.gate_wait, _run.gate_wait_noted = _run.gate_wait, 0.0, now
    if waited > 0:
        try:
            _run_note_gate_wait(waited)
        except Exception as exc:
            _log_once("run-note-wait", _DEBUG, "metal_guard: gate wait not noted: %r", exc)


# =============================================================================
# 5.13 Child hooks — what ``_child_bootstrap`` installs in a Python program run
# under ``metal-guard run``.
#
# The bootstrap only adds a meta-path finder; once ``mlx.core`` / ``mlx_lm`` /
# ``mlx_vlm`` ran their own code: the wired policy, loads through advisory and a
# cadence admission that waits, each forward-pass step under the GPU gate (streams
# synchronized before release; mlx_lm.server's loop, which steps back to back and
# waits only for requests, and a generate_step loop keep a turn across steps while
# nobody waits, else up to 20 ms), the per-request flush,
# SIGTERM as Ctrl-C (held back while the main thread is inside a lock step),
# unloads recorded, each step watched for stuck GPU work (the supervisor is told
# and stops the program: a wedged process cannot stop itself). A hook whose target this version lacks is named once on
# stderr and skipped. A hooked module run by ``python -m`` (runpy execs it as
# ``__main__``; no import) gets its class hooks as each ``class`` statement ends.
#
# Provides: _child_bootstrap
# Uses: Prelude, Breadcrumbs, MLX access, Model identity, Registry, Version advisories,
#   Cadence rules, Cadence, GPU gate, Runs registry, Stuck GPU work, Flush guards, Child state
# =============================================================================

_RUN_HOOKED = frozenset({"mlx.core", "mlx_lm", "mlx_lm.server", "mlx_vlm"})
_RUN_MODEL_KWARGS = ("path_or_hf_repo", "model_path", "path", "repo", "model")

# (module, attribute path, kind, versions where it is expected; "" = every version).
# Outside its range a hook still applies when its target is there; only a target
# missing inside its range (or in a version that does not parse) is named.
_RUN_HOOKS: tuple[tuple[str, str, str, str], ...] = (
    ("mlx_lm.utils", "load", "load", ""),
    ("mlx_lm.utils", "load_model", "load", ""),
    ("mlx_lm.utils", "sharded_load", "load", ">=0.30"),
    ("mlx_lm.utils", "pipeline_load", "load", ">=0.29"),
    ("mlx_lm.utils", "generate_step", "step", "<0.23"),
    ("mlx_lm.utils", "stream_generate", "request", "<0.23"),
    ("mlx_lm.utils", "generate", "request", "<0.23"),
    ("mlx_lm.generate", "generate_step", "step", ">=0.23"),
    ("mlx_lm.generate", "speculative_generate_step", "step", ">=0.23"),
    ("mlx_lm.generate", "stream_generate", "request", ">=0.23"),
    ("mlx_lm.generate", "generate", "request", ">=0.23"),
    ("mlx_lm.generate", "BatchGenerator._next", "batch", ">=0.28"),
    ("mlx_lm.generate", "BatchGenerator.insert", "batch-insert", ">=0.28"),
    ("mlx_lm.generate", "BatchGenerator.insert_segments", "batch-insert", ">=0.31.3"),
    ("mlx_lm.server", "ResponseGenerator._generate", "thread", ">=0.29"),
    ("mlx_lm.server", "ResponseGenerator._next_request", "idle", ">=0.31"),
    ("mlx_vlm.utils", "load", "load", ""),
    ("mlx_vlm.generate", "generate_step", "step", ""),
    ("mlx_vlm.generate", "stream_generate", "request", ""),
    ("mlx_vlm.generate", "generate", "request", ""),
)
_RUN_REBIND = {
    "mlx_lm": ("mlx_lm.utils", "mlx_lm.generate"),
    "mlx_vlm": ("mlx_vlm.utils", "mlx_vlm.generate"),
}
_RUN_MARK = "_metal_guard_run_original"


class _RunFinder:
    """Meta-path finder: the hooked modules load through ``_RunLoader``; others are not looked at."""

    def __init__(self) -> None:
        self._finding: set[str] = set()  # a finder after us that asks the others again

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _RUN_HOOKED or fullname in self._finding:
            return None
        self._finding.add(fullname)  # one import of a name at a time (the module's lock)
        try:
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec: Any = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _RunLoader(spec.loader)
                    return spec
            return None
        finally:
            self._finding.discard(fullname)


class _RunLoader:
    """A module's own loader, plus our hooks once its code has run."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _run_after_import(module.__name__)

    def get_code(self, fullname: str) -> Any:
        # ``python -m NAME``: runpy runs this code as ``__main__``, never through
        # exec_module, and its last lines start the program: hook each class as it is made
        _run_hook_main_classes(fullname)
        return self._loader.get_code(fullname)

    def __getattr__(self, name: str) -> Any:
        if name == "_loader":  # a copy made without __init__: no recursion
            raise AttributeError(name)
        return getattr(self._loader, name)


def _child_bootstrap() -> None:
    """Install the child hooks lazily: one meta-path finder, nothing else until MLX comes.

    Idempotent. Modules already imported get their hooks at once.
    """
    if not any(isinstance(f, _RunFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RunFinder())
    for name in ("mlx.core", "mlx_lm", "mlx_lm.server", "mlx_vlm"):
        if sys.modules.get(name) is not None:
            _run_after_import(name)


def _run_hook_main_classes(name: str) -> None:
    """Hook the classes of module ``name`` run as ``__main__`` when their ``class``
    statements end (``builtins.__build_class__`` wrapped until the last one is made)."""
    import builtins as builtins_module

    builtins: Any = builtins_module  # its stub's __build_class__ is no plain callable
    wanted = {p.split(".")[0] for m, p, _, _ in _RUN_HOOKS if m == name and "." in p}
    if not wanted:
        return
    original = builtins.__build_class__

    def build_class(func: Any, cls_name: str, *bases: Any, **kwargs: Any) -> Any:
        cls = original(func, cls_name, *bases, **kwargs)
        scope = getattr(func, "__globals__", {})
        spec = scope.get("__spec__")
        main = scope.get("__name__") == "__main__" and getattr(spec, "name", None) == name
        if cls_name in wanted and main:
            wanted.discard(cls_name)
            if not wanted and builtins.__build_class__ is build_class:
                builtins.__build_class__ = original
            _run_after_import(name, cls)
        return cls

    builtins.__build_class__ = build_class


def _run_after_import(name: str, cls: type | None = None) -> None:
    """Never lets a hook failure reach the program: one line on stderr, unguarded from there."""
    try:
        if name == "mlx.core":
            _run_on_mlx()
        else:
            _run_hook_package(name, cls)
    except Exception as exc:
        if _first_time("run-hook-failed:" + name):
            _run_say(f"hooks for {name} not installed: {type(exc).__name__}: {exc}")


def _run_on_mlx() -> None:
    """``mlx.core`` is imported: wired policy, per-thread state, SIGTERM, the exit cleanup."""
    import threading

    if _run.installed:
        return
    _run.installed = True
    _run.local = threading.local()
    _run.gate_on = _env_bool("METALGUARD_RUN_GPU_GATE", True)
    _run.gate_log = _env_path(_RUN_GATE_LOG_ENV, None)
    _run.gate = exclusive_gpu(f"run:{os.getpid()}")
    _run_wired_policy()
    import atexit

    atexit.register(_run_at_exit)
    if _run_supervisor() > 0:  # the supervisor stops this program: it cannot stop itself
        _on_stuck(_run_note_stuck)
    _run.main_ident = threading.main_thread().ident or 0
    if _thread.get_ident() == _run.main_ident:
        import signal

        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _run_on_sigterm)


# -- loads ----------------------------------------------------------------------


def _run_model_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    value = args[0] if args else next((kwargs[k] for k in _RUN_MODEL_KWARGS if k in kwargs), None)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return value if isinstance(value, str) and value.strip() else None


def _run_refuse_exit(text: str) -> NoReturn:
    """Refused by a guard: one line, exit 2 (SystemExit in the main thread, else at once)."""
    _breadcrumb(f"RUN_REFUSED: {text}")
    _run_say(f"refused: {text}")
    if _thread.get_ident() == _run.main_ident:
        raise SystemExit(_EXIT_REFUSED)
    _run_say(None)
    os._exit(_EXIT_REFUSED)


def _run_admit(model_id: str) -> _CadenceScope:
    """Cadence admission that waits for the interval (``METALGUARD_RUN_WAIT=0``: refuse, exit 2)."""
    guard = _default_guard(180.0, 0.0)
    wait = False
    while True:  # a wait that another process's load outran waits again
        scope = guard.scope(model_id, wait=wait)
        try:
            scope.__enter__()
            return scope
        except CadenceViolation as violation:
            if not _env_bool("METALGUARD_RUN_WAIT", True):
                _run_refuse_exit(str(violation))
            if not wait:
                _run_say(f"waiting {violation.remaining_sec:.1f} s: {violation}")
            wait = True


def _run_record_unloads() -> None:
    """Record the unloads of the models freed since the last call (never from a finalizer)."""
    if not _run.unloads:
        return
    guard = _default_guard(180.0, 0.0)
    while _run.unloads:
        model_id, ts = _run.unloads.pop(0)
        try:
            guard.mark_unload(model_id, ts=ts)
        except Exception as exc:
            _log().warning("metal_guard: unload of %s not recorded: %s", model_id, exc)
        _breadcrumb(f"RUN_UNLOAD: {_label(model_id)}")


def _run_model_freed(key: int, model_id: str) -> None:
    # a finalizer: no locks, no files; the next load or the exit records it
    _run.live.pop(key, None)
    _run.labels.pop(key, None)
    _run.gemma_pending.discard(key)
    _run.unloads.append((model_id, time.time()))


def _run_track(result: Any, model_id: str) -> None:
    import weakref

    model = result[0] if isinstance(result, tuple) and result else result
    key = id(model)
    _run.labels[key] = model_id
    _run.live[key] = model_id
    if is_gemma4_family(model_id):
        _run.gemma_pending.add(key)
    try:
        weakref.finalize(model, _run_model_freed, key, model_id)
    except TypeError:  # not weak-referenceable: recorded at exit only
        pass


def _run_wrap_load(fn: Callable[..., Any]) -> Callable[..., Any]:
    def load(*args: Any, **kwargs: Any) -> Any:
        model_id = _run_model_arg(args, kwargs)
        local = _run_local()
        if model_id is None or getattr(local, "loading", False):
            return fn(*args, **kwargs)
        _run_end_kept_turn()  # a load is no step
        _run_record_unloads()
        warn_if_known_panic_model(model_id)
        scope = _run_admit(model_id)  # a wait here stays interruptible (SIGTERM, Ctrl-C)
        local.loading = True
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # nothing allocated yet: the scope does not count it
            scope.__exit__(type(exc), exc, exc.__traceback__)
            raise
        finally:
            local.loading = False
        _run_track(result, model_id)
        return result

    return load


# -- steps and requests -----------------------------------------------------------


def _run_wrap_step(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    import inspect

    if not inspect.isgeneratorfunction(fn):
        return None  # not the shape this hook expects

    def step(*args: Any, **kwargs: Any) -> Any:
        stream = kwargs.get("stream")
        streams = () if stream is None else (stream,)
        watch = _stuck_watch(f"{fn.__name__} step")  # the gate wait counts: a wedge holds it
        local = _run_local()
        outer_keep = getattr(local, "keep", False)
        local.keep = True  # a turn spans steps while nobody waits (see _GpuTurn)
        gen = fn(*args, **kwargs)
        try:
            while True:
                with watch, _GpuTurn(streams):
                    try:
                        item = next(gen)
                    except StopIteration as stop:
                        return stop.value
                yield item
        finally:
            gen.close()
            local.keep = outer_keep
            if not outer_keep:
                _run_end_kept_turn()  # the request is over: synchronize and release

    return step


def _run_request_begin(model: object) -> str | None:
    """Start of a request: the gemma-4 first-generate flush, then PRE. None when nested."""
    local = _run_local()
    depth = getattr(local, "requests", 0)
    local.requests = depth + 1
    if depth:
        return None
    label = _run_first_generate(model)
    _inference_flush_pre(label)
    return label


def _run_first_generate(model: object) -> str:
    """The model's id; a gemma-4 model's first generate gets the settle window first."""
    key = id(model)
    label = _run.labels.get(key, "model")
    if key in _run.gemma_pending:
        _run.gemma_pending.discard(key)
        gemma4_generation_flush(label, 0)
    return label


def _run_request_end(label: str | None, streams: tuple[object, ...], failed: bool) -> None:
    local = _run_local()
    local.requests = max(0, getattr(local, "requests", 1) - 1)
    if label is None:
        return
    with _GpuTurn(streams):
        _inference_flush_post(label, streams, failed=failed)
    _run_note_wait()


def _run_wrap_request(fn: Callable[..., Any]) -> Callable[..., Any]:
    import inspect

    if inspect.isgeneratorfunction(fn):

        def stream_request(model: Any, *args: Any, **kwargs: Any) -> Any:
            stream = kwargs.get("stream")
            streams = () if stream is None else (stream,)
            label = _run_request_begin(model)
            failed = True
            try:
                yield from fn(model, *args, **kwargs)
                failed = False
            finally:
                _run_request_end(label, streams, failed)

        return stream_request

    def request(model: Any, *args: Any, **kwargs: Any) -> Any:
        label = _run_request_begin(model)
        failed = True
        try:
            result = fn(model, *args, **kwargs)
            failed = False
            return result
        finally:
            _run_request_end(label, (), failed)

    return request


def _run_finished(out: object) -> int:
    """How many responses of a BatchGenerator step (a list, or a tuple of lists) finished."""
    parts = out if isinstance(out, tuple) else (out,)
    items = [r for part in parts for r in (part if isinstance(part, list) else [part])]
    return sum(1 for r in items if getattr(r, "finish_reason", None) is not None)


def _run_wrap_batch(fn: Callable[..., Any]) -> Callable[..., Any]:
    def _next(self: Any, *args: Any, **kwargs: Any) -> Any:
        stream = getattr(self, "_stream", None)
        streams = () if stream is None else (stream,)
        with _stuck_watch("BatchGenerator step"), _GpuTurn(streams):
            out = fn(self, *args, **kwargs)
            finished = _run_finished(out)
            label = _run.labels.get(id(getattr(self, "model", None)), "model")
            for _ in range(finished):
                _inference_flush_post(label, streams)
        if finished:
            _run_note_wait()
        return out

    return _next


def _run_wrap_batch_insert(fn: Callable[..., Any]) -> Callable[..., Any]:
    def insert(self: Any, *args: Any, **kwargs: Any) -> Any:
        local = _run_local()
        if getattr(local, "inserting", False):  # insert → insert_segments: one PRE
            return fn(self, *args, **kwargs)
        _inference_flush_pre(_run_first_generate(getattr(self, "model", None)))
        local.inserting = True
        try:
            return fn(self, *args, **kwargs)
        finally:
            local.inserting = False

    return insert


def _run_wrap_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    def _generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        local = _run_local()
        # the loop steps back to back and waits only in _next_request: a turn may span steps
        waits = getattr(type(self), "_next_request", None)
        local.keep = getattr(waits, _RUN_MARK, None) is not None
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:
            _run_end_kept_turn()
            if getattr(self, "_stop", False):
                raise
            text = f"mlx_lm.server generation thread died: {type(exc).__name__}: {_label(exc)}"
            _breadcrumb(f"RUN_GENERATION_DEAD: {text}")
            _run_say(f"{text}; exiting with {_EXIT_GENERATION_DEAD}")
            _run_at_exit()
            _run_say(None)
            os._exit(_EXIT_GENERATION_DEAD)
        finally:
            local.keep = False
            _run_end_kept_turn()

    return _generate


def _run_wrap_idle(fn: Callable[..., Any]) -> Callable[..., Any]:
    def _next_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        if (args[0] if args else kwargs.get("timeout")) is not None:
            _run_end_kept_turn()  # about to block: the GPU is free for others meanwhile
        return fn(self, *args, **kwargs)

    return _next_request


_RUN_WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any] | None]] = {
    "load": _run_wrap_load,
    "step": _run_wrap_step,
    "request": _run_wrap_request,
    "batch": _run_wrap_batch,
    "batch-insert": _run_wrap_batch_insert,
    "thread": _run_wrap_thread,
    "idle": _run_wrap_idle,
}


def _run_hook_package(name: str, cls: type | None = None) -> None:
    """Apply the hooks of ``name``'s modules (with ``cls``: those of that class of module
    ``name`` run as ``__main__``); name once what this version lacks."""
    import importlib
    import types

    top = name.split(".")[0]
    modules = _RUN_REBIND.get(name, (name,))
    dist = "mlx-lm" if top == "mlx_lm" else "mlx-vlm"
    version = _label(getattr(sys.modules.get(top), "__version__", "unknown"))
    missing: list[str] = []
    swapped: dict[int, Callable[..., Any]] = {}  # id(original) → wrapper
    for module_name, path, kind, versions in _RUN_HOOKS:
        if module_name not in modules:
            continue
        try:
            expected = _spec_matches(versions, version)
        except ValueError:  # a version we cannot read: every hook is expected
            expected = True
        if kind == "step" and not _env_bool("METALGUARD_RUN_GPU_GATE", True):
            continue  # the batch hook stays: it also flushes each finished request
        if cls is not None and not path.startswith(cls.__name__ + "."):
            continue
        try:
            module: Any = (
                importlib.import_module(module_name)
                if cls is None
                else types.SimpleNamespace(**{cls.__name__: cls})
            )
        except Exception:
            missing += [f"{module_name}.{path}"] if expected else []
            continue
        *owners, attr = path.split(".")
        owner: Any = module
        for part in owners:
            owner = getattr(owner, part, None)
        current = getattr(owner, attr, None) if owner is not None else None
        if not callable(current):
            missing += [f"{module_name}.{path}"] if expected else []
            continue
        if getattr(current, _RUN_MARK, None) is not None:
            continue  # hooked already
        wrapper = _RUN_WRAPPERS[kind](current)
        if wrapper is None:
            missing += [f"{module_name}.{path}"] if expected else []
            continue
        wrapper.__name__ = getattr(current, "__name__", attr)
        wrapper.__doc__ = getattr(current, "__doc__", None)
        wrapper.__wrapped__ = current  # type: ignore[attr-defined]
        setattr(wrapper, _RUN_MARK, current)
        setattr(owner, attr, wrapper)
        if not owners:
            swapped[id(current)] = wrapper
    # names bound by ``from .utils import load`` before we came: point them at the hooks
    holders = [m for n, m in list(sys.modules.items()) if n == top or n.startswith(top + ".")]
    for module in holders if swapped else []:
        for key, value in list(vars(module).items()) if module is not None else []:
            if id(value) in swapped and getattr(value, _RUN_MARK, None) is None:
                setattr(module, key, swapped[id(value)])
    if missing and _first_time("run-missing:" + name):
        _run_say(f"{dist} {version}: not hooked (not found in this version): " + ", ".join(missing))


def _run_at_exit() -> None:
    """Drain the streams, clear MLX's cache and record the unloads (atexit; never raises)."""
    try:
        mx = sys.modules.get("mlx.core")
        if mx is not None:
            _synchronize(mx, level=_DEBUG)
            _mlx_step("clear_cache (exit)", _mlx_fn(mx, "clear_cache"), level=_DEBUG)
        for key, model_id in list(_run.live.items()):
            _run.live.pop(key, None)
            _run.unloads.append((model_id, time.time()))
        _run_record_unloads()
        _run_note_wait(force=True)
    except Exception as exc:
        _log().warning("metal_guard: exit cleanup incomplete: %r", exc)


# =============================================================================
# 5.14 Program start — which commands run Python, the bootstrap ``sitecustomize``
# and the environment a program under ``metal-guard run`` starts with.
#
# A Python program (an interpreter, or a script whose ``#!`` line names one)
# starts with a bootstrap folder first on ``PYTHONPATH``: its ``sitecustomize``
# runs the user's own, then loads this very file (``METALGUARD_RUN_MODULE``) and
# calls ``_child_bootstrap``. The folder is named after its content and never
# deleted (a program's subprocesses may outlive run); the user's ``PYTHONPATH``
# follows it unchanged.
#
# Provides: _RUN_SITECUSTOMIZE, _RunOptions, _command_models, _python_interpreter,
#   _python_skips_site, _run_bootstrap_folder, _run_child_env
# Uses: Prelude, Files, Runs registry, Child state
# =============================================================================

# The bootstrap folder's only file. Python runs it at start-up because the folder
# is first on PYTHONPATH; the program's own subprocesses inherit the variable.
_RUN_SITECUSTOMIZE = r'''"""Written by `metal-guard run` (rewritten when it differs): runs the sitecustomize
that would have run without this folder, then installs metal-guard's guards."""


def _report(exc):
    import sys

    if sys.flags.verbose:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    else:  # as Python's site module reports a failing sitecustomize
        sys.stderr.write(
            "Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
            f"{type(exc).__name__}: {exc}\n"
        )


def _metal_guard_run_bootstrap():
    import os
    import sys

    folder = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if not p or os.path.abspath(p) != folder]
    this = sys.modules.pop("sitecustomize", None)
    try:
        import sitecustomize  # noqa: F401 - the user's own, if there is one
    except ImportError as exc:
        if exc.name != "sitecustomize":
            _report(exc)
    except Exception as exc:
        _report(exc)
    if this is not None:  # none of the user's: the import system expects this module back
        sys.modules.setdefault("sitecustomize", this)
    try:
        path = os.environ["METALGUARD_RUN_MODULE"]
        module = sys.modules.get("metal_guard")
        if module is None or os.path.abspath(getattr(module, "__file__", None) or "") != path:
            # importlib.machinery, not importlib.util: the latter costs ~5 ms more to import
            from importlib.machinery import ModuleSpec, SourceFileLoader

            loader = SourceFileLoader("metal_guard", path)
            spec = ModuleSpec("metal_guard", loader, origin=path)
            spec.has_location = True
            module = type(sys)("metal_guard")
            module.__file__, module.__loader__, module.__spec__ = path, loader, spec
            sys.modules["metal_guard"] = module
            try:
                loader.exec_module(module)
            except BaseException:
                sys.modules.pop("metal_guard", None)
                raise
        module._child_bootstrap()
    except Exception as exc:
        sys.stderr.write(f"metal-guard: guards not installed: {type(exc).__name__}: {exc}\n")


_metal_guard_run_bootstrap()
'''


@_dataclass(frozen=True)
class _RunOptions:
    """``metal-guard run``'s options (checked by the command line)."""

    grace: float = 30.0
    restart: str = "never"
    max_restarts: int = 3
    restart_window: float = 600.0
    restart_delay: float | None = None  # None: the cadence's same-model interval
    wired: str | None = None  # None: the child's METALGUARD_WIRED_LIMIT, else off
    wait: bool = True
    gpu_gate: bool = True


# -- what the command is -------------------------------------------------------------


def _is_python_name(name: str) -> bool:
    """``python``, ``python3``, ``python3.12`` (a free-threaded ``t`` build too)."""
    if not name.startswith("python"):
        return False
    rest = name[6:].removesuffix("t")
    return not rest or (rest[0].isdigit() and all(c.isdigit() or c == "." for c in rest))


def _shebang_words(path: str) -> list[str] | None:
    """The interpreter words of ``path``'s ``#!`` line (pip's ``/bin/sh`` trampoline
    for long paths included), or ``None``."""
    import shlex

    try:
        head = _read_bounded(path, 1024, follow_symlinks=True)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    lines = head[2:].decode("utf-8", "replace").splitlines()
    words = lines[0].split() if lines else []
    if words[:1] == ["/bin/sh"] and len(lines) > 1 and lines[1].startswith("'''exec' "):
        try:
            return shlex.split(lines[1])[1:2]
        except ValueError:
            return None
    if words and os.path.basename(words[0]) == "env":  # #!/usr/bin/env [-S] python3
        words = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    return words or None


def _python_interpreter(executable: str) -> tuple[str, list[str]] | None:
    """``(interpreter, its options)`` when ``executable`` runs Python, else ``None``.

    ``executable`` is a resolved path: an interpreter itself, or a script whose
    ``#!`` line names one (console scripts such as ``mlx_lm.server``).
    """
    import shutil

    if _is_python_name(os.path.basename(executable)):
        return executable, []
    words = _shebang_words(executable)
    if not words or not _is_python_name(os.path.basename(words[0])):
        return None
    found = words[0] if os.sep in words[0] else shutil.which(words[0])
    return (found, words[1:]) if found else None


def _python_skips_site(options: list[str]) -> str | None:
    """The interpreter option (``-I``, ``-E``, ``-S``) that keeps the bootstrap from running."""
    for word in options:
        if word in ("-c", "-m", "-", "--") or not word.startswith("-") or word.startswith("--"):
            break
        for letter in word[1:]:
            if letter in "IES":
                return f"-{letter}"
            if letter in "WXcm":  # the rest of the word is that option's value
                break
    return None


def _command_models(argv: list[str]) -> list[str]:
    """The values of ``--model X`` / ``--model=X`` in a command line."""
    models = []
    for i, word in enumerate(argv):
        if word == "--model" and i + 1 < len(argv):
            models.append(argv[i + 1])
        elif word.startswith("--model="):
            models.append(word[len("--model=") :])
    return [m for m in models if m.strip()]


# -- the child's environment -----------------------------------------------------------


def _run_bootstrap_folder() -> str:
    """The folder holding the bootstrap ``sitecustomize.py`` (written when missing or stale).

    It lives in the state folder, named after its content, and is never
    deleted: a program's own subprocesses may start long after run ended.
    """
    import zlib

    content = _RUN_SITECUSTOMIZE.encode("utf-8")
    folder = _state_file(f"run-bootstrap-{zlib.crc32(content):08x}")
    path = os.path.join(folder, "sitecustomize.py")
    try:
        current = _read_bounded(path, len(content) + 1)
    except OSError:
        current = b""
    if current != content:
        _atomic_write_bytes(path, content, durable=False)
    return folder


def _run_child_env(
    base: dict[str, str], bootstrap: str, options: _RunOptions, *, supervisor: int
) -> dict[str, str]:
    """``base`` plus the bootstrap folder first on ``PYTHONPATH`` and the ``METALGUARD_RUN_*``
    variables; the user's ``PYTHONPATH`` follows unchanged (a bootstrap folder inherited
    from an outer run is left out)."""
    env = dict(base)
    user = env.get("PYTHONPATH", "")
    outer = env.get("METALGUARD_RUN_BOOTSTRAP")
    if outer and user:
        user = os.pathsep.join(p for p in user.split(os.pathsep) if p != outer)
    env["PYTHONPATH"] = bootstrap + (os.pathsep + user if user else "")
    env.pop(_RUN_WIRED_ENV, None)  # an outer run's --wired is not this run's
    if options.wired is not None:
        env[_RUN_WIRED_ENV] = options.wired
    env.update(
        {
            _RUN_SUPERVISOR_ENV_VAR: str(supervisor),
            "METALGUARD_RUN_MODULE": os.path.abspath(__file__),
            "METALGUARD_RUN_BOOTSTRAP": bootstrap,
            "METALGUARD_RUN_WAIT": "1" if options.wait else "0",
            "METALGUARD_RUN_GPU_GATE": "1" if options.gpu_gate else "0",
        }
    )
    return env


# =============================================================================
# 5.15 Supervisor — ``metal-guard run``: pre-flight, signals passed on with a
# grace period, restarts and exit codes.
#
# A Python program starts as section 5.14 prepares it; any other program gets the
# pre-flight, supervision and a graceful stop only. Signal handlers only record the signal (a wake-up pipe
# ends the wait at once); the loop passes it on and stops the child through
# ``_stop_process`` (the grace, then SIGKILL with a WARNING). The child stays in
# run's process group, so job control and a terminal's Ctrl-C work as without run
# (Ctrl-C reaches the child from the terminal and is not sent a second time).
#
# Provides: _RUN_EXIT_GAVE_UP, _RUN_EXIT_REFUSED, _RUN_RESTART_POLICIES, _preflight_refusal,
#   _run_supervised
# Uses: Prelude, Processes, Locks, Registry, Version advisories, Cadence rules, Cadence,
#   Circuit breaker, Post-panic gate, Runs registry, System audits, Child state, Program start
# =============================================================================

_RUN_EXIT_REFUSED = 2  # pre-flight refused: the program was not started
_RUN_EXIT_GAVE_UP = 69  # EX_UNAVAILABLE: gave up restarting
_RUN_EXIT_CANNOT_EXECUTE, _RUN_EXIT_NOT_FOUND = 126, 127  # as a shell reports them
_RUN_RESTART_POLICIES = ("never", "on-failure", "always")
_RUN_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
_RUN_VERSIONS_TIMEOUT_SEC = 5.0
_RUN_VERSIONS_CODE = (
    "import importlib.metadata as m, json\nv = {}\nfor n in %r:\n    try:\n"
    "        v[n] = m.version(n)\n    except Exception:\n        pass\nprint(json.dumps(v))\n"
)


def _say(text: str) -> None:
    """One line of run's own on stderr (the child's output is never touched)."""
    try:
        sys.stderr.write(f"metal-guard run: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# -- pre-flight --------------------------------------------------------------------------


def _preflight_refusal() -> str | None:
    """Why the program may not start now (exit 2), or ``None``; before every start.

    Observer mode reports a cooldown instead of refusing (``_refuse``).
    """
    try:
        _require_post_panic_clear()  # one panic is enough (4.9); then the breaker's own rule
        CircuitBreaker().check()
    except MLXCooldownActive as exc:
        return str(exc)
    except (OSError, StateLockTimeout) as exc:
        _log().warning("metal_guard: run: the circuit breaker could not be checked: %s", exc)
    return None


def _interpreter_versions(interpreter: str) -> dict[str, str] | None:
    """Installed versions of the MLX stack for ``interpreter`` (package metadata only)."""
    import json

    names = tuple(sorted({package for package, _, _ in _VERSION_ADVISORIES}))
    if os.path.abspath(interpreter) == os.path.abspath(sys.executable):
        return {n: v for n in names if (v := _installed_version(n)) is not None}
    out = _run_bounded(
        [interpreter, "-c", _RUN_VERSIONS_CODE % (names,)], _RUN_VERSIONS_TIMEOUT_SEC
    )
    try:  # the last line: a sitecustomize may print too
        found = json.loads(out.strip().splitlines()[-1]) if out and out.strip() else None
    except ValueError:
        found = None
    if not isinstance(found, dict):
        return None
    return {str(k): str(v) for k, v in found.items()}


def _preflight_warnings(argv: list[str], interpreter: str | None) -> None:
    """Known-panic models named on the command line, the advisories of the child's MLX
    stack (critical ones by name) and the system audit's warnings; on stderr."""
    for model in _command_models(argv):
        try:
            warn_if_known_panic_model(model)
        except (TypeError, ValueError):
            pass
    if interpreter is not None:
        versions = _interpreter_versions(interpreter)
        if versions is None:
            _say(f"could not read the MLX versions installed for {interpreter}")
        else:
            found = check_version_advisories(packages=versions)
            for a in (a for a in found if a["severity"] == "critical"):
                _say(
                    f"CRITICAL advisory for {a['package']} {a['installed_version']} "
                    f"({interpreter}): {a['title']} ({a['url']}); {a['mitigation']}"
                )
            others = [a for a in found if a["severity"] != "critical"]
            if others:
                _say(
                    f"{len(others)} more advisory(ies) for the MLX stack of {interpreter} "
                    "(`metal-guard audit` run with that interpreter lists them)"
                )
    log_system_audit_at_startup()


# -- supervision ---------------------------------------------------------------------------


def _exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it: its code, or 128+N for signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _exit_text(code: int) -> str:
    import signal

    if code > 128:
        try:
            return f"died from {signal.Signals(code - 128).name} (exit {code})"
        except ValueError:
            pass
    return f"exited with code {code}"


class _Signals:
    """Stop signals recorded by handlers that do nothing else; a wake-up pipe (also
    written on SIGCHLD) ends a wait at once. A signal ignored when run started
    (``nohup``) stays ignored, for the child too."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.nudged = False  # SIGUSR1: a guarded child left a note (stuck GPU work)
        self._previous: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup = -1
        self._nudge: int | None = None

    def __enter__(self) -> _Signals:
        import signal

        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        try:
            self._old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: handlers cannot be set, waits poll
            os.close(read_fd)
            os.close(write_fd)
            return self
        self._pipe = (read_fd, write_fd)
        child = getattr(signal, "SIGCHLD", None)
        nudge = getattr(signal, "SIGUSR1", None)
        for name in (*_RUN_STOP_SIGNALS, "SIGCHLD", "SIGUSR1"):
            signum = getattr(signal, name, None)
            if signum is None or signal.getsignal(signum) == signal.SIG_IGN:
                continue
            self._previous[signum] = signal.signal(
                signum, (lambda *_: None) if signum == child else self._record
            )
        self._nudge = nudge
        return self

    def _record(self, signum: int, frame: object) -> None:
        if signum == self._nudge:
            self.nudged = True
        else:
            self.received.append(signum)

    def __exit__(self, *exc: object) -> None:
        import signal

        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def take(self) -> list[int]:
        """The signals recorded so far, oldest first (one ``pop`` at a time: a handler may
        run between any two bytecodes, and nothing it records is lost)."""
        taken = []
        while self.received:
            taken.append(self.received.pop(0))
        return taken

    def wait(self, proc: Any, seconds: float) -> None:
        """Until ``proc`` (if any) exits, a stop signal comes or ``seconds`` pass."""
        import select

        deadline = time.monotonic() + seconds
        while not self.received and not self.nudged and (proc is None or proc.poll() is None):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._pipe is None:
                time.sleep(min(left, 0.05))
                continue
            if select.select([self._pipe[0]], [], [], min(left, 1.0))[0]:
                try:
                    while os.read(self._pipe[0], 512):
                        pass
                except BlockingIOError:
                    pass


def _terminal_delivered(signum: int) -> bool:
    """Whether a terminal sent ``signum`` (Ctrl-C, hang-up) to the child too: run and the
    child are the foreground process group of a terminal."""
    import signal

    if signum not in (signal.SIGINT, getattr(signal, "SIGHUP", None)):
        return False
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
        except OSError:
            continue
    return False


class _Supervisor:
    """One ``metal-guard run``: starts, watches, stops and restarts the command."""

    def __init__(self, argv: list[str], options: _RunOptions) -> None:
        self.argv = argv
        self.options = options
        self.label = f"`{os.path.basename(argv[0])}`"
        self.signals = _Signals()
        self.stop: int | None = None
        self.since = time.time()

    def run(self) -> int:
        import shutil

        executable = shutil.which(self.argv[0])
        if executable is None:
            _say(f"{self.argv[0]}: command not found (or not executable)")
            return _RUN_EXIT_NOT_FOUND
        python = _python_interpreter(executable)
        env = None
        if python is None:
            _say(
                f"{self.label} is not a Python program: pre-flight, supervision and graceful "
                "stop only (no guards inside it)"
            )
        else:
            # an interpreter's own options come first on its command line; a script's, on its #!
            direct = python[0] == executable
            skipped = _python_skips_site(self.argv[1:] if direct else python[1])
            if skipped is not None:
                _say(f"{skipped} keeps Python from running the bootstrap: guards not installed")
            try:
                folder = _run_bootstrap_folder()
                env = _run_child_env(dict(os.environ), folder, self.options, supervisor=os.getpid())
            except OSError as exc:
                _say(f"cannot write the bootstrap folder ({exc}): the program runs unguarded")
        _preflight_warnings(self.argv, None if python is None else python[0])
        with self.signals:
            try:
                return self._loop(executable, env)
            finally:
                _run_forget()

    def _loop(self, executable: str, env: dict[str, str] | None) -> int:
        import subprocess

        restarts: list[float] = []
        while True:
            refusal = _preflight_refusal()
            if refusal is not None:
                _say(f"refused, {self.label} was not started: {refusal}")
                return _RUN_EXIT_REFUSED
            if self.signals.received:  # asked to stop before the program started
                self.stop = self.signals.take()[0]
                return 128 + self.stop
            try:
                proc = subprocess.Popen(self.argv, executable=executable, env=env)
            except OSError as exc:
                _say(f"cannot start {self.label}: {exc}")
                missing = isinstance(exc, FileNotFoundError)
                return _RUN_EXIT_NOT_FOUND if missing else _RUN_EXIT_CANNOT_EXECUTE
            _run_record(
                child_pid=proc.pid, argv=self.argv, restarts=len(restarts), since=self.since
            )
            code = self._watch(proc)
            if self.stop is not None:
                return code
            why_not = self._no_restart(code)
            if why_not is not None:
                if self.options.restart != "never":
                    _say(f"{self.label} {_exit_text(code)}; not restarted: {why_not}")
                return code
            now = time.monotonic()
            recent = [t for t in restarts if now - t < self.options.restart_window]
            if len(recent) >= self.options.max_restarts:
                _say(
                    f"gave up: {self.label} {_exit_text(code)} after {len(recent)} restart(s) "
                    f"within {_duration(self.options.restart_window)} (--max-restarts "
                    f"{self.options.max_restarts}); not restarting (exit {_RUN_EXIT_GAVE_UP})"
                )
                return _RUN_EXIT_GAVE_UP
            _run_record(child_pid=None, argv=self.argv, restarts=len(restarts), since=self.since)
            if not self._pause(code, len(recent) + 1):
                return 128 + (self.stop or 0)
            restarts.append(time.monotonic())

    def _no_restart(self, code: int) -> str | None:
        """Why the child is not restarted after exiting with ``code``, or ``None``."""
        policy = self.options.restart
        if policy == "never":
            return "--restart never"
        if code == _EXIT_GPU_STUCK:
            return (
                f"exit {_EXIT_GPU_STUCK} means stuck GPU work: reboot before running MLX again "
                "(wired memory may be stranded)"
            )
        if code == _RUN_EXIT_REFUSED:
            return "exit 2 means a guard refused (see its message)"
        if code == 0 and policy == "on-failure":
            return "it succeeded (--restart on-failure)"
        return None

    def _watch(self, proc: Any) -> int:
        """Wait for the child; a stop signal stops it gracefully, and so does stuck GPU
        work it reports (then the exit code is ``_EXIT_GPU_STUCK``). Its exit code."""
        while proc.poll() is None:
            self.signals.wait(proc, 3600.0)
            if self.signals.nudged:
                self.signals.nudged = False
                note = _run_stuck_note(proc.pid)
                if note is not None and proc.poll() is None:
                    return self._stop_stuck(proc, note)
            received = self.signals.take()
            if received and proc.poll() is None:
                self._stop_child(proc, received[0])
        return _exit_code(proc.returncode)

    def _stop_stuck(self, proc: Any, note: dict[str, Any]) -> int:
        """Stop a child whose GPU step is stuck: SIGTERM, the grace, SIGKILL last; never
        restarted (``_EXIT_GPU_STUCK``)."""
        _say(
            f"stuck GPU work: {self.label} (pid {proc.pid}) has been in `{note.get('step')}` "
            f"for {_duration(float(note.get('seconds') or 0.0))} (METALGUARD_STUCK_SEC); "
            f"stopping it (SIGTERM, then SIGKILL after {_duration(self.options.grace)}); "
            "not restarting it: reboot before running MLX again, wired memory may be stranded"
        )

        def wait(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while proc.poll() is None and deadline > time.monotonic():
                self.signals.wait(proc, deadline - time.monotonic())
                self.signals.nudged = False

        _stop_process(
            proc,
            grace=self.options.grace,
            why="its GPU work is stuck",
            what=f"{self.label} under metal-guard run",
            wait=wait,
        )
        return _EXIT_GPU_STUCK

    def _stop_child(self, proc: Any, signum: int) -> None:
        import signal

        self.stop = signum
        name = signal.Signals(signum).name
        grace = self.options.grace

        def wait(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while proc.poll() is None and deadline > time.monotonic():
                self.signals.wait(proc, deadline - time.monotonic())
                for again in self.signals.take():  # asked again: passed on again
                    if not _terminal_delivered(again):
                        proc.send_signal(again)

        delivered = _terminal_delivered(signum)
        _say(
            f"{name}: {'the terminal sent it to' if delivered else 'passed on to'} {self.label} "
            f"(pid {proc.pid}); waiting up to {_duration(grace)} for it to exit"
        )
        _stop_process(
            proc,
            grace=grace,
            why=f"metal-guard run received {name}",
            what=f"{self.label} under metal-guard run",
            wait=wait,
            signum=0 if delivered else signum,
            signal_name=name,
        )

    def _pause(self, code: int, attempt: int) -> bool:
        """The pause before restart ``attempt``: the delay, then the cadence of a model named
        on the command line. False when a stop signal came meanwhile."""
        guard = CadenceGuard(cross_model_interval_sec=_cross_model_interval())
        delay = self.options.restart_delay
        delay = guard.min_interval_sec if delay is None else delay
        _say(
            f"{self.label} {_exit_text(code)}; restart {attempt} of at most "
            f"{self.options.max_restarts} in {_duration(delay)}"
        )
        if not self._sleep(delay):
            return False
        for model in _command_models(self.argv)[:1]:
            while True:
                try:
                    guard.check(model)
                    break
                except CadenceViolation as exc:
                    _say(f"waiting {_duration(exc.remaining_sec)} for the cadence of {model}")
                    if not self._sleep(exc.remaining_sec + 0.05):
                        return False
                except (TypeError, ValueError):
                    break
        return True

    def _sleep(self, seconds: float) -> bool:
        """Sleep, unless a stop signal comes (then False)."""
        self.signals.wait(None, seconds)
        received = self.signals.take()
        if received:
            self.stop = received[0]
            return False
        return True


def _run_supervised(argv: list[str], options: _RunOptions) -> int:
    """Run ``argv`` under supervision (``metal-guard run``); the exit code run ends with."""
    if not argv or not all(isinstance(word, str) for word in argv):
        raise TypeError("argv must be a non-empty list of str")
    if not isinstance(options, _RunOptions):
        raise TypeError(f"options must be _RunOptions, not {type(options).__name__}")
    return _Supervisor(list(argv), options).run()


# =============================================================================
# 6.1 Command line — the ``metal-guard`` parser and output helpers.
#
# Exit codes: 0 go, 2 blocked/refused (``check``: breaker cooldown, cadence, a
# known panic model with --refuse-known), 1 error, 64 usage error (argparse's own
# 2 would read as "blocked" to a shell wrapper). Every command takes --json and
# then prints exactly one JSON document on stdout, usage errors included.
#
# Provides: argparse, _CLIError, _CLIResult, _EXIT_BLOCKED, _EXIT_ERROR, _EXIT_GO, _EXIT_USAGE,
#   _UsageError, _ago, _cli_parser, _fault_message, _pairs, _require_state_folder, _show, _table,
#   _unreadable_state, _unreadable_text
# Uses: Prelude, Files, Breadcrumbs, Model identity, Cadence rules, Cadence, Circuit breaker,
#   Wired-limit control, Supervisor
# =============================================================================

if TYPE_CHECKING:  # pragma: no cover - typing only
    import argparse

    _CLIResult = tuple[int, dict[str, Any], list[str]]

_EXIT_GO, _EXIT_ERROR, _EXIT_BLOCKED, _EXIT_USAGE = 0, 1, 2, 64


class _CLIError(Exception):
    """A command failed in a way the user should read (no traceback)."""

    def __init__(self, message: str, code: int = _EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


class _UsageError(Exception):
    """A usage error found by ``parser`` (exit 64); ``main`` reports it."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


def _cli_arg(text: str, check: Callable[[str], _T], what: str) -> _T:
    """argparse ``type=``: the library's own checks, their errors as usage errors."""
    import argparse

    try:
        return check(text.strip())
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}: {exc}") from None


def _nonnegative_seconds(text: str) -> float:
    return _cli_arg(
        text,
        lambda t: _seconds_arg("seconds", float(t), maximum=_INTERVAL_MAX),
        "a number of seconds >= 0",
    )


def _nonnegative_hours(text: str) -> float:
    return _cli_arg(
        text,
        lambda t: _seconds_arg("hours", float(t), maximum=1e6, unit="h"),
        "a number of hours >= 0",
    )


def _whole_number(maximum: int) -> Callable[[str], int]:
    """argparse ``type=`` for a count 0..``maximum``."""

    def check(t: str) -> int:
        count = int(t, 10)
        if not 0 <= count <= maximum:
            raise ValueError("out of range")
        return count

    return lambda text: _cli_arg(text, check, f"a whole number 0..{maximum}")


_line_count = _whole_number(1_000_000)


def _exit_codes(codes: str, error: str = "1 error") -> str:
    """A subcommand's help epilog: its exit codes (``codes`` for 0 and 2, then 1 and 64)."""
    return f"Exit codes: {codes}, {error}, 64 usage error."


def _model_arg(text: str) -> str:
    import argparse

    try:
        return canonical_model_id(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cli_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``metal-guard`` parser and its subcommand parsers by name."""
    import argparse

    class Parser(argparse.ArgumentParser):
        """Usage errors exit 64 (EX_USAGE) with the usage line, never a traceback."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("allow_abbrev", False)  # "--js" is a usage error, not --json
            super().__init__(*args, **kwargs)

        def error(self, message: str) -> NoReturn:
            raise _UsageError(self, message)

    parser = Parser(
        prog="metal-guard",
        description="Guards for MLX on Apple Silicon: pre-flight checks, the panic circuit "
        "breaker, cadence and forensics.",
        epilog="Exit codes: 0 go, 2 blocked/refused, 1 error, 64 usage error. "
        "State folder: $METALGUARD_HOME (default ~/.cache/metal-guard).",
    )
    parser.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    json_flag = Parser(add_help=False)
    json_flag.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document"
    )
    intervals = Parser(add_help=False)
    intervals.add_argument(
        "--min-interval",
        type=_nonnegative_seconds,
        default=180.0,
        metavar="S",
        help="same-model interval in seconds (default 180)",
    )
    intervals.add_argument(
        "--cross-model-interval",
        type=_nonnegative_seconds,
        default=0.0,
        metavar="S",
        help="cross-model interval in seconds (default: $METALGUARD_CROSS_MODEL_INTERVAL, "
        "else 0; gemma-4 models always get at least 90)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(
        name: str, summary: str, codes: str = "0 shown", error: str = "1 error", **kwargs: Any
    ) -> Any:
        """A subcommand whose --help opens with ``summary`` and ends with its exit codes."""
        description = summary[0].upper() + summary[1:] + "."
        epilog = _exit_codes(codes, error)
        return commands.add_parser(
            name, help=summary, description=description, epilog=epilog, **kwargs
        )

    status = command(
        "status",
        "version, MLX, state, cadence, breaker, recent panics (never writes)",
        parents=[json_flag],
    )
    status.add_argument(
        "--device",
        action="store_true",
        help="also import mlx.core to show the device (initialises Metal: avoid during a cooldown)",
    )
    check = command(
        "check",
        "pre-flight for a model load: advisory, breaker, cadence (exit 0 go, 2 blocked)",
        "0 go, 2 blocked (breaker cooldown, a recent kernel panic, cadence, --refuse-known)",
        "1 error (a state file is unreadable, or --admit could not record the load)",
        parents=[json_flag, intervals],
    )
    check.add_argument("model", type=_model_arg, metavar="MODEL", help="repo id or local path")
    check.add_argument("--admit", action="store_true", help="record the load when it may go")
    check.add_argument(
        "--wait",
        nargs="?",
        const=True,
        default=False,
        type=_nonnegative_seconds,
        metavar="SEC",
        help="with --admit: wait for the cadence instead of exiting 2 (at most the interval, "
        "or at most SEC seconds with --wait=SEC)",
    )
    check.add_argument(
        "--refuse-known",
        action="store_true",
        help="exit 2 for a model in the known-panic registry (default: advisory, exit 0)",
    )
    panics = command(
        "panics",
        "kernel-panic reports (or the archive), newest last",
        "0 shown",
        "1 error (no such --dir folder)",
        parents=[json_flag],
    )
    panics.add_argument("--dir", metavar="D", help="report folder (default: the system's)")
    panics.add_argument(
        "--since", type=_nonnegative_hours, metavar="HOURS", help="only the last HOURS hours"
    )
    panics.add_argument(
        "--archive", action="store_true", help="show the archive (panics.jsonl) instead"
    )
    breaker = command(
        "breaker",
        "the circuit breaker that refuses MLX work after repeated IOGPU kernel panics",
        "0 shown or cleared",
        parents=[json_flag],
    )
    breaker.add_argument(
        "action",
        nargs="?",
        choices=("status", "clear"),
        default="status",
        help="status (default): the state, recent panics, whether a cooldown runs; "
        "clear: end a cooldown and forget the panics seen so far",
    )
    cadence = command(
        "cadence",
        "recent model loads and what the cadence blocks now",
        "0 shown or cleared (show exits 0 even when blocked: use check)",
        parents=[json_flag, intervals],
    )
    cadence.add_argument(
        "action",
        nargs="?",
        choices=("show", "clear"),
        default="show",
        help="show (default): loads, unloads and what is blocked; clear: forget them",
    )
    cadence.add_argument(
        "model",
        nargs="?",
        type=_model_arg,
        metavar="MODEL",
        help="show whether this model may load now (with clear: forget only this model)",
    )
    command("lock", "who holds the MLX lock and the GPU gate, since when", parents=[json_flag])
    models = command("models", "the registry of known panic models", parents=[json_flag])
    models.add_argument("model", nargs="?", metavar="MODEL", help="look up one model")
    crumbs = command("breadcrumbs", "the last breadcrumb lines", parents=[json_flag])
    crumbs.add_argument("-n", type=_line_count, default=20, metavar="N", help="lines (default 20)")
    command(
        "audit",
        "system audit: wired limit, GPU driver, MLX settings, advisories for the installed "
        "MLX stack, wired-limit policy (never imports MLX)",
        parents=[json_flag],
    )
    command(
        "diagnose",
        "after a kernel panic: what happened, the likely trigger, what to do next",
        parents=[json_flag],
    )
    ack = command(
        "ack",
        "acknowledge the panics so far: lifts the post-panic lockout",
        "0 acknowledged",
        parents=[json_flag],
    )
    ack.add_argument("--note", metavar="TEXT", help="a note kept with the acknowledgement")
    postmortem = command(
        "postmortem",
        "write one archive for a bug report (home folder and user name removed)",
        "0 written",
        "1 error (the archive could not be written)",
        parents=[json_flag],
    )
    postmortem.add_argument(
        "-o", "--output", metavar="PATH", help="archive path (.tar.gz, or .zip); default: here"
    )
    _add_run_parser(commands)
    return parser, dict(commands.choices)


# -- run ---------------------------------------------------------------------------

_RUN_EXIT_CODES = (
    "Exit codes: 0 or the program's own code when it exits; 128+N when it died from signal N; "
    f"{_RUN_EXIT_REFUSED} pre-flight refused (the program was not started); "
    f"{_RUN_EXIT_GAVE_UP} gave up restarting (--max-restarts within --restart-window); "
    "64 usage error; 1 error of run itself; 126/127 the command cannot be run / was not found. "
    "The program's exit codes 2 (a guard refused) and 71 (stuck GPU work) are never restarted."
)


def _positive_seconds(text: str) -> float:
    return _cli_arg(
        text,
        lambda t: _seconds_arg("seconds", float(t), maximum=_INTERVAL_MAX, allow_zero=False),
        "a number of seconds > 0",
    )


def _restart_delay(text: str) -> float:
    def check(t: str) -> float:
        seconds = _seconds_arg("seconds", float(t), maximum=_INTERVAL_MAX)
        if seconds < 0.5:
            raise ValueError("less than 0.5 s would restart in a tight loop")
        return seconds

    return _cli_arg(text, check, "a number of seconds >= 0.5")


def _run_wired_arg(text: str) -> str:
    return _cli_arg(
        text,
        lambda t: "keep" if t.lower() == "keep" else _parse_wired_policy(t)[0],
        "off, cap, cap:<GiB> or keep",
    )


def _add_run_parser(commands: Any) -> None:
    """``metal-guard run [options] -- COMMAND [ARGS...]`` (the work is section 5.13's)."""
    import argparse

    run = commands.add_parser(
        "run",
        help="run a program guarded: pre-flight, graceful stop, restarts, guards inside Python",
        description="Run COMMAND under supervision: pre-flight (breaker, known-panic models, "
        "advisories, audit), signals passed on with a grace period (SIGKILL only after it), "
        "restarts; a Python program also gets the guards inside it.",
        epilog=_RUN_EXIT_CODES,
        usage="metal-guard run [options] -- COMMAND [ARGS...]",
    )
    run.add_argument(
        "--grace",
        type=_positive_seconds,
        default=30.0,
        metavar="SEC",
        help="after passing a stop signal on, wait this long before SIGKILL (default 30)",
    )
    run.add_argument(
        "--restart",
        choices=_RUN_RESTART_POLICIES,
        default="never",
        help="restart the program when it exits (default never)",
    )
    run.add_argument(
        "--max-restarts",
        type=_whole_number(1000),
        default=3,
        metavar="N",
        help=f"give up (exit {_RUN_EXIT_GAVE_UP}) after N restarts within --restart-window "
        "(default 3)",
    )
    run.add_argument(
        "--restart-window",
        type=_positive_seconds,
        default=600.0,
        metavar="SEC",
        help="the window --max-restarts counts in (default 600)",
    )
    run.add_argument(
        "--restart-delay",
        type=_restart_delay,
        default=None,
        metavar="SEC",
        help="pause before a restart (default: the cadence's same-model interval, 180 s; a "
        "model named by --model in the command also waits for its cadence)",
    )
    run.add_argument(
        "--wired",
        type=_run_wired_arg,
        default=None,
        metavar="POLICY",
        help="wired-limit policy inside a Python program: off, cap, cap:<GiB>, keep (default: "
        "METALGUARD_WIRED_LIMIT when set, else off)",
    )
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="a model load that comes too soon is refused (the program exits 2) instead of waiting",
    )
    run.add_argument(
        "--no-gpu-gate", action="store_true", help="do not serialise GPU work across programs"
    )
    run.add_argument(
        "program", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="the program"
    )


# -- output helpers ------------------------------------------------------------


def _show(value: object) -> str:
    """One table cell: ``-`` for nothing, control characters escaped."""
    if value is None or value == "":
        return "-"
    return _escape_line(str(value))


def _table(headers: list[str], rows: list[list[object]], indent: str = "  ") -> list[str]:
    """Plain aligned columns (the last one is not padded)."""
    cells = [[_show(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        padded = [v.ljust(w) for v, w in zip(values[:-1], widths[:-1], strict=False)] + [values[-1]]
        return (indent + "  ".join(padded)).rstrip()

    return [line(headers)] + [line(r) for r in cells]


def _pairs(items: list[tuple[str, object]], indent: str = "  ") -> list[str]:
    """``key   value`` lines with the values aligned."""
    width = max((len(k) for k, _ in items), default=0)
    return [f"{indent}{k.ljust(width)}  {_show(v)}".rstrip() for k, v in items]


def _ago(ts: float | None, now: float) -> str:
    return "-" if ts is None else f"{_duration(now - ts)} ago" if ts <= now else "in the future"


# -- faults -------------------------------------------------------------------------


def _require_state_folder() -> None:
    """For commands that write state: a file where the state folder should be is the
    error ``_ensure_dir`` raises, without creating the folder."""
    home = _state_home()
    if os.path.lexists(home) and not os.path.isdir(home):
        raise NotADirectoryError(errno.ENOTDIR, "state folder is not a directory", home)


def _fault_message(exc: BaseException) -> str:
    """The one wording of an environment fault, whichever command met it."""
    if isinstance(exc, CadenceStoreError):
        cause = exc.__cause__
        if not isinstance(cause, OSError) or cause.filename is None:
            return f"cannot use {exc.path}: {exc.reason}"
        exc = cause
    if not isinstance(exc, OSError) or exc.filename is None:
        return f"{type(exc).__name__}: {exc}"
    path = os.fspath(exc.filename)
    text = f"cannot use {path}: {exc.strerror or exc}"
    if exc.errno == errno.ENOTDIR and path == _state_home():
        text += " (METALGUARD_HOME must name a folder: move the file aside or point it elsewhere)"
    return text


_UNREADABLE_FIX = {
    "breaker.json": "move it aside or run `metal-guard breaker clear`",
    "cadence.json": "move it aside or run `metal-guard cadence clear`",
}


def _unreadable_state(guard: CadenceGuard, now: float) -> dict[str, dict[str, str]]:
    """State files ``check`` cannot read (the reading ``status`` shows), by file name."""
    breaker = CircuitBreaker().status(now=now)
    found = {
        "breaker.json": (breaker["state_path"], breaker["state_problem"]),
        "cadence.json": (guard.path, guard.status(now=now)["problem"]),
    }
    return {
        name: {"path": path, "problem": problem, "what_to_do": _UNREADABLE_FIX[name]}
        for name, (path, problem) in found.items()
        if problem is not None
    }


def _unreadable_text(unreadable: dict[str, dict[str, str]], name: str, otherwise: str) -> str:
    """``check``'s line for state file ``name``: what it cannot read and what to do, if so."""
    if name not in unreadable:
        return otherwise
    entry = unreadable[name]
    said = (
        entry["problem"]
        if entry["path"] in entry["problem"]
        else f"{entry['path']}: {entry['problem']}"
    )
    return f"unreadable: {said}; {entry['what_to_do']}"


# =============================================================================
# 6.2 Commands — each subcommand calls public functions; wiring only.
#
# Showing state never writes it: only ``check`` (which archives new panic
# reports, like ``CircuitBreaker.check``), ``check --admit``, ``breaker clear``
# and ``cadence clear`` change files.
#
# Provides: _cmd_audit, _cmd_breadcrumbs, _cmd_breaker, _cmd_cadence, _cmd_lock,
#   _cmd_models, _cmd_panics, _cmd_run, _cmd_status
# Uses: Prelude, Processes, Files, Breadcrumbs, MLX access, Registry, Panic signatures,
#   Panic reports, Version advisories, Cadence rules, Modes (L6), Cadence, Panic archive,
#   Circuit breaker, MLX lock (L8), GPU gate, Runs registry, Wired-limit control,
#   System audits, MetalGuard, Program start, Supervisor, Command line
# =============================================================================

# -- commands -------------------------------------------------------------------


def _breaker() -> CircuitBreaker:
    return CircuitBreaker()


def _cadence_guard(args: argparse.Namespace) -> CadenceGuard:
    return _default_guard(
        getattr(args, "min_interval", 180.0), getattr(args, "cross_model_interval", 0.0)
    )


def _mlx_info(*, probe_device: bool) -> dict[str, Any]:
    """MLX presence and version from package metadata; the device only when asked.

    Importing ``mlx.core`` initialises Metal, which is exactly what a status
    check right after a panic (during a cooldown) should not do; so the
    device is probed only with ``probe_device`` (``status --device``).
    """
    import importlib.util

    info: dict[str, Any] = {
        "installed": False,
        "version": _installed_version("mlx"),
        "default_device": None,
        "device_info": None,
        "device_probed": probe_device,
    }
    try:
        info["installed"] = importlib.util.find_spec("mlx.core") is not None
    except Exception:  # a broken install: find_spec imports the parent package
        pass
    mx = _mlx() if probe_device else None
    if mx is None:
        return info
    info["installed"] = True
    version = getattr(mx, "__version__", None)
    info["version"] = version if isinstance(version, str) else info["version"]
    try:
        info["default_device"] = str(mx.default_device())
    except Exception as exc:
        _log().debug("metal_guard: mx.default_device() failed: %r", exc)
    device_info = _mlx_fn(mx, "device_info")
    if device_info is not None:
        try:
            value = device_info()
            if isinstance(value, dict):
                info["device_info"] = {str(k): v for k, v in value.items()}
        except Exception as exc:
            _log().debug("metal_guard: device_info() failed: %r", exc)
    return info


def _panic_rows(records: list[dict[str, Any]]) -> list[list[object]]:
    return [
        [
            _local_time(r["ts"]),
            r.get("signature") or "unknown",
            r.get("location"),
            r.get("pid"),
            r.get("process"),
            r.get("os_build"),
            r.get("iogpu_version"),
            os.path.basename(str(r.get("source_file") or "")),
        ]
        for r in records
    ]


_PANIC_HEADERS = ["TIME", "SIGNATURE", "AT", "PID", "PROCESS", "OS", "IOGPU", "FILE"]


def _breaker_lines(doc: dict[str, Any], now: float) -> list[str]:
    if doc["cooling_down"]:
        state = (
            f"COOLING DOWN until {_local_time(doc['cooldown_until'])} "
            f"({_duration(doc['remaining_sec'])} left)"
        )
    elif doc["would_trip"]:
        state = "armed; the next check trips it"
    else:
        state = "armed (clear)"
    items: list[tuple[str, object]] = [
        ("state", state),
        (
            "IOGPU panics",
            f"{doc['panics_in_window']} in the last {_duration(doc['window_sec'])} "
            f"(trips at {doc['panic_threshold']}, cooldown {_duration(doc['cooldown_sec'])})",
        ),
    ]
    if doc["tripped_at"] is not None:
        items.append(
            ("last trip", f"{_local_time(doc['tripped_at'])} ({_ago(doc['tripped_at'], now)})")
        )
    if doc["cleared_at"] is not None:
        items.append(
            ("last clear", f"{_local_time(doc['cleared_at'])} ({_ago(doc['cleared_at'], now)})")
        )
    items += [
        ("archive", f"{doc['jsonl_path']} ({doc['archived_panics']} records)"),
        ("state file", doc["state_path"]),
        ("reports", doc["report_dir"]),
    ]
    if doc["problem"]:
        items.append(("problem", doc["problem"]))
    return _pairs(items)


def _cadence_lines(doc: dict[str, Any], now: float) -> list[str]:
    lines = _pairs(
        [
            ("store", doc["path"]),
            (
                "intervals",
                f"same model {doc['min_interval_sec']:g} s, cross-model "
                f"{doc['cross_model_interval_sec']:g} s, gemma-4 cross-model "
                f"{doc['gemma4_cross_model_interval_sec']:g} s",
            ),
        ]
    )
    if doc.get("problem"):
        lines += _pairs([("problem", doc["problem"])])
    events = doc["events"]
    if not events:
        return [*lines, "  no recent model loads: nothing is blocked"]
    rows = [
        [
            e["model_id"],
            _local_time(e["last_event"]),
            _ago(e["last_event"], now),
            e["pid"],
            _duration(e["same_model_blocked_sec"]) if e["same_model_blocked_sec"] > 0 else "no",
        ]
        for e in events[:10]
    ]
    lines += _table(["MODEL", "LAST LOAD/UNLOAD", "AGE", "PID", "SAME MODEL BLOCKED"], rows)
    other, gemma = doc["other_models_blocked_sec"], doc["gemma4_models_blocked_sec"]
    lines.append(
        "  other models: "
        + (f"blocked for {_duration(other)}" if other > 0 else "not blocked")
        + "; gemma-4 models: "
        + (f"blocked for {_duration(gemma)}" if gemma > 0 else "not blocked")
    )
    return lines


def _locks_doc() -> dict[str, Any]:
    """Holders of the MLX lock and the GPU gate (``None`` when free), with their paths."""
    return {
        "mode": describe_mode(),
        "mlx_lock": {"path": _mlx_lock_path(), "holder": read_mlx_lock()},
        "gpu_gate": {"path": _gpu_lock_path(), "holder": read_gpu_gate()},
    }


def _lock_lines(doc: dict[str, Any], now: float) -> list[str]:
    items: list[tuple[str, object]] = []
    for key, name in (("mlx_lock", "MLX lock"), ("gpu_gate", "GPU gate")):
        holder = doc[key]["holder"]
        if holder is None:
            items.append((name, f"free ({doc[key]['path']})"))
            continue
        since = _number(holder.get("since"))
        ago = f" ({_ago(since, now)})" if since is not None else ""
        items.append((name, f"held by {_describe_holder(holder)}{ago}"))
        items.append(("  command line", holder.get("cmdline")))
        items.append(("  lock file", doc[key]["path"]))
    items.append(("mode", f"{doc['mode']['mode']} ({doc['mode']['env_var']})"))
    return _pairs(items)


def _cmd_lock(args: argparse.Namespace) -> _CLIResult:
    doc = _locks_doc()
    return _EXIT_GO, doc, ["Locks", *_lock_lines(doc, time.time())]


def _folder_note(path: str) -> str:
    if os.path.isdir(path):
        return ""
    if os.path.lexists(path):
        return " (NOT a folder: something else is in its place; state cannot be kept)"
    return " (not created yet)"


def _cmd_status(args: argparse.Namespace) -> _CLIResult:
    import platform

    now = time.time()
    home = _state_home()
    mlx = _mlx_info(probe_device=bool(getattr(args, "device", False)))
    cadence = _cadence_guard(args).status(now=now)
    breaker = _breaker().status(now=now)
    locks = _locks_doc()
    runs = _read_runs()
    doc: dict[str, Any] = {
        "version": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mlx": mlx,
        "state_folder": home,
        "state_folder_exists": os.path.isdir(home),
        "state_folder_note": _folder_note(home).strip(" ()") or None,
        "module_file": __file__,
        "shadowed_by": _other_metal_guard(),
        "cadence": cadence,
        "breaker": breaker,
        "recent_panics": breaker["recent_panics"],
        **locks,
        "runs": runs,
    }
    if mlx["installed"] and mlx["device_probed"]:
        device = mlx["device_info"] or {}
        detail = ", ".join(f"{k}={v}" for k, v in list(device.items())[:4])
        mlx_text = f"{mlx['version'] or '?'} (device {mlx['default_device'] or '?'}"
        mlx_text += f"; {detail})" if detail else ")"
    elif mlx["installed"]:
        mlx_text = f"{mlx['version'] or '?'} (device not probed; --device imports mlx.core)"
    else:
        mlx_text = "not installed (every MLX step is a no-op)"
    lines = [f"metal-guard {__version__}"]
    lines += _pairs(
        [
            ("python", f"{doc['python']} ({sys.executable})"),
            ("platform", doc["platform"]),
            ("MLX", mlx_text),
            ("state folder", home + _folder_note(home)),
            ("imported from", __file__),
        ]
    )
    lines += [f"  ! {text}" for text in doc["shadowed_by"]]
    lines += ["", "Locks", *_lock_lines(locks, now)]
    lines += ["", "Cadence", *_cadence_lines(cadence, now), "", "Circuit breaker"]
    lines += _breaker_lines(breaker, now)
    lines += ["", "Recent panics"]
    recent = breaker["recent_panics"][-5:]
    lines += _table(_PANIC_HEADERS, _panic_rows(recent)) if recent else ["  none found"]
    lines += ["", "Programs under `metal-guard run` on this host", *_runs_lines(runs, now)]
    return _EXIT_GO, doc, lines


def _cmd_panics(args: argparse.Namespace) -> _CLIResult:
    now = time.time()
    since_ts = None if args.since is None else now - args.since * 3600.0
    if args.archive:
        path = _archive_path(None)
        records = read_panic_archive(path)
        if since_ts is not None:
            records = [r for r in records if r["ts"] >= since_ts]
        where = f"archive {path}"
        doc: dict[str, Any] = {"archive": path, "since_ts": since_ts, "panics": records}
    else:
        folder = _report_dir(args.dir)
        if args.dir is not None and not os.path.isdir(folder):
            raise _CLIError(f"no such folder: {folder}")
        records = parse_panic_reports(folder, since_ts=since_ts)
        where = folder
        doc = {"report_dir": folder, "since_ts": since_ts, "panics": records}
    span = "" if args.since is None else f" in the last {args.since:g} h"
    lines = [f"{len(records)} panic report(s){span} in {where}"]
    if records:
        lines += _table(_PANIC_HEADERS, _panic_rows(records))
        counted = sum(1 for r in records if _signature_kind(r.get("signature")) == _IOGPU)
        verb = "is an IOGPU kernel panic" if counted == 1 else "are IOGPU kernel panics"
        lines.append(f"  {counted} of them {verb} (the circuit breaker counts these)")
    return _EXIT_GO, doc, lines


def _cmd_breaker(args: argparse.Namespace) -> _CLIResult:
    breaker = _breaker()
    now = time.time()
    if args.action == "clear":
        _require_state_folder()
        was_active = breaker.clear()
        doc = {"cleared": True, "was_cooling_down": was_active, "state_path": breaker.state_path}
        message = "circuit breaker cleared" + (
            " (a cooldown was running; MLX work may go again)" if was_active else ""
        )
        return _EXIT_GO, doc, [message]
    status = breaker.status(now=now)
    return _EXIT_GO, status, ["Circuit breaker", *_breaker_lines(status, now)]


def _cmd_cadence(args: argparse.Namespace) -> _CLIResult:
    guard = _cadence_guard(args)
    now = time.time()
    if args.action == "clear":
        _require_state_folder()
        # `clear` was asked for: failing open would claim a clear that did not happen
        guard.strict = True
        removed = guard.clear(args.model) if os.path.lexists(guard.path) else 0
        doc = {"path": guard.path, "model_id": args.model, "removed": removed}
        which = f"for {args.model}" if args.model else "for every model"
        return _EXIT_GO, doc, [f"cadence cleared {which}: {removed} model(s) forgotten"]
    status = guard.status(now=now)
    if args.model is None:
        return _EXIT_GO, status, ["Cadence", *_cadence_lines(status, now)]
    fold = args.model.casefold()
    status["model_events"] = [e for e in status["events"] if e["model_id"].casefold() == fold]
    status["model_id"] = args.model
    status["cross_model_interval_sec"] = guard.effective_cross_interval(args.model)
    try:
        guard.check(args.model)
        status["blocked"], status["remaining_sec"] = False, 0.0
        verdict = "may load now"
    except CadenceViolation as exc:
        status["blocked"], status["remaining_sec"] = True, exc.remaining_sec
        verdict = f"BLOCKED: {exc}"
    lines = [f"Cadence of {_show(args.model)}: {verdict}", *_cadence_lines(status, now)]
    return _EXIT_GO, status, lines


def _cmd_models(args: argparse.Namespace) -> _CLIResult:
    if args.model is not None:
        entry = check_known_panic_model(args.model)
        doc: dict[str, Any] = {"query": args.model, "known": entry is not None, "entry": entry}
        if entry is None:
            return _EXIT_GO, doc, [f"{args.model}: not in the known-panic registry"]
        lines = [f"{entry['model_id']}: known {entry['tier']}-tier model"]
        items: list[tuple[str, object]] = []
        for key in (
            "panic_signature",
            "error_classes",
            "first_observed",
            "last_observed",
            "safer_alternative",
            "recommendation",
        ):
            value = entry.get(key)
            items.append((key, ", ".join(map(str, value)) if isinstance(value, list) else value))
        for hw in entry.get("hardware") or []:
            items.append(
                ("hardware", ", ".join(f"{k}={v}" for k, v in hw.items() if v is not None))
            )
        for key in ("reproductions", "community", "upstream"):
            items += [(key, value) for value in entry.get(key) or []]
        return _EXIT_GO, doc, lines + _pairs(items)
    entries = [check_known_panic_model(key) for key in KNOWN_PANIC_MODELS]
    known = [e for e in entries if e is not None]
    rows = [
        [e["model_id"], e["tier"], ", ".join(e["error_classes"]), e["safer_alternative"]]
        for e in known
    ]
    doc = {"models": known}
    lines = [f"{len(known)} known panic models (advisory; `metal-guard models MODEL` for details)"]
    return (
        _EXIT_GO,
        doc,
        lines + _table(["MODEL", "TIER", "ERROR CLASSES", "SAFER ALTERNATIVE"], rows),
    )


def _cmd_breadcrumbs(args: argparse.Namespace) -> _CLIResult:
    path = metal_guard.breadcrumb_path
    lines = read_breadcrumbs(args.n)
    doc = {"path": path, "lines": lines}
    if path is None:
        return _EXIT_GO, doc, ["breadcrumbs are disabled (METALGUARD_BREADCRUMB_PATH is empty)"]
    head = (
        f"last {len(lines)} breadcrumb line(s) of {path}" if lines else f"no breadcrumbs in {path}"
    )
    return _EXIT_GO, doc, [head, *lines]


_MLX_STACK = ("mlx", "mlx-lm", "mlx-vlm")


def _wired_limit_text(wired: dict[str, Any]) -> str:
    if wired["mode"] == "default":
        return "default (iogpu.wired_limit_mb=0: macOS decides)"
    if wired["mode"] == "override":
        share = f", {wired['ratio']:.0%} of RAM" if wired["total_gb"] else ""
        return f"override: iogpu.wired_limit_mb={wired['limit_mb']}{share}"
    return "unknown"


def _policy_lines(policy: dict[str, Any]) -> list[str]:
    if policy["installed"]:
        here = (
            f"policy {policy['policy']} installed (limit {policy['cap_bytes'] / (1 << 30):.2f} "
            f"GiB; {policy['requests_clamped']} of {policy['requests_seen']} requests clamped)"
        )
    else:
        here = "not installed (limit_wired_memory() installs it in the process that runs MLX)"
    env = policy["env_value"]
    asks = (
        f"{env!r}: limit_wired_memory() installs {policy['env_policy']!r}"
        if env is not None and policy["env_policy_source"] != "default"
        else (f"{env!r} is not a policy; " if env is not None else "unset: ")
        + f"limit_wired_memory() installs the default {policy['env_policy']!r}"
    )
    return _pairs([("this process", here), (policy["env_var"], asks)])


def _cmd_audit(args: argparse.Namespace) -> _CLIResult:
    import platform

    wired = audit_wired_limit()
    driver = read_gpu_driver_version()
    fast_synch = _fast_synch_value()
    packages = {name: _installed_version(name) for name in _MLX_STACK}
    advisories = check_version_advisories(
        packages={k: v for k, v in packages.items() if v is not None}
    )
    advisories.sort(key=lambda a: _SEVERITY_ORDER.get(a["severity"], len(_SEVERITY_ORDER)))
    policy = describe_wired_limit()
    why = (
        "not macOS"
        if not _on_macos()
        else "no answer within the time limit, or an answer that could not be parsed"
    )
    unreadable = []
    if wired["limit_mb"] is None:
        unreadable.append(f"iogpu.wired_limit_mb (sysctl): {why}")
    if wired["total_gb"] is None:
        unreadable.append(f"hw.memsize (sysctl): {why}")
    if driver is None:
        unreadable.append(f"IOGPUFamily kext version (Info.plist, kextstat, ioreg): {why}")
    doc: dict[str, Any] = {
        "platform": platform.platform(),
        "wired_limit": wired,
        "gpu_driver_version": driver,
        "mlx_metal_fast_synch": fast_synch is not None,
        "packages": packages,
        "advisories": advisories,
        "wired_limit_policy": policy,
        "unreadable": unreadable,
    }
    total = f"{wired['total_gb']:g} GiB" if wired["total_gb"] is not None else "unknown"
    lines = [f"metal-guard {__version__} audit ({doc['platform']})", "System"]
    lines += _pairs(
        [
            ("wired limit", _wired_limit_text(wired)),
            ("RAM", total),
            ("GPU driver", f"IOGPUFamily {driver}" if driver else "unknown"),
            (
                _FAST_SYNCH_ENV_VAR,
                "not set"
                if fast_synch is None
                else f"{fast_synch}: can deadlock and wedge the GPU (ml-explore/mlx#3830); unset it",
            ),
        ]
    )
    if wired["advisory"]:
        lines.append(f"  ! {wired['advisory']}")
    lines += ["", "MLX stack (package metadata; MLX is not imported)"]
    lines += _pairs([(k, v or "not installed") for k, v in packages.items()])
    if advisories:
        lines += ["", f"Advisories ({len(advisories)})"]
        for a in advisories:
            lines.append(
                f"  [{a['severity']}] {a['package']} {a['installed_version']}: {a['title']}"
            )
            lines += [f"      {a['url']}", f"      what to do: {a['mitigation']}"]
    else:
        lines += ["", "Advisories: none for the installed versions"]
    lines += ["", "Wired-limit control", *_policy_lines(policy)]
    if unreadable:
        lines += ["", "Could not read"] + [f"  - {item}" for item in unreadable]
    return _EXIT_GO, doc, lines


# -- run -------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> _CLIResult:
    command = list(args.program)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise _CLIError(
            "a command is required: metal-guard run [options] -- COMMAND [ARGS...]", _EXIT_USAGE
        )
    if args.json:
        raise _CLIError("--json does not apply to run (the output is the program's)", _EXIT_USAGE)
    options = _RunOptions(
        grace=args.grace,
        restart=args.restart,
        max_restarts=args.max_restarts,
        restart_window=args.restart_window,
        restart_delay=args.restart_delay,
        wired=args.wired,
        wait=not args.no_wait,
        gpu_gate=not args.no_gpu_gate,
    )
    return _run_supervised(command, options), {}, []


def _runs_lines(runs: list[dict[str, Any]], now: float) -> list[str]:
    """``status``'s table of the programs under run."""
    import shlex

    if not runs:
        return ["  none"]
    rows: list[list[object]] = []
    for r in runs:
        command = shlex.join(r["argv"])
        rows.append(
            [
                r["pid"] if r["pid"] is not None else "(restarting)",
                r["supervisor_pid"],
                _ago(r["since"], now),
                r["restarts"],
                f"{r['gate_wait_sec']:.1f} s",
                command if len(command) <= 80 else command[:77] + "...",
            ]
        )
    return _table(["PID", "RUN PID", "SINCE", "RESTARTS", "GPU GATE WAIT", "COMMAND"], rows)


# =============================================================================
# 6.3 Check — ``metal-guard check``: the pre-flight for one load, as a command.
#
# Known-panic advisory, post-panic gate, circuit breaker and cadence, each on its
# own line; exit 0 go, 2 blocked, 1 when state it needs cannot be read
# ("unreadable", the file, what to do). Only ``--admit`` records the load.
#
# Provides: _cmd_check
# Uses: Registry, Cadence rules, Modes (L6), Circuit breaker, Post-panic gate, Command line,
#   Commands
# =============================================================================


def _cmd_check(args: argparse.Namespace) -> _CLIResult:
    model: str = args.model
    if args.wait is not False and not args.admit:
        raise _CLIError("--wait needs --admit (only an admission waits)", _EXIT_USAGE)
    _require_state_folder()  # without it no state can be read, nor the load recorded
    now = time.time()
    known = check_known_panic_model(model)
    guard = _cadence_guard(args)
    # read before the checks below, which may move a corrupt file aside
    unreadable = _unreadable_state(guard, now)
    doc: dict[str, Any] = {"model_id": model, "known_panic_model": known}
    lines = [f"check {_show(model)}"]
    items: list[tuple[str, object]] = []
    blocked: list[str] = []
    if known is None:
        items.append(("known panic model", "no"))
    else:
        items.append(
            ("known panic model", f"YES ({known['tier']} tier: {known['panic_signature']})")
        )
        items.append(("advice", known["recommendation"]))
        if known.get("safer_alternative"):
            items.append(("safer alternative", known["safer_alternative"]))
        if args.refuse_known:
            blocked.append("known panic model (--refuse-known)")
    # Observer mode: the library reports a refusal instead of raising it; show it anyway.
    would_refuse: list[str] = []

    def refusal_line(name: str, why: str, exc: BaseException, raised: bool, part: Any) -> None:
        """A refusal the call raised (BLOCKED) or observer mode only reported."""
        if raised:
            items.append((name, f"BLOCKED: {exc}"))
            blocked.append(why)
        else:
            part["would_refuse"] = True
            items.append((name, f"would refuse (observer mode): {exc}"))
            would_refuse.append(why)

    cooldown: MLXCooldownActive | None = None
    with _ObservedRefusals() as seen:
        try:
            _breaker().check(now=now)
        except MLXCooldownActive as refusal:
            cooldown = refusal
    cooling = cooldown or next((e for e in seen if isinstance(e, MLXCooldownActive)), None)
    if cooling is None:
        doc["breaker"] = {"blocked": False}
        items.append(("circuit breaker", _unreadable_text(unreadable, "breaker.json", "clear")))
    else:
        doc["breaker"] = {
            "blocked": cooldown is not None,
            "message": str(cooling),
            "panic_count": cooling.panic_count,
            "window_sec": cooling.window_sec,
            "cooldown_until": cooling.cooldown_until,
            "remaining_sec": cooling.remaining_sec,
        }
        refusal_line(
            "circuit breaker", "circuit breaker cooldown", cooling, cooldown is not None,
            doc["breaker"],
        )  # fmt: skip
    gate: MLXCooldownActive | None = None
    with _ObservedRefusals() as seen:
        try:
            _require_post_panic_clear(now=now)  # one recent IOGPU kernel panic refuses
        except MLXCooldownActive as refusal:
            gate = refusal
    after = gate or next((e for e in seen if isinstance(e, MLXCooldownActive)), None)
    doc["post_panic"] = {"blocked": gate is not None}
    if after is None:
        items.append(("post-panic gate", "clear"))
    else:
        needs_ack = isinstance(after, _PostPanicRefusal) and bool(after.lockout)
        doc["post_panic"].update(
            message=str(after), remaining_sec=after.remaining_sec, needs_ack=needs_ack
        )
        refusal_line(
            "post-panic gate", "post-panic gate", after, gate is not None, doc["post_panic"]
        )
    cadence: dict[str, Any] = {
        "path": guard.path,
        "min_interval_sec": guard.min_interval_sec,
        "cross_model_interval_sec": guard.effective_cross_interval(model),
        "admitted": False,
    }
    violation: CadenceViolation | None = None
    recorded = ""
    started = time.monotonic()
    with _ObservedRefusals() as seen:
        try:
            if args.admit and not blocked and not unreadable:
                # an unusable store fails open: admitted, but not recorded
                cadence["admitted"] = guard.admit(model, wait=args.wait)
                recorded = (
                    "; load recorded"
                    if cadence["admitted"]
                    else (
                        "; the load could NOT be recorded (cadence store unusable, see the warning)"
                    )
                )
            else:
                guard.check(model)
        except CadenceViolation as refused:
            violation = refused
    if args.wait is not False:
        cadence["waited_sec"] = round(time.monotonic() - started, 3)
        if recorded and cadence["waited_sec"] >= 0.1:
            recorded += f" after waiting {cadence['waited_sec']:.1f} s"
    exc_seen = violation or next((e for e in seen if isinstance(e, CadenceViolation)), None)
    if exc_seen is None:
        cadence["blocked"] = False
        items.append(("cadence", _unreadable_text(unreadable, "cadence.json", "clear" + recorded)))
    else:
        cadence.update(
            blocked=violation is not None,
            message=str(exc_seen),
            remaining_sec=exc_seen.remaining_sec,
            last_model=getattr(exc_seen, "last_model", exc_seen.model_id),
            last_ts=exc_seen.last_ts,
        )
        refusal_line("cadence", "cadence", exc_seen, violation is not None, cadence)
        if violation is None and recorded:
            items.append(("note", recorded.removeprefix("; ")))
    doc["cadence"] = cadence
    doc["decision"] = "blocked" if blocked else "error" if unreadable else "go"
    doc["blocked_by"] = blocked
    doc["would_refuse_by"] = would_refuse
    doc["unreadable"] = unreadable
    if args.admit and (blocked or unreadable) and not cadence["admitted"]:
        why = "blocked" if blocked else "state unreadable"
        items.append(("note", f"the load was not recorded ({why})"))
    if blocked:
        lines[0] += ": BLOCKED by " + ", ".join(blocked)
    elif unreadable:
        lines[0] += ": UNREADABLE state (" + ", ".join(unreadable) + "): cannot tell"
    else:
        lines[0] += ": GO"
    if would_refuse and not blocked:
        lines[0] += " (observer mode; would refuse: " + ", ".join(would_refuse) + ")"
    lines += _pairs(items)
    if blocked:
        return _EXIT_BLOCKED, doc, lines
    if unreadable:
        doc["error"] = "state unreadable: " + "; ".join(
            _unreadable_text(unreadable, name, "").removeprefix("unreadable: ")
            for name in unreadable
        )
        return _EXIT_ERROR, doc, lines
    if args.admit and not cadence["admitted"]:  # a wrapper must be able to tell
        doc["decision"] = "error"
        doc["error"] = "the load could not be recorded (cadence store unusable)"
        return _EXIT_ERROR, doc, lines
    return _EXIT_GO, doc, lines


# =============================================================================
# 6.4 After-panic commands — ``diagnose``, ``ack``, ``postmortem`` and the bare
#     ``metal-guard`` summary.
#
# Wiring only: the panics come from the archive and the report folder, the
# likely triggers from the breadcrumbs (Panic triggers), the rest from the audits
# and the other commands' documents. ``diagnose`` and the summary write nothing;
# ``ack`` records the acknowledgement. ``postmortem`` writes one
# archive (tar.gz, or zip when the name ends in ``.zip``) in which the home
# folder reads ``~`` and the user name is removed, inside the panic reports too.
#
# Provides: _cmd_ack, _cmd_diagnose, _cmd_overview, _cmd_postmortem
# Uses: Prelude, Files, Breadcrumbs, Panic signatures, Panic reports, Version advisories,
#   Apple Feedback, Panic triggers, Panic archive, Circuit breaker, Post-panic gate,
#   System audits, Command line, Commands
# =============================================================================

_DIAGNOSE_PANICS = 3
_DIAGNOSE_CRUMB_LINES = 20_000
_TRIGGER_STEPS = {
    "load_after_unload": "Space model loads: load inside cadence_scope (or under `metal-guard "
    "run`) so a load never follows an unload within the cadence interval.",
    "concurrent_generation": "Let one process use the GPU at a time: the MLX lock and "
    "exclusive_gpu (both on under `metal-guard run`).",
    "wired_limit_request": "Do not raise MLX's wired limit: call limit_wired_memory() before "
    "loading (`metal-guard audit` shows the setting).",
    "generate_in_flight": "Wrap every generate in subprocess_inference_guard so GPU memory is "
    "flushed after each request; use a smaller or quantised model if it repeats.",
    "gemma4_first_generate": "Call gemma4_generation_flush before a gemma-4 model's first "
    "generate, or move to another model family (`metal-guard models`).",
}


def _diagnose_doc(now: float) -> dict[str, Any]:
    gate = _post_panic_status(now=now)
    merged = _merge_panics(read_panic_archive(), parse_panic_reports())
    panics = [r for r in merged if r.get("kernel_panic", True)]
    crumbs = read_breadcrumbs(_DIAGNOSE_CRUMB_LINES)
    entries = []
    for record in reversed(panics[-_DIAGNOSE_PANICS:]):
        ts = record["ts"]
        entries.append(
            {
                "ts": ts,
                "time": _local_time(ts),
                "signature": record.get("signature"),
                "what": _signature_words(record.get("signature")),
                "process": record.get("process"),
                "pid": record.get("pid"),
                "location": record.get("location"),
                "source_file": record.get("source_file"),
                "acknowledged_at": record.get("acknowledged_at"),
                "breadcrumbs": _breadcrumbs_around(crumbs, ts)[-60:],
                "triggers": _likely_triggers(crumbs, ts),
            }
        )
    advisories = check_version_advisories()
    wired = audit_wired_limit()
    steps: list[str] = []
    if gate["needs_ack"]:
        steps.append("MLX work is refused until you run `metal-guard ack` (after reading this).")
    elif gate["refused"]:
        steps.append(
            f"MLX work is refused for {_duration(gate['remaining_sec'])} more; "
            "`metal-guard ack` lifts it once you have read this."
        )
    for entry in entries[:1]:
        steps += [_TRIGGER_STEPS[t["trigger"]] for t in entry["triggers"]]
        if not entry["triggers"]:
            steps.append(
                "The breadcrumbs show no likely trigger: guard the program (`metal-guard run -- "
                "...` or the library's guards) so the next incident leaves forensics."
            )
    steps += [
        f"Upgrade {a['package']} {a['installed_version']}: {a['title']} ({a['url']})."
        for a in advisories
        if a.get("severity") in ("critical", "high")
    ]
    if wired.get("advisory"):
        steps.append(str(wired["advisory"]))
    if entries:
        steps.append(
            "Report it upstream: `metal-guard postmortem` writes one archive for a bug report "
            "(home folder and user name removed)."
        )
    else:
        steps.append("No kernel panic on record: nothing to do.")
    return {
        "gate": gate,
        "panics": entries,
        "advisories": advisories,
        "wired_limit": wired,
        "next_steps": steps,
    }


def _cmd_diagnose(args: argparse.Namespace) -> _CLIResult:
    doc = _diagnose_doc(time.time())
    gate = doc["gate"]
    lines = ["metal-guard diagnose"]
    lines += _pairs([("MLX work", f"REFUSED: {gate['message']}" if gate["refused"] else "may go")])
    if not doc["panics"]:
        lines += ["", "No kernel panic on record (panic archive and report folder)."]
    for entry in doc["panics"]:
        acked = " (acknowledged)" if entry["acknowledged_at"] is not None else ""
        lines += ["", f"Panic at {entry['time']}{acked}"]
        lines += _pairs(
            [
                ("what", entry["what"]),
                ("process", f"{entry['process'] or 'unknown'} (pid {_show(entry['pid'])})"),
                ("at", entry["location"]),
                ("report", entry["source_file"]),
            ]
        )
        crumbs = entry["breadcrumbs"]
        lines.append(
            f"  breadcrumbs of the {_TRIGGER_WINDOW_SEC / 60:g} minutes before: "
            + (f"{len(crumbs)} line(s)" if crumbs else "none")
        )
        lines += [f"    {_escape_line(c)}" for c in crumbs[-15:]]
        if entry["triggers"]:
            lines.append("  likely trigger(s):")
            for finding in entry["triggers"]:
                lines.append(f"  - {finding['summary']}")
                lines += [f"      {_escape_line(c)}" for c in finding["lines"]]
        else:
            lines.append("  likely trigger: none shown by the breadcrumbs")
    wired = doc["wired_limit"]
    lines += ["", "Wired-limit setting"]
    lines += _pairs([("iogpu.wired_limit_mb", wired.get("limit_mb")), ("mode", wired.get("mode"))])
    lines += ["", f"Advisories for the installed MLX stack: {len(doc['advisories'])}"]
    lines += [
        f"  [{a['severity']}] {a['package']} {a['installed_version']}: {a['title']}"
        for a in doc["advisories"]
    ]
    lines += ["", "Next steps"] + [f"  {i}. {s}" for i, s in enumerate(doc["next_steps"], 1)]
    return _EXIT_GO, doc, lines


def _cmd_ack(args: argparse.Namespace) -> _CLIResult:
    done = _acknowledge_panics(args.note)
    count = len(done["panics"])
    lines = [
        f"acknowledged {count} panic(s) at {_local_time(done['acked_at'])}"
        + (f" ({done['note']})" if done["note"] else "")
        + "; the post-panic lockout is lifted and MLX work may go again"
    ]
    return _EXIT_GO, done, lines


def _cmd_overview(args: argparse.Namespace) -> _CLIResult:
    now = time.time()
    gate = _post_panic_status(now=now)
    breaker = _breaker().status(now=now)
    doc = {"version": __version__, "post_panic": gate, "breaker": breaker}
    refused = gate["refused"] or breaker["cooling_down"]
    lines = [f"metal-guard {__version__}: MLX work " + ("REFUSED" if refused else "may go")]
    if gate["refused"]:
        lines.append(f"  {gate['message']}")
    if breaker["cooling_down"]:
        lines.append(f"  circuit breaker cooling down ({_duration(breaker['remaining_sec'])} left)")
    unacked = gate["unacknowledged"]
    if unacked:
        newest = unacked[-1]
        lines.append(
            f"  {len(unacked)} unacknowledged IOGPU kernel panic(s) in the last 7 days, the newest "
            f"at {_local_time(newest['ts'])}: run `metal-guard diagnose`"
        )
    else:
        lines.append("  no unacknowledged kernel panic")
    lines.append("  more: `metal-guard status`, `metal-guard --help`")
    return _EXIT_GO, doc, lines


def _user_names() -> list[str]:
    import getpass

    names = []
    try:
        names.append(getpass.getuser())
    except Exception:  # no user name anywhere
        pass
    home = os.path.expanduser("~")
    if home.startswith("/Users/"):
        names.append(os.path.basename(home.rstrip("/")))
    return [n for n in dict.fromkeys(names) if n]


def _postmortem_members(now: float) -> dict[str, bytes]:
    import argparse
    import json
    import platform

    diagnose = _diagnose_doc(now)
    crumbs = read_breadcrumbs(_DIAGNOSE_CRUMB_LINES)
    merged = _merge_panics(read_panic_archive(), parse_panic_reports())
    panics = [r for r in merged if r.get("kernel_panic", True)][-_DIAGNOSE_PANICS:]
    members: dict[str, bytes] = {}
    for record in panics:
        source = record.get("source_file")
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(record["ts"]))
        if isinstance(source, str):
            try:
                members["panic-reports/" + os.path.basename(source)] = _read_bounded(
                    source, _PANIC_READ_MAX
                )
            except OSError as exc:
                members[f"panic-reports/{stamp}.missing.txt"] = f"{source}: {exc}\n".encode()
        around = _breadcrumbs_around(crumbs, record["ts"], before=900.0, after=60.0)
        members[f"breadcrumbs/{stamp}.log"] = (
            "\n".join(around) + "\n" if around else "(no breadcrumbs around this panic)\n"
        ).encode()
    plain = argparse.Namespace(device=False, min_interval=180.0, cross_model_interval=0.0)
    versions: dict[str, str | None] = {
        "metal-guard": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    versions.update({name: _installed_version(name) for name in ("mlx", "mlx-lm", "mlx-vlm")})
    env = {k: v for k, v in os.environ.items() if k.startswith(("METALGUARD_", "MLX_"))}
    newest = panics[-1] if panics else {}
    feedback = format_panic_for_apple_feedback(
        {
            "panic_string": newest.get("panic_line"),
            "panic_time": newest.get("ts"),
            "hardware": {"chip": newest.get("chip")},
            "gpu_driver": newest.get("iogpu_version"),
            "os_version": newest.get("os_version"),
            "kernel_version": newest.get("kernel_version"),
            "mlx_versions": {k: v for k, v in versions.items() if k.startswith("mlx") and v},
            "breadcrumbs": _breadcrumbs_around(crumbs, newest["ts"]) if newest else [],
            "advisories": diagnose["advisories"],
        }
    )
    docs = {
        "status.json": _cmd_status(plain)[1],
        "audit.json": _cmd_audit(plain)[1],
        "diagnose.json": diagnose,
        "versions.json": versions,
        "environment.json": env,
    }
    for name, value in docs.items():
        members[name] = (json.dumps(value, indent=2, default=str) + "\n").encode()
    members["apple-feedback.md"] = feedback.encode()
    return members


def _write_postmortem(path: str, members: dict[str, bytes], now: float) -> None:
    import io

    top = os.path.basename(path).split(".")[0] or "metal-guard-postmortem"
    if path.endswith(".zip"):
        import zipfile

        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                archive.writestr(f"{top}/{name}", data)
        return
    import tarfile

    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mtime, info.mode = len(data), int(now), 0o644
            archive.addfile(info, io.BytesIO(data))


def _cmd_postmortem(args: argparse.Namespace) -> _CLIResult:
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    path = _path_arg("-o", args.output or f"metal-guard-postmortem-{stamp}.tar.gz")
    home = os.path.expanduser("~")
    names = _user_names()
    members = {}
    for name, data in _postmortem_members(now).items():
        text = data.decode("utf-8", "replace")
        for user in [None, *names]:
            text = _redact(text, home if user is None else None, user)
        members[name] = text.encode("utf-8")
    try:
        _write_postmortem(path, members, now)
    except OSError as exc:
        raise _CLIError(f"cannot write {path}: {exc}") from None
    doc = {"path": path, "members": sorted(members)}
    return _EXIT_GO, doc, [path]


# =============================================================================
# 6.5 Entry point — ``main``: parse, run one command, print text or one JSON document.
#
# Library WARNINGs (a store failing open...) go to stderr while a command runs;
# a usage error exits 64 with the usage line (and, with --json, one JSON
# document); a closed pipe (``metal-guard panics | head``) ends quietly.
#
# Provides: main
# Uses: Prelude, Command line, Commands, After-panic commands
# =============================================================================

_COMMANDS: dict[str, Callable[[argparse.Namespace], _CLIResult]] = {
    "status": _cmd_status,
    "check": _cmd_check,
    "panics": _cmd_panics,
    "breaker": _cmd_breaker,
    "cadence": _cmd_cadence,
    "models": _cmd_models,
    "breadcrumbs": _cmd_breadcrumbs,
    "lock": _cmd_lock,
    "audit": _cmd_audit,
    "diagnose": _cmd_diagnose,
    "ack": _cmd_ack,
    "postmortem": _cmd_postmortem,
    "overview": _cmd_overview,
    "run": _cmd_run,
}


def _cli_warnings_to_stderr() -> logging.Handler:
    """Show the library's WARNINGs (a store failing open...) on stderr while a command runs."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    _log().addHandler(handler)
    return handler


def _emit(text: str, stream: Any) -> None:
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:  # `metal-guard panics | head`: stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, AttributeError, ValueError):
            pass


def _usage_error(
    parser: argparse.ArgumentParser, message: str, as_json: bool, command: str | None = None
) -> int:
    """Usage line and message on stderr (and, with --json, one JSON document); exit 64."""
    import json

    parser.print_usage(sys.stderr)
    _emit(f"{parser.prog}: error: {message}\n", sys.stderr)
    if as_json:
        if command is None and " " in parser.prog:  # "metal-guard check" → "check"
            command = parser.prog.split(" ", 1)[1]
        doc = {"command": command, "exit_code": _EXIT_USAGE, "error": message}
        _emit(json.dumps(doc, indent=2) + "\n", sys.stdout)
    return _EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``metal-guard`` / ``python -m metal_guard``; returns the exit code.

    ``metal-guard`` alone shows a short summary (``status`` has it all). Exit codes: 0 go, 2 blocked or
    refused, 1 error, 64 usage error.
    """
    import json

    if isinstance(argv, str):  # main("check m") would parse one letter per word
        raise TypeError("argv must be a list of str (command-line words), not one str")
    arguments = sys.argv[1:] if argv is None else list(argv)
    if not all(isinstance(arg, str) for arg in arguments):
        raise TypeError("argv must be a list of str (command-line words)")
    parser, subparsers = _cli_parser()
    as_json = "--json" in arguments[: arguments.index("--") if "--" in arguments else None]
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else _EXIT_USAGE
    except _UsageError as exc:
        return _usage_error(exc.parser, str(exc), as_json)
    if args.version:
        if args.json:
            doc = {"command": "version", "exit_code": _EXIT_GO, "version": __version__}
            _emit(json.dumps(doc, indent=2) + "\n", sys.stdout)
        else:
            _emit(f"metal-guard {__version__}\n", sys.stdout)
        return _EXIT_GO
    command = args.command or "overview"  # bare `metal-guard`: a short summary
    warnings = _cli_warnings_to_stderr()
    try:
        code, doc, lines = _COMMANDS[command](args)
    except _CLIError as exc:
        if exc.code == _EXIT_USAGE:
            return _usage_error(subparsers[command], str(exc), as_json, command)
        code, doc, lines = exc.code, {"error": str(exc)}, []
        _emit(f"metal-guard {command}: error: {exc}\n", sys.stderr)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # environment faults (unwritable state, lock timeouts...)
        code, doc, lines = _EXIT_ERROR, {"error": _fault_message(exc)}, []
        _emit(f"metal-guard {command}: error: {doc['error']}\n", sys.stderr)
    finally:
        _log().removeHandler(warnings)
    if args.json:
        out = {"command": command, "exit_code": code, **doc}
        _emit(json.dumps(out, indent=2, default=str) + "\n", sys.stdout)
    elif lines:
        _emit("\n".join(lines) + "\n", sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
