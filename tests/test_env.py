"""python -m ranet_fast.env reports versions and every backend's availability."""

import json
import subprocess
import sys

import torch

from ranet_fast import _extension
from ranet_fast.env import environment_info


def run_env(*arguments):
    completed = subprocess.run(
        [sys.executable, "-m", "ranet_fast.env", *arguments], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_report_mentions_every_backend_and_versions():
    report = run_env()
    for label in ("cuda (compiled CUDA kernels)", "triton", "cpu extension", "reference (PyTorch)"):
        assert label in report
    assert torch.__version__ in report
    backend_lines = [line for line in report.splitlines() if line.startswith("  ")]
    assert len(backend_lines) == len(_extension.BACKENDS)
    for line in backend_lines:
        assert " yes " in line or " no " in line
    if not torch.cuda.is_available():
        cuda_line = next(line for line in backend_lines if line.lstrip().startswith("cuda"))
        assert " no " in cuda_line
        assert any(reason in cuda_line for reason in ("no GPU visible", "_C not loaded", "built without CUDA"))


def test_json_report_matches_this_process():
    info = json.loads(run_env("--json"))
    assert set(info["backends"]) == set(_extension.BACKENDS)
    assert info["backends"]["reference"]["available"] is True
    assert info["extension"]["loaded"] == _extension.extension_loaded()
    assert info["backends"]["cpu"]["available"] == _extension.extension_loaded()
    assert info["torch"] == torch.__version__
    for report in info["backends"].values():
        assert report["reason"]


def test_environment_info_is_json_serialisable():
    info = environment_info()
    assert json.loads(json.dumps(info)) == info
    assert info["cuda_available"] == torch.cuda.is_available()
