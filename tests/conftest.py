"""Test-suite wide hooks.

Every test skipped for want of a GPU gets the ``gpu`` marker, so the GPU machine runs exactly those
(``pytest -m gpu``, as scripts/gpu_check.sh does) without a list to keep in step with the tests.
"""

import os

import pytest

# scripts/gpu_check.sh names a file here: each failure is appended as it happens, so a run that a
# deadline stops still says what failed and why.
FAILURE_LOG_VAR = "RANET_FAST_FAILURE_LOG"


def pytest_configure(config):
    global _controller
    _controller = not hasattr(config, "workerinput")  # xdist forwards workers' reports to the controller
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (added to every test with a skipif mark for want "
                                       "of one); scripts/gpu_check.sh runs pytest -m gpu")


def needs_gpu(reason: str) -> bool:
    return "no GPU" in reason or "no CUDA GPU" in reason


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(needs_gpu(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


_controller = True


def pytest_runtest_logreport(report):
    path = os.environ.get(FAILURE_LOG_VAR)
    if path and _controller and report.failed:
        with open(path, "a") as log:
            log.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n\n")
