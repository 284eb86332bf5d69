"""Test-suite wide hooks.

Every test skipped for want of a GPU gets the ``gpu`` marker, so the GPU machine runs exactly those
(``pytest -m gpu``, as scripts/gpu_check.sh does) without a list to keep in step with the tests.
"""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (added to every test with a skipif mark for want "
                                       "of one); scripts/gpu_check.sh runs pytest -m gpu")


def needs_gpu(reason: str) -> bool:
    return "no GPU" in reason or "no CUDA GPU" in reason


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(needs_gpu(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)
