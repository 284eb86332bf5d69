"""Running an op's Triton checks under the Triton interpreter, in a subprocess.

Triton fixes interpreter mode when a kernel is defined, so setting TRITON_INTERPRET=1 in the test
process would depend on import order and switch every other test's Triton kernels to the
interpreter too. A test module instead names its checks (``triton_interpreter_checks()``: name ->
callable taking the device), and ``run_module_checks_under_interpreter`` runs them all in one fresh
interpreter process (the ``triton_interpreter_report`` fixture of conftest.py). Whole-model checks
that need RANET_FAST_BACKEND=triton run a self-checking script (``run_script_on_triton_backend``).
"""

import contextlib
import json
import os
import subprocess
import sys
import traceback

import pytest

from cuda_testing import requires_cuda_gpu
from ranet_fast import _extension


TESTS_DIRECTORY = os.path.dirname(os.path.abspath(__file__))

_MODULE_CHECKS_SCRIPT = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
import triton_interpreter
checks = importlib.import_module(sys.argv[2]).triton_interpreter_checks()
print(json.dumps(triton_interpreter.run_checks(checks, "cpu")))
"""


def run_checks(checks: dict, device) -> dict:
    """Runs each check on ``device``; returns {"interpreted": whether every Triton kernel module the
    checks imported runs under the interpreter (and at least one did), "checks": {name: "ok" or the
    failure's traceback}}."""
    outcomes = {}
    for name, check in checks.items():
        try:
            check(device)
            outcomes[name] = "ok"
        except Exception:
            outcomes[name] = traceback.format_exc()
    kernel_modules = [module for name, module in list(sys.modules.items())
                      if name.startswith("ranet_fast.kernels.") and hasattr(module, "INTERPRETED")]
    interpreted = bool(kernel_modules) and all(module.INTERPRETED for module in kernel_modules)
    return {"interpreted": interpreted, "checks": outcomes}


def run_module_checks_under_interpreter(module_name: str) -> dict:
    """``run_checks(module.triton_interpreter_checks(), "cpu")`` for the test module ``module_name``,
    in a subprocess under TRITON_INTERPRET=1; skips the test when Triton is missing."""
    if _extension.triton_import_error() is not None:
        pytest.skip(_extension.triton_import_error())
    environment = dict(os.environ, TRITON_INTERPRET="1")
    environment.pop("RANET_FAST_BACKEND", None)
    completed = subprocess.run([sys.executable, "-c", _MODULE_CHECKS_SCRIPT, TESTS_DIRECTORY, module_name],
                               env=environment, capture_output=True, text=True, timeout=600, cwd=TESTS_DIRECTORY)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def on_triton(named_checks: dict) -> dict:
    """name -> check(device) from name -> (check(backend, device, *arguments), *arguments), with the
    backend "triton": the op's shared checks as a ``triton_interpreter_checks()``."""
    return {name: lambda device, function=function, arguments=arguments: function("triton", device, *arguments)
            for name, (function, *arguments) in named_checks.items()}


def each_check_under_interpreter(triton_interpreter_checks):
    """A module's test that each of its ``triton_interpreter_checks()`` passed under the interpreter:
    ``test_triton_under_interpreter = each_check_under_interpreter(triton_interpreter_checks)``."""

    @pytest.mark.parametrize("check", list(triton_interpreter_checks()))
    def test(triton_interpreter_report, check):
        assert_passed_under_interpreter(triton_interpreter_report, check)

    return test


def each_check_on_gpu(triton_interpreter_checks):
    """The same checks on CUDA tensors, compiled, in this process: ``test_triton_on_gpu =
    each_check_on_gpu(triton_interpreter_checks)``."""

    @requires_cuda_gpu
    @pytest.mark.parametrize("check", list(triton_interpreter_checks()))
    def test(check):
        triton_interpreter_checks()[check]("cuda")

    return test


def assert_passed_under_interpreter(report: dict, name: str) -> None:
    """The check ``name`` of a ``triton_interpreter_report`` passed, on interpreted kernels."""
    assert report["interpreted"], "a Triton kernel module ran compiled, not under the interpreter"
    assert report["checks"][name] == "ok", report["checks"][name]


def run_script_on_triton_backend(script: str) -> None:
    """Run a self-checking ``script`` (it prints 'ok' last) from the repository root with
    TRITON_INTERPRET=1 and RANET_FAST_BACKEND=triton; for whole-model checks whose script imports
    helpers from a test module (``sys.path.insert(0, 'tests')``)."""
    pytest.importorskip("triton")
    environment = dict(os.environ, TRITON_INTERPRET="1", RANET_FAST_BACKEND="triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run([sys.executable, "-c", script], cwd=root, env=environment, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stdout + completed.stderr


@contextlib.contextmanager
def int64_indices(kernel_module, *kernel_names):
    """Runs the block with the 64-bit index variant forced (RANET_FAST_TRITON_INT64_INDEX=1, see
    ranet_fast/kernels/indexing.py) and checks that the named kernels of kernel_module were
    launched, each time with INDEX_DTYPE int64: without the switch, small tensors take int32."""
    from ranet_fast.kernels.indexing import FORCE_INT64_ENV

    index_types = []

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*arguments, **keywords):
                index_types.append(str(keywords["INDEX_DTYPE"]))
                return launch(*arguments, **keywords)

            return run

    originals = {name: getattr(kernel_module, name) for name in kernel_names}
    previous = os.environ.get(FORCE_INT64_ENV)
    os.environ[FORCE_INT64_ENV] = "1"
    for name, kernel in originals.items():
        setattr(kernel_module, name, Recording(kernel))
    try:
        yield
    finally:
        for name, kernel in originals.items():
            setattr(kernel_module, name, kernel)
        if previous is None:
            del os.environ[FORCE_INT64_ENV]
        else:
            os.environ[FORCE_INT64_ENV] = previous
    assert index_types and set(index_types) == {"int64"}, index_types
