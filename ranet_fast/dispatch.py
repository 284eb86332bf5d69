"""Measured dispatch: the fastest of several equivalent implementations, timed once per shape.

``pick(kind, key, candidates, default=...)`` chooses among ``candidates`` (name -> a thunk that runs
that implementation once on the real inputs). On the first call for a ``(kind, key)`` it times
every candidate (one warm-up call each, then ``REPEATS`` interleaved samples of enough calls to
last about ``SAMPLE_SECONDS``; CUDA events on a GPU, ``time.perf_counter`` on a CPU; the median
sample counts; twice the samples for a close call), returns the fastest and remembers it, in memory and in a JSON file on disk, so
later calls (and later processes on the same device and versions) cost one dict lookup.

Who calls it: ``ranet_fast.ops._registry.choose_backend`` (kind ``"op"``: which backend runs an
op) and ``ranet_fast.nn.common.run_faster_path`` (kind ``"layer"``: a fast layer's fused forward
or the original eager one). The key must identify everything the timing depends on (shapes,
strides, dtype, the device, scalar arguments) and contain the device as a ``torch.device``; its
``repr`` must not change between processes (ints, strings, bools, floats, None, torch.Size,
torch.dtype, torch.device and tuples of them).

Disk cache: ``$RANET_FAST_CACHE_DIR`` (default ``~/.cache/ranet_fast``) holds one file per device
and software versions, ``dispatch-<hash>.json``, which records the device name (the GPU's name and
compute capability, or the CPU model and torch's thread count) and the versions of torch, Triton
and ranet_fast. It is written atomically (a temporary file renamed over it) after every new
measurement and is safe to delete. A file that does not parse, or that was written for another
device or other versions, is ignored with a warning (and replaced at the next measurement).
Concurrent processes may each overwrite the other's new entries: they are measured again later.

No timing, ever, while a CUDA graph is being captured (``torch.cuda.is_current_stream_capturing``)
or while ``torch.compile`` traces (``torch.compiler.is_compiling``): timing would be captured or
traced itself. There, and whenever tuning is off (``RANET_FAST_TUNING=0`` or ``tuning(False)``),
a choice cached in memory or on disk is used, else ``default`` (each caller's documented static
default). A default used for want of tuning is not remembered as a measurement.

Forcing: an op's ``backend=`` argument or ``RANET_FAST_BACKEND`` (see ``ranet_fast._extension``);
every fast layer's path with ``RANET_FAST_LAYERS=fused|eager|auto`` or ``layer_path()``. Neither is
timed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping

import torch

TUNING_ENV_VAR = "RANET_FAST_TUNING"
CACHE_DIR_ENV_VAR = "RANET_FAST_CACHE_DIR"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "ranet_fast")
CACHE_FORMAT = 1
# Timing: samples per candidate (median), and the length a sample aims at: long enough that the
# clock's resolution and one-off hiccups (another process taking the core) do not decide, short
# enough that a model's first call (every layer and op shape tuned once) stays within seconds.
REPEATS = 7
SAMPLE_SECONDS = 3e-3
# A close call (the two fastest medians within this fraction) gets REPEATS more rounds before it is
# decided: it is where a burst of another process's work could swap the order.
CLOSE_CALL = 0.1
MAX_CALLS_PER_SAMPLE = 100

# (kind, key) -> the measured (or loaded) choice. The hot path is one lookup here.
_choices: dict[tuple, str] = {}
# (kind, key) -> median seconds per candidate, for the choices measured in this process (reports).
_timings: dict[tuple, dict[str, float]] = {}
# (kind, key) that had no disk entry while tuning was off: not looked up on disk again per call.
_not_on_disk: set[tuple] = set()
# device name -> {repr((kind, key)): choice} as in its disk file (loaded on first need).
_disk: dict[str, dict[str, str]] = {}
_tuning_override: bool | None = None
_recorders: list[list[tuple[str, tuple, str]]] = []
# Bumped whenever the choices in memory are dropped: a caller that keeps pick's answers for itself
# (a fast layer, per module) keeps them while this stays the same.
_generation = 0


LAYERS_ENV_VAR = "RANET_FAST_LAYERS"
LAYER_PATHS = ("fused", "eager", "auto")
_layer_path_override: str | None = None


class DispatchCacheWarning(UserWarning):
    """A dispatch cache file was ignored (it does not parse, or belongs to another device or versions)."""


def tuning_enabled() -> bool:
    """Whether a missing choice is measured: ``tuning()``'s setting, else ``RANET_FAST_TUNING`` (default on)."""
    if _tuning_override is not None:
        return _tuning_override
    return os.environ.get(TUNING_ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def tuning(enabled: bool | None):
    """Within this context, measure missing choices (True) or use cached ones and defaults (False);
    None: as ``RANET_FAST_TUNING`` says."""
    global _tuning_override
    previous, _tuning_override = _tuning_override, enabled
    try:
        yield
    finally:
        _tuning_override = previous


def forced_layer_path() -> str | None:
    """"fused" or "eager" when fast layers are forced to that path (``layer_path()``, else
    ``RANET_FAST_LAYERS``), None when each measures its choice ("auto", the default)."""
    path = _layer_path_override
    if path is None:
        path = os.environ.get(LAYERS_ENV_VAR, "").strip().lower() or "auto"
        if path not in LAYER_PATHS:
            raise ValueError(f"{LAYERS_ENV_VAR}={path!r}: choose one of {', '.join(LAYER_PATHS)}")
    return None if path == "auto" else path


@contextlib.contextmanager
def layer_path(path: str):
    """Within this context every fast layer takes ``path``: "fused" (wherever its fused forward
    applies), "eager" (its original forward) or "auto" (the measured choice)."""
    global _layer_path_override
    if path not in LAYER_PATHS:
        raise ValueError(f"layer path {path!r}: choose one of {', '.join(LAYER_PATHS)}")
    previous, _layer_path_override = _layer_path_override, path
    try:
        yield
    finally:
        _layer_path_override = previous


@contextlib.contextmanager
def recording():
    """Yields a list that receives (kind, key, choice) for every ``pick`` made within the context
    (the benchmarks report which backend and path each layer took this way)."""
    record: list[tuple[str, tuple, str]] = []
    _recorders.append(record)
    try:
        yield record
    finally:
        _recorders.remove(record)


def measured_seconds(kind: str, key: tuple) -> dict[str, float] | None:
    """Median seconds per call of each candidate, if this process measured the choice for
    ``(kind, key)`` (a choice read from the disk cache has none)."""
    return _timings.get((kind, key))


def generation() -> int:
    """Changes whenever :func:`forget_choices` drops the choices held in memory."""
    return _generation


def is_recording() -> bool:
    """Whether a :func:`recording` context wants every pick reported (a caller's own memo of the
    choices must then go through ``pick``)."""
    return bool(_recorders)


def decided(kind: str, key: tuple) -> bool:
    """Whether ``pick`` holds a choice for ``(kind, key)`` (measured or read from disk), not a default."""
    return (kind, key) in _choices


def forget_choices() -> None:
    """Drops every choice held in memory (the disk files stay; they are read again when needed)."""
    global _generation
    _generation += 1
    _choices.clear()
    _timings.clear()
    _not_on_disk.clear()
    _disk.clear()


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get(CACHE_DIR_ENV_VAR) or DEFAULT_CACHE_DIR)


def versions() -> dict[str, str | None]:
    """The software whose change voids the measurements."""
    def installed(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    from ranet_fast import __version__

    return {"torch": torch.__version__, "triton": installed("triton"), "ranet_fast": __version__}


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """What the measurements on ``device`` depend on: the GPU and its compute capability, or the CPU
    model and torch's thread count."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    if device.type == "cpu":
        return f"{_cpu_model()}, {torch.get_num_threads()} threads"
    return device.type


def cache_path(name: str) -> str:
    """The disk cache file for device ``name`` under the current versions."""
    identity = json.dumps({"device": name, "versions": versions()}, sort_keys=True)
    return os.path.join(cache_dir(), f"dispatch-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json")


def _load(name: str) -> dict[str, str]:
    path = cache_path(name)
    try:
        with open(path) as handle:
            content = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(f"ranet_fast dispatch: ignoring the cache file {path}, which cannot be read "
                      f"({type(error).__name__}: {error}); its choices will be measured again", DispatchCacheWarning,
                      stacklevel=3)
        return {}
    expected = {"format": CACHE_FORMAT, "device": name, "versions": versions()}
    found = {field: content.get(field) for field in expected} if isinstance(content, dict) else None
    choices = content.get("choices") if isinstance(content, dict) else None
    if found != expected or not isinstance(choices, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in choices.items()):
        warnings.warn(f"ranet_fast dispatch: ignoring the cache file {path}: it was written for {found}, not "
                      f"{expected} (or its choices are malformed); its choices will be measured again",
                      DispatchCacheWarning, stacklevel=3)
        return {}
    return dict(choices)


def _disk_choices(name: str) -> dict[str, str]:
    if name not in _disk:
        _disk[name] = _load(name)
    return _disk[name]


def _store(name: str, entry: str, choice: str) -> None:
    """Adds one choice to the device's file: written to a temporary file, then renamed over it."""
    choices = _disk_choices(name)
    choices[entry] = choice
    path = cache_path(name)
    content = {"format": CACHE_FORMAT, "device": name, "versions": versions(), "choices": choices}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".dispatch-", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "w") as handle:
                json.dump(content, handle, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:  # a read-only home, a full disk: the choice still holds in memory
        warnings.warn(f"ranet_fast dispatch: cannot write the cache file {path} ({error})", DispatchCacheWarning,
                      stacklevel=3)


def _device_of(key: tuple) -> torch.device:
    for part in key:
        if isinstance(part, torch.device):
            return part
    raise ValueError(f"a dispatch key must contain the device (a torch.device), got {key!r}")


def _capturing_or_tracing() -> bool:
    # is_current_stream_capturing initialises CUDA; without an initialised CUDA nothing is captured.
    return torch.compiler.is_compiling() or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Mean seconds of ``calls`` back-to-back calls: CUDA events on a GPU, perf_counter on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls


def measure(candidates: Mapping[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Median seconds per call of each candidate: a warm-up call each (compilation, nested tuning),
    then ``REPEATS`` rounds that time every candidate in turn, so that a slow spell hits all alike
    (twice as many rounds for a close call, see ``CLOSE_CALL``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    calls = {}
    for name, fn in candidates.items():
        fn()
        single = seconds_per_call(fn, 1, device)
        calls[name] = max(1, min(MAX_CALLS_PER_SAMPLE, int(SAMPLE_SECONDS / max(single, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for rounds in (REPEATS, REPEATS):
        for _ in range(rounds):
            for name, fn in candidates.items():
                samples[name].append(seconds_per_call(fn, calls[name], device))
        medians = {name: statistics.median(values) for name, values in samples.items()}
        ranked = sorted(medians.values())
        if len(ranked) < 2 or ranked[1] > ranked[0] * (1 + CLOSE_CALL):
            break
    return medians


def pick(kind: str, key: tuple, candidates: Mapping[str, Callable[[], object]], *, default: str,
         timing_guard: Callable[[], contextlib.AbstractContextManager[bool]] | None = None,
         prefer: tuple[str, float] | None = None) -> str:
    """The name of the fastest of ``candidates`` for ``(kind, key)``, measured on first use.

    ``candidates`` maps names to thunks that each run one equivalent implementation once (a caller
    makes them safe to run repeatedly: no writes into user data); ``default`` (one of them) is used
    when nothing may be measured (see the module docstring). ``timing_guard()``, if given, is
    entered around a measurement only: it undoes the candidates' side effects on exit (e.g. BatchNorm
    running statistics) and yields whether timing is allowed at all (False: ``default``, not
    remembered). ``prefer=(name, margin)``: another candidate wins only where it is faster than
    ``name`` by more than the fraction ``margin`` of ``name``'s time (a cost the timing does not
    see, or a win within the noise of one measurement, then goes to ``name``).
    """
    entry = (kind, key)
    choice = _choices.get(entry)
    if choice is not None and choice in candidates:
        if _recorders:
            _record(kind, key, choice)
        return choice
    return _pick_slowly(entry, candidates, default, timing_guard, prefer)


def _record(kind: str, key: tuple, choice: str) -> None:
    for record in _recorders:
        record.append((kind, key, choice))


def _fastest(seconds: dict[str, float], prefer: tuple[str, float] | None) -> str:
    fastest = min(seconds, key=seconds.__getitem__)
    if prefer is not None:
        name, margin = prefer
        if seconds[fastest] >= seconds[name] * (1 - margin):
            return name
    return fastest


def _pick_slowly(entry: tuple, candidates: Mapping[str, Callable[[], object]], default: str, timing_guard,
                 prefer: tuple[str, float] | None) -> str:
    if default not in candidates:
        raise ValueError(f"dispatch default {default!r} is not one of the candidates {sorted(candidates)}")
    kind, key = entry
    measurable = tuning_enabled() and not _capturing_or_tracing()
    if not measurable and entry in _not_on_disk:
        choice = default
    else:
        device = _device_of(key)
        name = device_name(device)
        stored = _disk_choices(name).get(repr(entry))
        if stored in candidates:
            choice = _choices[entry] = stored
        elif not measurable:
            _not_on_disk.add(entry)
            choice = default
        elif len(candidates) == 1:
            choice = default
        else:
            with contextlib.nullcontext(True) if timing_guard is None else timing_guard() as allowed:
                seconds = measure(candidates, device) if allowed else None
            if seconds is None:
                choice = default
            else:
                choice = _choices[entry] = _fastest(seconds, prefer)
                _timings[entry] = seconds
                _not_on_disk.discard(entry)
                _store(name, repr(entry), choice)
    if _recorders:
        _record(kind, key, choice)
    return choice
