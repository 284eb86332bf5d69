"""Which implementations of the ranet_fast ops can run here, and which to use.

Every op has up to four backends:

* ``cuda``      -- the compiled extension's CUDA kernels (``ranet_fast._C`` built
  with CUDA; CUDA tensors only),
* ``triton``    -- the Triton kernels in ``ranet_fast.kernels`` (CUDA tensors, or CPU
  tensors when ``TRITON_INTERPRET=1`` was set before the kernels were imported),
* ``cpu``       -- the compiled extension's CPU kernels (CPU tensors only),
* ``reference`` -- plain PyTorch, runs everywhere and defines the results.

The backend is the op's ``backend`` argument if given, else the environment
variable ``RANET_FAST_BACKEND`` if set (``auto`` or empty means automatic), else
the automatic choice: the fastest of the backends that can run, measured per
shape by ``ranet_fast.dispatch`` (see ``ranet_fast.ops._registry.choose_backend``),
among ``cuda``, ``triton``, ``reference`` for CUDA tensors and ``cpu``,
``reference`` for CPU tensors; where nothing is measured, the first of these
that can run (the static default). A backend that was asked for but cannot
run raises :class:`BackendUnavailableError` saying why.

Nothing here needs the extension or Triton to import. An extension that is
absent (a pure-Python install, or ``RANET_FAST_NO_EXTENSION=1`` at run time)
leaves the ``cpu`` and ``cuda`` backends unavailable; one that exists but does
not import, or was built against another torch, makes ``import ranet_fast``
raise :class:`ExtensionImportError` naming both torch versions and the rebuild
command, rather than silently falling back.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import sys
from types import ModuleType

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
BACKEND_ENV_VAR = "RANET_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run for this input."""


NO_EXTENSION_ENV_VAR = "RANET_FAST_NO_EXTENSION"
REBUILD_COMMAND = "pip install --no-build-isolation --no-deps -e ."
# setup.py compiles this marker into _C (csrc/module.cpp), so that the torch a _C was built against
# can be read from the file even when the import itself fails.
_BUILD_INFO_MARKER = re.compile(rb"ranet_fast build info: torch=([^;\x00]*);")


class ExtensionImportError(ImportError):
    """``ranet_fast._C`` exists but cannot be used with the torch of this Python.

    Raised by ``import ranet_fast`` instead of falling back to Triton or the
    reference: a broken or mismatched build is a mistake to fix (rebuild),
    not a configuration. A ``_C`` that is absent (a pure-Python install) is not
    an error.
    """


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def built_with_torch_of_file(path: str | None) -> str | None:
    """The torch version recorded in the compiled extension at ``path``, read from its bytes."""
    if path is None:
        return None
    try:
        with open(path, "rb") as library:
            match = _BUILD_INFO_MARKER.search(library.read())
    except OSError:
        return None
    return None if match is None else match.group(1).decode("utf-8", "replace")


def _extension_path() -> str | None:
    try:
        spec = importlib.util.find_spec("ranet_fast._C")
    except (ImportError, ValueError):
        return None
    return None if spec is None else spec.origin


def _mismatch_message(path: str | None, built_with: str | None, problem: str) -> str:
    built = (f"torch {built_with}" if built_with is not None
             else "an unknown torch (this _C records none: it predates the record, or setup.py did not build it)")
    return (
        f"ranet_fast._C ({path or 'location unknown'}) {problem}.\n"
        f"  built against: {built}\n"
        f"  running:       torch {torch.__version__} ({os.path.dirname(torch.__file__)})\n"
        "The compiled extension only works with the torch it was built against. Rebuild it against this "
        f"torch, from the repository root: `{REBUILD_COMMAND}` (or `./run.sh setup`). To run without it "
        f"(Triton or the PyTorch reference instead), set {NO_EXTENSION_ENV_VAR}=1."
    )


def _import_extension() -> tuple[ModuleType | None, str | None]:
    """(the loaded ``_C``, None), or (None, why there is none).

    Only an absent ``_C`` (or ``RANET_FAST_NO_EXTENSION=1``) means "no
    extension"; a ``_C`` that fails to import, or that was built against
    another torch, raises ExtensionImportError naming both torch versions.
    """
    if _env_flag(NO_EXTENSION_ENV_VAR):
        return None, f"{NO_EXTENSION_ENV_VAR}=1: the compiled extension is not used"
    try:
        module = importlib.import_module("ranet_fast._C")
    except ModuleNotFoundError as error:
        if error.name == "ranet_fast._C":  # no such file: a pure-Python install
            return None, f"{type(error).__name__}: {error}"
        path = _extension_path()
        raise ExtensionImportError(_mismatch_message(
            path, built_with_torch_of_file(path), f"exists but failed to import: {type(error).__name__}: {error}"
        )) from error
    except Exception as error:  # an undefined symbol, a missing libc10.so, a bad ABI...
        path = _extension_path()
        raise ExtensionImportError(_mismatch_message(
            path, built_with_torch_of_file(path), f"exists but failed to import: {type(error).__name__}: {error}"
        )) from error
    built_with = getattr(module, "TORCH_VERSION", None)
    if built_with != str(torch.__version__):
        # It imported, but the torch C++ ABI is not stable across versions: a mismatch that happens
        # to link can still crash or compute garbage later.
        raise ExtensionImportError(_mismatch_message(
            getattr(module, "__file__", None) or _extension_path(), built_with,
            "was built against another torch than this one"
        ))
    return module, None


# Importing _C registers its torch.ops.ranet_fast.* operators.
_C, _C_IMPORT_ERROR = _import_extension()


def extension_loaded() -> bool:
    return _C is not None


def extension_import_error() -> str | None:
    """Why ``ranet_fast._C`` could not be imported, or None if it was."""
    return _C_IMPORT_ERROR


def extension_built_with_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "WITH_CUDA", 0))


def extension_torch_version() -> str | None:
    """The torch version the loaded ``_C`` was built against (the running one), or None without ``_C``."""
    return None if _C is None else getattr(_C, "TORCH_VERSION", None)


def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    try:
        importlib.import_module("triton")
    except Exception as error:
        return f"import triton failed: {type(error).__name__}: {error}"
    return None


@functools.cache
def triton_import_error() -> str | None:
    """Why Triton cannot be imported, or None if it can (checked once)."""
    return _triton_import_error()


def triton_interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_kernels() -> ModuleType:
    """The ``ranet_fast.kernels`` package (imports Triton on first use)."""
    return importlib.import_module("ranet_fast.kernels")


def _triton_cpu_status() -> tuple[bool, str]:
    kernels_module = sys.modules.get("ranet_fast.kernels")
    if kernels_module is not None:
        # Triton decides between compiling and interpreting when a kernel is
        # defined, so what counts is the mode the kernels were imported in.
        if kernels_module.INTERPRETED:
            return True, "Triton interpreter (TRITON_INTERPRET=1)"
        return False, (
            "ranet_fast.kernels was imported without TRITON_INTERPRET=1; "
            "set it before the first import to run Triton on CPU tensors"
        )
    if triton_interpret_requested():
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    return False, "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1"


def _triton_module_missing(module_name: str) -> bool:
    """Whether ``ranet_fast/kernels/<module_name>.py`` is absent.

    Looks for the file without importing ``ranet_fast.kernels``: that import
    fixes the Triton interpreter mode, which must stay the caller's choice.
    """
    spec = importlib.util.find_spec("ranet_fast.kernels")
    locations = [] if spec is None else list(spec.submodule_search_locations or [])
    return not any(os.path.exists(os.path.join(location, f"{module_name}.py")) for location in locations)


def backend_status(
    backend: str, device: torch.device | str, triton_module: str | None = None
) -> tuple[bool, str]:
    """Whether ``backend`` can run on tensors on ``device``, and why (not).

    The reason is a short human-readable phrase, e.g. "extension built without
    CUDA" or "no GPU visible". ``triton_module`` names the module of
    ``ranet_fast.kernels`` the op's Triton backend needs, if any.
    """
    device = torch.device(device)
    if backend == "reference":
        return True, "pure PyTorch"
    if backend == "cpu":
        if _C is None:
            return False, f"_C not loaded: {_C_IMPORT_ERROR}"
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, got a {device.type} tensor"
        return True, "compiled extension"
    if backend == "cuda":
        if _C is None:
            return False, f"_C not loaded: {_C_IMPORT_ERROR}"
        if not extension_built_with_cuda():
            return False, "extension built without CUDA"
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        if not torch.cuda.is_available():
            return False, "no GPU visible"
        return True, "compiled extension with CUDA kernels"
    if backend == "triton":
        error = triton_import_error()
        if error is not None:
            return False, error
        if triton_module is not None and _triton_module_missing(triton_module):
            return False, f"ranet_fast.kernels has no {triton_module} module"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return False, "no GPU visible"
            return True, "Triton on the GPU"
        if device.type == "cpu":
            return _triton_cpu_status()
        return False, f"Triton cannot run on {device.type} tensors"
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def automatic_order(device: torch.device) -> tuple[str, ...]:
    """The candidates of the automatic choice on ``device``, the static default first (Triton on CPU
    tensors is its interpreter, a test tool, never a candidate)."""
    if device.type == "cuda":
        return ("cuda", "triton", "reference")
    if device.type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def requested_backend(backend: str | None = None) -> str | None:
    """The explicitly requested backend (argument, else environment), or None."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV_VAR, "").strip().lower() or None
        source = f"environment variable {BACKEND_ENV_VAR}"
        if backend == "auto":
            return None
    else:
        source = "backend argument"
    if backend is not None and backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r} (from the {source}); "
            f"choose one of {', '.join(BACKENDS)}"
            + (" or auto" if source != "backend argument" else "")
        )
    return backend


def resolve_backend(
    op_name: str, tensor: torch.Tensor, backend: str | None = None, triton_module: str | None = None
) -> str:
    """The requested backend for ``op_name`` on ``tensor`` (argument, else environment), or without a
    request the static default (the first of ``automatic_order`` that can run; the measured choice
    is ``ranet_fast.ops._registry.choose_backend``'s).

    ``triton_module``: the module of ``ranet_fast.kernels`` holding the op's
    Triton kernels, if that backend needs one beyond Triton itself.
    Raises BackendUnavailableError if the requested backend cannot run.
    """
    return _resolve_backend_for_device(op_name, str(tensor.device), backend, triton_module)


def _constant_under_torch_compile(function):
    """Marks ``function`` the way torch.compiler.assume_constant_result does.

    The public decorator imports torch._dynamo, which would add about two
    seconds to ``import ranet_fast``; the marker attribute is all it sets
    (torch 2.0 to 2.14). tests/test_exit_confidence.py compiles both the
    extension and the Triton path with fullgraph=True, which fails if torch
    stops honouring the marker.
    """
    function._dynamo_marked_constant = True
    return function


# The choice depends only on the device, the request and the environment, so
# torch.compile runs it once while tracing and keeps the answer instead of
# tracing the import machinery inside. Changing RANET_FAST_BACKEND after a
# function was compiled therefore does not affect that compiled function.
@_constant_under_torch_compile
def _resolve_backend_for_device(
    op_name: str, device_name: str, backend: str | None, triton_module: str | None = None
) -> str:
    device = torch.device(device_name)
    requested = requested_backend(backend)
    if requested is not None:
        available, reason = backend_status(requested, device, triton_module)
        if not available:
            raise BackendUnavailableError(
                f"{op_name}: backend {requested!r} is unavailable for a tensor on "
                f"{device}: {reason}"
            )
        return requested
    for candidate in automatic_order(device):
        if backend_status(candidate, device, triton_module)[0]:
            return candidate
    raise AssertionError("the reference backend is always available")
