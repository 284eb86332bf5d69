"""scripts/sanitize_cuda.sh: where it cannot run (no GPU) it stops at once with a message that says
why, before writing a report. (Its real run needs a GPU machine; see the README.)"""

from __future__ import annotations

import subprocess
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


@pytest.mark.skipif(torch.cuda.is_available(), reason=f"{CUDA_GPU_PRESENT}: the script would run the sanitizer")
def test_a_driver_without_a_usable_gpu_is_caught_by_the_torch_check(tmp_path):
    """An nvidia-smi that lists a device while torch sees none (a CPU-only torch, say)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\n")
    (fake / "nvidia-smi").chmod(0o755)
    report = tmp_path / "report"
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)}
    completed = subprocess.run(["bash", str(ROOT / "scripts" / "sanitize_cuda.sh"), str(report)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert "sanitize_cuda: torch" in completed.stderr and "sees no CUDA GPU" in completed.stderr
    assert not report.exists()
