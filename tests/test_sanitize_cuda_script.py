"""scripts/sanitize_cuda.sh: where it cannot run (no GPU) it stops at once with a message that says
why, before writing a report. (Its real run needs a GPU machine; see the README.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cuda_testing import CUDA_GPU_PRESENT

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason=f"{CUDA_GPU_PRESENT}: the script would run the sanitizer")
def test_fails_fast_without_a_gpu(tmp_path):
    report = tmp_path / "report"
    completed = subprocess.run(["bash", str(ROOT / "scripts" / "sanitize_cuda.sh"), str(report)], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.startswith("sanitize_cuda: ") and "GPU" in completed.stderr
    assert not report.exists()


def _executable(path, text):
    path.write_text(text)
    path.chmod(0o755)


def _run_with_a_fake_driver(tmp_path, **env):
    """The script with an nvidia-smi that lists a device, so that it goes on to its Python checks."""
    fake = tmp_path / "bin"
    fake.mkdir()
    _executable(fake / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: fake'\n")
    report = tmp_path / "report"
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path), **env}
    completed = subprocess.run(["bash", str(ROOT / "scripts" / "sanitize_cuda.sh"), str(report)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
    assert not report.exists()
    return completed


@pytest.mark.skipif(torch.cuda.is_available(), reason=f"{CUDA_GPU_PRESENT}: the script would run the sanitizer")
def test_a_driver_without_a_usable_gpu_is_caught_by_the_torch_check(tmp_path):
    """An nvidia-smi that lists a device while torch sees none (a CPU-only torch, say)."""
    completed = _run_with_a_fake_driver(tmp_path, PYTHON=sys.executable)
    assert completed.returncode == 2, completed.stderr
    assert "sanitize_cuda: torch" in completed.stderr and "sees no CUDA GPU" in completed.stderr


def _fake_venv(directory, name):
    """A venv whose python only says which it is and fails."""
    (directory / "bin").mkdir(parents=True)
    _executable(directory / "bin" / "python", f"#!/bin/sh\necho 'python of {name}' >&2\nexit 3\n")
    return directory


def test_the_python_is_the_one_of_ranet_fast_venv(tmp_path):
    venv = _fake_venv(tmp_path / "venv-device", "venv-device")
    completed = _run_with_a_fake_driver(tmp_path, RANET_FAST_VENV=str(venv))
    assert completed.returncode == 2, completed.stderr
    assert "python of venv-device" in completed.stderr


def test_python_overrides_ranet_fast_venv(tmp_path):
    venv = _fake_venv(tmp_path / "venv-device", "venv-device")
    other = _fake_venv(tmp_path / "other", "PYTHON")
    completed = _run_with_a_fake_driver(tmp_path, RANET_FAST_VENV=str(venv), PYTHON=str(other / "bin" / "python"))
    assert completed.returncode == 2, completed.stderr
    assert "python of PYTHON" in completed.stderr and "venv-device" not in completed.stderr


def test_a_missing_venv_is_named(tmp_path):
    completed = _run_with_a_fake_driver(tmp_path, RANET_FAST_VENV=str(tmp_path / "nowhere"))
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.startswith("sanitize_cuda: no Python at ") and "nowhere/bin/python" in completed.stderr
