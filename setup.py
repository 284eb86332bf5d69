"""Build script of ranet_fast.

Recommended install (uses the torch already in the environment, which the
compiled extension must match):

    pip install --no-build-isolation --no-deps -e .

Environment variables:
    RANET_FAST_NO_EXTENSION=1   pure-Python install: skip ranet_fast._C; the ops
                                fall back to Triton or the PyTorch reference.
    RANET_FAST_WITH_CUDA=auto|0|1
                                auto (default): build the CUDA kernels when torch
                                is a CUDA build and the CUDA toolkit (CUDA_HOME)
                                is found -- no GPU is needed to compile them;
                                0: CPU-only extension; 1: require CUDA.
    TORCH_CUDA_ARCH_LIST        GPU architectures; defaults to "8.0;9.0"
                                (A100, H100/H200).
    CUDA_HOME                   CUDA toolkit root, e.g. /usr/local/cuda-13.0.
    MAX_JOBS                    parallel compile jobs (ninja).
    DEBUG=1                     compile with -O0 -g.

The extension does not use the Python limited API: it is built against one
torch version anyway (the torch C++ ABI is not stable), so an abi3 wheel
would buy nothing.
"""

import glob
import os
import re

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def read_version():
    with open(os.path.join(ROOT, "ranet_fast", "__init__.py"), encoding="utf-8") as init:
        match = re.search(r'^__version__ = "([^"]+)"', init.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError("ranet_fast/__init__.py must define __version__ = \"X.Y.Z\"")
    return match.group(1)


def env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def relative_sources(pattern):
    # setuptools wants paths relative to setup.py; sorted for reproducible builds.
    return sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, pattern)))


def build_with_cuda(torch, cuda_home):
    requested = os.environ.get("RANET_FAST_WITH_CUDA", "auto").strip().lower()
    cuda_possible = torch.version.cuda is not None and cuda_home is not None
    if requested == "auto":
        return cuda_possible
    if requested in ("0", "false", "no", "off"):
        return False
    if requested in ("1", "true", "yes", "on"):
        if not cuda_possible:
            raise RuntimeError(
                "RANET_FAST_WITH_CUDA=1 but "
                + ("torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA toolkit was found (set CUDA_HOME)")
            )
        return True
    raise RuntimeError(f"RANET_FAST_WITH_CUDA must be auto, 0 or 1, got {requested!r}")


def extension_modules_and_commands():
    if env_flag("RANET_FAST_NO_EXTENSION"):
        print("ranet_fast: RANET_FAST_NO_EXTENSION=1, skipping the C++/CUDA extension")
        return [], {}

    # Imported here so that a pure-Python install does not need torch to build.
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = env_flag("DEBUG")
    optimization = ["-O0", "-g"] if debug else ["-O3"]
    sources = (
        relative_sources("csrc/*.cpp")
        + relative_sources("csrc/ops/*.cpp")
        + relative_sources("csrc/ops/cpu/*.cpp")
    )
    compile_args = {"cxx": list(optimization)}
    define_macros = []

    if build_with_cuda(torch, CUDA_HOME):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        print(
            f"ranet_fast: building the CUDA extension with {CUDA_HOME} "
            f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
        extension_class = CUDAExtension
        sources += relative_sources("csrc/ops/cuda/*.cu")
        compile_args["nvcc"] = list(optimization)
        # WITH_CUDA is what ranet_fast._C.WITH_CUDA reports.
        define_macros.append(("WITH_CUDA", None))
    else:
        print("ranet_fast: building the CPU-only extension")
        extension_class = CppExtension

    extension = extension_class(
        "ranet_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=compile_args,
    )
    # BuildExtension uses ninja when it is installed and honours MAX_JOBS.
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules_and_commands()

setup(
    name="ranet_fast",
    version=read_version(),
    description="Triton and CUDA kernels and a reference implementation for "
    "Resolution Adaptive Networks (RANet) and other multi-exit CNNs",
    python_requires=">=3.10",
    # kernels/ lives at the top of the repository next to csrc/ but is shipped
    # as ranet_fast.kernels, so the install adds no top-level module besides
    # ranet_fast; likewise benchmarks/ as ranet_fast.benchmarks, for the
    # ranet-bench command (its suite uses relative imports for that reason).
    packages=find_packages(include=["ranet_fast", "ranet_fast.*"])
    + ["ranet_fast.kernels", "ranet_fast.benchmarks"]
    + [f"ranet_fast.kernels.{name}" for name in find_packages("kernels")],
    package_dir={"ranet_fast.kernels": "kernels", "ranet_fast.benchmarks": "benchmarks"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "torchvision", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["ranet-train = ranet_fast.train.__main__:main",
                                     "ranet-bench = ranet_fast.benchmarks.suite:main"]},
    zip_safe=False,
)
