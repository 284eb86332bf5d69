"""tests/conftest.py's skip policy: with CI=true a run that skipped a test for any reason but the
machine's GPU fails; without it the same run passes and lists those skips as a warning.

Runs pytest in a subprocess on a scratch directory holding copies of conftest.py, the helper
modules it imports and a few tests, with CUDA_VISIBLE_DEVICES="" so that torch sees no GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from cuda_testing import CUDA_GPU_PRESENT, NO_CUDA_GPU, skip_is_expected

TESTS = Path(__file__).resolve().parent

GPU_ONLY = textwrap.dedent(
    """
    import pytest
    from cuda_testing import requires_cuda_gpu

    @requires_cuda_gpu
    def test_needs_a_gpu():
        pass

    def test_runs():
        pass
    """
)
MISSING_BACKEND = textwrap.dedent(
    """
    import pytest

    @pytest.mark.skipif(True, reason="triton not installed")
    def test_needs_triton():
        pass

    def test_skips_at_run_time():
        pytest.skip("ranet_fast._C not loaded: ModuleNotFoundError")
    """
)
MODULE_SKIP = textwrap.dedent(
    """
    import pytest

    pytest.skip("torchrun is not installed next to this Python", allow_module_level=True)
    """
)


def run_pytest(tmp_path, files: dict[str, str], ci: bool):
    for name in ("conftest.py", "cuda_testing.py", "op_testing.py", "triton_interpreter.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    environment.pop("CI", None)
    if ci:
        environment["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)


# Each run starts a Python that imports torch, so the cases share three runs.


def test_gpu_skips_pass_in_ci(tmp_path):
    done = run_pytest(tmp_path, {"test_gpu_only.py": GPU_ONLY}, ci=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 1 skipped" in done.stdout and "skips other than for the GPU" not in done.stdout


def test_other_skips_fail_in_ci(tmp_path):
    files = {"test_gpu_only.py": GPU_ONLY, "test_missing.py": MISSING_BACKEND, "test_module.py": MODULE_SKIP}
    done = run_pytest(tmp_path, files, ci=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 passed" in done.stdout and "failed" not in done.stdout  # the skips alone fail the run
    assert "skips other than for the GPU" in done.stdout and "fail the run (CI=true)" in done.stdout
    listed = sorted(line for line in done.stdout.splitlines() if line.startswith("  test_"))
    assert listed == [
        "  test_missing.py::test_needs_triton: triton not installed",
        "  test_missing.py::test_skips_at_run_time: ranet_fast._C not loaded: ModuleNotFoundError",
        "  test_module.py: torchrun is not installed next to this Python",
    ]


def test_other_skips_only_warn_outside_ci(tmp_path):
    done = run_pytest(tmp_path, {"test_gpu_only.py": GPU_ONLY, "test_missing.py": MISSING_BACKEND}, ci=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "would fail a CI run (CI=true)" in done.stdout and "test_needs_triton: triton not installed" in done.stdout


def test_which_reasons_are_expected():
    assert skip_is_expected(NO_CUDA_GPU, gpu_visible=False)
    assert skip_is_expected(f"Skipped: {NO_CUDA_GPU}", gpu_visible=False)
    assert not skip_is_expected(NO_CUDA_GPU, gpu_visible=True)  # a GPU-only test skipped on a GPU: wrong
    assert skip_is_expected(f"{CUDA_GPU_PRESENT}: the GPU tests compile and run the kernel", gpu_visible=True)
    assert not skip_is_expected(f"{CUDA_GPU_PRESENT}: the GPU tests compile and run the kernel", gpu_visible=False)
    for reason in ("no GPU", "extension built without CUDA", "triton not installed", "no CUDA GPU or Triton"):
        assert not skip_is_expected(reason, gpu_visible=False)
