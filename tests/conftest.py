"""Suite-wide rules: the skip policy, and no CUDA numerics settings leaking from one test to the next.

Skip policy. On a machine without a CUDA GPU the GPU-only tests skip with the reason "no CUDA GPU"
(tests/cuda_testing.py); on one with a GPU, tests that only make sense without one skip with a
reason starting "CUDA GPU present". Every other skip means that something the suite should have
tested was not there (ranet_fast._C, its CUDA kernels, Triton, torchrun). In CI (environment
variable CI=true) such a skip fails the run, after the tests, with the list of them; elsewhere the
list is printed as a warning.

GPU marker. Every test skipped for want of a GPU gets the ``gpu`` marker, so the GPU machine runs
exactly those (``pytest -m gpu``, as scripts/gpu_check.sh does) without a list to keep in step with
the tests. Shared parameters. A test taking ``backend_and_device`` runs on each backend its module
lists in ``BACKENDS`` (tests/op_testing.py names them and their skips); one taking ``device`` on the
CPU and on the GPU where there is one; one taking ``dtype`` and not parametrizing it on every
floating dtype (op_testing.TOLERANCE_BY_DTYPE bounds results against float64). Triton
interpreter. A module whose ``triton_interpreter_checks()`` names its checks gets them run in one subprocess under
TRITON_INTERPRET=1 by the ``triton_interpreter_report`` fixture (tests/triton_interpreter.py).
Failure log. Where ``RANET_FAST_FAILURE_LOG`` names a file, each failure is appended to it
with its traceback as it happens, so a run that a deadline stops still says what failed and why.
Measured dispatch (ranet_fast.dispatch). Off for the session (``RANET_FAST_TUNING=0``, inherited by
the subprocesses tests start), with a cache directory of the session's own, so that every op runs
its static default backend and every fast layer its fused forward, whatever this machine measured
before: tests of the fused paths test the fused paths. tests/test_dispatch.py turns it on itself.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from cuda_testing import NO_CUDA_GPU, exact_float32, numerics_state, restore_numerics, skip_is_expected
from op_testing import DEVICES, FLOAT_DTYPES
from triton_interpreter import run_module_checks_under_interpreter

FAILURE_LOG_VAR = "RANET_FAST_FAILURE_LOG"
os.environ["RANET_FAST_TUNING"] = "0"
os.environ["RANET_FAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="ranet_fast-test-dispatch-")
atexit.register(shutil.rmtree, os.environ["RANET_FAST_CACHE_DIR"], ignore_errors=True)
_unexpected_skips: list[tuple[str, str]] = []
_controller = True  # False in pytest-xdist's workers, which forward their reports to the controller


def pytest_configure(config):
    global _controller
    _controller = not hasattr(config, "workerinput")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (added to every test with a skipif mark for want "
                                       "of one); scripts/gpu_check.sh runs pytest -m gpu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(mark.kwargs.get("reason") == NO_CUDA_GPU for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


def pytest_generate_tests(metafunc):
    if "backend_and_device" in metafunc.fixturenames:
        metafunc.parametrize("backend_and_device", metafunc.module.BACKENDS)
    # A test that chooses its own devices or dtypes parametrizes them itself.
    if "device" in metafunc.fixturenames and not _parametrizes(metafunc, "device"):
        metafunc.parametrize("device", DEVICES)
    if "dtype" in metafunc.fixturenames and not _parametrizes(metafunc, "dtype"):
        metafunc.parametrize("dtype", FLOAT_DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))


def _parametrizes(metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if name in (names.replace(" ", "").split(",") if isinstance(names, str) else names):
            return True
    return False


@pytest.fixture(scope="module")
def triton_interpreter_report(request) -> dict:
    """The outcome of the module's ``triton_interpreter_checks()`` run on CPU tensors under the Triton
    interpreter: {"interpreted": bool, "checks": {name: "ok" or traceback}}."""
    return run_module_checks_under_interpreter(request.module.__name__)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _record(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not skip_is_expected(reason, torch.cuda.is_available()):
        _unexpected_skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _record(report)
    path = os.environ.get(FAILURE_LOG_VAR)
    if path and _controller and report.failed:
        with open(path, "a") as log:
            log.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n\n")


def pytest_collectreport(report):
    # A module that skips as a whole (pytest.skip(..., allow_module_level=True)) skips while collected.
    _record(report)


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and _in_ci() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not _unexpected_skips:
        return
    verdict = "fail the run (CI=true)" if _in_ci() else "would fail a CI run (CI=true)"
    terminalreporter.section("skips other than for the GPU", sep="=", red=_in_ci(), yellow=not _in_ci())
    terminalreporter.line(
        f"{len(_unexpected_skips)} test(s) skipped for a reason other than the machine's GPU; these "
        f"{verdict}: something the suite is meant to test is missing here."
    )
    for nodeid, reason in _unexpected_skips:
        terminalreporter.line(f"  {nodeid}: {reason}")


@pytest.fixture(autouse=True)
def _cuda_numerics_do_not_leak():
    """Restores TF32, cuDNN benchmark/deterministic and deterministic-algorithms mode after each test.

    These are process-wide: one test (or code it runs, e.g. the trainer's cudnn.benchmark = True on
    CUDA) changing them would change the numerics of every later test.
    """
    state = numerics_state()
    yield
    restore_numerics(state)


@pytest.fixture
def float32_without_tf32():
    """For a test that compares float32 results with eager cuDNN: TF32 off while it runs (see
    cuda_testing.exact_float32)."""
    with exact_float32():
        yield


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """The measured dispatch on (the suite runs with it off), an empty cache directory, and no choice
    in memory before or after the test."""
    from ranet_fast import _extension, dispatch

    monkeypatch.setenv(dispatch.TUNING_ENV_VAR, "1")
    monkeypatch.setenv(dispatch.CACHE_DIR_ENV_VAR, str(tmp_path))
    monkeypatch.delenv(dispatch.LAYERS_ENV_VAR, raising=False)
    monkeypatch.delenv(_extension.BACKEND_ENV_VAR, raising=False)
    dispatch.forget_choices()
    yield tmp_path
    dispatch.forget_choices()
