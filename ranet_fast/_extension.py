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
the automatic choice: CUDA tensors use ``cuda``, then ``triton``, then
``reference``; CPU tensors use ``cpu``, then ``reference``. A backend that was
asked for but cannot run raises :class:`BackendUnavailableError` saying why.

Nothing here needs the extension or Triton to import.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
BACKEND_ENV_VAR = "RANET_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run for this input."""


def _import_extension() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("ranet_fast._C"), None
    except Exception as error:  # any failure (missing file, bad ABI) means "not built"
        return None, f"{type(error).__name__}: {error}"


# Importing _C registers its torch.ops.ranet_fast.* operators.
_C, _C_IMPORT_ERROR = _import_extension()


def extension_loaded() -> bool:
    return _C is not None


def extension_import_error() -> str | None:
    """Why ``ranet_fast._C`` could not be imported, or None if it was."""
    return _C_IMPORT_ERROR


def extension_built_with_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "WITH_CUDA", 0))


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
            return False, f"_C import failed: {_C_IMPORT_ERROR}"
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, got a {device.type} tensor"
        return True, "compiled extension"
    if backend == "cuda":
        if _C is None:
            return False, f"_C import failed: {_C_IMPORT_ERROR}"
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


def _automatic_order(device: torch.device) -> tuple[str, ...]:
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
    """The backend ``op_name`` should use for ``tensor``.

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
    for candidate in _automatic_order(device):
        if backend_status(candidate, device, triton_module)[0]:
            return candidate
    raise AssertionError("the reference backend is always available")
