"""The installed package works outside the source tree, and a wrong install stops with the right command.

Each check runs in a fresh interpreter whose working directory is a temporary folder, so nothing is
imported from the checkout by accident. ./run.sh test-device-stack runs this file against a regular
(non-editable) install with the package sources removed from its copy of the tree; the main suite
runs it against the editable install.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest

import ranet_fast.benchmarks.__main__ as benchmarks_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(arguments, cwd, environment=None, timeout=300):
    completed = subprocess.run([sys.executable, *arguments], cwd=cwd, capture_output=True, text=True,
                               env={**os.environ, **(environment or {})}, timeout=timeout)
    return completed


def test_env_report_runs_outside_the_source_tree(tmp_path):
    completed = run_python(["-m", "ranet_fast.env"], cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "ranet_fast._C" in completed.stdout and "backends:" in completed.stdout


def test_benchmarks_command_runs_as_the_installed_package(tmp_path):
    completed = run_python(["-m", "ranet_fast.benchmarks", "exit_confidence", "--rows", "4", "--classes", "3",
                            "--device", "cpu", "--repeats", "1", "--min-run-time", "0.001", "--json", "result.json"],
                           cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["benchmark"] == "exit_confidence" and "reference" in result["rows"][0]["seconds"]


def test_ranet_bench_script_is_the_benchmarks_command():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="ranet-bench")
    assert script.load() is benchmarks_cli.main


def test_triton_kernel_imports_and_launches_from_the_installed_package(tmp_path):
    pytest.importorskip("triton")
    # The interpreter runs the kernel on CPU tensors; Triton fixes interpreter mode when a kernel is
    # defined, hence the fresh interpreter with TRITON_INTERPRET=1 from the start.
    script = textwrap.dedent("""
        import torch

        import ranet_fast.kernels.exit_confidence as kernel_module
        from ranet_fast.ops import exit_confidence, exit_confidence_reference

        logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
        confidence, prediction = exit_confidence(logits, backend="triton")
        expected_confidence, expected_prediction = exit_confidence_reference(logits)
        torch.testing.assert_close(confidence, expected_confidence)
        assert torch.equal(prediction, expected_prediction)
        print("launched", kernel_module.__name__)
    """)
    completed = run_python(["-c", script], cwd=tmp_path, environment={"TRITON_INTERPRET": "1"})
    assert completed.returncode == 0, completed.stderr
    assert "launched ranet_fast.kernels.exit_confidence" in completed.stdout


def fake_torch(tmp_path, folder: str, body: str) -> str:
    """A folder holding a module named torch, to put first on the path of setup.py's interpreter."""
    package = tmp_path / folder / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(body)
    return str(tmp_path / folder)


@pytest.mark.parametrize("folder, body", [
    # pip's isolated build env without torch (pyproject.toml does not ask for one).
    ("no-torch", "raise ImportError(\"No module named 'torch'\")\n"),
    # A build tool that put a torch of its choosing into its isolated environment.
    ("pip-build-env-1234/overlay/site-packages", "__version__ = '9.9.9'\n"),
], ids=["torch hidden by isolation", "torch from an isolated build env"])
def test_isolated_build_stops_with_the_no_build_isolation_command(tmp_path, folder, body):
    path = fake_torch(tmp_path, folder, body)
    completed = run_python([os.path.join(ROOT, "setup.py"), "--name"], cwd=ROOT,
                           environment={"PYTHONPATH": path, "RANET_FAST_NO_EXTENSION": "0"})
    assert completed.returncode != 0
    assert "pip install --no-build-isolation -e ." in completed.stderr
