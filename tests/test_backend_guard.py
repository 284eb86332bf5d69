"""CI cannot hide a missing backend.

* ``python -m ranet_fast.env --require cuda-build,triton`` (what ./run.sh setup runs when CI=true
  and a CUDA toolkit is present, and so what .ci/run runs) exits 1, naming what is missing, on a
  checkout whose ranet_fast._C is absent or was built without CUDA kernels, or where Triton does not
  import. The checkout's state is simulated in a subprocess: sys.modules entries set to None make
  an import fail as if the module did not exist, and a module object stands in for a _C built
  without (or with) CUDA kernels.
* A _C that exists but fails to import, or was built against another torch, makes
  ``import ranet_fast`` raise ExtensionImportError naming both torch versions and the rebuild
  command, instead of falling back to the reference; a _C that is absent stays a fallback
  (tests/test_exit_confidence.py, test_fallback_without_extension_and_triton).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ranet_fast import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prepended to each subprocess: stand-ins for the extension and Triton, chosen by environment
# variables, installed before ranet_fast is imported.
_SIMULATION = textwrap.dedent(
    """
    import importlib.machinery, os, sys, types
    import torch

    def fake_module(name, **attributes):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attributes)
        return module

    extension = os.environ["SIMULATED_EXTENSION"]
    if extension == "absent":
        sys.modules["ranet_fast._C"] = None
    elif extension in ("cpu-only", "cuda"):
        # The real library, loaded before the package: it registers the ops the package needs, and
        # only its WITH_CUDA flag is simulated.
        import glob, importlib.util
        path = next(path for suffix in importlib.machinery.EXTENSION_SUFFIXES
                    for path in glob.glob(os.path.join("ranet_fast", "_C" + suffix)))
        spec = importlib.util.spec_from_file_location("ranet_fast._C", path)
        library = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(library)
        library.WITH_CUDA = int(extension == "cuda")
        sys.modules["ranet_fast._C"] = library
    triton = os.environ["SIMULATED_TRITON"]
    if triton == "absent":
        sys.modules["triton"] = None
    elif triton == "present":
        try:
            import triton  # noqa: F401
        except ImportError:
            sys.modules["triton"] = fake_module("triton", __version__="0.0-simulated")
    """
)


NO_EXTENSION = f"ranet_fast._C not loaded: {_extension.extension_import_error()}"
# Simulating a present _C (with or without CUDA kernels) loads the built one.
needs_extension = pytest.mark.skipif(not _extension.extension_loaded(), reason=NO_EXTENSION)


def run_check(extension: str, triton: str, requirements: str = "cuda-build,triton"):
    script = _SIMULATION + "import runpy\nrunpy.run_module('ranet_fast.env', run_name='__main__')\n"
    environment = dict(os.environ, SIMULATED_EXTENSION=extension, SIMULATED_TRITON=triton)
    environment.pop("RANET_FAST_NO_EXTENSION", None)
    return subprocess.run([sys.executable, "-c", script, "--require", requirements], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)


@needs_extension
def test_check_passes_with_a_cuda_build_and_triton():
    done = run_check("cuda", "present")
    assert done.returncode == 0, done.stderr
    assert "required backends present: cuda-build, triton" in done.stdout


@pytest.mark.parametrize(
    "extension, triton, expected",
    [
        pytest.param("cuda", "absent", ["triton: Triton is unusable (triton not installed)"], marks=needs_extension),
        pytest.param("cpu-only", "present", ["cuda-build: ranet_fast._C was built without its CUDA kernels"],
                     marks=needs_extension),
        ("absent", "present", ["cuda-build: ranet_fast._C is not loaded"]),
        ("absent", "absent", ["cuda-build: ranet_fast._C is not loaded", "triton: Triton is unusable"]),
    ],
    ids=["no-triton", "cpu-only-extension", "no-extension", "neither"],
)
def test_check_fails_when_a_backend_is_missing(extension, triton, expected):
    done = run_check(extension, triton)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{len(expected)} required backend(s) missing" in done.stderr
    for message in expected:
        assert message in done.stderr, done.stderr
    assert "pip install --no-build-isolation --no-deps -e ." in done.stderr or "pip install triton" in done.stderr


def _run_sh_check_line(tmp_path, ci: str | None):
    """The line of ./run.sh's setup that runs the check, executed as written (with its find_cuda_home
    and a stand-in CUDA toolkit), in a Python where Triton is hidden."""
    run_sh = open(os.path.join(ROOT, "run.sh"), encoding="utf-8").read()
    lines = [line.strip() for line in run_sh.splitlines() if "ranet_fast.env --require" in line]
    assert len(lines) == 1, lines
    start = run_sh.index("find_cuda_home() {")
    function = run_sh[start:run_sh.index("\n}\n", start) + 3]
    toolkit = tmp_path / "cuda"
    (toolkit / "include").mkdir(parents=True, exist_ok=True)
    (toolkit / "bin").mkdir(exist_ok=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    hide = tmp_path / "hide-triton"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text('import sys\nsys.modules["triton"] = None\n')
    script = f"set -euo pipefail\n{function}\nPY={sys.executable}\n{lines[0]}\necho reached the tests\n"
    environment = dict(os.environ, CUDA_HOME=str(toolkit), PYTHONPATH=str(hide))
    environment.pop("CI", None)
    if ci is not None:
        environment["CI"] = ci
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=300)


def test_ci_run_stops_at_set_up_without_triton(tmp_path):
    """.ci/run exports CI=true and runs ./run.sh test, whose set-up ends with the check."""
    ci_run = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "\nexport CI=true" in ci_run and "./run.sh test" in ci_run
    done = _run_sh_check_line(tmp_path, "true")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "triton: Triton is unusable (triton not installed)" in done.stderr
    assert "reached the tests" not in done.stdout
    # Outside CI the set-up goes on: a developer may lack Triton.
    done = _run_sh_check_line(tmp_path, None)
    assert done.returncode == 0 and "reached the tests" in done.stdout, done.stdout + done.stderr


@needs_extension
def test_extension_requirement_alone_accepts_a_cpu_only_build():
    done = run_check("cpu-only", "absent", "extension")
    assert done.returncode == 0, done.stderr


def test_unknown_requirement_is_refused():
    done = run_check("absent", "absent", "cuda-build,gpu")
    assert done.returncode == 2 and "expected a comma-separated list of extension, cuda-build, triton" in done.stderr


# ---------------------------------------------------------------------------
# A _C that exists but does not fit the running torch.
# ---------------------------------------------------------------------------

# A meta-path finder hands out a "ranet_fast._C" located at a file that carries the build-info
# marker, whose loader fails the way a mismatched build does, or succeeds with another torch's version.
_BROKEN_EXTENSION = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, os, sys, types

    class Loader(importlib.abc.Loader):
        def create_module(self, spec):
            if os.environ["BROKEN_HOW"] == "undefined-symbol":
                raise ImportError(spec.origin + ": undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
            return types.ModuleType(spec.name)

        def exec_module(self, module):
            module.WITH_CUDA = 1
            module.TORCH_VERSION = "2.11.0+cu130"

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "ranet_fast._C":
                return importlib.machinery.ModuleSpec(name, Loader(), origin=os.environ["BROKEN_PATH"])
            return None

    sys.meta_path.insert(0, Finder())
    """
)


@pytest.mark.parametrize("how", ["undefined-symbol", "other-torch"])
def test_mismatched_extension_raises_naming_both_torch_versions(tmp_path, how):
    library = tmp_path / "_C.cpython-312-x86_64-linux-gnu.so"
    library.write_bytes(b"\x7fELF\x00junk\x00ranet_fast build info: torch=2.11.0+cu130;\x00more junk")
    script = _BROKEN_EXTENSION + textwrap.dedent(
        """
        import torch
        try:
            import ranet_fast
        except ImportError as error:
            print(type(error).__name__)
            print(error)
        else:
            print("no error; extension loaded:", ranet_fast._extension.extension_loaded())
        """
    )
    environment = dict(os.environ, BROKEN_HOW=how, BROKEN_PATH=str(library))
    environment.pop("RANET_FAST_NO_EXTENSION", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "ExtensionImportError", done.stdout
    message = done.stdout
    assert str(library) in message
    assert "built against: torch 2.11.0+cu130" in message
    assert f"running:       torch {torch.__version__}" in message
    assert "pip install --no-build-isolation --no-deps -e ." in message and "./run.sh setup" in message
    if how == "undefined-symbol":
        assert "exists but failed to import: ImportError:" in message and "undefined symbol" in message
    else:
        assert "was built against another torch than this one" in message


def test_no_extension_env_var_runs_without_the_extension():
    script = textwrap.dedent(
        """
        import torch
        from ranet_fast import _extension
        from ranet_fast.ops import exit_confidence
        assert not _extension.extension_loaded()
        print(_extension.backend_status("cpu", "cpu")[1])
        print(_extension.resolve_backend("op", torch.randn(2, 3)))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, RANET_FAST_NO_EXTENSION="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "_C not loaded: RANET_FAST_NO_EXTENSION=1: the compiled extension is not used", "reference"]


@needs_extension
def test_built_extension_records_its_torch_in_the_module_and_the_file():
    """The marker the error path reads is really in the library setup.py built."""
    from ranet_fast import _C

    assert _C.TORCH_VERSION == str(torch.__version__)
    assert _extension.built_with_torch_of_file(_C.__file__) == str(torch.__version__)
